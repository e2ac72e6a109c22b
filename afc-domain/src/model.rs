//! Identifiers, money, time and dates, card types, media, directions and reason codes.
//!
//! These are the words every other module uses. Money is always integer fen (1 yuan = 100 fen);
//! time is always UTC milliseconds since the Unix epoch; a calendar date is a day number, written as
//! `YYYY-MM-DD` in JSON.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// An instant, UTC milliseconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const MINUTE_MS: i64 = 60_000;
    pub const DAY_MS: i64 = 86_400_000;

    pub fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub fn from_secs(s: i64) -> Self {
        Timestamp(s.saturating_mul(1000))
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn plus_minutes(self, minutes: i64) -> Self {
        Timestamp(self.0.saturating_add(minutes.saturating_mul(Self::MINUTE_MS)))
    }

    pub fn plus_days(self, days: i64) -> Self {
        Timestamp(self.0.saturating_add(days.saturating_mul(Self::DAY_MS)))
    }

    /// Whole minutes from `earlier` to `self` (negative if `earlier` is later).
    pub fn minutes_since(self, earlier: Timestamp) -> i64 {
        (self.0.saturating_sub(earlier.0)).div_euclid(Self::MINUTE_MS)
    }

    /// The calendar date of this instant at a fixed UTC offset.
    pub fn local_date(self, utc_offset_minutes: i32) -> Date {
        let local = self.0.saturating_add(i64::from(utc_offset_minutes) * Self::MINUTE_MS);
        Date(local.div_euclid(Self::DAY_MS) as i32)
    }

    /// The instant of a civil date and time at a fixed UTC offset (for tests and simulators).
    pub fn from_local(date: Date, hour: u32, minute: u32, utc_offset_minutes: i32) -> Self {
        let minutes = i64::from(date.0) * 1440 + i64::from(hour) * 60 + i64::from(minute)
            - i64::from(utc_offset_minutes);
        Timestamp(minutes * Self::MINUTE_MS)
    }
}

/// A calendar date, as days since 1970-01-01. JSON form: `"YYYY-MM-DD"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Date(pub i32);

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid date {0:?}: expected YYYY-MM-DD")]
pub struct DateError(pub String);

impl Date {
    /// Days from the civil date (proleptic Gregorian), after Howard Hinnant's `days_from_civil`.
    pub fn from_ymd(y: i32, m: u32, d: u32) -> Option<Date> {
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m as i32 + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d as i32 - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some(Date(era * 146_097 + doe - 719_468))
    }

    /// The civil date `(year, month, day)` of this day number.
    pub fn ymd(self) -> (i32, u32, u32) {
        let z = self.0 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        (if m <= 2 { y + 1 } else { y }, m, d)
    }

    pub fn plus_days(self, days: i32) -> Date {
        Date(self.0.saturating_add(days))
    }

    pub fn parse(s: &str) -> Result<Date, DateError> {
        let err = || DateError(s.chars().take(32).collect());
        let mut parts = s.splitn(3, '-');
        let y: i32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let m: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        let d: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(err)?;
        if !(0..=9999).contains(&y) {
            return Err(err());
        }
        Date::from_ymd(y, m, d).ok_or_else(err)
    }
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// When the business day rolls over: a fixed UTC offset (Dalian: +480) and the local time of the
/// rollover (AFC systems roll at night after the last train, typically 02:00–04:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct BusinessDayRule {
    pub utc_offset_minutes: i32,
    pub rollover_minute_of_day: u32,
}

impl Default for BusinessDayRule {
    fn default() -> Self {
        BusinessDayRule { utc_offset_minutes: 480, rollover_minute_of_day: 4 * 60 }
    }
}

impl BusinessDayRule {
    /// The business day an instant belongs to: the local date, less one before the rollover time.
    pub fn business_day(&self, t: Timestamp) -> Date {
        let shifted = t.plus_minutes(-i64::from(self.rollover_minute_of_day));
        shifted.local_date(self.utc_offset_minutes)
    }
}

/// A station's numeric code, as written on cards and used in the OD table (Dalian: line × 100 + n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct StationCode(pub u16);

impl fmt::Display for StationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A name used in MQTT topics and file paths: a station id (`"xian_rd"`) or a gate id (`"g01"`).
/// 1–64 characters of `[A-Za-z0-9_-]`, so it can never inject a topic level or wildcard.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Ident(String);

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("invalid identifier {0:?}: 1-64 characters of A-Z a-z 0-9 _ -")]
pub struct IdentError(pub String);

impl Ident {
    pub fn new(s: &str) -> Result<Ident, IdentError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Ident(s.to_owned()))
        } else {
            Err(IdentError(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Ident {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ident::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Ident {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ident::new(s)
    }
}

/// The payment medium of a tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Media {
    /// Stored-value card: the Mingzhu card, and phones emulating it (NFC SWP-SIM or HCE).
    Svc,
    /// Account-based QR ride code, charged by clearing afterwards.
    Qr,
    /// Single-journey token sold at one station for one business day.
    Token,
    /// A bank card or phone paying by UnionPay QuickPass / EMV contactless: the gate sees only a
    /// payment token reference (never the PAN), decides offline, and clearing charges the journey.
    Bank,
}

impl Media {
    pub const ALL: [Media; 4] = [Media::Svc, Media::Qr, Media::Token, Media::Bank];

    pub fn code(self) -> u8 {
        match self {
            Media::Svc => 1,
            Media::Qr => 2,
            Media::Token => 3,
            Media::Bank => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<Media> {
        match c {
            1 => Some(Media::Svc),
            2 => Some(Media::Qr),
            3 => Some(Media::Token),
            4 => Some(Media::Bank),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Media::Svc => "svc",
            Media::Qr => "qr",
            Media::Token => "token",
            Media::Bank => "bank",
        }
    }
}

/// Which way a passenger passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Entry,
    Exit,
}

impl Direction {
    pub fn code(self) -> u8 {
        match self {
            Direction::Entry => 1,
            Direction::Exit => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Direction> {
        match c {
            1 => Some(Direction::Entry),
            2 => Some(Direction::Exit),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Entry => "entry",
            Direction::Exit => "exit",
        }
    }
}

/// A stored-value card's concession type: the byte its issuer writes on the card. Card types are
/// data: the fare rule lists the types it accepts, with their discounts and names, so a fare rule
/// from another city with its own concessions needs no new code; a type the rule does not list is
/// refused (`card_type_not_accepted`).
///
/// In JSON a type is a string: codes 1–6 by the names the first version used (`ordinary`,
/// `student`, `senior`, `elderly_free`, `disabled`, `staff`), any other code as its decimal number
/// (`"20"`); a bare number is read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "schema", schema(value_type = String, example = "ordinary"))]
pub struct CardType(pub u8);

impl CardType {
    pub const ORDINARY: CardType = CardType(1);
    pub const STUDENT: CardType = CardType(2);
    /// Seniors 60–69 (Dalian: 50 %).
    pub const SENIOR: CardType = CardType(3);
    /// Seniors 70+ and the listed groups who ride free.
    pub const ELDERLY_FREE: CardType = CardType(4);
    pub const DISABLED: CardType = CardType(5);
    pub const STAFF: CardType = CardType(6);
    /// The types with a name of their own in JSON (Dalian's; the first version's closed list).
    pub const NAMED: [CardType; 6] = [
        CardType::ORDINARY,
        CardType::STUDENT,
        CardType::SENIOR,
        CardType::ELDERLY_FREE,
        CardType::DISABLED,
        CardType::STAFF,
    ];
    const NAMES: [&'static str; 6] = ["ordinary", "student", "senior", "elderly_free", "disabled", "staff"];

    pub fn code(self) -> u8 {
        self.0
    }

    /// The JSON name of codes 1–6.
    pub fn name(self) -> Option<&'static str> {
        CardType::NAMED.iter().position(|t| *t == self).and_then(|i| CardType::NAMES.get(i).copied())
    }

    /// Reads a JSON name or a decimal code.
    pub fn parse(text: &str) -> Option<CardType> {
        match CardType::NAMES.iter().position(|n| *n == text) {
            Some(i) => CardType::NAMED.get(i).copied(),
            None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
                text.parse().ok().map(CardType)
            }
            None => None,
        }
    }
}

impl fmt::Display for CardType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for CardType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CardType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CardType, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CardType;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a card type: a name (ordinary, student, senior, elderly_free, disabled, staff) or a code 0-255")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CardType, E> {
                CardType::parse(v).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CardType, E> {
                u8::try_from(v)
                    .map(CardType)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CardType, E> {
                u8::try_from(v)
                    .map(CardType)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Why a tap was accepted or refused. The numeric code goes to the gate display (Modbus holding
/// register `display_code`) and into the ledger; the snake_case name goes to the reader and to JSON.
/// Codes are part of the external interface: never renumber, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Accepted with full checks.
    Ok = 0,
    /// Accepted without card processing: emergency_release holds the flaps open.
    OkEmergencyRelease = 1,
    /// Accepted without card processing: entry_free at this station.
    OkEntryFree = 2,
    /// Exit accepted free of charge under train_disruption; the entry record is cleared.
    OkTrainDisruption = 3,
    /// Exit accepted under fare_free with only part of the fare paid (the shortfall is recorded).
    OkFareShortfall = 4,
    /// Entry accepted over an open entry left at a station under emergency release (7-day grace).
    OkEmergencyGrace = 5,
    /// Entry or exit accepted under sequence_free despite a missing or open entry record.
    OkSequenceFree = 6,
    /// Exit with no entry record accepted as an entry at a station that was under entry_free.
    OkEntryFreeExit = 7,
    /// A re-tap, within the gate's re-tap window, by the medium whose accepted tap at this gate
    /// was voided by a `passage_not_made` record (the flaps never opened): let through without
    /// deciding again, nothing charged and nothing written to the card (it carries what the
    /// voided tap wrote already). One such re-tap per voided passage.
    OkRetapAfterFailedPassage = 8,

    Blacklisted = 20,
    CardExpired = 21,
    /// Anti-passback: the card already has an open entry.
    EntryExists = 22,
    /// Exit without an entry record.
    NoEntry = 23,
    InsufficientBalance = 24,
    CardTypeNotAccepted = 25,
    /// The entry record names a station the fare table does not know.
    UnknownStation = 26,
    /// A fare would overflow the card's counter or balance arithmetic; the card needs the desk.
    CardInvalid = 27,

    QrMalformed = 40,
    QrUnknownKey = 41,
    QrBadSignature = 42,
    QrExpired = 43,
    QrNotYetValid = 44,
    QrReplayed = 45,

    TokenWrongStation = 60,
    TokenExpired = 61,
    TokenUnderpaid = 62,
    TokenAlreadyEntered = 63,

    StationClosed = 80,
    WrongDirection = 81,
    OutOfService = 82,
    PlcOffline = 83,
    OutboxFull = 84,
    NoParameters = 85,
    MalformedTap = 86,
    /// The gate cannot make the record durable (its disk is full or read-only): refused before
    /// anything is promised; free passage (emergency release, the emergency input) still works.
    StorageUnavailable = 87,
    /// Not a decision: the compensating record of an accepted tap whose flaps never opened (the
    /// open command to the PLC failed after the reader had been answered). It voids that tap's
    /// record (`TxRecord::voids`); the card keeps what the voided tap wrote.
    PassageNotMade = 88,
    /// A bank payment token on the deny list (the blacklist's `bank` entries: the acquirer
    /// declined an earlier charge, or the issuer reported the card).
    BankDenied = 100,
    /// The card's offline data authentication failed (or was not performed): it may be a clone.
    BankAuthFailed = 101,
    /// The token already made as many taps today at this gate as the unpaid-tap limit allows
    /// (first-ride risk: nothing is charged until clearing does it).
    BankUnpaidLimit = 102,
    /// The reader's PSAM did not sign a stored-value debit within the gate's bound
    /// (`psam_timeout_ms`): refused, nothing charged, nothing written to the card.
    PsamTimeout = 103,
    /// The reader's PSAM refused to sign a stored-value debit (missing, locked, its counter
    /// exhausted) or answered something else: refused, nothing charged, nothing written.
    PsamFailed = 104,
}

impl Reason {
    pub const ALL: [Reason; 41] = [
        Reason::Ok,
        Reason::OkEmergencyRelease,
        Reason::OkEntryFree,
        Reason::OkTrainDisruption,
        Reason::OkFareShortfall,
        Reason::OkEmergencyGrace,
        Reason::OkSequenceFree,
        Reason::OkEntryFreeExit,
        Reason::OkRetapAfterFailedPassage,
        Reason::Blacklisted,
        Reason::CardExpired,
        Reason::EntryExists,
        Reason::NoEntry,
        Reason::InsufficientBalance,
        Reason::CardTypeNotAccepted,
        Reason::UnknownStation,
        Reason::CardInvalid,
        Reason::QrMalformed,
        Reason::QrUnknownKey,
        Reason::QrBadSignature,
        Reason::QrExpired,
        Reason::QrNotYetValid,
        Reason::QrReplayed,
        Reason::TokenWrongStation,
        Reason::TokenExpired,
        Reason::TokenUnderpaid,
        Reason::TokenAlreadyEntered,
        Reason::StationClosed,
        Reason::WrongDirection,
        Reason::OutOfService,
        Reason::PlcOffline,
        Reason::OutboxFull,
        Reason::NoParameters,
        Reason::MalformedTap,
        Reason::StorageUnavailable,
        Reason::PassageNotMade,
        Reason::BankDenied,
        Reason::BankAuthFailed,
        Reason::BankUnpaidLimit,
        Reason::PsamTimeout,
        Reason::PsamFailed,
    ];

    /// The display / ledger code.
    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(c: u16) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == c)
    }

    /// Whether this reason opens the flaps.
    pub fn is_accept(self) -> bool {
        self.code() < 20
    }

    /// The snake_case name, as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::OkEmergencyRelease => "ok_emergency_release",
            Reason::OkEntryFree => "ok_entry_free",
            Reason::OkTrainDisruption => "ok_train_disruption",
            Reason::OkFareShortfall => "ok_fare_shortfall",
            Reason::OkEmergencyGrace => "ok_emergency_grace",
            Reason::OkSequenceFree => "ok_sequence_free",
            Reason::OkEntryFreeExit => "ok_entry_free_exit",
            Reason::OkRetapAfterFailedPassage => "ok_retap_after_failed_passage",
            Reason::Blacklisted => "blacklisted",
            Reason::CardExpired => "card_expired",
            Reason::EntryExists => "entry_exists",
            Reason::NoEntry => "no_entry",
            Reason::InsufficientBalance => "insufficient_balance",
            Reason::CardTypeNotAccepted => "card_type_not_accepted",
            Reason::UnknownStation => "unknown_station",
            Reason::CardInvalid => "card_invalid",
            Reason::QrMalformed => "qr_malformed",
            Reason::QrUnknownKey => "qr_unknown_key",
            Reason::QrBadSignature => "qr_bad_signature",
            Reason::QrExpired => "qr_expired",
            Reason::QrNotYetValid => "qr_not_yet_valid",
            Reason::QrReplayed => "qr_replayed",
            Reason::TokenWrongStation => "token_wrong_station",
            Reason::TokenExpired => "token_expired",
            Reason::TokenUnderpaid => "token_underpaid",
            Reason::TokenAlreadyEntered => "token_already_entered",
            Reason::StationClosed => "station_closed",
            Reason::WrongDirection => "wrong_direction",
            Reason::OutOfService => "out_of_service",
            Reason::PlcOffline => "plc_offline",
            Reason::OutboxFull => "outbox_full",
            Reason::NoParameters => "no_parameters",
            Reason::MalformedTap => "malformed_tap",
            Reason::StorageUnavailable => "storage_unavailable",
            Reason::PassageNotMade => "passage_not_made",
            Reason::BankDenied => "bank_denied",
            Reason::BankAuthFailed => "bank_auth_failed",
            Reason::BankUnpaidLimit => "bank_unpaid_limit",
            Reason::PsamTimeout => "psam_timeout",
            Reason::PsamFailed => "psam_failed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of parameter set (SPEC §4). The code is used in package headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    FareTable,
    Blacklist,
    QrKeys,
    GateConfig,
    Mode,
}

impl ParamKind {
    pub const ALL: [ParamKind; 5] = [
        ParamKind::FareTable,
        ParamKind::Blacklist,
        ParamKind::QrKeys,
        ParamKind::GateConfig,
        ParamKind::Mode,
    ];

    pub fn code(self) -> u8 {
        match self {
            ParamKind::FareTable => 1,
            ParamKind::Blacklist => 2,
            ParamKind::QrKeys => 3,
            ParamKind::GateConfig => 4,
            ParamKind::Mode => 5,
        }
    }

    pub fn from_code(c: u8) -> Option<ParamKind> {
        ParamKind::ALL.into_iter().find(|k| k.code() == c)
    }

    /// The topic-level name (`params/{kind}/current`).
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::FareTable => "fare_table",
            ParamKind::Blacklist => "blacklist",
            ParamKind::QrKeys => "qr_keys",
            ParamKind::GateConfig => "gate_config",
            ParamKind::Mode => "mode",
        }
    }

    pub fn parse(s: &str) -> Option<ParamKind> {
        ParamKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_through_day_numbers_and_text() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2026, 11, 26), (1969, 12, 31), (2100, 3, 1)] {
            let date = Date::from_ymd(y, m, d).unwrap();
            assert_eq!(date.ymd(), (y, m, d));
            assert_eq!(Date::parse(&date.to_string()).unwrap(), date);
        }
        assert_eq!(Date::from_ymd(1970, 1, 1), Some(Date(0)));
        assert_eq!(Date::from_ymd(2026, 2, 29), None);
        assert!(Date::parse("2026-13-01").is_err());
        assert!(Date::parse("yesterday").is_err());
    }

    #[test]
    fn the_business_day_rolls_over_at_four_in_the_morning_dalian_time() {
        let rule = BusinessDayRule::default();
        let day = Date::from_ymd(2026, 11, 26).unwrap();
        let late_night = Timestamp::from_local(day.plus_days(1), 3, 59, 480);
        let early_morning = Timestamp::from_local(day.plus_days(1), 4, 0, 480);
        assert_eq!(rule.business_day(late_night), day);
        assert_eq!(rule.business_day(early_morning), day.plus_days(1));
    }

    #[test]
    fn every_reason_code_round_trips_and_codes_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            seen.insert(r.code());
        }
        assert_eq!(seen.len(), Reason::ALL.len());
        // Codes are never renumbered: the last one added keeps its number.
        assert_eq!(Reason::StorageUnavailable.code(), 87);
        assert_eq!(Reason::PassageNotMade.code(), 88);
    }

    #[test]
    fn the_failed_passage_reasons_have_fixed_codes_names_and_sides() {
        for (r, code, name, accept) in [
            (Reason::OkRetapAfterFailedPassage, 8, "ok_retap_after_failed_passage", true),
            (Reason::PassageNotMade, 88, "passage_not_made", false),
        ] {
            assert_eq!((r.code(), r.as_str(), r.is_accept()), (code, name, accept));
            assert_eq!(Reason::from_code(code), Some(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Reason>(&format!("\"{name}\"")).unwrap(), r);
            assert_eq!(r.to_string(), name);
        }
    }

    #[test]
    fn identifiers_refuse_topic_wildcards_and_separators() {
        assert!(Ident::new("g01").is_ok());
        for bad in ["", "a/b", "+", "#", "a b", &"x".repeat(65)] {
            assert!(Ident::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<Ident>("\"a/b\"").is_err());
    }
}
