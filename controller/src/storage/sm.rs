//! The state machine on sled: applies entries with [`crate::state`], builds and installs
//! snapshots, and serves reads to the rest of the controller.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use afc_domain::model::ParamKind;
use afc_sled::Durable;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot};
use serde::{Deserialize, Serialize};
use sled::Tree;

use super::snapshot::{SnapshotReader, SnapshotWriter};
use super::{names, StoreError};
use crate::chain::LedgerEntry;
use crate::state::{
    decode_ledger_entry, keys, AuditEntry, KeyConflict, LedgerRead, ReadError, Request, Response,
    SequenceGap, StationState, Write,
};
use crate::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// Items per sled batch when loading a snapshot.
const INSTALL_BATCH: usize = 10_000;

/// The current snapshot: its metadata and its file name in the snapshot directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    file: String,
}

/// The live state machine tree and the small state that goes with it.
struct Live {
    tree_name: String,
    tree: Tree,
    state: StationState,
}

struct Inner {
    db: Durable,
    meta: Tree,
    snapshot_dir: PathBuf,
    live: RwLock<Live>,
    /// Serialises apply and install (the store is shared with readers, so `&mut self` is not
    /// enough to exclude a second writer).
    writer: tokio::sync::Mutex<()>,
    /// Held (shared) by a snapshot build, taken (exclusive) by an apply that deletes items, so a
    /// snapshot streams a consistent view without copying the ledger.
    delete_gate: Arc<tokio::sync::RwLock<()>>,
    /// Serialises changes to the current-snapshot record and its files.
    snapshot_record: tokio::sync::Mutex<()>,
}

/// The state machine store. Clones share the same state; the application keeps one for reads.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

fn sm_err(verb: ErrorVerb) -> impl Fn(StoreError) -> StorageError {
    move |e| e.into_raft(ErrorSubject::StateMachine, verb)
}

fn snap_err(verb: ErrorVerb) -> impl Fn(StoreError) -> StorageError {
    move |e| e.into_raft(ErrorSubject::Snapshot(None), verb)
}

fn lock_err<T>(_: T) -> StoreError {
    StoreError::Corrupt("a lock was poisoned by a panic".into())
}

/// Reads ledger entries from a tree (for `Prune`).
struct TreeReader<'a>(&'a Tree);

impl LedgerRead for TreeReader<'_> {
    fn ledger_entry(&self, index: u64) -> Result<Option<LedgerEntry>, ReadError> {
        let v = self.0.get(keys::ledger(index)).map_err(|e| ReadError::Storage(e.to_string()))?;
        v.map(|v| decode_ledger_entry(index, &v)).transpose()
    }

    fn tx_index(&self, key: &[u8]) -> Result<Option<u64>, ReadError> {
        let v = self.0.get(key).map_err(|e| ReadError::Storage(e.to_string()))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes))
    }

    fn package_piece(&self, upload: u64, index: u32) -> Result<Option<Vec<u8>>, ReadError> {
        let v = self.0.get(keys::piece(upload, index)).map_err(|e| ReadError::Storage(e.to_string()))?;
        Ok(v.map(|v| v.to_vec()))
    }
}

/// Whether applying `req` may delete items (a snapshot build must not see that half done).
fn may_delete(req: &Request) -> bool {
    matches!(req, Request::Prune { .. } | Request::PutPackagePiece { .. } | Request::CommitPackage { .. })
}

/// The index in a ledger item's key.
fn ledger_index(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("ledger key of {} bytes", key.len())))
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl StateMachineStore {
    pub(crate) fn open(durable: Durable, snapshot_dir: PathBuf) -> Result<StateMachineStore, StoreError> {
        let db = durable.db();
        if !snapshot_dir.exists() {
            std::fs::create_dir_all(&snapshot_dir)?;
            if let Some(parent) = snapshot_dir.parent() {
                fsync_dir(parent)?;
            }
        }
        let meta = db.open_tree(names::META)?;
        let tree_name = match meta.get(names::SM_TREE)? {
            Some(v) => String::from_utf8(v.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => {
                let name = format!("{}0", names::SM_PREFIX);
                meta.insert(names::SM_TREE, name.as_bytes())?;
                durable.sync()?;
                name
            }
        };
        // Trees left by an install that crashed before switching over.
        for name in db.tree_names() {
            let s = String::from_utf8_lossy(&name);
            if s.starts_with(names::SM_PREFIX) && s != tree_name {
                db.drop_tree(&name)?;
            }
        }
        let tree = db.open_tree(&tree_name)?;
        let state = match tree.get(keys::STATE)? {
            Some(v) => serde_json::from_slice(&v)?,
            None => StationState::default(),
        };
        let current: Option<CurrentSnapshot> = match meta.get(names::SNAPSHOT)? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        };
        // Files left by a build or install that crashed before being recorded.
        for f in std::fs::read_dir(&snapshot_dir)? {
            let f = f?;
            let name = f.file_name().to_string_lossy().into_owned();
            if current.as_ref().is_none_or(|c| c.file != name) {
                std::fs::remove_file(f.path())?;
            }
        }
        let inner = Inner {
            db: durable.clone(),
            meta,
            snapshot_dir,
            live: RwLock::new(Live { tree_name, tree, state }),
            writer: tokio::sync::Mutex::new(()),
            delete_gate: Arc::new(tokio::sync::RwLock::new(())),
            snapshot_record: tokio::sync::Mutex::new(()),
        };
        Ok(StateMachineStore { inner: Arc::new(inner) })
    }

    /// A copy of the small state (heads, gates, packages, modes, cursor).
    pub fn state(&self) -> Result<StationState, StoreError> {
        Ok(self.inner.live.read().map_err(lock_err)?.state.clone())
    }

    /// The waiting rollout requests as `(kind, version, ready, stored)` (`stored`: the package
    /// of that version is in the state): a cheap read (the whole state is not cloned) for the
    /// rollout driver to notice at once a request it can start.
    pub fn rollout_requests(&self) -> Vec<(afc_domain::model::ParamKind, u64, bool, bool)> {
        self.inner.live.read().map_or_else(
            |_| Vec::new(),
            |l| {
                let s = &l.state;
                s.rollouts
                    .requests
                    .iter()
                    .map(|(k, q)| {
                        let stored =
                            s.packages.get(k.as_str()).is_some_and(|p| p.versions.contains(&q.to_version));
                        (*k, q.to_version, q.ready(), stored)
                    })
                    .collect()
            },
        )
    }

    pub fn last_applied(&self) -> Option<LogId> {
        self.inner.live.read().ok().and_then(|l| l.state.last_applied)
    }

    fn tree(&self) -> Result<Tree, StoreError> {
        Ok(self.inner.live.read().map_err(lock_err)?.tree.clone())
    }

    /// Up to `limit` ledger entries from index `from` on.
    pub fn ledger_entries(&self, from: u64, limit: usize) -> Result<Vec<LedgerEntry>, StoreError> {
        let tree = self.tree()?;
        let end = keys::ledger(u64::MAX);
        let mut out = Vec::new();
        for kv in tree.range(keys::ledger(from)..end).take(limit) {
            let (k, v) = kv?;
            out.push(decode_ledger_entry(ledger_index(&k)?, &v)?);
        }
        Ok(out)
    }

    /// Up to `limit` recorded sequence gaps from id `from` on.
    pub fn gaps(&self, from: u64, limit: usize) -> Result<Vec<SequenceGap>, StoreError> {
        self.json_items(keys::gap(from), keys::gap(u64::MAX), limit)
    }

    /// Up to `limit` kept key conflicts from id `from` on.
    pub fn conflicts(&self, from: u64, limit: usize) -> Result<Vec<KeyConflict>, StoreError> {
        self.json_items(keys::conflict(from), keys::conflict(u64::MAX), limit)
    }

    fn json_items<T: serde::de::DeserializeOwned>(
        &self,
        from: [u8; 9],
        to: [u8; 9],
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        let tree = self.tree()?;
        let mut out = Vec::new();
        for kv in tree.range(from..to).take(limit) {
            let (_, v) = kv?;
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    /// Every gate's counter readings, each gate's in time order ([`crate::day`]).
    pub fn counter_readings(
        &self,
    ) -> Result<
        std::collections::BTreeMap<afc_domain::model::Ident, Vec<crate::day::CounterReading>>,
        StoreError,
    > {
        let tree = self.tree()?;
        let mut out: std::collections::BTreeMap<_, Vec<crate::day::CounterReading>> = Default::default();
        for kv in tree.scan_prefix([keys::READING_PREFIX]) {
            let (_, v) = kv?;
            let r: crate::day::CounterReading = serde_json::from_slice(&v)?;
            out.entry(r.gate.clone()).or_default().push(r);
        }
        Ok(out)
    }

    /// The stored close of a business day.
    pub fn day_close(
        &self,
        day: afc_domain::model::Date,
    ) -> Result<Option<crate::day::DayClose>, StoreError> {
        match self.tree()?.get(keys::day(day))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` audit lines from sequence `from` on.
    pub fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let tree = self.tree()?;
        let mut out = Vec::new();
        for kv in tree.range(keys::audit(from)..keys::audit(u64::MAX)).take(limit) {
            let (_, v) = kv?;
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    /// A stored package body.
    pub fn package(&self, kind: ParamKind, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree()?.get(keys::package(kind, version))?.map(|v| v.to_vec()))
    }

    fn current_snapshot(&self) -> Result<Option<CurrentSnapshot>, StoreError> {
        match self.inner.meta.get(names::SNAPSHOT)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Records `file` as the current snapshot unless a newer one is already recorded; removes the
    /// file that is no longer current. Returns whether `file` became current.
    async fn record_snapshot(&self, meta: &SnapshotMeta, file: &str) -> Result<bool, StoreError> {
        let _g = self.inner.snapshot_record.lock().await;
        let previous = self.current_snapshot()?;
        if let Some(p) = &previous {
            if p.meta.last_log_id > meta.last_log_id {
                std::fs::remove_file(self.inner.snapshot_dir.join(file))?;
                return Ok(false);
            }
        }
        let rec = CurrentSnapshot { meta: meta.clone(), file: file.to_owned() };
        self.inner.meta.insert(names::SNAPSHOT, serde_json::to_vec(&rec)?)?;
        super::sync(&self.inner.db).await?;
        if let Some(p) = previous.filter(|p| p.file != file) {
            // Open handles (a transfer in progress) keep reading the unlinked file.
            let _ = std::fs::remove_file(self.inner.snapshot_dir.join(p.file));
        }
        Ok(true)
    }

    async fn apply_entries(&self, entries: Vec<Entry>) -> Result<Vec<Response>, StoreError> {
        let _w = self.inner.writer.lock().await;
        let deletes = entries.iter().any(|e| matches!(&e.payload, EntryPayload::Normal(r) if may_delete(r)));
        let _gate = if deletes { Some(self.inner.delete_gate.write().await) } else { None };
        let (tree, mut state) = {
            let live = self.inner.live.read().map_err(lock_err)?;
            (live.tree.clone(), live.state.clone())
        };
        let mut writes: Vec<Write> = Vec::new();
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            if state.last_applied.is_some_and(|la| entry.log_id.index <= la.index) {
                // Already applied before a restart: applying it again must change nothing.
                responses.push(Response::None);
                continue;
            }
            let resp = match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Membership(m) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::None
                }
                EntryPayload::Normal(req) => {
                    // Reads of items written earlier in this batch go through an overlay of the
                    // pending writes (`state::pending`): the tree is written once, atomically
                    // with `last_applied`, so a crash re-applies the whole batch from the log.
                    state.apply(&req, &TreeReader(&tree), &mut writes)?
                }
            };
            state.last_applied = Some(entry.log_id);
            responses.push(resp);
        }
        let mut batch = to_batch(writes);
        batch.insert(keys::STATE, serde_json::to_vec(&state)?);
        // One atomic batch: the data and `last_applied` are durable together or not at all, and
        // synced before the apply returns (so before a gate is acked on it). The sync is shared
        // with concurrent appends (one sled database, group commit in `afc_sled`).
        tree.apply_batch(batch)?;
        super::sync(&self.inner.db).await?;
        self.inner.live.write().map_err(lock_err)?.state = state;
        Ok(responses)
    }

    async fn install(&self, meta: &SnapshotMeta, snapshot: tokio::fs::File) -> Result<(), StoreError> {
        let _w = self.inner.writer.lock().await;
        let mut src = snapshot.into_std().await;
        let this = self.clone();
        let meta = meta.clone();
        let (new_name, new_tree, state, file) = tokio::task::spawn_blocking(move || {
            let inner = &this.inner;
            // Keep our own copy of the received file: it becomes the current snapshot.
            let file = format!(
                "snap-{}-{}",
                meta.last_log_id.map(|l| l.index).unwrap_or(0),
                crate::clock::now_nanos()
            );
            let tmp = inner.snapshot_dir.join(format!("{file}.tmp"));
            src.seek(SeekFrom::Start(0))?;
            {
                let mut dst = std::fs::File::create(&tmp)?;
                std::io::copy(&mut src, &mut dst)?;
                dst.sync_all()?;
            }
            let mut reader = SnapshotReader::open(std::fs::File::open(&tmp)?)?;
            if reader.meta.last_log_id != meta.last_log_id {
                return Err(StoreError::Corrupt(format!(
                    "snapshot file is for {:?}, expected {:?}",
                    reader.meta.last_log_id, meta.last_log_id
                )));
            }
            let state: StationState = serde_json::from_slice(&reader.state_json)?;
            let live_name = inner.live.read().map_err(lock_err)?.tree_name.clone();
            let n: u64 = live_name.trim_start_matches(names::SM_PREFIX).parse().unwrap_or(0);
            let new_name = format!("{}{}", names::SM_PREFIX, n + 1);
            inner.db.db().drop_tree(&new_name)?;
            let tree = inner.db.db().open_tree(&new_name)?;
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            while let Some((k, v)) = reader.next_item()? {
                batch.insert(k, v);
                in_batch += 1;
                if in_batch == INSTALL_BATCH {
                    tree.apply_batch(std::mem::take(&mut batch))?;
                    in_batch = 0;
                }
            }
            batch.insert(keys::STATE, reader.state_json.clone());
            tree.apply_batch(batch)?;
            std::fs::rename(&tmp, inner.snapshot_dir.join(&file))?;
            fsync_dir(&inner.snapshot_dir)?;
            Ok::<_, StoreError>((new_name, tree, state, file))
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))??;

        // Switch over: one atomic write of the tree pointer and the snapshot record, then flush.
        let (old_name, old_file) = {
            let _g = self.inner.snapshot_record.lock().await;
            let old_file = self.current_snapshot()?.map(|c| c.file);
            let rec = CurrentSnapshot { meta: meta.clone(), file: file.clone() };
            let mut b = sled::Batch::default();
            b.insert(names::SM_TREE, new_name.as_bytes());
            b.insert(names::SNAPSHOT, serde_json::to_vec(&rec)?);
            self.inner.meta.apply_batch(b)?;
            super::sync(&self.inner.db).await?;
            let old_name = {
                let mut live = self.inner.live.write().map_err(lock_err)?;
                let old = std::mem::replace(&mut live.tree_name, new_name);
                live.tree = new_tree;
                live.state = state;
                old
            };
            (old_name, old_file)
        };
        self.inner.db.db().drop_tree(old_name.as_bytes())?;
        super::sync(&self.inner.db).await?;
        if let Some(f) = old_file.filter(|f| *f != file) {
            let _ = std::fs::remove_file(self.inner.snapshot_dir.join(f));
        }
        tracing::info!(snapshot = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }
}

fn to_batch(writes: Vec<Write>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for w in writes {
        match w {
            Write::Put(k, v) => batch.insert(k, v),
            Write::Delete(k) => batch.remove(k),
        }
    }
    batch
}

/// Builds a snapshot from a consistent view: the small state as of the request, and the
/// immutable items it refers to (deletions wait on the gate this builder holds).
pub struct SnapshotBuilder {
    store: StateMachineStore,
    tree: Tree,
    state: StationState,
    _gate: tokio::sync::OwnedRwLockReadGuard<()>,
}

/// Streams the state and the items it refers to into `path`.
fn write_snapshot_file(
    tree: &Tree,
    s: &StationState,
    meta: &SnapshotMeta,
    path: &Path,
) -> Result<(), StoreError> {
    let mut w = SnapshotWriter::create(path, meta, &serde_json::to_vec(s)?)?;
    let ranges = [
        (keys::ledger(s.first_retained), keys::ledger(s.next_index)),
        (keys::audit(1), keys::audit(s.next_audit)),
    ];
    for (from, to) in ranges {
        for kv in tree.range(from..to) {
            let (k, v) = kv?;
            w.item(&k, &v)?;
        }
    }
    for prefix in keys::WHOLE_PREFIXES {
        for kv in tree.scan_prefix([prefix]) {
            let (k, v) = kv?;
            w.item(&k, &v)?;
        }
    }
    for (upload, u) in &s.uploads {
        for index in 0..u.pieces {
            let k = keys::piece(*upload, index);
            let v = tree
                .get(k)?
                .ok_or_else(|| StoreError::Corrupt(format!("piece {index} of upload {upload} missing")))?;
            w.item(&k, &v)?;
        }
    }
    for (name, held) in &s.packages {
        let Some(kind) = ParamKind::parse(name) else { continue };
        for version in &held.versions {
            let k = keys::package(kind, *version);
            let v = tree
                .get(k)?
                .ok_or_else(|| StoreError::Corrupt(format!("package {name} v{version} missing")))?;
            w.item(&k, &v)?;
        }
    }
    w.finish()
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let index = self.state.last_applied.map(|l| l.index).unwrap_or(0);
        let file = format!("snap-{index}-{}", crate::clock::now_nanos());
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.last_membership.clone(),
            snapshot_id: file.clone(),
        };
        let dir = self.store.inner.snapshot_dir.clone();
        let tmp = dir.join(format!("{file}.tmp"));
        let path = dir.join(&file);
        let (tree, state, m, p) = (self.tree.clone(), self.state.clone(), meta.clone(), path.clone());
        let built = tokio::task::spawn_blocking(move || {
            write_snapshot_file(&tree, &state, &m, &tmp)?;
            std::fs::rename(&tmp, &p)?;
            fsync_dir(&dir)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()));
        built.and_then(|r| r).map_err(snap_err(ErrorVerb::Write))?;
        let handle = tokio::fs::File::open(&path).await.map_err(|e| snap_err(ErrorVerb::Read)(e.into()))?;
        self.store.record_snapshot(&meta, &file).await.map_err(snap_err(ErrorVerb::Write))?;
        tracing::info!(snapshot = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(handle) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let live = self.inner.live.read().map_err(|e| sm_err(ErrorVerb::Read)(lock_err(e)))?;
        Ok((live.state.last_applied, live.state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_entries(entries.into_iter().collect()).await.map_err(sm_err(ErrorVerb::Write))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let gate = self.inner.delete_gate.clone().read_owned().await;
        // A poisoned lock means a panic elsewhere already; the snapshot then has the default state
        // and fails verification nowhere, so fall back to reading through the poison.
        let (tree, state) = match self.inner.live.read() {
            Ok(l) => (l.tree.clone(), l.state.clone()),
            Err(p) => {
                let l = p.into_inner();
                (l.tree.clone(), l.state.clone())
            }
        };
        SnapshotBuilder { store: self.clone(), tree, state, _gate: gate }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        // An unlinked temporary file: nothing to clean up if the transfer is abandoned.
        let f = tempfile::tempfile_in(&self.inner.snapshot_dir)
            .map_err(|e| snap_err(ErrorVerb::Write)(StoreError::Io(e)))?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        self.install(meta, *snapshot).await.map_err(snap_err(ErrorVerb::Write))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.current_snapshot().map_err(snap_err(ErrorVerb::Read))?;
        let Some(c) = current else { return Ok(None) };
        let f = tokio::fs::File::open(self.inner.snapshot_dir.join(&c.file))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read)(e.into()))?;
        Ok(Some(Snapshot { meta: c.meta, snapshot: Box::new(f) }))
    }
}

impl StateMachineStore {
    /// Syncs everything to disk (used at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        super::sync(&self.inner.db).await
    }
}
