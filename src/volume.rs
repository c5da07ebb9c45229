//! The volume registry: creating, listing, inspecting and removing volumes, their options
//! (quota, read-only) and labels. A volume's files live in its top tree (see [`crate::meta`]);
//! the registry creates the root directory and deletes the tree with the volume.
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::db::{Batch, Cf};
use crate::error::{Error, Result};
use crate::ids::{TreeId, VolumeId, VolumeName};
use crate::meta::{self, InodeRecord, Kind, VolumeRecord, VOLUME_VERSION};
use crate::store::Store;

pub const ROOT_INO: u64 = 1;

/// What `volume create` accepts.
#[derive(Debug, Default, Clone)]
pub struct CreateOptions {
    pub labels: BTreeMap<String, String>,
    pub size: Option<u64>,
    pub read_only: bool,
    /// Start as a copy of this volume (`from=VOLUME`).
    pub from: Option<VolumeName>,
}

impl CreateOptions {
    /// Applies one `--opt key=value`. Unknown keys are refused by name.
    pub fn set_opt(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "size" => self.size = Some(parse_size(value)?),
            "ro" | "read_only" | "readonly" => self.read_only = parse_bool(key, value)?,
            "from" => {
                if value.contains('@') {
                    return Err(Error::Invalid(format!(
                        "option from={value}: snapshots are not available in this volfs version"
                    )));
                }
                self.from = Some(VolumeName::new(value)?);
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown volume option {key:?} (known: size, ro, from)"
                )))
            }
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

    pub fn create(&self, name: &VolumeName, opts: &CreateOptions) -> Result<VolumeRecord> {
        let _g = self.lock.lock();
        if self.get(name)?.is_some() {
            return Err(Error::Exists(format!("volume {name}")));
        }
        let id = VolumeId(self.store.next_id("volume")?);
        let top = TreeId(self.store.next_id("tree")?);
        let rec = VolumeRecord {
            id,
            name: name.to_string(),
            created: meta::Ts::now().secs,
            labels: opts.labels.clone(),
            size: opts.size,
            read_only: opts.read_only,
            top,
            layers: Vec::new(),
        };
        let mut b = Batch::new();
        match &opts.from {
            Some(src) => {
                let src = self.require(src)?;
                self.copy_tree(&src, &rec)?;
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
        b.put(
            Cf::Volumes,
            name.as_str().as_bytes().to_vec(),
            meta::encode(VOLUME_VERSION, &rec),
        );
        self.store.engine.write(b, true)?;
        tracing::info!(volume = %name, "volume created");
        Ok(rec)
    }

    /// Copies `src`'s files into `dst`'s (empty) top tree from one consistent point in the
    /// index. Only metadata is copied: extents keep pointing at the same chunks, so no file data
    /// is read or written. The caller commits the source's buffered data first. The new
    /// volume's record is written after the copy, so a crash mid-copy leaves no half volume.
    fn copy_tree(&self, src: &VolumeRecord, dst: &VolumeRecord) -> Result<()> {
        let cfs = [Cf::Inodes, Cf::Dirents, Cf::Extents, Cf::Xattrs];
        let p = meta::tree_prefix(src.top);
        let scans: Vec<(Cf, Vec<u8>)> = cfs.iter().map(|cf| (*cf, p.clone())).collect();
        let data = self.store.engine.snapshot_scan(&scans)?;
        let new_prefix = meta::tree_prefix(dst.top);
        let mut b = Batch::new();
        for (cf, rows) in cfs.iter().zip(data) {
            for (k, v) in rows {
                let mut nk = new_prefix.clone();
                nk.extend_from_slice(&k[p.len()..]);
                b.put(*cf, nk, v);
                if b.ops.len() >= 10_000 {
                    self.store.engine.write(std::mem::take(&mut b), false)?;
                }
            }
        }
        let hw = self
            .store
            .engine
            .get(Cf::Meta, &meta::ino_hw_key(src.top))?;
        if let Some(hw) = hw {
            b.put(Cf::Meta, meta::ino_hw_key(dst.top), hw);
        }
        let used = self
            .store
            .engine
            .counter(Cf::Counters, &meta::used_key(src.id))?;
        b.add(Cf::Counters, meta::used_key(dst.id), used);
        self.store.engine.write(b, false)
    }

    pub fn get(&self, name: &VolumeName) -> Result<Option<VolumeRecord>> {
        self.store
            .engine
            .get(Cf::Volumes, name.as_str().as_bytes())?
            .map(|v| meta::decode(VOLUME_VERSION, "volume record", &v))
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
            .map(|(_, v)| meta::decode(VOLUME_VERSION, "volume record", &v))
            .collect()
    }

    pub fn used_bytes(&self, rec: &VolumeRecord) -> Result<u64> {
        Ok(self
            .store
            .engine
            .counter(Cf::Counters, &meta::used_key(rec.id))?
            .max(0) as u64)
    }

    /// Deletes the volume record and all its files. The caller makes sure it is not mounted.
    pub fn remove(&self, name: &VolumeName) -> Result<()> {
        let _g = self.lock.lock();
        let rec = self.require(name)?;
        let mut b = Batch::new();
        b.delete(Cf::Volumes, name.as_str().as_bytes().to_vec());
        let p = meta::tree_prefix(rec.top);
        for cf in [
            Cf::Inodes,
            Cf::Dirents,
            Cf::Extents,
            Cf::Xattrs,
            Cf::Orphans,
        ] {
            b.delete_prefix(cf, &p);
        }
        b.delete(Cf::Counters, meta::used_key(rec.id));
        b.delete(Cf::Meta, meta::ino_hw_key(rec.top));
        self.store.engine.write(b, true)?;
        tracing::info!(volume = %name, "volume removed");
        Ok(())
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
