//! The mount table: one FUSE connection per volume, and every user-visible mountpoint a bind
//! mount of it.
//!
//! - A volume's connection (its "primary") is mounted at `<run dir>/mnt/<volume>` the first
//!   time something mounts the volume. `mount -t volfs`, `volfs mount` and Docker all get bind
//!   mounts of it (read-only ones are remounted `ro`), so all mountpoints share one superblock:
//!   one page cache, one attribute cache and one lock table.
//! - Mountpoints are read from /proc/self/mountinfo (by the connection's device number), so a
//!   plain `umount DIR` is seen without telling the daemon.
//! - Mounts made through the API are recorded in the index (`mounts` column family) and made
//!   again when the daemon starts.
//! - A primary with no mountpoints and no holders (Docker references) for a while is unmounted.
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use volfs::api::MountInfo;
use volfs::db::{Batch, Cf};
use volfs::fs::VolumeFs;
use volfs::ids::{TreeId, VolumeName, VolumeRef};
use volfs::meta::{self, MountRecord, MOUNT_VERSION};
use volfs::volume::Registry;
use volfs::writelog::WriteLog;
use volfs::{Error, Result};

use crate::fuse::{FuseFs, FuseOptions};
use crate::handover::{memfd, Link};
use crate::metrics::{Metrics, VolumeMetrics};

/// Starts the thread that keeps a volume's write log short (`VolumeFs::flush_log_loop`).
fn start_log_flusher(vol: &VolumeRef, fs: &Arc<VolumeFs>) {
    let weak = Arc::downgrade(fs);
    let spawned = std::thread::Builder::new()
        .name(format!("{vol}-log"))
        .spawn(move || VolumeFs::flush_log_loop(weak, STALE_AGE, Duration::from_secs(5)));
    if let Err(e) = spawned {
        tracing::warn!(volume = %vol, "cannot start the write log's flusher: {e}");
    }
}

/// Buffered writes older than this are committed by the volume's write-log flusher (under a
/// supervisor, whose write logs they would otherwise keep long).
const STALE_AGE: Duration = Duration::from_secs(10);

/// How long an unused primary stays mounted.
const IDLE_GRACE: Duration = Duration::from_secs(30);

struct Active {
    fs: Arc<VolumeFs>,
    metrics: Arc<VolumeMetrics>,
    primary: PathBuf,
    dev: u64,
    last_used: Instant,
    session: fuser::BackgroundSession,
}

pub struct Mounts {
    registry: Arc<Registry>,
    run_dir: PathBuf,
    fuse: FuseOptions,
    metrics: Arc<Metrics>,
    /// The supervisor, which keeps a copy of every connection fd (see `handover`).
    link: Option<Link>,
    active: Mutex<HashMap<String, Active>>,
    /// Cluster mode: who may write which volume (see `cluster`).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", p.display())))
}

fn sys_mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let src = src.map(cstr).transpose().map_err(std::io::Error::other)?;
    let target = cstr(target).map_err(std::io::Error::other)?;
    let fstype = fstype
        .map(CString::new)
        .transpose()
        .map_err(std::io::Error::other)?;
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(std::io::Error::other)?;
    // SAFETY: all pointers are valid C strings (or null) for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr() as *const libc::c_void),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn sys_umount(target: &Path, flags: i32) -> std::io::Result<()> {
    let t = cstr(target).map_err(std::io::Error::other)?;
    // SAFETY: t is a valid C string.
    if unsafe { libc::umount2(t.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Volume connections are `fuse.volfs`, or plain `fuse` when configured for fstests.
fn is_volfs_type(t: &str) -> bool {
    t == "fuse.volfs" || t == "fuse"
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub dev: u64,
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    pub read_only: bool,
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mountinfo() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let f: Vec<&str> = left.split(' ').collect();
    let (maj, min) = f.get(2)?.split_once(':')?;
    let dev = libc::makedev(maj.parse().ok()?, min.parse().ok()?);
    let r: Vec<&str> = right.split(' ').collect();
    Some(MountEntry {
        dev,
        target: PathBuf::from(unescape(f.get(4)?)),
        read_only: f.get(5)?.split(',').any(|o| o == "ro"),
        fstype: r.first()?.to_string(),
        source: unescape(r.get(1)?),
    })
}

impl Mounts {
    pub fn new(
        registry: Arc<Registry>,
        run_dir: &Path,
        fuse: FuseOptions,
        metrics: Arc<Metrics>,
        link: Option<Link>,
    ) -> Result<Arc<Mounts>> {
        let mnt = run_dir.join("mnt");
        std::fs::create_dir_all(&mnt)
            .map_err(|e| Error::io(format!("creating {}", mnt.display()), e))?;
        Ok(Arc::new(Mounts {
            registry,
            run_dir: run_dir.to_path_buf(),
            fuse,
            metrics,
            link,
            active: Mutex::new(HashMap::new()),
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// Does this process run under a supervisor?
    pub fn supervised(&self) -> bool {
        self.link.is_some()
    }

    /// Tells the supervisor (if any) that this server serves requests.
    pub fn ready(&self) {
        if let Some(l) = &self.link {
            l.ready();
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Cluster mode: from now on volumes are fenced unless this host owns them.
    pub fn set_cluster(&self, c: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(c);
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// The loaded volumes (not snapshot views), for the fencer.
    pub fn primaries(&self) -> Vec<(String, Arc<VolumeFs>)> {
        self.active
            .lock()
            .iter()
            .filter(|(k, _)| !k.contains('@'))
            .map(|(k, a)| (k.clone(), a.fs.clone()))
            .collect()
    }

    /// FUSE options for one volume. A volume with a size limit runs without the kernel's
    /// writeback cache: writes then reach the daemon inside write(2), so exceeding the quota
    /// fails that write(2) with ENOSPC instead of surfacing later at fsync or close while the
    /// page cache still shows data that was never stored.
    fn fuse_options(&self, has_quota: bool) -> FuseOptions {
        let mut o = self.fuse.clone();
        if has_quota {
            o.writeback_cache = false;
        }
        o
    }

    /// Loads the filesystem of a volume, or of a snapshot view (read-only, no quota), with
    /// the record its connection is configured from. `adopted`: see `VolumeFs::load_adopted`
    /// (snapshot views are read-only and have no orphans to keep).
    fn load_fs(
        &self,
        vol: &VolumeRef,
        adopted: bool,
    ) -> Result<(Arc<VolumeFs>, meta::VolumeRecord)> {
        let mut rec = self.registry.require(&vol.volume)?;
        let store = self.registry.store().clone();
        let fs = match &vol.snapshot {
            None if adopted => VolumeFs::load_adopted(store, &rec)?,
            None => VolumeFs::load(store, &rec)?,
            Some(snap) => {
                let (_, s) = self.registry.snapshot(&vol.volume, snap)?;
                rec.read_only = true;
                rec.size = None;
                VolumeFs::load_snapshot(store, &rec, &s)?
            }
        };
        if vol.snapshot.is_none() {
            if let Some(c) = self.cluster() {
                fs.set_fenced(c.fence_reason(vol.volume.as_str()));
            }
        }
        Ok((fs, rec))
    }

    fn primary_path(&self, vol: &VolumeRef) -> PathBuf {
        self.run_dir.join("mnt").join(vol.as_str())
    }

    /// Mounts the FUSE connection of a volume (or of a snapshot, read-only) if it is not up,
    /// and returns its primary path.
    pub fn activate(&self, vol: &VolumeRef) -> Result<PathBuf> {
        let mut active = self.active.lock();
        if let Some(a) = active.get_mut(vol.as_str()) {
            a.last_used = Instant::now();
            return Ok(a.primary.clone());
        }
        let (fs, rec) = self.load_fs(vol, false)?;
        let primary = self.primary_path(vol);
        // A primary left over from a daemon that died is a dead FUSE mount: detach it.
        if mountinfo().iter().any(|m| m.target == primary) {
            let _ = sys_umount(&primary, libc::MNT_DETACH);
        }
        std::fs::create_dir_all(&primary)
            .map_err(|e| Error::io(format!("creating {}", primary.display()), e))?;
        let dev_fuse: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| {
                Error::io(
                    "opening /dev/fuse (is the fuse module loaded and /dev/fuse usable?)",
                    e,
                )
            })?
            .into();
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if rec.read_only {
            flags |= libc::MS_RDONLY;
        }
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
            dev_fuse.as_raw_fd(),
            1 << 20
        );
        sys_mount(
            Some(Path::new(vol.as_str())),
            &primary,
            Some(if self.fuse.subtype {
                "fuse.volfs"
            } else {
                "fuse"
            }),
            flags,
            Some(&data),
        )
        .map_err(|e| Error::io(format!("mounting volume {vol} at {}", primary.display()), e))?;
        let mut cfg = fuser::Config::default();
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(self.fuse.workers.max(1));
        // Under a supervisor every thread reads the one fd the supervisor also holds: requests
        // a dead server had read then stay queued on it (a cloned fd would take them down
        // with ECONNABORTED when the process dies).
        cfg.clone_fd = self.link.is_none();
        if let Some(link) = &self.link {
            let handed = link
                .add(vol.as_str(), dev_fuse.as_raw_fd())
                .map_err(|e| {
                    Error::io(
                        format!("handing volume {vol}'s connection to the supervisor"),
                        e,
                    )
                })
                .and_then(|()| self.new_log(vol, &fs));
            if let Err(e) = handed {
                let _ = sys_umount(&primary, libc::MNT_DETACH);
                return Err(e);
            }
        }
        let fuse_opts = self.fuse_options(rec.size.is_some());
        let fuse_opts_dirty = match (fuse_opts.dirty_max_bytes, fuse_opts.dirty_max_ratio) {
            _ if !fuse_opts.writeback_cache => None,
            (Some(b), _) => Some(DirtyLimit::Bytes(b)),
            (None, r) => r.map(DirtyLimit::Ratio),
        };
        fs.set_kernel_times(fuse_opts.writeback_cache);
        let vm = self.metrics.volume(vol.as_str());
        let session = fuser::Session::from_fd(
            FuseFs::new(fs.clone(), fuse_opts, vm.clone()),
            dev_fuse,
            fuser::SessionACL::All,
            cfg,
        )
        .and_then(|s| s.spawn());
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                let _ = sys_umount(&primary, libc::MNT_DETACH);
                return Err(Error::io(
                    format!("starting FUSE session for volume {vol}"),
                    e,
                ));
            }
        };
        let dev = std::fs::metadata(&primary)
            .map_err(|e| {
                Error::io(
                    format!("volume {vol} does not answer at {}", primary.display()),
                    e,
                )
            })?
            .dev();
        tune_bdi(dev, fuse_opts_dirty);
        tracing::info!(volume = %vol, primary = %primary.display(), "volume connection up");
        active.insert(
            vol.to_string(),
            Active {
                fs,
                metrics: vm,
                primary: primary.clone(),
                dev,
                last_used: Instant::now(),
                session,
            },
        );
        Ok(primary)
    }

    /// Creates a volume; a clone of a mounted volume (`from`) first gets everything written
    /// to the source so far: the kernel's dirty pages (syncfs on the connection), then the
    /// freeze commits the daemon's buffers.
    pub fn create_volume(
        &self,
        name: &VolumeName,
        opts: &volfs::volume::CreateOptions,
    ) -> Result<volfs::meta::VolumeRecord> {
        let live = match &opts.from {
            Some((src, None)) => self.writeback(src.as_str())?,
            _ => None,
        };
        self.registry.create(name, opts, live.as_deref())
    }

    /// Takes a snapshot of a volume, mounted or not (see `create_volume` for the order).
    pub fn snapshot(&self, vol: &VolumeName, name: &str) -> Result<volfs::layer::SnapshotRecord> {
        let live = self.writeback(vol.as_str())?;
        self.registry.snapshot_create(vol, name, live.as_deref())
    }

    /// Resets a volume to a snapshot. A connection with mountpoints or Docker holders is
    /// refused; an idle one is closed first.
    pub fn rollback(&self, vol: &VolumeName, name: &str) -> Result<volfs::meta::VolumeRecord> {
        self.registry.snapshot(vol, name)?;
        if self.active.lock().contains_key(vol.as_str()) {
            let mps = self.mountpoints(vol.as_str());
            let held = self.holders(vol.as_str())?;
            if !mps.is_empty() || held > 0 {
                return Err(Error::Busy(format!(
                    "volume {vol} is in use ({} mountpoint(s), {held} container mount(s)); unmount it before a rollback",
                    mps.len()
                )));
            }
            self.close(vol.as_str(), false)?;
        }
        self.registry.rollback(vol, name)
    }

    /// Trees that open snapshot views read: gc keeps them even if the snapshot is removed
    /// while mounted.
    pub fn active_trees(&self) -> Vec<TreeId> {
        let active = self.active.lock();
        let mut out = Vec::new();
        for a in active.values() {
            let s = a.fs.stack();
            out.push(s.top);
            out.extend(s.lower.iter().map(|l| l.tree));
        }
        out
    }

    /// Names of volumes with an open connection (fsck does not repair them).
    pub fn active_volumes(&self) -> std::collections::HashSet<String> {
        self.active
            .lock()
            .keys()
            .map(|k| k.split('@').next().unwrap_or(k).to_string())
            .collect()
    }

    /// Writes back the kernel's dirty pages of a mounted volume and returns its filesystem.
    fn writeback(&self, vol: &str) -> Result<Option<Arc<VolumeFs>>> {
        let Some((fs, primary)) = self
            .active
            .lock()
            .get(vol)
            .map(|a| (a.fs.clone(), a.primary.clone()))
        else {
            return Ok(None);
        };
        let dir = std::fs::File::open(&primary)
            .map_err(|e| Error::io(format!("opening {}", primary.display()), e))?;
        // SAFETY: syncfs on a valid fd we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io(
                format!("syncfs {}", primary.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Some(fs))
    }

    /// Mountpoints of a volume (bind mounts of its primary, not the primary itself). Entries
    /// must match the connection's device number, type and source (the volume name): a device
    /// number alone can belong to a newer FUSE mount once this connection is gone.
    pub fn mountpoints(&self, vol: &str) -> Vec<MountEntry> {
        let Some((dev, primary)) = self
            .active
            .lock()
            .get(vol)
            .map(|a| (a.dev, a.primary.clone()))
        else {
            return Vec::new();
        };
        let all = mountinfo();
        let ours = |m: &MountEntry| m.dev == dev && m.source == vol && is_volfs_type(&m.fstype);
        if !all.iter().any(|m| m.target == primary && ours(m)) {
            // The connection was unmounted behind our back: forget it.
            tracing::warn!(volume = %vol, "volume connection disappeared; closing it");
            if let Err(e) = self.close(vol, false) {
                tracing::warn!(volume = %vol, "closing vanished connection: {e}");
            }
            return Vec::new();
        }
        all.into_iter()
            .filter(|m| ours(m) && m.target != primary)
            .collect()
    }

    pub fn volume_fs(&self, vol: &str) -> Option<Arc<VolumeFs>> {
        self.active.lock().get(vol).map(|a| a.fs.clone())
    }

    /// Mounts `vol` at `target` (a bind mount of its primary), read-only if asked or if the
    /// volume is read-only, and records it so that it comes back after a restart.
    pub fn mount(&self, vol: &VolumeRef, target: &Path, read_only: bool) -> Result<MountInfo> {
        if !target.is_absolute() {
            return Err(Error::Invalid(format!(
                "mount target {} is not an absolute path",
                target.display()
            )));
        }
        let md = std::fs::metadata(target)
            .map_err(|e| Error::io(format!("mount target {}", target.display()), e))?;
        if !md.is_dir() {
            return Err(Error::Invalid(format!(
                "mount target {} is not a directory",
                target.display()
            )));
        }
        if !read_only && vol.snapshot.is_none() {
            if let Some(c) = self.cluster() {
                c.check_rw_mount(vol.volume.as_str())?;
            }
        }
        let primary = self.activate(vol)?;
        let dev = self
            .active
            .lock()
            .get(vol.as_str())
            .map(|a| a.dev)
            .unwrap_or(0);
        if let Some(existing) = mountinfo()
            .into_iter()
            .find(|m| m.target == target && is_volfs_type(&m.fstype))
        {
            if existing.dev == dev && existing.read_only == read_only {
                return Ok(MountInfo {
                    volume: vol.to_string(),
                    target: target.display().to_string(),
                    read_only,
                });
            }
            return Err(Error::Busy(format!(
                "{} (already a volfs mountpoint of {})",
                target.display(),
                existing.source
            )));
        }
        sys_mount(Some(&primary), target, None, libc::MS_BIND, None).map_err(|e| {
            Error::io(
                format!("bind-mounting volume {vol} at {}", target.display()),
                e,
            )
        })?;
        let ro =
            read_only || vol.snapshot.is_some() || self.registry.require(&vol.volume)?.read_only;
        if ro {
            if let Err(e) = sys_mount(
                None,
                target,
                None,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                None,
            ) {
                let _ = sys_umount(target, libc::MNT_DETACH);
                return Err(Error::io(
                    format!("making {} read-only", target.display()),
                    e,
                ));
            }
        }
        // Answer only once the mount answers.
        let ok = std::fs::metadata(target)
            .map(|m| m.dev() == dev)
            .unwrap_or(false);
        if !ok {
            let _ = sys_umount(target, libc::MNT_DETACH);
            return Err(Error::Io {
                context: format!(
                    "volume {vol} mounted at {} does not answer",
                    target.display()
                ),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let mut b = Batch::new();
        b.put(
            Cf::Mounts,
            target.as_os_str().as_bytes().to_vec(),
            meta::encode(
                MOUNT_VERSION,
                &MountRecord {
                    volume: vol.to_string(),
                    read_only: ro,
                },
            ),
        );
        self.registry.store().engine.write(b, true)?;
        tracing::info!(volume = %vol, target = %target.display(), read_only = ro, "mounted");
        Ok(MountInfo {
            volume: vol.to_string(),
            target: target.display().to_string(),
            read_only: ro,
        })
    }

    /// Unmounts a mountpoint made by `mount` (or any bind mount of a volume's connection).
    pub fn unmount(&self, target: &Path, lazy: bool) -> Result<()> {
        let entry = mountinfo().into_iter().rev().find(|m| m.target == target);
        let ours = entry.as_ref().is_some_and(|m| is_volfs_type(&m.fstype));
        let recorded = self
            .registry
            .store()
            .engine
            .get(Cf::Mounts, target.as_os_str().as_bytes())?
            .is_some();
        if !ours && !recorded {
            return Err(Error::NotFound(format!(
                "volfs mount at {}",
                target.display()
            )));
        }
        if ours {
            sys_umount(target, if lazy { libc::MNT_DETACH } else { 0 }).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    Error::Busy(format!("{} (files are open on it)", target.display()))
                } else {
                    Error::io(format!("unmounting {}", target.display()), e)
                }
            })?;
        }
        let mut b = Batch::new();
        b.delete(Cf::Mounts, target.as_os_str().as_bytes().to_vec());
        self.registry.store().engine.write(b, true)?;
        tracing::info!(target = %target.display(), "unmounted");
        Ok(())
    }

    pub fn recorded(&self) -> Result<Vec<MountInfo>> {
        self.registry
            .store()
            .engine
            .scan_prefix(Cf::Mounts, b"")?
            .into_iter()
            .map(|(k, v)| {
                let r: MountRecord = meta::decode(MOUNT_VERSION, "mount record", &v)?;
                Ok(MountInfo {
                    volume: r.volume,
                    target: String::from_utf8_lossy(&k).into_owned(),
                    read_only: r.read_only,
                })
            })
            .collect()
    }

    /// Takes over the connections a dead server process left to the supervisor (see
    /// `handover`): the volume is loaded without freeing orphans (the kernel may hold them
    /// open), a session starts on the already-initialized connection, and the requests the
    /// dead process read but never answered are queued again. The mountpoints never changed.
    /// A connection that cannot be taken over is aborted, so that its mounts fail instead of
    /// hanging.
    pub fn adopt(&self, conns: Vec<(String, OwnedFd, Option<OwnedFd>)>) {
        for (vol, fd, log) in conns {
            let t0 = Instant::now();
            match self.adopt_one(&vol, fd, log) {
                Ok(()) => tracing::info!(
                    volume = %vol,
                    millis = t0.elapsed().as_millis() as u64,
                    "took over the live connection of a previous server process"
                ),
                Err(e) => {
                    tracing::error!(volume = %vol, "cannot take over the connection; its mounts end: {e}");
                    if let Some(m) = mountinfo().iter().find(|m| {
                        VolumeRef::parse(&vol).is_ok_and(|v| m.target == self.primary_path(&v))
                    }) {
                        let ctl = format!("/sys/fs/fuse/connections/{}/abort", libc::minor(m.dev));
                        let _ = std::fs::write(ctl, "1");
                    }
                    if let Some(link) = &self.link {
                        link.remove(&vol);
                    }
                }
            }
        }
    }

    /// Gives a writable volume a fresh write log in a memfd and hands a duplicate to the
    /// supervisor: the next server process replays it if this one dies.
    fn new_log(&self, vol: &VolumeRef, fs: &Arc<VolumeFs>) -> Result<()> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        if fs.is_read_only() {
            return Ok(());
        }
        let file = memfd(&format!("volfs-log:{vol}"))
            .map_err(|e| Error::io(format!("creating volume {vol}'s write log"), e))?;
        link.add_log(vol.as_str(), file.as_raw_fd()).map_err(|e| {
            Error::io(
                format!("handing volume {vol}'s write log to the supervisor"),
                e,
            )
        })?;
        fs.attach_log(WriteLog::create(file)?)?;
        start_log_flusher(vol, fs);
        Ok(())
    }

    /// Attaches the write log a dead server left and buffers again the writes it had
    /// acknowledged but not committed, before any request is answered.
    fn replay_log(&self, vol: &VolumeRef, fs: &Arc<VolumeFs>, log: Option<OwnedFd>) -> Result<()> {
        if fs.is_read_only() {
            return Ok(());
        }
        let Some(log) = log else {
            // A server of a version without write logs ran before (an upgrade): nothing to
            // replay; start one now.
            return self.new_log(vol, fs);
        };
        let (log, pending) = WriteLog::open(std::fs::File::from(log)).map_err(|e| {
            Error::Db(format!(
                "volume {vol}: the previous server's write log is unreadable ({e}); its acknowledged, uncommitted writes cannot be recovered"
            ))
        })?;
        fs.attach_log(log)?;
        // The flusher starts after the replay: a commit in the middle of it would cover the
        // inode's records still to be adopted (`WriteLog::adopt`).
        let r = fs.replay(pending);
        start_log_flusher(vol, fs);
        if r.writes > 0 {
            tracing::info!(volume = %vol, writes = r.writes, bytes = r.bytes, "replayed acknowledged writes the previous server had not committed");
        }
        for f in &r.failed {
            tracing::error!(volume = %vol, "replaying the write log: lost {f}");
        }
        Ok(())
    }

    fn adopt_one(&self, vol: &str, fd: OwnedFd, log: Option<OwnedFd>) -> Result<()> {
        let vref = VolumeRef::parse(vol)?;
        let (fs, rec) = self.load_fs(&vref, true)?;
        let primary = self.primary_path(&vref);
        // From mountinfo, not stat: a stat would wait for this very connection.
        let dev = mountinfo()
            .iter()
            .find(|m| m.target == primary)
            .map(|m| m.dev)
            .ok_or_else(|| {
                Error::NotFound(format!("connection of {vol} at {}", primary.display()))
            })?;
        let fuse_opts = self.fuse_options(rec.size.is_some());
        fs.set_kernel_times(fuse_opts.writeback_cache);
        self.replay_log(&vref, &fs, log)?;
        let mut cfg = fuser::Config::default();
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(self.fuse.workers.max(1));
        cfg.clone_fd = false;
        let vm = self.metrics.volume(vol);
        let session =
            crate::fuse::adopt_session(FuseFs::new(fs.clone(), fuse_opts, vm.clone()), fd, cfg)
                .map_err(|e| Error::io(format!("starting a session on {vol}'s connection"), e))?;
        {
            use std::os::fd::AsFd;
            if let Err(e) = crate::handover::resend(session.as_fd().as_raw_fd()) {
                tracing::warn!(volume = %vol, "FUSE_NOTIFY_RESEND (Linux 6.9+) refused: {e}; requests the dead server had read stay unanswered");
            }
        }
        let session = session
            .spawn()
            .map_err(|e| Error::io(format!("starting FUSE threads for {vol}"), e))?;
        self.active.lock().insert(
            vol.to_string(),
            Active {
                fs,
                metrics: vm,
                primary,
                dev,
                last_used: Instant::now(),
                session,
            },
        );
        Ok(())
    }

    /// Makes the recorded mounts again (after a restart), and brings up the connections of
    /// volumes Docker holds. Failures are logged, not fatal.
    pub fn restore(&self) -> Result<()> {
        let mut held: Vec<String> = Vec::new();
        for (k, _) in self.registry.store().engine.scan_prefix(Cf::Holders, b"")? {
            if let Some(v) = k.split(|b| *b == 0).next() {
                let v = String::from_utf8_lossy(v).into_owned();
                if held.last() != Some(&v) {
                    held.push(v);
                }
            }
        }
        for v in held {
            if let Err(e) = VolumeName::new(&v).and_then(|n| self.activate(&n.into())) {
                tracing::error!(volume = %v, "cannot restore volume held by Docker: {e}");
            }
        }
        let live: Vec<u64> = self.active.lock().values().map(|a| a.dev).collect();
        for m in self.recorded()? {
            let target = PathBuf::from(&m.target);
            // Still mounted on a connection taken over from a previous server: nothing to do.
            if mountinfo()
                .iter()
                .any(|e| e.target == target && live.contains(&e.dev))
            {
                continue;
            }
            // A mount left by a daemon that died answers ENOTCONN: detach it first.
            if mountinfo()
                .iter()
                .any(|e| e.target == target && is_volfs_type(&e.fstype))
            {
                let _ = sys_umount(&target, libc::MNT_DETACH);
            }
            let res =
                VolumeRef::parse(&m.volume).and_then(|v| self.mount(&v, &target, m.read_only));
            if let Err(e) = res {
                tracing::error!(volume = %m.volume, target = %m.target, "cannot restore mount: {e}");
            }
        }
        Ok(())
    }

    fn holder_prefix(vol: &str) -> Vec<u8> {
        let mut k = vol.as_bytes().to_vec();
        k.push(0);
        k
    }

    /// Takes a reference on a volume for `id` (a Docker mount ID) and returns the path the
    /// caller may use. Idempotent per id; references survive restarts.
    pub fn hold(&self, vol: &VolumeName, id: &str) -> Result<PathBuf> {
        let primary = self.activate(&VolumeRef::from(vol.clone()))?;
        let mut k = Self::holder_prefix(vol.as_str());
        k.extend_from_slice(id.as_bytes());
        let mut b = Batch::new();
        b.put(Cf::Holders, k, Vec::new());
        self.registry.store().engine.write(b, true)?;
        Ok(primary)
    }

    /// Drops `id`'s reference. Returns how many references remain.
    pub fn unhold(&self, vol: &VolumeName, id: &str) -> Result<usize> {
        let mut k = Self::holder_prefix(vol.as_str());
        k.extend_from_slice(id.as_bytes());
        let mut b = Batch::new();
        b.delete(Cf::Holders, k);
        self.registry.store().engine.write(b, true)?;
        if let Some(a) = self.active.lock().get_mut(vol.as_str()) {
            a.last_used = Instant::now();
        }
        self.holders(vol.as_str())
    }

    pub fn holders(&self, vol: &str) -> Result<usize> {
        Ok(self
            .registry
            .store()
            .engine
            .scan_prefix(Cf::Holders, &Self::holder_prefix(vol))?
            .len())
    }

    /// The path Docker should use for a volume: its connection, while it is held.
    pub fn held_path(&self, vol: &str) -> Result<Option<PathBuf>> {
        if self.holders(vol)? == 0 {
            return Ok(None);
        }
        Ok(self.active.lock().get(vol).map(|a| a.primary.clone()))
    }

    /// Tells the kernel to drop its cached pages and attributes of every inode it holds on
    /// every active connection (dirty pages are written back first, through the daemon).
    /// Returns the number of inodes invalidated.
    pub fn invalidate_kernel_caches(&self) -> u64 {
        let targets: Vec<(String, Arc<VolumeFs>, Arc<VolumeMetrics>, fuser::Notifier)> = self
            .active
            .lock()
            .iter()
            .map(|(name, a)| {
                (
                    name.clone(),
                    a.fs.clone(),
                    a.metrics.clone(),
                    a.session.notifier(),
                )
            })
            .collect();
        let mut n = 0;
        for (name, fs, m, notifier) in targets {
            for ino in fs.known_inodes() {
                // Offset 0 and length 0: every page of the inode, and its attributes.
                match notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
                    Ok(()) => {
                        m.invalidations.inc();
                        n += 1;
                    }
                    // The kernel forgot the inode meanwhile: nothing cached to drop.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        tracing::warn!(volume = %name, op = "cache drop", ino, "invalidating the kernel cache: {e}");
                    }
                }
            }
        }
        n
    }

    /// Unmounts a volume everywhere (for `volume rm --force`) and closes its connection.
    pub fn detach_volume(&self, vol: &str) -> Result<()> {
        if !vol.contains('@') {
            // Its snapshot views go with it.
            let views: Vec<String> = self
                .active
                .lock()
                .keys()
                .filter(|k| k.strip_prefix(vol).is_some_and(|r| r.starts_with('@')))
                .cloned()
                .collect();
            for v in views {
                self.detach_volume(&v)?;
            }
        }
        for m in self.mountpoints(vol) {
            let _ = sys_umount(&m.target, libc::MNT_DETACH);
        }
        let recorded: Vec<MountInfo> = self
            .recorded()?
            .into_iter()
            .filter(|m| m.volume == vol)
            .collect();
        let mut b = Batch::new();
        for m in recorded {
            b.delete(Cf::Mounts, m.target.into_bytes());
        }
        for (k, _) in self
            .registry
            .store()
            .engine
            .scan_prefix(Cf::Holders, &Self::holder_prefix(vol))?
        {
            b.delete(Cf::Holders, k);
        }
        self.registry.store().engine.write(b, true)?;
        self.close(vol, false)
    }

    /// Flushes a volume and detaches its connection. With `abort`, also ends the connection
    /// (processes still inside the detached mount get ENOTCONN) and waits for its FUSE threads,
    /// so that nothing uses the store afterwards; used at daemon shutdown.
    fn close(&self, vol: &str, abort: bool) -> Result<()> {
        let Some(a) = self.active.lock().remove(vol) else {
            return Ok(());
        };
        if let Some(link) = &self.link {
            link.remove(vol);
        }
        let flushed = a.fs.shutdown();
        let _ = sys_umount(&a.primary, libc::MNT_DETACH);
        if abort {
            let ctl = format!("/sys/fs/fuse/connections/{}/abort", libc::minor(a.dev));
            if let Err(e) = std::fs::write(&ctl, "1") {
                tracing::debug!(volume = %vol, "aborting connection via {ctl}: {e}");
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let session = a.session;
            std::thread::spawn(move || {
                let _ = tx.send(session.join());
            });
            if rx.recv_timeout(Duration::from_secs(5)).is_err() {
                tracing::warn!(volume = %vol, "FUSE threads did not stop within 5 s");
            }
        }
        tracing::info!(volume = %vol, "volume connection closed");
        flushed
    }

    /// Forgets records of mounts that were unmounted behind the daemon's back (a plain
    /// `umount DIR`), so they do not come back at the next start.
    fn prune_records(&self) -> Result<()> {
        let now = mountinfo();
        let active: Vec<(String, u64)> = self
            .active
            .lock()
            .iter()
            .map(|(v, a)| (v.clone(), a.dev))
            .collect();
        let mut b = Batch::new();
        for m in self.recorded()? {
            let Some((_, dev)) = active.iter().find(|(v, _)| *v == m.volume) else {
                continue;
            };
            let target = PathBuf::from(&m.target);
            if !now.iter().any(|e| e.target == target && e.dev == *dev) {
                tracing::info!(volume = %m.volume, target = %m.target, "mount was removed outside volfs; forgetting it");
                b.delete(Cf::Mounts, m.target.into_bytes());
            }
        }
        if !b.is_empty() {
            self.registry.store().engine.write(b, true)?;
        }
        Ok(())
    }

    /// The filesystems of the active connections, by volume (a snapshot of the table).
    fn active_filesystems(&self) -> Vec<(String, Arc<VolumeFs>)> {
        self.active
            .lock()
            .iter()
            .map(|(v, a)| (v.clone(), a.fs.clone()))
            .collect()
    }

    /// Unmounts primaries nobody uses any more.
    pub fn reap_idle(&self) {
        if let Err(e) = self.prune_records() {
            tracing::warn!("pruning mount records: {e}");
        }
        let candidates: Vec<String> = {
            let active = self.active.lock();
            active
                .iter()
                .filter(|(_, a)| a.last_used.elapsed() > IDLE_GRACE)
                .map(|(v, _)| v.clone())
                .collect()
        };
        for v in candidates {
            if self.mountpoints(&v).is_empty() && self.holders(&v).unwrap_or(1) == 0 {
                if let Err(e) = self.close(&v, false) {
                    tracing::warn!(volume = %v, "closing idle volume: {e}");
                }
            }
        }
    }

    /// Commits every volume's buffered data, leaving connections and mounts as they are (the
    /// next server process takes them over).
    pub fn flush_for_handover(&self) {
        for (v, fs) in self.active_filesystems() {
            if let Err(e) = fs.flush_all() {
                tracing::error!(volume = %v, "flushing before the handover failed: {e}");
            }
        }
    }

    /// Flushes and detaches everything (daemon shutdown). Records stay, so the mounts come
    /// back when the daemon starts again.
    pub fn shutdown(&self) {
        let vols: Vec<String> = self.active.lock().keys().cloned().collect();
        for v in vols {
            if let Some(fs) = self.volume_fs(&v) {
                if let Err(e) = fs.shutdown() {
                    tracing::error!(volume = %v, "flushing at shutdown failed: {e}");
                }
            }
            for m in self.mountpoints(&v) {
                let _ = sys_umount(&m.target, libc::MNT_DETACH);
            }
            if let Err(e) = self.close(&v, true) {
                tracing::error!(volume = %v, "closing at shutdown failed: {e}");
            }
        }
    }
}

/// How much dirty data a connection's backing device may hold (see [`tune_bdi`]).
#[derive(Clone, Copy, Debug)]
enum DirtyLimit {
    Ratio(u32),
    Bytes(u64),
}

/// Tunes one connection's backing device (`/sys/class/bdi/MAJ:MIN`):
/// - `dirty`, a ratio: let it hold that percent of the kernel's dirty-page limit, like a
///   local disk, instead of FUSE's strict 1% (writers of a volfs volume would otherwise stall
///   at ~50 MiB of dirty pages, and random writes would never coalesce). The daemon is root
///   and trusted, which is what the FUSE default guards against.
/// - `dirty`, bytes: a strict limit of that many bytes; the kernel writes back from half of
///   it on, so a stream is chunked while it is written, not all at its fsync.
/// - read-ahead of 4 MiB instead of FUSE's 128 KiB, so several 1 MiB reads are in flight and
///   the dispatch threads serve them in parallel.
///
/// Best effort: a kernel without these knobs keeps its defaults, with a log line.
fn tune_bdi(dev: u64, dirty: Option<DirtyLimit>) {
    let bdi = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    let mut knobs: Vec<(&str, u64)> = vec![("read_ahead_kb", 4096)];
    match dirty {
        Some(DirtyLimit::Ratio(ratio)) => {
            knobs.extend([("strict_limit", 0), ("max_ratio", u64::from(ratio))])
        }
        Some(DirtyLimit::Bytes(b)) => knobs.extend([("max_bytes", b), ("strict_limit", 1)]),
        None => {}
    }
    for (knob, value) in knobs {
        if let Err(e) = std::fs::write(bdi.join(knob), format!("{value}\n")) {
            tracing::warn!(bdi = %bdi.display(), "cannot set {knob} to {value}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let l = "36 35 0:52 / /mnt/my\\040data rw,nosuid,nodev,relatime shared:1 - fuse.volfs data1 rw,user_id=0";
        let m = parse_mountinfo_line(l).unwrap();
        assert_eq!(m.target, PathBuf::from("/mnt/my data"));
        assert_eq!(m.fstype, "fuse.volfs");
        assert_eq!(m.source, "data1");
        assert!(!m.read_only);
        assert_eq!(m.dev, libc::makedev(0, 52));
        assert!(parse_mountinfo_line("garbage").is_none());
    }
}
