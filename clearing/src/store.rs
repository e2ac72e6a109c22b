//! Durable storage of one station's ledger copy: an append-only file, fsynced before every
//! acknowledgement. This module is the only code that touches the file, so it could be swapped.
//!
//! # File format (`ledger.afcl`)
//!
//! An 8-byte magic `AFCCLR1\n`, then one frame per ledger entry, in index order from 1:
//! `u32 LE length ‖ canonical record bytes ‖ 32-byte chain hash`. The index is the frame's
//! position. On open every frame is re-hashed (`sha256(prev ‖ bytes)` must equal the stored hash)
//! and decoded strictly, so a damaged file is refused rather than served.
//!
//! # Crash safety
//!
//! A batch is written with one positional write and `fdatasync`ed before it is acknowledged, so
//! everything acknowledged is intact after a crash. What follows the last complete, valid frame can
//! only be an unacknowledged write that was cut short: a partial frame, or a zero-filled tail. On
//! open such a tail is truncated (with a warning). A complete frame that does not verify, followed
//! by anything but zeros, is corruption and the station refuses to open.
//! A write that fails is rolled back by truncating to the last good length; if even that fails
//! the station is poisoned (refuses writes) until restart, which re-reads the file.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use afc_domain::ledger::{Installation, LedgerEntry, LedgerError, SequenceGap, TxRecord, GENESIS_HASH};
use afc_domain::model::Ident;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The ledger file's name inside the station directory.
pub const LEDGER_FILE: &str = "ledger.afcl";
const MAGIC: &[u8; 8] = b"AFCCLR1\n";
/// Frames longer than this cannot be a record (canonical records are well under 300 bytes).
const MAX_FRAME_BYTES: u32 = 4096;

/// A storage failure.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a clearing ledger file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: stored entry {index} is corrupt: {reason}")]
    Corrupt { path: PathBuf, index: u64, reason: String },
    #[error("append must start at index {expected}, got {found}")]
    NotNext { expected: u64, found: u64 },
    #[error("append of {entries} entries with {canonical} records' canonical bytes")]
    Mismatch { entries: usize, canonical: usize },
    #[error("{path}: an earlier write failed and could not be rolled back; restart the server")]
    Poisoned { path: PathBuf },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Which gate sequence numbers are stored, to find a fare the station sent twice under two
/// indices. Mostly contiguous per gate, so memory is a counter plus the out-of-order stragglers.
#[derive(Debug, Default)]
struct SeqSet {
    /// Every seq in `1..=contiguous_through` is stored.
    contiguous_through: u64,
    /// Stored seqs above `contiguous_through + 1`.
    above: BTreeSet<u64>,
}

impl SeqSet {
    /// Marks `seq` stored; `false` if it already was. The first number of a set may be above 1:
    /// a gate upgraded to records that carry their installation numbers on where it was.
    fn insert(&mut self, seq: u64) -> bool {
        if self.contiguous_through == 0 && self.above.is_empty() && seq > 1 {
            self.contiguous_through = seq - 1;
        }
        if seq <= self.contiguous_through || self.above.contains(&seq) {
            return false;
        }
        if seq == self.contiguous_through + 1 {
            self.contiguous_through = seq;
            while self.above.first() == Some(&(self.contiguous_through + 1)) {
                self.above.pop_first();
                self.contiguous_through += 1;
            }
        } else {
            self.above.insert(seq);
        }
        true
    }

    /// Marks `from..=to` settled: numbers a reported sequence gap says will never come.
    fn settle(&mut self, from: u64, to: u64) {
        if from <= self.contiguous_through + 1 && to > self.contiguous_through {
            self.contiguous_through = to;
        } else {
            // A gap above a hole still open: remember its numbers (a gap is a few numbers).
            for seq in from.max(self.contiguous_through + 1)..=to {
                self.above.insert(seq);
            }
        }
        self.above.retain(|s| *s > self.contiguous_through);
        while self.above.first() == Some(&(self.contiguous_through + 1)) {
            self.above.pop_first();
            self.contiguous_through += 1;
        }
    }
}

/// A record's idempotency key without its sequence number: the gate and its installation.
type KeyOwner = (Ident, Option<Installation>);

/// One station's stored ledger: the open file plus what is needed to answer without reading it.
pub struct LedgerFile {
    path: PathBuf,
    file: File,
    /// Bytes of valid content; the next frame is written here.
    len: u64,
    /// `hashes[i]` is the hash of entry `i + 1`: enough to check a resend or overlap against what
    /// is stored without reading the file (32 MB per million records).
    hashes: Vec<[u8; 32]>,
    /// Idempotency keys seen, per gate installation.
    keys: HashMap<KeyOwner, SeqSet>,
    /// Stored records whose key was already stored (must stay 0).
    duplicate_keys: u64,
    /// Set when a failed write could not be rolled back.
    poisoned: bool,
}

/// A position in a [`LedgerFile`] between two records ([`LedgerFile::records_from`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordCursor {
    /// Byte offset of the next record's frame (0 and the magic's length both mean the start).
    offset: u64,
    /// Records before it.
    index: u64,
}

impl RecordCursor {
    pub const START: RecordCursor = RecordCursor { offset: 0, index: 0 };
}

impl LedgerFile {
    /// Opens (or creates) the ledger file in `dir`, verifying every stored entry.
    pub fn open(dir: &Path) -> Result<LedgerFile, StoreError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            // The station's directory itself must survive a power cut, or its synced file would
            // be unreachable.
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let path = dir.join(LEDGER_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let mut ledger = LedgerFile {
            path: path.clone(),
            file,
            len: MAGIC.len() as u64,
            hashes: Vec::new(),
            keys: HashMap::new(),
            duplicate_keys: 0,
            poisoned: false,
        };
        if size < MAGIC.len() as u64 {
            // New, or a crash before the magic was synced: nothing was ever acknowledged.
            ledger.file.set_len(0).map_err(io_err(&path))?;
            ledger.file.write_all_at(MAGIC, 0).map_err(io_err(&path))?;
            ledger.file.sync_all().map_err(io_err(&path))?;
            sync_dir(dir)?;
            return Ok(ledger);
        }
        ledger.load(size)?;
        Ok(ledger)
    }

    fn load(&mut self, size: u64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let mut reader = BufReader::with_capacity(1 << 20, self.file.try_clone().map_err(io_err(&path))?);
        let mut magic = [0u8; 8];
        reader.read_exact(&mut magic).map_err(io_err(&path))?;
        if &magic != MAGIC {
            return Err(StoreError::BadMagic { path });
        }
        let mut offset = MAGIC.len() as u64;
        let mut prev = GENESIS_HASH;
        let mut body = Vec::with_capacity(256);
        let stop =
            loop {
                let index = self.hashes.len() as u64 + 1;
                let mut len_bytes = [0u8; 4];
                match read_full(&mut reader, &mut len_bytes).map_err(io_err(&path))? {
                    0 => break None,
                    4 => {}
                    _ => break Some("partial frame length".to_owned()),
                }
                let len = u32::from_le_bytes(len_bytes);
                if len == 0 || len > MAX_FRAME_BYTES {
                    break Some(format!("frame length {len}"));
                }
                body.resize(len as usize, 0);
                let mut hash = [0u8; 32];
                if read_full(&mut reader, &mut body).map_err(io_err(&path))? != body.len()
                    || read_full(&mut reader, &mut hash).map_err(io_err(&path))? != 32
                {
                    break Some("partial frame".to_owned());
                }
                let mut h = Sha256::new();
                h.update(prev);
                h.update(&body);
                if <[u8; 32]>::from(h.finalize()) != hash {
                    break Some("hash does not chain".to_owned());
                }
                let record = TxRecord::from_canonical(&body).map_err(|e: LedgerError| {
                    StoreError::Corrupt { path: path.clone(), index, reason: e.to_string() }
                })?;
                self.note_key(&record);
                self.hashes.push(hash);
                prev = hash;
                offset += 4 + u64::from(len) + 32;
            };
        drop(reader);
        if let Some(reason) = stop {
            let index = self.hashes.len() as u64 + 1;
            if !self.tail_is_unacknowledged(offset, size, &reason)? {
                return Err(StoreError::Corrupt { path, index, reason });
            }
            tracing::warn!(path = %path.display(), index, offset, size, reason,
                "truncating an unacknowledged partial write at the end of the ledger file");
            self.file.set_len(offset).map_err(io_err(&path))?;
            self.file.sync_all().map_err(io_err(&path))?;
        }
        self.len = offset;
        Ok(())
    }

    /// Whether the bytes from `offset` to the end can only be a write that was never acknowledged:
    /// a partial frame (too short to be complete) or all zeros.
    fn tail_is_unacknowledged(&self, offset: u64, size: u64, reason: &str) -> Result<bool, StoreError> {
        if reason.starts_with("partial") {
            return Ok(true);
        }
        let mut rest = vec![0u8; (size - offset) as usize];
        self.file.read_exact_at(&mut rest, offset).map_err(io_err(&self.path))?;
        Ok(rest.iter().all(|b| *b == 0))
    }

    fn note_key(&mut self, record: &TxRecord) {
        let owner = (record.gate.clone(), record.installation);
        let set = self.keys.entry(owner).or_default();
        if !set.insert(record.gate_seq) {
            self.duplicate_keys += 1;
            tracing::warn!(gate = %record.gate, gate_seq = record.gate_seq, "a transaction key is stored twice");
        }
    }

    /// Every stored record, in index order, read back from the file (the frames were verified
    /// when the file was opened and every append since was written by this process).
    pub fn records(&self) -> Result<Vec<TxRecord>, StoreError> {
        Ok(self.records_from(RecordCursor::START)?.0)
    }

    /// The records stored from `cursor` on (the start, or a cursor an earlier call returned),
    /// and the cursor after them: the file only grows, so a reader that keeps the cursor reads
    /// each record once.
    pub fn records_from(&self, cursor: RecordCursor) -> Result<(Vec<TxRecord>, RecordCursor), StoreError> {
        let path = &self.path;
        let from = cursor.offset.max(MAGIC.len() as u64);
        let mut bytes = vec![0u8; self.len.saturating_sub(from) as usize];
        self.file.read_exact_at(&mut bytes, from).map_err(io_err(path))?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let index = cursor.index + out.len() as u64 + 1;
            let corrupt = |reason: String| StoreError::Corrupt { path: path.clone(), index, reason };
            let len = bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| corrupt("partial frame length".into()))?;
            let body = bytes.get(at + 4..at + 4 + len).ok_or_else(|| corrupt("partial frame".into()))?;
            out.push(TxRecord::from_canonical(body).map_err(|e| corrupt(e.to_string()))?);
            at += 4 + len + 32;
        }
        let next = RecordCursor { offset: from + bytes.len() as u64, index: cursor.index + out.len() as u64 };
        Ok((out, next))
    }

    /// The highest stored index (0 for none).
    pub fn acked_through(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// The hash of entry `index` (genesis for 0), `None` above `acked_through`.
    pub fn hash_at(&self, index: u64) -> Option<[u8; 32]> {
        if index == 0 {
            return Some(GENESIS_HASH);
        }
        self.hashes.get(usize::try_from(index - 1).ok()?).copied()
    }

    /// The hash of the last stored entry (genesis when empty).
    pub fn last_hash(&self) -> [u8; 32] {
        self.hashes.last().copied().unwrap_or(GENESIS_HASH)
    }

    /// Stored records whose `(gate, installation, gate_seq)` was stored before.
    pub fn duplicate_keys(&self) -> u64 {
        self.duplicate_keys
    }

    /// Numbers of a reported sequence gap: they will never come, so the key set moves past them
    /// (else every later record of that gate would be held as out of order, for ever).
    pub fn settle_gap(&mut self, gap: &SequenceGap) {
        let set = self.keys.entry((gap.gate.clone(), gap.installation)).or_default();
        set.settle(gap.from_seq, gap.to_seq);
    }

    /// Appends `entries`, which must start at `acked_through + 1` and chain from `last_hash` (the
    /// caller verified them), and makes them durable before returning.
    pub fn append(&mut self, entries: &[LedgerEntry]) -> Result<(), StoreError> {
        let canonical: Vec<Vec<u8>> = entries.iter().map(|e| e.record.canonical_bytes()).collect();
        self.append_canonical(entries, &canonical)
    }

    /// [`append`](Self::append) with each entry's canonical record bytes as the caller hashed
    /// them ([`crate::protocol::UploadBatch::verify_canonical`]): stored as they are, not encoded
    /// again. `canonical[i]` must be `entries[i].record.canonical_bytes()`.
    pub fn append_canonical(
        &mut self,
        entries: &[LedgerEntry],
        canonical: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        if entries.len() != canonical.len() {
            return Err(StoreError::Mismatch { entries: entries.len(), canonical: canonical.len() });
        }
        if self.poisoned {
            return Err(StoreError::Poisoned { path: self.path.clone() });
        }
        let Some(first) = entries.first() else { return Ok(()) };
        if first.index != self.acked_through() + 1 {
            return Err(StoreError::NotNext { expected: self.acked_through() + 1, found: first.index });
        }
        let mut buf = Vec::with_capacity(entries.len() * 160);
        for (entry, bytes) in entries.iter().zip(canonical) {
            // A canonical record is a few hundred bytes at most (identifiers are ≤ 64 bytes).
            buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(bytes);
            buf.extend_from_slice(&entry.hash);
        }
        let written = self.file.write_all_at(&buf, self.len).and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            if let Err(e) = self.file.set_len(self.len).and_then(|()| self.file.sync_data()) {
                tracing::error!(path = %self.path.display(), error = %e, "rolling back a failed write failed");
                self.poisoned = true;
            }
            return Err(StoreError::Io { path: self.path.clone(), source });
        }
        self.len += buf.len() as u64;
        for entry in entries {
            self.note_key(&entry.record);
            self.hashes.push(entry.hash);
        }
        Ok(())
    }
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Makes a directory's entries (a new file, a rename) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    fn station() -> Ident {
        Ident::new("xian_rd").unwrap()
    }

    #[test]
    fn appended_entries_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let entries = testdata::ledger(&station(), 50);
        {
            let mut l = LedgerFile::open(dir.path()).unwrap();
            l.append(&entries[..20]).unwrap();
            l.append(&entries[20..]).unwrap();
        }
        let l = LedgerFile::open(dir.path()).unwrap();
        assert_eq!(l.acked_through(), 50);
        assert_eq!(l.last_hash(), entries[49].hash);
        assert_eq!(l.hash_at(7), Some(entries[6].hash));
        assert_eq!(l.hash_at(0), Some(GENESIS_HASH));
        assert_eq!(l.hash_at(51), None);
        assert_eq!(l.duplicate_keys(), 0);
    }

    #[test]
    fn the_bytes_a_batch_was_verified_with_are_the_bytes_stored() {
        let dir = tempfile::tempdir().unwrap();
        let entries = testdata::ledger(&station(), 5);
        let batch = crate::protocol::UploadBatch::new(GENESIS_HASH, entries.clone()).unwrap();
        let canonical = batch.verify_canonical(&station()).unwrap();
        assert_eq!(canonical, entries.iter().map(|e| e.record.canonical_bytes()).collect::<Vec<_>>());
        let mut l = LedgerFile::open(dir.path()).unwrap();
        assert!(matches!(
            l.append_canonical(&entries, &canonical[..4]),
            Err(StoreError::Mismatch { entries: 5, canonical: 4 })
        ));
        l.append_canonical(&entries, &canonical).unwrap();
        drop(l);
        let l = LedgerFile::open(dir.path()).unwrap();
        assert_eq!((l.acked_through(), l.last_hash()), (5, entries[4].hash));
    }

    #[test]
    fn an_append_that_does_not_start_at_the_next_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let entries = testdata::ledger(&station(), 5);
        let mut l = LedgerFile::open(dir.path()).unwrap();
        assert!(matches!(l.append(&entries[1..]), Err(StoreError::NotNext { expected: 1, found: 2 })));
    }

    #[test]
    fn a_torn_last_frame_is_truncated_and_the_acknowledged_entries_kept() {
        let dir = tempfile::tempdir().unwrap();
        let entries = testdata::ledger(&station(), 10);
        {
            let mut l = LedgerFile::open(dir.path()).unwrap();
            l.append(&entries).unwrap();
        }
        let path = dir.path().join(LEDGER_FILE);
        let full = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 10).unwrap();
        drop(f);
        let mut l = LedgerFile::open(dir.path()).unwrap();
        assert_eq!(l.acked_through(), 9);
        l.append(&entries[9..]).unwrap();
        assert_eq!(LedgerFile::open(dir.path()).unwrap().acked_through(), 10);
    }

    #[test]
    fn a_zero_filled_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let entries = testdata::ledger(&station(), 3);
        {
            let mut l = LedgerFile::open(dir.path()).unwrap();
            l.append(&entries).unwrap();
        }
        let path = dir.path().join(LEDGER_FILE);
        let full = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(full + 4096).unwrap();
        assert_eq!(LedgerFile::open(dir.path()).unwrap().acked_through(), 3);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full);
    }

    #[test]
    fn a_corrupt_frame_in_the_middle_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let entries = testdata::ledger(&station(), 10);
        {
            let mut l = LedgerFile::open(dir.path()).unwrap();
            l.append(&entries).unwrap();
        }
        let path = dir.path().join(LEDGER_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(LedgerFile::open(dir.path()), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn a_key_stored_under_two_indices_is_counted_as_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let st = station();
        let mut head = afc_domain::ledger::LedgerHead::genesis();
        let entries: Vec<_> =
            [1, 2, 2, 4].iter().map(|&s| head.append(testdata::record(&st, "g01", s))).collect();
        let mut l = LedgerFile::open(dir.path()).unwrap();
        l.append(&entries).unwrap();
        assert_eq!(l.duplicate_keys(), 1);
        drop(l);
        assert_eq!(LedgerFile::open(dir.path()).unwrap().duplicate_keys(), 1);
    }
}
