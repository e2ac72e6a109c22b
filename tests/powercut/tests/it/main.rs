//! The power-cut filesystem through a real FUSE mount, driven with std::fs as a process would.
//!
//! Each test mounts its own instance in a temp dir (several run at once). Where FUSE is missing
//! a test prints `SKIPPED: <why>` and passes, except with `CI=true`, where it fails.

// A test binary: its helpers may panic like its tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use powercut::{CutMode, PowerCutFs};
use tempfile::TempDir;

/// A mounted instance; the mount is dropped (unmounted) before its temp dir is removed.
struct Mounted {
    fs: PowerCutFs,
    _dir: TempDir,
}

impl Mounted {
    fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }

    /// Cut, then restore: what the processes would find after a reboot.
    fn reboot(&mut self) -> powercut::CutReport {
        let report = self.fs.cut().expect("cut");
        self.fs.restore().expect("restore");
        report
    }
}

fn mount(mode: CutMode) -> Option<Mounted> {
    if let Err(why) = PowerCutFs::available() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the power-cut filesystem is needed in CI: {why}"
        );
        println!("SKIPPED: {why}");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let fs = PowerCutFs::mount(&dir.path().join("mnt"), mode).expect("mount");
    Some(Mounted { fs, _dir: dir })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `name` with `content`, fsyncs it and its directory: durable.
fn durable_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(content)?;
    file.sync_all()?;
    sync_dir(path.parent().expect("a file in a directory"))
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    let path = path.to_string_lossy();
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(&*path))
}

#[test]
fn an_unsynced_write_is_gone_after_a_cut() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("log"), b"synced").unwrap();
    OpenOptions::new().append(true).open(m.path("log")).unwrap().write_all(b" and not").unwrap();
    assert_eq!(fs::read(m.path("log")).unwrap(), b"synced and not");

    let report = m.reboot();

    assert_eq!(fs::read(m.path("log")).unwrap(), b"synced");
    assert_eq!(report.files_reverted, 1);
    assert_eq!(report.bytes_lost, 8);
    assert_eq!(report.entries_reverted, 0);
}

#[test]
fn a_synced_write_stays() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("log"), b"one").unwrap();
    let mut file = OpenOptions::new().append(true).open(m.path("log")).unwrap();
    file.write_all(b" two").unwrap();
    file.sync_data().unwrap();
    drop(file);

    m.reboot();

    assert_eq!(fs::read(m.path("log")).unwrap(), b"one two");
    let stats = m.fs.stats();
    assert_eq!((stats.fsyncs, stats.fsyncdirs, stats.bytes_written, stats.cuts), (2, 1, 7, 1));
}

#[test]
fn a_new_file_whose_directory_was_never_synced_is_gone_even_if_the_file_was_fsynced() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    let mut file = File::create(m.path("new")).unwrap();
    file.write_all(b"data").unwrap();
    file.sync_all().unwrap();
    drop(file);

    let report = m.reboot();

    assert!(!m.path("new").exists());
    assert_eq!(report.files_reverted, 1);
    assert_eq!(report.entries_reverted, 1);
}

#[test]
fn a_new_file_stays_once_its_directory_is_synced_and_is_empty_if_never_fsynced_itself() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    fs::create_dir(m.path("d")).unwrap();
    sync_dir(m.fs.mountpoint()).unwrap();
    durable_file(&m.path("d/kept"), b"kept").unwrap();
    fs::write(m.path("d/empty"), b"never fsynced").unwrap();
    sync_dir(&m.path("d")).unwrap();
    fs::create_dir(m.path("d/unsynced-dir")).unwrap();

    m.reboot();

    assert_eq!(fs::read(m.path("d/kept")).unwrap(), b"kept");
    assert_eq!(fs::read(m.path("d/empty")).unwrap(), b"");
    assert!(!m.path("d/unsynced-dir").exists());
    let mut names: Vec<_> = fs::read_dir(m.path("d")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["empty", "kept"]);
}

#[test]
fn an_unsynced_rename_reverts_to_the_old_name_and_content() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("state"), b"old").unwrap();
    // The classic atomic replace, without the final directory fsync.
    let mut tmp = File::create(m.path("state.tmp")).unwrap();
    tmp.write_all(b"new").unwrap();
    tmp.sync_all().unwrap();
    drop(tmp);
    fs::rename(m.path("state.tmp"), m.path("state")).unwrap();
    assert_eq!(fs::read(m.path("state")).unwrap(), b"new");

    let report = m.reboot();

    assert_eq!(fs::read(m.path("state")).unwrap(), b"old");
    assert!(!m.path("state.tmp").exists());
    assert_eq!(report.entries_reverted, 1, "`state` names the old inode again");
}

#[test]
fn a_synced_rename_stays() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("state"), b"old").unwrap();
    durable_file(&m.path("state.tmp"), b"new").unwrap();
    fs::rename(m.path("state.tmp"), m.path("state")).unwrap();
    sync_dir(m.fs.mountpoint()).unwrap();

    let report = m.reboot();

    assert_eq!(fs::read(m.path("state")).unwrap(), b"new");
    assert!(!m.path("state.tmp").exists());
    assert_eq!(report.entries_reverted, 0);
}

#[test]
fn a_rename_between_directories_counts_each_side_with_its_own_directory_fsync() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    for d in ["a", "b"] {
        fs::create_dir(m.path(d)).unwrap();
    }
    sync_dir(m.fs.mountpoint()).unwrap();
    durable_file(&m.path("a/f"), b"f").unwrap();
    fs::rename(m.path("a/f"), m.path("b/f")).unwrap();
    sync_dir(&m.path("b")).unwrap();

    m.reboot();

    // Only the destination side was synced: the file has both names now.
    assert_eq!(fs::read(m.path("a/f")).unwrap(), b"f");
    assert_eq!(fs::read(m.path("b/f")).unwrap(), b"f");
}

#[test]
fn an_unsynced_truncate_reverts() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("f"), b"0123456789").unwrap();
    OpenOptions::new().write(true).open(m.path("f")).unwrap().set_len(3).unwrap();
    File::create(m.path("f")).unwrap(); // O_TRUNC
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 0);

    let report = m.reboot();

    assert_eq!(fs::read(m.path("f")).unwrap(), b"0123456789");
    assert_eq!(report.files_reverted, 1);
}

#[test]
fn a_synced_truncate_and_extension_stay() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("f"), b"0123456789").unwrap();
    let file = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    file.set_len(4).unwrap();
    file.set_len(6).unwrap();
    file.sync_all().unwrap();
    drop(file);

    m.reboot();

    assert_eq!(fs::read(m.path("f")).unwrap(), b"0123\0\0");
}

#[test]
fn every_operation_after_a_cut_fails_with_eio_until_restore() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("f"), b"x").unwrap();
    let mut open = OpenOptions::new().read(true).write(true).open(m.path("f")).unwrap();

    m.fs.cut().unwrap();

    let eio = |r: io::Result<()>| r.expect_err("must fail after the cut").raw_os_error();
    assert_eq!(eio(open.write_all(b"more")), Some(libc::EIO));
    assert_eq!(eio(open.sync_all()), Some(libc::EIO));
    assert_eq!(eio(open.read(&mut [0; 4]).map(drop)), Some(libc::EIO));
    assert_eq!(eio(fs::write(m.path("g"), b"new")), Some(libc::EIO));
    assert_eq!(eio(fs::create_dir(m.path("d"))), Some(libc::EIO));
    assert_eq!(eio(fs::metadata(m.path("f")).map(drop)), Some(libc::EIO));
    drop(open);

    m.fs.restore().unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"x");
    fs::write(m.path("g"), b"works again").unwrap();
}

#[test]
fn a_torn_cut_keeps_a_strict_seeded_prefix_of_the_first_unsynced_write() {
    let pattern: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
    let run = |seed: u64| -> Option<(Vec<u8>, powercut::CutReport)> {
        let mut m = mount(CutMode::Torn { seed })?;
        durable_file(&m.path("wal"), &[b'S'; 1000]).unwrap();
        let file = OpenOptions::new().write(true).open(m.path("wal")).unwrap();
        file.write_all_at(&pattern, 1000).unwrap();
        drop(file);
        let report = m.reboot();
        Some((fs::read(m.path("wal")).unwrap(), report))
    };
    let Some((first, report)) = run(7) else { return };

    assert_eq!(&first[..1000], &[b'S'; 1000][..], "the synced part stays");
    let kept = &first[1000..];
    assert!(kept.len() < pattern.len(), "a strict prefix");
    assert_eq!(kept.len() % 512, 0, "whole sectors");
    assert_eq!(kept, &pattern[..kept.len()]);
    assert_eq!(report.bytes_lost, (pattern.len() - kept.len()) as u64);
    assert_eq!(run(7).map(|(content, _)| content), Some(first.clone()), "same seed, same tear");

    let lengths: std::collections::BTreeSet<usize> =
        (0..8).filter_map(&run).map(|(content, _)| content.len()).collect();
    assert!(lengths.len() > 1, "the seed picks the tear: {lengths:?}");
}

#[test]
fn a_2_mib_write_at_an_offset_reads_back_with_zeros_before_it() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    let data: Vec<u8> =
        (0..2 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let offset = 123_457;
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("big")).unwrap();
    file.write_all_at(&data, offset).unwrap();

    let mut back = vec![0; data.len()];
    file.read_exact_at(&mut back, offset).unwrap();
    assert!(back == data);
    let mut head = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    (&file).take(offset).read_to_end(&mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0));
    assert_eq!(file.metadata().unwrap().len(), offset + data.len() as u64);
    file.sync_all().unwrap();
    drop(file);
    sync_dir(m.fs.mountpoint()).unwrap();

    m.reboot();
    assert!(fs::read(m.path("big")).unwrap()[offset as usize..] == data[..]);
}

#[test]
fn two_mounts_at_once_are_independent() {
    let (Some(mut a), Some(b)) = (mount(CutMode::Clean), mount(CutMode::Clean)) else { return };
    for m in [&a, &b] {
        durable_file(&m.path("f"), b"synced").unwrap();
        fs::write(m.path("f"), b"unsynced").unwrap();
    }

    a.reboot();

    assert_eq!(fs::read(a.path("f")).unwrap(), b"synced");
    assert_eq!(fs::read(b.path("f")).unwrap(), b"unsynced");
    assert_eq!((a.fs.stats().cuts, b.fs.stats().cuts), (1, 0));
}

#[test]
fn an_unlinked_file_comes_back_unless_its_directory_was_synced() {
    let Some(mut m) = mount(CutMode::Clean) else { return };
    durable_file(&m.path("back"), b"b").unwrap();
    durable_file(&m.path("gone"), b"g").unwrap();
    fs::remove_file(m.path("back")).unwrap();
    fs::remove_file(m.path("gone")).unwrap();
    sync_dir(m.fs.mountpoint()).unwrap();
    // Unlinked, then the directory synced: gone. Unlinked again after the sync: comes back.
    durable_file(&m.path("back"), b"b2").unwrap();
    fs::remove_file(m.path("back")).unwrap();

    m.reboot();

    assert_eq!(fs::read(m.path("back")).unwrap(), b"b2");
    assert!(!m.path("gone").exists());
}

#[test]
fn a_dropped_mount_is_unmounted_even_with_a_file_still_open_or_after_a_panic() {
    let Some(m) = mount(CutMode::Clean) else { return };
    let mountpoint = m.fs.mountpoint().to_owned();
    let open = File::create(m.path("held")).unwrap();
    let started = Instant::now();
    drop(m);
    assert!(!is_mounted(&mountpoint), "detached although busy");
    assert!(started.elapsed().as_secs() < 10);
    drop(open);

    let mut mountpoint = None;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let m = mount(CutMode::Clean).expect("mounted above");
        mountpoint = Some(m.fs.mountpoint().to_owned());
        panic!("a failing test");
    }));
    assert!(panicked.is_err());
    assert!(!is_mounted(&mountpoint.expect("set before the panic")));
}

/// Throughput through the mount; run with `cargo test -p powercut --release -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    let Some(m) = mount(CutMode::Clean) else { return };
    let chunk = vec![7u8; 64 * 1024];
    let mut file = File::create(m.path("seq")).unwrap();
    let started = Instant::now();
    let total = 512 * 1024 * 1024;
    for _ in 0..total / chunk.len() {
        file.write_all(&chunk).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!("sequential 64 KiB writes: {:.0} MB/s", total as f64 / secs / 1e6);

    let mut log = File::create(m.path("log")).unwrap();
    let started = Instant::now();
    let n = 20_000;
    for _ in 0..n {
        log.write_all(&[1; 100]).unwrap();
        log.sync_data().unwrap();
    }
    println!("100-byte write + fdatasync: {:.0}/s", n as f64 / started.elapsed().as_secs_f64());
}
