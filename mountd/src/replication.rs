//! The replication worker: one task per replicated volume, off the request path. Every
//! [`TICK`] it takes an `rpo` snapshot when one is due and the volume changed, ships each
//! snapshot the volume's replica peers lack (oldest first: layers the peer lacks, then only
//! the chunks it lacks, then the tree rows, then one commit), prunes `rpo` snapshots every
//! replica holds (keeping the newest of those), and refreshes each replica's live state
//! (idle, sending N/M bytes, error) and lag. A failed attempt is retried with exponential
//! backoff; the retry asks `HasChunks` again, so chunks that arrived before a cut are not
//! sent twice. Settings and progress live in `repl/<volume>` (see `volfs::replica`).
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use volfs::ids::{ChunkId, LayerId, VolumeName};
use volfs::layer::{self, SnapshotRecord};
use volfs::meta::PeerRecord;
use volfs::replica::{self, Incoming, ReplSettings, TreeMeta};
use volfs::Error;

use crate::control::Daemon;
use crate::peer::client::PeerClient;

/// How often each volume's worker looks for work.
pub const TICK: Duration = Duration::from_millis(500);
/// Longest wait between two attempts at a failing replica.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Live state by (volume, replica peer).
pub type LiveTable = BTreeMap<(String, String), Live>;

#[derive(Clone, Debug, Default)]
pub struct Live {
    /// `idle`, `sending`, `error`.
    pub state: &'static str,
    pub sent_bytes: u64,
    pub total_bytes: u64,
    pub last_error: Option<String>,
    pub lag_secs: u64,
}

/// The replica peers of a volume, the one place placement is decided. Cluster mode
/// (`placed` is the etcd `volumes/<name>/replicas` key): those hosts, this host left out, each
/// looked up as the peer record of the same name (so a peer must be added under its host
/// name, `volfs peer add HOST ADDR`); a placed host without a record is returned in the
/// second list. A single host: the first `n` peers by name other than `me` (this host's
/// name: a promoted or moved volume's new owner may have a peer record of itself among the
/// hosts it shares its peer list with).
pub fn placement(
    me: &str,
    peers: &[PeerRecord],
    placed: Option<Vec<String>>,
    n: usize,
) -> (Vec<PeerRecord>, Vec<String>) {
    match placed {
        Some(hosts) => {
            let mut found = Vec::new();
            let mut missing = Vec::new();
            for h in hosts.into_iter().filter(|h| h != me) {
                match peers.iter().find(|p| p.name == h) {
                    Some(p) => found.push(p.clone()),
                    None => missing.push(h),
                }
            }
            (found, missing)
        }
        None => {
            let mut p: Vec<PeerRecord> = peers.iter().filter(|p| p.name != me).cloned().collect();
            p.sort_by(|a, b| a.name.cmp(&b.name));
            p.truncate(n);
            (p, Vec::new())
        }
    }
}

/// [`placement`] for a volume of this daemon.
pub fn targets(d: &Daemon, vol: &str, n: usize) -> volfs::Result<(Vec<PeerRecord>, Vec<String>)> {
    let peers = d.peers.records()?;
    let placed = d.mounts.cluster().map(|c| c.replicas(vol));
    Ok(placement(d.peers.host_name(), &peers, placed, n))
}

/// The fencing token of this host's ownership of `volume`, the one place it is decided
/// (blocking: reads the index). `None`: this host must not ship the volume's changes.
/// Cluster mode: the owner key's `create_revision` while this host owns the volume with a
/// fresh lease (`Cluster::writable_token`); none for a replica, a volume another host owns,
/// or while fenced. A single host: none for a replica (`repl-in/<volume>`), else the token
/// persisted in `repl-fence/<volume>` (0 until a `volume move` or a promote raised it).
pub fn ownership_token(d: &Daemon, volume: &str) -> volfs::Result<Option<u64>> {
    if let Some(c) = d.mounts.cluster() {
        return Ok(c.writable_token(volume).map(|t| t.max(0) as u64));
    }
    let engine = &*d.mounts.registry().store().engine;
    if replica::inbound(engine, volume)?.is_some() {
        return Ok(None);
    }
    replica::fence(engine, volume).map(Some)
}

static SETTINGS_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Read-modify-write of a volume's replication settings (blocking).
pub fn update_settings(
    store: &volfs::store::Store,
    vol: &str,
    f: impl FnOnce(&mut ReplSettings),
) -> volfs::Result<ReplSettings> {
    let _g = SETTINGS_LOCK.lock();
    let mut s = replica::settings(&*store.engine, vol)?.unwrap_or_default();
    f(&mut s);
    replica::put_settings(&*store.engine, vol, &s)?;
    Ok(s)
}

/// `replicas`, `rpo` (seconds), and the other options.
pub type SplitOpts = (Option<u32>, Option<u64>, BTreeMap<String, String>);

/// Applies `replicas` and `rpo` options (the keys this module owns); returns the others.
pub fn split_opts(opts: &BTreeMap<String, String>) -> volfs::Result<SplitOpts> {
    let mut rest = BTreeMap::new();
    let (mut n, mut rpo) = (None, None);
    for (k, v) in opts {
        match k.as_str() {
            "replicas" => {
                n = Some(v.trim().parse::<u32>().map_err(|_| {
                    Error::Invalid(format!("option replicas: {v:?} is not a number of peers"))
                })?)
            }
            "rpo" => rpo = Some(replica::parse_duration(v)?),
            _ => {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    Ok((n, rpo, rest))
}

/// Starts the workers: makes the registry available to the peer listener (receiving
/// replicas) and supervises one task per replicated volume.
pub fn start(d: Arc<Daemon>) {
    if let Some(c) = d.mounts.cluster() {
        let _ = d.peers.cluster.set(c.clone());
    }
    let _ = d
        .peers
        .promoter
        .set(Arc::new(crate::control::PeerPromoter(d.clone())));
    let _ = d.peers.registry.set(d.mounts.registry().clone());
    let _ = d.peers.repl_metrics.set(d.metrics.replication.clone());
    tokio::spawn(async move {
        let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            let store = d.mounts.registry().store().clone();
            let all =
                tokio::task::spawn_blocking(move || replica::all_settings(&*store.engine)).await;
            match all {
                Ok(Ok(all)) => {
                    running.retain(|_, h| !h.is_finished());
                    for (vol, s) in all {
                        if (s.replicas > 0 || s.rpo_secs > 0) && !running.contains_key(&vol) {
                            let h = tokio::spawn(run_volume(d.clone(), vol.clone()));
                            running.insert(vol, h);
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!("replication: reading settings: {e}"),
                Err(e) => tracing::warn!("replication: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> volfs::Result<T> + Send + 'static,
) -> volfs::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Db(format!("worker failed: {e}")))?
}

/// What a tick needs to know about the volume.
struct View {
    settings: ReplSettings,
    peers: Vec<PeerRecord>,
    /// Oldest first (by tree id, which only grows).
    snapshots: Vec<SnapshotRecord>,
    changed: bool,
    created: i64,
}

async fn run_volume(d: Arc<Daemon>, vol: String) {
    let mut backoff: HashMap<String, (Instant, Duration)> = HashMap::new();
    let mut last_auto = Instant::now();
    tracing::info!(volume = %vol, "replication worker started");
    loop {
        tokio::time::sleep(TICK).await;
        let view = {
            let d = d.clone();
            let vol = vol.clone();
            blocking(move || load_view(&d, &vol)).await
        };
        let mut view = match view {
            Ok(Some(v)) => v,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(volume = %vol, "replication: {e}");
                continue;
            }
        };
        if view.settings.replicas == 0 && view.settings.rpo_secs == 0 {
            break;
        }
        // Only the owner, while it may write, ships (and takes rpo snapshots).
        let token = {
            let (d2, v2) = (d.clone(), vol.clone());
            blocking(move || ownership_token(&d2, &v2)).await
        };
        let token = match token {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(volume = %vol, "replication: {e}");
                continue;
            }
        };
        // rpo: a snapshot through the live filesystem when due and the volume changed.
        if view.settings.rpo_secs > 0
            && view.changed
            && last_auto.elapsed() >= Duration::from_secs(view.settings.rpo_secs)
        {
            last_auto = Instant::now();
            let (d2, v2) = (d.clone(), vol.clone());
            match blocking(move || auto_snapshot(&d2, &v2)).await {
                Ok(s) => {
                    view.snapshots.push(s);
                    view.changed = false;
                }
                Err(e) => tracing::warn!(volume = %vol, "replication: rpo snapshot: {e}"),
            }
        }
        let placed = d.mounts.cluster().map(|c| c.replicas(&vol));
        let (targets, missing) = placement(
            d.peers.host_name(),
            &view.peers,
            placed,
            view.settings.replicas as usize,
        );
        for h in &missing {
            set_live(&d, &vol, h, |l| {
                l.state = "error";
                l.last_error = Some(format!(
                    "no peer record named {h}: add it under its host name (volfs peer add {h} ADDR)"
                ));
            });
        }
        for p in &targets {
            if let Some((at, _)) = backoff.get(&p.name) {
                if Instant::now() < *at {
                    continue;
                }
            }
            let pending: Vec<&SnapshotRecord> = view
                .snapshots
                .iter()
                .filter(|s| {
                    !view
                        .settings
                        .progress
                        .get(&p.name)
                        .is_some_and(|pr| pr.shipped.contains_key(&s.name))
                })
                .collect();
            if pending.is_empty() {
                continue;
            }
            match ship(&d, &vol, p, &view.snapshots, token).await {
                Ok(_) => {
                    backoff.remove(&p.name);
                    set_live(&d, &vol, &p.name, |l| {
                        l.state = "idle";
                        l.last_error = None;
                    });
                }
                Err(e) => {
                    let wait = backoff
                        .get(&p.name)
                        .map(|(_, w)| (*w * 2).min(MAX_BACKOFF))
                        .unwrap_or(Duration::from_millis(500));
                    backoff.insert(p.name.clone(), (Instant::now() + wait, wait));
                    tracing::warn!(volume = %vol, replica = %p.name, retry_in = ?wait, "replication failed: {e}");
                    set_live(&d, &vol, &p.name, |l| {
                        l.state = "error";
                        l.last_error = Some(e.clone());
                    });
                }
            }
        }
        // Reload progress, prune rpo snapshots all replicas hold, refresh lag.
        let (d2, v2) = (d.clone(), vol.clone());
        let names: Vec<String> = targets.iter().map(|p| p.name.clone()).collect();
        match blocking(move || after_tick(&d2, &v2, &names)).await {
            Ok(lags) => {
                for (peer, lag) in lags {
                    set_live(&d, &vol, &peer, |l| {
                        l.lag_secs = lag;
                        if l.state.is_empty() {
                            l.state = "idle";
                        }
                    });
                }
            }
            Err(e) => tracing::warn!(volume = %vol, "replication: {e}"),
        }
    }
    tracing::info!(volume = %vol, "replication worker stopped");
}

fn set_live(d: &Daemon, vol: &str, peer: &str, f: impl FnOnce(&mut Live)) {
    let mut t = d.peers.replication.lock();
    f(t.entry((vol.to_string(), peer.to_string())).or_default());
}

fn load_view(d: &Daemon, vol: &str) -> volfs::Result<Option<View>> {
    let store = d.mounts.registry().store();
    let Some(settings) = replica::settings(&*store.engine, vol)? else {
        return Ok(None);
    };
    let Some(rec) = d.mounts.registry().get(&VolumeName::new(vol)?)? else {
        return Ok(None);
    };
    let mut snapshots = layer::snapshots(&*store.engine, rec.id)?;
    snapshots.sort_by_key(|s| s.tree.0);
    Ok(Some(View {
        settings,
        peers: d.peers.records()?,
        snapshots,
        changed: replica::tree_has_rows(&*store.engine, rec.top)?,
        created: rec.created,
    }))
}

fn auto_snapshot(d: &Daemon, vol: &str) -> volfs::Result<SnapshotRecord> {
    let name = VolumeName::new(vol)?;
    let now = volfs::meta::Ts::now().secs;
    let mut snap = format!("{}{now}", replica::AUTO_PREFIX);
    let mut n = 1;
    while layer::get_snapshot(
        &*d.mounts.registry().store().engine,
        d.mounts.registry().require(&name)?.id,
        &snap,
    )?
    .is_some()
    {
        n += 1;
        snap = format!("{}{now}.{n}", replica::AUTO_PREFIX);
    }
    d.mounts.snapshot(&name, &snap)
}

/// After shipping: drops progress entries of snapshots that are gone, prunes `rpo`
/// snapshots every replica holds except the newest such, and returns each replica's lag.
fn after_tick(d: &Daemon, vol: &str, replicas: &[String]) -> volfs::Result<Vec<(String, u64)>> {
    let Some(View {
        settings,
        snapshots,
        changed,
        created,
        ..
    }) = load_view(d, vol)?
    else {
        return Ok(Vec::new());
    };
    let now = volfs::meta::Ts::now().secs;
    let held_by_all = |s: &SnapshotRecord| {
        !replicas.is_empty()
            && replicas.iter().all(|p| {
                settings
                    .progress
                    .get(p)
                    .is_some_and(|pr| pr.shipped.contains_key(&s.name))
            })
    };
    if settings.rpo_secs > 0 {
        let newest_all = snapshots
            .iter()
            .rev()
            .find(|s| held_by_all(s))
            .map(|s| s.tree);
        let name = VolumeName::new(vol)?;
        for s in &snapshots {
            if s.name.starts_with(replica::AUTO_PREFIX)
                && held_by_all(s)
                && Some(s.tree) != newest_all
            {
                d.mounts.registry().snapshot_remove(&name, &s.name)?;
            }
        }
    }
    let mut lags = Vec::new();
    for p in replicas {
        let pr = settings.progress.get(p);
        let unshipped = changed
            || snapshots
                .iter()
                .any(|s| !pr.is_some_and(|pr| pr.shipped.contains_key(&s.name)));
        let lag = if !unshipped {
            0
        } else {
            match pr.and_then(|pr| pr.last.as_ref()) {
                Some((_, t)) => (now - t).max(0) as u64,
                None => {
                    let oldest = snapshots.first().map(|s| s.created).unwrap_or(created);
                    (now - oldest.min(created.max(oldest))).max(0) as u64
                }
            }
        };
        lags.push((p.clone(), lag));
    }
    Ok(lags)
}

fn wire(e: crate::peer::wire::WireError) -> String {
    e.to_string()
}

/// Ships every snapshot `peer` lacks, oldest first, with fencing token `token`.
pub async fn ship(
    d: &Arc<Daemon>,
    vol: &str,
    peer: &PeerRecord,
    snapshots: &[SnapshotRecord],
    token: u64,
) -> Result<u64, String> {
    let mut client = d.peers.connect(&peer.addr).await.map_err(wire)?;
    if client.version() < crate::peer::wire::REPLICATION_VERSION {
        return Err(format!(
            "peer {} speaks protocol v{} and cannot receive replicas (needs v{})",
            peer.name,
            client.version(),
            crate::peer::wire::REPLICATION_VERSION
        ));
    }
    let keep: Vec<String> = snapshots.iter().map(|s| s.name.clone()).collect();
    for s in snapshots {
        let (d2, v2) = (d.clone(), vol.to_string());
        let settings = blocking(move || {
            Ok(replica::settings(&*d2.mounts.registry().store().engine, &v2)?.unwrap_or_default())
        })
        .await
        .map_err(|e| e.to_string())?;
        if settings
            .progress
            .get(&peer.name)
            .is_some_and(|p| p.shipped.contains_key(&s.name))
        {
            continue;
        }
        let (sent0, _) = client.bytes();
        let r = ship_one(d, vol, peer, s, &keep, token, &mut client).await;
        let (sent1, _) = client.bytes();
        d.metrics
            .replication
            .sent
            .inc_by(sent1.saturating_sub(sent0));
        let top = r?;
        d.metrics.replication.shipped.inc();
        let (d2, v2, pname, sname, created) = (
            d.clone(),
            vol.to_string(),
            peer.name.clone(),
            s.name.clone(),
            s.created,
        );
        blocking(move || {
            update_settings(d2.mounts.registry().store(), &v2, |st| {
                let pr = st.progress.entry(pname).or_default();
                pr.shipped.insert(sname.clone(), top);
                if pr.last.as_ref().is_none_or(|(_, t)| *t <= created) {
                    pr.last = Some((sname, created));
                }
            })
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    // Forget progress of snapshots that no longer exist here.
    let (d2, v2, pname) = (d.clone(), vol.to_string(), peer.name.clone());
    blocking(move || {
        update_settings(d2.mounts.registry().store(), &v2, |st| {
            if let Some(pr) = st.progress.get_mut(&pname) {
                pr.shipped.retain(|n, _| keep.contains(n));
            }
        })
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(client.bytes().0)
}

/// Ships one snapshot; returns its top LayerId.
async fn ship_one(
    d: &Arc<Daemon>,
    vol: &str,
    peer: &PeerRecord,
    s: &SnapshotRecord,
    keep: &[String],
    token: u64,
    client: &mut PeerClient,
) -> Result<LayerId, String> {
    let store = d.mounts.registry().store().clone();
    // Seal the trees (the background sealer may not have yet) and describe them.
    let trees = s.trees();
    let metas: Vec<TreeMeta> = {
        let (store, trees) = (store.clone(), trees.clone());
        blocking(move || {
            layer::seal(&store, trees[0])?;
            let mut out: Vec<TreeMeta> = Vec::with_capacity(trees.len());
            let mut layers = Vec::with_capacity(trees.len());
            for t in &trees {
                let rec = layer::get_tree(&*store.engine, *t)?
                    .ok_or_else(|| Error::Db(format!("tree {} has no record", t.0)))?;
                let id = match rec.layer {
                    Some(id) => id,
                    None => layer::seal(&store, *t)?,
                };
                layers.push(id);
                out.push(TreeMeta {
                    layer: id,
                    parent: None,
                    kind: rec.kind,
                    created: rec.created,
                    ino_hw: rec.ino_hw,
                });
            }
            for (i, m) in out.iter_mut().enumerate() {
                m.parent = layers.get(i + 1).copied();
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let layers: Vec<LayerId> = metas.iter().map(|m| m.layer).collect();
    let has = client.has_layers(&layers).await.map_err(wire)?;
    let missing_trees: Vec<(usize, LayerId)> = layers
        .iter()
        .enumerate()
        .filter(|(i, _)| !has.get(*i).copied().unwrap_or(false))
        .map(|(i, l)| (i, *l))
        .collect();
    // Rows of the missing trees and the chunks they reference.
    let (rows, chunks) = {
        let store = store.clone();
        let which: Vec<volfs::ids::TreeId> = missing_trees.iter().map(|(i, _)| trees[*i]).collect();
        blocking(move || {
            let mut rows = Vec::new();
            let mut chunks = std::collections::BTreeSet::new();
            for t in which {
                let r = replica::tree_rows(&*store.engine, t)?;
                chunks.extend(replica::chunks_of(&r)?);
                rows.push(r);
            }
            Ok((rows, chunks.into_iter().collect::<Vec<ChunkId>>()))
        })
        .await
        .map_err(|e| e.to_string())?
    };
    // ship=lazy: trees and commit only; the replica fetches chunks on read or pull.
    let settings = {
        let (store, v) = (store.clone(), vol.to_string());
        blocking(move || replica::origin_settings(&*store.engine, &v))
            .await
            .map_err(|e| e.to_string())?
    };
    let lazy = settings.lazy;
    let chunks = if lazy { Vec::new() } else { chunks };
    let have = client.has_chunks(&chunks).await.map_err(wire)?;
    let need: Vec<ChunkId> = chunks
        .iter()
        .zip(have.iter().chain(std::iter::repeat(&false)))
        .filter(|(_, h)| !**h)
        .map(|(c, _)| *c)
        .collect();
    let total: u64 = {
        let (store, need) = (store.clone(), need.clone());
        blocking(move || {
            let mut n = 0u64;
            for c in &need {
                if let Some(loc) = store.chunks.location(c)? {
                    n += loc.raw_len as u64;
                }
            }
            Ok(n)
        })
        .await
        .map_err(|e| e.to_string())?
    };
    set_live(d, vol, &peer.name, |l| {
        l.state = "sending";
        l.sent_bytes = 0;
        l.total_bytes = total;
    });
    for part in need.chunks(crate::peer::client::PUT_WINDOW) {
        let (store, part) = (store.clone(), part.to_vec());
        let data = blocking(move || {
            part.iter()
                .map(|c| store.chunks.get(c).map(|b| (*c, b)))
                .collect::<volfs::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| e.to_string())?;
        let (dd, vv, pp) = (d.clone(), vol.to_string(), peer.name.clone());
        client
            .put_chunks(vol, token, &data, &mut move |n| {
                set_live(&dd, &vv, &pp, |l| l.sent_bytes += n)
            })
            .await
            .map_err(wire)?;
    }
    for ((_, layer), r) in missing_trees.iter().zip(rows.iter()) {
        client.tree_rows(vol, token, layer, r).await.map_err(wire)?;
    }
    let inc = Incoming {
        volume: vol.to_string(),
        origin: d.peers.host_name().to_string(),
        snapshot: s.name.clone(),
        created: s.created,
        used: s.used,
        trees: metas,
        keep: keep.to_vec(),
    };
    let (new, already) = client
        .commit_with(token, lazy, settings, inc)
        .await
        .map_err(wire)?;
    tracing::info!(volume = %vol, replica = %peer.name, snapshot = %s.name, new_trees = new, already, lazy, chunks = need.len(), bytes = total, "snapshot replicated");
    Ok(layers[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> PeerRecord {
        PeerRecord {
            name: name.into(),
            addr: format!("{name}:9568"),
            added: 0,
        }
    }

    #[test]
    fn placement_leaves_this_host_out() {
        let peers = [peer("c"), peer("a"), peer("b")];
        let names = |v: Vec<PeerRecord>| v.into_iter().map(|p| p.name).collect::<Vec<_>>();
        // A single host: the first n peers by name, never itself.
        assert_eq!(names(placement("b", &peers, None, 2).0), ["a", "c"]);
        assert_eq!(names(placement("z", &peers, None, 2).0), ["a", "b"]);
        assert_eq!(names(placement("a", &peers, None, 5).0), ["b", "c"]);
        // Cluster mode: the placed hosts but this one; a host without a record is named.
        let (found, missing) = placement(
            "b",
            &peers,
            Some(vec!["b".into(), "c".into(), "d".into()]),
            2,
        );
        assert_eq!(names(found), ["c"]);
        assert_eq!(missing, ["d"]);
    }
}
