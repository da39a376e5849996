//! Test harness: real `tandem agent` processes on loopback, each with its own
//! config file and data directory, driven only through the REST API.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");

pub use tandem_testkit::free_port;

pub struct Node {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// The node's address (127.0.0.1, or its address in its namespace).
    pub addr: String,
    /// The network namespace the agent runs in, as a separate host.
    pub netns: Option<String>,
    /// Every session an agent of this node led: what it left running
    /// (adopted resources, the watchdog) stays in the first one.
    pub sessions: Vec<i32>,
    /// Extra environment for the agent.
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.addr, self.port)
    }

    /// The agent's admin socket (root on the node: init, join, no token).
    pub fn socket(&self) -> PathBuf {
        self.dir.join(&self.name).join("admin.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(format!("{}.toml", self.name))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts (or restarts) the agent and waits for /healthz.
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        tandem_testkit::new_session(&mut cmd);
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn tandem agent");
        self.sessions.push(child.id() as i32);
        self.child = Some(child);
        let sock = self.socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited at start: {st}\n{}",
                    self.name,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            // The admin socket: it answers before the node has a
            // certificate anyone trusts.
            if tandem_testkit::api::local_call(&sock, Method::GET, "/healthz", Value::Null).await.0 == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "{} not healthy within 30s", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Power loss: the agent, its watchdog and its resources die at once.
    pub fn kill(&mut self) {
        for sid in &self.sessions {
            tandem_testkit::kill_session(*sid);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGKILL of the agent alone (a crash): its watchdog and its
    /// resources keep running.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's watchdog process, if one runs.
    pub fn watchdog_pid(&self) -> Option<i32> {
        self.sessions.iter().flat_map(|sid| tandem_testkit::session_members(*sid)).find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"watchdog"))
        })
    }

    /// SIGTERM and wait: the graceful stop an init system does.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            // Raft's retry noise towards a dead peer drowns the rest.
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .filter(|l| {
                    !l.contains("openraft::replication")
                        && !l.contains("replication_handler")
                        && !l.contains("heartbeat error")
                })
                .take(40)
                .collect();
            eprintln!("---- last log lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        self.kill();
    }
}

/// Knobs a test may change in every node's config.
#[derive(Clone)]
pub struct Opts {
    pub voters: usize,
    pub extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { voters: 3, extra: String::new() }
    }
}

pub struct Cluster {
    // Nodes drop first: their processes stop (and logs print) before the
    // directory goes away.
    pub nodes: Vec<Node>,
    pub opts: Opts,
    /// The admin token and CA, once formed.
    pub creds: Option<tandem_testkit::api::Creds>,
    pub tmp: tempfile::TempDir,
}

impl Cluster {
    /// Writes configs for `names` without starting anything.
    pub fn configure(names: &[&str], opts: Opts) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Cluster { nodes: Vec::new(), opts, creds: None, tmp };
        for n in names {
            c.add_config(n, "");
        }
        c
    }

    /// Adds one more node's config (started later with `start_node`).
    pub fn add_config(&mut self, name: &str, node_extra: &str) -> usize {
        self.add_host(name, node_extra, "127.0.0.1", None)
    }

    /// Adds a node at `addr`, in network namespace `netns` when given.
    pub fn add_host(&mut self, name: &str, node_extra: &str, addr: &str, netns: Option<String>) -> usize {
        self.add_host_paths(name, node_extra, &[addr], netns)
    }

    /// The same, with one address per network path (the first serves tests).
    pub fn add_host_paths(&mut self, name: &str, node_extra: &str, addrs: &[&str], netns: Option<String>) -> usize {
        let addr = addrs[0];
        let addresses = addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
        let port = if netns.is_some() { 7401 } else { free_port() };
        let dir = self.tmp.path().to_path_buf();
        let node = Node {
            name: name.to_string(),
            port,
            dir: dir.clone(),
            child: None,
            addr: addr.to_string(),
            netns,
            sessions: Vec::new(),
            env: Vec::new(),
        };
        let text = format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\naddresses = [{addresses}]\nport = {port}\n{node_extra}\n\
             [liveness]\nheartbeat_interval_ms = 100\nnode_timeout_ms = 600\n\
             [autopilot]\nvoters = {}\ndead_voter_after_ms = 2000\ninterval_ms = 250\n{}\n",
            dir.join(name).display(),
            self.opts.voters,
            self.opts.extra
        );
        std::fs::write(node.config_path(), text).unwrap();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Starts every node, bootstraps on the first, joins the rest, and waits
    /// until `voters` of them vote.
    pub async fn start(names: &[&str], opts: Opts) -> Cluster {
        let c = Cluster::configure(names, opts);
        c.form().await
    }

    /// Starts the configured nodes and forms the cluster.
    pub async fn form(mut self) -> Cluster {
        for n in self.nodes.iter_mut() {
            n.start().await;
        }
        self.init(0, "test").await;
        for i in 1..self.nodes.len() {
            self.join(i).await;
        }
        let want = expected_voters(self.nodes.len(), self.opts.voters);
        self.wait_voters(want).await;
        // Every node routes to a leader it hears (right after joining, a
        // node may drop heartbeats sealed with a key it has not applied yet).
        let urls = self.live_urls();
        wait_until(Duration::from_secs(30), "every node ready", || async {
            for u in &urls {
                if get(&format!("{u}/readyz")).await.0 != 200 {
                    return false;
                }
            }
            true
        })
        .await;
        self
    }

    /// `tandem cluster init` on node `i` (its admin socket); keeps the
    /// admin token and the CA for every later call.
    pub async fn init(&mut self, i: usize, cluster_id: &str) {
        let creds = tandem_testkit::api::init(&self.nodes[i].socket(), cluster_id).await.expect("cluster init");
        for n in &self.nodes {
            tandem_testkit::api::register(&n.url(), &creds);
        }
        // The CLI the tests run (child processes) finds them as an
        // operator's shell would.
        let ca = self.tmp.path().join("ca.pem");
        std::fs::write(&ca, &creds.ca_pem).unwrap();
        std::env::set_var("TANDEM_TOKEN", &creds.token);
        std::env::set_var("TANDEM_CACERT", &ca);
        self.creds = Some(creds);
    }

    pub fn creds(&self) -> &tandem_testkit::api::Creds {
        self.creds.as_ref().expect("the cluster is formed")
    }

    /// `tandem cluster join` on node `i`, through the first live node.
    pub async fn join(&self, i: usize) {
        let (st, body) = self.try_join(i).await;
        assert_eq!(st, 200, "join {}: {body}", self.nodes[i].name);
    }

    pub async fn try_join(&self, i: usize) -> (u16, Value) {
        let via =
            self.nodes.iter().find(|n| n.child.is_some() && n.socket() != self.nodes[i].socket()).map(|n| n.url());
        let via = via.unwrap_or_else(|| self.nodes[0].url());
        tandem_testkit::api::register(&self.nodes[i].url(), self.creds());
        tandem_testkit::api::join(&self.nodes[i].socket(), &via, self.creds()).await
    }

    pub fn idx(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[self.idx(name)]
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        let i = self.idx(name);
        &mut self.nodes[i]
    }

    /// URLs of the nodes whose process runs.
    pub fn live_urls(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.url()).collect()
    }

    /// The cluster as seen through any live node (linearizable read).
    pub async fn cluster(&self) -> Value {
        let urls = self.live_urls();
        let mut last = Value::Null;
        for _ in 0..100 {
            for u in &urls {
                let (st, v) = get(&format!("{u}/v1/cluster")).await;
                if st == 200 {
                    return v;
                }
                last = v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no node could answer /v1/cluster: {last}");
    }

    pub async fn leader(&self) -> String {
        let urls = self.live_urls();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for u in &urls {
                let (st, v) = get(&format!("{u}/v1/cluster")).await;
                if let (200, Some(l)) = (st, v["leader"].as_str()) {
                    return l.to_string();
                }
            }
            assert!(Instant::now() < deadline, "no leader within 30s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the live nodes agree on a leader other than `old`.
    pub async fn new_leader(&self, old: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = self.leader().await;
            if l != old {
                return l;
            }
            assert!(Instant::now() < deadline, "{old} still leads after 30s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_voters(&self, want: usize) {
        let urls = self.live_urls();
        wait_until(Duration::from_secs(60), &format!("{want} voters"), || async {
            for u in &urls {
                let (st, v) = get(&format!("{u}/v1/cluster")).await;
                if st == 200 {
                    return voters(&v).len() == want;
                }
            }
            false
        })
        .await;
    }
}

/// What autopilot should settle on for `n` healthy nodes.
pub fn expected_voters(n: usize, target: usize) -> usize {
    let v = n.min(target);
    if v.is_multiple_of(2) {
        v - 1
    } else {
        v
    }
}

pub fn voters(cluster: &Value) -> Vec<String> {
    members_with(cluster, |m| m["role"] == "voter" || m["role"] == "witness")
}

pub fn members_with(cluster: &Value, f: impl Fn(&Value) -> bool) -> Vec<String> {
    cluster["members"]
        .as_array()
        .map(|ms| ms.iter().filter(|m| f(m)).map(|m| m["name"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

pub fn member<'a>(cluster: &'a Value, name: &str) -> &'a Value {
    cluster["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no member {name} in {cluster}"))
}

/// Sends a request with the node's cluster admin token; (0, Null) when
/// nothing answered.
pub async fn call(method: Method, url: &str, body: Option<Vec<u8>>) -> (u16, Value) {
    tandem_testkit::api::call_with(None, method, url, body).await
}

/// The same with `token` (`""`: no token at all).
pub async fn call_as(token: &str, method: Method, url: &str, body: Option<Vec<u8>>) -> (u16, Value) {
    tandem_testkit::api::call_with(Some(token), method, url, body).await
}

pub async fn get(url: &str) -> (u16, Value) {
    call(Method::GET, url, None).await
}

pub async fn post(url: &str, body: Value) -> (u16, Value) {
    call(Method::POST, url, Some(serde_json::to_vec(&body).unwrap())).await
}

pub async fn put(url: &str, body: Value) -> (u16, Value) {
    call(Method::PUT, url, Some(serde_json::to_vec(&body).unwrap())).await
}

pub async fn delete(url: &str) -> (u16, Value) {
    call(Method::DELETE, url, None).await
}

/// Polls `f` every 100 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The replicated part of a cluster view: what must not change when a
/// request is refused (liveness fields like pid or last_seen may).
pub fn replicated(cluster: &Value) -> Value {
    let members: Vec<Value> = cluster["members"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            json!({"id": m["id"], "name": m["name"], "role": m["role"], "admin_state": m["admin_state"],
                   "site": m["site"], "addresses": m["addresses"], "port": m["port"], "attributes": m["attributes"]})
        })
        .collect();
    json!({"cluster_id": cluster["cluster_id"], "members": members})
}

/// Writes an executable script (a fence command, an exec agent).
pub fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

// ---- resources that log their lives: start and stop lines (node, epoch, pid) ----

/// A process resource that logs its start and its (graceful) stop.
pub fn logged(log: &Path) -> Value {
    logged_as("srv", log)
}

/// The same, under another resource name.
pub fn logged_as(name: &str, log: &Path) -> Value {
    let log = log.display();
    let script = format!(
        "echo \"start $TANDEM_NODE $TANDEM_EPOCH $$\" >> {log}; \
         trap 'echo \"stop $TANDEM_NODE $TANDEM_EPOCH $$\" >> {log}; exit 0' TERM; \
         while :; do sleep 0.1; done"
    );
    json!({"name": name, "type": "process", "command": ["sh", "-c", script]})
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: String,
    pub node: String,
    pub epoch: u64,
    pub pid: i32,
}

pub fn events(log: &Path) -> Vec<Event> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Event {
                kind: f.first()?.to_string(),
                node: f.get(1)?.to_string(),
                epoch: f.get(2)?.parse().ok()?,
                pid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// Starts whose process still runs: never more than one.
pub fn running(log: &Path) -> Vec<Event> {
    events(log).into_iter().filter(|e| e.kind == "start" && alive(e.pid)).collect()
}

/// Samples `log` every 20 ms on its own thread until `finish`: every moment
/// two copies were alive at once.
pub struct OverlapWatcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<Event>>>,
}

impl OverlapWatcher {
    pub fn start(log: &Path) -> OverlapWatcher {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, log) = (stop.clone(), log.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut overlaps = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let live = running(&log);
                if live.len() > 1 {
                    overlaps.push(live);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            overlaps
        });
        OverlapWatcher { stop, thread }
    }

    /// Stops sampling; the overlaps seen (empty: never two copies).
    pub fn finish(self) -> Vec<Vec<Event>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A group as the first of `urls` that answers sees it (retried for 10 s).
pub async fn group_at(urls: &[String], name: &str) -> Value {
    for _ in 0..100 {
        for u in urls {
            let (st, v) = get(&format!("{u}/v1/groups/{name}")).await;
            if st == 200 {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no node answered for group {name}");
}

// ---- volumes: the export over NBD (qemu-io), views and reports ----

/// Volume `data` as the first live node that answers sees it (10 s).
pub async fn volume(c: &Cluster) -> Value {
    for _ in 0..100 {
        for u in c.live_urls() {
            let (st, v) = get(&format!("{u}/v1/volumes/data")).await;
            if st == 200 {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no node answered for volume data");
}

/// `node`'s backing file of volume `data`.
pub fn backing(c: &Cluster, node: &str) -> PathBuf {
    c.tmp.path().join(node).join("volumes").join("data.img")
}

/// `qemu-io` with many writes, each its own command; returns the offsets
/// whose write it reported done (acknowledged) before it ended.
pub async fn write_blocks(uri: &str, first: u64, count: u64, pattern: impl Fn(u64) -> u8) -> Vec<u64> {
    let mut cmd = tokio::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for i in first..first + count {
        cmd.args(["-c", &format!("write -P {} {} 64k", pattern(i), i * 65536)]);
    }
    let out = cmd.output().await.expect("qemu-io (apt-get install qemu-utils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("wrote 65536/65536 bytes at offset "))
        .filter_map(|o| o.trim().parse().ok())
        .collect()
}

/// Whether 64 KiB at `offset` read back as `pattern` through the export.
pub async fn read_ok(uri: &str, offset: u64, pattern: u8) -> bool {
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", "-r", uri, "-c", &format!("read -P {pattern} {offset} 64k")])
        .output()
        .await
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    out.status.success() && s.contains("read 65536/65536") && !s.contains("fail")
}

/// Waits until the volume is exported by `node` with every other replica
/// connected and up to date; returns its NBD URI.
pub async fn wait_exported(c: &Cluster, node: &str, replicas: usize) -> String {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = volume(c).await;
        let ok = last["primary"] == node
            && last["replicas"].as_array().map(|r| r.len()) == Some(replicas)
            && last["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["disk"] == "UpToDate" && r["connection"] == "Connected");
        if ok {
            if let Some(uri) = last["nbd"].as_str() {
                return uri.split_whitespace().next().unwrap().to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("volume never exported by {node} with all replicas in sync: {last}");
}

/// Waits (30 s) until `node` exports volume `data`; its NBD URI.
pub async fn wait_exported_primary(c: &Cluster, node: &str) -> String {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = volume(c).await;
        if last["primary"] == node {
            if let Some(uri) = last["nbd"].as_str() {
                return uri.split_whitespace().next().unwrap().to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("volume never exported by {node}: {last}");
}

/// The forced-promotion report of volume `data` (dry run), from `url`.
/// Retries while no leader answers (503: one was just lost).
pub async fn promote_dry_run(url: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (st, r) = post(&format!("{url}/v1/volumes/data/promote?dry_run=true"), json!({})).await;
        if st == 503 {
            last = r;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["dry_run"], true, "{r}");
        return r;
    }
    panic!("no leader answered the dry run: {last}");
}

/// Dry runs from `url` until `done` holds for the report (30 s at most);
/// the last report.
pub async fn promote_dry_run_until(url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = promote_dry_run(url).await;
        if done(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// One replica's entry of a promotion report (null: none).
pub fn candidate<'a>(report: &'a Value, node: &str) -> &'a Value {
    report["candidates"].as_array().and_then(|c| c.iter().find(|c| c["node"] == node)).unwrap_or(&Value::Null)
}
