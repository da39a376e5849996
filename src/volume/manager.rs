//! The node's data plane: one engine per volume replica placed on this node,
//! kept in line with the replicated state (created, promoted, demoted,
//! connected to its peers), the replication listener, and the NBD export of
//! every volume this node is primary for. The executor promotes and
//! demotes; the API reads status and starts verify and resolve here.
//!
//! A larger defined size is not a new configuration: the replica grows in
//! place, online, primary included ([`Volume::grow`], whose module doc has
//! the ordering rule).
//!
//! It never decides where a volume is primary: that is the scheduler's
//! placement of the owning group, carried here with its epoch.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;

use super::engine::{ControlPlane, Volume, VolumeConfig};
use super::nbd;
use super::status::{VerifyOutcome, VolumeStatus};
use super::wire::{self, HelloReply, Message};
use super::VolumeError;

/// How long a promotion waits for its replica to be opened.
const OPEN_WAIT: Duration = Duration::from_secs(5);

/// A volume replica this node should hold, derived from the replicated state.
#[derive(Debug, Clone)]
pub struct DesiredVolume {
    pub config: VolumeConfig,
    /// Also export over TCP on 127.0.0.1 (a free port) when primary.
    pub nbd_tcp: bool,
}

struct Held {
    volume: Arc<Volume>,
    export: Option<nbd::Server>,
    /// The configuration last applied (peers' addresses included).
    config: VolumeConfig,
}

impl std::fmt::Debug for VolumeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.routes.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        f.debug_struct("VolumeManager").field("volumes", &names).finish()
    }
}

/// Every volume replica on this node.
#[derive(Default)]
pub struct VolumeManager {
    dir: Mutex<Option<PathBuf>>,
    held: tokio::sync::Mutex<BTreeMap<String, Held>>,
    /// Shared with the listener: where a Hello for a volume goes. Also read
    /// by `status`, which must not wait for a promotion in progress.
    routes: Arc<Mutex<BTreeMap<String, Arc<Volume>>>>,
    /// The NBD URI of every volume exported here.
    uris: Mutex<BTreeMap<String, String>>,
    control: Mutex<Option<Arc<dyn ControlPlane>>>,
    listeners: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    lease: Mutex<Option<super::engine::Lease>>,
    /// Where the exports count their requests (`GET /metrics`).
    counters: Mutex<Option<crate::metrics::Counters>>,
}

fn not_found(name: &str) -> VolumeError {
    VolumeError::NotFound { name: name.to_string() }
}

fn io(name: &str, source: std::io::Error) -> VolumeError {
    VolumeError::Io { name: name.to_string(), source }
}

impl VolumeManager {
    /// Starts the data plane: replicas live under `dir`, the replication
    /// listener binds `listen` (one address per network path).
    pub async fn start(
        &self,
        dir: &Path,
        listen: &[SocketAddr],
        control: Arc<dyn ControlPlane>,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        *self.dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
        *self.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(control);
        let mut handles = Vec::new();
        for addr in listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("replication listener {addr}: {e}")))?;
            let routes = self.routes.clone();
            handles.push(tokio::spawn(async move { accept_loop(listener, routes).await }));
        }
        *self.listeners.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        Ok(())
    }

    /// Opens every desired replica not yet open; closes those no longer
    /// desired (demoting first). A replica whose configuration changed is
    /// reopened.
    pub async fn reconcile(&self, desired: Vec<DesiredVolume>) {
        let Some(dir) = self.dir.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let Some(control) = self.control.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let mut held = self.held.lock().await;
        let wanted: BTreeMap<String, DesiredVolume> = desired.into_iter().map(|d| (d.config.name.clone(), d)).collect();
        let stale: Vec<String> = held
            .iter()
            .filter(|(name, h)| wanted.get(*name).is_none_or(|d| !same_config(&h.config, &d.config, true)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(mut h) = held.remove(&name) {
                if let Some(d) = wanted.get(&name) {
                    if same_config(&h.config, &d.config, false) {
                        // Only the peers' addresses moved.
                        for p in &d.config.peers {
                            h.volume.set_peer_addrs(&p.node, p.addrs.clone());
                        }
                        h.config = d.config.clone();
                        held.insert(name, h);
                        continue;
                    }
                    if h.volume.is_primary() {
                        // Never reopened under its application: changes wait
                        // for the next demotion.
                        held.insert(name, h);
                        continue;
                    }
                }
                self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                self.uris.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                if let Some(export) = h.export {
                    export.shutdown().await;
                }
                if let Err(e) = h.volume.close().await {
                    tracing::warn!(volume = %name, "close: {e}");
                }
            }
        }
        for (name, d) in wanted {
            if let Some(h) = held.get_mut(&name) {
                h.volume.set_forced_epoch(d.config.forced_epoch);
                h.config.forced_epoch = d.config.forced_epoch;
                // Read balancing changes live, even on a serving primary.
                h.volume.set_read_balancing(d.config.read_balancing);
                h.config.read_balancing = d.config.read_balancing;
                // So does the resync policy (from its next step on).
                h.volume.set_resync(d.config.resync);
                h.config.resync = d.config.resync;
                h.config.size = d.config.size;
                if d.config.size > h.volume.exported_size() {
                    // In the background: a primary waits for its peers.
                    let volume = h.volume.clone();
                    tokio::spawn(async move {
                        let _ = volume.grow(d.config.size).await;
                    });
                }
                continue;
            }
            let lease =
                self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| Arc::new(|| true));
            match Volume::open(&dir, d.config.clone(), control.clone(), lease) {
                Ok(volume) => {
                    tracing::info!(volume = %name, disk = %volume.disk(), "replica open");
                    self.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), volume.clone());
                    held.insert(name, Held { volume, export: None, config: d.config });
                }
                Err(e) => tracing::error!(volume = %name, "cannot open replica: {e}"),
            }
        }
    }

    /// Makes this node's replica primary under `epoch` and exports it.
    /// Returns the NBD URI.
    pub async fn promote(&self, name: &str, epoch: u64, nbd_tcp: bool, socket: &Path) -> Result<String, VolumeError> {
        // The placement and the group's definition arrive in the same state
        // change that makes the volume loop open the replica: give it time.
        let deadline = std::time::Instant::now() + OPEN_WAIT;
        while !self.held.lock().await.contains_key(name) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut held = self.held.lock().await;
        let h = held.get_mut(name).ok_or_else(|| not_found(name))?;
        // Serve the defined size from the start if the grow can be done now
        // (a secondary grows alone); if not, the size it has (alerted).
        if h.config.size > h.volume.size() {
            let _ = h.volume.grow(h.config.size).await;
        }
        h.volume
            .promote(epoch)
            .await
            .map_err(|e| VolumeError::Refused { name: name.to_string(), reason: e.to_string() })?;
        if h.export.is_none() {
            let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let metrics = counters.map(|c| {
                let _ = h.volume.local_write_seconds.set(c.write_histogram(name, "local"));
                ExportMetrics::new(&c, name)
            });
            let export: Arc<dyn nbd::Export> = Arc::new(VolumeExport { volume: h.volume.clone(), metrics });
            if let Some(dir) = socket.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io(name, e))?;
            }
            let tcp = nbd_tcp.then(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let server = nbd::Server::start(name, export, socket, tcp).await.map_err(|e| io(name, e))?;
            let mut uri = server.uri();
            if let Some(t) = server.tcp_addr() {
                tracing::info!(volume = %name, "NBD export also on nbd://{t}/{name}");
                uri = format!("{uri} nbd://{t}/{name}");
            }
            self.uris.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), uri);
            h.export = Some(server);
        }
        Ok(self.uris.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned().unwrap_or_default())
    }

    /// Stops the export and demotes this node's replica.
    pub async fn demote(&self, name: &str) -> Result<(), VolumeError> {
        let mut held = self.held.lock().await;
        let Some(h) = held.get_mut(name) else { return Ok(()) };
        self.uris.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Some(export) = h.export.take() {
            export.shutdown().await;
        }
        h.volume.demote().await.map_err(|e| io(name, e))
    }

    /// How a primary learns whether the node holds its lease (none: always).
    pub fn set_lease(&self, lease: super::engine::Lease) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
    }

    /// The node's lease lapsed: every primary here halts, stops serving at
    /// once (its exports fail every request until the executor demotes it).
    pub fn halt_all(&self) {
        for v in self.routes.lock().unwrap_or_else(|p| p.into_inner()).values() {
            v.halt();
        }
    }

    /// Halts `name` if held here (see [`VolumeManager::halt_all`]).
    pub fn halt(&self, name: &str) {
        if let Some(v) = self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            v.halt();
        }
    }

    /// Whether this node serves `name` as primary.
    pub async fn is_primary(&self, name: &str) -> bool {
        self.held.lock().await.get(name).is_some_and(|h| h.volume.is_primary() && h.export.is_some())
    }

    /// The engine of `name`, for tests and benchmarks.
    pub async fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.held.lock().await.get(name).map(|h| h.volume.clone())
    }

    /// Makes the exports count their requests and latencies into `c`.
    pub fn set_counters(&self, c: crate::metrics::Counters) {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    /// The volumes held here.
    pub fn names(&self) -> Vec<String> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// What this node knows about `name` (the whole picture on the primary).
    pub fn status(&self, name: &str) -> Result<VolumeStatus, VolumeError> {
        let volume = self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        let volume = volume.ok_or_else(|| not_found(name))?;
        let uri = self.uris.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        Ok(volume.status(uri))
    }

    /// Starts an online verify on the primary; returns the report so far.
    pub async fn verify(&self, name: &str) -> Result<VerifyOutcome, VolumeError> {
        let volume = self.primary(name).await?;
        volume.verify().await.map_err(|e| {
            if e == "running" {
                VolumeError::VerifyRunning { name: name.to_string() }
            } else {
                VolumeError::Refused { name: name.to_string(), reason: e }
            }
        })
    }

    /// After a split brain: throws away the changes of `discard` (a node
    /// name), which then resyncs from this primary.
    pub async fn resolve(&self, name: &str, discard: &str) -> Result<(), VolumeError> {
        let volume = self.primary(name).await?;
        if discard != volume.config().node && !volume.config().peers.iter().any(|p| p.node == discard) {
            return Err(VolumeError::NoSuchReplica { name: name.to_string(), node: discard.to_string() });
        }
        if discard != volume.config().node && !volume.is_split_brain(discard) {
            return Err(VolumeError::NotSplitBrain { name: name.to_string(), node: discard.to_string() });
        }
        volume.resolve(discard).map_err(|reason| VolumeError::Refused { name: name.to_string(), reason })
    }

    async fn primary(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        let held = self.held.lock().await;
        let h = held.get(name).ok_or_else(|| not_found(name))?;
        if !h.volume.is_primary() {
            return Err(VolumeError::NotPrimary { name: name.to_string() });
        }
        Ok(h.volume.clone())
    }

    /// Closes every replica cleanly (the agent stops).
    pub async fn shutdown(&self) {
        let listeners: Vec<_> = self.listeners.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for h in listeners {
            h.abort();
            // Awaited: the listening socket is closed only once the task is
            // gone, and a start right after must be able to bind it again.
            let _ = h.await;
        }
        let mut held = self.held.lock().await;
        for (name, h) in std::mem::take(&mut *held) {
            if let Some(export) = h.export {
                export.shutdown().await;
            }
            if let Err(e) = h.volume.close().await {
                tracing::warn!(volume = %name, "close: {e}");
            }
        }
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.uris.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Whether two configurations are the same (`addrs`: counting the peers'
/// addresses). The size is not compared: a replica grows without a reopen.
fn same_config(a: &VolumeConfig, b: &VolumeConfig, addrs: bool) -> bool {
    a.volume_id == b.volume_id
        && a.granule == b.granule
        && a.split_brain == b.split_brain
        && a.rate == b.rate
        && a.async_buffer == b.async_buffer
        && a.async_failover == b.async_failover
        && a.replaced == b.replaced
        && a.peers.len() == b.peers.len()
        && a.peers
            .iter()
            .zip(&b.peers)
            .all(|(x, y)| x.node == y.node && x.mode == y.mode && (!addrs || x.addrs == y.addrs))
}

/// Accepts replication connections and hands each to its volume.
async fn accept_loop(listener: TcpListener, routes: Arc<Mutex<BTreeMap<String, Arc<Volume>>>>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        tokio::spawn(async move {
            let (stream, peer) = match super::replication_tls() {
                None => (crate::security::tls::ReplicationStream::Plain(stream), None),
                Some(t) => match t.accept(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        // Not a member's certificate, or not TLS: refused at the handshake.
                        tracing::warn!(%from, "replication: TLS handshake refused: {e}");
                        return;
                    }
                },
            };
            let (rd, wr) = tokio::io::split(stream);
            let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            let hello = match tokio::time::timeout(Duration::from_secs(5), wire::read_frame(&mut rd)).await {
                Ok(Ok((_, Message::Hello(h)))) => h,
                Ok(Ok(_)) => {
                    tracing::warn!(%from, "replication: first frame is not a Hello");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%from, "replication handshake: {e}");
                    return;
                }
                Err(_) => return,
            };
            if let Some(peer) = &peer {
                if *peer != hello.node {
                    tracing::warn!(%from, certificate = %peer, claimed = %hello.node, "replication: a node claims another's name; refused");
                    return;
                }
            }
            let volume = routes.lock().unwrap_or_else(|p| p.into_inner()).get(&hello.volume).cloned();
            let Some(volume) = volume else {
                let reply = HelloReply {
                    accepted: false,
                    reason: Some(format!("no replica of volume {} here", hello.volume)),
                    node: String::new(),
                    volume_id: String::new(),
                    size: 0,
                    granule: 0,
                    disk: tandem_raft::volume::DiskState::Diskless,
                    primary_since_ms: 0,
                    generation: Default::default(),
                    changed_blocks: 0,
                    crashed_extents: Vec::new(),
                    epoch_seen: 0,
                    replaced: 0,
                };
                let _ = wire::write_frame(&mut wr, 0, &Message::HelloReply(reply)).await;
                let _ = wr.flush().await;
                return;
            };
            let name = volume.name().to_string();
            let primary = hello.node.clone();
            if let Err(e) = volume.serve(hello, rd, wr).await {
                tracing::info!(volume = %name, %primary, "replication from the primary ended: {e}");
            }
        });
    }
}

/// The primary's volume as the NBD server sees it.
struct VolumeExport {
    volume: Arc<Volume>,
    metrics: Option<ExportMetrics>,
}

/// One operation's counters: requests and bytes.
struct OpCounters {
    requests: prometheus_client::metrics::counter::Counter,
    bytes: prometheus_client::metrics::counter::Counter,
}

impl OpCounters {
    fn count(&self, bytes: u64) {
        self.requests.inc();
        self.bytes.inc_by(bytes);
    }
}

/// An export's handles into the agent's counters, looked up once.
struct ExportMetrics {
    read: OpCounters,
    write: OpCounters,
    flush: OpCounters,
    trim: OpCounters,
    zero: OpCounters,
    /// A client write from its arrival to its answer (sync peers included).
    replicated: prometheus_client::metrics::histogram::Histogram,
}

impl ExportMetrics {
    fn new(c: &crate::metrics::Counters, volume: &str) -> ExportMetrics {
        let op = |op: &str| {
            let (requests, bytes) = c.nbd_counters(volume, op);
            OpCounters { requests, bytes }
        };
        ExportMetrics {
            read: op("read"),
            write: op("write"),
            flush: op("flush"),
            trim: op("trim"),
            zero: op("zero"),
            replicated: c.write_histogram(volume, "replicated"),
        }
    }
}

#[async_trait::async_trait]
impl nbd::Export for VolumeExport {
    fn size(&self) -> u64 {
        self.volume.exported_size()
    }

    fn block_sizes(&self) -> (u32, u32, u32) {
        (512, 4096, 4 << 20)
    }

    fn read_only(&self) -> bool {
        false
    }

    fn multi_conn(&self) -> bool {
        // A FLUSH syncs the whole file here and on every sync peer.
        true
    }

    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        if let Some(m) = &self.metrics {
            m.read.count(u64::from(len));
        }
        self.volume.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        let Some(m) = &self.metrics else { return self.volume.write(offset, data, fua).await };
        m.write.count(data.len() as u64);
        let started = std::time::Instant::now();
        let r = self.volume.write(offset, data, fua).await;
        m.replicated.observe(started.elapsed().as_secs_f64());
        r
    }

    async fn flush(&self) -> std::io::Result<()> {
        if let Some(m) = &self.metrics {
            m.flush.count(0);
        }
        self.volume.flush().await
    }

    async fn trim(&self, offset: u64, len: u32) -> std::io::Result<()> {
        if let Some(m) = &self.metrics {
            m.trim.count(u64::from(len));
        }
        self.volume.trim(offset, len, false, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        if let Some(m) = &self.metrics {
            m.zero.count(u64::from(len));
        }
        self.volume.trim(offset, len, true, fua).await
    }
}
