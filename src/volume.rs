//! The volume registry: creating, cloning, snapshotting, rolling back, listing and removing
//! volumes, their options (quota, read-only) and labels. A volume is a writable top tree over
//! frozen lower trees (see [`crate::layer`]). The registry owns the volume and snapshot
//! records; it freezes a mounted volume through its live [`VolumeFs`] so that buffered writes
//! land on the right side of the freeze.
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::db::{Batch, Cf};
use crate::error::{Error, Result};
use crate::fs::VolumeFs;
use crate::ids::{LayerId, TreeId, VolumeId, VolumeName};
use crate::layer::{self, SnapshotRecord, TreeKind, TreeRecord, SNAPSHOT_VERSION};
use crate::meta::{self, InodeRecord, Kind, VolumeRecord};
use crate::store::Store;

pub const ROOT_INO: u64 = 1;

/// What `volume create` accepts.
#[derive(Debug, Default, Clone)]
pub struct CreateOptions {
    pub labels: BTreeMap<String, String>,
    pub size: Option<u64>,
    pub read_only: bool,
    /// Start as a copy of this volume or snapshot (`from=VOLUME[@SNAPSHOT]`).
    pub from: Option<(VolumeName, Option<String>)>,
    /// Start on a stack of image layers, bottom first (`layers=ID,ID,...`).
    pub layers: Vec<LayerId>,
}

impl CreateOptions {
    /// Applies one `--opt key=value`. Unknown keys are refused by name.
    pub fn set_opt(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "size" => self.size = Some(parse_size(value)?),
            "ro" | "read_only" | "readonly" => self.read_only = parse_bool(key, value)?,
            "from" => self.from = Some(layer::split_ref(value)?),
            "layers" => {
                self.layers = value
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<Vec<LayerId>>>()?
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown volume option {key:?} (known: size, ro, from, layers)"
                )))
            }
        }
        if self.from.is_some() && !self.layers.is_empty() {
            return Err(Error::Invalid(
                "options from and layers exclude each other".into(),
            ));
        }
        Ok(())
    }
}

pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "" | "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::Invalid(format!(
            "option {key}: {v:?} is not a boolean"
        ))),
    }
}

/// Parses sizes like `1048576`, `512K`, `10G`, `1.5GiB`, `2TB` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        Error::Invalid(format!(
            "size {s:?}: expected a number with an optional unit (K, M, G, T)"
        ))
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(Error::Invalid(format!("size {s:?}: unknown unit {u:?}"))),
    };
    let v = n * mult as f64;
    if !(1.0..=(u64::MAX as f64)).contains(&v) {
        return Err(Error::Invalid(format!("size {s:?} is out of range")));
    }
    Ok(v as u64)
}

pub struct Registry {
    store: Arc<Store>,
    lock: parking_lot::Mutex<()>,
}

/// Reads a tree's inode high-water mark (the next inode number to hand out).
fn ino_hw(store: &Store, t: TreeId) -> Result<u64> {
    match store.engine.get(Cf::Meta, &meta::ino_hw_key(t))? {
        Some(v) => {
            Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
                |_| Error::Encoding("inode high-water mark".into()),
            )?))
        }
        None => Ok(ROOT_INO + 1),
    }
}

/// The inode high-water mark of a frozen tree, from its record. A missing record is an
/// error: guessing could hand out inode numbers the tree already uses.
fn frozen_ino_hw(store: &Store, t: TreeId) -> Result<u64> {
    layer::get_tree(&*store.engine, t)?
        .map(|r| r.ino_hw)
        .ok_or_else(|| Error::Db(format!("frozen tree {} has no record", t.0)))
}

impl Registry {
    pub fn new(store: Arc<Store>) -> Self {
        Registry {
            store,
            lock: parking_lot::Mutex::new(()),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Creates a volume: empty, a clone of `from` (a volume, frozen first through `live` if
    /// it is mounted, or a snapshot), or on a stack of image layers. O(1) in the data either
    /// way: only records are written.
    pub fn create(
        &self,
        name: &VolumeName,
        opts: &CreateOptions,
        live: Option<&VolumeFs>,
    ) -> Result<VolumeRecord> {
        let _g = self.lock.lock();
        if self.get(name)?.is_some() {
            return Err(Error::Exists(format!("volume {name}")));
        }
        let id = VolumeId(self.store.next_id("volume")?);
        let top = TreeId(self.store.next_id("tree")?);
        let mut rec = VolumeRecord {
            id,
            name: name.to_string(),
            created: meta::Ts::now().secs,
            labels: opts.labels.clone(),
            size: opts.size,
            read_only: opts.read_only,
            top,
            lower: Vec::new(),
            image: opts.layers.clone(),
        };
        let mut b = Batch::new();
        // The base: (lower trees, inode high-water mark, used bytes).
        let base: Option<(Vec<TreeId>, u64, i64)> = match &opts.from {
            Some((src, None)) => {
                let src = self.require(src)?;
                let src = self.freeze(&src, live, |_, _, _, _| Ok(Batch::new()))?;
                let hw = ino_hw(&self.store, src.top)?;
                let used = self.used_bytes(&src)? as i64;
                Some((src.lower.clone(), hw, used))
            }
            Some((src, Some(snap))) => {
                let (_, s) = self.snapshot(src, snap)?;
                let hw = frozen_ino_hw(&self.store, s.tree)?;
                Some((s.trees(), hw, s.used))
            }
            None if !opts.layers.is_empty() => {
                let (tree, hw, used) = crate::image::merged(&self.store, &opts.layers)?;
                Some((vec![tree], hw, used))
            }
            None => None,
        };
        match base {
            Some((lower, hw, used)) => {
                rec.lower = lower;
                b.put(Cf::Meta, meta::ino_hw_key(top), hw.to_le_bytes().to_vec());
                b.add(Cf::Counters, meta::used_key(id), used);
            }
            None => {
                let root = InodeRecord::new(Kind::Dir, 0o755, 0, 0);
                b.put(
                    Cf::Inodes,
                    meta::inode_key(top, ROOT_INO),
                    meta::encode(meta::INODE_VERSION, &root),
                );
            }
        }
        b.put(Cf::Volumes, name.as_str().as_bytes().to_vec(), rec.encode());
        self.store.engine.write(b, true)?;
        tracing::info!(volume = %name, layers = rec.lower.len(), "volume created");
        Ok(rec)
    }

    /// Freezes `rec`'s top tree (through `live` when the volume is mounted) and gives the
    /// volume a new empty top. `extra(new record, frozen tree, ino_hw, used)` adds to the same
    /// synced batch. Returns the new record. The caller holds the registry lock.
    fn freeze(
        &self,
        rec: &VolumeRecord,
        live: Option<&VolumeFs>,
        extra: impl FnOnce(&VolumeRecord, TreeId, u64, i64) -> Result<Batch>,
    ) -> Result<VolumeRecord> {
        let new_top = TreeId(self.store.next_id("tree")?);
        let engine = self.store.engine.clone();
        let mut out = None;
        let build = |old: TreeId, hw: u64, used: i64| -> Result<Batch> {
            let mut b = Batch::new();
            layer::put_tree(
                &mut b,
                old,
                &TreeRecord {
                    kind: TreeKind::Frozen,
                    created: meta::Ts::now().secs,
                    ino_hw: hw,
                    parent: rec.lower.first().copied(),
                    layer: None,
                    origin: rec.name.clone(),
                    bytes: 0,
                },
            );
            b.put(
                Cf::Meta,
                meta::ino_hw_key(new_top),
                hw.to_le_bytes().to_vec(),
            );
            // Unlinked-but-open inodes are cleaned up from the new top.
            let op = meta::tree_prefix(old);
            for (k, v) in engine.scan_prefix(Cf::Orphans, &op)? {
                let mut nk = meta::tree_prefix(new_top);
                nk.extend_from_slice(&k[op.len()..]);
                b.put(Cf::Orphans, nk, v);
                b.delete(Cf::Orphans, k);
            }
            let mut nrec = rec.clone();
            nrec.top = new_top;
            nrec.lower.insert(0, old);
            b.put(Cf::Volumes, nrec.name.as_bytes().to_vec(), nrec.encode());
            b.append(extra(&nrec, old, hw, used)?);
            out = Some(nrec);
            Ok(b)
        };
        match live {
            Some(fs) => fs.freeze(new_top, build)?,
            None => {
                let hw = ino_hw(&self.store, rec.top)?;
                let used = self.used_bytes(rec)? as i64;
                let b = build(rec.top, hw, used)?;
                self.store.engine.write(b, true)?;
            }
        }
        out.ok_or_else(|| Error::Db("freeze produced no record".into()))
    }

    /// Takes a snapshot named `name` of volume `vol`: every write acknowledged before the
    /// call is in it, none after. `live` is the volume's filesystem if it is mounted.
    pub fn snapshot_create(
        &self,
        vol: &VolumeName,
        name: &str,
        live: Option<&VolumeFs>,
    ) -> Result<SnapshotRecord> {
        layer::check_snapshot_name(name)?;
        let _g = self.lock.lock();
        let rec = self.require(vol)?;
        if layer::get_snapshot(&*self.store.engine, rec.id, name)?.is_some() {
            return Err(Error::Exists(format!("snapshot {vol}@{name}")));
        }
        let mut snap = None;
        self.freeze(&rec, live, |nrec, frozen, _hw, used| {
            let s = SnapshotRecord {
                name: name.to_string(),
                created: meta::Ts::now().secs,
                tree: frozen,
                lower: nrec.lower[1..].to_vec(),
                used,
            };
            let mut b = Batch::new();
            b.put(
                Cf::Snapshots,
                layer::snapshot_key(rec.id, name),
                meta::encode(SNAPSHOT_VERSION, &s),
            );
            snap = Some(s);
            Ok(b)
        })?;
        tracing::info!(volume = %vol, snapshot = name, "snapshot taken");
        snap.ok_or_else(|| Error::Db("snapshot produced no record".into()))
    }

    /// A volume's snapshot, with the volume.
    pub fn snapshot(&self, vol: &VolumeName, name: &str) -> Result<(VolumeRecord, SnapshotRecord)> {
        let rec = self.require(vol)?;
        let s = layer::get_snapshot(&*self.store.engine, rec.id, name)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {vol}@{name}")))?;
        Ok((rec, s))
    }

    pub fn snapshots(&self, vol: &VolumeName) -> Result<Vec<SnapshotRecord>> {
        let rec = self.require(vol)?;
        layer::snapshots(&*self.store.engine, rec.id)
    }

    /// Deletes a snapshot record. Its trees are freed by gc once nothing else uses them.
    pub fn snapshot_remove(&self, vol: &VolumeName, name: &str) -> Result<()> {
        let _g = self.lock.lock();
        let (rec, _) = self.snapshot(vol, name)?;
        let mut b = Batch::new();
        b.delete(Cf::Snapshots, layer::snapshot_key(rec.id, name));
        self.store.engine.write(b, true)?;
        tracing::info!(volume = %vol, snapshot = name, "snapshot removed");
        Ok(())
    }

    /// Resets a volume to a snapshot: a new empty top over the snapshot's trees. Everything
    /// written since the snapshot is discarded. The caller makes sure it is not mounted.
    pub fn rollback(&self, vol: &VolumeName, name: &str) -> Result<VolumeRecord> {
        let _g = self.lock.lock();
        let (rec, snap) = self.snapshot(vol, name)?;
        let top = TreeId(self.store.next_id("tree")?);
        let snap_hw = frozen_ino_hw(&self.store, snap.tree)?;
        // Inode numbers are never reused: new ones start above everything handed out.
        let hw = ino_hw(&self.store, rec.top)?.max(snap_hw);
        let mut nrec = rec.clone();
        nrec.top = top;
        nrec.lower = snap.trees();
        let mut b = Batch::new();
        b.put(Cf::Meta, meta::ino_hw_key(top), hw.to_le_bytes().to_vec());
        layer::delete_tree(&*self.store.engine, &mut b, rec.top)?;
        b.delete(Cf::Counters, meta::used_key(rec.id));
        b.add(Cf::Counters, meta::used_key(rec.id), snap.used);
        b.put(Cf::Volumes, vol.as_str().as_bytes().to_vec(), nrec.encode());
        self.store.engine.write(b, true)?;
        tracing::info!(volume = %vol, snapshot = name, "volume rolled back");
        Ok(nrec)
    }

    pub fn get(&self, name: &VolumeName) -> Result<Option<VolumeRecord>> {
        self.store
            .engine
            .get(Cf::Volumes, name.as_str().as_bytes())?
            .map(|v| VolumeRecord::decode(&v))
            .transpose()
    }

    pub fn require(&self, name: &VolumeName) -> Result<VolumeRecord> {
        self.get(name)?
            .ok_or_else(|| Error::NotFound(format!("volume {name}")))
    }

    pub fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.store
            .engine
            .scan_prefix(Cf::Volumes, b"")?
            .into_iter()
            .map(|(_, v)| VolumeRecord::decode(&v))
            .collect()
    }

    pub fn used_bytes(&self, rec: &VolumeRecord) -> Result<u64> {
        Ok(self
            .store
            .engine
            .counter(Cf::Counters, &meta::used_key(rec.id))?
            .max(0) as u64)
    }

    /// Deletes the volume record, its snapshots and its top tree. Lower trees are freed by gc
    /// once no other volume, snapshot or layer uses them. The caller makes sure it is not
    /// mounted.
    pub fn remove(&self, name: &VolumeName) -> Result<()> {
        let _g = self.lock.lock();
        let rec = self.require(name)?;
        let mut b = Batch::new();
        b.delete(Cf::Volumes, name.as_str().as_bytes().to_vec());
        layer::delete_tree(&*self.store.engine, &mut b, rec.top)?;
        b.delete_prefix(Cf::Snapshots, &layer::snapshot_prefix(rec.id));
        b.delete(Cf::Counters, meta::used_key(rec.id));
        self.store.engine.write(b, true)?;
        tracing::info!(volume = %name, "volume removed");
        Ok(())
    }

    /// Runs `f` with the registry locked: no volume or snapshot record changes meanwhile (gc
    /// uses it to find the live trees).
    pub fn locked<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = self.lock.lock();
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "10X", "-1", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_options_are_named() {
        let mut o = CreateOptions::default();
        let e = o.set_opt("colour", "blue").unwrap_err();
        assert!(e.to_string().contains("colour"));
        o.set_opt("size", "1G").unwrap();
        o.set_opt("ro", "true").unwrap();
        assert!(o.read_only);
        assert_eq!(o.size, Some(1 << 30));
    }
}
