//! The online verify: per-block digests of the whole volume from every
//! in-sync peer, compared on the primary in order with the writes; blocks
//! that differ are marked in that peer's bitmap, resynced, and counted
//! repaired once acknowledged.
//!
//! It never writes a block itself (the resync does), and stops when the
//! primary's epoch ends.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::link::{Inflight, Reply};
use super::{Volume, CHUNK};
use crate::volume::status::{VerifyOutcome, VerifyState};
use crate::volume::wire::{self, Message};

impl Volume {
    /// Online verify: per-block digests from every in-sync peer, compared
    /// here; differing blocks are marked and resynced.
    pub async fn verify(self: Arc<Self>) -> Result<VerifyOutcome, String> {
        let epoch = self.epoch().ok_or("not primary")?;
        {
            let mut v = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if v.as_ref().is_some_and(|r| r.state == VerifyState::Running) {
                return Err("running".into());
            }
            *v = Some(VerifyOutcome::running());
        }
        let vol = self.clone();
        tokio::spawn(async move {
            let res = vol.clone().verify_run(epoch).await;
            let mut v = vol.verify.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = v.as_mut() {
                r.state = match res {
                    Ok(()) => VerifyState::Done,
                    Err(e) => VerifyState::Failed(e),
                };
            }
        });
        Ok(self.verify_report().unwrap_or_else(VerifyOutcome::running))
    }

    /// The last (or running) online verify on this primary, if any.
    pub fn verify_report(&self) -> Option<VerifyOutcome> {
        self.verify.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn verify_run(self: Arc<Self>, epoch: u64) -> Result<(), String> {
        let g = u64::from(self.cfg.granule);
        let started = Instant::now();
        let mut offset = 0u64;
        let mut found: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        // What every in-sync peer has grown to.
        let size = self.exported_size();
        while offset < size {
            if self.epoch() != Some(epoch) {
                return Err("demoted during verify".into());
            }
            let len = CHUNK.min(size - offset);
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
}
