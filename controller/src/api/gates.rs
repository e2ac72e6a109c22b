//! `GET /api/v1/gates[/{gate}]`: every gate as the station sees it.
//!
//! The live part (online, direction, service, alarms, reported versions, counters) comes from a
//! [`GateView`], fed by the leader's MQTT duties (`controller/src/leader/view.rs` on branch h10).
//! Until that is wired, [`NoGateView`] reports nothing live and the list holds the gates registered
//! in the replicated state, with their desired parameter versions and ledger progress.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState, Caller};

/// What the live view knows of one gate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateSnapshot {
    pub gate: String,
    pub online: bool,
    /// `closed`, `entry`, `exit` or `bidirectional`, as last reported.
    pub direction: Option<String>,
    pub in_service: bool,
    /// Free passage held (emergency release or entry_free).
    pub free_passage: bool,
    /// Active alarms (`tailgating`, `door_fault`, `plc_offline`, ...).
    pub alarms: Vec<String>,
    /// Per parameter kind, the active version the gate reports.
    pub reported_versions: BTreeMap<String, u64>,
    /// Counters from the last heartbeat (entries, exits, outbox depth, ...).
    pub counters: BTreeMap<String, u64>,
    /// When the controller last heard from the gate (ms since the epoch).
    pub last_seen_ms: Option<i64>,
}

/// A source of live gate state.
pub trait GateView: Send + Sync {
    /// Every gate the view knows, in any order.
    fn gates(&self) -> Vec<GateSnapshot>;
}

/// A view that knows no live state (before the leader's gate view is wired in).
#[derive(Debug, Default)]
pub struct NoGateView;

impl GateView for NoGateView {
    fn gates(&self) -> Vec<GateSnapshot> {
        Vec::new()
    }
}

/// One gate as the API shows it: live state, desired versions, ledger progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateOut {
    #[serde(flatten)]
    pub live: GateSnapshot,
    /// Registered in the replicated state (its transaction key is known).
    pub registered: bool,
    pub hardware_profile: Option<String>,
    /// Per kind, the version the station wants every gate to hold.
    pub desired_versions: BTreeMap<String, u64>,
    /// Kinds where reported differs from desired.
    pub drift: Vec<String>,
    /// Highest contiguous gate_seq in the ledger.
    pub ledger_through_seq: Option<u64>,
}

/// Every gate, merged from the replicated state and the live view.
pub fn all(state: &ApiState) -> Result<Vec<GateOut>, ApiError> {
    let s = state.node.sm.state()?;
    let desired: BTreeMap<String, u64> =
        s.packages.iter().map(|(k, v)| (k.clone(), v.current())).filter(|(_, v)| *v > 0).collect();
    let mut live: BTreeMap<String, GateSnapshot> =
        state.gates.gates().into_iter().map(|g| (g.gate.clone(), g)).collect();
    for g in s.gates.keys() {
        live.entry(g.to_string())
            .or_insert_with(|| GateSnapshot { gate: g.to_string(), ..Default::default() });
    }
    Ok(live
        .into_values()
        .map(|g| {
            let info = afc_domain::model::Ident::new(&g.gate).ok().and_then(|id| s.gates.get(&id).cloned());
            let drift = desired
                .iter()
                .filter(|(k, v)| g.reported_versions.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            GateOut {
                registered: info.is_some(),
                hardware_profile: info.as_ref().map(|i| i.hardware_profile.clone()),
                ledger_through_seq: info.as_ref().map(|i| i.progress.contiguous_through),
                desired_versions: desired.clone(),
                drift,
                live: g,
            }
        })
        .collect())
}

pub async fn list(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(all(&state)?))
}

pub async fn detail(
    _c: Caller,
    state: web::Data<ApiState>,
    gate: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let gate = gate.into_inner();
    let g = all(&state)?
        .into_iter()
        .find(|g| g.live.gate == gate)
        .ok_or(ApiError::NotFound(format!("gate {gate}")))?;
    Ok(HttpResponse::Ok().json(g))
}
