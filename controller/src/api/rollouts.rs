//! `/api/v1/rollouts`: staged parameter rollouts (SPEC §4). The API only records requests, aborts
//! and confirmations through Raft; the leader's `rollout-driver` starts and steps the rollouts
//! with what the gates report (see [`crate::leader::rollout`]).

use actix_web::{web, HttpResponse};
use afc_domain::model::ParamKind;
use afc_domain::package::{BlacklistBody, Package};
use afc_domain::rollout::SecondConfirmation;
use serde::Deserialize;

use super::{now, reason, rejection_to_error, ApiError, ApiState, Caller};
use crate::node::Node;
use crate::state::{Request, Response, RolloutStart, StationState};

pub async fn status(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.node.sm.state()?;
    let station: serde_json::Map<String, serde_json::Value> = ParamKind::ALL
        .iter()
        .filter_map(|k| {
            let stored = s.packages.get(k.as_str()).map(|p| p.current()).filter(|v| *v > 0);
            s.rollouts.station_version(*k, stored).map(|v| (k.as_str().to_owned(), v.into()))
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "rollouts": s.rollouts.rollouts.by_kind,
        "requests": s.rollouts.requests,
        "station_versions": station,
    })))
}

/// `POST /api/v1/rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    pub kind: String,
    pub version: u64,
    pub reason: String,
}

fn parse_kind(name: &str) -> Result<ParamKind, ApiError> {
    ParamKind::parse(name).ok_or_else(|| ApiError::NotFound(format!("kind {name}")))
}

/// The rollout request for `package` (stored, or about to be stored as the next version), from
/// what the state holds now. A blacklist package adding more ids than the threshold carries a
/// confirmation to be given by another engineer than `by`, or already given by `by` when
/// `confirmed_upload_of` names the other engineer whose held upload `by` confirmed.
pub fn rollout_request(
    node: &Node,
    s: &StationState,
    package: &Package,
    by: &str,
    why: &str,
    confirmed_upload_of: Option<&str>,
) -> Result<RolloutStart, ApiError> {
    let (kind, version) = (package.header.kind, package.header.version);
    let stored_before =
        s.packages.get(kind.as_str()).and_then(|p| p.versions.iter().rev().find(|v| **v < version).copied());
    let from_version = match s.rollouts.rollouts.get(kind) {
        Some(_) => s.rollouts.station_version(kind, None),
        None => stored_before,
    };
    let at = now();
    let confirmation = if kind == ParamKind::Blacklist {
        let added = blacklist_added(node, package, from_version)?;
        let threshold = node.config.api.blacklist_confirm_threshold;
        (added > threshold).then(|| SecondConfirmation {
            to_version: version,
            added,
            requested_by: confirmed_upload_of.unwrap_or(by).to_owned(),
            requested_at: at,
            confirmed_by: confirmed_upload_of.map(|_| by.to_owned()),
            confirmed_at: confirmed_upload_of.map(|_| at),
        })
    } else {
        None
    };
    Ok(RolloutStart {
        kind,
        to_version: version,
        from_version,
        effective_from: package.header.effective_from,
        policy: node.config.rollout.clone(),
        by: by.to_owned(),
        at,
        reason: why.to_owned(),
        confirmation,
    })
}

fn stored_package(state: &ApiState, kind: ParamKind, version: u64) -> Result<Package, ApiError> {
    let bytes = state
        .node
        .sm
        .package(kind, version)?
        .ok_or_else(|| ApiError::NotFound(format!("{kind} version {version}")))?;
    Package::decode(&bytes).map_err(|e| ApiError::Internal(format!("stored package: {e}")))
}

/// Ids a blacklist package adds to what gates hold at `from` (a delta: its additions; a full
/// list: the ids beyond the previous full list's count).
fn blacklist_added(node: &Node, package: &Package, from: Option<u64>) -> Result<u64, ApiError> {
    let body = BlacklistBody::decode(&package.body)
        .map_err(|e| ApiError::Internal(format!("stored blacklist: {e}")))?;
    Ok(match body {
        BlacklistBody::Delta(d) => d.added_count(),
        BlacklistBody::Full(list) => {
            let before = match from {
                Some(v) => node
                    .sm
                    .package(ParamKind::Blacklist, v)?
                    .and_then(|b| Package::decode(&b).ok())
                    .and_then(|p| BlacklistBody::decode(&p.body).ok())
                    .map_or(0, |b| match b {
                        BlacklistBody::Full(l) => l.entry_count(),
                        BlacklistBody::Delta(_) => 0,
                    }),
                None => 0,
            };
            list.entry_count().saturating_sub(before)
        }
    })
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
    let request = rollout_request(&state.node, &s, &package, &caller.name, &why, None)?;
    let detail = format!("{kind} v{} from {:?}: {why}", b.version, request.from_version);
    let r =
        state.audited_write(&caller, "rollouts.start", detail, Request::RolloutRequest { request }).await?;
    requested(r)
}

fn requested(r: Response) -> Result<HttpResponse, ApiError> {
    match r {
        Response::RolloutRequested { kind, version, held: true } => {
            Ok(HttpResponse::Accepted().json(serde_json::json!({
                "code": "confirmation_required", "kind": kind, "version": version,
                "message": "a mass blacklist insertion: another engineer must confirm it",
            })))
        }
        Response::RolloutRequested { kind, version, held: false } => Ok(HttpResponse::Accepted()
            .json(serde_json::json!({ "code": "requested", "kind": kind, "version": version }))),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

#[derive(Debug, Deserialize)]
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
            Ok(HttpResponse::Ok()
                .json(serde_json::json!({ "kind": kind, "dropped_request": dropped_request })))
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
            Ok(HttpResponse::Ok().json(serde_json::json!({ "kind": kind, "version": version })))
        }
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

/// Before an upload is stored: requests its rollout (SPEC §4: rollout is automatic), so no
/// pointer names the new version before its rollout exists. Returns what to tell the uploader:
/// the request's outcome, or why no rollout was requested (one of the kind is still staging:
/// start it later with `POST /api/v1/rollouts`).
pub async fn before_upload(
    node: &Node,
    by: &str,
    package: &Package,
    why: &str,
    confirmed_upload_of: Option<&str>,
) -> serde_json::Value {
    let outcome = async {
        let s = node.sm.state()?;
        let request = rollout_request(node, &s, package, by, why, confirmed_upload_of)?;
        rejection_to_error(node.write(Request::RolloutRequest { request }, 0).await?)
    }
    .await;
    match outcome {
        Ok(Response::RolloutRequested { held, .. }) => {
            serde_json::json!({ "requested": true, "held_for_confirmation": held })
        }
        Ok(other) => serde_json::json!({ "requested": false, "detail": format!("{other:?}") }),
        Err(e) => serde_json::json!({ "requested": false, "detail": e.to_string() }),
    }
}
