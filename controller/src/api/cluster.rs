//! `/api/v1/cluster`: the Raft cluster's health and membership.

use std::collections::BTreeSet;

use actix_web::{web, HttpResponse};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{reason, ApiError, ApiState, Caller};
use crate::node::{AddLearner, SetVoters};
use crate::types::NodeId;

/// One member as this node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberOut {
    #[schema(value_type = u64)]
    pub id: NodeId,
    pub addr: String,
    pub voter: bool,
    /// Highest log index known replicated to it (on the leader only).
    pub matched: Option<u64>,
    /// Entries it is behind the leader's log (on the leader only).
    pub lag: Option<u64>,
}

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterOut {
    #[schema(value_type = u64)]
    pub node_id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    #[schema(value_type = Option<u64>)]
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    /// Highest index known committed: a quorum's replication on the leader, the applied index elsewhere.
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub members: Vec<MemberOut>,
}

pub fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// The cluster as this node sees it now.
pub fn snapshot(state: &ApiState) -> ClusterOut {
    let m = state.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let last = m.last_log_index;
    let matched = |id: NodeId| -> Option<u64> {
        if id == m.id && m.state == ServerState::Leader {
            return last;
        }
        m.replication.as_ref()?.get(&id).map(|l| l.map(|l| l.index).unwrap_or(0))
    };
    let members: Vec<MemberOut> = membership
        .nodes()
        .map(|(id, n)| {
            let matched = matched(*id);
            MemberOut {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                matched,
                lag: matched.zip(last).map(|(mi, l)| l.saturating_sub(mi)),
            }
        })
        .collect();
    let applied = m.last_applied.map(|l| l.index);
    let commit_index = if m.state == ServerState::Leader {
        let mut idx: Vec<u64> = members.iter().filter(|x| x.voter).filter_map(|x| x.matched).collect();
        idx.sort_unstable_by(|a, b| b.cmp(a));
        let quorum = voters.len() / 2 + 1;
        idx.get(quorum - 1).copied().or(applied)
    } else {
        applied
    };
    ClusterOut {
        node_id: m.id,
        role: role_name(m.state).to_owned(),
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: last,
        commit_index,
        applied_index: applied,
        members,
    }
}

pub async fn get(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(snapshot(&state)))
}

/// The answer of `POST /api/v1/cluster/nodes` and `POST /api/v1/cluster/nodes/{id}/remove`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembershipOut {
    #[schema(value_type = u64)]
    pub node_id: NodeId,
    /// The Raft log index of the (last) membership change.
    pub log_index: u64,
}

/// Body of `POST /api/v1/cluster/nodes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNode {
    #[schema(value_type = u64)]
    pub node_id: NodeId,
    /// The new node's Raft/admin listener address (`host:port`).
    pub addr: String,
    /// Promote to voter once caught up (default true); false keeps it a learner.
    #[serde(default = "yes")]
    pub voter: bool,
    pub reason: String,
}

fn yes() -> bool {
    true
}

pub async fn add(
    caller: Caller,
    state: web::Data<ApiState>,
    body: web::Json<AddNode>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let why = reason(&b.reason)?;
    if b.addr.trim().is_empty() {
        return Err(ApiError::BadRequest("addr is empty".into()));
    }
    state
        .audit(
            &caller,
            "cluster.add_node",
            format!("node {} at {} voter={}: {why}", b.node_id, b.addr, b.voter),
        )
        .await?;
    let added = state.node.add_learner(AddLearner { node_id: b.node_id, addr: b.addr.clone() }, 0).await?;
    let mut log_index = added.log_index;
    if b.voter {
        let mut voters: BTreeSet<NodeId> =
            state.node.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(b.node_id);
        log_index = state.node.set_voters(SetVoters { voters }, 0).await?.log_index;
    }
    Ok(HttpResponse::Ok().json(MembershipOut { node_id: b.node_id, log_index }))
}

/// Body of `POST /api/v1/cluster/nodes/{id}/remove`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveNode {
    pub reason: String,
}

pub async fn remove(
    caller: Caller,
    state: web::Data<ApiState>,
    id: web::Path<NodeId>,
    body: web::Json<RemoveNode>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let why = reason(&body.reason)?;
    let mut voters: BTreeSet<NodeId> =
        state.node.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    if !voters.remove(&id) {
        return Err(ApiError::NotFound(format!("voter {id}")));
    }
    if voters.is_empty() {
        return Err(ApiError::Conflict("cannot remove the last voter".into()));
    }
    state.audit(&caller, "cluster.remove_node", format!("node {id}: {why}")).await?;
    let changed = state.node.set_voters(SetVoters { voters }, 0).await?;
    Ok(HttpResponse::Ok().json(MembershipOut { node_id: id, log_index: changed.log_index }))
}
