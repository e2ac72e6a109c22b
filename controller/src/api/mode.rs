//! `/api/v1/mode`: the station operating mode (SPEC §2) and the guarded emergency release.

use actix_web::{web, HttpResponse};
use afc_domain::mode::ModeBits;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{reason, ApiError, ApiState, Caller};
use crate::clock::now;
use crate::state::{ModeChange, Request, Response};

/// `GET /api/v1/mode`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModeOut {
    pub station_code: u16,
    pub bits: u16,
    pub names: Vec<String>,
    pub emergency_release: bool,
    /// Recorded changes of the last days, oldest first.
    pub history: Vec<ModeChange>,
}

pub fn current(state: &ApiState) -> Result<ModeOut, ApiError> {
    let s = state.node.sm.state()?;
    let bits = s.modes.bits_at(state.station_code, now());
    Ok(ModeOut {
        station_code: state.station_code.0,
        bits: bits.0,
        names: bits.names().into_iter().map(str::to_owned).collect(),
        emergency_release: bits.has(ModeBits::EMERGENCY_RELEASE),
        history: s.mode_changes.into_iter().filter(|c| c.station == state.station_code).collect(),
    })
}

pub async fn get(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(current(&state)?))
}

/// `PUT /api/v1/mode`: either `bits` or `names` (`["fare_free", "time_free"]`, `["normal"]`): the
/// whole set of bits. The emergency release bit must stay as it is (400 `invalid_parameters`
/// otherwise): only `POST /api/v1/mode/emergency-release` with `confirm` changes it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMode {
    pub bits: Option<u16>,
    pub names: Option<Vec<String>>,
    pub reason: String,
}

async fn write_mode(
    caller: &Caller,
    state: &ApiState,
    action: &str,
    bits: ModeBits,
    why: String,
) -> Result<HttpResponse, ApiError> {
    let req = Request::SetMode {
        station: state.station_code,
        bits,
        reason: why.clone(),
        actor: caller.name.clone(),
        at: now(),
    };
    let resp = state.audited_write(caller, action, format!("bits {bits}: {why}"), req).await?;
    let previous = match resp {
        Response::ModeSet { previous, .. } => previous,
        _ => bits,
    };
    Ok(HttpResponse::Ok().json(ModeSetOut {
        bits: bits.0,
        names: bits.names().into_iter().map(str::to_owned).collect(),
        previous: previous.0,
    }))
}

/// The answer of `PUT /api/v1/mode` and `POST /api/v1/mode/emergency-release`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModeSetOut {
    /// The mode bits now set.
    pub bits: u16,
    /// Their names (`normal` when none).
    pub names: Vec<String>,
    /// The bits before the change.
    pub previous: u16,
}

pub async fn set(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<SetMode>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let bits = match (b.bits, b.names) {
        (Some(bits), None) => ModeBits(bits),
        (None, Some(names)) => names.iter().try_fold(ModeBits::NORMAL, |acc, n| {
            ModeBits::parse_name(n)
                .map(|b| acc.with(b))
                .ok_or_else(|| ApiError::BadRequest(format!("unknown mode name {n:?}")))
        })?,
        _ => return Err(ApiError::BadRequest("give exactly one of bits and names".into())),
    };
    // Emergency release opens every flap: it is set and cleared only through its own guarded
    // route (with confirm), never as a side effect of another bit's change.
    let held = state.node.sm.state()?.modes.bits_at(state.station_code, now());
    let er = ModeBits::EMERGENCY_RELEASE;
    if bits.has(er) != held.has(er) {
        return Err(ApiError::InvalidParameters(format!(
            "emergency release is {} only through POST /api/v1/mode/emergency-release with \"confirm\": true",
            if bits.has(er) { "set" } else { "cleared" }
        )));
    }
    write_mode(&caller, &state, "mode.set", bits, why).await
}

/// `POST /api/v1/mode/emergency-release`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Emergency {
    /// true sets emergency release, false clears it (default true).
    #[serde(default = "yes")]
    pub active: bool,
    /// Must be true: the console asks the operator to confirm before sending.
    #[serde(default)]
    pub confirm: bool,
    pub reason: String,
}

fn yes() -> bool {
    true
}

pub async fn emergency(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<Emergency>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    if !b.confirm {
        return Err(ApiError::BadRequest("emergency release needs \"confirm\": true".into()));
    }
    let why = reason(&b.reason)?;
    let held = state.node.sm.state()?.modes.bits_at(state.station_code, now());
    let bits = if b.active {
        held.with(ModeBits::EMERGENCY_RELEASE)
    } else {
        held.without(ModeBits::EMERGENCY_RELEASE)
    };
    let action = if b.active { "mode.emergency_release.set" } else { "mode.emergency_release.clear" };
    write_mode(&caller, &state, action, bits, why).await
}
