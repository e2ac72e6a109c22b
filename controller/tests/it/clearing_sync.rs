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

/// The `[raft]` body of these tests: fast elections.
const RAFT: &str = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 200\n";

fn spawn_node(c: &mut Cluster, id: u64, addr: String, clearing: &Clearing, batch_records: usize) {
    spawn_node_with(c, id, addr, clearing, batch_records, RAFT, "", "");
}

/// `spawn_node` with its own `[raft]` body, further `[clearing]` keys and further sections
/// before `[clearing]`.
#[allow(clippy::too_many_arguments)]
fn spawn_node_with(
    c: &mut Cluster,
    id: u64,
    addr: String,
    clearing: &Clearing,
    batch_records: usize,
    raft: &str,
    clearing_keys: &str,
    sections: &str,
) {
    let token = c.node_dir(id).join("clearing-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let extra = format!(
        r#"
{sections}
[clearing]
url = "http://{clearing}"
token_file = "{token}"
batch_records = {batch_records}
backoff_min_ms = 50
backoff_max_ms = 400
poll_ms = 50
{clearing_keys}
"#,
        clearing = clearing.addr,
        token = token.display(),
    );
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

/// A process's resident set size in KiB (`VmRSS` of `/proc/PID/status`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// Samples a process's RSS every 50 ms on its own thread; `take_peak` returns the highest value
/// since the previous call.
struct RssSampler {
    pid: u32,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        use std::sync::atomic::Ordering::Relaxed;
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    p.fetch_max(r, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler { pid, peak, stop, thread: Some(thread) }
    }

    fn take_peak(&self) -> u64 {
        let now = rss_kib(self.pid).unwrap_or(0);
        self.peak.swap(now, std::sync::atomic::Ordering::Relaxed).max(now)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Records before the outage (uploaded, the RSS baseline), the outage's backlog, per gate batch.
const BEFORE_OUTAGE: u64 = 1_000;
const OUTAGE_BACKLOG: u64 = 200_000;
const GATE_BATCH: u64 = 1_000;
/// The leader's RSS may grow by at most this much over its RSS before the backlog, while the
/// backlog builds and while it is uploaded. Measured (debug build, 2 cores): 62 MiB before,
/// about 200 MiB after 200,000 records (sled's page cache, 1 GiB by default, keeps the pages
/// written), 207 MiB at the catch-up's peak.
const RSS_GROWTH_LIMIT_MIB: f64 = 256.0;
/// The catch-up may add at most this much over the peak while the backlog built: the uploader
/// pages the ledger (`batch_records` = 5,000 here: measured +7 MiB). Pages of 100,000 records,
/// half the backlog in memory at once, measured +77 MiB; all of it would be about twice that.
const CATCHUP_GROWTH_LIMIT_MIB: f64 = 48.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_traffic_while_clearing_is_down_raises_the_lag_alarm_and_arrives_once_in_bounded_memory() {
    let _serial = CLUSTER_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let clearing_dir = dir.path().join("clearing");
    let mut clearing = Clearing::start(&clearing_dir).await;
    let mut c = Cluster::unstarted(3, Duration::from_secs(60));
    let viewer = "clearing-lag-viewer-token";
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(viewer.as_bytes()));
    let apis: std::collections::BTreeMap<u64, String> =
        c.initial.keys().map(|id| (*id, format!("127.0.0.1:{}", free_port()))).collect();
    // Elections slower than the other tests': 1,000-record batches on 2 cores must not cost the
    // leadership (the RSS figures are the leader's).
    let raft = "heartbeat_ms = 200\nelection_timeout_min_ms = 2000\nelection_timeout_max_ms = 4000\nconnect_timeout_ms = 500\n";
    for (id, addr) in c.initial.clone() {
        let sections = format!(
            "[api]\nlisten = \"{api}\"\n[[api.tokens]]\nname = \"vera\"\nrole = \"viewer\"\nsha256 = \"{sha}\"\n",
            api = apis[&id]
        );
        spawn_node_with(&mut c, id, addr, &clearing, 5_000, raft, "lag_alarm_secs = 2", &sections);
    }
    let leader = c.wait_leader(Duration::from_secs(30), None).await;
    let follower = c.running().into_iter().find(|id| *id != leader).unwrap();
    let pid = c.nodes[&leader].pid().unwrap();
    let http = c.http.clone();
    let view = |id: u64| {
        let (http, url) = (http.clone(), format!("http://{}/api/v1/clearing", apis[&id]));
        async move {
            let r = http.get(url).bearer_auth(viewer).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let metrics = |id: u64| {
        let (http, url) = (http.clone(), format!("http://{}/metrics", apis[&id]));
        async move { http.get(url).bearer_auth(viewer).send().await.unwrap().text().await.unwrap() }
    };

    let key = gate_key(1);
    c.write(leader, &register("g01", &key)).await.unwrap();
    let write_batches = |from: u64, count: u64| {
        let (c, key) = (&c, &key);
        async move {
            let mut seq = from;
            while seq < from + count {
                let last = (seq + GATE_BATCH - 1).min(from + count - 1);
                let r = c.write(leader, &batch("g01", key, seq..=last)).await.unwrap();
                assert!(matches!(r, controller::state::Response::Appended { duplicates: 0, .. }), "{r:?}");
                seq = last + 1;
            }
        }
    };
    write_batches(1, BEFORE_OUTAGE).await;
    wait_uploaded(&c, &clearing, BEFORE_OUTAGE, Duration::from_secs(30)).await;
    let v = view(leader).await;
    assert_eq!((v["lag_ms"].as_u64(), v["lag_alarm"].as_bool()), (Some(0), Some(false)), "caught up: {v}");
    let rss_before = rss_kib(pid).unwrap();

    // Clearing goes down for the day; the station takes its traffic.
    clearing.stop().await;
    let sampler = RssSampler::start(pid);
    let t = Instant::now();
    write_batches(BEFORE_OUTAGE + 1, OUTAGE_BACKLOG / 2).await;
    let mid = view(leader).await;
    write_batches(BEFORE_OUTAGE + OUTAGE_BACKLOG / 2 + 1, OUTAGE_BACKLOG / 2).await;
    let write_time = t.elapsed();
    let rss_build_peak = sampler.take_peak();
    let total = BEFORE_OUTAGE + OUTAGE_BACKLOG;
    assert!(mid["lag_alarm"] == true || write_time < Duration::from_secs(4), "alarm halfway: {mid}");

    // The alarm shows in the clearing view and in the metrics while clearing is down.
    let down =
        poll_view(&view, leader, "the lag alarm while clearing is down", |v| v["lag_alarm"] == true).await;
    assert_eq!(down["backlog"].as_u64(), Some(OUTAGE_BACKLOG), "{down}");
    assert_eq!(down["acked_through"].as_u64(), Some(BEFORE_OUTAGE), "{down}");
    assert!(down["lag_ms"].as_u64().unwrap() >= 2_000, "{down}");
    assert_eq!(down["lag_alarm_secs"].as_u64(), Some(2), "{down}");
    assert!(down["last_error"].is_string(), "{down}");
    let text = metrics(leader).await;
    assert_eq!(sample(&text, "afc_clearing_lag_alarm"), Some(1.0), "{text}");
    assert!(sample(&text, "afc_clearing_lag_seconds").unwrap() >= 2.0, "{text}");
    assert_eq!(sample(&text, "afc_clearing_backlog_records"), Some(OUTAGE_BACKLOG as f64));
    // A follower does not upload: it shows no lag of its own (and no stale alarm).
    let f = view(follower).await;
    assert_eq!((f["lag_ms"].is_null(), f["lag_alarm"].as_bool()), (true, Some(false)), "follower: {f}");
    for id in c.running() {
        assert_eq!(c.state(id).await.unwrap().clearing_acked_through, BEFORE_OUTAGE, "node {id}");
    }

    // Clearing is back: the backlog is uploaded, paged, exactly once.
    sampler.take_peak();
    let t = Instant::now();
    clearing.restart().await;
    let stats = wait_uploaded(&c, &clearing, total, Duration::from_secs(180)).await;
    let upload_time = t.elapsed();
    let rss_catchup_peak = sampler.take_peak();
    drop(sampler);
    println!(
        "clearing outage: {OUTAGE_BACKLOG} records in {} gate batches written in {:.1} s ({:.0} records/s); \
         uploaded in {:.1} s ({:.0} records/s, {} batches); leader RSS before {:.1} MiB, peak while \
         building {:.1} MiB, peak during catch-up {:.1} MiB",
        OUTAGE_BACKLOG / GATE_BATCH,
        write_time.as_secs_f64(),
        OUTAGE_BACKLOG as f64 / write_time.as_secs_f64(),
        upload_time.as_secs_f64(),
        OUTAGE_BACKLOG as f64 / upload_time.as_secs_f64(),
        stats.batches_acked,
        mib(rss_before),
        mib(rss_build_peak),
        mib(rss_catchup_peak),
    );
    assert_eq!(
        c.wait_leader(Duration::from_secs(5), None).await,
        leader,
        "the leader changed: RSS of which?"
    );
    assert_eq!(stats.records, total, "{stats:?}");
    assert_eq!(stats.acked_through, total, "{stats:?}");
    assert_eq!(stats.duplicate_keys, 0, "{stats:?}");
    assert_eq!(stats.resent_records, 0, "{stats:?}");
    assert_eq!(stats.rejected, 0, "{stats:?}");
    for (phase, peak) in [("building the backlog", rss_build_peak), ("the catch-up", rss_catchup_peak)] {
        let growth = mib(peak.saturating_sub(rss_before));
        assert!(
            growth < RSS_GROWTH_LIMIT_MIB,
            "leader RSS grew by {growth:.1} MiB during {phase} (limit {RSS_GROWTH_LIMIT_MIB} MiB)"
        );
    }
    let catchup_growth = mib(rss_catchup_peak.saturating_sub(rss_build_peak));
    assert!(
        catchup_growth < CATCHUP_GROWTH_LIMIT_MIB,
        "the catch-up added {catchup_growth:.1} MiB to the leader's RSS (limit {CATCHUP_GROWTH_LIMIT_MIB} MiB): \
         is the ledger uploaded page by page?"
    );

    // The alarm clears.
    let up = poll_view(&view, leader, "the lag alarm to clear", |v| v["lag_alarm"] == false).await;
    assert_eq!((up["backlog"].as_u64(), up["lag_ms"].as_u64()), (Some(0), Some(0)), "{up}");
    let text = metrics(leader).await;
    assert_eq!(sample(&text, "afc_clearing_lag_alarm"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "afc_clearing_lag_seconds"), Some(0.0), "{text}");

    // Every index once, with our hash: clearing's file, re-verified on open, against our ledger.
    clearing.stop().await;
    let stored = clearing::store::LedgerFile::open(&clearing_dir.join("stations").join("s1")).unwrap();
    let ours = c.ledger(leader).await;
    assert_eq!(ours.len() as u64, total);
    assert_eq!(stored.acked_through(), total);
    assert_eq!(stored.duplicate_keys(), 0);
    for e in &ours {
        assert_eq!(stored.hash_at(e.index), Some(e.hash), "index {}", e.index);
    }
    assert_eq!(stored.hash_at(total + 1), None);
}

/// Polls the clearing view of node `id` until `ok` holds (10 s).
async fn poll_view<F, Fut>(
    view: &F,
    id: u64,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = serde_json::Value>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = view(id).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A clearing house written from SPEC §8 alone: `POST batches` (append from `acked_through + 1`,
/// 200 for a resend, 409 `{expected_from}` otherwise) and `GET watermark` answering only
/// `{acked_through}`, with no `last_hash` (the protocol does not define one).
async fn spec_only_clearing() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<u64>>) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let stored = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = stored.clone();
    let server = HttpServer::new(move || {
        let (w, b) = (s.clone(), s.clone());
        App::new()
            .app_data(web::JsonConfig::default().limit(64 << 20))
            .route(
                "/v1/stations/{station}/watermark",
                web::get().to(move || {
                    let w = w.clone();
                    async move { HttpResponse::Ok().json(serde_json::json!({ "acked_through": *w.lock().unwrap() })) }
                }),
            )
            .route(
                "/v1/stations/{station}/batches",
                web::post().to(move |body: web::Json<serde_json::Value>| {
                    let b = b.clone();
                    async move {
                        let mut acked = b.lock().unwrap();
                        let first = body["first_index"].as_u64().unwrap_or(0);
                        let last = body["last_index"].as_u64().unwrap_or(0);
                        if first > *acked + 1 {
                            return HttpResponse::Conflict()
                                .json(serde_json::json!({ "code": "not_contiguous", "message": "gap", "expected_from": *acked + 1 }));
                        }
                        *acked = (*acked).max(last);
                        HttpResponse::Ok().json(serde_json::json!({ "acked_through": *acked }))
                    }
                }),
            )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (addr, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clearing_house_whose_watermark_has_no_last_hash_is_still_uploaded_to() {
    let (addr, stored) = spec_only_clearing().await;
    let dir = tempfile::tempdir().unwrap();
    let client = ClearingClient::new(&format!("http://{addr}"), TOKEN, ClientConfig::default()).unwrap();
    let clearing = Clearing { data: dir.path().to_owned(), addr, client, running: None };
    let c = cluster_with_clearing(3, &clearing, 40).await;
    register_gate(&c).await;
    append(&c, 1, 1, 100).await;
    poll("the spec-only clearing house holds the 100 records", Duration::from_secs(30), || {
        (*stored.lock().unwrap() == 100).then_some(())
    })
    .await;
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.state(leader).await.map(|s| s.clearing_acked_through) != Some(100) {
        assert!(Instant::now() < deadline, "the replicated cursor did not follow clearing's acks");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_closed_while_clearing_is_down_is_sent_once_it_returns_and_marked_uploaded() {
    use afc_domain::model::BusinessDayRule;
    use controller::day::{CloseHead, DayTally};
    let _serial = CLUSTER_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut clearing = Clearing::start(dir.path()).await;
    let c = cluster_with_clearing(1, &clearing, 500).await;
    register_gate(&c).await;
    append(&c, 1, 1, 100).await;
    wait_uploaded(&c, &clearing, 100, Duration::from_secs(30)).await;

    clearing.stop().await;
    let rule = BusinessDayRule::default();
    let now = controller::clock::now();
    let day = rule.business_day(now).plus_days(-1);
    let head = CloseHead {
        day,
        station: ident("s1"),
        rule,
        closed_at: now,
        closed_by: "otto".into(),
        reason: "end of day".into(),
        ledger_through: 100,
    };
    let close = DayTally::default().close(head, &Default::default());
    let r =
        c.write(1, &controller::state::Request::CloseDay { close: Box::new(close.clone()) }).await.unwrap();
    assert!(matches!(r, controller::state::Response::DayClosed { duplicate: false, .. }), "{r:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sent = "closed business day stored by clearing";
    assert!(!c.nodes[&1].log().contains(sent), "sent while clearing is down");

    clearing.restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.nodes[&1].log().contains(sent) {
        assert!(Instant::now() < deadline, "the closed day was not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Recorded as uploaded (through Raft): not sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.nodes[&1].log().matches(sent).count(), 1, "sent more than once");
    let stored = clearing.client.days(&ident("s1")).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].day, day);
    assert_eq!(stored[0].record, serde_json::to_value(&close).unwrap());
}
