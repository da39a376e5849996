//! The simulated world: the event queue, the clock steps, the network's
//! deliveries and the model of Raft (faults and the operator: `faults`).
//!
//! Raft is modelled, not simulated message by message (its own safety is
//! assumed): there is one committed log; a leader exists while it reaches a
//! majority of the voters, a new one is elected among the voters that reach
//! a majority once the old one has been unreachable for an election delay;
//! a proposal commits only through a leader that reaches a majority when it
//! commits; followers learn commits through delayed messages, so their
//! applied state lags. A deposed leader that has not heard of its successor
//! still believes it leads, and its proposals fail.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::Instant;

use tandem_raft::state::{ClusterState, Command, NodeSpec};
use tandem_raft::NodeId;

use crate::clock::Clock;
use crate::net::{Net, Site};
use crate::node::{Agent, Loop, Node};
use crate::scenario::{Scenario, DURATION_US, HEAL_US};
use crate::{fmt_us, Outcome, Params, Violation};

/// Simulated time advances in steps of this; the checker runs after each.
pub const STEP_US: u64 = 5_000;
/// Raft timing, as the product's defaults (docs/config.md, `[raft]`).
const ELECTION_MIN_US: u64 = 250_000;
const ELECTION_MAX_US: u64 = 450_000;

/// One entry of the committed log.
#[derive(Debug, Clone)]
pub enum Entry {
    Cmd(Command),
    /// A membership change: the new voter set.
    Voters(BTreeSet<NodeId>),
}

/// A node's report about a group, as the agent posts it to the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A claim (`ClaimRequest`): start me at this epoch.
    Claim,
    Stopped,
    Failed,
    StopFailed,
}

#[derive(Debug, Clone)]
pub enum Msg {
    /// A UDP heartbeat datagram (sealed as the agent seals it) on one path.
    Heartbeat { datagram: Vec<u8>, from: NodeId, path: usize },
    /// Raft's append/heartbeat from a node that believes it leads: its
    /// term, and how far the log is committed as it knows.
    Replicate { term: u64, leader: Option<NodeId>, commit: usize },
    /// A report or a claim posted to the leader.
    Report { from: NodeId, pid: u32, req: u64, group: String, epoch: u64, event: Event },
    /// The leader's answer to a report.
    Reply { pid: u32, req: u64, ok: bool },
}

/// Who waits for a proposal's outcome.
#[derive(Debug, Clone)]
pub enum Origin {
    /// The leader's own scheduler round (its agent's pid).
    Scheduler {
        node: NodeId,
        pid: u32,
    },
    Autopilot,
    /// A report from a node, answered by `via` once committed.
    Report {
        via: NodeId,
        to: NodeId,
        pid: u32,
        req: u64,
    },
    /// The operator's command number.
    Operator(usize),
}

#[derive(Debug)]
pub enum Ev {
    Deliver {
        from: NodeId,
        to: NodeId,
        msg: Msg,
    },
    Loop {
        node: NodeId,
        pid: u32,
        which: Loop,
        gen: u64,
    },
    Watchdog {
        node: NodeId,
        gen: u64,
    },
    StartDone {
        node: NodeId,
        proc: u64,
    },
    StopDone {
        node: NodeId,
        proc: u64,
    },
    Commit {
        node: NodeId,
        term: u64,
        entry: Entry,
        origin: Origin,
        basis: usize,
    },
    /// The fence command run by leader `leader` (agent `pid`) against
    /// `node` ends: confirmed (the node is off) or failed.
    FenceDone {
        leader: NodeId,
        pid: u32,
        node: NodeId,
        attempt: u64,
        ok: bool,
    },
    FaultStart(usize),
    FaultEnd(usize),
    Heal,
}

/// A queued event: its time, its order among events of that time, and
/// where it waits in the slab (events are large; the heap moves only this).
type Queued = Reverse<(u64, u64, usize)>;

/// An operator command waiting to be committed (retried until it is).
#[derive(Debug, Clone)]
pub struct OperatorCmd {
    pub cmd: Command,
    pub next_try: u64,
    pub in_flight: bool,
    pub done: bool,
}

pub struct World {
    pub seed: u64,
    pub params: Params,
    pub rng: fastrand::Rng,
    /// `Instant` of simulated time zero (node clocks are offsets from it).
    pub base: Instant,
    pub now: u64,
    pub step: u64,
    seq: u64,
    queue: BinaryHeap<Queued>,
    events: Vec<Option<Ev>>,
    free: Vec<usize>,
    pub sc: Scenario,
    pub nodes: Vec<Node>,
    pub net: Net,
    pub cluster_id: String,
    // The Raft model.
    pub log: Vec<Entry>,
    /// The state every committed entry applied.
    pub committed: ClusterState,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub voters: BTreeSet<NodeId>,
    leader_lost_at: Option<u64>,
    election_delay: u64,
    pub ops: Vec<OperatorCmd>,
    pub next_proc: u64,
    pub next_pid: u32,
    // The checker's.
    pub violations: Vec<Violation>,
    pub healed: bool,
    pub settled_at: Option<u64>,
    pub trace: Vec<String>,
}

impl World {
    pub fn new(seed: u64, params: &Params) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let sc = Scenario::generate(&mut rng, params);
        let sites: Vec<Site> = sc.nodes.iter().map(|n| n.site).collect();
        let net = Net::new(sites, sc.quality.clone());
        let cluster_id = format!("sim-{seed:016x}");
        // The log every node starts from: the cluster, its nodes, their
        // capacities, the groups (not yet placed), the voters.
        let mut log = Vec::new();
        for s in &sc.nodes {
            let node = NodeSpec {
                name: s.name.clone(),
                addresses: s.addresses.clone(),
                port: 7401,
                site: match s.site {
                    Site::None => None,
                    Site::A => Some("a".into()),
                    Site::B => Some("b".into()),
                    Site::Witness => Some("w".into()),
                },
                witness: s.witness,
            };
            log.push(Entry::Cmd(if s.id == 1 {
                Command::Bootstrap {
                    cluster_id: cluster_id.clone(),
                    node_id: 1,
                    node,
                    heartbeat_key: Some(heartbeat_key(seed)),
                }
            } else {
                Command::AddNode { node }
            }));
            if let Some(c) = s.capacity {
                log.push(Entry::Cmd(Command::SetAttribute {
                    name: s.name.clone(),
                    key: "capacity".into(),
                    value: c.to_string(),
                }));
            }
        }
        for (name, spec) in &sc.groups {
            log.push(Entry::Cmd(Command::PutGroup { name: name.clone(), spec: spec.clone() }));
        }
        log.push(Entry::Voters(sc.voters.clone()));
        let mut committed = ClusterState::default();
        for e in &log {
            if let Entry::Cmd(c) = e {
                committed.apply(c).expect("the initial log applies");
            }
        }
        let nodes: Vec<Node> = sc
            .nodes
            .iter()
            .map(|s| Node::new(s, Clock::new(0, s.uptime_us, s.ppm), log.len(), sc.voters.clone()))
            .collect();
        let mut w = World {
            seed,
            params: params.clone(),
            rng,
            base: Instant::now(),
            now: 0,
            step: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            free: Vec::new(),
            voters: sc.voters.clone(),
            sc,
            nodes,
            net,
            cluster_id,
            log,
            committed,
            term: 1,
            // Elected once the agents have run a while (see raft_step).
            leader: None,
            leader_lost_at: None,
            election_delay: 0,
            ops: Vec::new(),
            next_proc: 1,
            next_pid: 1000,
            violations: Vec::new(),
            healed: false,
            settled_at: None,
            trace: Vec::new(),
        };
        for id in 1..=w.nodes.len() as NodeId {
            w.start_agent(id);
        }
        for i in 0..w.sc.faults.len() {
            let f = &w.sc.faults[i];
            let (at, end) = (f.at_us, f.end_us);
            w.schedule(at, Ev::FaultStart(i));
            w.schedule(end, Ev::FaultEnd(i));
        }
        w.schedule(HEAL_US, Ev::Heal);
        w
    }

    pub fn run(mut self) -> Outcome {
        let summary = self.sc.summary();
        self.log_line(format!("scenario: {summary}"));
        let mut step_end = STEP_US;
        while step_end <= DURATION_US && self.violations.is_empty() {
            while self.queue.peek().is_some_and(|q| q.0 .0 <= step_end) {
                let Some(Reverse((at, _, slot))) = self.queue.pop() else { break };
                let Some(ev) = self.events[slot].take() else { continue };
                self.free.push(slot);
                self.now = at;
                self.handle(ev);
                if !self.violations.is_empty() {
                    break;
                }
            }
            self.step += 1;
            if !self.violations.is_empty() {
                break; // the first violation ends the scenario
            }
            self.now = step_end;
            self.raft_step();
            self.operator_step();
            self.check_step();
            step_end += STEP_US;
        }
        Outcome {
            seed: self.seed,
            steps: self.step,
            violations: self.violations,
            trace: self.trace,
            settled_after_us: self.settled_at.map(|t| t.saturating_sub(HEAL_US)),
            summary,
        }
    }

    // ---- plumbing ----

    pub fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(i) => {
                self.events[i] = Some(ev);
                i
            }
            None => {
                self.events.push(Some(ev));
                self.events.len() - 1
            }
        };
        self.queue.push(Reverse((at.max(self.now), self.seq, slot)));
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn agent_mut(&mut self, id: NodeId) -> Option<&mut Agent> {
        self.nodes[(id - 1) as usize].agent.as_mut()
    }

    pub fn tracing(&self) -> bool {
        self.params.trace
    }

    pub fn log_line(&mut self, line: String) {
        if self.params.trace {
            self.trace.push(format!("[{}] {line}", fmt_us(self.now)));
        }
    }

    pub fn violation(&mut self, what: String) {
        self.log_line(format!("VIOLATION: {what}"));
        self.violations.push(Violation { seed: self.seed, step: self.step, at_us: self.now, what });
    }

    /// Whether the node's agent runs its loops now (powered, alive, not frozen).
    pub fn running(&self, id: NodeId) -> bool {
        let n = self.node(id);
        n.powered && n.agent.is_some() && !n.stalled
    }

    /// Sends `msg` from `from` to `to`; heartbeats on `path`, the rest over TCP.
    pub fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let (ok, tcp) = match &msg {
            Msg::Heartbeat { path, .. } => (self.net.link(from, to, *path), false),
            _ => (self.net.tcp(from, to), true),
        };
        if !ok {
            return;
        }
        let Some(d) = self.net.delay(&mut self.rng, tcp) else { return };
        if self.net.duplicate(&mut self.rng) {
            let d2 = self.net.delay(&mut self.rng, tcp).unwrap_or(d);
            self.schedule(self.now + d2, Ev::Deliver { from, to, msg: msg.clone() });
        }
        self.schedule(self.now + d, Ev::Deliver { from, to, msg });
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Ev::Loop { node, pid, which, gen } => self.on_loop(node, pid, which, gen),
            Ev::Watchdog { node, gen } => self.on_watchdog(node, gen),
            Ev::StartDone { node, proc } => self.on_start_done(node, proc),
            Ev::StopDone { node, proc } => self.on_stop_done(node, proc),
            Ev::Commit { node, term, entry, origin, basis } => self.on_commit(node, term, entry, origin, basis),
            Ev::FenceDone { leader, pid, node, attempt, ok } => self.fence_done(leader, pid, node, attempt, ok),
            Ev::FaultStart(i) => self.fault(i, true),
            Ev::FaultEnd(i) => self.fault(i, false),
            Ev::Heal => self.heal(),
        }
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let n = self.node(to);
        if !n.powered || n.agent.is_none() {
            return; // nobody listens: refused, or lost
        }
        // The network may have been cut while the message was in flight.
        let up = match &msg {
            Msg::Heartbeat { path, .. } => self.net.link(from, to, *path),
            _ => self.net.tcp(from, to),
        };
        if !up {
            return;
        }
        if n.stalled {
            // Queued in the socket buffers until the agent runs again.
            if let Some(a) = self.agent_mut(to) {
                a.inbox.push(msg);
            }
            return;
        }
        self.receive(to, msg);
    }

    // ---- the Raft model ----

    /// Whether `id` leads effectively: its agent runs and it reaches a
    /// majority of the voters whose agents run.
    pub fn reaches_majority(&self, id: NodeId) -> bool {
        if !self.running(id) {
            return false;
        }
        let reached = self.voters.iter().filter(|v| **v == id || (self.running(**v) && self.net.tcp(id, **v))).count();
        reached * 2 > self.voters.len()
    }

    /// Whether a voter set change from the current one to `to` can commit.
    fn reaches_both(&self, id: NodeId, to: &BTreeSet<NodeId>) -> bool {
        let count = |set: &BTreeSet<NodeId>| {
            set.iter().filter(|v| **v == id || (self.running(**v) && self.net.tcp(id, **v))).count() * 2 > set.len()
        };
        self.running(id) && count(&self.voters) && count(to)
    }

    /// Once a step: loses the leader, or elects a new one.
    fn raft_step(&mut self) {
        if self.leader.is_some_and(|l| self.reaches_majority(l) && self.node(l).known_term == self.term) {
            self.leader_lost_at = None;
            return;
        }
        let lost = match self.leader_lost_at {
            Some(t) => t,
            None => {
                self.leader_lost_at = Some(self.now);
                // openraft: the followers' leader lease (the max timeout),
                // then a random election timeout; sometimes a split vote.
                let mut d = ELECTION_MAX_US + self.rng.u64(ELECTION_MIN_US..=ELECTION_MAX_US);
                if self.rng.u8(0..5) == 0 {
                    d += self.rng.u64(ELECTION_MIN_US..=ELECTION_MAX_US);
                }
                self.election_delay = d;
                return;
            }
        };
        if self.now < lost + self.election_delay {
            return;
        }
        // openraft: a node stands only after a leader lease and an election
        // timeout of its own since it started.
        let settled = |w: &World, v: NodeId| {
            w.node(v).agent.as_ref().is_some_and(|a| w.now >= a.started_us + ELECTION_MAX_US + ELECTION_MIN_US)
        };
        let candidates: Vec<NodeId> =
            self.voters.iter().copied().filter(|v| self.reaches_majority(*v) && settled(self, *v)).collect();
        if candidates.is_empty() {
            return;
        }
        let c = candidates[self.rng.usize(0..candidates.len())];
        self.term += 1;
        self.leader = Some(c);
        self.leader_lost_at = None;
        let term = self.term;
        self.log_line(format!("raft: n{c} elected leader, term {term}"));
        self.node_mut(c).known_term = term;
        let len = self.log.len();
        if let Some(a) = self.agent_mut(c) {
            a.leader = Some(c);
        }
        self.apply_to(c, len);
        self.broadcast(c);
    }

    /// The leader's append/heartbeat to every other node.
    pub fn broadcast(&mut self, from: NodeId) {
        let Some(a) = self.node(from).agent.as_ref() else { return };
        let (commit, term) = (a.applied, self.node(from).known_term);
        for to in 1..=self.nodes.len() as NodeId {
            if to != from {
                self.send(from, to, Msg::Replicate { term, leader: Some(from), commit });
            }
        }
    }

    /// A node that believes it leads proposes `entry`; it commits a moment
    /// later if the node still leads then.
    pub fn propose(&mut self, id: NodeId, entry: Entry, origin: Origin) {
        let believes = self.node(id).agent.as_ref().is_some_and(|a| a.leader == Some(id));
        if !believes {
            self.commit_failed(origin);
            return;
        }
        let basis = self.node(id).agent.as_ref().map(|a| a.applied).unwrap_or(0);
        // Replication to a majority and the fsync.
        let d = self.rng.u64(2 * self.net.quality.latency_us.0..=2 * self.net.quality.latency_us.1)
            + self.rng.u64(300..3_000);
        let term = self.node(id).known_term;
        self.schedule(self.now + d, Ev::Commit { node: id, term, entry, origin, basis });
    }

    fn on_commit(&mut self, id: NodeId, term: u64, entry: Entry, origin: Origin, basis: usize) {
        let ok = self.leader == Some(id)
            && self.term == term
            && match &entry {
                Entry::Voters(to) => self.reaches_both(id, to),
                Entry::Cmd(_) => self.reaches_majority(id),
            };
        if !ok {
            self.commit_failed(origin);
            return;
        }
        let applied = match &entry {
            Entry::Cmd(cmd) => {
                self.check_commit(cmd, basis);
                let r = self.committed.apply(cmd);
                if self.tracing() {
                    let what = match &r {
                        Ok(_) => "committed".to_string(),
                        Err(e) => format!("committed, refused: {e}"),
                    };
                    self.log_line(format!("n{id} {what}: {}", cmd_line(cmd)));
                }
                r.is_ok()
            }
            Entry::Voters(v) => {
                self.voters = v.clone();
                self.log_line(format!("n{id} committed voters {v:?}"));
                true
            }
        };
        self.log.push(entry);
        let len = self.log.len();
        self.apply_to(id, len);
        self.broadcast(id);
        self.commit_done(origin, applied);
    }

    fn commit_failed(&mut self, origin: Origin) {
        self.commit_done(origin, false);
    }

    fn commit_done(&mut self, origin: Origin, ok: bool) {
        match origin {
            Origin::Scheduler { node, pid } => {
                if let Some(a) = self.agent_mut(node).filter(|a| a.pid == pid) {
                    a.sched_inflight = a.sched_inflight.saturating_sub(1);
                }
            }
            Origin::Autopilot => {}
            Origin::Report { via, to, pid, req } => {
                // The answer goes back over the same connection.
                self.send(via, to, Msg::Reply { pid, req, ok });
            }
            Origin::Operator(i) => {
                let op = &mut self.ops[i];
                op.in_flight = false;
                if ok {
                    op.done = true;
                } else {
                    op.next_try = self.now + 200_000;
                }
            }
        }
    }

    /// Applies the committed log up to `upto` on node `id` (as far as it
    /// has it: a node only learns what was committed).
    pub fn apply_to(&mut self, id: NodeId, upto: usize) {
        let upto = upto.min(self.log.len());
        let Some(a) = self.nodes[(id - 1) as usize].agent.as_mut() else { return };
        if a.applied >= upto {
            return;
        }
        let from = a.applied;
        for i in from..upto {
            match &self.log[i] {
                Entry::Cmd(c) => {
                    let _ = a.state.apply(c);
                }
                Entry::Voters(v) => a.voters = v.iter().copied().collect(),
            }
        }
        a.applied = upto;
        self.nodes[(id - 1) as usize].persisted_applied = upto;
        self.check_epochs(id);
        self.on_state_change(id);
    }
}

/// A command, briefly.
pub fn cmd_line(c: &Command) -> String {
    match c {
        Command::SetPlacement { name, expected_epoch, node, phase, reason } => {
            format!("{name} epoch {}: {phase:?} on {node:?} ({reason})", expected_epoch + 1)
        }
        Command::ClaimGroup { name, node, expected_epoch } => {
            format!("claim {name} by n{node} at epoch {expected_epoch}")
        }
        Command::MarkGroupFailed { name, node, epoch } => format!("{name} failed on n{node} at epoch {epoch}"),
        other => format!("{other:?}"),
    }
}

/// The cluster's heartbeat key, from the seed (the agent draws it at random
/// when it bootstraps; here it must replay).
fn heartbeat_key(seed: u64) -> tandem_raft::state::HeartbeatSecret {
    let mut bytes = [0u8; tandem_raft::state::HeartbeatSecret::LEN];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = seed.rotate_left(i as u32 * 8) as u8 ^ i as u8;
    }
    tandem_raft::state::HeartbeatSecret::from_bytes(&bytes)
}
