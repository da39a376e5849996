//! tandem-chaos: a small data centre on one machine (one network namespace
//! per node, real `tandem agent`s), a nemesis injecting faults from a
//! seeded schedule, and a history checker (`checker`) that proves the
//! group never ran on two nodes and measures each failover's downtime.
//!
//! Everything it creates (namespaces, bridge, processes, data) is removed
//! when it exits, also on Ctrl-C or a panic. Needs root. It must never
//! judge a run by timings: only the checker's properties are violations.

mod bank;
mod blocks;
mod checker;
mod clusters;
mod register;
mod retry;
mod slow;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use checker::{Copy, Sample, Violation};
use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tandem_testkit::sites::{self as topology, Site, Topology};
use tandem_testkit::{is_root, kill_netns, kill_session, new_session};

#[derive(Parser)]
#[command(name = "tandem-chaos", about = "Fault injection with a history checker for tandem")]
struct Args {
    /// Seed of the fault schedule (printed; the same seed gives the same schedule).
    #[arg(long)]
    seed: Option<u64>,
    /// Fault rounds to run (ignored with --duration).
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Run for this many seconds instead of a number of rounds.
    /// (seconds, or with a unit: 90s, 30m, 1h).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<u64>,
    /// Nodes (hosts), 3 to 7.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=7))]
    nodes: u8,
    /// Where to write the JSON report.
    #[arg(long, default_value = "chaos-report.json")]
    report: PathBuf,
    /// The tandem binary (default: next to this one).
    #[arg(long)]
    tandem: Option<PathBuf>,
    /// Two sites and a witness: the last node is a witness reachable from
    /// both sites, the others are split between site a and site b, and the
    /// link between the sites is one more thing to cut.
    #[arg(long)]
    sites: bool,
    /// Only these fault kinds (comma-separated, as the timeline names them:
    /// PowerLoss,SiteCut,...). Default: all.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Networks the agents declare as their heartbeat paths (1 or 2). With 1
    /// every agent uses only the first network, as a cluster on a single
    /// network does, and `PathDown` is left out (it would be `Isolate`).
    #[arg(long, default_value_t = topology::PATHS as u8, value_parser = clap::value_parser!(u8).range(1..=topology::PATHS as i64))]
    paths: u8,
    /// Two clusters and the ticket between them (docs/dr.md): site a and
    /// site b each a cluster of --nodes voters, `tandem arbitrator` on a
    /// third host reaching both, a group bound to the ticket on each site;
    /// the faults cut the WAN, the arbitrator, a whole site (see `clusters`).
    #[arg(long, conflicts_with_all = ["sites", "quiet", "lossy_path"])]
    clusters: bool,
    /// Keep the agents' logs also when nothing was violated.
    #[arg(long)]
    keep: bool,
    /// What runs on the cluster while the faults come.
    #[arg(long, value_enum, default_value_t = Workload::Standard)]
    workload: Workload,
    /// No faults at all (needs --duration): the workload runs and every
    /// change of a group's node or epoch is a violation, a false failover.
    /// With --lossy-path and a loaded machine: the false-failover rate of a
    /// timing profile.
    #[arg(long)]
    quiet: bool,
    /// The agents' timing: `default`, or `fast` (docs/config.md, "A fast
    /// profile").
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    profile: Profile,
    /// Drop this percentage of the packets, at random, on every host's
    /// second path (eth1), both ways, for the whole run.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100), default_value_t = 0)]
    lossy_path: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    Default,
    Fast,
}

/// The fast profile's settings, as docs/config.md gives them.
const FAST_PROFILE: &str = "[raft]\nheartbeat_interval_ms = 50\nelection_timeout_min_ms = 250\n\
election_timeout_max_ms = 350\n[liveness]\nheartbeat_interval_ms = 50\nnode_timeout_ms = 250\n\
[fencing]\nlease_ms = 300\nmargin_ms = 250\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// A process on a sync volume (never two copies), an async volume's
    /// losses, a register through the API, blocks through NBD.
    Standard,
    /// PostgreSQL on a sync volume behind a virtual IP, and bank clients
    /// through that address (see `bank`).
    Postgres,
}

/// Seconds from "3600", "90s", "30m" or "1h".
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (3600, 90s, 30m, 1h)"))?;
    match unit {
        "s" => Ok(n),
        "m" => Ok(n * 60),
        "h" => Ok(n * 3600),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (s, m or h)")),
    }
}

/// Every fault kind the nemesis knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of everything the host runs (power loss), then a restart.
    PowerLoss,
    /// SIGKILL of the agent alone, restarted at once (its resources stay).
    AgentCrash,
    /// SIGKILL of the agent alone, back only after its lease.
    AgentDown,
    /// SIGSTOP of the agent (a long stall), then SIGCONT.
    Pause,
    /// The host's link down (isolated from all), then up.
    Isolate,
    /// Power loss of this host and of the next one at the same time.
    DoublePowerLoss,
    /// Bytes flipped in blocks of a secondary's backing file, behind its
    /// back; an online verify must find and repair exactly those blocks.
    Corrupt,
    /// A network partition by nftables (links stay up): the host (and, with
    /// five or more nodes, the next one too) cut off from the others.
    Partition,
    /// One-way loss: everything the host sends to the others is dropped; it
    /// still hears them (they do not hear it).
    OneWay,
    /// One of the host's two networks (heartbeat paths) down, the other up:
    /// nothing may move.
    PathDown,
    /// The host's links slowed to 1, 5 or 20 Mbit/s both ways (`tc tbf`
    /// over a three-band priority queue: see `slow`).
    SlowLink,
    /// The host's data directory (a small tmpfs) filled to the last byte.
    DiskFull,
    /// The link between the two sites cut; both still reach the witness.
    SiteCut,
}

impl Fault {
    /// For the faults after which nothing may move (the node stays heard
    /// and alive throughout): what happened to the node, for the report.
    fn moves_nothing(self) -> Option<&'static str> {
        match self {
            Fault::PathDown => Some("lost one path"),
            Fault::SlowLink => Some("had a slow link"),
            _ => None,
        }
    }
}

/// The fault kinds of a run, in the order a short run covers them.
fn fault_kinds(sites: bool) -> Vec<Fault> {
    let mut kinds = vec![
        Fault::PowerLoss,
        Fault::AgentCrash,
        Fault::AgentDown,
        Fault::Pause,
        Fault::Isolate,
        Fault::DoublePowerLoss,
        Fault::Corrupt,
        Fault::Partition,
        Fault::OneWay,
        Fault::PathDown,
        Fault::SlowLink,
        Fault::DiskFull,
    ];
    if sites {
        kinds.insert(0, Fault::SiteCut);
    }
    kinds
}

/// xorshift64*: enough for a reproducible schedule, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Host {
    name: String,
    ns: String,
    /// Its address on the first path (the client's way in).
    addr: String,
    /// Its addresses on every path.
    addrs: Vec<String>,
    site: Site,
    dir: PathBuf,
    child: Option<Child>,
    /// Every session an agent of this host led (what it left running stays
    /// in the first one).
    sessions: Vec<i32>,
    /// Its agent has run on a full data disk: RocksDB may hold the failed
    /// write and stop the agent on its next one, seconds later.
    saw_full_disk: bool,
}

impl Host {
    fn url(&self) -> String {
        format!("https://{}:7401", self.addr)
    }

    /// The agent's admin socket (init and join go there).
    fn socket(&self) -> PathBuf {
        self.dir.join("data").join("admin.sock")
    }

    fn start(&mut self, tandem: &Path) -> anyhow::Result<()> {
        let child = spawn_in_ns(&self.ns, tandem, "agent", &self.dir.join("node.toml"), &self.dir.join("agent.log"))?;
        self.sessions.push(child.id() as i32);
        self.child = Some(child);
        self.saw_full_disk = false;
        Ok(())
    }

    /// Starts its agent again if it exited on its own (not one a fault
    /// stopped: that one has no child), as systemd's `Restart=always`
    /// would; returns how it ended.
    fn restart_if_exited(&mut self, tandem: &Path) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        if let Err(e) = self.start(tandem) {
            println!("           cannot start {}'s agent again: {e:#}", self.name);
        }
        Some(status)
    }

    fn signal(&self, sig: Signal) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }

    fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn power_off(&mut self) {
        for sid in &self.sessions {
            kill_session(*sid);
        }
        // What left the agent's session (PostgreSQL's backends call
        // setsid) dies with the host too.
        kill_netns(&self.ns);
        self.sessions.clear();
        self.kill_agent();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        self.power_off();
    }
}

/// Starts `tandem <command> --config <config>` in namespace `ns`, leading
/// a session of its own (so that killing the session is a power loss),
/// its output appended to `log`.
fn spawn_in_ns(ns: &str, tandem: &Path, command: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new("ip");
    new_session(&mut cmd);
    cmd.args(["netns", "exec", ns])
        .arg(tandem)
        .args([command, "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawning tandem {command} in {ns}"))
}

/// A view (GET `path`) from the first of `hosts` running an agent that
/// answers.
async fn any_view(client: &reqwest::Client, hosts: &[Host], path: &str) -> Option<Value> {
    for h in hosts.iter().filter(|h| h.child.is_some()) {
        if let Some(v) = get(client, &format!("{}{path}", h.url())).await {
            return Some(v);
        }
    }
    None
}

/// Sends one request; returns what came back (for `retry::classify`) and
/// the body of a successful answer.
async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: &Value,
    timeout: Duration,
) -> (retry::Outcome, Option<Value>) {
    let resp = match client.request(method, url).timeout(timeout).json(body).send().await {
        Ok(r) => r,
        Err(e) => return (retry::Outcome::NoAnswer { reason: format!("{url}: {e}") }, None),
    };
    let status = resp.status().as_u16();
    let retry_after =
        resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body: Option<Value> = resp.json().await.ok();
    let field = |k: &str| body.as_ref().and_then(|b| b[k].as_str()).map(str::to_string);
    let (code, message) = match (200..300).contains(&status) {
        true => (None, None),
        false => (field("code"), field("message")),
    };
    (retry::Outcome::Answered { status, retry_after, code, message }, body)
}

/// Where a retried request goes: re-read before every try.
#[derive(Clone, Copy)]
enum Via {
    /// The volume's current primary.
    PrimaryOf(&'static str),
    /// Any node that runs an agent, in turn.
    AnyNode,
}

/// Who took a retried request, after how many tries, and the last answer
/// that was retried (when there was one).
#[derive(Debug)]
struct Taken {
    node: String,
    tries: u32,
    last: String,
}

/// Why a retried request was not taken.
#[derive(Debug)]
enum NotTaken {
    Refused { node: String, status: u16, code: String, message: String },
    Deadline { tries: u32, last: String },
}

impl std::fmt::Display for NotTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotTaken::Refused { node, status, code, message } => {
                write!(f, "refused by {node}: {status} {code}: {message}")
            }
            NotTaken::Deadline { tries, last } => {
                write!(f, "not accepted before the deadline ({tries} tries; last: {last})")
            }
        }
    }
}

/// A GET's JSON body; None for no answer or an error status.
async fn get(client: &reqwest::Client, url: &str) -> Option<Value> {
    let resp = client.get(url).timeout(Duration::from_secs(2)).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// The sampler: every 10 ms, which copies (start lines of the event log
/// whose process is still alive) run.
fn sample(log: &Path, t0: Instant, known: &mut Vec<(Copy, Option<u64>)>) -> Sample {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text.lines().skip(known.len()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(node), Some(epoch), Some(pid)) =
            (f.get(1), f.get(2).and_then(|e| e.parse().ok()), f.get(3).and_then(|p| p.parse().ok()))
        else {
            continue;
        };
        // The start time pins the pid to this process (pids are reused).
        let start = tandem::rundir::proc_start_time(pid);
        known.push((Copy { node: node.to_string(), epoch, pid }, start));
    }
    let alive = known
        .iter()
        .filter(|(c, st)| st.is_some_and(|st| tandem::rundir::is_running(c.pid, st)))
        .map(|(c, _)| c.clone())
        .collect();
    Sample { t_ms: t0.elapsed().as_millis() as u64, alive }
}

struct Run {
    hosts: Vec<Host>,
    /// The groups the faults aim at (the first the most) and whose health
    /// ends a round, and the volumes that must be back in sync.
    groups: Vec<&'static str>,
    volumes: Vec<&'static str>,
    /// The path that carries the first group's clients (its virtual IP's
    /// interface), if it has any: that path lost on the group's node is an
    /// outage the group must move for, not a fault that moves nothing.
    client_path: Option<usize>,
    /// The path the last `PathDown` took down.
    path_down: Option<usize>,
    client: reqwest::Client,
    tandem: PathBuf,
    /// Agents that exited on their own and were started again, as the
    /// documented deployment's supervisor (systemd, `Restart=always`) does.
    /// An agent whose data disk is full stops (its own fail-stop, exit 7,
    /// or Debian's RocksDB aborting on the failed write); any other end is
    /// a violation.
    exits: Vec<Exit>,
    /// The node whose data disk a `DiskFull` holds full.
    disk_full: Option<String>,
    t0: Instant,
    /// Dropped after the hosts: the agents die before their network.
    topo: Topology,
}

impl Run {
    async fn any(&self, path: &str) -> Option<Value> {
        any_view(&self.client, &self.hosts, path).await
    }

    /// Every node online on every path, three voters, every group running,
    /// every volume replica up to date and connected: the cluster recovered
    /// from the last fault.
    async fn healthy(&self) -> bool {
        let Some(c) = self.any("/v1/cluster").await else { return false };
        for group in &self.groups {
            match self.any(&format!("/v1/groups/{group}")).await {
                Some(g) if g["state"] == "running" => {}
                _ => return false,
            }
        }
        let mut in_sync = true;
        for volume in &self.volumes {
            in_sync &= match self.any(&format!("/v1/volumes/{volume}")).await {
                Some(v) => v["replicas"].as_array().is_some_and(|r| {
                    !r.is_empty() && r.iter().all(|r| r["disk"] == "UpToDate" && r["connection"] == "Connected")
                }),
                None => false,
            };
        }
        members_healthy(&c, self.hosts.len()) && in_sync
    }

    /// POSTs `body` to `path` like a careful client: retried (see
    /// `retry::classify`) against the target `via` names, read again before
    /// every try, until it is accepted or `deadline`. Returns the node that
    /// took it.
    async fn post_until(
        &self,
        path: &str,
        body: &Value,
        via: Via,
        already_done: &[&str],
        deadline: Instant,
    ) -> Result<Taken, NotTaken> {
        let (mut tries, mut last, mut turn) = (0u32, String::from("no node answered"), 0usize);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NotTaken::Deadline { tries, last });
            }
            let node = match via {
                Via::PrimaryOf(volume) => {
                    let v = self.any(&format!("/v1/volumes/{volume}")).await;
                    let p = v.as_ref().and_then(|v| v["primary"].as_str().map(str::to_string));
                    if p.is_none() {
                        last = format!("volume {volume} has no primary");
                    }
                    p
                }
                Via::AnyNode => {
                    let up: Vec<&Host> = self.hosts.iter().filter(|h| h.child.is_some()).collect();
                    turn += 1;
                    up.get(turn % up.len().max(1)).map(|h| h.name.clone())
                }
            };
            let Some(host) = node.and_then(|n| self.hosts.iter().find(|h| h.name == n)) else {
                tokio::time::sleep(retry::NO_ANSWER_RETRY.min(left)).await;
                continue;
            };
            tries += 1;
            let url = format!("{}{path}", host.url());
            let (outcome, _) = send(&self.client, reqwest::Method::POST, &url, body, left.min(REQUEST_TIMEOUT)).await;
            match retry::classify(&outcome, already_done) {
                retry::Next::Accepted => return Ok(Taken { node: host.name.clone(), tries, last }),
                retry::Next::Retry { after, why } => {
                    last = format!("{}: {why}", host.name);
                    tokio::time::sleep(after.min(deadline.saturating_duration_since(Instant::now()))).await;
                }
                retry::Next::Refused { status, code, message } => {
                    return Err(NotTaken::Refused { node: host.name.clone(), status, code, message })
                }
            }
        }
    }

    async fn wait_healthy(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            self.restart_exited();
            if self.healthy().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Sleeps `hold`, supervising the agents meanwhile.
    async fn hold(&mut self, hold: Duration) {
        let end = Instant::now() + hold;
        while Instant::now() < end {
            self.restart_exited();
            tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(100))).await;
        }
    }

    /// Starts again every agent that exited on its own (not one a fault
    /// stopped: that one has no child), as systemd's `Restart=always` would.
    fn restart_exited(&mut self) {
        for h in &mut self.hosts {
            let saw_full_disk = h.saw_full_disk;
            let Some(status) = h.restart_if_exited(&self.tandem) else { continue };
            let t = self.t0.elapsed().as_millis() as u64;
            println!("[{t:>7} ms]   {}'s agent exited ({status}): started again, as its supervisor would", h.name);
            self.exits.push(Exit { t_ms: t, node: h.name.clone(), status, disk_full: saw_full_disk });
            h.saw_full_disk = self.disk_full.as_ref() == Some(&h.name);
        }
    }
}

impl Run {
    /// Every agent's end on its own but after running on a full disk.
    fn exit_violations(&self) -> Vec<Violation> {
        let unexpected = self.exits.iter().filter(|e| !e.disk_full);
        unexpected
            .map(|e| Violation {
                kind: "agent exited".into(),
                t_ms: e.t_ms,
                detail: format!("{}'s agent ended on its own ({}); see its agent.log", e.node, e.status),
            })
            .collect()
    }
}

/// Whether a cluster view (`GET /v1/cluster`) shows all `hosts` members
/// online, heard on every path (a fault on one path must not meet the
/// other one still down), at least three of them voting.
fn members_healthy(c: &Value, hosts: usize) -> bool {
    let members = c["members"].as_array().cloned().unwrap_or_default();
    let all_paths = members.iter().all(|m| m["paths"].as_array().is_some_and(|p| p.iter().all(|p| p["up"] == true)));
    members.len() == hosts
        && members.iter().all(|m| m["state"] == "online")
        && all_paths
        && members.iter().filter(|m| m["role"] == "voter" || m["role"] == "witness").count() >= 3
}

/// An agent's end on its own.
struct Exit {
    t_ms: u64,
    node: String,
    status: std::process::ExitStatus,
    /// It had run on a full data disk.
    disk_full: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem_testkit::api::install_crypto();
    let args = Args::parse();
    match run(args).await {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("tandem-chaos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<usize> {
    if !is_root() {
        bail!("needs root (network namespaces, one per node)");
    }
    if args.quiet && args.duration.is_none() {
        bail!("--quiet needs --duration (a quiet run has no rounds)");
    }
    if args.quiet && args.workload != Workload::Standard {
        bail!("--quiet runs the standard workload only");
    }
    let tandem = match args.tandem.clone() {
        Some(t) => t,
        None => std::env::current_exe()?.with_file_name("tandem"),
    };
    if !tandem.exists() {
        bail!("no tandem binary at {} (build it, or pass --tandem)", tandem.display());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    if args.clusters {
        if args.workload != Workload::Standard || args.profile != Profile::Default {
            bail!("--clusters runs its own workload (a group bound to the ticket per site) with the default profile");
        }
        return clusters::run(&args, tandem, seed).await;
    }
    let layout = if args.sites { "two sites and a witness" } else { "one site" };
    println!("tandem-chaos: seed {seed}, {} nodes, {layout}, {} heartbeat paths", args.nodes, args.paths);
    let tmp = tempfile::tempdir()?;
    let mut topo = Topology::new(args.sites)?;
    let mut hosts = Vec::new();
    for i in 1..=args.nodes {
        // With sites: the last node is the witness, the others half and half.
        let site = match args.sites {
            false => Site::A,
            true if i == args.nodes => Site::Witness,
            true if i <= args.nodes / 2 => Site::A,
            true => Site::B,
        };
        let ns = topo.host(i, site)?;
        let dir = tmp.path().join(format!("n{i}"));
        // A data directory that can fill up (the DiskFull fault).
        let mib = match args.workload {
            Workload::Standard => DATA_DIR_MIB,
            Workload::Postgres => bank::DATA_DIR_MIB,
        };
        topo.small_fs(&dir.join("data"), mib)?;
        let addrs = topo.addrs(i);
        let quoted: Vec<String> = addrs.iter().take(args.paths.into()).map(|a| format!("\"{a}\"")).collect();
        let cfg = format!(
            "name = \"n{i}\"\ndata_dir = \"{}\"\naddresses = [{}]\nport = 7401\nsite = \"{}\"\nwitness = {}\n",
            dir.join("data").display(),
            quoted.join(", "),
            site.name(),
            site == Site::Witness,
        ) + match args.profile {
            Profile::Default => "",
            Profile::Fast => FAST_PROFILE,
        };
        std::fs::write(dir.join("node.toml"), cfg)?;
        let addr = addrs[0].clone();
        hosts.push(Host {
            name: format!("n{i}"),
            ns,
            addr,
            addrs,
            site,
            dir,
            child: None,
            sessions: Vec::new(),
            saw_full_disk: false,
        });
    }
    topo.route_sites()?;
    // Replaced by an HTTPS client with the admin token once the cluster forms.
    let client = reqwest::Client::builder().no_proxy().build()?;
    let (groups, volumes) = match args.workload {
        Workload::Standard => (vec!["chaos", ASYNC_GROUP], vec![VOLUME, ASYNC_VOLUME]),
        Workload::Postgres => (vec![bank::GROUP], vec![bank::VOLUME]),
    };
    let client_path = match args.workload {
        Workload::Standard => None,
        Workload::Postgres => Some(0),
    };
    let mut run = Run {
        hosts,
        groups,
        volumes,
        client_path,
        path_down: None,
        client,
        tandem,
        exits: Vec::new(),
        disk_full: None,
        t0: Instant::now(),
        topo,
    };
    for h in &mut run.hosts {
        h.start(&run.tandem)?;
    }
    let interrupted = interrupt_flag()?;
    form(&mut run).await?;
    if args.workload == Workload::Postgres {
        return bank::run(&args, run, tmp, seed, interrupted).await;
    }

    let events = tmp.path().join("events");
    let script = format!(
        "echo \"start $TANDEM_NODE $TANDEM_EPOCH $$\" >> {e}; trap 'exit 0' TERM; while :; do sleep 0.05; done",
        e = events.display()
    );
    let nodes: Vec<String> = run.hosts.iter().filter(|h| h.site != Site::Witness).map(|h| h.name.clone()).collect();
    // The group's data lives on a synchronously replicated volume (a replica
    // on up to three nodes), the service after it. A second group holds an
    // asynchronously replicated volume whose secondaries may take over
    // (`async_failover`): its losses are measured.
    let replicas = nodes.len().min(3);
    let rpo_group = json!({
        "resources": [{"name": ASYNC_VOLUME, "type": "volume", "size": "16MiB", "mode": "async", "replicas": replicas, "async_failover": true}],
        "nodes": nodes,
    });
    let url = format!("{}/v1/groups/{ASYNC_GROUP}", run.hosts[0].url());
    let resp = run.client.put(&url).json(&rpo_group).timeout(Duration::from_secs(10)).send().await?;
    if !resp.status().is_success() {
        bail!("the group was not accepted: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    let group = json!({
        "resources": [
            {"name": VOLUME, "type": "volume", "size": "16MiB", "mode": "sync", "replicas": replicas},
            {"name": "svc", "type": "process", "command": ["sh", "-c", script]},
        ],
        "nodes": nodes,
    });
    let url = format!("{}/v1/groups/chaos", run.hosts[0].url());
    let resp = run.client.put(&url).json(&group).timeout(Duration::from_secs(10)).send().await?;
    if !resp.status().is_success() {
        bail!("the group was not accepted: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    if !run.wait_healthy(Duration::from_secs(60)).await {
        let kept = tmp.keep();
        bail!(
            "the cluster did not become healthy: {} / {} (agent logs: {}/n*/agent.log)",
            run.any("/v1/cluster").await.unwrap_or_default(),
            run.any(&format!("/v1/volumes/{VOLUME}")).await.unwrap_or_default(),
            kept.display()
        );
    }

    if args.lossy_path > 0 {
        let pct = args.lossy_path;
        println!("           {pct} % of the packets on every host's eth1 dropped at random, both ways");
        let rules = format!(
            "table inet chaoslossy {{\n chain input {{ type filter hook input priority 0; policy accept; iifname \"eth1\" numgen random mod 100 < {pct} drop; }}\n chain output {{ type filter hook output priority 0; policy accept; oifname \"eth1\" numgen random mod 100 < {pct} drop; }}\n}}\n"
        );
        for h in &run.hosts {
            nft(&h.ns, Some(&rules), &["-f", "-"])?;
        }
    }
    // The sampler runs on its own thread for the whole run.
    let t0 = Instant::now();
    run.t0 = t0;
    let samples: Arc<Mutex<Vec<Sample>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop, events) = (samples.clone(), stop.clone(), events.clone());
        std::thread::spawn(move || {
            let mut known = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let s = sample(&events, t0, &mut known);
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                std::thread::sleep(Duration::from_millis(10));
            }
            known.into_iter().map(|(c, _)| c).collect::<Vec<Copy>>()
        })
    };

    // The control-plane workload: two clients write unique values to one
    // register (an attribute of n1) and read it back, through any node.
    let history: Arc<Mutex<Vec<register::Op>>> = Default::default();
    let mut clients = Vec::new();
    for client in 0..2u32 {
        let (history, stop, client_http) = (history.clone(), stop.clone(), run.client.clone());
        let urls: Vec<String> = run.hosts.iter().map(|h| h.url()).collect();
        let mut rng = Rng(seed.wrapping_add(client as u64 + 1).max(1));
        clients.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let url = &urls[rng.below(urls.len() as u64) as usize];
                let invoke_ms = t0.elapsed().as_millis() as u64;
                let op = if rng.below(2) == 0 {
                    seq += 1;
                    let v = format!("c{client}-{seq}");
                    let target = format!("{url}/v1/nodes/n1/attributes/chaos-register");
                    let r = client_http
                        .put(&target)
                        .json(&json!({"value": v}))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    // Some(answer): it happened; Some(None): it may have;
                    // None: it did not.
                    let outcome = match r {
                        Ok(resp) if resp.status().is_success() => Some(Some(t0.elapsed().as_millis() as u64)),
                        Ok(resp) => {
                            // Refused before anything was proposed: a 4xx,
                            // or a node that is no member. (No leader, 503
                            // TND-1202, can come from a leader that lost its
                            // office after appending: unknown.)
                            let status = resp.status();
                            let code =
                                resp.json::<Value>().await.ok().and_then(|b| b["code"].as_str().map(str::to_string));
                            let not_applied = status.is_client_error() || code.as_deref() == Some("TND-1200");
                            (!not_applied).then_some(None)
                        }
                        // Never sent.
                        Err(e) if e.is_connect() => None,
                        // Sent, no answer.
                        Err(_) => Some(None),
                    };
                    outcome.map(|answer_ms| register::Op {
                        client,
                        kind: register::Kind::Write(v),
                        invoke_ms,
                        answer_ms,
                    })
                } else {
                    let r = get(&client_http, &format!("{url}/v1/nodes/n1")).await;
                    r.map(|node| register::Op {
                        client,
                        kind: register::Kind::Read(node["attributes"]["chaos-register"].as_str().map(str::to_string)),
                        invoke_ms,
                        answer_ms: Some(t0.elapsed().as_millis() as u64),
                    })
                };
                if let Some(op) = op {
                    history.lock().unwrap_or_else(|e| e.into_inner()).push(op);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // The data-plane workload: one client per volume writes and reads
    // checksummed blocks through the primary's NBD export, following it.
    let data_ops: Arc<Mutex<Vec<blocks::Op>>> = Default::default();
    let async_ops: Arc<Mutex<Vec<blocks::Op>>> = Default::default();
    let mut data_clients = Vec::new();
    for (k, (volume, ops)) in [(VOLUME, &data_ops), (ASYNC_VOLUME, &async_ops)].into_iter().enumerate() {
        let (ops, stop, http_client) = (ops.clone(), stop.clone(), run.client.clone());
        let urls: Vec<String> = run.hosts.iter().map(|h| h.url()).collect();
        let mut rng = Rng(seed.wrapping_add(101 + k as u64).max(1));
        data_clients.push(tokio::spawn(async move {
            data_workload(&http_client, &urls, volume, &mut rng, t0, &stop, &ops).await
        }));
    }

    let mut rng = Rng(seed.max(1));
    let kinds = chosen_kinds(&args, fault_kinds(args.sites))?;
    let mut timeline = Vec::new();
    let mut extra = Vec::new();
    let mut round = 0u32;
    let deadline = args.duration.map(|d| t0 + Duration::from_secs(d));
    if let (true, Some(until)) = (args.quiet, deadline) {
        extra.extend(quiet_run(&mut run, until, &interrupted).await);
    }
    while !args.quiet && !interrupted.load(Ordering::SeqCst) {
        match deadline {
            Some(d) if Instant::now() >= d => break,
            None if round >= args.rounds => break,
            _ => {}
        }
        let fault = pick_fault(&kinds, round, &mut rng);
        let (entry, found) = fault_round(&mut run, round, fault, &mut rng, t0).await?;
        timeline.push(entry);
        extra.extend(found);
        round += 1;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    let (mut switches, mut breaks) = (Vec::new(), Vec::new());
    for c in data_clients {
        let (s, b) = c.await.unwrap_or_default();
        switches.push(s);
        breaks.push(b);
    }
    // Healed: every block is read once more through the current primary.
    if run.wait_healthy(Duration::from_secs(60)).await {
        let urls: Vec<String> = run.hosts.iter().map(|h| h.url()).collect();
        read_all(&run.client, &urls, VOLUME, t0, &data_ops).await;
        read_all(&run.client, &urls, ASYNC_VOLUME, t0, &async_ops).await;
    }
    let starts = sampler.join().unwrap_or_default();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let mut verdict = checker::check(&samples, &starts);
    verdict.violations.extend(extra);
    verdict.violations.extend(run.exit_violations());
    let mut ops = std::mem::take(&mut *history.lock().unwrap_or_else(|e| e.into_inner()));
    ops.sort_by_key(|o| o.invoke_ms);
    let register_outcome = register::check(&ops);
    match &register_outcome {
        register::Outcome::Violation(why) => verdict.violations.push(Violation {
            kind: "register not linearizable".into(),
            t_ms: 0,
            detail: why.clone(),
        }),
        register::Outcome::Linearizable => {}
    }
    let unknown = ops.iter().filter(|o| o.answer_ms.is_none()).count();
    let data = std::mem::take(&mut *data_ops.lock().unwrap_or_else(|e| e.into_inner()));
    for why in blocks::check(&data) {
        verdict.violations.push(Violation { kind: "acknowledged write lost or reverted".into(), t_ms: 0, detail: why });
    }
    let data_writes = data.iter().filter(|o| matches!(o, blocks::Op::Write { .. })).count();
    let data_acked = data.iter().filter(|o| matches!(o, blocks::Op::Write { answer_ms: Some(_), .. })).count();
    let data_reads = data.len() - data_writes;
    // The asynchronous volume: losses are measured (RPO), not violations.
    let async_data = std::mem::take(&mut *async_ops.lock().unwrap_or_else(|e| e.into_inner()));
    let rpo = blocks::rpo(&async_data, breaks.get(1).map(Vec::as_slice).unwrap_or_default());
    for why in &rpo.violations {
        verdict.violations.push(Violation { kind: "async volume block broken".into(), t_ms: 0, detail: why.clone() });
    }
    let async_writes = async_data.iter().filter(|o| matches!(o, blocks::Op::Write { .. })).count();
    let async_acked = async_data.iter().filter(|o| matches!(o, blocks::Op::Write { answer_ms: Some(_), .. })).count();
    let rpo_pct = |p| checker::percentile(&rpo.rpo_ms, p);

    let downtimes: Vec<u64> = verdict.outages.iter().map(|(_, d)| *d).collect();
    let pct = |p| checker::percentile(&downtimes, p);
    let failovers = starts.windows(2).filter(|w| w[0].node != w[1].node).count();
    // Each outage belongs to the last fault injected before it began.
    let mut by_fault: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (start, len) in &verdict.outages {
        let kind = timeline
            .iter()
            .rev()
            .find(|f| f["t_ms"].as_u64().is_some_and(|t| t <= *start))
            .and_then(|f| f["fault"].as_str())
            .unwrap_or("none");
        by_fault.entry(kind.to_string()).or_default().push(*len);
    }
    let per_fault: serde_json::Map<String, Value> = by_fault
        .iter()
        .map(|(k, v)| {
            let p = |q| checker::percentile(v, q);
            (k.clone(), json!({"count": v.len(), "p50": p(50), "p99": p(99), "max": v.iter().max()}))
        })
        .collect();
    let report = json!({
        "seed": seed,
        "nodes": run.hosts.len(),
        "rounds": round,
        "faults": timeline,
        "workloads": {
            "resources": {"starts": starts.len(), "samples": samples.len()},
            "register": {"operations": ops.len(), "unknown": unknown, "outcome": format!("{register_outcome:?}")},
            "data": {"writes": data_writes, "acknowledged": data_acked, "reads": data_reads, "primary_changes": switches.first()},
            "async_data": {
                "writes": async_writes,
                "acknowledged": async_acked,
                "reads": async_data.len() - async_writes,
                "primary_changes": switches.get(1),
                "lost_writes": rpo.lost_writes,
                "lost_bytes": rpo.lost_writes * blocks::BLOCK,
                "lost_unattributed": rpo.unattributed,
                "rpo_ms": {"p50": rpo_pct(50), "p99": rpo_pct(99), "max": rpo.rpo_ms.iter().max(), "all": rpo.rpo_ms},
                "lost": rpo.lost.iter().take(200).map(|(b, s, a, seen)| json!({"block": b, "seq": s, "acknowledged_ms": a, "seen_gone_ms": seen})).collect::<Vec<_>>(),
            },
        },
        "failovers": failovers,
        "agent_exits": run.exits.iter().map(|e| json!({"t_ms": e.t_ms, "node": e.node, "status": e.status.to_string(), "disk_full": e.disk_full})).collect::<Vec<_>>(),
        "downtime_ms": {"count": downtimes.len(), "p50": pct(50), "p99": pct(99), "max": downtimes.iter().max(), "all": downtimes, "by_fault": per_fault},
        "violations": verdict.violations,
    });
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;

    println!(
        "\nseed {seed}: {round} fault rounds, {} resource starts, {failovers} failovers, {} agent restarts by the supervisor",
        starts.len(),
        run.exits.len()
    );
    println!("register: {} operations ({unknown} with unknown outcome): {register_outcome}", ops.len());
    println!(
        "data: {data_writes} block writes ({data_acked} acknowledged), {data_reads} reads through the volume's NBD export, {} primary changes",
        switches.first().unwrap_or(&0)
    );
    println!(
        "async data: {async_writes} block writes ({async_acked} acknowledged, {} primary changes): {} lost; RPO (acknowledged before the primary stopped serving) p50 {} ms, p99 {} ms, max {} ms",
        switches.get(1).unwrap_or(&0),
        rpo.lost_writes,
        ms(rpo_pct(50)),
        ms(rpo_pct(99)),
        ms(rpo.rpo_ms.iter().max().copied())
    );
    println!(
        "outages (ms): {} — p50 {}, p99 {}, max {}",
        downtimes.len(),
        ms(pct(50)),
        ms(pct(99)),
        ms(downtimes.iter().max().copied())
    );
    for (kind, v) in &by_fault {
        let p = |q| ms(checker::percentile(v, q));
        println!("  after {kind}: {} outages, p50 {} ms, max {} ms", v.len(), p(50), ms(v.iter().max().copied()));
    }
    for v in &verdict.violations {
        println!("VIOLATION at {} ms: {}: {}", v.t_ms, v.kind, v.detail);
    }
    println!("report: {}", args.report.display());
    if args.keep || !verdict.violations.is_empty() {
        // The agents' logs stay for the post-mortem.
        let kept = tmp.keep();
        println!("agent logs: {}/n*/agent.log", kept.display());
    }
    println!("violations: {}", verdict.violations.len());
    drop(run);
    Ok(verdict.violations.len())
}

/// Set on Ctrl-C or SIGTERM: the loop ends, Drop removes everything.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        flag.store(true, Ordering::SeqCst);
    });
    Ok(interrupted)
}

/// The fault kinds of this run: `base` narrowed by --faults and --paths.
fn chosen_kinds(args: &Args, base: Vec<Fault>) -> anyhow::Result<Vec<Fault>> {
    let mut kinds = narrow(&args.faults, base)?;
    if args.paths < 2 {
        if kinds == [Fault::PathDown] {
            bail!("--faults PathDown needs two paths (--paths 2)");
        }
        kinds.retain(|k| *k != Fault::PathDown);
    }
    Ok(kinds)
}

/// `kinds` narrowed to those `--faults` names (by their Debug names); all
/// of them when it names none.
fn narrow<K: std::fmt::Debug>(wanted: &[String], mut kinds: Vec<K>) -> anyhow::Result<Vec<K>> {
    if !wanted.is_empty() {
        let known: Vec<String> = kinds.iter().map(|k| format!("{k:?}")).collect();
        if let Some(bad) = wanted.iter().find(|f| !known.contains(f)) {
            bail!("--faults: no fault kind {bad:?} here; known: {}", known.join(","));
        }
        kinds.retain(|k| wanted.contains(&format!("{k:?}")));
    }
    Ok(kinds)
}

/// Round `round`'s fault: a fixed-seed short run covers every kind first,
/// then draws.
fn pick_fault<K: std::marker::Copy>(kinds: &[K], round: u32, rng: &mut Rng) -> K {
    if (round as usize) < kinds.len() {
        kinds[round as usize]
    } else {
        kinds[rng.below(kinds.len() as u64) as usize]
    }
}

/// One fault round: aims `fault` (two in three at the node running a
/// group), injects and heals it, waits until the cluster is healthy again
/// and checks that a fault that must move nothing moved nothing. Returns
/// the round's timeline entry and the violations it revealed.
async fn fault_round(
    run: &mut Run,
    round: u32,
    fault: Fault,
    rng: &mut Rng,
    t0: Instant,
) -> anyhow::Result<(Value, Vec<Violation>)> {
    let mut found = Vec::new();
    // Two faults in three hit the node running the group: those make
    // failovers; the others test that nothing moves needlessly.
    let mut before = Vec::new();
    for group in &run.groups {
        before.push(run.any(&format!("/v1/groups/{group}")).await);
    }
    // With a second group (the asynchronous volume's), one fault in four
    // aims at it instead (a failover there is what loses its writes).
    let aimed = match before.len() > 1 && rng.below(4) == 0 {
        true => before[1].clone(),
        false => before.first().cloned().flatten(),
    };
    let holder = aimed.as_ref().and_then(|g| g["node"].as_str().map(str::to_string));
    let holder = holder.and_then(|n| run.hosts.iter().position(|h| h.name == n));
    let i = match holder {
        Some(h) if rng.below(3) < 2 => h,
        _ => rng.below(run.hosts.len() as u64) as usize,
    };
    // A cut between sites is held longer: long enough for the group to
    // move across it.
    let hold = match fault {
        Fault::SiteCut => Duration::from_millis(3000 + rng.below(5000)),
        _ => Duration::from_millis(1000 + rng.below(2000)),
    };
    let t = t0.elapsed().as_millis() as u64;
    let name = run.hosts[i].name.clone();
    println!("[{t:>7} ms] round {round}: {fault:?} on {name} for {} ms", hold.as_millis());
    let mut entry = json!({"t_ms": t, "round": round, "fault": format!("{fault:?}"), "node": name, "held_ms": hold.as_millis() as u64});
    run.path_down = None;
    if let Some(detail) = inject(run, round, i, fault, hold, rng).await? {
        found.push(Violation { kind: "verify".into(), t_ms: t0.elapsed().as_millis() as u64, detail });
    }
    let healing = Instant::now();
    let healthy = run.wait_healthy(Duration::from_secs(60)).await;
    // How long the cluster took to be whole again after the heal.
    entry["recovered_ms"] = json!(healing.elapsed().as_millis() as u64);
    // One path lost, another up, or a slow link: the node is still
    // heard, nothing moves (no group changes node or epoch).
    // Unless the path lost is the one the group's clients come by, on the
    // group's node: then it must move.
    let clients_cut = fault == Fault::PathDown
        && run.client_path.is_some()
        && run.client_path == run.path_down
        && holder_of_first(&before) == Some(name.as_str());
    if clients_cut {
        println!("           the path {name} lost carries its group's clients: the group may move");
    }
    if let (Some(what), true, false) = (fault.moves_nothing(), healthy, clients_cut) {
        for (group, before) in run.groups.iter().zip(&before) {
            // No answer is no view, not a move: ask again for a while.
            let mut after = run.any(&format!("/v1/groups/{group}")).await;
            for _ in 0..10 {
                if after.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                after = run.any(&format!("/v1/groups/{group}")).await;
            }
            let at = |g: &Option<Value>| g.as_ref().map(|g| (g["node"].clone(), g["epoch"].clone()));
            if at(before) != at(&after) {
                found.push(Violation {
                    kind: "needless failover".into(),
                    t_ms: t0.elapsed().as_millis() as u64,
                    detail: format!("group {group} moved when {name} {what}: {} → {}", placed(before), placed(&after)),
                });
            }
        }
    }
    if !healthy {
        found.push(Violation {
            kind: "no recovery".into(),
            t_ms: t0.elapsed().as_millis() as u64,
            detail: format!("not healthy 60 s after healing {fault:?} on {name}"),
        });
    }
    Ok((entry, found))
}

/// `--quiet`: nothing injected until `until`; every change of a group's
/// node or epoch (looked at every second) is a false failover.
async fn quiet_run(run: &mut Run, until: Instant, interrupted: &AtomicBool) -> Vec<Violation> {
    let placed = |g: &Value| (g["node"].clone(), g["epoch"].clone());
    let mut found = Vec::new();
    let mut last: Vec<Option<(Value, Value)>> = Vec::new();
    for group in run.groups.clone() {
        last.push(run.any(&format!("/v1/groups/{group}")).await.as_ref().map(placed));
    }
    while Instant::now() < until && !interrupted.load(Ordering::SeqCst) {
        run.hold(QUIET_LOOK.min(until - Instant::now())).await;
        for (k, group) in run.groups.clone().into_iter().enumerate() {
            let Some(now) = run.any(&format!("/v1/groups/{group}")).await.as_ref().map(placed) else { continue };
            if let Some(before) = last[k].as_ref().filter(|b| **b != now) {
                let t = run.t0.elapsed().as_millis() as u64;
                println!("[{t:>7} ms] false failover: {group} {before:?} → {now:?}");
                found.push(Violation {
                    kind: "false failover".into(),
                    t_ms: t,
                    detail: format!("group {group} moved with no fault: {before:?} → {now:?}"),
                });
            }
            last[k] = Some(now);
        }
    }
    found
}

/// How often a quiet run looks at the groups.
const QUIET_LOOK: Duration = Duration::from_secs(1);

/// The node the first group ran on, from the views taken before a fault.
fn holder_of_first(before: &[Option<Value>]) -> Option<&str> {
    before.first()?.as_ref()?["node"].as_str()
}

/// A figure for the summary: the number, or `-` when there is none.
fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Where a group runs, for a person: "n2 at epoch 7" (or "nowhere").
fn placed(g: &Option<Value>) -> String {
    match g.as_ref().map(|g| (&g["node"], &g["epoch"])) {
        Some((Value::String(node), epoch)) => format!("{node} at epoch {epoch}"),
        Some((_, epoch)) if !epoch.is_null() => format!("nowhere at epoch {epoch}"),
        _ => "unknown (no node answered)".into(),
    }
}

/// The chaos group's synchronously replicated volume.
const VOLUME: &str = "chaosvol";
/// An asynchronously replicated volume (data loss measured, not forbidden)
/// and the group that holds it.
const ASYNC_VOLUME: &str = "chaosasync";
const ASYNC_GROUP: &str = "rpo";
/// How long the harness waits for one answer to a request it retries.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(12);
/// Each host's data directory is a tmpfs this large (MiB).
const DATA_DIR_MIB: u32 = 160;
/// Blocks the data workload writes (the first 1 MiB of the volume).
const DATA_BLOCKS: u64 = 256;

/// The primary's NBD socket, from the volume's view on any node.
async fn nbd_socket(client: &reqwest::Client, urls: &[String], volume: &str) -> Option<PathBuf> {
    for u in urls {
        if let Some(v) = get(client, &format!("{u}/v1/volumes/{volume}")).await {
            let uri = v["nbd"].as_str()?.split_whitespace().next()?.to_string();
            let path = uri.split("socket=").nth(1)?;
            return Some(PathBuf::from(percent_decode(path)));
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes (two in three) and reads random blocks until `stop`, reconnecting
/// to whichever node is primary after any error.
async fn data_workload(
    http_client: &reqwest::Client,
    urls: &[String],
    volume: &str,
    rng: &mut Rng,
    t0: Instant,
    stop: &AtomicBool,
    ops: &Mutex<Vec<blocks::Op>>,
) -> (u64, Vec<u64>) {
    let mut seq = 0u64;
    let now = || t0.elapsed().as_millis() as u64;
    // How often the primary changed under the client, and when requests
    // to one began failing (it stopped serving).
    let (mut last, mut switches, mut breaks) = (None, 0u64, Vec::new());
    while !stop.load(Ordering::SeqCst) {
        let Some(socket) = nbd_socket(http_client, urls, volume).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(mut c) = blocks::Client::connect(&socket, volume).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if last.as_ref().is_some_and(|l| *l != socket) {
            switches += 1;
        }
        last = Some(socket);
        while !stop.load(Ordering::SeqCst) {
            let block = rng.below(DATA_BLOCKS);
            let invoke_ms = now();
            let op = if rng.below(3) == 0 {
                match c.read_block(block).await {
                    Ok(b) => {
                        blocks::Op::Read { block, got: blocks::decode_block(block, &b), invoke_ms, answer_ms: now() }
                    }
                    Err(_) => {
                        breaks.push(invoke_ms);
                        break;
                    }
                }
            } else {
                seq += 1;
                let r = c.write_block(block, seq).await;
                let answer_ms = r.is_ok().then(now);
                ops.lock().unwrap_or_else(|e| e.into_inner()).push(blocks::Op::Write {
                    block,
                    seq,
                    invoke_ms,
                    answer_ms,
                });
                if r.is_err() {
                    breaks.push(invoke_ms);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (switches, breaks)
}

/// Reads every block once through the current primary.
async fn read_all(
    http_client: &reqwest::Client,
    urls: &[String],
    volume: &str,
    t0: Instant,
    ops: &Mutex<Vec<blocks::Op>>,
) {
    let now = || t0.elapsed().as_millis() as u64;
    for _ in 0..10 {
        let Some(socket) = nbd_socket(http_client, urls, volume).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(mut c) = blocks::Client::connect(&socket, volume).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut read = Vec::new();
        for block in 0..DATA_BLOCKS {
            let invoke_ms = now();
            match c.read_block(block).await {
                Ok(b) => read.push(blocks::Op::Read {
                    block,
                    got: blocks::decode_block(block, &b),
                    invoke_ms,
                    answer_ms: now(),
                }),
                Err(_) => break,
            }
        }
        if read.len() as u64 == DATA_BLOCKS {
            ops.lock().unwrap_or_else(|e| e.into_inner()).extend(read);
            c.close().await;
            return;
        }
    }
}

/// Bootstraps the cluster on n1 and joins the others through it; from
/// then on the run's client speaks HTTPS to the cluster CA with the admin
/// token.
async fn form(run: &mut Run) -> anyhow::Result<()> {
    run.client = form_cluster(&run.hosts, "chaos").await?;
    Ok(())
}

/// Bootstraps a cluster named `cluster_id` on the first of `hosts` and
/// joins the others through it; returns an HTTPS client trusting that
/// cluster's CA, with its admin token.
async fn form_cluster(hosts: &[Host], cluster_id: &str) -> anyhow::Result<reqwest::Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for h in hosts {
        while tandem_testkit::api::local_call(&h.socket(), reqwest::Method::GET, "/healthz", Value::Null).await.0 != 200
        {
            if Instant::now() > deadline {
                bail!("{} did not come up", h.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let first = hosts.first().context("a cluster of no host")?;
    let first_url = first.url();
    // Once each, no retry: a fresh cluster on a quiet network takes them,
    // and a second init or join would be refused for the first's sake.
    let creds = tandem_testkit::api::init(&first.socket(), cluster_id).await.map_err(|e| anyhow::anyhow!(e))?;
    tandem_testkit::api::install_crypto();
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", creds.token).parse()?);
    let client = reqwest::Client::builder()
        .no_proxy()
        .default_headers(auth)
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(creds.ca_pem.as_bytes())?)
        .build()?;
    for h in hosts {
        tandem_testkit::api::register(&h.url(), &creds);
    }
    for h in &hosts[1..] {
        let (st, v) = tandem_testkit::api::join(&h.socket(), &first_url, &creds).await;
        if st != 200 {
            bail!("{} joining: {st} {v}", h.name);
        }
    }
    Ok(client)
}

/// Injects one fault and heals it; returns a violation the fault itself
/// revealed (a verify that missed corruption).
async fn inject(
    run: &mut Run,
    round: u32,
    i: usize,
    fault: Fault,
    hold: Duration,
    rng: &mut Rng,
) -> anyhow::Result<Option<String>> {
    let host_no = i as u8 + 1;
    // Every address of the other hosts, on every path.
    let others: Vec<String> =
        (0..run.hosts.len()).filter(|j| *j != i).flat_map(|j| run.hosts[j].addrs.clone()).collect();
    match fault {
        Fault::DoublePowerLoss => {
            let j = (i + 1) % run.hosts.len();
            run.hosts[i].power_off();
            run.hosts[j].power_off();
            tokio::time::sleep(hold).await;
            run.hosts[i].start(&run.tandem)?;
            run.hosts[j].start(&run.tandem)?;
        }
        Fault::Corrupt => return corrupt_and_verify(run, i, rng).await,
        Fault::OneWay => {
            let rules = format!(
                "table inet chaos {{\n chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {} }} drop; }}\n}}\n",
                others.join(", ")
            );
            nft(&run.hosts[i].ns, Some(&rules), &["-f", "-"])?;
            tokio::time::sleep(hold).await;
            nft(&run.hosts[i].ns, None, &["delete", "table", "inet", "chaos"])?;
        }
        Fault::Partition => {
            let n = run.hosts.len();
            let minority: Vec<usize> = if n >= 5 { vec![i, (i + 1) % n] } else { vec![i] };
            let majority: Vec<String> =
                (0..n).filter(|j| !minority.contains(j)).flat_map(|j| run.hosts[j].addrs.clone()).collect();
            for j in &minority {
                cut_off(&run.hosts[*j].ns, &majority)?;
            }
            tokio::time::sleep(hold).await;
            for j in &minority {
                heal_cut(&run.hosts[*j].ns)?;
            }
        }
        Fault::PowerLoss => {
            run.hosts[i].power_off();
            tokio::time::sleep(hold).await;
            run.hosts[i].start(&run.tandem)?;
        }
        Fault::AgentCrash => {
            run.hosts[i].kill_agent();
            tokio::time::sleep(Duration::from_millis(50)).await;
            run.hosts[i].start(&run.tandem)?;
            tokio::time::sleep(hold).await;
        }
        Fault::AgentDown => {
            run.hosts[i].kill_agent();
            tokio::time::sleep(hold).await;
            run.hosts[i].start(&run.tandem)?;
        }
        Fault::Pause => {
            run.hosts[i].signal(Signal::SIGSTOP);
            tokio::time::sleep(hold).await;
            run.hosts[i].signal(Signal::SIGCONT);
        }
        Fault::Isolate => {
            run.topo.set_link(host_no, None, false)?;
            tokio::time::sleep(hold).await;
            run.topo.set_link(host_no, None, true)?;
        }
        Fault::PathDown => {
            let path = rng.below(topology::PATHS as u64) as usize;
            println!("           path {path} (eth{path}) down");
            run.path_down = Some(path);
            run.topo.set_link(host_no, Some(path), false)?;
            tokio::time::sleep(hold).await;
            run.topo.set_link(host_no, Some(path), true)?;
        }
        Fault::SlowLink => {
            let mbit = [1, 5, 20][rng.below(3) as usize];
            println!("           {mbit} Mbit/s both ways");
            let devs: Vec<String> = (0..topology::PATHS).map(|p| format!("eth{p}")).collect();
            slow::set(&run.hosts[i].ns, &devs, Some(mbit))?;
            tokio::time::sleep(hold).await;
            slow::set(&run.hosts[i].ns, &devs, None)?;
        }
        Fault::SiteCut => {
            site_cut_setup(run, rng, round == 0).await?;
            let g = run.any(&format!("/v1/groups/{}", run.groups[0])).await.unwrap_or_default();
            let c = run.any("/v1/cluster").await.unwrap_or_default();
            let site_of = |n: &Value| {
                run.hosts.iter().find(|h| Some(h.name.as_str()) == n.as_str()).map_or("-", |h| h.site.name())
            };
            println!(
                "           group on {} (site {}), leader {} (site {})",
                g["node"].as_str().unwrap_or("-"),
                site_of(&g["node"]),
                c["leader"].as_str().unwrap_or("-"),
                site_of(&c["leader"])
            );
            run.topo.set_site_link(false)?;
            tokio::time::sleep(hold).await;
            run.topo.set_site_link(true)?;
        }
        Fault::DiskFull => {
            let fill = run.hosts[i].dir.join("data").join("chaos-fill");
            let filled = fill_up(&fill);
            println!("           {} MiB written to fill {}'s data directory", filled >> 20, run.hosts[i].name);
            run.disk_full = Some(run.hosts[i].name.clone());
            run.hosts[i].saw_full_disk = true;
            run.hold(hold).await;
            std::fs::remove_file(&fill).with_context(|| format!("removing {}", fill.display()))?;
            run.disk_full = None;
        }
    }
    Ok(None)
}

/// Before a site cut: a leader in a site, not the witness (its agent is
/// restarted if it leads), and, the first time and then one time in two,
/// the group in the other site: the case where the leader loses sight of
/// the group's node while the witness still hears it.
async fn site_cut_setup(run: &mut Run, rng: &mut Rng, first: bool) -> anyhow::Result<()> {
    let leader_of = |c: &Value| c["leader"].as_str().map(str::to_string);
    let site_of = |run: &Run, n: &str| run.hosts.iter().find(|h| h.name == n).map(|h| h.site);
    let Some(leader) = run.any("/v1/cluster").await.as_ref().and_then(leader_of) else { return Ok(()) };
    let mut leader = Some(leader);
    if let Some(w) = run.hosts.iter().position(|h| h.site == Site::Witness && leader.as_deref() == Some(&h.name)) {
        run.hosts[w].kill_agent();
        let deadline = Instant::now() + Duration::from_secs(10);
        leader = None;
        while Instant::now() < deadline && leader.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            leader = run.any("/v1/cluster").await.as_ref().and_then(leader_of);
        }
        run.hosts[w].start(&run.tandem)?;
        if !run.wait_healthy(Duration::from_secs(30)).await {
            return Ok(());
        }
    }
    let Some(leader) = leader else { return Ok(()) };
    let Some(home) = site_of(run, &leader) else { return Ok(()) };
    if rng.below(2) == 0 || first {
        let away = run.hosts.iter().find(|h| h.site != home && h.site != Site::Witness).map(|h| h.name.clone());
        let group = run.groups[0];
        let g = run.any(&format!("/v1/groups/{group}")).await.unwrap_or_default();
        if let Some(to) = away.filter(|n| g["node"].as_str() != Some(n)) {
            let deadline = Instant::now() + Duration::from_secs(20);
            let body = json!({"to": to});
            match run.post_until(&format!("/v1/groups/{group}/move"), &body, Via::AnyNode, &[], deadline).await {
                Ok(t) if t.tries > 1 => {
                    println!("           move to {to} accepted by {} at try {} (retried: {})", t.node, t.tries, t.last)
                }
                Ok(_) => {}
                Err(e) => {
                    println!("           moving the group to {to}: {e}; the cut goes ahead with it where it is");
                    return Ok(());
                }
            }
            let mut moved = false;
            while Instant::now() < deadline && !moved {
                let g = run.any(&format!("/v1/groups/{group}")).await.unwrap_or_default();
                moved = g["node"].as_str() == Some(&to) && run.healthy().await;
                if !moved {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if !moved {
                println!("           the group was not running on {to}, healthy, 20 s after the move was accepted");
            }
        }
    }
    Ok(())
}

/// Writes zeros to `path` until the file system is full; returns the bytes
/// written.
fn fill_up(path: &Path) -> u64 {
    use std::io::Write as _;
    let Ok(mut f) = std::fs::File::create(path) else { return 0 };
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    // The last partial pages too.
    while let Ok(n) = f.write(&chunk[..4096]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

/// Drops, by nftables rules in host namespace `ns` (table `inet chaos`; its
/// links stay up), everything it sends to or hears from `addrs`.
fn cut_off(ns: &str, addrs: &[String]) -> anyhow::Result<()> {
    let set = addrs.join(", ");
    let rules = format!(
        "table inet chaos {{\n chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n \
         chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n}}\n"
    );
    nft(ns, Some(&rules), &["-f", "-"])
}

/// Undoes `cut_off` in `ns`.
fn heal_cut(ns: &str) -> anyhow::Result<()> {
    nft(ns, None, &["delete", "table", "inet", "chaos"])
}

/// Runs `nft` in a host's namespace (stdin: `input`).
fn nft(ns: &str, input: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("nft (apt-get install nftables)")?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft {args:?} in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Flips a byte in 1 to 4 blocks (past the data workload's region) of a
/// secondary's backing file, runs an online verify, and checks it found and
/// repaired exactly those blocks. Returns the violation, if any; an error
/// only when the harness itself could not do its part (the file).
async fn corrupt_and_verify(run: &Run, i: usize, rng: &mut Rng) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let skip = |why: String| {
        println!("           nothing corrupted: {why}");
        Ok(None)
    };
    let Some(v) = run.any(&format!("/v1/volumes/{VOLUME}")).await else {
        return skip(format!("no node answered GET /v1/volumes/{VOLUME}"));
    };
    let Some(primary) = v["primary"].as_str().map(str::to_string) else {
        return skip(format!("{VOLUME} has no primary"));
    };
    let replicas: Vec<String> = v["replicas"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["node"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let secondaries: Vec<&String> = replicas.iter().filter(|n| **n != primary).collect();
    let Some(victim) = secondaries.iter().find(|n| **n == &run.hosts[i].name).or(secondaries.first()) else {
        return skip(format!("{VOLUME} has no secondary"));
    };
    let victim = victim.to_string();
    let Some(host) = run.hosts.iter().find(|h| h.name == victim) else {
        return skip(format!("no host named {victim}"));
    };
    let path = host.dir.join("data").join("volumes").join(format!("{VOLUME}.img"));
    let blocks = 1 + rng.below(4);
    let mut flipped = std::collections::BTreeSet::new();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {} to corrupt it", path.display()))?;
    while (flipped.len() as u64) < blocks {
        flipped.insert(DATA_BLOCKS + rng.below(4096 - DATA_BLOCKS));
    }
    // Each flipped byte with its value before: a repair must bring it back.
    let mut before = Vec::new();
    for b in &flipped {
        let off = b * blocks::BLOCK as u64 + rng.below(blocks::BLOCK as u64);
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, off).with_context(|| format!("reading {} at {off}", path.display()))?;
        before.push((off, byte[0]));
        byte[0] ^= 0x5a;
        f.write_all_at(&byte, off).with_context(|| format!("writing {} at {off}", path.display()))?;
    }
    f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    println!("           flipped {} block(s) {:?} of {victim}'s backing file; verifying", flipped.len(), flipped);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut restarted = false;
    'start: loop {
        // The verify runs on the primary; a 503 (an election), a primary
        // that just moved or a node that did not answer is retried.
        let verify_path = format!("/v1/volumes/{VOLUME}/verify");
        let on = match run.post_until(&verify_path, &json!({}), Via::PrimaryOf(VOLUME), &["TND-1405"], deadline).await {
            Ok(t) if t.tries > 1 => {
                println!("           verify accepted by {} at try {} (retried: {})", t.node, t.tries, t.last);
                t.node
            }
            Ok(t) => t.node,
            Err(e) => return Ok(Some(format!("verify {e}"))),
        };
        if on == victim {
            // Its flipped blocks are now the reference the others are
            // compared with: nothing here can tell which copy was right.
            println!("           {victim}, the corrupted replica, became the primary: not checked");
            return Ok(None);
        }
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Some(v) = run.any(&format!("/v1/volumes/{VOLUME}")).await else { continue };
            match v["primary"].as_str() {
                // Moving: the new primary has not started yet.
                None => continue,
                Some(p) if p != on => {
                    // The report of the verify we started went with the old
                    // primary; the new one repairs from its own copy.
                    println!("           the primary moved from {on} to {p} during the verify: starting it again");
                    restarted = true;
                    continue 'start;
                }
                Some(_) => {}
            }
            let r = &v["verify"];
            match r["state"].as_str() {
                Some("done") => {
                    let found = r["found_blocks"][&victim].as_u64().unwrap_or(0);
                    let repaired = r["repaired_blocks"][&victim].as_u64().unwrap_or(0);
                    println!("           verify on {on}: found {found}, repaired {repaired} on {victim}");
                    // After a restart the first verify may have repaired
                    // some blocks already: only the bytes can tell.
                    if (!restarted && found != flipped.len() as u64) || repaired != found {
                        return Ok(Some(format!(
                            "verify found {found} and repaired {repaired} blocks on {victim}; {} were corrupted: {flipped:?}",
                            flipped.len()
                        )));
                    }
                    let mut wrong = Vec::new();
                    for (off, was) in &before {
                        let mut byte = [0u8; 1];
                        f.read_exact_at(&mut byte, *off).with_context(|| format!("reading {}", path.display()))?;
                        if byte[0] != *was {
                            wrong.push(*off);
                        }
                    }
                    if !wrong.is_empty() {
                        return Ok(Some(format!(
                            "verify reported done, but {victim}'s backing file still differs at byte offsets {wrong:?}"
                        )));
                    }
                    return Ok(None);
                }
                Some("failed") => return Ok(Some(format!("verify failed: {r}"))),
                _ => {}
            }
        }
        return Ok(Some(format!("verify accepted by {on} did not finish within 60 s")));
    }
}
