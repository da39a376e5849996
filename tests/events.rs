//! The event stream on real agents: a Server-Sent Events client (reqwest,
//! streaming, no timeout) follows `/v1/events/stream` across the power loss
//! of the node it reads from, which is the leader; it resumes on another node
//! with `Last-Event-ID`; every expected event arrives once, in order. A
//! reader older than the retention gets `event: reset` first. The CLI's
//! `tandem events` reads the same.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use tandem::cli::{SseMessage, SseParser};
use tokio::sync::mpsc;

/// A stream reader: messages as they arrive; `None` when the connection ended.
struct Follower {
    rx: mpsc::UnboundedReceiver<Option<SseMessage>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn stream_client(c: &Cluster) -> reqwest::Client {
    tandem_testkit::api::install_crypto();
    let certs = reqwest::Certificate::from_pem_bundle(c.creds().ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder().no_proxy().tls_certs_only(certs).build().unwrap()
}

async fn follow(c: &Cluster, url: &str, last_id: Option<u64>) -> Follower {
    let mut req = stream_client(c).get(format!("{url}/v1/events/stream")).bearer_auth(&c.creds().token);
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let mut resp = req.send().await.expect("the stream opens");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut p = SseParser::default();
        while let Ok(Some(chunk)) = resp.chunk().await {
            for m in p.feed(&chunk) {
                let _ = tx.send(Some(m));
            }
        }
        let _ = tx.send(None);
    });
    Follower { rx, task }
}

impl Follower {
    /// The next message, or None when the connection ended; panics after `limit`.
    async fn next(&mut self, limit: Duration) -> Option<SseMessage> {
        tokio::time::timeout(limit, self.rx.recv()).await.expect("a stream message in time").flatten()
    }

    /// Reads events into `seen` until `done(seen)` holds; false if the
    /// connection ended first.
    async fn read_until(&mut self, seen: &mut Vec<Value>, limit: Duration, done: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(seen) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Ok(m) = tokio::time::timeout(left, self.rx.recv()).await else {
                panic!("events not seen in {limit:?}; got {:#?}", kinds(seen))
            };
            let Some(Some(m)) = m else { return false };
            assert_ne!(m.event.as_deref(), Some("reset"), "no event was lost: {m:?}");
            let e: Value = serde_json::from_str(&m.data).unwrap();
            assert_eq!(m.id.as_deref(), Some(e["id"].to_string().as_str()), "`id:` is the event's id");
            seen.push(e);
        }
        true
    }
}

fn kinds(seen: &[Value]) -> Vec<String> {
    seen.iter().map(|e| format!("{} {} {}", e["id"], e["kind"].as_str().unwrap_or(""), e["node"])).collect()
}

fn has(seen: &[Value], kind: &str, node: &str) -> bool {
    seen.iter().any(|e| e["kind"] == kind && e["node"] == node)
}

fn count(seen: &[Value], kind: &str, node: &str) -> usize {
    seen.iter().filter(|e| e["kind"] == kind && e["node"] == node).count()
}

fn position(seen: &[Value], kind: &str, node: &str) -> usize {
    seen.iter().position(|e| e["kind"] == kind && e["node"] == node).unwrap_or_else(|| panic!("no {kind} {node}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_follows_a_power_loss_and_a_leader_change_exactly_once_in_order() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let leader = c.leader().await;
    let others: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).filter(|n| *n != leader).collect();
    let (a, b) = (others[0].clone(), others[1].clone());
    // Read from the leader, from the very first event.
    let mut f = follow(&c, &c.node(&leader).url(), None).await;
    let mut seen = Vec::new();
    f.read_until(&mut seen, Duration::from_secs(10), |s| has(s, "node.added", "n3")).await;
    assert_eq!(seen[0]["kind"], "cluster.bootstrapped");
    // Operator changes, through another node: the state machine's events,
    // naming who asked.
    let url = c.node(&a).url();
    assert_eq!(post(&format!("{url}/v1/nodes/{b}/standby"), json!({})).await.0, 200);
    assert_eq!(post(&format!("{url}/v1/nodes/{b}/online"), json!({})).await.0, 200);
    f.read_until(&mut seen, Duration::from_secs(10), |s| has(s, "node.admin_online", &b)).await;
    let standby = &seen[position(&seen, "node.standby", &b)];
    assert_eq!(standby["severity"], "info");
    assert!(standby["details"]["by"].as_str().is_some_and(|w| w.starts_with("token:")), "{standby}");
    assert!(standby["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{standby}");
    let before_kill = seen.last().unwrap()["id"].as_u64().unwrap();

    // Power loss of the node the client reads from, the leader.
    c.node_mut(&leader).kill();
    // The connection ends (a power loss may also leave it silent: a
    // keep-alive every 10 s would show it; the kernel closes it here).
    let ended = f.read_until(&mut seen, Duration::from_secs(15), |_| false).await;
    assert!(!ended);
    let last = seen.last().unwrap()["id"].as_u64().unwrap();
    // Resume on a surviving node after the last event shown.
    let mut f = follow(&c, &c.node(&a).url(), Some(last)).await;
    let new_leader = c.new_leader(&leader).await;
    f.read_until(&mut seen, Duration::from_secs(20), |s| {
        has(s, "node.offline", &leader) && has(s, "leader.elected", &new_leader)
    })
    .await;
    // The old leader comes back: online again.
    c.node_mut(&leader).start().await;
    f.read_until(&mut seen, Duration::from_secs(20), |s| has(s, "node.online", &leader)).await;
    // A disconnect without a power loss: resume by Last-Event-ID on the third node.
    drop(f);
    let last = seen.last().unwrap()["id"].as_u64().unwrap();
    let mut f = follow(&c, &c.node(&b).url(), Some(last)).await;
    assert_eq!(post(&format!("{}/v1/nodes/{a}/maintenance", c.node(&b).url()), json!({})).await.0, 200);
    f.read_until(&mut seen, Duration::from_secs(10), |s| has(s, "node.maintenance", &a)).await;

    // Every id once, in order, none skipped: the client saw the whole log.
    let ids: Vec<u64> = seen.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=ids.len() as u64).collect();
    assert_eq!(ids, want, "{:#?}", kinds(&seen));
    // Each expected event once, in the order it happened.
    for (kind, node) in [
        ("node.standby", b.as_str()),
        ("node.admin_online", b.as_str()),
        ("node.offline", leader.as_str()),
        ("node.online", leader.as_str()),
        ("node.maintenance", a.as_str()),
    ] {
        assert_eq!(count(&seen, kind, node), 1, "{kind} {node}: {:#?}", kinds(&seen));
    }
    assert!(position(&seen, "node.admin_online", &b) < position(&seen, "node.offline", &leader));
    assert!(position(&seen, "node.offline", &leader) < position(&seen, "node.online", &leader));
    assert!(seen[position(&seen, "node.offline", &leader)]["id"].as_u64().unwrap() > before_kill);
    assert_eq!(seen[position(&seen, "node.offline", &leader)]["severity"], "critical");
    let elected: Vec<&Value> =
        seen.iter().filter(|e| e["kind"] == "leader.elected" && e["id"].as_u64() > Some(before_kill)).collect();
    // One per election (a restarted node may call one more): never twice a term.
    assert!(!elected.is_empty(), "{:#?}", kinds(&seen));
    assert_eq!(elected[0]["node"], new_leader.as_str());
    let mut terms: Vec<u64> = elected.iter().map(|e| e["details"]["term"].as_u64().unwrap()).collect();
    terms.dedup();
    assert_eq!(terms.len(), elected.len(), "{:#?}", kinds(&seen));
    // Every node serves the same log: the same ids, kinds and times.
    for n in c.nodes.iter() {
        let (st, page) = get(&format!("{}/v1/events?since=0&limit=10000", n.url())).await;
        assert_eq!(st, 200, "{page}");
        let theirs: Vec<(u64, String)> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["id"].as_u64().unwrap(), e["kind"].as_str().unwrap().to_string()))
            .collect();
        let ours: Vec<(u64, String)> =
            seen.iter().map(|e| (e["id"].as_u64().unwrap(), e["kind"].as_str().unwrap().to_string())).collect();
        assert_eq!(&theirs[..ours.len().min(theirs.len())], &ours[..ours.len().min(theirs.len())], "{}", n.name);
    }
    // Filters: a kind prefix and a minimum severity.
    let u = c.node(&a).url();
    let (_, page) = get(&format!("{u}/v1/events?kind=node.offline,node.online&severity=critical")).await;
    let got: Vec<&str> = page["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(got, vec!["node.offline"], "{page}");
    let (st, e) = get(&format!("{u}/v1/events?severity=loud")).await;
    assert_eq!((st, e["code"].as_str()), (400, Some("TND-1004")), "{e}");

    // Quorum lost: two of three nodes down for longer than the lease; the
    // survivor records it once it hears a majority again, dated when its
    // lease ran out.
    c.node_mut(&a).kill();
    c.node_mut(&leader).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.node_mut(&a).start().await;
    let u = c.node(&b).url();
    let mut lost = Value::Null;
    for _ in 0..200 {
        let (_, page) = get(&format!("{u}/v1/events?kind=quorum.")).await;
        if let Some(e) = page["events"].as_array().and_then(|e| e.first()) {
            lost = e.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lost["kind"], "quorum.lost", "{lost}");
    assert_eq!(lost["node"], b.as_str(), "{lost}");
    assert!(lost["details"]["seconds"].as_f64().is_some_and(|s| s > 1.0), "{lost}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_older_than_the_retention_is_told_before_anything_else() {
    let c = Cluster::start(&["n1"], Opts { voters: 1, extra: "[events]\nretention = 10\n".into() }).await;
    let u = c.nodes[0].url();
    // The node's own election is recorded through its event queue, a moment
    // after it leads: once it is in, the log grows only by what we do.
    wait_until(Duration::from_secs(10), "the election recorded", || async {
        get(&format!("{u}/v1/events?kind=leader.elected")).await.1["events"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    for i in 0..12 {
        let action = if i % 2 == 0 { "standby" } else { "online" };
        assert_eq!(post(&format!("{u}/v1/nodes/n1/{action}"), json!({})).await.0, 200);
    }
    let (st, page) = get(&format!("{u}/v1/events?since=1")).await;
    assert_eq!(st, 200, "{page}");
    let first = page["reset"].as_u64().expect("a reset: events after 1 are gone");
    assert!(first > 2, "{page}");
    assert_eq!(page["events"][0]["id"].as_u64(), Some(first));
    assert_eq!(page["events"].as_array().unwrap().len(), 10);
    // The stream: `event: reset` first, then the oldest kept event.
    let mut f = follow(&c, &u, Some(1)).await;
    let reset = f.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!((data["first_id"].as_u64(), data["asked"].as_u64()), (Some(first), Some(1)));
    let next = f.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(next.id, Some(first.to_string()));
    // A reader that is up to date gets no reset: only what came after
    // (this node's own observations, e.g. its election, may be recorded
    // late, after the page above was read).
    let last = page["next"].as_u64().unwrap();
    let (_, fresh) = get(&format!("{u}/v1/events?since={last}")).await;
    assert!(fresh["reset"].is_null(), "{fresh}");
    let later = fresh["events"].as_array().unwrap();
    assert!(later.iter().all(|e| e["id"].as_u64() > Some(last) && e["kind"] != "node.standby"), "{fresh}");
    // The CLI says so too, and follows (-f) until stopped.
    let out = std::process::Command::new(BIN).args(["--endpoint", &u, "events", "--since", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("gone (retention)") && text.contains("node.standby"), "{text}");
    let mut child = std::process::Command::new(BIN)
        .args(["--endpoint", &u, "--json", "events", "-f", "--since", &last.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(post(&format!("{u}/v1/nodes/n1/maintenance"), json!({})).await.0, 200);
    let stdout = child.stdout.take().unwrap();
    // Events this node observed itself (its election) may be recorded
    // after `last` was read: the maintenance event is the first of its kind.
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout).lines().take(20) {
            let Ok(line) = line else { break };
            let done = line.contains("node.maintenance");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(Duration::from_secs(10), lines).await.expect("tandem events -f printed").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let events: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap_or_default()).collect();
    let ids: Vec<u64> = events.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert_eq!(ids.first(), Some(&(last + 1)), "follows from the id asked: {lines:?}");
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{lines:?}");
    assert_eq!(events.last().and_then(|e| e["kind"].as_str()), Some("node.maintenance"), "{lines:?}");
    let _ = call(Method::POST, &format!("{u}/v1/nodes/n1/online"), None).await;
}
