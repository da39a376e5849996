//! Autopilot: which nodes should vote. A pure function of the members, their
//! liveness and the current voters; the daemon's leader loop applies its
//! answer through openraft's membership change.
//!
//! Rules, in order: the leader always votes; witnesses vote whenever they are
//! healthy; the voter count is the target (3 or 5) or, with fewer healthy
//! nodes, the largest odd number available (two voters survive no failure
//! that one voter would not); a voter offline for longer than the dead-voter
//! time is replaced by a healthy, caught-up learner, never dropped without a
//! replacement; voters are spread over sites. It never does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tandem_raft::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    pub site: Option<String>,
    pub witness: bool,
    /// Heard from within the node timeout.
    pub alive: bool,
    /// How long it has been silent (zero when alive).
    pub down_for: Duration,
    /// Its replicated log is close enough to the leader's to vote at once.
    pub caught_up: bool,
}

impl Candidate {
    /// A member as the leader (`me`) sees it: its liveness (`alive`,
    /// silent `down_for`), and `matched`, the last log index the leader
    /// knows it holds, against the leader's `last` and the lag allowed.
    /// The leader itself is alive and caught up.
    pub fn new(
        node: &tandem_raft::state::NodeRecord,
        me: bool,
        (alive, down_for): (bool, Duration),
        matched: Option<u64>,
        (last, max_lag): (u64, u64),
    ) -> Candidate {
        Candidate {
            id: node.id,
            site: node.site.clone(),
            witness: node.witness,
            alive: me || alive,
            down_for: if me { Duration::ZERO } else { down_for },
            caught_up: me || matched.is_some_and(|i| i + max_lag >= last),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Input {
    /// Every node that is in both the cluster state and the Raft membership.
    pub candidates: Vec<Candidate>,
    pub voters: BTreeSet<NodeId>,
    pub leader: NodeId,
    pub target: usize,
    pub dead_after: Duration,
}

/// The voter set autopilot wants, or `None` when the current one is right.
pub fn plan_voters(input: &Input) -> Option<BTreeSet<NodeId>> {
    let by_id: BTreeMap<NodeId, &Candidate> = input.candidates.iter().map(|c| (c.id, c)).collect();
    let dead = |c: &Candidate| !c.alive && c.down_for >= input.dead_after;
    let is_dead = |id: &NodeId| *id != input.leader && by_id.get(id).is_none_or(|c| dead(c));
    let mut kept: BTreeSet<NodeId> = input.voters.iter().copied().filter(|id| !is_dead(id)).collect();
    let dead_voters: Vec<NodeId> = input.voters.iter().copied().filter(is_dead).collect();
    // Without a live majority of the current voters no change can commit.
    if kept.len() * 2 <= input.voters.len() {
        return None;
    }
    let mut learners: Vec<&Candidate> =
        input.candidates.iter().filter(|c| !input.voters.contains(&c.id) && c.alive && c.caught_up).collect();
    // Witnesses first, then by id, so the choice is deterministic.
    learners.sort_by_key(|c| (!c.witness, c.id));

    // Dead voters count toward the size: they leave only when a learner
    // takes their place, never to shrink the voter set.
    let pool = kept.len() + learners.len() + dead_voters.len();
    let mut want = input.target.min(pool).max(1);
    if want.is_multiple_of(2) {
        want -= 1;
    }

    let site_of = |id: NodeId| by_id.get(&id).and_then(|c| c.site.clone());
    let site_counts = |set: &BTreeSet<NodeId>| {
        let mut m: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for id in set {
            *m.entry(site_of(*id)).or_default() += 1;
        }
        m
    };

    // Promote: witnesses, then learners from the sites with fewest voters.
    while kept.len() < want && !learners.is_empty() {
        let counts = site_counts(&kept);
        let pick = learners
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| (!c.witness, counts.get(&c.site).copied().unwrap_or(0), c.id))
            .map(|(i, _)| i)
            .unwrap_or(0);
        kept.insert(learners.remove(pick).id);
    }
    for d in dead_voters {
        if kept.len() >= want {
            break;
        }
        kept.insert(d);
    }
    // Demote: dead ones first, then non-witness voters from the fullest site.
    while kept.len() > want {
        let counts = site_counts(&kept);
        let victim = kept.iter().copied().filter(|id| *id != input.leader).max_by_key(|id| {
            let c = by_id.get(id);
            let is_dead = c.is_none_or(|c| dead(c));
            let witness = c.is_some_and(|c| c.witness);
            (is_dead, !witness, counts.get(&site_of(*id)).copied().unwrap_or(0), *id)
        });
        match victim {
            Some(v) => kept.remove(&v),
            None => break,
        };
    }
    // Spread: swap a voter from the fullest site for a learner from the
    // emptiest one while they differ by two or more. Each swap lowers the
    // fullest count and raises the emptiest, so this converges; the bound is
    // a backstop.
    for _ in 0..tandem_raft::state::MAX_NODES {
        let counts = site_counts(&kept);
        let count_of = |site: &Option<String>| counts.get(site).copied().unwrap_or(0);
        let Some((pos, have)) =
            learners.iter().enumerate().map(|(i, l)| (i, count_of(&l.site))).min_by_key(|(i, have)| (*have, *i))
        else {
            break;
        };
        let victim = kept
            .iter()
            .copied()
            .filter(|id| *id != input.leader && !by_id.get(id).is_some_and(|c| c.witness))
            .max_by_key(|id| (count_of(&site_of(*id)), std::cmp::Reverse(*id)));
        match victim {
            Some(v) if count_of(&site_of(v)) >= have + 2 => {
                kept.remove(&v);
                kept.insert(learners.remove(pos).id);
            }
            _ => break,
        }
    }
    (kept != input.voters).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: NodeId) -> Candidate {
        Candidate { id, site: None, witness: false, alive: true, down_for: Duration::ZERO, caught_up: true }
    }

    fn dead(id: NodeId, secs: u64) -> Candidate {
        Candidate { alive: false, down_for: Duration::from_secs(secs), ..node(id) }
    }

    fn input(candidates: Vec<Candidate>, voters: &[NodeId]) -> Input {
        Input {
            candidates,
            voters: voters.iter().copied().collect(),
            leader: voters[0],
            target: 3,
            dead_after: Duration::from_secs(10),
        }
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn grows_to_three_when_nodes_join() {
        let i = input(vec![node(1), node(2), node(3)], &[1]);
        assert_eq!(plan_voters(&i), Some(set(&[1, 2, 3])));
    }

    #[test]
    fn two_nodes_keep_one_voter() {
        let i = input(vec![node(1), node(2)], &[1]);
        assert_eq!(plan_voters(&i), None);
    }

    #[test]
    fn two_voters_shrink_to_one_when_nothing_else_is_healthy() {
        let i = input(vec![node(1), node(2)], &[1, 2]);
        assert_eq!(plan_voters(&i), Some(set(&[1])));
    }

    #[test]
    fn two_servers_and_a_witness_all_vote() {
        let mut w = node(3);
        w.witness = true;
        let i = input(vec![node(1), node(2), w], &[1]);
        assert_eq!(plan_voters(&i), Some(set(&[1, 2, 3])));
    }

    #[test]
    fn witness_is_preferred_over_other_learners() {
        let mut w = node(9);
        w.witness = true;
        let i = input(vec![node(1), node(2), node(3), w], &[1, 2]);
        assert_eq!(plan_voters(&i), Some(set(&[1, 2, 9])));
    }

    #[test]
    fn dead_voter_is_replaced_by_a_healthy_learner() {
        let i = input(vec![node(1), node(2), dead(3, 11), node(4)], &[1, 2, 3]);
        assert_eq!(plan_voters(&i), Some(set(&[1, 2, 4])));
    }

    #[test]
    fn briefly_silent_voter_is_kept() {
        let i = input(vec![node(1), node(2), dead(3, 2), node(4)], &[1, 2, 3]);
        assert_eq!(plan_voters(&i), None);
    }

    #[test]
    fn dead_voter_without_replacement_is_kept() {
        let i = input(vec![node(1), node(2), dead(3, 60)], &[1, 2, 3]);
        assert_eq!(plan_voters(&i), None);
    }

    #[test]
    fn lagging_learner_is_not_promoted() {
        let mut l = node(4);
        l.caught_up = false;
        let i = input(vec![node(1), node(2), dead(3, 60), l], &[1, 2, 3]);
        assert_eq!(plan_voters(&i), None);
    }

    #[test]
    fn five_voters_from_fifteen_nodes() {
        let mut i = input((1..=15).map(node).collect(), &[1, 2, 3]);
        i.target = 5;
        assert_eq!(plan_voters(&i), Some(set(&[1, 2, 3, 4, 5])));
    }

    #[test]
    fn voters_spread_over_sites() {
        let sited = |id, s: &str| Candidate { site: Some(s.into()), ..node(id) };
        let i = input(vec![sited(1, "a"), sited(2, "a"), sited(3, "a"), sited(4, "b"), sited(5, "c")], &[1, 2, 3]);
        let got = plan_voters(&i).expect("a change");
        assert!(got.contains(&1) && got.contains(&4) && got.contains(&5), "{got:?}");
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        (1usize..=32, prop_oneof![Just(1usize), Just(3), Just(5)], any::<u64>())
            .prop_flat_map(|(n, target, seed)| {
                let cands =
                    proptest::collection::vec((any::<bool>(), 0u64..30, any::<bool>(), any::<bool>(), 0u8..3), n);
                let voters = proptest::collection::btree_set(1..=n as u64, 1..=n.min(7));
                (cands, voters, Just(target), Just(seed))
            })
            .prop_map(|(cands, voters, target, seed)| {
                let leader = *voters.iter().nth(seed as usize % voters.len()).unwrap();
                let candidates = cands
                    .into_iter()
                    .enumerate()
                    .map(|(i, (alive, down, witness, caught_up, site))| {
                        let id = i as u64 + 1;
                        let alive = alive || id == leader;
                        Candidate {
                            id,
                            site: Some(format!("s{site}")),
                            witness,
                            alive,
                            down_for: if alive { Duration::ZERO } else { Duration::from_secs(down) },
                            caught_up,
                        }
                    })
                    .collect();
                Input { candidates, voters, leader, target, dead_after: Duration::from_secs(10) }
            })
    }

    proptest! {
        #[test]
        fn plan_is_safe_for_any_cluster(input in arb_input()) {
            let Some(new) = plan_voters(&input) else { return Ok(()) };
            let ids: BTreeSet<NodeId> = input.candidates.iter().map(|c| c.id).collect();
            prop_assert!(new.contains(&input.leader), "leader must keep its vote");
            prop_assert!(new.is_subset(&ids), "only known nodes vote");
            prop_assert!(new.len() <= input.target.max(input.voters.len()));
            // Every new voter was already a voter or is a healthy caught-up learner.
            for id in &new {
                let c = input.candidates.iter().find(|c| c.id == *id).unwrap();
                prop_assert!(input.voters.contains(id) || (c.alive && c.caught_up));
            }
            // A healthy voter is only removed for an odd count, a site spread
            // or a lower target; never to make room for a dead one.
            for id in new.difference(&input.voters) {
                let c = input.candidates.iter().find(|c| c.id == *id).unwrap();
                prop_assert!(c.alive);
            }
            // Applying the plan again asks for nothing more: it converges.
            let again = Input { voters: new.clone(), ..input.clone() };
            prop_assert_eq!(plan_voters(&again), None);
        }
    }
}
