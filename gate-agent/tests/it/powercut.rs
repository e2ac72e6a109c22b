//! Power cuts under the real `gate-agent` binary: its data directory is a power-cut filesystem
//! (`powercut`: whatever no fsync covered is forgotten at a cut), a reader taps continuously, and
//! at seeded random moments the power goes (the filesystem reverts and fails every request, the
//! agent is SIGKILLed), the filesystem is mounted again and the agent restarted on what the
//! "disk" really held. Some cuts fall during the download or the activation of a 1,000,000-entry
//! blacklist package.
//!
//! Every tap the gate answered with a gate_seq is a promise to the passenger: at the end each one
//! is in the stand-in controller's ledger exactly once, under its own gate_seq and with its own
//! card (a gate_seq used again after a cut would carry another card), the ledger has no hole,
//! the agent started every time, and it holds the newest blacklist.
//!
//! The same scenario with the gate's durable sled syncs off (`afc_sled::SKIP_FSYNC_ENV`) must be
//! caught: the proof that this test sees what it is for.
//!
//! Seed: `POWERCUT_SEED` (printed either way). Without FUSE the test prints SKIPPED, and fails
//! under `CI=true`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::powercut::{CutMode, PowerCutFs};
use afc_domain::blacklist::{realistic_sample, Blacklist};
use afc_domain::model::{Direction, ParamKind, Timestamp};
use afc_domain::package::BlacklistBody;
use afc_domain::wire::{ParamState, ReaderReply};
use gate_agent::reader_sim::ReaderConn;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

/// Power cuts per run.
const CUTS: usize = 12;
/// The cuts before which a newer 1M-entry blacklist is published (versions 2, 3, 4).
const BLACKLIST_BEFORE_CUT: [usize; 3] = [2, 5, 8];
/// How long a restarted agent may take to answer its first tap.
const START_DEADLINE: Duration = Duration::from_secs(30);

use ::powercut::service::Service;
pub use ::powercut::service::{available_or_skip as powercut_available, seed_from_env as powercut_seed};

/// A passenger after another at one reader, until `stop`, riding out the agent being down.
/// Every answer that carries a gate_seq is pushed to `promises`.
async fn traffic(reader: SocketAddr, promises: Promises, starts: Arc<AtomicUsize>, stop: CancellationToken) {
    // The connection, and the start of the agent it reached (the old one is dead before the next
    // starts, so a connection made after a start is to that agent).
    let mut conn: Option<(ReaderConn, usize)> = None;
    // Outside the pools of `realistic_sample`, so no passenger is on the blacklist.
    let mut id = 3104_5000_0000_0000u64;
    while !stop.is_cancelled() {
        let (c, start) = match conn.as_mut() {
            Some((c, start)) => (c, *start),
            None => match ReaderConn::connect(reader).await {
                Ok(c) => {
                    let start = starts.load(Ordering::SeqCst);
                    let (c, start) = conn.insert((c, start));
                    (c, *start)
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        id += 1;
        let tap = svc_tap(Direction::Entry, card(id, 1000, None));
        match tokio::time::timeout(Duration::from_secs(5), c.tap(&tap)).await {
            Ok(Ok(ReaderReply::Response(r))) => match r.gate_seq {
                Some(seq) => promises.lock().unwrap().push(Promise { seq, card: id, start }),
                // Not ready yet (no parameters, PLC offline): no record, no promise.
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
            // The agent went down (or hangs on a dead disk): connect again.
            Ok(Err(_)) | Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// A tap the gate answered with a gate_seq.
#[derive(Debug, Clone, Copy)]
struct Promise {
    seq: u64,
    card: u64,
    /// The agent start that answered it (1 for the first).
    start: usize,
}

type Promises = Arc<Mutex<Vec<Promise>>>;

/// Waits until the running agent answered more than `at_least` taps with a gate_seq.
async fn wait_ready(agent: &mut Service, promises: &Promises, at_least: usize) {
    let start = agent.started();
    let deadline = Instant::now() + START_DEADLINE;
    while promises.lock().unwrap().iter().filter(|p| p.start == start).count() <= at_least {
        agent.assert_running();
        assert!(
            Instant::now() < deadline,
            "the agent (start {start}) answered no tap in {START_DEADLINE:?}; log tail:\n{}",
            agent.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One gauge from the agent's `/metrics` (`series` with its labels), `None` while unreachable.
async fn metric(addr: SocketAddr, series: &str) -> Option<u64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: gate\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(2), fetch).await.ok()??;
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A full blacklist of 1,000,000 realistic entries as a signed package of `version`.
fn big_blacklist(version: u64) -> Vec<u8> {
    let entries = realistic_sample(1_000_000, version);
    let body = BlacklistBody::Full(Blacklist::from_entries(version, entries)).encode();
    package(ParamKind::Blacklist, version, Timestamp(0), body, &package_key())
}

const BLACKLIST_ACTIVE: &str = "afc_gate_param_version{kind=\"blacklist\",state=\"active\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_cut_off_at_random_moments_loses_no_answered_tap_and_ends_on_the_newest_blacklist() {
    if !powercut_available() {
        return;
    }
    let seed = powercut_seed();
    println!("POWERCUT_SEED={seed}");
    match power_cuts(seed, CUTS, true, &[]).await {
        Ok(summary) => println!("{summary}"),
        Err(finding) => panic!("seed {seed}: {finding}"),
    }
}

/// The proof that the scenario sees what it is for: with the gate's durable sled syncs off
/// (`afc_sled::SKIP_FSYNC_ENV`), sled's directory, and the outbox inside it, is never made
/// reachable on "disk", and the first cut makes the gate number taps from 1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_cuts_with_the_gates_durable_syncs_off_are_caught_reusing_gate_seqs() {
    if !powercut_available() {
        return;
    }
    let seed = powercut_seed();
    println!("POWERCUT_SEED={seed}");
    match power_cuts(seed, 3, false, &[(afc_sled::SKIP_FSYNC_ENV, "1")]).await {
        Ok(summary) => panic!("with the durable syncs off the power cuts found nothing: {summary}"),
        Err(finding) => println!("with the durable syncs off, as expected: {finding}"),
    }
}

/// `cuts` power cuts under taps (and, with `big_blacklists`, three 1M-entry blacklists published
/// on the way); `Err` names the first broken promise, `Ok` summarizes the run. Panics when the
/// agent does not start or answer.
async fn power_cuts(
    seed: u64,
    cuts: usize,
    big_blacklists: bool,
    agent_env: &[(&str, &str)],
) -> Result<String, String> {
    let began = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // The three big packages are built while the first cuts run.
    let blacklists =
        big_blacklists.then(|| tokio::task::spawn_blocking(|| [2, 3, 4].map(|v| (v, big_blacklist(v)))));

    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let fares = package(ParamKind::FareTable, 1, Timestamp(0), fare_body(100), &package_key());
    controller.publish_package(ParamKind::FareTable, &fares, 1, Timestamp(0)).await;

    let dir = tempfile::tempdir().unwrap();
    let mut fs = PowerCutFs::mount(&dir.path().join("data"), CutMode::Torn { seed }).unwrap();
    let reader: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), port, plc.addr, reader, &format!("metrics_listen = \"{metrics}\""));
    // A 1M-entry package takes a while to download in a debug build on a busy machine.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("package_timeout_ms = 1500", "package_timeout_ms = 30000")).unwrap();
    let log = dir.path().join("agent.log");
    let args = vec!["--config".into(), config.into_os_string()];
    let mut agent = Service::new("the agent", env!("CARGO_BIN_EXE_gate-agent"), args, log).env(agent_env);

    let promises: Promises = Arc::default();
    let stop = CancellationToken::new();
    let tapping = tokio::spawn(traffic(reader, promises.clone(), agent.starts(), stop.clone()));

    agent.start().unwrap();
    wait_ready(&mut agent, &promises, 0).await;
    let mut blacklists = blacklists;
    let mut packages: Vec<(u64, Vec<u8>)> = vec![];
    let mut newest_blacklist = 0;
    let blacklist_now = |n: usize| big_blacklists && BLACKLIST_BEFORE_CUT.contains(&n);
    for n in 1..=cuts {
        if blacklist_now(n) {
            if let Some(building) = blacklists.take() {
                packages = building.await.unwrap().into_iter().rev().collect();
            }
            let (version, bytes) = packages.pop().unwrap();
            controller.publish_package(ParamKind::Blacklist, &bytes, version, Timestamp(0)).await;
            newest_blacklist = version;
            println!("blacklist v{version} published ({} bytes)", bytes.len());
        }
        // A seeded moment: right after a publication (during the download or the activation of a
        // package that is active within about a second), or any time.
        let wait = if blacklist_now(n) {
            Duration::from_millis(rng.gen_range(10..800))
        } else {
            Duration::from_millis(rng.gen_range(100..1500))
        };
        let until = Instant::now() + wait;
        while Instant::now() < until {
            agent.assert_running();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let phase = if newest_blacklist == 0 {
            "no big blacklist yet".to_owned()
        } else {
            let acks = controller.acks_for(ParamKind::Blacklist, newest_blacklist);
            let active = acks.iter().any(|a| a.state == ParamState::Active);
            format!("blacklist v{newest_blacklist} {}", if active { "active" } else { "not active yet" })
        };
        let report = fs.cut().unwrap();
        agent.kill();
        fs.restore().unwrap();
        agent.start().unwrap();
        let restarted = Instant::now();
        wait_ready(&mut agent, &promises, 0).await;
        let ready_after = restarted.elapsed();
        // The numbers go on above every promise made before the cut (those between were written
        // durably but never answered).
        let (promised_before, next) = {
            let p = promises.lock().unwrap();
            let now = agent.started();
            let before = p.iter().filter(|p| p.start < now).map(|p| p.seq).max().unwrap_or(0);
            (before, p.iter().filter(|p| p.start == now).map(|p| p.seq).min().unwrap_or(0))
        };
        if next <= promised_before {
            return Err(format!(
                "cut {n}: gate_seq {next} used again after the cut (promised up to {promised_before})"
            ));
        }
        let held = metric(metrics, BLACKLIST_ACTIVE).await;
        println!(
            "cut {n} after {wait:?} ({phase}): {report:?}; promised through gate_seq {promised_before}, \
             next {next}; answering again after {ready_after:?} with blacklist {held:?}",
        );
    }

    // Quiet at the end: the last taps, every record delivered, the newest blacklist in force.
    wait_ready(&mut agent, &promises, 20).await;
    stop.cancel();
    tapping.await.unwrap();
    let promises = promises.lock().unwrap().clone();
    let highest = promises.iter().map(|p| p.seq).max().unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let missing: Vec<Promise> = {
            let ledger = controller.ledger.lock().unwrap();
            promises.iter().filter(|p| !ledger.contains_key(&p.seq)).copied().collect()
        };
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let first = &missing[..missing.len().min(5)];
            return Err(format!("{} promised taps never reached the ledger, e.g. {first:?}", missing.len()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if big_blacklists {
        eventually("the newest blacklist reported active", || {
            controller
                .acks_for(ParamKind::Blacklist, newest_blacklist)
                .iter()
                .any(|a| a.state == ParamState::Active)
                .then_some(())
        })
        .await;
        let mut in_force = None;
        for _ in 0..500 {
            in_force = metric(metrics, BLACKLIST_ACTIVE).await;
            if in_force.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if in_force != Some(newest_blacklist) {
            return Err(format!(
                "after the last restart the gate holds blacklist {in_force:?}, not v{newest_blacklist}"
            ));
        }
    }
    agent.assert_running();
    let acked_final = metric(metrics, "afc_gate_acked_seq").await;
    agent.kill();

    let ledger = controller.ledger.lock().unwrap().clone();
    let mut reused = vec![];
    let mut seen = std::collections::BTreeMap::new();
    for p in &promises {
        if let Some(other) = seen.insert(p.seq, *p) {
            reused.push((other, *p));
        }
    }
    if !reused.is_empty() {
        return Err(format!("gate_seqs promised twice: {reused:?}"));
    }
    let wrong: Vec<_> =
        promises.iter().filter(|p| ledger.get(&p.seq).map(|r| r.id) != Some(p.card)).take(10).collect();
    if !wrong.is_empty() {
        return Err(format!("promised taps whose record in the ledger is another card's: {wrong:?}"));
    }
    let top = ledger.keys().next_back().copied().unwrap_or(0);
    if ledger.len() as u64 != top {
        return Err(format!("the ledger has holes: {} records between 1 and {top}", ledger.len()));
    }
    // Every tap is a new card. The one legitimate second record of a card is the compensating
    // `passage_not_made` that voids its accepted tap (the flap command failed, e.g. a Modbus
    // timeout on a loaded machine).
    let mut by_card: std::collections::BTreeMap<u64, Vec<&afc_domain::ledger::TxRecord>> =
        std::collections::BTreeMap::new();
    for r in ledger.values() {
        by_card.entry(r.id).or_default().push(r);
    }
    let twice: Vec<_> = by_card
        .values()
        .filter(|rs| match rs.as_slice() {
            [_] => false,
            [tap, void] => void.voids != Some(tap.gate_seq),
            _ => true,
        })
        .take(3)
        .map(|rs| rs.iter().map(|r| (r.gate_seq, r.reason, r.voids)).collect::<Vec<_>>())
        .collect();
    if !twice.is_empty() {
        return Err(format!("a card recorded under two gate_seqs (gate_seq, reason, voids): {twice:?}"));
    }
    if acked_final.is_none_or(|a| a > top) {
        return Err(format!("the gate reports an ack beyond the ledger: {acked_final:?} > {top}"));
    }
    let stats = fs.stats();
    Ok(format!(
        "seed {seed}: {} cuts, {} starts, {} promises (highest gate_seq {highest}), ledger {} records, \
         {} received with resends; fs: {} fsyncs, \
         {} dir fsyncs, {} MB written; {:?}",
        stats.cuts,
        agent.started(),
        promises.len(),
        ledger.len(),
        *controller.received.lock().unwrap(),
        stats.fsyncs,
        stats.fsyncdirs,
        stats.bytes_written / 1_000_000,
        began.elapsed()
    ))
}
