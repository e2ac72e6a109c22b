//! Ledger benchmark: three nodes in one process on loopback, durable (flushed) sled storage.
//!
//! `cargo run --release -p controller --example ledger_bench -- [seconds] [gates] [batch]`
//!
//! 1. Sustained throughput: `gates` writers, each sending signed batches of `batch` records to the
//!    leader as fast as they are acknowledged, for `seconds`.
//! 2. Commit latency at 100 tx/s: one record every 10 ms, each timed from request to acknowledged
//!    (committed on a quorum and applied), p50/p99.
//! 3. The peer baseline, after our nodes have stopped: a 3-member etcd (`/usr/bin/etcd`, Debian
//!    `etcd-server`) on loopback ports picked now, default fsync durability, written through its
//!    JSON gRPC gateway with as many 256-byte values as our run appended: first as single puts
//!    (`/v3/kv/put`, 64 writers), then as transactions of 128 puts (`/v3/kv/txn`, 16 writers).
//!    Prints both rates and our ratio to each. Without etcd, says so and reports ours alone.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use afc_domain::ledger::{sign_batch, ParamVersions, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Ident, Media, Reason, Timestamp};
use anyhow::{bail, Context};
use controller::config::{Config, LedgerConfig, Member, RaftTuning};
use controller::state::{Request, Response};
use ed25519_dalek::SigningKey;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "bench-cluster-secret-0123456789";

fn ident(s: &str) -> anyhow::Result<Ident> {
    Ident::new(s).context("identifier")
}

fn record(gate: &Ident, seq: u64) -> anyhow::Result<TxRecord> {
    Ok(TxRecord {
        station: ident("s1")?,
        gate: gate.clone(),
        gate_seq: seq,
        media: Media::Svc,
        id: 31_000_000 + seq,
        direction: Direction::Exit,
        accepted: true,
        reason: Reason::ALL[0],
        fare_fen: 320,
        shortfall_fen: 0,
        balance_before: Some(5000),
        balance_after: Some(4680),
        card_tx_counter: Some(seq as u32),
        entry_station: None,
        entry_time: None,
        occurred_at: Timestamp::from_secs(1_800_000_000 + seq as i64),
        modes: ModeBits::NORMAL,
        params: ParamVersions::default(),
        replay_unchecked: false,
        qr: None,
        installation: None,
        voids: None,
        bank: None,
        tac: None,
    })
}

fn batch(gate: &Ident, key: &SigningKey, seqs: std::ops::Range<u64>) -> anyhow::Result<Request> {
    let records = seqs.map(|s| record(gate, s)).collect::<anyhow::Result<Vec<_>>>()?;
    let sig = sign_batch(&ident("s1")?, gate, &records, key);
    Ok(Request::AppendTxBatch {
        station: ident("s1")?,
        gate: gate.clone(),
        records: records.into_iter().map(afc_domain::ledger::CanonicalRecord::from).collect(),
        signature: hex::encode(sig),
        covers_from: None,
    })
}

async fn write(http: &reqwest::Client, addr: &str, req: &Request) -> anyhow::Result<Response> {
    let r = http
        .post(format!("http://{addr}/admin/write"))
        .header("x-afc-cluster-secret", SECRET)
        .json(req)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(r.json().await?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let seconds = args.first().copied().unwrap_or(10);
    let gates = args.get(1).copied().unwrap_or(8);
    let batch_size = args.get(2).copied().unwrap_or(100);
    let root = tempfile::tempdir()?;
    let listeners: Vec<TcpListener> =
        (0..3).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let addrs: Vec<String> =
        listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
    let members: Vec<Member> =
        addrs.iter().enumerate().map(|(i, a)| Member { id: i as u64 + 1, addr: a.clone() }).collect();
    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let cfg = Config {
            node_id: i as u64 + 1,
            station: ident("s1")?,
            data_dir: root.path().join(format!("node{}", i + 1)),
            listen: listener.local_addr()?,
            advertise: None,
            bootstrap: i == 0,
            initial_members: members.clone(),
            cluster_secret_file: None,
            raft: RaftTuning::default(),
            ledger: LedgerConfig::default(),
            mqtt: None,
            api: Default::default(),
            clearing: Default::default(),
            tls: None,
            rollout: Default::default(),
            cluster_secret: SECRET.into(),
        };
        nodes.push(tokio::spawn(controller::service::run(cfg, listener, shutdown.clone())));
    }
    let http =
        reqwest::Client::builder().timeout(Duration::from_secs(20)).pool_max_idle_per_host(64).build()?;
    // Wait for the cluster to accept writes (any node forwards to the leader).
    let deadline = Instant::now() + Duration::from_secs(30);
    let keys: Vec<(Ident, SigningKey)> = (0..gates)
        .map(|g| Ok((ident(&format!("g{g:02}"))?, SigningKey::from_bytes(&[g as u8 + 1; 32]))))
        .collect::<anyhow::Result<_>>()?;
    for (gate, key) in &keys {
        let req = Request::RegisterGate {
            gate: gate.clone(),
            tx_public_key: hex::encode(key.verifying_key().to_bytes()),
            hardware_profile: "default".into(),
        };
        loop {
            match write(&http, &addrs[0], &req).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing_like_wait(&e).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    let leader_addr = {
        let m: serde_json::Value = http
            .get(format!("http://{}/admin/metrics", addrs[0]))
            .header("x-afc-cluster-secret", SECRET)
            .send()
            .await?
            .json()
            .await?;
        let leader = m["current_leader"].as_u64().context("no leader")?;
        addrs[leader as usize - 1].clone()
    };

    // 1. Sustained throughput.
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (gate, key) in keys.clone() {
        let (http, addr) = (http.clone(), leader_addr.clone());
        tasks.push(tokio::spawn(async move {
            let (mut next, mut appended, mut lat) = (1u64, 0u64, Vec::new());
            while Instant::now() < stop_at {
                let req = batch(&gate, &key, next..next + batch_size)?;
                let t = Instant::now();
                if let Response::Appended { appended: n, .. } = write(&http, &addr, &req).await? {
                    appended += u64::from(n);
                }
                lat.push(t.elapsed());
                next += batch_size;
            }
            anyhow::Ok((appended, lat, next))
        }));
    }
    let started = Instant::now();
    let (mut total, mut lat, mut next_seq) = (0u64, Vec::new(), Vec::new());
    for t in tasks {
        let (n, l, next) = t.await??;
        total += n;
        lat.extend(l);
        next_seq.push(next);
    }
    let elapsed = started.elapsed();
    lat.sort();
    println!(
        "throughput: {total} records in {:.1} s = {:.0} tx/s ({gates} gates x batches of {batch_size}; batch latency p50 {:?} p99 {:?})",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );

    // 2. Commit latency at 100 tx/s, one record per request.
    let (gate, key) = keys[0].clone();
    let mut lat = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let n = (seconds * 100).max(500);
    for seq in next_seq[0]..next_seq[0] + n {
        tick.tick().await;
        let req = batch(&gate, &key, seq..seq + 1)?;
        let t = Instant::now();
        write(&http, &leader_addr, &req).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "commit latency at 100 tx/s: n={n} p50 {:?} p99 {:?} max {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );

    shutdown.cancel();
    for n in nodes {
        n.await??;
    }
    let ours = total as f64 / elapsed.as_secs_f64();

    // 3. The peer baseline: a 3-member etcd on loopback, the same number of records.
    let etcd = match etcd::Cluster::start(root.path()).await {
        Ok(Some(c)) => Some(c),
        Ok(None) => {
            println!("etcd baseline: {} not found (Debian package etcd-server); not measured", etcd::BIN);
            None
        }
        Err(e) => {
            println!("etcd baseline: could not start a cluster: {e:#}");
            None
        }
    };
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!();
    println!("summary ({total} records, {gates} gates x {batch_size})");
    println!("  ours:                 {ours:.0} tx/s; commit latency at 100 tx/s p50 {p50:?} p99 {p99:?}");
    if let Some(etcd) = etcd {
        let single = etcd.put_rate(total, 64).await?;
        println!(
            "  etcd single puts:     {single:.0} records/s ({total} puts, 64 concurrent, 256-byte values)"
        );
        let batched = etcd.txn_rate(total, 128, 16).await?;
        println!("  etcd batched (128/txn): {batched:.0} records/s (16 concurrent)");
        println!("  ratio ours/etcd single:  {:.2}", ours / single);
        println!("  ratio ours/etcd batched: {:.2}", ours / batched);
        let floor = 5000.0;
        println!(
            "  target (>= etcd batched and >= {floor:.0} tx/s): {}",
            if ours >= batched && ours >= floor { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// A throwaway 3-member etcd cluster on loopback (`/usr/bin/etcd`), driven through its JSON gRPC
/// gateway. The members are killed when it is dropped.
mod etcd {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde_json::json;

    pub const BIN: &str = "/usr/bin/etcd";
    const VALUE_BYTES: usize = 256;

    pub struct Cluster {
        children: Vec<Child>,
        /// Client URL of the leader (writes sent elsewhere would only be forwarded to it).
        leader: String,
        http: reqwest::Client,
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn free_port() -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    }

    impl Cluster {
        /// Starts the cluster under `root`; `None` if etcd is not installed.
        pub async fn start(root: &Path) -> anyhow::Result<Option<Cluster>> {
            if !Path::new(BIN).exists() {
                return Ok(None);
            }
            let ports: Vec<(u16, u16)> =
                (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
            let initial: Vec<String> =
                ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
            let mut cluster = Cluster {
                children: Vec::new(),
                leader: String::new(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .pool_max_idle_per_host(128)
                    .build()?,
            };
            for (i, (client, peer)) in ports.iter().enumerate() {
                let dir = root.join(format!("etcd-m{i}"));
                let child = Command::new(BIN)
                    .args(["--name", &format!("m{i}")])
                    .arg("--data-dir")
                    .arg(&dir)
                    .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                    .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                    .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new", "--initial-cluster-token", "afc-bench"])
                    .args(["--logger", "zap", "--log-level", "error"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("spawning etcd")?;
                cluster.children.push(child);
            }
            let urls: Vec<String> = ports.iter().map(|(c, _)| format!("http://127.0.0.1:{c}")).collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match cluster.find_leader(&urls).await {
                    Ok(Some(l)) => {
                        cluster.leader = l;
                        break;
                    }
                    _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Ok(None) => bail!("etcd elected no leader within 30 s"),
                    Err(e) => return Err(e.context("etcd did not come up within 30 s")),
                }
            }
            Ok(Some(cluster))
        }

        async fn find_leader(&self, urls: &[String]) -> anyhow::Result<Option<String>> {
            for u in urls {
                let s: serde_json::Value = self
                    .http
                    .post(format!("{u}/v3/maintenance/status"))
                    .json(&json!({}))
                    .send()
                    .await?
                    .json()
                    .await?;
                let (me, leader) = (&s["header"]["member_id"], &s["leader"]);
                if !me.is_null() && me == leader {
                    return Ok(Some(u.clone()));
                }
            }
            Ok(None)
        }

        /// Writes `records` single puts with `concurrency` writers; records/s.
        pub async fn put_rate(&self, records: u64, concurrency: u64) -> anyhow::Result<f64> {
            self.run(records, 1, concurrency, "put").await
        }

        /// Writes `records` in transactions of `per_txn` puts with `concurrency` writers; records/s.
        pub async fn txn_rate(&self, records: u64, per_txn: u64, concurrency: u64) -> anyhow::Result<f64> {
            self.run(records, per_txn, concurrency, "txn").await
        }

        async fn run(&self, records: u64, per_req: u64, concurrency: u64, run: &str) -> anyhow::Result<f64> {
            let value = STANDARD.encode(vec![b'x'; VALUE_BYTES]);
            let next = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (this, next, value, run) =
                    (self.clone_handle(), next.clone(), value.clone(), run.to_owned());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let first = next.fetch_add(per_req, Ordering::Relaxed);
                        if first >= records {
                            return anyhow::Ok(());
                        }
                        let last = (first + per_req).min(records);
                        let key = |i: u64| STANDARD.encode(format!("{run}/{i:012}"));
                        if per_req == 1 {
                            this.post("/v3/kv/put", &json!({"key": key(first), "value": value})).await?;
                        } else {
                            let puts: Vec<_> = (first..last)
                                .map(|i| json!({"requestPut": {"key": key(i), "value": value}}))
                                .collect();
                            this.post("/v3/kv/txn", &json!({"success": puts})).await?;
                        }
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok(records as f64 / started.elapsed().as_secs_f64())
        }

        /// A handle for a writer task (shares the HTTP pool; owns no processes).
        fn clone_handle(&self) -> Arc<Handle> {
            Arc::new(Handle { leader: self.leader.clone(), http: self.http.clone() })
        }
    }

    pub struct Handle {
        leader: String,
        http: reqwest::Client,
    }

    impl Handle {
        async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
            let r = self.http.post(format!("{}{path}", self.leader)).json(body).send().await?;
            if !r.status().is_success() {
                bail!("etcd {path}: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default());
            }
            let v: serde_json::Value = r.json().await?;
            if v.get("error").is_some() {
                bail!("etcd {path}: {v}");
            }
            Ok(())
        }
    }
}

async fn tracing_like_wait(e: &anyhow::Error) {
    let _ = e;
    tokio::time::sleep(Duration::from_millis(50)).await;
}
