//! The ledger primitives the state machine needs: the hash chain, per-gate progress and batch
//! signatures.
//!
//! These are stand-ins with the same signatures as the ones `afc_domain::ledger` is gaining
//! (`chain_hash`, `GENESIS_HASH`, `LedgerEntry`, `GateProgress`, `verify_batch`). Once they land,
//! this module becomes a list of `pub use afc_domain::ledger::...` and nothing else changes.

use std::collections::BTreeSet;

use afc_domain::ledger::TxRecord;
use afc_domain::model::Ident;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first ledger entry.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

/// Bytes of a record that the hash chain and the batch signature cover.
fn record_bytes(rec: &TxRecord) -> Vec<u8> {
    // Serialising a plain data struct to JSON cannot fail (no maps with non-string keys, no
    // custom serialisers that error); an empty vector would still chain deterministically.
    serde_json::to_vec(rec).unwrap_or_default()
}

/// `sha256(prev ‖ canonical bytes of rec)`.
pub fn chain_hash(prev: &[u8; 32], rec: &TxRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(record_bytes(rec));
    h.finalize().into()
}

/// One ledger entry as stored and as served: its contiguous index, its chain hash, the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub index: u64,
    #[serde(with = "hex::serde")]
    pub hash: [u8; 32],
    pub record: TxRecord,
}

/// The per-gate contiguous high-water mark: every `gate_seq` up to `through` is in the ledger,
/// and `above` holds the ones received out of order beyond it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateProgress {
    through: u64,
    above: BTreeSet<u64>,
}

impl GateProgress {
    /// Records `seq`; false if it was already recorded (a duplicate).
    pub fn record(&mut self, seq: u64) -> bool {
        if seq <= self.through || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
        true
    }

    /// The highest `gate_seq` such that it and all below it are recorded.
    pub fn contiguous_through(&self) -> u64 {
        self.through
    }
}

fn batch_signing_bytes(station: &Ident, gate: &Ident, records: &[TxRecord]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"afc-tx-batch-v1\0");
    h.update(station.as_str().as_bytes());
    h.update([0]);
    h.update(gate.as_str().as_bytes());
    h.update([0]);
    for r in records {
        h.update(record_bytes(r));
    }
    h.finalize().to_vec()
}

/// A gate's signature over a batch (used by gates and by tests).
pub fn sign_batch(station: &Ident, gate: &Ident, records: &[TxRecord], key: &SigningKey) -> [u8; 64] {
    key.sign(&batch_signing_bytes(station, gate, records)).to_bytes()
}

/// Whether `sig` is the gate key's signature over this batch.
pub fn verify_batch(
    station: &Ident,
    gate: &Ident,
    records: &[TxRecord],
    sig: &[u8; 64],
    key: &VerifyingKey,
) -> bool {
    key.verify(&batch_signing_bytes(station, gate, records), &Signature::from_bytes(sig)).is_ok()
}
