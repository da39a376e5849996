//! What `GET /metrics` shows: the metric families, rendered in Prometheus's
//! text exposition format (0.0.4) from a [`Snapshot`] of the agent's state
//! taken at scrape time, plus the few [`Counters`] the agent keeps at its
//! edges (API requests, proposals, leader changes, failovers).
//!
//! Sampling at scrape time keeps the idle agent as cheap as before: nothing
//! here runs unless someone scrapes. This module never reads a clock, a
//! socket or a file: the agent hands it the snapshot (and `now` through it);
//! every series carries the `node` label of the agent that renders it.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tandem_raft::group::{GroupRecord, Phase};
use tandem_raft::state::ClusterState;
use tandem_raft::NodeId;

/// Labels as name/value pairs (every family here has dynamic label sets).
pub type Labels = Vec<(String, String)>;
type FGauge = Gauge<f64, AtomicU64>;

/// The states a group is shown in (`GET /v1/groups`' `state`).
pub const GROUP_STATES: [&str; 5] = ["running", "moving", "stopping", "failed", "stopped"];
/// The states the executor gives a resource.
pub const RESOURCE_STATES: [&str; 4] = ["starting", "running", "recovering", "stopped"];
/// A replica's disk states.
pub const DISK_STATES: [&str; 4] = ["UpToDate", "Inconsistent", "Outdated", "Diskless"];
/// A replica's connection states (as the API spells them).
pub const CONNECTION_STATES: [&str; 6] =
    ["Connected", "SyncSource", "SyncTarget", "Ahead", "Disconnected", "SplitBrain"];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Proposal and fsync latency buckets: 0.5 ms to about 8 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 15)
}

/// A histogram of latencies in seconds (for the log store's fsync too).
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// What the agent counts as things happen (cheap: an atomic add or a short
/// lock each). Clones share the counts.
#[derive(Clone, Debug)]
pub struct Counters {
    /// By `method`, `route` (the matched route template) and `status`.
    pub api_requests: Family<Labels, Counter>,
    /// Times this node saw the leader change (including to none).
    pub leader_changes: Counter,
    /// Commands this node proposed, from the call to its commit (or failure).
    pub proposal_seconds: Histogram,
    /// Fsynced writes of Raft log entries (the store's, shared).
    pub log_append_seconds: Histogram,
    /// By `group`: placements that moved a running group straight to another
    /// node (its node failed or was removed), as applied on this node.
    pub failovers: Family<Labels, Counter>,
    /// By `group`: at its last failover, the seconds from when this node last
    /// heard the failed node to when the new placement was applied here.
    pub last_outage_seconds: Family<Labels, FGauge>,
    /// By `volume` and `op` (read, write, flush, trim, zero): NBD requests
    /// served by this node's exports, and the bytes they moved.
    pub nbd_requests: Family<Labels, Counter>,
    pub nbd_bytes: Family<Labels, Counter>,
    /// By `volume` and `at` (`local`, `replicated`): write latency.
    pub volume_write_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// By `alert`: messages this node's sender delivered, and failed attempts.
    pub alerts_sent: Family<Labels, Counter>,
    pub alert_failures: Family<Labels, Counter>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            api_requests: Family::default(),
            leader_changes: Counter::default(),
            proposal_seconds: latency_histogram(),
            log_append_seconds: latency_histogram(),
            failovers: Family::default(),
            last_outage_seconds: Family::default(),
            nbd_requests: Family::default(),
            nbd_bytes: Family::default(),
            volume_write_seconds: Family::new_with_constructor(latency_histogram),
            alerts_sent: Family::default(),
            alert_failures: Family::default(),
        }
    }
}

impl Counters {
    pub fn count_request(&self, method: &str, route: &str, status: u16) {
        let l = labels(&[("method", method), ("route", route), ("status", &status.to_string())]);
        self.api_requests.get_or_create(&l).inc();
    }

    /// The request and byte counters of `volume`'s NBD `op`.
    pub fn nbd_counters(&self, volume: &str, op: &str) -> (Counter, Counter) {
        let l = labels(&[("volume", volume), ("op", op)]);
        (self.nbd_requests.get_or_create(&l).clone(), self.nbd_bytes.get_or_create(&l).clone())
    }

    /// `volume`'s write latency histogram `at` (`local` or `replicated`).
    pub fn write_histogram(&self, volume: &str, at: &str) -> Histogram {
        self.volume_write_seconds.get_or_create(&labels(&[("volume", volume), ("at", at)])).clone()
    }

    pub fn alert_sent(&self, alert: &str) {
        self.alerts_sent.get_or_create(&labels(&[("alert", alert)])).inc();
    }

    pub fn alert_failed(&self, alert: &str) {
        self.alert_failures.get_or_create(&labels(&[("alert", alert)])).inc();
    }

    /// Counts a failover of `group`; `outage_s` when the failed node was
    /// ever heard.
    pub fn count_failover(&self, group: &str, outage_s: Option<f64>) {
        let l = labels(&[("group", group)]);
        self.failovers.get_or_create(&l).inc();
        if let Some(s) = outage_s {
            self.last_outage_seconds.get_or_create(&l).set(s);
        }
    }
}

/// This node's Raft, as its metrics say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftSample {
    pub is_leader: bool,
    pub has_leader: bool,
    pub voter: bool,
    pub term: u64,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    /// Voters in the membership, and of them those this node heard within
    /// the node timeout (itself included when it is one).
    pub voters: u64,
    pub voters_heard: u64,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub quorum_ack_ms: Option<u64>,
}

/// Another member, as heard from this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSample {
    pub peer: String,
    /// Heard on some path within the node timeout.
    pub up: bool,
    /// Per declared address: heard on it within the node timeout.
    pub paths: Vec<(String, bool)>,
    /// From one of our heartbeats to the first of its heartbeats that
    /// acknowledged it (its sending period included).
    pub round_trip_s: Option<f64>,
}

/// A group in the replicated state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupSample {
    pub group: String,
    pub state: &'static str,
    pub epoch: u64,
    /// It is placed on this node.
    pub here: bool,
    /// Local restarts since it started here (only where it runs).
    pub restarts: Option<u32>,
}

/// A resource of a group running on this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSample {
    pub group: String,
    pub resource: String,
    pub kind: String,
    pub state: String,
    /// It has failed here since the group started here (`last_error`).
    pub failed: bool,
}

/// One replica of a volume held here, as this node's data plane sees it
/// (the primary sees every replica, a secondary itself).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaSample {
    pub volume: String,
    pub replica: String,
    pub role: String,
    pub disk: String,
    pub connection: String,
    pub out_of_sync_bytes: u64,
    pub resync_bytes_per_s: Option<u64>,
    pub resync_remaining_bytes: Option<u64>,
    pub lag_bytes: Option<u64>,
    /// Client reads given to it since its primary started, as the primary
    /// reports them (on its own row: those its disk served); None on a
    /// secondary, which does not count them.
    pub reads: Option<u64>,
}

/// A volume this node is primary for: its read errors and repairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeSample {
    pub volume: String,
    pub read_errors: u64,
    pub repaired_blocks: u64,
}

/// What one scrape shows, gathered by the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub node: String,
    /// None while this agent belongs to no cluster.
    pub raft: Option<RaftSample>,
    /// Seconds of lease left (0 when not held).
    pub lease_left_s: f64,
    pub peers: Vec<PeerSample>,
    pub groups: Vec<GroupSample>,
    pub resources: Vec<ResourceSample>,
    pub replicas: Vec<ReplicaSample>,
    /// The volumes this node is primary for.
    pub volumes: Vec<VolumeSample>,
    /// Heartbeat datagrams dropped so far, by reason.
    pub heartbeats_dropped: Vec<(&'static str, u64)>,
}

fn gauge(v: f64) -> FGauge {
    let g = FGauge::default();
    g.set(v);
    g
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

/// A family of gauges filled from `rows`.
fn family(rows: impl IntoIterator<Item = (Labels, f64)>) -> Family<Labels, FGauge> {
    let f = Family::<Labels, FGauge>::default();
    for (l, v) in rows {
        f.get_or_create(&l).set(v);
    }
    f
}

/// A family of counters whose values come from elsewhere (sampled totals).
fn totals(rows: impl IntoIterator<Item = (Labels, u64)>) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v);
    }
    f
}

/// One row per state of `all`: 1 for `state`, 0 for the others (so a rule
/// can say `...{state="failed"} == 1` and a graph shows the change).
fn state_rows<'a>(base: &'a Labels, all: &'a [&'a str], state: &'a str) -> impl Iterator<Item = (Labels, f64)> + 'a {
    all.iter().map(move |s| {
        let mut l = base.clone();
        l.push(("state".into(), s.to_string()));
        (l, b(*s == state))
    })
}

/// Renders the snapshot and the counters.
pub fn render(s: &Snapshot, c: &Counters) -> String {
    let mut reg = Registry::with_labels(std::iter::once(("node".into(), s.node.clone().into())));
    let r = s.raft.clone();
    reg.register("tandem_member", "Whether this agent belongs to a cluster", gauge(b(r.is_some())));
    if let Some(r) = &r {
        reg.register("tandem_raft_has_leader", "Whether this node knows a leader", gauge(b(r.has_leader)));
        reg.register("tandem_raft_is_leader", "Whether this node is the leader", gauge(b(r.is_leader)));
        reg.register("tandem_raft_voter", "Whether this node is a voter", gauge(b(r.voter)));
        reg.register("tandem_raft_voters", "Voters in the cluster's membership", gauge(r.voters as f64));
        reg.register(
            "tandem_raft_voters_heard",
            "Voters this node heard within the node timeout (itself included)",
            gauge(r.voters_heard as f64),
        );
        reg.register("tandem_raft_term", "The current Raft term", gauge(r.term as f64));
        reg.register("tandem_raft_last_log_index", "The last index in this node's log", gauge(r.last_log_index as f64));
        reg.register(
            "tandem_raft_commit_index",
            "The last index this node knows committed",
            gauge(r.committed_index as f64),
        );
        reg.register("tandem_raft_applied_index", "The last index applied here", gauge(r.applied_index as f64));
        if let Some(ms) = r.quorum_ack_ms {
            reg.register(
                "tandem_raft_quorum_ack_age_seconds",
                "On the leader: seconds since a quorum last acknowledged it",
                gauge(ms as f64 / 1000.0),
            );
        }
    }
    reg.register("tandem_raft_leader_changes", "Times this node saw the leader change", c.leader_changes.clone());
    reg.register(
        "tandem_raft_proposal_seconds",
        "Commands this node proposed: seconds to commit (or to fail)",
        c.proposal_seconds.clone(),
    );
    reg.register(
        "tandem_raft_log_append_seconds",
        "Writes of Raft log entries to this node's disk, fsync included: seconds",
        c.log_append_seconds.clone(),
    );

    // ---- liveness ----
    reg.register("tandem_lease_left_seconds", "Seconds left on this node's lease (0: not held)", gauge(s.lease_left_s));
    let peer = |p: &PeerSample| labels(&[("peer", &p.peer)]);
    reg.register(
        "tandem_peer_up",
        "Whether this node heard the peer within the node timeout",
        family(s.peers.iter().map(|p| (peer(p), b(p.up)))),
    );
    reg.register(
        "tandem_path_up",
        "Whether this node heard the peer on this address within the node timeout",
        family(
            s.peers
                .iter()
                .flat_map(|p| p.paths.iter().map(|(a, up)| (labels(&[("peer", &p.peer), ("address", a)]), b(*up)))),
        ),
    );
    reg.register(
        "tandem_heartbeat_round_trip_seconds",
        "From a heartbeat to the peer's first heartbeat acknowledging it",
        family(s.peers.iter().filter_map(|p| p.round_trip_s.map(|v| (peer(p), v)))),
    );
    reg.register(
        "tandem_heartbeats_dropped",
        "Heartbeat datagrams dropped, by reason",
        totals(s.heartbeats_dropped.iter().map(|(r, n)| (labels(&[("reason", r)]), *n))),
    );

    // ---- groups and resources ----
    let group = |g: &GroupSample| labels(&[("group", &g.group)]);
    reg.register(
        "tandem_group_state",
        "The group's state (1 for the current one)",
        family(s.groups.iter().flat_map(|g| state_rows(&group(g), &GROUP_STATES, g.state).collect::<Vec<_>>())),
    );
    reg.register(
        "tandem_group_epoch",
        "The group's placement epoch",
        family(s.groups.iter().map(|g| (group(g), g.epoch as f64))),
    );
    reg.register(
        "tandem_group_here",
        "Whether the group is placed on this node",
        family(s.groups.iter().map(|g| (group(g), b(g.here)))),
    );
    reg.register(
        "tandem_group_restarts",
        "Local restarts of the group since it started on this node",
        totals(s.groups.iter().filter_map(|g| g.restarts.map(|n| (group(g), n as u64)))),
    );
    for g in &s.groups {
        // A group that never failed over shows 0, so that `increase()` sees its first one.
        let _ = c.failovers.get_or_create(&group(g));
    }
    reg.register("tandem_group_failovers", "Failovers of the group applied on this node", c.failovers.clone());
    reg.register(
        "tandem_group_last_outage_seconds",
        "At the group's last failover: from when this node last heard the failed node to the new placement",
        c.last_outage_seconds.clone(),
    );
    reg.register("tandem_alerts_sent", "Alert messages this node delivered (as the leader)", c.alerts_sent.clone());
    reg.register(
        "tandem_alert_failures",
        "Failed attempts to deliver an alert message from this node (each retried)",
        c.alert_failures.clone(),
    );
    let res = |r: &ResourceSample| labels(&[("group", &r.group), ("resource", &r.resource), ("type", &r.kind)]);
    reg.register(
        "tandem_resource_state",
        "A resource of a group running here: its state (1 for the current one)",
        family(s.resources.iter().flat_map(|r| state_rows(&res(r), &RESOURCE_STATES, &r.state).collect::<Vec<_>>())),
    );
    reg.register(
        "tandem_resource_failed",
        "Whether the resource failed here since its group started here",
        family(s.resources.iter().map(|r| (res(r), b(r.failed)))),
    );

    // ---- volumes ----
    let rep = |r: &ReplicaSample| labels(&[("volume", &r.volume), ("replica", &r.replica), ("role", &r.role)]);
    reg.register(
        "tandem_volume_disk_state",
        "A replica's disk (1 for the current state)",
        family(s.replicas.iter().flat_map(|r| state_rows(&rep(r), &DISK_STATES, &r.disk).collect::<Vec<_>>())),
    );
    reg.register(
        "tandem_volume_connection_state",
        "A replica's connection to the primary (1 for the current state)",
        family(
            s.replicas.iter().flat_map(|r| state_rows(&rep(r), &CONNECTION_STATES, &r.connection).collect::<Vec<_>>()),
        ),
    );
    reg.register(
        "tandem_volume_out_of_sync_bytes",
        "Bytes the replica lacks",
        family(s.replicas.iter().map(|r| (rep(r), r.out_of_sync_bytes as f64))),
    );
    reg.register(
        "tandem_volume_resync_bytes_per_second",
        "A running resync's recent rate",
        family(s.replicas.iter().filter_map(|r| r.resync_bytes_per_s.map(|v| (rep(r), v as f64)))),
    );
    reg.register(
        "tandem_volume_resync_remaining_bytes",
        "A running resync's bytes still to send",
        family(s.replicas.iter().filter_map(|r| r.resync_remaining_bytes.map(|v| (rep(r), v as f64)))),
    );
    reg.register(
        "tandem_volume_async_lag_bytes",
        "An async replica: bytes written and not yet acknowledged by it",
        family(s.replicas.iter().filter_map(|r| r.lag_bytes.map(|v| (rep(r), v as f64)))),
    );
    reg.register(
        "tandem_volume_reads",
        "Client reads given to a replica since its primary started (on the primary's own row: its disk)",
        totals(s.replicas.iter().filter_map(|r| r.reads.map(|n| (rep(r), n)))),
    );
    let vol = |v: &VolumeSample| labels(&[("volume", &v.volume)]);
    reg.register(
        "tandem_volume_read_errors",
        "Local read errors on the primary since it started (each repaired from an in-sync peer when it can be)",
        totals(s.volumes.iter().map(|v| (vol(v), v.read_errors))),
    );
    reg.register(
        "tandem_volume_repaired_blocks",
        "Blocks the primary rewrote from a peer's copy after a read error, and read back fine",
        totals(s.volumes.iter().map(|v| (vol(v), v.repaired_blocks))),
    );
    reg.register(
        "tandem_nbd_requests",
        "NBD requests served by this node's exports, by operation",
        c.nbd_requests.clone(),
    );
    reg.register("tandem_nbd_bytes", "Bytes moved by this node's NBD exports, by operation", c.nbd_bytes.clone());
    reg.register(
        "tandem_volume_write_seconds",
        "Writes to a volume exported here: seconds until on the local disk (at=local) or acknowledged by every sync replica too (at=replicated)",
        c.volume_write_seconds.clone(),
    );

    // ---- API ----
    reg.register(
        "tandem_api_requests",
        "API requests answered, by route template, method and status",
        c.api_requests.clone(),
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    to_text_format(&out)
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus's text
/// format 0.0.4, which `promtool check metrics` and every scraper read: a
/// counter's family is named with its `_total` suffix there, and there is
/// no `# UNIT` or `# EOF` line. Samples are the same in both.
pub fn to_text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open_metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Where each group is placed: node, phase and epoch.
pub type Placements = std::collections::BTreeMap<String, (Option<NodeId>, Phase, u64)>;

pub fn placements(state: &ClusterState) -> Placements {
    state
        .groups
        .values()
        .map(|g: &GroupRecord| (g.name.clone(), (g.placement.node, g.placement.phase, g.placement.epoch)))
        .collect()
}

/// A running group placed straight on another node: its node failed (and
/// was fenced or its lease ran out) or was removed. A switchover or a
/// failback goes through `stopping` and is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    pub group: String,
    pub from: NodeId,
    pub to: NodeId,
}

/// The failovers between two applied states. Only a change to the very next
/// epoch counts: two changes seen as one could be a stop then a start.
pub fn failovers(before: &Placements, after: &Placements) -> Vec<Failover> {
    after
        .iter()
        .filter_map(|(name, &(node, phase, epoch))| {
            let &(old_node, old_phase, old_epoch) = before.get(name)?;
            match (old_node, old_phase, node, phase) {
                (Some(from), Phase::Started, Some(to), Phase::Started) if to != from && epoch == old_epoch + 1 => {
                    Some(Failover { group: name.clone(), from, to })
                }
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            node: "n1".into(),
            raft: Some(RaftSample {
                is_leader: true,
                has_leader: true,
                voter: true,
                voters: 3,
                voters_heard: 2,
                term: 3,
                last_log_index: 42,
                committed_index: 41,
                applied_index: 40,
                quorum_ack_ms: Some(50),
            }),
            lease_left_s: 4.5,
            peers: vec![PeerSample {
                peer: "n2".into(),
                up: true,
                paths: vec![("10.0.0.2".into(), true), ("10.1.0.2".into(), false)],
                round_trip_s: Some(0.002),
            }],
            groups: vec![GroupSample { group: "web".into(), state: "failed", epoch: 7, here: true, restarts: Some(2) }],
            resources: vec![ResourceSample {
                group: "web".into(),
                resource: "srv".into(),
                kind: "process".into(),
                state: "recovering".into(),
                failed: true,
            }],
            replicas: vec![ReplicaSample {
                volume: "data".into(),
                replica: "n2".into(),
                role: "secondary".into(),
                disk: "Inconsistent".into(),
                connection: "SyncTarget".into(),
                out_of_sync_bytes: 4096,
                resync_bytes_per_s: Some(1000),
                resync_remaining_bytes: Some(4096),
                lag_bytes: None,
                reads: Some(12),
            }],
            volumes: vec![VolumeSample { volume: "data".into(), read_errors: 2, repaired_blocks: 1 }],
            heartbeats_dropped: vec![("forged", 3)],
        }
    }

    /// The value of `series` (written without the node label, which the
    /// registry puts first).
    fn sample(text: &str, series: &str) -> Option<f64> {
        let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
        let sep = if rest == "}" { "" } else { "," };
        let full = format!("{name}{{node=\"n1\"{sep}{rest}");
        text.lines().find_map(|l| l.strip_prefix(&full)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_family_renders_its_samples_with_the_node_label() {
        let c = Counters::default();
        c.count_request("GET", "/v1/groups/{name}", 200);
        c.count_request("GET", "/v1/groups/{name}", 200);
        c.count_failover("web", Some(3.5));
        c.leader_changes.inc();
        c.proposal_seconds.observe(0.003);
        c.nbd_requests.get_or_create(&labels(&[("volume", "data"), ("op", "write")])).inc_by(5);
        c.volume_write_seconds.get_or_create(&labels(&[("volume", "data"), ("at", "local")])).observe(0.0001);
        let t = render(&snapshot(), &c);
        let expect = [
            (r#"tandem_member"#, 1.0),
            (r#"tandem_raft_is_leader"#, 1.0),
            (r#"tandem_raft_has_leader"#, 1.0),
            (r#"tandem_raft_term"#, 3.0),
            (r#"tandem_raft_voters_heard"#, 2.0),
            (r#"tandem_raft_commit_index"#, 41.0),
            (r#"tandem_raft_applied_index"#, 40.0),
            (r#"tandem_raft_leader_changes_total"#, 1.0),
            (r#"tandem_raft_proposal_seconds_count"#, 1.0),
            (r#"tandem_lease_left_seconds"#, 4.5),
            (r#"tandem_peer_up{peer="n2"}"#, 1.0),
            (r#"tandem_path_up{peer="n2",address="10.1.0.2"}"#, 0.0),
            (r#"tandem_heartbeat_round_trip_seconds{peer="n2"}"#, 0.002),
            (r#"tandem_heartbeats_dropped_total{reason="forged"}"#, 3.0),
            (r#"tandem_group_state{group="web",state="failed"}"#, 1.0),
            (r#"tandem_group_state{group="web",state="running"}"#, 0.0),
            (r#"tandem_group_epoch{group="web"}"#, 7.0),
            (r#"tandem_group_restarts_total{group="web"}"#, 2.0),
            (r#"tandem_group_failovers_total{group="web"}"#, 1.0),
            (r#"tandem_group_last_outage_seconds{group="web"}"#, 3.5),
            (r#"tandem_resource_state{group="web",resource="srv",type="process",state="recovering"}"#, 1.0),
            (r#"tandem_resource_failed{group="web",resource="srv",type="process"}"#, 1.0),
            (r#"tandem_volume_disk_state{volume="data",replica="n2",role="secondary",state="Inconsistent"}"#, 1.0),
            (r#"tandem_volume_connection_state{volume="data",replica="n2",role="secondary",state="SyncTarget"}"#, 1.0),
            (r#"tandem_volume_out_of_sync_bytes{volume="data",replica="n2",role="secondary"}"#, 4096.0),
            (r#"tandem_volume_reads_total{volume="data",replica="n2",role="secondary"}"#, 12.0),
            (r#"tandem_volume_read_errors_total{volume="data"}"#, 2.0),
            (r#"tandem_volume_repaired_blocks_total{volume="data"}"#, 1.0),
            (r#"tandem_volume_resync_bytes_per_second{volume="data",replica="n2",role="secondary"}"#, 1000.0),
            (r#"tandem_nbd_requests_total{volume="data",op="write"}"#, 5.0),
            (r#"tandem_volume_write_seconds_count{volume="data",at="local"}"#, 1.0),
            (r#"tandem_api_requests_total{method="GET",route="/v1/groups/{name}",status="200"}"#, 2.0),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&t, series), Some(value), "{series} in\n{t}");
        }
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains(r#"node="n1""#), "a series without the node label: {line}");
        }
        assert!(t.contains("# TYPE tandem_group_failovers_total counter\n"), "{t}");
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"), "{t}");
    }

    #[test]
    fn a_non_member_shows_only_what_it_has() {
        let t = render(&Snapshot { node: "n9".into(), ..Default::default() }, &Counters::default());
        assert!(t.contains("tandem_member{node=\"n9\"} 0"), "{t}");
        assert!(!t.contains("tandem_raft_is_leader{"), "{t}");
    }

    #[test]
    fn the_text_format_names_counter_families_with_their_suffix() {
        let om = "# HELP a Apples.\n# TYPE a counter\na_total 1\n# HELP b Bees.\n# TYPE b gauge\n# UNIT b bees\nb 2\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP a_total Apples.\n# TYPE a_total counter\na_total 1\n# HELP b Bees.\n# TYPE b gauge\nb 2\n"
        );
    }

    #[test]
    fn only_a_running_group_placed_straight_elsewhere_is_a_failover() {
        let p = |rows: &[(&str, Option<NodeId>, Phase, u64)]| -> Placements {
            rows.iter().map(|(g, n, ph, e)| (g.to_string(), (*n, *ph, *e))).collect()
        };
        use Phase::*;
        let before = p(&[
            ("a", Some(1), Started, 4),
            ("b", Some(1), Started, 4),
            ("c", Some(1), Stopping, 4),
            ("d", Some(1), Started, 4),
            ("e", Some(1), Started, 4),
        ]);
        let after = p(&[
            ("a", Some(2), Started, 5),  // failed over
            ("b", Some(1), Stopping, 5), // a switchover begins
            ("c", Some(2), Started, 5),  // not from started
            ("d", Some(2), Started, 6),  // two changes seen at once
            ("e", Some(1), Started, 4),  // unchanged
            ("f", Some(2), Started, 1),  // new
        ]);
        assert_eq!(failovers(&before, &after), vec![Failover { group: "a".into(), from: 1, to: 2 }]);
    }
}
