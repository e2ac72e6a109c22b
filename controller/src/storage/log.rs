//! The Raft log and the vote, in the `log` and `meta` trees.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use afc_sled::Durable;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader};
use sled::Tree;

use super::{names, StoreError};
use crate::types::codec;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The log store. Cheap to clone: clones share the same trees (a clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    db: Durable,
    log: Tree,
    meta: Tree,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn write_err(e: StoreError) -> StorageError {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Write)
}

fn read_err(e: StoreError) -> StorageError {
    e.into_raft(ErrorSubject::Logs, ErrorVerb::Read)
}

impl LogStore {
    pub(crate) fn open(db: Durable) -> Result<LogStore, StoreError> {
        let log = db.db().open_tree(names::LOG)?;
        let meta = db.db().open_tree(names::META)?;
        Ok(LogStore { db, log, meta })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StoreError> {
        match self.meta.get(k)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, k: &[u8], v: &T) -> Result<(), StoreError> {
        self.meta.insert(k, serde_json::to_vec(v)?)?;
        Ok(())
    }

    /// True if no vote was ever saved and no entry ever appended.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get(names::VOTE)?.is_none()
            && self.log.is_empty()
            && self.meta.get(names::LAST_PURGED)?.is_none())
    }

    fn last_purged(&self) -> Result<Option<LogId>, StoreError> {
        self.get_meta(names::LAST_PURGED)
    }

    fn read_range(&self, start: u64, end_excl: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let iter = match end_excl {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => self.log.range(key(start)..key(end)),
            None => self.log.range(key(start)..),
        };
        let mut out = Vec::new();
        for kv in iter {
            let (_, v) = kv?;
            out.push(codec::decode_entry(&v)?);
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        super::sync(&self.db).await
    }

    fn remove_from(&self, first: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(key(first)..).keys() {
            batch.remove(k?);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Some(e.saturating_add(1)),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        self.read_range(start, end).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged().map_err(read_err)?;
        let last = match self.log.last().map_err(|e| read_err(e.into()))? {
            Some((_, v)) => {
                let e: Entry = codec::decode_entry(&v).map_err(|e| read_err(e.into()))?;
                Some(e.log_id)
            }
            None => None,
        };
        // Entries at or below the purge point may survive a crash mid-purge; they do not count.
        let last_log_id = match (last, last_purged_log_id) {
            (Some(l), Some(p)) if l.index <= p.index => Some(p),
            (Some(l), _) => Some(l),
            (None, p) => p,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let verr = |e: StoreError| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write);
        self.put_meta(names::VOTE, vote).map_err(verr)?;
        self.flush().await.map_err(verr)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(names::VOTE).map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced on purpose: a committed id older than the truth after a crash only means
        // fewer entries are re-applied at start; the state machine is synced on every apply.
        self.put_meta(names::COMMITTED, &committed).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(names::COMMITTED).map_err(read_err)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let v = codec::encode_entry(&entry).map_err(|e| write_err(e.into()))?;
            batch.insert(&key(entry.log_id.index), v);
        }
        self.log.apply_batch(batch).map_err(|e| write_err(e.into()))?;
        // The entries are readable now; report them durable only once they are on disk.
        let flushed = self.flush().await.map_err(std::io::Error::other);
        let failed = flushed.as_ref().err().map(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(flushed);
        match failed {
            Some(e) => Err(write_err(StoreError::Io(e))),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove_from(log_id.index).map_err(write_err)?;
        self.flush().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first (durably), then delete: a crash in between leaves stale
        // entries below the purge point, which get_log_state and the next purge ignore/remove.
        self.put_meta(names::LAST_PURGED, &log_id).map_err(write_err)?;
        self.flush().await.map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=key(log_id.index)).keys() {
            batch.remove(k.map_err(|e| write_err(e.into()))?);
        }
        self.log.apply_batch(batch).map_err(|e| write_err(e.into()))
    }
}
