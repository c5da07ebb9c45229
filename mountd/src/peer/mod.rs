//! Peers: other volfs daemons that share this host's cluster key. This module owns the
//! cluster key (`peer_key_file`), the peer records in the index (`peer/<name>` in the `meta`
//! column family), probing peers for `volfs peer ls`, and [`PeerSource`], the
//! [`ChunkSource`] through which fsck and the scrub fetch intact copies of corrupt chunks.
//! The wire is in [`wire`], the encrypted channel in [`channel`], the listener in [`server`]
//! and the connecting side in [`client`].
pub mod channel;
pub mod client;
pub mod server;
pub mod wire;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use volfs::api::{AddPeer, PeerInfo};
use volfs::chunk::ChunkSource;
use volfs::db::{Batch, Cf};
use volfs::ids::ChunkId;
use volfs::meta::{self, PeerRecord};
use volfs::store::Store;
use volfs::Error;

use crate::metrics::PeerCounters;
use client::PeerClient;

/// Default of the `peer_key_file` config key.
pub const DEFAULT_KEY_FILE: &str = "/etc/volfs/peer.key";
/// Default of the `peer_listen` config key.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9568";

pub struct Peers {
    /// The cluster key; `None`: peers are off (no listener, nothing to connect with).
    pub key: Option<[u8; 32]>,
    /// This host's name, sent in hellos: `host_name`, else the machine's hostname.
    pub host: String,
    pub store: Arc<Store>,
    pub counters: PeerCounters,
    /// The volume registry, set when the replication worker starts (receiving replicas
    /// needs it; until then v2 replication requests are refused).
    pub registry: std::sync::OnceLock<Arc<volfs::volume::Registry>>,
    /// What each replica of each local volume is doing now (for inspect and metrics).
    pub replication: parking_lot::Mutex<crate::replication::LiveTable>,
    /// Replication metrics.
    pub repl_metrics: std::sync::OnceLock<crate::metrics::ReplicationMetrics>,
    /// Cluster mode: the cluster (set when the replication worker starts). Its host name
    /// replaces the machine's in hellos (peer records must use the same names), and
    /// received tokens are also checked against the owner tokens it saw in etcd.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Serves `Promote` requests (set when the replication worker starts).
    pub promoter: std::sync::OnceLock<Arc<dyn Promoter>>,
}

/// What a `Promote` request from the origin of a replica does on this host (the daemon's
/// `volume move` handover; implemented in `control.rs`). Blocking.
pub trait Promoter: Send + Sync {
    /// `from`: the authenticated peer's hello name; `token`: its token (single host: the
    /// new token to take). Returns the new token and the snapshot the volume now holds.
    fn promote_from_peer(
        &self,
        volume: &str,
        from: &str,
        token: u64,
    ) -> volfs::Result<(u64, String, i64)>;
}

/// Parses a key file's text: 64 hex digits (32 bytes), surrounding whitespace ignored.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let bytes = hex::decode(t).map_err(|_| {
        format!(
            "expected 64 hex digits (32 bytes, as `volfs peer keygen` prints), found {} characters that are not all hex",
            t.len()
        )
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "expected 32 bytes (64 hex digits, as `volfs peer keygen` prints), found {}",
            b.len()
        )
    })
}

/// Reads the cluster key. A missing file at the default path turns peers off (`Ok(None)`);
/// an explicitly configured file that is missing, unreadable or malformed is an error naming
/// the key and where its value came from. An empty path turns peers off too.
pub fn load_key(path: &Path, source: &crate::config::Source) -> anyhow::Result<Option<[u8; 32]>> {
    if path.as_os_str().is_empty() {
        tracing::info!("peers are off: peer_key_file is empty");
        return Ok(None);
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && *source == crate::config::Source::Default =>
        {
            tracing::info!(
                "peers are off: no cluster key at {} (config key peer_key_file; `volfs peer keygen` makes one)",
                path.display()
            );
            return Ok(None);
        }
        Err(e) => anyhow::bail!(
            "cannot read the peer key {} (config key peer_key_file, from {source}): {e}",
            path.display()
        ),
    };
    parse_key(&text).map(Some).map_err(|why| {
        anyhow::anyhow!(
            "invalid peer key {} (config key peer_key_file, from {source}): {why}",
            path.display()
        )
    })
}

/// This host's name (for hellos).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Peers {
    pub fn new(key: Option<[u8; 32]>, store: Arc<Store>, counters: PeerCounters) -> Peers {
        Peers {
            key,
            host: hostname(),
            store,
            counters,
            registry: std::sync::OnceLock::new(),
            replication: parking_lot::Mutex::new(Default::default()),
            repl_metrics: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            promoter: std::sync::OnceLock::new(),
        }
    }

    /// This host's name in hellos: the cluster host name in cluster mode (`host_name`),
    /// else the machine's hostname.
    pub fn host_name(&self) -> &str {
        match self.cluster.get() {
            Some(c) => c.host(),
            None => &self.host,
        }
    }

    /// The peer records, by name (blocking: reads the index).
    pub fn records(&self) -> volfs::Result<Vec<PeerRecord>> {
        meta::peers(&*self.store.engine)
    }

    /// Adds or replaces a peer record (blocking).
    pub fn add(&self, req: &AddPeer) -> volfs::Result<PeerRecord> {
        meta::check_peer_name(&req.name)?;
        meta::check_peer_addr(&req.addr)?;
        let rec = PeerRecord {
            name: req.name.clone(),
            addr: req.addr.clone(),
            added: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        let mut b = Batch::new();
        b.put(
            Cf::Meta,
            meta::peer_key(&rec.name),
            meta::encode(meta::PEER_VERSION, &rec),
        );
        self.store.engine.write(b, true)?;
        tracing::info!(peer = rec.name, addr = rec.addr, "peer added");
        Ok(rec)
    }

    /// Removes a peer record (blocking).
    pub fn remove(&self, name: &str) -> volfs::Result<()> {
        meta::check_peer_name(name)?;
        let key = meta::peer_key(name);
        if self.store.engine.get(Cf::Meta, &key)?.is_none() {
            return Err(Error::NotFound(format!("no peer named {name:?}")));
        }
        let mut b = Batch::new();
        b.delete(Cf::Meta, key);
        self.store.engine.write(b, true)?;
        tracing::info!(peer = name, "peer removed");
        Ok(())
    }

    /// Connects to a peer and says hello.
    pub async fn connect(&self, addr: &str) -> Result<PeerClient, wire::WireError> {
        let Some(key) = self.key else {
            return Err(wire::WireError::Auth(
                "peers are off on this host: no cluster key (config key peer_key_file)".into(),
            ));
        };
        PeerClient::connect(addr, &key, self.host_name(), self.counters.clone()).await
    }

    /// Asks one peer now: connect, handshake, hello, ping.
    pub async fn probe(&self, rec: &PeerRecord) -> PeerInfo {
        let mut info = PeerInfo {
            name: rec.name.clone(),
            addr: rec.addr.clone(),
            connected: false,
            authenticated: false,
            version: None,
            host: None,
            latency_ms: None,
            error: None,
        };
        let r = async {
            let mut c = self.connect(&rec.addr).await?;
            info.connected = true;
            info.authenticated = true;
            info.version = Some(c.version());
            info.host = Some(c.host.clone());
            c.ping().await
        }
        .await;
        match r {
            Ok(rtt) => info.latency_ms = Some(rtt.as_secs_f64() * 1000.0),
            Err(e) => {
                if !matches!(e, wire::WireError::Connect(_)) {
                    info.connected = true;
                }
                if matches!(e, wire::WireError::Auth(_)) {
                    info.authenticated = false;
                }
                info.error = Some(e.to_string());
            }
        }
        info
    }
}

/// Fetches chunks from the configured peers, in name order, for fsck and the scrub. It runs
/// on a blocking thread and drives the async client on the daemon's runtime. One connection
/// per peer is kept for the run; a peer that failed to connect is not asked again in it.
pub struct PeerSource {
    peers: Arc<Peers>,
    rt: tokio::runtime::Handle,
    records: Vec<PeerRecord>,
    conns: parking_lot::Mutex<HashMap<String, Result<PeerClient, String>>>,
}

impl PeerSource {
    /// `None` when peers are off or none is configured. Call on a blocking thread of the
    /// daemon's runtime.
    pub fn new(peers: &Arc<Peers>) -> volfs::Result<Option<PeerSource>> {
        if peers.key.is_none() {
            return Ok(None);
        }
        let records = peers.records()?;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Ok(None);
        };
        if records.is_empty() {
            return Ok(None);
        }
        Ok(Some(PeerSource {
            peers: peers.clone(),
            rt,
            records,
            conns: parking_lot::Mutex::new(HashMap::new()),
        }))
    }
}

impl ChunkSource for PeerSource {
    fn fetch(&self, id: &ChunkId) -> Result<(Vec<u8>, String), String> {
        let mut why = Vec::new();
        let mut conns = self.conns.lock();
        for rec in &self.records {
            let from = format!("peer {} ({})", rec.name, rec.addr);
            let entry = conns.entry(rec.name.clone()).or_insert_with(|| {
                self.rt
                    .block_on(self.peers.connect(&rec.addr))
                    .map_err(|e| e.to_string())
            });
            let client = match entry {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!("peer {}: {e}", rec.name));
                    continue;
                }
            };
            let asked = self.rt.block_on(async {
                if client.has_chunks(&[*id]).await?.first() != Some(&true) {
                    return Ok(None);
                }
                client.get_chunk(id).await
            });
            match asked {
                Ok(Some(data)) => return Ok((data, from)),
                Ok(None) => why.push(format!("peer {}: does not hold it", rec.name)),
                Err(e) => {
                    why.push(format!("peer {}: {e}", rec.name));
                    // The connection's state is unknown after an error: do not reuse it.
                    if !matches!(e, wire::WireError::Rejected(_)) {
                        *entry = Err(e.to_string());
                    }
                }
            }
        }
        if why.is_empty() {
            why.push("no peers".into());
        }
        Err(why.join("; "))
    }
}

/// Default of the `peer_fetch_timeout_ms` config key.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 10_000;

/// First backoff of a peer whose fetch failed; it doubles per consecutive failure.
pub const FETCH_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest backoff of a failing peer.
pub const MAX_FETCH_BACKOFF: std::time::Duration = std::time::Duration::from_secs(60);

/// Recent fetch failures per peer (by record name), so that a peer that just failed (an
/// error, no answer in time, wrong bytes) is not asked first again for every chunk: until
/// its backoff ([`FETCH_BACKOFF`], doubling per consecutive failure, at most
/// [`MAX_FETCH_BACKOFF`]) has passed it is asked after the healthy peers, never skipped (it
/// may be the only one holding a chunk). A success clears its record. An answer "I do not
/// hold it" is not a failure.
#[derive(Debug, Default)]
pub struct PeerHealth {
    /// Consecutive failures and until when the peer is asked last.
    failures: HashMap<String, (u32, std::time::Instant)>,
}

impl PeerHealth {
    pub fn failed(&mut self, peer: &str, now: std::time::Instant) {
        let e = self.failures.entry(peer.to_string()).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        let wait = FETCH_BACKOFF
            .saturating_mul(1u32 << (e.0 - 1).min(16))
            .min(MAX_FETCH_BACKOFF);
        e.1 = now + wait;
    }

    pub fn succeeded(&mut self, peer: &str) {
        self.failures.remove(peer);
    }

    /// Is `peer` in its backoff at `now`?
    pub fn backing_off(&self, peer: &str, now: std::time::Instant) -> bool {
        self.failures
            .get(peer)
            .is_some_and(|(_, until)| now < *until)
    }

    /// The order to ask `records` in for one chunk: peers not backing off first (the
    /// preferred one, the replica's origin, ahead of the others), then those backing off,
    /// the one whose backoff ends first ahead; otherwise the given (name) order.
    pub fn order(
        &self,
        mut records: Vec<PeerRecord>,
        preferred: impl Fn(&PeerRecord) -> bool,
        now: std::time::Instant,
    ) -> Vec<PeerRecord> {
        // Stable sort: ties keep the name order.
        records.sort_by_key(|r| {
            let until = self
                .backing_off(&r.name, now)
                .then(|| self.failures.get(&r.name).map(|(_, u)| *u))
                .flatten();
            (until.is_some(), until, !preferred(r))
        });
        records
    }
}

/// The read path's fallback ([`volfs::chunk::ChunkStore::set_fallback`]): fetches a chunk
/// that is not local from the peers, the replica's origin first, then the others by name,
/// except that peers that failed recently are asked last ([`PeerHealth`]).
/// The whole fetch has a deadline (`peer_fetch_timeout_ms`); each peer gets an equal share
/// of it (at least 1 s, at most what is left), so one that hangs cannot keep the others
/// from being asked, and a FUSE thread never waits longer than the deadline. Connections
/// are kept in a small pool per peer and dropped after any error. Runs on any thread: the
/// work is spawned on the daemon's runtime and awaited with a timeout.
pub struct PeerFetch {
    peers: Arc<Peers>,
    rt: tokio::runtime::Handle,
    timeout: std::time::Duration,
    pool: Arc<parking_lot::Mutex<HashMap<String, Vec<PeerClient>>>>,
    /// The hello host name each peer (by record name) gave, to find the origin.
    hosts: Arc<parking_lot::Mutex<HashMap<String, String>>>,
    /// Recent failures: a peer that failed is asked after the healthy ones for a while.
    health: Arc<parking_lot::Mutex<PeerHealth>>,
}

/// At most this many idle connections per peer are kept.
const POOL_PER_PEER: usize = 4;

impl PeerFetch {
    pub fn new(
        peers: Arc<Peers>,
        rt: tokio::runtime::Handle,
        timeout: std::time::Duration,
    ) -> PeerFetch {
        PeerFetch {
            peers,
            rt,
            timeout,
            pool: Default::default(),
            hosts: Default::default(),
            health: Default::default(),
        }
    }
}

impl ChunkSource for PeerFetch {
    fn fetch(&self, id: &ChunkId) -> Result<(Vec<u8>, String), String> {
        self.fetch_preferring(id, None)
    }

    fn fetch_preferring(
        &self,
        id: &ChunkId,
        first: Option<&str>,
    ) -> Result<(Vec<u8>, String), String> {
        if self.peers.key.is_none() {
            return Err("peers are off on this host (no cluster key)".into());
        }
        let records = self.peers.records().map_err(|e| e.to_string())?;
        if records.is_empty() {
            return Err("no peers are configured".into());
        }
        let records = {
            let hosts = self.hosts.lock();
            self.health.lock().order(
                records,
                |r| {
                    first.is_some_and(|origin| {
                        r.name == origin || hosts.get(&r.name).is_some_and(|h| h == origin)
                    })
                },
                std::time::Instant::now(),
            )
        };
        let n = records.len() as u32;
        let timeout = self.timeout;
        let share = (timeout / n).max(std::time::Duration::from_secs(1));
        let deadline = std::time::Instant::now() + timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        let (peers, pool, hosts, health, id) = (
            self.peers.clone(),
            self.pool.clone(),
            self.hosts.clone(),
            self.health.clone(),
            *id,
        );
        self.rt.spawn(async move {
            let mut why = Vec::new();
            for rec in &records {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    why.push(format!("peer {}: not asked (deadline)", rec.name));
                    continue;
                }
                let limit = share.min(left);
                let attempt = async {
                    let pooled = pool.lock().get_mut(&rec.name).and_then(|v| v.pop());
                    let mut c = match pooled {
                        Some(c) => c,
                        None => peers.connect(&rec.addr).await?,
                    };
                    hosts.lock().insert(rec.name.clone(), c.host.clone());
                    let r = c.get_chunk(&id).await;
                    if matches!(r, Ok(_) | Err(wire::WireError::Rejected(_))) {
                        let mut p = pool.lock();
                        let v = p.entry(rec.name.clone()).or_default();
                        if v.len() < POOL_PER_PEER {
                            v.push(c);
                        }
                    }
                    r
                };
                match tokio::time::timeout(limit, attempt).await {
                    Ok(Ok(Some(data))) => {
                        health.lock().succeeded(&rec.name);
                        let _ = tx.send(Ok((data, format!("peer {} ({})", rec.name, rec.addr))));
                        return;
                    }
                    Ok(Ok(None)) => why.push(format!("peer {}: does not hold it", rec.name)),
                    Ok(Err(e)) => {
                        health.lock().failed(&rec.name, std::time::Instant::now());
                        why.push(format!("peer {}: {e}", rec.name))
                    }
                    Err(_) => {
                        health.lock().failed(&rec.name, std::time::Instant::now());
                        why.push(format!("peer {}: no answer within {limit:?}", rec.name))
                    }
                }
            }
            let _ = tx.send(Err(why.join("; ")));
        });
        match rx.recv_timeout(timeout + std::time::Duration::from_millis(500)) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no peer answered within {timeout:?} (peer_fetch_timeout_ms)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn recs(names: &[&str]) -> Vec<PeerRecord> {
        names
            .iter()
            .map(|n| PeerRecord {
                name: n.to_string(),
                addr: format!("{n}:9568"),
                added: 0,
            })
            .collect()
    }

    fn names(v: Vec<PeerRecord>) -> Vec<String> {
        v.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn failed_peers_are_asked_after_healthy_ones_until_their_backoff_ends() {
        let mut h = PeerHealth::default();
        let t0 = Instant::now();
        let all = recs(&["a", "b", "c", "d"]);
        let origin = |r: &PeerRecord| r.name == "c";
        // No failures: the origin first, then name order.
        assert_eq!(
            names(h.order(all.clone(), origin, t0)),
            ["c", "a", "b", "d"]
        );
        // The origin and a fail: both go last, the one whose backoff ends first ahead.
        h.failed("c", t0);
        h.failed("a", t0 + Duration::from_millis(10));
        assert!(h.backing_off("c", t0));
        assert_eq!(
            names(h.order(all.clone(), origin, t0)),
            ["b", "d", "c", "a"]
        );
        // A second failure of c doubles its backoff: a is back first.
        h.failed("c", t0 + Duration::from_millis(20));
        let t1 = t0 + Duration::from_millis(1500);
        assert!(!h.backing_off("a", t1) && h.backing_off("c", t1));
        assert_eq!(
            names(h.order(all.clone(), origin, t1)),
            ["a", "b", "d", "c"]
        );
        // Backoff over: the origin is first again; a success clears the record at once.
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(
            names(h.order(all.clone(), origin, t2)),
            ["c", "a", "b", "d"]
        );
        h.failed("b", t2);
        h.succeeded("b");
        assert_eq!(
            names(h.order(all.clone(), origin, t2)),
            ["c", "a", "b", "d"]
        );
        // Only failing peers: all still asked (never skipped).
        h.failed("d", t2);
        assert_eq!(names(h.order(recs(&["d"]), origin, t2)), ["d"]);
        // The backoff is bounded.
        for _ in 0..40 {
            h.failed("d", t2);
        }
        assert!(!h.backing_off("d", t2 + MAX_FETCH_BACKOFF));
    }
}
