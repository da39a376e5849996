//! The ticket between two sites, with hosts as network namespaces: site a
//! and site b each a cluster of their own (one node each here), and
//! `tandem arbitrator` on a third host. Every pair is cut in turn, then
//! site a from both others, the arbitrator is restarted, and the ticket is
//! given back: sampled every 50 ms on both sites, never do both hold it,
//! and never do both run their group bound to it; a site cut off from
//! both others stops holding it (and its group is stopped) and the other
//! one takes it (and starts its group).
//!
//! Needs root; CI runs as root.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::Value;
use tandem_testkit::{in_ns, is_root, Net};

/// Short, so that a run takes seconds: a 2 s lease believed 1.4 s,
/// renewed every 0.4 s (the clocks here are one clock).
const TIMING: &str = "lease_ms = 2000\nmargin_ms = 600\nrenew_ms = 400\n";

/// Cuts (or heals) everything between the hosts of namespaces `x` and `y`.
fn cut(x: (&str, &str), y: (&str, &str), on: bool) {
    for ((ns, _), (_, other)) in [(x, y), (y, x)] {
        let table = format!("cut{}", other.replace('.', "_"));
        if on {
            let rules = format!(
                "add table inet {table}\nadd chain inet {table} in {{ type filter hook input priority 0; }}\n\
                 add rule inet {table} in ip saddr {other} drop\n\
                 add chain inet {table} out {{ type filter hook output priority 0; }}\n\
                 add rule inet {table} out ip daddr {other} drop\n"
            );
            let path = std::env::temp_dir().join(format!("{table}-{ns}.nft"));
            std::fs::write(&path, rules).unwrap();
            in_ns(ns, &["nft", "-f", path.to_str().unwrap()]);
        } else {
            in_ns(ns, &["nft", "delete", "table", "inet", &table]);
        }
    }
}

async fn ticket(url: &str) -> Option<Value> {
    let (st, v) = get(&format!("{url}/v1/ticket")).await;
    (st == 200).then_some(v)
}

async fn holds(url: &str) -> bool {
    ticket(url).await.is_some_and(|t| t["holds"] == true)
}

/// Whether site `site`'s ticket group runs (see `running`).
fn runs(site: &str) -> bool {
    running(if site == "a" { "7771" } else { "7772" })
}

/// Whether a ticket group's process `sleep <marker>` runs, looked up on
/// the host (the namespaces share one process table).
fn running(marker: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-x", "-f", &format!("sleep {marker}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Defines on site `site` (node `<site>1`) a group bound to the ticket.
async fn ticket_group(url: &str, site: &str) {
    let marker = if site == "a" { "7771" } else { "7772" };
    let spec = serde_json::json!({
        "resources": [{"name": "svc", "type": "process", "command": ["sleep", marker]}],
        "nodes": [format!("{site}1")],
        "ticket": true
    });
    let (st, v) = call(Method::PUT, &format!("{url}/v1/groups/svc"), Some(spec.to_string().into_bytes())).await;
    assert!(st == 200 || st == 201, "{v}");
}

/// A one-node cluster at `addr` in `ns` taking part in the ticket as `site`.
async fn site(net_ns: String, addr: &str, site: &str, other: (&str, &str), arbitrator: &str, key: &str) -> Cluster {
    site_of(&[(net_ns, addr.to_string())], site, other.0, &[other.1], arbitrator, key).await
}

/// A cluster of one node per host (`<site>1`, `<site>2`, ...) taking part
/// in the ticket as `site`; the other site's nodes at `other_addrs`.
async fn site_of(
    hosts: &[(String, String)],
    site: &str,
    other: &str,
    other_addrs: &[&str],
    arbitrator: &str,
    key: &str,
) -> Cluster {
    let mut c = Cluster::configure(&[], Opts { voters: hosts.len(), extra: String::new() });
    let urls: Vec<String> = other_addrs.iter().map(|a| format!("\"https://{a}:7401\"")).collect();
    let extra = format!(
        "[ticket]\nsite = \"{site}\"\nkey_file = \"{key}\"\n\
         other_site = {{ name = \"{other}\", urls = [{}] }}\n\
         arbitrator = {{ name = \"arbitrator\", urls = [\"http://{arbitrator}:7409\"] }}\n{TIMING}",
        urls.join(", ")
    );
    for (i, (ns, addr)) in hosts.iter().enumerate() {
        c.add_host(&format!("{site}{}", i + 1), &extra, addr, Some(ns.clone()));
    }
    c.form().await
}

/// The arbitrator's config, written into `dir`.
fn arbitrator_config(dir: &std::path::Path, addr: &str, key: &str) -> std::path::PathBuf {
    let config = dir.join("arbitrator.toml");
    std::fs::write(
        &config,
        format!("listen = \"{addr}:7409\"\nkey_file = \"{key}\"\nsites = [\"a\", \"b\"]\n[ticket]\n{TIMING}"),
    )
    .unwrap();
    config
}

/// The key the two sites and the arbitrator share, written into `dir`.
fn shared_key(dir: &std::path::Path) -> String {
    let key = dir.join("ticket.key");
    std::fs::write(&key, "a key the two sites and the arbitrator share, 32+ bytes\n").unwrap();
    key.display().to_string()
}

struct Arbitrator {
    ns: String,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Arbitrator {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = std::process::Command::new("ip");
        tandem_testkit::new_session(&mut cmd);
        let child = cmd
            .args(["netns", "exec", &self.ns, BIN, "arbitrator", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            tandem_testkit::kill_session(child.id() as i32);
            let _ = child.wait();
        }
    }
}

impl Drop for Arbitrator {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ticket_is_never_held_by_both_sites_under_cuts_of_every_pair() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let mut net = Net::new();
    let (ns_a, addr_a) = net.host(1);
    let (ns_b, addr_b) = net.host(2);
    let (ns_x, addr_x) = net.host(3);
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let config = arbitrator_config(tmp.path(), &addr_x, &key);
    let mut arb = Arbitrator { ns: ns_x.clone(), config, log: tmp.path().join("arbitrator.log"), child: None };
    arb.start();

    // Site a first: it takes the ticket once the grantors' quiet lease
    // after their start is over.
    let a = site(ns_a.clone(), &addr_a, "a", ("b", &addr_b), &addr_x, &key).await;
    let url_a = a.nodes[0].url();
    wait_until(Duration::from_secs(15), "site a holds the ticket", || holds(&url_a)).await;
    let b = site(ns_b.clone(), &addr_b, "b", ("a", &addr_a), &addr_x, &key).await;
    let url_b = b.nodes[0].url();
    wait_until(Duration::from_secs(15), "site b's leader hears the grantors", || async {
        ticket(&url_b)
            .await
            .is_some_and(|t| t["grantors"].as_array().is_some_and(|g| g.iter().all(|g| g["answered_ms_ago"].is_u64())))
    })
    .await;
    let t = ticket(&url_b).await.unwrap();
    assert_eq!(t["holds"], false, "{t}");
    assert!(t["grantors"].as_array().unwrap().iter().any(|g| g["holder"] == "a"), "b is refused for a: {t}");

    // Each site has a group bound to the ticket: it runs on a only.
    ticket_group(&url_a, "a").await;
    ticket_group(&url_b, "b").await;
    wait_until(Duration::from_secs(10), "site a runs its ticket group", || async { runs("a") }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (st, g) = get(&format!("{url_b}/v1/groups/svc")).await;
    assert_eq!(st, 200);
    assert!(!runs("b") && g["node"].is_null(), "site b runs its ticket group without the ticket: {g}");

    // Sample both sites every 50 ms for the whole run.
    let samples: Arc<Mutex<Vec<(u64, bool, bool)>>> = Default::default();
    // And which site's ticket group runs.
    let running: Arc<Mutex<Vec<(u64, bool, bool)>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sampler = {
        let (samples, stop, url_a, url_b) = (samples.clone(), stop.clone(), url_a.clone(), url_b.clone());
        let running = running.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (ha, hb) = tokio::join!(holds(&url_a), holds(&url_b));
                samples.lock().unwrap().push((t0.elapsed().as_millis() as u64, ha, hb));
                running.lock().unwrap().push((t0.elapsed().as_millis() as u64, runs("a"), runs("b")));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let (sa, sb, sx) =
        ((ns_a.as_str(), addr_a.as_str()), (ns_b.as_str(), addr_b.as_str()), (ns_x.as_str(), addr_x.as_str()));

    // Each pair cut for two and a half leases: site a keeps the ticket
    // through the two grantors it still reaches.
    for (x, y, what) in [(sa, sb, "a–b"), (sa, sx, "a–arbitrator"), (sb, sx, "b–arbitrator")] {
        cut(x, y, true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(holds(&url_a).await, "site a lost the ticket with only {what} cut: {:?}", ticket(&url_a).await);
        assert!(!holds(&url_b).await, "site b took the ticket with only {what} cut");
        cut(x, y, false);
        // Healed: site b hands its own grantor's loan back once refused
        // for a, so that a holds through all three again.
        let all_lend = || async {
            ticket(&url_a)
                .await
                .is_some_and(|t| t["grantors"].as_array().is_some_and(|g| g.iter().all(|g| g["granted"] == true)))
        };
        let deadline = Instant::now() + Duration::from_secs(6);
        while !all_lend().await {
            assert!(
                Instant::now() < deadline,
                "after the {what} cut, not every grantor lends to a again: a {:?}\nb {:?}",
                ticket(&url_a).await,
                ticket(&url_b).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The arbitrator restarts: quiet for a lease, site a holds on through
    // the two sites' grantors.
    arb.kill();
    arb.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(holds(&url_a).await, "site a lost the ticket over the arbitrator's restart");

    // Site a cut off from both others: it stops holding within its belief
    // (1.6 s after its last granted round); site b takes the ticket once
    // the grants to a have run out.
    cut(sa, sb, true);
    cut(sa, sx, true);
    let cut_at = Instant::now();
    wait_until(Duration::from_secs(4), "site a stops holding the ticket", || async { !holds(&url_a).await }).await;
    let a_stopped = cut_at.elapsed();
    wait_until(Duration::from_secs(10), "site b takes the ticket", || holds(&url_b)).await;
    let b_took = cut_at.elapsed();
    wait_until(Duration::from_secs(10), "site b runs its ticket group", || async { runs("b") }).await;
    let b_runs = cut_at.elapsed();
    assert!(!runs("a"), "site a still runs its ticket group");
    eprintln!(
        "site a cut off: it stopped holding after {a_stopped:?}, site b held from {b_took:?}, ran its group from {b_runs:?}"
    );

    // Healed: site b renews, site a is refused.
    cut(sa, sb, false);
    cut(sa, sx, false);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(holds(&url_b).await && !holds(&url_a).await, "the ticket stays with b after the heal");

    // Failback: site b gives the ticket back; site a takes it.
    let (st, v) = call(Method::POST, &format!("{url_b}/v1/ticket/release"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["holds"].clone(), v["wanted"].clone()), (Value::Bool(false), Value::Bool(false)), "{v}");
    wait_until(Duration::from_secs(10), "site a takes the ticket back", || holds(&url_a)).await;
    wait_until(Duration::from_secs(10), "site a runs its ticket group again", || async { runs("a") }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!holds(&url_b).await, "b asks no more after its release");
    assert!(!runs("b"), "b stopped its ticket group on release");

    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let samples = samples.lock().unwrap().clone();
    let both: Vec<_> = samples.iter().filter(|(_, a, b)| *a && *b).collect();
    assert!(both.is_empty(), "both sites held the ticket at {both:?}");
    let (held_a, held_b) = (samples.iter().filter(|s| s.1).count(), samples.iter().filter(|s| s.2).count());
    assert!(samples.len() > 200 && held_a > 0 && held_b > 0, "{} samples, a {held_a}, b {held_b}", samples.len());
    let running = running.lock().unwrap().clone();
    let both: Vec<_> = running.iter().filter(|(_, a, b)| *a && *b).collect();
    assert!(both.is_empty(), "both sites ran their ticket group at {both:?}");
    let (ran_a, ran_b) = (running.iter().filter(|s| s.1).count(), running.iter().filter(|s| s.2).count());
    assert!(ran_a > 0 && ran_b > 0, "a ran it in {ran_a} samples, b in {ran_b}");

    // A request under another key is refused, and changes nothing.
    let (st, v) = call(Method::POST, &format!("{url_a}/internal/ticket"), Some(b"{}".to_vec())).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("TND-1700")), "{v}");
    assert!(holds(&url_a).await);
}

/// Site a (three nodes) holds the ticket, its group bound to it running on
/// a follower; site a is cut off from site b and the arbitrator and, at the
/// same moment, its leader loses power. The new leader cannot know what the
/// old one held and, in its first lease, leaves the group be: what stops it
/// in time is the follower's own gate, opened by the old leader's
/// heartbeats and closing when that leader's belief ends — before site b
/// can take the ticket and start its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_kills_its_ticket_group_when_its_gate_closes_with_the_leader_gone() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let mut net = Net::new();
    let a_hosts: Vec<(String, String)> = (1..=3).map(|i| net.host(i)).collect();
    let (ns_b, addr_b) = net.host(4);
    let (ns_x, addr_x) = net.host(5);
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let config = arbitrator_config(tmp.path(), &addr_x, &key);
    let mut arb = Arbitrator { ns: ns_x.clone(), config, log: tmp.path().join("arbitrator.log"), child: None };
    arb.start();
    let a_addrs: Vec<&str> = a_hosts.iter().map(|(_, a)| a.as_str()).collect();
    let mut a = site_of(&a_hosts, "a", "b", &[&addr_b], &addr_x, &key).await;
    let url_a1 = a.nodes[0].url();
    wait_until(Duration::from_secs(15), "site a holds the ticket", || holds(&url_a1)).await;
    let b = site_of(&[(ns_b.clone(), addr_b.clone())], "b", "a", &a_addrs, &addr_x, &key).await;
    let url_b = b.nodes[0].url();

    // Site a's group runs on a2, a follower (a1 formed the cluster and leads).
    assert_eq!(a.leader().await, "a1");
    let spec = |node: &str, marker: &str| {
        serde_json::json!({
            "resources": [{"name": "svc", "type": "process", "command": ["sleep", marker]}],
            "nodes": [node], "ticket": true
        })
    };
    let (st, v) = put(&format!("{url_a1}/v1/groups/svc"), spec("a2", "7781")).await;
    assert!(st == 200 || st == 201, "{v}");
    let (st, v) = put(&format!("{url_b}/v1/groups/svc"), spec("b1", "7782")).await;
    assert!(st == 200 || st == 201, "{v}");
    wait_until(Duration::from_secs(10), "a2 runs site a's ticket group", || async { running("7781") }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!running("7782"));

    // Cut site a off from b and the arbitrator, and power a1 off.
    for (ns, addr) in &a_hosts {
        cut((ns, addr), (&ns_b, &addr_b), true);
        cut((ns, addr), (&ns_x, &addr_x), true);
    }
    let cut_at = Instant::now();
    a.nodes[0].kill();
    let (mut a_gone, mut b_up) = (None, None);
    while b_up.is_none() || a_gone.is_none() {
        let (ra, rb) = (running("7781"), running("7782"));
        assert!(!(ra && rb), "both sites run their ticket group {:?} after the cut", cut_at.elapsed());
        if !ra && a_gone.is_none() {
            a_gone = Some(cut_at.elapsed());
        }
        if rb && b_up.is_none() {
            b_up = Some(cut_at.elapsed());
        }
        assert!(cut_at.elapsed() < Duration::from_secs(15), "a gone {a_gone:?}, b up {b_up:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a_gone, b_up) = (a_gone.unwrap(), b_up.unwrap());
    eprintln!("site a cut off with its leader gone: a2's group killed after {a_gone:?}, b's started after {b_up:?}");
    // The gate closes with the old leader's belief: at most lease − margin
    // (1.4 s) after its last granted round, well before the new leader's
    // first lease (2 s from its election) would have stopped it.
    assert!(a_gone < Duration::from_millis(1_400 + 400), "a2 kept the group {a_gone:?}");
    assert!(a_gone < b_up);
    let a2_log = std::fs::read_to_string(a.nodes[1].log_path()).unwrap_or_default();
    assert!(a2_log.contains("ticket is not seen held here any more"), "a2 did not kill it by its gate");
    for (ns, addr) in &a_hosts {
        cut((ns, addr), (&ns_b, &addr_b), false);
        cut((ns, addr), (&ns_x, &addr_x), false);
    }
}
