//! Keeping FUSE connections alive across a crash of the serving process.
//!
//! `volfs-mountd` runs as two processes (unless `supervise = false`):
//!
//! - the **supervisor** (the process you start; a few hundred lines, no store, no FUSE
//!   serving) spawns the **server** (the same binary, `VOLFS_SUPERVISED` set), keeps a
//!   duplicate of every `/dev/fuse` connection fd the server opens, and when the server dies
//!   without being asked to stop (`kill -9`, a panic, an abort), starts a new one at once and
//!   hands it those fds (inherited, listed in `VOLFS_ADOPT_FDS=volume=fd,...`). SIGTERM and
//!   SIGINT are passed to the server, and the supervisor exits with it.
//! - the **server** sends each connection fd to the supervisor right after mounting it
//!   (`A volume` + the fd, SCM_RIGHTS on a SOCK_SEQPACKET socket pair), then the volume's
//!   write log (`L volume` + a memfd: acknowledged writes not yet committed, see
//!   `volfs::writelog`), `D volume` when it closes one, and `R` once it is ready.
//!
//! Because the supervisor holds the same open file description, the kernel neither aborts the
//! connection nor fails the requests the dead server had read but not answered: they wait in
//! its processing queue, and the new server moves them back to the pending queue with
//! `FUSE_NOTIFY_RESEND` (Linux 6.9+) and answers them. Requests made in the gap simply wait.
//! Locks live in the kernel, and handles, inodes and mount records are rebuilt (see
//! `Mounts::adopt`), so open files keep working.
//!
//! The server dies with the supervisor (PR_SET_PDEATHSIG), so killing the supervisor ends the
//! mounts like killing a single-process daemon does.
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Set in the server's environment: the fd of its end of the supervisor link.
pub const SUPERVISED_ENV: &str = "VOLFS_SUPERVISED";
/// Set in a restarted server's environment: `volume=fd,...`, the inherited connections.
pub const ADOPT_ENV: &str = "VOLFS_ADOPT_FDS";
/// Set in a restarted server's environment: `volume=fd,...`, the inherited write logs.
pub const ADOPT_LOGS_ENV: &str = "VOLFS_ADOPT_LOGS";

/// The server's end of the supervisor link.
pub struct Link {
    sock: OwnedFd,
}

impl Link {
    /// The link this process was started with, if it runs under a supervisor.
    pub fn from_env() -> Option<Link> {
        let fd: RawFd = std::env::var(SUPERVISED_ENV).ok()?.parse().ok()?;
        // SAFETY: the supervisor passed this fd (its socket pair end) for us to own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(sock.as_raw_fd(), true);
        Some(Link { sock })
    }

    /// Gives the supervisor a duplicate of a volume's connection fd.
    pub fn add(&self, volume: &str, fd: RawFd) -> io::Result<()> {
        send(
            self.sock.as_raw_fd(),
            format!("A {volume}").as_bytes(),
            Some(fd),
        )
    }

    /// Gives the supervisor a duplicate of a volume's write log (see `volfs::writelog`), so
    /// that the server taking over after a crash can replay it.
    pub fn add_log(&self, volume: &str, fd: RawFd) -> io::Result<()> {
        send(
            self.sock.as_raw_fd(),
            format!("L {volume}").as_bytes(),
            Some(fd),
        )
    }

    /// Tells the supervisor a volume's connection is closed (it drops its copies).
    pub fn remove(&self, volume: &str) {
        if let Err(e) = send(
            self.sock.as_raw_fd(),
            format!("D {volume}").as_bytes(),
            None,
        ) {
            tracing::warn!(volume, "telling the supervisor a connection closed: {e}");
        }
    }

    pub fn ready(&self) {
        if let Err(e) = send(self.sock.as_raw_fd(), b"R", None) {
            tracing::warn!("telling the supervisor we are ready: {e}");
        }
    }
}

/// The server's exit code after SIGHUP: it flushed, left the mounts, and wants a successor.
pub const HANDOVER_EXIT: i32 = 75;

/// Set in a restarted server's environment: how many servers died before it.
pub const RESTARTS_ENV: &str = "VOLFS_SERVER_RESTARTS";

/// How many server processes died and were replaced before this one.
pub fn restarts() -> u64 {
    std::env::var(RESTARTS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The connections a restarted server inherits, with their write logs: (volume, fd, log).
pub fn inherited() -> Vec<(String, OwnedFd, Option<OwnedFd>)> {
    let mut logs: BTreeMap<String, OwnedFd> = fds_from_env(ADOPT_LOGS_ENV).into_iter().collect();
    fds_from_env(ADOPT_ENV)
        .into_iter()
        .map(|(vol, fd)| {
            let log = logs.remove(&vol);
            (vol, fd, log)
        })
        .collect()
}

/// Parses (and removes) a `volume=fd,...` variable naming fds this process inherited.
fn fds_from_env(var: &str) -> Vec<(String, OwnedFd)> {
    let Ok(list) = std::env::var(var) else {
        return Vec::new();
    };
    std::env::remove_var(var);
    list.split(',')
        .filter_map(|item| {
            let (vol, fd) = item.rsplit_once('=')?;
            let fd: RawFd = fd.parse().ok()?;
            // SAFETY: the supervisor passed these fds for this process to own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            set_cloexec(fd.as_raw_fd(), true);
            Some((vol.to_string(), fd))
        })
        .collect()
}

/// Asks the kernel to queue again every request of this connection that a dead server read
/// but never answered (FUSE_NOTIFY_RESEND, Linux 6.9+).
pub fn resend(fd: RawFd) -> io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writes 16 bytes from a live buffer to a fd we own.
    let n = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A SOCK_SEQPACKET unix socket pair (close-on-exec): message boundaries are kept.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut pair = [0 as RawFd; 2];
    // SAFETY: socketpair fills two fds.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds from socketpair, owned from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) })
}

/// A new memfd (close-on-exec): memory that lives as long as some process holds the fd.
pub fn memfd(name: &str) -> io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: memfd_create with a valid C string; the fd is owned from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from memfd_create.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a fd this process holds.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

/// One message with an optional fd.
fn send(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    send_to(sock, None, data, fd)
}

/// One datagram with an optional fd, to `dest` (an unconnected socket) or the peer.
pub(crate) fn send_to(
    sock: RawFd,
    dest: Option<&(libc::sockaddr_un, libc::socklen_t)>,
    data: &[u8],
    fd: Option<RawFd>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one fd.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some((addr, len)) = dest {
        msg.msg_name = addr as *const libc::sockaddr_un as *mut libc::c_void;
        msg.msg_namelen = *len;
    }
    if let Some(fd) = fd {
        // SAFETY: CMSG_* compute offsets inside cbuf, which is large enough for one fd.
        unsafe {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: msg points at live buffers.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message; `Ok(None)` when the other end closed.
fn recv(sock: RawFd) -> io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut data = [0u8; 512];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at live buffers.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((
        String::from_utf8_lossy(&data[..n as usize]).into_owned(),
        fd,
    )))
}

/// A restarted server that dies this many times in a row before it is ready ends the
/// supervisor (and with it the connections).
const MAX_FAILED_STARTS: u32 = 5;

static CHILD: AtomicI32 = AtomicI32::new(0);
static STOPPING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    if sig != libc::SIGHUP {
        STOPPING.store(1, Ordering::SeqCst);
    }
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(child, sig);
        }
    }
}

/// Answers every request on these connections with EIO until each is unmounted (or SIGTERM),
/// so that the processes using them get an error instead of waiting forever.
fn fail_until_unmounted(fds: BTreeMap<String, OwnedFd>) {
    const FORGET: u32 = 2;
    const INTERRUPT: u32 = 36;
    const BATCH_FORGET: u32 = 42;
    let threads: Vec<_> = fds
        .into_iter()
        .map(|(vol, fd)| {
            std::thread::spawn(move || {
                let _ = resend(fd.as_raw_fd());
                let mut buf = vec![0u8; (1 << 20) + 4096];
                loop {
                    // SAFETY: reads into a live buffer from a fd we own.
                    let n =
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n < 0 {
                        match io::Error::last_os_error().raw_os_error() {
                            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                            _ => break, // ENODEV: unmounted
                        }
                    }
                    if n < 40 {
                        continue;
                    }
                    let opcode = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    if matches!(opcode, FORGET | INTERRUPT | BATCH_FORGET) {
                        continue;
                    }
                    let mut out = [0u8; 16];
                    out[0..4].copy_from_slice(&16u32.to_ne_bytes());
                    out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                    out[8..16].copy_from_slice(&buf[8..16]);
                    // SAFETY: writes a live buffer to a fd we own.
                    unsafe { libc::write(fd.as_raw_fd(), out.as_ptr().cast(), out.len()) };
                }
                eprintln!("volfs-mountd: volume {vol} is unmounted");
            })
        })
        .collect();
    // Until every volume is unmounted, or SIGTERM (exiting closes the connections).
    while !threads.iter().all(|t| t.is_finished()) && STOPPING.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Default)]
struct Held {
    fds: BTreeMap<String, OwnedFd>,
    logs: BTreeMap<String, OwnedFd>,
    ready: bool,
}

/// Runs the supervisor until the server stops on request; returns the exit code.
pub fn supervise() -> i32 {
    // SAFETY: installing plain handlers that only call async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, forward as *const () as libc::sighandler_t);
        // SIGHUP: the server hands its connections to a fresh process (upgrade, reload).
        libc::signal(libc::SIGHUP, forward as *const () as libc::sighandler_t);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("volfs-mountd: cannot find my own executable: {e}");
            return 1;
        }
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut restarts = 0u64;
    let mut failed_starts = 0u32;
    let mut last_start = Instant::now() - Duration::from_secs(10);
    let held = Arc::new(Mutex::new(Held::default()));
    // Under systemd, connections parked in the fd store by the previous run of the service
    // (a restart, or a crash of the supervisor itself) come back here: the first server
    // takes them over.
    for (name, fd) in crate::systemd::listen_fds() {
        let mut h = held.lock();
        if let Some(v) = name.strip_prefix("conn.") {
            h.fds.insert(v.to_string(), fd);
        } else if let Some(v) = name.strip_prefix("log.") {
            h.logs.insert(v.to_string(), fd);
        } else {
            eprintln!("volfs-mountd: dropping fd {name:?} from systemd's fd store: not ours");
            crate::systemd::remove_fd(&name);
        }
    }
    let raw = |m: &BTreeMap<String, OwnedFd>| -> Vec<(String, RawFd)> {
        m.iter()
            .map(|(v, fd)| (v.clone(), fd.as_raw_fd()))
            .collect()
    };
    let (mut inherit, mut inherit_logs) = {
        let h = held.lock();
        (raw(&h.fds), raw(&h.logs))
    };
    if !inherit.is_empty() {
        eprintln!(
            "volfs-mountd: systemd handed back {} live connection(s); the server takes them over",
            inherit.len()
        );
    }
    // Live connections to keep answering: a server that cannot come up for them ends in EIO
    // answers (see below), not in a bare exit.
    let mut adopting = !inherit.is_empty();
    loop {
        let (mine, theirs) = match seqpacket_pair() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("volfs-mountd: supervisor socket pair: {e}");
                return 1;
            }
        };
        // Do not restart in a tight loop if the server keeps dying.
        if let Some(wait) = Duration::from_millis(200).checked_sub(last_start.elapsed()) {
            std::thread::sleep(wait);
        }
        last_start = Instant::now();
        let theirs_raw = theirs.as_raw_fd();
        let inherited_raw: Vec<RawFd> = inherit
            .iter()
            .chain(inherit_logs.iter())
            .map(|(_, fd)| *fd)
            .collect();
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&args)
            .env(SUPERVISED_ENV, theirs_raw.to_string())
            .env(RESTARTS_ENV, restarts.to_string());
        for (var, list) in [(ADOPT_ENV, &inherit), (ADOPT_LOGS_ENV, &inherit_logs)] {
            if list.is_empty() {
                cmd.env_remove(var);
            } else {
                let list: Vec<String> = list.iter().map(|(v, fd)| format!("{v}={fd}")).collect();
                cmd.env(var, list.join(","));
            }
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                for fd in std::iter::once(theirs_raw).chain(inherited_raw.iter().copied()) {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("volfs-mountd: cannot start the server process: {e}");
                return 1;
            }
        };
        drop(theirs);
        CHILD.store(child.id() as i32, Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) != 0 {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        held.lock().ready = false;
        let reader = {
            let held = held.clone();
            std::thread::spawn(move || loop {
                match recv(mine.as_raw_fd()) {
                    Ok(Some((m, fd))) => {
                        let mut h = held.lock();
                        if m == "R" {
                            h.ready = true;
                        } else if let Some(v) = m.strip_prefix("A ") {
                            if let Some(fd) = fd {
                                crate::systemd::store_fd(&format!("conn.{v}"), fd.as_raw_fd());
                                h.fds.insert(v.to_string(), fd);
                            }
                        } else if let Some(v) = m.strip_prefix("L ") {
                            if let Some(fd) = fd {
                                crate::systemd::store_fd(&format!("log.{v}"), fd.as_raw_fd());
                                h.logs.insert(v.to_string(), fd);
                            }
                        } else if let Some(v) = m.strip_prefix("D ") {
                            h.fds.remove(v);
                            h.logs.remove(v);
                            crate::systemd::remove_fd(&format!("conn.{v}"));
                            crate::systemd::remove_fd(&format!("log.{v}"));
                        }
                    }
                    Ok(None) => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            })
        };
        let status = loop {
            match child.wait() {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("volfs-mountd: waiting for the server: {e}");
                    return 1;
                }
            }
        };
        CHILD.store(0, Ordering::SeqCst);
        let _ = reader.join();
        let ready = held.lock().ready;
        failed_starts = if ready { 0 } else { failed_starts + 1 };
        let hopeless = !ready && (!adopting || failed_starts >= MAX_FAILED_STARTS);
        if STOPPING.load(Ordering::SeqCst) != 0 && status.code() == Some(HANDOVER_EXIT) {
            // Stopped for a restart by systemd: the server left the connections in the fd
            // store for the next run of the service.
            eprintln!("volfs-mountd: stopping; systemd keeps the live connections for the restart");
            return 0;
        }
        if STOPPING.load(Ordering::SeqCst) != 0 || status.success() || hopeless {
            // Asked to stop, a clean exit, or a server that cannot come up (bad config, a
            // store that does not open): restarting would not help. Exiting closes the
            // connections, so their mounts fail (ENOTCONN) instead of hanging.
            if hopeless && adopting {
                let fds = std::mem::take(&mut held.lock().fds);
                eprintln!(
                    "volfs-mountd: the server failed {failed_starts} times in a row before it was ready (see its last lines above); giving up: every request to the {} volume(s) it served now fails with EIO until they are unmounted",
                    fds.len()
                );
                fail_until_unmounted(fds);
                return 1;
            }
            use std::os::unix::process::ExitStatusExt;
            return status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        }
        let h = held.lock();
        if status.code() == Some(HANDOVER_EXIT) {
            eprintln!(
                "volfs-mountd: the server process ({}) handed over; a new one takes over {} connection(s)",
                child.id(),
                h.fds.len()
            );
        } else {
            restarts += 1;
            adopting = true;
            eprintln!(
                "volfs-mountd: the server process ({}) died ({status}); restart {restarts} takes over {} connection(s)",
                child.id(),
                h.fds.len()
            );
        }
        inherit = raw(&h.fds);
        inherit_logs = raw(&h.logs);
    }
}
