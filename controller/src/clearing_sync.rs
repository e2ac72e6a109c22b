//! Task `clearing-sync`: the leader uploads the station ledger to central clearing (SPEC §8).
//!
//! Only the leader uploads, from the replicated cursor (`clearing_acked_through` in the state
//! machine). After every `200 {acked_through}` the cursor is moved forward through Raft
//! ([`Request::ClearingAck`]), so a new leader resumes where the acknowledged point is and does
//! not send acknowledged records again. On becoming leader, and after any 409, the task asks
//! clearing for its watermark and reconciles:
//!
//! - clearing at the cursor: the hashes must agree, then upload from `cursor + 1`;
//! - clearing ahead of the cursor (an old leader's ack was lost with it): the hash of our entry at
//!   the watermark must match clearing's, then the cursor is advanced through Raft to it;
//! - clearing behind the cursor (it lost records it had acknowledged): an alarm (log, status,
//!   counter), never a silent skip; the records are sent again from the watermark if the ledger
//!   still holds them, otherwise the task stops uploading and keeps the alarm raised.
//!
//! While clearing is unreachable the task retries with exponential backoff; it never skips an
//! entry (every batch starts right after the previous one and its chain is checked before it is
//! sent). The task follows leadership through Raft's metrics and stops uploading as soon as the
//! node is no longer leader. Its state is a [`ClearingStatus`] snapshot, readable at any time from
//! a [`ClearingStatusHandle`] (the HTTP API's `clearing` view and `/metrics` read it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use afc_domain::backoff::Backoff;
use afc_domain::model::Timestamp;
use clearing::protocol::UploadBatch;
use clearing::{ClearingClient, ClearingError, ClientConfig, UploadOutcome};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::chain::{chain_hash, GENESIS_HASH};
use crate::clock::now;
use crate::config::{ClearingConfig, ConfigError};
use crate::node::{Node, NodeError};
use crate::state::{Request, Response};
use crate::storage::{StateMachineStore, StoreError};

/// The task's name in logs and status.
pub const TASK: &str = "clearing-sync";

/// Why an upload round stopped; the loop records it and retries after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("clearing: {0}")]
    Clearing(#[from] ClearingError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("raft write: {0}")]
    Node(#[from] NodeError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("the clearing acknowledgement was not applied: {0}")]
    AckRefused(String),
    #[error("clearing answered 200 with acked_through {acked} below the batch's last index {last}")]
    ShortAck { acked: u64, last: u64 },
    #[error("alarm: {0}")]
    Alarm(String),
}

/// What kind of inconsistency with clearing was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = ClearingAlarmKind)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// Clearing holds fewer records than it acknowledged (its watermark is below the cursor).
    ClearingBehind,
    /// Clearing's hash at an index differs from ours: the ledgers forked.
    HashMismatch,
    /// Clearing claims records beyond the end of our ledger.
    ClearingAheadOfLedger,
    /// Records clearing needs were already pruned here: uploading cannot go on.
    RecordsPruned,
    /// Clearing refuses us for a reason that will not pass by itself (token, verification).
    Refused,
}

/// A raised alarm, kept in the status until the task uploads successfully again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClearingAlarm {
    pub kind: AlarmKind,
    pub message: String,
    pub at: Timestamp,
}

/// A snapshot of the upload's state (SPEC §9 "clearing (cursor, backlog, last success, last
/// error)"). On a follower `leading` is false and the counters are those of its last leadership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClearingStatus {
    /// Whether a clearing URL is configured at all.
    pub enabled: bool,
    /// Whether this node is the leader and runs the upload now.
    pub leading: bool,
    /// The replicated cursor: every ledger entry up to here is acknowledged by clearing.
    pub cursor: u64,
    /// The last ledger index.
    pub last_index: u64,
    /// Entries not yet acknowledged (`last_index - cursor`).
    pub backlog: u64,
    /// Clearing's watermark as last asked.
    pub watermark: Option<u64>,
    pub last_success: Option<Timestamp>,
    pub last_error: Option<String>,
    pub last_error_at: Option<Timestamp>,
    /// The current alarm, if any (cleared by the next successful upload).
    pub alarm: Option<ClearingAlarm>,
    /// Alarms raised since this node started (a counter for `/metrics`; an alarm that persists
    /// across retries counts once).
    pub alarms_total: u64,
    /// Batches clearing acknowledged, and the records in them, since this node started.
    pub batches_acked: u64,
    pub records_acked: u64,
    /// 409 answers since this node started.
    pub conflicts: u64,
    /// Upload rounds that failed (clearing unreachable, refused, alarm), since this node started.
    pub errors_total: u64,
    /// Times the cursor was advanced to clearing's watermark (an acknowledgement lost in a failover).
    pub watermark_advances: u64,
    /// How long the task waits before its next attempt, while it backs off.
    pub retry_in_ms: Option<u64>,
    /// When this node's current leadership started uploading (None while not leading).
    #[serde(default)]
    pub leading_since: Option<Timestamp>,
    /// When the uploader last found nothing to upload (clearing held the whole ledger).
    #[serde(default)]
    pub caught_up_at: Option<Timestamp>,
    /// Sequence gaps clearing has stored (from its answers; re-learnt on each leadership).
    #[serde(default)]
    pub gaps_reported: u64,
    /// When clearing last answered that it has no gap endpoint (404/405, a clearing house built
    /// from SPEC §8 alone): gaps are not reported for 10 minutes, the ledger still is.
    #[serde(default)]
    pub gaps_unsupported_at: Option<Timestamp>,
    /// Closed business days clearing stored, since this node started.
    #[serde(default)]
    pub days_uploaded: u64,
    /// When clearing last answered that it has no day endpoint (404/405): closed days are not
    /// sent for 10 minutes, the ledger still is.
    #[serde(default)]
    pub days_unsupported_at: Option<Timestamp>,
    /// Days clearing holds another close of (409): not sent again by this node; an alarm.
    #[serde(default)]
    pub days_refused: Vec<String>,
}

/// Shared, cheap-to-clone access to the task's status.
#[derive(Clone)]
pub struct ClearingStatusHandle {
    inner: Arc<Mutex<ClearingStatus>>,
    sm: StateMachineStore,
}

impl ClearingStatusHandle {
    fn new(sm: StateMachineStore, enabled: bool) -> Self {
        let status = ClearingStatus { enabled, ..ClearingStatus::default() };
        ClearingStatusHandle { inner: Arc::new(Mutex::new(status)), sm }
    }

    /// The status now; cursor, last index and backlog are read from the local state machine.
    pub fn snapshot(&self) -> ClearingStatus {
        let mut s = self.inner.lock().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone());
        if let Ok(state) = self.sm.state() {
            s.cursor = state.clearing_acked_through;
            s.last_index = state.last_index();
            s.backlog = s.last_index.saturating_sub(s.cursor);
        }
        s
    }

    fn update(&self, f: impl FnOnce(&mut ClearingStatus)) {
        match self.inner.lock() {
            Ok(mut s) => f(&mut s),
            // A panic while updating a plain struct leaves it usable.
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn error(&self, e: &SyncError, retry_in: Duration) {
        let message = e.to_string();
        self.update(|s| {
            s.last_error = Some(message);
            s.last_error_at = Some(now());
            s.errors_total += 1;
            s.retry_in_ms = Some(u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX));
        });
    }

    fn alarm(&self, kind: AlarmKind, message: String) {
        tracing::error!(task = TASK, alarm = ?kind, %message, "clearing alarm");
        self.update(|s| {
            // A condition retried with backoff is one alarm, not one per attempt.
            if s.alarm.as_ref().is_none_or(|a| a.kind != kind) {
                s.alarms_total += 1;
            }
            s.alarm = Some(ClearingAlarm { kind, message, at: now() });
        });
    }
}

/// The running task: its status and its join handle (absent when clearing is not configured).
pub struct ClearingSync {
    pub status: ClearingStatusHandle,
    pub task: Option<JoinHandle<()>>,
}

/// Starts task `clearing-sync` if `[clearing] url` is set; it runs until `stop` is cancelled.
pub fn start(node: Arc<Node>, stop: CancellationToken) -> Result<ClearingSync, ConfigError> {
    let cfg = node.config.clearing.clone();
    let status = ClearingStatusHandle::new(node.sm.clone(), cfg.url.is_some());
    let Some(url) = cfg.url.clone() else {
        tracing::info!(task = TASK, "no [clearing] url configured: ledger upload disabled");
        return Ok(ClearingSync { status, task: None });
    };
    let client_cfg = ClientConfig {
        connect_timeout: node.config.connect_timeout().max(Duration::from_secs(1)),
        request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        upload_timeout: Duration::from_millis(cfg.upload_timeout_ms),
    };
    let client = ClearingClient::new(&url, &node.secrets.clearing_token()?, client_cfg)
        .map_err(|e| ConfigError::Invalid(format!("clearing.url: {e}")))?;
    let worker = Worker { node, client, cfg, status: status.clone() };
    let task = tokio::spawn(worker.run(stop));
    Ok(ClearingSync { status, task: Some(task) })
}

/// Where the next batch starts and the hash it must chain from.
#[derive(Debug, Clone, Copy)]
struct Position {
    next: u64,
    prev_hash: [u8; 32],
}

struct Worker {
    node: Arc<Node>,
    client: ClearingClient,
    cfg: ClearingConfig,
    status: ClearingStatusHandle,
}

impl Worker {
    async fn run(self, stop: CancellationToken) {
        tracing::info!(task = TASK, "started");
        let mut metrics = self.node.raft.metrics();
        loop {
            // Wait until this node leads.
            let term = loop {
                let (leading, term) = {
                    let m = metrics.borrow_and_update();
                    (m.state == ServerState::Leader && m.current_leader == Some(self.node.id), m.current_term)
                };
                if leading {
                    break term;
                }
                self.status.update(|s| s.leading = false);
                tokio::select! {
                    _ = stop.cancelled() => {
                        tracing::info!(task = TASK, "stopped");
                        return;
                    }
                    changed = metrics.changed() => if changed.is_err() {
                        tracing::warn!(task = TASK, "raft metrics closed: stopped");
                        return;
                    }
                }
            };
            self.status.update(|s| {
                s.leading = true;
                s.leading_since = Some(now());
            });
            tracing::info!(task = TASK, term, "leader: reconciling with clearing and uploading");
            let lost = leadership_lost(metrics.clone(), self.node.id, term);
            tokio::select! {
                _ = stop.cancelled() => {
                    self.status.update(|s| s.leading = false);
                    tracing::info!(task = TASK, "stopped");
                    return;
                }
                _ = lost => {
                    tracing::info!(task = TASK, term, "no longer leader: upload stops");
                }
                _ = self.lead() => {}
            }
            self.status.update(|s| {
                s.leading = false;
                s.retry_in_ms = None;
                s.leading_since = None;
            });
        }
    }

    /// Reconciles and uploads until the future is dropped (leadership lost or shutdown); every
    /// failure is recorded and retried after a backoff.
    async fn lead(&self) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.backoff_min_ms),
            Duration::from_millis(self.cfg.backoff_max_ms),
        );
        loop {
            let err = match self.reconcile().await {
                Ok(pos) => self.upload_from(pos, &mut backoff).await,
                Err(e) => e,
            };
            let wait = backoff.next_wait();
            match &err {
                SyncError::Clearing(e) if !e.is_retryable() => {
                    self.status.alarm(AlarmKind::Refused, e.to_string());
                }
                _ => {
                    tracing::warn!(task = TASK, error = %err, retry_in = ?wait, "clearing upload interrupted")
                }
            }
            self.status.error(&err, wait);
            tokio::time::sleep(wait).await;
        }
    }

    /// The hash of ledger entry `index` (genesis for 0), or `None` if it was pruned.
    fn hash_at(&self, index: u64) -> Result<Option<[u8; 32]>, SyncError> {
        if index == 0 {
            return Ok(Some(GENESIS_HASH));
        }
        let entries = self.node.sm.ledger_entries(index, 1)?;
        Ok(entries.first().filter(|e| e.index == index).map(|e| e.hash))
    }

    /// Moves the replicated cursor to `through` through Raft.
    async fn ack(&self, through: u64) -> Result<(), SyncError> {
        match self.node.write(Request::ClearingAck { through_index: through }, 0).await? {
            Response::ClearingAcked { .. } => Ok(()),
            other => Err(SyncError::AckRefused(format!("{other:?}"))),
        }
    }

    /// Asks clearing where it is and decides where to upload from (see the module docs).
    async fn reconcile(&self) -> Result<Position, SyncError> {
        // The state machine may lag the log right after an election: read the cursor only once it
        // has applied everything committed.
        self.node.raft.ensure_linearizable().await.map_err(|e| SyncError::Raft(e.to_string()))?;
        let state = self.node.sm.state()?;
        let (cursor, last) = (state.clearing_acked_through, state.last_index());
        let wm = self.client.watermark(&self.node.config.station).await?;
        self.status.update(|s| s.watermark = Some(wm.acked_through));
        let w = wm.acked_through;
        let alarm = |kind, message: String| {
            self.status.alarm(kind, message.clone());
            SyncError::Alarm(message)
        };
        if w > last {
            return Err(alarm(
                AlarmKind::ClearingAheadOfLedger,
                format!("clearing holds records through {w} but the station ledger ends at {last}"),
            ));
        }
        if w < cursor {
            self.status.alarm(
                AlarmKind::ClearingBehind,
                format!(
                    "clearing's watermark {w} is behind the acknowledged cursor {cursor}: re-sending from {}",
                    w + 1
                ),
            );
        }
        if wm.last_hash.is_none() {
            tracing::warn!(task = TASK, watermark = w, "clearing's watermark carries no last_hash: the fork check at the watermark is skipped (each batch still names its prev_hash)");
        }
        match (self.hash_at(w)?, wm.last_hash) {
            (Some(ours), Some(theirs)) if ours != theirs => Err(alarm(
                AlarmKind::HashMismatch,
                format!("clearing's hash at index {w} differs from the station ledger's: the ledgers forked"),
            )),
            (Some(ours), _) => {
                if w > cursor {
                    tracing::info!(
                        task = TASK,
                        cursor,
                        watermark = w,
                        "clearing is ahead of the cursor: advancing it"
                    );
                    self.ack(w).await?;
                    self.status.update(|s| s.watermark_advances += 1);
                }
                Ok(Position { next: w + 1, prev_hash: ours })
            }
            // Pruned here: only possible at or below the cursor. Clearing's hash is checked
            // against the next entry's chain before the first upload.
            (None, Some(theirs)) if w == cursor => Ok(Position { next: w + 1, prev_hash: theirs }),
            (None, _) => Err(alarm(
                AlarmKind::RecordsPruned,
                format!(
                    "clearing needs records from {} but the ledger keeps them only from {} (or clearing gave no hash to chain from)",
                    w + 1,
                    state.first_retained
                ),
            )),
        }
    }

    /// Reports the sequence gaps recorded since the last one clearing stored (none: no call).
    async fn report_gaps(&self) -> Result<(), SyncError> {
        let station = &self.node.config.station;
        let unsupported = self.status.snapshot().gaps_unsupported_at;
        if unsupported.is_some_and(|at| now().millis() - at.millis() < 10 * 60 * 1000) {
            return Ok(());
        }
        for _ in 0..1000 {
            let from = self.status.snapshot().gaps_reported + 1;
            let gaps = self.node.sm.gaps(from, 100)?;
            if gaps.is_empty() {
                return Ok(());
            }
            let answer = match self.client.report_gaps(station, &gaps).await {
                Err(
                    ClearingError::Refused { status: 404 | 405, .. }
                    | ClearingError::Unexpected { status: 404 | 405, .. },
                ) => {
                    tracing::warn!(task = TASK, "clearing has no gap endpoint: sequence gaps are not reported (the ledger is); asking again in 10 min");
                    self.status.update(|s| s.gaps_unsupported_at = Some(now()));
                    return Ok(());
                }
                other => other?,
            };
            match answer {
                UploadOutcome::Acked(through) if through >= from => {
                    tracing::warn!(task = TASK, through, "sequence gaps reported to clearing");
                    self.status.update(|s| s.gaps_reported = through);
                }
                UploadOutcome::Acked(through) => {
                    return Err(SyncError::ShortAck { acked: through, last: from });
                }
                // Clearing holds fewer (or more) gaps than we thought: resend from where it is.
                UploadOutcome::Conflict { expected_from } => {
                    if expected_from == 0 || expected_from == from {
                        return Err(SyncError::Alarm(format!(
                            "clearing refused gap {from} as not contiguous (expects {expected_from})"
                        )));
                    }
                    self.status.update(|s| s.gaps_reported = expected_from - 1);
                }
            }
        }
        Err(SyncError::Alarm("gap reporting did not settle in 1,000 rounds".into()))
    }

    /// Sends every closed business day clearing has not stored yet whose ledger records (through
    /// the close's `ledger_through`) clearing has acknowledged, and records each stored one
    /// through Raft ([`Request::DayUploaded`]), so a day closed while clearing was down goes
    /// once it is back, and a new leader sends what the old one did not.
    async fn send_days(&self) -> Result<(), SyncError> {
        let station = &self.node.config.station;
        let snap = self.status.snapshot();
        if snap.days_unsupported_at.is_some_and(|at| now().millis() - at.millis() < 10 * 60 * 1000) {
            return Ok(());
        }
        let state = self.node.sm.state()?;
        for day in state.days.iter().filter(|(_, m)| !m.uploaded).map(|(d, _)| d) {
            if snap.days_refused.contains(&day.to_string()) {
                continue;
            }
            let Some(close) = self.node.sm.day_close(*day)? else { continue };
            if close.ledger_through > state.clearing_acked_through {
                continue; // its records first
            }
            let record = serde_json::to_value(&close).map_err(|e| SyncError::Raft(e.to_string()))?;
            let body = clearing::protocol::DayClose { day: *day, record };
            match self.client.close_day(station, &body).await {
                Ok(Ok(stored)) => {
                    tracing::info!(task = TASK, day = %day, duplicate = stored.duplicate, "closed business day stored by clearing");
                    match self.node.write(Request::DayUploaded { day: *day }, 0).await? {
                        Response::DayUploaded { .. } => self.status.update(|s| s.days_uploaded += 1),
                        other => return Err(SyncError::AckRefused(format!("{other:?}"))),
                    }
                }
                Ok(Err(())) => {
                    let message = format!("clearing holds another close of business day {day}");
                    tracing::error!(task = TASK, %message);
                    self.status.update(|s| s.days_refused.push(day.to_string()));
                    self.status.alarm(AlarmKind::Refused, message);
                }
                Err(
                    ClearingError::Refused { status: 404 | 405, .. }
                    | ClearingError::Unexpected { status: 404 | 405, .. },
                ) => {
                    tracing::warn!(task = TASK, "clearing has no day endpoint: closed days are not sent (the ledger is); asking again in 10 min");
                    self.status.update(|s| s.days_unsupported_at = Some(now()));
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Uploads batches from `pos` until something fails; returns that failure.
    async fn upload_from(&self, mut pos: Position, backoff: &mut Backoff) -> SyncError {
        let station = &self.node.config.station;
        let poll = Duration::from_millis(self.cfg.poll_ms);
        loop {
            if let Err(e) = self.report_gaps().await {
                return e;
            }
            if let Err(e) = self.send_days().await {
                return e;
            }
            let entries = match self.node.sm.ledger_entries(pos.next, self.cfg.batch_records) {
                Ok(e) => e,
                Err(e) => return e.into(),
            };
            let Some(first) = entries.first() else {
                self.status.update(|s| s.caught_up_at = Some(now()));
                tokio::time::sleep(poll).await;
                continue;
            };
            if first.index != pos.next {
                let message =
                    format!("ledger entry {} is missing (next stored is {})", pos.next, first.index);
                self.status.alarm(AlarmKind::RecordsPruned, message.clone());
                return SyncError::Alarm(message);
            }
            if chain_hash(&pos.prev_hash, &first.record) != first.hash {
                let message = format!("ledger entry {} does not chain from clearing's hash", pos.next);
                self.status.alarm(AlarmKind::HashMismatch, message.clone());
                return SyncError::Alarm(message);
            }
            let count = entries.len() as u64;
            let Some(batch) = UploadBatch::new(pos.prev_hash, entries) else { continue };
            match self.client.upload(station, &batch).await {
                Ok(UploadOutcome::Acked(acked)) if acked == batch.last_index => {
                    if let Err(e) = self.ack(acked).await {
                        return e;
                    }
                    pos = Position { next: acked + 1, prev_hash: batch.last_hash };
                    backoff.reset();
                    self.status.update(|s| {
                        s.batches_acked += 1;
                        s.records_acked += count;
                        s.last_success = Some(now());
                        s.alarm = None;
                        s.retry_in_ms = None;
                    });
                }
                // Clearing already holds more than this batch: take its watermark (checked).
                Ok(UploadOutcome::Acked(acked)) if acked > batch.last_index => match self.reconcile().await {
                    Ok(p) => pos = p,
                    Err(e) => return e,
                },
                Ok(UploadOutcome::Acked(acked)) => {
                    return SyncError::ShortAck { acked, last: batch.last_index };
                }
                Ok(UploadOutcome::Conflict { expected_from }) => {
                    tracing::info!(
                        task = TASK,
                        sent_from = batch.first_index,
                        expected_from,
                        "409: reconciling"
                    );
                    self.status.update(|s| s.conflicts += 1);
                    match self.reconcile().await {
                        Ok(p) => pos = p,
                        Err(e) => return e,
                    }
                }
                Err(e) => return e.into(),
            }
        }
    }
}

/// Resolves once this node is no longer the leader of `term`.
async fn leadership_lost(
    mut metrics: tokio::sync::watch::Receiver<
        openraft::RaftMetrics<crate::types::NodeId, crate::types::Node>,
    >,
    id: crate::types::NodeId,
    term: u64,
) {
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.state != ServerState::Leader || m.current_leader != Some(id) || m.current_term != term {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
