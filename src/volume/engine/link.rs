//! The primary's link to each peer: dialing its endpoints, the handshake
//! (checked by [`handshake::check`], the same check the secondary runs),
//! going live under the write-order lock, the live stream's acknowledgements,
//! reconnecting, parking in split brain until an operator resolves it, and
//! recording an async peer that may fail over.
//!
//! A link never acknowledges a client write itself (the write path waits
//! on the frames it sends) and never loses what a peer lacks: whatever was
//! in flight when it breaks goes back to that peer's bitmap.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_raft::volume::{DiskState, ReplicationMode};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use crate::security::tls::ReplicationStream;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{
    fresh_generation, kind_of, PeerConfig, Volume, ASYNC_ACK_LAG, ASYNC_RECORD_TICK, HANDSHAKE_TIMEOUT, PEER_SILENCE,
    RECONNECT, SILENCE_CHECK,
};
use crate::volume::generation::{Decision, Side};
use crate::volume::handshake::{self, End};
use crate::volume::status::{Connection, ResyncStatus};
use crate::volume::store::{Bitmap, AL_EXTENT};
use crate::volume::wire::{self, Hello, Message};

/// What a peer's reply to a frame was.
#[derive(Debug)]
pub(super) enum Reply {
    Ack,
    Digests(Vec<u64>),
    /// Blocks read for a primary whose disk failed.
    Data(bytes::Bytes),
}

pub(super) struct Inflight {
    /// The range the peer lacks if this frame is lost.
    pub(super) range: Option<(u64, u64)>,
    pub(super) bytes: u64,
    pub(super) resync: bool,
    pub(super) done: Option<oneshot::Sender<Result<Reply, String>>>,
}

/// The primary's view of one peer.
pub(super) struct Link {
    pub(super) cfg: PeerConfig,
    /// Its endpoints now (nodes may change addresses while we run).
    pub(super) addrs: Mutex<Vec<SocketAddr>>,
    pub(super) st: Mutex<LinkState>,
    /// Wakes the link's resync loop (new bits, window space).
    pub(super) wake: Notify,
    /// Wakes a link parked in split brain (an operator resolved it).
    pub(super) resolved: Notify,
    /// Serializes what is recorded about this peer, so an `UpToDate` can
    /// never land after the `Outdated` that followed it.
    pub(super) record: tokio::sync::Mutex<()>,
}

/// What a link knows about its peer now.
pub(super) struct LinkState {
    pub(super) conn: Connection,
    /// Frames to the peer; present while the link streams. A frame shares
    /// its data with the client's request (no copy on the way).
    pub(super) tx: Option<mpsc::UnboundedSender<wire::Frame>>,
    pub(super) next_seq: u64,
    pub(super) inflight: BTreeMap<u64, Inflight>,
    /// When each frame in flight was sent: an async peer that leaves one
    /// unacknowledged too long is no failover target (a cut link keeps its
    /// TCP connection open for a long while).
    pub(super) sent_at: BTreeMap<u64, Instant>,
    /// When the peer last sent anything on this connection.
    pub(super) last_heard: Instant,
    pub(super) inflight_bytes: u64,
    pub(super) resync_inflight: u64,
    /// Async peer that fell out of its buffer: writes go to the bitmap.
    pub(super) ahead: bool,
    /// In sync (not resyncing): new generations are streamed to it.
    pub(super) in_sync: bool,
    pub(super) peer_disk: DiskState,
    /// What the control plane holds for this peer (under our epoch).
    pub(super) recorded: Option<DiskState>,
    pub(super) resync: Option<ResyncStatus>,
    pub(super) resync_started: Option<Instant>,
    pub(super) last_error: Option<String>,
    /// A forced loser after split brain (operator).
    pub(super) discard_peer: bool,
    pub(super) bytes_sent: u64,
    /// The last completed resync: bytes sent and how long it took.
    pub(super) last_resync: Option<(u64, Duration)>,
    /// The peer's replacement number, as its last handshake said: what a
    /// record of its disk names.
    pub(super) peer_replaced: u64,
    /// Client reads sent to this peer (read balancing, repairs, a diskless
    /// primary) since this primary started.
    pub(super) reads_served: u64,
}

impl Link {
    pub(super) fn new(cfg: &PeerConfig) -> Link {
        Link {
            cfg: cfg.clone(),
            addrs: Mutex::new(cfg.addrs.clone()),
            st: Mutex::new(LinkState {
                conn: Connection::Disconnected,
                tx: None,
                next_seq: 1,
                inflight: BTreeMap::new(),
                sent_at: BTreeMap::new(),
                last_heard: Instant::now(),
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
                peer_replaced: 0,
                reads_served: 0,
            }),
            wake: Notify::new(),
            resolved: Notify::new(),
            record: tokio::sync::Mutex::new(()),
        }
    }

    /// Enqueues a frame; None when the link is not streaming.
    pub(super) fn send(&self, st: &mut LinkState, msg: &Message, inflight: Inflight) -> Option<u64> {
        let tx = st.tx.as_ref()?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let frame = match wire::encode_frame(seq, msg) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!("cannot encode a frame: {e}");
                return None;
            }
        };
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

impl Volume {
    /// Stops streaming to a peer: what it did not acknowledge goes to its
    /// bitmap, and waiting writes learn the peer failed.
    pub(super) fn break_link(&self, node: &str, st: &mut LinkState, why: &str) {
        st.tx = None;
        st.in_sync = false;
        st.ahead = false;
        st.resync = None;
        if st.conn != Connection::SplitBrain {
            st.conn = Connection::Disconnected;
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
            let (want, have, replaced) = {
                let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let lagging = st.sent_at.values().next().is_some_and(|t| t.elapsed() > ASYNC_ACK_LAG);
                let streaming = st.tx.is_some() && st.in_sync && !st.ahead && st.resync.is_none() && !lagging;
                (if streaming { DiskState::UpToDate } else { DiskState::Outdated }, st.recorded, st.peer_replaced)
            };
            if have != Some(want) {
                let _record = link.record.lock().await;
                match self.control.record_disk(&self.cfg.name, &node, want, epoch, replaced).await {
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

    pub(super) async fn run_link(self: Arc<Self>, link: Arc<Link>, epoch: u64) {
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
                st.conn == Connection::SplitBrain
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

    async fn dial(&self, link: &Link) -> Result<ReplicationStream, String> {
        let mut last = String::from("no address");
        let addrs = link.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for addr in &addrs {
            match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return match crate::volume::replication_tls() {
                        None => Ok(ReplicationStream::Plain(s)),
                        Some(t) => t.connect(s, *addr).await.map_err(|e| format!("{addr}: TLS: {e}")),
                    };
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
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let peer = link.cfg.node.clone();
        let hello = {
            let r = self.replica();
            Hello {
                protocol: wire::PROTOCOL,
                volume: self.cfg.name.clone(),
                volume_id: self.cfg.volume_id.clone(),
                size: r.size(),
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
                forced_epoch: self.forced_epoch.load(std::sync::atomic::Ordering::Relaxed),
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
        let decision = handshake::check(End::Primary, &hello, &reply).map_err(|e| e.to_string())?;
        if let Some((why, split)) = handshake::stop_reason(decision) {
            if split {
                tracing::error!(volume = %self.cfg.name, peer = %peer, "ALERT {why}");
                link.st.lock().unwrap_or_else(|p| p.into_inner()).conn = Connection::SplitBrain;
            }
            let _ = wire::write_frame(&mut wr, 0, &Message::Goodbye { reason: why.into() }).await;
            let _ = wr.flush().await;
            return Err(why.into());
        }
        let full_from_empty = reply.generation.current == 0;
        if decision == Decision::Full {
            self.record_inconsistent(link, epoch, reply.replaced).await?;
        }
        match decision {
            Decision::Full => {
                let mut r = self.replica();
                let data = r.data();
                let size = r.size();
                if let Some(bm) = r.bitmaps.get_mut(&peer) {
                    if full_from_empty {
                        mark_allocated(&data, bm, size);
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
            // In sync or incremental: the bitmap already says what to send.
            _ => {}
        }
        {
            let mut r = self.replica();
            for e in &reply.crashed_extents {
                r.mark(&peer, e * AL_EXTENT, AL_EXTENT);
            }
        }
        // Go live under the order lock: every later write streams, every
        // earlier one is in the bitmap.
        let (tx, mut rx) = mpsc::unbounded_channel::<wire::Frame>();
        {
            let _order = self.order.lock().await;
            if self.epoch() != Some(epoch) {
                return Err("demoted".into());
            }
            // A grow since the Hello sent no Grow frame to this link (it was
            // not streaming): the peer may be smaller; start again.
            if self.size() != hello.size {
                return Err("the volume grew during the handshake: reconnecting".into());
            }
            let total = self.replica().bitmaps.get(&peer).map(|b| b.bytes()).unwrap_or(0);
            let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
            st.tx = Some(tx);
            st.last_heard = Instant::now();
            st.ahead = false;
            st.in_sync = false;
            st.last_error = None;
            st.peer_disk = reply.disk;
            st.peer_replaced = reply.replaced;
            st.conn = Connection::SyncSource;
            st.resync = Some(ResyncStatus {
                remaining_bytes: total,
                sent_bytes: 0,
                total_bytes: total,
                rate_bytes_per_s: 0,
                eta_s: None,
                target_rate_bytes_per_s: None,
            });
            st.resync_started = Some(Instant::now());
        }
        tracing::info!(volume = %self.cfg.name, peer = %peer, ?decision, "peer connected");
        let writer = async move {
            while let Some(frame) = rx.recv().await {
                wire::send_frame(&mut wr, &frame).await?;
                while let Ok(more) = rx.try_recv() {
                    wire::send_frame(&mut wr, &more).await?;
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
                    st.last_heard = Instant::now();
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
        // A cut link (no reset: a dead switch, a pulled cable) keeps its TCP
        // connection open for many minutes: a sync write would wait that
        // long. A peer that owes an answer and has said nothing for
        // PEER_SILENCE is taken as gone (what it lacks goes to its bitmap,
        // and it is recorded `Outdated` before any write is acknowledged).
        // With a bandwidth limit (a WAN link), the bytes in flight may take
        // longer than that to cross it: they are allowed their time.
        let rate = self.cfg.rate.filter(|r| *r > 0);
        let silence = {
            let link = link.clone();
            async move {
                loop {
                    tokio::time::sleep(SILENCE_CHECK).await;
                    let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                    let crossing =
                        rate.map_or(Duration::ZERO, |r| Duration::from_secs_f64(st.inflight_bytes as f64 / r as f64));
                    let allowed = PEER_SILENCE.max(crossing);
                    let owed = st.sent_at.values().next().is_some_and(|t| t.elapsed() > allowed);
                    if owed && st.last_heard.elapsed() > allowed {
                        return Err::<(), String>(format!(
                            "no answer from the peer for {:.1}s with writes in flight: the link is cut",
                            st.last_heard.elapsed().as_secs_f64()
                        ));
                    }
                }
            }
        };
        tokio::select! {
            r = writer => r.map_err(|e| format!("send: {e}")),
            r = reader => r,
            r = resync => r,
            r = silence => r,
        }
    }

    /// A peer about to be resynced in full holds no usable copy (an empty,
    /// wiped or only ancestral disk): before a block goes, the control plane
    /// records it `Inconsistent`, so no failover picks it meanwhile — an
    /// `UpToDate` record of it may be left from before its disk was lost.
    /// Async peers that never fail over are recorded `Outdated` already.
    async fn record_inconsistent(&self, link: &Link, epoch: u64, replaced: u64) -> Result<(), String> {
        if link.cfg.mode == ReplicationMode::Async && !self.cfg.async_failover {
            return Ok(());
        }
        let _record = link.record.lock().await;
        self.control
            .record_disk(&self.cfg.name, &link.cfg.node, DiskState::Inconsistent, epoch, replaced)
            .await
            .map_err(|e| format!("cannot record the peer Inconsistent before its full resync: {e}"))?;
        let mut st = link.st.lock().unwrap_or_else(|p| p.into_inner());
        st.recorded = Some(DiskState::Inconsistent);
        st.peer_disk = DiskState::Inconsistent;
        Ok(())
    }

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
        if st.conn != Connection::SplitBrain {
            return Err(format!("{discard} is not in split brain ({:?})", st.conn));
        }
        st.discard_peer = true;
        st.conn = Connection::Disconnected;
        drop(st);
        link.resolved.notify_one();
        Ok(())
    }

    pub fn is_split_brain(&self, node: &str) -> bool {
        self.links.get(node).is_some_and(|l| l.st.lock().map(|s| s.conn == Connection::SplitBrain).unwrap_or(false))
    }
}

/// Marks for a full sync only the allocated parts of a sparse file (the
/// peer is empty: holes read as zeros on both sides).
fn mark_allocated(f: &File, bm: &mut Bitmap, size: u64) {
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
