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
struct TreeWriter<'a> {
    store: &'a Store,
    tree: TreeId,
    b: Batch,
    next_ino: u64,
    bytes: u64,
}

impl<'a> TreeWriter<'a> {
    fn new(store: &'a Store) -> Result<Self> {
        Ok(TreeWriter {
            store,
            tree: TreeId(store.next_id("tree")?),
            b: Batch::new(),
            next_ino: ROOT_INO + 1,
            bytes: 0,
        })
    }

    fn alloc(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.b.ops.len() >= BATCH_OPS {
            // The batch indexes chunks just put: their records must be in the OS first.
            self.store.chunks.flush()?;
            self.store
                .engine
                .write(std::mem::take(&mut self.b), false)?;
        }
        Ok(())
    }

    fn inode(&mut self, ino: u64, rec: &InodeRecord) -> Result<()> {
        self.b.put(
            Cf::Inodes,
            meta::inode_key(self.tree, ino),
            meta::encode(INODE_VERSION, rec),
        );
        self.maybe_flush()
    }

    fn dirent(&mut self, parent: u64, name: &[u8], d: Dirent) -> Result<()> {
        self.b.put(
            Cf::Dirents,
            meta::dirent_key(self.tree, parent, name),
            meta::encode(DIRENT_VERSION, &d),
        );
        self.maybe_flush()
    }

    fn extent(&mut self, ino: u64, off: u64, e: &Extent) -> Result<()> {
        self.b.put(
            Cf::Extents,
            meta::extent_key(self.tree, ino, off),
            meta::encode(meta::EXTENT_VERSION, e),
        );
        self.maybe_flush()
    }

    fn xattr(&mut self, ino: u64, name: &[u8], value: &[u8]) -> Result<()> {
        self.b.put(
            Cf::Xattrs,
            meta::xattr_key(self.tree, ino, name),
            value.to_vec(),
        );
        self.maybe_flush()
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
fn components(path: &[u8]) -> Result<Vec<Vec<u8>>> {
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
fn implicit_dir() -> InodeRecord {
    let mut rec = InodeRecord::new(Kind::Dir, 0o755, 0, 0);
    let t = Ts::default();
    (rec.atime, rec.mtime, rec.ctime, rec.btime) = (t, t, t, t);
    rec
}

/// One path of a tarball being imported.
struct Item {
    rec: InodeRecord,
    extents: Vec<(u64, Extent)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A hard link: the path whose inode this is.
    link_to: Option<Vec<Vec<u8>>>,
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
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    // Chunks put from here on are referenced only once the tree is written.
    let _gc = store.chunks.writer();
    let mut w = TreeWriter::new(store)?;
    let mut items: BTreeMap<Vec<Vec<u8>>, Item> = BTreeMap::new();
    items.insert(
        Vec::new(),
        Item {
            rec: implicit_dir(),
            extents: Vec::new(),
            xattrs: Vec::new(),
            link_to: None,
        },
    );
    let bad = |e: std::io::Error| {
        Error::Invalid(format!("{} is not a valid tarball: {e}", path.display()))
    };
    let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
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
            _ => continue, // PAX/GNU headers are read by `tar`; others carry no file.
        };
        let mut xattrs = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        // Parents the tarball did not list are plain directories.
        for i in 0..comps.len() {
            match items.get(&comps[..i]) {
                Some(it) if it.rec.kind == Kind::Dir && it.link_to.is_none() => {}
                Some(_) => {
                    return Err(Error::Invalid(format!(
                        "tarball entry {:?}: a parent is not a directory",
                        shown(&raw_path)
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
        let mut rec = record_of(&h, kind, &shown(&raw_path))?;
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
                            "tarball hard link {:?} points at {:?}, which is not a file listed before it",
                            shown(&raw_path),
                            shown(&target)
                        )))
                    }
                }
            }
            _ => match kind {
                Kind::File => {
                    let mut off = 0u64;
                    for c in
                        fastcdc::v2020::StreamCDC::new(&mut entry, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
                    {
                        let c = c.map_err(|e| {
                            Error::Invalid(format!(
                                "reading {:?} from the tarball: {e}",
                                shown(&raw_path)
                            ))
                        })?;
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
                    }
                    w.maybe_flush()?;
                    rec.size = off;
                    rec.alloc = off;
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
                                "tarball entry {:?}: bad device number: {e}",
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
        if comps.is_empty() {
            // The root's own attributes.
            if kind == Kind::Dir {
                if let Some(r) = items.get_mut(&comps) {
                    r.rec = rec;
                }
            }
            continue;
        }
        if let Some(old) = items.get(&comps) {
            if !(old.rec.kind == Kind::Dir && kind == Kind::Dir) {
                return Err(Error::Invalid(format!(
                    "tarball lists {:?} twice",
                    shown(&raw_path)
                )));
            }
        }
        items.insert(
            comps,
            Item {
                rec,
                extents: item_extents,
                xattrs,
                link_to,
            },
        );
    }
    // Number the inodes in path order; hard links share their target's.
    let mut inos: BTreeMap<Vec<Vec<u8>>, u64> = BTreeMap::new();
    let mut nlink: BTreeMap<u64, u32> = BTreeMap::new();
    for (p, _) in items.iter().filter(|(_, it)| it.link_to.is_none()) {
        let ino = if p.is_empty() { ROOT_INO } else { w.alloc() };
        inos.insert(p.clone(), ino);
    }
    for (p, it) in &items {
        let ino = match &it.link_to {
            Some(t) => inos.get(t).copied().ok_or_else(|| {
                Error::Invalid(format!("tarball hard link {:?} has no target", p))
            })?,
            None => inos[p],
        };
        inos.insert(p.clone(), ino);
        if it.rec.kind == Kind::Dir {
            if let Some((_, parent)) = p.split_last() {
                *nlink.entry(inos[parent]).or_insert(2) += 1;
            }
            nlink.entry(ino).or_insert(2);
        } else {
            *nlink.entry(ino).or_insert(0) += 1;
        }
    }
    for (p, it) in &items {
        let ino = inos[p];
        if let Some((name, parent)) = p.split_last() {
            w.dirent(
                inos[parent],
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
            w.bytes += rec.size;
        }
    }
    let origin = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (id, _, new) = w.finish(TreeKind::Import, origin)?;
    tracing::info!(layer = %id, new, "layer imported from {}", path.display());
    Ok((id, new))
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
    Ok(s.list(engine, ino, usize::MAX)?.into_iter().collect())
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
    let mut b = tar::Builder::new(out);
    let mut seen: HashMap<u64, Vec<u8>> = HashMap::new();
    let io = |e: std::io::Error| Error::io("writing the layer tarball", e);
    // Depth-first, in name order.
    let mut stack: Vec<(Vec<u8>, u64)> = vec![(Vec::new(), ROOT_INO)];
    while let Some((dir_path, dir)) = stack.pop() {
        let mut subdirs = Vec::new();
        for (name, d) in children(engine, t, dir)? {
            let mut path = dir_path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let rec = read_inode(engine, t, d.ino)?;
            let mut h = tar::Header::new_gnu();
            h.set_mode(rec.perm);
            h.set_uid(rec.uid as u64);
            h.set_gid(rec.gid as u64);
            h.set_mtime(rec.mtime.secs.max(0) as u64);
            h.set_size(0);
            let xattrs = engine.scan_prefix(Cf::Xattrs, &meta::inode_key(t, d.ino))?;
            if !xattrs.is_empty() {
                let pax: Vec<(String, Vec<u8>)> = xattrs
                    .iter()
                    .map(|(k, v)| {
                        (
                            format!("SCHILY.xattr.{}", String::from_utf8_lossy(&k[16..])),
                            v.clone(),
                        )
                    })
                    .collect();
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(io)?;
            }
            let p = String::from_utf8_lossy(&path).into_owned();
            if rec.kind != Kind::Dir {
                if let Some(first) = seen.get(&d.ino) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_link_name_literal(first).map_err(io)?;
                    b.append_data(&mut h, &p, std::io::empty()).map_err(io)?;
                    continue;
                }
                if rec.nlink > 1 {
                    seen.insert(d.ino, path.clone());
                }
            }
            match rec.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, format!("{p}/"), std::io::empty())
                        .map_err(io)?;
                    subdirs.push((path, d.ino));
                }
                Kind::File => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(rec.size);
                    let r = FileReader {
                        store,
                        extents: extents_of(engine, t, d.ino)?,
                        size: rec.size,
                        pos: 0,
                        buf: Vec::new(),
                        buf_at: 0,
                    };
                    b.append_data(&mut h, &p, r).map_err(io)?;
                }
                Kind::Symlink => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_link_name_literal(&rec.target).map_err(io)?;
                    b.append_data(&mut h, &p, std::io::empty()).map_err(io)?;
                }
                Kind::Fifo | Kind::CharDev | Kind::BlockDev | Kind::Socket => {
                    if rec.kind == Kind::Socket {
                        continue; // tar has no sockets
                    }
                    h.set_entry_type(match rec.kind {
                        Kind::Fifo => tar::EntryType::Fifo,
                        Kind::CharDev => tar::EntryType::Char,
                        _ => tar::EntryType::Block,
                    });
                    let dev = rec.rdev as libc::dev_t;
                    h.set_device_major(libc::major(dev)).map_err(io)?;
                    h.set_device_minor(libc::minor(dev)).map_err(io)?;
                    b.append_data(&mut h, &p, std::io::empty()).map_err(io)?;
                }
            }
        }
        subdirs.reverse();
        stack.extend(subdirs);
    }
    b.finish().map_err(io)?;
    Ok(())
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
