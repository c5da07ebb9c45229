//! Backups and restores of volumes into a backup repository (a directory), and turning an
//! imported tree (a tarball, a backup) into a new volume.
//!
//! Owns the **backup repository v1** format (full description in docs/FORMAT.md):
//!
//! ```text
//! DIR/volfs-backup.json          {"format": "volfs-backup", "version": 1, "created": ...}
//! DIR/chunks/ab/<64 hex id>      one chunk, zstd-compressed; BLAKE3 of the decompressed
//!                                bytes is the id (checked on every read)
//! DIR/backups/<name>.json        one manifest: volume, time, source snapshot, sizes, and the
//!                                namespace (every path with its metadata and extent list)
//! DIR/tmp/                       files being written (safe to delete when no backup runs)
//! ```
//!
//! Chunks are shared by every backup in the repository: a backup writes only the chunks the
//! repository does not have yet, so backups after the first are incremental.
//!
//! Durability contract: every file is written under `tmp/`, fsync'ed, then renamed into
//! place, and the directories it was renamed into are fsync'ed. A manifest is written only
//! after every chunk it names is durable, so a manifest never names a chunk that a crash can
//! lose; a crash leaves at most unreferenced chunk files and temp files, which the next backup
//! reuses or ignores. Restore verifies every chunk it reads and builds the new volume's tree
//! before the volume record exists: a failed restore leaves no volume.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::db::{Batch, Cf};
use crate::error::{Error, Result};
use crate::ids::{ChunkId, VolumeId, VolumeName};
use crate::image::{self, Item, NewTree, TreeWriter};
use crate::layer::Stack;
use crate::meta::{self, Extent, InodeRecord, Kind, Ts, VolumeRecord};
use crate::store::Store;
use crate::volume::{Registry, ROOT_INO};

/// The repository format this code writes and the newest it reads.
pub const REPO_VERSION: u32 = 1;
/// The manifest format this code writes and the newest it reads.
pub const MANIFEST_VERSION: u32 = 1;
const MARKER: &str = "volfs-backup.json";
const ZSTD_LEVEL: i32 = 3;

/// `DIR/volfs-backup.json`.
#[derive(Debug, Serialize, Deserialize)]
struct RepoMarker {
    format: String,
    version: u32,
    #[serde(default)]
    created: String,
}

/// Bytes that are shown as a string when they are UTF-8, else as `{"hex": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Name {
    Text(String),
    Hex { hex: String },
}

impl Name {
    pub fn of(b: &[u8]) -> Name {
        match std::str::from_utf8(b) {
            Ok(s) => Name::Text(s.to_string()),
            Err(_) => Name::Hex {
                hex: hex::encode(b),
            },
        }
    }

    pub fn bytes(&self) -> Result<Vec<u8>> {
        match self {
            Name::Text(s) => Ok(s.as_bytes().to_vec()),
            Name::Hex { hex } => hex::decode(hex)
                .map_err(|e| Error::Invalid(format!("manifest: bad hex {hex:?}: {e}"))),
        }
    }
}

/// One path of a backed-up namespace. The root is the entry with path `""`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub path: Name,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `chardev`, `blockdev`.
    pub kind: String,
    /// A hard link: the earlier path with the same inode (no other fields are used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Name>,
    #[serde(default)]
    pub perm: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub rdev: u32,
    /// `[seconds, nanoseconds]`.
    #[serde(default)]
    pub mtime: (i64, u32),
    #[serde(default)]
    pub atime: (i64, u32),
    #[serde(default)]
    pub btime: (i64, u32),
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Name>,
    /// `[name, hex value]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(Name, String)>,
    /// `[file offset, chunk id (hex), offset in the chunk, length]`; gaps are holes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<(u64, String, u32, u32)>,
}

/// `DIR/backups/<name>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    #[serde(flatten)]
    pub info: BackupInfo,
    pub entries: Vec<Entry>,
}

/// A backup as `volfs backup ls` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub name: String,
    pub volume: String,
    /// The snapshot backed up (`None`: the volume at the time of the backup, through a
    /// temporary snapshot).
    pub snapshot: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    pub created_unix: i64,
    /// Bytes covered by the files' extents (logical; holes excluded).
    pub bytes: u64,
    pub files: u64,
    /// Distinct chunks the backup uses.
    pub chunks: u64,
    /// Chunks this backup added to the repository, and their bytes (before / after
    /// compression).
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub new_stored_bytes: u64,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::CharDev => "chardev",
        Kind::BlockDev => "blockdev",
    }
}

fn kind_of(s: &str) -> Result<Kind> {
    Ok(match s {
        "file" => Kind::File,
        "dir" => Kind::Dir,
        "symlink" => Kind::Symlink,
        "fifo" => Kind::Fifo,
        "socket" => Kind::Socket,
        "chardev" => Kind::CharDev,
        "blockdev" => Kind::BlockDev,
        _ => return Err(Error::Invalid(format!("manifest: unknown kind {s:?}"))),
    })
}

fn io_at(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", p.display());
    move |e| Error::io(context, e)
}

fn fsync_dir(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io_at("syncing directory", p))
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// An opened backup repository.
pub struct Repo {
    dir: PathBuf,
}

impl Repo {
    fn check_dir(dir: &Path) -> Result<()> {
        if !dir.is_absolute() {
            return Err(Error::Invalid(format!(
                "backup repository {} is not an absolute path",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Opens an existing repository, refusing a directory that is not one and a repository
    /// of a newer format version.
    pub fn open(dir: &Path) -> Result<Repo> {
        Self::check_dir(dir)?;
        let marker = dir.join(MARKER);
        let text = match std::fs::read(&marker) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Invalid(format!(
                    "{} is not a volfs backup repository (no {MARKER})",
                    dir.display()
                )))
            }
            Err(e) => return Err(Error::io(format!("reading {}", marker.display()), e)),
        };
        let m: RepoMarker = serde_json::from_slice(&text).map_err(|e| {
            Error::Invalid(format!(
                "{} is not a volfs backup repository ({MARKER}: {e})",
                dir.display()
            ))
        })?;
        if m.format != "volfs-backup" {
            return Err(Error::Invalid(format!(
                "{} is not a volfs backup repository ({MARKER} says format {:?})",
                dir.display(),
                m.format
            )));
        }
        if m.version > REPO_VERSION {
            return Err(Error::Invalid(format!(
                "backup repository {} has format version {}; this volfs reads up to version {REPO_VERSION} (upgrade volfs)",
                dir.display(),
                m.version
            )));
        }
        Ok(Repo {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the repository at `dir`, creating it if `dir` does not exist or is empty.
    pub fn open_or_init(dir: &Path) -> Result<Repo> {
        Self::check_dir(dir)?;
        let empty = match std::fs::read_dir(dir) {
            Ok(mut rd) => rd.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io_at("creating", dir))?;
                true
            }
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        if !empty {
            return Self::open(dir);
        }
        let repo = Repo {
            dir: dir.to_path_buf(),
        };
        for d in ["chunks", "backups", "tmp"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io_at("creating", &p))?;
        }
        let marker = RepoMarker {
            format: "volfs-backup".into(),
            version: REPO_VERSION,
            created: crate::api::rfc3339(Ts::now().secs),
        };
        let text = serde_json::to_vec_pretty(&marker)
            .map_err(|e| Error::Encoding(format!("repository marker: {e}")))?;
        repo.write_atomic(&dir.join(MARKER), &text)?;
        tracing::info!("backup repository created in {}", dir.display());
        Ok(repo)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn chunk_dir(&self, id: &ChunkId) -> PathBuf {
        self.dir.join("chunks").join(&id.to_hex()[..2])
    }

    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.chunk_dir(id).join(id.to_hex())
    }

    /// Writes `data` to `dest` crash-safely: temp file, fsync, rename. The caller syncs the
    /// directory of `dest` (several renames share one directory sync).
    fn write_file(&self, dest: &Path, data: &[u8]) -> Result<()> {
        let tmp_dir = self.dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(io_at("creating", &tmp_dir))?;
        let tmp = tmp_dir.join(format!(
            "{}.{}.{}",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let res = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(data)?;
                f.sync_all()
            })
            .map_err(io_at("writing", &tmp))
            .and_then(|_| std::fs::rename(&tmp, dest).map_err(io_at("renaming into", dest)));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<()> {
        self.write_file(dest, data)?;
        if let Some(parent) = dest.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }

    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.chunk_path(id).is_file()
    }

    /// Stores a chunk (compressed); returns the bytes written. The caller syncs the chunk
    /// directories ([`Repo::sync_dirs`]) before writing a manifest that names it.
    fn put_chunk(&self, id: &ChunkId, data: &[u8], dirs: &mut HashSet<PathBuf>) -> Result<u64> {
        let dir = self.chunk_dir(id);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
            dirs.insert(self.dir.join("chunks"));
        }
        let z = zstd::bulk::compress(data, ZSTD_LEVEL)
            .map_err(|e| Error::io(format!("compressing chunk {id}"), e))?;
        self.write_file(&self.chunk_path(id), &z)?;
        dirs.insert(dir);
        Ok(z.len() as u64)
    }

    fn sync_dirs(dirs: &HashSet<PathBuf>) -> Result<()> {
        for d in dirs {
            fsync_dir(d)?;
        }
        Ok(())
    }

    /// Reads a chunk and checks it against its id. `user` names the file that needs it.
    pub fn get_chunk(&self, id: &ChunkId, user: &str) -> Result<Vec<u8>> {
        let p = self.chunk_path(id);
        let z = match std::fs::read(&p) {
            Ok(z) => z,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Corrupt {
                    id: *id,
                    why: format!(
                        "missing from the backup repository ({} does not exist; needed by {user})",
                        p.display()
                    ),
                })
            }
            Err(e) => {
                return Err(Error::io(
                    format!("reading {} (chunk of {user})", p.display()),
                    e,
                ))
            }
        };
        let data = zstd::stream::decode_all(z.as_slice()).map_err(|e| Error::Corrupt {
            id: *id,
            why: format!(
                "{} does not decompress ({e}; needed by {user})",
                p.display()
            ),
        })?;
        if ChunkId::of(&data) != *id {
            return Err(Error::Corrupt {
                id: *id,
                why: format!(
                    "{} fails verification: its BLAKE3 hash differs (needed by {user})",
                    p.display()
                ),
            });
        }
        Ok(data)
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.dir.join("backups").join(format!("{name}.json"))
    }

    /// Reads a backup's manifest.
    pub fn manifest(&self, name: &str) -> Result<Manifest> {
        check_backup_name(name)?;
        let p = self.manifest_path(name);
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "backup {name} in {}",
                    self.dir.display()
                )))
            }
            Err(e) => return Err(Error::io(format!("reading {}", p.display()), e)),
        };
        // The version first, so that a newer manifest is reported as such.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(&text)
            .map_err(|e| Error::Invalid(format!("manifest {}: {e}", p.display())))?;
        if v.version > MANIFEST_VERSION {
            return Err(Error::Invalid(format!(
                "backup {name} has manifest version {}; this volfs reads up to version {MANIFEST_VERSION} (upgrade volfs)",
                v.version
            )));
        }
        serde_json::from_slice(&text)
            .map_err(|e| Error::Invalid(format!("manifest {}: {e}", p.display())))
    }

    /// Every backup in the repository, oldest first.
    pub fn list(&self) -> Result<Vec<BackupInfo>> {
        let dir = self.dir.join("backups");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(io_at("reading", &dir))?;
            let file = ent.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json") {
                out.push(self.manifest(name)?.info);
            }
        }
        out.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
        Ok(out)
    }
}

/// Backup names follow the volume name rule.
pub fn check_backup_name(name: &str) -> Result<()> {
    VolumeName::new(name).map(|_| ()).map_err(|_| {
        Error::Invalid(format!(
            "backup name {name:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]* (at most 128 bytes)"
        ))
    })
}

/// Progress of a transfer: bytes done, bytes in all (an estimate).
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// What [`backup`] backs up.
pub struct Source<'a> {
    pub volume: &'a str,
    pub snapshot: Option<&'a str>,
    pub stack: &'a Stack,
    /// For progress: the bytes the source covers.
    pub total: u64,
}

fn ts(t: Ts) -> (i64, u32) {
    (t.secs, t.nsec)
}

/// Backs up the merged namespace of `src.stack` into `repo` as backup `name` (default:
/// `VOLUME-YYYYMMDDTHHMMSSZ`). Writes the chunks the repository lacks, then the manifest.
pub fn backup(
    store: &Store,
    repo: &Repo,
    src: &Source<'_>,
    name: Option<&str>,
    progress: ProgressFn<'_>,
) -> Result<BackupInfo> {
    let engine = &*store.engine;
    let now = Ts::now().secs;
    let name = match name {
        Some(n) => {
            check_backup_name(n)?;
            if repo.manifest_path(n).exists() {
                return Err(Error::Exists(format!(
                    "backup {n} in {}",
                    repo.dir.display()
                )));
            }
            n.to_string()
        }
        None => {
            let base = format!(
                "{}-{}",
                src.volume,
                crate::api::rfc3339(now).replace([':', '-'], "")
            );
            let mut n = base.clone();
            let mut i = 2;
            while repo.manifest_path(&n).exists() {
                n = format!("{base}-{i}");
                i += 1;
            }
            n
        }
    };
    let mut info = BackupInfo {
        name: name.clone(),
        volume: src.volume.to_string(),
        snapshot: src.snapshot.map(str::to_string),
        created: crate::api::rfc3339(now),
        created_unix: now,
        bytes: 0,
        files: 0,
        chunks: 0,
        new_chunks: 0,
        new_bytes: 0,
        new_stored_bytes: 0,
    };
    let mut entries = Vec::new();
    let mut seen_ino: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut chunks: HashSet<ChunkId> = HashSet::new();
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    let total = src.total.max(1);
    let root = src
        .stack
        .inode(engine, ROOT_INO)?
        .ok_or_else(|| Error::Db(format!("volume {} has no root directory", src.volume)))?;
    let mut todo: Vec<(Vec<u8>, u64, crate::ids::TreeId, InodeRecord)> =
        vec![(Vec::new(), ROOT_INO, root.0, root.1)];
    while let Some((path, ino, tree, rec)) = todo.pop() {
        let shown = String::from_utf8_lossy(&path).into_owned();
        if rec.kind != Kind::Dir && rec.nlink > 1 {
            if let Some(first) = seen_ino.get(&ino) {
                entries.push(Entry {
                    path: Name::of(&path),
                    kind: kind_name(rec.kind).into(),
                    link: Some(Name::of(first)),
                    perm: 0,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    rdev: 0,
                    mtime: (0, 0),
                    atime: (0, 0),
                    btime: (0, 0),
                    target: None,
                    xattrs: Vec::new(),
                    extents: Vec::new(),
                });
                continue;
            }
            seen_ino.insert(ino, path.clone());
        }
        let mut e = Entry {
            path: Name::of(&path),
            kind: kind_name(rec.kind).into(),
            link: None,
            perm: rec.perm,
            uid: rec.uid,
            gid: rec.gid,
            size: rec.size,
            rdev: rec.rdev,
            mtime: ts(rec.mtime),
            atime: ts(rec.atime),
            btime: ts(rec.btime),
            target: (rec.kind == Kind::Symlink).then(|| Name::of(&rec.target)),
            xattrs: engine
                .scan_prefix(Cf::Xattrs, &meta::inode_key(tree, ino))?
                .into_iter()
                .map(|(k, v)| (Name::of(&k[16..]), hex::encode(v)))
                .collect(),
            extents: Vec::new(),
        };
        if rec.kind == Kind::File {
            info.files += 1;
            let p = meta::inode_key(tree, ino);
            for (k, v) in engine.scan_prefix(Cf::Extents, &p)? {
                let off = meta::extent_offset(&k)?;
                let x: Extent = meta::decode(meta::EXTENT_VERSION, "extent", &v)?;
                if chunks.insert(x.chunk) && !repo.has_chunk(&x.chunk) {
                    let data = store
                        .chunks
                        .read_verified(&x.chunk)
                        .map_err(|err| match err {
                            Error::Corrupt { id, why } => Error::Corrupt {
                                id,
                                why: format!("{why} (in the store; used by {shown:?})"),
                            },
                            e => e,
                        })?;
                    info.new_stored_bytes += repo.put_chunk(&x.chunk, &data, &mut dirs)?;
                    info.new_chunks += 1;
                    info.new_bytes += data.len() as u64;
                }
                info.bytes += x.len as u64;
                e.extents.push((off, x.chunk.to_hex(), x.chunk_off, x.len));
                progress(info.bytes, total);
            }
        }
        entries.push(e);
        if rec.kind == Kind::Dir {
            let mut subs = Vec::new();
            for (name, d) in src.stack.list(engine, ino, usize::MAX)? {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&name);
                let (t, r) = src.stack.inode(engine, d.ino)?.ok_or_else(|| {
                    Error::Db(format!(
                        "directory entry {:?} names missing inode {}",
                        String::from_utf8_lossy(&p),
                        d.ino
                    ))
                })?;
                subs.push((p, d.ino, t, r));
            }
            subs.reverse();
            todo.extend(subs);
        }
    }
    info.chunks = chunks.len() as u64;
    // Every chunk the manifest names is durable before the manifest exists.
    Repo::sync_dirs(&dirs)?;
    let m = Manifest {
        version: MANIFEST_VERSION,
        info: info.clone(),
        entries,
    };
    let text =
        serde_json::to_vec(&m).map_err(|e| Error::Encoding(format!("backup manifest: {e}")))?;
    let backups = repo.dir.join("backups");
    std::fs::create_dir_all(&backups).map_err(io_at("creating", &backups))?;
    repo.write_atomic(&repo.manifest_path(&name), &text)?;
    tracing::info!(
        volume = src.volume,
        backup = %name,
        new_bytes = info.new_bytes,
        "backup written to {}",
        repo.dir.display()
    );
    Ok(info)
}

/// Makes `t` the top tree of a new volume `name` (nothing below it). Refused if the name is
/// taken; the tree is then discarded. The caller holds the chunk store's gc gate.
pub fn create_volume_from_tree(
    registry: &Registry,
    name: &VolumeName,
    t: NewTree,
) -> Result<VolumeRecord> {
    let store = registry.store();
    let res = registry.locked(|| {
        if registry.get(name)?.is_some() {
            return Err(Error::Exists(format!("volume {name}")));
        }
        let id = VolumeId(store.next_id("volume")?);
        let rec = VolumeRecord {
            id,
            name: name.to_string(),
            created: Ts::now().secs,
            labels: BTreeMap::new(),
            size: None,
            read_only: false,
            top: t.tree,
            lower: Vec::new(),
            image: Vec::new(),
        };
        let mut b = Batch::new();
        b.put(
            Cf::Meta,
            meta::ino_hw_key(t.tree),
            t.ino_hw.to_le_bytes().to_vec(),
        );
        b.add(Cf::Counters, meta::used_key(id), t.bytes as i64);
        b.put(Cf::Volumes, name.as_str().as_bytes().to_vec(), rec.encode());
        store.engine.write(b, true)?;
        Ok(rec)
    });
    if res.is_err() {
        if let Err(e) = image::discard_tree(store, t.tree) {
            tracing::warn!("removing the tree {} of a volume not made: {e}", t.tree.0);
        }
    }
    res
}

/// Creates volume `new` from a tarball read from `input` (see [`image::import_volume_tree`]).
/// A bad tarball is an error naming what is wrong, and leaves no volume.
pub fn import_volume(
    registry: &Registry,
    new: &VolumeName,
    input: &mut dyn std::io::Read,
) -> Result<VolumeRecord> {
    if registry.get(new)?.is_some() {
        return Err(Error::Exists(format!("volume {new}")));
    }
    let store = registry.store();
    let _gc = store.chunks.writer();
    let t = image::import_volume_tree(store, input, "the tarball")?;
    let rec = create_volume_from_tree(registry, new, t)?;
    tracing::info!(volume = %new, bytes = t.bytes, "volume imported from a tarball");
    Ok(rec)
}

/// Creates volume `new` from backup `name` in `repo`, verifying every chunk. A missing or
/// corrupt chunk is an error naming the chunk and the file; no volume is left then.
pub fn restore(
    registry: &Registry,
    repo: &Repo,
    name: &str,
    new: &VolumeName,
    progress: ProgressFn<'_>,
) -> Result<VolumeRecord> {
    if registry.get(new)?.is_some() {
        return Err(Error::Exists(format!("volume {new}")));
    }
    let m = repo.manifest(name)?;
    let store = registry.store();
    let _gc = store.chunks.writer();
    let mut w = TreeWriter::new(store)?;
    let tree = w.tree;
    let res = (|| -> Result<NewTree> {
        let mut items = image::new_items();
        let mut have: HashSet<ChunkId> = HashSet::new();
        let total = m.info.bytes.max(1);
        let mut done = 0u64;
        for e in &m.entries {
            let raw = e.path.bytes()?;
            let shown = format!("file {:?} of backup {name}", String::from_utf8_lossy(&raw));
            let comps = image::components(&raw)?;
            let kind = kind_of(&e.kind)?;
            let link_to = match &e.link {
                Some(l) => Some(image::components(&l.bytes()?)?),
                None => None,
            };
            let mut rec = InodeRecord::new(kind, e.perm, e.uid, e.gid);
            rec.size = e.size;
            rec.rdev = e.rdev;
            let t = |(secs, nsec): (i64, u32)| Ts { secs, nsec };
            rec.mtime = t(e.mtime);
            rec.ctime = t(e.mtime);
            rec.atime = t(e.atime);
            rec.btime = t(e.btime);
            if let Some(target) = &e.target {
                rec.target = target.bytes()?;
            }
            let mut xattrs = Vec::new();
            for (n, v) in &e.xattrs {
                let v = hex::decode(v).map_err(|err| {
                    Error::Invalid(format!("manifest: {shown}: bad xattr: {err}"))
                })?;
                xattrs.push((n.bytes()?, v));
            }
            let mut extents = Vec::new();
            for (off, id, chunk_off, len) in &e.extents {
                let id: ChunkId = id.parse()?;
                if have.insert(id) {
                    let data = repo.get_chunk(&id, &shown)?;
                    if (*chunk_off as u64 + *len as u64) > data.len() as u64 {
                        return Err(Error::Corrupt {
                            id,
                            why: format!("an extent of {shown} points past its end"),
                        });
                    }
                    let (_, loc) = store.chunks.put_hashed(id, &data)?;
                    if let Some(loc) = loc {
                        crate::chunk::ChunkStore::index(&mut w.b, &id, &loc);
                    }
                    w.maybe_flush()?;
                }
                rec.alloc += *len as u64;
                done += *len as u64;
                progress(done, total);
                extents.push((
                    *off,
                    Extent {
                        chunk: id,
                        chunk_off: *chunk_off,
                        len: *len,
                    },
                ));
            }
            image::add_item(
                &mut items,
                comps,
                Item {
                    rec,
                    extents,
                    xattrs,
                    link_to,
                },
            )?;
        }
        image::write_items(&mut w, &items)?;
        w.finish_plain()
    })();
    let t = match res {
        Ok(t) => t,
        Err(e) => {
            if let Err(d) = image::discard_tree(store, tree) {
                tracing::warn!(
                    "removing the partial tree {} of a failed restore: {d}",
                    tree.0
                );
            }
            return Err(e);
        }
    };
    let rec = create_volume_from_tree(registry, new, t)?;
    tracing::info!(volume = %new, backup = name, "volume restored from {}", repo.dir.display());
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in [&b"plain"[..], b"", b"\xff\xfe bad utf8"] {
            let n = Name::of(b);
            let j = serde_json::to_string(&n).unwrap();
            let back: Name = serde_json::from_str(&j).unwrap();
            assert_eq!(back.bytes().unwrap(), b);
        }
        assert_eq!(serde_json::to_string(&Name::of(b"a/b")).unwrap(), "\"a/b\"");
    }

    #[test]
    fn repositories_are_checked() {
        let d = tempfile::tempdir().unwrap();
        assert!(Repo::open(Path::new("relative/dir")).is_err());
        let e = Repo::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("not a volfs backup repository"), "{e}");
        let r = Repo::open_or_init(&d.path().join("repo")).unwrap();
        Repo::open(r.dir()).unwrap();
        std::fs::write(
            r.dir().join(MARKER),
            br#"{"format":"volfs-backup","version":2}"#,
        )
        .unwrap();
        let e = Repo::open(r.dir()).err().unwrap().to_string();
        assert!(e.contains("version 2"), "{e}");
        // A non-empty directory that is not a repository is not taken over.
        std::fs::write(d.path().join("other"), b"x").unwrap();
        assert!(Repo::open_or_init(d.path()).is_err());
    }

    #[test]
    fn chunks_are_verified() {
        let d = tempfile::tempdir().unwrap();
        let r = Repo::open_or_init(d.path()).unwrap();
        let data = b"some chunk data".repeat(100);
        let id = ChunkId::of(&data);
        let mut dirs = HashSet::new();
        r.put_chunk(&id, &data, &mut dirs).unwrap();
        Repo::sync_dirs(&dirs).unwrap();
        assert!(r.has_chunk(&id));
        assert_eq!(r.get_chunk(&id, "f").unwrap(), data);
        std::fs::write(
            r.chunk_path(&id),
            zstd::bulk::compress(b"other", 1).unwrap(),
        )
        .unwrap();
        let e = r.get_chunk(&id, "file x").unwrap_err().to_string();
        assert!(e.contains(&id.to_hex()) && e.contains("file x"), "{e}");
        std::fs::remove_file(r.chunk_path(&id)).unwrap();
        assert!(r
            .get_chunk(&id, "f")
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }
}
