//! Real three-process clusters of the `controller` binary on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use controller::chain::{chain_hash, LedgerEntry, GENESIS_HASH};
use controller::node::{AddLearner, SetVoters};
use controller::state::{Rejection, Request, Response};

use crate::common::*;
use crate::harness::*;

/// Checks contiguous indexes from `first` and the hash chain (from genesis when `first` is 1).
fn assert_chain(ledger: &[LedgerEntry]) {
    let mut prev = GENESIS_HASH;
    for (i, e) in ledger.iter().enumerate() {
        assert_eq!(e.index, i as u64 + 1, "ledger indexes are contiguous");
        assert_eq!(e.hash, chain_hash(&prev, &e.record), "hash chain broken at {}", e.index);
        prev = e.hash;
    }
}

/// Every (gate, seq) appears at most once.
fn seqs_by_gate(ledger: &[LedgerEntry]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut m: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for e in ledger {
        let fresh = m.entry(e.record.gate.to_string()).or_default().insert(e.record.gate_seq);
        assert!(fresh, "gate {} seq {} is in the ledger twice", e.record.gate, e.record.gate_seq);
    }
    m
}

async fn all_ledgers_equal(c: &Cluster) -> Vec<LedgerEntry> {
    let ids = c.running();
    let first = c.ledger(ids[0]).await;
    for id in &ids[1..] {
        assert_eq!(c.ledger(*id).await, first, "node {id}'s ledger differs from node {}'s", ids[0]);
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_to_any_node_reach_all_three_and_resent_or_forged_batches_change_nothing() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::start(3, Tuning::default()).await;
    let key = gate_key(1);
    assert!(matches!(c.write(2, &register("g01", &key)).await.unwrap(), Response::GateRegistered { .. }));
    for i in 0..30u64 {
        let via = 1 + i % 3;
        let r = c.write(via, &batch("g01", &key, i * 10 + 1..=i * 10 + 10)).await.unwrap();
        assert!(matches!(r, Response::Appended { appended: 10, duplicates: 0, .. }), "{r:?}");
    }
    let resent = c.write(3, &batch("g01", &key, 1..=10)).await.unwrap();
    assert!(matches!(resent, Response::Appended { appended: 0, duplicates: 10, through_seq: 300, .. }));
    let forged = c.write(1, &batch("g01", &gate_key(66), 301..=310)).await.unwrap();
    assert_eq!(forged, Response::Rejected { rejection: Rejection::BadSignature });

    let leader = c.wait_leader(Duration::from_secs(5), None).await;
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(10)).await;
    let ledger = all_ledgers_equal(&c).await;
    assert_eq!(ledger.len(), 300);
    assert_chain(&ledger);
    assert_eq!(seqs_by_gate(&ledger)["g01"], (1..=300).collect());

    // A request without the cluster secret is refused.
    let r =
        c.http.post(format!("http://{}/admin/write", c.addr(1))).json(&batch("g01", &key, [1])).send().await;
    assert_eq!(r.unwrap().status(), 401);
    // ... before its body is read: a stranger announcing 200 MiB gets the 401 without sending it.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(c.addr(1)).await.unwrap();
        let head = format!(
            "POST /raft/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            200 * 1024 * 1024
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
            .await
            .expect("no answer before the body: the listener waits to read 200 MiB from a stranger")
            .unwrap();
        let head = String::from_utf8_lossy(&answer[..n]);
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }

    // SIGTERM: the node shuts down in order and exits cleanly.
    let victim = c.nodes.get_mut(&3).unwrap();
    let pid = victim.pid().unwrap();
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = victim.child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "node 3 did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    victim.child = None;
    assert!(exit.success(), "exit status {exit:?}");
    let log = victim.log();
    let order = ["shutdown 1/4", "shutdown 2/4", "shutdown 3/4", "shutdown 4/4", "shutdown complete"];
    let positions: Vec<usize> = order.iter().map(|s| log.find(s).unwrap_or(usize::MAX)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1] && w[1] != usize::MAX), "shutdown order: {positions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_elects_a_new_one_within_3s_and_loses_no_acknowledged_write() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::start(3, Tuning { snapshot_after_logs: 300, logs_kept_after_snapshot: 50 }).await;
    let gates = ["g01", "g02", "g03", "g04"];
    for (i, g) in gates.iter().enumerate() {
        c.write(1, &register(g, &gate_key(i as u8 + 1))).await.unwrap();
    }
    let addrs: Vec<String> = (1..=3).map(|id| c.addr(id).to_owned()).collect();
    let writers = GateWriters::start(&c.http, &addrs, &gates, Retry::Rounds(4));
    poll("load to build up", Duration::from_secs(20), || (writers.acks() >= 100).then_some(())).await;

    let old = c.wait_leader(Duration::from_secs(5), None).await;
    let killed_at = Instant::now();
    c.nodes.get_mut(&old).unwrap().kill();
    let acks_at_kill = writers.acks();
    let new = c.wait_leader(Duration::from_secs(10), Some(old)).await;
    let elected_in = killed_at.elapsed();
    poll("ingestion to resume", Duration::from_secs(10), || {
        (writers.acks() > acks_at_kill + 4).then_some(())
    })
    .await;
    let resumed_in = killed_at.elapsed();
    eprintln!(
        "leader {old} killed: node {new} elected in {elected_in:?}, ingestion resumed in {resumed_in:?}"
    );
    assert!(elected_in < Duration::from_secs(3), "election took {elected_in:?}");
    assert!(resumed_in < Duration::from_secs(3), "ingestion resumed after {resumed_in:?}");

    poll("more load on the new leader", Duration::from_secs(20), || {
        (writers.acks() > acks_at_kill + 50).then_some(())
    })
    .await;
    let acked = writers.stop().await;

    c.restart(old, false);
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(30)).await;
    let ledger = all_ledgers_equal(&c).await;
    assert_chain(&ledger);
    let seqs = seqs_by_gate(&ledger);
    for (g, through) in acked {
        assert!(through > 0);
        let have = &seqs[&g];
        assert!(
            (1..=through).all(|s| have.contains(&s)),
            "gate {g}: an acknowledged seq up to {through} is missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_many_entries_catches_up_by_snapshot_and_does_not_bootstrap_again() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::start(3, Tuning { snapshot_after_logs: 50, logs_kept_after_snapshot: 5 }).await;
    let key = gate_key(1);
    c.write(1, &register("g01", &key)).await.unwrap();
    let leader = c.wait_leader(Duration::from_secs(5), None).await;
    // Node 1 was the bootstrap node; take it down if it follows, else another follower.
    let down = if leader != 1 { 1 } else { 2 };
    let down_last = c.metrics(down).await.unwrap().last_log_index.unwrap_or(0);
    c.nodes.get_mut(&down).unwrap().kill();
    for i in 0..300u64 {
        let r = c.write(leader, &batch("g01", &key, i * 5 + 1..=i * 5 + 5)).await.unwrap();
        assert!(matches!(r, Response::Appended { appended: 5, .. }));
    }
    c.write(leader, &Request::ClearingAck { through_index: 700 }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let purged_index = loop {
        let purged = c.metrics(leader).await.and_then(|m| m.purged).map(|l| l.index).unwrap_or(0);
        if purged > down_last + 50 || Instant::now() > deadline {
            break purged;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(purged_index > down_last, "the leader purged through {purged_index}, follower had {down_last}");

    // Restart with the bootstrap flag set: the store is not empty, so it must not bootstrap again.
    c.restart(down, true);
    let applied = c.leader_applied(leader).await;
    c.wait_applied(applied, Duration::from_secs(30)).await;
    let ledger = all_ledgers_equal(&c).await;
    assert_eq!(ledger.len(), 1500);
    assert_chain(&ledger);
    let log = c.nodes[&down].log();
    assert!(log.contains("installed snapshot"), "node {down} did not install a snapshot:\n{log}");
    assert!(log.contains("not repeated"), "node {down} did not skip the bootstrap:\n{log}");
    let st = c.state(down).await.unwrap();
    assert_eq!(st.clearing_acked_through, 700);
    assert_eq!(st.gates["g01"], 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_to_four_voters_and_back_to_three() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::start(3, Tuning::default()).await;
    let key = gate_key(1);
    c.write(1, &register("g01", &key)).await.unwrap();
    c.write(2, &batch("g01", &key, 1..=10)).await.unwrap();
    let addr4 = format!("127.0.0.1:{}", free_port());
    c.spawn(4, addr4.clone(), false);
    poll_http(&c, 4).await;

    let r = c.post(3, "/admin/learner", &AddLearner { node_id: 4, addr: addr4 }).await.unwrap();
    assert!(r.status().is_success(), "{:?}\n{}\n{}", r.text().await, c.nodes[&4].log(), c.nodes[&3].log());
    let r = c.post(2, "/admin/voters", &SetVoters { voters: [1, 2, 3, 4].into() }).await.unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    let voters = |m: &Metrics| m.membership_config.membership().voter_ids().collect::<BTreeSet<u64>>();
    assert_eq!(voters(&c.metrics(leader).await.unwrap()), [1, 2, 3, 4].into());
    c.write(4, &batch("g01", &key, 11..=20)).await.unwrap();
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(10)).await;
    assert_eq!(c.ledger(4).await.len(), 20);

    let r = c.post(4, "/admin/voters", &SetVoters { voters: [1, 2, 3].into() }).await.unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    c.nodes.get_mut(&4).unwrap().kill();
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    assert_eq!(voters(&c.metrics(leader).await.unwrap()), [1, 2, 3].into());
    c.write(1, &batch("g01", &key, 21..=30)).await.unwrap();
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(10)).await;
    assert_eq!(all_ledgers_equal(&c).await.len(), 30);
}

async fn poll_http(c: &Cluster, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = c
            .http
            .get(format!("http://{}/healthz", c.addr(id)))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "node {id} never answered /healthz");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a request head announcing `len` body bytes to `path` (with the secret) and sends none of
/// them: the status line the node answers with, before reading any body.
async fn announce(addr: &str, path: &str, len: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nx-afc-cluster-secret: {SECRET}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer before the body of {len} bytes"))
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_peer_route_refuses_a_body_above_its_own_limit_and_admin_writes_are_audited_with_their_origin() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::unstarted(1, Duration::from_secs(15));
    let api = format!("127.0.0.1:{}", free_port());
    let token_hash = "f032a74e23e29ba2ae3bc0522b1c69c469402368fcda286c20f0b19991e811ea"; // vera-viewer-token
    let extra = format!(
        "[api]\nlisten = \"{api}\"\n[[api.tokens]]\nname = \"vera\"\nrole = \"viewer\"\nsha256 = \"{token_hash}\"\n"
    );
    let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n";
    let addr = c.initial[&1].clone();
    c.spawn_with(1, addr.clone(), true, &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" });
    c.wait_leader(Duration::from_secs(20), None).await;

    // Per route, one byte over its limit is refused at once from the announced length (413), one
    // byte under is read (and then found not to be a valid body: 400). Default limits: votes and
    // small admin routes 64 KiB, writes 4 MiB, appends 17 MiB, snapshot chunks 8 MiB + 64 KiB.
    let limits = controller::http::Limits {
        small: 64 * 1024,
        write: 4 * 1024 * 1024,
        append: 2 * (8 * 1024 * 1024 + 1000 * 512),
        snapshot: 8 * 1024 * 1024 + 64 * 1024,
    };
    for (path, limit) in [
        ("/raft/vote", limits.small),
        ("/admin/learner", limits.small),
        ("/admin/voters", limits.small),
        ("/admin/gate-command", limits.small),
        ("/admin/write", limits.write),
        ("/raft/append", limits.append),
        ("/raft/snapshot", limits.snapshot),
    ] {
        assert_eq!(announce(&addr, path, limit + 1).await, "HTTP/1.1 413 Payload Too Large", "{path}");
    }
    // A 1 MiB body is within the write limit but not the vote's: the same bytes, sent in full.
    let body = vec![b' '; 1024 * 1024];
    for (path, want) in [("/raft/vote", 413), ("/admin/write", 400)] {
        let r = c
            .http
            .post(format!("http://{addr}{path}"))
            .header("x-afc-cluster-secret", SECRET)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, want, "{path}: {v}");
        if want == 413 {
            assert_eq!(v["code"], "payload_too_large", "{v}");
        }
    }
    // A streamed (chunked) body, whose length nobody announces, is cut off at the limit too.
    assert_eq!(
        chunked(&addr, "/raft/vote", limits.small + 16 * 1024).await,
        "HTTP/1.1 413 Payload Too Large"
    );

    // /admin/write with the secret: a sensitive request (the station mode) is preceded by an audit
    // line naming where it came from; one naming a node says which.
    let mode = Request::SetMode {
        station: afc_domain::model::StationCode(1),
        bits: afc_domain::mode::ModeBits(0x008),
        reason: "straight to the admin listener".into(),
        actor: "mallory".into(),
        at: afc_domain::model::Timestamp(1_700_000_000_000),
    };
    assert!(matches!(c.write(1, &mode).await.unwrap(), Response::ModeSet { .. }));
    let r = c
        .http
        .post(format!("http://{addr}/admin/write"))
        .header("x-afc-cluster-secret", SECRET)
        .header("x-afc-origin-node", "7")
        .json(&Request::ClearingAck { through_index: 0 })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let audit: Vec<serde_json::Value> = c
        .http
        .get(format!("http://{api}/api/v1/audit?from=1&limit=100"))
        .bearer_auth("vera-viewer-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let line = |action: &str| audit.iter().find(|a| a["action"] == action).cloned();
    let set_mode =
        line("admin.write.set_mode").unwrap_or_else(|| panic!("mode change not audited: {audit:?}"));
    assert_eq!(set_mode["actor"], "admin-listener");
    let detail = set_mode["detail"].as_str().unwrap();
    assert!(
        detail.contains("straight to the admin listener") && detail.contains("from 127.0.0.1:"),
        "{detail}"
    );
    let ack =
        line("admin.write.clearing_ack").unwrap_or_else(|| panic!("cursor move not audited: {audit:?}"));
    assert_eq!(ack["actor"], "node:7");
    assert!(
        ack["detail"].as_str().unwrap().contains("node 7 (as it claims; no client certificate)"),
        "{ack}"
    );
}

/// Sends `total` body bytes to `path` in 4 KiB chunks of a chunked body (with the secret) and
/// returns the status line of the answer.
async fn chunked(addr: &str, path: &str, total: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nx-afc-cluster-secret: {SECRET}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("1000\r\n{}\r\n", " ".repeat(4096));
    for _ in 0..total / 4096 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_owned()
}
