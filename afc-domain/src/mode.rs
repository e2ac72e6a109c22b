//! Station operating modes (SPEC §2): a bitmask per station, and the history gates consult.
//!
//! A mode change is a fact with a start and an optional end. Gates need more than the current bits
//! of their own station: the 7-day emergency grace asks whether a card's *entry* station was under
//! emergency release after the card entered, and entry_free pricing at exit asks which stations let
//! passengers in without a tap. So the mode state is a list of periods for any station.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{StationCode, Timestamp};

/// The operating-mode bitmask. Unknown bits are kept (a newer controller may define more) but have
/// no effect on decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct ModeBits(pub u16);

impl ModeBits {
    pub const NORMAL: ModeBits = ModeBits(0x000);
    pub const TRAIN_DISRUPTION: ModeBits = ModeBits(0x001);
    pub const TIME_FREE: ModeBits = ModeBits(0x002);
    pub const DATE_FREE: ModeBits = ModeBits(0x004);
    pub const FARE_FREE: ModeBits = ModeBits(0x008);
    pub const SEQUENCE_FREE: ModeBits = ModeBits(0x010);
    pub const ENTRY_FREE: ModeBits = ModeBits(0x020);
    pub const HOURS_24: ModeBits = ModeBits(0x040);
    pub const EMERGENCY_RELEASE: ModeBits = ModeBits(0x080);
    pub const CLOSED: ModeBits = ModeBits(0x100);

    /// Every named bit with its name, in bit order.
    pub const NAMED: [(ModeBits, &'static str); 9] = [
        (ModeBits::TRAIN_DISRUPTION, "train_disruption"),
        (ModeBits::TIME_FREE, "time_free"),
        (ModeBits::DATE_FREE, "date_free"),
        (ModeBits::FARE_FREE, "fare_free"),
        (ModeBits::SEQUENCE_FREE, "sequence_free"),
        (ModeBits::ENTRY_FREE, "entry_free"),
        (ModeBits::HOURS_24, "hours_24"),
        (ModeBits::EMERGENCY_RELEASE, "emergency_release"),
        (ModeBits::CLOSED, "closed"),
    ];

    pub fn has(self, bit: ModeBits) -> bool {
        bit.0 != 0 && self.0 & bit.0 == bit.0
    }

    pub fn with(self, bit: ModeBits) -> ModeBits {
        ModeBits(self.0 | bit.0)
    }

    pub fn without(self, bit: ModeBits) -> ModeBits {
        ModeBits(self.0 & !bit.0)
    }

    /// The names of the bits set, in bit order (`["normal"]` when none is).
    pub fn names(self) -> Vec<&'static str> {
        let names: Vec<_> = ModeBits::NAMED.iter().filter(|(b, _)| self.has(*b)).map(|(_, n)| *n).collect();
        if names.is_empty() {
            vec!["normal"]
        } else {
            names
        }
    }

    /// Parses one bit name (`"fare_free"`), as the console and API accept them.
    pub fn parse_name(name: &str) -> Option<ModeBits> {
        if name == "normal" {
            return Some(ModeBits::NORMAL);
        }
        ModeBits::NAMED.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }
}

impl fmt::Display for ModeBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:03x} ({})", self.0, self.names().join("+"))
    }
}

/// One station's modes over a span of time: `bits` in force from `from` until `until` (open-ended
/// while `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModePeriod {
    pub station: StationCode,
    pub bits: ModeBits,
    pub from: Timestamp,
    pub until: Option<Timestamp>,
}

impl ModePeriod {
    fn covers(&self, t: Timestamp) -> bool {
        self.from <= t && self.until.is_none_or(|u| t < u)
    }

    fn overlaps(&self, from: Timestamp, to: Timestamp) -> bool {
        self.from <= to && self.until.is_none_or(|u| u > from)
    }
}

/// How long a card's open entry at a station under emergency release is honoured anywhere.
pub const EMERGENCY_GRACE_DAYS: i64 = 7;
/// How long mode history must be kept (SPEC §2: at least 7 days).
pub const MODE_HISTORY_DAYS: i64 = 7;

/// The mode history known to a gate or controller: periods for any station of the network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeState {
    pub periods: Vec<ModePeriod>,
}

impl ModeState {
    /// A state with one open-ended period per station (for tests and simple stations).
    pub fn constant(station: StationCode, bits: ModeBits) -> ModeState {
        ModeState { periods: vec![ModePeriod { station, bits, from: Timestamp(i64::MIN), until: None }] }
    }

    /// The bits in force at `station` at instant `t`: the union of the periods covering it.
    pub fn bits_at(&self, station: StationCode, t: Timestamp) -> ModeBits {
        self.periods
            .iter()
            .filter(|p| p.station == station && p.covers(t))
            .fold(ModeBits::NORMAL, |acc, p| acc.with(p.bits))
    }

    /// Whether `station` had emergency release in force at any time in `[since, now]`, with `since`
    /// no more than the grace period before `now`.
    pub fn emergency_grace(&self, station: StationCode, since: Timestamp, now: Timestamp) -> bool {
        if since < now.plus_days(-EMERGENCY_GRACE_DAYS) {
            return false;
        }
        self.periods.iter().any(|p| {
            p.station == station && p.bits.has(ModeBits::EMERGENCY_RELEASE) && p.overlaps(since, now)
        })
    }

    /// Stations other than `except` that had entry_free in force within `[now - window, now]`.
    pub fn entry_free_stations(
        &self,
        now: Timestamp,
        window_minutes: i64,
        except: StationCode,
    ) -> Vec<StationCode> {
        let from = now.plus_minutes(-window_minutes);
        let mut out: Vec<StationCode> = self
            .periods
            .iter()
            .filter(|p| p.station != except && p.bits.has(ModeBits::ENTRY_FREE) && p.overlaps(from, now))
            .map(|p| p.station)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Records a change of a station's bits at `at`: closes the open period and opens a new one.
    pub fn set(&mut self, station: StationCode, bits: ModeBits, at: Timestamp) {
        for p in self.periods.iter_mut().filter(|p| p.station == station && p.until.is_none()) {
            p.until = Some(at.max(p.from));
        }
        if bits != ModeBits::NORMAL {
            self.periods.push(ModePeriod { station, bits, from: at, until: None });
        }
    }

    /// Drops periods that ended before `before` (keep at least [`MODE_HISTORY_DAYS`]).
    pub fn prune(&mut self, before: Timestamp) {
        self.periods.retain(|p| p.until.is_none_or(|u| u >= before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: StationCode = StationCode(101);

    #[test]
    fn bits_combine_and_name_themselves() {
        let b = ModeBits::FARE_FREE.with(ModeBits::TIME_FREE);
        assert!(b.has(ModeBits::FARE_FREE) && b.has(ModeBits::TIME_FREE));
        assert!(!b.has(ModeBits::CLOSED));
        assert!(!b.has(ModeBits::NORMAL));
        assert_eq!(b.names(), vec!["time_free", "fare_free"]);
        assert_eq!(ModeBits::NORMAL.names(), vec!["normal"]);
        for (bit, name) in ModeBits::NAMED {
            assert_eq!(ModeBits::parse_name(name), Some(bit));
        }
    }

    #[test]
    fn a_mode_change_closes_the_previous_period_and_history_answers_for_past_instants() {
        let mut m = ModeState::default();
        m.set(S, ModeBits::EMERGENCY_RELEASE, Timestamp(1_000));
        m.set(S, ModeBits::NORMAL, Timestamp(2_000));
        assert_eq!(m.bits_at(S, Timestamp(1_500)), ModeBits::EMERGENCY_RELEASE);
        assert_eq!(m.bits_at(S, Timestamp(2_000)), ModeBits::NORMAL);
        assert_eq!(m.bits_at(S, Timestamp(999)), ModeBits::NORMAL);
        assert!(m.emergency_grace(S, Timestamp(500), Timestamp(3_000)));
        assert!(!m.emergency_grace(S, Timestamp(2_500), Timestamp(3_000)));
    }

    #[test]
    fn the_emergency_grace_ends_after_seven_days() {
        let mut m = ModeState::default();
        let entered = Timestamp::from_secs(1_800_000_000);
        m.set(S, ModeBits::EMERGENCY_RELEASE, entered.plus_minutes(10));
        m.set(S, ModeBits::NORMAL, entered.plus_minutes(60));
        assert!(m.emergency_grace(S, entered, entered.plus_days(6)));
        assert!(!m.emergency_grace(S, entered, entered.plus_days(8)));
    }
}
