//! The scheduler: where each resource group should be. A pure function of
//! the replicated groups, the nodes' admin state and liveness, and the local
//! time of day; its decisions are `SetPlacement` commands, each checked
//! against the group's epoch when the log applies it.
//!
//! Safety comes first: a group only ever starts on a node when it runs
//! nowhere else — it is stopped, or its old node is dead *and* fenced. A
//! group on a live node that must leave is first asked to stop there
//! (`Stopping`), and is placed anew only once that node reports it stopped.
//! This module never does I/O and never reads a clock.
//!
//! A group with a volume runs only on a replica node whose disk the
//! replicated state records `UpToDate`: a failover never lands on a copy
//! that misses acknowledged writes. With no such node eligible it waits.
//!
//! A group bound to the ticket between two sites (`ticket: true`) starts
//! only while this site holds it, and is stopped once it does not.

use std::collections::{BTreeMap, BTreeSet};

use tandem_raft::group::{replica_nodes, Failback, GroupRecord, Phase, Window};
use tandem_raft::state::AdminState;
use tandem_raft::volume::DiskState;
use tandem_raft::NodeId;

use crate::ticket::Standing;

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    pub admin: AdminState,
    pub witness: bool,
    /// Heard from within the node timeout.
    pub alive: bool,
    /// Dead and known not to run anything any more: without a fence
    /// command, its lease ran out (it fenced itself); with one, the command
    /// confirmed it off after it was last heard (lease wait or not).
    pub fenced: bool,
    /// Capacity units; `None` is unlimited.
    pub capacity: Option<u32>,
}

impl NodeInfo {
    /// A recorded node as seen now: `alive` and `fenced` come from liveness
    /// and the failover policy; the rest from its record.
    pub fn of(r: &tandem_raft::state::NodeRecord, alive: bool, fenced: bool) -> NodeInfo {
        NodeInfo {
            id: r.id,
            name: r.name.clone(),
            admin: r.admin_state,
            witness: r.witness,
            alive,
            fenced,
            capacity: r.attributes.get("capacity").and_then(|c| c.parse().ok()),
        }
    }
}

/// Why `g`'s volume keeps it off `n`: `n` holds no replica of it, or its
/// replica is not recorded `UpToDate`.
fn disk_unfit(g: &GroupRecord, n: &NodeInfo) -> Option<String> {
    let (r, _) = g.spec.volume()?;
    if !replica_nodes(&g.spec).contains(&n.name) {
        return Some(format!("{} holds no replica of volume {}", n.name, r.name));
    }
    match g.disk(&r.name, &n.name) {
        Some(DiskState::UpToDate) => None,
        Some(d) => Some(format!("{}'s replica of volume {} is {d}", n.name, r.name)),
        None => Some(format!("{} has no recorded replica of volume {}", n.name, r.name)),
    }
}

/// Why a group bound to the ticket does not run on this site.
pub const TICKET_NOT_HELD: &str = "this site does not hold the ticket";

/// A placement change to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub group: String,
    pub expected_epoch: u64,
    pub node: Option<NodeId>,
    pub phase: Phase,
    pub reason: String,
}

/// Groups in dependency order: a group after the one it colocates with,
/// otherwise by name. Validation refuses cycles; a cycle that slipped in is
/// still ordered (by name) rather than looping.
fn order(groups: &BTreeMap<String, GroupRecord>) -> Vec<&GroupRecord> {
    let mut out: Vec<&GroupRecord> = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    for _ in 0..=groups.len() {
        for g in groups.values() {
            if done.contains(g.name.as_str()) {
                continue;
            }
            let ready = match &g.spec.colocate_with {
                Some(parent) => done.contains(parent.as_str()) || !groups.contains_key(parent),
                None => true,
            };
            if ready {
                done.insert(&g.name);
                out.push(g);
            }
        }
    }
    out.extend(groups.values().filter(|g| !done.contains(g.name.as_str())));
    out
}

/// What is (or will be) on each node while decisions are being made.
struct Occupancy<'a> {
    /// Groups that are started or stopping on the node.
    on: BTreeMap<NodeId, BTreeSet<&'a str>>,
    used: BTreeMap<NodeId, u32>,
    /// Where each group is started (for colocation).
    started_on: BTreeMap<&'a str, NodeId>,
}

impl<'a> Occupancy<'a> {
    fn new(groups: &'a BTreeMap<String, GroupRecord>) -> Self {
        let mut o = Occupancy { on: BTreeMap::new(), used: BTreeMap::new(), started_on: BTreeMap::new() };
        for g in groups.values() {
            if let Some(n) = g.placement.node {
                o.add(g, n);
                if g.placement.phase == Phase::Started {
                    o.started_on.insert(&g.name, n);
                }
            }
        }
        o
    }

    fn add(&mut self, g: &'a GroupRecord, n: NodeId) {
        self.on.entry(n).or_default().insert(&g.name);
        *self.used.entry(n).or_default() += g.spec.weight;
    }

    fn remove(&mut self, g: &'a GroupRecord, n: NodeId) {
        if let Some(set) = self.on.get_mut(&n) {
            set.remove(g.name.as_str());
        }
        if let Some(u) = self.used.get_mut(&n) {
            *u = u.saturating_sub(g.spec.weight);
        }
        self.started_on.remove(g.name.as_str());
    }
}

pub struct Scheduler<'a> {
    nodes: BTreeMap<&'a str, &'a NodeInfo>,
    by_id: BTreeMap<NodeId, &'a NodeInfo>,
    groups: &'a BTreeMap<String, GroupRecord>,
    minute_of_day: u16,
    /// The site's ticket, for the groups bound to it (`ticket: true`).
    ticket: Standing,
}

impl<'a> Scheduler<'a> {
    /// A scheduler for a site that does not hold the ticket (the groups
    /// bound to it stay stopped) unless [`Scheduler::ticket`] says so.
    pub fn new(nodes: &'a [NodeInfo], groups: &'a BTreeMap<String, GroupRecord>, minute_of_day: u16) -> Self {
        Scheduler {
            nodes: nodes.iter().map(|n| (n.name.as_str(), n)).collect(),
            by_id: nodes.iter().map(|n| (n.id, n)).collect(),
            groups,
            minute_of_day,
            ticket: Standing::NotHeld,
        }
    }

    /// The site's standing with the ticket.
    pub fn ticket(mut self, standing: Standing) -> Self {
        self.ticket = standing;
        self
    }

    /// Why `g` may not run on `n` (given what else is there), or `None`.
    fn unfit(&self, g: &GroupRecord, n: &NodeInfo, occ: &Occupancy, already_there: bool) -> Option<String> {
        self.unfit_node(g, n, occ, already_there).or_else(|| disk_unfit(g, n))
    }

    /// `unfit` but for the group's volume.
    fn unfit_node(&self, g: &GroupRecord, n: &NodeInfo, occ: &Occupancy, already_there: bool) -> Option<String> {
        if !g.spec.nodes.contains(&n.name) {
            return Some(format!("{} is not in the group's nodes", n.name));
        }
        if !n.alive {
            return Some(format!("{} is offline", n.name));
        }
        if n.witness {
            return Some(format!("{} is a witness", n.name));
        }
        if n.admin != AdminState::Online {
            return Some(format!("{} is {}", n.name, n.admin.as_str()));
        }
        if g.failed_on.contains(&n.id) {
            return Some(format!("the group failed on {} (clear it to allow it again)", n.name));
        }
        let here = occ.on.get(&n.id);
        let conflicts = |other: &str| {
            other != g.name
                && (g.spec.anti_affinity.iter().any(|a| a == other)
                    || self.groups.get(other).is_some_and(|o| o.spec.anti_affinity.contains(&g.name)))
        };
        if let Some(other) = here.and_then(|set| set.iter().find(|o| conflicts(o))) {
            return Some(format!("anti-affinity with {other} on {}", n.name));
        }
        if let Some(cap) = n.capacity {
            let used = occ.used.get(&n.id).copied().unwrap_or(0);
            let need = if already_there { used } else { used + g.spec.weight };
            if need > cap {
                return Some(format!("{} has no capacity left ({used} of {cap} used)", n.name));
            }
        }
        if let Some(parent) = &g.spec.colocate_with {
            if occ.started_on.get(parent.as_str()) != Some(&n.id) {
                return Some(format!("it must run with {parent}, which is not started on {}", n.name));
            }
        }
        None
    }

    /// The first node of the group's list it may start on now.
    fn best(&self, g: &GroupRecord, occ: &Occupancy) -> Result<NodeId, String> {
        if g.spec.ticket && self.ticket != Standing::Held {
            return Err(TICKET_NOT_HELD.into());
        }
        let mut why = Vec::new();
        let target = g.move_to.and_then(|id| self.by_id.get(&id)).map(|n| &n.name);
        for name in target.into_iter().chain(&g.spec.nodes) {
            match self.nodes.get(name.as_str()) {
                None => why.push(format!("{name} is not a member")),
                Some(n) => match self.unfit(g, n, occ, false) {
                    None => return Ok(n.id),
                    Some(reason) => why.push(reason),
                },
            }
        }
        match g.spec.volume() {
            // Name the volume when it is what keeps the group waiting.
            Some((r, _)) if !self.up_to_date_replica_online(g, &r.name) => {
                Err(format!("no up-to-date replica of volume {} is online: {}", r.name, why.join("; ")))
            }
            _ => Err(format!("no eligible node: {}", why.join("; "))),
        }
    }

    fn up_to_date_replica_online(&self, g: &GroupRecord, volume: &str) -> bool {
        replica_nodes(&g.spec).iter().any(|name| {
            self.nodes.get(name.as_str()).is_some_and(|n| n.alive) && g.disk(volume, name) == Some(DiskState::UpToDate)
        })
    }

    fn failback_allowed(&self, g: &GroupRecord) -> bool {
        match &g.spec.failback {
            Failback::Auto => true,
            Failback::Manual => false,
            Failback::Window(w) => Window::parse(w).is_some_and(|w| w.contains(self.minute_of_day)),
        }
    }

    fn rank(&self, g: &GroupRecord, id: NodeId) -> usize {
        let name = self.by_id.get(&id).map(|n| n.name.as_str());
        g.spec.nodes.iter().position(|x| Some(x.as_str()) == name).unwrap_or(usize::MAX)
    }

    /// Every placement change to make now, in dependency order.
    pub fn decide(&self) -> Vec<Decision> {
        let mut occ = Occupancy::new(self.groups);
        let mut out = Vec::new();
        for g in order(self.groups) {
            let p = &g.placement;
            let decide = |node: Option<NodeId>, phase: Phase, reason: String| Decision {
                group: g.name.clone(),
                expected_epoch: p.epoch,
                node,
                phase,
                reason,
            };
            let node = p.node.and_then(|id| self.by_id.get(&id).copied());
            match (p.phase, p.node) {
                (Phase::Stopped, _) | (_, None) => {
                    if !g.enabled {
                        continue;
                    }
                    if let Ok(to) = self.best(g, &occ) {
                        occ.add(g, to);
                        occ.started_on.insert(&g.name, to);
                        let name = self.by_id.get(&to).map(|n| n.name.as_str()).unwrap_or("?");
                        out.push(decide(Some(to), Phase::Started, format!("placed on {name}")));
                    }
                }
                (Phase::Stopping, Some(id)) => {
                    // Waits for the node to report the group stopped, unless
                    // the node is gone for good.
                    if node.is_none_or(|n| !n.alive && n.fenced) {
                        occ.remove(g, id);
                        out.push(decide(None, Phase::Stopped, "its node was fenced while stopping it".into()));
                    }
                }
                (Phase::Started, Some(id)) => {
                    let Some(n) = node else {
                        // The node was removed from the cluster: nothing runs there.
                        occ.remove(g, id);
                        out.push(self.restart_elsewhere(g, &mut occ, "its node was removed".into()));
                        continue;
                    };
                    if !g.enabled {
                        out.push(decide(Some(id), Phase::Stopping, "stopped by the operator".into()));
                        continue;
                    }
                    if n.admin == AdminState::Maintenance {
                        continue; // left alone, by definition of maintenance
                    }
                    if g.spec.ticket && n.alive {
                        match self.ticket {
                            Standing::Held => {}
                            // A new leader finding its feet: left as it is.
                            Standing::Acquiring => continue,
                            Standing::NotHeld => {
                                out.push(decide(Some(id), Phase::Stopping, TICKET_NOT_HELD.into()));
                                continue;
                            }
                        }
                    }
                    if !n.alive {
                        if n.fenced {
                            occ.remove(g, id);
                            out.push(self.restart_elsewhere(g, &mut occ, format!("{} failed and was fenced", n.name)));
                        }
                        // Not fenced yet: it may still run there. Wait.
                        continue;
                    }
                    occ.remove(g, id);
                    if let Some(reason) = self.unfit_node(g, n, &occ, false) {
                        out.push(decide(Some(id), Phase::Stopping, format!("must leave: {reason}")));
                        occ.add(g, id);
                        continue;
                    }
                    // Its own replica is no longer up to date: hand over to
                    // one that is, if any may take it; otherwise it stays
                    // (stopping would serve nobody).
                    if let Some(reason) = disk_unfit(g, n) {
                        if let Ok(to) = self.best(g, &occ) {
                            let name = self.by_id.get(&to).map(|n| n.name.as_str()).unwrap_or("?");
                            let why = format!("must leave: {reason}; {name} holds an up-to-date replica");
                            out.push(decide(Some(id), Phase::Stopping, why));
                            occ.add(g, id);
                            continue;
                        }
                    }
                    occ.add(g, id);
                    occ.started_on.insert(&g.name, id);
                    if let Some(to) = g.move_to.filter(|to| *to != id).and_then(|to| self.by_id.get(&to)) {
                        if self.unfit(g, to, &occ, false).is_none() {
                            out.push(decide(Some(id), Phase::Stopping, format!("moving to {} on request", to.name)));
                            continue;
                        }
                    }
                    if self.failback_allowed(g) {
                        occ.remove(g, id);
                        let best = self.best(g, &occ);
                        occ.add(g, id);
                        occ.started_on.insert(&g.name, id);
                        if let Ok(to) = best {
                            if self.rank(g, to) < self.rank(g, id) {
                                let name = self.by_id.get(&to).map(|n| n.name.as_str()).unwrap_or("?");
                                out.push(decide(Some(id), Phase::Stopping, format!("failback to {name}")));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The group's node is gone and fenced: start it on the best node at
    /// once, or record it stopped.
    fn restart_elsewhere(&self, g: &'a GroupRecord, occ: &mut Occupancy<'a>, why: String) -> Decision {
        let (node, phase, reason) = match (g.enabled, self.best(g, occ)) {
            (true, Ok(to)) => {
                occ.add(g, to);
                occ.started_on.insert(&g.name, to);
                let name = self.by_id.get(&to).map(|n| n.name.as_str()).unwrap_or("?");
                (Some(to), Phase::Started, format!("{why}; failed over to {name}"))
            }
            (true, Err(e)) => (None, Phase::Stopped, format!("{why}; {e}")),
            (false, _) => (None, Phase::Stopped, why),
        };
        Decision { group: g.name.clone(), expected_epoch: g.placement.epoch, node, phase, reason }
    }
}

/// When the leader first saw each failure (`failed_on`) of a group with a
/// `failure_timeout_ms`, to tell which have expired. Held by the leader
/// only, from when it leads (a new leader starts counting anew: a failure
/// lasts at most one timeout longer, never less). Pure: `now_ms` comes in.
#[derive(Debug, Default)]
pub struct FailureClock {
    first_seen: BTreeMap<(String, NodeId), u64>,
}

impl FailureClock {
    /// The (group, node) failures whose timeout has passed at `now_ms`:
    /// each may be expired (`ExpireGroupFailure`). Forgets failures gone.
    pub fn expired(&mut self, groups: &BTreeMap<String, GroupRecord>, now_ms: u64) -> Vec<(String, NodeId)> {
        let mut present = BTreeSet::new();
        let mut out = Vec::new();
        for g in groups.values().filter(|g| g.spec.failure_timeout_ms > 0) {
            for node in &g.failed_on {
                let key = (g.name.clone(), *node);
                let seen = *self.first_seen.entry(key.clone()).or_insert(now_ms);
                if now_ms.saturating_sub(seen) >= g.spec.failure_timeout_ms {
                    out.push(key.clone());
                }
                present.insert(key);
            }
        }
        self.first_seen.retain(|k, _| present.contains(k));
        out
    }

    /// Not the leader any more: what it saw is forgotten.
    pub fn reset(&mut self) {
        self.first_seen.clear();
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn failures_expire_after_their_timeout_and_only_with_one() {
        let mut groups = BTreeMap::new();
        for (name, timeout) in [("a", 10_000u64), ("b", 0)] {
            let mut g = group(name, &[1, 2]);
            g.spec.failure_timeout_ms = timeout;
            g.failed_on.insert(2);
            groups.insert(name.to_string(), g);
        }
        let mut clock = FailureClock::default();
        assert!(clock.expired(&groups, 1_000).is_empty(), "first seen now");
        assert!(clock.expired(&groups, 10_999).is_empty());
        assert_eq!(clock.expired(&groups, 11_000), vec![("a".to_string(), 2)]);
        // Cleared, then failed again: counted from the new failure.
        groups.get_mut("a").unwrap().failed_on.clear();
        assert!(clock.expired(&groups, 12_000).is_empty());
        groups.get_mut("a").unwrap().failed_on.insert(2);
        assert!(clock.expired(&groups, 13_000).is_empty());
        assert!(clock.expired(&groups, 22_999).is_empty());
        assert_eq!(clock.expired(&groups, 23_000).len(), 1);
        // A new leader counts anew.
        clock.reset();
        assert!(clock.expired(&groups, 24_000).is_empty());
    }

    use super::*;
    use proptest::prelude::*;
    use tandem_raft::group::{GroupSpec, Placement};

    fn node(id: NodeId) -> NodeInfo {
        NodeInfo {
            id,
            name: format!("node{id}"),
            admin: AdminState::Online,
            witness: false,
            alive: true,
            fenced: false,
            capacity: None,
        }
    }

    fn group(name: &str, nodes: &[NodeId]) -> GroupRecord {
        let list: Vec<String> = nodes.iter().map(|n| format!("\"node{n}\"")).collect();
        let spec: GroupSpec = serde_json::from_str(&format!(
            r#"{{"resources": [{{"name": "r", "type": "process", "command": ["sleep", "1"]}}], "nodes": [{}]}}"#,
            list.join(",")
        ))
        .unwrap();
        GroupRecord {
            name: name.into(),
            spec,
            enabled: true,
            placement: Placement::default(),
            failed_on: Default::default(),
            move_to: None,
            replica_disks: Default::default(),
            replica_replaced: Default::default(),
            replicas_replacing: Default::default(),
            replica_out_of_sync: Default::default(),
            forced_promotions: Default::default(),
            volumes_in_service: Default::default(),
        }
    }

    fn placed(mut g: GroupRecord, on: NodeId, epoch: u64) -> GroupRecord {
        g.placement = Placement { node: Some(on), phase: Phase::Started, epoch, reason: String::new() };
        g
    }

    fn groups(gs: Vec<GroupRecord>) -> BTreeMap<String, GroupRecord> {
        gs.into_iter().map(|g| (g.name.clone(), g)).collect()
    }

    fn run(nodes: &[NodeInfo], gs: &BTreeMap<String, GroupRecord>) -> Vec<Decision> {
        Scheduler::new(nodes, gs, 12 * 60).decide()
    }

    #[test]
    fn a_new_group_starts_on_its_first_node() {
        let nodes = [node(1), node(2)];
        let d = run(&nodes, &groups(vec![group("web", &[2, 1])]));
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].node, d[0].phase, d[0].expected_epoch), (Some(2), Phase::Started, 0));
    }

    #[test]
    fn a_ticket_group_runs_only_while_the_site_holds_the_ticket() {
        let nodes = [node(1), node(2)];
        let mut web = group("web", &[1, 2]);
        web.spec.ticket = true;
        let stopped = groups(vec![web.clone()]);
        let with =
            |gs: &BTreeMap<String, GroupRecord>, t: Standing| Scheduler::new(&nodes, gs, 12 * 60).ticket(t).decide();
        assert!(with(&stopped, Standing::NotHeld).is_empty(), "not held: it does not start");
        assert!(with(&stopped, Standing::Acquiring).is_empty(), "acquiring: it does not start");
        assert!(run(&nodes, &stopped).is_empty(), "no ticket here at all: it does not start");
        let d = with(&stopped, Standing::Held);
        assert_eq!((d[0].node, d[0].phase), (Some(1), Phase::Started));
        // Running: a new leader still acquiring leaves it; lost, it stops.
        let running = groups(vec![placed(web, 1, 2)]);
        assert!(with(&running, Standing::Held).is_empty());
        assert!(with(&running, Standing::Acquiring).is_empty());
        let d = with(&running, Standing::NotHeld);
        assert_eq!((d[0].node, d[0].phase, d[0].reason.as_str()), (Some(1), Phase::Stopping, TICKET_NOT_HELD));
        // Its node died and was fenced while the site holds no ticket: recorded
        // stopped, started nowhere.
        let mut dead = nodes.clone();
        dead[0].alive = false;
        dead[0].fenced = true;
        let d = Scheduler::new(&dead, &running, 12 * 60).ticket(Standing::NotHeld).decide();
        assert_eq!((d[0].node, d[0].phase), (None, Phase::Stopped));
        // A group not bound to the ticket ignores it.
        let plain = groups(vec![group("db", &[1, 2])]);
        assert_eq!(with(&plain, Standing::NotHeld).len(), 1);
    }

    #[test]
    fn a_dead_node_is_left_alone_until_fenced_then_its_group_fails_over() {
        let mut nodes = [node(1), node(2)];
        nodes[0].alive = false;
        let gs = groups(vec![placed(group("web", &[1, 2]), 1, 4)]);
        assert!(run(&nodes, &gs).is_empty(), "never start elsewhere while the old node may still run it");
        nodes[0].fenced = true;
        let d = run(&nodes, &gs);
        assert_eq!((d[0].node, d[0].phase, d[0].expected_epoch), (Some(2), Phase::Started, 4));
    }

    #[test]
    fn standby_makes_the_group_stop_first_then_start_elsewhere() {
        let mut nodes = [node(1), node(2)];
        nodes[0].admin = AdminState::Standby;
        let gs = groups(vec![placed(group("web", &[1, 2]), 1, 1)]);
        let d = run(&nodes, &gs);
        assert_eq!((d[0].node, d[0].phase), (Some(1), Phase::Stopping));
        // After node1 reports it stopped, the group is placed on node2.
        let mut g = gs["web"].clone();
        g.placement = Placement { node: None, phase: Phase::Stopped, epoch: 3, reason: String::new() };
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase), (Some(2), Phase::Started));
    }

    #[test]
    fn switchover_stops_then_starts_on_the_requested_node() {
        let nodes = [node(1), node(2), node(3)];
        let mut g = placed(group("web", &[1, 2, 3]), 1, 2);
        g.move_to = Some(3);
        let d = run(&nodes, &groups(vec![g.clone()]));
        assert_eq!((d[0].node, d[0].phase), (Some(1), Phase::Stopping));
        g.placement = Placement { node: None, phase: Phase::Stopped, epoch: 3, reason: String::new() };
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase), (Some(3), Phase::Started), "the target wins over the list order");
    }

    #[test]
    fn maintenance_leaves_the_group_alone() {
        let mut nodes = [node(1), node(2)];
        nodes[0].admin = AdminState::Maintenance;
        nodes[0].alive = false;
        nodes[0].fenced = true;
        assert!(run(&nodes, &groups(vec![placed(group("web", &[1, 2]), 1, 1)])).is_empty());
    }

    #[test]
    fn failback_follows_the_policy() {
        let nodes = [node(1), node(2)];
        let mut g = placed(group("web", &[1, 2]), 2, 5);
        assert!(run(&nodes, &groups(vec![g.clone()])).is_empty(), "manual: stays");
        g.spec.failback = Failback::Auto;
        let d = run(&nodes, &groups(vec![g.clone()]));
        assert_eq!((d[0].node, d[0].phase), (Some(2), Phase::Stopping));
        assert!(d[0].reason.contains("failback to node1"));
        g.spec.failback = Failback::Window("02:00-04:00".into());
        assert!(Scheduler::new(&nodes, &groups(vec![g.clone()]), 12 * 60).decide().is_empty(), "outside window");
        assert_eq!(Scheduler::new(&nodes, &groups(vec![g]), 3 * 60).decide().len(), 1, "inside window");
    }

    #[test]
    fn n_plus_one_capacity_keeps_two_failed_actives_from_stacking() {
        // node1..node3 run one group each; node4 is the spare, capacity 1.
        let mut nodes = [node(1), node(2), node(3), node(4)];
        for n in nodes.iter_mut() {
            n.capacity = Some(1);
        }
        nodes[0].alive = false;
        nodes[0].fenced = true;
        nodes[1].alive = false;
        nodes[1].fenced = true;
        let gs = groups(vec![
            placed(group("a", &[1, 4]), 1, 1),
            placed(group("b", &[2, 4]), 2, 1),
            placed(group("c", &[3, 4]), 3, 1),
        ]);
        let d = run(&nodes, &gs);
        let started: Vec<_> = d.iter().filter(|x| x.phase == Phase::Started).collect();
        assert_eq!(started.len(), 1, "{d:?}");
        assert_eq!(started[0].node, Some(4));
        let stopped: Vec<_> = d.iter().filter(|x| x.phase == Phase::Stopped).collect();
        assert_eq!(stopped.len(), 1);
        assert!(stopped[0].reason.contains("no capacity"), "{}", stopped[0].reason);
    }

    #[test]
    fn anti_affinity_and_colocation() {
        let nodes = [node(1), node(2)];
        let a = group("a", &[1, 2]);
        let mut b = group("b", &[1, 2]);
        b.spec.anti_affinity = vec!["a".into()];
        let d = run(&nodes, &groups(vec![a.clone(), b]));
        assert_eq!(d.iter().find(|x| x.group == "a").unwrap().node, Some(1));
        assert_eq!(d.iter().find(|x| x.group == "b").unwrap().node, Some(2));
        let mut c = group("c", &[2, 1]);
        c.spec.colocate_with = Some("a".into());
        let d = run(&nodes, &groups(vec![a, c]));
        assert_eq!(d.iter().find(|x| x.group == "c").unwrap().node, Some(1), "follows a, whatever its own order");
    }

    #[test]
    fn witness_and_failed_nodes_are_never_chosen() {
        let mut nodes = [node(1), node(2), node(3)];
        nodes[0].witness = true;
        let mut g = group("web", &[1, 2, 3]);
        g.failed_on.insert(2);
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!(d[0].node, Some(3));
    }

    /// A group whose first resource is volume `data` with `replicas`
    /// copies; `disks` are the recorded states (by node id).
    fn vol_group(name: &str, nodes: &[NodeId], replicas: u8, disks: &[(NodeId, DiskState)]) -> GroupRecord {
        let mut g = group(name, nodes);
        let vol: tandem_raft::group::ResourceSpec = serde_json::from_value(serde_json::json!({
            "name": "data", "type": "volume", "size": "1GiB", "replicas": replicas
        }))
        .unwrap();
        g.spec.resources.insert(0, vol);
        g.replica_disks.insert("data".into(), disks.iter().map(|(n, d)| (format!("node{n}"), *d)).collect());
        g
    }

    #[test]
    fn a_volume_group_is_never_placed_on_an_outdated_replica() {
        let nodes = [node(1), node(2)];
        let g = vol_group("db", &[1, 2], 2, &[(1, DiskState::Outdated), (2, DiskState::UpToDate)]);
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase), (Some(2), Phase::Started), "{d:?}");
        for bad in [DiskState::Outdated, DiskState::Inconsistent, DiskState::Diskless] {
            let g = vol_group("db", &[1, 2], 2, &[(1, bad), (2, bad)]);
            assert!(run(&nodes, &groups(vec![g])).is_empty(), "{bad}: waits, placed nowhere");
        }
    }

    #[test]
    fn failover_picks_the_up_to_date_secondary() {
        let mut nodes = [node(1), node(2), node(3)];
        nodes[0].alive = false;
        nodes[0].fenced = true;
        let disks = [(1, DiskState::UpToDate), (2, DiskState::Outdated), (3, DiskState::UpToDate)];
        let g = placed(vol_group("db", &[1, 2, 3], 3, &disks), 1, 7);
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase, d[0].expected_epoch), (Some(3), Phase::Started, 7), "{d:?}");
        assert!(d[0].reason.contains("failed over to node3"), "{}", d[0].reason);
    }

    #[test]
    fn with_every_surviving_replica_outdated_the_group_waits_naming_the_volume() {
        let mut nodes = [node(1), node(2), node(3)];
        nodes[0].alive = false;
        nodes[0].fenced = true;
        // node3 is up to date, but holds no replica (2 replicas: node1, node2).
        let disks = [(1, DiskState::UpToDate), (2, DiskState::Outdated)];
        let g = placed(vol_group("db", &[1, 2, 3], 2, &disks), 1, 2);
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase), (None, Phase::Stopped), "{d:?}");
        assert!(d[0].reason.contains("no up-to-date replica of volume data is online"), "{}", d[0].reason);
        assert!(d[0].reason.contains("node2's replica of volume data is Outdated"), "{}", d[0].reason);
        assert!(d[0].reason.contains("node3 holds no replica of volume data"), "{}", d[0].reason);
    }

    #[test]
    fn a_primary_whose_own_replica_degrades_hands_over_only_to_an_up_to_date_one() {
        let nodes = [node(1), node(2)];
        let g = placed(vol_group("db", &[1, 2], 2, &[(1, DiskState::Diskless), (2, DiskState::UpToDate)]), 1, 3);
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase), (Some(1), Phase::Stopping), "{d:?}");
        assert!(d[0].reason.contains("node2 holds an up-to-date replica"), "{}", d[0].reason);
        // Nowhere better to go: it stays where it is.
        let g = placed(vol_group("db", &[1, 2], 2, &[(1, DiskState::Diskless), (2, DiskState::Outdated)]), 1, 3);
        assert!(run(&nodes, &groups(vec![g])).is_empty());
    }

    #[test]
    fn no_failback_nor_switchover_to_an_outdated_replica() {
        let nodes = [node(1), node(2)];
        let mut g = placed(vol_group("db", &[1, 2], 2, &[(1, DiskState::Outdated), (2, DiskState::UpToDate)]), 2, 4);
        g.spec.failback = Failback::Auto;
        g.move_to = Some(1);
        assert!(run(&nodes, &groups(vec![g.clone()])).is_empty());
        g.replica_disks.get_mut("data").unwrap().insert("node1".into(), DiskState::UpToDate);
        let d = run(&nodes, &groups(vec![g]));
        assert_eq!((d[0].node, d[0].phase), (Some(2), Phase::Stopping), "once resynced it may go back");
    }

    fn arb_world() -> impl Strategy<Value = (Vec<NodeInfo>, BTreeMap<String, GroupRecord>, u16)> {
        let nodes = proptest::collection::vec(
            (any::<bool>(), any::<bool>(), any::<bool>(), 0u8..3, proptest::option::of(0u32..3)),
            1..6,
        );
        (
            nodes,
            proptest::collection::vec((any::<u64>(), 0u8..3, 0u64..5, any::<bool>(), any::<u8>()), 1..8),
            0u16..1440,
        )
            .prop_map(|(ns, gs, minute)| {
                let nodes: Vec<NodeInfo> = ns
                    .iter()
                    .enumerate()
                    .map(|(i, (alive, fenced, witness, admin, cap))| NodeInfo {
                        alive: *alive,
                        fenced: !*alive && *fenced,
                        witness: *witness,
                        admin: [AdminState::Online, AdminState::Standby, AdminState::Maintenance][*admin as usize],
                        capacity: *cap,
                        ..node(i as u64 + 1)
                    })
                    .collect();
                let n = nodes.len() as u64;
                let mut recs = Vec::new();
                for (i, (seed, phase, epoch, enabled, extra)) in gs.iter().enumerate() {
                    let list: Vec<u64> = (0..n)
                        .map(|k| (seed.wrapping_add(k * 7) % n) + 1)
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let mut g = group(&format!("g{i}"), &list);
                    g.enabled = *enabled;
                    g.spec.weight = 1 + (*extra as u32 % 2);
                    if extra % 3 == 0 && i > 0 {
                        g.spec.anti_affinity = vec![format!("g{}", i - 1)];
                    }
                    if extra % 5 == 0 {
                        g.spec.failback = Failback::Auto;
                    }
                    let on = (seed % n) + 1;
                    g.placement = match phase {
                        0 => Placement { node: None, phase: Phase::Stopped, epoch: *epoch, reason: String::new() },
                        1 => Placement { node: Some(on), phase: Phase::Started, epoch: *epoch, reason: String::new() },
                        _ => Placement { node: Some(on), phase: Phase::Stopping, epoch: *epoch, reason: String::new() },
                    };
                    recs.push(g);
                }
                (nodes, groups(recs), minute)
            })
    }

    proptest! {
        #[test]
        fn decisions_never_run_a_group_twice_nor_break_the_rules((nodes, gs, minute) in arb_world()) {
            let d = Scheduler::new(&nodes, &gs, minute).decide();
            let by_id: BTreeMap<NodeId, &NodeInfo> = nodes.iter().map(|n| (n.id, n)).collect();
            let mut seen = BTreeSet::new();
            for x in &d {
                prop_assert!(seen.insert(x.group.clone()), "one decision per group");
                let g = &gs[&x.group];
                prop_assert_eq!(x.expected_epoch, g.placement.epoch);
                prop_assert_eq!(x.node.is_none(), x.phase == Phase::Stopped);
                if x.phase == Phase::Started {
                    // Only from "runs nowhere": stopped, or old node dead and fenced.
                    let from_ok = match (g.placement.phase, g.placement.node) {
                        (Phase::Stopped, _) | (_, None) => true,
                        (_, Some(old)) => by_id.get(&old).is_none_or(|o| !o.alive && o.fenced),
                    };
                    prop_assert!(from_ok, "started {} while it may still run elsewhere", x.group);
                    let n = by_id[&x.node.unwrap()];
                    prop_assert!(n.alive && !n.witness && n.admin == AdminState::Online);
                    prop_assert!(g.spec.nodes.contains(&n.name));
                    prop_assert!(!g.failed_on.contains(&n.id));
                    prop_assert!(g.enabled);
                }
                if x.phase == Phase::Stopping {
                    prop_assert_eq!(x.node, g.placement.node, "a stop is asked of the node that runs it");
                }
            }
            // After the decisions: anti-affinity and capacity hold for every
            // newly started group.
            let mut after = gs.clone();
            for x in &d {
                let g = after.get_mut(&x.group).unwrap();
                g.placement.node = x.node;
                g.placement.phase = x.phase;
            }
            for x in d.iter().filter(|x| x.phase == Phase::Started) {
                let n = x.node.unwrap();
                let here: Vec<&GroupRecord> = after.values().filter(|g| g.placement.node == Some(n)).collect();
                let g = &after[&x.group];
                for o in &here {
                    prop_assert!(o.name == g.name || !(g.spec.anti_affinity.contains(&o.name) || o.spec.anti_affinity.contains(&g.name)),
                        "{} placed with anti-affine {}", g.name, o.name);
                }
                if let Some(cap) = by_id[&n].capacity {
                    let before: u32 = gs.values().filter(|o| o.placement.node == Some(n) && o.name != g.name).map(|o| o.spec.weight).sum();
                    let used: u32 = here.iter().map(|o| o.spec.weight).sum();
                    // New placements never push a node over capacity beyond
                    // what it already carried.
                    prop_assert!(used <= cap.max(before), "capacity {cap} exceeded on node{n}: {used}");
                }
            }
            // Same input, same answer.
            prop_assert_eq!(d, Scheduler::new(&nodes, &gs, minute).decide());
        }

        /// Whatever the world, a group with a volume only ever starts on one
        /// of its replica nodes whose disk is recorded up to date.
        #[test]
        fn volume_groups_start_only_on_up_to_date_replicas(
            (nodes, gs, minute) in arb_world(),
            vols in proptest::collection::vec((any::<bool>(), 1u8..4, proptest::collection::vec(0u8..4, 5)), 8),
        ) {
            let states = [DiskState::UpToDate, DiskState::Outdated, DiskState::Inconsistent, DiskState::Diskless];
            let mut gs = gs;
            for (g, (has, replicas, disks)) in gs.values_mut().zip(&vols) {
                let replicas = (*replicas).min(g.spec.nodes.len() as u8);
                if !*has || replicas == 0 {
                    continue;
                }
                let vol: tandem_raft::group::ResourceSpec = serde_json::from_value(serde_json::json!({
                    "name": format!("v-{}", g.name), "type": "volume", "size": "1GiB", "replicas": replicas
                }))
                .unwrap();
                g.spec.resources.insert(0, vol);
                let recorded = g.spec.nodes.iter().take(replicas as usize).zip(disks)
                    .map(|(n, d)| (n.clone(), states[*d as usize])).collect();
                g.replica_disks.insert(format!("v-{}", g.name), recorded);
            }
            let d = Scheduler::new(&nodes, &gs, minute).decide();
            let by_id: BTreeMap<NodeId, &NodeInfo> = nodes.iter().map(|n| (n.id, n)).collect();
            for x in d.iter().filter(|x| x.phase == Phase::Started) {
                let g = &gs[&x.group];
                if let Some((r, _)) = g.spec.volume() {
                    let n = &by_id[&x.node.unwrap()].name;
                    prop_assert!(replica_nodes(&g.spec).contains(n), "{} started on non-replica {n}", g.name);
                    prop_assert_eq!(g.disk(&r.name, n), Some(DiskState::UpToDate), "{} on {}", g.name, n);
                }
            }
        }
    }
}
