//! The gate's durable storage: the transaction outbox, the gate_seq counter, and the parameter
//! packages it holds. The only module that knows the storage engines, so they could be swapped.
//!
//! The outbox is an append-only log of framed records ([`log`]), one `fdatasync` per tap; sled
//! holds the rest (the acknowledged point, parameter packages, small state).
//!
//! Outbox rules (SPEC §5, §7, §8):
//! - `gate_seq` is assigned here and written inside the frame of the record it numbers, and
//!   [`Store::append`] returns only after `fdatasync`. So a number is never used before it is
//!   durable, and a record the reader was told about is never lost. After a restart the next
//!   number is above both the last record in the log and the last acknowledged one.
//! - Records leave only through [`Store::ack`], when the controllers' `tx/ack` covers them.
//! - The outbox is bounded by bytes. Past the capacity, [`Store::append`] refuses with
//!   [`StoreError::Full`] (the caller refuses the tap with `outbox_full`); nothing is dropped.
//!
//! Why not sled for the outbox: sled 0.34's `flush` ends with `sync_file_range` on Linux, which
//! writes the pages but neither flushes the device's write cache nor commits metadata, so a record
//! would need a second sync (an `fdatasync` after sled's own) on the path of every tap; the log
//! needs one. Every sled write here is followed by [`Store::sync`] ([`afc_sled::Durable::sync`]:
//! sled's flush, then `fdatasync` of its blob files (a stored 1M-entry blacklist is one) and data
//! file, and `fsync` of its directories).
//!
//! Parameter rules: a package is stored whole in one value, and switching pending → active is one
//! atomic batch, so a crash mid-write leaves the previous set.
//!
//! A storage fault (disk full, read-only, I/O errors) is reported, never hidden: the failing
//! call returns its error and [`Store::healthy`] turns false until writes work again. sled 0.34
//! refuses every operation after one I/O error (its global error) until it is opened again, so
//! [`Store::recover`] re-opens it (the gate's `storage-probe` task calls it); the acknowledged
//! point is mirrored in memory, so numbering and the tap path never read sled.
//!
//! Identity and commands: the store makes the gate's random installation id once, when it is first
//! created (or first opened by a build that knows it), and keeps it; a `tx/ack` counts only if it
//! names it. Operator commands executed are remembered (id → expiry and result) until the gate
//! forgets them, so a redelivered command never runs twice, across restarts too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use afc_domain::ledger::Installation;
use thiserror::Error;

mod log;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage sync error: {0}")]
    Sync(#[from] afc_sled::Error),
    #[error("storage error in a batch: {0}")]
    Batch(String),
    #[error("the outbox is full ({bytes} of {capacity} bytes)")]
    Full { bytes: u64, capacity: u64 },
    #[error("stored value {0} is corrupt")]
    Corrupt(&'static str),
    #[error("an ack through gate_seq {through} is above the last gate_seq used, {last}")]
    AckBeyondLastSeq { through: u64, last: u64 },
    #[error("the state store is closed after a storage fault and could not be opened again yet")]
    Closed,
}

impl StoreError {
    /// Whether this is the storage failing (full, read-only, I/O), not a refusal by the rules.
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            StoreError::Full { .. } | StoreError::AckBeyondLastSeq { .. } | StoreError::Corrupt(_)
        )
    }
}

/// The default size of an outbox log segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = log::SEGMENT_BYTES;

const ACKED_THROUGH: &[u8] = b"acked_through";
const INSTALLATION: &[u8] = b"installation";

/// Which slot of a parameter kind a package sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Active,
    Pending,
}

impl Slot {
    fn as_str(self) -> &'static str {
        match self {
            Slot::Active => "active",
            Slot::Pending => "pending",
        }
    }
}

fn param_key(kind: &str, slot: Slot) -> Vec<u8> {
    format!("{kind}/{}", slot.as_str()).into_bytes()
}

/// `{kind}/delta/`: the deltas stored on a kind's active base, keyed by the version each makes.
fn delta_prefix(kind: &str) -> Vec<u8> {
    format!("{kind}/delta/").into_bytes()
}

/// Zero-padded, so sled's key order is version order.
fn delta_key(kind: &str, version: u64) -> Vec<u8> {
    format!("{kind}/delta/{version:020}").into_bytes()
}

/// The sled side of the store (re-opened whole after a fault).
struct Sled {
    /// sled, synced through [`afc_sled::Durable`] (data file, blob files such as a 1M-entry
    /// blacklist package, directories).
    durable: afc_sled::Durable,
    /// The highest acknowledged gate_seq, the installation id.
    meta: sled::Tree,
    /// `{kind}/{active|pending}` → package bytes, `{kind}/delta/{version}` → a delta on the
    /// active base (the blacklist's); other small state by name.
    params: sled::Tree,
    /// Command id → what the gate remembers of it (the gate's encoding).
    commands: sled::Tree,
}

fn sled_config() -> sled::Config {
    sled::Config::new().mode(sled::Mode::LowSpace).cache_capacity(8 * 1024 * 1024)
}

impl Sled {
    fn open(dir: &Path) -> Result<Sled, StoreError> {
        let durable = afc_sled::Durable::open(dir, sled_config())?;
        let meta = durable.db().open_tree("meta")?;
        let params = durable.db().open_tree("params")?;
        let commands = durable.db().open_tree("commands")?;
        Ok(Sled { durable, meta, params, commands })
    }
}

pub struct Store {
    dir: PathBuf,
    /// `None` between dropping a failed sled and opening it again.
    sled: RwLock<Option<Sled>>,
    /// Set by a failed sled call: sled refuses everything after one I/O error until re-opened.
    sled_failed: AtomicBool,
    /// Set by a failed outbox append, cleared by the next one that succeeds.
    log_failed: AtomicBool,
    /// Mirror of the durable acknowledged point (written only after it is synced).
    acked: AtomicU64,
    /// The record log, under a lock that also serializes gate_seq assignment.
    outbox: Mutex<log::Log>,
    /// This installation's id: 16 random bytes, hex, made once.
    installation: String,
    /// The same as bytes, as every record carries it.
    installation_id: Installation,
    capacity: u64,
    /// Bytes the outbox holds (frames of unacknowledged records), mirrored for lock-free reads.
    bytes: AtomicU64,
    depth: AtomicU64,
}

fn be(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn read_u64(v: Option<sled::IVec>, what: &'static str) -> Result<Option<u64>, StoreError> {
    match v {
        None => Ok(None),
        Some(b) => {
            let arr: [u8; 8] = b.as_ref().try_into().map_err(|_| StoreError::Corrupt(what))?;
            Ok(Some(u64::from_be_bytes(arr)))
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`; the outbox may hold up to `capacity` bytes.
    pub fn open(dir: &Path, capacity: u64) -> Result<Store, StoreError> {
        Store::open_with(dir, capacity, DEFAULT_SEGMENT_BYTES)
    }

    /// [`Store::open`] with outbox log segments of `segment_bytes`.
    pub fn open_with(dir: &Path, capacity: u64, segment_bytes: u64) -> Result<Store, StoreError> {
        let sled = Sled::open(dir)?;
        let acked = read_u64(sled.meta.get(ACKED_THROUGH)?, "acked_through")?.unwrap_or(0);
        let installation = match sled.meta.get(INSTALLATION)? {
            Some(v) => String::from_utf8(v.to_vec()).map_err(|_| StoreError::Corrupt("installation"))?,
            None => {
                let id = hex::encode(rand::random::<[u8; 16]>());
                sled.meta.insert(INSTALLATION, id.as_bytes())?;
                sled.durable.sync()?;
                id
            }
        };
        let installation_id =
            Installation::parse(&installation).ok_or(StoreError::Corrupt("installation"))?;
        let outbox = log::Log::open(&dir.join("outbox"), acked)?.with_segment_bytes(segment_bytes);
        if outbox.skipped() > 0 {
            tracing::error!(
                skipped = outbox.skipped(),
                "outbox: damaged records skipped; the ledger records their numbers as sequence gaps"
            );
        }
        let bytes = AtomicU64::new(outbox.live_bytes());
        let depth = AtomicU64::new(outbox.live_count() as u64);
        Ok(Store {
            dir: dir.to_owned(),
            sled: RwLock::new(Some(sled)),
            sled_failed: AtomicBool::new(false),
            log_failed: AtomicBool::new(false),
            acked: AtomicU64::new(acked),
            outbox: Mutex::new(outbox),
            installation,
            installation_id,
            capacity,
            bytes,
            depth,
        })
    }

    fn sled_guard(&self) -> RwLockReadGuard<'_, Option<Sled>> {
        // Only replaced whole under the write lock: a panic cannot leave it half-changed.
        self.sled.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on sled; a storage error marks sled as failed (re-opened by [`Store::recover`]).
    fn with_sled<T>(&self, f: impl FnOnce(&Sled) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let guard = self.sled_guard();
        let Some(sled) = guard.as_ref() else { return Err(StoreError::Closed) };
        let r = f(sled);
        if let Err(e) = &r {
            if e.is_fault() && !self.sled_failed.swap(true, Ordering::SeqCst) {
                tracing::error!(error = %e, "state store write failed; it is re-opened once storage works");
            }
        }
        r
    }

    /// Tests only: drops sled as a storage fault would, so every sled call fails with
    /// [`StoreError::Closed`] until [`Store::recover`] opens it again.
    #[cfg(test)]
    pub(crate) fn fail_for_test(&self) {
        drop(self.sled.write().unwrap_or_else(|p| p.into_inner()).take());
        self.sled_failed.store(true, Ordering::SeqCst);
    }

    /// Whether the last outbox append and every sled call since the last re-open worked.
    pub fn healthy(&self) -> bool {
        !self.sled_failed.load(Ordering::SeqCst) && !self.log_failed.load(Ordering::SeqCst)
    }

    /// Whether the outbox's last append failed (taps are refused until one works).
    pub fn outbox_failed(&self) -> bool {
        self.log_failed.load(Ordering::SeqCst)
    }

    /// Whether the next outbox append can succeed ([`log::Log::probe`], no record written):
    /// clears or sets the outbox fault. Called while the outbox is failed, so taps are refused
    /// (not each used as a probe) until the disk takes writes again.
    pub fn probe_outbox(&self) -> Result<(), StoreError> {
        let mut log = self.log();
        let next = log.last_seq().max(self.acked.load(Ordering::SeqCst)) + 1;
        match log.probe(next) {
            Ok(()) => {
                if self.log_failed.swap(false, Ordering::SeqCst) {
                    tracing::info!("outbox takes writes again");
                }
                Ok(())
            }
            Err(e) => {
                self.log_failed.store(true, Ordering::SeqCst);
                Err(e.into())
            }
        }
    }

    /// After a sled fault: drops sled and opens it again, then proves a synced write works.
    /// `Ok(true)`: re-opened and writable; `Ok(false)`: nothing to do; `Err`: still failing.
    pub fn recover(&self) -> Result<bool, StoreError> {
        if !self.sled_failed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut guard = self.sled.write().unwrap_or_else(|p| p.into_inner());
        // The old handle must be gone before the new one takes sled's file lock.
        drop(guard.take());
        let sled = Sled::open(&self.dir)?;
        sled.meta.insert(b"probe", &be(rand::random::<u64>()))?;
        sled.durable.sync()?;
        let acked = read_u64(sled.meta.get(ACKED_THROUGH)?, "acked_through")?.unwrap_or(0);
        self.acked.fetch_max(acked, Ordering::SeqCst);
        *guard = Some(sled);
        self.sled_failed.store(false, Ordering::SeqCst);
        tracing::info!("state store re-opened after a storage fault; writes work again");
        Ok(true)
    }

    /// This installation's id (made once, when the store was first created): the gate puts it in
    /// every batch and takes only the `tx/ack`s that name it.
    pub fn installation(&self) -> &str {
        &self.installation
    }

    /// [`Store::installation`] as the records carry it (part of their idempotency key).
    pub fn installation_id(&self) -> Installation {
        self.installation_id
    }

    /// Every command remembered: id → the caller's bytes.
    pub fn commands(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_sled(|s| {
            let mut out = Vec::new();
            for kv in s.commands.iter() {
                let (k, v) = kv?;
                let id = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("command id"))?;
                out.push((id, v.to_vec()));
            }
            Ok(out)
        })
    }

    /// Remembers a command durably (returns once synced).
    pub fn put_command(&self, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with_sled(|s| {
            s.commands.insert(id.as_bytes(), value)?;
            Ok(s.durable.sync()?)
        })
    }

    /// Forgets commands, in one batch.
    pub fn remove_commands<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(id.as_bytes());
        }
        self.with_sled(|s| {
            s.commands.apply_batch(batch)?;
            Ok(s.durable.sync()?)
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes the outbox holds.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Records waiting for an ack.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Whether a record of about `len` bytes still fits.
    pub fn has_room(&self, len: usize) -> bool {
        self.bytes() + log::Log::cost(len) <= self.capacity
    }

    /// Whether the outbox is past `percent` of its capacity (the near-full alarm).
    pub fn above(&self, percent: u64) -> bool {
        self.bytes().saturating_mul(100) >= self.capacity.saturating_mul(percent)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, log::Log> {
        // The log's state is updated only after each I/O succeeded; after a panic it is still
        // consistent with the files.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate_seq the next record will get.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.log().last_seq().max(self.acked_through()?) + 1)
    }

    /// Numbers a record, writes it and `fdatasync`s it; returns its gate_seq once durable. `make`
    /// builds the record bytes from its gate_seq.
    pub fn append(&self, make: impl FnOnce(u64) -> Vec<u8>) -> Result<u64, StoreError> {
        let mut log = self.log();
        let acked = self.acked.load(Ordering::SeqCst);
        let seq = log.last_seq().max(acked) + 1;
        let record = make(seq);
        let cost = log::Log::cost(record.len());
        let bytes = log.live_bytes();
        if bytes + cost > self.capacity {
            return Err(StoreError::Full { bytes, capacity: self.capacity });
        }
        if let Err(e) = log.append(seq, &record) {
            if !self.log_failed.swap(true, Ordering::SeqCst) {
                tracing::error!(error = %e, seq, "outbox append failed; taps are refused until one works");
            }
            return Err(e.into());
        }
        if self.log_failed.swap(false, Ordering::SeqCst) {
            tracing::info!(seq, "outbox appends work again");
        }
        self.bytes.store(log.live_bytes(), Ordering::Relaxed);
        self.depth.store(log.live_count() as u64, Ordering::Relaxed);
        Ok(seq)
    }

    /// Up to `max_records` records (and about `max_bytes`, at least one) after `after`, in
    /// gate_seq order.
    pub fn pending(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self.log().read(after, max_records, max_bytes)?)
    }

    /// Removes every record with gate_seq ≤ `through`; returns how many were removed. The
    /// acknowledged point is made durable first, so the numbers stay above it after a restart.
    /// Refused ([`StoreError::AckBeyondLastSeq`], nothing changes) when `through` is above the
    /// last gate_seq ever used: no ledger can hold what this gate never numbered, and taking it
    /// would drop the outbox and make every later gate_seq start above it.
    pub fn ack(&self, through: u64) -> Result<usize, StoreError> {
        let prev = self.acked_through()?;
        let last = self.log().last_seq().max(prev);
        if through > last {
            return Err(StoreError::AckBeyondLastSeq { through, last });
        }
        if through > prev {
            self.with_sled(|s| {
                s.meta.insert(ACKED_THROUGH, &be(through))?;
                Ok(s.durable.sync()?)
            })?;
            self.acked.fetch_max(through, Ordering::SeqCst);
        }
        let mut log = self.log();
        let removed = log.ack(through)?;
        self.bytes.store(log.live_bytes(), Ordering::Relaxed);
        self.depth.store(log.live_count() as u64, Ordering::Relaxed);
        Ok(removed)
    }

    /// The highest gate_seq acknowledged so far (0 before any).
    pub fn acked_through(&self) -> Result<u64, StoreError> {
        Ok(self.acked.load(Ordering::SeqCst))
    }

    /// Flushes whatever is buffered (acks, small state).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.sync()
    }

    /// sled's flush, then `fdatasync` of its blob and data files ([`afc_sled::Durable::sync`]), so
    /// what was written survives a power cut and not only a process crash.
    fn sync(&self) -> Result<(), StoreError> {
        self.with_sled(|s| Ok(s.durable.sync()?))
    }

    /// The package held in a slot of a parameter kind.
    pub fn param(&self, kind: &str, slot: Slot) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_sled(|s| Ok(s.params.get(param_key(kind, slot))?.map(|v| v.to_vec())))
    }

    /// Stores a verified package in a slot, durably.
    pub fn put_param(&self, kind: &str, slot: Slot, package: &[u8]) -> Result<(), StoreError> {
        self.with_sled(|s| {
            s.params.insert(param_key(kind, slot), package)?;
            Ok(s.durable.sync()?)
        })
    }

    /// Makes the pending package of `kind` the active one, in one atomic batch.
    pub fn activate_pending(&self, kind: &str) -> Result<bool, StoreError> {
        self.with_sled(|s| {
            let Some(p) = s.params.get(param_key(kind, Slot::Pending))? else { return Ok(false) };
            let mut batch = sled::Batch::default();
            batch.insert(param_key(kind, Slot::Active), p);
            batch.remove(param_key(kind, Slot::Pending));
            s.params.apply_batch(batch)?;
            s.durable.sync()?;
            Ok(true)
        })
    }

    /// Writes a kind's active set and (optionally) removes its pending package, in one atomic
    /// batch, flushed.
    pub fn set_active(&self, kind: &str, value: &[u8], clear_pending: bool) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(param_key(kind, Slot::Active), value);
        if clear_pending {
            batch.remove(param_key(kind, Slot::Pending));
        }
        self.with_sled(|s| {
            s.params.apply_batch(batch)?;
            Ok(s.durable.sync()?)
        })
    }

    /// A kind's deltas on its active base, in version order (see [`Store::put_param_delta`]).
    pub fn param_deltas(&self, kind: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with_sled(|s| {
            let mut out = Vec::new();
            for kv in s.params.scan_prefix(delta_prefix(kind)) {
                out.push(kv?.1.to_vec());
            }
            Ok(out)
        })
    }

    /// Stores one delta of `kind` (making `version`) beside its active base, and (optionally)
    /// removes its pending package, in one atomic batch, durably. The base is not rewritten.
    pub fn put_param_delta(
        &self,
        kind: &str,
        version: u64,
        value: &[u8],
        clear_pending: bool,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(delta_key(kind, version), value);
        if clear_pending {
            batch.remove(param_key(kind, Slot::Pending));
        }
        self.with_sled(|s| {
            s.params.apply_batch(batch)?;
            Ok(s.durable.sync()?)
        })
    }

    /// Writes a kind's active base, drops every delta stored on the old one and (optionally) its
    /// pending package, in one atomic batch, durably: a full list received, or the deltas
    /// compacted into the base.
    pub fn set_active_base(&self, kind: &str, value: &[u8], clear_pending: bool) -> Result<(), StoreError> {
        self.with_sled(|s| {
            let mut batch = sled::Batch::default();
            batch.insert(param_key(kind, Slot::Active), value);
            for k in s.params.scan_prefix(delta_prefix(kind)).keys() {
                batch.remove(k?);
            }
            if clear_pending {
                batch.remove(param_key(kind, Slot::Pending));
            }
            s.params.apply_batch(batch)?;
            Ok(s.durable.sync()?)
        })
    }

    /// Drops a kind's pending package.
    pub fn clear_pending(&self, kind: &str) -> Result<(), StoreError> {
        self.with_sled(|s| {
            s.params.remove(param_key(kind, Slot::Pending))?;
            Ok(s.durable.sync()?)
        })
    }

    /// Small named state (the last mode message, recent command ids ...).
    pub fn state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_sled(|s| Ok(s.params.get(format!("state/{name}"))?.map(|v| v.to_vec())))
    }

    pub fn put_state(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with_sled(|s| {
            s.params.insert(format!("state/{name}"), value)?;
            Ok(s.durable.sync()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_above_the_last_gate_seq_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        for _ in 1..=3u64 {
            s.append(|seq| format!("r{seq}").into_bytes()).unwrap();
        }
        assert!(matches!(s.ack(u64::MAX), Err(StoreError::AckBeyondLastSeq { through: u64::MAX, last: 3 })));
        assert!(matches!(s.ack(4), Err(StoreError::AckBeyondLastSeq { last: 3, .. })));
        assert_eq!((s.depth(), s.acked_through().unwrap()), (3, 0));
        assert_eq!(s.append(|_| b"x".to_vec()).unwrap(), 4);
        assert_eq!(s.ack(4).unwrap(), 4);
    }

    #[test]
    fn gate_seq_survives_a_restart_and_acks_remove_only_what_they_cover() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            for i in 1..=5u64 {
                assert_eq!(s.append(|seq| format!("r{seq}").into_bytes()).unwrap(), i);
            }
            assert_eq!(s.ack(2).unwrap(), 2);
            assert_eq!(s.depth(), 3);
        }
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.depth(), 3);
        assert_eq!(s.acked_through().unwrap(), 2);
        let p = s.pending(0, 10, 1 << 20).unwrap();
        assert_eq!(p.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(p[0].1, b"r3");
        assert_eq!(s.append(|_| b"x".to_vec()).unwrap(), 6);
        // Even when everything is acked, numbers are never reused.
        s.ack(6).unwrap();
        drop(s);
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.depth(), 0);
        assert_eq!(s.append(|_| b"y".to_vec()).unwrap(), 7);
    }

    #[test]
    fn the_installation_id_is_made_once_and_kept_and_a_store_without_one_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), 1 << 20).unwrap().installation().to_owned();
        assert_eq!(first.len(), 32);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(Store::open(dir.path(), 1 << 20).unwrap().installation(), first);
        // A store written by a build without installation ids gets one on its first open.
        {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            s.with_sled(|sl| Ok(sl.meta.remove(INSTALLATION)?)).unwrap();
            s.sync().unwrap();
        }
        let second = Store::open(dir.path(), 1 << 20).unwrap().installation().to_owned();
        assert_ne!(second, first);
        assert_eq!(Store::open(dir.path(), 1 << 20).unwrap().installation(), second);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Store::open(other.path(), 1 << 20).unwrap().installation(), second);
    }

    #[test]
    fn remembered_commands_survive_a_restart_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            s.put_command("c1", b"one").unwrap();
            s.put_command("c2", b"two").unwrap();
        }
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            s.commands().unwrap(),
            vec![("c1".into(), b"one".to_vec()), ("c2".into(), b"two".to_vec())]
        );
        s.remove_commands(["c1"]).unwrap();
        assert_eq!(s.commands().unwrap().len(), 1);
    }

    #[test]
    fn a_full_outbox_refuses_and_drops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100).unwrap();
        s.append(|_| vec![0; 50]).unwrap();
        assert!(s.above(50));
        assert!(matches!(s.append(|_| vec![0; 50]), Err(StoreError::Full { .. })));
        assert_eq!(s.depth(), 1);
        assert!(!s.has_room(50));
        s.ack(1).unwrap();
        assert!(s.has_room(50));
        assert_eq!(s.append(|_| vec![0; 50]).unwrap(), 2);
    }

    #[test]
    fn pending_batches_are_bounded_by_count_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        for _ in 0..10 {
            s.append(|_| vec![1; 100]).unwrap();
        }
        assert_eq!(s.pending(0, 4, 1 << 20).unwrap().len(), 4);
        assert_eq!(s.pending(0, 100, 250).unwrap().len(), 2);
        assert_eq!(s.pending(8, 100, 1 << 20).unwrap().len(), 2);
        assert_eq!(s.pending(0, 100, 10).unwrap().len(), 1, "one record always fits");
    }

    #[test]
    fn a_pending_package_replaces_the_active_one_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        s.put_param("fare_table", Slot::Active, b"v1").unwrap();
        s.put_param("fare_table", Slot::Pending, b"v2").unwrap();
        assert!(s.activate_pending("fare_table").unwrap());
        assert_eq!(s.param("fare_table", Slot::Active).unwrap().unwrap(), b"v2");
        assert_eq!(s.param("fare_table", Slot::Pending).unwrap(), None);
        assert!(!s.activate_pending("fare_table").unwrap());
    }
}
