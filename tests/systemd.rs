//! volfs-mountd under a real systemd service manager (issue 8): the packaged unit file, with
//! the daemon's connections and write logs parked in the service's file descriptor store.
//! `systemctl restart` and a SIGKILL of every process of the service keep every mount, open
//! file and lock; `systemctl stop` ends them.
//!
//! The manager is systemd 252's own binary from Debian, run as a user instance (`systemd
//! --user`) as root, in a mount namespace of its own in which `/run/systemd/system` exists
//! (systemd refuses to run otherwise on a machine not booted with it). The test's temp dir
//! is a shared bind mount, so the FUSE mounts the service makes there are seen by the test.
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const UNIT: &str = "volfs-mountd.service";

/// A systemd user manager running the packaged volfs-mountd unit on a test daemon's dirs.
struct Systemd {
    manager: Child,
    xdg: PathBuf,
    d: Daemon,
}

impl Systemd {
    fn start() -> Systemd {
        let d = Daemon::prepare();
        let root = d.root.clone();
        // The temp dir becomes a shared mount: mounts the manager's namespace makes under it
        // are propagated to ours.
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "mount --bind {0} {0} && mount --make-shared {0}",
                root.display()
            ))
            .status()
            .unwrap();
        assert!(st.success(), "making {} a shared mount", root.display());
        let xdg = root.join("xdg");
        let units = root.join("config/systemd/user");
        fs::create_dir_all(&xdg).unwrap();
        fs::create_dir_all(&units).unwrap();
        let packaged = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/volfs-mountd.service"),
        )
        .unwrap();
        let exec = format!(
            "ExecStart={} --config {} --data-dir {} --run-dir {} --socket {}",
            bin("volfs-mountd").display(),
            d.config.display(),
            d.data.display(),
            d.run.display(),
            d.socket.display()
        );
        let unit: Vec<String> = packaged
            .lines()
            .map(|l| {
                if l.starts_with("ExecStart=") {
                    exec.clone()
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert!(unit.contains(&exec), "the packaged unit has no ExecStart");
        fs::write(units.join(UNIT), unit.join("\n")).unwrap();
        // Test-only settings in a drop-in: logs into the test's daemon log, no global sockets.
        let dropin = units.join(format!("{UNIT}.d"));
        fs::create_dir_all(&dropin).unwrap();
        fs::write(
            dropin.join("test.conf"),
            format!(
                "[Service]\nStandardOutput=append:{log}\nStandardError=append:{log}\n\
                 Environment=RUST_LOG=info NO_COLOR=1 VOLFS_METRICS_LISTEN=127.0.0.1:0 VOLFS_PLUGIN_SOCKET={plugin}\n\
                 RestartSec=200ms\n",
                log = d.log_path.display(),
                plugin = d.plugin_socket().display()
            ),
        )
        .unwrap();
        let manager = Command::new("unshare")
            .args(["-m", "--propagation", "unchanged", "sh", "-c"])
            .arg(
                "mount -t tmpfs tmpfs /run/systemd && mkdir -p /run/systemd/system \
                 && exec /lib/systemd/systemd --user --log-target=console",
            )
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env("HOME", &root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(root.join("manager.log")).unwrap())
            .spawn()
            .expect("starting systemd --user");
        let s = Systemd { manager, xdg, d };
        let t0 = Instant::now();
        while !s
            .systemctl_try(&["is-system-running"])
            .1
            .contains("running")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "systemd --user did not come up: {}",
                fs::read_to_string(root.join("manager.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s.systemctl(&["start", UNIT]);
        s.wait_server(None);
        s
    }

    /// `systemctl --user ARGS` in the manager's namespace: (success, stdout).
    fn systemctl_try(&self, args: &[&str]) -> (bool, String) {
        let out = run_with_timeout(
            Command::new("nsenter")
                .arg("-t")
                .arg(self.manager.id().to_string())
                .args(["-m", "--", "systemctl", "--user", "--no-pager"])
                .args(args)
                .env("XDG_RUNTIME_DIR", &self.xdg),
            Duration::from_secs(60),
        );
        (out.success(), out.stdout.clone())
    }

    fn systemctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.systemctl_try(args);
        assert!(
            ok,
            "systemctl --user {args:?} failed: {out}\ndaemon log:\n{}",
            self.d.log()
        );
        out
    }

    fn property(&self, name: &str) -> String {
        self.systemctl(&["show", UNIT, "-p", name, "--value"])
            .trim()
            .to_string()
    }

    /// Waits until the API answers from a server other than `old`; returns its pid.
    fn wait_server(&self, old: Option<u64>) -> u64 {
        let client = self.d.client().with_timeout(Duration::from_secs(2));
        let t0 = Instant::now();
        loop {
            if let Ok(v) = client.get::<Value>("/v1/status") {
                if let Some(p) = v["server_pid"].as_u64().filter(|p| Some(*p) != old) {
                    return p;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no new server within 20 s; status:\n{}\nmanager:\n{}\nlog:\n{}",
                self.systemctl_try(&["status", UNIT]).1,
                fs::read_to_string(self.d.root.join("manager.log")).unwrap_or_default(),
                self.d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        let _ = self.systemctl_try(&["stop", UNIT]);
        kill(self.manager.id(), libc::SIGTERM);
        if wait_timeout(&mut self.manager, Duration::from_secs(10)).is_none() {
            let _ = self.manager.kill();
            let _ = self.manager.wait();
        }
        // The Daemon then unmounts everything under its temp dir, the shared bind included.
    }
}

#[test]
fn restart_and_a_killed_service_keep_mounts_open_files_and_locks() {
    let s = Systemd::start();
    let d = &s.d;
    let m = d.volume_mounted("sd", &[]);
    fs::write(m.join("numbers"), b"0123456789").unwrap();
    let mut reader = File::open(m.join("numbers")).unwrap();
    let mut head = [0u8; 3];
    reader.read_exact(&mut head).unwrap();
    let lock = File::create(m.join("lock")).unwrap();
    // SAFETY: flock on an open fd.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    assert_eq!(try_flock(&m.join("lock")), Some(9), "flock not held");
    let path = m.join("counter.log");
    let (stop, writer) = start_writer(&path);
    // One connection and one write log parked in the fd store.
    assert_eq!(s.property("NFileDescriptorStore"), "2");

    let mut pid = s.wait_server(None);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        s.systemctl(&["restart", UNIT]);
        pid = s.wait_server(Some(pid));
        assert!(is_volfs_mount(&m), "round {round}: the mount went away");
    }
    // Every process of the service at once, supervisor included: systemd restarts it
    // (Restart=on-failure) with the connections from its fd store.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        s.systemctl(&["kill", "-s", "SIGKILL", UNIT]);
        pid = s.wait_server(Some(pid));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let acked = writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the writer saw an error: {e}\nlog:\n{}", d.log()));
    assert!(acked > 10, "only {acked} records");
    let want: Vec<u64> = (0..acked).collect();
    assert_eq!(records(&fs::read_to_string(&path).unwrap()), want);
    assert_eq!(try_flock(&m.join("lock")), Some(9), "the flock was lost");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"3456789", "the read position moved");
    let mut w = OpenOptions::new()
        .append(true)
        .open(m.join("numbers"))
        .unwrap();
    w.write_all(b"!").unwrap();
    w.sync_all().unwrap();
    drop((w, reader, lock));
    assert_eq!(try_flock(&m.join("lock")), Some(0), "unlock not seen");
    let log = d.log();
    assert!(log.contains("leaving the mounts to its fd store"), "{log}");
    assert!(log.contains("systemd handed back"), "{log}");

    // A stop is a stop: the mounts end and the fd store is emptied.
    s.systemctl(&["stop", UNIT]);
    assert!(!is_volfs_mount(&m), "the mount outlived systemctl stop");
    assert_eq!(s.property("NFileDescriptorStore"), "0");
    // And the next start brings the recorded mount back, with everything in it.
    s.systemctl(&["start", UNIT]);
    s.wait_server(None);
    let t0 = Instant::now();
    while !is_volfs_mount(&m) {
        assert!(t0.elapsed() < Duration::from_secs(10), "mount not restored");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(records(&fs::read_to_string(&path).unwrap()), want);
    assert_eq!(fs::read(m.join("numbers")).unwrap(), b"0123456789!");
    d.unmount(&m).unwrap();
}
