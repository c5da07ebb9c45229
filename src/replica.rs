//! Snapshot replication, the parts that are not networking: the replication records in the
//! index, reading a frozen tree as a stream of rows, and applying a received snapshot (its
//! trees and the replica volume's records) atomically on the receiving host. The daemon's
//! worker (`mountd/src/replication.rs`) and the peer protocol v2 (`mountd/src/peer/`) move
//! these between hosts.
//!
//! Layout (all in the `meta` column family, versioned records, no schema change; see
//! docs/FORMAT.md "Replication records"):
//! ```text
//! repl/<volume>        ReplSettings: replicas, rpo, per-replica progress   (origin host)
//! repl-in/<volume>     InboundRecord: origin host, last applied snapshot    (receiving host)
//! repl-fence/<volume>  u64 LE: the highest fencing token seen for the volume (receiving host)
//! repl-ship/<volume>   ASCII `lazy` or `full`: how snapshots are shipped (origin; absent: full)
//! missing/<chunk id>   chunk::MissingChunk: a chunk a lazily shipped replica lacks (receiver)
//! ```
//! Lazy shipping (`--opt ship=lazy`): the origin sends the trees and the commit but no
//! chunks; [`apply`] (with `lazy`) records every chunk the new trees reference that this host lacks
//! as a `missing/` key in the commit batch, and reads fetch them from peers
//! (`ChunkStore::get`'s fallback) or `volfs volume pull` fetches them all ([`lacking`]).
//! A row on the wire is `(cf index into layer::TREE_CFS, key without the 8-byte tree prefix,
//! value)`: exactly what [`crate::layer::layer_id_of`] hashes, so the receiver recomputes the
//! tree's [`LayerId`] from the rows and refuses a tree whose rows do not hash to its id.
//!
//! Durability contract: received chunks are stored as any chunk is (record flushed to the OS
//! before its index entry is written); [`apply`] syncs the chunk store and then writes every
//! row of every new tree, the tree and layer records, the replica volume's record, its
//! snapshot record and the inbound record in one synced batch. Nothing references a tree
//! before that batch, so a transfer cut at any point leaves only (verified, durable) chunks
//! behind. A snapshot already applied (same name, same top LayerId) is not applied again.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::db::{Batch, Cf, Engine};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, LayerId, TreeId, VolumeId};
use crate::layer::{self, SnapshotRecord, TreeKind, TreeRecord, SNAPSHOT_VERSION, TREE_CFS};
use crate::meta::{self, Extent, InodeRecord, Kind, VolumeRecord, EXTENT_VERSION, INODE_VERSION};
use crate::volume::Registry;

pub const REPL_VERSION: u8 = 1;
/// Version 2 added `token` and `settings` (version 1 records are read with token 0 and no
/// settings, see [`inbound`]).
pub const INBOUND_VERSION: u8 = 2;
/// Snapshots the replication worker takes for `rpo` start with this.
pub const AUTO_PREFIX: &str = "auto-";

/// `repl/<volume>` on the origin: what the user asked and how far each replica got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplSettings {
    /// Number of replica peers (0: not replicated).
    pub replicas: u32,
    /// Take and ship a snapshot this often when the volume changed (0: only user snapshots).
    pub rpo_secs: u64,
    /// Per replica peer (by peer name).
    pub progress: BTreeMap<String, ReplicaProgress>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaProgress {
    /// Snapshot names the replica holds -> the top LayerId shipped for them.
    pub shipped: BTreeMap<String, LayerId>,
    /// The newest snapshot shipped: name and creation time (unix seconds).
    pub last: Option<(String, i64)>,
}

/// `repl-in/<volume>` on a receiving host: this volume is a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundRecord {
    /// The origin host (its hello name).
    pub origin: String,
    /// The last applied snapshot, its creation time on the origin, when it was applied.
    pub last: String,
    pub last_created: i64,
    pub applied: i64,
    /// The fencing token the origin's last accepted commit carried (0: unknown, a version 1
    /// record). Another origin is accepted only with a higher token (a new owner after a
    /// promote or move).
    pub token: u64,
    /// The origin's replication settings as it last sent them (peer protocol v3), which a
    /// promote of this replica continues with; `None`: not known (an older origin).
    pub settings: Option<OriginSettings>,
}

/// Version 1 of [`InboundRecord`].
#[derive(Deserialize)]
struct InboundRecordV1 {
    origin: String,
    last: String,
    last_created: i64,
    applied: i64,
}

/// How the origin replicates a volume: what a replica carries along, so that a promoted
/// replica keeps replicating the same way (peer protocol v3, `CommitV3`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginSettings {
    pub replicas: u32,
    pub rpo_secs: u64,
    /// `ship=lazy`.
    pub lazy: bool,
}

/// What a commit says besides the snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// The sender's fencing token (already checked against `repl-fence/<volume>`).
    pub token: u64,
    /// A lazily shipped snapshot (chunks not all sent): see [`apply`].
    pub lazy: bool,
    /// The sender's settings, when its protocol carries them.
    pub settings: Option<OriginSettings>,
}

/// The origin's settings of `vol` to send along with a commit.
pub fn origin_settings(engine: &dyn Engine, vol: &str) -> Result<OriginSettings> {
    let s = settings(engine, vol)?.unwrap_or_default();
    Ok(OriginSettings {
        replicas: s.replicas,
        rpo_secs: s.rpo_secs,
        lazy: ship_lazy(engine, vol)?,
    })
}

pub fn settings_key(vol: &str) -> Vec<u8> {
    format!("repl/{vol}").into_bytes()
}
pub fn inbound_key(vol: &str) -> Vec<u8> {
    format!("repl-in/{vol}").into_bytes()
}
pub fn ship_key(vol: &str) -> Vec<u8> {
    format!("repl-ship/{vol}").into_bytes()
}

/// Is `vol` shipped lazily (trees and commit first, chunks on demand)?
pub fn ship_lazy(engine: &dyn Engine, vol: &str) -> Result<bool> {
    Ok(engine.get(Cf::Meta, &ship_key(vol))?.as_deref() == Some(b"lazy".as_slice()))
}

/// Parses the `ship` option: `lazy` or `full`; true for lazy.
pub fn parse_ship(v: &str) -> Result<bool> {
    match v.trim() {
        "lazy" => Ok(true),
        "full" => Ok(false),
        o => Err(Error::Invalid(format!(
            "option ship: {o:?} (expected lazy or full)"
        ))),
    }
}

/// Records how `vol` is shipped (synced).
pub fn set_ship(engine: &dyn Engine, vol: &str, lazy: bool) -> Result<()> {
    let mut b = Batch::new();
    let v: &[u8] = if lazy { b"lazy" } else { b"full" };
    b.put(Cf::Meta, ship_key(vol), v.to_vec());
    engine.write(b, true)
}

pub fn fence_key(vol: &str) -> Vec<u8> {
    format!("repl-fence/{vol}").into_bytes()
}

pub fn settings(engine: &dyn Engine, vol: &str) -> Result<Option<ReplSettings>> {
    engine
        .get(Cf::Meta, &settings_key(vol))?
        .map(|v| meta::decode(REPL_VERSION, "replication settings", &v))
        .transpose()
}

pub fn put_settings(engine: &dyn Engine, vol: &str, s: &ReplSettings) -> Result<()> {
    let mut b = Batch::new();
    b.put(Cf::Meta, settings_key(vol), meta::encode(REPL_VERSION, s));
    engine.write(b, true)
}

/// Every volume with replication settings, by name.
pub fn all_settings(engine: &dyn Engine) -> Result<Vec<(String, ReplSettings)>> {
    let mut out = Vec::new();
    for (k, v) in engine.scan_prefix(Cf::Meta, b"repl/")? {
        let name = String::from_utf8_lossy(&k[5..]).into_owned();
        out.push((
            name,
            meta::decode(REPL_VERSION, "replication settings", &v)?,
        ));
    }
    Ok(out)
}

/// Reads `repl-in/<vol>`, version 2 or 1 (token 0, no settings).
pub fn inbound(engine: &dyn Engine, vol: &str) -> Result<Option<InboundRecord>> {
    let Some(v) = engine.get(Cf::Meta, &inbound_key(vol))? else {
        return Ok(None);
    };
    if v.first() == Some(&1) {
        let o: InboundRecordV1 = meta::decode(1, "replica record", &v)?;
        return Ok(Some(InboundRecord {
            origin: o.origin,
            last: o.last,
            last_created: o.last_created,
            applied: o.applied,
            token: 0,
            settings: None,
        }));
    }
    meta::decode(INBOUND_VERSION, "replica record", &v).map(Some)
}

pub fn fence(engine: &dyn Engine, vol: &str) -> Result<u64> {
    match engine.get(Cf::Meta, &fence_key(vol))? {
        None => Ok(0),
        Some(v) => {
            Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
                |_| Error::Encoding("replication fencing token".into()),
            )?))
        }
    }
}

/// Checks a fencing token against the highest seen for `vol` and persists it (synced) when
/// it is higher. A lower token is refused, naming both.
pub fn check_fence(engine: &dyn Engine, vol: &str, token: u64) -> Result<()> {
    let seen = fence(engine, vol)?;
    if token < seen {
        return Err(Error::Invalid(format!(
            "fencing token {token} for volume {vol} is lower than {seen}, the highest this host has seen: refused (a newer owner exists)"
        )));
    }
    if token > seen {
        let mut b = Batch::new();
        b.put(Cf::Meta, fence_key(vol), token.to_le_bytes().to_vec());
        engine.write(b, true)?;
    }
    Ok(())
}

/// Parses an rpo like `30s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        Error::Invalid(format!(
            "duration {s:?}: expected a number with an optional unit (s, m, h)"
        ))
    })?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        u => {
            return Err(Error::Invalid(format!(
                "duration {s:?}: unknown unit {u:?}"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::Invalid(format!("duration {s:?} is out of range")))
}

/// One row of a tree (see the module header).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub cf: u8,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.key.len() + self.value.len() + 8
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// All rows of tree `t`, in canonical order (column family of [`TREE_CFS`], then key).
pub fn tree_rows(engine: &dyn Engine, t: TreeId) -> Result<Vec<Row>> {
    let p = meta::tree_prefix(t);
    let mut out = Vec::new();
    for (i, cf) in TREE_CFS.iter().enumerate() {
        engine.scan(*cf, &p, &crate::db::prefix_end(&p), &mut |k, v| {
            out.push(Row {
                cf: i as u8,
                key: k[p.len()..].to_vec(),
                value: v.to_vec(),
            });
            Ok(true)
        })?;
    }
    Ok(out)
}

/// Does tree `t` hold any row (has the volume changed since its last freeze)?
pub fn tree_has_rows(engine: &dyn Engine, t: TreeId) -> Result<bool> {
    let p = meta::tree_prefix(t);
    let mut any = false;
    for cf in TREE_CFS {
        engine.scan(cf, &p, &crate::db::prefix_end(&p), &mut |_, _| {
            any = true;
            Ok(false)
        })?;
        if any {
            return Ok(true);
        }
    }
    Ok(false)
}

fn extents_index() -> u8 {
    TREE_CFS.iter().position(|c| *c == Cf::Extents).unwrap_or(2) as u8
}

/// The chunks the extents among `rows` reference.
pub fn chunks_of(rows: &[Row]) -> Result<BTreeSet<ChunkId>> {
    let ext = extents_index();
    let mut out = BTreeSet::new();
    for r in rows.iter().filter(|r| r.cf == ext && !r.value.is_empty()) {
        let e: Extent = meta::decode(EXTENT_VERSION, "extent", &r.value)?;
        out.insert(e.chunk);
    }
    Ok(out)
}

/// The chunks the extents among `rows` reference, each with the bytes its extents reach
/// (the end of the furthest extent in it: a lower bound of its length).
pub fn chunk_lens(rows: &[Row]) -> Result<BTreeMap<ChunkId, u32>> {
    let ext = extents_index();
    let mut out: BTreeMap<ChunkId, u32> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.cf == ext && !r.value.is_empty()) {
        let e: Extent = meta::decode(EXTENT_VERSION, "extent", &r.value)?;
        let end = e.chunk_off.saturating_add(e.len);
        let v = out.entry(e.chunk).or_default();
        *v = (*v).max(end);
    }
    Ok(out)
}

/// Every chunk the volume `vol` (its top, its lower trees and every snapshot's trees)
/// references that this host does not hold, with the bytes its extents reach; sorted by id.
pub fn lacking(store: &crate::store::Store, rec: &VolumeRecord) -> Result<Vec<(ChunkId, u32)>> {
    let engine = &*store.engine;
    let mut trees: BTreeSet<TreeId> = BTreeSet::new();
    trees.insert(rec.top);
    trees.extend(rec.lower.iter().copied());
    for s in layer::snapshots(engine, rec.id)? {
        trees.insert(s.tree);
        trees.extend(s.lower.iter().copied());
    }
    let mut all: BTreeMap<ChunkId, u32> = BTreeMap::new();
    for t in trees {
        for (c, n) in chunk_lens(&tree_rows(engine, t)?)? {
            let v = all.entry(c).or_default();
            *v = (*v).max(n);
        }
    }
    let mut out = Vec::new();
    for (c, n) in all {
        if !store.chunks.contains(&c)? {
            out.push((c, n));
        }
    }
    Ok(out)
}

/// The LayerId of a tree made of `rows` on top of `parent`, as
/// [`crate::layer::layer_id_of`] computes it from the index; with the logical bytes.
pub fn layer_id_of_rows(rows: &[Row], parent: Option<LayerId>) -> Result<(LayerId, u64)> {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by(|a, b| (a.cf, &a.key).cmp(&(b.cf, &b.key)));
    let mut h = blake3::Hasher::new();
    h.update(b"volfs-layer\0");
    h.update(&[1]);
    h.update(&parent.map(|p| p.0).unwrap_or([0; 32]));
    let mut bytes = 0u64;
    for r in sorted {
        if r.cf as usize >= TREE_CFS.len() {
            return Err(Error::Invalid(format!(
                "row of unknown column family {}",
                r.cf
            )));
        }
        h.update(&[r.cf]);
        h.update(&(r.key.len() as u32).to_le_bytes());
        h.update(&r.key);
        h.update(&(r.value.len() as u32).to_le_bytes());
        h.update(&r.value);
        if TREE_CFS[r.cf as usize] == Cf::Inodes && !r.value.is_empty() {
            if let Ok(i) = meta::decode::<InodeRecord>(INODE_VERSION, "inode", &r.value) {
                if i.kind == Kind::File {
                    bytes += i.size;
                }
            }
        }
    }
    Ok((LayerId(*h.finalize().as_bytes()), bytes))
}

/// What the receiver is told about one tree of a shipped snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeMeta {
    pub layer: LayerId,
    pub parent: Option<LayerId>,
    pub kind: TreeKind,
    pub created: i64,
    pub ino_hw: u64,
}

/// A snapshot to apply on the receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    pub volume: String,
    /// The origin host.
    pub origin: String,
    pub snapshot: String,
    pub created: i64,
    pub used: i64,
    /// The snapshot's trees, topmost first.
    pub trees: Vec<TreeMeta>,
    /// Snapshot names of the origin still to keep on the replica (others are dropped).
    pub keep: Vec<String>,
}

/// What [`apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// New trees written (their number).
    New(usize),
    /// The snapshot was already there.
    Already,
}

/// The layers of `ids` this host holds (as sealed trees).
pub fn has_layers(engine: &dyn Engine, ids: &[LayerId]) -> Result<Vec<bool>> {
    ids.iter()
        .map(|id| layer::layer_tree(engine, id).map(|t| t.is_some()))
        .collect()
}

/// Applies a received snapshot (see the module header): `staged` holds the rows of every
/// tree of `inc` this host does not hold yet, by LayerId. Refuses a name taken by a local
/// (non-replica) volume, a replica of another origin unless `commit.token` is higher than the
/// token recorded with it (a new owner after a promote or move: the replica switches to the
/// new origin), a broken parent chain, rows that do not hash to their LayerId, and extents
/// whose chunks are not here. With `commit.lazy`, chunks the new trees reference that are not
/// here are recorded as `missing/<chunk id>` keys (`chunk::MissingChunk`) in the same batch
/// instead of refusing the commit.
///
/// Trees are applied by LayerId, so a new origin's snapshots reuse every tree this replica
/// already holds (the promoted volume starts at a snapshot of the old origin); snapshots the
/// new origin does not list in `keep` are dropped with its first applied snapshot, and a
/// same-named snapshot whose top tree came from another origin is replaced.
pub fn apply(
    reg: &Registry,
    inc: &Incoming,
    staged: &HashMap<LayerId, Vec<Row>>,
    commit: &CommitInfo,
) -> Result<Applied> {
    let lazy = commit.lazy;
    let name = crate::ids::VolumeName::new(&inc.volume)?;
    layer::check_snapshot_name(&inc.snapshot)?;
    if inc.trees.is_empty() {
        return Err(Error::Invalid("a snapshot without trees".into()));
    }
    for (i, t) in inc.trees.iter().enumerate() {
        let below = inc.trees.get(i + 1).map(|b| b.layer);
        if t.parent != below {
            return Err(Error::Invalid(format!(
                "tree {} of snapshot {}: its parent is not the tree below it",
                t.layer, inc.snapshot
            )));
        }
    }
    let store = reg.store().clone();
    let engine = &*store.engine;
    reg.locked(|| {
        let existing = reg.get(&name)?;
        let inb = inbound(engine, &inc.volume)?;
        let tree_origin = format!("{}:{}", inc.origin, inc.volume);
        if let Some(rec) = &existing {
            let prev = check_origin(inc, inb.as_ref(), commit.token)?;
            if let Some(s) = layer::get_snapshot(engine, rec.id, &inc.snapshot)? {
                let top = layer::get_tree(engine, s.tree)?;
                if top.as_ref().and_then(|t| t.layer) == Some(inc.trees[0].layer) {
                    if let (Some(prev), Some(i)) = (prev, &inb) {
                        // A new origin's first commit is of a snapshot held already: the
                        // replica follows the new origin from now on.
                        let mut b = Batch::new();
                        let rec = InboundRecord {
                            origin: inc.origin.clone(),
                            token: commit.token,
                            settings: commit.settings.or(i.settings),
                            ..i.clone()
                        };
                        b.put(
                            Cf::Meta,
                            inbound_key(&inc.volume),
                            meta::encode(INBOUND_VERSION, &rec),
                        );
                        engine.write(b, true)?;
                        tracing::info!(volume = %inc.volume, from = %prev, to = %inc.origin, token = commit.token, "replica follows a new origin (higher fencing token)");
                    }
                    return Ok(Applied::Already);
                }
                let from_other = top.as_ref().is_some_and(|t| t.origin != tree_origin);
                if !from_other {
                    return Err(Error::Exists(format!(
                        "replica {}@{} exists with other contents",
                        inc.volume, inc.snapshot
                    )));
                }
            }
            if let Some(prev) = prev {
                tracing::info!(volume = %inc.volume, from = %prev, to = %inc.origin, token = commit.token, "replica follows a new origin (higher fencing token)");
            }
        }
        let mut b = Batch::new();
        // Bottom first, so each tree's parent is known locally.
        let mut local: Vec<TreeId> = Vec::with_capacity(inc.trees.len());
        let mut new = 0usize;
        let mut missing = 0usize;
        for t in inc.trees.iter().rev() {
            let parent_tree = local.last().copied();
            if let Some(tree) = layer::layer_tree(engine, &t.layer)? {
                local.push(tree);
                continue;
            }
            let rows = staged.get(&t.layer).ok_or_else(|| {
                Error::Invalid(format!(
                    "tree {} of snapshot {} was neither sent nor held here",
                    t.layer, inc.snapshot
                ))
            })?;
            let (id, bytes) = layer_id_of_rows(rows, t.parent)?;
            if id != t.layer {
                return Err(Error::Invalid(format!(
                    "the rows sent for tree {} hash to {id}: refused",
                    t.layer
                )));
            }
            for (c, len) in chunk_lens(rows)? {
                if !store.chunks.contains(&c)? {
                    if lazy {
                        let m = crate::chunk::MissingChunk {
                            volume: inc.volume.clone(),
                            origin: inc.origin.clone(),
                            len,
                        };
                        b.put(
                            Cf::Meta,
                            crate::chunk::missing_key(&c),
                            meta::encode(crate::chunk::MISSING_VERSION, &m),
                        );
                        missing += 1;
                        continue;
                    }
                    return Err(Error::Invalid(format!(
                        "tree {} references chunk {c}, which has not arrived",
                        t.layer
                    )));
                }
            }
            let tree = TreeId(store.next_id("tree")?);
            let p = meta::tree_prefix(tree);
            for r in rows {
                let mut k = p.clone();
                k.extend_from_slice(&r.key);
                b.put(TREE_CFS[r.cf as usize], k, r.value.clone());
            }
            layer::put_tree(
                &mut b,
                tree,
                &TreeRecord {
                    kind: t.kind,
                    created: t.created,
                    ino_hw: t.ino_hw,
                    parent: parent_tree,
                    layer: Some(t.layer),
                    origin: tree_origin.clone(),
                    bytes,
                },
            );
            b.put(Cf::Layers, t.layer.0.to_vec(), tree.0.to_be_bytes().to_vec());
            local.push(tree);
            new += 1;
        }
        local.reverse();
        let top_hw = inc.trees[0].ino_hw;
        let rec = match existing {
            Some(mut rec) => {
                rec.lower = local.clone();
                rec.read_only = true;
                rec
            }
            None => VolumeRecord {
                id: VolumeId(store.next_id("volume")?),
                name: inc.volume.clone(),
                created: meta::Ts::now().secs,
                labels: BTreeMap::new(),
                size: None,
                read_only: true,
                top: TreeId(store.next_id("tree")?),
                lower: local.clone(),
                image: Vec::new(),
            },
        };
        let hw = match engine.get(Cf::Meta, &meta::ino_hw_key(rec.top))? {
            Some(v) if v.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&v);
                u64::from_le_bytes(a).max(top_hw)
            }
            _ => top_hw,
        };
        b.put(Cf::Meta, meta::ino_hw_key(rec.top), hw.to_le_bytes().to_vec());
        b.delete(Cf::Counters, meta::used_key(rec.id));
        b.add(Cf::Counters, meta::used_key(rec.id), inc.used);
        b.put(Cf::Volumes, inc.volume.as_bytes().to_vec(), rec.encode());
        let snap = SnapshotRecord {
            name: inc.snapshot.clone(),
            created: inc.created,
            tree: local[0],
            lower: local[1..].to_vec(),
            used: inc.used,
        };
        b.put(
            Cf::Snapshots,
            layer::snapshot_key(rec.id, &inc.snapshot),
            meta::encode(SNAPSHOT_VERSION, &snap),
        );
        for s in layer::snapshots(engine, rec.id)? {
            if s.name != inc.snapshot && !inc.keep.contains(&s.name) {
                b.delete(Cf::Snapshots, layer::snapshot_key(rec.id, &s.name));
            }
        }
        b.put(
            Cf::Meta,
            inbound_key(&inc.volume),
            meta::encode(
                INBOUND_VERSION,
                &InboundRecord {
                    origin: inc.origin.clone(),
                    last: inc.snapshot.clone(),
                    last_created: inc.created,
                    applied: meta::Ts::now().secs,
                    token: commit.token,
                    settings: commit
                        .settings
                        .or(inb.as_ref().and_then(|i| i.settings)),
                },
            ),
        );
        // Chunks first: nothing may reference a chunk less durable than the reference.
        store.chunks.sync()?;
        store.engine.write(b, true)?;
        tracing::info!(volume = %inc.volume, origin = %inc.origin, snapshot = %inc.snapshot, new_trees = new, lazy, missing_chunks = missing, "replica snapshot applied");
        Ok(Applied::New(new))
    })
}

/// The origin check of a commit to an existing replica: `Ok(None)` for its recorded
/// origin, `Ok(Some(previous origin))` for a new origin whose token is higher than the one
/// recorded (a new owner after a promote or move), an error for a local volume or another
/// origin with an equal or lower token (a stale or competing owner).
fn check_origin(inc: &Incoming, inb: Option<&InboundRecord>, token: u64) -> Result<Option<String>> {
    match inb {
        None => Err(Error::Exists(format!(
            "volume {} on this host is a local volume, not a replica of {}",
            inc.volume, inc.origin
        ))),
        Some(i) if i.origin == inc.origin => Ok(None),
        Some(i) if token > i.token => Ok(Some(i.origin.clone())),
        Some(i) => Err(Error::Exists(format!(
            "volume {} on this host is a replica of {} (fencing token {}); {} sent token {token}, which is not higher: refused (a stale or competing owner; a new owner after a promote or move has a higher token)",
            inc.volume, i.origin, i.token, inc.origin
        ))),
    }
}

/// Promote, last step: the replica `vol` (already rolled back to its last received snapshot:
/// an empty top over that snapshot's trees) becomes a normal writable volume: its record is
/// no longer read-only, its `repl-in` record is deleted (so replication into it stops) and,
/// when the origin's settings are known, `repl/<vol>` and `repl-ship/<vol>` take them over
/// (so the new owner keeps replicating with the same replica count, rpo and shipping), in
/// one synced batch. Returns the snapshot it starts from. Its snapshots stay.
pub fn finish_promote(reg: &Registry, vol: &str) -> Result<SnapshotRecord> {
    let name = crate::ids::VolumeName::new(vol)?;
    let engine = &*reg.store().engine;
    let inb = inbound(engine, vol)?
        .ok_or_else(|| Error::Invalid(format!("volume {vol} is not a replica here")))?;
    reg.locked(|| {
        let mut rec = reg.require(&name)?;
        let snap = layer::get_snapshot(engine, rec.id, &inb.last)?.ok_or_else(|| {
            Error::NotFound(format!("the last replicated snapshot {vol}@{}", inb.last))
        })?;
        rec.read_only = false;
        let mut b = Batch::new();
        b.put(Cf::Volumes, vol.as_bytes().to_vec(), rec.encode());
        b.delete(Cf::Meta, inbound_key(vol));
        // Keep replicating as the origin did (its settings came with its commits).
        if let Some(o) = inb.settings.filter(|o| o.replicas > 0 || o.rpo_secs > 0) {
            let s = ReplSettings {
                replicas: o.replicas,
                rpo_secs: o.rpo_secs,
                progress: BTreeMap::new(),
            };
            b.put(Cf::Meta, settings_key(vol), meta::encode(REPL_VERSION, &s));
            let ship: &[u8] = if o.lazy { b"lazy" } else { b"full" };
            b.put(Cf::Meta, ship_key(vol), ship.to_vec());
        }
        engine.write(b, true)?;
        tracing::info!(volume = %vol, origin = %inb.origin, snapshot = %snap.name, settings = ?inb.settings, "replica promoted: a writable volume now");
        Ok(snap)
    })
}

/// `volume move`, the giving side, last step: the local volume (already rolled back to the
/// moved snapshot) becomes a read-only replica of `origin` (its new owner): record read-only,
/// `repl-in/<vol>` naming `origin`, the snapshot, `token` and this host's settings of the
/// volume (until the new owner sends its own), this host's replication settings of the volume
/// dropped, and `repl-fence/<vol>` raised to `token` (single host: the new owner's).
pub fn make_replica(
    reg: &Registry,
    vol: &str,
    origin: &str,
    snap: &SnapshotRecord,
    token: u64,
) -> Result<()> {
    let name = crate::ids::VolumeName::new(vol)?;
    let engine = &*reg.store().engine;
    reg.locked(|| {
        let mut rec = reg.require(&name)?;
        rec.read_only = true;
        // What this host did with the volume, in case it is promoted back one day.
        let settings = origin_settings(engine, vol)?;
        let mut b = Batch::new();
        b.put(Cf::Volumes, vol.as_bytes().to_vec(), rec.encode());
        b.put(
            Cf::Meta,
            inbound_key(vol),
            meta::encode(
                INBOUND_VERSION,
                &InboundRecord {
                    origin: origin.to_string(),
                    last: snap.name.clone(),
                    last_created: snap.created,
                    applied: meta::Ts::now().secs,
                    token,
                    settings: Some(settings),
                },
            ),
        );
        b.delete(Cf::Meta, settings_key(vol));
        if token > fence(engine, vol)? {
            b.put(Cf::Meta, fence_key(vol), token.to_le_bytes().to_vec());
        }
        engine.write(b, true)?;
        tracing::info!(volume = %vol, origin, snapshot = %snap.name, "volume moved away: a read-only replica here now");
        Ok(())
    })
}

/// Stores a chunk received from a peer: verified against `id` first (a mismatch is refused
/// and nothing is written), then appended, flushed to the OS and indexed. Returns whether it
/// was new.
pub fn store_chunk(store: &crate::store::Store, id: &ChunkId, data: &[u8]) -> Result<bool> {
    if ChunkId::of(data) != *id {
        return Err(Error::Invalid(format!(
            "the bytes sent for chunk {id} do not match its hash: rejected, not stored"
        )));
    }
    let _gate = store.chunks.writer();
    let (_, loc) = store.chunks.put_hashed(*id, data)?;
    match loc {
        None => Ok(false),
        Some(loc) => {
            store.chunks.flush()?;
            let mut b = Batch::new();
            crate::chunk::ChunkStore::index(&mut b, id, &loc);
            // A lazily shipped replica may have recorded it as missing.
            b.delete(Cf::Meta, crate::chunk::missing_key(id));
            store.engine.write(b, false)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::MemEngine;

    #[test]
    fn rows_hash_like_the_index() {
        let e = MemEngine::default();
        let t = TreeId(7);
        let mut b = Batch::new();
        let mut r = InodeRecord::new(Kind::File, 0o644, 0, 0);
        r.size = 42;
        b.put(
            Cf::Inodes,
            meta::inode_key(t, 3),
            meta::encode(INODE_VERSION, &r),
        );
        b.put(Cf::Dirents, meta::dirent_key(t, 1, b"x"), vec![1, 2, 3]);
        b.put(Cf::Xattrs, meta::xattr_key(t, 3, b"user.a"), vec![9]);
        b.put(Cf::Inodes, meta::inode_key(t, 4), Vec::new());
        b.put(Cf::Inodes, meta::inode_key(TreeId(8), 4), vec![5]);
        e.write(b, false).unwrap();
        let rows = tree_rows(&e, t).unwrap();
        assert_eq!(rows.len(), 4);
        let parent = Some(LayerId([3; 32]));
        let want = layer::layer_id_of(&e, t, parent).unwrap();
        let mut shuffled = rows.clone();
        shuffled.reverse();
        assert_eq!(layer_id_of_rows(&shuffled, parent).unwrap(), want);
        assert_ne!(layer_id_of_rows(&rows, None).unwrap().0, want.0);
        assert!(tree_has_rows(&e, t).unwrap());
        assert!(!tree_has_rows(&e, TreeId(9)).unwrap());
    }

    #[test]
    fn fence_refuses_lower_tokens() {
        let e = MemEngine::default();
        check_fence(&e, "db", 0).unwrap();
        check_fence(&e, "db", 5).unwrap();
        assert_eq!(fence(&e, "db").unwrap(), 5);
        let err = check_fence(&e, "db", 4).unwrap_err().to_string();
        assert!(
            err.contains("fencing token 4") && err.contains('5'),
            "{err}"
        );
        check_fence(&e, "db", 5).unwrap();
        check_fence(&e, "other", 1).unwrap();
    }

    /// A tree of one inode row (`ino`), on top of `parent`, as a sender describes it.
    fn tree(ino: u64, parent: Option<LayerId>) -> (TreeMeta, Vec<Row>) {
        let rec = InodeRecord::new(Kind::Dir, 0o755, 0, 0);
        let rows = vec![Row {
            cf: 0,
            key: ino.to_be_bytes().to_vec(),
            value: meta::encode(INODE_VERSION, &rec),
        }];
        let (layer, _) = layer_id_of_rows(&rows, parent).unwrap();
        let m = TreeMeta {
            layer,
            parent,
            kind: TreeKind::Frozen,
            created: 1,
            ino_hw: ino,
        };
        (m, rows)
    }

    fn incoming(origin: &str, snap: &str, trees: &[&TreeMeta], keep: &[&str]) -> Incoming {
        Incoming {
            volume: "db".into(),
            origin: origin.into(),
            snapshot: snap.into(),
            created: 10,
            used: 0,
            trees: trees.iter().map(|t| (*t).clone()).collect(),
            keep: keep.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn commit(token: u64, replicas: u32) -> CommitInfo {
        CommitInfo {
            token,
            lazy: false,
            settings: Some(OriginSettings {
                replicas,
                rpo_secs: 30,
                lazy: false,
            }),
        }
    }

    #[test]
    fn a_replica_follows_a_new_origin_only_with_a_higher_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(
            crate::store::Store::open(dir.path(), &crate::store::StoreOptions::default()).unwrap(),
        );
        let reg = Registry::new(store.clone());
        let engine = &*store.engine;
        let snaps = |reg: &Registry| -> Vec<String> {
            let id = reg
                .require(&crate::ids::VolumeName::new("db").unwrap())
                .unwrap()
                .id;
            let mut v: Vec<String> = layer::snapshots(engine, id)
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect();
            v.sort();
            v
        };
        // Origin a (token 5) ships s1 (tree x) and s2 (tree y over x).
        let (x, xr) = tree(1, None);
        let (y, yr) = tree(2, Some(x.layer));
        let staged: HashMap<LayerId, Vec<Row>> =
            [(x.layer, xr.clone()), (y.layer, yr)].into_iter().collect();
        let s1 = incoming("a", "s1", &[&x], &["s1"]);
        assert_eq!(
            apply(&reg, &s1, &staged, &commit(5, 2)).unwrap(),
            Applied::New(1)
        );
        let s2 = incoming("a", "s2", &[&y, &x], &["s1", "s2"]);
        assert_eq!(
            apply(&reg, &s2, &staged, &commit(5, 2)).unwrap(),
            Applied::New(1)
        );
        let i = inbound(engine, "db").unwrap().unwrap();
        assert_eq!(
            (i.origin.as_str(), i.token, i.last.as_str()),
            ("a", 5, "s2")
        );

        // Another origin with an equal or lower token: refused, naming both.
        for t in [5, 4] {
            let e = apply(
                &reg,
                &incoming("b", "s1", &[&x], &["s1"]),
                &staged,
                &commit(t, 2),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("replica of a")
                    && e.contains("not higher")
                    && e.contains(&t.to_string()),
                "{e}"
            );
        }
        assert_eq!(inbound(engine, "db").unwrap().unwrap().origin, "a");

        // b, promoted at s1 with a higher token: its first commit (s1, held) switches the
        // replica to b; its own snapshot b1 (tree z over x) reuses x, and s2, which b never
        // had, is dropped.
        let b1 = incoming("b", "s1", &[&x], &["s1"]);
        assert_eq!(
            apply(&reg, &b1, &HashMap::new(), &commit(6, 1)).unwrap(),
            Applied::Already
        );
        let i = inbound(engine, "db").unwrap().unwrap();
        assert_eq!(
            (i.origin.as_str(), i.token, i.last.as_str()),
            ("b", 6, "s2")
        );
        let (z, zr) = tree(3, Some(x.layer));
        let staged_b: HashMap<LayerId, Vec<Row>> = [(z.layer, zr)].into_iter().collect();
        let b2 = incoming("b", "b1", &[&z, &x], &["s1", "b1"]);
        assert_eq!(
            apply(&reg, &b2, &staged_b, &commit(6, 1)).unwrap(),
            Applied::New(1)
        );
        assert_eq!(snaps(&reg), vec!["b1".to_string(), "s1".to_string()]);
        let i = inbound(engine, "db").unwrap().unwrap();
        assert_eq!(
            (i.origin.as_str(), i.token, i.last.as_str()),
            ("b", 6, "b1")
        );
        assert_eq!(i.settings.map(|s| s.replicas), Some(1));

        // The old origin is refused now (the receiver's fence refuses its lower token too).
        let e = apply(
            &reg,
            &incoming("a", "s3", &[&y, &x], &["s3"]),
            &staged,
            &commit(5, 2),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("replica of b") && e.contains("not higher"),
            "{e}"
        );

        // A same-named snapshot from the previous origin is replaced by the new one's.
        let (w, wr) = tree(4, Some(x.layer));
        let staged_c: HashMap<LayerId, Vec<Row>> = [(w.layer, wr.clone())].into_iter().collect();
        let c1 = incoming("c", "b1", &[&w, &x], &["b1"]);
        assert_eq!(
            apply(&reg, &c1, &staged_c, &commit(7, 1)).unwrap(),
            Applied::New(1)
        );
        assert_eq!(snaps(&reg), vec!["b1".to_string()]);
        // ... but one of the same origin with other contents is still refused.
        let (v, vr) = tree(5, Some(x.layer));
        let staged_v: HashMap<LayerId, Vec<Row>> = [(v.layer, vr)].into_iter().collect();
        let e = apply(
            &reg,
            &incoming("c", "b1", &[&v, &x], &["b1"]),
            &staged_v,
            &commit(7, 1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("other contents"), "{e}");

        // Promote of the replica takes the origin's settings over.
        let snap = finish_promote(&reg, "db").unwrap();
        assert_eq!(snap.name, "b1");
        let s = settings(engine, "db").unwrap().unwrap();
        assert_eq!((s.replicas, s.rpo_secs), (1, 30));
        assert!(inbound(engine, "db").unwrap().is_none());
    }

    #[test]
    fn version_1_replica_records_read_with_token_0() {
        #[derive(Serialize)]
        struct V1 {
            origin: String,
            last: String,
            last_created: i64,
            applied: i64,
        }
        let e = MemEngine::default();
        let mut b = Batch::new();
        let v1 = V1 {
            origin: "a".into(),
            last: "s".into(),
            last_created: 3,
            applied: 4,
        };
        b.put(Cf::Meta, inbound_key("db"), meta::encode(1, &v1));
        e.write(b, false).unwrap();
        let i = inbound(&e, "db").unwrap().unwrap();
        assert_eq!((i.origin.as_str(), i.token, i.settings), ("a", 0, None));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), 30);
        assert_eq!(parse_duration("5m").unwrap(), 300);
        assert_eq!(parse_duration("2").unwrap(), 2);
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
