//! Station figures of SPEC §11 on a whole local station (release build):
//!
//! - a 1,000,000-entry blacklist to 40 gate agents, all applied (target ≤ 10 s);
//! - a 1,000-entry blacklist delta to the same 40 gates (target ≤ 1 s);
//! - leader failover to resumed ingestion under traffic (target ≤ 3 s);
//! - controller idle RSS (target ≤ 100 MB).
//!
//! `cargo build --release -p station && cargo run --release -p system-tests --example station_bench`
//! (arguments: gates, default 40). Results go to stdout; docs/benchmarks.md records them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use afc_domain::model::StationCode;
use gate_agent::reader_sim::{QrIssuer, ReaderConn, ReaderSim, CARD_BASE};
use rustix::process::Signal;
use serde_json::{json, Value};
use station::plan::NODES;
use system_tests::{eventually, Station};

async fn blacklist_version(st: &Station) -> anyhow::Result<u64> {
    let list = st.get(1, "/api/v1/parameters", &st.token("viewer")).await?;
    Ok(list
        .as_array()
        .map(|l| l.iter().find(|k| k["kind"] == "blacklist").and_then(|k| k["current"].as_u64()).unwrap_or(0))
        .unwrap_or(0))
}

/// Waits until every gate reports `version` of the blacklist active; the time it took.
async fn all_gates_on(st: &Station, version: u64, t0: Instant, within: Duration) -> Duration {
    all_gates_on_count(st, version, usize::from(st.plan.gates), t0, within).await
}

/// When at least `count` gates report blacklist `version`, measured from `t0`.
async fn all_gates_on_count(
    st: &Station,
    version: u64,
    count: usize,
    t0: Instant,
    within: Duration,
) -> Duration {
    eventually("blacklist on the gates", within, || async {
        let gates = st.gates().await?;
        let on =
            gates.iter().filter(|g| g["reported_versions"]["blacklist"].as_u64() == Some(version)).count();
        Ok((on >= count).then(|| t0.elapsed()))
    })
    .await
    .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let gates: u16 = std::env::args().nth(1).map(|a| a.parse().expect("gates")).unwrap_or(40);
    let t = Instant::now();
    let st = Station::start(gates, 13_000, None).await.expect("station starts");
    eventually("first parameters on every gate", Duration::from_secs(120), || async {
        let v = blacklist_version(&st).await?;
        let gs = st.gates().await?;
        let ok = v > 0
            && gs.len() == usize::from(gates)
            && gs.iter().all(|g| g["reported_versions"]["blacklist"].as_u64() == Some(v));
        Ok(ok.then_some(()))
    })
    .await
    .expect("station up");
    println!("station with {gates} gates up, first parameters on every gate: {:?}", t.elapsed());

    // Idle RSS of the controllers.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pids = st.pids();
    for id in 1..=NODES {
        let pid = pids[&format!("controller-{id}")];
        println!("controller-{id} idle RSS: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
    }

    // 1,000,000-entry blacklist (no two ids adjacent, so no ranges merge).
    let from = blacklist_version(&st).await.unwrap();
    let entries: Vec<Value> =
        (0..1_000_000u64).map(|i| json!({"media": "svc", "id": CARD_BASE + 7 * i + 3})).collect();
    let body = json!({"full": entries, "reason": "bench: 1,000,000 cards"});
    let t0 = Instant::now();
    let (status, answer) =
        st.post(1, "/api/v1/parameters/blacklist", &st.token("engineer"), &body).await.unwrap();
    let upload = t0.elapsed();
    assert_eq!(status, 202, "a mass insertion waits for a second engineer: {answer}");
    let id = answer["pending_id"].as_u64().unwrap();
    let t1 = Instant::now();
    let (status, answer) = st
        .post(
            1,
            &format!("/api/v1/parameters/blacklist/pending/{id}/confirm"),
            &st.token("engineer2"),
            &json!({"reason": "bench: confirmed"}),
        )
        .await
        .unwrap();
    let stored = t1.elapsed();
    assert!((200..300).contains(&status), "confirm: {status} {answer}");
    println!("1,000,000-entry blacklist: upload (JSON, 40 MB) {upload:?}; confirm → signed, replicated, published {stored:?} ({answer})");
    let fanout = all_gates_on(&st, from + 1, t1, Duration::from_secs(120)).await;
    println!("1,000,000-entry blacklist applied on all {gates} gates {fanout:?} after the confirmation");

    // 1,000-entry delta.
    let add: Vec<Value> =
        (0..1000u64).map(|i| json!({"media": "svc", "id": CARD_BASE + 7 * i + 5})).collect();
    let body = json!({"delta": {"from_version": from + 1, "add": add}, "reason": "bench: 1,000 cards"});
    let t2 = Instant::now();
    let (status, answer) =
        st.post(1, "/api/v1/parameters/blacklist", &st.token("engineer"), &body).await.unwrap();
    let answered = t2.elapsed();
    assert!((200..300).contains(&status), "delta: {status} {answer}");
    let first = all_gates_on_count(&st, from + 2, 1, t2, Duration::from_secs(60)).await;
    let delta = all_gates_on(&st, from + 2, t2, Duration::from_secs(60)).await;
    println!(
        "1,000-entry blacklist delta applied on all {gates} gates {delta:?} after the upload request \
         (upload answered: signed, guarded, replicated, rollout requested {answered:?}; first gate {first:?})"
    );

    // Failover under traffic: taps at 4 gates; kill the leader; time to the next ledger commit.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in 1..=4u16.min(gates) {
        let addr = st.plan.reader(n);
        let stop = stop.clone();
        let qr = QrIssuer { issuer: 1, key_id: 1, key: st.secrets.qr_issuer_key.clone() };
        let mut sim = ReaderSim::new(
            u64::from(n),
            StationCode(st.plan.station_code),
            vec![StationCode(101)],
            1000,
            Some(qr),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = ReaderConn::connect(addr).await.unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (p, tap) = sim.next_tap(gate_agent::gate::now());
                if let Ok(afc_domain::wire::ReaderReply::Response(r)) = conn.tap(&tap).await {
                    sim.apply(p, &r);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = st.leader().await.unwrap();
    let viewer = st.token("viewer");
    let others: Vec<u16> = (1..=NODES).filter(|id| *id != leader).collect();
    let last_index = |stats: &Value| stats["last_index"].as_u64().unwrap_or(0);
    let before = last_index(&st.get(others[0], "/api/v1/ledger/stats", &viewer).await.unwrap());
    let kill = Instant::now();
    st.signal(&format!("controller-{leader}"), Signal::KILL).unwrap();
    let resumed = eventually("ingestion resumed", Duration::from_secs(60), || async {
        let mut best = 0;
        for id in &others {
            if let Ok(s) = st.get(*id, "/api/v1/ledger/stats", &viewer).await {
                best = best.max(last_index(&s));
            }
        }
        Ok((best > before + 4).then(|| kill.elapsed()))
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let new_leader = st.leader().await.unwrap();
    println!(
        "leader failover: controller-{leader} SIGKILLed under traffic; ingestion resumed (new commits on the \
         survivors) {resumed:?} later; leader now controller-{new_leader}"
    );
    let mut figures = BTreeMap::new();
    figures.insert("blacklist_1m_fanout_s", fanout.as_secs_f64());
    figures.insert("blacklist_1k_delta_s", delta.as_secs_f64());
    figures.insert("failover_resume_s", resumed.as_secs_f64());
    println!("{}", serde_json::to_string(&figures).unwrap());
}
