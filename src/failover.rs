//! The leader's failover input: which nodes' groups may move (the
//! scheduler's `NodeInfo::fenced`), and when to run the fence command
//! (STONITH) against a node.
//!
//! A silent node may still run its groups until its lease has lapsed.
//! Without a fence command, its groups move only once no majority of
//! voters has heard it for `fenced_after` (the lease plus a margin): by
//! then it has stopped them itself. With a fence command, the command
//! starts as soon as the node is silent and a failed one is retried after
//! [`FENCE_RETRY`]; the groups move once it has *confirmed* the node off,
//! at once, without waiting out the lease: a node that is off runs
//! nothing, so the lease has nothing left to protect (Pacemaker treats a
//! successful STONITH the same way). Without a confirmation they never
//! move, however long the silence.
//!
//! A confirmation counts only if it came after the node was last heard (by
//! a majority): the node is off since then. One from before (the node came
//! back, perhaps between two rounds, and went silent again) belongs to an
//! earlier silence: the node is fenced anew. Outcomes of attempts that are
//! no longer current, and everything of an earlier leadership, are
//! forgotten.
//!
//! A node where a stop failed is *escalated*: it is fenced even while
//! alive, and its groups move once it is silent (a confirmation from after
//! its last hearing lets them move at once, as above).
//!
//! Pure: liveness, fence outcomes and the current time (ms, any monotonic
//! clock) in; verdicts and effects out. It never does I/O, never reads a
//! clock, never takes a lock, and never runs the fence command: it asks
//! for it ([`Effect::RunFenceCommand`]) and hears back through
//! [`Failover::fence_done`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tandem_raft::NodeId;

/// How long after a failed fence attempt started the next one may start.
pub const FENCE_RETRY: Duration = Duration::from_secs(2);

/// What the leader knows of one node this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub id: NodeId,
    /// A majority of voters has heard it within the node timeout (it may
    /// hold its lease).
    pub alive: bool,
    /// How long no such majority has heard it (zero while alive).
    pub down_for: Duration,
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Run the fence command against `node` (in the background) and call
    /// [`Failover::fence_done`] with `attempt` and its outcome.
    RunFenceCommand { node: NodeId, attempt: u64 },
}

/// The configuration the verdicts depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A fence command is configured: groups move only after it confirmed
    /// (and then at once).
    pub fence_command: bool,
    /// Without a fence command, how long a node must be silent before its
    /// groups may move: its lease plus a margin (at least the node timeout).
    /// Also how long a claim shows a node holds its lease.
    pub fenced_after: Duration,
}

/// The outcome of [`Failover::escalate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Escalation {
    /// No fence command: the group stays blocked where its stop failed.
    NoFenceCommand,
    /// The node was already escalated.
    Repeated,
    /// Newly escalated: it is fenced from the next round on (this leader
    /// itself at once: it cannot wait for itself to go silent; the next
    /// leader fences it again before moving anything).
    First(Vec<Effect>),
}

/// One round's verdicts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The nodes whose groups may move (the scheduler's `fenced`).
    pub may_move: BTreeSet<NodeId>,
    pub effects: Vec<Effect>,
}

impl Verdict {
    pub fn may_move(&self, node: NodeId) -> bool {
        self.may_move.contains(&node)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Running,
    /// Confirmed off at this time (ms).
    Confirmed(u64),
    Failed,
}

/// What the fence command has established about a node this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fence {
    /// No fence command: the lease alone decides.
    NotConfigured,
    /// Not confirmed off since it was last heard (running, failed, or about
    /// to start).
    Unconfirmed,
    /// Confirmed off after it was last heard.
    Confirmed,
}

/// One run of the fence command against a silent (or escalated) node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attempt {
    id: u64,
    started_ms: u64,
    outcome: Outcome,
}

/// The leader's fence attempts and escalations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    policy: Policy,
    /// The current attempt per node, for its current silence.
    attempts: BTreeMap<NodeId, Attempt>,
    /// Live nodes to fence all the same (a stop failed there), until they
    /// go silent.
    escalated: BTreeSet<NodeId>,
    /// When each node last claimed a start through this leader: it held its
    /// lease then, whatever the heartbeat reports (which may lag) say.
    claimed_ms: BTreeMap<NodeId, u64>,
    /// Whether this leader holds its own lease (a majority echoes it): a
    /// leader cut off from the others must power nobody off.
    lease_held: bool,
    next_attempt: u64,
}

impl Failover {
    pub fn new(policy: Policy) -> Failover {
        Failover {
            policy,
            attempts: BTreeMap::new(),
            escalated: BTreeSet::new(),
            claimed_ms: BTreeMap::new(),
            lease_held: true,
            next_attempt: 1,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether `node` is escalated (to be fenced although alive).
    pub fn is_escalated(&self, node: NodeId) -> bool {
        self.escalated.contains(&node)
    }

    fn attempt(&mut self, node: NodeId, now_ms: u64) -> Effect {
        let id = self.next_attempt;
        self.next_attempt += 1;
        self.attempts.insert(node, Attempt { id, started_ms: now_ms, outcome: Outcome::Running });
        Effect::RunFenceCommand { node, attempt: id }
    }

    /// A stop failed on `node`: it may still run the group and cannot stop
    /// it, so it is to be powered off (with a fence command configured).
    pub fn escalate(&mut self, node: NodeId, me: NodeId) -> Escalation {
        if !self.policy.fence_command {
            return Escalation::NoFenceCommand;
        }
        if !self.escalated.insert(node) {
            return Escalation::Repeated;
        }
        if node != me {
            return Escalation::First(Vec::new());
        }
        // Not tracked as an attempt: nothing waits for this leader's own
        // silence here.
        let id = self.next_attempt;
        self.next_attempt += 1;
        Escalation::First(vec![Effect::RunFenceCommand { node, attempt: id }])
    }

    /// The fence command's outcome for `attempt` on `node`, known at
    /// `now_ms` (a confirmation: the node is off since then at the latest).
    /// An outcome of an attempt that is no longer current (the node came
    /// back since, or a later attempt started) changes nothing.
    pub fn fence_done(&mut self, node: NodeId, attempt: u64, confirmed: bool, now_ms: u64) {
        if let Some(a) = self.attempts.get_mut(&node).filter(|a| a.id == attempt && a.outcome == Outcome::Running) {
            a.outcome = if confirmed { Outcome::Confirmed(now_ms) } else { Outcome::Failed };
        }
    }

    /// This node is not (or no longer) the leader: forget every fence
    /// attempt and escalation. A confirmation is only worth something for
    /// the silence it was run in; a node may have come back and gone silent
    /// again while another node led, and the next leadership must fence it
    /// anew. Escalations come back with the node's next StopFailed report.
    pub fn not_leader(&mut self) {
        self.attempts.clear();
        self.escalated.clear();
        self.claimed_ms.clear();
    }

    /// Whether this leader holds its own lease now: without it, no fence
    /// command starts (the rounds go on; its placements cannot commit).
    pub fn lease(&mut self, held: bool) {
        self.lease_held = held;
    }

    /// `node` claimed a start through this leader at `now_ms` (call it when
    /// the claim arrives, before it is proposed): a node claims only while
    /// it holds its lease, so it is not silent, whatever the reports about
    /// it say, for the next `fenced_after`. Without this, a node back from
    /// a partition that retook its lease and claimed its group could have it
    /// moved away (and fenced) on reports from before it came back.
    pub fn claimed(&mut self, node: NodeId, now_ms: u64) {
        let t = self.claimed_ms.entry(node).or_insert(now_ms);
        *t = (*t).max(now_ms);
    }

    /// One round over every node: which may have their groups moved, and
    /// which fence commands to start.
    pub fn round(&mut self, me: NodeId, nodes: &[Seen], now_ms: u64) -> Verdict {
        let mut v = Verdict::default();
        // Nodes no longer in the cluster are forgotten.
        let present: BTreeSet<NodeId> = nodes.iter().map(|n| n.id).collect();
        self.attempts.retain(|id, _| present.contains(id));
        self.escalated.retain(|id| present.contains(id));
        let fenced_after_ms = self.policy.fenced_after.as_millis() as u64;
        self.claimed_ms.retain(|_, t| now_ms.saturating_sub(*t) < fenced_after_ms);
        for n in nodes {
            if n.id == me {
                continue; // this leader never fences itself for its own silence, nor moves its groups for it
            }
            let n = &Seen { alive: n.alive || self.claimed_ms.contains_key(&n.id), ..*n };
            if !n.alive {
                self.escalated.remove(&n.id); // it went silent: the escalation took effect
            }
            let may = match self.fence(n, now_ms, &mut v.effects) {
                Fence::NotConfigured => n.down_for >= self.policy.fenced_after,
                Fence::Unconfirmed => false,
                // Off since it was last heard: nothing of it runs any more,
                // the lease has nothing left to protect.
                Fence::Confirmed => true,
            };
            if may && !n.alive {
                v.may_move.insert(n.id);
            }
        }
        v
    }

    /// What the fence command (if any) has established about `node`; asks
    /// to start it, or to retry a failed one, as needed.
    fn fence(&mut self, n: &Seen, now_ms: u64, effects: &mut Vec<Effect>) -> Fence {
        if !self.policy.fence_command {
            return Fence::NotConfigured;
        }
        // An escalated node is fenced while it is still heard.
        if n.alive && !self.escalated.contains(&n.id) {
            self.attempts.remove(&n.id); // back: a new silence needs a new fence
            return Fence::Unconfirmed;
        }
        // When a majority last heard it (none while it is heard: escalated).
        let last_heard_ms = (!n.alive).then(|| now_ms.saturating_sub(n.down_for.as_millis() as u64));
        if let Some(a) = self.attempts.get(&n.id) {
            match a.outcome {
                Outcome::Confirmed(at) if last_heard_ms.is_none_or(|heard| heard <= at) => return Fence::Confirmed,
                // Heard after it was confirmed off: it came back (between
                // two rounds) and this is a new silence.
                Outcome::Confirmed(_) => {
                    self.attempts.remove(&n.id);
                }
                Outcome::Running => return Fence::Unconfirmed,
                _ if !self.lease_held => return Fence::Unconfirmed,
                Outcome::Failed if now_ms.saturating_sub(a.started_ms) < FENCE_RETRY.as_millis() as u64 => {
                    return Fence::Unconfirmed
                }
                Outcome::Failed => {} // retry below
            }
        }
        if self.lease_held {
            effects.push(self.attempt(n.id, now_ms));
        }
        Fence::Unconfirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: NodeId = 1;
    const AFTER: Duration = Duration::from_millis(800);

    fn with_fence() -> Failover {
        Failover::new(Policy { fence_command: true, fenced_after: AFTER })
    }

    fn alive(id: NodeId) -> Seen {
        Seen { id, alive: true, down_for: Duration::ZERO }
    }

    fn silent(id: NodeId, ms: u64) -> Seen {
        Seen { id, alive: false, down_for: Duration::from_millis(ms) }
    }

    fn run(node: NodeId, attempt: u64) -> Effect {
        Effect::RunFenceCommand { node, attempt }
    }

    #[test]
    fn without_a_fence_command_a_node_silent_past_its_lease_may_move() {
        let mut f = Failover::new(Policy { fence_command: false, fenced_after: AFTER });
        let v = f.round(ME, &[alive(1), silent(2, 799), silent(3, 800), alive(4)], 0);
        assert_eq!(v.may_move, BTreeSet::from([3]));
        assert!(v.effects.is_empty());
        // This leader never moves its own groups for its own silence.
        assert!(!f.round(ME, &[silent(1, 5000)], 0).may_move(1));
        assert_eq!(f.escalate(2, ME), Escalation::NoFenceCommand);
    }

    #[test]
    fn with_a_fence_command_groups_move_once_it_confirmed_without_waiting_out_the_lease() {
        let mut f = with_fence();
        // Silent: the command starts at once, while the lease runs out.
        let v = f.round(ME, &[alive(1), silent(2, 100)], 1000);
        assert_eq!(v.effects, [run(2, 1)]);
        assert!(v.may_move.is_empty());
        // Running: no second start, and past the lease nothing moves either.
        assert_eq!(f.round(ME, &[alive(1), silent(2, 900)], 1800), Verdict::default());
        f.fence_done(2, 1, true, 1850);
        let v = f.round(ME, &[alive(1), silent(2, 1000)], 1900);
        assert!(v.may_move(2) && v.effects.is_empty());
        // Confirmed off before the lease ran out: it moves at once, the lease
        // protects nothing on a node that is off.
        let mut g = with_fence();
        assert_eq!(g.round(ME, &[silent(2, 500)], 1000).effects, [run(2, 1)]);
        g.fence_done(2, 1, true, 1100);
        let v = g.round(ME, &[silent(2, 600)], 1100);
        assert!(v.may_move(2) && v.effects.is_empty(), "{v:?}");
        // Without a fence command only the lease counts, never earlier.
        let mut plain = Failover::new(Policy { fence_command: false, fenced_after: AFTER });
        assert!(!plain.round(ME, &[silent(2, 600)], 1100).may_move(2));
    }

    #[test]
    fn a_confirmation_from_before_the_node_was_last_heard_never_counts() {
        let mut f = with_fence();
        assert_eq!(f.round(ME, &[silent(2, 500)], 1000).effects, [run(2, 1)]);
        f.fence_done(2, 1, true, 1200);
        assert!(f.round(ME, &[silent(2, 700)], 1200).may_move(2));
        // Between two rounds it came back (heard at 1500) and went silent
        // again: that confirmation was of the earlier silence. Fenced anew,
        // and nothing moves on the old one, not even past the lease.
        let v = f.round(ME, &[silent(2, 500)], 2000);
        assert_eq!(v.effects, [run(2, 2)]);
        assert!(!v.may_move(2));
        assert!(!f.round(ME, &[silent(2, 900)], 2400).may_move(2), "past the lease, still unconfirmed");
        // A late confirmation of the old attempt does not count either.
        f.fence_done(2, 1, true, 2450);
        assert!(!f.round(ME, &[silent(2, 1000)], 2500).may_move(2));
        f.fence_done(2, 2, true, 2550);
        assert!(f.round(ME, &[silent(2, 1100)], 2600).may_move(2));
        // A confirmation known before the last hearing (a lying or slow
        // report) does not count: the node may have come back since.
        let mut g = with_fence();
        g.round(ME, &[silent(2, 500)], 1000);
        g.fence_done(2, 1, true, 1000);
        let v = g.round(ME, &[silent(2, 500)], 1600);
        assert!(!v.may_move(2));
        assert_eq!(v.effects, [run(2, 2)]);
        // Without its lease the leader starts no new attempt, and keeps no
        // stale verdict either.
        let mut h = with_fence();
        h.round(ME, &[silent(2, 500)], 1000);
        h.fence_done(2, 1, true, 1100);
        h.lease(false);
        assert_eq!(h.round(ME, &[silent(2, 500)], 2000), Verdict::default());
        assert_eq!(h.round(ME, &[silent(2, 2000)], 3500), Verdict::default());
        h.lease(true);
        assert_eq!(h.round(ME, &[silent(2, 2100)], 3600).effects, [run(2, 2)]);
    }

    #[test]
    fn a_node_that_just_claimed_is_neither_moved_nor_fenced_whatever_the_reports() {
        let mut f = with_fence();
        f.claimed(2, 5_000);
        // The reports still say 2 has been silent for long.
        for now in [5_000, 5_400, 5_799] {
            let v = f.round(ME, &[silent(2, 3_000)], now);
            assert!(!v.may_move(2) && v.effects.is_empty(), "at {now}");
        }
        // fenced_after (800 ms) past the claim, the reports count again.
        let v = f.round(ME, &[silent(2, 3_800)], 5_800);
        assert!(matches!(v.effects[..], [Effect::RunFenceCommand { node: 2, .. }]));
        let mut plain = Failover::new(Policy { fence_command: false, fenced_after: AFTER });
        plain.claimed(2, 5_000);
        assert!(!plain.round(ME, &[silent(2, 3_000)], 5_500).may_move(2));
        assert!(plain.round(ME, &[silent(2, 3_000)], 5_800).may_move(2));
    }

    #[test]
    fn a_leader_without_its_lease_fences_nobody() {
        let mut f = with_fence();
        f.lease(false);
        let v = f.round(ME, &[silent(2, 5_000), silent(3, 5_000)], 9_000);
        assert_eq!(v, Verdict::default(), "cut off: everybody looks silent, nobody is fenced");
        f.lease(true);
        let v = f.round(ME, &[silent(2, 5_000)], 9_100);
        assert!(matches!(v.effects[..], [Effect::RunFenceCommand { node: 2, .. }]));
    }

    #[test]
    fn a_confirmation_does_not_survive_a_change_of_leadership() {
        let mut f = with_fence();
        let v = f.round(ME, &[silent(2, 100)], 1_000);
        let Effect::RunFenceCommand { attempt, .. } = v.effects[0];
        f.fence_done(2, attempt, true, 1_100);
        assert!(f.round(ME, &[silent(2, 900)], 1_800).may_move(2));
        f.not_leader();
        // Leading again: the node is still silent, but that confirmation
        // belonged to another leadership: fence it again first.
        let v = f.round(ME, &[silent(2, 5_000)], 9_000);
        assert!(!v.may_move(2));
        assert!(matches!(v.effects[..], [Effect::RunFenceCommand { node: 2, .. }]));
    }

    #[test]
    fn a_failed_fence_is_retried_after_fence_retry_and_a_return_needs_a_new_one() {
        let mut f = with_fence();
        assert_eq!(f.round(ME, &[silent(2, 100)], 1000).effects, [run(2, 1)]);
        f.fence_done(2, 1, false, 1100);
        assert!(f.round(ME, &[silent(2, 2000)], 2999).effects.is_empty());
        let v = f.round(ME, &[silent(2, 2100)], 3000);
        assert_eq!(v.effects, [run(2, 2)]);
        assert!(!v.may_move(2), "never on a failed fence, however long the silence");
        // A late outcome of the first attempt is not this one's.
        f.fence_done(2, 1, true, 3050);
        assert!(!f.round(ME, &[silent(2, 2200)], 3100).may_move(2));
        f.fence_done(2, 2, true, 3150);
        assert!(f.round(ME, &[silent(2, 2300)], 3200).may_move(2));
        // Back, then silent again: a new silence, a new fence.
        assert_eq!(f.round(ME, &[alive(2)], 3300), Verdict::default());
        let v = f.round(ME, &[silent(2, 5000)], 3400);
        assert_eq!(v.effects, [run(2, 3)]);
        assert!(!v.may_move(2));
    }

    #[test]
    fn an_escalated_node_is_fenced_while_alive_and_its_groups_move_once_silent() {
        let mut f = with_fence();
        assert_eq!(f.escalate(2, ME), Escalation::First(vec![]));
        assert_eq!(f.escalate(2, ME), Escalation::Repeated);
        let v = f.round(ME, &[alive(1), alive(2)], 0);
        assert_eq!(v.effects, [run(2, 1)]);
        assert!(!v.may_move(2), "alive: never");
        f.fence_done(2, 1, true, 10);
        let v = f.round(ME, &[alive(2)], 10);
        assert!(v.effects.is_empty() && !v.may_move(2), "not fenced twice, and heard: not moved");
        // Powered off: silent since before the confirmation, the escalation
        // took effect; it moves at once (no lease wait for a node that is off).
        let v = f.round(ME, &[silent(2, 500)], 505);
        assert!(v.may_move(2) && v.effects.is_empty());
        assert!(!f.is_escalated(2));
        // Heard after the confirmation (it did not go off then): fenced anew.
        let mut g = with_fence();
        g.escalate(2, ME);
        g.round(ME, &[alive(2)], 0);
        g.fence_done(2, 1, true, 10);
        let v = g.round(ME, &[silent(2, 500)], 1000);
        assert_eq!(v.effects, [run(2, 2)]);
        assert!(!v.may_move(2));
        // The leader's own failed stop: it fences itself at once.
        assert_eq!(f.escalate(ME, ME), Escalation::First(vec![run(ME, 2)]));
        assert!(f.round(ME, &[alive(1)], 30).effects.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes; each of nodes 1..=4: alive or not, and for how
        /// long silent (also given with alive, which liveness never does:
        /// the verdict must not depend on it).
        Round {
            dt: u16,
            nodes: Vec<(bool, u16)>,
        },
        /// The outcome of node n's attempt (current, or the one before).
        Done {
            node: NodeId,
            current: bool,
            ok: bool,
        },
        Escalate(NodeId),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..1500, proptest::collection::vec((any::<bool>(), 0u16..3000), 4))
                .prop_map(|(dt, nodes)| Op::Round { dt, nodes }),
            3 => (1u64..5, any::<bool>(), any::<bool>()).prop_map(|(node, current, ok)| Op::Done { node, current, ok }),
            1 => (1u64..5).prop_map(Op::Escalate),
        ]
    }

    proptest! {
        /// A node a majority hears never may move. Without a fence command,
        /// a silent node may move once silent for `fenced_after`. With one,
        /// it may move exactly when the current attempt confirmed it off
        /// after it was last heard, however short the silence: never before
        /// `fenced_after` without such a confirmation, never on one of an
        /// earlier silence (an older attempt, or from before it was heard
        /// again). A silent node always has an attempt running or
        /// confirmed, or a failed one waiting for its retry; a fence command
        /// is never asked twice for one silence unless the previous one
        /// failed and FENCE_RETRY passed since it started.
        #[test]
        fn groups_move_only_off_fenced_silent_nodes(
            fence_command in any::<bool>(),
            ops in proptest::collection::vec(arb_op(), 1..80),
        ) {
            let mut f = Failover::new(Policy { fence_command, fenced_after: AFTER });
            let mut now = 0u64;
            // Per node, the model: attempts of its current silence as
            // (id, started, outcome: None running, Some((ok, known at))).
            type Try = (u64, u64, Option<(bool, u64)>);
            let mut silence: BTreeMap<NodeId, Vec<Try>> = BTreeMap::new();
            let mut escalated: BTreeSet<NodeId> = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Round { dt, nodes } => {
                        now += u64::from(dt);
                        let seen: Vec<Seen> = nodes.iter().enumerate().map(|(i, (alive, ms))| Seen {
                            id: i as u64 + 1,
                            alive: *alive,
                            down_for: Duration::from_millis(u64::from(*ms)),
                        }).collect();
                        let last_heard = |s: &Seen| now.saturating_sub(s.down_for.as_millis() as u64);
                        let mut again = f.clone();
                        let v = f.round(ME, &seen, now);
                        prop_assert_eq!(&v, &again.round(ME, &seen, now), "same input, same answer");
                        for s in &seen {
                            if s.id != ME && !s.alive {
                                escalated.remove(&s.id);
                            }
                            if s.alive && !escalated.contains(&s.id) {
                                silence.remove(&s.id);
                            }
                            // Confirmed off, then heard again: a new silence.
                            let stale = |t: &Try| matches!(t.2, Some((true, at)) if at < last_heard(s));
                            if s.id != ME && !s.alive && silence.get(&s.id).and_then(|t| t.last()).is_some_and(stale) {
                                silence.remove(&s.id);
                            }
                        }
                        for e in &v.effects {
                            let Effect::RunFenceCommand { node, attempt } = *e;
                            prop_assert!(fence_command && node != ME);
                            let s = seen.iter().find(|s| s.id == node).unwrap();
                            prop_assert!(!s.alive || escalated.contains(&node), "fencing a live node");
                            let tries = silence.entry(node).or_default();
                            if let Some((_, started, outcome)) = tries.last() {
                                prop_assert!(matches!(outcome, Some((false, _))), "asked twice for one silence");
                                prop_assert!(now - started >= FENCE_RETRY.as_millis() as u64, "retried too soon");
                            }
                            tries.push((attempt, now, None));
                        }
                        for s in &seen {
                            let may = v.may_move(s.id);
                            if s.alive || s.id == ME {
                                prop_assert!(!may, "node {} is heard (or is this leader)", s.id);
                                continue;
                            }
                            let past = s.down_for >= AFTER;
                            let current = silence.get(&s.id).and_then(|t| t.last()).copied();
                            if fence_command {
                                prop_assert!(current.is_some(), "node {} silent, no fence attempt", s.id);
                            }
                            let fenced = current.is_some_and(|t| matches!(t.2, Some((true, at)) if at >= last_heard(s)));
                            prop_assert_eq!(may, if fence_command { fenced } else { past }, "node {}", s.id);
                            if may && !past {
                                prop_assert!(fence_command && fenced, "node {} moved within its lease unfenced", s.id);
                            }
                        }
                    }
                    Op::Done { node, current, ok } => {
                        let Some(tries) = silence.get_mut(&node) else { continue };
                        let i = if current { tries.len() - 1 } else if tries.len() >= 2 { tries.len() - 2 } else { continue };
                        f.fence_done(node, tries[i].0, ok, now);
                        if current && tries[i].2.is_none() {
                            tries[i].2 = Some((ok, now));
                        }
                    }
                    Op::Escalate(node) => {
                        let e = f.escalate(node, ME);
                        if !fence_command {
                            prop_assert_eq!(e, Escalation::NoFenceCommand);
                        } else if !escalated.insert(node) {
                            prop_assert_eq!(e, Escalation::Repeated);
                        } else if node == ME {
                            let own = matches!(&e, Escalation::First(x) if matches!(x[..], [Effect::RunFenceCommand { node: ME, .. }]));
                            prop_assert!(own, "this leader fences itself at once: {:?}", e);
                        } else {
                            prop_assert_eq!(e, Escalation::First(Vec::new()));
                        }
                    }
                }
            }
        }
    }
}
