//! The gate's clock behind, ahead, and jumping (issue 11 item 2, gate part), on the real
//! `gate-agent` binary with the test-only clock offset (`AFC_TEST_ONLY_CLOCK_OFFSET_FILE`, re-read
//! every 100 ms): emergency release set and cleared by the controllers (their clock, the test's)
//! reaches the PLC within 1 s whatever the gate's clock says, and a backward jump while the
//! release is in force does not take it back. A scheduled change (a `since` after its
//! `decided_at`) waits for a local timer, whatever the gate's clock says.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use afc_domain::mode::ModeBits;
use afc_domain::model::Timestamp;
use afc_domain::wire::ModeMessage;
use gate_agent::gate::{now, TEST_CLOCK_OFFSET_FILE_ENV};

use crate::harness::*;

const WITHIN: Duration = Duration::from_secs(1);
const MIN: i64 = 60_000;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real agent binary on its own broker, its clock offset `offset_ms` (re-read from
/// `offset_file`), once the stand-in controller heard its birth.
struct Agent {
    agent: Proc,
    controller: Controller,
    offset_file: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn agent(plc: &Plc, offset_ms: i64) -> Agent {
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let dir = tempfile::tempdir().unwrap();
    let reader: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), port, plc.addr, reader, "");
    let offset_file = dir.path().join("clock-offset-ms");
    std::fs::write(&offset_file, offset_ms.to_string()).unwrap();
    let log = dir.path().join("agent.log");
    let out = std::fs::File::create(&log).unwrap();
    let agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_gate-agent"))
            .arg("--config")
            .arg(&config)
            .env(TEST_CLOCK_OFFSET_FILE_ENV, &offset_file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap(),
    );
    eventually("the gate's birth", || (!controller.status.lock().unwrap().is_empty()).then_some(())).await;
    Agent { agent, controller, offset_file, log, _dir: dir }
}

async fn reaches(plc: &Plc, on: bool) -> Duration {
    let t = Instant::now();
    let (s, ok) = plc.sim.wait_for(Duration::from_secs(5), |s| s.free_passage == on).await;
    assert!(ok, "free passage never became {on}: {s:?}");
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_release_reaches_the_plc_within_a_second_with_the_gate_clock_behind_ahead_or_jumping() {
    let plc = plc().await;
    let Agent { mut agent, controller, offset_file, log, _dir } = agent(&plc, -10 * MIN).await;
    let topic = format!("afc/v1/{STATION}/mode");
    let mut version = 0;
    let mut figures = Vec::new();
    // (case, offset in force, and whether to jump the clock back 10 min while released)
    let cases: [(&str, i64, bool); 4] = [
        ("10 min behind", -10 * MIN, false),
        ("10 min ahead", 10 * MIN, false),
        ("jumped forward 1 h", 70 * MIN, false),
        ("jumped back 10 min", 60 * MIN, true),
    ];
    for (case, offset, jump_back_while_released) in cases {
        std::fs::write(&offset_file, offset.to_string()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        version += 1;
        let msg = ModeMessage {
            version,
            bits: ModeBits::EMERGENCY_RELEASE,
            since: now(),
            decided_at: None,
            history_ref: None,
            history: vec![],
        };
        controller.publish_signed(topic.clone(), true, &msg).await;
        let set = reaches(&plc, true).await;
        if jump_back_while_released {
            std::fs::write(&offset_file, (offset - 10 * MIN).to_string()).unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(plc.sim.snapshot().free_passage, "{case}: a backward jump took the release back");
        }
        version += 1;
        let msg = ModeMessage {
            version,
            bits: ModeBits::NORMAL,
            since: now(),
            decided_at: None,
            history_ref: None,
            history: vec![],
        };
        controller.publish_signed(topic.clone(), true, &msg).await;
        let cleared = reaches(&plc, false).await;
        figures.push(format!("{case}: set {set:?}, cleared {cleared:?}"));
        assert!(set < WITHIN && cleared < WITHIN, "{case}: set {set:?}, cleared {cleared:?}");
    }
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent stopped; see {}", log.display());
    println!("clock: {}", figures.join("; "));
}

/// A scheduled mode change (`decided_at` now, `since` 2 s later, both the controllers' clock):
/// not in force at once, in force about 2 s after receipt by the gate's local timer, with the
/// gate's clock right or 10 min behind (its lag is not added); a change without a schedule is in
/// force on receipt, and one that arrives before a scheduled start supersedes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_mode_change_takes_effect_at_its_start_by_a_local_timer_whatever_the_gate_clock() {
    const LEAD: Duration = Duration::from_secs(2);
    let plc = plc().await;
    let Agent { mut agent, controller, offset_file, log, _dir } = agent(&plc, 0).await;
    let topic = format!("afc/v1/{STATION}/mode");
    let mut version = 0;
    let mut mode = |bits, lead: Option<Duration>| {
        version += 1;
        let decided = now();
        ModeMessage {
            version,
            bits,
            since: Timestamp(decided.0 + lead.map_or(0, |l| l.as_millis() as i64)),
            decided_at: lead.map(|_| decided),
            history_ref: None,
            history: vec![],
        }
    };
    let mut figures = Vec::new();
    for (case, offset) in [("gate clock right", 0), ("gate clock 10 min behind", -10 * MIN)] {
        std::fs::write(&offset_file, offset.to_string()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        controller.publish_signed(topic.clone(), true, &mode(ModeBits::ENTRY_FREE, Some(LEAD))).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(
            !plc.sim.snapshot().free_passage,
            "{case}: the scheduled change was in force before its start"
        );
        let (s, ok) = plc.sim.wait_for(Duration::from_secs(5), |s| s.free_passage).await;
        let took = sent.elapsed();
        assert!(ok, "{case}: the scheduled change never took effect: {s:?}");
        assert!(took >= LEAD && took < LEAD + Duration::from_millis(700), "{case}: in force after {took:?}");
        figures.push(format!("{case}: in force after {took:?}"));
        // An unscheduled change is in force on receipt.
        let sent = Instant::now();
        controller.publish_signed(topic.clone(), true, &mode(ModeBits::NORMAL, None)).await;
        let (s, ok) = plc.sim.wait_for(Duration::from_secs(5), |s| !s.free_passage).await;
        assert!(
            ok && sent.elapsed() < WITHIN,
            "{case}: the unscheduled change took {:?}: {s:?}",
            sent.elapsed()
        );
        figures.push(format!("unscheduled {:?}", sent.elapsed()));
    }
    // A newer change before the start supersedes the scheduled one: it never takes effect.
    controller.publish_signed(topic.clone(), true, &mode(ModeBits::ENTRY_FREE, Some(LEAD))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    controller.publish_signed(topic.clone(), true, &mode(ModeBits::NORMAL, None)).await;
    tokio::time::sleep(LEAD + Duration::from_millis(500)).await;
    assert!(!plc.sim.snapshot().free_passage, "a superseded scheduled change took effect");
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent stopped; see {}", log.display());
    println!("scheduled mode: {}", figures.join("; "));
}
