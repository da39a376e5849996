//! Quorum-loss recovery, the pure part: where each group would run once the
//! survivor is the cluster's only voter and every other node is taken for
//! gone (the scheduler's own decision, with only the survivor alive), and
//! which volumes would have no up-to-date replica left. No I/O: the agent
//! (`agent/recovery.rs`) probes, rewrites the log and restarts Raft.

use tandem_http_api::RecoverGroup;
use tandem_raft::group::Phase;
use tandem_raft::state::{ClusterState, NodeId};
use tandem_raft::volume::DiskState;

use crate::scheduler::{NodeInfo, Scheduler};

/// Each group's placement now and with only `survivor` up; and the volumes
/// whose every up-to-date replica is on another node.
pub fn plan(state: &ClusterState, survivor: NodeId, minute_of_day: u16) -> (Vec<RecoverGroup>, Vec<String>) {
    let nodes: Vec<NodeInfo> = state
        .nodes
        .values()
        // Every other node gone for good: the operator says so by recovering.
        .map(|r| NodeInfo::of(r, r.id == survivor, r.id != survivor))
        .collect();
    let name = |id: Option<NodeId>| id.and_then(|i| state.nodes.get(&i)).map(|n| n.name.clone());
    let decisions = Scheduler::new(&nodes, &state.groups, minute_of_day).decide();
    let groups = state
        .groups
        .values()
        .map(|g| {
            let now = (g.placement.phase != Phase::Stopped).then(|| name(g.placement.node)).flatten();
            match decisions.iter().find(|d| d.group == g.name) {
                Some(d) => RecoverGroup {
                    group: g.name.clone(),
                    node: now,
                    would_run_on: (d.phase == Phase::Started).then(|| name(d.node)).flatten(),
                    reason: d.reason.clone(),
                },
                None => {
                    let stays = g.placement.phase == Phase::Started && g.placement.node == Some(survivor);
                    RecoverGroup {
                        group: g.name.clone(),
                        would_run_on: if stays { now.clone() } else { None },
                        node: now,
                        reason: g.placement.reason.clone(),
                    }
                }
            }
        })
        .collect();
    let survivor_name = name(Some(survivor)).unwrap_or_default();
    let stranded = state
        .groups
        .values()
        .filter_map(|g| g.spec.volume().map(|(r, _)| (g, r.name.clone())))
        .filter(|(g, v)| g.disk(v, &survivor_name) != Some(DiskState::UpToDate))
        .map(|(_, v)| v)
        .collect();
    (groups, stranded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft::state::{Command, NodeSpec};

    #[test]
    fn groups_go_to_the_survivor_when_they_may_and_a_volume_without_its_replica_is_named() {
        let mut s = ClusterState::default();
        let spec = |name: &str, port: u16| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port,
            site: None,
            witness: false,
        };
        s.apply(&Command::Bootstrap {
            cluster_id: "c".into(),
            node_id: 1,
            node: spec("n1", 7401),
            heartbeat_key: None,
        })
        .unwrap();
        for (n, p) in [("n2", 7402), ("n3", 7403)] {
            s.apply(&Command::AddNode { node: spec(n, p) }).unwrap();
        }
        let group = |nodes: &[&str], volume: bool| {
            let mut resources = vec![serde_json::json!({"name": "p", "type": "process", "command": ["/bin/true"]})];
            if volume {
                resources.insert(0, serde_json::json!({"name": "data", "type": "volume", "size": "1MiB"}));
            }
            serde_json::from_value(serde_json::json!({"nodes": nodes, "resources": resources})).unwrap()
        };
        for (name, nodes, volume) in
            [("web", &["n1", "n2"][..], false), ("only1", &["n1"][..], false), ("db", &["n1", "n2"][..], true)]
        {
            s.apply(&Command::PutGroup { name: name.into(), spec: group(nodes, volume) }).unwrap();
            let place = Command::SetPlacement {
                name: name.into(),
                expected_epoch: 0,
                node: Some(1),
                phase: Phase::Started,
                reason: "placed".into(),
            };
            s.apply(&place).unwrap();
        }
        // db's replica on n2 is outdated: n2 cannot take it.
        for (node, disk) in [("n1", DiskState::UpToDate), ("n2", DiskState::Outdated)] {
            s.apply(&Command::SetReplicaDisk { volume: "data".into(), node: node.into(), disk, epoch: 1, replaced: 0 })
                .unwrap();
        }
        let (groups, stranded) = plan(&s, 2, 0);
        let by = |g: &str| groups.iter().find(|r| r.group == g).cloned().unwrap();
        assert_eq!((by("web").node.as_deref(), by("web").would_run_on.as_deref()), (Some("n1"), Some("n2")));
        assert_eq!(by("only1").would_run_on, None);
        assert_eq!(by("db").would_run_on, None, "{:?}", by("db"));
        assert_eq!(stranded, vec!["data".to_string()]);
    }
}
