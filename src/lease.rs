//! The lease core: whether this node holds its lease, when the lease may be
//! extended, when it lapses, and whether the node steps out of the cluster.
//!
//! A node holds its lease while a majority of voters has echoed a heartbeat
//! it sent no longer than `lease_ms` ago (itself counting as now). The
//! leader moves a silent node's groups only after that lease (plus a
//! margin) has passed, so a node that can no longer prove it is heard must
//! stop everything before then: the lease *lapses*. A lease that lapsed
//! with something running is taken again only once everything here has been
//! killed and stopped, and only from heartbeats sent since it lapsed.
//!
//! Pure: inputs and the current time (CLOCK_BOOTTIME ms) in, effects out.
//! It never does I/O, never reads a clock, never takes a lock; the shell
//! (the node agent) sends the heartbeats, writes the lease file, kills the
//! processes, and reports back with [`LeaseCore::persisted`] and
//! [`LeaseCore::everything_stopped`].

use tandem_raft::NodeId;

/// What the shell must do after a call into the core, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Send this round's heartbeats (not while stepped out).
    SendHeartbeats,
    /// This node cannot hear the leader that a majority of voters hears:
    /// it goes silent, so its lease lapses and the leader moves its groups
    /// to a side that can work. For the log.
    StepOut { leader: NodeId },
    /// Heard again (or the leader changed): heartbeats resume. For the log.
    StepIn,
    /// Write the lease file with this deadline, then call
    /// [`LeaseCore::persisted`]: the watchdog process must never see a
    /// shorter lease than the one the agent acts on.
    PersistLease { deadline_ms: u64 },
    /// The lease lapsed with something running: kill every resource now,
    /// without waiting for the executor. Once the executor has killed and
    /// stopped everything, call [`LeaseCore::everything_stopped`].
    KillEverything,
}

/// One lease round's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Tick<'a> {
    /// CLOCK_BOOTTIME, ms.
    pub now_ms: u64,
    /// This node (counts as having heard itself now when it is a voter).
    pub me: NodeId,
    /// Every voter with the send time (our clock) of the newest heartbeat
    /// of ours it has echoed back; None if it never has.
    pub voters: &'a [(NodeId, Option<u64>)],
    /// Whether anything runs here (processes or records). Only looked at
    /// once the lease has run out: the shell may pass false while
    /// [`LeaseCore::holds`] is true and skip the look.
    pub running: bool,
}

/// The node's lease, its lapse and its stepping out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCore {
    lease_ms: u64,
    /// The lease's end, CLOCK_BOOTTIME ms (0: never held).
    deadline_ms: u64,
    /// The deadline last asked to be persisted, not yet confirmed.
    proposed_ms: Option<u64>,
    /// The lease ran out with something running: nothing extends it until
    /// the executor has killed and stopped everything.
    lapsed: bool,
    /// Silent on purpose: cut off from a leader a majority hears.
    stepped_out: bool,
    /// The last leader this node knew: a candidate knows none, and must
    /// not step back in for that alone.
    last_leader: Option<NodeId>,
}

/// When this node sent the heartbeat that a majority of `voters` has since
/// echoed (`me`, when a voter, counting as `now_ms`): the lease counts from
/// there. So it ends no later than the leader's count from the last
/// heartbeat it heard from us, also when only our outgoing traffic is lost.
pub fn quorum_acked_ms(me: NodeId, voters: &[(NodeId, Option<u64>)], now_ms: u64) -> Option<u64> {
    // An echo of a send time later than now was not sent in this boot
    // (CLOCK_BOOTTIME starts over at a reboot, a peer may still echo the
    // previous boot's times): it proves nothing.
    let mut acked: Vec<u64> = voters
        .iter()
        .filter_map(|(v, acked)| if *v == me { Some(now_ms) } else { acked.filter(|ms| *ms <= now_ms) })
        .collect();
    acked.sort_unstable_by(|a, b| b.cmp(a));
    acked.get(voters.len() / 2).copied()
}

impl LeaseCore {
    /// A core holding a lease until `inherited_ms` (the lease file an agent
    /// that ran before this one left; 0 for none), extended by `lease_ms`
    /// past each heartbeat a majority echoed.
    pub fn new(lease_ms: u64, inherited_ms: u64) -> LeaseCore {
        LeaseCore {
            lease_ms,
            deadline_ms: inherited_ms,
            proposed_ms: None,
            lapsed: false,
            stepped_out: false,
            last_leader: None,
        }
    }

    /// Whether this node holds its lease at `now_ms`.
    pub fn holds(&self, now_ms: u64) -> bool {
        now_ms < self.deadline_ms
    }

    /// The lease's end (CLOCK_BOOTTIME ms) as last persisted.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Whether the lease lapsed with something running and the executor
    /// has not yet confirmed that everything is killed and stopped.
    pub fn lapsed(&self) -> bool {
        self.lapsed
    }

    /// Whether this node is stepped out (sends no heartbeats).
    pub fn stepped_out(&self) -> bool {
        self.stepped_out
    }

    /// The leader whose silence would make this node step out: the one Raft
    /// reports now, else the last one it knew.
    pub fn leader_to_watch(&self, raft_leader: Option<NodeId>) -> Option<NodeId> {
        raft_leader.or(self.last_leader)
    }

    /// One heartbeat round. `cut_off`: this node does not hear
    /// [`leader_to_watch`](Self::leader_to_watch)`(raft_leader)` while a
    /// majority of voters does (never true of itself). Cut off, it steps out
    /// and goes silent; heard again, it steps back in.
    pub fn heartbeat_round(&mut self, raft_leader: Option<NodeId>, cut_off: bool) -> Vec<Effect> {
        if raft_leader.is_some() {
            self.last_leader = raft_leader;
        }
        let mut out = Vec::new();
        let cut_off = cut_off && self.last_leader.is_some();
        if cut_off != self.stepped_out {
            self.stepped_out = cut_off;
            out.push(match (cut_off, self.last_leader) {
                (true, Some(leader)) => Effect::StepOut { leader },
                _ => Effect::StepIn,
            });
        }
        if !cut_off {
            out.push(Effect::SendHeartbeats);
        }
        out
    }

    /// One lease round: lapse if the lease ran out with something running,
    /// else extend it from what a majority echoed.
    pub fn tick(&mut self, t: Tick<'_>) -> Vec<Effect> {
        let mut out = Vec::new();
        self.proposed_ms = None;
        let run_out = self.deadline_ms <= t.now_ms;
        if run_out && t.running && !self.lapsed {
            self.lapsed = true;
            out.push(Effect::KillEverything);
        }
        if self.lapsed {
            return out; // not before the executor has stopped what it ran
        }
        let Some(heard_ms) = quorum_acked_ms(t.me, t.voters, t.now_ms) else { return out };
        // A lease that ran out is taken again only from heartbeats sent
        // (and echoed) since.
        if run_out && heard_ms < self.deadline_ms {
            return out;
        }
        let deadline_ms = heard_ms.saturating_add(self.lease_ms);
        if deadline_ms > self.deadline_ms {
            self.proposed_ms = Some(deadline_ms);
            out.push(Effect::PersistLease { deadline_ms });
        }
        out
    }

    /// The lease file now holds `deadline_ms` (from the last
    /// [`Effect::PersistLease`]): the node acts on it from now on. Any other
    /// value (a stale or failed write) changes nothing.
    pub fn persisted(&mut self, deadline_ms: u64) {
        if self.proposed_ms.take() == Some(deadline_ms) && deadline_ms > self.deadline_ms && !self.lapsed {
            self.deadline_ms = deadline_ms;
        }
    }

    /// The executor has killed and stopped everything after a lapse: the
    /// lease may be taken again (from heartbeats sent since it lapsed).
    pub fn everything_stopped(&mut self) {
        self.lapsed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: u64 = 500;

    fn tick(core: &mut LeaseCore, now_ms: u64, voters: &[(NodeId, Option<u64>)], running: bool) -> Vec<Effect> {
        core.tick(Tick { now_ms, me: 1, voters, running })
    }

    /// Ticks and persists whatever the core asks for.
    fn renew(core: &mut LeaseCore, now_ms: u64, voters: &[(NodeId, Option<u64>)], running: bool) -> Vec<Effect> {
        let out = tick(core, now_ms, voters, running);
        for e in &out {
            if let Effect::PersistLease { deadline_ms } = e {
                core.persisted(*deadline_ms);
            }
        }
        out
    }

    #[test]
    fn echoes_from_a_previous_boot_prove_nothing() {
        // Rebooted: now is 20 s of the new boot; the peers still echo send
        // times of the previous boot (weeks of uptime).
        let old = 1_900_000_000;
        assert_eq!(quorum_acked_ms(1, &[(1, None), (2, Some(old)), (3, Some(old))], 20_000), None);
        assert_eq!(quorum_acked_ms(1, &[(1, None), (2, Some(old)), (3, Some(19_950))], 20_000), Some(19_950));
        let mut core = LeaseCore::new(500, 0);
        let voters = [(1, None), (2, Some(old)), (3, Some(old))];
        let effects = core.tick(Tick { now_ms: 20_000, me: 1, voters: &voters, running: false });
        assert!(!effects.iter().any(|e| matches!(e, Effect::PersistLease { .. })), "{effects:?}");
        assert!(!core.holds(20_000));
    }

    #[test]
    fn the_lease_counts_from_the_heartbeat_a_majority_echoed() {
        assert_eq!(quorum_acked_ms(1, &[(1, None), (2, Some(900)), (3, Some(950))], 1000), Some(950));
        assert_eq!(quorum_acked_ms(1, &[(1, None), (2, Some(900)), (3, None)], 1000), Some(900));
        assert_eq!(quorum_acked_ms(1, &[(1, None), (2, None), (3, None)], 1000), None, "only itself");
        // Five voters: itself and two others.
        let five = [(1, None), (2, Some(700)), (3, Some(800)), (4, None), (5, Some(600))];
        assert_eq!(quorum_acked_ms(1, &five, 1000), Some(700));
        // A learner counts for nothing: a majority of the voters, all others.
        assert_eq!(quorum_acked_ms(9, &[(1, Some(10)), (2, Some(20)), (3, None)], 1000), Some(10));
        assert_eq!(quorum_acked_ms(1, &[], 1000), None);
        // A single voter is its own majority.
        assert_eq!(quorum_acked_ms(1, &[(1, None)], 1000), Some(1000));
    }

    #[test]
    fn heard_by_a_majority_the_lease_is_extended_only_once_persisted() {
        let mut c = LeaseCore::new(LEASE, 0);
        let voters = [(1, None), (2, Some(980)), (3, None)];
        assert!(!c.holds(1000));
        assert_eq!(tick(&mut c, 1000, &voters, false), [Effect::PersistLease { deadline_ms: 1480 }]);
        assert!(!c.holds(1000), "not before the file holds it");
        c.persisted(1480);
        assert!(c.holds(1479) && !c.holds(1480));
        // Nothing newer echoed: nothing to write.
        assert_eq!(tick(&mut c, 1100, &voters, false), []);
        // A write that failed (persisted never called) leaves it; a value
        // that was not asked for changes nothing.
        let voters = [(1, None), (2, Some(1200)), (3, None)];
        assert_eq!(tick(&mut c, 1250, &voters, false), [Effect::PersistLease { deadline_ms: 1700 }]);
        c.persisted(9999);
        assert_eq!(c.deadline_ms(), 1480);
        assert_eq!(tick(&mut c, 1260, &voters, false), [Effect::PersistLease { deadline_ms: 1700 }]);
        c.persisted(1700);
        assert_eq!(c.deadline_ms(), 1700);
    }

    #[test]
    fn a_lease_that_ran_out_with_something_running_lapses_until_everything_stopped() {
        let mut c = LeaseCore::new(LEASE, 1500);
        let old = [(1, None), (2, Some(1000)), (3, Some(900))];
        assert_eq!(tick(&mut c, 1499, &old, true), []);
        // Runs out with something running: kill, once.
        assert_eq!(tick(&mut c, 1500, &old, true), [Effect::KillEverything]);
        assert!(c.lapsed() && !c.holds(1500));
        assert_eq!(tick(&mut c, 1600, &old, true), []);
        // A majority heard again, but the executor has not stopped yet.
        let fresh = [(1, None), (2, Some(1650)), (3, None)];
        assert_eq!(tick(&mut c, 1700, &fresh, true), []);
        c.everything_stopped();
        assert!(!c.holds(1700));
        // Heartbeats from before the lapse do not count.
        assert_eq!(tick(&mut c, 1700, &old, false), []);
        assert_eq!(renew(&mut c, 1700, &fresh, false), [Effect::PersistLease { deadline_ms: 2150 }]);
        assert!(c.holds(1700) && !c.lapsed());
    }

    #[test]
    fn a_lease_that_ran_out_with_nothing_running_is_retaken_from_fresh_heartbeats() {
        let mut c = LeaseCore::new(LEASE, 1500);
        let old = [(1, None), (2, Some(1400)), (3, None)];
        assert_eq!(tick(&mut c, 1600, &old, false), [], "nothing to kill, but no renewal from old news");
        assert!(!c.lapsed());
        let fresh = [(1, None), (2, Some(1500)), (3, None)];
        assert_eq!(renew(&mut c, 1600, &fresh, false), [Effect::PersistLease { deadline_ms: 2000 }]);
        assert!(c.holds(1600));
    }

    #[test]
    fn a_node_cut_off_from_the_leader_steps_out_and_back_in() {
        let mut c = LeaseCore::new(LEASE, 0);
        // A candidate knows no leader: never cut off for that.
        assert_eq!(c.leader_to_watch(None), None);
        assert_eq!(c.heartbeat_round(None, true), [Effect::SendHeartbeats]);
        assert_eq!(c.heartbeat_round(Some(2), false), [Effect::SendHeartbeats]);
        // The leader is gone from Raft's view: the last one is watched.
        assert_eq!(c.leader_to_watch(None), Some(2));
        assert_eq!(c.heartbeat_round(None, true), [Effect::StepOut { leader: 2 }]);
        assert!(c.stepped_out());
        assert_eq!(c.heartbeat_round(None, true), [], "silent while cut off");
        assert_eq!(c.heartbeat_round(Some(3), false), [Effect::StepIn, Effect::SendHeartbeats]);
        assert_eq!(c.leader_to_watch(None), Some(3));
        assert!(!c.stepped_out());
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes; voters 2..=5 echo (offset back from now, if any).
        Tick { dt: u16, acks: Vec<Option<u16>>, running: bool },
        /// The shell persists (or fails to persist) the last ask.
        Persist(bool),
        /// The executor reports everything killed and stopped.
        Stopped,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..400, proptest::collection::vec(proptest::option::of(0u16..1500), 4), any::<bool>())
                .prop_map(|(dt, acks, running)| Op::Tick { dt, acks, running }),
            3 => any::<bool>().prop_map(Op::Persist),
            1 => Just(Op::Stopped),
        ]
    }

    proptest! {
        /// The deadline never decreases; it extends only from what a
        /// majority echoed, never from heartbeats older than a lapse; a
        /// lapse with something running kills once and blocks every
        /// extension until the executor confirmed and a majority was heard
        /// since.
        #[test]
        fn the_lease_is_never_extended_unsafely(
            voters_n in 1usize..6,
            inherited in 0u64..2000,
            ops in proptest::collection::vec(arb_op(), 1..80),
        ) {
            let mut c = LeaseCore::new(LEASE, inherited);
            let mut now = 1000u64;
            let mut last_ask: Option<u64> = None;
            // The deadline at which the lease lapsed, until taken again.
            let mut lapsed_at: Option<u64> = None;
            let mut stopped_since_lapse = false;
            for op in ops {
                let before = c.deadline_ms();
                match op {
                    Op::Tick { dt, acks, running } => {
                        now += u64::from(dt);
                        let voters: Vec<(NodeId, Option<u64>)> = (1..=voters_n as u64)
                            .map(|v| (v, if v == 1 { None } else {
                                acks[(v - 2) as usize].map(|back| now.saturating_sub(u64::from(back)))
                            }))
                            .collect();
                        let was_lapsed = c.lapsed();
                        let out = c.tick(Tick { now_ms: now, me: 1, voters: &voters, running });
                        last_ask = None;
                        for e in &out {
                            match *e {
                                Effect::KillEverything => {
                                    prop_assert!(before <= now && running && !was_lapsed);
                                    lapsed_at = Some(before);
                                    stopped_since_lapse = false;
                                }
                                Effect::PersistLease { deadline_ms } => {
                                    prop_assert!(!c.lapsed(), "no extension while lapsed");
                                    prop_assert!(deadline_ms > before);
                                    let sent = deadline_ms - LEASE;
                                    prop_assert!(sent <= now);
                                    // A majority (itself as now) echoed at or after `sent`.
                                    let heard = voters.iter()
                                        .filter(|(v, a)| *v == 1 || a.is_some_and(|a| a >= sent))
                                        .count();
                                    prop_assert!(heard > voters_n / 2);
                                    if before <= now {
                                        prop_assert!(sent >= before, "extended from before the lease ran out");
                                    }
                                    if let Some(d) = lapsed_at {
                                        prop_assert!(stopped_since_lapse && sent >= d);
                                    }
                                    last_ask = Some(deadline_ms);
                                }
                                other => prop_assert!(false, "unexpected {other:?}"),
                            }
                        }
                    }
                    Op::Persist(ok) => {
                        if let (true, Some(d)) = (ok, last_ask.take()) {
                            c.persisted(d);
                            prop_assert_eq!(c.deadline_ms(), d);
                            lapsed_at = None;
                        } else {
                            // A failed write, or nothing asked: no change
                            // (no ask is ever past now + LEASE).
                            c.persisted(now + LEASE + 1);
                            prop_assert_eq!(c.deadline_ms(), before);
                        }
                    }
                    Op::Stopped => {
                        c.everything_stopped();
                        stopped_since_lapse = true;
                    }
                }
                prop_assert!(c.deadline_ms() >= before, "the deadline went back");
                if lapsed_at.is_some() {
                    prop_assert!(!c.holds(now), "held again without a fresh majority");
                }
            }
        }

        /// Heartbeats stop exactly while cut off from a known leader.
        #[test]
        fn heartbeats_stop_only_while_cut_off_from_a_known_leader(
            rounds in proptest::collection::vec((proptest::option::of(1u64..4), any::<bool>()), 1..50),
        ) {
            let mut c = LeaseCore::new(LEASE, 0);
            let mut known = None;
            for (leader, cut_off) in rounds {
                known = leader.or(known);
                prop_assert_eq!(c.leader_to_watch(leader), known);
                let was_out = c.stepped_out();
                let out = c.heartbeat_round(leader, cut_off);
                let silent = cut_off && known.is_some();
                prop_assert_eq!(c.stepped_out(), silent);
                prop_assert_eq!(out.contains(&Effect::SendHeartbeats), !silent);
                prop_assert_eq!(out.iter().any(|e| matches!(e, Effect::StepOut { .. })), silent && !was_out);
                prop_assert_eq!(out.contains(&Effect::StepIn), !silent && was_out);
            }
        }
    }
}
