//! The leader's failover input and the scheduler round that commits
//! placements. Which silent nodes may have their groups moved, and when to
//! run the fence command, is the failover core's decision
//! (`crate::failover`: offline by quorum; then past the lease and its
//! margin, or, when a fence command is set, as soon as it confirmed the
//! node off after it was last heard); this file feeds it liveness, runs
//! the fence command it asks for and reports the outcome back. Fencing here
//! means STONITH: running the fence command against a node.

use super::*;

use crate::failover::{Effect as FailoverEffect, Seen};
use tandem_raft::events::{Event, Severity};

/// What a scheduler round decides from. The scheduler is pure: the same
/// inputs give the same decisions, so after a round that decided nothing
/// the next ones need not run it again until one of them changes (with 100
/// groups it was a quarter of the idle leader's CPU, 20 rounds a second).
#[derive(PartialEq)]
pub(super) struct SchedulerInputs {
    /// The replicated state's publication count, read before the state
    /// itself: a copy is never older than the count says (a newer one only
    /// costs one more round).
    version: u64,
    nodes: Vec<NodeInfo>,
    minute_of_day: u16,
    ticket: crate::ticket::Standing,
}

impl Agent {
    /// One scheduler round on the leader: commit every placement change.
    pub(super) async fn scheduler_round(&self) {
        let Some(m) = self.member() else { return };
        self.observe_leadership(&m);
        if m.metrics().current_leader != Some(m.node_id) {
            self.failover_core().not_leader();
            self.failure_clock.lock().unwrap_or_else(|e| e.into_inner()).reset();
            self.forget_liveness();
            *self.scheduler_idle.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        }
        let now = Instant::now();
        // Node and path events come from the leader's view, groups or not.
        self.observe_liveness(&m, now);
        // Recorded before the placements they cause (a node offline before
        // its groups move): nothing is written when nothing was queued.
        self.flush_events().await;
        if m.state.read(|d| d.state.groups.is_empty()) {
            return;
        }
        let version = *m.state.subscribe().borrow();
        let state = m.state.state();
        // A node is offline only when no majority of voters can have heard
        // it: while one can, it may hold its lease and run its groups. A
        // voter whose reports stopped coming (two heartbeats missed) may
        // have heard it meanwhile: see `Liveness::failover_status`.
        let stale_after = self.cfg.heartbeat_interval() * 2;
        let voters: Vec<NodeId> = m.metrics().membership_config.membership().voter_ids().collect();
        let seen: Vec<Seen> = state
            .nodes
            .values()
            .map(|r| {
                let st = self.liveness.failover_status(r.id, &r.addresses, &voters, m.node_id, stale_after, now);
                Seen { id: r.id, alive: st.alive, down_for: st.down_for }
            })
            .collect();
        let now_ms = now_boot_ms();
        let lease_held = self.lease_core().holds(now_ms);
        let verdict = {
            let mut core = self.failover_core();
            core.lease(lease_held);
            core.round(m.node_id, &seen, now_ms)
        };
        // The fence command starts as soon as the node is offline; once it
        // confirms, the node's groups move without waiting out its lease.
        self.run_fence_effects(&state, verdict.effects.clone());
        let nodes: Vec<NodeInfo> = state
            .nodes
            .values()
            .zip(&seen)
            .map(|(r, st)| {
                let alive = r.id == m.node_id || (st.alive && !state.superseded.contains(&r.id));
                NodeInfo::of(r, alive, verdict.may_move(r.id))
            })
            .collect();
        let expired = self.failure_clock.lock().unwrap_or_else(|e| e.into_inner()).expired(&state.groups, now_ms);
        for (group, node) in expired {
            let name = state.nodes.get(&node).map_or_else(|| node.to_string(), |n| n.name.clone());
            tracing::info!(group = %group, node = %name, "the group's failure there expired: it may run there again");
            if let Err(e) = self.propose(&m, Command::ExpireGroupFailure { name: group.clone(), node }).await {
                tracing::debug!(group = %group, "failure expiry not committed: {e}");
            }
        }
        let inputs =
            SchedulerInputs { version, nodes, minute_of_day: local_minute_of_day(), ticket: self.ticket_standing() };
        let decisions = {
            let mut idle = self.scheduler_idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.as_ref() == Some(&inputs) {
                return;
            }
            let decisions =
                Scheduler::new(&inputs.nodes, &state.groups, inputs.minute_of_day).ticket(inputs.ticket).decide();
            // A decision not committed leaves no memo: the next round retries.
            *idle = decisions.is_empty().then_some(inputs);
            decisions
        };
        for d in decisions {
            tracing::info!(group = %d.group, epoch = d.expected_epoch + 1, phase = ?d.phase, "placement: {}", d.reason);
            let cmd = Command::SetPlacement {
                name: d.group.clone(),
                expected_epoch: d.expected_epoch,
                node: d.node,
                phase: d.phase,
                reason: d.reason,
            };
            if let Err(e) = self.propose(&m, cmd).await {
                tracing::debug!(group = %d.group, "placement not committed: {e}");
            }
        }
    }

    /// Carries out the failover core's effects: each fence command runs in
    /// the background and its outcome goes back to the core.
    pub(super) fn run_fence_effects(&self, state: &ClusterState, effects: Vec<FailoverEffect>) {
        for e in effects {
            let FailoverEffect::RunFenceCommand { node, attempt } = e;
            if let Some(rec) = state.nodes.get(&node) {
                self.start_fence(rec, attempt);
            }
        }
    }

    /// Runs the fence command against `node` in the background; its
    /// outcome is reported to the failover core under `attempt`.
    fn start_fence(&self, node: &NodeRecord, attempt: u64) {
        let core = self.failover.clone();
        let (id, name, addresses) = (node.id, node.name.clone(), node.addresses.join(","));
        // Read when the command has returned: a confirmation says the node
        // is off from then on at the latest.
        let done = move |confirmed: bool| {
            core.lock().unwrap_or_else(|e| e.into_inner()).fence_done(id, attempt, confirmed, now_boot_ms())
        };
        let Some((program, args)) = self.cfg.fencing.fence_command.split_first() else {
            done(false);
            return;
        };
        let (program, args) = (program.clone(), args.to_vec());
        let timeout = Duration::from_millis(self.cfg.fencing.fence_timeout_ms);
        let sink = self.event_sink.clone();
        tokio::spawn(async move {
            tracing::warn!(node = %name, "fencing: running {program} {args:?}");
            let fence_event = |kind: &str, sev: Severity, msg: String, d: serde_json::Value| {
                sink.emit(Event::new(0, kind, sev, msg).node(name.clone()).details(d));
            };
            fence_event(
                "fence.started",
                Severity::Warning,
                format!("fencing {name}: running the fence command"),
                serde_json::json!({"attempt": attempt, "command": program}),
            );
            let started = Instant::now();
            let run = tokio::process::Command::new(&program)
                .args(&args)
                .arg(&name)
                .env("TANDEM_FENCE_NODE", &name)
                .env("TANDEM_FENCE_ADDRESSES", &addresses)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let r = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {timeout:?}")),
            };
            let secs = started.elapsed().as_secs_f64();
            match &r {
                Ok(()) => {
                    tracing::warn!(node = %name, "fencing confirmed: the node is off");
                    fence_event(
                        "fence.confirmed",
                        Severity::Warning,
                        format!("{name} fenced: the fence command confirmed it is off ({secs:.1}s)"),
                        serde_json::json!({"attempt": attempt, "seconds": secs}),
                    );
                }
                Err(e) => {
                    tracing::error!(node = %name, "fencing failed, its groups stay where they are: {e}");
                    fence_event(
                        "fence.failed",
                        Severity::Critical,
                        format!("fencing {name} failed, its groups stay where they are: {e}"),
                        serde_json::json!({"attempt": attempt, "seconds": secs, "error": e}),
                    );
                }
            }
            done(r.is_ok());
        });
    }
}
