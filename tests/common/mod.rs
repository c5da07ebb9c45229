//! Integration test harness: real `volfs-mountd` daemons, real FUSE mounts.
//!
//! Every [`Daemon`] owns a fresh temp dir under /tmp:
//! ```text
//! <root>/data/         --data-dir
//! <root>/run/          --run-dir (volume connections at run/mnt/<volume>)
//! <root>/run/volfs.sock
//! <root>/mnt/          fresh user mountpoints (mnt/m<N>-<volume>)
//! <root>/volfs.toml    an empty config, so that no /etc/volfs/volfs.toml leaks in
//! <root>/daemon.log    the daemon's stderr (appended across restarts)
//! ```
//! Dropping a `Daemon` always cleans up, also when the test panics: it unmounts (MNT_DETACH,
//! deepest first) the user mountpoints under the temp dir, stops the daemon (SIGTERM, up to
//! 5 s, then SIGKILL), then unmounts everything still mounted under the temp dir (the
//! daemon's volume connections under run/mnt, mounts of a killed daemon) and removes the temp
//! dir. When the test panicked it prints the daemon log first. (The connections are detached
//! only after the daemon stopped: a running daemon whose connection vanished would take the
//! next FUSE mount that gets the freed device number, possibly another test's, for its own
//! and detach it; see the test `stale_device_number_is_not_taken_for_a_mountpoint`.)
//!
//! Each daemon gets its own Docker plugin socket (`<root>/run/plugin.sock`) and runs with
//! its cwd in the temp dir; `VOLFS_*` variables of the caller's environment are not passed on.
//!
//! `VOLFS_TEST_DAEMON_ENV="K=V,K=V"` adds environment variables to every daemon (for example
//! `VOLFS_WRITEBACK_CACHE=false` or `VOLFS_COMPRESSION=zstd`), to run the suite in other
//! configurations.
//!
//! A watchdog SIGKILLs the daemon if a test runs longer than `VOLFS_TEST_TIMEOUT` seconds
//! (default 300): a hung FUSE request then fails with ENOTCONN instead of hanging the suite.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use volfs::client::{Client, ClientError};

/// How long a daemon may take to answer GET /v1/status after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop (SIGTERM) may take in `restart`/`stop`.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Drop waits after SIGTERM before SIGKILL.
pub const DROP_STOP_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// `$CARGO_TARGET_DIR/debug` (the test binary is `.../debug/deps/core-xxxx`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    deps.parent().expect("deps dir has a parent").to_path_buf()
}

/// Path of one of the workspace's binaries; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} does not exist: run `cargo build --workspace` before the integration tests",
        p.display()
    );
    p
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Output of a process run to completion (or killed at its timeout).
#[derive(Debug, Clone)]
pub struct CmdOut {
    /// None when the process was killed because it exceeded its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }
    /// Parses stdout as JSON; panics with the whole output when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
    /// Non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

impl std::fmt::Display for CmdOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => writeln!(f, "status: {s}")?,
            None => writeln!(f, "status: killed after timeout")?,
        }
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr; kills it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CmdOut {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    // Read both pipes on threads so that a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout piped");
    let mut se = child.stderr.take().expect("stderr piped");
    let to = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&to.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&te.join().unwrap_or_default()).into_owned();
    CmdOut {
        status,
        stdout,
        stderr,
    }
}

pub fn kill(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for a child until `timeout`; None if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return None,
            Err(_) => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mount table
// ---------------------------------------------------------------------------------------------

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (field 6), e.g. `rw,nosuid,nodev`.
    pub mount_opts: String,
    pub dev: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.mount_opts.split(',').any(|o| o == "ro")
    }
}

fn unescape_mountinfo(s: &str) -> String {
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

/// The current mount table of this process's mount namespace.
pub fn mountinfo() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                target: PathBuf::from(unescape_mountinfo(f.get(4)?)),
                mount_opts: f.get(5)?.to_string(),
                fstype: r.first()?.to_string(),
                source: unescape_mountinfo(r.get(1).copied().unwrap_or("")),
            })
        })
        .collect()
}

/// Mounts whose mountpoint is `root` or below it.
pub fn mounts_under(root: &Path) -> Vec<MountEntry> {
    mountinfo()
        .into_iter()
        .filter(|m| m.target.starts_with(root))
        .collect()
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mountinfo().into_iter().rev().find(|m| m.target == path)
}

/// True if `path` is a volfs mountpoint.
pub fn is_volfs_mount(path: &Path) -> bool {
    mount_at(path).is_some_and(|m| m.fstype == "fuse.volfs")
}

pub fn umount2(path: &Path, flags: i32) -> io::Result<()> {
    let c = cstr(path);
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lazily unmounts every mount under `root`, deepest first, until none is left (stacked
/// mounts need several rounds). Returns the mounts that could not be removed.
pub fn unmount_all_under(root: &Path) -> Vec<MountEntry> {
    unmount_where(root, |_| true)
}

/// Like [`unmount_all_under`], for the mounts under `root` that `pick` selects.
pub fn unmount_where(root: &Path, pick: impl Fn(&MountEntry) -> bool) -> Vec<MountEntry> {
    let selected =
        || -> Vec<MountEntry> { mounts_under(root).into_iter().filter(|m| pick(m)).collect() };
    for _ in 0..20 {
        let mut ms = selected();
        if ms.is_empty() {
            return ms;
        }
        ms.sort_by_key(|m| std::cmp::Reverse(m.target.components().count()));
        for m in &ms {
            if let Err(e) = umount2(&m.target, libc::MNT_DETACH) {
                if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT)
                {
                    eprintln!("harness: umount2({}, MNT_DETACH): {e}", m.target.display());
                }
            }
        }
    }
    selected()
}

// ---------------------------------------------------------------------------------------------
// Small syscall helpers
// ---------------------------------------------------------------------------------------------

pub fn cstr(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("path without NUL")
}

/// Turns a libc return value into io::Result (negative = errno).
pub fn cvt<T: PartialOrd + Default + Copy>(rc: T) -> io::Result<T> {
    if rc < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The errno of a failed io::Result, or None if it succeeded.
pub fn errno_of<T>(r: &io::Result<T>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

/// Asserts that `r` failed with `errno`; `what` names the operation in the message.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected {} but it succeeded ({v:?})",
            errno_name(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected {} but got {e}",
            errno_name(errno)
        ),
    }
}

pub fn errno_name(e: i32) -> String {
    format!("errno {e} ({})", io::Error::from_raw_os_error(e))
}

/// statvfs(3) of a path.
pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = cstr(p);
    // SAFETY: zeroed struct we own, valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        cvt(libc::statvfs(c.as_ptr(), &mut s))?;
        Ok(s)
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Removes ANSI escape sequences (colours) from log text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------------------------

struct Watchdog {
    pid: Mutex<Option<u32>>,
    done: Mutex<bool>,
    cv: Condvar,
    fired: AtomicBool,
}

fn test_timeout() -> Duration {
    let secs = std::env::var("VOLFS_TEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

fn start_watchdog(root: PathBuf) -> Arc<Watchdog> {
    let w = Arc::new(Watchdog {
        pid: Mutex::new(None),
        done: Mutex::new(false),
        cv: Condvar::new(),
        fired: AtomicBool::new(false),
    });
    let w2 = w.clone();
    let timeout = test_timeout();
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let mut done = w2.done.lock().unwrap();
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                w2.fired.store(true, Ordering::SeqCst);
                if let Some(pid) = *w2.pid.lock().unwrap() {
                    eprintln!(
                        "harness: test in {} ran longer than {timeout:?}: SIGKILL to volfs-mountd pid {pid}",
                        root.display()
                    );
                    kill(pid, libc::SIGKILL);
                }
                return;
            }
            done = w2.cv.wait_timeout(done, deadline - now).unwrap().0;
        }
    });
    w
}

// ---------------------------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------------------------

pub struct Daemon {
    pub root: PathBuf,
    pub data: PathBuf,
    pub run: PathBuf,
    pub mnt: PathBuf,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    next_dir: AtomicUsize,
    watchdog: Arc<Watchdog>,
    /// Extra environment for the daemon (e.g. VOLFS_ATTR_TTL_MS).
    env: Vec<(String, String)>,
    /// The volfs-mountd binary to run (default: the one cargo built).
    pub exe: PathBuf,
    /// A network namespace (`ip netns` name) to run the daemon in; its mounts stay visible.
    pub netns: Option<String>,
}

impl Daemon {
    /// A fresh temp dir and a daemon on it, answering on its socket.
    pub fn start() -> Daemon {
        Self::start_with_env(&[])
    }

    /// Like [`Daemon::start`], with extra environment variables for the daemon.
    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        let mut d = Self::prepare();
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.start_again();
        d
    }

    /// Like [`Daemon::start_with_env`], running `exe` (e.g. a wrapper that enters a network
    /// namespace and execs volfs-mountd, keeping the pid) instead of volfs-mountd.
    pub fn start_with_exe(env: &[(&str, &str)], exe: PathBuf) -> Daemon {
        let mut d = Self::prepare();
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.exe = exe;
        d.start_again();
        d
    }

    /// The temp dir layout without a running daemon.
    pub fn prepare() -> Daemon {
        let root = tempfile::Builder::new()
            .prefix("volfs-it.")
            .tempdir_in("/tmp")
            .expect("creating temp dir under /tmp")
            .keep();
        let d = Daemon {
            data: root.join("data"),
            run: root.join("run"),
            mnt: root.join("mnt"),
            socket: root.join("run").join("volfs.sock"),
            log_path: root.join("daemon.log"),
            config: root.join("volfs.toml"),
            child: None,
            next_dir: AtomicUsize::new(0),
            watchdog: start_watchdog(root.clone()),
            env: Vec::new(),
            exe: bin("volfs-mountd"),
            netns: None,
            root,
        };
        for dir in [&d.data, &d.run, &d.mnt] {
            std::fs::create_dir_all(dir).expect("creating test dirs");
        }
        std::fs::write(&d.config, "").expect("writing empty config");
        d
    }

    /// The daemon command line on this temp dir (not spawned).
    pub fn command(&self) -> Command {
        self.command_with(&self.data, &self.run, &self.socket)
    }

    /// A daemon command line with other dirs (for tests that start a second daemon). The
    /// Docker plugin socket goes to `<run>/plugin.sock`, never to the global default.
    pub fn command_with(&self, data: &Path, run: &Path, socket: &Path) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(data)
            .arg("--run-dir")
            .arg(run)
            .arg("--socket")
            .arg(socket);
        scrub_env(&mut c);
        // Inside the temp dir, so that nothing the daemon drops in its cwd (core files) lands
        // in the source tree.
        c.current_dir(&self.root);
        c.env("RUST_LOG", "info").env("NO_COLOR", "1");
        c.env("VOLFS_PLUGIN_SOCKET", run.join("plugin.sock"));
        // Any free port (the log says which): many daemons run at once.
        c.env("VOLFS_METRICS_LISTEN", "127.0.0.1:0");
        // A configuration matrix for CI: VOLFS_TEST_DAEMON_ENV="VOLFS_WRITEBACK_CACHE=false,VOLFS_COMPRESSION=zstd"
        // applies to every daemon the tests start.
        if let Ok(extra) = std::env::var("VOLFS_TEST_DAEMON_ENV") {
            for kv in extra.split(',').filter(|s| !s.trim().is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                c.env(k.trim(), v.trim());
            }
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(ns) = &self.netns {
            // Only the network namespace: `ip netns exec` would also give the daemon a mount
            // namespace of its own, and its FUSE mounts would not be visible to the test.
            let f = File::open(format!("/run/netns/{ns}"))
                .unwrap_or_else(|e| panic!("opening network namespace {ns}: {e}"));
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            // SAFETY: setns is async-signal-safe; the closure only makes that call.
            unsafe {
                c.pre_exec(move || {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c
    }

    /// Like [`Daemon::start_with_env`], in the network namespace `ns` (see [`Daemon::netns`]).
    pub fn start_in_netns(ns: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Self::prepare();
        d.netns = Some(ns.to_string());
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.start_again();
        d
    }

    /// This daemon's Docker volume plugin socket.
    pub fn plugin_socket(&self) -> PathBuf {
        self.run.join("plugin.sock")
    }

    /// Starts the daemon on the existing dirs (after `stop` or `kill9`) and waits until it
    /// answers GET /v1/status.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "start_again: the daemon is still running"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening daemon log");
        let log2 = log.try_clone().expect("cloning log fd");
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log));
        // SAFETY: prctl is async-signal-safe. If the test process dies, so does the daemon.
        // (PDEATHSIG follows the spawning thread: keep a Daemon on its test's thread.)
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawning volfs-mountd");
        *self.watchdog.pid.lock().unwrap() = Some(child.id());
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let client = self.client().with_timeout(Duration::from_secs(5));
        loop {
            // The answer must come from our child (not from a daemon left on the socket).
            let want = self.child.as_ref().map(|c| c.id());
            if let Ok(v) = client.get::<Value>("/v1/status") {
                if v["pid"].as_u64().map(|p| p as u32) == want {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    *self.watchdog.pid.lock().unwrap() = None;
                    panic!(
                        "volfs-mountd exited while starting ({status}); log:\n{}",
                        self.log()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "volfs-mountd did not answer GET /v1/status within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is not running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Graceful stop: SIGTERM, then wait up to [`STOP_TIMEOUT`] (SIGKILL and panic after).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("stop: daemon is not running");
        kill(child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut child, STOP_TIMEOUT);
        *self.watchdog.pid.lock().unwrap() = None;
        match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "volfs-mountd did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Graceful restart on the same dirs. Returns how the old daemon exited; an unclean exit
    /// is reported on stderr but is not fatal here (`graceful_stop_exits_zero` tests it), so
    /// that tests about persistence fail only for persistence.
    pub fn restart(&mut self) -> ExitStatus {
        let s = self.stop();
        if !s.success() {
            eprintln!("harness: volfs-mountd exited with {s} on SIGTERM (restart goes on)");
        }
        self.start_again();
        s
    }

    /// SIGKILL, and reap it. Mounts are left dead (ENOTCONN).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: daemon is not running");
        kill(child.id(), libc::SIGKILL);
        let _ = child.wait();
        *self.watchdog.pid.lock().unwrap() = None;
    }

    /// Kills the server process (not its supervisor) with SIGKILL and waits until a new one
    /// answers. Returns how long the API was unavailable.
    pub fn kill_server(&self) -> Duration {
        let st = self.status();
        let old = st["server_pid"].as_u64().expect("server_pid in status") as u32;
        assert_ne!(old, self.pid(), "the daemon runs without a supervisor");
        let t0 = Instant::now();
        kill(old, libc::SIGKILL);
        let client = self.client().with_timeout(Duration::from_secs(5));
        loop {
            if let Ok(v) = client.get::<Value>("/v1/status") {
                if v["server_pid"].as_u64().is_some_and(|p| p as u32 != old) {
                    return t0.elapsed();
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no new server within 20 s of killing {old}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the running daemon serves /metrics (from its log: tests bind port 0).
    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("metrics endpoint"))
            .unwrap_or_else(|| panic!("the daemon log names no metrics endpoint:\n{log}"));
        line.split("addr=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no addr= in {line:?}"))
            .to_string()
    }

    /// GET /metrics: the OpenMetrics text.
    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr(), "/metrics")
    }

    /// The daemon's stderr so far (all runs), without colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket).with_timeout(Duration::from_secs(60))
    }

    /// GET /v1/status.
    pub fn status(&self) -> Value {
        self.client()
            .get("/v1/status")
            .unwrap_or_else(|e| panic!("GET /v1/status: {e}"))
    }

    // --- volumes through the API ------------------------------------------------------------

    /// POST /v1/volumes with the raw body; returns the API's answer.
    pub fn try_create(&self, body: &Value) -> Result<Value, ClientError> {
        self.client().post("/v1/volumes", body)
    }

    /// Creates a volume through the API with `opts` (`size`, `ro`), panicking on failure.
    pub fn create_volume(&self, name: &str, opts: &[(&str, &str)]) -> Value {
        let opts: BTreeMap<&str, &str> = opts.iter().copied().collect();
        let body = json!({ "name": name, "labels": {}, "opts": opts });
        self.try_create(&body)
            .unwrap_or_else(|e| panic!("creating volume {name}: {e}"))
    }

    /// Creates a volume with labels and options.
    pub fn create_volume_full(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        opts: &[(&str, &str)],
        read_only: bool,
    ) -> Value {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let opts: BTreeMap<&str, &str> = opts.iter().copied().collect();
        let body = json!({ "name": name, "labels": labels, "opts": opts, "read_only": read_only });
        self.try_create(&body)
            .unwrap_or_else(|e| panic!("creating volume {name}: {e}"))
    }

    pub fn inspect(&self, name: &str) -> Result<Value, ClientError> {
        self.client().get(&format!("/v1/volumes/{name}"))
    }

    pub fn volumes(&self) -> Vec<Value> {
        self.client()
            .get("/v1/volumes")
            .unwrap_or_else(|e| panic!("GET /v1/volumes: {e}"))
    }

    /// A fresh, empty directory under `<root>/mnt`.
    pub fn fresh_dir(&self, hint: &str) -> PathBuf {
        let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
        let p = self.mnt.join(format!("m{n}-{hint}"));
        std::fs::create_dir_all(&p).expect("creating mountpoint dir");
        p
    }

    /// POST /v1/mounts.
    pub fn try_mount(
        &self,
        volume: &str,
        target: &Path,
        read_only: bool,
    ) -> Result<Value, ClientError> {
        let body = json!({ "volume": volume, "target": target.display().to_string(), "read_only": read_only });
        self.client().post("/v1/mounts", &body)
    }

    /// Mounts `volume` at a fresh dir through the API and returns the dir.
    pub fn mount(&self, volume: &str, read_only: bool) -> PathBuf {
        let dir = self.fresh_dir(volume);
        self.try_mount(volume, &dir, read_only).unwrap_or_else(|e| {
            panic!(
                "mounting {volume} at {}: {e}\nlog:\n{}",
                dir.display(),
                self.log()
            )
        });
        assert!(
            is_volfs_mount(&dir),
            "{} is not a volfs mount after POST /v1/mounts",
            dir.display()
        );
        dir
    }

    /// Creates a volume (with `opts`) and mounts it read-write at a fresh dir.
    pub fn volume_mounted(&self, name: &str, opts: &[(&str, &str)]) -> PathBuf {
        self.create_volume(name, opts);
        self.mount(name, false)
    }

    /// POST /v1/unmount. A busy answer (EBUSY) is retried for up to 10 s: a non-lazy umount
    /// also fails while anything holds a transient reference to the mount, and tests running
    /// in parallel do (`df` stats every mountpoint in the table).
    pub fn unmount(&self, target: &Path) -> Result<Value, ClientError> {
        let body = json!({ "target": target.display().to_string() });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.client().post("/v1/unmount", &body) {
                Err(ClientError::Api {
                    status: 409,
                    message,
                }) if Instant::now() < deadline => {
                    eprintln!("harness: unmount {}: {message}; retrying", target.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    // --- CLI --------------------------------------------------------------------------------

    /// Runs `volfs ARGS` against this daemon (VOLFS_SOCKET set), capturing its output.
    pub fn cli(&self, args: &[&str]) -> CmdOut {
        let mut c = Command::new(bin("volfs"));
        scrub_env(&mut c);
        c.env("VOLFS_SOCKET", &self.socket)
            .env("NO_COLOR", "1")
            .args(args);
        run_with_timeout(&mut c, Duration::from_secs(60))
    }

    /// Runs the CLI and panics (with its output and the daemon log) unless it exits 0.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> CmdOut {
        let out = self.cli(args);
        assert!(
            out.success(),
            "volfs {args:?} failed:\n{out}\ndaemon log:\n{}",
            self.log()
        );
        out
    }

    /// Runs a shell script against this daemon, with the CLI as `$VOLFS` (for redirections
    /// and pipes), capturing its output.
    pub fn cli_sh(&self, script: &str) -> CmdOut {
        let mut c = Command::new("sh");
        scrub_env(&mut c);
        c.env("VOLFS_SOCKET", &self.socket)
            .env("VOLFS", bin("volfs"))
            .env("NO_COLOR", "1")
            .arg("-c")
            .arg(script);
        run_with_timeout(&mut c, Duration::from_secs(120))
    }

    /// Runs `mount-volfs ARGS` (the mount helper) against this daemon.
    pub fn mount_helper(&self, args: &[&str]) -> CmdOut {
        let mut c = Command::new(bin("mount-volfs"));
        scrub_env(&mut c);
        c.env("VOLFS_SOCKET", &self.socket).args(args);
        run_with_timeout(&mut c, Duration::from_secs(60))
    }
}

/// Removes volfs environment variables the test runner might carry, so that every daemon and
/// CLI call talks only to its own test daemon.
pub fn scrub_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("VOLFS_") {
            c.env_remove(&k);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(300);
            eprintln!(
                "===== volfs-mountd log ({}, last {} of {} lines) =====\n{}\n===== end of log =====",
                self.log_path.display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
        if self.watchdog.fired.load(Ordering::SeqCst) {
            eprintln!(
                "harness: the watchdog killed the daemon of {}",
                self.root.display()
            );
        }
        // 1. While the daemon runs, unmount the user mountpoints under the temp dir (deepest
        //    first), but not the daemon's volume connections (<run>/mnt/*): a daemon whose
        //    connection vanished under it mistakes whatever FUSE mount next gets the freed
        //    device number (another test's!) for its own mountpoints and detaches it when it
        //    stops (see `stale_device_number_is_not_taken_for_a_mountpoint`).
        if self.child.is_some() {
            let primaries = self.run.join("mnt");
            unmount_where(&self.root, |m| !m.target.starts_with(&primaries));
        }
        // 2. Stop the daemon: SIGTERM, up to 5 s, then SIGKILL.
        if let Some(mut child) = self.child.take() {
            kill(child.id(), libc::SIGTERM);
            if wait_timeout(&mut child, DROP_STOP_TIMEOUT).is_none() {
                eprintln!(
                    "harness: volfs-mountd pid {} ignored SIGTERM for {DROP_STOP_TIMEOUT:?}: SIGKILL",
                    child.id()
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        {
            *self.watchdog.done.lock().unwrap() = true;
            *self.watchdog.pid.lock().unwrap() = None;
            self.watchdog.cv.notify_all();
        }
        // 3. Everything still mounted under the temp dir (connections, mounts of a killed
        //    daemon, anything the daemon made while stopping): never leave any behind.
        let left = unmount_all_under(&self.root);
        if !left.is_empty() {
            eprintln!(
                "harness: could not unmount {:?}; leaving {} in place",
                left.iter()
                    .map(|m| m.target.display().to_string())
                    .collect::<Vec<_>>(),
                self.root.display()
            );
            return;
        }
        // 4. Remove the temp dir.
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            eprintln!("harness: removing {}: {e}", self.root.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// File helpers
// ---------------------------------------------------------------------------------------------

/// Opens with raw flags (O_*), returning the owned file.
pub fn open_flags(p: &Path, flags: i32, mode: u32) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let c = cstr(p);
    // SAFETY: valid C string; the fd is owned by the returned File.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// close(2) that reports the error (File's Drop ignores it).
pub fn close_checked(f: File) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: we own fd and close it exactly once.
    cvt(unsafe { libc::close(fd) }).map(|_| ())
}

/// Writes all of `data` at the file's position, returning the first error.
pub fn write_all_raw(f: &File, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = f;
    f.write_all(data)
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP over a unix socket (for the Docker plugin socket)
// ---------------------------------------------------------------------------------------------

/// POSTs `body` to `path` on a unix socket the way Docker does (the whole request in one
/// write) and returns the status and body. Unlike `volfs::client::Client::raw`, a server that
/// answers before reading the body (and closes) does not turn into EPIPE.
pub fn unix_http_post(socket: &Path, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nAccept: application/vnd.docker.plugins.v1+json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    if let Err(e) = s.write_all(&req) {
        if e.kind() != io::ErrorKind::BrokenPipe {
            return Err(e);
        }
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let bad = |m: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{m}: {}", String::from_utf8_lossy(&buf)),
        )
    };
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut rest = buf[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut r = &rest[..];
        loop {
            let nl = r
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let n = usize::from_str_radix(String::from_utf8_lossy(&r[..nl]).trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            r = &r[nl + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(r.get(..n).ok_or_else(|| bad("short chunk"))?);
            r = r.get(n + 2..).unwrap_or(&[]);
        }
        rest = out;
    }
    Ok((status, rest))
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// A plain HTTP/1.1 GET; returns the body of a 200 answer (panics otherwise).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::net::TcpStream;
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("reading GET {path} from {addr}: {e}"));
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((len, rest)) = body.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(len.trim(), 16).expect("chunk length");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// The value of one sample (`name{k="v",...}`), or None if absent. `labels` must all match;
/// other labels may be present.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        value.parse().ok()
    })
}

/// Checks the text with the reference OpenMetrics parser (Debian's python3-prometheus-client,
/// which scripts/deps.sh installs): every family must parse. Returns the family count.
pub fn check_openmetrics(text: &str) -> usize {
    let script = "import sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
fams = list(text_string_to_metric_families(sys.stdin.read()))\n\
print(len(fams))\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running /usr/bin/python3 (scripts/deps.sh installs python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the /metrics text: {}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Crash-survival helpers
// ---------------------------------------------------------------------------------------------

/// `flock -n` on `p` from another process: `Some(0)` if it got the lock, `Some(9)` if
/// someone else holds it.
pub fn try_flock(p: &Path) -> Option<i32> {
    Command::new("flock")
        .args(["-n", "-E", "9"])
        .arg(p)
        .arg("true")
        .status()
        .unwrap()
        .code()
}

/// The numbers of the `record N` lines a [`start_writer`] thread wrote.
pub fn records(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| {
            l.strip_prefix("record ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a record line: {l:?}"))
        })
        .collect()
}

pub type Writer = std::thread::JoinHandle<Result<u64, String>>;

/// A thread that appends `record N` lines to `path`, fsync'ing each, until told to stop;
/// returns how many were acknowledged, or the first error it saw.
pub fn start_writer(path: &Path) -> (Arc<AtomicBool>, Writer) {
    let stop = Arc::new(AtomicBool::new(false));
    let (path, flag) = (path.to_path_buf(), stop.clone());
    let writer = std::thread::spawn(move || -> Result<u64, String> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("open: {e}"))?;
        let mut acked = 0u64;
        while !flag.load(Ordering::Relaxed) {
            f.write_all(format!("record {acked}\n").as_bytes())
                .map_err(|e| format!("write of record {acked}: {e}"))?;
            f.sync_data()
                .map_err(|e| format!("fsync of record {acked}: {e}"))?;
            acked += 1;
        }
        Ok(acked)
    });
    (stop, writer)
}
