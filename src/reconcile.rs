//! The reconciler: what this node's executor must do, group by group, to
//! run exactly the groups the replicated state places on it.
//!
//! Each round it compares the placed groups (node, phase, epoch, failed_on)
//! with what runs here and says, in order: kill everything (the lease is not
//! held), kill the groups bound to a ticket this node no longer sees held, stop what must not run here (unless a failed stop is waiting for
//! its retry), claim what is placed here but does not run yet, run (start,
//! or keep monitoring) what is placed here, and what to report to the
//! leader. A group starts only under a claim the leader confirmed at its
//! current epoch: this node's copy of the state may be stale. It keeps the
//! set of groups that failed here past their threshold, so they are not
//! started again at that epoch and are reported until the leader records it.
//!
//! Pure: inputs and the current time (CLOCK_BOOTTIME ms) in, commands out.
//! It never does I/O, never reads a clock, never takes a lock. The executor
//! (resource slots, processes, scripts) carries the commands out and reports
//! their outcomes with [`Reconciler::stopped`], [`Reconciler::stop_failed`]
//! and [`Reconciler::failed`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tandem_raft::group::{GroupRecord, Phase};
use tandem_raft::NodeId;

/// How long after a failed stop it is tried again.
pub const STOP_RETRY: Duration = Duration::from_secs(2);

/// What this node tells the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The group no longer runs here (it was asked to stop at `epoch`).
    Stopped { group: String, epoch: u64 },
    /// The group failed here past its restart threshold at `epoch`.
    Failed { group: String, epoch: u64 },
    /// Stopping the group (placed here at `epoch`) failed: it may still run.
    StopFailed { group: String, epoch: u64 },
}

impl Report {
    pub fn group(&self) -> &str {
        match self {
            Report::Stopped { group, .. } | Report::Failed { group, .. } | Report::StopFailed { group, .. } => group,
        }
    }
}

/// One step for the executor, to be carried out in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The lease is not held (or lapsed): kill and stop every local
    /// resource at once. Always alone.
    KillEverything,
    /// The group is bound to the ticket and this node's gate closed: kill
    /// its resources at once (no stop actions waited for), as a lapse does
    /// for everything. Reported as any group no longer running here.
    KillGroup { group: String },
    /// Stop the group's resources (in reverse order), then call
    /// [`Reconciler::stopped`] or [`Reconciler::stop_failed`].
    Stop { group: String },
    /// Ask the leader to confirm a start of the group placed here at
    /// `epoch` (a committed `ClaimGroup`: the epoch grows by one).
    Claim { group: String, epoch: u64 },
    /// Run the group at `epoch`: start it (`start`, only under a claim
    /// confirmed at `epoch`) or keep it running and monitored. Past its
    /// restart threshold, call [`Reconciler::failed`].
    Run { group: String, epoch: u64, start: bool },
    /// Tell the leader.
    Report(Report),
}

/// A group running (or left blocked by a failed stop) on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    /// The epoch it runs under.
    pub epoch: u64,
    /// After a failed stop: no stop before this (CLOCK_BOOTTIME ms).
    pub stop_blocked_until_ms: Option<u64>,
}

/// The lease as the reconciler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseView {
    /// This node holds its lease now.
    pub held: bool,
    /// The lease lapsed with something running and everything has not been
    /// killed and stopped since.
    pub lapsed: bool,
}

/// One round's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub me: NodeId,
    /// The replicated groups, as applied on this node.
    pub groups: &'a BTreeMap<String, GroupRecord>,
    /// What runs here.
    pub local: &'a BTreeMap<String, Local>,
    /// (group, epoch) whose start the leader confirmed (the epoch after
    /// the claim).
    pub confirmed: &'a BTreeSet<(String, u64)>,
    pub lease: LeaseView,
    /// This node is in maintenance: nothing is started or monitored.
    pub maintenance: bool,
    /// The site's ticket is open on this node (`crate::ticket::Gate`):
    /// groups bound to it may run here.
    pub ticket_open: bool,
    /// CLOCK_BOOTTIME, ms.
    pub now_ms: u64,
}

/// What to report once a planned stop ends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingStop {
    stopped: Option<Report>,
    stop_failed: Report,
}

/// The executor's decisions, and the groups that failed here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciler {
    /// (group, epoch) that failed here: not started again, reported until
    /// the leader records it.
    failed: BTreeSet<(String, u64)>,
    /// The stops of the last plan, by group.
    stops: BTreeMap<String, PendingStop>,
}

fn placed_here(g: &GroupRecord, me: NodeId) -> bool {
    g.placement.node == Some(me)
}

impl Reconciler {
    pub fn new() -> Reconciler {
        Reconciler::default()
    }

    /// Whether (group, epoch) failed here and is not to be started again.
    pub fn has_failed(&self, group: &str, epoch: u64) -> bool {
        self.failed.contains(&(group.to_string(), epoch))
    }

    /// The claims a round would make now: groups placed here, started, that
    /// do not run here and did not fail here at their epoch (none without
    /// the lease). The shell may make them before [`plan`](Self::plan) so
    /// that a confirmed start happens in the same round.
    pub fn claims(&self, input: &Input<'_>) -> Vec<(String, u64)> {
        if !input.lease.held || input.lease.lapsed {
            return Vec::new();
        }
        input
            .groups
            .values()
            .filter(|g| self.may_claim(g, input))
            .map(|g| (g.name.clone(), g.placement.epoch))
            .collect()
    }

    /// Whether `g` is to be claimed: placed here, started, not running here,
    /// and neither failed here at its epoch nor recorded failed here (the
    /// leader is about to move it: a claim would restart it in the gap);
    /// never in maintenance, where nothing starts (a claim grows the epoch).
    fn may_claim(&self, g: &GroupRecord, input: &Input<'_>) -> bool {
        !input.maintenance
            && (!g.spec.ticket || input.ticket_open)
            && placed_here(g, input.me)
            && g.placement.phase == Phase::Started
            && !input.local.contains_key(&g.name)
            && !self.has_failed(&g.name, g.placement.epoch)
            && !g.failed_on.contains(&input.me)
    }

    /// One round: the commands, stops first.
    pub fn plan(&mut self, input: &Input<'_>) -> Vec<Command> {
        self.stops.clear();
        let me = input.me;
        if !input.lease.held || input.lease.lapsed {
            return vec![Command::KillEverything];
        }
        let mut out = Vec::new();

        // Bound to a ticket this node no longer sees held: killed before the
        // other site may start them (see `crate::ticket::Gate`).
        let mut killed = BTreeSet::new();
        if !input.ticket_open {
            for name in input.local.keys() {
                if input.groups.get(name).is_some_and(|g| g.spec.ticket) {
                    out.push(Command::KillGroup { group: name.clone() });
                    killed.insert(name.as_str());
                }
            }
        }

        // Stop what must not run here any more (not while a failed stop
        // waits for its retry).
        for (name, local) in input.local.iter().filter(|(n, _)| !killed.contains(n.as_str())) {
            let g = input.groups.get(name);
            let keep = g.is_some_and(|g| placed_here(g, me) && g.placement.phase == Phase::Started);
            let blocked = local.stop_blocked_until_ms.is_some_and(|t| input.now_ms < t);
            if keep || blocked {
                continue;
            }
            let stopped = g
                .filter(|g| placed_here(g, me) && matches!(g.placement.phase, Phase::Stopping | Phase::Stopped))
                .map(|g| Report::Stopped { group: name.clone(), epoch: g.placement.epoch });
            let epoch = g.map(|g| g.placement.epoch).unwrap_or(local.epoch);
            self.stops.insert(
                name.clone(),
                PendingStop { stopped, stop_failed: Report::StopFailed { group: name.clone(), epoch } },
            );
            out.push(Command::Stop { group: name.clone() });
        }
        // A failure stays on record until the leader has it (or the group
        // moved on).
        self.failed.retain(|(name, epoch)| {
            input.groups.get(name).is_some_and(|g| g.placement.epoch == *epoch && !g.failed_on.contains(&me))
        });

        for g in input.groups.values().filter(|g| placed_here(g, me)) {
            let (name, epoch) = (&g.name, g.placement.epoch);
            if killed.contains(name.as_str()) {
                continue; // reported next round, once it no longer runs here
            }
            let runs_here = input.local.contains_key(name);
            match g.placement.phase {
                // Reported once its stop ends (see `stopped`), not while a
                // failed stop leaves it (maybe) running here.
                Phase::Stopping | Phase::Stopped if runs_here => {}
                Phase::Stopping | Phase::Stopped => {
                    out.push(Command::Report(Report::Stopped { group: name.clone(), epoch }));
                }
                Phase::Started if self.has_failed(name, epoch) => {
                    out.push(Command::Report(Report::Failed { group: name.clone(), epoch }));
                }
                Phase::Started if runs_here => {
                    if !input.maintenance {
                        out.push(Command::Run { group: name.clone(), epoch, start: false });
                    }
                }
                Phase::Started
                    if input.confirmed.contains(&(name.clone(), epoch)) && (!g.spec.ticket || input.ticket_open) =>
                {
                    if !input.maintenance {
                        out.push(Command::Run { group: name.clone(), epoch, start: true });
                    }
                }
                // Not confirmed by the leader (yet).
                Phase::Started if self.may_claim(g, input) => out.push(Command::Claim { group: name.clone(), epoch }),
                // In maintenance, or recorded failed here (the leader moves
                // it elsewhere).
                Phase::Started => {}
            }
        }
        out
    }

    /// A planned stop ended: the group no longer runs here. The report to
    /// send, if it was asked to stop here.
    pub fn stopped(&mut self, group: &str) -> Option<Report> {
        self.stops.remove(group).and_then(|p| p.stopped)
    }

    /// A planned stop failed: the group may still run here (the executor
    /// keeps it, blocked for [`STOP_RETRY`]). The report to send.
    pub fn stop_failed(&mut self, group: &str) -> Option<Report> {
        self.stops.remove(group).map(|p| p.stop_failed)
    }

    /// The group failed here past its restart threshold at `epoch` (the
    /// executor gave it up): it is not started here again at that epoch.
    /// The report to send.
    pub fn failed(&mut self, group: &str, epoch: u64) -> Report {
        self.failed.insert((group.to_string(), epoch));
        Report::Failed { group: group.to_string(), epoch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tandem_raft::group::{GroupSpec, Placement};

    const ME: NodeId = 1;
    const HELD: LeaseView = LeaseView { held: true, lapsed: false };

    fn group(name: &str, node: Option<NodeId>, phase: Phase, epoch: u64) -> GroupRecord {
        let spec: GroupSpec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "r", "type": "process", "command": ["sleep", "1"]}],
            "nodes": ["n1", "n2"]
        }))
        .unwrap();
        GroupRecord {
            name: name.into(),
            spec,
            enabled: true,
            placement: Placement { node, phase, epoch, reason: String::new() },
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

    fn groups(gs: Vec<GroupRecord>) -> BTreeMap<String, GroupRecord> {
        gs.into_iter().map(|g| (g.name.clone(), g)).collect()
    }

    fn local(entries: &[(&str, u64)]) -> BTreeMap<String, Local> {
        entries.iter().map(|(n, e)| (n.to_string(), Local { epoch: *e, stop_blocked_until_ms: None })).collect()
    }

    fn input<'a>(
        groups: &'a BTreeMap<String, GroupRecord>,
        local: &'a BTreeMap<String, Local>,
        confirmed: &'a BTreeSet<(String, u64)>,
    ) -> Input<'a> {
        Input { me: ME, groups, local, confirmed, lease: HELD, maintenance: false, ticket_open: true, now_ms: 10_000 }
    }

    fn claim(g: &str, e: u64) -> Command {
        Command::Claim { group: g.into(), epoch: e }
    }

    fn run(g: &str, e: u64, start: bool) -> Command {
        Command::Run { group: g.into(), epoch: e, start }
    }

    #[test]
    fn a_ticket_group_is_killed_when_the_gate_closes_and_not_claimed_while_closed() {
        let mut web = group("web", Some(ME), Phase::Started, 4);
        web.spec.ticket = true;
        let gs = groups(vec![web, group("db", Some(ME), Phase::Started, 2)]);
        let (none, mut r) = (BTreeSet::new(), Reconciler::new());
        fn closed(i: Input<'_>) -> Input<'_> {
            Input { ticket_open: false, ..i }
        }
        // Not running: only the plain group is claimed while the gate is closed.
        let l = local(&[]);
        assert_eq!(r.claims(&closed(input(&gs, &l, &none))), [("db".to_string(), 2)]);
        assert_eq!(r.claims(&input(&gs, &l, &none)).len(), 2, "open: both");
        let confirmed = BTreeSet::from([("web".to_string(), 4)]);
        assert!(!r.plan(&closed(input(&gs, &l, &confirmed))).contains(&run("web", 4, true)), "closed since the claim");
        // Running: killed at once, the plain group runs on.
        let l = local(&[("web", 4), ("db", 2)]);
        let plan = r.plan(&closed(input(&gs, &l, &none)));
        assert_eq!(plan, [Command::KillGroup { group: "web".into() }, run("db", 2, false)]);
        // Gone, and asked to stop by the leader: reported stopped.
        let mut stopping = gs.clone();
        stopping.get_mut("web").unwrap().placement.phase = Phase::Stopping;
        let l = local(&[("db", 2)]);
        let plan = r.plan(&closed(input(&stopping, &l, &none)));
        assert!(plan.contains(&Command::Report(Report::Stopped { group: "web".into(), epoch: 4 })), "{plan:?}");
    }

    #[test]
    fn a_group_placed_here_is_claimed_then_started_under_the_confirmed_epoch() {
        let gs = groups(vec![group("web", Some(ME), Phase::Started, 4)]);
        let (none, mut r) = (BTreeSet::new(), Reconciler::new());
        let l = local(&[]);
        assert_eq!(r.claims(&input(&gs, &l, &none)), [("web".to_string(), 4)]);
        assert_eq!(r.plan(&input(&gs, &l, &none)), [claim("web", 4)]);
        // The claim committed: epoch 5, confirmed.
        let gs = groups(vec![group("web", Some(ME), Phase::Started, 5)]);
        let confirmed = BTreeSet::from([("web".to_string(), 5)]);
        assert_eq!(r.plan(&input(&gs, &l, &confirmed)), [run("web", 5, true)]);
        // A confirmation of an older epoch starts nothing.
        let stale = BTreeSet::from([("web".to_string(), 4)]);
        assert_eq!(r.plan(&input(&gs, &l, &stale)), [claim("web", 5)]);
        // Running: monitored, no claim.
        let l = local(&[("web", 5)]);
        assert!(r.claims(&input(&gs, &l, &none)).is_empty());
        assert_eq!(r.plan(&input(&gs, &l, &none)), [run("web", 5, false)]);
    }

    #[test]
    fn without_the_lease_everything_is_killed_and_nothing_else_happens() {
        let gs = groups(vec![group("a", Some(ME), Phase::Started, 2), group("b", Some(ME), Phase::Stopping, 3)]);
        let l = local(&[("a", 2)]);
        let confirmed = BTreeSet::from([("a".to_string(), 2)]);
        let mut r = Reconciler::new();
        for lease in [LeaseView { held: false, lapsed: false }, LeaseView { held: false, lapsed: true }] {
            let i = Input { lease, ..input(&gs, &l, &confirmed) };
            assert_eq!(r.plan(&i), [Command::KillEverything]);
            assert!(r.claims(&i).is_empty());
        }
    }

    #[test]
    fn a_group_placed_elsewhere_is_stopped_and_reported_only_once_its_stop_ends() {
        let gs = groups(vec![
            group("moved", Some(2), Phase::Started, 7),
            group("stopping", Some(ME), Phase::Stopping, 3),
            group("done", Some(ME), Phase::Stopped, 9),
        ]);
        let l = local(&[("moved", 6), ("stopping", 3), ("gone", 1)]);
        let none = BTreeSet::new();
        let mut r = Reconciler::new();
        let stop = |g: &str| Command::Stop { group: g.into() };
        let plan = r.plan(&input(&gs, &l, &none));
        assert_eq!(
            plan,
            [
                stop("gone"),
                stop("moved"),
                stop("stopping"),
                Command::Report(Report::Stopped { group: "done".into(), epoch: 9 })
            ]
        );
        assert_eq!(r.stopped("stopping"), Some(Report::Stopped { group: "stopping".into(), epoch: 3 }));
        assert_eq!(r.stopped("moved"), None, "placed elsewhere: nothing to tell");
        // A failed stop is reported under the current epoch (the local one
        // for a group no longer defined).
        assert_eq!(r.stop_failed("gone"), Some(Report::StopFailed { group: "gone".into(), epoch: 1 }));
        assert_eq!(r.stop_failed("gone"), None, "once");
        // Blocked until its retry: neither stopped nor reported.
        let mut l = local(&[("stopping", 3)]);
        l.get_mut("stopping").unwrap().stop_blocked_until_ms = Some(12_000);
        assert_eq!(
            r.plan(&input(&gs, &l, &none)),
            [Command::Report(Report::Stopped { group: "done".into(), epoch: 9 })]
        );
        let later = Input { now_ms: 12_000, ..input(&gs, &l, &none) };
        assert_eq!(r.plan(&later)[0], stop("stopping"));
        assert_eq!(r.stop_failed("stopping"), Some(Report::StopFailed { group: "stopping".into(), epoch: 3 }));
    }

    #[test]
    fn a_failed_group_is_reported_and_not_restarted_until_the_leader_records_it() {
        let mut gs = groups(vec![group("web", Some(ME), Phase::Started, 5)]);
        let confirmed = BTreeSet::from([("web".to_string(), 5)]);
        let mut r = Reconciler::new();
        assert_eq!(r.failed("web", 5), Report::Failed { group: "web".into(), epoch: 5 });
        let l = local(&[]);
        let failed = Command::Report(Report::Failed { group: "web".into(), epoch: 5 });
        assert_eq!(r.plan(&input(&gs, &l, &confirmed)), std::slice::from_ref(&failed));
        assert!(r.claims(&input(&gs, &l, &confirmed)).is_empty());
        assert_eq!(r.plan(&input(&gs, &l, &confirmed)), [failed]);
        // Recorded: forgotten (the scheduler places it elsewhere).
        gs.get_mut("web").unwrap().failed_on.insert(ME);
        // Still placed here until the scheduler moves it: not claimed (a
        // claim would restart it here in the gap), not reported again.
        assert_eq!(r.plan(&input(&gs, &l, &BTreeSet::new())), []);
        assert!(r.claims(&input(&gs, &l, &BTreeSet::new())).is_empty());
        assert!(!r.has_failed("web", 5));
        // A new epoch is a new chance.
        r.failed("web", 5);
        let gs = groups(vec![group("web", Some(ME), Phase::Started, 6)]);
        assert_eq!(r.plan(&input(&gs, &l, &BTreeSet::new())), [claim("web", 6)]);
        assert!(!r.has_failed("web", 5));
    }

    #[test]
    fn in_maintenance_nothing_is_started_nor_monitored_but_reports_go_on() {
        let gs = groups(vec![
            group("a", Some(ME), Phase::Started, 2),
            group("b", Some(ME), Phase::Started, 4),
            group("c", Some(ME), Phase::Stopped, 8),
        ]);
        let l = local(&[("a", 2)]);
        let confirmed = BTreeSet::from([("b".to_string(), 4)]);
        let mut r = Reconciler::new();
        let i = Input { maintenance: true, ..input(&gs, &l, &confirmed) };
        assert_eq!(r.plan(&i), [Command::Report(Report::Stopped { group: "c".into(), epoch: 8 })]);
        // Nothing claimed either: a claim grows the epoch, round after round.
        let unconfirmed = BTreeSet::new();
        let i = Input { maintenance: true, ..input(&gs, &l, &unconfirmed) };
        assert!(r.claims(&i).is_empty());
        assert!(!r.plan(&i).iter().any(|c| matches!(c, Command::Claim { .. })));
    }

    /// A world around node 1: groups placed anywhere at any phase, some
    /// running here (at their epoch or an older one, some blocked), some
    /// confirmed, some failed.
    #[allow(clippy::type_complexity)]
    fn arb_world() -> impl Strategy<
        Value = (BTreeMap<String, GroupRecord>, BTreeMap<String, Local>, BTreeSet<(String, u64)>, Vec<(String, u64)>),
    > {
        proptest::collection::vec((0u8..4, 0u8..3, 0u64..6, any::<bool>(), 0u8..4, 0u8..3, 0u8..3, 0u8..3), 0..10)
            .prop_map(|gs| {
                let (mut groups, mut local, mut confirmed, mut failed) =
                    (BTreeMap::new(), BTreeMap::new(), BTreeSet::new(), Vec::new());
                for (i, (node, phase, epoch, failed_on_me, runs, conf, fail, defined)) in gs.into_iter().enumerate() {
                    let name = format!("g{i}");
                    let node = (node > 0).then_some(u64::from(node));
                    let phase = [Phase::Stopped, Phase::Started, Phase::Stopping][phase as usize];
                    let mut g = group(&name, node, phase, epoch);
                    if failed_on_me {
                        g.failed_on.insert(ME);
                    }
                    if defined > 0 {
                        groups.insert(name.clone(), g);
                    }
                    match runs {
                        1 => drop(local.insert(name.clone(), Local { epoch, stop_blocked_until_ms: None })),
                        2 => drop(local.insert(
                            name.clone(),
                            Local { epoch: epoch.saturating_sub(1), stop_blocked_until_ms: Some(10_500) },
                        )),
                        3 => drop(local.insert(name.clone(), Local { epoch, stop_blocked_until_ms: Some(9_000) })),
                        _ => {}
                    }
                    match conf {
                        1 => drop(confirmed.insert((name.clone(), epoch))),
                        2 => drop(confirmed.insert((name.clone(), epoch.saturating_sub(1)))),
                        _ => {}
                    }
                    match fail {
                        1 => failed.push((name.clone(), epoch)),
                        2 => failed.push((name, epoch + 1)),
                        _ => {}
                    }
                }
                (groups, local, confirmed, failed)
            })
    }

    proptest! {
        /// Never a start without a claim confirmed at the current epoch,
        /// never a stop and a run of one group in a plan, stops first; no
        /// lease, nothing but KillEverything; a group that failed here at
        /// its epoch is neither claimed nor started.
        #[test]
        fn plans_are_safe(
            (mut groups, local, confirmed, failed) in arb_world(),
            held in any::<bool>(),
            lapsed in any::<bool>(),
            maintenance in any::<bool>(),
            ticket_open in any::<bool>(),
            bound in any::<u16>(),
        ) {
            // Some groups bound to the ticket.
            for (i, g) in groups.values_mut().enumerate() {
                g.spec.ticket = bound & (1 << (i % 16)) != 0;
            }
            let mut r = Reconciler::new();
            for (g, e) in &failed {
                r.failed(g, *e);
            }
            let lease = LeaseView { held, lapsed };
            let i = Input { me: ME, groups: &groups, local: &local, confirmed: &confirmed, lease, maintenance, ticket_open, now_ms: 10_000 };
            let claims = r.claims(&i);
            let before = r.clone();
            let plan = r.plan(&i);
            // The plan forgets the failures the leader recorded first.
            let claims_after = r.claims(&i);
            // Same input, same answer.
            prop_assert_eq!(&plan, &before.clone().plan(&i));
            if !held || lapsed {
                prop_assert_eq!(&plan, &vec![Command::KillEverything]);
                prop_assert!(claims.is_empty());
                return Ok(());
            }
            let mut stopped = BTreeSet::new();
            let mut touched = BTreeSet::new();
            let mut past_stops = false;
            let mut past_kills = false;
            let bound_here = |g: &str| groups.get(g).is_some_and(|g| g.spec.ticket);
            for (g, _) in &claims {
                prop_assert!(ticket_open || !bound_here(g), "{g} claimed with the ticket gate closed");
            }
            for c in &plan {
                if !matches!(c, Command::KillGroup { .. }) {
                    past_kills = true;
                }
                match c {
                    Command::KillEverything => prop_assert!(false, "KillEverything with the lease held"),
                    Command::KillGroup { group } => {
                        prop_assert!(!past_kills, "a kill after other commands: {plan:?}");
                        prop_assert!(!ticket_open && bound_here(group) && local.contains_key(group));
                        prop_assert!(touched.insert(group.clone()), "killed twice");
                    }
                    Command::Stop { group } => {
                        prop_assert!(!past_stops, "a stop after a start or a report: {plan:?}");
                        let l = &local[group];
                        prop_assert!(l.stop_blocked_until_ms.is_none_or(|t| t <= 10_000), "stopped while blocked");
                        let g = groups.get(group);
                        prop_assert!(g.is_none_or(|g| g.placement.node != Some(ME) || g.placement.phase != Phase::Started));
                        prop_assert!(stopped.insert(group.clone()), "stopped twice");
                    }
                    Command::Run { group, epoch, start } => {
                        past_stops = true;
                        prop_assert!(!stopped.contains(group), "stop and run of {group} in one plan");
                        prop_assert!(touched.insert(group.clone()), "run twice");
                        let g = &groups[group];
                        prop_assert_eq!((g.placement.node, g.placement.phase, g.placement.epoch), (Some(ME), Phase::Started, *epoch));
                        prop_assert!(!maintenance);
                        prop_assert!(!r.has_failed(group, *epoch));
                        prop_assert!(ticket_open || !bound_here(group), "{group} runs with the ticket gate closed");
                        prop_assert_eq!(*start, !local.contains_key(group));
                        if *start {
                            prop_assert!(confirmed.contains(&(group.clone(), *epoch)), "start without a confirmed claim");
                        }
                    }
                    Command::Claim { group, epoch } => {
                        past_stops = true;
                        prop_assert!(claims_after.contains(&(group.clone(), *epoch)));
                        prop_assert!(!confirmed.contains(&(group.clone(), *epoch)));
                        prop_assert!(touched.insert(group.clone()));
                    }
                    Command::Report(rep) => {
                        past_stops = true;
                        prop_assert!(!stopped.contains(rep.group()), "a stopping group is reported by its stop's end");
                        let g = &groups[rep.group()];
                        prop_assert_eq!(g.placement.node, Some(ME));
                        match rep {
                            Report::Stopped { epoch, .. } => {
                                prop_assert!(g.placement.phase != Phase::Started && !local.contains_key(rep.group()));
                                prop_assert_eq!(*epoch, g.placement.epoch);
                            }
                            Report::Failed { group, epoch } => prop_assert!(before.has_failed(group, *epoch)),
                            Report::StopFailed { .. } => prop_assert!(false, "StopFailed comes from stop_failed"),
                        }
                    }
                }
            }
            // Every claim the shell may make up front is in the plan too,
            // unless already confirmed (then it starts, or waits out a
            // maintenance).
            for (g, e) in &claims {
                let pair = (g.clone(), *e);
                prop_assert!(plan.contains(&claim(g, *e)) || confirmed.contains(&pair));
            }
            // Every stop ends with exactly one answer.
            for g in &stopped {
                let mut again = r.clone();
                prop_assert!(again.stop_failed(g).is_some());
                prop_assert!(again.stopped(g).is_none() && again.stop_failed(g).is_none());
            }
        }

        /// Over rounds, with starts and stops carried out: a failed group is
        /// never started again at its epoch, and nothing starts without a
        /// confirmed claim.
        #[test]
        fn a_group_that_failed_here_never_starts_again_at_its_epoch(
            steps in proptest::collection::vec((0u8..3, 0u64..3, any::<bool>(), any::<bool>()), 1..40),
        ) {
            let mut r = Reconciler::new();
            let mut local: BTreeMap<String, Local> = BTreeMap::new();
            let mut failed_at: BTreeSet<u64> = BTreeSet::new();
            // Failures the leader recorded (failed_on only grows).
            let mut recorded: BTreeSet<u64> = BTreeSet::new();
            let mut epoch = 1;
            let mut confirmed = BTreeSet::new();
            for (what, bump, fail, record) in steps {
                epoch += bump;
                let mut g = group("web", Some(if what == 2 { 2 } else { ME }), Phase::Started, epoch);
                if record && failed_at.contains(&epoch) {
                    recorded.insert(epoch);
                }
                if recorded.contains(&epoch) {
                    g.failed_on.insert(ME);
                }
                let gs = groups(vec![g]);
                let i = Input { me: ME, groups: &gs, local: &local, confirmed: &confirmed, lease: HELD, maintenance: false, ticket_open: true, now_ms: 0 };
                let plan = r.plan(&i);
                let mut next_confirmed = BTreeSet::new();
                for c in plan {
                    match c {
                        Command::Claim { group, epoch: e } => { next_confirmed.insert((group, e)); }
                        Command::Stop { group } => {
                            local.remove(&group);
                            r.stopped(&group);
                        }
                        Command::Run { group, epoch: e, start } => {
                            if start {
                                prop_assert!(confirmed.contains(&(group.clone(), e)));
                                prop_assert!(!failed_at.contains(&e) || gs[&group].failed_on.contains(&ME),
                                    "restarted at a failed epoch");
                            }
                            local.insert(group.clone(), Local { epoch: e, stop_blocked_until_ms: None });
                            if fail {
                                local.remove(&group);
                                r.failed(&group, e);
                                failed_at.insert(e);
                            }
                        }
                        _ => {}
                    }
                }
                // A claim is confirmed at the same epoch here (the test
                // moves the epoch itself).
                confirmed = next_confirmed;
            }
        }
    }
}
