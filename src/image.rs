//! Image layers: importing a Docker/OCI layer tarball as a sealed layer, exporting a layer as
//! a tarball, and merging a stack of imported layers into the base tree of a `--layers`
//! volume.
//!
//! An imported layer is a tree of its own (kind `Import`), with its own inode numbers. It
//! keeps the tarball's whiteouts as they are: `.wh.NAME` files (NAME deleted below) and
//! `.wh..wh..opq` (the directory is opaque), so that export gives back an equivalent tarball.
//! Layers of one image do not share inode numbers, so a stack of them cannot be overlaid by
//! inode; [`merged`] applies them path by path (bottom first, as in an image manifest) into
//! one new tree (kind `Merged`), which a volume then uses as its lower tree. Merged trees are
//! cached by the list of layer ids, so every volume of one image shares one base.
//!
//! File data goes through the same FastCDC chunking and chunk store as writes through FUSE,
//! so a file imported from a tarball and the same file written into a volume share chunks.
//!
//! Durability: the tree is written in batches and becomes visible only when its layer entry is
//! written (synced) at the end; an import that fails midway leaves an unreferenced tree, freed
//! by gc.
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use crate::chunker::{AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use crate::db::{Batch, Cf, Engine};
use crate::error::{Error, Result};
use crate::ids::{LayerId, TreeId};
use crate::layer::{self, TreeKind, TreeRecord};
use crate::meta::{self, Dirent, Extent, InodeRecord, Kind, Ts, DIRENT_VERSION, INODE_VERSION};
use crate::store::Store;
use crate::volume::ROOT_INO;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const BATCH_OPS: usize = 10_000;

/// Writes one new tree in batches.
pub(crate) struct TreeWriter<'a> {
    store: &'a Store,
    pub(crate) tree: TreeId,
    pub(crate) b: Batch,
    next_ino: u64,
    pub(crate) bytes: u64,
}

impl<'a> TreeWriter<'a> {
    pub(crate) fn new(store: &'a Store) -> Result<Self> {
        Ok(TreeWriter {
            store,
            tree: TreeId(store.next_id("tree")?),
            b: Batch::new(),
            next_ino: ROOT_INO + 1,
            bytes: 0,
        })
    }

    pub(crate) fn alloc(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    pub(crate) fn maybe_flush(&mut self) -> Result<()> {
        if self.b.ops.len() >= BATCH_OPS {
            // The batch indexes chunks just put: their records must be in the OS first.
            self.store.chunks.flush()?;
            self.store
                .engine
                .write(std::mem::take(&mut self.b), false)?;
        }
        Ok(())
    }

    pub(crate) fn inode(&mut self, ino: u64, rec: &InodeRecord) -> Result<()> {
        self.b.put(
            Cf::Inodes,
            meta::inode_key(self.tree, ino),
            meta::encode(INODE_VERSION, rec),
        );
        self.maybe_flush()
    }

    pub(crate) fn dirent(&mut self, parent: u64, name: &[u8], d: Dirent) -> Result<()> {
        self.b.put(
            Cf::Dirents,
            meta::dirent_key(self.tree, parent, name),
            meta::encode(DIRENT_VERSION, &d),
        );
        self.maybe_flush()
    }

    pub(crate) fn extent(&mut self, ino: u64, off: u64, e: &Extent) -> Result<()> {
        self.b.put(
            Cf::Extents,
            meta::extent_key(self.tree, ino, off),
            meta::encode(meta::EXTENT_VERSION, e),
        );
        self.maybe_flush()
    }

    pub(crate) fn xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        self.b.put(
            Cf::Xattrs,
            meta::xattr_key(self.tree, ino, name),
            value.to_vec(),
        );
        self.maybe_flush()
    }

    /// Writes the rest (synced, after the chunks) without a tree record: the tree of a new
    /// volume's top.
    pub(crate) fn finish_plain(mut self) -> Result<NewTree> {
        self.store.chunks.sync()?;
        self.store.engine.write(std::mem::take(&mut self.b), true)?;
        Ok(NewTree {
            tree: self.tree,
            ino_hw: self.next_ino,
            bytes: self.bytes,
        })
    }

    /// Writes the rest and the tree record; seals the tree and returns its layer id. A tree
    /// equal to an existing layer is deleted again and the existing id returned.
    fn finish(mut self, kind: TreeKind, origin: String) -> Result<(LayerId, TreeId, bool)> {
        layer::put_tree(
            &mut self.b,
            self.tree,
            &TreeRecord {
                kind,
                created: Ts::now().secs,
                ino_hw: self.next_ino,
                parent: None,
                layer: None,
                origin,
                bytes: self.bytes,
            },
        );
        self.store.chunks.sync()?;
        self.store.engine.write(std::mem::take(&mut self.b), true)?;
        let engine = &*self.store.engine;
        let (id, _) = layer::layer_id_of(engine, self.tree, None)?;
        if let Some(existing) = layer::layer_tree(engine, &id)? {
            if existing != self.tree {
                let mut b = Batch::new();
                layer::delete_tree(engine, &mut b, self.tree)?;
                engine.write(b, true)?;
                return Ok((id, existing, false));
            }
        }
        let mut rec = layer::get_tree(engine, self.tree)?
            .ok_or_else(|| Error::Db(format!("tree {} lost its record", self.tree.0)))?;
        rec.layer = Some(id);
        let mut b = Batch::new();
        layer::put_tree(&mut b, self.tree, &rec);
        b.put(
            Cf::Layers,
            id.0.to_vec(),
            self.tree.0.to_be_bytes().to_vec(),
        );
        engine.write(b, true)?;
        Ok((id, self.tree, true))
    }
}

/// Splits a tar path into clean components; refuses `..` and empty results stay root.
pub(crate) fn components(path: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::Invalid(format!(
                    "tarball entry {:?} leaves the layer (..)",
                    String::from_utf8_lossy(path)
                )))
            }
            c if c.len() > 255 => {
                return Err(Error::Invalid(format!(
                    "tarball entry {:?}: a name is longer than 255 bytes",
                    String::from_utf8_lossy(path)
                )))
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// The inode record of a tar entry; a header field that does not parse is an error naming it.
fn record_of(h: &tar::Header, kind: Kind, path: &str) -> Result<InodeRecord> {
    let field = |what: &str, v: std::io::Result<u64>| {
        v.map_err(|e| Error::Invalid(format!("tarball entry {path:?}: bad {what}: {e}")))
    };
    let mut rec = InodeRecord::new(
        kind,
        h.mode()
            .map_err(|e| Error::Invalid(format!("tarball entry {path:?}: bad mode: {e}")))?,
        field("uid", h.uid())? as u32,
        field("gid", h.gid())? as u32,
    );
    let t = Ts {
        secs: field("mtime", h.mtime())? as i64,
        nsec: 0,
    };
    (rec.atime, rec.mtime, rec.ctime, rec.btime) = (t, t, t, t);
    Ok(rec)
}

/// A directory the tarball does not list (a parent of a listed path), or the root when it is
/// not listed: fixed attributes, so that the layer id depends only on the tarball's content.
pub(crate) fn implicit_dir() -> InodeRecord {
    let mut rec = InodeRecord::new(Kind::Dir, 0o755, 0, 0);
    let t = Ts::default();
    (rec.atime, rec.mtime, rec.ctime, rec.btime) = (t, t, t, t);
    rec
}

/// One path of a tarball (or a backup manifest) being imported.
pub(crate) struct Item {
    pub(crate) rec: InodeRecord,
    pub(crate) extents: Vec<(u64, Extent)>,
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A hard link: the path whose inode this is.
    pub(crate) link_to: Option<Vec<Vec<u8>>>,
}

pub(crate) type Items = BTreeMap<Vec<Vec<u8>>, Item>;

/// The implicit root an import starts from.
pub(crate) fn new_items() -> Items {
    let mut items = BTreeMap::new();
    items.insert(
        Vec::new(),
        Item {
            rec: implicit_dir(),
            extents: Vec::new(),
            xattrs: Vec::new(),
            link_to: None,
        },
    );
    items
}

/// Adds one path to `items`: creates the parents it does not list as plain directories,
/// refuses a path listed twice (except directories) and a parent that is not a directory.
/// A path with no components replaces the root's attributes.
pub(crate) fn add_item(items: &mut Items, comps: Vec<Vec<u8>>, it: Item) -> Result<()> {
    let shown = |c: &[Vec<u8>]| String::from_utf8_lossy(&c.join(&b'/')).into_owned();
    for i in 0..comps.len() {
        match items.get(&comps[..i]) {
            Some(p) if p.rec.kind == Kind::Dir && p.link_to.is_none() => {}
            Some(_) => {
                return Err(Error::Invalid(format!(
                    "entry {:?}: a parent is not a directory",
                    shown(&comps)
                )))
            }
            None => {
                items.insert(
                    comps[..i].to_vec(),
                    Item {
                        rec: implicit_dir(),
                        extents: Vec::new(),
                        xattrs: Vec::new(),
                        link_to: None,
                    },
                );
            }
        }
    }
    if comps.is_empty() {
        if it.rec.kind == Kind::Dir {
            if let Some(r) = items.get_mut(&comps) {
                r.rec = it.rec;
                r.xattrs = it.xattrs;
            }
        }
        return Ok(());
    }
    if let Some(old) = items.get(&comps) {
        if !(old.rec.kind == Kind::Dir && it.rec.kind == Kind::Dir) {
            return Err(Error::Invalid(format!(
                "{:?} is listed twice",
                shown(&comps)
            )));
        }
    }
    items.insert(comps, it);
    Ok(())
}

/// What an import keeps of a tarball beyond what a layer needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fidelity {
    /// Image layers: whole seconds; zeros stored as data (layer ids depend on it).
    Layer,
    /// Volumes: PAX sub-second mtimes and large uid/gid; all-zero chunks become holes, so
    /// sparse files stay sparse.
    Volume,
}

/// PAX `mtime` (`SECS[.FRACTION]`, possibly negative) as a timestamp.
fn pax_time(v: &[u8]) -> Option<Ts> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    Some(match (neg, nsec) {
        (false, n) => Ts { secs, nsec: n },
        (true, 0) => Ts {
            secs: -secs,
            nsec: 0,
        },
        (true, n) => Ts {
            secs: -secs - 1,
            nsec: 1_000_000_000 - n,
        },
    })
}

/// Reads a tarball into `items`, storing file data as chunks (indexed in `w`'s batch).
/// `what` names the tarball in errors; `counted` is told how many bytes have been read.
fn read_tar(
    store: &Store,
    w: &mut TreeWriter<'_>,
    input: &mut dyn Read,
    what: &str,
    fidelity: Fidelity,
) -> Result<Items> {
    let mut ar = tar::Archive::new(input);
    let mut items = new_items();
    let bad = |e: std::io::Error| Error::Invalid(format!("{what} is not a valid tarball: {e}"));
    let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let mut any = false;
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        any = true;
        let raw_path = entry.path_bytes().to_vec();
        let comps = components(&raw_path)?;
        let h = entry.header().clone();
        let ty = h.entry_type();
        let kind = match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => {
                Kind::File
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Char => Kind::CharDev,
            tar::EntryType::Block => Kind::BlockDev,
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            _ if fidelity == Fidelity::Layer => continue, // carries no file
            other => {
                return Err(Error::Invalid(format!(
                    "{what}: entry {:?} has a type volfs cannot store ({other:?})",
                    shown(&raw_path)
                )))
            }
        };
        let mut rec = record_of(&h, kind, &shown(&raw_path))?;
        let mut xattrs = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if fidelity == Fidelity::Volume {
                    let num = || {
                        std::str::from_utf8(ext.value_bytes())
                            .ok()
                            .and_then(|v| v.trim().parse::<u32>().ok())
                    };
                    match key {
                        b"mtime" => {
                            if let Some(t) = pax_time(ext.value_bytes()) {
                                (rec.atime, rec.mtime, rec.ctime, rec.btime) = (t, t, t, t);
                            }
                        }
                        b"uid" => rec.uid = num().unwrap_or(rec.uid),
                        b"gid" => rec.gid = num().unwrap_or(rec.gid),
                        _ => {}
                    }
                }
            }
        }
        let mut item_extents = Vec::new();
        let mut link_to = None;
        match ty {
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|c| c.to_vec())
                    .unwrap_or_default();
                let tc = components(&target)?;
                match items.get(&tc) {
                    Some(t) if t.rec.kind != Kind::Dir => {
                        link_to = Some(t.link_to.clone().unwrap_or(tc));
                    }
                    _ => {
                        return Err(Error::Invalid(format!(
                            "{what}: hard link {:?} points at {:?}, which is not a file listed before it",
                            shown(&raw_path),
                            shown(&target)
                        )))
                    }
                }
            }
            _ => match kind {
                Kind::File => {
                    let mut off = 0u64;
                    let mut alloc = 0u64;
                    for c in
                        fastcdc::v2020::StreamCDC::new(&mut entry, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    {
                        let c = c.map_err(|e| {
                            Error::Invalid(format!("{what}: reading {:?}: {e}", shown(&raw_path)))
                        })?;
                        if fidelity == Fidelity::Volume && c.data.iter().all(|b| *b == 0) {
                            off += c.length as u64; // a hole
                            continue;
                        }
                        let (id, loc) = store.chunks.put(&c.data)?;
                        if let Some(loc) = loc {
                            crate::chunk::ChunkStore::index(&mut w.b, &id, &loc);
                        }
                        item_extents.push((
                            off,
                            Extent {
                                chunk: id,
                                chunk_off: 0,
                                len: c.length as u32,
                            },
                        ));
                        off += c.length as u64;
                        alloc += c.length as u64;
                    }
                    w.maybe_flush()?;
                    rec.size = off;
                    rec.alloc = alloc;
                }
                Kind::Symlink => {
                    rec.target = entry
                        .link_name_bytes()
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    rec.size = rec.target.len() as u64;
                }
                Kind::CharDev | Kind::BlockDev => {
                    let dev = |v: std::io::Result<Option<u32>>| {
                        v.map(|n| n.unwrap_or(0)).map_err(|e| {
                            Error::Invalid(format!(
                                "{what}: entry {:?}: bad device number: {e}",
                                shown(&raw_path)
                            ))
                        })
                    };
                    let major = dev(h.device_major())?;
                    let minor = dev(h.device_minor())?;
                    rec.rdev = libc::makedev(major, minor) as u32;
                }
                _ => {}
            },
        }
        add_item(
            &mut items,
            comps,
            Item {
                rec,
                extents: item_extents,
                xattrs,
                link_to,
            },
        )
        .map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("{what}: {m}")),
            e => e,
        })?;
    }
    if !any && fidelity == Fidelity::Volume {
        return Err(Error::Invalid(format!("{what} is empty (no tar entries)")));
    }
    Ok(items)
}

/// Numbers the inodes of `items` in path order (hard links share their target's) and writes
/// records, directory entries, extents and xattrs into `w`'s tree.
pub(crate) fn write_items(w: &mut TreeWriter<'_>, items: &Items) -> Result<()> {
    let mut inos: BTreeMap<Vec<Vec<u8>>, u64> = BTreeMap::new();
    let mut nlink: BTreeMap<u64, u32> = BTreeMap::new();
    for (p, _) in items.iter().filter(|(_, it)| it.link_to.is_none()) {
        let ino = if p.is_empty() { ROOT_INO } else { w.alloc() };
        inos.insert(p.clone(), ino);
    }
    let lookup = |inos: &BTreeMap<Vec<Vec<u8>>, u64>, p: &[Vec<u8>]| {
        inos.get(p).copied().ok_or_else(|| {
            Error::Invalid(format!(
                "{:?} has no inode (a hard link to a path that is not listed?)",
                String::from_utf8_lossy(&p.join(&b'/'))
            ))
        })
    };
    for (p, it) in items {
        let ino = match &it.link_to {
            Some(t) => lookup(&inos, t)?,
            None => lookup(&inos, p)?,
        };
        inos.insert(p.clone(), ino);
        if it.rec.kind == Kind::Dir {
            if let Some((_, parent)) = p.split_last() {
                *nlink.entry(lookup(&inos, parent)?).or_insert(2) += 1;
            }
            nlink.entry(ino).or_insert(2);
        } else {
            *nlink.entry(ino).or_insert(0) += 1;
        }
    }
    for (p, it) in items {
        let ino = lookup(&inos, p)?;
        if let Some((name, parent)) = p.split_last() {
            w.dirent(
                lookup(&inos, parent)?,
                name,
                Dirent {
                    ino,
                    kind: it.rec.kind,
                },
            )?;
        }
        if it.link_to.is_some() {
            continue;
        }
        let mut rec = it.rec.clone();
        rec.nlink = nlink.get(&ino).copied().unwrap_or(1);
        w.inode(ino, &rec)?;
        for (off, e) in &it.extents {
            w.extent(ino, *off, e)?;
        }
        for (n, v) in &it.xattrs {
            w.xattr(ino, n, v)?;
        }
        if rec.kind == Kind::File {
            w.bytes += rec.alloc;
        }
    }
    Ok(())
}

/// Imports a layer tarball (plain tar; Docker's `docker save` layers and OCI layer blobs
/// after decompression). Returns the layer id and whether the layer is new to the store.
///
/// Inode numbers are assigned in path order after the whole tarball is read, and implicit
/// directories get fixed attributes, so the same content gives the same layer id whatever
/// the order of the tarball's entries.
pub fn import(store: &Store, path: &Path) -> Result<(LayerId, bool)> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut input = std::io::BufReader::new(f);
    // Chunks put from here on are referenced only once the tree is written.
    let _gc = store.chunks.writer();
    let mut w = TreeWriter::new(store)?;
    let items = read_tar(
        store,
        &mut w,
        &mut input,
        &path.display().to_string(),
        Fidelity::Layer,
    )?;
    write_items(&mut w, &items)?;
    let origin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (id, _, new) = w.finish(TreeKind::Import, origin)?;
    tracing::info!(layer = %id, new, "layer imported from {}", path.display());
    Ok((id, new))
}

/// A tree written for a new volume's top (no tree record: a volume's top has none).
#[derive(Clone, Copy, Debug)]
pub struct NewTree {
    pub tree: TreeId,
    /// The next free inode number.
    pub ino_hw: u64,
    /// Bytes covered by extents (the volume's used bytes).
    pub bytes: u64,
}

/// Deletes the keys of a tree that was never made part of a volume (a failed import).
pub fn discard_tree(store: &Store, t: TreeId) -> Result<()> {
    let mut b = Batch::new();
    layer::delete_tree(&*store.engine, &mut b, t)?;
    store.engine.write(b, false)
}

/// Imports a whole-volume tarball (GNU tar, PAX, `volfs volume export`) as a new tree, with
/// PAX sub-second mtimes, xattrs, hard links and holes for all-zero chunks. The caller holds
/// the chunk store's gc gate ([`crate::chunk::ChunkStore::writer`]) until the tree is part of
/// a volume. On error the partial tree is deleted again.
pub fn import_volume_tree(store: &Store, input: &mut dyn Read, what: &str) -> Result<NewTree> {
    let mut w = TreeWriter::new(store)?;
    let tree = w.tree;
    let res = read_tar(store, &mut w, input, what, Fidelity::Volume)
        .and_then(|items| write_items(&mut w, &items))
        .and_then(|_| w.finish_plain());
    if res.is_err() {
        if let Err(e) = discard_tree(store, tree) {
            tracing::warn!(
                "removing the partial tree {} of a failed import: {e}",
                tree.0
            );
        }
    }
    res
}

fn read_inode(engine: &dyn Engine, t: TreeId, ino: u64) -> Result<InodeRecord> {
    let v = engine
        .get(Cf::Inodes, &meta::inode_key(t, ino))?
        .filter(|v| !layer::is_whiteout(v))
        .ok_or_else(|| {
            Error::Db(format!(
                "tree {} has a directory entry for missing inode {ino}",
                t.0
            ))
        })?;
    meta::decode(INODE_VERSION, "inode", &v)
}

fn children(engine: &dyn Engine, t: TreeId, ino: u64) -> Result<Vec<(Vec<u8>, Dirent)>> {
    let s = layer::Stack {
        top: t,
        lower: Vec::new(),
    };
    s.list(engine, ino, usize::MAX)
}

/// Reads a file's bytes from its extents, holes as zeros, streaming chunk by chunk.
struct FileReader<'a> {
    store: &'a Store,
    extents: Vec<(u64, Extent)>,
    size: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_at: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf_at >= self.buf.len() {
            if self.pos >= self.size {
                return Ok(0);
            }
            // Next piece: a hole up to the next extent, or the next extent.
            let next = self
                .extents
                .iter()
                .find(|(o, e)| o + e.len as u64 > self.pos);
            self.buf = match next {
                Some((o, e)) if *o <= self.pos => {
                    let c = self
                        .store
                        .chunks
                        .get(&e.chunk)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let from = (e.chunk_off as u64 + (self.pos - o)) as usize;
                    let to = (e.chunk_off + e.len) as usize;
                    c.get(from..to)
                        .ok_or_else(|| {
                            std::io::Error::other(format!("extent past chunk {}", e.chunk))
                        })?
                        .to_vec()
                }
                Some((o, _)) => {
                    vec![0; (*o).min(self.size).saturating_sub(self.pos).min(1 << 20) as usize]
                }
                None => vec![0; (self.size - self.pos).min(1 << 20) as usize],
            };
            let room = (self.size - self.pos) as usize;
            self.buf.truncate(room);
            self.buf_at = 0;
            self.pos += self.buf.len() as u64;
        }
        let n = out.len().min(self.buf.len() - self.buf_at);
        out[..n].copy_from_slice(&self.buf[self.buf_at..self.buf_at + n]);
        self.buf_at += n;
        Ok(n)
    }
}

fn extents_of(engine: &dyn Engine, t: TreeId, ino: u64) -> Result<Vec<(u64, Extent)>> {
    engine
        .scan_prefix(Cf::Extents, &meta::inode_key(t, ino))?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                meta::extent_offset(&k)?,
                meta::decode(meta::EXTENT_VERSION, "extent", &v)?,
            ))
        })
        .collect()
}

/// Writes layer `id` as a tarball (entries in path order, hard links as links, xattrs as PAX
/// `SCHILY.xattr.*` records, whiteouts as the `.wh.` files they were imported as).
pub fn export(store: &Store, id: &LayerId, out: &mut dyn Write) -> Result<()> {
    let engine = &*store.engine;
    let t = layer::layer_tree(engine, id)?.ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
    let stack = layer::Stack {
        top: t,
        lower: Vec::new(),
    };
    export_stack(store, &stack, false, out, &mut |_| {}).map(|_| ())
}

/// Appends one entry to a ustar/PAX archive: the name and link target go into the header when
/// they fit (100 bytes), else into PAX `path`/`linkpath` records, with `pax` (xattrs, mtime).
fn append_entry(
    b: &mut tar::Builder<&mut dyn Write>,
    h: &mut tar::Header,
    path: &[u8],
    link: Option<&[u8]>,
    mut pax: Vec<(String, Vec<u8>)>,
    data: &mut dyn Read,
) -> std::io::Result<()> {
    let old = h.as_old_mut();
    if path.len() <= old.name.len() {
        old.name[..path.len()].copy_from_slice(path);
    } else {
        old.name.copy_from_slice(&path[..100]);
        pax.push(("path".into(), path.to_vec()));
    }
    if let Some(link) = link {
        if link.len() <= old.linkname.len() {
            old.linkname[..link.len()].copy_from_slice(link);
        } else {
            old.linkname.copy_from_slice(&link[..100]);
            pax.push(("linkpath".into(), link.to_vec()));
        }
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    h.set_cksum();
    b.append(h, data)
}

/// An inode's xattrs as PAX `SCHILY.xattr.NAME` records.
fn xattr_records(engine: &dyn Engine, t: TreeId, ino: u64) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(engine
        .scan_prefix(Cf::Xattrs, &meta::inode_key(t, ino))?
        .into_iter()
        .map(|(k, v)| {
            (
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(&k[16..])),
                v,
            )
        })
        .collect())
}

/// A PAX `mtime` record when the mtime has a fraction of a second.
fn mtime_record(rec: &InodeRecord) -> Option<(String, Vec<u8>)> {
    (rec.mtime.nsec != 0 && rec.mtime.secs >= 0).then(|| {
        (
            "mtime".into(),
            format!("{}.{:09}", rec.mtime.secs, rec.mtime.nsec).into_bytes(),
        )
    })
}

/// Writes the merged view of `stack` (a volume's or snapshot's trees, or one layer's tree) as
/// a POSIX (ustar + PAX) tarball, depth first in name order: regular files with their data
/// (holes as zeros), directories, symlinks, hard links as tar links, fifos and devices, with
/// mode, uid/gid, mtime (PAX `mtime` when it has a fraction) and xattrs as PAX
/// `SCHILY.xattr.*`. Sockets are skipped (tar has no sockets). With `root`, the root
/// directory's own attributes come first as `./` (volume exports; layers have none).
/// `counted` is told the file bytes written so far. Returns the number of file bytes written.
pub fn export_stack(
    store: &Store,
    stack: &layer::Stack,
    root: bool,
    out: &mut dyn Write,
    counted: &mut dyn FnMut(u64),
) -> Result<u64> {
    let engine = &*store.engine;
    let mut b = tar::Builder::new(out);
    let mut seen: HashMap<u64, Vec<u8>> = HashMap::new();
    let io = |e: std::io::Error| Error::io("writing the tarball", e);
    let mut done = 0u64;
    if root {
        let (t, rec) = stack
            .inode(engine, ROOT_INO)?
            .ok_or_else(|| Error::Db("the volume has no root directory".into()))?;
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(rec.perm);
        h.set_uid(rec.uid as u64);
        h.set_gid(rec.gid as u64);
        h.set_mtime(rec.mtime.secs.max(0) as u64);
        h.set_size(0);
        let mut pax = xattr_records(engine, t, ROOT_INO)?;
        pax.extend(mtime_record(&rec));
        append_entry(&mut b, &mut h, b"./", None, pax, &mut std::io::empty()).map_err(io)?;
    }
    // Depth-first (each directory's contents right after it, as tar(1) writes them: GNU tar
    // restores a directory's mtime once the archive has left it), in name order.
    let push_children = |todo: &mut Vec<(Vec<u8>, Dirent)>, dir_path: &[u8], dir: u64| {
        let list = stack.list(engine, dir, usize::MAX)?;
        for (name, d) in list.into_iter().rev() {
            let mut path = dir_path.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            todo.push((path, d));
        }
        Ok::<(), Error>(())
    };
    let mut todo: Vec<(Vec<u8>, Dirent)> = Vec::new();
    push_children(&mut todo, b"", ROOT_INO)?;
    {
        while let Some((path, d)) = todo.pop() {
            let (t, rec) = stack.inode(engine, d.ino)?.ok_or_else(|| {
                Error::Db(format!(
                    "directory entry {:?} names missing inode {}",
                    String::from_utf8_lossy(&path),
                    d.ino
                ))
            })?;
            let mut h = tar::Header::new_ustar();
            h.set_mode(rec.perm);
            h.set_uid(rec.uid as u64);
            h.set_gid(rec.gid as u64);
            h.set_mtime(rec.mtime.secs.max(0) as u64);
            h.set_size(0);
            let mut pax = xattr_records(engine, t, d.ino)?;
            pax.extend(mtime_record(&rec));
            if rec.kind != Kind::Dir {
                if let Some(first) = seen.get(&d.ino) {
                    h.set_entry_type(tar::EntryType::Link);
                    append_entry(
                        &mut b,
                        &mut h,
                        &path,
                        Some(first),
                        Vec::new(),
                        &mut std::io::empty(),
                    )
                    .map_err(io)?;
                    continue;
                }
                if rec.nlink > 1 {
                    seen.insert(d.ino, path.clone());
                }
            }
            match rec.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    let mut p = path.clone();
                    p.push(b'/');
                    append_entry(&mut b, &mut h, &p, None, pax, &mut std::io::empty())
                        .map_err(io)?;
                    push_children(&mut todo, &path, d.ino)?;
                }
                Kind::File => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(rec.size);
                    let mut r = FileReader {
                        store,
                        extents: extents_of(engine, t, d.ino)?,
                        size: rec.size,
                        pos: 0,
                        buf: Vec::new(),
                        buf_at: 0,
                    };
                    append_entry(&mut b, &mut h, &path, None, pax, &mut r).map_err(|e| {
                        // A chunk that fails verification surfaces here: name the file.
                        Error::io(
                            format!(
                                "exporting {:?}",
                                String::from_utf8_lossy(&path).into_owned()
                            ),
                            e,
                        )
                    })?;
                    done += rec.size;
                    counted(done);
                }
                Kind::Symlink => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    append_entry(
                        &mut b,
                        &mut h,
                        &path,
                        Some(&rec.target),
                        pax,
                        &mut std::io::empty(),
                    )
                    .map_err(io)?;
                }
                Kind::Fifo | Kind::CharDev | Kind::BlockDev => {
                    h.set_entry_type(match rec.kind {
                        Kind::Fifo => tar::EntryType::Fifo,
                        Kind::CharDev => tar::EntryType::Char,
                        _ => tar::EntryType::Block,
                    });
                    let dev = rec.rdev as libc::dev_t;
                    h.set_device_major(libc::major(dev)).map_err(io)?;
                    h.set_device_minor(libc::minor(dev)).map_err(io)?;
                    append_entry(&mut b, &mut h, &path, None, pax, &mut std::io::empty())
                        .map_err(io)?;
                }
                Kind::Socket => {} // tar has no sockets
            }
        }
    }
    b.finish().map_err(io)?;
    Ok(done)
}

/// One path of a merged image: where its inode comes from.
#[derive(Clone, Copy)]
struct Source {
    tree: TreeId,
    ino: u64,
    kind: Kind,
}

/// Applies layer tree `t` onto `paths` (path components -> source), honouring whiteouts and
/// opaque directories.
fn apply(engine: &dyn Engine, t: TreeId, paths: &mut BTreeMap<Vec<Vec<u8>>, Source>) -> Result<()> {
    let remove_under =
        |paths: &mut BTreeMap<Vec<Vec<u8>>, Source>, p: &[Vec<u8>], keep_self: bool| {
            let doomed: Vec<Vec<Vec<u8>>> = paths
                .range(p.to_vec()..)
                .take_while(|(k, _)| k.starts_with(p))
                .filter(|(k, _)| !(keep_self && k.len() == p.len()))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                paths.remove(&k);
            }
        };
    let mut stack: Vec<(Vec<Vec<u8>>, u64)> = vec![(Vec::new(), ROOT_INO)];
    paths.insert(
        Vec::new(),
        Source {
            tree: t,
            ino: ROOT_INO,
            kind: Kind::Dir,
        },
    );
    while let Some((dir_path, dir)) = stack.pop() {
        let entries = children(engine, t, dir)?;
        if entries.iter().any(|(n, _)| n == OPAQUE) {
            remove_under(paths, &dir_path, true);
        }
        for (name, d) in entries {
            if name == OPAQUE {
                continue;
            }
            let mut p = dir_path.clone();
            if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                p.push(hidden.to_vec());
                remove_under(paths, &p, false);
                continue;
            }
            p.push(name);
            let existing = paths.get(&p).map(|s| s.kind);
            if !(existing == Some(Kind::Dir) && d.kind == Kind::Dir) {
                remove_under(paths, &p, false);
            }
            paths.insert(
                p.clone(),
                Source {
                    tree: t,
                    ino: d.ino,
                    kind: d.kind,
                },
            );
            if d.kind == Kind::Dir {
                stack.push((p, d.ino));
            }
        }
    }
    Ok(())
}

/// The base tree of a volume on image layers `ids` (bottom first): a merged tree, made once per
/// list of ids and shared. Returns the tree, its inode high-water mark and the bytes its files
/// cover (the new volume's used bytes).
pub fn merged(store: &Store, ids: &[LayerId]) -> Result<(TreeId, u64, i64)> {
    let engine = &*store.engine;
    let mut trees = Vec::new();
    for id in ids {
        let t =
            layer::layer_tree(engine, id)?.ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        trees.push(t);
    }
    let mut h = blake3::Hasher::new();
    for id in ids {
        h.update(&id.0);
    }
    let key = [b"merged/".as_slice(), h.finalize().as_bytes()].concat();
    if let Some(v) = engine.get(Cf::Meta, &key)? {
        if let Ok(b) = <[u8; 8]>::try_from(v.as_slice()) {
            let t = TreeId(u64::from_be_bytes(b));
            if let Some(rec) = layer::get_tree(engine, t)? {
                return Ok((t, rec.ino_hw, rec.bytes as i64));
            }
        }
    }
    let mut paths = BTreeMap::new();
    for t in &trees {
        apply(engine, *t, &mut paths)?;
    }
    let _gc = store.chunks.writer();
    let mut w = TreeWriter::new(store)?;
    // Number the inodes: the root is 1; hard links within one layer stay links.
    let mut inos: HashMap<(TreeId, u64), u64> = HashMap::new();
    let mut nlinks: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut by_path: HashMap<Vec<Vec<u8>>, u64> = HashMap::new();
    for (p, s) in &paths {
        let ino = if p.is_empty() {
            ROOT_INO
        } else {
            match inos.get(&(s.tree, s.ino)) {
                Some(i) if s.kind != Kind::Dir => *i,
                _ => w.alloc(),
            }
        };
        let first = !inos.contains_key(&(s.tree, s.ino)) || s.kind == Kind::Dir;
        inos.insert((s.tree, s.ino), ino);
        by_path.insert(p.clone(), ino);
        *nlinks.entry(ino).or_default() += 1;
        if let Some((name, parent_path)) = p.split_last() {
            let parent = by_path.get(parent_path).copied().unwrap_or(ROOT_INO);
            w.dirent(parent, name, Dirent { ino, kind: s.kind })?;
            if s.kind == Kind::Dir {
                *subdirs.entry(parent).or_default() += 1;
            }
        }
        if first {
            for (off, e) in extents_of(engine, s.tree, s.ino)? {
                w.extent(ino, off, &e)?;
            }
            for (k, v) in engine.scan_prefix(Cf::Xattrs, &meta::inode_key(s.tree, s.ino))? {
                w.xattr(ino, &k[16..], &v)?;
            }
        }
    }
    let mut written = std::collections::HashSet::new();
    for (p, s) in &paths {
        let ino = by_path[p];
        if !written.insert(ino) {
            continue; // another link to an inode already written
        }
        let mut rec = read_inode(engine, s.tree, s.ino)?;
        rec.nlink = if s.kind == Kind::Dir {
            2 + subdirs.get(&ino).copied().unwrap_or(0)
        } else {
            nlinks.get(&ino).copied().unwrap_or(1)
        };
        if s.kind == Kind::File {
            w.bytes += rec.alloc;
        }
        w.inode(ino, &rec)?;
    }
    let (hw, used) = (w.next_ino, w.bytes as i64);
    let origin = format!("merge of {} layer(s)", ids.len());
    let (_, t, _) = w.finish(TreeKind::Merged, origin)?;
    let mut b = Batch::new();
    b.put(Cf::Meta, key, t.0.to_be_bytes().to_vec());
    engine.write(b, true)?;
    Ok((t, hw, used))
}

/// A layer as listed by `volfs layer ls`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LayerInfo {
    pub id: String,
    pub kind: String,
    pub created: i64,
    pub bytes: u64,
    pub origin: String,
}

/// Every sealed layer.
pub fn list(engine: &dyn Engine) -> Result<Vec<LayerInfo>> {
    let trees = layer::all_trees(engine)?;
    let mut out = Vec::new();
    engine.scan(Cf::Layers, b"", &[0xff; 33], &mut |k, v| {
        let t = <[u8; 8]>::try_from(v)
            .map(|b| TreeId(u64::from_be_bytes(b)))
            .map_err(|_| Error::Encoding("layer index entry".into()))?;
        let id = <[u8; 32]>::try_from(k)
            .map(LayerId)
            .map_err(|_| Error::Encoding("layer key".into()))?;
        if let Some(rec) = trees.get(&t) {
            out.push(LayerInfo {
                id: id.to_hex(),
                kind: format!("{:?}", rec.kind).to_lowercase(),
                created: rec.created,
                bytes: rec.bytes,
                origin: rec.origin.clone(),
            });
        }
        Ok(true)
    })?;
    Ok(out)
}

/// Forgets an imported layer: gc frees it once no volume's base uses its data.
pub fn remove(store: &Store, id: &LayerId) -> Result<()> {
    let engine = &*store.engine;
    let t = layer::layer_tree(engine, id)?.ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
    let rec = layer::get_tree(engine, t)?.ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
    if rec.kind != TreeKind::Import {
        return Err(Error::Invalid(format!(
            "layer {id} is part of a volume or snapshot ({:?}); remove those instead",
            rec.kind
        )));
    }
    let mut b = Batch::new();
    b.delete(Cf::Layers, id.0.to_vec());
    engine.write(b, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse() {
        let t = |s: &str| pax_time(s.as_bytes()).map(|t| (t.secs, t.nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("12.0000000019"), Some((12, 1)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t("x"), None);
    }
}
