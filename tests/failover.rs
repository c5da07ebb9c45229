//! Failover and move (issue 7): three daemons A, B, C, each in its own network namespace,
//! one etcd in a fourth namespace joined to each of them. Replication ships with the
//! cluster's fencing token to the hosts etcd placed; a replica is promoted once its owner's
//! lease lapsed and then holds exactly its last replicated snapshot, keeps replicating with
//! the volume's settings, and the other replica follows the new owner; a stale owner's
//! shipments are refused; a partitioned owner stops writing before anyone can promote; a
//! volume moves to a peer (cluster mode and a single host).
#![allow(dead_code)]

mod common;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/fakepeer.rs"]
mod fakepeer;
#[path = "common/netns.rs"]
mod netns;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use etcd::Etcd;
use fakepeer::*;
use netns::*;
use serde_json::Value;

const TTL: u64 = 4;
const NAMES: [&str; 3] = ["a", "b", "c"];

/// Hosts a, b, c in namespaces 0..3 (cluster mode, TTL 4 s), etcd in namespace 3; each host
/// has the other two as peers, under their host names.
struct Cluster {
    hosts: Vec<Daemon>,
    etcd: Etcd,
    _key: tempfile::TempDir,
    key: PathBuf,
    net: Net,
}

fn env_of(net: &Net, i: usize, key: &Path) -> Vec<(String, String)> {
    vec![
        ("VOLFS_PEER_KEY_FILE".into(), key.display().to_string()),
        (
            "VOLFS_ETCD_ENDPOINTS".into(),
            format!("http://{}:2379", net.ip_of(i, 3)),
        ),
        ("VOLFS_HOST_NAME".into(), NAMES[i].into()),
        ("VOLFS_LEASE_TTL_SECS".into(), TTL.to_string()),
    ]
}

fn start_host(net: &Net, i: usize, key: &Path) -> Daemon {
    let env = env_of(net, i, key);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Daemon::start_in_netns(&net.ns[i], &env)
}

fn cluster() -> Cluster {
    let net = Net::new(4);
    let ips: Vec<String> = (0..3).map(|c| net.ip_of(c, 3)).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let etcd = Etcd::start(Some(&net.ns[3]), &ips);
    let (kd, key) = key_file(&keygen());
    let hosts: Vec<Daemon> = (0..3).map(|i| start_host(&net, i, &key)).collect();
    for (i, h) in hosts.iter().enumerate() {
        wait_for_log(h, "peer listener");
        for (j, name) in NAMES.iter().enumerate() {
            if i != j {
                h.cli_ok(&["peer", "add", name, &net.peer_addr(i, j)]);
            }
        }
    }
    wait_for("three hosts in etcd", Duration::from_secs(15), || {
        let s = hosts[0].cli_ok(&["cluster", "status", "--json"]).json();
        s["connected"] == true && s["hosts"].as_array().is_some_and(|h| h.len() == 3)
    });
    Cluster {
        hosts,
        etcd,
        _key: kd,
        key,
        net,
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn inspect(d: &Daemon, name: &str) -> Value {
    d.inspect(name).unwrap_or(Value::Null)
}

/// A writer of `record N` lines (fsync'ed), keeping when each was acknowledged.
type TimedWriter = std::thread::JoinHandle<(Vec<Instant>, Instant, Option<i32>)>;

fn timed_writer(path: PathBuf, prefix: &'static str, stop: Arc<AtomicBool>) -> TimedWriter {
    std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut acked: Vec<Instant> = Vec::new();
        loop {
            if stop.load(Ordering::SeqCst) {
                return (acked, Instant::now(), None);
            }
            let r = f
                .write_all(format!("{prefix} {}\n", acked.len()).as_bytes())
                .and_then(|_| f.sync_all());
            match r {
                Ok(()) => acked.push(Instant::now()),
                Err(e) => return (acked, Instant::now(), e.raw_os_error()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// `volume promote` on `d` until it succeeds: (when, its JSON answer, refusals before).
fn promote_until_ok(d: &Daemon, vol: &str, since: Instant) -> (Instant, Value, usize) {
    let mut refusals = 0;
    loop {
        let out = d.cli(&["volume", "promote", vol, "--json"]);
        if out.success() {
            return (Instant::now(), out.json(), refusals);
        }
        assert!(out.stderr.contains("host a"), "{out}");
        refusals += 1;
        assert!(
            since.elapsed() < Duration::from_secs(4 * TTL),
            "no promote: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one replica chunk of `vol` with `token` to the daemon in namespace `to` (from
/// namespace `from`, posing as host `as_host`); returns the answer.
fn put_chunk(
    net: &Net,
    key: &Path,
    (from, to): (usize, usize),
    as_host: &str,
    vol: &str,
    token: u64,
) -> Msg {
    let addr = net.peer_addr(from, to);
    let key = key_bytes(std::fs::read_to_string(key).unwrap().trim());
    let (vol, host) = (vol.to_string(), as_host.to_string());
    net.run_in(from, move || {
        // A deposed owner would speak v2 (the first replication version).
        let mut f = Fake::connect(&addr, &key, &host, &[1, 2]);
        let data = b"a stale shipment".to_vec();
        let id = *blake3::hash(&data).as_bytes();
        f.send(&Msg::PutChunk {
            volume: vol,
            token,
            id,
            data,
        })
        .expect("sending the chunk");
        f.recv().expect("an answer")
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn owner_killed_replica_promoted_holds_last_replicated_snapshot() {
    let mut c = cluster();
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    a.cli_ok(&[
        "volume",
        "create",
        "db",
        "--opt",
        "replicas=2",
        "--opt",
        "rpo=2s",
    ]);
    let info = inspect(a, "db");
    assert_eq!(info["owner"], "a", "{info}");
    assert_eq!(info["replicas"], serde_json::json!(["b", "c"]), "{info}");
    let t1 = info["token"].as_i64().expect("a token");

    let mp = a.mount("db", false);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = timed_writer(mp.join("log"), "record", stop.clone());
    // Both replicas get snapshots shipped with A's token.
    wait_for("B and C hold a replica", Duration::from_secs(30), || {
        [1, 2].iter().all(|i| {
            let v = inspect(&c.hosts[*i], "db");
            v["replica_of"] == "a" && v["replica_snapshot"].is_string()
        })
    });
    // A second round, so that the replica holds records.
    let first = inspect(b, "db")["replica_snapshot"].clone();
    wait_for(
        "a newer replica snapshot on B",
        Duration::from_secs(30),
        || inspect(b, "db")["replica_snapshot"] != first,
    );
    let st = inspect(a, "db");
    let peers = st["replication"]["peers"].as_array().unwrap().clone();
    assert_eq!(peers.len(), 2, "{st}");
    assert_eq!(peers[0]["peer"], "b");
    assert_eq!(peers[1]["peer"], "c");

    // Kill A entirely: the daemon, and with it its FUSE mounts.
    let t_kill = Instant::now();
    c.hosts[0].kill9();
    stop.store(true, Ordering::SeqCst);
    let (acked, _, _) = writer.join().unwrap();
    let (first, rest) = c.hosts.split_at_mut(1);
    let (b, cc) = (&rest[0], &rest[1]);
    // What each replica holds of A's snapshots: those only C has, B (the new owner) never had.
    let on = |d: &Daemon| {
        inspect(d, "db")["snapshots"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let b_had = on(b);
    let only_c: Vec<Value> = on(cc).into_iter().filter(|s| !b_had.contains(s)).collect();
    eprintln!("snapshots only C holds when A died: {only_c:?}");
    // B's latest replica snapshot, and what it holds.
    let snap = inspect(b, "db")["replica_snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let ro = b.mount("db", true);
    let replicated = lines(&ro.join("log"));
    b.unmount(&ro).unwrap();
    assert!(!replicated.is_empty(), "the replica holds no record");
    assert!(replicated.len() <= acked.len());
    for (i, l) in replicated.iter().enumerate() {
        assert_eq!(*l, format!("record {i}"));
    }

    // Promote on B: refused while A's lease lives, then it succeeds with a higher token.
    let (t_promoted, p, refusals) = promote_until_ok(b, "db", t_kill);
    eprintln!(
        "timing: kill A -> B promoted {:?}; {refusals} refusals; {} records acknowledged on A, {} in the last replicated snapshot {snap}",
        t_promoted.duration_since(t_kill),
        acked.len(),
        replicated.len()
    );
    assert!(
        refusals > 0,
        "promote was not refused while A's lease lived"
    );
    let t2 = p["token"].as_i64().unwrap();
    assert!(t2 > t1, "token {t2} after {t1}");
    assert_eq!(p["snapshot"], snap.as_str(), "{p}");
    let info = inspect(b, "db");
    assert_eq!(info["owner"], "b");
    assert!(info["replica_of"].is_null(), "{info}");
    assert_eq!(info["read_only"], false, "{info}");

    // B's db, read-write: exactly the records of that snapshot; new writes work.
    let rw = b.mount("db", false);
    assert_eq!(lines(&rw.join("log")), replicated);
    wait_for("B writable", Duration::from_secs(5), || {
        std::fs::OpenOptions::new()
            .append(true)
            .open(rw.join("log"))
            .and_then(|mut f| f.write_all(b"from b\n").and_then(|_| f.sync_all()))
            .is_ok()
    });
    assert_eq!(lines(&rw.join("log")).last().unwrap(), "from b");

    // B keeps replicating as A did (replicas=2, rpo=2s): to the placed hosts but itself and
    // the dead A, that is to C, which follows B (a higher token) from A's snapshots on.
    let info = inspect(b, "db");
    assert_eq!(info["options"]["replicas"], "2", "{info}");
    assert_eq!(info["options"]["rpo"], "2s", "{info}");
    assert_eq!(info["replicas"], serde_json::json!(["c"]), "{info}");
    b.cli_ok(&["snapshot", "create", "db", "--name", "b-1"]);
    wait_for("C follows B up to b-1", Duration::from_secs(60), || {
        let v = inspect(cc, "db");
        v["replica_of"] == "b" && v["replica_snapshot"] == "b-1"
    });
    let on_b = lines(&rw.join("log"));
    let ro_c = cc.mount("db", true);
    assert_eq!(lines(&ro_c.join("log")), on_b, "C's replica is not B's b-1");
    cc.unmount(&ro_c).unwrap();
    // Snapshots of A's that B never had (C was ahead of B) are gone from C.
    let c_snaps = inspect(cc, "db")["snapshots"].clone();
    for s in &only_c {
        assert!(
            !c_snaps.as_array().unwrap().contains(s),
            "C keeps {s}, which B never had: {c_snaps}"
        );
    }
    // rpo shipping goes on from B: a change reaches C in an auto- snapshot.
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(rw.join("log"))
            .unwrap();
        f.write_all(b"more from b\n").unwrap();
        f.sync_all().unwrap();
    }
    let want = lines(&rw.join("log"));
    let mut looked_at = Value::Null;
    wait_for(
        "an rpo snapshot of B on C with the change",
        Duration::from_secs(60),
        || {
            let v = inspect(cc, "db");
            let snap = v["replica_snapshot"].clone();
            if v["replica_of"] != "b"
                || snap == looked_at
                || !snap.as_str().is_some_and(|s| s.starts_with("auto-"))
            {
                return false;
            }
            looked_at = snap.clone();
            // The snapshot's own view: the volume's connection (kept open a while after
            // the unmount above) still serves the snapshot it was mounted at.
            let ro_c = cc.mount(&format!("db@{}", snap.as_str().unwrap_or_default()), true);
            let got = lines(&ro_c.join("log"));
            cc.unmount(&ro_c).unwrap();
            // An earlier rpo snapshot (atime of the reads above) may come first.
            assert!(
                want.starts_with(&got),
                "C's replica is not a state of B's db"
            );
            got == want
        },
    );
    assert_eq!(want.last().unwrap(), "more from b");

    // C refuses a shipment with A's old token (it has seen B's ownership in etcd).
    wait_for("C sees B own db", Duration::from_secs(15), || {
        inspect(cc, "db")["owner"] == "b"
    });
    match put_chunk(&c.net, &c.key, (0, 2), "a", "db", t1 as u64) {
        Msg::Error { message } => assert!(
            message.contains("stale") && message.contains(&t1.to_string()),
            "{message}"
        ),
        m => panic!("a stale shipment was accepted: {m:?}"),
    }
    // A comes back with its data dir: it stays read-only and says B owns db; its worker
    // ships nothing (C's replica still follows B, at the same snapshot).
    let c_before = inspect(cc, "db")["replica_snapshot"].clone();
    first[0].start_again();
    let a = &first[0];
    wait_for("A sees B's ownership", Duration::from_secs(20), || {
        inspect(a, "db")["owner"] == "b"
    });
    wait_for_log(a, "host b owns the volume now");
    let target = a.fresh_dir("rw-again");
    let out = a.cli(&["mount", "db", target.to_str().unwrap()]);
    assert!(
        !out.success() && out.stderr.contains("host b owns it"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let after = inspect(cc, "db");
    assert_eq!(after["replica_snapshot"], c_before, "{after}");
    assert_eq!(after["replica_of"], "b", "{after}");
    b.unmount(&rw).unwrap();
}

#[test]
fn partitioned_owner_fences_before_the_replica_promotes() {
    let c = cluster();
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    a.cli_ok(&[
        "volume",
        "create",
        "db",
        "--opt",
        "replicas=2",
        "--opt",
        "rpo=1s",
    ]);
    let t1 = inspect(a, "db")["token"].as_i64().unwrap();
    let mp = a.mount("db", false);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = timed_writer(mp.join("log"), "record", stop.clone());
    wait_for("B holds a replica", Duration::from_secs(30), || {
        inspect(b, "db")["replica_snapshot"].is_string()
    });
    std::thread::sleep(Duration::from_millis(1500));

    // Cut A off from etcd and from B and C.
    let t_cut = Instant::now();
    c.net.set_links(0, false);
    let (t_promoted, p, refusals) = promote_until_ok(b, "db", t_cut);
    let (acked, t_fenced, errno) = writer.join().unwrap();
    assert_eq!(errno, Some(libc::EROFS), "A's writer did not get EROFS");
    eprintln!(
        "timing: cut -> A fenced (EROFS) {:?}; cut -> B promoted {:?}; {refusals} refusals; {} records acknowledged on A",
        t_fenced.duration_since(t_cut),
        t_promoted.duration_since(t_cut),
        acked.len()
    );
    assert!(refusals > 0);
    assert!(t_fenced < t_promoted, "B promoted before A was fenced");
    assert!(
        t_fenced.duration_since(t_cut) <= Duration::from_millis(TTL * 500 + 1500),
        "A fenced late"
    );
    assert!(acked.iter().all(|t| *t < t_fenced));
    assert!(p["token"].as_i64().unwrap() > t1);

    // B writes after its promote; A's acknowledged records all predate its fence.
    let rw = b.mount("db", false);
    let base = lines(&rw.join("log"));
    for (i, l) in base.iter().enumerate() {
        assert_eq!(
            *l,
            format!("record {i}"),
            "B starts from a prefix of A's records"
        );
    }
    let stop_b = Arc::new(AtomicBool::new(false));
    let wb = timed_writer(rw.join("log"), "b-record", stop_b.clone());
    std::thread::sleep(Duration::from_millis(500));
    stop_b.store(true, Ordering::SeqCst);
    let (acked_b, _, err_b) = wb.join().unwrap();
    assert_eq!(err_b, None);
    assert!(!acked_b.is_empty());
    assert!(acked_b.iter().all(|t| *t > t_promoted));
    let last_a = *acked.last().unwrap();
    assert!(last_a < t_fenced && t_fenced < *acked_b.first().unwrap());
    let on_b = lines(&rw.join("log"));
    assert_eq!(on_b.len(), base.len() + acked_b.len());

    // A's links come back: it stays read-only and names B.
    c.net.set_links(0, true);
    wait_for("A sees B's ownership", Duration::from_secs(20), || {
        inspect(a, "db")["owner"] == "b"
    });
    let e = std::fs::write(mp.join("late"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let on_a = lines(&mp.join("log"));
    assert!(on_a.len() >= acked.len());
    assert!(on_a.iter().all(|l| l.starts_with("record ")));
    stop.store(true, Ordering::SeqCst);
    a.unmount(&mp).unwrap();
    b.unmount(&rw).unwrap();
}

#[test]
fn move_hands_a_volume_over_in_cluster_mode() {
    let c = cluster();
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    a.cli_ok(&["volume", "create", "vol"]);
    let t1 = inspect(a, "vol")["token"].as_i64().unwrap();
    let mp = a.mount("vol", false);
    let big = pseudo_random(3 << 20, 7);
    std::fs::write(mp.join("big"), &big).unwrap();
    std::fs::create_dir(mp.join("dir")).unwrap();
    std::fs::write(mp.join("dir/small"), b"small").unwrap();
    // Mounted: refused, with the reason.
    let out = a.cli(&["volume", "move", "vol", "--to", "b"]);
    assert!(
        !out.success() && out.stderr.contains("unmount") && out.stderr.contains("--force"),
        "{out}"
    );
    a.unmount(&mp).unwrap();
    let out = a.cli_ok(&["volume", "move", "vol", "--to", "b", "--json"]);
    let m = out.json();
    assert_eq!(m["to"], "b", "{m}");
    assert!(m["bytes_sent"].as_u64().unwrap() >= 3 << 20, "{m}");
    let t2 = m["token"].as_i64().unwrap();
    assert!(t2 > t1, "token {t2} after {t1}");
    assert_eq!(m["token_before"].as_i64(), Some(t1));

    let info = inspect(b, "vol");
    assert_eq!(info["owner"], "b", "{info}");
    assert_eq!(info["token"].as_i64(), Some(t2));
    assert!(info["replica_of"].is_null(), "{info}");
    let rw = b.mount("vol", false);
    assert_eq!(std::fs::read(rw.join("big")).unwrap(), big);
    assert_eq!(std::fs::read(rw.join("dir/small")).unwrap(), b"small");
    wait_for("B writable", Duration::from_secs(5), || {
        std::fs::write(rw.join("new"), b"on b").is_ok()
    });

    // A's copy: a read-only replica of B.
    let info = inspect(a, "vol");
    assert_eq!(info["replica_of"], "b", "{info}");
    assert_eq!(info["replica_snapshot"], m["snapshot"], "{info}");
    let target = a.fresh_dir("rw");
    let out = a.cli(&["mount", "vol", target.to_str().unwrap()]);
    assert!(!out.success() && out.stderr.contains("own"), "{out}");
    let ro = a.mount("vol", true);
    assert_eq!(std::fs::read(ro.join("dir/small")).unwrap(), b"small");
    let e = std::fs::write(ro.join("x"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    a.unmount(&ro).unwrap();
    b.unmount(&rw).unwrap();
}

#[test]
fn move_between_two_single_hosts() {
    let net = Net::new(2);
    let (_kd, key) = key_file(&keygen());
    let a = daemon(&net, 0, &key);
    let b = daemon(&net, 1, &key);
    wait_for_log(&b, "peer listener");
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    b.cli_ok(&["peer", "add", "a", &net.peer_addr(1, 0)]);
    let mp = a.volume_mounted("vol", &[]);
    std::fs::write(mp.join("f"), b"moved data").unwrap();
    a.unmount(&mp).unwrap();
    let m = a
        .cli_ok(&["volume", "move", "vol", "--to", "b", "--json"])
        .json();
    assert_eq!(m["token_before"].as_i64(), Some(0), "{m}");
    assert_eq!(m["token"].as_i64(), Some(1), "{m}");
    let info = inspect(&b, "vol");
    assert!(info["replica_of"].is_null(), "{info}");
    assert_eq!(info["read_only"], false, "{info}");
    let rw = b.mount("vol", false);
    assert_eq!(std::fs::read(rw.join("f")).unwrap(), b"moved data");
    std::fs::write(rw.join("g"), b"b writes").unwrap();
    b.unmount(&rw).unwrap();
    // A keeps a read-only replica naming B.
    let info = inspect(&a, "vol");
    assert_eq!(info["replica_of"], "b", "{info}");
    let ro = a.mount("vol", true);
    assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"moved data");
    assert_eq!(
        std::fs::write(ro.join("x"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    a.unmount(&ro).unwrap();
    // Promote of that replica on a single host: refused while its origin answers; --force
    // says what it did.
    let out = a.cli(&["volume", "promote", "vol"]);
    assert!(!out.success() && out.stderr.contains("answers"), "{out}");
    let p = a
        .cli_ok(&["volume", "promote", "vol", "--force", "--json"])
        .json();
    assert!(p["note"].as_str().unwrap().contains("forced"), "{p}");
    assert_eq!(p["token"].as_i64(), Some(2), "{p}");
}

/// Single hosts a, b, c (no etcd; `host_name` set, peers added under those names).
fn single_hosts(net: &Net, key: &Path) -> Vec<Daemon> {
    let k = key.display().to_string();
    let hosts: Vec<Daemon> = (0..3)
        .map(|i| {
            Daemon::start_in_netns(
                &net.ns[i],
                &[
                    ("VOLFS_PEER_KEY_FILE", k.as_str()),
                    ("VOLFS_HOST_NAME", NAMES[i]),
                ],
            )
        })
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        wait_for_log(h, "peer listener");
        for (j, name) in NAMES.iter().enumerate() {
            if i != j {
                h.cli_ok(&["peer", "add", name, &net.peer_addr(i, j)]);
            }
        }
    }
    hosts
}

fn replica_at(d: &Daemon, vol: &str, origin: &str, snap: &str) -> bool {
    let v = inspect(d, vol);
    v["replica_of"] == origin && v["replica_snapshot"] == snap
}

#[test]
fn single_hosts_follow_a_promoted_replica_and_refuse_the_old_owner() {
    let net = Net::new(3);
    let (_kd, key) = key_file(&keygen());
    let mut hosts = single_hosts(&net, &key);
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    a.cli_ok(&["volume", "create", "db", "--opt", "replicas=2"]);
    let mp = a.mount("db", false);
    std::fs::write(mp.join("f"), b"from a\n").unwrap();
    a.cli_ok(&["snapshot", "create", "db", "--name", "s1"]);
    wait_for("B and C hold s1", Duration::from_secs(30), || {
        replica_at(b, "db", "a", "s1") && replica_at(c, "db", "a", "s1")
    });
    // C gets s2, B does not: C is ahead of the replica that will be promoted.
    net.set_link(0, 1, false);
    std::fs::write(mp.join("f"), b"from a, after s1\n").unwrap();
    a.cli_ok(&["snapshot", "create", "db", "--name", "s2"]);
    wait_for("C holds s2", Duration::from_secs(30), || {
        replica_at(c, "db", "a", "s2")
    });
    hosts[0].kill9();
    let (b, c) = (&hosts[1], &hosts[2]);

    // B is promoted (single host: forced, A cannot be asked) at s1, token 1.
    let p = b
        .cli_ok(&["volume", "promote", "db", "--force", "--json"])
        .json();
    assert_eq!(p["snapshot"], "s1", "{p}");
    assert_eq!(p["token"].as_i64(), Some(1), "{p}");
    let info = inspect(b, "db");
    assert_eq!(info["options"]["replicas"], "2", "{info}");
    let rw = b.mount("db", false);
    assert_eq!(std::fs::read(rw.join("f")).unwrap(), b"from a\n");
    std::fs::write(rw.join("f"), b"from b\n").unwrap();
    b.cli_ok(&["snapshot", "create", "db", "--name", "b1"]);

    // C follows B: B's data, B's snapshots, and A's s2 (which B never had) is gone.
    wait_for("C follows B to b1", Duration::from_secs(60), || {
        replica_at(c, "db", "b", "b1")
    });
    let snaps = inspect(c, "db")["snapshots"].clone();
    let names: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        names.contains(&"s1") && names.contains(&"b1") && !names.contains(&"s2"),
        "{snaps}"
    );
    let ro = c.mount("db", true);
    assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"from b\n");
    c.unmount(&ro).unwrap();
    // B replicates to both other hosts: C is idle, A (down) is in error.
    let st = inspect(b, "db");
    let peers = st["replication"]["peers"].as_array().unwrap().clone();
    let names: Vec<&str> = peers.iter().filter_map(|p| p["peer"].as_str()).collect();
    assert_eq!(names, ["a", "c"], "{st}");

    // A comes back still believing it owns db (token 0) and ships a new snapshot: C refuses
    // it (its fence is B's token 1), and stays B's replica.
    hosts[0].start_again();
    let (a, c) = (&hosts[0], &hosts[2]);
    a.cli_ok(&["snapshot", "create", "db", "--name", "s3"]);
    wait_for("C refuses A's shipment", Duration::from_secs(30), || {
        let v = inspect(a, "db");
        v["replication"]["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["peer"] == "c"
                    && p["error"].as_str().is_some_and(|e| {
                        e.contains("fencing token 0") && e.contains("lower than 1")
                    })
            })
    });
    assert!(replica_at(c, "db", "b", "b1"), "{}", inspect(c, "db"));
    let ro = c.mount("db@b1", true);
    assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"from b\n");
    c.unmount(&ro).unwrap();
    net.set_link(0, 1, true);
    hosts[1].unmount(&rw).unwrap();
}
