//! `/api/v1/parameters`: list and show stored packages; compile and sign a fare table from a network
//! and a fare rule; upload blacklists (full or delta). A blacklist adding more ids to what gates
//! hold than `api.blacklist_confirm_threshold` (SPEC §4: a real metro once blocked 250,000 good
//! cards) is stored with its rollout request held, by the one mass-insertion guard every path goes
//! through ([`super::rollouts::rollout_request`]), until another engineer confirms it.

use actix_web::{web, HttpResponse};
use afc_domain::blacklist::{Blacklist, BlacklistDelta, Entry};
use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::network::{compile, FareRule, NetworkDescription};
use afc_domain::package::{package_sha256, BlacklistBody, Package};
use serde::{Deserialize, Serialize};

use super::{now, reason, ApiError, ApiState, Caller};
use crate::state::{Request, Response};

/// One kind's stored versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindOut {
    pub kind: String,
    pub versions: Vec<u64>,
    pub current: u64,
    pub current_sha256: Option<String>,
}

pub async fn list(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.node.sm.state()?;
    let out: Vec<KindOut> = ParamKind::ALL
        .iter()
        .map(|k| {
            let held = s.packages.get(k.as_str()).cloned().unwrap_or_default();
            KindOut {
                kind: k.as_str().to_owned(),
                current: held.current(),
                current_sha256: (held.current() > 0).then(|| hex::encode(held.current_sha256)),
                versions: held.versions,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

/// `GET /api/v1/parameters/{kind}/{version}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageOut {
    pub kind: String,
    pub version: u64,
    pub effective_from: i64,
    pub key_id: u32,
    pub body_len: u64,
    pub body_sha256: String,
    /// sha256 of the whole signed package, as gates see it in the `current` pointer.
    pub package_sha256: String,
    pub package_len: usize,
}

pub async fn show(
    _c: Caller,
    state: web::Data<ApiState>,
    path: web::Path<(String, u64)>,
) -> Result<HttpResponse, ApiError> {
    let (kind_name, version) = path.into_inner();
    let kind = ParamKind::parse(&kind_name).ok_or_else(|| ApiError::NotFound(format!("kind {kind_name}")))?;
    let bytes = state
        .node
        .sm
        .package(kind, version)?
        .ok_or_else(|| ApiError::NotFound(format!("{kind_name} version {version}")))?;
    let p = Package::decode(&bytes).map_err(|e| ApiError::Internal(format!("stored package: {e}")))?;
    Ok(HttpResponse::Ok().json(PackageOut {
        kind: kind_name,
        version,
        effective_from: p.header.effective_from.0,
        key_id: p.header.key_id,
        body_len: p.header.body_len,
        body_sha256: hex::encode(p.header.body_sha256),
        package_sha256: hex::encode(package_sha256(&bytes)),
        package_len: bytes.len(),
    }))
}

fn current_version(state: &ApiState, kind: ParamKind) -> Result<u64, ApiError> {
    Ok(state.node.sm.state()?.packages.get(kind.as_str()).map(|p| p.current()).unwrap_or(0))
}

/// Signs `body` as `version` of `kind` and stores it through Raft (audited).
#[allow(clippy::too_many_arguments)]
async fn sign_and_store(
    state: &ApiState,
    caller: &Caller,
    (action, detail): (&str, String),
    kind: ParamKind,
    version: u64,
    effective_from: Timestamp,
    body: Vec<u8>,
) -> Result<HttpResponse, ApiError> {
    let (key_id, key) = state.signing.as_ref().ok_or(ApiError::SigningKeyMissing)?;
    let signed = Package::sign(kind, version, effective_from, body, *key_id, key);
    let package = signed.encode();
    let size = package.len();
    state.audit(caller, action, detail.clone()).await?;
    let rollout = super::rollouts::before_upload(&state.node, &caller.name, &signed, &detail).await;
    let stored = state.node.put_package(kind, version, &package).await?;
    match super::rejection_to_error(stored)? {
        Response::PackageStored { sha256, .. } => Ok(HttpResponse::Ok().json(serde_json::json!({
            "kind": kind.as_str(), "version": version, "sha256": hex::encode(sha256),
            "size": size, "effective_from": effective_from.0, "rollout": rollout,
        }))),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

/// `POST /api/v1/parameters/fare-table`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FareUpload {
    pub network: NetworkDescription,
    pub fare_rule: FareRule,
    /// ms since the epoch; default now.
    pub effective_from: Option<i64>,
    pub reason: String,
}

pub async fn upload_fare_table(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<FareUpload>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let table = compile(&b.network, &b.fare_rule).map_err(|e| ApiError::InvalidParameters(e.to_string()))?;
    let version = current_version(&state, ParamKind::FareTable)? + 1;
    let detail = format!(
        "fare_table v{version} from network {:?} ({} stations) and rule {:?}: {why}",
        b.network.name,
        table.stations().len(),
        b.fare_rule.name
    );
    let eff = Timestamp(b.effective_from.unwrap_or(now().0));
    sign_and_store(
        &state,
        &caller,
        ("parameters.fare_table", detail),
        ParamKind::FareTable,
        version,
        eff,
        table.encode(),
    )
    .await
}

/// `POST /api/v1/parameters/blacklist`: exactly one of `full` and `delta`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlacklistUpload {
    /// The complete list; replaces what gates hold.
    pub full: Option<Vec<Entry>>,
    pub delta: Option<DeltaUpload>,
    pub effective_from: Option<i64>,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaUpload {
    /// The version this delta was written against: must be the current one, else 409.
    pub from_version: u64,
    #[serde(default)]
    pub add: Vec<Entry>,
    #[serde(default)]
    pub remove: Vec<Entry>,
}

pub async fn upload_blacklist(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<BlacklistUpload>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let current = current_version(&state, ParamKind::Blacklist)?;
    let version = current + 1;
    let body = match (b.full, b.delta) {
        (Some(entries), None) => BlacklistBody::Full(Blacklist::from_entries(version, entries)),
        (None, Some(d)) => {
            if d.from_version != current {
                return Err(ApiError::Conflict(format!(
                    "delta written against blacklist v{}, the current version is v{current}",
                    d.from_version
                )));
            }
            let delta =
                BlacklistDelta { from_version: current, to_version: version, add: d.add, remove: d.remove }
                    .normalized();
            BlacklistBody::Delta(delta)
        }
        _ => return Err(ApiError::BadRequest("give exactly one of full and delta".into())),
    };
    let eff = Timestamp(b.effective_from.unwrap_or(now().0));
    let (key_id, key) = state.signing.as_ref().ok_or(ApiError::SigningKeyMissing)?;
    let what = if matches!(body, BlacklistBody::Full(_)) { "full" } else { "delta" };
    let signed = Package::sign(ParamKind::Blacklist, version, eff, body.encode(), *key_id, key);
    drop(body);
    let package = signed.encode();
    let size = package.len();
    // The one mass-insertion guard: the ids this adds to what gates hold, by set difference.
    let s = state.node.sm.state()?;
    let (request, added) = super::rollouts::rollout_request(&state.node, &s, &signed, &caller.name, &why)?;
    drop(s);
    let added = added.unwrap_or(0);
    let threshold = state.node.config.api.blacklist_confirm_threshold;
    let held = request.confirmation.is_some();
    let detail = format!("blacklist v{version} ({what}) adds {added} ids to what gates hold: {why}");
    let rollout = if held {
        state.audit(&caller, "parameters.blacklist.held", format!("{detail} (> {threshold}: held)")).await?;
        // The held request is on record before the package is stored, or nothing is stored: a
        // stored version that no request holds back could reach gates as it is.
        let r = super::rollouts::record(&state.node, request).await?;
        if !matches!(r, Response::RolloutRequested { held: true, .. }) {
            return Err(ApiError::Internal(format!("held rollout request not recorded: {r:?}")));
        }
        None
    } else {
        state.audit(&caller, "parameters.blacklist", detail).await?;
        Some(super::rollouts::outcome_json(super::rollouts::record(&state.node, request).await))
    };
    let stored = state.node.put_package(ParamKind::Blacklist, version, &package).await?;
    let sha256 = match super::rejection_to_error(stored)? {
        Response::PackageStored { sha256, .. } => hex::encode(sha256),
        other => return Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    };
    match rollout {
        None => Ok(HttpResponse::Accepted().json(serde_json::json!({
            "code": "confirmation_required", "pending_id": version, "version": version,
            "added": added, "threshold": threshold, "sha256": sha256, "size": size,
            "message": "stored, not rolled out: a second engineer must confirm this upload",
        }))),
        Some(rollout) => Ok(HttpResponse::Ok().json(serde_json::json!({
            "kind": "blacklist", "version": version, "sha256": sha256, "size": size,
            "effective_from": eff.0, "added": added, "rollout": rollout,
        }))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    pub reason: String,
}

/// `POST /api/v1/parameters/blacklist/pending/{id}/confirm`: `id` is the held version (the
/// `pending_id` of the upload). Confirms exactly that version's held rollout request, as
/// `POST /api/v1/rollouts/blacklist/confirm` does for whichever request waits.
pub async fn confirm_blacklist(
    caller: Caller,
    state: web::Data<ApiState>,
    id: web::Path<u64>,
    body: web::Json<Confirm>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let why = reason(&body.reason)?;
    let kind = ParamKind::Blacklist;
    let waiting = {
        let s = state.node.sm.state()?;
        s.rollouts
            .requests
            .get(&kind)
            .filter(|q| q.to_version == id)
            .and_then(|q| q.confirmation.clone())
            .filter(|c| !c.is_confirmed())
    };
    let c = waiting.ok_or_else(|| ApiError::NotFound(format!("pending upload {id}")))?;
    if c.requested_by == caller.name {
        return Err(ApiError::SameConfirmer { actor: caller.name.clone() });
    }
    let detail = format!(
        "blacklist v{id} adds {} ids, uploaded by {}, confirmed by {}: {why}",
        c.added, c.requested_by, caller.name
    );
    // The state machine checks again (another engineer, this version still waiting).
    let req = Request::RolloutConfirmVersion { kind, version: id, by: caller.name.clone(), at: now() };
    match state.audited_write(&caller, "parameters.blacklist", detail, req).await? {
        Response::RolloutConfirmed { version, .. } => Ok(HttpResponse::Ok().json(serde_json::json!({
            "kind": kind.as_str(), "version": version, "added": c.added,
            "rollout": { "requested": true, "held_for_confirmation": false },
        }))),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QrKeysUpload {
    /// The complete set of issuer keys gates trust for QR ride codes (replaces the current set).
    pub keys: Vec<afc_domain::qr::QrIssuerKey>,
    pub effective_from: Option<i64>,
    pub reason: String,
}

pub async fn upload_qr_keys(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<QrKeysUpload>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let set =
        afc_domain::qr::QrKeySet::new(b.keys).map_err(|e| ApiError::InvalidParameters(e.to_string()))?;
    let version = current_version(&state, ParamKind::QrKeys)? + 1;
    let detail = format!("qr_keys v{version} ({} issuer keys): {why}", set.len());
    let json = serde_json::to_vec(&set).map_err(|e| ApiError::Internal(e.to_string()))?;
    let eff = Timestamp(b.effective_from.unwrap_or(now().0));
    sign_and_store(&state, &caller, ("parameters.qr_keys", detail), ParamKind::QrKeys, version, eff, json)
        .await
}
