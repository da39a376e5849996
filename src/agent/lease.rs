//! The node's lease and heartbeats: sending heartbeats (or stepping out
//! when cut off from a leader a majority hears), extending the lease from
//! heartbeats a majority echoed, and lapsing it: everything local is killed.

use super::*;

impl Agent {
    /// When (CLOCK_BOOTTIME, ms) this node sent the heartbeat that a
    /// majority of voters (itself included, as now) has since echoed back:
    /// the lease counts from there. So it ends no later than the leader's
    /// count from the last heartbeat it heard from us — also when only our
    /// outgoing traffic is lost (we would still hear them, they not us).
    pub(super) fn quorum_acked_ms(&self, m: &Member, now_ms: u64) -> Option<u64> {
        // Runs every lease tick: read in place, copy nothing but the voter ids.
        let voters: Vec<NodeId> = m.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let mut acked: Vec<u64> = voters
            .iter()
            .filter_map(|v| if *v == m.node_id { Some(now_ms) } else { self.liveness.acked_ms(*v) })
            .collect();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        acked.get(voters.len() / 2).copied()
    }

    /// One round of heartbeats — unless this node cannot hear the leader
    /// while a majority of voters can: then it is the one cut off (two sites
    /// and a witness, the link between them cut, the leader in the other
    /// site) and it steps out: it goes silent, so its lease lapses (its
    /// resources are fenced) and the leader, hearing of it from no one,
    /// moves its groups to a side that can work. Otherwise its groups would
    /// stay where no write can be recorded. Heard again, it steps back in.
    pub(super) async fn heartbeat_round(&self, sockets: &HeartbeatSockets) {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(m) = self.member() else { return };
        let nodes = m.state.read(|d| d.state.nodes.clone());
        let metrics = m.metrics();
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if let Some(l) = metrics.current_leader {
            self.last_leader.store(l, SeqCst);
        }
        let leader = Some(self.last_leader.load(SeqCst)).filter(|l| *l != 0);
        let cut_off = leader.is_some_and(|l| {
            let addrs = nodes.get(&l).map(|r| r.addresses.clone()).unwrap_or_default();
            self.liveness.cut_off_from(l, &addrs, &voters, m.node_id, Instant::now())
        });
        if cut_off != self.stepped_out.swap(cut_off, SeqCst) {
            match cut_off {
                true => tracing::warn!(
                    leader = ?leader,
                    "cannot hear the leader, which a majority of voters hears: stepping out (heartbeats stop, the lease lapses, groups move)"
                ),
                false => tracing::info!("stepping back in: heartbeats resume"),
            }
        }
        if !cut_off {
            sockets.send_round(&nodes, &m.cluster_id, m.node_id, &self.liveness).await;
        }
    }

    /// Whether this node holds its lease now.
    pub(super) fn in_lease(&self) -> bool {
        self.fence.lease_valid()
    }

    /// The lease timer, on its own task so that nothing the executor waits
    /// for can delay it. While a majority of voters is heard it extends the
    /// lease (and writes it down for the watchdog). A lease that ran out
    /// with something running is lost: every resource process is killed at
    /// once and the executor fences before it may start anything again.
    pub(super) async fn lease_round(&self) {
        let Some(m) = self.member() else { return };
        let now_ms = now_boot_ms();
        let current = self.fence.deadline_ms();
        if current <= now_ms {
            let running = self.fence.has_processes() || self.run.has_records();
            if running && !self.lapsed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let killed = self.fence.kill_all();
                tracing::warn!(killed, "lease ran out (no majority heard, or this agent stalled): fencing");
            }
        }
        if self.lapsed.load(std::sync::atomic::Ordering::SeqCst) {
            return; // not before the executor has fenced what it ran
        }
        let Some(heard_ms) = self.quorum_acked_ms(&m, now_ms) else { return };
        // A lapsed lease is taken again only from heartbeats sent (and
        // echoed) since.
        if current <= now_ms && heard_ms < current {
            return;
        }
        let deadline = heard_ms + self.cfg.fencing.lease_ms;
        if deadline > current {
            // Written before it is used: the watchdog never sees a lease
            // shorter than the one the agent acts on.
            match self.run.write_lease(Lease::Until(deadline)) {
                Ok(()) => self.fence.set_deadline_ms(deadline),
                Err(e) => tracing::error!("cannot write the lease: {e}"),
            }
        }
    }
}
