//! The in-memory tree and its synced shadow: pure, no FUSE, no I/O.
//!
//! Two maps of inodes:
//! - `live`: what processes see now (every create, write, rename lands here at once);
//! - `synced`: what "the disk" holds. `fsync(file)` copies the file's live node into it;
//!   `fsyncdir(dir)` copies the directory's live entries into it. Nothing else touches it.
//!
//! A cut rebuilds `live` from `synced` by walking from the root through synced entries only, so an
//! inode reachable only through unsynced entries disappears (see the crate docs for the model).
//!
//! File data is held in copy-on-write chunks, so an fsync copies pointers, not bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::SystemTime;

/// An inode number, as the kernel sees it.
pub type Ino = u64;

/// The root directory's inode number (FUSE's fixed one).
pub const ROOT: Ino = 1;

/// Size of one copy-on-write chunk of file data.
const CHUNK: u64 = 64 * 1024;

/// Size of the "sector" a torn write is cut at.
pub const SECTOR: u64 = 512;

/// Largest file size accepted (writes past it fail with EFBIG).
const MAX_FILE_SIZE: u64 = 1 << 40;

/// What an operation on the tree can fail with; the FUSE adapter maps each to an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
    TooBig,
}

/// Regular file or directory: the only kinds this filesystem has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// The attributes the adapter turns into a `FileAttr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only (no file type bits).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// The attribute changes of a `setattr` (size is a data change and goes through `set_size`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrChange {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// How a cut treats unsynced file data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// All of it is lost.
    None,
    /// A seeded-random whole number of sectors of the first unsynced write survives.
    Sectors { seed: u64 },
}

/// What a cut threw away (the crate's `CutReport` counts, see lib.rs for their definitions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reverted {
    pub files: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// File content: a sparse list of copy-on-write chunks. Bytes past a chunk's length are zeros,
/// and so is a missing chunk; bytes past `len` are never stored.
#[derive(Debug, Clone, Default)]
pub struct Content {
    len: u64,
    /// `chunks.len() == len.div_ceil(CHUNK)`.
    chunks: Vec<Option<Arc<Vec<u8>>>>,
}

impl Content {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Bytes actually held (for statfs).
    fn stored(&self) -> u64 {
        self.chunks.iter().flatten().map(|c| c.len() as u64).sum()
    }

    /// Up to `size` bytes from `offset`, short at the end of the file.
    pub fn read(&self, offset: u64, size: u64) -> Vec<u8> {
        let end = offset.saturating_add(size).min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let index = (pos / CHUNK) as usize;
            let within = (pos % CHUNK) as usize;
            let take = ((CHUNK - pos % CHUNK).min(end - pos)) as usize;
            match &self.chunks[index] {
                Some(chunk) if within < chunk.len() => {
                    let have = (chunk.len() - within).min(take);
                    out.extend_from_slice(&chunk[within..within + have]);
                    out.resize(out.len() + take - have, 0);
                }
                _ => out.resize(out.len() + take, 0),
            }
            pos += take as u64;
        }
        out
    }

    /// Writes `data` at `offset`, extending the file (with zeros in any gap).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if end > self.len {
            self.set_len(end);
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = (pos / CHUNK) as usize;
            let within = (pos % CHUNK) as usize;
            let take = ((CHUNK - pos % CHUNK) as usize).min(rest.len());
            let chunk = Arc::make_mut(self.chunks[index].get_or_insert_with(Default::default));
            if chunk.len() < within + take {
                chunk.resize(within + take, 0);
            }
            chunk[within..within + take].copy_from_slice(&rest[..take]);
            rest = &rest[take..];
            pos += take as u64;
        }
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    pub fn set_len(&mut self, len: u64) {
        self.chunks.resize(len.div_ceil(CHUNK) as usize, None);
        if len < self.len && len % CHUNK != 0 {
            if let Some(Some(last)) = self.chunks.last_mut() {
                let keep = (len % CHUNK) as usize;
                if last.len() > keep {
                    Arc::make_mut(last).truncate(keep);
                }
            }
        }
        self.len = len;
    }
}

/// A directory's entries, and its parent (for "..").
#[derive(Debug, Clone, Default)]
struct Dir {
    entries: BTreeMap<OsString, Ino>,
    parent: Ino,
}

#[derive(Debug, Clone)]
enum Body {
    File(Content),
    Dir(Dir),
}

/// An inode's metadata and content: one of these lives in `live` and, once synced, a copy in
/// `synced`.
#[derive(Debug, Clone)]
struct Node {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    body: Body,
}

impl Node {
    fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
        }
    }

    /// The same inode as it is when just created: what a synced entry brings back of an inode
    /// whose own content was never synced.
    fn emptied(&self, parent: Ino) -> Node {
        let body = match self.body {
            Body::File(_) => Body::File(Content::default()),
            Body::Dir(_) => Body::Dir(Dir { entries: BTreeMap::new(), parent }),
        };
        Node { body, ..self.clone() }
    }
}

/// What changed in a file since its last fsync: decides what a cut loses, and what a torn cut keeps.
#[derive(Debug, Clone, Copy, Default)]
struct Dirty {
    /// Any data change (write, truncate, fallocate) since the last fsync.
    changed: bool,
    /// Bytes passed to `write` since the last fsync.
    written: u64,
    /// Offset and length of the first write since the last fsync: the one a torn cut tears.
    first_write: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct LiveInode {
    node: Node,
    /// Live directory entries naming it (the root counts one for itself).
    links: u32,
    /// Open file handles: an unlinked inode stays readable until the last one is released.
    opens: u32,
    dirty: Dirty,
}

#[derive(Debug, Clone)]
struct SyncedInode {
    node: Node,
    /// Synced directory entries naming it: it is dropped at zero once it has no live inode either.
    links: u32,
}

/// The whole filesystem: the live tree and the synced shadow.
#[derive(Debug)]
pub struct Tree {
    live: HashMap<Ino, LiveInode>,
    synced: HashMap<Ino, SyncedInode>,
    /// Never reused, so an inode number means one inode for the life of the tree.
    next_ino: Ino,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new(0, 0, 0o755)
    }
}

impl Tree {
    /// An empty tree whose root is owned by `uid`/`gid`; the empty root is synced.
    pub fn new(uid: u32, gid: u32, perm: u16) -> Tree {
        let now = SystemTime::now();
        let root = Node {
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            body: Body::Dir(Dir { entries: BTreeMap::new(), parent: ROOT }),
        };
        let live = LiveInode { node: root.clone(), links: 1, opens: 0, dirty: Dirty::default() };
        Tree {
            live: HashMap::from([(ROOT, live)]),
            synced: HashMap::from([(ROOT, SyncedInode { node: root, links: 1 })]),
            next_ino: ROOT + 1,
        }
    }

    fn inode(&self, ino: Ino) -> Result<&LiveInode, Error> {
        self.live.get(&ino).ok_or(Error::NotFound)
    }

    fn inode_mut(&mut self, ino: Ino) -> Result<&mut LiveInode, Error> {
        self.live.get_mut(&ino).ok_or(Error::NotFound)
    }

    fn dir(&self, ino: Ino) -> Result<&Dir, Error> {
        match &self.inode(ino)?.node.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Error::NotDir),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut Dir, Error> {
        match &mut self.inode_mut(ino)?.node.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Error::NotDir),
        }
    }

    pub fn attr(&self, ino: Ino) -> Result<Attr, Error> {
        let inode = self.inode(ino)?;
        let node = &inode.node;
        let (size, nlink) = match &node.body {
            Body::File(content) => (content.len(), inode.links),
            Body::Dir(dir) => {
                let subdirs = dir
                    .entries
                    .values()
                    .filter(|child| self.live.get(child).is_some_and(|c| c.node.kind() == Kind::Dir))
                    .count();
                (4096, 2 + subdirs as u32)
            }
        };
        Ok(Attr {
            ino,
            kind: node.kind(),
            size,
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
        })
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, Error> {
        self.dir(parent)?.entries.get(name).copied().ok_or(Error::NotFound)
    }

    /// `(ino, kind, name)` of `.`, `..` and every entry, in a stable order.
    pub fn list(&self, dir: Ino) -> Result<Vec<(Ino, Kind, OsString)>, Error> {
        let d = self.dir(dir)?;
        let mut out = vec![(dir, Kind::Dir, ".".into()), (d.parent, Kind::Dir, "..".into())];
        for (name, &ino) in &d.entries {
            let kind = self.live.get(&ino).map_or(Kind::File, |i| i.node.kind());
            out.push((ino, kind, name.clone()));
        }
        Ok(out)
    }

    /// Creates an empty file (or directory) named `name` in `parent`.
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<Ino, Error> {
        if name.is_empty() || name == "." || name == ".." {
            return Err(Error::Invalid);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Error::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        let body = match kind {
            Kind::File => Body::File(Content::default()),
            Kind::Dir => Body::Dir(Dir { entries: BTreeMap::new(), parent }),
        };
        let node = Node { perm, uid, gid, atime: now, mtime: now, ctime: now, body };
        self.live.insert(ino, LiveInode { node, links: 1, opens: 0, dirty: Dirty::default() });
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.touch_dir(parent, now);
        Ok(ino)
    }

    fn touch_dir(&mut self, dir: Ino, now: SystemTime) {
        if let Some(inode) = self.live.get_mut(&dir) {
            inode.node.mtime = now;
            inode.node.ctime = now;
        }
    }

    /// Removes the entry `name` (a file with `want == File`, an empty directory with `Dir`).
    pub fn remove(&mut self, parent: Ino, name: &OsStr, want: Kind) -> Result<(), Error> {
        let ino = self.lookup(parent, name)?;
        match (want, &self.inode(ino)?.node.body) {
            (Kind::File, Body::Dir(_)) => return Err(Error::IsDir),
            (Kind::Dir, Body::File(_)) => return Err(Error::NotDir),
            (Kind::Dir, Body::Dir(d)) if !d.entries.is_empty() => return Err(Error::NotEmpty),
            _ => {}
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.touch_dir(parent, SystemTime::now());
        self.unlink_live(ino);
        Ok(())
    }

    /// One live entry naming `ino` is gone.
    fn unlink_live(&mut self, ino: Ino) {
        if let Some(inode) = self.live.get_mut(&ino) {
            inode.links = inode.links.saturating_sub(1);
            inode.node.ctime = SystemTime::now();
        }
        self.forget_live_if_unused(ino);
    }

    fn forget_live_if_unused(&mut self, ino: Ino) {
        let unused = self.live.get(&ino).is_some_and(|i| i.links == 0 && i.opens == 0);
        if unused && ino != ROOT {
            self.live.remove(&ino);
            self.forget_synced_if_unused(ino);
        }
    }

    /// Drops synced inodes that no synced entry names and that no longer live, recursively.
    fn forget_synced_if_unused(&mut self, ino: Ino) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            let unused = ino != ROOT
                && !self.live.contains_key(&ino)
                && self.synced.get(&ino).is_some_and(|s| s.links == 0);
            if !unused {
                continue;
            }
            if let Some(SyncedInode { node: Node { body: Body::Dir(dir), .. }, .. }) =
                self.synced.remove(&ino)
            {
                for child in dir.entries.into_values() {
                    if let Some(s) = self.synced.get_mut(&child) {
                        s.links = s.links.saturating_sub(1);
                    }
                    work.push(child);
                }
            }
        }
    }

    /// rename(2): moves `parent/name` to `new_parent/new_name`, replacing a file there (or an empty
    /// directory, if the source is one) unless `no_replace`. The kernel has already refused to
    /// move a directory into itself.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Error> {
        if new_name.is_empty() || new_name == "." || new_name == ".." {
            return Err(Error::Invalid);
        }
        let ino = self.lookup(parent, name)?;
        self.dir(new_parent)?;
        let kind = self.inode(ino)?.node.kind();
        if let Ok(target) = self.lookup(new_parent, new_name) {
            if target == ino {
                return Ok(());
            }
            if no_replace {
                return Err(Error::Exists);
            }
            match (kind, &self.inode(target)?.node.body) {
                (Kind::File, Body::Dir(_)) => return Err(Error::IsDir),
                (Kind::Dir, Body::File(_)) => return Err(Error::NotDir),
                (Kind::Dir, Body::Dir(d)) if !d.entries.is_empty() => return Err(Error::NotEmpty),
                _ => {}
            }
            self.dir_mut(new_parent)?.entries.remove(new_name);
            self.unlink_live(target);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(new_parent)?.entries.insert(new_name.to_owned(), ino);
        if let Ok(moved) = self.dir_mut(ino) {
            moved.parent = new_parent;
        }
        let now = SystemTime::now();
        self.touch_dir(parent, now);
        self.touch_dir(new_parent, now);
        Ok(())
    }

    pub fn open(&mut self, ino: Ino) -> Result<(), Error> {
        self.inode_mut(ino)?.opens += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: Ino) {
        if let Some(inode) = self.live.get_mut(&ino) {
            inode.opens = inode.opens.saturating_sub(1);
        }
        self.forget_live_if_unused(ino);
    }

    /// Forgets every open handle (a fresh mount has none).
    pub fn close_all(&mut self) {
        let inos: Vec<Ino> = self.live.keys().copied().collect();
        for ino in inos {
            if let Some(inode) = self.live.get_mut(&ino) {
                inode.opens = 0;
            }
            self.forget_live_if_unused(ino);
        }
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u64) -> Result<Vec<u8>, Error> {
        match &self.inode(ino)?.node.body {
            Body::File(content) => Ok(content.read(offset, size)),
            Body::Dir(_) => Err(Error::IsDir),
        }
    }

    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> Result<(), Error> {
        if offset.saturating_add(data.len() as u64) > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let inode = self.inode_mut(ino)?;
        let Body::File(content) = &mut inode.node.body else { return Err(Error::IsDir) };
        content.write(offset, data);
        let dirty = &mut inode.dirty;
        dirty.changed = true;
        dirty.written += data.len() as u64;
        if dirty.first_write.is_none() && !data.is_empty() {
            dirty.first_write = Some((offset, data.len() as u64));
        }
        let now = SystemTime::now();
        inode.node.mtime = now;
        inode.node.ctime = now;
        Ok(())
    }

    /// truncate(2) / ftruncate(2): a data change, reverted by a cut unless fsynced.
    pub fn set_size(&mut self, ino: Ino, size: u64) -> Result<(), Error> {
        if size > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let inode = self.inode_mut(ino)?;
        let Body::File(content) = &mut inode.node.body else { return Err(Error::IsDir) };
        if content.len() != size {
            content.set_len(size);
            inode.dirty.changed = true;
        }
        let now = SystemTime::now();
        inode.node.mtime = now;
        inode.node.ctime = now;
        Ok(())
    }

    /// fallocate(2) mode 0 (extend with zeros) or KEEP_SIZE (nothing to reserve in memory).
    pub fn allocate(&mut self, ino: Ino, offset: u64, len: u64, keep_size: bool) -> Result<(), Error> {
        let end = offset.checked_add(len).ok_or(Error::TooBig)?;
        let attr = self.attr(ino)?;
        if attr.kind != Kind::File {
            return Err(Error::IsDir);
        }
        if !keep_size && end > attr.size {
            self.set_size(ino, end)?;
        }
        Ok(())
    }

    pub fn change_attr(&mut self, ino: Ino, change: AttrChange) -> Result<(), Error> {
        let node = &mut self.inode_mut(ino)?.node;
        if let Some(perm) = change.perm {
            node.perm = perm & 0o7777;
        }
        if let Some(uid) = change.uid {
            node.uid = uid;
        }
        if let Some(gid) = change.gid {
            node.gid = gid;
        }
        if let Some(atime) = change.atime {
            node.atime = atime;
        }
        if let Some(mtime) = change.mtime {
            node.mtime = mtime;
        }
        node.ctime = SystemTime::now();
        Ok(())
    }

    /// fsync(2)/fdatasync(2) of a file: its content and size become durable (not its name).
    pub fn fsync(&mut self, ino: Ino) -> Result<(), Error> {
        let inode = self.inode_mut(ino)?;
        if inode.node.kind() == Kind::Dir {
            return self.fsync_dir(ino);
        }
        inode.dirty = Dirty::default();
        let node = inode.node.clone();
        match self.synced.get_mut(&ino) {
            Some(synced) => synced.node = node,
            None => {
                self.synced.insert(ino, SyncedInode { node, links: 0 });
            }
        }
        Ok(())
    }

    /// fsync(2) of a directory: its entries (names → inodes) become durable. An inode a synced
    /// entry names but whose own content was never synced comes back empty after a cut.
    pub fn fsync_dir(&mut self, ino: Ino) -> Result<(), Error> {
        let live = self.inode(ino)?.node.clone();
        let Body::Dir(dir) = &live.body else { return self.fsync(ino) };
        let old: BTreeMap<OsString, Ino> = match self.synced.get(&ino).map(|s| &s.node.body) {
            Some(Body::Dir(d)) => d.entries.clone(),
            _ => BTreeMap::new(),
        };
        // Additions first: a rename within the directory must not drop the inode on the way.
        for (name, &child) in &dir.entries {
            if old.get(name) == Some(&child) {
                continue;
            }
            if !self.synced.contains_key(&child) {
                let Some(inode) = self.live.get(&child) else { continue };
                let node = inode.node.emptied(ino);
                self.synced.insert(child, SyncedInode { node, links: 0 });
            }
            if let Some(s) = self.synced.get_mut(&child) {
                s.links += 1;
            }
        }
        let removed: Vec<Ino> = old
            .iter()
            .filter(|(name, child)| dir.entries.get(*name) != Some(child))
            .map(|(_, &child)| child)
            .collect();
        match self.synced.get_mut(&ino) {
            Some(synced) => synced.node = live.clone(),
            None => {
                self.synced.insert(ino, SyncedInode { node: live.clone(), links: 0 });
            }
        }
        for child in removed {
            if let Some(s) = self.synced.get_mut(&child) {
                s.links = s.links.saturating_sub(1);
            }
            self.forget_synced_if_unused(child);
        }
        Ok(())
    }

    /// Bytes held in live files, and the number of live inodes (for statfs).
    pub fn usage(&self) -> (u64, u64) {
        let bytes = self
            .live
            .values()
            .map(|i| match &i.node.body {
                Body::File(c) => c.stored(),
                Body::Dir(_) => 0,
            })
            .sum();
        (bytes, self.live.len() as u64)
    }

    /// The power cut: `live` becomes what `synced` holds (plus, with `Tear::Sectors`, a torn
    /// prefix of each surviving file's first unsynced write), and that is then the synced state.
    pub fn cut(&mut self, tear: Tear, cut_number: u64) -> Reverted {
        let mut rebuilt: HashMap<Ino, LiveInode> = HashMap::new();
        // A directory named by two synced entries (moved, both sides synced at different times)
        // keeps the first name in walk order: a tree has one parent per directory.
        let mut claimed_dirs = BTreeSet::from([ROOT]);
        let mut work = vec![(ROOT, ROOT)];
        // Walk the synced tree from the root; an inode no synced entry reaches is gone.
        while let Some((ino, parent)) = work.pop() {
            let Some(synced) = self.synced.get(&ino) else { continue };
            let mut node = synced.node.clone();
            if let Body::Dir(dir) = &mut node.body {
                dir.parent = parent;
                dir.entries.retain(|_, child| match self.synced.get(child).map(|s| &s.node.body) {
                    None => false,
                    Some(Body::Dir(_)) => claimed_dirs.insert(*child),
                    Some(Body::File(_)) => true,
                });
                work.extend(dir.entries.values().rev().map(|&child| (child, ino)));
            }
            match rebuilt.get_mut(&ino) {
                Some(existing) => existing.links += 1,
                None => {
                    rebuilt.insert(ino, LiveInode { node, links: 1, opens: 0, dirty: Dirty::default() });
                }
            }
        }

        let mut report = Reverted::default();
        for (&ino, old) in &self.live {
            let Body::File(old_content) = &old.node.body else { continue };
            let Some(new) = rebuilt.get_mut(&ino) else {
                report.files += 1;
                report.bytes += old_content.len();
                continue;
            };
            if !old.dirty.changed {
                continue;
            }
            report.files += 1;
            let mut kept = 0;
            if let (Tear::Sectors { seed }, Some((offset, len)), Body::File(content)) =
                (tear, old.dirty.first_write, &mut new.node.body)
            {
                kept = torn_length(seed, ino, cut_number, len);
                let bytes = old_content.read(offset, kept);
                kept = bytes.len() as u64;
                if kept > 0 {
                    content.write(offset, &bytes);
                }
            }
            report.bytes += old.dirty.written.saturating_sub(kept);
        }
        report.entries = self.changed_entries(&rebuilt);

        self.synced = rebuilt
            .iter()
            .map(|(&ino, i)| (ino, SyncedInode { node: i.node.clone(), links: i.links }))
            .collect();
        self.live = rebuilt;
        report
    }

    /// Directory entries (name → inode) that differ between `self.live` and `other`.
    fn changed_entries(&self, other: &HashMap<Ino, LiveInode>) -> u64 {
        let entries = |map: &HashMap<Ino, LiveInode>, ino: Ino| -> BTreeMap<OsString, Ino> {
            match map.get(&ino).map(|i| &i.node.body) {
                Some(Body::Dir(d)) => d.entries.clone(),
                _ => BTreeMap::new(),
            }
        };
        let dirs: BTreeSet<Ino> = self.live.keys().chain(other.keys()).copied().collect();
        let mut changed = 0;
        for dir in dirs {
            let (before, after) = (entries(&self.live, dir), entries(other, dir));
            let names: BTreeSet<&OsString> = before.keys().chain(after.keys()).collect();
            changed += names.into_iter().filter(|n| before.get(*n) != after.get(*n)).count() as u64;
        }
        changed
    }
}

/// How many bytes of an unsynced write of `len` bytes a torn cut keeps: a seeded-random whole
/// number of 512-byte sectors, from none up to all but the last (partial or whole) sector, so
/// always strictly less than `len`. Depends only on (seed, inode, cut number, len).
pub fn torn_length(seed: u64, ino: Ino, cut_number: u64, len: u64) -> u64 {
    let sectors = len.div_ceil(SECTOR);
    if sectors == 0 {
        return 0;
    }
    let mut state = seed ^ ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ cut_number.rotate_left(32);
    let kept_sectors = splitmix64(&mut state) % sectors;
    kept_sectors * SECTOR
}

/// SplitMix64: a tiny, well-mixed deterministic generator (no dependency for one random number).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        Tree::new(0, 0, 0o755)
    }

    fn file(t: &mut Tree, parent: Ino, name: &str, data: &[u8]) -> Ino {
        let ino = t.create(parent, name.as_ref(), Kind::File, 0o644, 0, 0).unwrap();
        t.write(ino, 0, data).unwrap();
        ino
    }

    fn dir(t: &mut Tree, parent: Ino, name: &str) -> Ino {
        t.create(parent, name.as_ref(), Kind::Dir, 0o755, 0, 0).unwrap()
    }

    fn read(t: &Tree, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for name in path {
            ino = t.lookup(ino, name.as_ref()).ok()?;
        }
        t.read(ino, 0, u64::MAX).ok()
    }

    fn names(t: &Tree, dir: Ino) -> Vec<String> {
        t.list(dir).unwrap().into_iter().skip(2).map(|(_, _, n)| n.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn content_reads_and_writes_across_chunks_with_sparse_zeros() {
        let mut c = Content::default();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        c.write(100_000, &data);
        assert_eq!(c.len(), 300_000);
        assert_eq!(c.read(0, 100_000), vec![0; 100_000]);
        assert_eq!(c.read(100_000, 200_000), data);
        assert_eq!(c.read(299_990, 100).len(), 10, "short at the end");
        assert!(c.read(400_000, 10).is_empty());
        assert!(c.chunks[0].is_none(), "the hole holds nothing");
    }

    #[test]
    fn content_truncated_then_extended_reads_zeros_past_the_cut() {
        let mut c = Content::default();
        c.write(0, &[9; 70_000]);
        c.set_len(65_540);
        c.set_len(140_000);
        assert_eq!(c.read(0, 65_540), vec![9; 65_540]);
        assert_eq!(c.read(65_540, 100_000), vec![0; 74_460]);
    }

    #[test]
    fn a_synced_copy_is_not_changed_by_later_writes() {
        let mut c = Content::default();
        c.write(0, b"hello");
        let synced = c.clone();
        c.write(0, b"J");
        assert_eq!(synced.read(0, 5), b"hello");
        assert_eq!(c.read(0, 5), b"Jello");
    }

    #[test]
    fn an_unsynced_write_reverts_and_a_synced_one_stays() {
        let mut t = tree();
        let f = file(&mut t, ROOT, "f", b"one");
        t.fsync(f).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.write(f, 3, b" two").unwrap();
        let report = t.cut(Tear::None, 1);
        assert_eq!(read(&t, &["f"]).unwrap(), b"one");
        assert_eq!(report, Reverted { files: 1, bytes: 4, entries: 0 });

        t.write(f, 3, b" three").unwrap();
        t.fsync(f).unwrap();
        assert_eq!(t.cut(Tear::None, 2), Reverted::default());
        assert_eq!(read(&t, &["f"]).unwrap(), b"one three");
    }

    #[test]
    fn an_fsynced_file_in_an_unsynced_directory_is_gone() {
        let mut t = tree();
        let f = file(&mut t, ROOT, "f", b"data");
        t.fsync(f).unwrap();
        let report = t.cut(Tear::None, 1);
        assert!(read(&t, &["f"]).is_none());
        assert_eq!(report, Reverted { files: 1, bytes: 4, entries: 1 });
        assert!(t.synced.len() == 1 && t.live.len() == 1, "only the root is left");
    }

    #[test]
    fn a_synced_entry_to_an_unsynced_inode_brings_it_back_empty() {
        let mut t = tree();
        let d = dir(&mut t, ROOT, "d");
        file(&mut t, d, "f", b"data");
        t.fsync_dir(ROOT).unwrap();
        t.cut(Tear::None, 1);
        assert_eq!(names(&t, ROOT), ["d"]);
        assert!(names(&t, d).is_empty(), "d's own entries were never synced");

        let f = file(&mut t, d, "f", b"data");
        t.fsync_dir(d).unwrap();
        t.cut(Tear::None, 2);
        assert_eq!(read(&t, &["d", "f"]).unwrap(), b"");
        assert_eq!(t.attr(f).unwrap().size, 0);
    }

    #[test]
    fn an_unsynced_rename_over_a_file_reverts_both_names() {
        let mut t = tree();
        let old = file(&mut t, ROOT, "state", b"old");
        let new = file(&mut t, ROOT, "tmp", b"new");
        t.fsync(old).unwrap();
        t.fsync(new).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.rename(ROOT, "tmp".as_ref(), ROOT, "state".as_ref(), false).unwrap();
        assert!(t.live.contains_key(&old) || t.synced.contains_key(&old));
        let report = t.cut(Tear::None, 1);
        assert_eq!(read(&t, &["state"]).unwrap(), b"old");
        assert_eq!(read(&t, &["tmp"]).unwrap(), b"new");
        assert_eq!(report.entries, 2);
    }

    #[test]
    fn a_synced_rename_drops_the_replaced_inode_everywhere() {
        let mut t = tree();
        let old = file(&mut t, ROOT, "state", b"old");
        t.fsync(old).unwrap();
        let new = file(&mut t, ROOT, "tmp", b"new");
        t.fsync(new).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.rename(ROOT, "tmp".as_ref(), ROOT, "state".as_ref(), false).unwrap();
        t.fsync_dir(ROOT).unwrap();
        assert!(!t.live.contains_key(&old) && !t.synced.contains_key(&old), "nothing keeps it");
        t.cut(Tear::None, 1);
        assert_eq!(names(&t, ROOT), ["state"]);
        assert_eq!(read(&t, &["state"]).unwrap(), b"new");
    }

    #[test]
    fn rename_refuses_what_rename_2_refuses() {
        let mut t = tree();
        let d = dir(&mut t, ROOT, "d");
        file(&mut t, d, "inside", b"");
        file(&mut t, ROOT, "f", b"");
        dir(&mut t, ROOT, "e");
        assert_eq!(t.rename(ROOT, "f".as_ref(), ROOT, "d".as_ref(), false), Err(Error::IsDir));
        assert_eq!(t.rename(ROOT, "e".as_ref(), ROOT, "f".as_ref(), false), Err(Error::NotDir));
        assert_eq!(t.rename(ROOT, "e".as_ref(), ROOT, "d".as_ref(), false), Err(Error::NotEmpty));
        assert_eq!(t.rename(ROOT, "f".as_ref(), ROOT, "e".as_ref(), true), Err(Error::Exists));
        assert_eq!(t.rename(ROOT, "x".as_ref(), ROOT, "y".as_ref(), false), Err(Error::NotFound));
        t.rename(ROOT, "e".as_ref(), d, "e".as_ref(), false).unwrap();
        assert_eq!(t.list(t.lookup(d, "e".as_ref()).unwrap()).unwrap()[1].0, d, "`..` follows");
        assert_eq!(t.remove(ROOT, "d".as_ref(), Kind::Dir), Err(Error::NotEmpty));
        assert_eq!(t.remove(ROOT, "d".as_ref(), Kind::File), Err(Error::IsDir));
    }

    #[test]
    fn a_directory_synced_under_two_names_keeps_one_parent() {
        let mut t = tree();
        let a = dir(&mut t, ROOT, "a");
        let b = dir(&mut t, ROOT, "b");
        let sub = dir(&mut t, a, "sub");
        t.fsync_dir(ROOT).unwrap();
        t.fsync_dir(a).unwrap();
        t.rename(a, "sub".as_ref(), b, "sub".as_ref(), false).unwrap();
        t.fsync_dir(b).unwrap();
        t.cut(Tear::None, 1);
        assert_eq!(names(&t, a), ["sub"]);
        assert!(names(&t, b).is_empty());
        assert_eq!(t.list(sub).unwrap()[1].0, a);
        assert_eq!(t.attr(ROOT).unwrap().nlink, 4);
    }

    #[test]
    fn a_file_synced_under_both_names_of_a_cross_directory_rename_has_two_links() {
        let mut t = tree();
        let a = dir(&mut t, ROOT, "a");
        let b = dir(&mut t, ROOT, "b");
        let f = file(&mut t, a, "f", b"f");
        t.fsync(f).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.fsync_dir(a).unwrap();
        t.rename(a, "f".as_ref(), b, "f".as_ref(), false).unwrap();
        t.fsync_dir(b).unwrap();
        t.cut(Tear::None, 1);
        assert_eq!(read(&t, &["a", "f"]).unwrap(), b"f");
        assert_eq!(read(&t, &["b", "f"]).unwrap(), b"f");
        assert_eq!(t.attr(f).unwrap().nlink, 2);
    }

    #[test]
    fn an_unlinked_open_file_stays_readable_until_released() {
        let mut t = tree();
        let f = file(&mut t, ROOT, "f", b"still here");
        t.open(f).unwrap();
        t.remove(ROOT, "f".as_ref(), Kind::File).unwrap();
        assert_eq!(t.read(f, 0, 100).unwrap(), b"still here");
        t.release(f);
        assert_eq!(t.read(f, 0, 100), Err(Error::NotFound));
    }

    #[test]
    fn an_unsynced_truncate_reverts() {
        let mut t = tree();
        let f = file(&mut t, ROOT, "f", b"0123456789");
        t.fsync(f).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.set_size(f, 2).unwrap();
        t.allocate(f, 0, 100, false).unwrap();
        assert_eq!(t.attr(f).unwrap().size, 100);
        let report = t.cut(Tear::None, 1);
        assert_eq!(read(&t, &["f"]).unwrap(), b"0123456789");
        assert_eq!(report.files, 1);
    }

    #[test]
    fn a_torn_cut_keeps_whole_sectors_of_the_first_unsynced_write_only() {
        let mut t = tree();
        let f = file(&mut t, ROOT, "f", &[1; 100]);
        t.fsync(f).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.write(f, 100, &[2; 5000]).unwrap();
        t.write(f, 5100, &[3; 5000]).unwrap();
        let kept = torn_length(42, f, 1, 5000);
        let report = t.cut(Tear::Sectors { seed: 42 }, 1);
        let content = read(&t, &["f"]).unwrap();
        assert_eq!(content.len() as u64, 100 + kept);
        assert!(content[..100].iter().all(|&b| b == 1));
        assert!(content[100..].iter().all(|&b| b == 2));
        assert_eq!(report.bytes, 10_000 - kept);
        // The torn bytes are on disk now: a second cut keeps them.
        assert_eq!(t.cut(Tear::Sectors { seed: 42 }, 2), Reverted::default());
    }

    #[test]
    fn torn_lengths_are_strict_whole_sector_prefixes_and_depend_on_the_seed() {
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            for len in [1, 511, 512, 513, 4096, 70_000] {
                let kept = torn_length(seed, 5, 1, len);
                assert!(kept < len && kept % SECTOR == 0, "seed {seed} len {len}: {kept}");
                assert_eq!(kept, torn_length(seed, 5, 1, len));
            }
            seen.insert(torn_length(seed, 5, 1, 70_000));
        }
        assert!(seen.len() > 50, "{} distinct tears", seen.len());
    }

    #[test]
    fn synced_inodes_no_entry_names_are_forgotten() {
        let mut t = tree();
        let d = dir(&mut t, ROOT, "d");
        let f = file(&mut t, d, "f", b"x");
        t.fsync(f).unwrap();
        t.fsync_dir(d).unwrap();
        t.fsync_dir(ROOT).unwrap();
        t.remove(d, "f".as_ref(), Kind::File).unwrap();
        t.remove(ROOT, "d".as_ref(), Kind::Dir).unwrap();
        assert!(t.synced.contains_key(&f), "a cut would still bring it back");
        t.fsync_dir(ROOT).unwrap();
        assert_eq!((t.live.len(), t.synced.len()), (1, 1), "d and, through it, f are forgotten");
    }
}
