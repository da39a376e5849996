//! Forced promotion of a volume: which replicas an operator could take
//! when no `UpToDate` one is online, and what taking each gives up (the
//! RPO), before anything is done.
//!
//! Pure: the agent (`agent/promote.rs`) gathers liveness and each replica's
//! own report (generation, newest write), calls [`report`], and proposes
//! `PromoteReplica` for a candidate this module found no refusal for. It
//! never asks a node, waits, writes, or reads a clock.

use std::collections::{BTreeMap, BTreeSet};

use tandem_http_api::{PromoteCandidate, PromoteReport};
use tandem_raft::group::{replica_nodes, GroupRecord, Phase};
use tandem_raft::state::ClusterState;
use tandem_raft::volume::{DiskState, PromotionRpo, SplitBrainPolicy};

/// What a replica's own node says of it (`GET /internal/volumes/{name}/local`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFacts {
    pub generation: String,
    pub newest_write_ms: Option<u64>,
}

/// Each candidate replica of `volume` with what promoting it gives up, and
/// why it may not be promoted now. `online`: the nodes a majority hears;
/// `facts`: what each online replica's node answered (or why it did not).
/// `None` when no group has that volume.
pub fn report(
    state: &ClusterState,
    volume: &str,
    online: &BTreeSet<String>,
    facts: &BTreeMap<String, Result<ReplicaFacts, String>>,
    now_ms: u64,
) -> Option<PromoteReport> {
    let (g, _) = state.volume_owner(volume)?;
    let spec = g.spec.volume().map(|(_, v)| v.clone())?;
    let replicas = replica_nodes(&g.spec);
    let disk = |n: &str| g.disk(volume, n).unwrap_or(DiskState::Diskless);
    let up_online = replicas.iter().find(|n| disk(n) == DiskState::UpToDate && online.contains(*n));
    let outdated: Vec<String> = replicas.iter().filter(|n| disk(n) == DiskState::UpToDate).cloned().collect();
    let placed = placed_on(state, g);
    let candidates = replicas
        .iter()
        .map(|node| {
            let d = disk(node);
            let recorded = g.replica_out_of_sync.get(volume).and_then(|m| m.get(node));
            let fact = facts.get(node);
            let ok = fact.and_then(|f| f.as_ref().ok());
            let refused = if let Some((state_name, on)) = &placed {
                Some(format!("group {} is {state_name} on {on}: a serving primary is never replaced by force", g.name))
            } else if let Some(up) = up_online {
                Some(format!("{up}'s replica is UpToDate and {up} is online: the group starts there without forcing"))
            } else if d == DiskState::UpToDate {
                Some(format!("its replica is already UpToDate: the group starts on {node} once it is online"))
            } else if d != DiskState::Outdated {
                Some(format!("its replica is {d}: it holds no consistent copy of the data"))
            } else if !online.contains(node) {
                Some(format!("{node} is offline: bring it back first (the group could not start there)"))
            } else {
                match fact {
                    Some(Err(e)) => Some(format!("{node} did not report its replica: {e}")),
                    None => Some(format!("{node} did not report its replica")),
                    Some(Ok(_)) => None,
                }
            };
            let newest = ok.and_then(|f| f.newest_write_ms);
            PromoteCandidate {
                node: node.clone(),
                disk: d.to_string(),
                online: online.contains(node),
                out_of_sync_bytes: recorded.map(|r| r.bytes).unwrap_or(0),
                out_of_sync_recorded_ms: recorded.map(|r| r.at_ms),
                newest_write_ms: newest,
                newest_write_age_ms: newest.map(|t| now_ms.saturating_sub(t)),
                generation: ok.map(|f| f.generation.clone()),
                refused,
            }
        })
        .collect();
    Some(PromoteReport {
        volume: volume.to_string(),
        group: g.name.clone(),
        dry_run: true,
        node: None,
        candidates,
        newer_data: newer_data(spec.split_brain, &outdated),
        split_brain_policy: policy_name(spec.split_brain),
        outdated,
    })
}

/// The figures a promotion of `c` records in its event.
pub fn rpo(c: &PromoteCandidate) -> PromotionRpo {
    PromotionRpo {
        out_of_sync_bytes: c.out_of_sync_bytes,
        recorded_ms: c.out_of_sync_recorded_ms,
        newest_write_ms: c.newest_write_ms,
        generation: c.generation.clone(),
    }
}

/// Where the group is placed, and its state's name, unless it is stopped.
fn placed_on(state: &ClusterState, g: &GroupRecord) -> Option<(&'static str, String)> {
    if g.placement.phase == Phase::Stopped {
        return None;
    }
    let on = g.placement.node.and_then(|id| state.nodes.get(&id)).map(|n| n.name.clone());
    Some((g.state_name(), on.unwrap_or_else(|| "a node".into())))
}

fn policy_name(p: SplitBrainPolicy) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// What becomes of the newer data of the replicas that were `UpToDate`
/// when they come back, under the volume's split-brain policy (see
/// `crate::volume::generation`: a serving primary is never the one
/// overwritten, so a policy that names it leaves both sides disconnected).
fn newer_data(policy: SplitBrainPolicy, outdated: &[String]) -> String {
    if outdated.is_empty() {
        return "No other replica is recorded UpToDate: none holds acknowledged writes this one lacks, as far as the cluster knows."
            .into();
    }
    let who = outdated.join(", ");
    let kept = format!(
        "{who} kept {they} newer writes: when {who} comes back, both sides have changed since they parted (a split brain). \
         Policy {}: ",
        policy_name(policy),
        they = if outdated.len() == 1 { "its" } else { "their" },
    );
    let what = match policy {
        SplitBrainPolicy::Disconnect
        | SplitBrainPolicy::DiscardYoungerPrimary
        | SplitBrainPolicy::DiscardLocal
        | SplitBrainPolicy::DiscardZeroChanges => {
            "nothing is overwritten; the replicas stay disconnected (volume.split_brain) until an operator chooses the side to discard (POST /v1/volumes/{name}/resolve)."
        }
        SplitBrainPolicy::DiscardOlderPrimary | SplitBrainPolicy::DiscardRemote => {
            "the returning replica's newer writes are discarded and it is resynced from the new primary."
        }
        SplitBrainPolicy::DiscardLeastChanges => {
            "the returning replica's newer writes are discarded if it changed fewer blocks than the new primary has since; otherwise the replicas stay disconnected until an operator chooses."
        }
    };
    kept + what
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft::state::{Command, NodeSpec};

    /// n1, n2, n3; group `db` with volume `data` on n1 and n2, ran on n1,
    /// which recorded n2 Outdated with 64 KiB out of sync, then stopped.
    fn state(policy: &str) -> ClusterState {
        let node = |name: &str| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port: 7400,
            site: None,
            witness: false,
        };
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap { cluster_id: "c".into(), node_id: 1, node: node("n1"), heartbeat_key: None })
            .unwrap();
        for (i, n) in ["n2", "n3"].into_iter().enumerate() {
            s.apply(&Command::AddNode { node: NodeSpec { port: 7410 + i as u16, ..node(n) } }).unwrap();
        }
        let spec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "data", "type": "volume", "size": "1GiB", "split_brain": policy}],
            "nodes": ["n1", "n2", "n3"]
        }))
        .unwrap();
        s.apply(&Command::PutGroup { name: "db".into(), spec }).unwrap();
        let place = |s: &mut ClusterState, node: Option<u64>| {
            let e = s.groups["db"].placement.epoch;
            let phase = if node.is_some() { Phase::Started } else { Phase::Stopped };
            s.apply(&Command::SetPlacement { name: "db".into(), expected_epoch: e, node, phase, reason: "t".into() })
                .unwrap();
        };
        place(&mut s, Some(1));
        s.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "n2".into(),
            disk: DiskState::Outdated,
            epoch: 1,
            replaced: 0,
        })
        .unwrap();
        s.apply(&Command::RecordOutOfSync {
            volume: "data".into(),
            epoch: 1,
            bytes: BTreeMap::from([("n2".to_string(), 65536)]),
            at_ms: 1_000,
        })
        .unwrap();
        place(&mut s, None);
        s
    }

    fn online(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn facts(newest: u64) -> BTreeMap<String, Result<ReplicaFacts, String>> {
        BTreeMap::from([(
            "n2".to_string(),
            Ok(ReplicaFacts { generation: "00ab".into(), newest_write_ms: Some(newest) }),
        )])
    }

    #[test]
    fn the_outdated_replica_is_the_candidate_with_what_it_lacks() {
        let s = state("disconnect");
        let r = report(&s, "data", &online(&["n2", "n3"]), &facts(400), 2_000).unwrap();
        assert_eq!((r.volume.as_str(), r.group.as_str(), r.outdated.clone()), ("data", "db", vec!["n1".to_string()]));
        let by: BTreeMap<&str, &PromoteCandidate> = r.candidates.iter().map(|c| (c.node.as_str(), c)).collect();
        assert_eq!(by.keys().copied().collect::<Vec<_>>(), ["n1", "n2"]);
        let n2 = by["n2"];
        assert_eq!(n2.refused, None);
        assert_eq!((n2.out_of_sync_bytes, n2.out_of_sync_recorded_ms), (65536, Some(1_000)));
        assert_eq!((n2.newest_write_ms, n2.newest_write_age_ms), (Some(400), Some(1_600)));
        assert_eq!(n2.generation.as_deref(), Some("00ab"));
        assert!(by["n1"].refused.as_deref().is_some_and(|r| r.contains("already UpToDate")), "{:?}", by["n1"]);
        assert!(r.newer_data.contains("n1 kept its newer writes") && r.newer_data.contains("nothing is overwritten"));
        assert_eq!(rpo(n2).out_of_sync_bytes, 65536);
    }

    #[test]
    fn every_reason_to_refuse_is_named() {
        let s = state("disconnect");
        let refusal = |s: &ClusterState, on: &[&str], f: BTreeMap<String, Result<ReplicaFacts, String>>| {
            let r = report(s, "data", &online(on), &f, 2_000).unwrap();
            r.candidates.into_iter().find(|c| c.node == "n2").unwrap().refused.unwrap_or_default()
        };
        // The UpToDate replica's node is online: no forcing.
        assert!(refusal(&s, &["n1", "n2"], facts(1)).contains("n1 is online"));
        // n2 offline, or not answering.
        assert!(refusal(&s, &["n3"], facts(1)).contains("n2 is offline"));
        let err = BTreeMap::from([("n2".to_string(), Err("timed out".to_string()))]);
        assert!(refusal(&s, &["n2"], err).contains("did not report its replica: timed out"));
        assert!(refusal(&s, &["n2"], BTreeMap::new()).contains("did not report"));
        // The group runs (or starts) somewhere.
        let mut running = s.clone();
        running.groups.get_mut("db").unwrap().placement.phase = Phase::Started;
        running.groups.get_mut("db").unwrap().placement.node = Some(3);
        assert!(refusal(&running, &["n2"], facts(1)).contains("running on n3"));
        // An Inconsistent replica holds nothing consistent.
        let mut inc = s.clone();
        inc.groups
            .get_mut("db")
            .unwrap()
            .replica_disks
            .get_mut("data")
            .unwrap()
            .insert("n2".into(), DiskState::Inconsistent);
        assert!(refusal(&inc, &["n2"], facts(1)).contains("Inconsistent"));
        assert_eq!(report(&s, "ghost", &online(&[]), &BTreeMap::new(), 0), None);
    }

    #[test]
    fn the_newer_data_follows_the_split_brain_policy() {
        for (policy, says) in [
            ("disconnect", "nothing is overwritten"),
            ("discard-younger-primary", "nothing is overwritten"),
            ("discard-local", "nothing is overwritten"),
            ("discard-zero-changes", "nothing is overwritten"),
            ("discard-older-primary", "newer writes are discarded"),
            ("discard-remote", "newer writes are discarded"),
            ("discard-least-changes", "fewer blocks"),
        ] {
            let r = report(&state(policy), "data", &online(&["n2"]), &facts(1), 2).unwrap();
            assert_eq!(r.split_brain_policy, policy);
            assert!(r.newer_data.contains(says), "{policy}: {}", r.newer_data);
        }
        assert!(newer_data(SplitBrainPolicy::Disconnect, &[]).contains("No other replica"));
    }
}
