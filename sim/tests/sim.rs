//! The simulator as CI runs it: a fixed batch stays clean, a seed replays
//! exactly, each deliberate bug (mutant) is caught by the seeds recorded
//! here, and the open bugs it found are kept as (ignored) regression cases.

use tandem_sim::scenario::KINDS;
use tandem_sim::{run, Mutant, Params};

/// The scenarios CI runs: every fault kind but power loss, one site. Power
/// losses and two sites with a witness hit open bugs (see the ignored tests
/// below and docs/reliability.md); drop these limits once they are fixed.
fn ci() -> Params {
    Params { sites: Some(false), without: vec!["power-loss".into()], ..Params::default() }
}

/// Only faults of kind `kind`.
fn only(kind: &str, sites: bool) -> Params {
    let without = KINDS.iter().filter(|k| **k != kind).map(|k| k.to_string()).collect();
    Params { sites: Some(sites), without, ..Params::default() }
}

#[test]
fn a_fixed_batch_keeps_every_property() {
    let mut steps = 0;
    for seed in 0..200 {
        let out = run(seed, &ci());
        assert!(out.violations.is_empty(), "seed {seed}: {:?}\n{}", out.violations, out.summary);
        assert!(out.settled_after_us.is_some(), "seed {seed}: never settled after the heal");
        steps += out.steps;
    }
    // 30 simulated seconds in 5 ms steps, each.
    assert_eq!(steps, 200 * 6_000);
}

#[test]
fn a_seed_replays_exactly() {
    let p = Params { trace: true, ..ci() };
    let (a, b) = (run(7, &p), run(7, &p));
    assert!(a.trace.len() > 20, "a trace tells the story: {:?}", a.trace);
    assert_eq!(a.trace, b.trace);
    assert_eq!((a.steps, a.settled_after_us), (b.steps, b.settled_after_us));
    let other = run(8, &p);
    assert_ne!(a.trace, other.trace, "another seed, another story");
}

/// Each seed is clean as the product is, and violated with the mutant.
fn caught(m: Mutant, seeds: &[u64]) {
    for &seed in seeds {
        let clean = run(seed, &ci());
        assert!(clean.violations.is_empty(), "seed {seed} unmutated: {:?}", clean.violations);
        let bad = run(seed, &Params { mutant: Some(m), ..ci() });
        assert!(!bad.violations.is_empty(), "seed {seed}: mutant {} not caught", m.name());
        assert!(bad.violations[0].what.contains("while it runs on"), "{:?}", bad.violations);
    }
}

/// The leader takes a silent node as gone right at the end of its lease:
/// a watchdog that wakes late on a busy host still runs the group there.
#[test]
fn the_checker_catches_a_leader_without_margin() {
    caught(Mutant::Margin0, &[1920, 318, 366]);
}

/// A node starts the group its (stale) state places on it, unclaimed.
#[test]
fn the_checker_catches_a_start_without_a_claim() {
    caught(Mutant::NoClaim, &[15, 86, 90]);
}

/// A lapsed lease kills nothing: the group runs on while it moves.
#[test]
fn the_checker_catches_a_lapsed_lease_that_kills_nothing() {
    caught(Mutant::KeepRunning, &[0, 2, 5]);
}

/// Open bug: after a power loss CLOCK_BOOTTIME starts over, but the lease
/// file (and the peers' echoes of the old agent's heartbeats) hold times of
/// the previous boot, far ahead: the rebooted agent takes them for a lease.
/// It restarts the adopted group (its process died with the power) without
/// a claim, on its stale state, while the group already moved.
#[test]
#[ignore = "open bug: a lease from before a reboot is taken as held"]
fn a_rebooted_node_holds_no_lease_from_its_previous_boot() {
    let out = run(622, &only("power-loss", false));
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}

/// Open bug: two sites and a witness, the link between the sites cut. A
/// node on the leader's far side steps out only once it has not heard the
/// leader for the node timeout (0.5 s), and its lease runs 0.5 s past its
/// last echoed heartbeat: about 1 s, while the leader, hearing of it only
/// through the witness, moves its groups after 0.8 s.
#[test]
#[ignore = "open bug: stepping out is slower than the leader's wait"]
fn a_site_cut_moves_no_group_before_its_node_lets_go() {
    let out = run(64, &only("site-cut", true));
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    // Five voters over two sites: the far side keeps its lease through
    // the witness and one voter of its own, and never steps out.
    let out = run(25, &only("site-cut", true));
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}

/// Open bug: the leader is cut off for longer than the lease wait but
/// shorter than an election. Back, it commits failovers from its stale
/// liveness view (it heard nobody, so everybody looks silent) while the
/// others held their leases all along.
#[test]
#[ignore = "open bug: a leader back from a short isolation acts on a stale view"]
fn a_leader_back_from_isolation_moves_nothing_that_ran() {
    let out = run(562, &only("partition", false));
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}
