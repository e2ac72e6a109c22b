//! Ledger benchmark: three nodes in one process on loopback, durable (flushed) sled storage.
//!
//! `cargo run --release -p controller --example ledger_bench -- [seconds] [gates] [batch]`
//!
//! 1. Sustained throughput: `gates` writers, each sending signed batches of `batch` records to the
//!    leader as fast as they are acknowledged, for `seconds`.
//! 2. Commit latency at 100 tx/s: one record every 10 ms, each timed from request to acknowledged
//!    (committed on a quorum and applied), p50/p99.

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
    })
}

fn batch(gate: &Ident, key: &SigningKey, seqs: std::ops::Range<u64>) -> anyhow::Result<Request> {
    let records = seqs.map(|s| record(gate, s)).collect::<anyhow::Result<Vec<_>>>()?;
    let sig = sign_batch(&ident("s1")?, gate, &records, key);
    Ok(Request::AppendTxBatch {
        station: ident("s1")?,
        gate: gate.clone(),
        records,
        signature: hex::encode(sig),
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
    Ok(())
}

async fn tracing_like_wait(e: &anyhow::Error) {
    let _ = e;
    tokio::time::sleep(Duration::from_millis(50)).await;
}
