//! What TLS costs, in one run: the same 3-node loopback cluster with
//! `[tls] enabled = true` (the product) and `false` (this benchmark's
//! switch), one after the other — control-plane writes, a group's failover
//! after a power loss, and replication throughput through a sync volume
//! (fio's nbd engine on the primary's export).
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/tls_bench 5 3    # fio seconds per job, failover rounds
//!
//! Prints a Markdown report (docs/benchmarks.md). Tokens are required in
//! both modes; only the transport changes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tandem_testkit::api::{call_with, Creds};
use tandem_testkit::{free_port, kill_session, new_session};

struct Agent {
    name: String,
    port: u16,
    cfg: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    scheme: &'static str,
}

impl Agent {
    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(tandem_bin());
        new_session(&mut cmd);
        let child = cmd
            .args(["agent", "--config"])
            .arg(&self.cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn tandem (cargo build --release --bins first)");
        self.child = Some(child);
    }

    /// Power loss: the agent, its watchdog and its resources.
    fn power_off(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_session(c.id() as i32);
            let _ = c.wait();
        }
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if tandem_testkit::api::local_call(&self.socket, Method::GET, "/healthz", Value::Null).await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} not healthy", self.name);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.power_off();
    }
}

fn tandem_bin() -> std::path::PathBuf {
    tandem_testkit::bench::sibling_tandem_bin()
}

async fn call(method: Method, url: &str, body: Value) -> (u16, Value) {
    call_with(None, method, url, Some(serde_json::to_vec(&body).unwrap())).await
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tandem_testkit::bench::wait_for(what, timeout, Duration::from_millis(10), f).await
}

struct Cluster {
    agents: Vec<Agent>,
    _tmp: tempfile::TempDir,
}

async fn start_cluster(tls: bool) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let scheme = if tls { "https" } else { "http" };
    let mut agents = Vec::new();
    for i in 1..=3 {
        let name = format!("node{i}");
        let port = loop {
            let p = free_port();
            if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                break p;
            }
        };
        let data = tmp.path().join(&name);
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\ndata_dir = \"{}\"\nport = {port}\n[tls]\nenabled = {tls}\n[log]\nlevel = \"warn\"\n",
                data.display()
            ),
        )
        .unwrap();
        let mut a = Agent {
            name,
            port,
            cfg,
            log: tmp.path().join(format!("node{i}.log")),
            socket: data.join("admin.sock"),
            child: None,
            scheme,
        };
        a.start();
        a.wait_healthy().await;
        agents.push(a);
    }
    let creds: Creds = tandem_testkit::api::init(&agents[0].socket, "bench").await.expect("init");
    for a in &agents {
        tandem_testkit::api::register(&a.url(), &creds);
    }
    for a in &agents[1..] {
        let (st, v) = tandem_testkit::api::join(&a.socket, &agents[0].url(), &creds).await;
        assert_eq!(st, 200, "join {}: {v}", a.name);
    }
    let u = agents[0].url();
    wait_for("3 voters online", Duration::from_secs(60), || async {
        let (_, c) = call(Method::GET, &format!("{u}/v1/cluster"), Value::Null).await;
        c["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|x| x["role"] == "voter" && x["state"] == "online"))
    })
    .await;
    Cluster { agents, _tmp: tmp }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `n` writes (one Raft entry each) through the leader, one client: p50, p99 ms.
async fn writes(c: &Cluster, n: usize) -> Vec<f64> {
    let u = c.agents[0].url();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let (st, v) =
            call(Method::PUT, &format!("{u}/v1/nodes/node2/attributes/k{}", i % 50), json!({"value": i.to_string()}))
                .await;
        assert_eq!(st, 200, "{v}");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat
}

/// What one mode measured, pooled over its passes.
#[derive(Default)]
struct Mode {
    writes: Vec<f64>,
    failovers: Vec<f64>,
    seq_mib_s: Vec<f64>,
    rand_iops: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

async fn group_node(u: &str, g: &str) -> (String, String) {
    let (_, v) = call(Method::GET, &format!("{u}/v1/groups/{g}"), Value::Null).await;
    (v["node"].as_str().unwrap_or("").to_string(), v["state"].as_str().unwrap_or("").to_string())
}

/// Power loss of the node running `svc`: ms until the group runs elsewhere.
async fn failovers(c: &mut Cluster, rounds: usize) -> Vec<f64> {
    let u0 = c.agents[0].url();
    let def = json!({"resources": [{"name": "p", "type": "process", "command": ["sleep", "100000"]}],
                     "nodes": ["node1", "node2", "node3"], "failback": "manual"});
    let (st, v) = call(Method::PUT, &format!("{u0}/v1/groups/svc"), def).await;
    assert!(st == 201 || st == 200, "{v}");
    let mut out = Vec::new();
    for _ in 0..rounds {
        let u = c.agents.iter().find(|a| a.child.is_some()).map(|a| a.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let on = loop {
            let (n, s) = group_node(&u, "svc").await;
            if s == "running" {
                break n;
            }
            assert!(Instant::now() < deadline, "svc not running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let i = c.agents.iter().position(|a| a.name == on).unwrap();
        let t = Instant::now();
        c.agents[i].power_off();
        let others: Vec<String> = c.agents.iter().filter(|a| a.child.is_some()).map(|a| a.url()).collect();
        let was = on.clone();
        wait_for("svc moved", Duration::from_secs(60), || {
            let others = others.clone();
            let was = was.clone();
            async move {
                for u in &others {
                    let (n, s) = group_node(u, "svc").await;
                    if !n.is_empty() && n != was && s == "running" {
                        return true;
                    }
                }
                false
            }
        })
        .await;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        c.agents[i].start();
        c.agents[i].wait_healthy().await;
        let u = c.agents[i].url();
        let name = c.agents[i].name.clone();
        wait_for("the node back online", Duration::from_secs(60), || async {
            let (_, v) = call(Method::GET, &format!("{u}/v1/nodes/{name}"), Value::Null).await;
            v["state"] == "online"
        })
        .await;
    }
    out
}

/// fio through the sync volume's NBD export: (MiB/s, IOPS) per job.
async fn replication(c: &Cluster, secs: u32) -> Vec<(String, f64, f64)> {
    let u = c.agents[0].url();
    let def = json!({"resources": [{"name": "data", "type": "volume", "size": "1GiB", "mode": "sync", "replicas": 2}],
                     "nodes": ["node1", "node2"], "failback": "manual"});
    let (st, v) = call(Method::PUT, &format!("{u}/v1/groups/vol"), def).await;
    assert_eq!(st, 201, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let uri = loop {
        let (_, v) = call(Method::GET, &format!("{u}/v1/volumes/data"), Value::Null).await;
        let synced = v["replicas"].as_array().is_some_and(|r| {
            r.len() == 2
                && r.iter()
                    .all(|x| x["disk"] == "UpToDate" && (x["role"] == "primary" || x["connection"] == "Connected"))
        });
        let uri = v["nbd"].as_str().unwrap_or("").split_whitespace().next().unwrap_or("").to_string();
        if synced && !uri.is_empty() {
            break uri;
        }
        assert!(Instant::now() < deadline, "no up-to-date secondary: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = Vec::new();
    for (name, rw, bs, qd) in
        [("seq write 1 MiB QD8", "write", "1M", 8), ("rand write 4 KiB QD32", "randwrite", "4k", 32)]
    {
        // A job that fails (fio's nbd engine could not connect, a write
        // error) is retried, never counted as 0 MiB/s.
        let mut attempt = 0;
        let j = loop {
            attempt += 1;
            let _ = Command::new("sync").status();
            let o = Command::new("fio")
                .args([
                    "--name=j",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    &format!("--rw={rw}"),
                    &format!("--bs={bs}"),
                    &format!("--iodepth={qd}"),
                    "--size=1G",
                    "--time_based",
                    &format!("--runtime={secs}"),
                    "--ramp_time=1",
                    "--output-format=json",
                ])
                .output()
                .expect("fio (apt-get install fio)");
            // fio's nbd engine says "connected" on stdout before the JSON.
            let start = o.stdout.iter().position(|b| *b == b'{').unwrap_or(0);
            let j: Value = serde_json::from_slice(&o.stdout[start..]).unwrap_or_else(|e| {
                panic!("fio: {e}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
            });
            let failed = !o.status.success() || j["jobs"][0]["error"].as_i64() != Some(0);
            if !failed {
                break j;
            }
            assert!(attempt < 3, "fio failed 3 times: {}", String::from_utf8_lossy(&o.stderr));
            eprintln!("  fio {name} failed (retrying): {}", String::from_utf8_lossy(&o.stderr).trim());
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let w = &j["jobs"][0]["write"];
        out.push((
            name.to_string(),
            w["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            w["iops"].as_f64().unwrap_or(0.0),
        ));
    }
    out
}

#[tokio::main]
async fn main() {
    tandem_testkit::api::install_crypto();
    let args: Vec<String> = std::env::args().collect();
    let secs: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    // Passes alternate the modes (on, off, then off, on, ...) so that a
    // change in the machine's load falls on both.
    let passes: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2).max(1);
    let mut modes = [Mode::default(), Mode::default()]; // [on, off]
    for pass in 0..passes {
        let order = if pass % 2 == 0 { [true, false] } else { [false, true] };
        for tls in order {
            let name = if tls { "on" } else { "off" };
            eprintln!("pass {pass}, TLS {name}: forming the cluster...");
            let mut c = start_cluster(tls).await;
            let _ = writes(&c, 200).await; // warm-up
            let mut w = writes(&c, 2000).await;
            w.sort_by(f64::total_cmp);
            eprintln!("  writes p50 {:.2} ms p99 {:.2} ms", pct(&w, 0.5), pct(&w, 0.99));
            let repl = replication(&c, secs).await;
            eprintln!("  replication {repl:?}");
            let f = failovers(&mut c, rounds).await;
            eprintln!("  failovers {f:?}");
            let m = &mut modes[usize::from(!tls)];
            m.writes.extend(w);
            m.failovers.extend(f);
            m.seq_mib_s.push(repl[0].1);
            m.rand_iops.push(repl[1].2);
        }
    }
    for m in &mut modes {
        m.writes.sort_by(f64::total_cmp);
        m.failovers.sort_by(f64::total_cmp);
    }
    println!(
        "{passes} passes per mode, alternating; writes and failovers pooled, replication the median of the passes"
    );
    println!();
    println!("| TLS | write p50 ms | write p99 ms | failover p50 ms | failover max ms | seq write 1 MiB QD8 MiB/s | rand write 4 KiB QD32 IOPS |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, m) in [("on", &modes[0]), ("off", &modes[1])] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            pct(&m.writes, 0.5),
            pct(&m.writes, 0.99),
            pct(&m.failovers, 0.5),
            m.failovers.last().copied().unwrap_or(0.0),
            median(&m.seq_mib_s),
            median(&m.rand_iops)
        );
    }
    let [on, off] = &modes;
    println!();
    println!(
        "TLS on / off: write p50 {:+.0} %, p99 {:+.0} %; failover p50 {:+.0} %; 1 MiB QD8 {:.2}x; 4 KiB QD32 {:.2}x",
        (pct(&on.writes, 0.5) / pct(&off.writes, 0.5) - 1.0) * 100.0,
        (pct(&on.writes, 0.99) / pct(&off.writes, 0.99) - 1.0) * 100.0,
        (pct(&on.failovers, 0.5) / pct(&off.failovers, 0.5) - 1.0) * 100.0,
        median(&on.seq_mib_s) / median(&off.seq_mib_s),
        median(&on.rand_iops) / median(&off.rand_iops)
    );
    println!(
        "per pass: 1 MiB QD8 on {:?} off {:?}; 4 KiB QD32 on {:?} off {:?}",
        on.seq_mib_s, off.seq_mib_s, on.rand_iops, off.rand_iops
    );
}
