//! One controller node: opens the store, starts Raft, bootstraps once, and offers writes that
//! reach the leader from any node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use afc_domain::model::{ParamKind, Timestamp};
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError};
use crate::network::{PeerNetwork, HOPS_HEADER, MAX_FORWARD_HOPS, SECRET_HEADER};
use crate::state::{Request, Response, PACKAGE_PIECE_BYTES};
use crate::storage::{self, StateMachineStore, StoreError};
use crate::types::{Node as PeerNode, NodeId, Raft};

/// How long a write waits for a leader (an election after a crash takes about one election
/// timeout) before giving up.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Timeout of one forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Proposals go through here: gate batches are packed into one entry (group commit).
    pub group: crate::group_commit::GroupCommit,
    http: reqwest::Client,
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
    pub async fn start(config: Arc<Config>) -> Result<Arc<Node>, NodeError> {
        let (log, sm) = storage::open(&config.data_dir)?;
        let was_empty = storage::is_empty(&log, &sm)?;
        let net = PeerNetwork::new(&config.cluster_secret, config.peer_client()?, config.peer_scheme())?;
        let raft = Raft::new(config.node_id, Arc::new(config.openraft()?), net, log, sm.clone())
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let http = config.peer_client()?.build()?;
        let group = crate::group_commit::GroupCommit::start(raft.clone());
        let node = Arc::new(Node { id: config.node_id, raft, sm, config: config.clone(), group, http });
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

    /// Adds a learner (blocking until it has caught up with the log), via the leader.
    pub async fn add_learner(&self, req: AddLearner, hops: u32) -> Result<MembershipChanged, NodeError> {
        self.leader_op("/admin/learner", &req, hops, || async {
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

    /// The Raft/admin address of the leader this node knows, if any.
    pub fn leader_addr(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// POSTs `body` to `path` on the Raft/admin listener at `addr` (with the cluster secret and
    /// the hop count) and decodes the answer.
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
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (nanos ^ n.rotate_left(32)) & 0x00ff_ffff_ffff_ffff | (node << 56)
}

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}
