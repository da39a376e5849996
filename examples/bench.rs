//! Control-plane benchmark: real agents on loopback, measured through the
//! REST API as an operator's script would use it.
//!
//!     cargo build --release && cargo run --release --example bench
//!
//! Prints a Markdown report (see docs/benchmarks.md). Needs the release
//! `tandem` binary next to this example's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_testkit::free_port;

struct Agent {
    name: String,
    port: u16,
    socket: PathBuf,
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

fn tandem_bin() -> std::path::PathBuf {
    tandem_testkit::bench::sibling_tandem_bin()
}

fn spawn(dir: &Path, name: &str, port: u16) -> Agent {
    let cfg = dir.join(format!("{name}.toml"));
    // BENCH_CONFIG: extra TOML for every node, e.g. "[raft]\nheartbeat_interval_ms = 50".
    let extra = std::env::var("BENCH_CONFIG").unwrap_or_default().replace("\\n", "\n");
    std::fs::write(
        &cfg,
        format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\nport = {port}\n[log]\nlevel = \"warn\"\n{extra}\n",
            dir.join(name).display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(tandem_bin())
        .args(["agent", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn tandem (build it with cargo build --release first)");
    Agent { name: name.into(), port, socket: dir.join(name).join("admin.sock"), child }
}

/// Before init: a client for the admin sockets only (nothing trusted yet).
fn client() -> reqwest::Client {
    tandem_testkit::api::install_crypto();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// After init: HTTPS with the cluster CA and the admin token on every request.
fn admin_client(creds: &tandem_testkit::api::Creds) -> reqwest::Client {
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", creds.token).parse().unwrap());
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .default_headers(auth)
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(creds.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// `tandem cluster init` on `first`, `tandem cluster join` on the others.
async fn init_and_join(first: &Agent, others: &[Agent]) -> reqwest::Client {
    let creds = tandem_testkit::api::init(&first.socket, "bench").await.expect("init");
    for a in std::iter::once(first).chain(others) {
        tandem_testkit::api::register(&a.url(), &creds);
    }
    for a in others {
        let (st, v) = tandem_testkit::api::join(&a.socket, &first.url(), &creds).await;
        assert_eq!(st, 200, "join {}: {v}", a.name);
    }
    admin_client(&creds)
}

async fn wait_healthy(_: &reqwest::Client, a: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let local = tandem_testkit::api::local_call(&a.socket, reqwest::Method::GET, "/healthz", Value::Null).await;
        if local.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} not healthy", a.name);
}

async fn cluster(http: &reqwest::Client, url: &str) -> Option<Value> {
    let r = http.get(format!("{url}/v1/cluster")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

fn count(c: &Value, f: impl Fn(&Value) -> bool) -> usize {
    c["members"].as_array().map(|m| m.iter().filter(|x| f(x)).count()).unwrap_or(0)
}

async fn form(http: &reqwest::Client, agents: &[Agent], voters: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(c) = cluster(http, &agents[0].url()).await {
            let n = count(&c, |_| true);
            let v = count(&c, |m| m["role"] == "voter");
            let online = count(&c, |m| m["state"] == "online");
            if n == agents.len() && v == voters && online == agents.len() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "cluster did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    per_sec: f64,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    Stats { n: lat.len(), p50: pct(0.50), p99: pct(0.99), per_sec: lat.len() as f64 / wall.as_secs_f64() }
}

async fn timed(req: reqwest::RequestBuilder) -> Duration {
    let t = Instant::now();
    let r = req.send().await.expect("request");
    let st = r.status();
    let _ = r.bytes().await;
    assert!(st.is_success(), "HTTP {st}");
    t.elapsed()
}

/// `clients` concurrent loops for `dur`, each issuing requests from `make`.
async fn load<F>(http: &reqwest::Client, clients: usize, dur: Duration, make: F) -> Stats
where
    F: Fn(&reqwest::Client, usize, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = http.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while start.elapsed() < dur {
                lat.push(timed(make(&http, c, i)).await);
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    stats(all, start.elapsed())
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after the ')' they are 12 and 13.
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn row(what: &str, s: &Stats) {
    println!("| {what} | {} | {:.2} | {:.2} | {:.0} |", s.n, s.p50, s.p99, s.per_sec);
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut http = client();
    let secs = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dur = Duration::from_secs(secs);

    // ---- 3-node cluster ----
    let agents: Vec<Agent> = (1..=3)
        .map(|i| {
            let port = free_port();
            spawn(dir.path(), &format!("node{i}"), port)
        })
        .collect();
    for a in &agents {
        wait_healthy(&http, a).await;
    }
    let first = agents[0].url();
    http = init_and_join(&agents[0], &agents[1..]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = cluster(&http, &first).await {
            if count(&c, |m| m["role"] == "voter") == 3 && count(&c, |m| m["state"] == "online") == 3 {
                break;
            }
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = cluster(&http, &first).await.unwrap();
    let leader_name = c["leader"].as_str().unwrap().to_string();
    let leader = agents.iter().find(|a| a.name == leader_name).unwrap();
    let follower = agents.iter().find(|a| a.name != leader_name).unwrap();
    let (lu, fu) = (leader.url(), follower.url());
    println!("3-node loopback cluster, default config; leader {leader_name}; {secs} s per load row\n");
    println!("| operation | requests | p50 ms | p99 ms | req/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for clients in [1, 8, 32] {
        let u = lu.clone();
        let s = load(&http, clients, dur, move |h, c, i| {
            h.put(format!("{u}/v1/nodes/node1/attributes/c{}", (c * 7 + i) % 60))
                .json(&json!({ "value": i.to_string() }))
        })
        .await;
        row(&format!("write via leader, {clients} client(s)"), &s);
    }
    for clients in [1, 8] {
        let u = fu.clone();
        let s = load(&http, clients, dur, move |h, c, i| {
            h.put(format!("{u}/v1/nodes/node2/attributes/f{}", (c * 7 + i) % 60))
                .json(&json!({ "value": i.to_string() }))
        })
        .await;
        row(&format!("write via follower (forwarded), {clients} client(s)"), &s);
    }
    for (what, u, q) in [
        ("linearizable read, leader", lu.clone(), ""),
        ("linearizable read, follower (forwarded)", fu.clone(), ""),
        ("stale read, follower", fu.clone(), "?stale=true"),
        ("stale read, leader", lu.clone(), "?stale=true"),
    ] {
        for clients in [1, 8] {
            let u = u.clone();
            let s = load(&http, clients, dur, move |h, _, _| h.get(format!("{u}/v1/nodes/node1{q}"))).await;
            row(&format!("{what}, {clients} client(s)"), &s);
        }
    }

    // ---- idle cost ----
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tick = 100.0; // USER_HZ on Linux
    let window = Duration::from_secs(secs.max(5) * 4);
    let pids: Vec<(String, u32)> = agents.iter().map(|a| (a.name.clone(), a.child.id())).collect();
    let before: Vec<u64> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    tokio::time::sleep(window).await;
    println!("\nIdle agents over {} s:\n", window.as_secs());
    println!("| agent | role | CPU % of one core | RSS MB |");
    println!("| --- | --- | ---: | ---: |");
    for ((name, pid), b) in pids.iter().zip(before) {
        let used = (cpu_ticks(*pid) - b) as f64 / tick;
        let role = if *name == leader_name { "leader" } else { "follower" };
        println!("| {name} | {role} | {:.2} | {:.1} |", 100.0 * used / window.as_secs_f64(), rss_mb(*pid));
    }

    // ---- leader failover: SIGKILL the leader, time the first write a survivor acknowledges ----
    let mut agents = agents;
    let mut failovers = Vec::new();
    for trial in 0..5 {
        let c = cluster(&http, &agents[0].url()).await.or(cluster(&http, &agents[1].url()).await).unwrap();
        let leader = c["leader"].as_str().unwrap().to_string();
        let i = agents.iter().position(|a| a.name == leader).unwrap();
        let survivor = agents[(i + 1) % agents.len()].url();
        let _ = agents[i].child.kill();
        let t0 = Instant::now();
        loop {
            let r = http
                .put(format!("{survivor}/v1/nodes/node3/attributes/failover"))
                .json(&json!({ "value": trial.to_string() }))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no write accepted after leader kill");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failovers.push(t0.elapsed());
        let (name, port) = (agents[i].name.clone(), agents[i].port);
        agents[i] = spawn(dir.path(), &name, port);
        wait_healthy(&http, &agents[i]).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster(&http, &survivor).await.is_none_or(|c| count(&c, |m| m["state"] == "online") < 3) {
            assert!(Instant::now() < deadline, "restarted leader did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    failovers.sort();
    let ms: Vec<String> = failovers.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect();
    println!(
        "\nLeader SIGKILL to first acknowledged write through a survivor (5 trials, ms): {} — median {:.0} ms",
        ms.join(", "),
        failovers[2].as_secs_f64() * 1000.0
    );
    drop(agents);

    // ---- 32 agents forming a cluster ----
    let dir32 = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..32).map(|_| free_port()).collect();
    let t0 = Instant::now();
    let mut agents32 = vec![spawn(dir32.path(), "n01", ports[0])];
    for (i, p) in ports.iter().enumerate().skip(1) {
        agents32.push(spawn(dir32.path(), &format!("n{:02}", i + 1), *p));
    }
    for a in &agents32 {
        wait_healthy(&http, a).await;
    }
    let t_init = t0.elapsed();
    let http = init_and_join(&agents32[0], &agents32[1..]).await;
    form(&http, &agents32, 3).await;
    let formed = t0.elapsed();
    println!("\n32 agents (one machine, 2 cores): spawn of 32 processes to 32 members online with 3 voters: {:.2} s (node 1 healthy and initialised after {:.2} s)", formed.as_secs_f64(), t_init.as_secs_f64());
    let pid = agents32[31].child.id();
    println!("RSS of a learner in the 32-node cluster: {:.1} MB", rss_mb(pid));
    let b: Vec<u64> = agents32.iter().map(|a| cpu_ticks(a.child.id())).collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let total: f64 = agents32.iter().zip(b).map(|(a, b)| (cpu_ticks(a.child.id()) - b) as f64 / tick).sum();
    let lead_used = {
        let c = cluster(&http, &agents32[0].url()).await.unwrap();
        c["leader"].as_str().unwrap_or("?").to_string()
    };
    println!(
        "32-node idle: all agents together {:.1} % of one core over 10 s (leader {lead_used})",
        100.0 * total / 10.0
    );
}
