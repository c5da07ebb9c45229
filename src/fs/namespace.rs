//! Directory tree operations: create, mknod, mkdir, symlink, link, unlink, rmdir, rename and
//! directory listing. Each change takes the volume's namespace mutex, then the inodes it
//! touches, and is written as one atomic index batch.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{attr_of, check_name, Attr, Caller, DirEntry, Handle, NodeState, VolumeFs};
use crate::db::{Batch, Cf};
use crate::error::{posix, Error, Result};
use crate::meta::{self, Dirent, InodeRecord, Kind, Ts, DIRENT_VERSION};

/// What a new inode is.
pub struct NewNode<'a> {
    pub kind: Kind,
    pub perm: u32,
    pub rdev: u32,
    pub target: &'a [u8],
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

impl VolumeFs {
    pub(super) fn dirent(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>> {
        if name.len() > 255 {
            return posix(libc::ENAMETOOLONG);
        }
        self.stack().dirent(&*self.engine, parent, name)
    }

    fn put_dirent(&self, b: &mut Batch, parent: u64, name: &[u8], d: Dirent) {
        b.put(
            Cf::Dirents,
            meta::dirent_key(self.tree(), parent, name),
            meta::encode(DIRENT_VERSION, &d),
        );
    }

    /// Removes an entry in the top tree; a whiteout hides it if a lower tree may have it.
    fn del_dirent(&self, b: &mut Batch, parent: u64, name: &[u8]) {
        let stack = self.stack();
        let key = meta::dirent_key(stack.top, parent, name);
        if stack.lower_may_have(parent) {
            b.put(Cf::Dirents, key, Vec::new());
        } else {
            b.delete(Cf::Dirents, key);
        }
    }

    fn dir_is_empty(&self, ino: u64) -> Result<bool> {
        Ok(self.stack().list(&*self.engine, ino, 1)?.is_empty())
    }

    /// Creates a file, directory, symlink or special file. With `open_flags`, also opens it and
    /// returns the handle.
    pub fn make(
        &self,
        parent: u64,
        name: &[u8],
        new: NewNode<'_>,
        who: Caller,
        open_flags: Option<i32>,
    ) -> Result<(Attr, Option<u64>)> {
        let _w = self.writer()?;
        check_name(name)?;
        let _ns = self.ns.lock();
        let mut p = self.lock_own(parent)?;
        if p.rec.kind != Kind::Dir {
            return posix(libc::ENOTDIR);
        }
        if p.rec.nlink == 0 {
            return posix(libc::ENOENT);
        }
        if self.dirent(parent, name)?.is_some() {
            return posix(libc::EEXIST);
        }
        let mut b = Batch::new();
        let ino = self.alloc_ino(&mut b);
        let mut perm = new.perm & 0o7777;
        let gid = if p.rec.perm & libc::S_ISGID != 0 {
            if new.kind == Kind::Dir {
                perm |= libc::S_ISGID;
            }
            p.rec.gid
        } else {
            who.gid
        };
        // A non-root creator outside the file's group cannot leave it setgid.
        if new.kind != Kind::Dir && perm & libc::S_ISGID != 0 && who.uid != 0 && gid != who.gid {
            perm &= !libc::S_ISGID;
        }
        let mut rec = InodeRecord::new(new.kind, perm, who.uid, gid);
        rec.rdev = new.rdev;
        if new.kind == Kind::Symlink {
            rec.target = new.target.to_vec();
            rec.size = new.target.len() as u64;
        }
        self.persist_rec(&mut b, ino, &rec);
        self.put_dirent(
            &mut b,
            parent,
            name,
            Dirent {
                ino,
                kind: new.kind,
            },
        );
        let now = rec.ctime;
        p.rec.mtime = now;
        p.rec.ctime = now;
        if new.kind == Kind::Dir {
            p.rec.nlink += 1;
        }
        self.persist_rec(&mut b, parent, &p.rec);
        self.engine.write(b, false)?;
        drop(p);
        self.new_node(ino, rec);
        let mut st = self.lock(ino)?;
        self.remember(ino, &mut st);
        let fh = open_flags.map(|_| {
            st.opens += 1;
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.handles.insert(fh, Handle::File { ino });
            fh
        });
        Ok((attr_of(ino, &st.rec), fh))
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        let _w = self.writer()?;
        check_name(newname)?;
        let _ns = self.ns.lock();
        let mut p = self.lock_own(newparent)?;
        if p.rec.kind != Kind::Dir {
            return posix(libc::ENOTDIR);
        }
        if self.dirent(newparent, newname)?.is_some() {
            return posix(libc::EEXIST);
        }
        if ino == newparent {
            return posix(libc::EPERM);
        }
        let mut st = self.lock_own(ino)?;
        if st.rec.kind == Kind::Dir {
            return posix(libc::EPERM);
        }
        if st.rec.nlink == 0 {
            return posix(libc::ENOENT);
        }
        if st.rec.nlink >= 65_000 {
            return posix(libc::EMLINK);
        }
        let now = Ts::now();
        st.rec.nlink += 1;
        st.rec.ctime = now;
        p.rec.mtime = now;
        p.rec.ctime = now;
        let mut b = Batch::new();
        self.put_dirent(
            &mut b,
            newparent,
            newname,
            Dirent {
                ino,
                kind: st.rec.kind,
            },
        );
        self.persist_rec(&mut b, ino, &st.rec);
        self.persist_rec(&mut b, newparent, &p.rec);
        self.engine.write(b, false)?;
        self.remember(ino, &mut st);
        Ok(attr_of(ino, &st.rec))
    }

    /// Drops one link of a non-directory in a batch; frees it if nothing holds it open.
    fn drop_link(&self, b: &mut Batch, ino: u64, st: &mut NodeState, now: Ts) -> Result<()> {
        st.rec.nlink = st.rec.nlink.saturating_sub(1);
        st.rec.ctime = now;
        if st.rec.nlink == 0 {
            if self.unused(st) {
                self.purge_into(b, ino, st)?;
            } else {
                self.own(ino, st)?;
                self.persist_rec(b, ino, &st.rec);
                b.put(Cf::Orphans, self.ikey(ino), Vec::new());
            }
        } else {
            self.own(ino, st)?;
            self.persist_rec(b, ino, &st.rec);
        }
        Ok(())
    }

    /// Bookkeeping after a batch that purged `ino` was written.
    fn after_drop(&self, ino: u64, st: &mut NodeState) {
        if st.rec.nlink == 0 && self.unused(st) {
            self.used.fetch_sub(st.rec.alloc as i64, Ordering::Relaxed);
            st.rec.alloc = 0;
            self.drop_dirty(ino, st);
            st.extents = Some(Default::default());
            st.rec_dirty = false;
        }
    }

    /// Removes a directory's inode in a batch (it must be empty).
    fn drop_dir(&self, b: &mut Batch, ino: u64, st: &mut NodeState, now: Ts) -> Result<()> {
        st.rec.nlink = 0;
        st.rec.ctime = now;
        self.delete_inode(b, ino);
        if st.tree == self.tree() && !st.no_xattrs {
            self.delete_keys(b, Cf::Xattrs, &self.ikey(ino))?;
        }
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        let _w = self.writer()?;
        let _ns = self.ns.lock();
        let mut p = self.lock_own(parent)?;
        let d = self
            .dirent(parent, name)?
            .ok_or(Error::Posix(libc::ENOENT))?;
        if d.kind == Kind::Dir {
            return posix(libc::EISDIR);
        }
        let mut st = self.lock(d.ino)?;
        let now = Ts::now();
        let mut b = Batch::new();
        self.del_dirent(&mut b, parent, name);
        self.drop_link(&mut b, d.ino, &mut st, now)?;
        p.rec.mtime = now;
        p.rec.ctime = now;
        self.persist_rec(&mut b, parent, &p.rec);
        self.engine.write(b, false)?;
        self.after_drop(d.ino, &mut st);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        let _w = self.writer()?;
        if name == b"." {
            return posix(libc::EINVAL);
        }
        if name == b".." {
            return posix(libc::ENOTEMPTY);
        }
        let _ns = self.ns.lock();
        let mut p = self.lock_own(parent)?;
        let d = self
            .dirent(parent, name)?
            .ok_or(Error::Posix(libc::ENOENT))?;
        if d.kind != Kind::Dir {
            return posix(libc::ENOTDIR);
        }
        if !self.dir_is_empty(d.ino)? {
            return posix(libc::ENOTEMPTY);
        }
        let mut st = self.lock(d.ino)?;
        let now = Ts::now();
        let mut b = Batch::new();
        self.del_dirent(&mut b, parent, name);
        self.drop_dir(&mut b, d.ino, &mut st, now)?;
        p.rec.nlink = p.rec.nlink.saturating_sub(1);
        p.rec.mtime = now;
        p.rec.ctime = now;
        self.persist_rec(&mut b, parent, &p.rec);
        self.engine.write(b, false)?;
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        let _w = self.writer()?;
        check_name(newname)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || (flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0)
        {
            return posix(libc::EINVAL);
        }
        let _ns = self.ns.lock();
        let src = self
            .dirent(parent, name)?
            .ok_or(Error::Posix(libc::ENOENT))?;
        let dst = self.dirent(newparent, newname)?;
        if let Some(d) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return posix(libc::EEXIST);
            }
            if d.ino == src.ino {
                return Ok(()); // two links to one inode: rename does nothing
            }
        } else if flags & RENAME_EXCHANGE != 0 {
            return posix(libc::ENOENT);
        }
        {
            let np = self.lock(newparent)?;
            if np.rec.kind != Kind::Dir {
                return posix(libc::ENOTDIR);
            }
        }
        // Moving a directory into its own subtree is refused by the VFS before we get here.
        let now = Ts::now();
        let mut b = Batch::new();
        let mut nlink_delta: [(u64, i32); 2] = [(parent, 0), (newparent, 0)];
        if flags & RENAME_EXCHANGE != 0 {
            let d = dst.ok_or(Error::Posix(libc::ENOENT))?;
            self.put_dirent(&mut b, parent, name, d);
            self.put_dirent(&mut b, newparent, newname, src);
            if parent != newparent {
                let dirs = |k: Kind| if k == Kind::Dir { 1 } else { 0 };
                nlink_delta[0].1 += dirs(d.kind) - dirs(src.kind);
                nlink_delta[1].1 += dirs(src.kind) - dirs(d.kind);
            }
            for ino in [src.ino, d.ino] {
                let mut st = self.lock_own(ino)?;
                st.rec.ctime = now;
                self.persist_rec(&mut b, ino, &st.rec);
            }
        } else {
            let mut replaced: Option<(u64, super::NodeGuard)> = None;
            if let Some(d) = dst {
                match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                    (true, false) => return posix(libc::ENOTDIR),
                    (false, true) => return posix(libc::EISDIR),
                    (true, true) if !self.dir_is_empty(d.ino)? => return posix(libc::ENOTEMPTY),
                    _ => {}
                }
                let mut st = self.lock(d.ino)?;
                if d.kind == Kind::Dir {
                    self.drop_dir(&mut b, d.ino, &mut st, now)?;
                    nlink_delta[1].1 -= 1;
                } else {
                    self.drop_link(&mut b, d.ino, &mut st, now)?;
                }
                replaced = Some((d.ino, st));
            }
            self.del_dirent(&mut b, parent, name);
            self.put_dirent(&mut b, newparent, newname, src);
            if src.kind == Kind::Dir && parent != newparent {
                nlink_delta[0].1 -= 1;
                nlink_delta[1].1 += 1;
            }
            let mut st = self.lock_own(src.ino)?;
            st.rec.ctime = now;
            self.persist_rec(&mut b, src.ino, &st.rec);
            drop(st);
            // Written below together with the parents; keep the replaced inode locked.
            if let Some((ino, mut st)) = replaced {
                self.touch_parents(&mut b, nlink_delta, now)?;
                self.engine.write(b, false)?;
                self.after_drop(ino, &mut st);
                return Ok(());
            }
        }
        self.touch_parents(&mut b, nlink_delta, now)?;
        self.engine.write(b, false)?;
        Ok(())
    }

    fn touch_parents(&self, b: &mut Batch, deltas: [(u64, i32); 2], now: Ts) -> Result<()> {
        let same = deltas[0].0 == deltas[1].0;
        let list: Vec<(u64, i32)> = if same {
            vec![(deltas[0].0, deltas[0].1 + deltas[1].1)]
        } else {
            deltas.to_vec()
        };
        for (ino, d) in list {
            let mut p = self.lock_own(ino)?;
            p.rec.nlink = (p.rec.nlink as i64 + d as i64).max(0) as u32;
            p.rec.mtime = now;
            p.rec.ctime = now;
            self.persist_rec(b, ino, &p.rec);
        }
        Ok(())
    }

    fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let entries = self.stack().list(&*self.engine, ino, usize::MAX)?;
        let mut out = Vec::with_capacity(entries.len() + 2);
        for name in [b".".to_vec(), b"..".to_vec()] {
            out.push(DirEntry {
                ino,
                kind: Kind::Dir,
                name,
            });
        }
        out.extend(entries.into_iter().map(|(name, e)| DirEntry {
            ino: e.ino,
            kind: e.kind,
            name,
        }));
        Ok(out)
    }

    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let st = self.lock(ino)?;
        if st.rec.kind != Kind::Dir {
            return posix(libc::ENOTDIR);
        }
        drop(st);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, Handle::Dir { ino, entries: None });
        Ok(fh)
    }

    /// Entries from position `offset` on. The listing is taken at the first read and again
    /// whenever a reader starts over at offset 0 (rewinddir), not at opendir.
    /// A handle this process never issued (see `adopted`) gets a fresh listing of `dir`.
    pub fn readdir(&self, fh: u64, dir: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        let ino = match self.handles.get(&fh).as_deref() {
            Some(Handle::Dir {
                entries: Some(entries),
                ..
            }) if offset != 0 => return Ok(entries.clone()),
            Some(Handle::Dir { ino, .. }) => *ino,
            None if self.adopted => dir,
            _ => return posix(libc::EBADF),
        };
        let entries = Arc::new(self.list_dir(ino)?);
        self.handles.insert(
            fh,
            Handle::Dir {
                ino,
                entries: Some(entries.clone()),
            },
        );
        Ok(entries)
    }

    /// Attributes of a listed entry for readdirplus; counts a lookup reference like `lookup`.
    pub fn entry_attr(&self, ino: u64) -> Result<Attr> {
        let mut st = self.lock(ino)?;
        self.remember(ino, &mut st);
        Ok(attr_of(ino, &st.rec))
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.remove(&fh);
    }
}
