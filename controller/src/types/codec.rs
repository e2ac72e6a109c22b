//! Compact binary encodings of Raft log entries (as stored in sled) and of append RPC bodies.
//!
//! JSON cost more CPU than anything else on the write path (three nodes encode and decode every
//! entry several times), so entries carrying a gate batch are written as the records' canonical
//! bytes with a small binary frame: the bytes the gate signed, carried as they are
//! ([`CanonicalRecord::bytes`], never encoded again), and decoded strictly once per node. Rare entries
//! (membership, other commands) stay JSON inside the frame: they are small and infrequent.
//!
//! Entry layout: `FORMAT ‖ term u64 ‖ leader u64 ‖ index u64 ‖ kind u8 ‖ body`, numbers
//! little-endian; `kind` is [`KIND_BLANK`] (no body), [`KIND_MEMBERSHIP`] or [`KIND_JSON`] (the
//! membership or [`Request`] as JSON), or [`KIND_TX_BATCH`]: `str station ‖ str gate ‖
//! str signature ‖ u32 count ‖ (u32 len ‖ canonical record)*`, where `str` is `u32 len ‖ UTF-8`, or
//! [`KIND_PACKAGE_PIECE`]: `upload u64 ‖ index u32 ‖ at i64 ‖ u32 len ‖ bytes` (a package piece as
//! raw bytes: base64 in JSON would make the largest entries a third larger and slow to encode), or
//! [`KIND_TX_BATCHES`] (group commit): `u32 n ‖ (tx batch body as in KIND_TX_BATCH)*`.
//! [`KIND_TX_BATCH_COVERING`] and [`KIND_TX_BATCHES_COVERING`] are the same with `covers u64`
//! (0 = none) after the signature; new entries are written so, the first two kinds still read.
//!
//! Append RPC layout: `FORMAT ‖ u32 len ‖ JSON {vote, prev_log_id, leader_commit} ‖ u32 count ‖
//! (u32 len ‖ entry)*`.

use afc_domain::ledger::{CanonicalRecord, LedgerError};
use afc_domain::model::{Ident, Timestamp};
use openraft::raft::AppendEntriesRequest;
use openraft::{CommittedLeaderId, EntryPayload};
use serde::{Deserialize, Serialize};

use crate::state::request::{Request, TxBatchIn};
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// The version byte that starts every encoded entry and append body. JSON starts with `{`.
pub const FORMAT: u8 = 1;
pub const KIND_BLANK: u8 = 0;
pub const KIND_MEMBERSHIP: u8 = 1;
pub const KIND_JSON: u8 = 2;
pub const KIND_TX_BATCH: u8 = 3;
pub const KIND_PACKAGE_PIECE: u8 = 4;
pub const KIND_TX_BATCHES: u8 = 5;
pub const KIND_TX_BATCH_COVERING: u8 = 6;
pub const KIND_TX_BATCHES_COVERING: u8 = 7;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("truncated")]
    Truncated,
    #[error("unknown format byte {0}")]
    UnknownFormat(u8),
    #[error("unknown entry kind {0}")]
    UnknownKind(u8),
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    #[error("a length does not fit in 32 bits")]
    TooLong,
    #[error("invalid text: {0}")]
    Text(String),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record: {0}")]
    Record(#[from] LedgerError),
}

fn put_u32(out: &mut Vec<u8>, n: usize) -> Result<(), CodecError> {
    let n = u32::try_from(n).map_err(|_| CodecError::TooLong)?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), CodecError> {
    put_u32(out, b.len())?;
    out.extend_from_slice(b);
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<usize, CodecError> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| CodecError::Text(e.to_string()))
    }

    fn ident(&mut self) -> Result<Ident, CodecError> {
        Ident::new(self.str()?).map_err(|e| CodecError::Text(e.to_string()))
    }

    fn finish(self) -> Result<(), CodecError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(CodecError::TrailingBytes(n)),
        }
    }
}

/// Appends the encoding of `entry` to `out`.
pub fn encode_entry_into(entry: &Entry, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT);
    out.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&entry.log_id.leader_id.node_id.to_le_bytes());
    out.extend_from_slice(&entry.log_id.index.to_le_bytes());
    match &entry.payload {
        EntryPayload::Blank => out.push(KIND_BLANK),
        EntryPayload::Membership(m) => {
            out.push(KIND_MEMBERSHIP);
            serde_json::to_writer(&mut *out, m)?;
        }
        // Batches without a covered range keep the first kinds, so a node not yet upgraded reads
        // what an upgraded leader replicates from gates not yet upgraded (a rolling upgrade).
        EntryPayload::Normal(Request::AppendTxBatch { station, gate, records, signature, covers_from }) => {
            let covering = covers_from.is_some();
            out.push(if covering { KIND_TX_BATCH_COVERING } else { KIND_TX_BATCH });
            put_tx_batch(out, station, gate, signature, covers_from.filter(|_| covering), records, covering)?;
        }
        EntryPayload::Normal(Request::AppendTxBatches { batches }) => {
            let covering = batches.iter().any(|b| b.covers_from.is_some());
            out.push(if covering { KIND_TX_BATCHES_COVERING } else { KIND_TX_BATCHES });
            put_u32(out, batches.len())?;
            for b in batches {
                put_tx_batch(out, &b.station, &b.gate, &b.signature, b.covers_from, &b.records, covering)?;
            }
        }
        EntryPayload::Normal(Request::PutPackagePiece { upload, index, at, bytes }) => {
            out.push(KIND_PACKAGE_PIECE);
            out.extend_from_slice(&upload.to_le_bytes());
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&at.millis().to_le_bytes());
            put_bytes(out, bytes)?;
        }
        EntryPayload::Normal(req) => {
            out.push(KIND_JSON);
            serde_json::to_writer(&mut *out, req)?;
        }
    }
    Ok(())
}

fn put_tx_batch(
    out: &mut Vec<u8>,
    station: &Ident,
    gate: &Ident,
    signature: &str,
    covers_from: Option<u64>,
    records: &[CanonicalRecord],
    covering: bool,
) -> Result<(), CodecError> {
    put_bytes(out, station.as_str().as_bytes())?;
    put_bytes(out, gate.as_str().as_bytes())?;
    put_bytes(out, signature.as_bytes())?;
    if covering {
        out.extend_from_slice(&covers_from.unwrap_or(0).to_le_bytes());
    }
    put_u32(out, records.len())?;
    for r in records {
        put_bytes(out, r.bytes())?;
    }
    Ok(())
}

fn read_tx_batch(r: &mut Reader<'_>, covering: bool) -> Result<TxBatchIn, CodecError> {
    let station = r.ident()?;
    let gate = r.ident()?;
    let signature = r.str()?.to_owned();
    let covers_from = if covering { Some(r.u64()?).filter(|c| *c != 0) } else { None };
    let count = r.u32()?;
    // Each record takes at least a few bytes: bound the allocation by the input.
    let mut records = Vec::with_capacity(count.min(r.0.len()));
    for _ in 0..count {
        records.push(CanonicalRecord::from_canonical(r.bytes()?.to_vec())?);
    }
    Ok(TxBatchIn { station, gate, records, signature, covers_from })
}

/// The encoding of `entry`.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode_entry_into(entry, &mut out)?;
    Ok(out)
}

/// Decodes an entry written by [`encode_entry`] (or, from an older store, as JSON).
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, CodecError> {
    if bytes.first() == Some(&b'{') {
        return Ok(serde_json::from_slice(bytes)?);
    }
    let mut r = Reader(bytes);
    let format = r.byte()?;
    if format != FORMAT {
        return Err(CodecError::UnknownFormat(format));
    }
    let (term, node_id, index) = (r.u64()?, r.u64()?, r.u64()?);
    let log_id = LogId::new(CommittedLeaderId::new(term, node_id), index);
    let kind = r.byte()?;
    let payload = match kind {
        KIND_BLANK => EntryPayload::Blank,
        KIND_MEMBERSHIP => EntryPayload::Membership(serde_json::from_slice(r.take(r.0.len())?)?),
        KIND_JSON => EntryPayload::Normal(serde_json::from_slice(r.take(r.0.len())?)?),
        KIND_TX_BATCH | KIND_TX_BATCH_COVERING => {
            let TxBatchIn { station, gate, records, signature, covers_from } =
                read_tx_batch(&mut r, kind == KIND_TX_BATCH_COVERING)?;
            EntryPayload::Normal(Request::AppendTxBatch { station, gate, records, signature, covers_from })
        }
        KIND_TX_BATCHES | KIND_TX_BATCHES_COVERING => {
            let n = r.u32()?;
            let mut batches = Vec::with_capacity(n.min(r.0.len()));
            for _ in 0..n {
                batches.push(read_tx_batch(&mut r, kind == KIND_TX_BATCHES_COVERING)?);
            }
            EntryPayload::Normal(Request::AppendTxBatches { batches })
        }
        KIND_PACKAGE_PIECE => {
            let upload = r.u64()?;
            let index = u32::from_le_bytes(r.array()?);
            let at = Timestamp(i64::from_le_bytes(r.array()?));
            let bytes = r.bytes()?.to_vec();
            EntryPayload::Normal(Request::PutPackagePiece { upload, index, at, bytes })
        }
        k => return Err(CodecError::UnknownKind(k)),
    };
    r.finish()?;
    Ok(Entry { log_id, payload })
}

/// The small fields of an append request.
#[derive(Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
}

/// The body of a `/raft/append` request.
pub fn encode_append(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<Vec<u8>, CodecError> {
    let header =
        AppendHeader { vote: rpc.vote, prev_log_id: rpc.prev_log_id, leader_commit: rpc.leader_commit };
    let mut out = Vec::with_capacity(128 + rpc.entries.len() * 64);
    out.push(FORMAT);
    put_bytes(&mut out, &serde_json::to_vec(&header)?)?;
    put_u32(&mut out, rpc.entries.len())?;
    let mut buf = Vec::new();
    for e in &rpc.entries {
        buf.clear();
        encode_entry_into(e, &mut buf)?;
        put_bytes(&mut out, &buf)?;
    }
    Ok(out)
}

/// Decodes a `/raft/append` body written by [`encode_append`].
pub fn decode_append(bytes: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, CodecError> {
    let mut r = Reader(bytes);
    let format = r.byte()?;
    if format != FORMAT {
        return Err(CodecError::UnknownFormat(format));
    }
    let header: AppendHeader = serde_json::from_slice(r.bytes()?)?;
    let count = r.u32()?;
    let mut entries = Vec::with_capacity(count.min(r.0.len()));
    for _ in 0..count {
        entries.push(decode_entry(r.bytes()?)?);
    }
    r.finish()?;
    Ok(AppendEntriesRequest {
        vote: header.vote,
        prev_log_id: header.prev_log_id,
        leader_commit: header.leader_commit,
        entries,
    })
}
