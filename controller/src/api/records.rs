//! Health, the ledger (entries, stats, chain verification), clearing progress and the audit log.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller};
use crate::chain::{verify_chain, GENESIS_HASH};

/// The ledger scans this node runs at once (`api.max_concurrent_scans`). A verification reads the
/// whole retained ledger and a search up to [`MAX_SCAN`] entries, each on a blocking thread: without
/// a bound, a viewer token (or a console left polling) could keep every blocking thread and the
/// disk busy. A scan waits up to `api.scan_wait_ms` for a slot, then answers 503 `busy` with
/// `Retry-After`, counted in `afc_api_scans_refused_total`.
#[derive(Debug)]
pub struct ScanLimit {
    permits: Arc<Semaphore>,
    /// The semaphore's size, for the refusal's message.
    limit: usize,
    wait: Duration,
}

/// `Retry-After` of a refused scan.
pub const SCAN_RETRY_AFTER_SECS: u64 = 1;

impl ScanLimit {
    pub fn new(api: &crate::config::ApiConfig) -> ScanLimit {
        let limit = api.max_concurrent_scans.max(1);
        ScanLimit {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            wait: Duration::from_millis(api.scan_wait_ms),
        }
    }

    /// A slot for one `scan` (one of [`crate::metrics::SCANS`]), held until the permit drops: move
    /// it into the blocking task, so a scan whose client went away still counts until it ends.
    pub(super) async fn acquire(
        &self,
        state: &ApiState,
        scan: &str,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) => match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => Ok(p),
                // Timed out (or closed, which never happens: nothing closes it).
                _ => Err(()),
            },
        };
        permit.map_err(|()| {
            state.metrics.scan_refused(scan);
            ApiError::Busy {
                what: format!("ledger {scan}: {} scans already running", self.limit),
                retry_after_secs: SCAN_RETRY_AFTER_SECS,
            }
        })
    }
}

/// Most entries one page returns.
pub const MAX_PAGE: usize = 1000;

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthOut {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz` when ready.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyOut {
    /// Always `ready`.
    pub status: String,
    /// The leader this node knows.
    #[schema(value_type = u64)]
    pub leader: crate::types::NodeId,
}

pub async fn healthz(_c: Caller) -> HttpResponse {
    HttpResponse::Ok().json(HealthOut { status: "ok".into() })
}

pub async fn readyz(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    // A node whose Raft core stopped still remembers its last leader: it is not ready.
    if let Some(f) = state.node.fatal() {
        return Err(ApiError::RaftStopped { reason: f.reason, error: f.error });
    }
    let leader = state.node.raft.metrics().borrow().current_leader;
    match leader {
        Some(l) => Ok(HttpResponse::Ok().json(ReadyOut { status: "ready".into(), leader: l })),
        None => Err(ApiError::NoLeader("this node knows no leader".into())),
    }
}

/// The query of the paged lists (ledger, gaps, conflicts, audit).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// First index (or id) returned (default: the first; audit: the latest `limit` lines).
    pub from: Option<u64>,
    /// Most items returned (default 100, at most 1000).
    pub limit: Option<usize>,
}

pub async fn ledger(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    let from = q.from.unwrap_or(1);
    Ok(HttpResponse::Ok().json(state.node.sm.ledger_entries(from, limit)?))
}

/// Most ledger entries one search request reads before it answers with `next_from`.
pub const MAX_SCAN: usize = 20_000;

/// `GET /api/v1/ledger/search`: filters over the retained ledger, in ledger-index order.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Search {
    /// First ledger index to look at (default: the first retained); continue with `next_from`.
    pub from: Option<u64>,
    /// Most entries returned (default 100, at most [`MAX_PAGE`]).
    pub limit: Option<usize>,
    /// `occurred_at` at or after this time (ms since the epoch, UTC).
    pub since_ms: Option<i64>,
    /// `occurred_at` before this time (ms since the epoch, UTC).
    pub until_ms: Option<i64>,
    /// Only this gate's transactions.
    pub gate: Option<String>,
    /// Only this card, ticket or account id (the record's `id`), with `media` if ids may collide.
    pub card: Option<u64>,
    /// `svc`, `qr` or `token`.
    #[param(inline)]
    pub media: Option<afc_domain::model::Media>,
}

/// One page of a ledger search.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchPage {
    pub entries: Vec<crate::chain::LedgerEntry>,
    /// Where to continue (`from=`), or `None` when the whole retained ledger was searched.
    pub next_from: Option<u64>,
    /// Ledger entries read for this page.
    pub scanned: u64,
}

pub async fn ledger_search(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<Search>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    if let (Some(a), Some(b)) = (q.since_ms, q.until_ms) {
        if a >= b {
            return Err(ApiError::BadRequest("since_ms must be before until_ms".into()));
        }
    }
    let gate = match &q.gate {
        Some(g) => Some(
            afc_domain::model::Ident::new(g).map_err(|e| ApiError::BadRequest(format!("gate {g:?}: {e}")))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let sm = state.node.sm.clone();
    let first = sm.state()?.first_retained.max(1);
    let permit = state.scans.acquire(&state, "search").await?;
    let page = tokio::task::spawn_blocking(move || -> Result<SearchPage, ApiError> {
        let _permit = permit;
        let mut next = q.from.unwrap_or(first).max(first);
        let mut out = SearchPage { entries: Vec::new(), next_from: None, scanned: 0 };
        loop {
            let chunk = sm.ledger_entries(next, 1000)?;
            let Some(last) = chunk.last().map(|e| e.index) else { return Ok(out) };
            for e in chunk {
                out.scanned += 1;
                next = e.index + 1;
                let r = &e.record;
                let keep = q.since_ms.is_none_or(|t| r.occurred_at.millis() >= t)
                    && q.until_ms.is_none_or(|t| r.occurred_at.millis() < t)
                    && gate.as_ref().is_none_or(|g| &r.gate == g)
                    && q.card.is_none_or(|c| r.id == c)
                    && q.media.is_none_or(|m| r.media == m);
                if keep {
                    out.entries.push(e);
                }
                if out.entries.len() >= limit || out.scanned >= MAX_SCAN as u64 {
                    // More may follow: the caller continues at `next_from`.
                    out.next_from = Some(next);
                    return Ok(out);
                }
            }
            next = last + 1;
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(page))
}

/// `GET /api/v1/ledger/stats` and the ledger part of `GET /api/v1/clearing`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LedgerStats {
    pub first_retained: u64,
    pub last_index: u64,
    pub records_stored: u64,
    pub last_hash: String,
    pub clearing_acked_through: u64,
    /// Entries not yet acknowledged by central clearing.
    pub clearing_backlog: u64,
    pub gates_registered: usize,
    /// Sequence gaps recorded (`GET /api/v1/ledger/gaps`); any is an alarm.
    pub sequence_gaps: u64,
    /// Records refused for a key held with other content (`GET /api/v1/ledger/conflicts`).
    pub key_conflicts: u64,
}

pub fn stats(state: &ApiState) -> Result<LedgerStats, ApiError> {
    let s = state.node.sm.state()?;
    Ok(LedgerStats {
        first_retained: s.first_retained,
        last_index: s.last_index(),
        records_stored: s.ledger_len(),
        last_hash: hex::encode(s.last_hash),
        clearing_acked_through: s.clearing_acked_through,
        clearing_backlog: s.last_index().saturating_sub(s.clearing_acked_through),
        gates_registered: s.gates.len(),
        sequence_gaps: s.gaps,
        key_conflicts: s.conflicts,
    })
}

pub async fn ledger_stats(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(stats(&state)?))
}

/// `GET /api/v1/ledger/verify`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyOut {
    /// The retained ledger chains and ends at the state's head.
    pub ok: bool,
    /// Entries checked.
    pub checked: u64,
    /// The range walked (absent when the walk stopped at a broken or missing entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_index: Option<u64>,
    /// What is wrong, or null.
    pub error: Option<String>,
}

/// Walks the retained ledger page by page: contiguous indexes, each hash following from its record
/// and predecessor, the last equal to the state's head. Entry 1 chains from the genesis hash; after
/// a prune, the first retained entry's own hash is the starting point.
pub async fn ledger_verify(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.node.sm.state()?;
    let sm = state.node.sm.clone();
    let permit = state.scans.acquire(&state, "verify").await?;
    let failed = |checked: u64, error: String| VerifyOut {
        ok: false,
        checked,
        first_index: None,
        last_index: None,
        error: Some(error),
    };
    let result = tokio::task::spawn_blocking(move || -> Result<VerifyOut, ApiError> {
        let _permit = permit;
        let mut next = s.first_retained;
        let mut prev = GENESIS_HASH;
        let mut checked = 0u64;
        while next <= s.last_index() {
            let mut page = sm.ledger_entries(next, 10_000)?;
            page.retain(|e| e.index <= s.last_index());
            if page.is_empty() {
                return Ok(failed(checked, format!("entry {next} is missing")));
            }
            if next == s.first_retained && next > 1 {
                // The predecessor was pruned: trust the first retained hash and check from there.
                prev = page[0].hash;
                checked += 1;
                next += 1;
                page.remove(0);
                if page.is_empty() {
                    continue;
                }
            }
            match verify_chain(prev, next, &page) {
                Ok(h) => {
                    prev = h;
                    checked += page.len() as u64;
                    next += page.len() as u64;
                }
                Err(e) => return Ok(failed(checked, e.to_string())),
            }
        }
        let head_ok = s.last_index() == 0 || prev == s.last_hash;
        Ok(VerifyOut {
            ok: head_ok,
            checked,
            first_index: Some(s.first_retained),
            last_index: Some(s.last_index()),
            error: (!head_ok).then(|| "the last entry's hash is not the state's head".to_owned()),
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(result))
}

/// The clearing lag of `status` now, with this node's `clearing.lag_alarm_secs`.
pub fn lag_now(
    state: &ApiState,
    status: &crate::clearing_sync::ClearingStatus,
) -> crate::clearing_lag::ClearingLag {
    let now = crate::clock::now();
    let after = std::time::Duration::from_secs(state.node.config.clearing.lag_alarm_secs);
    crate::clearing_lag::clearing_lag(status, now, after)
}

/// `GET /api/v1/clearing`: the uploader's [`crate::clearing_sync::ClearingStatus`] (cursor,
/// backlog, watermark, last success, last error, alarm, counters), with the clearing lag
/// (`lag_ms`, `lag_alarm`, `lag_alarm_secs`: [`crate::clearing_lag`]). Cursor, last index and
/// backlog come from this node's replicated state; the rest is this node's uploader (on a follower:
/// that of its last leadership, with `leading: false` and `lag_ms: null`).
pub async fn clearing(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let st = stats(&state)?;
    let mut c = state.clearing.as_ref().map(|c| c.snapshot()).unwrap_or_default();
    c.cursor = st.clearing_acked_through;
    c.last_index = st.last_index;
    c.backlog = st.clearing_backlog;
    let lag = lag_now(&state, &c);
    let f = state.node.sm.state()?.feed;
    let feed = FeedOut {
        after: f.after,
        network_version: f.network.as_ref().map(|b| b.version),
        fare_rule_version: f.fare_rule.as_ref().map(|b| b.version),
        compiled_from: f.compiled,
        last_fare_table: f.last_fare_table,
        refused: f.refused,
        last_refusal: f.last_refusal,
        deny_pending: f.deny.len() as u64,
        deny_published: f.deny_published.map(|(v, _)| v),
        deny_blacklist: f.deny_published.map(|(_, b)| b),
    };
    Ok(HttpResponse::Ok().json(ClearingOut {
        // Names kept from the first version of this view.
        acked_through: st.clearing_acked_through,
        last_success_ms: c.last_success.map(|t| t.millis()),
        lag_ms: lag.lag_ms,
        lag_alarm: lag.lag_alarm,
        lag_alarm_secs: lag.lag_alarm_secs,
        feed,
        status: c,
    }))
}

/// `GET /api/v1/clearing`: the uploader's status with the clearing lag and the parameter feed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClearingOut {
    #[serde(flatten)]
    pub status: crate::clearing_sync::ClearingStatus,
    /// The replicated cursor (as `cursor`).
    pub acked_through: u64,
    /// `last_success` (ms since the epoch).
    pub last_success_ms: Option<i64>,
    /// Milliseconds records have waited without an upload acknowledged; null when this node does
    /// not upload (clearing not configured, or not the leader).
    pub lag_ms: Option<u64>,
    /// The lag reached `lag_alarm_secs`.
    pub lag_alarm: bool,
    /// `clearing.lag_alarm_secs`.
    pub lag_alarm_secs: u64,
    pub feed: FeedOut,
}

/// Where the leader is in clearing's parameter feed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FeedOut {
    /// The last feed item taken.
    pub after: u64,
    pub network_version: Option<u64>,
    pub fare_rule_version: Option<u64>,
    /// `[network, fare rule]` versions the last compiled fare table came from.
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub compiled_from: Option<(u64, u64)>,
    pub last_fare_table: Option<u64>,
    /// Feed items refused, and the last reason.
    pub refused: u64,
    pub last_refusal: Option<String>,
    /// `deny_list` items taken but not yet published into the blacklist.
    pub deny_pending: u64,
    /// The newest `deny_list` version published, and the blacklist version it went out in.
    pub deny_published: Option<u64>,
    pub deny_blacklist: Option<u64>,
}

pub async fn gaps(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    Ok(HttpResponse::Ok().json(state.node.sm.gaps(q.from.unwrap_or(1), limit)?))
}

pub async fn conflicts(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    Ok(HttpResponse::Ok().json(state.node.sm.conflicts(q.from.unwrap_or(1), limit)?))
}

/// Most audit lines one filtered request reads before it answers (what it found so far).
pub const AUDIT_FILTER_SCAN: usize = 10_000;

/// `GET /api/v1/audit`: a page of the log, optionally filtered.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// First line id returned (default: the latest `limit` lines, matching ones when filtered).
    pub from: Option<u64>,
    /// Most lines returned (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Only lines whose actor contains this text (case-insensitive).
    pub actor: Option<String>,
    /// Only lines whose action contains this text (case-insensitive), e.g. `mode.` or `gate.command`.
    pub action: Option<String>,
}

/// Lines oldest first. Filtered, it reads at most [`AUDIT_FILTER_SCAN`] lines: forwards from `from`,
/// or backwards from the latest line without it, until `limit` lines matched.
pub async fn audit(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    let lower =
        |s: &Option<String>| s.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_lowercase);
    let (actor, action) = (lower(&q.actor), lower(&q.action));
    let next_audit = state.node.sm.state()?.next_audit;
    if actor.is_none() && action.is_none() {
        // Without `from`, the latest `limit` lines.
        let from = q.from.unwrap_or_else(|| next_audit.saturating_sub(limit as u64).max(1));
        return Ok(HttpResponse::Ok().json(state.node.sm.audit_entries(from, limit)?));
    }
    let keep = move |a: &crate::state::AuditEntry| {
        actor.as_ref().is_none_or(|s| a.actor.to_lowercase().contains(s))
            && action.as_ref().is_none_or(|s| a.action.to_lowercase().contains(s))
    };
    let sm = state.node.sm.clone();
    let out = tokio::task::spawn_blocking(move || -> Result<Vec<crate::state::AuditEntry>, ApiError> {
        let mut out = Vec::new();
        let mut read = 0usize;
        match q.from {
            Some(mut next) => {
                while out.len() < limit && read < AUDIT_FILTER_SCAN {
                    let page = sm.audit_entries(next, 1000.min(AUDIT_FILTER_SCAN - read))?;
                    let Some(last) = page.last().map(|a| a.seq) else { break };
                    read += page.len();
                    out.extend(page.into_iter().filter(&keep).take(limit - out.len()));
                    next = last + 1;
                }
            }
            None => {
                let mut end = next_audit; // exclusive
                while out.len() < limit && read < AUDIT_FILTER_SCAN && end > 1 {
                    let start = end.saturating_sub(1000).max(1);
                    let page = sm.audit_entries(start, (end - start) as usize)?;
                    if page.is_empty() {
                        break;
                    }
                    read += page.len();
                    out.extend(page.into_iter().rev().filter(&keep).take(limit - out.len()));
                    end = start;
                }
                out.reverse();
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(out))
}
