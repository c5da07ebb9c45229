//! `volfs`: the command-line client of volfs. It asks `volfs-mountd` over the control API's
//! unix socket (see [`volfs::api`]) to create, clone, list, inspect, roll back, remove and
//! prune volumes, to take and list snapshots, to import and export image layers and whole
//! volumes, to back volumes up into backup repositories and restore them, to mount and
//! unmount volumes and snapshots, to collect garbage, check the store and report its state. `volfs status` exits 1 when the daemon
//! reports warnings, so it doubles as a health check.
//!
//! Error policy: every failure prints exactly one line `volfs: <message>` on stderr and exits
//! 1 (usage errors are clap's and exit 2). Names, labels, options and filters are checked here
//! before the daemon is asked, so bad input fails without one.
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use volfs::api::{
    self, CacheDrop, CacheDropped, CreateSnapshot, CreateVolume, DfReport, ExportLayer, FsckReport,
    FsckRequest, GcReport, ImportLayer, ImportedLayer, LayerInfo, MountInfo, MountRequest,
    PruneReply, PruneRequest, RollbackRequest, ScrubReport, SnapshotInfo, Status, UnmountRequest,
    VolumeInfo, DEFAULT_SOCKET,
};
use volfs::client::{Client, ClientError};
use volfs::ids::{LayerId, VolumeName, VolumeRef};
use volfs::volume::CreateOptions;

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Parser)]
#[command(
    name = "volfs",
    version,
    about = "Manage volfs volumes: persistent, deduplicated container volumes over FUSE"
)]
struct Cli {
    /// Control socket of volfs-mountd.
    #[arg(long, global = true, value_name = "PATH", env = "VOLFS_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, inspect, remove and prune volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Take, list and remove snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Import, export, list and remove image layers.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Back up a volume incrementally into a backup repository (`backup VOLUME --to DIR`), or
    /// list a repository's backups (`backup ls DIR`).
    Backup(BackupCli),
    /// Create a new volume from a backup: restore DIR BACKUP NEWVOLUME.
    Restore(RestoreArgs),
    /// Mount a volume (or VOLUME@SNAPSHOT, read-only) on an existing directory.
    Mount(MountArgs),
    /// Unmount a volfs mount point.
    #[command(visible_alias = "unmount")]
    Umount(UmountArgs),
    /// Show the daemon's state; exits 1 when it reports warnings.
    Status(StatusArgs),
    /// Cluster state in etcd: hosts, their leases, volume owners and fencing tokens.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show logical and stored bytes, the dedup ratio, and each volume's exclusive and shared
    /// bytes.
    Df(JsonArgs),
    /// Free chunks and layers nothing uses any more, and compact pack files.
    Gc(JsonArgs),
    /// Check every reference and every chunk's hash; exits 1 when problems remain.
    Fsck(FsckArgs),
    /// Read back every chunk and verify its hash (what the background scrub does, now and at
    /// full speed); exits 1 when a chunk fails.
    Scrub(JsonArgs),
    /// Add, list and remove peer hosts; make a cluster key.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Manage the daemon's caches (`volfs cache drop` empties the decoded-chunk cache, for
    /// cold-cache measurements together with `echo 3 > /proc/sys/vm/drop_caches`).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions { shell: clap_complete::Shell },
    /// Write man pages for volfs and its subcommands into a directory.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// List hosts (with the time left on their leases) and volumes with owners and tokens.
    Status(JsonArgs),
}

#[derive(Debug, Args)]
struct PromoteArgs {
    /// The local replica to make writable.
    volume: String,
    /// A single host without etcd: promote even if the replica's origin answers (it may
    /// still write its own copy then).
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct MoveArgs {
    /// The volume (owned by this host).
    volume: String,
    /// The peer to move it to (its peer record's name; in cluster mode its host name).
    #[arg(long)]
    to: String,
    /// Move a mounted or Docker-held volume: it is unmounted everywhere first.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Empty the daemon's decoded-chunk cache.
    Drop(CacheDropArgs),
}

#[derive(Debug, Args)]
struct CacheDropArgs {
    /// Also drop the kernel's cached pages and attributes of every mounted volume (dirty
    /// pages are written back first).
    #[arg(long)]
    kernel: bool,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create(CreateArgs),
    /// List volumes.
    #[command(visible_alias = "list")]
    Ls(LsArgs),
    /// Show volumes in detail, as a JSON array.
    Inspect(InspectArgs),
    /// Remove volumes.
    #[command(visible_alias = "remove")]
    Rm(RmArgs),
    /// Remove all volumes that are not mounted.
    Prune(PruneArgs),
    /// Create DST as a writable copy of SRC (or SRC@SNAPSHOT) that shares all its data.
    Clone(CloneArgs),
    /// Reset a volume to a snapshot, discarding everything written since (VOLUME@SNAPSHOT).
    Rollback(RollbackArgs),
    /// Write a volume (VOLUME, at a consistent point, or VOLUME@SNAPSHOT) as a tarball to
    /// standard output (or -o FILE).
    Export(VolumeExportArgs),
    /// Create a new volume from a tarball on standard input (GNU tar, PAX, volume export).
    Import(VolumeImportArgs),
    /// Make this host's replica of a volume writable, once its owner's lease has lapsed;
    /// prints the new fencing token and the point in time the local copy holds.
    Promote(PromoteArgs),
    /// Move a volume to a peer: a final snapshot, everything shipped, ownership handed
    /// over; this host keeps a read-only replica of the peer's volume.
    Move(MoveArgs),
    /// Change a volume's replication: --opt replicas=N (peers to replicate to), --opt
    /// rpo=30s (take and ship snapshots this often; 0 turns it off).
    Update(UpdateArgs),
    /// Fetch every chunk a (lazily shipped) replica lacks from the peers, for all its
    /// snapshots; progress on stderr when it is a terminal. Exit 1 when a peer had none.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
struct PullArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct UpdateArgs {
    name: String,
    /// KEY=VALUE: replicas=N, rpo=DURATION (30s, 5m, 1h).
    #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE", required = true)]
    opts: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct VolumeExportArgs {
    /// VOLUME or VOLUME@SNAPSHOT.
    volume: String,
    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct VolumeImportArgs {
    /// Name of the new volume.
    name: String,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BackupCli {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    /// VOLUME or VOLUME@SNAPSHOT to back up.
    #[arg(required = true)]
    volume: Option<String>,
    /// The backup repository: an absolute path, created if missing or empty (written by the
    /// daemon).
    #[arg(long, value_name = "DIR", required = true)]
    to: Option<PathBuf>,
    /// Name of the backup (default VOLUME-YYYYMMDDTHHMMSSZ).
    #[arg(long)]
    name: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// List the backups in a repository.
    #[command(visible_alias = "list")]
    Ls(BackupLsArgs),
}

#[derive(Debug, Args)]
struct BackupLsArgs {
    /// The backup repository (an absolute path).
    dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The backup repository (an absolute path).
    dir: PathBuf,
    /// The backup's name (see volfs backup ls).
    backup: String,
    /// Name of the new volume.
    volume: String,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of a volume, mounted or not.
    Create(SnapshotCreateArgs),
    /// List a volume's snapshots.
    #[command(visible_alias = "list")]
    Ls(SnapshotLsArgs),
    /// Remove a snapshot (VOLUME@SNAPSHOT).
    #[command(visible_alias = "remove")]
    Rm(SnapshotRmArgs),
}

#[derive(Debug, Subcommand)]
enum LayerCommand {
    /// Import a Docker/OCI layer tarball (uncompressed tar); prints its layer id.
    Import(LayerImportArgs),
    /// Write a layer as a tarball.
    Export(LayerExportArgs),
    /// List layers.
    #[command(visible_alias = "list")]
    Ls(JsonArgs),
    /// Forget an imported layer; gc frees its data once no volume uses it.
    #[command(visible_alias = "remove")]
    Rm(LayerRmArgs),
}

#[derive(Debug, Args)]
struct CloneArgs {
    /// The volume (or VOLUME@SNAPSHOT) to copy.
    src: String,
    /// The new volume.
    dst: String,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    /// VOLUME@SNAPSHOT
    target: String,
}

#[derive(Debug, Args)]
struct SnapshotCreateArgs {
    volume: String,
    /// Snapshot name (default: the UTC time, YYYYMMDDTHHMMSSZ).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Args)]
struct SnapshotLsArgs {
    volume: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SnapshotRmArgs {
    /// VOLUME@SNAPSHOT (repeatable).
    #[arg(required = true)]
    targets: Vec<String>,
}

#[derive(Debug, Args)]
struct LayerImportArgs {
    /// The tarball.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct LayerExportArgs {
    /// Layer id (64 hex digits).
    id: String,
    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct LayerRmArgs {
    /// Layer ids.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum PeerCommand {
    /// Add a peer (another volfs-mountd with the same cluster key) and ask it once.
    Add {
        /// Name of the peer: [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128 characters.
        name: String,
        /// HOST:PORT of its peer listener (`peer_listen`, default port 9568).
        addr: String,
    },
    /// List the peers and whether each answers: authenticated, latency, or the error.
    Ls(JsonArgs),
    /// Remove a peer.
    Rm { name: String },
    /// Print a new random cluster key (64 hex digits) for `peer_key_file`.
    Keygen,
}

#[derive(Debug, Args)]
struct JsonArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FsckArgs {
    /// Fix what can be fixed (see `volfs fsck --help`); mounted volumes are only checked.
    #[arg(long)]
    repair: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Name of the volume: [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128 characters.
    name: String,
    /// Set a label (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Set an option: size=SIZE (quota, e.g. 10G) or ro=BOOL (repeatable).
    #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// Create the volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Start as a copy of VOLUME or VOLUME@SNAPSHOT (same as -o from=...).
    #[arg(long, value_name = "VOLUME[@SNAPSHOT]")]
    from: Option<String>,
    /// Start on these image layers, bottom first (same as -o layers=...).
    #[arg(long, value_name = "ID[,ID...]", conflicts_with = "from")]
    layers: Option<String>,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Print a JSON array of volumes instead of a table.
    #[arg(long)]
    json: bool,
    /// Only volumes with this label: label=KEY or label=KEY=VALUE (repeatable; all must match).
    #[arg(short = 'f', long = "filter", value_name = "FILTER")]
    filters: Vec<String>,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// Volumes to show.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

#[derive(Debug, Args)]
struct RmArgs {
    /// Volumes to remove.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
    /// Remove a volume even when it is mounted (its mounts are detached).
    #[arg(short, long)]
    force: bool,
}

#[derive(Debug, Args)]
struct PruneArgs {
    /// Only volumes with this label: label=KEY or label=KEY=VALUE (repeatable; all must match).
    #[arg(long = "filter", value_name = "FILTER")]
    filters: Vec<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    force: bool,
}

#[derive(Debug, Args)]
struct MountArgs {
    /// Volume to mount.
    volume: String,
    /// Existing directory to mount it on.
    dir: PathBuf,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
}

#[derive(Debug, Args)]
struct UmountArgs {
    /// Mount point to unmount.
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print the daemon's status as JSON.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // One readable line, like every other error; usage errors exit 2.
            let detail = e.to_string();
            let msg: Vec<&str> = detail
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let msg = msg.join(" ");
            eprintln!(
                "volfs: {} (see volfs --help)",
                msg.trim_start_matches("error: ")
            );
            std::process::exit(2);
        }
    };
    let code = match run(cli) {
        Ok(code) => code,
        // The reader went away (`volfs volume ls | head -1`): nothing useful left to say.
        Err(e) if is_closed_stdout(&e) => 1,
        Err(e) => {
            let _ = writeln!(io::stderr(), "volfs: {}", one_line(&format!("{e:#}")));
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    let client = Client::new(&cli.socket);
    let mut out = Stdout(io::stdout().lock());
    let code = match cli.command {
        Command::Volume(VolumeCommand::Create(a)) => volume_create(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Ls(a)) => volume_ls(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Inspect(a)) => volume_inspect(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Update(a)) => volume_update(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Pull(a)) => volume_pull(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Rm(a)) => volume_rm(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Prune(a)) => volume_prune(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Clone(a)) => volume_clone(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Rollback(a)) => volume_rollback(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Export(a)) => volume_export(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Import(a)) => volume_import(&client, a, &mut out)?,
        Command::Backup(a) => backup(&client, a, &mut out)?,
        Command::Restore(a) => restore(&client, a, &mut out)?,
        Command::Snapshot(SnapshotCommand::Create(a)) => snapshot_create(&client, a, &mut out)?,
        Command::Snapshot(SnapshotCommand::Ls(a)) => snapshot_ls(&client, a, &mut out)?,
        Command::Snapshot(SnapshotCommand::Rm(a)) => snapshot_rm(&client, a, &mut out)?,
        Command::Layer(LayerCommand::Import(a)) => layer_import(&client, a, &mut out)?,
        Command::Layer(LayerCommand::Export(a)) => layer_export(&client, a, &mut out)?,
        Command::Layer(LayerCommand::Ls(a)) => layer_ls(&client, a, &mut out)?,
        Command::Layer(LayerCommand::Rm(a)) => layer_rm(&client, a, &mut out)?,
        Command::Df(a) => df(&client, a, &mut out)?,
        Command::Gc(a) => gc(&client, a, &mut out)?,
        Command::Cache(CacheCommand::Drop(a)) => {
            let r: CacheDropped = client.post("/v1/cache/drop", &CacheDrop { kernel: a.kernel })?;
            write!(out, "dropped {} of cached chunks", human_bytes(r.bytes))?;
            if a.kernel {
                write!(
                    out,
                    "; kernel caches of {} inode(s) invalidated",
                    r.kernel_inodes
                )?;
            }
            writeln!(out)?;
            0
        }
        Command::Scrub(a) => scrub(&client, a, &mut out)?,
        Command::Peer(c) => peer(&client, c, &mut out)?,
        Command::Fsck(a) => fsck(&client, a, &mut out)?,
        Command::Mount(a) => mount(&client, a)?,
        Command::Umount(a) => umount(&client, a)?,
        Command::Status(a) => status(&client, a, &mut out)?,
        Command::Cluster(ClusterCommand::Status(a)) => cluster_status(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Promote(a)) => volume_promote(&client, a, &mut out)?,
        Command::Volume(VolumeCommand::Move(a)) => volume_move(&client, a, &mut out)?,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "volfs",
                &mut out,
            );
            0
        }
        Command::Manpages { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            0
        }
    };
    out.flush()?;
    Ok(code)
}

// ---------------------------------------------------------------------------------------------
// Subcommands
// ---------------------------------------------------------------------------------------------

fn volume_create(client: &Client, args: CreateArgs, out: &mut dyn Write) -> Result<i32> {
    let name = volume_name(&args.name)?;
    let labels = parse_labels(&args.labels)?;
    let mut list = args.opts.clone();
    if let Some(f) = &args.from {
        list.push(format!("from={f}"));
    }
    if let Some(l) = &args.layers {
        list.push(format!("layers={l}"));
    }
    let opts = parse_opts(&list, args.read_only)?;
    let req = CreateVolume {
        name: name.to_string(),
        labels,
        opts,
        read_only: args.read_only,
    };
    let info: VolumeInfo = client.post("/v1/volumes", &req)?;
    writeln!(out, "{}", info.name)?;
    Ok(0)
}

fn volume_ls(client: &Client, args: LsArgs, out: &mut dyn Write) -> Result<i32> {
    let filters = parse_filters(&args.filters)?;
    let mut vols: Vec<VolumeInfo> = client.get("/v1/volumes")?;
    vols.retain(|v| api::labels_match(&v.labels, &filters));
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    if args.json {
        write_json(out, &vols)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.size.map_or_else(|| "-".to_string(), human_bytes),
                human_bytes(v.bytes_used),
                v.mountpoints.len().to_string(),
                format_labels(&v.labels),
                replication_summary(v),
            ]
        })
        .collect();
    write_table(
        out,
        &["NAME", "SIZE", "USED", "MOUNTS", "LABELS", "REPLICATION"],
        &rows,
    )?;
    Ok(0)
}

fn volume_update(client: &Client, args: UpdateArgs, out: &mut dyn Write) -> Result<i32> {
    let name = volume_name(&args.name)?;
    let opts = parse_opts(&args.opts, false)?;
    if let Some(k) = opts
        .keys()
        .find(|k| !REPLICATION_KEYS.contains(&k.as_str()))
    {
        bail!("option {k:?} cannot be changed with volume update (known: replicas, rpo, ship)");
    }
    let v: VolumeInfo = client.post(
        &format!("/v1/volumes/{name}/update"),
        &api::UpdateVolume { opts },
    )?;
    if args.json {
        write_json(out, &v)?;
    } else {
        writeln!(out, "{}: {}", v.name, replication_summary(&v))?;
    }
    Ok(0)
}

/// The options the replication worker owns (checked here, not by `CreateOptions`).
const REPLICATION_KEYS: [&str; 3] = ["replicas", "rpo", "ship"];

fn volume_pull(client: &Client, args: PullArgs, out: &mut dyn Write) -> Result<i32> {
    let name = volume_name(&args.name)?;
    let resp = client.stream(
        "POST",
        &format!("/v1/volumes/{name}/pull"),
        "application/json",
        Some(&mut b"{}".as_slice()),
    )?;
    let r: api::PullReport = follow(resp, "pull")?;
    if args.json {
        write_json(out, &r)?;
    } else {
        writeln!(
            out,
            "{}: fetched {} chunks, {} ({} bytes){}",
            r.volume,
            r.fetched_chunks,
            human_bytes(r.fetched_bytes),
            r.fetched_bytes,
            if r.lacking_chunks == 0 {
                " (nothing was missing)".to_string()
            } else {
                String::new()
            }
        )?;
        for f in &r.failed {
            writeln!(out, "{}: not fetched: {}", f.chunk, f.why)?;
        }
    }
    Ok(if r.failed.is_empty() { 0 } else { 1 })
}

/// One line about a volume's replication, for `volume ls` and `volume update`.
fn replication_summary(v: &VolumeInfo) -> String {
    if let Some(o) = &v.replica_of {
        return format!("replica of {o}");
    }
    match &v.replication {
        None => "-".into(),
        Some(r) => {
            let mut s = format!("{} replica(s)", r.replicas);
            if r.rpo_secs > 0 {
                s.push_str(&format!(", rpo {}s", r.rpo_secs));
            }
            for p in &r.peers {
                s.push_str(&format!(" [{}: {}, lag {}s]", p.peer, p.state, p.lag_secs));
            }
            s
        }
    }
}

fn volume_inspect(client: &Client, args: InspectArgs, out: &mut dyn Write) -> Result<i32> {
    let names = volume_names(&args.names)?;
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for name in &names {
        match client.get::<VolumeInfo>(&format!("/v1/volumes/{name}")) {
            Ok(v) => found.push(v),
            // The daemon refused this one (not found, ...): report it and go on with the rest.
            Err(e @ ClientError::Api { .. }) => failed.push(e.to_string()),
            Err(e) => return Err(e.into()),
        }
    }
    write_json(out, &found)?;
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(0)
}

fn volume_rm(client: &Client, args: RmArgs, out: &mut dyn Write) -> Result<i32> {
    let names = volume_names(&args.names)?;
    let items = names
        .iter()
        .map(|n| {
            (
                format!("/v1/volumes/{n}?force={}", args.force),
                n.to_string(),
            )
        })
        .collect();
    delete_each(client, items, out)
}

/// DELETEs each `(path, name)`, printing the name of each one removed. A refusal by the daemon
/// is reported and the rest still go; all refusals make one error at the end.
fn delete_each(client: &Client, items: Vec<(String, String)>, out: &mut dyn Write) -> Result<i32> {
    let mut failed = Vec::new();
    for (path, name) in items {
        match client.delete::<serde_json::Value>(&path) {
            Ok(_) => writeln!(out, "{name}")?,
            Err(e @ ClientError::Api { .. }) => failed.push(e.to_string()),
            Err(e) => return Err(e.into()),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(0)
}

fn volume_prune(client: &Client, args: PruneArgs, out: &mut dyn Write) -> Result<i32> {
    let filters = parse_filters(&args.filters)?;
    if !args.force {
        if !io::stdin().is_terminal() {
            bail!("refusing to prune without confirmation: standard input is not a terminal (pass --force)");
        }
        let mut vols: Vec<VolumeInfo> = client.get("/v1/volumes")?;
        vols.retain(|v| v.mountpoints.is_empty() && api::labels_match(&v.labels, &filters));
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        if vols.is_empty() {
            writeln!(out, "No unused volumes to remove.")?;
            return Ok(0);
        }
        writeln!(out, "These volumes are not mounted and will be removed:")?;
        for v in &vols {
            writeln!(out, "  {}", v.name)?;
        }
        let noun = if vols.len() == 1 { "volume" } else { "volumes" };
        if !confirm(out, &format!("Remove {} {noun}?", vols.len()))? {
            writeln!(out, "Nothing removed.")?;
            return Ok(0);
        }
    }
    let reply: PruneReply = client.post("/v1/volumes/prune", &PruneRequest { filters })?;
    for name in &reply.removed {
        writeln!(out, "{name}")?;
    }
    Ok(0)
}

fn volume_clone(client: &Client, args: CloneArgs, out: &mut dyn Write) -> Result<i32> {
    VolumeRef::parse(&args.src).map_err(invalid)?;
    let name = volume_name(&args.dst)?;
    let mut opts = BTreeMap::new();
    opts.insert("from".to_string(), args.src.clone());
    let req = CreateVolume {
        name: name.to_string(),
        opts,
        ..Default::default()
    };
    let info: VolumeInfo = client.post("/v1/volumes", &req)?;
    writeln!(out, "{}", info.name)?;
    Ok(0)
}

/// Parses VOLUME@SNAPSHOT.
fn snapshot_ref(s: &str) -> Result<(VolumeName, String)> {
    let r = VolumeRef::parse(s).map_err(invalid)?;
    match r.snapshot {
        Some(snap) => Ok((r.volume, snap)),
        None => bail!("{s:?} names no snapshot: expected VOLUME@SNAPSHOT"),
    }
}

fn volume_rollback(client: &Client, args: RollbackArgs, out: &mut dyn Write) -> Result<i32> {
    let (vol, snapshot) = snapshot_ref(&args.target)?;
    let _: VolumeInfo = client.post(
        &format!("/v1/volumes/{vol}/rollback"),
        &RollbackRequest { snapshot },
    )?;
    writeln!(out, "{}", args.target)?;
    Ok(0)
}

fn snapshot_create(client: &Client, args: SnapshotCreateArgs, out: &mut dyn Write) -> Result<i32> {
    let vol = volume_name(&args.volume)?;
    if let Some(n) = &args.name {
        volfs::layer::check_snapshot_name(n).map_err(invalid)?;
    }
    let s: SnapshotInfo = client.post(
        &format!("/v1/volumes/{vol}/snapshots"),
        &CreateSnapshot { name: args.name },
    )?;
    writeln!(out, "{}@{}", s.volume, s.name)?;
    Ok(0)
}

fn snapshot_ls(client: &Client, args: SnapshotLsArgs, out: &mut dyn Write) -> Result<i32> {
    let vol = volume_name(&args.volume)?;
    let snaps: Vec<SnapshotInfo> = client.get(&format!("/v1/volumes/{vol}/snapshots"))?;
    if args.json {
        write_json(out, &snaps)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.created.clone(),
                human_bytes(s.bytes_used),
                s.layer.as_deref().map_or("(sealing)".to_string(), |l| {
                    l.get(..16).unwrap_or(l).to_string()
                }),
            ]
        })
        .collect();
    write_table(out, &["NAME", "CREATED", "USED", "LAYER"], &rows)?;
    Ok(0)
}

fn snapshot_rm(client: &Client, args: SnapshotRmArgs, out: &mut dyn Write) -> Result<i32> {
    let refs = args
        .targets
        .iter()
        .map(|t| snapshot_ref(t))
        .collect::<Result<Vec<_>>>()?;
    let items = refs
        .into_iter()
        .map(|(vol, snap)| {
            (
                format!("/v1/volumes/{vol}/snapshots/{snap}"),
                format!("{vol}@{snap}"),
            )
        })
        .collect();
    delete_each(client, items, out)
}

fn layer_id(s: &str) -> Result<LayerId> {
    s.parse().map_err(invalid)
}

fn layer_import(client: &Client, args: LayerImportArgs, out: &mut dyn Write) -> Result<i32> {
    let abs = args
        .file
        .canonicalize()
        .with_context(|| format!("layer tarball {}", args.file.display()))?;
    if !abs.is_file() {
        bail!("layer tarball {} is not a file", args.file.display());
    }
    let r: ImportedLayer = client.post(
        "/v1/layers",
        &ImportLayer {
            path: path_string(abs)?,
        },
    )?;
    writeln!(out, "{}", r.id)?;
    Ok(0)
}

fn layer_export(client: &Client, args: LayerExportArgs, out: &mut dyn Write) -> Result<i32> {
    let id = layer_id(&args.id)?;
    let (path, temp) = match &args.output {
        Some(p) => {
            let abs = if p.is_absolute() {
                p.clone()
            } else {
                std::env::current_dir()?.join(p)
            };
            (abs, false)
        }
        None => {
            if io::stdout().is_terminal() {
                bail!("refusing to write a tarball to a terminal: use -o FILE or redirect standard output");
            }
            let p = std::env::temp_dir().join(format!("volfs-export-{}.tar", std::process::id()));
            (p, true)
        }
    };
    let res: std::result::Result<serde_json::Value, _> = client.post(
        &format!("/v1/layers/{id}/export"),
        &ExportLayer {
            path: path_string(path.clone())?,
        },
    );
    if temp {
        let copied = res.map_err(anyhow::Error::from).and_then(|_| {
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            io::copy(&mut f, out)?;
            Ok(())
        });
        let _ = std::fs::remove_file(&path);
        copied?;
    } else {
        res?;
    }
    Ok(0)
}

/// Progress of a long transfer on stderr, only when stderr is a terminal: bytes done / total
/// and the rate, redrawn at most 5 times a second.
struct Meter {
    on: bool,
    what: &'static str,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl Meter {
    fn new(what: &'static str) -> Meter {
        Meter {
            on: io::stderr().is_terminal(),
            what,
            start: std::time::Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64, total: Option<u64>) {
        if !self.on || self.last.is_some_and(|l| l.elapsed().as_millis() < 200) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let of = match total {
            Some(t) if t > 0 => format!(
                " / {} ({:.0}%)",
                human_bytes(t),
                (done as f64 * 100.0 / t as f64).min(100.0)
            ),
            _ => String::new(),
        };
        eprint!(
            "\r\x1b[K{}: {}{of}, {}/s",
            self.what,
            human_bytes(done),
            human_bytes((done as f64 / secs) as u64)
        );
    }

    fn finish(&mut self) {
        if self.on && self.last.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Counts the bytes read through it for a [`Meter`].
struct Counted<'a, R> {
    r: R,
    done: u64,
    total: Option<u64>,
    meter: &'a mut Meter,
}

impl<R: io::Read> io::Read for Counted<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(out)?;
        self.done += n as u64;
        self.meter.update(self.done, self.total);
        Ok(n)
    }
}

fn volume_export(client: &Client, args: VolumeExportArgs, out: &mut dyn Write) -> Result<i32> {
    let r = VolumeRef::parse(&args.volume).map_err(invalid)?;
    let (vol, snap) = volfs::layer::split_ref(r.as_str()).map_err(invalid)?;
    let mut file = match &args.output {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => {
            if io::stdout().is_terminal() {
                bail!("refusing to write a tarball to a terminal: use -o FILE or redirect standard output");
            }
            None
        }
    };
    let path = match &snap {
        Some(s) => format!("/v1/volumes/{vol}/export?snapshot={s}"),
        None => format!("/v1/volumes/{vol}/export"),
    };
    let resp = client.stream("GET", &path, "application/json", None)?;
    let total = resp
        .header(api::HEADER_TOTAL)
        .and_then(|v| v.parse::<u64>().ok());
    let mut meter = Meter::new("export");
    let mut r = Counted {
        r: resp,
        done: 0,
        total,
        meter: &mut meter,
    };
    let dest: &mut dyn Write = match &mut file {
        Some(f) => f,
        None => out,
    };
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match io::Read::read(&mut r, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                drop(r);
                if let Some(p) = &args.output {
                    let _ = std::fs::remove_file(p);
                }
                bail!("export of {} failed: {e}", args.volume);
            }
        };
        dest.write_all(&buf[..n])?;
    }
    dest.flush()?;
    if let Some(f) = &file {
        f.sync_all().context("syncing the tarball")?;
    }
    Ok(0)
}

fn volume_import(client: &Client, args: VolumeImportArgs, out: &mut dyn Write) -> Result<i32> {
    let name = volume_name(&args.name)?;
    let stdin = io::stdin();
    if stdin.is_terminal() {
        bail!("refusing to read a tarball from a terminal: redirect standard input (volfs volume import NAME < vol.tar)");
    }
    // The size of a redirected file, for progress.
    let total = std::fs::metadata("/proc/self/fd/0")
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let mut meter = Meter::new("import");
    let mut r = Counted {
        r: stdin.lock(),
        done: 0,
        total,
        meter: &mut meter,
    };
    let resp = client.stream(
        "POST",
        &format!("/v1/volumes/{name}/import"),
        "application/x-tar",
        Some(&mut r),
    )?;
    let info: VolumeInfo =
        serde_json::from_reader(resp).map_err(|e| ClientError::Protocol(e.to_string()))?;
    meter.finish();
    writeln!(out, "{}", info.name)?;
    Ok(0)
}

/// The repository path: absolute (the daemon writes and reads it, not this process).
fn repo_dir(dir: &Path) -> Result<String> {
    if !dir.is_absolute() {
        bail!(
            "backup repository {} must be an absolute path (the daemon opens it)",
            dir.display()
        );
    }
    path_string(dir.to_path_buf())
}

/// Reads a newline-delimited [`api::StreamLine`] answer, showing its progress.
fn follow<T: serde::de::DeserializeOwned>(
    resp: volfs::client::Streamed,
    what: &'static str,
) -> Result<T> {
    let mut meter = Meter::new(what);
    for line in io::BufReader::new(resp).lines() {
        let line = line.with_context(|| format!("{what}: reading the daemon's answer"))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<api::StreamLine<T>>(&line)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            api::StreamLine::Progress { done, total } => meter.update(done, Some(total)),
            api::StreamLine::Done(v) => return Ok(v),
            api::StreamLine::Error(e) => {
                meter.finish();
                bail!("{e}")
            }
        }
    }
    bail!("{what}: volfs-mountd ended its answer without a result (its log says why)")
}

fn backup(client: &Client, args: BackupCli, out: &mut dyn Write) -> Result<i32> {
    if let Some(BackupCommand::Ls(a)) = args.command {
        return backup_ls(client, a, out);
    }
    let (Some(volume), Some(to)) = (args.volume, args.to) else {
        bail!("volfs backup needs VOLUME and --to DIR (see volfs backup --help)");
    };
    let r = VolumeRef::parse(&volume).map_err(invalid)?;
    let repo = repo_dir(&to)?;
    if let Some(n) = &args.name {
        volfs::backup::check_backup_name(n).map_err(invalid)?;
    }
    let body = serde_json::to_vec(&api::BackupRequest {
        volume: r.to_string(),
        repo,
        name: args.name,
    })?;
    let resp = client.stream(
        "POST",
        "/v1/backups",
        "application/json",
        Some(&mut body.as_slice()),
    )?;
    let info: api::BackupInfo = follow(resp, "backup")?;
    if args.json {
        write_json(out, &info)?;
    } else {
        writeln!(
            out,
            "{}: {} in {} files, {} new ({} stored)",
            info.name,
            human_bytes(info.bytes),
            info.files,
            human_bytes(info.new_bytes),
            human_bytes(info.new_stored_bytes)
        )?;
    }
    Ok(0)
}

fn backup_ls(client: &Client, args: BackupLsArgs, out: &mut dyn Write) -> Result<i32> {
    let repo = repo_dir(&args.dir)?;
    let list: Vec<api::BackupInfo> = client.post("/v1/backups/list", &api::BackupList { repo })?;
    if args.json {
        write_json(out, &list)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                printable(&b.name),
                match &b.snapshot {
                    Some(s) => format!("{}@{}", b.volume, s),
                    None => b.volume.clone(),
                },
                b.created.clone(),
                human_bytes(b.bytes),
                human_bytes(b.new_bytes),
            ]
        })
        .collect();
    write_table(out, &["NAME", "VOLUME", "CREATED", "SIZE", "NEW"], &rows)?;
    Ok(0)
}

fn restore(client: &Client, args: RestoreArgs, out: &mut dyn Write) -> Result<i32> {
    let repo = repo_dir(&args.dir)?;
    let volume = volume_name(&args.volume)?;
    volfs::backup::check_backup_name(&args.backup).map_err(invalid)?;
    let body = serde_json::to_vec(&api::RestoreRequest {
        repo,
        backup: args.backup,
        volume: volume.to_string(),
    })?;
    let resp = client.stream(
        "POST",
        "/v1/restore",
        "application/json",
        Some(&mut body.as_slice()),
    )?;
    let info: VolumeInfo = follow(resp, "restore")?;
    writeln!(out, "{}", info.name)?;
    Ok(0)
}

fn layer_ls(client: &Client, args: JsonArgs, out: &mut dyn Write) -> Result<i32> {
    let layers: Vec<LayerInfo> = client.get("/v1/layers")?;
    if args.json {
        write_json(out, &layers)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.kind.clone(),
                human_bytes(l.bytes),
                api::rfc3339(l.created),
                l.origin.clone(),
            ]
        })
        .collect();
    write_table(out, &["LAYER", "KIND", "SIZE", "CREATED", "ORIGIN"], &rows)?;
    Ok(0)
}

fn layer_rm(client: &Client, args: LayerRmArgs, out: &mut dyn Write) -> Result<i32> {
    let ids = args
        .ids
        .iter()
        .map(|i| layer_id(i))
        .collect::<Result<Vec<_>>>()?;
    let items = ids
        .iter()
        .map(|id| (format!("/v1/layers/{id}"), id.to_string()))
        .collect();
    delete_each(client, items, out)
}

fn df(client: &Client, args: JsonArgs, out: &mut dyn Write) -> Result<i32> {
    let r: DfReport = client.get("/v1/df")?;
    if args.json {
        write_json(out, &r)?;
        return Ok(0);
    }
    writeln!(out, "logical:     {}", human_bytes(r.logical))?;
    writeln!(out, "stored:      {}", human_bytes(r.stored))?;
    writeln!(out, "dedup ratio: {:.2}", r.dedup_ratio)?;
    writeln!(out, "packs:       {}", human_bytes(r.pack_bytes))?;
    writeln!(out, "index:       {}", human_bytes(r.index_bytes))?;
    writeln!(
        out,
        "garbage:     {} (volfs gc frees it)",
        human_bytes(r.garbage)
    )?;
    if !r.volumes.is_empty() {
        writeln!(out)?;
        let rows: Vec<Vec<String>> = r
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    human_bytes(v.logical),
                    human_bytes(v.exclusive),
                    human_bytes(v.shared),
                    v.snapshots.to_string(),
                ]
            })
            .collect();
        write_table(
            out,
            &["VOLUME", "LOGICAL", "EXCLUSIVE", "SHARED", "SNAPSHOTS"],
            &rows,
        )?;
    }
    Ok(0)
}

fn gc(client: &Client, args: JsonArgs, out: &mut dyn Write) -> Result<i32> {
    let r: GcReport = client.post("/v1/gc", &serde_json::json!({}))?;
    if args.json {
        write_json(out, &r)?;
        return Ok(0);
    }
    writeln!(
        out,
        "freed {} chunk(s) ({}) and {} tree(s); {} pack(s) compacted, {} removed; disk {} -> {} in {} ms",
        r.chunks_freed,
        human_bytes(r.bytes_freed),
        r.trees_freed,
        r.packs_compacted,
        r.packs_removed,
        human_bytes(r.disk_before),
        human_bytes(r.disk_after),
        r.millis
    )?;
    Ok(0)
}

fn fsck(client: &Client, args: FsckArgs, out: &mut dyn Write) -> Result<i32> {
    let r: FsckReport = client.post(
        "/v1/fsck",
        &FsckRequest {
            repair: args.repair,
        },
    )?;
    let open = r
        .problems
        .iter()
        .filter(|p| !p.outcome.starts_with("repaired"))
        .count();
    if args.json {
        write_json(out, &r)?;
    } else {
        writeln!(
            out,
            "checked {} volume(s), {} snapshot(s), {} inode(s), {} chunk(s) ({} verified)",
            r.volumes,
            r.snapshots,
            r.inodes,
            r.chunks,
            human_bytes(r.bytes_verified)
        )?;
        if r.garbage_chunks > 0 || r.garbage_trees > 0 {
            writeln!(
                out,
                "garbage: {} chunk(s) ({}) and {} tree(s) unused; volfs gc frees them",
                r.garbage_chunks,
                human_bytes(r.garbage_bytes),
                r.garbage_trees
            )?;
        }
        if r.not_fetched_chunks > 0 {
            writeln!(
                out,
                "not yet fetched, {} chunk(s): lazy replica(s) {} (not damage: reads fetch them from peers; volfs volume pull fetches them all)",
                r.not_fetched_chunks,
                r.not_fetched_volumes.join(", ")
            )?;
        }
        for p in &r.problems {
            writeln!(out, "{}: {} [{}]", p.kind, one_line(&p.detail), p.outcome)?;
        }
        if r.problems.is_empty() {
            writeln!(out, "no problems found")?;
        }
    }
    Ok(if open > 0 { 1 } else { 0 })
}

fn peer(client: &Client, cmd: PeerCommand, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        PeerCommand::Keygen => {
            let mut key = [0u8; 32];
            let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
            io::Read::read_exact(&mut f, &mut key).context("reading /dev/urandom")?;
            writeln!(out, "{}", hex::encode(key))?;
            Ok(0)
        }
        PeerCommand::Add { name, addr } => {
            volfs::meta::check_peer_name(&name)?;
            volfs::meta::check_peer_addr(&addr)?;
            let p: api::PeerInfo = client.post("/v1/peers", &api::AddPeer { name, addr })?;
            writeln!(
                out,
                "added peer {} ({}): {}",
                p.name,
                p.addr,
                peer_state(&p)
            )?;
            Ok(0)
        }
        PeerCommand::Rm { name } => {
            volfs::meta::check_peer_name(&name)?;
            let _: serde_json::Value = client.delete(&format!("/v1/peers/{name}"))?;
            Ok(0)
        }
        PeerCommand::Ls(a) => {
            let peers: Vec<api::PeerInfo> = client.get("/v1/peers")?;
            if a.json {
                write_json(out, &peers)?;
                return Ok(0);
            }
            let w = peers.iter().map(|p| p.name.len()).max().unwrap_or(4).max(4);
            let wa = peers.iter().map(|p| p.addr.len()).max().unwrap_or(7).max(7);
            writeln!(out, "{:<w$}  {:<wa$}  STATE", "NAME", "ADDRESS")?;
            for p in &peers {
                writeln!(out, "{:<w$}  {:<wa$}  {}", p.name, p.addr, peer_state(p))?;
            }
            Ok(0)
        }
    }
}

/// One peer's state in words.
fn peer_state(p: &api::PeerInfo) -> String {
    match (&p.error, p.latency_ms) {
        (Some(e), _) => one_line(e),
        (None, Some(ms)) => format!(
            "authenticated, v{}, host {}, {ms:.1} ms",
            p.version.unwrap_or(0),
            p.host.as_deref().unwrap_or("?")
        ),
        (None, None) => "unknown".into(),
    }
}

fn scrub(client: &Client, args: JsonArgs, out: &mut dyn Write) -> Result<i32> {
    let r: ScrubReport = client.post("/v1/scrub", &serde_json::json!({}))?;
    if args.json {
        write_json(out, &r)?;
    } else {
        writeln!(
            out,
            "verified {} chunk(s) ({}) in {} ms",
            r.chunks,
            human_bytes(r.bytes_verified),
            r.millis
        )?;
        for p in &r.repaired_from_peers {
            writeln!(out, "repaired: chunk {} from {}", p.chunk, p.from)?;
        }
        for c in &r.corrupt {
            writeln!(
                out,
                "corrupt: chunk {c} (volfs fsck names the files that use it)"
            )?;
        }
    }
    Ok(if r.corrupt.is_empty() { 0 } else { 1 })
}

fn mount(client: &Client, args: MountArgs) -> Result<i32> {
    let volume = VolumeRef::parse(&args.volume).map_err(invalid)?;
    let target = existing_dir(&args.dir)?;
    let req = MountRequest {
        volume: volume.to_string(),
        target,
        read_only: args.read_only,
    };
    let _: MountInfo = client.post("/v1/mounts", &req)?;
    Ok(0)
}

fn umount(client: &Client, args: UmountArgs) -> Result<i32> {
    let target = mount_point(&args.dir)?;
    let _: serde_json::Value = client.post("/v1/unmount", &UnmountRequest { target })?;
    Ok(0)
}

fn cluster_status(client: &Client, args: JsonArgs, out: &mut dyn Write) -> Result<i32> {
    let st: api::ClusterStatus = client.get("/v1/cluster")?;
    if args.json {
        write_json(out, &st)?;
        return Ok(0);
    }
    if st.mode != "etcd" {
        writeln!(
            out,
            "single host (no etcd_endpoints): this host owns all its volumes"
        )?;
        return Ok(0);
    }
    writeln!(
        out,
        "host {} in etcd {}: lease {:x} (ttl {} s), {}",
        st.host,
        st.endpoints.join(","),
        st.lease_id,
        st.lease_ttl_secs,
        if st.connected {
            "connected"
        } else {
            "NOT connected"
        }
    )?;
    if let Some(e) = &st.last_error {
        writeln!(out, "last error: {e}")?;
    }
    let rows: Vec<Vec<String>> = st
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.host.clone(),
                if h.ttl_left >= 0 {
                    format!("{} s", h.ttl_left)
                } else {
                    "?".into()
                },
                h.version.clone(),
                h.peer.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    write_table(out, &["HOST", "LEASE LEFT", "VERSION", "PEER"], &rows)?;
    writeln!(out)?;
    let rows: Vec<Vec<String>> = st
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.owner.clone().unwrap_or_else(|| "-".into()),
                v.token.map_or_else(|| "-".into(), |t| t.to_string()),
                if v.replicas.is_empty() {
                    "-".into()
                } else {
                    v.replicas.join(",")
                },
                v.local.clone(),
            ]
        })
        .collect();
    write_table(
        out,
        &["VOLUME", "OWNER", "TOKEN", "REPLICAS", "HERE"],
        &rows,
    )?;
    Ok(0)
}

fn volume_promote(client: &Client, args: PromoteArgs, out: &mut dyn Write) -> Result<i32> {
    let name = volume_name(&args.volume)?;
    let p: api::Promoted = client.post(
        &format!("/v1/volumes/{name}/promote"),
        &api::PromoteRequest { force: args.force },
    )?;
    if args.json {
        write_json(out, &p)?;
        return Ok(0);
    }
    writeln!(
        out,
        "{}: owned by host {} now, fencing token {}; writable at {} ({})",
        p.volume, p.host, p.token, p.point_in_time, p.basis
    )?;
    if let Some(n) = &p.note {
        writeln!(out, "note: {n}")?;
    }
    Ok(0)
}

fn volume_move(client: &Client, args: MoveArgs, out: &mut dyn Write) -> Result<i32> {
    let name = volume_name(&args.volume)?;
    let body = serde_json::to_vec(&api::MoveRequest {
        to: args.to,
        force: args.force,
    })?;
    let resp = client.stream(
        "POST",
        &format!("/v1/volumes/{name}/move"),
        "application/json",
        Some(&mut body.as_slice()),
    )?;
    let m: api::Moved = follow(resp, "move")?;
    if args.json {
        write_json(out, &m)?;
    } else {
        writeln!(
            out,
            "{}: moved to {} at snapshot {} ({}); {} sent; fencing token {} -> {}; this host keeps a read-only replica",
            m.volume,
            m.to,
            m.snapshot,
            m.snapshot_time,
            human_bytes(m.bytes_sent),
            m.token_before,
            m.token
        )?;
    }
    Ok(0)
}

fn status(client: &Client, args: StatusArgs, out: &mut dyn Write) -> Result<i32> {
    let st: Status = client.get("/v1/status")?;
    if args.json {
        write_json(out, &st)?;
    } else {
        write_status(out, &st)?;
    }
    Ok(if st.warnings.is_empty() { 0 } else { 1 })
}

fn write_status(out: &mut dyn Write, st: &Status) -> io::Result<()> {
    writeln!(out, "version:        {}", st.version)?;
    if st.server_pid != 0 && st.server_pid != st.pid {
        writeln!(
            out,
            "pid:            {} (server {}, replaced {} time(s) after a crash)",
            st.pid, st.server_pid, st.server_restarts
        )?;
    } else {
        writeln!(out, "pid:            {}", st.pid)?;
    }
    writeln!(out, "uptime:         {}", human_duration(st.uptime_secs))?;
    if !st.cluster.is_empty() {
        writeln!(out, "cluster:        {}", st.cluster)?;
    }
    writeln!(
        out,
        "data dir:       {} ({} free of {})",
        printable(&st.data_dir),
        human_bytes(st.data_dir_free_bytes),
        human_bytes(st.data_dir_total_bytes)
    )?;
    writeln!(out, "stored:         {}", human_bytes(st.stored_bytes))?;
    writeln!(out, "logical:        {}", human_bytes(st.logical_bytes))?;
    writeln!(out, "dedup ratio:    {:.2}", st.dedup_ratio)?;
    writeln!(out, "corrupt chunks: {}", st.corrupt_chunks)?;
    let ix = &st.index;
    let busy = match (ix.running_flushes, ix.running_compactions) {
        _ if ix.quiet() => "quiet".to_string(),
        (f, c) => format!(
            "{f} flush(es), {c} compaction(s) running, {} to compact",
            human_bytes(ix.pending_compaction_bytes)
        ),
    };
    writeln!(out, "index:          {} ({busy})", human_bytes(ix.bytes))?;
    for t in &st.background {
        let now = match (&t.progress, t.running) {
            (Some(p), true) => format!("running: {}", p.describe()),
            _ if t.interval_secs > 0 => {
                format!("every {}", human_duration(t.interval_secs))
            }
            _ => "on request".to_string(),
        };
        let last = match (&t.last_finished, &t.last_outcome) {
            (Some(when), Some(what)) => format!("; last {when}: {}", one_line(what)),
            _ => "; not run since start".to_string(),
        };
        writeln!(out, "{:<15} {now}{last}", format!("{}:", t.task))?;
    }
    writeln!(out, "volumes:        {}", st.volumes.len())?;
    if !st.volumes.is_empty() {
        writeln!(out)?;
        let rows: Vec<Vec<String>> = st
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    human_bytes(v.bytes_used),
                    v.size.map(human_bytes).unwrap_or_else(|| "-".into()),
                    v.open_handles.to_string(),
                    if v.mountpoints.is_empty() {
                        "-".to_string()
                    } else {
                        printable(&v.mountpoints.join(", "))
                    },
                ]
            })
            .collect();
        write_table(
            out,
            &["NAME", "USED", "QUOTA", "OPEN HANDLES", "MOUNTPOINTS"],
            &rows,
        )?;
    }
    for w in &st.warnings {
        writeln!(out, "warning: {}", one_line(w))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------------

/// A volfs validation error without its "invalid argument: " prefix; the CLI's line says it.
fn invalid(e: volfs::Error) -> anyhow::Error {
    match e {
        volfs::Error::Invalid(m) => anyhow!(m),
        e => e.into(),
    }
}

fn volume_name(s: &str) -> Result<VolumeName> {
    VolumeName::new(s).map_err(invalid)
}

fn volume_names(list: &[String]) -> Result<Vec<VolumeName>> {
    list.iter().map(|n| volume_name(n)).collect()
}

/// Parses one `--label KEY=VALUE` (the value may be empty, the key may not).
fn parse_label(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("invalid label {s:?}: expected KEY=VALUE with a non-empty KEY"),
    }
}

/// Parses all `--label`s; a key given twice with different values is refused.
fn parse_labels(list: &[String]) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for s in list {
        let (k, v) = parse_label(s)?;
        if let Some(old) = labels.get(&k) {
            if *old != v {
                bail!("label {k:?} is given twice ({old:?} and {v:?})");
            }
        }
        labels.insert(k, v);
    }
    Ok(labels)
}

/// Parses all `--opt KEY=VALUE` (a bare `KEY` means an empty value, so `--opt ro` works) and
/// checks them exactly as the daemon will: [`CreateOptions::set_opt`] in key order, applied
/// over `--read-only`.
fn parse_opts(list: &[String], read_only: bool) -> Result<BTreeMap<String, String>> {
    let mut opts = BTreeMap::new();
    for s in list {
        let (k, v) = s.split_once('=').unwrap_or((s.as_str(), ""));
        if k.is_empty() {
            bail!("invalid option {s:?}: expected KEY=VALUE with a non-empty KEY");
        }
        opts.insert(k.to_string(), v.to_string());
    }
    let mut check = CreateOptions {
        read_only,
        ..CreateOptions::default()
    };
    for (k, v) in &opts {
        match k.as_str() {
            "replicas" => {
                v.trim().parse::<u32>().map_err(|_| {
                    anyhow!("invalid option replicas: {v:?} is not a number of peers")
                })?;
            }
            "rpo" => {
                volfs::replica::parse_duration(v).map_err(invalid)?;
            }
            "ship" => {
                volfs::replica::parse_ship(v).map_err(invalid)?;
            }
            _ => check.set_opt(k, v).map_err(invalid)?,
        }
    }
    if read_only && !check.read_only {
        bail!("--read-only conflicts with a read-only option set to false");
    }
    Ok(opts)
}

/// Turns `--filter label=KEY[=VALUE]` into the API's label filter `KEY[=VALUE]`.
fn parse_filter(s: &str) -> Result<String> {
    let Some((kind, rest)) = s.split_once('=') else {
        bail!("invalid filter {s:?}: expected label=KEY or label=KEY=VALUE");
    };
    if kind != "label" {
        bail!("unsupported filter {kind:?}: volfs filters on label=KEY or label=KEY=VALUE");
    }
    let key = rest.split_once('=').map_or(rest, |(k, _)| k);
    if key.is_empty() {
        bail!("invalid filter {s:?}: the label key is empty");
    }
    Ok(rest.to_string())
}

fn parse_filters(list: &[String]) -> Result<Vec<String>> {
    list.iter().map(|f| parse_filter(f)).collect()
}

/// The canonical path of `dir`, which must be an existing directory.
fn existing_dir(dir: &Path) -> Result<String> {
    let abs = dir
        .canonicalize()
        .with_context(|| format!("mount point {}", dir.display()))?;
    let md = std::fs::metadata(&abs).with_context(|| format!("mount point {}", dir.display()))?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    path_string(abs)
}

/// The absolute path of a mount point to unmount. A mount whose FUSE server went away cannot
/// be resolved itself (ENOTCONN), so then its parent is resolved and its name appended.
fn mount_point(dir: &Path) -> Result<String> {
    match dir.canonicalize() {
        Ok(p) => path_string(p),
        Err(e) => {
            let via_parent = (e.kind() != io::ErrorKind::NotFound)
                .then(|| dir.file_name())
                .flatten()
                .and_then(|name| {
                    let parent = dir
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."));
                    parent.canonicalize().ok().map(|p| p.join(name))
                });
            match via_parent {
                Some(p) => path_string(p),
                None => Err(e).with_context(|| format!("mount point {}", dir.display())),
            }
        }
    }
}

/// The control API carries paths as UTF-8 strings.
fn path_string(p: PathBuf) -> Result<String> {
    p.into_os_string().into_string().map_err(|p| {
        anyhow!(
            "path {} is not valid UTF-8, which the control API needs",
            Path::new(&p).display()
        )
    })
}

/// Asks a yes/no question on stdin; anything but `y`/`yes` (including end of input) is no.
fn confirm(out: &mut dyn Write, question: &str) -> Result<bool> {
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    let n = io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer from standard input")?;
    if n == 0 {
        writeln!(out)?;
    }
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// Standard output whose write errors carry [`StdoutError`], so that `main` can tell a reader
/// that closed the pipe from a failure to talk to the daemon (whose I/O errors are io errors
/// too).
struct Stdout(io::StdoutLock<'static>);

#[derive(Debug)]
struct StdoutError(io::Error);

impl fmt::Display for StdoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writing to standard output: {}", self.0)
    }
}

impl std::error::Error for StdoutError {}

fn stdout_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), StdoutError(e))
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(stdout_error)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(stdout_error)
    }
}

fn is_closed_stdout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().is_some_and(|io| {
        io.kind() == io::ErrorKind::BrokenPipe
            && io.get_ref().is_some_and(|inner| inner.is::<StdoutError>())
    })
}

fn write_json<T: Serialize + ?Sized>(out: &mut dyn Write, v: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(v).context("encoding JSON")?;
    writeln!(out, "{s}")?;
    Ok(())
}

/// Writes left-aligned columns separated by three spaces, with a header line.
fn write_table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        padded.join("   ").trim_end().to_string()
    };
    writeln!(out, "{}", line(&mut header.iter().copied()))?;
    for row in rows {
        writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

/// `k=v,k2=v2`, control characters escaped so that a row stays one line.
fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `s` with control characters escaped.
fn printable(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            o.extend(c.escape_default());
        } else {
            o.push(c);
        }
    }
    o
}

/// `s` on one line: line breaks (say, in a daemon's HTTP error body) become spaces.
fn one_line(s: &str) -> String {
    printable(
        &s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `10.0 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    // 1023.95 would print as "1024.0"; show it in the next unit instead.
    while v >= 1023.95 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Seconds as `3d 4h 5m 6s`, without leading zero units.
fn human_duration(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts
        .iter()
        .position(|&(v, _)| v > 0)
        .unwrap_or(parts.len() - 1);
    parts[first..]
        .iter()
        .map(|(v, u)| format!("{v}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_parses_aliases_and_socket() {
        let cli =
            Cli::try_parse_from(["volfs", "unmount", "/mnt/x", "--socket", "/tmp/s"]).unwrap();
        assert!(matches!(cli.command, Command::Umount(_)));
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let cli = Cli::try_parse_from(["volfs", "volume", "rm", "-f", "a", "b"]).unwrap();
        match cli.command {
            Command::Volume(VolumeCommand::Rm(a)) => assert!(a.force && a.names == ["a", "b"]),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["volfs", "volume", "inspect"]).is_err());
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("env=ci").unwrap(), ("env".into(), "ci".into()));
        assert_eq!(parse_label("k=").unwrap(), ("k".into(), "".into()));
        assert_eq!(parse_label("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        for bad in ["", "k", "=v", "="] {
            let e = parse_label(bad).unwrap_err().to_string();
            assert!(e.contains("KEY=VALUE"), "{bad}: {e}");
        }
        let m = parse_labels(&["a=1".into(), "b=2".into(), "a=1".into()]).unwrap();
        assert_eq!(m.len(), 2);
        assert!(parse_labels(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn opts_are_checked_like_the_daemon() {
        let o = parse_opts(&["size=10G".into(), "ro".into()], false).unwrap();
        assert_eq!(o.get("ro").map(String::as_str), Some(""));
        let e = parse_opts(&["colour=blue".into()], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("colour") && !e.starts_with("invalid argument"),
            "{e}"
        );
        assert!(parse_opts(&["size=10X".into()], false).is_err());
        assert!(parse_opts(&["=1".into()], false).is_err());
        assert!(parse_opts(&["ro=false".into()], true).is_err());
        assert!(parse_opts(&["ro=true".into()], true).is_ok());
    }

    #[test]
    fn filters_parse() {
        assert_eq!(parse_filter("label=env=ci").unwrap(), "env=ci");
        assert_eq!(parse_filter("label=env").unwrap(), "env");
        let e = parse_filter("dangling=true").unwrap_err().to_string();
        assert!(e.contains("\"dangling\""), "{e}");
        for bad in ["label", "label=", "label==x", "nolabel"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_checked_locally() {
        assert!(volume_name("data1").is_ok());
        let e = volume_name("a/b").unwrap_err().to_string();
        assert!(e.starts_with("invalid volume name"), "{e}");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(3 << 40), "3.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations_are_human() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(65), "1m 5s");
        assert_eq!(human_duration(3600), "1h 0m 0s");
        assert_eq!(human_duration(90_061), "1d 1h 1m 1s");
    }

    #[test]
    fn tables_align() {
        let mut out = Vec::new();
        let rows = vec![
            vec!["data1".to_string(), "-".to_string()],
            vec!["x".to_string(), "1.0 KiB".to_string()],
        ];
        write_table(&mut out, &["NAME", "SIZE"], &rows).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME    SIZE\ndata1   -\nx       1.0 KiB\n"
        );
    }

    #[test]
    fn output_stays_on_one_line() {
        assert_eq!(
            one_line("HTTP 500:\n<html>\r\n oops \n"),
            "HTTP 500: <html> oops"
        );
        let mut l = BTreeMap::new();
        l.insert("k".to_string(), "a\tb".to_string());
        assert_eq!(format_labels(&l), "k=a\\tb");
    }
}
