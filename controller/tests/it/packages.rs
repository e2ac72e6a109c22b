//! Large packages through Raft: a package body travels as pieces of at most
//! `PACKAGE_PIECE_BYTES`, one Raft entry each, so replication never stalls on one huge entry.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use afc_domain::blacklist::realistic_sample;
use controller::state::{Request, Response};
use serde_json::Value;

use crate::api::{ENGINEER, SIGNING_SEED};
use crate::harness::*;

/// The `[api]` section of node `id` (listening on `api_addr`, tokens of the API tests).
pub fn api_section(c: &Cluster, id: u64, api_addr: &str, extra: &str) -> String {
    let dir = c.node_dir(id);
    std::fs::write(dir.join("signing.key"), hex::encode(SIGNING_SEED)).unwrap();
    let tokens: String = crate::api::TOKENS
        .iter()
        .map(|(n, r, t)| {
            format!("[[api.tokens]]\nname = \"{n}\"\nrole = \"{r}\"\nsha256 = \"{}\"\n", crate::api::sha(t))
        })
        .collect();
    format!(
        "[api]\nlisten = \"{api_addr}\"\nstation_code = 101\nsigning_key_file = \"{key}\"\nsigning_key_id = 3\n\
         max_body_bytes = 100000000\n{extra}\n{tokens}",
        key = dir.join("signing.key").display(),
    )
}

const RAFT: &str = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n\
                    snapshot_after_logs = 5000\nlogs_kept_after_snapshot = 1000\nconnect_timeout_ms = 200\n";

/// (Re)starts node `id` with the API on `api_addr`.
fn spawn_api_node(c: &mut Cluster, id: u64, api_addr: &str, api_extra: &str) {
    let extra = api_section(c, id, api_addr, api_extra);
    let addr = c.initial[&id].clone();
    c.spawn_with(id, addr, id == 1, &NodeSetup { raft: RAFT, extra: &extra, rust_log: "info,openraft=warn" });
}

/// Three real nodes with the default fast Raft timings (heartbeat 100 ms) and the API on each.
/// Returns the cluster and each node's API address.
pub async fn cluster_with_api(api_extra: &str) -> (Cluster, BTreeMap<u64, String>) {
    let mut c = Cluster::unstarted(3, Duration::from_secs(40));
    let apis: BTreeMap<u64, String> = (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
    for id in 1..=3 {
        spawn_api_node(&mut c, id, &apis[&id], api_extra);
    }
    c.wait_leader(Duration::from_secs(20), None).await;
    (c, apis)
}

/// `{"full": [...], "reason": ...}` written by hand: a `serde_json::Value` of a million entries
/// takes seconds to build in a debug build.
fn blacklist_json(entries: &[afc_domain::blacklist::Entry], reason: &str) -> Vec<u8> {
    use std::fmt::Write;
    let mut s = String::with_capacity(entries.len() * 40);
    s.push_str("{\"full\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let media = serde_json::to_string(&e.media).unwrap();
        if e.first == e.last {
            write!(s, "{{\"media\":{media},\"id\":{}}}", e.first).unwrap();
        } else {
            write!(s, "{{\"media\":{media},\"first\":{},\"last\":{}}}", e.first, e.last).unwrap();
        }
    }
    write!(s, "],\"reason\":{}}}", serde_json::to_string(reason).unwrap()).unwrap();
    s.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_entry_blacklist_uploaded_through_a_follower_is_stored_on_all_three_nodes_a_lagging_node_catches_up_and_writes_still_commit_quickly(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let started = Instant::now();
    let api_extra = "blacklist_confirm_threshold = 2000000";
    let (mut c, apis) = cluster_with_api(api_extra).await;
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // The third node is down during the upload: it catches up from the log afterwards, where
    // every piece waits at once (one append carrying them all would never arrive in time).
    let lagging = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    c.nodes.get_mut(&lagging).unwrap().kill();

    let entries = realistic_sample(1_000_000, 2026);
    let body = blacklist_json(&entries, "base list from clearing");
    drop(entries);
    let r = c
        .http
        .post(format!("http://{}/api/v1/parameters/blacklist", apis[&follower]))
        .bearer_auth(ENGINEER)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}\n{}", c.nodes[&leader].log());
    assert_eq!(v["version"], 1);
    let size = v["size"].as_u64().unwrap();
    assert!(size > 1_000_000, "a 1,000,000-entry list is over a megabyte: {size}");
    let sha = v["sha256"].as_str().unwrap().to_owned();

    spawn_api_node(&mut c, lagging, &apis[&lagging], api_extra);
    // Every node holds the same package (each answers from its own state machine).
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(15)).await;
    for (id, api) in &apis {
        let r = c
            .http
            .get(format!("http://{api}/api/v1/parameters/blacklist/1"))
            .bearer_auth(ENGINEER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "node {id}");
        let shown: Value = r.json().await.unwrap();
        assert_eq!(shown["package_len"].as_u64(), Some(size), "node {id}");
        assert_eq!(shown["package_sha256"].as_str(), Some(sha.as_str()), "node {id}");
    }

    // The cluster stays healthy: the same leader, and small writes commit at once.
    assert_eq!(c.wait_leader(Duration::from_secs(5), None).await, leader, "no election was needed");
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let a = Request::Audit {
            actor: "test".into(),
            action: "probe".into(),
            detail: format!("{i}"),
            at: afc_domain::model::Timestamp(1),
        };
        let r = c.write(follower, &a).await.unwrap();
        assert!(matches!(r, Response::Audited { .. }), "{r:?}");
        slowest = slowest.max(t.elapsed());
    }
    assert!(slowest < Duration::from_millis(500), "slowest write after the upload took {slowest:?}");
    let applied = c.leader_applied(leader).await;
    c.wait_applied(applied, Duration::from_secs(5)).await;
    eprintln!("took {:?}", started.elapsed());
}
