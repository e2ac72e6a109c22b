//! Gate commissioning as an engineer's audited operation (issue 11 item 5): `POST /api/v1/gates`
//! registers a gate with its transaction-signing key, `PUT /api/v1/gates/{gate}/key` replaces the
//! key (new hardware, a compromised key: batches signed with the old one are refused from the
//! commit on), `POST /api/v1/gates/{gate}/decommission` takes a gate out of service (its batches
//! are refused, its messages no longer verify; its ledger progress stays, so registering it again
//! never reuses a gate_seq the ledger holds). Each is audited ([`ApiState::audited_write`]: the
//! audit entry commits before the change) with the engineer's reason; `mqtt.gates` in the config
//! stays for first commissioning and tests, `POST /admin/write` for the cluster itself.
//!
//! The checks against the current registration (already registered, not registered, same key)
//! read this node's state machine, so a node that lags may answer from a slightly older view; the
//! state machine applies each request the same on every node whatever the order.

use actix_web::{web, HttpResponse};
use afc_domain::model::Ident;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{reason, ApiError, ApiState, Caller};
use crate::state::{GateInfo, Request, Response};

/// Body of `POST /api/v1/gates`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub gate: String,
    /// ed25519 public key, 64 hex characters.
    pub tx_public_key: String,
    /// The gate's hardware profile (default `default`).
    #[serde(default = "default_profile")]
    pub hardware_profile: String,
    pub reason: String,
}

/// The answer of `POST /api/v1/gates`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisteredOut {
    pub gate: Ident,
    /// The registered key (lower-case hex).
    pub tx_public_key: String,
    /// The gate was decommissioned and is registered again.
    pub recommissioned: bool,
}

/// The answer of `PUT /api/v1/gates/{gate}/key`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyReplacedOut {
    pub gate: Ident,
    /// The new key (lower-case hex).
    pub tx_public_key: String,
    pub key_replaced: bool,
}

/// The answer of `POST /api/v1/gates/{gate}/decommission`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecommissionedOut {
    pub gate: Ident,
    /// Always true.
    pub decommissioned: bool,
}

fn default_profile() -> String {
    "default".into()
}

/// Body of `PUT /api/v1/gates/{gate}/key`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceKeyBody {
    pub tx_public_key: String,
    /// Keeps the registered profile when absent.
    pub hardware_profile: Option<String>,
    pub reason: String,
}

/// Body of `POST /api/v1/gates/{gate}/decommission`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecommissionBody {
    pub reason: String,
}

fn gate_id(gate: &str) -> Result<Ident, ApiError> {
    Ident::new(gate).map_err(|e| ApiError::BadRequest(format!("gate id {gate:?}: {e}")))
}

/// The key as the state machine stores it (lower-case hex), checked to be a valid ed25519 point.
fn key_hex(key: &str) -> Result<String, ApiError> {
    let bytes: [u8; 32] = hex::decode(key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ApiError::BadRequest("tx_public_key: expected 64 hex characters".into()))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| ApiError::BadRequest("tx_public_key is not a valid ed25519 public key".into()))?;
    Ok(hex::encode(bytes))
}

fn profile(p: &str) -> Result<String, ApiError> {
    let p = p.trim();
    if p.is_empty() || p.len() > 64 {
        return Err(ApiError::BadRequest("hardware_profile must be 1 to 64 bytes".into()));
    }
    Ok(p.to_owned())
}

fn registered(state: &ApiState, gate: &Ident) -> Result<Option<GateInfo>, ApiError> {
    Ok(state.node.sm.state()?.gates.get(gate).cloned())
}

/// The first 16 hex characters of a key, for audit lines.
fn short(key: &str) -> &str {
    &key[..key.len().min(16)]
}

pub async fn register(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let gate = gate_id(&b.gate)?;
    let key = key_hex(&b.tx_public_key)?;
    let profile = profile(&b.hardware_profile)?;
    let recommission = match registered(&state, &gate)? {
        Some(info) if !info.decommissioned => {
            return Err(ApiError::Conflict(format!(
                "gate {gate} is registered already; replace its key with PUT /api/v1/gates/{gate}/key"
            )))
        }
        Some(_) => true,
        None => false,
    };
    let detail = format!(
        "gate {gate} key {}… profile {profile}{}: {why}",
        short(&key),
        if recommission { " (recommissioned)" } else { "" }
    );
    let req =
        Request::RegisterGate { gate: gate.clone(), tx_public_key: key.clone(), hardware_profile: profile };
    match state.audited_write(&caller, "gate.register", detail, req).await? {
        Response::GateRegistered { .. } => Ok(HttpResponse::Ok().json(RegisteredOut {
            gate,
            tx_public_key: key,
            recommissioned: recommission,
        })),
        other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
    }
}

pub async fn replace_key(
    caller: Caller,
    state: web::Data<ApiState>,
    gate: web::Path<String>,
    body: web::Json<ReplaceKeyBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let gate = gate_id(&gate.into_inner())?;
    let key = key_hex(&b.tx_public_key)?;
    let info = registered(&state, &gate)?.ok_or_else(|| ApiError::NotFound(format!("gate {gate}")))?;
    if info.decommissioned {
        return Err(ApiError::Conflict(format!(
            "gate {gate} is decommissioned; register it again with POST /api/v1/gates"
        )));
    }
    let old = hex::encode(info.tx_public_key);
    if old == key {
        return Err(ApiError::Conflict(format!("gate {gate} already has this key")));
    }
    let profile = match &b.hardware_profile {
        Some(p) => profile(p)?,
        None => info.hardware_profile.clone(),
    };
    let detail =
        format!("gate {gate} key {}… replaced by {}… profile {profile}: {why}", short(&old), short(&key));
    let req =
        Request::RegisterGate { gate: gate.clone(), tx_public_key: key.clone(), hardware_profile: profile };
    match state.audited_write(&caller, "gate.replace_key", detail, req).await? {
        Response::GateRegistered { key_replaced, .. } => {
            Ok(HttpResponse::Ok().json(KeyReplacedOut { gate, tx_public_key: key, key_replaced }))
        }
        other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
    }
}

pub async fn decommission(
    caller: Caller,
    state: web::Data<ApiState>,
    gate: web::Path<String>,
    body: web::Json<DecommissionBody>,
) -> Result<HttpResponse, ApiError> {
    let why = reason(&body.reason)?;
    let gate = gate_id(&gate.into_inner())?;
    let info = registered(&state, &gate)?.ok_or_else(|| ApiError::NotFound(format!("gate {gate}")))?;
    if info.decommissioned {
        return Err(ApiError::Conflict(format!("gate {gate} is decommissioned already")));
    }
    let detail = format!(
        "gate {gate} (key {}…, ledger through gate_seq {}): {why}",
        short(&hex::encode(info.tx_public_key)),
        info.current_progress().contiguous_through
    );
    match state
        .audited_write(&caller, "gate.decommission", detail, Request::DecommissionGate { gate: gate.clone() })
        .await?
    {
        Response::GateDecommissioned { .. } => {
            Ok(HttpResponse::Ok().json(DecommissionedOut { gate, decommissioned: true }))
        }
        other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
    }
}
