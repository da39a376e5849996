//! The primary's write path, as the NBD export calls it: write, trim,
//! write-zeroes, flush (reads: `reads`). A request is applied locally and enqueued to every
//! streaming peer under the write-order lock, then waits for every sync
//! peer, or for that peer to be recorded `Outdated`. A failing local disk is
//! detached here (the primary then serves through its peers).
//!
//! It must never acknowledge a write that a sync peer neither applied nor is
//! recorded outdated for, and it serves nothing while the node's lease has
//! lapsed or after a halt.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tandem_raft::volume::{DiskState, ReplicationMode};
use tokio::sync::oneshot;

use super::link::{Inflight, Reply};
use super::{punch_hole, Role, Volume, RECORD_RETRY};
use crate::volume::status::Connection;
use crate::volume::wire::Message;

impl Volume {
    pub(super) fn primary_epoch(&self) -> io::Result<u64> {
        let epoch = self.epoch().ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))?;
        if !(self.lease)() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(epoch)
    }

    pub(super) fn detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }

    /// The local disk failed: stop using it (the primary goes `Diskless`,
    /// serving through its peers), raise an alert, and tell the control
    /// plane, which then moves the group to an up-to-date replica.
    pub(super) fn detach(&self, why: &str, epoch: u64) {
        if self.detached.swap(true, Ordering::SeqCst) {
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
                match control.record_disk(&name, &node, DiskState::Diskless, epoch, 0).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(volume = %name, "cannot record the local disk Diskless: {e}");
                        tokio::time::sleep(RECORD_RETRY).await;
                    }
                }
            }
        });
    }

    /// A client write: local, then every streaming peer; waits for every
    /// sync peer (or records it outdated).
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_client_range(offset, len)?;
        self.apply(offset, len, Op::Write { data, fua }).await
    }

    pub async fn trim(&self, offset: u64, len: u32, zero: bool, fua: bool) -> io::Result<()> {
        self.check_client_range(offset, u64::from(len))?;
        self.apply(offset, u64::from(len), if zero { Op::Zeroes { fua } } else { Op::Trim }).await
    }

    async fn apply(&self, offset: u64, len: u64, op: Op) -> io::Result<()> {
        let started = Instant::now();
        let done = self.apply_inner(offset, len, op).await;
        // What the application waited, for the adaptive resync.
        self.app_writes.record(started.elapsed());
        done
    }

    async fn apply_inner(&self, offset: u64, len: u64, op: Op) -> io::Result<()> {
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
                        let started = Instant::now();
                        if let Err(e) = self.data.write_all_at(&data, offset) {
                            self.detach(&format!("write at {offset}: {e}"), epoch);
                        }
                        if let Some(h) = self.local_write_seconds.get() {
                            h.observe(started.elapsed().as_secs_f64());
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
                    st.conn = Connection::Ahead;
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
    pub(super) async fn peer_missed(&self, node: &str, epoch: u64) -> io::Result<()> {
        let Some(link) = self.links.get(node) else { return Ok(()) };
        let _record = link.record.lock().await;
        loop {
            if link.st.lock().unwrap_or_else(|p| p.into_inner()).recorded == Some(DiskState::Outdated) {
                return Ok(());
            }
            if self.epoch() != Some(epoch) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            // A halt or a demotion ends the wait at once: the write fails
            // (it is not acknowledged), and the group's stop is not held up
            // by a record that can no longer matter (a lapsed lease often
            // means the leader is out of reach: the call would run its
            // whole timeout).
            let mut role = self.role.subscribe();
            let replaced = link.st.lock().unwrap_or_else(|p| p.into_inner()).peer_replaced;
            let record = self.control.record_disk(&self.cfg.name, node, DiskState::Outdated, epoch, replaced);
            let outcome = tokio::select! {
                r = record => r,
                _ = role.wait_for(|r| !matches!(r, Role::Primary { epoch: e } if *e == epoch)) => {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            };
            match outcome {
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
}

/// What a client request does to its range.
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
