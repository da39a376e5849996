//! `GET /metrics` read by the real tools: `promtool check metrics` accepts
//! every node's output, Debian's Prometheus scrapes a 3-node cluster over
//! HTTPS with a viewer token and the cluster CA and, through its HTTP API,
//! sees exactly one leader and a group's failover count grow after the
//! node running it is killed. The shipped alert rules pass `promtool check
//! rules` and their own unit tests (`promtool test rules`).
//!
//! Prometheus and promtool come with Debian's `prometheus` package (`cargo
//! xtask test` installs it); without it these tests say so and skip, except
//! under CI, where a missing tool is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The tool's path, or None (having said why) when it is missing outside CI.
fn tool(name: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists());
    if found.is_none() {
        let why = format!("{name} is not installed (apt-get install prometheus; cargo xtask test installs it)");
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
    }
    found
}

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/prometheus")
}

#[test]
fn the_shipped_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else { return };
    for args in [["check", "rules", "tandem-rules.yml"], ["test", "rules", "tandem-rules.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(rules_dir()).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `GET /metrics` with `token`: status, content type, body.
async fn scrape(url: &str, token: &str) -> (u16, String, String) {
    let mut rb = tandem_testkit::api::client().get(format!("{url}/metrics"));
    if !token.is_empty() {
        rb = rb.bearer_auth(token);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (status, ct, resp.text().await.unwrap())
}

fn promtool_check_metrics(promtool: &Path, text: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server, stopped (by its own pid) on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts Prometheus in `dir`, scraping `targets` (host:port) every second
/// over HTTPS with the CA at `ca` and the token in `token_file`.
fn start_prometheus(bin: &Path, dir: &Path, targets: &[String], ca: &Path, token_file: &Path) -> Prometheus {
    let targets = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    // The scrape_config docs/api.md shows, with test timings.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: tandem\n    scheme: https\n    scrape_timeout: 900ms\n\
         \x20   tls_config:\n      ca_file: {}\n    authorization:\n      credentials_file: {}\n\
         \x20   static_configs:\n      - targets: [{targets}]\n",
        ca.display(),
        token_file.display()
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let port = free_port();
    let log = dir.join("prometheus.log");
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Prometheus { child, url: format!("http://127.0.0.1:{port}"), log }
}

fn percent_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// The value of an instant PromQL query with a single result (None: no result).
async fn query(p: &Prometheus, q: &str) -> Option<f64> {
    let resp = tandem_testkit::api::client()
        .get(format!("{}/api/v1/query?query={}", p.url, percent_encode(q)))
        .send()
        .await
        .ok()?;
    let v: Value = resp.json().await.ok()?;
    let result = v["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "{q}: more than one series: {v}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

async fn wait_query(p: &Prometheus, q: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let mut last = None;
    for _ in 0..300 {
        last = query(p, q).await;
        if let Some(v) = last.filter(|v| ok(*v)) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: `{q}` is {last:?} after 30 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_cluster_and_sees_one_leader_and_a_failover() {
    let (Some(promtool), Some(prometheus)) = (tool("promtool"), tool("prometheus")) else { return };
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let u = c.nodes[1].url();
    let (st, v) = post(&format!("{u}/v1/tokens"), json!({"name": "prometheus", "role": "viewer"})).await;
    assert_eq!(st, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let log = c.tmp.path().join("events");
    let (st, v) =
        put(&format!("{u}/v1/groups/web"), json!({"resources": [logged(&log)], "nodes": ["n1", "n2", "n3"]})).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(30), "web running on n1", || async {
        let g = group_at(&c.live_urls(), "web").await;
        g["node"] == "n1" && g["state"] == "running"
    })
    .await;

    let mut all = String::new();
    // Every node: a viewer token reads it, nobody else; promtool accepts it.
    for n in &c.nodes {
        let (st, _, body) = scrape(&n.url(), "").await;
        assert_eq!(st, 401, "{}: /metrics without a token: {body}", n.name);
        let (st, ct, text) = scrape(&n.url(), &token).await;
        assert_eq!(st, 200, "{}: {text}", n.name);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        promtool_check_metrics(&promtool, &text);
        let label = format!("node=\"{}\"", n.name);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains(&label), "{}: a series without its node label: {line}", n.name);
        }
        for series in [
            "tandem_raft_is_leader{",
            "tandem_peer_up{",
            "tandem_group_state{",
            "tandem_group_failovers_total{",
            "tandem_api_requests_total{",
        ] {
            assert!(text.contains(series), "{}: no {series} in\n{text}", n.name);
        }
        assert!(!text.contains("route=\"/v1/groups/web\""), "{text}");
        let value = |name: &str| -> f64 {
            let prefix = format!("{name}{{{label}}} ");
            text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok()).unwrap_or(-1.0)
        };
        let (committed, applied) = (value("tandem_raft_commit_index"), value("tandem_raft_applied_index"));
        assert!(committed > 0.0 && applied > 0.0 && committed >= applied - 1.0, "{committed} {applied}\n{text}");
        assert!(value("tandem_lease_left_seconds") > 0.0, "{text}");
        assert!(value("tandem_raft_log_append_seconds_count") > 0.0, "{text}");
        all.push_str(&text);
    }
    // Requests are counted by their route template, not their path (the
    // PUT went to n2, which forwarded it to the leader).
    assert!(all.contains("method=\"PUT\",route=\"/v1/groups/{name}\",status=\"201\""), "{all}");

    let dir = c.tmp.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &c.creds().ca_pem).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let targets: Vec<String> = c.nodes.iter().map(|n| tandem_testkit::api::authority(&n.url())).collect();
    let p = start_prometheus(&prometheus, &dir, &targets, &ca, &token_file);

    wait_query(&p, "count(up{job=\"tandem\"} == 1)", "every node scraped", |v| v == 3.0).await;
    wait_query(&p, "sum(tandem_raft_is_leader)", "exactly one leader", |v| v == 1.0).await;
    let before =
        wait_query(&p, "max(tandem_group_failovers_total{group=\"web\"})", "the failover count", |_| true).await;
    assert_eq!(before, 0.0);

    // Power loss of the node running the group.
    c.node_mut("n1").kill();
    wait_query(&p, "count(up{job=\"tandem\"} == 1)", "n1 no longer scraped", |v| v == 2.0).await;
    wait_query(
        &p,
        "max(tandem_group_failovers_total{group=\"web\"})",
        "the failover count grows after the kill",
        |v| v > before,
    )
    .await;
    wait_query(&p, "sum(tandem_raft_is_leader)", "exactly one leader after the kill", |v| v == 1.0).await;
    let g = group_at(&c.live_urls(), "web").await;
    assert_ne!(g["node"], "n1", "{g}");
    let outage =
        wait_query(&p, "max(tandem_group_last_outage_seconds{group=\"web\"})", "the outage is measured", |_| true)
            .await;
    assert!(outage > 0.0 && outage < 30.0, "outage {outage} s");
}
