//! The metadata index: a small ordered key-value interface ([`Engine`]) over column families
//! ([`Cf`]), with two engines: [`RocksEngine`] (the product) and [`MemEngine`] (unit tests of
//! code above this layer). Which keys live in which column family is documented in
//! docs/FORMAT.md and built by [`crate::meta`].
//!
//! Durability contract: [`Engine::write`] applies a [`Batch`] atomically. With `sync = false`
//! the batch is in RocksDB's write-ahead log in the OS page cache when `write` returns, so it
//! survives `kill -9` of the daemon but not a power loss. With `sync = true` (or after
//! [`Engine::sync_wal`]) it also survives a power loss.
use std::collections::BTreeMap;
use std::path::Path;

use parking_lot::RwLock;

use crate::error::{Error, Result};

/// Column families, one per concern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Store-wide records: schema version, id counters.
    Meta,
    /// Volume name -> volume record.
    Volumes,
    /// tree | ino -> inode record.
    Inodes,
    /// tree | parent ino | name -> directory entry.
    Dirents,
    /// tree | ino | file offset -> extent (a range of one chunk).
    Extents,
    /// tree | ino | name -> xattr value.
    Xattrs,
    /// chunk id -> location in a pack file.
    Chunks,
    /// tree | ino -> () for unlinked inodes still open; cleaned at the next start.
    Orphans,
    /// volume id -> i64 counters (bytes used), updated by the add merge operator.
    Counters,
    /// mount target path -> persisted mount (restored when the daemon restarts).
    Mounts,
    /// volume name | 0x00 | holder id -> (): Docker mount references, counted per caller ID.
    Holders,
    /// tree id -> tree record (frozen, imported and merged trees; see crate::layer).
    Trees,
    /// layer id -> tree id: the sealed layers by content id.
    Layers,
    /// volume id | snapshot name -> snapshot record.
    Snapshots,
}

impl Cf {
    pub const ALL: [Cf; 14] = [
        Cf::Meta,
        Cf::Volumes,
        Cf::Inodes,
        Cf::Dirents,
        Cf::Extents,
        Cf::Xattrs,
        Cf::Chunks,
        Cf::Orphans,
        Cf::Counters,
        Cf::Mounts,
        Cf::Holders,
        Cf::Trees,
        Cf::Layers,
        Cf::Snapshots,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Volumes => "volumes",
            Cf::Inodes => "inodes",
            Cf::Dirents => "dirents",
            Cf::Extents => "extents",
            Cf::Xattrs => "xattrs",
            Cf::Chunks => "chunks",
            Cf::Orphans => "orphans",
            Cf::Counters => "counters",
            Cf::Mounts => "mounts",
            Cf::Holders => "holders",
            Cf::Trees => "trees",
            Cf::Layers => "layers",
            Cf::Snapshots => "snapshots",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Add to a little-endian i64 counter (missing counts as 0).
    Add(Cf, Vec<u8>, i64),
    /// Delete every key in `[start, end)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// A set of changes applied atomically by [`Engine::write`].
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(cf, key.into(), value.into()));
    }
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(cf, key.into()));
    }
    pub fn add(&mut self, cf: Cf, key: impl Into<Vec<u8>>, delta: i64) {
        if delta != 0 {
            self.ops.push(Op::Add(cf, key.into(), delta));
        }
    }
    pub fn delete_prefix(&mut self, cf: Cf, prefix: &[u8]) {
        self.ops
            .push(Op::DeleteRange(cf, prefix.to_vec(), prefix_end(prefix)));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }
}

/// Key-value rows of one scan.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Visitor for [`Engine::scan`]: return `Ok(false)` to stop.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

pub trait Engine: Send + Sync {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn write(&self, batch: Batch, sync: bool) -> Result<()>;
    /// Visits keys in `[start, end)` in ascending order.
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visit<'_>) -> Result<()>;
    /// Makes every write so far durable against power loss.
    fn sync_wal(&self) -> Result<()>;
    /// A counter written with [`Batch::add`].
    fn counter(&self, cf: Cf, key: &[u8]) -> Result<i64> {
        Ok(self.get(cf, key)?.map(|v| decode_i64(&v)).unwrap_or(0))
    }
    /// Cache and compaction figures for metrics and status (zero where an engine has none).
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
    /// Prefix scans of several column families, all from one consistent point in time.
    fn snapshot_scan(&self, scans: &[(Cf, Vec<u8>)]) -> Result<Vec<Rows>>;
    /// Convenience: collect a prefix scan.
    fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Rows> {
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        self.scan(cf, prefix, &end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }
}

/// What an engine reports about itself (see [`Engine::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Index block cache lookups that found / did not find the block (since open).
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Bytes the block cache holds.
    pub cache_bytes: u64,
    /// Bytes compaction still has to rewrite (the compaction backlog).
    pub pending_compaction_bytes: u64,
    pub running_compactions: u64,
    pub running_flushes: u64,
    /// Bytes of the live table files and the memtables.
    pub sst_bytes: u64,
    pub memtable_bytes: u64,
}

/// Reads one ticker (`rocksdb.block.cache.hit COUNT : 12`) out of RocksDB's statistics dump.
fn ticker(dump: &str, name: &str) -> u64 {
    dump.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(" COUNT : ")?;
            rest.trim().parse().ok()
        })
        .unwrap_or(0)
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

fn decode_i64(v: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    i64::from_le_bytes(b)
}

fn add_merge(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut total = existing.map(decode_i64).unwrap_or(0);
    for op in operands {
        total = total.wrapping_add(decode_i64(op));
    }
    Some(total.to_le_bytes().to_vec())
}

/// The RocksDB engine (Debian's librocksdb 7.8, see docs/ARCHITECTURE.md for why).
pub struct RocksEngine {
    db: rocksdb::DB,
    /// Kept for its statistics object (shared with the open DB) and the block cache.
    opts: rocksdb::Options,
    cache: rocksdb::Cache,
}

impl RocksEngine {
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_db_write_buffer_size(64 << 20);
        // RocksDB's own info log: warnings only, at most two small files (at info level it
        // grows by megabytes under heavy writes).
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        // Tickers (block cache hits and misses) for /metrics; timers stay off.
        opts.enable_statistics();
        // Compactions (the low-priority pool) run at the lowest CPU priority: on a small host
        // they otherwise take a core from the requests being served, and lookups while a large
        // compaction ran (after a million creates) took 2-4x as long. Flushes keep theirs: a
        // memtable that cannot flush stalls writes. Compaction still gets every idle cycle,
        // and RocksDB slows writes down if it falls far behind.
        let mut env = rocksdb::Env::new()?;
        env.lower_thread_pool_cpu_priority();
        opts.set_env(&env);
        let mut block = rocksdb::BlockBasedOptions::default();
        // Filled only as the index is read: an idle daemon does not pay for it. Index and
        // filter blocks live in the cache, and level-0 ones stay pinned:
        // otherwise every lookup in a large volume reloads the filters of each level-0 file.
        let cache = rocksdb::Cache::new_lru_cache(256 << 20)?;
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        block.set_cache_index_and_filter_blocks(true);
        block.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = rocksdb::Options::default();
            o.set_block_based_table_factory(&block);
            // Small memtables: a point lookup in a skiplist of a few hundred thousand keys
            // costs more than one in a cached table block with a bloom filter, and memtables
            // are resident memory.
            o.set_write_buffer_size(8 << 20);
            if *cf == Cf::Counters {
                o.set_merge_operator_associative("volfs_add_i64", add_merge);
            }
            rocksdb::ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(RocksEngine { db, opts, cache })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| Error::Db(format!("column family {} missing", cf.name())))
    }

    /// Flushes the memtables and compacts every column family, so that deleted keys give
    /// their space back (after gc).
    pub fn compact_all(&self) {
        for cf in Cf::ALL {
            if let Ok(h) = self.cf(cf) {
                if let Err(e) = self.db.flush_cf(h) {
                    tracing::warn!("flushing {}: {e}", cf.name());
                }
                self.db.compact_range_cf(h, None::<&[u8]>, None::<&[u8]>);
            }
        }
    }

    /// Bytes of the index's files on disk (tables, write-ahead log, manifest).
    pub fn disk_bytes(&self) -> u64 {
        let Ok(rd) = std::fs::read_dir(self.db.path()) else {
            return 0;
        };
        rd.flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    /// Pending compaction bytes, for status and metrics.
    pub fn compaction_backlog(&self) -> u64 {
        self.int_property("rocksdb.estimate-pending-compaction-bytes")
    }

    /// A DB-wide integer property; 0 if RocksDB does not have it.
    fn int_property(&self, name: &str) -> u64 {
        self.db.property_int_value(name).ok().flatten().unwrap_or(0)
    }
}

impl Engine for RocksEngine {
    fn stats(&self) -> EngineStats {
        let dump = self.opts.get_statistics().unwrap_or_default();
        let mut st = EngineStats {
            cache_hits: ticker(&dump, "rocksdb.block.cache.hit"),
            cache_misses: ticker(&dump, "rocksdb.block.cache.miss"),
            cache_bytes: self.cache.get_usage() as u64,
            running_compactions: self.int_property("rocksdb.num-running-compactions"),
            running_flushes: self.int_property("rocksdb.num-running-flushes"),
            ..EngineStats::default()
        };
        for cf in Cf::ALL {
            let Ok(h) = self.cf(cf) else { continue };
            let prop = |name: &str| {
                self.db
                    .property_int_value_cf(h, name)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            };
            st.pending_compaction_bytes += prop("rocksdb.estimate-pending-compaction-bytes");
            st.sst_bytes += prop("rocksdb.live-sst-files-size");
            st.memtable_bytes += prop("rocksdb.cur-size-all-mem-tables");
        }
        st
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(self.cf(cf)?, k, v),
                Op::Delete(cf, k) => wb.delete_cf(self.cf(cf)?, k),
                Op::Add(cf, k, d) => wb.merge_cf(self.cf(cf)?, k, d.to_le_bytes()),
                Op::DeleteRange(cf, s, e) => wb.delete_range_cf(self.cf(cf)?, s, e),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(wb, &wo)?)
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visit<'_>) -> Result<()> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf)?, ro);
        it.seek(start);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !visit(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }

    fn sync_wal(&self) -> Result<()> {
        Ok(self.db.flush_wal(true)?)
    }

    fn snapshot_scan(&self, scans: &[(Cf, Vec<u8>)]) -> Result<Vec<Rows>> {
        let snap = self.db.snapshot();
        let mut out = Vec::with_capacity(scans.len());
        for (cf, prefix) in scans {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_iterate_upper_bound(prefix_end(prefix));
            let it = snap.iterator_cf_opt(
                self.cf(*cf)?,
                ro,
                rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
            );
            let mut v = Vec::new();
            for item in it {
                let (k, val) = item?;
                v.push((k.to_vec(), val.to_vec()));
            }
            out.push(v);
        }
        Ok(out)
    }
}

/// An in-memory engine with the same semantics, for unit tests of the layers above.
type MemMap = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

#[derive(Default)]
pub struct MemEngine {
    cfs: RwLock<MemMap>,
}

impl Engine for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.cfs.read().get(&(cf, key.to_vec())).cloned())
    }
    fn write(&self, batch: Batch, _sync: bool) -> Result<()> {
        let mut m = self.cfs.write();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => {
                    m.insert((cf, k), v);
                }
                Op::Delete(cf, k) => {
                    m.remove(&(cf, k));
                }
                Op::Add(cf, k, d) => {
                    let e = m
                        .entry((cf, k))
                        .or_insert_with(|| 0i64.to_le_bytes().to_vec());
                    *e = decode_i64(e).wrapping_add(d).to_le_bytes().to_vec();
                }
                Op::DeleteRange(cf, s, e) => {
                    let keys: Vec<_> = m.range((cf, s)..(cf, e)).map(|(k, _)| k.clone()).collect();
                    for k in keys {
                        m.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visit<'_>) -> Result<()> {
        let items: Vec<(Vec<u8>, Vec<u8>)> = self
            .cfs
            .read()
            .range((cf, start.to_vec())..(cf, end.to_vec()))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in items {
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
    fn sync_wal(&self) -> Result<()> {
        Ok(())
    }
    fn snapshot_scan(&self, scans: &[(Cf, Vec<u8>)]) -> Result<Vec<Rows>> {
        let m = self.cfs.read();
        Ok(scans
            .iter()
            .map(|(cf, p)| {
                m.range((*cf, p.clone())..(*cf, prefix_end(p)))
                    .map(|((_, k), v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One suite, run against every engine.
    fn engine_suite(e: &dyn Engine) {
        let mut b = Batch::new();
        b.put(Cf::Inodes, b"a1".to_vec(), b"x".to_vec());
        b.put(Cf::Inodes, b"a2".to_vec(), b"y".to_vec());
        b.put(Cf::Inodes, b"b1".to_vec(), b"z".to_vec());
        b.put(Cf::Dirents, b"a1".to_vec(), b"other cf".to_vec());
        b.add(Cf::Counters, b"c".to_vec(), 5);
        e.write(b, true).unwrap();
        assert_eq!(e.get(Cf::Inodes, b"a1").unwrap().unwrap(), b"x");
        assert_eq!(e.get(Cf::Inodes, b"zz").unwrap(), None);
        let got = e.scan_prefix(Cf::Inodes, b"a").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, b"a2");
        let mut b = Batch::new();
        b.delete(Cf::Inodes, b"a1".to_vec());
        b.add(Cf::Counters, b"c".to_vec(), -7);
        b.delete_prefix(Cf::Dirents, b"a");
        e.write(b, false).unwrap();
        assert_eq!(e.get(Cf::Dirents, b"a1").unwrap(), None);
        assert_eq!(e.scan_prefix(Cf::Inodes, b"a").unwrap().len(), 1);
        assert_eq!(e.counter(Cf::Counters, b"c").unwrap(), -2);
        assert_eq!(e.counter(Cf::Counters, b"missing").unwrap(), 0);
        let mut n = 0;
        e.scan(Cf::Inodes, b"", b"\xff", &mut |_, _| {
            n += 1;
            Ok(false)
        })
        .unwrap();
        assert_eq!(n, 1, "visitor returning false stops the scan");
        let snap = e
            .snapshot_scan(&[(Cf::Inodes, b"a".to_vec()), (Cf::Inodes, b"b".to_vec())])
            .unwrap();
        assert_eq!(snap[0].len(), 1);
        assert_eq!(snap[1][0].0, b"b1");
    }

    #[test]
    fn mem_engine() {
        engine_suite(&MemEngine::default());
    }

    #[test]
    fn rocks_engine() {
        let dir = tempfile::tempdir().unwrap();
        engine_suite(&RocksEngine::open(dir.path()).unwrap());
    }

    /// The figures /metrics shows move: table bytes after a flush, block cache misses on the
    /// first reads of a table and hits on the next ones. The in-memory engine reports zeros.
    #[test]
    fn rocks_engine_reports_cache_and_table_stats() {
        assert_eq!(MemEngine::default().stats(), EngineStats::default());
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path()).unwrap();
        let mut b = Batch::new();
        for i in 0..5000u32 {
            b.put(Cf::Inodes, i.to_be_bytes().to_vec(), vec![7; 100]);
        }
        e.write(b, true).unwrap();
        e.db.flush_cf(e.cf(Cf::Inodes).unwrap()).unwrap();
        let before = e.stats();
        assert!(before.sst_bytes > 0, "{before:?}");
        for _ in 0..3 {
            for i in (0..5000u32).step_by(97) {
                assert!(e.get(Cf::Inodes, &i.to_be_bytes()).unwrap().is_some());
            }
        }
        let after = e.stats();
        assert!(after.cache_misses > before.cache_misses, "{after:?}");
        assert!(after.cache_hits > before.cache_hits, "{after:?}");
        assert!(after.cache_bytes > 0, "{after:?}");
    }

    /// Keys written by concurrent batches are found right after their batch returns, also
    /// while memtables fill and flush with the production options (the chunk index depends
    /// on it: a read that finds no entry is EIO).
    #[test]
    fn rocks_engine_finds_keys_written_concurrently() {
        let dir = tempfile::tempdir().unwrap();
        let e = std::sync::Arc::new(RocksEngine::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let e = e.clone();
                std::thread::spawn(move || {
                    let mut x = t * 7919 + 1;
                    for i in 0..20_000u64 {
                        let mut b = Batch::new();
                        let mut keys = Vec::new();
                        for _ in 0..8 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let k = blake3::hash(&x.to_le_bytes()).as_bytes().to_vec();
                            b.put(Cf::Chunks, k.clone(), vec![1u8; 40]);
                            b.put(
                                Cf::Extents,
                                [&k[..8], &i.to_be_bytes()].concat(),
                                vec![2; 30],
                            );
                            keys.push(k);
                        }
                        b.put(Cf::Inodes, t.to_be_bytes().to_vec(), vec![3; 100]);
                        b.add(Cf::Counters, b"used".to_vec(), 4096);
                        e.write(b, false).unwrap();
                        for k in keys {
                            assert!(
                                e.get(Cf::Chunks, &k).unwrap().is_some(),
                                "thread {t} batch {i}: a key just written is missing"
                            );
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn prefix_end_works() {
        assert_eq!(prefix_end(b"ab"), b"ac");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }
}
