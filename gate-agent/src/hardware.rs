//! The gate PLC's Modbus register map (SPEC §6), shared by the Modbus task and the PLC simulator.
//!
//! The default is the SPEC's profile (unit id 1). A hardware profile file (TOML, every field
//! optional) may move any point to another address, because gate vendors number their PLC
//! programs differently. 32-bit counters and `display_fen` span two registers, high word first.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Coil addresses (outputs the gate agent writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Coils {
    /// Write 1 to open for one entry passage; the PLC clears it after the passage or a timeout.
    pub open_entry: u16,
    /// Same for exit.
    pub open_exit: u16,
    /// Hold the flaps open while 1 (emergency release, entry_free).
    pub free_passage: u16,
    /// Sound the alarm while 1.
    pub alarm: u16,
    /// Show "out of service" and refuse passage while 1.
    pub out_of_service: u16,
}

impl Default for Coils {
    fn default() -> Self {
        Coils { open_entry: 0, open_exit: 1, free_passage: 2, alarm: 3, out_of_service: 4 }
    }
}

/// Discrete input addresses (read-only bits the PLC reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Inputs {
    pub passage_entry: u16,
    pub passage_exit: u16,
    pub flaps_open: u16,
    pub door_fault: u16,
    /// The hard-wired station emergency / fire alarm input.
    pub emergency_input: u16,
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs { passage_entry: 0, passage_exit: 1, flaps_open: 2, door_fault: 3, emergency_input: 4 }
    }
}

/// Input register addresses (read-only counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputRegisters {
    /// u32 (two registers) count of completed entry passages.
    pub entries_total: u16,
    /// u32 (two registers) count of completed exit passages.
    pub exits_total: u16,
    /// u16 count of tailgating detections.
    pub tailgating_total: u16,
}

impl Default for InputRegisters {
    fn default() -> Self {
        InputRegisters { entries_total: 0, exits_total: 2, tailgating_total: 4 }
    }
}

/// Holding register addresses (values the gate agent writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoldingRegisters {
    /// Message shown to the passenger: the `Reason` code of the last decision.
    pub display_code: u16,
    /// 0 closed, 1 entry, 2 exit, 3 bidirectional.
    pub direction: u16,
    /// u32 (two registers): fare or balance shown, in fen.
    pub display_fen: u16,
}

impl Default for HoldingRegisters {
    fn default() -> Self {
        HoldingRegisters { display_code: 0, direction: 1, display_fen: 2 }
    }
}

/// A complete register map: the SPEC §6 default, or a vendor's profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegisterMap {
    /// The Modbus unit id the PLC answers to.
    pub unit_id: u8,
    pub coils: Coils,
    pub inputs: Inputs,
    pub input_registers: InputRegisters,
    pub holding_registers: HoldingRegisters,
}

impl Default for RegisterMap {
    fn default() -> Self {
        RegisterMap {
            unit_id: 1,
            coils: Coils::default(),
            inputs: Inputs::default(),
            input_registers: InputRegisters::default(),
            holding_registers: HoldingRegisters::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("cannot read hardware profile {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid hardware profile {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
}

/// The span `(first, count)` of addresses covering all `addrs` (each `width` wide).
pub fn span(addrs: &[(u16, u16)]) -> (u16, u16) {
    let first = addrs.iter().map(|(a, _)| *a).min().unwrap_or(0);
    let end = addrs.iter().map(|(a, w)| u32::from(*a) + u32::from(*w)).max().unwrap_or(0);
    let count = end.saturating_sub(u32::from(first)).min(u32::from(u16::MAX)) as u16;
    (first, count)
}

impl RegisterMap {
    /// Reads a profile file; fields it omits keep the SPEC default.
    pub fn load(path: &Path) -> Result<RegisterMap, ProfileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|source| ProfileError::Parse { path: path.display().to_string(), source })
    }

    /// The discrete-input span read by one poll.
    pub fn input_span(&self) -> (u16, u16) {
        let i = &self.inputs;
        span(&[
            (i.passage_entry, 1),
            (i.passage_exit, 1),
            (i.flaps_open, 1),
            (i.door_fault, 1),
            (i.emergency_input, 1),
        ])
    }

    /// The input-register span read by one poll.
    pub fn counter_span(&self) -> (u16, u16) {
        let r = &self.input_registers;
        span(&[(r.entries_total, 2), (r.exits_total, 2), (r.tailgating_total, 1)])
    }
}

/// Splits a u32 into two registers, high word first.
pub fn u32_to_words(v: u32) -> [u16; 2] {
    [(v >> 16) as u16, v as u16]
}

/// Joins two registers, high word first.
pub fn words_to_u32(hi: u16, lo: u16) -> u32 {
    (u32::from(hi) << 16) | u32::from(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_map_is_the_spec_table_and_spans_cover_it() {
        let m = RegisterMap::default();
        assert_eq!(m.input_span(), (0, 5));
        assert_eq!(m.counter_span(), (0, 5));
        assert_eq!(words_to_u32(u32_to_words(0x1234_5678)[0], u32_to_words(0x1234_5678)[1]), 0x1234_5678);
    }

    #[test]
    fn a_profile_file_may_move_some_points_and_keep_the_rest() {
        let m: RegisterMap =
            toml::from_str("[coils]\nopen_entry = 100\n[input_registers]\nentries_total = 10\n").unwrap();
        assert_eq!(m.coils.open_entry, 100);
        assert_eq!(m.coils.open_exit, 1);
        assert_eq!(m.counter_span(), (2, 10));
        assert!(toml::from_str::<RegisterMap>("[coils]\nopen_sesame = 1\n").is_err());
    }
}
