//! `/api/v1/mode`: the station operating mode (SPEC §2) and the guarded emergency release.

use actix_web::{web, HttpResponse};
use afc_domain::mode::ModeBits;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{reason, ApiError, ApiState, Caller};
use crate::clock::now;
use crate::state::{ModeChange, Request, Response};
use afc_domain::model::Timestamp;

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

/// The bits of a body: exactly one of `bits` and `names`.
fn bits_of(bits: Option<u16>, names: Option<Vec<String>>) -> Result<ModeBits, ApiError> {
    match (bits, names) {
        (Some(bits), None) => Ok(ModeBits(bits)),
        (None, Some(names)) => names.iter().try_fold(ModeBits::NORMAL, |acc, n| {
            ModeBits::parse_name(n)
                .map(|b| acc.with(b))
                .ok_or_else(|| ApiError::BadRequest(format!("unknown mode name {n:?}")))
        }),
        _ => Err(ApiError::BadRequest("give exactly one of bits and names".into())),
    }
}

pub async fn set(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<SetMode>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let bits = bits_of(b.bits, b.names)?;
    let s = state.node.sm.state()?;
    let at = now();
    // Bits held only by a scheduled window now are the window's, not the station's: sent back
    // with the whole set (as the console does), they would outlive the window.
    let windows = s.window_bits(state.station_code, at);
    let own = s.last_mode_set(state.station_code).map_or(ModeBits::NORMAL, |c| c.bits);
    let bits = bits.without(ModeBits(windows.0 & !own.0));
    let held = s.modes.bits_at(state.station_code, at);
    // Emergency release opens every flap: it is set and cleared only through its own guarded
    // route (with confirm), never as a side effect of another bit's change.
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

/// `POST /api/v1/mode/schedule`: `bits` (or `names`) added to the station's mode from `from`
/// until `until` (ms since the epoch, controller clock), SPEC §2's mode change with a start and
/// end time: a night closure, 24-hour service for an event, fare free during planned works. The
/// leader publishes the mode again at both instants. Emergency release cannot be scheduled.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleMode {
    pub bits: Option<u16>,
    pub names: Option<Vec<String>>,
    pub from: i64,
    pub until: i64,
    pub reason: String,
}

/// The answer of `POST /api/v1/mode/schedule` and `POST /api/v1/mode/schedule/end`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduledOut {
    pub bits: u16,
    pub names: Vec<String>,
    pub from: i64,
    /// When the window ends (for `end`: now, or `from` when it had not begun).
    pub until: i64,
}

impl ScheduledOut {
    fn new(bits: ModeBits, from: Timestamp, until: Timestamp) -> ScheduledOut {
        let names = bits.names().into_iter().map(str::to_owned).collect();
        ScheduledOut { bits: bits.0, names, from: from.0, until: until.0 }
    }
}

/// Longest scheduled window, and how far ahead one may start.
const MAX_WINDOW_DAYS: i64 = 7;
const MAX_AHEAD_DAYS: i64 = 31;

pub async fn schedule(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<ScheduleMode>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let bits = bits_of(b.bits, b.names)?;
    let (from, until, at) = (Timestamp(b.from), Timestamp(b.until), now());
    let invalid = |m: &str| Err(ApiError::InvalidParameters(m.to_owned()));
    if bits == ModeBits::NORMAL {
        return invalid("a scheduled window needs at least one mode bit");
    }
    if bits.has(ModeBits::EMERGENCY_RELEASE) {
        return invalid("emergency release is never scheduled: POST /api/v1/mode/emergency-release");
    }
    if until <= from {
        return invalid("until must be after from");
    }
    if from < at.plus_minutes(-1) {
        return invalid("from lies in the past");
    }
    if until > from.plus_days(MAX_WINDOW_DAYS) || from > at.plus_days(MAX_AHEAD_DAYS) {
        return invalid("a window lasts at most 7 days and starts at most 31 days ahead");
    }
    let req = Request::ScheduleMode {
        station: state.station_code,
        bits,
        from,
        until,
        reason: why.clone(),
        actor: caller.name.clone(),
        at,
    };
    let detail = format!("bits {bits} from {} until {}: {why}", from.0, until.0);
    state.audited_write(&caller, "mode.schedule", detail, req).await?;
    Ok(HttpResponse::Ok().json(ScheduledOut::new(bits, from, until)))
}

/// `POST /api/v1/mode/schedule/end`: ends the window that starts at `from` now (one that has not
/// begun is removed); 400 `invalid_parameters` when there is none that has not ended.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndWindow {
    pub from: i64,
    pub reason: String,
}

pub async fn end_window(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<EndWindow>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    let from = Timestamp(b.from);
    let req = Request::EndModeWindow { station: state.station_code, from, at: now() };
    let resp = state
        .audited_write(&caller, "mode.schedule.end", format!("window from {}: {why}", from.0), req)
        .await?;
    let (bits, until) = match resp {
        Response::ModeScheduled { bits, until, .. } => (bits, until),
        _ => (ModeBits::NORMAL, from),
    };
    Ok(HttpResponse::Ok().json(ScheduledOut::new(bits, from, until)))
}
