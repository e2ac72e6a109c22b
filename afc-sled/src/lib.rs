//! sled 0.34 made durable across a power cut: the one place that knows what sled does not sync,
//! and syncs it. Both services that keep state in sled (the controller's Raft log and state
//! machine, the gate's parameters and acked point) open their database through [`Durable`] and
//! call [`Durable::sync`] where they used to call sled's `flush`.
//!
//! What sled 0.34 leaves to us (read in its sources):
//! - `flush`/`flush_async` write the log buffers and end in `sync_file_range` (`pagecache/iobuf.rs`),
//!   which neither flushes the drive's cache nor commits metadata: nothing is known to survive a
//!   power cut until the data file (`<dir>/db`) is `fdatasync`ed.
//! - A log message larger than a quarter segment (128 KiB with the default 512 KiB segments; a leaf
//!   node holds up to 16 items, so small values add up to one) is a separate file in `<dir>/blobs`,
//!   written with no sync at all, and its directory entry is never synced (`pagecache/blob_io.rs`).
//!   A pointer whose blob file is missing after a cut is skipped on recovery ("dangling blob"): the
//!   page update is silently gone.
//! - Snapshot files (`<dir>/snap.*`) are synced but renamed into place with no directory sync.
//! - The background flusher `fsync`s the data file every 500 ms on its own, which can make a blob
//!   pointer durable before its blob. We switch it off: the data file becomes durable only in
//!   [`Durable::sync`], after the blobs it may point to.
//!
//! [`Durable::sync`], in this order: sled's flush; `fdatasync` of every blob file not synced yet;
//! `fdatasync` of the data file; `fsync` of `blobs/` and of the database directory when their entries
//! changed since the last sync (a new blob or snapshot becomes reachable, a removed one stays removed
//! only after the data that replaced it is durable). Concurrent callers share one sync (group
//! commit): a caller returns once a sync that started after its call completed.
//!
//! The environment variable [`SKIP_FSYNC_ENV`] (tests only) restores sled's own behaviour (flush,
//! background flusher, none of the syncs above), so a power-cut test can show that it sees the loss
//! this module prevents.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Set to `1` (tests only) to skip every sync this crate adds: sled's own flushing alone, as before.
pub const SKIP_FSYNC_ENV: &str = "AFC_TEST_ONLY_SKIP_FSYNC";

/// What can go wrong opening or syncing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("a sync lock was poisoned by a panic")]
    Poisoned,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

/// Counters of [`Durable::sync`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Syncs performed (one flush + its fsyncs each).
    pub syncs: u64,
    /// Calls answered by a sync another caller performed (group commit).
    pub shared: u64,
    /// Blob files synced.
    pub blobs: u64,
    /// Directory fsyncs.
    pub dirs: u64,
}

/// What the last sync left on disk, so the next one syncs only what changed.
#[derive(Default)]
struct Synced {
    /// The highest ticket a completed sync covers.
    completed: u64,
    /// Entries of `blobs/` as of the last sync (all of them synced).
    blobs: BTreeSet<OsString>,
    /// Entries of the database directory as of the last sync.
    top: BTreeSet<OsString>,
    stats: SyncStats,
}

struct Inner {
    db: sled::Db,
    dir: PathBuf,
    /// sled's data file, opened only to `fdatasync` it (fsync acts on the file, not the
    /// descriptor, so it covers what sled wrote through its own).
    data_file: File,
    /// Tickets handed out: a caller takes one after its writes, before it waits.
    requested: AtomicU64,
    synced: Mutex<Synced>,
    /// [`SKIP_FSYNC_ENV`] was set: sled's behaviour alone.
    skip: bool,
}

/// A sled database with durable syncs. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

fn entries(dir: &Path) -> Result<BTreeSet<OsString>, Error> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).map_err(io("listing", dir))? {
        out.insert(e.map_err(io("listing", dir))?.file_name());
    }
    Ok(out)
}

fn fsync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync of directory", dir))
}

/// `fdatasync` of a file that may have been removed meanwhile (a replaced blob): gone is fine.
fn sync_file_if_present(path: &Path) -> Result<bool, Error> {
    match File::open(path) {
        Ok(f) => f.sync_data().map(|()| true).map_err(io("fdatasync", path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("opening", path)(e)),
    }
}

impl Durable {
    /// Opens (or creates) the database in `dir` with `config` (mode, cache size; its path and
    /// flush interval are set here), and makes what is already there durable, the directory's own
    /// entry in its parent included.
    pub fn open(dir: &Path, config: sled::Config) -> Result<Durable, Error> {
        let skip = std::env::var(SKIP_FSYNC_ENV).is_ok_and(|v| v == "1");
        let created = !dir.exists();
        let config = if skip {
            tracing::warn!(env = SKIP_FSYNC_ENV, dir = %dir.display(), "durable syncs are OFF (tests only): a power cut loses data");
            config.path(dir)
        } else {
            config.path(dir).flush_every_ms(None)
        };
        let db = config.open()?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(io("opening", &data_path))?;
        let inner = Inner {
            db,
            dir: dir.to_path_buf(),
            data_file,
            requested: AtomicU64::new(0),
            synced: Mutex::new(Synced::default()),
            skip,
        };
        let durable = Durable { inner: Arc::new(inner) };
        if !skip {
            for name in ["conf", "db"] {
                sync_file_if_present(&dir.join(name))?;
            }
            durable.sync()?;
            // sync() fsyncs the directory only when its entries changed; the first time, always,
            // and its entry in the parent if this open created it.
            fsync_dir(dir)?;
            fsync_dir(&dir.join("blobs"))?;
            if created {
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fsync_dir(parent)?;
                }
            }
        }
        Ok(durable)
    }

    /// The database, for reads and writes (which are durable after the next [`Durable::sync`]).
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// The directory of the database.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Makes every write that completed before this call durable (see the module doc for what is
    /// synced, in which order). Blocking: call it from a blocking thread in async code.
    pub fn sync(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let ticket = inner.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = inner.synced.lock().map_err(|_| Error::Poisoned)?;
        if synced.completed >= ticket {
            synced.stats.shared += 1;
            return Ok(());
        }
        // Every ticket up to here was taken after its writes: this sync covers them all.
        let covers = inner.requested.load(Ordering::SeqCst);
        inner.db.flush()?;
        if !inner.skip {
            let blob_dir = inner.dir.join("blobs");
            let blobs = entries(&blob_dir)?;
            let mut blobs_synced = 0;
            for name in blobs.difference(&synced.blobs) {
                if sync_file_if_present(&blob_dir.join(name))? {
                    blobs_synced += 1;
                }
            }
            synced.stats.blobs += blobs_synced;
            inner.data_file.sync_data().map_err(io("fdatasync", &inner.dir.join("db")))?;
            if blobs != synced.blobs {
                fsync_dir(&blob_dir)?;
                synced.stats.dirs += 1;
                synced.blobs = blobs;
            }
            let top = entries(&inner.dir)?;
            if top != synced.top {
                fsync_dir(&inner.dir)?;
                synced.stats.dirs += 1;
                synced.top = top;
            }
        }
        synced.completed = covers;
        synced.stats.syncs += 1;
        Ok(())
    }

    /// Counters since open.
    pub fn stats(&self) -> SyncStats {
        self.inner.synced.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Whether the syncs are switched off ([`SKIP_FSYNC_ENV`]).
    pub fn skips_syncs(&self) -> bool {
        self.inner.skip
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open(dir: &Path) -> Durable {
        Durable::open(&dir.join("db"), sled::Config::new()).unwrap()
    }

    #[test]
    fn what_was_synced_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = open(dir.path());
            d.db().insert(b"k", b"v".to_vec()).unwrap();
            d.db().insert(b"big", vec![7u8; 600 * 1024]).unwrap();
            d.sync().unwrap();
        }
        let d = open(dir.path());
        assert_eq!(d.db().get(b"k").unwrap().unwrap().as_ref(), b"v");
        assert_eq!(d.db().get(b"big").unwrap().unwrap().len(), 600 * 1024);
    }

    #[test]
    fn a_value_above_the_blob_threshold_has_its_blob_file_synced() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path());
        let before = d.stats();
        d.db().insert(b"big", vec![1u8; 300 * 1024]).unwrap();
        d.sync().unwrap();
        let after = d.stats();
        assert!(after.blobs > before.blobs, "no blob synced: {after:?}");
        assert!(after.dirs > before.dirs, "blobs/ not fsynced: {after:?}");
    }

    #[test]
    fn concurrent_callers_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..50u32 {
                        d.db().insert(format!("{t}/{i}"), i.to_be_bytes().to_vec()).unwrap();
                        d.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = d.stats();
        assert_eq!(s.syncs + s.shared, 400 + 1, "{s:?}");
        assert_eq!(d.db().len(), 400);
    }
}
