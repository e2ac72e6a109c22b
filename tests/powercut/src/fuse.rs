//! The FUSE adapter: turns kernel requests into calls on the shared [`Tree`], and answers EIO to
//! everything once the power is cut.
//!
//! Every reply has TTL zero and every open file is direct-io, so the kernel caches neither
//! attributes, names nor data: each read, write and lookup reaches the tree.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::tree::{self, Attr, AttrChange, Ino, Kind, Tree};
use crate::Stats;

/// Attributes and names are never cached by the kernel.
const TTL: Duration = Duration::ZERO;

/// What statfs reports as the filesystem's size (memory is the real limit).
const REPORTED_BYTES: u64 = 64 << 30;
const BLOCK: u64 = 4096;

/// The state one mount shares between its FUSE thread and the [`crate::PowerCutFs`] handle.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub tree: Tree,
    /// Set by a cut, cleared by a restore: while set, every request fails with EIO.
    pub cut: bool,
    pub stats: Stats,
}

pub(crate) type Shared = Arc<Mutex<State>>;

/// Locks the state; a panic while it was held (a bug in the tree) must not wedge every later
/// request, so a poisoned lock is taken as it is.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `fuser::Filesystem` of one mount.
pub(crate) struct Adapter {
    pub shared: Shared,
}

fn errno(e: tree::Error) -> Errno {
    match e {
        tree::Error::NotFound => Errno::ENOENT,
        tree::Error::Exists => Errno::EEXIST,
        tree::Error::NotDir => Errno::ENOTDIR,
        tree::Error::IsDir => Errno::EISDIR,
        tree::Error::NotEmpty => Errno::ENOTEMPTY,
        tree::Error::Invalid => Errno::EINVAL,
        tree::Error::TooBig => Errno::EFBIG,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: match a.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: BLOCK as u32,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Permission bits of a create request: `mode` less `umask`.
fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

impl Adapter {
    /// Runs `f` on the state unless the power is cut (then EIO, and nothing reaches the tree).
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut state = lock(&self.shared);
        if state.cut {
            return Err(Errno::EIO);
        }
        f(&mut state)
    }

    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut State) -> Result<Ino, Errno>) {
        match self.with(|s| f(s).and_then(|ino| s.tree.attr(ino).map_err(errno))) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut State) -> Result<(), Errno>) {
        match self.with(f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Lets MAP_SHARED work on direct-io files (kernel 6.6+); without it mmap fails ENODEV.
        let _unsupported = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |s| s.tree.lookup(parent.0, name).map_err(errno));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|s| s.tree.attr(ino.0).map_err(errno)) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.with(|s| {
            if let Some(size) = size {
                s.tree.set_size(ino.0, size).map_err(errno)?;
            }
            let change = AttrChange {
                perm: mode.map(|m| (m & 0o7777) as u16),
                uid,
                gid,
                atime: atime.map(time),
                mtime: mtime.map(time),
            };
            if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
                s.tree.change_attr(ino.0, change).map_err(errno)?;
            }
            s.tree.attr(ino.0).map_err(errno)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        self.entry(reply, |s| {
            s.tree.create(parent.0, name, Kind::File, perm(mode, umask), req.uid(), req.gid()).map_err(errno)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.entry(reply, |s| {
            s.tree.create(parent.0, name, Kind::Dir, perm(mode, umask), req.uid(), req.gid()).map_err(errno)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |s| s.tree.remove(parent.0, name, Kind::File).map_err(errno));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |s| s.tree.remove(parent.0, name, Kind::Dir).map_err(errno));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE and RENAME_WHITEOUT are not modelled.
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.empty(reply, |s| s.tree.rename(parent.0, name, newparent.0, newname, no_replace).map_err(errno));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self.with(|s| {
            if s.tree.attr(ino.0).map_err(errno)?.kind == Kind::Dir {
                return Err(Errno::EISDIR);
            }
            if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                s.tree.set_size(ino.0, 0).map_err(errno)?;
            }
            s.tree.open(ino.0).map_err(errno)
        });
        match result {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|s| s.tree.read(ino.0, offset, u64::from(size)).map_err(errno)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.with(|s| {
            s.tree.write(ino.0, offset, data).map_err(errno)?;
            s.stats.bytes_written += data.len() as u64;
            Ok(())
        });
        match result {
            // A single FUSE write is at most max_write (well under 4 GiB).
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // After a cut the handle counts were reset already; nothing to do.
        let _after_cut = self.with(|s| {
            s.tree.release(ino.0);
            Ok(())
        });
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, |s| {
            s.tree.fsync(ino.0).map_err(errno)?;
            s.stats.fsyncs += 1;
            Ok(())
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|s| s.tree.list(ino.0).map(drop).map_err(errno)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.with(|s| s.tree.list(ino.0).map_err(errno)) {
            Ok(entries) => {
                // An entry's offset is its index + 1: the offset to resume after it.
                for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    let kind = match kind {
                        Kind::File => FileType::RegularFile,
                        Kind::Dir => FileType::Directory,
                    };
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, |s| {
            s.tree.fsync_dir(ino.0).map_err(errno)?;
            s.stats.fsyncdirs += 1;
            Ok(())
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with(|s| Ok(s.tree.usage())) {
            Ok((bytes, inodes)) => {
                let blocks = REPORTED_BYTES / BLOCK;
                let free = blocks.saturating_sub(bytes.div_ceil(BLOCK));
                let files = 1 << 24;
                reply.statfs(
                    blocks,
                    free,
                    free,
                    files,
                    files - inodes.min(files),
                    BLOCK as u32,
                    255,
                    BLOCK as u32,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.with(|s| {
            let ino = match s.tree.lookup(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
                Ok(ino) => {
                    if s.tree.attr(ino).map_err(errno)?.kind == Kind::Dir {
                        return Err(Errno::EISDIR);
                    }
                    if flags & libc::O_TRUNC != 0 {
                        s.tree.set_size(ino, 0).map_err(errno)?;
                    }
                    ino
                }
                Err(_) => s
                    .tree
                    .create(parent.0, name, Kind::File, perm(mode, umask), req.uid(), req.gid())
                    .map_err(errno)?,
            };
            s.tree.open(ino).map_err(errno)?;
            s.tree.attr(ino).map_err(errno)
        });
        match result {
            Ok(attr) => reply.created(
                &TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep_size = match mode {
            0 => false,
            libc::FALLOC_FL_KEEP_SIZE => true,
            // Punching holes, zeroing and collapsing ranges are not modelled.
            _ => {
                reply.error(Errno::EOPNOTSUPP);
                return;
            }
        };
        self.empty(reply, |s| s.tree.allocate(ino.0, offset, length, keep_size).map_err(errno));
    }
}
