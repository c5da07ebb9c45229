//! Mounts that survive a crash of the daemon (issue 8): the process that serves FUSE is
//! killed with `kill -9` while files are open, written, fsync'ed and locked; its supervisor
//! hands the live `/dev/fuse` connections to a new server process, which answers the requests
//! that waited. Nothing sees an error, nothing acknowledged is lost, locks and positions hold.
//!
//! Real daemons and FUSE mounts (see tests/common); run as root with a usable /dev/fuse.
mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn appending_writer_never_sees_an_error_across_20_kills() {
    let mut d = Daemon::start();
    let m = d.volume_mounted("counter", &[]);
    let path = m.join("counter.log");
    let (stop, writer) = start_writer(&path);
    let mut gaps = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(150));
        gaps.push(d.kill_server());
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let acked = writer
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("the writer saw an error: {e}\nlog:\n{}", d.log()));
    let worst = gaps.iter().max().unwrap();
    eprintln!("{acked} records; API back after each kill within {worst:?}");
    assert!(acked > 20, "only {acked} records in 20 restarts");
    assert!(
        *worst < Duration::from_secs(2),
        "a restart took {worst:?} (all: {gaps:?})"
    );
    let st = d.status();
    assert_eq!(st["server_restarts"], 20, "{st}");
    let want: Vec<u64> = (0..acked).collect();
    assert_eq!(records(&fs::read_to_string(&path).unwrap()), want);

    // Acknowledged means durable: kill the whole daemon, start it again, read it back.
    d.kill9();
    d.start_again();
    assert_eq!(
        records(&fs::read_to_string(&path).unwrap()),
        want,
        "after a kill -9 of the whole daemon"
    );
    d.unmount(&m).unwrap();
}

#[test]
fn open_files_positions_locks_and_listings_survive_a_kill() {
    let d = Daemon::start();
    let m = d.volume_mounted("held", &[]);
    let other = d.fresh_dir("held-2");
    d.cli_ok(&["mount", "held", other.to_str().unwrap()]);

    // A file open for writing at a position, a file open for reading mid-way, a directory
    // listing half read, and an exclusive flock.
    let mut w = File::create(m.join("w")).unwrap();
    w.write_all(b"before-").unwrap();
    fs::write(m.join("r"), b"0123456789").unwrap();
    let mut r = File::open(m.join("r")).unwrap();
    let mut head = [0u8; 4];
    r.read_exact(&mut head).unwrap();
    fs::create_dir(m.join("dir")).unwrap();
    for i in 0..300 {
        File::create(m.join("dir").join(format!("e{i:03}"))).unwrap();
    }
    let mut listing = fs::read_dir(m.join("dir")).unwrap();
    let mut seen: Vec<String> = (&mut listing)
        .take(100)
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let lock = File::open(m.join("w")).unwrap();
    // SAFETY: flock on an open fd.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    assert_eq!(
        try_flock(&other.join("w")),
        Some(9),
        "flock not held before"
    );
    // An unlinked file still open.
    fs::write(m.join("gone"), b"still here").unwrap();
    let mut gone = File::open(m.join("gone")).unwrap();
    fs::remove_file(m.join("gone")).unwrap();

    d.kill_server();

    w.write_all(b"after").unwrap();
    w.sync_all().unwrap();
    assert_eq!(w.stream_position().unwrap(), 12);
    assert_eq!(fs::read(other.join("w")).unwrap(), b"before-after");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"456789", "the read position moved");
    seen.extend(listing.map(|e| e.unwrap().file_name().into_string().unwrap()));
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        300,
        "the listing lost entries across the restart"
    );
    assert_eq!(
        try_flock(&other.join("w")),
        Some(9),
        "the flock was lost in the restart"
    );
    let mut s = String::new();
    gone.seek(SeekFrom::Start(0)).unwrap();
    gone.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here", "an unlinked open file lost its data");
    drop(lock);
    assert_eq!(try_flock(&other.join("w")), Some(0), "unlock not seen");

    // New work after the restart, and a second kill while a file is open.
    fs::write(m.join("new"), b"fresh").unwrap();
    d.kill_server();
    assert_eq!(fs::read(other.join("new")).unwrap(), b"fresh");
    drop((w, r, gone));
    d.unmount(&other).unwrap();
    d.unmount(&m).unwrap();
}

#[test]
fn sighup_hands_the_mounts_to_a_new_server_for_upgrades() {
    let d = Daemon::start();
    let m = d.volume_mounted("upgrade", &[]);
    let path = m.join("log");
    let (stop, writer) = start_writer(&path);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        let old = d.status()["server_pid"].as_u64().unwrap();
        // SAFETY: signalling our own daemon.
        unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
        let t0 = Instant::now();
        let client = d.client().with_timeout(Duration::from_secs(5));
        loop {
            // The API is briefly gone while the servers change.
            let st = client.get::<serde_json::Value>("/v1/status").ok();
            if let Some(st) = st.filter(|s| s["server_pid"].as_u64().is_some_and(|p| p != old)) {
                assert_eq!(
                    st["server_restarts"], 0,
                    "a handover counted as a crash: {st}"
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "round {round}: no new server after SIGHUP; log:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let acked = writer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the writer saw an error: {e}\nlog:\n{}", d.log()));
    let want: Vec<u64> = (0..acked).collect();
    assert_eq!(records(&fs::read_to_string(&path).unwrap()), want);
    assert!(d.log().contains("handed over"), "{}", d.log());
    d.unmount(&m).unwrap();
}

#[test]
fn replacing_the_binary_and_reloading_runs_the_new_one_on_the_same_mounts() {
    let mut d = Daemon::prepare();
    let dir = d.root.join("bin");
    fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("volfs-mountd");
    fs::copy(bin("volfs-mountd"), &exe).unwrap();
    d.exe = exe.clone();
    d.start_again();
    let m = d.volume_mounted("upgraded", &[]);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.join("log"))
        .unwrap();
    f.write_all(b"old binary\n").unwrap();
    f.sync_all().unwrap();
    let old = d.status()["server_pid"].as_u64().unwrap();
    // Install a "new version" the way package managers do: a new file renamed over the old.
    let staged = dir.join("volfs-mountd.new");
    fs::copy(bin("volfs-mountd"), &staged).unwrap();
    fs::rename(&staged, &exe).unwrap();
    let new_inode = fs::metadata(&exe).unwrap().ino();
    // SAFETY: signalling our own daemon.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    let client = d.client().with_timeout(Duration::from_secs(5));
    let t0 = Instant::now();
    let new = loop {
        if let Ok(st) = client.get::<serde_json::Value>("/v1/status") {
            if let Some(p) = st["server_pid"].as_u64().filter(|p| *p != old) {
                break p;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no new server; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let running = fs::metadata(format!("/proc/{new}/exe")).unwrap().ino();
    assert_eq!(
        running, new_inode,
        "the new server does not run the new binary"
    );
    f.write_all(b"new binary\n").unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        fs::read_to_string(m.join("log")).unwrap(),
        "old binary\nnew binary\n"
    );
    drop(f);
    d.unmount(&m).unwrap();
}

#[test]
fn a_server_that_cannot_come_back_ends_the_mounts_instead_of_hanging() {
    let d = Daemon::start();
    let m = d.volume_mounted("doomed", &[]);
    fs::write(m.join("f"), b"x").unwrap();
    // The data dir becomes unusable: no server can open the store again.
    let moved = d.root.join("data-moved");
    fs::rename(&d.data, &moved).unwrap();
    fs::write(&d.data, b"not a directory").unwrap();
    let st = d.status();
    let old = st["server_pid"].as_u64().unwrap() as i32;
    // SAFETY: signalling a process of ours.
    unsafe { libc::kill(old, libc::SIGKILL) };
    // Within a few seconds the mount fails (never hangs).
    let t0 = Instant::now();
    let probe = m.join("f");
    let res = run_with_timeout(Command::new("cat").arg(&probe), Duration::from_secs(30));
    assert!(!res.timed_out(), "a read hung after recovery failed");
    assert!(!res.success(), "read succeeded with no server: {res}");
    assert!(
        res.stderr.contains("Input/output error"),
        "not a clear EIO: {res}"
    );
    eprintln!("failed after {:?}: {}", t0.elapsed(), res.stderr.trim());
    let log = d.log();
    assert!(
        log.contains("giving up"),
        "the log does not say why:\n{log}"
    );
    d.unmount(&m).ok();
    fs::remove_file(&d.data).unwrap();
    fs::rename(&moved, &d.data).unwrap();
}

/// Pushes a file's dirty pages to the daemon (FUSE writes it answers) without an fsync.
fn write_back(f: &File) {
    // SAFETY: sync_file_range on an open fd.
    let rc = unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    assert_eq!(rc, 0, "sync_file_range: {}", io::Error::last_os_error());
}

#[test]
fn writes_the_server_acknowledged_but_had_not_committed_survive_its_kill() {
    let mut d = Daemon::start();
    // With the kernel's writeback cache, and without it (a volume with a size limit).
    let cached = d.volume_mounted("wb", &[]);
    let direct = d.volume_mounted("wt", &[("size", "1G")]);
    let a = pseudo_random(3 << 20, 1);
    let b = pseudo_random(1 << 20, 2);
    let mut open = Vec::new();
    for m in [&cached, &direct] {
        // Below every commit threshold: the daemon holds these bytes in memory only.
        let mut f = File::create(m.join("data")).unwrap();
        f.write_all(&a).unwrap();
        write_back(&f);
        // A shrink after buffered writes, then more writes: a replay must not bring back the
        // cut-off bytes.
        let mut t = File::create(m.join("shrunk")).unwrap();
        t.write_all(&b).unwrap();
        write_back(&t);
        t.set_len(1000).unwrap();
        t.seek(SeekFrom::Start(2000)).unwrap();
        t.write_all(b"after the shrink").unwrap();
        write_back(&t);
        open.push((f, t));
    }
    d.kill_server();
    for (f, t) in &open {
        f.sync_all().expect("fsync after the kill");
        t.sync_all().expect("fsync after the kill");
    }
    drop(open);
    // What fsync returned for is in the store: kill the whole daemon and read it back.
    d.kill9();
    d.start_again();
    let mut want_shrunk = b[..1000].to_vec();
    want_shrunk.resize(2000, 0);
    want_shrunk.extend_from_slice(b"after the shrink");
    for m in [&cached, &direct] {
        let got = fs::read(m.join("data")).unwrap();
        assert_eq!(got.len(), a.len(), "{}: size", m.display());
        assert!(got == a, "{}: acknowledged bytes were lost", m.display());
        assert!(
            fs::read(m.join("shrunk")).unwrap() == want_shrunk,
            "{}: truncated file",
            m.display()
        );
    }
    assert!(
        d.log().contains("replayed acknowledged writes"),
        "{}",
        d.log()
    );
    d.unmount(&cached).unwrap();
    d.unmount(&direct).unwrap();
}

/// Bytes the server's write log for `volume` holds in memory (its memfd's allocated blocks).
fn write_log_bytes(d: &Daemon, volume: &str) -> u64 {
    let pid = d.status()["server_pid"].as_u64().unwrap();
    let want = format!("/memfd:volfs-log:{volume} (deleted)");
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let p = e.unwrap().path();
        if fs::read_link(&p).is_ok_and(|l| l.to_string_lossy() == want) {
            return fs::metadata(&p).unwrap().blocks() * 512;
        }
    }
    panic!("no write log for {volume} among the server's fds");
}

#[test]
fn an_old_buffered_write_does_not_pin_the_write_logs_memory() {
    let d = Daemon::start();
    let m = d.volume_mounted("pinned", &[]);
    // A file with a small write that stays buffered (open, never closed or fsync'ed) ...
    let mut small = File::create(m.join("small")).unwrap();
    small.write_all(b"a few bytes, buffered").unwrap();
    write_back(&small);
    // ... while another file streams 768 MiB through the log (each write is logged; its
    // commits every 64 MiB make its own records dead, but they sit behind the small one).
    let chunk = pseudo_random(1 << 20, 7);
    let mut big = File::create(m.join("big")).unwrap();
    let mut peak = 0;
    for i in 0..768 {
        big.write_all(&chunk).unwrap();
        if i % 64 == 63 {
            write_back(&big);
            peak = peak.max(write_log_bytes(&d, "pinned"));
        }
    }
    eprintln!("write log peak: {} MiB", peak >> 20);
    assert!(
        peak < 400 << 20,
        "the write log grew to {} MiB behind one small buffered write",
        peak >> 20
    );
    drop((small, big));
    d.unmount(&m).unwrap();
}
