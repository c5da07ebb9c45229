//! Docker integration tests: a real Docker engine using `volfs-mountd` as a volume plugin.
//!
//! Every test starts its own daemon (see `common::Daemon`) whose plugin socket is
//! `/run/docker/plugins/volfs-it-<test>.sock`, so each test has its own Docker driver and tests
//! run in parallel without seeing each other's volumes. The driver names are fixed per test
//! (see [`DockerEnv::start`] for why) and held under a file lock; volume and container names
//! start with `<driver>-<pid>-` (Docker's names are global). [`DockerEnv`] removes every
//! container and volume the test made (also when it panics) before it stops the daemon, then
//! removes the plugin socket.
//!
//! Docker 20.10 asks every volume plugin it ever saw (dead ones included, with 15 s of
//! retries each) on an unfiltered `docker volume ls`, on `docker volume prune` and on lookups
//! of unknown volume names, so the tests list with `--filter driver=` and never name a volume
//! Docker does not have.
//!
//! The test images are built once per run from the host's static busybox (nothing can be
//! pulled): `volfs-test-busybox` (busybox only) and `volfs-test-flock` (busybox plus the host's
//! util-linux `flock` and the two glibc files it needs, because Debian's busybox has no flock
//! applet).
//!
//! Run: `cargo build --workspace && cargo test --test docker -- --test-threads=2` (as root,
//! with a usable /dev/fuse and a running Docker engine).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use volfs::client::Client;

const IMAGE: &str = "volfs-test-busybox";
const FLOCK_IMAGE: &str = "volfs-test-flock";
const PLUGIN_DIR: &str = "/run/docker/plugins";
/// Bound for one ordinary docker CLI call.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for `docker build` and for waiting on long-running containers.
const LONG_TIMEOUT: Duration = Duration::from_secs(300);
const GIB: u64 = 1 << 30;

// =============================================================================================
// docker CLI
// =============================================================================================

fn docker_cmd(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args)
        .env("DOCKER_CLI_HINTS", "false")
        .env("NO_COLOR", "1");
    c
}

/// Runs `docker ARGS`, killed after `timeout`.
fn docker_t(args: &[&str], timeout: Duration) -> CmdOut {
    let t = Instant::now();
    let out = run_with_timeout(&mut docker_cmd(args), timeout);
    if t.elapsed() > Duration::from_secs(10) {
        eprintln!("note: docker {args:?} took {:.1?}", t.elapsed());
    }
    out
}

/// Runs `docker ARGS`, killed after [`DOCKER_TIMEOUT`].
fn docker(args: &[&str]) -> CmdOut {
    docker_t(args, DOCKER_TIMEOUT)
}

/// Runs `docker ARGS` and panics with its output unless it exits 0.
#[track_caller]
fn docker_ok(args: &[&str]) -> CmdOut {
    let out = docker(args);
    assert!(out.success(), "docker {args:?} failed:\n{out}");
    out
}

/// `major.minor` of the engine's API version, e.g. (1, 41).
fn server_api_version() -> (u32, u32) {
    let out = docker_ok(&["version", "--format", "{{.Server.APIVersion}}"]);
    let v = out.stdout.trim();
    let (a, b) = v
        .split_once('.')
        .unwrap_or_else(|| panic!("odd API version {v:?}"));
    (a.parse().unwrap(), b.parse().unwrap())
}

// =============================================================================================
// Test images
// =============================================================================================

/// Holds an exclusive flock on a file in /tmp while alive (serialises image builds across
/// processes; within one process the OnceLocks do).
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &str) -> FileLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .expect("opening lock file");
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Copies host `src` to `<root><dst>` (following symlinks), creating parents.
fn copy_into(root: &Path, src: &str, dst: &str) {
    let to = root.join(dst.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(src, &to).unwrap_or_else(|e| panic!("copying {src} to {}: {e}", to.display()));
}

/// `docker build -q -t TAG` of a FROM-scratch image whose root is `files` (host path, image
/// path) plus busybox's applet links.
fn build_image(tag: &str, files: &[(String, String)]) -> Result<(), String> {
    let _lock = FileLock::take("/tmp/volfs-test-image-build.lock");
    let dir = tempfile::Builder::new()
        .prefix("volfs-img.")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?;
    let rootfs = dir.path().join("rootfs");
    for (src, dst) in files {
        copy_into(&rootfs, src, dst);
    }
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nRUN [\"/bin/busybox\",\"--install\",\"-s\",\"/bin\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let dir_s = dir.path().display().to_string();
    let mut c = docker_cmd(&["build", "-q", "-t", tag, &dir_s]);
    // The engine has no BuildKit/buildx here; the classic builder is what works.
    c.env("DOCKER_BUILDKIT", "0");
    let out = run_with_timeout(&mut c, LONG_TIMEOUT);
    if !out.success() {
        return Err(format!("docker build -t {tag} failed:\n{out}"));
    }
    Ok(())
}

/// The busybox image (built once per test run).
fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r =
        BUILT.get_or_init(|| build_image(IMAGE, &[("/bin/busybox".into(), "/bin/busybox".into())]));
    if let Err(e) = r {
        panic!("{e}");
    }
    IMAGE
}

/// The busybox image plus util-linux flock and the shared objects `ldd` names for it.
fn flock_image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let mut files = vec![
            ("/bin/busybox".to_string(), "/bin/busybox".to_string()),
            ("/usr/bin/flock".into(), "/usr/bin/flock".into()),
        ];
        let ldd = run_with_timeout(
            Command::new("ldd").arg("/usr/bin/flock"),
            Duration::from_secs(30),
        );
        if !ldd.success() {
            return Err(format!("ldd /usr/bin/flock failed:\n{ldd}"));
        }
        for tok in ldd.stdout.split_whitespace() {
            if tok.starts_with('/') && Path::new(tok).exists() {
                files.push((tok.to_string(), tok.to_string()));
            }
        }
        build_image(FLOCK_IMAGE, &files)
    });
    if let Err(e) = r {
        panic!("{e}");
    }
    FLOCK_IMAGE
}

// =============================================================================================
// Per-test environment: a daemon serving a unique Docker driver
// =============================================================================================

struct DockerEnv {
    daemon: Option<Daemon>,
    driver: String,
    /// `<driver>-<pid>`: the start of this test's volume and container names.
    prefix: String,
    plugin_socket: PathBuf,
    containers: Mutex<Vec<String>>,
    volumes: Mutex<Vec<String>>,
    _lock: FileLock,
}

impl DockerEnv {
    /// A daemon whose plugin socket makes it the Docker driver `volfs-it-<tag>`.
    ///
    /// The driver name is fixed per test (and held under a file lock, so that two runs of the
    /// suite wait for each other) rather than fresh per run: Docker 20.10 caches every v1
    /// volume plugin it ever saw until dockerd restarts and keeps asking dead ones (15 s of
    /// retries each) on `docker volume ls` and on lookups of unknown volume names, so fresh
    /// names would slow down every later Docker user on the machine.
    fn start(tag: &str) -> DockerEnv {
        let driver = format!("volfs-it-{tag}");
        let lock = FileLock::take(&format!("/tmp/{driver}.driver.lock"));
        std::fs::create_dir_all(PLUGIN_DIR).expect("creating /run/docker/plugins");
        let plugin_socket = Path::new(PLUGIN_DIR).join(format!("{driver}.sock"));
        let sock_s = plugin_socket.display().to_string();
        let daemon = Daemon::start_with_env(&[("VOLFS_PLUGIN_SOCKET", &sock_s)]);
        let env = DockerEnv {
            daemon: Some(daemon),
            prefix: format!("{driver}-{}", std::process::id()),
            driver,
            plugin_socket,
            containers: Mutex::new(Vec::new()),
            volumes: Mutex::new(Vec::new()),
            _lock: lock,
        };
        assert!(
            env.plugin_socket.exists(),
            "the daemon is up but its plugin socket {} does not exist; log:\n{}",
            env.plugin_socket.display(),
            env.d().log()
        );
        env
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon")
    }

    fn d_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon")
    }

    /// A Docker volume name unique to this test, removed at the end.
    fn volume(&self, base: &str) -> String {
        let n = format!("{}-{base}", self.prefix);
        self.volumes.lock().unwrap().push(n.clone());
        n
    }

    /// A container name unique to this test, removed at the end.
    fn container(&self, base: &str) -> String {
        let n = format!("{}-{base}", self.prefix);
        self.containers.lock().unwrap().push(n.clone());
        n
    }

    /// `docker volume create -d DRIVER [--opt K=V]... NAME`.
    fn create(&self, name: &str, opts: &[&str]) -> CmdOut {
        let mut args = vec!["volume", "create", "-d", &self.driver];
        for o in opts {
            args.push("--opt");
            args.push(o);
        }
        args.push(name);
        docker(&args)
    }

    #[track_caller]
    fn create_ok(&self, name: &str, opts: &[&str]) {
        let out = self.create(name, opts);
        assert!(
            out.success(),
            "docker volume create {name} {opts:?} failed:\n{out}\ndaemon log:\n{}",
            self.d().log()
        );
        assert_eq!(
            out.stdout.trim(),
            name,
            "docker volume create prints the name"
        );
    }

    /// `docker run --rm --name <unique> RUN_ARGS... IMAGE sh -c SCRIPT`.
    fn run_sh(&self, run_args: &[&str], image: &str, script: &str) -> CmdOut {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = self.container(&format!("run{}", N.fetch_add(1, Ordering::SeqCst)));
        let mut args = vec!["run", "--rm", "--name", &name];
        args.extend_from_slice(run_args);
        args.extend_from_slice(&[image, "sh", "-c", script]);
        docker(&args)
    }

    /// Like [`run_sh`], panicking unless the container exits 0; returns its stdout.
    #[track_caller]
    fn run_sh_ok(&self, run_args: &[&str], script: &str) -> String {
        let out = self.run_sh(run_args, image(), script);
        assert!(
            out.success(),
            "docker run {run_args:?} sh -c {script:?} failed:\n{out}\ndaemon log:\n{}",
            self.d().log()
        );
        out.stdout
    }

    /// Starts a detached container `sh -c SCRIPT` and returns its name.
    #[track_caller]
    fn run_detached(&self, base: &str, run_args: &[&str], image: &str, script: &str) -> String {
        let name = self.container(base);
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(run_args);
        args.extend_from_slice(&[image, "sh", "-c", script]);
        let out = docker(&args);
        assert!(
            out.success(),
            "docker run -d {name} failed:\n{out}\ndaemon log:\n{}",
            self.d().log()
        );
        name
    }

    /// `docker volume inspect NAME` (the single object).
    #[track_caller]
    fn inspect(&self, name: &str) -> Value {
        let out = docker_ok(&["volume", "inspect", name]);
        let v = out.json();
        assert_eq!(
            v.as_array().map(Vec::len),
            Some(1),
            "docker volume inspect {name}: {v}"
        );
        v[0].clone()
    }

    /// `(driver, name)` pairs of `docker volume ls --filter driver=DRIVER`. (Filtered by
    /// driver, Docker asks only that driver; unfiltered it asks every plugin it ever saw.)
    #[track_caller]
    fn docker_volumes(&self) -> BTreeSet<(String, String)> {
        let filter = format!("driver={}", self.driver);
        parse_volume_ls(&docker_ok(&[
            "volume",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Driver}}\t{{.Name}}",
        ]))
    }

    fn docker_lists(&self, name: &str) -> bool {
        self.docker_volumes()
            .contains(&(self.driver.clone(), name.to_string()))
    }

    /// Names of the volumes the daemon itself has (control API).
    fn daemon_volumes(&self) -> BTreeSet<String> {
        self.d()
            .volumes()
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    }

    /// POSTs straight to the plugin socket, as Docker does; returns the HTTP status and the
    /// JSON answer.
    #[track_caller]
    fn plugin(&self, endpoint: &str, body: &Value) -> (u16, Value) {
        let client = Client::new(&self.plugin_socket).with_timeout(Duration::from_secs(30));
        let bytes = serde_json::to_vec(body).unwrap();
        let (status, resp) = client
            .raw("POST", endpoint, Some(&bytes))
            .unwrap_or_else(|e| panic!("POST {endpoint} on {}: {e}", self.plugin_socket.display()));
        let v: Value = serde_json::from_slice(&resp).unwrap_or_else(|e| {
            panic!(
                "POST {endpoint}: HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&resp)
            )
        });
        (status, v)
    }

    /// `VolumeDriver.Get` → `Volume`.
    #[track_caller]
    fn plugin_get(&self, name: &str) -> Value {
        let (status, v) = self.plugin("/VolumeDriver.Get", &json!({ "Name": name }));
        assert!(
            status == 200 && v["Err"].as_str().unwrap_or("").is_empty(),
            "VolumeDriver.Get {name}: HTTP {status}: {v}"
        );
        v["Volume"].clone()
    }

    fn references(&self, name: &str) -> u64 {
        let v = self.plugin_get(name);
        v["Status"]["docker_references"]
            .as_u64()
            .unwrap_or_else(|| panic!("VolumeDriver.Get {name}: no Status.docker_references: {v}"))
    }

    /// Polls `docker_references` until it is `want` (Docker unmounts a stopped container's
    /// volumes while cleaning up, which may finish just after the CLI returns).
    #[track_caller]
    fn wait_references(&self, name: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.references(name);
            if got == want {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "volume {name}: docker_references is {got}, expected {want}\nGet: {}\ndaemon log:\n{}",
                    self.plugin_get(name),
                    self.d().log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DockerEnv {
    fn drop(&mut self) {
        let containers =
            std::mem::take(&mut *self.containers.lock().unwrap_or_else(|e| e.into_inner()));
        let volumes = std::mem::take(&mut *self.volumes.lock().unwrap_or_else(|e| e.into_inner()));
        if std::thread::panicking() {
            for c in &containers {
                let out = docker(&["logs", "--tail", "50", c]);
                if out.success() {
                    eprintln!("===== docker logs {c} =====\n{}{}", out.stdout, out.stderr);
                }
            }
        }
        // Containers first (Docker unmounts their volumes), then the volumes, then the daemon.
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(containers.iter().map(String::as_str));
            let out = docker(&args);
            // "No such container" is expected for --rm containers that are gone.
            if !out.success() && !out.stderr.contains("No such container") {
                eprintln!("cleanup: docker rm -f failed:\n{out}");
            }
        }
        // Only volumes Docker still has: removing an unknown name makes Docker ask every
        // plugin it ever saw, one after the other.
        let filter = format!("driver={}", self.driver);
        let listed = parse_volume_ls(&docker(&[
            "volume",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Driver}}\t{{.Name}}",
        ]));
        for v in volumes
            .iter()
            .filter(|v| listed.contains(&(self.driver.clone(), v.to_string())))
        {
            let out = docker(&["volume", "rm", "-f", v]);
            if !out.success() {
                eprintln!("cleanup: docker volume rm -f {v} failed:\n{out}");
            }
        }
        drop(self.daemon.take());
        let _ = std::fs::remove_file(&self.plugin_socket);
    }
}

fn parse_volume_ls(out: &CmdOut) -> BTreeSet<(String, String)> {
    out.stdout
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(d, n)| (d.trim().to_string(), n.trim().to_string()))
        .collect()
}

/// Asserts that a docker run failed and that its stderr contains `what`.
#[track_caller]
fn assert_run_fails_with(out: &CmdOut, what: &str, ctx: &str) {
    assert!(
        !out.success(),
        "{ctx}: expected a failure with {what:?} but it succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains(what),
        "{ctx}: expected {what:?} in stderr:\n{out}"
    );
}

// =============================================================================================
// Tests
// =============================================================================================

/// Create with a size, write in one container, read in the next, inspect, and keep the data
/// across a graceful daemon restart.
#[test]
fn volume_data_persists_across_containers_and_restart() {
    let img = image();
    let mut env = DockerEnv::start("life");
    let vol = env.volume("data1");
    env.create_ok(&vol, &["size=1G"]);
    let v = format!("{vol}:/data");

    env.run_sh_ok(&["-v", &v], "echo hi > /data/f");
    assert_eq!(env.run_sh_ok(&["-v", &v], "cat /data/f"), "hi\n");

    let info = env.inspect(&vol);
    assert_eq!(info["Driver"], json!(env.driver), "{info}");
    assert_eq!(info["Name"], json!(vol), "{info}");
    assert_eq!(
        info["Status"]["size"],
        json!(GIB),
        "Status.size of a size=1G volume: {info}"
    );
    assert_eq!(info["Status"]["read_only"], json!(false), "{info}");
    assert_eq!(
        info["Status"]["docker_references"],
        json!(0),
        "no container runs: {info}"
    );
    assert!(
        info["Status"]["bytes_used"].as_u64().is_some(),
        "Status.bytes_used: {info}"
    );
    assert!(
        env.daemon_volumes().contains(&vol),
        "the daemon does not know {vol}"
    );

    env.d_mut().restart();

    let out = env.run_sh(
        &["-v", &v],
        img,
        "cat /data/f && echo again >> /data/f && cat /data/f",
    );
    assert!(
        out.success(),
        "after a daemon restart, a new container cannot use {vol}:\n{out}\ndaemon log:\n{}",
        env.d().log()
    );
    assert_eq!(out.stdout, "hi\nhi\nagain\n", "after a daemon restart");
    let info = env.inspect(&vol);
    assert_eq!(info["Driver"], json!(env.driver), "{info}");
    assert_eq!(
        info["Status"]["size"],
        json!(GIB),
        "Status.size after restart: {info}"
    );
    assert_eq!(
        env.references(&vol),
        0,
        "references after the containers are gone"
    );
}

/// `--mount ...,readonly`, `-v VOL:/data:ro`, and a volume created with `ro=true`.
#[test]
fn read_only_mounts_and_read_only_volumes() {
    let img = image();
    let env = DockerEnv::start("ro");
    let vol = env.volume("rw");
    env.create_ok(&vol, &[]);
    env.run_sh_ok(&["-v", &format!("{vol}:/data")], "echo data > /data/f");

    let mount = format!(
        "type=volume,src={vol},dst=/data,volume-driver={},readonly",
        env.driver
    );
    let out = env.run_sh(&["--mount", &mount], img, "cat /data/f; echo x > /data/g");
    assert_run_fails_with(
        &out,
        "Read-only file system",
        "write under --mount ...,readonly",
    );
    assert_eq!(
        out.stdout, "data\n",
        "reading under --mount ...,readonly:\n{out}"
    );

    let out = env.run_sh(
        &["-v", &format!("{vol}:/data:ro")],
        img,
        "cat /data/f; echo x > /data/g",
    );
    assert_run_fails_with(&out, "Read-only file system", "write under -v VOL:/data:ro");
    assert_eq!(
        out.stdout, "data\n",
        "reading under -v VOL:/data:ro:\n{out}"
    );
    let out = env.run_sh(&["-v", &format!("{vol}:/data:ro")], img, "mkdir /data/d");
    assert_run_fails_with(&out, "Read-only file system", "mkdir under -v VOL:/data:ro");

    // The read-only mounts wrote nothing; a read-write one still can.
    assert_eq!(
        env.run_sh_ok(
            &["-v", &format!("{vol}:/data")],
            "ls /data; echo y > /data/h; cat /data/h"
        ),
        "f\ny\n"
    );

    // A read-only volume is read-only without :ro.
    let ro = env.volume("rovol");
    env.create_ok(&ro, &["ro=true"]);
    let info = env.inspect(&ro);
    assert_eq!(
        info["Status"]["read_only"],
        json!(true),
        "Status.read_only of an ro=true volume: {info}"
    );
    let v = format!("{ro}:/data");
    assert_eq!(
        env.run_sh_ok(&["-v", &v], "ls -a /data"),
        ".\n..\n",
        "listing a read-only volume"
    );
    let out = env.run_sh(&["-v", &v], img, "echo x > /data/f");
    assert_run_fails_with(
        &out,
        "Read-only file system",
        "write to an ro=true volume without :ro",
    );
    let out = env.run_sh(&["-v", &v], img, "mkdir /data/d");
    assert_run_fails_with(
        &out,
        "Read-only file system",
        "mkdir in an ro=true volume without :ro",
    );
}

/// `docker volume ls`, `rm` refused while in use, `rm` after, and `prune`.
#[test]
fn ls_rm_and_prune() {
    let img = image();
    let env = DockerEnv::start("rm");
    let vol = env.volume("used");
    env.create_ok(&vol, &[]);
    // Once unfiltered (slow while Docker knows dead plugins), then filtered by driver.
    let all = parse_volume_ls(&docker_ok(&[
        "volume",
        "ls",
        "--format",
        "{{.Driver}}\t{{.Name}}",
    ]));
    assert!(
        all.contains(&(env.driver.clone(), vol.clone())),
        "docker volume ls does not list ({}, {vol}):\n{all:?}",
        env.driver
    );
    assert!(
        env.docker_lists(&vol),
        "docker volume ls --filter driver= does not list ({}, {vol}):\n{:?}",
        env.driver,
        env.docker_volumes()
    );

    let c = env.run_detached(
        "sleeper",
        &["-v", &format!("{vol}:/data")],
        img,
        "echo x > /data/f; exec sleep 60",
    );
    let out = docker(&["volume", "rm", &vol]);
    assert!(
        !out.success(),
        "docker volume rm of a volume a running container uses succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains("in use"),
        "docker volume rm of a used volume: {out}"
    );
    assert!(
        env.docker_lists(&vol),
        "{vol} vanished from docker volume ls after a refused rm"
    );
    assert!(
        env.daemon_volumes().contains(&vol),
        "{vol} vanished from the daemon after a refused rm"
    );
    assert_eq!(
        env.references(&vol),
        1,
        "references while one container runs"
    );

    // The plugin itself refuses too (Docker checks its own count first, so ask it directly).
    let (status, r) = env.plugin("/VolumeDriver.Remove", &json!({ "Name": vol }));
    assert!(
        status != 200,
        "VolumeDriver.Remove of a held volume: HTTP {status}: {r}"
    );
    assert!(
        r["Err"].as_str().is_some_and(|e| e.contains("in use")),
        "VolumeDriver.Remove of a held volume: {r}"
    );
    assert!(
        env.daemon_volumes().contains(&vol),
        "VolumeDriver.Remove removed a held volume"
    );

    docker_ok(&["rm", "-f", &c]);
    env.wait_references(&vol, 0);
    let out = docker(&["volume", "rm", &vol]);
    assert!(
        out.success(),
        "docker volume rm after the container is gone:\n{out}\ndaemon log:\n{}",
        env.d().log()
    );
    assert!(
        !env.docker_lists(&vol),
        "docker volume ls still lists {vol} after rm"
    );
    assert!(
        !env.daemon_volumes().contains(&vol),
        "the daemon still has {vol} after docker volume rm"
    );

    // Prune, restricted to this test's labelled volumes (prune works on every unused volume
    // of the engine, and other tests share it). Docker's prune only ever removes volumes of
    // the built-in `local` driver (moby's VolumesService.Prune filters on
    // ByDriver("local")), so plugin volumes survive it on every engine version: they are
    // removed with `docker volume rm` (or the daemon's own prune). What must hold either way:
    // a volume in use is never pruned, and Docker and the daemon agree on what is left, with
    // the data of whatever survives intact.
    let label = format!("volfs.test.run={}", env.prefix);
    let unused = env.volume("unused");
    let used = env.volume("inuse");
    for v in [&unused, &used] {
        let out = docker(&["volume", "create", "-d", &env.driver, "--label", &label, v]);
        assert!(out.success(), "docker volume create {v}:\n{out}");
    }
    env.run_sh_ok(&["-v", &format!("{unused}:/data")], "echo x > /data/f");
    env.run_detached(
        "pruneuser",
        &["-v", &format!("{used}:/data")],
        img,
        "echo y > /data/f; exec sleep 60",
    );
    env.wait_references(&used, 1);
    // Engines before API 1.42 consider named volumes too; later ones only with --all.
    let filter = format!("label={label}");
    let mut args = vec!["volume", "prune", "-f", "--filter", &filter];
    if server_api_version() >= (1, 42) {
        args.push("--all");
    }
    let out = docker_ok(&args);
    assert!(
        !out.stdout.contains(&used),
        "docker volume prune removed {used}, which is in use:\n{out}"
    );
    let pruned = out.stdout.lines().any(|l| l.trim() == unused);
    let listed = env.docker_volumes();
    let ours = env.daemon_volumes();
    assert!(
        listed.contains(&(env.driver.clone(), used.clone())),
        "{used} (in use) not listed after prune: {listed:?}"
    );
    assert!(
        ours.contains(&used),
        "the daemon lost {used} (in use) in prune: {ours:?}"
    );
    assert_eq!(
        listed.contains(&(env.driver.clone(), unused.clone())),
        !pruned,
        "docker volume ls after prune (prune reported {unused}: {pruned}):\n{out}\nlisted: {listed:?}"
    );
    assert_eq!(
        ours.contains(&unused),
        !pruned,
        "the daemon after prune (prune reported {unused}: {pruned}): {ours:?}"
    );
    if !pruned {
        assert_eq!(
            env.run_sh_ok(&["-v", &format!("{unused}:/data")], "cat /data/f"),
            "x\n",
            "{unused} after prune"
        );
    }
    let c2 = format!("{}-pruneuser", env.prefix);
    let out = docker_ok(&["exec", &c2, "cat", "/data/f"]);
    assert_eq!(out.stdout, "y\n", "{used} after prune");
}

/// Unknown options are refused and named; labels are accepted; `from` must name a volume.
#[test]
fn unknown_options_are_refused() {
    let env = DockerEnv::start("opts");
    let v = env.volume("v");
    let out = env.create(&v, &["colour=red"]);
    assert!(
        !out.success(),
        "docker volume create --opt colour=red succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains("colour"),
        "the error does not name the option colour:\n{out}"
    );
    assert!(
        !env.docker_lists(&v),
        "{v} exists in Docker after a refused create"
    );
    assert!(
        !env.daemon_volumes().contains(&v),
        "{v} exists in the daemon after a refused create"
    );

    // from= a volume that does not exist names it, so does from= a missing snapshot.
    let missing = env.volume("missing");
    let from_missing = format!("from={missing}");
    let out = env.create(&v, &[from_missing.as_str()]);
    assert!(
        !out.success(),
        "docker volume create --opt {from_missing} succeeded:\n{out}"
    );
    assert!(
        out.stderr.contains(&missing),
        "the error does not name {missing}:\n{out}"
    );
    let out = env.create(&v, &["from=x@snap"]);
    assert!(
        !out.success() && out.stderr.contains("not found"),
        "docker volume create --opt from=x@snap (no such volume):\n{out}"
    );
    assert!(
        !env.daemon_volumes().contains(&v),
        "{v} exists in the daemon after a refused from="
    );

    // Known options and labels are fine.
    env.create_ok(&v, &["size=64M", "label.team=db", "com.example.tier=gold"]);
    let info = env.inspect(&v);
    assert_eq!(info["Status"]["size"], json!(64u64 << 20), "{info}");
    let labels = &info["Status"]["labels"];
    assert_eq!(labels["team"], json!("db"), "label.team=db: {info}");
    assert_eq!(
        labels["com.example.tier"],
        json!("gold"),
        "com.example.tier=gold: {info}"
    );
}

/// `--opt from=VOL` creates an independent copy: it sees the source's data, including writes
/// still in the kernel's cache, and later writes on either side do not show on the other.
#[test]
fn from_option_clones_a_volume() {
    let img = image();
    let env = DockerEnv::start("clone");
    let src = env.volume("src");
    let dst = env.volume("dst");
    env.create_ok(&src, &[]);
    let s = format!("{src}:/data");
    let holder = env.run_detached(
        "holder",
        &["-v", &s],
        img,
        "echo original > /data/f; exec sleep 300",
    );
    env.wait_references(&src, 1);
    let from = format!("from={src}");
    // Wait until the holder has written its file, then clone while it is still mounted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while docker(&["exec", &holder, "cat", "/data/f"]).stdout.trim() != "original" {
        assert!(Instant::now() < deadline, "holder never wrote /data/f");
        std::thread::sleep(Duration::from_millis(100));
    }
    env.create_ok(&dst, &[from.as_str()]);
    let d = format!("{dst}:/data");
    let out = env.run_sh_ok(&["-v", &d], "cat /data/f; echo changed > /data/f");
    assert_eq!(
        out.lines().next(),
        Some("original"),
        "clone content:\n{out}"
    );
    let out = docker(&["exec", &holder, "cat", "/data/f"]);
    assert_eq!(
        out.stdout.trim(),
        "original",
        "a write to the clone changed the source:\n{out}"
    );
    docker_ok(&["exec", &holder, "sh", "-c", "echo source-later > /data/g"]);
    let out = env.run_sh_ok(&["-v", &d], "cat /data/f; test ! -e /data/g && echo no-g");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["changed", "no-g"],
        "{out}"
    );

    // from=VOL@SNAPSHOT: a snapshot taken while the container writes, then a clone of it.
    env.d()
        .cli_ok(&["snapshot", "create", &src, "--name", "snap1"]);
    docker_ok(&["exec", &holder, "sh", "-c", "echo after-snapshot > /data/f"]);
    let info = env.inspect(&src);
    assert_eq!(info["Status"]["snapshots"], json!(["snap1"]), "{info}");
    let dst2 = env.volume("dst2");
    let from_snap = format!("from={src}@snap1");
    env.create_ok(&dst2, &[from_snap.as_str()]);
    let d2 = format!("{dst2}:/data");
    let out = env.run_sh_ok(&["-v", &d2], "cat /data/f /data/g");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["original", "source-later"],
        "clone of {src}@snap1:\n{out}"
    );
    let out = env.create(&env.volume("dst3"), &[&format!("from={src}@nope")]);
    assert!(
        !out.success() && out.stderr.contains("nope"),
        "from= a missing snapshot:\n{out}"
    );
}

/// Two containers hold one volume; stopping one leaves the other working and drops the count.
#[test]
fn mounts_are_reference_counted() {
    let img = image();
    let mut env = DockerEnv::start("refs");
    let vol = env.volume("shared");
    env.create_ok(&vol, &[]);
    let v = format!("{vol}:/data");
    let c1 = env.run_detached("c1", &["-v", &v], img, "exec sleep 300");
    env.wait_references(&vol, 1);
    let c2 = env.run_detached("c2", &["-v", &v], img, "exec sleep 300");
    env.wait_references(&vol, 2);
    let got = env.plugin_get(&vol);
    assert!(
        !got["Mountpoint"].as_str().unwrap_or("").is_empty(),
        "Get of a held volume has no Mountpoint: {got}"
    );
    let info = env.inspect(&vol);
    assert_eq!(
        info["Status"]["docker_references"],
        json!(2),
        "docker volume inspect: {info}"
    );

    docker_ok(&["exec", &c1, "sh", "-c", "echo one > /data/a"]);
    docker_ok(&["stop", "-t", "1", &c1]);
    env.wait_references(&vol, 1);

    let out = docker_ok(&[
        "exec",
        &c2,
        "sh",
        "-c",
        "cat /data/a && echo two > /data/b && cat /data/b && ls /data",
    ]);
    assert_eq!(
        out.stdout, "one\ntwo\na\nb\n",
        "the remaining container after the other stopped"
    );

    // The first container can start again and sees the second's write.
    docker_ok(&["start", &c1]);
    env.wait_references(&vol, 2);
    let out = docker_ok(&["exec", &c1, "cat", "/data/b"]);
    assert_eq!(out.stdout, "two\n");

    docker_ok(&["rm", "-f", &c1, &c2]);
    env.wait_references(&vol, 0);
    let got = env.plugin_get(&vol);
    assert_eq!(
        got["Mountpoint"].as_str().unwrap_or(""),
        "",
        "Get of an unheld volume still has a Mountpoint: {got}"
    );
    // Data is still there for the next container.
    assert_eq!(
        env.run_sh_ok(&["-v", &v], "cat /data/a /data/b"),
        "one\ntwo\n"
    );

    // References are persisted: a graceful daemon restart while a container holds the volume
    // keeps the count (and Remove refused); the container's removal then drops it. (The held
    // container's own FUSE mount does not survive the restart; only the count is checked.)
    let c3 = env.run_detached("c3", &["-v", &v], img, "exec sleep 300");
    env.wait_references(&vol, 1);
    env.d_mut().restart();
    assert_eq!(
        env.references(&vol),
        1,
        "docker_references after a daemon restart"
    );
    let (status, r) = env.plugin("/VolumeDriver.Remove", &json!({ "Name": vol }));
    assert!(
        status != 200,
        "VolumeDriver.Remove of a held volume after a restart: HTTP {status}: {r}"
    );
    let got = env.plugin_get(&vol);
    assert!(
        !got["Mountpoint"].as_str().unwrap_or("").is_empty(),
        "Get of a held volume after a restart has no Mountpoint: {got}"
    );
    assert_eq!(
        env.run_sh_ok(&["-v", &v], "cat /data/b"),
        "two\n",
        "a new container after the restart"
    );
    docker_ok(&["rm", "-f", &c3]);
    env.wait_references(&vol, 0);
    let out = docker(&["volume", "rm", &vol]);
    assert!(
        out.success(),
        "docker volume rm after all containers are gone:\n{out}\ndaemon log:\n{}",
        env.d().log()
    );
    assert!(
        !env.daemon_volumes().contains(&vol),
        "the daemon still has {vol} after docker volume rm"
    );
}

/// A volfs mountpoint made through the control API, bind-mounted into a container.
#[test]
fn bind_mount_of_a_volfs_mountpoint() {
    let img = image();
    let env = DockerEnv::start("bind");
    let name = format!("{}-hostvol", env.prefix);
    let dir = env.d().volume_mounted(&name, &[]);
    std::fs::write(dir.join("file"), "from the host\n").unwrap();
    let bind = format!("{}:/data", dir.display());
    assert_eq!(
        env.run_sh_ok(&["-v", &bind], "cat /data/file"),
        "from the host\n"
    );
    env.run_sh_ok(&["-v", &bind], "echo from the container > /data/back");
    assert_eq!(
        std::fs::read_to_string(dir.join("back")).unwrap(),
        "from the container\n",
        "the host sees the container's write"
    );

    let bind_ro = format!("{}:/data:ro", dir.display());
    let out = env.run_sh(
        &["-v", &bind_ro],
        img,
        "cat /data/file; echo x > /data/file2",
    );
    assert_run_fails_with(
        &out,
        "Read-only file system",
        "write under a :ro bind mount of a volfs mountpoint",
    );
    assert_eq!(out.stdout, "from the host\n", "{out}");
    assert!(
        !dir.join("file2").exists(),
        "the :ro bind mount let a write through"
    );
    // The host mount itself is still writable.
    std::fs::write(dir.join("file3"), "ok").unwrap();
}

/// Four containers append to one file under flock at the same time: no line lost or doubled.
#[test]
fn concurrent_appends_under_flock() {
    let img = image();
    let fimg = flock_image();
    let env = DockerEnv::start("flock");
    let vol = env.volume("log");
    env.create_ok(&vol, &[]);
    let v = format!("{vol}:/data");
    // Sanity: flock works in the image at all.
    let out = env.run_sh(&["-v", &v], fimg, "flock /data/log.lock true && echo ok");
    assert!(
        out.success() && out.stdout == "ok\n",
        "flock in {fimg}:\n{out}"
    );

    let script = r#"while [ ! -e /data/go ]; do sleep 0.05; done
for i in $(seq 500); do flock /data/log.lock sh -c "echo c$N $i >> /data/app.log" || exit 1; done"#;
    let mut names = Vec::new();
    for n in 1..=4 {
        let e = format!("N={n}");
        names.push(env.run_detached(&format!("w{n}"), &["-e", &e, "-v", &v], fimg, script));
    }
    // Start all four at once.
    env.run_sh_ok(&["-v", &v], "touch /data/go");
    for c in &names {
        let out = docker_t(&["wait", c], LONG_TIMEOUT);
        assert!(out.success(), "docker wait {c}:\n{out}");
        let logs = docker(&["logs", c]);
        assert_eq!(
            out.stdout.trim(),
            "0",
            "container {c} exited with {}:\n{logs}",
            out.stdout.trim()
        );
    }

    let out = env.run_sh(&["-v", &v], img, "cat /data/app.log");
    assert!(out.success(), "reading the log:\n{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let mut seen: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut last: BTreeMap<u32, u32> = BTreeMap::new();
    for l in &lines {
        let parsed = l
            .strip_prefix('c')
            .and_then(|r| r.split_once(' '))
            .and_then(|(c, i)| Some((c.parse::<u32>().ok()?, i.parse::<u32>().ok()?)));
        let Some((c, i)) = parsed else {
            panic!("malformed log line {l:?}")
        };
        *seen.entry((c, i)).or_default() += 1;
        let prev = last.insert(c, i).unwrap_or(0);
        assert!(
            i > prev,
            "container {c}'s lines out of order: {i} after {prev}"
        );
    }
    let dups: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| *k)
        .collect();
    let missing: Vec<_> = (1..=4)
        .flat_map(|c| (1..=500).map(move |i| (c, i)))
        .filter(|k| !seen.contains_key(k))
        .collect();
    assert!(
        dups.is_empty() && missing.is_empty() && lines.len() == 2000,
        "{} lines; duplicated: {:?}; missing ({}): {:?}",
        lines.len(),
        &dups[..dups.len().min(20)],
        missing.len(),
        &missing[..missing.len().min(20)]
    );
}

/// A non-root container user writes where it owns the directory and is refused elsewhere.
#[test]
fn non_root_container_user() {
    let img = image();
    let env = DockerEnv::start("uid");
    let vol = env.volume("perm");
    env.create_ok(&vol, &[]);
    let v = format!("{vol}:/data");
    let out = env.run_sh_ok(
        &["-v", &v],
        "mkdir /data/user /data/rootdir && chown 1000:1000 /data/user && chmod 0755 /data/rootdir && stat -c '%u:%g %a' /data/user /data/rootdir",
    );
    assert_eq!(out, "1000:1000 755\n0:0 755\n");

    let out = env.run_sh_ok(
        &["--user", "1000:1000", "-v", &v],
        "id -u; echo mine > /data/user/f && mkdir /data/user/sub && stat -c '%u:%g' /data/user/f /data/user/sub && cat /data/user/f",
    );
    assert_eq!(out, "1000\n1000:1000\n1000:1000\nmine\n");

    let out = env.run_sh(
        &["--user", "1000:1000", "-v", &v],
        img,
        "echo x > /data/rootdir/f",
    );
    assert_run_fails_with(
        &out,
        "Permission denied",
        "uid 1000 creating a file in a root-owned 0755 dir",
    );
    let out = env.run_sh(
        &["--user", "1000:1000", "-v", &v],
        img,
        "mkdir /data/rootdir/d",
    );
    assert_run_fails_with(
        &out,
        "Permission denied",
        "uid 1000 making a dir in a root-owned 0755 dir",
    );
    let out = env.run_sh(
        &["--user", "1000:1000", "-v", &v],
        img,
        "rm /data/user/f && touch /data/rootdir",
    );
    assert_run_fails_with(
        &out,
        "Permission denied",
        "uid 1000 touching a root-owned dir",
    );

    // Nothing leaked into rootdir; root still writes there; uid 1000's own delete worked.
    assert_eq!(env.run_sh_ok(&["-v", &v], "ls -A /data/rootdir; ls -A /data/user; echo r > /data/rootdir/f && cat /data/rootdir/f"), "sub\nr\n");
}

/// The volume's size limit is what a container sees in df and hits as ENOSPC.
#[test]
fn size_limit_inside_a_container() {
    let img = image();
    let env = DockerEnv::start("size");
    let vol = env.volume("small");
    env.create_ok(&vol, &["size=1M"]);
    let v = format!("{vol}:/data");
    let out = env.run_sh_ok(&["-v", &v], "df -kP /data | tail -n 1");
    let total: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        total.get(1).copied(),
        Some("1024"),
        "df -k of a size=1M volume: {out}"
    );

    let out = env.run_sh(
        &["-v", &v],
        img,
        "dd if=/dev/zero of=/data/big bs=65536 count=32 conv=fsync",
    );
    assert_run_fails_with(
        &out,
        "No space left on device",
        "writing 2 MiB into a size=1M volume",
    );
    // Space comes back after a delete.
    env.run_sh_ok(
        &["-v", &v],
        "rm /data/big && dd if=/dev/zero of=/data/small bs=65536 count=8 conv=fsync",
    );
}

/// A container appends and fsyncs records through a plugin volume, holding the file open,
/// while the daemon's server process is killed five times (issue 8): the container never sees
/// an error and every record is there.
#[test]
fn container_keeps_writing_across_server_kills() {
    let img = image();
    let env = DockerEnv::start("survive");
    let vol = env.volume("survive");
    env.create_ok(&vol, &[]);
    let v = format!("{vol}:/data");
    let script = "exec 3>>/data/log; i=0; \
        while [ $i -lt 300 ]; do \
          echo \"record $i\" >&3 || { echo \"write $i failed\" > /data/fail; exit 1; }; \
          sync -d /data/log || { echo \"fsync $i failed\" > /data/fail; exit 2; }; \
          i=$((i+1)); usleep 5000; \
        done; exec 3>&-; echo done > /data/done";
    let name = env.run_detached("writer", &["-v", &v], img, script);
    let mut gaps = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        gaps.push(env.d().kill_server());
    }
    let out = docker_t(&["wait", &name], LONG_TIMEOUT);
    assert_eq!(
        out.stdout.trim(),
        "0",
        "the container failed across the restarts ({gaps:?}):\n{}\nlogs:\n{}\ndaemon log:\n{}",
        out,
        docker(&["logs", &name]),
        env.d().log()
    );
    let log = env.run_sh_ok(&["-v", &v], "cat /data/done /data/log; ls /data");
    let want: String = std::iter::once("done\n".to_string())
        .chain((0..300).map(|i| format!("record {i}\n")))
        .collect();
    assert!(log.starts_with(&want), "records lost or reordered:\n{log}");
    assert!(!log.contains("fail"), "{log}");
}
