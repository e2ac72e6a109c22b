//! `/api/v1/parameters`: list and show stored packages; compile and sign a fare table from a network
//! and a fare rule; upload blacklists (full or delta). A blacklist adding more ids to what gates
//! hold than `api.blacklist_confirm_threshold` (SPEC §4: a real metro once blocked 250,000 good
//! cards) is stored with its rollout request held, by the one mass-insertion guard every path goes
//! through ([`crate::packages::rollout_request`]), until another engineer confirms it.

use actix_web::{web, HttpResponse};
use afc_domain::blacklist::{Blacklist, BlacklistDelta, Entry};
use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::network::{compile, FareRule, NetworkDescription};
use afc_domain::package::{package_sha256, BlacklistBody, Package};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::rollouts::{outcome_json, RolloutOutcome};
use crate::packages::{self, RolloutRule};

use super::{reason, ApiError, ApiState, Caller};
use crate::clock::now;
use crate::state::{Request, Response};

/// One kind's stored versions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    let key = state.signing.as_ref().ok_or(ApiError::SigningKeyMissing)?;
    let rule = RolloutRule::Report { why: &detail };
    let prepared =
        packages::prepare(&state.node, key, (kind, version, effective_from), body, &caller.name, rule)?;
    let size = prepared.bytes.len();
    let published = prepared.commit(&state.node, Some((action, detail.clone()))).await?;
    let rollout = outcome_json(published.rollout);
    match super::rejection_to_error(published.stored)? {
        Response::PackageStored { sha256, .. } => Ok(HttpResponse::Ok().json(UploadOut {
            kind: kind.as_str().to_owned(),
            version,
            sha256: hex::encode(sha256),
            size,
            effective_from: effective_from.0,
            added: None,
            rollout,
        })),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

/// The answer of a stored upload (`POST /api/v1/parameters/fare-table`, `.../qr-keys`, and a
/// blacklist that needs no second engineer).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UploadOut {
    pub kind: String,
    pub version: u64,
    /// sha256 of the signed package (hex).
    pub sha256: String,
    /// Bytes of the signed package.
    pub size: usize,
    /// ms since the epoch.
    pub effective_from: i64,
    /// Blacklist only: the ids it adds to what gates hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<u64>,
    /// The rollout requested for it.
    pub rollout: RolloutOutcome,
}

/// The answer (202) of a blacklist upload held for a second engineer's confirmation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeldUploadOut {
    /// Always `confirmation_required`.
    pub code: String,
    /// The id to confirm (`POST /api/v1/parameters/blacklist/pending/{id}/confirm`): the version.
    pub pending_id: u64,
    pub version: u64,
    /// The ids it adds to what gates hold.
    pub added: u64,
    /// `api.blacklist_confirm_threshold`.
    pub threshold: u64,
    pub sha256: String,
    pub size: usize,
    pub message: String,
}

/// The answer of `POST /api/v1/parameters/blacklist/pending/{id}/confirm`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConfirmedUploadOut {
    pub kind: String,
    pub version: u64,
    pub added: u64,
    pub rollout: RolloutOutcome,
}

/// `POST /api/v1/parameters/fare-table`.
#[derive(Debug, Deserialize, ToSchema)]
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
    let version = packages::next_version(&state.node.sm.state()?, ParamKind::FareTable, 0);
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlacklistUpload {
    /// The complete list; replaces what gates hold.
    pub full: Option<Vec<Entry>>,
    pub delta: Option<DeltaUpload>,
    pub effective_from: Option<i64>,
    pub reason: String,
}

/// A blacklist delta of an upload.
#[derive(Debug, Deserialize, ToSchema)]
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
    let version = packages::next_version(&state.node.sm.state()?, ParamKind::Blacklist, 0);
    let current = version - 1;
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
    let key = state.signing.as_ref().ok_or(ApiError::SigningKeyMissing)?;
    let what = if matches!(body, BlacklistBody::Full(_)) { "full" } else { "delta" };
    // The one mass-insertion guard: the ids this adds to what gates hold, by set difference.
    let prepared = packages::prepare(
        &state.node,
        key,
        (ParamKind::Blacklist, version, eff),
        body.encode(),
        &caller.name,
        RolloutRule::Guarded { why: &why },
    )?;
    drop(body);
    let size = prepared.bytes.len();
    let added = prepared.added.unwrap_or(0);
    let threshold = state.node.config.api.blacklist_confirm_threshold;
    let held = prepared.held();
    let detail = format!("blacklist v{version} ({what}) adds {added} ids to what gates hold: {why}");
    let audit = if held {
        ("parameters.blacklist.held", format!("{detail} (> {threshold}: held)"))
    } else {
        ("parameters.blacklist", detail)
    };
    let published = prepared.commit(&state.node, Some(audit)).await?;
    let rollout = if held { None } else { Some(outcome_json(published.rollout)) };
    let sha256 = match super::rejection_to_error(published.stored)? {
        Response::PackageStored { sha256, .. } => hex::encode(sha256),
        other => return Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    };
    match rollout {
        None => Ok(HttpResponse::Accepted().json(HeldUploadOut {
            code: "confirmation_required".into(),
            pending_id: version,
            version,
            added,
            threshold,
            sha256,
            size,
            message: "stored, not rolled out: a second engineer must confirm this upload".into(),
        })),
        Some(rollout) => Ok(HttpResponse::Ok().json(UploadOut {
            kind: "blacklist".into(),
            version,
            sha256,
            size,
            effective_from: eff.0,
            added: Some(added),
            rollout,
        })),
    }
}

/// Body of `POST /api/v1/parameters/blacklist/pending/{id}/confirm`.
#[derive(Debug, Deserialize, ToSchema)]
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
        Response::RolloutConfirmed { version, .. } => Ok(HttpResponse::Ok().json(ConfirmedUploadOut {
            kind: kind.as_str().to_owned(),
            version,
            added: c.added,
            rollout: RolloutOutcome { requested: true, held_for_confirmation: Some(false), detail: None },
        })),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

/// `POST /api/v1/parameters/qr-keys`.
#[derive(Debug, Deserialize, ToSchema)]
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
    let version = packages::next_version(&state.node.sm.state()?, ParamKind::QrKeys, 0);
    let detail = format!("qr_keys v{version} ({} issuer keys): {why}", set.len());
    let json = serde_json::to_vec(&set).map_err(|e| ApiError::Internal(e.to_string()))?;
    let eff = Timestamp(b.effective_from.unwrap_or(now().0));
    sign_and_store(&state, &caller, ("parameters.qr_keys", detail), ParamKind::QrKeys, version, eff, json)
        .await
}

/// `POST /api/v1/parameters/gate-config`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateConfigUpload {
    /// The whole `gate_config` every gate of the station runs (replaces the current one); unknown
    /// fields and values out of range are refused.
    #[schema(value_type = afc_domain::package::GateConfigBody)]
    pub config: serde_json::Value,
    pub effective_from: Option<i64>,
    pub reason: String,
}

pub async fn upload_gate_config(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<GateConfigUpload>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let config = afc_domain::package::GateConfigBody::from_json_strict(&b.config)
        .map_err(ApiError::InvalidParameters)?;
    let version = packages::next_version(&state.node.sm.state()?, ParamKind::GateConfig, 0);
    let json =
        afc_domain::package::encode_json_body(&config).map_err(|e| ApiError::Internal(e.to_string()))?;
    let detail = format!("gate_config v{version} {}: {why}", String::from_utf8_lossy(&json));
    let eff = Timestamp(b.effective_from.unwrap_or(now().0));
    sign_and_store(
        &state,
        &caller,
        ("parameters.gate_config", detail),
        ParamKind::GateConfig,
        version,
        eff,
        json,
    )
    .await
}
