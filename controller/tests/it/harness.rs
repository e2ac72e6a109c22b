//! Runs real `controller` processes on loopback: each in its own directory under one temp dir,
//! on ports chosen at run time, logging to a file, killed on drop. Readiness is polled.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller::chain::LedgerEntry;
use controller::http::StateSummary;
use controller::state::{Request, Response};
use openraft::{BasicNode, RaftMetrics, ServerState};
use serde::de::DeserializeOwned;

pub const SECRET: &str = "test-cluster-secret-0123456789";

/// Cluster processes compete for 2 cores: run one cluster test at a time.
pub static CLUSTER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub type Metrics = RaftMetrics<u64, BasicNode>;

pub use afc_test_support::net::free_port;

/// Tuning for tests: fast elections, small snapshot threshold so catch-up by snapshot happens.
#[derive(Clone, Copy)]
pub struct Tuning {
    pub snapshot_after_logs: u64,
    pub logs_kept_after_snapshot: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning { snapshot_after_logs: 200, logs_kept_after_snapshot: 20 }
    }
}

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a test puts in a node's generated config beyond the common header.
pub struct NodeSetup<'a> {
    /// The body of the `[raft]` section.
    pub raft: &'a str,
    /// Further sections (`[mqtt]`, `[clearing]`, ...), appended verbatim.
    pub extra: &'a str,
    /// `RUST_LOG` for the node process.
    pub rust_log: &'a str,
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub http: reqwest::Client,
    pub tuning: Tuning,
    /// Addresses of the first voters (used by the bootstrap node's config).
    pub initial: BTreeMap<u64, String>,
    /// `http`, or `https` for nodes whose Raft/admin listener serves TLS (`http` then trusts the CA).
    pub scheme: &'static str,
}

impl Cluster {
    /// Nodes `1..=n` with their addresses chosen and none started yet, for tests that start them
    /// with their own sections (`spawn_with`); `http_timeout` bounds each request of the test client.
    pub fn unstarted(n: u64, http_timeout: Duration) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let initial: BTreeMap<u64, String> =
            (1..=n).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let http = reqwest::Client::builder().timeout(http_timeout).build().unwrap();
        Cluster { root, nodes: BTreeMap::new(), http, tuning: Tuning::default(), initial, scheme: "http" }
    }

    /// Starts nodes `1..=n`, node 1 bootstrapping, and waits for a leader.
    pub async fn start(n: u64, tuning: Tuning) -> Cluster {
        let mut c = Cluster { tuning, ..Cluster::unstarted(n, Duration::from_secs(15)) };
        let initial = c.initial.clone();
        for (id, addr) in &initial {
            c.spawn(*id, addr.clone(), *id == 1);
        }
        c.wait_leader(Duration::from_secs(20), None).await;
        c
    }

    /// The default `[raft]` body: fast elections and the snapshot thresholds of `self.tuning`.
    fn default_raft(&self) -> String {
        format!(
            "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n\
             snapshot_after_logs = {}\nlogs_kept_after_snapshot = {}\nconnect_timeout_ms = 200\n",
            self.tuning.snapshot_after_logs, self.tuning.logs_kept_after_snapshot
        )
    }

    /// Node `id`'s directory (created), where its config, secret, data and log live.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        let dir = self.root.path().join(format!("node{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_config(&self, id: u64, addr: &str, bootstrap: bool, setup: &NodeSetup) -> PathBuf {
        let dir = self.node_dir(id);
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        let members: String = self
            .initial
            .iter()
            .map(|(i, a)| format!("[[initial_members]]\nid = {i}\naddr = \"{a}\"\n"))
            .collect();
        let cfg = format!(
            r#"node_id = {id}
station = "s1"
data_dir = "{data}"
listen = "{addr}"
bootstrap = {bootstrap}
cluster_secret_file = "{secret}"

{members}
[raft]
{raft}
{extra}"#,
            data = dir.join("data").display(),
            secret = dir.join("secret").display(),
            raft = setup.raft,
            extra = setup.extra,
        );
        let path = dir.join("controller.toml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    /// Starts (or restarts) node `id` on `addr` with the default settings.
    pub fn spawn(&mut self, id: u64, addr: String, bootstrap: bool) {
        let raft = self.default_raft();
        self.spawn_with(
            id,
            addr,
            bootstrap,
            &NodeSetup { raft: &raft, extra: "", rust_log: "info,openraft=warn" },
        );
    }

    /// Starts node `id` with the `[raft]` body and extra config sections a test needs.
    pub fn spawn_with(&mut self, id: u64, addr: String, bootstrap: bool, setup: &NodeSetup) {
        let config = self.write_config(id, &addr, bootstrap, setup);
        let dir = config.parent().unwrap().to_owned();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("node.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_controller"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", setup.rust_log)
            .env_remove("AFC_CLUSTER_SECRET")
            .env_remove("AFC_CLEARING_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.insert(id, NodeProc { id, addr, dir, child: Some(child) });
    }

    pub fn restart(&mut self, id: u64, bootstrap: bool) {
        let addr = self.nodes[&id].addr.clone();
        self.nodes.get_mut(&id).unwrap().kill();
        self.spawn(id, addr, bootstrap);
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.nodes[&id].addr
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.child.is_some()).map(|n| n.id).collect()
    }

    pub async fn get<T: DeserializeOwned>(&self, id: u64, path: &str) -> Option<T> {
        let r = self
            .http
            .get(format!("{}://{}{}", self.scheme, self.addr(id), path))
            .header("x-afc-cluster-secret", SECRET)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    pub async fn post<B: serde::Serialize>(
        &self,
        id: u64,
        path: &str,
        body: &B,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}://{}{}", self.scheme, self.addr(id), path))
            .header("x-afc-cluster-secret", SECRET)
            .json(body)
            .send()
            .await
    }

    /// Commits a request through node `id` (forwarded to the leader if needed).
    pub async fn write(&self, id: u64, req: &Request) -> Result<Response, String> {
        let r = self.post(id, "/admin/write", req).await.map_err(|e| e.to_string())?;
        let status = r.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", r.text().await.unwrap_or_default()));
        }
        r.json().await.map_err(|e| e.to_string())
    }

    pub async fn metrics(&self, id: u64) -> Option<Metrics> {
        self.get(id, "/admin/metrics").await
    }

    pub async fn state(&self, id: u64) -> Option<StateSummary> {
        self.get(id, "/admin/state").await
    }

    /// The whole ledger of node `id`.
    pub async fn ledger(&self, id: u64) -> Vec<LedgerEntry> {
        let mut out: Vec<LedgerEntry> = Vec::new();
        let mut from = 0;
        loop {
            let page: Vec<LedgerEntry> =
                self.get(id, &format!("/admin/ledger?from={from}&limit=10000")).await.unwrap();
            let Some(last) = page.last() else { return out };
            from = last.index + 1;
            out.extend(page);
        }
    }

    /// Waits until a running node other than `not` is leader, as seen by every running node.
    pub async fn wait_leader(&self, timeout: Duration, not: Option<u64>) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.running() {
                if let Some(m) = self.metrics(id).await {
                    seen.push((id, m.current_leader, m.state));
                }
            }
            let leader = seen.iter().find(|(_, _, s)| *s == ServerState::Leader).map(|(id, _, _)| *id);
            if let Some(l) = leader {
                if Some(l) != not
                    && seen.len() == self.running().len()
                    && seen.iter().all(|(_, cl, _)| *cl == Some(l))
                {
                    return l;
                }
            }
            if Instant::now() >= deadline {
                // What each node said last: a start-up failure (a port taken meanwhile, a
                // bootstrap error) shows here rather than only as "no leader".
                let tails: String = self
                    .nodes
                    .values()
                    .map(|n| {
                        let log = n.log();
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                        format!("\n--- node {} ({}) ---\n{tail}", n.id, n.addr)
                    })
                    .collect();
                panic!("no leader within {timeout:?}: {seen:?}{tails}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for id in self.running() {
                let applied = self.metrics(id).await.and_then(|m| m.last_applied).map(|l| l.index);
                all &= applied.is_some_and(|a| a >= index);
            }
            if all {
                return;
            }
            if Instant::now() >= deadline {
                let mut report = String::new();
                for id in self.running() {
                    let m = self.metrics(id).await;
                    report += &format!("node {id}: {m:?}\n");
                    for l in self.nodes[&id]
                        .log()
                        .lines()
                        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                        .take(30)
                    {
                        report += &format!("  {}\n", &l[..l.len().min(400)]);
                    }
                }
                panic!("not every node applied {index} within {timeout:?}:\n{report}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn leader_applied(&self, leader: u64) -> u64 {
        self.metrics(leader).await.and_then(|m| m.last_applied).map(|l| l.index).unwrap_or(0)
    }
}
