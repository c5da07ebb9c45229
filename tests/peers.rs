//! Peers (issue 7): real daemons, each with its own data dir in its own network namespace,
//! joined by veth pairs with private addresses (10.231.K.1/2, one /24 per pair) that exist
//! only inside those namespaces. Membership (`volfs peer add/ls/rm`), the authenticated
//! channel (a wrong key is refused both ways; garbage, a foreign version and oversized or
//! undecryptable frames close only that connection), and repair of corrupt chunks from a
//! peer with verification on arrival (a peer sending wrong bytes is rejected).
#![allow(dead_code)]

mod common;
#[path = "common/fakepeer.rs"]
mod fakepeer;
#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use fakepeer::*;
use netns::*;

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Pack surgery
// ---------------------------------------------------------------------------------------------

/// (record offset, stored length, chunk id) of every record of a pack.
fn records(pack: &[u8]) -> Vec<(usize, usize, [u8; 32])> {
    let mut out = Vec::new();
    let mut at = 16;
    while at + 48 <= pack.len() && &pack[at..at + 4] == b"VFSC" {
        let stored = u32::from_le_bytes(pack[at + 12..at + 16].try_into().unwrap()) as usize;
        out.push((at, stored, pack[at + 16..at + 48].try_into().unwrap()));
        at += 48 + stored;
    }
    out
}

fn pack_files(d: &Daemon) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d.data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    v.sort();
    v
}

/// The id of the largest chunk in the daemon's packs.
fn largest_chunk(d: &Daemon) -> [u8; 32] {
    pack_files(d)
        .iter()
        .flat_map(|p| records(&std::fs::read(p).unwrap()))
        .max_by_key(|r| r.1)
        .expect("no records")
        .2
}

/// Stops the daemon, flips a payload byte of every record of chunk `id`, starts it again.
fn corrupt(d: &mut Daemon, id: &[u8; 32]) {
    let _ = d.stop();
    let mut hit = 0;
    for p in pack_files(d) {
        let mut pack = std::fs::read(&p).unwrap();
        for (off, stored, rid) in records(&pack) {
            if &rid == id {
                pack[off + 48 + stored / 2] ^= 0xff;
                hit += 1;
            }
        }
        std::fs::write(&p, &pack).unwrap();
    }
    assert!(hit > 0, "chunk not found in the packs");
    d.start_again();
}

fn hex(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The same file on a fresh mounted volume.
fn write_file(d: &Daemon, data: &[u8]) -> PathBuf {
    let m = d.volume_mounted("data", &[]);
    let f = m.join("file");
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(data).unwrap();
    w.sync_all().unwrap();
    f
}

fn assert_eio(p: &Path) {
    match std::fs::read(p) {
        Ok(_) => panic!("reading {} succeeded despite a corrupt chunk", p.display()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
}

/// True when the other side closes the connection (EOF or reset) within 10 s.
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn peer_add_ls_rm_round_trip() {
    let net = Net::new(2);
    let (_k, key) = key_file(&keygen());
    let a = daemon(&net, 0, &key);
    let b = daemon(&net, 1, &key);
    wait_for_log(&b, "peer listener");
    assert!(peers_json(&a).is_empty());

    let out = a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    assert!(out.stdout.contains("authenticated"), "{}", out.stdout);
    let ls = a.cli_ok(&["peer", "ls"]);
    assert!(
        ls.stdout.contains("NAME") && ls.stdout.contains(&net.peer_addr(0, 1)),
        "{}",
        ls.stdout
    );
    assert!(ls.stdout.contains("authenticated, v3"), "{}", ls.stdout);
    let j = peers_json(&a);
    assert_eq!(j.len(), 1, "{j:?}");
    assert_eq!(j[0]["name"], "b");
    assert_eq!(j[0]["connected"], true, "{j:?}");
    assert_eq!(j[0]["authenticated"], true, "{j:?}");
    assert_eq!(j[0]["version"], 3, "{j:?}");
    assert!(j[0]["latency_ms"].as_f64().is_some(), "{j:?}");
    assert!(j[0]["error"].is_null(), "{j:?}");

    // A peer that does not listen: recorded, shown with the error.
    a.cli_ok(&["peer", "add", "nobody", &format!("{}:9", net.ip_of(0, 1))]);
    let j = peers_json(&a);
    let nobody = j.iter().find(|p| p["name"] == "nobody").unwrap();
    assert_eq!(nobody["authenticated"], false, "{j:?}");
    assert!(
        nobody["error"].as_str().unwrap().contains("cannot connect"),
        "{j:?}"
    );

    // Validation, locally and by the daemon.
    for bad in [
        ["peer", "add", "x/y", "h:1"],
        ["peer", "add", "ok", "nohost"],
    ] {
        let out = a.cli(&bad);
        assert_eq!(out.code(), Some(1), "{bad:?}: {}", out.stderr);
        assert!(out.stderr.contains("invalid peer"), "{}", out.stderr);
    }
    let r = a
        .client()
        .post::<_, serde_json::Value>(
            "/v1/peers",
            &serde_json::json!({"name": "x", "addr": "h:0"}),
        )
        .unwrap_err();
    assert!(r.to_string().contains("invalid peer address"), "{r}");

    // Records survive a restart (they live in the index).
    let mut a = a;
    a.restart();
    assert_eq!(peers_json(&a).len(), 2);
    a.cli_ok(&["peer", "rm", "nobody"]);
    a.cli_ok(&["peer", "rm", "b"]);
    assert!(peers_json(&a).is_empty());
    let out = a.cli(&["peer", "rm", "b"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("no peer named"), "{}", out.stderr);
}

#[test]
fn a_different_key_is_refused_both_ways() {
    let net = Net::new(2);
    let (_k1, key1) = key_file(&keygen());
    let (_k2, key2) = key_file(&keygen());
    let a = daemon(&net, 0, &key1);
    let b = daemon(&net, 1, &key2);
    wait_for_log(&a, "peer listener");
    wait_for_log(&b, "peer listener");
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    b.cli_ok(&["peer", "add", "a", &net.peer_addr(1, 0)]);
    for (d, other, from) in [(&a, &b, net.ip_of(1, 0)), (&b, &a, net.ip_of(0, 1))] {
        let j = peers_json(d);
        assert_eq!(j[0]["connected"], true, "{j:?}");
        assert_eq!(j[0]["authenticated"], false, "{j:?}");
        let e = j[0]["error"].as_str().unwrap();
        assert!(e.contains("authentication failed"), "{e}");
        let ls = d.cli_ok(&["peer", "ls"]);
        assert!(ls.stdout.contains("authentication failed"), "{}", ls.stdout);
        // The refusing side logged it with the remote address, and counted it.
        wait_for_log(other, &format!("remote={from}"));
        assert!(
            other.log().contains("peer handshake failed"),
            "{}",
            other.log()
        );
    }
    let ma = net.metrics(0, &a);
    assert!(
        counter(&ma, "volfs_peer_handshake_failures_total") >= 2.0,
        "{ma}"
    );
    assert!(counter(&ma, "volfs_peer_sent_bytes_total") > 0.0, "{ma}");
    assert!(
        counter(&ma, "volfs_peer_received_bytes_total") > 0.0,
        "{ma}"
    );

    // Nothing is readable with the wrong key: a corrupt chunk on A is not fetched from B.
    let data = pseudo_random(300_000, 7);
    let fa = write_file(&a, &data);
    write_file(&b, &data);
    let id = largest_chunk(&a);
    let mut a = a;
    corrupt(&mut a, &id);
    let out = a.cli(&["fsck", "--repair"]);
    assert_eq!(out.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("authentication failed"),
        "{}",
        out.stdout
    );
    assert_eio(&fa);
}

#[test]
fn garbage_versions_and_bad_frames_close_only_that_connection() {
    let net = Net::new(2);
    let hexkey = keygen();
    let (_k, key) = key_file(&hexkey);
    let a = daemon(&net, 0, &key);
    let b = daemon(&net, 1, &key);
    wait_for_log(&a, "peer listener");
    let addr = net.peer_addr(1, 0);
    let k = key_bytes(&hexkey);
    let a_addr = addr.clone();
    net.run_in(1, move || {
        // Not a volfs peer at all.
        let mut s = TcpStream::connect(&a_addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(closed(&mut s), "garbage: connection not closed");
        // A volfs peer of another protocol version only.
        let mut s = TcpStream::connect(&a_addr).unwrap();
        s.write_all(&preamble(&[99])).unwrap();
        assert!(closed(&mut s), "version 99: connection not closed");
        // Authenticated, then a frame over the limit.
        let mut f = Fake::handshake(TcpStream::connect(&a_addr).unwrap(), &k, true, &[1]).unwrap();
        f.send(&Msg::Hello {
            host: "fake".into(),
            version: 1,
        });
        assert!(matches!(f.recv(), Some(Msg::Hello { .. })));
        f.send(&Msg::Ping { nonce: 5 });
        assert_eq!(f.recv(), Some(Msg::Pong { nonce: 5 }));
        f.s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
        assert!(closed(&mut f.s), "oversized frame: connection not closed");
        // Authenticated, then bytes that do not decrypt.
        let mut f = Fake::handshake(TcpStream::connect(&a_addr).unwrap(), &k, true, &[1]).unwrap();
        let mut junk = 100u32.to_be_bytes().to_vec();
        junk.extend([0x5a; 100]);
        f.s.write_all(&junk).unwrap();
        assert!(
            closed(&mut f.s),
            "undecryptable frame: connection not closed"
        );
        // Too many ids in one request.
        let mut f = Fake::handshake(TcpStream::connect(&a_addr).unwrap(), &k, true, &[1]).unwrap();
        f.send(&Msg::Hello {
            host: "fake".into(),
            version: 1,
        });
        f.recv();
        f.send(&Msg::HasChunks {
            ids: vec![[0; 32]; 5000],
        });
        assert!(closed(&mut f.s), "5000 ids: connection not closed");
    });
    let log = a.log();
    for what in [
        "not a volfs peer",
        "no common peer protocol version",
        "over the limit",
        "does not decrypt",
        "over the limit of 4096",
    ] {
        assert!(log.contains(what), "the log does not say {what:?}:\n{log}");
    }
    // The daemon still serves peers and its API.
    b.cli_ok(&["peer", "add", "a", &addr]);
    let j = peers_json(&b);
    assert_eq!(j[0]["authenticated"], true, "{j:?}");
    a.status();
}

#[test]
fn corrupt_chunk_is_repaired_from_a_peer_and_bad_copies_are_refused() {
    let net = Net::new(3);
    let hexkey = keygen();
    let (_k, key) = key_file(&hexkey);
    let mut a = daemon(&net, 0, &key);
    let mut b = daemon(&net, 1, &key);
    wait_for_log(&b, "peer listener");
    let data = pseudo_random(1 << 20, 42);
    let fa = write_file(&a, &data);
    let fb = write_file(&b, &data);
    let id = largest_chunk(&a);
    assert!(
        records(&std::fs::read(&pack_files(&b)[0]).unwrap())
            .iter()
            .any(|r| r.2 == id),
        "B's store does not hold the chunk"
    );

    // A liar in namespace 2: holds everything, sends wrong bytes. Named so that A asks it
    // first.
    let k = key_bytes(&hexkey);
    let liar_ns = format!("/run/netns/{}", net.ns[2]);
    let liar_ip = net.ip_of(0, 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let liar = std::thread::spawn(move || {
        let ns = std::fs::File::open(&liar_ns).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own; affects this thread only.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let l = std::net::TcpListener::bind(format!("{liar_ip}:9568")).unwrap();
        tx.send(()).unwrap();
        let mut served = 0;
        // Serve connections until the test says stop (a connection with "stop" as host).
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let Some(mut f) = Fake::handshake(s, &k, false, &[1]) else {
                continue;
            };
            let Some(Msg::Hello { host, .. }) = f.recv() else {
                continue;
            };
            if host == "stop" {
                return served;
            }
            f.send(&Msg::Hello {
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
                        served += 1;
                        Msg::Chunk {
                            id,
                            data: b"these are not the bytes you are looking for".to_vec(),
                        }
                    }
                    _ => break,
                };
                f.send(&answer);
            }
        }
        served
    });
    rx.recv().unwrap();
    a.cli_ok(&["peer", "add", "a-liar", &net.peer_addr(0, 2)]);
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);

    corrupt(&mut a, &id);
    assert_eio(&fa);
    let packs_before: u64 = pack_files(&a)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let out = a.cli(&["fsck", "--repair"]);
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let chunk = hex(&id);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&chunk))
        .unwrap_or_else(|| panic!("fsck does not name chunk {chunk}:\n{}", out.stdout));
    assert!(
        line.contains("repaired: intact copy from peer b ("),
        "{line}"
    );
    assert_eq!(std::fs::read(&fa).unwrap(), data, "the file after repair");
    let j = a.cli_ok(&["fsck", "--json"]).json();
    assert!(j["problems"].as_array().unwrap().is_empty(), "{j}");
    let m = net.metrics(0, &a);
    assert_eq!(counter(&m, "volfs_peer_chunks_repaired_total"), 1.0, "{m}");
    assert!(
        counter(&m, "volfs_peer_chunks_rejected_total") >= 1.0,
        "{m}"
    );
    let packs_after: u64 = pack_files(&a)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(packs_after > packs_before, "the good copy was appended");

    // Now B's copy is bad too: B answers that it holds no intact copy, the liar's bytes are
    // rejected, and the chunk stays unrepairable.
    corrupt(&mut a, &id);
    corrupt(&mut b, &id);
    assert_eio(&fb);
    let out = a.cli(&["fsck", "--repair"]);
    assert_eq!(out.code(), Some(1), "{}", out.stdout);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&chunk))
        .unwrap_or_else(|| panic!("fsck does not name chunk {chunk}:\n{}", out.stdout));
    assert!(line.contains("not repaired"), "{line}");
    assert!(line.contains("peer b: does not hold it"), "{line}");
    assert!(
        line.contains("peer a-liar: sent bytes that do not match"),
        "{line}"
    );
    assert_eio(&fa);
    // No corrupt data was stored: a plain check still finds the chunk corrupt.
    let out = a.cli(&["fsck"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stdout.contains(&chunk), "{}", out.stdout);

    // Without peers: unrepairable as before.
    a.cli_ok(&["peer", "rm", "b"]);
    a.cli_ok(&["peer", "rm", "a-liar"]);
    let out = a.cli(&["fsck", "--repair"]);
    assert_eq!(out.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("no intact copy on this host"),
        "{}",
        out.stdout
    );

    // Stop the liar.
    let stop_ip = net.ip_of(0, 2);
    net.run_in(0, move || {
        let s = TcpStream::connect(format!("{stop_ip}:9568")).unwrap();
        let mut f = Fake::handshake(s, &k, true, &[1]).unwrap();
        f.send(&Msg::Hello {
            host: "stop".into(),
            version: 1,
        });
    });
    assert!(liar.join().unwrap() >= 2, "the liar was asked");
}

#[test]
fn scrub_repairs_from_a_peer() {
    let net = Net::new(2);
    let (_k, key) = key_file(&keygen());
    let mut a = daemon(&net, 0, &key);
    let b = daemon(&net, 1, &key);
    wait_for_log(&b, "peer listener");
    let data = pseudo_random(500_000, 3);
    let fa = write_file(&a, &data);
    write_file(&b, &data);
    a.cli_ok(&["peer", "add", "b", &net.peer_addr(0, 1)]);
    let id = largest_chunk(&a);
    corrupt(&mut a, &id);
    let j = a.cli_ok(&["scrub", "--json"]).json();
    assert!(j["corrupt"].as_array().unwrap().is_empty(), "{j}");
    let rep = &j["repaired_from_peers"][0];
    assert_eq!(rep["chunk"], hex(&id), "{j}");
    assert!(rep["from"].as_str().unwrap().starts_with("peer b"), "{j}");
    assert_eq!(std::fs::read(&fa).unwrap(), data);
}
