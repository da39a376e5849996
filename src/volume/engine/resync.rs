//! The resync: sending a peer every block its bitmap says it lacks, in
//! chunks, rate-limited, yielding to application writes; then telling it
//! it is up to date and recording a sync peer `UpToDate`. It keeps running
//! while the link lives, catching up whatever gets marked later.
//!
//! A bit leaves the bitmap only when its block is enqueued under the
//! write-order lock (a lost frame puts it back), and a peer is recorded
//! `UpToDate` only after it confirmed the whole resync.
//!
//! How much it sends is the volume's resync policy ([`ResyncPolicy`]):
//! a fixed window, or what the adaptive controller
//! ([`super::resync_control`]) plans each step from what this loop
//! measures (the peer's acknowledgements, the application's writes).

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_raft::volume::{DiskState, ReplicationMode};
use tokio::sync::oneshot;

use super::link::{Inflight, Link, Reply};
use super::resync_control::{Controller, Latencies, Plan, Sample, Settings};
use super::{ResyncPolicy, Volume, CHUNK, RECORD_RETRY, RESYNC_WINDOW};
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
        let mut pace = Pace::default();
        let mut recent = Recent::default();
        loop {
            if self.epoch() != Some(epoch) {
                return Err("demoted".into());
            }
            let (in_flight, in_sync, mode_sync) = {
                let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                (st.resync_inflight, st.in_sync, link.cfg.mode == ReplicationMode::Sync)
            };
            let now = Instant::now();
            let Some(max_len) = pace.allowance(&self, &link, in_flight, now) else {
                tokio::select! {
                    _ = link.wake.notified() => {}
                    _ = tokio::time::sleep(pace.wait(now)) => {}
                }
                continue;
            };
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
                        while (last + 1 - first) * g < max_len && bm.is_set(last + 1) {
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
                        pace.sent(len);
                        let rate = recent.rate(sent_here, started);
                        let remaining = remaining.saturating_sub(len);
                        if !in_sync {
                            if let Some(p) = st.resync.as_mut() {
                                p.remaining_bytes = remaining;
                                p.sent_bytes = sent_here;
                                p.total_bytes = p.total_bytes.max(sent_here + remaining);
                                p.rate_bytes_per_s = rate;
                                p.eta_s = (rate > 0).then(|| remaining as f64 / rate as f64);
                                p.target_rate_bytes_per_s = pace.target(self.cfg.rate);
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
            // The fixed policy paces to `rate` here; the adaptive one
            // within its plan.
            if let (Some(rate), None) = (self.cfg.rate, &pace.adaptive) {
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

/// How long a step of the adaptive controller is (DRBD's `SLEEP_TIME`).
const STEP: Duration = Duration::from_millis(100);
/// Over how long it spreads a correction (DRBD's `c-plan-ahead`, 2 s).
const PLAN_AHEAD: Duration = Duration::from_secs(2);
/// Its smallest window: a quarter of a chunk, so that an application write
/// queued behind the resync on the link waits for little.
const MIN_WINDOW: u64 = CHUNK / 4;
/// Over how long the reported rate is measured.
const RATE_SPAN: Duration = Duration::from_secs(2);

/// The resync policy at work for one link: under the adaptive one, the
/// controller, its current plan and what this loop last read of the link
/// and of the application.
#[derive(Default)]
struct Pace {
    adaptive: Option<Adaptive>,
}

struct Adaptive {
    ctl: Controller,
    plan: Plan,
    /// Bytes the plan still lets this step send.
    left: u64,
    step_ends: Instant,
    /// The link's acknowledged resync bytes at the step's start.
    acked: u64,
    /// The application's write latencies at the step's start.
    app: Latencies,
}

impl Pace {
    /// How many bytes the next frame may carry now; `None`: wait (window
    /// full, or this step's budget spent).
    fn allowance(&mut self, vol: &Volume, link: &Link, in_flight: u64, now: Instant) -> Option<u64> {
        let ResyncPolicy::Adaptive { min_rate } = vol.resync_policy() else {
            self.adaptive = None;
            // Fewer bytes in flight while the application writes.
            let busy =
                vol.last_app_write.lock().unwrap_or_else(|p| p.into_inner()).elapsed() < Duration::from_millis(20);
            let window = if busy { CHUNK } else { RESYNC_WINDOW };
            return (in_flight < window).then_some(CHUNK);
        };
        let acked = link.st.lock().unwrap_or_else(|p| p.into_inner()).bytes_sent;
        let app = vol.app_writes.read();
        let a = match &mut self.adaptive {
            Some(a) if a.ctl.settings().min_rate == min_rate => a,
            slot => {
                // A new controller: a new link, or a new policy.
                let ctl = Controller::new(Settings {
                    min_rate,
                    max_rate: vol.cfg.rate,
                    fill_target: RESYNC_WINDOW,
                    min_window: MIN_WINDOW,
                    plan_ahead: PLAN_AHEAD,
                    step: STEP,
                });
                let plan = ctl.first();
                slot.insert(Adaptive { ctl, plan, left: plan.budget, step_ends: now + STEP, acked, app: app.clone() })
            }
        };
        if now >= a.step_ends {
            let writes = app.since(&a.app);
            let sample = Sample {
                acked: acked.saturating_sub(a.acked),
                in_flight,
                app_writes: writes.count(),
                app_latency: writes.quantile(0.99),
            };
            a.plan = a.ctl.step(sample);
            a.left = a.plan.budget;
            // A late step is not made up for: the plan is per step.
            a.step_ends = now + STEP;
            (a.acked, a.app) = (acked, app);
        }
        (in_flight < a.plan.window && a.left > 0).then(|| CHUNK.min(a.plan.window).min(a.left))
    }

    /// How long to wait for window space or budget at most.
    fn wait(&self, now: Instant) -> Duration {
        match &self.adaptive {
            Some(a) => a.step_ends.saturating_duration_since(now).max(Duration::from_millis(1)),
            None => Duration::from_millis(50),
        }
    }

    fn sent(&mut self, len: u64) {
        if let Some(a) = &mut self.adaptive {
            a.left = a.left.saturating_sub(len);
        }
    }

    /// The rate the resync aims at: the controller's plan, or the fixed
    /// policy's `rate`.
    fn target(&self, rate: Option<u64>) -> Option<u64> {
        self.adaptive.as_ref().map(|a| a.plan.rate).or(rate)
    }
}

/// The rate of the last [`RATE_SPAN`] of sends (an adaptive resync changes
/// its rate as the application comes and goes: an average since the start
/// would not say what it does now).
#[derive(Default)]
struct Recent {
    sends: VecDeque<(Instant, u64)>,
}

impl Recent {
    /// Bytes per second, `sent` being the total so far.
    fn rate(&mut self, sent: u64, started: Instant) -> u64 {
        let now = Instant::now();
        self.sends.push_back((now, sent));
        while self.sends.len() > 1 && self.sends.front().is_some_and(|(t, _)| now - *t > RATE_SPAN) {
            self.sends.pop_front();
        }
        let (since, base) = match self.sends.front() {
            Some((t, b)) if now - *t >= STEP => (*t, *b),
            // Too short a span to say: the average since the start.
            _ => (started, 0),
        };
        (sent.saturating_sub(base) as f64 / (now - since).as_secs_f64().max(1e-3)) as u64
    }
}

/// What one step of a resync did.
enum Next {
    /// Everything acknowledged; the peer confirms `ResyncDone` on this.
    Done(oneshot::Receiver<Result<Reply, String>>),
    Sent(u64),
}
