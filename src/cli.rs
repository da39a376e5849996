//! The CLI's client side: calls the REST API of one agent and prints tables
//! (or the API's JSON with `--json`). It never touches a node's data: every
//! action goes through the API, so the CLI works from any machine.
//!
//! Exit codes (documented in README.md and docs/api.md):
//! 0 success; 1 the request was refused (4xx); 2 bad command line or input file;
//! 3 the endpoint could not be reached; 4 the cluster is unavailable (503:
//! no leader, no quorum), retry later; 5 the agent failed (5xx); 6 the agent's
//! configuration is invalid or it could not start.

use std::fmt::Write as _;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tandem_http_api::{ClusterView, ErrorBody, GroupView, LocalView, NodeView};

pub const EXIT_REFUSED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_UNAVAILABLE: u8 = 4;
pub const EXIT_SERVER: u8 = 5;
pub const EXIT_CONFIG: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {endpoint}: {reason}\nhint: is the agent running? Set --endpoint or TANDEM_ENDPOINT.")]
    Unreachable { endpoint: String, reason: String },
    #[error("{code}: {message}\nhint: {hint}")]
    Api { status: u16, code: String, message: String, hint: String },
    #[error("unexpected answer from {url}: {reason}")]
    BadAnswer { url: String, reason: String },
    #[error("cannot use the input: {0}")]
    Input(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
            CliError::Api { status: 503, .. } => EXIT_UNAVAILABLE,
            CliError::Api { status, .. } if *status >= 500 => EXIT_SERVER,
            CliError::Api { .. } => EXIT_REFUSED,
            CliError::BadAnswer { .. } => EXIT_SERVER,
            CliError::Input(_) => EXIT_USAGE,
        }
    }
}

pub struct Client {
    endpoint: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(endpoint: &str) -> Result<Client, CliError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| CliError::Unreachable { endpoint: endpoint.into(), reason: e.to_string() })?;
        Ok(Client { endpoint: endpoint.trim_end_matches('/').to_string(), http })
    }

    /// Calls the API; returns the JSON answer (null for 204).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let url = format!("{}{}", self.endpoint, path);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CliError::Unreachable { endpoint: self.endpoint.clone(), reason: e.to_string() })?;
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

pub fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::BadAnswer { url: "response".into(), reason: e.to_string() })
}

fn lower<T: serde::Serialize>(v: &T) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["p".into(), "22".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\np    22\n");
    }

    #[test]
    fn exit_codes_follow_the_status() {
        let api = |status| CliError::Api { status, code: "TND-1".into(), message: String::new(), hint: String::new() };
        assert_eq!(api(404).exit_code(), EXIT_REFUSED);
        assert_eq!(api(503).exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(api(500).exit_code(), EXIT_SERVER);
        assert_eq!(CliError::Unreachable { endpoint: "x".into(), reason: "y".into() }.exit_code(), EXIT_UNREACHABLE);
    }
}
