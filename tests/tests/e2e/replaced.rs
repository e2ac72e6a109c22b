//! A replaced gate and a sequence gap (issue 11 item 4), on a real station with two gates.
//!
//! 1. g01 takes taps; then its disk is wiped (new hardware, same gate id: killed while the
//!    supervisor is held, its `store` removed) and it comes back numbering from gate_seq 1 under a
//!    new installation; its first taps must be new records, not duplicates of the old ones (before
//!    installations were part of the key the ledger acked them as re-sends and they were lost).
//! 2. With the controllers stopped (SIGSTOP) g01 takes taps it cannot upload; it is killed, one of
//!    those records is damaged in its outbox file, and it comes back: the damaged record is a
//!    sequence gap recorded through Raft (on every node, on the board, in the metrics, at
//!    clearing), and every later record is acked.
//!
//! Checked by counting on every node and at clearing: every promised record once, nothing else.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use afc_domain::model::StationCode;
use afc_domain::wire::ReaderReply;
use anyhow::Context as _;
use gate_agent::reader_sim::{ReaderConn, ReaderSim};
use rustix::process::Signal;
use serde_json::Value;
use station::plan::{Plan, NODES};
use system_tests::{eventually, Station};

/// `count` recorded taps at reader `n`; their gate_seqs. A gate just restarted may not listen
/// yet, and one without its parameters refuses before deciding (no gate_seq): both are retried.
async fn taps(st: &Station, sim: &mut ReaderSim, n: u16, count: usize) -> anyhow::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut conn = None;
    while std::time::Instant::now() < deadline {
        if conn.is_none() {
            conn = ReaderConn::connect(st.plan.reader(n)).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (presented, tap) = sim.next_tap(gate_agent::gate::now());
        match c.tap(&tap).await {
            Ok(ReaderReply::Response(r)) => {
                sim.apply(presented, &r);
                seqs.extend(r.gate_seq);
            }
            Ok(_) => {}
            Err(_) => conn = None,
        }
        if seqs.len() == count {
            return Ok(seqs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("reader {n}: only {} of {count} taps recorded", seqs.len())
}

async fn g01(st: &Station) -> anyhow::Result<Value> {
    let gates = st.gates().await?;
    gates.into_iter().find(|g| g["gate"] == "g01").context("no g01 on the board")
}

/// Waits until g01 records taps (online, parameters held).
async fn g01_ready(st: &Station, sim: &mut ReaderSim) -> anyhow::Result<Vec<u64>> {
    eventually("g01 online", Duration::from_secs(60), || async {
        Ok(g01(st).await.ok().filter(|g| g["online"] == true).map(|_| ()))
    })
    .await?;
    taps(st, sim, 1, 1).await
}

/// Flips a byte inside the payload of the outbox frame numbered `seq` (frames: `len u32 LE ‖
/// seq u64 LE ‖ payload ‖ check`).
fn damage_frame(outbox: &Path, seq: u64) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(outbox)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let mut bytes = std::fs::read(&path)?;
        let mut off = 0usize;
        while off + 12 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into()?) as usize;
            let s = u64::from_le_bytes(bytes[off + 4..off + 12].try_into()?);
            if len == 0 {
                break;
            }
            if s == seq {
                bytes[off + 12 + len / 2] ^= 0x5a;
                std::fs::write(&path, &bytes)?;
                return Ok(());
            }
            off += 12 + len + 8;
        }
    }
    anyhow::bail!("no frame {seq} in {}", outbox.display())
}

/// Kills g01 while the supervisor is held, runs `meanwhile` on its stopped data, then lets the
/// supervisor start it again.
async fn with_g01_down(
    st: &Station,
    meanwhile: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    st.signal_supervisor(Signal::STOP)?;
    let killed = signal(st, "gate-g01", Signal::KILL).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = killed.and_then(|()| meanwhile(&st.layout.data("gate-g01").join("store")));
    st.signal_supervisor(Signal::CONT)?;
    result
}

/// `st.signal`, again while the pid file is being rewritten (the supervisor rewrites it when it
/// restarts a service).
async fn signal(st: &Station, name: &str, signal: Signal) -> anyhow::Result<()> {
    eventually(&format!("{signal:?} to {name}"), Duration::from_secs(5), || async {
        Ok(st.signal(name, signal).ok().map(|_| ()))
    })
    .await
}

/// g01's rows on node `id`: (installation, gate_seq).
async fn g01_rows(st: &Station, id: u16) -> anyhow::Result<Vec<(Option<String>, u64)>> {
    let rows = st.ledger(id).await?;
    Ok(rows.into_iter().filter(|r| r.gate == "g01").map(|r| (r.installation, r.gate_seq)).collect())
}

async fn run(st: &Station) -> anyhow::Result<()> {
    let code = StationCode(st.plan.station_code);
    let origins = [101, 105].map(StationCode).to_vec();
    let mut sim = ReaderSim::new(41, code, origins, 2_000, None);
    let mut first = g01_ready(st, &mut sim).await?;
    first.extend(taps(st, &mut sim, 1, 5).await?);
    let leader = st.leader().await?;
    let old_installation =
        eventually("g01's first records in the ledger", Duration::from_secs(30), || async {
            let rows = g01_rows(st, leader).await?;
            Ok((rows.len() == first.len()).then(|| rows[0].0.clone()))
        })
        .await?
        .context("records carry the installation")?;

    // 1. The disk is wiped: a new installation numbering from 1.
    with_g01_down(st, |store| Ok(std::fs::remove_dir_all(store)?)).await?;
    let mut second = g01_ready(st, &mut sim).await?;
    second.extend(taps(st, &mut sim, 1, 4).await?);
    anyhow::ensure!(second[0] == 1, "the replaced gate numbers from 1 again: {second:?}");
    let new_installation =
        eventually("the replaced gate's records in the ledger", Duration::from_secs(30), || async {
            let rows = g01_rows(st, leader).await?;
            Ok((rows.len() == first.len() + second.len()).then(|| rows.last().and_then(|r| r.0.clone())))
        })
        .await
        .context("a replaced gate's first records must be new records, not duplicates")?
        .context("installation")?;
    anyhow::ensure!(new_installation != old_installation, "the wiped gate kept its installation");

    // 2. A record lost in the outbox while nothing could be uploaded: a sequence gap.
    for id in 1..=NODES {
        signal(st, &format!("controller-{id}"), Signal::STOP).await?;
    }
    let offline = taps(st, &mut sim, 1, 4).await;
    let damaged = offline.as_ref().ok().map(|o| o[1]);
    let down = match damaged {
        Some(seq) => with_g01_down(st, |store| damage_frame(&store.join("outbox"), seq)).await,
        None => Ok(()),
    };
    for id in 1..=NODES {
        signal(st, &format!("controller-{id}"), Signal::CONT).await?;
    }
    let (offline, damaged) = (offline?, damaged.context("no damaged seq")?);
    down?;
    let mut after = g01_ready(st, &mut sim).await?;
    after.extend(taps(st, &mut sim, 1, 2).await?);
    let last = *after.last().context("taps")?;
    let gap = eventually("the gap recorded and g01 acked past it", Duration::from_secs(60), || async {
        let g = g01(st).await?;
        let through = g["ledger_through_seq"].as_u64().unwrap_or(0);
        let gaps = st.get(leader, "/api/v1/ledger/gaps", &st.token("viewer")).await?;
        Ok((through == last && g["sequence_gaps"] == 1).then_some(gaps))
    })
    .await?;
    anyhow::ensure!(
        gap[0]["from_seq"] == damaged
            && gap[0]["to_seq"] == damaged
            && gap[0]["installation"] == new_installation.as_str(),
        "gap {gap} is not exactly the damaged record {damaged}"
    );

    // Every node holds every promised record once, the damaged one as a gap, nothing else.
    let mut want: BTreeSet<(Option<String>, u64)> =
        first.iter().map(|s| (Some(old_installation.clone()), *s)).collect();
    let newer = second.iter().chain(&offline).chain(&after).filter(|s| **s != damaged);
    want.extend(newer.map(|s| (Some(new_installation.clone()), *s)));
    let mut tails = Vec::new();
    for id in 1..=NODES {
        let rows = eventually(&format!("node {id} has g01's records"), Duration::from_secs(30), || async {
            let rows = g01_rows(st, id).await?;
            Ok((rows.len() >= want.len()).then_some(rows))
        })
        .await?;
        let got: BTreeSet<_> = rows.iter().cloned().collect();
        anyhow::ensure!(got.len() == rows.len(), "node {id}: a record twice");
        anyhow::ensure!(got == want, "node {id}: g01's records {got:?}, promised {want:?}");
        let stats = st.get(id, "/api/v1/ledger/stats", &st.token("viewer")).await?;
        anyhow::ensure!(stats["sequence_gaps"] == 1 && stats["key_conflicts"] == 0, "node {id}: {stats}");
        tails.push(stats["last_hash"].clone());
    }
    anyhow::ensure!(tails.windows(2).all(|w| w[0] == w[1]), "the nodes' ledgers differ: {tails:?}");
    // Clearing: the same records once, and the gap.
    let stats = eventually("clearing holds the ledger and the gap", Duration::from_secs(60), || async {
        let c = st.clearing("stats").await?;
        Ok((Some(c["last_hash"].clone()) == tails.first().cloned() && c["sequence_gaps"] == 1).then_some(c))
    })
    .await?;
    anyhow::ensure!(stats["duplicate_keys"] == 0, "clearing counted a key twice: {stats}");
    let at_clearing = st.clearing("gaps").await?;
    anyhow::ensure!(at_clearing[0]["from_seq"] == damaged, "clearing's gaps: {at_clearing}");
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", st.plan.api(leader)))
        .bearer_auth(st.token("viewer"))
        .send()
        .await?
        .text()
        .await?;
    anyhow::ensure!(
        metrics.contains("afc_ledger_sequence_gaps_total{gate=\"g01\"} 1"),
        "no gap in the metrics"
    );
    eprintln!(
        "[replaced] {} + {} records before and after the wipe, {} offline, gap at {damaged} recorded on every node and at clearing",
        first.len(),
        second.len(),
        offline.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_gate_numbers_anew_and_a_lost_record_is_a_recorded_gap_not_a_stall() {
    let _one = super::ONE_STATION_AT_A_TIME.lock().await;
    let plan = Plan { gates: 2, port_offset: 14_000, ..Plan::default() };
    let prepared = Station::prepare(&plan).expect("prepare");
    let mut st = Station::start_planned(prepared, plan).await.expect("station starts");
    if let Err(e) = run(&st).await {
        panic!("{e:#}\n\n{}", st.log_tails(40));
    }
    let _ = st.stop(Duration::from_secs(90));
}
