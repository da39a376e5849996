//! `--clusters`: the two-cluster topology of docs/dr.md. Site a and site b
//! are each a tandem cluster of their own (`--nodes` voters each, its own
//! CA and token), and `tandem arbitrator` runs on the topology's witness
//! host, which reaches both sites and keeps reaching them when the link
//! between them is cut. Each site defines a group bound to the ticket
//! (`"ticket": true`), a `sleep <marker>` process whose marker is unique to
//! the site and to the run, allowed on all of that site's nodes.
//!
//! The nemesis cuts the WAN, cuts a site off from the arbitrator or from
//! both others, kills the arbitrator, powers off the holding site's leader
//! or a whole site, partitions one node: one fault per round, from the
//! seed. Two samplers run all along: one scans the host's process table
//! (the namespaces share it) for the markers every 20 ms, one asks every
//! node of both sites `GET /v1/ticket` every 50 ms.
//!
//! Owns its hosts, the arbitrator's process, the samplers and this mode's
//! checker (`both_running`, `two_copies`, `both_holding`: pure). It must
//! never judge by timings: a violation is a property broken — both sites
//! running or holding at once, two copies in one site, no single site
//! running long after a heal, the ticket moving where the design keeps it
//! or kept where the design moves it — and every wait is a bound far beyond
//! the ticket's lease, never a measure of speed.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tandem_testkit::kill_session;
use tandem_testkit::sites::{Site, Topology};

use crate::checker::Violation;
use crate::{
    any_view, cut_off, form_cluster, get, heal_cut, members_healthy, ms, narrow, pick_fault, spawn_in_ns, Args, Host,
    Rng,
};

/// The ticket's timing on the three participants: short, so that a round
/// takes seconds; the margin above the nodes' fencing lease (500 ms), as
/// the agent checks at start.
const LEASE_MS: u64 = 3000;
const MARGIN_MS: u64 = 800;
const RENEW_MS: u64 = 500;
/// The ticket group's name on both sites.
const GROUP: &str = "svc";
const ARBITRATOR_PORT: u16 = 7409;
/// How long after a heal one site, and one only, must run its group again
/// (and both clusters be whole): a liveness bound, twenty leases.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);
/// How long a site cut off or powered off may keep the ticket before the
/// other one must have taken it and started its group.
const MOVE_WITHIN: Duration = Duration::from_secs(60);
const SCAN_EVERY: Duration = Duration::from_millis(20);
const POLL_EVERY: Duration = Duration::from_millis(50);

/// The faults of this mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteFault {
    /// The link between the sites down; both still reach the arbitrator.
    WanCut,
    /// One site cut off from the arbitrator (nftables on its hosts).
    ArbitratorCut,
    /// The arbitrator killed, started again after the hold.
    ArbitratorDown,
    /// One site cut off from both others (the other site and the arbitrator).
    WanOutage,
    /// Power loss of the holding site's leader.
    LeaderPowerLoss,
    /// Power loss of every host of one site, then all back.
    SitePowerLoss,
    /// One node cut off from every other host (its site, the other, the
    /// arbitrator).
    NodePartition,
}

const KINDS: [SiteFault; 7] = [
    SiteFault::WanCut,
    SiteFault::ArbitratorCut,
    SiteFault::ArbitratorDown,
    SiteFault::WanOutage,
    SiteFault::LeaderPowerLoss,
    SiteFault::SitePowerLoss,
    SiteFault::NodePartition,
];

/// What the ticket must do across a round, by the design (docs/dr.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The holder keeps two grantors: the other site never runs its group.
    Stay,
    /// The holder is cut off (or dark): the other site must take the ticket
    /// and, after the heal, keep it.
    Move,
    /// Either may hold afterwards (a leader change races the other site).
    Either,
}

impl SiteFault {
    /// `on_holder`: the fault hits the site that held the ticket.
    fn expect(self, on_holder: bool) -> Expect {
        match self {
            SiteFault::WanCut | SiteFault::ArbitratorCut | SiteFault::ArbitratorDown => Expect::Stay,
            SiteFault::WanOutage | SiteFault::SitePowerLoss if on_holder => Expect::Move,
            SiteFault::WanOutage | SiteFault::SitePowerLoss => Expect::Stay,
            SiteFault::LeaderPowerLoss | SiteFault::NodePartition => Expect::Either,
        }
    }
}

/// One of the two clusters.
struct SiteCluster {
    name: &'static str,
    hosts: Vec<Host>,
    /// HTTPS to this cluster's CA, with its admin token.
    client: reqwest::Client,
    /// The second word of its ticket group's command line (`sleep <marker>`).
    marker: String,
}

impl SiteCluster {
    /// A view from any of its nodes that runs an agent.
    async fn view(&self, path: &str) -> Option<Value> {
        any_view(&self.client, &self.hosts, path).await
    }

    async fn healthy(&self) -> bool {
        self.view("/v1/cluster").await.is_some_and(|c| members_healthy(&c, self.hosts.len()))
    }

    /// Whether one of its nodes says, as this site's leader, that it holds
    /// the ticket (with `all`: lent by all three grantors, the state a
    /// fault that leaves it two of them must start from; just after a
    /// heal, another grantor may still lend to the other site until that
    /// one is refused for this one and hands it back).
    async fn holds(&self, all: bool) -> bool {
        for h in &self.hosts {
            let Some(t) = get(&self.client, &format!("{}/v1/ticket", h.url())).await else { continue };
            let all_lend =
                t["grantors"].as_array().is_some_and(|g| g.len() == 3 && g.iter().all(|g| g["granted"] == true));
            if t["holds"] == true && (all_lend || !all) {
                return true;
            }
        }
        false
    }
}

/// `tandem arbitrator` on the witness host.
struct Arbitrator {
    ns: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Arbitrator {
    fn start(&mut self, tandem: &Path) -> anyhow::Result<()> {
        self.child = Some(spawn_in_ns(&self.ns, tandem, "arbitrator", &self.config, &self.log)?);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_session(c.id() as i32);
            let _ = c.wait();
        }
    }
}

impl Drop for Arbitrator {
    fn drop(&mut self) {
        self.kill();
    }
}

struct World {
    sites: [SiteCluster; 2],
    arb: Arbitrator,
    tandem: PathBuf,
    t0: Instant,
    /// Agents (and the arbitrator) that ended on their own, restarted as
    /// their supervisor would: each is a violation.
    exits: Vec<Violation>,
    /// The witness host's addresses (the arbitrator's).
    witness: Vec<String>,
    /// Dropped last: the processes die before their network.
    topo: Topology,
}

impl World {
    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Restarts what ended on its own.
    fn supervise(&mut self) -> anyhow::Result<()> {
        let t = self.now_ms();
        for site in &mut self.sites {
            for h in &mut site.hosts {
                if let Some(status) = h.restart_if_exited(&self.tandem) {
                    println!("[{t:>7} ms]   {}'s agent exited ({status}): started again", h.name);
                    self.exits.push(Violation {
                        kind: "agent exited".into(),
                        t_ms: t,
                        detail: format!("{}'s agent ended on its own ({status}); see its agent.log", h.name),
                    });
                }
            }
        }
        if let Some(status) = self.arb.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            println!("[{t:>7} ms]   the arbitrator exited ({status}): started again");
            self.exits.push(Violation {
                kind: "arbitrator exited".into(),
                t_ms: t,
                detail: format!("the arbitrator ended on its own ({status}); see arbitrator.log"),
            });
            self.arb.child = None;
            self.arb.start(&self.tandem)?;
        }
        Ok(())
    }

    /// Sleeps `d`, supervising meanwhile.
    async fn hold(&mut self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.supervise()?;
            tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(100))).await;
        }
        Ok(())
    }

    fn markers(&self) -> [String; 2] {
        [self.sites[0].marker.clone(), self.sites[1].marker.clone()]
    }

    /// Waits (supervising) until both clusters are whole and exactly one
    /// site runs exactly one copy of its group and holds the ticket (with
    /// `all`: lent by all three grantors); returns that site, or what was
    /// seen at the deadline.
    async fn settle(&mut self, within: Duration, all: bool) -> anyhow::Result<Result<usize, String>> {
        let deadline = Instant::now() + within;
        let markers = self.markers();
        loop {
            self.supervise()?;
            let copies = scan(&markers);
            let (ha, hb) = (self.sites[0].healthy().await, self.sites[1].healthy().await);
            let runner = match copies {
                [1, 0] => Some(0),
                [0, 1] => Some(1),
                _ => None,
            };
            let holds = match runner {
                Some(s) => self.sites[s].holds(all).await,
                None => false,
            };
            if let (Some(s), true, true, true) = (runner, ha, hb, holds) {
                // Still so after a look at the processes again.
                if scan(&markers) == copies {
                    return Ok(Ok(s));
                }
            }
            if Instant::now() >= deadline {
                return Ok(Err(format!(
                    "copies running a {} b {}, site a whole {ha}, site b whole {hb}, the runner holds it {holds}{}",
                    copies[0],
                    copies[1],
                    if all { " (from all three grantors)" } else { "" }
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Holds until site `other` runs its group (bounded by `MOVE_WITHIN`);
    /// returns how long after `since` it did.
    async fn until_runs(&mut self, other: usize, since: Instant) -> anyhow::Result<Option<u64>> {
        let markers = self.markers();
        while since.elapsed() < MOVE_WITHIN {
            self.supervise()?;
            if scan(&markers)[other] > 0 {
                return Ok(Some(since.elapsed().as_millis() as u64));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(None)
    }
}

/// How many processes `sleep <marker>` run per marker: one pass over the
/// host's process table (the namespaces share it). A zombie has no
/// command line, so a killed copy does not count.
fn scan(markers: &[String; 2]) -> [usize; 2] {
    let mut n = [0, 0];
    let Ok(dir) = std::fs::read_dir("/proc") else { return n };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let mut args = cmd.split(|b| *b == 0);
        let (Some(prog), Some(arg)) = (args.next(), args.next()) else { continue };
        if !prog.ends_with(b"sleep") {
            continue;
        }
        for (k, m) in markers.iter().enumerate() {
            if arg == m.as_bytes() {
                n[k] += 1;
            }
        }
    }
    n
}

/// A sample of the process table: copies of each site's group.
#[derive(Debug, Clone, Copy)]
struct Scan {
    t_ms: u64,
    copies: [usize; 2],
}

/// A span during which a site certainly believed it held the ticket: a
/// `GET /v1/ticket` sent at `sent` answered `holds` with `left_ms` at some
/// moment before `answered`, so the belief covered `answered` through
/// `sent + left_ms` (a slow answer only shortens the span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Belief {
    site: usize,
    from_ms: u64,
    to_ms: u64,
}

const SITE_NAMES: [&str; 2] = ["a", "b"];

/// Every sample in which both sites ran their group, as one violation per
/// stretch of consecutive such samples.
fn both_running(scans: &[Scan]) -> Vec<Violation> {
    stretches(scans, |s| s.copies[0] > 0 && s.copies[1] > 0, "both sites ran their ticket group")
}

/// Every stretch of samples in which one site ran two copies.
fn two_copies(scans: &[Scan]) -> Vec<Violation> {
    let mut v = Vec::new();
    for (k, site) in SITE_NAMES.iter().enumerate() {
        v.extend(stretches(scans, |s| s.copies[k] > 1, &format!("site {site} ran two copies of its group")));
    }
    v
}

fn stretches(scans: &[Scan], bad: impl Fn(&Scan) -> bool, kind: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < scans.len() {
        if !bad(&scans[i]) {
            i += 1;
            continue;
        }
        let first = i;
        while i < scans.len() && bad(&scans[i]) {
            i += 1;
        }
        let last = &scans[i - 1];
        out.push(Violation {
            kind: kind.into(),
            t_ms: scans[first].t_ms,
            detail: format!(
                "{} sample(s) from {} ms to {} ms, copies a/b {:?}",
                i - first,
                scans[first].t_ms,
                last.t_ms,
                scans[first].copies
            ),
        });
    }
    out
}

/// Every overlap of a span site a certainly believed it held with one
/// site b did.
fn both_holding(beliefs: &[Belief]) -> Vec<Violation> {
    let merged = |site: usize| {
        let mut spans: Vec<(u64, u64)> =
            beliefs.iter().filter(|b| b.site == site && b.to_ms > b.from_ms).map(|b| (b.from_ms, b.to_ms)).collect();
        spans.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (f, t) in spans {
            match out.last_mut() {
                Some(last) if f <= last.1 => last.1 = last.1.max(t),
                _ => out.push((f, t)),
            }
        }
        out
    };
    let (a, b) = (merged(0), merged(1));
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (from, to) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if from < to {
            out.push(Violation {
                kind: "both sites held the ticket".into(),
                t_ms: from,
                detail: format!(
                    "site a believed it held from {} to {} ms, site b from {} to {} ms: both from {from} to {to} ms",
                    a[i].0, a[i].1, b[j].0, b[j].1
                ),
            });
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Every round where the design keeps the ticket (`Expect::Stay`) in
/// which the other site's group ran at any sample from the fault to the
/// round's end — also a move that went back before the round ended.
fn moved(timeline: &[Value], scans: &[Scan]) -> Vec<Violation> {
    let mut out = Vec::new();
    for r in timeline.iter().filter(|r| r["expected"] == "Stay") {
        let (Some(t), Some(end), Some(holder)) =
            (r["t_ms"].as_u64(), r["end_ms"].as_u64(), r["held_by_before"].as_str())
        else {
            continue;
        };
        let other = usize::from(holder == SITE_NAMES[0]);
        if let Some(s) = scans.iter().find(|s| s.t_ms >= t && s.t_ms <= end && s.copies[other] > 0) {
            out.push(Violation {
                kind: "the ticket moved".into(),
                t_ms: s.t_ms,
                detail: format!(
                    "{} left site {holder} two grantors, yet site {} ran its group {} ms after the fault",
                    r["fault"],
                    SITE_NAMES[other],
                    s.t_ms - t
                ),
            });
        }
    }
    out
}

/// The ticket's part of every node's config, for site `k` of the two.
fn ticket_section(k: usize, other_addrs: &[String], arbitrator: &str, key: &Path) -> String {
    let urls: Vec<String> = other_addrs.iter().map(|a| format!("\"https://{a}:7401\"")).collect();
    format!(
        "[ticket]\nsite = \"{}\"\nkey_file = \"{}\"\nother_site = {{ name = \"{}\", urls = [{}] }}\n\
         arbitrator = {{ name = \"arbitrator\", urls = [\"http://{arbitrator}:{ARBITRATOR_PORT}\"] }}\n\
         lease_ms = {LEASE_MS}\nmargin_ms = {MARGIN_MS}\nrenew_ms = {RENEW_MS}\n",
        SITE_NAMES[k],
        key.display(),
        SITE_NAMES[1 - k],
        urls.join(", ")
    )
}

/// PUTs site `k`'s ticket group, retried until a node takes it.
async fn define_group(site: &SiteCluster) -> anyhow::Result<()> {
    let nodes: Vec<&str> = site.hosts.iter().map(|h| h.name.as_str()).collect();
    let spec = json!({
        "resources": [{"name": "svc", "type": "process", "command": ["sleep", site.marker]}],
        "nodes": nodes,
        "ticket": true,
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        for h in &site.hosts {
            let url = format!("{}/v1/groups/{GROUP}", h.url());
            match site.client.put(&url).json(&spec).timeout(Duration::from_secs(10)).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("{}: {} {}", h.name, r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = format!("{}: {e}", h.name),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("site {}'s ticket group was not accepted: {last}", site.name)
}

pub async fn run(args: &Args, tandem: PathBuf, seed: u64) -> anyhow::Result<usize> {
    let per_site = args.nodes;
    println!(
        "tandem-chaos --clusters: seed {seed}, two clusters of {per_site} nodes, an arbitrator; ticket lease {LEASE_MS} ms, margin {MARGIN_MS} ms, renewal {RENEW_MS} ms"
    );
    let kinds = narrow(&args.faults, KINDS.to_vec())?;
    if kinds.is_empty() {
        bail!("--faults: none of this mode's kinds");
    }
    let tmp = tempfile::tempdir()?;
    let mut topo = Topology::new(true)?;
    // Hosts 1..n site a, n+1..2n site b, 2n+1 the arbitrator's (the witness).
    let mut names = Vec::new();
    for i in 1..=2 * per_site + 1 {
        let site = match i {
            i if i <= per_site => Site::A,
            i if i <= 2 * per_site => Site::B,
            _ => Site::Witness,
        };
        names.push((i, site, topo.host(i, site)?));
    }
    topo.route_sites()?;
    let w = 2 * per_site + 1;
    let witness = topo.addrs(w);
    let arb_addr = topo.addr(w, 0);
    let key = tmp.path().join("ticket.key");
    std::fs::write(&key, format!("the key both sites and the arbitrator share, run {}\n", std::process::id()))?;
    let arb_config = tmp.path().join("arbitrator.toml");
    std::fs::write(
        &arb_config,
        format!(
            "listen = \"{arb_addr}:{ARBITRATOR_PORT}\"\nkey_file = \"{}\"\nsites = [\"a\", \"b\"]\n[ticket]\n\
             lease_ms = {LEASE_MS}\nmargin_ms = {MARGIN_MS}\nrenew_ms = {RENEW_MS}\n",
            key.display()
        ),
    )?;
    let site_addrs = |k: u8| -> Vec<String> { (1..=per_site).map(|j| topo.addr(k * per_site + j, 0)).collect() };
    let addrs = [site_addrs(0), site_addrs(1)];
    let mut hosts: [Vec<Host>; 2] = [Vec::new(), Vec::new()];
    let arb_ns =
        names.iter().find(|(_, s, _)| *s == Site::Witness).map(|(_, _, ns)| ns.clone()).context("no witness")?;
    for (i, site, ns) in names.into_iter().filter(|(_, s, _)| *s != Site::Witness) {
        let k = usize::from(site == Site::B);
        let name = format!("{}{}", SITE_NAMES[k], i - k as u8 * per_site);
        let dir = tmp.path().join(&name);
        std::fs::create_dir_all(dir.join("data"))?;
        let host_addrs = topo.addrs(i);
        let quoted: Vec<String> = host_addrs.iter().map(|a| format!("\"{a}\"")).collect();
        let cfg = format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\naddresses = [{}]\nport = 7401\n{}",
            dir.join("data").display(),
            quoted.join(", "),
            ticket_section(k, &addrs[1 - k], &arb_addr, &key)
        );
        std::fs::write(dir.join("node.toml"), cfg)?;
        hosts[k].push(Host {
            name,
            ns,
            addr: host_addrs[0].clone(),
            addrs: host_addrs,
            site,
            dir,
            child: None,
            sessions: Vec::new(),
            saw_full_disk: false,
        });
    }
    let [hosts_a, hosts_b] = hosts;
    let pid = std::process::id();
    let placeholder = || reqwest::Client::builder().no_proxy().build();
    let mut world = World {
        sites: [
            SiteCluster { name: "a", hosts: hosts_a, client: placeholder()?, marker: format!("{}1", 900_000 + pid) },
            SiteCluster { name: "b", hosts: hosts_b, client: placeholder()?, marker: format!("{}2", 900_000 + pid) },
        ],
        arb: Arbitrator { ns: arb_ns, config: arb_config, log: tmp.path().join("arbitrator.log"), child: None },
        tandem,
        t0: Instant::now(),
        exits: Vec::new(),
        witness,
        topo,
    };
    world.arb.start(&world.tandem)?;
    for site in &mut world.sites {
        for h in &mut site.hosts {
            h.start(&world.tandem)?;
        }
    }
    let interrupted = crate::interrupt_flag()?;
    for (k, site) in world.sites.iter_mut().enumerate() {
        site.client = form_cluster(&site.hosts, &format!("site-{}", SITE_NAMES[k])).await?;
    }
    for site in &world.sites {
        define_group(site).await?;
    }
    let first = match world.settle(Duration::from_secs(120), false).await? {
        Ok(site) => site,
        Err(seen) => {
            let kept = tmp.keep();
            bail!("the two clusters did not settle: {seen} (logs: {}/*/agent.log)", kept.display());
        }
    };
    println!("           site {} holds the ticket and runs its group", SITE_NAMES[first]);

    // The samplers, for the whole run.
    let t0 = Instant::now();
    world.t0 = t0;
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (stop, markers) = (stop.clone(), world.markers());
        std::thread::spawn(move || {
            let mut scans = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let t_ms = t0.elapsed().as_millis() as u64;
                scans.push(Scan { t_ms, copies: scan(&markers) });
                std::thread::sleep(SCAN_EVERY);
            }
            scans
        })
    };
    let beliefs: Arc<Mutex<Vec<Belief>>> = Default::default();
    let answers = Arc::new([std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0)]);
    let poller = {
        let (stop, beliefs, answers) = (stop.clone(), beliefs.clone(), answers.clone());
        let targets: Vec<(usize, String, reqwest::Client)> = world
            .sites
            .iter()
            .enumerate()
            .flat_map(|(k, s)| s.hosts.iter().map(move |h| (k, h.url(), s.client.clone())))
            .collect();
        tokio::spawn(async move {
            // One request in flight per node: a slow node is asked less
            // often, not piled up.
            let busy: Arc<Vec<AtomicBool>> = Arc::new(targets.iter().map(|_| AtomicBool::new(false)).collect());
            while !stop.load(Ordering::SeqCst) {
                for (n, (k, url, client)) in targets.iter().enumerate() {
                    if busy[n].swap(true, Ordering::SeqCst) {
                        continue;
                    }
                    let (k, url, client) = (*k, format!("{url}/v1/ticket"), client.clone());
                    let (busy, beliefs, answers) = (busy.clone(), beliefs.clone(), answers.clone());
                    tokio::spawn(async move {
                        let sent = t0.elapsed().as_millis() as u64;
                        if let Some(t) = get(&client, &url).await {
                            let answered = t0.elapsed().as_millis() as u64;
                            answers[k].fetch_add(1, Ordering::Relaxed);
                            if let (true, Some(left)) = (t["holds"] == true, t["left_ms"].as_u64()) {
                                let b = Belief { site: k, from_ms: answered, to_ms: sent + left };
                                beliefs.lock().unwrap_or_else(|e| e.into_inner()).push(b);
                            }
                        }
                        busy[n].store(false, Ordering::SeqCst);
                    });
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        })
    };

    let mut rng = Rng(seed.max(1));
    let deadline = args.duration.map(|d| t0 + Duration::from_secs(d));
    let (mut round, mut holder, mut timeline, mut found) = (0u32, first, Vec::new(), Vec::new());
    while !interrupted.load(Ordering::SeqCst) {
        match deadline {
            Some(d) if Instant::now() >= d => break,
            None if round >= args.rounds => break,
            _ => {}
        }
        let fault = pick_fault(&kinds, round, &mut rng);
        let (entry, v, next) = site_round(&mut world, round, fault, holder, &mut rng).await?;
        timeline.push(entry);
        found.extend(v);
        match next {
            Some(h) => holder = h,
            // Not settled within the bound (a violation already): the run
            // cannot go on meaningfully.
            None => break,
        }
        round += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let _ = poller.await;
    let scans = scanner.join().unwrap_or_default();
    let beliefs = std::mem::take(&mut *beliefs.lock().unwrap_or_else(|e| e.into_inner()));
    let mut violations = both_running(&scans);
    violations.extend(moved(&timeline, &scans));
    violations.extend(two_copies(&scans));
    violations.extend(both_holding(&beliefs));
    violations.extend(found);
    violations.append(&mut world.exits);
    violations.sort_by_key(|v| v.t_ms);
    // Each violation names the round it fell in.
    for v in &mut violations {
        if let Some(r) = timeline.iter().rev().find(|r| r["t_ms"].as_u64().is_some_and(|t| t <= v.t_ms)) {
            // No site: the WAN link or the arbitrator.
            let site = r["site"].as_str().unwrap_or("-");
            v.detail = format!("{} (round {}: {} on site {site})", v.detail, r["round"], r["fault"]);
        }
    }
    let max_gap = scans.windows(2).map(|w| w[1].t_ms - w[0].t_ms).max();
    // Every round after which the other site holds (a leader change may
    // move the ticket too): when its group first ran, from the samples.
    for r in &mut timeline {
        let (Some(before), Some(after), Some(t)) =
            (r["held_by_before"].as_str(), r["held_by_after"].as_str(), r["t_ms"].as_u64())
        else {
            continue;
        };
        if before != after {
            let k = usize::from(after == SITE_NAMES[1]);
            let first = scans.iter().find(|s| s.t_ms >= t && s.copies[k] > 0).map(|s| s.t_ms - t);
            r["other_ran_after_ms"] = json!(first);
        }
    }
    let moved: Vec<u64> = timeline.iter().filter_map(|r| r["other_ran_after_ms"].as_u64()).collect();
    let report = json!({
        "mode": "clusters",
        "seed": seed,
        "nodes_per_site": per_site,
        "ticket": {"lease_ms": LEASE_MS, "margin_ms": MARGIN_MS, "renew_ms": RENEW_MS},
        "rounds": round,
        "faults": timeline,
        "samples": {
            "process_scans": scans.len(),
            "process_scan_max_gap_ms": max_gap,
            "ticket_answers": {"a": answers[0].load(Ordering::Relaxed), "b": answers[1].load(Ordering::Relaxed)},
            "held_spans": {"a": beliefs.iter().filter(|b| b.site == 0).count(), "b": beliefs.iter().filter(|b| b.site == 1).count()},
        },
        "ticket_moves": {"count": moved.len(), "other_site_ran_after_ms": moved},
        "violations": violations,
    });
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    println!(
        "\nseed {seed}: {round} rounds, {} process scans (largest gap {} ms), ticket answers a {} b {}, {} ticket moves (the other site ran its group after {:?} ms)",
        scans.len(),
        ms(max_gap),
        answers[0].load(Ordering::Relaxed),
        answers[1].load(Ordering::Relaxed),
        moved.len(),
        moved
    );
    for v in &violations {
        println!("VIOLATION at {} ms: {}: {}", v.t_ms, v.kind, v.detail);
    }
    println!("report: {}", args.report.display());
    if args.keep || !violations.is_empty() {
        let kept = tmp.keep();
        println!("logs: {}/*/agent.log, {}/arbitrator.log", kept.display(), kept.display());
    }
    println!("violations: {}", violations.len());
    drop(world);
    Ok(violations.len())
}

/// One round: `fault` aimed (two in three at the holding site), injected,
/// healed; then both clusters must settle with one site running, and the
/// ticket must have done what the design says. Returns the timeline entry,
/// the violations, and the site that holds after (None: not settled).
async fn site_round(
    world: &mut World,
    round: u32,
    fault: SiteFault,
    holder: usize,
    rng: &mut Rng,
) -> anyhow::Result<(Value, Vec<Violation>, Option<usize>)> {
    let mut holder = holder;
    // A fault the design judges by the grantors it leaves the holder starts
    // once all three lend to it again; a leader's or a node's loss may come
    // at any time, also right after a heal (when a grantor still lends to
    // the other site: how round 57 of seed 2 found the hand-back bug).
    if fault.expect(true) != Expect::Either {
        match world.settle(SETTLE_WITHIN, true).await? {
            Ok(s) => holder = s,
            Err(seen) => {
                let t = world.now_ms();
                println!("[{t:>7} ms] round {round}: not every grantor lends to the holder: {seen}");
                let v = Violation {
                    kind: "no single site running".into(),
                    t_ms: t,
                    detail: format!("{} s before round {round} ({fault:?}): {seen}", SETTLE_WITHIN.as_secs()),
                };
                return Ok((json!({"t_ms": t, "round": round, "fault": format!("{fault:?}")}), vec![v], None));
            }
        }
    }
    let site = match fault {
        SiteFault::LeaderPowerLoss => holder,
        _ if rng.below(3) < 2 => holder,
        _ => 1 - holder,
    };
    let other = 1 - site;
    let expect = fault.expect(site == holder);
    let stay_hold = Duration::from_millis(2 * LEASE_MS + rng.below(LEASE_MS));
    let short_hold = Duration::from_millis(1000 + rng.below(3000));
    let t = world.now_ms();
    let started = Instant::now();
    // The WAN link and the arbitrator belong to no site.
    let aimed = match fault {
        SiteFault::WanCut | SiteFault::ArbitratorDown => None,
        _ => Some(SITE_NAMES[site]),
    };
    let mut entry = json!({
        "t_ms": t, "round": round, "fault": format!("{fault:?}"), "site": aimed,
        "held_by_before": SITE_NAMES[holder], "expected": format!("{expect:?}"),
    });
    let mut node = None;
    let mut ran_after = None;
    let mut found = Vec::new();
    let site_hosts = |w: &World, k: usize| -> Vec<String> { w.sites[k].hosts.iter().map(|h| h.ns.clone()).collect() };
    match fault {
        SiteFault::WanCut => {
            world.topo.set_site_link(false)?;
            world.hold(stay_hold).await?;
            world.topo.set_site_link(true)?;
        }
        SiteFault::ArbitratorCut => {
            for ns in site_hosts(world, site) {
                cut_off(&ns, &world.witness)?;
            }
            world.hold(stay_hold).await?;
            for ns in site_hosts(world, site) {
                heal_cut(&ns)?;
            }
        }
        SiteFault::ArbitratorDown => {
            world.arb.kill();
            world.hold(stay_hold).await?;
            world.arb.start(&world.tandem)?;
        }
        SiteFault::WanOutage => {
            let mut away = world.witness.clone();
            away.extend(world.sites[other].hosts.iter().flat_map(|h| h.addrs.clone()));
            for ns in site_hosts(world, site) {
                cut_off(&ns, &away)?;
            }
            ran_after = hold_for(world, expect, other, started, stay_hold, rng).await?;
            for ns in site_hosts(world, site) {
                heal_cut(&ns)?;
            }
        }
        SiteFault::SitePowerLoss => {
            for h in &mut world.sites[site].hosts {
                h.power_off();
            }
            ran_after = hold_for(world, expect, other, started, stay_hold, rng).await?;
            let tandem = world.tandem.clone();
            for h in &mut world.sites[site].hosts {
                h.start(&tandem)?;
            }
        }
        SiteFault::LeaderPowerLoss => {
            let leader =
                world.sites[site].view("/v1/cluster").await.and_then(|c| c["leader"].as_str().map(String::from));
            let i = leader.as_ref().and_then(|l| world.sites[site].hosts.iter().position(|h| &h.name == l));
            let i = i.unwrap_or_else(|| rng.below(world.sites[site].hosts.len() as u64) as usize);
            node = Some(world.sites[site].hosts[i].name.clone());
            world.sites[site].hosts[i].power_off();
            world.hold(short_hold).await?;
            let tandem = world.tandem.clone();
            world.sites[site].hosts[i].start(&tandem)?;
        }
        SiteFault::NodePartition => {
            let i = rng.below(world.sites[site].hosts.len() as u64) as usize;
            let me = world.sites[site].hosts[i].name.clone();
            let mut away = world.witness.clone();
            for s in &world.sites {
                away.extend(s.hosts.iter().filter(|h| h.name != me).flat_map(|h| h.addrs.clone()));
            }
            let ns = world.sites[site].hosts[i].ns.clone();
            node = Some(me);
            cut_off(&ns, &away)?;
            world.hold(short_hold).await?;
            heal_cut(&ns)?;
        }
    }
    let held_ms = started.elapsed().as_millis() as u64;
    let on = match (aimed, node.as_deref()) {
        (Some(s), Some(n)) => format!(" on site {s} ({n})"),
        (Some(s), None) => format!(" on site {s}"),
        _ => String::new(),
    };
    println!(
        "[{t:>7} ms] round {round}: {fault:?}{on}, held {held_ms} ms; site {} held the ticket; expected: {expect:?}",
        SITE_NAMES[holder]
    );
    entry["node"] = json!(node);
    entry["held_ms"] = json!(held_ms);
    entry["other_ran_after_ms"] = json!(ran_after);
    if expect == Expect::Move && ran_after.is_none() {
        found.push(Violation {
            kind: "the ticket did not move".into(),
            t_ms: world.now_ms(),
            detail: format!(
                "site {} was cut off or dark for {} s and site {} never ran its group",
                SITE_NAMES[site],
                MOVE_WITHIN.as_secs(),
                SITE_NAMES[other]
            ),
        });
    }
    let healed = Instant::now();
    let settled = world.settle(SETTLE_WITHIN, false).await?;
    entry["settled_ms"] = json!(healed.elapsed().as_millis() as u64);
    let after = match settled {
        Ok(s) => s,
        Err(seen) => {
            found.push(Violation {
                kind: "no single site running".into(),
                t_ms: world.now_ms(),
                detail: format!("{} s after the heal: {seen}", SETTLE_WITHIN.as_secs()),
            });
            println!("           NOT settled {} s after the heal: {seen}", SETTLE_WITHIN.as_secs());
            return Ok((entry, found, None));
        }
    };
    entry["held_by_after"] = json!(SITE_NAMES[after]);
    entry["end_ms"] = json!(world.now_ms());
    match (expect, after == holder) {
        // (A move where it must stay is found from the samples, `moved`.)
        (Expect::Move, true) if ran_after.is_some() => found.push(Violation {
            kind: "the ticket went back".into(),
            t_ms: world.now_ms(),
            detail: format!(
                "site {} took the ticket during {fault:?} on site {}, and site {} holds it again after the heal",
                SITE_NAMES[other], SITE_NAMES[site], SITE_NAMES[site]
            ),
        }),
        _ => {}
    }
    println!(
        "           site {} holds after; {}settled {} ms after the heal",
        SITE_NAMES[after],
        ran_after
            .map(|ms| format!("site {} ran its group {ms} ms after the fault; ", SITE_NAMES[other]))
            .unwrap_or_default(),
        healed.elapsed().as_millis()
    );
    Ok((entry, found, Some(after)))
}

/// The hold of a fault that cuts a site off or darkens it: when the ticket
/// must move, until the other site runs its group (then 1–3 s more), else
/// `stay_hold`. Returns how long after `started` the other site ran it.
async fn hold_for(
    world: &mut World,
    expect: Expect,
    other: usize,
    started: Instant,
    stay_hold: Duration,
    rng: &mut Rng,
) -> anyhow::Result<Option<u64>> {
    if expect != Expect::Move {
        world.hold(stay_hold).await?;
        return Ok(None);
    }
    let ran = world.until_runs(other, started).await?;
    world.hold(Duration::from_millis(1000 + rng.below(2000))).await?;
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_running_and_two_copies_are_caught_by_stretch() {
        let s = |t_ms, a, b| Scan { t_ms, copies: [a, b] };
        let scans = [s(0, 1, 0), s(20, 1, 1), s(40, 1, 1), s(60, 0, 1), s(80, 0, 2), s(100, 1, 1)];
        let v = both_running(&scans);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!((v[0].t_ms, v[1].t_ms), (20, 100));
        assert!(v[0].detail.starts_with("2 sample(s)"), "{}", v[0].detail);
        let v = two_copies(&scans);
        assert_eq!(v.len(), 1);
        assert!(v[0].kind.contains("site b"));
        assert!(both_running(&[s(0, 1, 0), s(20, 0, 0), s(40, 0, 1)]).is_empty());
    }

    #[test]
    fn held_spans_that_overlap_across_sites_are_caught_and_others_not() {
        let b = |site, from_ms, to_ms| Belief { site, from_ms, to_ms };
        // a held to 1000 (two spans merged), b from 1500: apart.
        assert!(both_holding(&[b(0, 0, 600), b(0, 500, 1000), b(1, 1500, 3000)]).is_empty());
        // An empty span (an answer slower than what was left) says nothing.
        assert!(both_holding(&[b(0, 0, 1000), b(1, 900, 800)]).is_empty());
        let v = both_holding(&[b(0, 0, 1000), b(1, 1500, 3000), b(0, 2900, 3500)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].t_ms, 2900);
    }

    #[test]
    fn the_design_moves_the_ticket_only_off_a_holder_cut_off_or_dark() {
        for k in KINDS {
            assert_ne!(k.expect(false), Expect::Move, "{k:?}");
        }
        assert_eq!(SiteFault::WanOutage.expect(true), Expect::Move);
        assert_eq!(SiteFault::SitePowerLoss.expect(true), Expect::Move);
        assert_eq!(SiteFault::WanCut.expect(true), Expect::Stay);
    }

    #[test]
    fn a_move_in_a_round_that_keeps_the_ticket_is_caught_even_if_it_went_back() {
        let s = |t_ms, a, b| Scan { t_ms, copies: [a, b] };
        let round = |expected: &str| json!({"t_ms": 100, "end_ms": 500, "held_by_before": "a", "expected": expected, "fault": "WanCut"});
        let scans = [s(100, 1, 0), s(200, 0, 1), s(300, 1, 0), s(600, 0, 1)];
        let v = moved(&[round("Stay")], &scans);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].t_ms, 200);
        assert!(moved(&[round("Either")], &scans).is_empty());
        // After the round's end: not this round's.
        assert!(moved(&[round("Stay")], &[s(100, 1, 0), s(600, 0, 1)]).is_empty());
    }
}
