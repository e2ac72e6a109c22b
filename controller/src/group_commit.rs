//! Group commit of gate batches: task `group-commit` packs the transaction batches proposed while
//! earlier proposals are in flight into one Raft entry ([`Request::AppendTxBatches`]).
//!
//! Why: openraft 0.9's leader appends and syncs one client write at a time (`append_to_log` waits
//! for the log's flush callback before the next command), and every node `fdatasync`s each
//! append. One entry for many gate batches means one append, one replication round and one sync
//! per node for all of them. Only [`Request::AppendTxBatch`] goes through here; everything else
//! is proposed as it comes.
//!
//! Rules: at most [`IN_FLIGHT`] proposals at once; a proposal takes every batch waiting when a
//! slot frees, up to [`MAX_GROUP_RECORDS`] records (so an entry stays small: Raft entries and
//! append RPCs must cross within one heartbeat); a lone batch is proposed as itself. Every batch
//! gets its own answer (its [`Response::Appended`] or rejection), or the proposal's error.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::state::{Request, Response, TxBatchIn};
use crate::types::{Node as PeerNode, NodeId, Raft};

/// Proposals in flight at once: one being appended, one waiting with the next group.
pub const IN_FLIGHT: usize = 2;
/// Records per group (about 100 bytes each in the log).
pub const MAX_GROUP_RECORDS: usize = 1_000;
/// Batches waiting for a group; beyond this a proposal waits for room.
const QUEUE: usize = 4_096;

/// What a proposal can fail with (openraft's own error, shared by every batch of a group).
pub type WriteError = RaftError<NodeId, ClientWriteError<NodeId, PeerNode>>;

type Waiter = oneshot::Sender<Result<Response, WriteError>>;

/// The handle proposals go through.
#[derive(Clone)]
pub struct GroupCommit {
    raft: Raft,
    tx: mpsc::Sender<(TxBatchIn, Waiter)>,
}

impl GroupCommit {
    /// Starts task `group-commit` on `raft`; it ends when the last handle is dropped.
    pub fn start(raft: Raft) -> GroupCommit {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft.clone(), rx));
        GroupCommit { raft, tx }
    }

    /// Proposes `req` (a gate batch with others, anything else alone) and returns what applying
    /// it gave.
    pub async fn write(&self, req: Request) -> Result<Response, WriteError> {
        let Request::AppendTxBatch { station, gate, records, signature, covers_from } = req else {
            return self.raft.client_write(req).await.map(|w| w.data);
        };
        let (tx, rx) = oneshot::channel();
        let batch = TxBatchIn { station, gate, records, signature, covers_from };
        if let Err(mpsc::error::SendError((batch, _))) = self.tx.send((batch, tx)).await {
            // The task is gone (shutting down): propose it alone.
            return self.raft.client_write(single(batch)).await.map(|w| w.data);
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
        }
    }
}

fn single(b: TxBatchIn) -> Request {
    Request::from(b)
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(TxBatchIn, Waiter)>) {
    tracing::info!(task = "group-commit", "started");
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a slot first: batches arriving meanwhile join this group.
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let mut records = first.0.records.len();
        let mut group = vec![first];
        while records < MAX_GROUP_RECORDS {
            match rx.try_recv() {
                Ok(next) => {
                    records += next.0.records.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, group).await;
            drop(permit);
        });
    }
    tracing::info!(task = "group-commit", "stopped");
}

async fn propose(raft: &Raft, group: Vec<(TxBatchIn, Waiter)>) {
    let (batches, waiters): (Vec<TxBatchIn>, Vec<Waiter>) = group.into_iter().unzip();
    if batches.len() == 1 {
        let req = batches.into_iter().map(single).next();
        if let (Some(req), Some(w)) = (req, waiters.into_iter().next()) {
            let _ = w.send(raft.client_write(req).await.map(|w| w.data));
        }
        return;
    }
    let n = batches.len();
    match raft.client_write(Request::AppendTxBatches { batches }).await {
        Ok(w) => match w.data {
            Response::AppendedMany { results } if results.len() == n => {
                for (w, r) in waiters.into_iter().zip(results) {
                    let _ = w.send(Ok(r));
                }
            }
            other => {
                tracing::error!(?other, batches = n, "unexpected answer to a group of batches");
                for w in waiters {
                    let _ = w.send(Ok(other.clone()));
                }
            }
        },
        Err(e) => {
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
    }
}
