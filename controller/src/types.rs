//! The Raft type configuration: what a log entry carries, what applying it returns, how nodes are
//! named and addressed, and how snapshots are held (as files, streamed, never whole in memory).

use crate::state::request::{Request, Response};

pub mod codec;

/// A controller node's id in the Raft cluster (from the config file; unique per station).
pub type NodeId = u64;

/// A peer's address: `host:port` of its Raft/admin HTTP listener.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The controller's Raft types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
