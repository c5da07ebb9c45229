//! Integration tests: real `volfs-mountd` daemons, real FUSE mounts, the `volfs` CLI and the
//! `mount.volfs` helper. Every test starts its own daemon on its own temp dir (see
//! `common::Daemon`), so tests run in parallel; dropping the daemon always unmounts and cleans
//! up, also on failure.
//!
//! Run: `cargo build --workspace && cargo test --test core -- --test-threads=2` (as root, with a
//! usable /dev/fuse).
mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use volfs::client::ClientError;

const MIB: u64 = 1 << 20;

// =============================================================================================
// Syscall helpers used by the tests
// =============================================================================================

fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
    .map(|_| ())
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of the given length.
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

/// getxattr with a buffer of `size` bytes (0 asks for the size; returns an empty vec then).
fn getxattr_sized(p: &Path, name: &str, size: usize) -> io::Result<(usize, Vec<u8>)> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    // SAFETY: buffer of `size` bytes (null when 0).
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = cvt(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, size) })? as usize;
    buf.truncate(n.min(size));
    Ok((n, buf))
}

fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    getxattr_sized(p, name, 64 * 1024).map(|(_, v)| v)
}

fn listxattr_sized(p: &Path, size: usize) -> io::Result<(usize, Vec<u8>)> {
    let c = cstr(p);
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: buffer of `size` bytes (null when 0).
    let n = cvt(unsafe { libc::listxattr(c.as_ptr(), ptr, size) })? as usize;
    buf.truncate(n.min(size));
    Ok((n, buf))
}

fn listxattr(p: &Path) -> io::Result<BTreeSet<String>> {
    let (_, v) = listxattr_sized(p, 64 * 1024)?;
    Ok(v.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

fn lseek(f: &File, off: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::lseek(f.as_raw_fd(), off, whence) })
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) }).map(|_| ())
}

fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | mode, 0) }).map(|_| ())
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    }
}

fn omit() -> libc::timespec {
    ts(0, libc::UTIME_OMIT)
}

fn utimensat(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let c = cstr(p);
    let times = [atime, mtime];
    // SAFETY: valid C string and a two-element array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }).map(|_| ())
}

/// copy_file_range until `len` bytes are copied or the source ends; returns bytes copied.
fn copy_range(src: &File, off_in: i64, dst: &File, off_out: i64, len: usize) -> io::Result<usize> {
    let (mut i, mut o) = (off_in as libc::off64_t, off_out as libc::off64_t);
    let mut done = 0;
    while done < len {
        // SAFETY: valid fds and offset pointers.
        let n = cvt(unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                dst.as_raw_fd(),
                &mut o,
                len - done,
                0,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// Reads a whole file with O_DIRECT, bypassing the page cache: the bytes come from the daemon.
fn read_direct(p: &Path) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)?;
    let len = f.metadata()?.len() as usize;
    // An aligned buffer (FUSE does not need it, but O_DIRECT elsewhere does).
    const BLOCK: usize = 1 << 20;
    let mut raw = vec![0u8; BLOCK + 4096];
    let shift = raw.as_ptr().align_offset(4096);
    let mut out = Vec::with_capacity(len);
    let mut off = 0u64;
    loop {
        let buf = &mut raw[shift..shift + BLOCK];
        let n = f.read_at(buf, off)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
    Ok(out)
}

/// Compares two byte strings without printing megabytes on failure.
#[track_caller]
fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: contents differ (got {} bytes, want {} bytes, first difference at {:?})",
            got.len(),
            want.len(),
            first.or(Some(got.len().min(want.len())))
        );
    }
}

fn fsync_write(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
    close_checked(f).unwrap_or_else(|e| panic!("close {}: {e}", p.display()));
}

fn fsync_dir(p: &Path) {
    File::open(p)
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("fsync dir {}: {e}", p.display()));
}

/// Polls `cond` every 50 ms for up to `secs` seconds (for effects the kernel delivers
/// asynchronously, such as RELEASE after close). Returns whether it became true.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn api_err(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Ok(v) => panic!("expected the API to refuse, but it answered {v}"),
        Err(ClientError::Api { status, message }) => (status, message),
        Err(e) => panic!("expected an API error, got {e}"),
    }
}

/// `volume inspect` may print an object or a one-element array (like docker); accept both.
fn single_object(v: Value) -> Value {
    match v {
        Value::Array(mut a) if a.len() == 1 => a.remove(0),
        Value::Object(_) => v,
        other => panic!("expected one JSON object, got {other}"),
    }
}

fn names_of(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("expected a JSON array, got {list}"))
        .iter()
        .map(|v| {
            v["name"]
                .as_str()
                .unwrap_or_else(|| panic!("entry without name: {v}"))
                .to_string()
        })
        .collect()
}

fn api_names(d: &Daemon) -> BTreeSet<String> {
    names_of(&Value::Array(d.volumes()))
}

/// A CLI error must be exit code 1 and one line `volfs: ...` on stderr.
#[track_caller]
fn assert_cli_error(out: &CmdOut, args: &[&str], needles: &[&str]) {
    assert_cli_error_code(out, args, needles, 1)
}

fn assert_cli_error_code(out: &CmdOut, args: &[&str], needles: &[&str], code: i32) {
    assert_eq!(
        out.code(),
        Some(code),
        "volfs {args:?} should exit {code}:\n{out}"
    );
    let lines = out.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "volfs {args:?} should print exactly one line on stderr:\n{out}"
    );
    assert!(
        lines[0].starts_with("volfs: "),
        "volfs {args:?}: error line must start with 'volfs: ':\n{out}"
    );
    let lower = lines[0].to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "volfs {args:?}: error should mention {n:?}:\n{out}"
        );
    }
}

// =============================================================================================
// 1. Volume lifecycle through the CLI (and the same through the API)
// =============================================================================================

#[test]
fn cli_volume_lifecycle() {
    let d = Daemon::start();
    d.cli_ok(&[
        "volume",
        "create",
        "life1",
        "--opt",
        "size=10M",
        "--label",
        "app=db",
        "--label",
        "tier=gold",
    ]);

    let ls = d.cli_ok(&["volume", "ls", "--json"]).json();
    assert!(
        names_of(&ls).contains("life1"),
        "ls --json does not list life1: {ls}"
    );

    let info = single_object(d.cli_ok(&["volume", "inspect", "life1"]).json());
    assert_eq!(info["name"], "life1", "{info}");
    let created = info["created"]
        .as_str()
        .unwrap_or_else(|| panic!("created missing: {info}"));
    assert!(
        created.len() >= 20 && created.contains('T'),
        "created is not RFC 3339: {created}"
    );
    assert_eq!(info["labels"]["app"], "db", "{info}");
    assert_eq!(info["labels"]["tier"], "gold", "{info}");
    let size = &info["options"]["size"];
    assert!(
        size == "10485760" || size == "10M" || size == 10485760,
        "options.size: {info}"
    );
    assert!(info["bytes_used"].is_u64(), "bytes_used: {info}");
    assert_eq!(info["mountpoints"], json!([]), "{info}");
    // What the CLI created is what the daemon has.
    let api = d.inspect("life1").expect("API inspect");
    assert_eq!(api["size"], 10 * MIB, "{api}");

    // --read-only
    d.cli_ok(&["volume", "create", "life-ro", "--read-only"]);
    assert_eq!(d.inspect("life-ro").unwrap()["read_only"], true);

    // The global --socket flag works without VOLFS_SOCKET.
    let mut c = Command::new(bin("volfs"));
    scrub_env(&mut c);
    c.arg("--socket").arg(&d.socket).args(["status", "--json"]);
    let st = run_with_timeout(&mut c, Duration::from_secs(60));
    assert!(!st.timed_out(), "volfs status hung:\n{st}");
    let st = st.json();
    assert_eq!(st["pid"], d.pid(), "status --json: {st}");

    d.cli_ok(&["volume", "rm", "life1"]);
    let ls = d.cli_ok(&["volume", "ls", "--json"]).json();
    assert!(
        !names_of(&ls).contains("life1"),
        "life1 still listed after rm: {ls}"
    );
    assert!(!api_names(&d).contains("life1"));
    let out = d.cli(&["volume", "inspect", "life1"]);
    assert!(
        !out.success(),
        "inspect of a removed volume succeeded:\n{out}"
    );
}

#[test]
fn cli_rm_refuses_mounted_volume_unless_forced() {
    let d = Daemon::start();
    d.cli_ok(&["volume", "create", "busy1"]);
    let dir = d.fresh_dir("busy1");
    let dirs = dir.display().to_string();
    d.cli_ok(&["mount", "busy1", &dirs]);
    assert!(is_volfs_mount(&dir), "volfs mount did not mount {dirs}");
    fs::write(dir.join("f"), b"still here").unwrap();
    let info = single_object(d.cli_ok(&["volume", "inspect", "busy1"]).json());
    assert!(
        info["mountpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == &json!(dirs)),
        "inspect mountpoints: {info}"
    );

    let args = ["volume", "rm", "busy1"];
    let out = d.cli(&args);
    assert_cli_error(&out, &args, &["mounted"]);
    assert!(
        d.inspect("busy1").is_ok(),
        "refused rm removed the volume anyway"
    );
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"still here");

    d.cli_ok(&["volume", "rm", "--force", "busy1"]);
    assert!(!is_volfs_mount(&dir), "rm --force left {dirs} mounted");
    let (status, msg) = api_err(d.inspect("busy1"));
    assert_eq!(status, 404, "{msg}");

    // volfs umount, then rm without --force.
    d.cli_ok(&["volume", "create", "busy2"]);
    let dir2 = d.fresh_dir("busy2");
    let dir2s = dir2.display().to_string();
    d.cli_ok(&["mount", "busy2", &dir2s]);
    assert!(is_volfs_mount(&dir2));
    d.cli_ok(&["umount", &dir2s]);
    assert!(!is_volfs_mount(&dir2), "volfs umount left {dir2s} mounted");
    d.cli_ok(&["volume", "rm", "busy2"]);
    assert!(api_names(&d).is_empty());
}

#[test]
fn cli_prune_removes_only_unmounted_matching_volumes() {
    let d = Daemon::start();
    d.cli_ok(&["volume", "create", "p-ci-1", "--label", "env=ci"]);
    d.cli_ok(&[
        "volume", "create", "p-ci-2", "--label", "env=ci", "--label", "x=y",
    ]);
    d.cli_ok(&["volume", "create", "p-ci-mounted", "--label", "env=ci"]);
    d.cli_ok(&["volume", "create", "p-prod", "--label", "env=prod"]);
    d.cli_ok(&["volume", "create", "p-none"]);
    let m = d.mount("p-ci-mounted", false);

    d.cli_ok(&["volume", "prune", "--force", "--filter", "label=env=ci"]);
    let left = api_names(&d);
    let want: BTreeSet<String> = ["p-ci-mounted", "p-prod", "p-none"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(left, want, "prune removed the wrong volumes");
    assert!(is_volfs_mount(&m), "prune touched a mounted volume");
}

#[test]
fn api_volume_lifecycle() {
    let d = Daemon::start();
    let v = d.create_volume_full("api1", &[("app", "db")], &[("size", "10M")], false);
    assert_eq!(v["name"], "api1");
    assert_eq!(v["size"], 10 * MIB);
    assert_eq!(v["labels"]["app"], "db");
    let (status, msg) = api_err(d.try_create(&json!({"name": "api1"})));
    assert_eq!(status, 409, "duplicate create: {msg}");
    assert!(msg.contains("api1") && msg.contains("exists"), "{msg}");

    let m = d.mount("api1", false);
    let info = d.inspect("api1").unwrap();
    assert_eq!(
        info["mountpoints"],
        json!([m.display().to_string()]),
        "{info}"
    );
    let recorded: Vec<Value> = d.client().get("/v1/mounts").unwrap();
    assert!(
        recorded
            .iter()
            .any(|r| r["target"] == m.display().to_string() && r["volume"] == "api1"),
        "{recorded:?}"
    );

    let (status, msg) = api_err(d.client().delete("/v1/volumes/api1"));
    assert_eq!(status, 409, "{msg}");
    assert!(
        msg.contains("mounted"),
        "refusal should say the volume is mounted: {msg}"
    );
    let _: Value = d
        .client()
        .delete("/v1/volumes/api1?force=true")
        .expect("forced delete");
    assert!(!is_volfs_mount(&m));
    assert!(api_names(&d).is_empty());
    let recorded: Vec<Value> = d.client().get("/v1/mounts").unwrap();
    assert!(
        recorded.is_empty(),
        "mount records survive the volume: {recorded:?}"
    );

    // Unmount through the API forgets the record.
    d.create_volume("api2", &[]);
    let m2 = d.mount("api2", false);
    d.unmount(&m2).expect("unmount");
    assert!(!is_volfs_mount(&m2));
    let (status, _) = api_err(d.unmount(&m2));
    assert_eq!(status, 404);

    // Prune with filters.
    d.create_volume_full("pr-a", &[("env", "ci")], &[], false);
    d.create_volume_full("pr-b", &[("env", "prod")], &[], false);
    d.create_volume_full("pr-c", &[("env", "ci")], &[], false);
    let _mc = d.mount("pr-c", false);
    let r: Value = d
        .client()
        .post("/v1/volumes/prune", &json!({"filters": ["env=ci"]}))
        .unwrap();
    assert_eq!(r["removed"], json!(["pr-a"]), "{r}");
    let want: BTreeSet<String> = ["api2", "pr-b", "pr-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(api_names(&d), want);
}

// =============================================================================================
// 2. Bad input
// =============================================================================================

#[test]
fn cli_ls_filter_and_daemon_not_running() {
    let d = Daemon::start();
    d.create_volume_full("f-db", &[("app", "db")], &[], false);
    d.create_volume_full("f-web", &[("app", "web")], &[], false);
    let ls = d
        .cli_ok(&["volume", "ls", "--json", "--filter", "label=app=db"])
        .json();
    let want: BTreeSet<String> = ["f-db".to_string()].into_iter().collect();
    assert_eq!(names_of(&ls), want, "ls --filter label=app=db: {ls}");
    let plain = d.cli_ok(&["volume", "ls"]);
    assert!(
        plain.stdout.contains("f-db") && plain.stdout.contains("f-web"),
        "volume ls:\n{plain}"
    );

    // No daemon on the socket: one clear line, exit 1, and no daemon gets started.
    let nowhere = d.root.join("no-daemon.sock");
    let mut c = Command::new(bin("volfs"));
    scrub_env(&mut c);
    c.arg("--socket").arg(&nowhere).args(["volume", "ls"]);
    let out = run_with_timeout(&mut c, Duration::from_secs(60));
    let args = ["--socket", "<none>", "volume", "ls"];
    assert_cli_error(&out, &args, &["not running", nowhere.to_str().unwrap()]);
}

/// The CLI contract: every error is one line `volfs: ...` on stderr; usage errors (which clap
/// detects) exit 2, all others 1.
#[test]
fn cli_usage_errors_follow_the_error_contract() {
    let d = Daemon::start();
    for args in [
        vec!["volume", "frobnicate"],
        vec!["volume", "create"],
        vec!["volume", "create", "x", "--opt"],
        vec!["--bogus-flag"],
    ] {
        let out = d.cli(&args);
        assert_cli_error_code(&out, &args, &[], 2);
    }
}

#[test]
fn cli_bad_input_is_refused_clearly() {
    let d = Daemon::start();
    for (args, needles) in [
        (
            vec!["volume", "create", "--", "-bad"],
            vec!["invalid", "-bad"],
        ),
        (vec!["volume", "create", "a/b"], vec!["invalid", "a/b"]),
        (vec!["volume", "create", ""], vec!["invalid"]),
    ] {
        let out = d.cli(&args);
        assert_cli_error(&out, &args, &needles);
    }
    assert!(api_names(&d).is_empty(), "an invalid name was created");

    for args in [
        vec!["volume", "inspect", "nosuchvol"],
        vec!["volume", "rm", "nosuchvol"],
        vec!["mount", "nosuchvol", d.fresh_dir("x").to_str().unwrap()],
    ] {
        let out = d.cli(&args);
        assert_cli_error(&out, &args, &["not found", "nosuchvol"]);
    }

    let args = ["volume", "create", "v1", "--opt", "colour=blue"];
    let out = d.cli(&args);
    assert_cli_error(&out, &args, &["colour"]);
    assert!(
        api_names(&d).is_empty(),
        "create with an unknown option created a volume"
    );

    d.create_volume("v2", &[]);
    let missing = d.root.join("does-not-exist");
    let ms = missing.display().to_string();
    let args = ["mount", "v2", ms.as_str()];
    let out = d.cli(&args);
    assert_cli_error(&out, &args, &["does-not-exist"]);
    assert!(!missing.exists() || !is_volfs_mount(&missing));
}

#[test]
fn api_bad_input_is_refused_clearly() {
    let d = Daemon::start();
    for bad in ["-bad", "a/b", "", ".x", "a b"] {
        let (status, msg) = api_err(d.try_create(&json!({ "name": bad })));
        assert_eq!(status, 400, "name {bad:?}: {msg}");
        assert!(msg.contains("invalid volume name"), "name {bad:?}: {msg}");
    }
    let (status, msg) =
        api_err(d.try_create(&json!({ "name": "ok1", "opts": {"colour": "blue"} })));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("colour"), "unknown option not named: {msg}");
    let (status, msg) = api_err(d.try_create(&json!({ "name": "ok2", "opts": {"size": "lots"} })));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("lots"), "{msg}");
    assert!(api_names(&d).is_empty());

    let (status, msg) = api_err(d.inspect("nosuchvol"));
    assert_eq!(status, 404);
    assert!(
        msg.contains("nosuchvol") && msg.contains("not found"),
        "{msg}"
    );
    let (status, msg) = api_err(d.client().delete("/v1/volumes/nosuchvol"));
    assert_eq!(status, 404, "{msg}");
    let dir = d.fresh_dir("x");
    let (status, msg) = api_err(d.try_mount("nosuchvol", &dir, false));
    assert_eq!(status, 404, "{msg}");
    assert!(!is_volfs_mount(&dir));

    d.create_volume("v", &[]);
    let missing = d.root.join("does-not-exist");
    let (_, msg) = api_err(d.try_mount("v", &missing, false));
    assert!(
        msg.contains(&missing.display().to_string()),
        "mount error should name the path: {msg}"
    );
    let (status, msg) = api_err(d.try_mount("v", Path::new("relative/dir"), false));
    assert_eq!(status, 400, "{msg}");
    let file = d.root.join("plainfile");
    fs::write(&file, b"x").unwrap();
    let (status, msg) = api_err(d.try_mount("v", &file, false));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("not a directory"), "{msg}");
}

// =============================================================================================
// 3. POSIX through a mount
// =============================================================================================

#[test]
fn posix_read_write_open_flags_truncate() {
    let d = Daemon::start();
    let m = d.volume_mounted("io", &[]);

    let p = m.join("hello.txt");
    fs::write(&p, b"hello world").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello world");
    assert_eq!(fs::metadata(&p).unwrap().len(), 11);

    // A multi-chunk file, read through the page cache and from the daemon.
    let big = pseudo_random(5 * MIB as usize + 777, 1);
    fs::write(m.join("big"), &big).unwrap();
    assert_bytes_eq(&fs::read(m.join("big")).unwrap(), &big, "big file");
    assert_bytes_eq(
        &read_direct(&m.join("big")).unwrap(),
        &big,
        "big file (O_DIRECT)",
    );
    // Overwrite in the middle.
    let f = OpenOptions::new().write(true).open(m.join("big")).unwrap();
    f.write_all_at(b"XYZ", 1_000_000).unwrap();
    close_checked(f).unwrap();
    let mut want = big.clone();
    want[1_000_000..1_000_003].copy_from_slice(b"XYZ");
    assert_bytes_eq(
        &read_direct(&m.join("big")).unwrap(),
        &want,
        "overwritten big file (O_DIRECT)",
    );

    // O_EXCL
    let r = OpenOptions::new().write(true).create_new(true).open(&p);
    assert_errno(r, libc::EEXIST, "O_CREAT|O_EXCL on an existing file");
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.join("excl"))
        .expect("O_EXCL on a new name");
    drop(f);

    // O_APPEND: two descriptors, and seeking does not matter.
    let a = m.join("append");
    fs::write(&a, b"abc").unwrap();
    let mut f1 = OpenOptions::new().append(true).open(&a).unwrap();
    let mut f2 = OpenOptions::new().append(true).open(&a).unwrap();
    f1.write_all(b"def").unwrap();
    f2.write_all(b"ghi").unwrap();
    f1.seek(SeekFrom::Start(0)).unwrap();
    f1.write_all(b"jkl").unwrap();
    drop((f1, f2));
    assert_eq!(fs::read(&a).unwrap(), b"abcdefghijkl");
    assert_eq!(read_direct(&a).unwrap(), b"abcdefghijkl");

    // O_TRUNC
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"");

    // Truncate down then up: the cut-off bytes must come back as zeros, also when they were
    // committed (fsynced) before the truncate.
    let t = m.join("trunc");
    fsync_write(&t, &[b'x'; 100_000]);
    let f = OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len(10).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10);
    close_checked(f).unwrap();
    assert_eq!(fs::read(&t).unwrap(), vec![b'x'; 10]);
    let f = OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len(100_000).unwrap();
    f.sync_all().unwrap();
    close_checked(f).unwrap();
    let mut want = vec![0u8; 100_000];
    want[..10].fill(b'x');
    assert_bytes_eq(&fs::read(&t).unwrap(), &want, "truncated down and up");
    assert_bytes_eq(
        &read_direct(&t).unwrap(),
        &want,
        "truncated down and up (O_DIRECT)",
    );
    // Truncate by path (setattr without a handle).
    let c = cstr(&t);
    // SAFETY: valid C string.
    cvt(unsafe { libc::truncate(c.as_ptr(), 5) }).unwrap();
    assert_eq!(fs::read(&t).unwrap(), b"xxxxx");
}

#[test]
fn posix_sparse_files_seek_data_hole_and_punch() {
    let d = Daemon::start();
    let m = d.volume_mounted("sparse", &[]);

    // Write at 10 MiB: the hole reads as zeros, the size is right, little is allocated.
    let p = m.join("sparse");
    let f = File::create(&p).unwrap();
    f.write_all_at(b"tail", 10 * MIB).unwrap();
    f.sync_all().unwrap();
    close_checked(f).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 10 * MIB + 4);
    assert!(
        md.blocks() * 512 < md.len(),
        "sparse file allocates {} blocks for {} bytes",
        md.blocks(),
        md.len()
    );
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len() as u64, 10 * MIB + 4);
    assert!(
        data[..10 * MIB as usize].iter().all(|b| *b == 0),
        "hole does not read as zeros"
    );
    assert_eq!(&data[10 * MIB as usize..], b"tail");
    let direct = read_direct(&p).unwrap();
    assert!(
        direct[..10 * MIB as usize].iter().all(|b| *b == 0),
        "hole does not read as zeros (O_DIRECT)"
    );
    assert_eq!(&direct[10 * MIB as usize..], b"tail");

    // SEEK_DATA / SEEK_HOLE: data at [0, 64K) and [1M, 1M+64K).
    let s = m.join("seek");
    let f = File::create(&s).unwrap();
    f.write_all_at(&[1u8; 65536], 0).unwrap();
    f.write_all_at(&[2u8; 65536], MIB).unwrap();
    close_checked(f).unwrap();
    let size = (MIB + 65536) as i64;
    let f = File::open(&s).unwrap();
    assert_eq!(f.metadata().unwrap().len() as i64, size);
    assert_eq!(
        lseek(&f, 0, libc::SEEK_DATA).unwrap(),
        0,
        "SEEK_DATA from 0"
    );
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        65536,
        "SEEK_HOLE from 0"
    );
    assert_eq!(
        lseek(&f, 65536, libc::SEEK_DATA).unwrap(),
        MIB as i64,
        "SEEK_DATA from the hole's start"
    );
    assert_eq!(
        lseek(&f, 100_000, libc::SEEK_DATA).unwrap(),
        MIB as i64,
        "SEEK_DATA from inside the hole"
    );
    assert_eq!(
        lseek(&f, 100_000, libc::SEEK_HOLE).unwrap(),
        100_000,
        "SEEK_HOLE from inside the hole"
    );
    assert_eq!(
        lseek(&f, MIB as i64 + 10, libc::SEEK_DATA).unwrap(),
        MIB as i64 + 10,
        "SEEK_DATA inside data"
    );
    assert_eq!(
        lseek(&f, MIB as i64, libc::SEEK_HOLE).unwrap(),
        size,
        "SEEK_HOLE in the last extent = EOF"
    );
    assert_errno(
        lseek(&f, size, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA at EOF",
    );
    assert_errno(
        lseek(&f, size + 5, libc::SEEK_HOLE),
        libc::ENXIO,
        "SEEK_HOLE past EOF",
    );
    drop(f);

    // fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros, the size stays.
    let h = m.join("punch");
    fsync_write(&h, &vec![0xABu8; MIB as usize]);
    let f = OpenOptions::new().read(true).write(true).open(&h).unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        100_000,
        200_000,
    )
    .expect("punch hole");
    assert_eq!(
        f.metadata().unwrap().len(),
        MIB,
        "punching changed the size"
    );
    let mut want = vec![0xABu8; MIB as usize];
    want[100_000..300_000].fill(0);
    let mut got = Vec::new();
    (&f).read_to_end(&mut got).unwrap();
    assert_bytes_eq(&got, &want, "after punch hole");
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        100_000,
        "SEEK_HOLE finds the punched hole"
    );
    assert_eq!(
        lseek(&f, 100_000, libc::SEEK_DATA).unwrap(),
        300_000,
        "SEEK_DATA skips the punched hole"
    );
    close_checked(f).unwrap();
    assert_bytes_eq(
        &read_direct(&h).unwrap(),
        &want,
        "after punch hole (O_DIRECT)",
    );
    // Plain fallocate extends the size with zeros.
    let f = OpenOptions::new().write(true).open(&h).unwrap();
    fallocate(&f, 0, MIB as i64, 4096).expect("fallocate mode 0");
    assert_eq!(f.metadata().unwrap().len(), MIB + 4096);
    drop(f);
}

#[test]
fn posix_rename_and_renameat2() {
    let d = Daemon::start();
    let m = d.volume_mounted("ren", &[]);

    let (a, b, c) = (m.join("a"), m.join("b"), m.join("c"));
    fs::write(&a, b"A").unwrap();
    let ino = fs::metadata(&a).unwrap().ino();
    fs::rename(&a, &b).unwrap();
    assert_errno(fs::metadata(&a), libc::ENOENT, "old name after rename");
    assert_eq!(fs::read(&b).unwrap(), b"A");
    assert_eq!(
        fs::metadata(&b).unwrap().ino(),
        ino,
        "rename changed the inode number"
    );

    // RENAME_NOREPLACE
    fs::write(&c, b"C").unwrap();
    assert_errno(
        renameat2(&b, &c, libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing name",
    );
    assert_eq!(fs::read(&b).unwrap(), b"A");
    assert_eq!(fs::read(&c).unwrap(), b"C");
    renameat2(&b, &m.join("b2"), libc::RENAME_NOREPLACE).expect("RENAME_NOREPLACE onto a new name");
    assert_eq!(fs::read(m.join("b2")).unwrap(), b"A");

    // RENAME_EXCHANGE
    let (x, y) = (m.join("x"), m.join("y"));
    fs::write(&x, b"X").unwrap();
    fs::write(&y, b"Y").unwrap();
    let (xi, yi) = (
        fs::metadata(&x).unwrap().ino(),
        fs::metadata(&y).unwrap().ino(),
    );
    renameat2(&x, &y, libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE");
    assert_eq!(fs::read(&x).unwrap(), b"Y");
    assert_eq!(fs::read(&y).unwrap(), b"X");
    assert_eq!(
        (
            fs::metadata(&x).unwrap().ino(),
            fs::metadata(&y).unwrap().ino()
        ),
        (yi, xi)
    );
    assert_errno(
        renameat2(&x, &m.join("nothere"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );
    // Exchange a file and a directory across directories.
    fs::create_dir(m.join("xd")).unwrap();
    fs::create_dir(m.join("xd/inner")).unwrap();
    fs::write(m.join("xd/inner/f"), b"in").unwrap();
    renameat2(&x, &m.join("xd/inner"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE file<->dir");
    assert!(fs::metadata(&x).unwrap().is_dir());
    assert_eq!(fs::read(x.join("f")).unwrap(), b"in");
    assert_eq!(fs::read(m.join("xd/inner")).unwrap(), b"Y");
    assert_eq!(
        fs::metadata(m.join("xd")).unwrap().nlink(),
        2,
        "nlink of a dir whose subdir was exchanged away"
    );

    // Rename a directory over an empty directory: fine.
    fs::create_dir(m.join("s1")).unwrap();
    fs::write(m.join("s1/f"), b"s1").unwrap();
    fs::create_dir(m.join("empty")).unwrap();
    fs::rename(m.join("s1"), m.join("empty")).expect("rename dir over an empty dir");
    assert_eq!(fs::read(m.join("empty/f")).unwrap(), b"s1");
    assert_errno(
        fs::metadata(m.join("s1")),
        libc::ENOENT,
        "old dir after rename",
    );
    // Over a non-empty directory: ENOTEMPTY.
    fs::create_dir(m.join("s2")).unwrap();
    fs::create_dir(m.join("full")).unwrap();
    fs::write(m.join("full/keep"), b"k").unwrap();
    assert_errno(
        fs::rename(m.join("s2"), m.join("full")),
        libc::ENOTEMPTY,
        "rename dir over a non-empty dir",
    );
    assert_eq!(fs::read(m.join("full/keep")).unwrap(), b"k");
    // File over dir, dir over file.
    assert_errno(
        fs::rename(&c, m.join("full")),
        libc::EISDIR,
        "rename file over dir",
    );
    assert_errno(
        fs::rename(m.join("s2"), &c),
        libc::ENOTDIR,
        "rename dir over file",
    );

    // Moving a directory between parents fixes both parents' link counts.
    fs::create_dir_all(m.join("p1/sub")).unwrap();
    fs::create_dir(m.join("p2")).unwrap();
    assert_eq!(fs::metadata(m.join("p1")).unwrap().nlink(), 3);
    fs::rename(m.join("p1/sub"), m.join("p2/sub")).unwrap();
    assert_eq!(
        fs::metadata(m.join("p1")).unwrap().nlink(),
        2,
        "nlink of the old parent"
    );
    assert_eq!(
        fs::metadata(m.join("p2")).unwrap().nlink(),
        3,
        "nlink of the new parent"
    );

    // Renaming one hard link onto another of the same inode does nothing.
    fs::write(m.join("h1"), b"same").unwrap();
    fs::hard_link(m.join("h1"), m.join("h2")).unwrap();
    fs::rename(m.join("h1"), m.join("h2")).unwrap();
    assert_eq!(
        fs::read(m.join("h1")).unwrap(),
        b"same",
        "rename between links of one inode removed the source"
    );
    assert_eq!(fs::metadata(m.join("h2")).unwrap().nlink(), 2);
    fs::remove_file(m.join("h1")).unwrap();
    fs::remove_file(m.join("h2")).unwrap();

    // Wrong kinds and names.
    assert_errno(
        fs::remove_dir(m.join("full")),
        libc::ENOTEMPTY,
        "rmdir of a non-empty dir",
    );
    assert_errno(fs::remove_dir(&c), libc::ENOTDIR, "rmdir of a file");
    assert_errno(
        fs::remove_file(m.join("full")),
        libc::EISDIR,
        "unlink of a dir",
    );
    assert_errno(
        fs::rename(m.join("nothere"), m.join("x2")),
        libc::ENOENT,
        "rename of a missing name",
    );
    fs::write(m.join("n".repeat(255)), b"255").expect("a 255-byte name");
    assert_errno(
        fs::write(m.join("n".repeat(256)), b"256"),
        libc::ENAMETOOLONG,
        "a 256-byte name",
    );
    fs::remove_file(m.join("n".repeat(255))).unwrap();

    // Renaming over a file with another hard link drops one link of the replaced inode.
    fs::write(m.join("t1"), b"target").unwrap();
    fs::hard_link(m.join("t1"), m.join("t2")).unwrap();
    fs::write(m.join("src"), b"source").unwrap();
    fs::rename(m.join("src"), m.join("t1")).unwrap();
    assert_eq!(fs::read(m.join("t1")).unwrap(), b"source");
    assert_eq!(fs::read(m.join("t2")).unwrap(), b"target");
    assert_eq!(fs::metadata(m.join("t2")).unwrap().nlink(), 1);

    // The directory lists exactly what is left.
    let names: BTreeSet<String> = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: BTreeSet<String> = [
        "b2", "c", "x", "y", "xd", "empty", "s2", "full", "p1", "p2", "t1", "t2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, want);
}

#[test]
fn posix_links_symlinks_fifos_and_open_unlinked_files() {
    let d = Daemon::start();
    let m = d.volume_mounted("links", &[]);

    // Hard links.
    let (f, g) = (m.join("f"), m.join("g"));
    fs::write(&f, b"data").unwrap();
    fs::hard_link(&f, &g).unwrap();
    let (mf, mg) = (fs::metadata(&f).unwrap(), fs::metadata(&g).unwrap());
    assert_eq!((mf.nlink(), mg.nlink()), (2, 2));
    assert_eq!(mf.ino(), mg.ino());
    OpenOptions::new()
        .append(true)
        .open(&g)
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"data+more");
    fs::remove_file(&f).unwrap();
    assert_eq!(fs::metadata(&g).unwrap().nlink(), 1);
    assert_eq!(fs::read(&g).unwrap(), b"data+more");
    assert_errno(
        fs::hard_link(&m, m.join("dirlink")),
        libc::EPERM,
        "hard link to a directory",
    );

    // Symlinks.
    let l = m.join("l");
    std::os::unix::fs::symlink("some/where/else", &l).unwrap();
    assert_eq!(fs::read_link(&l).unwrap(), PathBuf::from("some/where/else"));
    let lm = fs::symlink_metadata(&l).unwrap();
    assert!(lm.file_type().is_symlink());
    assert_eq!(lm.len(), "some/where/else".len() as u64);
    assert_errno(
        fs::metadata(&l),
        libc::ENOENT,
        "stat through a dangling symlink",
    );
    std::os::unix::fs::symlink("g", m.join("lg")).unwrap();
    assert_eq!(fs::read(m.join("lg")).unwrap(), b"data+more");
    let long_target = "t".repeat(1000);
    std::os::unix::fs::symlink(&long_target, m.join("long")).unwrap();
    assert_eq!(
        fs::read_link(m.join("long")).unwrap(),
        PathBuf::from(&long_target)
    );

    // FIFO via mknod.
    let p = m.join("fifo");
    mkfifo(&p, 0o640).expect("mknod S_IFIFO");
    let pm = fs::symlink_metadata(&p).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(
        pm.file_type().is_fifo(),
        "mknod(S_IFIFO) did not make a fifo: {:?}",
        pm.file_type()
    );
    assert_eq!(pm.mode() & 0o777, 0o640 & !current_umask());

    // Unlink while open: data stays readable (and writable) through the descriptor.
    let u = m.join("unlinked");
    let data = pseudo_random(300_000, 3);
    let mut fu = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&u)
        .unwrap();
    fu.write_all(&data).unwrap();
    fu.sync_all().unwrap();
    let used_before = d.inspect("links").unwrap()["bytes_used"].as_u64().unwrap();
    fs::remove_file(&u).unwrap();
    assert_errno(fs::metadata(&u), libc::ENOENT, "stat after unlink");
    assert_eq!(fu.metadata().unwrap().nlink(), 0);
    let mut back = vec![0u8; data.len()];
    fu.read_exact_at(&mut back, 0)
        .expect("read of an unlinked open file");
    assert_bytes_eq(&back, &data, "unlinked open file");
    fu.write_all_at(b"later", 10).unwrap();
    fu.sync_all().unwrap();
    let mut five = [0u8; 5];
    fu.read_exact_at(&mut five, 10).unwrap();
    assert_eq!(&five, b"later");
    close_checked(fu).unwrap();
    // Once closed, its space is released (RELEASE reaches the daemon asynchronously).
    let freed = eventually(10, || {
        d.inspect("links").unwrap()["bytes_used"].as_u64().unwrap() + data.len() as u64 / 2
            <= used_before
    });
    assert!(
        freed,
        "space of an unlinked file is not released after its last close: {}",
        d.inspect("links").unwrap()
    );
}

fn current_umask() -> u32 {
    // SAFETY: umask is always safe; set it back immediately.
    unsafe {
        let u = libc::umask(0o022);
        libc::umask(u);
        u
    }
}

#[test]
fn posix_xattrs() {
    let d = Daemon::start();
    let m = d.volume_mounted("xattr", &[]);
    let f = m.join("f");
    fs::write(&f, b"x").unwrap();

    setxattr(&f, "user.k1", b"v1", 0).expect("setxattr");
    assert_eq!(getxattr(&f, "user.k1").unwrap(), b"v1");
    assert_eq!(getxattr_sized(&f, "user.k1", 0).unwrap().0, 2, "size query");
    setxattr(&f, "user.k2", b"bin\0ary\xff", 0).unwrap();
    assert_eq!(getxattr(&f, "user.k2").unwrap(), b"bin\0ary\xff");
    let names = listxattr(&f).unwrap();
    assert!(
        names.contains("user.k1") && names.contains("user.k2"),
        "listxattr: {names:?}"
    );

    assert_errno(
        setxattr(&f, "user.k1", b"new", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on an existing name",
    );
    assert_eq!(getxattr(&f, "user.k1").unwrap(), b"v1");
    assert_errno(
        setxattr(&f, "user.missing", b"v", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on a missing name",
    );
    assert_errno(
        getxattr(&f, "user.missing"),
        libc::ENODATA,
        "getxattr of a missing name",
    );
    setxattr(&f, "user.k1", b"a-longer-value", libc::XATTR_REPLACE)
        .expect("XATTR_REPLACE on an existing name");
    assert_eq!(getxattr(&f, "user.k1").unwrap(), b"a-longer-value");
    setxattr(&f, "user.k3", b"v3", libc::XATTR_CREATE).expect("XATTR_CREATE on a new name");

    assert_errno(
        getxattr_sized(&f, "user.k1", 3),
        libc::ERANGE,
        "getxattr into a small buffer",
    );
    assert_errno(
        listxattr_sized(&f, 3),
        libc::ERANGE,
        "listxattr into a small buffer",
    );
    let (n, _) = listxattr_sized(&f, 0).unwrap();
    assert_eq!(
        n,
        "user.k1\0user.k2\0user.k3\0".len(),
        "listxattr size query"
    );

    removexattr(&f, "user.k1").expect("removexattr");
    assert_errno(
        getxattr(&f, "user.k1"),
        libc::ENODATA,
        "getxattr after removexattr",
    );
    assert_errno(
        removexattr(&f, "user.k1"),
        libc::ENODATA,
        "removexattr of a missing name",
    );
    assert_eq!(
        listxattr(&f).unwrap(),
        ["user.k2", "user.k3"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );

    // Directories carry xattrs too; a large value round-trips.
    let big = pseudo_random(60_000, 4);
    setxattr(&m, "user.dir", &big, 0).unwrap();
    assert_eq!(getxattr(&m, "user.dir").unwrap(), big);
    // Xattrs go with the inode through rename and hard links.
    fs::rename(&f, m.join("renamed")).unwrap();
    fs::hard_link(m.join("renamed"), m.join("linked")).unwrap();
    assert_eq!(getxattr(&m.join("linked"), "user.k3").unwrap(), b"v3");
}

#[test]
fn posix_copy_file_range() {
    let d = Daemon::start();
    let m = d.volume_mounted("cfr", &[]);
    let src_data = pseudo_random(3 * MIB as usize + 123, 5);
    fs::write(m.join("src"), &src_data).unwrap();

    // Whole file.
    let src = File::open(m.join("src")).unwrap();
    let dst = File::create(m.join("dst1")).unwrap();
    let n = copy_range(&src, 0, &dst, 0, src_data.len()).expect("copy_file_range");
    assert_eq!(n, src_data.len());
    close_checked(dst).unwrap();
    assert_bytes_eq(
        &fs::read(m.join("dst1")).unwrap(),
        &src_data,
        "copy of the whole file",
    );
    assert_bytes_eq(
        &read_direct(&m.join("dst1")).unwrap(),
        &src_data,
        "copy of the whole file (O_DIRECT)",
    );

    // Unaligned range into the middle of an existing file.
    fs::write(m.join("dst2"), vec![b'z'; 2 * MIB as usize]).unwrap();
    let dst = OpenOptions::new().write(true).open(m.join("dst2")).unwrap();
    let n = copy_range(&src, 12_345, &dst, 54_321, 100_000).unwrap();
    assert_eq!(n, 100_000);
    close_checked(dst).unwrap();
    let mut want = vec![b'z'; 2 * MIB as usize];
    want[54_321..154_321].copy_from_slice(&src_data[12_345..112_345]);
    assert_bytes_eq(
        &fs::read(m.join("dst2")).unwrap(),
        &want,
        "copy into the middle",
    );
    assert_bytes_eq(
        &read_direct(&m.join("dst2")).unwrap(),
        &want,
        "copy into the middle (O_DIRECT)",
    );

    // Past the end of an empty file: the gap reads as zeros.
    let dst = File::create(m.join("dst3")).unwrap();
    copy_range(&src, 0, &dst, 5000, 1000).unwrap();
    close_checked(dst).unwrap();
    let mut want = vec![0u8; 6000];
    want[5000..].copy_from_slice(&src_data[..1000]);
    assert_bytes_eq(
        &read_direct(&m.join("dst3")).unwrap(),
        &want,
        "copy past EOF",
    );

    // Copying stops at the source's end.
    let dst = File::create(m.join("dst4")).unwrap();
    let n = copy_range(&src, src_data.len() as i64 - 10, &dst, 0, 1000).unwrap();
    assert_eq!(n, 10);
    drop(dst);

    // Copies do not change when the source changes afterwards (shared chunks are immutable).
    drop(src);
    let f = OpenOptions::new().write(true).open(m.join("src")).unwrap();
    f.write_all_at(b"QQQQ", 20_000).unwrap();
    close_checked(f).unwrap();
    assert_bytes_eq(
        &read_direct(&m.join("dst1")).unwrap(),
        &src_data,
        "copy after the source changed",
    );
    let mut changed = src_data.clone();
    changed[20_000..20_004].copy_from_slice(b"QQQQ");
    assert_bytes_eq(
        &read_direct(&m.join("src")).unwrap(),
        &changed,
        "source after its change",
    );
}

#[test]
fn posix_attributes_and_statfs() {
    let d = Daemon::start();
    let m = d.volume_mounted("attrs", &[("size", "10M")]);
    let f = m.join("f");
    fs::write(&f, b"x").unwrap();

    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o640);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o4755);
    fs::set_permissions(&m, fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(fs::metadata(&m).unwrap().mode() & 0o7777, 0o1777);

    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    std::os::unix::fs::chown(&f, None, Some(99)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (1234, 99),
        "chown of the group only changed the owner"
    );

    let before = fs::metadata(&f).unwrap();
    utimensat(&f, omit(), ts(1_000_000_000, 123_456_789)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (1_000_000_000, 123_456_789),
        "mtime with nanoseconds"
    );
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (before.atime(), before.atime_nsec()),
        "UTIME_OMIT changed atime"
    );
    utimensat(&f, ts(1_100_000_000, 987_654_321), omit()).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        (1_100_000_000, 987_654_321),
        "atime with nanoseconds"
    );
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (1_000_000_000, 123_456_789),
        "UTIME_OMIT changed mtime"
    );
    utimensat(&f, ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)).unwrap();
    let md = fs::metadata(&f).unwrap();
    assert!(
        md.mtime() > 1_600_000_000 && md.atime() > 1_600_000_000,
        "UTIME_NOW: {} {}",
        md.mtime(),
        md.atime()
    );
    // Directory timestamps.
    utimensat(&m, ts(1_200_000_000, 1), ts(1_300_000_000, 999_999_999)).unwrap();
    let md = fs::metadata(&m).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_300_000_000, 999_999_999));

    // statfs: a 10 MiB volume reports about 10 MiB.
    let s = statvfs(&m).unwrap();
    let total = s.f_blocks * s.f_frsize;
    assert!(
        (total as f64 - (10 * MIB) as f64).abs() <= 0.05 * (10 * MIB) as f64,
        "statfs total of a 10M volume: {total} bytes"
    );
    assert!(s.f_bavail <= s.f_blocks && s.f_bfree <= s.f_blocks);
    assert!(s.f_namemax >= 255);
}

/// With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves dropping set-user-ID/set-group-ID to volfs:
/// unprivileged writes and truncates drop them, chown always drops them, root's writes keep
/// them. Checked with and without the writeback cache (a quota volume runs without it).
#[test]
fn privileges_dropped_on_write_truncate_and_chown() {
    let d = Daemon::start();
    for (name, opts) in [("kill-wb", &[][..]), ("kill-wt", &[("size", "10M")][..])] {
        let m = d.volume_mounted(name, opts);
        let f = m.join("f");
        fs::write(&f, b"x").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        let set = |p: &Path, bits: u32| {
            std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(bits)).unwrap();
            assert_eq!(mode(p), bits, "{name}: chmod");
        };
        let as_nobody = |script: &str| {
            let out = run_with_timeout(
                Command::new("setpriv")
                    .args([
                        "--reuid=65534",
                        "--regid=65534",
                        "--clear-groups",
                        "sh",
                        "-c",
                    ])
                    .arg(script)
                    .arg("sh")
                    .arg(&f),
                Duration::from_secs(30),
            );
            assert!(out.success(), "{name}: {script}: {}", out.stderr);
        };
        set(&f, 0o6775);
        as_nobody("printf more >> \"$1\"");
        assert_eq!(mode(&f), 0o775, "{name}: unprivileged write");
        assert_eq!(fs::read(&f).unwrap(), b"xmore", "{name}: the write itself");

        set(&f, 0o6775);
        as_nobody("truncate -s 1 \"$1\"");
        assert_eq!(mode(&f), 0o775, "{name}: unprivileged truncate");

        set(&f, 0o2664);
        as_nobody("printf y >> \"$1\"");
        assert_eq!(
            mode(&f),
            0o2664,
            "{name}: set-group-ID without group exec is kept"
        );

        set(&f, 0o4755);
        fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .unwrap()
            .write_all(b"root")
            .unwrap();
        assert_eq!(mode(&f), 0o4755, "{name}: root's write keeps set-user-ID");
        std::os::unix::fs::chown(&f, Some(0), Some(0)).unwrap();
        assert_eq!(mode(&f), 0o755, "{name}: chown drops set-user-ID");

        let dir = m.join("dir");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o2775)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        assert_eq!(
            mode(&dir),
            0o2775,
            "{name}: chown keeps a directory's set-group-ID"
        );
    }
}

// =============================================================================================
// 4. One volume, two mountpoints
// =============================================================================================

#[test]
fn two_mountpoints_share_one_volume() {
    let d = Daemon::start();
    d.create_volume("shared", &[]);
    let rw = d.mount("shared", false);
    let ro = d.mount("shared", true);
    assert!(
        !mount_at(&rw).unwrap().read_only(),
        "rw mountpoint is read-only"
    );
    assert!(
        mount_at(&ro).unwrap().read_only(),
        "ro mountpoint is not read-only"
    );
    let info = d.inspect("shared").unwrap();
    let mps: BTreeSet<String> = info["mountpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        mps,
        [rw.display().to_string(), ro.display().to_string()]
            .into_iter()
            .collect(),
        "{info}"
    );

    fs::write(rw.join("a"), b"one").unwrap();
    assert_eq!(
        fs::read(ro.join("a")).unwrap(),
        b"one",
        "write through rw not visible through ro"
    );
    let reader = File::open(ro.join("a")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(rw.join("a"))
        .unwrap()
        .write_all(b"two")
        .unwrap();
    assert_eq!(fs::read(ro.join("a")).unwrap(), b"onetwo");
    let mut s = String::new();
    (&reader).read_to_string(&mut s).unwrap();
    assert_eq!(
        s, "onetwo",
        "an open descriptor through ro does not see the append"
    );
    fs::create_dir(rw.join("dir")).unwrap();
    fs::write(rw.join("dir/inner"), b"in").unwrap();
    assert_eq!(fs::read(ro.join("dir/inner")).unwrap(), b"in");
    assert_eq!(
        fs::metadata(rw.join("a")).unwrap().ino(),
        fs::metadata(ro.join("a")).unwrap().ino()
    );
    fs::remove_file(rw.join("dir/inner")).unwrap();
    assert_errno(
        fs::metadata(ro.join("dir/inner")),
        libc::ENOENT,
        "unlinked through rw, still visible through ro",
    );

    // Nothing is writable through the read-only mountpoint.
    let a = ro.join("a");
    assert_errno(
        OpenOptions::new().write(true).open(&a),
        libc::EROFS,
        "open O_WRONLY through ro",
    );
    assert_errno(
        OpenOptions::new().append(true).open(&a),
        libc::EROFS,
        "open O_APPEND through ro",
    );
    assert_errno(
        File::create(ro.join("new")),
        libc::EROFS,
        "create through ro",
    );
    assert_errno(
        fs::create_dir(ro.join("newdir")),
        libc::EROFS,
        "mkdir through ro",
    );
    assert_errno(fs::remove_file(&a), libc::EROFS, "unlink through ro");
    assert_errno(
        fs::rename(&a, ro.join("b")),
        libc::EROFS,
        "rename through ro",
    );
    assert_errno(
        fs::set_permissions(&a, fs::Permissions::from_mode(0o600)),
        libc::EROFS,
        "chmod through ro",
    );
    assert_errno(
        setxattr(&a, "user.x", b"1", 0),
        libc::EROFS,
        "setxattr through ro",
    );
    assert_errno(
        std::os::unix::fs::symlink("a", ro.join("sl")),
        libc::EROFS,
        "symlink through ro",
    );
    let c = cstr(&a);
    // SAFETY: valid C string.
    assert_errno(
        cvt(unsafe { libc::truncate(c.as_ptr(), 0) }),
        libc::EROFS,
        "truncate through ro",
    );
    assert_eq!(
        fs::read(&a).unwrap(),
        b"onetwo",
        "refused writes changed the file"
    );
}

// =============================================================================================
// 5. Read-only volumes
// =============================================================================================

#[test]
fn read_only_volume_refuses_every_write() {
    let d = Daemon::start();
    d.create_volume_full("ro-flag", &[], &[], true);
    d.create_volume("ro-opt", &[("ro", "true")]);
    for name in ["ro-flag", "ro-opt"] {
        let info = d.inspect(name).unwrap();
        assert_eq!(info["read_only"], true, "{info}");
        // Asking for a read-write mountpoint of a read-only volume still gives a read-only one.
        let m = d.mount(name, false);
        assert!(
            mount_at(&m).unwrap().read_only(),
            "mountpoint of read-only volume {name} is not ro"
        );
        let primary = d.run.join("mnt").join(name);
        for root in [m.as_path(), primary.as_path()] {
            let what = |op: &str| format!("{op} on read-only volume {name} at {}", root.display());
            assert_eq!(fs::read_dir(root).unwrap().count(), 0);
            assert_errno(File::create(root.join("f")), libc::EROFS, &what("create"));
            assert_errno(fs::create_dir(root.join("d")), libc::EROFS, &what("mkdir"));
            assert_errno(
                std::os::unix::fs::symlink("x", root.join("l")),
                libc::EROFS,
                &what("symlink"),
            );
            assert_errno(mkfifo(&root.join("p"), 0o644), libc::EROFS, &what("mknod"));
            assert_errno(
                fs::set_permissions(root, fs::Permissions::from_mode(0o700)),
                libc::EROFS,
                &what("chmod"),
            );
            assert_errno(
                std::os::unix::fs::chown(root, Some(1), Some(1)),
                libc::EROFS,
                &what("chown"),
            );
            assert_errno(
                setxattr(root, "user.x", b"1", 0),
                libc::EROFS,
                &what("setxattr"),
            );
            assert_errno(
                utimensat(root, ts(1, 0), ts(1, 0)),
                libc::EROFS,
                &what("utimensat"),
            );
        }
    }
}

// =============================================================================================
// 6. Quota
// =============================================================================================

#[test]
fn quota_gives_enospc_and_shows_in_statfs() {
    let d = Daemon::start();
    let m = d.volume_mounted("quota", &[("size", "1M")]);

    let s = statvfs(&m).unwrap();
    let total = s.f_blocks * s.f_frsize;
    assert!(
        (total as i64 - MIB as i64).abs() <= (MIB / 20) as i64,
        "statfs total of a 1M volume: {total}"
    );
    let df = run_with_timeout(
        Command::new("df").args(["-B1", "--output=size"]).arg(&m),
        Duration::from_secs(30),
    );
    let df_size: u64 = df
        .stdout
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df output:\n{df}"));
    assert!(
        (df_size as i64 - MIB as i64).abs() <= (MIB / 20) as i64,
        "df size of a 1M volume: {df_size}"
    );

    // 2 MiB into a 1 MiB volume: ENOSPC at write, fsync or close.
    let f = File::create(m.join("big")).unwrap();
    let block = pseudo_random(64 * 1024, 6);
    let mut write_err = None;
    for _ in 0..32 {
        if let Err(e) = write_all_raw(&f, &block) {
            write_err = Some(e);
            break;
        }
    }
    let fsync_err = f.sync_all().err();
    let close_err = close_checked(f).err();
    let errs: Vec<(&str, &io::Error)> = [
        ("write", &write_err),
        ("fsync", &fsync_err),
        ("close", &close_err),
    ]
    .into_iter()
    .filter_map(|(w, e)| e.as_ref().map(|e| (w, e)))
    .collect();
    assert!(
        !errs.is_empty(),
        "writing 2 MiB into a 1 MiB volume reported no error at write, fsync or close"
    );
    for (w, e) in &errs {
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "{w} failed with {e}, expected ENOSPC"
        );
    }
    let used = d.inspect("quota").unwrap()["bytes_used"].as_u64().unwrap();
    assert!(
        used <= MIB,
        "volume uses {used} bytes, over its 1 MiB limit"
    );
    let s = statvfs(&m).unwrap();
    assert!(
        s.f_bavail < s.f_blocks / 2,
        "statfs does not show the volume as (nearly) full: {} of {} blocks free",
        s.f_bavail,
        s.f_blocks
    );

    // Removing the file gives the space back.
    fs::remove_file(m.join("big")).unwrap();
    let back = eventually(10, || {
        statvfs(&m)
            .map(|s| s.f_bavail * s.f_frsize >= 3 * MIB / 4)
            .unwrap_or(false)
    });
    assert!(
        back,
        "space is not given back after unlink: {}",
        d.inspect("quota").unwrap()
    );
    fsync_write(&m.join("again"), &pseudo_random(512 * 1024, 7));
    assert_eq!(
        fs::read(m.join("again")).unwrap(),
        pseudo_random(512 * 1024, 7)
    );

    // The quota counts stored bytes, not file sizes: a sparse file far past the limit is fine.
    let f = File::create(m.join("sparse")).unwrap();
    f.write_all_at(b"x", 100 << 30)
        .expect("1 byte at 100 GiB in a 1 MiB volume");
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), (100 << 30) + 1);
    // Reserving or sharing space past the limit is refused too.
    assert_errno(
        fallocate(&f, 0, 0, 4 * MIB as i64),
        libc::ENOSPC,
        "fallocate past the quota",
    );
    drop(f);
    let src = File::open(m.join("again")).unwrap();
    let dst = File::create(m.join("copy")).unwrap();
    let mut last = Ok(0);
    for i in 0..4 {
        last = copy_range(&src, 0, &dst, i * 512 * 1024, 512 * 1024);
        if last.is_err() {
            break;
        }
    }
    assert_errno(last, libc::ENOSPC, "copy_file_range past the quota");
    let used = d.inspect("quota").unwrap()["bytes_used"].as_u64().unwrap();
    assert!(
        used <= MIB,
        "volume uses {used} bytes, over its 1 MiB limit"
    );
}

// =============================================================================================
// 7. Persistence across graceful restarts and kill -9
// =============================================================================================

#[test]
fn persistence_across_restart_and_kill9() {
    let mut d = Daemon::start();
    d.create_volume("keep", &[]);
    let m = d.mount("keep", false);
    let ro = d.mount("keep", true);

    fs::create_dir(m.join("dir")).unwrap();
    fs::set_permissions(m.join("dir"), fs::Permissions::from_mode(0o710)).unwrap();
    let data = pseudo_random(3 * MIB as usize + 11, 8);
    fsync_write(&m.join("dir/file"), &data);
    fs::set_permissions(m.join("dir/file"), fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::chown(m.join("dir/file"), Some(4321), Some(8765)).unwrap();
    setxattr(&m.join("dir/file"), "user.color", b"blue", 0).unwrap();
    utimensat(
        &m.join("dir/file"),
        ts(1_234_567_890, 111),
        ts(1_234_567_891, 222_333_444),
    )
    .unwrap();
    fs::hard_link(m.join("dir/file"), m.join("hardlink")).unwrap();
    std::os::unix::fs::symlink("dir/file", m.join("symlink")).unwrap();
    mkfifo(&m.join("fifo"), 0o600).unwrap();
    fsync_write(&m.join("small"), b"small file");
    fsync_dir(&m);
    let names = ["dir", "dir/file", "hardlink", "symlink", "fifo", "small"];
    let inos: Vec<u64> = names
        .iter()
        .map(|n| fs::symlink_metadata(m.join(n)).unwrap().ino())
        .collect();

    let check = |d: &Daemon, when: &str| {
        assert!(is_volfs_mount(&m), "{when}: {} is not mounted", m.display());
        assert!(
            is_volfs_mount(&ro),
            "{when}: {} is not mounted",
            ro.display()
        );
        assert!(
            mount_at(&ro).unwrap().read_only(),
            "{when}: the read-only mountpoint came back read-write"
        );
        assert_bytes_eq(&fs::read(m.join("dir/file")).unwrap(), &data, when);
        assert_bytes_eq(&fs::read(ro.join("hardlink")).unwrap(), &data, when);
        let md = fs::metadata(m.join("dir/file")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o751, "{when}: mode");
        assert_eq!((md.uid(), md.gid()), (4321, 8765), "{when}: owner");
        assert_eq!(md.nlink(), 2, "{when}: nlink");
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (1_234_567_891, 222_333_444),
            "{when}: mtime"
        );
        assert_eq!(
            (md.atime(), md.atime_nsec()),
            (1_234_567_890, 111),
            "{when}: atime"
        );
        assert_eq!(
            fs::metadata(m.join("dir")).unwrap().mode() & 0o7777,
            0o710,
            "{when}: dir mode"
        );
        assert_eq!(
            getxattr(&m.join("dir/file"), "user.color").unwrap(),
            b"blue",
            "{when}: xattr"
        );
        assert_eq!(
            fs::read_link(m.join("symlink")).unwrap(),
            PathBuf::from("dir/file"),
            "{when}: symlink"
        );
        use std::os::unix::fs::FileTypeExt;
        assert!(
            fs::symlink_metadata(m.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo(),
            "{when}: fifo"
        );
        assert_eq!(fs::read(m.join("small")).unwrap(), b"small file", "{when}");
        let now: Vec<u64> = names
            .iter()
            .map(|n| fs::symlink_metadata(m.join(n)).unwrap().ino())
            .collect();
        assert_eq!(now, inos, "{when}: inode numbers changed ({names:?})");
        let _ = d;
    };

    d.restart();
    check(&d, "after graceful restart");
    // New inodes never reuse old numbers.
    fs::write(m.join("new-after-restart"), b"n").unwrap();
    let new_ino = fs::metadata(m.join("new-after-restart")).unwrap().ino();
    assert!(
        !inos.contains(&new_ino),
        "a new file got inode number {new_ino}, already in use by {inos:?}"
    );

    // kill -9 after an fsynced write: the data survives.
    let after = pseudo_random(MIB as usize + 5, 9);
    fsync_write(&m.join("after-kill"), &after);
    fsync_dir(&m);
    d.kill9();
    assert!(
        fs::read(m.join("after-kill")).is_err(),
        "the mountpoint still answers after kill -9 of its daemon"
    );
    d.start_again();
    check(&d, "after kill -9");
    assert_bytes_eq(
        &fs::read(m.join("after-kill")).unwrap(),
        &after,
        "fsynced file after kill -9",
    );
    assert_eq!(fs::read(m.join("new-after-restart")).unwrap(), b"n");
    // And it is writable again.
    fs::write(m.join("post"), b"post").unwrap();
    assert_eq!(fs::read(ro.join("post")).unwrap(), b"post");
}

// =============================================================================================
// 8. Data dir ownership
// =============================================================================================

#[test]
fn second_daemon_and_bad_data_dir_are_refused() {
    let d = Daemon::start();
    let pid = d.pid();

    // Same data dir, different socket and run dir.
    let run2 = d.root.join("run2");
    let mut c = d.command_with(&d.data, &run2, &run2.join("s.sock"));
    let out = run_with_timeout(&mut c, Duration::from_secs(15));
    assert!(
        !out.timed_out(),
        "a second daemon on the same data dir kept running:\n{out}"
    );
    assert!(
        !out.success(),
        "a second daemon on the same data dir exited 0:\n{out}"
    );
    assert!(
        strip_ansi(&out.stderr).contains(&pid.to_string()),
        "the error does not name the running daemon's pid {pid}:\n{out}"
    );

    // Same everything (started twice by accident): refused, and the first keeps its socket.
    let out = run_with_timeout(&mut d.command(), Duration::from_secs(15));
    assert!(
        !out.timed_out() && !out.success(),
        "a second identical daemon was not refused:\n{out}"
    );
    assert!(strip_ansi(&out.stderr).contains(&pid.to_string()), "{out}");
    assert_eq!(
        d.status()["pid"],
        pid,
        "the first daemon no longer answers on its socket"
    );

    // A data dir that is a regular file.
    let file = d.root.join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let run3 = d.root.join("run3");
    let mut c = d.command_with(&file, &run3, &run3.join("s.sock"));
    let out = run_with_timeout(&mut c, Duration::from_secs(15));
    assert!(
        !out.timed_out(),
        "a daemon with a file as data dir kept running:\n{out}"
    );
    assert!(
        !out.success(),
        "a daemon with a file as data dir exited 0:\n{out}"
    );
    assert!(
        out.stderr.contains(&file.display().to_string()),
        "the error does not name {}:\n{out}",
        file.display()
    );
    assert_eq!(
        fs::read(&file).unwrap(),
        b"x",
        "the daemon changed the file it was given as data dir"
    );
}

// =============================================================================================
// 9. Corrupt chunks
// =============================================================================================

/// Parses a pack file's records: (record offset, stored length, chunk id).
fn pack_records(pack: &[u8]) -> Vec<(usize, usize, [u8; 32])> {
    assert_eq!(&pack[..8], b"VOLFSPK\0", "not a pack file");
    let mut out = Vec::new();
    let mut off = 16;
    while off + 48 <= pack.len() {
        assert_eq!(&pack[off..off + 4], b"VFSC", "record magic at {off}");
        let stored = u32::from_le_bytes(pack[off + 12..off + 16].try_into().unwrap()) as usize;
        let id: [u8; 32] = pack[off + 16..off + 48].try_into().unwrap();
        out.push((off, stored, id));
        off += 48 + stored;
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn corrupt_chunk_reads_as_eio_never_wrong_bytes() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("corrupt", &[]);
    let data = pseudo_random(MIB as usize, 10);
    fsync_write(&m.join("rand"), &data);
    // How it exits is `graceful_stop_exits_zero`'s business; here only the data matters.
    let _ = d.stop();

    // Flip one byte in the middle of the payload of the record in the middle of the largest pack.
    let packs = d.data.join("packs");
    let largest = fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap_or_else(|| panic!("no pack files in {}", packs.display()));
    let mut pack = fs::read(&largest).unwrap();
    let records = pack_records(&pack);
    let mid = pack.len() / 2;
    let &(roff, stored, id) = records
        .iter()
        .find(|(o, n, _)| *o <= mid && mid < o + 48 + n)
        .unwrap_or_else(|| {
            records
                .iter()
                .max_by_key(|r| r.1)
                .expect("pack has records")
        });
    let at = roff + 48 + stored / 2;
    pack[at] ^= 0xFF;
    fs::write(&largest, &pack).unwrap();
    let chunk = hex(&id);

    d.start_again();
    assert!(is_volfs_mount(&m), "mount not restored after restart");
    let r = fs::read(m.join("rand"));
    match &r {
        Ok(got) => panic!(
            "reading a file with a corrupt chunk succeeded ({} bytes, equal to the original: {})",
            got.len(),
            got == &data
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "reading a corrupt chunk: {e}"
        ),
    }
    // Piece by piece (page cache and O_DIRECT): every read gives the right bytes or EIO.
    for direct in [false, true] {
        let mut o = OpenOptions::new();
        o.read(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(m.join("rand")).unwrap();
        let mut raw = vec![0u8; 65536 + 4096];
        let shift = raw.as_ptr().align_offset(4096);
        let mut eio = 0;
        for off in (0..data.len()).step_by(65536) {
            let buf = &mut raw[shift..shift + 65536];
            match f.read_at(buf, off as u64) {
                Ok(n) => assert_bytes_eq(
                    &buf[..n],
                    &data[off..off + n],
                    &format!("bytes at {off} (direct={direct})"),
                ),
                Err(e) => {
                    assert_eq!(
                        e.raw_os_error(),
                        Some(libc::EIO),
                        "read at {off} (direct={direct}): {e}"
                    );
                    eio += 1;
                }
            }
        }
        assert!(eio > 0, "no read failed (direct={direct})");
    }
    let log = d.log();
    assert!(
        log.contains("corrupt chunk"),
        "the log does not report the corrupt chunk:\n{log}"
    );
    assert!(
        log.contains(&chunk),
        "the log does not name chunk {chunk}:\n{log}"
    );
    let st = d.status();
    assert!(
        st["corrupt_chunks"].as_u64().unwrap_or(0) >= 1,
        "status: {st}"
    );
    // `volfs status` exits non-zero when something needs attention, and says what.
    let out = d.cli(&["status"]);
    assert!(
        !out.success(),
        "volfs status exits 0 after a corrupt chunk was read:\n{out}"
    );
    assert!(
        out.stdout.contains(&chunk) && out.stdout.contains("fail verification"),
        "volfs status does not name the corrupt chunk {chunk}:\n{out}"
    );
    let t = d.metrics();
    assert_eq!(metric(&t, "volfs_corrupt_chunks", &[]), Some(1.0), "{t}");
    assert!(metric(&t, "volfs_corrupt_chunk_reads_total", &[]).unwrap_or(0.0) >= 1.0);
    // A scrub finds it too, names it and exits 1.
    let out = d.cli(&["scrub"]);
    assert_eq!(
        out.code(),
        Some(1),
        "volfs scrub with a corrupt chunk:\n{out}"
    );
    assert!(out.stdout.contains(&chunk), "{out}");
    // Once nothing uses it and gc freed it, a clean scrub clears the warning.
    fs::remove_file(m.join("rand")).unwrap();
    d.cli_ok(&["gc"]);
    let out = d.cli(&["scrub"]);
    assert!(out.success(), "scrub after the file was removed:\n{out}");
    let out = d.cli(&["status"]);
    assert!(out.success(), "status after a clean scrub:\n{out}");
    assert_eq!(metric(&d.metrics(), "volfs_corrupt_chunks", &[]), Some(0.0));
}

// =============================================================================================
// 10. The mount helper
// =============================================================================================

#[test]
fn mount_helper() {
    let d = Daemon::start();
    d.create_volume("mh", &[]);
    let rw = d.mount("mh", false);
    fs::write(rw.join("hello"), b"from rw").unwrap();

    let dir = d.fresh_dir("helper-ro");
    let ds = dir.display().to_string();
    let out = d.mount_helper(&["mh", &ds, "-o", "ro"]);
    assert!(out.success(), "mount-volfs mh {ds} -o ro failed:\n{out}");
    let e = mount_at(&dir).unwrap_or_else(|| panic!("{ds} is not mounted"));
    assert_eq!(e.fstype, "fuse.volfs");
    assert!(e.read_only(), "-o ro gave a read-write mount: {e:?}");
    assert_eq!(fs::read(dir.join("hello")).unwrap(), b"from rw");
    assert_errno(
        File::create(dir.join("x")),
        libc::EROFS,
        "create through a -o ro helper mount",
    );
    assert_errno(
        OpenOptions::new().write(true).open(dir.join("hello")),
        libc::EROFS,
        "write through a -o ro helper mount",
    );

    // Options mount(8) passes that need nothing from volfs are accepted.
    let dir = d.fresh_dir("helper-rw");
    let ds = dir.display().to_string();
    let out = d.mount_helper(&[
        "mh",
        &ds,
        "-o",
        "rw,defaults,_netdev,noatime,x-systemd.automount",
    ]);
    assert!(
        out.success(),
        "mount-volfs with harmless options failed:\n{out}"
    );
    assert!(is_volfs_mount(&dir) && !mount_at(&dir).unwrap().read_only());
    fs::write(dir.join("via-helper"), b"ok").unwrap();
    assert_eq!(fs::read(rw.join("via-helper")).unwrap(), b"ok");
    // -o remount,ro flips that mountpoint to read-only (and only that one).
    let out = d.mount_helper(&["mh", &ds, "-o", "remount,ro"]);
    assert!(out.success(), "mount-volfs -o remount,ro failed:\n{out}");
    assert!(
        mount_at(&dir).unwrap().read_only(),
        "remount,ro left {ds} read-write"
    );
    assert_errno(
        File::create(dir.join("y")),
        libc::EROFS,
        "create after remount,ro",
    );
    assert!(
        !mount_at(&rw).unwrap().read_only(),
        "remount,ro of one mountpoint made another read-only"
    );
    fs::write(rw.join("still-rw"), b"rw").unwrap();

    // Unknown option: refused by name, nothing mounted.
    let dir = d.fresh_dir("helper-bad");
    let ds = dir.display().to_string();
    let out = d.mount_helper(&["mh", &ds, "-o", "rw,frobnicate"]);
    assert!(!out.success(), "unknown option accepted:\n{out}");
    assert!(
        out.stderr.contains("frobnicate"),
        "the error does not name the option:\n{out}"
    );
    let blamed = out.stderr.split("frobnicate").next().unwrap_or("");
    assert!(
        !blamed.contains("rw,") && !blamed.contains(": rw"),
        "the error blames a valid option:\n{out}"
    );
    assert!(
        mount_at(&dir).is_none(),
        "{ds} was mounted despite the error"
    );

    // Unknown volume.
    let out = d.mount_helper(&["nosuch-vol", &ds]);
    assert!(
        !out.success(),
        "mounting an unknown volume succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains("nosuch-vol") && out.stderr.contains("not found"),
        "unclear error:\n{out}"
    );
    assert!(mount_at(&dir).is_none());

    // Missing mountpoint.
    let missing = d.root.join("no-such-dir").display().to_string();
    let out = d.mount_helper(&["mh", &missing]);
    assert!(
        !out.success(),
        "mounting onto a missing dir succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains("no-such-dir"),
        "the error does not name the dir:\n{out}"
    );

    // mount -t volfs / umount, when the helper is installed.
    if Path::new("/sbin/mount.volfs").exists() {
        let dir = d.fresh_dir("mount-t");
        let ds = dir.display().to_string();
        let mut c = Command::new("mount");
        scrub_env(&mut c);
        c.env("VOLFS_SOCKET", &d.socket)
            .args(["-t", "volfs", "mh", &ds]);
        let out = run_with_timeout(&mut c, Duration::from_secs(60));
        assert!(out.success(), "mount -t volfs failed:\n{out}");
        assert!(is_volfs_mount(&dir));
        assert_eq!(fs::read(dir.join("hello")).unwrap(), b"from rw");
        let out = run_with_timeout(Command::new("umount").arg(&ds), Duration::from_secs(60));
        assert!(out.success(), "umount failed:\n{out}");
        assert!(!is_volfs_mount(&dir));
    } else {
        eprintln!("note: /sbin/mount.volfs is not installed; skipping mount -t volfs / umount");
    }
}

// =============================================================================================
// 11. Many files in one directory
// =============================================================================================

#[test]
fn many_files_in_one_directory() {
    const N: usize = 2000;
    let mut d = Daemon::start();
    let m = d.volume_mounted("many", &[]);
    let dir = m.join("many");
    fs::create_dir(&dir).unwrap();
    let name = |i: usize| format!("file-{i:05}");
    for i in 0..N {
        fs::write(dir.join(name(i)), format!("content of {i}"))
            .unwrap_or_else(|e| panic!("creating file {i}: {e}"));
    }

    let list = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let names = list(&dir);
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "readdir returned duplicates ({} entries, {} distinct)",
        names.len(),
        unique.len()
    );
    let want: BTreeSet<String> = (0..N).map(name).collect();
    let got: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(
        got.len(),
        N,
        "readdir returned {} entries, want {N}",
        got.len()
    );
    assert_eq!(got, want);
    let mut inos = HashSet::new();
    for i in 0..N {
        let md = fs::metadata(dir.join(name(i))).unwrap();
        assert!(md.is_file());
        assert_eq!(
            md.len(),
            format!("content of {i}").len() as u64,
            "size of {}",
            name(i)
        );
        assert!(
            inos.insert(md.ino()),
            "inode number {} used twice",
            md.ino()
        );
    }
    assert_eq!(fs::read(dir.join(name(1234))).unwrap(), b"content of 1234");

    // Remove every other file: readdir lists exactly the rest.
    for i in (0..N).step_by(2) {
        fs::remove_file(dir.join(name(i))).unwrap();
    }
    let names = list(&dir);
    let got: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(names.len(), got.len(), "duplicates after removals");
    let want: BTreeSet<String> = (1..N).step_by(2).map(name).collect();
    assert_eq!(got, want);
    // Through a second mountpoint of the same volume.
    let m2 = d.mount("many", true);
    let got2: BTreeSet<String> = list(&m2.join("many")).into_iter().collect();
    assert_eq!(got2, want);
    // And after a restart, from the index.
    d.restart();
    let got3: Vec<String> = list(&dir);
    assert_eq!(got3.len(), want.len(), "entries after restart");
    assert_eq!(got3.into_iter().collect::<BTreeSet<String>>(), want);
    assert_eq!(fs::read(dir.join(name(1235))).unwrap(), b"content of 1235");
}

// =============================================================================================
// 12. Beyond the basics: data path against a model, large files, dedup, restarts with open
//     files, name reuse, concurrency
// =============================================================================================

/// A small deterministic PRNG for operation sequences.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[test]
fn random_writes_truncates_and_punches_match_a_model() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("model", &[]);
    let p = m.join("f");
    let mut model = pseudo_random(6 * MIB as usize, 20);
    fsync_write(&p, &model);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut log = Vec::new();
    for step in 0..300u64 {
        match rng.below(20) {
            0..=11 => {
                let off = rng.below(model.len() as u64 + 256 * 1024) as usize;
                let len = if rng.below(3) == 0 {
                    1 + rng.below(100)
                } else {
                    1 + rng.below(300 * 1024)
                } as usize;
                let data = pseudo_random(len, 1000 + step);
                f.write_all_at(&data, off as u64).unwrap();
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&data);
                log.push(format!("write {off}+{len}"));
            }
            12 | 13 => {
                let n = rng.below(model.len() as u64 * 5 / 4 + 1) as usize;
                f.set_len(n as u64).unwrap();
                model.resize(n, 0);
                log.push(format!("truncate {n}"));
            }
            14 | 15 => {
                let off = rng.below(model.len() as u64 + 1) as usize;
                let len = 1 + rng.below(400 * 1024) as usize;
                fallocate(
                    &f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                )
                .unwrap();
                let end = (off + len).min(model.len());
                if off < end {
                    model[off..end].fill(0);
                }
                log.push(format!("punch {off}+{len}"));
            }
            16 | 17 => {
                f.sync_all().unwrap();
                log.push("fsync".into());
            }
            _ => {
                let got = read_direct(&p).unwrap();
                if got != model {
                    let tail: Vec<&String> = log.iter().rev().take(10).collect();
                    assert_bytes_eq(
                        &got,
                        &model,
                        &format!("step {step} (last ops, newest first: {tail:?})"),
                    );
                }
                log.push("verify".into());
            }
        }
    }
    f.sync_all().unwrap();
    close_checked(f).unwrap();
    assert_bytes_eq(
        &read_direct(&p).unwrap(),
        &model,
        "after all operations (O_DIRECT)",
    );
    assert_bytes_eq(&fs::read(&p).unwrap(), &model, "after all operations");
    d.restart();
    assert_bytes_eq(&fs::read(&p).unwrap(), &model, "after restart");
}

#[test]
fn large_streaming_file_and_bytes_used() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("large", &[]);
    let p = m.join("large");
    let size = 40 * MIB as usize + 12_345;
    let data = pseudo_random(size, 30);
    let mut f = File::create(&p).unwrap();
    for piece in data.chunks(MIB as usize) {
        f.write_all(piece).unwrap();
    }
    // Part of it is committed (more than the per-file buffer limit), part still buffered.
    assert_bytes_eq(
        &read_direct(&p).unwrap(),
        &data,
        "large file while still open (O_DIRECT)",
    );
    close_checked(f).unwrap();
    assert_bytes_eq(&fs::read(&p).unwrap(), &data, "large file after close");
    let used = d.inspect("large").unwrap()["bytes_used"].as_u64().unwrap();
    assert!(
        used >= size as u64 && used <= size as u64 + MIB,
        "bytes_used {used} for a {size}-byte file"
    );
    // Closed without fsync: a graceful restart flushes it.
    d.restart();
    assert_bytes_eq(&fs::read(&p).unwrap(), &data, "large file after restart");
    let used2 = d.inspect("large").unwrap()["bytes_used"].as_u64().unwrap();
    assert_eq!(used2, used, "bytes_used changed across a restart");
}

/// A long append commits in steps (per-file buffer limit) while later writes keep arriving:
/// a reader reading the file directly from the daemon (O_DIRECT) during the append sees the
/// right bytes everywhere below what was written, an overwrite of a region just committed
/// wins, and after kill -9 every fsync'ed byte is there.
#[test]
fn streaming_appends_with_concurrent_reads_and_overwrites() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut d = Daemon::start();
    let m = d.volume_mounted("stream", &[]);
    let p = m.join("stream");
    let size = 96 * MIB as usize;
    let mut data = pseudo_random(size, 31);
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let expect = Arc::new(data.clone());
    let reader = {
        let (p, written, done, expect) = (p.clone(), written.clone(), done.clone(), expect.clone());
        std::thread::spawn(move || {
            let mut raw = vec![0u8; 128 * 1024 + 4096];
            let shift = raw.as_ptr().align_offset(4096);
            let mut x = 12345u64;
            let mut checks = 0u32;
            while !done.load(Ordering::Acquire) {
                let upto = written.load(Ordering::Acquire);
                if upto < 128 * 1024 {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&p)
                    .unwrap();
                for _ in 0..16 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (upto - 128 * 1024)) / 4096 * 4096;
                    let buf = &mut raw[shift..shift + 128 * 1024];
                    let n = f.read_at(buf, off).unwrap();
                    assert!(n == buf.len(), "short read at {off} below {upto}");
                    let want = &expect[off as usize..off as usize + n];
                    // The overwritten block may read either way while it is being written.
                    if !(off..off + n as u64).contains(&(40 * MIB)) {
                        assert!(buf[..n] == *want, "wrong bytes at {off} (written {upto})");
                    }
                    checks += 1;
                }
            }
            checks
        })
    };
    let mut f = File::create(&p).unwrap();
    let piece = 256 * 1024;
    for (i, chunk) in data.chunks(piece).enumerate() {
        f.write_all(chunk).unwrap();
        written.store(((i + 1) * piece).min(size) as u64, Ordering::Release);
        if (i + 1) % 96 == 0 {
            f.sync_all().unwrap();
        }
    }
    // Overwrite bytes that the streaming commit may be chunking right now.
    let patch = pseudo_random(8192, 32);
    f.write_all_at(&patch, 40 * MIB).unwrap();
    data[40 * MIB as usize..40 * MIB as usize + 8192].copy_from_slice(&patch);
    f.sync_all().unwrap();
    done.store(true, Ordering::Release);
    let checks = reader.join().expect("reader saw wrong bytes");
    assert!(checks > 0, "the reader never ran");
    assert_bytes_eq(
        &read_direct(&p).unwrap(),
        &data,
        "after the appends, O_DIRECT",
    );
    drop(f);
    d.kill9();
    d.start_again();
    assert_bytes_eq(&fs::read(&p).unwrap(), &data, "after kill -9 and a restart");
}

/// One commit can hold several ranges inside one old chunk: the first range rewrites the whole
/// chunk, the next one reads its edge back from that new chunk before the commit's batch has
/// indexed it. With a tiny chunk cache the new chunk is already evicted, so the commit must
/// find it by itself (this failed with EIO "missing from the chunk index").
#[test]
fn one_commit_with_ranges_inside_one_chunk() {
    let d = Daemon::start_with_env(&[("VOLFS_CHUNK_CACHE_MB", "1")]);
    let m = d.volume_mounted("edges", &[]);
    let p = m.join("f");
    let size = 32 * MIB as usize;
    let mut data = pseudo_random(size, 40);
    fs::write(&p, &data).unwrap();
    File::open(&p).unwrap().sync_all().unwrap();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    // Pairs of 4 KiB pages a few pages apart, all over the file, one fsync for all of them.
    for i in 0..256usize {
        for (k, page) in [1usize, 3].into_iter().enumerate() {
            let off = i * 128 * 1024 + page * 4096;
            let patch = pseudo_random(4096, 1000 + (i * 2 + k) as u64);
            f.write_all_at(&patch, off as u64).unwrap();
            data[off..off + 4096].copy_from_slice(&patch);
        }
    }
    f.sync_all().unwrap();
    drop(f);
    assert_bytes_eq(
        &read_direct(&p).unwrap(),
        &data,
        "after the paired rewrites",
    );
    assert!(
        !d.log().contains("missing from the chunk index"),
        "the daemon logged a missing chunk"
    );
}

#[test]
fn identical_data_and_copies_are_stored_once() {
    let d = Daemon::start();
    let m = d.volume_mounted("dedup", &[]);
    let data = pseudo_random(8 * MIB as usize, 40);
    fsync_write(&m.join("a"), &data);
    let stored1 = d.status()["stored_bytes"].as_u64().unwrap();
    assert!(
        stored1 >= 8 * MIB,
        "stored_bytes {stored1} after writing 8 MiB"
    );
    fsync_write(&m.join("b"), &data);
    let stored2 = d.status()["stored_bytes"].as_u64().unwrap();
    assert!(
        stored2 - stored1 < MIB,
        "a second copy of 8 MiB added {} stored bytes",
        stored2 - stored1
    );

    let src = File::open(m.join("a")).unwrap();
    let dst = File::create(m.join("c")).unwrap();
    assert_eq!(
        copy_range(&src, 0, &dst, 0, data.len()).unwrap(),
        data.len()
    );
    dst.sync_all().unwrap();
    close_checked(dst).unwrap();
    let stored3 = d.status()["stored_bytes"].as_u64().unwrap();
    assert!(
        stored3 - stored2 < MIB,
        "copy_file_range of 8 MiB added {} stored bytes",
        stored3 - stored2
    );
    assert_bytes_eq(&read_direct(&m.join("c")).unwrap(), &data, "copy");
    let used = d.inspect("dedup").unwrap()["bytes_used"].as_u64().unwrap();
    assert_eq!(
        used,
        24 * MIB,
        "bytes_used counts logical bytes of all three files"
    );
}

#[test]
fn graceful_restart_with_open_files_and_unlinked_open_file() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("open", &[]);
    // A file kept open for reading, one kept open for writing (closed data only is promised),
    // and an unlinked file kept open.
    fsync_write(&m.join("r"), b"reader");
    let reader = File::open(m.join("r")).unwrap();
    let mut writer = File::create(m.join("w")).unwrap();
    writer.write_all(b"written and fsynced").unwrap();
    writer.sync_all().unwrap();
    let orphan = File::create(m.join("orphan")).unwrap();
    orphan
        .write_all_at(&pseudo_random(2 * MIB as usize, 50), 0)
        .unwrap();
    orphan.sync_all().unwrap();
    fs::remove_file(m.join("orphan")).unwrap();
    let used = d.inspect("open").unwrap()["bytes_used"].as_u64().unwrap();
    assert!(
        used >= 2 * MIB,
        "bytes_used {used} with an open unlinked 2 MiB file"
    );

    d.restart();
    assert!(is_volfs_mount(&m), "mountpoint not restored");
    assert_eq!(fs::read(m.join("r")).unwrap(), b"reader");
    assert_eq!(fs::read(m.join("w")).unwrap(), b"written and fsynced");
    assert_errno(
        fs::metadata(m.join("orphan")),
        libc::ENOENT,
        "unlinked file after restart",
    );
    // The unlinked file's space is reclaimed once nothing can reach it any more.
    let used = d.inspect("open").unwrap()["bytes_used"].as_u64().unwrap();
    assert!(
        used < MIB,
        "an unlinked file's 2 MiB are still counted after restart: bytes_used {used}"
    );
    // Descriptors from before the restart belong to the old connection; they must fail, not hang.
    let mut buf = [0u8; 4];
    let r = reader.read_at(&mut buf, 0);
    assert!(
        r.is_err() || &buf == b"read",
        "stale descriptor read: {r:?}"
    );
    drop((reader, writer, orphan));
    fs::write(m.join("after"), b"ok").unwrap();
    assert_eq!(fs::read(m.join("after")).unwrap(), b"ok");
}

#[test]
fn removed_volume_name_can_be_reused_and_starts_empty() {
    let d = Daemon::start();
    let m = d.volume_mounted("again", &[("size", "10M")]);
    fsync_write(&m.join("old"), &pseudo_random(MIB as usize, 60));
    setxattr(&m, "user.old", b"1", 0).unwrap();
    d.unmount(&m).unwrap();
    let _: Value = d.client().delete("/v1/volumes/again").unwrap();
    d.create_volume("again", &[]);
    let info = d.inspect("again").unwrap();
    assert_eq!(info["bytes_used"], 0, "{info}");
    assert!(
        info["size"].is_null(),
        "the new volume inherited the old one's size: {info}"
    );
    let m2 = d.mount("again", false);
    assert_eq!(
        fs::read_dir(&m2).unwrap().count(),
        0,
        "the re-created volume is not empty"
    );
    assert_errno(
        getxattr(&m2, "user.old"),
        libc::ENODATA,
        "xattr of the removed volume's root",
    );
    fs::write(m2.join("new"), b"new").unwrap();
    assert_eq!(fs::read(m2.join("new")).unwrap(), b"new");
}

#[test]
fn mounting_the_same_target_twice() {
    let d = Daemon::start();
    d.create_volume("one", &[]);
    d.create_volume("two", &[]);
    let m = d.mount("one", false);
    // The same request again is fine (idempotent) and stacks nothing.
    d.try_mount("one", &m, false)
        .expect("repeating a mount request");
    assert_eq!(
        mountinfo().iter().filter(|e| e.target == m).count(),
        1,
        "a repeated mount request stacked a second mount"
    );
    // Another volume on the same target is refused.
    let (status, msg) = api_err(d.try_mount("two", &m, false));
    assert_eq!(status, 409, "{msg}");
    fs::write(m.join("f"), b"one").unwrap();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"one");
    let info = d.inspect("two").unwrap();
    assert_eq!(info["mountpoints"], json!([]), "{info}");
}

#[test]
fn concurrent_writers_in_one_volume() {
    let d = Daemon::start();
    let m = d.volume_mounted("conc", &[]);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dir = m.clone();
            std::thread::spawn(move || {
                for i in 0..4u64 {
                    let data = pseudo_random(MIB as usize + (t * 1000 + i) as usize, t * 100 + i);
                    let p = dir.join(format!("t{t}-{i}"));
                    fs::write(&p, &data).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread panicked");
    }
    for t in 0..4u64 {
        for i in 0..4u64 {
            let want = pseudo_random(MIB as usize + (t * 1000 + i) as usize, t * 100 + i);
            assert_bytes_eq(
                &read_direct(&m.join(format!("t{t}-{i}"))).unwrap(),
                &want,
                &format!("t{t}-{i}"),
            );
        }
    }
}

// =============================================================================================
// 13. Daemon lifecycle and the mount table
// =============================================================================================

/// SIGTERM is the normal way to stop the daemon (systemd, the harness): it must flush, detach
/// and exit 0, every time.
#[test]
fn graceful_stop_exits_zero() {
    // The crash this catches is a race; many volumes and cycles make it show reliably.
    const CYCLES: u64 = 40;
    let mut d = Daemon::start();
    let vols = ["g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8"];
    let mut mps = Vec::new();
    for v in vols {
        mps.push(d.volume_mounted(v, &[]));
    }
    let mut bad = Vec::new();
    for cycle in 0..CYCLES {
        for (i, m) in mps.iter().enumerate() {
            let data = pseudo_random(256 * 1024, cycle * 10 + i as u64);
            fs::write(m.join(format!("c{cycle}")), &data).unwrap();
        }
        let s = d.stop();
        if !s.success() {
            bad.push(format!("cycle {cycle}: {s}"));
        }
        d.start_again();
        for m in &mps {
            assert!(
                is_volfs_mount(m),
                "cycle {cycle}: {} not restored",
                m.display()
            );
        }
    }
    // Every file written before each stop is there.
    for cycle in 0..CYCLES {
        for (i, m) in mps.iter().enumerate() {
            let want = pseudo_random(256 * 1024, cycle * 10 + i as u64);
            assert_bytes_eq(
                &fs::read(m.join(format!("c{cycle}"))).unwrap(),
                &want,
                &format!("c{cycle} in {}", vols[i]),
            );
        }
    }
    // BUG: volfs-mountd crashes at exit now and then (SIGABRT "pthread lock: Invalid argument"
    // or SIGSEGV): the FUSE session threads still own the last Arc<VolumeFs> -> RocksDB handle
    // when main() returns, so rocksdb_close runs concurrently with the process's exit handlers.
    assert!(
        bad.is_empty(),
        "unclean exits on SIGTERM: {bad:?}\nlog tail:\n{}",
        {
            let log = d.log();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
    );
}

/// A volume's mountpoints are the bind mounts of its FUSE connection. When that connection
/// disappears behind the daemon's back (an admin's `umount -l`, `umount -a -t fuse.volfs`),
/// its device number is free and the next FUSE mount gets it: the daemon must not then report
/// (and, on `rm --force` or shutdown, detach) that other mount as its volume's mountpoint.
#[test]
fn stale_device_number_is_not_taken_for_a_mountpoint() {
    let mut d = Daemon::start();
    // Device numbers are handed out lowest-free-first, so b's connection normally gets the
    // number a's connection just freed; with tests running in parallel another mount may take
    // it first, so try a few times.
    let mut reused = None;
    for round in 0..5 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        d.create_volume(&a, &[]);
        d.create_volume(&b, &[]);
        let ma = d.mount(&a, false);
        let dev_a = mount_at(&ma).unwrap().dev;
        // The connection of `a` and its mountpoint go away without the daemon.
        umount2(&ma, libc::MNT_DETACH).unwrap();
        umount2(&d.run.join("mnt").join(&a), libc::MNT_DETACH).unwrap();
        let mb = d.mount(&b, false);
        if mount_at(&mb).unwrap().dev == dev_a {
            reused = Some((a, mb));
            break;
        }
    }
    let names: Vec<String> = d
        .volumes()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let infos: Vec<Value> = names
        .iter()
        .filter(|n| n.starts_with('a'))
        .map(|n| d.inspect(n).unwrap())
        .collect();
    // Do not let this daemon's shutdown act on stale device numbers (they may belong to
    // another test's mounts by now): kill it; Drop cleans up.
    d.kill9();
    if reused.is_none() {
        eprintln!("note: no device number was reused within this test; the check below is weaker");
    }
    for info in &infos {
        // BUG: Mounts::mountpoints() (mountd/src/mounts.rs) selects mountinfo entries by the
        // cached device number only; once the connection vanished it returns whatever mount
        // now has that number (here b's), and rm --force / shutdown detach those.
        assert_eq!(
            info["mountpoints"],
            json!([]),
            "volume {} is mounted nowhere, but inspect says: {info}",
            info["name"]
        );
    }
}

// =============================================================================================
// 14. The Docker volume plugin protocol (on the daemon's own plugin socket)
// =============================================================================================

fn plugin(d: &Daemon, endpoint: &str, body: Value) -> (u16, Value) {
    let (status, resp) = unix_http_post(&d.plugin_socket(), endpoint, body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("POST {endpoint}: {e}"));
    let v = serde_json::from_slice(&resp).unwrap_or_else(|e| {
        panic!(
            "{endpoint}: answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&resp)
        )
    });
    (status, v)
}

/// A successful VolumeDriver answer has an empty (or no) Err.
#[track_caller]
fn plugin_ok(d: &Daemon, endpoint: &str, body: Value) -> Value {
    let (status, v) = plugin(d, endpoint, body.clone());
    let err = v["Err"].as_str().unwrap_or("");
    assert!(
        status == 200 && err.is_empty(),
        "{endpoint} {body}: HTTP {status}: {v}"
    );
    v
}

#[track_caller]
fn plugin_err(d: &Daemon, endpoint: &str, body: Value) -> String {
    let (_, v) = plugin(d, endpoint, body.clone());
    let err = v["Err"].as_str().unwrap_or("").to_string();
    assert!(!err.is_empty(), "{endpoint} {body} should fail: {v}");
    err
}

#[test]
fn docker_plugin_protocol() {
    let mut d = Daemon::start();
    assert!(
        d.plugin_socket().exists(),
        "no plugin socket at {}",
        d.plugin_socket().display()
    );
    let (_, act) = plugin(&d, "/Plugin.Activate", json!({}));
    assert_eq!(act["Implements"], json!(["VolumeDriver"]), "{act}");
    let (_, caps) = plugin(&d, "/VolumeDriver.Capabilities", json!({}));
    assert_eq!(caps["Capabilities"]["Scope"], "local", "{caps}");

    plugin_ok(
        &d,
        "/VolumeDriver.Create",
        json!({"Name": "dk", "Opts": {"size": "10M", "label.team": "db"}}),
    );
    let info = d.inspect("dk").unwrap();
    assert_eq!(info["size"], 10 * MIB, "{info}");
    assert_eq!(info["labels"]["team"], "db", "{info}");
    plugin_ok(&d, "/VolumeDriver.Create", json!({"Name": "dk"}));
    let e = plugin_err(
        &d,
        "/VolumeDriver.Create",
        json!({"Name": "dk2", "Opts": {"colour": "red"}}),
    );
    assert!(e.contains("colour"), "{e}");
    let e = plugin_err(&d, "/VolumeDriver.Create", json!({"Name": "-bad"}));
    assert!(e.contains("invalid volume name"), "{e}");

    // Two containers mount it: one path, a live volfs mount.
    let p1 = plugin_ok(&d, "/VolumeDriver.Mount", json!({"Name": "dk", "ID": "c1"}))["Mountpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let p2 = plugin_ok(&d, "/VolumeDriver.Mount", json!({"Name": "dk", "ID": "c2"}))["Mountpoint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(p1, p2);
    let mp = PathBuf::from(&p1);
    assert!(is_volfs_mount(&mp), "Mountpoint {p1} is not a volfs mount");
    fs::write(mp.join("from-container"), b"hello docker").unwrap();
    assert_eq!(
        plugin_ok(&d, "/VolumeDriver.Path", json!({"Name": "dk"}))["Mountpoint"],
        json!(p1)
    );
    let got = plugin_ok(&d, "/VolumeDriver.Get", json!({"Name": "dk"}));
    assert_eq!(got["Volume"]["Name"], "dk", "{got}");
    assert_eq!(got["Volume"]["Mountpoint"], json!(p1), "{got}");
    assert_eq!(got["Volume"]["Status"]["docker_references"], 2, "{got}");
    let e = plugin_err(&d, "/VolumeDriver.Remove", json!({"Name": "dk"}));
    assert!(e.contains("dk"), "{e}");
    assert!(
        d.inspect("dk").is_ok(),
        "Remove of a volume in use removed it"
    );
    plugin_err(&d, "/VolumeDriver.Mount", json!({"Name": "dk"}));
    let e = plugin_err(&d, "/VolumeDriver.Get", json!({"Name": "nosuch"}));
    assert!(e.contains("not found"), "{e}");

    // References survive a restart.
    d.restart();
    let p = plugin_ok(&d, "/VolumeDriver.Path", json!({"Name": "dk"}))["Mountpoint"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !p.is_empty(),
        "Path of a held volume is empty after restart"
    );
    assert!(
        is_volfs_mount(Path::new(&p)),
        "{p} is not mounted after restart"
    );
    assert_eq!(
        fs::read(Path::new(&p).join("from-container")).unwrap(),
        b"hello docker"
    );

    plugin_ok(
        &d,
        "/VolumeDriver.Unmount",
        json!({"Name": "dk", "ID": "c1"}),
    );
    plugin_ok(
        &d,
        "/VolumeDriver.Unmount",
        json!({"Name": "dk", "ID": "c1"}),
    ); // idempotent
    plugin_err(&d, "/VolumeDriver.Remove", json!({"Name": "dk"}));
    plugin_ok(
        &d,
        "/VolumeDriver.Unmount",
        json!({"Name": "dk", "ID": "c2"}),
    );
    assert_eq!(
        plugin_ok(&d, "/VolumeDriver.Path", json!({"Name": "dk"}))["Mountpoint"],
        "",
        "Path of a volume nobody holds"
    );
    plugin_ok(&d, "/VolumeDriver.Remove", json!({"Name": "dk"}));
    let list = plugin_ok(&d, "/VolumeDriver.List", json!({}));
    assert_eq!(list["Volumes"], json!([]), "{list}");
    assert!(api_names(&d).is_empty());
}

// =============================================================================================
// 15. More of the data path: mmap, timestamps across restarts, 64-bit offsets
// =============================================================================================

#[test]
fn mmap_writes_reach_the_volume() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("mmap", &[]);
    let p = m.join("mapped");
    let len = 3 * MIB as usize;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(len as u64).unwrap();
    let data = pseudo_random(len, 70);
    // SAFETY: a fresh shared mapping of `len` bytes of a file we own; unmapped below.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        std::ptr::copy_nonoverlapping(data.as_ptr(), ptr as *mut u8, len);
        assert_eq!(
            libc::msync(ptr, len, libc::MS_SYNC),
            0,
            "msync: {}",
            io::Error::last_os_error()
        );
        assert_eq!(libc::munmap(ptr, len), 0);
    }
    f.sync_all().unwrap();
    close_checked(f).unwrap();
    assert_bytes_eq(
        &read_direct(&p).unwrap(),
        &data,
        "mmap-written file (O_DIRECT)",
    );
    d.restart();
    assert_bytes_eq(
        &fs::read(&p).unwrap(),
        &data,
        "mmap-written file after restart",
    );
}

/// What stat shows must not change across a restart (or when the kernel's attribute cache
/// expires) while nobody touches the file.
#[test]
fn timestamps_are_stable_across_restart() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("times", &[]);
    // Writes through the page cache mixed with a truncate, 20 times (the ordering of the
    // kernel's writeback against the truncate varies from run to run).
    const N: usize = 20;
    for i in 0..N {
        let p = m.join(format!("w{i}"));
        fs::write(&p, pseudo_random(200_000, 80 + i as u64)).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"again", 10).unwrap();
        f.set_len(150_000).unwrap();
        close_checked(f).unwrap();
    }
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/inner"), b"x").unwrap();
    fs::rename(m.join("dir/inner"), m.join("dir/renamed")).unwrap();
    // A write to an old file moves its mtime forward.
    utimensat(
        &m.join("dir/renamed"),
        ts(1_000_000_000, 0),
        ts(1_000_000_000, 0),
    )
    .unwrap();
    OpenOptions::new()
        .append(true)
        .open(m.join("dir/renamed"))
        .unwrap()
        .write_all(b"y")
        .unwrap();
    assert!(
        fs::metadata(m.join("dir/renamed")).unwrap().mtime() > 1_000_000_000,
        "a write did not update mtime"
    );

    let mut names: Vec<String> = (0..N).map(|i| format!("w{i}")).collect();
    names.extend(["dir", "dir/renamed", "."].map(String::from));
    let stamps = |m: &Path| -> Vec<(String, u64, i64, i64, i64, i64)> {
        names
            .iter()
            .map(|n| {
                let md = fs::metadata(m.join(n)).unwrap();
                (
                    n.clone(),
                    md.len(),
                    md.mtime(),
                    md.mtime_nsec(),
                    md.ctime(),
                    md.ctime_nsec(),
                )
            })
            .collect()
    };
    let before = stamps(&m);
    d.restart();
    let after = stamps(&m);
    let changed: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(b, a)| {
            format!(
                "{}: (size, mtime, ctime) {:?} -> {:?}",
                b.0,
                (b.1, b.2, b.3, b.4, b.5),
                (a.1, a.2, a.3, a.4, a.5)
            )
        })
        .collect();
    // BUG: with the kernel's writeback cache on (the default), the kernel keeps its own
    // mtime/ctime and ignores the daemon's, while VolumeFs stamps the daemon's clock on the
    // WRITEs and the truncating SETATTR it receives (src/fs/data.rs write, src/fs/mod.rs
    // setattr). The two disagree by a few ms; after a restart (or once the attribute cache
    // expires) stat shows the daemon's value. Passes with VOLFS_WRITEBACK_CACHE=false.
    assert!(
        changed.is_empty(),
        "timestamps changed across a restart:\n{}",
        changed.join("\n")
    );
}

#[test]
fn offsets_beyond_4_gib() {
    let d = Daemon::start();
    let m = d.volume_mounted("huge", &[]);
    let p = m.join("huge");
    let far: u64 = 5 << 30;
    let farther: u64 = (17 << 40) + 12_345;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"at five gib", far).unwrap();
    f.write_all_at(b"at seventeen tib", farther).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), farther + 16);
    let mut buf = [0u8; 16];
    f.read_exact_at(&mut buf[..11], far).unwrap();
    assert_eq!(&buf[..11], b"at five gib");
    f.read_exact_at(&mut buf, farther).unwrap();
    assert_eq!(&buf, b"at seventeen tib");
    let mut hole = vec![1u8; 1 << 20];
    f.read_exact_at(&mut hole, 4 << 30).unwrap();
    assert!(
        hole.iter().all(|b| *b == 0),
        "the hole at 4 GiB does not read as zeros"
    );
    // With the kernel's writeback cache, data reaches the volume in whole pages, so the
    // extents may be rounded out to 4 KiB: allow that, nothing more.
    let page = |o: u64| o & !4095;
    assert_eq!(
        lseek(&f, 8192, libc::SEEK_DATA).unwrap() as u64,
        far,
        "SEEK_DATA across 5 GiB of hole"
    );
    let h = lseek(&f, far as i64, libc::SEEK_HOLE).unwrap() as u64;
    assert!(
        (far + 11..=far + 4096).contains(&h),
        "SEEK_HOLE after the data at 5 GiB: {h}"
    );
    let dpos = lseek(&f, far as i64 + 8192, libc::SEEK_DATA).unwrap() as u64;
    assert!(
        (page(farther)..=farther).contains(&dpos),
        "SEEK_DATA to 17 TiB: {dpos}"
    );
    // Truncate to just past 4 GiB and back up.
    f.set_len((4 << 30) + 1).unwrap();
    f.set_len(far + 100).unwrap();
    let mut z = [1u8; 11];
    f.read_exact_at(&mut z, far).unwrap();
    assert_eq!(z, [0u8; 11], "data beyond a truncate came back");
    // copy_file_range of a range that starts beyond 4 GiB.
    f.write_all_at(b"copy me", far + 50).unwrap();
    f.sync_all().unwrap();
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.join("dst"))
        .unwrap();
    assert_eq!(
        copy_range(&f, far as i64 + 50, &dst, (6 << 30) + 7, 7).unwrap(),
        7
    );
    let mut c = [0u8; 7];
    dst.read_exact_at(&mut c, (6 << 30) + 7).unwrap();
    assert_eq!(&c, b"copy me");
    assert!(
        d.inspect("huge").unwrap()["bytes_used"].as_u64().unwrap() < MIB,
        "holes are counted as used space"
    );
}

/// `volume create --opt from=SRC` copies a mounted volume (including data still buffered in
/// the kernel and the daemon); the copy and the source are independent afterwards.
#[test]
fn create_from_copies_a_volume() {
    let d = Daemon::start();
    let src = d.volume_mounted("src", &[]);
    std::fs::write(src.join("a"), b"from the source").unwrap();
    std::fs::create_dir(src.join("dir")).unwrap();
    std::fs::write(src.join("dir/b"), pseudo_random(300_000, 7)).unwrap();
    d.cli_ok(&["volume", "create", "copy", "--opt", "from=src"]);
    let copy = d.mount("copy", false);
    assert_eq!(std::fs::read(copy.join("a")).unwrap(), b"from the source");
    assert_eq!(
        std::fs::read(copy.join("dir/b")).unwrap(),
        pseudo_random(300_000, 7)
    );
    std::fs::write(copy.join("a"), b"changed in the copy").unwrap();
    std::fs::write(src.join("new"), b"only in the source").unwrap();
    assert_eq!(std::fs::read(src.join("a")).unwrap(), b"from the source");
    assert!(!copy.join("new").exists());
    let out = d.cli(&["volume", "create", "bad", "--opt", "from=missing"]);
    assert!(!out.success() && out.stderr.contains("missing"), "{out}");
}
