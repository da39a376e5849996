//! What the API shows of nodes and of this agent: views built from the
//! replicated state, Raft's metrics and this node's liveness. Reads only.

use super::*;
use tandem_http_api::types::HeartbeatsDropped;

impl Agent {
    // ---- views ----

    pub(super) fn view(&self, m: &Member, rec: &NodeRecord, metrics: &RaftMetrics, now: Instant) -> NodeView {
        let membership = metrics.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == rec.id);
        let role = match (voter, rec.witness) {
            (true, true) => Role::Witness,
            (true, false) => Role::Voter,
            (false, _) => Role::Learner,
        };
        let me = rec.id == m.node_id;
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let status = self.liveness.quorum_status(rec.id, &rec.addresses, &voters, m.node_id, now);
        let alive = me || status.alive;
        let state = match (alive, rec.admin_state) {
            (false, _) => NodeState::Offline,
            (true, AdminState::Online) => NodeState::Online,
            (true, AdminState::Standby) => NodeState::Standby,
            (true, AdminState::Maintenance) => NodeState::Maintenance,
        };
        let timeout = self.liveness.timeout();
        let paths = status
            .paths
            .iter()
            .map(|(address, since)| PathView {
                address: address.clone(),
                up: me || since.is_some_and(|s| s < timeout),
                last_seen_ms: if me { Some(0) } else { since.map(|s| s.as_millis() as u64) },
            })
            .collect();
        NodeView {
            id: rec.id,
            name: rec.name.clone(),
            role,
            state,
            admin_state: rec.admin_state,
            site: rec.site.clone(),
            addresses: rec.addresses.clone(),
            port: rec.port,
            pid: if me { Some(std::process::id()) } else { status.pid },
            version: if me { Some(VERSION.to_string()) } else { status.version },
            leader: metrics.current_leader == Some(rec.id),
            paths,
            attributes: rec.attributes.clone(),
            lease_ms_left: if me {
                Some(self.own_lease_left_ms())
            } else {
                status.heard_by_quorum_ago.map(|ago| self.cfg.fencing.lease_ms.saturating_sub(ago.as_millis() as u64))
            },
        }
    }

    pub(super) fn views(&self, m: &Member) -> (ClusterState, RaftMetrics, Vec<NodeView>) {
        let state = m.state.state();
        let metrics = m.metrics();
        let now = Instant::now();
        let views = state.nodes.values().map(|r| self.view(m, r, &metrics, now)).collect();
        (state, metrics, views)
    }

    pub(super) fn node_view(&self, m: &Member, name: &str) -> Result<NodeView, ApiError> {
        let (_, _, views) = self.views(m);
        views.into_iter().find(|v| v.name == name).ok_or_else(|| ApiError::NodeNotFound(name.to_string()))
    }

    pub(super) fn leader_name(&self, m: &Member, metrics: &RaftMetrics) -> Option<String> {
        let id = metrics.current_leader?;
        m.state.read(|d| d.state.nodes.get(&id).map(|n| n.name.clone()))
    }

    pub fn local_view(&self) -> LocalView {
        let spec = self.cfg.spec();
        let m = self.member();
        let metrics = m.as_ref().map(|m| m.metrics());
        let leader_id = metrics.as_ref().and_then(|x| x.current_leader);
        let leader_url = match (&m, leader_id, &metrics) {
            (Some(_), Some(l), Some(x)) => {
                x.membership_config.membership().get_node(&l).and_then(|p| p.urls.first().cloned())
            }
            _ => None,
        };
        LocalView {
            name: spec.name,
            node_id: m.as_ref().map(|m| m.node_id),
            cluster_id: m.as_ref().map(|m| m.cluster_id.clone()),
            addresses: spec.addresses,
            port: spec.port,
            site: spec.site,
            witness: spec.witness,
            pid: std::process::id(),
            version: VERSION.to_string(),
            leader: match (&m, &metrics) {
                (Some(m), Some(x)) => self.leader_name(m, x),
                _ => None,
            },
            leader_url,
            term: metrics.as_ref().map(|x| x.current_term),
            applied_index: metrics.as_ref().and_then(|x| x.last_applied.map(|l| l.index)),
            snapshot_index: metrics.as_ref().and_then(|x| x.snapshot.map(|l| l.index)),
            purged_index: metrics.as_ref().and_then(|x| x.purged.map(|l| l.index)),
            heartbeat_key_generation: m.as_ref().and_then(|m| {
                m.state.read(|d| (!d.state.heartbeat_keys.is_empty()).then_some(d.state.heartbeat_keys.generation))
            }),
            heartbeat_previous_key_accepted: m
                .as_ref()
                .is_some_and(|m| m.state.read(|d| d.state.heartbeat_keys.previous.is_some())),
            heartbeats_dropped: {
                let d = self.liveness.drops();
                HeartbeatsDropped {
                    forged: d.forged,
                    replayed: d.replayed,
                    stale: d.stale,
                    malformed: d.malformed,
                    unknown_key: d.unknown_key,
                    misdirected: d.misdirected,
                }
            },
        }
    }
}
