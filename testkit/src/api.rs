//! Reaching a secured tandem cluster from tests and the chaos runner: the
//! agents' admin sockets (init, join), the cluster CA, and an HTTPS client
//! that trusts every cluster CA this process has seen and sends each
//! cluster's admin token to its nodes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

/// A cluster's credentials, as `tandem cluster init` hands them out.
#[derive(Debug, Clone)]
pub struct Creds {
    pub token: String,
    pub ca_pem: String,
    pub ca_hash: String,
}

#[derive(Default)]
struct Registry {
    /// `host:port` → admin token of the cluster that node belongs to.
    tokens: HashMap<String, String>,
    cas: Vec<String>,
    client: Option<reqwest::Client>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Registry::default))
}

/// Makes ring rustls' process-wide default (clients without a
/// preconfigured TLS need one). Idempotent.
#[allow(deprecated)]
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `host:port` of a URL.
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or("").to_string()
}

/// Remembers that the node at `url` belongs to the cluster of `creds`.
pub fn register(url: &str, creds: &Creds) {
    with_registry(|r| {
        r.tokens.insert(authority(url), creds.token.clone());
        if !r.cas.contains(&creds.ca_pem) {
            r.cas.push(creds.ca_pem.clone());
            r.client = None;
        }
    });
}

/// The admin token registered for the node at `url`.
pub fn token_for(url: &str) -> Option<String> {
    with_registry(|r| r.tokens.get(&authority(url)).cloned())
}

/// An HTTPS client trusting every registered cluster CA.
pub fn client() -> reqwest::Client {
    install_crypto();
    with_registry(|r| {
        if let Some(c) = &r.client {
            return c.clone();
        }
        let mut b = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(20));
        let mut certs = Vec::new();
        for pem in &r.cas {
            if let Ok(mut c) = reqwest::Certificate::from_pem_bundle(pem.as_bytes()) {
                certs.append(&mut c);
            }
        }
        b = b.tls_certs_only(certs);
        let c = b.build().expect("a reqwest client with rustls builds");
        r.client = Some(c.clone());
        c
    })
}

/// Sends `body` to `url` with the registered token (or `token` when given;
/// `Some("")` sends none); (0, Null) when nothing answered.
pub async fn call_with(token: Option<&str>, method: reqwest::Method, url: &str, body: Option<Vec<u8>>) -> (u16, Value) {
    let mut req = client().request(method, url);
    let token = match token {
        Some(t) => Some(t.to_string()),
        None => token_for(url),
    };
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    match req.send().await {
        Err(_) => (0, Value::Null),
        Ok(r) => {
            let st = r.status().as_u16();
            let bytes = r.bytes().await.unwrap_or_default();
            (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }
    }
}

/// A call on an agent's admin socket (root on its node; no token).
pub async fn local_call(socket: &Path, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    install_crypto();
    let Ok(c) = reqwest::Client::builder().unix_socket(socket).timeout(Duration::from_secs(30)).build() else {
        return (0, Value::Null);
    };
    match c.request(method, format!("http://localhost{path}")).json(&body).send().await {
        Err(_) => (0, Value::Null),
        Ok(r) => {
            let st = r.status().as_u16();
            let bytes = r.bytes().await.unwrap_or_default();
            (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }
    }
}

/// `tandem cluster init` on the agent behind `socket`.
pub async fn init(socket: &Path, cluster_id: &str) -> Result<Creds, String> {
    let (st, v) =
        local_call(socket, reqwest::Method::POST, "/v1/cluster/init", json!({"cluster_id": cluster_id})).await;
    if st != 200 {
        return Err(format!("init: {st} {v}"));
    }
    let s = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| format!("init answer lacks {k}: {v}"));
    Ok(Creds { token: s("admin_token")?, ca_pem: s("ca_pem")?, ca_hash: s("ca_hash")? })
}

/// A join token from the member at `via`.
pub async fn join_token(via: &str, creds: &Creds) -> Result<String, String> {
    let (st, v) = call_with(
        Some(&creds.token),
        reqwest::Method::POST,
        &format!("{via}/v1/cluster/join-token"),
        Some(b"{}".to_vec()),
    )
    .await;
    v["token"].as_str().map(str::to_string).ok_or_else(|| format!("join-token: {st} {v}"))
}

/// `tandem cluster join <via>` on the agent behind `socket`.
pub async fn join(socket: &Path, via: &str, creds: &Creds) -> (u16, Value) {
    let token = match join_token(via, creds).await {
        Ok(t) => t,
        Err(e) => return (0, json!({ "error": e })),
    };
    local_call(
        socket,
        reqwest::Method::POST,
        "/v1/cluster/join",
        json!({"via": via, "token": token, "ca_hash": creds.ca_hash}),
    )
    .await
}

/// What a synchronous script needs to reach a secured cluster with curl.
#[derive(Debug, Clone)]
pub struct CurlCreds {
    pub ca_file: std::path::PathBuf,
    pub token: String,
}

impl CurlCreds {
    /// `--cacert … -H "Authorization: Bearer …"` for curl.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--cacert".into(),
            self.ca_file.display().to_string(),
            "-H".into(),
            format!("Authorization: Bearer {}", self.token),
        ]
    }
}

/// Forms a cluster the way an operator does, with the `tandem` CLI:
/// `cluster init` on the first admin socket, then for each other node a
/// `cluster join-token` and a `cluster join` on its socket. Writes the CA to
/// `ca_file`.
pub fn cli_form(
    tandem: &Path,
    sockets: &[std::path::PathBuf],
    urls: &[String],
    ca_file: &Path,
) -> Result<CurlCreds, String> {
    let run = |args: &[&str], env: &[(&str, &str)]| -> Result<Value, String> {
        let out = std::process::Command::new(tandem)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .map_err(|e| format!("{}: {e}", tandem.display()))?;
        if !out.status.success() {
            return Err(format!("tandem {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("tandem {args:?}: {e}"))
    };
    let s0 = sockets[0].display().to_string();
    let init = run(&["--json", "cluster", "init", "--socket", &s0], &[])?;
    let token = init["admin_token"].as_str().ok_or("init: no admin_token")?.to_string();
    std::fs::write(ca_file, init["ca_pem"].as_str().ok_or("init: no ca_pem")?).map_err(|e| e.to_string())?;
    let ca = ca_file.display().to_string();
    let env = [("TANDEM_TOKEN", token.as_str()), ("TANDEM_CACERT", ca.as_str())];
    for s in &sockets[1..] {
        let t = run(&["--json", "--endpoint", &urls[0], "cluster", "join-token"], &env)?;
        let (jt, hash) = (t["token"].as_str().unwrap_or(""), t["ca_hash"].as_str().unwrap_or(""));
        let sock = s.display().to_string();
        run(&["--json", "cluster", "join", &urls[0], "--token", jt, "--ca-hash", hash, "--socket", &sock], &[])?;
    }
    Ok(CurlCreds { ca_file: ca_file.to_path_buf(), token })
}

/// The join token and CA pin of the `tandem cluster join <url> --token T
/// --ca-hash H` line that `tandem cluster join-token` printed in `out`.
pub fn printed_join(out: &str) -> Option<(String, String)> {
    let after = |flag: &str| out.rsplit_once(flag).and_then(|(_, r)| r.split_whitespace().next()).map(str::to_string);
    let (token, hash) = (after("--token ")?, after("--ca-hash ")?);
    (token.starts_with("tnd_") && hash.starts_with("sha256:")).then_some((token, hash))
}

/// A guide's commands with the token and pin it abbreviates (`tnd_…`,
/// `sha256:…`) replaced by those printed earlier, as an operator pastes
/// them; an error when the guide uses them before any was printed.
pub fn paste_join(commands: &str, printed: Option<&(String, String)>) -> Result<String, String> {
    if !commands.contains("tnd_…") && !commands.contains("sha256:…") {
        return Ok(commands.to_string());
    }
    let (token, hash) =
        printed.ok_or("the guide pastes a join token before `tandem cluster join-token` printed one")?;
    Ok(commands.replace("tnd_…", token).replace("sha256:…", hash))
}
