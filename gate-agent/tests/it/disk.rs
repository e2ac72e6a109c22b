//! A gate whose disk fills up (issue 11 item 3): its data directory is a small tmpfs of its own,
//! filled to the last byte while the gate runs, then given its space back.
//!
//! While full the gate must keep free passage working (emergency release set and cleared through
//! MQTT, and the hard-wired emergency input, each on the PLC within 1 s), refuse taps with
//! `storage_unavailable` (never a gate_seq it could not make durable), count it in
//! `afc_gate_storage_errors_total` and `afc_gate_storage_available`, raise the alarm; and when the
//! space is back it takes taps again with nothing lost: every tap answered with a gate_seq is in
//! the stand-in ledger exactly once, with its own card, and nothing else is.
//!
//! Needs root and tmpfs: elsewhere it prints SKIPPED with the reason, and fails under `CI=true`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Reason};
use afc_domain::wire::{AlarmKind, ModeMessage, ReaderReply};
use gate_agent::gate::now;
use gate_agent::reader_sim::ReaderConn;

use crate::harness::*;

/// Free passage must reach the PLC within this, whatever the disk does.
const RELEASE_WITHIN: Duration = Duration::from_secs(1);

/// A tmpfs mounted on a directory of the test's, unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `dir`; `Err`: why it cannot.
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether a test that needs mounts can run: prints `SKIPPED: …` and returns false where it
/// cannot, and panics instead under `CI=true` (CI runs as root).
pub fn mounted_or_skip(r: Result<Tmpfs, String>) -> Option<Tmpfs> {
    match r {
        Ok(t) => Some(t),
        Err(why) => {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "cannot mount under CI: {why}");
            eprintln!("SKIPPED: the disk tests need to mount a filesystem here: {why}");
            None
        }
    }
}

/// Fills the filesystem of `dir` to the last byte with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    // The last partial page, byte by byte.
    while f.write_all(&[0xa5]).is_ok() {}
    let _ = f.flush();
    path
}

fn mode(version: u64, bits: ModeBits) -> ModeMessage {
    ModeMessage { version, bits, since: now(), decided_at: None, history_ref: None, history: vec![] }
}

/// How long until the PLC's free-passage coil reads `on`.
async fn free_passage_after(plc: &Plc, on: bool, started: Instant) -> Duration {
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage == on).await;
    assert!(ok, "free passage never became {on}: {s:?}");
    started.elapsed()
}

/// One tap with a fresh card: `Some(gate_seq)` when the gate promised a record, else the reason.
async fn tap(reader: &mut ReaderConn, card_id: u64) -> Result<u64, Reason> {
    let r = reader.tap(&svc_tap(Direction::Entry, card(card_id, 1000, None))).await.unwrap();
    let ReaderReply::Response(r) = r else { panic!("{r:?}") };
    match r.gate_seq {
        Some(seq) => {
            assert_eq!(r.reason, Reason::Ok, "{r:?}");
            Ok(seq)
        }
        None => Err(r.reason),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_on_a_full_disk_still_releases_refuses_taps_as_storage_unavailable_and_loses_nothing_when_space_returns(
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = mounted_or_skip(Tmpfs::mount(&dir.path().join("data"), "3m")) else { return };
    let data = dir.path().join("data");
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    // Small outbox segments, so the disk is met within a few hundred taps.
    let agent = Agent::start_in_dir(dir, port, &plc, "[outbox]\nsegment_bytes = 65536\n").await;
    agent.seed_defaults();
    let g = agent.running.gate.clone();
    let metrics = agent.running.metrics.clone();
    let mut reader = agent.reader().await;
    // Promised taps: gate_seq → card.
    let mut promised: BTreeMap<u64, u64> = BTreeMap::new();
    let mut id = 3104_7000_0000_0000u64;
    for _ in 0..20 {
        id += 1;
        promised.insert(tap(&mut reader, id).await.unwrap(), id);
    }
    eventually("the first taps acked", || (g.store().depth() == 0).then_some(())).await;

    // The disk fills up. The open segment has room left; taps go on into it, then the next
    // segment cannot be made and taps are refused.
    let filler = fill(&data);
    let mut refused_at = None;
    for _ in 0..2000 {
        id += 1;
        match tap(&mut reader, id).await {
            Ok(seq) => {
                assert!(promised.insert(seq, id).is_none(), "gate_seq {seq} promised twice");
            }
            Err(Reason::StorageUnavailable) => {
                refused_at = Some(id);
                break;
            }
            Err(other) => panic!("tap refused with {other} on a full disk"),
        }
    }
    assert!(refused_at.is_some(), "2,000 taps on a full disk and none refused");
    let promised_before_full = promised.len();
    // Refused again (no probe by tap), with its own reason and display code.
    id += 1;
    assert_eq!(tap(&mut reader, id).await, Err(Reason::StorageUnavailable));
    assert_eq!(plc.sim.snapshot().display_code, Reason::StorageUnavailable.code());
    assert!(metrics.storage_errors("outbox") >= 1);
    assert!(metrics.storage_unavailable.load(Ordering::Relaxed));
    assert!(metrics.render().contains("afc_gate_storage_available 0"));
    eventually("the storage_unavailable alarm", || {
        controller
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind == AlarmKind::StorageUnavailable && !e.cleared)
            .then_some(())
    })
    .await;

    // Free passage does not wait on the disk: emergency release set and cleared over MQTT ...
    let topic = format!("afc/v1/{STATION}/mode");
    let t = Instant::now();
    controller.publish_signed(topic.clone(), true, &mode(10, ModeBits::EMERGENCY_RELEASE)).await;
    let set = free_passage_after(&plc, true, t).await;
    let t = Instant::now();
    controller.publish_signed(topic.clone(), true, &mode(11, ModeBits::NORMAL)).await;
    let cleared = free_passage_after(&plc, false, t).await;
    // ... and the hard-wired emergency input.
    let t = Instant::now();
    plc.sim.set_emergency_input(true);
    let input_set = free_passage_after(&plc, true, t).await;
    let t = Instant::now();
    plc.sim.set_emergency_input(false);
    let input_cleared = free_passage_after(&plc, false, t).await;
    println!(
        "full disk: emergency release set {set:?}, cleared {cleared:?}; emergency input set {input_set:?}, cleared {input_cleared:?}"
    );
    for d in [set, cleared, input_set, input_cleared] {
        assert!(d < RELEASE_WITHIN, "free passage took {d:?} on a full disk");
    }
    // sled may still find room in pages it already holds; what failed is reported.
    println!(
        "full disk: failed writes: outbox {}, ack {}, mode {}",
        metrics.storage_errors("outbox"),
        metrics.storage_errors("ack"),
        metrics.storage_errors("mode")
    );

    // Space returns: the gate takes taps again by itself, and the alarm clears.
    std::fs::remove_file(&filler).unwrap();
    let back = Instant::now();
    let deadline = back + DEADLINE;
    loop {
        id += 1;
        match tap(&mut reader, id).await {
            Ok(seq) => {
                promised.insert(seq, id);
                break;
            }
            Err(Reason::StorageUnavailable) => {}
            Err(other) => panic!("{other}"),
        }
        assert!(Instant::now() < deadline, "the gate never took taps again after space returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = back.elapsed();
    for _ in 0..20 {
        id += 1;
        promised.insert(tap(&mut reader, id).await.unwrap(), id);
    }
    eventually("the alarm cleared", || {
        controller
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind == AlarmKind::StorageUnavailable && e.cleared)
            .then_some(())
    })
    .await;
    assert!(!metrics.storage_unavailable.load(Ordering::Relaxed));
    // Every promise reaches the ledger, and the outbox empties (acks are stored again).
    eventually("every promised record acked", || {
        (g.store().depth() == 0 && controller.ledger_len() >= promised.len()).then_some(())
    })
    .await;
    let ledger = controller.ledger.lock().unwrap().clone();
    let got: BTreeMap<u64, u64> = ledger.iter().map(|(seq, r)| (*seq, r.id)).collect();
    let lost = promised.iter().filter(|(seq, card)| got.get(seq) != Some(card)).count();
    let extra = got.keys().filter(|seq| !promised.contains_key(seq)).count();
    let mut cards: Vec<u64> = got.values().copied().collect();
    cards.sort_unstable();
    cards.dedup();
    let doubled = got.len() - cards.len();
    println!(
        "full disk: {} taps promised ({promised_before_full} before the refusal), lost {lost}, doubled {doubled}, unpromised records {extra}; taps again {recovered:?} after space returned",
        promised.len()
    );
    assert_eq!((lost, doubled, extra), (0, 0, 0));
    // The mode applied while the disk was full was written once space returned.
    let stored =
        g.store().state("mode").unwrap().map(|b| afc_domain::wire::decode::<ModeMessage>(&b).unwrap());
    assert_eq!(stored.map(|m| m.version), Some(11));
}

/// An ext4 image on a loop device mounted with `errors=remount-ro`, unmounted on drop.
struct Ext4 {
    image: PathBuf,
    dir: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Ext4 {
    fn make(image: &Path, dir: &Path) -> Result<Ext4, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(image).map_err(|e| e.to_string())?;
        f.set_len(32 << 20).map_err(|e| e.to_string())?;
        let img = image.to_str().unwrap();
        run("mkfs.ext4", &["-q", "-F", img])?;
        let e = Ext4 { image: image.to_owned(), dir: dir.to_owned() };
        e.mount()?;
        Ok(e)
    }

    fn mount(&self) -> Result<(), String> {
        run(
            "mount",
            &["-o", "loop,errors=remount-ro", self.image.to_str().unwrap(), self.dir.to_str().unwrap()],
        )
    }

    /// What the kernel does on a metadata error: the filesystem turns read-only under the gate,
    /// with its files open (`mount -o remount,ro` refuses while files are open for writing).
    fn error(&self) {
        let out = Command::new("findmnt").args(["-no", "SOURCE"]).arg(&self.dir).output().unwrap();
        let dev = String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("/dev/").to_owned();
        std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "test: disk error").unwrap();
        let out = Command::new("findmnt").args(["-no", "OPTIONS"]).arg(&self.dir).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("ro"), "the filesystem did not turn read-only");
    }

    /// What an engineer does: unmount (once the gate let go), check, mount again.
    async fn repair(&self) {
        let deadline = Instant::now() + DEADLINE;
        while let Err(e) = run("umount", &[self.dir.to_str().unwrap()]) {
            assert!(Instant::now() < deadline, "cannot unmount: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // 0: clean, 1: errors corrected.
        let st = Command::new("e2fsck").args(["-fy"]).arg(&self.image).output().unwrap();
        assert!(matches!(st.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&st.stdout));
        self.mount().unwrap();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_whose_disk_turns_read_only_still_releases_refuses_taps_and_after_repair_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = std::env::temp_dir().join(format!("afc-gate-ro-{}.img", free_port()));
    let data = dir.path().join("data");
    let disk = match Ext4::make(&image, &data) {
        Ok(d) => d,
        Err(why) => {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "cannot mount under CI: {why}");
            eprintln!("SKIPPED: the read-only disk test needs loop devices and ext4 here: {why}");
            let _ = std::fs::remove_file(&image);
            return;
        }
    };
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let agent = Agent::start_in_dir(dir, port, &plc, "").await;
    agent.seed_defaults();
    let g = agent.running.gate.clone();
    let metrics = agent.running.metrics.clone();
    let mut reader = agent.reader().await;
    let mut promised: BTreeMap<u64, u64> = BTreeMap::new();
    let mut id = 3104_7100_0000_0000u64;
    for _ in 0..20 {
        id += 1;
        promised.insert(tap(&mut reader, id).await.unwrap(), id);
    }
    // Some unacknowledged at the fault: they must survive it.
    controller.acking.store(false, Ordering::SeqCst);
    for _ in 0..10 {
        id += 1;
        promised.insert(tap(&mut reader, id).await.unwrap(), id);
    }

    disk.error();
    id += 1;
    assert_eq!(tap(&mut reader, id).await, Err(Reason::StorageUnavailable));
    id += 1;
    assert_eq!(tap(&mut reader, id).await, Err(Reason::StorageUnavailable));
    // Emergency release set and cleared: the mode cannot be stored, it applies anyway.
    let topic = format!("afc/v1/{STATION}/mode");
    let t = Instant::now();
    controller.publish_signed(topic.clone(), true, &mode(10, ModeBits::EMERGENCY_RELEASE)).await;
    let set = free_passage_after(&plc, true, t).await;
    let t = Instant::now();
    controller.publish_signed(topic.clone(), true, &mode(11, ModeBits::NORMAL)).await;
    let cleared = free_passage_after(&plc, false, t).await;
    let t = Instant::now();
    plc.sim.set_emergency_input(true);
    let input_set = free_passage_after(&plc, true, t).await;
    plc.sim.set_emergency_input(false);
    free_passage_after(&plc, false, Instant::now()).await;
    println!(
        "read-only disk: emergency release set {set:?}, cleared {cleared:?}; emergency input {input_set:?}"
    );
    for d in [set, cleared, input_set] {
        assert!(d < RELEASE_WITHIN, "free passage took {d:?} on a read-only disk");
    }
    assert!(metrics.storage_errors("outbox") >= 1 && metrics.storage_errors("mode") >= 1);
    eventually("the storage_unavailable alarm", || {
        controller
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind == AlarmKind::StorageUnavailable && !e.cleared)
            .then_some(())
    })
    .await;
    // Still refused a few seconds on (the probe finds it read-only).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    id += 1;
    assert_eq!(tap(&mut reader, id).await, Err(Reason::StorageUnavailable));

    // Repair: stop the gate, unmount, fsck, mount, start it again.
    drop(reader);
    drop(g);
    drop(metrics);
    let repair = Instant::now();
    let dir = agent.stop();
    disk.repair().await;
    controller.acking.store(true, Ordering::SeqCst);
    let agent = Agent::start_in_dir(dir, port, &plc, "").await;
    let mut reader = agent.reader().await;
    id += 1;
    promised.insert(tap(&mut reader, id).await.unwrap(), id);
    let back = repair.elapsed();
    let g = agent.running.gate.clone();
    eventually("every promised record acked", || {
        (g.store().depth() == 0 && controller.ledger_len() >= promised.len()).then_some(())
    })
    .await;
    let got: BTreeMap<u64, u64> = controller.ledger.lock().unwrap().iter().map(|(s, r)| (*s, r.id)).collect();
    let lost = promised.iter().filter(|(seq, card)| got.get(seq) != Some(card)).count();
    let extra = got.keys().filter(|seq| !promised.contains_key(seq)).count();
    let mut cards: Vec<u64> = got.values().copied().collect();
    cards.sort_unstable();
    cards.dedup();
    let doubled = got.len() - cards.len();
    println!(
        "read-only disk: {} taps promised, lost {lost}, doubled {doubled}, unpromised records {extra}; taps again {back:?} after the repair began",
        promised.len()
    );
    assert_eq!((lost, doubled, extra), (0, 0, 0));
    // The retained mode (cleared) is what the restarted gate holds.
    eventually("the retained mode applied", || {
        (g.modes().bits_at(HERE, now()) == ModeBits::NORMAL).then_some(())
    })
    .await;
    drop(agent);
    drop(disk);
    let _ = std::fs::remove_file(&image);
}
