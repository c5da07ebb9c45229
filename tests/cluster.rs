//! Cluster mode against a real etcd (Debian's etcd-server) and real daemons: ownership,
//! replicas, fencing on a partition, promote, and a server restart that keeps the lease.
mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use etcd::Etcd;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[track_caller]
fn must(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a veth pair: `host_ip` on the host side, `ns_ip` inside.
struct Netns {
    name: String,
    veth: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn new() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let sub = (std::process::id() as usize * 7 + n) % 200 + 20;
        let ns = Netns {
            name: format!("volfs-ct{tag}"),
            veth: format!("vct{tag}h"),
            host_ip: format!("10.232.{sub}.1"),
            ns_ip: format!("10.232.{sub}.2"),
        };
        let peer = format!("vct{tag}n");
        must(&["ip", "netns", "add", &ns.name]);
        must(&[
            "ip", "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ]);
        must(&["ip", "link", "set", &peer, "netns", &ns.name]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.host_ip),
            "dev",
            &ns.veth,
        ]);
        must(&["ip", "link", "set", &ns.veth, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &ns.name];
            a.extend_from_slice(args);
            must(&a);
        };
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.ns_ip),
            "dev",
            &peer,
        ]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A script that runs volfs-mountd in this namespace's network only (same mounts, same
    /// pid: nsenter execs).
    fn wrapper(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("mountd-in-{}", self.name));
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(
            f,
            "#!/bin/sh\nexec nsenter --net=/run/netns/{} {} \"$@\"",
            self.name,
            bin("volfs-mountd").display()
        )
        .unwrap();
        drop(f);
        must(&["chmod", "755", p.to_str().unwrap()]);
        p
    }

    fn link(&self, up: bool) {
        must(&[
            "ip",
            "link",
            "set",
            &self.veth,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&["ip", "link", "del", &self.veth]);
        sh(&["ip", "netns", "del", &self.name]);
    }
}

fn cluster_env<'a>(endpoint: &'a str, host: &'a str, ttl: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("VOLFS_ETCD_ENDPOINTS", endpoint),
        ("VOLFS_HOST_NAME", host),
        ("VOLFS_LEASE_TTL_SECS", ttl),
    ]
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn single_host_cluster_status_says_so() {
    let d = Daemon::start();
    let out = d.cli_ok(&["cluster", "status"]);
    assert!(out.stdout.contains("single host"), "{out}");
    let st = d.status();
    assert_eq!(st["cluster"], "single host");
    // Replicas need peers.
    let out = d.cli(&["volume", "create", "x", "--opt", "replicas=1"]);
    assert!(
        !out.success() && out.stderr.contains("single host"),
        "{out}"
    );
}

#[test]
fn ownership_replica_partition_promote_restart() {
    const TTL: u64 = 4;
    let ns = Netns::new();
    let etcd = Etcd::start(None, &["127.0.0.1", &ns.host_ip]);
    let url_a = etcd.url(&ns.host_ip);
    let url_b = etcd.url("127.0.0.1");
    let ttl = TTL.to_string();
    let wrapdir = tempfile::tempdir().unwrap();
    let a = Daemon::start_with_exe(&cluster_env(&url_a, "a", &ttl), ns.wrapper(wrapdir.path()));
    let b = Daemon::start_with_env(&cluster_env(&url_b, "b", &ttl));

    // Ownership: A creates v; B cannot.
    wait_for("both hosts in etcd", Duration::from_secs(10), || {
        let s = a.cli_ok(&["cluster", "status", "--json"]).json();
        s["connected"] == true && s["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });
    a.cli_ok(&["volume", "create", "v", "--opt", "replicas=1"]);
    let info = a.inspect("v").unwrap();
    assert_eq!(info["owner"], "a", "{info}");
    let t1 = info["token"].as_i64().expect("a token");
    assert_eq!(info["replicas"], serde_json::json!(["b"]), "{info}");
    let out = b.cli(&["volume", "create", "v"]);
    assert!(!out.success() && out.stderr.contains("host a"), "{out}");
    // Volumes Docker creates through the plugin are claimed the same way.
    let plugin_create = |name: &str| {
        let body = serde_json::json!({"Name": name, "Opts": {}}).to_string();
        let (status, reply) =
            unix_http_post(&b.plugin_socket(), "/VolumeDriver.Create", body.as_bytes()).unwrap();
        (status, String::from_utf8_lossy(&reply).into_owned())
    };
    let (status, reply) = plugin_create("dv");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(b.inspect("dv").unwrap()["owner"], "b");
    let (status, reply) = plugin_create("v");
    assert!(
        status != 200 && reply.contains("host a"),
        "{status} {reply}"
    );
    for d in [&a, &b] {
        let out = d.cli_ok(&["cluster", "status"]).stdout;
        assert!(
            out.contains("HOST") && out.contains("a ") && out.contains("b "),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("v ") && l.contains(" a ") && l.contains(&t1.to_string())),
            "{out}"
        );
    }

    // B gets a copy (backup/restore) that is a replica: read-only mounts only.
    let mp = a.mount("v", false);
    std::fs::write(mp.join("before"), b"hello").unwrap();
    let repo = a.fresh_dir("repo");
    a.cli_ok(&[
        "backup",
        "v",
        "--to",
        repo.to_str().unwrap(),
        "--name",
        "b1",
    ]);
    b.cli_ok(&["restore", repo.to_str().unwrap(), "b1", "v"]);
    let ro = b.mount("v", true);
    assert_eq!(std::fs::read(ro.join("before")).unwrap(), b"hello");
    let target = b.fresh_dir("rw");
    let out = b.cli(&["mount", "v", target.to_str().unwrap()]);
    assert!(
        !out.success() && out.stderr.contains("host a owns it"),
        "{out}"
    );

    // A restart of A's server keeps its lease and ownership.
    a.kill_server();
    let info = a.inspect("v").unwrap();
    assert_eq!(
        (info["owner"].as_str(), info["token"].as_i64()),
        (Some("a"), Some(t1))
    );
    let out = b.cli(&["volume", "promote", "v"]);
    assert!(!out.success() && out.stderr.contains("host a"), "{out}");
    wait_for(
        "A writable after its restart",
        Duration::from_secs(5),
        || std::fs::write(mp.join("after-restart"), b"x").is_ok(),
    );
    assert!(a.log().contains("kept its lease"), "{}", a.log());

    // Partition: a writer appends and fsyncs; A is cut off from etcd.
    let path = mp.join("log");
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut acked: Vec<Instant> = Vec::new();
        loop {
            let r = f
                .write_all(format!("record {}\n", acked.len()).as_bytes())
                .and_then(|_| f.sync_all());
            match r {
                Ok(()) => acked.push(Instant::now()),
                Err(e) => return (acked, Instant::now(), e.raw_os_error()),
            }
            std::thread::sleep(Duration::from_millis(20));
            if acked.len() > 100_000 {
                return (acked, Instant::now(), None);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let t_cut = Instant::now();
    ns.link(false);

    // B's promote is refused while A's lease lives, then succeeds.
    let mut refusals = 0;
    let (t_promoted, promoted) = loop {
        let out = b.cli(&["volume", "promote", "v"]);
        if out.success() {
            break (Instant::now(), out.stdout);
        }
        assert!(out.stderr.contains("host a"), "{out}");
        refusals += 1;
        assert!(
            t_cut.elapsed() < Duration::from_secs(3 * TTL),
            "no promote: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (acked, t_failed, errno) = writer.join().unwrap();
    assert_eq!(errno, Some(libc::EROFS), "the writer's error");
    let fenced_after = t_failed.duration_since(t_cut);
    let promoted_after = t_promoted.duration_since(t_cut);
    eprintln!(
        "timing: cut -> A fenced (first EROFS) {fenced_after:?}; cut -> B promoted {promoted_after:?}; {refusals} promote refusals; {} records acknowledged",
        acked.len()
    );
    assert!(refusals > 0);
    assert!(
        fenced_after <= Duration::from_millis(TTL * 500 + 1500),
        "fenced {fenced_after:?} after the cut"
    );
    assert!(t_failed < t_promoted, "B was writable before A was fenced");
    let last_ack = *acked.last().expect("records before the cut");
    assert!(last_ack < t_failed && last_ack < t_promoted);
    // The lease lapsed at least TTL - TTL/3 after the cut (the last keep-alive was before it).
    assert!(promoted_after >= Duration::from_millis(TTL * 1000 * 2 / 3));
    assert!(promoted.contains("token"), "{promoted}");
    let info = b.inspect("v").unwrap();
    assert_eq!(info["owner"], "b");
    let t2 = info["token"].as_i64().unwrap();
    assert!(t2 > t1, "token {t2} after {t1}");
    // B writes now.
    b.unmount(&ro).unwrap();
    let rw = b.mount("v", false);
    wait_for("B writable after promote", Duration::from_secs(3), || {
        std::fs::write(rw.join("from-b"), b"b").is_ok()
    });

    // A comes back: it does not regain v.
    ns.link(true);
    wait_for("A sees B's ownership", Duration::from_secs(15), || {
        a.inspect("v").unwrap()["owner"] == "b"
    });
    let info = a.inspect("v").unwrap();
    assert_eq!(info["token"].as_i64(), Some(t2));
    assert!(
        a.log().contains("host b owns the volume now"),
        "{}",
        a.log()
    );
    let e = std::fs::write(mp.join("late"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    // Every acknowledged record is in A's copy.
    let text = std::fs::read_to_string(mp.join("log")).unwrap();
    assert!(
        text.lines().count() >= acked.len(),
        "{} < {}",
        text.lines().count(),
        acked.len()
    );
    a.unmount(&mp).unwrap();
    b.unmount(&rw).unwrap();
}
