//! What the benchmark programs in `examples/` share: where the agent binary
//! they start is, waiting for a condition with a deadline, and a
//! three-agent cluster on loopback (started as child processes).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `tandem` binary built beside this example (`target/<profile>/examples/x`
/// → `target/<profile>/tandem`).
pub fn sibling_tandem_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).map(|d| d.join("tandem")).expect("target dir")
}

/// Polls `f` every `every` until it holds; panics naming `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, every: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// An agent a benchmark started, in its own process session: dropped, it
/// loses power with everything it started (its watchdog, its resources).
pub struct Agent {
    pub port: u16,
    /// Its admin socket (`init`, `join`).
    pub socket: PathBuf,
    child: std::process::Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        crate::kill_session(self.child.id() as i32);
        let _ = self.child.wait();
    }
}

impl Agent {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts the agent `name` on 127.0.0.1:`port` in a new session (default
/// settings, data under `tmp/name`, log at warn to `tmp/name.log`); the same
/// name and port start it again on its old data.
pub fn spawn_agent(tmp: &Path, name: &str, port: u16) -> Agent {
    spawn_agent_with(tmp, name, port, "")
}

/// [`spawn_agent`] with `extra` appended to its config (sections after
/// `[log]`, e.g. `[ticket]`).
pub fn spawn_agent_with(tmp: &Path, name: &str, port: u16, extra: &str) -> Agent {
    let data = tmp.join(name);
    let cfg = tmp.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\ndata_dir = \"{}\"\nport = {port}\n[log]\nlevel = \"warn\"\n{extra}",
        data.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(tmp.join(format!("{name}.log"))).unwrap();
    let mut cmd = std::process::Command::new(sibling_tandem_bin());
    crate::new_session(&mut cmd);
    let child = cmd
        .args(["agent", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn tandem (cargo build --release --bins first)");
    Agent { port, socket: data.join("admin.sock"), child }
}

/// A port for an agent: its API port and the next one (volume
/// replication) free.
pub fn agent_port() -> u16 {
    loop {
        let p = crate::free_port();
        if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// Waits until the agent answers on its admin socket.
pub async fn wait_up(a: &Agent) {
    let socket = a.socket.clone();
    wait_for("agent up", Duration::from_secs(30), Duration::from_millis(20), || {
        let s = socket.clone();
        async move {
            crate::api::local_call(&s, reqwest::Method::GET, "/healthz", serde_json::Value::Null).await.0 == 200
        }
    })
    .await;
}

/// Three agents on loopback (`node1`..`node3`, data under `tmp`, default
/// settings, logs at warn), formed into a cluster of three online voters.
pub async fn start_three(tmp: &Path) -> (Vec<Agent>, crate::api::Creds) {
    start_cluster(tmp, 3).await
}

/// `n` agents on loopback (`node1`..`node<n>`, data under `tmp`, default
/// settings, logs at warn): `init` on node1, `join` through it on the
/// others, until all `n` are online members and min(n, 3) of them voters
/// (autopilot's default; the rest are learners).
pub async fn start_cluster(tmp: &Path, n: usize) -> (Vec<Agent>, crate::api::Creds) {
    use reqwest::Method;
    let poll = Duration::from_millis(20);
    let agents: Vec<Agent> = (1..=n).map(|i| spawn_agent(tmp, &format!("node{i}"), agent_port())).collect();
    for a in &agents {
        wait_up(a).await;
    }
    let creds = crate::api::init(&agents[0].socket, "bench").await.expect("init");
    for a in &agents {
        crate::api::register(&a.url(), &creds);
    }
    for a in &agents[1..] {
        let (st, v) = crate::api::join(&a.socket, &agents[0].url(), &creds).await;
        assert_eq!(st, 200, "join: {v}");
    }
    let u = agents[0].url();
    let voters = n.min(3);
    wait_for("every member online, the voters chosen", Duration::from_secs(120), poll, || {
        let u = u.clone();
        async move {
            let (_, c) = crate::api::call_with(None, Method::GET, &format!("{u}/v1/cluster"), None).await;
            c["members"].as_array().is_some_and(|m| {
                m.len() == n
                    && m.iter().all(|x| x["state"] == "online")
                    && m.iter().filter(|x| x["role"] == "voter").count() == voters
            })
        }
    })
    .await;
    (agents, creds)
}

/// What one fio job measured: IOPS, bandwidth, completion latency.
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    pub iops: f64,
    pub bytes_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One fio job through its nbd engine against `uri`: `rw` (e.g.
/// `randread`), block size `bs`, queue depth `depth`, over the first
/// `size` bytes, `seconds` after a 1 s ramp. Panics with fio's output when
/// it does not run (apt-get install fio).
pub fn fio_nbd(name: &str, uri: &str, rw: &str, bs: &str, depth: u32, size: u64, seconds: u64) -> FioResult {
    fio_nbd_with(name, uri, rw, bs, depth, size, seconds, &[])
}

/// [`fio_nbd`] with more fio options, e.g. `--rate_iops=1000` for a steady
/// load rather than as fast as it goes.
#[allow(clippy::too_many_arguments)]
pub fn fio_nbd_with(
    name: &str,
    uri: &str,
    rw: &str,
    bs: &str,
    depth: u32,
    size: u64,
    seconds: u64,
    extra: &[&str],
) -> FioResult {
    let out = std::process::Command::new("fio")
        .args(extra)
        .args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            &format!("--size={size}"),
            &format!("--runtime={seconds}"),
            "--time_based",
            "--ramp_time=1",
            "--output-format=json",
        ])
        .output()
        .expect("fio (apt-get install fio)");
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("fio output: {e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let side = if rw.contains("read") { "read" } else { "write" };
    let j = &v["jobs"][0][side];
    let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    FioResult {
        iops: j["iops"].as_f64().unwrap_or(0.0),
        bytes_per_s: j["bw_bytes"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    }
}
