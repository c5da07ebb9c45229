//! The POSIX filesystem of one mounted volume ([`VolumeFs`]): inodes, directories, file data,
//! xattrs and open handles, on top of the metadata index and the chunk store. The FUSE adapter
//! in `volfs-mountd` calls one method per kernel request; every method returns [`Result`] and
//! errors map to errno with [`crate::Error::errno`].
//!
//! Concurrency: there is no global lock on the read/write path. Each inode has its own mutex
//! ([`Node`]); namespace changes (create, unlink, rename, ...) take the volume's namespace
//! mutex so that they see a consistent directory tree. Metadata changes are written through to
//! the index in one atomic batch per operation. File data is buffered per inode (`dirty`) and
//! turned into chunks on flush, fsync, release or when the buffer grows large (see [`data`]).
//!
//! Layers: the volume is a [`Stack`] of trees (see [`crate::layer`]). Reads look through the
//! stack; every change goes to the top. An inode that lives in a lower tree is copied up
//! (record, extents, xattrs; no file data) before its first change ([`VolumeFs::own`]).
//! Every method that writes to the index holds the **freeze gate** for reading; a snapshot
//! ([`VolumeFs::freeze`]) takes it for writing, commits all buffered data, and swaps in a new
//! top, so a snapshot holds every write acknowledged before it and none after.
//!
//! Permission checks are the kernel's (`default_permissions`); this module implements the
//! parts the kernel leaves to the filesystem (setgid inheritance, timestamps, link counts).
pub mod bufpool;
mod data;
mod namespace;
mod recovery;
mod xattr;

pub use namespace::{NewNode, RENAME_EXCHANGE, RENAME_NOREPLACE};
pub use xattr::XattrReply;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::db::{Batch, Cf, Engine};
use crate::error::{posix, Error, Result};
use crate::ids::{TreeId, VolumeId, VolumeName};
use crate::layer::{Lower, SnapshotRecord, Stack};
use crate::meta::{self, Extent, InodeRecord, Kind, Ts, VolumeRecord, INODE_VERSION};
use crate::store::Store;
use crate::volume::ROOT_INO;
use crate::writelog::{Held, WriteLog};

pub use data::Whence;
pub use recovery::Replayed;

/// Inode numbers are handed out from ranges of this size; the range's end is persisted first,
/// so numbers are never reused, also across restarts.
const INO_BATCH: u64 = 1024;

/// Attributes as the kernel sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub btime: SystemTime,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

/// Who makes a request.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// What `setattr` changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<SystemTime>,
    /// Drop set-user-ID, set-group-ID and file capabilities (a truncate or chown by an
    /// unprivileged caller; see `kill_privs_locked`). An explicit `mode` wins.
    pub kill_privs: bool,
}

/// One directory entry as listed by `readdir`.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

enum Handle {
    File {
        ino: u64,
    },
    Dir {
        ino: u64,
        /// The listing, taken by each read from offset 0 (the first read, and rewinddir);
        /// `None` until then.
        entries: Option<Arc<Vec<DirEntry>>>,
    },
}

/// In-memory state of one inode.
struct NodeState {
    rec: InodeRecord,
    /// The tree holding the inode's record, extents and xattrs (the top once copied up).
    tree: TreeId,
    /// Committed extents by file offset, loaded on first data access.
    extents: Option<BTreeMap<u64, Extent>>,
    /// Written but not yet chunked data: non-overlapping ranges by file offset.
    dirty: BTreeMap<u64, Vec<u8>>,
    dirty_bytes: u64,
    /// Quota reserved by dirty data that covers holes or grows the file.
    reserved: i64,
    /// The record changed in memory (size, mtime from writes) and is not yet in the index.
    rec_dirty: bool,
    /// The inode's hold on the write log: set while it has logged, uncommitted writes.
    held: Option<Held>,
    lookups: u64,
    opens: u32,
    /// Removed from the inode table; whoever holds this node must look the inode up again.
    evicted: bool,
    /// Known to have no extended attributes: made by this process and none set since.
    /// `getxattr`, `listxattr` and the kill-privileges check answer from memory, and a
    /// delete skips the xattr scan (a new file costs two `getxattr` of `security.capability`).
    no_xattrs: bool,
}

impl NodeState {
    fn new(
        rec: InodeRecord,
        tree: TreeId,
        extents: Option<BTreeMap<u64, Extent>>,
        no_xattrs: bool,
    ) -> Self {
        NodeState {
            rec,
            tree,
            extents,
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            reserved: 0,
            rec_dirty: false,
            held: None,
            lookups: 0,
            opens: 0,
            evicted: false,
            no_xattrs,
        }
    }
}

type Node = Mutex<NodeState>;
type Gate<'a> = parking_lot::RwLockReadGuard<'a, ()>;
type NodeGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, NodeState>;

/// A loaded node with nothing to commit: no buffered data, a clean record, no write-log
/// records held.
fn quiet(st: &NodeState) -> bool {
    !st.evicted && st.dirty.is_empty() && !st.rec_dirty && st.held.is_none()
}

#[derive(Default)]
pub struct VolumeStats {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

pub struct VolumeFs {
    pub name: VolumeName,
    id: VolumeId,
    /// The trees; the top changes only under the write side of `gate`.
    stack: parking_lot::RwLock<Arc<Stack>>,
    /// The freeze gate: writers to the index hold it shared, `freeze` exclusively.
    gate: parking_lot::RwLock<()>,
    store: Arc<Store>,
    engine: Arc<dyn Engine>,
    read_only: bool,
    quota: Option<u64>,
    /// Bytes covered by committed extents (mirrors the persisted counter).
    used: AtomicI64,
    /// Quota reserved by dirty data not yet committed.
    reserved: AtomicI64,
    nodes: DashMap<u64, Arc<Node>>,
    ns: Mutex<()>,
    handles: DashMap<u64, Handle>,
    next_fh: AtomicU64,
    ino_alloc: Mutex<(u64, u64)>,
    /// Dirty bytes buffered across all inodes of this volume.
    dirty_total: AtomicU64,
    pub stats: VolumeStats,
    shut: AtomicBool,
    /// Taken over from a previous daemon process whose kernel connection lives on: the kernel
    /// may hold handles and open files this process never saw. Unlinked files are then never
    /// freed at once (they stay orphans until the volume is next loaded afresh), and unknown
    /// handles are rebuilt from the inode the kernel names.
    adopted: bool,
    /// The kernel maintains mtime/ctime of written files (writeback cache mode).
    kernel_times: AtomicBool,
    /// Where acknowledged, uncommitted writes are logged (under a supervisor; see
    /// [`crate::writelog`]).
    log: OnceLock<WriteLog>,
    /// Changes are refused for the reason in `fence_why` (see [`VolumeFs::set_fenced`]).
    fenced: AtomicBool,
    fence_why: Mutex<Option<String>>,
}

impl VolumeFs {
    /// Opens a volume's filesystem and cleans up inodes that were unlinked while open when
    /// the daemon last stopped.
    pub fn load(store: Arc<Store>, rec: &VolumeRecord) -> Result<Arc<VolumeFs>> {
        let stack = Stack::load(&*store.engine, rec.top, &rec.lower)?;
        Self::open_stack(store, rec, stack, rec.read_only, &rec.name, false)
    }

    /// Opens a volume whose kernel connection outlived the daemon process that served it
    /// (see `adopted`): orphans are kept, since the kernel may still have them open.
    pub fn load_adopted(store: Arc<Store>, rec: &VolumeRecord) -> Result<Arc<VolumeFs>> {
        let stack = Stack::load(&*store.engine, rec.top, &rec.lower)?;
        Self::open_stack(store, rec, stack, rec.read_only, &rec.name, true)
    }

    /// Opens a read-only view of a snapshot of volume `rec`.
    pub fn load_snapshot(
        store: Arc<Store>,
        rec: &VolumeRecord,
        snap: &SnapshotRecord,
    ) -> Result<Arc<VolumeFs>> {
        let stack = Stack::load(&*store.engine, snap.tree, &snap.lower)?;
        Self::open_stack(store, rec, stack, true, &rec.name, false)
    }

    fn open_stack(
        store: Arc<Store>,
        rec: &VolumeRecord,
        stack: Stack,
        read_only: bool,
        name: &str,
        adopted: bool,
    ) -> Result<Arc<VolumeFs>> {
        let engine = store.engine.clone();
        let hw = match engine.get(Cf::Meta, &meta::ino_hw_key(stack.top))? {
            Some(v) => u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| Error::Encoding("inode high-water mark".into()))?,
            ),
            None => ROOT_INO + 1,
        };
        let used = engine.counter(Cf::Counters, &meta::used_key(rec.id))?;
        let fs = Arc::new(VolumeFs {
            name: VolumeName::new(name)?,
            id: rec.id,
            stack: parking_lot::RwLock::new(Arc::new(stack)),
            gate: parking_lot::RwLock::new(()),
            store: store.clone(),
            engine,
            read_only,
            quota: rec.size,
            used: AtomicI64::new(used),
            reserved: AtomicI64::new(0),
            nodes: DashMap::new(),
            ns: Mutex::new(()),
            handles: DashMap::new(),
            // Handle numbers start at the clock in nanoseconds, so that a process that takes
            // over a live connection never hands out a number the kernel still holds from the
            // process before it (which counted up from its own start time).
            next_fh: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    .max(1),
            ),
            ino_alloc: Mutex::new((hw, hw)),
            dirty_total: AtomicU64::new(0),
            stats: VolumeStats::default(),
            shut: AtomicBool::new(false),
            adopted,
            kernel_times: AtomicBool::new(false),
            log: OnceLock::new(),
            fenced: AtomicBool::new(false),
            fence_why: Mutex::new(None),
        });
        if !read_only && !adopted {
            fs.clean_orphans()?;
        }
        Ok(fs)
    }

    /// Tells the filesystem that the kernel keeps file times itself (FUSE writeback cache).
    pub fn set_kernel_times(&self, on: bool) {
        self.kernel_times.store(on, Ordering::Relaxed);
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn open_handles(&self) -> u64 {
        self.handles.len() as u64
    }

    /// Refuses changes from now on (`Some(why)`), or accepts them again (`None`): a host that
    /// is no longer sure it owns the volume (its cluster lease may have lapsed) stops writing
    /// before another host can take over. Writes acknowledged before stay and are committed.
    pub fn set_fenced(&self, why: Option<String>) {
        self.fenced.store(why.is_some(), Ordering::SeqCst);
        *self.fence_why.lock() = why;
    }

    /// Why the volume refuses changes at the moment, if it is fenced.
    pub fn fenced(&self) -> Option<String> {
        if !self.fenced.load(Ordering::SeqCst) {
            return None;
        }
        self.fence_why.lock().clone()
    }

    /// `EROFS` for a read-only volume, or one fenced off (see [`VolumeFs::set_fenced`]).
    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(format!("volume {}", self.name)));
        }
        if self.fenced.load(Ordering::SeqCst) {
            let why = self.fence_why.lock().clone().unwrap_or_default();
            return Err(Error::ReadOnly(format!("volume {} ({why})", self.name)));
        }
        Ok(())
    }

    /// Checks that the volume is writable and enters the freeze gate. Every method that
    /// writes to the index holds the returned guard until its batch is written.
    fn writer(&self) -> Result<Gate<'_>> {
        self.check_writable()?;
        Ok(self.gate.read_recursive())
    }

    /// Enters the freeze gate without the read-only check (commits of buffered data, which a
    /// read-only volume never has).
    fn gate(&self) -> Gate<'_> {
        self.gate.read_recursive()
    }

    /// The writable top tree.
    fn tree(&self) -> TreeId {
        self.stack.read().top
    }

    /// The current stack of trees.
    pub fn stack(&self) -> Arc<Stack> {
        self.stack.read().clone()
    }

    fn ikey(&self, ino: u64) -> Vec<u8> {
        meta::inode_key(self.tree(), ino)
    }

    /// Makes the top tree hold `ino`: copies its record, extents and xattrs up from the lower
    /// tree that holds them (chunks are shared, not copied). Written at once, on its own:
    /// the copy changes nothing visible. The caller holds the freeze gate.
    fn own(&self, ino: u64, st: &mut NodeState) -> Result<()> {
        let top = self.tree();
        if st.tree == top {
            return Ok(());
        }
        let from = st.tree;
        let mut b = Batch::new();
        let ext = self.extents(ino, st)?;
        for (off, e) in ext.iter() {
            b.put(
                Cf::Extents,
                meta::extent_key(top, ino, *off),
                meta::encode(meta::EXTENT_VERSION, e),
            );
        }
        let p = meta::inode_key(from, ino);
        self.engine
            .scan(Cf::Xattrs, &p, &crate::db::prefix_end(&p), &mut |k, v| {
                b.put(Cf::Xattrs, meta::xattr_key(top, ino, &k[16..]), v.to_vec());
                Ok(true)
            })?;
        b.put(
            Cf::Inodes,
            meta::inode_key(top, ino),
            meta::encode(INODE_VERSION, &st.rec),
        );
        self.engine.write(b, false)?;
        st.tree = top;
        Ok(())
    }

    /// Locks `ino` for a change: the node, copied up into the top tree.
    fn lock_own(&self, ino: u64) -> Result<NodeGuard> {
        let mut st = self.lock(ino)?;
        self.own(ino, &mut st)?;
        Ok(st)
    }

    /// Freezes the top tree: commits every buffered write, then, in one synced batch built by
    /// `build(old_top, ino_hw, used_bytes)`, records the freeze, and switches to `new_top`
    /// (empty) with the old top as the topmost lower tree. Writes wait meanwhile; those
    /// acknowledged before are in the frozen tree, later ones land in the new top. The kernel's
    /// dirty pages must have been written back first (syncfs on the mount).
    pub fn freeze(
        &self,
        new_top: TreeId,
        build: impl FnOnce(TreeId, u64, i64) -> Result<Batch>,
    ) -> Result<()> {
        let _g = self.gate.write();
        self.commit_all()?;
        let old = self.tree();
        let hw = {
            let a = self.ino_alloc.lock();
            a.0.max(a.1)
        };
        let b = build(old, hw, self.used.load(Ordering::Relaxed))?;
        self.store.chunks.sync()?;
        self.engine.write(b, true)?;
        let mut s = self.stack.write();
        let mut lower = vec![Lower {
            tree: old,
            ino_hw: hw,
        }];
        lower.extend(s.lower.iter().copied());
        *s = Arc::new(Stack {
            top: new_top,
            lower,
        });
        Ok(())
    }

    /// Returns the node of `ino`, loading it from the index if needed.
    /// The node of `ino` if it is in memory (never loads it).
    fn loaded(&self, ino: u64) -> Option<Arc<Node>> {
        self.nodes.get(&ino).map(|n| n.clone())
    }

    fn node(&self, ino: u64) -> Result<Arc<Node>> {
        if let Some(n) = self.loaded(ino) {
            return Ok(n);
        }
        let (tree, rec) = self
            .stack()
            .inode(&*self.engine, ino)?
            .ok_or(Error::Posix(libc::ENOENT))?;
        let node = Arc::new(Mutex::new(NodeState::new(rec, tree, None, false)));
        Ok(self.nodes.entry(ino).or_insert(node).clone())
    }

    /// Puts in the table the node of an inode just made in the top tree, whose record `rec`
    /// the caller wrote: no extents and no xattrs yet, so neither is looked up in the index.
    /// A reader that found the new entry first (readdirplus) may have loaded the node
    /// already: that one stays.
    fn new_node(&self, ino: u64, rec: InodeRecord) {
        let tree = self.tree();
        self.nodes.entry(ino).or_insert_with(|| {
            Arc::new(Mutex::new(NodeState::new(
                rec,
                tree,
                Some(BTreeMap::new()),
                true,
            )))
        });
    }

    /// Locks the state of `ino`, retrying if the node was evicted meanwhile.
    fn lock(&self, ino: u64) -> Result<NodeGuard> {
        loop {
            let g = self.node(ino)?.lock_arc();
            if !g.evicted {
                return Ok(g);
            }
        }
    }

    fn persist_rec(&self, b: &mut Batch, ino: u64, rec: &InodeRecord) {
        b.put(Cf::Inodes, self.ikey(ino), meta::encode(INODE_VERSION, rec));
    }

    fn alloc_ino(&self, b: &mut Batch) -> u64 {
        let mut a = self.ino_alloc.lock();
        if a.0 >= a.1 {
            a.1 = a.0 + INO_BATCH;
            b.put(
                Cf::Meta,
                meta::ino_hw_key(self.tree()),
                a.1.to_le_bytes().to_vec(),
            );
        }
        let ino = a.0;
        a.0 += 1;
        ino
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let st = self.lock(ino)?;
        Ok(attr_of(ino, &st.rec))
    }

    /// Counts a kernel lookup reference (lookup, create, readdirplus entries).
    fn remember(&self, ino: u64, st: &mut NodeState) {
        let _ = ino;
        st.lookups += 1;
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.nodes.get(&ino).map(|n| n.clone()) else {
            return;
        };
        let mut st = node.lock();
        st.lookups = st.lookups.saturating_sub(n);
        self.maybe_evict(ino, &mut st);
    }

    /// No open file refers to the inode (never certain on an adopted connection).
    fn unused(&self, st: &NodeState) -> bool {
        st.opens == 0 && !self.adopted
    }

    fn maybe_evict(&self, ino: u64, st: &mut NodeState) {
        if st.lookups == 0
            && st.opens == 0
            && st.dirty.is_empty()
            && !st.rec_dirty
            && st.held.is_none()
            && ino != ROOT_INO
        {
            st.evicted = true;
            self.nodes.remove(&ino);
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let child = self
            .dirent(parent, name)?
            .ok_or(Error::Posix(libc::ENOENT))?;
        let mut st = self.lock(child.ino)?;
        self.remember(child.ino, &mut st);
        Ok(attr_of(child.ino, &st.rec))
    }

    pub fn setattr(&self, ino: u64, s: &SetAttr) -> Result<Attr> {
        let _w = self.writer()?;
        let mut st = self.lock_own(ino)?;
        let before = st.rec.clone();
        let now = Ts::now();
        let mut b = Batch::new();
        if let Some(size) = s.size {
            match st.rec.kind {
                Kind::Dir => return posix(libc::EISDIR),
                Kind::File => {}
                _ => return posix(libc::EINVAL),
            }
            self.truncate_locked(ino, &mut st, size, &mut b)?;
            st.rec.mtime = now;
        }
        if s.kill_privs && st.rec.kind != Kind::Dir {
            self.kill_privs_locked(ino, &mut st, &mut b)?;
        }
        if let Some(mode) = s.mode {
            st.rec.perm = mode & 0o7777;
        }
        if let Some(uid) = s.uid {
            st.rec.uid = uid;
        }
        if let Some(gid) = s.gid {
            st.rec.gid = gid;
        }
        match s.atime {
            Some(SetTime::Now) => st.rec.atime = now,
            Some(SetTime::At(t)) => st.rec.atime = t.into(),
            None => {}
        }
        match s.mtime {
            Some(SetTime::Now) => st.rec.mtime = now,
            Some(SetTime::At(t)) => st.rec.mtime = t.into(),
            None => {}
        }
        st.rec.ctime = s.ctime.map(Ts::from).unwrap_or(now);
        if b.is_empty() && st.rec == before {
            // Nothing changes: the kernel handing back the times it has (with the writeback
            // cache it sends them before it drops an inode, e.g. at unlink). No index write.
            return Ok(attr_of(ino, &st.rec));
        }
        self.persist_rec(&mut b, ino, &st.rec);
        self.engine.write(b, false)?;
        st.rec_dirty = false;
        Ok(attr_of(ino, &st.rec))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.lock(ino)?;
        if st.rec.kind != Kind::Symlink {
            return posix(libc::EINVAL);
        }
        Ok(st.rec.target.clone())
    }

    /// Opens a file; returns the handle number.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY {
            self.check_writable()?;
        }
        let mut st = self.lock(ino)?;
        if st.rec.kind == Kind::Dir && acc != libc::O_RDONLY {
            return posix(libc::EISDIR);
        }
        st.opens += 1;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, Handle::File { ino });
        Ok(fh)
    }

    /// Closes a handle of inode `ino`: commits buffered data, and frees an unlinked inode on
    /// its last close. A handle this process never issued is one the kernel opened with the
    /// process before (see `adopted`).
    pub fn release(&self, fh: u64, ino: u64) -> Result<()> {
        let ino = self.take_handle(fh, ino)?;
        self.release_node(ino)
    }

    /// The first half of `release`: forgets the handle; returns its inode.
    pub fn take_handle(&self, fh: u64, ino: u64) -> Result<u64> {
        match self.handles.remove(&fh) {
            Some((_, Handle::File { ino })) => Ok(ino),
            Some((_, Handle::Dir { .. })) => posix(libc::EBADF),
            None if self.adopted => Ok(ino),
            None => posix(libc::EBADF),
        }
    }

    /// The close of an open of `ino` when it certainly needs no I/O: nothing buffered, the
    /// record clean, no write-log records held, and not the last open of an unlinked file.
    /// Never blocks: a node that is busy or not loaded, or a frozen volume, answers false and
    /// changes nothing (the caller then runs [`VolumeFs::release_node`] on an I/O thread).
    pub fn release_node_quick(&self, ino: u64) -> bool {
        let Some(_w) = self.gate.try_read_recursive() else {
            return false;
        };
        let Some(node) = self.loaded(ino) else {
            return false;
        };
        let Some(mut st) = node.try_lock_arc() else {
            return false;
        };
        if !quiet(&st) || (st.rec.nlink == 0 && st.opens <= 1) {
            return false;
        }
        st.opens = st.opens.saturating_sub(1);
        self.maybe_evict(ino, &mut st);
        true
    }

    /// Whether a `flush` of `ino` has nothing to do (see [`VolumeFs::release_node_quick`]);
    /// never blocks.
    pub fn flush_is_noop(&self, ino: u64) -> bool {
        let Some(node) = self.loaded(ino) else {
            return false;
        };
        let quiet = node.try_lock().is_some_and(|st| quiet(&st));
        quiet
    }

    /// The second half of `release`: commits what is buffered, deletes an unlinked file at
    /// its last close.
    pub fn release_node(&self, ino: u64) -> Result<()> {
        let _w = self.gate();
        let mut st = self.lock(ino)?;
        st.opens = st.opens.saturating_sub(1);
        let res = self.commit(ino, &mut st, data::Commit::All, false);
        if self.unused(&st) && st.rec.nlink == 0 {
            self.purge(ino, &mut st)?;
        }
        self.maybe_evict(ino, &mut st);
        res
    }

    /// Deletes an inode with no links and no opens, with its data.
    fn purge(&self, ino: u64, st: &mut NodeState) -> Result<()> {
        let mut b = Batch::new();
        self.purge_into(&mut b, ino, st)?;
        self.engine.write(b, false)?;
        self.used.fetch_sub(st.rec.alloc as i64, Ordering::Relaxed);
        st.rec.alloc = 0;
        st.extents = Some(BTreeMap::new());
        self.drop_dirty(ino, st);
        Ok(())
    }

    fn purge_into(&self, b: &mut Batch, ino: u64, st: &NodeState) -> Result<()> {
        self.delete_inode(b, ino);
        let top = self.tree();
        if st.tree == top {
            // Point deletes, not range tombstones: one range tombstone per unlink slows every
            // read.
            match &st.extents {
                Some(m) => {
                    for off in m.keys() {
                        b.delete(Cf::Extents, meta::extent_key(top, ino, *off));
                    }
                }
                None => self.delete_keys(b, Cf::Extents, &self.ikey(ino))?,
            }
            if !st.no_xattrs {
                self.delete_keys(b, Cf::Xattrs, &self.ikey(ino))?;
            }
        }
        b.delete(Cf::Orphans, self.ikey(ino));
        b.add(
            Cf::Counters,
            meta::used_key(self.id),
            -(st.rec.alloc as i64),
        );
        Ok(())
    }

    /// Deletes an inode record from the top, leaving a whiteout if a lower tree may hold it.
    fn delete_inode(&self, b: &mut Batch, ino: u64) {
        if self.stack().lower_may_have(ino) {
            b.put(Cf::Inodes, self.ikey(ino), Vec::new());
        } else {
            b.delete(Cf::Inodes, self.ikey(ino));
        }
    }

    /// Adds a delete for every key under `prefix`.
    fn delete_keys(&self, b: &mut Batch, cf: Cf, prefix: &[u8]) -> Result<()> {
        self.engine
            .scan(cf, prefix, &crate::db::prefix_end(prefix), &mut |k, _| {
                b.delete(cf, k.to_vec());
                Ok(true)
            })
    }

    fn clean_orphans(&self) -> Result<()> {
        let orphans = self
            .engine
            .scan_prefix(Cf::Orphans, &meta::tree_prefix(self.tree()))?;
        for (k, _) in orphans {
            let ino = meta::u64_at(&k, 8)?;
            match self.lock(ino) {
                Ok(mut st) if st.rec.nlink == 0 => {
                    self.purge(ino, &mut st)?;
                    st.evicted = true;
                    self.nodes.remove(&ino);
                }
                _ => {
                    let mut b = Batch::new();
                    b.delete(Cf::Orphans, k);
                    self.engine.write(b, false)?;
                }
            }
        }
        Ok(())
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let bsize = 4096u64;
        let (blocks, bfree) = match self.quota {
            Some(q) => {
                let used = (self.used_bytes()
                    + self.reserved.load(Ordering::Relaxed).max(0) as u64)
                    .min(q);
                (q / bsize, (q - used) / bsize)
            }
            None => {
                let (total, free) = disk_space(&self.store.data_dir);
                (total / bsize, free / bsize)
            }
        };
        Ok(StatFs {
            blocks,
            bfree,
            bavail: bfree,
            files: 1 << 40,
            ffree: (1 << 40) - self.nodes.len() as u64,
            bsize: bsize as u32,
            namelen: 255,
        })
    }

    /// The inodes the kernel holds references to (looked up and not yet forgotten).
    pub fn known_inodes(&self) -> Vec<u64> {
        self.nodes.iter().map(|e| *e.key()).collect()
    }

    /// Commits every file's buffered data (used before shutdown and snapshots).
    pub fn flush_all(&self) -> Result<()> {
        let _w = self.gate();
        self.commit_all()
    }

    /// `flush_all` for a caller that holds the freeze gate.
    fn commit_all(&self) -> Result<()> {
        let inos: Vec<u64> = self.nodes.iter().map(|e| *e.key()).collect();
        for ino in inos {
            if let Ok(mut st) = self.lock(ino) {
                self.commit(ino, &mut st, data::Commit::All, false)?;
            }
        }
        Ok(())
    }

    /// Flushes everything and makes it durable; called when the volume is unmounted.
    pub fn shutdown(&self) -> Result<()> {
        if self.shut.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.flush_all()?;
        self.store.sync()
    }
}

pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

pub fn attr_of(ino: u64, r: &InodeRecord) -> Attr {
    Attr {
        ino,
        size: r.size,
        blocks: r.alloc.div_ceil(512),
        atime: r.atime.into(),
        mtime: r.mtime.into(),
        ctime: r.ctime.into(),
        btime: r.btime.into(),
        kind: r.kind,
        perm: r.perm as u16,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
    }
}

/// Total and available bytes of the filesystem holding `path`.
pub fn disk_space(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into a zeroed struct we own; c is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return (0, 0);
        }
        (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)
    }
}

pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return posix(libc::EINVAL);
    }
    if name.len() > 255 {
        return posix(libc::ENAMETOOLONG);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;
    use crate::volume::{CreateOptions, Registry};

    fn volume() -> (tempfile::TempDir, Arc<VolumeFs>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap());
        let reg = Registry::new(store.clone());
        let rec = reg
            .create(
                &VolumeName::new("v").unwrap(),
                &CreateOptions::default(),
                None,
            )
            .unwrap();
        (dir, VolumeFs::load(store, &rec).unwrap())
    }

    /// Creates and opens (read-write) a regular file in the root, as root.
    fn new_file(fs: &VolumeFs, name: &[u8]) -> (Attr, Option<u64>) {
        let who = Caller {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let new = NewNode {
            kind: Kind::File,
            perm: 0o644,
            rdev: 0,
            target: &[],
        };
        fs.make(ROOT_INO, name, new, who, Some(libc::O_RDWR))
            .unwrap()
    }

    #[test]
    fn a_fenced_volume_refuses_changes_and_commits_what_it_had() {
        let (_dir, fs) = volume();
        let (a, fh) = new_file(&fs, b"f");
        fs.write(a.ino, 0, b"before", false).unwrap();
        fs.set_fenced(Some("lease lapsed".into()));
        let e = fs.write(a.ino, 6, b"after", false).unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
        assert!(e.to_string().contains("lease lapsed"), "{e}");
        assert_eq!(
            fs.open(a.ino, libc::O_WRONLY).unwrap_err().errno(),
            libc::EROFS
        );
        assert_eq!(fs.unlink(ROOT_INO, b"f").unwrap_err().errno(), libc::EROFS);
        // What was acknowledged before the fence is still committed and durable.
        fs.fsync(a.ino).unwrap();
        assert_eq!(fs.read(a.ino, 0, 100).unwrap(), b"before");
        assert_eq!(fs.fenced().as_deref(), Some("lease lapsed"));
        fs.set_fenced(None);
        fs.write(a.ino, 6, b"after", false).unwrap();
        assert_eq!(fs.read(a.ino, 0, 100).unwrap(), b"beforeafter");
        if let Some(fh) = fh {
            fs.release(fh, a.ino).unwrap();
        }
    }

    #[test]
    fn small_flushes_commit_inline_unless_they_would_read_or_are_large() {
        let (_dir, fs) = volume();
        let (a, _fh) = new_file(&fs, b"f");
        // A new small file: committed in place, nothing left buffered.
        fs.write(a.ino, 0, &[7u8; 10_000], false).unwrap();
        assert!(!fs.flush_is_noop(a.ino));
        fs.flush_inline(a.ino)
            .expect("small and new: inline")
            .unwrap();
        assert!(fs.flush_is_noop(a.ino));
        // Appending at the end reads nothing back.
        fs.write(a.ino, 10_000, b"tail", false).unwrap();
        fs.flush_inline(a.ino).expect("append: inline").unwrap();
        // More than INLINE_COMMIT_MAX buffered: left to an I/O thread.
        let big: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs.write(a.ino, 0, &big, false).unwrap();
        assert!(fs.flush_inline(a.ino).is_none());
        fs.flush(a.ino).unwrap();
        // A write inside a committed extent would read its chunk back: left too.
        fs.write(a.ino, 1_000_003, b"middle", false).unwrap();
        assert!(fs.flush_inline(a.ino).is_none());
        fs.flush(a.ino).unwrap();
        let mut want = big.clone();
        want[1_000_003..1_000_009].copy_from_slice(b"middle");
        assert_eq!(fs.read(a.ino, 0, want.len() as u32 + 10).unwrap(), want);
    }

    #[test]
    fn a_new_file_answers_xattrs_from_memory_until_one_is_set() {
        let (_dir, fs) = volume();
        let (a, fh) = new_file(&fs, b"x");
        let data = |r: Result<xattr::XattrReply>| match r.unwrap() {
            xattr::XattrReply::Data(v) => v,
            xattr::XattrReply::Size(n) => panic!("asked for data, got size {n}"),
        };
        let e = fs.getxattr(a.ino, b"user.k", 10).err().map(|e| e.errno());
        assert_eq!(e, Some(libc::ENODATA));
        assert_eq!(data(fs.listxattr(a.ino, 100)), b"");
        fs.setxattr(a.ino, b"user.k", b"v", 0).unwrap();
        assert_eq!(data(fs.getxattr(a.ino, b"user.k", 10)), b"v");
        assert_eq!(data(fs.listxattr(a.ino, 100)), b"user.k\0");
        fs.removexattr(a.ino, b"user.k").unwrap();
        let e = fs.getxattr(a.ino, b"user.k", 10).err().map(|e| e.errno());
        assert_eq!(e, Some(libc::ENODATA));
        // Deleting the file deletes what it had (the scan is skipped only while none was set).
        fs.setxattr(a.ino, b"user.z", b"1", 0).unwrap();
        let key = meta::xattr_key(fs.tree(), a.ino, b"user.z");
        assert!(fs.engine.get(Cf::Xattrs, &key).unwrap().is_some());
        fs.unlink(ROOT_INO, b"x").unwrap();
        if let Some(fh) = fh {
            fs.release(fh, a.ino).unwrap();
        }
        assert!(fs.engine.get(Cf::Xattrs, &key).unwrap().is_none());
    }
}
