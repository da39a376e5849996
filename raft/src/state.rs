//! The replicated cluster state and its commands: a pure state machine.
//!
//! `ClusterState::apply` takes a command and returns the reply, changing the
//! state only when the command is accepted. It does no I/O, reads no clock and
//! draws no random number, so every replica that applies the same log reaches
//! the same state. A rejected command must leave the state exactly as it was.
//!
//! Commands are stored in the Raft log inside [`VersionedCommand`], tagged with
//! the encoding version, so that a newer binary can still read an older log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::access::{AuditEntry, AuditLog, ClientCertRecord, ClientCerts, TokenRecord, Tokens};
use crate::alerts::{AlertSpec, Alerts};
use crate::events::{validate_retain, Event, EventLog, Severity};
use crate::group::{
    replica_nodes, validate_group, GroupRecord, GroupSpec, Phase, Placement, ResourceKind, ResourceSpec, MAX_GROUPS,
};
use crate::volume::{format_bytes, DiskState, OutOfSync, PromotionRpo};

pub use crate::error::{invalid, validate_name, CommandError, MAX_NAME_LEN};
pub use crate::NodeId;

/// Most network paths (addresses) a node may declare.
pub const MAX_ADDRESSES: usize = 8;
/// Most attributes one node may carry.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute value.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 1024;
/// Most nodes in one cluster (the product's stated limit).
pub const MAX_NODES: usize = 32;

/// What the operator allows a node to do. Liveness ("offline") is not part of
/// the replicated state: it is observed, not decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Runs resources.
    #[default]
    Online,
    /// Runs nothing; groups move away.
    Standby,
    /// Resources are left alone and not monitored.
    Maintenance,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Online => "online",
            AdminState::Standby => "standby",
            AdminState::Maintenance => "maintenance",
        }
    }
}

/// A member node as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    /// One IP address per independent network path, preferred first.
    pub addresses: Vec<String>,
    /// Port of the node's API (TCP) and heartbeats (UDP) on every address.
    pub port: u16,
    #[serde(default)]
    pub site: Option<String>,
    /// A witness votes but never runs resources.
    #[serde(default)]
    pub witness: bool,
    #[serde(default)]
    pub admin_state: AdminState,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl NodeRecord {
    /// Base URLs of the node's API, one per network path.
    pub fn urls(&self) -> Vec<String> {
        api_urls(&self.addresses, self.port)
    }
}

static PLAINTEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Switches every API URL this process builds to `http://` (an agent run
/// with `[tls] enabled = false`, for benchmarks only).
pub fn set_plaintext(plain: bool) {
    PLAINTEXT.store(plain, std::sync::atomic::Ordering::Relaxed);
}

/// `https`, or `http` after [`set_plaintext`].
pub fn url_scheme() -> &'static str {
    if PLAINTEXT.load(std::sync::atomic::Ordering::Relaxed) {
        "http"
    } else {
        "https"
    }
}

/// Base URLs of an API listening on `port` at each of `addresses`.
pub fn api_urls(addresses: &[String], port: u16) -> Vec<String> {
    addresses.iter().map(|a| format!("{}://{}", url_scheme(), socket_addr(a, port))).collect()
}

/// `host:port`, bracketing IPv6 literals.
pub fn socket_addr(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// What a new node declares about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub addresses: Vec<String>,
    pub port: u16,
    pub site: Option<String>,
    pub witness: bool,
}

/// Every change to the cluster state. Adding a variant is backward compatible;
/// changing one needs a new [`VersionedCommand`] version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// First entry of a new cluster: names it and records its first node.
    Bootstrap {
        cluster_id: String,
        node_id: NodeId,
        node: NodeSpec,
        /// The first heartbeat key, drawn by the proposer (the state
        /// machine draws nothing). None in logs written before heartbeats
        /// were authenticated.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_key: Option<HeartbeatSecret>,
    },
    /// A new heartbeat key, drawn by the proposer; the current one is kept
    /// as the previous, still accepted, so heartbeats sealed by a node that
    /// has not applied this yet are not dropped.
    RotateHeartbeatKey {
        key: HeartbeatSecret,
    },
    /// Stops accepting the key before `generation` (proposed by the leader
    /// some seconds after a rotation, once every node has had time to apply
    /// it). A no-op if another rotation came since.
    RetireHeartbeatKey {
        generation: u32,
    },
    /// Records a joining node under the next unused id.
    AddNode {
        node: NodeSpec,
    },
    RemoveNode {
        name: String,
    },
    SetAdminState {
        name: String,
        state: AdminState,
    },
    /// Sets every node of `site` (the witness included) at once, so that
    /// no group moves within the site between two nodes' changes.
    SetSiteAdminState {
        site: String,
        state: AdminState,
    },
    SetAttribute {
        name: String,
        key: String,
        value: String,
    },
    DeleteAttribute {
        name: String,
        key: String,
    },
    /// Creates or replaces a group's definition; placement is kept.
    PutGroup {
        name: String,
        spec: GroupSpec,
    },
    /// Deletes a stopped group that no other group refers to.
    DeleteGroup {
        name: String,
    },
    SetGroupEnabled {
        name: String,
        enabled: bool,
    },
    /// A scheduler decision: applies only if the group is still at
    /// `expected_epoch`, so a decision made on stale state is refused.
    SetPlacement {
        name: String,
        expected_epoch: u64,
        node: Option<NodeId>,
        phase: Phase,
        reason: String,
    },
    /// The group failed past its restart threshold on `node`.
    MarkGroupFailed {
        name: String,
        node: NodeId,
        epoch: u64,
    },
    ClearGroupFailures {
        name: String,
    },
    /// The failure of the group on `node` expired (`failure_timeout_ms`):
    /// it may run there again. Nothing when it is not marked failed there.
    ExpireGroupFailure {
        name: String,
        node: NodeId,
    },
    /// A node about to start a group placed on it claims it: applied only if
    /// the group is still placed there, started, at `expected_epoch`; the
    /// epoch then grows, so a placement decided earlier against the old
    /// epoch (a leader that took the node for dead before it came back) can
    /// no longer apply, and the start cannot race it.
    ClaimGroup {
        name: String,
        node: NodeId,
        expected_epoch: u64,
    },
    /// Switchover: the group stops where it runs, then starts on `to`.
    MoveGroup {
        name: String,
        to: NodeId,
    },
    /// The primary of `volume` records what `node`'s replica holds (any
    /// replica, itself included). Applies only while the owning group is
    /// placed at `epoch`, so a stale primary cannot overwrite the records.
    SetReplicaDisk {
        volume: String,
        node: String,
        disk: DiskState,
        epoch: u64,
        /// The replacement number of the replica this record describes (as
        /// it told the primary when it connected). `UpToDate` is refused
        /// unless it is the current one: that resync was of the disk before
        /// its replacement.
        #[serde(default, skip_serializing_if = "is_zero")]
        replaced: u64,
    },
    /// An operator replaces `node`'s replica of `volume` (a new or wiped
    /// disk): the replica is recorded `Inconsistent` and its replacement
    /// number grows, which makes its node recreate the files, empty; the
    /// primary then resyncs it in full. Refused while `node` serves the
    /// volume as primary, or when no other replica is `UpToDate`.
    ReplaceReplica {
        volume: String,
        node: String,
    },
    /// The primary of `volume` records how many bytes each replica it
    /// tracks as missing writes lacks (by node; 0 clears the record), at
    /// `at_ms` on its clock. Applies only while the owning group is placed
    /// at `epoch`, like `SetReplicaDisk`. Sent when the figures grow (at most
    /// every 5 s), so a forced promotion can tell what it gives up.
    RecordOutOfSync {
        volume: String,
        epoch: u64,
        bytes: BTreeMap<String, u64>,
        at_ms: u64,
    },
    /// Forced promotion: an operator accepts the loss of the writes
    /// `node`'s `Outdated` replica of `volume` missed, so the group can run
    /// again when no `UpToDate` replica is left to start on. The replica is
    /// recorded `UpToDate`, every other `UpToDate` one `Outdated` (the old
    /// primary's newer data then meets the new primary as a split brain,
    /// handled by the volume's policy: never overwritten silently).
    /// Refused while the group is placed on a node (a serving primary is
    /// never replaced), or unless the replica is `Outdated`. The agent
    /// checks before proposing that no `UpToDate` replica is online.
    PromoteReplica {
        volume: String,
        node: String,
        rpo: PromotionRpo,
    },
    /// Adds an API token (only its hash); refused when the name is taken.
    CreateToken {
        token: TokenRecord,
    },
    RevokeToken {
        name: String,
    },
    /// Drops tokens expired at `now_ms` (the proposer's clock).
    ExpireTokens {
        now_ms: u64,
    },
    /// Records a client certificate (its key pin) with a role.
    RegisterClientCert {
        cert: ClientCertRecord,
    },
    RevokeClientCert {
        name: String,
    },
    /// Pins member `node_id`'s certificate key (operator-issued
    /// certificates: the pin, not a name, says which member a certificate
    /// is, so a removed node's certificate names nobody).
    SetNodeCertificate {
        node_id: NodeId,
        spki: String,
    },
    /// Appends audit entries, keeping the newest `retain`.
    RecordAudit {
        entries: Vec<AuditEntry>,
        retain: usize,
    },
    /// Appends events that nodes observed (liveness, leases, fencing, …).
    RecordEvents {
        events: Vec<Event>,
    },
    /// Defines or replaces an alert (a new one sends the events recorded
    /// after this command; a replaced one keeps its cursor).
    PutAlert {
        name: String,
        /// Boxed: the largest definition would make every command as big.
        spec: Box<AlertSpec>,
        time_ms: u64,
        #[serde(default)]
        by: String,
    },
    DeleteAlert {
        name: String,
    },
    /// The leader's sender is done with the events up to `cursor` (`sent`
    /// of them were sent) and, with `report_ms`, sent a status report then.
    AdvanceAlert {
        name: String,
        cursor: u64,
        sent: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report_ms: Option<u64>,
    },
    /// The first command of a recovered cluster, proposed by its single
    /// voter `survivor`: the voters in `dropped` are superseded, and
    /// `incarnation` counts the recoveries. `log_index`/`committed_index`
    /// say what the survivor held: the entries between them, never known
    /// committed before, were committed by the recovery.
    Recover {
        incarnation: u64,
        survivor: NodeId,
        dropped: Vec<NodeId>,
        log_index: u64,
        committed_index: u64,
    },
}

/// What the proposer adds to a command: its clock (the time of the events
/// the apply emits), the event retention it is configured with, and who
/// asked for the change when a client did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stamp {
    pub time_ms: u64,
    pub events_retain: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A command with its [`Stamp`] (log encoding version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StampedCommand {
    pub stamp: Stamp,
    pub cmd: Command,
}

/// The log's encoding of a command: `{"v": "1", "cmd": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "v", content = "cmd")]
pub enum VersionedCommand {
    #[serde(rename = "1")]
    V1(Command),
    /// `{"v": "2", "cmd": {"stamp": {...}, "cmd": {...}}}`.
    #[serde(rename = "2")]
    V2(StampedCommand),
}

impl VersionedCommand {
    pub fn new(cmd: Command) -> Self {
        VersionedCommand::V1(cmd)
    }

    /// A command stamped by its proposer.
    pub fn stamped(cmd: Command, stamp: Stamp) -> Self {
        VersionedCommand::V2(StampedCommand { stamp, cmd })
    }

    /// The command in today's shape, upgrading older encodings.
    pub fn into_current(self) -> Command {
        self.into_parts().0
    }

    /// The command and its stamp (none before version 2).
    pub fn into_parts(self) -> (Command, Option<Stamp>) {
        match self {
            VersionedCommand::V1(cmd) => (cmd, None),
            VersionedCommand::V2(StampedCommand { stamp, cmd }) => (cmd, Some(stamp)),
        }
    }
}

impl std::fmt::Display for VersionedCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A successful command's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The entry carried no command (a blank or membership entry).
    None,
    NodeAdded {
        id: NodeId,
    },
    Done,
}

/// The reply stored by the state machine for every applied entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult(pub Result<Reply, CommandError>);

/// A heartbeat key: 32 random bytes as 64 hex digits. Its `Debug` hides
/// it, so that no log line of a command or of the state can show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HeartbeatSecret(String);

impl HeartbeatSecret {
    /// Bytes of a key.
    pub const LEN: usize = 32;

    /// A key from its bytes (drawn at random by the proposer).
    pub fn from_bytes(bytes: &[u8; Self::LEN]) -> HeartbeatSecret {
        HeartbeatSecret(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The key's bytes; None if it is not 64 hex digits.
    pub fn bytes(&self) -> Option<[u8; Self::LEN]> {
        let s = self.0.as_bytes();
        if s.len() != 2 * Self::LEN {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; Self::LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
        }
        Some(out)
    }

    fn validate(&self) -> Result<(), CommandError> {
        // The error never quotes the value: it is a secret.
        match self.bytes() {
            Some(_) => Ok(()),
            None => Err(invalid("heartbeat_key", "must be 64 hex digits")),
        }
    }
}

impl std::fmt::Debug for HeartbeatSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeartbeatSecret(<hidden>)")
    }
}

/// The cluster's heartbeat keys: the current one, numbered `generation`
/// (1 from the bootstrap on, one more at each rotation), and the one
/// before it (`generation - 1`), still accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatKeys {
    #[serde(default)]
    pub generation: u32,
    #[serde(default)]
    pub current: Option<HeartbeatSecret>,
    #[serde(default)]
    pub previous: Option<HeartbeatSecret>,
}

impl HeartbeatKeys {
    /// A cluster bootstrapped before heartbeats were authenticated has none.
    pub fn is_empty(&self) -> bool {
        self.current.is_none()
    }
}

/// The whole replicated cluster state. Fields added later must be
/// `#[serde(default)]` so that older snapshots still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// The secret that authenticates heartbeats. Never shown by any view.
    #[serde(default, skip_serializing_if = "HeartbeatKeys::is_empty")]
    pub heartbeat_keys: HeartbeatKeys,
    /// Ids are never reused, so a removed node's old messages can't be taken
    /// for a new node's.
    #[serde(default)]
    pub next_node_id: NodeId,
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupRecord>,
    #[serde(default)]
    pub tokens: Tokens,
    #[serde(default)]
    pub client_certs: ClientCerts,
    /// Key pins of members' operator-issued certificates, by node id
    /// (empty with the cluster's own CA: its certificates carry the id).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_certs: BTreeMap<NodeId, String>,
    #[serde(default)]
    pub audit: AuditLog,
    #[serde(default)]
    pub events: EventLog,
    #[serde(default, skip_serializing_if = "no_alerts")]
    pub alerts: Alerts,
    /// How many times the cluster was recovered after losing its quorum
    /// for good (`Recover`): 0 until then.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
    /// Members dropped by a recovery: refused (their Raft calls answered
    /// `superseded`) and never placed on, until removed and joined again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub superseded: BTreeSet<NodeId>,
}

/// Drops the out-of-sync record of `node`'s replica of `volume`.
fn forget_out_of_sync(g: &mut GroupRecord, volume: &str, node: &str) {
    if let Some(m) = g.replica_out_of_sync.get_mut(volume) {
        m.remove(node);
        if m.is_empty() {
            g.replica_out_of_sync.remove(volume);
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn no_alerts(a: &Alerts) -> bool {
    a.by_name.is_empty()
}

/// What [`ClusterState::apply_stamped`] remembers of the state before a
/// command, to tell which transition it made.
enum Before {
    Nothing,
    Admin(Option<AdminState>),
    /// Each node of a site with its admin state, in id order.
    SiteAdmin(Vec<(String, AdminState)>),
    Placement(Option<Placement>),
    Exists(bool),
    /// A group existed, and its volume's size then.
    Group(bool, Option<u64>),
    /// A replica's recorded disk, and whether its replacement was pending.
    Replica(Option<DiskState>, bool),
    Enabled(Option<bool>),
    /// A volume's recorded disks, by node.
    Disks(BTreeMap<String, DiskState>),
}

/// The event of a node's admin state change (`site` when the whole site
/// was set at once).
fn admin_event(time: u64, name: &str, old: Option<AdminState>, state: AdminState, site: Option<&str>) -> Event {
    let (kind, sev, msg) = match state {
        AdminState::Standby => ("node.standby", Severity::Info, format!("node {name} is in standby")),
        AdminState::Maintenance => ("node.maintenance", Severity::Warning, format!("node {name} is in maintenance")),
        AdminState::Online => ("node.admin_online", Severity::Info, format!("node {name} may run groups again")),
    };
    let msg = match site {
        Some(site) => format!("{msg} (site {site})"),
        None => msg,
    };
    let mut details = serde_json::json!({"from": old.map(AdminState::as_str), "to": state.as_str()});
    if let Some(site) = site {
        details["site"] = serde_json::json!(site);
    }
    Event::new(time, kind, sev, msg).node(name).details(details)
}

/// Checks a node's self-description, field by field.
pub fn validate_spec(spec: &NodeSpec) -> Result<(), CommandError> {
    validate_name("name", &spec.name)?;
    if spec.addresses.is_empty() {
        return Err(invalid("addresses", "at least one address is required"));
    }
    if spec.addresses.len() > MAX_ADDRESSES {
        return Err(invalid("addresses", format!("at most {MAX_ADDRESSES} addresses")));
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        let ip: std::net::IpAddr =
            a.parse().map_err(|_| invalid(&format!("addresses[{i}]"), format!("{a:?} is not an IP address")))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(invalid(&format!("addresses[{i}]"), format!("{a} cannot be a node address")));
        }
        if spec.addresses[..i].contains(a) {
            return Err(invalid(&format!("addresses[{i}]"), format!("{a} is listed twice")));
        }
    }
    if spec.port == 0 {
        return Err(invalid("port", "must be 1-65535"));
    }
    if let Some(site) = &spec.site {
        validate_name("site", site)?;
    }
    Ok(())
}

impl ClusterState {
    pub fn node_by_name(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.name == name)
    }

    fn node_id_by_name(&self, name: &str) -> Result<NodeId, CommandError> {
        self.node_by_name(name).map(|n| n.id).ok_or_else(|| CommandError::NodeNotFound { name: name.to_string() })
    }

    /// Refuses a spec that clashes with an existing node (name or endpoint).
    pub fn check_new_node(&self, spec: &NodeSpec) -> Result<(), CommandError> {
        validate_spec(spec)?;
        if self.nodes.len() >= MAX_NODES {
            return Err(CommandError::TooManyNodes { max: MAX_NODES });
        }
        if self.node_by_name(&spec.name).is_some() {
            return Err(CommandError::NodeExists { name: spec.name.clone() });
        }
        for n in self.nodes.values() {
            if n.port == spec.port {
                if let Some(a) = spec.addresses.iter().find(|a| n.addresses.contains(a)) {
                    return Err(CommandError::AddressInUse {
                        address: socket_addr(a, spec.port),
                        name: n.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn record(id: NodeId, spec: &NodeSpec) -> NodeRecord {
        NodeRecord {
            id,
            name: spec.name.clone(),
            addresses: spec.addresses.clone(),
            port: spec.port,
            site: spec.site.clone(),
            witness: spec.witness,
            admin_state: AdminState::Online,
            attributes: BTreeMap::new(),
        }
    }

    fn group(&self, name: &str) -> Result<&GroupRecord, CommandError> {
        self.groups.get(name).ok_or_else(|| CommandError::GroupNotFound { name: name.to_string() })
    }

    fn group_mut(&mut self, name: &str) -> Result<&mut GroupRecord, CommandError> {
        self.groups.get_mut(name).ok_or_else(|| CommandError::GroupNotFound { name: name.to_string() })
    }

    /// The group that holds `volume`, and the volume's resource.
    pub fn volume_owner(&self, volume: &str) -> Option<(&GroupRecord, &ResourceSpec)> {
        self.groups.values().find_map(|g| match g.spec.volume() {
            Some((r, _)) if r.name == volume => Some((g, r)),
            _ => None,
        })
    }

    /// What each replica of `volume` holds, by node name, as recorded (empty
    /// for an unknown volume).
    /// The group owning `volume`, and its replica nodes.
    fn volume_replicas(&self, volume: &str) -> Result<(String, Vec<String>), CommandError> {
        self.volume_owner(volume)
            .map(|(g, _)| (g.name.clone(), replica_nodes(&g.spec)))
            .ok_or_else(|| CommandError::VolumeNotFound { name: volume.to_string() })
    }

    pub fn replica_disks(&self, volume: &str) -> BTreeMap<String, DiskState> {
        self.volume_owner(volume).and_then(|(g, _)| g.replica_disks.get(volume).cloned()).unwrap_or_default()
    }

    /// Every check `PutGroup` makes, without applying it.
    pub fn check_put_group(&self, name: &str, spec: &GroupSpec) -> Result<(), CommandError> {
        let node_names = self.nodes.values().map(|n| n.name.clone()).collect();
        let others =
            self.groups.iter().filter(|(n, _)| n.as_str() != name).map(|(n, g)| (n.clone(), g.spec.clone())).collect();
        validate_group(name, spec, &node_names, &others)?;
        let Some(old) = self.groups.get(name) else {
            if self.groups.len() >= MAX_GROUPS {
                return Err(CommandError::TooManyGroups { max: MAX_GROUPS });
            }
            return Ok(());
        };
        let Some((old_r, old_v)) = old.spec.volume() else { return Ok(()) };
        let idx = spec.resources.iter().position(|r| r.name == old_r.name && matches!(r.kind, ResourceKind::Volume(_)));
        let new_v = idx.and_then(|i| match &spec.resources[i].kind {
            ResourceKind::Volume(v) => Some((i, v)),
            _ => None,
        });
        let Some((i, new_v)) = new_v else {
            if old.placement.phase != Phase::Stopped {
                return Err(CommandError::VolumeChange {
                    name: old_r.name.clone(),
                    field: "resources".into(),
                    reason: format!("group {name} runs: stop it before removing the volume from it"),
                });
            }
            return Ok(());
        };
        let at = |f: &str| format!("resources[{i}].{f}");
        // Growing is done online by every replica (validated as for a new
        // volume); shrinking would cut off blocks that hold data.
        let (from, to) = (old_v.size_bytes(), new_v.size_bytes());
        if to < from {
            return Err(CommandError::VolumeResize { name: old_r.name.clone(), field: at("size"), from, to });
        }
        let (g_old, g_new) = (old_v.granularity_bytes(), new_v.granularity_bytes());
        if g_old != g_new {
            return Err(CommandError::VolumeChange {
                name: old_r.name.clone(),
                field: at("granularity"),
                reason: format!(
                    "its bitmap granularity cannot change from {} to {}",
                    format_bytes(g_old),
                    format_bytes(g_new)
                ),
            });
        }
        let set = |s: &GroupSpec| replica_nodes(s).into_iter().collect::<std::collections::BTreeSet<_>>();
        let (r_old, r_new) = (set(&old.spec), set(spec));
        if r_old != r_new {
            let field = if old_v.replicas != new_v.replicas { at("replicas") } else { "nodes".into() };
            let list = |s: &std::collections::BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
            return Err(CommandError::VolumeChange {
                name: old_r.name.clone(),
                field,
                reason: format!(
                    "its replicas cannot change from [{}] to [{}] (the first {} nodes): moving a replica is not supported yet",
                    list(&r_old),
                    list(&r_new),
                    new_v.replicas
                ),
            });
        }
        Ok(())
    }

    fn put_group(&mut self, name: &str, spec: &GroupSpec) -> Result<Reply, CommandError> {
        self.check_put_group(name, spec)?;
        // A new volume is all zeroes on every replica: each starts clean.
        let fresh = |spec: &GroupSpec| -> BTreeMap<String, BTreeMap<String, DiskState>> {
            match spec.volume() {
                Some((r, _)) => BTreeMap::from([(
                    r.name.clone(),
                    replica_nodes(spec).into_iter().map(|n| (n, DiskState::UpToDate)).collect(),
                )]),
                None => BTreeMap::new(),
            }
        };
        match self.groups.get_mut(name) {
            Some(g) => {
                let same = |s: &GroupSpec| s.volume().map(|(r, _)| r.name.clone());
                if same(&g.spec) != same(spec) {
                    g.replica_disks = fresh(spec);
                    g.replica_replaced.clear();
                    g.replicas_replacing.clear();
                    g.replica_out_of_sync.clear();
                    g.forced_promotions.clear();
                    g.volumes_in_service.clear();
                }
                g.spec = spec.clone();
            }
            None => {
                let record = GroupRecord {
                    name: name.to_string(),
                    spec: spec.clone(),
                    enabled: true,
                    placement: Placement::default(),
                    failed_on: Default::default(),
                    move_to: None,
                    replica_disks: fresh(spec),
                    replica_replaced: BTreeMap::new(),
                    replicas_replacing: BTreeMap::new(),
                    replica_out_of_sync: BTreeMap::new(),
                    forced_promotions: BTreeMap::new(),
                    volumes_in_service: Default::default(),
                };
                self.groups.insert(name.to_string(), record);
            }
        }
        Ok(Reply::Done)
    }

    /// Applies one command without a stamp (its events get the last time
    /// the state knows). On `Err` the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Reply, CommandError> {
        self.apply_stamped(cmd, None)
    }

    /// Applies one command, and records the events of the transitions it
    /// made at the stamp's time. On `Err` the state is unchanged.
    pub fn apply_stamped(&mut self, cmd: &Command, stamp: Option<&Stamp>) -> Result<Reply, CommandError> {
        if let Some(s) = stamp {
            validate_retain(s.events_retain)?;
        }
        let before = self.facts_before(cmd);
        let reply = self.apply_inner(cmd)?;
        if let Some(s) = stamp {
            self.events.tick(s.time_ms);
            self.events.set_retain(s.events_retain);
        }
        let time = stamp.map_or(self.events.clock_ms, |s| s.time_ms);
        let by = stamp.and_then(|s| s.by.as_deref());
        for e in self.transition_events(cmd, before, time, by) {
            self.events.push(e);
        }
        Ok(reply)
    }

    /// What the events of `cmd` need to know of the state before it.
    fn facts_before(&self, cmd: &Command) -> Before {
        match cmd {
            Command::SetAdminState { name, .. } => Before::Admin(self.node_by_name(name).map(|n| n.admin_state)),
            Command::SetSiteAdminState { site, .. } => Before::SiteAdmin(
                self.nodes
                    .values()
                    .filter(|n| n.site.as_deref() == Some(site))
                    .map(|n| (n.name.clone(), n.admin_state))
                    .collect(),
            ),
            Command::SetPlacement { name, .. } => Before::Placement(self.groups.get(name).map(|g| g.placement.clone())),
            Command::PutGroup { name, .. } => Before::Group(
                self.groups.contains_key(name),
                self.groups.get(name).and_then(|g| g.spec.volume()).map(|(_, v)| v.size_bytes()),
            ),
            Command::PutAlert { name, .. } => Before::Exists(self.alerts.by_name.contains_key(name)),
            Command::SetReplicaDisk { volume, node, .. } | Command::ReplaceReplica { volume, node } => {
                let replacing = self.volume_owner(volume).is_some_and(|(g, _)| g.replacing(volume, node));
                Before::Replica(self.replica_disks(volume).get(node).copied(), replacing)
            }
            Command::PromoteReplica { volume, .. } => Before::Disks(self.replica_disks(volume)),
            Command::SetGroupEnabled { name, .. } => Before::Enabled(self.groups.get(name).map(|g| g.enabled)),
            _ => Before::Nothing,
        }
    }

    fn node_name(&self, id: NodeId) -> String {
        self.nodes.get(&id).map_or_else(|| format!("node id {id}"), |n| n.name.clone())
    }

    /// The events an accepted `cmd` emits: the same on every replica.
    fn transition_events(&self, cmd: &Command, before: Before, time: u64, by: Option<&str>) -> Vec<Event> {
        use serde_json::json;
        let ev = |kind: &str, sev: Severity, msg: String| Event::new(time, kind, sev, msg);
        let who = |e: Event| match by {
            Some(b) => {
                let mut d = match e.details {
                    serde_json::Value::Object(m) => m,
                    _ => serde_json::Map::new(),
                };
                d.insert("by".into(), json!(b));
                Event { details: serde_json::Value::Object(d), ..e }
            }
            None => e,
        };
        let one = |e: Event| vec![who(e)];
        match (cmd, before) {
            (Command::Bootstrap { cluster_id, node, .. }, _) => one(ev(
                "cluster.bootstrapped",
                Severity::Info,
                format!("cluster {cluster_id} bootstrapped on {}", node.name),
            )
            .node(&node.name)),
            (Command::AddNode { node }, _) => {
                let id = self.node_by_name(&node.name).map(|n| n.id);
                let what = if node.witness { "witness" } else { "node" };
                one(ev("node.added", Severity::Info, format!("{what} {} joined the cluster", node.name))
                    .node(&node.name)
                    .details(json!({"id": id, "witness": node.witness})))
            }
            (Command::RemoveNode { name }, _) => {
                one(ev("node.removed", Severity::Warning, format!("node {name} was removed from the cluster"))
                    .node(name))
            }
            (Command::SetAdminState { name, state }, Before::Admin(old)) if old != Some(*state) => {
                one(admin_event(time, name, old, *state, None))
            }
            (Command::Recover { incarnation, survivor, dropped, log_index, committed_index }, _) => {
                let names: Vec<String> = dropped.iter().map(|d| self.node_name(*d)).collect();
                let on = self.node_name(*survivor);
                let gained = log_index - committed_index;
                one(ev(
                    "cluster.recovered",
                    Severity::Critical,
                    format!(
                        "cluster recovered on {on} after losing its quorum (incarnation {incarnation}): {} dropped; \
                         {gained} entries it held but were not known committed are now committed",
                        if names.is_empty() { "no member".to_string() } else { names.join(", ") }
                    ),
                )
                .node(on)
                .details(json!({"incarnation": incarnation, "dropped": names, "log_index": log_index,
                    "committed_index": committed_index, "entries_committed_by_recovery": gained})))
            }
            (Command::SetSiteAdminState { site, state }, Before::SiteAdmin(old)) => old
                .into_iter()
                .filter(|(_, was)| was != state)
                .map(|(name, was)| who(admin_event(time, &name, Some(was), *state, Some(site))))
                .collect(),
            (Command::PutGroup { name, spec }, Before::Group(existed, size)) => {
                let (kind, verb) = if existed { ("group.changed", "changed") } else { ("group.defined", "defined") };
                let e = ev(kind, Severity::Info, format!("group {name} {verb}")).group(name);
                // A volume grown in the definition (the data plane grows it
                // online, and its primary tells `volume.grown` when done).
                match (size, spec.volume()) {
                    (Some(from), Some((r, v))) if v.size_bytes() > from => {
                        one(Event { message: format!("group {name} changed: volume {} grows", r.name), ..e }
                            .volume(&r.name)
                            .details(json!({"volume_grows": {"from": from, "to": v.size_bytes()}})))
                    }
                    _ => one(e),
                }
            }
            (Command::DeleteGroup { name }, _) => {
                one(ev("group.deleted", Severity::Info, format!("group {name} deleted")).group(name))
            }
            (Command::SetGroupEnabled { name, enabled }, Before::Enabled(old)) if old != Some(*enabled) => {
                let (kind, verb) = if *enabled { ("group.enabled", "enabled") } else { ("group.disabled", "disabled") };
                one(ev(kind, Severity::Info, format!("group {name} {verb}")).group(name))
            }
            (Command::SetPlacement { name, node, phase, reason, .. }, Before::Placement(old)) => {
                let on = node.map(|n| self.node_name(n));
                let epoch = self.groups.get(name).map(|g| g.placement.epoch);
                let old_node = old.as_ref().and_then(|p| (p.phase == Phase::Started).then_some(p.node).flatten());
                let details = |from: Option<String>| json!({"reason": reason, "epoch": epoch, "from": from, "to": on});
                let e = match (phase, on.as_deref()) {
                    (Phase::Started, Some(to)) => match old_node {
                        Some(m) if Some(m) != *node => {
                            let from = self.node_name(m);
                            ev(
                                "group.moved",
                                Severity::Warning,
                                format!("group {name} moved from {from} to {to}: {reason}"),
                            )
                            .node(to)
                            .details(details(Some(from)))
                        }
                        _ => ev("group.starting", Severity::Info, format!("group {name} starting on {to}: {reason}"))
                            .node(to)
                            .details(details(None)),
                    },
                    (Phase::Stopping, Some(at)) => {
                        ev("group.stopping", Severity::Info, format!("group {name} stopping on {at}: {reason}"))
                            .node(at)
                            .details(details(None))
                    }
                    _ => {
                        let from = old.and_then(|p| p.node).map(|n| self.node_name(n));
                        let mut e = ev("group.stopped", Severity::Info, format!("group {name} stopped: {reason}"))
                            .details(details(from.clone()));
                        e.node = from;
                        e
                    }
                };
                one(e.group(name))
            }
            (Command::MarkGroupFailed { name, node, .. }, _) => {
                let on = self.node_name(*node);
                one(ev(
                    "group.failed",
                    Severity::Critical,
                    format!("group {name} failed on {on} past its restart threshold"),
                )
                .group(name)
                .node(on))
            }
            (Command::ClearGroupFailures { name }, _) => {
                one(ev("group.failures_cleared", Severity::Info, format!("failures of group {name} cleared"))
                    .group(name))
            }
            (Command::MoveGroup { name, to }, _) => {
                let to = self.node_name(*to);
                one(ev("group.move_requested", Severity::Info, format!("group {name} asked to move to {to}"))
                    .group(name)
                    .details(json!({"to": to})))
            }
            (Command::SetReplicaDisk { volume, node, disk, replaced, .. }, Before::Replica(old, replacing))
                if old != Some(*disk) && self.replica_disks(volume).get(node) == Some(disk) =>
            {
                let group = self.volume_owner(volume).map(|(g, _)| g.name.clone());
                if *disk == DiskState::UpToDate && replacing {
                    let mut e = ev(
                        "volume.replica_replaced",
                        Severity::Info,
                        format!(
                            "replica of volume {volume} on {node} replaced: its full resync finished, it is UpToDate"
                        ),
                    )
                    .volume(volume)
                    .node(node)
                    .details(json!({"replaced": replaced, "from": "Inconsistent", "to": "UpToDate"}));
                    e.group = group;
                    return one(e);
                }
                let sev = if *disk == DiskState::UpToDate { Severity::Info } else { Severity::Warning };
                let mut e = ev("volume.disk", sev, format!("replica of volume {volume} on {node} is {disk}"))
                    .volume(volume)
                    .node(node)
                    .details(json!({"from": old.map(|d| d.to_string()), "to": disk.to_string()}));
                e.group = group;
                one(e)
            }
            (Command::ReplaceReplica { volume, node }, Before::Replica(old, _)) => {
                let group = self.volume_owner(volume).map(|(g, _)| g.name.clone());
                let replaced = self.volume_owner(volume).map(|(g, _)| g.replaced(volume, node));
                let mut e = ev(
                    "volume.replica_replacing",
                    Severity::Warning,
                    format!("replica of volume {volume} on {node} is being replaced: Inconsistent until its full resync ends"),
                )
                .volume(volume)
                .node(node)
                .details(json!({"replaced": replaced, "from": old.map(|d| d.to_string()), "to": "Inconsistent"}));
                e.group = group;
                one(e)
            }
            (Command::PromoteReplica { volume, node, rpo }, Before::Disks(old)) => {
                let group = self.volume_owner(volume).map(|(g, _)| g.name.clone());
                let demoted: Vec<&String> =
                    old.iter().filter(|(n, d)| *n != node && **d == DiskState::UpToDate).map(|(n, _)| n).collect();
                let mut e = ev(
                    "volume.promoted",
                    Severity::Critical,
                    format!(
                        "replica of volume {volume} on {node} promoted by force: the writes it missed are given up ({} known out of sync)",
                        format_bytes(rpo.out_of_sync_bytes)
                    ),
                )
                .volume(volume)
                .node(node)
                .details(json!({
                    "out_of_sync_bytes": rpo.out_of_sync_bytes,
                    "recorded_ms": rpo.recorded_ms,
                    "newest_write_ms": rpo.newest_write_ms,
                    "generation": rpo.generation,
                    "outdated": demoted,
                }));
                e.group = group;
                one(e)
            }
            (Command::CreateToken { token }, _) => {
                let who = if by.is_some() { None } else { Some(token.created_by.clone()) };
                let mut e = ev(
                    "token.created",
                    Severity::Info,
                    format!("token {} ({}) created", token.name, token.role.as_str()),
                )
                .details(json!({"token": token.name, "role": token.role.as_str()}));
                if let Some(w) = who {
                    e.details["by"] = json!(w);
                }
                one(e)
            }
            (Command::RevokeToken { name }, _) => {
                one(ev("token.revoked", Severity::Info, format!("token {name} revoked"))
                    .details(json!({"token": name})))
            }
            (Command::PutAlert { name, spec, .. }, Before::Exists(existed)) => {
                let (kind, verb) = if existed { ("alert.changed", "changed") } else { ("alert.defined", "defined") };
                one(ev(kind, Severity::Info, format!("alert {name} ({}) {verb}", spec.kind()))
                    .details(json!({"alert": name, "target": spec.kind()})))
            }
            (Command::DeleteAlert { name }, _) => {
                one(ev("alert.deleted", Severity::Info, format!("alert {name} deleted"))
                    .details(json!({"alert": name})))
            }
            _ => Vec::new(),
        }
    }

    fn apply_inner(&mut self, cmd: &Command) -> Result<Reply, CommandError> {
        if let Command::Bootstrap { cluster_id, node_id, node, heartbeat_key } = cmd {
            if let Some(existing) = &self.cluster_id {
                return Err(CommandError::AlreadyBootstrapped { cluster_id: existing.clone() });
            }
            if cluster_id.is_empty() {
                return Err(invalid("cluster_id", "must not be empty"));
            }
            validate_spec(node)?;
            if let Some(key) = heartbeat_key {
                key.validate()?;
                self.heartbeat_keys = HeartbeatKeys { generation: 1, current: Some(key.clone()), previous: None };
            }
            self.cluster_id = Some(cluster_id.clone());
            self.nodes.insert(*node_id, Self::record(*node_id, node));
            self.next_node_id = node_id + 1;
            return Ok(Reply::NodeAdded { id: *node_id });
        }
        if self.cluster_id.is_none() {
            return Err(CommandError::NotBootstrapped);
        }
        match cmd {
            Command::Bootstrap { .. } => unreachable!("handled above"),
            Command::RotateHeartbeatKey { key } => {
                key.validate()?;
                let k = &mut self.heartbeat_keys;
                k.previous = k.current.replace(key.clone());
                k.generation = k.generation.wrapping_add(1).max(1);
                Ok(Reply::Done)
            }
            Command::RetireHeartbeatKey { generation } => {
                if self.heartbeat_keys.generation == *generation {
                    self.heartbeat_keys.previous = None;
                }
                Ok(Reply::Done)
            }
            Command::AddNode { node } => {
                self.check_new_node(node)?;
                let id = self.next_node_id;
                self.nodes.insert(id, Self::record(id, node));
                self.next_node_id += 1;
                Ok(Reply::NodeAdded { id })
            }
            Command::RemoveNode { name } => {
                let id = self.node_id_by_name(name)?;
                self.nodes.remove(&id);
                self.node_certs.remove(&id);
                self.superseded.remove(&id);
                // A node that joins again under this name comes with an
                // empty disk: its replicas hold nothing.
                for g in self.groups.values_mut() {
                    for disks in g.replica_disks.values_mut() {
                        if let Some(d) = disks.get_mut(name) {
                            *d = DiskState::Diskless;
                        }
                    }
                }
                Ok(Reply::Done)
            }
            Command::SetAdminState { name, state } => {
                let id = self.node_id_by_name(name)?;
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.admin_state = *state;
                }
                Ok(Reply::Done)
            }
            Command::Recover { incarnation, survivor, dropped, log_index, committed_index } => {
                if *incarnation != self.incarnation + 1 {
                    return Err(invalid(
                        "incarnation",
                        format!("the next incarnation is {}, not {incarnation}", self.incarnation + 1),
                    ));
                }
                if !self.nodes.contains_key(survivor) {
                    return Err(invalid("survivor", format!("no node with id {survivor}")));
                }
                if let Some(d) = dropped.iter().find(|d| !self.nodes.contains_key(d) || *d == survivor) {
                    return Err(invalid("dropped", format!("{d} is not another member")));
                }
                if committed_index > log_index {
                    return Err(invalid("committed_index", "past the log's end"));
                }
                self.incarnation = *incarnation;
                self.superseded.extend(dropped.iter().copied());
                Ok(Reply::Done)
            }
            Command::SetSiteAdminState { site, state } => {
                let in_site: Vec<NodeId> =
                    self.nodes.values().filter(|n| n.site.as_deref() == Some(site)).map(|n| n.id).collect();
                if in_site.is_empty() {
                    return Err(CommandError::SiteNotFound { site: site.clone() });
                }
                for id in in_site {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        n.admin_state = *state;
                    }
                }
                Ok(Reply::Done)
            }
            Command::SetAttribute { name, key, value } => {
                let id = self.node_id_by_name(name)?;
                validate_name("key", key)?;
                if value.chars().count() > MAX_ATTRIBUTE_VALUE_LEN {
                    return Err(invalid("value", format!("at most {MAX_ATTRIBUTE_VALUE_LEN} characters")));
                }
                let node = self.nodes.get_mut(&id).ok_or_else(|| CommandError::NodeNotFound { name: name.clone() })?;
                if !node.attributes.contains_key(key) && node.attributes.len() >= MAX_ATTRIBUTES {
                    return Err(invalid("key", format!("a node carries at most {MAX_ATTRIBUTES} attributes")));
                }
                node.attributes.insert(key.clone(), value.clone());
                Ok(Reply::Done)
            }
            Command::PutGroup { name, spec } => self.put_group(name, spec),
            Command::DeleteGroup { name } => {
                let g = self.group(name)?;
                if g.placement.phase != Phase::Stopped {
                    return Err(CommandError::GroupRunning { name: name.clone() });
                }
                if let Some(by) = self.groups.values().find(|o| {
                    o.name != *name
                        && (o.spec.colocate_with.as_deref() == Some(name) || o.spec.anti_affinity.contains(name))
                }) {
                    return Err(CommandError::GroupInUse { name: name.clone(), by: by.name.clone() });
                }
                self.groups.remove(name);
                Ok(Reply::Done)
            }
            Command::SetGroupEnabled { name, enabled } => {
                self.group_mut(name)?.enabled = *enabled;
                Ok(Reply::Done)
            }
            Command::SetPlacement { name, expected_epoch, node, phase, reason } => {
                if let Some(n) = node {
                    if !self.nodes.contains_key(n) {
                        return Err(invalid("node", format!("no node with id {n}")));
                    }
                }
                if node.is_none() != (*phase == Phase::Stopped) {
                    return Err(invalid("phase", "a group is stopped exactly when it has no node"));
                }
                let g = self.group_mut(name)?;
                if g.placement.epoch != *expected_epoch {
                    return Err(CommandError::StaleEpoch {
                        name: name.clone(),
                        expected: *expected_epoch,
                        current: g.placement.epoch,
                    });
                }
                g.placement =
                    Placement { node: *node, phase: *phase, epoch: expected_epoch + 1, reason: reason.clone() };
                // A switchover is done once the group starts where it was sent.
                if *phase == Phase::Started && g.move_to.is_some() && g.move_to == *node {
                    g.move_to = None;
                }
                Ok(Reply::Done)
            }
            Command::MarkGroupFailed { name, node, epoch } => {
                let g = self.group_mut(name)?;
                if g.placement.epoch != *epoch {
                    return Err(CommandError::StaleEpoch {
                        name: name.clone(),
                        expected: *epoch,
                        current: g.placement.epoch,
                    });
                }
                g.failed_on.insert(*node);
                Ok(Reply::Done)
            }
            Command::ClaimGroup { name, node, expected_epoch } => {
                let g = self.group_mut(name)?;
                let p = &mut g.placement;
                if p.epoch != *expected_epoch || p.node != Some(*node) || p.phase != Phase::Started {
                    return Err(CommandError::StaleEpoch {
                        name: name.clone(),
                        expected: *expected_epoch,
                        current: p.epoch,
                    });
                }
                p.epoch += 1;
                Ok(Reply::Done)
            }
            Command::MoveGroup { name, to } => {
                let node = self.nodes.get(to).ok_or_else(|| invalid("to", format!("no node with id {to}")))?;
                let g = self.group(name)?;
                if !g.spec.nodes.contains(&node.name) {
                    return Err(invalid("to", format!("{} is not in the group's nodes", node.name)));
                }
                self.group_mut(name)?.move_to = Some(*to);
                Ok(Reply::Done)
            }
            Command::SetReplicaDisk { volume, node, disk, epoch, replaced } => {
                let (group, replicas) = self.volume_replicas(volume)?;
                if !replicas.contains(node) {
                    return Err(CommandError::NoSuchReplica { volume: volume.clone(), node: node.clone() });
                }
                let g = self.group_mut(&group)?;
                let refuse = |reason: String| CommandError::NotVolumePrimary { volume: volume.clone(), reason };
                if g.placement.epoch != *epoch {
                    return Err(refuse(format!(
                        "a primary at epoch {epoch} is stale: group {group} is at epoch {}",
                        g.placement.epoch
                    )));
                }
                if g.placement.node.is_none() {
                    return Err(refuse(format!("group {group} is stopped: it has no primary to record disk states")));
                }
                let current = g.replaced(volume, node);
                if *disk == DiskState::UpToDate && *replaced != current {
                    return Err(refuse(format!(
                        "the record describes {node}'s replica as of replacement {replaced}, but it was replaced since (replacement {current})"
                    )));
                }
                g.volumes_in_service.insert(volume.clone());
                if *disk == DiskState::UpToDate {
                    forget_out_of_sync(g, volume, node);
                    if let Some(nodes) = g.replicas_replacing.get_mut(volume) {
                        nodes.remove(node);
                        if nodes.is_empty() {
                            g.replicas_replacing.remove(volume);
                        }
                    }
                }
                let disks = g.replica_disks.entry(volume.clone()).or_default();
                if *disk == DiskState::Outdated && disks.get(node) == Some(&DiskState::Inconsistent) {
                    // A replica being rebuilt that also missed a write is
                    // still not consistent: the stronger record stays.
                    return Ok(Reply::Done);
                }
                disks.insert(node.clone(), *disk);
                Ok(Reply::Done)
            }
            Command::ReplaceReplica { volume, node } => {
                let (group, replicas) = self.volume_replicas(volume)?;
                let id = self.node_id_by_name(node)?;
                if !replicas.contains(node) {
                    return Err(CommandError::NoSuchReplica { volume: volume.clone(), node: node.clone() });
                }
                let g = self.group_mut(&group)?;
                if g.placement.node == Some(id) && g.placement.phase != Phase::Stopped {
                    return Err(CommandError::ReplicaIsPrimary {
                        volume: volume.clone(),
                        node: node.clone(),
                        group: group.clone(),
                    });
                }
                let up_to_date = |n: &&String| n.as_str() != node && g.disk(volume, n) == Some(DiskState::UpToDate);
                if !replicas.iter().any(|n| up_to_date(&n)) {
                    return Err(CommandError::NoUpToDateReplicaLeft { volume: volume.clone(), node: node.clone() });
                }
                let count = g.replica_replaced.entry(volume.clone()).or_default().entry(node.clone()).or_insert(0);
                *count += 1;
                g.replicas_replacing.entry(volume.clone()).or_default().insert(node.clone());
                g.replica_disks.entry(volume.clone()).or_default().insert(node.clone(), DiskState::Inconsistent);
                Ok(Reply::Done)
            }
            Command::RecordOutOfSync { volume, epoch, bytes, at_ms } => {
                let (group, replicas) = self.volume_replicas(volume)?;
                if let Some(node) = bytes.keys().find(|n| !replicas.contains(n)) {
                    return Err(CommandError::NoSuchReplica { volume: volume.clone(), node: node.clone() });
                }
                let g = self.group_mut(&group)?;
                if g.placement.epoch != *epoch || g.placement.node.is_none() {
                    return Err(CommandError::NotVolumePrimary {
                        volume: volume.clone(),
                        reason: format!(
                            "a primary at epoch {epoch} is stale: group {group} is at epoch {}",
                            g.placement.epoch
                        ),
                    });
                }
                for (node, b) in bytes {
                    if *b == 0 {
                        forget_out_of_sync(g, volume, node);
                    } else {
                        g.replica_out_of_sync
                            .entry(volume.clone())
                            .or_default()
                            .insert(node.clone(), OutOfSync { bytes: *b, at_ms: *at_ms });
                    }
                }
                Ok(Reply::Done)
            }
            Command::PromoteReplica { volume, node, .. } => {
                let (group, replicas) = self.volume_replicas(volume)?;
                if !replicas.contains(node) {
                    return Err(CommandError::NoSuchReplica { volume: volume.clone(), node: node.clone() });
                }
                let placed = self
                    .groups
                    .get(&group)
                    .and_then(|g| (g.placement.phase != Phase::Stopped).then(|| (g.state_name(), g.placement.node)));
                if let Some((state, on)) = placed {
                    let on = on.map(|id| self.node_name(id)).unwrap_or_else(|| "a node".into());
                    return Err(CommandError::PromotionRefused {
                        volume: volume.clone(),
                        reason: format!(
                            "group {group} is {state} on {on}: a serving primary is never replaced by force; stop the group or move it"
                        ),
                    });
                }
                let g = self.group_mut(&group)?;
                match g.disk(volume, node) {
                    Some(DiskState::Outdated) => {}
                    Some(DiskState::UpToDate) => {
                        return Err(CommandError::PromotionRefused {
                            volume: volume.clone(),
                            reason: format!("{node}'s replica is already UpToDate: the group starts there when it is online, nothing to force"),
                        })
                    }
                    other => {
                        let d = other.unwrap_or(DiskState::Diskless);
                        return Err(CommandError::PromotionRefused {
                            volume: volume.clone(),
                            reason: format!("{node}'s replica is {d}: it holds no consistent copy of the data to promote"),
                        });
                    }
                }
                let disks = g.replica_disks.entry(volume.clone()).or_default();
                for d in disks.values_mut() {
                    if *d == DiskState::UpToDate {
                        *d = DiskState::Outdated;
                    }
                }
                disks.insert(node.clone(), DiskState::UpToDate);
                // The bitmaps these counted were the old primary's.
                g.replica_out_of_sync.remove(volume);
                g.forced_promotions.insert(volume.clone(), g.placement.epoch);
                g.volumes_in_service.insert(volume.clone());
                Ok(Reply::Done)
            }
            Command::CreateToken { token } => self.tokens.create(token).map(|()| Reply::Done),
            Command::RegisterClientCert { cert } => self.client_certs.register(cert).map(|()| Reply::Done),
            Command::RevokeClientCert { name } => self.client_certs.revoke(name).map(|()| Reply::Done),
            Command::SetNodeCertificate { node_id, spki } => {
                if !crate::access::valid_spki(spki) {
                    return Err(invalid("spki", "must be sha256:<64 lowercase hex digits>"));
                }
                if !self.nodes.contains_key(node_id) {
                    return Err(CommandError::NodeNotFound { name: format!("id {node_id}") });
                }
                if self.node_certs.iter().any(|(id, s)| s == spki && id != node_id) {
                    return Err(invalid("certificate", "another member's certificate has the same key"));
                }
                self.node_certs.insert(*node_id, spki.clone());
                Ok(Reply::Done)
            }
            Command::RevokeToken { name } => self.tokens.revoke(name).map(|()| Reply::Done),
            Command::ExpireTokens { now_ms } => {
                self.tokens.expire(*now_ms);
                Ok(Reply::Done)
            }
            Command::RecordAudit { entries, retain } => self.audit.record(entries, *retain).map(|()| Reply::Done),
            Command::RecordEvents { events } => self.events.record(events).map(|()| Reply::Done),
            Command::PutAlert { name, spec, time_ms, by } => {
                let last = self.events.last_id;
                self.alerts.put(name, spec, *time_ms, by, last).map(|_| Reply::Done)
            }
            Command::DeleteAlert { name } => self.alerts.delete(name).map(|()| Reply::Done),
            Command::AdvanceAlert { name, cursor, sent, report_ms } => {
                if *cursor > self.events.last_id {
                    return Err(invalid("cursor", format!("past the newest event ({})", self.events.last_id)));
                }
                self.alerts.advance(name, *cursor, *sent, *report_ms).map(|()| Reply::Done)
            }
            Command::ClearGroupFailures { name } => {
                self.group_mut(name)?.failed_on.clear();
                Ok(Reply::Done)
            }
            Command::ExpireGroupFailure { name, node } => {
                self.group_mut(name)?.failed_on.remove(node);
                Ok(Reply::Done)
            }
            Command::DeleteAttribute { name, key } => {
                let id = self.node_id_by_name(name)?;
                let node = self.nodes.get_mut(&id).ok_or_else(|| CommandError::NodeNotFound { name: name.clone() })?;
                node.attributes
                    .remove(key)
                    .map(|_| Reply::Done)
                    .ok_or_else(|| CommandError::AttributeNotFound { name: name.clone(), key: key.clone() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(name: &str, addr: &str, port: u16) -> NodeSpec {
        NodeSpec { name: name.into(), addresses: vec![addr.into()], port, site: None, witness: false }
    }

    fn booted() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap {
            cluster_id: "c1".into(),
            node_id: 1,
            node: spec("node1", "127.0.0.1", 7401),
            heartbeat_key: Some(HeartbeatSecret::from_bytes(&[7; 32])),
        })
        .unwrap();
        s
    }

    #[test]
    fn bootstrap_then_add_assigns_increasing_ids() {
        let mut s = booted();
        assert_eq!(
            s.apply(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }),
            Ok(Reply::NodeAdded { id: 2 })
        );
        assert_eq!(
            s.apply(&Command::AddNode { node: spec("node3", "127.0.0.1", 7403) }),
            Ok(Reply::NodeAdded { id: 3 })
        );
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.node_by_name("node3").map(|n| n.id), Some(3));
    }

    #[test]
    fn ids_are_never_reused() {
        let mut s = booted();
        s.apply(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }).unwrap();
        s.apply(&Command::RemoveNode { name: "node2".into() }).unwrap();
        assert_eq!(
            s.apply(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }),
            Ok(Reply::NodeAdded { id: 3 })
        );
    }

    #[test]
    fn a_removed_node_loses_its_certificate_pin_and_a_new_node_of_its_name_gets_none() {
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap {
            cluster_id: "c".into(),
            node_id: 1,
            node: spec("node1", "127.0.0.1", 7401),
            heartbeat_key: None,
        })
        .unwrap();
        s.apply(&Command::AddNode { node: spec("node2", "127.0.0.2", 7401) }).unwrap();
        let pin = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        s.apply(&Command::SetNodeCertificate { node_id: 2, spki: pin('a') }).unwrap();
        let before = s.clone();
        assert!(s.apply(&Command::SetNodeCertificate { node_id: 1, spki: pin('a') }).is_err(), "same key, two nodes");
        assert!(s.apply(&Command::SetNodeCertificate { node_id: 9, spki: pin('b') }).is_err(), "no such node");
        assert!(s.apply(&Command::SetNodeCertificate { node_id: 1, spki: "sha256:1".into() }).is_err());
        assert_eq!(s, before);
        s.apply(&Command::RemoveNode { name: "node2".into() }).unwrap();
        assert!(s.node_certs.is_empty());
        s.apply(&Command::AddNode { node: spec("node2", "127.0.0.2", 7401) }).unwrap();
        assert!(!s.node_certs.values().any(|p| *p == pin('a')), "the old key names nobody");
    }

    #[test]
    fn commands_before_bootstrap_are_refused() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&Command::AddNode { node: spec("a", "127.0.0.1", 1) }), Err(CommandError::NotBootstrapped));
        assert_eq!(s, ClusterState::default());
    }

    #[test]
    fn heartbeat_keys_rotate_keeping_the_previous_and_never_show() {
        let mut s = booted();
        let k1 = HeartbeatSecret::from_bytes(&[7; 32]);
        assert_eq!(s.heartbeat_keys, HeartbeatKeys { generation: 1, current: Some(k1.clone()), previous: None });
        assert_eq!(k1.bytes(), Some([7; 32]));
        let k2 = HeartbeatSecret::from_bytes(&[0xa5; 32]);
        assert_eq!(s.apply(&Command::RotateHeartbeatKey { key: k2.clone() }), Ok(Reply::Done));
        assert_eq!(s.heartbeat_keys, HeartbeatKeys { generation: 2, current: Some(k2.clone()), previous: Some(k1) });
        // A malformed key is refused, and the error does not quote it.
        let before = s.clone();
        let bad = HeartbeatSecret("zz".repeat(32));
        let e = s.apply(&Command::RotateHeartbeatKey { key: bad }).unwrap_err();
        assert!(!e.to_string().contains("zz"), "{e}");
        assert_eq!(s, before);
        // Neither the state's nor a command's Debug (what log lines show) has it.
        let hex = "a5".repeat(32);
        let cmd = VersionedCommand::new(Command::RotateHeartbeatKey { key: k2 });
        assert!(!format!("{s:?}").contains(&hex) && !cmd.to_string().contains(&hex));
        // The state round-trips through its snapshot encoding with the keys;
        // a state from before (no keys) loads, and encodes without them.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
        let old = ClusterState { heartbeat_keys: HeartbeatKeys::default(), ..s.clone() };
        assert!(!serde_json::to_string(&old).unwrap().contains("heartbeat_keys"));
    }

    #[test]
    fn retiring_drops_the_previous_key_of_that_generation_only() {
        let mut s = booted();
        let k2 = HeartbeatSecret::from_bytes(&[2; 32]);
        s.apply(&Command::RotateHeartbeatKey { key: k2.clone() }).unwrap();
        // Asked for an older generation (another rotation came since): nothing changes.
        let before = s.clone();
        assert_eq!(s.apply(&Command::RetireHeartbeatKey { generation: 1 }), Ok(Reply::Done));
        assert_eq!(s, before);
        assert_eq!(s.apply(&Command::RetireHeartbeatKey { generation: 2 }), Ok(Reply::Done));
        assert_eq!(s.heartbeat_keys, HeartbeatKeys { generation: 2, current: Some(k2), previous: None });
    }

    #[test]
    fn a_bootstrap_from_an_older_log_has_no_heartbeat_key_until_a_rotation() {
        let old = r#"{"v":"1","cmd":{"bootstrap":{"cluster_id":"c","node_id":1,"node":{"name":"a","addresses":["127.0.0.1"],"port":7401,"site":null,"witness":false}}}}"#;
        let Ok(cmd) = serde_json::from_str::<VersionedCommand>(old) else { panic!("an old bootstrap entry loads") };
        let mut s = ClusterState::default();
        s.apply(&cmd.into_current()).unwrap();
        assert!(s.heartbeat_keys.is_empty());
        s.apply(&Command::RotateHeartbeatKey { key: HeartbeatSecret::from_bytes(&[1; 32]) }).unwrap();
        assert_eq!((s.heartbeat_keys.generation, s.heartbeat_keys.previous.is_none()), (1, true));
    }

    #[test]
    fn second_bootstrap_is_refused() {
        let mut s = booted();
        let before = s.clone();
        let r = s.apply(&Command::Bootstrap {
            cluster_id: "c2".into(),
            node_id: 9,
            node: spec("x", "127.0.0.2", 1),
            heartbeat_key: None,
        });
        assert_eq!(r, Err(CommandError::AlreadyBootstrapped { cluster_id: "c1".into() }));
        assert_eq!(s, before);
    }

    #[test]
    fn duplicate_name_and_endpoint_are_refused() {
        let mut s = booted();
        assert_eq!(
            s.apply(&Command::AddNode { node: spec("node1", "127.0.0.2", 7401) }),
            Err(CommandError::NodeExists { name: "node1".into() })
        );
        assert_eq!(
            s.apply(&Command::AddNode { node: spec("node9", "127.0.0.1", 7401) }),
            Err(CommandError::AddressInUse { address: "127.0.0.1:7401".into(), name: "node1".into() })
        );
        // Same address, other port: a second agent on the same host is fine.
        assert!(s.apply(&Command::AddNode { node: spec("node9", "127.0.0.1", 7409) }).is_ok());
    }

    #[test]
    fn spec_validation_names_the_field() {
        let bad = |f: fn(&mut NodeSpec), field: &str| {
            let mut sp = spec("ok", "10.0.0.1", 7401);
            f(&mut sp);
            match validate_spec(&sp) {
                Err(CommandError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        };
        bad(|s| s.name = "".into(), "name");
        bad(|s| s.name = "Node1".into(), "name");
        bad(|s| s.name = "-x".into(), "name");
        bad(|s| s.name = "a".repeat(64), "name");
        bad(|s| s.addresses.clear(), "addresses");
        bad(|s| s.addresses = vec!["not-an-ip".into()], "addresses[0]");
        bad(|s| s.addresses = vec!["10.0.0.1".into(), "10.0.0.1".into()], "addresses[1]");
        bad(|s| s.addresses = vec!["0.0.0.0".into()], "addresses[0]");
        bad(|s| s.port = 0, "port");
        bad(|s| s.site = Some("Site A".into()), "site");
    }

    #[test]
    fn attributes_set_and_delete() {
        let mut s = booted();
        let set = Command::SetAttribute { name: "node1".into(), key: "disk".into(), value: "ssd".into() };
        assert_eq!(s.apply(&set), Ok(Reply::Done));
        assert_eq!(s.nodes[&1].attributes["disk"], "ssd");
        let del = Command::DeleteAttribute { name: "node1".into(), key: "disk".into() };
        assert_eq!(s.apply(&del), Ok(Reply::Done));
        assert_eq!(s.apply(&del), Err(CommandError::AttributeNotFound { name: "node1".into(), key: "disk".into() }));
    }

    #[test]
    fn node_limit_is_enforced() {
        let mut s = booted();
        for i in 2..=MAX_NODES {
            s.apply(&Command::AddNode { node: spec(&format!("n{i}"), "127.0.0.1", i as u16 + 8000) }).unwrap();
        }
        assert_eq!(
            s.apply(&Command::AddNode { node: spec("one-too-many", "127.0.0.1", 9999) }),
            Err(CommandError::TooManyNodes { max: MAX_NODES })
        );
    }

    fn group_spec(nodes: &[&str]) -> crate::group::GroupSpec {
        let list: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
        serde_json::from_str(&format!(
            r#"{{"resources": [{{"name": "web", "type": "process", "command": ["sleep", "9"]}}], "nodes": [{}]}}"#,
            list.join(",")
        ))
        .unwrap()
    }

    #[test]
    fn placement_is_compare_and_set_on_the_epoch() {
        let mut s = booted();
        s.apply(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }).unwrap();
        s.apply(&Command::PutGroup { name: "web".into(), spec: group_spec(&["node1", "node2"]) }).unwrap();
        let place = |expected_epoch, node: Option<NodeId>, phase| Command::SetPlacement {
            name: "web".into(),
            expected_epoch,
            node,
            phase,
            reason: "test".into(),
        };
        assert_eq!(s.apply(&place(0, Some(1), Phase::Started)), Ok(Reply::Done));
        assert_eq!(s.groups["web"].placement.epoch, 1);
        // A decision made against epoch 0 is stale now and changes nothing.
        let before = s.clone();
        assert_eq!(
            s.apply(&place(0, Some(2), Phase::Started)),
            Err(CommandError::StaleEpoch { name: "web".into(), expected: 0, current: 1 })
        );
        assert_eq!(s, before);
        // A group is stopped exactly when it has no node.
        assert!(matches!(s.apply(&place(1, None, Phase::Started)), Err(CommandError::Invalid { .. })));
        assert!(matches!(s.apply(&place(1, Some(9), Phase::Started)), Err(CommandError::Invalid { .. })));
        // Running groups cannot be deleted; stopped ones can.
        assert_eq!(
            s.apply(&Command::DeleteGroup { name: "web".into() }),
            Err(CommandError::GroupRunning { name: "web".into() })
        );
        s.apply(&place(1, Some(1), Phase::Stopping)).unwrap();
        s.apply(&place(2, None, Phase::Stopped)).unwrap();
        assert_eq!(s.groups["web"].placement.epoch, 3);
        assert_eq!(s.apply(&Command::DeleteGroup { name: "web".into() }), Ok(Reply::Done));
    }

    #[test]
    fn a_claim_orders_a_start_against_placements_decided_before_it() {
        let mut s = booted();
        s.apply(&Command::PutGroup { name: "db".into(), spec: group_spec(&["node1"]) }).unwrap();
        let place = |expected_epoch: u64, node: Option<NodeId>| Command::SetPlacement {
            name: "db".into(),
            expected_epoch,
            node,
            phase: if node.is_some() { Phase::Started } else { Phase::Stopped },
            reason: "t".into(),
        };
        s.apply(&place(0, Some(1))).unwrap();
        let claim = |node: NodeId, expected_epoch: u64| Command::ClaimGroup { name: "db".into(), node, expected_epoch };
        // Another node, or an older epoch, cannot claim; the state is unchanged.
        let before = s.clone();
        assert!(s.apply(&claim(2, 1)).is_err());
        assert!(s.apply(&claim(1, 0)).is_err());
        assert_eq!(s, before);
        // The claim grows the epoch: a placement decided at the old one
        // (a leader that took node 1 for dead) no longer applies.
        s.apply(&claim(1, 1)).unwrap();
        assert_eq!(s.groups["db"].placement.epoch, 2);
        let before = s.clone();
        assert!(s.apply(&place(1, None)).is_err());
        assert_eq!(s, before);
        // And the other way round: once moved, the old claim is refused.
        s.apply(&place(2, None)).unwrap();
        assert!(s.apply(&claim(1, 2)).is_err());
    }

    #[test]
    fn replacing_a_group_keeps_its_placement_and_references_block_deletion() {
        let mut s = booted();
        s.apply(&Command::PutGroup { name: "db".into(), spec: group_spec(&["node1"]) }).unwrap();
        s.apply(&Command::SetPlacement {
            name: "db".into(),
            expected_epoch: 0,
            node: Some(1),
            phase: Phase::Started,
            reason: "t".into(),
        })
        .unwrap();
        let mut new = group_spec(&["node1"]);
        new.max_restarts = 7;
        s.apply(&Command::PutGroup { name: "db".into(), spec: new }).unwrap();
        assert_eq!(s.groups["db"].placement.node, Some(1));
        assert_eq!(s.groups["db"].spec.max_restarts, 7);
        let mut app = group_spec(&["node1"]);
        app.colocate_with = Some("db".into());
        s.apply(&Command::PutGroup { name: "app".into(), spec: app }).unwrap();
        s.apply(&Command::SetPlacement {
            name: "db".into(),
            expected_epoch: 1,
            node: None,
            phase: Phase::Stopped,
            reason: "t".into(),
        })
        .unwrap();
        assert_eq!(
            s.apply(&Command::DeleteGroup { name: "db".into() }),
            Err(CommandError::GroupInUse { name: "db".into(), by: "app".into() })
        );
        // An unknown node in the list is refused, naming the field.
        assert!(matches!(
            s.apply(&Command::PutGroup { name: "x".into(), spec: group_spec(&["ghost"]) }),
            Err(CommandError::Invalid { field, .. }) if field == "nodes[0]"
        ));
    }

    fn stamp(time_ms: u64, by: Option<&str>) -> Stamp {
        Stamp { time_ms, events_retain: 1000, by: by.map(str::to_string) }
    }

    fn kinds(s: &ClusterState) -> Vec<(u64, String, u64)> {
        s.events.events.iter().map(|e| (e.id, e.kind.clone(), e.time_ms)).collect()
    }

    #[test]
    fn a_recovery_supersedes_the_dropped_voters_once_per_incarnation() {
        let mut s = booted();
        for (name, port) in [("node2", 7402), ("node3", 7403)] {
            s.apply(&Command::AddNode { node: spec(name, "127.0.0.1", port) }).unwrap();
        }
        s.events = EventLog::default();
        let before = s.clone();
        let recover = |incarnation, survivor, dropped: Vec<NodeId>, committed_index| Command::Recover {
            incarnation,
            survivor,
            dropped,
            log_index: 40,
            committed_index,
        };
        for bad in [
            recover(2, 2, vec![1, 3], 37), // skips an incarnation
            recover(1, 9, vec![1, 3], 37), // no such survivor
            recover(1, 2, vec![2, 3], 37), // drops itself
            recover(1, 2, vec![1, 7], 37), // drops a stranger
            recover(1, 2, vec![1, 3], 41), // committed past the log
        ] {
            assert!(s.apply(&bad).is_err(), "{bad:?}");
            assert_eq!(s, before, "{bad:?}");
        }
        s.apply(&recover(1, 2, vec![1, 3], 37)).unwrap();
        assert_eq!((s.incarnation, s.superseded.iter().copied().collect::<Vec<_>>()), (1, vec![1, 3]));
        let e = &s.events.events[0];
        assert_eq!((e.kind.as_str(), e.severity), ("cluster.recovered", Severity::Critical));
        assert_eq!(e.details["entries_committed_by_recovery"], 3);
        assert_eq!(e.details["dropped"], serde_json::json!(["node1", "node3"]));
        // The same recovery again is refused: the incarnation moved on.
        assert!(s.apply(&recover(1, 2, vec![1, 3], 37)).is_err());
        // Removing a superseded node forgets it (it may join again afresh).
        s.apply(&Command::RemoveNode { name: "node1".into() }).unwrap();
        assert_eq!(s.superseded.iter().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_site_is_set_at_once_and_an_unknown_site_changes_nothing() {
        let mut s = booted();
        let in_site = |name: &str, site: Option<&str>| NodeSpec {
            site: site.map(str::to_string),
            ..spec(name, "127.0.0.1", 7401)
        };
        for (i, (name, site)) in
            [("a1", Some("dc1")), ("a2", Some("dc1")), ("b1", Some("dc2")), ("w", None)].iter().enumerate()
        {
            let node = NodeSpec { port: 7402 + i as u16, ..in_site(name, *site) };
            s.apply(&Command::AddNode { node }).unwrap();
        }
        s.apply(&Command::SetAdminState { name: "a2".into(), state: AdminState::Maintenance }).unwrap();
        s.events = EventLog::default();
        let before = s.clone();
        let unknown = Command::SetSiteAdminState { site: "dc9".into(), state: AdminState::Standby };
        assert_eq!(s.apply(&unknown), Err(CommandError::SiteNotFound { site: "dc9".into() }));
        assert_eq!(s, before);

        let standby = Command::SetSiteAdminState { site: "dc1".into(), state: AdminState::Standby };
        s.apply_stamped(&standby, Some(&stamp(70, Some("token:ops")))).unwrap();
        let admin = |n: &str| s.node_by_name(n).map(|r| r.admin_state);
        assert_eq!(admin("a1"), Some(AdminState::Standby));
        assert_eq!(admin("a2"), Some(AdminState::Standby));
        assert_eq!(admin("b1"), Some(AdminState::Online));
        assert_eq!(admin("w"), Some(AdminState::Online));
        let evs: Vec<_> = s.events.events.iter().map(|e| (e.kind.as_str(), e.node.as_deref().unwrap_or(""))).collect();
        assert_eq!(evs, vec![("node.standby", "a1"), ("node.standby", "a2")]);
        assert_eq!(s.events.events[1].details["from"], "maintenance");
        assert_eq!(s.events.events[1].details["site"], "dc1");
        assert_eq!(s.events.events[0].details["by"], "token:ops");
        // Again: nothing changes, no event.
        s.apply(&standby).unwrap();
        assert_eq!(s.events.events.len(), 2);
    }

    #[test]
    fn alerts_start_after_the_newest_event_and_refused_alert_commands_change_nothing() {
        let mut s = booted();
        let hook: AlertSpec = serde_json::from_value(serde_json::json!(
            {"kind": "webhook", "url": "http://10.0.0.9/hook", "secret": "k"}
        ))
        .unwrap();
        let put = |name: &str, spec: &AlertSpec| Command::PutAlert {
            name: name.into(),
            spec: Box::new(spec.clone()),
            time_ms: 100,
            by: "token:admin".into(),
        };
        let last = s.events.last_id;
        s.apply_stamped(&put("ops", &hook), Some(&stamp(100, Some("token:admin")))).unwrap();
        assert_eq!(s.alerts.by_name["ops"].cursor, last, "it sends what happens from its definition on");
        assert_eq!(s.events.events.back().map(|e| e.kind.as_str()), Some("alert.defined"));
        s.apply(&Command::AdvanceAlert { name: "ops".into(), cursor: last + 1, sent: 1, report_ms: None }).unwrap();
        s.apply_stamped(&put("ops", &hook), Some(&stamp(110, None))).unwrap();
        assert_eq!(s.events.events.back().map(|e| e.kind.as_str()), Some("alert.changed"));
        assert_eq!(s.alerts.by_name["ops"].cursor, last + 1);
        let before = s.clone();
        let bad: AlertSpec = serde_json::from_value(serde_json::json!({"kind": "webhook", "url": "ftp://x"})).unwrap();
        for cmd in [
            put("other", &bad),
            put("Bad Name", &hook),
            Command::DeleteAlert { name: "nope".into() },
            Command::AdvanceAlert { name: "nope".into(), cursor: 9, sent: 1, report_ms: None },
        ] {
            assert!(s.apply_stamped(&cmd, Some(&stamp(120, None))).is_err(), "{cmd:?}");
            assert_eq!(s, before, "{cmd:?}");
        }
        s.apply_stamped(&Command::DeleteAlert { name: "ops".into() }, Some(&stamp(130, None))).unwrap();
        assert!(s.alerts.by_name.is_empty());
        assert_eq!(s.events.events.back().map(|e| e.kind.as_str()), Some("alert.deleted"));
    }

    #[test]
    fn transitions_emit_events_at_the_stamp_time_and_refusals_emit_none() {
        let mut s = booted();
        assert_eq!(kinds(&s), vec![(1, "cluster.bootstrapped".into(), 0)]);
        s.events = EventLog::default();
        s.apply_stamped(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }, Some(&stamp(10, None))).unwrap();
        s.apply_stamped(
            &Command::PutGroup { name: "web".into(), spec: group_spec(&["node1", "node2"]) },
            Some(&stamp(20, Some("token:ops"))),
        )
        .unwrap();
        let place = |e, node: Option<NodeId>, phase, reason: &str| Command::SetPlacement {
            name: "web".into(),
            expected_epoch: e,
            node,
            phase,
            reason: reason.into(),
        };
        s.apply_stamped(&place(0, Some(1), Phase::Started, "placed on node1"), Some(&stamp(30, None))).unwrap();
        s.apply_stamped(&place(1, Some(2), Phase::Started, "node1 failed and was fenced"), Some(&stamp(40, None)))
            .unwrap();
        // Refused (stale epoch): no event, nothing changes, not even the clock.
        let before = s.clone();
        assert!(s.apply_stamped(&place(0, None, Phase::Stopped, "x"), Some(&stamp(50, None))).is_err());
        assert!(s.apply_stamped(&Command::RemoveNode { name: "nobody".into() }, Some(&stamp(50, None))).is_err());
        assert_eq!(s, before);
        // Setting the same admin state twice is one event.
        let standby = Command::SetAdminState { name: "node2".into(), state: AdminState::Standby };
        s.apply_stamped(&standby, Some(&stamp(60, Some("token:ops")))).unwrap();
        s.apply_stamped(&standby, Some(&stamp(61, None))).unwrap();
        // An unstamped command (an older log) takes the last known time.
        s.apply(&Command::MarkGroupFailed { name: "web".into(), node: 2, epoch: 2 }).unwrap();
        assert_eq!(
            kinds(&s),
            vec![
                (1, "node.added".into(), 10),
                (2, "group.defined".into(), 20),
                (3, "group.starting".into(), 30),
                (4, "group.moved".into(), 40),
                (5, "node.standby".into(), 60),
                (6, "group.failed".into(), 61),
            ]
        );
        let moved = &s.events.events[3];
        assert_eq!((moved.group.as_deref(), moved.node.as_deref()), (Some("web"), Some("node2")));
        assert_eq!(moved.details["from"], "node1");
        assert!(moved.message.contains("node1 failed and was fenced"), "{}", moved.message);
        assert_eq!(s.events.events[1].details["by"], "token:ops");
        assert_eq!(s.events.events[4].details["by"], "token:ops");
        assert_eq!(s.events.events[5].severity, Severity::Critical);
        assert_eq!(s.events.events[0].time, "1970-01-01T00:00:00.010Z");
        // A stamp with a retention out of bounds refuses the command.
        let before = s.clone();
        let bad = Stamp { time_ms: 70, events_retain: 1, by: None };
        assert!(s.apply_stamped(&Command::ClearGroupFailures { name: "web".into() }, Some(&bad)).is_err());
        assert_eq!(s, before);
        // The proposer's retention applies.
        s.apply_stamped(
            &Command::ClearGroupFailures { name: "web".into() },
            Some(&Stamp { time_ms: 80, events_retain: 10, by: None }),
        )
        .unwrap();
        assert_eq!(s.events.retain, 10);
    }

    #[test]
    fn a_stamped_command_round_trips_and_version_1_still_applies() {
        let cmd = Command::SetAdminState { name: "node1".into(), state: AdminState::Maintenance };
        let v = VersionedCommand::stamped(cmd.clone(), stamp(5, Some("token:a")));
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"{"v":"2","cmd":{"stamp":{"time_ms":5,"events_retain":1000,"by":"token:a"},"cmd":{"set_admin_state":{"name":"node1","state":"maintenance"}}}}"#
        );
        let (back, st) = serde_json::from_str::<VersionedCommand>(&json).unwrap().into_parts();
        assert_eq!((back, st), (cmd, Some(stamp(5, Some("token:a")))));
    }

    #[test]
    fn recorded_events_are_numbered_after_the_apply_emitted_ones() {
        let mut s = booted();
        s.events = EventLog::default();
        let e = Event::new(100, "node.offline", Severity::Critical, "node2 is offline").node("node2");
        s.apply_stamped(&Command::RecordEvents { events: vec![e] }, Some(&stamp(100, None))).unwrap();
        s.apply_stamped(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }, Some(&stamp(110, None))).unwrap();
        assert_eq!(kinds(&s), vec![(1, "node.offline".into(), 100), (2, "node.added".into(), 110)]);
        let before = s.clone();
        assert!(s.apply(&Command::RecordEvents { events: vec![Event::new(1, "", Severity::Info, "")] }).is_err());
        assert_eq!(s, before);
    }

    /// The log's encoding is a contract: this literal is what version 1
    /// wrote, and every later binary must still read it.
    #[test]
    fn version_1_log_encoding_still_decodes() {
        let golden = r#"{"v":"1","cmd":{"set_admin_state":{"name":"node2","state":"standby"}}}"#;
        let decoded: VersionedCommand = serde_json::from_str(golden).unwrap();
        assert_eq!(decoded.into_current(), Command::SetAdminState { name: "node2".into(), state: AdminState::Standby });
        let add = r#"{"v":"1","cmd":{"add_node":{"node":{"name":"n","addresses":["10.1.1.1"],"port":7401,"site":null,"witness":true}}}}"#;
        let decoded: VersionedCommand = serde_json::from_str(add).unwrap();
        assert!(matches!(decoded.into_current(), Command::AddNode { node } if node.witness));
    }

    #[test]
    fn unknown_version_is_rejected_not_misread() {
        let future = r#"{"v":"99","cmd":{"remove_node":{"name":"x"}}}"#;
        assert!(serde_json::from_str::<VersionedCommand>(future).is_err());
    }

    #[test]
    fn older_snapshot_without_new_fields_loads() {
        let old = r#"{"cluster_id":"c","next_node_id":2,"nodes":{"1":{"id":1,"name":"a","addresses":["127.0.0.1"],"port":1}}}"#;
        let s: ClusterState = serde_json::from_str(old).unwrap();
        assert_eq!(s.nodes[&1].admin_state, AdminState::Online);
        assert!(!s.nodes[&1].witness);
    }

    /// node1..node3 and group `db` with volume `data` (2 replicas by default).
    fn with_volume(extra: &str) -> ClusterState {
        let mut s = booted();
        s.apply(&Command::AddNode { node: spec("node2", "127.0.0.1", 7402) }).unwrap();
        s.apply(&Command::AddNode { node: spec("node3", "127.0.0.1", 7403) }).unwrap();
        s.apply(&Command::PutGroup { name: "db".into(), spec: vol_spec(extra) }).unwrap();
        s
    }

    /// `extra` adds fields to the volume (`size` replaces the default 1GiB).
    fn vol_spec(extra: &str) -> GroupSpec {
        let size = if extra.contains("\"size\"") { "" } else { r#", "size": "1GiB""# };
        serde_json::from_str(&format!(
            r#"{{"resources": [{{"name": "data", "type": "volume"{size}{extra}}},
                {{"name": "app", "type": "process", "command": ["sleep", "9"]}}],
                "nodes": ["node1", "node2", "node3"]}}"#
        ))
        .unwrap()
    }

    fn place(s: &mut ClusterState, node: Option<NodeId>) {
        let epoch = s.groups["db"].placement.epoch;
        let phase = if node.is_some() { Phase::Started } else { Phase::Stopped };
        s.apply(&Command::SetPlacement { name: "db".into(), expected_epoch: epoch, node, phase, reason: "t".into() })
            .unwrap();
    }

    /// Applies `cmd`, expects it refused with `want`, and the state unchanged.
    fn refused(s: &mut ClusterState, cmd: Command, want: impl Fn(&CommandError) -> bool) {
        let before = s.clone();
        let r = s.apply(&cmd);
        assert!(matches!(&r, Err(e) if want(e)), "{cmd:?} gave {r:?}");
        assert_eq!(*s, before, "{cmd:?} changed the state");
    }

    #[test]
    fn a_new_volume_starts_up_to_date_on_every_replica() {
        let s = with_volume("");
        let disks = s.replica_disks("data");
        assert_eq!(
            disks,
            BTreeMap::from([("node1".into(), DiskState::UpToDate), ("node2".into(), DiskState::UpToDate)])
        );
        let (g, r) = s.volume_owner("data").unwrap();
        assert_eq!((g.name.as_str(), r.name.as_str()), ("db", "data"));
        assert!(s.volume_owner("app").is_none(), "a process is no volume");
        assert!(s.replica_disks("ghost").is_empty());
        let s3 = with_volume(r#", "replicas": 3"#);
        assert_eq!(s3.replica_disks("data").len(), 3);
    }

    #[test]
    fn set_replica_disk_is_fenced_by_the_group_epoch() {
        let mut s = with_volume("");
        let set = |node: &str, disk, epoch| Command::SetReplicaDisk {
            volume: "data".into(),
            node: node.into(),
            disk,
            epoch,
            replaced: 0,
        };
        // Stopped: nobody is primary, nobody records.
        refused(&mut s, set("node2", DiskState::Outdated, 0), |e| matches!(e, CommandError::NotVolumePrimary { .. }));
        place(&mut s, Some(1)); // epoch 1
        assert_eq!(s.apply(&set("node2", DiskState::Outdated, 1)), Ok(Reply::Done));
        assert_eq!(s.replica_disks("data")["node2"], DiskState::Outdated);
        // The primary may mark itself too (a failing disk).
        assert_eq!(s.apply(&set("node1", DiskState::Diskless, 1)), Ok(Reply::Done));
        assert_eq!(s.groups["db"].disk("data", "node1"), Some(DiskState::Diskless));
        // A stale primary (older epoch) is refused and changes nothing.
        let stale = set("node2", DiskState::UpToDate, 0);
        refused(
            &mut s,
            stale.clone(),
            |e| matches!(e, CommandError::NotVolumePrimary { volume, reason } if volume == "data" && reason.contains("stale")),
        );
        // So is a future one, an unknown volume, and a node without a replica.
        refused(&mut s, set("node2", DiskState::UpToDate, 2), |e| matches!(e, CommandError::NotVolumePrimary { .. }));
        refused(
            &mut s,
            Command::SetReplicaDisk {
                volume: "ghost".into(),
                node: "node1".into(),
                disk: DiskState::UpToDate,
                epoch: 1,
                replaced: 0,
            },
            |e| matches!(e, CommandError::VolumeNotFound { name } if name == "ghost"),
        );
        refused(
            &mut s,
            set("node3", DiskState::UpToDate, 1),
            |e| matches!(e, CommandError::NoSuchReplica { volume, node } if volume == "data" && node == "node3"),
        );
        // Deleting the group drops the records.
        place(&mut s, None);
        s.apply(&Command::DeleteGroup { name: "db".into() }).unwrap();
        assert!(s.replica_disks("data").is_empty() && s.volume_owner("data").is_none());
    }

    #[test]
    fn the_primary_records_out_of_sync_bytes_until_the_replica_is_up_to_date() {
        let mut s = with_volume("");
        place(&mut s, Some(1));
        let record = |epoch, node: &str, bytes| Command::RecordOutOfSync {
            volume: "data".into(),
            epoch,
            bytes: BTreeMap::from([(node.to_string(), bytes)]),
            at_ms: 5_000,
        };
        s.apply(&record(1, "node2", 8192)).unwrap();
        assert_eq!(s.groups["db"].replica_out_of_sync["data"]["node2"], OutOfSync { bytes: 8192, at_ms: 5_000 });
        // A stale primary, a node without a replica, a stopped group: refused, nothing changes.
        refused(&mut s, record(0, "node2", 1), |e| matches!(e, CommandError::NotVolumePrimary { .. }));
        refused(&mut s, record(1, "node3", 1), |e| matches!(e, CommandError::NoSuchReplica { .. }));
        // Recorded UpToDate (its resync finished): the record goes.
        s.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "node2".into(),
            disk: DiskState::UpToDate,
            epoch: 1,
            replaced: 0,
        })
        .unwrap();
        assert!(s.groups["db"].replica_out_of_sync.is_empty());
        // Zero clears too.
        s.apply(&record(1, "node2", 4096)).unwrap();
        s.apply(&record(1, "node2", 0)).unwrap();
        assert!(s.groups["db"].replica_out_of_sync.is_empty());
        place(&mut s, None);
        refused(&mut s, record(2, "node2", 1), |e| matches!(e, CommandError::NotVolumePrimary { .. }));
    }

    #[test]
    fn a_forced_promotion_takes_an_outdated_replica_only_while_the_group_is_placed_nowhere() {
        let mut s = with_volume("");
        place(&mut s, Some(1));
        let set = |node: &str, disk| Command::SetReplicaDisk {
            volume: "data".into(),
            node: node.into(),
            disk,
            epoch: 1,
            replaced: 0,
        };
        s.apply(&set("node2", DiskState::Outdated)).unwrap();
        s.apply(&Command::RecordOutOfSync {
            volume: "data".into(),
            epoch: 1,
            bytes: BTreeMap::from([("node2".to_string(), 65536)]),
            at_ms: 9,
        })
        .unwrap();
        let promote = |node: &str| Command::PromoteReplica {
            volume: "data".into(),
            node: node.into(),
            rpo: PromotionRpo { out_of_sync_bytes: 65536, ..Default::default() },
        };
        let refusal = |s: &mut ClusterState, node: &str, says: &'static str| {
            refused(s, promote(node), |e| {
                matches!(e, CommandError::PromotionRefused { .. }) && e.to_string().contains(says)
            })
        };
        // While the group runs on node1, never.
        refusal(&mut s, "node2", "a serving primary is never replaced");
        place(&mut s, None);
        refusal(&mut s, "node1", "already UpToDate");
        refused(&mut s, promote("node3"), |e| matches!(e, CommandError::NoSuchReplica { .. }));
        refused(
            &mut s,
            Command::PromoteReplica { volume: "ghost".into(), node: "node2".into(), rpo: Default::default() },
            |e| matches!(e, CommandError::VolumeNotFound { .. }),
        );
        let mut inconsistent = s.clone();
        inconsistent
            .groups
            .get_mut("db")
            .unwrap()
            .replica_disks
            .get_mut("data")
            .unwrap()
            .insert("node2".into(), DiskState::Inconsistent);
        refusal(&mut inconsistent, "node2", "no consistent copy");

        let cursor = s.events.last_id;
        s.apply_stamped(&promote("node2"), Some(&Stamp { time_ms: 77, events_retain: 100, by: Some("ops".into()) }))
            .unwrap();
        let disks = s.replica_disks("data");
        assert_eq!((disks["node1"], disks["node2"]), (DiskState::Outdated, DiskState::UpToDate));
        assert!(s.groups["db"].replica_out_of_sync.is_empty());
        assert_eq!(s.groups["db"].forced_promotions["data"], s.groups["db"].placement.epoch);
        let page = s.events.since(cursor, &Default::default(), 10);
        let e = page.events.iter().find(|e| e.kind == "volume.promoted").expect("a volume.promoted event");
        assert_eq!(
            (e.severity, e.node.as_deref(), e.group.as_deref()),
            (Severity::Critical, Some("node2"), Some("db"))
        );
        assert_eq!(e.details["out_of_sync_bytes"], 65536);
        assert_eq!(e.details["outdated"], serde_json::json!(["node1"]));
        assert_eq!(e.details["by"], "ops");
        // Done once: the replica is UpToDate now.
        refusal(&mut s, "node2", "already UpToDate");
    }

    #[test]
    fn a_volume_cannot_be_shrunk_nor_moved_by_replacing_its_group() {
        let mut s = with_volume(r#", "granularity": "64KiB""#);
        place(&mut s, Some(1));
        let put = |extra: &str| Command::PutGroup { name: "db".into(), spec: vol_spec(extra) };
        let resize = |field: &'static str| move |e: &CommandError| matches!(e, CommandError::VolumeResize { field: f, .. } if f == field);
        let change = |field: &'static str| move |e: &CommandError| matches!(e, CommandError::VolumeChange { field: f, .. } if f == field);
        refused(&mut s, put(r#", "granularity": "64KiB", "size": "512MiB""#), resize("resources[0].size"));
        refused(&mut s, put(""), change("resources[0].granularity"));
        refused(&mut s, put(r#", "granularity": "64KiB", "replicas": 3"#), change("resources[0].replicas"));
        let mut swapped = vol_spec(r#", "granularity": "64KiB""#);
        swapped.nodes = vec!["node1".into(), "node3".into(), "node2".into()];
        refused(&mut s, Command::PutGroup { name: "db".into(), spec: swapped }, change("nodes"));
        // The messages say why.
        let shrink = s.apply(&put(r#", "granularity": "64KiB", "size": "512MiB""#)).unwrap_err().to_string();
        assert!(shrink.contains("cannot shrink from 1GiB to 512MiB"), "{shrink}");
        // The same size written otherwise, another mode, the replicas in
        // another order: all fine, and the records stay.
        s.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "node2".into(),
            disk: DiskState::Outdated,
            epoch: 1,
            replaced: 0,
        })
        .unwrap();
        let mut ok = vol_spec(r#", "granularity": 65536, "size": "1024MiB", "mode": "async", "rate": "10MiB/s""#);
        ok.nodes = vec!["node2".into(), "node1".into(), "node3".into()];
        assert_eq!(s.apply(&Command::PutGroup { name: "db".into(), spec: ok }), Ok(Reply::Done));
        assert_eq!(s.replica_disks("data")["node2"], DiskState::Outdated);
        // Removing the volume from a running group is refused; once stopped
        // it is allowed and its records go.
        let mut without = vol_spec("");
        without.resources.remove(0);
        refused(&mut s, Command::PutGroup { name: "db".into(), spec: without.clone() }, change("resources"));
        place(&mut s, None);
        assert_eq!(s.apply(&Command::PutGroup { name: "db".into(), spec: without }), Ok(Reply::Done));
        assert!(s.groups["db"].replica_disks.is_empty());
    }

    #[test]
    fn a_volume_grows_by_replacing_its_group_and_never_shrinks_back() {
        let mut s = with_volume(r#", "replicas": 3"#);
        place(&mut s, Some(1)); // running: a grow is online
        s.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "node3".into(),
            disk: DiskState::Outdated,
            epoch: 1,
            replaced: 0,
        })
        .unwrap();
        let put = |extra: &str| Command::PutGroup { name: "db".into(), spec: vol_spec(extra) };
        let epoch = s.groups["db"].placement.epoch;
        let cursor = s.events.last_id;
        let stamp = Stamp { time_ms: 9, events_retain: 100, by: Some("ops".into()) };
        assert_eq!(s.apply_stamped(&put(r#", "replicas": 3, "size": "3GiB""#), Some(&stamp)), Ok(Reply::Done));
        // The definition's change says what grows (its primary tells
        // `volume.grown` once the export has).
        let page = s.events.since(cursor, &Default::default(), 10);
        let e = page.events.iter().find(|e| e.kind == "group.changed").expect("a group.changed event");
        assert_eq!((e.volume.as_deref(), e.group.as_deref()), (Some("data"), Some("db")));
        assert_eq!(e.details["volume_grows"], serde_json::json!({"from": 1u64 << 30, "to": 3u64 << 30}));
        assert_eq!(e.details["by"], "ops");
        let (_, v) = s.groups["db"].spec.volume().unwrap();
        assert_eq!(v.size_bytes(), 3 << 30);
        // The group keeps running, its records stay (nothing is resynced).
        assert_eq!(s.groups["db"].placement.epoch, epoch);
        assert_eq!(s.replica_disks("data")["node3"], DiskState::Outdated);
        assert_eq!(s.replica_disks("data")["node2"], DiskState::UpToDate);
        // Validated as a new volume: a multiple of 4KiB, at most 16TiB.
        refused(
            &mut s,
            put(r#", "replicas": 3, "size": "3221225984""#),
            |e| matches!(e, CommandError::Invalid { field, .. } if field == "resources[0].size"),
        );
        refused(
            &mut s,
            put(r#", "replicas": 3, "size": "17TiB""#),
            |e| matches!(e, CommandError::Invalid { field, .. } if field == "resources[0].size"),
        );
        // Back to the old size: a shrink, refused with its sizes.
        let shrink = s.apply(&put(r#", "replicas": 3"#)).unwrap_err();
        assert_eq!(
            shrink,
            CommandError::VolumeResize {
                name: "data".into(),
                field: "resources[0].size".into(),
                from: 3 << 30,
                to: 1 << 30
            }
        );
        assert!(shrink.to_string().contains("cannot shrink from 3GiB to 1GiB"), "{shrink}");
    }

    #[test]
    fn a_volume_name_is_unique_across_groups() {
        let mut s = with_volume("");
        refused(
            &mut s,
            Command::PutGroup { name: "other".into(), spec: vol_spec("") },
            |e| matches!(e, CommandError::Invalid { field, reason } if field == "resources[0].name" && reason.contains("group db")),
        );
    }

    #[test]
    fn a_removed_node_holds_no_replica_any_more() {
        let mut s = with_volume("");
        s.apply(&Command::RemoveNode { name: "node2".into() }).unwrap();
        assert_eq!(s.replica_disks("data")["node2"], DiskState::Diskless);
        assert_eq!(s.replica_disks("data")["node1"], DiskState::UpToDate);
    }

    #[test]
    fn replacing_a_replica_records_it_inconsistent_until_a_resync_of_the_new_disk() {
        let mut s = with_volume(r#", "replicas": 3"#);
        place(&mut s, Some(1)); // epoch 1, node1 primary
        let replace = |node: &str| Command::ReplaceReplica { volume: "data".into(), node: node.into() };
        let set = |node: &str, disk, replaced| Command::SetReplicaDisk {
            volume: "data".into(),
            node: node.into(),
            disk,
            epoch: 1,
            replaced,
        };
        // A brand-new volume: not yet in service (a replica created now may
        // start as a copy of the empty volume).
        assert!(s.groups["db"].volumes_in_service.is_empty());
        assert_eq!(s.apply(&replace("node2")), Ok(Reply::Done));
        assert_eq!(s.replica_disks("data")["node2"], DiskState::Inconsistent);
        assert_eq!(s.groups["db"].replaced("data", "node2"), 1);
        let e = s.events.events.back().cloned().unwrap();
        assert_eq!((e.kind.as_str(), e.node.as_deref()), ("volume.replica_replacing", Some("node2")));
        // A resync of the disk before its replacement cannot mark it UpToDate.
        refused(
            &mut s,
            set("node2", DiskState::UpToDate, 0),
            |e| matches!(e, CommandError::NotVolumePrimary { reason, .. } if reason.contains("replaced since")),
        );
        // A missed write leaves it Inconsistent, not merely Outdated; the
        // volume is in service from a primary's first record on.
        assert_eq!(s.apply(&set("node2", DiskState::Outdated, 1)), Ok(Reply::Done));
        assert!(s.groups["db"].volumes_in_service.contains("data"));
        assert_eq!(s.replica_disks("data")["node2"], DiskState::Inconsistent);
        // The full resync of the new disk ends it.
        assert_eq!(s.apply(&set("node2", DiskState::UpToDate, 1)), Ok(Reply::Done));
        assert_eq!(s.replica_disks("data")["node2"], DiskState::UpToDate);
        let e = s.events.events.back().cloned().unwrap();
        assert_eq!((e.kind.as_str(), e.node.as_deref()), ("volume.replica_replaced", Some("node2")));
        assert!(!s.groups["db"].replacing("data", "node2"));
        // A later full resync of it is an ordinary disk change.
        s.apply(&set("node2", DiskState::Inconsistent, 1)).unwrap();
        s.apply(&set("node2", DiskState::UpToDate, 1)).unwrap();
        assert_eq!(s.events.events.back().map(|e| e.kind.as_str()), Some("volume.disk"));
        // Refused, the state unchanged: the serving primary, an unknown
        // volume or node, a node without a replica.
        refused(
            &mut s,
            replace("node1"),
            |e| matches!(e, CommandError::ReplicaIsPrimary { node, group, .. } if node == "node1" && group == "db"),
        );
        refused(&mut s, Command::ReplaceReplica { volume: "ghost".into(), node: "node2".into() }, |e| {
            matches!(e, CommandError::VolumeNotFound { .. })
        });
        refused(&mut s, replace("node9"), |e| matches!(e, CommandError::NodeNotFound { .. }));
        let mut two = with_volume("");
        place(&mut two, Some(1));
        refused(&mut two, replace("node3"), |e| matches!(e, CommandError::NoSuchReplica { .. }));
        // The last UpToDate copy is never replaced: with node1 Outdated and
        // the group stopped, node2 is the only one.
        let mut last = with_volume("");
        place(&mut last, Some(2));
        last.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "node1".into(),
            disk: DiskState::Outdated,
            epoch: 1,
            replaced: 0,
        })
        .unwrap();
        place(&mut last, None);
        refused(
            &mut last,
            replace("node2"),
            |e| matches!(e, CommandError::NoUpToDateReplicaLeft { node, .. } if node == "node2"),
        );
        // node1 may be replaced: node2 holds the data.
        assert_eq!(last.apply(&replace("node1")), Ok(Reply::Done));
        assert_eq!(last.groups["db"].replaced("data", "node1"), 1);
        // Twice in a row: node1 is Inconsistent, node2 still UpToDate.
        assert_eq!(last.apply(&replace("node1")), Ok(Reply::Done));
        assert_eq!(last.groups["db"].replaced("data", "node1"), 2);
    }

    #[test]
    fn set_replica_disk_log_encoding_is_stable() {
        let golden =
            r#"{"v":"1","cmd":{"set_replica_disk":{"volume":"data","node":"node2","disk":"Outdated","epoch":4}}}"#;
        let cmd = Command::SetReplicaDisk {
            volume: "data".into(),
            node: "node2".into(),
            disk: DiskState::Outdated,
            epoch: 4,
            replaced: 0,
        };
        assert_eq!(serde_json::to_string(&VersionedCommand::new(cmd.clone())).unwrap(), golden);
        assert_eq!(serde_json::from_str::<VersionedCommand>(golden).unwrap().into_current(), cmd);
    }

    fn arb_volume_command() -> impl Strategy<Value = Command> {
        let node = prop_oneof![Just("node1"), Just("node2"), Just("node3"), Just("node9")].prop_map(String::from);
        let disk = prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Outdated),
            Just(DiskState::Inconsistent),
            Just(DiskState::Diskless)
        ];
        let extra = prop_oneof![
            Just(""),
            Just(r#", "size": "2GiB""#),
            Just(r#", "size": "512MiB""#),
            Just(r#", "replicas": 3"#),
            Just(r#", "granularity": "8KiB""#),
            Just(r#", "mode": "async""#),
            Just(r#", "size": "abc""#),
        ];
        prop_oneof![
            (prop_oneof![Just("db"), Just("db2")], extra)
                .prop_map(|(g, e)| Command::PutGroup { name: g.into(), spec: vol_spec(e) }),
            (node.clone(), disk, 0u64..4, 0u64..2).prop_map(|(node, disk, epoch, replaced)| {
                Command::SetReplicaDisk { volume: "data".into(), node, disk, epoch, replaced }
            }),
            node.clone().prop_map(|node| Command::PromoteReplica {
                volume: "data".into(),
                node,
                rpo: Default::default()
            }),
            (node.clone(), 0u64..4, 0u64..3).prop_map(|(node, epoch, b)| Command::RecordOutOfSync {
                volume: "data".into(),
                epoch,
                bytes: BTreeMap::from([(node, b * 4096)]),
                at_ms: 1,
            }),
            node.clone().prop_map(|node| Command::ReplaceReplica { volume: "data".into(), node }),
            (0u64..4, prop_oneof![Just(None), Just(Some(1u64)), Just(Some(2u64))]).prop_map(|(e, n)| {
                Command::SetPlacement {
                    name: "db".into(),
                    expected_epoch: e,
                    node: n,
                    phase: if n.is_some() { Phase::Started } else { Phase::Stopped },
                    reason: "p".into(),
                }
            }),
            Just(Command::DeleteGroup { name: "db".into() }),
            node.prop_map(|name| Command::RemoveNode { name }),
        ]
    }

    fn arb_name() -> BoxedStrategy<String> {
        prop_oneof![
            Just("node1".to_string()),
            Just("node2".to_string()),
            Just("node3".to_string()),
            Just("Bad Name".to_string()),
            Just(String::new()),
        ]
        .boxed()
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let arb_spec =
            (arb_name(), prop_oneof![Just("127.0.0.1"), Just("10.0.0.1"), Just("nope")], 7400u16..7404, any::<bool>())
                .prop_map(|(name, a, port, witness)| NodeSpec {
                    name,
                    addresses: vec![a.to_string()],
                    port,
                    site: (port % 2 == 0).then(|| "a".to_string()),
                    witness,
                })
                .boxed();
        let arb_state = prop_oneof![Just(AdminState::Online), Just(AdminState::Standby), Just(AdminState::Maintenance)];
        prop_oneof![
            (arb_spec.clone(), 1u64..4, any::<bool>()).prop_map(|(node, id, keyed)| Command::Bootstrap {
                cluster_id: "c".into(),
                node_id: id,
                node,
                heartbeat_key: keyed.then(|| HeartbeatSecret::from_bytes(&[id as u8; 32])),
            }),
            (any::<u8>(), any::<bool>()).prop_map(|(b, good)| Command::RotateHeartbeatKey {
                key: match good {
                    true => HeartbeatSecret::from_bytes(&[b; 32]),
                    false => HeartbeatSecret(format!("{b:02x}")),
                },
            }),
            (0u32..4).prop_map(|generation| Command::RetireHeartbeatKey { generation }),
            arb_spec.prop_map(|node| Command::AddNode { node }),
            arb_name().prop_map(|name| Command::RemoveNode { name }),
            (arb_name(), arb_state.clone()).prop_map(|(name, state)| Command::SetAdminState { name, state }),
            (prop_oneof![Just("a"), Just("b")], arb_state.clone())
                .prop_map(|(site, state)| Command::SetSiteAdminState { site: site.into(), state }),
            (0u64..3, 1u64..4, proptest::collection::vec(1u64..5, 0..3), 0u64..5).prop_map(
                |(incarnation, survivor, dropped, committed_index)| Command::Recover {
                    incarnation,
                    survivor,
                    dropped,
                    log_index: 3,
                    committed_index,
                }
            ),
            (arb_name(), prop_oneof![Just("k"), Just("K!")], "[a-z]{0,3}")
                .prop_map(|(name, key, value)| Command::SetAttribute { name, key: key.into(), value }),
            (arb_name(), Just("k")).prop_map(|(name, key)| Command::DeleteAttribute { name, key: key.into() }),
            (
                prop_oneof![Just("ops"), Just("mail"), Just("Bad!")],
                prop_oneof![
                    Just(r#"{"kind":"webhook","url":"http://10.0.0.9/h","secret":"k"}"#),
                    Just(r#"{"kind":"smtp","server":"mail","from":"a@b","to":["c@d"],"report_interval_s":60}"#),
                    Just(r#"{"kind":"exec","command":["/bin/true"],"kinds":["node."]}"#),
                    Just(r#"{"kind":"webhook","url":"ftp://x"}"#),
                ]
            )
                .prop_map(|(name, spec)| Command::PutAlert {
                    name: name.into(),
                    spec: Box::new(serde_json::from_str(spec).expect("a well-formed alert")),
                    time_ms: 5,
                    by: "token:admin".into(),
                }),
            prop_oneof![Just("ops"), Just("nope")].prop_map(|name| Command::DeleteAlert { name: name.into() }),
            (prop_oneof![Just("ops"), Just("mail")], 0u64..30, 0u64..3, proptest::option::of(0u64..100)).prop_map(
                |(name, cursor, sent, report_ms)| Command::AdvanceAlert { name: name.into(), cursor, sent, report_ms }
            ),
        ]
    }

    proptest! {
        /// Rejected commands change nothing; accepted ones keep the
        /// invariants: unique names, unique endpoints, ids below next_node_id,
        /// and the same log always gives the same state.
        #[test]
        fn invariants_hold_for_any_log(cmds in proptest::collection::vec(arb_command(), 0..40)) {
            let mut s = ClusterState::default();
            let mut replica = ClusterState::default();
            for (i, cmd) in cmds.iter().enumerate() {
                let before = s.clone();
                let st = Stamp { time_ms: 1000 + i as u64, events_retain: 20, by: None };
                let r = s.apply_stamped(cmd, Some(&st));
                prop_assert_eq!(replica.apply_stamped(cmd, Some(&st)), r.clone());
                if r.is_err() {
                    prop_assert_eq!(&s, &before);
                }
                let mut names: Vec<_> = s.nodes.values().map(|n| n.name.clone()).collect();
                names.sort();
                names.dedup();
                prop_assert_eq!(names.len(), s.nodes.len());
                let mut endpoints: Vec<_> = s.nodes.values()
                    .flat_map(|n| n.addresses.iter().map(move |a| socket_addr(a, n.port)))
                    .collect();
                let total = endpoints.len();
                endpoints.sort();
                endpoints.dedup();
                prop_assert_eq!(endpoints.len(), total);
                for (id, n) in &s.nodes {
                    prop_assert_eq!(*id, n.id);
                    prop_assert!(*id < s.next_node_id);
                    let spec = NodeSpec {
                        name: n.name.clone(), addresses: n.addresses.clone(), port: n.port,
                        site: n.site.clone(), witness: n.witness,
                    };
                    prop_assert!(validate_spec(&spec).is_ok());
                }
                // Events: consecutive ids, within retention, times from the stamps.
                let ev = &s.events;
                prop_assert!(ev.events.len() <= 20);
                prop_assert!(ev.events.iter().zip(ev.events.iter().skip(1)).all(|(a, b)| a.id + 1 == b.id));
                prop_assert!(ev.events.iter().all(|e| e.time_ms >= 1000 && e.time_ms <= 1000 + i as u64));
                // Alerts: valid definitions, cursors never past the log nor back.
                prop_assert!(s.alerts.by_name.len() <= crate::alerts::MAX_ALERTS);
                for (name, a) in &s.alerts.by_name {
                    prop_assert!(a.spec.validate().is_ok());
                    prop_assert!(a.cursor <= s.events.last_id);
                    if let Some(old) = before.alerts.by_name.get(name) {
                        prop_assert!(a.cursor >= old.cursor);
                    }
                }
            }
            prop_assert_eq!(s, replica);
        }

        /// Every command survives the log encoding unchanged.
        #[test]
        fn log_encoding_round_trips(cmd in arb_command()) {
            let v = VersionedCommand::new(cmd.clone());
            let bytes = serde_json::to_vec(&v).unwrap();
            let back: VersionedCommand = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(back.into_current(), cmd);
        }

        /// Volume commands in any order: a refusal changes nothing, and the
        /// records always cover exactly the volume's replica nodes.
        #[test]
        fn volume_records_follow_their_group(cmds in proptest::collection::vec(arb_volume_command(), 0..30)) {
            let mut s = with_volume("");
            for cmd in &cmds {
                let before = s.clone();
                let size = |s: &ClusterState, g: &str| s.groups.get(g).and_then(|g| g.spec.volume()).map(|(_, v)| v.size_bytes());
                if let Command::PutGroup { name, spec } = cmd {
                    // A volume's size never goes down; a shrink is refused as such.
                    let (old, new) = (size(&s, name), spec.volume().map(|(_, v)| v.size_bytes()));
                    let r = s.clone().apply(cmd);
                    if let (Some(o), Some(n)) = (old, new) {
                        if n < o {
                            prop_assert!(r.is_err());
                        }
                    }
                    if matches!(r, Err(CommandError::VolumeResize { .. })) {
                        prop_assert!(new < old);
                    }
                }
                if s.apply(cmd).is_err() {
                    prop_assert_eq!(&s, &before);
                } else if let Command::PromoteReplica { node, .. } = cmd {
                    // Exactly one UpToDate replica after a forced promotion: it.
                    let disks = s.replica_disks("data");
                    let up: Vec<&String> = disks.iter().filter(|(_, d)| **d == DiskState::UpToDate).map(|(n, _)| n).collect();
                    prop_assert_eq!(up, vec![node]);
                    prop_assert_eq!(before.groups["db"].placement.phase, Phase::Stopped);
                } else if let Command::ReplaceReplica { node, .. } = cmd {
                    // Recorded Inconsistent at once, another copy UpToDate.
                    let disks = s.replica_disks("data");
                    prop_assert_eq!(disks.get(node), Some(&DiskState::Inconsistent));
                    prop_assert!(disks.iter().any(|(n, d)| n != node && *d == DiskState::UpToDate));
                }
                for g in s.groups.values() {
                    match g.spec.volume() {
                        Some((r, _)) => {
                            let recorded: Vec<&String> = g.replica_disks[&r.name].keys().collect();
                            let mut replicas = crate::group::replica_nodes(&g.spec);
                            replicas.sort();
                            prop_assert_eq!(recorded, replicas.iter().collect::<Vec<_>>());
                            prop_assert_eq!(g.replica_disks.len(), 1);
                            // Out-of-sync records only for replicas not recorded UpToDate.
                            for (n, _) in g.replica_out_of_sync.get(&r.name).into_iter().flatten() {
                                prop_assert!(replicas.contains(n));
                            }
                            prop_assert!(g.replica_out_of_sync.keys().all(|v| *v == r.name));
                            prop_assert!(g.volumes_in_service.iter().all(|v| *v == r.name));
                        }
                        None => prop_assert!(g.replica_disks.is_empty()),
                    }
                }
            }
        }
    }
}
