//! Bad input through the real API and the real CLI: every refusal carries
//! its stable code and leaves the replicated state unchanged.

mod common;

use std::process::Command;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Sends a raw body and checks status, code and that nothing changed.
async fn refused(c: &Cluster, method: Method, path: &str, body: Option<&[u8]>, status: u16, code: &str) {
    let before = c.cluster().await;
    // Through a follower too: forwarding must keep the leader's answer.
    for n in &c.nodes {
        let (st, v) = call(method.clone(), &format!("{}{path}", n.url()), body.map(|b| b.to_vec())).await;
        assert_eq!(st, status, "{method} {path} via {}: {v}", n.name);
        assert_eq!(v["code"], code, "{method} {path}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["hint"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let after = c.cluster().await;
    assert_eq!(replicated(&after), replicated(&before), "{method} {path} changed the state");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_their_code_and_change_nothing() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let join = |extra: &str| format!("{{\"name\": \"n9\", \"addresses\": [\"127.0.0.1\"], \"port\": 1{extra}}}");

    refused(&c, Method::POST, "/v1/nodes", Some(b"{\"name\": "), 400, "TND-1001").await;
    refused(&c, Method::POST, "/v1/nodes", Some(b"not json at all"), 400, "TND-1001").await;
    refused(&c, Method::POST, "/v1/nodes", Some(join(", \"colour\": \"red\"").as_bytes()), 400, "TND-1002").await;
    refused(&c, Method::POST, "/v1/nodes", Some(b"{\"name\": 5}"), 400, "TND-1002").await;
    refused(&c, Method::PUT, "/v1/nodes/n1/attributes/k", Some(b"{\"value\": \"v\", \"extra\": 1}"), 400, "TND-1002")
        .await;
    let huge = format!("{{\"value\": \"{}\"}}", "x".repeat(300 * 1024));
    refused(&c, Method::PUT, "/v1/nodes/n1/attributes/k", Some(huge.as_bytes()), 413, "TND-1003").await;
    refused(&c, Method::GET, "/v1/cluster?colour=red", None, 400, "TND-1004").await;
    refused(&c, Method::GET, "/v1/nope", None, 404, "TND-1005").await;
    refused(&c, Method::PATCH, "/v1/nodes/n1", None, 405, "TND-1006").await;

    refused(&c, Method::GET, "/v1/nodes/ghost", None, 404, "TND-1100").await;
    refused(&c, Method::POST, "/v1/nodes/ghost/standby", None, 404, "TND-1100").await;
    refused(&c, Method::DELETE, "/v1/nodes/ghost", None, 404, "TND-1100").await;
    refused(&c, Method::PUT, "/v1/nodes/ghost/attributes/k", Some(b"{\"value\": \"v\"}"), 404, "TND-1100").await;
    refused(&c, Method::DELETE, "/v1/nodes/n1/attributes/never-set", None, 404, "TND-1105").await;
    refused(&c, Method::PUT, "/v1/nodes/n1/attributes/Bad%20Key", Some(b"{\"value\": \"v\"}"), 422, "TND-1010").await;

    let bad_name = b"{\"name\": \"Not Valid\", \"addresses\": [\"127.0.0.1\"], \"port\": 7999}";
    refused(&c, Method::POST, "/v1/nodes", Some(bad_name), 422, "TND-1010").await;
    let bad_addr = b"{\"name\": \"n9\", \"addresses\": [\"999.1.1.1\"], \"port\": 7999}";
    refused(&c, Method::POST, "/v1/nodes", Some(bad_addr), 422, "TND-1010").await;
    let dup = b"{\"name\": \"n2\", \"addresses\": [\"127.0.0.2\"], \"port\": 7999}";
    refused(&c, Method::POST, "/v1/nodes", Some(dup), 409, "TND-1101").await;
    let taken = format!("{{\"name\": \"n9\", \"addresses\": [\"127.0.0.1\"], \"port\": {}}}", c.nodes[1].port);
    refused(&c, Method::POST, "/v1/nodes", Some(taken.as_bytes()), 409, "TND-1102").await;
    // Nobody listens there: the join is refused before anything is recorded.
    let port = free_port();
    let nobody = format!("{{\"name\": \"n9\", \"addresses\": [\"127.0.0.1\"], \"port\": {port}}}");
    refused(&c, Method::POST, "/v1/nodes", Some(nobody.as_bytes()), 409, "TND-1103").await;
    // An agent that is named differently is not adopted under a wrong name.
    let mut loner = Cluster::configure(&["loner"], Opts::default());
    loner.nodes[0].start().await;
    let as_n9 = format!("{{\"name\": \"n9\", \"addresses\": [\"127.0.0.1\"], \"port\": {}}}", loner.nodes[0].port);
    refused(&c, Method::POST, "/v1/nodes", Some(as_n9.as_bytes()), 422, "TND-1107").await;

    // Bootstrapping is for root on the node, never over the network.
    refused(&c, Method::POST, "/v1/cluster/init", Some(b"{}"), 403, "TND-1506").await;
    refused(&c, Method::POST, "/v1/cluster/join", Some(b"{\"via\": \"https://127.0.0.1:1\"}"), 403, "TND-1506").await;
    // On the admin socket: already a member.
    let (st, v) =
        tandem_testkit::api::local_call(&c.nodes[1].socket(), Method::POST, "/v1/cluster/init", json!({})).await;
    assert_eq!((st, v["code"].clone()), (409, json!("TND-1201")), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lone_agent_is_not_ready_and_says_why() {
    let mut c = Cluster::configure(&["solo"], Opts::default());
    c.nodes[0].start().await;
    // Not a member: its certificate is its own, trusted by nobody; ask it
    // on its admin socket (the test is root on that "node").
    let sock = c.nodes[0].socket();
    let local = |method: Method, path: &'static str, body: Value| {
        let sock = sock.clone();
        async move { tandem_testkit::api::local_call(&sock, method, path, body).await }
    };
    assert_eq!(local(Method::GET, "/healthz", Value::Null).await.0, 200);
    for path in ["/readyz", "/v1/cluster", "/v1/nodes"] {
        let (st, v) = local(Method::GET, path, Value::Null).await;
        assert_eq!((st, v["code"].clone()), (503, json!("TND-1200")), "{path}: {v}");
    }
    let (st, v) = local(Method::GET, "/v1/local", Value::Null).await;
    assert_eq!(st, 200);
    assert_eq!(v["name"], "solo");
    assert_eq!(v["cluster_id"], Value::Null);
    // Joining through nothing fails clearly and leaves it alone.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let hash = format!("sha256:{}", "0".repeat(64));
    let req = json!({ "via": dead, "token": "tnd_x", "ca_hash": hash });
    let (st, v) = local(Method::POST, "/v1/cluster/join", req).await;
    assert_eq!((st, v["code"].clone()), (409, json!("TND-1108")), "{v}");
    let (st, v) = local(Method::POST, "/v1/cluster/join", json!({ "via": "ftp://x" })).await;
    assert_eq!((st, v["code"].clone()), (422, json!("TND-1010")), "{v}");
    let (st, v) = local(Method::POST, "/v1/cluster/join", json!({ "via": dead })).await;
    assert_eq!((st, v["code"].clone()), (422, json!("TND-1010")), "a join needs a token: {v}");
    assert_eq!(local(Method::GET, "/v1/local", Value::Null).await.1["cluster_id"], Value::Null);
    // The OpenAPI document is served and describes the public routes.
    let (st, doc) = local(Method::GET, "/openapi.json", Value::Null).await;
    assert_eq!(st, 200);
    assert!(doc["paths"]["/v1/nodes/{name}"]["delete"].is_object(), "{doc}");
}

#[test]
fn bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("name = \"n\"\ndata_dir = \"/tmp/x\"\n[raft]\nelection_timeout_min_ms = 50\n", "raft.election_timeout_min_ms"),
        ("name = \"n\"\ndata_dir = \"/tmp/x\"\nportt = 1\n", "portt"),
        ("name = \"n\"\ndata_dir = \"/tmp/x\"\naddresses = [\"x.y\"]\n", "addresses[0]"),
        ("name = \"n\"\n", "data_dir"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN).args(["agent", "--config"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{err}");
        assert!(err.contains(key), "stderr should name {key}: {err}");
    }
    let out = Command::new(BIN).args(["agent", "--config", "/nonexistent/node.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(6));
}

fn cli(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    cli_env(endpoint, args, &[])
}

fn cli_env(endpoint: &str, args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("TANDEM_ENDPOINT", endpoint)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_drives_the_cluster_with_documented_exit_codes() {
    let mut c = Cluster::configure(&["c1", "c2", "c3"], Opts::default());
    for n in c.nodes.iter_mut() {
        n.start().await;
    }
    let (u1, u2, u3) = (c.nodes[0].url(), c.nodes[1].url(), c.nodes[2].url());
    let sock = |i: usize| c.nodes[i].socket().display().to_string();
    let (code, out, err) = cli(&u1, &["cluster", "init", "--cluster-id", "clitest", "--socket", &sock(0)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cluster clitest"), "{out}");
    let data = c.nodes[0].dir.join("c1");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    assert!(out.contains(&token), "init prints the admin token once: {out}");
    let env = [("TANDEM_TOKEN", token.clone()), ("TANDEM_CACERT", data.join("tls/ca.pem").display().to_string())];
    let creds = tandem_testkit::api::Creds {
        token: token.clone(),
        ca_pem: std::fs::read_to_string(data.join("tls/ca.pem")).unwrap(),
        ca_hash: String::new(),
    };
    for n in &c.nodes {
        tandem_testkit::api::register(&n.url(), &creds);
    }
    let cli = |u: &str, args: &[&str]| cli_env(u, args, &env);
    for i in [1, 2] {
        let (code, out, err) = cli(&u1, &["cluster", "join-token"]);
        assert_eq!(code, 0, "{err}");
        // The printed line: tandem cluster join <url> --token … --ca-hash …
        let line = out.lines().find(|l| l.trim_start().starts_with("tandem cluster join")).expect(&out);
        let mut args: Vec<String> = line.split_whitespace().skip(1).map(str::to_string).collect();
        args.extend(["--socket".to_string(), sock(i)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = tokio::task::block_in_place(|| cli(&u1, &args));
        assert_eq!(code, 0, "{err}");
    }
    c.wait_voters(3).await;
    // Without a token the CLI is refused (1), and says how to get one.
    let (code, _, err) = cli_env(&u2, &["status"], &env[1..]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("TND-1500") && err.contains("TANDEM_TOKEN"), "{err}");

    let (code, out, _) = cli(&u2, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("cluster clitest") && out.contains("NAME") && out.contains("c3"), "{out}");
    let (code, out, _) = cli(&u3, &["node", "list", "--json"]);
    assert_eq!(code, 0);
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes.as_array().map(Vec::len), Some(3));

    let (code, out, _) = cli(&u3, &["node", "standby", "c2"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = cli(&u1, &["node", "show", "c2", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["admin_state"], "standby");
    let (code, _, _) = cli(&u1, &["node", "set-attr", "c1", "disk", "ssd"]);
    assert_eq!(code, 0);
    let (code, out, _) = cli(&u2, &["node", "show", "c1"]);
    assert_eq!(code, 0);
    assert!(out.contains("attribute disk") && out.contains("ssd"), "{out}");

    let (code, _, err) = cli(&u1, &["node", "show", "ghost"]);
    assert_eq!(code, 1, "refused → 1");
    assert!(err.contains("TND-1100") && err.contains("hint"), "{err}");
    let dead = format!("https://127.0.0.1:{}", free_port());
    let (code, _, err) = cli(&dead, &["status"]);
    assert_eq!(code, 3, "unreachable → 3: {err}");
    let (code, _, _) = cli(&u1, &["node", "frobnicate"]);
    assert_eq!(code, 2, "usage → 2");

    // Without quorum the CLI says "unavailable" (4).
    c.nodes[1].kill();
    c.nodes[2].kill();
    let mut last = (0, String::new());
    for _ in 0..100 {
        let (code, _, err) = cli(&u1, &["node", "online", "c2"]);
        last = (code, err);
        if code == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(last.0, 4, "no quorum → 4: {}", last.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn volume_definitions_are_checked_and_volumes_listed() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let u = c.nodes[0].url();
    let group = |volume: Value| json!({"resources": [volume], "nodes": ["n1", "n2", "n3"]});
    let vol = |extra: Value| {
        let mut v = json!({"name": "data", "type": "volume", "size": "64MiB"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    // Each bad field is refused with its code, naming the field, through
    // every node; the group never comes to exist.
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({"size": "abc"}), 422, "TND-1010", "resources[0].size"),
        (json!({"size": "0"}), 422, "TND-1010", "resources[0].size"),
        (json!({"size": 0}), 422, "TND-1010", "resources[0].size"),
        (json!({"size": "5"}), 422, "TND-1010", "resources[0].size"),
        (json!({"size": "4097"}), 422, "TND-1010", "resources[0].size"),
        (json!({"size": "1.5B"}), 422, "TND-1010", "resources[0].size"),
        (json!({"size": "100TiB"}), 422, "TND-1010", "resources[0].size"),
        // Within the 16TiB limit but more than the agents' disk holds.
        (json!({"size": "16TiB"}), 409, "TND-1410", "resources[0].size"),
        (json!({"replicas": 4}), 422, "TND-1010", "resources[0].replicas"),
        (json!({"modes": {"n3": "async"}}), 422, "TND-1010", "resources[0].modes.n3"),
        (json!({"granularity": "3KiB"}), 422, "TND-1010", "resources[0].granularity"),
        (json!({"rate": "fast"}), 422, "TND-1010", "resources[0].rate"),
        (json!({"mode": "semi"}), 422, "TND-1010", "resources[0]"),
        (json!({"colour": "red"}), 422, "TND-1010", "resources[0]"),
    ];
    for (extra, status, code, field) in cases {
        let body = serde_json::to_vec(&group(vol(extra.clone()))).unwrap();
        refused(&c, Method::PUT, "/v1/groups/vol", Some(&body), status, code).await;
        let (_, v) = call(Method::PUT, &format!("{u}/v1/groups/vol"), Some(body)).await;
        let text = format!("{} {}", v["message"], v["hint"]);
        assert!(text.contains(field), "{extra}: {field} not named in {v}");
        assert_eq!(get(&format!("{u}/v1/groups/vol")).await.1["code"], "TND-1300", "{extra} created the group");
    }
    assert_eq!(get(&format!("{u}/v1/volumes")).await, (200, json!([])));

    // A valid volume is listed with its replicas: the first two nodes.
    let (st, v) = put(&format!("{u}/v1/groups/vol"), group(vol(json!({"modes": {"n2": "async"}})))).await;
    assert_eq!(st, 201, "{v}");
    for n in &c.nodes {
        let (st, list) = get(&format!("{}/v1/volumes", n.url())).await;
        assert_eq!(st, 200, "{list}");
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let d = &list[0];
        assert_eq!(
            (d["name"].clone(), d["group"].clone(), d["size_bytes"].clone()),
            (json!("data"), json!("vol"), json!(64 << 20))
        );
        let nodes: Vec<&str> = d["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_str().unwrap()).collect();
        assert_eq!(nodes, ["n1", "n2"], "{d}");
        // Recorded per replica (the data plane may already have changed
        // them: a secondary that connects late is recorded Outdated first).
        let recorded: Vec<&String> = d["recorded_disks"].as_object().unwrap().keys().collect();
        assert_eq!(recorded, ["n1", "n2"], "{d}");
    }
    let (st, one) = get(&format!("{u}/v1/volumes/data")).await;
    assert_eq!((st, one["name"].clone()), (200, json!("data")), "{one}");

    // The same name in another group, a resize, a replica move: refused.
    let other = serde_json::to_vec(&group(vol(json!({})))).unwrap();
    refused(&c, Method::PUT, "/v1/groups/other", Some(&other), 422, "TND-1010").await;
    let before = get(&format!("{u}/v1/groups/vol")).await.1["spec"].clone();
    let shrink = serde_json::to_vec(&group(vol(json!({"size": "32MiB"})))).unwrap();
    refused(&c, Method::PUT, "/v1/groups/vol", Some(&shrink), 409, "TND-1408").await;
    let more = serde_json::to_vec(&group(vol(json!({"replicas": 3})))).unwrap();
    refused(&c, Method::PUT, "/v1/groups/vol", Some(&more), 409, "TND-1409").await;
    assert_eq!(get(&format!("{u}/v1/groups/vol")).await.1["spec"], before, "a refused replace changed the group");

    // Volume routes check what they can before asking the primary.
    refused(&c, Method::GET, "/v1/volumes/ghost", None, 404, "TND-1407").await;
    refused(&c, Method::POST, "/v1/volumes/ghost/verify", None, 404, "TND-1407").await;
    refused(&c, Method::POST, "/v1/volumes/data/resolve", Some(b"{\"discard\": \"n3\"}"), 409, "TND-1402").await;
    refused(&c, Method::POST, "/v1/volumes/data/resolve", Some(b"{\"discard\": \"n2\", \"x\": 1}"), 400, "TND-1002")
        .await;
}

/// Every documented operation, driven through the real API with what a
/// client gets wrong (a bad query, malformed or oversize bodies, unknown
/// names), answers only statuses its OpenAPI entry lists.
#[tokio::test(flavor = "multi_thread")]
async fn every_answer_is_in_the_openapi_document() {
    use tandem_http_api::contract::{document, OPERATIONS};
    let c = Cluster::start(&["n1", "n2"], Opts::default()).await;
    let (st, served) = call(Method::GET, &format!("{}/openapi.json", c.nodes[0].url()), None).await;
    assert_eq!(st, 200);
    assert_eq!(served, document());
    let huge = format!("{{\"value\": \"{}\"}}", "x".repeat(300 * 1024)).into_bytes();
    let mut seen = std::collections::BTreeSet::new();
    for op in OPERATIONS {
        let path = op.path.replace("{name}", "ghost").replace("{key}", "k");
        let documented: Vec<String> =
            served["paths"][op.path][op.method]["responses"].as_object().unwrap().keys().cloned().collect();
        let method = Method::from_bytes(op.method.to_uppercase().as_bytes()).unwrap();
        // The event stream's 200 never ends (tests/events.rs follows it):
        // here it is asked what it refuses.
        let plain = if op.path == "/v1/events/stream" { format!("{path}?since=x") } else { path.clone() };
        let mut tries: Vec<(String, Option<Vec<u8>>)> = vec![(plain, None), (format!("{path}?colour=red"), None)];
        if op.layers.body {
            tries.extend([(path.clone(), Some(b"{".to_vec())), (path.clone(), Some(b"[1]".to_vec()))]);
            // The admin socket's routes refuse a TCP request before reading
            // its body: an oversize one then meets a closed connection.
            if !matches!(op.path, "/v1/cluster/init" | "/v1/cluster/join") {
                tries.push((path.clone(), Some(huge.clone())));
            }
        }
        for n in &c.nodes {
            // With the admin token, with none, and with a forged one.
            for (token, (p, body)) in
                tries.iter().map(|t| ("admin", t)).chain([("", &tries[0]), ("tnd_forged", &tries[0])])
            {
                let url = format!("{}{p}", n.url());
                let (st, v) = if token == "admin" {
                    call(method.clone(), &url, body.clone()).await
                } else {
                    call_as(token, method.clone(), &url, body.clone()).await
                };
                assert!(
                    documented.contains(&st.to_string()),
                    "{method} {p} via {} (token {token:?}): {st} {v} not in {documented:?}",
                    n.name
                );
                seen.insert(st);
            }
        }
    }
    // The tries reached the layers: bad queries, bodies, sizes, unknown
    // names, no token, the admin socket's routes over TCP.
    for st in [400, 401, 403, 404, 413] {
        assert!(seen.contains(&st), "no {st} in {seen:?}");
    }
}
