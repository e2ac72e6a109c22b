//! The compiled OD fare table gates price taps with, its binary body (what a `fare_table`
//! package carries) and its JSON form, both decoded through the same checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::rule::check_business_day;
use crate::model::{BusinessDayRule, CardType, StationCode};
use crate::varint::{self, Reader, VarintError};

/// The largest network [`compile`](fn@super::compile) and [`FareTable::decode`] accept, in stations.
pub const MAX_STATIONS: usize = 1024;

/// The first bytes of an encoded fare table: "AFCF" and the format number.
const MAGIC: [u8; 4] = *b"AFCF";
const FORMAT: u8 = 1;

/// How many card types there can be: one per code byte.
pub(super) const CARD_TYPES: usize = 256;

/// The table's discount array, indexed by card-type code; `None` = not accepted.
pub(super) type Discounts = [Option<u8>; CARD_TYPES];

/// The discounts listed, as the array the table looks them up in.
pub(super) fn discount_array(listed: &BTreeMap<CardType, u8>) -> Discounts {
    let mut discounts = [None; CARD_TYPES];
    for (&t, &pct) in listed {
        discounts[usize::from(t.code())] = Some(pct);
    }
    discounts
}

/// The compiled OD fare table: immutable, compact, and what gates price taps with.
///
/// Invariants (checked by [`compile`](fn@super::compile), [`FareTable::decode`] and
/// deserialization alike): 1 to [`MAX_STATIONS`] strictly increasing codes; `n × n` fares and
/// distances; a 0 m diagonal whose fare is the minimum fare; every fare at least the minimum fare;
/// percentages at most 100; a valid business-day rule; a surcharge only with a ride limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FareTableData", into = "FareTableData")]
pub struct FareTable {
    /// Station codes, strictly increasing: row and column `i` of the matrices belong to `codes[i]`.
    pub(super) codes: Vec<StationCode>,
    /// Full fares in fen, row-major: `fares[from * n + to]`.
    pub(super) fares: Vec<u32>,
    /// Shortest-path distances in metres, row-major, for display, statistics and disputes.
    pub(super) distances: Vec<u32>,
    /// The minimum fare (same-station exits, exits without entry, the balance needed to enter).
    pub(super) min_fare_fen: u32,
    /// Percent paid per card type, indexed by its code; `None` = not accepted.
    pub(super) discounts: Discounts,
    /// Percent of the full fare a token costs.
    pub(super) token_percent: u8,
    /// The ride-time limit, if any.
    pub(super) max_ride_minutes: Option<u32>,
    /// Added to a ride longer than `max_ride_minutes`.
    pub(super) overstay_surcharge_fen: u32,
    /// When the business day rolls over.
    pub(super) business_day: BusinessDayRule,
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

    /// The card types accepted, in code order, with the percent each pays.
    pub fn accepted_types(&self) -> Vec<(CardType, u8)> {
        (0..=u8::MAX).filter_map(|c| Some((CardType(c), self.discount_percent(CardType(c))?))).collect()
    }

    /// The percent of the full fare a card type pays, or `None` if the type is not accepted.
    #[inline]
    pub fn discount_percent(&self, t: CardType) -> Option<u8> {
        self.discounts.get(usize::from(t.code())).copied().flatten()
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
        let accepted = self.accepted_types();
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
        if count > CARD_TYPES as u64 {
            return Err(E::TooManyDiscounts(count));
        }
        let mut discounts = BTreeMap::new();
        for _ in 0..count {
            let code = r.byte()?;
            let pct = r.byte()?;
            if discounts.insert(CardType(code), pct).is_some() {
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
        if d.discounts.values().any(|pct| *pct > 100) {
            return Err(E::PercentAbove100);
        }
        let discounts = discount_array(&d.discounts);
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
        let discounts = t.accepted_types().into_iter().collect();
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
    use crate::fare::fixtures::*;
    use crate::fare::*;
    use crate::model::{CardType, StationCode};
    use proptest::prelude::*;

    #[test]
    fn discounts_round_down_to_whole_fen_and_unlisted_types_are_refused() {
        let mut r = dalian_rule();
        r.bands[0].fare_fen = 333;
        r.bands[1].fare_fen = 333;
        r.discounts.insert(CardType::SENIOR, 67);
        let t = compile(&straight(), &r).unwrap();
        assert_eq!(t.fare_fen(A, B, CardType::STUDENT), Some(166)); // 166.5
        assert_eq!(t.fare_fen(A, B, CardType::SENIOR), Some(223)); // 223.11
        assert_eq!(t.fare_fen(A, B, CardType::ORDINARY), Some(266)); // 266.4
        assert_eq!(t.fare_fen(A, B, CardType::ELDERLY_FREE), Some(0));
        assert_eq!(t.fare_fen(A, B, CardType::DISABLED), None);
        assert_eq!(t.discount_percent(CardType::DISABLED), None);
        assert_eq!(t.discount_percent(CardType::ORDINARY), Some(80));
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
        assert_eq!(t.fare_fen(x, A, CardType::ORDINARY), None);
        assert_eq!(t.token_fare_fen(A, x), None);
        assert_eq!(t.stations(), &[A, B, C, D]);
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
        d.discounts.insert(CardType::STAFF, 200);
        assert_eq!(FareTable::from_data(d), Err(FareTableDecodeError::PercentAbove100));
        let mut d = FareTableData::from(good);
        d.fares[1] = 10;
        assert_eq!(FareTable::from_data(d), Err(FareTableDecodeError::FareBelowMinimum { from: A, to: B }));
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
    }
}
