//! Extended attributes, stored per inode in the `xattrs` column family. POSIX ACL names are
//! refused with EOPNOTSUPP (volfs does not implement ACLs); the kernel checks namespace
//! permissions (trusted.*, user.* on special files) before calling.
use super::{NodeState, VolumeFs};
use crate::db::{Batch, Cf};
use crate::error::{posix, Result};
use crate::meta::{self, Ts};

pub const XATTR_CREATE: i32 = libc::XATTR_CREATE;
pub const XATTR_REPLACE: i32 = libc::XATTR_REPLACE;
const MAX_VALUE: usize = 64 * 1024;

fn check(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return posix(libc::ERANGE);
    }
    if name.starts_with(b"system.posix_acl_") {
        return posix(libc::EOPNOTSUPP);
    }
    Ok(())
}

/// What `getxattr`/`listxattr` answer: the size when asked with size 0, else the bytes.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn reply(v: Vec<u8>, size: u32) -> Result<XattrReply> {
    if size == 0 {
        Ok(XattrReply::Size(v.len() as u32))
    } else if v.len() > size as usize {
        posix(libc::ERANGE)
    } else {
        Ok(XattrReply::Data(v))
    }
}

impl VolumeFs {
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        let _w = self.writer()?;
        check(name)?;
        if value.len() > MAX_VALUE {
            return posix(libc::E2BIG);
        }
        let mut st = self.lock_own(ino)?;
        let key = meta::xattr_key(st.tree, ino, name);
        let exists = self.engine.get(Cf::Xattrs, &key)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return posix(libc::EEXIST);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return posix(libc::ENODATA);
        }
        let mut b = Batch::new();
        b.put(Cf::Xattrs, key, value.to_vec());
        st.no_xattrs = false;
        st.rec.ctime = Ts::now();
        self.persist_rec(&mut b, ino, &st.rec);
        self.engine.write(b, false)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> Result<XattrReply> {
        check(name)?;
        let st = self.lock(ino)?;
        if st.no_xattrs {
            return posix(libc::ENODATA);
        }
        match self
            .engine
            .get(Cf::Xattrs, &meta::xattr_key(st.tree, ino, name))?
        {
            Some(v) => reply(v, size),
            None => posix(libc::ENODATA),
        }
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply> {
        let st = self.lock(ino)?;
        let mut out = Vec::new();
        if st.no_xattrs {
            return reply(out, size);
        }
        for (k, _) in self
            .engine
            .scan_prefix(Cf::Xattrs, &meta::inode_key(st.tree, ino))?
        {
            out.extend_from_slice(&k[16..]);
            out.push(0);
        }
        reply(out, size)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        let _w = self.writer()?;
        check(name)?;
        let mut st = self.lock_own(ino)?;
        let key = meta::xattr_key(st.tree, ino, name);
        if self.engine.get(Cf::Xattrs, &key)?.is_none() {
            return posix(libc::ENODATA);
        }
        let mut b = Batch::new();
        b.delete(Cf::Xattrs, key);
        st.rec.ctime = Ts::now();
        self.persist_rec(&mut b, ino, &st.rec);
        self.engine.write(b, false)
    }

    /// What the kernel leaves to us with FUSE_HANDLE_KILLPRIV_V2: a write, truncate or chown
    /// by an unprivileged caller drops set-user-ID, set-group-ID (when group-executable, as
    /// Linux does) and the file capability xattr. Changes `st.rec` (the caller persists it)
    /// and queues the xattr removal in `b`. Returns whether anything changed.
    pub(super) fn kill_privs_locked(
        &self,
        ino: u64,
        st: &mut NodeState,
        b: &mut Batch,
    ) -> Result<bool> {
        let mut changed = false;
        let p = st.rec.perm;
        let mut np = p & !libc::S_ISUID;
        if np & 0o010 != 0 {
            np &= !libc::S_ISGID;
        }
        if np != p {
            st.rec.perm = np;
            changed = true;
        }
        let key = meta::xattr_key(st.tree, ino, CAPABILITY_XATTR);
        if !st.no_xattrs && self.engine.get(Cf::Xattrs, &key)?.is_some() {
            self.own(ino, st)?;
            b.delete(Cf::Xattrs, meta::xattr_key(st.tree, ino, CAPABILITY_XATTR));
            changed = true;
        }
        Ok(changed)
    }
}

const CAPABILITY_XATTR: &[u8] = b"security.capability";
