//! The agent's TOML configuration: every key, its default, and the checks
//! run at start. A bad file is refused whole, naming the offending key.
//! Defaults are documented in docs/config.md; keep the two in step.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_raft::state::{validate_name, validate_spec, CommandError, NodeSpec};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: invalid `{key}`: {message}")]
    Invalid { path: String, key: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unique node name: 1-63 chars of a-z, 0-9, '.', '_', '-'.
    pub name: String,
    /// Where the node keeps its RocksDB (log, vote, state machine).
    pub data_dir: PathBuf,
    /// One IP address per independent network path, preferred first. The API
    /// (TCP) and heartbeats (UDP) listen on every one of them.
    #[serde(default = "default_addresses")]
    pub addresses: Vec<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub site: Option<String>,
    /// A witness votes but never runs resources.
    #[serde(default)]
    pub witness: bool,
    /// Members' API URLs to join through at first start (tried in order,
    /// again and again, until one accepts). Empty: wait for
    /// `tandem cluster init` or `tandem cluster join`.
    #[serde(default)]
    pub join: Vec<String>,
    /// The join token for `join` (from `tandem cluster join-token`).
    #[serde(default)]
    pub join_token: Option<String>,
    /// The cluster CA's pin for `join`, `sha256:<hex>`.
    #[serde(default)]
    pub join_ca_hash: Option<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub liveness: LivenessConfig,
    #[serde(default)]
    pub autopilot: AutopilotConfig,
    #[serde(default)]
    pub fencing: FencingConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub filesystem: FilesystemConfig,
    /// The ticket between this cluster's site and another cluster's, with
    /// an arbitrator (docs/dr.md). Not set: no ticket.
    #[serde(default)]
    pub ticket: Option<TicketConfig>,
}

/// `[ticket]`: this cluster's part in the ticket between two sites.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketConfig {
    /// This cluster's site in the ticket.
    pub site: String,
    /// The key the three participants share (at least 32 bytes).
    pub key_file: PathBuf,
    /// The other site's cluster: its name and its nodes' API URLs.
    pub other_site: TicketPeer,
    /// The arbitrator: its name and URL(s).
    pub arbitrator: TicketPeer,
    /// Ask for the ticket from the start (and take it when the other site
    /// lets it lapse). `false`: only once told (`POST /v1/ticket/acquire`).
    #[serde(default = "default_true")]
    pub acquire: bool,
    /// The ticket's timing (`TicketTiming`), the same on all three.
    #[serde(default = "default_ticket_lease")]
    pub lease_ms: u64,
    #[serde(default = "default_ticket_margin")]
    pub margin_ms: u64,
    #[serde(default = "default_ticket_renew")]
    pub renew_ms: u64,
}

impl TicketConfig {
    pub fn timing(&self) -> crate::ticket::Timing {
        crate::ticket::Timing { lease_ms: self.lease_ms, margin_ms: self.margin_ms, renew_ms: self.renew_ms }
    }
}

fn default_ticket_lease() -> u64 {
    crate::ticket::Timing::DEFAULT.lease_ms
}

fn default_ticket_margin() -> u64 {
    crate::ticket::Timing::DEFAULT.margin_ms
}

fn default_ticket_renew() -> u64 {
    crate::ticket::Timing::DEFAULT.renew_ms
}

/// Another participant of the ticket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketPeer {
    pub name: String,
    /// Tried in order until one answers (a site's leader answers).
    pub urls: Vec<String>,
}

/// The ticket's timing: the same on the three participants (a request
/// with another lease or margin is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TicketTiming {
    pub lease_ms: u64,
    pub margin_ms: u64,
    pub renew_ms: u64,
}

impl Default for TicketTiming {
    fn default() -> Self {
        let t = crate::ticket::Timing::DEFAULT;
        TicketTiming { lease_ms: t.lease_ms, margin_ms: t.margin_ms, renew_ms: t.renew_ms }
    }
}

impl TicketTiming {
    pub fn timing(&self) -> crate::ticket::Timing {
        crate::ticket::Timing { lease_ms: self.lease_ms, margin_ms: self.margin_ms, renew_ms: self.renew_ms }
    }
}

fn default_true() -> bool {
    true
}

/// `[tls]`: TLS on every TCP connection (see docs/security.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `false` turns TLS off on the API, Raft and replication — for
    /// measuring what TLS costs, never for a real cluster. Every node of a
    /// cluster must agree.
    pub enabled: bool,
    /// Lifetime of the node certificates this node signs (as a voter).
    pub node_cert_days: u32,
    /// Bring your own CA: the operator's CA certificate(s), PEM. With
    /// `cert_file` and `key_file` (all three or none), the cluster makes,
    /// holds and signs nothing: the operator issues and renews every
    /// certificate, and the agent re-reads these files when they change.
    pub ca_file: Option<PathBuf>,
    /// This node's certificate, PEM, signed by a CA of `ca_file`; its common
    /// name is the node's `name`, its IP SANs the node's `addresses`.
    pub cert_file: Option<PathBuf>,
    /// This node's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { enabled: true, node_cert_days: 365, ca_file: None, cert_file: None, key_file: None }
    }
}

/// An operator's CA, node certificate and key, as read from `[tls]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsConfig {
    /// Whether the CA is the operator's (`ca_file` set).
    pub fn external(&self) -> bool {
        self.ca_file.is_some()
    }

    /// Reads and checks the operator's files. Errors name the key at fault.
    pub fn read_external(&self, name: &str, now: i64) -> Result<Option<ExternalTls>, (&'static str, String)> {
        let (ca, cert, key) = match (&self.ca_file, &self.cert_file, &self.key_file) {
            (None, None, None) => return Ok(None),
            (Some(a), Some(b), Some(c)) => (a, b, c),
            (None, _, _) => {
                return Err(("tls.ca_file", "cert_file and key_file need ca_file (all three or none)".into()))
            }
            (_, None, _) => {
                return Err(("tls.cert_file", "ca_file needs cert_file and key_file (all three or none)".into()))
            }
            (_, _, None) => {
                return Err(("tls.key_file", "ca_file needs cert_file and key_file (all three or none)".into()))
            }
        };
        if !self.enabled {
            return Err(("tls.ca_file", "is set while tls.enabled = false".into()));
        }
        let read = |key: &'static str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| (key, format!("cannot read {}: {e}", p.display())))
        };
        let files = ExternalTls {
            ca_pem: read("tls.ca_file", ca)?,
            cert_pem: read("tls.cert_file", cert)?,
            key_pem: read("tls.key_file", key)?,
        };
        use crate::security::pki::{check_external, ExternalFault};
        check_external(&files.ca_pem, &files.cert_pem, &files.key_pem, name, now).map_err(|f| match f {
            ExternalFault::Ca(m) => ("tls.ca_file", format!("{}: {m}", ca.display())),
            ExternalFault::Cert(m) => ("tls.cert_file", format!("{}: {m}", cert.display())),
            ExternalFault::Key(m) => ("tls.key_file", format!("{}: {m}", key.display())),
        })?;
        Ok(Some(files))
    }
}

/// `[events]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events the cluster keeps (the oldest go first). The leader's value
    /// applies: it is carried in every command the leader proposes.
    pub retention: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { retention: tandem_raft::events::DEFAULT_EVENT_RETAIN }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Audit entries the cluster keeps (the oldest go first).
    pub retention: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { retention: 1_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesystemConfig {
    /// How a `filesystem` resource makes its volume a block device: `nbd`
    /// (`/dev/nbdN` through nbd-client: the kernel's nbd module), `loop` (the
    /// export as a file through FUSE with nbdfuse, under a loop device), or
    /// `auto` (nbd where the kernel has it, else loop).
    pub device: String,
}

impl Default for FilesystemConfig {
    fn default() -> Self {
        FilesystemConfig { device: "auto".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// A node that sees no majority of voters for this long kills every
    /// resource it runs.
    pub lease_ms: u64,
    /// Extra wait on the leader, past the lease, before a dead node's groups
    /// start elsewhere (heartbeat spacing, slow kills).
    pub margin_ms: u64,
    /// A Linux watchdog device (e.g. /dev/watchdog, or softdog's) that the
    /// node's watchdog process feeds while the lease holds or nothing runs:
    /// a node whose resources cannot be stopped in time resets.
    pub watchdog_device: Option<PathBuf>,
    /// A program the leader runs to fence a silent node before its groups
    /// start elsewhere: `[program, args...]`, called with the node's name
    /// appended (and TANDEM_FENCE_NODE, TANDEM_FENCE_ADDRESSES set); exit
    /// status 0 confirms the node is off. Empty: the lease alone decides.
    /// Give every node the same one: any of them may lead.
    pub fence_command: Vec<String>,
    /// How long one fence attempt may take before it counts as failed.
    pub fence_timeout_ms: u64,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            lease_ms: 500,
            margin_ms: 300,
            watchdog_device: None,
            fence_command: Vec::new(),
            fence_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind the snapshot, for slow followers.
    pub keep_entries_after_snapshot: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 450,
            snapshot_after_entries: 1000,
            keep_entries_after_snapshot: 500,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// How often a heartbeat goes to every peer on every path.
    pub heartbeat_interval_ms: u64,
    /// A path silent this long is down; a node whose paths are all down is
    /// offline.
    pub node_timeout_ms: u64,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig { heartbeat_interval_ms: 100, node_timeout_ms: 500 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutopilotConfig {
    /// Target number of voters: 3 or 5 (1 for a lab cluster, 7 for large ones).
    pub voters: usize,
    /// A voter offline this long is replaced by a healthy learner.
    pub dead_voter_after_ms: u64,
    /// How often the leader reconsiders the voter set.
    pub interval_ms: u64,
    /// A learner more than this many entries behind is not promoted.
    pub max_lag_entries: u64,
}

impl Default for AutopilotConfig {
    fn default() -> Self {
        AutopilotConfig { voters: 3, dead_voter_after_ms: 10_000, interval_ms: 1000, max_lag_entries: 100 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `tandem=debug,openraft=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info,openraft=warn".into() }
    }
}

fn default_addresses() -> Vec<String> {
    vec!["127.0.0.1".into()]
}

fn default_port() -> u16 {
    7401
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn spec(&self) -> NodeSpec {
        NodeSpec {
            name: self.name.clone(),
            addresses: self.addresses.clone(),
            port: self.port,
            site: self.site.clone(),
            witness: self.witness,
        }
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid { path: path.into(), key: key.into(), message };
        validate_name("name", &self.name).map_err(|e| bad("name", reason(e)))?;
        validate_spec(&self.spec()).map_err(|e| match e {
            CommandError::Invalid { field, reason } => bad(&field, reason),
            other => bad("name", other.to_string()),
        })?;
        if self.port == u16::MAX {
            return Err(bad("port", "must be at most 65534: port + 1 is the volume replication port".into()));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty".into()));
        }
        let scheme = if self.tls.enabled { "https://" } else { "http://" };
        for (i, url) in self.join.iter().enumerate() {
            if !url.starts_with(scheme) {
                return Err(bad(&format!("join[{i}]"), format!("{url:?} must be an {scheme} URL")));
            }
        }
        if !self.join.is_empty() && self.tls.enabled {
            if self.join_token.as_deref().is_none_or(|t| !t.starts_with(tandem_raft::access::TOKEN_PREFIX)) {
                return Err(bad(
                    "join_token",
                    "`join` needs a join token (tnd_…, from `tandem cluster join-token`)".into(),
                ));
            }
            if self.join_ca_hash.as_deref().is_none_or(|h| !valid_ca_hash(h)) {
                return Err(bad("join_ca_hash", "`join` needs the CA pin, sha256:<64 hex digits>".into()));
            }
        }
        if !(1..=3650).contains(&self.tls.node_cert_days) {
            return Err(bad("tls.node_cert_days", "must be 1 to 3650".into()));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.tls.read_external(&self.name, now).map_err(|(key, message)| bad(key, message))?;
        if !(tandem_raft::access::MIN_AUDIT_RETAIN..=tandem_raft::access::MAX_AUDIT_RETAIN)
            .contains(&self.audit.retention)
        {
            return Err(bad(
                "audit.retention",
                format!(
                    "must be {} to {}",
                    tandem_raft::access::MIN_AUDIT_RETAIN,
                    tandem_raft::access::MAX_AUDIT_RETAIN
                ),
            ));
        }
        if tandem_raft::events::validate_retain(self.events.retention).is_err() {
            return Err(bad(
                "events.retention",
                format!(
                    "must be {} to {}",
                    tandem_raft::events::MIN_EVENT_RETAIN,
                    tandem_raft::events::MAX_EVENT_RETAIN
                ),
            ));
        }
        if !["auto", "nbd", "loop"].contains(&self.filesystem.device.as_str()) {
            return Err(bad("filesystem.device", format!("{:?} is not auto, nbd or loop", self.filesystem.device)));
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms < 10 {
            return Err(bad("raft.heartbeat_interval_ms", "must be at least 10".into()));
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms * 2 {
            return Err(bad(
                "raft.election_timeout_min_ms",
                "must exceed twice raft.heartbeat_interval_ms, or followers start elections under a live leader".into(),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(bad("raft.election_timeout_max_ms", "must exceed raft.election_timeout_min_ms".into()));
        }
        if r.snapshot_after_entries == 0 {
            return Err(bad("raft.snapshot_after_entries", "must be at least 1".into()));
        }
        let l = &self.liveness;
        if l.heartbeat_interval_ms < 10 {
            return Err(bad("liveness.heartbeat_interval_ms", "must be at least 10".into()));
        }
        if l.node_timeout_ms < l.heartbeat_interval_ms * 2 {
            return Err(bad(
                "liveness.node_timeout_ms",
                "must be at least twice liveness.heartbeat_interval_ms, or one lost heartbeat marks a node offline"
                    .into(),
            ));
        }
        let a = &self.autopilot;
        if ![1, 3, 5, 7].contains(&a.voters) {
            return Err(bad(
                "autopilot.voters",
                format!("{} is not 1, 3, 5 or 7 (an odd number keeps a majority)", a.voters),
            ));
        }
        if a.dead_voter_after_ms < l.node_timeout_ms {
            return Err(bad("autopilot.dead_voter_after_ms", "must be at least liveness.node_timeout_ms".into()));
        }
        if a.interval_ms < 50 {
            return Err(bad("autopilot.interval_ms", "must be at least 50".into()));
        }
        if self.fencing.lease_ms < 100 {
            return Err(bad("fencing.lease_ms", "must be at least 100".into()));
        }
        // The node and the leader time the same silence from heartbeats that
        // may be one interval apart; the margin must cover that and a tick.
        if self.fencing.margin_ms < l.heartbeat_interval_ms + 200 {
            return Err(bad(
                "fencing.margin_ms",
                "must be at least liveness.heartbeat_interval_ms + 200, or a cut-off node may still run its groups when they start elsewhere".into(),
            ));
        }
        if let Some(program) = self.fencing.fence_command.first() {
            if !program.starts_with('/') {
                return Err(bad("fencing.fence_command", format!("{program:?} must be an absolute path")));
            }
        }
        if self.fencing.fence_timeout_ms < 100 {
            return Err(bad("fencing.fence_timeout_ms", "must be at least 100".into()));
        }
        if self.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            return Err(bad("log.level", format!("{:?} is not a tracing filter", self.log.level)));
        }
        if let Some(t) = &self.ticket {
            validate_name("ticket.site", &t.site).map_err(|e| bad("ticket.site", reason(e)))?;
            for (key, peer) in [("ticket.other_site", &t.other_site), ("ticket.arbitrator", &t.arbitrator)] {
                validate_name(key, &peer.name).map_err(|e| bad(&format!("{key}.name"), reason(e)))?;
                if peer.urls.is_empty() {
                    return Err(bad(&format!("{key}.urls"), "must name at least one URL".into()));
                }
                for (i, url) in peer.urls.iter().enumerate() {
                    let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
                    if !ok {
                        return Err(bad(&format!("{key}.urls[{i}]"), format!("{url:?} is not an http(s) URL")));
                    }
                }
            }
            let names = [&t.site, &t.other_site.name, &t.arbitrator.name];
            if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
                return Err(bad("ticket", "site, other_site.name and arbitrator.name must differ".into()));
            }
            t.timing().validate().map_err(|e| bad("ticket.lease_ms", e))?;
            if t.margin_ms <= self.fencing.lease_ms {
                // An agent that dies with its ticket groups running leaves
                // them to the watchdog, which kills them when the node's
                // lease runs out: that must come before the other site may
                // take the ticket.
                return Err(bad(
                    "ticket.margin_ms",
                    format!("must be above fencing.lease_ms ({}): a dead agent's ticket groups are killed only when its lease runs out", self.fencing.lease_ms),
                ));
            }
            crate::ticket_link::SealKey::load(&t.key_file).map_err(|e| bad("ticket.key_file", e.to_string()))?;
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.liveness.heartbeat_interval_ms)
    }

    pub fn node_timeout(&self) -> Duration {
        Duration::from_millis(self.liveness.node_timeout_ms)
    }

    /// How long the leader waits after a node's last heartbeat before it
    /// takes the node's groups as fenced: the node's lease counts from the
    /// last majority it heard (at most one heartbeat interval after the
    /// leader last heard it), plus a margin for the interval and the kill.
    pub fn fenced_after(&self) -> Duration {
        Duration::from_millis(self.fencing.lease_ms + self.fencing.margin_ms).max(self.node_timeout())
    }
}

fn reason(e: CommandError) -> String {
    match e {
        CommandError::Invalid { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// `sha256:` and 64 hex digits.
pub fn valid_ca_hash(h: &str) -> bool {
    h.strip_prefix("sha256:").is_some_and(|x| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(text: &str) -> String {
        match Config::parse(text, "t.toml") {
            Err(ConfigError::Invalid { key, .. }) => key,
            Err(ConfigError::Parse { message, .. }) => format!("parse: {message}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    const BASE: &str = "name = \"node1\"\ndata_dir = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(BASE, "t.toml").unwrap();
        assert_eq!(c.port, 7401);
        assert_eq!(c.addresses, vec!["127.0.0.1"]);
        assert_eq!(c.autopilot.voters, 3);
        assert_eq!(c.liveness.node_timeout_ms, 500);
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(key_of("name = \"Bad Name\"\ndata_dir = \"/x\""), "name");
        assert_eq!(key_of(&format!("{BASE}addresses = [\"nope\"]")), "addresses[0]");
        assert_eq!(key_of(&format!("{BASE}port = 0")), "port");
        assert_eq!(key_of(&format!("{BASE}port = 65535")), "port");
        assert_eq!(key_of(&format!("{BASE}join = [\"10.0.0.1:7401\"]")), "join[0]");
        assert_eq!(key_of(&format!("{BASE}[fencing]\nfence_command = [\"fence.sh\"]")), "fencing.fence_command");
        assert_eq!(key_of(&format!("{BASE}[fencing]\nfence_timeout_ms = 5")), "fencing.fence_timeout_ms");
        assert_eq!(key_of(&format!("{BASE}[raft]\nelection_timeout_min_ms = 100")), "raft.election_timeout_min_ms");
        assert_eq!(key_of(&format!("{BASE}[raft]\nelection_timeout_max_ms = 250")), "raft.election_timeout_max_ms");
        assert_eq!(key_of(&format!("{BASE}[liveness]\nnode_timeout_ms = 150")), "liveness.node_timeout_ms");
        assert_eq!(key_of(&format!("{BASE}[autopilot]\nvoters = 4")), "autopilot.voters");
        assert_eq!(key_of(&format!("{BASE}[log]\nlevel = \"[[[\"")), "log.level");
    }

    #[test]
    fn a_bad_ticket_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ticket.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let ticket = |site: &str, other: &str, url: &str, extra: &str| {
            format!(
                "{BASE}[ticket]\nsite = \"{site}\"\nkey_file = \"{}\"\n\
                 other_site = {{ name = \"{other}\", urls = [\"{url}\"] }}\n\
                 arbitrator = {{ name = \"arb\", urls = [\"http://10.0.3.1:7409\"] }}\n{extra}",
                key.display()
            )
        };
        let good = ticket("a", "b", "https://10.0.2.1:7401", "");
        let cfg = Config::parse(&good, "t.toml").unwrap();
        assert_eq!(cfg.ticket.map(|t| t.timing()), Some(crate::ticket::Timing::DEFAULT));
        assert_eq!(key_of(&ticket("A", "b", "https://10.0.2.1:7401", "")), "ticket.site");
        assert_eq!(key_of(&ticket("a", "a", "https://10.0.2.1:7401", "")), "ticket");
        assert_eq!(key_of(&ticket("a", "b", "10.0.2.1:7401", "")), "ticket.other_site.urls[0]");
        assert_eq!(key_of(&ticket("a", "b", "https://10.0.2.1:7401", "margin_ms = 20000\n")), "ticket.lease_ms");
        let missing = good.replace(&key.display().to_string(), "/nonexistent/key");
        assert_eq!(key_of(&missing), "ticket.key_file");
        let m = key_of(&format!("{good}acquired = true\n"));
        assert!(m.contains("acquired"), "{m}");
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let m = key_of(&format!("{BASE}prot = 7401"));
        assert!(m.contains("prot"), "{m}");
        let m = key_of(&format!("{BASE}[raft]\nheartbeat_interval = 5"));
        assert!(m.contains("heartbeat_interval"), "{m}");
        let m = key_of(&format!("{BASE}port = \"x\""));
        assert!(m.contains("port"), "{m}");
    }
}
