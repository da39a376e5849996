//! tandem's deterministic simulator.
//!
//! N nodes made of the product's real pure cores — the replicated state
//! machine (`ClusterState::apply`), the scheduler, autopilot, liveness —
//! wired through a simulated network and simulated clocks, with crashes,
//! power losses, stalls, partitions and clock drift, all drawn from one
//! seed: a failing seed replays exactly. A checker looks at every step for
//! a group running on two nodes at once, an epoch going back, a committed
//! placement breaking the rules, and a healed cluster that does not run its
//! groups again in time.
//!
//! It must never do I/O nor read a clock while a scenario runs, nor change
//! what the cores decide: faults and mutants live in the wiring only.

pub mod check;
pub mod clock;
pub mod executor;
pub mod faults;
pub mod leader;
pub mod net;
pub mod node;
pub mod scenario;
pub mod world;

use std::fmt;

/// A deliberate bug wired into the simulated node (never into the product),
/// to prove that the checker catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// The leader takes a silent node as gone as soon as its lease would
    /// end: no margin.
    Margin0,
    /// A node starts a group placed on it without a committed claim.
    NoClaim,
    /// A lapsed lease kills nothing (neither the agent nor its watchdog).
    KeepRunning,
}

impl Mutant {
    pub const ALL: [Mutant; 3] = [Mutant::Margin0, Mutant::NoClaim, Mutant::KeepRunning];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::Margin0 => "margin0",
            Mutant::NoClaim => "no-claim",
            Mutant::KeepRunning => "keep-running",
        }
    }

    pub fn parse(s: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// What a batch of scenarios looks like.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// Nodes per scenario; `None`: drawn from 3 to 7 by the seed.
    pub nodes: Option<usize>,
    /// Two sites and a witness; `None`: drawn by the seed (one in three).
    pub sites: Option<bool>,
    pub mutant: Option<Mutant>,
    /// Fault kinds left out (by name, see `scenario::KINDS`).
    pub without: Vec<String>,
    /// Keep a readable trace of the run.
    pub trace: bool,
}

/// One broken property, where and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    /// Simulated time, microseconds since the scenario began.
    pub at_us: u64,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {} step {} t={}: {}", self.seed, self.step, fmt_us(self.at_us), self.what)
    }
}

/// What one scenario did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub seed: u64,
    pub steps: u64,
    pub violations: Vec<Violation>,
    /// The readable trace (empty unless asked for).
    pub trace: Vec<String>,
    /// How long after the faults healed every group ran again (µs), if it did.
    pub settled_after_us: Option<u64>,
    /// One line about the scenario (topology, faults).
    pub summary: String,
}

/// Runs the scenario `seed` describes.
pub fn run(seed: u64, params: &Params) -> Outcome {
    world::World::new(seed, params).run()
}

/// `12.345s`.
pub fn fmt_us(us: u64) -> String {
    format!("{}.{:03}s", us / 1_000_000, (us / 1000) % 1000)
}
