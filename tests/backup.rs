//! Volume export/import (tarballs) and backups/restores (backup repositories), against a real
//! daemon and real FUSE mounts.
mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    let rc = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let n = unsafe {
        libc::llistxattr(
            c(p).as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    let mut out = BTreeMap::new();
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let m = unsafe {
            libc::lgetxattr(
                c(p).as_ptr(),
                cn.as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                v.len(),
            )
        };
        assert!(m >= 0, "getxattr on {}", p.display());
        v.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

fn set_times(p: &Path, secs: i64, nsec: i64) {
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(p: &Path, uid: u32, gid: u32) {
    let rc = unsafe { libc::lchown(c(p).as_ptr(), uid, gid) };
    assert_eq!(rc, 0, "chown {}", p.display());
}

/// Everything a walk of `root` sees: relative path -> description (type, mode, owner, size,
/// mtime, link target or content hash, xattrs, and the hard-link group).
fn walk(root: &Path) -> BTreeMap<String, String> {
    fn go(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<String, String>,
        links: &mut BTreeMap<u64, Vec<String>>,
    ) {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let what = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("symlink -> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                format!("file {} {}", md.size(), blake3::hash(&data).to_hex())
            } else {
                use std::os::unix::fs::FileTypeExt;
                if ft.is_fifo() {
                    "fifo".into()
                } else if ft.is_char_device() {
                    format!("chardev {:x}", md.rdev())
                } else {
                    format!("other {:o}", md.mode())
                }
            };
            if !ft.is_dir() && md.nlink() > 1 {
                links.entry(md.ino()).or_default().push(rel.clone());
            }
            out.insert(
                rel.clone(),
                format!(
                    "{what} mode {:o} owner {}:{} mtime {}.{:09} xattrs {:?}",
                    md.mode() & 0o7777,
                    md.uid(),
                    md.gid(),
                    md.mtime(),
                    md.mtime_nsec(),
                    xattrs(&p)
                ),
            );
            if ft.is_dir() {
                go(root, &p, out, links);
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut links = BTreeMap::new();
    go(root, root, &mut out, &mut links);
    let md = fs::metadata(root).unwrap();
    out.insert(
        ".".into(),
        format!(
            "root mode {:o} owner {}:{}",
            md.mode() & 0o7777,
            md.uid(),
            md.gid()
        ),
    );
    for (i, (_, mut group)) in links.into_iter().enumerate() {
        group.sort();
        out.insert(format!("hard link group {i}"), group.join(" = "));
    }
    out
}

fn assert_same_tree(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>, what: &str) {
    for (k, v) in a {
        assert_eq!(Some(v), b.get(k), "{what}: {k} differs");
    }
    for k in b.keys() {
        assert!(a.contains_key(k), "{what}: {k} is extra");
    }
}

/// Fills `m` with every kind of thing a volume holds.
fn populate(m: &Path) {
    fs::create_dir_all(m.join("a/b/c")).unwrap();
    fs::create_dir(m.join("sticky")).unwrap();
    fs::write(m.join("big"), pseudo_random(20 * MIB, 1)).unwrap();
    for i in 0..20 {
        fs::write(m.join(format!("a/b/small{i}")), format!("small file {i}\n")).unwrap();
    }
    fs::write(m.join("a/b/c/empty"), b"").unwrap();
    // A sparse file: 4 KiB of data in the middle of 16 MiB.
    let mut f = File::create(m.join("sparse")).unwrap();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(&[7u8; 4096]).unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    std::os::unix::fs::symlink("a/b/small1", m.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", m.join("a/dangling")).unwrap();
    fs::write(m.join("hard1"), b"linked data\n").unwrap();
    fs::hard_link(m.join("hard1"), m.join("a/hard2")).unwrap();
    fs::hard_link(m.join("hard1"), m.join("a/b/hard3")).unwrap();
    let rc = unsafe { libc::mkfifo(c(&m.join("fifo")).as_ptr(), 0o640) };
    assert_eq!(rc, 0, "mkfifo");
    let rc = unsafe {
        libc::mknod(
            c(&m.join("null")).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    set_xattr(&m.join("big"), "user.origin", b"test suite");
    set_xattr(&m.join("a"), "user.dir", b"\x00\x01binary\xff");
    set_xattr(&m.join("hard1"), "user.shared", b"by all links");
    set_xattr(&m.join("a/b/small3"), "trusted.x", b"t");
    chown(&m.join("a/b/small2"), 1234, 5678);
    chown(&m.join("a/b"), 42, 43);
    chown(&m.join("link-rel"), 7, 8);
    fs::set_permissions(m.join("a/b/small4"), fs::Permissions::from_mode(0o4751)).unwrap();
    fs::set_permissions(m.join("a/b/small5"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(m.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(m.join("a/b/c"), fs::Permissions::from_mode(0o700)).unwrap();
    // Times last, deepest first (creating entries changes their directory's mtime).
    let mut n = 0;
    for p in [
        "a/b/c/empty",
        "a/b/c",
        "a/b/small1",
        "a/b/small2",
        "a/b",
        "a/dangling",
        "a",
        "big",
        "sparse",
        "link-rel",
        "hard1",
        "fifo",
        "null",
        "sticky",
    ] {
        n += 1;
        set_times(
            &m.join(p),
            1_600_000_000 + n * 1000,
            if n % 2 == 0 { 123_456_789 } else { 0 },
        );
    }
}

fn export(d: &Daemon, what: &str, to: &Path) {
    let out = d.cli_sh(&format!(
        "\"$VOLFS\" volume export {what} > '{}'",
        to.display()
    ));
    assert!(out.success(), "export {what}: {out}\n{}", d.log());
    assert!(
        out.stderr.is_empty(),
        "export printed on stderr in a script: {out}"
    );
}

fn import(d: &Daemon, name: &str, from: &Path) -> CmdOut {
    d.cli_sh(&format!(
        "\"$VOLFS\" volume import {name} < '{}'",
        from.display()
    ))
}

fn snapshots(d: &Daemon, vol: &str) -> Vec<Value> {
    let v: Value = d
        .client()
        .get(&format!("/v1/volumes/{vol}/snapshots"))
        .unwrap();
    v.as_array().unwrap().clone()
}

#[test]
fn export_import_round_trip_and_gnu_tar() {
    let d = Daemon::start();
    let src = d.volume_mounted("src", &[]);
    populate(&src);
    let want = walk(&src);
    let tar = d.root.join("src.tar");
    export(&d, "src", &tar);
    assert!(snapshots(&d, "src").is_empty(), "export left a snapshot");

    // Import: the same tree.
    let out = import(&d, "dst", &tar);
    assert!(out.success(), "import: {out}\n{}", d.log());
    assert_eq!(out.stdout.trim(), "dst");
    let dst = d.mount("dst", false);
    assert_same_tree(&want, &walk(&dst), "export -> import");
    // Sparse stays sparse.
    let md = fs::metadata(dst.join("sparse")).unwrap();
    assert!(
        md.blocks() * 512 < (1 << 20),
        "sparse file got {} blocks",
        md.blocks()
    );

    // GNU tar reads it: a listing, and an extraction that matches the volume.
    let list = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(&tar)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "tar -tvf: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listing = String::from_utf8_lossy(&list.stdout);
    for p in [
        " big\n",
        " a/b/c/empty\n",
        " fifo\n",
        " a/hard2 link to a/b/hard3",
        " hard1 link to a/b/hard3",
        " link-rel -> a/b/small1",
    ] {
        assert!(listing.contains(p), "tar -t misses {p}:\n{listing}");
    }
    assert!(
        list.stderr.is_empty(),
        "tar -t warned: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    let x = d.volume_mounted("extracted", &[]);
    let st = std::process::Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(&tar)
        .arg("-C")
        .arg(&x)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "tar -x: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_same_tree(&want, &walk(&x), "export -> GNU tar -x");

    // A tarball made by GNU tar imports with the same fidelity.
    let gnu = d.root.join("gnu.tar");
    let st = std::process::Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--format=posix", "-cf"])
        .arg(&gnu)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "tar -c: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let out = import(&d, "fromgnu", &gnu);
    assert!(out.success(), "import of GNU tar: {out}\n{}", d.log());
    let g = d.mount("fromgnu", false);
    assert_same_tree(&want, &walk(&g), "GNU tar -c -> import");
    // An existing name is refused.
    let out = import(&d, "fromgnu", &gnu);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("already exists"), "{out}");
}

#[test]
fn export_of_a_mounted_volume_in_use_is_a_consistent_point() {
    let d = Daemon::start();
    let m = d.volume_mounted("busy", &[]);
    fs::write(m.join("other"), b"x").unwrap();
    let (stop, writer) = start_writer(&m.join("log"));
    std::thread::sleep(Duration::from_millis(300));
    let tar = d.root.join("busy.tar");
    export(&d, "busy", &tar);
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap().unwrap();
    let out = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(&tar)
        .arg("log")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -xO: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with('\n'), "the exported log ends mid-record");
    let n = text.lines().count() as u64;
    for (i, l) in text.lines().enumerate() {
        assert_eq!(l, format!("record {i}"), "line {i} of the exported log");
    }
    assert!(
        n > 0 && n < acked,
        "exported {n} records of {acked}: not a point while writing"
    );
    assert!(
        snapshots(&d, "busy").is_empty(),
        "export left a snapshot behind"
    );
}

fn repo_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            repo_bytes(&e.path())
        } else {
            md.len()
        };
    }
    total
}

fn file_hash(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

#[test]
fn backups_are_incremental_and_restore() {
    let d = Daemon::start();
    let m = d.volume_mounted("db", &[]);
    populate(&m);
    let big = pseudo_random(64 * MIB, 9);
    fs::write(m.join("data64"), &big).unwrap();
    let want1 = walk(&m);
    let hash1 = file_hash(&m.join("data64"));
    let repo = d.root.join("repo");
    let repo_s = repo.display().to_string();
    let out = d.cli_ok(&["backup", "db", "--to", &repo_s, "--name", "first", "--json"]);
    assert!(out.stderr.is_empty(), "progress in a script: {out}");
    let b1: Value = out.json();
    assert_eq!(b1["name"], "first");
    assert!(b1["new_bytes"].as_u64().unwrap() >= 84 * MIB as u64, "{b1}");
    assert!(snapshots(&d, "db").is_empty(), "backup left a snapshot");
    let size1 = repo_bytes(&repo);

    // Change 1 MiB in the middle of the 64 MiB file.
    let mut f = OpenOptions::new()
        .write(true)
        .open(m.join("data64"))
        .unwrap();
    f.seek(SeekFrom::Start(30 << 20)).unwrap();
    f.write_all(&pseudo_random(MIB, 77)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let want2 = walk(&m);
    let out = d.cli_ok(&[
        "backup", "db", "--to", &repo_s, "--name", "second", "--json",
    ]);
    let b2: Value = out.json();
    let size2 = repo_bytes(&repo);
    let added = size2 - size1;
    eprintln!(
        "incremental backup: repository grew by {added} bytes ({:.2} MiB); new_bytes {}",
        added as f64 / MIB as f64,
        b2["new_bytes"]
    );
    assert!(added < 4 * MIB as u64, "second backup added {added} bytes");
    assert!(
        added >= MIB as u64 / 2,
        "second backup added only {added} bytes"
    );

    let ls = d.cli_ok(&["backup", "ls", &repo_s, "--json"]).json();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    let table = d.cli_ok(&["backup", "ls", &repo_s]).stdout;
    assert!(
        table.contains("first") && table.contains("second") && table.contains("db"),
        "{table}"
    );

    // Restores: the new state, and the old one.
    let out = d.cli_ok(&["restore", &repo_s, "second", "r2"]);
    assert_eq!(out.stdout.trim(), "r2");
    let r2 = d.mount("r2", false);
    assert_same_tree(&want2, &walk(&r2), "restore of the second backup");
    d.cli_ok(&["restore", &repo_s, "first", "r1"]);
    let r1 = d.mount("r1", false);
    assert_eq!(
        file_hash(&r1.join("data64")),
        hash1,
        "the first backup's content"
    );
    assert_same_tree(&want1, &walk(&r1), "restore of the first backup");
    // A restored volume is a normal, writable volume.
    fs::write(r1.join("new-file"), b"hello").unwrap();
    assert_eq!(fs::read(r1.join("new-file")).unwrap(), b"hello");

    // A backup of a snapshot.
    d.cli_ok(&["snapshot", "create", "db", "--name", "s1"]);
    let b3 = d
        .cli_ok(&["backup", "db@s1", "--to", &repo_s, "--json"])
        .json();
    assert_eq!(b3["snapshot"], "s1");
    assert_eq!(
        b3["new_chunks"], 0,
        "nothing changed since the last backup: {b3}"
    );
}

#[test]
fn corrupt_chunks_and_bad_tarballs_leave_no_volume() {
    let d = Daemon::start();
    let m = d.volume_mounted("v", &[]);
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/precious"), pseudo_random(300 << 10, 5)).unwrap();
    let repo = d.root.join("repo");
    let repo_s = repo.display().to_string();
    d.cli_ok(&["backup", "v", "--to", &repo_s, "--name", "b"]);
    let mut chunk_files = Vec::new();
    for sub in fs::read_dir(repo.join("chunks")).unwrap() {
        for f in fs::read_dir(sub.unwrap().path()).unwrap() {
            chunk_files.push(f.unwrap().path());
        }
    }
    assert!(chunk_files.len() >= 2, "{chunk_files:?}");
    // Corrupt one chunk: restore fails naming it and the file; no volume is left.
    let victim = &chunk_files[0];
    let id = victim.file_name().unwrap().to_string_lossy().into_owned();
    let mut bytes = fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(victim, &bytes).unwrap();
    let out = d.cli(&["restore", &repo_s, "b", "restored"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    assert!(
        out.stderr.contains(&id),
        "error does not name chunk {id}: {out}"
    );
    assert!(
        out.stderr.contains("dir/precious"),
        "error does not name the file: {out}"
    );
    assert!(
        d.inspect("restored").is_err(),
        "a failed restore left a volume"
    );
    // A missing chunk, likewise.
    fs::remove_file(victim).unwrap();
    let out = d.cli(&["restore", &repo_s, "b", "restored"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(&id) && out.stderr.contains("missing"),
        "{out}"
    );
    assert!(
        d.inspect("restored").is_err(),
        "a failed restore left a volume"
    );

    // Bad tarballs: garbage, and a tarball cut off in the middle of a file.
    let garbage = d.root.join("garbage.tar");
    fs::write(&garbage, pseudo_random(4096, 3)).unwrap();
    let out = import(&d, "fromgarbage", &garbage);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    assert!(out.stderr.contains("not a valid tarball"), "{out}");
    assert!(
        d.inspect("fromgarbage").is_err(),
        "a failed import left a volume"
    );
    let tar = d.root.join("v.tar");
    export(&d, "v", &tar);
    let whole = fs::read(&tar).unwrap();
    let cut = d.root.join("cut.tar");
    fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let out = import(&d, "fromcut", &cut);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("tarball"), "{out}");
    assert!(
        d.inspect("fromcut").is_err(),
        "a failed import left a volume"
    );
    let empty = d.root.join("empty.tar");
    fs::write(&empty, b"").unwrap();
    let out = import(&d, "fromempty", &empty);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("empty"), "{out}");
    // The whole tarball still imports under that name.
    let out = import(&d, "fromcut", &tar);
    assert!(out.success(), "{out}");
}

#[test]
fn argument_errors_are_one_line() {
    let d = Daemon::start();
    d.create_volume("v", &[]);
    let repo = d.root.join("repo");
    let repo_s = repo.display().to_string();
    let one_line = |out: &CmdOut, code: i32, needle: &str| {
        assert_eq!(out.code(), Some(code), "{out}");
        assert_eq!(out.stderr.lines().count(), 1, "{out}");
        assert!(out.stderr.starts_with("volfs: "), "{out}");
        assert!(out.stderr.contains(needle), "expected {needle:?}: {out}");
    };
    one_line(
        &d.cli(&["backup", "v", "--to", "relative/repo"]),
        1,
        "absolute",
    );
    one_line(&d.cli(&["backup", "v"]), 2, "--to");
    one_line(
        &d.cli(&["backup", "nosuch", "--to", &repo_s]),
        1,
        "volume nosuch not found",
    );
    one_line(
        &d.cli(&["backup", "v@nosnap", "--to", &repo_s]),
        1,
        "snapshot v@nosnap not found",
    );
    d.cli_ok(&["backup", "v", "--to", &repo_s]);
    one_line(
        &d.cli(&["restore", &repo_s, "nosuch", "new"]),
        1,
        "backup nosuch",
    );
    one_line(&d.cli(&["restore", "repo", "nosuch", "new"]), 1, "absolute");
    one_line(&d.cli(&["restore", &repo_s, "nosuch"]), 2, "VOLUME");
    let not_repo = d.fresh_dir("not-a-repo");
    fs::write(not_repo.join("file"), b"x").unwrap();
    let nr = not_repo.display().to_string();
    one_line(
        &d.cli(&["backup", "ls", &nr]),
        1,
        "not a volfs backup repository",
    );
    one_line(
        &d.cli(&["backup", "v", "--to", &nr]),
        1,
        "not a volfs backup repository",
    );
    fs::write(
        repo.join("volfs-backup.json"),
        br#"{"format":"volfs-backup","version":9}"#,
    )
    .unwrap();
    one_line(&d.cli(&["backup", "ls", &repo_s]), 1, "version 9");
    one_line(
        &d.cli(&["volume", "export", "nosuch"]),
        1,
        "volume nosuch not found",
    );
    one_line(&d.cli(&["volume", "export", "v@nosnap"]), 1, "not found");
    let out = d.cli_sh("\"$VOLFS\" volume import v < /dev/null");
    one_line(&out, 1, "already exists");
    assert!(d.inspect("v").is_ok());
}
