//! Trees, layers and snapshots: the records that make a volume a stack of immutable layers
//! under one writable top, the overlay lookups through such a stack, and sealing (naming a
//! frozen tree by the BLAKE3 hash of its canonical encoding, its [`LayerId`]).
//!
//! Model (details and encodings in docs/FORMAT.md and docs/ARCHITECTURE.md):
//! - A **tree** is a namespace of inodes, directory entries, extents and xattrs in the index,
//!   keyed by [`TreeId`]. A volume's writable **top** is a tree. A tree that will never change
//!   again is **frozen** and has a [`TreeRecord`] in the `trees` column family.
//! - A volume is `top` plus `lower`: frozen trees, topmost first. Lookups go top-down; the
//!   first tree that has an inode record (or directory entry) answers. An empty value is a
//!   **whiteout**: the inode or entry was deleted in that tree, and lower trees are not asked.
//! - Inodes are owned whole: the highest tree holding an inode's record also holds all its
//!   extents and xattrs. Changing an inode that lives in a lower tree first copies its record,
//!   extents and xattrs into the top (copy-up; metadata only, chunks are shared).
//! - Directory entries overlay per name, so a directory with many entries is never copied.
//! - Every tree records its inode high-water mark (`ino_hw`): inode numbers at or above it do
//!   not exist in it, so lookups of newer inodes skip the lower trees.
//! - A **snapshot** freezes the top (it becomes the topmost lower tree) and gives the volume a
//!   new empty top: O(1), whatever the volume holds. A clone is a new top over the same stack.
//! - A **layer** is a sealed tree: its [`LayerId`] is BLAKE3 over its canonical encoding and
//!   its parent's LayerId, so equal ids mean equal filesystem state. Frozen snapshot trees are
//!   sealed in the background; imported and merged trees are sealed when they are written.
//!
//! Durability: every change here is one atomic batch; freezes, snapshot and layer records are
//! written with a synced WAL.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::db::{Batch, Cf, Engine};
use crate::error::{Error, Result};
use crate::ids::{LayerId, TreeId, VolumeId};
use crate::meta::{self, Dirent, InodeRecord, DIRENT_VERSION, INODE_VERSION};
use crate::store::Store;

/// The column families that hold a tree's contents, in canonical-encoding order.
pub const TREE_CFS: [Cf; 4] = [Cf::Inodes, Cf::Dirents, Cf::Extents, Cf::Xattrs];

pub const TREE_VERSION: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeKind {
    /// A volume's former top, frozen by a snapshot or a clone.
    Frozen,
    /// A layer imported from an image layer tarball (whiteouts kept as `.wh.` files).
    Import,
    /// The path-wise merge of a stack of imported layers, the base of `--layers` volumes.
    Merged,
}

/// `trees`: tree id -> TreeRecord.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeRecord {
    pub kind: TreeKind,
    /// Unix seconds.
    pub created: i64,
    /// Inode numbers at or above this do not exist in the tree.
    pub ino_hw: u64,
    /// The tree directly below this one when it was frozen (its LayerId is part of ours).
    pub parent: Option<TreeId>,
    /// Set once sealed.
    pub layer: Option<LayerId>,
    /// Where the tree came from: the volume it was frozen from, or the imported file.
    pub origin: String,
    /// Logical bytes (sum of file sizes) of the tree's own files; for layer listings.
    pub bytes: u64,
}

pub const SNAPSHOT_VERSION: u8 = 1;

/// `snapshots`: volume id | name -> SnapshotRecord.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// Unix seconds.
    pub created: i64,
    /// The frozen top at the time of the snapshot.
    pub tree: TreeId,
    /// The trees below it, topmost first.
    pub lower: Vec<TreeId>,
    /// The volume's used bytes at the time of the snapshot (restored by rollback).
    pub used: i64,
}

impl SnapshotRecord {
    /// All trees of the snapshot, topmost first.
    pub fn trees(&self) -> Vec<TreeId> {
        let mut t = vec![self.tree];
        t.extend_from_slice(&self.lower);
        t
    }
}

pub fn tree_key(t: TreeId) -> Vec<u8> {
    t.0.to_be_bytes().to_vec()
}

pub fn snapshot_prefix(v: VolumeId) -> Vec<u8> {
    v.0.to_be_bytes().to_vec()
}

pub fn snapshot_key(v: VolumeId, name: &str) -> Vec<u8> {
    let mut k = snapshot_prefix(v);
    k.extend_from_slice(name.as_bytes());
    k
}

/// A snapshot name: the same rule as volume names.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    crate::ids::VolumeName::new(name).map(|_| ()).map_err(|_| {
        Error::Invalid(format!(
            "snapshot name {name:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]* (at most 128 bytes)"
        ))
    })
}

/// Splits `VOLUME@SNAPSHOT`; the snapshot part is `None` without `@`.
pub fn split_ref(s: &str) -> Result<(crate::ids::VolumeName, Option<String>)> {
    match s.split_once('@') {
        Some((v, snap)) => {
            check_snapshot_name(snap)?;
            Ok((crate::ids::VolumeName::new(v)?, Some(snap.to_string())))
        }
        None => Ok((crate::ids::VolumeName::new(s)?, None)),
    }
}

pub fn is_whiteout(v: &[u8]) -> bool {
    v.is_empty()
}

pub fn get_tree(engine: &dyn Engine, t: TreeId) -> Result<Option<TreeRecord>> {
    engine
        .get(Cf::Trees, &tree_key(t))?
        .map(|v| meta::decode(TREE_VERSION, "tree record", &v))
        .transpose()
}

pub fn put_tree(b: &mut Batch, t: TreeId, rec: &TreeRecord) {
    b.put(Cf::Trees, tree_key(t), meta::encode(TREE_VERSION, rec));
}

/// One frozen tree of a stack, with the bound that lets lookups skip it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lower {
    pub tree: TreeId,
    pub ino_hw: u64,
}

/// A volume's (or a snapshot's) trees, as lookups see them.
#[derive(Clone, Debug)]
pub struct Stack {
    pub top: TreeId,
    /// Topmost first.
    pub lower: Vec<Lower>,
}

impl Stack {
    /// Builds the stack of `top` over `lower`, reading each lower tree's record.
    pub fn load(engine: &dyn Engine, top: TreeId, lower: &[TreeId]) -> Result<Stack> {
        let mut out = Vec::with_capacity(lower.len());
        for t in lower {
            let rec = get_tree(engine, *t)?
                .ok_or_else(|| Error::Db(format!("layer tree {} is missing its record", t.0)))?;
            out.push(Lower {
                tree: *t,
                ino_hw: rec.ino_hw,
            });
        }
        Ok(Stack { top, lower: out })
    }

    /// Could any lower tree hold `ino`?
    pub fn lower_may_have(&self, ino: u64) -> bool {
        self.lower.iter().any(|l| ino < l.ino_hw)
    }

    /// The lower trees that can hold `ino`, topmost first.
    fn lowers_for(&self, ino: u64) -> impl Iterator<Item = TreeId> + '_ {
        self.lower
            .iter()
            .filter(move |l| ino < l.ino_hw)
            .map(|l| l.tree)
    }

    /// The inode record of `ino` and the tree that holds it.
    pub fn inode(&self, engine: &dyn Engine, ino: u64) -> Result<Option<(TreeId, InodeRecord)>> {
        for t in std::iter::once(self.top).chain(self.lowers_for(ino)) {
            if let Some(v) = engine.get(Cf::Inodes, &meta::inode_key(t, ino))? {
                if is_whiteout(&v) {
                    return Ok(None);
                }
                return Ok(Some((t, meta::decode(INODE_VERSION, "inode", &v)?)));
            }
        }
        Ok(None)
    }

    /// The directory entry `name` in directory `parent`.
    pub fn dirent(&self, engine: &dyn Engine, parent: u64, name: &[u8]) -> Result<Option<Dirent>> {
        for t in std::iter::once(self.top).chain(self.lowers_for(parent)) {
            if let Some(v) = engine.get(Cf::Dirents, &meta::dirent_key(t, parent, name))? {
                if is_whiteout(&v) {
                    return Ok(None);
                }
                return Ok(Some(meta::decode(DIRENT_VERSION, "directory entry", &v)?));
            }
        }
        Ok(None)
    }

    /// The merged entries of directory `parent`, in name order. Stops after `limit` entries.
    /// A single tree's entries come straight from the index, already in name order (no map:
    /// building one cost a quarter of a 100,000-entry listing).
    pub fn list(
        &self,
        engine: &dyn Engine,
        parent: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Dirent)>> {
        let trees: Vec<TreeId> = std::iter::once(self.top)
            .chain(self.lowers_for(parent))
            .collect();
        if trees.len() == 1 {
            let mut out = Vec::new();
            scan_dirents(engine, trees[0], parent, &mut |name, v| {
                if !is_whiteout(v) {
                    out.push((
                        name.to_vec(),
                        meta::decode(DIRENT_VERSION, "directory entry", v)?,
                    ));
                }
                Ok(out.len() < limit)
            })?;
            return Ok(out);
        }
        // Bottom-up: upper entries replace lower ones, whiteouts remove them.
        let mut merged: BTreeMap<Vec<u8>, Option<Dirent>> = BTreeMap::new();
        for t in trees.iter().rev() {
            scan_dirents(engine, *t, parent, &mut |name, v| {
                let d = if is_whiteout(v) {
                    None
                } else {
                    Some(meta::decode(DIRENT_VERSION, "directory entry", v)?)
                };
                merged.insert(name.to_vec(), d);
                Ok(true)
            })?;
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, d)| d.map(|d| (k, d)))
            .take(limit)
            .collect())
    }
}

fn scan_dirents(
    engine: &dyn Engine,
    t: TreeId,
    parent: u64,
    visit: &mut crate::db::Visit<'_>,
) -> Result<()> {
    let p = meta::dirent_prefix(t, parent);
    engine.scan(Cf::Dirents, &p, &crate::db::prefix_end(&p), &mut |k, v| {
        visit(&k[16..], v)
    })
}

/// Adds to `b` the deletion of everything in tree `t`, including its record. A sealed
/// tree's entry in `layers` is deleted too when it points at `t`.
pub fn delete_tree(engine: &dyn Engine, b: &mut Batch, t: TreeId) -> Result<()> {
    let p = meta::tree_prefix(t);
    for cf in TREE_CFS.iter().chain([Cf::Orphans].iter()) {
        b.delete_prefix(*cf, &p);
    }
    b.delete(Cf::Meta, meta::ino_hw_key(t));
    if let Some(rec) = get_tree(engine, t)? {
        if let Some(id) = rec.layer {
            if layer_tree(engine, &id)? == Some(t) {
                b.delete(Cf::Layers, id.0.to_vec());
            }
        }
        b.delete(Cf::Trees, tree_key(t));
    }
    Ok(())
}

/// The tree a sealed layer lives in.
pub fn layer_tree(engine: &dyn Engine, id: &LayerId) -> Result<Option<TreeId>> {
    engine
        .get(Cf::Layers, &id.0)?
        .map(|v| {
            v.as_slice()
                .try_into()
                .map(|b: [u8; 8]| TreeId(u64::from_be_bytes(b)))
                .map_err(|_| Error::Encoding("layer index entry".into()))
        })
        .transpose()
}

/// Computes the LayerId of tree `t` on top of the layer `parent`: BLAKE3 over
/// `"volfs-layer\0" | 1 | parent id or 32 zero bytes`, then for each column family of
/// [`TREE_CFS`] in order and each of the tree's rows in key order:
/// `cf index u8 | key length u32 LE | key without the tree prefix | value length u32 LE |
/// value`. Returns the id and the logical bytes (sum of file sizes) in the tree.
pub fn layer_id_of(
    engine: &dyn Engine,
    t: TreeId,
    parent: Option<LayerId>,
) -> Result<(LayerId, u64)> {
    let mut h = blake3::Hasher::new();
    h.update(b"volfs-layer\0");
    h.update(&[1]);
    h.update(&parent.map(|p| p.0).unwrap_or([0; 32]));
    let p = meta::tree_prefix(t);
    let mut bytes = 0u64;
    for (i, cf) in TREE_CFS.iter().enumerate() {
        engine.scan(*cf, &p, &crate::db::prefix_end(&p), &mut |k, v| {
            let k = &k[p.len()..];
            h.update(&[i as u8]);
            h.update(&(k.len() as u32).to_le_bytes());
            h.update(k);
            h.update(&(v.len() as u32).to_le_bytes());
            h.update(v);
            if *cf == Cf::Inodes && !is_whiteout(v) {
                if let Ok(r) = meta::decode::<InodeRecord>(INODE_VERSION, "inode", v) {
                    if r.kind == meta::Kind::File {
                        bytes += r.size;
                    }
                }
            }
            Ok(true)
        })?;
    }
    Ok((LayerId(*h.finalize().as_bytes()), bytes))
}

/// Seals frozen tree `t` (and, first, any unsealed tree below it): computes its LayerId and
/// records it. If another tree already has that id, both stay (their contents are equal);
/// the index keeps pointing at the first. Returns the id.
pub fn seal(store: &Store, t: TreeId) -> Result<LayerId> {
    let engine = &*store.engine;
    // Collect the unsealed chain from `t` down.
    let mut chain = Vec::new();
    let mut cur = Some(t);
    let mut parent_id = None;
    while let Some(c) = cur {
        let rec =
            get_tree(engine, c)?.ok_or_else(|| Error::Db(format!("tree {} has no record", c.0)))?;
        if let Some(id) = rec.layer {
            parent_id = Some(id);
            break;
        }
        cur = rec.parent;
        chain.push((c, rec));
    }
    let mut last = parent_id;
    for (c, mut rec) in chain.into_iter().rev() {
        let (id, bytes) = layer_id_of(engine, c, last)?;
        rec.layer = Some(id);
        rec.bytes = bytes;
        let mut b = Batch::new();
        put_tree(&mut b, c, &rec);
        if layer_tree(engine, &id)?.is_none() {
            b.put(Cf::Layers, id.0.to_vec(), c.0.to_be_bytes().to_vec());
        }
        engine.write(b, true)?;
        last = Some(id);
    }
    last.ok_or_else(|| Error::Db(format!("tree {} could not be sealed", t.0)))
}

/// Seals every frozen tree that has no LayerId yet (the background sealing worker).
pub fn seal_pending(store: &Store) -> Result<usize> {
    let mut pending = Vec::new();
    store.engine.scan(Cf::Trees, b"", &[0xff; 9], &mut |k, v| {
        let rec: TreeRecord = meta::decode(TREE_VERSION, "tree record", v)?;
        if rec.layer.is_none() {
            pending.push(TreeId(meta::u64_at(k, 0)?));
        }
        Ok(true)
    })?;
    let n = pending.len();
    for t in pending {
        seal(store, t)?;
    }
    Ok(n)
}

/// Every tree record, by tree id.
pub fn all_trees(engine: &dyn Engine) -> Result<BTreeMap<TreeId, TreeRecord>> {
    let mut out = BTreeMap::new();
    engine.scan(Cf::Trees, b"", &[0xff; 9], &mut |k, v| {
        out.insert(
            TreeId(meta::u64_at(k, 0)?),
            meta::decode(TREE_VERSION, "tree record", v)?,
        );
        Ok(true)
    })?;
    Ok(out)
}

/// The snapshots of a volume, by name.
pub fn snapshots(engine: &dyn Engine, v: VolumeId) -> Result<Vec<SnapshotRecord>> {
    engine
        .scan_prefix(Cf::Snapshots, &snapshot_prefix(v))?
        .into_iter()
        .map(|(_, v)| meta::decode(SNAPSHOT_VERSION, "snapshot record", &v))
        .collect()
}

pub fn get_snapshot(
    engine: &dyn Engine,
    v: VolumeId,
    name: &str,
) -> Result<Option<SnapshotRecord>> {
    engine
        .get(Cf::Snapshots, &snapshot_key(v, name))?
        .map(|v| meta::decode(SNAPSHOT_VERSION, "snapshot record", &v))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::MemEngine;
    use crate::meta::Kind;

    fn put_inode(e: &dyn Engine, t: TreeId, ino: u64, size: u64) {
        let mut r = InodeRecord::new(Kind::File, 0o644, 0, 0);
        r.size = size;
        let ts = meta::Ts { secs: 1, nsec: 0 };
        (r.atime, r.mtime, r.ctime, r.btime) = (ts, ts, ts, ts);
        let mut b = Batch::new();
        b.put(
            Cf::Inodes,
            meta::inode_key(t, ino),
            meta::encode(INODE_VERSION, &r),
        );
        e.write(b, false).unwrap();
    }

    fn put_dirent(e: &dyn Engine, t: TreeId, parent: u64, name: &[u8], ino: Option<u64>) {
        let v = ino
            .map(|ino| {
                meta::encode(
                    DIRENT_VERSION,
                    &Dirent {
                        ino,
                        kind: Kind::File,
                    },
                )
            })
            .unwrap_or_default();
        let mut b = Batch::new();
        b.put(Cf::Dirents, meta::dirent_key(t, parent, name), v);
        e.write(b, false).unwrap();
    }

    #[test]
    fn overlay_lookups_whiteouts_and_bounds() {
        let e = MemEngine::default();
        let (top, low) = (TreeId(2), TreeId(1));
        put_inode(&e, low, 5, 10);
        put_inode(&e, low, 6, 20);
        put_dirent(&e, low, 1, b"a", Some(5));
        put_dirent(&e, low, 1, b"b", Some(6));
        // Top deletes b and inode 6, adds c (inode 100, above the lower bound).
        put_dirent(&e, top, 1, b"b", None);
        let mut b = Batch::new();
        b.put(Cf::Inodes, meta::inode_key(top, 6), Vec::new());
        e.write(b, false).unwrap();
        put_inode(&e, top, 100, 30);
        put_dirent(&e, top, 1, b"c", Some(100));
        // A stray record above the bound in the lower tree must be invisible.
        put_inode(&e, low, 101, 1);
        let s = Stack {
            top,
            lower: vec![Lower {
                tree: low,
                ino_hw: 100,
            }],
        };
        assert_eq!(s.inode(&e, 5).unwrap().unwrap().0, low);
        assert!(s.inode(&e, 6).unwrap().is_none());
        assert_eq!(s.inode(&e, 100).unwrap().unwrap().0, top);
        assert!(s.inode(&e, 101).unwrap().is_none());
        assert!(s.dirent(&e, 1, b"b").unwrap().is_none());
        assert_eq!(s.dirent(&e, 1, b"a").unwrap().unwrap().ino, 5);
        let names: Vec<_> = s
            .list(&e, 1, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, vec![b"a".to_vec(), b"c".to_vec()]);
        assert_eq!(s.list(&e, 1, 1).unwrap().len(), 1);
    }

    #[test]
    fn layer_ids_depend_on_content_and_parent() {
        let e = MemEngine::default();
        put_inode(&e, TreeId(1), 2, 5);
        put_inode(&e, TreeId(2), 2, 5);
        put_inode(&e, TreeId(3), 2, 6);
        let a = layer_id_of(&e, TreeId(1), None).unwrap();
        let b = layer_id_of(&e, TreeId(2), None).unwrap();
        let c = layer_id_of(&e, TreeId(3), None).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
        assert_ne!(layer_id_of(&e, TreeId(1), Some(c.0)).unwrap().0, a.0);
        assert_eq!(a.1, 5);
    }

    #[test]
    fn snapshot_refs_parse() {
        let (v, s) = split_ref("db@before-migration").unwrap();
        assert_eq!(v.as_str(), "db");
        assert_eq!(s.as_deref(), Some("before-migration"));
        assert!(split_ref("db@").is_err());
        assert!(split_ref("db@a/b").is_err());
        assert_eq!(split_ref("db").unwrap().1, None);
    }
}
