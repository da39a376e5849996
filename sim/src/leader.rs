//! What a node does while it believes it leads: records reports and
//! claims (`Agent::apply_report`, `apply_claim`), commits the scheduler's
//! placements with the failover core's verdicts (`Agent::scheduler_round`),
//! and moves votes as autopilot says (`Agent::autopilot_round`).

use std::time::Duration;

use tandem::autopilot::{self, Candidate};
use tandem::config::{AutopilotConfig, FencingConfig, LivenessConfig};
use tandem::failover::{Effect as FailoverEffect, Seen};
use tandem::scheduler::{NodeInfo, Scheduler};
use tandem_raft::group::Phase;
use tandem_raft::state::Command;
use tandem_raft::NodeId;

use crate::world::{Entry, Ev, Event, Msg, Origin, World};
use crate::Mutant;

/// Minute of the day for failback windows (none are set).
const MINUTE_OF_DAY: u16 = 12 * 60;

impl World {
    /// `Config::fenced_after` (lease + margin, at least the node timeout);
    /// the margin0 mutant drops the margin.
    pub fn fenced_after(&self) -> Duration {
        let f = FencingConfig::default();
        let margin = if self.sc.mutant == Some(Mutant::Margin0) { 0 } else { f.margin_ms };
        Duration::from_millis(f.lease_ms + margin).max(Duration::from_millis(LivenessConfig::default().node_timeout_ms))
    }

    /// On the leader: records what node `from` reported or claimed.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_report(&mut self, id: NodeId, from: NodeId, pid: u32, req: u64, name: &str, epoch: u64, ev: Event) {
        let origin = Origin::Report { via: id, to: from, pid, req };
        let Some(a) = self.node(id).agent.as_ref() else { return };
        let Some(g) = a.state.groups.get(name) else {
            self.send(id, from, Msg::Reply { pid, req, ok: false });
            return;
        };
        let cmd = match ev {
            // Committed in log order: a placement change proposed before it
            // wins and this claim is refused, or this claim wins and that
            // change no longer matches the epoch.
            Event::Claim => {
                // `Agent::apply_claim`: before it is proposed.
                let now_ms = self.local_ms(id);
                if let Some(a) = self.agent_mut(id) {
                    a.failover.claimed(from, now_ms);
                }
                Some(Command::ClaimGroup { name: name.into(), node: from, expected_epoch: epoch })
            }
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

    /// `Agent::scheduler_round`: on the leader, the failover core says
    /// which silent nodes' groups may move, the scheduler decides, and the
    /// placements are proposed (one round at a time, as the agent awaits
    /// each).
    pub fn scheduler_round(&mut self, id: NodeId) {
        let now = self.instant(id);
        let now_ms = self.local_ms(id);
        let Some(a) = self.agent_mut(id) else { return };
        if a.leader != Some(id) || a.state.groups.is_empty() || a.sched_inflight > 0 {
            return;
        }
        // A node is offline only when no majority of voters can have heard
        // it: while one can, it may hold its lease and run its groups. A
        // voter whose reports stopped coming may have heard it meanwhile.
        let stale_after = crate::node::stale_after();
        let seen: Vec<(Seen, &tandem_raft::state::NodeRecord)> = a
            .state
            .nodes
            .values()
            .map(|r| {
                let st = a.liveness.failover_status(r.id, &r.addresses, &a.voters, id, stale_after, now);
                (Seen { id: r.id, alive: st.alive, down_for: st.down_for }, r)
            })
            .collect();
        let just: Vec<Seen> = seen.iter().map(|(s, _)| *s).collect();
        a.failover.lease(a.lease.holds(now_ms));
        let verdict = a.failover.round(id, &just, now_ms);
        let nodes: Vec<NodeInfo> = seen
            .iter()
            .map(|(s, r)| NodeInfo {
                id: r.id,
                name: r.name.clone(),
                admin: r.admin_state,
                witness: r.witness,
                alive: r.id == id || s.alive,
                fenced: verdict.may_move(r.id),
                capacity: r.attributes.get("capacity").and_then(|c| c.parse().ok()),
            })
            .collect();
        let decisions = Scheduler::new(&nodes, &a.state.groups, MINUTE_OF_DAY).decide();
        let pid = a.pid;
        let gone: Vec<String> = seen
            .iter()
            .filter(|(s, _)| verdict.may_move(s.id) && !decisions.is_empty())
            .map(|(s, _)| format!("n{} (silent {} ms)", s.id, s.down_for.as_millis()))
            .collect();
        a.sched_inflight += decisions.len();
        if !gone.is_empty() {
            self.log_line(format!("n{id} takes as gone: {}", gone.join(", ")));
        }
        for FailoverEffect::RunFenceCommand { node, attempt } in verdict.effects {
            self.check_fence(id, node);
            // A BMC's power-off takes a few hundred ms to seconds, a
            // hypervisor's a few ms: often within the lease wait, which a
            // confirmation cuts short. One in ten fails.
            let ok = self.rng.u8(0..10) != 0;
            let at = self.now + self.rng.u64(10_000..=2_000_000);
            self.log_line(format!("n{id}: runs the fence command against n{node}"));
            self.schedule(at, Ev::FenceDone { leader: id, pid, node, attempt, ok });
        }
        for d in decisions {
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
    pub fn autopilot_round(&mut self, id: NodeId) {
        let now = self.instant(id);
        let last = self.log.len() as u64;
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
                // The leader's replication progress: what the node holds.
                let matched = self.node(r.id).agent.as_ref().map(|x| x.applied as u64);
                Candidate::new(r, me, (st.alive, st.down_for), matched, (last, cfg.max_lag_entries))
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
