//! Resource groups as the replicated state records them: the operator's
//! definition (`GroupSpec`), where the group is placed and with which epoch
//! (`Placement`), and the checks a definition must pass before it is
//! accepted. Pure: no I/O, no clock (times arrive as arguments).
//!
//! The epoch is the group's fencing token: it grows on every placement
//! change, every start carries it, and a node that sees a newer epoch for a
//! group it runs stops its stale copy.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{validate_name, CommandError};
use crate::volume::{DiskState, VolumeSpec};
use crate::NodeId;

/// Most resources in one group.
pub const MAX_RESOURCES: usize = 32;
/// Most groups in one cluster.
pub const MAX_GROUPS: usize = 256;

/// When a group returns to a more preferred node that came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Failback {
    /// As soon as the preferred node is eligible again.
    Auto,
    /// Only when the operator moves it.
    #[default]
    Manual,
    /// Automatically, but only inside this local-time window, `HH:MM-HH:MM`
    /// (may wrap past midnight).
    Window(String),
}

/// A parsed failback window, in minutes since local midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u16,
    pub end: u16,
}

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        let (a, b) = s.split_once('-')?;
        let minutes = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (start, end) = (minutes(a)?, minutes(b)?);
        (start != end).then_some(Window { start, end })
    }

    /// Whether `minute` (since local midnight) falls inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// One check of a resource's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// What a resource is and how its agent drives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ResourceKind {
    /// A command supervised by the agent in its own process group.
    Process {
        command: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: Option<String>,
        /// Runs as this user (default: the agent's, root).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// With this primary group (default: the user's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// The signal a stop sends first (default SIGTERM; PostgreSQL's
        /// fast shutdown is SIGINT): one of `STOP_SIGNALS`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_signal: Option<String>,
    },
    /// A script with `start`, `stop` and `monitor` actions and OCF exit codes.
    Exec {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
    /// An unmodified OCF resource agent, `provider:type` (e.g. `heartbeat:Dummy`).
    Ocf {
        agent: String,
        #[serde(default)]
        params: BTreeMap<String, String>,
    },
    /// A systemd unit.
    Systemd { unit: String },
    /// A virtual IP (`address/prefix`) on an interface, with backups on the
    /// same node for local recovery.
    Vip {
        address: String,
        interface: String,
        #[serde(default)]
        backup_interfaces: Vec<String>,
    },
    /// A replicated block volume, named by the resource and exported over
    /// NBD on the node where the group runs (its primary). At most one per
    /// group.
    Volume(VolumeSpec),
    /// A file system on the group's volume, mounted where the group runs.
    Filesystem(FilesystemSpec),
}

/// Signals a process resource's stop may start with.
pub const STOP_SIGNALS: [&str; 6] = ["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2"];

/// File system types a `filesystem` resource may hold.
pub const FSTYPES: [&str; 5] = ["ext4", "ext3", "ext2", "xfs", "btrfs"];

/// A file system on the group's volume (a `filesystem` resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemSpec {
    /// The group's `volume` resource, listed before this one.
    pub volume: String,
    /// Where it is mounted: absolute, not `/`.
    pub mountpoint: String,
    /// One of `FSTYPES`.
    pub fstype: String,
    /// Mount options (`-o`), e.g. `noatime`.
    #[serde(default)]
    pub options: String,
    /// Create the file system when the volume holds none (never over data).
    #[serde(default)]
    pub mkfs: bool,
    /// `user` or `user:group` given the file system's root at every mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl FilesystemSpec {
    /// Checks the fields that need nothing but the definition; the error is
    /// (field, reason).
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, r: String| Err((f.to_string(), r));
        let mp = &self.mountpoint;
        if !mp.starts_with('/') {
            return bad("mountpoint", format!("{mp:?} is not an absolute path"));
        }
        let parts: Vec<&str> = mp.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return bad("mountpoint", "cannot be / (the root file system)".into());
        }
        if parts.iter().any(|p| *p == "." || *p == "..")
            || mp.len() > 1024
            || mp.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '\\')
            || mp.ends_with('/')
            || mp.contains("//")
        {
            return bad(
                "mountpoint",
                format!("{mp:?} is not a plain absolute path (no ., .., //, trailing /, spaces or commas)"),
            );
        }
        const SYSTEM: [&str; 8] = ["proc", "sys", "dev", "run", "boot", "etc", "usr", "bin"];
        if parts.len() == 1 && SYSTEM.contains(&parts[0]) {
            return bad("mountpoint", format!("{mp} is a system directory"));
        }
        if !FSTYPES.contains(&self.fstype.as_str()) {
            return bad("fstype", format!("{:?} is not one of {}", self.fstype, FSTYPES.join(", ")));
        }
        let opt_ok = |c: char| c.is_ascii_alphanumeric() || "_=,.:-/+".contains(c);
        if self.options.len() > 512
            || !self.options.chars().all(opt_ok)
            || self.options.split(',').any(|o| o == "loop" || o.starts_with("loop="))
        {
            return bad(
                "options",
                format!("{:?} is not a list of mount options like noatime,data=ordered", self.options),
            );
        }
        if let Some(o) = &self.owner {
            let (u, g) = o.split_once(':').unwrap_or((o, "x"));
            let name_ok = |n: &str| {
                !n.is_empty() && n.len() <= 32 && n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            };
            if !name_ok(u) || !name_ok(g) {
                return bad("owner", format!("{o:?} is not user or user:group"));
            }
        }
        Ok(())
    }
}

impl ResourceKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ResourceKind::Process { .. } => "process",
            ResourceKind::Exec { .. } => "exec",
            ResourceKind::Ocf { .. } => "ocf",
            ResourceKind::Systemd { .. } => "systemd",
            ResourceKind::Vip { .. } => "vip",
            ResourceKind::Volume(_) => "volume",
            ResourceKind::Filesystem(_) => "filesystem",
        }
    }

    /// The user (and group) a command resource runs as, when not the agent's.
    pub fn run_as(&self) -> Option<(&str, Option<&str>)> {
        match self {
            ResourceKind::Process { user: Some(u), group, .. } | ResourceKind::Exec { user: Some(u), group, .. } => {
                Some((u.as_str(), group.as_deref()))
            }
            _ => None,
        }
    }
}

/// One resource of a group, started in list order and stopped in reverse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSpec {
    pub name: String,
    #[serde(flatten)]
    pub kind: ResourceKind,
    #[serde(default = "default_start_timeout")]
    pub start_timeout_ms: u64,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_ms: u64,
    /// The quick check, run often.
    #[serde(default = "default_monitor")]
    pub monitor: Monitor,
    /// The deep check, run less often (for agents that have one).
    #[serde(default)]
    pub deep_monitor: Option<Monitor>,
}

fn default_start_timeout() -> u64 {
    20_000
}
fn default_stop_timeout() -> u64 {
    20_000
}
fn default_monitor() -> Monitor {
    Monitor { interval_ms: 1_000, timeout_ms: 5_000 }
}

/// A resource group as the operator defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub resources: Vec<ResourceSpec>,
    /// Failover domain in priority order: the group runs on the first
    /// eligible node of this list.
    pub nodes: Vec<String>,
    #[serde(default)]
    pub failback: Failback,
    /// Groups this one must never share a node with.
    #[serde(default)]
    pub anti_affinity: Vec<String>,
    /// A group this one must run on the same node as.
    #[serde(default)]
    pub colocate_with: Option<String>,
    /// Capacity units the group uses on its node (see node capacity).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Local restarts allowed within `restart_window_ms` before failing over.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_restart_window")]
    pub restart_window_ms: u64,
    /// A node the group failed on (past its restart threshold) may run it
    /// again this long after the leader saw the failure; 0: only after
    /// `/clear` (Pacemaker's `failure-timeout`).
    #[serde(default)]
    pub failure_timeout_ms: u64,
    /// Bound to the ticket between two sites (`[ticket]`): the group runs
    /// only while this cluster's site holds it (docs/dr.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ticket: bool,
}

impl GroupSpec {
    /// The group's volume: its resource and its definition.
    pub fn volume(&self) -> Option<(&ResourceSpec, &VolumeSpec)> {
        self.resources.iter().find_map(|r| match &r.kind {
            ResourceKind::Volume(v) => Some((r, v)),
            _ => None,
        })
    }
}

/// The nodes holding a replica of the group's volume: the first `replicas`
/// names of its `nodes` list (empty when the group has no volume). The group
/// only ever runs on one of them.
pub fn replica_nodes(spec: &GroupSpec) -> Vec<String> {
    match spec.volume() {
        Some((_, v)) => spec.nodes.iter().take(v.replicas as usize).cloned().collect(),
        None => Vec::new(),
    }
}

fn default_weight() -> u32 {
    1
}
fn default_max_restarts() -> u32 {
    3
}
fn default_restart_window() -> u64 {
    60_000
}

/// Where a group is, as decided by the scheduler and committed in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not placed anywhere.
    #[default]
    Stopped,
    /// Placed: the node starts (or runs) it.
    Started,
    /// The node must stop it before it may be placed elsewhere.
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Placement {
    pub node: Option<NodeId>,
    pub phase: Phase,
    /// Grows on every placement change; never reused.
    pub epoch: u64,
    /// Why the last change happened, for the operator.
    pub reason: String,
}

/// A group in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    pub spec: GroupSpec,
    /// False after `/stop`: the group is kept stopped.
    pub enabled: bool,
    pub placement: Placement,
    /// Nodes on which the group failed past its restart threshold; it is not
    /// placed there again until `/clear`.
    #[serde(default)]
    pub failed_on: BTreeSet<NodeId>,
    /// A switchover the operator asked for: stop where it runs, then start
    /// on this node. Cleared once the group starts there.
    #[serde(default)]
    pub move_to: Option<NodeId>,
    /// Per volume of the group, per replica node (by name): what its disk
    /// holds as the primary recorded it. Only an `UpToDate` replica may
    /// become primary.
    #[serde(default)]
    pub replica_disks: BTreeMap<String, BTreeMap<String, DiskState>>,
    /// Per volume, per replica node: how many times an operator replaced
    /// that replica's disk (absent: never). A node recreates its replica's
    /// files when this grows; an `UpToDate` record must name the current
    /// number, so a resync of the disk before its replacement cannot mark
    /// the new, empty one `UpToDate`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replica_replaced: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per volume: the replica nodes replaced whose full resync has not
    /// ended yet (it ends with their first `UpToDate` record).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas_replacing: BTreeMap<String, BTreeSet<String>>,
    /// Per volume, per replica node the primary tracks as missing writes:
    /// its out-of-sync bytes as last recorded (see `RecordOutOfSync`).
    /// Cleared when the replica is recorded `UpToDate`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replica_out_of_sync: BTreeMap<String, BTreeMap<String, crate::volume::OutOfSync>>,
    /// Per volume: the group's epoch when a replica was last promoted by
    /// force (`PromoteReplica`). A replica that has not followed a primary
    /// since may hold acknowledged writes the new lineage lacks: its
    /// divergence goes to the split-brain policy, never overwritten for
    /// being behind in epoch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forced_promotions: BTreeMap<String, u64>,
    /// Volumes a primary has recorded a replica of: they hold data from
    /// then on, so a replica created afterwards (its files lost) starts
    /// empty rather than as a copy of a brand-new volume.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub volumes_in_service: BTreeSet<String>,
}

impl GroupRecord {
    /// How the API and the metrics name where the group is: `running`,
    /// `moving`, `stopping`, `failed` or `stopped`.
    pub fn state_name(&self) -> &'static str {
        match self.placement.phase {
            Phase::Started => "running",
            Phase::Stopping if self.enabled => "moving",
            Phase::Stopping => "stopping",
            Phase::Stopped if self.enabled && !self.failed_on.is_empty() => "failed",
            Phase::Stopped => "stopped",
        }
    }

    /// The recorded disk of `node`'s replica of `volume`, if it holds one.
    pub fn disk(&self, volume: &str, node: &str) -> Option<DiskState> {
        self.replica_disks.get(volume).and_then(|d| d.get(node)).copied()
    }

    /// Whether `node`'s replica of `volume` was replaced and is not yet
    /// resynced.
    pub fn replacing(&self, volume: &str, node: &str) -> bool {
        self.replicas_replacing.get(volume).is_some_and(|n| n.contains(node))
    }

    /// How many times `node`'s replica of `volume` was replaced (0: never).
    pub fn replaced(&self, volume: &str, node: &str) -> u64 {
        self.replica_replaced.get(volume).and_then(|d| d.get(node)).copied().unwrap_or(0)
    }
}

/// Whether one mountpoint is the other or under it (mounting one would hide
/// or be hidden by the other).
fn nested(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x == y || x.strip_prefix(y).is_some_and(|rest| rest.starts_with('/'));
    under(a, b) || under(b, a)
}

fn invalid(field: String, reason: impl Into<String>) -> CommandError {
    CommandError::Invalid { field, reason: reason.into() }
}

/// Checks a definition against itself and against the known nodes and
/// groups (`others`: every other group's spec by name). Every refusal names
/// the offending field.
pub fn validate_group(
    name: &str,
    spec: &GroupSpec,
    node_names: &BTreeSet<String>,
    others: &BTreeMap<String, GroupSpec>,
) -> Result<(), CommandError> {
    validate_name("name", name)?;
    if spec.resources.is_empty() {
        return Err(invalid("resources".into(), "a group needs at least one resource"));
    }
    if spec.resources.len() > MAX_RESOURCES {
        return Err(invalid("resources".into(), format!("at most {MAX_RESOURCES} resources")));
    }
    let mut seen = BTreeSet::new();
    for (i, r) in spec.resources.iter().enumerate() {
        let at = |f: &str| format!("resources[{i}].{f}");
        validate_name(&at("name"), &r.name)?;
        if !seen.insert(r.name.as_str()) {
            return Err(invalid(at("name"), format!("{} is used twice", r.name)));
        }
        match &r.kind {
            ResourceKind::Process { command, .. } if command.first().is_none_or(|c| c.is_empty()) => {
                return Err(invalid(at("command"), "a process needs a command: [\"program\", \"arg\", ...]"));
            }
            ResourceKind::Process { stop_signal: Some(sig), .. } if !STOP_SIGNALS.contains(&sig.as_str()) => {
                return Err(invalid(at("stop_signal"), format!("{sig:?} is not one of {}", STOP_SIGNALS.join(", "))));
            }
            ResourceKind::Exec { path, .. } if !path.starts_with('/') => {
                return Err(invalid(at("path"), "must be an absolute path"));
            }
            ResourceKind::Ocf { agent, params } => {
                let ok = agent.split_once(':').is_some_and(|(p, t)| {
                    let part =
                        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                    part(p) && part(t)
                });
                if !ok {
                    return Err(invalid(at("agent"), format!("{agent:?} is not provider:type, e.g. heartbeat:Dummy")));
                }
                if let Some(k) =
                    params.keys().find(|k| k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                {
                    return Err(invalid(at(&format!("params.{k}")), "parameter names are letters, digits and '_'"));
                }
            }
            ResourceKind::Systemd { unit } if unit.is_empty() || unit.contains('/') => {
                return Err(invalid(at("unit"), "a unit name, e.g. nginx.service"));
            }
            ResourceKind::Vip { address, interface, backup_interfaces } => {
                // The prefix is plain decimal, at most the address's bits.
                let ok = address.split_once('/').is_some_and(|(ip, len)| {
                    let max = match ip.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V4(_)) => 32,
                        Ok(std::net::IpAddr::V6(_)) => 128,
                        Err(_) => return false,
                    };
                    len.parse::<u8>().is_ok_and(|l| l <= max && l.to_string() == len)
                });
                if !ok {
                    return Err(invalid(
                        at("address"),
                        format!("{address:?} is not address/prefix, e.g. 10.0.0.100/24"),
                    ));
                }
                for (j, ifname) in std::iter::once(interface).chain(backup_interfaces).enumerate() {
                    let printable = |c: char| c.is_ascii_graphic() && c != '/';
                    if ifname.is_empty() || ifname.len() > 15 || !ifname.chars().all(printable) {
                        let f = if j == 0 { at("interface") } else { at(&format!("backup_interfaces[{}]", j - 1)) };
                        return Err(invalid(f, format!("{ifname:?} is not an interface name")));
                    }
                }
            }
            ResourceKind::Volume(_) => {
                if let Some(first) = spec.resources[..i].iter().find(|o| matches!(o.kind, ResourceKind::Volume(_))) {
                    return Err(invalid(
                        at("type"),
                        format!("a group holds at most one volume, and {} already is one", first.name),
                    ));
                }
            }
            ResourceKind::Filesystem(f) => {
                f.check().map_err(|(field, reason)| invalid(at(&field), reason))?;
                let vol = spec.resources[..i].iter().find(|o| o.name == f.volume);
                match vol.map(|o| &o.kind) {
                    Some(ResourceKind::Volume(_)) => {}
                    Some(_) => return Err(invalid(at("volume"), format!("{} is not a volume resource", f.volume))),
                    None if spec.resources.iter().any(|o| o.name == f.volume) => {
                        return Err(invalid(
                            at("volume"),
                            format!("volume {} must be listed before the file system on it", f.volume),
                        ))
                    }
                    None => return Err(invalid(at("volume"), format!("the group has no volume named {}", f.volume))),
                }
                if let Some(o) = spec.resources[..i]
                    .iter()
                    .find(|o| matches!(&o.kind, ResourceKind::Filesystem(g) if g.volume == f.volume))
                {
                    return Err(invalid(at("volume"), format!("{} already mounts volume {}", o.name, f.volume)));
                }
                let same_mount = |o: &ResourceSpec| matches!(&o.kind, ResourceKind::Filesystem(g) if nested(&g.mountpoint, &f.mountpoint));
                if let Some(o) = spec.resources[..i].iter().find(|o| same_mount(o)) {
                    return Err(invalid(
                        at("mountpoint"),
                        format!("{} overlaps {}'s mountpoint", f.mountpoint, o.name),
                    ));
                }
                if let Some((g, _)) = others.iter().find(|(_, o)| o.resources.iter().any(same_mount)) {
                    return Err(invalid(
                        at("mountpoint"),
                        format!("{} overlaps a mountpoint of group {g}", f.mountpoint),
                    ));
                }
            }
            _ => {}
        }
        if let Some((u, g)) = r.kind.run_as() {
            for (f, n) in [("user", Some(u)), ("group", g)] {
                if let Some(n) = n {
                    if n.is_empty()
                        || n.len() > 32
                        || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                    {
                        return Err(invalid(at(f), format!("{n:?} is not a user or group name")));
                    }
                }
            }
        }
        if r.monitor.interval_ms < 100 || r.monitor.timeout_ms == 0 {
            return Err(invalid(at("monitor"), "interval_ms at least 100, timeout_ms at least 1"));
        }
        if r.start_timeout_ms == 0 {
            return Err(invalid(at("start_timeout_ms"), "at least 1 ms"));
        }
        if r.stop_timeout_ms == 0 {
            return Err(invalid(at("stop_timeout_ms"), "at least 1 ms"));
        }
    }
    if spec.nodes.is_empty() {
        return Err(invalid("nodes".into(), "list the nodes the group may run on, preferred first"));
    }
    for (i, n) in spec.nodes.iter().enumerate() {
        if !node_names.contains(n) {
            return Err(invalid(format!("nodes[{i}]"), format!("no node named {n}")));
        }
        if spec.nodes[..i].contains(n) {
            return Err(invalid(format!("nodes[{i}]"), format!("{n} is listed twice")));
        }
    }
    // Checked once the node list is known good: the replicas are its head.
    let first_volume = spec.resources.iter().position(|r| matches!(r.kind, ResourceKind::Volume(_)));
    if let (Some(i), Some((r, v))) = (first_volume, spec.volume()) {
        let at = |f: &str| format!("resources[{i}].{f}");
        v.check(&spec.nodes).map_err(|(f, reason)| invalid(at(&f), reason))?;
        if let Some((g, _)) = others.iter().find(|(_, o)| o.volume().is_some_and(|(other, _)| other.name == r.name)) {
            return Err(invalid(at("name"), format!("volume {} is already defined in group {g}", r.name)));
        }
    }
    if let Failback::Window(w) = &spec.failback {
        if Window::parse(w).is_none() {
            return Err(invalid("failback.window".into(), format!("{w:?} is not HH:MM-HH:MM")));
        }
    }
    for (i, g) in spec.anti_affinity.iter().enumerate() {
        if g == name {
            return Err(invalid(format!("anti_affinity[{i}]"), "a group cannot avoid itself"));
        }
        if !others.contains_key(g) {
            return Err(invalid(format!("anti_affinity[{i}]"), format!("no group named {g}")));
        }
    }
    if let Some(c) = &spec.colocate_with {
        if !others.contains_key(c) {
            return Err(invalid("colocate_with".into(), format!("no group named {c}")));
        }
        // Follow the chain: it must end, and never come back to this group.
        let mut at = c.clone();
        for _ in 0..=others.len() {
            if at == name {
                return Err(invalid("colocate_with".into(), format!("colocation cycle through {c}")));
            }
            match others.get(&at).and_then(|g| g.colocate_with.clone()) {
                Some(next) => at = next,
                None => break,
            }
        }
        if spec.anti_affinity.contains(c) {
            return Err(invalid("colocate_with".into(), format!("{c} is also in anti_affinity")));
        }
    }
    if spec.weight == 0 {
        return Err(invalid("weight".into(), "at least 1"));
    }
    if spec.restart_window_ms == 0 {
        return Err(invalid("restart_window_ms".into(), "at least 1"));
    }
    if spec.failure_timeout_ms != 0 && spec.failure_timeout_ms < 1000 {
        return Err(invalid("failure_timeout_ms".into(), "0 (never) or at least 1000"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> GroupSpec {
        serde_json::from_str(json).unwrap()
    }

    fn nodes() -> BTreeSet<String> {
        ["node1", "node2", "node3"].iter().map(|s| s.to_string()).collect()
    }

    fn field_of(r: Result<(), CommandError>) -> String {
        match r {
            Err(CommandError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    const MINIMAL: &str = r#"{"resources": [{"name": "web", "type": "process", "command": ["python3", "-m", "http.server", "8080"]}],
        "nodes": ["node1", "node2", "node3"], "failback": "manual"}"#;

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let s = spec(MINIMAL);
        assert_eq!(s.failback, Failback::Manual);
        assert_eq!(s.resources[0].kind.type_name(), "process");
        assert_eq!(s.resources[0].monitor, Monitor { interval_ms: 1000, timeout_ms: 5000 });
        assert_eq!(s.max_restarts, 3);
        assert!(validate_group("web", &s, &nodes(), &BTreeMap::new()).is_ok());
        let w = spec(
            r#"{"resources": [{"name": "d", "type": "ocf", "agent": "heartbeat:Dummy"}],
            "nodes": ["node1"], "failback": {"window": "22:00-02:00"}}"#,
        );
        assert_eq!(w.failback, Failback::Window("22:00-02:00".into()));
        assert!(validate_group("d", &w, &nodes(), &BTreeMap::new()).is_ok());
    }

    /// A group of volume + filesystem, the filesystem's fields replaced by
    /// `fs` (a JSON object's inside) and `before` resources put first.
    fn fs_group(before: &str, fs: &str) -> String {
        format!(
            r#"{{"resources": [{before}
                {{"name": "data", "type": "volume", "size": "64MiB"}},
                {{"name": "fs", "type": "filesystem", {fs}}}],
               "nodes": ["node1", "node2"]}}"#
        )
    }

    #[test]
    fn filesystem_definitions_are_checked_field_by_field() {
        let ok = r#""volume": "data", "mountpoint": "/srv/db", "fstype": "ext4", "options": "noatime", "mkfs": true, "owner": "postgres""#;
        let s = spec(&fs_group("", ok));
        assert!(validate_group("g", &s, &nodes(), &BTreeMap::new()).is_ok());
        let v = |fs: &str| field_of(validate_group("g", &spec(&fs_group("", fs)), &nodes(), &BTreeMap::new()));
        let with = |k: &str, val: &str| {
            let mut m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&format!("{{{ok}}}")).unwrap();
            m.insert(k.into(), serde_json::from_str(val).unwrap());
            let o = serde_json::Value::Object(m).to_string();
            o[1..o.len() - 1].to_string()
        };
        for bad in
            [r#""srv/db""#, r#""/""#, r#""//""#, r#""/srv/../etc""#, r#""/srv/db/""#, r#""/srv/d b""#, r#""/proc""#]
        {
            assert_eq!(v(&with("mountpoint", bad)), "resources[1].mountpoint", "{bad}");
        }
        assert_eq!(v(&with("fstype", r#""ntfs""#)), "resources[1].fstype");
        assert_eq!(v(&with("options", r#""loop""#)), "resources[1].options");
        assert_eq!(v(&with("options", r#""a;rm -rf /""#)), "resources[1].options");
        assert_eq!(v(&with("owner", r#""a b""#)), "resources[1].owner");
        assert_eq!(v(&with("volume", r#""nope""#)), "resources[1].volume");
        // The volume must come first.
        let after = r#"{"resources": [
            {"name": "fs", "type": "filesystem", "volume": "data", "mountpoint": "/srv/db", "fstype": "ext4"},
            {"name": "data", "type": "volume", "size": "64MiB"}], "nodes": ["node1"]}"#;
        let e = validate_group("g", &spec(after), &nodes(), &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("listed before"), "{e}");
        // Not a volume.
        let not_volume =
            fs_group(r#"{"name": "web", "type": "exec", "path": "/bin/true"},"#, &with("volume", r#""web""#));
        assert_eq!(
            field_of(validate_group("g", &spec(&not_volume), &nodes(), &BTreeMap::new())),
            "resources[2].volume"
        );
        // Mountpoints may not overlap another group's.
        let mut others = BTreeMap::new();
        others.insert(
            "other".to_string(),
            spec(&fs_group("", &with("mountpoint", r#""/srv""#)).replace("\"data\"", "\"data2\"")),
        );
        assert_eq!(field_of(validate_group("g", &s, &nodes(), &others)), "resources[1].mountpoint");
        // Unknown fields are refused by the decoder.
        assert!(serde_json::from_str::<GroupSpec>(&fs_group("", &format!("{ok}, \"colour\": 1"))).is_err());
    }

    #[test]
    fn run_as_names_are_checked() {
        let s = spec(
            r#"{"resources": [{"name": "p", "type": "process", "command": ["sleep", "1"], "user": "postgres"}], "nodes": ["node1"]}"#,
        );
        assert_eq!(s.resources[0].kind.run_as(), Some(("postgres", None)));
        let sig = |v: &str| {
            spec(&format!(
                r#"{{"resources": [{{"name": "p", "type": "process", "command": ["x"], "stop_signal": "{v}"}}], "nodes": ["node1"]}}"#
            ))
        };
        assert!(validate_group("g", &sig("SIGINT"), &nodes(), &BTreeMap::new()).is_ok());
        assert_eq!(
            field_of(validate_group("g", &sig("SIGKILL"), &nodes(), &BTreeMap::new())),
            "resources[0].stop_signal"
        );
        assert!(validate_group("g", &s, &nodes(), &BTreeMap::new()).is_ok());
        let bad = spec(
            r#"{"resources": [{"name": "p", "type": "exec", "path": "/bin/x", "user": "a b"}], "nodes": ["node1"]}"#,
        );
        assert_eq!(field_of(validate_group("g", &bad, &nodes(), &BTreeMap::new())), "resources[0].user");
        let bad = spec(
            r#"{"resources": [{"name": "p", "type": "exec", "path": "/bin/x", "user": "u", "group": ""}], "nodes": ["node1"]}"#,
        );
        assert_eq!(field_of(validate_group("g", &bad, &nodes(), &BTreeMap::new())), "resources[0].group");
    }

    #[test]
    fn unknown_type_and_fields_are_refused_by_the_decoder() {
        let bad = r#"{"resources": [{"name": "x", "type": "teleport"}], "nodes": ["node1"]}"#;
        assert!(serde_json::from_str::<GroupSpec>(bad).is_err());
        let extra = r#"{"resources": [], "nodes": [], "colour": 1}"#;
        assert!(serde_json::from_str::<GroupSpec>(extra).is_err());
    }

    #[test]
    fn bad_definitions_name_their_field() {
        let v = |json: &str| field_of(validate_group("g", &spec(json), &nodes(), &BTreeMap::new()));
        assert_eq!(
            v(r#"{"resources": [{"name": "w", "type": "process", "command": []}], "nodes": ["node1"]}"#),
            "resources[0].command"
        );
        assert_eq!(
            v(r#"{"resources": [{"name": "w", "type": "process", "command": ["x"]}], "nodes": ["node9"]}"#),
            "nodes[0]"
        );
        assert_eq!(
            v(
                r#"{"resources": [{"name": "w", "type": "process", "command": ["x"]}], "nodes": ["node1"], "failback": {"window": "25:00-01:00"}}"#
            ),
            "failback.window"
        );
        assert_eq!(
            v(
                r#"{"resources": [{"name": "v", "type": "vip", "address": "10.0.0.1", "interface": "eth0"}], "nodes": ["node1"]}"#
            ),
            "resources[0].address"
        );
        assert_eq!(
            v(r#"{"resources": [{"name": "o", "type": "ocf", "agent": "Dummy"}], "nodes": ["node1"]}"#),
            "resources[0].agent"
        );
        assert_eq!(v(r#"{"resources": [], "nodes": ["node1"]}"#), "resources");
        assert_eq!(
            v(
                r#"{"resources": [{"name": "a", "type": "systemd", "unit": "x.service"}, {"name": "a", "type": "systemd", "unit": "y.service"}], "nodes": ["node1"]}"#
            ),
            "resources[1].name"
        );
        assert_eq!(
            v(r#"{"resources": [{"name": "e", "type": "exec", "path": "rel/script"}], "nodes": ["node1"]}"#),
            "resources[0].path"
        );
    }

    #[test]
    fn colocation_cycles_and_unknown_groups_are_refused() {
        let base = |colo: &str| {
            spec(&format!(
                r#"{{"resources": [{{"name": "r", "type": "systemd", "unit": "u"}}], "nodes": ["node1"], "colocate_with": {colo}}}"#
            ))
        };
        let mut others = BTreeMap::new();
        others.insert("a".to_string(), base("\"b\""));
        others.insert("b".to_string(), base("\"c\""));
        // c -> a -> b -> c is a cycle.
        assert_eq!(field_of(validate_group("c", &base("\"a\""), &nodes(), &others)), "colocate_with");
        assert_eq!(field_of(validate_group("d", &base("\"zz\""), &nodes(), &others)), "colocate_with");
        // d -> a -> b -> (c absent) ends: fine.
        assert!(validate_group("d", &base("\"a\""), &nodes(), &others).is_ok());
    }

    #[test]
    fn windows_parse_and_wrap_midnight() {
        let w = Window::parse("22:00-02:00").unwrap();
        assert!(w.contains(23 * 60) && w.contains(60) && !w.contains(12 * 60) && !w.contains(2 * 60));
        let d = Window::parse("02:00-04:00").unwrap();
        assert!(d.contains(150) && !d.contains(240) && !d.contains(119));
        for bad in ["", "2:00-04:00", "02:00-02:00", "24:00-01:00", "02:60-03:00", "0200-0300"] {
            assert!(Window::parse(bad).is_none(), "{bad}");
        }
    }

    fn vol(fields: &str, nodes: &str) -> String {
        format!(r#"{{"resources": [{{"name": "data", "type": "volume"{fields}}}], "nodes": [{nodes}]}}"#)
    }

    #[test]
    fn a_volume_parses_with_its_defaults() {
        let s = spec(&vol(r#", "size": "1GiB""#, r#""node1", "node2""#));
        let (r, v) = s.volume().unwrap();
        assert_eq!((r.name.as_str(), r.kind.type_name()), ("data", "volume"));
        assert_eq!(v.size_bytes(), 1 << 30);
        assert_eq!(v.mode, crate::volume::ReplicationMode::Sync);
        assert_eq!(v.replicas, 2);
        assert_eq!(v.split_brain, crate::volume::SplitBrainPolicy::Disconnect);
        assert_eq!((v.rate_bytes(), v.granularity_bytes(), v.nbd_tcp, v.async_failover), (None, 4096, false, false));
        assert_eq!(v.read_balancing, crate::volume::ReadBalancing::PreferLocal);
        assert_eq!((v.resync.mode, v.resync_min_rate()), (crate::volume::ResyncMode::Adaptive, 4 << 20));
        assert_eq!(replica_nodes(&s), vec!["node1".to_string(), "node2".to_string()]);
        assert!(validate_group("g", &s, &nodes(), &BTreeMap::new()).is_ok());
        // Every field, and a size given as a JSON number of bytes.
        let full = spec(&vol(
            r#", "size": 1073741824, "mode": "async", "modes": {"node2": "sync"}, "replicas": 3,
               "split_brain": "discard-younger-primary", "rate": "100MiB/s", "granularity": "64KiB", "nbd_tcp": true,
               "async_failover": true, "read_balancing": "least-pending",
               "resync": {"mode": "adaptive", "min_rate": "16MiB/s"}"#,
            r#""node3", "node2", "node1""#,
        ));
        assert!(validate_group("g", &full, &nodes(), &BTreeMap::new()).is_ok());
        let (_, v) = full.volume().unwrap();
        assert_eq!(v.size, "1073741824");
        assert_eq!((v.size_bytes(), v.rate_bytes(), v.granularity_bytes()), (1 << 30, Some(100 << 20), 64 << 10));
        assert_eq!(v.mode_for("node2"), crate::volume::ReplicationMode::Sync);
        assert_eq!(v.mode_for("node1"), crate::volume::ReplicationMode::Async);
        assert!(v.async_failover);
        assert_eq!(v.read_balancing, crate::volume::ReadBalancing::LeastPending);
        assert_eq!(v.resync_min_rate(), 16 << 20);
        assert_eq!(replica_nodes(&full), vec!["node3", "node2", "node1"]);
        assert!(replica_nodes(&spec(MINIMAL)).is_empty());
        // The definition reads back as written.
        let back: GroupSpec = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn a_volume_refuses_unknown_fields_and_bad_types() {
        for bad in [
            vol(r#", "size": "1GiB", "colour": "red""#, r#""node1""#),
            vol(r#", "size": "1GiB", "mode": "semi""#, r#""node1""#),
            vol(r#", "size": "1GiB", "split_brain": "coin-toss""#, r#""node1""#),
            vol(r#", "size": "1GiB", "read_balancing": "prefer-remote""#, r#""node1""#),
            vol(r#", "size": "1GiB", "read_balancing": 1"#, r#""node1""#),
            vol(r#", "size": "1GiB", "resync": {"mode": "dynamic"}"#, r#""node1""#),
            vol(r#", "size": "1GiB", "resync": {"max_rate": "1GiB"}"#, r#""node1""#),
            vol(r#", "size": "1GiB", "replicas": -1"#, r#""node1""#),
            vol(r#", "size": true"#, r#""node1""#),
            vol("", r#""node1""#),
        ] {
            assert!(serde_json::from_str::<GroupSpec>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_volumes_name_their_field() {
        let v = |fields: &str, nodes: &str| {
            field_of(validate_group("g", &spec(&vol(fields, nodes)), &self::nodes(), &BTreeMap::new()))
        };
        let two = r#""node1", "node2""#;
        for size in [
            r#""abc""#,
            r#""0""#,
            "0",
            r#""5""#,
            r#""4097""#,
            r#""100TiB""#,
            r#""1.5B""#,
            r#""-4096""#,
            r#""1 GiG""#,
            r#""""#,
        ] {
            assert_eq!(v(&format!(r#", "size": {size}"#), two), "resources[0].size", "{size}");
        }
        assert_eq!(v(r#", "size": "1GiB", "replicas": 0"#, two), "resources[0].replicas");
        assert_eq!(v(r#", "size": "1GiB", "replicas": 4"#, r#""node1", "node2", "node3""#), "resources[0].replicas");
        assert_eq!(v(r#", "size": "1GiB", "replicas": 3"#, two), "resources[0].replicas");
        assert_eq!(v(r#", "size": "1GiB""#, r#""node1""#), "resources[0].replicas");
        assert_eq!(
            v(r#", "size": "1GiB", "modes": {"node3": "async"}"#, r#""node1", "node2", "node3""#),
            "resources[0].modes.node3"
        );
        assert_eq!(v(r#", "size": "1GiB", "rate": "fast""#, two), "resources[0].rate");
        assert_eq!(v(r#", "size": "1GiB", "rate": "1KiB/s""#, two), "resources[0].rate");
        for resync in [
            r#"{"min_rate": "slow"}"#,
            r#"{"min_rate": "1KiB/s"}"#,
            r#"{"min_rate": "8MiB/s"}"#,
            r#"{"mode": "fixed", "min_rate": "1MiB/s"}"#,
        ] {
            let f = format!(r#", "size": "1GiB", "rate": "4MiB/s", "resync": {resync}"#);
            assert_eq!(v(&f, two), "resources[0].resync.min_rate", "{resync}");
        }
        assert_eq!(v(r#", "size": "1GiB", "granularity": "3KiB""#, two), "resources[0].granularity");
        assert_eq!(v(r#", "size": "1GiB", "granularity": "2MiB""#, two), "resources[0].granularity");
        assert_eq!(v(r#", "size": "1GiB", "granularity": "2KiB""#, two), "resources[0].granularity");
        // The node list is checked before the replicas taken from it.
        assert_eq!(v(r#", "size": "1GiB""#, r#""node1", "node9""#), "nodes[1]");
        // One volume per group.
        let twice = r#"{"resources": [{"name": "a", "type": "volume", "size": "1GiB"}, {"name": "b", "type": "volume", "size": "1GiB"}], "nodes": ["node1", "node2"]}"#;
        assert_eq!(field_of(validate_group("g", &spec(twice), &nodes(), &BTreeMap::new())), "resources[1].type");
        // A volume name is unique across groups.
        let others = BTreeMap::from([("first".to_string(), spec(&vol(r#", "size": "1GiB""#, two)))]);
        assert_eq!(
            field_of(validate_group("second", &spec(&vol(r#", "size": "2GiB""#, two)), &nodes(), &others)),
            "resources[0].name"
        );
    }
}
