//! Station-wide power cuts, on real processes: the three controllers of a local station keep their
//! data directories on power-cut filesystems (`powercut`: everything no `fsync`/`fdatasync`
//! covered is forgotten at a cut), 8 gates tap continuously, and at seeded random moments all
//! three controllers lose power at once (the filesystems freeze and revert, the processes are
//! SIGKILLed); the station's supervisor then restarts them on the reverted state. Gates and
//! clearing stay on ordinary disk.
//!
//! After every cut, every transaction a gate had promised a passenger before the cut must reach
//! the ledger again (a record the ledger acknowledged and then lost is deleted from its gate and
//! never comes back, so such a loss shows as a promise that never arrives). At the end: every
//! promise is in the ledger exactly once on every node, the three ledgers are equal entry by entry,
//! clearing holds the same chain, and no term ever had two leaders.
//!
//! The same scenario with the controllers' durable syncs switched off (`afc_sled::SKIP_FSYNC_ENV`,
//! sled's own flushing alone, as the code was before) must find lost acknowledged records: the
//! proof that this test sees what it is for.
//!
//! Seed: `POWERCUT_SEED` (printed either way); number of cuts: `POWERCUT_CUTS` (default 20).
//! Without FUSE the tests print SKIPPED, and fail under `CI=true` (`.ci/run` installs fuse3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afc_domain::model::StationCode;
use afc_domain::wire::ReaderReply;
use anyhow::Context as _;
use gate_agent::reader_sim::{QrIssuer, ReaderConn, ReaderSim};
use powercut::{CutMode, PowerCutFs};
use rand::{Rng, SeedableRng};
use rustix::process::Signal;
use serde_json::Value;
use station::plan::{Layout, Plan, NODES};
use system_tests::{eventually, Station};

/// One station at a time on the two cores.
static ONE_STATION_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pause between two taps at one gate (8 gates: about 60 transactions a second).
const TAP_GAP: Duration = Duration::from_millis(120);

use powercut::service::{available_or_skip as available, seed_from_env as seed};

/// What a run found wrong.
#[derive(Debug)]
enum Finding {
    /// Promised transactions that never reached the ledger again after a cut.
    Lost { cut: usize, missing: usize, example: (String, u64) },
    /// The nodes' ledgers, or the ledger and clearing, disagree.
    Diverged(String),
    /// Two nodes led in one term.
    TwoLeaders { term: u64, leaders: BTreeSet<u64> },
    /// The station did not come back (a node that does not start, no leader, no progress).
    NoRecovery(String),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Lost { cut, missing, example } => write!(
                f,
                "cut {cut} lost {missing} acknowledged transactions for good (one: gate {} gate_seq {})",
                example.0, example.1
            ),
            Finding::Diverged(what) => write!(f, "diverged: {what}"),
            Finding::TwoLeaders { term, leaders } => write!(f, "term {term} had two leaders: {leaders:?}"),
            Finding::NoRecovery(what) => write!(f, "no recovery: {what}"),
        }
    }
}

/// Every `(gate, gate_seq)` a gate answered the reader with.
type Promises = Arc<Mutex<BTreeSet<(String, u64)>>>;

/// Passengers at every gate until `stop`.
fn traffic(
    st: &Station,
    promises: &Promises,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (n, gate) in st.plan.gate_numbers() {
        let addr = st.plan.reader(n);
        let code = StationCode(st.plan.station_code);
        let origins = [101, 105, 116, 220, 224].map(StationCode).to_vec();
        let issuer = QrIssuer { issuer: 1, key_id: 1, key: st.secrets.qr_issuer_key.clone() };
        let mut sim = ReaderSim::new(u64::from(n), code, origins, 2_000, Some(issuer));
        let (promises, stop) = (promises.clone(), stop.clone());
        tasks.spawn(async move {
            let mut conn = None;
            while !stop.is_cancelled() {
                if conn.is_none() {
                    conn = ReaderConn::connect(addr).await.ok();
                }
                if let Some(c) = conn.as_mut() {
                    let (presented, tap) = sim.next_tap(gate_agent::gate::now());
                    match c.tap(&tap).await {
                        Ok(ReaderReply::Response(r)) => {
                            if let Some(seq) = r.gate_seq {
                                promises.lock().unwrap().insert((gate.clone(), seq));
                            }
                            sim.apply(presented, &r);
                        }
                        Ok(ReaderReply::Error(_)) => {}
                        Err(_) => conn = None,
                    }
                }
                tokio::time::sleep(TAP_GAP).await;
            }
        });
    }
    tasks
}

/// Polls every node's view of the cluster: which node said it led in which term.
fn watch_leaders(
    st: &Station,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<BTreeMap<u64, BTreeSet<u64>>> {
    let urls: Vec<String> =
        (1..=NODES).map(|id| format!("http://{}/api/v1/cluster", st.plan.api(id))).collect();
    let token = st.token("viewer");
    let stop = stop.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
        let mut seen: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        while !stop.is_cancelled() {
            for url in &urls {
                let Ok(r) = http.get(url).bearer_auth(&token).send().await else { continue };
                let Ok(c) = r.json::<Value>().await else { continue };
                if c.get("role").and_then(Value::as_str) == Some("leader") {
                    let (Some(term), Some(id)) = (c["term"].as_u64(), c["node_id"].as_u64()) else {
                        continue;
                    };
                    seen.entry(term).or_default().insert(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    })
}

/// Every gate online and running a fare table, a blacklist and QR keys.
async fn parameters_on_every_gate(st: &Station) -> anyhow::Result<()> {
    eventually("parameters active on every gate", Duration::from_secs(180), || async {
        let gates = st.gates().await?;
        let ready = gates.len() == usize::from(st.plan.gates)
            && gates.iter().all(|g| {
                g["online"] == true
                    && ["fare_table", "blacklist", "qr_keys"].iter().all(|k| {
                        g.pointer(&format!("/reported_versions/{k}")).and_then(Value::as_u64) > Some(0)
                    })
            });
        Ok(ready.then_some(()))
    })
    .await
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (its parent, the supervisor, is stopped) holds no files any more.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// All three controllers lose power at once.
async fn cut_power(st: &Station, mounts: &mut [PowerCutFs]) -> anyhow::Result<u64> {
    // The supervisor must not restart a controller onto a frozen disk.
    st.signal_supervisor(Signal::STOP)?;
    let pids = st.pids();
    let mut lost = 0;
    for m in mounts.iter() {
        lost += m.cut()?.bytes_lost;
    }
    let mut killed = Vec::new();
    for id in 1..=NODES {
        if let Some(pid) = pids.get(&format!("controller-{id}")) {
            let p = rustix::process::Pid::from_raw(*pid as i32).context("pid")?;
            let _ = rustix::process::kill_process(p, Signal::KILL);
            killed.push(*pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while killed.iter().any(|p| pid_alive(*p)) {
        anyhow::ensure!(Instant::now() < deadline, "controllers still alive 10 s after SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for m in mounts.iter_mut() {
        m.restore()?;
    }
    st.signal_supervisor(Signal::CONT)?;
    Ok(lost)
}

/// Waits until every node answers and a leader is elected; that leader.
async fn recovered_leader(st: &Station, within: Duration) -> anyhow::Result<u16> {
    eventually("every node up and a leader", within, || async {
        let viewer = st.token("viewer");
        for id in 1..=NODES {
            st.get(id, "/api/v1/cluster", &viewer).await?;
        }
        Ok(Some(st.leader().await?))
    })
    .await
}

async fn run(
    st: &Station,
    mounts: &mut [PowerCutFs],
    seed: u64,
    cuts: usize,
    settle: Duration,
) -> Result<(), Finding> {
    let no_recovery = |e: anyhow::Error| Finding::NoRecovery(format!("{e:#}"));
    parameters_on_every_gate(st).await.map_err(no_recovery)?;
    let promises = Promises::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tapping = traffic(st, &promises, &stop);
    let leaders = watch_leaders(st, &stop);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut result = Ok(());
    let mut known: Vec<system_tests::LedgerRow> = Vec::new();
    for cut in 1..=cuts {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..2_500))).await;
        // What the ledger held (committed and applied) shortly before the cut: it must still be
        // the start of every node's ledger afterwards, entry by entry, hash included. Read
        // incrementally: `known` was checked after the previous cut.
        if let Ok(l) = st.leader().await {
            if let Ok(tail) = st.ledger_from(l, known.len() as u64 + 1).await {
                if tail.first().is_none_or(|r| r.index == known.len() as u64 + 1) {
                    known.extend(tail);
                }
            }
        }
        let committed = known.clone();
        let before: BTreeSet<(String, u64)> = promises.lock().unwrap().clone();
        let t = Instant::now();
        let lost = match cut_power(st, mounts).await {
            Ok(l) => l,
            Err(e) => {
                result = Err(Finding::NoRecovery(format!("cut {cut}: {e:#}")));
                break;
            }
        };
        if let Err(f) = prefix_everywhere(st, cut, &committed, settle).await {
            result = Err(f);
            break;
        }
        // Every promise made before the cut comes back: unacknowledged ones are re-sent by their
        // gate; an acknowledged one the ledger lost never would.
        let in_committed: BTreeSet<(String, u64)> =
            committed.iter().map(|r| (r.gate.clone(), r.gate_seq)).collect();
        let missing = Mutex::new(Vec::new());
        let back = eventually(&format!("cut {cut}: every earlier promise in the ledger"), settle, || async {
            let leader = recovered_leader(st, settle).await?;
            let tail = st.ledger_from(leader, committed.len() as u64 + 1).await?;
            let mut have = in_committed.clone();
            have.extend(tail.into_iter().map(|r| (r.gate, r.gate_seq)));
            let gone: Vec<_> = before.difference(&have).cloned().collect();
            let done = gone.is_empty();
            *missing.lock().unwrap() = gone;
            Ok(done.then_some(()))
        })
        .await;
        if let Err(e) = back {
            let missing = missing.into_inner().unwrap();
            result = Err(match missing.first() {
                None => Finding::NoRecovery(format!("cut {cut}: {e:#}")),
                Some(example) => Finding::Lost { cut, missing: missing.len(), example: example.clone() },
            });
            break;
        }
        eprintln!(
            "[powercut] cut {cut}/{cuts}: {lost} unsynced bytes forgotten, {} promises before it all in the ledger {:?} later",
            before.len(),
            t.elapsed()
        );
    }
    stop.cancel();
    while tapping.join_next().await.is_some() {}
    let seen = leaders.await.unwrap_or_default();
    result?;
    if let Some((term, ids)) = seen.iter().find(|(_, ids)| ids.len() > 1) {
        return Err(Finding::TwoLeaders { term: *term, leaders: ids.clone() });
    }
    let promised = promises.lock().unwrap().clone();
    every_promise_once_everywhere(st, &promised, settle).await
}

/// Every node's ledger starts with `committed` (what was committed before the cut: the ledger is
/// a hash chain, so the same hash at its last index means the same prefix), and what each holds
/// after it is, entry by entry, a prefix of the longest: no committed entry disappeared, no node
/// forked.
async fn prefix_everywhere(
    st: &Station,
    cut: usize,
    committed: &[system_tests::LedgerRow],
    settle: Duration,
) -> Result<(), Finding> {
    let n = committed.len() as u64;
    let mut tails = Vec::new();
    for id in 1..=NODES {
        let rows = eventually(&format!("node {id}'s ledger"), settle, || async {
            // A restarted node may still be re-applying its log: wait until it holds at least
            // what was committed before the cut.
            let rows = st.ledger_from(id, n.max(1)).await?;
            Ok((n == 0 || rows.first().is_some_and(|r| r.index == n)).then_some(rows))
        })
        .await
        .map_err(|e| Finding::NoRecovery(format!("cut {cut}: {e:#}")))?;
        let (at_n, tail) = if n == 0 { (None, rows) } else { (rows.first().cloned(), rows[1..].to_vec()) };
        if n > 0 && at_n.as_ref() != committed.last() {
            return Err(Finding::Diverged(format!(
                "cut {cut}: node {id} no longer holds what was committed before the cut: at index {n} it has {at_n:?}, before the cut {:?}",
                committed.last()
            )));
        }
        tails.push((id, tail));
    }
    let longest = tails.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
    let reference =
        tails.iter().find(|(_, t)| t.len() == longest).map(|(_, t)| t.clone()).unwrap_or_default();
    for (id, tail) in &tails {
        if reference[..tail.len()] != tail[..] {
            return Err(Finding::Diverged(format!(
                "cut {cut}: node {id}'s ledger is not a prefix of the longest"
            )));
        }
    }
    Ok(())
}

async fn every_promise_once_everywhere(
    st: &Station,
    promised: &BTreeSet<(String, u64)>,
    settle: Duration,
) -> Result<(), Finding> {
    let rows = eventually("every promise in the ledger", settle, || async {
        let rows = st.ledger(recovered_leader(st, settle).await?).await?;
        let have: BTreeSet<(String, u64)> = rows.iter().map(|r| (r.gate.clone(), r.gate_seq)).collect();
        Ok(promised.is_subset(&have).then_some(rows))
    })
    .await
    .map_err(|e| Finding::NoRecovery(format!("{e:#} ({} promised)", promised.len())))?;
    let keys: Vec<(String, u64)> = rows.iter().map(|r| (r.gate.clone(), r.gate_seq)).collect();
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    if unique.len() != keys.len() {
        return Err(Finding::Diverged(format!(
            "{} transactions twice in the ledger",
            keys.len() - unique.len()
        )));
    }
    if unique != *promised {
        return Err(Finding::Diverged(format!(
            "{} in the ledger, {} promised",
            unique.len(),
            promised.len()
        )));
    }
    for id in 1..=NODES {
        let same = eventually(
            &format!("node {id}'s ledger equal to the leader's"),
            Duration::from_secs(30),
            || async { Ok((st.ledger(id).await? == rows).then_some(())) },
        )
        .await;
        if same.is_err() {
            let theirs = st.ledger(id).await.unwrap_or_default();
            let first = rows.iter().zip(&theirs).position(|(a, b)| a != b);
            return Err(Finding::Diverged(format!(
                "node {id}: {} entries against the leader's {}, first difference at position {first:?}",
                theirs.len(),
                rows.len()
            )));
        }
    }
    let last = rows.last().map(|r| r.hash.clone()).unwrap_or_default();
    let expect = rows.len() as u64;
    let stats = eventually("clearing holds the whole ledger", Duration::from_secs(60), || async {
        let s = st.clearing("stats").await?;
        Ok((s.get("records").and_then(Value::as_u64) >= Some(expect)).then_some(s))
    })
    .await
    .map_err(|e| Finding::NoRecovery(format!("{e:#}")))?;
    if stats["records"].as_u64() != Some(expect) || stats["last_hash"].as_str() != Some(last.as_str()) {
        return Err(Finding::Diverged(format!(
            "clearing {stats} against a ledger of {expect} ending {last}"
        )));
    }
    eprintln!("[powercut] {expect} transactions, each promised once, equal on {NODES} nodes and at clearing");
    Ok(())
}

/// A station whose three controllers keep their data on power-cut mounts; node 3's cuts also
/// tear the first unsynced write of each file (seeded).
async fn station(port_offset: u16, seed: u64, env: &[(&str, &str)]) -> (Station, Vec<PowerCutFs>) {
    let plan = Plan { gates: 8, port_offset, ..Plan::default() };
    let prepared = Station::prepare(&plan).expect("station directory");
    let layout = Layout::new(&prepared.0.path().join("station"));
    let mounts: Vec<PowerCutFs> = (1..=NODES)
        .map(|id| {
            let mode = if id == NODES { CutMode::Torn { seed } } else { CutMode::Clean };
            PowerCutFs::mount(&layout.data(&format!("controller-{id}")), mode).expect("mount")
        })
        .collect();
    let st = Station::start_with(prepared, plan, &["--restart-backoff-max-ms", "1000"], env)
        .await
        .expect("station starts");
    (st, mounts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_transactions_survive_station_wide_power_cuts() {
    if !available() {
        return;
    }
    let _one = ONE_STATION_AT_A_TIME.lock().await;
    let seed = seed();
    let cuts = std::env::var("POWERCUT_CUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    eprintln!("[powercut] seed {seed} (POWERCUT_SEED={seed} repeats this run), {cuts} cuts");
    let (mut st, mut mounts) = station(20_000, seed, &[]).await;
    let outcome = run(&st, &mut mounts, seed, cuts, Duration::from_secs(60)).await;
    if let Err(f) = outcome {
        panic!("seed {seed}: {f}\n\n{}", st.log_tails(30));
    }
    let _ = st.stop(Duration::from_secs(60));
    drop(mounts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_syncs_switched_off_the_cuts_lose_acknowledged_transactions() {
    if !available() {
        return;
    }
    let _one = ONE_STATION_AT_A_TIME.lock().await;
    let seed = seed();
    eprintln!("[powercut] syncs OFF, seed {seed}");
    let (mut st, mut mounts) = station(21_000, seed, &[(afc_sled::SKIP_FSYNC_ENV, "1")]).await;
    let outcome = run(&st, &mut mounts, seed, 8, Duration::from_secs(25)).await;
    let _ = st.stop(Duration::from_secs(60));
    drop(mounts);
    match outcome {
        Ok(()) => {
            panic!("seed {seed}: 8 power cuts with the syncs off lost nothing: the harness does not see loss")
        }
        Err(f) => eprintln!("[powercut] syncs off, as expected: {f}"),
    }
}
