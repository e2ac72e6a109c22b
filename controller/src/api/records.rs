//! Health, the ledger (entries, stats, chain verification), clearing progress and the audit log.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, Caller};
use crate::chain::{verify_chain, GENESIS_HASH};

/// Most entries one page returns.
pub const MAX_PAGE: usize = 1000;

pub async fn healthz(_c: Caller) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let leader = state.node.raft.metrics().borrow().current_leader;
    match leader {
        Some(l) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "leader": l }))),
        None => Err(ApiError::NoLeader("this node knows no leader".into())),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    pub from: Option<u64>,
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

/// `GET /api/v1/ledger/stats` and the ledger part of `GET /api/v1/clearing`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerStats {
    pub first_retained: u64,
    pub last_index: u64,
    pub records_stored: u64,
    pub last_hash: String,
    pub clearing_acked_through: u64,
    /// Entries not yet acknowledged by central clearing.
    pub clearing_backlog: u64,
    pub gates_registered: usize,
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
    })
}

pub async fn ledger_stats(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(stats(&state)?))
}

/// Walks the retained ledger page by page: contiguous indexes, each hash following from its record
/// and predecessor, the last equal to the state's head. Entry 1 chains from the genesis hash; after
/// a prune, the first retained entry's own hash is the starting point.
pub async fn ledger_verify(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.node.sm.state()?;
    let sm = state.node.sm.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        let mut next = s.first_retained;
        let mut prev = GENESIS_HASH;
        let mut checked = 0u64;
        while next <= s.last_index() {
            let mut page = sm.ledger_entries(next, 10_000)?;
            page.retain(|e| e.index <= s.last_index());
            if page.is_empty() {
                return Ok(serde_json::json!({ "ok": false, "checked": checked, "error": format!("entry {next} is missing") }));
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
                Err(e) => return Ok(serde_json::json!({ "ok": false, "checked": checked, "error": e.to_string() })),
            }
        }
        let head_ok = s.last_index() == 0 || prev == s.last_hash;
        Ok(serde_json::json!({
            "ok": head_ok, "checked": checked, "first_index": s.first_retained, "last_index": s.last_index(),
            "error": (!head_ok).then_some("the last entry's hash is not the state's head"),
        }))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(result))
}

pub async fn clearing(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let st = stats(&state)?;
    let c = state.metrics.clearing();
    let f = state.node.sm.state()?.feed;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "acked_through": st.clearing_acked_through,
        "last_index": st.last_index,
        "backlog": st.clearing_backlog,
        "last_success_ms": c.last_success_ms,
        "last_error": c.last_error,
        "feed": {
            "after": f.after,
            "network_version": f.network.as_ref().map(|b| b.version),
            "fare_rule_version": f.fare_rule.as_ref().map(|b| b.version),
            "compiled_from": f.compiled,
            "last_fare_table": f.last_fare_table,
            "refused": f.refused,
            "last_refusal": f.last_refusal,
        },
    })))
}

pub async fn audit(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit.unwrap_or(100).min(MAX_PAGE);
    // Without `from`, the latest `limit` lines.
    let from = match q.from {
        Some(f) => f,
        None => state.node.sm.state()?.next_audit.saturating_sub(limit as u64).max(1),
    };
    Ok(HttpResponse::Ok().json(state.node.sm.audit_entries(from, limit)?))
}
