//! `tandem-sim`: runs seeded scenarios of the deterministic simulator and
//! prints `seeds: N, steps: M, violations: K`; exits 1 on any violation.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tandem_sim::{fmt_us, run, Mutant, Params};

#[derive(Parser)]
#[command(name = "tandem-sim", about = "Deterministic simulation of tandem's nodes, network and clocks")]
struct Args {
    /// How many scenarios to run (seeds FIRST .. FIRST+N).
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// The first seed of the batch.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Replay this one seed (with --trace for the story).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes per scenario, 3 to 7 (default: drawn by the seed).
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..=7))]
    nodes: Option<u64>,
    /// Two sites and a witness in every scenario (default: one in three).
    #[arg(long, conflicts_with = "no_sites")]
    sites: bool,
    /// No scenario with two sites and a witness.
    #[arg(long)]
    no_sites: bool,
    /// Wire a deliberate bug into the simulated nodes: margin0, no-claim,
    /// keep-running (the checker must catch it).
    #[arg(long, value_parser = parse_mutant)]
    mutant: Option<Mutant>,
    /// Leave these fault kinds out (comma-separated): partition, site-cut,
    /// one-way, path-down, crash, power-loss, stall, busy, standby,
    /// maintenance, disable, move, resource-crash; and fence (no fence
    /// command configured).
    #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
    without: Vec<String>,
    /// Print the scenario's trace (with --seed).
    #[arg(long)]
    trace: bool,
}

fn parse_kind(s: &str) -> Result<String, String> {
    match tandem_sim::scenario::KINDS.contains(&s) {
        true => Ok(s.to_string()),
        false => Err(format!("unknown fault kind {s:?}: one of {}", tandem_sim::scenario::KINDS.join(", "))),
    }
}

fn parse_mutant(s: &str) -> Result<Mutant, String> {
    Mutant::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Mutant::ALL.iter().map(|m| m.name()).collect();
        format!("unknown mutant {s:?}: one of {}", names.join(", "))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let params = Params {
        nodes: args.nodes.map(|n| n as usize),
        sites: match (args.sites, args.no_sites) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        mutant: args.mutant,
        without: args.without.clone(),
        trace: args.trace && args.seed.is_some(),
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first..args.first.saturating_add(args.seeds)).collect(),
    };
    let started = Instant::now();
    let (mut steps, mut violations, mut slowest) = (0u64, 0u64, 0u64);
    for &seed in &seeds {
        let out = run(seed, &params);
        for line in &out.trace {
            println!("{line}");
        }
        steps += out.steps;
        slowest = slowest.max(out.settled_after_us.unwrap_or(0));
        if !out.violations.is_empty() {
            violations += out.violations.len() as u64;
            for v in &out.violations {
                println!("VIOLATION {v}");
            }
            println!("  scenario: {}", out.summary);
            println!("  replay: tandem-sim --seed {seed} --trace{}", replay_args(&args));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let per_minute = if secs > 0.0 { seeds.len() as f64 * 60.0 / secs } else { 0.0 };
    println!(
        "seeds: {}, steps: {steps}, violations: {violations} ({per_minute:.0} scenarios per minute; every group ran again at most {} after the heal)",
        seeds.len(),
        fmt_us(slowest)
    );
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The options a replay needs besides the seed.
fn replay_args(args: &Args) -> String {
    let mut s = String::new();
    if let Some(n) = args.nodes {
        s += &format!(" --nodes {n}");
    }
    if args.sites {
        s += " --sites";
    }
    if args.no_sites {
        s += " --no-sites";
    }
    if let Some(m) = args.mutant {
        s += &format!(" --mutant {}", m.name());
    }
    if !args.without.is_empty() {
        s += &format!(" --without {}", args.without.join(","));
    }
    s
}
