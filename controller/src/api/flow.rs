//! `GET /api/v1/flow`: live passenger flow for the console's chart, from the ledger.
//!
//! Accepted taps per minute by direction over the last `minutes` (at most [`MAX_MINUTES`]), and
//! refused taps per gate by reason over the same window. The ledger is read from its tail
//! backwards in pages, at most [`super::records::MAX_SCAN`] entries, inside a slot of the
//! [`super::records::ScanLimit`] (a console polling it cannot hold more than its share of the
//! disk); the walk stops at the first page wholly older than the window. Records are bucketed by
//! their gate time (`occurred_at`), so a late upload fills in the minute it happened in.
//! `passage_not_made` records are not decisions: they count neither as a tap nor as a refusal.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use afc_domain::model::{Direction, Reason};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::records::MAX_SCAN;
use super::{ApiError, ApiState, Caller};
use crate::clock::now;

/// The longest window the flow covers.
pub const MAX_MINUTES: u32 = 180;
const MINUTE_MS: i64 = 60_000;
/// Entries read per page of the backward walk.
const PAGE: u64 = 1000;

/// The query of `GET /api/v1/flow`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Minutes back from now, the current minute included (default 60, 1 to 180).
    pub minutes: Option<u32>,
}

/// One minute of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowPoint {
    /// Start of the minute (ms since the epoch, UTC, a multiple of 60 000).
    pub minute_ms: i64,
    /// Accepted entry taps in the minute.
    pub entries: u64,
    /// Accepted exit taps in the minute.
    pub exits: u64,
}

/// One gate's refused taps in the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GateRejects {
    pub gate: String,
    /// Refusals by reason name (`blacklisted`, `no_entry`, ...).
    pub by_reason: BTreeMap<String, u64>,
}

/// `GET /api/v1/flow`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FlowOut {
    pub minutes: u32,
    /// Start of the first minute (ms since the epoch).
    pub from_ms: i64,
    /// The controller's clock when computed (ms since the epoch).
    pub now_ms: i64,
    /// One point per minute, oldest first; `minutes` of them.
    pub points: Vec<FlowPoint>,
    /// Per gate with refusals in the window, by gate id.
    pub rejects: Vec<GateRejects>,
    /// Ledger entries read.
    pub scanned: u64,
    /// False when the scan bound stopped the walk before it reached records older than the window
    /// (the oldest minutes may then be undercounted).
    pub complete: bool,
}

pub async fn flow(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<FlowQuery>,
) -> Result<HttpResponse, ApiError> {
    let minutes = q.minutes.unwrap_or(60);
    if !(1..=MAX_MINUTES).contains(&minutes) {
        return Err(ApiError::BadRequest(format!("minutes must be 1 to {MAX_MINUTES}")));
    }
    let now_ms = now().millis();
    let from_ms = (now_ms.div_euclid(MINUTE_MS) - i64::from(minutes) + 1) * MINUTE_MS;
    let sm = state.node.sm.clone();
    let s = sm.state()?;
    let (first, last) = (s.first_retained.max(1), s.last_index());
    let permit = state.scans.acquire(&state, "flow").await?;
    let out = tokio::task::spawn_blocking(move || -> Result<FlowOut, ApiError> {
        let _permit = permit;
        let mut points: Vec<FlowPoint> = (0..i64::from(minutes))
            .map(|i| FlowPoint { minute_ms: from_ms + i * MINUTE_MS, entries: 0, exits: 0 })
            .collect();
        let mut rejects: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut scanned = 0u64;
        let mut complete = true;
        let mut end = last; // inclusive upper index of the next page
        while end >= first && last > 0 {
            if scanned >= MAX_SCAN as u64 {
                complete = false;
                break;
            }
            let start = end.saturating_sub(PAGE - 1).max(first);
            let page = sm.ledger_entries(start, (end - start + 1) as usize)?;
            let mut any_in_window = false;
            for e in &page {
                scanned += 1;
                let r = &e.record;
                let t = r.occurred_at.millis();
                if t < from_ms {
                    continue;
                }
                any_in_window = true;
                if t > now_ms + MINUTE_MS || r.reason == Reason::PassageNotMade {
                    continue;
                }
                if r.accepted {
                    let i = usize::try_from((t - from_ms) / MINUTE_MS).unwrap_or(usize::MAX);
                    if let Some(p) = points.get_mut(i) {
                        match r.direction {
                            Direction::Entry => p.entries += 1,
                            Direction::Exit => p.exits += 1,
                        }
                    }
                } else {
                    *rejects
                        .entry(r.gate.to_string())
                        .or_default()
                        .entry(r.reason.to_string())
                        .or_default() += 1;
                }
            }
            if !any_in_window || start == first {
                break;
            }
            end = start - 1;
        }
        let rejects = rejects.into_iter().map(|(gate, by_reason)| GateRejects { gate, by_reason }).collect();
        Ok(FlowOut { minutes, from_ms, now_ms, points, rejects, scanned, complete })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(out))
}
