//! A controller whose disk fails under a running node (issue 11 item 3): each node's data
//! directory is a filesystem of its own, the leader's fails under gate traffic: a small tmpfs
//! filled up (ENOSPC), or an ext4 loop image mounted `errors=remount-ro` that hits an error and
//! turns itself read-only (EROFS) with the controller's files open. Its Raft core stops on the
//! storage error: `/readyz` answers 503 with the reason, `/metrics` says why, the process exits
//! non-zero; the other two carry on and lose nothing acknowledged; once its disk is usable again
//! and it is restarted, it catches up to the same ledger.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use controller::chain::{chain_hash, LedgerEntry, GENESIS_HASH};

use crate::common::*;
use crate::harness::*;

/// A tmpfs this test mounted; lazily unmounted on drop (a node may still hold files in it).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` at `path` (created), or says why it cannot.
    pub fn mount(path: &Path, size_mib: u32) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { path: path.to_owned() })
    }

    /// Writes a filler file until the filesystem is full (ENOSPC); returns the bytes written.
    pub fn fill(&self) -> u64 {
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0xa5u8; 256 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        let _ = f.sync_all();
        written
    }

    /// Gives the space back.
    pub fn free(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// An ext4 filesystem in a loop-mounted image file, mounted `errors=remount-ro` (as a station PC's
/// data partition would be): on an error the kernel turns it read-only under its open files, which
/// `mount -o remount,ro` refuses (EBUSY) while a file is open for writing, and so does a read-only
/// bind mount over it. Lazily unmounted on drop.
pub struct Ext4Image {
    image: PathBuf,
    path: PathBuf,
    /// The loop device's name (`loop3`), the key of `/sys/fs/ext4/<dev>/`.
    dev: String,
}

fn run(cmd: &mut Command) -> Result<std::process::Output, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

impl Ext4Image {
    /// Makes a sparse `size_mib` image at `image` with a fresh ext4 and mounts it at `path`.
    pub fn mount(image: &Path, path: &Path, size_mib: u64) -> Result<Ext4Image, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let f = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(size_mib << 20).map_err(|e| format!("{}: {e}", image.display()))?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))?;
        let mut m = Ext4Image { image: image.to_owned(), path: path.to_owned(), dev: String::new() };
        m.attach()?;
        Ok(m)
    }

    fn attach(&mut self) -> Result<(), String> {
        run(Command::new("mount").args(["-o", "loop,errors=remount-ro"]).arg(&self.image).arg(&self.path))?;
        let out = run(Command::new("findmnt").args(["-no", "SOURCE"]).arg(&self.path))?;
        let source = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        self.dev = source.rsplit('/').next().unwrap_or_default().to_owned();
        if !Path::new(&format!("/sys/fs/ext4/{}/trigger_fs_error", self.dev)).exists() {
            return Err(format!("no /sys/fs/ext4/{}/trigger_fs_error (mounted from {source:?})", self.dev));
        }
        Ok(())
    }

    /// Reports a filesystem error to ext4 (its sysfs `trigger_fs_error`, as a failed metadata
    /// check would): it aborts the journal and remounts itself read-only, open files and all.
    pub fn make_read_only(&self) {
        std::fs::write(format!("/sys/fs/ext4/{}/trigger_fs_error", self.dev), "afc disk-fault test").unwrap();
        let probe = std::fs::File::create(self.path.join("probe"));
        assert_eq!(
            probe.as_ref().map_err(|e| e.raw_os_error()).err(),
            Some(Some(30)),
            "{} is not read-only after the error: {probe:?}",
            self.path.display()
        );
    }

    /// What an operator does (its controller has exited): unmount, `e2fsck -fy`, mount again.
    /// Returns e2fsck's exit code (0 clean, 1 errors corrected).
    pub fn repair(&mut self) -> i32 {
        run(Command::new("umount").arg(&self.path)).unwrap();
        let out = Command::new("e2fsck").arg("-fy").arg(&self.image).output().unwrap();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "e2fsck -fy {}: exit {code}\n{}{}",
            self.image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.attach().unwrap();
        code
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Mounts a filesystem per path with `mount` (`"tmpfs"` or `"ext4 image"` in messages), or prints
/// `SKIPPED: …` and returns `None` (panics under `CI=true`, where the tests run as root and must not
/// skip).
fn mounted_or_skip<D>(
    what: &str,
    paths: &[PathBuf],
    mount: impl Fn(&Path) -> Result<D, String>,
) -> Option<Vec<D>> {
    let mut mounted = Vec::new();
    for p in paths {
        match mount(p) {
            Ok(m) => mounted.push(m),
            Err(why) => {
                assert!(
                    std::env::var("CI").map_or(true, |v| v != "true"),
                    "cannot mount a {what} under CI: {why}"
                );
                eprintln!("SKIPPED: the disk-fault test needs to mount a {what} (root): {why}");
                return None;
            }
        }
    }
    Some(mounted)
}

/// How the leader's disk fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Its tmpfs filled up: ENOSPC.
    Full,
    /// Its ext4 turned read-only on an error: EROFS.
    ReadOnly,
}

enum Disk {
    Tmpfs(Tmpfs),
    Ext4(Ext4Image),
}

impl Fault {
    /// `afc_controller_raft_fatal`'s reason for it.
    fn reason(self) -> &'static str {
        match self {
            Fault::Full => "storage_full",
            Fault::ReadOnly => "storage_read_only",
        }
    }

    fn disks(self, c: &Cluster, data: &[PathBuf]) -> Option<Vec<Disk>> {
        match self {
            Fault::Full => mounted_or_skip("tmpfs", data, |p| Tmpfs::mount(p, 48).map(Disk::Tmpfs)),
            Fault::ReadOnly => mounted_or_skip("ext4 image", data, |p| {
                let image = c
                    .root
                    .path()
                    .join(format!("{}.ext4", p.parent().unwrap().file_name().unwrap().to_string_lossy()));
                Ext4Image::mount(&image, p, 128).map(Disk::Ext4)
            }),
        }
    }
}

impl Disk {
    /// Makes the disk fail; says how.
    fn fail(&self) -> String {
        match self {
            Disk::Tmpfs(t) => format!("its data tmpfs filled with {} more bytes", t.fill()),
            Disk::Ext4(e) => {
                e.make_read_only();
                format!("its data ext4 ({}) turned read-only on an error", e.dev)
            }
        }
    }

    /// Makes it usable again (its node has exited); says how.
    fn mend(&mut self) -> String {
        match self {
            Disk::Tmpfs(t) => {
                t.free();
                "filler removed".into()
            }
            Disk::Ext4(e) => format!("unmounted, e2fsck -fy exit {}, mounted again", e.repair()),
        }
    }
}

fn assert_chain(ledger: &[LedgerEntry]) {
    let mut prev = GENESIS_HASH;
    for (i, e) in ledger.iter().enumerate() {
        assert_eq!(e.index, i as u64 + 1, "ledger indexes are contiguous");
        assert_eq!(e.hash, chain_hash(&prev, &e.record), "hash chain broken at {}", e.index);
        prev = e.hash;
    }
}

/// Per gate its seqs in the ledger; panics on a (gate, seq) stored twice.
fn seqs_by_gate(ledger: &[LedgerEntry]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut m: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for e in ledger {
        let fresh = m.entry(e.record.gate.to_string()).or_default().insert(e.record.gate_seq);
        assert!(fresh, "gate {} seq {} is in the ledger twice", e.record.gate, e.record.gate_seq);
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_goes_unready_says_why_exits_and_the_others_lose_no_acknowledged_record() {
    a_leader_whose_disk_fails(Fault::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_filesystem_turns_read_only_goes_unready_says_why_exits_and_catches_up_after_fsck() {
    a_leader_whose_disk_fails(Fault::ReadOnly).await;
}

/// Three nodes, each on a disk of its own, four gates writing; the leader's disk fails with
/// `fault`, then is mended and the node restarted.
async fn a_leader_whose_disk_fails(fault: Fault) {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut c = Cluster::unstarted(3, Duration::from_secs(15));
    let data: Vec<PathBuf> = (1..=3).map(|id| c.node_dir(id).join("data")).collect();
    let Some(mut disks) = fault.disks(&c, &data) else { return };
    let api: BTreeMap<u64, String> = (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
    let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n\
                snapshot_after_logs = 100000\nconnect_timeout_ms = 200\nfatal_exit_delay_ms = 2000\n";
    let spawn = |c: &mut Cluster, id: u64| {
        let extra = format!("[api]\nlisten = \"{}\"\n", api[&id]);
        let addr = c.initial[&id].clone();
        c.spawn_with(id, addr, id == 1, &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" });
    };
    for id in 1..=3 {
        spawn(&mut c, id);
    }
    c.wait_leader(Duration::from_secs(20), None).await;

    let gates = ["g01", "g02", "g03", "g04"];
    for (i, g) in gates.iter().enumerate() {
        c.write(1, &register(g, &gate_key(i as u8 + 1))).await.unwrap();
    }
    let addrs: Vec<String> = (1..=3).map(|id| c.addr(id).to_owned()).collect();
    let writers = GateWriters::start(&c.http, &addrs, &gates, Retry::For(Duration::from_secs(30)));
    poll("load to build up", Duration::from_secs(30), || (writers.acks() >= 100).then_some(())).await;

    // The leader's disk fails under it.
    let victim = c.wait_leader(Duration::from_secs(5), None).await;
    let failed_at = Instant::now();
    let how = disks[victim as usize - 1].fail();
    let acks_at_fault = writers.acks();
    // When the others have taken traffic on (measured while the victim is still dying).
    let resumed = {
        let acks = writers.ack_counter();
        tokio::spawn(async move {
            while acks.load(Ordering::Relaxed) <= acks_at_fault + 20 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed_at.elapsed()
        })
    };
    eprintln!("node {victim} (leader): {how}");

    // Not ready, with the reason, in /readyz and /metrics, before it exits.
    let readyz = format!("http://{}/readyz", api[&victim]);
    let (unready_in, body) = loop {
        let r = c.http.get(&readyz).timeout(Duration::from_secs(2)).send().await;
        if let Ok(r) = r {
            if r.status() == 503 {
                let body: serde_json::Value = r.json().await.unwrap();
                if body["code"] == "raft_stopped" {
                    break (failed_at.elapsed(), body);
                }
            }
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(15),
            "node {victim}'s /readyz never answered 503 raft_stopped after {how}:\n{}",
            c.nodes[&victim].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        body["message"].as_str().unwrap().contains(fault.reason()),
        "{body}\n{}",
        c.nodes[&victim]
            .log()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let metrics =
        c.http.get(format!("http://{}/metrics", api[&victim])).send().await.unwrap().text().await.unwrap();
    for reason in ["storage_full", "storage_read_only", "storage", "panicked"] {
        let on = u8::from(reason == fault.reason());
        let line = format!("afc_controller_raft_fatal{{reason=\"{reason}\"}} {on}");
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in /metrics:\n{metrics}");
    }

    // ... then it exits non-zero (its supervisor's cue to restart it).
    let exit = loop {
        if let Some(s) = c.nodes.get_mut(&victim).unwrap().child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            failed_at.elapsed() < Duration::from_secs(30),
            "node {victim} did not exit after its storage failed:\n{}",
            c.nodes[&victim].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_in = failed_at.elapsed();
    c.nodes.get_mut(&victim).unwrap().child = None;
    // Exit 1 (an orderly shutdown that reports the error), not an abort out of a panic.
    if exit.code() != Some(1) {
        let log = c.nodes[&victim].log();
        let lines: Vec<&str> = log.lines().collect();
        let from =
            lines.iter().position(|l| l.contains("panicked")).unwrap_or(lines.len().saturating_sub(40));
        panic!(
            "node {victim} exited with {exit} after a fatal storage error, not 1; its log from:\n{}",
            lines[from..].join("\n")
        );
    }

    // The other two elected a leader and took traffic on.
    let new = c.wait_leader(Duration::from_secs(10), Some(victim)).await;
    let resumed_in = tokio::time::timeout(Duration::from_secs(20), resumed)
        .await
        .expect("ingestion did not resume on the two healthy nodes within 20 s")
        .unwrap();
    for id in c.running() {
        let r = c.http.get(format!("http://{}/readyz", api[&id])).send().await.unwrap();
        assert_eq!(r.status(), 200, "healthy node {id} not ready");
    }
    poll("more load on the two", Duration::from_secs(20), || {
        (writers.acks() > acks_at_fault + 100).then_some(())
    })
    .await;
    let acked = writers.stop().await;
    let acked_records: u64 = acked.values().sum();
    // Every batch a writer sent was acknowledged in the end (a writer retries until it is), so a
    // ledger holds exactly the acknowledged records: none missing, none twice, none beyond.
    let check = |ledger: &[LedgerEntry], who: &str| -> usize {
        assert_chain(ledger);
        let seqs = seqs_by_gate(ledger);
        let mut lost = 0;
        for (g, through) in &acked {
            assert!(*through > 0);
            lost += (1..=*through).filter(|s| !seqs[g].contains(s)).count();
        }
        assert_eq!(lost, 0, "{who}: {lost} acknowledged records missing");
        assert_eq!(ledger.len() as u64, acked_records, "{who}: ledger length vs records acknowledged");
        ledger.len()
    };
    let leader_applied = c.leader_applied(new).await;
    c.wait_applied(leader_applied, Duration::from_secs(20)).await;
    let healthy = c.running();
    let first = c.ledger(healthy[0]).await;
    assert_eq!(c.ledger(healthy[1]).await, first, "the two healthy nodes' ledgers differ");
    let records = check(&first, "the healthy nodes");

    // Its disk is usable again: restarted (as its supervisor would), it catches up.
    let mended = disks[victim as usize - 1].mend();
    let restarted_at = Instant::now();
    spawn(&mut c, victim);
    let leader = c.wait_leader(Duration::from_secs(20), None).await;
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(30)).await;
    let caught_up_in = restarted_at.elapsed();
    let back = c.ledger(victim).await;
    assert_eq!(back, first, "node {victim}'s ledger after its restart differs");
    check(&back, "the restarted node");
    let r = c.http.get(format!("http://{}/readyz", api[&victim])).send().await.unwrap();
    assert_eq!(r.status(), 200);
    eprintln!(
        "{} on leader {victim}: unready in {unready_in:?}, exited ({exit}) in {exited_in:?}, node {new} led \
         and ingestion resumed in {resumed_in:?}; disk {mended}; restarted, caught up in {caught_up_in:?}; \
         {records} records on every node = {acked_records} acknowledged, lost 0, doubled 0",
        fault.reason()
    );
}
