//! The Raft/admin HTTP listener (actix-web): peer RPCs under `/raft/`, cluster management and
//! replicated writes and forwarded gate commands under `/admin/`, `GET /healthz`. Everything but `/healthz` needs the cluster
//! secret, checked before a body is read. Errors are JSON `{code, message}`; [`NodeError`] is mapped to a status here, only here.

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};

use crate::leader::{CommandOutcome, Duties};
use crate::network::{constant_time_eq, SnapshotChunkHeader, HOPS_HEADER, SECRET_HEADER, SNAPSHOT_HEADER};
use crate::node::{AddLearner, Node, NodeError, SetVoters};
use crate::state::Request;
use crate::types::{codec, NodeId, TypeConfig};

/// Largest body accepted (an append request of `max_payload_entries` full batches).
const JSON_LIMIT: usize = 256 * 1024 * 1024;
/// Most ledger entries one read returns.
const MAX_PAGE: usize = 10_000;

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

impl ResponseError for NodeError {
    fn status_code(&self) -> StatusCode {
        match self {
            NodeError::Unauthorized => StatusCode::UNAUTHORIZED,
            NodeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            NodeError::NoLeader(_) | NodeError::TooManyHops | NodeError::Forward { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            NodeError::Raft(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            NodeError::Unauthorized => "unauthorized",
            NodeError::BadRequest(_) => "bad_request",
            NodeError::NoLeader(_) => "no_leader",
            NodeError::TooManyHops => "forward_loop",
            NodeError::Forward { .. } => "forward_failed",
            NodeError::Raft(_) => "raft_unavailable",
            _ => "internal",
        };
        HttpResponse::build(self.status_code()).json(ErrorBody { code, message: self.to_string() })
    }
}

type Shared = web::Data<Arc<Node>>;

fn authorize(req: &HttpRequest, node: &Node) -> Result<(), NodeError> {
    let given = req.headers().get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if constant_time_eq(given, node.config.cluster_secret.as_bytes()) {
        Ok(())
    } else {
        Err(NodeError::Unauthorized)
    }
}

/// Refuses a request without the cluster secret before anything reads its body (a body of up to
/// [`JSON_LIMIT`] is read only for a peer that proved it knows the secret). The handlers check
/// again ([`authorize`]); `/healthz` is open.
async fn secret_first(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let allowed = req.path() == "/healthz"
        || req.app_data::<Shared>().is_some_and(|node| authorize(req.request(), node).is_ok());
    if !allowed {
        return Ok(req.into_response(NodeError::Unauthorized.error_response()).map_into_right_body());
    }
    next.call(req).await.map(ServiceResponse::map_into_left_body)
}

fn hops(req: &HttpRequest) -> u32 {
    req.headers().get(HOPS_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A Raft protocol answer: 200 with the response, or 503 with the JSON `RaftError`.
fn raft_reply<T: Serialize, E: Serialize>(r: Result<T, E>) -> HttpResponse {
    match r {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(e) => HttpResponse::ServiceUnavailable().json(e),
    }
}

/// `POST /raft/append`: the body is binary ([`codec::encode_append`]).
async fn append(req: HttpRequest, node: Shared, body: web::Bytes) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let rpc = codec::decode_append(&body).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    Ok(raft_reply(node.raft.append_entries(rpc).await))
}

async fn vote(
    req: HttpRequest,
    node: Shared,
    body: web::Json<VoteRequest<NodeId>>,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    Ok(raft_reply(node.raft.vote(body.into_inner()).await))
}

async fn snapshot(req: HttpRequest, node: Shared, body: web::Bytes) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let header = req
        .headers()
        .get(SNAPSHOT_HEADER)
        .ok_or_else(|| NodeError::BadRequest(format!("missing {SNAPSHOT_HEADER}")))?;
    let h: SnapshotChunkHeader =
        serde_json::from_slice(header.as_bytes()).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    let rpc = InstallSnapshotRequest::<TypeConfig> {
        vote: h.vote,
        meta: h.meta,
        offset: h.offset,
        data: body.to_vec(),
        done: h.done,
    };
    Ok(raft_reply(node.raft.install_snapshot(rpc).await))
}

async fn write(req: HttpRequest, node: Shared, body: web::Json<Request>) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let resp = node.write(body.into_inner(), hops(&req)).await?;
    Ok(HttpResponse::Ok().json(resp))
}

async fn learner(
    req: HttpRequest,
    node: Shared,
    body: web::Json<AddLearner>,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    Ok(HttpResponse::Ok().json(node.add_learner(body.into_inner(), hops(&req)).await?))
}

async fn voters(
    req: HttpRequest,
    node: Shared,
    body: web::Json<SetVoters>,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    Ok(HttpResponse::Ok().json(node.set_voters(body.into_inner(), hops(&req)).await?))
}

async fn metrics(req: HttpRequest, node: Shared) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let m = node.raft.metrics().borrow().clone();
    Ok(HttpResponse::Ok().json(m))
}

/// A summary of the replicated state, for operators and tests.
#[derive(Debug, Serialize, Deserialize)]
pub struct StateSummary {
    pub node_id: NodeId,
    pub last_applied_index: Option<u64>,
    pub next_index: u64,
    pub first_retained: u64,
    pub last_hash: String,
    pub clearing_acked_through: u64,
    /// gate → contiguous high-water mark.
    pub gates: std::collections::BTreeMap<String, u64>,
}

async fn state(req: HttpRequest, node: Shared) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let s = node.sm.state()?;
    Ok(HttpResponse::Ok().json(StateSummary {
        node_id: node.id,
        last_applied_index: s.last_applied.map(|l| l.index),
        next_index: s.next_index,
        first_retained: s.first_retained,
        last_hash: hex::encode(s.last_hash),
        clearing_acked_through: s.clearing_acked_through,
        gates: s.gates.iter().map(|(g, i)| (g.to_string(), i.progress.contiguous_through)).collect(),
    }))
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

async fn ledger(req: HttpRequest, node: Shared, q: web::Query<Page>) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let limit = q.limit.unwrap_or(1000).min(MAX_PAGE);
    Ok(HttpResponse::Ok().json(node.sm.ledger_entries(q.from, limit)?))
}

/// Body of `POST /admin/gate-command`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateCommand {
    pub gate: afc_domain::model::Ident,
    pub command: afc_domain::wire::CommandKind,
}

/// `POST /admin/gate-command`: a follower's API hands a gate command to the leader, which sends
/// it over MQTT and answers with the [`CommandOutcome`] (200 in every case: the outcome is data).
async fn gate_command(
    req: HttpRequest,
    node: Shared,
    duties: web::Data<Option<Arc<Duties>>>,
    body: web::Json<GateCommand>,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let outcome = match duties.get_ref() {
        Some(d) => d.deliver(&body.gate, body.command).await,
        None => CommandOutcome::NotLeader,
    };
    Ok(HttpResponse::Ok().json(outcome))
}

/// `POST /admin/gate-view`: the leader's live view of the gates (only the leader hears them), for
/// a follower's API. A node that is not the leader, or has no MQTT duties, answers 409.
async fn gate_view(
    req: HttpRequest,
    node: Shared,
    duties: web::Data<Option<Arc<Duties>>>,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    match duties.get_ref() {
        Some(d) if node.leader_addr().is_some_and(|(l, _)| l == node.id) => {
            Ok(HttpResponse::Ok().json(crate::api::GateView::gates(d.as_ref())))
        }
        _ => Ok(HttpResponse::Conflict().json(serde_json::json!({"code": "not_leader"}))),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

/// Registers every route of the Raft/admin listener. `duties` answers forwarded gate commands.
pub fn configure(node: Arc<Node>, duties: Option<Arc<Duties>>) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg: &mut web::ServiceConfig| {
        let routes = web::scope("")
            .wrap(from_fn(secret_first))
            .app_data(web::Data::new(node.clone()))
            .app_data(web::Data::new(duties.clone()))
            .app_data(web::JsonConfig::default().limit(JSON_LIMIT))
            .app_data(web::PayloadConfig::default().limit(JSON_LIMIT))
            .route("/raft/append", web::post().to(append))
            .route("/raft/vote", web::post().to(vote))
            .route("/raft/snapshot", web::post().to(snapshot))
            .route("/admin/write", web::post().to(write))
            .route("/admin/learner", web::post().to(learner))
            .route("/admin/voters", web::post().to(voters))
            .route("/admin/metrics", web::get().to(metrics))
            .route("/admin/state", web::get().to(state))
            .route("/admin/ledger", web::get().to(ledger))
            .route("/admin/gate-command", web::post().to(gate_command))
            .route("/admin/gate-view", web::post().to(gate_view))
            .route("/healthz", web::get().to(healthz));
        cfg.service(routes);
    }
}
