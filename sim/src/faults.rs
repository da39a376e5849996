//! Faults and the operator: what each fault does to the network and the
//! nodes (power, agent, freeze, a busy host), the heal at the end, the
//! fence command's power-off, and the operator's commands, committed one at
//! a time through the leader.

use tandem_raft::state::{AdminState, Command};
use tandem_raft::NodeId;

use crate::clock::Clock;
use crate::fmt_us;
use crate::net::Net;
use crate::node::Loop;
use crate::scenario::{describe, FaultKind};
use crate::world::{Entry, Msg, OperatorCmd, Origin, World};

/// Per-node fault counters (faults may overlap).
const CRASH: usize = 0;
const POWER: usize = 1;
const STALL: usize = 2;
const BUSY: usize = 3;

impl World {
    // ---- the operator ----

    /// The operator's commands go one at a time, in order, each retried
    /// until it is committed.
    pub(crate) fn operator_step(&mut self) {
        let Some(l) = self.leader.filter(|l| self.running(*l)) else { return };
        let Some(i) = self.ops.iter().position(|o| !o.done) else { return };
        let op = &self.ops[i];
        if op.in_flight || op.next_try > self.now {
            return;
        }
        let cmd = op.cmd.clone();
        self.ops[i].in_flight = true;
        self.propose(l, Entry::Cmd(cmd), Origin::Operator(i));
    }

    fn operator(&mut self, cmd: Command) {
        self.ops.push(OperatorCmd { cmd, next_try: self.now, in_flight: false, done: false });
    }

    // ---- faults ----

    pub(crate) fn fault(&mut self, i: usize, start: bool) {
        let kind = self.sc.faults[i].kind.clone();
        if !start && self.healed {
            return;
        }
        self.log_line(format!("fault {} {}", if start { "begins" } else { "ends" }, describe(&kind)));
        match (kind, start) {
            (FaultKind::Partition(minority), s) => self.net.partition(i, &minority, s),
            (FaultKind::SiteCut, s) => {
                self.net.site_cut = if s { self.net.site_cut + 1 } else { self.net.site_cut.saturating_sub(1) }
            }
            (FaultKind::OneWay(links), s) => {
                for l in links {
                    Net::toggle(&mut self.net.one_way, l, s);
                }
            }
            (FaultKind::PathDown(n, p), s) => Net::toggle(&mut self.net.path_down, (n, p), s),
            (FaultKind::Crash(n), s) => self.node_fault(n, CRASH, s),
            (FaultKind::PowerLoss(n), s) => self.node_fault(n, POWER, s),
            (FaultKind::Stall(n), s) => self.node_fault(n, STALL, s),
            (FaultKind::Busy(n), s) => self.node_fault(n, BUSY, s),
            (FaultKind::Standby(n), s) | (FaultKind::Maintenance(n), s) => {
                let state = match (&self.sc.faults[i].kind, s) {
                    (_, false) => AdminState::Online,
                    (FaultKind::Standby(_), true) => AdminState::Standby,
                    _ => AdminState::Maintenance,
                };
                let name = self.node(n).name.clone();
                self.operator(Command::SetAdminState { name, state });
            }
            (FaultKind::Disable(g), s) => self.operator(Command::SetGroupEnabled { name: g, enabled: !s }),
            (FaultKind::Move(g, to), true) => self.operator(Command::MoveGroup { name: g, to }),
            (FaultKind::Move(..), false) => {}
            (FaultKind::ResourceCrash(g), true) => {
                let on: Vec<NodeId> = self.nodes.iter().filter(|n| n.procs.contains_key(&g)).map(|n| n.id).collect();
                for id in on {
                    self.log_line(format!("n{id}: resource of {g} dies"));
                    self.node_mut(id).procs.remove(&g);
                }
            }
            (FaultKind::ResourceCrash(_), false) => {}
        }
    }

    /// Every fault ends; the operator undoes what it did.
    pub(crate) fn heal(&mut self) {
        self.log_line("heal: every fault ends".into());
        self.healed = true;
        self.net.heal();
        for id in 1..=self.nodes.len() as NodeId {
            self.node_mut(id).faults = [0; 4];
            self.node_mut(id).fenced_off = false;
            self.reconcile_node(id);
            let name = self.node(id).name.clone();
            if self.committed.node_by_name(&name).is_some_and(|r| r.admin_state != Default::default()) {
                self.operator(Command::SetAdminState { name, state: Default::default() });
            }
        }
        let names: Vec<String> = self.committed.groups.keys().cloned().collect();
        for g in names {
            self.operator(Command::SetGroupEnabled { name: g.clone(), enabled: true });
            self.operator(Command::ClearGroupFailures { name: g });
        }
    }

    /// The fence command's outcome: a confirmed one powered the node off
    /// (until the heal; after it, the node is power-cycled, so that the
    /// cluster can settle); the leader that ran it hears of it. A
    /// confirmation is never a lie: the leader moves the node's groups at
    /// once on it.
    pub(crate) fn fence_done(&mut self, leader: NodeId, pid: u32, node: NodeId, attempt: u64, ok: bool) {
        self.log_line(format!("fence command against n{node}: {}", if ok { "confirmed off" } else { "failed" }));
        if ok {
            self.node_mut(node).fenced_off = true;
            self.reconcile_node(node);
            if self.healed {
                self.node_mut(node).fenced_off = false;
                self.reconcile_node(node);
            }
        }
        let now_ms = self.local_ms(leader);
        if let Some(a) = self.agent_mut(leader).filter(|a| a.pid == pid) {
            a.failover.fence_done(node, attempt, ok, now_ms);
        }
    }

    fn node_fault(&mut self, id: NodeId, kind: usize, on: bool) {
        let c = &mut self.node_mut(id).faults[kind];
        *c = if on { *c + 1 } else { c.saturating_sub(1) };
        self.reconcile_node(id);
    }

    /// Brings the node to what the faults in force on it say: powered or
    /// not, its agent dead or running, frozen or not, busy or not.
    fn reconcile_node(&mut self, id: NodeId) {
        let f = self.node(id).faults;
        if f[POWER] > 0 || self.node(id).fenced_off {
            self.power_off(id);
        } else {
            self.power_on(id);
        }
        if self.node(id).powered {
            if f[CRASH] > 0 {
                self.crash_agent(id);
            } else {
                self.restart_agent(id);
            }
        }
        let stall = f[STALL] > 0 && self.node(id).agent.is_some();
        if stall && !self.node(id).stalled {
            self.node_mut(id).stalled = true;
            self.log_line(format!("n{id}: agent frozen"));
        } else if !stall {
            self.wake(id);
        }
        self.node_mut(id).busy = f[BUSY] > 0;
    }

    fn crash_agent(&mut self, id: NodeId) {
        let n = self.node_mut(id);
        if n.agent.take().is_some() {
            n.stalled = false;
            self.log_line(format!("n{id}: agent crashes (resources and watchdog live on)"));
        }
        self.lose_leader(id);
    }

    fn restart_agent(&mut self, id: NodeId) {
        if self.node(id).powered && self.node(id).agent.is_none() {
            self.log_line(format!("n{id}: agent starts"));
            self.start_agent(id);
        }
    }

    fn power_off(&mut self, id: NodeId) {
        let n = self.node_mut(id);
        if !n.powered {
            return;
        }
        n.powered = false;
        n.agent = None;
        n.stalled = false;
        n.procs.clear();
        n.watchdog_gen += 1;
        self.log_line(format!("n{id}: power lost (its disk keeps the lease file and the run records)"));
        self.lose_leader(id);
    }

    /// A restarted Raft node comes back as a follower: a leader that
    /// crashed leads no more.
    fn lose_leader(&mut self, id: NodeId) {
        if self.leader == Some(id) {
            self.leader = None;
        }
    }

    fn power_on(&mut self, id: NodeId) {
        if self.node(id).powered {
            return;
        }
        // CLOCK_BOOTTIME starts over; the agent is up a few seconds in.
        let boot = self.rng.u64(3_000_000..20_000_000);
        let ppm = self.node(id).clock.ppm();
        let now = self.now;
        let n = self.node_mut(id);
        n.powered = true;
        n.clock = Clock::new(now, boot, ppm);
        // `RunDir::read_lease`: a deadline written in an earlier boot is
        // expired (the lease file's boot id no longer matches).
        n.lease_file_ms = 0;
        self.log_line(format!("n{id}: powered on, uptime {} when the agent starts", fmt_us(boot)));
    }

    fn wake(&mut self, id: NodeId) {
        if !self.node(id).stalled {
            return;
        }
        self.node_mut(id).stalled = false;
        self.log_line(format!("n{id}: agent runs again"));
        let Some(a) = self.agent_mut(id) else { return };
        let inbox = std::mem::take(&mut a.inbox);
        let deferred = std::mem::take(&mut a.deferred);
        // The loops and the buffered datagrams resume in no set order: the
        // runtime's tasks all become ready at once.
        let mut items: Vec<Result<Msg, Loop>> = inbox.into_iter().map(Ok).collect();
        for l in deferred {
            let at = self.rng.usize(0..=items.len());
            items.insert(at, Err(l));
        }
        let pid = self.node(id).agent.as_ref().map(|a| a.pid).unwrap_or(0);
        for it in items {
            if self.node(id).agent.as_ref().map(|a| a.pid) != Some(pid) || self.node(id).stalled {
                break;
            }
            match it {
                Ok(msg) => self.receive(id, msg),
                Err(l) => self.run_loop(id, l),
            }
        }
    }
}
