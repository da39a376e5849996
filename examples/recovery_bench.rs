//! Quorum-loss recovery benchmark: three agents on loopback, a group
//! serving HTTP (python3's http.server) on node1; node1 and node3 lose power for
//! good (their sessions killed). Measured per round, as a client sees it:
//! how long until node2 may recover (it hears no leader and no majority
//! answers: the dry run stops answering 409), how long the confirmed
//! `POST /v1/cluster/recover` takes, and from the confirmation to the first
//! HTTP answer of the service on node2. The operator's own reaction time is
//! not in it.
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/recovery_bench [rounds]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_testkit::api;
use tandem_testkit::bench::{start_three, Agent};
use tandem_testkit::free_port;

async fn wait_for<F, Fut>(what: &str, limit: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tandem_testkit::bench::wait_for(what, limit, Duration::from_millis(5), f).await;
}

async fn answers(http: &reqwest::Client, url: &str) -> bool {
    http.get(url).timeout(Duration::from_millis(200)).send().await.is_ok_and(|r| r.status().is_success())
}

async fn recover(url: &str, dry_run: bool) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({"confirm": "bench"})).unwrap();
    api::call_with(None, reqwest::Method::POST, &format!("{url}/v1/cluster/recover?dry_run={dry_run}"), Some(body))
        .await
}

/// One round: (may recover after the loss, the recover call, confirm → service).
async fn round(dir: &Path) -> (Duration, Duration, Duration) {
    let (started, _) = start_three(dir).await;
    let n2 = started[1].url();
    let mut agents: Vec<Option<Agent>> = started.into_iter().map(Some).collect();
    let web_port = free_port();
    let service = format!("http://127.0.0.1:{web_port}/");
    let group = json!({
        "nodes": ["node1", "node2"],
        "resources": [{"name": "http", "type": "process",
            "command": ["python3", "-m", "http.server", web_port.to_string(), "--bind", "127.0.0.1", "--directory", "/"]}]
    });
    let body = serde_json::to_vec(&group).unwrap();
    let (st, v) = api::call_with(None, reqwest::Method::PUT, &format!("{n2}/v1/groups/web"), Some(body)).await;
    assert_eq!(st, 201, "{v}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_for("web answering on node1", Duration::from_secs(30), || {
        let (http, service, n2) = (http.clone(), service.clone(), n2.clone());
        async move {
            let (_, g) = api::call_with(None, reqwest::Method::GET, &format!("{n2}/v1/groups/web"), None).await;
            g["node"] == "node1" && answers(&http, &service).await
        }
    })
    .await;
    // The CA key reaches every voter within 10 s: a recovered cluster
    // without it could take no node back.
    let key = dir.join("node2/tls/ca.key");
    wait_for("node2 holds the CA key", Duration::from_secs(30), || {
        let key = key.clone();
        async move { key.exists() }
    })
    .await;

    let lost = Instant::now();
    agents[0] = None;
    agents[2] = None;
    wait_for("node2 may recover", Duration::from_secs(60), || {
        let n2 = n2.clone();
        async move { recover(&n2, true).await.0 == 200 }
    })
    .await;
    let may = lost.elapsed();
    let confirmed = Instant::now();
    let (st, v) = recover(&n2, false).await;
    assert_eq!(st, 200, "{v}");
    let call = confirmed.elapsed();
    wait_for("web answering on node2", Duration::from_secs(60), || {
        let (http, service) = (http.clone(), service.clone());
        async move { answers(&http, &service).await }
    })
    .await;
    let service_back = confirmed.elapsed();
    drop(agents);
    (may, call, service_back)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    println!("| {name} | {} | {:.0} | {:.0} | {:.0} |", v.len(), pct(0.5), pct(0.99), v[v.len() - 1]);
}

#[tokio::main]
async fn main() {
    api::install_crypto();
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let (mut may, mut call, mut back) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = round(tmp.path()).await;
        eprintln!(
            "round {i}: may recover after {:.0} ms, recover call {:.0} ms, service back {:.0} ms",
            ms(a),
            ms(b),
            ms(c)
        );
        may.push(ms(a));
        call.push(ms(b));
        back.push(ms(c));
    }
    println!("| measured (ms) | rounds | p50 | p99 | max |\n|---|---|---|---|---|");
    summary("power loss of 2 of 3 voters → node2 may recover (dry run answers 200)", may);
    summary("confirmed `POST /v1/cluster/recover` (answer)", call);
    summary("confirmation → service answers on node2", back);
}
