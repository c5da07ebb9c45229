//! Locking and concurrent-writer tests: fcntl POSIX byte-range locks, OFD locks, flock(2),
//! O_APPEND atomicity, SQLite and log rotation, always across two (or more) mountpoints of one
//! volume.
//!
//! Every mountpoint of a volume is a bind mount of the volume's single FUSE connection, and
//! volfs does not negotiate FUSE_POSIX_LOCKS/FUSE_FLOCK_LOCKS, so the kernel's own lock table
//! and page cache are shared by all mountpoints. These tests check that this holds from the
//! point of view of real, separate processes.
//!
//! Multi-process technique: the test binary re-executes itself (`current_exe() worker_entry
//! --exact --nocapture`) with `LOCKS_TEST_WORKER=<role>`; the `worker_entry` test does nothing
//! unless that variable is set. The interactive `lockctl` role reads one command per line on
//! stdin and answers one line on stdout prefixed with `@@ ` (libtest's own output is ignored),
//! so a test can drive several lock-holding processes step by step. Every wait is bounded.
//!
//! Run: `cargo build --workspace && cargo test --test locks -- --test-threads=2` (as root).
mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const WORKER_ENV: &str = "LOCKS_TEST_WORKER";
const WORKER_ARGS_ENV: &str = "LOCKS_TEST_ARGS";
/// Prefix of every line a worker means for its parent.
const REPLY: &str = "@@ ";
/// How long one interactive command may take before the test gives up on the worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a blocking lock request must stay blocked before we believe it blocks.
const BLOCK_PROBE: Duration = Duration::from_millis(500);

// =============================================================================================
// Small helpers
// =============================================================================================

/// Polls `cond` every 10 ms until it holds or `timeout` passed.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One write(2); an error or a short write is an error.
fn write_once(f: &File, data: &[u8]) -> io::Result<()> {
    // SAFETY: valid fd and buffer.
    let n = cvt(unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) })? as usize;
    if n != data.len() {
        return Err(io::Error::other(format!(
            "short write: {n} of {} bytes",
            data.len()
        )));
    }
    Ok(())
}

/// flock(2), retrying on EINTR.
fn flock_fd(f: &File, op: i32) -> io::Result<()> {
    loop {
        // SAFETY: valid fd.
        match cvt(unsafe { libc::flock(f.as_raw_fd(), op) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r.map(|_| ()),
        }
    }
}

fn is_conflict(e: i32) -> bool {
    e == libc::EAGAIN || e == libc::EACCES
}

#[track_caller]
fn assert_conflict(e: i32, what: &str) {
    assert!(
        is_conflict(e),
        "{what}: expected a lock conflict (EAGAIN/EACCES) but got {}",
        if e == 0 {
            "success".to_string()
        } else {
            errno_name(e)
        }
    );
}

#[track_caller]
fn assert_granted(e: i32, what: &str) {
    assert!(e == 0, "{what}: expected success but got {}", errno_name(e));
}

#[track_caller]
fn assert_err(e: i32, want: i32, what: &str) {
    assert!(
        e == want,
        "{what}: expected {} but got {}",
        errno_name(want),
        if e == 0 {
            "success".to_string()
        } else {
            errno_name(e)
        }
    );
}

/// Drops the clean page cache of a file (after fsync), so that the next read goes to the daemon.
fn drop_file_cache(p: &Path) {
    let f = File::open(p).unwrap();
    f.sync_all().unwrap();
    // SAFETY: valid fd.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise(DONTNEED) on {}", p.display());
}

/// Reads a file, then fsyncs it, drops its page cache and reads it again from the daemon;
/// the two must agree. Returns the content.
fn read_cached_and_uncached(p: &Path) -> Vec<u8> {
    let cached = fs::read(p).unwrap();
    drop_file_cache(p);
    let fresh = fs::read(p).unwrap();
    if cached != fresh {
        let first = cached.iter().zip(fresh.iter()).position(|(a, b)| a != b);
        panic!(
            "{}: content read back after fsync + dropping the page cache differs from the cached \
             content (cached {} bytes, re-read {} bytes, first differing offset {:?})",
            p.display(),
            cached.len(),
            fresh.len(),
            first
        );
    }
    fresh
}

/// One volume mounted read-write at two mountpoints.
fn two_mounts(d: &Daemon, vol: &str) -> (PathBuf, PathBuf) {
    let m1 = d.volume_mounted(vol, &[]);
    let m2 = d.mount(vol, false);
    assert_ne!(m1, m2);
    (m1, m2)
}

// =============================================================================================
// Worker processes
// =============================================================================================

/// The test binary re-executed as a worker with `role` and `args`.
fn worker_command(role: &str, args: &[String]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut c = Command::new(exe);
    c.args([
        "worker_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    c.env(WORKER_ENV, role)
        .env(WORKER_ARGS_ENV, serde_json::to_string(args).unwrap())
        .env("RUST_BACKTRACE", "1");
    // SAFETY: prctl is async-signal-safe. A worker never outlives the thread that spawned it.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// Runs all commands concurrently (each with `timeout`), calling `started` once all are spawned
/// (or at least their threads are), and returns their outputs in order.
fn run_concurrently(cmds: Vec<Command>, timeout: Duration, started: impl FnOnce()) -> Vec<CmdOut> {
    let handles: Vec<_> = cmds
        .into_iter()
        .map(|mut c| std::thread::spawn(move || run_with_timeout(&mut c, timeout)))
        .collect();
    started();
    handles
        .into_iter()
        .map(|h| h.join().expect("runner thread"))
        .collect()
}

/// A start barrier in a local directory: workers announce themselves and wait for `go`.
fn barrier_wait(dir: &Path, id: &str) {
    fs::write(dir.join(format!("ready.{id}")), b"").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || dir.join("go").exists()),
        "worker {id}: no go signal within 60 s"
    );
}

/// Waits (up to 60 s) until `n` workers are ready, then lets them all go.
fn barrier_release(dir: &Path, n: usize) {
    let all = wait_until(Duration::from_secs(60), || {
        fs::read_dir(dir)
            .map(|r| r.filter(|e| e.is_ok()).count())
            .unwrap_or(0)
            >= n
    });
    if !all {
        eprintln!(
            "barrier {}: not all {n} workers became ready; releasing anyway",
            dir.display()
        );
    }
    fs::write(dir.join("go"), b"").unwrap();
}

/// Entry point of every worker process; a no-op in a normal test run.
#[test]
fn worker_entry() {
    let Ok(role) = std::env::var(WORKER_ENV) else {
        return;
    };
    let args: Vec<String> =
        serde_json::from_str(&std::env::var(WORKER_ARGS_ENV).unwrap_or_else(|_| "[]".into()))
            .unwrap();
    match role.as_str() {
        "flock_append" => worker_flock_append(&args),
        "append_records" => worker_append_records(&args),
        "rotating_writer" => worker_rotating_writer(&args),
        "lockctl" => worker_lockctl(),
        other => panic!("unknown worker role {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Interactive lock worker
// ---------------------------------------------------------------------------------------------

extern "C" fn on_sigalrm(_: libc::c_int) {}

fn lock_type(t: &str) -> i16 {
    match t {
        "r" => libc::F_RDLCK as i16,
        "w" => libc::F_WRLCK as i16,
        "u" => libc::F_UNLCK as i16,
        _ => panic!("bad lock type {t}"),
    }
}

fn lock_cmd(c: &str) -> i32 {
    match c {
        "setlk" => libc::F_SETLK,
        "setlkw" => libc::F_SETLKW,
        "getlk" => libc::F_GETLK,
        "ofd_setlk" => libc::F_OFD_SETLK,
        "ofd_setlkw" => libc::F_OFD_SETLKW,
        "ofd_getlk" => libc::F_OFD_GETLK,
        _ => panic!("bad lock command {c}"),
    }
}

fn fcntl_lock(f: &File, cmd: i32, ty: i16, start: i64, len: i64) -> io::Result<libc::flock> {
    // SAFETY: zeroed plain struct; valid fd and pointer.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl.l_pid = 0;
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl as *mut libc::flock) })?;
    Ok(fl)
}

/// Executes one lockctl command; Ok(extra reply text).
fn lockctl_cmd(fds: &mut HashMap<String, File>, t: &[&str]) -> io::Result<String> {
    // Borrow, never dup: closing a dup'ed descriptor would drop the process's POSIX locks.
    fn fd<'a>(fds: &'a HashMap<String, File>, name: &str) -> io::Result<&'a File> {
        fds.get(name)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
    match t {
        ["pid"] => Ok(format!(" {}", std::process::id())),
        ["open", name, path, mode] => {
            let flags = match *mode {
                "r" => libc::O_RDONLY,
                "w" => libc::O_WRONLY,
                "rw" => libc::O_RDWR,
                "rwc" => libc::O_RDWR | libc::O_CREAT,
                "wa" => libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
                _ => panic!("bad open mode {mode}"),
            };
            let f = open_flags(Path::new(path), flags, 0o644)?;
            if let Some(old) = fds.insert(name.to_string(), f) {
                close_checked(old)?;
            }
            Ok(String::new())
        }
        ["close", name] => {
            let f = fds
                .remove(*name)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
            close_checked(f).map(|_| String::new())
        }
        ["lk", name, cmd, ty, start, len] => {
            let f = fd(fds, name)?;
            let cmd = lock_cmd(cmd);
            let fl = fcntl_lock(
                f,
                cmd,
                lock_type(ty),
                start.parse().unwrap(),
                len.parse().unwrap(),
            )?;
            if cmd == libc::F_GETLK || cmd == libc::F_OFD_GETLK {
                let ty = match fl.l_type as i32 {
                    libc::F_RDLCK => "r",
                    libc::F_WRLCK => "w",
                    libc::F_UNLCK => "u",
                    _ => "?",
                };
                Ok(format!(" {ty} {} {} {}", fl.l_start, fl.l_len, fl.l_pid))
            } else {
                Ok(String::new())
            }
        }
        // F_SETLKW (or F_OFD_SETLKW) interrupted by SIGALRM after `ms`: the handler is installed
        // without SA_RESTART. The signal is sent to this very thread with pthread_kill, because a
        // process-directed alarm(2) may be delivered to libtest's main thread instead.
        ["lkintr", name, cmd, ty, start, len, ms] => {
            let f = fd(fds, name)?;
            // SAFETY: installing a handler that does nothing; zeroed sigaction.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigalrm as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = 0;
                libc::sigemptyset(&mut sa.sa_mask);
                cvt(libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()))?;
            }
            let me = unsafe { libc::pthread_self() };
            let ms: u64 = ms.parse().unwrap();
            let (tx, rx) = mpsc::channel::<()>();
            let killer = std::thread::spawn(move || {
                if rx.recv_timeout(Duration::from_millis(ms)).is_err() {
                    // SAFETY: the target thread waits for us to be joined before it ends.
                    unsafe { libc::pthread_kill(me, libc::SIGALRM) };
                }
            });
            let r = fcntl_lock(
                f,
                lock_cmd(cmd),
                lock_type(ty),
                start.parse().unwrap(),
                len.parse().unwrap(),
            );
            let _ = tx.send(());
            killer.join().unwrap();
            r.map(|_| String::new())
        }
        ["flock", name, op] => {
            let f = fd(fds, name)?;
            let op = match *op {
                "sh" => libc::LOCK_SH,
                "ex" => libc::LOCK_EX,
                "un" => libc::LOCK_UN,
                "shnb" => libc::LOCK_SH | libc::LOCK_NB,
                "exnb" => libc::LOCK_EX | libc::LOCK_NB,
                _ => panic!("bad flock op {op}"),
            };
            // SAFETY: valid fd.
            cvt(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| String::new())
        }
        // Appends `count` bytes of `ch` with one write(2).
        ["append", name, count, ch] => {
            let f = fd(fds, name)?;
            let data = vec![ch.as_bytes()[0]; count.parse().unwrap()];
            write_once(f, &data).map(|_| String::new())
        }
        ["write", name, text] => {
            let f = fd(fds, name)?;
            write_once(f, text.as_bytes()).map(|_| String::new())
        }
        ["exit"] => Ok(String::new()),
        _ => panic!("bad lockctl command {t:?}"),
    }
}

fn worker_lockctl() {
    let mut fds: HashMap<String, File> = HashMap::new();
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("reading stdin");
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.is_empty() {
            continue;
        }
        let reply = match lockctl_cmd(&mut fds, &t) {
            Ok(extra) => format!("ok{extra}"),
            Err(e) => format!("err {}", e.raw_os_error().unwrap_or(-1)),
        };
        let mut out = io::stdout().lock();
        writeln!(out, "{REPLY}{reply}").unwrap();
        out.flush().unwrap();
        if t[0] == "exit" {
            break;
        }
    }
}

/// The parent's handle on one interactive lock worker. Dropping it SIGKILLs the worker.
struct Proc {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// A lock query result: type ('r', 'w', 'u'), start, len, pid.
type LockInfo = (char, i64, i64, i32);

impl Proc {
    fn spawn(name: &str) -> Proc {
        let mut c = worker_command("lockctl", &[]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawning lock worker");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(r) = line.strip_prefix(REPLY) {
                    if tx.send(r.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let se = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stderr_pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => se.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Proc {
            name: name.to_string(),
            child: Some(child),
            stdin,
            rx,
            stderr,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("worker was killed").id() as i32
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Sends a command without waiting for its answer.
    fn send(&mut self, cmd: &str) {
        let name = self.name.clone();
        let stdin = self.stdin.as_mut().expect("worker stdin");
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| {
                panic!(
                    "worker {name}: sending {cmd:?}: {e}\nworker stderr:\n{}",
                    self.stderr_text()
                )
            });
    }

    /// The next answer, or None if none came within `timeout`. Panics if the worker died.
    fn recv(&self, timeout: Duration) -> Option<String> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "worker {} exited unexpectedly; its stderr:\n{}",
                    self.name,
                    self.stderr_text()
                )
            }
        }
    }

    /// The answer to a command sent earlier; panics after CALL_TIMEOUT.
    fn reply(&self, what: &str) -> String {
        self.recv(CALL_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "worker {}: no answer to {what:?} within {CALL_TIMEOUT:?}; stderr:\n{}",
                self.name,
                self.stderr_text()
            )
        })
    }

    fn call(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.reply(cmd)
    }

    /// Runs a command, returning 0 on success or the errno.
    fn errno(&mut self, cmd: &str) -> i32 {
        let r = self.call(cmd);
        parse_errno(&r, &format!("{}: {cmd}", self.name))
    }

    #[track_caller]
    fn ok(&mut self, cmd: &str) {
        let e = self.errno(cmd);
        assert!(
            e == 0,
            "worker {}: {cmd:?} failed with {}",
            self.name,
            errno_name(e)
        );
    }

    #[track_caller]
    fn open(&mut self, fd: &str, path: &Path, mode: &str) {
        self.ok(&format!("open {fd} {} {mode}", path.display()));
    }

    /// An F_SETLK-like command (setlk, setlkw, ofd_setlk, ...): 0 or errno.
    fn lk(&mut self, fd: &str, cmd: &str, ty: &str, start: i64, len: i64) -> i32 {
        self.errno(&format!("lk {fd} {cmd} {ty} {start} {len}"))
    }

    fn setlk(&mut self, fd: &str, ty: &str, start: i64, len: i64) -> i32 {
        self.lk(fd, "setlk", ty, start, len)
    }

    #[track_caller]
    fn unlock_all(&mut self, fd: &str) {
        let e = self.setlk(fd, "u", 0, 0);
        assert_granted(e, &format!("{}: unlocking all of {fd}", self.name));
    }

    /// F_GETLK / F_OFD_GETLK.
    #[track_caller]
    fn getlk(&mut self, fd: &str, cmd: &str, ty: &str, start: i64, len: i64) -> LockInfo {
        let what = format!("lk {fd} {cmd} {ty} {start} {len}");
        let r = self.call(&what);
        let t: Vec<&str> = r.split_whitespace().collect();
        match t.as_slice() {
            ["ok", ty, s, l, p] => (
                ty.chars().next().unwrap(),
                s.parse().unwrap(),
                l.parse().unwrap(),
                p.parse().unwrap(),
            ),
            _ => panic!("worker {}: {what:?} answered {r:?}", self.name),
        }
    }

    fn flock(&mut self, fd: &str, op: &str) -> i32 {
        self.errno(&format!("flock {fd} {op}"))
    }

    /// Asserts that the command just sent has not been answered within BLOCK_PROBE.
    #[track_caller]
    fn assert_blocked(&self, what: &str) {
        if let Some(r) = self.recv(BLOCK_PROBE) {
            panic!(
                "worker {}: {what} should block but answered {r:?} at once",
                self.name
            );
        }
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stdin = None;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn parse_errno(r: &str, what: &str) -> i32 {
    if r == "ok" || r.starts_with("ok ") {
        0
    } else if let Some(e) = r.strip_prefix("err ") {
        e.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{what}: bad answer {r:?}"))
    } else {
        panic!("{what}: bad answer {r:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// Bulk workers
// ---------------------------------------------------------------------------------------------

fn flock_pad(writer: usize, seq: usize) -> String {
    let c = (b'a' + ((writer + seq) % 26) as u8) as char;
    std::iter::repeat_n(c, 1 + (seq * 7 + writer * 13) % 60).collect()
}

/// args: path, writer id, line count, barrier dir. Appends "<writer> <seq> <padding>\n" lines
/// under flock(LOCK_EX), each line written with TWO write(2) calls so that only the lock keeps
/// lines from interleaving.
fn worker_flock_append(args: &[String]) {
    let [path, writer, count, barrier] = args else {
        panic!("flock_append args: {args:?}")
    };
    let writer: usize = writer.parse().unwrap();
    let count: usize = count.parse().unwrap();
    let f = open_flags(Path::new(path), libc::O_WRONLY | libc::O_APPEND, 0)
        .expect("open O_WRONLY|O_APPEND");
    barrier_wait(Path::new(barrier), &writer.to_string());
    for seq in 0..count {
        let head = format!("{writer} {seq} ");
        let tail = format!("{}\n", flock_pad(writer, seq));
        flock_fd(&f, libc::LOCK_EX)
            .unwrap_or_else(|e| panic!("writer {writer} seq {seq}: flock(LOCK_EX): {e}"));
        write_once(&f, head.as_bytes())
            .unwrap_or_else(|e| panic!("writer {writer} seq {seq}: write: {e}"));
        write_once(&f, tail.as_bytes())
            .unwrap_or_else(|e| panic!("writer {writer} seq {seq}: write: {e}"));
        flock_fd(&f, libc::LOCK_UN)
            .unwrap_or_else(|e| panic!("writer {writer} seq {seq}: flock(LOCK_UN): {e}"));
    }
    close_checked(f).expect("close");
}

/// Checks the flock_append output; Err describes the first problems found.
fn check_flock_lines(data: &[u8], writers: usize, per: usize) -> Result<(), String> {
    let mut problems = Vec::new();
    if !data.is_empty() && *data.last().unwrap() != b'\n' {
        problems.push("file does not end with a newline".to_string());
    }
    let text = String::from_utf8_lossy(data);
    let mut seen = vec![vec![0u32; per]; writers];
    let mut last = vec![None::<usize>; writers];
    let mut lines = 0usize;
    for (i, line) in text.lines().enumerate() {
        lines += 1;
        let f: Vec<&str> = line.split(' ').collect();
        let parsed = match f.as_slice() {
            [w, s, pad] => match (w.parse::<usize>(), s.parse::<usize>()) {
                (Ok(w), Ok(s)) if w < writers && s < per && *pad == flock_pad(w, s) => Some((w, s)),
                _ => None,
            },
            _ => None,
        };
        match parsed {
            Some((w, s)) => {
                seen[w][s] += 1;
                if let Some(prev) = last[w] {
                    if s <= prev && problems.len() < 20 {
                        problems.push(format!(
                            "line {}: writer {w} seq {s} after seq {prev}",
                            i + 1
                        ));
                    }
                }
                last[w] = Some(s);
            }
            None => {
                if problems.len() < 20 {
                    problems.push(format!("line {} is torn or garbage: {line:?}", i + 1));
                }
            }
        }
    }
    if lines != writers * per {
        problems.push(format!("{lines} lines, expected {}", writers * per));
    }
    for (w, s) in seen.iter().enumerate() {
        let missing = s.iter().filter(|c| **c == 0).count();
        let dup = s.iter().filter(|c| **c > 1).count();
        if missing + dup > 0 {
            problems.push(format!(
                "writer {w}: {missing} lines missing, {dup} duplicated"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

const REC_HDR: usize = 24; // "<R w=00 s=000000 n=0000>"
const REC_MAX: usize = 4096;
const REC_MIN: usize = 64;

fn rec_len(w: usize, s: usize) -> usize {
    let h = ((w as u64) << 32 | s as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    REC_MIN + ((h >> 33) as usize) % (REC_MAX - REC_MIN + 1)
}

/// A self-checking record: fixed header with writer, seq and total length, a payload that is a
/// function of (writer, seq), and a newline.
fn record(w: usize, s: usize) -> Vec<u8> {
    let n = rec_len(w, s);
    let mut r = format!("<R w={w:02} s={s:06} n={n:04}>").into_bytes();
    assert_eq!(r.len(), REC_HDR);
    let seed = (w as u64) * 1_000_003 + s as u64 + 7;
    r.extend(
        pseudo_random(n - REC_HDR - 1, seed)
            .iter()
            .map(|b| b'a' + b % 26),
    );
    r.push(b'\n');
    r
}

fn parse_header(h: &[u8]) -> Option<(usize, usize, usize)> {
    let h = std::str::from_utf8(h).ok()?;
    if !(h.starts_with("<R w=") && &h[7..10] == " s=" && &h[16..19] == " n=" && h.ends_with('>')) {
        return None;
    }
    Some((
        h[5..7].parse().ok()?,
        h[10..16].parse().ok()?,
        h[19..23].parse().ok()?,
    ))
}

/// args: path, writer id, record count, barrier dir. Each record is one write(2) on an
/// O_APPEND descriptor, without any lock.
fn worker_append_records(args: &[String]) {
    let [path, writer, count, barrier] = args else {
        panic!("append_records args: {args:?}")
    };
    let writer: usize = writer.parse().unwrap();
    let count: usize = count.parse().unwrap();
    let f = open_flags(Path::new(path), libc::O_WRONLY | libc::O_APPEND, 0)
        .expect("open O_WRONLY|O_APPEND");
    barrier_wait(Path::new(barrier), &writer.to_string());
    for seq in 0..count {
        write_once(&f, &record(writer, seq))
            .unwrap_or_else(|e| panic!("writer {writer} seq {seq}: {e}"));
    }
    close_checked(f).expect("close");
}

fn check_records(data: &[u8], writers: usize, per: usize) -> Result<(), String> {
    let mut seen = vec![vec![0u32; per]; writers];
    let mut last = vec![None::<usize>; writers];
    let mut pos = 0usize;
    let mut problems = Vec::new();
    let ctx =
        |pos: usize| String::from_utf8_lossy(&data[pos..(pos + 80).min(data.len())]).into_owned();
    // After damage, resynchronise at the next header so that the counts stay meaningful.
    let resync = |pos: usize| {
        data[pos + 1..]
            .windows(5)
            .position(|w| w == b"<R w=")
            .map_or(data.len(), |i| pos + 1 + i)
    };
    while pos < data.len() {
        let Some((w, s, n)) = data.get(pos..pos + REC_HDR).and_then(parse_header) else {
            problems.push(format!(
                "no record header at offset {pos} (lost or torn record?): {:?}",
                ctx(pos)
            ));
            pos = resync(pos);
            continue;
        };
        if w >= writers
            || s >= per
            || n != rec_len(w, s)
            || pos + n > data.len()
            || data[pos..pos + n] != record(w, s)[..]
        {
            problems.push(format!(
                "record writer {w} seq {s} at offset {pos} is torn: {:?}",
                ctx(pos)
            ));
            pos = resync(pos);
            continue;
        }
        seen[w][s] += 1;
        if let Some(prev) = last[w] {
            if s <= prev {
                problems.push(format!("offset {pos}: writer {w} seq {s} after seq {prev}"));
            }
        }
        last[w] = Some(s);
        pos += n;
    }
    let damaged = problems.len();
    problems.truncate(20);
    if damaged > 20 {
        problems.push(format!("... {} more damaged places", damaged - 20));
    }
    for (w, s) in seen.iter().enumerate() {
        let missing = s.iter().filter(|c| **c == 0).count();
        let dup = s.iter().filter(|c| **c > 1).count();
        if missing + dup > 0 {
            problems.push(format!(
                "writer {w}: {missing} records missing or damaged, {dup} duplicated"
            ));
        }
    }
    let want: usize = (0..writers)
        .flat_map(|w| (0..per).map(move |s| rec_len(w, s)))
        .sum();
    if data.len() != want {
        problems.push(format!(
            "file has {} bytes, the records add up to {want}",
            data.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// args: path, rotations to see, lines after the last one. Appends "<seq>\n" lines; every 20
/// lines it compares the path's inode with its descriptor's and reopens (O_CREAT|O_APPEND) when
/// the file was renamed away. Prints "@@ total <lines> reopens <n>".
fn worker_rotating_writer(args: &[String]) {
    let [path, rotations, extra] = args else {
        panic!("rotating_writer args: {args:?}")
    };
    let path = Path::new(path);
    let rotations: usize = rotations.parse().unwrap();
    let extra: usize = extra.parse().unwrap();
    let open = || {
        open_flags(path, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 0o644)
            .expect("open app.log")
    };
    let mut f = open();
    let mut ino = f.metadata().unwrap().ino();
    let (mut seq, mut reopens, mut after) = (0usize, 0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        write_once(&f, format!("{seq}\n").as_bytes()).unwrap_or_else(|e| panic!("line {seq}: {e}"));
        seq += 1;
        if reopens >= rotations {
            after += 1;
            if after >= extra {
                break;
            }
        }
        if seq % 20 == 0 {
            let same = matches!(fs::metadata(path), Ok(m) if m.ino() == ino);
            if !same {
                let old = std::mem::replace(&mut f, open());
                close_checked(old).expect("close rotated log");
                ino = f.metadata().unwrap().ino();
                reopens += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            Instant::now() < deadline,
            "rotating writer: saw only {reopens} of {rotations} rotations in 90 s"
        );
    }
    close_checked(f).expect("close");
    println!("{REPLY}total {seq} reopens {reopens}");
}

/// The checkers used below must be able to fail: feed them damaged data (no daemon needed).
#[test]
fn checkers_detect_damage() {
    // flock lines.
    let mut good = Vec::new();
    for s in 0..5 {
        for w in 0..2 {
            good.extend_from_slice(format!("{w} {s} {}\n", flock_pad(w, s)).as_bytes());
        }
    }
    assert_eq!(check_flock_lines(&good, 2, 5), Ok(()));
    let text = String::from_utf8(good.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let without = |i: usize| {
        lines
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, l)| format!("{l}\n"))
            .collect::<String>()
    };
    assert!(
        check_flock_lines(without(3).as_bytes(), 2, 5).is_err(),
        "a lost line went unnoticed"
    );
    assert!(
        check_flock_lines(format!("{text}{}\n", lines[4]).as_bytes(), 2, 5).is_err(),
        "a duplicate went unnoticed"
    );
    assert!(
        check_flock_lines(&good[..good.len() - 1], 2, 5).is_err(),
        "a partial last line went unnoticed"
    );
    let torn = text.replacen(
        lines[2],
        &format!("{} {}", &lines[2][..4], &lines[3][4..]),
        1,
    );
    assert!(
        check_flock_lines(torn.as_bytes(), 2, 5).is_err(),
        "a torn line went unnoticed"
    );
    let swapped = text.replacen(
        &format!("{}\n{}\n", lines[0], lines[1]),
        &format!("{}\n{}\n", lines[1], lines[0]),
        1,
    );
    assert_eq!(
        check_flock_lines(swapped.as_bytes(), 2, 5),
        Ok(()),
        "interleaving writers is fine"
    );
    let reordered = text.replacen(&format!("{}\n", lines[0]), "", 1) + &format!("{}\n", lines[0]);
    assert!(
        check_flock_lines(reordered.as_bytes(), 2, 5).is_err(),
        "one writer's lines out of order went unnoticed"
    );

    // O_APPEND records.
    let recs: Vec<Vec<u8>> = (0..4)
        .flat_map(|s| (0..2).map(move |w| record(w, s)))
        .collect();
    let good: Vec<u8> = recs.concat();
    assert_eq!(check_records(&good, 2, 4), Ok(()));
    let lost: Vec<u8> = recs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .flat_map(|(_, r)| r.clone())
        .collect();
    assert!(
        check_records(&lost, 2, 4).is_err(),
        "a lost record went unnoticed"
    );
    let mut torn = good.clone();
    let mid = recs[0].len() + recs[1].len() / 2;
    torn[mid] = if torn[mid] == b'a' { b'b' } else { b'a' };
    assert!(
        check_records(&torn, 2, 4).is_err(),
        "a changed byte went unnoticed"
    );
    let mut overlap = recs[0].clone();
    overlap.truncate(recs[0].len() - 10);
    overlap.extend(recs[1..].concat());
    assert!(
        check_records(&overlap, 2, 4).is_err(),
        "overlapping records went unnoticed"
    );
    let dup: Vec<u8> = [good.clone(), recs[3].clone()].concat();
    assert!(
        check_records(&dup, 2, 4).is_err(),
        "a duplicated record went unnoticed"
    );
}

// =============================================================================================
// 1. flock-serialised appends from 8 processes over 2 mountpoints
// =============================================================================================

#[test]
fn flock_serialised_appends_from_two_mountpoints() {
    const WRITERS: usize = 8;
    const LINES: usize = 10_000;
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "flockapp");
    File::create(m1.join("shared.log")).unwrap();
    let barrier = d.root.join("barrier-flock");
    fs::create_dir(&barrier).unwrap();
    let cmds: Vec<Command> = (0..WRITERS)
        .map(|w| {
            let m = if w % 2 == 0 { &m1 } else { &m2 };
            worker_command(
                "flock_append",
                &[
                    m.join("shared.log").display().to_string(),
                    w.to_string(),
                    LINES.to_string(),
                    barrier.display().to_string(),
                ],
            )
        })
        .collect();
    let outs = run_concurrently(cmds, Duration::from_secs(180), || {
        barrier_release(&barrier, WRITERS)
    });
    for (w, o) in outs.iter().enumerate() {
        assert!(o.success(), "flock writer {w} failed:\n{o}");
    }
    let data = read_cached_and_uncached(&m2.join("shared.log"));
    if let Err(e) = check_flock_lines(&data, WRITERS, LINES) {
        panic!(
            "flock-serialised appends are damaged ({} bytes):\n{e}",
            data.len()
        );
    }
}

// =============================================================================================
// 2. O_APPEND records without locks
// =============================================================================================

#[test]
fn o_append_records_are_never_lost_or_torn() {
    const WRITERS: usize = 8;
    const RECORDS: usize = 2_000;
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "appendrec");
    File::create(m1.join("records")).unwrap();
    let barrier = d.root.join("barrier-append");
    fs::create_dir(&barrier).unwrap();
    let cmds: Vec<Command> = (0..WRITERS)
        .map(|w| {
            let m = if w % 2 == 0 { &m1 } else { &m2 };
            worker_command(
                "append_records",
                &[
                    m.join("records").display().to_string(),
                    w.to_string(),
                    RECORDS.to_string(),
                    barrier.display().to_string(),
                ],
            )
        })
        .collect();
    let outs = run_concurrently(cmds, Duration::from_secs(180), || {
        barrier_release(&barrier, WRITERS)
    });
    for (w, o) in outs.iter().enumerate() {
        assert!(o.success(), "O_APPEND writer {w} failed:\n{o}");
    }
    let data = read_cached_and_uncached(&m1.join("records"));
    if let Err(e) = check_records(&data, WRITERS, RECORDS) {
        panic!("O_APPEND records are damaged ({} bytes):\n{e}", data.len());
    }
}

// =============================================================================================
// 3. POSIX byte-range locks between processes on two mountpoints
// =============================================================================================

#[test]
fn posix_byte_range_locks_across_mountpoints() {
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "posixlk");
    fs::write(m1.join("f"), vec![0u8; 4096]).unwrap();
    let mut a = Proc::spawn("A@m1");
    let mut b = Proc::spawn("B@m2");
    let mut c = Proc::spawn("C@m1");
    a.open("f", &m1.join("f"), "rw");
    b.open("f", &m2.join("f"), "rw");
    c.open("f", &m1.join("f"), "rw");
    let (pa, pb) = (a.pid(), b.pid());

    // --- Write locks conflict, F_GETLK reports the holder.
    assert_granted(a.setlk("f", "w", 0, 100), "A: F_WRLCK [0,100)");
    assert_conflict(
        b.setlk("f", "w", 50, 100),
        "B: F_WRLCK [50,150) over A's write lock",
    );
    assert_conflict(
        b.setlk("f", "r", 99, 1),
        "B: F_RDLCK [99,100) over A's write lock",
    );
    assert_conflict(
        c.setlk("f", "w", 0, 0),
        "C (same mountpoint as A): F_WRLCK whole file",
    );
    assert_granted(
        b.setlk("f", "w", 100, 50),
        "B: F_WRLCK [100,150), adjacent to A's lock",
    );
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 200),
        ('w', 0, 100, pa),
        "B: F_GETLK over A's write lock"
    );
    assert_eq!(
        a.getlk("f", "getlk", "w", 120, 10),
        ('w', 100, 50, pb),
        "A: F_GETLK over B's write lock"
    );
    assert_eq!(
        c.getlk("f", "getlk", "w", 150, 1000),
        ('u', 150, 1000, 0),
        "C: F_GETLK over a free range"
    );
    a.unlock_all("f");
    b.unlock_all("f");

    // --- Shared read locks coexist; a writer conflicts with them.
    assert_granted(a.setlk("f", "r", 0, 100), "A: F_RDLCK [0,100)");
    assert_granted(
        b.setlk("f", "r", 50, 100),
        "B: F_RDLCK [50,150) with A's read lock",
    );
    assert_eq!(
        c.getlk("f", "getlk", "r", 0, 200).0,
        'u',
        "C: F_GETLK(F_RDLCK) over read locks"
    );
    assert_conflict(c.setlk("f", "w", 120, 10), "C: F_WRLCK over B's read lock");
    assert_eq!(
        c.getlk("f", "getlk", "w", 0, 10),
        ('r', 0, 100, pa),
        "C: F_GETLK(F_WRLCK) over A's read lock"
    );
    b.unlock_all("f");

    // --- Upgrade read -> write and downgrade write -> read.
    assert_granted(a.setlk("f", "w", 0, 100), "A: upgrade [0,100) to F_WRLCK");
    assert_eq!(
        b.getlk("f", "getlk", "r", 10, 1),
        ('w', 0, 100, pa),
        "B: F_GETLK after A's upgrade"
    );
    assert_conflict(b.setlk("f", "r", 10, 1), "B: F_RDLCK after A's upgrade");
    assert_granted(a.setlk("f", "r", 0, 100), "A: downgrade [0,100) to F_RDLCK");
    assert_granted(b.setlk("f", "r", 10, 1), "B: F_RDLCK after A's downgrade");
    assert_conflict(c.setlk("f", "w", 10, 1), "C: F_WRLCK after A's downgrade");
    assert_conflict(
        a.setlk("f", "w", 0, 100),
        "A: upgrade while B holds a read lock inside",
    );
    assert_eq!(
        c.getlk("f", "getlk", "w", 0, 100).0,
        'r',
        "A's failed upgrade left its read lock"
    );
    b.unlock_all("f");
    a.unlock_all("f");

    // --- Unlocking the middle of a range splits it.
    assert_granted(a.setlk("f", "w", 0, 300), "A: F_WRLCK [0,300)");
    assert_granted(
        a.setlk("f", "u", 100, 100),
        "A: unlock the middle [100,200)",
    );
    assert_granted(
        b.setlk("f", "w", 100, 100),
        "B: F_WRLCK on the freed middle",
    );
    b.unlock_all("f");
    assert_conflict(b.setlk("f", "w", 99, 1), "B: last byte of A's left part");
    assert_conflict(b.setlk("f", "w", 200, 1), "B: first byte of A's right part");
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 150),
        ('w', 0, 100, pa),
        "B: F_GETLK on the left part"
    );
    assert_eq!(
        b.getlk("f", "getlk", "w", 150, 1000),
        ('w', 200, 100, pa),
        "B: F_GETLK on the right part"
    );
    a.unlock_all("f");

    // --- Adjacent and overlapping locks of one owner merge.
    assert_granted(a.setlk("f", "w", 0, 100), "A: F_WRLCK [0,100)");
    assert_granted(a.setlk("f", "w", 100, 100), "A: F_WRLCK [100,200)");
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 1000),
        ('w', 0, 200, pa),
        "adjacent locks did not merge"
    );
    assert_granted(a.setlk("f", "w", 300, 100), "A: F_WRLCK [300,400)");
    assert_granted(
        a.setlk("f", "w", 150, 200),
        "A: F_WRLCK [150,350) bridging both",
    );
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 1000),
        ('w', 0, 400, pa),
        "bridged locks did not merge"
    );
    assert_granted(a.setlk("f", "w", 400, 0), "A: F_WRLCK [400,EOF)");
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 0),
        ('w', 0, 0, pa),
        "lock to EOF did not merge"
    );
    a.unlock_all("f");

    // --- F_SETLKW blocks until the holder releases.
    assert_granted(a.setlk("f", "w", 0, 100), "A: F_WRLCK [0,100)");
    b.send("lk f setlkw w 50 10");
    b.assert_blocked("B: F_SETLKW [50,60) under A's write lock");
    a.unlock_all("f");
    assert_granted(
        parse_errno(&b.reply("setlkw"), "B: F_SETLKW"),
        "B: F_SETLKW after A unlocked",
    );
    assert_conflict(
        a.setlk("f", "w", 55, 1),
        "A: F_WRLCK inside B's newly granted lock",
    );
    assert_eq!(
        c.getlk("f", "getlk", "w", 0, 100),
        ('w', 50, 10, pb),
        "C: F_GETLK on B's granted lock"
    );
    // A holder that releases by closing its descriptor (classic POSIX semantics) also wakes
    // a waiter.
    c.send("lk f setlkw w 0 0");
    c.assert_blocked("C: F_SETLKW whole file under B's lock");
    b.ok("close f");
    assert_granted(
        parse_errno(&c.reply("setlkw"), "C: F_SETLKW"),
        "C: F_SETLKW after B closed its fd",
    );
    c.unlock_all("f");
    b.open("f", &m2.join("f"), "rw");

    // --- F_SETLKW interrupted by a signal (handler without SA_RESTART) fails with EINTR and
    //     leaves no lock and no pending request behind.
    assert_granted(a.setlk("f", "w", 0, 100), "A: F_WRLCK [0,100)");
    b.send("lkintr f setlkw w 0 10 1000");
    let r = b.reply("lkintr");
    assert_err(
        parse_errno(&r, "B: interrupted F_SETLKW"),
        libc::EINTR,
        "B: F_SETLKW interrupted by SIGALRM",
    );
    assert_eq!(
        c.getlk("f", "getlk", "w", 0, 10),
        ('w', 0, 100, pa),
        "C: F_GETLK after B's interrupted wait"
    );
    a.unlock_all("f");
    assert_granted(
        c.setlk("f", "w", 0, 10),
        "C: F_WRLCK [0,10) after A unlocked (B must not hold it)",
    );
    c.unlock_all("f");

    // --- Deadlock: A holds r1 and waits for r2, B holds r2 and asks for r1: EDEADLK.
    assert_granted(a.setlk("f", "w", 0, 10), "A: F_WRLCK r1 [0,10)");
    assert_granted(b.setlk("f", "w", 20, 10), "B: F_WRLCK r2 [20,30)");
    a.send("lk f setlkw w 20 10");
    a.assert_blocked("A: F_SETLKW r2 held by B");
    b.send("lk f setlkw w 0 10");
    // One of the two gets EDEADLK (normally B, the second to ask); the other one is granted
    // once the loser lets go of its lock.
    let rb = b.recv(Duration::from_secs(10));
    let ra = if rb.is_none() {
        a.recv(Duration::from_secs(10))
    } else {
        None
    };
    match (rb, ra) {
        (Some(rb), _) => {
            assert_err(
                parse_errno(&rb, "B: F_SETLKW r1"),
                libc::EDEADLK,
                "B: F_SETLKW r1 closing a deadlock cycle",
            );
            b.unlock_all("f");
            assert_granted(
                parse_errno(&a.reply("setlkw r2"), "A: F_SETLKW r2"),
                "A: F_SETLKW r2 after B gave up r2",
            );
            assert_eq!(
                c.getlk("f", "getlk", "w", 0, 100),
                ('w', 0, 10, pa),
                "C: F_GETLK r1 after the deadlock"
            );
            assert_eq!(
                c.getlk("f", "getlk", "w", 15, 100),
                ('w', 20, 10, pa),
                "C: F_GETLK r2 after the deadlock"
            );
        }
        (None, Some(ra)) => {
            assert_err(
                parse_errno(&ra, "A: F_SETLKW r2"),
                libc::EDEADLK,
                "A: F_SETLKW r2 in a deadlock cycle",
            );
            a.unlock_all("f");
            assert_granted(
                parse_errno(&b.reply("setlkw r1"), "B: F_SETLKW r1"),
                "B: F_SETLKW r1 after A gave up r1",
            );
        }
        (None, None) => {
            panic!("deadlock between A and B was not detected within 10 s (no EDEADLK)")
        }
    }
}

// =============================================================================================
// 4. OFD locks
// =============================================================================================

#[test]
fn ofd_locks_across_mountpoints() {
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "ofdlk");
    fs::write(m1.join("f"), vec![0u8; 4096]).unwrap();
    let mut a = Proc::spawn("A@m1");
    let mut b = Proc::spawn("B@m2");
    a.open("f", &m1.join("f"), "rw");
    b.open("f", &m2.join("f"), "rw");

    // Different processes, different mountpoints.
    assert_granted(
        a.lk("f", "ofd_setlk", "w", 0, 100),
        "A: F_OFD_SETLK F_WRLCK [0,100)",
    );
    assert_conflict(
        b.lk("f", "ofd_setlk", "w", 50, 10),
        "B: F_OFD_SETLK F_WRLCK over A's OFD lock",
    );
    assert_conflict(
        b.lk("f", "ofd_setlk", "r", 99, 1),
        "B: F_OFD_SETLK F_RDLCK over A's OFD lock",
    );
    assert_eq!(
        b.getlk("f", "ofd_getlk", "w", 0, 200),
        ('w', 0, 100, -1),
        "B: F_OFD_GETLK over A's OFD lock"
    );
    // OFD locks and classic POSIX locks conflict with each other.
    assert_conflict(
        b.setlk("f", "w", 0, 10),
        "B: classic F_SETLK over A's OFD lock",
    );
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 10),
        ('w', 0, 100, -1),
        "B: classic F_GETLK over A's OFD lock"
    );
    assert_granted(
        b.lk("f", "ofd_setlk", "r", 100, 100),
        "B: F_OFD_SETLK F_RDLCK [100,200)",
    );
    assert_granted(
        a.lk("f", "ofd_setlk", "r", 150, 10),
        "A: F_OFD_SETLK F_RDLCK beside B's read lock",
    );
    assert_conflict(
        a.lk("f", "ofd_setlk", "w", 150, 10),
        "A: F_OFD_SETLK F_WRLCK over B's read lock",
    );
    assert_granted(a.lk("f", "ofd_setlk", "u", 150, 10), "A: unlock [150,160)");
    assert_granted(b.lk("f", "ofd_setlk", "u", 0, 0), "B: unlock all");

    // Within one process, two separate open()s are two owners (unlike classic POSIX locks).
    a.open("g1", &m1.join("f"), "rw");
    a.open("g2", &m2.join("f"), "rw");
    assert_conflict(
        a.lk("g2", "ofd_setlk", "w", 0, 10),
        "A: F_OFD_SETLK through a second open() of the file",
    );
    assert_eq!(
        a.getlk("g2", "ofd_getlk", "w", 0, 10),
        ('w', 0, 100, -1),
        "A: F_OFD_GETLK through a second open()"
    );
    assert_granted(
        a.lk("g2", "ofd_setlk", "w", 1000, 10),
        "A: F_OFD_SETLK elsewhere through the second open()",
    );
    assert_conflict(
        a.lk("g1", "ofd_setlk", "w", 1005, 1),
        "A: F_OFD_SETLK through g1 over g2's OFD lock",
    );
    // Classic POSIX locks of one process never conflict with each other, whatever the open().
    assert_granted(
        a.setlk("g1", "w", 2000, 10),
        "A: classic F_SETLK through g1",
    );
    assert_granted(
        a.setlk("g2", "w", 2000, 10),
        "A: classic F_SETLK through g2, same owner",
    );
    // Closing any descriptor of the file drops the process's classic POSIX locks, but not the
    // OFD locks of other open file descriptions.
    a.ok("close g1");
    assert_granted(
        b.setlk("f", "w", 2000, 10),
        "B: classic lock after A closed g1 (A's POSIX lock is gone)",
    );
    b.unlock_all("f");
    assert_conflict(
        b.lk("f", "ofd_setlk", "w", 0, 10),
        "B: F_OFD_SETLK after A closed g1 (A's OFD lock on f stays)",
    );
    assert_conflict(
        b.lk("f", "ofd_setlk", "w", 1000, 10),
        "B: F_OFD_SETLK after A closed g1 (A's OFD lock on g2 stays)",
    );

    // F_OFD_SETLKW blocks until the holding description is closed.
    b.send("lk f ofd_setlkw w 0 10");
    b.assert_blocked("B: F_OFD_SETLKW under A's OFD lock");
    a.ok("close f");
    assert_granted(
        parse_errno(&b.reply("ofd_setlkw"), "B: F_OFD_SETLKW"),
        "B: F_OFD_SETLKW after A closed f",
    );
    assert_conflict(
        a.lk("g2", "ofd_setlk", "w", 5, 1),
        "A: F_OFD_SETLK over B's granted OFD lock",
    );
    // F_OFD_SETLKW interrupted by a signal.
    b.send("lkintr f ofd_setlkw w 1000 10 1000");
    let r = b.reply("lkintr");
    assert_err(
        parse_errno(&r, "B: interrupted F_OFD_SETLKW"),
        libc::EINTR,
        "B: F_OFD_SETLKW interrupted by SIGALRM",
    );
    a.ok("close g2");
    assert_granted(
        b.lk("f", "ofd_setlk", "w", 1000, 10),
        "B: F_OFD_SETLK after A closed g2",
    );
}

// =============================================================================================
// 5. flock
// =============================================================================================

#[test]
fn flock_across_mountpoints() {
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "flocklk");
    fs::write(m1.join("f"), b"x").unwrap();
    let ewb = libc::EWOULDBLOCK;
    let mut a = Proc::spawn("A@m1");
    let mut b = Proc::spawn("B@m2");
    let mut c = Proc::spawn("C@m2");
    a.open("f", &m1.join("f"), "r");
    b.open("f", &m2.join("f"), "r");
    c.open("f", &m2.join("f"), "rw");

    // Shared locks coexist, exclusive ones exclude, across mountpoints.
    assert_granted(a.flock("f", "sh"), "A: LOCK_SH");
    assert_granted(
        b.flock("f", "shnb"),
        "B: LOCK_SH|LOCK_NB beside A's shared lock",
    );
    assert_err(
        c.flock("f", "exnb"),
        ewb,
        "C: LOCK_EX|LOCK_NB while A and B hold shared locks",
    );
    assert_granted(a.flock("f", "un"), "A: LOCK_UN");
    assert_err(
        c.flock("f", "exnb"),
        ewb,
        "C: LOCK_EX|LOCK_NB while B holds a shared lock",
    );
    assert_granted(b.flock("f", "un"), "B: LOCK_UN");
    assert_granted(c.flock("f", "exnb"), "C: LOCK_EX|LOCK_NB on a free file");
    assert_err(
        a.flock("f", "shnb"),
        ewb,
        "A: LOCK_SH|LOCK_NB under C's exclusive lock",
    );
    assert_err(
        b.flock("f", "exnb"),
        ewb,
        "B: LOCK_EX|LOCK_NB under C's exclusive lock",
    );
    // flock(1) from util-linux sees it too, through either mountpoint.
    for m in [&m1, &m2] {
        let out = run_with_timeout(
            Command::new("flock")
                .args(["-n", "-E", "75"])
                .arg(m.join("f"))
                .arg("true"),
            Duration::from_secs(20),
        );
        assert_eq!(
            out.code(),
            Some(75),
            "flock(1) -n through {} under C's lock:\n{out}",
            m.display()
        );
    }
    // flock and fcntl locks are independent on Linux.
    a.open("w", &m1.join("f"), "rw");
    assert_granted(
        a.setlk("w", "w", 0, 0),
        "A: fcntl F_WRLCK while C holds a flock",
    );
    a.unlock_all("w");

    // A blocking LOCK_EX waits until the holder unlocks.
    a.send("flock f ex");
    a.assert_blocked("A: LOCK_EX under C's exclusive lock");
    assert_granted(c.flock("f", "un"), "C: LOCK_UN");
    assert_granted(
        parse_errno(&a.reply("flock ex"), "A: LOCK_EX"),
        "A: LOCK_EX after C unlocked",
    );
    assert_err(
        c.flock("f", "shnb"),
        ewb,
        "C: LOCK_SH|LOCK_NB under A's exclusive lock",
    );

    // flock locks belong to the open file description: a second open() in the same process
    // conflicts; a dup'ed descriptor would not.
    a.open("f2", &m2.join("f"), "r");
    assert_err(
        a.flock("f2", "exnb"),
        ewb,
        "A: LOCK_EX|LOCK_NB through a second open() in the same process",
    );
    assert_err(
        a.flock("f2", "shnb"),
        ewb,
        "A: LOCK_SH|LOCK_NB through a second open() in the same process",
    );
    // Converting exclusive -> shared lets other readers in; closing releases.
    assert_granted(a.flock("f", "sh"), "A: convert LOCK_EX to LOCK_SH");
    assert_granted(
        a.flock("f2", "shnb"),
        "A: LOCK_SH|LOCK_NB through the second open()",
    );
    assert_granted(
        b.flock("f", "shnb"),
        "B: LOCK_SH|LOCK_NB beside A's shared locks",
    );
    assert_err(
        c.flock("f", "exnb"),
        ewb,
        "C: LOCK_EX|LOCK_NB under three shared locks",
    );
    a.ok("close f");
    a.ok("close f2");
    b.ok("close f");
    assert_granted(
        c.flock("f", "exnb"),
        "C: LOCK_EX|LOCK_NB after the others closed their descriptors",
    );
}

// =============================================================================================
// 6. Locks of a SIGKILLed process are released
// =============================================================================================

#[test]
fn locks_released_when_holder_is_killed() {
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "killlk");
    fs::write(m1.join("f"), vec![1u8; 100]).unwrap();
    let mut a = Proc::spawn("A@m1");
    a.open("f", &m1.join("f"), "rw");
    a.open("o", &m1.join("f"), "rw");
    assert_granted(a.flock("f", "ex"), "A: LOCK_EX");
    // (OFD locks conflict with the same process's classic locks: keep the ranges apart.)
    assert_granted(a.setlk("f", "w", 0, 100), "A: F_WRLCK [0,100)");
    assert_granted(
        a.lk("o", "ofd_setlk", "w", 1000, 10),
        "A: F_OFD_SETLK [1000,1010)",
    );

    let mut b = Proc::spawn("B@m2");
    b.open("f", &m2.join("f"), "rw");
    assert_err(
        b.flock("f", "exnb"),
        libc::EWOULDBLOCK,
        "B: LOCK_EX|LOCK_NB while A is alive",
    );
    assert_conflict(b.setlk("f", "w", 0, 1), "B: F_WRLCK while A is alive");
    assert_conflict(
        b.lk("f", "ofd_setlk", "w", 1000, 1),
        "B: F_OFD_SETLK while A is alive",
    );

    a.kill9();
    let (mut fl, mut px, mut ofd) = (false, false, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(fl && px && ofd) && Instant::now() < deadline {
        fl = fl || b.flock("f", "exnb") == 0;
        px = px || b.setlk("f", "w", 0, 100) == 0;
        ofd = ofd || b.lk("f", "ofd_setlk", "w", 1000, 10) == 0;
        if !(fl && px && ofd) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(fl && px && ofd, "5 s after SIGKILL of the holder: flock free={fl}, POSIX lock free={px}, OFD lock free={ofd}");
    // And the new holder really holds them.
    let mut c = Proc::spawn("C@m1");
    c.open("f", &m1.join("f"), "rw");
    assert_err(
        c.flock("f", "exnb"),
        libc::EWOULDBLOCK,
        "C: LOCK_EX|LOCK_NB under B's lock",
    );
    assert_eq!(
        c.getlk("f", "getlk", "w", 0, 1),
        ('w', 0, 100, b.pid()),
        "C: F_GETLK under B's POSIX lock"
    );
    assert_conflict(
        c.lk("f", "ofd_setlk", "w", 1005, 1),
        "C: F_OFD_SETLK under B's OFD lock",
    );
}

// =============================================================================================
// 7. Read-only mountpoints
// =============================================================================================

#[test]
fn read_only_mountpoint_locks_and_writes() {
    let d = Daemon::start();
    let rw = d.volume_mounted("rolk", &[]);
    let ro = d.mount("rolk", true);
    assert!(
        mount_at(&ro).unwrap().read_only(),
        "{} is not mounted read-only",
        ro.display()
    );
    fs::write(rw.join("f"), vec![7u8; 100]).unwrap();

    let mut a = Proc::spawn("A@ro");
    a.open("f", &ro.join("f"), "r");
    assert_err(
        a.setlk("f", "w", 0, 10),
        libc::EBADF,
        "A: F_SETLK F_WRLCK on an O_RDONLY fd of the ro mountpoint",
    );
    assert_err(
        a.lk("f", "setlkw", "w", 0, 10),
        libc::EBADF,
        "A: F_SETLKW F_WRLCK on an O_RDONLY fd",
    );
    assert_err(
        a.lk("f", "ofd_setlk", "w", 0, 10),
        libc::EBADF,
        "A: F_OFD_SETLK F_WRLCK on an O_RDONLY fd",
    );
    assert_granted(
        a.setlk("f", "r", 0, 10),
        "A: F_SETLK F_RDLCK on the ro mountpoint",
    );
    assert_granted(
        a.flock("f", "ex"),
        "A: LOCK_EX (flock needs no write access) on the ro mountpoint",
    );
    assert_err(
        a.errno("write f x"),
        libc::EBADF,
        "A: write(2) on an O_RDONLY fd",
    );

    // Locks taken through the ro mountpoint are seen from the rw one.
    let mut b = Proc::spawn("B@rw");
    b.open("f", &rw.join("f"), "rw");
    assert_conflict(
        b.setlk("f", "w", 5, 1),
        "B@rw: F_WRLCK over A's read lock taken through ro",
    );
    assert_eq!(
        b.getlk("f", "getlk", "w", 0, 100),
        ('r', 0, 10, a.pid()),
        "B@rw: F_GETLK"
    );
    assert_err(
        b.flock("f", "exnb"),
        libc::EWOULDBLOCK,
        "B@rw: LOCK_EX|LOCK_NB over A's flock taken through ro",
    );

    // Nothing opens for writing through the ro mountpoint.
    assert_err(
        a.errno(&format!("open g {} rw", ro.join("f").display())),
        libc::EROFS,
        "open O_RDWR through ro",
    );
    assert_err(
        a.errno(&format!("open g {} w", ro.join("f").display())),
        libc::EROFS,
        "open O_WRONLY through ro",
    );
    assert_err(
        a.errno(&format!("open g {} wa", ro.join("f").display())),
        libc::EROFS,
        "open O_APPEND through ro",
    );
    assert_err(
        a.errno(&format!("open g {} rwc", ro.join("new").display())),
        libc::EROFS,
        "create through ro",
    );
    assert_errno(
        fs::write(ro.join("f"), b"y"),
        libc::EROFS,
        "fs::write through ro",
    );
    assert_errno(
        fs::remove_file(ro.join("f")),
        libc::EROFS,
        "unlink through ro",
    );
    assert_eq!(
        fs::read(rw.join("f")).unwrap(),
        vec![7u8; 100],
        "refused writes changed the file"
    );
    assert!(!rw.join("new").exists(), "a refused create made a file");
}

// =============================================================================================
// 8. SQLite from 4 processes over 2 mountpoints
// =============================================================================================

fn sqlite(db: &Path, sql: &str) -> CmdOut {
    run_with_timeout(
        Command::new("sqlite3").args(["-bail"]).arg(db).arg(sql),
        Duration::from_secs(60),
    )
}

#[test]
fn sqlite_concurrent_writers_across_mountpoints() {
    if Command::new("sqlite3")
        .arg("-version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("\n!!!!! SKIPPING sqlite_concurrent_writers_across_mountpoints: no sqlite3 CLI in PATH !!!!!\n");
        return;
    }
    const WRITERS: usize = 4;
    const TXNS: usize = 500;
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "sqlite");
    let db1 = m1.join("app.db");
    let db2 = m2.join("app.db");
    let out = sqlite(&db1, "CREATE TABLE t(id INTEGER PRIMARY KEY, w INTEGER NOT NULL, i INTEGER NOT NULL, pad BLOB, UNIQUE(w, i)); PRAGMA journal_mode;");
    assert!(out.success(), "creating the database:\n{out}");
    assert_eq!(
        out.stdout.trim(),
        "delete",
        "journal mode is not the default rollback journal"
    );

    // Even writers use BEGIN IMMEDIATE ... COMMIT, odd writers autocommit INSERTs; everyone also
    // reads now and then (SHARED locks against PENDING/EXCLUSIVE).
    let mut cmds = Vec::new();
    for w in 0..WRITERS {
        let mut script = String::from(".timeout 30000\n");
        for i in 0..TXNS {
            let ins = format!("INSERT INTO t(w, i, pad) VALUES ({w}, {i}, randomblob(200));");
            if w % 2 == 0 {
                script.push_str(&format!("BEGIN IMMEDIATE; {ins} COMMIT;\n"));
            } else {
                script.push_str(&format!("{ins}\n"));
            }
            if i % 50 == 49 {
                script.push_str(&format!(
                    "SELECT 'progress', {w}, count(*) >= {} FROM t WHERE w = {w};\n",
                    i + 1
                ));
            }
        }
        let path = d.root.join(format!("sqlite-writer-{w}.sql"));
        fs::write(&path, script).unwrap();
        let db = if w % 2 == 0 { &db1 } else { &db2 };
        let mut c = Command::new("sqlite3");
        c.arg("-bail")
            .arg(db)
            .arg(format!(".read {}", path.display()));
        cmds.push(c);
    }
    let t0 = Instant::now();
    let outs = run_concurrently(cmds, Duration::from_secs(240), || {});
    for (w, o) in outs.iter().enumerate() {
        assert!(o.success(), "sqlite3 writer {w} failed:\n{o}");
        let progress: Vec<&str> = o
            .stdout
            .lines()
            .filter(|l| l.starts_with("progress|"))
            .collect();
        assert_eq!(
            progress.len(),
            TXNS / 50,
            "writer {w}: progress lines:\n{o}"
        );
        assert!(
            progress.iter().all(|l| l.ends_with("|1")),
            "writer {w} did not see its own rows:\n{o}"
        );
    }
    eprintln!(
        "sqlite: {} transactions from {WRITERS} processes in {:?}",
        WRITERS * TXNS,
        t0.elapsed()
    );

    let out = sqlite(&db2, "SELECT count(*) FROM t; PRAGMA integrity_check; SELECT w, count(*) FROM t GROUP BY w ORDER BY w;");
    assert!(out.success(), "checking the database:\n{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first().copied(), Some("2000"), "row count:\n{out}");
    assert_eq!(
        lines.get(1).copied(),
        Some("ok"),
        "PRAGMA integrity_check:\n{out}"
    );
    let per: Vec<String> = (0..WRITERS).map(|w| format!("{w}|{TXNS}")).collect();
    assert_eq!(lines[2..].to_vec(), per, "rows per writer:\n{out}");
    assert!(
        !m1.join("app.db-journal").exists(),
        "a hot journal was left behind"
    );
    // The same through the other mountpoint, after the page cache was dropped.
    drop_file_cache(&db1);
    let out = sqlite(&db1, "PRAGMA integrity_check; SELECT count(*) FROM t;");
    assert_eq!(
        out.stdout.trim(),
        "ok\n2000",
        "after dropping the page cache:\n{out}"
    );
}

// =============================================================================================
// 9. Cross-mount visibility and log rotation
// =============================================================================================

#[test]
fn appends_visible_across_mountpoints_and_log_rotation() {
    let d = Daemon::start();
    let (m1, m2) = two_mounts(&d, "rotate");

    // --- A reader on m2 sees what a writer process appends through m1 within 1 s.
    let mut w = Proc::spawn("writer@m1");
    w.open("v", &m1.join("vis"), "wa");
    let reader = File::open(m2.join("vis")).unwrap();
    let mut expect: Vec<u8> = Vec::new();
    for (round, (n, ch)) in [
        (1usize, 'a'),
        (100, 'b'),
        (4096, 'c'),
        (5000, 'd'),
        (70_000, 'e'),
        (1 << 20, 'f'),
        (3, 'g'),
    ]
    .into_iter()
    .enumerate()
    {
        let before = expect.len();
        w.ok(&format!("append v {n} {ch}"));
        expect.extend(std::iter::repeat_n(ch as u8, n));
        let want = expect.len() as u64;
        let mut seen = 0;
        let visible = wait_until(Duration::from_secs(1), || {
            seen = fs::metadata(m2.join("vis")).map(|m| m.len()).unwrap_or(0);
            seen == want
        });
        assert!(visible, "round {round}: size through m2 is {seen} 1 s after the append through m1, expected {want}");
        let mut got = vec![0u8; n];
        reader.read_exact_at(&mut got, before as u64).unwrap();
        assert!(
            got == expect[before..],
            "round {round}: the appended bytes read through m2 differ"
        );
        assert_eq!(
            fs::read(m2.join("vis")).unwrap(),
            expect,
            "round {round}: whole file through m2"
        );
    }

    // --- Rename-and-reopen log rotation while the writer keeps appending.
    const ROTATIONS: usize = 3;
    let log1 = m1.join("app.log");
    let log2 = m2.join("app.log");
    let writer = {
        let mut c = worker_command(
            "rotating_writer",
            &[
                log1.display().to_string(),
                ROTATIONS.to_string(),
                "2000".to_string(),
            ],
        );
        std::thread::spawn(move || run_with_timeout(&mut c, Duration::from_secs(120)))
    };
    let mut rotated_inos = Vec::new();
    let mut rotation_error = None;
    for k in 1..=ROTATIONS {
        // Wait for a fresh app.log with some lines in it, then rename it away through m2.
        let mut cur = None;
        let ready = wait_until(Duration::from_secs(20), || {
            cur = fs::metadata(&log2)
                .ok()
                .filter(|m| m.len() > 0 && !rotated_inos.contains(&m.ino()));
            cur.is_some()
        });
        if !ready {
            rotation_error = Some(format!(
                "rotation {k}: no fresh non-empty app.log within 20 s"
            ));
            break;
        }
        rotated_inos.push(cur.unwrap().ino());
        if let Err(e) = fs::rename(&log2, m2.join(format!("app.log.{k}"))) {
            rotation_error = Some(format!("rotation {k}: rename app.log -> app.log.{k}: {e}"));
            break;
        }
    }
    let out = writer.join().unwrap();
    if let Some(e) = rotation_error {
        panic!("{e}\nwriter:\n{out}");
    }
    assert!(out.success(), "rotating writer failed:\n{out}");
    let summary = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(REPLY))
        .unwrap_or_else(|| panic!("no summary from the writer:\n{out}"));
    let t: Vec<&str> = summary.split_whitespace().collect();
    let total: usize = t[1].parse().unwrap();
    assert_eq!(
        t[3],
        ROTATIONS.to_string(),
        "writer reopened a different number of times: {summary}"
    );

    // The rotated files and the current one, in order, hold every line exactly once.
    let mut next = 0usize;
    for name in (1..=ROTATIONS)
        .map(|k| format!("app.log.{k}"))
        .chain(["app.log".to_string()])
    {
        let text =
            fs::read_to_string(m1.join(&name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        assert!(!text.is_empty(), "{name} is empty");
        assert!(text.ends_with('\n'), "{name} ends in a partial line");
        for (i, line) in text.lines().enumerate() {
            let v: usize = line
                .parse()
                .unwrap_or_else(|_| panic!("{name} line {}: garbage {line:?}", i + 1));
            assert_eq!(v, next, "{name} line {}: expected line {next} (lines lost or duplicated across the rotation)", i + 1);
            next += 1;
        }
    }
    assert_eq!(
        next, total,
        "the files hold {next} lines, the writer wrote {total}"
    );
}
