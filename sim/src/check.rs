//! The checker. Safety, exactly when things happen: a group never starts
//! on a node while another node runs it (a node runs a group from the start
//! of its start until its stop completes or it is killed); a node's applied
//! epochs never go back; every committed placement respects the rules (no
//! witness, no standby or maintenance node, a node of the group's list it
//! has not failed on, anti-affinity, capacity); only a leader that reaches
//! a majority runs the fence command; a node does not claim a group over
//! and over without starting it. Liveness, once all faults
//! healed: every enabled group runs again within the bound, or waits
//! because the scheduler itself would place it nowhere.

use std::collections::BTreeMap;

use tandem::scheduler::{NodeInfo, Scheduler};
use tandem_raft::group::Phase;
use tandem_raft::state::{AdminState, ClusterState, Command};
use tandem_raft::NodeId;

use crate::fmt_us;

/// Confirmed claims of one group on one node without a start in between
/// beyond which the node is churning (a lease lapsing between a claim and
/// its start happens, but not this often).
const CLAIM_CHURN: u32 = 20;
use crate::scenario::{HEAL_US, LIVENESS_BOUND_US};
use crate::world::{Entry, World};

/// Why placing `group` on `node` in state `s` breaks a rule, if it does.
pub fn placement_rule_broken(s: &ClusterState, group: &str, node: NodeId) -> Option<String> {
    let g = s.groups.get(group)?;
    let Some(n) = s.nodes.get(&node) else {
        return Some(format!("n{node} is not a member"));
    };
    if n.witness {
        return Some(format!("{} is a witness", n.name));
    }
    if n.admin_state != AdminState::Online {
        return Some(format!("{} is {}", n.name, n.admin_state.as_str()));
    }
    if !g.spec.nodes.contains(&n.name) {
        return Some(format!("{} is not in the group's nodes", n.name));
    }
    if g.failed_on.contains(&node) {
        return Some(format!("the group failed on {}", n.name));
    }
    let others = s.groups.values().filter(|o| o.name != group && o.placement.node == Some(node));
    let mut used = 0;
    for o in others {
        if g.spec.anti_affinity.contains(&o.name) || o.spec.anti_affinity.iter().any(|a| a == group) {
            return Some(format!("anti-affinity with {} on {}", o.name, n.name));
        }
        used += o.spec.weight;
    }
    if let Some(cap) = n.attributes.get("capacity").and_then(|c| c.parse::<u32>().ok()) {
        if used + g.spec.weight > cap {
            return Some(format!("{} over capacity: {used} used of {cap}, {} more", n.name, g.spec.weight));
        }
    }
    None
}

impl World {
    /// A start begins on `id`: nobody else may run the group now.
    pub fn check_start(&mut self, id: NodeId, group: &str) {
        let elsewhere: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != id)
            .filter_map(|n| {
                n.procs.get(group).map(|p| format!("n{} (epoch {}, since {})", n.id, p.epoch, fmt_us(p.since)))
            })
            .collect();
        if !elsewhere.is_empty() {
            self.violation(format!("{group} starts on n{id} while it runs on {}", elsewhere.join(", ")));
        }
    }

    /// `leader` runs the fence command against `node`: a node that holds
    /// its lease may be serving and is never powered off (a leader cut off
    /// from the rest would power the working side off), and only a leader
    /// that holds its own lease (a majority echoes it) fences at all. A
    /// leader that lost its majority a moment ago may still fence a node
    /// that is really gone (crashed, frozen): that is safe.
    pub fn check_fence(&mut self, leader: NodeId, node: NodeId) {
        let holds = |w: &World, id: NodeId| {
            let n = w.node(id);
            n.powered && n.agent.as_ref().is_some_and(|a| a.lease.holds(w.local_ms(id)))
        };
        if !holds(self, leader) {
            self.violation(format!("n{leader} runs the fence command against n{node} without holding its lease"));
        } else if holds(self, node) {
            self.violation(format!("n{leader} runs the fence command against n{node}, which holds its lease"));
        }
    }

    /// A node keeps claiming a group it then does not start: every claim is
    /// a Raft write and an epoch, for nothing.
    pub fn check_claim_churn(&mut self, id: NodeId) {
        let Some(a) = self.node(id).agent.as_ref() else { return };
        if let Some((g, n)) = a.unstarted_claims.iter().find(|(_, n)| **n > CLAIM_CHURN) {
            let what = format!("n{id} claimed {g} {n} times without starting it (each claim is a Raft write)");
            self.violation(what);
        }
    }

    /// After `id` applied entries: no epoch went back.
    pub fn check_epochs(&mut self, id: NodeId) {
        let n = &mut self.nodes[(id - 1) as usize];
        let Some(a) = n.agent.as_ref() else { return };
        let mut back = Vec::new();
        for (name, g) in &a.state.groups {
            let max = n.max_epoch.entry(name.clone()).or_insert(0);
            if g.placement.epoch < *max {
                back.push(format!("{name} epoch {} after {}", g.placement.epoch, max));
            }
            *max = (*max).max(g.placement.epoch);
        }
        if !back.is_empty() {
            self.violation(format!("n{id}'s applied epochs went back: {}", back.join(", ")));
        }
    }

    /// A command about to be committed. A placement that starts a group
    /// must respect the rules in the committed state, or (when an operator
    /// command raced it) in the state the leader decided on.
    pub fn check_commit(&mut self, cmd: &Command, basis: usize) {
        let Command::SetPlacement { name, expected_epoch, node: Some(node), phase: Phase::Started, .. } = cmd else {
            return;
        };
        if self.committed.groups.get(name).is_none_or(|g| g.placement.epoch != *expected_epoch) {
            return; // refused by the state machine: it changes nothing
        }
        let Some(why) = placement_rule_broken(&self.committed, name, *node) else { return };
        let mut decided_on = ClusterState::default();
        for e in &self.log[..basis.min(self.log.len())] {
            if let Entry::Cmd(c) = e {
                let _ = decided_on.apply(c);
            }
        }
        if let Some(why_then) = placement_rule_broken(&decided_on, name, *node) {
            self.violation(format!(
                "committed placement of {name} on n{node} breaks the rules: {why} (and when decided: {why_then})"
            ));
        }
    }

    /// At the end of every step.
    pub fn check_step(&mut self) {
        let mut on: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
        for n in &self.nodes {
            for g in n.procs.keys() {
                on.entry(g.as_str()).or_default().push(n.id);
            }
        }
        if let Some((g, ids)) = on.iter().find(|(_, ids)| ids.len() > 1) {
            let what = format!("{g} runs on {ids:?} at once");
            self.violation(what);
            return;
        }
        if !self.healed || self.settled_at.is_some() {
            return;
        }
        match self.unsettled() {
            None => {
                self.settled_at = Some(self.now);
                self.log_line(format!("settled: every group runs {} after the heal", fmt_us(self.now - HEAL_US)));
            }
            Some(why) if self.now >= HEAL_US + LIVENESS_BOUND_US => {
                self.violation(format!("not every group runs {} after the heal: {why}", fmt_us(LIVENESS_BOUND_US)))
            }
            Some(_) => {}
        }
    }

    /// What keeps the healed cluster from running every group, if anything.
    fn unsettled(&self) -> Option<String> {
        if let Some(op) = self.ops.iter().find(|o| !o.done) {
            return Some(format!("the operator's {:?} is not committed", op.cmd));
        }
        let s = &self.committed;
        let everyone: Vec<NodeInfo> = s.nodes.values().map(|r| NodeInfo::of(r, true, false)).collect();
        let mut would: Option<Vec<String>> = None;
        for g in s.groups.values().filter(|g| g.enabled) {
            match (g.placement.phase, g.placement.node) {
                (Phase::Started, Some(n)) => {
                    if !self.node(n).procs.contains_key(&g.name) {
                        return Some(format!("{} is placed on n{n} but does not run", g.name));
                    }
                }
                (Phase::Stopping, _) => return Some(format!("{} is stopping", g.name)),
                _ => {
                    // Stopped: fine only if the scheduler itself would
                    // place it nowhere (no eligible node).
                    let w = would.get_or_insert_with(|| {
                        Scheduler::new(&everyone, &s.groups, 720)
                            .decide()
                            .into_iter()
                            .filter(|d| d.phase == Phase::Started)
                            .map(|d| d.group)
                            .collect()
                    });
                    if w.contains(&g.name) {
                        return Some(format!("{} is stopped though it could run", g.name));
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_raft::state::NodeSpec;

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for i in 1..=3u64 {
            let node = NodeSpec {
                name: format!("n{i}"),
                addresses: vec![format!("10.0.0.{i}")],
                port: 7401,
                site: None,
                witness: i == 3,
            };
            let cmd = match i {
                1 => Command::Bootstrap { cluster_id: "c".into(), node_id: 1, node, heartbeat_key: None },
                _ => Command::AddNode { node },
            };
            s.apply(&cmd).unwrap();
        }
        for (g, anti) in [("a", "[]"), ("b", r#"["a"]"#)] {
            let spec = serde_json::from_str(&format!(
                r#"{{"resources": [{{"name": "r", "type": "process", "command": ["x"]}}],
                    "nodes": ["n1", "n2", "n3"], "anti_affinity": {anti}, "weight": 2}}"#
            ))
            .unwrap();
            s.apply(&Command::PutGroup { name: g.into(), spec }).unwrap();
        }
        s
    }

    fn place(s: &mut ClusterState, g: &str, n: NodeId) {
        let expected_epoch = s.groups[g].placement.epoch;
        let cmd = Command::SetPlacement {
            name: g.into(),
            expected_epoch,
            node: Some(n),
            phase: Phase::Started,
            reason: String::new(),
        };
        s.apply(&cmd).unwrap();
    }

    #[test]
    fn every_rule_of_a_placement_is_checked() {
        let mut s = state();
        assert_eq!(placement_rule_broken(&s, "a", 1), None);
        assert!(placement_rule_broken(&s, "a", 3).unwrap().contains("witness"));
        assert!(placement_rule_broken(&s, "a", 9).unwrap().contains("not a member"));
        place(&mut s, "a", 1);
        assert!(placement_rule_broken(&s, "b", 1).unwrap().contains("anti-affinity with a"));
        assert_eq!(placement_rule_broken(&s, "b", 2), None);
        s.apply(&Command::SetAttribute { name: "n2".into(), key: "capacity".into(), value: "1".into() }).unwrap();
        assert!(placement_rule_broken(&s, "b", 2).unwrap().contains("over capacity"));
        s.apply(&Command::SetAttribute { name: "n2".into(), key: "capacity".into(), value: "2".into() }).unwrap();
        s.apply(&Command::SetAdminState { name: "n2".into(), state: AdminState::Standby }).unwrap();
        assert!(placement_rule_broken(&s, "b", 2).unwrap().contains("standby"));
        s.apply(&Command::SetAdminState { name: "n2".into(), state: AdminState::Online }).unwrap();
        let epoch = s.groups["b"].placement.epoch;
        place(&mut s, "b", 2);
        s.apply(&Command::MarkGroupFailed { name: "b".into(), node: 2, epoch: epoch + 1 }).unwrap();
        assert!(placement_rule_broken(&s, "b", 2).unwrap().contains("failed on n2"));
    }
}
