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
            self.store.engine.write(std::mem::take(&mut self.b), false)?;
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
        self.b
            .put(Cf::Xattrs, meta::xattr_key(self.tree, ino, name), value.to_vec());
        self.maybe_flush()
    }

    /// Chunks a file's content into the store; returns (size, bytes covered by extents).
    fn data(&mut self, ino: u64, r: &mut dyn Read) -> Result<u64> {
        let chunks = self.store.chunks.clone();
        let mut off = 0u64;
        for c in fastcdc::v2020::StreamCDC::new(r, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
            let c = c.map_err(|e| Error::Invalid(format!("reading file data from the tarball: {e}")))?;
            let (id, loc) = chunks.put(&c.data)?;
            if let Some(loc) = loc {
                crate::chunk::ChunkStore::index(&mut self.b, &id, &loc);
            }
            self.extent(
                ino,
                off,
                &Extent {
                    chunk: id,
                    chunk_off: 0,
                    len: c.length as u32,
                },
            )?;
            off += c.length as u64;
        }
        self.bytes += off;
        Ok(off)
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
        b.put(Cf::Layers, id.0.to_vec(), self.tree.0.to_be_bytes().to_vec());
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

fn record_of(h: &tar::Header, kind: Kind) -> InodeRecord {
    let mut rec = InodeRecord::new(
        kind,
        h.mode().unwrap_or(0o644),
        h.uid().unwrap_or(0) as u32,
        h.gid().unwrap_or(0) as u32,
    );
    let t = Ts {
        secs: h.mtime().unwrap_or(0) as i64,
        nsec: 0,
    };
    rec.mtime = t;
    rec.atime = t;
    rec.ctime = t;
    rec
}

/// Imports a layer tarball (plain tar; Docker's `docker save` layers and OCI layer blobs
/// after decompression). Returns the layer id and whether the layer is new to the store.
pub fn import(store: &Store, path: &Path) -> Result<(LayerId, bool)> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    // Chunks put from here on are referenced only once the tree is written.
    let _gc = store.chunks.writer();
    let mut w = TreeWriter::new(store)?;
    // path -> (ino, kind); the root is ino 1.
    let mut paths: HashMap<Vec<Vec<u8>>, (u64, Kind)> = HashMap::new();
    let mut recs: BTreeMap<u64, InodeRecord> = BTreeMap::new();
    let mut root = InodeRecord::new(Kind::Dir, 0o755, 0, 0);
    root.nlink = 2;
    recs.insert(ROOT_INO, root);
    paths.insert(Vec::new(), (ROOT_INO, Kind::Dir));
    let bad = |e: std::io::Error| Error::Invalid(format!("{} is not a valid tarball: {e}", path.display()));
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let comps = components(&entry.path_bytes())?;
        let h = entry.header().clone();
        let ty = h.entry_type();
        let kind = match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Char => Kind::CharDev,
            tar::EntryType::Block => Kind::BlockDev,
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Link => Kind::File,
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
        if comps.is_empty() {
            // The root's own attributes.
            if let Some(r) = recs.get_mut(&ROOT_INO) {
                let n = record_of(&h, Kind::Dir);
                r.perm = n.perm;
                r.uid = n.uid;
                r.gid = n.gid;
                r.mtime = n.mtime;
            }
            continue;
        }
        // Parents, made as plain directories if the tarball did not list them.
        let mut parent = ROOT_INO;
        for i in 0..comps.len() - 1 {
            let p = comps[..=i].to_vec();
            parent = match paths.get(&p) {
                Some((ino, Kind::Dir)) => *ino,
                Some(_) => {
                    return Err(Error::Invalid(format!(
                        "tarball entry {:?}: a parent is not a directory",
                        String::from_utf8_lossy(&entry.path_bytes())
                    )))
                }
                None => {
                    let ino = w.alloc();
                    recs.insert(ino, InodeRecord::new(Kind::Dir, 0o755, 0, 0));
                    if let Some(pr) = recs.get_mut(&parent) {
                        pr.nlink += 1;
                    }
                    w.dirent(parent, &comps[i], Dirent { ino, kind: Kind::Dir })?;
                    paths.insert(p, (ino, Kind::Dir));
                    ino
                }
            };
        }
        let name = comps[comps.len() - 1].clone();
        if ty == tar::EntryType::Link {
            let target = entry.link_name_bytes().map(|c| c.to_vec()).unwrap_or_default();
            let tc = components(&target)?;
            let (ino, k) = *paths.get(&tc).ok_or_else(|| {
                Error::Invalid(format!(
                    "tarball hard link {:?} points at {:?}, which comes nowhere before it",
                    String::from_utf8_lossy(&entry.path_bytes()),
                    String::from_utf8_lossy(&target)
                ))
            })?;
            if k == Kind::Dir {
                return Err(Error::Invalid("tarball hard link to a directory".into()));
            }
            if let Some(r) = recs.get_mut(&ino) {
                r.nlink += 1;
            }
            w.dirent(parent, &name, Dirent { ino, kind: k })?;
            paths.insert(comps, (ino, k));
            continue;
        }
        if kind == Kind::Dir {
            if let Some((ino, Kind::Dir)) = paths.get(&comps) {
                // Listed after an implicit creation: take its attributes.
                let n = record_of(&h, Kind::Dir);
                if let Some(r) = recs.get_mut(ino) {
                    r.perm = n.perm;
                    r.uid = n.uid;
                    r.gid = n.gid;
                    r.mtime = n.mtime;
                }
                continue;
            }
        }
        if paths.contains_key(&comps) {
            return Err(Error::Invalid(format!(
                "tarball lists {:?} twice",
                String::from_utf8_lossy(&entry.path_bytes())
            )));
        }
        let ino = w.alloc();
        let mut rec = record_of(&h, kind);
        match kind {
            Kind::File => {
                rec.size = w.data(ino, &mut entry)?;
                rec.alloc = rec.size;
            }
            Kind::Symlink => {
                rec.target = entry.link_name_bytes().map(|c| c.to_vec()).unwrap_or_default();
                rec.size = rec.target.len() as u64;
            }
            Kind::CharDev | Kind::BlockDev => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                rec.rdev = libc::makedev(major, minor) as u32;
            }
            Kind::Dir => {
                if let Some(pr) = recs.get_mut(&parent) {
                    pr.nlink += 1;
                }
            }
            _ => {}
        }
        for (n, v) in xattrs {
            w.xattr(ino, &n, &v)?;
        }
        recs.insert(ino, rec);
        w.dirent(parent, &name, Dirent { ino, kind })?;
        paths.insert(comps, (ino, kind));
    }
    for (ino, rec) in &recs {
        w.inode(*ino, rec)?;
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
        .ok_or_else(|| Error::Db(format!("tree {} has a directory entry for missing inode {ino}", t.0)))?;
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
            let next = self.extents.iter().find(|(o, e)| o + e.len as u64 > self.pos);
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
                        .ok_or_else(|| std::io::Error::other(format!("extent past chunk {}", e.chunk)))?
                        .to_vec()
                }
                Some((o, _)) => vec![0; (*o).min(self.size).saturating_sub(self.pos).min(1 << 20) as usize],
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
        .map(|(k, v)| Ok((meta::extent_offset(&k)?, meta::decode(meta::EXTENT_VERSION, "extent", &v)?)))
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
                    .map(|(k, v)| (format!("SCHILY.xattr.{}", String::from_utf8_lossy(&k[16..])), v.clone()))
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
                    b.append_data(&mut h, format!("{p}/"), std::io::empty()).map_err(io)?;
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
    let remove_under = |paths: &mut BTreeMap<Vec<Vec<u8>>, Source>, p: &[Vec<u8>], keep_self: bool| {
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
        let t = layer::layer_tree(engine, id)?.ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
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
    for (p, s) in &paths {
        let ino = by_path[p];
        let mut rec = read_inode(engine, s.tree, s.ino)?;
        rec.nlink = if s.kind == Kind::Dir {
            2 + subdirs.get(&ino).copied().unwrap_or(0)
        } else {
            nlinks.get(&ino).copied().unwrap_or(1)
        };
        if s.kind == Kind::File && nlinks.get(&ino) == Some(&rec.nlink) {
            w.bytes += rec.alloc;
        }
        w.inode(ino, &rec)?;
        // Each linked inode once.
        nlinks.insert(ino, u32::MAX);
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
        let id = <[u8; 32]>::try_from(k).map(LayerId).map_err(|_| Error::Encoding("layer key".into()))?;
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
