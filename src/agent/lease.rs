//! The node's lease and heartbeats: sending heartbeats (or stepping out
//! when cut off from a leader a majority hears), extending the lease from
//! heartbeats a majority echoed, and lapsing it: everything local is killed.
//! Every decision is the lease core's (`crate::lease`); this file only
//! feeds it and carries out its effects.

use super::*;
use crate::liveness::frame::KeyRing;
use crate::liveness::Identity;
use tandem_raft::events::{Event, Severity};
use tandem_raft::state::HeartbeatSecret;

/// How long the previous heartbeat key still counts after a rotation:
/// far longer than any node takes to apply the rotation, short enough
/// that a removed node's copy stops counting soon.
const RETIRE_PREVIOUS_KEY_AFTER: Duration = Duration::from_secs(10);

impl Agent {
    /// Every voter with the send time (our clock) of the newest heartbeat
    /// of ours it echoed back (this node's own entry is left to the core,
    /// which counts it as now).
    fn voter_echoes(&self, m: &Member) -> Vec<(NodeId, Option<u64>)> {
        // Runs every lease tick: read in place, copy nothing but the voter ids.
        let voters: Vec<NodeId> = m.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.into_iter().map(|v| (v, if v == m.node_id { None } else { self.liveness.acked_ms(v) })).collect()
    }

    /// One round of heartbeats — unless this node cannot hear the leader
    /// while a majority of voters can: then it is the one cut off (two sites
    /// and a witness, the link between them cut, the leader in the other
    /// site) and it steps out: it goes silent, so its lease lapses (its
    /// resources are killed) and the leader, hearing of it from no one,
    /// moves its groups to a side that can work. Otherwise its groups would
    /// stay where no write can be recorded. Heard again, it steps back in.
    /// The lease core decides; this sends.
    pub(super) async fn heartbeat_round(&self, sockets: &HeartbeatSockets) {
        let Some(m) = self.member() else { return };
        let (nodes, keys) = m.state.read(|d| (d.state.nodes.clone(), KeyRing::from_state(&d.state.heartbeat_keys)));
        let metrics = m.metrics();
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let leader = self.lease_core().leader_to_watch(metrics.current_leader);
        let cut_off = leader.is_some_and(|l| {
            let addrs = nodes.get(&l).map(|r| r.addresses.clone()).unwrap_or_default();
            self.liveness.cut_off_from(l, &addrs, &voters, m.node_id, self.cfg.heartbeat_interval() * 2, Instant::now())
        });
        let effects = self.lease_core().heartbeat_round(metrics.current_leader, cut_off);
        let key = keys.as_ref().map(|k| &k.current);
        if key.is_some() && !effects.contains(&crate::lease::Effect::SendHeartbeats) {
            // Stepped out: probes only, which are never heard but let this
            // node hear the others again (see `Liveness::probe_to`).
            sockets.send_round(&nodes, &m.cluster_id, m.node_id, &self.liveness, key, true).await;
        }
        for e in effects {
            match e {
                crate::lease::Effect::StepOut { leader } => {
                    tracing::warn!(
                        leader,
                        "cannot hear the leader, which a majority of voters hears: stepping out (heartbeats stop, the lease lapses, groups move)"
                    );
                    self.emit(Event::new(
                        0,
                        "node.stepped_out",
                        Severity::Warning,
                        format!("{} cannot hear the leader a majority hears: stepping out", self.cfg.name),
                    ));
                }
                crate::lease::Effect::StepIn => {
                    tracing::info!("stepping back in: heartbeats resume");
                    self.emit(Event::new(
                        0,
                        "node.stepped_in",
                        Severity::Info,
                        format!("{} hears the leader again: stepping back in", self.cfg.name),
                    ));
                }
                crate::lease::Effect::SendHeartbeats => {
                    sockets.send_round(&nodes, &m.cluster_id, m.node_id, &self.liveness, key, false).await
                }
                _ => {}
            }
        }
    }

    /// Who this node is to the heartbeat receivers: None until it is a
    /// member; the keys are those of the state it has applied.
    pub fn heartbeat_identity(&self) -> Option<Identity> {
        let m = self.member()?;
        let keys = m.state.read(|d| KeyRing::from_state(&d.state.heartbeat_keys));
        let stepped_out = self.lease_core().stepped_out();
        Some(Identity { cluster_id: m.cluster_id.clone(), me: m.node_id, keys, stepped_out })
    }

    /// On the leader of a cluster whose state has no heartbeat key (it was
    /// bootstrapped by an older version): proposes one once every other
    /// node is heard running a version that seals heartbeats — before
    /// that, a node of the older version would stop hearing and being
    /// heard. Returns whether it proposed.
    pub(super) async fn give_heartbeat_key(&self, m: &Member, state: &ClusterState) -> Result<bool, ApiError> {
        if !state.heartbeat_keys.is_empty() {
            return Ok(false);
        }
        let others = state.nodes.keys().copied().filter(|id| *id != m.node_id);
        if !self.liveness.all_authenticate(others, Instant::now()) {
            return Ok(false);
        }
        tracing::info!("the cluster has no heartbeat key: giving it one (heartbeats are sealed from now on)");
        self.propose(m, Command::RotateHeartbeatKey { key: new_heartbeat_key()? }).await?;
        Ok(true)
    }

    /// On the leader, after a rotation: once the previous key has been
    /// accepted for [`RETIRE_PREVIOUS_KEY_AFTER`] (as this node saw it; a
    /// new leader starts counting again), proposes to stop accepting it,
    /// so that a removed node's copy of the key stops counting. Returns
    /// whether it proposed.
    pub(super) async fn retire_heartbeat_key(&self, m: &Member, state: &ClusterState) -> Result<bool, ApiError> {
        let keys = &state.heartbeat_keys;
        let now = Instant::now();
        let due = {
            let mut seen = self.previous_heartbeat_key.lock().unwrap_or_else(|e| e.into_inner());
            if keys.previous.is_none() {
                *seen = None;
                return Ok(false);
            }
            match *seen {
                Some((generation, since)) if generation == keys.generation => {
                    now.saturating_duration_since(since) >= RETIRE_PREVIOUS_KEY_AFTER
                }
                _ => {
                    *seen = Some((keys.generation, now));
                    false
                }
            }
        };
        if !due {
            return Ok(false);
        }
        tracing::info!(generation = keys.generation, "heartbeats sealed with the previous key no longer count");
        self.propose(m, Command::RetireHeartbeatKey { generation: keys.generation }).await?;
        Ok(true)
    }

    /// A new heartbeat key (after a node is removed: it knew the old one).
    pub(super) async fn rotate_heartbeat_key(&self, m: &Member) -> Result<(), ApiError> {
        self.propose(m, Command::RotateHeartbeatKey { key: new_heartbeat_key()? }).await?;
        Ok(())
    }

    /// The lease as the reconciler sees it now.
    pub(super) fn lease_view(&self) -> LeaseView {
        let lease = self.lease_core();
        LeaseView { held: lease.holds(now_boot_ms()), lapsed: lease.lapsed() }
    }

    /// The lease timer, on its own task so that nothing the executor waits
    /// for can delay it. While a majority of voters is heard it extends the
    /// lease (and writes it down for the watchdog). A lease that ran out
    /// with something running lapses: every resource process is killed at
    /// once, and the lease is not taken again before the executor has
    /// killed and stopped everything (see `executor_round`). The lease core
    /// decides; this kills and writes.
    pub(super) async fn lease_round(&self) {
        let Some(m) = self.member() else { return };
        if self.superseded_pending() {
            return;
        }
        let voters = self.voter_echoes(&m);
        let now_ms = now_boot_ms();
        // Looked at (a directory read) only once the lease has run out.
        let holds = self.lease_core().holds(now_ms);
        let running = !holds && (self.guard.has_processes() || self.run.has_records());
        let tick = crate::lease::Tick { now_ms, me: m.node_id, voters: &voters, running };
        let effects = self.lease_core().tick(tick);
        for e in effects {
            match e {
                crate::lease::Effect::KillEverything => {
                    let killed = self.guard.kill_everything();
                    tracing::warn!(
                        killed,
                        "the lease lapsed (no majority heard, or this agent stalled): killing everything here"
                    );
                    self.emit(
                        Event::new(
                            0,
                            "lease.lapsed",
                            Severity::Critical,
                            format!("the lease of {} lapsed: {killed} resource processes killed", self.cfg.name),
                        )
                        .details(serde_json::json!({"killed": killed})),
                    );
                }
                crate::lease::Effect::PersistLease { deadline_ms } => {
                    // Written before it is used: the watchdog never sees a
                    // lease shorter than the one the agent acts on.
                    match self.run.write_lease(Lease::Until(deadline_ms)) {
                        Ok(()) => {
                            let mut lease = self.lease_core();
                            lease.persisted(deadline_ms);
                            self.guard.set_deadline_ms(lease.deadline_ms());
                        }
                        Err(e) => tracing::error!("cannot write the lease: {e}"),
                    }
                }
                _ => {}
            }
        }
    }
}

/// A new heartbeat key, 32 bytes from the OS's random source. Drawn by the
/// proposer: the state machine that applies it draws nothing.
pub(super) fn new_heartbeat_key() -> Result<HeartbeatSecret, ApiError> {
    let mut bytes = [0u8; HeartbeatSecret::LEN];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::Internal(format!("cannot draw a heartbeat key: {e}")))?;
    Ok(HeartbeatSecret::from_bytes(&bytes))
}
