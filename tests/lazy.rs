//! Lazy replicas (issue 7): a snapshot shipped with `ship=lazy` commits on the replica before
//! its chunks are there; reads on the replica fetch missing chunks from peers (the origin
//! first, then the others; a peer that fails, hangs or lies is passed over), store them and
//! read locally afterwards; `volfs volume pull` fetches the rest; a chunk no peer can give is
//! EIO within `peer_fetch_timeout_ms`, logged with its id. Real daemons in network
//! namespaces (tests/common/netns.rs).
#![allow(dead_code)]

mod common;
#[path = "common/fakepeer.rs"]
mod fakepeer;
#[path = "common/netns.rs"]
mod netns;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use fakepeer::*;
use netns::*;

const MIB: u64 = 1 << 20;

fn start(net: &Net, i: usize, key: &Path, fetch_ms: Option<&str>) -> Daemon {
    let key = key.display().to_string();
    let mut env = vec![("VOLFS_PEER_KEY_FILE", key.as_str())];
    if let Some(ms) = fetch_ms {
        env.push(("VOLFS_PEER_FETCH_TIMEOUT_MS", ms));
    }
    let d = Daemon::start_in_netns(&net.ns[i], &env);
    wait_for_log(&d, "peer listener");
    d
}

fn pack_bytes(d: &Daemon) -> u64 {
    std::fs::read_dir(d.data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// Ids of the chunk records in a daemon's packs.
fn chunk_ids(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d.data.join("packs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "pack") {
            continue;
        }
        let pack = std::fs::read(&p).unwrap();
        let mut at = 16;
        while at + 48 <= pack.len() && &pack[at..at + 4] == b"VFSC" {
            let stored = u32::from_le_bytes(pack[at + 12..at + 16].try_into().unwrap()) as usize;
            out.push(
                pack[at + 16..at + 48]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            );
            at += 48 + stored;
        }
    }
    out
}

fn hash_of(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

/// A volume on `a` with `files` (name, bytes), shipped lazily to its replica peers as
/// snapshot `s1`.
fn lazy_volume(a: &Daemon, vol: &str, replicas: usize, files: &[(&str, &[u8])]) -> PathBuf {
    a.cli_ok(&[
        "volume",
        "create",
        vol,
        "--opt",
        &format!("replicas={replicas}"),
        "--opt",
        "ship=lazy",
    ]);
    let m = a.mount(vol, false);
    for (name, data) in files {
        let mut f = std::fs::File::create(m.join(name)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    a.cli_ok(&["snapshot", "create", vol, "--name", "s1"]);
    m
}

#[test]
fn a_lazy_replica_mounts_first_reads_fetch_and_pull_fetches_the_rest() {
    let net = Net::new(2);
    let (_kd, key) = key_file(&keygen());
    let a = start(&net, 0, &key, None);
    let b = start(&net, 1, &key, None);
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    b.cli_ok(&["peer", "add", "a", &net.peer_addr(1, 0)]);
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}"), pseudo_random(25 << 20, 100 + i)))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let packs0 = pack_bytes(&b);
    let ma = lazy_volume(&a, "big", 1, &refs);
    wait_replica(&b, "big", "s1", Duration::from_secs(120));
    let after_commit = pack_bytes(&b) - packs0;
    eprintln!("B's pack bytes right after the commit: {after_commit}");
    assert!(
        after_commit < 5 * MIB,
        "B stored {after_commit} bytes of packs for a lazily shipped 100 MiB snapshot"
    );

    // fsck counts the chunks not fetched yet apart, not as damage, and --repair leaves
    // them alone (the reads below fetch them).
    let out = b.cli(&["fsck", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let r = out.json();
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    let not_fetched = r["not_fetched_chunks"].as_u64().unwrap();
    // 100 MiB in chunks of at most 256 KiB.
    assert!(not_fetched >= 400, "{r}");
    assert_eq!(r["not_fetched_volumes"], serde_json::json!(["big"]), "{r}");
    let out = b.cli(&["fsck", "--repair"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains(&format!(
            "not yet fetched, {not_fetched} chunk(s): lazy replica(s) big"
        )),
        "{out}"
    );
    assert!(out.stdout.contains("no problems found"), "{out}");

    // Mounted before the chunks are there; a read fetches what it needs.
    let rm = b.mount("big", true);
    let t0 = Instant::now();
    assert_eq!(hash_of(&rm.join("f1")), blake3::hash(&files[1].1));
    eprintln!("reading 25 MiB on B took {:?}", t0.elapsed());
    let after_read = pack_bytes(&b) - packs0;
    eprintln!("B's pack bytes after reading a 25 MiB file: {after_read}");
    assert!(
        after_read > 24 * MIB && after_read < 30 * MIB,
        "B's packs hold {after_read} bytes after reading one 25 MiB file"
    );
    let m = net.metrics(1, &b);
    let on_read = metric(&m, "volfs_chunk_bytes_fetched_on_read_total", &[]).unwrap();
    assert!(on_read >= (25 << 20) as f64, "{on_read}");

    // Pull fetches the rest: about 75 MiB (a debug build encrypts slowly: a long timeout).
    let t0 = Instant::now();
    let out = {
        let mut c = std::process::Command::new(bin("volfs"));
        scrub_env(&mut c);
        c.env("VOLFS_SOCKET", &b.socket)
            .args(["volume", "pull", "big", "--json"]);
        run_with_timeout(&mut c, Duration::from_secs(400))
    };
    eprintln!("volume pull took {:?}", t0.elapsed());
    assert_eq!(out.code(), Some(0), "{out}");
    let r = out.json();
    let pulled = r["fetched_bytes"].as_u64().unwrap();
    eprintln!("volume pull fetched {pulled} bytes: {r}");
    assert_eq!(pulled, 75 << 20, "{r}");
    assert!(r["failed"].as_array().unwrap().is_empty(), "{r}");
    let out = b.cli_ok(&["volume", "pull", "big"]);
    assert!(out.stdout.contains("nothing was missing"), "{out}");
    let r = b.cli_ok(&["fsck", "--json"]).json();
    assert_eq!(r["not_fetched_chunks"], 0, "{r}");
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    let m = net.metrics(1, &b);
    assert_eq!(
        metric(&m, "volfs_chunk_bytes_fetched_by_pull_total", &[]).unwrap(),
        (75 << 20) as f64
    );

    // With A cut off, B's copy reads entirely.
    net.set_links(0, false);
    b.cli_ok(&["cache", "drop", "--kernel"]);
    for (name, data) in &files {
        assert_eq!(hash_of(&rm.join(name)), blake3::hash(data), "{name}");
    }
    net.set_links(0, true);
    b.unmount(&rm).unwrap();
    a.unmount(&ma).unwrap();
}

#[test]
fn a_read_moves_on_to_another_peer_when_the_origin_is_cut() {
    let net = Net::new(3);
    let (_kd, key) = key_file(&keygen());
    let a = start(&net, 0, &key, None);
    let b = start(&net, 1, &key, Some("4000"));
    let c = start(&net, 2, &key, None);
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    a.cli_ok(&["peer", "add", "c", &net.peer_addr(0, 2)]);
    b.cli_ok(&["peer", "add", "a", &net.peer_addr(1, 0)]);
    b.cli_ok(&["peer", "add", "c", &net.peer_addr(1, 2)]);
    c.cli_ok(&["peer", "add", "a", &net.peer_addr(2, 0)]);
    let data = pseudo_random(6 << 20, 7);
    let ma = lazy_volume(&a, "web", 2, &[("file", &data)]);
    wait_replica(&b, "web", "s1", Duration::from_secs(60));
    wait_replica(&c, "web", "s1", Duration::from_secs(60));
    // C gets every chunk (from A); B none yet.
    let out = c.cli(&["volume", "pull", "web", "--json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.json()["fetched_bytes"], 6 << 20, "{out}");

    net.set_link(0, 1, false);
    let rm = b.mount("web", true);
    let t0 = Instant::now();
    assert_eq!(hash_of(&rm.join("file")), blake3::hash(&data));
    eprintln!("read on B with A cut off: {:?}", t0.elapsed());
    let m = net.metrics(1, &b);
    assert!(
        metric(&m, "volfs_chunk_bytes_fetched_on_read_total", &[]).unwrap() >= (6 << 20) as f64
    );
    // C served it: its peer connections sent the bytes.
    let mc = net.metrics(2, &c);
    assert!(counter(&mc, "volfs_peer_sent_bytes_total") > (6 << 20) as f64);
    net.set_link(0, 1, true);
    b.unmount(&rm).unwrap();
    a.unmount(&ma).unwrap();
}

#[test]
fn a_chunk_no_peer_can_give_is_eio_within_the_deadline() {
    let net = Net::new(2);
    let (_kd, key) = key_file(&keygen());
    let a = start(&net, 0, &key, None);
    let deadline = Duration::from_millis(3000);
    let b = start(&net, 1, &key, Some("3000"));
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    b.cli_ok(&["peer", "add", "a", &net.peer_addr(1, 0)]);
    // A peer that accepts connections and never answers, inside B's namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let hang = net.run_in(1, move || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                held.push(s);
                if rx.try_recv().is_ok() {
                    break;
                }
            }
        });
        addr
    });
    b.cli_ok(&["peer", "add", "hang", &hang]);
    let data = pseudo_random(2 << 20, 9);
    let ma = lazy_volume(&a, "db", 1, &[("file", &data)]);
    wait_replica(&b, "db", "s1", Duration::from_secs(60));
    let rm = b.mount("db", true);

    net.set_links(1, false);
    let t0 = Instant::now();
    let r = std::fs::read(rm.join("file"));
    let took = t0.elapsed();
    eprintln!("a read no peer can serve failed after {took:?}");
    let e = r.expect_err("read of chunks no peer can give succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        took < deadline + Duration::from_secs(2),
        "EIO took {took:?} with a {deadline:?} deadline"
    );
    let log = b.log();
    let line = log
        .lines()
        .find(|l| l.contains("no peer could give it"))
        .unwrap_or_else(|| panic!("no log line about the chunk:\n{log}"));
    assert!(
        chunk_ids(&a).iter().any(|id| line.contains(id.as_str())),
        "the log line names no chunk of the file: {line}"
    );
    assert!(
        line.contains("peer a") && line.contains("peer hang"),
        "{line}"
    );
    let m = net.metrics(1, &b);
    assert!(metric(&m, "volfs_chunk_fetch_failures_total", &[]).unwrap() >= 1.0);
    // Pull reports what no peer had and exits 1.
    let out = b.cli(&["volume", "pull", "db"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("not fetched"), "{out}");
    let _ = tx.send(());
    net.set_links(1, true);
    b.unmount(&rm).unwrap();
    a.unmount(&ma).unwrap();
}

#[test]
fn a_peer_sending_wrong_bytes_is_passed_over_and_nothing_is_stored() {
    let net = Net::new(3);
    let hexkey = keygen();
    let (_kd, key) = key_file(&hexkey);
    let a = start(&net, 0, &key, None);
    let b = start(&net, 1, &key, Some("3000"));
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    // The liar in namespace 2, named so that B asks it before the origin.
    let k = key_bytes(&hexkey);
    let liar_ip = net.ip_of(1, 2);
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served2 = served.clone();
    let l = net.run_in(2, move || {
        std::net::TcpListener::bind(format!("{liar_ip}:9568")).unwrap()
    });
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let Some(mut f) = Fake::handshake(s, &k, false, &[1]) else {
                continue;
            };
            if !matches!(f.recv(), Some(Msg::Hello { .. })) {
                continue;
            }
            let _ = f.send(&Msg::Hello {
                host: "liar".into(),
                version: 1,
            });
            while let Some(m) = f.recv() {
                let answer = match m {
                    Msg::Ping { nonce } => Msg::Pong { nonce },
                    Msg::HasChunks { ids } => Msg::Have {
                        which: vec![true; ids.len()],
                    },
                    Msg::GetChunk { id } => {
                        served2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Msg::Chunk {
                            id,
                            data: b"these are not the bytes you are looking for".to_vec(),
                        }
                    }
                    _ => break,
                };
                if f.send(&answer).is_none() {
                    break;
                }
            }
        }
    });
    b.cli_ok(&["peer", "add", "a-liar", &net.peer_addr(1, 2)]);
    b.cli_ok(&["peer", "add", "origin", &net.peer_addr(1, 0)]);
    let one = pseudo_random(1 << 20, 31);
    let two = pseudo_random(1 << 20, 32);
    let ma = lazy_volume(&a, "app", 1, &[("one", &one), ("two", &two)]);
    wait_replica(&b, "app", "s1", Duration::from_secs(60));
    let rm = b.mount("app", true);

    // The liar is asked first, rejected; the origin serves the right bytes.
    assert_eq!(hash_of(&rm.join("one")), blake3::hash(&one));
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the liar was not asked"
    );
    let m = net.metrics(1, &b);
    assert!(
        counter(&m, "volfs_peer_chunks_rejected_total") >= 1.0,
        "{m}"
    );

    // Only the liar left: EIO, and its bytes are not stored.
    b.cli_ok(&["peer", "rm", "origin"]);
    let before = pack_bytes(&b);
    let asked = served.load(std::sync::atomic::Ordering::SeqCst);
    let e = std::fs::read(rm.join("two")).expect_err("the liar's bytes were accepted");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) > asked);
    assert_eq!(pack_bytes(&b), before, "something was stored");
    b.unmount(&rm).unwrap();
    a.unmount(&ma).unwrap();
}
