//! systemd integration without libsystemd: `sd_notify(3)` (`READY=1`, `STOPPING=1`), the
//! service's **file descriptor store** (`FDSTORE=1`, `FDSTOREREMOVE=1`), the fds systemd hands
//! back when the service starts again (`sd_listen_fds_with_names(3)`), and whether the stop
//! under way is part of a restart.
//!
//! Under systemd the supervisor (the service's main process) parks every FUSE connection and
//! write log in the fd store as well (names `conn.VOLUME`, `log.VOLUME`). systemd keeps them
//! while the service is running, restarting (`systemctl restart`, `Restart=`), or has a job
//! queued, and passes them to the next start: so a restart, a crash of the supervisor itself
//! and an upgrade all find the live connections and take them over. A plain stop drops them.
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set by the unit file (`Environment=VOLFS_SYSTEMD_UNIT=%n`): the service's unit name, used
/// to tell a restart from a stop.
pub const UNIT_ENV: &str = "VOLFS_SYSTEMD_UNIT";

/// fd store names longer than this are refused by systemd.
const FDNAME_MAX: usize = 255;

/// The address in `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
fn notify_addr() -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    let path = std::env::var("NOTIFY_SOCKET").ok()?;
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return None;
    }
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if bytes[0] == b'@' {
        addr.sun_path[0] = 0;
        base + bytes.len()
    } else {
        base + bytes.len() + 1
    };
    Some((addr, len as libc::socklen_t))
}

/// Is this process (or its supervisor) run by a systemd service manager?
pub fn under_systemd() -> bool {
    notify_addr().is_some()
}

/// Sends one notification, with an fd for `FDSTORE=1`. Without `$NOTIFY_SOCKET` it does
/// nothing.
fn send(msg: &str, fd: Option<RawFd>) -> io::Result<()> {
    let Some(addr) = notify_addr() else {
        return Ok(());
    };
    // SAFETY: a fresh datagram socket, owned from here on.
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sock was just created.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    use std::os::fd::AsRawFd;
    crate::handover::send_to(sock.as_raw_fd(), Some(&addr), msg.as_bytes(), fd)
}

/// `sd_notify(0, msg)`; failures are logged.
pub fn notify(msg: &str) {
    if let Err(e) = send(msg, None) {
        tracing::warn!("sd_notify {msg:?}: {e}");
    }
}

/// Parks a duplicate of `fd` in the service's fd store under `name`.
pub fn store_fd(name: &str, fd: RawFd) {
    if !under_systemd() {
        return;
    }
    if name.len() > FDNAME_MAX || name.contains(':') {
        eprintln!("volfs-mountd: {name:?} cannot be an fd store name; it will not survive a restart of the service");
        return;
    }
    if let Err(e) = send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd)) {
        eprintln!("volfs-mountd: parking {name} in systemd's fd store: {e}");
    }
}

/// Drops the fds named `name` from the service's fd store.
pub fn remove_fd(name: &str) {
    if !under_systemd() || name.len() > FDNAME_MAX {
        return;
    }
    if let Err(e) = send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None) {
        eprintln!("volfs-mountd: removing {name} from systemd's fd store: {e}");
    }
}

/// The fds systemd passed to this process at start, with their names
/// (`$LISTEN_PID`, `$LISTEN_FDS`, `$LISTEN_FDNAMES`; fds from 3). The variables are removed,
/// so that child processes do not take them for theirs.
pub fn listen_fds() -> Vec<(String, OwnedFd)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    if !pid_ok || n <= 0 {
        return Vec::new();
    }
    let mut names = names.split(':');
    (0..n)
        .map(|i| {
            let fd = 3 + i;
            // SAFETY: systemd passed fds 3..3+n to this process.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a fd we own.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
            (names.next().unwrap_or("unknown").to_string(), owned)
        })
        .collect()
}

/// Is the service being restarted (a `restart` job for our unit), rather than stopped?
/// Asks the service manager with `systemctl`; `false` when not run by systemd, when the unit
/// file does not name the unit, or when the manager does not answer in time.
pub fn restart_pending() -> bool {
    let Ok(unit) = std::env::var(UNIT_ENV) else {
        return false;
    };
    if !under_systemd() {
        return false;
    }
    // Should `list-jobs` not list the job `show` names (it was being set up), ask again.
    // (The unit must stop with KillMode=mixed: with control-group, systemd's SIGTERM also hits
    // these systemctl processes, forked into the cgroup it is emptying.)
    for _ in 0..20 {
        let Some(jobs) = systemctl(&["list-jobs", "--no-legend", "--full", &unit]) else {
            return false;
        };
        if let Some(restart) = job_kind(&jobs, &unit) {
            return restart;
        }
        match systemctl(&["show", "-p", "Job", "--value", &unit]) {
            Some(job) if job.trim().is_empty() => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
            None => return false,
        }
    }
    tracing::warn!(
        "systemd names a job for {unit} but does not list it; treating the stop as a stop"
    );
    false
}

/// Runs `systemctl [--user] ARGS` against the manager that runs this service (a user
/// manager sets `$MANAGERPID` for its services; the system manager does not); its stdout,
/// or `None` if it fails or takes over 5 s.
fn systemctl(args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("systemctl");
    if std::env::var_os("MANAGERPID").is_some() {
        cmd.arg("--user");
    }
    cmd.arg("--no-pager")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return reader.join().ok(),
            Ok(Some(_)) => return None,
            Ok(None) if t0.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("systemctl {args:?} did not answer within 5 s");
                return None;
            }
        }
    }
}

/// In `systemctl list-jobs --no-legend` output (lines `ID UNIT TYPE STATE`): is the job of
/// `unit` a restart? `None` if no job of `unit` is listed.
fn job_kind(out: &str, unit: &str) -> Option<bool> {
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 3 && f[1] == unit).then(|| f[2].contains("restart"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_jobs_are_recognised() {
        let out = "123 volfs-mountd.service restart running\n124 docker.service start waiting\n";
        assert_eq!(job_kind(out, "volfs-mountd.service"), Some(true));
        assert_eq!(job_kind(out, "docker.service"), Some(false));
        assert_eq!(
            job_kind(
                "125 volfs-mountd.service stop running\n",
                "volfs-mountd.service"
            ),
            Some(false)
        );
        assert_eq!(job_kind("", "volfs-mountd.service"), None);
    }
}
