//! The network description and the fare rule (SPEC §3), compiled into the OD [`FareTable`] that gates
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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{BusinessDayRule, CardType, Ident, StationCode};
use crate::varint::{self, Reader, VarintError};

/// The largest network [`compile`] and [`FareTable::decode`] accept, in stations.
pub const MAX_STATIONS: usize = 1024;

/// The largest UTC offset a business-day rule may name, in minutes (±18 h, as in ISO 8601 practice).
const MAX_UTC_OFFSET_MINUTES: i32 = 18 * 60;

/// The first bytes of an encoded fare table: "AFCF" and the format number.
const MAGIC: [u8; 4] = *b"AFCF";
const FORMAT: u8 = 1;

// ---------------------------------------------------------------------------------------------
// Network description
// ---------------------------------------------------------------------------------------------

/// A metro network as the operator describes it: the project's own JSON format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDescription {
    /// A human name, shown in the console next to the parameter version.
    pub name: String,
    /// Where the data came from and how sure it is (published, reconstructed, estimated), so that a
    /// fare dispute can be traced to its source.
    #[serde(default)]
    pub provenance: Vec<String>,
    /// Every station once, however many lines stop there.
    pub stations: Vec<Station>,
    /// The lines, each an ordered list of stops with distances between neighbours.
    pub lines: Vec<Line>,
    /// Out-of-station transfers between two different stations (a walk through the street).
    #[serde(default)]
    pub transfers: Vec<TransferLink>,
}

/// A station of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Station {
    /// The numeric code written on cards and used in the OD table.
    pub code: StationCode,
    /// The text id lines and transfers refer to; also the station's MQTT/topic identifier, so it
    /// must be a valid [`Ident`].
    pub id: String,
    /// The Chinese name, as on signs and receipts.
    pub name_zh: String,
    /// The English name, for the console.
    pub name_en: String,
}

/// A line: stops in running order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// A short unique id (`"1"`, `"3B"`), used in error messages.
    pub id: String,
    /// A human name.
    pub name: String,
    /// The stops in running order; at least two.
    pub stops: Vec<Stop>,
}

/// One stop of a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stop {
    /// The station id (not the code), as in [`Station::id`].
    pub station: String,
    /// Metres from the previous stop of this line: `None` only for the first stop, positive for all
    /// others. This is the distance fares are computed from.
    pub m_from_prev: Option<u32>,
}

/// An out-of-station transfer: passengers may leave at `from` and re-enter at `to` (or back) as one
/// journey. Usable in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferLink {
    /// One station id.
    pub from: String,
    /// The other station id; must differ from `from`.
    pub to: String,
    /// Metres the link adds to the fare distance; 0 if the walk is not charged.
    pub m: u32,
}

impl NetworkDescription {
    /// The station with this id, if any.
    pub fn station(&self, id: &str) -> Option<&Station> {
        self.stations.iter().find(|s| s.id == id)
    }
}

// ---------------------------------------------------------------------------------------------
// Fare rule
// ---------------------------------------------------------------------------------------------

/// How a distance becomes a fare, and who pays how much of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FareRule {
    /// A human name, shown in the console.
    pub name: String,
    /// Distance bands, strictly increasing in `up_to_m`, fares non-decreasing.
    pub bands: Vec<Band>,
    /// The increment beyond the last band; `None` caps fares at the last band's fare.
    pub beyond: Option<Increment>,
    /// The fare charged for a same-station exit (and an exit without entry under sequence_free); the
    /// balance a card needs to enter. At most the first band's fare.
    pub min_fare_fen: u32,
    /// Percent of the full fare each accepted card type pays (0..=100); a type not listed is refused.
    pub discounts: BTreeMap<CardType, u8>,
    /// Percent of the full fare a single-journey token costs (Dalian: 100).
    pub token_percent: u8,
    /// The ride-time limit, if the operator has one (Dalian publishes none).
    pub max_ride_minutes: Option<u32>,
    /// Added to the fare of a ride longer than `max_ride_minutes`; 0 when there is no limit.
    pub overstay_surcharge_fen: u32,
    /// When the business day rolls over, for tokens and daily statistics.
    pub business_day: BusinessDayRule,
}

/// One distance band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// The inclusive upper limit of the band, in metres: exactly this distance is still in the band.
    pub up_to_m: u32,
    /// The full fare for a distance in this band.
    pub fare_fen: u32,
}

/// The increment beyond the last band: `fen` more for every `per_m` metres, or part thereof,
/// started beyond the last band's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Increment {
    /// Fen added per step.
    pub fen: u32,
    /// Metres per step; positive.
    pub per_m: u32,
}

impl FareRule {
    /// The full fare for a distance, or `None` if the rule has no bands or the fare overflows `u32`.
    pub fn fare_for_distance(&self, distance_m: u32) -> Option<u32> {
        if let Some(band) = self.bands.iter().find(|b| distance_m <= b.up_to_m) {
            return Some(band.fare_fen);
        }
        let last = self.bands.last()?;
        let Some(inc) = self.beyond else {
            return Some(last.fare_fen);
        };
        if inc.per_m == 0 {
            return None;
        }
        let excess = u64::from(distance_m - last.up_to_m);
        let steps = excess.div_ceil(u64::from(inc.per_m));
        let fare = u64::from(last.fare_fen).checked_add(steps.checked_mul(u64::from(inc.fen))?)?;
        u32::try_from(fare).ok()
    }

    /// Checks the rule on its own (everything except fares that overflow on a given network).
    pub fn validate(&self) -> Result<(), FareError> {
        let first = self.bands.first().ok_or(FareError::EmptyBands)?;
        let mut previous: Option<Band> = None;
        for (index, band) in self.bands.iter().enumerate() {
            let previous_up_to_m = previous.map_or(0, |p| p.up_to_m);
            // The first band's limit must be above 0: a band of zero length is a typo.
            if band.up_to_m <= previous_up_to_m {
                return Err(FareError::BandsNotIncreasing { index, up_to_m: band.up_to_m, previous_up_to_m });
            }
            if let Some(p) = previous {
                if band.fare_fen < p.fare_fen {
                    return Err(FareError::FareDecreases {
                        index,
                        fare_fen: band.fare_fen,
                        previous_fare_fen: p.fare_fen,
                    });
                }
            }
            previous = Some(*band);
        }
        if self.min_fare_fen > first.fare_fen {
            return Err(FareError::MinFareAboveFirstBand {
                min_fare_fen: self.min_fare_fen,
                first_band_fen: first.fare_fen,
            });
        }
        if let Some(inc) = self.beyond {
            if inc.per_m == 0 {
                return Err(FareError::ZeroIncrementDistance);
            }
        }
        for (&card_type, &percent) in &self.discounts {
            if percent > 100 {
                return Err(FareError::DiscountAbove100 { card_type, percent });
            }
        }
        if self.token_percent > 100 {
            return Err(FareError::TokenPercentAbove100 { percent: self.token_percent });
        }
        match self.max_ride_minutes {
            Some(0) => return Err(FareError::ZeroMaxRideMinutes),
            None if self.overstay_surcharge_fen > 0 => {
                return Err(FareError::SurchargeWithoutLimit { surcharge_fen: self.overstay_surcharge_fen })
            }
            _ => {}
        }
        check_business_day(self.business_day).map_err(|()| FareError::InvalidBusinessDay {
            utc_offset_minutes: self.business_day.utc_offset_minutes,
            rollover_minute_of_day: self.business_day.rollover_minute_of_day,
        })
    }
}

fn check_business_day(b: BusinessDayRule) -> Result<(), ()> {
    let offset_ok = (-MAX_UTC_OFFSET_MINUTES..=MAX_UTC_OFFSET_MINUTES).contains(&b.utc_offset_minutes);
    if offset_ok && b.rollover_minute_of_day < 24 * 60 {
        Ok(())
    } else {
        Err(())
    }
}

/// Why a network description and fare rule could not be compiled. Every variant names the item.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FareError {
    #[error("the network has no stations")]
    EmptyNetwork,
    #[error("the network has {count} stations, more than the {max} a fare table may hold")]
    TooManyStations { count: usize, max: usize },
    #[error("station id {id:?} is not a valid identifier (1-64 characters of A-Z a-z 0-9 _ -)")]
    InvalidStationId { id: String },
    #[error("station id {id:?} is listed twice")]
    DuplicateStationId { id: String },
    #[error("station code {code} is used by both {first:?} and {second:?}")]
    DuplicateStationCode { code: StationCode, first: String, second: String },
    #[error("line id {line:?} is listed twice")]
    DuplicateLineId { line: String },
    #[error("line {line:?} has {stops} stop(s); a line needs at least 2")]
    LineTooShort { line: String, stops: usize },
    #[error("line {line:?} stops at {station:?}, which is not a listed station")]
    UnknownStationInLine { line: String, station: String },
    #[error("line {line:?}: the first stop {station:?} has a distance from a previous stop")]
    FirstStopHasDistance { line: String, station: String },
    #[error("line {line:?}: stop {station:?} has no distance from the previous stop")]
    MissingDistance { line: String, station: String },
    #[error("line {line:?}: stop {station:?} is 0 m from the previous stop; distances must be positive")]
    ZeroDistance { line: String, station: String },
    #[error("transfer {from:?} - {to:?} names {station:?}, which is not a listed station")]
    UnknownStationInTransfer { from: String, to: String, station: String },
    #[error("transfer from {station:?} to itself; an in-station transfer needs no link")]
    TransferToItself { station: String },
    #[error("station {station:?} cannot be reached from {from:?}")]
    Disconnected { station: String, from: String },
    #[error("the distance from {from:?} to {to:?} exceeds u32 metres")]
    DistanceOverflow { from: String, to: String },
    #[error("the fare rule has no distance bands")]
    EmptyBands,
    #[error("band {index} ends at {up_to_m} m, not above the previous limit {previous_up_to_m} m")]
    BandsNotIncreasing { index: usize, up_to_m: u32, previous_up_to_m: u32 },
    #[error("band {index} costs {fare_fen} fen, less than the previous band's {previous_fare_fen} fen")]
    FareDecreases { index: usize, fare_fen: u32, previous_fare_fen: u32 },
    #[error("the minimum fare {min_fare_fen} fen is above the first band's fare {first_band_fen} fen")]
    MinFareAboveFirstBand { min_fare_fen: u32, first_band_fen: u32 },
    #[error("the increment beyond the last band has per_m = 0")]
    ZeroIncrementDistance,
    #[error("card type {card_type:?} pays {percent} % of the fare; at most 100 is allowed")]
    DiscountAbove100 { card_type: CardType, percent: u8 },
    #[error("tokens pay {percent} % of the fare; at most 100 is allowed")]
    TokenPercentAbove100 { percent: u8 },
    #[error("max_ride_minutes is 0: every ride would overstay")]
    ZeroMaxRideMinutes,
    #[error("an overstay surcharge of {surcharge_fen} fen is set without max_ride_minutes")]
    SurchargeWithoutLimit { surcharge_fen: u32 },
    #[error(
        "business day rule: UTC offset {utc_offset_minutes} min (at most ±1080) or rollover minute \
         {rollover_minute_of_day} (below 1440) out of range"
    )]
    InvalidBusinessDay { utc_offset_minutes: i32, rollover_minute_of_day: u32 },
    #[error("the fare from {from:?} to {to:?} ({distance_m} m) exceeds u32 fen")]
    FareOverflow { from: String, to: String, distance_m: u32 },
}

// ---------------------------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------------------------

/// Validates `net` and `rule`, computes the shortest-path distance between every pair of stations and
/// prices it. The result is what gates hold.
pub fn compile(net: &NetworkDescription, rule: &FareRule) -> Result<FareTable, FareError> {
    rule.validate()?;
    let n = net.stations.len();
    if n == 0 {
        return Err(FareError::EmptyNetwork);
    }
    if n > MAX_STATIONS {
        return Err(FareError::TooManyStations { count: n, max: MAX_STATIONS });
    }

    // Stations, in code order: the table's row order.
    let mut order: Vec<&Station> = net.stations.iter().collect();
    order.sort_by_key(|s| s.code);
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, s) in order.iter().enumerate() {
        if Ident::new(&s.id).is_err() {
            return Err(FareError::InvalidStationId { id: s.id.clone() });
        }
        if index.insert(s.id.as_str(), i).is_some() {
            return Err(FareError::DuplicateStationId { id: s.id.clone() });
        }
        if let Some(prev) = i.checked_sub(1).and_then(|p| order.get(p)) {
            if prev.code == s.code {
                return Err(FareError::DuplicateStationCode {
                    code: s.code,
                    first: prev.id.clone(),
                    second: s.id.clone(),
                });
            }
        }
    }

    // The graph: undirected edges with metre weights.
    let mut adjacency: Vec<Vec<(usize, u32)>> = vec![Vec::new(); n];
    let mut line_ids = std::collections::BTreeSet::new();
    for line in &net.lines {
        if !line_ids.insert(line.id.as_str()) {
            return Err(FareError::DuplicateLineId { line: line.id.clone() });
        }
        if line.stops.len() < 2 {
            return Err(FareError::LineTooShort { line: line.id.clone(), stops: line.stops.len() });
        }
        let mut previous: Option<usize> = None;
        for stop in &line.stops {
            let Some(&here) = index.get(stop.station.as_str()) else {
                return Err(FareError::UnknownStationInLine {
                    line: line.id.clone(),
                    station: stop.station.clone(),
                });
            };
            match (previous, stop.m_from_prev) {
                (None, None) => {}
                (None, Some(_)) => {
                    return Err(FareError::FirstStopHasDistance {
                        line: line.id.clone(),
                        station: stop.station.clone(),
                    })
                }
                (Some(_), None) => {
                    return Err(FareError::MissingDistance {
                        line: line.id.clone(),
                        station: stop.station.clone(),
                    })
                }
                (Some(_), Some(0)) => {
                    return Err(FareError::ZeroDistance {
                        line: line.id.clone(),
                        station: stop.station.clone(),
                    })
                }
                (Some(prev), Some(m)) => add_edge(&mut adjacency, prev, here, m),
            }
            previous = Some(here);
        }
    }
    for t in &net.transfers {
        let lookup = |id: &String| {
            index.get(id.as_str()).copied().ok_or_else(|| FareError::UnknownStationInTransfer {
                from: t.from.clone(),
                to: t.to.clone(),
                station: id.clone(),
            })
        };
        let (a, b) = (lookup(&t.from)?, lookup(&t.to)?);
        if a == b {
            return Err(FareError::TransferToItself { station: t.from.clone() });
        }
        add_edge(&mut adjacency, a, b, t.m);
    }

    // Connectivity, reported from the first listed station (the one an operator reads first).
    let first_listed = index.get(net.stations[0].id.as_str()).copied().unwrap_or(0);
    let from_first = shortest_distances(&adjacency, first_listed);
    if let Some(unreached) = from_first.iter().position(|d| d.is_none()) {
        return Err(FareError::Disconnected {
            station: order[unreached].id.clone(),
            from: order[first_listed].id.clone(),
        });
    }

    let mut distances = vec![0u32; n * n];
    let mut fares = vec![0u32; n * n];
    for from in 0..n {
        let row =
            if from == first_listed { from_first.clone() } else { shortest_distances(&adjacency, from) };
        for (to, d) in row.into_iter().enumerate() {
            let name = |i: usize| order[i].id.clone();
            // Connectivity was checked above, so every station is reached; 0 is never used.
            let d = d.unwrap_or(0);
            let d = u32::try_from(d)
                .map_err(|_| FareError::DistanceOverflow { from: name(from), to: name(to) })?;
            let fare = if from == to {
                rule.min_fare_fen
            } else {
                rule.fare_for_distance(d).ok_or_else(|| FareError::FareOverflow {
                    from: name(from),
                    to: name(to),
                    distance_m: d,
                })?
            };
            distances[from * n + to] = d;
            fares[from * n + to] = fare;
        }
    }

    let mut discounts = [None; CardType::ALL.len()];
    for (&t, &pct) in &rule.discounts {
        discounts[slot(t)] = Some(pct);
    }
    Ok(FareTable {
        codes: order.iter().map(|s| s.code).collect(),
        fares,
        distances,
        min_fare_fen: rule.min_fare_fen,
        discounts,
        token_percent: rule.token_percent,
        max_ride_minutes: rule.max_ride_minutes,
        overstay_surcharge_fen: rule.overstay_surcharge_fen,
        business_day: rule.business_day,
    })
}

fn add_edge(adjacency: &mut [Vec<(usize, u32)>], a: usize, b: usize, m: u32) {
    if let Some(list) = adjacency.get_mut(a) {
        list.push((b, m));
    }
    if let Some(list) = adjacency.get_mut(b) {
        list.push((a, m));
    }
}

/// Dijkstra from `source`: the shortest distance to every station, `None` where unreachable. Sums in
/// `u64`, so no path of at most 1024 hops of u32 can overflow.
fn shortest_distances(adjacency: &[Vec<(usize, u32)>], source: usize) -> Vec<Option<u64>> {
    let mut dist: Vec<Option<u64>> = vec![None; adjacency.len()];
    let mut heap = BinaryHeap::new();
    if let Some(d) = dist.get_mut(source) {
        *d = Some(0);
        heap.push(Reverse((0u64, source)));
    }
    while let Some(Reverse((d, here))) = heap.pop() {
        if dist.get(here).copied().flatten().is_some_and(|best| d > best) {
            continue;
        }
        for &(next, m) in adjacency.get(here).map(Vec::as_slice).unwrap_or(&[]) {
            let candidate = d + u64::from(m);
            if let Some(slot) = dist.get_mut(next) {
                if !matches!(*slot, Some(best) if best <= candidate) {
                    *slot = Some(candidate);
                    heap.push(Reverse((candidate, next)));
                }
            }
        }
    }
    dist
}

/// The position of a card type in the table's discount array. Exhaustive, so a new card type cannot
/// be forgotten here.
fn slot(t: CardType) -> usize {
    match t {
        CardType::Ordinary => 0,
        CardType::Student => 1,
        CardType::Senior => 2,
        CardType::ElderlyFree => 3,
        CardType::Disabled => 4,
        CardType::Staff => 5,
    }
}

// ---------------------------------------------------------------------------------------------
// The compiled table
// ---------------------------------------------------------------------------------------------

/// The compiled OD fare table: immutable, compact, and what gates price taps with.
///
/// Invariants (checked by [`compile`], [`FareTable::decode`] and deserialization alike): 1 to
/// [`MAX_STATIONS`] strictly increasing codes; `n × n` fares and distances; a 0 m diagonal whose fare
/// is the minimum fare; every fare at least the minimum fare; percentages at most 100; a valid
/// business-day rule; a surcharge only with a ride limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FareTableData", into = "FareTableData")]
pub struct FareTable {
    /// Station codes, strictly increasing: row and column `i` of the matrices belong to `codes[i]`.
    codes: Vec<StationCode>,
    /// Full fares in fen, row-major: `fares[from * n + to]`.
    fares: Vec<u32>,
    /// Shortest-path distances in metres, row-major, for display, statistics and disputes.
    distances: Vec<u32>,
    /// The minimum fare (same-station exits, exits without entry, the balance needed to enter).
    min_fare_fen: u32,
    /// Percent paid per card type, indexed by [`slot`]; `None` = not accepted.
    discounts: [Option<u8>; CardType::ALL.len()],
    /// Percent of the full fare a token costs.
    token_percent: u8,
    /// The ride-time limit, if any.
    max_ride_minutes: Option<u32>,
    /// Added to a ride longer than `max_ride_minutes`.
    overstay_surcharge_fen: u32,
    /// When the business day rolls over.
    business_day: BusinessDayRule,
}

impl FareTable {
    /// The station codes the table covers, sorted.
    pub fn stations(&self) -> &[StationCode] {
        &self.codes
    }

    /// Whether the table knows this station.
    pub fn contains(&self, s: StationCode) -> bool {
        self.position(s).is_some()
    }

    /// Row index of a code: binary search, O(log n), no allocation.
    #[inline]
    fn position(&self, s: StationCode) -> Option<usize> {
        self.codes.binary_search(&s).ok()
    }

    #[inline]
    fn cell(&self, from: StationCode, to: StationCode) -> Option<usize> {
        let (f, t) = (self.position(from)?, self.position(to)?);
        Some(f * self.codes.len() + t)
    }

    /// The full (undiscounted) fare, or `None` if either station is unknown.
    #[inline]
    pub fn full_fare_fen(&self, from: StationCode, to: StationCode) -> Option<u32> {
        self.fares.get(self.cell(from, to)?).copied()
    }

    /// The shortest-path distance in metres, or `None` if either station is unknown.
    pub fn distance_m(&self, from: StationCode, to: StationCode) -> Option<u32> {
        self.distances.get(self.cell(from, to)?).copied()
    }

    /// The percent of the full fare a card type pays, or `None` if the type is not accepted.
    #[inline]
    pub fn discount_percent(&self, t: CardType) -> Option<u8> {
        self.discounts.get(slot(t)).copied().flatten()
    }

    /// The fare a card of type `t` pays: `floor(full × percent / 100)`; `None` if a station is
    /// unknown or the card type is not accepted.
    #[inline]
    pub fn fare_fen(&self, from: StationCode, to: StationCode, t: CardType) -> Option<u32> {
        let pct = self.discount_percent(t)?;
        Some(apply_percent(self.full_fare_fen(from, to)?, pct))
    }

    /// The price of a single-journey token for this trip, or `None` if a station is unknown.
    pub fn token_fare_fen(&self, from: StationCode, to: StationCode) -> Option<u32> {
        Some(apply_percent(self.full_fare_fen(from, to)?, self.token_percent))
    }

    /// The minimum fare for a card type after its discount, or `None` if the type is not accepted.
    pub fn min_fare_for(&self, t: CardType) -> Option<u32> {
        Some(apply_percent(self.min_fare_fen, self.discount_percent(t)?))
    }

    /// The undiscounted minimum fare.
    pub fn min_fare_fen(&self) -> u32 {
        self.min_fare_fen
    }

    /// The percent of the full fare a token costs.
    pub fn token_percent(&self) -> u8 {
        self.token_percent
    }

    /// The ride-time limit, if the operator has one.
    pub fn max_ride_minutes(&self) -> Option<u32> {
        self.max_ride_minutes
    }

    /// The surcharge for a ride beyond [`FareTable::max_ride_minutes`] (0 without a limit).
    pub fn overstay_surcharge_fen(&self) -> u32 {
        self.overstay_surcharge_fen
    }

    /// When the business day rolls over.
    pub fn business_day(&self) -> BusinessDayRule {
        self.business_day
    }

    /// The compact binary body of a `fare_table` package.
    ///
    /// Layout: `"AFCF"`, format byte 1, then varints: n; the first code and n−1 positive deltas; n²
    /// fares; n² distances; min fare; token percent; the number of discounts, then per discount a
    /// card-type code and a percent; 0 or 1 + max ride minutes; overstay surcharge; the UTC offset
    /// (zigzag) and the rollover minute. Nothing may follow.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.codes.len();
        let mut out = Vec::with_capacity(16 + n * 2 + n * n * 5);
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT);
        varint::put_u64(&mut out, n as u64);
        let mut previous = 0u16;
        for (i, c) in self.codes.iter().enumerate() {
            let delta = if i == 0 { c.0 } else { c.0.wrapping_sub(previous) };
            varint::put_u64(&mut out, u64::from(delta));
            previous = c.0;
        }
        for &f in &self.fares {
            varint::put_u64(&mut out, u64::from(f));
        }
        for &d in &self.distances {
            varint::put_u64(&mut out, u64::from(d));
        }
        varint::put_u64(&mut out, u64::from(self.min_fare_fen));
        varint::put_u64(&mut out, u64::from(self.token_percent));
        let accepted: Vec<(CardType, u8)> =
            CardType::ALL.into_iter().filter_map(|t| Some((t, self.discount_percent(t)?))).collect();
        varint::put_u64(&mut out, accepted.len() as u64);
        for (t, pct) in accepted {
            out.push(t.code());
            out.push(pct);
        }
        match self.max_ride_minutes {
            None => out.push(0),
            Some(m) => {
                out.push(1);
                varint::put_u64(&mut out, u64::from(m));
            }
        }
        varint::put_u64(&mut out, u64::from(self.overstay_surcharge_fen));
        varint::put_i64(&mut out, i64::from(self.business_day.utc_offset_minutes));
        varint::put_u64(&mut out, u64::from(self.business_day.rollover_minute_of_day));
        out
    }

    /// Parses and validates an encoded table. Never panics; allocates only after checking that the
    /// input is long enough to hold what it announces.
    pub fn decode(bytes: &[u8]) -> Result<FareTable, FareTableDecodeError> {
        use FareTableDecodeError as E;
        let mut r = Reader::new(bytes);
        if r.bytes(MAGIC.len())? != MAGIC {
            return Err(E::BadMagic);
        }
        let format = r.byte()?;
        if format != FORMAT {
            return Err(E::UnsupportedFormat(format));
        }
        let n = r.u64()?;
        if n == 0 {
            return Err(E::NoStations);
        }
        if n > MAX_STATIONS as u64 {
            return Err(E::TooManyStations(n));
        }
        let n = n as usize; // ≤ MAX_STATIONS, fits.
        let cells = n * n;
        // Every code takes at least one byte, every fare and distance too.
        if r.remaining() < n + 2 * cells {
            return Err(E::Varint(VarintError::Truncated));
        }
        let mut codes = Vec::with_capacity(n);
        let mut previous: Option<u16> = None;
        for index in 0..n {
            let v = r.u64()?;
            let code = match previous {
                None => u16::try_from(v).map_err(|_| E::CodeOutOfRange { index })?,
                Some(_) if v == 0 => return Err(E::CodesNotIncreasing { index }),
                Some(p) => u16::try_from(u64::from(p) + v).map_err(|_| E::CodeOutOfRange { index })?,
            };
            codes.push(StationCode(code));
            previous = Some(code);
        }
        let mut fares = Vec::with_capacity(cells);
        for _ in 0..cells {
            fares.push(r.u32()?);
        }
        let mut distances = Vec::with_capacity(cells);
        for _ in 0..cells {
            distances.push(r.u32()?);
        }
        let min_fare_fen = r.u32()?;
        let token_percent = u8::try_from(r.u64()?).map_err(|_| E::PercentAbove100)?;
        let count = r.u64()?;
        if count > CardType::ALL.len() as u64 {
            return Err(E::TooManyDiscounts(count));
        }
        let mut discounts = BTreeMap::new();
        for _ in 0..count {
            let code = r.byte()?;
            let pct = r.byte()?;
            let t = CardType::from_code(code).ok_or(E::UnknownCardType(code))?;
            if discounts.insert(t, pct).is_some() {
                return Err(E::DuplicateCardType(code));
            }
        }
        let max_ride_minutes = match r.byte()? {
            0 => None,
            1 => Some(r.u32()?),
            other => return Err(E::BadFlag(other)),
        };
        let overstay_surcharge_fen = r.u32()?;
        let utc_offset = r.i64()?;
        let utc_offset_minutes = i32::try_from(utc_offset).map_err(|_| E::InvalidBusinessDay)?;
        let rollover_minute_of_day = r.u32()?;
        if !r.is_empty() {
            return Err(E::TrailingBytes(r.remaining()));
        }
        FareTable::from_data(FareTableData {
            stations: codes,
            fares,
            distances,
            min_fare_fen,
            discounts,
            token_percent,
            max_ride_minutes,
            overstay_surcharge_fen,
            business_day: BusinessDayRule { utc_offset_minutes, rollover_minute_of_day },
        })
    }

    /// Checks every invariant and builds the table.
    fn from_data(d: FareTableData) -> Result<FareTable, FareTableDecodeError> {
        use FareTableDecodeError as E;
        let n = d.stations.len();
        if n == 0 {
            return Err(E::NoStations);
        }
        if n > MAX_STATIONS {
            return Err(E::TooManyStations(n as u64));
        }
        if let Some(index) = d.stations.windows(2).position(|w| w[0] >= w[1]) {
            return Err(E::CodesNotIncreasing { index: index + 1 });
        }
        if d.fares.len() != n * n || d.distances.len() != n * n {
            return Err(E::MatrixSize { stations: n, fares: d.fares.len(), distances: d.distances.len() });
        }
        for i in 0..n {
            let diagonal = i * n + i;
            if d.distances.get(diagonal) != Some(&0) {
                return Err(E::DiagonalDistance { station: d.stations[i] });
            }
            if d.fares.get(diagonal) != Some(&d.min_fare_fen) {
                return Err(E::DiagonalFare { station: d.stations[i] });
            }
        }
        if let Some(cell) = d.fares.iter().position(|&f| f < d.min_fare_fen) {
            return Err(E::FareBelowMinimum { from: d.stations[cell / n], to: d.stations[cell % n] });
        }
        let mut discounts = [None; CardType::ALL.len()];
        for (&t, &pct) in &d.discounts {
            if pct > 100 {
                return Err(E::PercentAbove100);
            }
            discounts[slot(t)] = Some(pct);
        }
        if d.token_percent > 100 {
            return Err(E::PercentAbove100);
        }
        if d.max_ride_minutes == Some(0) || (d.max_ride_minutes.is_none() && d.overstay_surcharge_fen > 0) {
            return Err(E::InvalidRideLimit);
        }
        check_business_day(d.business_day).map_err(|()| E::InvalidBusinessDay)?;
        Ok(FareTable {
            codes: d.stations,
            fares: d.fares,
            distances: d.distances,
            min_fare_fen: d.min_fare_fen,
            discounts,
            token_percent: d.token_percent,
            max_ride_minutes: d.max_ride_minutes,
            overstay_surcharge_fen: d.overstay_surcharge_fen,
            business_day: d.business_day,
        })
    }
}

#[inline]
fn apply_percent(fen: u32, pct: u8) -> u32 {
    // fen × pct / 100 with pct ≤ 100 is at most fen, so it fits back in u32.
    ((u64::from(fen) * u64::from(pct)) / 100) as u32
}

/// The JSON form of a [`FareTable`]; deserializing goes through the same checks as decoding.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FareTableData {
    stations: Vec<StationCode>,
    fares: Vec<u32>,
    distances: Vec<u32>,
    min_fare_fen: u32,
    discounts: BTreeMap<CardType, u8>,
    token_percent: u8,
    max_ride_minutes: Option<u32>,
    overstay_surcharge_fen: u32,
    business_day: BusinessDayRule,
}

impl TryFrom<FareTableData> for FareTable {
    type Error = FareTableDecodeError;
    fn try_from(d: FareTableData) -> Result<Self, Self::Error> {
        FareTable::from_data(d)
    }
}

impl From<FareTable> for FareTableData {
    fn from(t: FareTable) -> Self {
        let discounts = CardType::ALL.into_iter().filter_map(|c| Some((c, t.discount_percent(c)?))).collect();
        FareTableData {
            stations: t.codes,
            fares: t.fares,
            distances: t.distances,
            min_fare_fen: t.min_fare_fen,
            discounts,
            token_percent: t.token_percent,
            max_ride_minutes: t.max_ride_minutes,
            overstay_surcharge_fen: t.overstay_surcharge_fen,
            business_day: t.business_day,
        }
    }
}

/// Why bytes (or JSON) are not a valid fare table.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FareTableDecodeError {
    #[error("not a fare table: bad magic bytes")]
    BadMagic,
    #[error("unsupported fare table format {0}")]
    UnsupportedFormat(u8),
    #[error("fare table: {0}")]
    Varint(#[from] VarintError),
    #[error("fare table has no stations")]
    NoStations,
    #[error("fare table announces {0} stations, more than {MAX_STATIONS}")]
    TooManyStations(u64),
    #[error("station code {index} is not above the previous one")]
    CodesNotIncreasing { index: usize },
    #[error("station code {index} exceeds 65535")]
    CodeOutOfRange { index: usize },
    #[error("{stations} stations need {stations}² fares and distances, found {fares} and {distances}")]
    MatrixSize { stations: usize, fares: usize, distances: usize },
    #[error("the distance from station {station} to itself is not 0")]
    DiagonalDistance { station: StationCode },
    #[error("the fare from station {station} to itself is not the minimum fare")]
    DiagonalFare { station: StationCode },
    #[error("the fare from {from} to {to} is below the minimum fare")]
    FareBelowMinimum { from: StationCode, to: StationCode },
    #[error("a percentage is above 100")]
    PercentAbove100,
    #[error("{0} discounts listed, more than there are card types")]
    TooManyDiscounts(u64),
    #[error("unknown card type code {0}")]
    UnknownCardType(u8),
    #[error("card type code {0} is listed twice")]
    DuplicateCardType(u8),
    #[error("bad presence flag {0}")]
    BadFlag(u8),
    #[error("max_ride_minutes is 0, or a surcharge is set without it")]
    InvalidRideLimit,
    #[error("business day rule out of range")]
    InvalidBusinessDay,
    #[error("{0} bytes follow the fare table")]
    TrailingBytes(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn station(code: u16, id: &str) -> Station {
        Station { code: StationCode(code), id: id.into(), name_zh: String::new(), name_en: id.into() }
    }

    /// A line through `stops`, the first with no distance, each later one `(id, metres)`.
    fn line(id: &str, first: &str, rest: &[(&str, u32)]) -> Line {
        let mut stops = vec![Stop { station: first.into(), m_from_prev: None }];
        stops.extend(rest.iter().map(|&(s, m)| Stop { station: s.into(), m_from_prev: Some(m) }));
        Line { id: id.into(), name: format!("Line {id}"), stops }
    }

    fn network(stations: Vec<Station>, lines: Vec<Line>) -> NetworkDescription {
        NetworkDescription { name: "test".into(), provenance: vec![], stations, lines, transfers: vec![] }
    }

    /// A, B, C, D on one line: A–B 6000 m, B–C 1 m, C–D 47999 m (A–D = 54000 m).
    fn straight() -> NetworkDescription {
        network(
            vec![station(1, "a"), station(2, "b"), station(3, "c"), station(4, "d")],
            vec![line("1", "a", &[("b", 6000), ("c", 1), ("d", 47_999)])],
        )
    }

    fn dalian_rule() -> FareRule {
        let bands = [(6, 200), (12, 300), (18, 400), (26, 500), (34, 600), (44, 700), (54, 800)];
        FareRule {
            name: "Dalian".into(),
            bands: bands.iter().map(|&(km, fen)| Band { up_to_m: km * 1000, fare_fen: fen }).collect(),
            beyond: Some(Increment { fen: 100, per_m: 15_000 }),
            min_fare_fen: 200,
            discounts: [(CardType::Ordinary, 80), (CardType::Student, 50), (CardType::ElderlyFree, 0)]
                .into_iter()
                .collect(),
            token_percent: 100,
            max_ride_minutes: None,
            overstay_surcharge_fen: 0,
            business_day: BusinessDayRule::default(),
        }
    }

    fn beijing_rule() -> FareRule {
        let bands = [(6, 300), (12, 400), (22, 500), (32, 600)];
        FareRule {
            name: "Beijing-style".into(),
            bands: bands.iter().map(|&(km, fen)| Band { up_to_m: km * 1000, fare_fen: fen }).collect(),
            beyond: Some(Increment { fen: 100, per_m: 20_000 }),
            min_fare_fen: 300,
            discounts: [(CardType::Ordinary, 100), (CardType::Student, 50)].into_iter().collect(),
            token_percent: 100,
            max_ride_minutes: Some(240),
            overstay_surcharge_fen: 300,
            business_day: BusinessDayRule { utc_offset_minutes: 480, rollover_minute_of_day: 180 },
        }
    }

    fn err(net: &NetworkDescription, rule: &FareRule) -> FareError {
        compile(net, rule).unwrap_err()
    }

    const A: StationCode = StationCode(1);
    const B: StationCode = StationCode(2);
    const C: StationCode = StationCode(3);
    const D: StationCode = StationCode(4);

    #[test]
    fn a_band_limit_is_inclusive() {
        let t = compile(&straight(), &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, B), Some(6000));
        assert_eq!(t.full_fare_fen(A, B), Some(200));
        assert_eq!(t.distance_m(A, C), Some(6001));
        assert_eq!(t.full_fare_fen(A, C), Some(300));
        assert_eq!(t.full_fare_fen(C, A), Some(300));
        assert_eq!(t.distance_m(A, D), Some(54_000));
        assert_eq!(t.full_fare_fen(A, D), Some(800));
    }

    #[test]
    fn beyond_the_last_band_every_started_step_costs_one_increment() {
        let r = dalian_rule();
        assert_eq!(r.fare_for_distance(54_000), Some(800));
        assert_eq!(r.fare_for_distance(54_001), Some(900));
        assert_eq!(r.fare_for_distance(69_000), Some(900));
        assert_eq!(r.fare_for_distance(69_001), Some(1000));
        assert_eq!(r.fare_for_distance(84_001), Some(1100));
        // And through the compiler: A–E = 54000 + 15001 m.
        let mut net = straight();
        net.stations.push(station(5, "e"));
        net.lines[0].stops.push(Stop { station: "e".into(), m_from_prev: Some(15_001) });
        let t = compile(&net, &r).unwrap();
        assert_eq!(t.full_fare_fen(A, StationCode(5)), Some(1000));
        assert_eq!(t.full_fare_fen(D, StationCode(5)), Some(400)); // 15001 m
    }

    #[test]
    fn without_an_increment_long_trips_pay_the_last_band() {
        let mut r = dalian_rule();
        r.beyond = None;
        assert_eq!(r.fare_for_distance(54_001), Some(800));
        assert_eq!(r.fare_for_distance(u32::MAX), Some(800));
    }

    #[test]
    fn a_fare_that_would_overflow_is_refused_at_compile_time() {
        let mut r = dalian_rule();
        r.beyond = Some(Increment { fen: u32::MAX, per_m: 1 });
        assert_eq!(r.fare_for_distance(54_002), None);
        let mut net = straight();
        net.stations.push(station(5, "e"));
        net.lines[0].stops.push(Stop { station: "e".into(), m_from_prev: Some(2) });
        let e = err(&net, &r);
        assert!(matches!(e, FareError::FareOverflow { .. }), "{e}");
    }

    #[test]
    fn a_beijing_style_rule_works_too() {
        let net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c"), station(4, "d")],
            vec![line("1", "a", &[("b", 32_000), ("c", 20_000), ("d", 1)])],
        );
        let t = compile(&net, &beijing_rule()).unwrap();
        assert_eq!(t.full_fare_fen(A, B), Some(600)); // 32 km: last band, inclusive
        assert_eq!(t.full_fare_fen(A, C), Some(700)); // 52 km: one 20 km step
        assert_eq!(t.full_fare_fen(A, D), Some(800)); // 52.001 km: a second step started
        assert_eq!(t.full_fare_fen(B, C), Some(500)); // 20 km
        assert_eq!(t.fare_fen(A, B, CardType::Ordinary), Some(600));
        assert_eq!(t.fare_fen(A, B, CardType::Student), Some(300));
        assert_eq!(t.fare_fen(A, B, CardType::Senior), None);
        assert_eq!(t.max_ride_minutes(), Some(240));
        assert_eq!(t.overstay_surcharge_fen(), 300);
        assert_eq!(t.business_day().rollover_minute_of_day, 180);
        assert_eq!(t.min_fare_fen(), 300);
    }

    #[test]
    fn the_shortest_path_is_chosen_over_a_longer_one() {
        // a–b–c along line 1 is 4000 + 4000 m; line 2 goes a–c directly in 7000 m.
        let net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c")],
            vec![line("1", "a", &[("b", 4000), ("c", 4000)]), line("2", "a", &[("c", 7000)])],
        );
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, C), Some(7000));
        assert_eq!(t.full_fare_fen(A, C), Some(300));
        // b–c–a (4000 + 7000) loses to b–a (4000).
        assert_eq!(t.distance_m(B, A), Some(4000));
    }

    #[test]
    fn an_out_of_station_transfer_link_joins_two_lines_and_adds_its_walk() {
        let mut net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c"), station(4, "d")],
            vec![line("1", "a", &[("b", 5000)]), line("2", "c", &[("d", 900)])],
        );
        assert!(matches!(err(&net, &dalian_rule()), FareError::Disconnected { .. }));
        net.transfers.push(TransferLink { from: "b".into(), to: "c".into(), m: 150 });
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, D), Some(6050));
        assert_eq!(t.full_fare_fen(A, D), Some(300));
        assert_eq!(t.distance_m(D, A), Some(6050));
        // A link that is not charged adds nothing.
        net.transfers[0].m = 0;
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, D), Some(5900));
        assert_eq!(t.full_fare_fen(A, D), Some(200));
    }

    #[test]
    fn a_same_station_trip_costs_the_minimum_fare() {
        let t = compile(&straight(), &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(B, B), Some(0));
        assert_eq!(t.full_fare_fen(B, B), Some(200));
        assert_eq!(t.fare_fen(B, B, CardType::Ordinary), Some(160));
        assert_eq!(t.min_fare_for(CardType::Student), Some(100));
        assert_eq!(t.min_fare_for(CardType::Staff), None);
    }

    #[test]
    fn discounts_round_down_to_whole_fen_and_unlisted_types_are_refused() {
        let mut r = dalian_rule();
        r.bands[0].fare_fen = 333;
        r.bands[1].fare_fen = 333;
        r.discounts.insert(CardType::Senior, 67);
        let t = compile(&straight(), &r).unwrap();
        assert_eq!(t.fare_fen(A, B, CardType::Student), Some(166)); // 166.5
        assert_eq!(t.fare_fen(A, B, CardType::Senior), Some(223)); // 223.11
        assert_eq!(t.fare_fen(A, B, CardType::Ordinary), Some(266)); // 266.4
        assert_eq!(t.fare_fen(A, B, CardType::ElderlyFree), Some(0));
        assert_eq!(t.fare_fen(A, B, CardType::Disabled), None);
        assert_eq!(t.discount_percent(CardType::Disabled), None);
        assert_eq!(t.discount_percent(CardType::Ordinary), Some(80));
        assert_eq!(t.token_fare_fen(A, B), Some(333));
    }

    #[test]
    fn tokens_pay_their_own_percentage() {
        let mut r = dalian_rule();
        r.token_percent = 90;
        let t = compile(&straight(), &r).unwrap();
        assert_eq!(t.token_fare_fen(A, C), Some(270));
        assert_eq!(t.token_percent(), 90);
    }

    #[test]
    fn unknown_stations_have_no_fare() {
        let t = compile(&straight(), &dalian_rule()).unwrap();
        let x = StationCode(999);
        assert!(!t.contains(x));
        assert!(t.contains(C));
        assert_eq!(t.full_fare_fen(A, x), None);
        assert_eq!(t.full_fare_fen(x, A), None);
        assert_eq!(t.distance_m(x, x), None);
        assert_eq!(t.fare_fen(x, A, CardType::Ordinary), None);
        assert_eq!(t.token_fare_fen(A, x), None);
        assert_eq!(t.stations(), &[A, B, C, D]);
    }

    #[test]
    fn stations_are_ordered_by_code_whatever_the_listing_order() {
        let net = network(
            vec![station(30, "c"), station(10, "a"), station(20, "b")],
            vec![line("1", "c", &[("a", 1000), ("b", 7000)])],
        );
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.stations(), &[StationCode(10), StationCode(20), StationCode(30)]);
        assert_eq!(t.distance_m(StationCode(30), StationCode(20)), Some(8000));
    }

    #[test]
    fn an_empty_network_is_refused() {
        assert_eq!(err(&network(vec![], vec![]), &dalian_rule()), FareError::EmptyNetwork);
    }

    #[test]
    fn an_unknown_station_in_a_line_is_named() {
        let net = network(vec![station(1, "a")], vec![line("1", "a", &[("zz", 100)])]);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::UnknownStationInLine { line: "1".into(), station: "zz".into() }
        );
    }

    #[test]
    fn an_unknown_station_in_a_transfer_is_named() {
        let mut net = straight();
        net.transfers.push(TransferLink { from: "a".into(), to: "nowhere".into(), m: 10 });
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::UnknownStationInTransfer {
                from: "a".into(),
                to: "nowhere".into(),
                station: "nowhere".into()
            }
        );
    }

    #[test]
    fn a_transfer_from_a_station_to_itself_is_refused() {
        let mut net = straight();
        net.transfers.push(TransferLink { from: "b".into(), to: "b".into(), m: 10 });
        assert_eq!(err(&net, &dalian_rule()), FareError::TransferToItself { station: "b".into() });
    }

    #[test]
    fn a_duplicate_station_id_is_named() {
        let mut net = straight();
        net.stations.push(station(9, "b"));
        assert_eq!(err(&net, &dalian_rule()), FareError::DuplicateStationId { id: "b".into() });
    }

    #[test]
    fn a_duplicate_station_code_names_both_stations() {
        let mut net = straight();
        net.stations[3].code = StationCode(2);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::DuplicateStationCode { code: StationCode(2), first: "b".into(), second: "d".into() }
        );
    }

    #[test]
    fn a_station_id_that_cannot_be_a_topic_level_is_refused() {
        let mut net = straight();
        net.stations[0].id = "a/b".into();
        net.lines[0].stops[0].station = "a/b".into();
        assert_eq!(err(&net, &dalian_rule()), FareError::InvalidStationId { id: "a/b".into() });
    }

    #[test]
    fn a_duplicate_line_id_is_named() {
        let mut net = straight();
        net.lines.push(line("1", "a", &[("d", 100)]));
        assert_eq!(err(&net, &dalian_rule()), FareError::DuplicateLineId { line: "1".into() });
    }

    #[test]
    fn a_line_with_one_stop_is_refused() {
        let mut net = straight();
        net.lines.push(line("2", "a", &[]));
        assert_eq!(err(&net, &dalian_rule()), FareError::LineTooShort { line: "2".into(), stops: 1 });
    }

    #[test]
    fn a_missing_or_zero_distance_is_named() {
        let mut net = straight();
        net.lines[0].stops[2].m_from_prev = None;
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::MissingDistance { line: "1".into(), station: "c".into() }
        );
        net.lines[0].stops[2].m_from_prev = Some(0);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::ZeroDistance { line: "1".into(), station: "c".into() }
        );
    }

    #[test]
    fn a_first_stop_with_a_distance_is_refused() {
        let mut net = straight();
        net.lines[0].stops[0].m_from_prev = Some(5);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::FirstStopHasDistance { line: "1".into(), station: "a".into() }
        );
    }

    #[test]
    fn a_disconnected_station_is_named() {
        let mut net = straight();
        net.stations.push(station(7, "island"));
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::Disconnected { station: "island".into(), from: "a".into() }
        );
    }

    #[test]
    fn fare_rule_errors_are_named() {
        let net = straight();
        let check = |edit: &dyn Fn(&mut FareRule), want: FareError| {
            let mut r = dalian_rule();
            edit(&mut r);
            assert_eq!(err(&net, &r), want);
        };
        check(&|r| r.bands.clear(), FareError::EmptyBands);
        check(
            &|r| r.bands[3].up_to_m = 18_000,
            FareError::BandsNotIncreasing { index: 3, up_to_m: 18_000, previous_up_to_m: 18_000 },
        );
        check(
            &|r| r.bands[0].up_to_m = 0,
            FareError::BandsNotIncreasing { index: 0, up_to_m: 0, previous_up_to_m: 0 },
        );
        check(
            &|r| r.bands[2].fare_fen = 250,
            FareError::FareDecreases { index: 2, fare_fen: 250, previous_fare_fen: 300 },
        );
        check(
            &|r| r.min_fare_fen = 201,
            FareError::MinFareAboveFirstBand { min_fare_fen: 201, first_band_fen: 200 },
        );
        check(&|r| r.beyond = Some(Increment { fen: 100, per_m: 0 }), FareError::ZeroIncrementDistance);
        check(
            &|r| {
                r.discounts.insert(CardType::Staff, 101);
            },
            FareError::DiscountAbove100 { card_type: CardType::Staff, percent: 101 },
        );
        check(&|r| r.token_percent = 150, FareError::TokenPercentAbove100 { percent: 150 });
        check(&|r| r.max_ride_minutes = Some(0), FareError::ZeroMaxRideMinutes);
        check(&|r| r.overstay_surcharge_fen = 500, FareError::SurchargeWithoutLimit { surcharge_fen: 500 });
        check(
            &|r| r.business_day.rollover_minute_of_day = 1440,
            FareError::InvalidBusinessDay { utc_offset_minutes: 480, rollover_minute_of_day: 1440 },
        );
        check(
            &|r| r.business_day.utc_offset_minutes = 2000,
            FareError::InvalidBusinessDay { utc_offset_minutes: 2000, rollover_minute_of_day: 240 },
        );
    }

    #[test]
    fn a_misspelt_field_in_a_fare_rule_is_refused() {
        let mut v = serde_json::to_value(dalian_rule()).unwrap();
        v["max_ride_minute"] = serde_json::json!(120);
        let e = serde_json::from_value::<FareRule>(v).unwrap_err();
        assert!(e.to_string().contains("max_ride_minute"), "{e}");
    }

    #[test]
    fn a_distance_beyond_u32_metres_is_refused() {
        let net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c")],
            vec![line("1", "a", &[("b", u32::MAX), ("c", 1)])],
        );
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::DistanceOverflow { from: "a".into(), to: "c".into() }
        );
    }

    #[test]
    fn a_free_network_with_a_zero_minimum_fare_is_allowed() {
        let mut r = dalian_rule();
        r.min_fare_fen = 0;
        let t = compile(&straight(), &r).unwrap();
        assert_eq!(t.full_fare_fen(A, A), Some(0));
        assert_eq!(t.full_fare_fen(A, B), Some(200));
    }

    #[test]
    fn the_rules_round_trip_through_json() {
        for r in [dalian_rule(), beijing_rule()] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<FareRule>(&json).unwrap(), r);
        }
        let net = straight();
        let json = serde_json::to_string(&net).unwrap();
        assert_eq!(serde_json::from_str::<NetworkDescription>(&json).unwrap(), net);
        assert!(serde_json::to_string(&dalian_rule()).unwrap().contains(r#""elderly_free":0"#));
    }

    #[test]
    fn a_table_round_trips_through_its_binary_body_and_json() {
        for r in [dalian_rule(), beijing_rule()] {
            let t = compile(&straight(), &r).unwrap();
            assert_eq!(FareTable::decode(&t.encode()).unwrap(), t);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<FareTable>(&json).unwrap(), t);
        }
    }

    #[test]
    fn json_for_a_table_goes_through_the_same_checks_as_bytes() {
        let t = compile(&straight(), &dalian_rule()).unwrap();
        let mut v = serde_json::to_value(&t).unwrap();
        v["fares"][5] = serde_json::json!(100); // B→B below the minimum fare
        assert!(serde_json::from_value::<FareTable>(v).is_err());
    }

    #[test]
    fn every_truncation_of_an_encoded_table_is_refused() {
        let bytes = compile(&straight(), &beijing_rule()).unwrap().encode();
        for len in 0..bytes.len() {
            assert!(FareTable::decode(&bytes[..len]).is_err(), "prefix of {len} bytes accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(FareTable::decode(&longer), Err(FareTableDecodeError::TrailingBytes(1)));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert_eq!(FareTable::decode(&other), Err(FareTableDecodeError::BadMagic));
        other = bytes;
        other[4] = 9;
        assert_eq!(FareTable::decode(&other), Err(FareTableDecodeError::UnsupportedFormat(9)));
    }

    #[test]
    fn a_table_announcing_more_cells_than_bytes_is_refused_before_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.push(FORMAT);
        varint::put_u64(&mut bytes, MAX_STATIONS as u64);
        assert_eq!(FareTable::decode(&bytes), Err(FareTableDecodeError::Varint(VarintError::Truncated)));
        let mut bytes = MAGIC.to_vec();
        bytes.push(FORMAT);
        varint::put_u64(&mut bytes, MAX_STATIONS as u64 + 1);
        assert!(matches!(FareTable::decode(&bytes), Err(FareTableDecodeError::TooManyStations(_))));
    }

    #[test]
    fn an_encoded_table_with_invalid_content_is_refused() {
        let good = compile(&straight(), &dalian_rule()).unwrap();
        let mut d = FareTableData::from(good.clone());
        d.stations.swap(0, 1);
        assert_eq!(FareTable::from_data(d), Err(FareTableDecodeError::CodesNotIncreasing { index: 1 }));
        let mut d = FareTableData::from(good.clone());
        d.distances[0] = 5;
        assert_eq!(FareTable::from_data(d), Err(FareTableDecodeError::DiagonalDistance { station: A }));
        let mut d = FareTableData::from(good.clone());
        d.fares.pop();
        assert!(matches!(FareTable::from_data(d), Err(FareTableDecodeError::MatrixSize { .. })));
        let mut d = FareTableData::from(good.clone());
        d.discounts.insert(CardType::Staff, 200);
        assert_eq!(FareTable::from_data(d), Err(FareTableDecodeError::PercentAbove100));
        let mut d = FareTableData::from(good);
        d.fares[1] = 10;
        assert_eq!(FareTable::from_data(d), Err(FareTableDecodeError::FareBelowMinimum { from: A, to: B }));
    }

    /// A random connected network: station i > 0 hangs off a random earlier station (a tree), plus a
    /// few extra edges and transfer links; codes are distinct random u16.
    fn arb_network() -> impl Strategy<Value = NetworkDescription> {
        (2usize..12)
            .prop_flat_map(|n| {
                (
                    Just(n),
                    proptest::collection::btree_set(any::<u16>(), n),
                    proptest::collection::vec((any::<prop::sample::Index>(), 1u32..40_000), n - 1),
                    proptest::collection::vec((0..n, 0..n, 0u32..40_000), 0..4),
                )
            })
            .prop_map(|(n, codes, parents, extra)| {
                let mut codes: Vec<u16> = codes.into_iter().collect();
                codes.reverse(); // listing order differs from code order
                let stations: Vec<Station> =
                    codes.iter().enumerate().map(|(i, &c)| station(c, &format!("s{i}"))).collect();
                let mut lines = Vec::new();
                for (i, (parent, m)) in parents.into_iter().enumerate() {
                    let child = i + 1;
                    let p = parent.index(child);
                    lines.push(line(&format!("l{child}"), &format!("s{p}"), &[(&format!("s{child}"), m)]));
                }
                let mut transfers = Vec::new();
                for (a, b, m) in extra {
                    if a != b {
                        transfers.push(TransferLink { from: format!("s{a}"), to: format!("s{b}"), m });
                    }
                }
                let _ = n;
                NetworkDescription { name: "random".into(), provenance: vec![], stations, lines, transfers }
            })
    }

    fn arb_rule() -> impl Strategy<Value = FareRule> {
        (
            proptest::collection::vec((1u32..20_000, 0u32..300), 1..6),
            proptest::option::of((0u32..500, 1u32..30_000)),
            proptest::collection::btree_map(prop::sample::select(CardType::ALL.to_vec()), 0u8..=100, 0..6),
            0u8..=100,
            proptest::option::of((1u32..600, 0u32..1000)),
            (-1080i32..=1080, 0u32..1440),
        )
            .prop_map(|(steps, beyond, discounts, token_percent, limit, (off, roll))| {
                let (mut up, mut fare) = (0u32, 100u32);
                let bands = steps
                    .into_iter()
                    .map(|(dm, df)| {
                        up += dm;
                        fare += df;
                        Band { up_to_m: up, fare_fen: fare }
                    })
                    .collect();
                FareRule {
                    name: "random".into(),
                    bands,
                    beyond: beyond.map(|(fen, per_m)| Increment { fen, per_m }),
                    min_fare_fen: 100,
                    discounts,
                    token_percent,
                    max_ride_minutes: limit.map(|l| l.0),
                    overstay_surcharge_fen: limit.map_or(0, |l| l.1),
                    business_day: BusinessDayRule { utc_offset_minutes: off, rollover_minute_of_day: roll },
                }
            })
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = FareTable::decode(&bytes);
        }

        #[test]
        fn decoding_bytes_behind_a_valid_header_never_panics(
            n in 0u64..6,
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.push(FORMAT);
            varint::put_u64(&mut bytes, n);
            bytes.extend_from_slice(&body);
            let _ = FareTable::decode(&bytes);
        }

        #[test]
        fn random_networks_compile_and_round_trip(net in arb_network(), rule in arb_rule()) {
            let t = compile(&net, &rule).unwrap();
            prop_assert_eq!(t.stations().len(), net.stations.len());
            for &a in t.stations() {
                for &b in t.stations() {
                    // Undirected links: distances and fares are symmetric.
                    prop_assert_eq!(t.distance_m(a, b), t.distance_m(b, a));
                    let d = t.distance_m(a, b).unwrap();
                    if a != b {
                        prop_assert_eq!(t.full_fare_fen(a, b), rule.fare_for_distance(d));
                    }
                }
            }
            prop_assert_eq!(FareTable::decode(&t.encode()).unwrap(), t);
        }
    }
}
