//! Cluster state in etcd: this host's membership and lease, who owns each volume for
//! writing, replica placement, fencing tokens, and fencing itself.
//!
//! Without `etcd_endpoints` there is no `Cluster` at all (a single host: nothing changes).
//! With it, one lease per host is kept alive every TTL/3 from a dedicated thread with its own
//! tokio runtime (etcd calls never run on FUSE threads or the control API's workers). The
//! lease id and the local roles (owner with its token, or replica) are persisted in the
//! `meta` column family, so a restarted server process resumes the same lease and keeps its
//! ownerships. A fencer checks every 200 ms: once more than TTL/2 has passed since the last
//! keep-alive that etcd answered (measured from when it was sent, on this host's monotonic
//! clock), every volume this host owns refuses changes (`VolumeFs::set_fenced`), so it has
//! stopped writing at least TTL/2 before etcd can expire the lease and another host can take
//! over. Key layout and values: docs/FORMAT.md, "Cluster state in etcd v1"; failure model:
//! docs/ARCHITECTURE.md.
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use volfs::db::{Batch, Cf};
use volfs::ids::VolumeName;
use volfs::store::Store;
use volfs::{Error, Result};

use crate::mounts::Mounts;

/// Every key lives under this prefix; `v1` is the layout's version.
pub const PREFIX: &str = "/volfs/v1/";
/// Version of the JSON values this code writes.
const VALUE_VERSION: u32 = 1;
/// How often the fencer looks at the lease.
const FENCE_TICK: Duration = Duration::from_millis(200);
/// Time limit of one etcd request (a cut-off etcd must not hang anything).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn host_key(host: &str) -> String {
    format!("{PREFIX}hosts/{host}")
}
fn owner_key(vol: &str) -> String {
    format!("{PREFIX}volumes/{vol}/owner")
}
fn replicas_key(vol: &str) -> String {
    format!("{PREFIX}volumes/{vol}/replicas")
}

/// Parses `etcd_endpoints`: empty is a single host; otherwise `http://HOST:PORT` (or
/// `HOST:PORT`) items separated by commas.
pub fn parse_endpoints(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for e in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .unwrap_or(e);
        let ok = rest
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(format!("{e:?}: expected http://HOST:PORT"));
        }
        out.push(if e.contains("://") {
            e.to_string()
        } else {
            format!("http://{e}")
        });
    }
    Ok(out)
}

/// `hosts/<host>`: membership, attached to the host's lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostValue {
    pub v: u32,
    pub host: String,
    /// Where peers reach this host's peer channel (none until replication exists).
    pub peer: Option<String>,
    /// volfs version of the host.
    pub version: String,
}

/// `volumes/<name>/owner`: the owner, attached to its lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerValue {
    pub v: u32,
    pub host: String,
    /// RFC 3339, when this host took ownership.
    pub since: String,
}

/// This host's role for a local volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner { token: i64 },
    Replica,
}

/// Persisted in `meta` under [`volfs::meta::CLUSTER_STATE_KEY`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LocalState {
    v: u32,
    host: String,
    lease: i64,
    roles: BTreeMap<String, Role>,
}

/// What the last look at etcd said about a volume's owner.
#[derive(Debug, Clone)]
struct OwnerSeen {
    host: String,
    token: i64,
    lease: i64,
}

#[derive(Default)]
struct Inner {
    lease: i64,
    roles: BTreeMap<String, Role>,
    owners: BTreeMap<String, OwnerSeen>,
    replicas: BTreeMap<String, Vec<String>>,
    last_error: Option<String>,
}

pub struct Cluster {
    host: String,
    endpoints: Vec<String>,
    ttl: u64,
    store: Arc<Store>,
    handle: tokio::runtime::Handle,
    inner: Mutex<Inner>,
    /// When the last keep-alive that etcd answered was sent.
    last_ok: Mutex<Option<Instant>>,
    /// The roles were checked against etcd under the current lease.
    verified: AtomicBool,
    /// Highest fencing token seen per volume (for `check_token`).
    seen: Mutex<HashMap<String, i64>>,
    client: Mutex<Option<Client>>,
}

/// The machine's hostname (the default `host_name`).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn etcd_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(
        format!("etcd: {what}"),
        std::io::Error::other(e.to_string()),
    )
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(etcd_err(what, e)),
        Err(_) => Err(etcd_err(what, "no answer within 2 s (etcd unreachable?)")),
    }
}

/// Every key under `PREFIX` + `under` (the one prefix read of this module).
async fn get_prefix(
    client: &mut Client,
    what: &str,
    under: &str,
) -> Result<etcd_client::GetResponse> {
    timed(
        what,
        client.get(
            format!("{PREFIX}{under}"),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await
}

impl Cluster {
    /// Starts cluster mode if `etcd_endpoints` is set: the thread with the lease keeper and
    /// the fencer. Waits up to 3 s for the first contact so that volumes taken over at start
    /// are not fenced needlessly; without it the daemon starts anyway, its volumes fenced,
    /// and keeps retrying.
    pub fn start(
        cfg: &crate::config::Config,
        store: Arc<Store>,
        mounts: Arc<Mounts>,
    ) -> anyhow::Result<Option<Arc<Cluster>>> {
        let endpoints = parse_endpoints(&cfg.etcd_endpoints).map_err(anyhow::Error::msg)?;
        if endpoints.is_empty() {
            return Ok(None);
        }
        let host = if cfg.host_name.is_empty() {
            hostname()
        } else {
            cfg.host_name.clone()
        };
        VolumeName::new(&host).map_err(|e| anyhow::anyhow!("host name {host:?}: {e}"))?;
        let local = load_local(&store)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("volfs-cluster")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let c = Arc::new(Cluster {
            host: host.clone(),
            endpoints,
            ttl: cfg.lease_ttl_secs.max(3),
            store,
            handle,
            inner: Mutex::new(Inner {
                lease: if local.host == host { local.lease } else { 0 },
                roles: local.roles,
                ..Default::default()
            }),
            last_ok: Mutex::new(None),
            verified: AtomicBool::new(false),
            seen: Mutex::new(HashMap::new()),
            client: Mutex::new(None),
        });
        tracing::info!(host = %host, endpoints = %c.endpoints.join(","), ttl = c.ttl, "cluster mode: state in etcd");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let keeper = c.clone();
        let fencer = c.clone();
        std::thread::Builder::new()
            .name("volfs-cluster".into())
            .spawn(move || {
                rt.spawn(fencer.fence_loop(mounts));
                rt.block_on(keeper.keeper_loop(ready_tx));
            })?;
        let _ = ready_rx.recv_timeout(Duration::from_secs(3));
        Ok(Some(c))
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Runs `f` on the cluster runtime and waits for it (from any thread that may block).
    fn call<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| etcd_err("request", "no answer within 30 s"))?
    }

    fn client(&self) -> Result<Client> {
        self.client
            .lock()
            .clone()
            .ok_or_else(|| etcd_err("connection", self.why_down()))
    }

    fn why_down(&self) -> String {
        self.inner
            .lock()
            .last_error
            .clone()
            .unwrap_or_else(|| "not connected yet".into())
    }

    /// Has a keep-alive succeeded within TTL/2, with the roles checked under this lease?
    pub fn lease_fresh(&self) -> bool {
        self.verified.load(Ordering::SeqCst)
            && self
                .last_ok
                .lock()
                .is_some_and(|t| t.elapsed() <= Duration::from_millis(self.ttl * 500))
    }

    // --- in-memory answers (no etcd call) -------------------------------------------------

    /// Why a local volume must refuse changes now, or None when this host owns it and its
    /// lease is fresh.
    pub fn fence_reason(&self, vol: &str) -> Option<String> {
        let inner = self.inner.lock();
        match inner.roles.get(vol) {
            Some(Role::Owner { .. }) => {
                if !self.verified.load(Ordering::SeqCst) {
                    Some(format!(
                        "host {} has not confirmed its ownership with etcd yet",
                        self.host
                    ))
                } else if !self.lease_fresh() {
                    Some(format!(
                        "host {} has not renewed its cluster lease for over {} ms; cut off from etcd?",
                        self.host,
                        self.ttl * 500
                    ))
                } else {
                    None
                }
            }
            Some(Role::Replica) => Some(match inner.owners.get(vol) {
                Some(o) => format!("a replica here; host {} owns it", o.host),
                None => "a replica here; promote it to write".into(),
            }),
            None => Some(format!("not owned by host {}", self.host)),
        }
    }

    /// Refuses a read-write mount of a volume this host does not own, naming the owner.
    pub fn check_rw_mount(&self, vol: &str) -> Result<()> {
        let inner = self.inner.lock();
        if matches!(inner.roles.get(vol), Some(Role::Owner { .. })) {
            return Ok(());
        }
        let owner = match inner.owners.get(vol) {
            Some(o) => format!("host {} owns it (token {})", o.host, o.token),
            None => "this host does not own it".into(),
        };
        Err(Error::ReadOnly(format!(
            "volume {vol} ({owner}); mount it read-only, or `volfs volume promote {vol}` once the owner's lease has lapsed"
        )))
    }

    /// The fencing token of a volume's current ownership: this host's if it owns it,
    /// otherwise the owner's as last seen in etcd.
    pub fn token(&self, vol: &str) -> Option<i64> {
        let inner = self.inner.lock();
        match inner.roles.get(vol) {
            Some(Role::Owner { token }) => Some(*token),
            _ => inner.owners.get(vol).map(|o| o.token),
        }
    }

    /// The owner host as known here.
    pub fn owner(&self, vol: &str) -> Option<String> {
        let inner = self.inner.lock();
        match inner.roles.get(vol) {
            Some(Role::Owner { .. }) => Some(self.host.clone()),
            _ => inner.owners.get(vol).map(|o| o.host.clone()),
        }
    }

    pub fn replicas(&self, vol: &str) -> Vec<String> {
        self.inner
            .lock()
            .replicas
            .get(vol)
            .cloned()
            .unwrap_or_default()
    }

    pub fn role(&self, vol: &str) -> Option<Role> {
        self.inner.lock().roles.get(vol).copied()
    }

    /// For peers receiving changes of a volume (replication): refuses a token lower than the
    /// highest this host has seen for the volume (a deposed owner's), and remembers it.
    pub fn check_token(&self, vol: &str, token: i64) -> Result<()> {
        let mut seen = self.seen.lock();
        let high = seen.entry(vol.to_string()).or_insert(0);
        if token < *high {
            return Err(Error::Busy(format!(
                "volume {vol}: fencing token {token} is stale (token {high} has been seen)"
            )));
        }
        *high = token;
        Ok(())
    }

    fn see(&self, vol: &str, token: i64) {
        let mut seen = self.seen.lock();
        let high = seen.entry(vol.to_string()).or_insert(0);
        *high = (*high).max(token);
    }

    /// One line for `volfs status`, and warnings.
    pub fn summary(&self) -> (String, Vec<String>) {
        let fresh = self.lease_fresh();
        let lease = self.inner.lock().lease;
        let line = format!(
            "host {} in etcd {} (lease {:x}, ttl {} s): {}",
            self.host,
            self.endpoints.join(","),
            lease,
            self.ttl,
            if fresh { "connected" } else { "NOT connected" }
        );
        let mut warnings = Vec::new();
        if !fresh {
            warnings.push(format!(
                "cluster: host {} cannot renew its lease in etcd ({}); the volumes it owns are read-only until it can",
                self.host,
                self.why_down()
            ));
        }
        (line, warnings)
    }

    // --- persistence ----------------------------------------------------------------------

    fn persist(&self) {
        let state = {
            let inner = self.inner.lock();
            LocalState {
                v: VALUE_VERSION,
                host: self.host.clone(),
                lease: inner.lease,
                roles: inner.roles.clone(),
            }
        };
        let store = self.store.clone();
        let write = move || -> Result<()> {
            let mut b = Batch::new();
            let v = serde_json::to_vec(&state).map_err(|e| Error::Encoding(e.to_string()))?;
            b.put(Cf::Meta, volfs::meta::CLUSTER_STATE_KEY.to_vec(), v);
            store.engine.write(b, true)
        };
        let r = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(write)
        } else {
            write()
        };
        if let Err(e) = r {
            tracing::error!("cluster: cannot persist the lease and roles: {e}");
        }
    }

    // --- the lease keeper -----------------------------------------------------------------

    async fn keeper_loop(self: Arc<Self>, ready: std::sync::mpsc::Sender<()>) {
        let mut ready = Some(ready);
        let mut last_logged: Option<String> = None;
        loop {
            let r = self.session(&mut ready).await;
            self.client.lock().take();
            if let Err(e) = r {
                let msg = e.to_string();
                if last_logged.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("cluster: {msg}; retrying");
                    last_logged = Some(msg.clone());
                }
                self.inner.lock().last_error = Some(msg);
            }
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One connection to etcd: lease, membership, reconcile, then keep-alives until one fails.
    async fn session(&self, ready: &mut Option<std::sync::mpsc::Sender<()>>) -> Result<()> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
        let mut client = timed(
            "connect",
            Client::connect(self.endpoints.clone(), Some(opts)),
        )
        .await?;
        // The lease: the persisted one if etcd still has it, else a new one.
        let old = self.inner.lock().lease;
        let mut lease = 0;
        if old != 0 {
            let r = timed("lease ttl", client.lease_time_to_live(old, None)).await?;
            if r.ttl() > 0 {
                lease = old;
            } else {
                tracing::warn!(
                    lease = format!("{old:x}"),
                    "cluster: the lease of host {} expired",
                    self.host
                );
            }
        }
        let new_lease = lease == 0;
        if new_lease {
            self.verified.store(false, Ordering::SeqCst);
            let r = timed("lease grant", client.lease_grant(self.ttl as i64, None)).await?;
            lease = r.id();
            self.inner.lock().lease = lease;
            self.persist();
            tracing::info!(
                lease = format!("{lease:x}"),
                "cluster: host {} took a new lease",
                self.host
            );
        } else if old != 0 {
            tracing::info!(
                lease = format!("{lease:x}"),
                "cluster: host {} kept its lease",
                self.host
            );
        }
        let (mut keeper, mut stream) = timed("keep-alive", client.lease_keep_alive(lease)).await?;
        let sent = Instant::now();
        timed("keep-alive", keeper.keep_alive()).await?;
        match timed("keep-alive", stream.message()).await? {
            Some(r) if r.ttl() > 0 => *self.last_ok.lock() = Some(sent),
            _ => {
                self.inner.lock().lease = 0;
                return Err(etcd_err("keep-alive", "the lease expired"));
            }
        }
        *self.client.lock() = Some(client.clone());
        let hv = HostValue {
            v: VALUE_VERSION,
            host: self.host.clone(),
            peer: None,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let body = serde_json::to_vec(&hv).map_err(|e| Error::Encoding(e.to_string()))?;
        timed(
            "put host",
            client.put(
                host_key(&self.host),
                body,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        self.reconcile(&mut client, lease, new_lease).await?;
        self.verified.store(true, Ordering::SeqCst);
        self.inner.lock().last_error = None;
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        let every = Duration::from_millis(self.ttl * 1000 / 3);
        let mut rounds = 0u64;
        loop {
            tokio::time::sleep(every).await;
            let sent = Instant::now();
            let ok = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(every.min(CALL_TIMEOUT), ok).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => *self.last_ok.lock() = Some(sent),
                Ok(Ok(Some(_))) => {
                    self.inner.lock().lease = 0;
                    return Err(etcd_err("keep-alive", "the lease expired"));
                }
                Ok(Ok(None)) => return Err(etcd_err("keep-alive", "the stream ended")),
                Ok(Err(e)) => return Err(etcd_err("keep-alive", e)),
                Err(_) => return Err(etcd_err("keep-alive", "no answer (etcd unreachable?)")),
            }
            rounds += 1;
            if rounds == 3 {
                rounds = 0;
                self.refresh(&mut client).await?;
            }
        }
    }

    /// Reads every owner and replicas key into the cache.
    async fn refresh(&self, client: &mut Client) -> Result<()> {
        let r = get_prefix(client, "get volumes", "volumes/").await?;
        let mut owners = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for kv in r.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let Some(rest) = key.strip_prefix(&format!("{PREFIX}volumes/")) else {
                continue;
            };
            if let Some(vol) = rest.strip_suffix("/owner") {
                if let Ok(v) = serde_json::from_slice::<OwnerValue>(kv.value()) {
                    self.see(vol, kv.create_revision());
                    owners.insert(
                        vol.to_string(),
                        OwnerSeen {
                            host: v.host,
                            token: kv.create_revision(),
                            lease: kv.lease(),
                        },
                    );
                }
            } else if let Some(vol) = rest.strip_suffix("/replicas") {
                if let Ok(v) = serde_json::from_slice::<Vec<String>>(kv.value()) {
                    replicas.insert(vol.to_string(), v);
                }
            }
        }
        let mut inner = self.inner.lock();
        inner.owners = owners;
        inner.replicas = replicas;
        Ok(())
    }

    /// Checks the local roles against etcd. Under the same lease: an owner key that no
    /// longer names this host with the same token makes the volume a replica. Under a new
    /// lease: each volume this host owned is claimed again only if its owner key is absent.
    /// Local volumes with no role yet (a store from before cluster mode) are claimed if free.
    async fn reconcile(&self, client: &mut Client, lease: i64, new_lease: bool) -> Result<()> {
        self.refresh(client).await?;
        let store = self.store.clone();
        let local: Vec<String> = tokio::task::spawn_blocking(move || {
            volfs::volume::Registry::new(store)
                .list()
                .map(|l| l.into_iter().map(|r| r.name).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| Error::Db(format!("worker failed: {e}")))??;
        let (roles, owners) = {
            let i = self.inner.lock();
            (i.roles.clone(), i.owners.clone())
        };
        let mut new_roles = BTreeMap::new();
        for vol in &local {
            let role = roles.get(vol).copied();
            let owner = owners.get(vol);
            let r = match (role, owner) {
                (Some(Role::Replica), _) => Role::Replica,
                (_, Some(o)) if o.host == self.host && o.lease == lease => {
                    Role::Owner { token: o.token }
                }
                (_, Some(o)) => {
                    if role.is_some() {
                        tracing::warn!(volume = %vol, "cluster: host {} owns the volume now (token {}); it stays read-only here (a replica)", o.host, o.token);
                    }
                    Role::Replica
                }
                (None, None) | (Some(Role::Owner { .. }), None) if new_lease || role.is_none() => {
                    match self.claim_with(client, vol, lease).await? {
                        Ok(token) => {
                            tracing::info!(volume = %vol, token, "cluster: host {} claimed the volume", self.host);
                            Role::Owner { token }
                        }
                        Err(o) => {
                            tracing::warn!(volume = %vol, "cluster: host {} owns the volume now (token {}); it stays read-only here (a replica)", o.host, o.token);
                            Role::Replica
                        }
                    }
                }
                (_, None) => {
                    tracing::warn!(volume = %vol, "cluster: the ownership of host {} vanished from etcd; the volume stays read-only here", self.host);
                    Role::Replica
                }
            };
            new_roles.insert(vol.clone(), r);
        }
        self.inner.lock().roles = new_roles;
        self.persist();
        Ok(())
    }

    /// Creates the owner key if absent (a txn), attached to `lease`. Ok(token), or the owner.
    async fn claim_with(
        &self,
        client: &mut Client,
        vol: &str,
        lease: i64,
    ) -> Result<std::result::Result<i64, OwnerSeen>> {
        let key = owner_key(vol);
        let val = OwnerValue {
            v: VALUE_VERSION,
            host: self.host.clone(),
            since: volfs::api::rfc3339(volfs::meta::Ts::now().secs),
        };
        let body = serde_json::to_vec(&val).map_err(|e| Error::Encoding(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key.clone(), body, Some(PutOptions::new().with_lease(lease))),
                TxnOp::get(key.clone(), None),
            ])
            .or_else([TxnOp::get(key.clone(), None)]);
        let r = timed("claim", client.txn(txn)).await?;
        let succeeded = r.succeeded();
        for op in r.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                if let Some(kv) = g.kvs().first() {
                    let token = kv.create_revision();
                    self.see(vol, token);
                    let host = serde_json::from_slice::<OwnerValue>(kv.value())
                        .map(|v| v.host)
                        .unwrap_or_else(|_| "?".into());
                    let seen = OwnerSeen {
                        host,
                        token,
                        lease: kv.lease(),
                    };
                    self.inner
                        .lock()
                        .owners
                        .insert(vol.to_string(), seen.clone());
                    return Ok(if succeeded { Ok(token) } else { Err(seen) });
                }
            }
        }
        Err(etcd_err("claim", "the transaction returned no owner key"))
    }

    // --- operations the control API calls (blocking) ----------------------------------------

    fn live_lease(&self) -> Result<i64> {
        if !self.lease_fresh() {
            return Err(etcd_err(
                "lease",
                format!(
                    "host {} holds no fresh lease ({})",
                    self.host,
                    self.why_down()
                ),
            ));
        }
        Ok(self.inner.lock().lease)
    }

    /// Before creating a volume: claims its name for this host; refused if another host owns
    /// it. `replicas`: how many other live hosts to place replicas on.
    pub fn claim_new(self: &Arc<Self>, vol: &str, replicas: usize) -> Result<i64> {
        let lease = self.live_lease()?;
        let mut client = self.client()?;
        let me = self.clone();
        let vol = vol.to_string();
        self.call(async move {
            let placed = if replicas > 0 {
                me.place(&mut client, replicas).await?
            } else {
                Vec::new()
            };
            match me.claim_with(&mut client, &vol, lease).await? {
                Ok(token) => {
                    me.inner.lock().roles.insert(vol.clone(), Role::Owner { token });
                    me.persist();
                    if !placed.is_empty() {
                        me.write_replicas(&mut client, &vol, token, &placed).await?;
                    }
                    tracing::info!(volume = %vol, token, "cluster: host {} owns the new volume", me.host);
                    Ok(token)
                }
                Err(o) => Err(Error::Exists(format!(
                    "volume {vol} (owned by host {}, token {})",
                    o.host, o.token
                ))),
            }
        })
    }

    /// The other live hosts, fewest replicas first, then by name.
    async fn live_others(&self, client: &mut Client) -> Result<Vec<String>> {
        let r = get_prefix(client, "get hosts", "hosts/").await?;
        let counts: HashMap<String, usize> = {
            let inner = self.inner.lock();
            let mut c = HashMap::new();
            for l in inner.replicas.values() {
                for h in l {
                    *c.entry(h.clone()).or_insert(0) += 1;
                }
            }
            c
        };
        let mut hosts: Vec<String> = r
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<HostValue>(kv.value()).ok())
            .map(|h| h.host)
            .filter(|h| *h != self.host)
            .collect();
        hosts.sort_by_key(|h| (counts.get(h).copied().unwrap_or(0), h.clone()));
        Ok(hosts)
    }

    /// Chooses `n` other live hosts (fewest replicas first, then by name).
    async fn place(&self, client: &mut Client, n: usize) -> Result<Vec<String>> {
        let mut hosts = self.live_others(client).await?;
        if hosts.len() < n {
            return Err(Error::Invalid(format!(
                "replicas={n} needs {n} other live host(s); live: {}",
                if hosts.is_empty() {
                    "none".to_string()
                } else {
                    hosts.join(", ")
                }
            )));
        }
        hosts.truncate(n);
        Ok(hosts)
    }

    /// After this host took `vol` over (promote, move): its replica hosts are the previous
    /// ones without this host, topped up to `want` (when known) with other live hosts
    /// (fewest replicas first); written guarded by the new `token`. Fewer live hosts than
    /// wanted is not an error: the list is what there is (the log says so).
    async fn replace_replicas(
        &self,
        client: &mut Client,
        vol: &str,
        token: i64,
        want: Option<usize>,
    ) -> Result<Vec<String>> {
        let r = timed("get replicas", client.get(replicas_key(vol), None)).await?;
        let old: Vec<String> = r
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            .unwrap_or_default();
        let mut hosts: Vec<String> = old.iter().filter(|h| **h != self.host).cloned().collect();
        let n = want.unwrap_or(hosts.len());
        if hosts.len() < n {
            let live = self.live_others(client).await?;
            // Keep listed hosts that are live first, then add others.
            hosts.retain(|h| live.contains(h));
            for h in live {
                if hosts.len() >= n {
                    break;
                }
                if !hosts.contains(&h) {
                    hosts.push(h);
                }
            }
            if hosts.len() < n {
                tracing::warn!(volume = %vol, "cluster: replicas={n}, but only {} other live host(s): {hosts:?}", hosts.len());
            }
        }
        hosts.truncate(n);
        if hosts != old {
            self.write_replicas(client, vol, token, &hosts).await?;
            tracing::info!(volume = %vol, token, ?hosts, "cluster: replicas placed for the new owner");
        }
        Ok(hosts)
    }

    /// Writes the replicas key, only while this host's ownership (token) stands.
    async fn write_replicas(
        &self,
        client: &mut Client,
        vol: &str,
        token: i64,
        hosts: &[String],
    ) -> Result<()> {
        let body = serde_json::to_vec(hosts).map_err(|e| Error::Encoding(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                owner_key(vol),
                CompareOp::Equal,
                token,
            )])
            .and_then([TxnOp::put(replicas_key(vol), body, None)]);
        let r = timed("put replicas", client.txn(txn)).await?;
        if !r.succeeded() {
            return Err(Error::Busy(format!(
                "volume {vol}: ownership (token {token}) changed while placing replicas"
            )));
        }
        self.inner
            .lock()
            .replicas
            .insert(vol.to_string(), hosts.to_vec());
        Ok(())
    }

    /// After a restore: claims the volume if its name is free, otherwise keeps it as a
    /// replica of the owner.
    pub fn claim_or_replica(self: &Arc<Self>, vol: &str) -> Result<Role> {
        let lease = self.live_lease()?;
        let mut client = self.client()?;
        let me = self.clone();
        let vol = vol.to_string();
        self.call(async move {
            let role = match me.claim_with(&mut client, &vol, lease).await? {
                Ok(token) => Role::Owner { token },
                Err(o) if o.host == me.host && o.lease == lease => Role::Owner { token: o.token },
                Err(o) => {
                    tracing::info!(volume = %vol, "cluster: host {} owns the volume; it is a replica here (read-only)", o.host);
                    Role::Replica
                }
            };
            me.inner.lock().roles.insert(vol.clone(), role);
            me.persist();
            Ok(role)
        })
    }

    /// Forgets a claim that was made for a volume whose creation then failed, or a removed
    /// volume: deletes the owner (and replicas) key if it is still this host's.
    pub fn release(self: &Arc<Self>, vol: &str) -> Result<()> {
        let role = self.inner.lock().roles.remove(vol);
        self.persist();
        let Some(Role::Owner { token }) = role else {
            return Ok(());
        };
        let mut client = self.client()?;
        let vol = vol.to_string();
        let me = self.clone();
        self.call(async move {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    owner_key(&vol),
                    CompareOp::Equal,
                    token,
                )])
                .and_then([
                    TxnOp::delete(owner_key(&vol), None),
                    TxnOp::delete(replicas_key(&vol), None),
                ]);
            timed("release", client.txn(txn)).await?;
            me.inner.lock().owners.remove(&vol);
            tracing::info!(volume = %vol, token, "cluster: host {} released the volume", me.host);
            Ok(())
        })
    }

    /// `volfs volume promote` (and the receiving side of a move): takes over a local replica
    /// once the owner's lease lapsed (or its key was handed over), then places the volume's
    /// replicas for this host (`want`: the replica count the origin replicated with, when
    /// known; see `replace_replicas`).
    pub fn promote(self: &Arc<Self>, vol: &str, want: Option<usize>) -> Result<i64> {
        if let Some(Role::Owner { token }) = self.role(vol) {
            if self.lease_fresh() {
                return Err(Error::Invalid(format!(
                    "volume {vol} is already owned by this host (token {token})"
                )));
            }
        }
        let lease = self.live_lease()?;
        let mut client = self.client()?;
        let me = self.clone();
        let vol = vol.to_string();
        self.call(async move {
            let r = timed("get owner", client.get(owner_key(&vol), None)).await?;
            if let Some(kv) = r.kvs().first() {
                let host = serde_json::from_slice::<OwnerValue>(kv.value())
                    .map(|v| v.host)
                    .unwrap_or_else(|_| "?".into());
                let ttl = if kv.lease() != 0 {
                    timed("lease ttl", client.lease_time_to_live(kv.lease(), None))
                        .await
                        .map(|t| t.ttl())
                        .unwrap_or(-1)
                } else {
                    -1
                };
                return Err(Error::Busy(format!(
                    "volume {vol} (host {host} still holds it, token {}, its lease has {ttl} s left); promote once it lapses",
                    kv.create_revision()
                )));
            }
            match me.claim_with(&mut client, &vol, lease).await? {
                Ok(token) => {
                    me.inner.lock().roles.insert(vol.clone(), Role::Owner { token });
                    me.persist();
                    tracing::info!(volume = %vol, token, "cluster: host {} promoted its replica: it owns the volume now", me.host);
                    // Ownership is taken: a failed placement is logged, not a failed promote.
                    if let Err(e) = me.replace_replicas(&mut client, &vol, token, want).await {
                        tracing::warn!(volume = %vol, token, "cluster: placing replicas after the promote: {e}");
                    }
                    Ok(token)
                }
                Err(o) => Err(Error::Busy(format!(
                    "volume {vol} (host {} claimed it first, token {})",
                    o.host, o.token
                ))),
            }
        })
    }

    /// The token to ship changes of `vol` with: this host owns it and may write now (lease
    /// fresh, roles checked). None otherwise: a replica, not owned, or fenced.
    pub fn writable_token(&self, vol: &str) -> Option<i64> {
        match self.role(vol) {
            Some(Role::Owner { token }) if self.fence_reason(vol).is_none() => Some(token),
            _ => None,
        }
    }

    /// `volume move`, the giving side: this host stops owning `vol` (role replica, so the
    /// fencer makes it read-only) and deletes its owner and replicas keys in a txn guarded by
    /// its token, so that the receiving host can claim it. Returns the token given up.
    pub fn hand_over(self: &Arc<Self>, vol: &str) -> Result<i64> {
        let Some(token) = self.writable_token(vol) else {
            return Err(Error::ReadOnly(format!(
                "volume {vol}: host {} does not own it with a fresh lease ({})",
                self.host,
                self.fence_reason(vol).unwrap_or_default()
            )));
        };
        self.inner
            .lock()
            .roles
            .insert(vol.to_string(), Role::Replica);
        self.persist();
        let mut client = self.client()?;
        let me = self.clone();
        let v = vol.to_string();
        let r = self.call(async move {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    owner_key(&v),
                    CompareOp::Equal,
                    token,
                )])
                .and_then([
                    TxnOp::delete(owner_key(&v), None),
                    TxnOp::delete(replicas_key(&v), None),
                ]);
            let r = timed("hand over", client.txn(txn)).await?;
            if !r.succeeded() {
                return Err(Error::Busy(format!(
                    "volume {v}: the owner key is no longer this host's token {token}"
                )));
            }
            me.inner.lock().owners.remove(&v);
            tracing::info!(volume = %v, token, "cluster: host {} gave the volume up (move)", me.host);
            Ok(token)
        });
        if r.is_err() {
            // Nothing changed in etcd: keep owning it.
            self.inner
                .lock()
                .roles
                .insert(vol.to_string(), Role::Owner { token });
            self.persist();
        }
        r
    }

    /// `volume move` failed after [`Cluster::hand_over`]: claims the volume again if nobody
    /// took it (create-if-absent); otherwise it stays a replica here.
    pub fn take_back(self: &Arc<Self>, vol: &str) -> Result<Role> {
        self.inner.lock().roles.remove(vol);
        self.claim_or_replica(vol)
    }

    /// `GET /v1/cluster`.
    pub fn status(self: &Arc<Self>, local: Vec<String>) -> volfs::api::ClusterStatus {
        let (lease_id, last_error) = {
            let i = self.inner.lock();
            (i.lease, i.last_error.clone())
        };
        let mut st = volfs::api::ClusterStatus {
            mode: "etcd".into(),
            host: self.host.clone(),
            endpoints: self.endpoints.clone(),
            connected: self.lease_fresh(),
            lease_id,
            lease_ttl_secs: self.ttl,
            last_error,
            ..Default::default()
        };
        let me = self.clone();
        let hosts = self.client().and_then(|mut client| {
            self.call(async move {
                me.refresh(&mut client).await?;
                let r = get_prefix(&mut client, "get hosts", "hosts/").await?;
                let mut out = Vec::new();
                for kv in r.kvs() {
                    let Ok(h) = serde_json::from_slice::<HostValue>(kv.value()) else {
                        continue;
                    };
                    let ttl = timed("lease ttl", client.lease_time_to_live(kv.lease(), None))
                        .await
                        .map(|t| t.ttl())
                        .unwrap_or(-1);
                    out.push(volfs::api::ClusterHost {
                        host: h.host,
                        peer: h.peer,
                        version: h.version,
                        ttl_left: ttl,
                    });
                }
                Ok(out)
            })
        });
        match hosts {
            Ok(h) => st.hosts = h,
            Err(e) => st.last_error = Some(e.to_string()),
        }
        let inner = self.inner.lock();
        let mut names: std::collections::BTreeSet<String> = inner.owners.keys().cloned().collect();
        names.extend(local.iter().cloned());
        for n in names {
            let (owner, token) = match inner.roles.get(&n) {
                Some(Role::Owner { token }) => (Some(self.host.clone()), Some(*token)),
                _ => match inner.owners.get(&n) {
                    Some(o) => (Some(o.host.clone()), Some(o.token)),
                    None => (None, None),
                },
            };
            st.volumes.push(volfs::api::ClusterVolume {
                local: match inner.roles.get(&n) {
                    Some(Role::Owner { .. }) => "owner".into(),
                    Some(Role::Replica) => "replica".into(),
                    None if local.contains(&n) => "none".into(),
                    None => "-".into(),
                },
                replicas: inner.replicas.get(&n).cloned().unwrap_or_default(),
                name: n,
                owner,
                token,
            });
        }
        st
    }

    // --- the fencer -----------------------------------------------------------------------

    /// Every 200 ms: fences or unfences each loaded volume as `fence_reason` says.
    async fn fence_loop(self: Arc<Self>, mounts: Arc<Mounts>) {
        loop {
            tokio::time::sleep(FENCE_TICK).await;
            self.apply_fences(&mounts);
        }
    }

    pub fn apply_fences(&self, mounts: &Mounts) {
        for (name, fs) in mounts.primaries() {
            let want = self.fence_reason(&name);
            let have = fs.fenced();
            if want == have {
                continue;
            }
            match &want {
                Some(why)
                    if self
                        .role(&name)
                        .is_some_and(|r| matches!(r, Role::Owner { .. })) =>
                {
                    tracing::warn!(volume = %name, "cluster: fenced, writes refused: {why}")
                }
                Some(why) => tracing::info!(volume = %name, "cluster: read-only here: {why}"),
                None => {
                    tracing::info!(volume = %name, "cluster: host {} owns the volume with a fresh lease: writes accepted", self.host)
                }
            }
            fs.set_fenced(want);
        }
    }
}

fn load_local(store: &Store) -> anyhow::Result<LocalState> {
    match store.engine.get(Cf::Meta, volfs::meta::CLUSTER_STATE_KEY)? {
        Some(v) => Ok(serde_json::from_slice(&v)
            .map_err(|e| anyhow::anyhow!("the stored cluster state is unreadable: {e}"))?),
        None => Ok(LocalState::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(parse_endpoints("").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_endpoints("10.0.0.1:2379, http://h:1").unwrap(),
            vec!["http://10.0.0.1:2379", "http://h:1"]
        );
        assert!(parse_endpoints("nohost").is_err());
        assert!(parse_endpoints("h:99999").is_err());
    }

    #[test]
    fn keys_are_versioned() {
        assert_eq!(owner_key("v"), "/volfs/v1/volumes/v/owner");
        assert_eq!(replicas_key("v"), "/volfs/v1/volumes/v/replicas");
        assert_eq!(host_key("a"), "/volfs/v1/hosts/a");
    }
}
