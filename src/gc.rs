//! Garbage collection and space accounting: which trees and chunks are still used, freeing
//! the rest, compacting pack files, and `df`.
//!
//! Roots: every volume's top and lower trees, every snapshot's trees, every imported layer
//! still listed in `layers`, and trees the caller names (read-only snapshot mounts). Any other
//! tree is dead: its keys are deleted. A chunk is live when an extent of a live tree points
//! at it.
//!
//! Concurrency: a writer holds the chunk store's gc gate (shared) from its first `put`, or
//! from reading extents it will copy, until its index batch is written. [`collect`] holds the
//! gate exclusively while it deletes dead trees, marks live chunks and deletes the index
//! entries of dead ones, so it never sees a chunk that is stored but not yet referenced, and
//! nobody dedups against a chunk while it is being deleted. Writes wait for that phase (a
//! scan of the extents, ~0.1 s per 10 GiB of data). Pack compaction runs after it, without
//! the gate: it copies live chunks of mostly-dead packs into a new pack, syncs it, points the
//! index at the copies (synced), and only then removes the old pack.
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkLoc, RECORD_HEADER_LEN};
use crate::db::{Batch, Cf, Engine};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, TreeId};
use crate::layer::{self, TreeKind};
use crate::meta::{self, Extent};
use crate::progress::Progress;
use crate::store::Store;
use crate::volume::Registry;

/// A pack whose dead bytes exceed this fraction is compacted.
const COMPACT_DEAD_FRACTION: f64 = 0.25;

static GC: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub trees_freed: u64,
    pub chunks_freed: u64,
    /// Uncompressed bytes of the freed chunks.
    pub bytes_freed: u64,
    pub packs_compacted: u64,
    pub packs_removed: u64,
    /// Pack and index bytes on disk before and after.
    pub disk_before: u64,
    pub disk_after: u64,
    pub millis: u64,
}

/// The live trees: what volumes, snapshots and imported layers use, plus `extra`.
pub fn live_trees(store: &Store, registry: &Registry, extra: &[TreeId]) -> Result<HashSet<TreeId>> {
    let engine = &*store.engine;
    let mut live: HashSet<TreeId> = extra.iter().copied().collect();
    for v in registry.list()? {
        live.extend(v.trees());
        for s in layer::snapshots(engine, v.id)? {
            live.extend(s.trees());
        }
    }
    // Imported layers stay while `layers` lists them (until `layer rm`).
    for (t, rec) in layer::all_trees(engine)? {
        if let (TreeKind::Import, Some(id)) = (rec.kind, rec.layer) {
            if layer::layer_tree(engine, &id)? == Some(t) {
                live.insert(t);
            }
        }
    }
    Ok(live)
}

/// The chunks the extents of `trees` point at.
pub fn mark<'a>(
    engine: &dyn Engine,
    trees: impl IntoIterator<Item = &'a TreeId>,
) -> Result<HashSet<ChunkId>> {
    let mut marked = HashSet::new();
    for t in trees {
        for_each_extent(engine, *t, &mut |_, _, e| {
            marked.insert(e.chunk);
            Ok(())
        })?;
    }
    Ok(marked)
}

/// Every tree that has keys or a record, found by skipping from tree prefix to tree prefix.
fn present_trees(engine: &dyn Engine) -> Result<HashSet<TreeId>> {
    let mut out: HashSet<TreeId> = layer::all_trees(engine)?.into_keys().collect();
    for cf in layer::TREE_CFS {
        let mut from = 0u64;
        loop {
            let mut found = None;
            engine.scan(cf, &from.to_be_bytes(), &[0xff; 9], &mut |k, _| {
                found = Some(meta::u64_at(k, 0)?);
                Ok(false)
            })?;
            match found {
                Some(t) => {
                    out.insert(TreeId(t));
                    match t.checked_add(1) {
                        Some(n) => from = n,
                        None => break,
                    }
                }
                None => break,
            }
        }
    }
    Ok(out)
}

/// Calls `f` for every extent of tree `t`.
pub fn for_each_extent(
    engine: &dyn Engine,
    t: TreeId,
    f: &mut dyn FnMut(u64, u64, Extent) -> Result<()>,
) -> Result<()> {
    let p = meta::tree_prefix(t);
    engine.scan(Cf::Extents, &p, &crate::db::prefix_end(&p), &mut |k, v| {
        let ino = meta::u64_at(k, 8)?;
        let off = meta::extent_offset(k)?;
        f(ino, off, meta::decode(meta::EXTENT_VERSION, "extent", v)?)?;
        Ok(true)
    })
}

/// The chunk index: id -> location.
pub fn chunk_index(engine: &dyn Engine) -> Result<HashMap<ChunkId, ChunkLoc>> {
    let mut out = HashMap::new();
    engine.scan(Cf::Chunks, b"", &[0xff; 33], &mut |k, v| {
        let id = <[u8; 32]>::try_from(k)
            .map(ChunkId)
            .map_err(|_| Error::Encoding("chunk index key".into()))?;
        out.insert(id, ChunkLoc::decode(v)?);
        Ok(true)
    })?;
    Ok(out)
}

fn disk_bytes(store: &Store) -> u64 {
    store.chunks.disk_bytes() + store.rocks.disk_bytes()
}

/// Frees dead trees and chunks and compacts packs. One collection runs at a time.
pub fn collect(
    store: &Store,
    registry: &Registry,
    extra_roots: &[TreeId],
    progress: &Progress,
) -> Result<GcReport> {
    let _one = GC.lock();
    progress.phase("mark", 0);
    let started = Instant::now();
    let engine = &*store.engine;
    let mut rep = GcReport {
        disk_before: disk_bytes(store),
        ..Default::default()
    };
    // pack -> (live chunks with their locations, dead bytes)
    let mut packs: HashMap<u32, (Vec<(ChunkId, ChunkLoc)>, u64)> = HashMap::new();
    // Packs closed before the sweep; only these are compacted or removed.
    let mut closed = Vec::new();
    {
        let _gate = store.chunks.exclusive();
        registry.locked(|| -> Result<()> {
            let live = live_trees(store, registry, extra_roots)?;
            let mut b = Batch::new();
            for t in present_trees(engine)? {
                if !live.contains(&t) {
                    layer::delete_tree(engine, &mut b, t)?;
                    rep.trees_freed += 1;
                }
            }
            // Cached merges whose tree is gone.
            for (k, v) in engine.scan_prefix(Cf::Meta, b"merged/")? {
                let gone = <[u8; 8]>::try_from(v.as_slice())
                    .map(|b| !live.contains(&TreeId(u64::from_be_bytes(b))))
                    .unwrap_or(true);
                if gone {
                    b.delete(Cf::Meta, k);
                }
            }
            engine.write(b, true)?;
            let marked = mark(engine, &live)?;
            // Sweep the index.
            store.chunks.rotate()?;
            closed = store.chunks.packs()?;
            let mut b = Batch::new();
            let index = chunk_index(engine)?;
            progress.phase("sweep", index.len() as u64);
            for (id, loc) in index {
                progress.add(1);
                let p = packs.entry(loc.pack).or_default();
                if marked.contains(&id) {
                    p.0.push((id, loc));
                } else {
                    p.1 += RECORD_HEADER_LEN as u64 + loc.stored_len as u64;
                    rep.chunks_freed += 1;
                    rep.bytes_freed += loc.raw_len as u64;
                    b.delete(Cf::Chunks, id.0.to_vec());
                    store.chunks.evict(&id);
                }
            }
            engine.write(b, true)
        })?;
    }
    // Packs no index entry points into at all (records of failed commits, old garbage).
    for (pack, _) in &closed {
        packs.entry(*pack).or_default();
    }
    let closed: HashSet<u32> = closed.into_iter().map(|(p, _)| p).collect();
    // Compact.
    progress.phase("compact", packs.len() as u64);
    for (pack, (live, dead)) in packs {
        progress.add(1);
        if !closed.contains(&pack) {
            continue;
        }
        if live.is_empty() {
            store.chunks.remove_pack(pack)?;
            rep.packs_removed += 1;
            continue;
        }
        let live_bytes: u64 = live
            .iter()
            .map(|(_, l)| RECORD_HEADER_LEN as u64 + l.stored_len as u64)
            .sum();
        if (dead as f64) < COMPACT_DEAD_FRACTION * (dead + live_bytes) as f64 {
            continue;
        }
        if let Err(e) = compact_pack(store, pack, &live) {
            tracing::warn!(pack = format!("{pack:08x}"), "gc: pack not compacted: {e}");
            continue;
        }
        rep.packs_compacted += 1;
    }
    progress.phase("index compaction", 0);
    store.rocks.compact_all();
    rep.disk_after = disk_bytes(store);
    rep.millis = started.elapsed().as_millis() as u64;
    tracing::info!(
        trees = rep.trees_freed,
        chunks = rep.chunks_freed,
        bytes = rep.bytes_freed,
        packs_compacted = rep.packs_compacted,
        packs_removed = rep.packs_removed,
        "gc done"
    );
    Ok(rep)
}

/// Moves the live chunks of `pack` to the current pack, then removes `pack`. A chunk that
/// fails verification stays where it is (and the pack with it): fsck reports it.
fn compact_pack(store: &Store, pack: u32, live: &[(ChunkId, ChunkLoc)]) -> Result<()> {
    let mut moved = Vec::with_capacity(live.len());
    for (id, _) in live {
        let data = store.chunks.read_verified(id)?;
        moved.push((*id, store.chunks.relocate(id, &data)?));
    }
    store.chunks.sync()?;
    let mut b = Batch::new();
    for (id, loc) in &moved {
        crate::chunk::ChunkStore::index(&mut b, id, loc);
    }
    // Entries still pointing into the pack (another gc cannot run; a chunk re-put meanwhile
    // deduplicated against the entry) are all in `live`, so the pack is unreferenced now.
    store.engine.write(b, true)?;
    store.chunks.remove_pack(pack)
}

/// Space use of one volume, with its snapshots.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VolumeUsage {
    pub name: String,
    /// Bytes its files cover now.
    pub logical: u64,
    /// Stored bytes of chunks only this volume (or its snapshots) uses.
    pub exclusive: u64,
    /// Stored bytes of chunks it shares with other volumes.
    pub shared: u64,
    pub snapshots: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DfReport {
    /// Bytes the files of every volume and snapshot cover: what copies would take.
    pub logical: u64,
    /// Uncompressed bytes of the distinct chunks in use.
    pub stored: u64,
    /// `logical / stored`.
    pub dedup_ratio: f64,
    /// Bytes of pack files on disk (after compression; includes garbage until gc).
    pub pack_bytes: u64,
    /// Bytes of the metadata index's files.
    pub index_bytes: u64,
    /// Uncompressed bytes of chunks nothing uses (freed by gc).
    pub garbage: u64,
    pub volumes: Vec<VolumeUsage>,
}

/// Computes `volfs df`.
pub fn df(store: &Store, registry: &Registry) -> Result<DfReport> {
    let engine = &*store.engine;
    let index = chunk_index(engine)?;
    let vols = registry.list()?;
    // Every live tree's chunks, scanned once: volume and snapshot trees are among them.
    let mut tree_chunks: HashMap<TreeId, HashSet<ChunkId>> = HashMap::new();
    for t in live_trees(store, registry, &[])? {
        tree_chunks.insert(t, mark(engine, [&t])?);
    }
    // chunk -> indices of the volumes using it
    let mut owners: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    let mut rep = DfReport::default();
    for (i, v) in vols.iter().enumerate() {
        let snaps = layer::snapshots(engine, v.id)?;
        let mut trees: HashSet<TreeId> = v.trees().into_iter().collect();
        let used = registry.used_bytes(v)?;
        rep.logical += used;
        for s in &snaps {
            trees.extend(s.trees());
            rep.logical += s.used.max(0) as u64;
        }
        let mine: HashSet<&ChunkId> = trees
            .iter()
            .filter_map(|t| tree_chunks.get(t))
            .flatten()
            .collect();
        for c in mine {
            owners.entry(*c).or_default().push(i);
        }
        rep.volumes.push(VolumeUsage {
            name: v.name.clone(),
            logical: used,
            snapshots: snaps.len() as u64,
            ..Default::default()
        });
    }
    for (c, who) in &owners {
        let n = index.get(c).map(|l| l.raw_len as u64).unwrap_or(0);
        rep.stored += n;
        for i in who {
            if who.len() == 1 {
                rep.volumes[*i].exclusive += n;
            } else {
                rep.volumes[*i].shared += n;
            }
        }
    }
    // Chunks used only by imported layers count as stored, not garbage.
    let in_use: HashSet<&ChunkId> = tree_chunks.values().flatten().collect();
    for (c, l) in &index {
        if !owners.contains_key(c) {
            if in_use.contains(c) {
                rep.stored += l.raw_len as u64;
            } else {
                rep.garbage += l.raw_len as u64;
            }
        }
    }
    rep.dedup_ratio = if rep.stored == 0 {
        1.0
    } else {
        rep.logical as f64 / rep.stored as f64
    };
    rep.pack_bytes = store.chunks.disk_bytes();
    rep.index_bytes = store.rocks.disk_bytes();
    Ok(rep)
}
