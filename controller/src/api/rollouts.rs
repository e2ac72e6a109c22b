//! `/api/v1/rollouts`: staged parameter rollouts (SPEC §4). The API only records requests, aborts
//! and confirmations through Raft; the leader's `rollout-driver` starts and steps the rollouts
//! with what the gates report (see [`crate::leader::rollout`]).

use actix_web::{web, HttpResponse};
use afc_domain::model::ParamKind;
use afc_domain::package::Package;
use std::collections::BTreeMap;

use afc_domain::rollout::Rollout;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{reason, ApiError, ApiState, Caller};
use crate::clock::now;
use crate::state::{Request, Response, RolloutStart};

pub async fn status(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.node.sm.state()?;
    let station_versions: BTreeMap<String, u64> = ParamKind::ALL
        .iter()
        .filter_map(|k| {
            let stored = s.packages.get(k.as_str()).map(|p| p.current()).filter(|v| *v > 0);
            s.rollouts.station_version(*k, stored).map(|v| (k.as_str().to_owned(), v))
        })
        .collect();
    Ok(HttpResponse::Ok().json(RolloutsOut {
        rollouts: s.rollouts.rollouts.by_kind,
        requests: s.rollouts.requests,
        station_versions,
    }))
}

/// `GET /api/v1/rollouts`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutsOut {
    /// The rollout of each kind (the last one, also once done or rolled back).
    pub rollouts: BTreeMap<ParamKind, Rollout>,
    /// Requests waiting to start (for a mass blacklist insertion: its second engineer).
    pub requests: BTreeMap<ParamKind, RolloutStart>,
    /// Per kind, the version every gate is pointed at (`params/{kind}/current`).
    pub station_versions: BTreeMap<String, u64>,
}

/// The answer of `POST /api/v1/rollouts` (202: recorded, the leader starts it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutRequestedOut {
    /// `requested`, or `confirmation_required` for a mass blacklist insertion.
    pub code: String,
    pub kind: ParamKind,
    pub version: u64,
    /// With `confirmation_required`: what to do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The answer of `POST /api/v1/rollouts/{kind}/abort`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutAbortedOut {
    pub kind: ParamKind,
    /// A request still waiting to start was dropped too.
    pub dropped_request: bool,
}

/// The answer of `POST /api/v1/rollouts/{kind}/confirm`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutConfirmedOut {
    pub kind: ParamKind,
    /// The version whose rollout may now start.
    pub version: u64,
}

/// What an upload tells the uploader about the rollout it requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolloutOutcome {
    /// Whether a rollout request was recorded.
    pub requested: bool,
    /// When requested: whether it waits for a second engineer (mass blacklist insertion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_for_confirmation: Option<bool>,
    /// When not requested: why (one of the kind is still staging, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl std::fmt::Display for RolloutOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).map_err(|_| std::fmt::Error)?)
    }
}

/// `POST /api/v1/rollouts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    pub kind: String,
    pub version: u64,
    pub reason: String,
}

fn parse_kind(name: &str) -> Result<ParamKind, ApiError> {
    ParamKind::parse(name).ok_or_else(|| ApiError::NotFound(format!("kind {name}")))
}

fn stored_package(state: &ApiState, kind: ParamKind, version: u64) -> Result<Package, ApiError> {
    let bytes = state
        .node
        .sm
        .package(kind, version)?
        .ok_or_else(|| ApiError::NotFound(format!("{kind} version {version}")))?;
    Package::decode(&bytes).map_err(|e| ApiError::Internal(format!("stored package: {e}")))
}

pub async fn start(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<StartBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let kind = parse_kind(&b.kind)?;
    let s = state.node.sm.state()?;
    let package = stored_package(&state, kind, b.version)?;
    let (request, _) = crate::packages::rollout_request(&state.node, &s, &package, &caller.name, &why)?;
    let detail = format!("{kind} v{} from {:?}: {why}", b.version, request.from_version);
    let r =
        state.audited_write(&caller, "rollouts.start", detail, Request::RolloutRequest { request }).await?;
    requested(r)
}

fn requested(r: Response) -> Result<HttpResponse, ApiError> {
    match r {
        Response::RolloutRequested { kind, version, held: true } => {
            Ok(HttpResponse::Accepted().json(RolloutRequestedOut {
                code: "confirmation_required".into(),
                kind,
                version,
                message: Some("a mass blacklist insertion: another engineer must confirm it".into()),
            }))
        }
        Response::RolloutRequested { kind, version, held: false } => Ok(HttpResponse::Accepted()
            .json(RolloutRequestedOut { code: "requested".into(), kind, version, message: None })),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

/// Body of `POST /api/v1/rollouts/{kind}/abort` and `.../confirm`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    pub reason: String,
}

pub async fn abort(
    caller: Caller,
    state: web::Data<ApiState>,
    kind: web::Path<String>,
    body: web::Json<ReasonBody>,
) -> Result<HttpResponse, ApiError> {
    let why = reason(&body.reason)?;
    let kind = parse_kind(&kind)?;
    let req = Request::RolloutAbort { kind, by: caller.name.clone(), at: now() };
    match state.audited_write(&caller, "rollouts.abort", format!("{kind}: {why}"), req).await? {
        Response::RolloutAborted { kind, dropped_request } => {
            Ok(HttpResponse::Ok().json(RolloutAbortedOut { kind, dropped_request }))
        }
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

pub async fn confirm(
    caller: Caller,
    state: web::Data<ApiState>,
    kind: web::Path<String>,
    body: web::Json<ReasonBody>,
) -> Result<HttpResponse, ApiError> {
    let why = reason(&body.reason)?;
    let kind = parse_kind(&kind)?;
    let req = Request::RolloutConfirm { kind, by: caller.name.clone(), at: now() };
    match state.audited_write(&caller, "rollouts.confirm", format!("{kind}: {why}"), req).await? {
        Response::RolloutConfirmed { kind, version } => {
            Ok(HttpResponse::Ok().json(RolloutConfirmedOut { kind, version }))
        }
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

/// What an upload tells the uploader about its rollout request's outcome
/// ([`crate::packages::Prepared::commit`]).
pub fn outcome_json(outcome: Option<Result<Response, crate::packages::PublishError>>) -> RolloutOutcome {
    let Some(outcome) = outcome else {
        let detail = Some("no rollout requested".to_owned());
        return RolloutOutcome { requested: false, held_for_confirmation: None, detail };
    };
    match outcome.map_err(ApiError::from) {
        Ok(Response::RolloutRequested { held, .. }) => {
            RolloutOutcome { requested: true, held_for_confirmation: Some(held), detail: None }
        }
        Ok(other) => RolloutOutcome {
            requested: false,
            held_for_confirmation: None,
            detail: Some(format!("{other:?}")),
        },
        Err(e) => {
            RolloutOutcome { requested: false, held_for_confirmation: None, detail: Some(e.to_string()) }
        }
    }
}
