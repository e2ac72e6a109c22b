//! The outbox's append-only record log: segment files of framed records, one `fdatasync` per
//! append.
//!
//! A frame is `len u32 LE ‖ seq u64 LE ‖ payload ‖ check` where `check` is the first 8 bytes of
//! sha256(seq ‖ payload). Segments are named by the first gate_seq they hold
//! (`{seq:020}.log`). On open every segment is read back; the first frame that is short, zero or
//! fails its check ends that segment (a write torn by a crash), and the file is cut there, so a
//! torn frame is never half-read and never followed by new frames. A frame is only reported
//! written after `fdatasync` returned, so a torn frame is one nobody was told about.
//! A damaged frame followed by a valid one is not a torn write (records were written after it,
//! so it was whole once): it is skipped and counted ([`Log::skipped`]), the frames after it are
//! kept, and its number is missing from the live records: the upload's covered range then tells
//! the ledger that number is lost (a sequence gap), instead of losing every record after it.
//!
//! Segments are preallocated (written with zeros, synced, then renamed into place), so appending a
//! frame changes no file size and its `fdatasync` commits no metadata: under other disk traffic a
//! size change waits for a journal commit, an in-place write does not. A zero length word ends the
//! frames of a segment.
//!
//! Whole segments are deleted once every record in them is acknowledged; the segment being
//! written is never deleted, so the last gate_seq used is always on disk.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A segment is closed once it passes this size (the default; [`Log::with_segment_bytes`]).
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// The largest record accepted (a transaction record is a few hundred bytes).
pub const MAX_RECORD: usize = 64 * 1024;
/// The record size [`Log::probe`] makes room for (a transaction record is a few hundred bytes).
pub const PROBE_ROOM: usize = 4096;
const HEADER: usize = 4 + 8;
const CHECK: usize = 8;

/// Whether a whole frame numbered above `after` starts at `off`.
fn valid_frame_at(bytes: &[u8], off: usize, after: u64) -> bool {
    let Some(h) = bytes.get(off..off + HEADER) else { return false };
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let seq = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    if len == 0 || len > MAX_RECORD || seq <= after {
        return false;
    }
    match (
        bytes.get(off + HEADER..off + HEADER + len),
        bytes.get(off + HEADER + len..off + HEADER + len + CHECK),
    ) {
        (Some(payload), Some(c)) => c == check(seq, payload),
        _ => false,
    }
}

fn check(seq: u64, payload: &[u8]) -> [u8; CHECK] {
    let mut h = Sha256::new();
    h.update(seq.to_le_bytes());
    h.update(payload);
    let d = h.finalize();
    let mut out = [0u8; CHECK];
    out.copy_from_slice(&d[..CHECK]);
    out
}

/// Where one live record sits.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seq: u64,
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: File,
    path: PathBuf,
    /// Bytes of valid frames (the next write offset for the active segment).
    len: u64,
    last_seq: u64,
}

/// The log; not thread-safe by itself (the store holds it under a lock).
pub struct Log {
    dir: PathBuf,
    /// Segments by first gate_seq.
    segments: BTreeMap<u64, Segment>,
    /// Live (unacknowledged) records in gate_seq order.
    live: VecDeque<Loc>,
    live_bytes: u64,
    last_seq: u64,
    /// The size a new segment is preallocated to.
    segment_bytes: u64,
    /// Damaged frames skipped on open (followed by whole ones).
    skipped: u64,
}

fn frame_len(payload: usize) -> u64 {
    (HEADER + payload + CHECK) as u64
}

impl Log {
    /// Opens the log in `dir`, dropping records at or below `acked` and any torn tail.
    pub fn open(dir: &Path, acked: u64) -> io::Result<Log> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            // The log's own directory entry must survive a power cut, or every segment in it
            // (and every gate_seq they hold) would be unreachable.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(".tmp")) {
                // A segment whose preallocation did not finish: it never held a record.
                std::fs::remove_file(e.path())?;
                continue;
            }
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else { continue };
            if let Ok(first) = stem.parse::<u64>() {
                names.push((first, e.path()));
            }
        }
        names.sort();
        let mut log = Log {
            dir: dir.to_owned(),
            segments: BTreeMap::new(),
            live: VecDeque::new(),
            live_bytes: 0,
            last_seq: 0,
            segment_bytes: SEGMENT_BYTES,
            skipped: 0,
        };
        for (first, path) in names {
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = std::fs::read(&path)?;
            let mut off = 0usize;
            // Frames must carry increasing numbers across the whole log.
            let mut last_seq = log.last_seq;
            while let Some(h) = bytes.get(off..off + HEADER) {
                let mut len4 = [0u8; 4];
                len4.copy_from_slice(&h[..4]);
                let len = u32::from_le_bytes(len4) as usize;
                let mut seq8 = [0u8; 8];
                seq8.copy_from_slice(&h[4..]);
                let seq = u64::from_le_bytes(seq8);
                let whole = len != 0
                    && len <= MAX_RECORD
                    && seq > last_seq
                    && bytes.get(off + HEADER..off + HEADER + len).is_some_and(|payload| {
                        bytes.get(off + HEADER + len..off + HEADER + len + CHECK)
                            == Some(&check(seq, payload)[..])
                    });
                if !whole {
                    // The end of the frames (zeros), a torn tail, or a damaged frame followed by
                    // whole ones. Its own header may be the damaged part (length or number):
                    // look for the next whole frame anywhere after it; none means the end.
                    if bytes[off..].iter().all(|b| *b == 0) {
                        break;
                    }
                    let next = off + HEADER + len.min(MAX_RECORD) + CHECK;
                    let found = if valid_frame_at(&bytes, next, last_seq) {
                        Some(next)
                    } else {
                        (off + 1..bytes.len().saturating_sub(HEADER))
                            .find(|o| valid_frame_at(&bytes, *o, last_seq))
                    };
                    let Some(next) = found else { break };
                    tracing::error!(segment = %path.display(), offset = off, "outbox log: a damaged record followed by whole ones is skipped (its number becomes a sequence gap)");
                    log.skipped += 1;
                    off = next;
                    continue;
                }
                if seq > acked {
                    log.live.push_back(Loc { seq, segment: first, offset: off as u64, len: len as u32 });
                    log.live_bytes += frame_len(len);
                }
                last_seq = seq;
                off += HEADER + len + CHECK;
            }
            if bytes[off..].iter().any(|b| *b != 0) {
                // A torn or corrupt frame: zero it and everything after, so the next frame
                // written here is never read as part of it.
                tracing::warn!(segment = %path.display(), valid = off, "outbox log: clearing a torn tail");
                file.write_all_at(&vec![0u8; bytes.len() - off], off as u64)?;
                file.sync_data()?;
            }
            log.last_seq = log.last_seq.max(last_seq);
            log.segments.insert(first, Segment { file, path, len: off as u64, last_seq });
        }
        Ok(log)
    }

    /// New segments get `bytes` (existing ones keep their size).
    pub fn with_segment_bytes(mut self, bytes: u64) -> Log {
        self.segment_bytes = bytes.max(frame_len(MAX_RECORD));
        self
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Damaged frames skipped when the log was opened (records lost: sequence gaps).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// The bytes a record of `len` payload bytes takes.
    pub fn cost(len: usize) -> u64 {
        frame_len(len)
    }

    /// Appends a record numbered `seq` (above every seq in the log) and returns once it is on disk.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        if payload.is_empty() || payload.len() > MAX_RECORD || seq <= self.last_seq {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad outbox record"));
        }
        let frame_bytes = frame_len(payload.len());
        let needs_new = match self.segments.last_key_value() {
            None => true,
            Some((_, s)) => s.len + frame_bytes > self.segment_bytes.max(frame_bytes),
        };
        if needs_new {
            self.new_segment(seq)?;
        }
        let Some((&first, seg)) = self.segments.iter_mut().next_back() else {
            return Err(io::Error::other("no active segment"));
        };
        let mut frame = Vec::with_capacity(HEADER + payload.len() + CHECK);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&check(seq, payload));
        seg.file.write_all_at(&frame, seg.len)?;
        if let Err(e) = seg.file.sync_data() {
            // Not durable, so not a record: nobody is told about it, and its gate_seq goes to the
            // next one. Zero it (best effort) so a restart cannot read back a tap that was refused.
            let _ = seg.file.write_all_at(&vec![0u8; frame.len()], seg.len);
            return Err(e);
        }
        self.live.push_back(Loc { seq, segment: first, offset: seg.len, len: payload.len() as u32 });
        seg.len += frame.len() as u64;
        seg.last_seq = seq;
        self.last_seq = seq;
        self.live_bytes += frame.len() as u64;
        Ok(())
    }

    /// Preallocates a segment whose first record will be `seq` and makes it the active one.
    fn new_segment(&mut self, seq: u64) -> io::Result<()> {
        let path = self.dir.join(format!("{seq:020}.log"));
        let tmp = self.dir.join(format!("{seq:020}.log.tmp"));
        let size = self.segment_bytes as usize;
        let made = (|| {
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
            file.write_all_at(&vec![0u8; size], 0)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The new name must survive a crash too.
            File::open(&self.dir)?.sync_all()?;
            Ok::<File, io::Error>(file)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                // A full disk: give back what the unfinished segment took (it never held a
                // record), so the next attempt and everything else has that room.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.segments.insert(seq, Segment { file, path, len: 0, last_seq: seq - 1 });
        Ok(())
    }

    /// Whether the next append can succeed, without writing a record: makes sure the active
    /// segment has room for a [`PROBE_ROOM`] frame (preallocating the next one if not), then writes
    /// zeros where the next frame goes (zeros already: the end marker) and syncs them. Fails as
    /// an append would on a full or read-only disk.
    pub fn probe(&mut self, next_seq: u64) -> io::Result<()> {
        let room = self
            .segments
            .last_key_value()
            .is_some_and(|(_, s)| s.len + frame_len(PROBE_ROOM) <= self.segment_bytes);
        if !room {
            self.new_segment(next_seq.max(self.last_seq + 1))?;
        }
        let Some((_, seg)) = self.segments.iter().next_back() else {
            return Err(io::Error::other("no active segment"));
        };
        seg.file.write_all_at(&[0u8; HEADER], seg.len)?;
        seg.file.sync_data()
    }

    /// Up to `max_records` live records after `after` (and about `max_bytes`; always one).
    pub fn read(&self, after: u64, max_records: usize, max_bytes: usize) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let start = self.live.partition_point(|l| l.seq <= after);
        let mut out = Vec::new();
        let mut size = 0usize;
        for loc in self.live.iter().skip(start) {
            if !out.is_empty() && (out.len() >= max_records || size + loc.len as usize > max_bytes) {
                break;
            }
            let seg = self.segments.get(&loc.segment).ok_or_else(|| io::Error::other("segment missing"))?;
            let mut buf = vec![0u8; loc.len as usize];
            seg.file.read_exact_at(&mut buf, loc.offset + HEADER as u64)?;
            size += buf.len();
            out.push((loc.seq, buf));
        }
        Ok(out)
    }

    /// Forgets records up to `through` and deletes segments holding nothing else (never the one
    /// being written). The caller has made `through` durable first.
    pub fn ack(&mut self, through: u64) -> io::Result<usize> {
        let mut removed = 0;
        while self.live.front().is_some_and(|l| l.seq <= through) {
            if let Some(l) = self.live.pop_front() {
                self.live_bytes = self.live_bytes.saturating_sub(frame_len(l.len as usize));
                removed += 1;
            }
        }
        let active = self.segments.last_key_value().map(|(k, _)| *k);
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(first, s)| Some(**first) != active && s.last_seq <= through)
            .map(|(first, _)| *first)
            .collect();
        for first in done {
            if let Some(s) = self.segments.remove(&first) {
                std::fs::remove_file(&s.path)?;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_acks_delete_whole_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1u8; 60_000];
        {
            let mut log = Log::open(dir.path(), 0).unwrap();
            for seq in 1..=200 {
                log.append(seq, &big).unwrap();
            }
            assert!(log.segments.len() >= 3);
            log.ack(150).unwrap();
            assert_eq!(log.live_count(), 50);
        }
        let log = Log::open(dir.path(), 150).unwrap();
        assert_eq!((log.last_seq(), log.live_count()), (200, 50));
        let r = log.read(150, 10, 1 << 30).unwrap();
        assert_eq!(r.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (151..=160).collect::<Vec<_>>());
        assert_eq!(r[0].1, big);
    }

    #[test]
    fn a_torn_tail_is_cleared_and_writing_goes_on_after_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = Log::open(dir.path(), 0).unwrap();
            for seq in 1..=5 {
                log.append(seq, format!("record {seq}").as_bytes()).unwrap();
            }
        }
        let path = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let whole = (1..=5).map(|s| frame_len(format!("record {s}").len())).sum::<u64>();
        // A frame torn half-way.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[20, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, b'x'], whole).unwrap();
        let mut log = Log::open(dir.path(), 0).unwrap();
        assert_eq!((log.last_seq(), log.live_count()), (5, 5));
        assert!(
            std::fs::read(&path).unwrap()[whole as usize..].iter().all(|b| *b == 0),
            "the torn frame is cleared"
        );
        log.append(6, b"record 6").unwrap();
        drop(log);
        assert_eq!(Log::open(dir.path(), 0).unwrap().last_seq(), 6);
        // The last frame failing its check is not trusted.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[whole as usize + HEADER] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let log = Log::open(dir.path(), 0).unwrap();
        assert_eq!((log.last_seq(), log.skipped()), (5, 0));
        // A preallocation cut short by a crash leaves a .tmp file that is removed.
        std::fs::write(dir.path().join("00000000000000000099.log.tmp"), b"partial").unwrap();
        drop(log);
        Log::open(dir.path(), 0).unwrap();
        assert!(!dir.path().join("00000000000000000099.log.tmp").exists());
    }

    #[test]
    fn a_damaged_record_followed_by_whole_ones_is_skipped_and_the_rest_kept() {
        let at = |n: u64| (1..n).map(|s| frame_len(format!("record {s}").len())).sum::<u64>() as usize;
        // Record 2's payload, record 4's seq raised or lowered, record 3's length: damaged.
        for (damage, bits, kept) in [
            (at(2) + HEADER + 1, 0x40, vec![1, 3, 4, 5]),
            (at(4) + 5, 0x40, vec![1, 2, 3, 5]),
            (at(4) + 4, 0x04, vec![1, 2, 3, 5]),
            (at(3), 0x20, vec![1, 2, 4, 5]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut log = Log::open(dir.path(), 0).unwrap();
                for seq in 1..=5 {
                    log.append(seq, format!("record {seq}").as_bytes()).unwrap();
                }
            }
            let path = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[damage] ^= bits;
            std::fs::write(&path, &bytes).unwrap();
            let mut log = Log::open(dir.path(), 0).unwrap();
            let seqs: Vec<u64> = log.read(0, 100, 1 << 20).unwrap().iter().map(|(s, _)| *s).collect();
            assert_eq!((seqs, log.last_seq(), log.skipped()), (kept, 5, 1));
            // Writing goes on after the last record, and everything reads back after a reopen.
            log.append(6, b"record 6").unwrap();
            drop(log);
            let log = Log::open(dir.path(), 0).unwrap();
            assert_eq!((log.last_seq(), log.live_count(), log.skipped()), (6, 5, 1));
        }
    }

    #[test]
    fn sequence_numbers_only_go_up_and_empty_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), 0).unwrap();
        log.append(3, b"a").unwrap();
        assert!(log.append(3, b"b").is_err());
        assert!(log.append(2, b"b").is_err());
        assert!(log.append(4, b"").is_err());
        assert_eq!(log.read(0, 10, 10).unwrap().len(), 1);
    }
}
