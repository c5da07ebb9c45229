//! `mount.volfs`: the helper mount(8) runs for `mount -t volfs VOLUME DIR -o OPTIONS` and for
//! fstab lines (`data1 /mnt/data1 volfs defaults,_netdev 0 0`). Built as `mount-volfs` and
//! installed as `/sbin/mount.volfs` (cargo cannot name a binary with a dot).
//!
//! It asks the daemon to mount the volume (a bind mount of the volume's FUSE connection) and
//! returns once the mount answers. If no daemon is running it starts one on the default data
//! dir. Options: ro, rw, remount, and the ones mount(8) and fstab use that need nothing from
//! us (defaults, _netdev, auto, noauto, nofail, user, nouser, users, owner, group, comment=,
//! x-*, exec, noexec, suid, nosuid, dev, nodev, atime, noatime, relatime, strictatime). Any
//! other option is refused by name.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use volfs::api::{MountInfo, MountRequest, DEFAULT_SOCKET};
use volfs::client::{Client, ClientError};

struct Opts {
    read_only: bool,
    remount: bool,
    /// `x-volfs.create`: create the volume if it does not exist (used by the fstests setup).
    create: bool,
}

fn parse_opts(list: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        read_only: false,
        remount: false,
        create: false,
    };
    let mut unknown = Vec::new();
    for opt in list
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|s| !s.is_empty())
    {
        match opt {
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "remount" => o.remount = true,
            "defaults" | "_netdev" | "auto" | "noauto" | "nofail" | "user" | "nouser" | "users"
            | "owner" | "group" | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev"
            | "atime" | "noatime" | "relatime" | "strictatime" | "nodiratime" | "lazytime"
            | "sync" | "async" | "loud" | "silent"
            // Always on for volfs connections; fstests passes them.
            | "allow_other" | "default_permissions" => {}
            "x-volfs.create" => o.create = true,
            x if x.starts_with("x-")
                || x.starts_with("comment=")
                || x.starts_with("context=")
                || x.starts_with("source=")
                || x.starts_with("fsname=") => {}
            x => unknown.push(x.to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "unknown mount option(s): {} (volfs takes ro, rw, remount)",
            unknown.join(", ")
        ));
    }
    Ok(o)
}

fn main() {
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("mount.volfs: {e}");
            // mount(8) helpers exit 32 for "mount failure".
            std::process::exit(32);
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let mut opts = Vec::new();
    let mut fake = false;
    let mut verbose = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => opts.push(it.next().ok_or("-o needs an argument")?),
            "-t" | "-N" => {
                it.next();
            }
            "-f" => fake = true,
            "-v" => verbose = true,
            "-s" | "-n" => {}
            "-h" | "--help" => {
                println!("usage: mount.volfs VOLUME DIR [-o ro|rw|remount,...]");
                return Ok(());
            }
            x if x.starts_with("-o") => opts.push(x[2..].to_string()),
            x if x.starts_with('-') => return Err(format!("unknown flag {x}")),
            _ => pos.push(a),
        }
    }
    let [volume, dir] = <[String; 2]>::try_from(pos)
        .map_err(|_| "usage: mount.volfs VOLUME DIR [-o options]".to_string())?;
    let o = parse_opts(&opts)?;
    let target = std::fs::canonicalize(&dir).map_err(|e| format!("mount point {dir}: {e}"))?;
    if fake {
        return Ok(());
    }
    if o.remount {
        return remount(&target, o.read_only);
    }
    let socket = std::env::var("VOLFS_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SOCKET.into());
    let client = Client::new(&socket);
    if !client.is_up() {
        start_daemon(&client)?;
    }
    if o.create {
        let exists = client
            .get::<serde_json::Value>(&format!("/v1/volumes/{volume}"))
            .is_ok();
        if !exists {
            let body = volfs::api::CreateVolume {
                name: volume.clone(),
                ..Default::default()
            };
            let _: serde_json::Value = client
                .post("/v1/volumes", &body)
                .map_err(|e| e.to_string())?;
        }
    }
    let req = MountRequest {
        volume: volume.clone(),
        target: target.display().to_string(),
        read_only: o.read_only,
    };
    let m: MountInfo = client.post("/v1/mounts", &req).map_err(|e| match e {
        ClientError::Api { message, .. } => message,
        other => other.to_string(),
    })?;
    if verbose {
        println!(
            "mount.volfs: {} mounted on {}{}",
            m.volume,
            m.target,
            if m.read_only { " (ro)" } else { "" }
        );
    }
    Ok(())
}

/// `mount -o remount,ro DIR`: flip the read-only flag of an existing bind mount.
fn remount(target: &Path, ro: bool) -> Result<(), String> {
    let t =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| "bad path")?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND;
    if ro {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: valid C string, null source/type/data as remount allows.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "remounting {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Starts `volfs-mountd` in the background on its defaults and waits for its socket.
fn start_daemon(client: &Client) -> Result<(), String> {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("volfs-mountd")));
    let bin: PathBuf = match exe {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("volfs-mountd"),
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/var/log/volfs-mountd.log")
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    let mut cmd = Command::new(&bin);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from mount(8)'s session.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "no daemon is running and starting {} failed: {e}",
            bin.display()
        )
    })?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if client.is_up() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "volfs-mountd exited ({status}) while starting; see /var/log/volfs-mountd.log"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "volfs-mountd did not answer on {} within 15 s",
        client.socket().display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = parse_opts(&["defaults,_netdev,ro".into()]).unwrap();
        assert!(o.read_only && !o.remount);
        let e = parse_opts(&["rw,frobnicate".into()]).err().unwrap();
        assert!(e.contains("frobnicate"));
        assert!(
            parse_opts(&["remount,rw,x-systemd.automount".into()])
                .unwrap()
                .remount
        );
    }
}
