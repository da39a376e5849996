//! The resync: sending a peer every block its bitmap says it lacks, in
//! chunks, rate-limited, yielding to application writes; then telling it
//! it is up to date and recording a sync peer `UpToDate`. It keeps running
//! while the link lives, catching up whatever gets marked later.
//!
//! A bit leaves the bitmap only when its block is enqueued under the
//! write-order lock (a lost frame puts it back), and a peer is recorded
//! `UpToDate` only after it confirmed the whole resync.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_raft::volume::{DiskState, ReplicationMode};
use tokio::sync::oneshot;

use super::link::{Inflight, Link, Reply};
use super::{Volume, CHUNK, RECORD_RETRY, RESYNC_WINDOW};
use crate::volume::generation::Generations;
use crate::volume::status::Connection;
use crate::volume::wire::Message;

impl Volume {
    /// Sends the peer's bitmap blocks, rate-limited, yielding to writes;
    /// when it is empty, tells the peer it is up to date (sync peers are
    /// recorded so), then keeps catching up whatever gets marked later.
    pub(super) async fn resync_loop(self: Arc<Self>, link: Arc<Link>, epoch: u64) -> Result<(), String> {
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
                            let done = Message::ResyncDone { generation: Generations { bitmap: 0, ..gens } };
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
                                st.conn = Connection::Connected;
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
                        let len = ((last + 1) * g).min(self.size()) - offset;
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
                            st.conn = if st.ahead { Connection::Ahead } else { Connection::SyncSource };
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
            st.conn = Connection::Connected;
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
                let replaced = link.st.lock().unwrap_or_else(|p| p.into_inner()).peer_replaced;
                match self.control.record_disk(&self.cfg.name, peer, DiskState::UpToDate, epoch, replaced).await {
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
}

/// What one step of a resync did.
enum Next {
    /// Everything acknowledged; the peer confirms `ResyncDone` on this.
    Done(oneshot::Receiver<Result<Reply, String>>),
    Sent(u64),
}
