//! Sites as a unit: what a site switchover has done so far to the groups
//! that ran in the site, read from the replicated state and the event log.
//! Pure: the agent (`agent/sites.rs`) proposes the standby, polls, and calls
//! [`progress`] with what it read; nothing here waits, asks or writes.

use std::collections::BTreeSet;

use tandem_http_api::{SiteGroupReport, VolumeView};
use tandem_raft::events::Event;
use tandem_raft::group::{replica_nodes, GroupRecord, Phase};
use tandem_raft::state::{ClusterState, NodeId};

/// A group that ran in the site when the switchover began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaving {
    pub group: String,
    pub from: String,
    pub volume: Option<String>,
    /// Whether any node outside the site may run it (in its `nodes`, and
    /// holding a replica when it has a volume).
    pub may_leave: bool,
    /// The bytes each possible new primary lacked before the move.
    pub rpo: Vec<(String, u64)>,
}

/// The nodes of `site`, by name.
pub fn site_nodes(state: &ClusterState, site: &str) -> BTreeSet<String> {
    state.nodes.values().filter(|n| n.site.as_deref() == Some(site)).map(|n| n.name.clone()).collect()
}

fn node_name(state: &ClusterState, id: NodeId) -> Option<String> {
    state.nodes.get(&id).map(|n| n.name.clone())
}

/// The groups placed on a node of the site (running or starting there).
pub fn leaving(state: &ClusterState, site: &BTreeSet<String>) -> Vec<Leaving> {
    state
        .groups
        .values()
        .filter_map(|g| {
            let from = g.placement.node.and_then(|id| node_name(state, id))?;
            (g.placement.phase != Phase::Stopped && site.contains(&from)).then(|| Leaving {
                group: g.name.clone(),
                from,
                volume: g.spec.volume().map(|(r, _)| r.name.clone()),
                may_leave: may_leave(g, site),
                rpo: Vec::new(),
            })
        })
        .collect()
}

fn may_leave(g: &GroupRecord, site: &BTreeSet<String>) -> bool {
    let candidates = if g.spec.volume().is_some() { replica_nodes(&g.spec) } else { g.spec.nodes.clone() };
    candidates.iter().any(|n| !site.contains(n))
}

/// What each replica lacked, from the volume's view before the move: 0 for
/// a connected, up-to-date sync secondary (it has every acknowledged
/// write); otherwise its out-of-sync bytes plus, for an async one, its lag.
pub fn rpo_by_replica(view: &VolumeView) -> Vec<(String, u64)> {
    view.replicas
        .iter()
        .filter(|r| r.role != "primary")
        .map(|r| {
            let lag = r.lag_bytes.unwrap_or(0);
            (r.node.clone(), r.out_of_sync_bytes.saturating_add(lag))
        })
        .collect()
}

/// Where each leaving group is now; `true` when every one is settled:
/// running outside the site with its start event recorded, stopped because
/// it may not leave, or failed.
pub fn progress(
    state: &ClusterState,
    site: &BTreeSet<String>,
    leaving: &[Leaving],
    events: &[Event],
) -> (Vec<SiteGroupReport>, bool) {
    let mut settled = true;
    let reports = leaving
        .iter()
        .map(|l| {
            let g = state.groups.get(&l.group);
            let on = g.and_then(|g| g.placement.node).and_then(|id| node_name(state, id));
            let phase = g.map(|g| g.placement.phase);
            let started = phase == Some(Phase::Started);
            let running_event = events
                .iter()
                .rev()
                .find(|e| e.kind == "group.running" && e.group.as_deref() == Some(l.group.as_str()) && e.node == on);
            let outside = on.as_ref().is_some_and(|n| !site.contains(n));
            let result = match (g, on.as_ref()) {
                (None, _) => "stopped",
                (Some(g), _) if g.state_name() == "failed" => "failed",
                (Some(_), Some(_)) if started && outside && running_event.is_some() => "moved",
                (Some(_), None) if !l.may_leave && phase == Some(Phase::Stopped) => "stopped",
                _ => "moving",
            };
            settled &= result != "moving";
            let rpo_bytes = match (&l.volume, on.as_ref(), result) {
                (Some(_), Some(to), "moved") => l.rpo.iter().find(|(n, _)| n == to).map(|(_, b)| *b),
                _ => None,
            };
            SiteGroupReport {
                group: l.group.clone(),
                from: l.from.clone(),
                to: if started { on.clone() } else { None },
                result: result.to_string(),
                outage_ms: if result == "moved" {
                    running_event.and_then(|e| e.details["outage_ms"].as_u64())
                } else {
                    None
                },
                volume: l.volume.clone(),
                rpo_bytes,
                reason: match (g, l.may_leave) {
                    (_, false) => {
                        format!("no node outside the site may run it ({})", g.map_or("", |g| &g.placement.reason))
                    }
                    (Some(g), true) => g.placement.reason.clone(),
                    (None, true) => "deleted".to_string(),
                },
            }
        })
        .collect();
    (reports, settled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft::events::Severity;
    use tandem_raft::state::{AdminState, Command, NodeSpec};

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let spec = |name: &str, site: &str, port: u16| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port,
            site: Some(site.into()),
            witness: false,
        };
        s.apply(&Command::Bootstrap {
            cluster_id: "c".into(),
            node_id: 1,
            node: spec("a1", "dc1", 7401),
            heartbeat_key: None,
        })
        .unwrap();
        s.apply(&Command::AddNode { node: spec("b1", "dc2", 7402) }).unwrap();
        for (name, nodes) in [("web", vec!["a1", "b1"]), ("local", vec!["a1"])] {
            let spec = serde_json::from_value(serde_json::json!({
                "nodes": nodes, "resources": [{"name": "p", "type": "process", "command": ["/bin/sleep", "100"]}]
            }))
            .unwrap();
            s.apply(&Command::PutGroup { name: name.into(), spec }).unwrap();
            s.apply(&Command::SetPlacement {
                name: name.into(),
                expected_epoch: 0,
                node: Some(1),
                phase: Phase::Started,
                reason: "placed".into(),
            })
            .unwrap();
        }
        s
    }

    fn running(group: &str, node: &str, outage_ms: u64) -> Event {
        Event::new(0, "group.running", Severity::Info, "up")
            .group(group)
            .node(node)
            .details(serde_json::json!({"outage_ms": outage_ms}))
    }

    #[test]
    fn a_group_is_moved_once_it_runs_outside_the_site_and_its_start_is_recorded() {
        let mut s = cluster();
        let site = site_nodes(&s, "dc1");
        let leaving = leaving(&s, &site);
        assert_eq!(
            leaving.iter().map(|l| (l.group.as_str(), l.may_leave)).collect::<Vec<_>>(),
            [("local", false), ("web", true)]
        );
        s.apply(&Command::SetSiteAdminState { site: "dc1".into(), state: AdminState::Standby }).unwrap();
        let (r, settled) = progress(&s, &site, &leaving, &[]);
        assert!(!settled);
        assert!(r.iter().all(|g| g.result == "moving"), "{r:?}");

        for (name, node, phase) in [("web", Some(2), Phase::Started), ("local", None, Phase::Stopped)] {
            s.apply(&Command::SetPlacement {
                name: name.into(),
                expected_epoch: 1,
                node,
                phase,
                reason: "standby".into(),
            })
            .unwrap();
        }
        // Placed on b1 but not yet running there: still moving.
        let (r, settled) = progress(&s, &site, &leaving, &[running("web", "a1", 5)]);
        assert!(!settled);
        assert_eq!((r[0].result.as_str(), r[1].result.as_str()), ("stopped", "moving"));
        let (r, settled) = progress(&s, &site, &leaving, &[running("web", "b1", 420)]);
        assert!(settled);
        assert_eq!(r[1].result, "moved");
        assert_eq!((r[1].to.as_deref(), r[1].outage_ms), (Some("b1"), Some(420)));
        assert!(r[0].reason.contains("no node outside the site"), "{}", r[0].reason);
    }
}
