//! Kill-and-reopen: a real node is SIGKILLed in the middle of appending; its store, reopened, is
//! intact and consistent, re-applying entries changes nothing, and the node restarts without
//! bootstrapping again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use afc_domain::model::Timestamp;
use controller::chain::{verify_chain, GENESIS_HASH};
use controller::state::{Request, Response};
use controller::storage;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};

use crate::common::*;
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_append_reopens_with_vote_log_and_state_intact_and_reapplying_changes_nothing() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::start(1, Tuning { snapshot_after_logs: 150, logs_kept_after_snapshot: 20 }).await;
    let gates = ["g01", "g02"];
    for (i, g) in gates.iter().enumerate() {
        c.write(1, &register(g, &gate_key(i as u8 + 1))).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let addr = vec![c.addr(1).to_owned()];
    let mut writers = Vec::new();
    for (i, g) in gates.iter().enumerate() {
        let (http, addr, stop, acks, g) =
            (c.http.clone(), addr.clone(), stop.clone(), acks.clone(), g.to_string());
        writers.push(tokio::spawn(async move {
            let key = gate_key(i as u8 + 1);
            let (mut next, mut acked) = (1u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("http://{}/admin/write", addr[0]))
                    .header("x-afc-cluster-secret", SECRET)
                    .json(&batch(&g, &key, next..next + 20))
                    .send()
                    .await;
                // After the kill every request fails: the writer just notes the last ack.
                match r {
                    Ok(r) if r.status().is_success() => match r.json::<Response>().await {
                        Ok(Response::Appended { through_seq, .. }) => {
                            acked = through_seq;
                            next += 20;
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => break,
                    },
                    _ => break,
                }
            }
            (g, acked)
        }));
    }
    poll("appends to pile up past a snapshot", Duration::from_secs(30), || {
        (acks.load(Ordering::Relaxed) >= 250).then_some(())
    })
    .await;
    // SIGKILL while both writers are mid-request.
    c.nodes.get_mut(&1).unwrap().kill();
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for w in writers {
        let (g, through) = w.await.unwrap();
        acked.insert(g, through);
    }

    let data = c.nodes[&1].dir.join("data");
    let stored_through = {
        let (mut log, mut sm) = storage::open(&data).unwrap();
        let vote = log.read_vote().await.unwrap().expect("the vote survives");
        assert!(vote.is_committed());
        let st = log.get_log_state().await.unwrap();
        let last_log = st.last_log_id.expect("log survives").index;
        let (applied, membership) = sm.applied_state().await.unwrap();
        let applied = applied.expect("applied state survives").index;
        assert!(applied <= last_log, "applied {applied} beyond the log {last_log}");
        assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), vec![1]);
        let purged = st.last_purged_log_id.map(|l| l.index).unwrap_or(0);
        let entries = log.try_get_log_entries(purged + 1..=last_log).await.unwrap();
        assert_eq!(entries.len() as u64, last_log - purged, "no hole in the log");

        // The ledger: contiguous, chained, every acknowledged seq present exactly once.
        let state = sm.state().unwrap();
        let ledger = sm.ledger_entries(0, usize::MAX).unwrap();
        assert_eq!(ledger.len() as u64, state.ledger_len());
        assert_eq!(verify_chain(GENESIS_HASH, 1, &ledger).unwrap(), state.last_hash);
        for (g, through) in &acked {
            assert!(*through > 0);
            let mut seqs: Vec<u64> =
                ledger.iter().filter(|e| e.record.gate.as_str() == g).map(|e| e.record.gate_seq).collect();
            let n = seqs.len();
            seqs.dedup();
            assert_eq!(seqs.len(), n, "a seq of {g} appears twice");
            assert!(
                seqs.len() as u64 >= *through,
                "gate {g}: acknowledged through {through}, have {}",
                seqs.len()
            );
            assert_eq!(state.gates[&ident(g)].progress.contiguous_through, seqs.len() as u64);
        }

        // Applying already-applied entries again changes nothing.
        let again =
            log.try_get_log_entries(applied.saturating_sub(30).max(purged + 1)..=applied).await.unwrap();
        assert!(!again.is_empty());
        let replies = sm.apply(again).await.unwrap();
        assert!(replies.iter().all(|r| *r == Response::None));
        assert_eq!(sm.state().unwrap(), state);
        assert_eq!(sm.ledger_entries(0, usize::MAX).unwrap(), ledger);
        sm.flush().await.unwrap();
        // A batch in flight at the kill may be committed without its ack having been seen.
        state.gates[&ident("g01")].progress.contiguous_through
    };

    // Restarted with bootstrap still set: it resumes (no second bootstrap) and keeps appending.
    c.restart(1, true);
    c.wait_leader(Duration::from_secs(20), None).await;
    assert!(stored_through >= acked["g01"]);
    // Entries logged before the kill are committed and applied once the new term's first entry
    // is: write one, then ask the node where g01 stands.
    let audit = Request::Audit {
        actor: "test".into(),
        action: "restart".into(),
        detail: String::new(),
        at: Timestamp(1),
    };
    assert!(matches!(c.write(1, &audit).await.unwrap(), Response::Audited { .. }));
    let now_through = c.state(1).await.unwrap().gates["g01"];
    assert!(now_through >= stored_through);
    let next = now_through + 1;
    let r = c.write(1, &batch("g01", &gate_key(1), next..next + 5)).await.unwrap();
    assert!(matches!(r, Response::Appended { appended: 5, .. }), "{r:?}");
    assert!(c.nodes[&1].log().contains("not repeated"));
    let ledger = c.ledger(1).await;
    verify_chain(GENESIS_HASH, 1, &ledger).unwrap();
}
