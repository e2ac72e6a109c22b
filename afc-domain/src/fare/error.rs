//! Why a network description and fare rule do not compile.

use thiserror::Error;

use crate::model::{CardType, StationCode};

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
    #[error("card type {card_type} pays {percent} % of the fare; at most 100 is allowed")]
    DiscountAbove100 { card_type: CardType, percent: u8 },
    #[error("card type {card_type} is named but not accepted (not in discounts)")]
    NamedTypeNotAccepted { card_type: CardType },
    #[error("card type {card_type} needs an English and a Chinese name of 1 to 64 characters")]
    BadCardTypeName { card_type: CardType },
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
