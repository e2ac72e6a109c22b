//! Raft peer traffic over HTTP: the client side ([`PeerNetwork`], used by openraft to reach other
//! nodes) and the shared wire conventions. The server side is in [`crate::http`].
//!
//! Every request carries the cluster secret in [`SECRET_HEADER`]; the server compares it in
//! constant time. Bodies are JSON, except append requests (binary, [`crate::types::codec`]: they
//! carry the log entries) and snapshot chunks, whose bytes travel raw with the chunk's metadata in
//! [`SNAPSHOT_HEADER`]. A protocol error from the peer comes back as HTTP 503 with the
//! JSON `RaftError`; a connection failure or timeout is `Unreachable`, so openraft backs off.
//!
//! openraft 0.9 gives one append request one heartbeat interval. A follower catching up would be
//! sent up to `max_payload_entries` entries at once, package pieces among them, which could never
//! arrive in time; so an append carries package pieces of at most [`APPEND_PIECE_BUDGET`] bytes,
//! and encoded entries of at most [`APPEND_BYTE_BUDGET`] bytes in all (the first entry always
//! goes), and answers `PartialSuccess` for the entries it sent (openraft sends the rest next). The
//! byte budget is what lets the receiver cap an append body (`crate::http::Limits`).
//!
//! With `[tls]` the client trusts only the station CA (`tls.ca_file`), never the system roots: a
//! server whose certificate is not from it fails the handshake, so it is sent neither the cluster
//! secret nor any entry. The client presents this node's certificate to servers that ask for one
//! (`tls.require_client_cert`, mutual TLS).

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::codec;
use crate::types::{Node, NodeId, SnapshotMeta, TypeConfig, Vote};

/// Header carrying the cluster secret on every peer and admin request.
pub const SECRET_HEADER: &str = "x-afc-cluster-secret";
/// Header carrying a snapshot chunk's metadata (JSON [`SnapshotChunkHeader`]).
pub const SNAPSHOT_HEADER: &str = "x-afc-snapshot";
/// Header counting how many times a write was forwarded (loops stop at [`MAX_FORWARD_HOPS`]).
pub const HOPS_HEADER: &str = "x-afc-forward-hops";
pub const MAX_FORWARD_HOPS: u32 = 3;
/// Header naming the node (its Raft id) that sends a request to another node's admin routes: the
/// receiver writes it into the audit line of a state change it forwards or performs.
pub const ORIGIN_HEADER: &str = "x-afc-origin-node";
/// Encoded entry bytes one append request carries at most (the first entry always goes, whatever
/// its size).
pub const APPEND_BYTE_BUDGET: usize = 4 * 1024 * 1024;
/// Package-piece bytes one append request carries at most (the first entry always goes).
pub const APPEND_PIECE_BUDGET: usize = 256 * 1024;

/// How many of `entries`, from the first, fit in one append request.
pub fn entries_within_budget(entries: &[crate::types::Entry]) -> usize {
    let mut bytes = 0usize;
    for (i, e) in entries.iter().enumerate() {
        if let openraft::EntryPayload::Normal(crate::state::Request::PutPackagePiece { bytes: b, .. }) =
            &e.payload
        {
            bytes += b.len();
            if bytes > APPEND_PIECE_BUDGET && i > 0 {
                return i;
            }
        }
    }
    entries.len()
}

/// The `/raft/append` body of `rpc` with as many of its entries, from the first, as fit in
/// [`APPEND_BYTE_BUDGET`] encoded bytes (at least one when there are any), and how many went. The
/// layout is [`codec::encode_append`]'s: the body of `rpc` without entries ends with the entry count
/// (`u32`, little-endian), then come the entries, each as `u32 len ‖ entry`.
pub fn encode_append_within_budget(
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Result<(Vec<u8>, usize), codec::CodecError> {
    let head = AppendEntriesRequest::<TypeConfig> {
        vote: rpc.vote,
        prev_log_id: rpc.prev_log_id,
        leader_commit: rpc.leader_commit,
        entries: Vec::new(),
    };
    let mut out = codec::encode_append(&head)?;
    let count_at = out.len() - 4;
    let mut buf = Vec::new();
    let mut sent = 0usize;
    let mut bytes = 0usize;
    for e in &rpc.entries {
        buf.clear();
        codec::encode_entry_into(e, &mut buf)?;
        bytes += 4 + buf.len();
        if sent > 0 && bytes > APPEND_BYTE_BUDGET {
            break;
        }
        let len = u32::try_from(buf.len()).map_err(|_| codec::CodecError::TooLong)?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&buf);
        sent += 1;
    }
    let count = u32::try_from(sent).map_err(|_| codec::CodecError::TooLong)?;
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    Ok((out, sent))
}

/// Metadata of one snapshot chunk; the chunk's bytes are the request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotChunkHeader {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    pub done: bool,
}

/// Compares two secrets without leaking, through timing, where they first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The peer network: one pooled HTTP client shared by every peer connection.
#[derive(Clone)]
pub struct PeerNetwork {
    http: reqwest::Client,
    secret: Arc<str>,
    /// `http` or `https` (`tls.peers`).
    scheme: &'static str,
}

impl PeerNetwork {
    /// `builder` comes from [`crate::config::Config::peer_client`] (connect timeout, CA bundle);
    /// each call also has openraft's deadline.
    pub fn new(
        secret: &str,
        builder: reqwest::ClientBuilder,
        scheme: &'static str,
    ) -> Result<PeerNetwork, reqwest::Error> {
        let http = builder.pool_idle_timeout(Duration::from_secs(60)).tcp_nodelay(true).build()?;
        Ok(PeerNetwork { http, secret: Arc::from(secret), scheme })
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection { net: self.clone(), target, base: format!("{}://{}", self.scheme, node.addr) }
    }
}

/// A connection to one peer (cheap: the HTTP pool is shared).
pub struct PeerConnection {
    net: PeerNetwork,
    target: NodeId,
    base: String,
}

/// Outcome of one HTTP exchange, before mapping into openraft's error types.
enum Failure<E> {
    Unreachable(Unreachable),
    Network(NetworkError),
    Remote(E),
}

#[derive(Debug, thiserror::Error)]
#[error("peer answered HTTP {status}: {body}")]
struct HttpStatusError {
    status: u16,
    body: String,
}

impl PeerConnection {
    async fn call<Resp, E>(
        &self,
        path: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Resp, Failure<E>>
    where
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let _ = path;
        let resp = req
            .header(SECRET_HEADER, &*self.net.secret)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| Failure::Unreachable(Unreachable::new(&e)))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| Failure::Unreachable(Unreachable::new(&e)))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| Failure::Network(NetworkError::new(&e)));
        }
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            if let Ok(e) = serde_json::from_slice::<E>(&bytes) {
                return Err(Failure::Remote(e));
            }
        }
        let body = String::from_utf8_lossy(&bytes).chars().take(300).collect();
        Err(Failure::Network(NetworkError::new(&HttpStatusError { status: status.as_u16(), body })))
    }

    fn map<E: std::error::Error>(&self, f: Failure<E>) -> RPCError<NodeId, Node, E> {
        match f {
            Failure::Unreachable(u) => RPCError::Unreachable(u),
            Failure::Network(n) => RPCError::Network(n),
            Failure::Remote(e) => RPCError::RemoteError(RemoteError::new(self.target, e)),
        }
    }

    fn post_json<T: Serialize>(&self, path: &str, body: &T) -> reqwest::RequestBuilder {
        self.net.http.post(format!("{}{}", self.base, path)).json(body)
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let mut rpc = rpc;
        let asked = rpc.entries.len();
        rpc.entries.truncate(entries_within_budget(&rpc.entries));
        let (body, sent) =
            encode_append_within_budget(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let partial =
            (sent < asked).then(|| sent.checked_sub(1).and_then(|i| rpc.entries.get(i)).map(|e| e.log_id));
        let req = self
            .net
            .http
            .post(format!("{}/raft/append", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let resp = self.call("/raft/append", req, option.hard_ttl()).await.map_err(|f| self.map(f))?;
        Ok(match (resp, partial) {
            (AppendEntriesResponse::Success, Some(sent)) => AppendEntriesResponse::PartialSuccess(sent),
            (r, _) => r,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let header =
            SnapshotChunkHeader { vote: rpc.vote, meta: rpc.meta, offset: rpc.offset, done: rpc.done };
        let header = serde_json::to_string(&header).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let req = self
            .net
            .http
            .post(format!("{}/raft/snapshot", self.base))
            .header(SNAPSHOT_HEADER, header)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(rpc.data);
        self.call("/raft/snapshot", req, option.hard_ttl()).await.map_err(|f| self.map(f))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let req = self.post_json("/raft/vote", &rpc);
        self.call("/raft/vote", req, option.hard_ttl()).await.map_err(|f| self.map(f))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use afc_domain::model::Timestamp;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;
    use crate::state::Request;
    use crate::types::Entry;

    fn piece(index: u64, len: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request::PutPackagePiece {
                upload: 1,
                index: index as u32,
                at: Timestamp(0),
                bytes: vec![0; len],
            }),
        }
    }

    fn append(entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 7)),
            leader_commit: Some(LogId::new(CommittedLeaderId::new(2, 1), 6)),
            entries,
        }
    }

    #[test]
    fn an_append_body_stops_at_the_byte_budget_but_always_carries_its_first_entry() {
        // Pieces as JSON-free entries of about 1 MiB each: four fit in the 4 MiB budget less
        // their frames, so three go.
        let big: Vec<Entry> = (1..=6).map(|i| piece(i, 1024 * 1024)).collect();
        let rpc = append(big.clone());
        let (body, sent) = encode_append_within_budget(&rpc).unwrap();
        assert_eq!(sent, 3);
        assert!(body.len() <= APPEND_BYTE_BUDGET + 1024);
        let back = codec::decode_append(&body).unwrap();
        assert_eq!(back.entries, big[..3].to_vec());
        assert_eq!(
            (back.vote, back.prev_log_id, back.leader_commit),
            (rpc.vote, rpc.prev_log_id, rpc.leader_commit)
        );
        // One entry above the budget still goes alone; nothing at all is an empty append.
        let (body, sent) = encode_append_within_budget(&append(vec![piece(1, 5 * 1024 * 1024)])).unwrap();
        assert_eq!((sent, codec::decode_append(&body).unwrap().entries.len()), (1, 1));
        let (body, sent) = encode_append_within_budget(&append(vec![])).unwrap();
        assert_eq!(sent, 0);
        assert_eq!(codec::decode_append(&body).unwrap().entries, vec![]);
        // The same bytes as the codec's own encoding when everything fits.
        let small = append(vec![piece(1, 10), piece(2, 10)]);
        assert_eq!(encode_append_within_budget(&small).unwrap().0, codec::encode_append(&small).unwrap());
    }

    #[test]
    fn an_append_carries_package_pieces_up_to_the_budget_but_always_its_first_entry() {
        let blank =
            Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 9), payload: EntryPayload::Blank };
        let half = APPEND_PIECE_BUDGET / 2;
        assert_eq!(entries_within_budget(&[piece(1, half), piece(2, half), piece(3, half)]), 2);
        assert_eq!(entries_within_budget(&[piece(1, 3 * APPEND_PIECE_BUDGET), piece(2, 1)]), 1);
        assert_eq!(entries_within_budget(&[blank.clone(), blank.clone(), piece(3, 10)]), 3);
        assert_eq!(entries_within_budget(&[]), 0);
    }
}
