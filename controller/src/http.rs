//! The Raft/admin HTTP listener (actix-web): peer RPCs under `/raft/`, cluster management and
//! replicated writes and forwarded gate commands under `/admin/`, `GET /healthz`. Everything but
//! `/healthz` needs the cluster secret, checked before a body is read. Errors are JSON
//! `{code, message}`; [`NodeError`] is mapped to a status here, only here.
//!
//! Defences, in the order a request meets them:
//! - with `tls.require_client_cert`, the handshake needs a client certificate from the station CA
//!   (`afc_tls::server_config_requiring_client_cert`); [`on_connect`] keeps it for the handlers;
//! - [`secret_first`]: no cluster secret, 401, before any body is read;
//! - [`Limits`]: each route reads at most its own limit; a larger body is refused with 413 from
//!   its `Content-Length`, or as soon as the bytes read pass the limit, never buffered whole;
//! - every state change (`/admin/write` except the kinds [`audit_line`] exempts, `/admin/learner`,
//!   `/admin/voters`, `/admin/gate-command`) is preceded by a committed audit line naming its
//!   origin ([`Origin`]: the node named in [`ORIGIN_HEADER`], the socket address, and with mutual
//!   TLS the client certificate, which must be valid for that node's address in the membership).

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};

use crate::leader::{CommandOutcome, Duties, GateCommand};
use crate::network::{
    constant_time_eq, SnapshotChunkHeader, APPEND_BYTE_BUDGET, HOPS_HEADER, ORIGIN_HEADER, SECRET_HEADER,
    SNAPSHOT_HEADER,
};
use crate::node::{AddLearner, Node, NodeError, SetVoters};
use crate::state::Request;
use crate::types::{codec, NodeId, TypeConfig};

/// Most ledger entries one read returns.
const MAX_PAGE: usize = 10_000;
/// Body limit of the small routes: votes (a vote request is about 200 bytes of JSON), membership
/// changes, gate commands, and every route that takes no body.
pub const SMALL_LIMIT: usize = 64 * 1024;
/// Least body limit of `/admin/write`: the largest request forwarded to it is a package piece or a
/// small package (at most 128 KiB, 171 KiB in base64), a gate batch from a former leader's ingest
/// (at most `mqtt.max_packet_bytes` of JSON, so [`Limits::new`] takes twice that if larger), or a
/// feed step with a network description (the Dalian network is 23 KB).
pub const WRITE_LIMIT_MIN: usize = 4 * 1024 * 1024;
/// Bound on one ledger record in an encoded entry: canonical bytes of at most two 64-character
/// identifiers and about twenty varints (under 400 bytes), plus its 4-byte length.
pub const MAX_RECORD_ENTRY_BYTES: usize = 512;

/// The body limit of each route of the Raft/admin listener, computed once from the configuration.
///
/// The largest append a leader sends: entries of at most [`APPEND_BYTE_BUDGET`] bytes in all, or
/// one larger entry alone (`crate::network`). The largest entry is a group of gate batches
/// (`crate::group_commit`): batches are added while the group has fewer than 1,000 records, so
/// it holds at most 999 records and one more batch besides its first, and a batch is at most one
/// `/admin/write` body or one MQTT packet (its canonical bytes are smaller than its JSON). Hence
/// `append = 2 × max(APPEND_BYTE_BUDGET, 2 × write + 1,000 × MAX_RECORD_ENTRY_BYTES)` (the factor
/// 2 is margin: 17 MiB with the defaults, against 256 MiB before). A snapshot travels in chunks of
/// `raft.snapshot_chunk_bytes` (one request each): `snapshot = 2 × chunk + 64 KiB`. Every node of a
/// cluster must use the same `raft.snapshot_chunk_bytes` and `mqtt.max_packet_bytes` (the margin
/// covers small differences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub small: usize,
    pub write: usize,
    pub append: usize,
    pub snapshot: usize,
}

impl Limits {
    pub fn new(config: &crate::config::Config) -> Limits {
        let packet = config
            .mqtt
            .as_ref()
            .map_or(crate::config::MqttConfig::default().max_packet_bytes, |m| m.max_packet_bytes);
        let write = WRITE_LIMIT_MIN.max(packet.saturating_mul(2));
        let entry = write
            .saturating_mul(2)
            .saturating_add(crate::group_commit::MAX_GROUP_RECORDS * MAX_RECORD_ENTRY_BYTES);
        let chunk = usize::try_from(config.raft.snapshot_chunk_bytes).unwrap_or(usize::MAX);
        Limits {
            small: SMALL_LIMIT,
            write,
            append: APPEND_BYTE_BUDGET.max(entry).saturating_mul(2),
            snapshot: chunk.saturating_mul(2).saturating_add(64 * 1024),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

impl ResponseError for NodeError {
    fn status_code(&self) -> StatusCode {
        match self {
            NodeError::Unauthorized => StatusCode::UNAUTHORIZED,
            NodeError::Forbidden(_) => StatusCode::FORBIDDEN,
            NodeError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
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
            NodeError::Forbidden(_) => "forbidden",
            NodeError::PayloadTooLarge { .. } => "payload_too_large",
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
type RouteLimits = web::Data<Limits>;

/// The certificate a client presented in the handshake (mutual TLS: only with
/// `tls.require_client_cert`, and then already verified against the station CA).
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub rustls::pki_types::CertificateDer<'static>);

/// `HttpServer::on_connect` of the Raft/admin listener: keeps the client certificate of a TLS
/// connection in the connection's data, for [`Origin`].
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = conn.downcast_ref::<Tls>() {
        if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            ext.insert(PeerCertificate(cert.clone().into_owned()));
        }
    }
}

/// Reads the body of `req`, at most `limit` bytes: a `Content-Length` above it is refused before
/// a byte is read, a streamed body as soon as it passes it (413 `payload_too_large` either way).
async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    route: &'static str,
    limit: usize,
) -> Result<web::Bytes, NodeError> {
    let too_large = || {
        tracing::warn!(route, limit, peer = ?req.peer_addr(), "refused a request body above the route's limit");
        NodeError::PayloadTooLarge { route, limit }
    };
    let announced =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match payload.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(NodeError::BadRequest(format!("reading the body: {e}"))),
        Err(_) => Err(too_large()),
    }
}

/// [`read_body`] decoded as JSON.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    route: &'static str,
    limit: usize,
) -> Result<T, NodeError> {
    let body = read_body(req, payload, route, limit).await?;
    serde_json::from_slice(&body).map_err(|e| NodeError::BadRequest(format!("{route}: {e}")))
}

/// Who sent a request to an admin route, as its audit line names it.
#[derive(Debug)]
struct Origin {
    /// The node named in [`ORIGIN_HEADER`] (every node's forwarding sets it).
    node: Option<NodeId>,
    peer: Option<SocketAddr>,
    /// With mutual TLS: the client certificate, verified against the station CA in the handshake
    /// and checked here to be valid for the named node's address.
    cert: Option<PeerCertificate>,
}

/// The host part of a `host:port` address (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Origin {
    /// Reads the origin of `req`. With a client certificate, a named node must be a member whose
    /// address the certificate is valid for (403 otherwise): one node's certificate cannot speak
    /// for another node.
    fn of(req: &HttpRequest, node: &Node) -> Result<Origin, NodeError> {
        let claimed = match req.headers().get(ORIGIN_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<NodeId>().ok())
                    .ok_or_else(|| NodeError::BadRequest(format!("{ORIGIN_HEADER} is not a node id")))?,
            ),
        };
        let cert = req.conn_data::<PeerCertificate>().cloned();
        if let (Some(id), Some(c)) = (claimed, &cert) {
            let m = node.raft.metrics().borrow().membership_config.clone();
            let Some(member) = m.membership().get_node(&id) else {
                return Err(NodeError::Forbidden(format!(
                    "{ORIGIN_HEADER} names node {id}, which is not a member"
                )));
            };
            if !crate::tls::certificate_names(&c.0, host_of(&member.addr)) {
                return Err(NodeError::Forbidden(format!(
                    "the client certificate ({}) is not valid for {}, the address of node {id} it claims to be",
                    crate::tls::fingerprint(&c.0),
                    member.addr
                )));
            }
        }
        Ok(Origin { node: claimed, peer: req.peer_addr(), cert })
    }

    /// The audit actor: `node:{id}`, or `admin-listener` for a caller that named no node.
    fn actor(&self) -> String {
        self.node.map_or_else(|| "admin-listener".to_owned(), |id| format!("node:{id}"))
    }

    /// Where the request came from, in words.
    fn describe(&self) -> String {
        let mut d = match self.node {
            Some(id) if self.cert.is_some() => format!("node {id}"),
            Some(id) => format!("node {id} (as it claims; no client certificate)"),
            None => "a caller naming no node".to_owned(),
        };
        if let Some(p) = self.peer {
            d += &format!(" from {p}");
        }
        if let Some(c) = &self.cert {
            d += &format!(", client certificate {}", crate::tls::fingerprint(&c.0));
        }
        d
    }

    /// The audit line written before the state change `action` (`detail` says what it is).
    fn audit(&self, action: &str, detail: String) -> Request {
        Request::Audit {
            actor: self.actor(),
            action: action.to_owned(),
            detail: format!("{detail}; sent by {}", self.describe()),
            at: crate::clock::now(),
        }
    }
}

/// At most `n` characters of `s`.
fn clip(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// What `/admin/write` does with `req` from `origin` before committing it:
/// - gate transaction batches (`append_tx_batch`, `append_tx_batches`) go as they are: the state
///   machine commits a record only under the signature of the gate's registered key (a forged
///   batch changes nothing), they come at the gates' rate, and every record is itself the trace;
/// - a package piece (`put_package_piece`) goes as it is: a piece changes nothing a gate or
///   operator sees until its `commit_package`, which is audited; pieces are bounded (4 uploads,
///   64 MiB each, dropped after 10 min idle);
/// - an audit line is kept, with `[via …]` and the origin appended to its detail (so a line
///   forwarded by a follower's API names the node that relayed it, and one sent straight here
///   says so);
/// - every other kind (a gate's key, a package, the mode, the clearing cursor, a prune, rollout
///   and feed steps) is preceded by an `admin.write.{kind}` line naming the origin and the
///   request, committed before the request (the returned line).
///
/// Returns the request to commit and the audit line to commit first, if any.
fn audit_line(req: Request, origin: &Origin) -> (Request, Option<Request>) {
    match req {
        Request::AppendTxBatch { .. } | Request::AppendTxBatches { .. } | Request::PutPackagePiece { .. } => {
            (req, None)
        }
        Request::Audit { actor, action, detail, at } => {
            let detail = format!("{detail} [via /admin/write: {}]", origin.describe());
            (Request::Audit { actor, action, detail, at }, None)
        }
        other => {
            let json = serde_json::to_value(&other).unwrap_or_default();
            let kind = json["type"].as_str().unwrap_or("unknown").to_owned();
            let line = origin.audit(&format!("admin.write.{kind}"), clip(&json.to_string(), 400));
            (other, Some(line))
        }
    }
}

fn authorize(req: &HttpRequest, node: &Node) -> Result<(), NodeError> {
    let given = req.headers().get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if constant_time_eq(given, node.config.cluster_secret.as_bytes()) {
        Ok(())
    } else {
        Err(NodeError::Unauthorized)
    }
}

/// Refuses a request without the cluster secret before anything reads its body (a body of up to
/// its route's [`Limits`] is read only for a peer that proved it knows the secret). The handlers check
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
async fn append(
    req: HttpRequest,
    node: Shared,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let body = read_body(&req, payload, "/raft/append", limits.append).await?;
    let rpc = codec::decode_append(&body).map_err(|e| NodeError::BadRequest(e.to_string()))?;
    Ok(raft_reply(node.raft.append_entries(rpc).await))
}

async fn vote(
    req: HttpRequest,
    node: Shared,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let rpc: VoteRequest<NodeId> = read_json(&req, payload, "/raft/vote", limits.small).await?;
    Ok(raft_reply(node.raft.vote(rpc).await))
}

async fn snapshot(
    req: HttpRequest,
    node: Shared,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let body = read_body(&req, payload, "/raft/snapshot", limits.snapshot).await?;
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

/// `POST /admin/write`: commits a [`Request`] through the leader, preceded by the audit line
/// [`audit_line`] decides (whoever calls, with whatever request: the line is written here).
async fn write(
    req: HttpRequest,
    node: Shared,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let request: Request = read_json(&req, payload, "/admin/write", limits.write).await?;
    let origin = Origin::of(&req, &node)?;
    let (request, line) = audit_line(request, &origin);
    if let Some(line) = line {
        node.write(line, hops(&req)).await?;
    }
    let resp = node.write(request, hops(&req)).await?;
    Ok(HttpResponse::Ok().json(resp))
}

async fn learner(
    req: HttpRequest,
    node: Shared,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let body: AddLearner = read_json(&req, payload, "/admin/learner", limits.small).await?;
    let origin = Origin::of(&req, &node)?;
    let line =
        origin.audit("admin.learner", format!("add node {} at {} as a learner", body.node_id, body.addr));
    node.write(line, hops(&req)).await?;
    Ok(HttpResponse::Ok().json(node.add_learner(body, hops(&req)).await?))
}

async fn voters(
    req: HttpRequest,
    node: Shared,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let body: SetVoters = read_json(&req, payload, "/admin/voters", limits.small).await?;
    let origin = Origin::of(&req, &node)?;
    let line = origin.audit("admin.voters", format!("voters become {:?}", body.voters));
    node.write(line, hops(&req)).await?;
    Ok(HttpResponse::Ok().json(node.set_voters(body, hops(&req)).await?))
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
        gates: s
            .gates
            .iter()
            .map(|(g, i)| (g.to_string(), i.current_progress().contiguous_through))
            .collect(),
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

/// `POST /admin/gate-command`: a follower's API hands a gate command to the leader, which sends
/// it over MQTT and answers with the [`CommandOutcome`] (200 in every case: the outcome is data).
/// The API audited the operator's command; this node audits the relay before it sends anything.
async fn gate_command(
    req: HttpRequest,
    node: Shared,
    duties: web::Data<Option<Arc<Duties>>>,
    limits: RouteLimits,
    payload: web::Payload,
) -> Result<HttpResponse, NodeError> {
    authorize(&req, &node)?;
    let body: GateCommand = read_json(&req, payload, "/admin/gate-command", limits.small).await?;
    let outcome = match duties.get_ref() {
        Some(d) => {
            let origin = Origin::of(&req, &node)?;
            let what = serde_json::to_string(&body.command).unwrap_or_default();
            node.write(origin.audit("admin.gate_command", format!("gate {} command {what}", body.gate)), 0)
                .await?;
            d.deliver(&body.gate, body.command).await
        }
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
            Ok(HttpResponse::Ok().json(crate::gate_view::GateView::gates(d.as_ref())))
        }
        _ => Ok(HttpResponse::Conflict().json(serde_json::json!({"code": "not_leader"}))),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

/// Registers every route of the Raft/admin listener. `duties` answers forwarded gate commands.
/// Bodies are read by the handlers themselves, each with its route's [`Limits`]; the extractor
/// limits below bound anything else at [`SMALL_LIMIT`].
pub fn configure(node: Arc<Node>, duties: Option<Arc<Duties>>) -> impl Fn(&mut web::ServiceConfig) + Clone {
    let limits = Limits::new(&node.config);
    move |cfg: &mut web::ServiceConfig| {
        let routes = web::scope("")
            .wrap(from_fn(secret_first))
            .app_data(web::Data::new(node.clone()))
            .app_data(web::Data::new(duties.clone()))
            .app_data(web::Data::new(limits))
            .app_data(web::JsonConfig::default().limit(SMALL_LIMIT))
            .app_data(web::PayloadConfig::default().limit(SMALL_LIMIT))
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
