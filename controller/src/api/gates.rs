//! `GET /api/v1/gates[/{gate}]`: every gate as the station sees it; `POST
//! /api/v1/gates/{gate}/commands`: a command to one gate (SPEC §5 `gates/{gate}/cmd`).
//!
//! The live part (online, direction, service, alarms, reported versions, counters) comes from a
//! [`GateView`] (`gate_view.rs`): the leader's MQTT duties ([`crate::leader::Duties`], fed by `leader/view.rs`). A
//! node without `[mqtt]` uses [`NoGateView`], which reports nothing live; the list then holds the
//! gates registered in the replicated state, with their desired parameter versions and ledger
//! progress. Only the leader hears the gates: a follower's API asks the leader's Raft/admin
//! listener (`/admin/gate-view`), so the board is the same from any node.
//!
//! A command is audited first (who, which gate, what, why), then sent by the leader's duties
//! ([`crate::leader::Duties::send_command`]): from a follower it is forwarded to the leader's
//! `/admin/gate-command`. The gate's `cmd/ack` decides the answer: `ok` → 200; `rejected` → 409
//! `command_rejected`; `expired` → 504 `command_expired`; `failed` → 502 `command_failed`; no
//! ack in `mqtt.command_timeout_ms` → 504 `gate_timeout`.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use afc_domain::model::Ident;
use afc_domain::wire::{CommandKind, CommandResult, GateDirection};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller};
pub use crate::gate_view::{GateSnapshot, GateView, NoGateView};

/// One gate as the API shows it: live state, desired versions, ledger progress.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GateOut {
    #[serde(flatten)]
    pub live: GateSnapshot,
    /// Registered in the replicated state (its transaction key is known) and not decommissioned.
    pub registered: bool,
    /// Taken out of service through `POST /api/v1/gates/{gate}/decommission`.
    pub decommissioned: bool,
    /// Its registered transaction-signing key (ed25519, hex).
    pub tx_public_key: Option<String>,
    pub hardware_profile: Option<String>,
    /// Per kind, the version the station wants every gate to hold.
    pub desired_versions: BTreeMap<String, u64>,
    /// Kinds where reported differs from desired.
    pub drift: Vec<String>,
    /// Highest contiguous gate_seq in the ledger, of the gate's current installation.
    pub ledger_through_seq: Option<u64>,
    /// The installation its last batch came from (a replaced gate has a new one).
    pub installation: Option<String>,
    /// Sequence gaps recorded for it (an alarm: records it no longer held).
    pub sequence_gaps: u64,
    /// Its records refused because the ledger held their key with other content.
    pub key_conflicts: u64,
}

/// The live view: this node's own when it leads, else the leader's (fetched over the Raft/admin
/// listener), so the console shows the same board from any node. When the leader cannot be asked,
/// the gates show as not live.
async fn live_view(state: &ApiState) -> Vec<GateSnapshot> {
    match state.node.leader_addr() {
        Some((leader, addr)) if leader != state.node.id && state.duties.is_some() => {
            match state.node.forward::<_, Vec<GateSnapshot>>(&addr, "/admin/gate-view", &(), 1).await {
                Ok(view) => view,
                Err(e) => {
                    tracing::debug!(error = %e, "the leader's gate view is not available");
                    Vec::new()
                }
            }
        }
        _ => state.gates.gates(),
    }
}

/// Every gate, merged from the replicated state and the leader's live view.
pub async fn all(state: &ApiState) -> Result<Vec<GateOut>, ApiError> {
    let view = live_view(state).await;
    merge(state, view)
}

/// Every gate, merged from the replicated state and this node's own live view (empty on a
/// follower): what this node's `/metrics` reports.
pub fn all_local(state: &ApiState) -> Result<Vec<GateOut>, ApiError> {
    merge(state, state.gates.gates())
}

fn merge(state: &ApiState, view: Vec<GateSnapshot>) -> Result<Vec<GateOut>, ApiError> {
    let s = state.node.sm.state()?;
    let desired: BTreeMap<String, u64> =
        s.packages.iter().map(|(k, v)| (k.clone(), v.current())).filter(|(_, v)| *v > 0).collect();
    let mut live: BTreeMap<String, GateSnapshot> = view.into_iter().map(|g| (g.gate.clone(), g)).collect();
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
                registered: info.as_ref().is_some_and(|i| !i.decommissioned),
                decommissioned: info.as_ref().is_some_and(|i| i.decommissioned),
                tx_public_key: info.as_ref().map(|i| hex::encode(i.tx_public_key)),
                hardware_profile: info.as_ref().map(|i| i.hardware_profile.clone()),
                ledger_through_seq: info.as_ref().map(|i| i.current_progress().contiguous_through),
                installation: info.as_ref().and_then(|i| i.last_installation).map(|i| i.to_string()),
                sequence_gaps: info.as_ref().map_or(0, |i| i.gaps),
                key_conflicts: info.as_ref().map_or(0, |i| i.conflicts),
                desired_versions: desired.clone(),
                drift,
                live: g,
            }
        })
        .collect())
}

pub async fn list(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(all(&state).await?))
}

pub async fn detail(
    _c: Caller,
    state: web::Data<ApiState>,
    gate: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let gate = gate.into_inner();
    let g = all(&state)
        .await?
        .into_iter()
        .find(|g| g.live.gate == gate)
        .ok_or(ApiError::NotFound(format!("gate {gate}")))?;
    Ok(HttpResponse::Ok().json(g))
}

/// Body of `POST /api/v1/gates/{gate}/commands`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// `open_once_entry`, `open_once_exit`, `set_direction`, `out_of_service` or `in_service`.
    pub command: String,
    /// For `set_direction`: `closed`, `entry`, `exit` or `bidirectional`.
    pub direction: Option<GateDirection>,
    pub reason: String,
}

impl CommandBody {
    fn kind(&self) -> Result<CommandKind, ApiError> {
        let k = match self.command.as_str() {
            "open_once_entry" => CommandKind::OpenOnceEntry,
            "open_once_exit" => CommandKind::OpenOnceExit,
            "out_of_service" => CommandKind::OutOfService,
            "in_service" => CommandKind::InService,
            "set_direction" => CommandKind::SetDirection {
                direction: self
                    .direction
                    .ok_or_else(|| ApiError::BadRequest("set_direction needs a direction".into()))?,
            },
            other => return Err(ApiError::BadRequest(format!("unknown command {other:?}"))),
        };
        if self.direction.is_some() && !matches!(k, CommandKind::SetDirection { .. }) {
            return Err(ApiError::BadRequest(format!("{} takes no direction", self.command)));
        }
        Ok(k)
    }
}

/// The answer of an acknowledged command.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandOut {
    pub gate: String,
    pub command: String,
    /// The command id the gate acknowledged.
    pub id: String,
    pub result: CommandResult,
    pub detail: Option<String>,
}

pub async fn command(
    caller: Caller,
    state: web::Data<ApiState>,
    gate: web::Path<String>,
    body: web::Json<CommandBody>,
) -> Result<HttpResponse, ApiError> {
    let why = super::reason(&body.reason)?;
    let kind = body.kind()?;
    let gate = gate.into_inner();
    let id = Ident::new(&gate).map_err(|_| ApiError::NotFound(format!("gate {gate}")))?;
    let known =
        state.node.sm.state()?.gates.contains_key(&id) || state.gates.gates().iter().any(|g| g.gate == gate);
    if !known {
        return Err(ApiError::NotFound(format!("gate {gate}")));
    }
    let duties = state
        .duties
        .clone()
        .ok_or_else(|| ApiError::MqttUnavailable("this node has no [mqtt] section".into()))?;
    let args = match kind {
        CommandKind::SetDirection { direction } => format!(" {direction:?}").to_lowercase(),
        _ => String::new(),
    };
    state.audit(&caller, "gate.command", format!("{gate} {}{args}: {why}", kind.as_str())).await?;
    let outcome = match state.node.leader_addr() {
        Some((leader, _)) if leader == state.node.id => duties.deliver(&id, kind).await,
        Some((_, addr)) => {
            let body = crate::leader::GateCommand { gate: id.clone(), command: kind };
            state.node.forward(&addr, "/admin/gate-command", &body, 1).await?
        }
        None => return Err(ApiError::NoLeader("no leader known to send the command".into())),
    };
    use crate::leader::CommandOutcome as O;
    let ack = match outcome {
        O::Acked { ack } => ack,
        O::Timeout { after_ms } => return Err(ApiError::GateTimeout(after_ms)),
        O::NotLeader => {
            return Err(ApiError::MqttUnavailable("the leader has no broker session (yet)".into()))
        }
        O::Publish { error } => return Err(ApiError::MqttUnavailable(error)),
    };
    let detail = ack.detail.clone().unwrap_or_default();
    match ack.result {
        CommandResult::Ok => Ok(HttpResponse::Ok().json(CommandOut {
            gate,
            command: kind.as_str().to_owned(),
            id: ack.id,
            result: ack.result,
            detail: ack.detail,
        })),
        CommandResult::Rejected => Err(ApiError::CommandRejected(detail)),
        CommandResult::Expired => Err(ApiError::CommandExpired(detail)),
        CommandResult::Failed => Err(ApiError::CommandFailed(detail)),
    }
}
