//! `volfs fsck`: checks every reference between volumes, snapshots, trees, inodes, directory
//! entries, extents and chunks; verifies every chunk against its hash (scrub); reports leaks.
//! Problems are named by volume and path, so that a user knows which file is hurt.
//!
//! `--repair` fixes what can be fixed without inventing data:
//! - a directory entry whose inode is missing is removed from the volume's top (a whiteout
//!   when a lower tree holds it);
//! - an extent that points at a chunk missing from the index is removed from a top-owned
//!   file (those bytes read as zeros instead of EIO), and the file is named;
//! - a corrupt chunk nothing uses is dropped from the index;
//! - a corrupt chunk that files use is fetched from a [`ChunkSource`] (the daemon's peers),
//!   when one is given and holds an intact copy: the copy is verified against the chunk's id,
//!   appended to the current pack and the index entry repointed ([`ChunkStore::repair`]);
//!   this is safe in mounted volumes, snapshots and layers too, because chunks are immutable
//!   and named by their content;
//! - leaked trees and chunks are freed by running gc.
//!
//! What it cannot fix is listed as such: corrupt chunks that files use and no source holds,
//! other damage inside snapshots and layers (they are immutable).
//!
//! Chunks a lazily shipped replica has not fetched yet (a `missing/` record: they come from
//! peers on read or with `volfs volume pull`) are not problems; they are counted apart
//! (`not_fetched_chunks`) and never repaired away.
//!
//! [`ChunkStore::repair`]: crate::chunk::ChunkStore::repair
use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkSource;
use crate::db::{Batch, Cf};
use crate::error::Result;
use crate::gc;
use crate::ids::{ChunkId, TreeId};
use crate::layer::{self, Stack};
use crate::meta::{self, Kind};
use crate::progress::Progress;
use crate::store::Store;
use crate::volume::{Registry, ROOT_INO};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    /// `missing-tree`, `dangling-entry`, `missing-chunk`, `bad-extent`, `corrupt-chunk`.
    pub kind: String,
    pub detail: String,
    /// `repaired`, `not repaired: why`, or `-` without `--repair`.
    pub outcome: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FsckReport {
    pub volumes: u64,
    pub snapshots: u64,
    pub inodes: u64,
    pub chunks: u64,
    pub bytes_verified: u64,
    /// Garbage gc will free: trees nothing uses, and unused chunks (not problems).
    pub garbage_trees: u64,
    pub garbage_chunks: u64,
    pub garbage_bytes: u64,
    pub problems: Vec<Problem>,
    /// Corrupt chunks replaced by an intact copy from a peer (`--repair`).
    #[serde(default)]
    pub repaired_from_peers: Vec<PeerRepair>,
    /// Chunks a lazily shipped replica references but has not fetched yet (they have a
    /// `missing/` record): not damage, reads fetch them from peers and `volfs volume pull`
    /// fetches them all. Distinct chunks, and the volumes that reference them.
    #[serde(default)]
    pub not_fetched_chunks: u64,
    #[serde(default)]
    pub not_fetched_volumes: Vec<String>,
}

/// A corrupt chunk that was replaced by a verified copy from elsewhere.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRepair {
    pub chunk: String,
    /// Where the copy came from (`peer NAME (ADDR)`).
    pub from: String,
    /// The first file found using it, `-` when unknown (scrub walks no namespace).
    pub used_by: String,
}

/// Fetches an intact copy of `id` from `source` and stores it; `Ok(from)` or why not.
fn repair_from(
    store: &Store,
    source: &dyn ChunkSource,
    id: &ChunkId,
) -> std::result::Result<String, String> {
    let (data, from) = source.fetch(id)?;
    match store.chunks.repair(id, &data) {
        Ok(_) => {
            tracing::info!(chunk = %id, from, "corrupt chunk repaired");
            Ok(from)
        }
        Err(e) => Err(format!("{from}: {e}")),
    }
}

struct Walk<'a> {
    store: &'a Store,
    repair: bool,
    index: &'a HashMap<ChunkId, crate::chunk::ChunkLoc>,
    /// chunk -> the first file found using it
    users: HashMap<ChunkId, String>,
    problems: Vec<Problem>,
    inodes: u64,
    fix: Batch,
    /// Chunks not in the index that a lazy replica recorded as not fetched yet, and the
    /// volumes whose namespaces reference them.
    not_fetched: HashSet<ChunkId>,
    not_fetched_volumes: std::collections::BTreeSet<String>,
}

impl Walk<'_> {
    fn problem(&mut self, kind: &str, detail: String, outcome: &str) {
        tracing::warn!(kind, "fsck: {detail}");
        self.problems.push(Problem {
            kind: kind.into(),
            detail,
            outcome: outcome.into(),
        });
    }

    /// Walks one namespace (`label` is `volume` or `volume@snapshot`); `writable` says whether
    /// repairs may go into its top tree.
    fn namespace(&mut self, label: &str, stack: &Stack, writable: bool) -> Result<()> {
        let engine = self.store.engine.clone();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut dirs: Vec<(String, u64)> = vec![(String::new(), ROOT_INO)];
        if stack.inode(&*engine, ROOT_INO)?.is_none() {
            self.problem(
                "dangling-entry",
                format!("{label}: the root directory's inode is missing"),
                "not repaired: the volume has no root",
            );
            return Ok(());
        }
        while let Some((path, dir)) = dirs.pop() {
            for (name, d) in stack.list(&*engine, dir, usize::MAX)? {
                let p = format!("{path}/{}", String::from_utf8_lossy(&name));
                let Some((tree, rec)) = stack.inode(&*engine, d.ino)? else {
                    let outcome = if !self.repair {
                        "-"
                    } else if writable {
                        let key = meta::dirent_key(stack.top, dir, &name);
                        if stack.lower_may_have(dir) {
                            self.fix.put(Cf::Dirents, key, Vec::new());
                        } else {
                            self.fix.delete(Cf::Dirents, key);
                        }
                        "repaired"
                    } else {
                        "not repaired: the volume is mounted, or this is a snapshot"
                    };
                    self.problem(
                        "dangling-entry",
                        format!("{label}:{p} names inode {}, which does not exist", d.ino),
                        outcome,
                    );
                    continue;
                };
                if !seen.insert(d.ino) {
                    continue;
                }
                self.inodes += 1;
                match rec.kind {
                    Kind::Dir => dirs.push((p, d.ino)),
                    Kind::File => {
                        self.file(label, &p, tree, d.ino, writable && tree == stack.top)?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        label: &str,
        path: &str,
        tree: TreeId,
        ino: u64,
        top_owned: bool,
    ) -> Result<()> {
        let p = meta::inode_key(tree, ino);
        let rows = self.store.engine.scan_prefix(Cf::Extents, &p)?;
        for (k, v) in rows {
            let e: meta::Extent = meta::decode(meta::EXTENT_VERSION, "extent", &v)?;
            let off = meta::extent_offset(&k)?;
            match self.index.get(&e.chunk) {
                None if self.not_fetched.contains(&e.chunk)
                    || self
                        .store
                        .engine
                        .get(Cf::Meta, &crate::chunk::missing_key(&e.chunk))?
                        .is_some() =>
                {
                    // A lazy replica's chunk that has not arrived yet: not damage.
                    self.not_fetched.insert(e.chunk);
                    let vol = label.split('@').next().unwrap_or(label);
                    self.not_fetched_volumes.insert(vol.to_string());
                }
                None => {
                    let outcome = if !self.repair {
                        "-"
                    } else if top_owned {
                        self.fix.delete(Cf::Extents, k.clone());
                        "repaired: the range reads as zeros now"
                    } else {
                        "not repaired: the volume is mounted, or the file lives in a snapshot or layer"
                    };
                    self.problem(
                        "missing-chunk",
                        format!(
                            "{label}:{path}: bytes {off}..{} point at chunk {}, which is not in the store",
                            off + e.len as u64,
                            e.chunk
                        ),
                        outcome,
                    );
                }
                Some(loc) if e.chunk_off as u64 + e.len as u64 > loc.raw_len as u64 => {
                    self.problem(
                        "bad-extent",
                        format!(
                            "{label}:{path}: bytes {off}..{} want bytes {}..{} of {}-byte chunk {}",
                            off + e.len as u64,
                            e.chunk_off,
                            e.chunk_off + e.len,
                            loc.raw_len,
                            e.chunk
                        ),
                        if self.repair {
                            "not repaired: the extent's length is unknown"
                        } else {
                            "-"
                        },
                    );
                }
                Some(_) => {
                    self.users
                        .entry(e.chunk)
                        .or_insert_with(|| format!("{label}:{path}"));
                }
            }
        }
        Ok(())
    }
}

/// Checks the whole store; with `repair`, fixes what it can (see the module comment).
/// Volumes named in `mounted` are checked but not repaired (their files are in use), except
/// for corrupt chunks, which `source` (when given) may replace with a verified copy.
pub fn check(
    store: &Store,
    registry: &Registry,
    repair: bool,
    mounted: &HashSet<String>,
    progress: &Progress,
    source: Option<&dyn ChunkSource>,
) -> Result<FsckReport> {
    let engine = store.engine.clone();
    let index = gc::chunk_index(&*engine)?;
    let mut w = Walk {
        store,
        repair,
        index: &index,
        users: HashMap::new(),
        problems: Vec::new(),
        inodes: 0,
        fix: Batch::new(),
        not_fetched: HashSet::new(),
        not_fetched_volumes: Default::default(),
    };
    let mut rep = FsckReport::default();
    let trees = layer::all_trees(&*engine)?;
    let volumes = registry.list()?;
    progress.phase("namespaces", volumes.len() as u64);
    for v in volumes {
        progress.add(1);
        rep.volumes += 1;
        let writable = !mounted.contains(&v.name);
        let mut stacks = vec![(v.name.clone(), v.top, v.lower.clone(), writable)];
        for s in layer::snapshots(&*engine, v.id)? {
            rep.snapshots += 1;
            stacks.push((
                format!("{}@{}", v.name, s.name),
                s.tree,
                s.lower.clone(),
                false,
            ));
        }
        for (label, top, lower, writable) in stacks {
            let missing: Vec<TreeId> = lower
                .iter()
                .filter(|t| !trees.contains_key(t))
                .copied()
                .collect();
            if !missing.is_empty() {
                w.problem(
                    "missing-tree",
                    format!("{label}: layer trees {missing:?} are missing"),
                    if repair {
                        "not repaired: restore the volume from a backup"
                    } else {
                        "-"
                    },
                );
                continue;
            }
            let stack = Stack::load(&*engine, top, &lower)?;
            w.namespace(&label, &stack, writable)?;
        }
    }
    // Scrub: every chunk in the index, from disk.
    let mut corrupt_unused = Vec::new();
    let mut corrupt_found = Vec::new();
    let mut from_peers = Vec::new();
    progress.phase("scrub", index.len() as u64);
    for (id, loc) in &index {
        progress.add(1);
        rep.chunks += 1;
        match store.chunks.read_verified(id) {
            Ok(d) => rep.bytes_verified += d.len() as u64,
            Err(e) => {
                corrupt_found.push(*id);
                let user = w.users.get(id).cloned();
                let outcome = match (&user, repair, source) {
                    (_, false, _) => "-".to_string(),
                    (None, true, _) => {
                        corrupt_unused.push(*id);
                        "repaired: nothing used it; dropped from the index".to_string()
                    }
                    (Some(u), true, Some(src)) => match repair_from(store, src, id) {
                        Ok(from) => {
                            corrupt_found.retain(|c| c != id);
                            from_peers.push(PeerRepair {
                                chunk: id.to_string(),
                                from: from.clone(),
                                used_by: u.clone(),
                            });
                            format!("repaired: intact copy from {from}")
                        }
                        Err(why) => format!(
                            "not repaired: no intact copy on this host or its peers ({why}); restore the file"
                        ),
                    },
                    (Some(_), true, None) => {
                        "not repaired: no intact copy on this host; restore the file".to_string()
                    }
                };
                w.problem(
                    "corrupt-chunk",
                    format!(
                        "chunk {id} (pack {:08x} offset {}): {e}; used by {}",
                        loc.pack,
                        loc.offset,
                        user.as_deref().unwrap_or("nothing")
                    ),
                    &outcome,
                );
            }
        }
    }
    store.chunks.stats.set_known_corrupt(
        corrupt_found
            .into_iter()
            .filter(|id| !corrupt_unused.contains(id)),
    );
    for id in corrupt_unused {
        w.fix.delete(Cf::Chunks, id.0.to_vec());
    }
    // Leaks: dead trees, and chunks no live tree uses.
    let live = gc::live_trees(store, registry, &[])?;
    let dead: Vec<TreeId> = trees
        .keys()
        .filter(|t| !live.contains(t))
        .copied()
        .collect();
    let used = gc::mark(&*engine, &live)?;
    let mut leaked = (0u64, 0u64);
    for (id, loc) in &index {
        if !used.contains(id) {
            leaked.0 += 1;
            leaked.1 += loc.raw_len as u64;
        }
    }
    rep.garbage_trees = dead.len() as u64;
    (rep.garbage_chunks, rep.garbage_bytes) = leaked;
    let run_gc = repair && (!dead.is_empty() || leaked.0 > 0);
    if repair && !w.fix.is_empty() {
        engine.write(std::mem::take(&mut w.fix), true)?;
    }
    if run_gc {
        gc::collect(store, registry, &[], progress)?;
    }
    rep.inodes = w.inodes;
    rep.not_fetched_chunks = w.not_fetched.len() as u64;
    rep.not_fetched_volumes = w.not_fetched_volumes.into_iter().collect();
    rep.problems = w.problems;
    rep.repaired_from_peers = from_peers;
    Ok(rep)
}

/// What a scrub found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub chunks: u64,
    pub bytes_verified: u64,
    /// Chunks that failed verification (the log says why for each).
    pub corrupt: Vec<String>,
    pub millis: u64,
    /// Corrupt chunks that files use, replaced by a verified copy from a peer.
    #[serde(default)]
    pub repaired_from_peers: Vec<PeerRepair>,
}

/// Reads every chunk in the index from disk and verifies it against its hash, at most
/// `max_bytes_per_sec` (0: no limit), so that a background scrub leaves the disk to the
/// volumes. Unlike [`check`] it walks no namespace; the one repair it makes is of corrupt
/// chunks that live trees use, from `source` when given (a verified copy from a peer). What
/// stays corrupt becomes the store's set of known corrupt chunks (status and /metrics
/// report it).
pub fn scrub(
    store: &Store,
    registry: &Registry,
    progress: &Progress,
    max_bytes_per_sec: u64,
    source: Option<&dyn ChunkSource>,
) -> Result<ScrubReport> {
    let started = std::time::Instant::now();
    let index = gc::chunk_index(&*store.engine)?;
    let mut rep = ScrubReport::default();
    let mut found = Vec::new();
    progress.phase("scrub", index.len() as u64);
    for id in index.keys() {
        progress.add(1);
        rep.chunks += 1;
        match store.chunks.read_verified(id) {
            Ok(d) => rep.bytes_verified += d.len() as u64,
            // gc freed it since the index was read: not damage.
            Err(_) if store.chunks.location(id)?.is_none() => {}
            Err(crate::Error::Corrupt { .. }) => found.push(*id),
            Err(e) => return Err(e),
        }
        if max_bytes_per_sec > 0 {
            let due = std::time::Duration::from_secs_f64(
                rep.bytes_verified as f64 / max_bytes_per_sec as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    if let (Some(src), false) = (source, found.is_empty()) {
        // Only chunks files use are worth fetching; gc frees the others.
        let live = gc::live_trees(store, registry, &[])?;
        let used = gc::mark(&*store.engine, &live)?;
        progress.phase("repair", found.len() as u64);
        let mut left = Vec::new();
        for id in found {
            progress.add(1);
            if !used.contains(&id) {
                left.push(id);
                continue;
            }
            match repair_from(store, src, &id) {
                Ok(from) => rep.repaired_from_peers.push(PeerRepair {
                    chunk: id.to_string(),
                    from,
                    used_by: "-".into(),
                }),
                Err(why) => {
                    tracing::warn!(chunk = %id, "scrub: corrupt chunk not repaired: {why}");
                    left.push(id);
                }
            }
        }
        found = left;
    }
    rep.corrupt = found.iter().map(|id| id.to_string()).collect();
    store.chunks.stats.set_known_corrupt(found);
    rep.millis = started.elapsed().as_millis() as u64;
    tracing::info!(
        chunks = rep.chunks,
        bytes = rep.bytes_verified,
        corrupt = rep.corrupt.len(),
        "scrub done"
    );
    Ok(rep)
}
