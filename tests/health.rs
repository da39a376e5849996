//! Load-balancer health endpoints on a real cluster (agents on loopback):
//! `/v1/groups/{name}/health` answers 200 on the one node that serves the
//! group and 503 everywhere else — sampled all through a failover, never
//! two at once — and stops answering 200 when that node's lease lapses;
//! `/v1/volumes/{name}/primary` and `/replica?lag=` follow the volume.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

/// The status a load balancer sees: HTTPS with the cluster CA, no token
/// (these endpoints are open).
async fn status(method: Method, url: &str) -> u16 {
    let client = tandem_testkit::api::client();
    match client.request(method, url).timeout(Duration::from_secs(3)).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Which live nodes answer 200 for the group now.
async fn serving(c: &Cluster, group: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in c.nodes.iter().filter(|n| n.child.is_some()) {
        if status(Method::GET, &format!("{}/v1/groups/{group}/health", n.url())).await == 200 {
            out.push(n.name.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_at_a_time_answers_for_a_group_and_its_volume() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let def = json!({
        "resources": [
            {"name": "data", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 2},
            {"name": "app", "type": "process", "command": ["sleep", "1000"]}
        ],
        "nodes": ["n1", "n2", "n3"],
    });
    let (st, v) = put(&format!("{}/v1/groups/g", c.nodes[0].url()), def).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(20), "n1 serves g", || async { serving(&c, "g").await == ["n1"] }).await;

    // Every method a load balancer uses; no body needed.
    let (n1, n2) = (c.nodes[0].url(), c.nodes[1].url());
    for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
        assert_eq!(status(m.clone(), &format!("{n1}/v1/groups/g/health")).await, 200, "{m}");
        assert_eq!(status(m.clone(), &format!("{n2}/v1/groups/g/health")).await, 503, "{m}");
    }
    let (st, body) = get(&format!("{n2}/v1/groups/g/health")).await;
    assert_eq!((st, body["serving"].clone(), body["reason"].clone()), (503, json!(false), json!("not placed here")));
    assert_eq!(status(Method::GET, &format!("{n1}/v1/groups/nope/health")).await, 503);
    assert_eq!(status(Method::GET, &format!("{n1}/v1/groups/g/health?x=1")).await, 400);

    // The volume: primary on n1, an up-to-date replica on n2.
    wait_until(Duration::from_secs(20), "n2's replica is connected and up to date", || async {
        status(Method::GET, &format!("{n2}/v1/volumes/data/replica")).await == 200
    })
    .await;
    assert_eq!(status(Method::GET, &format!("{n1}/v1/volumes/data/primary")).await, 200);
    assert_eq!(status(Method::GET, &format!("{n2}/v1/volumes/data/primary")).await, 503);
    assert_eq!(status(Method::GET, &format!("{n1}/v1/volumes/data/replica?lag=16MiB")).await, 503);
    assert_eq!(status(Method::GET, &format!("{}/v1/volumes/data/replica", c.nodes[2].url())).await, 503);
    assert_eq!(status(Method::GET, &format!("{n2}/v1/volumes/data/replica?lag=lots")).await, 400);

    // Power loss of n1: sampled all through the failover, never two.
    c.node_mut("n1").kill();
    let mut seen = Vec::new();
    for _ in 0..200 {
        let now = serving(&c, "g").await;
        assert!(now.len() <= 1, "two nodes answer 200 for one group: {now:?}");
        if now == ["n2"] {
            seen = now;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, ["n2"], "n2 never served g");
    assert_eq!(status(Method::GET, &format!("{n2}/v1/volumes/data/primary")).await, 200);

    // n2 loses its majority (n3 gone too): its lease lapses, it stops
    // answering 200 although nothing else serves.
    c.node_mut("n3").kill();
    wait_until(Duration::from_secs(10), "n2 stops answering 200", || async {
        status(Method::GET, &format!("{n2}/v1/groups/g/health")).await == 503
    })
    .await;
    let (_, body) = get(&format!("{n2}/v1/groups/g/health")).await;
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("lease")), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resource_is_not_served_before_its_first_monitor_passes() {
    let c = Cluster::start(&["n1"], Opts { voters: 1, ..Opts::default() }).await;
    // Its start returns at once; its monitor fails until the service
    // "answers" (a server still loading its data).
    let dir = c.tmp.path().to_path_buf();
    let script = dir.join("svc.sh");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\ncase \"$1\" in\nstart|stop) exit 0 ;;\nmonitor) [ -e {} ] || exit 7 ;;\nesac\nexit 0\n",
            dir.join("answers").display()
        ),
    );
    let def = json!({
        "resources": [{"name": "svc", "type": "exec", "path": script.display().to_string(),
                       "monitor": {"interval_ms": 200, "timeout_ms": 5000}}],
        "nodes": ["n1"], "max_restarts": 1000,
    });
    let n1 = c.nodes[0].url();
    let (st, v) = put(&format!("{n1}/v1/groups/g"), def).await;
    assert_eq!(st, 201, "{v}");
    // Started over and over (each start succeeds, each first monitor
    // fails): never served meanwhile.
    wait_until(Duration::from_secs(15), "a start", || async {
        std::fs::read_to_string(dir.join("n1").join("groups").join("g").join("svc.log")).is_ok()
            || get(&format!("{n1}/v1/groups/g")).await.1["resources"][0]["last_error"].is_string()
    })
    .await;
    for _ in 0..40 {
        let (st, body) = get(&format!("{n1}/v1/groups/g/health")).await;
        assert_eq!(st, 503, "served before its monitor passed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = get(&format!("{n1}/v1/groups/g")).await.1;
    assert_ne!(g["resources"][0]["state"], "running", "{g}");
    // It answers: served once its monitor passed.
    std::fs::write(dir.join("answers"), "").unwrap();
    wait_until(Duration::from_secs(15), "served", || async {
        status(Method::GET, &format!("{n1}/v1/groups/g/health")).await == 200
    })
    .await;
    assert_eq!(get(&format!("{n1}/v1/groups/g")).await.1["resources"][0]["state"], "running");
}

/// A web service that answers with the name of the node it runs on.
const WHO: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = os.environ["TANDEM_NODE"].encode()
        self.send_response(200)
        self.send_header("content-length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;

/// Drops everything host `ns` exchanges with `peers` (both ways): a
/// partition from the other nodes, while the load balancer (on the bridge)
/// still reaches it.
fn partition(ns: &str, peers: &[String]) {
    let set = peers.join(", ");
    let rules = format!(
        "table inet part {{\n chain in {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}\n \
         chain out {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("part-{ns}.nft"));
    std::fs::write(&path, rules).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f"])
        .arg(&path)
        .output()
        .expect("nft (apt-get install nftables)");
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_follows_the_group_and_never_sees_two_servers() {
    if !tandem_testkit::is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let Some(haproxy) =
        ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().find(|p| std::path::Path::new(p).exists())
    else {
        panic!("haproxy is not installed (apt-get install haproxy; cargo xtask test installs it)");
    };
    let mut net = tandem_testkit::Net::new();
    let mut c = Cluster::configure(&[], Opts::default());
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        let (ns, addr) = net.host(i);
        hosts.push((ns.clone(), addr.clone()));
        c.add_host(&format!("n{i}"), "", &addr, Some(ns));
    }
    let mut c = c.form().await;
    let def = json!({"resources": [{"name": "who", "type": "process", "command": ["python3", "-c", WHO]}],
                     "nodes": ["n1", "n2", "n3"]});
    let (st, v) = put(&format!("{}/v1/groups/web", c.nodes[0].url()), def).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(20), "n1 serves web", || async { serving(&c, "web").await == ["n1"] }).await;

    // HAProxy in the root namespace, checking every node's health endpoint
    // over HTTPS, verifying the node's certificate against the cluster CA.
    let port = tandem_testkit::free_port();
    let ca = c.tmp.path().join("ca.pem").display().to_string();
    let servers: String = hosts
        .iter()
        .enumerate()
        .map(|(i, (_, addr))| {
            format!("    server n{} {addr}:8080 check port 7401 check-ssl verify required ca-file {ca}\n", i + 1)
        })
        .collect();
    let cfg = format!(
        "global\n    maxconn 100\ndefaults\n    mode http\n    timeout connect 500ms\n    timeout client 5s\n    \
         timeout server 5s\n    timeout check 500ms\nfrontend f\n    bind 127.0.0.1:{port}\n    default_backend web\n\
         backend web\n    option httpchk GET /v1/groups/web/health\n    http-check expect status 200\n    \
         default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions\n{servers}"
    );
    let cfg_path = c.tmp.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).unwrap();
    let lb = std::process::Command::new(haproxy)
        .args(["-db", "-f"])
        .arg(&cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(c.tmp.path().join("haproxy.log")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _lb = Kill(lb);
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
    let through_lb = || {
        let client = client.clone();
        async move {
            match client.get(format!("http://127.0.0.1:{port}/")).send().await {
                Ok(r) if r.status() == 200 => r.text().await.ok(),
                _ => None,
            }
        }
    };
    wait_until(Duration::from_secs(10), "HAProxy sends clients to n1", || async {
        through_lb().await.as_deref() == Some("n1")
    })
    .await;

    // n1 cut off from its peers (HAProxy still reaches it): it stops
    // answering 200 before n2 starts, and HAProxy follows.
    let peers: Vec<String> = hosts[1..].iter().map(|(_, a)| a.clone()).collect();
    partition(&hosts[0].0, &peers);
    let mut moved = false;
    for _ in 0..400 {
        let now = serving(&c, "web").await;
        assert!(now.len() <= 1, "two nodes answer 200 for one group: {now:?}");
        if through_lb().await.as_deref().is_some_and(|n| n != "n1") {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "HAProxy never moved off the cut-off n1");
    let new = through_lb().await.unwrap();
    assert_eq!(serving(&c, "web").await, std::slice::from_ref(&new));

    // The partition heals; then a power loss of the new server: HAProxy
    // follows again (n1 and the third node keep a majority).
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &hosts[0].0, "nft", "delete", "table", "inet", "part"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(Duration::from_secs(10), "n1 is online again", || async {
        let (_, v) = get(&format!("{}/v1/nodes/n1", c.node(&new).url())).await;
        v["state"] == "online"
    })
    .await;
    c.node_mut(&new).kill();
    let mut moved = false;
    for _ in 0..400 {
        let now = serving(&c, "web").await;
        assert!(now.len() <= 1, "two nodes answer 200 for one group: {now:?}");
        if through_lb().await.is_some_and(|n| n != new) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "HAProxy never followed the group after {new}'s power loss");
    drop(net);
}
