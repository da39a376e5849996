//! `tandem demo`: a local three-node cluster, each node its own agent process
//! with its own data directory, on 127.0.0.1. It only uses what an operator
//! would: config files, `tandem agent`, and the REST API. It must never exit
//! leaving an agent it started running: Ctrl-C or SIGTERM at any moment,
//! starting included, stops every agent started so far.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::Method;
use serde_json::json;
use tandem_http_api::ClusterView;
use tokio::process::{Child, Command};

use crate::cli::{parse, Client};

/// Prints a line; a closed stdout (`tandem demo | head`) must not stop the
/// demo before it has stopped its agents.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub const NODES: usize = 3;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

struct Node {
    name: String,
    url: String,
    log: PathBuf,
    child: Child,
}

pub async fn run(base_port: u16, dir: Option<PathBuf>, keep: bool) -> anyhow::Result<()> {
    if base_port as usize + 2 * NODES > u16::MAX as usize {
        bail!("--base-port {base_port} leaves no room for {NODES} nodes");
    }
    // Caught from before the first agent starts: a Ctrl-C while the demo
    // starts must stop what already runs, not kill the demo and orphan its
    // agents (nor be ignored, when the demo inherited it ignored).
    let mut stop = StopSignal::new().context("catching Ctrl-C and SIGTERM")?;
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let service_port = base_port.saturating_add(80);
    let mut nodes = Vec::new();
    // Every agent is in `nodes` from the moment it is spawned, so dropping
    // the start at a signal leaves each one to `stop_all`.
    let started = tokio::select! {
        r = start(&exe, &dir, base_port, service_port, &mut nodes) => Some(r),
        _ = stop.recv() => None,
    };
    match started {
        Some(Ok((cluster, nbd))) => {
            print_banner(&cluster, &nodes, &dir, service_port, &nbd);
            supervise(&mut nodes, &mut stop).await;
        }
        Some(Err(e)) => {
            eprintln!("demo failed: {e:#}");
            for n in &nodes {
                eprintln!("  {} log: {}", n.name, n.log.display());
            }
            stop_all(&mut nodes, &mut stop).await;
            return Err(e);
        }
        None => say!("interrupted while starting: stopping the {} agent(s) started...", nodes.len()),
    }
    stop_all(&mut nodes, &mut stop).await;
    if keep {
        say!("data and logs kept in {}", dir.display());
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!("could not remove {}: {e}", dir.display());
    }
    Ok(())
}

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment it is made: one
/// that arrives while nobody waits is kept for the next `recv`.
struct StopSignal {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn new() -> std::io::Result<StopSignal> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignal { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Starts the agents one by one, forms the cluster and creates the example
/// group; returns the cluster and the volume's NBD URI. Says each step.
async fn start(
    exe: &Path,
    dir: &Path,
    base_port: u16,
    service_port: u16,
    nodes: &mut Vec<Node>,
) -> anyhow::Result<(ClusterView, String)> {
    say!("tandem demo: starting {NODES} agents (data and logs in {})", dir.display());
    for i in 1..=NODES {
        nodes.push(spawn_node(exe, dir, i, base_port)?);
        if let Some(node) = nodes.last_mut() {
            wait_healthy(node).await?;
            say!("  {} answers at {} (pid {})", node.name, node.url, node.child.id().unwrap_or(0));
        }
    }
    let cluster = form_cluster(nodes).await?;
    say!(
        "cluster {:?} formed: {} voters, leader {}; starting the example group `web`...",
        cluster.cluster_id,
        nodes.len(),
        cluster.leader.as_deref().unwrap_or("?")
    );
    let nbd = create_example_group(nodes, service_port).await?;
    Ok((cluster, nbd))
}

/// Node `i`'s API port; the next one is its volume replication port.
fn port_of(base_port: u16, i: usize) -> u16 {
    base_port + 2 * (i as u16 - 1)
}

fn node_config(dir: &Path, i: usize, base_port: u16) -> String {
    let port = port_of(base_port, i);
    let join = if i == 1 { String::new() } else { format!("join = [\"http://127.0.0.1:{base_port}\"]\n") };
    format!(
        "# tandem demo node {i}\nname = \"node{i}\"\ndata_dir = \"{}\"\naddresses = [\"127.0.0.1\"]\nport = {port}\n{join}",
        dir.join(format!("node{i}")).display()
    )
}

/// Spawns node `i`'s agent (it is not up yet: see `wait_healthy`).
fn spawn_node(exe: &Path, dir: &Path, i: usize, base_port: u16) -> anyhow::Result<Node> {
    let name = format!("node{i}");
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, node_config(dir, i, base_port))?;
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let child = Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Own process group: the terminal's Ctrl-C reaches the demo only,
        // which then stops the agents in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let url = format!("http://127.0.0.1:{}", port_of(base_port, i));
    Ok(Node { name, url, log, child })
}

async fn wait_healthy(node: &mut Node) -> anyhow::Result<()> {
    let client = Client::new(&node.url)?;
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = node.child.try_wait()? {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            bail!("{} exited with {status}:\n{log}", node.name);
        }
        if client.call(Method::GET, "/healthz", None).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{} did not answer /healthz within {}s", node.name, START_TIMEOUT.as_secs())
}

async fn form_cluster(nodes: &mut [Node]) -> anyhow::Result<ClusterView> {
    let first = Client::new(&nodes[0].url)?;
    first.call(Method::POST, "/v1/cluster/init", Some(json!({"cluster_id": "demo"}))).await?;
    let deadline = Instant::now() + FORM_TIMEOUT;
    loop {
        if let Ok(v) = first.call(Method::GET, "/v1/cluster", None).await {
            let c: ClusterView = parse(v)?;
            let voters = c.members.iter().filter(|m| m.role == tandem_http_api::Role::Voter).count();
            if voters == nodes.len() {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not reach {} voters within {}s", nodes.len(), FORM_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The example service: a replicated volume (exported over NBD where the
/// group runs), then a small HTTP server that says which node serves it.
async fn create_example_group(nodes: &[Node], port: u16) -> anyhow::Result<String> {
    let script = format!(
        "echo \"hello from $TANDEM_NODE (group $TANDEM_GROUP, epoch $TANDEM_EPOCH)\" > index.html; \
         exec python3 -m http.server {port} --bind 127.0.0.1"
    );
    let body = json!({
        "resources": [
            {"name": "data", "type": "volume", "size": "256MiB", "mode": "sync", "replicas": NODES},
            {"name": "http", "type": "process", "command": ["sh", "-c", script]},
        ],
        "nodes": nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
        "failback": "manual",
    });
    let client = Client::new(&nodes[0].url)?;
    client.call(Method::PUT, "/v1/groups/web", Some(body)).await?;
    let deadline = Instant::now() + FORM_TIMEOUT;
    loop {
        let v = client.call(Method::GET, "/v1/groups/web", None).await?;
        if v["state"] == "running" {
            let vol = client.call(Method::GET, "/v1/volumes/data", None).await?;
            if let Some(uri) = vol["nbd"].as_str() {
                return Ok(uri.split_whitespace().next().unwrap_or(uri).to_string());
            }
        }
        if Instant::now() > deadline {
            bail!("the example group did not start: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_banner(c: &ClusterView, nodes: &[Node], dir: &Path, service_port: u16, nbd: &str) {
    let u = |i: usize| &nodes[i].url;
    say!(
        "tandem demo: cluster {:?} is up with {} nodes, leader {}",
        c.cluster_id,
        nodes.len(),
        c.leader.as_deref().unwrap_or("?")
    );
    say!();
    for n in nodes {
        say!("  {}  {}  (pid {}, log {})", n.name, n.url, n.child.id().unwrap_or(0), n.log.display());
    }
    say!("  data: {}", dir.display());
    say!();
    say!("Try:");
    say!("  curl -s {}/v1/cluster", u(0));
    say!("  curl -s '{}/v1/nodes?stale=true'", u(1));
    say!("  curl -s -X POST {}/v1/nodes/node2/standby", u(2));
    say!("  curl -s -X PUT -d '{{\"value\": \"ssd\"}}' {}/v1/nodes/node3/attributes/disk", u(0));
    say!("  curl -s -X POST {}/v1/nodes/node2/online", u(0));
    say!("  TANDEM_ENDPOINT={} target/release/tandem status", u(1));
    say!("  target/release/tandem node show node1 --endpoint {}", u(2));
    say!();
    say!();
    say!("Example group `web` (a small HTTP service) runs on node1: curl -s http://127.0.0.1:{service_port}/");
    say!("  target/release/tandem group list --endpoint {}", u(1));
    say!("  curl -s -X POST -d '{{\"to\": \"node3\"}}' {}/v1/groups/web/move     # switchover", u(1));
    say!("Its volume `data` (256 MiB, replicated synchronously to the other nodes) is exported over NBD:");
    say!("  qemu-io -f raw '{nbd}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    say!("  curl -s {}/v1/volumes/data      # replicas, disk and connection states", u(0));
    say!("Kill the node that runs it (kill -9 <its pid>): its watchdog stops the service when the lease ends,");
    say!("and within about a second it answers again from another node (a new leader is elected if it led).");
    say!("Ctrl-C stops the cluster.");
}

/// Waits for Ctrl-C or SIGTERM, reporting agents that exit on their own.
async fn supervise(nodes: &mut [Node], stop: &mut StopSignal) {
    let mut reported = vec![false; nodes.len()];
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, n) in nodes.iter_mut().enumerate() {
                    if let Ok(Some(status)) = n.child.try_wait() {
                        if !reported[i] {
                            say!("{} exited ({status}); its log: {}", n.name, n.log.display());
                            reported[i] = true;
                        }
                    }
                }
            }
        }
    }
    say!("stopping the cluster...");
}

/// SIGTERM to every agent (each stops its resources and its watchdog), then
/// waits for them; one still running after the stop timeout, or at a
/// second Ctrl-C, is killed.
async fn stop_all(nodes: &mut [Node], stop: &mut StopSignal) {
    for n in nodes.iter() {
        if let Some(pid) = n.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    let mut hurry = false;
    for n in nodes.iter_mut() {
        if !hurry {
            tokio::select! {
                _ = n.child.wait() => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    eprintln!("{} did not stop within {}s; killing it", n.name, STOP_TIMEOUT.as_secs());
                }
                _ = stop.recv() => {
                    eprintln!("stopping again: killing the agents still running");
                    hurry = true;
                }
            }
        }
        let _ = n.child.kill().await;
    }
}
