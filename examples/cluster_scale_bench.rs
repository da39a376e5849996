//! Real agents at 3 and at 32 nodes, side by side in one run (issue 17,
//! part B 3): each size is a cluster of release-built agents on loopback
//! (autopilot's default of 3 voters; the rest learners) running 100 groups
//! of one `process` resource each — this program itself as a tiny HTTP
//! responder that answers with the node it runs on. Measured per size:
//!
//! - the idle CPU of the leader, of a follower voter and of the learners
//!   (utime + stime from /proc over a window in which nothing changes);
//! - `GET /v1/cluster` latency, sequential, on the leader (linearizable)
//!   and with `?stale=true` on a follower;
//! - failover: a node that is not the leader loses power (its session —
//!   agent, watchdog, responders — SIGKILLed); the time until the first and
//!   until the last of its groups answers from another node. The node then
//!   comes back, its groups move back (`failback: auto`) and the next round
//!   takes the next node.
//!
//! Run:
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/cluster_scale_bench [rounds]
//! ```
//!
//! Environment: `SCALE_BENCH_SIZES` (default `3,32`), `SCALE_BENCH_GROUPS`
//! (100), `SCALE_BENCH_IDLE_SECS` (30), `SCALE_BENCH_GETS` (300),
//! `SCALE_BENCH_KEEP=1` keeps the agents' data and logs.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_testkit::api;
use tandem_testkit::bench::{spawn_agent, start_cluster, wait_for, wait_up, Agent};

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The responder a group runs: answers every connection with the name of
/// its node and closes it. It retries the bind, since the group's previous
/// copy (on another node, same loopback port) may still hold the port for a
/// moment during a switchover.
fn serve(port: u16) {
    let node = std::env::var("TANDEM_NODE").unwrap_or_else(|_| "?".into());
    let listener = loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => break l,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    for mut s in listener.incoming().flatten() {
        let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{node}", node.len());
    }
}

/// The node that answers on `port`, if any.
fn probe(port: u16) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).filter(|b| !b.is_empty())
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Group {
    name: String,
    port: u16,
    /// Index of its preferred node (first of its `nodes`).
    home: usize,
}

/// CPU % of one core: leader, follower voter, learners (mean, max), all agents.
type Cpu = (f64, f64, Option<(f64, f64)>, f64);

struct Size {
    n: usize,
    formation: Duration,
    /// The 100 `PUT`s answered; every group answering at home.
    groups_defined: Duration,
    groups_placed: Duration,
    /// Idle, before the groups exist and with them.
    cpu_bare: Cpu,
    cpu: Cpu,
    idle_secs: u64,
    get_leader: Vec<f64>,
    get_stale: Vec<f64>,
    cluster_bytes: usize,
    /// Per round: (victim, role, groups moved, first back ms, last back ms).
    rounds: Vec<(String, String, usize, f64, f64)>,
}

fn name(i: usize) -> String {
    format!("node{}", i + 1)
}

async fn cluster_view(url: &str) -> Value {
    api::call_with(None, reqwest::Method::GET, &format!("{url}/v1/cluster"), None).await.1
}

/// Index of the current leader, asked of `url`.
async fn leader_of(url: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = cluster_view(url).await;
        if let Some(i) = c["leader"].as_str().and_then(|l| l.strip_prefix("node")).and_then(|i| i.parse::<usize>().ok())
        {
            return i - 1;
        }
        assert!(Instant::now() < deadline, "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every group answers from its preferred node.
async fn all_home(groups: &[Group], limit: Duration) {
    wait_for("every group answering at home", limit, Duration::from_millis(50), move || async move {
        groups.iter().all(|g| probe(g.port).is_some_and(|who| who == name(g.home)))
    })
    .await;
}

/// CPU % of one core over `secs`: leader, a follower voter, learners (mean,
/// max), all agents; and the leader's and the follower's index.
async fn idle(agents: &[Option<Agent>], url: &str, secs: u64) -> (usize, usize, Cpu) {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = agents.len();
    let leader = leader_of(url).await;
    let view = cluster_view(url).await;
    let role = |i: usize| {
        view["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == name(i).as_str()))
            .and_then(|x| x["role"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let follower = (0..n).find(|&i| i != leader && role(i) == "voter").expect("a follower voter");
    let learners: Vec<usize> = (0..n).filter(|&i| role(i) == "learner").collect();
    let pids: Vec<u32> = agents.iter().flatten().map(|a| a.pid()).collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    // Ticks are 1/100 s: ticks / s is % of one core.
    let secs = t.elapsed().as_secs_f64();
    let used: Vec<f64> = pids.iter().zip(&before).map(|(p, b)| (cpu_ticks(*p) - b) as f64 / secs).collect();
    let learner_cpu = (!learners.is_empty()).then(|| {
        let l: Vec<f64> = learners.iter().map(|i| used[*i]).collect();
        (l.iter().sum::<f64>() / l.len() as f64, l.iter().copied().fold(0.0, f64::max))
    });
    (leader, follower, (used[leader], used[follower], learner_cpu, used.iter().sum::<f64>()))
}

async fn measure(n: usize, n_groups: usize, rounds: usize, dir: &Path) -> Size {
    let t0 = Instant::now();
    let (started, creds) = start_cluster(dir, n).await;
    let formation = t0.elapsed();
    let mut agents: Vec<Option<Agent>> = started.into_iter().map(Some).collect();
    let ports: Vec<u16> = agents.iter().flatten().map(|a| a.port).collect();
    let url = |i: usize| format!("https://127.0.0.1:{}", ports[i]);
    let exe = std::env::current_exe().expect("current exe");
    let exe = exe.to_str().expect("a UTF-8 path");

    let idle_secs: u64 = env_or("SCALE_BENCH_IDLE_SECS", 30);
    let (_, _, cpu_bare) = idle(&agents, &url(0), idle_secs).await;
    eprintln!("{n} nodes idle, no groups: leader {:.2} %, follower {:.2} %", cpu_bare.0, cpu_bare.1);

    // 100 groups over three nodes each, the preferred node rotating.
    let term_before_groups = cluster_view(&url(0)).await["term"].as_u64().unwrap_or(0);
    let t1 = Instant::now();
    let groups: Vec<Group> = (0..n_groups)
        .map(|g| Group { name: format!("g{g:03}"), port: tandem_testkit::free_port(), home: g % n })
        .collect();
    let mut unavailable = 0;
    for g in &groups {
        let nodes: Vec<String> = (0..3.min(n)).map(|k| name((g.home + k) % n)).collect();
        let body = json!({
            "resources": [{"name": "p", "type": "process", "command": [exe, "serve", g.port.to_string()]}],
            "nodes": nodes,
            "failback": "auto",
        });
        // A 503 (no leader for a moment: an election while 32 agents start
        // their groups on two cores) is retried, and counted.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (st, v) = api::call_with(
                None,
                reqwest::Method::PUT,
                &format!("{}/v1/groups/{}", url(0), g.name),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await;
            if st == 201 || (st == 200 && v["name"] == g.name.as_str()) {
                break;
            }
            assert!(st == 503 && Instant::now() < deadline, "PUT group {}: {st} {v}", g.name);
            eprintln!("PUT group {}: {st} {}, retrying", g.name, v["message"]);
            unavailable += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let defined = t1.elapsed();
    all_home(&groups, Duration::from_secs(120)).await;
    let groups_placed = t1.elapsed();
    let term_after_groups = cluster_view(&url(0)).await["term"].as_u64().unwrap_or(0);
    eprintln!(
        "{n} nodes: formed in {formation:.2?}, {n_groups} groups defined in {defined:.2?}, answering after {groups_placed:.2?} \
         ({unavailable} writes refused for want of a leader; Raft term {term_before_groups} -> {term_after_groups})"
    );

    // Idle: nothing changes, nobody asks.
    let (leader, follower, cpu) = idle(&agents, &url(0), idle_secs).await;
    eprintln!("{n} nodes idle, {n_groups} groups: leader {:.2} %, follower {:.2} %", cpu.0, cpu.1);

    // GET /v1/cluster, one request at a time.
    let gets: usize = env_or("SCALE_BENCH_GETS", 300);
    let http = api::client();
    let get = |u: String| {
        let req = http.get(u).bearer_auth(&creds.token);
        async move {
            let t = Instant::now();
            let r = req.send().await.expect("GET /v1/cluster");
            assert!(r.status().is_success(), "GET /v1/cluster: {}", r.status());
            let len = r.bytes().await.expect("body").len();
            (t.elapsed().as_secs_f64() * 1000.0, len)
        }
    };
    let (mut get_leader, mut get_stale, mut cluster_bytes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..gets {
        let (ms, len) = get(format!("{}/v1/cluster", url(leader))).await;
        get_leader.push(ms);
        cluster_bytes = len;
        get_stale.push(get(format!("{}/v1/cluster?stale=true", url(follower))).await.0);
    }

    // Failover: power loss of a node that is not the leader, in turn.
    let mut out_rounds = Vec::new();
    let mut next = 0;
    for r in 0..rounds {
        all_home(&groups, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leader = leader_of(&url(0)).await;
        let victim = loop {
            next = (next + 1) % n;
            if next != leader {
                break next;
            }
        };
        let view = cluster_view(&url(leader)).await;
        let vrole = view["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == name(victim).as_str()))
            .and_then(|x| x["role"].as_str())
            .unwrap_or("?")
            .to_string();
        let term = view["term"].as_u64().unwrap_or(0);
        let mut pending: Vec<&Group> = groups.iter().filter(|g| g.home == victim).collect();
        let moved = pending.len();
        let start = Instant::now();
        agents[victim] = None; // the agent, its watchdog and its responders: SIGKILL
        let (mut first, mut last) = (None, Duration::ZERO);
        let deadline = start + Duration::from_secs(30);
        while !pending.is_empty() {
            assert!(Instant::now() < deadline, "groups of {} not back within 30 s", name(victim));
            pending.retain(|g| match probe(g.port) {
                Some(who) if who != name(victim) => {
                    let t = start.elapsed();
                    first.get_or_insert(t);
                    last = last.max(t);
                    false
                }
                _ => true,
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let first = ms(first.unwrap_or_default());
        eprintln!(
            "{n} nodes, round {r}: {} ({vrole}) lost, {moved} groups: first back {first:.0} ms, last {:.0} ms \
             (term {term} -> {})",
            name(victim),
            ms(last),
            cluster_view(&url(leader)).await["term"].as_u64().unwrap_or(0)
        );
        out_rounds.push((name(victim), vrole, moved, first, ms(last)));
        let back = spawn_agent(dir, &name(victim), ports[victim]);
        wait_up(&back).await;
        agents[victim] = Some(back);
    }
    all_home(&groups, Duration::from_secs(60)).await;
    drop(agents);
    Size {
        n,
        formation,
        groups_defined: defined,
        groups_placed,
        cpu_bare,
        cpu,
        idle_secs,
        get_leader,
        get_stale,
        cluster_bytes,
        rounds: out_rounds,
    }
}

async fn run() {
    api::install_crypto();
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let sizes: Vec<usize> = std::env::var("SCALE_BENCH_SIZES")
        .unwrap_or_else(|_| "3,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let n_groups: usize = env_or("SCALE_BENCH_GROUPS", 100);
    let mut results = Vec::new();
    for &n in &sizes {
        let tmp = tempfile::Builder::new().prefix("scale-bench-").tempdir().expect("temp dir");
        let (_cleanup, dir) = match std::env::var_os("SCALE_BENCH_KEEP") {
            Some(_) => {
                let kept = tmp.keep();
                eprintln!("data and logs kept in {}", kept.display());
                (None, kept)
            }
            None => {
                let dir = tmp.path().to_path_buf();
                (Some(tmp), dir)
            }
        };
        results.push(measure(n, n_groups, rounds, &dir).await);
    }

    println!("\n{n_groups} groups, {rounds} failover rounds per size (ms; p99 of few rounds = the slowest)\n");
    println!(
        "| nodes | formed s | groups defined / answering s | failover first p50 / p99 | failover last p50 / p99 | groups moved per round |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &results {
        let first: Vec<f64> = s.rounds.iter().map(|r| r.3).collect();
        let last: Vec<f64> = s.rounds.iter().map(|r| r.4).collect();
        let moved: Vec<String> = s.rounds.iter().map(|r| r.2.to_string()).collect();
        println!(
            "| {} | {:.2} | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {} |",
            s.n,
            s.formation.as_secs_f64(),
            s.groups_defined.as_secs_f64(),
            s.groups_placed.as_secs_f64(),
            pct(&first, 0.5),
            pct(&first, 0.99),
            pct(&last, 0.5),
            pct(&last, 0.99),
            moved.join(" ")
        );
    }
    println!("\nIdle CPU, % of one core (window in s)\n");
    println!("| nodes | groups | window | leader | follower voter | learners mean / max | all agents |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &results {
        for (g, c) in [(0, &s.cpu_bare), (n_groups, &s.cpu)] {
            let l = c.2.map(|(m, x)| format!("{m:.2} / {x:.2}")).unwrap_or_else(|| "-".into());
            println!("| {} | {g} | {} | {:.2} | {:.2} | {l} | {:.1} |", s.n, s.idle_secs, c.0, c.1, c.3);
        }
    }
    println!("\n`GET /v1/cluster`, sequential, ms\n");
    println!("| nodes | requests | bytes | leader p50 / p99 | follower `?stale=true` p50 / p99 |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for s in &results {
        println!(
            "| {} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            s.n,
            s.get_leader.len(),
            s.cluster_bytes,
            pct(&s.get_leader, 0.5),
            pct(&s.get_leader, 0.99),
            pct(&s.get_stale, 0.5),
            pct(&s.get_stale, 0.99)
        );
    }
    println!("\nRounds (victim, role, groups, first ms, last ms):");
    for s in &results {
        for r in &s.rounds {
            println!("  {} nodes: {} {} {} {:.0} {:.0}", s.n, r.0, r.1, r.2, r.3, r.4);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        match args.get(2).and_then(|p| p.parse().ok()) {
            Some(port) => serve(port),
            None => std::process::exit(2),
        }
        return;
    }
    tokio::runtime::Runtime::new().expect("tokio runtime").block_on(run());
}
