//! One controller node: opens the store, starts Raft, bootstraps once, and offers writes that
//! reach the leader from any node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use afc_domain::model::ParamKind;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::now;
use crate::config::{Config, ConfigError};
use crate::network::{PeerNetwork, HOPS_HEADER, MAX_FORWARD_HOPS, ORIGIN_HEADER, SECRET_HEADER};
use crate::state::{Request, Response, PACKAGE_PIECE_BYTES};
use crate::storage::{self, StateMachineStore, StoreError};
use crate::types::{Node as PeerNode, NodeId, Raft};

/// How long a write waits for a leader (an election after a crash takes about one election
/// timeout) before giving up.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Timeout of one forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of the check that a node being added answers as a controller ([`Node::probe`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything that can fail in a node, mapped to HTTP status in one place ([`crate::http`]).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("http client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("raft: {0}")]
    Raft(String),
    #[error("no leader reachable within {0:?}")]
    NoLeader(Duration),
    #[error("forwarded too many times (a leader change loop?)")]
    TooManyHops,
    #[error("the leader refused the forwarded request: HTTP {status}: {body}")]
    Forward { status: u16, body: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("missing or wrong cluster secret")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("request body larger than {limit} bytes, the limit of {route}")]
    PayloadTooLarge { route: &'static str, limit: usize },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A running node's handles.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    /// Read access to the state machine (shared with Raft).
    pub sm: StateMachineStore,
    pub config: Arc<Config>,
    /// The secrets `config` names, read once in [`Node::start`]: every task takes them from here.
    pub secrets: Arc<crate::secrets::Secrets>,
    /// Proposals go through here: gate batches are packed into one entry (group commit).
    pub group: crate::group_commit::GroupCommit,
    http: reqwest::Client,
    /// [`Node::fatal`]'s answer once Raft has stopped on an error (it never runs again).
    fatal: std::sync::OnceLock<RaftFatal>,
}

/// Body of `POST /admin/learner`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddLearner {
    pub node_id: NodeId,
    pub addr: String,
}

/// Body of `POST /admin/voters`: the complete new set of voters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetVoters {
    pub voters: BTreeSet<NodeId>,
}

/// Answer of a membership change: the log index of the change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipChanged {
    pub log_index: u64,
}

/// What one attempt at a leader-only operation gave.
enum Attempt<T> {
    Done(T),
    /// Not the leader: the leader's address, if known.
    Forward(Option<String>),
}

impl Node {
    /// Opens the store and starts Raft. Bootstraps the cluster if asked and the store is empty.
    /// Reads every secret file first ([`crate::secrets::Secrets::load`]): one that is missing or
    /// unreadable stops the start with its name.
    pub async fn start(config: Arc<Config>) -> Result<Arc<Node>, NodeError> {
        let secrets = Arc::new(crate::secrets::Secrets::load(&config)?);
        let (log, sm) = storage::open(&config.data_dir)?;
        let was_empty = storage::is_empty(&log, &sm)?;
        let net = PeerNetwork::new(&config.cluster_secret, config.peer_client()?, config.peer_scheme())?;
        let raft = Raft::new(config.node_id, Arc::new(config.openraft()?), net, log, sm.clone())
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let http = config.peer_client()?.build()?;
        let group = crate::group_commit::GroupCommit::start(raft.clone());
        let node = Arc::new(Node {
            id: config.node_id,
            raft,
            sm,
            config: config.clone(),
            secrets,
            group,
            http,
            fatal: std::sync::OnceLock::new(),
        });
        if config.bootstrap {
            node.bootstrap(was_empty).await?;
        }
        Ok(node)
    }

    /// One-time cluster formation: only on an empty store, never on a restart.
    async fn bootstrap(&self, was_empty: bool) -> Result<(), NodeError> {
        let initialized = self.raft.is_initialized().await.map_err(|e| NodeError::Raft(e.to_string()))?;
        if !was_empty || initialized {
            tracing::info!("bootstrap requested but the store already holds Raft state: not repeated");
            return Ok(());
        }
        let members: BTreeMap<NodeId, PeerNode> =
            self.config.initial_members.iter().map(|m| (m.id, PeerNode { addr: m.addr.clone() })).collect();
        tracing::info!(?members, "bootstrapping a new cluster");
        self.raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Commits `req` through the leader, wherever it is, and returns what applying it did.
    pub async fn write(&self, req: Request, hops: u32) -> Result<Response, NodeError> {
        self.leader_op("/admin/write", &req, hops, || async {
            match self.group.write(req.clone()).await {
                Ok(r) => Ok(Attempt::Done(r)),
                Err(e) => forward_or_fail(e),
            }
        })
        .await
    }

    /// Stores a signed package through the leader. A package larger than one piece goes as
    /// [`Request::PutPackagePiece`]s of [`PACKAGE_PIECE_BYTES`], proposed one after another, and a
    /// [`Request::CommitPackage`], so no Raft entry (and no append RPC) carries a large body. A
    /// refusal comes back as `Response::Rejected`; an upload broken off by an error is dropped by
    /// the state machine later (bounded count, expiry).
    pub async fn put_package(
        &self,
        kind: ParamKind,
        version: u64,
        package: &[u8],
    ) -> Result<Response, NodeError> {
        if package.len() <= PACKAGE_PIECE_BYTES {
            return self.write(Request::PutPackage { kind, version, package: package.to_vec() }, 0).await;
        }
        let upload = next_upload_id(self.id);
        let pieces: Vec<&[u8]> = package.chunks(PACKAGE_PIECE_BYTES).collect();
        for (index, bytes) in pieces.iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| NodeError::BadRequest("too many pieces".into()))?;
            let req = Request::PutPackagePiece { upload, index, at: now(), bytes: bytes.to_vec() };
            match self.write(req, 0).await? {
                Response::PieceStored { .. } => {}
                other => return Ok(other),
            }
        }
        let sha256: [u8; 32] = Sha256::digest(package).into();
        let commit = Request::CommitPackage {
            upload,
            kind,
            version,
            pieces: pieces.len() as u32,
            size: package.len() as u64,
            sha256,
        };
        self.write(commit, 0).await
    }

    /// Adds a learner (blocking until it has caught up with the log), via the leader. The leader
    /// first checks that the address answers as a controller over the peer transport
    /// ([`Node::probe`]): with `[tls]`, a server without a certificate from the station CA fails
    /// the handshake, the membership is not changed, and the error says why.
    pub async fn add_learner(&self, req: AddLearner, hops: u32) -> Result<MembershipChanged, NodeError> {
        self.leader_op("/admin/learner", &req, hops, || async {
            if self.raft.current_leader().await == Some(self.id) {
                self.probe(req.node_id, &req.addr).await?;
            }
            let node = PeerNode { addr: req.addr.clone() };
            match self.raft.add_learner(req.node_id, node, true).await {
                Ok(r) => Ok(Attempt::Done(MembershipChanged { log_index: r.log_id.index })),
                Err(e) => forward_or_fail(e),
            }
        })
        .await
    }

    /// Replaces the set of voters (learners are promoted, removed voters leave), via the leader.
    pub async fn set_voters(&self, req: SetVoters, hops: u32) -> Result<MembershipChanged, NodeError> {
        self.leader_op("/admin/voters", &req, hops, || async {
            match self.raft.change_membership(req.voters.clone(), false).await {
                Ok(r) => Ok(Attempt::Done(MembershipChanged { log_index: r.log_id.index })),
                Err(e) => forward_or_fail(e),
            }
        })
        .await
    }

    /// Runs `local` here if this node leads; otherwise forwards `body` to the leader's `path`.
    /// While no leader is known (an election), or a membership change is still in progress,
    /// retries with backoff until [`WRITE_DEADLINE`].
    async fn leader_op<B, T, F, Fut>(&self, path: &str, body: &B, hops: u32, local: F) -> Result<T, NodeError>
    where
        B: Serialize,
        T: DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, NodeError>>,
    {
        if hops > MAX_FORWARD_HOPS {
            return Err(NodeError::TooManyHops);
        }
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut backoff = Duration::from_millis(20);
        loop {
            let leader = match local().await? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Forward(addr) => addr,
            };
            if let Some(addr) = leader {
                match self.forward(&addr, path, body, hops + 1).await {
                    Ok(v) => return Ok(v),
                    // The leader just died or moved: wait for the next one. (A request that
                    // timed out may have been done; the operations here are safe to repeat.)
                    Err(NodeError::HttpClient(e)) if e.is_connect() || e.is_timeout() => {
                        tracing::debug!(%addr, error = %e, "forward to leader failed; retrying")
                    }
                    Err(NodeError::Forward { status: 503, body }) => {
                        tracing::debug!(%addr, %body, "leader unavailable; retrying")
                    }
                    // The leader judged the request itself bad: the same answer as if it ran here.
                    Err(NodeError::Forward { status: 400, body }) => {
                        let message = serde_json::from_str::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| {
                                let m = v["message"].as_str()?;
                                Some(m.strip_prefix("bad request: ").unwrap_or(m).to_owned())
                            })
                            .unwrap_or(body);
                        return Err(NodeError::BadRequest(message));
                    }
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() + backoff > deadline {
                return Err(NodeError::NoLeader(WRITE_DEADLINE));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// `GET /healthz` at `addr` with the peer client, without the cluster secret: the TLS
    /// handshake (the server's certificate checked against the station CA only; this node's own
    /// certificate presented if asked) happens before any byte of the request is sent, so a
    /// server that fails it receives nothing. An error names the node, the address and the cause.
    pub async fn probe(&self, node_id: NodeId, addr: &str) -> Result<(), NodeError> {
        let url = format!("{}://{addr}/healthz", self.config.peer_scheme());
        let refused = |why: String| {
            NodeError::BadRequest(format!(
                "node {node_id} at {addr} cannot be added: {why}; membership unchanged"
            ))
        };
        match self.http.get(&url).timeout(PROBE_TIMEOUT).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(refused(format!("{url} answered HTTP {}, not a controller's listener", r.status()))),
            Err(e) => {
                let mut chain = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    chain = format!("{chain}: {s}");
                    source = s.source();
                }
                let tls = chain.to_ascii_lowercase().contains("certificate");
                Err(refused(if tls {
                    format!(
                        "its TLS certificate is not one from the station CA (tls.ca_file) for that address \
                         ({chain}); nothing was sent to it"
                    )
                } else {
                    format!("not reachable over {} ({chain})", self.config.peer_scheme())
                }))
            }
        }
    }

    /// Why this node's Raft core stopped, if it stopped on a fatal error (not a requested
    /// shutdown): a storage read or write failed (disk full, filesystem read-only, I/O error) or
    /// the core panicked. Such a node takes part in nothing any more: it is not ready, whatever
    /// leader it last knew, and the service exits for its supervisor to restart it.
    pub fn fatal(&self) -> Option<RaftFatal> {
        if let Some(f) = self.fatal.get() {
            return Some(f.clone());
        }
        let m = self.raft.metrics().borrow().clone();
        match m.running_state {
            Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
            Err(e) => Some(self.fatal.get_or_init(|| RaftFatal::of(&e, &self.config.data_dir)).clone()),
        }
    }

    /// The Raft/admin address of the leader this node knows, if any.
    pub fn leader_addr(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// POSTs `body` to `path` on the Raft/admin listener at `addr` (with the cluster secret, the
    /// hop count and this node's id for the receiver's audit line) and decodes the answer.
    pub async fn forward<B: Serialize, T: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &B,
        hops: u32,
    ) -> Result<T, NodeError> {
        let resp = self
            .http
            .post(format!("{}://{addr}{path}", self.config.peer_scheme()))
            .header(SECRET_HEADER, &self.config.cluster_secret)
            .header(HOPS_HEADER, hops.to_string())
            .header(ORIGIN_HEADER, self.id.to_string())
            .timeout(FORWARD_TIMEOUT)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let body = resp.text().await.unwrap_or_default().chars().take(500).collect();
        Err(NodeError::Forward { status: status.as_u16(), body })
    }
}

/// Why Raft stopped ([`Node::fatal`]): a short reason for the metric label and the error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftFatal {
    /// One of [`RaftFatal::REASONS`].
    pub reason: &'static str,
    pub error: String,
}

impl RaftFatal {
    /// `storage_full` (ENOSPC), `storage_read_only` (EROFS), `storage` (any other storage error),
    /// `panicked`.
    pub const REASONS: [&'static str; 4] = ["storage_full", "storage_read_only", "storage", "panicked"];

    /// Classifies by the error's errno; an error that names neither ENOSPC nor EROFS (a sync that
    /// failed with EIO: an ext4 that remounted itself read-only on an error fails the writeback of
    /// pages dirtied before with EIO, and later writes with EROFS) is checked against `data_dir`
    /// itself: a file that cannot be created there for EROFS makes it `storage_read_only`.
    fn of(e: &openraft::error::Fatal<NodeId>, data_dir: &std::path::Path) -> RaftFatal {
        let error = e.to_string();
        let reason = match e {
            openraft::error::Fatal::Panicked => "panicked",
            _ if error.contains("No space left") || error.contains("os error 28") => "storage_full",
            _ if error.contains("Read-only file system") || error.contains("os error 30") => {
                "storage_read_only"
            }
            _ if data_dir_read_only(data_dir) => "storage_read_only",
            _ => "storage",
        };
        RaftFatal { reason, error }
    }
}

/// Whether creating a file in `data_dir` fails for EROFS (the probe file is removed again).
fn data_dir_read_only(data_dir: &std::path::Path) -> bool {
    let probe = data_dir.join(".fatal-probe");
    match std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            false
        }
        Err(e) => e.raw_os_error() == Some(30),
    }
}

fn forward_or_fail<T>(
    e: RaftError<NodeId, ClientWriteError<NodeId, PeerNode>>,
) -> Result<Attempt<T>, NodeError> {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(ForwardToLeader { leader_node, .. })) => {
            Ok(Attempt::Forward(leader_node.map(|n| n.addr)))
        }
        // The previous change (the bootstrap's own membership, right after start) is not committed
        // yet: a moment later this one can go ahead, so wait like for an election.
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            openraft::error::ChangeMembershipError::InProgress(p),
        )) => {
            tracing::debug!(in_progress = %p, "a membership change is still in progress; retrying");
            Ok(Attempt::Forward(None))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Err(NodeError::BadRequest(e.to_string()))
        }
        RaftError::Fatal(e) => Err(NodeError::Raft(e.to_string())),
    }
}

/// An upload id unlikely to collide with another node's or an earlier one: the time in
/// nanoseconds, this node's id in the top byte, and a per-process counter.
fn next_upload_id(node: NodeId) -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = crate::clock::now_nanos() as u64;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (nanos ^ n.rotate_left(32)) & 0x00ff_ffff_ffff_ffff | (node << 56)
}
