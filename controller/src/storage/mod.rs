//! Durable storage: the only module that touches sled (so the engine could be swapped).
//!
//! One sled [`sled::Db`] per node, in `<data_dir>/db`, with these trees:
//! - `log`: Raft log entries keyed by big-endian index ([`log::LogStore`]);
//! - `meta`: the vote, the committed log id, the last purged log id, the name of the live state
//!   machine tree and the current snapshot's metadata;
//! - `sm-<n>`: the state machine ([`sm::StateMachineStore`]), one tree whose name is switched
//!   atomically when a snapshot is installed.
//!
//! Snapshots are files in `<data_dir>/snapshots` ([`snapshot`]), streamed to and from disk.
//!
//! Durability rules kept here: "synced" means [`afc_sled::Durable::sync`] (sled's flush, then
//! `fdatasync` of its blob files and data file and `fsync` of its directories: sled's own flush
//! survives a crash but not a power cut). `append` reports entries only once synced; `save_vote`,
//! `truncate` and the purge point are synced before returning; `apply` writes the applied data and
//! `last_applied` in one atomic batch and syncs it before returning; an entry at or below
//! `last_applied` is skipped.
//! Concurrent syncs share one (group commit), so appends and applies of different batches
//! coalesce into one `fdatasync`.

pub mod log;
pub mod sm;
pub mod snapshot;

use std::path::{Path, PathBuf};

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};

pub use log::LogStore;
pub use sm::StateMachineStore;

use crate::types::{NodeId, StorageError};

/// Tree and key names.
pub(crate) mod names {
    pub const LOG: &str = "log";
    pub const META: &str = "meta";
    pub const SM_PREFIX: &str = "sm-";
    pub const VOTE: &[u8] = b"vote";
    pub const COMMITTED: &[u8] = b"committed";
    pub const LAST_PURGED: &[u8] = b"last_purged";
    pub const SM_TREE: &[u8] = b"sm_tree";
    pub const SNAPSHOT: &[u8] = b"snapshot";
}

/// What can go wrong under the storage boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("sync: {0}")]
    Sync(#[from] afc_sled::Error),
    #[error("encoding: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("log entry encoding: {0}")]
    Entry(#[from] crate::types::codec::CodecError),
    #[error("file: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("state machine: {0}")]
    State(#[from] crate::state::ReadError),
    #[error("background task failed: {0}")]
    Join(String),
}

impl StoreError {
    pub(crate) fn into_raft(self, subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> StorageError {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// Opens (or creates) the store in `data_dir`; returns the log store and the state machine, which
/// share one sled database.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    std::fs::create_dir_all(data_dir)?;
    let db =
        afc_sled::Durable::open(&data_dir.join("db"), sled::Config::new().mode(sled::Mode::HighThroughput))?;
    let log = LogStore::open(db.clone())?;
    let sm = StateMachineStore::open(db, snapshot_dir(data_dir))?;
    Ok((log, sm))
}

/// Makes every write so far durable ([`afc_sled::Durable::sync`]) on a blocking thread.
pub(crate) async fn sync(db: &afc_sled::Durable) -> Result<(), StoreError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.sync()).await.map_err(|e| StoreError::Join(e.to_string()))??;
    Ok(())
}

fn snapshot_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// Whether the store in `data_dir` has ever held Raft state (a vote, a log entry or an applied
/// entry): bootstrap is refused unless this is false.
pub fn is_empty(log: &LogStore, sm: &StateMachineStore) -> Result<bool, StoreError> {
    Ok(log.is_empty()? && sm.last_applied().is_none())
}
