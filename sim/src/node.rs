//! A simulated node: what survives on it (power, disk, resource processes,
//! the watchdog) and its agent, whose loops mirror `src/agent.rs` —
//! heartbeats and stepping out, the lease timer, the executor with its
//! claims and reports, and on the leader the scheduler and autopilot —
//! around the product's real liveness, scheduler, autopilot and state
//! machine.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem::config::{AutopilotConfig, FencingConfig, LivenessConfig};
use tandem::failover::{Failover, Policy};
use tandem::lease::{Effect as LeaseEffect, LeaseCore, Tick};
use tandem::liveness::frame::{self, KeyRing};
use tandem::liveness::{answer, heartbeat_sender, take_in, AnswerLimiter, Heartbeat, Identity, Liveness};
use tandem::reconcile::Reconciler;
use tandem_raft::state::ClusterState;
use tandem_raft::NodeId;

use crate::clock::Clock;
use crate::scenario::NodeSetup;
use crate::world::{Entry, Ev, Event, Msg, World};
use crate::Mutant;

/// The agent's loop periods, as `src/agent.rs` has them.
const LEASE_TICK_US: u64 = 100_000;
const GROUP_TICK_US: u64 = 100_000;
const SCHEDULER_TICK_US: u64 = 50_000;
const CHANGE_GAP_US: u64 = 10_000;
const RAFT_HEARTBEAT_US: u64 = 100_000;

/// As the agent: a voter whose reports stopped coming for two heartbeat
/// intervals may have heard anyone since (`Liveness::failover_status`).
pub fn stale_after() -> Duration {
    Duration::from_millis(LivenessConfig::default().heartbeat_interval_ms * 2)
}

/// The agent's periodic loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Heartbeat,
    Lease,
    Executor,
    Scheduler,
    Autopilot,
    /// Raft's own heartbeat from a node that believes it leads.
    Raft,
}

impl Loop {
    const ALL: [Loop; 6] = [Loop::Heartbeat, Loop::Lease, Loop::Executor, Loop::Scheduler, Loop::Autopilot, Loop::Raft];

    fn index(self) -> usize {
        self as usize
    }

    fn period_us(self) -> u64 {
        match self {
            Loop::Heartbeat => LivenessConfig::default().heartbeat_interval_ms * 1000,
            Loop::Lease => LEASE_TICK_US,
            Loop::Executor => GROUP_TICK_US,
            Loop::Scheduler => SCHEDULER_TICK_US,
            Loop::Autopilot => AutopilotConfig::default().interval_ms * 1000,
            Loop::Raft => RAFT_HEARTBEAT_US,
        }
    }
}

/// A resource process as it physically is (whatever the agent believes).
#[derive(Debug, Clone)]
pub struct Proc {
    pub id: u64,
    pub epoch: u64,
    /// Global time its start began.
    pub since: u64,
}

/// One group's resource in the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Not started, or to be started again after a failure.
    Idle,
    /// The start action runs (the process exists).
    Starting(u64),
    Up(u64),
    /// The stop action runs; the group leaves once it is done.
    Stopping(u64),
    /// Adopted after a restart, its process gone: the next round finds it
    /// ended.
    Gone,
}

#[derive(Debug, Clone)]
pub struct LocalGroup {
    pub epoch: u64,
    pub slot: Slot,
    /// Local restarts in the window, node ms.
    pub restarts: VecDeque<u64>,
}

/// A claim posted to the leader, waiting to be committed and applied here.
#[derive(Debug, Clone)]
pub struct Claim {
    pub epoch: u64,
    pub req: u64,
    pub sent_ms: u64,
    /// When the leader answered that it committed.
    pub ok_ms: Option<u64>,
}

/// The agent process: everything here is lost when it dies.
pub struct Agent {
    pub pid: u32,
    /// Global time it started.
    pub started_us: u64,
    pub liveness: Arc<Liveness>,
    /// The applied replicated state, and how far into the log.
    pub state: ClusterState,
    pub applied: usize,
    pub voters: Vec<NodeId>,
    /// Raft's `current_leader` as this node knows it.
    pub leader: Option<NodeId>,
    /// The lease core (`tandem::lease`).
    pub lease: LeaseCore,
    /// The reconciler (`tandem::reconcile`) and what runs here.
    pub reconciler: Reconciler,
    pub groups: BTreeMap<String, LocalGroup>,
    /// The leader's failover input (`tandem::failover`).
    pub failover: Failover,
    pub claims: BTreeMap<String, Claim>,
    /// Per group: claims confirmed since it last started here.
    pub unstarted_claims: BTreeMap<String, u32>,
    pub next_req: u64,
    /// The leader's scheduler proposals not answered yet.
    pub sched_inflight: usize,
    /// Per loop: the current timer's generation, and when it last ran.
    timers: [(u64, u64); 6],
    /// While frozen: the messages waiting in its sockets, the loops due.
    pub inbox: Vec<Msg>,
    pub deferred: Vec<Loop>,
    /// The immediate answers given to each peer lately.
    pub answered: AnswerLimiter,
}

pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub witness: bool,
    pub clock: Clock,
    pub powered: bool,
    pub stalled: bool,
    pub busy: bool,
    /// Faults in force on it: crash, power loss, stall, busy.
    pub faults: [u32; 4],
    /// Powered off by the fence command (until the heal).
    pub fenced_off: bool,
    // On disk: survives the agent and a power loss.
    pub lease_file_ms: u64,
    /// The run records: group -> epoch (what the watchdog guards).
    pub records: BTreeMap<String, u64>,
    pub persisted_applied: usize,
    pub known_term: u64,
    pub boot_voters: Vec<NodeId>,
    // Physically running.
    pub procs: BTreeMap<String, Proc>,
    pub watchdog_gen: u64,
    pub agent: Option<Agent>,
    /// Highest epoch per group this node ever applied (the checker's).
    pub max_epoch: BTreeMap<String, u64>,
}

impl Node {
    pub fn new(s: &NodeSetup, clock: Clock, applied: usize, voters: BTreeSet<NodeId>) -> Node {
        Node {
            id: s.id,
            name: s.name.clone(),
            ips: s.addresses.iter().map(|a| a.parse().expect("an IP address")).collect(),
            witness: s.witness,
            clock,
            powered: true,
            stalled: false,
            busy: false,
            faults: [0; 4],
            fenced_off: false,
            lease_file_ms: 0,
            records: BTreeMap::new(),
            persisted_applied: applied,
            known_term: 0,
            boot_voters: voters.into_iter().collect(),
            procs: BTreeMap::new(),
            watchdog_gen: 0,
            agent: None,
            max_epoch: BTreeMap::new(),
        }
    }
}

fn fencing() -> FencingConfig {
    FencingConfig::default()
}

impl World {
    pub fn local_ms(&self, id: NodeId) -> u64 {
        self.node(id).clock.local_ms(self.now)
    }

    pub(crate) fn instant(&self, id: NodeId) -> std::time::Instant {
        self.node(id).clock.instant(self.base, self.now)
    }

    /// Starts the agent process: a fresh liveness view, the state replayed
    /// from the log as far as it was applied, the lease inherited from the
    /// file, and the groups adopted from the run records.
    pub fn start_agent(&mut self, id: NodeId) {
        self.next_pid += 1;
        let pid = self.next_pid;
        let started = self.instant(id);
        let node_timeout = Duration::from_millis(LivenessConfig::default().node_timeout_ms);
        let n = &self.nodes[(id - 1) as usize];
        let mut state = ClusterState::default();
        let mut voters = n.boot_voters.clone();
        for e in &self.log[..n.persisted_applied] {
            match e {
                Entry::Cmd(c) => {
                    let _ = state.apply(c);
                }
                Entry::Voters(v) => voters = v.iter().copied().collect(),
            }
        }
        let groups = n
            .records
            .iter()
            .map(|(g, epoch)| {
                let slot = match n.procs.get(g) {
                    Some(p) => Slot::Up(p.id),
                    None => Slot::Gone,
                };
                (g.clone(), LocalGroup { epoch: *epoch, slot, restarts: VecDeque::new() })
            })
            .collect();
        let agent = Agent {
            pid,
            started_us: self.now,
            // Pids are never reused here: one is as good as a drawn number.
            liveness: Liveness::new_at(node_timeout, started, u64::from(pid)),
            state,
            applied: n.persisted_applied,
            voters,
            leader: None,
            lease: LeaseCore::new(fencing().lease_ms, n.lease_file_ms),
            reconciler: Reconciler::new(),
            groups,
            failover: Failover::new(Policy { fence_command: self.sc.fence_command, fenced_after: self.fenced_after() }),
            claims: BTreeMap::new(),
            unstarted_claims: BTreeMap::new(),
            next_req: 0,
            sched_inflight: 0,
            timers: [(0, 0); 6],
            inbox: Vec::new(),
            deferred: Vec::new(),
            answered: AnswerLimiter::default(),
        };
        self.nodes[(id - 1) as usize].agent = Some(agent);
        for l in Loop::ALL {
            let first = self.rng.u64(0..l.period_us());
            self.schedule_loop(id, l, first);
        }
        if !self.node(id).records.is_empty() {
            self.schedule_watchdog(id);
        }
    }

    fn schedule_loop(&mut self, id: NodeId, l: Loop, after_us: u64) {
        let local = self.node(id).clock.local_us(self.now) + after_us;
        let at = self.node(id).clock.global_us(local);
        let Some(a) = self.agent_mut(id) else { return };
        a.timers[l.index()].0 += 1;
        let (pid, gen) = (a.pid, a.timers[l.index()].0);
        self.schedule(at, Ev::Loop { node: id, pid, which: l, gen });
    }

    pub fn on_loop(&mut self, id: NodeId, pid: u32, l: Loop, gen: u64) {
        let n = self.node(id);
        let Some(a) = n.agent.as_ref().filter(|a| a.pid == pid && a.timers[l.index()].0 == gen) else { return };
        if n.stalled {
            if !a.deferred.contains(&l) {
                if let Some(a) = self.agent_mut(id) {
                    a.deferred.push(l);
                }
            }
            return;
        }
        self.run_loop(id, l);
    }

    /// Runs one round of loop `l`, then sets its next tick.
    pub fn run_loop(&mut self, id: NodeId, l: Loop) {
        let local = self.node(id).clock.local_us(self.now);
        if let Some(a) = self.agent_mut(id) {
            a.timers[l.index()].1 = local;
        }
        match l {
            Loop::Heartbeat => self.heartbeat_round(id),
            Loop::Lease => self.lease_round(id),
            Loop::Executor => self.executor_round(id),
            Loop::Scheduler => self.scheduler_round(id),
            Loop::Autopilot => self.autopilot_round(id),
            Loop::Raft => {
                let leads = self.node(id).agent.as_ref().is_some_and(|a| a.leader == Some(id));
                if leads {
                    self.broadcast(id);
                }
            }
        }
        if self.running(id) {
            self.schedule_loop(id, l, l.period_us());
        }
    }

    /// The replicated state changed here: the executor (and the leader's
    /// scheduler) run at once, at most one round per CHANGE_GAP.
    pub fn on_state_change(&mut self, id: NodeId) {
        self.check_claims(id);
        if !self.running(id) {
            return;
        }
        let local = self.node(id).clock.local_us(self.now);
        for l in [Loop::Executor, Loop::Scheduler] {
            let Some(a) = self.node(id).agent.as_ref() else { return };
            let last = a.timers[l.index()].1;
            let wait = (last + CHANGE_GAP_US).saturating_sub(local);
            self.schedule_loop(id, l, wait);
        }
    }

    // ---- messages ----

    pub fn receive(&mut self, id: NodeId, msg: Msg) {
        match msg {
            Msg::Heartbeat { datagram, from, path } => {
                // As the agent's receiver: verified with the keys of the state
                // applied here, then judged fresh or not (`liveness::take_in`).
                let ip = self.node(from).ips[path];
                let (now, now_ms) = (self.instant(id), self.local_ms(id));
                let cluster_id = self.cluster_id.clone();
                let Some(a) = self.agent_mut(id) else { return };
                let keys = KeyRing::from_state(&a.state.heartbeat_keys);
                let me = Identity { cluster_id, me: id, keys, stepped_out: a.lease.stepped_out() };
                if take_in(&a.liveness, &me, &datagram, ip, now, now_ms) != Ok(true) {
                    return;
                }
                // Answered at once on the path it came by, a few times per
                // peer per round at most, as the agent's receiver does.
                let Some(sender) = heartbeat_sender(&datagram) else { return };
                if !a.answered.allow(sender, now) {
                    return;
                }
                let via = self.node(id).ips[path];
                let Some(a) = self.node(id).agent.as_ref() else { return };
                // The agent waits for the next millisecond when one went out
                // in this one; here the answer leaves now, stamped with the
                // next (its lease counts 1 ms too long: the unsafe side, so
                // nothing is hidden).
                let Some(sent_ms) = a.liveness.claim_sent_ms(now_ms).or_else(|| a.liveness.claim_sent_ms(now_ms + 1))
                else {
                    return;
                };
                if let Some(d) = answer(&a.liveness, &me, (sender, via, ip), a.pid, now, sent_ms) {
                    self.send(id, sender, Msg::Heartbeat { datagram: d, from: id, path });
                }
            }
            Msg::Replicate { term, leader, commit } => {
                let known = self.node(id).known_term;
                if term < known {
                    // Tells the stale sender of the newer term (Raft's reply).
                    let (mine, commit) = match self.node(id).agent.as_ref() {
                        Some(a) => (a.leader, a.applied),
                        None => return,
                    };
                    if let Some(sender) = leader {
                        self.send(id, sender, Msg::Replicate { term: known, leader: mine, commit });
                    }
                    return;
                }
                let was = self.node(id).agent.as_ref().and_then(|a| a.leader);
                self.node_mut(id).known_term = term;
                if let Some(a) = self.agent_mut(id) {
                    a.leader = leader;
                }
                if was == Some(id) && leader != Some(id) {
                    self.log_line(format!("n{id}: learns it no longer leads (term {term}, leader {leader:?})"));
                }
                self.apply_to(id, commit);
            }
            Msg::Report { from, pid, req, group, epoch, event } => {
                self.apply_report(id, from, pid, req, &group, epoch, event)
            }
            Msg::Reply { pid, req, ok } => {
                let now_ms = self.local_ms(id);
                let Some(a) = self.agent_mut(id).filter(|a| a.pid == pid) else { return };
                let Some(name) = a.claims.iter().find(|(_, c)| c.req == req).map(|(n, _)| n.clone()) else {
                    return;
                };
                if ok {
                    if let Some(c) = a.claims.get_mut(&name) {
                        c.ok_ms = Some(now_ms);
                    }
                } else {
                    a.claims.remove(&name);
                }
                self.check_claims(id);
            }
        }
    }

    /// Where a report goes: this node if it believes it leads, the leader if
    /// this node hears it, nowhere otherwise (see `Agent::route`).
    fn route(&self, id: NodeId) -> Option<NodeId> {
        let a = self.node(id).agent.as_ref()?;
        let l = a.leader?;
        if l == id {
            return Some(id);
        }
        let addrs = a.state.nodes.get(&l).map(|r| r.addresses.clone()).unwrap_or_default();
        a.liveness.status(l, &addrs, self.instant(id)).alive.then_some(l)
    }

    pub(crate) fn post(&mut self, id: NodeId, group: &str, epoch: u64, event: Event) -> Option<u64> {
        let to = self.route(id)?;
        let a = self.agent_mut(id)?;
        a.next_req += 1;
        let (pid, req) = (a.pid, a.next_req);
        self.send(id, to, Msg::Report { from: id, pid, req, group: group.to_string(), epoch, event });
        Some(req)
    }

    // ---- heartbeats ----

    /// `Agent::heartbeat_round`: the lease core says whether to send this
    /// round's heartbeats, or to step out (cut off from a leader that a
    /// majority hears).
    fn heartbeat_round(&mut self, id: NodeId) {
        let now = self.instant(id);
        let sent_ms = self.local_ms(id);
        let cluster = self.cluster_id.clone();
        let Some(a) = self.agent_mut(id) else { return };
        let cut_off = a.lease.leader_to_watch(a.leader).is_some_and(|l| {
            let addrs = a.state.nodes.get(&l).map(|r| r.addresses.clone()).unwrap_or_default();
            a.liveness.cut_off_from(l, &addrs, &a.voters, id, stale_after(), now)
        });
        let leader = a.leader;
        let mut send = false;
        for e in a.lease.heartbeat_round(leader, cut_off) {
            match e {
                LeaseEffect::SendHeartbeats => send = true,
                LeaseEffect::StepOut { leader } => {
                    self.log_line(format!("n{id} steps out (cut off from the leader n{leader})"))
                }
                LeaseEffect::StepIn => self.log_line(format!("n{id} steps back in")),
                LeaseEffect::PersistLease { .. } | LeaseEffect::KillEverything => {}
            }
        }
        let Some(a) = self.node(id).agent.as_ref() else { return };
        // The agent waits a millisecond when an answer took this one; here
        // the round goes out (a receiver may drop that one as a replay).
        let _ = a.liveness.claim_sent_ms(sent_ms);
        let heard = a.liveness.heard_report(now);
        let key = KeyRing::from_state(&a.state.heartbeat_keys).map(|k| k.current);
        if !send && key.is_none() {
            return;
        }
        let mut out = Vec::new();
        for r in a.state.nodes.values().filter(|r| r.id != id) {
            // Stepped out: probes only (`Liveness::probe_to`), as the agent.
            let hb = match send {
                true => a.liveness.heartbeat_to(&cluster, id, r.id, a.pid, sent_ms, &heard),
                false => a.liveness.probe_to(&cluster, id, r.id, a.pid, sent_ms),
            };
            for path in 0..r.addresses.len().min(self.node(id).ips.len()) {
                // As `HeartbeatSockets::send_round`: the path's addresses, sealed.
                let to_addr = self.node(r.id).ips.get(path).copied();
                let hb = Heartbeat { via: Some(self.node(id).ips[path]), to_addr, ..hb.clone() };
                let datagram = match &key {
                    Some(k) => frame::encode(k, &hb),
                    None => serde_json::to_vec(&hb).unwrap_or_default(),
                };
                out.push((r.id, path, datagram));
            }
        }
        for (to, path, datagram) in out {
            self.send(id, to, Msg::Heartbeat { datagram, from: id, path });
        }
    }

    // ---- the lease ----

    /// `Agent::lease_round`: the lease core extends the lease from what a
    /// majority echoed (the lease file first), or lapses it: kill it all.
    fn lease_round(&mut self, id: NodeId) {
        let now_ms = self.local_ms(id);
        let has_records = !self.node(id).records.is_empty();
        let Some(a) = self.agent_mut(id) else { return };
        let voters: Vec<(NodeId, Option<u64>)> = a.voters.iter().map(|v| (*v, a.liveness.acked_ms(*v))).collect();
        let running = !a.groups.is_empty() || has_records;
        let was_held = a.lease.holds(now_ms);
        for e in a.lease.tick(Tick { now_ms, me: id, voters: &voters, running }) {
            match e {
                LeaseEffect::KillEverything => {
                    self.log_line(format!("n{id}: lease ran out: kills every resource"));
                    self.kill_local(id);
                }
                LeaseEffect::PersistLease { deadline_ms } => {
                    if !was_held {
                        self.log_line(format!("n{id}: lease taken (until {deadline_ms} ms)"));
                    }
                    self.node_mut(id).lease_file_ms = deadline_ms;
                    if let Some(a) = self.agent_mut(id) {
                        a.lease.persisted(deadline_ms);
                    }
                    self.schedule_watchdog(id);
                }
                LeaseEffect::SendHeartbeats | LeaseEffect::StepOut { .. } | LeaseEffect::StepIn => {}
            }
        }
    }

    /// SIGKILL to every resource process the agent knows of (`Fence::kill_all`).
    pub(crate) fn kill_local(&mut self, id: NodeId) {
        if self.sc.mutant == Some(Mutant::KeepRunning) {
            return;
        }
        let Some(a) = self.node(id).agent.as_ref() else { return };
        let mine: Vec<(String, u64)> = a
            .groups
            .iter()
            .filter_map(|(g, l)| match l.slot {
                Slot::Starting(p) | Slot::Up(p) | Slot::Stopping(p) => Some((g.clone(), p)),
                _ => None,
            })
            .collect();
        for (g, p) in mine {
            self.end_proc(id, &g, p);
        }
    }

    /// The process ends (stopped or killed).
    pub(crate) fn end_proc(&mut self, id: NodeId, g: &str, proc: u64) {
        let n = self.node_mut(id);
        if n.procs.get(g).is_some_and(|p| p.id == proc) {
            n.procs.remove(g);
            self.log_line(format!("n{id}: {g} no longer runs"));
        }
    }

    /// The watchdog wakes at the lease's deadline (late on a busy host).
    pub fn schedule_watchdog(&mut self, id: NodeId) {
        let late = if self.node(id).busy { self.rng.u64(0..=150_000) } else { self.rng.u64(0..=2_000) };
        let n = self.node_mut(id);
        n.watchdog_gen += 1;
        let at = n.clock.global_us(n.lease_file_ms * 1000) + late;
        let gen = n.watchdog_gen;
        self.schedule(at, Ev::Watchdog { node: id, gen });
    }

    /// The watchdog process (`watchdog::run`): past the lease it kills what
    /// the records name and removes the records.
    pub fn on_watchdog(&mut self, id: NodeId, gen: u64) {
        let n = self.node(id);
        if n.watchdog_gen != gen || !n.powered || n.records.is_empty() {
            return;
        }
        if n.clock.local_ms(self.now) < n.lease_file_ms {
            self.schedule_watchdog(id);
            return;
        }
        if self.sc.mutant == Some(Mutant::KeepRunning) {
            return;
        }
        let records: Vec<String> = n.records.keys().cloned().collect();
        self.log_line(format!("n{id}: watchdog: lease expired, kills {records:?}"));
        for g in records {
            if let Some(p) = self.node(id).procs.get(&g).map(|p| p.id) {
                self.end_proc(id, &g, p);
            }
        }
        self.node_mut(id).records.clear();
    }
}

/// The group leaves the executor (and the records).
pub(crate) fn a_remove(w: &mut World, id: NodeId, name: &str) {
    let n = w.node_mut(id);
    if let Some(a) = n.agent.as_mut() {
        a.groups.remove(name);
    }
    n.records.remove(name);
}
