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

use tandem::autopilot::{self, Candidate};
use tandem::config::{AutopilotConfig, FencingConfig, LivenessConfig};
use tandem::liveness::Liveness;
use tandem::scheduler::{NodeInfo, Scheduler};
use tandem_raft::group::Phase;
use tandem_raft::state::{AdminState, ClusterState, Command};
use tandem_raft::NodeId;

use crate::clock::Clock;
use crate::scenario::NodeSetup;
use crate::world::{Entry, Ev, Event, Msg, Origin, World};
use crate::Mutant;

/// The agent's loop periods, as `src/agent.rs` has them.
const LEASE_TICK_US: u64 = 100_000;
const GROUP_TICK_US: u64 = 100_000;
const SCHEDULER_TICK_US: u64 = 50_000;
const CHANGE_GAP_US: u64 = 10_000;
const RAFT_HEARTBEAT_US: u64 = 100_000;
/// How long a claimed start waits for this node to apply its claim.
const CLAIM_APPLY_WAIT_MS: u64 = 1_000;
/// Longest wait for a peer's answer.
const PEER_TIMEOUT_MS: u64 = 5_000;
/// Minute of the day for failback windows (none are set).
const MINUTE_OF_DAY: u16 = 12 * 60;

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
    pub liveness: Arc<Liveness>,
    /// The applied replicated state, and how far into the log.
    pub state: ClusterState,
    pub applied: usize,
    pub voters: Vec<NodeId>,
    /// Raft's `current_leader` as this node knows it.
    pub leader: Option<NodeId>,
    pub last_leader: NodeId,
    /// The lease's end, node ms (0: none).
    pub lease_ms: u64,
    pub lapsed: bool,
    pub stepped_out: bool,
    pub groups: BTreeMap<String, LocalGroup>,
    pub failed: BTreeSet<(String, u64)>,
    pub fenced: bool,
    pub claims: BTreeMap<String, Claim>,
    pub next_req: u64,
    /// The leader's scheduler proposals not answered yet.
    pub sched_inflight: usize,
    /// Per loop: the current timer's generation, and when it last ran.
    timers: [(u64, u64); 6],
    /// While frozen: the messages waiting in its sockets, the loops due.
    pub inbox: Vec<Msg>,
    pub deferred: Vec<Loop>,
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

    fn instant(&self, id: NodeId) -> std::time::Instant {
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
            liveness: Liveness::new_at(node_timeout, started),
            state,
            applied: n.persisted_applied,
            voters,
            leader: None,
            last_leader: 0,
            lease_ms: n.lease_file_ms,
            lapsed: false,
            stepped_out: false,
            groups,
            failed: BTreeSet::new(),
            fenced: false,
            claims: BTreeMap::new(),
            next_req: 0,
            sched_inflight: 0,
            timers: [(0, 0); 6],
            inbox: Vec::new(),
            deferred: Vec::new(),
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
            Msg::Heartbeat { hb, path } => {
                let cluster = self.cluster_id.clone();
                if hb.cluster_id != cluster || hb.to != id {
                    return;
                }
                let ip = self.node(hb.from).ips[path];
                let now = self.instant(id);
                if let Some(a) = self.agent_mut(id) {
                    a.liveness.record(hb, ip, now);
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

    fn post_report(&mut self, id: NodeId, group: &str, epoch: u64, event: Event) -> Option<u64> {
        let to = self.route(id)?;
        let a = self.agent_mut(id)?;
        a.next_req += 1;
        let (pid, req) = (a.pid, a.next_req);
        self.send(id, to, Msg::Report { from: id, pid, req, group: group.to_string(), epoch, event });
        Some(req)
    }

    /// On the leader: records what a node reported (`Agent::apply_report`).
    #[allow(clippy::too_many_arguments)]
    fn apply_report(&mut self, id: NodeId, from: NodeId, pid: u32, req: u64, name: &str, epoch: u64, ev: Event) {
        let origin = Origin::Report { via: id, to: from, pid, req };
        let Some(a) = self.node(id).agent.as_ref() else { return };
        let Some(g) = a.state.groups.get(name) else {
            self.send(id, from, Msg::Reply { pid, req, ok: false });
            return;
        };
        let cmd = match ev {
            Event::Starting => Some(Command::ClaimGroup { name: name.into(), node: from, expected_epoch: epoch }),
            _ if g.placement.node != Some(from) || g.placement.epoch != epoch => None,
            Event::Stopped if g.placement.phase == Phase::Stopping => Some(Command::SetPlacement {
                name: name.into(),
                expected_epoch: epoch,
                node: None,
                phase: Phase::Stopped,
                reason: format!("stopped on n{from} ({})", g.placement.reason),
            }),
            Event::Failed if g.placement.phase == Phase::Started && !g.failed_on.contains(&from) => {
                Some(Command::MarkGroupFailed { name: name.into(), node: from, epoch })
            }
            _ => None,
        };
        match cmd {
            Some(c) => self.propose(id, Entry::Cmd(c), origin),
            None => self.send(id, from, Msg::Reply { pid, req, ok: true }),
        }
    }

    // ---- heartbeats ----

    /// `Agent::heartbeat_round`: one round of heartbeats, unless this node
    /// is cut off from a leader that a majority hears (it steps out).
    fn heartbeat_round(&mut self, id: NodeId) {
        let now = self.instant(id);
        let sent_ms = self.local_ms(id);
        let cluster = self.cluster_id.clone();
        let Some(a) = self.agent_mut(id) else { return };
        if let Some(l) = a.leader {
            a.last_leader = l;
        }
        let leader = Some(a.last_leader).filter(|l| *l != 0);
        let cut_off = leader.is_some_and(|l| {
            let addrs = a.state.nodes.get(&l).map(|r| r.addresses.clone()).unwrap_or_default();
            a.liveness.cut_off_from(l, &addrs, &a.voters, id, now)
        });
        let changed = cut_off != a.stepped_out;
        a.stepped_out = cut_off;
        if changed {
            let what = if cut_off { "steps out (cut off from the leader)" } else { "steps back in" };
            self.log_line(format!("n{id} {what}"));
        }
        if cut_off {
            return;
        }
        let Some(a) = self.node(id).agent.as_ref() else { return };
        let heard = a.liveness.heard_report(now);
        let mut out = Vec::new();
        for r in a.state.nodes.values().filter(|r| r.id != id) {
            let hb = a.liveness.heartbeat_to(&cluster, id, r.id, a.pid, sent_ms, &heard);
            out.push((r.id, r.addresses.len(), hb));
        }
        for (to, paths, hb) in out {
            for path in 0..paths.min(self.node(id).ips.len()) {
                self.send(id, to, Msg::Heartbeat { hb: hb.clone(), path });
            }
        }
    }

    // ---- the lease ----

    /// `Agent::quorum_acked_ms`: when this node sent the heartbeat a
    /// majority of voters has echoed (itself counting as now).
    fn quorum_acked_ms(&self, id: NodeId, now_ms: u64) -> Option<u64> {
        let a = self.node(id).agent.as_ref()?;
        let mut acked: Vec<u64> =
            a.voters.iter().filter_map(|v| if *v == id { Some(now_ms) } else { a.liveness.acked_ms(*v) }).collect();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        acked.get(a.voters.len() / 2).copied()
    }

    /// `Agent::lease_round`: extends the lease from a majority's echoes;
    /// a lease that ran out with something running kills it all.
    fn lease_round(&mut self, id: NodeId) {
        let now_ms = self.local_ms(id);
        let has_records = !self.node(id).records.is_empty();
        let Some(a) = self.agent_mut(id) else { return };
        let current = a.lease_ms;
        if current <= now_ms {
            let running = !a.groups.is_empty() || has_records;
            if running && !a.lapsed {
                a.lapsed = true;
                self.log_line(format!("n{id}: lease ran out: kills every resource"));
                self.kill_local(id);
            }
        }
        if self.node(id).agent.as_ref().is_none_or(|a| a.lapsed) {
            return;
        }
        let Some(heard_ms) = self.quorum_acked_ms(id, now_ms) else { return };
        if current <= now_ms && heard_ms < current {
            return;
        }
        let deadline = heard_ms + fencing().lease_ms;
        if deadline > current {
            if current <= now_ms {
                self.log_line(format!("n{id}: lease taken (until {deadline} ms)"));
            }
            self.node_mut(id).lease_file_ms = deadline;
            if let Some(a) = self.agent_mut(id) {
                a.lease_ms = deadline;
            }
            self.schedule_watchdog(id);
        }
    }

    /// SIGKILL to every resource process the agent knows of (`Fence::kill_all`).
    fn kill_local(&mut self, id: NodeId) {
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
    fn end_proc(&mut self, id: NodeId, g: &str, proc: u64) {
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

    // ---- the executor ----

    /// `Agent::executor_round`: fences after a lapse, claims the groups
    /// placed here, then reconciles.
    fn executor_round(&mut self, id: NodeId) {
        let Some(a) = self.node(id).agent.as_ref() else { return };
        if a.lapsed {
            self.fence(id);
            if let Some(a) = self.agent_mut(id) {
                a.lapsed = false;
            }
        }
        let Some(a) = self.node(id).agent.as_ref() else { return };
        if a.state.groups.is_empty() && a.groups.is_empty() {
            return;
        }
        let now_ms = self.local_ms(id);
        if now_ms < a.lease_ms {
            let wanted: Vec<(String, u64)> = a
                .state
                .groups
                .values()
                .filter(|g| g.placement.node == Some(id) && g.placement.phase == Phase::Started)
                .filter(|g| !a.groups.contains_key(&g.name) && !a.failed.contains(&(g.name.clone(), g.placement.epoch)))
                .filter(|g| a.claims.get(&g.name).is_none_or(|c| c.epoch != g.placement.epoch))
                .map(|g| (g.name.clone(), g.placement.epoch))
                .collect();
            for (name, epoch) in wanted {
                if let Some(req) = self.post_report(id, &name, epoch, Event::Starting) {
                    if let Some(a) = self.agent_mut(id) {
                        a.claims.insert(name, Claim { epoch, req, sent_ms: now_ms, ok_ms: None });
                    }
                }
            }
        }
        self.check_claims(id);
        self.tick(id, &BTreeSet::new());
    }

    /// Claims confirmed (committed and applied here) start at once; stale
    /// or timed-out ones are dropped.
    fn check_claims(&mut self, id: NodeId) {
        let now_ms = self.local_ms(id);
        let Some(a) = self.agent_mut(id) else { return };
        let mut confirmed = BTreeSet::new();
        let mut drop = Vec::new();
        for (name, c) in &a.claims {
            let want = c.epoch + 1;
            let applied = a.state.groups.get(name).map(|g| (g.placement.node, g.placement.epoch));
            match (c.ok_ms, applied) {
                (Some(_), Some((Some(n), e))) if n == id && e == want => {
                    confirmed.insert((name.clone(), want));
                    drop.push(name.clone());
                }
                (_, Some((_, e))) if e > want => drop.push(name.clone()),
                (Some(ok), _) if now_ms >= ok + CLAIM_APPLY_WAIT_MS => drop.push(name.clone()),
                (None, _) if now_ms >= c.sent_ms + PEER_TIMEOUT_MS => drop.push(name.clone()),
                _ => {}
            }
        }
        for name in drop {
            a.claims.remove(&name);
        }
        if !confirmed.is_empty() && self.running(id) {
            self.tick(id, &confirmed);
        }
    }

    /// `Executor::fence`: kills everything local at once; the records go.
    fn fence(&mut self, id: NodeId) {
        self.kill_local(id);
        let keep = self.sc.mutant == Some(Mutant::KeepRunning);
        let n = self.node_mut(id);
        if !keep {
            n.records.clear();
        }
        if let Some(a) = n.agent.as_mut() {
            a.groups.clear();
            a.fenced = true;
        }
    }

    /// `Executor::tick`: stop what must not run here, report, start what
    /// is placed here (a new start only when `confirmed`), monitor.
    fn tick(&mut self, id: NodeId, confirmed: &BTreeSet<(String, u64)>) {
        let now_ms = self.local_ms(id);
        let Some(a) = self.node(id).agent.as_ref() else { return };
        if now_ms >= a.lease_ms {
            self.fence(id);
            return;
        }
        let no_claim = self.sc.mutant == Some(Mutant::NoClaim);
        let Some(a) = self.agent_mut(id) else { return };
        a.fenced = false;
        let maintenance = a.state.nodes.get(&id).is_some_and(|n| n.admin_state == AdminState::Maintenance);
        let stop: Vec<String> = a
            .groups
            .iter()
            .filter(|(name, l)| {
                let keep = a
                    .state
                    .groups
                    .get(*name)
                    .is_some_and(|g| g.placement.node == Some(id) && g.placement.phase == Phase::Started);
                !keep && !matches!(l.slot, Slot::Stopping(_))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stop {
            self.begin_stop(id, &name);
        }
        let Some(a) = self.agent_mut(id) else { return };
        let state_groups = &a.state.groups;
        a.failed.retain(|(name, epoch)| {
            state_groups.get(name).is_some_and(|g| g.placement.epoch == *epoch && !g.failed_on.contains(&id))
        });
        let mut reports = Vec::new();
        let mut run = Vec::new();
        for g in a.state.groups.values().filter(|g| g.placement.node == Some(id)) {
            let epoch = g.placement.epoch;
            let local = a.groups.contains_key(&g.name);
            match g.placement.phase {
                Phase::Stopping | Phase::Stopped if local => {}
                Phase::Stopping | Phase::Stopped => reports.push((g.name.clone(), epoch, Event::Stopped)),
                Phase::Started if a.failed.contains(&(g.name.clone(), epoch)) => {
                    reports.push((g.name.clone(), epoch, Event::Failed))
                }
                Phase::Started => {
                    if maintenance {
                        continue;
                    }
                    if !local && !confirmed.contains(&(g.name.clone(), epoch)) && !no_claim {
                        continue;
                    }
                    run.push((g.name.clone(), epoch, g.spec.max_restarts, g.spec.restart_window_ms));
                }
            }
        }
        for (name, epoch, max, window) in run {
            if let Some(r) = self.run_group(id, &name, epoch, max, window) {
                reports.push(r);
            }
        }
        for (name, epoch, ev) in reports {
            self.post_report(id, &name, epoch, ev);
        }
    }

    /// `Executor::run`: starts the group if needed, watches it, restarts
    /// it within its threshold; past it, gives it up here.
    fn run_group(&mut self, id: NodeId, name: &str, epoch: u64, max: u32, window: u64) -> Option<(String, u64, Event)> {
        let now_ms = self.local_ms(id);
        let (alive, lease_ok) = {
            let n = self.node(id);
            let a = n.agent.as_ref()?;
            let proc = a.groups.get(name).and_then(|l| match l.slot {
                Slot::Starting(p) | Slot::Up(p) => Some(p),
                _ => None,
            });
            (proc.map(|p| n.procs.get(name).is_some_and(|x| x.id == p)), now_ms < a.lease_ms)
        };
        let a = self.agent_mut(id)?;
        let local = a.groups.entry(name.to_string()).or_insert_with(|| LocalGroup {
            epoch,
            slot: Slot::Idle,
            restarts: VecDeque::new(),
        });
        local.epoch = epoch;
        while local.restarts.front().is_some_and(|t| now_ms.saturating_sub(*t) > window) {
            local.restarts.pop_front();
        }
        let failed = match (&local.slot, alive) {
            // The lease may have run out while this round ran: start nothing.
            (Slot::Idle, _) if !lease_ok => return None,
            (Slot::Idle, _) => None,
            (Slot::Starting(_) | Slot::Up(_), Some(true)) | (Slot::Stopping(_), _) => return None,
            // Its process ended (crashed, or gone while no agent watched).
            _ if local.restarts.len() as u32 >= max => Some(true),
            _ => {
                local.restarts.push_back(now_ms);
                local.slot = Slot::Idle;
                Some(false)
            }
        };
        match failed {
            None => {
                self.spawn(id, name, epoch);
                None
            }
            Some(false) => {
                self.log_line(format!("n{id}: {name} found ended: restarts it"));
                None
            }
            Some(true) => {
                self.log_line(format!("n{id}: {name} failed past its restart threshold"));
                a_remove(self, id, name);
                let a = self.agent_mut(id)?;
                a.failed.insert((name.to_string(), epoch));
                Some((name.to_string(), epoch, Event::Failed))
            }
        }
    }

    /// A start begins: the process exists from now on.
    fn spawn(&mut self, id: NodeId, name: &str, epoch: u64) {
        let proc = self.next_proc;
        self.next_proc += 1;
        self.log_line(format!("n{id}: starts {name} at epoch {epoch}"));
        self.check_start(id, name);
        let now = self.now;
        let n = self.node_mut(id);
        n.procs.insert(name.to_string(), Proc { id: proc, epoch, since: now });
        n.records.insert(name.to_string(), epoch);
        if let Some(l) = n.agent.as_mut().and_then(|a| a.groups.get_mut(name)) {
            l.slot = Slot::Starting(proc);
        }
        self.schedule_watchdog(id);
        let d = self.rng.u64(0..=300_000);
        self.schedule(self.now + d, Ev::StartDone { node: id, proc });
    }

    pub fn on_start_done(&mut self, id: NodeId, proc: u64) {
        let Some(a) = self.agent_mut(id) else { return };
        for l in a.groups.values_mut() {
            if l.slot == Slot::Starting(proc) {
                l.slot = Slot::Up(proc);
            }
        }
    }

    /// The stop action begins; the group leaves once it is done.
    fn begin_stop(&mut self, id: NodeId, name: &str) {
        let n = &mut self.nodes[(id - 1) as usize];
        let Some(l) = n.agent.as_mut().and_then(|a| a.groups.get_mut(name)) else { return };
        match l.slot {
            Slot::Starting(p) | Slot::Up(p) if n.procs.get(name).is_some_and(|x| x.id == p) => {
                l.slot = Slot::Stopping(p);
                self.log_line(format!("n{id}: stops {name}"));
                let d = self.rng.u64(10_000..=300_000);
                self.schedule(self.now + d, Ev::StopDone { node: id, proc: p });
            }
            _ => a_remove(self, id, name),
        }
    }

    pub fn on_stop_done(&mut self, id: NodeId, proc: u64) {
        let Some(name) = self.node(id).procs.iter().find(|(_, p)| p.id == proc).map(|(g, _)| g.clone()) else {
            return;
        };
        self.end_proc(id, &name, proc);
        let mine = self
            .node(id)
            .agent
            .as_ref()
            .and_then(|a| a.groups.get(&name))
            .is_some_and(|l| l.slot == Slot::Stopping(proc));
        if mine {
            a_remove(self, id, &name);
            if self.running(id) {
                self.tick(id, &BTreeSet::new());
            }
        }
    }

    // ---- the leader ----

    /// `Agent::scheduler_round`: on the leader, commits every placement
    /// change the scheduler decides from this node's liveness view.
    fn scheduler_round(&mut self, id: NodeId) {
        let now = self.instant(id);
        let Some(a) = self.node(id).agent.as_ref() else { return };
        if a.leader != Some(id) || a.state.groups.is_empty() || a.sched_inflight > 0 {
            return;
        }
        let f = fencing();
        let liveness_cfg = LivenessConfig::default();
        let fenced_after = match self.sc.mutant {
            Some(Mutant::Margin0) => Duration::from_millis(f.lease_ms),
            _ => Duration::from_millis(f.lease_ms + f.margin_ms),
        }
        .max(Duration::from_millis(liveness_cfg.node_timeout_ms));
        let nodes: Vec<NodeInfo> = a
            .state
            .nodes
            .values()
            .map(|r| {
                let me = r.id == id;
                let st = a.liveness.quorum_status(r.id, &r.addresses, &a.voters, id, now);
                NodeInfo {
                    id: r.id,
                    name: r.name.clone(),
                    admin: r.admin_state,
                    witness: r.witness,
                    alive: me || st.alive,
                    fenced: !me && !st.alive && st.down_for >= fenced_after,
                    capacity: r.attributes.get("capacity").and_then(|c| c.parse().ok()),
                }
            })
            .collect();
        let decisions = Scheduler::new(&nodes, &a.state.groups, MINUTE_OF_DAY).decide();
        let pid = a.pid;
        for d in decisions {
            if let Some(a) = self.agent_mut(id) {
                a.sched_inflight += 1;
            }
            let cmd = Command::SetPlacement {
                name: d.group,
                expected_epoch: d.expected_epoch,
                node: d.node,
                phase: d.phase,
                reason: d.reason,
            };
            self.propose(id, Entry::Cmd(cmd), Origin::Scheduler { node: id, pid });
        }
    }

    /// `Agent::autopilot_round`: on the leader, moves votes as autopilot says.
    fn autopilot_round(&mut self, id: NodeId) {
        let now = self.instant(id);
        let last = self.log.len();
        let Some(a) = self.node(id).agent.as_ref() else { return };
        if a.leader != Some(id) || !a.voters.contains(&id) {
            return;
        }
        let cfg = AutopilotConfig::default();
        let candidates: Vec<Candidate> = a
            .state
            .nodes
            .values()
            .map(|r| {
                let me = r.id == id;
                let st = a.liveness.status(r.id, &r.addresses, now);
                // The leader's replication progress: what the node has.
                let matched = self.node(r.id).agent.as_ref().map(|x| x.applied);
                Candidate {
                    id: r.id,
                    site: r.site.clone(),
                    witness: r.witness,
                    alive: me || st.alive,
                    down_for: if me { Duration::ZERO } else { st.down_for },
                    caught_up: me || matched.is_some_and(|i| i as u64 + cfg.max_lag_entries >= last as u64),
                }
            })
            .collect();
        let input = autopilot::Input {
            candidates,
            voters: a.voters.iter().copied().collect(),
            leader: id,
            target: self.sc.target,
            dead_after: Duration::from_millis(cfg.dead_voter_after_ms),
        };
        if let Some(voters) = autopilot::plan_voters(&input) {
            self.log_line(format!("n{id}: autopilot: voters {:?} -> {voters:?}", input.voters));
            self.propose(id, Entry::Voters(voters), Origin::Autopilot);
        }
    }
}

/// The group leaves the executor (and the records).
fn a_remove(w: &mut World, id: NodeId, name: &str) {
    let n = w.node_mut(id);
    if let Some(a) = n.agent.as_mut() {
        a.groups.remove(name);
    }
    n.records.remove(name);
}
