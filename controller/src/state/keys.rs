//! Key layout of the state machine tree. Big-endian numbers keep items in index order.

use afc_domain::model::ParamKind;

/// The serialised [`super::StationState`].
pub const STATE: &[u8] = b"s";
pub const LEDGER_PREFIX: u8 = b'L';
pub const AUDIT_PREFIX: u8 = b'A';
pub const PACKAGE_PREFIX: u8 = b'P';
pub const PIECE_PREFIX: u8 = b'U';
/// A record's key `(gate, installation, gate_seq)` → its ledger index (u64 big-endian).
pub const TX_KEY_PREFIX: u8 = b'K';
pub const GAP_PREFIX: u8 = b'G';
pub const CONFLICT_PREFIX: u8 = b'C';
/// A gate's counter reading: `R ‖ len ‖ gate ‖ at`.
pub const READING_PREFIX: u8 = b'R';
/// A closed business day: `D ‖ day`.
pub const DAY_PREFIX: u8 = b'D';
/// Every prefix whose items a snapshot carries whole (the others are copied by range).
pub const WHOLE_PREFIXES: [u8; 5] = [TX_KEY_PREFIX, GAP_PREFIX, CONFLICT_PREFIX, READING_PREFIX, DAY_PREFIX];

/// `R ‖ len ‖ gate`: the prefix of a gate's readings.
pub fn readings_of(gate: &afc_domain::model::Ident) -> Vec<u8> {
    let g = gate.as_str().as_bytes();
    let mut k = Vec::with_capacity(2 + g.len() + 8);
    k.push(READING_PREFIX);
    k.push(g.len() as u8);
    k.extend_from_slice(g);
    k
}

/// A reading's key: its gate's prefix, then `at` (sign bit flipped, so keys sort by time).
pub fn reading(gate: &afc_domain::model::Ident, at: afc_domain::model::Timestamp) -> Vec<u8> {
    let mut k = readings_of(gate);
    k.extend_from_slice(&((at.millis() as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// A closed day's key (the day number with its sign bit flipped, so keys sort by day).
pub fn day(d: afc_domain::model::Date) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = DAY_PREFIX;
    k[1..].copy_from_slice(&((d.0 as u32) ^ (1 << 31)).to_be_bytes());
    k
}

/// `K ‖ len ‖ gate ‖ 0 | 1 ‖ installation (16 bytes, when 1) ‖ gate_seq`.
pub fn tx_key(
    gate: &afc_domain::model::Ident,
    installation: Option<&afc_domain::ledger::Installation>,
    seq: u64,
) -> Vec<u8> {
    let g = gate.as_str().as_bytes();
    let mut k = Vec::with_capacity(2 + g.len() + 17 + 8);
    k.push(TX_KEY_PREFIX);
    k.push(g.len() as u8);
    k.extend_from_slice(g);
    match installation {
        None => k.push(0),
        Some(i) => {
            k.push(1);
            k.extend_from_slice(&i.0);
        }
    }
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn gap(id: u64) -> [u8; 9] {
    prefixed(GAP_PREFIX, id)
}

pub fn conflict(id: u64) -> [u8; 9] {
    prefixed(CONFLICT_PREFIX, id)
}

/// Piece `index` of package upload `upload`.
pub fn piece(upload: u64, index: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = PIECE_PREFIX;
    k[1..9].copy_from_slice(&upload.to_be_bytes());
    k[9..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn ledger(index: u64) -> [u8; 9] {
    prefixed(LEDGER_PREFIX, index)
}

pub fn audit(seq: u64) -> [u8; 9] {
    prefixed(AUDIT_PREFIX, seq)
}

pub fn package(kind: ParamKind, version: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = PACKAGE_PREFIX;
    k[1] = kind.code();
    k[2..].copy_from_slice(&version.to_be_bytes());
    k
}

fn prefixed(p: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = p;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}
