//! Alerts on real agents, to real targets: an HTTP receiver that checks the
//! HMAC signature of each webhook, Pacemaker's own sample file agent
//! (`alert_file.sh.sample`, unmodified) as an exec alert, and Debian's
//! aiosmtpd as the mail server. Across a power loss of the leader and an
//! outage of the webhook's receiver, every event the filter wants arrives,
//! in order, at least once (duplicates only around a leader change), and a
//! failing target is itself an event. Secrets are never shown back.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const PACEMAKER_FILE_AGENT: &str = "/usr/share/pacemaker/alerts/alert_file.sh.sample";
const SECRET: &str = "webhook-s3cret-never-shown";

/// A webhook receiver: every request it got (headers, body); answers 503
/// while `down`.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    async fn start() -> (Receiver, String) {
        let r = Receiver::default();
        let (got, down) = (r.got.clone(), r.down.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (got, down) = (got.clone(), down.clone());
                async move {
                    if down.load(std::sync::atomic::Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    check_signature(&headers, &body);
                    let v: Value = serde_json::from_slice(&body).expect("a JSON body");
                    got.lock().unwrap().push((headers, v));
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (r, url)
    }

    fn bodies(&self) -> Vec<Value> {
        self.got.lock().unwrap().iter().map(|(_, b)| b.clone()).collect()
    }

    /// Ids of the events received, in arrival order (the test alert's 0 left out).
    fn event_ids(&self) -> Vec<u64> {
        self.bodies().iter().filter_map(|b| b["event"]["id"].as_u64()).filter(|id| *id > 0).collect()
    }
}

/// The receiver's side of the contract: the signature is HMAC-SHA256 of
/// `<timestamp>.<body>` with the shared secret, and the event id header
/// matches the body.
fn check_signature(headers: &HeaderMap, body: &[u8]) {
    let ts = headers["x-tandem-timestamp"].to_str().unwrap();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(headers["x-tandem-signature"].to_str().unwrap(), format!("sha256={want}"));
    let age = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
        - ts.parse::<i64>().unwrap();
    assert!(age.abs() < 60, "a fresh timestamp: {age} s");
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(headers["x-tandem-event-id"].to_str().unwrap(), v["event"]["id"].to_string());
}

async fn events_of(url: &str, kind: &str) -> Vec<Value> {
    let (st, page) = get(&format!("{url}/v1/events?since=0&limit=10000&kind={kind}")).await;
    assert_eq!(st, 200, "{page}");
    page["events"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_and_pacemaker_agent_get_every_event_across_a_power_loss_and_an_outage() {
    assert!(
        std::path::Path::new(PACEMAKER_FILE_AGENT).exists(),
        "{PACEMAKER_FILE_AGENT} is missing: install Debian's pacemaker-common (cargo xtask test does)"
    );
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let leader = c.leader().await;
    let others: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).filter(|n| *n != leader).collect();
    let (a, b) = (others[0].clone(), others[1].clone());
    let u = c.node(&a).url();
    let (rx, hook_url) = Receiver::start().await;
    let agent_log = c.tmp.path().join("pacemaker-alerts.log");

    // Refused definitions change nothing.
    for (body, field) in [
        (json!({"kind": "webhook", "url": hook_url, "colour": "red"}), "colour"),
        (json!({"kind": "webhook", "url": "ftp://x/hook"}), "url"),
        (json!({"kind": "exec", "command": ["alert_file.sh"]}), "command[0]"),
        (json!({"kind": "smtp", "server": "mail", "from": "a@b", "to": []}), "to"),
        (json!({"kind": "webhook", "url": hook_url, "kinds": ["Node"]}), "kinds[0]"),
    ] {
        let (st, e) = put(&format!("{u}/v1/alerts/bad"), body.clone()).await;
        assert_eq!((st, e["code"].as_str()), (422, Some("TND-1010")), "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(field), "{field}: {e}");
    }
    let (st, e) = get(&format!("{u}/v1/alerts/bad")).await;
    assert_eq!((st, e["code"].as_str()), (404, Some("TND-1600")), "{e}");

    // A webhook for node, group and alert events; Pacemaker's file agent for
    // node and group events.
    let hook = json!({"kind": "webhook", "url": hook_url, "secret": SECRET, "kinds": ["node.", "group.", "alert."]});
    let (st, v) = put(&format!("{u}/v1/alerts/hook"), hook).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["spec"]["secret"], "(set)", "{v}");
    let start_cursor = v["cursor"].as_u64().unwrap();
    let pcmk = json!({"kind": "exec", "command": [PACEMAKER_FILE_AGENT], "recipient": agent_log.display().to_string(),
        "kinds": ["node.", "group."], "timestamp_format": "%Y-%m-%d %H:%M:%S.%03N"});
    let (st, v) = put(&format!("{u}/v1/alerts/pcmk"), pcmk).await;
    assert_eq!(st, 201, "{v}");
    // Replacing keeps the cursor.
    let (st, v2) = put(
        &format!("{u}/v1/alerts/hook"),
        json!({"kind": "webhook", "url": hook_url, "secret": SECRET, "kinds": ["node.", "group.", "alert."]}),
    )
    .await;
    assert_eq!((st, v2["cursor"].as_u64()), (200, Some(start_cursor)), "{v2}");

    // A test alert reaches the receiver, signed.
    let (st, t) = post(&format!("{u}/v1/alerts/hook/test"), json!({})).await;
    assert_eq!(st, 200, "{t}");
    let test = rx.bodies().into_iter().find(|b| b["event"]["kind"] == "alert.test").expect("the test alert");
    assert_eq!(test["alert"], "hook");
    let (st, e) = post(&format!("{u}/v1/alerts/nope/test"), json!({})).await;
    assert_eq!((st, e["code"].as_str()), (404, Some("TND-1600")), "{e}");

    // A group and operator actions: their events go out.
    let group = json!({"resources": [{"name": "s", "type": "process", "command": ["sleep", "1000"]}], "nodes": [a, b]});
    assert_eq!(put(&format!("{u}/v1/groups/web"), group).await.0, 201);
    assert_eq!(post(&format!("{u}/v1/nodes/{b}/standby"), json!({})).await.0, 200);
    assert_eq!(post(&format!("{u}/v1/nodes/{b}/online"), json!({})).await.0, 200);
    wait_until(Duration::from_secs(15), "the group's and the nodes' events at the receiver", || {
        let kinds: Vec<String> =
            rx.bodies().iter().map(|b| b["event"]["kind"].as_str().unwrap_or("").to_string()).collect();
        async move { kinds.iter().any(|k| k == "group.running") && kinds.iter().any(|k| k == "node.admin_online") }
    })
    .await;

    // Power loss of the leader, which was sending: the new leader sends the
    // offline event (and goes on from the replicated cursor).
    c.node_mut(&leader).kill();
    let new_leader = c.new_leader(&leader).await;
    let u = c.node(&new_leader).url();
    wait_until(Duration::from_secs(20), "node.offline of the old leader at the receiver", || {
        let got =
            rx.bodies().iter().any(|b| b["event"]["kind"] == "node.offline" && b["event"]["node"] == leader.as_str());
        async move { got }
    })
    .await;
    wait_until(Duration::from_secs(10), "Pacemaker's agent writing the lost node", || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        let want = format!("Node '{leader}' is now 'lost'");
        async move { text.contains(&want) }
    })
    .await;

    // The receiver goes down: the next event is retried, its failure is an
    // event, the view says so; when it is back, it gets everything.
    rx.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let standby_node = others.iter().find(|n| **n != new_leader).unwrap().clone();
    assert_eq!(post(&format!("{u}/v1/nodes/{standby_node}/standby"), json!({})).await.0, 200);
    wait_until(Duration::from_secs(10), "alert.failed recorded", || {
        let u = u.clone();
        async move { !events_of(&u, "alert.failed").await.is_empty() }
    })
    .await;
    let (_, view) = get(&format!("{u}/v1/alerts/hook")).await;
    assert_eq!(view["delivery"]["state"], "retrying", "{view}");
    assert!(view["delivery"]["last_error"].as_str().unwrap().contains("503"), "{view}");
    assert_eq!(post(&format!("{u}/v1/nodes/{standby_node}/online"), json!({})).await.0, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rx.down.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(40), "alert.recovered at the receiver", || {
        let got = rx.bodies().iter().any(|b| b["event"]["kind"] == "alert.recovered");
        async move { got }
    })
    .await;
    let (_, view) = get(&format!("{u}/v1/alerts/hook")).await;
    assert_eq!(view["delivery"]["state"], "ok", "{view}");

    // Every event the filter wants, from the alert's definition on, arrived
    // in order (a leader change may re-send a few: never skip one).
    let (_, page) = get(&format!("{u}/v1/events?since={start_cursor}&limit=10000")).await;
    let last_received = *rx.event_ids().iter().max().unwrap();
    let wanted: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| ["node.", "group.", "alert."].iter().any(|p| e["kind"].as_str().unwrap().starts_with(p)))
        .map(|e| e["id"].as_u64().unwrap())
        .filter(|id| *id <= last_received)
        .collect();
    // A new leader re-sends from the recorded cursor: a run may repeat, but
    // each event's first delivery comes in the log's order.
    let got = rx.event_ids();
    let received = got.len();
    let mut seen = std::collections::BTreeSet::new();
    let firsts: Vec<u64> = got.iter().copied().filter(|id| seen.insert(*id)).collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted, "first deliveries in order: {got:?}");
    assert_eq!(sorted, wanted, "every wanted event, none else: {got:?}");
    eprintln!("{} events wanted, {received} deliveries ({} re-sent)", wanted.len(), received - wanted.len());
    // Pacemaker's agent wrote node and resource lines, in its own words.
    let text = std::fs::read_to_string(&agent_log).unwrap();
    assert!(text.contains(&format!("Node '{b}' is now 'standby'")), "{text}");
    assert!(text.contains("Resource operation 'start' for 'web' on"), "{text}");

    // Secrets are never shown: not in views, lists, the audit log or logs.
    let (_, list) = get(&format!("{u}/v1/alerts")).await;
    let (_, audit) = get(&format!("{u}/v1/audit?since=0&limit=10000")).await;
    for text in [list.to_string(), audit.to_string()] {
        assert!(!text.contains(SECRET), "{text}");
    }
    for n in &c.nodes {
        let log = std::fs::read_to_string(n.log_path()).unwrap_or_default();
        assert!(!log.contains(SECRET), "{} logged the secret", n.name);
    }

    // Deleted: nothing more goes out.
    let (st, _) = delete(&format!("{u}/v1/alerts/hook")).await;
    assert_eq!(st, 204);
    let before = rx.bodies().len();
    assert_eq!(post(&format!("{u}/v1/nodes/{standby_node}/maintenance"), json!({})).await.0, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.bodies().len(), before);
    assert_eq!(events_of(&u, "alert.deleted").await.len(), 1);
}

/// The CLI, as an operator runs it (token and CA from the environment the
/// harness set).
fn cli(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_ENDPOINT", endpoint)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// aiosmtpd (Debian's python3-aiosmtpd) writing what it receives to a Maildir.
struct MailServer {
    child: std::process::Child,
    maildir: std::path::PathBuf,
    port: u16,
}

impl Drop for MailServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MailServer {
    async fn start(dir: &std::path::Path) -> MailServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let maildir = dir.join("Maildir");
        let child = std::process::Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd (cargo xtask test installs it)");
        let s = MailServer { child, maildir, port };
        wait_until(Duration::from_secs(10), "aiosmtpd listening", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        s
    }

    fn mails(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            for e in std::fs::read_dir(self.maildir.join(sub)).into_iter().flatten().flatten() {
                out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_smtp_server_gets_the_offline_mail_and_the_status_report() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let leader = c.leader().await;
    let victim = c.nodes.iter().map(|n| n.name.clone()).find(|n| *n != leader).unwrap();
    let mail = MailServer::start(c.tmp.path()).await;
    let u = c.node(&leader).url();
    let spec = json!({"kind": "smtp", "server": "127.0.0.1", "port": mail.port, "starttls": false,
        "username": "ha", "password": "mail-s3cret", "from": "tandem@example.org", "to": ["ops@example.org"],
        "min_severity": "warning", "report_interval_s": 10});
    // aiosmtpd offers no AUTH: a definition with credentials fails its test
    // (and says why), one without them passes.
    let (st, _) = put(&format!("{u}/v1/alerts/mail"), spec.clone()).await;
    assert_eq!(st, 201);
    let (st, e) = post(&format!("{u}/v1/alerts/mail/test"), json!({})).await;
    assert_eq!((st, e["code"].as_str()), (502, Some("TND-1602")), "{e}");
    assert!(!e.to_string().contains("mail-s3cret"), "{e}");
    // The CLI says the same, and exits 1 (the target, not the agent, failed).
    let (code, _, err) = cli(&u, &["alert", "test", "mail"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("TND-1602"), "{err}");
    let mut spec = spec;
    spec.as_object_mut().unwrap().remove("username");
    spec.as_object_mut().unwrap().remove("password");
    assert_eq!(put(&format!("{u}/v1/alerts/mail"), spec).await.0, 200);
    let (st, t) = post(&format!("{u}/v1/alerts/mail/test"), json!({})).await;
    assert_eq!(st, 200, "{t}");
    let (code, out, err) = cli(&u, &["alert", "test", "mail"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("took the test alert"), "{out}");
    let (code, out, err) = cli(&u, &["alert", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mail") && out.contains("smtp") && out.contains("ops@example.org"), "{out}");
    assert!(!out.contains("mail-s3cret"), "{out}");
    assert!(mail.mails().iter().filter(|m| m.contains("alert.test")).count() >= 2);

    c.node_mut(&victim).kill();
    wait_until(Duration::from_secs(20), "the offline mail", || {
        let found = mail.mails().iter().any(|m| m.contains("CRITICAL") && m.contains(victim.as_str()));
        async move { found }
    })
    .await;
    let offline = mail.mails().into_iter().find(|m| m.contains("node.offline")).expect("a mail naming node.offline");
    assert!(offline.contains("To: ops@example.org"), "{offline}");
    assert!(offline.contains("From: tandem@example.org"), "{offline}");
    // min_severity warning: no info event (the definition's own) was mailed.
    assert!(!mail.mails().iter().any(|m| m.contains("alert.defined")));
    // The periodic status report names every node and its state.
    wait_until(Duration::from_secs(30), "a status report", || {
        let found = mail.mails().iter().any(|m| m.contains("status report"));
        async move { found }
    })
    .await;
    let report = mail.mails().into_iter().find(|m| m.contains("status report")).unwrap();
    for n in &c.nodes {
        assert!(report.contains(&n.name), "{} missing from\n{report}", n.name);
    }
    assert!(report.contains("offline"), "{report}");
}
