//! One real etcd member (Debian's `etcd`) for cluster tests, removed with its data dir on
//! drop. Include with `#[path = "common/etcd.rs"] mod etcd;` next to `mod common;`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Child,
    dir: PathBuf,
    port: u16,
}

/// A port nobody listens on at 127.0.0.1 now.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cmd` run inside network namespace `ns`, or as it is.
fn inside(ns: Option<&str>, cmd: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, cmd]);
            c
        }
        None => Command::new(cmd),
    }
}

impl Etcd {
    /// Starts etcd listening for clients on each of `ips` and on 127.0.0.1, inside network
    /// namespace `ns` if given (a fresh namespace has the usual ports free; otherwise free
    /// ones are picked), and waits until it is healthy.
    pub fn start(ns: Option<&str>, ips: &[&str]) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("volfs-etcd.")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let (port, peer) = match ns {
            Some(_) => (2379, 2380),
            None => (free_port(), free_port()),
        };
        // Advertised: the first of `ips`; 127.0.0.1 is always listened on (health checks).
        let mut clients: Vec<String> = ips.iter().map(|ip| format!("http://{ip}:{port}")).collect();
        let local = format!("http://127.0.0.1:{port}");
        if !clients.contains(&local) {
            clients.push(local.clone());
        }
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let child = inside(ns, "etcd")
            .args(["--name", "t"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &clients.join(",")])
            .args(["--advertise-client-urls", &clients[0]])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting etcd");
        let e = Etcd { child, dir, port };
        let t0 = Instant::now();
        loop {
            let healthy = inside(ns, "etcdctl")
                .args(["--endpoints", &local, "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if healthy {
                return e;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URL at `ip`.
    pub fn url(&self, ip: &str) -> String {
        format!("http://{ip}:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
