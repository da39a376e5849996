//! The control plane's pure cores at 3 and at 32 nodes, 100 groups each:
//! what a leader's rounds cost as the cluster grows (issue 17, part B 3).
//! In process, on a state built with the real commands (every node added,
//! 100 groups of two resources over three nodes each, 10 with a volume,
//! every group placed and started):
//!
//! - the scheduler's round (`Scheduler::decide`) with every node alive,
//!   and with one node dead and fenced (its groups move);
//! - the failover core's round (`Failover::round`) over every node;
//! - one `SetPlacement` applied to the state machine, and the state written
//!   out as the store persists it after each applied batch (JSON).
//!
//! Run:
//!
//!     cargo build --release --examples
//!     target/release/examples/scale_bench [iterations (2000)]

use std::time::{Duration, Instant};

use tandem::failover::{Failover, Policy, Seen};
use tandem::scheduler::{NodeInfo, Scheduler};
use tandem_raft::group::Phase;
use tandem_raft::state::{ClusterState, Command, NodeSpec};

const GROUPS: usize = 100;

fn state(nodes: usize) -> ClusterState {
    let spec = |i: usize| NodeSpec {
        name: format!("node{}", i + 1),
        addresses: vec![format!("10.0.{}.{}", i / 250, i % 250 + 1)],
        port: 7401,
        site: None,
        witness: false,
    };
    let mut s = ClusterState::default();
    s.apply(&Command::Bootstrap { cluster_id: "bench".into(), node_id: 1, node: spec(0), heartbeat_key: None })
        .expect("bootstrap");
    for i in 1..nodes {
        s.apply(&Command::AddNode { node: spec(i) }).expect("add node");
    }
    for g in 0..GROUPS {
        let on: Vec<String> = (0..3).map(|k| format!("node{}", (g + k) % nodes + 1)).collect();
        let mut resources = vec![serde_json::json!({"name": "app", "type": "process", "command": ["sleep", "1000"]})];
        if g % 10 == 0 {
            resources.insert(0, serde_json::json!({"name": format!("data{g}"), "type": "volume", "size": "1GiB"}));
        }
        let spec = serde_json::from_value(serde_json::json!({"resources": resources, "nodes": on})).expect("group");
        s.apply(&Command::PutGroup { name: format!("group{g}"), spec }).expect("put group");
        let node = ((g % nodes) + 1) as u64;
        s.apply(&Command::SetPlacement {
            name: format!("group{g}"),
            expected_epoch: 0,
            node: Some(node),
            phase: Phase::Started,
            reason: "bench".into(),
        })
        .expect("place");
    }
    s
}

fn infos(s: &ClusterState, dead: Option<u64>) -> Vec<NodeInfo> {
    s.nodes.values().map(|r| NodeInfo::of(r, Some(r.id) != dead, Some(r.id) == dead)).collect()
}

/// Median and p99 of `f` over `n` runs, in microseconds.
fn time<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, f64) {
    let mut d: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    d.sort();
    let us = |x: Duration| x.as_secs_f64() * 1e6;
    (us(d[n / 2]), us(d[(n * 99 / 100).min(n - 1)]))
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    println!("{n} iterations each; microseconds, median / p99\n");
    println!("| nodes × groups | scheduler, all alive | scheduler, one node dead | failover round | apply SetPlacement | persist state (bytes) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for nodes in [3usize, 32] {
        let s = state(nodes);
        let alive = infos(&s, None);
        let dead = infos(&s, Some(2));
        let moves = Scheduler::new(&dead, &s.groups, 600).decide().len();
        let calm = time(n, || Scheduler::new(&alive, &s.groups, 600).decide());
        let storm = time(n, || Scheduler::new(&dead, &s.groups, 600).decide());
        let seen: Vec<Seen> = s
            .nodes
            .keys()
            .map(|id| Seen {
                id: *id,
                alive: *id != 2,
                down_for: Duration::from_millis(if *id == 2 { 900 } else { 0 }),
            })
            .collect();
        let policy = Policy { fence_command: false, fenced_after: Duration::from_millis(800) };
        let mut core = Failover::new(policy);
        let mut now = 10_000u64;
        let round = time(n, || {
            now += 50;
            core.round(1, &seen, now)
        });
        // Apply on a copy each time, so every run moves the same group.
        let g = &s.groups["group1"];
        let cmd = Command::SetPlacement {
            name: "group1".into(),
            expected_epoch: g.placement.epoch,
            node: g.placement.node,
            phase: Phase::Stopping,
            reason: "bench".into(),
        };
        let apply = time(n, || {
            let mut c = s.clone();
            c.apply(&cmd).map(|_| c.groups.len())
        });
        let bytes = serde_json::to_vec(&s).map(|b| b.len()).unwrap_or(0);
        let persist = time(n, || serde_json::to_vec(&s).map(|b| b.len()));
        println!(
            "| {nodes} × {GROUPS} | {:.1} / {:.1} | {:.1} / {:.1} ({moves} moves) | {:.1} / {:.1} | {:.1} / {:.1} (incl. a state copy) | {:.1} / {:.1} ({bytes}) |",
            calm.0, calm.1, storm.0, storm.1, round.0, round.1, apply.0, apply.1, persist.0, persist.1
        );
    }
}
