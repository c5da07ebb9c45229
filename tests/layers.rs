//! Layers, snapshots, clones, rollback, image layers, gc and fsck, against a real daemon and
//! real FUSE mounts.
mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn fsync_write(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Every file, directory and symlink under `root`: relative path -> description.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                out.insert(rel, format!("dir {:o}", md.mode() & 0o7777));
                walk(root, &p, out);
            } else if md.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link {}", fs::read_link(&p).unwrap().display()),
                );
            } else {
                let data = fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                out.insert(
                    rel,
                    format!(
                        "file {:o} {} {}",
                        md.mode() & 0o7777,
                        data.len(),
                        blake3::hash(&data).to_hex()
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_tree_eq(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    if got != want {
        let mut diff = Vec::new();
        for (k, v) in want {
            match got.get(k) {
                None => diff.push(format!("missing {k} ({v})")),
                Some(g) if g != v => diff.push(format!("{k}: got {g}, want {v}")),
                _ => {}
            }
        }
        for k in got.keys().filter(|k| !want.contains_key(*k)) {
            diff.push(format!("unexpected {k} ({})", got[k]));
        }
        panic!("{what}: trees differ:\n  {}", diff.join("\n  "));
    }
}

fn snapshots(d: &Daemon, vol: &str) -> Vec<Value> {
    d.cli_ok(&["snapshot", "ls", vol, "--json"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn snapshot_of_a_mounted_volume_holds_acknowledged_writes_and_nothing_later() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("db", &[]);
    fs::create_dir(m.join("dir")).unwrap();
    fsync_write(&m.join("dir/synced"), &pseudo_random(3 * MIB, 1));
    // Written and closed, never fsynced.
    fs::write(m.join("closed"), b"closed data").unwrap();
    // Written, still open, never fsynced or closed: acknowledged all the same.
    let mut open = File::create(m.join("open")).unwrap();
    open.write_all(&pseudo_random(MIB + 17, 2)).unwrap();
    let before = tree(&m);

    let t0 = std::time::Instant::now();
    d.cli_ok(&["snapshot", "create", "db", "--name", "s1"]);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "snapshot took {took:?}");

    // After the snapshot: more writes through the open handle, new files, deletions.
    open.write_all(b"after").unwrap();
    drop(open);
    fs::write(m.join("closed"), b"changed").unwrap();
    fs::remove_file(m.join("dir/synced")).unwrap();
    fs::write(m.join("new"), b"new").unwrap();
    let after = tree(&m);
    assert_ne!(before, after);

    let s = d.fresh_dir("snap");
    d.cli_ok(&["mount", "db@s1", s.to_str().unwrap()]);
    assert_tree_eq(&tree(&s), &before, "snapshot s1");
    assert_errno(
        File::create(s.join("x")),
        libc::EROFS,
        "creating a file in a snapshot",
    );
    assert_errno(
        OpenOptions::new().write(true).open(s.join("closed")),
        libc::EROFS,
        "opening a snapshot's file for writing",
    );
    assert_tree_eq(&tree(&m), &after, "volume after the snapshot");
    let list = snapshots(&d, "db");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "s1");

    // Both survive kill -9 and a restart (mounts come back).
    d.kill9();
    d.start_again();
    assert_tree_eq(&tree(&s), &before, "snapshot s1 after kill -9");
    assert_tree_eq(&tree(&m), &after, "volume after kill -9");
    d.unmount(&s).unwrap();

    // A second snapshot on top of the first, then a snapshot name clash.
    d.cli_ok(&["snapshot", "create", "db", "--name", "s2"]);
    let out = d.cli(&["snapshot", "create", "db", "--name", "s2"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("exists"), "{out}");
    let s2 = d.fresh_dir("snap2");
    d.cli_ok(&["mount", "db@s2", s2.to_str().unwrap()]);
    assert_tree_eq(&tree(&s2), &after, "snapshot s2");
    d.unmount(&s2).unwrap();
    // Bad names and unknown snapshots are clear errors.
    for (args, want) in [
        (
            vec!["snapshot", "create", "db", "--name", "a/b"],
            "snapshot name",
        ),
        (vec!["snapshot", "rm", "db"], "VOLUME@SNAPSHOT"),
        (vec!["snapshot", "rm", "db@nope"], "not found"),
        (vec!["mount", "db@nope", s2.to_str().unwrap()], "not found"),
        (vec!["snapshot", "ls", "nope"], "not found"),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.code(), Some(1), "{args:?}: {out}");
        assert!(out.stderr.contains(want), "{args:?}: {out}");
    }
    d.cli_ok(&["snapshot", "rm", "db@s1"]);
    assert_eq!(snapshots(&d, "db").len(), 1);
    assert_tree_eq(&tree(&m), &after, "volume after removing s1");
}

#[test]
fn clones_are_independent_both_ways() {
    let d = Daemon::start();
    let a = d.volume_mounted("src", &[]);
    fs::create_dir_all(a.join("d/e")).unwrap();
    fs::write(a.join("d/e/f"), pseudo_random(2 * MIB, 3)).unwrap();
    fs::write(a.join("keep"), b"keep").unwrap();
    fs::write(a.join("shared"), b"original").unwrap();
    fs::hard_link(a.join("shared"), a.join("shared-link")).unwrap();
    std::os::unix::fs::symlink("d/e/f", a.join("sym")).unwrap();
    fs::set_permissions(a.join("keep"), fs::Permissions::from_mode(0o600)).unwrap();
    let base = tree(&a);

    // Clone while mounted and in use.
    d.cli_ok(&["volume", "clone", "src", "dst"]);
    let b = d.mount("dst", false);
    assert_tree_eq(&tree(&b), &base, "fresh clone");
    assert_eq!(fs::metadata(b.join("shared")).unwrap().nlink(), 2);

    // Change both sides differently.
    fs::write(a.join("shared"), b"changed in src").unwrap();
    fs::remove_file(a.join("keep")).unwrap();
    fs::rename(a.join("d"), a.join("d2")).unwrap();
    fs::write(b.join("only-in-dst"), b"dst").unwrap();
    OpenOptions::new()
        .append(true)
        .open(b.join("d/e/f"))
        .unwrap()
        .write_all(b"tail")
        .unwrap();
    fs::set_permissions(b.join("keep"), fs::Permissions::from_mode(0o644)).unwrap();

    let ta = tree(&a);
    let tb = tree(&b);
    assert_eq!(ta["shared"], ta["shared-link"], "hard link in src");
    assert!(!ta.contains_key("keep") && ta.contains_key("d2/e/f") && !ta.contains_key("d"));
    assert_eq!(tb["shared"], base["shared"], "dst saw src's write");
    assert_eq!(tb["keep"].split(' ').nth(1), Some("644"));
    assert!(tb.contains_key("only-in-dst") && !ta.contains_key("only-in-dst"));
    assert_ne!(tb["d/e/f"], base["d/e/f"]);
    assert_eq!(ta["d2/e/f"], base["d/e/f"], "src saw dst's append");
    assert_eq!(fs::read(a.join("shared-link")).unwrap(), b"changed in src");
    assert_eq!(fs::read(b.join("shared-link")).unwrap(), b"original");

    // Clone of a snapshot, with --from, and of an unmounted volume.
    d.cli_ok(&["snapshot", "create", "src", "--name", "s"]);
    fs::write(a.join("after-snap"), b"x").unwrap();
    d.cli_ok(&["volume", "create", "from-snap", "--from", "src@s"]);
    let c = d.mount("from-snap", false);
    assert_tree_eq(&tree(&c), &ta, "clone of src@s");
    fs::write(c.join("mine"), b"c").unwrap();
    assert!(!a.join("mine").exists());
    d.unmount(&b).unwrap();
    d.cli_ok(&["volume", "clone", "dst", "dst2"]);
    let e = d.mount("dst2", false);
    assert_tree_eq(&tree(&e), &tb, "clone of unmounted dst");

    // The source can go; clones keep their data.
    d.unmount(&a).unwrap();
    d.cli_ok(&["volume", "rm", "src"]);
    d.cli_ok(&["gc"]);
    let mut want = ta.clone();
    want.insert("mine".into(), tree(&c)["mine"].clone());
    assert_tree_eq(
        &tree(&c),
        &want,
        "clone after its source was removed and gc ran",
    );
    assert_tree_eq(&tree(&e), &tb, "second clone after gc");
    let out = d.cli(&["fsck"]);
    assert!(out.success(), "{out}");

    // df: the clones share the big file.
    let df = d.cli_ok(&["df", "--json"]).json();
    let ratio = df["dedup_ratio"].as_f64().unwrap();
    assert!(ratio > 1.5, "dedup ratio {ratio}: {df}");
    let shared: u64 = df["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["shared"].as_u64().unwrap())
        .sum();
    assert!(shared >= 2 * 2 * MIB as u64, "{df}");
    // Refused: clone onto an existing name, from a missing volume.
    for (args, want) in [
        (vec!["volume", "clone", "dst", "dst2"], "exists"),
        (vec!["volume", "clone", "nope", "z"], "not found"),
        (vec!["volume", "clone", "dst@nope", "z"], "not found"),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.code(), Some(1), "{args:?}: {out}");
        assert!(out.stderr.contains(want), "{args:?}: {out}");
    }
}

#[test]
fn rollback_resets_a_volume_to_a_snapshot() {
    let d = Daemon::start();
    let mut m = d.volume_mounted("ci-db", &[]);
    for i in 0..20 {
        fs::write(m.join(format!("row{i}")), format!("{i}")).unwrap();
    }
    fs::write(m.join("big"), pseudo_random(MIB, 4)).unwrap();
    let fixture = tree(&m);
    let used_before = d.inspect("ci-db").unwrap()["bytes_used"].as_u64().unwrap();
    d.cli_ok(&["snapshot", "create", "ci-db", "--name", "fixture"]);
    let mut seen_inos: Vec<u64> = Vec::new();
    for round in 0..3u64 {
        // A test run scribbles over the database.
        fs::remove_file(m.join("row3")).unwrap();
        fs::write(m.join("big"), pseudo_random(3 * MIB, 10 + round)).unwrap();
        fs::write(m.join("junk"), b"junk").unwrap();
        seen_inos.push(fs::metadata(m.join("junk")).unwrap().ino());
        // Refused while mounted.
        let out = d.cli(&["volume", "rollback", "ci-db@fixture"]);
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(out.stderr.contains("unmount"), "{out}");
        d.unmount(&m).unwrap();
        d.cli_ok(&["volume", "rollback", "ci-db@fixture"]);
        m = d.mount("ci-db", false);
        assert_tree_eq(&tree(&m), &fixture, &format!("after rollback {round}"));
        let used = d.inspect("ci-db").unwrap()["bytes_used"].as_u64().unwrap();
        assert_eq!(used, used_before, "bytes used after rollback");
        // New files never reuse an inode number handed out before.
        fs::write(m.join("fresh"), b"f").unwrap();
        let ino = fs::metadata(m.join("fresh")).unwrap().ino();
        assert!(!seen_inos.contains(&ino), "inode {ino} reused");
        seen_inos.push(ino);
        fs::remove_file(m.join("fresh")).unwrap();
    }
    let out = d.cli(&["volume", "rollback", "ci-db"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("VOLUME@SNAPSHOT"), "{out}");
}

/// A layer tarball built in the test.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }
    fn dir(mut self, p: &str) -> Tar {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, p, std::io::empty()).unwrap();
        self
    }
    fn file(mut self, p: &str, data: &[u8]) -> Tar {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, p, data).unwrap();
        self
    }
    fn link(mut self, kind: tar::EntryType, p: &str, target: &str) -> Tar {
        let mut h = Self::header(kind, 0o777, 0);
        h.set_link_name(target).unwrap();
        self.0.append_data(&mut h, p, std::io::empty()).unwrap();
        self
    }
    fn write(self, path: &Path) {
        fs::write(path, self.0.into_inner().unwrap()).unwrap();
    }
}

#[test]
fn image_layers_import_with_whiteouts_and_export() {
    let d = Daemon::start();
    let big = pseudo_random(MIB + 5, 7);
    let l1 = d.root.join("l1.tar");
    Tar::new()
        .dir("etc")
        .file("etc/a", b"a from l1")
        .file("etc/b", b"b from l1")
        .dir("opt")
        .file("opt/old1", b"1")
        .dir("opt/sub")
        .file("opt/sub/old2", b"2")
        .file("bin/tool", &big) // parent not listed: made implicitly
        .link(tar::EntryType::Symlink, "bin/alias", "tool")
        .link(tar::EntryType::Link, "bin/hard", "bin/tool")
        .write(&l1);
    let l2 = d.root.join("l2.tar");
    Tar::new()
        .file("etc/.wh.a", b"")
        .file("etc/c", b"c from l2")
        .file("etc/b", b"b from l2")
        .dir("opt")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/new", b"new")
        .write(&l2);

    let id1 = d
        .cli_ok(&["layer", "import", l1.to_str().unwrap()])
        .stdout
        .trim()
        .to_string();
    let id2 = d
        .cli_ok(&["layer", "import", l2.to_str().unwrap()])
        .stdout
        .trim()
        .to_string();
    assert_eq!(id1.len(), 64, "{id1}");
    assert_ne!(id1, id2);
    // Content addressed: the same tarball again is the same layer, stored once.
    let again = d
        .cli_ok(&["layer", "import", l1.to_str().unwrap()])
        .stdout
        .trim()
        .to_string();
    assert_eq!(again, id1);
    let layers = d.cli_ok(&["layer", "ls", "--json"]).json();
    assert_eq!(layers.as_array().unwrap().len(), 2, "{layers}");

    d.cli_ok(&[
        "volume",
        "create",
        "img",
        "--layers",
        &format!("{id1},{id2}"),
    ]);
    let m = d.mount("img", false);
    let t = tree(&m);
    assert!(!t.contains_key("etc/a"), "whiteout ignored: {t:?}");
    assert_eq!(fs::read(m.join("etc/b")).unwrap(), b"b from l2");
    assert_eq!(fs::read(m.join("etc/c")).unwrap(), b"c from l2");
    assert_eq!(fs::read(m.join("opt/new")).unwrap(), b"new");
    assert!(
        !m.join("opt/old1").exists() && !m.join("opt/sub").exists(),
        "opaque dir ignored: {t:?}"
    );
    assert_eq!(fs::read(m.join("bin/tool")).unwrap(), big);
    assert_eq!(
        fs::read_link(m.join("bin/alias")).unwrap(),
        PathBuf::from("tool")
    );
    let md = fs::metadata(m.join("bin/hard")).unwrap();
    assert_eq!(md.nlink(), 2);
    assert_eq!(md.ino(), fs::metadata(m.join("bin/tool")).unwrap().ino());
    assert_eq!(md.uid(), 1000);
    assert!(
        !t.keys().any(|k| k.contains(".wh.")),
        "whiteout files visible: {t:?}"
    );
    // The volume is writable and independent of the layers.
    fs::write(m.join("etc/b"), b"mine").unwrap();
    fs::remove_file(m.join("bin/tool")).unwrap();
    let info = d.inspect("img").unwrap();
    assert_eq!(info["image"], serde_json::json!([id1, id2]));
    // A second volume on the same image shares the base and is unaffected.
    d.cli_ok(&[
        "volume",
        "create",
        "img2",
        "-o",
        &format!("layers={id1},{id2}"),
    ]);
    let m2 = d.mount("img2", false);
    assert_eq!(fs::read(m2.join("etc/b")).unwrap(), b"b from l2");
    assert_eq!(fs::read(m2.join("bin/hard")).unwrap(), big);
    // Only l1: etc/a is there.
    d.cli_ok(&["volume", "create", "base", "--layers", &id1]);
    let m3 = d.mount("base", false);
    assert_eq!(fs::read(m3.join("etc/a")).unwrap(), b"a from l1");
    assert_eq!(fs::read(m3.join("opt/sub/old2")).unwrap(), b"2");

    // Export gives back an equivalent tarball (whiteouts included): re-importing it yields the
    // same layer id.
    let out = d.root.join("l2-export.tar");
    d.cli_ok(&["layer", "export", &id2, "-o", out.to_str().unwrap()]);
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(File::open(&out).unwrap());
    for e in ar.entries().unwrap() {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    for want in ["etc/.wh.a", "etc/c", "opt/.wh..wh..opq", "opt/new"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from export: {names:?}"
        );
    }
    let out1 = d.root.join("l1-export.tar");
    d.cli_ok(&["layer", "export", &id1, "-o", out1.to_str().unwrap()]);
    let re = d
        .cli_ok(&["layer", "import", out1.to_str().unwrap()])
        .stdout
        .trim()
        .to_string();
    assert_eq!(re, id1, "export + import changed the layer");

    // Bad input: not a tarball, a path escaping the layer, an unknown layer id.
    let junk = d.root.join("junk.tar");
    fs::write(&junk, pseudo_random(10_000, 9)).unwrap();
    let escape = d.root.join("escape.tar");
    {
        // tar::Builder refuses "..", so write the header by hand.
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../evil\0\0");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(&[0u8; 1024]);
        fs::write(&escape, v).unwrap();
    }
    for (args, want) in [
        (vec!["layer", "import", junk.to_str().unwrap()], "tarball"),
        (
            vec!["layer", "import", escape.to_str().unwrap()],
            "leaves the layer",
        ),
        (vec!["layer", "import", "/nonexistent.tar"], "nonexistent"),
        (
            vec!["layer", "export", &"0".repeat(64), "-o", "/tmp/x.tar"],
            "not found",
        ),
        (vec!["layer", "export", "xyz", "-o", "/tmp/x.tar"], "hex"),
        (
            vec!["volume", "create", "bad", "--layers", &"1".repeat(64)],
            "not found",
        ),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.code(), Some(1), "{args:?}: {out}");
        assert!(out.stderr.contains(want), "{args:?}: {out}");
    }
    let out = d.cli(&["fsck"]);
    assert!(out.success(), "{out}");
    // Removing an imported layer keeps the volumes built on it intact, even after gc.
    d.cli_ok(&["layer", "rm", &id1, &id2]);
    d.cli_ok(&["gc"]);
    assert_eq!(fs::read(m2.join("bin/tool")).unwrap(), big);
    assert_eq!(fs::read(m3.join("etc/a")).unwrap(), b"a from l1");
}

#[test]
fn gc_under_concurrent_writes_loses_nothing_and_returns_space() {
    let d = Daemon::start();
    let empty = dir_bytes(&d.data.join("packs"));
    let m = d.volume_mounted("busy", &[]);
    let g = d.volume_mounted("garbage", &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let m = m.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) || i < 20 {
                let data = pseudo_random(64 * 1024 + (i as usize * 7919) % 300_000, 1000 + i);
                let p = m.join(format!("f{i}"));
                fsync_write(&p, &data);
                // Overwrite some, so that chunks die while gc runs.
                if i.is_multiple_of(3) && i > 0 {
                    let q = m.join(format!("f{}", i - 1));
                    let data2 = pseudo_random(100_000, 5000 + i);
                    fsync_write(&q, &data2);
                    written[(i - 1) as usize] = (q, data2);
                }
                written.push((p, data));
                i += 1;
            }
            written
        })
    };
    for round in 0..6u64 {
        // Garbage: written, snapshotted, deleted, the snapshot removed.
        fsync_write(&g.join("junk"), &pseudo_random(2 * MIB, 77 + round));
        d.cli_ok(&[
            "snapshot",
            "create",
            "garbage",
            "--name",
            &format!("s{round}"),
        ]);
        fs::remove_file(g.join("junk")).unwrap();
        d.cli_ok(&["snapshot", "rm", &format!("garbage@s{round}")]);
        d.cli_ok(&["snapshot", "create", "busy", "--name", &format!("b{round}")]);
        let r = d.cli_ok(&["gc", "--json"]).json();
        assert!(r["chunks_freed"].as_u64().is_some(), "{r}");
        if round % 2 == 1 {
            d.cli_ok(&["snapshot", "rm", &format!("busy@b{}", round - 1)]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written.len() >= 20);
    // Nothing lost: through the page cache and from the store itself.
    for (p, data) in &written {
        assert_eq!(&fs::read(p).unwrap(), data, "{} after gc", p.display());
    }
    d.unmount(&m).unwrap();
    d.unmount(&g).unwrap();
    let m2 = d.mount("busy", false);
    for (p, data) in &written {
        let q = m2.join(p.file_name().unwrap());
        assert_eq!(
            &fs::read(&q).unwrap(),
            data,
            "{} after remount",
            q.display()
        );
    }
    let out = d.cli(&["fsck"]);
    assert!(out.success(), "fsck after gc: {out}");
    // Everything deleted and collected: the packs are back to (nearly) nothing.
    d.unmount(&m2).unwrap();
    d.cli_ok(&["volume", "rm", "busy", "garbage"]);
    let r = d.cli_ok(&["gc", "--json"]).json();
    let left = dir_bytes(&d.data.join("packs"));
    assert!(
        left <= empty + (1 << 20),
        "packs hold {left} bytes after deleting everything (empty store: {empty}); gc: {r}"
    );
}

fn dir_bytes(p: &Path) -> u64 {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn fsck_finds_a_corrupt_chunk_and_a_dangling_reference() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("vol", &[]);
    fs::create_dir(m.join("dir")).unwrap();
    fsync_write(&m.join("dir/victim"), &pseudo_random(300_000, 11));
    fsync_write(&m.join("gone"), b"inode will vanish");
    let ino = fs::metadata(m.join("gone")).unwrap().ino();
    let out = d.cli(&["fsck"]);
    assert!(out.success(), "fsck on a healthy store: {out}");
    d.unmount(&m).unwrap();
    let _ = d.stop();

    // Damage the store behind the daemon's back, with the library.
    let victim_chunk;
    {
        let store = volfs::store::Store::open(&d.data, &Default::default()).unwrap();
        let reg = volfs::volume::Registry::new(Arc::new(store));
        let rec = reg
            .require(&volfs::ids::VolumeName::new("vol").unwrap())
            .unwrap();
        let e = &reg.store().engine;
        // The inode of "gone" disappears: its directory entry dangles.
        let mut b = volfs::db::Batch::new();
        b.delete(volfs::db::Cf::Inodes, volfs::meta::inode_key(rec.top, ino));
        e.write(b, true).unwrap();
        // Flip a byte in a chunk of dir/victim.
        let (_, ext) = e
            .scan_prefix(volfs::db::Cf::Extents, &volfs::meta::tree_prefix(rec.top))
            .unwrap()
            .into_iter()
            .next()
            .expect("an extent");
        let ext: volfs::meta::Extent =
            volfs::meta::decode(volfs::meta::EXTENT_VERSION, "extent", &ext).unwrap();
        victim_chunk = ext.chunk;
        let loc = reg.store().chunks.location(&ext.chunk).unwrap().unwrap();
        let path = reg.store().chunks.pack_path(loc.pack);
        let mut pack = fs::read(&path).unwrap();
        pack[loc.offset as usize + 48 + 100] ^= 0x55;
        fs::write(&path, pack).unwrap();
    }
    d.start_again();
    let out = d.cli(&["fsck", "--json"]);
    assert_eq!(out.code(), Some(1), "fsck must fail: {out}");
    let r = out.json();
    let problems = r["problems"].as_array().unwrap();
    let find = |kind: &str| {
        problems
            .iter()
            .find(|p| p["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} problem in {r}"))
            .clone()
    };
    let corrupt = find("corrupt-chunk");
    let detail = corrupt["detail"].as_str().unwrap();
    assert!(detail.contains(&victim_chunk.to_hex()), "{detail}");
    assert!(
        detail.contains("vol:/dir/victim"),
        "fsck does not name the file: {detail}"
    );
    let dangling = find("dangling-entry");
    assert!(
        dangling["detail"].as_str().unwrap().contains("vol:/gone"),
        "{dangling}"
    );

    // Repair: the dangling entry goes; the corrupt chunk a file uses cannot be fixed here.
    let out = d.cli(&["fsck", "--repair", "--json"]);
    assert_eq!(out.code(), Some(1), "{out}");
    let r = out.json();
    let outcome = |kind: &str| {
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == kind)
            .map(|p| p["outcome"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert!(outcome("dangling-entry").starts_with("repaired"), "{r}");
    assert!(outcome("corrupt-chunk").starts_with("not repaired"), "{r}");
    let out = d.cli(&["fsck", "--json"]);
    let r = out.json();
    let kinds: Vec<&str> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["corrupt-chunk"], "{r}");
    let m = d.mount("vol", false);
    assert!(!m.join("gone").exists());
    assert_errno(
        fs::read(m.join("dir/victim")),
        libc::EIO,
        "reading the corrupt file",
    );
}

#[test]
fn deep_stacks_of_snapshots_stay_correct() {
    let d = Daemon::start();
    let m = d.volume_mounted("deep", &[]);
    let mut expected: Vec<BTreeMap<String, String>> = Vec::new();
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    fs::create_dir(m.join("a")).unwrap();
    for round in 0..25u64 {
        for _ in 0..6 {
            let n = next() % 12;
            let p = m.join(if n % 2 == 0 {
                format!("a/f{n}")
            } else {
                format!("f{n}")
            });
            match next() % 5 {
                0 => {
                    let _ = fs::remove_file(&p);
                }
                1 => {
                    let q = m.join(format!("f{}", next() % 12));
                    let _ = fs::rename(&p, &q);
                }
                2 if p.exists() => {
                    let f = OpenOptions::new().write(true).open(&p).unwrap();
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&pseudo_random(5000, next()), next() % 100_000)
                        .unwrap();
                }
                _ => fs::write(&p, pseudo_random((next() % 200_000) as usize, next())).unwrap(),
            }
        }
        d.cli_ok(&["snapshot", "create", "deep", "--name", &format!("r{round}")]);
        expected.push(tree(&m));
    }
    let info = d.inspect("deep").unwrap();
    assert_eq!(info["layers"], 25, "{info}");
    for round in [0usize, 7, 13, 24] {
        let s = d.fresh_dir("s");
        d.cli_ok(&["mount", &format!("deep@r{round}"), s.to_str().unwrap()]);
        assert_tree_eq(&tree(&s), &expected[round], &format!("snapshot r{round}"));
        d.unmount(&s).unwrap();
    }
    assert_tree_eq(&tree(&m), &expected[24], "the volume on a 25-deep stack");
    let out = d.cli(&["fsck"]);
    assert!(out.success(), "{out}");
}
