//! One replica of one volume, as a running thing. This file owns the
//! [`Volume`] itself (its configuration, role, lease and replica) and the
//! role changes: open, promote, demote, halt, close. The rest is split by role:
//! - `primary`: the primary's write path (write, trim, flush, the disk
//!   detach, recording a peer that missed a write);
//! - `reads`: the primary's read path (read balancing between the local
//!   disk and in-sync peers, bad-block repair from a peer);
//! - `link`: the primary's link to each peer (dial, handshake, live stream,
//!   the async-peer recording, split-brain parking and resolve);
//! - `resync`: sending a peer what its bitmap says it lacks;
//! - `resync_control`: the adaptive resync's controller (pure arithmetic);
//! - `secondary`: following a primary;
//! - `verify`: the online verify;
//! - `status`: what the replica reports.
//!
//! Safety rules kept here:
//! - A write is acknowledged only when every sync peer applied it, or that
//!   peer is recorded `Outdated` in the control plane (under the primary's
//!   epoch) so it can never be promoted without the write.
//! - Everything a peer may lack is in its bitmap: writes made while it is
//!   not streaming, and every in-flight frame of a link that broke.
//! - The local write and the enqueueing to every peer happen under one lock,
//!   so each peer applies writes (and resync blocks) in the primary's order.
//! - A secondary follows only a primary whose epoch is at least the highest
//!   it has seen (the handshake check, [`super::handshake`]).
//! - A primary serves nothing while the node's lease has lapsed, and stops
//!   at once when halted.
//!
//! Locks, always taken in this order and never the other way round: the
//! write-order lock (async), a link's state, the replica. (An inversion
//! between the last two hung an agent under tandem-chaos.)
//!
//! Online grow ([`Volume::grow`], called by the manager whenever the defined
//! size is larger than the replica): the rule is that **nothing past a
//! replica's end ever reaches it, and a client sees the new size only once
//! every connected replica has grown**:
//! - every replica grows its own files as soon as its node sees the new size
//!   (a secondary at once; files grown in place, nothing resynced: the new
//!   space reads as zeroes everywhere);
//! - a primary grows its files and, under the write-order lock, sends a
//!   `Grow` frame to every streaming peer, ahead of any frame past the old
//!   end; it raises its export's size (what a new NBD connection sees) only
//!   when each of them acknowledged it (or its link broke: what it misses is
//!   in its bitmap, as for any write);
//! - a peer that was not streaming grows at its next handshake, before it
//!   replies, to the primary's size (see [`super::handshake::grow_first`]);
//!   a secondary larger than its primary is refused until the primary has
//!   grown too (its data past the primary's end could not be accounted for).
//!
//! It never chooses a primary: [`Volume::promote`] and [`Volume::demote`] are
//! called by the manager on the executor's decisions.

mod link;
mod primary;
mod reads;
mod resync;
pub mod resync_control;
mod secondary;
mod status;
mod verify;

use std::collections::BTreeMap;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_raft::volume::{DiskState, ReadBalancing, ReplicationMode, SplitBrainPolicy};
use tokio::sync::watch;

use self::link::Link;
use super::generation::GenId;
use super::status::VerifyOutcome;
use super::store::{Create, Replica, AL_EXTENT};
use super::wire::Message;

/// Largest block a resync or verify frame carries.
const CHUNK: u64 = 1 << 20;
/// Resync bytes in flight per peer (yields to application writes).
const RESYNC_WINDOW: u64 = 8 << 20;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between connection attempts to a peer.
const RECONNECT: Duration = Duration::from_millis(300);
/// Between attempts to record a peer's disk state in the control plane.
const RECORD_RETRY: Duration = Duration::from_millis(200);
/// How often an async peer that may fail over is checked against what the
/// control plane records for it.
const ASYNC_RECORD_TICK: Duration = Duration::from_millis(100);
/// An async peer with a write unacknowledged this long is recorded outdated.
const ASYNC_ACK_LAG: Duration = Duration::from_secs(1);
/// A peer that owes an answer and has sent nothing this long is taken as cut
/// off: its link breaks (DRBD's `timeout`, 6 s by default). Well above a
/// loaded disk's stall, well below TCP's own give-up (minutes).
const PEER_SILENCE: Duration = Duration::from_secs(3);
/// How often a link looks for that silence.
const SILENCE_CHECK: Duration = Duration::from_millis(200);

/// One peer of a volume, as configured.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub node: String,
    pub mode: ReplicationMode,
    /// Its replication endpoints, preferred first.
    pub addrs: Vec<SocketAddr>,
}

/// A volume replica's configuration on this node.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    /// Same on every replica of this volume, different for any other.
    pub volume_id: String,
    /// This node.
    pub node: String,
    /// The defined size. A running replica's is [`Volume::size`] (it grows
    /// online).
    pub size: u64,
    pub granule: u32,
    pub peers: Vec<PeerConfig>,
    pub split_brain: SplitBrainPolicy,
    /// Resync and catch-up bandwidth, bytes per second.
    pub rate: Option<u64>,
    /// Bytes an async peer may have unacknowledged before it goes `Ahead`.
    pub async_buffer: u64,
    /// Async peers may be failover targets: recorded `UpToDate` while they
    /// stream in order (see `record_async_peer`).
    pub async_failover: bool,
    /// Whether this replica was created with the volume (clean start) or
    /// added later (needs a full sync).
    pub initial: GenId,
    /// How many times the control plane says this replica was replaced:
    /// files of an older number are removed and created again, empty.
    pub replaced: u64,
    /// The group's epoch when a replica of this volume was last promoted by
    /// force (0: never); see [`super::handshake`]. It may change while the
    /// volume is open ([`Volume::set_forced_epoch`]).
    pub forced_epoch: u64,
    /// Which replica serves the primary's reads; it may change while the
    /// volume is open ([`Volume::set_read_balancing`]).
    pub read_balancing: ReadBalancing,
    /// How a resync shares the link with the application; it may change
    /// while the volume is open ([`Volume::set_resync`]).
    pub resync: ResyncPolicy,
}

/// How a resync shares a link with the application's writes (the volume
/// definition's `resync`). Its ceiling is [`VolumeConfig::rate`] in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncPolicy {
    /// [`RESYNC_WINDOW`] in flight, one [`CHUNK`] while the application
    /// writes, paced to `rate`.
    Fixed,
    /// The adaptive controller ([`resync_control`]), never below `min_rate`
    /// bytes per second while there is work.
    Adaptive { min_rate: u64 },
}

impl Default for ResyncPolicy {
    fn default() -> Self {
        ResyncPolicy::Adaptive { min_rate: tandem_raft::volume::DEFAULT_RESYNC_MIN_RATE }
    }
}

/// The application's completed writes: how many took how long, as running
/// totals per latency bucket ([`resync_control::Latencies`]); each resync
/// loop keeps its own last reading and takes differences (several peers may
/// resync at once).
struct AppWrites {
    buckets: [AtomicU64; resync_control::LATENCY_BUCKETS],
}

impl Default for AppWrites {
    fn default() -> Self {
        AppWrites { buckets: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl AppWrites {
    /// One write, client request to acknowledgement.
    fn record(&self, took: Duration) {
        self.buckets[resync_control::latency_bucket(took)].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> resync_control::Latencies {
        resync_control::Latencies(std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)))
    }
}

/// Where the data plane records replica disk states: the control plane,
/// under the group's epoch.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// `replaced`: the replica's replacement number as it told this primary
    /// (an `UpToDate` of an older one is refused).
    async fn record_disk(
        &self,
        volume: &str,
        node: &str,
        disk: DiskState,
        epoch: u64,
        replaced: u64,
    ) -> Result<(), String>;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A random, non-zero generation id for a new generation
/// ([`super::generation::Generations::new_generation`]).
///
/// Draws from the process's hash-seed randomness mixed with a counter: not
/// cryptographic, but 64 bits that two replicas never pick alike in practice.
pub fn fresh_generation() -> GenId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    match h.finish() {
        0 => 1,
        g => g,
    }
}

/// Role of this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Secondary,
    Primary { epoch: u64 },
}

/// A running replica.
pub struct Volume {
    cfg: VolumeConfig,
    data: Arc<File>,
    replica: Mutex<Replica>,
    /// Orders local writes and their enqueueing to every peer.
    order: tokio::sync::Mutex<()>,
    role: watch::Sender<Role>,
    links: BTreeMap<String, Arc<Link>>,
    control: Arc<dyn ControlPlane>,
    /// The secondary side's current connection (an id and its stop switch):
    /// cancelled by a newer primary.
    upstream: Mutex<Option<(u64, watch::Sender<bool>)>>,
    verify: Mutex<Option<VerifyOutcome>>,
    last_app_write: Mutex<Instant>,
    /// The application's writes, for the adaptive resync.
    app_writes: AppWrites,
    /// [`VolumeConfig::resync`] as the definition says now.
    resync_policy: Mutex<ResyncPolicy>,
    /// The local disk failed: reads and writes go through the peers only.
    detached: AtomicBool,
    /// [`VolumeConfig::forced_epoch`] as the control plane says now.
    forced_epoch: AtomicU64,
    /// The replica's size (its metadata's): what peers may address here.
    size: AtomicU64,
    /// What the primary's clients may address: its size once every
    /// streaming peer has grown to it (see the module doc). A secondary's
    /// is its size.
    exported: AtomicU64,
    /// One grow at a time; the last one's failure, if it failed.
    grow_lock: tokio::sync::Mutex<()>,
    grow_error: Mutex<Option<String>>,
    /// Whether this node holds its lease: a primary serves nothing without
    /// it (an agent waking from a stall must not answer queued requests).
    lease: Lease,
    /// Seconds each client write took on the local disk (for `GET
    /// /metrics`; set when the agent exports the volume).
    pub(crate) local_write_seconds: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// The read path's policy and counters (see `reads`).
    reads: reads::ReadState,
}

/// Whether the node's lease holds right now.
pub type Lease = Arc<dyn Fn() -> bool + Send + Sync>;

fn io_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Volume {
    /// Opens (creating if needed) this node's replica, as a secondary.
    pub fn open(
        dir: &std::path::Path,
        cfg: VolumeConfig,
        control: Arc<dyn ControlPlane>,
        lease: Lease,
    ) -> io::Result<Arc<Volume>> {
        let peers: Vec<String> = cfg.peers.iter().map(|p| p.node.clone()).collect();
        let create = Create {
            volume_id: cfg.volume_id.clone(),
            size: cfg.size,
            granule: cfg.granule,
            initial: cfg.initial,
            replaced: cfg.replaced,
        };
        let mut replica = Replica::open(dir, &cfg.name, &create, &peers)?;
        replica.meta.primary = false;
        replica.save_meta()?;
        let size = replica.size();
        let data = replica.data();
        let links = cfg.peers.iter().map(|p| (p.node.clone(), Arc::new(Link::new(p)))).collect();
        let (role, _) = watch::channel(Role::Secondary);
        let cfg_read_balancing = cfg.read_balancing;
        let cfg_resync = cfg.resync;
        Ok(Arc::new(Volume {
            forced_epoch: AtomicU64::new(cfg.forced_epoch),
            size: AtomicU64::new(size),
            exported: AtomicU64::new(size),
            grow_lock: tokio::sync::Mutex::new(()),
            grow_error: Mutex::new(None),
            cfg,
            data,
            replica: Mutex::new(replica),
            order: tokio::sync::Mutex::new(()),
            role,
            links,
            control,
            upstream: Mutex::new(None),
            verify: Mutex::new(None),
            last_app_write: Mutex::new(Instant::now()),
            app_writes: AppWrites::default(),
            resync_policy: Mutex::new(cfg_resync),
            detached: AtomicBool::new(false),
            lease,
            local_write_seconds: Default::default(),
            reads: reads::ReadState::new(cfg_read_balancing),
        }))
    }

    /// A forced promotion was recorded at `epoch`: used from the next
    /// connection to a peer on.
    pub fn set_forced_epoch(&self, epoch: u64) {
        self.forced_epoch.store(epoch, Ordering::Relaxed);
    }

    /// The read balancing policy, used from the next read on.
    pub fn set_read_balancing(&self, policy: ReadBalancing) {
        *self.reads.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// The resync policy, used from the next resync step on.
    pub fn set_resync(&self, policy: ResyncPolicy) {
        *self.resync_policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    fn resync_policy(&self) -> ResyncPolicy {
        *self.resync_policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// New endpoints for a peer, used from its next connection on.
    pub fn set_peer_addrs(&self, node: &str, addrs: Vec<SocketAddr>) {
        if let Some(l) = self.links.get(node) {
            *l.addrs.lock().unwrap_or_else(|p| p.into_inner()) = addrs;
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.cfg
    }

    /// The replica's size in bytes (it may grow while open).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// The size a new NBD connection sees: on a primary, what every
    /// streaming peer has grown to.
    pub fn exported_size(&self) -> u64 {
        self.exported.load(Ordering::SeqCst)
    }

    /// Why the last grow failed, if it did.
    pub fn grow_error(&self) -> Option<String> {
        self.grow_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Grows the replica's files to `size` (under the replica lock): the
    /// local part of a grow, on any replica.
    fn grow_files(&self, size: u64) -> io::Result<bool> {
        let mut r = self.replica();
        let grew = r.grow(size)?;
        self.size.store(r.size(), Ordering::SeqCst);
        if grew {
            tracing::info!(volume = %self.cfg.name, size, "replica grown");
        }
        Ok(grew)
    }

    /// Grows the volume online to `size` bytes (nothing if it is that large
    /// already): this replica's files, then, on a primary, every streaming
    /// peer in order with the writes; the export's size is raised once they
    /// all acknowledged (see the module doc). Returns the exported size.
    pub async fn grow(&self, size: u64) -> io::Result<u64> {
        let _one = self.grow_lock.lock().await;
        let res = self.grow_inner(size).await;
        let mut err = self.grow_error.lock().unwrap_or_else(|p| p.into_inner());
        match &res {
            Ok(_) => *err = None,
            Err(e) => {
                let e = format!("cannot grow to {size} bytes: {e}");
                if err.as_deref() != Some(e.as_str()) {
                    tracing::error!(volume = %self.cfg.name, "ALERT {e}");
                }
                *err = Some(e);
            }
        }
        res
    }

    async fn grow_inner(&self, size: u64) -> io::Result<u64> {
        if size <= self.exported_size() {
            return Ok(self.exported_size());
        }
        let (epoch, waits) = {
            // Under the order lock: no write, resync block or verify request
            // can go to a peer between the local grow and its Grow frame.
            let _order = self.order.lock().await;
            self.grow_files(size)?;
            let Some(epoch) = self.epoch() else {
                self.exported.store(self.size(), Ordering::SeqCst);
                return Ok(self.size());
            };
            let mut waits = Vec::new();
            for (node, link) in &self.links {
                let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let (tx, rx) = tokio::sync::oneshot::channel();
                let inflight = link::Inflight { range: None, bytes: 0, resync: false, done: Some(tx) };
                if link.send(&mut st, &Message::Grow { size }, inflight).is_some() {
                    waits.push((node.clone(), rx));
                }
            }
            (epoch, waits)
        };
        for (node, rx) in waits {
            // A peer that refuses or drops the frame loses its link (what it
            // misses goes to its bitmap); it grows at its next handshake.
            if !matches!(rx.await, Ok(Ok(_))) {
                tracing::warn!(volume = %self.cfg.name, peer = %node, size, "peer did not grow: it grows when it reconnects");
            }
        }
        if self.epoch() == Some(epoch) {
            self.exported.fetch_max(size, Ordering::SeqCst);
            tracing::info!(volume = %self.cfg.name, size, "export grown: new connections see the new size");
        }
        Ok(self.exported_size())
    }

    fn replica(&self) -> std::sync::MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn disk(&self) -> DiskState {
        self.replica().meta.disk
    }

    pub fn is_primary(&self) -> bool {
        matches!(*self.role.borrow(), Role::Primary { .. })
    }

    fn epoch(&self) -> Option<u64> {
        match *self.role.borrow() {
            Role::Primary { epoch } => Some(epoch),
            Role::Secondary => None,
        }
    }

    /// Becomes primary under `epoch`: refuses unless the local disk is
    /// `UpToDate` and no newer epoch was seen. Starts a new data generation
    /// and the links to every peer.
    pub async fn promote(self: &Arc<Self>, epoch: u64) -> io::Result<()> {
        if let Some(e) = self.epoch() {
            if e == epoch {
                return Ok(());
            }
        }
        // A newer primary's link must end before we write.
        self.drop_upstream();
        {
            let mut r = self.replica();
            if r.meta.disk != DiskState::UpToDate {
                return Err(io_err(format!("local disk is {}, not UpToDate", r.meta.disk)));
            }
            if epoch < r.meta.epoch_seen {
                return Err(io_err(format!("epoch {epoch} is older than epoch {} already seen", r.meta.epoch_seen)));
            }
            r.meta.epoch_seen = epoch;
            let old = r.meta.current;
            for peer in self.links.keys() {
                let g = r.meta.bitmap_gens.entry(peer.clone()).or_insert(0);
                if *g == 0 {
                    *g = old;
                }
            }
            r.meta.history = [old, r.meta.history[0]];
            r.meta.current = fresh_generation();
            r.meta.primary = true;
            r.meta.primary_since_ms = now_ms();
            // What this replica wrote last (as primary before a crash, or as
            // a secondary of a primary that died mid-stream: writes another
            // secondary may not have got) goes to every peer again, so the
            // replicas cannot silently differ there.
            for e in r.unreconciled_extents() {
                for bm in r.bitmaps.values_mut() {
                    bm.set_range(e * AL_EXTENT, AL_EXTENT);
                }
            }
            r.persist_bitmaps()?;
            r.meta.crashed_extents.clear();
            r.save_meta()?;
        }
        for link in self.links.values() {
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            st.recorded = None;
            st.last_error = None;
        }
        // Every peer connects afresh, growing to this size first.
        self.exported.store(self.size(), Ordering::SeqCst);
        self.role.send_replace(Role::Primary { epoch });
        for link in self.links.values() {
            let (vol, link) = (self.clone(), link.clone());
            tokio::spawn(async move { vol.run_link(link, epoch).await });
        }
        tracing::info!(volume = %self.cfg.name, epoch, "promoted to primary");
        Ok(())
    }

    /// Leaves the primary role: links close, metadata is made clean. Writes
    /// still waiting fail (they were never acknowledged).
    pub async fn demote(&self) -> io::Result<()> {
        let _order = self.order.lock().await;
        if !self.is_primary() && !self.replica().meta.primary {
            return Ok(());
        }
        self.role.send_replace(Role::Secondary);
        for link in self.links.values() {
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            self.break_link(&link.cfg.node, &mut st, "demoted");
            link.wake.notify_waiters();
            link.resolved.notify_waiters();
        }
        let data = self.data.clone();
        tokio::task::spawn_blocking(move || data.sync_data()).await.map_err(io::Error::other)??;
        if let Err(e) = self.replica().demoted() {
            // Still a secondary: the metadata on disk says primary, which
            // only makes a restart resync the logged extents (as after a
            // crash). Failing here would block the group's stop.
            tracing::warn!(volume = %self.cfg.name, "demoted, but its metadata could not be saved: {e}");
        }
        tracing::info!(volume = %self.cfg.name, "demoted to secondary");
        Ok(())
    }

    /// Halts: stops serving at once, without waiting for anything (the
    /// node's lease lapsed): every request fails from now on; `demote`
    /// cleans up later.
    pub fn halt(&self) {
        if self.is_primary() {
            tracing::warn!(volume = %self.cfg.name, "halted: the export stops serving");
            self.role.send_replace(Role::Secondary);
        }
    }

    /// Closes the replica cleanly (the agent stops).
    pub async fn close(&self) -> io::Result<()> {
        self.demote().await?;
        self.drop_upstream();
        self.replica().close_clean()
    }

    /// A range a peer may address: within the replica.
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        within(offset, len, self.size())
    }

    /// A range a client may address: within the export.
    fn check_client_range(&self, offset: u64, len: u64) -> io::Result<()> {
        within(offset, len, self.exported_size())
    }

    async fn sync(&self) -> io::Result<()> {
        let data = self.data.clone();
        tokio::task::spawn_blocking(move || data.sync_data()).await.map_err(io::Error::other)?
    }
}

fn within(offset: u64, len: u64, size: u64) -> io::Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

fn kind_of(m: &Message) -> &'static str {
    m.kind().name()
}

/// Deallocates a range so it reads as zeros.
fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // No hole punching on this filesystem: write zeros.
    let zeros = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        f.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_generations_differ_and_are_non_zero() {
        let ids: std::collections::BTreeSet<GenId> = (0..1000).map(|_| fresh_generation()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }
}
