//! The AFC domain of the station controller cluster, with no I/O and no async runtime.
//!
//! Everything a controller and a gate agent must agree on lives here, so both sides are built from
//! the same definitions and tested without sockets:
//!
//! - [`model`]: identifiers, money, time and dates, card types, media, directions, reject reasons.
//! - [`mode`]: the station operating-mode bitmask (SPEC §2) and the mode history gates consult.
//! - [`fare`]: the network description and fare rule, compiled into an OD [`fare::FareTable`]
//!   ([`network`] is its former path, kept for the crates that name it).
//! - [`blacklist`]: `(media, id)` entries and number ranges, a full base plus ordered deltas.
//! - [`bank`]: bank cards and phones (payment token references, the deny-list key, the
//!   unpaid-tap limit).
//! - [`qr`]: the ride-code byte layout, its ed25519 verification, the replay cache and a generator.
//! - [`decision`]: the tap decision, a pure function of (tap, parameters, modes, now).
//! - [`package`]: signed parameter packages, their body encodings and chunking for MQTT.
//! - [`ledger`]: the transaction record, its canonical bytes, the hash chain, signed gate batches.
//! - [`rollout`]: the staged rollout state machine (canary, soak, all gates, rollback by republish)
//!   and the second-operator guard for mass blacklist insertions.
//! - [`wire`] and [`topic`]: the JSON messages and topic names of SPEC §5.
//! - [`signed`]: the signed envelope of every MQTT message that steers a gate or a controller.
//! - [`tac`]: the PSAM-signed TAC of a stored-value debit: the bytes signed, HMAC-SHA256, key
//!   derivation per PSAM, verification.
//! - [`varint`]: the small integer codec the compact encodings share.

pub mod backoff;
pub mod bank;
pub mod blacklist;
pub mod decision;
pub mod fare;
pub mod ledger;
pub mod mode;
pub mod model;
/// The fare module under its former name: `afc_domain::network::FareTable` and the rest still resolve.
pub use fare as network;
pub mod package;
pub mod qr;
pub mod rollout;
pub mod signed;
pub mod tac;
pub mod topic;
pub mod varint;
pub mod wire;
