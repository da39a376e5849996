//! `tandem demo`: a local three-node cluster, each node its own agent process
//! with its own data directory, on 127.0.0.1. It only uses what an operator
//! would: config files, `tandem agent`, and the REST API. It must never exit
//! leaving an agent it started running: Ctrl-C or SIGTERM at any moment,
//! starting included, stops every agent started so far.
//!
//! `--app postgres` (root, PostgreSQL installed) runs PostgreSQL on a
//! replicated volume instead of the small web service: checked before
//! anything starts, and refused with what is missing. The three agents
//! share this machine, so each runs in its own mount namespace (`unshare
//! --mount --propagation slave`): a node's file system mount is never seen,
//! nor mounted over, by another node; whatever a killed node leaves mounted
//! goes away with its last process.

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
/// PostgreSQL's shutdown checkpoint and the unmount come before an agent
/// exits.
const PG_STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// What the demo cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum App {
    /// A small HTTP service on a replicated volume.
    Web,
    /// PostgreSQL 15 on a file system on a replicated volume (root).
    Postgres,
}

/// Debian's PostgreSQL 15 binaries (package postgresql-15).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The password of the demo database's `postgres` role (scram-sha-256 over
/// TCP; the banner prints it).
const PG_PASSWORD: &str = "tandem-demo";

struct Node {
    name: String,
    url: String,
    /// The agent's admin socket: init and join go there.
    socket: PathBuf,
    log: PathBuf,
    child: Child,
}

/// The demo's credentials: `<dir>/admin.token` and `<dir>/ca.pem`.
fn access(dir: &Path) -> crate::cli::Access {
    let token = std::fs::read_to_string(dir.join("admin.token")).ok().map(|t| t.trim().to_string());
    crate::cli::Access { token, cacert: Some(dir.join("ca.pem")), ..Default::default() }
}

fn admin_client(dir: &Path, url: &str) -> anyhow::Result<Client> {
    Ok(Client::with_access(url, &access(dir))?)
}

pub async fn run(base_port: u16, dir: Option<PathBuf>, keep: bool, app: App) -> anyhow::Result<()> {
    if base_port as usize + 2 * NODES > u16::MAX as usize {
        bail!("--base-port {base_port} leaves no room for {NODES} nodes");
    }
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id())));
    if app == App::Postgres {
        // Before anything starts: nothing to stop when something is missing.
        let missing = postgres_missing(&dir);
        if !missing.is_empty() {
            bail!("`tandem demo --app postgres` cannot run here; it needs:\n  {}", missing.join("\n  "));
        }
    }
    // Caught from before the first agent starts: a Ctrl-C while the demo
    // starts must stop what already runs, not kill the demo and orphan its
    // agents (nor be ignored, when the demo inherited it ignored).
    let mut stop = StopSignal::new().context("catching Ctrl-C and SIGTERM")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let service_port = base_port.saturating_add(if app == App::Postgres { 81 } else { 80 });
    let stop_timeout = if app == App::Postgres { PG_STOP_TIMEOUT } else { STOP_TIMEOUT };
    let mut nodes = Vec::new();
    // Every agent is in `nodes` from the moment it is spawned, so dropping
    // the start at a signal leaves each one to `stop_all`.
    let started = tokio::select! {
        r = start(&exe, &dir, base_port, service_port, app, &mut nodes) => Some(r),
        _ = stop.recv() => None,
    };
    match started {
        Some(Ok((cluster, nbd))) => {
            match app {
                App::Web => print_banner(&cluster, &nodes, &dir, service_port, &nbd),
                App::Postgres => print_postgres_banner(&cluster, &nodes, &dir, service_port),
            }
            supervise(&mut nodes, &mut stop).await;
        }
        Some(Err(e)) => {
            eprintln!("demo failed: {e:#}");
            for n in &nodes {
                eprintln!("  {} log: {}", n.name, n.log.display());
            }
            stop_all(&mut nodes, &mut stop, stop_timeout).await;
            return Err(e);
        }
        None => say!("interrupted while starting: stopping the {} agent(s) started...", nodes.len()),
    }
    stop_all(&mut nodes, &mut stop, stop_timeout).await;
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
    app: App,
    nodes: &mut Vec<Node>,
) -> anyhow::Result<(ClusterView, String)> {
    say!("tandem demo: starting {NODES} agents (data and logs in {})", dir.display());
    for i in 1..=NODES {
        nodes.push(spawn_node(exe, dir, i, base_port, app == App::Postgres)?);
        if let Some(node) = nodes.last_mut() {
            wait_healthy(node).await?;
            say!("  {} answers at {} (pid {})", node.name, node.url, node.child.id().unwrap_or(0));
        }
    }
    let cluster = form_cluster(nodes, dir).await?;
    say!(
        "cluster {:?} formed: {} voters, leader {}; starting the example group `{}`...",
        cluster.cluster_id,
        nodes.len(),
        cluster.leader.as_deref().unwrap_or("?"),
        if app == App::Postgres { "postgres" } else { "web" }
    );
    let nbd = match app {
        App::Web => create_example_group(nodes, dir, service_port).await?,
        App::Postgres => create_postgres_group(nodes, dir, service_port).await?,
    };
    Ok((cluster, nbd))
}

/// Node `i`'s API port; the next one is its volume replication port.
fn port_of(base_port: u16, i: usize) -> u16 {
    base_port + 2 * (i as u16 - 1)
}

fn node_config(dir: &Path, i: usize, base_port: u16) -> String {
    let port = port_of(base_port, i);
    format!(
        "# tandem demo node {i}\nname = \"node{i}\"\ndata_dir = \"{}\"\naddresses = [\"127.0.0.1\"]\nport = {port}\n",
        dir.join(format!("node{i}")).display()
    )
}

/// Spawns node `i`'s agent (it is not up yet: see `wait_healthy`).
/// With `own_mounts`, in a mount namespace of its own (see the module doc):
/// `unshare` execs the agent, so the pid is the agent's.
fn spawn_node(exe: &Path, dir: &Path, i: usize, base_port: u16, own_mounts: bool) -> anyhow::Result<Node> {
    let name = format!("node{i}");
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, node_config(dir, i, base_port))?;
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let mut cmd = if own_mounts {
        let mut c = Command::new("unshare");
        // Slave: the host's later mounts still show inside; nothing made
        // inside leaks out.
        c.args(["--mount", "--propagation", "slave"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let child = cmd
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
    let url = format!("https://127.0.0.1:{}", port_of(base_port, i));
    let socket = dir.join(&name).join("admin.sock");
    Ok(Node { name, url, socket, log, child })
}

async fn wait_healthy(node: &mut Node) -> anyhow::Result<()> {
    let local = crate::cli::Access { socket: Some(node.socket.clone()), ..Default::default() };
    let client = Client::with_access(&node.url, &local)?;
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

/// `tandem cluster init` on node1 (its admin socket): keeps the CA and the
/// admin token in `dir`; then `tandem cluster join` on the others.
async fn form_cluster(nodes: &mut [Node], dir: &Path) -> anyhow::Result<ClusterView> {
    let local = |n: &Node| {
        Client::with_access(&n.url, &crate::cli::Access { socket: Some(n.socket.clone()), ..Default::default() })
    };
    let init: tandem_http_api::InitView =
        parse(local(&nodes[0])?.call(Method::POST, "/v1/cluster/init", Some(json!({"cluster_id": "demo"}))).await?)?;
    std::fs::write(dir.join("ca.pem"), &init.ca_pem)?;
    crate::security::files::save_admin_token(dir, &init.admin_token)?;
    let first = admin_client(dir, &nodes[0].url)?;
    for n in &nodes[1..] {
        let t: tandem_http_api::JoinTokenView =
            parse(first.call(Method::POST, "/v1/cluster/join-token", Some(json!({"ttl_s": 600}))).await?)?;
        let req = json!({"via": nodes[0].url, "token": t.token, "ca_hash": t.ca_hash});
        local(n)?.call(Method::POST, "/v1/cluster/join", Some(req)).await?;
    }
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
async fn create_example_group(nodes: &[Node], dir: &Path, port: u16) -> anyhow::Result<String> {
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
    let client = admin_client(dir, &nodes[0].url)?;
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
    credentials_hint(dir, u(0));
    say!("Try:");
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" {}/v1/cluster", u(0));
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" '{}/v1/nodes?stale=true'", u(1));
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" -X POST {}/v1/nodes/node2/standby", u(2));
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" -X PUT -d '{{\"value\": \"ssd\"}}' {}/v1/nodes/node3/attributes/disk", u(0));
    say!(
        "  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" -X POST {}/v1/nodes/node2/online",
        u(0)
    );
    say!("  TANDEM_ENDPOINT={} target/release/tandem status", u(1));
    say!("  target/release/tandem node show node1 --endpoint {}", u(2));
    say!("  target/release/tandem audit --endpoint {}        # who did what", u(0));
    say!();
    say!("Example group `web` (a small HTTP service) runs on node1: curl -s http://127.0.0.1:{service_port}/");
    say!("  target/release/tandem group list --endpoint {}", u(1));
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" -X POST -d '{{\"to\": \"node3\"}}' {}/v1/groups/web/move     # switchover", u(1));
    say!("Its volume `data` (256 MiB, replicated synchronously to the other nodes) is exported over NBD:");
    say!("  qemu-io -f raw '{nbd}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" {}/v1/volumes/data      # replicas, disk and connection states", u(0));
    say!("Kill the node that runs it (kill -9 <its pid>): its watchdog stops the service when the lease ends,");
    say!("and within about a second it answers again from another node (a new leader is elected if it led).");
    say!("Ctrl-C stops the cluster.");
}

/// How to use the demo's HTTPS API: its CA and admin token, as files.
fn credentials_hint(dir: &Path, url: &str) {
    let (ca, token) = (dir.join("ca.pem"), dir.join("admin.token"));
    say!("The API is HTTPS with a cluster CA and needs a token (both made by `cluster init`). In your shell:");
    say!("  export TANDEM_TOKEN=$(cat {}) TANDEM_CACERT={}", token.display(), ca.display());
    say!("(curl: --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\"; the CLI reads both variables.)");
    say!("Dashboard: open {url}/ui/ in a browser (trust {} or accept its certificate)", dir.join("ca.pem").display());
    say!("and paste the token in {}.", dir.join("admin.token").display());
    say!();
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
async fn stop_all(nodes: &mut [Node], stop: &mut StopSignal, timeout: Duration) {
    for n in nodes.iter() {
        if let Some(pid) = n.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut hurry = false;
    for n in nodes.iter_mut() {
        if !hurry {
            tokio::select! {
                _ = n.child.wait() => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    eprintln!("{} did not stop within {}s; killing it", n.name, timeout.as_secs());
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

// ---- `--app postgres` ----

/// What `--app postgres` needs and this machine lacks, each with how to
/// get it (empty: all there).
fn postgres_missing(dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root: it mounts a file system and attaches loop devices (run it with sudo)".to_string());
    }
    for (file, what) in [
        (format!("{PG_BIN}/postgres"), "PostgreSQL 15's server (apt-get install postgresql)"),
        (format!("{PG_BIN}/initdb"), "PostgreSQL 15's initdb (apt-get install postgresql)"),
        ("/dev/fuse".to_string(), "/dev/fuse, the FUSE device (the fuse kernel module)"),
    ] {
        if !Path::new(&file).exists() {
            missing.push(format!("{file}: {what}"));
        }
    }
    for (program, what) in [
        ("nbdfuse", "exposes the volume as a file for a loop device (apt-get install libnbd-bin)"),
        ("mkfs.ext4", "makes the file system (apt-get install e2fsprogs)"),
        ("psql", "the client the demo tells you to use (apt-get install postgresql-client-15)"),
        ("pg_isready", "tells when PostgreSQL accepts connections (apt-get install postgresql-client-15)"),
        ("unshare", "gives each node its own mount namespace (apt-get install util-linux)"),
    ] {
        if which(program).is_none() {
            missing.push(format!("{program}: {what}"));
        }
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(pg)) => {
            if let Some(blocked) = unreachable_for(&pg, dir) {
                missing.push(format!(
                    "a data directory user postgres can reach: {} is not searchable by it (choose another --dir, or chmod o+x it)",
                    blocked.display()
                ));
            }
        }
        _ => missing.push("a user named postgres (apt-get install postgresql creates it)".to_string()),
    }
    missing
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// The first existing directory on the way to `dir` (itself included) that
/// `user` may not search, if any.
fn unreachable_for(user: &nix::unistd::User, dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let abs = if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir().ok()?.join(dir) };
    abs.ancestors().filter_map(|a| std::fs::metadata(a).ok().map(|m| (a, m))).find_map(|(a, m)| {
        let bits = if m.uid() == user.uid.as_raw() {
            0o100
        } else if m.gid() == user.gid.as_raw() {
            0o010
        } else {
            0o001
        };
        (m.mode() & bits == 0).then(|| a.to_path_buf())
    })
}

/// The shell PostgreSQL's resource runs, as user postgres, once the file
/// system is mounted (docs/guides/postgresql.md explains each step): the
/// first start creates the cluster (scram-sha-256 over TCP with the
/// password in `pwfile`), the `postmaster.pid` and socket lock file left by
/// a killed postmaster are removed once none of its processes is left
/// (waited for up to 10 s: on one machine, the dead node's postmaster may
/// still be exiting), then the postmaster runs
/// on 127.0.0.1:`port` (the resource's `stop_signal` SIGINT is PostgreSQL's
/// fast shutdown; its SIGTERM would wait for every client to leave).
fn postgres_script(mountpoint: &Path, pwfile: &Path, port: u16) -> String {
    let (m, pw) = (mountpoint.display(), pwfile.display());
    format!(
        "set -eu; D={m}/data; \
         if [ ! -s \"$D/PG_VERSION\" ]; then \
           rm -rf \"$D.init\"; \
           {PG_BIN}/initdb -D \"$D.init\" --username=postgres --encoding=UTF8 --auth-local=peer \
             --auth-host=scram-sha-256 --pwfile={pw} --no-instructions; \
           mv \"$D.init\" \"$D\"; sync {m}; \
         fi; \
         stale=no; \
         for i in $(seq 100); do \
           stale=yes; \
           for p in /proc/[0-9]*; do [ \"$(readlink \"$p/cwd\" 2>/dev/null)\" = \"$D\" ] && stale=no; done; \
           [ \"$stale\" = no ] || break; sleep 0.1; \
         done; \
         [ \"$stale\" = no ] || rm -f \"$D/postmaster.pid\" {m}/.s.PGSQL.{port}.lock; \
         exec {PG_BIN}/postgres -D \"$D\" -c listen_addresses=127.0.0.1 -p {port} \
           -c unix_socket_directories={m} -c cluster_name=\"$TANDEM_NODE\""
    )
}

/// PostgreSQL's group: a volume on all three nodes, ext4 on it, PostgreSQL.
/// No `vip`: the three nodes share `lo`, and an agent removes from its
/// interfaces the addresses of groups placed on other nodes (what a crashed
/// agent left); PostgreSQL listens on 127.0.0.1 wherever it runs, the
/// loopback stand-in for a virtual IP. Returns the volume's NBD URI.
async fn create_postgres_group(nodes: &[Node], dir: &Path, port: u16) -> anyhow::Result<String> {
    let pg = nix::unistd::User::from_name("postgres")?.context("no user postgres")?;
    let pwfile = dir.join("postgres.password");
    std::fs::write(&pwfile, format!("{PG_PASSWORD}\n"))?;
    nix::unistd::chown(&pwfile, Some(pg.uid), Some(pg.gid))?;
    let mountpoint = dir.join("pg");
    let body = json!({
        "resources": [
            {"name": "pgdata", "type": "volume", "size": "256MiB", "mode": "sync", "replicas": NODES},
            {"name": "fs", "type": "filesystem", "volume": "pgdata", "mountpoint": mountpoint,
             "fstype": "ext4", "options": "noatime", "mkfs": true, "owner": "postgres",
             "start_timeout_ms": 60000},
            {"name": "db", "type": "process", "user": "postgres",
             "command": ["/bin/sh", "-c", postgres_script(&mountpoint, &pwfile, port)],
             "stop_signal": "SIGINT", "stop_timeout_ms": 30000},
        ],
        "nodes": nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
        "failback": "manual",
    });
    let client = admin_client(dir, &nodes[0].url)?;
    client.call(Method::PUT, "/v1/groups/postgres", Some(body)).await?;
    let deadline = Instant::now() + FORM_TIMEOUT;
    loop {
        let g = client.call(Method::GET, "/v1/groups/postgres", None).await?;
        let all_up =
            g["resources"].as_array().is_some_and(|rs| !rs.is_empty() && rs.iter().all(|r| r["state"] == "running"));
        if all_up && pg_ready(port).await {
            let vol = client.call(Method::GET, "/v1/volumes/pgdata", None).await?;
            let uri = vol["nbd"].as_str().unwrap_or("-");
            return Ok(uri.split_whitespace().next().unwrap_or(uri).to_string());
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not start within {}s: {g}", FORM_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Whether PostgreSQL accepts connections on 127.0.0.1:`port`.
async fn pg_ready(port: u16) -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn print_postgres_banner(c: &ClusterView, nodes: &[Node], dir: &Path, port: u16) {
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
    credentials_hint(dir, u(0));
    say!("PostgreSQL 15 runs on node1, in group `postgres`: volume `pgdata` (256 MiB, replicated synchronously");
    say!("to the other nodes) -> ext4 mounted on {} -> PostgreSQL as user postgres.", dir.join("pg").display());
    say!("Each node mounts in its own mount namespace. Connect (SHOW cluster_name names the node that answers):");
    say!("  PGPASSWORD={PG_PASSWORD} psql -h 127.0.0.1 -p {port} -U postgres -c 'SHOW cluster_name'");
    say!("  target/release/tandem group show postgres --endpoint {}", u(1));
    say!("  target/release/tandem volume show pgdata --endpoint {}", u(0));
    say!("Switch it over (it stops on node1, then starts on node3):");
    say!("  target/release/tandem group move postgres node3 --endpoint {}", u(0));
    say!("  curl -s --cacert $TANDEM_CACERT -H \"Authorization: Bearer $TANDEM_TOKEN\" -X POST -d '{{\"to\": \"node3\"}}' {}/v1/groups/postgres/move     # the same with curl", u(1));
    say!("Fail it over: kill -9 the pid of the node running it. Its watchdog kills PostgreSQL when the lease");
    say!("ends; another node mounts the volume, PostgreSQL recovers from its WAL, and every committed row is there.");
    say!("Guide for real servers: docs/guides/postgresql.md");
    say!("Ctrl-C stops the cluster.");
}
