//! The CLI's client side: calls the REST API of one agent and prints tables
//! (or the API's JSON with `--json`). It never touches a node's data: every
//! action goes through the API, so the CLI works from any machine.
//!
//! Exit codes (documented in README.md and docs/api.md):
//! 0 success; 1 the request was refused (4xx; 502: an alert's target failed its test); 2 bad command line or input file;
//! 3 the endpoint could not be reached; 4 the cluster is unavailable (503:
//! no leader, no quorum), retry later; 5 the agent failed (5xx); 6 the agent's
//! configuration is invalid or it could not start.

use std::fmt::Write as _;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tandem_http_api::{ClusterView, ErrorBody, GroupView, LocalView, NodeView, VerifyReport, VolumeView};

pub const EXIT_REFUSED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_UNAVAILABLE: u8 = 4;
pub const EXIT_SERVER: u8 = 5;
pub const EXIT_CONFIG: u8 = 6;
/// The agent stopped on a failure of its storage (a full data disk): its
/// supervisor restarts it.
pub const EXIT_STORAGE: u8 = 7;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {endpoint}: {reason}\nhint: is the agent running? Set --endpoint or TANDEM_ENDPOINT; for HTTPS, TANDEM_CACERT names the cluster CA (<data_dir>/tls/ca.pem).")]
    Unreachable { endpoint: String, reason: String },
    #[error("{code}: {message}\nhint: {hint}")]
    Api { status: u16, code: String, message: String, hint: String },
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer { url: String, reason: String },
    #[error("cannot use the input: {0}")]
    Input(String),
    /// A report that says the operation did not finish (a switchover, a
    /// drill): printed on stdout like a success, exit 1.
    #[error("{0}")]
    Incomplete(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
            CliError::Api { status: 503, .. } => EXIT_UNAVAILABLE,
            // An alert's target failed its test: the target's failure, not the agent's.
            CliError::Api { status: 502, .. } => EXIT_REFUSED,
            CliError::Api { status, .. } if *status >= 500 => EXIT_SERVER,
            CliError::Api { .. } => EXIT_REFUSED,
            CliError::BadAnswer { .. } => EXIT_SERVER,
            CliError::Input(_) => EXIT_USAGE,
            CliError::Incomplete(_) => EXIT_REFUSED,
        }
    }
}

/// How the CLI reaches and authenticates to an agent.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Bearer token (`TANDEM_TOKEN`).
    pub token: Option<String>,
    /// PEM file of the CA to trust for HTTPS (`TANDEM_CACERT`).
    pub cacert: Option<std::path::PathBuf>,
    /// The agent's admin socket instead of the endpoint (root on the node).
    pub socket: Option<std::path::PathBuf>,
    /// A client certificate and its key, PEM (`TANDEM_CERT`, `TANDEM_KEY`):
    /// presented instead of a token (`tandem cert create`).
    pub cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// The per-user defaults file, `~/.config/tandem/cli.toml`:
/// `endpoint`, `token`, `cacert` (flags and environment win).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub cacert: Option<std::path::PathBuf>,
}

impl UserConfig {
    pub fn load() -> Result<UserConfig, CliError> {
        let Some(home) = std::env::var_os("HOME") else { return Ok(UserConfig::default()) };
        let path = std::path::Path::new(&home).join(".config/tandem/cli.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| CliError::Input(format!("{}: {e}", path.display()))),
            Err(_) => Ok(UserConfig::default()),
        }
    }
}

pub struct Client {
    endpoint: String,
    http: reqwest::Client,
    /// Without the overall timeout: for the event stream.
    stream_http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    pub fn new(endpoint: &str) -> Result<Client, CliError> {
        Client::with_access(endpoint, &Access::default())
    }

    pub fn with_access(endpoint: &str, access: &Access) -> Result<Client, CliError> {
        let unreachable = |reason: String| CliError::Unreachable { endpoint: endpoint.into(), reason };
        let mut b = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30));
        let mut sb = reqwest::Client::builder().no_proxy().connect_timeout(Duration::from_secs(10));
        let endpoint = if let Some(sock) = &access.socket {
            b = b.unix_socket(sock.clone());
            sb = sb.unix_socket(sock.clone());
            "http://localhost".to_string()
        } else {
            endpoint.trim_end_matches('/').to_string()
        };
        if let Some(path) = &access.cacert {
            let pem = std::fs::read(path).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| CliError::Input(format!("{}: not a PEM certificate: {e}", path.display())))?;
            b = b.tls_certs_only(certs.clone());
            sb = sb.tls_certs_only(certs);
        }
        if let Some((cert, key)) = &access.cert {
            let read =
                |p: &std::path::Path| std::fs::read(p).map_err(|e| CliError::Input(format!("{}: {e}", p.display())));
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| CliError::Input(format!("{} and {}: {e}", cert.display(), key.display())))?;
            b = b.identity(id);
        }
        let http = b.build().map_err(|e| unreachable(e.to_string()))?;
        let stream_http = sb.build().map_err(|e| unreachable(e.to_string()))?;
        // The admin socket needs no token (and a token for another cluster
        // would only be refused there).
        let token = if access.socket.is_some() { None } else { access.token.clone() };
        Ok(Client { endpoint, http, stream_http, token })
    }

    /// Calls the API; returns the JSON answer (null for 204).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let url = format!("{}{}", self.endpoint, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CliError::Unreachable { endpoint: self.endpoint.clone(), reason: error_chain(&e) })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| CliError::BadAnswer { url: url.clone(), reason: e.to_string() })?;
        if (200..300).contains(&status) {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| CliError::BadAnswer { url, reason: e.to_string() });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(CliError::Api { status, code: b.code, message: b.message, hint: b.hint }),
            Err(_) => {
                Err(CliError::BadAnswer { url, reason: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)) })
            }
        }
    }
}

impl Client {
    /// Opens the event stream after `last_id`; the answer's body is the stream.
    pub async fn open_stream(&self, path: &str, last_id: Option<u64>) -> Result<reqwest::Response, CliError> {
        let url = format!("{}{}", self.endpoint, path);
        let mut req = self.stream_http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CliError::Unreachable { endpoint: self.endpoint.clone(), reason: error_chain(&e) })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(CliError::Api { status, code: b.code, message: b.message, hint: b.hint }),
            Err(_) => {
                Err(CliError::BadAnswer { url, reason: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)) })
            }
        }
    }
}

/// One message of a Server-Sent Events stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseMessage {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

/// Splits Server-Sent Events text into messages as lines arrive: feed it
/// bytes, take the complete messages (comments and partial lines wait).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: String,
    cur: SseMessage,
    has_data: bool,
}

impl SseParser {
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseMessage> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(nl) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=nl).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.has_data || self.cur.event.is_some() {
                    out.push(std::mem::take(&mut self.cur));
                }
                self.cur = SseMessage::default();
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue; // a keep-alive comment
            }
            let (field, value) =
                line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "event" => self.cur.event = Some(value.to_string()),
                "id" => self.cur.id = Some(value.to_string()),
                "data" => {
                    if self.has_data {
                        self.cur.data.push('\n');
                    }
                    self.cur.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        out
    }
}

/// `tandem events`: what to show.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Keep following: print events as they happen (Ctrl-C stops);
    /// reconnects after a disconnect, resuming after the last event shown.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only events after this id.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Only these kinds, comma-separated (`group.` for every group event).
    #[arg(long)]
    pub kind: Option<String>,
    /// At least this severity: info, warning, critical.
    #[arg(long)]
    pub severity: Option<String>,
    /// Only events about this group.
    #[arg(long)]
    pub group: Option<String>,
}

fn event_query(a: &EventsArgs) -> String {
    let enc = |s: &str| s.replace('%', "%25").replace('&', "%26").replace('+', "%2B").replace(' ', "%20");
    let mut q = Vec::new();
    if let Some(k) = &a.kind {
        q.push(format!("kind={}", enc(k)));
    }
    if let Some(s) = &a.severity {
        q.push(format!("severity={}", enc(s)));
    }
    if let Some(g) = &a.group {
        q.push(format!("group={}", enc(g)));
    }
    q.join("&")
}

/// One event as a line: `ID TIME SEVERITY KIND message`.
pub fn event_line(e: &tandem_raft::events::Event) -> String {
    format!("{:>6}  {}  {:<8}  {:<20}  {}", e.id, utc(e.time_ms), e.severity.as_str(), e.kind, e.message)
}

/// `tandem events`: one page, or (`-f`) the stream, printed as it comes.
pub async fn events_command(c: &Client, json_out: bool, a: EventsArgs) -> Result<String, CliError> {
    use std::io::Write;
    let query = event_query(&a);
    if !a.follow {
        let sep = if query.is_empty() { "" } else { "&" };
        let v = c.call(Method::GET, &format!("/v1/events?since={}&limit=10000{sep}{query}", a.since), None).await?;
        if json_out {
            return Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
        }
        let list: tandem_http_api::EventList = parse(v)?;
        let mut out = String::new();
        if let Some(first) = list.reset {
            out.push_str(&format!("-- events after {} are gone (retention); the oldest kept is {first} --\n", a.since));
        }
        for e in &list.events {
            out.push_str(&event_line(e));
            out.push('\n');
        }
        return Ok(out);
    }
    let path = if query.is_empty() { "/v1/events/stream".to_string() } else { format!("/v1/events/stream?{query}") };
    let mut last = a.since;
    loop {
        let resp = match c.open_stream(&path, Some(last)).await {
            Ok(r) => r,
            Err(e @ CliError::Api { .. }) => return Err(e),
            Err(e) => {
                eprintln!("tandem: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut resp = resp;
        let mut parser = SseParser::default();
        while let Ok(Some(chunk)) = resp.chunk().await {
            for m in parser.feed(&chunk) {
                let mut out = std::io::stdout().lock();
                if m.event.as_deref() == Some("reset") {
                    if json_out {
                        let _ = writeln!(out, "{{\"reset\": {}}}", m.data);
                    } else {
                        let _ = writeln!(out, "-- events after {last} are gone (retention): {} --", m.data);
                    }
                    continue;
                }
                if let Some(id) = m.id.as_deref().and_then(|i| i.parse().ok()) {
                    last = id;
                }
                if json_out {
                    let _ = writeln!(out, "{}", m.data);
                } else {
                    match serde_json::from_str::<tandem_raft::events::Event>(&m.data) {
                        Ok(e) => {
                            let _ = writeln!(out, "{}", event_line(&e));
                        }
                        Err(_) => {
                            let _ = writeln!(out, "{}", m.data);
                        }
                    }
                }
                let _ = out.flush();
            }
        }
        eprintln!("tandem: the event stream ended; reconnecting");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// reqwest's error with its causes (a certificate problem hides in them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// A name as one segment of an API path.
pub fn enc(s: &str) -> String {
    s.replace('/', "%2F")
}

pub fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::BadAnswer { url: "response".into(), reason: e.to_string() })
}

pub fn lower<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = widths[i])).collect();
        let _ = writeln!(out, "{}", s.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn nodes_table(nodes: &[NodeView]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let paths: Vec<String> =
                n.paths.iter().map(|p| format!("{}{}", p.address, if p.up { "" } else { "(down)" })).collect();
            vec![
                format!("{}{}", n.name, if n.leader { "*" } else { "" }),
                n.id.to_string(),
                lower(&n.role),
                lower(&n.state),
                n.site.clone().unwrap_or_else(|| "-".into()),
                format!("{}:{}", paths.join(","), n.port),
                n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                n.version.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["NAME", "ID", "ROLE", "STATE", "SITE", "ADDRESSES", "PID", "VERSION"], &rows)
}

pub fn sites_table(sites: &[tandem_http_api::SiteView]) -> String {
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            let nodes: Vec<String> =
                s.nodes.iter().map(|n| format!("{}({}/{})", n.name, lower(&n.state), n.admin_state.as_str())).collect();
            vec![s.name.clone(), nodes.join(" "), if s.groups.is_empty() { "-".into() } else { s.groups.join(",") }]
        })
        .collect();
    table(&["SITE", "NODES", "GROUPS"], &rows)
}

pub fn site_text(s: &tandem_http_api::SiteView) -> String {
    sites_table(std::slice::from_ref(s))
}

/// A recovery's report, or its dry run's.
pub fn recover_text(r: &tandem_http_api::RecoverReport) -> String {
    let head = if r.dry_run {
        format!("DRY RUN: nothing changed. To recover: tandem cluster recover --confirm {}\n\n", r.cluster_id)
    } else {
        format!(
            "cluster {} recovered: {} is its single voter (incarnation {})\n\n",
            r.cluster_id, r.node, r.incarnation
        )
    };
    let rows: Vec<Vec<String>> = r
        .groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                g.node.clone().unwrap_or_else(|| "-".into()),
                g.would_run_on.clone().unwrap_or_else(|| "(nowhere)".into()),
                g.reason.clone(),
            ]
        })
        .collect();
    let mut s = head;
    s += &format!(
        "log held on {}: index {} (term {}), known committed {}: {} entries {} committed by the recovery\n",
        r.node,
        r.log_index,
        r.log_term,
        r.committed_index,
        r.entries_committed_by_recovery,
        if r.dry_run { "would be" } else { "were" }
    );
    s += &format!(
        "voters {}; answering {}; dropped (superseded until removed and joined again): {}\n",
        r.voters.join(", "),
        if r.reachable.is_empty() { "none".to_string() } else { r.reachable.join(", ") },
        r.dropped.join(", ")
    );
    if !r.volumes_without_up_to_date_replica.is_empty() {
        s += &format!(
            "volumes with no up-to-date replica here (they wait): {}\n",
            r.volumes_without_up_to_date_replica.join(", ")
        );
    }
    for w in &r.warnings {
        s += &format!("WARNING: {w}\n");
    }
    s + "\n" + &table(&["GROUP", "NOW", "THEN", "REASON"], &rows)
}

/// A forced promotion's report, or its dry run's.
pub fn promote_text(r: &tandem_http_api::PromoteReport) -> String {
    let mut s = match (&r.node, r.dry_run) {
        (Some(n), false) => format!(
            "volume {} promoted by force on {n}: group {} starts there; the writes it lacked are given up\n\n",
            r.volume, r.group
        ),
        (Some(n), true) => format!(
            "DRY RUN: nothing changed. To promote: tandem volume promote {} --node {n} --confirm {}\n\n",
            r.volume, r.volume
        ),
        (None, _) => format!(
            "DRY RUN: nothing changed. To promote: tandem volume promote {} --node <node> --confirm {}\n\n",
            r.volume, r.volume
        ),
    };
    let rows: Vec<Vec<String>> = r
        .candidates
        .iter()
        .map(|c| {
            vec![
                c.node.clone(),
                c.disk.clone(),
                if c.online { "online" } else { "offline" }.into(),
                bytes_text(c.out_of_sync_bytes),
                c.newest_write_age_ms
                    .map_or_else(|| "-".into(), |ms| format!("{} ago", duration_text(ms as f64 / 1000.0))),
                c.generation.clone().unwrap_or_else(|| "-".into()),
                c.refused.clone().unwrap_or_else(|| "may be promoted".into()),
            ]
        })
        .collect();
    s += &table(&["REPLICA", "DISK", "NODE", "OUT OF SYNC", "NEWEST WRITE", "GENERATION", "PROMOTION"], &rows);
    s += "\nOUT OF SYNC: what the last primary recorded the replica lacks; writes after its record are not counted.\n";
    if !r.outdated.is_empty() {
        s += &format!("Recorded UpToDate now, Outdated after: {}\n", r.outdated.join(", "));
    }
    s + &r.newer_data + "\n"
}

/// Seconds with two decimals, `-` for none.
pub fn secs(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{:.2}s", ms as f64 / 1000.0))
}

/// One line per group that ran in a site a switchover emptied.
pub fn switchover_table(groups: &[tandem_http_api::SiteGroupReport]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                g.from.clone(),
                g.to.clone().unwrap_or_else(|| "-".into()),
                g.result.clone(),
                secs(g.outage_ms),
                g.rpo_bytes.map_or_else(|| "-".into(), |b| format!("{b}B")),
                g.reason.clone(),
            ]
        })
        .collect();
    table(&["GROUP", "FROM", "TO", "RESULT", "OUTAGE", "RPO", "REASON"], &rows)
}

/// A switchover's report.
pub fn switchover_text(r: &tandem_http_api::SwitchoverReport) -> String {
    format!(
        "switchover of site {}: {} in {:.1}s; its nodes are in standby\n{}",
        r.site,
        if r.complete { "complete" } else { "NOT complete" },
        r.took_ms as f64 / 1000.0,
        switchover_table(&r.groups)
    )
}

pub fn cluster_text(c: &ClusterView) -> String {
    format!(
        "cluster {}  leader {}  term {}  applied {}\n\n{}",
        c.cluster_id,
        c.leader.as_deref().unwrap_or("(none)"),
        c.term,
        c.applied_index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
        nodes_table(&c.members)
    )
}

pub fn node_text(n: &NodeView) -> String {
    let mut rows = vec![
        vec!["name".into(), n.name.clone()],
        vec!["id".into(), n.id.to_string()],
        vec!["role".into(), lower(&n.role)],
        vec!["state".into(), lower(&n.state)],
        vec!["admin_state".into(), lower(&n.admin_state)],
        vec!["leader".into(), n.leader.to_string()],
        vec!["site".into(), n.site.clone().unwrap_or_else(|| "-".into())],
        vec!["port".into(), n.port.to_string()],
        vec!["pid".into(), n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())],
        vec!["version".into(), n.version.clone().unwrap_or_else(|| "-".into())],
    ];
    for p in &n.paths {
        let seen = p.last_seen_ms.map(|ms| format!("{ms} ms ago")).unwrap_or_else(|| "never".into());
        rows.push(vec![
            format!("path {}", p.address),
            format!("{} (last heartbeat {seen})", if p.up { "up" } else { "DOWN" }),
        ]);
    }
    for (k, v) in &n.attributes {
        rows.push(vec![format!("attribute {k}"), v.clone()]);
    }
    table(&["FIELD", "VALUE"], &rows)
}

pub fn groups_table(groups: &[GroupView]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.state.clone(),
                g.node.clone().unwrap_or_else(|| "-".into()),
                g.epoch.to_string(),
                g.spec.nodes.join(","),
                g.reason.clone(),
            ]
        })
        .collect();
    table(&["GROUP", "STATE", "NODE", "EPOCH", "NODES", "LAST CHANGE"], &rows)
}

pub fn group_text(g: &GroupView) -> String {
    let mut rows = vec![
        vec!["name".into(), g.name.clone()],
        vec!["state".into(), g.state.clone()],
        vec!["node".into(), g.node.clone().unwrap_or_else(|| "-".into())],
        vec!["enabled".into(), g.enabled.to_string()],
        vec!["epoch".into(), g.epoch.to_string()],
        vec!["last change".into(), g.reason.clone()],
        vec!["nodes".into(), g.spec.nodes.join(", ")],
        vec!["failback".into(), serde_json::to_string(&g.spec.failback).unwrap_or_default()],
    ];
    if !g.failed_on.is_empty() {
        rows.push(vec!["failed on".into(), g.failed_on.join(", ")]);
    }
    if let Some(to) = &g.move_to {
        rows.push(vec!["moving to".into(), to.clone()]);
    }
    if let Some(n) = g.restarts {
        rows.push(vec!["restarts".into(), n.to_string()]);
    }
    for (i, r) in g.spec.resources.iter().enumerate() {
        // What the node running it says, when it answered.
        let live = g.resources.as_ref().and_then(|l| l.get(i));
        let mut v = r.kind.type_name().to_string();
        if let Some(l) = live {
            v.push_str(&format!(", {}", l.state));
            if let Some(pid) = l.pid {
                v.push_str(&format!(", pid {pid}"));
            }
            if let Some(e) = &l.last_error {
                v.push_str(&format!(", last error: {e}"));
            }
        }
        rows.push(vec![format!("resource {}", r.name), v]);
    }
    table(&["FIELD", "VALUE"], &rows)
}

pub fn local_text(l: &LocalView) -> String {
    match (&l.cluster_id, l.node_id) {
        (Some(c), Some(id)) => {
            format!("{} is node {id} of cluster {c}; leader {}\n", l.name, l.leader.as_deref().unwrap_or("(none yet)"))
        }
        _ => format!("{} is not a member of any cluster\n", l.name),
    }
}

/// `tandem volume ...`: replicated volumes.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCmd {
    /// Every volume: group, size, primary and each replica's state.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// One volume: its replicas with disk, connection, out-of-sync bytes,
    /// resync progress and async lag.
    Show {
        name: String,
        #[arg(long)]
        stale: bool,
    },
    /// Start an online verify on the primary (compares block digests with
    /// every secondary and resyncs what differs).
    Verify { name: String },
    /// After a split brain: throw away NODE's changes; it resyncs from the
    /// other side.
    Resolve {
        name: String,
        /// The replica whose changes are discarded.
        #[arg(long)]
        discard: String,
    },
    /// Replace NODE's replica (a new or wiped disk): it is recorded
    /// Inconsistent at once, its node recreates the files empty, and the
    /// primary resyncs it in full; it is UpToDate again only then.
    Replace {
        /// The volume.
        name: String,
        /// The node whose replica is replaced (not the serving primary).
        node: String,
    },
    /// Forced promotion, when no UpToDate replica is online: shows each
    /// candidate replica and what taking it gives up (bytes known out of
    /// sync, age of its newest write); changes nothing without --confirm.
    Promote {
        /// The volume.
        name: String,
        /// The node whose Outdated replica becomes the volume's data.
        #[arg(long)]
        node: Option<String>,
        /// The volume's name again: promote for real, accepting the loss.
        #[arg(long)]
        confirm: Option<String>,
    },
}

/// Turns an API answer into the text the CLI prints.
type Render = fn(Value) -> Result<String, CliError>;

/// Runs a `tandem volume` subcommand; returns what to print.
pub async fn volume_command(c: &Client, json_out: bool, cmd: VolumeCmd) -> Result<String, CliError> {
    let stale = |s: bool| if s { "?stale=true" } else { "" };
    let (v, render): (Value, Render) = match cmd {
        VolumeCmd::List { stale: s } => (c.call(Method::GET, &format!("/v1/volumes{}", stale(s)), None).await?, |v| {
            Ok(volumes_table(&parse::<Vec<VolumeView>>(v)?))
        }),
        VolumeCmd::Show { name, stale: s } => {
            (c.call(Method::GET, &format!("/v1/volumes/{}{}", enc(&name), stale(s)), None).await?, |v| {
                Ok(volume_text(&parse::<VolumeView>(v)?))
            })
        }
        VolumeCmd::Verify { name } => {
            (c.call(Method::POST, &format!("/v1/volumes/{}/verify", enc(&name)), None).await?, |v| {
                Ok(verify_text(&parse::<VerifyReport>(v)?))
            })
        }
        VolumeCmd::Resolve { name, discard } => (
            c.call(
                Method::POST,
                &format!("/v1/volumes/{}/resolve", enc(&name)),
                Some(serde_json::json!({ "discard": discard })),
            )
            .await?,
            |v| Ok(volume_text(&parse::<VolumeView>(v)?)),
        ),
        VolumeCmd::Promote { name, node, confirm } => {
            let dry = if confirm.is_none() { "?dry_run=true" } else { "" };
            let body = serde_json::json!({ "node": node, "confirm": confirm });
            (c.call(Method::POST, &format!("/v1/volumes/{}/promote{dry}", enc(&name)), Some(body)).await?, |v| {
                Ok(promote_text(&parse::<tandem_http_api::PromoteReport>(v)?))
            })
        }
        VolumeCmd::Replace { name, node } => (
            c.call(Method::POST, &format!("/v1/volumes/{}/replicas/{}/replace", enc(&name), enc(&node)), None).await?,
            |v| Ok(volume_text(&parse::<VolumeView>(v)?)),
        ),
    };
    if json_out {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
    }
    render(v)
}

/// Bytes for people: `0`, `512.0KiB`, `1.5GiB`.
pub fn bytes_text(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1u64 << shift {
            return format!("{:.1}{unit}", n as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{n}B")
}

/// Seconds for people: `42s`, `3m20s`, `2h05m`.
fn duration_text(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn volumes_table(vs: &[VolumeView]) -> String {
    let rows: Vec<Vec<String>> = vs
        .iter()
        .map(|v| {
            let replicas: Vec<String> = v
                .replicas
                .iter()
                .map(|r| format!("{}:{}/{}", r.node, r.disk, lower(&r.connection).to_lowercase()))
                .collect();
            vec![
                v.name.clone(),
                v.group.clone(),
                bytes_text(v.size_bytes),
                v.mode.clone(),
                v.primary.clone().unwrap_or_else(|| "-".into()),
                replicas.join(" "),
            ]
        })
        .collect();
    table(&["VOLUME", "GROUP", "SIZE", "MODE", "PRIMARY", "REPLICAS"], &rows)
}

pub fn volume_text(v: &VolumeView) -> String {
    let mut rows = vec![
        vec!["name".into(), v.name.clone()],
        vec!["group".into(), v.group.clone()],
        vec![
            "size".into(),
            match v.growing_to_bytes {
                Some(to) => format!(
                    "{} ({} bytes), growing to {} (new connections see it once every connected replica has grown)",
                    bytes_text(v.size_bytes),
                    v.size_bytes,
                    bytes_text(to)
                ),
                None => format!("{} ({} bytes)", bytes_text(v.size_bytes), v.size_bytes),
            },
        ],
        vec!["mode".into(), v.mode.clone()],
        vec!["primary".into(), v.primary.clone().unwrap_or_else(|| "- (group not running)".into())],
        vec!["nbd".into(), v.nbd.clone().unwrap_or_else(|| "-".into())],
        vec!["generation".into(), v.generation.clone().unwrap_or_else(|| "-".into())],
    ];
    let recorded: Vec<String> = v.recorded_disks.iter().map(|(n, d)| format!("{n}={d}")).collect();
    rows.push(vec!["recorded disks".into(), recorded.join(", ")]);
    let mut reads = v.read_balancing.clone();
    if let (Some(e), Some(r)) = (v.read_errors, v.repaired_blocks) {
        let per: Vec<String> = v.replicas.iter().map(|x| format!("{}={}", x.node, x.reads)).collect();
        reads = format!("{reads}; {e} read errors, {r} blocks repaired; reads served: {}", per.join(", "));
    }
    rows.push(vec!["reads".into(), reads]);
    if let Some(r) = &v.verify {
        rows.push(vec!["last verify".into(), verify_summary(r)]);
    }
    let replicas: Vec<Vec<String>> = v
        .replicas
        .iter()
        .map(|r| {
            let resync = r.resync.as_ref().map(|p| {
                let done = p.total_bytes.saturating_sub(p.remaining_bytes);
                let pct = if p.total_bytes == 0 { 100.0 } else { done as f64 * 100.0 / p.total_bytes as f64 };
                let eta = p.eta_s.map(duration_text).unwrap_or_else(|| "?".into());
                format!("{pct:.1}% at {}/s, ETA {eta}", bytes_text(p.rate_bytes_per_s))
            });
            vec![
                r.node.clone(),
                r.role.clone(),
                r.disk.clone(),
                lower(&r.connection),
                r.mode.clone().unwrap_or_else(|| "-".into()),
                bytes_text(r.out_of_sync_bytes),
                resync.unwrap_or_else(|| "-".into()),
                r.lag_bytes.map(bytes_text).unwrap_or_else(|| "-".into()),
                r.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        table(&["FIELD", "VALUE"], &rows),
        table(&["NODE", "ROLE", "DISK", "CONNECTION", "MODE", "OUT-OF-SYNC", "RESYNC", "LAG", "LAST ERROR"], &replicas)
    )
}

fn verify_summary(r: &VerifyReport) -> String {
    let per = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter().map(|(n, c)| format!("{n}={c}")).collect::<Vec<_>>().join(", ")
    };
    let mut s = format!("{}, {} checked", r.state, bytes_text(r.checked_bytes));
    if !r.found_blocks.is_empty() {
        s.push_str(&format!(", differing blocks {}", per(&r.found_blocks)));
    }
    if !r.repaired_blocks.is_empty() {
        s.push_str(&format!(", repaired {}", per(&r.repaired_blocks)));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(", error: {e}"));
    }
    s
}

pub fn verify_text(r: &VerifyReport) -> String {
    format!("verify {}\n", verify_summary(r))
}

/// Unix ms as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| ms.to_string())
}

pub fn tokens_table(tokens: &[tandem_http_api::TokenView]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                lower(&t.role),
                utc(t.created_ms),
                t.expires_ms.map(utc).unwrap_or_else(|| "never".into()),
                t.created_by.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ROLE", "CREATED (UTC)", "EXPIRES (UTC)", "BY"], &rows)
}

pub fn alerts_table(alerts: &[tandem_http_api::AlertView]) -> String {
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            let target = match &a.spec {
                tandem_raft::alerts::AlertSpec::Webhook { url, .. } => url.clone(),
                tandem_raft::alerts::AlertSpec::Smtp { to, server, .. } => format!("{} via {server}", to.join(",")),
                tandem_raft::alerts::AlertSpec::Exec { command, .. } => command.join(" "),
            };
            let kinds = a.spec.kinds();
            let filter = format!(
                "{}{}",
                a.spec.min_severity().as_str(),
                if kinds.is_empty() { String::new() } else { format!(" {}", kinds.join(",")) }
            );
            let delivery = match &a.delivery {
                None => "-".into(),
                Some(d) if d.failures == 0 => "ok".into(),
                Some(d) => format!("retrying ({}): {}", d.failures, d.last_error.clone().unwrap_or_default()),
            };
            vec![
                a.name.clone(),
                a.spec.kind().into(),
                target,
                filter,
                a.cursor.to_string(),
                a.sent.to_string(),
                delivery,
            ]
        })
        .collect();
    table(&["NAME", "KIND", "TARGET", "FILTER", "CURSOR", "SENT", "DELIVERY"], &rows)
}

pub fn certs_table(certs: &[tandem_http_api::ClientCertView]) -> String {
    let rows: Vec<Vec<String>> = certs
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                lower(&c.role),
                utc(c.not_after_ms),
                c.serial.clone(),
                c.spki.clone(),
                c.created_by.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ROLE", "EXPIRES (UTC)", "SERIAL", "KEY", "BY"], &rows)
}

pub fn audit_table(entries: &[tandem_raft::access::AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                utc(e.time_ms),
                e.who.clone(),
                e.from.clone(),
                format!("{} {}", e.method, e.path),
                match &e.code {
                    Some(c) => format!("{} {c}", e.status),
                    None => e.status.to_string(),
                },
                e.node.clone(),
            ]
        })
        .collect();
    table(&["ID", "TIME (UTC)", "WHO", "FROM", "REQUEST", "OUTCOME", "NODE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_are_split_across_chunks_and_comments_skipped() {
        let mut p = SseParser::default();
        assert!(p.feed(b": keep-alive\n\nid: 7\nda").is_empty());
        let got = p.feed(b"ta: {\"a\":1}\n\nevent: reset\ndata: {\"first_id\": 9}\r\n\r\n");
        assert_eq!(
            got,
            vec![
                SseMessage { event: None, id: Some("7".into()), data: "{\"a\":1}".into() },
                SseMessage { event: Some("reset".into()), id: None, data: "{\"first_id\": 9}".into() },
            ]
        );
        assert_eq!(
            event_query(&EventsArgs {
                follow: false,
                since: 0,
                kind: Some("group.,node.offline".into()),
                severity: Some("warning".into()),
                group: None
            }),
            "kind=group.,node.offline&severity=warning"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["p".into(), "22".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\np    22\n");
    }

    #[test]
    fn volume_show_prints_every_replica_column() {
        use tandem_http_api::{ConnectionState, ReplicaView, ResyncProgress};
        let replica = |node: &str, role: &str, disk: &str, connection| ReplicaView {
            node: node.into(),
            role: role.into(),
            disk: disk.into(),
            connection,
            mode: (role == "secondary").then(|| "sync".into()),
            out_of_sync_bytes: 0,
            resync: None,
            lag_bytes: None,
            last_error: None,
            reads: 0,
        };
        let mut target = replica("n2", "secondary", "Inconsistent", ConnectionState::SyncTarget);
        target.out_of_sync_bytes = 3 << 29;
        target.resync = Some(ResyncProgress {
            remaining_bytes: 3 << 29,
            sent_bytes: 1 << 29,
            total_bytes: 1 << 31,
            rate_bytes_per_s: 100 << 20,
            eta_s: Some(15.4),
            target_rate_bytes_per_s: None,
        });
        let v = VolumeView {
            name: "data".into(),
            group: "db".into(),
            size_bytes: 2 << 30,
            growing_to_bytes: Some(3 << 30),
            mode: "sync".into(),
            primary: Some("n1".into()),
            nbd: Some("nbd+unix:///data?socket=/x".into()),
            replicas: vec![replica("n1", "primary", "UpToDate", ConnectionState::Connected), target],
            generation: Some("ab12".into()),
            verify: None,
            recorded_disks: [("n1".to_string(), "UpToDate".to_string()), ("n2".to_string(), "Outdated".into())].into(),
            read_balancing: "least-pending".into(),
            read_errors: Some(2),
            repaired_blocks: Some(1),
        };
        let t = volume_text(&v);
        for want in [
            "NODE",
            "OUT-OF-SYNC",
            "SyncTarget",
            "Inconsistent",
            "1.5GiB",
            "25.0% at 100.0MiB/s, ETA 15s",
            "n2=Outdated",
            "growing to 3.0GiB",
            "least-pending",
            "2 read errors, 1 blocks repaired",
        ] {
            assert!(t.contains(want), "{want} missing from:\n{t}");
        }
        let l = volumes_table(&[v]);
        assert!(l.contains("n2:Inconsistent/synctarget") && l.contains("2.0GiB"), "{l}");
        assert_eq!(duration_text(200.0), "3m20s");
        assert_eq!(duration_text(7500.0), "2h05m");
    }

    #[test]
    fn exit_codes_follow_the_status() {
        let api = |status| CliError::Api { status, code: "TND-1".into(), message: String::new(), hint: String::new() };
        assert_eq!(api(404).exit_code(), EXIT_REFUSED);
        assert_eq!(api(503).exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(api(500).exit_code(), EXIT_SERVER);
        assert_eq!(api(502).exit_code(), EXIT_REFUSED);
        assert_eq!(CliError::Unreachable { endpoint: "x".into(), reason: "y".into() }.exit_code(), EXIT_UNREACHABLE);
    }
}
