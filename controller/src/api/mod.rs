//! The public operations HTTP API (SPEC §9): `/api/v1/...` JSON for the console and automation,
//! `GET /metrics`, `GET /healthz`, `GET /readyz`, and the OpenAPI document of it all.
//!
//! Map of the module:
//! - this file: [`ApiState`], the route table [`ROUTES`] (one list feeds both the router and the
//!   OpenAPI document, so they cannot drift), [`configure`], and the audited write helper.
//! - [`error`]: [`ApiError`], the one place errors become HTTP statuses and stable codes.
//! - [`auth`]: bearer tokens (sha256 in the config) → role; the [`auth::Caller`] extractor enforces
//!   the route table's role for the matched route.
//! - [`cluster`], [`mode`], [`params`], [`records`] (ledger, clearing, audit), [`flow`] (taps per
//!   minute for the console's chart), [`gates`],
//!   [`commissioning`] (register, replace the key of, decommission a gate): handlers.
//! - [`metrics`]: `GET /metrics`, the Prometheus text exposition (SPEC §10), filling the scraped
//!   families of [`crate::metrics::ControllerMetrics`], the registry other tasks feed.
//! - [`assets`]: the maintenance console's files ([`crate::console`]) as routes.
//! - [`openapi`]: the OpenAPI 3 document built from [`ROUTES`].
//!
//! Every write is proposed through Raft with [`crate::node::Node::write`], which forwards to the
//! leader from any node, and is preceded by a replicated `Audit` entry (who, what, when, why): an
//! audit line for a write that then failed is harmless, a write without one must never happen.

pub mod assets;
pub mod auth;
pub mod cluster;
pub mod commissioning;
pub mod days;
pub mod error;
pub mod flow;
pub mod gates;
pub mod metrics;
pub mod mode;
pub mod openapi;
pub mod params;
pub mod records;
pub mod rollouts;

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::Method;
use actix_web::{guard, web, HttpRequest, HttpResponse};
use afc_domain::model::StationCode;

use crate::clock::now;
use crate::config::ConfigError;
pub use crate::gate_view::{GateSnapshot, GateView, NoGateView};
pub use crate::metrics::ControllerMetrics;
use crate::node::Node;
use crate::secrets::StationKey;
use crate::state::{Rejection, Request, Response};
pub use auth::{Access, Caller};
pub use error::ApiError;

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
    /// Its query parameters (the handler's `web::Query` type), if any.
    pub query: Option<openapi::ParamsFn>,
    /// Its request body (the handler's `web::Json` type), if any.
    pub request: Option<openapi::BodyFn>,
    /// Its success answers: status and body (the type the handler serialises).
    pub responses: &'static [(u16, openapi::BodyFn)],
    /// Error statuses it gives beyond those that follow from the rest of its row
    /// ([`openapi::error_statuses`]).
    pub errors: &'static [u16],
}

impl RouteSpec {
    /// The names of its path parameters (`{gate}` → `gate`), in order.
    pub fn path_params(&self) -> impl Iterator<Item = &'static str> {
        self.path.split('/').filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
    }
}

/// `()` or `(Type)`: the route's query type, as a [`openapi::ParamsFn`].
macro_rules! query_spec {
    (()) => {
        None
    };
    (($t:ty)) => {
        Some(openapi::query::<$t> as openapi::ParamsFn)
    };
}

/// `()` or `(Type)`: the route's JSON request body, as a [`openapi::BodyFn`].
macro_rules! request_spec {
    (()) => {
        None
    };
    (($t:ty)) => {
        Some(openapi::json::<$t> as openapi::BodyFn)
    };
}

/// One row of the table: method, path, least role, whether it is an audited write, summary, the
/// handler, then its query type, request body type (`()` for none), success answers
/// (`[status kind(Type)]`, kind one of [`openapi::json`], [`openapi::list`], [`openapi::html`],
/// [`openapi::javascript`], [`openapi::css`], [`openapi::text`]) and the error statuses it gives beyond the ones its row implies.
macro_rules! routes {
    ($( $method:ident $path:literal $access:ident $write:literal $summary:literal
        => $handler:path, $query:tt, $req:tt, [$($status:literal $kind:ident($resp:ty)),+], [$($err:literal),*]; )*) => {
        /// Every route the API listener serves.
        pub const ROUTES: &[RouteSpec] = &[
            $( RouteSpec {
                method: stringify!($method),
                path: $path,
                access: Access::$access,
                summary: $summary,
                write: $write,
                query: query_spec!($query),
                request: request_spec!($req),
                responses: &[$(($status, openapi::$kind::<$resp> as openapi::BodyFn)),+],
                errors: &[$($err),*],
            }, )*
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

use cluster::{AddNode, ClusterOut, MembershipOut, RemoveNode};
use commissioning::{
    DecommissionBody, DecommissionedOut, KeyReplacedOut, RegisterBody, RegisteredOut, ReplaceKeyBody,
};
use days::{
    CloseBody, DayOut, DaySummary, FlowReport, IncidentsReport, RejectsReport, ReportQuery, RevenueReport,
};
use gates::{CommandBody, CommandOut, GateOut};
use mode::{Emergency, EndWindow, ModeOut, ModeSetOut, ScheduleMode, ScheduledOut, SetMode};
use params::{
    BlacklistUpload, Confirm, ConfirmedUploadOut, FareUpload, GateConfigUpload, HeldUploadOut, KindOut,
    PackageOut, QrKeysUpload, UploadOut,
};
use records::{ClearingOut, HealthOut, LedgerStats, Page, ReadyOut, Search, SearchPage, VerifyOut};
use rollouts::{
    ReasonBody, RolloutAbortedOut, RolloutConfirmedOut, RolloutRequestedOut, RolloutsOut, StartBody,
};

routes! {
    GET "/" Public false "The maintenance console (HTML; it logs in with a token)."
        => assets::page, (), (), [200 html(String)], [];
    GET "/console.js" Public false "The console's script."
        => assets::script, (), (), [200 javascript(String)], [];
    GET "/i18n.js" Public false "The console's strings in Simplified Chinese and English (one table)."
        => assets::strings, (), (), [200 javascript(String)], [];
    GET "/console.css" Public false "The console's style sheet."
        => assets::style, (), (), [200 css(String)], [];
    GET "/healthz" Public false "Liveness: the process answers."
        => records::healthz, (), (), [200 json(HealthOut)], [];
    GET "/readyz" Public false "Readiness: this node knows a leader and its Raft core runs (503 raft_stopped after a fatal storage error)."
        => records::readyz, (), (), [200 json(ReadyOut)], [503];
    GET "/metrics" Public false "Prometheus metrics (text format)."
        => metrics::metrics, (), (), [200 text(String)], [];
    GET "/api/v1/openapi.json" Public false "This document."
        => openapi::openapi, (), (), [200 json(openapi::OpenApiDocument)], [];
    GET "/api/v1/cluster" Viewer false "Nodes, leader, term, commit and apply index, replication lag."
        => cluster::get, (), (), [200 json(ClusterOut)], [];
    POST "/api/v1/cluster/nodes" Engineer true "Add a node (learner, then voter unless voter=false)."
        => cluster::add, (), (AddNode), [200 json(MembershipOut)], [];
    POST "/api/v1/cluster/nodes/{id}/remove" Engineer true "Remove a node from the voters."
        => cluster::remove, (), (RemoveNode), [200 json(MembershipOut)], [];
    GET "/api/v1/mode" Viewer false "The station mode and its recent history."
        => mode::get, (), (), [200 json(ModeOut)], [500];
    PUT "/api/v1/mode" Operator true "Set the station mode bits, with a reason."
        => mode::set, (), (SetMode), [200 json(ModeSetOut)], [];
    POST "/api/v1/mode/emergency-release" Operator true "Set or clear emergency release (needs confirm=true and a reason)."
        => mode::emergency, (), (Emergency), [200 json(ModeSetOut)], [];
    POST "/api/v1/mode/schedule" Operator true "Add mode bits from a start until an end time (SPEC §2), with a reason."
        => mode::schedule, (), (ScheduleMode), [200 json(ScheduledOut)], [];
    POST "/api/v1/mode/schedule/end" Operator true "End a scheduled mode window now (one not begun is removed)."
        => mode::end_window, (), (EndWindow), [200 json(ScheduledOut)], [];
    GET "/api/v1/parameters" Viewer false "Parameter kinds with their stored versions."
        => params::list, (), (), [200 list(KindOut)], [500];
    GET "/api/v1/parameters/{kind}/{version}" Viewer false "One stored package's header."
        => params::show, (), (), [200 json(PackageOut)], [500];
    POST "/api/v1/parameters/fare-table" Engineer true "Compile a network + fare rule into a signed fare_table package."
        => params::upload_fare_table, (), (FareUpload), [200 json(UploadOut)], [];
    POST "/api/v1/parameters/blacklist" Engineer true "Upload a full blacklist or a delta (mass insertions need a second confirmation)."
        => params::upload_blacklist, (), (BlacklistUpload), [200 json(UploadOut), 202 json(HeldUploadOut)], [];
    POST "/api/v1/parameters/qr-keys" Engineer true "Replace the QR issuer keys gates trust (a signed qr_keys package)."
        => params::upload_qr_keys, (), (QrKeysUpload), [200 json(UploadOut)], [];
    POST "/api/v1/parameters/gate-config" Engineer true "Replace the gate_config every gate runs (release on controller loss, re-tap window, direction, hardware profile) with a signed gate_config package."
        => params::upload_gate_config, (), (GateConfigUpload), [200 json(UploadOut)], [];
    POST "/api/v1/parameters/blacklist/pending/{id}/confirm" Engineer true "Second engineer's confirmation of a held mass blacklist insertion."
        => params::confirm_blacklist, (), (Confirm), [200 json(ConfirmedUploadOut)], [];
    GET "/api/v1/rollouts" Viewer false "Staged rollouts per kind (stage, canaries, health verdicts) and requests waiting to start."
        => rollouts::status, (), (), [200 json(RolloutsOut)], [500];
    POST "/api/v1/rollouts" Engineer true "Start a staged rollout of a stored version (mass blacklist insertions wait for a second engineer)."
        => rollouts::start, (), (StartBody), [202 json(RolloutRequestedOut)], [];
    POST "/api/v1/rollouts/{kind}/abort" Engineer true "Abort or roll back a rollout (also once done): every gate goes back to the previous content, republished under a new version."
        => rollouts::abort, (), (ReasonBody), [200 json(RolloutAbortedOut)], [];
    POST "/api/v1/rollouts/{kind}/confirm" Engineer true "Second engineer's confirmation of a held rollout (mass blacklist insertion)."
        => rollouts::confirm, (), (ReasonBody), [200 json(RolloutConfirmedOut)], [];
    GET "/api/v1/ledger" Viewer false "Ledger entries by index range (from, limit)."
        => records::ledger, (Page), (), [200 list(crate::chain::LedgerEntry)], [400, 500];
    GET "/api/v1/ledger/search" Viewer false "Ledger entries by time range (since_ms, until_ms), gate, card id and media; paged (from, limit → next_from)."
        => records::ledger_search, (Search), (), [200 json(SearchPage)], [400, 500, 503];
    GET "/api/v1/ledger/stats" Viewer false "Ledger size, head and clearing backlog."
        => records::ledger_stats, (), (), [200 json(LedgerStats)], [500];
    GET "/api/v1/ledger/gaps" Viewer false "Sequence gaps recorded (from, limit): runs of a gate's numbers that the gate no longer held, acked past and reported to clearing."
        => records::gaps, (Page), (), [200 list(afc_domain::ledger::SequenceGap)], [400, 500];
    GET "/api/v1/ledger/conflicts" Viewer false "Records refused because the ledger holds their (gate, installation, gate_seq) with other content (from, limit)."
        => records::conflicts, (Page), (), [200 list(crate::state::KeyConflict)], [400, 500];
    GET "/api/v1/ledger/verify" Viewer false "Verify the hash chain of the retained ledger."
        => records::ledger_verify, (), (), [200 json(VerifyOut)], [500, 503];
    GET "/api/v1/clearing" Viewer false "Clearing cursor, backlog, last success and last error; lag_ms and lag_alarm (records waiting with no upload acknowledged for clearing.lag_alarm_secs, leader only)."
        => records::clearing, (), (), [200 json(ClearingOut)], [500];
    GET "/api/v1/audit" Viewer false "The replicated audit log (from, limit), optionally only lines whose actor or action contains a text (actor, action; case-insensitive)."
        => records::audit, (records::AuditQuery), (), [200 list(crate::state::AuditEntry)], [400, 500];
    GET "/api/v1/flow" Viewer false "Passenger flow from the ledger: accepted taps per minute by direction over the last minutes (default 60, at most 180), refusals per gate by reason."
        => flow::flow, (flow::FlowQuery), (), [200 json(flow::FlowOut)], [400, 500, 503];
    GET "/api/v1/gates" Viewer false "Every gate: online, direction, service, alarms, versions desired vs reported."
        => gates::list, (), (), [200 list(GateOut)], [500];
    GET "/api/v1/gates/{gate}" Viewer false "One gate in detail."
        => gates::detail, (), (), [200 json(GateOut)], [500];
    POST "/api/v1/gates" Engineer true "Commission a gate: register its id and transaction-signing key (ed25519, hex) with a reason; a decommissioned gate is registered again."
        => commissioning::register, (), (RegisterBody), [200 json(RegisteredOut)], [];
    PUT "/api/v1/gates/{gate}/key" Engineer true "Replace a gate's transaction-signing key (new hardware, compromised key) with a reason: batches signed with the old key are refused from then on."
        => commissioning::replace_key, (), (ReplaceKeyBody), [200 json(KeyReplacedOut)], [];
    POST "/api/v1/gates/{gate}/decommission" Engineer true "Decommission a gate with a reason: its batches are refused and its messages no longer verify; its ledger progress is kept."
        => commissioning::decommission, (), (DecommissionBody), [200 json(DecommissionedOut)], [];
    POST "/api/v1/gates/{gate}/commands" Operator true "Command a gate (open_once_entry, open_once_exit, set_direction, out_of_service, in_service) with a reason; answers with the gate's acknowledgement."
        => gates::command, (), (CommandBody), [200 json(CommandOut)], [502, 504];
    GET "/api/v1/days" Viewer false "Closed business days (newest first): discrepancies, alarm, uploaded to clearing."
        => days::list, (), (), [200 list(DaySummary)], [500];
    GET "/api/v1/days/{day}" Viewer false "One business day (YYYY-MM-DD): its close record, or for a day not closed what a close now would record."
        => days::show, (), (), [200 json(DayOut)], [404, 409, 500, 503];
    POST "/api/v1/days/{day}/close" Operator true "Close a business day that is over (with a reason): totals per gate, medium and direction from the ledger, reconciled against the gates' PLC counters; 409 if not over or already closed."
        => days::close, (), (CloseBody), [200 json(DayOut)], [];
    GET "/api/v1/reports/flow" Viewer false "Accepted taps by business day, local hour, direction and gate (day=, or from= and to= up to 31 days, default the last day that is over; format=csv for CSV)."
        => days::flow, (ReportQuery), (), [200 json(FlowReport), 200 csv(String)], [400, 409, 500, 503];
    GET "/api/v1/reports/revenue" Viewer false "Revenue by business day, medium and fare product (day=, or from= and to=; format=csv)."
        => days::revenue, (ReportQuery), (), [200 json(RevenueReport), 200 csv(String)], [400, 409, 500, 503];
    GET "/api/v1/reports/rejects" Viewer false "Refused taps by business day and reason (day=, or from= and to=; format=csv)."
        => days::rejects, (ReportQuery), (), [200 json(RejectsReport), 200 csv(String)], [400, 409, 500, 503];
    GET "/api/v1/reports/incidents" Viewer false "Tailgating and forced passages by business day and gate, from the PLC counter readings (day=, or from= and to=; format=csv)."
        => days::incidents, (ReportQuery), (), [200 json(IncidentsReport), 200 csv(String)], [400, 500];
}

/// What the handlers share.
pub struct ApiState {
    pub node: Arc<Node>,
    pub tokens: auth::Tokens,
    /// Live gate state, fed by the leader's MQTT duties.
    pub gates: Arc<dyn GateView>,
    pub metrics: Arc<ControllerMetrics>,
    /// Station package-signing key and its id (from the node's secrets).
    pub signing: Option<Arc<StationKey>>,
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
    /// Builds the state from the node's config and secrets.
    pub fn new(
        node: Arc<Node>,
        gates: Arc<dyn GateView>,
        metrics: Arc<ControllerMetrics>,
    ) -> Result<ApiState, ConfigError> {
        let api = &node.config.api;
        let signing = node.secrets.station_key.clone();
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
            Rejection::UnknownVersion { .. } | Rejection::DayNotClosed { .. } => {
                ApiError::NotFound(rejection.to_string())
            }
            Rejection::DayAlreadyClosed { .. } | Rejection::DayNotOver { .. } => {
                ApiError::Conflict(rejection.to_string())
            }
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
    // `/metrics` reads this API's state at scrape time.
    metrics::serve(&state);
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
