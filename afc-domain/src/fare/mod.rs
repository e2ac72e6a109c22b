//! The fare module: the network description and the fare rule (SPEC §3), compiled into the OD [`FareTable`] that gates
//! hold.
//!
//! The controller receives two JSON documents from an engineer (or from clearing): a
//! [`NetworkDescription`] (stations, lines with the distance between adjacent stops, out-of-station
//! transfer links) and a [`FareRule`] (distance bands with inclusive upper limits, an optional
//! increment per distance started beyond the last band, discounts per card type, the minimum fare,
//! an optional ride-time limit and the business-day rule). [`compile`] validates both, computes the
//! shortest-path distance between every pair of stations, and prices each distance, so gates only ever
//! look a fare up; they never run a graph algorithm.
//!
//! Decisions this module makes (documented here because the SPEC is silent on them):
//! - Fare distance is the shortest network path; an in-station transfer (the same station id on two
//!   lines) adds nothing, an out-of-station [`TransferLink`] adds its `m` (which may be 0 when the walk
//!   is not charged).
//! - Without a [`FareRule::beyond`] increment, every distance past the last band pays the last band's
//!   fare: a cap, which is how flat-topped tariffs work.
//! - `min_fare_fen` may be 0 (a free network) but may not exceed the first band's fare: a same-station
//!   exit must not cost more than the shortest real journey.
//! - An overstay surcharge without `max_ride_minutes` is refused as a configuration error rather than
//!   silently ignored.
//! - The input documents refuse unknown fields: a misspelt `max_ride_minutes` must be an error, not a
//!   silently absent ride limit.
//! - A network holds at most [`MAX_STATIONS`] stations, which bounds the table a gate must hold
//!   (1024² entries × 8 bytes = 8 MiB; Dalian's 100 stations take 80 KB).
//!
//! The table's binary body ([`FareTable::encode`]) is what a `fare_table` parameter package carries.
//! [`FareTable::decode`] checks every invariant the compiler guarantees, so a gate can trust a decoded
//! table exactly as much as a compiled one.
//!
//! The parts: `network` (the description), `rule` (the fare rule and its checks), `compile`
//! (validation, shortest paths, pricing) and `table` (the compiled table and its binary body);
//! [`FareError`] is why a pair does not compile.

mod compile;
mod error;
#[cfg(test)]
mod fixtures;
mod network;
mod rule;
mod table;

pub use compile::compile;
pub use error::FareError;
pub use network::{Line, NetworkDescription, Station, Stop, TransferLink};
pub use rule::{Band, CardTypeName, FareRule, Increment, MAX_CARD_TYPE_NAME};
pub use table::{FareTable, FareTableDecodeError, MAX_STATIONS};
