//! The ledger's part of the state machine: a gate batch appended with dedup, gap and conflict
//! records and the hash chain; acknowledged entries pruned; a ledger entry's stored form.

use afc_domain::ledger::{CanonicalRecord, TxRecord};
use afc_domain::model::{Ident, ParamKind, Timestamp};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::{
    encode, keys, pending, LedgerRead, ReadError, Rejection, Response, StationState, Write,
    PACKAGE_VERSIONS_KEPT,
};
use crate::chain::{self, LedgerEntry, LedgerError, SeqStatus};

/// Most records one batch may carry (a gate uploads far fewer; this bounds one log entry).
pub const MAX_BATCH_RECORDS: usize = 10_000;
/// Most ledger entries one `Prune` removes, so a single apply stays short; the next prune goes on.
pub const MAX_PRUNE_PER_COMMAND: u64 = 200_000;

pub use afc_domain::ledger::SequenceGap;

/// A record refused because the ledger already holds its key `(gate, installation, gate_seq)`
/// with other content: never taken as a duplicate, kept here for the engineers, and alarmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyConflict {
    /// From 1, in the order recorded.
    pub id: u64,
    /// The ledger index of the record already holding the key.
    pub ledger_index: u64,
    /// The record refused.
    pub record: TxRecord,
}

/// Conflicting records kept in full ([`KeyConflict`]); beyond this they are only counted.
pub const MAX_KEPT_CONFLICTS: u64 = 10_000;

impl StationState {
    pub(super) fn append_batch(
        &mut self,
        b: &BatchRef<'_>,
        ledger: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let (station, gate, records) = (b.station, b.gate, b.records);
        let reject = |rejection| Ok(Response::Rejected { rejection });
        if records.is_empty() {
            return reject(Rejection::EmptyBatch);
        }
        if records.len() > MAX_BATCH_RECORDS {
            return reject(Rejection::BatchTooLarge { records: records.len(), max: MAX_BATCH_RECORDS });
        }
        if let Some(r) = records.iter().find(|r| &r.station != station || &r.gate != gate) {
            return reject(Rejection::RecordMismatch {
                gate_seq: r.gate_seq,
                station: r.station.clone(),
                gate: r.gate.clone(),
            });
        }
        let installation = records[0].installation;
        if records.iter().any(|r| r.installation != installation) {
            return reject(Rejection::InvalidBatch {
                detail: "records of more than one installation".into(),
            });
        }
        let Some(info) = self.gates.get_mut(gate) else {
            return reject(Rejection::UnknownGate { gate: gate.clone() });
        };
        if info.decommissioned {
            return reject(Rejection::GateDecommissioned { gate: gate.clone() });
        }
        let (Some(sig), Ok(key)) =
            (decode_signature(b.signature), VerifyingKey::from_bytes(&info.tx_public_key))
        else {
            return reject(Rejection::BadSignature);
        };
        // Over the bytes the gate signed, as received: no record is encoded again.
        match chain::verify_canonical_batch(station, gate, b.covers_from, records, &sig, &key) {
            Ok(()) => {}
            Err(LedgerError::BadSignature) => return reject(Rejection::BadSignature),
            Err(e) => return reject(Rejection::InvalidBatch { detail: e.to_string() }),
        }
        if let Some(inst) = installation {
            info.last_installation = Some(inst);
            // A gate upgraded from a build whose records carried no installation numbers on
            // under its installation: it was acked through covers_from - 1 before (under the
            // first-version key), so a fresh installation starts there. A wiped gate starts
            // with nothing acked (covers_from 1) and numbers from 1.
            let p = info.installations.entry(inst).or_default();
            if let Some(from) = b.covers_from.filter(|f| *f > 1) {
                if p.contiguous_through == 0 && p.pending.is_empty() {
                    p.contiguous_through = from - 1;
                }
            }
        }
        let (mut appended, mut duplicates, mut deferred, mut gaps, mut conflicts) =
            (0u32, 0u32, 0u32, 0u32, 0u32);
        let mut first_index = None;
        // The next gate_seq the batch's claim covers: numbers below a record and from here that
        // are neither in the batch nor in the ledger are gone from the gate.
        let mut covered = b.covers_from;
        for rec in records {
            let progress = info.progress_mut(installation);
            if let Some(from) = covered.filter(|f| *f < rec.gate_seq) {
                for (from_seq, to_seq) in progress.fill(from, rec.gate_seq - 1) {
                    self.gaps += 1;
                    info.gaps += 1;
                    gaps += 1;
                    let gap = SequenceGap {
                        id: self.gaps,
                        gate: gate.clone(),
                        installation,
                        from_seq,
                        to_seq,
                        ledger_index: self.next_index,
                        noticed_at: rec.occurred_at,
                    };
                    tracing::error!(%gate, from_seq, to_seq, "sequence gap recorded: the gate no longer holds these records");
                    out.push(Write::Put(keys::gap(gap.id).to_vec(), encode(&gap)));
                }
            }
            covered = covered.map(|c| c.max(rec.gate_seq.saturating_add(1)));
            let progress = info.progress_mut(installation);
            match progress.classify(rec.gate_seq) {
                SeqStatus::New => {}
                SeqStatus::BeyondWindow => {
                    deferred += 1;
                    continue;
                }
                SeqStatus::Zero => {
                    duplicates += 1;
                    continue;
                }
                SeqStatus::Duplicate => {
                    let key = keys::tx_key(gate, installation.as_ref(), rec.gate_seq);
                    // Written earlier in this apply (not yet in the tree), or stored.
                    let stored = tx_index(out, ledger, &key)?;
                    // No index: pruned (acknowledged by clearing, days old) or stored before
                    // keys were kept; nothing to compare with.
                    let same = match stored {
                        None => true,
                        Some(i) => record_at(out, ledger, i)?.is_none_or(|r| &r == rec.record()),
                    };
                    if same {
                        duplicates += 1;
                    } else {
                        conflicts += 1;
                        info.conflicts += 1;
                        self.conflicts += 1;
                        tracing::error!(%gate, gate_seq = rec.gate_seq, stored = ?stored, "record refused: the ledger holds its key with other content");
                        if self.conflicts <= MAX_KEPT_CONFLICTS {
                            let c = KeyConflict {
                                id: self.conflicts,
                                ledger_index: stored.unwrap_or(0),
                                record: rec.record().clone(),
                            };
                            out.push(Write::Put(keys::conflict(c.id).to_vec(), encode(&c)));
                        }
                    }
                    continue;
                }
            }
            progress.record(rec.gate_seq);
            let index = self.next_index;
            // Hashed and stored as the bytes the gate signed: the record is not encoded again.
            let hash = chain::chain_hash_canonical(&self.last_hash, rec.bytes());
            out.push(Write::Put(keys::ledger(index).to_vec(), encode_ledger_item(&hash, rec.bytes())));
            out.push(Write::Put(
                keys::tx_key(gate, installation.as_ref(), rec.gate_seq),
                index.to_be_bytes().to_vec(),
            ));
            self.last_hash = hash;
            self.next_index += 1;
            appended += 1;
            first_index.get_or_insert(index);
        }
        let through_seq = info.progress_mut(installation).contiguous_through;
        Ok(Response::Appended {
            appended,
            duplicates,
            deferred,
            gaps,
            conflicts,
            first_index,
            last_index: first_index.map(|_| self.last_index()),
            through_seq,
        })
    }

    pub(super) fn prune(
        &mut self,
        before: Timestamp,
        ledger: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let mut removed = 0;
        // Ledger entries written earlier in this apply (not yet in the tree), looked up once.
        let fresh: std::collections::HashMap<u64, &[u8]> = out
            .iter()
            .filter_map(|w| match w {
                Write::Put(k, v) if k.len() == 9 && k[0] == keys::LEDGER_PREFIX => {
                    Some((u64::from_be_bytes(k[1..9].try_into().ok()?), v.as_slice()))
                }
                _ => None,
            })
            .collect();
        let mut deletes = Vec::new();
        while self.first_retained <= self.clearing_acked_through && removed < MAX_PRUNE_PER_COMMAND {
            let index = self.first_retained;
            let entry = match fresh.get(&index) {
                Some(v) => decode_ledger_entry(index, v).ok(),
                None => ledger.ledger_entry(index)?,
            };
            let entry = entry.ok_or_else(|| ReadError::Corrupt {
                index,
                detail: "missing below the acknowledged point".into(),
            })?;
            if entry.record.occurred_at >= before {
                break;
            }
            deletes.push(Write::Delete(keys::ledger(index).to_vec()));
            let r = &entry.record;
            deletes.push(Write::Delete(keys::tx_key(&r.gate, r.installation.as_ref(), r.gate_seq)));
            self.first_retained += 1;
            removed += 1;
        }
        drop(fresh);
        out.extend(deletes);
        for (name, held) in self.packages.iter_mut() {
            let Some(kind) = ParamKind::parse(name) else { continue };
            // Versions a rollout points gates at (or may roll back to) stay.
            let pinned = self.rollouts.pinned(kind);
            while held.versions.len() > PACKAGE_VERSIONS_KEPT {
                let Some(i) = held.versions.iter().position(|v| !pinned.contains(v)) else { break };
                if i + 1 == held.versions.len() {
                    break; // never the current one
                }
                let old = held.versions.remove(i);
                out.push(Write::Delete(keys::package(kind, old).to_vec()));
            }
        }
        Ok(Response::Pruned { removed, first_retained: self.first_retained })
    }
}

/// The fields of one gate batch, from [`Request::AppendTxBatch`] or one of
/// [`Request::AppendTxBatches`].
pub(super) struct BatchRef<'a> {
    pub(super) station: &'a Ident,
    pub(super) gate: &'a Ident,
    pub(super) records: &'a [CanonicalRecord],
    pub(super) signature: &'a str,
    pub(super) covers_from: Option<u64>,
}

/// The ledger index stored under record key `key`, this apply's writes first.
fn tx_index(out: &[Write], ledger: &dyn LedgerRead, key: &[u8]) -> Result<Option<u64>, ReadError> {
    match pending(out, key) {
        Some(v) => Ok(v.and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_be_bytes)),
        None => ledger.tx_index(key),
    }
}

/// The record of ledger entry `index`, this apply's writes first.
fn record_at(out: &[Write], ledger: &dyn LedgerRead, index: u64) -> Result<Option<TxRecord>, ReadError> {
    match pending(out, &keys::ledger(index)) {
        Some(v) => Ok(v.and_then(|v| decode_ledger_entry(index, v).ok()).map(|e| e.record)),
        None => Ok(ledger.ledger_entry(index)?.map(|e| e.record)),
    }
}

/// Format byte of a stored ledger entry: `LEDGER_ITEM_FORMAT ‖ hash (32 bytes) ‖ canonical record`
/// (the index is the key). Older stores hold JSON, which starts with `{`.
pub const LEDGER_ITEM_FORMAT: u8 = 1;

/// The stored form of a ledger entry: its hash and its record's canonical bytes.
pub fn encode_ledger_entry(entry: &LedgerEntry) -> Vec<u8> {
    encode_ledger_item(&entry.hash, &entry.record.canonical_bytes())
}

/// The stored form of a ledger entry from its hash and its record's canonical bytes as they are.
pub fn encode_ledger_item(hash: &[u8; 32], canonical: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(33 + canonical.len());
    out.push(LEDGER_ITEM_FORMAT);
    out.extend_from_slice(hash);
    out.extend_from_slice(canonical);
    out
}

/// Decodes a stored ledger entry at `index` (written by [`encode_ledger_entry`], or JSON).
pub fn decode_ledger_entry(index: u64, bytes: &[u8]) -> Result<LedgerEntry, ReadError> {
    let corrupt = |detail: String| ReadError::Corrupt { index, detail };
    match bytes.split_first() {
        Some((&LEDGER_ITEM_FORMAT, rest)) if rest.len() >= 32 => {
            let (hash, record) = rest.split_at(32);
            let mut h = [0u8; 32];
            h.copy_from_slice(hash);
            let record = TxRecord::from_canonical(record).map_err(|e| corrupt(e.to_string()))?;
            Ok(LedgerEntry { index, hash: h, record })
        }
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string())),
        _ => Err(corrupt("unknown item format".into())),
    }
}

fn decode_signature(hex_sig: &str) -> Option<[u8; 64]> {
    let bytes = hex::decode(hex_sig).ok()?;
    bytes.try_into().ok()
}
