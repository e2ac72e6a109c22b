//! The public operations HTTP API (SPEC §9): `/api/v1/...` JSON for the console and automation,
//! `GET /metrics`, `GET /healthz`, `GET /readyz`, and the OpenAPI document of it all.
//!
//! Map of the module:
//! - this file: [`ApiState`], the route table [`ROUTES`] (one list feeds both the router and the
//!   OpenAPI document, so they cannot drift), [`configure`], and the audited write helper.
//! - [`error`]: [`ApiError`], the one place errors become HTTP statuses and stable codes.
//! - [`auth`]: bearer tokens (sha256 in the config) → role; the [`auth::Caller`] extractor enforces
//!   the route table's role for the matched route.
//! - [`cluster`], [`mode`], [`params`], [`records`] (ledger, clearing, audit), [`gates`],
//!   [`commissioning`] (register, replace the key of, decommission a gate): handlers.
//! - [`metrics`]: the Prometheus text exposition (SPEC §10) and the registry other tasks feed.
//! - [`openapi`]: the OpenAPI 3 document built from [`ROUTES`].
//!
//! Every write is proposed through Raft with [`crate::node::Node::write`], which forwards to the
//! leader from any node, and is preceded by a replicated `Audit` entry (who, what, when, why): an
//! audit line for a write that then failed is harmless, a write without one must never happen.

pub mod auth;
pub mod cluster;
pub mod commissioning;
pub mod error;
pub mod gates;
pub mod metrics;
pub mod mode;
pub mod openapi;
pub mod params;
pub mod records;
pub mod rollouts;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::Method;
use actix_web::{guard, web, HttpRequest, HttpResponse};
use afc_domain::model::{StationCode, Timestamp};
use ed25519_dalek::SigningKey;

use crate::config::ConfigError;
use crate::node::Node;
use crate::state::{Rejection, Request, Response};
pub use auth::{Access, Caller};
pub use error::ApiError;
pub use gates::{GateSnapshot, GateView, NoGateView};
pub use metrics::ControllerMetrics;

/// One served route, as the router registers it and the OpenAPI document lists it.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    /// actix pattern (`{name}` segments), which is also OpenAPI's path template syntax.
    pub path: &'static str,
    /// The least role that may call it.
    pub access: Access,
    pub summary: &'static str,
    /// Whether it changes replicated state (and is therefore audited).
    pub write: bool,
}

macro_rules! routes {
    ($( $method:ident $path:literal $access:ident $write:literal $summary:literal => $handler:path; )*) => {
        /// Every route the API listener serves.
        pub const ROUTES: &[RouteSpec] = &[
            $( RouteSpec { method: stringify!($method), path: $path, access: Access::$access, summary: $summary, write: $write }, )*
        ];

        fn register(cfg: &mut web::ServiceConfig) {
            $(
                cfg.service(
                    web::resource($path)
                        .guard(guard::Method(Method::$method))
                        .route(web::method(Method::$method).to($handler)),
                );
            )*
        }
    };
}

routes! {
    GET "/" Public false "The maintenance console (HTML; it logs in with a token)." => crate::console::page;
    GET "/healthz" Public false "Liveness: the process answers." => records::healthz;
    GET "/readyz" Public false "Readiness: this node knows a leader and its Raft core runs (503 raft_stopped after a fatal storage error)." => records::readyz;
    GET "/metrics" Public false "Prometheus metrics (text format)." => metrics::metrics;
    GET "/api/v1/openapi.json" Public false "This document." => openapi::openapi;
    GET "/api/v1/cluster" Viewer false "Nodes, leader, term, commit and apply index, replication lag." => cluster::get;
    POST "/api/v1/cluster/nodes" Engineer true "Add a node (learner, then voter unless voter=false)." => cluster::add;
    POST "/api/v1/cluster/nodes/{id}/remove" Engineer true "Remove a node from the voters." => cluster::remove;
    GET "/api/v1/mode" Viewer false "The station mode and its recent history." => mode::get;
    PUT "/api/v1/mode" Operator true "Set the station mode bits, with a reason." => mode::set;
    POST "/api/v1/mode/emergency-release" Operator true "Set or clear emergency release (needs confirm=true and a reason)." => mode::emergency;
    GET "/api/v1/parameters" Viewer false "Parameter kinds with their stored versions." => params::list;
    GET "/api/v1/parameters/{kind}/{version}" Viewer false "One stored package's header." => params::show;
    POST "/api/v1/parameters/fare-table" Engineer true "Compile a network + fare rule into a signed fare_table package." => params::upload_fare_table;
    POST "/api/v1/parameters/blacklist" Engineer true "Upload a full blacklist or a delta (mass insertions need a second confirmation)." => params::upload_blacklist;
    POST "/api/v1/parameters/qr-keys" Engineer true "Replace the QR issuer keys gates trust (a signed qr_keys package)." => params::upload_qr_keys;
    POST "/api/v1/parameters/blacklist/pending/{id}/confirm" Engineer true "Second engineer's confirmation of a held mass blacklist insertion." => params::confirm_blacklist;
    GET "/api/v1/rollouts" Viewer false "Staged rollouts per kind (stage, canaries, health verdicts) and requests waiting to start." => rollouts::status;
    POST "/api/v1/rollouts" Engineer true "Start a staged rollout of a stored version (mass blacklist insertions wait for a second engineer)." => rollouts::start;
    POST "/api/v1/rollouts/{kind}/abort" Engineer true "Abort or roll back a rollout (also once done): every gate goes back to the previous content, republished under a new version." => rollouts::abort;
    POST "/api/v1/rollouts/{kind}/confirm" Engineer true "Second engineer's confirmation of a held rollout (mass blacklist insertion)." => rollouts::confirm;
    GET "/api/v1/ledger" Viewer false "Ledger entries by index range (from, limit)." => records::ledger;
    GET "/api/v1/ledger/search" Viewer false "Ledger entries by time range (since_ms, until_ms), gate, card id and media; paged (from, limit → next_from)." => records::ledger_search;
    GET "/api/v1/ledger/stats" Viewer false "Ledger size, head and clearing backlog." => records::ledger_stats;
    GET "/api/v1/ledger/gaps" Viewer false "Sequence gaps recorded (from, limit): runs of a gate's numbers that the gate no longer held, acked past and reported to clearing." => records::gaps;
    GET "/api/v1/ledger/conflicts" Viewer false "Records refused because the ledger holds their (gate, installation, gate_seq) with other content (from, limit)." => records::conflicts;
    GET "/api/v1/ledger/verify" Viewer false "Verify the hash chain of the retained ledger." => records::ledger_verify;
    GET "/api/v1/clearing" Viewer false "Clearing cursor, backlog, last success and last error; lag_ms and lag_alarm (records waiting with no upload acknowledged for clearing.lag_alarm_secs, leader only)." => records::clearing;
    GET "/api/v1/audit" Viewer false "The replicated audit log (from, limit)." => records::audit;
    GET "/api/v1/gates" Viewer false "Every gate: online, direction, service, alarms, versions desired vs reported." => gates::list;
    GET "/api/v1/gates/{gate}" Viewer false "One gate in detail." => gates::detail;
    POST "/api/v1/gates" Engineer true "Commission a gate: register its id and transaction-signing key (ed25519, hex) with a reason; a decommissioned gate is registered again." => commissioning::register;
    PUT "/api/v1/gates/{gate}/key" Engineer true "Replace a gate's transaction-signing key (new hardware, compromised key) with a reason: batches signed with the old key are refused from then on." => commissioning::replace_key;
    POST "/api/v1/gates/{gate}/decommission" Engineer true "Decommission a gate with a reason: its batches are refused and its messages no longer verify; its ledger progress is kept." => commissioning::decommission;
    POST "/api/v1/gates/{gate}/commands" Operator true "Command a gate (open_once_entry, open_once_exit, set_direction, out_of_service, in_service) with a reason; answers with the gate's acknowledgement." => gates::command;
}

/// What the handlers share.
pub struct ApiState {
    pub node: Arc<Node>,
    pub tokens: auth::Tokens,
    /// Live gate state, fed by the leader's MQTT duties.
    pub gates: Arc<dyn GateView>,
    pub metrics: Arc<ControllerMetrics>,
    /// Station package-signing key and its id.
    pub signing: Option<(u32, SigningKey)>,
    /// The station code mode changes name.
    pub station_code: StationCode,
    /// The leader's MQTT duties (gate commands, MQTT connection state); `None` without `[mqtt]`.
    pub duties: Option<Arc<crate::leader::Duties>>,
    /// The clearing upload's status (`/api/v1/clearing`, `/metrics`); `None` in tests that run
    /// no uploader.
    pub clearing: Option<crate::clearing_sync::ClearingStatusHandle>,
    /// Slots for ledger scans (verify, search): `api.max_concurrent_scans` at once.
    pub scans: records::ScanLimit,
}

impl ApiState {
    /// Builds the state from the node's config; reads the signing key file if one is set.
    pub fn new(
        node: Arc<Node>,
        gates: Arc<dyn GateView>,
        metrics: Arc<ControllerMetrics>,
    ) -> Result<ApiState, ConfigError> {
        let api = &node.config.api;
        let signing = match &api.signing_key_file {
            Some(p) => Some((api.signing_key_id, read_signing_key(p)?)),
            None => None,
        };
        Ok(ApiState {
            tokens: auth::Tokens::from_config(&api.tokens),
            station_code: StationCode(api.station_code),
            gates,
            metrics,
            signing,
            duties: None,
            clearing: None,
            scans: records::ScanLimit::new(api),
            node,
        })
    }

    /// Adds the leader's MQTT duties (gate commands, MQTT state in `/metrics`).
    pub fn with_duties(mut self, duties: Option<Arc<crate::leader::Duties>>) -> Self {
        self.duties = duties;
        self
    }

    /// Adds the clearing uploader's status.
    pub fn with_clearing(mut self, status: crate::clearing_sync::ClearingStatusHandle) -> Self {
        self.clearing = Some(status);
        self
    }

    /// Records `action` in the audit log, then commits `req` through the leader.
    pub async fn audited_write(
        &self,
        caller: &Caller,
        action: &str,
        detail: String,
        req: Request,
    ) -> Result<Response, ApiError> {
        self.audit(caller, action, detail).await?;
        rejection_to_error(self.node.write(req, 0).await?)
    }

    /// Appends one replicated audit line.
    pub async fn audit(&self, caller: &Caller, action: &str, detail: String) -> Result<(), ApiError> {
        let line =
            Request::Audit { actor: caller.name.clone(), action: action.to_owned(), detail, at: now() };
        self.node.write(line, 0).await?;
        Ok(())
    }
}

/// A state-machine refusal as an API error (a stale version is a conflict).
pub fn rejection_to_error(r: Response) -> Result<Response, ApiError> {
    match r {
        Response::Rejected { rejection } => Err(match rejection {
            Rejection::StaleVersion { .. } | Rejection::RolloutChanged { .. } => {
                ApiError::Conflict(rejection.to_string())
            }
            Rejection::UnknownVersion { .. } => ApiError::NotFound(rejection.to_string()),
            Rejection::Rollout { rollout_code, detail } => match rollout_code.as_str() {
                "same_operator" => ApiError::SameConfirmer { actor: detail },
                "no_rollout" => ApiError::NotFound(detail),
                _ => ApiError::Conflict(detail),
            },
            other => ApiError::InvalidParameters(other.to_string()),
        }),
        r => Ok(r),
    }
}

/// Reads the station package-signing key (ed25519 seed, 64 hex characters on the first line).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let seed: [u8; 32] = hex::decode(text.lines().next().unwrap_or("").trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ConfigError::Invalid(format!("{}: expected 64 hex characters", path.display())))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The current time as a domain timestamp.
pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Checks an operator's reason: required on every write, bounded.
pub fn reason(r: &str) -> Result<String, ApiError> {
    let r = r.trim();
    if r.is_empty() {
        return Err(ApiError::BadRequest("a non-empty reason is required".into()));
    }
    if r.len() > 1000 {
        return Err(ApiError::BadRequest("reason is longer than 1000 bytes".into()));
    }
    Ok(r.to_owned())
}

async fn no_route(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoRoute { method: req.method().to_string(), path: req.path().to_owned() })
}

/// Registers every API route with its body limits and error mapping.
pub fn configure(state: Arc<ApiState>) -> impl Fn(&mut web::ServiceConfig) + Clone {
    let limit = state.node.config.api.max_body_bytes;
    let data = web::Data::from(state);
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(data.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(limit)
                    .error_handler(move |e, _| error::json_error(e, limit)),
            )
            .app_data(
                web::PathConfig::default().error_handler(|e, _| ApiError::NotFound(e.to_string()).into()),
            )
            .app_data(
                web::QueryConfig::default().error_handler(|e, _| ApiError::BadRequest(e.to_string()).into()),
            );
        register(cfg);
        cfg.default_service(web::to(no_route));
    }
}

/// Routes whose path matches `path` template-wise, for tests and the console.
pub fn routes_by_path() -> BTreeMap<&'static str, Vec<&'static RouteSpec>> {
    let mut m: BTreeMap<&str, Vec<&RouteSpec>> = BTreeMap::new();
    for r in ROUTES {
        m.entry(r.path).or_default().push(r);
    }
    m
}
