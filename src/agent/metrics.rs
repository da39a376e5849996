//! `GET /metrics` on this node: gathers a [`crate::metrics::Snapshot`] from
//! what the agent already holds (Raft's metrics, the applied state, the
//! liveness view, the lease, the executor, the volumes) when scraped, and
//! watches for what a snapshot cannot see afterwards (leader changes and
//! failovers). Rendering is `crate::metrics`'s; this file only reads.

use super::*;

use crate::metrics::{GroupSample, PeerSample, RaftSample, ReplicaSample, ResourceSample, Snapshot, VolumeSample};

/// How long a scrape waits for the executor (busy starting a resource) before
/// it shows no resources this time.
const EXECUTOR_WAIT: Duration = Duration::from_millis(200);

impl Agent {
    /// The text a scrape gets.
    pub(super) async fn render_metrics(&self) -> String {
        let snapshot = self.metrics_snapshot().await;
        crate::metrics::render(&snapshot, &self.counters)
    }

    async fn metrics_snapshot(&self) -> Snapshot {
        let mut s = Snapshot { node: self.cfg.name.clone(), ..Default::default() };
        let d = self.liveness.drops();
        s.heartbeats_dropped = vec![
            ("forged", d.forged),
            ("replayed", d.replayed),
            ("stale", d.stale),
            ("malformed", d.malformed),
            ("unknown_key", d.unknown_key),
            ("misdirected", d.misdirected),
        ];
        s.lease_left_s = self.own_lease_left_ms() as f64 / 1000.0;
        s.replicas = self.replica_samples();
        s.volumes = self.volume_samples();
        let Some(m) = self.member() else { return s };
        let metrics = m.metrics();
        let membership = metrics.membership_config.membership();
        let now = Instant::now();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let voters_heard = voters
            .iter()
            .filter(|&&v| {
                v == m.node_id
                    || self
                        .liveness
                        .last_heard(v)
                        .is_some_and(|t| now.saturating_duration_since(t) < self.liveness.timeout())
            })
            .count();
        s.raft = Some(RaftSample {
            voters: voters.len() as u64,
            voters_heard: voters_heard as u64,
            is_leader: metrics.current_leader == Some(m.node_id),
            has_leader: metrics.current_leader.is_some(),
            voter: membership.voter_ids().any(|v| v == m.node_id),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed_index: self.db.stats().committed_index().unwrap_or(0),
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            quorum_ack_ms: metrics.millis_since_quorum_ack,
        });
        let state = m.state.state();
        s.peers = state
            .nodes
            .values()
            .filter(|n| n.id != m.node_id)
            .map(|n| {
                let st = self.liveness.status(n.id, &n.addresses, now);
                let timeout = self.liveness.timeout();
                PeerSample {
                    peer: n.name.clone(),
                    up: st.alive,
                    paths: st.paths.iter().map(|(a, since)| (a.clone(), since.is_some_and(|t| t < timeout))).collect(),
                    round_trip_s: self.liveness.round_trip(n.id).map(|d| d.as_secs_f64()),
                }
            })
            .collect();
        let local = match tokio::time::timeout(EXECUTOR_WAIT, self.executor.lock()).await {
            Ok(ex) => ex.as_ref().map(|e| e.statuses()).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        s.groups = state
            .groups
            .values()
            .map(|g| GroupSample {
                group: g.name.clone(),
                state: g.state_name(),
                epoch: g.placement.epoch,
                here: g.placement.node == Some(m.node_id),
                restarts: local.iter().find(|(n, ..)| *n == g.name).map(|(_, _, r, _)| *r),
            })
            .collect();
        s.resources = local
            .into_iter()
            .flat_map(|(group, _, _, resources)| {
                resources.into_iter().map(move |r| ResourceSample {
                    group: group.clone(),
                    resource: r.name,
                    kind: r.kind,
                    state: r.state,
                    failed: r.last_error.is_some(),
                })
            })
            .collect();
        s
    }

    /// Every replica this node's data plane reports on.
    fn replica_samples(&self) -> Vec<ReplicaSample> {
        let mut out = Vec::new();
        for name in self.volumes.names() {
            let Ok(st) = self.volumes.status(&name) else { continue };
            let v: tandem_http_api::LocalVolumeStatus = st.into();
            for r in v.replicas {
                out.push(ReplicaSample {
                    volume: v.name.clone(),
                    replica: r.node,
                    role: r.role,
                    disk: r.disk,
                    connection: serde_json::to_value(r.connection)
                        .ok()
                        .and_then(|c| c.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    out_of_sync_bytes: r.out_of_sync_bytes,
                    resync_bytes_per_s: r.resync.as_ref().map(|p| p.rate_bytes_per_s),
                    resync_remaining_bytes: r.resync.as_ref().map(|p| p.remaining_bytes),
                    lag_bytes: r.lag_bytes,
                    reads: (v.role == "primary").then_some(r.reads),
                });
            }
        }
        out
    }

    /// Every volume this node's data plane is primary for.
    fn volume_samples(&self) -> Vec<VolumeSample> {
        self.volumes
            .names()
            .into_iter()
            .filter_map(|name| {
                let v: tandem_http_api::LocalVolumeStatus = self.volumes.status(&name).ok()?.into();
                (v.role == "primary").then_some(VolumeSample {
                    volume: v.name,
                    read_errors: v.read_errors,
                    repaired_blocks: v.repaired_blocks,
                })
            })
            .collect()
    }

    /// Watches this member's Raft for leader changes and its applied state
    /// for failovers, until Raft stops. Both wake only on a change.
    pub(super) fn watch_for_metrics(&self, m: &Member) {
        let mut server = m.raft.server_metrics();
        let mut applied = m.state.subscribe();
        let state = m.state.clone();
        let counters = self.counters.clone();
        let liveness = self.liveness.clone();
        tokio::spawn(async move {
            let mut leader = server.borrow_and_update().current_leader;
            let mut before = crate::metrics::placements(&state.state());
            loop {
                tokio::select! {
                    r = server.changed() => {
                        if r.is_err() {
                            return; // Raft stopped.
                        }
                        let now = server.borrow_and_update().current_leader;
                        if now != leader {
                            leader = now;
                            counters.leader_changes.inc();
                        }
                    }
                    r = applied.changed() => {
                        if r.is_err() {
                            return;
                        }
                        applied.borrow_and_update();
                        let after = state.read(|d| crate::metrics::placements(&d.state));
                        let now = Instant::now();
                        for f in crate::metrics::failovers(&before, &after) {
                            let outage = liveness.last_heard(f.from).map(|t| now.saturating_duration_since(t).as_secs_f64());
                            counters.count_failover(&f.group, outage);
                        }
                        before = after;
                    }
                }
            }
        });
    }
}
