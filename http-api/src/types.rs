//! Request and response bodies of the REST API. Requests refuse unknown
//! fields; responses only ever gain fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tandem_raft::state::AdminState;
use tandem_raft::NodeId;
use utoipa::ToSchema;

/// A node's part in consensus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Votes in elections and commits.
    Voter,
    /// Receives the log, does not vote; promoted when a voter is lost.
    Learner,
    /// A voter that never runs resources.
    Witness,
}

/// What a node is doing as seen from the answering node: its admin state
/// when it is heard from, `offline` when it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Online,
    Offline,
    Standby,
    Maintenance,
}

/// One network path to a node, as seen from the answering node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PathView {
    pub address: String,
    /// Heard from on this path within the node timeout.
    pub up: bool,
    /// Milliseconds since the last heartbeat on this path; null if never.
    pub last_seen_ms: Option<u64>,
}

/// A cluster member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub role: Role,
    pub state: NodeState,
    pub admin_state: AdminState,
    pub site: Option<String>,
    /// One IP address per network path.
    pub addresses: Vec<String>,
    /// Port of the node's API (TCP) and heartbeats (UDP).
    pub port: u16,
    /// The agent's process id, from its last heartbeat.
    pub pid: Option<u32>,
    /// The agent's version, from its last heartbeat.
    pub version: Option<String>,
    pub leader: bool,
    pub paths: Vec<PathView>,
    pub attributes: BTreeMap<String, String>,
    /// The node's lease as the answering node sees it, ms left (0: lapsed):
    /// for the answering node, its own; for another, what a majority of
    /// voters' hearing can still give it (`fencing.lease_ms` minus the time
    /// since a majority last heard it). Null when no majority ever heard it.
    #[serde(default)]
    pub lease_ms_left: Option<u64>,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    pub cluster_id: String,
    /// Name of the leader, null while there is none.
    pub leader: Option<String>,
    pub term: u64,
    /// Index of the last log entry applied on the answering node.
    pub applied_index: Option<u64>,
    pub members: Vec<NodeView>,
}

/// `POST /v1/nodes`: a node asking to join (normally sent by
/// `tandem cluster join`, which fills it from the agent's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub name: String,
    /// One IP address per network path, preferred first.
    pub addresses: Vec<String>,
    pub port: u16,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub witness: bool,
    /// PEM certificate signing request for the node's own key: the leader
    /// answers the join by adopting the node with a certificate for it.
    #[serde(default)]
    pub csr: Option<String>,
    /// Instead of `csr`, in a cluster whose CA is the operator's
    /// (`[tls] ca_file`): the node's own PEM certificate, which the leader
    /// checks against that CA and pins by its key.
    #[serde(default)]
    pub certificate: Option<String>,
}

/// `POST /v1/cluster/init`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// Name of the new cluster; generated when absent.
    #[serde(default)]
    pub cluster_id: Option<String>,
}

/// `POST /v1/cluster/join`: make this agent join the cluster at `via`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinViaRequest {
    /// Base URL of any member's API, e.g. `https://10.0.0.1:7401`.
    pub via: String,
    /// A join token (`tandem cluster join-token` on a member).
    #[serde(default)]
    pub token: Option<String>,
    /// The cluster CA's pin, `sha256:<hex>`: checked before anything is sent.
    #[serde(default)]
    pub ca_hash: Option<String>,
}

/// `PUT /v1/nodes/{name}/attributes/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttributeValue {
    pub value: String,
}

/// `GET /v1/local`: the answering agent itself, member or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LocalView {
    pub name: String,
    pub node_id: Option<NodeId>,
    pub cluster_id: Option<String>,
    pub addresses: Vec<String>,
    pub port: u16,
    pub site: Option<String>,
    pub witness: bool,
    pub pid: u32,
    pub version: String,
    /// Name of the leader as this node knows it.
    pub leader: Option<String>,
    /// Base URL of the leader's API as this node knows it.
    pub leader_url: Option<String>,
    pub term: Option<u64>,
    pub applied_index: Option<u64>,
    /// Last log index covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Log entries up to this index have been purged behind the snapshot.
    pub purged_index: Option<u64>,
    /// Heartbeat datagrams this agent dropped since it started, per reason.
    #[serde(default)]
    pub heartbeats_dropped: HeartbeatsDropped,
    /// The heartbeat key generation this node seals with (none: the
    /// cluster's heartbeats are not sealed yet), and whether the key
    /// before it is still accepted (for some seconds after a rotation).
    #[serde(default)]
    pub heartbeat_key_generation: Option<u32>,
    #[serde(default)]
    pub heartbeat_previous_key_accepted: bool,
}

/// Heartbeat datagrams dropped, per reason; none of them counted as
/// hearing a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatsDropped {
    /// Wrong tag, or unsealed while the cluster has a key.
    pub forged: u64,
    /// Not newer than the last datagram of the same sender on its path.
    pub replayed: u64,
    /// Echoing no recent heartbeat of this agent, from an older agent of
    /// the sender.
    pub stale: u64,
    /// Not a heartbeat frame.
    pub malformed: u64,
    /// Sealed under a key this node does not hold (yet).
    pub unknown_key: u64,
    /// Authentic, but for another cluster or node.
    pub misdirected: u64,
}

/// Internal: the leader tells a joining agent who it now is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    /// The node's certificate, signed by the cluster CA for the key of the
    /// join's signing request (PEM).
    #[serde(default)]
    pub certificate: String,
    /// The cluster CA's certificate (PEM).
    #[serde(default)]
    pub ca: String,
}

/// Internal: the leader tells a removed agent to forget its membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub cluster_id: String,
    pub node_id: NodeId,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// A resource group: its definition and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    pub name: String,
    /// The definition as given to `PUT /v1/groups/{name}`.
    #[schema(value_type = Object)]
    pub spec: tandem_raft::group::GroupSpec,
    /// Node the group is placed on, null when stopped.
    pub node: Option<String>,
    /// `running`, `stopping`, `moving`, `stopped` or `failed`.
    pub state: String,
    /// False after `/stop`.
    pub enabled: bool,
    /// The fencing token: grows on every placement change.
    pub epoch: u64,
    /// Why the last placement change happened.
    pub reason: String,
    /// Nodes where the group failed past its restart threshold (until `/clear`).
    pub failed_on: Vec<String>,
    /// Switchover target, until the group starts there.
    pub move_to: Option<String>,
    /// Local restarts since the group started on its node (GET of one
    /// group only; null in lists or when its node does not answer).
    #[serde(default)]
    pub restarts: Option<u32>,
    /// Each resource as the node running the group sees it (GET of one
    /// group only; null in lists or when its node does not answer).
    #[serde(default)]
    pub resources: Option<Vec<ResourceView>>,
}

/// One resource of a group, as the node running it sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourceView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `starting`, `running`, `recovering` (stopping before a local
    /// restart) or `stopped` (not started yet, or waiting for the one
    /// before it).
    pub state: String,
    /// The process id, for a `process` resource.
    pub pid: Option<u32>,
    /// Why it last failed on this node.
    pub last_error: Option<String>,
    /// A condition worth attention that is not a failure: a file system
    /// 95 % full or more (`file system full: 0 of 1.0 GiB free`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A load balancer's answer (`/v1/groups/{name}/health`,
/// `/v1/volumes/{name}/primary`, `/v1/volumes/{name}/replica`): whether
/// this node serves, and why (not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServingView {
    pub serving: bool,
    /// This node's name.
    pub node: String,
    /// `running here`, `not placed here`, `lease not held`, ...
    pub reason: String,
}

/// Internal: what a node runs of a group (`GET /internal/groups/{name}/local`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LocalGroupStatus {
    pub epoch: u64,
    pub restarts: u32,
    pub resources: Vec<ResourceView>,
}

/// `POST /v1/cluster/recover`: `confirm` is the cluster's id (required
/// unless `?dry_run=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    #[serde(default)]
    pub confirm: Option<String>,
}

/// Where a group would run after a recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecoverGroup {
    pub group: String,
    /// Where it is placed now (null: nowhere).
    pub node: Option<String>,
    /// Where the scheduler would run it with only the survivor up (null:
    /// nowhere, `reason` says why).
    pub would_run_on: Option<String>,
    pub reason: String,
}

/// What a recovery did, or would do (`dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecoverReport {
    pub cluster_id: String,
    /// The node recovering: the single voter of the new incarnation.
    pub node: String,
    pub dry_run: bool,
    /// The incarnation the cluster becomes (recoveries so far, plus one).
    pub incarnation: u64,
    /// The last log entry this node holds, and the newest index it knew
    /// committed: the entries between are committed by the recovery
    /// (`entries_committed_by_recovery`), though no majority may have had
    /// them.
    pub log_index: u64,
    pub log_term: u64,
    pub committed_index: u64,
    pub entries_committed_by_recovery: u64,
    /// The voters before, those that answered the probe, and those dropped
    /// (superseded: refused until removed and joined again).
    pub voters: Vec<String>,
    pub reachable: Vec<String>,
    pub dropped: Vec<String>,
    pub groups: Vec<RecoverGroup>,
    /// Volumes whose only up-to-date replica was on a dropped node: they
    /// cannot run until a forced promotion or that node's return.
    pub volumes_without_up_to_date_replica: Vec<String>,
    /// What the recovered cluster will lack (e.g. the CA's key, without
    /// which no node can join or renew its certificate).
    pub warnings: Vec<String>,
}

/// `GET /v1/sites`: a site and its nodes (the nodes that name it in their
/// `site`), and the groups running there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SiteView {
    pub name: String,
    pub nodes: Vec<NodeView>,
    /// Groups placed on a node of the site now.
    pub groups: Vec<String>,
}

/// `POST /v1/sites/{site}/switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// How long to wait for the groups to run elsewhere, seconds (1 to 25,
    /// default 20); the report then says which are still moving.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// What a site switchover did to one group that ran in the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SiteGroupReport {
    pub group: String,
    /// Where it ran before.
    pub from: String,
    /// Where it runs now (null: not running).
    pub to: Option<String>,
    /// `moved` (running outside the site), `moving` (not yet, at the
    /// timeout), `stopped` (no node outside the site may run it) or
    /// `failed`.
    pub result: String,
    /// The outage the node that started it measured (last stop to running).
    pub outage_ms: Option<u64>,
    /// The group's volume, if any.
    pub volume: Option<String>,
    /// For a volume: the bytes the new primary lacked before the move, as
    /// the old primary's view said (0 for an up-to-date sync replica: no
    /// acknowledged write lost). Null without a volume or when unknown.
    pub rpo_bytes: Option<u64>,
    /// The scheduler's last reason for the group's placement.
    pub reason: String,
}

/// The outcome of `POST /v1/sites/{site}/switchover`: the site's nodes are
/// left in standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SwitchoverReport {
    pub site: String,
    /// When it began (ms since the epoch) and how long it took.
    pub started_ms: u64,
    pub took_ms: u64,
    /// Every group that could run elsewhere does.
    pub complete: bool,
    pub groups: Vec<SiteGroupReport>,
}

/// `POST /v1/groups/{name}/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub to: String,
}

/// Internal: a node tells the leader what happened to a group placed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupEvent {
    Stopped,
    Failed,
    /// A stop failed: the group may still run there (escalated to fencing
    /// when the cluster has a fence command).
    StopFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupReport {
    pub node: NodeId,
    pub epoch: u64,
    pub event: GroupEvent,
}

/// A node's claim to start a group placed on it at `epoch`
/// (`POST /internal/groups/{name}/claim`): committed, the epoch grows;
/// refused if the placement moved meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub node: NodeId,
    pub epoch: u64,
}

/// What `POST /v1/groups/{name}/{action}` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAction {
    Start,
    Stop,
    Clear,
}

/// How a replica's connection to the primary stands, seen from the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ConnectionState {
    /// In sync, writes flow.
    Connected,
    /// This side sends a resync.
    SyncSource,
    /// This side receives a resync.
    SyncTarget,
    /// An async peer that fell out of its buffer: tracked in the bitmap.
    Ahead,
    Disconnected,
    /// Both sides changed since their common generation; waits for a policy
    /// or the operator (`POST /v1/volumes/{name}/resolve`).
    SplitBrain,
}

/// Progress of a running resync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResyncProgress {
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Bytes sent so far by this resync.
    pub sent_bytes: u64,
    /// Bytes the resync started with.
    pub total_bytes: u64,
    /// Rate over the last 2 s, bytes per second.
    pub rate_bytes_per_s: u64,
    /// Seconds to completion at the recent rate; null before a rate is known.
    pub eta_s: Option<f64>,
    /// The rate the resync aims at now: the adaptive controller's (it
    /// changes with the application's load), or a fixed resync's `rate`;
    /// null: a fixed resync without one. Older agents leave it out.
    #[serde(default)]
    pub target_rate_bytes_per_s: Option<u64>,
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaView {
    pub node: String,
    /// `primary` or `secondary`.
    pub role: String,
    /// `UpToDate`, `Inconsistent`, `Outdated` or `Diskless`.
    pub disk: String,
    pub connection: ConnectionState,
    /// `sync` or `async` (null for the primary).
    pub mode: Option<String>,
    /// Bytes this replica lacks (its bits in the primary's bitmap).
    pub out_of_sync_bytes: u64,
    pub resync: Option<ResyncProgress>,
    /// Async peers: bytes written locally and not yet acknowledged by it.
    pub lag_bytes: Option<u64>,
    /// Why it is disconnected or refused, when it is.
    pub last_error: Option<String>,
    /// Client reads it was given since its primary started: on the
    /// primary's own row those its disk served, on a peer's those sent to it
    /// (read balancing, bad-block repair, a `Diskless` primary).
    #[serde(default)]
    pub reads: u64,
}

/// What one node's data plane knows about a volume
/// (`GET /internal/volumes/{name}/local`). From the primary it covers every
/// replica; from a secondary only itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LocalVolumeStatus {
    pub name: String,
    /// `primary` or `secondary`.
    pub role: String,
    pub size_bytes: u64,
    /// The export as an NBD URI, on the primary.
    pub nbd: Option<String>,
    pub replicas: Vec<ReplicaView>,
    /// The current data generation (hex).
    pub generation: String,
    /// Last online verify on this primary, if any.
    pub verify: Option<VerifyReport>,
    /// When this replica's data last changed (its backing file's
    /// modification time, ms since the Unix epoch): on a secondary cut off
    /// from its primary, the newest write it received.
    #[serde(default)]
    pub newest_write_ms: Option<u64>,
    /// The primary's read balancing policy.
    #[serde(default)]
    pub read_balancing: Option<String>,
    /// Local read errors on the primary since it started.
    #[serde(default)]
    pub read_errors: u64,
    /// Blocks the primary rewrote from a peer's copy after a read error.
    #[serde(default)]
    pub repaired_blocks: u64,
}

/// Outcome of an online verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    /// `running` or `done` or `failed`.
    pub state: String,
    pub checked_bytes: u64,
    /// Blocks whose digests differed, per replica node.
    pub found_blocks: BTreeMap<String, u64>,
    /// Of those, blocks resynced so far.
    pub repaired_blocks: BTreeMap<String, u64>,
    pub error: Option<String>,
}

/// `POST /v1/volumes/{name}/resolve`: the replica whose changes are thrown
/// away after a split brain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    pub discard: String,
}

/// A replicated volume (`GET /v1/volumes/{name}`): its replicas and their
/// recorded disk states from the replicated state, merged with the live
/// status of its primary's data plane (when the primary answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeView {
    /// The volume's name: its resource's name, unique in the cluster.
    pub name: String,
    /// The group the volume belongs to.
    pub group: String,
    /// The size clients get: the primary's export (a new NBD connection
    /// sees it; one made before an online grow keeps the size it
    /// negotiated until it reconnects). Without a primary: the defined size.
    pub size_bytes: u64,
    /// While an online grow is under way: the defined size, which the
    /// export reaches once every connected replica has grown to it (a
    /// disconnected one grows when it reconnects). Null otherwise.
    #[serde(default)]
    pub growing_to_bytes: Option<u64>,
    /// How secondaries receive writes unless overridden per node: `sync`
    /// or `async` (each replica shows its own `mode`).
    pub mode: String,
    /// The node where the group runs, which serves the volume; null while
    /// the group is not running.
    pub primary: Option<String>,
    /// The export as an NBD URI, from the primary.
    pub nbd: Option<String>,
    /// One per replica node, in the group's `nodes` order. `disk` and
    /// `connection` are live from the primary; when it does not answer,
    /// `disk` is the recorded state and `connection` is `Disconnected` with
    /// `last_error` saying why.
    pub replicas: Vec<ReplicaView>,
    /// The primary's current data generation (hex).
    pub generation: Option<String>,
    /// The last online verify on the primary.
    pub verify: Option<VerifyReport>,
    /// Each replica's disk state as the replicated state records it, by node:
    /// the group only ever starts on a replica recorded `UpToDate`.
    pub recorded_disks: BTreeMap<String, String>,
    /// Which replica serves reads on the primary (the definition's
    /// `read_balancing`).
    #[serde(default)]
    pub read_balancing: String,
    /// Local read errors on the primary since it started (null without a
    /// live primary). Each is repaired from an in-sync peer when it can be;
    /// the disk is detached past 8 within 60 s or when a repair fails.
    #[serde(default)]
    pub read_errors: Option<u64>,
    /// Blocks the primary rewrote from a peer's copy after a read error and
    /// read back fine (null without a live primary).
    #[serde(default)]
    pub repaired_blocks: Option<u64>,
}

/// `POST /v1/volumes/{name}/promote`: the replica to promote by force and,
/// unless `?dry_run=true`, `confirm` set to the volume's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The node whose replica becomes the volume's data (optional in a dry
    /// run: every candidate is reported).
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub confirm: Option<String>,
}

/// One replica a forced promotion could take, and what taking it gives up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromoteCandidate {
    pub node: String,
    /// Its recorded disk: only an `Outdated` one can be promoted by force.
    pub disk: String,
    /// Its node is online (heard by a majority).
    pub online: bool,
    /// Bytes the last primary recorded it lacks (its bitmap for this
    /// replica), as of `out_of_sync_recorded_ms`. Writes acknowledged after
    /// that moment and before the primary was lost are not counted.
    pub out_of_sync_bytes: u64,
    /// When the primary recorded `out_of_sync_bytes` (ms since the Unix
    /// epoch); null when it recorded none.
    pub out_of_sync_recorded_ms: Option<u64>,
    /// When this replica last received a write (ms since the Unix epoch),
    /// and how long ago that was; null when its node did not answer.
    pub newest_write_ms: Option<u64>,
    pub newest_write_age_ms: Option<u64>,
    /// Its data generation (hex), as its node reports it.
    pub generation: Option<String>,
    /// Why it cannot be promoted now (null: it can).
    pub refused: Option<String>,
}

/// What a forced promotion did, or would do (`dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromoteReport {
    pub volume: String,
    pub group: String,
    pub dry_run: bool,
    /// The replica promoted (null in a dry run without `node`).
    pub node: Option<String>,
    pub candidates: Vec<PromoteCandidate>,
    /// Replicas recorded `UpToDate` now (on offline nodes, or the group
    /// would not need forcing): they become `Outdated`.
    pub outdated: Vec<String>,
    /// What happens to their newer data when they come back: the volume's
    /// split-brain policy, in words.
    pub newer_data: String,
    pub split_brain_policy: String,
}

/// Internal: a recovered cluster's leader tells a member it superseded
/// (`POST /internal/superseded`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupersededNotice {
    /// The leader telling.
    pub by: String,
    pub incarnation: u64,
}

/// Internal: a volume's primary records each tracked replica's
/// out-of-sync bytes (`POST /internal/volumes/{name}/out-of-sync`,
/// forwarded to the leader, which proposes `RecordOutOfSync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutOfSyncReport {
    pub epoch: u64,
    pub bytes: BTreeMap<String, u64>,
    pub at_ms: u64,
}

/// Internal: a volume's primary records what a replica's disk holds
/// (`POST /internal/volumes/{name}/disk`, forwarded to the leader, which
/// proposes `SetReplicaDisk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaDiskReport {
    /// The replica's node.
    pub node: String,
    pub disk: tandem_raft::volume::DiskState,
    /// The group's placement epoch the primary holds.
    pub epoch: u64,
    /// The replica's replacement number, as it told the primary (see
    /// `POST /v1/volumes/{name}/replicas/{node}/replace`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replaced: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

// ---- security ----

/// `POST /v1/cluster/init`'s answer: the node, and the first admin token
/// (shown this once; also written to `<data_dir>/admin.token`, mode 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InitView {
    #[serde(flatten)]
    pub node: LocalView,
    pub admin_token: String,
    /// The cluster CA's pin for `tandem cluster join --ca-hash`.
    pub ca_hash: String,
    /// The cluster CA's certificate (PEM), for `curl --cacert`.
    pub ca_pem: String,
}

/// `GET /v1/session`: who the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// As the audit log names it: `token:<name>`, `cert:<name>`, `node:<name>`, `local:uid=<n>`.
    pub who: String,
    /// `viewer`, `operator` or `admin` (`node` for a node certificate,
    /// `local` on the admin socket).
    pub role: String,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub name: String,
    pub role: tandem_raft::access::Role,
    /// Seconds until it expires; never when absent.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub name: String,
    pub role: tandem_raft::access::Role,
    /// Unix time, ms.
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub created_by: String,
}

/// `POST /v1/tokens`' answer: the secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub view: TokenView,
    pub token: String,
}

/// `POST /v1/cluster/join-token`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// Seconds the token is valid (default 3600, at most 86400).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// A join token with the CA pin to give `tandem cluster join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenView {
    pub name: String,
    pub token: String,
    pub ca_hash: String,
    pub expires_ms: u64,
}

/// `GET /v1/cluster/ca`: public; pin it with `ca_hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CaView {
    pub ca_pem: String,
    pub ca_hash: String,
}

/// Internal: a member renews its certificate (same key or a new one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
}

/// Internal: a certificate, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CertificateView {
    pub certificate: String,
}

/// `POST /v1/certificates`: a client certificate for a person or a tool.
/// With the cluster's own CA, send `csr` (the key stays with the client)
/// and get the certificate back; with an operator's CA (`[tls] ca_file`),
/// send the `certificate` that CA issued, to be recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    pub name: String,
    pub role: tandem_raft::access::Role,
    /// PEM certificate signing request (the cluster's own CA).
    #[serde(default)]
    pub csr: Option<String>,
    /// PEM certificate issued by the operator's CA (`[tls] ca_file`).
    #[serde(default)]
    pub certificate: Option<String>,
    /// Days the signed certificate is valid: default 365, at most 3650
    /// (with `csr` only).
    #[serde(default)]
    pub days: Option<u32>,
}

/// A recorded client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientCertView {
    pub name: String,
    pub role: tandem_raft::access::Role,
    /// `sha256:<hex>` of the certificate's SubjectPublicKeyInfo.
    pub spki: String,
    /// Serial number, hex.
    pub serial: String,
    /// Unix time, ms: when the certificate expires.
    pub not_after_ms: u64,
    /// Unix time, ms.
    pub created_ms: u64,
    pub created_by: String,
}

/// `POST /v1/certificates`' answer: the record and the certificate, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClientCertCreated {
    #[serde(flatten)]
    pub view: ClientCertView,
    pub certificate: String,
}

/// Internal: a member of an operator-CA cluster whose certificate file
/// changed to a new key pins the new certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCertRequest {
    pub certificate: String,
}

/// Internal: the CA key, handed to a voter only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaKeyView {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Internal: events a node observed, handed to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    pub events: Vec<tandem_raft::events::Event>,
}

/// `GET /v1/events`: a page of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    /// Matching events after `since`, oldest first.
    pub events: Vec<tandem_raft::events::Event>,
    /// Ask `?since=` this next time (filtered-out events are skipped too).
    pub next: u64,
    /// Set when events after `since` are gone (retention): the oldest id
    /// still kept. The events between were lost to this reader.
    pub reset: Option<u64>,
}

/// One Server-Sent Event of `GET /v1/events/stream`, as an SSE client
/// parses it (documentation only: the wire format is SSE's text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamMessage {
    /// The event's id (absent on `reset`).
    pub id: Option<String>,
    /// `message` for an event, `reset` when events were lost to retention.
    pub event: Option<String>,
    /// The event as JSON (an `Event`), or `{"first_id", "asked"}` on `reset`.
    pub data: String,
    pub retry: Option<u64>,
}

/// Internal: audit entries a node hands to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBatch {
    pub entries: Vec<tandem_raft::access::AuditEntry>,
}

/// An alert as any view shows it: its definition with secrets replaced by
/// `(set)`, what its sender is done with, and (from the leader) how
/// delivery goes now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertView {
    pub name: String,
    pub spec: tandem_raft::alerts::AlertSpec,
    /// Unix ms.
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Who defined it last.
    pub by: String,
    /// The last event id its sender is done with (sent, or filtered out).
    pub cursor: u64,
    /// Events sent (recorded through Raft; a leader change may re-send a
    /// few, never fewer).
    pub sent: u64,
    /// When the last status report went out (Unix ms; its definition's time
    /// before the first).
    pub report_ms: u64,
    /// The leader's sender now; absent when this answer did not come from
    /// the leader (`?stale=true` on a follower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<AlertDelivery>,
}

/// How the leader's sender of one alert is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertDelivery {
    /// `ok` (nothing pending or sending), `retrying` (the target failed;
    /// retried with backoff).
    pub state: String,
    /// Failed attempts in a row.
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix ms of the first failure of this run, and of the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent_ms: Option<u64>,
}

/// `POST /v1/alerts/{name}/test`'s answer: the target took the test alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AlertTested {
    pub name: String,
    /// How long the delivery took, ms.
    pub ms: u64,
}

/// `GET /v1/ticket`: this cluster's part in the ticket between two sites,
/// as its leader sees it (docs/dr.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketView {
    /// This cluster's site in the ticket.
    pub site: String,
    /// Whether this site holds the ticket now: a majority of the three
    /// grantors lent it for a lease that has not run out (less the margin).
    pub holds: bool,
    /// How long it still holds it without a renewal, ms.
    pub left_ms: u64,
    /// Whether this site asks for the ticket (`[ticket] acquire`, then
    /// `POST /v1/ticket/acquire|release` on this leader).
    pub wanted: bool,
    /// The site this cluster's own grantor lends the ticket to now.
    pub lent_to: Option<String>,
    /// The three grantors' last answers to this leader.
    pub grantors: Vec<TicketGrantorView>,
}

/// One grantor's last answer to this site's leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketGrantorView {
    pub name: String,
    /// It lent the ticket to this site in its last answer.
    pub granted: bool,
    /// The site it lends to instead, when it refused.
    pub holder: Option<String>,
    /// Why its last answer did not arrive (unreachable, refused…).
    pub error: Option<String>,
    /// When its last answer (or failure) came, ms ago.
    pub answered_ms_ago: Option<u64>,
}
