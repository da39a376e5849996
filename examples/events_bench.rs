//! State change → event at a Server-Sent Events client: a 3-node loopback
//! cluster with the defaults; a client follows `/v1/events/stream` on one
//! node while another client puts a node in standby and back online through
//! another node, N times. Each sample is the time from sending the request
//! to the event arriving on the stream (and, apart, from the request's
//! answer to the event). An alert sends the same events to a webhook
//! receiver in this process (signed, `kinds: ["node."]`): each sample also
//! times the request, and its answer (the change and its event committed),
//! to the webhook's arrival. Then the agents' idle CPU over a
//! quiet window.
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/events_bench 100    # samples
//!
//! Prints a Markdown report (docs/benchmarks.md).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tandem::cli::SseParser;
use tandem_testkit::api::call_with;
use tandem_testkit::bench::start_three;

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// What a full event log adds to every apply: the state machine store
/// clones the state and writes it whole (JSON) once per applied batch.
/// Times one clone + encode of a state holding `n` typical events.
fn encode_cost(n: usize) -> (usize, f64) {
    use tandem_raft::events::{Event, Severity};
    let mut s = tandem_raft::state::ClusterState::default();
    s.events.set_retain(n.max(10));
    for i in 0..n {
        s.events.push(
            Event::new(1_796_552_467_412 + i as u64, "group.moved", Severity::Warning, "group web moved from node1 to node2: node1 failed and was fenced; failed over to node2")
                .group("web")
                .node("node2")
                .details(serde_json::json!({"from": "node1", "to": "node2", "epoch": i, "reason": "node1 failed and was fenced"})),
        );
    }
    let rounds = 20;
    let t = Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        let copy = s.clone();
        bytes = serde_json::to_vec(&copy).unwrap().len();
    }
    (bytes, t.elapsed().as_secs_f64() * 1000.0 / rounds as f64)
}

#[tokio::main]
async fn main() {
    tandem_testkit::api::install_crypto();
    let samples: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("forming the cluster...");
    let (agents, creds) = start_three(tmp.path()).await;
    let (_, cluster) = call_with(None, Method::GET, &format!("{}/v1/cluster", agents[0].url()), None).await;
    let leader = cluster["leader"].as_str().unwrap_or("node1").to_string();
    eprintln!("leader {leader}");
    // The stream on a follower; changes sent to another follower (forwarded
    // to the leader, as most clients' requests are).
    let followers: Vec<usize> = (0..3).filter(|i| format!("node{}", i + 1) != leader).collect();
    let (reader, writer) = (&agents[followers[0]], &agents[followers[1]]);
    let target = format!("node{}", followers[1] + 1);
    let certs = reqwest::Certificate::from_pem_bundle(creds.ca_pem.as_bytes()).unwrap();
    let http = reqwest::Client::builder().no_proxy().tls_certs_only(certs).build().unwrap();
    let (_, page) = call_with(None, Method::GET, &format!("{}/v1/events?limit=10000", reader.url()), None).await;
    let last = page["next"].as_u64().unwrap_or(0);
    let mut resp = http
        .get(format!("{}/v1/events/stream", reader.url()))
        .bearer_auth(&creds.token)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .expect("stream");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Value)>();
    tokio::spawn(async move {
        let mut p = SseParser::default();
        while let Ok(Some(chunk)) = resp.chunk().await {
            let now = Instant::now();
            for m in p.feed(&chunk) {
                if let Ok(v) = serde_json::from_str::<Value>(&m.data) {
                    let _ = tx.send((now, v));
                }
            }
        }
    });
    // The webhook receiver: arrival time and body of each POST.
    let (hook_tx, mut hook_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Value)>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let now = Instant::now();
            let tx = hook_tx.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    let _ = tx.send((now, v));
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let spec = serde_json::json!({"kind": "webhook", "url": hook_url, "secret": "bench", "kinds": ["node."]});
    let (st, v) = call_with(
        None,
        Method::PUT,
        &format!("{}/v1/alerts/bench", writer.url()),
        Some(serde_json::to_vec(&spec).unwrap()),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let mut total = Vec::new();
    let mut after_answer = Vec::new();
    let mut to_hook = Vec::new();
    let mut answer_to_hook = Vec::new();
    for i in 0..samples + 5 {
        let (action, kind) = if i % 2 == 0 { ("standby", "node.standby") } else { ("online", "node.admin_online") };
        let url = format!("{}/v1/nodes/{target}/{action}", writer.url());
        let t0 = Instant::now();
        let (st, v) = call_with(None, Method::POST, &url, None).await;
        let answered = Instant::now();
        assert_eq!(st, 200, "{v}");
        let arrived = loop {
            let (at, e) =
                tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("event").expect("stream");
            if e["kind"] == kind && e["node"] == target.as_str() {
                break at;
            }
        };
        let hooked = loop {
            let (at, b) = tokio::time::timeout(Duration::from_secs(10), hook_rx.recv())
                .await
                .expect("webhook")
                .expect("receiver");
            if b["event"]["kind"] == kind && b["event"]["node"] == target.as_str() {
                break at;
            }
        };
        if i >= 5 {
            total.push((arrived - t0).as_secs_f64() * 1000.0);
            after_answer.push(arrived.saturating_duration_since(answered).as_secs_f64() * 1000.0);
            to_hook.push((hooked - t0).as_secs_f64() * 1000.0);
            answer_to_hook.push(hooked.saturating_duration_since(answered).as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in [&mut total, &mut after_answer, &mut to_hook, &mut answer_to_hook] {
        d.sort_by(f64::total_cmp);
    }
    // Idle: nothing happens for 20 s (groups: none; the stream stays open).
    let pids: Vec<u32> = agents.iter().map(|a| a.pid()).collect();
    let before: Vec<f64> = pids.iter().map(|p| cpu_s(*p)).collect();
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let idle: Vec<f64> =
        pids.iter().zip(&before).map(|(p, b)| (cpu_s(*p) - b) / window.as_secs_f64() * 100.0).collect();
    println!("| measure | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, d) in [
        ("request sent → event at the SSE client", &total),
        ("answer received → event at the SSE client", &after_answer),
        ("request sent → webhook delivered (alert)", &to_hook),
        ("answer received (event committed) → webhook delivered", &answer_to_hook),
    ] {
        println!("| {name} | {} | {:.2} | {:.2} | {:.2} |", d.len(), pct(d, 0.5), pct(d, 0.99), d[d.len() - 1]);
    }
    println!();
    let names: Vec<String> =
        (1..=3).map(|i| format!("node{i}{}", if format!("node{i}") == leader { " (leader)" } else { "" })).collect();
    let cpu: Vec<String> = names.iter().zip(&idle).map(|(n, c)| format!("{n} {c:.2} %")).collect();
    println!("Idle CPU over {} s, one stream open: {}", window.as_secs(), cpu.join(", "));
    println!();
    println!("| events kept | state JSON bytes | clone + encode ms (once per applied batch) |");
    println!("|---:|---:|---:|");
    for n in [0, 1_000, 10_000, 100_000] {
        let (bytes, ms) = encode_cost(n);
        println!("| {n} | {bytes} | {ms:.2} |");
    }
}
