//! Site failover by the ticket, as a client sees it: two one-node clusters
//! on loopback (site a, site b) and `tandem arbitrator`, a group bound to
//! the ticket (`ticket: true`) on each site serving HTTP (python3's
//! http.server, on its own port per site). Each round, the site holding the
//! ticket loses power for good (its agent's session killed, service
//! included) and a client polling both sites' addresses every 10 ms
//! measures how long until the other site's service answers; the lost
//! site then comes back (and does not take the ticket back), and the next
//! round loses the other one. Run with the default ticket timing and a
//! short one. No human decides anything: the arbitrator and the surviving
//! site promote it.
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/site_failover_bench [rounds]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_testkit::api;
use tandem_testkit::bench::{agent_port, spawn_agent_with, wait_for, wait_up, Agent};
use tandem_testkit::free_port;

/// (name, lease_ms, margin_ms, renew_ms)
const TIMINGS: [(&str, u64, u64, u64); 2] = [("default", 10_000, 1_000, 2_000), ("short", 2_000, 600, 400)];

struct Site {
    name: &'static str,
    other: &'static str,
    port: u16,
    web_port: u16,
    extra: String,
    agent: Option<Agent>,
}

impl Site {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn service(&self) -> String {
        format!("http://127.0.0.1:{}/", self.web_port)
    }

    fn start(&mut self, dir: &Path) {
        self.agent = Some(spawn_agent_with(dir, &format!("{}1", self.name), self.port, &self.extra));
    }
}

async fn answers(http: &reqwest::Client, url: &str) -> bool {
    http.get(url).timeout(Duration::from_millis(200)).send().await.is_ok_and(|r| r.status().is_success())
}

async fn ticket(url: &str) -> Value {
    api::call_with(None, reqwest::Method::GET, &format!("{url}/v1/ticket"), None).await.1
}

/// Every grantor lends to `url`'s site: a round starts from the steady state.
async fn all_lend(url: &str) -> bool {
    let t = ticket(url).await;
    t["holds"] == true && t["grantors"].as_array().is_some_and(|g| g.iter().all(|g| g["granted"] == true))
}

/// One timing: `rounds` site losses; the client-seen outage of each, ms.
async fn run(dir: &Path, timing: (&str, u64, u64, u64), rounds: usize) -> Vec<f64> {
    let (_, lease, margin, renew) = timing;
    let key = dir.join("ticket.key");
    std::fs::write(&key, "a key the two sites and the arbitrator share, 32+ bytes\n").unwrap();
    let arb_port = free_port();
    let arb_cfg = dir.join("arbitrator.toml");
    let t = format!("lease_ms = {lease}\nmargin_ms = {margin}\nrenew_ms = {renew}\n");
    std::fs::write(
        &arb_cfg,
        format!(
            "listen = \"127.0.0.1:{arb_port}\"\nkey_file = \"{}\"\nsites = [\"a\", \"b\"]\n[ticket]\n{t}",
            key.display()
        ),
    )
    .unwrap();
    let arb_log = std::fs::File::create(dir.join("arbitrator.log")).unwrap();
    let mut cmd = std::process::Command::new(tandem_testkit::bench::sibling_tandem_bin());
    tandem_testkit::new_session(&mut cmd);
    // Killed on drop, also when a round panics.
    let _arbitrator = Session(
        cmd.args(["arbitrator", "--config"])
            .arg(&arb_cfg)
            .stdout(arb_log.try_clone().unwrap())
            .stderr(arb_log)
            .spawn()
            .expect("tandem arbitrator"),
    );
    let (pa, pb) = (agent_port(), agent_port());
    let mut sites: Vec<Site> = [("a", "b", pa, pb), ("b", "a", pb, pa)]
        .into_iter()
        .map(|(name, other, port, other_port)| Site {
            name,
            other,
            port,
            web_port: free_port(),
            extra: format!(
                "[ticket]\nsite = \"{name}\"\nkey_file = \"{}\"\n\
                 other_site = {{ name = \"{other}\", urls = [\"https://127.0.0.1:{other_port}\"] }}\n\
                 arbitrator = {{ name = \"arbitrator\", urls = [\"http://127.0.0.1:{arb_port}\"] }}\n{t}",
                key.display()
            ),
            agent: None,
        })
        .collect();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for s in sites.iter_mut() {
        s.start(dir);
        let a = s.agent.as_ref().unwrap();
        wait_up(a).await;
        let creds = api::init(&a.socket, &format!("site-{}", s.name)).await.expect("init");
        api::register(&s.url(), &creds);
        let group = json!({
            "nodes": [format!("{}1", s.name)], "ticket": true,
            "resources": [{"name": "http", "type": "process",
                "command": ["python3", "-m", "http.server", s.web_port.to_string(), "--bind", "127.0.0.1", "--directory", "/"]}]
        });
        let body = serde_json::to_vec(&group).unwrap();
        let (st, v) =
            api::call_with(None, reqwest::Method::PUT, &format!("{}/v1/groups/web", s.url()), Some(body)).await;
        assert_eq!(st, 201, "{v}");
    }
    let wait = Duration::from_millis(lease * 6 + 30_000);
    let mut holder = 0usize;
    let (url, service) = (sites[0].url(), sites[0].service());
    wait_for(
        "site a holds the ticket, every grantor lending, its service answering",
        wait,
        Duration::from_millis(50),
        || {
            let (url, service, http) = (url.clone(), service.clone(), http.clone());
            async move { all_lend(&url).await && answers(&http, &service).await }
        },
    )
    .await;
    let mut outages = Vec::new();
    for i in 0..rounds {
        let other = 1 - holder;
        let service = sites[other].service();
        assert!(!answers(&http, &service).await, "site {} serves without the ticket", sites[other].name);
        let lost = Instant::now();
        sites[holder].agent = None; // power loss of the whole site
        while !answers(&http, &service).await {
            if lost.elapsed() > wait {
                let url = sites[other].url();
                let group = api::call_with(None, reqwest::Method::GET, &format!("{url}/v1/groups/web"), None).await.1;
                panic!(
                    "site {} does not serve {wait:?} after site {} was lost\nticket: {}\ngroup: {group}\n(logs in {})",
                    sites[other].name,
                    sites[holder].name,
                    ticket(&url).await,
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let outage = lost.elapsed();
        eprintln!(
            "{} round {i}: site {} lost, site {} served after {:.0} ms",
            timing.0,
            sites[holder].name,
            sites[other].name,
            outage.as_secs_f64() * 1e3
        );
        outages.push(outage.as_secs_f64() * 1e3);
        // The lost site comes back, and stays standby.
        sites[holder].start(dir);
        wait_up(sites[holder].agent.as_ref().unwrap()).await;
        let url = sites[other].url();
        wait_for("every grantor lends to the new holder", wait, Duration::from_millis(50), || {
            let url = url.clone();
            async move { all_lend(&url).await }
        })
        .await;
        assert!(!answers(&http, &sites[holder].service()).await, "site {} serves again", sites[holder].other);
        holder = other;
    }
    drop(sites);
    outages
}

/// A process in a session of its own, killed with its session on drop.
struct Session(std::process::Child);

impl Drop for Session {
    fn drop(&mut self) {
        tandem_testkit::kill_session(self.0.id() as i32);
        let _ = self.0.wait();
    }
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    println!("| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |", v.len(), v[0], pct(0.5), pct(0.99), v[v.len() - 1]);
}

#[tokio::main]
async fn main() {
    api::install_crypto();
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let mut rows = Vec::new();
    for timing in TIMINGS {
        let tmp = tempfile::tempdir().unwrap();
        // SITE_BENCH_KEEP=1 keeps the agents' logs for a look afterwards.
        let tmp = if std::env::var_os("SITE_BENCH_KEEP").is_some() { tmp.keep() } else { tmp.path().to_path_buf() };
        let v = run(&tmp, timing, rounds).await;
        rows.push((format!("{} (lease {} / margin {} / renew {} ms)", timing.0, timing.1, timing.2, timing.3), v));
    }
    println!("| ticket timing | rounds | min | p50 | p99 | max |\n|---|---|---|---|---|---|");
    for (name, v) in rows {
        summary(&format!("{name}: site power loss → the other site's service answers"), v);
    }
}
