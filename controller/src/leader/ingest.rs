//! Task `tx-ingest`: gate batches into the replicated ledger, acked only after commit.
//!
//! Up to `mqtt.ingest_concurrency` batches are proposed at once, through the node's group commit
//! ([`crate::group_commit`]): batches proposed together share one Raft entry, one replication
//! round and one fsync per node.
//! After a batch commits, `gates/{gate}/tx/ack {through_seq, installation}` goes out (QoS 1),
//! sealed with the station key, with the gate's contiguous high-water mark and the `installation`
//! the batch named (a gate takes only acks for its own installation); a re-sent batch is a no-op
//! in the state machine and is acked again.
//! A batch the state machine refuses (unknown gate, bad signature, ...) is logged and counted,
//! never acked. A failed proposal (leadership lost) is not acked: the gate re-sends to the next
//! leader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use afc_domain::model::Ident;
use afc_domain::topic::Topic;
use afc_domain::wire::{TxAck, TxBatch, TxBatchError};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::state::{Request, Response, TxBatchIn};

use super::{Ctx, Stats};

/// Batches waiting for a proposal slot; beyond this the dispatcher drops (the gate re-sends).
pub const QUEUE: usize = 4096;

/// A gate batch as the dispatcher hands it on: its records read once, with the canonical bytes
/// the gate signed (as received from a `raw` batch, or encoded once from an earlier gate's
/// `records`), which the Raft entry, the signature check, the hash chain and the store use.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// The batch's unsigned `installation`, which only addresses the ack.
    pub(crate) installation: Option<String>,
    pub(crate) batch: TxBatchIn,
}

impl Incoming {
    /// Reads a batch's records from either form; refused when it carries both or neither, or a
    /// raw record that is not canonical bytes.
    pub(crate) fn read(batch: TxBatch) -> Result<Incoming, TxBatchError> {
        let installation = batch.installation.clone();
        Ok(Incoming { installation, batch: TxBatchIn::try_from(batch)? })
    }
}

pub(crate) async fn ingest_task(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<(Ident, Incoming)>,
    stop: CancellationToken,
) {
    tracing::info!(task = "tx-ingest", "started");
    let limit = ctx.cfg.ingest_concurrency.max(1);
    let mut inflight: JoinSet<(Ident, Option<String>, Option<u64>)> = JoinSet::new();
    // Highest through_seq acked per gate and installation in this session: acks never go backwards.
    let mut acked: HashMap<(Ident, Option<String>), u64> = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                let Ok((gate, installation, Some(through))) = done else { continue };
                let best = acked.entry((gate.clone(), installation.clone())).or_insert(0);
                *best = (*best).max(through);
                let ack = TxAck { through_seq: *best, installation };
                let topic = Topic::GateTxAck { station: ctx.station.clone(), gate }.to_string();
                let payload = ctx.station_key.seal(&topic, &ack);
                ctx.publish(topic, false, payload).await;
                Stats::inc(&ctx.stats.tx_batches_acked, 1);
            }
            b = rx.recv(), if inflight.len() < limit => {
                let Some((gate, batch)) = b else { break };
                let c = ctx.clone();
                let installation = batch.installation.clone();
                inflight.spawn(async move { (gate.clone(), installation, propose(&c, &gate, batch).await) });
            }
        }
    }
    inflight.abort_all();
    tracing::info!(task = "tx-ingest", "stopped");
}

/// Proposes one batch; the through_seq to ack, or `None` when nothing may be acked.
async fn propose(ctx: &Ctx, gate: &Ident, incoming: Incoming) -> Option<u64> {
    let Incoming { installation, batch } = incoming;
    let records = batch.records.len();
    // Records carry their installation (signed); the batch's unsigned copy only addresses the ack.
    if let Some(i) = batch.records.first().and_then(|r| r.installation) {
        if installation.as_deref() != Some(i.to_string().as_str()) {
            Stats::inc(&ctx.stats.tx_batches_rejected, 1);
            tracing::warn!(%gate, records, "tx batch refused: its installation is not its records': not acked");
            return None;
        }
    }
    let started = Instant::now();
    let times = super::plausible::record_times(&batch.records);
    match ctx.node.group.write(Request::from(batch)).await {
        Ok(w) => match w {
            Response::Appended { appended, duplicates, deferred, gaps, conflicts, through_seq, .. } => {
                Stats::inc(&ctx.stats.tx_records_appended, u64::from(appended));
                ctx.metrics.observe_append(started.elapsed(), u64::from(appended));
                super::plausible::check(ctx, gate, &times);
                if gaps > 0 || conflicts > 0 {
                    tracing::error!(%gate, gaps, conflicts, through_seq, "tx batch: sequence gaps or key conflicts recorded");
                }
                tracing::debug!(%gate, records, appended, duplicates, deferred, through_seq, "tx batch committed");
                Some(through_seq)
            }
            Response::Rejected { rejection } => {
                Stats::inc(&ctx.stats.tx_batches_rejected, 1);
                tracing::warn!(%gate, records, %rejection, "tx batch refused: not acked");
                None
            }
            other => {
                tracing::error!(%gate, ?other, "unexpected response to a tx batch");
                None
            }
        },
        Err(e) => {
            Stats::inc(&ctx.stats.tx_propose_errors, 1);
            tracing::warn!(%gate, error = %e, "tx batch not committed: not acked");
            None
        }
    }
}
