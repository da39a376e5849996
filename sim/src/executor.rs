//! The simulated executor: carries out what the product's reconciler
//! (`tandem::reconcile`) plans — kill everything, stop, claim through the
//! leader, start under a confirmed claim, monitor and restart, report —
//! on resources that take time to start and stop.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tandem::reconcile::{Command as Plan, Input, LeaseView, Local, Report};
use tandem_raft::state::AdminState;
use tandem_raft::NodeId;

use crate::node::{a_remove, Claim, LocalGroup, Proc, Slot};
use crate::world::{Ev, Event, World};
use crate::Mutant;

/// How long a claimed start waits for this node to apply its claim.
const CLAIM_APPLY_WAIT_MS: u64 = 1_000;
/// Longest wait for the leader's answer.
const PEER_TIMEOUT_MS: u64 = 5_000;
/// A resource's start and stop actions take up to this long.
const START_MAX_US: u64 = 300_000;
const STOP_MAX_US: u64 = 300_000;

impl World {
    /// `Agent::executor_round`: claims confirmed since are started, then
    /// one reconciliation round.
    pub fn executor_round(&mut self, id: NodeId) {
        self.check_claims(id);
        self.reconcile(id, &BTreeSet::new());
    }

    /// Claims committed and applied here start at once; stale or timed-out
    /// ones are dropped (`Agent::claim_start`).
    pub fn check_claims(&mut self, id: NodeId) {
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
        for (name, _) in &confirmed {
            *a.unstarted_claims.entry(name.clone()).or_default() += 1;
        }
        self.check_claim_churn(id);
        if !confirmed.is_empty() && self.running(id) {
            self.reconcile(id, &confirmed);
        }
    }

    /// One round of the reconciler, carried out.
    fn reconcile(&mut self, id: NodeId, confirmed: &BTreeSet<(String, u64)>) {
        let now_ms = self.local_ms(id);
        let Some(a) = self.agent_mut(id) else { return };
        if a.state.groups.is_empty() && a.groups.is_empty() && !a.lease.lapsed() {
            return;
        }
        let local: BTreeMap<String, Local> =
            a.groups.iter().map(|(n, l)| (n.clone(), Local { epoch: l.epoch, stop_blocked_until_ms: None })).collect();
        let maintenance = a.state.nodes.get(&id).is_some_and(|n| n.admin_state == AdminState::Maintenance);
        let lease = LeaseView { held: a.lease.holds(now_ms), lapsed: a.lease.lapsed() };
        // The simulated clusters have no `[ticket]`: no group is bound to it.
        let input = Input {
            me: id,
            groups: &a.state.groups,
            local: &local,
            confirmed,
            lease,
            maintenance,
            ticket_open: false,
            now_ms,
        };
        let plan = a.reconciler.plan(&input);
        for step in plan {
            match step {
                Plan::KillEverything => self.kill_everything(id),
                Plan::KillGroup { group } => unreachable!("no group is bound to a ticket here: {group}"),
                Plan::Stop { group } => self.begin_stop(id, &group),
                Plan::Claim { group, epoch } if self.sc.mutant == Some(Mutant::NoClaim) => {
                    // The mutant: start on the local state, unconfirmed.
                    self.run_group(id, &group, epoch, true)
                }
                Plan::Claim { group, epoch } => self.claim(id, &group, epoch, now_ms),
                Plan::Run { group, epoch, start } => self.run_group(id, &group, epoch, start),
                Plan::Report(r) => self.report(id, r),
            }
        }
    }

    /// The lease is not held: kill and drop everything local at once
    /// (`Executor::fence`); after a lapse, the lease may then be retaken.
    fn kill_everything(&mut self, id: NodeId) {
        if self.sc.mutant != Some(Mutant::KeepRunning) {
            self.kill_local(id);
            let n = self.node_mut(id);
            n.records.clear();
            if let Some(a) = n.agent.as_mut() {
                a.groups.clear();
            }
        }
        if let Some(a) = self.agent_mut(id) {
            if a.lease.lapsed() {
                a.lease.everything_stopped();
            }
        }
    }

    fn claim(&mut self, id: NodeId, group: &str, epoch: u64, now_ms: u64) {
        // One claim of a group at a time: the agent waits for each claim's
        // answer and apply before its round goes on.
        if self.node(id).agent.as_ref().is_some_and(|a| a.claims.contains_key(group)) {
            return;
        }
        if let Some(req) = self.post(id, group, epoch, Event::Claim) {
            if let Some(a) = self.agent_mut(id) {
                a.claims.insert(group.to_string(), Claim { epoch, req, sent_ms: now_ms, ok_ms: None });
            }
        }
    }

    fn report(&mut self, id: NodeId, r: Report) {
        let (group, epoch, ev) = match r {
            Report::Stopped { group, epoch } => (group, epoch, Event::Stopped),
            Report::Failed { group, epoch } => (group, epoch, Event::Failed),
            Report::StopFailed { group, epoch } => (group, epoch, Event::StopFailed),
        };
        self.post(id, &group, epoch, ev);
    }

    /// `Executor::run`: starts the group (a new one only with `start`),
    /// watches it, restarts it within its threshold; past it, gives it up.
    fn run_group(&mut self, id: NodeId, name: &str, epoch: u64, start: bool) {
        let now_ms = self.local_ms(id);
        let n = self.node(id);
        let Some(a) = n.agent.as_ref() else { return };
        let Some(spec) = a.state.groups.get(name).map(|g| (g.spec.max_restarts, g.spec.restart_window_ms)) else {
            return;
        };
        if !start && !a.groups.contains_key(name) {
            return;
        }
        let alive = a.groups.get(name).and_then(|l| match l.slot {
            Slot::Starting(p) | Slot::Up(p) | Slot::Stopping(p) => Some(n.procs.get(name).is_some_and(|x| x.id == p)),
            _ => None,
        });
        if a.groups.get(name).is_some_and(|l| matches!(l.slot, Slot::Stopping(_))) {
            // A stop that ended while the agent could not see it: done now.
            if alive != Some(true) {
                self.stop_ended(id, name);
            }
            return;
        }
        let held = a.lease.holds(now_ms);
        let Some(a) = self.agent_mut(id) else { return };
        let local = a.groups.entry(name.to_string()).or_insert_with(|| LocalGroup {
            epoch,
            slot: Slot::Idle,
            restarts: VecDeque::new(),
        });
        local.epoch = epoch;
        let (max, window) = spec;
        while local.restarts.front().is_some_and(|t| now_ms.saturating_sub(*t) > window) {
            local.restarts.pop_front();
        }
        let failed = match (&local.slot, alive) {
            // The lease may have run out while this round ran: start nothing.
            (Slot::Idle, _) if !held => return,
            (Slot::Idle, _) => None,
            (Slot::Starting(_) | Slot::Up(_), Some(true)) => return,
            // Its process ended (it crashed, or went while no agent watched).
            _ if local.restarts.len() as u32 >= max => Some(true),
            _ => {
                local.restarts.push_back(now_ms);
                local.slot = Slot::Idle;
                Some(false)
            }
        };
        match failed {
            None => self.spawn(id, name, epoch),
            Some(false) => self.log_line(format!("n{id}: {name} found ended: restarts it")),
            Some(true) => {
                self.log_line(format!("n{id}: {name} failed past its restart threshold"));
                a_remove(self, id, name);
                let Some(a) = self.agent_mut(id) else { return };
                let r = a.reconciler.failed(name, epoch);
                self.report(id, r);
            }
        }
    }

    /// A start begins: the process exists from now on, on record.
    fn spawn(&mut self, id: NodeId, name: &str, epoch: u64) {
        let proc = self.next_proc;
        self.next_proc += 1;
        self.log_line(format!("n{id}: starts {name} at epoch {epoch}"));
        self.check_start(id, name);
        let now = self.now;
        let n = self.node_mut(id);
        n.procs.insert(name.to_string(), Proc { id: proc, epoch, since: now });
        n.records.insert(name.to_string(), epoch);
        if let Some(a) = n.agent.as_mut() {
            a.unstarted_claims.remove(name);
            if let Some(l) = a.groups.get_mut(name) {
                l.slot = Slot::Starting(proc);
            }
        }
        self.schedule_watchdog(id);
        let d = self.rng.u64(0..=START_MAX_US);
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

    /// The stop action begins (not twice); the group leaves once it ends.
    fn begin_stop(&mut self, id: NodeId, name: &str) {
        let n = &mut self.nodes[(id - 1) as usize];
        let Some(l) = n.agent.as_mut().and_then(|a| a.groups.get_mut(name)) else { return };
        match l.slot {
            Slot::Stopping(p) if n.procs.get(name).is_some_and(|x| x.id == p) => {}
            Slot::Starting(p) | Slot::Up(p) if n.procs.get(name).is_some_and(|x| x.id == p) => {
                l.slot = Slot::Stopping(p);
                self.log_line(format!("n{id}: stops {name}"));
                let d = self.rng.u64(10_000..=STOP_MAX_US);
                self.schedule(self.now + d, Ev::StopDone { node: id, proc: p });
            }
            // Nothing runs: stopped at once.
            _ => self.stop_ended(id, name),
        }
    }

    pub fn on_stop_done(&mut self, id: NodeId, proc: u64) {
        // The process ends (if it did not die meanwhile) ...
        if let Some(name) = self.node(id).procs.iter().find(|(_, p)| p.id == proc).map(|(g, _)| g.clone()) {
            self.end_proc(id, &name, proc);
        }
        // ... and the agent that stopped it, if still there, moves on.
        let stopping = self
            .node(id)
            .agent
            .as_ref()
            .and_then(|a| a.groups.iter().find(|(_, l)| l.slot == Slot::Stopping(proc)).map(|(g, _)| g.clone()));
        if let Some(name) = stopping.filter(|_| self.running(id)) {
            self.stop_ended(id, &name);
        }
    }

    /// The group no longer runs here: off the records, reported stopped.
    fn stop_ended(&mut self, id: NodeId, name: &str) {
        a_remove(self, id, name);
        let Some(a) = self.agent_mut(id) else { return };
        if let Some(r) = a.reconciler.stopped(name) {
            self.report(id, r);
        }
    }
}
