//! `GET /metrics` benchmark, in three parts:
//!
//! 1. In process: the size and render time of one node's metrics in a
//!    32-node cluster with 100 groups (a synthetic snapshot: 31 peers with
//!    two paths each, 100 groups, the resources of the groups placed on this
//!    node, 10 volumes of 3 replicas, every API route counted), rendered as
//!    the agent renders a scrape.
//! 2. Real agents: 3 on loopback run 10 `sleep` groups; their CPU over an
//!    idle window nobody scrapes (the figure to compare before and after:
//!    run it with an older `tandem` binary as the second argument).
//! 3. The same agents scraped over HTTPS (token, cluster CA) as Prometheus
//!    would: size and time of a scrape with 10 groups, then with 100.
//!
//! Run:
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/metrics_bench [idle seconds (60)] [tandem binary]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem::metrics::{
    render, Counters, GroupSample, PeerSample, RaftSample, ReplicaSample, ResourceSample, Snapshot, VolumeSample,
    GROUP_STATES,
};

fn tandem_bin() -> PathBuf {
    if let Some(b) = std::env::args().nth(2) {
        return PathBuf::from(b);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).map(|d| d.join("tandem")).expect("target dir")
}

/// One node's view of a cluster of `nodes` nodes running `groups` groups.
fn synthetic(nodes: usize, groups: usize) -> (Snapshot, Counters) {
    let name = |i: usize| format!("node{}", i + 1);
    let snapshot = Snapshot {
        node: name(0),
        raft: Some(RaftSample {
            is_leader: true,
            has_leader: true,
            voter: true,
            voters: 5,
            voters_heard: 5,
            term: 12,
            last_log_index: 123_456,
            committed_index: 123_456,
            applied_index: 123_456,
            quorum_ack_ms: Some(40),
        }),
        lease_left_s: 0.7,
        peers: (1..nodes)
            .map(|i| PeerSample {
                peer: name(i),
                up: true,
                paths: vec![(format!("10.0.0.{}", i + 1), true), (format!("10.1.0.{}", i + 1), true)],
                round_trip_s: Some(0.0012),
            })
            .collect(),
        groups: (0..groups)
            .map(|g| GroupSample {
                group: format!("group{g}"),
                state: GROUP_STATES[0],
                epoch: 3 + g as u64,
                here: g % nodes == 0,
                restarts: (g % nodes == 0).then_some(0),
            })
            .collect(),
        resources: (0..groups)
            .filter(|g| g % nodes == 0)
            .flat_map(|g| {
                ["vip", "db"].map(|r| ResourceSample {
                    group: format!("group{g}"),
                    resource: r.into(),
                    kind: "process".into(),
                    state: "running".into(),
                    failed: false,
                })
            })
            .collect(),
        replicas: (0..10)
            .flat_map(|v| {
                (0..3).map(move |r| ReplicaSample {
                    volume: format!("vol{v}"),
                    replica: name(r),
                    role: if r == 0 { "primary" } else { "secondary" }.into(),
                    disk: "UpToDate".into(),
                    connection: "Connected".into(),
                    reads: Some(1_000),
                    ..Default::default()
                })
            })
            .collect(),
        volumes: (0..10).map(|v| VolumeSample { volume: format!("vol{v}"), ..Default::default() }).collect(),
        heartbeats_dropped: vec![("forged", 0), ("replayed", 0), ("stale", 0)],
    };
    let c = Counters::default();
    for op in tandem_http_api::contract::OPERATIONS {
        for status in [200, 404] {
            c.count_request(&op.method.to_uppercase(), op.path, status);
        }
    }
    for g in 0..groups {
        c.count_failover(&format!("group{g}"), Some(1.2));
    }
    for v in 0..10 {
        let volume = format!("vol{v}");
        for op in ["read", "write", "flush", "trim", "zero"] {
            c.nbd_counters(&volume, op).0.inc();
        }
        c.write_histogram(&volume, "local").observe(0.0002);
        c.write_histogram(&volume, "replicated").observe(0.001);
    }
    c.proposal_seconds.observe(0.004);
    (snapshot, c)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn in_process() {
    let (s, c) = synthetic(32, 100);
    let text = render(&s, &c);
    let mut times = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let out = render(&s, &c);
        times.push(t.elapsed());
        assert_eq!(out.len(), text.len());
    }
    times.sort();
    println!("## 1. One node of 32 with 100 groups, rendered in process (300 renders)\n");
    println!(
        "size {} bytes ({:.1} KiB), {} series; render p50 {:.2} ms, p99 {:.2} ms\n",
        text.len(),
        text.len() as f64 / 1024.0,
        text.lines().filter(|l| !l.starts_with('#')).count(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3
    );
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        tandem_testkit::kill_session(self.0.id() as i32);
        let _ = self.0.wait();
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

async fn wait(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn call(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    tandem_testkit::api::call_with(None, method, url, body.map(|b| serde_json::to_vec(&b).unwrap())).await
}

async fn metrics_text(url: &str, token: &str) -> Option<String> {
    let resp = tandem_testkit::api::client().get(format!("{url}/metrics")).bearer_auth(token).send().await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.text().await.ok()
}

/// Scrapes `url`'s /metrics `n` times: (bytes, p50, p99), or None without /metrics.
async fn scrapes(url: &str, token: &str, n: usize) -> Option<(usize, Duration, Duration)> {
    let client = tandem_testkit::api::client();
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..n {
        let t = Instant::now();
        let resp = client.get(format!("{url}/metrics")).bearer_auth(token).send().await.ok()?;
        if resp.status() != 200 {
            return None;
        }
        size = resp.text().await.ok()?.len();
        times.push(t.elapsed());
    }
    times.sort();
    Some((size, percentile(&times, 0.5), percentile(&times, 0.99)))
}

async fn put_groups(url: &str, range: std::ops::Range<usize>) {
    for g in range {
        let nodes: Vec<String> = (0..3).map(|k| format!("i{}", (g + k) % 3)).collect();
        let body =
            json!({"resources": [{"name": "p", "type": "process", "command": ["sleep", "100000"]}], "nodes": nodes});
        let u = format!("{url}/v1/groups/g{g}");
        wait("group accepted", Duration::from_secs(20), async || {
            matches!(call(reqwest::Method::PUT, &u, Some(body.clone())).await.0, 200 | 201)
        })
        .await;
    }
    let u = format!("{url}/v1/groups");
    wait("every group running", Duration::from_secs(120), async || {
        let (_, v) = call(reqwest::Method::GET, &u, None).await;
        let all = v.as_array().cloned().unwrap_or_default();
        !all.is_empty() && all.iter().all(|g| g["state"] == "running")
    })
    .await;
}

async fn real_agents(dir: &Path, idle: u64) {
    tandem_testkit::api::install_crypto();
    let bin = tandem_bin();
    let ports: Vec<u16> = (0..3).map(|_| tandem_testkit::free_port()).collect();
    let agents: Vec<Proc> = (0..3)
        .map(|i| {
            let path = dir.join(format!("m{i}.toml"));
            let data = dir.join(format!("m{i}"));
            std::fs::write(&path, format!("name = \"i{i}\"\ndata_dir = \"{}\"\nport = {}\n", data.display(), ports[i]))
                .unwrap();
            let log = std::fs::File::create(dir.join(format!("m{i}.log"))).unwrap();
            let mut cmd = Command::new(&bin);
            tandem_testkit::new_session(&mut cmd);
            Proc(
                cmd.args(["agent", "--config", path.to_str().unwrap()])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let urls: Vec<String> = ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect();
    let sockets: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("m{i}")).join("admin.sock")).collect();
    for s in &sockets {
        wait("agent up", Duration::from_secs(20), async || s.exists()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let creds = tandem_testkit::api::cli_form(&bin, &sockets, &urls, &dir.join("ca.pem")).expect("form");
    let pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let api_creds = tandem_testkit::api::Creds { token: creds.token.clone(), ca_pem: pem, ca_hash: String::new() };
    for u in &urls {
        tandem_testkit::api::register(u, &api_creds);
    }
    put_groups(&urls[0], 0..10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    println!("## 2. Idle CPU: 3 agents running 10 groups, {idle} s, not scraped\n");
    println!("binary: {}\n", bin.display());
    let before: Vec<u64> = agents.iter().map(|a| cpu_ticks(a.0.id())).collect();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let mut total = 0.0;
    for (i, (a, b)) in agents.iter().zip(before).enumerate() {
        let pct = (cpu_ticks(a.0.id()) - b) as f64 / 100.0 / idle as f64 * 100.0;
        total += pct;
        println!("- i{i}: {pct:.2} % of one core");
    }
    println!("- all three: {total:.2} %\n");
    // What the idle agents answered meanwhile (a binary with /metrics only).
    for (i, u) in urls.iter().enumerate() {
        let Some(text) = metrics_text(u, &creds.token).await else { continue };
        let mut rows: Vec<(f64, String)> = text
            .lines()
            .filter(|l| l.starts_with("tandem_api_requests_total{"))
            .filter_map(|l| {
                let (series, v) = l.rsplit_once(' ')?;
                let route = series.split("route=\"").nth(1)?.split('"').next()?;
                Some((v.parse().ok()?, route.to_string()))
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top: Vec<String> = rows.iter().take(3).map(|(n, r)| format!("{r} {n}")).collect();
        println!("- i{i} answered since its start: {}", top.join(", "));
    }
    println!();

    println!("## 3. Scrapes over HTTPS (token, cluster CA), 100 per node\n");
    for groups in [10, 100] {
        if groups == 100 {
            put_groups(&urls[0], 10..100).await;
        }
        for (i, u) in urls.iter().enumerate() {
            match scrapes(u, &creds.token, 100).await {
                None => println!("- i{i}: no /metrics on this binary"),
                Some((size, p50, p99)) => println!(
                    "- {groups} groups, i{i}: {size} bytes, p50 {:.2} ms, p99 {:.2} ms",
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3
                ),
            }
        }
    }
    drop(agents);
}

#[tokio::main]
async fn main() {
    let idle: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(60);
    in_process();
    let tmp = tempfile::tempdir().unwrap();
    real_agents(tmp.path(), idle).await;
}
