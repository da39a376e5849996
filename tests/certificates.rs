//! Certificates from outside the product, over real TLS: a cluster whose CA
//! and node certificates an operator made with the `openssl` command line
//! (Debian's, the tool a company PKI hands out) forms, elects, replicates,
//! refuses a node of another CA and a removed node's certificate, and takes
//! a renewed certificate file without a restart; and client certificates
//! for people and tools act with exactly their role until revoked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA of the operator's: `<dir>/<name>.pem` and `.key`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.join(pem)
}

/// A certificate and key signed by `ca`: `<dir>/<file>.pem` and `.key`,
/// common name `cn`, for 127.0.0.1 (server and client).
fn issue(dir: &Path, ca: &str, file: &str, cn: &str) -> (PathBuf, PathBuf) {
    let (pem, key, csr, ext) =
        (format!("{file}.pem"), format!("{file}.key"), format!("{file}.csr"), format!("{file}.ext"));
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:{cn}\nextendedKeyUsage=serverAuth,clientAuth\n\
             keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-days",
            "30",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ],
    );
    (dir.join(pem), dir.join(key))
}

fn tls_keys(ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// An HTTPS client trusting `ca_pem` and presenting `cert` with `key`.
fn client_with(ca_pem: &str, cert: &Path, key: &Path) -> reqwest::Client {
    tandem_testkit::api::install_crypto();
    let mut pem = std::fs::read(cert).unwrap();
    pem.push(b'\n');
    pem.extend(std::fs::read(key).unwrap());
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

/// (status, body); (0, the error) when the connection failed.
async fn send(c: &reqwest::Client, method: Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = c.request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    match r.send().await {
        Err(e) => (0, json!(format!("{e:?}"))),
        Ok(r) => {
            let st = r.status().as_u16();
            (st, r.json().await.unwrap_or(Value::Null))
        }
    }
}

/// `post`, again while the cluster answers 503 (an election after a restart).
async fn post_settled(url: &str, body: Value) -> (u16, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (st, v) = post(url, body.clone()).await;
        if st != 503 || std::time::Instant::now() > deadline {
            return (st, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The serial number of the certificate the API at `port` serves, hex.
fn served_serial(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -serial"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_lowercase()
}

fn file_serial(pem: &Path) -> String {
    let out = Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(pem).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_lowercase()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_pki_forms_a_cluster_and_refuses_strangers_and_removed_nodes() {
    let mut c = Cluster::configure(&[], Opts::default());
    let pki = c.tmp.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = make_ca(&pki, "corp-ca");
    make_ca(&pki, "other-ca");
    for n in ["n1", "n2", "n3"] {
        let (cert, key) = issue(&pki, "corp-ca", n, n);
        c.add_config(n, &tls_keys(&ca, &cert, &key));
    }
    let c = c.form().await;
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    assert_eq!(c.creds().ca_pem.trim(), ca_pem.trim(), "the cluster's CA is the operator's");
    assert!(!c.tmp.path().join("n1/tls/ca.key").exists(), "no CA key is made or held");

    // A write on the leader reaches every node; a new leader is elected
    // over the operator's certificates.
    let leader = c.leader().await;
    let lu = c.node(&leader).url();
    let (st, v) = put(&format!("{lu}/v1/nodes/n1/attributes/rack"), json!({"value": "r7"})).await;
    assert_eq!(st, 200, "{v}");
    for n in &c.nodes {
        let u = n.url();
        wait_until(Duration::from_secs(10), "the attribute everywhere", || {
            let u = u.clone();
            async move { get(&format!("{u}/v1/nodes/n1")).await.1["attributes"]["rack"] == "r7" }
        })
        .await;
    }
    let mut c = c;
    c.node_mut(&leader).stop();
    let next = c.new_leader(&leader).await;
    assert_ne!(next, leader);
    c.node_mut(&leader).start().await;
    c.wait_voters(3).await;

    // A client certificate of the operator's CA, recorded as a viewer.
    let (viewer_cert, viewer_key) = issue(&pki, "corp-ca", "viewer", "dashboards");
    let u1 = c.nodes[0].url();
    let body = json!({"name": "dashboards", "role": "viewer",
                      "certificate": std::fs::read_to_string(&viewer_cert).unwrap()});
    let (st, v) = post_settled(&format!("{u1}/v1/certificates"), body).await;
    assert_eq!(st, 201, "{v}");
    let viewer = client_with(&ca_pem, &viewer_cert, &viewer_key);
    // Recorded through the leader: every node knows it once applied.
    wait_until(Duration::from_secs(10), "the viewer certificate accepted", || {
        let (viewer, u1) = (viewer.clone(), u1.clone());
        async move { send(&viewer, Method::GET, &format!("{u1}/v1/nodes"), None).await.0 == 200 }
    })
    .await;
    let (st, v) = send(&viewer, Method::DELETE, &format!("{u1}/v1/nodes/n3"), None).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("TND-1502")), "{v}");
    // With the cluster's own CA this route signs; here it only records.
    let (st, v) = post(&format!("{u1}/v1/certificates"), json!({"name": "x", "role": "viewer", "csr": "x"})).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("TND-1512")), "{v}");

    // A node whose certificate another CA issued is refused at the join,
    // and the cluster is unchanged.
    let before = replicated(&c.cluster().await);
    let bundle = pki.join("bundle.pem");
    std::fs::write(&bundle, format!("{ca_pem}\n{}", std::fs::read_to_string(pki.join("other-ca.pem")).unwrap()))
        .unwrap();
    let (cert, key) = issue(&pki, "other-ca", "n4", "n4");
    let i4 = c.add_config("n4", &tls_keys(&bundle, &cert, &key));
    c.nodes[i4].start().await;
    let (st, v) = c.try_join(i4).await;
    // The cluster's answer, relayed by the joining agent.
    assert_eq!((st, v["code"].as_str()), (422, Some("TND-1208")), "{v}");
    let message = v["message"].as_str().unwrap_or("");
    assert!(message.contains("TND-1508") && message.contains("not signed by the configured CA"), "{v}");
    assert_eq!(replicated(&c.cluster().await), before, "a refused join changes nothing");
    // Its certificate opens nothing either: refused at the handshake.
    let stranger = client_with(&ca_pem, &cert, &key);
    assert_eq!(send(&stranger, Method::GET, &format!("{u1}/v1/nodes"), None).await.0, 0);

    // A removed node's certificate is refused from then on, also when a
    // node of the same name joins again with a new key.
    let n3_cert = pki.join("n3.pem");
    let n3_key = pki.join("n3.key");
    let nodes = format!("{u1}/v1/nodes");
    // A member's certificate is a node: it reads without a token. (A new
    // client each time: a connection is judged at its handshake.)
    let (st, v) = send(&client_with(&ca_pem, &n3_cert, &n3_key), Method::GET, &nodes, None).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = delete(&format!("{u1}/v1/nodes/n3")).await;
    assert_eq!(st, 204, "{v}");
    wait_until(Duration::from_secs(10), "n3's certificate refused", || {
        let (c, nodes) = (client_with(&ca_pem, &n3_cert, &n3_key), nodes.clone());
        async move { send(&c, Method::GET, &nodes, None).await.0 == 401 }
    })
    .await;
    let (st, v) = send(&client_with(&ca_pem, &n3_cert, &n3_key), Method::GET, &nodes, None).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("TND-1511")), "{v}");
    // The operator issues n3 a new certificate; the same agent (not
    // restarted: it reads the files again to join) joins again.
    std::fs::rename(&n3_cert, pki.join("n3-old.pem")).unwrap();
    std::fs::rename(&n3_key, pki.join("n3-old.key")).unwrap();
    issue(&pki, "corp-ca", "n3", "n3");
    let i3 = c.idx("n3");
    c.join(i3).await;
    c.wait_voters(3).await;
    let as_new_n3 = client_with(&ca_pem, &n3_cert, &n3_key);
    assert_eq!(send(&as_new_n3, Method::GET, &format!("{u1}/v1/nodes"), None).await.0, 200);
    let as_old_n3 = client_with(&ca_pem, &pki.join("n3-old.pem"), &pki.join("n3-old.key"));
    let (st, v) = send(&as_old_n3, Method::GET, &format!("{u1}/v1/nodes"), None).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("TND-1511")), "the old certificate names nobody: {v}");

    // The operator renews n2's certificate (a new key): the agent takes
    // it into use without a restart, and the cluster keeps n2.
    let n2_port = c.node("n2").port;
    let old_serial = served_serial(n2_port);
    assert_eq!(old_serial, file_serial(&pki.join("n2.pem")));
    let staged = pki.join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    issue(&staged, "../corp-ca", "n2", "n2");
    let pid = c.node("n2").pid();
    std::fs::copy(staged.join("n2.key"), pki.join("n2.key")).unwrap();
    std::fs::copy(staged.join("n2.pem"), pki.join("n2.pem")).unwrap();
    let new_serial = file_serial(&pki.join("n2.pem"));
    assert_ne!(new_serial, old_serial);
    wait_until(Duration::from_secs(30), "n2 serving its renewed certificate", || {
        let want = new_serial.clone();
        async move { tokio::task::spawn_blocking(move || served_serial(n2_port)).await.unwrap() == want }
    })
    .await;
    assert_eq!(c.node("n2").pid(), pid, "no restart");
    let (st, v) = put(&format!("{u1}/v1/nodes/n1/attributes/rack"), json!({"value": "r8"})).await;
    assert_eq!(st, 200, "{v}");
    let u2 = c.node("n2").url();
    wait_until(Duration::from_secs(10), "n2 still replicating", || {
        let u2 = u2.clone();
        async move { get(&format!("{u2}/v1/nodes/n1")).await.1["attributes"]["rack"] == "r8" }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_operator_files_are_refused_at_start_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path();
    let ca = make_ca(pki, "corp-ca");
    let other = make_ca(pki, "other-ca");
    let (cert, key) = issue(pki, "corp-ca", "n1", "n1");
    let (_, other_key) = issue(pki, "corp-ca", "n9", "n1");
    let (foreign, foreign_key) = issue(pki, "other-ca", "f1", "n1");
    let missing = pki.join("missing.pem");
    let cases: Vec<(String, &str)> = vec![
        (tls_keys(&missing, &cert, &key), "tls.ca_file"),
        (tls_keys(&cert.with_extension("csr"), &cert, &key), "tls.ca_file"),
        (tls_keys(&ca, &pki.join("n1.csr"), &key), "tls.cert_file"),
        (tls_keys(&ca, &cert, &other_key), "tls.key_file"),
        (tls_keys(&ca, &foreign, &foreign_key), "tls.cert_file"),
        (tls_keys(&other, &cert, &key), "tls.cert_file"),
        (format!("[tls]\nca_file = \"{}\"", ca.display()), "tls.cert_file"),
    ];
    for (i, (tls, key_named)) in cases.into_iter().enumerate() {
        let path = pki.join(format!("bad{i}.toml"));
        let text = format!(
            "name = \"n1\"\ndata_dir = \"{}\"\naddresses = [\"127.0.0.1\"]\nport = {}\n{tls}\n",
            pki.join(format!("d{i}")).display(),
            free_port()
        );
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(BIN).arg("agent").arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "case {i} must be refused:\n{text}\n{err}");
        assert!(err.contains(key_named), "case {i} must name {key_named}:\n{text}\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_act_with_their_role_until_revoked() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let u = c.nodes[1].url();
    let dir = c.tmp.path().join("people");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_pem = c.creds().ca_pem.clone();

    // `tandem cert create`: the key is made here, the leader signs.
    let out = Command::new(BIN)
        .args(["cert", "create", "alice", "--role", "viewer", "--days", "7", "--out"])
        .arg(dir.join("alice"))
        .env("TANDEM_ENDPOINT", &u)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cert, key) = (dir.join("alice.pem"), dir.join("alice.key"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    let alice = client_with(&ca_pem, &cert, &key);
    let (st, v) = send(&alice, Method::GET, &format!("{u}/v1/nodes"), None).await;
    assert_eq!(st, 200, "{v}");
    let before = replicated(&c.cluster().await);
    let (st, v) =
        send(&alice, Method::POST, &format!("{u}/v1/tokens"), Some(json!({"name": "x", "role": "admin"}))).await;
    assert_eq!((st, v["code"].as_str()), (403, Some("TND-1502")), "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("cert:alice"), "{v}");
    // The CLI presents it too.
    let out = Command::new(BIN)
        .args(["node", "list", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .env("TANDEM_ENDPOINT", &u)
        .env_remove("TANDEM_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (st, list) = get(&format!("{u}/v1/certificates")).await;
    assert_eq!(st, 200);
    assert_eq!(list[0]["name"], "alice");
    assert_eq!(list[0]["role"], "viewer");
    assert_eq!(list[0]["created_by"], "token:admin");

    // A certificate the cluster CA signed but nobody recorded: 401. (The
    // test signs with the CA key a voter holds, as a thief with it could.)
    let tls1 = c.tmp.path().join("n1/tls");
    std::fs::copy(tls1.join("ca.pem"), dir.join("cluster-ca.pem")).unwrap();
    std::fs::copy(tls1.join("ca.key"), dir.join("cluster-ca.key")).unwrap();
    let (ucert, ukey) = issue(&dir, "cluster-ca", "mallory", "mallory");
    let mallory = client_with(&ca_pem, &ucert, &ukey);
    let (st, v) = send(&mallory, Method::GET, &format!("{u}/v1/nodes"), None).await;
    assert_eq!((st, v["code"].as_str()), (401, Some("TND-1511")), "{v}");

    // Another CA's certificate: refused at the handshake.
    make_ca(&dir, "other-ca");
    let (ocert, okey) = issue(&dir, "other-ca", "eve", "eve");
    let eve = client_with(&ca_pem, &ocert, &okey);
    assert_eq!(send(&eve, Method::GET, &format!("{u}/v1/nodes"), None).await.0, 0);

    // Revoked: the next request is refused, on every node; nothing changed.
    let (st, v) = delete(&format!("{u}/v1/certificates/alice")).await;
    assert_eq!(st, 204, "{v}");
    for n in &c.nodes {
        let url = format!("{}/v1/nodes", n.url());
        wait_until(Duration::from_secs(10), "alice refused", || {
            let (alice, url) = (alice.clone(), url.clone());
            async move { send(&alice, Method::GET, &url, None).await.0 == 401 }
        })
        .await;
        let (st, v) = send(&alice, Method::GET, &url, None).await;
        assert_eq!((st, v["code"].as_str()), (401, Some("TND-1511")), "{v}");
    }
    let (st, v) = delete(&format!("{u}/v1/certificates/alice")).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("TND-1510")), "{v}");
    assert_eq!(replicated(&c.cluster().await), before);
    wait_until(Duration::from_secs(10), "the refusal audited under the certificate's name", || {
        let u = u.clone();
        async move {
            let (_, audit) = get(&format!("{u}/v1/audit")).await;
            audit.as_array().is_some_and(|a| a.iter().any(|e| e["who"] == "cert:alice" && e["status"] == 403))
        }
    })
    .await;
}
