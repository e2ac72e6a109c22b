//! The leader's upload to a real clearing server (in process, port 0) from real controller
//! processes: exactly once, through a clearing outage, and across a leader kill.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use clearing::protocol::StationStats;
use clearing::{ClearingClient, ClientConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::*;
use crate::harness::*;

const TOKEN: &str = "clearing-test-token-0123456789";

/// A reference clearing server on a fixed data dir and port, stoppable and restartable.
struct Clearing {
    data: PathBuf,
    addr: std::net::SocketAddr,
    client: ClearingClient,
    running: Option<(CancellationToken, JoinHandle<Result<(), clearing::ServerError>>)>,
}

impl Clearing {
    async fn start(data: &Path) -> Clearing {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = ClearingClient::new(&format!("http://{addr}"), TOKEN, ClientConfig::default()).unwrap();
        let mut c = Clearing { data: data.to_owned(), addr, client, running: None };
        c.serve(listener).await;
        c
    }

    async fn serve(&mut self, listener: std::net::TcpListener) {
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(clearing::run(listener, clearing::Config::new(&self.data, TOKEN), stop.clone()));
        self.running = Some((stop, task));
        let http = reqwest::Client::new();
        let url = format!("http://{}/healthz", self.addr);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "clearing server not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self) {
        let (stop, task) = self.running.take().unwrap();
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// Restarts on the same port and data (the port may linger for a moment).
    async fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) => assert!(Instant::now() < deadline, "cannot rebind {}: {e}", self.addr),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.serve(listener).await;
    }

    /// Restarts with an empty data dir: a clearing house that lost what it acknowledged.
    async fn restart_empty(&mut self, data: &Path) {
        self.data = data.to_owned();
        self.restart().await;
    }

    async fn stats(&self) -> StationStats {
        self.client.stats(&ident("s1")).await.unwrap()
    }
}

/// Like `Cluster::start`, with a `[clearing]` section pointing at `clearing` in every config.
async fn cluster_with_clearing(n: u64, clearing: &Clearing, batch_records: usize) -> Cluster {
    let mut c = Cluster::unstarted(n, Duration::from_secs(15));
    let initial = c.initial.clone();
    for (id, addr) in &initial {
        spawn_node(&mut c, *id, addr.clone(), clearing, batch_records);
    }
    c.wait_leader(Duration::from_secs(20), None).await;
    c
}

fn spawn_node(c: &mut Cluster, id: u64, addr: String, clearing: &Clearing, batch_records: usize) {
    let token = c.node_dir(id).join("clearing-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let extra = format!(
        r#"
[clearing]
url = "http://{clearing}"
token_file = "{token}"
batch_records = {batch_records}
backoff_min_ms = 50
backoff_max_ms = 400
poll_ms = 50
"#,
        clearing = clearing.addr,
        token = token.display(),
    );
    let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 200\n";
    c.spawn_with(id, addr, id == 1, &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" });
}

/// Appends `count` records of gate g01 (from seq `from`) in batches of 50, through node `via`.
async fn append(c: &Cluster, via: u64, from: u64, count: u64) {
    let key = gate_key(1);
    let mut seq = from;
    while seq < from + count {
        let last = (seq + 49).min(from + count - 1);
        let r = c.write(via, &batch("g01", &key, seq..=last)).await.unwrap();
        assert!(matches!(r, controller::state::Response::Appended { duplicates: 0, .. }), "{r:?}");
        seq = last + 1;
    }
}

/// Waits until clearing holds `records` and every running node's cursor is there too.
async fn wait_uploaded(c: &Cluster, clearing: &Clearing, records: u64, timeout: Duration) -> StationStats {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = clearing.client.stats(&ident("s1")).await.ok();
        let mut cursors = Vec::new();
        for id in c.running() {
            cursors.push(c.state(id).await.map(|s| s.clearing_acked_through));
        }
        if let Some(s) = &stats {
            if s.records == records && cursors.iter().all(|k| *k == Some(records)) {
                return s.clone();
            }
        }
        if Instant::now() >= deadline {
            let logs: String = c
                .running()
                .iter()
                .flat_map(|id| {
                    c.nodes[id]
                        .log()
                        .lines()
                        .filter(|l| l.contains("clearing"))
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .take(40)
                .collect::<Vec<_>>()
                .join("\n");
            panic!("not uploaded within {timeout:?}: clearing {stats:?}, cursors {cursors:?}\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register_gate(c: &Cluster) {
    c.write(1, &register("g01", &gate_key(1))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_entries_are_uploaded_exactly_once_and_the_cursor_advances_on_every_node() {
    let _serial = CLUSTER_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let clearing = Clearing::start(dir.path()).await;
    let c = cluster_with_clearing(3, &clearing, 100).await;
    register_gate(&c).await;
    append(&c, 2, 1, 250).await;
    let stats = wait_uploaded(&c, &clearing, 250, Duration::from_secs(30)).await;
    append(&c, 3, 251, 120).await;
    let stats2 = wait_uploaded(&c, &clearing, 370, Duration::from_secs(30)).await;
    assert_eq!(stats2.duplicate_keys, 0);
    assert_eq!(stats2.acked_through, 370);
    assert_eq!(stats2.resent_records, 0, "nothing acknowledged is sent again: {stats2:?}");
    assert!(stats2.batches_acked >= stats.batches_acked + 2, "120 records in batches of at most 100");
    let ledger = c.ledger(1).await;
    assert_eq!(ledger.len(), 370);
    assert_eq!(stats2.last_hash, ledger.last().unwrap().hash, "clearing's chain ends where ours does");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_built_while_clearing_is_down_is_delivered_once_when_it_returns() {
    let _serial = CLUSTER_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut clearing = Clearing::start(dir.path()).await;
    let c = cluster_with_clearing(1, &clearing, 500).await;
    register_gate(&c).await;
    append(&c, 1, 1, 100).await;
    wait_uploaded(&c, &clearing, 100, Duration::from_secs(30)).await;

    clearing.stop().await;
    append(&c, 1, 101, 1_900).await;
    // The leader keeps trying (with backoff) while the records pile up; the cursor stays put.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(c.state(1).await.unwrap().clearing_acked_through, 100, "nothing acknowledged while down");
    assert!(c.nodes[&1].log().contains("clearing upload interrupted"), "the failure is logged");

    clearing.restart().await;
    let stats = wait_uploaded(&c, &clearing, 2_000, Duration::from_secs(60)).await;
    assert_eq!(stats.records, c.ledger(1).await.len() as u64, "records == ledger length");
    assert_eq!(stats.duplicate_keys, 0);
    assert_eq!(stats.resent_records, 0, "{stats:?}");
    assert_eq!(stats.rejected, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_resumes_from_the_replicated_cursor_after_the_leader_is_killed() {
    let _serial = CLUSTER_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let clearing = Clearing::start(dir.path()).await;
    let mut c = cluster_with_clearing(3, &clearing, 50).await;
    register_gate(&c).await;
    append(&c, 1, 1, 300).await;
    wait_uploaded(&c, &clearing, 300, Duration::from_secs(30)).await;
    let before = clearing.stats().await;

    let old = c.wait_leader(Duration::from_secs(5), None).await;
    c.nodes.get_mut(&old).unwrap().kill();
    let new = c.wait_leader(Duration::from_secs(20), Some(old)).await;
    assert_ne!(new, old);
    append(&c, new, 301, 200).await;
    let after = wait_uploaded(&c, &clearing, 500, Duration::from_secs(30)).await;

    assert_eq!(after.duplicate_keys, 0);
    assert_eq!(after.records, 500);
    let resent = after.resent_records - before.resent_records;
    eprintln!("records re-sent after the failover: {resent} (batches {})", after.resends - before.resends);
    assert_eq!(resent, 0, "the new leader re-sent acknowledged records: {after:?}");
    let log = c.nodes[&new].log();
    assert!(log.contains("leader: reconciling with clearing"), "the new leader asked for the watermark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clearing_house_behind_the_cursor_raises_an_alarm_and_gets_the_records_again() {
    let _serial = CLUSTER_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut clearing = Clearing::start(&dir.path().join("first")).await;
    let c = cluster_with_clearing(1, &clearing, 100).await;
    register_gate(&c).await;
    append(&c, 1, 1, 150).await;
    wait_uploaded(&c, &clearing, 150, Duration::from_secs(30)).await;

    clearing.stop().await;
    clearing.restart_empty(&dir.path().join("second")).await;
    append(&c, 1, 151, 10).await;
    let stats = wait_uploaded(&c, &clearing, 160, Duration::from_secs(30)).await;
    assert_eq!(stats.duplicate_keys, 0);
    assert!(stats.conflicts >= 1, "the first upload after the loss was answered 409: {stats:?}");
    let log = c.nodes[&1].log();
    assert!(
        log.contains("clearing alarm") && log.contains("ClearingBehind"),
        "the loss is an alarm, not a silent skip"
    );
}

/// The value of an unlabelled sample in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_successes_errors_and_backlog_show_in_metrics_and_the_clearing_view() {
    let _serial = CLUSTER_LOCK.lock().await;
    let data = tempfile::tempdir().unwrap();
    let mut clearing = Clearing::start(data.path()).await;
    let mut c = Cluster::unstarted(1, Duration::from_secs(15));
    let token = c.node_dir(1).join("clearing-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let viewer = "clearing-view-token";
    let extra = format!(
        r#"
[api]
listen = "{api}"
[[api.tokens]]
name = "vera"
role = "viewer"
sha256 = "{sha}"

[clearing]
url = "http://{clearing}"
token_file = "{token}"
backoff_min_ms = 50
backoff_max_ms = 200
poll_ms = 50
"#,
        sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(viewer.as_bytes())),
        clearing = clearing.addr,
        token = token.display(),
    );
    let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 200\n";
    let addr = c.initial[&1].clone();
    c.spawn_with(1, addr, true, &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" });
    c.wait_leader(Duration::from_secs(20), None).await;
    let key = gate_key(1);
    c.write(1, &register("g01", &key)).await.unwrap();
    c.write(1, &batch("g01", &key, 1..=3)).await.unwrap();

    let metrics = || async {
        let r = c.http.get(format!("http://{api}/metrics")).send().await;
        match r {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics().await;
        if sample(&text, "afc_clearing_records_acked_total") == Some(3.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "no clearing success in metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(sample(&text, "afc_clearing_batches_acked_total").unwrap() >= 1.0);
    assert!(sample(&text, "afc_clearing_last_success_timestamp_seconds").unwrap() > 1_700_000_000.0);
    assert_eq!(sample(&text, "afc_clearing_enabled"), Some(1.0));
    assert_eq!(sample(&text, "afc_clearing_upload_errors_total"), Some(0.0));

    // Clearing goes away: the next records wait, errors count, the view names the last error.
    clearing.stop().await;
    c.write(1, &batch("g01", &key, 4..=5)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics().await;
        if sample(&text, "afc_clearing_upload_errors_total").is_some_and(|e| e >= 1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "no clearing error in metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&text, "afc_clearing_backlog_records"), Some(2.0), "{text}");
    let view: serde_json::Value = c
        .http
        .get(format!("http://{api}/api/v1/clearing"))
        .bearer_auth(viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((view["enabled"].as_bool(), view["leading"].as_bool()), (Some(true), Some(true)), "{view}");
    assert_eq!((view["cursor"].as_u64(), view["backlog"].as_u64()), (Some(3), Some(2)), "{view}");
    assert!(view["last_error"].is_string() && view["last_success_ms"].as_i64().unwrap() > 0, "{view}");
}
