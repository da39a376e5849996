//! Security through the real API over real TLS, with certificates and tokens
//! the product made: each role gets exactly its routes; revoked, expired
//! and unknown tokens are refused everywhere and change nothing; a removed
//! node's certificate and a foreign CA's are refused at the handshake;
//! a join checks the CA pin before sending anything; every refusal is in
//! the audit log; no token ever reaches a log.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Who may call each route, written out here (independently of the
/// product's own table) for every operation the API has.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "open"),
    ("GET", "/readyz", "open"),
    ("GET", "/openapi.json", "open"),
    ("GET", "/v1/cluster/ca", "open"),
    ("GET", "/v1/groups/{name}/health", "open"),
    ("GET", "/v1/volumes/{name}/primary", "open"),
    ("GET", "/v1/volumes/{name}/replica", "open"),
    ("GET", "/ui/", "open"),
    ("GET", "/v1/local", "viewer"),
    ("GET", "/v1/session", "viewer"),
    ("GET", "/metrics", "viewer"),
    ("GET", "/v1/cluster", "viewer"),
    ("GET", "/v1/nodes", "viewer"),
    ("GET", "/v1/nodes/{name}", "viewer"),
    ("GET", "/v1/groups", "viewer"),
    ("GET", "/v1/groups/{name}", "viewer"),
    ("GET", "/v1/volumes", "viewer"),
    ("GET", "/v1/volumes/{name}", "viewer"),
    ("POST", "/v1/nodes/{name}/standby", "operator"),
    ("POST", "/v1/nodes/{name}/online", "operator"),
    ("POST", "/v1/nodes/{name}/maintenance", "operator"),
    ("POST", "/v1/groups/{name}/start", "operator"),
    ("POST", "/v1/groups/{name}/stop", "operator"),
    ("POST", "/v1/groups/{name}/clear", "operator"),
    ("POST", "/v1/groups/{name}/move", "operator"),
    ("POST", "/v1/volumes/{name}/verify", "operator"),
    ("POST", "/v1/nodes", "join"),
    ("DELETE", "/v1/nodes/{name}", "admin"),
    ("PUT", "/v1/nodes/{name}/attributes/{key}", "admin"),
    ("DELETE", "/v1/nodes/{name}/attributes/{key}", "admin"),
    ("PUT", "/v1/groups/{name}", "admin"),
    ("DELETE", "/v1/groups/{name}", "admin"),
    ("POST", "/v1/volumes/{name}/resolve", "admin"),
    ("POST", "/v1/volumes/{name}/replicas/{node}/replace", "admin"),
    ("POST", "/v1/volumes/{name}/promote", "admin"),
    ("GET", "/v1/tokens", "admin"),
    ("POST", "/v1/tokens", "admin"),
    ("DELETE", "/v1/tokens/{name}", "admin"),
    ("POST", "/v1/cluster/join-token", "admin"),
    ("GET", "/v1/certificates", "admin"),
    ("POST", "/v1/certificates", "admin"),
    ("DELETE", "/v1/certificates/{name}", "admin"),
    ("GET", "/v1/audit", "admin"),
    ("POST", "/v1/cluster/recover", "admin"),
    ("GET", "/v1/sites", "viewer"),
    ("POST", "/v1/sites/{site}/standby", "operator"),
    ("POST", "/v1/sites/{site}/online", "operator"),
    ("POST", "/v1/sites/{site}/switchover", "operator"),
    ("GET", "/v1/ticket", "viewer"),
    ("POST", "/v1/ticket/acquire", "admin"),
    ("POST", "/v1/ticket/release", "admin"),
    ("GET", "/v1/alerts", "viewer"),
    ("GET", "/v1/alerts/{name}", "viewer"),
    ("PUT", "/v1/alerts/{name}", "admin"),
    ("DELETE", "/v1/alerts/{name}", "admin"),
    ("POST", "/v1/alerts/{name}/test", "admin"),
    ("GET", "/v1/events", "viewer"),
    ("GET", "/v1/events/stream", "viewer"),
    ("POST", "/v1/cluster/init", "local"),
    ("POST", "/v1/cluster/join", "local"),
    ("POST", "/internal/raft/append", "node"),
    ("POST", "/internal/raft/vote", "node"),
    ("POST", "/internal/raft/snapshot", "node"),
    ("POST", "/internal/groups/{name}/report", "node"),
    ("POST", "/internal/groups/{name}/claim", "node"),
    ("GET", "/internal/groups/{name}/local", "node"),
    ("POST", "/internal/volumes/{name}/disk", "node"),
    ("GET", "/internal/volumes/{name}/local", "node"),
    ("POST", "/internal/volumes/{name}/verify", "node"),
    ("POST", "/internal/volumes/{name}/resolve", "node"),
    ("POST", "/internal/release", "node"),
    ("POST", "/internal/audit", "node"),
    ("POST", "/internal/events", "node"),
    ("POST", "/internal/certificate", "node"),
    ("POST", "/internal/node-certificate", "node"),
    ("POST", "/internal/ca-key", "node"),
    ("POST", "/internal/ticket", "open"),
];

fn allowed(role: &str, need: &str) -> bool {
    match need {
        "open" => true,
        "viewer" => matches!(role, "viewer" | "operator" | "admin"),
        "operator" => matches!(role, "operator" | "admin"),
        "admin" => role == "admin",
        "join" => matches!(role, "admin" | "join"),
        // Node certificates and the admin socket only: never a token.
        _ => false,
    }
}

async fn token(c: &Cluster, name: &str, role: &str, expires: Option<u64>) -> String {
    let u = c.nodes[0].url();
    let (st, v) = post(&format!("{u}/v1/tokens"), json!({"name": name, "role": role, "expires_in_s": expires})).await;
    assert_eq!(st, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_gets_exactly_its_routes_and_refusals_change_nothing() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let u = c.nodes[1].url();
    // The table covers every operation the OpenAPI document lists.
    let (_, doc) = get(&format!("{u}/openapi.json")).await;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            assert!(
                ROUTES.iter().any(|(rm, rp, _)| *rm == m && rp == path),
                "{m} {path} is in the API but not in this test's table"
            );
        }
    }
    let join = {
        let (st, v) = post(&format!("{u}/v1/cluster/join-token"), json!({})).await;
        assert_eq!(st, 201, "{v}");
        v["token"].as_str().unwrap().to_string()
    };
    let tokens = [
        ("none", String::new()),
        ("viewer", token(&c, "v", "viewer", None).await),
        ("operator", token(&c, "o", "operator", None).await),
        ("join", join),
        ("admin", c.creds().token.clone()),
    ];
    // The event stream never ends: a query it refuses (400, after the
    // authorization) shows whether the role got in without waiting on it.
    let url = |path: &str| {
        let path = if path == "/v1/events/stream" { "/v1/events/stream?limit=1" } else { path };
        format!("{u}{}", path.replace("{name}", "zz-none").replace("{key}", "k").replace("{site}", "zz-none"))
    };
    let before = replicated(&c.cluster().await);
    // Every refusal first, then check that none of them changed anything.
    for (method, path, need) in ROUTES {
        for (role, secret) in &tokens {
            if allowed(role, need) {
                continue;
            }
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let (st, v) = call_as(secret, m, &url(path), Some(b"{}".to_vec())).await;
            let want = if *role == "none" {
                (401, "TND-1500")
            } else if *need == "local" {
                (403, "TND-1506")
            } else {
                (403, "TND-1502")
            };
            assert_eq!((st, v["code"].as_str().unwrap_or("")), want, "{role} {method} {path}: {v}");
        }
    }
    assert_eq!(replicated(&c.cluster().await), before, "a refused request changed the state");
    for (method, path, need) in ROUTES {
        for (role, secret) in &tokens {
            if !allowed(role, need) {
                continue;
            }
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let (st, v) = call_as(secret, m, &url(path), Some(b"{}".to_vec())).await;
            assert!(st != 401 && st != 403 && st != 0, "{role} {method} {path} was refused: {st} {v}");
        }
    }
    // The admin's refusals and the viewer's attempts are in the audit log,
    // with who and the outcome; an accepted change carries its body digest.
    wait_until(Duration::from_secs(10), "the audit log", || async {
        let (_, log) = get(&format!("{u}/v1/audit?limit=10000")).await;
        let log = log.as_array().cloned().unwrap_or_default();
        let refused = log.iter().any(|e| {
            e["who"] == "token:v" && e["path"] == "/v1/groups/zz-none" && e["method"] == "PUT" && e["status"] == 403
        });
        let anonymous = log.iter().any(|e| e["who"] == "anonymous" && e["status"] == 401 && e["from"] == "127.0.0.1");
        let accepted = log.iter().any(|e| {
            e["who"] == "token:admin"
                && e["path"] == "/v1/cluster/join-token"
                && e["status"] == 201
                && e["body_sha256"].as_str().is_some_and(|d| d.len() == 64)
        });
        refused && anonymous && accepted
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_expired_and_unknown_tokens_are_refused_on_every_node() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let ops = token(&c, "ops", "operator", None).await;
    let short = token(&c, "short", "viewer", Some(1)).await;
    for n in &c.nodes {
        let (st, v) = call_as(&ops, Method::GET, &format!("{}/v1/groups", n.url()), None).await;
        assert_eq!(st, 200, "{v}");
    }
    // Listed without secrets.
    let (_, list) = get(&format!("{}/v1/tokens", c.nodes[2].url())).await;
    let text = list.to_string();
    assert!(text.contains("\"ops\"") && !text.contains(&ops) && !text.contains("hash"), "{text}");
    let (st, _) = delete(&format!("{}/v1/tokens/ops", c.nodes[1].url())).await;
    assert_eq!(st, 204);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let forged = format!("tnd_{}", "A".repeat(43));
    for n in &c.nodes {
        for (t, why) in [(&ops, "revoked"), (&short, "expired"), (&forged, "unknown")] {
            let (st, v) = call_as(t, Method::POST, &format!("{}/v1/nodes/n2/standby", n.url()), None).await;
            assert_eq!((st, v["code"].clone()), (401, json!("TND-1501")), "{why} via {}: {v}", n.name);
        }
        let (st, v) = call_as("Basic abc", Method::GET, &format!("{}/v1/cluster", n.url()), None).await;
        assert_eq!(st, 401, "{v}");
    }
    let cluster = c.cluster().await;
    assert_eq!(member(&cluster, "n2")["admin_state"], "online", "a refused token changed something");
    // Tokens never reach a log: neither the admin's nor the others.
    for n in &c.nodes {
        let log = std::fs::read_to_string(n.log_path()).unwrap();
        for secret in [&c.creds().token, &ops, &short] {
            assert!(!log.contains(secret.as_str()), "{} logged a token", n.name);
        }
    }
}

/// A client certificate from files (PEM key and certificate).
fn client_with_cert(ca_pem: &str, cert_pem: &str, key_pem: &str) -> reqwest::Client {
    tandem_testkit::api::install_crypto();
    let id = reqwest::Identity::from_pem(format!("{key_pem}\n{cert_pem}").as_bytes()).unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .identity(id)
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// Opens a TLS connection to the replication port with `cert`; whether the
/// server accepts it (a refused handshake fails on the first read).
async fn replication_accepts(addr: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tandem_testkit::api::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_client_auth_cert(certs, key).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let Ok(mut s) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3: the server judges the client certificate after the client's
    // handshake ends; a refusal arrives as an alert on the first read.
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 1];
    !matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await, Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_node_and_a_foreign_ca_are_refused_at_the_handshake() {
    let mut c = Cluster::start(&["n1", "n2", "n3", "n4"], Opts::default()).await;
    let ca = c.creds().ca_pem.clone();
    let tls = c.nodes[3].dir.join("n4/tls");
    let (cert, key) = (
        std::fs::read_to_string(tls.join("node.pem")).unwrap(),
        std::fs::read_to_string(tls.join("node.key")).unwrap(),
    );
    let u = c.nodes[0].url();
    let ports: Vec<u16> = c.nodes.iter().map(|n| n.port).collect();
    let repl = |i: usize| format!("127.0.0.1:{}", ports[i] + 1);
    // A member's certificate opens the API (as a node) and the replication port.
    let member_client = client_with_cert(&ca, &cert, &key);
    let r = member_client.get(format!("{u}/v1/cluster")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(replication_accepts(&repl(0), &ca, &cert, &key).await, "a member's certificate");
    // n4 leaves; its certificate (kept by whoever copied it) is refused.
    let url = format!("{u}/v1/cluster");
    wait_until(Duration::from_secs(10), "n4 online", || async {
        member(&get(&url).await.1, "n4")["state"] == "online"
    })
    .await;
    let (st, v) = delete(&format!("{u}/v1/nodes/n4")).await;
    assert_eq!(st, 204, "{v}");
    c.node_mut("n4").kill();
    let fresh = client_with_cert(&ca, &cert, &key);
    match fresh.get(format!("{u}/v1/cluster")).send().await {
        Err(_) => {}
        Ok(r) => panic!("a removed node's certificate was accepted: {}", r.status()),
    }
    assert!(!replication_accepts(&repl(0), &ca, &cert, &key).await, "a removed node replicates");
    // A certificate of another CA naming a member of this cluster is
    // refused as well, on both ports.
    let now = time::OffsetDateTime::now_utc();
    let foreign = tandem::security::pki::new_ca("test", now).unwrap();
    let addrs = vec!["127.0.0.1".to_string()];
    let spec =
        tandem::security::pki::NodeCertSpec { cluster_id: "test", node_id: 2, name: "n2", addresses: &addrs, days: 1 };
    let fake = tandem::security::pki::issue_node(&foreign, &spec, now).unwrap();
    assert!(!replication_accepts(&repl(1), &ca, &fake.cert_pem, &fake.key_pem).await, "a foreign CA replicates");
    let forged = client_with_cert(&ca, &fake.cert_pem, &fake.key_pem);
    assert!(forged.get(format!("{u}/v1/cluster")).send().await.is_err(), "a foreign CA's certificate was accepted");
    // The cluster carries on without n4.
    assert!(members_with(&c.cluster().await, |m| m["name"] == "n4").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_checks_the_ca_pin_before_sending_anything() {
    let mut c = Cluster::configure(&["n1", "n2"], Opts::default());
    for n in c.nodes.iter_mut() {
        n.start().await;
    }
    c.init(0, "pinned").await;
    let via = c.nodes[0].url();
    let token = tandem_testkit::api::join_token(&via, c.creds()).await.unwrap();
    let sock = c.nodes[1].socket();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (st, v) = tandem_testkit::api::local_call(
        &sock,
        Method::POST,
        "/v1/cluster/join",
        json!({"via": via, "token": token, "ca_hash": wrong}),
    )
    .await;
    assert_eq!((st, v["code"].clone()), (409, json!("TND-1505")), "{v}");
    // The token never left: it still works, once, for the right pin.
    let (st, v) = tandem_testkit::api::local_call(
        &sock,
        Method::POST,
        "/v1/cluster/join",
        json!({"via": via, "token": "tnd_not-a-join-token", "ca_hash": c.creds().ca_hash}),
    )
    .await;
    assert_eq!((st, v["code"].clone()), (401, json!("TND-1208")), "a bad token is refused by the cluster: {v}");
    assert!(v["message"].as_str().unwrap_or("").contains("TND-1501"), "{v}");
    let (st, v) = tandem_testkit::api::local_call(
        &sock,
        Method::POST,
        "/v1/cluster/join",
        json!({"via": via, "token": token, "ca_hash": c.creds().ca_hash}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let cluster: Value = c.cluster().await;
    assert_eq!(member(&cluster, "n2")["role"], "learner");
}
