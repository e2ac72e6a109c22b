//! `/api/v1/rollouts`: staged parameter rollouts (SPEC §4). The API only records requests, aborts
//! and confirmations through Raft; the leader's `rollout-driver` starts and steps the rollouts
//! with what the gates report (see [`crate::leader::rollout`]).

use actix_web::{web, HttpResponse};
use afc_domain::blacklist::Blacklist;
use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::package::{BlacklistBody, Package};
use afc_domain::rollout::{blacklist_ids_added, MassInsertionGuard, SecondConfirmation};
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
/// what the state holds now, and for a blacklist the ids it adds to what gates hold.
///
/// Every path that can change what gates hold builds its request here (an API upload, a rollout
/// started by hand, the parameter feed: [`before_upload`] and [`start`]), and the leader starts
/// only ready requests: so this is the one place the mass-insertion guard is asked
/// ([`blacklist_guard`]). A blacklist adding more ids than the threshold carries a confirmation
/// that an engineer other than `by` must give before the rollout starts.
pub fn rollout_request(
    node: &Node,
    s: &StationState,
    package: &Package,
    by: &str,
    why: &str,
) -> Result<(RolloutStart, Option<u64>), ApiError> {
    let (kind, version) = (package.header.kind, package.header.version);
    let stored_before =
        s.packages.get(kind.as_str()).and_then(|p| p.versions.iter().rev().find(|v| **v < version).copied());
    // What gates hold now: the rollout's station version; with a request still waiting (held for
    // a second engineer, say), what that request started from, never the version it would bring.
    let from_version = s.rollouts.station_version(kind, stored_before);
    let at = now();
    let (added, confirmation) = if kind == ParamKind::Blacklist {
        let (added, c) = blacklist_guard(node, package, from_version, by, at)?;
        (Some(added), c)
    } else {
        (None, None)
    };
    let request = RolloutStart {
        kind,
        to_version: version,
        from_version,
        effective_from: package.header.effective_from,
        policy: node.config.rollout.clone(),
        by: by.to_owned(),
        at,
        reason: why.to_owned(),
        confirmation,
    };
    Ok((request, added))
}

/// The controller's side of the one mass-insertion guard (SPEC §4,
/// [`MassInsertionGuard`]): how many ids the blacklist `package` adds to the list gates hold at
/// `from` (by set difference, never entry counts), and the confirmation it needs when that is
/// above `api.blacklist_confirm_threshold`. A delta written on another version than the gates
/// hold is judged by the list it makes. When the list at `from` cannot be rebuilt (a package on
/// the way missing), the guard counts against an empty list: it holds rather than waves through.
pub fn blacklist_guard(
    node: &Node,
    package: &Package,
    from: Option<u64>,
    by: &str,
    at: Timestamp,
) -> Result<(u64, Option<SecondConfirmation>), ApiError> {
    let new = BlacklistBody::decode(&package.body)
        .map_err(|e| ApiError::InvalidParameters(format!("blacklist body: {e}")))?;
    let held = match from {
        Some(v) => list_at(node, v)?.unwrap_or_else(|| {
            tracing::warn!(
                version = v,
                "blacklist held by gates cannot be rebuilt: counting every id as added"
            );
            Blacklist::empty()
        }),
        None => Blacklist::empty(),
    };
    let added = match blacklist_ids_added(&held, &new) {
        Ok(added) => added,
        Err(_) => {
            // A delta on another version (one stored after what gates hold): the list it makes.
            let BlacklistBody::Delta(d) = &new else {
                return Err(ApiError::Internal("a full blacklist is always comparable".into()));
            };
            let made = list_at(node, d.from_version)?
                .and_then(|mut base| base.apply_delta(d).ok().map(|()| base))
                .ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "blacklist v{} is a delta on v{}, which cannot be rebuilt: upload a full list",
                        d.to_version, d.from_version
                    ))
                })?;
            held.ids_added_by(&made)
        }
    };
    let guard = MassInsertionGuard::new(node.config.api.blacklist_confirm_threshold);
    Ok((added, guard.confirmation(added, package.header.version, by, at)))
}

/// The blacklist gates hold at `version`: its full list, or the deltas since the last full list
/// applied in order (version 0: the empty list). `None` when a package on the way is missing,
/// does not decode or does not apply.
fn list_at(node: &Node, version: u64) -> Result<Option<Blacklist>, ApiError> {
    let mut deltas = Vec::new();
    let mut v = version;
    let mut list = loop {
        if v == 0 {
            break Blacklist::empty();
        }
        let body = node
            .sm
            .package(ParamKind::Blacklist, v)?
            .and_then(|b| Package::decode(&b).ok())
            .and_then(|p| BlacklistBody::decode(&p.body).ok());
        match body {
            Some(BlacklistBody::Full(list)) => break list,
            // Each step goes to a lower version, so the walk ends.
            Some(BlacklistBody::Delta(d)) if d.from_version < v => {
                v = d.from_version;
                deltas.push(d);
            }
            _ => return Ok(None),
        }
    };
    for d in deltas.iter().rev() {
        if list.apply_delta(d).is_err() {
            return Ok(None);
        }
    }
    Ok(Some(list))
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
    let (request, _) = rollout_request(&state.node, &s, &package, &caller.name, &why)?;
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
pub async fn before_upload(node: &Node, by: &str, package: &Package, why: &str) -> serde_json::Value {
    let outcome = async {
        let s = node.sm.state()?;
        let (request, _) = rollout_request(node, &s, package, by, why)?;
        record(node, request).await
    }
    .await;
    outcome_json(outcome)
}

/// Records a rollout request built by [`rollout_request`] (not audited: the upload it belongs to
/// is).
pub async fn record(node: &Node, request: RolloutStart) -> Result<Response, ApiError> {
    rejection_to_error(node.write(Request::RolloutRequest { request }, 0).await?)
}

/// What [`before_upload`] tells the uploader about a request's outcome.
pub fn outcome_json(outcome: Result<Response, ApiError>) -> serde_json::Value {
    match outcome {
        Ok(Response::RolloutRequested { held, .. }) => {
            serde_json::json!({ "requested": true, "held_for_confirmation": held })
        }
        Ok(other) => serde_json::json!({ "requested": false, "detail": format!("{other:?}") }),
        Err(e) => serde_json::json!({ "requested": false, "detail": e.to_string() }),
    }
}
