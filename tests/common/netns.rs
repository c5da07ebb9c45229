//! Network namespaces for multi-daemon tests: `n` namespaces joined pairwise by veth pairs
//! with private addresses (10.231.K.1/2, one /24 per pair) that exist only inside those
//! namespaces, removed (with the veths) on drop; daemons started in them join only the
//! network namespace, so their FUSE mounts stay visible to the test. Also the cluster key
//! helpers and log waits that peer tests share. Include with
//! `#[path = "common/netns.rs"] mod netns;` next to `mod common;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

static NEXT_NET: AtomicUsize = AtomicUsize::new(0);

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` network namespaces, each pair joined by a veth pair. Removed on drop (with the veths).
pub struct Net {
    pub ns: Vec<String>,
    /// (i, j, k): namespaces i < j on subnet 10.231.k.0/24 (i has .1, j has .2).
    pub links: Vec<(usize, usize, usize)>,
}

impl Net {
    pub fn new(n: usize) -> Net {
        let tag = format!(
            "{:x}{:x}",
            std::process::id() % 0x10000,
            NEXT_NET.fetch_add(1, Ordering::SeqCst)
        );
        let mut net = Net {
            ns: Vec::new(),
            links: Vec::new(),
        };
        for i in 0..n {
            let ns = format!("volfs-peers-{tag}-{i}");
            ip(&["netns", "add", &ns]);
            net.ns.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let mut k = 1;
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (format!("vp{tag}{i}{j}a"), format!("vp{tag}{i}{j}b"));
                ip(&[
                    "link", "add", &a, "netns", &net.ns[i], "type", "veth", "peer", "name", &b,
                    "netns", &net.ns[j],
                ]);
                for (ns, dev, host) in [(&net.ns[i], &a, 1), (&net.ns[j], &b, 2)] {
                    ip(&[
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("10.231.{k}.{host}/24"),
                        "dev",
                        dev,
                    ]);
                    ip(&["-n", ns, "link", "set", dev, "up"]);
                }
                net.links.push((i, j, k));
                k += 1;
            }
        }
        net
    }

    /// The address of namespace `to` as seen from namespace `from`.
    pub fn ip_of(&self, from: usize, to: usize) -> String {
        let &(i, _, k) = self
            .links
            .iter()
            .find(|(i, j, _)| (*i, *j) == (from.min(to), from.max(to)))
            .expect("no link");
        format!("10.231.{k}.{}", if to == i { 1 } else { 2 })
    }

    pub fn peer_addr(&self, from: usize, to: usize) -> String {
        format!("{}:9568", self.ip_of(from, to))
    }

    /// Runs `f` on a thread inside namespace `i`.
    pub fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns[i]);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on an fd we own; affects this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// GET /metrics of a daemon in namespace `i`.
    pub fn metrics(&self, i: usize, d: &Daemon) -> String {
        let addr = d.metrics_addr();
        self.run_in(i, move || http_get(&addr, "/metrics"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The value of a counter in an OpenMetrics text.
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

pub fn keygen() -> String {
    let out = run_with_timeout(
        Command::new(bin("volfs")).args(["peer", "keygen"]),
        Duration::from_secs(10),
    );
    assert!(out.success(), "volfs peer keygen: {}", out.stderr);
    let k = out.stdout.trim().to_string();
    assert_eq!(k.len(), 64, "{k}");
    assert!(k.chars().all(|c| c.is_ascii_hexdigit()), "{k}");
    k
}

pub fn key_bytes(hex: &str) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    k
}

/// A key file in a fresh temp dir (kept while the returned guard lives).
pub fn key_file(hex: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("peer.key");
    std::fs::write(&p, format!("{hex}\n")).unwrap();
    (dir, p)
}

pub fn daemon(net: &Net, i: usize, key: &Path) -> Daemon {
    let key = key.display().to_string();
    Daemon::start_in_netns(&net.ns[i], &[("VOLFS_PEER_KEY_FILE", key.as_str())])
}

pub fn peers_json(d: &Daemon) -> Vec<serde_json::Value> {
    d.cli_ok(&["peer", "ls", "--json"])
        .json()
        .as_array()
        .cloned()
        .unwrap()
}

pub fn wait_for_log(d: &Daemon, what: &str) {
    for _ in 0..100 {
        if d.log().contains(what) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the daemon log never said {what:?}:\n{}", d.log());
}

impl Net {
    /// Sets every veth of namespace `i` down or up (cuts or restores its links).
    pub fn set_links(&self, i: usize, up: bool) {
        let out = Command::new("ip")
            .args(["-n", &self.ns[i], "-o", "link", "show"])
            .output()
            .expect("running ip");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for line in text.lines() {
            let Some(name) = line.split(':').nth(1).map(|s| s.trim()) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with("vp") {
                ip(&[
                    "-n",
                    &self.ns[i],
                    "link",
                    "set",
                    "dev",
                    name,
                    if up { "up" } else { "down" },
                ]);
            }
        }
    }
}

impl Net {
    /// Sets the veth between namespaces `i` and `j` down or up (cuts or restores that one
    /// link; the others stay as they are).
    pub fn set_link(&self, i: usize, j: usize, up: bool) {
        let (i, j) = (i.min(j), i.max(j));
        let out = Command::new("ip")
            .args(["-n", &self.ns[i], "-o", "link", "show"])
            .output()
            .expect("running ip");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let suffix = format!("{i}{j}a");
        let mut hit = false;
        for line in text.lines() {
            let Some(name) = line.split(':').nth(1).map(|s| s.trim()) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with("vp") && name.ends_with(&suffix) {
                ip(&[
                    "-n",
                    &self.ns[i],
                    "link",
                    "set",
                    "dev",
                    name,
                    if up { "up" } else { "down" },
                ]);
                hit = true;
            }
        }
        assert!(hit, "no veth between namespaces {i} and {j}");
    }
}

/// Polls `f` every 200 ms until it returns `None`; panics after `timeout` with the last
/// thing it returned.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        match f() {
            None => return,
            Some(s) => last = s,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
}

/// Waits until B holds replica `vol` at snapshot `snap`.
pub fn wait_replica(b: &Daemon, vol: &str, snap: &str, timeout: Duration) {
    wait_until(&format!("replica {vol}@{snap}"), timeout, || {
        match b.inspect(vol) {
            Ok(v) if v["replica_snapshot"] == snap => None,
            Ok(v) => Some(v.to_string()),
            Err(e) => Some(e.to_string()),
        }
    });
}
