//! One replica of one volume, as a running thing: the primary's write path
//! (local write, then every peer in order), the link to each peer (connect,
//! handshake, resync, live stream), and the secondary's side of a link.
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
//!   it has seen.
//!
//! Locks, always taken in this order and never the other way round: the
//! write-order lock (async), a link's state, the replica. (An inversion
//! between the last two hung an agent under tandem-chaos.)
//!
//! It never chooses a primary: [`Volume::promote`] and [`Volume::demote`] are
//! called by the manager on the executor's decisions.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_http_api::types::{ConnectionState, LocalVolumeStatus, ReplicaView, ResyncProgress, VerifyReport};
use tandem_raft::volume::{DiskState, ReplicationMode, SplitBrainPolicy};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::generation::{self, fresh_generation, Decision, GenId, Generations, Side, SideView};
use super::store::{Create, Replica, AL_EXTENT};
use super::wire::{self, Hello, HelloReply, Message};

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
}

/// Where the data plane records replica disk states: the control plane,
/// under the group's epoch.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    async fn record_disk(&self, volume: &str, node: &str, disk: DiskState, epoch: u64) -> Result<(), String>;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a peer's reply to a frame was.
#[derive(Debug)]
enum Reply {
    Ack,
    Digests(Vec<u64>),
    /// Blocks read for a primary whose disk failed.
    Data(bytes::Bytes),
}

struct Inflight {
    /// The range the peer lacks if this frame is lost.
    range: Option<(u64, u64)>,
    bytes: u64,
    resync: bool,
    done: Option<oneshot::Sender<Result<Reply, String>>>,
}

/// The primary's view of one peer.
struct Link {
    cfg: PeerConfig,
    /// Its endpoints now (nodes may change addresses while we run).
    addrs: Mutex<Vec<SocketAddr>>,
    st: Mutex<LinkState>,
    /// Wakes the link's resync loop (new bits, window space).
    wake: Notify,
    /// Wakes a link parked in split brain (an operator resolved it).
    resolved: Notify,
    /// Serializes what is recorded about this peer, so an `UpToDate` can
    /// never land after the `Outdated` that followed it.
    record: tokio::sync::Mutex<()>,
}

struct LinkState {
    conn: ConnectionState,
    /// Frames to the peer; present while the link streams.
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    next_seq: u64,
    inflight: BTreeMap<u64, Inflight>,
    /// When each frame in flight was sent: an async peer that leaves one
    /// unacknowledged too long is no failover target (a cut link keeps its
    /// TCP connection open for a long while).
    sent_at: BTreeMap<u64, Instant>,
    inflight_bytes: u64,
    resync_inflight: u64,
    /// Async peer that fell out of its buffer: writes go to the bitmap.
    ahead: bool,
    /// In sync (not resyncing): new generations are streamed to it.
    in_sync: bool,
    peer_disk: DiskState,
    /// What the control plane holds for this peer (under our epoch).
    recorded: Option<DiskState>,
    resync: Option<ResyncProgress>,
    resync_started: Option<Instant>,
    last_error: Option<String>,
    /// A forced loser after split brain (operator).
    discard_peer: bool,
    bytes_sent: u64,
    /// The last completed resync: bytes sent and how long it took.
    last_resync: Option<(u64, Duration)>,
}

impl Link {
    /// Enqueues a frame; None when the link is not streaming.
    fn send(&self, st: &mut LinkState, msg: &Message, inflight: Inflight) -> Option<u64> {
        let tx = st.tx.as_ref()?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let mut frame = Vec::new();
        if let Err(e) = wire::encode(seq, msg, &mut frame) {
            tracing::error!("cannot encode a frame: {e}");
            return None;
        }
        if tx.send(frame).is_err() {
            return None;
        }
        st.inflight_bytes += inflight.bytes;
        if inflight.resync {
            st.resync_inflight += inflight.bytes;
        }
        st.inflight.insert(seq, inflight);
        st.sent_at.insert(seq, Instant::now());
        Some(seq)
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
    verify: Mutex<Option<VerifyReport>>,
    last_app_write: Mutex<Instant>,
    /// The local disk failed: reads and writes go through the peers only.
    detached: std::sync::atomic::AtomicBool,
    /// Whether this node holds its lease: a primary serves nothing without
    /// it (an agent waking from a stall must not answer queued requests).
    lease: Lease,
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
        let create =
            Create { volume_id: cfg.volume_id.clone(), size: cfg.size, granule: cfg.granule, initial: cfg.initial };
        let mut replica = Replica::open(dir, &cfg.name, &create, &peers)?;
        replica.meta.primary = false;
        replica.save_meta()?;
        let data = replica.data();
        let links = cfg
            .peers
            .iter()
            .map(|p| {
                let link = Link {
                    cfg: p.clone(),
                    addrs: Mutex::new(p.addrs.clone()),
                    st: Mutex::new(LinkState {
                        conn: ConnectionState::Disconnected,
                        tx: None,
                        next_seq: 1,
                        inflight: BTreeMap::new(),
                        sent_at: BTreeMap::new(),
                        inflight_bytes: 0,
                        resync_inflight: 0,
                        ahead: false,
                        in_sync: false,
                        peer_disk: DiskState::Outdated,
                        recorded: None,
                        resync: None,
                        resync_started: None,
                        last_error: None,
                        discard_peer: false,
                        bytes_sent: 0,
                        last_resync: None,
                    }),
                    wake: Notify::new(),
                    resolved: Notify::new(),
                    record: tokio::sync::Mutex::new(()),
                };
                (p.node.clone(), Arc::new(link))
            })
            .collect();
        let (role, _) = watch::channel(Role::Secondary);
        Ok(Arc::new(Volume {
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
            detached: std::sync::atomic::AtomicBool::new(false),
            lease,
        }))
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

    /// Stops serving at once, without waiting for anything (the lease ran
    /// out): every request fails from now on; `demote` cleans up later.
    pub fn fence(&self) {
        if self.is_primary() {
            tracing::warn!(volume = %self.cfg.name, "fenced: the export stops serving");
            self.role.send_replace(Role::Secondary);
        }
    }

    /// Closes the replica cleanly (the agent stops).
    pub async fn close(&self) -> io::Result<()> {
        self.demote().await?;
        self.drop_upstream();
        self.replica().close_clean()
    }

    /// Stops streaming to a peer: what it did not acknowledge goes to its
    /// bitmap, and waiting writes learn the peer failed.
    fn break_link(&self, node: &str, st: &mut LinkState, why: &str) {
        st.tx = None;
        st.in_sync = false;
        st.ahead = false;
        st.resync = None;
        if st.conn != ConnectionState::SplitBrain {
            st.conn = ConnectionState::Disconnected;
        }
        let inflight = std::mem::take(&mut st.inflight);
        st.sent_at.clear();
        st.inflight_bytes = 0;
        st.resync_inflight = 0;
        let mut r = self.replica();
        for (_, f) in inflight {
            if let Some((off, len)) = f.range {
                r.mark(node, off, len);
            }
            if let Some(done) = f.done {
                let _ = done.send(Err(why.to_string()));
            }
        }
    }

    // ---- the primary's write path ----

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.cfg.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn primary_epoch(&self) -> io::Result<u64> {
        let epoch = self.epoch().ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))?;
        if !(self.lease)() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(epoch)
    }

    /// A client read: from the local disk; if that fails (or was detached
    /// before), from an in-sync peer, transparently.
    pub async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let epoch = self.primary_epoch()?;
        self.check_range(offset, u64::from(len))?;
        if !self.detached() {
            let mut buf = vec![0u8; len as usize];
            match self.data.read_exact_at(&mut buf, offset) {
                Ok(()) => return Ok(buf),
                Err(e) => self.detach(&format!("read at {offset}: {e}"), epoch),
            }
        }
        self.read_from_peer(offset, len).await
    }

    fn detached(&self) -> bool {
        self.detached.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The local disk failed: stop using it (the primary goes `Diskless`,
    /// serving through its peers), raise an alert, and tell the control
    /// plane, which then moves the group to an up-to-date replica.
    fn detach(&self, why: &str, epoch: u64) {
        if self.detached.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        tracing::error!(volume = %self.cfg.name, "ALERT disk failure, detaching the local disk ({why}): serving through the peers");
        {
            let mut r = self.replica();
            r.meta.disk = DiskState::Diskless;
            if let Err(e) = r.save_meta() {
                tracing::warn!(volume = %self.cfg.name, "cannot record the detach on disk: {e}");
            }
        }
        let (control, name, node) = (self.control.clone(), self.cfg.name.clone(), self.cfg.node.clone());
        tokio::spawn(async move {
            for _ in 0..50 {
                match control.record_disk(&name, &node, DiskState::Diskless, epoch).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(volume = %name, "cannot record the local disk Diskless: {e}");
                        tokio::time::sleep(RECORD_RETRY).await;
                    }
                }
            }
        });
    }

    /// Reads through the first in-sync peer (in order with the writes).
    async fn read_from_peer(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let rx = {
            let _order = self.order.lock().await;
            let mut found = None;
            for link in self.links.values() {
                let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                if !st.in_sync {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let msg = Message::ReadRequest { offset, len };
                if link.send(&mut st, &msg, Inflight { range: None, bytes: 0, resync: false, done: Some(tx) }).is_some()
                {
                    found = Some(rx);
                    break;
                }
            }
            found.ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?
        };
        match rx.await {
            Ok(Ok(Reply::Data(d))) if d.len() == len as usize => Ok(d.to_vec()),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    /// A client write: local, then every streaming peer; waits for every
    /// sync peer (or records it outdated).
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.apply(offset, len, Op::Write { data, fua }).await
    }

    pub async fn trim(&self, offset: u64, len: u32, zero: bool, fua: bool) -> io::Result<()> {
        self.check_range(offset, u64::from(len))?;
        self.apply(offset, u64::from(len), if zero { Op::Zeroes { fua } } else { Op::Trim }).await
    }

    async fn apply(&self, offset: u64, len: u64, op: Op) -> io::Result<()> {
        let epoch = self.primary_epoch()?;
        let mut waits = Vec::new();
        let fua = matches!(op, Op::Write { fua: true, .. } | Op::Zeroes { fua: true });
        {
            let _order = self.order.lock().await;
            if self.epoch() != Some(epoch) {
                return Err(io::Error::from_raw_os_error(libc::EROFS));
            }
            *self.last_app_write.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            if !self.links.is_empty() && !self.detached() {
                let activated = self.replica().activate(offset, len);
                if let Err(e) = activated {
                    self.detach(&format!("activity log: {e}"), epoch);
                }
            }
            let msg = match op {
                Op::Write { data, fua } => {
                    if !self.detached() {
                        if let Err(e) = self.data.write_all_at(&data, offset) {
                            self.detach(&format!("write at {offset}: {e}"), epoch);
                        }
                    }
                    Message::Write { offset, data: bytes::Bytes::from(data), fua }
                }
                Op::Trim => {
                    if !self.detached() {
                        if let Err(e) = punch_hole(&self.data, offset, len) {
                            self.detach(&format!("trim at {offset}: {e}"), epoch);
                        }
                    }
                    Message::Trim { offset, len: len as u32 }
                }
                Op::Zeroes { fua } => {
                    if !self.detached() {
                        if let Err(e) = punch_hole(&self.data, offset, len) {
                            self.detach(&format!("zeroes at {offset}: {e}"), epoch);
                        }
                    }
                    Message::Zeroes { offset, len: len as u32, fua }
                }
            };
            for (node, link) in &self.links {
                let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let sync = link.cfg.mode == ReplicationMode::Sync;
                let streaming = st.tx.is_some() && !st.ahead;
                if streaming && !sync && st.inflight_bytes + len > self.cfg.async_buffer {
                    // Never stall the application for an async peer.
                    st.ahead = true;
                    st.conn = ConnectionState::Ahead;
                }
                if streaming && !st.ahead {
                    let (tx, rx) = oneshot::channel();
                    let inflight =
                        Inflight { range: Some((offset, len)), bytes: len, resync: false, done: sync.then_some(tx) };
                    if link.send(&mut st, &msg, inflight).is_some() {
                        if sync {
                            waits.push((node.clone(), rx));
                        }
                        continue;
                    }
                }
                drop(st);
                self.replica().mark(node, offset, len);
                link.wake.notify_one();
                if sync {
                    waits.push((node.clone(), closed_receiver()));
                }
            }
        }
        self.complete(waits, epoch, fua).await
    }

    /// Ends a client request: durable here if `sync_local`, then every sync
    /// peer's answer — a peer that did not answer is recorded outdated
    /// (what it lacks is in its bitmap) before the client hears "done".
    async fn complete(&self, waits: Vec<(String, AckWait)>, epoch: u64, sync_local: bool) -> io::Result<()> {
        if sync_local && !self.detached() {
            if let Err(e) = self.sync().await {
                self.detach(&format!("flush: {e}"), epoch);
            }
        }
        let mut copies = usize::from(!self.detached());
        for (node, rx) in waits {
            match rx.await {
                Ok(Ok(_)) => copies += 1,
                _ => self.peer_missed(&node, epoch).await?,
            }
        }
        // Without a disk, a write lives only on the peers: none took it.
        if copies == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// A sync peer did not acknowledge: before the client may hear "done",
    /// the control plane must know that peer is outdated.
    async fn peer_missed(&self, node: &str, epoch: u64) -> io::Result<()> {
        let Some(link) = self.links.get(node) else { return Ok(()) };
        let _record = link.record.lock().await;
        loop {
            if link.st.lock().unwrap_or_else(|p| p.into_inner()).recorded == Some(DiskState::Outdated) {
                return Ok(());
            }
            if self.epoch() != Some(epoch) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            match self.control.record_disk(&self.cfg.name, node, DiskState::Outdated, epoch).await {
                Ok(()) => {
                    let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                    st.recorded = Some(DiskState::Outdated);
                    st.peer_disk = DiskState::Outdated;
                    tracing::warn!(volume = %self.cfg.name, peer = node, "peer recorded outdated");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(volume = %self.cfg.name, peer = node, "cannot record peer outdated, writes wait: {e}");
                    tokio::time::sleep(RECORD_RETRY).await;
                }
            }
        }
    }

    /// With `async_failover`, for as long as this primary holds `epoch`:
    /// records an async peer `UpToDate` while it streams in order (so a
    /// failover may promote it, losing what it had not received) and
    /// `Outdated` as soon as it does not (disconnected, resyncing, `Ahead`,
    /// or a write unacknowledged for `ASYNC_ACK_LAG`: a cut link).
    /// In the background, every tick: the writer never waits for it.
    async fn record_async_peer(self: Arc<Self>, link: Arc<Link>, epoch: u64) {
        let node = link.cfg.node.clone();
        let mut failing = false;
        // Whatever an earlier epoch recorded, this one records afresh.
        link.st.lock().unwrap_or_else(|p| p.into_inner()).recorded = None;
        while self.epoch() == Some(epoch) {
            let (want, have) = {
                let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let lagging = st.sent_at.values().next().is_some_and(|t| t.elapsed() > ASYNC_ACK_LAG);
                let streaming = st.tx.is_some() && st.in_sync && !st.ahead && st.resync.is_none() && !lagging;
                (if streaming { DiskState::UpToDate } else { DiskState::Outdated }, st.recorded)
            };
            if have != Some(want) {
                let _record = link.record.lock().await;
                match self.control.record_disk(&self.cfg.name, &node, want, epoch).await {
                    Ok(()) => {
                        link.st.lock().unwrap_or_else(|p| p.into_inner()).recorded = Some(want);
                        tracing::info!(volume = %self.cfg.name, peer = %node, disk = ?want, "async peer recorded");
                        failing = false;
                    }
                    Err(e) if !failing => {
                        tracing::warn!(volume = %self.cfg.name, peer = %node, "cannot record async peer {want:?}: {e}");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(ASYNC_RECORD_TICK).await;
        }
    }

    /// A client FLUSH: durable here and on every streaming sync peer.
    pub async fn flush(&self) -> io::Result<()> {
        let epoch = self.primary_epoch()?;
        let mut waits = Vec::new();
        {
            let _order = self.order.lock().await;
            for (node, link) in &self.links {
                if link.cfg.mode != ReplicationMode::Sync {
                    continue;
                }
                let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let (tx, rx) = oneshot::channel();
                let inflight = Inflight { range: None, bytes: 0, resync: false, done: Some(tx) };
                if link.send(&mut st, &Message::Flush, inflight).is_some() {
                    waits.push((node.clone(), rx));
                } else {
                    waits.push((node.clone(), closed_receiver()));
                }
            }
        }
        self.complete(waits, epoch, true).await
    }

    // ---- links (primary side) ----

    async fn run_link(self: Arc<Self>, link: Arc<Link>, epoch: u64) {
        let mut role = self.role.subscribe();
        // Sync peers that cannot be reached must be recorded before writes
        // are acknowledged; async peers are failover targets only with
        // `async_failover`, and then recorded as they stream or not.
        if link.cfg.mode == ReplicationMode::Async {
            match self.cfg.async_failover {
                true => drop(tokio::spawn(self.clone().record_async_peer(link.clone(), epoch))),
                false => {
                    let _ = self.peer_missed(&link.cfg.node, epoch).await;
                }
            }
        }
        while self.epoch() == Some(epoch) {
            let outcome = tokio::select! {
                r = self.clone().connect_once(&link, epoch) => r,
                _ = role.changed() => break,
            };
            let parked = {
                let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = &outcome {
                    if st.last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(volume = %self.cfg.name, peer = %link.cfg.node, "link: {e}");
                    }
                    st.last_error = Some(e.clone());
                }
                self.break_link(&link.cfg.node, &mut st, "link lost");
                st.conn == ConnectionState::SplitBrain
            };
            self.new_generation_after_loss(&link.cfg.node);
            if parked {
                tokio::select! {
                    _ = link.resolved.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = role.changed() => break,
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT) => {}
                    _ = role.changed() => break,
                }
            }
        }
    }

    /// After losing a peer that was in sync: a new generation starts here,
    /// counted from in that peer's bitmap.
    fn new_generation_after_loss(&self, peer: &str) {
        if !self.is_primary() {
            return;
        }
        let mut r = self.replica();
        let g = r.meta.bitmap_gens.get(peer).copied().unwrap_or(0);
        if g != 0 {
            return;
        }
        let old = r.meta.current;
        r.meta.bitmap_gens.insert(peer.to_string(), old);
        r.meta.history = [old, r.meta.history[0]];
        r.meta.current = fresh_generation();
        let current = r.meta.current;
        if let Err(e) = r.save_meta() {
            tracing::error!(volume = %self.cfg.name, "cannot save metadata: {e}");
        }
        drop(r);
        for (node, link) in &self.links {
            if node == peer {
                continue;
            }
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            if st.in_sync {
                link.send(
                    &mut st,
                    &Message::NewGeneration { current },
                    Inflight { range: None, bytes: 0, resync: false, done: None },
                );
            }
        }
    }

    async fn dial(&self, link: &Link) -> Result<TcpStream, String> {
        let mut last = String::from("no address");
        let addrs = link.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for addr in &addrs {
            match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: connect timed out"),
            }
        }
        Err(last)
    }

    /// One connection to a peer, from handshake to its end.
    async fn connect_once(self: Arc<Self>, link: &Arc<Link>, epoch: u64) -> Result<(), String> {
        let stream = self.dial(link).await?;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let peer = link.cfg.node.clone();
        let hello = {
            let r = self.replica();
            Hello {
                protocol: wire::PROTOCOL,
                volume: self.cfg.name.clone(),
                volume_id: self.cfg.volume_id.clone(),
                size: self.cfg.size,
                granule: self.cfg.granule,
                node: self.cfg.node.clone(),
                epoch,
                primary_since_ms: r.meta.primary_since_ms,
                generation: r.meta.generations_for(&peer),
                changed_blocks: r.bitmaps.get(&peer).map(|b| b.count()).unwrap_or(0),
                crashed_extents: r.meta.crashed_extents.clone(),
                mode: link.cfg.mode,
                split_brain: self.cfg.split_brain,
                discard_secondary: link.st.lock().unwrap_or_else(|p| p.into_inner()).discard_peer,
            }
        };
        wire::write_frame(&mut wr, 0, &Message::Hello(hello.clone())).await.map_err(|e| e.to_string())?;
        wr.flush().await.map_err(|e| e.to_string())?;
        let reply = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_frame(&mut rd)).await {
            Err(_) => return Err("handshake timed out".into()),
            Ok(Err(e)) => return Err(format!("handshake: {e}")),
            Ok(Ok((_, Message::HelloReply(r)))) => r,
            Ok(Ok((_, Message::Goodbye { reason }))) => return Err(format!("refused: {reason}")),
            Ok(Ok((_, other))) => return Err(format!("handshake: unexpected {}", kind_of(&other))),
        };
        if !reply.accepted {
            return Err(format!("refused: {}", reply.reason.unwrap_or_default()));
        }
        if reply.volume_id != self.cfg.volume_id || reply.size != self.cfg.size || reply.granule != self.cfg.granule {
            return Err(format!(
                "peer holds volume {} ({} bytes), expected {} ({} bytes)",
                reply.volume_id, reply.size, self.cfg.volume_id, self.cfg.size
            ));
        }
        let decision = decide_for(&hello, &reply);
        let full_from_empty = reply.generation.current == 0;
        match decision {
            Decision::InSync | Decision::Incremental => {}
            Decision::Full => {
                let mut r = self.replica();
                let data = r.data();
                if let Some(bm) = r.bitmaps.get_mut(&peer) {
                    if full_from_empty {
                        mark_allocated(&data, bm, self.cfg.size);
                    } else {
                        bm.set_all();
                    }
                }
            }
            Decision::SplitBrain { loser: Some(Side::Secondary) } => {
                // The peer's changes since the split are resynced from here too.
                loop {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_frame(&mut rd)).await {
                        Ok(Ok((_, Message::BitmapChunk { first_bit, words, last }))) => {
                            if let Some(bm) = self.replica().bitmaps.get_mut(&peer) {
                                bm.merge_words(first_bit, &words);
                            }
                            if last {
                                break;
                            }
                        }
                        Ok(Ok((_, other))) => {
                            return Err(format!("split brain: expected the peer's bitmap, got {}", kind_of(&other)))
                        }
                        Ok(Err(e)) => return Err(format!("split brain: {e}")),
                        Err(_) => return Err("split brain: the peer's bitmap did not arrive".into()),
                    }
                }
                tracing::warn!(volume = %self.cfg.name, peer = %peer, "split brain resolved: discarding the peer's changes");
                let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                st.discard_peer = false;
            }
            refused => {
                let (why, split) = match refused {
                    Decision::SplitBrain { loser: Some(Side::Primary) } => {
                        ("split brain: the policy discards this primary's changes; demote it, then resolve", true)
                    }
                    Decision::SplitBrain { .. } => {
                        ("split brain: both sides changed since their common generation; resolve by hand", true)
                    }
                    Decision::Unrelated => ("split brain: the replicas share no generation; resolve by hand", true),
                    _ => ("the peer holds newer data: this primary is stale", false),
                };
                if split {
                    tracing::error!(volume = %self.cfg.name, peer = %peer, "ALERT {why}");
                    link.st.lock().unwrap_or_else(|p| p.into_inner()).conn = ConnectionState::SplitBrain;
                }
                let _ = wire::write_frame(&mut wr, 0, &Message::Goodbye { reason: why.into() }).await;
                let _ = wr.flush().await;
                return Err(why.into());
            }
        }
        {
            let mut r = self.replica();
            for e in &reply.crashed_extents {
                r.mark(&peer, e * AL_EXTENT, AL_EXTENT);
            }
        }
        // Go live under the order lock: every later write streams, every
        // earlier one is in the bitmap.
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        {
            let _order = self.order.lock().await;
            if self.epoch() != Some(epoch) {
                return Err("demoted".into());
            }
            let total = self.replica().bitmaps.get(&peer).map(|b| b.bytes()).unwrap_or(0);
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            st.tx = Some(tx);
            st.ahead = false;
            st.in_sync = false;
            st.last_error = None;
            st.peer_disk = reply.disk;
            st.conn = ConnectionState::SyncSource;
            st.resync = Some(ResyncProgress {
                remaining_bytes: total,
                sent_bytes: 0,
                total_bytes: total,
                rate_bytes_per_s: 0,
                eta_s: None,
            });
            st.resync_started = Some(Instant::now());
        }
        tracing::info!(volume = %self.cfg.name, peer = %peer, ?decision, "peer connected");
        let writer = async move {
            while let Some(frame) = rx.recv().await {
                wr.write_all(&frame).await?;
                while let Ok(more) = rx.try_recv() {
                    wr.write_all(&more).await?;
                }
                wr.flush().await?;
            }
            Ok::<(), io::Error>(())
        };
        let reader = {
            let link = link.clone();
            let vol = self.clone();
            async move {
                loop {
                    let (seq, msg) = wire::read_frame(&mut rd).await.map_err(|e| e.to_string())?;
                    let reply = match msg {
                        Message::Ack => Ok(Reply::Ack),
                        Message::Digests { digests, .. } => Ok(Reply::Digests(digests)),
                        Message::ResyncData { data, .. } => Ok(Reply::Data(data)),
                        Message::Nack { errno, message } => Err(format!("peer error {errno}: {message}")),
                        Message::Goodbye { reason } => return Err::<(), String>(format!("peer closed: {reason}")),
                        other => return Err(format!("unexpected {} from the peer", kind_of(&other))),
                    };
                    let failed = reply.is_err();
                    let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                    st.sent_at.remove(&seq);
                    if let Some(f) = st.inflight.remove(&seq) {
                        st.inflight_bytes -= f.bytes;
                        if f.resync {
                            st.resync_inflight -= f.bytes;
                            st.bytes_sent += f.bytes;
                        }
                        if failed {
                            if let Some((off, len)) = f.range {
                                vol.replica().mark(&link.cfg.node, off, len);
                            }
                        }
                        if let Some(done) = f.done {
                            let _ = done.send(reply);
                        }
                        // Window space for the resync; a live write's ack
                        // changes nothing it waits for.
                        if f.resync {
                            link.wake.notify_one();
                        }
                    }
                    if failed {
                        return Err("the peer failed a write".into());
                    }
                }
            }
        };
        let resync = self.clone().resync_loop(link.clone(), epoch);
        tokio::select! {
            r = writer => r.map_err(|e| format!("send: {e}")),
            r = reader => r,
            r = resync => r,
        }
    }

    /// Sends the peer's bitmap blocks, rate-limited, yielding to writes;
    /// when it is empty, tells the peer it is up to date (sync peers are
    /// recorded so), then keeps catching up whatever gets marked later.
    async fn resync_loop(self: Arc<Self>, link: Arc<Link>, epoch: u64) -> Result<(), String> {
        let peer = link.cfg.node.clone();
        let mut cursor = 0u64;
        let started = Instant::now();
        let mut sent_here = 0u64;
        loop {
            if self.epoch() != Some(epoch) {
                return Err("demoted".into());
            }
            // Window: fewer bytes in flight while the application writes.
            let busy =
                self.last_app_write.lock().unwrap_or_else(|p| p.into_inner()).elapsed() < Duration::from_millis(20);
            let window = if busy { CHUNK } else { RESYNC_WINDOW };
            let (in_flight, in_sync, mode_sync) = {
                let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                (st.resync_inflight, st.in_sync, link.cfg.mode == ReplicationMode::Sync)
            };
            if in_flight >= window {
                tokio::select! {
                    _ = link.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            }
            let order = self.order.lock().await;
            let next = {
                let mut r = self.replica();
                let data = r.data();
                let Some(bm) = r.bitmaps.get_mut(&peer) else { return Err("no bitmap".into()) };
                let remaining = bm.bytes();
                let next = bm.next_set(cursor).or_else(|| bm.next_set(0));
                match next {
                    None => {
                        drop(r);
                        let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                        if st.resync_inflight == 0 && !st.in_sync && st.inflight.values().all(|f| !f.resync) {
                            // Everything sent and acknowledged: the peer is current.
                            let gens = self.replica().meta.generations_for(&peer);
                            let done =
                                Message::ResyncDone { generation: generation::Generations { bitmap: 0, ..gens } };
                            let (tx, rx) = oneshot::channel();
                            if link
                                .send(&mut st, &done, Inflight { range: None, bytes: 0, resync: false, done: Some(tx) })
                                .is_none()
                            {
                                return Err("link closed".into());
                            }
                            Next::Done(rx)
                        } else {
                            if st.in_sync && st.resync_inflight == 0 {
                                // Caught up: an async peer streams again, a
                                // repaired one is plainly connected.
                                st.ahead = false;
                                st.conn = ConnectionState::Connected;
                            }
                            Next::Sent(0)
                        }
                    }
                    Some(first) => {
                        let g = bm.granule();
                        let mut last = first;
                        while (last + 1 - first) * g < CHUNK && bm.is_set(last + 1) {
                            last += 1;
                        }
                        let offset = first * g;
                        let len = ((last + 1) * g).min(self.cfg.size) - offset;
                        let mut buf = vec![0u8; len as usize];
                        data.read_exact_at(&mut buf, offset).map_err(|e| format!("local read: {e}"))?;
                        for b in first..=last {
                            bm.clear(b);
                        }
                        drop(r);
                        cursor = last + 1;
                        let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                        let msg = Message::ResyncData { offset, data: bytes::Bytes::from(buf) };
                        let inflight = Inflight { range: Some((offset, len)), bytes: len, resync: true, done: None };
                        if link.send(&mut st, &msg, inflight).is_none() {
                            drop(st);
                            self.replica().mark(&peer, offset, len);
                            return Err("link closed".into());
                        }
                        sent_here += len;
                        let elapsed = started.elapsed().as_secs_f64().max(1e-3);
                        let rate = (sent_here as f64 / elapsed) as u64;
                        let remaining = remaining.saturating_sub(len);
                        if !in_sync {
                            if let Some(p) = st.resync.as_mut() {
                                p.remaining_bytes = remaining;
                                p.sent_bytes = sent_here;
                                p.total_bytes = p.total_bytes.max(sent_here + remaining);
                                p.rate_bytes_per_s = rate;
                                p.eta_s = (rate > 0).then(|| remaining as f64 / rate as f64);
                            }
                        } else {
                            st.conn = if st.ahead { ConnectionState::Ahead } else { ConnectionState::SyncSource };
                        }
                        Next::Sent(len)
                    }
                }
            };
            drop(order);
            let sent = match next {
                Next::Done(rx) => {
                    match rx.await {
                        Ok(Ok(_)) => {}
                        _ => return Err("the peer did not confirm the resync".into()),
                    }
                    self.sync_finished(&link, epoch, mode_sync).await?;
                    continue;
                }
                Next::Sent(n) => n,
            };
            if sent == 0 {
                tokio::select! {
                    _ = link.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            if let Some(rate) = self.cfg.rate {
                let due = Duration::from_secs_f64(sent_here as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
        }
    }

    async fn sync_finished(&self, link: &Link, epoch: u64, sync: bool) -> Result<(), String> {
        let peer = &link.cfg.node;
        {
            let mut r = self.replica();
            r.meta.bitmap_gens.insert(peer.clone(), 0);
            r.save_meta().map_err(|e| e.to_string())?;
        }
        {
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            st.in_sync = true;
            st.conn = ConnectionState::Connected;
            st.peer_disk = DiskState::UpToDate;
            if let Some(p) = st.resync.take() {
                let took = st.resync_started.map(|t| t.elapsed()).unwrap_or_default();
                st.last_resync = Some((p.sent_bytes, took));
                tracing::info!(volume = %self.cfg.name, peer = %peer, sent = p.sent_bytes, ms = took.as_millis() as u64, "resync done");
            }
        }
        if sync {
            let _record = link.record.lock().await;
            loop {
                if !link.st.lock().unwrap_or_else(|p| p.into_inner()).in_sync {
                    return Ok(()); // lost again meanwhile: it stays outdated
                }
                match self.control.record_disk(&self.cfg.name, peer, DiskState::UpToDate, epoch).await {
                    Ok(()) => break,
                    Err(e) if self.epoch() == Some(epoch) => {
                        tracing::warn!(volume = %self.cfg.name, peer = %peer, "cannot record peer up to date: {e}");
                        tokio::time::sleep(RECORD_RETRY).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            if st.tx.is_some() && st.in_sync {
                st.recorded = Some(DiskState::UpToDate);
            }
        }
        Ok(())
    }

    // ---- the secondary side ----

    fn drop_upstream(&self) {
        if let Some((_, stop)) = self.upstream.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(true);
        }
    }

    /// Serves one connection from a primary (its Hello already read).
    pub async fn serve<R, W>(self: Arc<Self>, hello: Hello, rd: R, wr: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let res = self.clone().serve_inner(id, hello, rd, wr).await;
        let mut up = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        if up.as_ref().is_some_and(|(i, _)| *i == id) {
            *up = None;
        }
        res
    }

    async fn serve_inner<R, W>(self: Arc<Self>, id: u64, hello: Hello, rd: R, mut wr: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let refuse = |reason: String| reason;
        let (reply, decision, my_bitmap, accepted) = {
            let mut r = self.replica();
            let check = if self.is_primary() {
                Err(refuse(format!("{} is primary for {}", self.cfg.node, self.cfg.name)))
            } else if hello.volume_id != self.cfg.volume_id
                || hello.size != self.cfg.size
                || hello.granule != self.cfg.granule
            {
                Err(refuse(format!(
                    "volume mismatch: {} ({} bytes) here, {} ({} bytes) offered",
                    self.cfg.volume_id, self.cfg.size, hello.volume_id, hello.size
                )))
            } else if hello.epoch < r.meta.epoch_seen {
                Err(refuse(format!("stale epoch {} < {} already seen", hello.epoch, r.meta.epoch_seen)))
            } else if !self.links.contains_key(&hello.node) {
                Err(refuse(format!("{} is not a replica of {}", hello.node, self.cfg.name)))
            } else {
                Ok(())
            };
            let gens = r.meta.generations_for(&hello.node);
            let changed = r.bitmaps.get(&hello.node).map(|b| b.count()).unwrap_or(0);
            let reply = HelloReply {
                accepted: check.is_ok(),
                reason: check.clone().err(),
                node: self.cfg.node.clone(),
                volume_id: self.cfg.volume_id.clone(),
                size: self.cfg.size,
                granule: self.cfg.granule,
                disk: r.meta.disk,
                primary_since_ms: r.meta.primary_since_ms,
                generation: gens,
                changed_blocks: changed,
                crashed_extents: r.extents_to_report(&hello.node, hello.epoch),
                epoch_seen: r.meta.epoch_seen,
            };
            if check.is_err() {
                (reply, Decision::Unrelated, None, false)
            } else {
                r.meta.epoch_seen = hello.epoch;
                r.meta.upstream = Some((hello.node.clone(), hello.epoch));
                let decision = decide_for(&hello, &reply);
                let mut bitmap = None;
                // Inconsistent only while blocks are actually coming: a
                // replica with nothing to receive stays promotable.
                let needs_data = match decision {
                    Decision::InSync | Decision::Incremental => {
                        hello.changed_blocks > 0 || !reply.crashed_extents.is_empty()
                    }
                    _ => true,
                };
                match decision {
                    Decision::InSync
                    | Decision::Incremental
                    | Decision::Full
                    | Decision::SplitBrain { loser: Some(Side::Secondary) } => {
                        if let Decision::SplitBrain { .. } = decision {
                            bitmap = r.bitmaps.get(&hello.node).map(|b| b.words().to_vec());
                        }
                        if needs_data {
                            // Forget what is about to be overwritten, so an
                            // interrupted resync resumes instead of splitting.
                            let base = match decision {
                                Decision::Full => None,
                                Decision::InSync => Some(r.meta.current),
                                _ => Some(hello.generation.bitmap),
                            };
                            let mut g = r.meta.generations_for(&hello.node);
                            g.sync_started_as_target(base);
                            set_generations(&mut r.meta, &hello.node, g);
                            r.meta.disk = DiskState::Inconsistent;
                        }
                    }
                    _ => {}
                }
                r.save_meta().map_err(|e| e.to_string())?;
                (reply, decision, bitmap, true)
            }
        };
        if !accepted {
            let _ = wire::write_frame(&mut wr, 0, &Message::HelloReply(reply.clone())).await;
            let _ = wr.flush().await;
            return Err(reply.reason.unwrap_or_default());
        }
        // A newer primary supersedes the current one.
        let (stop_tx, mut stop_rx) = watch::channel(false);
        {
            let mut up = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, old)) = up.take() {
                let _ = old.send(true);
            }
            *up = Some((id, stop_tx));
        }
        wire::write_frame(&mut wr, 0, &Message::HelloReply(reply)).await.map_err(|e| e.to_string())?;
        if let Some(words) = my_bitmap {
            let per = 64 * 1024;
            let chunks: Vec<_> = words.chunks(per).collect();
            if chunks.is_empty() {
                wire::write_frame(&mut wr, 0, &Message::BitmapChunk { first_bit: 0, words: Vec::new(), last: true })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            for (i, c) in chunks.iter().enumerate() {
                let msg = Message::BitmapChunk {
                    first_bit: (i * per * 64) as u64,
                    words: c.to_vec(),
                    last: i + 1 == chunks.len(),
                };
                wire::write_frame(&mut wr, 0, &msg).await.map_err(|e| e.to_string())?;
            }
        }
        wr.flush().await.map_err(|e| e.to_string())?;
        if !matches!(
            decision,
            Decision::InSync
                | Decision::Incremental
                | Decision::Full
                | Decision::SplitBrain { loser: Some(Side::Secondary) }
        ) {
            return Err(format!("not following {}: {decision:?}", hello.node));
        }
        let primary = hello.node.clone();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        loop {
            let frame = tokio::select! {
                f = wire::read_frame(&mut rd) => f,
                _ = stop_rx.changed() => {
                    let _ = wire::write_frame(&mut wr, 0, &Message::Goodbye { reason: "superseded by a newer primary".into() }).await;
                    let _ = wr.flush().await;
                    return Err("superseded".into());
                }
            };
            let (seq, msg) = match frame {
                Ok(f) => f,
                Err(wire::WireError::Closed) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let answer = self.apply_from_primary(&primary, msg).await;
            let out = match answer {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => Message::Nack { errno: e.raw_os_error().unwrap_or(libc::EIO), message: e.to_string() },
            };
            wire::write_frame(&mut wr, seq, &out).await.map_err(|e| e.to_string())?;
            if rd.buffer().is_empty() {
                wr.flush().await.map_err(|e| e.to_string())?;
            }
        }
    }

    async fn apply_from_primary(&self, primary: &str, msg: Message) -> io::Result<Option<Message>> {
        match msg {
            Message::Write { offset, data, fua } => {
                self.check_range(offset, data.len() as u64)?;
                self.replica().activate(offset, data.len() as u64)?;
                self.data.write_all_at(&data, offset)?;
                if fua {
                    self.sync().await?;
                }
                Ok(Some(Message::Ack))
            }
            Message::ResyncData { offset, data } => {
                self.check_range(offset, data.len() as u64)?;
                self.replica().activate(offset, data.len() as u64)?;
                self.data.write_all_at(&data, offset)?;
                Ok(Some(Message::Ack))
            }
            Message::Trim { offset, len } => {
                self.check_range(offset, u64::from(len))?;
                self.replica().activate(offset, u64::from(len))?;
                punch_hole(&self.data, offset, u64::from(len))?;
                Ok(Some(Message::Ack))
            }
            Message::Zeroes { offset, len, fua } => {
                self.check_range(offset, u64::from(len))?;
                self.replica().activate(offset, u64::from(len))?;
                punch_hole(&self.data, offset, u64::from(len))?;
                if fua {
                    self.sync().await?;
                }
                Ok(Some(Message::Ack))
            }
            Message::Flush => {
                self.sync().await?;
                Ok(Some(Message::Ack))
            }
            Message::ResyncDone { generation } => {
                self.sync().await?;
                let mut r = self.replica();
                let mut g = r.meta.generations_for(primary);
                g.sync_finished_as_target(&generation).map_err(|e| io_err(e.to_string()))?;
                set_generations(&mut r.meta, primary, g);
                if let Some(bm) = r.bitmaps.get_mut(primary) {
                    for b in 0..bm.bits() {
                        bm.clear(b);
                    }
                }
                r.meta.disk = DiskState::UpToDate;
                r.persist_bitmaps()?;
                r.reconciled()?;
                r.save_meta()?;
                tracing::info!(volume = %self.cfg.name, "up to date with {primary}");
                Ok(Some(Message::Ack))
            }
            Message::NewGeneration { current } => {
                let mut r = self.replica();
                if r.meta.disk == DiskState::UpToDate {
                    let mut g = r.meta.generations_for(primary);
                    g.follow_generation(current).map_err(|e| io_err(e.to_string()))?;
                    set_generations(&mut r.meta, primary, g);
                    r.save_meta()?;
                }
                Ok(None)
            }
            Message::ReadRequest { offset, len } => {
                self.check_range(offset, u64::from(len))?;
                let mut buf = vec![0u8; len as usize];
                self.data.read_exact_at(&mut buf, offset)?;
                Ok(Some(Message::ResyncData { offset, data: bytes::Bytes::from(buf) }))
            }
            Message::DigestRequest { offset, len, granule } => {
                self.check_range(offset, u64::from(len))?;
                let mut buf = vec![0u8; len as usize];
                self.data.read_exact_at(&mut buf, offset)?;
                let digests = buf.chunks(granule.max(512) as usize).map(wire::digest).collect();
                Ok(Some(Message::Digests { offset, granule, digests }))
            }
            other => Err(io_err(format!("unexpected {} from the primary", kind_of(&other)))),
        }
    }

    async fn sync(&self) -> io::Result<()> {
        let data = self.data.clone();
        tokio::task::spawn_blocking(move || data.sync_data()).await.map_err(io::Error::other)?
    }

    // ---- operator actions ----

    /// Throws away `discard`'s changes after a split brain. Only a
    /// secondary can be discarded: a primary must be demoted first.
    pub fn resolve(&self, discard: &str) -> Result<(), String> {
        if discard == self.cfg.node {
            return Err(format!(
                "{discard} is the primary: move the group away from it (or demote it) before discarding its changes"
            ));
        }
        let Some(link) = self.links.get(discard) else {
            return Err(format!("{discard} is not a replica"));
        };
        let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
        if st.conn != ConnectionState::SplitBrain {
            return Err(format!("{discard} is not in split brain ({:?})", st.conn));
        }
        st.discard_peer = true;
        st.conn = ConnectionState::Disconnected;
        drop(st);
        link.resolved.notify_one();
        Ok(())
    }

    pub fn is_split_brain(&self, node: &str) -> bool {
        self.links
            .get(node)
            .is_some_and(|l| l.st.lock().map(|s| s.conn == ConnectionState::SplitBrain).unwrap_or(false))
    }

    /// Online verify: per-block digests from every in-sync peer, compared
    /// here; differing blocks are marked and resynced.
    pub async fn verify(self: Arc<Self>) -> Result<VerifyReport, String> {
        let epoch = self.epoch().ok_or("not primary")?;
        {
            let mut v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if v.as_ref().is_some_and(|r| r.state == "running") {
                return Err("running".into());
            }
            *v = Some(VerifyReport {
                state: "running".into(),
                checked_bytes: 0,
                found_blocks: BTreeMap::new(),
                repaired_blocks: BTreeMap::new(),
                error: None,
            });
        }
        let vol = self.clone();
        tokio::spawn(async move {
            let res = vol.clone().verify_run(epoch).await;
            let mut v = vol.verify.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = v.as_mut() {
                match res {
                    Ok(()) => r.state = "done".into(),
                    Err(e) => {
                        r.state = "failed".into();
                        r.error = Some(e);
                    }
                }
            }
        });
        Ok(self.verify_report().unwrap_or_else(|| VerifyReport {
            state: "running".into(),
            checked_bytes: 0,
            found_blocks: BTreeMap::new(),
            repaired_blocks: BTreeMap::new(),
            error: None,
        }))
    }

    pub fn verify_report(&self) -> Option<VerifyReport> {
        self.verify.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn verify_run(self: Arc<Self>, epoch: u64) -> Result<(), String> {
        let g = u64::from(self.cfg.granule);
        let started = Instant::now();
        let mut offset = 0u64;
        let mut found: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        while offset < self.cfg.size {
            if self.epoch() != Some(epoch) {
                return Err("demoted during verify".into());
            }
            let len = CHUNK.min(self.cfg.size - offset);
            let mut waits = Vec::new();
            let local = {
                let _order = self.order.lock().await;
                let mut buf = vec![0u8; len as usize];
                self.data.read_exact_at(&mut buf, offset).map_err(|e| e.to_string())?;
                for (node, link) in &self.links {
                    let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                    if !st.in_sync {
                        continue;
                    }
                    let (tx, rx) = oneshot::channel();
                    let msg = Message::DigestRequest { offset, len: len as u32, granule: self.cfg.granule };
                    if link
                        .send(&mut st, &msg, Inflight { range: None, bytes: 0, resync: false, done: Some(tx) })
                        .is_some()
                    {
                        waits.push((node.clone(), rx));
                    }
                }
                buf.chunks(g as usize).map(wire::digest).collect::<Vec<u64>>()
            };
            for (node, rx) in waits {
                let Ok(Ok(Reply::Digests(theirs))) = rx.await else { continue };
                for (i, (a, b)) in local.iter().zip(theirs.iter()).enumerate() {
                    if a != b {
                        found.entry(node.clone()).or_default().push(offset / g + i as u64);
                    }
                }
            }
            offset += len;
            {
                let mut v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = v.as_mut() {
                    r.checked_bytes = offset;
                    for (n, bits) in &found {
                        r.found_blocks.insert(n.clone(), bits.len() as u64);
                    }
                }
            }
            if let Some(rate) = self.cfg.rate {
                let due = Duration::from_secs_f64(offset as f64 / rate as f64);
                if due > started.elapsed() {
                    tokio::time::sleep(due - started.elapsed()).await;
                }
            }
        }
        // Resync what differs, then count it repaired once it left the bitmap.
        for (node, bits) in &found {
            let _order = self.order.lock().await;
            let mut r = self.replica();
            if let Some(bm) = r.bitmaps.get_mut(node) {
                for b in bits {
                    bm.set(*b);
                }
            }
            drop(r);
            if let Some(l) = self.links.get(node) {
                l.wake.notify_one();
            }
            tracing::warn!(volume = %self.cfg.name, peer = %node, blocks = bits.len(), "verify found differing blocks; resyncing them");
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let mut all = true;
            for (node, bits) in &found {
                let r = self.replica();
                let repaired =
                    bits.iter().filter(|b| r.bitmaps.get(node).is_some_and(|bm| !bm.is_set(**b))).count() as u64;
                drop(r);
                let pending =
                    self.links.get(node).map(|l| l.st.lock().map(|s| s.resync_inflight).unwrap_or(0)).unwrap_or(0);
                // A block leaves the bitmap when it is sent: it counts as
                // repaired once nothing of the resync is unacknowledged.
                if pending > 0 {
                    all = false;
                    continue;
                }
                let done = repaired;
                if done < bits.len() as u64 {
                    all = false;
                }
                let mut v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = v.as_mut() {
                    r.repaired_blocks.insert(node.clone(), done);
                }
            }
            if all || Instant::now() > deadline || self.epoch() != Some(epoch) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    // ---- status ----

    pub fn status(&self, nbd: Option<String>) -> LocalVolumeStatus {
        // Lock order: a link's state, then the replica — never the other way
        // round (a deadlock found by tandem-chaos): copy what is needed here.
        let (disk, current, oos_by_peer) = {
            let r = self.replica();
            let oos: BTreeMap<String, u64> = r.bitmaps.iter().map(|(p, b)| (p.clone(), b.bytes())).collect();
            (r.meta.disk, r.meta.current, oos)
        };
        let primary = self.is_primary();
        let mut replicas = vec![ReplicaView {
            node: self.cfg.node.clone(),
            role: if primary { "primary" } else { "secondary" }.into(),
            disk: disk.to_string(),
            connection: if primary {
                ConnectionState::Connected
            } else if self.upstream.lock().map(|u| u.is_some()).unwrap_or(false) {
                if disk == DiskState::Inconsistent {
                    ConnectionState::SyncTarget
                } else {
                    ConnectionState::Connected
                }
            } else {
                ConnectionState::Disconnected
            },
            mode: None,
            out_of_sync_bytes: 0,
            resync: None,
            lag_bytes: None,
            last_error: None,
        }];
        if primary {
            for (node, link) in &self.links {
                let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let oos = oos_by_peer.get(node).copied().unwrap_or(0);
                let disk = if st.in_sync {
                    DiskState::UpToDate
                } else if st.tx.is_some() {
                    DiskState::Inconsistent
                } else {
                    st.recorded.unwrap_or(st.peer_disk)
                };
                replicas.push(ReplicaView {
                    node: node.clone(),
                    role: "secondary".into(),
                    disk: disk.to_string(),
                    connection: st.conn,
                    mode: Some(match link.cfg.mode {
                        ReplicationMode::Sync => "sync".into(),
                        ReplicationMode::Async => "async".into(),
                    }),
                    out_of_sync_bytes: oos,
                    resync: st.resync.clone().map(|mut p| {
                        p.remaining_bytes = oos;
                        p
                    }),
                    lag_bytes: (link.cfg.mode == ReplicationMode::Async).then_some(st.inflight_bytes + oos),
                    last_error: st.last_error.clone(),
                });
            }
        }
        LocalVolumeStatus {
            name: self.cfg.name.clone(),
            role: if primary { "primary" } else { "secondary" }.into(),
            size_bytes: self.cfg.size,
            nbd: if primary { nbd } else { None },
            replicas,
            generation: format!("{current:016x}"),
            verify: self.verify_report(),
        }
    }

    /// Bytes the peer `node` lacks, per the primary's bitmap.
    pub fn out_of_sync(&self, node: &str) -> u64 {
        self.replica().bitmaps.get(node).map(|b| b.bytes()).unwrap_or(0)
    }

    /// Resync bytes acknowledged by `node` since this process started.
    pub fn resync_bytes_sent(&self, node: &str) -> u64 {
        self.links.get(node).map(|l| l.st.lock().map(|s| s.bytes_sent).unwrap_or(0)).unwrap_or(0)
    }

    /// The last completed resync to `node`: bytes sent, time taken.
    pub fn last_resync(&self, node: &str) -> Option<(u64, Duration)> {
        self.links.get(node).and_then(|l| l.st.lock().ok().and_then(|s| s.last_resync))
    }

    /// Whether `node` is streaming and in sync.
    pub fn peer_in_sync(&self, node: &str) -> bool {
        self.links.get(node).is_some_and(|l| l.st.lock().map(|s| s.in_sync).unwrap_or(false))
    }
}

/// Stores one peer's view of the generations back into the metadata.
fn set_generations(meta: &mut super::store::Meta, peer: &str, g: Generations) {
    meta.current = g.current;
    meta.history = g.history;
    meta.bitmap_gens.insert(peer.to_string(), g.bitmap);
}

/// What one step of a resync did.
enum Next {
    /// Everything acknowledged; the peer confirms `ResyncDone` on this.
    Done(oneshot::Receiver<Result<Reply, String>>),
    Sent(u64),
}

enum Op {
    Write { data: Vec<u8>, fua: bool },
    Trim,
    Zeroes { fua: bool },
}

/// Where a request waits for one peer's answer.
type AckWait = oneshot::Receiver<Result<Reply, String>>;

fn closed_receiver() -> AckWait {
    let (_, rx) = oneshot::channel();
    rx
}

fn kind_of(m: &Message) -> &'static str {
    m.kind().name()
}

/// The connect decision both ends compute from the same two views.
///
/// One rule on top of the generations: a primary whose epoch is newer than
/// any the secondary has seen was promoted by the control plane as an
/// `UpToDate` replica, so it holds every acknowledged write; whatever the
/// secondary has that it lacks was never acknowledged (it came from a
/// primary of an older epoch, in flight when that one was deposed). Such a
/// secondary is overwritten: the union of both bitmaps after a split, a full
/// sync when the lineage is lost. Equal epochs (an operator's doing, or a
/// disaster-recovery copy promoted by hand) go to the split-brain policy.
fn decide_for(hello: &Hello, reply: &HelloReply) -> Decision {
    let d = decide_by_generations(hello, reply);
    if hello.epoch > reply.epoch_seen {
        match d {
            Decision::SplitBrain { .. } => return Decision::SplitBrain { loser: Some(Side::Secondary) },
            Decision::Unrelated if hello.generation.current != 0 => return Decision::Full,
            _ => {}
        }
    }
    d
}

fn decide_by_generations(hello: &Hello, reply: &HelloReply) -> Decision {
    let forced_secondary_loses = hello.discard_secondary;
    let policy = hello.split_brain;
    let primary = SideView {
        gens: hello.generation,
        primary_since_ms: hello.primary_since_ms,
        changed_blocks: hello.changed_blocks,
        disk: DiskState::UpToDate,
    };
    let secondary = SideView {
        gens: reply.generation,
        primary_since_ms: reply.primary_since_ms,
        changed_blocks: reply.changed_blocks,
        disk: reply.disk,
    };
    let policy = if forced_secondary_loses { SplitBrainPolicy::DiscardRemote } else { policy };
    let d = generation::decide(&primary, &secondary, policy);
    if forced_secondary_loses && matches!(d, Decision::Unrelated) {
        // The operator chose: the peer's data goes, all of it.
        return Decision::Full;
    }
    d
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

/// Marks for a full sync only the allocated parts of a sparse file (the
/// peer is empty: holes read as zeros on both sides).
fn mark_allocated(f: &File, bm: &mut super::store::Bitmap, size: u64) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut pos: i64 = 0;
    let size = size as i64;
    while pos < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                return; // no more data
            }
            bm.set_all(); // no SEEK_DATA: send everything
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        bm.set_range(data as u64, (end - data) as u64);
        pos = end;
    }
}
