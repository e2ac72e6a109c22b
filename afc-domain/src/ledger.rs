//! Ledger records (SPEC §8): the transaction a gate writes for every tap, its canonical bytes, the
//! station ledger's hash chain, and the signature a gate puts on a batch it uploads.

use serde::{Deserialize, Serialize};

use crate::mode::ModeBits;
use crate::model::{Direction, Ident, Media, Reason, StationCode, Timestamp};

/// The parameter versions a decision was made with (0 = none held).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ParamVersions {
    pub fare_table: u64,
    pub blacklist: u64,
    pub qr_keys: u64,
    pub gate_config: u64,
    pub mode: u64,
}

/// One tap as recorded by a gate. `(station, gate, gate_seq)` is the idempotency key: the gate
/// persists `gate_seq` before using it, and the ledger de-duplicates on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxRecord {
    pub station: Ident,
    pub gate: Ident,
    pub gate_seq: u64,
    pub media: Media,
    /// Card number (svc), account id (qr) or token serial (token).
    pub id: u64,
    pub direction: Direction,
    /// Whether the flaps opened.
    pub accepted: bool,
    pub reason: Reason,
    /// Fen charged by this transaction (svc: taken from the card; qr: to be charged by clearing).
    pub fare_fen: u32,
    /// Fen not collected under fare_free (recorded for clearing).
    pub shortfall_fen: u32,
    pub balance_before: Option<u32>,
    pub balance_after: Option<u32>,
    /// The card's own transaction counter after this tap (svc), for clearing's card-side checks.
    pub card_tx_counter: Option<u32>,
    pub entry_station: Option<StationCode>,
    pub entry_time: Option<Timestamp>,
    pub occurred_at: Timestamp,
    /// The mode bits in force at this station when the tap was decided.
    pub modes: ModeBits,
    pub params: ParamVersions,
    /// Set when the gate could not confirm a QR code's station-wide replay check (it was cut off
    /// from the controllers) and clearing should check for a duplicate use.
    pub replay_unchecked: bool,
}
