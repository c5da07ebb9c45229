//! Operations (issue 9): the Prometheus endpoint during a real workload on a FUSE mount,
//! `volfs status` as a health check (a full data dir, background work), configuration
//! errors, and the log: every error a user sees is logged with its volume and operation.
//!
//! Each test starts its own volfs-mountd on a temp dir (see tests/common), with /metrics on a
//! free loopback port. Run as root with a usable /dev/fuse.
mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
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

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

#[test]
fn metrics_move_during_a_workload_and_parse_as_openmetrics() {
    let d = Daemon::start();
    let m = d.volume_mounted("busy", &[]);
    d.create_volume("capped", &[("size", "64M")]);
    let before = d.metrics();
    let families = check_openmetrics(&before);
    assert!(families > 20, "only {families} metric families:\n{before}");
    assert_eq!(
        metric(&before, "volfs_volume_quota_bytes", &[("volume", "capped")]),
        Some(64.0 * MIB as f64),
        "{before}"
    );
    assert_eq!(
        metric(&before, "volfs_volume_quota_bytes", &[("volume", "busy")]),
        None,
        "a volume without a quota has no quota series"
    );

    // The workload: 32 files of 256 KiB, each fsync'ed, read back from cold caches, and
    // lookups of names that do not exist; scraped while it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let m = m.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds == 0 {
                for i in 0..32 {
                    fsync_write(
                        &m.join(format!("f{i}")),
                        &pseudo_random(256 << 10, rounds * 100 + i),
                    );
                    assert!(fs::metadata(m.join(format!("missing{rounds}-{i}"))).is_err());
                }
                rounds += 1;
            }
            rounds
        })
    };
    let mut during = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(150));
        let t = d.metrics();
        check_openmetrics(&t);
        during.push(value(
            &t,
            "volfs_fuse_request_duration_seconds_count",
            &[("volume", "busy"), ("op", "fsync")],
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = worker.join().expect("workload thread");
    assert!(
        during.windows(2).any(|w| w[1] > w[0]),
        "the fsync count did not move while the workload ran: {during:?}"
    );
    // Reads that reach the daemon: drop the daemon's and the kernel's caches of the volume.
    let out = d.cli_ok(&["cache", "drop", "--kernel"]);
    assert!(out.stdout.contains("invalidated"), "{out}");
    for i in 0..32 {
        let got = fs::read(m.join(format!("f{i}"))).unwrap();
        assert_eq!(got, pseudo_random(256 << 10, (rounds - 1) * 100 + i));
    }
    let held = File::open(m.join("f0")).unwrap();
    let after = d.metrics();
    check_openmetrics(&after);
    let busy = [("volume", "busy")];
    let count = |t: &str, op: &str| {
        value(
            t,
            "volfs_fuse_request_duration_seconds_count",
            &[("volume", "busy"), ("op", op)],
        )
    };
    assert!(
        count(&after, "fsync") >= (32 * rounds) as f64,
        "fsync count {} after {rounds} rounds",
        count(&after, "fsync")
    );
    assert!(count(&after, "write") > count(&before, "write"));
    assert!(count(&after, "read") > 0.0, "no FUSE read was counted");
    let written = value(&after, "volfs_volume_written_bytes_total", &busy);
    assert!(
        written >= (32 * rounds * (256 << 10)) as f64,
        "written bytes {written}"
    );
    let read = value(&after, "volfs_volume_read_bytes_total", &busy);
    assert!(read >= (32 * (256 << 10)) as f64, "read bytes {read}");
    assert!(
        value(
            &after,
            "volfs_fuse_errors_total",
            &[("volume", "busy"), ("op", "lookup"), ("errno", "ENOENT")]
        ) >= 32.0,
        "ENOENT lookups not counted"
    );
    assert!(value(&after, "volfs_kernel_cache_invalidations_total", &busy) >= 32.0);
    assert!(value(&after, "volfs_volume_open_files", &busy) >= 1.0);
    assert!(value(&after, "volfs_volume_used_bytes", &busy) >= (8 * MIB) as f64);
    assert!(value(&after, "volfs_store_stored_bytes", &[]) >= (8 * MIB) as f64);
    assert!(value(&after, "volfs_store_dedup_ratio", &[]) > 0.0);
    assert!(
        value(&after, "volfs_chunk_cache_misses_total", &[])
            > value(&before, "volfs_chunk_cache_misses_total", &[])
    );
    assert!(value(&after, "volfs_chunks_written_total", &[]) > 0.0);
    assert!(
        value(&after, "volfs_index_cache_hits_total", &[])
            + value(&after, "volfs_index_cache_misses_total", &[])
            + value(&after, "volfs_index_memtable_bytes", &[])
            > 0.0,
        "the index reports nothing"
    );
    assert!(
        metric(&after, "volfs_index_pending_compaction_bytes", &[]).is_some(),
        "no compaction backlog gauge"
    );
    // Latency buckets are cumulative and end in +Inf = count.
    let inf = value(
        &after,
        "volfs_fuse_request_duration_seconds_bucket",
        &[("volume", "busy"), ("op", "fsync"), ("le", "+Inf")],
    );
    assert_eq!(inf, count(&after, "fsync"));
    drop(held);

    // gc: a run and what it freed.
    for i in 0..32 {
        fs::remove_file(m.join(format!("f{i}"))).unwrap();
    }
    d.cli_ok(&["gc"]);
    let t = d.metrics();
    assert_eq!(
        value(
            &t,
            "volfs_background_runs_total",
            &[("task", "gc"), ("outcome", "ok")]
        ),
        1.0,
        "{t}"
    );
    assert!(value(&t, "volfs_gc_chunk_bytes_freed_total", &[]) >= (8 * MIB) as f64);
    let st = d.status();
    let gc = st["background"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["task"] == "gc"))
        .unwrap_or_else(|| panic!("no gc in status: {st}"));
    assert_eq!(gc["last_ok"], true, "{gc}");
    assert!(
        gc["last_outcome"].as_str().unwrap().contains("freed"),
        "{gc}"
    );

    // The dashboard and the docs use only metrics that exist, and the docs list every one.
    let scraped: std::collections::BTreeSet<String> = t
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let exists = |name: &str| {
        let base = ["_bucket", "_count", "_sum", "_total", "_info"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf))
            .unwrap_or(name);
        scraped.contains(base) || scraped.contains(name)
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for doc in ["packaging/grafana/volfs.json", "docs/OPERATIONS.md"] {
        let text = fs::read_to_string(repo.join(doc)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() > 10, "{doc}: {names:?}");
        for n in &names {
            assert!(exists(n), "{doc} uses {n}, which /metrics does not have");
        }
    }
    let documented = metric_names(&fs::read_to_string(repo.join("docs/OPERATIONS.md")).unwrap());
    for family in &scraped {
        assert!(
            documented.iter().any(|n| n.starts_with(family.as_str())),
            "/metrics has {family}, which docs/OPERATIONS.md does not describe"
        );
    }

    // A removed volume's series go with it.
    d.cli_ok(&["volume", "rm", "capped"]);
    let t = d.metrics();
    assert_eq!(
        metric(&t, "volfs_volume_quota_bytes", &[("volume", "capped")]),
        None
    );
}

/// Every `volfs_...` name in a text.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("volfs_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].trim_end_matches('_');
        // Metric names have a part after the prefix; `volfs_mountd` is the crate.
        if name.len() > 6 && !name.starts_with("volfs_mountd") {
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// A tmpfs mounted for a test, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.0, libc::MNT_DETACH);
    }
}

/// Fills a file system with one file until ENOSPC.
fn fill(path: &Path) {
    let mut f = File::create(path).unwrap();
    let block = vec![0u8; MIB];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
}

#[test]
fn status_reports_a_full_data_dir_and_nothing_is_lost() {
    let mut d = Daemon::prepare();
    let _tmpfs = Tmpfs::mount(&d.data, "64m");
    d.start_again();
    let m = d.volume_mounted("full", &[]);
    let keep = pseudo_random(4 * MIB, 1);
    fsync_write(&m.join("keep"), &keep);
    let ok = d.cli(&["status"]);
    assert!(ok.success(), "status with room to spare:\n{ok}");

    fill(&d.data.join("filler"));
    let out = d.cli(&["status"]);
    assert!(!out.success(), "status exits 0 on a full data dir:\n{out}");
    assert!(
        out.stdout.contains("over 90% full"),
        "status does not say the data dir is full:\n{out}"
    );
    let st: Value = d.cli(&["status", "--json"]).json();
    assert!(
        st["warnings"].to_string().contains("full"),
        "status --json: {st}"
    );
    assert!(value(&d.metrics(), "volfs_data_dir_free_bytes", &[]) < (4 * MIB) as f64);

    // Writing now fails with a clear error, never silently: ENOSPC from write or fsync.
    let new_data = pseudo_random(8 * MIB, 2);
    let mut newf = File::create(m.join("new")).unwrap();
    let r = newf.write_all(&new_data).and_then(|()| newf.sync_all());
    match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}"),
        Ok(()) => panic!("8 MiB written and fsync'ed on a full data dir"),
    }
    // The log says why, with the volume and the operation.
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("No space left") && l.contains("volume=full") && l.contains("op=")),
        "the log does not say why, for which volume and operation:\n{log}"
    );

    // Room again: the failed commit lost nothing it had buffered: a retried fsync stores
    // every byte (read back past the kernel's cache, from the store).
    fs::remove_file(d.data.join("filler")).unwrap();
    newf.sync_all()
        .expect("fsync retried once the disk has room again");
    drop(newf);
    d.cli_ok(&["cache", "drop", "--kernel"]);
    let got = fs::read(m.join("new")).unwrap();
    assert!(
        got == new_data,
        "after ENOSPC and a retried fsync the file reads back wrong ({} bytes)",
        got.len()
    );
    // Everything fsync'ed before is intact, writes work, status is healthy.
    let _ = fs::remove_file(m.join("new"));
    assert_eq!(fs::read(m.join("keep")).unwrap(), keep);
    let again = pseudo_random(4 * MIB, 3);
    fsync_write(&m.join("again"), &again);
    d.cli_ok(&["cache", "drop", "--kernel"]);
    assert_eq!(fs::read(m.join("again")).unwrap(), again);
    assert_eq!(fs::read(m.join("keep")).unwrap(), keep);
    let out = d.cli(&["status"]);
    assert!(
        out.success(),
        "status after the disk has room again:\n{out}"
    );
    d.unmount(&m).unwrap();
    let _ = d.stop();
}

#[test]
fn status_shows_a_volume_near_its_quota_and_its_mountpoints() {
    let d = Daemon::start();
    let m = d.volume_mounted("quota9", &[("size", "8M")]);
    let out = d.cli(&["status"]);
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains(&m.display().to_string()),
        "status does not list the mountpoint:\n{out}"
    );
    fsync_write(&m.join("big"), &pseudo_random(15 * MIB / 2, 4));
    let out = d.cli(&["status"]);
    assert!(!out.success(), "a volume at 94% of its quota:\n{out}");
    assert!(
        out.stdout.contains("quota9") && out.stdout.contains("quota"),
        "{out}"
    );
}

/// Runs volfs-mountd expecting it to refuse to start; returns its stderr.
fn refused(d: &Daemon, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut c = d.command();
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args);
    let out = run_with_timeout(&mut c, Duration::from_secs(30));
    assert!(
        !out.timed_out() && out.code() == Some(1),
        "volfs-mountd {args:?} {env:?} did not refuse to start:\n{out}"
    );
    assert!(
        mounts_under(&d.root).is_empty(),
        "a refused start left mounts"
    );
    out.stderr
}

#[test]
fn bad_configuration_is_refused_with_source_key_and_reason() {
    let d = Daemon::prepare();
    let cfg = d.config.display().to_string();
    fs::write(&d.config, "chunk_cache_mb = 64\nbogus_key = 1\n").unwrap();
    let e = refused(&d, &[], &[]);
    assert!(e.contains("bogus_key") && e.contains(&cfg), "{e}");

    fs::write(&d.config, "chunk_cache_mb = \"lots\"\n").unwrap();
    let e = refused(&d, &[], &[]);
    assert!(
        e.contains("chunk_cache_mb") && e.contains(&cfg) && e.contains("line 1"),
        "{e}"
    );

    fs::write(&d.config, "compression = \"lz5\"\n").unwrap();
    let e = refused(&d, &[], &[]);
    assert!(
        e.contains("compression") && e.contains("lz5") && e.contains(&cfg),
        "{e}"
    );

    fs::write(&d.config, "").unwrap();
    let e = refused(&d, &[("VOLFS_FUSE_THREADS", "many")], &[]);
    assert!(
        e.contains("fuse_threads") && e.contains("VOLFS_FUSE_THREADS"),
        "{e}"
    );
    let e = refused(&d, &[("VOLFS_FUSE_DIRTY_MAX_RATIO", "150")], &[]);
    assert!(
        e.contains("fuse_dirty_max_ratio") && e.contains("VOLFS_FUSE_DIRTY_MAX_RATIO"),
        "{e}"
    );
    let e = refused(&d, &[], &["--set", "scrub_interval_secs=-1"]);
    assert!(
        e.contains("scrub_interval_secs") && e.contains("--set"),
        "{e}"
    );
    let e = refused(&d, &[], &["--set", "no_such_key=1"]);
    assert!(e.contains("no_such_key"), "{e}");
    let e = refused(&d, &[], &["--log-format", "xml"]);
    assert!(
        e.contains("log_format") && e.contains("--log-format"),
        "{e}"
    );
    let e = refused(&d, &[], &["--metrics-listen", "localhost"]);
    assert!(e.contains("metrics_listen") && e.contains("IP:PORT"), "{e}");

    // The metrics port taken by someone else: a clear error naming the key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = refused(&d, &[("VOLFS_METRICS_LISTEN", &addr)], &[]);
    assert!(
        e.contains(&addr) && e.contains("metrics_listen") && e.contains("VOLFS_METRICS_LISTEN"),
        "{e}"
    );
}

#[test]
fn user_visible_errors_are_logged_with_volume_and_operation() {
    let mut d = Daemon::prepare();
    fs::write(&d.config, "log_format = \"json\"\n").unwrap();
    d.start_again();
    let dir = d.fresh_dir("ghost");
    assert!(d.try_mount("ghost", &dir, false).is_err());
    let out = d.cli(&["volume", "rm", "phantom"]);
    assert!(!out.success());
    let out = d.cli(&["snapshot", "create", "phantom2"]);
    assert!(!out.success());
    let lines: Vec<Value> = d
        .log()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    for (vol, op) in [
        ("ghost", "POST /v1/mounts"),
        ("phantom", "DELETE /v1/volumes/phantom"),
        ("phantom2", "POST /v1/volumes/phantom2/snapshots"),
    ] {
        let hit = lines.iter().find(|l| {
            l["fields"]["volume"] == vol
                && l["fields"]["op"]
                    .as_str()
                    .is_some_and(|o| o.starts_with(op))
        });
        let hit =
            hit.unwrap_or_else(|| panic!("no log line for volume {vol} op {op}:\n{}", d.log()));
        assert_eq!(hit["level"], "WARN", "{hit}");
        assert!(
            hit["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(vol)),
            "{hit}"
        );
    }
}

#[test]
fn journald_format_prefixes_syslog_priorities() {
    let mut d = Daemon::prepare();
    fs::write(&d.config, "log_format = \"journald\"\n").unwrap();
    d.start_again();
    let dir = d.fresh_dir("nope");
    assert!(d.try_mount("nope", &dir, false).is_err());
    let log = d.log();
    assert!(
        log.lines().all(|l| l.starts_with('<')),
        "a line without a priority prefix:\n{log}"
    );
    assert!(log.lines().any(|l| l.starts_with("<6>")), "{log}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("<4>") && l.contains("nope")),
        "{log}"
    );
    assert!(
        !log.contains("Z  INFO") && !log.contains('\u{1b}'),
        "timestamps or colours in journald lines:\n{log}"
    );
}
