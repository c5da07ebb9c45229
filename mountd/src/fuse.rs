//! The FUSE adapter: a thin layer from fuser's `Filesystem` trait to [`volfs::fs::VolumeFs`].
//!
//! Every operation calls one `VolumeFs` method that returns `Result`; [`errno`] is the only
//! place errors become errno values. Operations that hash, compress or sync (flush, release,
//! fsync) run on a small worker pool, so the dispatch threads keep reading requests; the reply
//! object travels with the job.
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use volfs::fs::{bufpool, Attr, Caller, NewNode, SetAttr, SetTime, VolumeFs, Whence, XattrReply};
use volfs::meta::Kind;
use volfs::Error;

use crate::metrics::{Op, VolumeMetrics};

/// Kernel-side caching and threading choices for one FUSE connection.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache entries and attributes. All changes to a volume go
    /// through its one connection, so long TTLs are safe.
    pub ttl: Duration,
    pub writeback_cache: bool,
    pub workers: usize,
    /// Filesystem type in /proc/mounts: `fuse.volfs`, or `fuse` when false.
    pub subtype: bool,
    /// Share (percent) of the kernel's dirty-page limit one connection may hold, with the
    /// FUSE-only strict limit lifted; `None` keeps the kernel's FUSE default (1%, strict),
    /// under which writers stall at ~50 MiB of dirty data.
    pub dirty_max_ratio: Option<u32>,
    /// A strict dirty limit in bytes for the connection instead (`fuse_dirty_max_mb`).
    pub dirty_max_bytes: Option<u64>,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            ttl: Duration::from_secs(10),
            writeback_cache: true,
            workers: 4,
            subtype: true,
            dirty_max_ratio: Some(50),
            dirty_max_bytes: None,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads for requests that do disk I/O.
struct Pool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Pool {
    fn new(n: usize, name: &str) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-io{i}"))
                .spawn(move || loop {
                    let job = rx.lock().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start worker thread: {e}");
            }
        }
        Pool {
            tx: Mutex::new(Some(tx)),
        }
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let tx = self.tx.lock().clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(job) {
                    job();
                }
            }
            None => job(),
        }
    }
}

pub struct FuseFs {
    fs: Arc<VolumeFs>,
    opts: FuseOptions,
    pool: Pool,
    m: Arc<VolumeMetrics>,
}

impl FuseFs {
    pub fn new(fs: Arc<VolumeFs>, opts: FuseOptions, m: Arc<VolumeMetrics>) -> Self {
        let pool = Pool::new(opts.workers, fs.name.as_str());
        FuseFs { fs, opts, pool, m }
    }
}

/// The one mapping from volfs errors to errno. Every error is counted by volume, operation
/// and errno; failures of the daemon or the disk (EIO, ENOSPC) are logged with the volume and
/// operation, the everyday ones (ENOENT, EEXIST, ...) only at debug level.
pub fn errno(fs: &VolumeFs, m: &VolumeMetrics, op: &'static str, e: &Error) -> Errno {
    let n = e.errno();
    m.error(op, n);
    if n == libc::EIO || n == libc::ENOSPC {
        tracing::warn!(volume = %fs.name, op, "{e}");
    } else {
        tracing::debug!(volume = %fs.name, op, "{e}");
    }
    Errno::from_i32(n)
}

fn ftype(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.btime,
        kind: ftype(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// A new file, directory or special file with the creator's mode less its umask.
fn new_node(kind: Kind, mode: u32, umask: u32, rdev: u32) -> NewNode<'static> {
    NewNode {
        kind,
        perm: mode & !umask & 0o7777,
        rdev,
        target: &[],
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(s),
    })
}

macro_rules! try_reply {
    ($self:ident, $op:literal, $reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(errno(&$self.fs, &$self.m, $op, &e)),
        }
    };
}

impl FuseFs {
    fn entry(&self, reply: ReplyEntry, r: volfs::Result<Attr>, op: &'static str) {
        match r {
            Ok(a) => reply.entry(&self.opts.ttl, &fattr(&a), Generation(0)),
            Err(e) => reply.error(errno(&self.fs, &self.m, op, &e)),
        }
    }

    fn empty(
        fs: &VolumeFs,
        m: &VolumeMetrics,
        reply: ReplyEmpty,
        r: volfs::Result<()>,
        op: &'static str,
    ) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(fs, m, op, &e)),
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            // We drop suid/sgid/capabilities on write, truncate and chown ourselves, so the
            // kernel stops asking getxattr("security.capability") before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_ASYNC_DIO;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        // Locks stay with the kernel (no POSIX_LOCKS/FLOCK_LOCKS): every mountpoint of a
        // volume is a bind mount of this one connection, so the kernel's lock table covers
        // them all, survives daemon restarts and handles signals.
        let have = config.capabilities();
        if let Err(missing) = config.add_capabilities(want & have) {
            tracing::warn!("kernel refused FUSE capabilities {missing:?}");
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.shutdown() {
            tracing::error!(volume = %self.fs.name, "flushing at unmount failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _t = self.m.time(Op::Lookup);
        self.entry(reply, self.fs.lookup(parent.0, name.as_bytes()), "lookup")
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _t = self.m.time(Op::Forget);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = self.m.time(Op::Getattr);
        let a = try_reply!(self, "getattr", reply, self.fs.getattr(ino.0));
        reply.attr(&self.opts.ttl, &fattr(&a))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _t = self.m.time(Op::Setattr);
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            ctime,
            // With HANDLE_KILLPRIV_V2 the kernel leaves this to us: chown always drops the
            // bits (as Linux does), truncate when the caller is not root (fuser does not pass
            // FATTR_KILL_SUIDGID, so root stands in for CAP_FSETID).
            kill_privs: uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0),
        };
        let a = try_reply!(self, "setattr", reply, self.fs.setattr(ino.0, &s));
        reply.attr(&self.opts.ttl, &fattr(&a))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = self.m.time(Op::Readlink);
        let t = try_reply!(self, "readlink", reply, self.fs.readlink(ino.0));
        reply.data(&t)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _t = self.m.time(Op::Mknod);
        let Some(kind) = Kind::from_mode(mode) else {
            return reply.error(Errno::EINVAL);
        };
        if kind == Kind::Dir || kind == Kind::Symlink {
            return reply.error(Errno::EINVAL);
        }
        let new = new_node(kind, mode, umask, rdev);
        self.entry(
            reply,
            self.fs
                .make(parent.0, name.as_bytes(), new, caller(req), None)
                .map(|r| r.0),
            "mknod",
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _t = self.m.time(Op::Mkdir);
        let new = new_node(Kind::Dir, mode, umask, 0);
        self.entry(
            reply,
            self.fs
                .make(parent.0, name.as_bytes(), new, caller(req), None)
                .map(|r| r.0),
            "mkdir",
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = self.m.time(Op::Unlink);
        Self::empty(
            &self.fs,
            &self.m,
            reply,
            self.fs.unlink(parent.0, name.as_bytes()),
            "unlink",
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = self.m.time(Op::Rmdir);
        Self::empty(
            &self.fs,
            &self.m,
            reply,
            self.fs.rmdir(parent.0, name.as_bytes()),
            "rmdir",
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _t = self.m.time(Op::Symlink);
        let new = NewNode {
            kind: Kind::Symlink,
            perm: 0o777,
            rdev: 0,
            target: target.as_os_str().as_bytes(),
        };
        self.entry(
            reply,
            self.fs
                .make(parent.0, link_name.as_bytes(), new, caller(req), None)
                .map(|r| r.0),
            "symlink",
        )
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
        let _t = self.m.time(Op::Rename);
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        Self::empty(&self.fs, &self.m, reply, r, "rename")
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _t = self.m.time(Op::Link);
        self.entry(
            reply,
            self.fs.link(ino.0, newparent.0, newname.as_bytes()),
            "link",
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.m.time(Op::Open);
        let fh = try_reply!(self, "open", reply, self.fs.open(ino.0, flags.0));
        // The page cache stays valid across opens: every change goes through this connection.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
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
        let _t = self.m.time(Op::Read);
        // One pooled buffer per read in flight (see `bufpool`), given back after the reply.
        let mut d = bufpool::take_read();
        try_reply!(
            self,
            "read",
            reply,
            self.fs.read_into(ino.0, offset, size, &mut d)
        );
        self.m.read_bytes.inc_by(d.len() as u64);
        reply.data(&d);
        bufpool::give_read(d);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _t = self.m.time(Op::Write);
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let n = try_reply!(
            self,
            "write",
            reply,
            self.fs.write(ino.0, offset, data, kill)
        );
        self.m.written_bytes.inc_by(u64::from(n));
        reply.written(n)
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let t = self.m.time(Op::Flush);
        if self.fs.flush_is_noop(ino.0) {
            // Nothing buffered (a close after reads, or of a file just created): answered
            // here, without a hop to an I/O thread.
            return reply.ok();
        }
        if let Some(res) = self.fs.flush_inline(ino.0) {
            // A small file whose commit blocks on nothing: also answered here.
            return Self::empty(&self.fs, &self.m, reply, res, "flush");
        }
        let (fs, m) = (self.fs.clone(), self.m.clone());
        self.pool.run(move || {
            let _t = t;
            Self::empty(&fs, &m, reply, fs.flush(ino.0), "flush");
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.m.time(Op::Release);
        let ino = try_reply!(self, "release", reply, self.fs.take_handle(fh.0, ino.0));
        if self.fs.release_node_quick(ino) {
            return reply.ok();
        }
        let (fs, m) = (self.fs.clone(), self.m.clone());
        self.pool.run(move || {
            let _t = t;
            Self::empty(&fs, &m, reply, fs.release_node(ino), "release");
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.m.time(Op::Fsync);
        let (fs, m) = (self.fs.clone(), self.m.clone());
        self.pool.run(move || {
            let _t = t;
            Self::empty(&fs, &m, reply, fs.fsync(ino.0), "fsync");
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.m.time(Op::Opendir);
        let fh = try_reply!(self, "opendir", reply, self.fs.opendir(ino.0));
        reply.opened(FileHandle(fh), FopenFlags::empty())
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _t = self.m.time(Op::Readdir);
        let entries = try_reply!(self, "readdir", reply, self.fs.readdir(fh.0, ino.0, offset));
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                ftype(e.kind),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _t = self.m.time(Op::Readdirplus);
        let entries = try_reply!(
            self,
            "readdirplus",
            reply,
            self.fs.readdir(fh.0, ino.0, offset)
        );
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let dot = e.name == b"." || e.name == b"..";
            // "." and ".." carry no lookup reference; every other entry takes one, which the
            // kernel holds for each entry it accepts (one node lock per entry).
            let attr = if dot {
                self.fs.getattr(ino.0)
            } else {
                self.fs.entry_attr(e.ino)
            };
            let a = match attr {
                Ok(a) => a,
                Err(err) => {
                    tracing::debug!("readdirplus entry vanished: {err}");
                    continue;
                }
            };
            if reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                OsStr::from_bytes(&e.name),
                &self.opts.ttl,
                &fattr(&a),
                Generation(0),
            ) {
                // The buffer is full: this entry was not sent, so give its reference back.
                if !dot {
                    self.fs.forget(e.ino, 1);
                }
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _t = self.m.time(Op::Releasedir);
        self.fs.releasedir(fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.m.time(Op::Fsyncdir);
        let (fs, m) = (self.fs.clone(), self.m.clone());
        self.pool.run(move || {
            let _t = t;
            Self::empty(&fs, &m, reply, fs.fsync(ino.0), "fsyncdir");
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _t = self.m.time(Op::Statfs);
        let s = try_reply!(self, "statfs", reply, self.fs.statfs());
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        )
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _t = self.m.time(Op::Setxattr);
        Self::empty(
            &self.fs,
            &self.m,
            reply,
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags),
            "setxattr",
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = self.m.time(Op::Getxattr);
        match try_reply!(
            self,
            "getxattr",
            reply,
            self.fs.getxattr(ino.0, name.as_bytes(), size)
        ) {
            XattrReply::Size(n) => reply.size(n),
            XattrReply::Data(d) => reply.data(&d),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _t = self.m.time(Op::Listxattr);
        match try_reply!(self, "listxattr", reply, self.fs.listxattr(ino.0, size)) {
            XattrReply::Size(n) => reply.size(n),
            XattrReply::Data(d) => reply.data(&d),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = self.m.time(Op::Removexattr);
        Self::empty(
            &self.fs,
            &self.m,
            reply,
            self.fs.removexattr(ino.0, name.as_bytes()),
            "removexattr",
        )
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _t = self.m.time(Op::Access);
        // Permission checks are the kernel's (default_permissions); only existence is ours.
        Self::empty(
            &self.fs,
            &self.m,
            reply,
            self.fs.getattr(ino.0).map(|_| ()),
            "access",
        )
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
        let _t = self.m.time(Op::Create);
        let new = new_node(Kind::File, mode, umask, 0);
        let (a, fh) = try_reply!(
            self,
            "create",
            reply,
            self.fs
                .make(parent.0, name.as_bytes(), new, caller(req), Some(flags))
        );
        reply.created(
            &self.opts.ttl,
            &fattr(&a),
            Generation(0),
            FileHandle(fh.unwrap_or(0)),
            FopenFlags::FOPEN_KEEP_CACHE,
        )
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
        let _t = self.m.time(Op::Fallocate);
        Self::empty(
            &self.fs,
            &self.m,
            reply,
            self.fs.fallocate(ino.0, offset, length, mode),
            "fallocate",
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _t = self.m.time(Op::Lseek);
        let w = match whence {
            libc::SEEK_DATA => Whence::Data,
            libc::SEEK_HOLE => Whence::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        let pos = try_reply!(self, "lseek", reply, self.fs.lseek(ino.0, offset as u64, w));
        reply.offset(pos as i64)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let t = self.m.time(Op::CopyFileRange);
        let (fs, m) = (self.fs.clone(), self.m.clone());
        self.pool.run(move || {
            let _t = t;
            // A reply carries at most u32::MAX bytes; the kernel loops for the rest.
            let len = len.min(1 << 30);
            match fs.copy_file_range(ino_in.0, offset_in, ino_out.0, offset_out, len) {
                Ok(n) => {
                    // Chunks are shared, not read: the bytes count as written only.
                    m.written_bytes.inc_by(n);
                    reply.written(n as u32)
                }
                Err(e) => reply.error(errno(&fs, &m, "copy_file_range", &e)),
            }
        });
    }
}

/// A session on a connection that is already initialized: the process before this one did
/// the INIT handshake, and the kernel will not send INIT again. fuser only starts a session
/// with a handshake, so it gets one: a synthetic INIT (ABI 7.40, every capability offered, so
/// that `init` computes the same flags as the first time) on a socket, whose answer goes
/// nowhere; then the real connection fd takes the socket's place under the same number.
/// The kernel keeps what it negotiated the first time.
pub fn adopt_session(
    fs: FuseFs,
    conn: std::os::fd::OwnedFd,
    cfg: fuser::Config,
) -> io::Result<fuser::Session<FuseFs>> {
    use std::os::fd::{AsFd, AsRawFd};
    const FUSE_INIT: u32 = 26;
    let (ours, theirs) = crate::handover::seqpacket_pair()?;
    // fuse_in_header (40 bytes) + fuse_init_in (64 bytes).
    let mut msg = Vec::with_capacity(104);
    msg.extend_from_slice(&104u32.to_ne_bytes()); // len
    msg.extend_from_slice(&FUSE_INIT.to_ne_bytes()); // opcode
    msg.extend_from_slice(&1u64.to_ne_bytes()); // unique
    msg.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    msg.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    msg.extend_from_slice(&7u32.to_ne_bytes()); // major
    msg.extend_from_slice(&40u32.to_ne_bytes()); // minor
    msg.extend_from_slice(&(1u32 << 20).to_ne_bytes()); // max_readahead
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // flags
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // flags2
    msg.extend_from_slice(&[0u8; 44]); // unused
                                       // SAFETY: writes a live buffer to a fd we own.
    if unsafe { libc::write(ours.as_raw_fd(), msg.as_ptr().cast(), msg.len()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let session = fuser::Session::from_fd(fs, theirs, fuser::SessionACL::All, cfg)?;
    // The session's fd number now names the real connection.
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: dup3 onto a fd the session owns; it atomically replaces the socket.
    if unsafe { libc::dup3(conn.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(session)
}
