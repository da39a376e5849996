//! What one seed builds: the nodes (sites, witness, clock drift, uptime),
//! the groups and their rules, the links' quality, and the faults with
//! their times. Everything here is drawn from the seed before the run.

use std::collections::BTreeSet;

use tandem::autopilot::{plan_voters, Candidate, Input};
use tandem_raft::group::GroupSpec;
use tandem_raft::NodeId;

use crate::clock::MAX_DRIFT_PPM;
use crate::net::{Quality, Site};
use crate::{Mutant, Params};

/// Simulated length of a scenario.
pub const DURATION_US: u64 = 30_000_000;
/// Faults start from here ...
pub const FAULTS_FROM_US: u64 = 2_000_000;
/// ... and are all healed here.
pub const HEAL_US: u64 = 20_000_000;
/// A healed cluster runs every group again within this. The slowest path
/// back: an election (0.9 s, more on a split vote), the lease wait of a node
/// silent until the heal (0.8 s), a stop and a start (0.3 s each), a
/// failback's stop and start, the operator's reverts committed first.
pub const LIVENESS_BOUND_US: u64 = 8_000_000;

#[derive(Debug, Clone)]
pub struct NodeSetup {
    pub id: NodeId,
    pub name: String,
    pub addresses: Vec<String>,
    pub site: Site,
    pub witness: bool,
    pub ppm: i64,
    /// CLOCK_BOOTTIME when the scenario begins.
    pub uptime_us: u64,
    /// Capacity attribute, if any.
    pub capacity: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// These nodes are cut from the others (both directions, every path).
    Partition(Vec<NodeId>),
    /// The link between sites A and B is cut; the witness hears both.
    SiteCut,
    /// Everything `from` sends to `to` is lost.
    OneWay(Vec<(NodeId, NodeId)>),
    /// One of a node's two network paths is down.
    PathDown(NodeId, usize),
    /// The agent process dies; its resources and watchdog live on. It is
    /// restarted when the fault ends.
    Crash(NodeId),
    /// The node loses power: everything on it stops, its disk stays.
    PowerLoss(NodeId),
    /// The agent is frozen (SIGSTOP): no loop runs, datagrams queue up.
    Stall(NodeId),
    /// A busy host: the watchdog wakes late (up to 150 ms).
    Busy(NodeId),
    /// The operator sets a node to standby, then back online.
    Standby(NodeId),
    /// The operator sets a node to maintenance, then back online.
    Maintenance(NodeId),
    /// The operator stops a group, then starts it again.
    Disable(String),
    /// The operator moves a group to a node.
    Move(String, NodeId),
    /// A resource process of the group dies on whatever node runs it.
    ResourceCrash(String),
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub at_us: u64,
    pub end_us: u64,
    pub kind: FaultKind,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub nodes: Vec<NodeSetup>,
    pub groups: Vec<(String, GroupSpec)>,
    pub voters: BTreeSet<NodeId>,
    /// Autopilot's voter target.
    pub target: usize,
    pub quality: Quality,
    pub faults: Vec<Fault>,
    pub sites: bool,
    /// A fence command is configured: the leader powers silent nodes off
    /// and moves their groups only once that is confirmed.
    pub fence_command: bool,
    pub mutant: Option<Mutant>,
}

impl Scenario {
    pub fn generate(rng: &mut fastrand::Rng, params: &Params) -> Scenario {
        let n = params.nodes.unwrap_or_else(|| rng.usize(3..=7)).clamp(3, 7);
        let sites = params.sites.unwrap_or_else(|| rng.u8(0..3) == 0);
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as NodeId + 1;
            let witness = sites && i == n - 1;
            let site = match (sites, witness) {
                (false, _) => Site::None,
                (true, true) => Site::Witness,
                (true, false) if i % 2 == 0 => Site::A,
                (true, false) => Site::B,
            };
            nodes.push(NodeSetup {
                id,
                name: format!("n{id}"),
                addresses: vec![format!("10.0.0.{id}"), format!("10.1.0.{id}")],
                site,
                witness,
                ppm: rng.i64(-MAX_DRIFT_PPM..=MAX_DRIFT_PPM),
                // From a minute to a month up.
                uptime_us: rng.u64(60_000_000..=30 * 86_400_000_000),
                capacity: (!witness && rng.u8(0..4) == 0).then(|| rng.u32(1..=3)),
            });
        }
        let runners: Vec<&NodeSetup> = nodes.iter().filter(|n| !n.witness).collect();
        let mut groups: Vec<(String, GroupSpec)> = Vec::new();
        for g in 0..rng.usize(2..=5) {
            let name = format!("g{}", g + 1);
            let mut list: Vec<String> = runners.iter().map(|n| n.name.clone()).collect();
            rng.shuffle(&mut list);
            list.truncate(rng.usize(2..=list.len()));
            if sites && rng.u8(0..5) == 0 {
                // A witness in the list must never be chosen.
                let at = rng.usize(0..=list.len());
                list.insert(at, nodes[n - 1].name.clone());
            }
            let anti: Vec<String> = match groups.last() {
                Some((prev, _)) if rng.u8(0..3) == 0 => vec![prev.clone()],
                _ => Vec::new(),
            };
            let failback = if rng.u8(0..3) == 0 { "auto" } else { "manual" };
            let spec = serde_json::json!({
                "resources": [{"name": "app", "type": "process", "command": ["app"]}],
                "nodes": list,
                "failback": failback,
                "anti_affinity": anti,
                "weight": rng.u32(1..=2),
            });
            let spec: GroupSpec = serde_json::from_value(spec).expect("a valid group definition");
            groups.push((name, spec));
        }
        let target = if n >= 5 && rng.bool() { 5 } else { 3 };
        let candidates: Vec<Candidate> = nodes
            .iter()
            .map(|s| Candidate {
                id: s.id,
                site: match s.site {
                    Site::None => None,
                    Site::A => Some("a".into()),
                    Site::B => Some("b".into()),
                    Site::Witness => Some("w".into()),
                },
                witness: s.witness,
                alive: true,
                down_for: std::time::Duration::ZERO,
                caught_up: true,
            })
            .collect();
        let input = Input {
            candidates,
            voters: BTreeSet::from([1]),
            leader: 1,
            target,
            dead_after: std::time::Duration::from_secs(10),
        };
        let voters = plan_voters(&input).unwrap_or_else(|| BTreeSet::from([1]));
        let quality = if sites {
            Quality {
                latency_us: (1_000, 4_000),
                loss_ppm: [0, 1_000, 10_000][rng.usize(0..3)],
                dup_ppm: [0, 5_000][rng.usize(0..2)],
                slow_ppm: [0, 10_000][rng.usize(0..2)],
                slow_max_us: 40_000,
            }
        } else {
            Quality {
                latency_us: (50, 400),
                loss_ppm: [0, 1_000, 10_000, 50_000][rng.usize(0..4)],
                dup_ppm: [0, 5_000][rng.usize(0..2)],
                slow_ppm: [0, 10_000][rng.usize(0..2)],
                slow_max_us: 40_000,
            }
        };
        let fence_command = rng.u8(0..3) == 0 && !params.without.iter().any(|w| w == "fence");
        let mut faults = faults(rng, &nodes, &groups, sites);
        // Drawn all the same, so that a seed keeps its other faults.
        faults.retain(|f| !params.without.iter().any(|w| w == kind_name(&f.kind)));
        Scenario { nodes, groups, voters, target, quality, faults, sites, fence_command, mutant: params.mutant }
    }

    /// One line: the topology and the faults.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self.faults.iter().map(|f| describe(&f.kind)).collect();
        format!(
            "{} nodes{}, voters {:?}, {} groups{}, faults: {}",
            self.nodes.len(),
            if self.sites { " (two sites + witness)" } else { "" },
            self.voters,
            self.groups.len(),
            if self.fence_command { ", a fence command" } else { "" },
            kinds.join(" ")
        )
    }
}

/// The name of a fault's kind, as `--without` takes it.
pub fn kind_name(k: &FaultKind) -> &'static str {
    match k {
        FaultKind::Partition(_) => "partition",
        FaultKind::SiteCut => "site-cut",
        FaultKind::OneWay(_) => "one-way",
        FaultKind::PathDown(..) => "path-down",
        FaultKind::Crash(_) => "crash",
        FaultKind::PowerLoss(_) => "power-loss",
        FaultKind::Stall(_) => "stall",
        FaultKind::Busy(_) => "busy",
        FaultKind::Standby(_) => "standby",
        FaultKind::Maintenance(_) => "maintenance",
        FaultKind::Disable(_) => "disable",
        FaultKind::Move(..) => "move",
        FaultKind::ResourceCrash(_) => "resource-crash",
    }
}

/// Every fault kind's name, and `fence`: no fence command configured.
pub const KINDS: [&str; 14] = [
    "partition",
    "site-cut",
    "one-way",
    "path-down",
    "crash",
    "power-loss",
    "stall",
    "busy",
    "standby",
    "maintenance",
    "disable",
    "move",
    "resource-crash",
    "fence",
];

/// A fault, briefly.
pub fn describe(k: &FaultKind) -> String {
    match k {
        FaultKind::Partition(m) => format!("partition{m:?}"),
        FaultKind::SiteCut => "site-cut".into(),
        FaultKind::OneWay(l) => format!("one-way{l:?}"),
        FaultKind::PathDown(n, p) => format!("path-down(n{n}/{p})"),
        FaultKind::Crash(n) => format!("crash(n{n})"),
        FaultKind::PowerLoss(n) => format!("power-loss(n{n})"),
        FaultKind::Stall(n) => format!("stall(n{n})"),
        FaultKind::Busy(n) => format!("busy(n{n})"),
        FaultKind::Standby(n) => format!("standby(n{n})"),
        FaultKind::Maintenance(n) => format!("maintenance(n{n})"),
        FaultKind::Disable(g) => format!("disable({g})"),
        FaultKind::Move(g, n) => format!("move({g}->n{n})"),
        FaultKind::ResourceCrash(g) => format!("resource-crash({g})"),
    }
}

fn faults(rng: &mut fastrand::Rng, nodes: &[NodeSetup], groups: &[(String, GroupSpec)], sites: bool) -> Vec<Fault> {
    let n = nodes.len();
    let ids: Vec<NodeId> = nodes.iter().map(|s| s.id).collect();
    let pick = |rng: &mut fastrand::Rng| ids[rng.usize(0..ids.len())];
    let mut out = Vec::new();
    for _ in 0..rng.usize(2..=8) {
        let at = rng.u64(FAULTS_FROM_US..HEAL_US - 500_000);
        // Mostly short (around the lease), sometimes long.
        let len = match rng.u8(0..4) {
            0 => rng.u64(100_000..1_000_000),
            1 | 2 => rng.u64(300_000..3_000_000),
            _ => rng.u64(3_000_000..8_000_000),
        };
        let end = (at + len).min(HEAL_US);
        let kind = match rng.u8(0..20) {
            0..=2 => {
                let mut all = ids.clone();
                rng.shuffle(&mut all);
                let extra = usize::from(rng.u8(0..4) == 0);
                all.truncate(rng.usize(1..=(n - 1) / 2 + extra));
                all.sort_unstable();
                FaultKind::Partition(all)
            }
            3 if sites => FaultKind::SiteCut,
            3 | 4 => {
                // One node loses its outgoing traffic, or one link one way.
                let from = pick(rng);
                let to: Vec<NodeId> = if rng.bool() {
                    ids.iter().copied().filter(|i| *i != from).collect()
                } else {
                    let mut t = pick(rng);
                    while t == from {
                        t = pick(rng);
                    }
                    vec![t]
                };
                FaultKind::OneWay(to.into_iter().map(|t| (from, t)).collect())
            }
            5 => FaultKind::PathDown(pick(rng), rng.usize(0..2)),
            6 | 7 => FaultKind::Crash(pick(rng)),
            8 | 9 => FaultKind::PowerLoss(pick(rng)),
            10 | 11 => FaultKind::Stall(pick(rng)),
            12 => FaultKind::Busy(pick(rng)),
            13 => FaultKind::Standby(pick(rng)),
            14 => FaultKind::Maintenance(pick(rng)),
            15 => FaultKind::Disable(groups[rng.usize(0..groups.len())].0.clone()),
            16 => {
                let (g, spec) = &groups[rng.usize(0..groups.len())];
                let to = &spec.nodes[rng.usize(0..spec.nodes.len())];
                let id = nodes.iter().find(|s| &s.name == to).map(|s| s.id).unwrap_or(1);
                FaultKind::Move(g.clone(), id)
            }
            _ => FaultKind::ResourceCrash(groups[rng.usize(0..groups.len())].0.clone()),
        };
        out.push(Fault { at_us: at, end_us: end, kind });
    }
    out.sort_by_key(|f| f.at_us);
    out
}
