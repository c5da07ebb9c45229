//! Snapshot replication (issue 7): real daemons, each in its own network namespace, joined by
//! veths (the harness of tests/common/netns.rs). A volume with `replicas=1` ships its
//! snapshots to its peer, which holds a read-only replica that mounts and reads like the
//! origin's snapshot; later snapshots ship only new chunks; a link cut mid-transfer resumes
//! without resending what arrived; `rpo` takes and ships snapshots by itself; a receiver
//! refuses a fencing token lower than the highest it has seen.
#![allow(dead_code)]

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use netns::*;
use serde_json::Value;

/// Two daemons, A (namespace 0) with peer `b` (namespace 1).
fn pair() -> (Net, tempfile::TempDir, std::path::PathBuf, Daemon, Daemon) {
    let net = Net::new(2);
    let (kd, key) = key_file(&keygen());
    let a = daemon(&net, 0, &key);
    let b = daemon(&net, 1, &key);
    wait_for_log(&b, "peer listener");
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    (net, kd, key, a, b)
}

fn inspect(d: &Daemon, name: &str) -> Value {
    d.cli_ok(&["volume", "inspect", name]).json()[0].clone()
}

fn replica_status(a: &Daemon, vol: &str) -> Value {
    inspect(a, vol)["replication"]["peers"][0].clone()
}

fn repl_sent(net: &Net, a: &Daemon) -> f64 {
    let m = net.metrics(0, a);
    metric(&m, "volfs_replication_sent_bytes_total", &[]).unwrap_or(0.0)
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), v);
        }
    }
    out
}

fn set_xattr(p: &Path, name: &str, v: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let rc = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// Every entry under `root`: relative path -> (mode, content hash or link target, xattrs,
/// hard-link group: the first path with the same inode).
type Entry = (u32, String, BTreeMap<String, Vec<u8>>, String);

fn walk(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut inos: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut ents: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        ents.sort_by_key(|e| e.file_name());
        for e in ents {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let what = if md.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if md.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string()
            };
            let group = if md.is_file() && md.nlink() > 1 {
                inos.entry(md.ino()).or_insert_with(|| rel.clone()).clone()
            } else {
                String::new()
            };
            out.insert(rel, (md.mode(), what, xattrs(&p), group));
        }
    }
    out
}

#[test]
fn replicate_a_snapshot_and_mount_it_read_only() {
    let (_net, _kd, key, a, mut b) = pair();
    a.cli_ok(&["volume", "create", "db", "--opt", "replicas=1"]);
    let m = a.mount("db", false);
    std::fs::create_dir(m.join("dir")).unwrap();
    std::fs::set_permissions(m.join("dir"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(m.join("dir/small.txt"), b"hello replica\n").unwrap();
    std::fs::write(m.join("big.bin"), pseudo_random(3 << 20, 7)).unwrap();
    std::fs::set_permissions(m.join("big.bin"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("dir/small.txt", m.join("link")).unwrap();
    std::fs::hard_link(m.join("big.bin"), m.join("dir/hard.bin")).unwrap();
    set_xattr(&m.join("dir/small.txt"), "user.colour", b"blue");
    std::fs::write(m.join("empty"), b"").unwrap();
    a.cli_ok(&["snapshot", "create", "db", "--name", "s1"]);
    wait_replica(&b, "db", "s1", Duration::from_secs(60));

    let v = inspect(&b, "db");
    assert!(v["replica_of"].is_string(), "{v}");
    assert_eq!(v["read_only"], true, "{v}");
    let ls = b.cli_ok(&["volume", "ls"]);
    assert!(ls.stdout.contains("replica of"), "{}", ls.stdout);
    let st = replica_status(&a, "db");
    assert_eq!(st["peer"], "b", "{st}");
    assert_eq!(st["last_snapshot"], "s1", "{st}");

    let snap = a.mount("db@s1", true);
    let rm = b.mount("db", false);
    let want = walk(&snap);
    assert!(want.len() >= 6, "{want:?}");
    assert_eq!(walk(&rm), want);
    // The replica is read-only: writes fail with EROFS.
    let e = std::fs::write(rm.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::write(rm.join("big.bin"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Removing it without --force, or changing it, is refused naming the origin.
    let out = b.cli(&["volume", "rm", "db"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("replica of"), "{}", out.stderr);
    let out = b.cli(&["volume", "update", "db", "--opt", "replicas=2"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("replica of"), "{}", out.stderr);
    b.unmount(&rm).unwrap();

    // Fencing: B has seen a higher token for db; A's next shipment (token 0) is refused.
    b.stop();
    {
        let store = volfs::store::Store::open(&b.data, &Default::default()).unwrap();
        let mut batch = volfs::db::Batch::new();
        batch.put(
            volfs::db::Cf::Meta,
            volfs::replica::fence_key("db"),
            7u64.to_le_bytes().to_vec(),
        );
        store.engine.write(batch, true).unwrap();
    }
    b.start_again();
    wait_for_log(&b, "peer listener");
    std::fs::write(m.join("after-fence"), b"later").unwrap();
    a.cli_ok(&["snapshot", "create", "db", "--name", "s2"]);
    wait_until("a refused shipment", Duration::from_secs(60), || {
        let st = replica_status(&a, "db");
        let err = st["error"].as_str().unwrap_or("");
        (st["state"] == "error" && err.contains("fencing token"))
            .then_some(())
            .map_or_else(|| Some(st.to_string()), |_| None)
    });
    assert_eq!(inspect(&b, "db")["replica_snapshot"], "s1");
    drop(key);
    a.unmount(&snap).unwrap();
    a.unmount(&m).unwrap();
}

#[test]
fn incremental_snapshots_ship_only_new_chunks() {
    let (net, _kd, _key, a, b) = pair();
    a.cli_ok(&["volume", "create", "inc", "--opt", "replicas=1"]);
    let m = a.mount("inc", false);
    let mut data = pseudo_random(64 << 20, 11);
    std::fs::write(m.join("data.bin"), &data).unwrap();
    a.cli_ok(&["snapshot", "create", "inc", "--name", "one"]);
    wait_replica(&b, "inc", "one", Duration::from_secs(180));
    let first = repl_sent(&net, &a);
    assert!(
        first > (64 << 20) as f64,
        "first shipment sent only {first} bytes"
    );

    // Change 1 MiB in the middle.
    let off = 30 << 20;
    data[off..off + (1 << 20)].copy_from_slice(&pseudo_random(1 << 20, 12));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("data.bin"))
            .unwrap();
        f.write_all_at(&data[off..off + (1 << 20)], off as u64)
            .unwrap();
        f.sync_all().unwrap();
    }
    a.cli_ok(&["snapshot", "create", "inc", "--name", "two"]);
    wait_replica(&b, "inc", "two", Duration::from_secs(120));
    let second = repl_sent(&net, &a) - first;
    eprintln!("replication bytes: first {first}, second {second}");
    assert!(
        second < (4 << 20) as f64,
        "the second shipment sent {second} bytes for a 1 MiB change"
    );
    let rm = b.mount("inc", true);
    assert_eq!(
        blake3::hash(&std::fs::read(rm.join("data.bin")).unwrap()),
        blake3::hash(&data)
    );
    let mb = net.metrics(1, &b);
    assert!(
        metric(&mb, "volfs_replication_received_bytes_total", &[]).unwrap_or(0.0) > first * 0.9
    );
    let ma = net.metrics(0, &a);
    assert!(metric(&ma, "volfs_replication_snapshots_shipped_total", &[]).unwrap_or(0.0) >= 2.0);
    assert!(
        metric(
            &ma,
            "volfs_replication_lag_seconds",
            &[("volume", "inc"), ("replica", "b")]
        )
        .is_some(),
        "{ma}"
    );
    b.unmount(&rm).unwrap();
    a.unmount(&m).unwrap();
}

#[test]
fn a_cut_link_resumes_without_resending() {
    let (net, _kd, _key, a, b) = pair();
    a.cli_ok(&["volume", "create", "big", "--opt", "replicas=1"]);
    let m = a.mount("big", false);
    let size = 200usize << 20;
    let data = pseudo_random(size, 21);
    std::fs::write(m.join("big.bin"), &data).unwrap();
    a.cli_ok(&["snapshot", "create", "big", "--name", "s"]);
    let before = repl_sent(&net, &a);
    // Wait until a good part is on its way, then cut the link.
    wait_until(
        "the transfer to be under way",
        Duration::from_secs(120),
        || {
            let st = replica_status(&a, "big");
            let sent = st["sent_bytes"].as_u64().unwrap_or(0);
            (st["state"] == "sending" && sent > (size as u64) / 4)
                .then_some(())
                .map_or_else(|| Some(st.to_string()), |_| None)
        },
    );
    net.set_links(0, false);
    let mut saw_error = false;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(90) {
        let st = replica_status(&a, "big");
        if st["state"] == "error" && st["error"].is_string() {
            saw_error = true;
            // `volfs status` warns about it too (and exits 1).
            let out = a.cli(&["status"]);
            assert!(
                out.code() == Some(1) && out.stdout.contains("replica of volume big"),
                "{out}"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    net.set_links(0, true);
    assert!(
        saw_error,
        "inspect never showed an error while the link was cut"
    );
    wait_replica(&b, "big", "s", Duration::from_secs(240));
    let sent = repl_sent(&net, &a) - before;
    eprintln!("replication bytes for {size} bytes of data across a cut: {sent}");
    assert!(
        sent < 1.3 * size as f64,
        "sent {sent} bytes for {size} bytes of data"
    );
    let rm = b.mount("big", true);
    assert_eq!(
        blake3::hash(&std::fs::read(rm.join("big.bin")).unwrap()),
        blake3::hash(&data)
    );
    b.unmount(&rm).unwrap();
    a.unmount(&m).unwrap();
}

#[test]
fn rpo_takes_and_ships_snapshots_by_itself() {
    let (_net, _kd, _key, a, b) = pair();
    a.cli_ok(&["volume", "create", "web"]);
    a.cli_ok(&[
        "volume",
        "update",
        "web",
        "--opt",
        "replicas=1",
        "--opt",
        "rpo=2s",
    ]);
    let m = a.mount("web", false);
    let t0 = Instant::now();
    let mut i = 0;
    let mut max_lag = 0;
    let mut shipped_seen = false;
    while t0.elapsed() < Duration::from_secs(14) {
        std::fs::write(m.join(format!("f{i}")), format!("write {i}")).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(250));
        let st = replica_status(&a, "web");
        if st["last_snapshot"].is_string() {
            shipped_seen = true;
            max_lag = max_lag.max(st["lag_secs"].as_u64().unwrap_or(0));
        }
    }
    assert!(
        shipped_seen,
        "no rpo snapshot was shipped: {}",
        inspect(&a, "web")
    );
    assert!(max_lag <= 6, "lag reached {max_lag} s with rpo=2s");
    let v = b.inspect("web").unwrap();
    let snap = v["replica_snapshot"].as_str().unwrap().to_string();
    assert!(snap.starts_with("auto-"), "{v}");
    // Pruned: A keeps only a few auto snapshots, not one per interval.
    let snaps = inspect(&a, "web")["snapshots"].as_array().unwrap().len();
    assert!(snaps <= 3, "{snaps} snapshots kept: {}", inspect(&a, "web"));
    a.unmount(&m).unwrap();
}
