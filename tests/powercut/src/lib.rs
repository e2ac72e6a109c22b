//! A power-cut filesystem for tests: a FUSE mount, held in memory, that forgets at a [`cut`]
//! everything no fsync made durable, as a real power loss would.
//!
//! Processes under test (controllers, gate agents, the clearing server) keep their data
//! directories in a [`PowerCutFs`]. The test then calls [`PowerCutFs::cut`], SIGKILLs them,
//! calls [`PowerCutFs::restore`] and starts them again on what "the disk" really held.
//!
//! # The model
//!
//! Every inode has a *live* state (what processes see) and a *synced* state (what the disk holds):
//!
//! - `fsync`/`fdatasync` of a file makes its live content and size its synced content (both are
//!   the same here: metadata like mode and times comes along). Its *name* is not made durable.
//! - `fsync` of a directory (`File::open(dir)?.sync_all()`, FUSE's `fsyncdir`) makes its live
//!   entries (name → inode) its synced entries: creates, unlinks, renames, mkdir and rmdir in that
//!   directory become durable. A rename touches two directories: each side is durable once its own
//!   directory is fsynced (so after a cut a renamed file may have both names, or neither).
//! - Nothing else is durable. `sync_file_range` never reaches a FUSE daemon, so it makes nothing
//!   durable here (rightly: it does not on a real disk either). `sync(2)`/`syncfs(2)` are not seen
//!   either. `write`, `truncate`, `fallocate` all change live data only.
//!
//! At a cut the live tree is rebuilt from the synced one, walking from the root through synced
//! entries only:
//!
//! - an inode reachable only through unsynced entries is gone, *even if its data was fsynced*
//!   (like ext4 without the directory fsync: the conservative choice);
//! - an inode a synced entry names, but whose own content was never fsynced, comes back empty
//!   (a file of size 0, a directory with no entries);
//! - an unsynced write, truncate or size change of a surviving file is undone;
//! - a directory named by two synced entries (moved, both sides synced at different moments)
//!   keeps only the first in the walk (names in byte order, depth first): a directory has one
//!   parent;
//! - the result becomes both the live and the synced state.
//!
//! With [`CutMode::Torn`], a cut additionally keeps a *torn write* in each surviving file that was
//! written since its last fsync: of the first `write` request since that fsync (offset `o`,
//! length `n`), it keeps the bytes `[o, o + k)` as the file held them at the cut, laid over the
//! synced content (extending the file to `o + k` if it was shorter, zeros in any gap), where `k`
//! is a whole number of 512-byte sectors drawn from `0..ceil(n / 512)` sectors, capped at the
//! live file's length: always a strict prefix of the write (possibly empty). `k` depends only on
//! the seed, the inode number, the number of the cut on this mount and `n`, so a test that does
//! the same operations gets the same result. Later unsynced writes and truncates are lost as in
//! [`CutMode::Clean`]. (The kernel splits a large `write(2)` into FUSE write requests of at most
//! 1 MiB by default, `fs.fuse.max_pages_limit`: only the first request is torn.)
//!
//! From the moment `cut` returns, every request on the mount fails with EIO, until `restore`
//! unmounts and mounts the reverted tree again (so no kernel cache survives).
//!
//! # Limits
//!
//! Regular files and directories only: no hard links (EPERM), symlinks (EPERM), device nodes,
//! xattrs, `RENAME_EXCHANGE`, hole punching. The kernel caches nothing (TTL zero, direct-io
//! opens); shared `mmap` is allowed on kernels that support it on direct-io files, and its pages
//! reach the tree only when the kernel writes them back, `msync` being an fsync.
//!
//! [`cut`]: PowerCutFs::cut

mod fuse;
pub mod service;
mod tree;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};
use nix::errno::Errno;
use nix::mount::MntFlags;

use crate::fuse::{lock, Adapter, Shared, State};
use crate::tree::{Tear, Tree};

/// How much survives of data written but not fsynced when the power is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing: the file is exactly as of its last fsync.
    Clean,
    /// A seeded-random strict prefix (whole 512-byte sectors) of the first unsynced write of each
    /// file survives: see the crate docs.
    Torn { seed: u64 },
}

/// What one cut threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Regular files that vanished, or whose data had changed since their last fsync.
    pub files_reverted: u64,
    /// Bytes written since their file's last fsync, less what a torn cut kept, plus the whole
    /// size of each file that vanished.
    pub bytes_lost: u64,
    /// Directory entries (name → inode) that differ between before and after the cut: a reverted
    /// rename within one directory counts two (the new name gone, the old one back).
    pub entries_reverted: u64,
}

/// Counters since the mount (across restores).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// fsync/fdatasync requests on files.
    pub fsyncs: u64,
    /// fsync requests on directories.
    pub fsyncdirs: u64,
    /// Bytes accepted by write requests.
    pub bytes_written: u64,
    pub cuts: u64,
}

/// A mounted power-cut filesystem; unmounted on drop.
pub struct PowerCutFs {
    mountpoint: PathBuf,
    mode: CutMode,
    /// The tree, the cut flag and the counters, shared with the FUSE thread.
    shared: Shared,
    /// The FUSE session thread; `None` only between an unmount and the next mount.
    session: Option<BackgroundSession>,
}

/// How long `restore` waits for the mount to stop being busy.
const RESTORE_WAIT: Duration = Duration::from_secs(10);
/// How long `drop` waits before detaching a busy mount lazily.
const DROP_WAIT: Duration = Duration::from_secs(2);

impl PowerCutFs {
    /// Whether this machine can mount it (/dev/fuse present, fusermount3 on PATH or at
    /// /usr/bin/fusermount3): Err names what is missing, so a test can print SKIPPED.
    pub fn available() -> Result<(), String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing (no FUSE in this kernel or container)".into());
        }
        let on_path = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("fusermount3").is_file()));
        if !on_path && !Path::new("/usr/bin/fusermount3").is_file() {
            return Err("fusermount3 is missing (Debian package fuse3)".into());
        }
        Ok(())
    }

    /// Mounts a new, empty power-cut filesystem at `mountpoint` (created if missing; must be
    /// empty). Its root has the mountpoint's owner and mode, and is synced.
    pub fn mount(mountpoint: &Path, mode: CutMode) -> io::Result<PowerCutFs> {
        std::fs::create_dir_all(mountpoint)?;
        let mountpoint = mountpoint.canonicalize()?;
        if std::fs::read_dir(&mountpoint)?.next().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mountpoint {} is not empty", mountpoint.display()),
            ));
        }
        let meta = std::fs::metadata(&mountpoint)?;
        let state = State {
            tree: Tree::new(meta.uid(), meta.gid(), (meta.mode() & 0o7777) as u16),
            cut: false,
            stats: Stats::default(),
        };
        let mut fs = PowerCutFs { mountpoint, mode, shared: Arc::new(Mutex::new(state)), session: None };
        fs.spawn()?;
        Ok(fs)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: from the moment this returns, every operation on the mount fails with EIO
    /// (nothing more reaches "disk") and the content is reverted to the synced state. Processes
    /// using the mount are expected to be SIGKILLed by the caller right after.
    pub fn cut(&self) -> io::Result<CutReport> {
        let mut state = lock(&self.shared);
        state.cut = true;
        state.stats.cuts += 1;
        let tear = match self.mode {
            CutMode::Clean => Tear::None,
            CutMode::Torn { seed } => Tear::Sectors { seed },
        };
        let cut_number = state.stats.cuts;
        let reverted = state.tree.cut(tear, cut_number);
        Ok(CutReport {
            files_reverted: reverted.files,
            bytes_lost: reverted.bytes,
            entries_reverted: reverted.entries,
        })
    }

    /// After every process that used the mount is dead: unmounts and mounts again at the same
    /// place, serving the reverted state (fresh kernel caches). Waits (up to ~10 s, retrying)
    /// while the unmount reports busy; then fails with the busy error, still mounted.
    pub fn restore(&mut self) -> io::Result<()> {
        self.unmount(RESTORE_WAIT)?;
        {
            let mut state = lock(&self.shared);
            state.tree.close_all();
            state.cut = false;
        }
        self.spawn()
    }

    /// Counters since mount: fsyncs (files), fsyncdirs, bytes written, cuts.
    pub fn stats(&self) -> Stats {
        lock(&self.shared).stats
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("powercut".into())];
        let adapter = Adapter { shared: Arc::clone(&self.shared) };
        self.session = Some(fuser::spawn_mount(adapter, &self.mountpoint, &config)?);
        Ok(())
    }

    /// umount(2), retrying while busy for up to `wait`, then joins the session thread.
    fn unmount(&mut self, wait: Duration) -> io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let deadline = Instant::now() + wait;
        loop {
            match nix::mount::umount(&self.mountpoint) {
                // EINVAL: not mounted any more (unmounted from outside).
                Ok(()) | Err(Errno::EINVAL) => break,
                Err(Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    self.session = Some(session);
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("unmounting {}: {e}", self.mountpoint.display()),
                    ));
                }
            }
        }
        // The kernel has torn the connection down: the thread sees ENODEV and ends, or
        // ECONNABORTED when requests were still queued (seen once under load in the gate's
        // power-cut test): both mean the mount is gone. (Not `umount_and_join`: it would try a
        // second umount(2) and fail with EINVAL.)
        match session.join() {
            Err(e) if e.raw_os_error() == Some(Errno::ECONNABORTED as i32) => Ok(()),
            r => r,
        }
    }
}

impl Drop for PowerCutFs {
    /// Unmounts; if still busy after a short wait (a test panicked with files open), detaches the
    /// mount lazily so no stale mount is left, and lets the FUSE thread end with its last user.
    fn drop(&mut self) {
        if self.unmount(DROP_WAIT).is_ok() {
            return;
        }
        lock(&self.shared).cut = true;
        let _already_gone = nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        if let Some(session) = self.session.take() {
            // Its own unmount-on-drop would now target whatever is mounted there next.
            std::mem::forget(session);
        }
    }
}

impl std::fmt::Debug for PowerCutFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerCutFs").field("mountpoint", &self.mountpoint).field("mode", &self.mode).finish()
    }
}
