//! The node agent: owns this node's Raft instance, its liveness view and the
//! membership workflows (bootstrap, join, adopt, remove, autopilot), and
//! serves the REST API through [`tandem_http_api::Backend`].
//!
//! This is the imperative shell: it talks to disks, sockets and clocks, and
//! hands every decision to a pure module (`state` for commands, `autopilot`
//! for voters). Membership changes are serialised by one lock, because
//! openraft refuses overlapping ones and a half-done join must not race a
//! removal.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use tandem_http_api::{
    AdoptRequest, ApiError, Backend, ClusterView, ErrorBody, GroupAction, GroupEvent, GroupReport, GroupView,
    InitRequest, JoinRequest, JoinViaRequest, LocalGroupStatus, LocalView, NodeState, NodeView, PathView,
    ReleaseRequest, ResourceView, Role, Route,
};
use tandem_raft::group::{GroupRecord, GroupSpec, Phase};
use tandem_raft::network::Network;
use tandem_raft::state::{api_urls, validate_name, AdminState, ClusterState, Command, NodeRecord, NodeSpec, Reply};
use tandem_raft::store::{Db, Identity, StateHandle};
use tandem_raft::{NodeId, Peer, Raft, RaftMetrics, VersionedCommand};
use tracing::Instrument;

use crate::autopilot::{self, Candidate};
use crate::config::Config;
use crate::executor::{Executor, Fence, Report};
use crate::liveness::{HeartbeatSockets, Liveness};
use crate::scheduler::{NodeInfo, Scheduler};
use crate::watchdog::{now_boot_ms, Lease, RunDir};

/// Longest wait for a write or a linearizable read to be confirmed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a peer agent's answer during join / remove.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a new leader after the old one handed over.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Join retry backoff bounds for `join = [...]` in the config.
const JOIN_BACKOFF_MIN: Duration = Duration::from_millis(500);
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How often the executor and the leader's scheduler run.
const GROUP_TICK: Duration = Duration::from_millis(100);
/// The least time between two rounds of a loop woken by state changes.
const CHANGE_GAP: Duration = Duration::from_millis(10);
/// How long after a failed fence attempt the leader tries again.
const FENCE_RETRY: Duration = Duration::from_secs(2);
/// How often the leader's scheduler looks at liveness: a dead node's
/// groups move at most this long after its fencing wait ends (changes to
/// the state wake it at once).
const SCHEDULER_TICK: Duration = Duration::from_millis(50);
/// How often the lease is checked (fencing acts within this of expiry).
/// How long a group's GET waits for the node running it to describe its
/// resources (the answer goes without them past that).
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);
const LEASE_TICK: Duration = Duration::from_millis(100);

/// Minutes since local midnight, for failback windows.
fn local_minute_of_day() -> u16 {
    // SAFETY: localtime_r only writes the struct we pass.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        (tm.tm_hour * 60 + tm.tm_min) as u16
    }
}

/// This node's membership: present once bootstrapped or adopted.
pub struct Member {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub raft: Raft,
    pub state: StateHandle,
}

impl Member {
    fn metrics(&self) -> RaftMetrics {
        // Clone at once: holding the watch guard would block openraft.
        self.raft.metrics().borrow().clone()
    }
}

pub struct Agent {
    cfg: Config,
    db: Db,
    liveness: Arc<Liveness>,
    member: RwLock<Option<Arc<Member>>>,
    http: reqwest::Client,
    membership_lock: tokio::sync::Mutex<()>,
    /// Runs the groups placed on this node; present while a member.
    executor: tokio::sync::Mutex<Option<Executor>>,
    /// The lease and the resource processes the lease timer kills when it
    /// runs out.
    fence: Arc<Fence>,
    /// The lease files and the records of what runs here.
    run: RunDir,
    /// Set when the lease ran out with something running: the executor
    /// fences before anything else.
    lapsed: std::sync::atomic::AtomicBool,
    /// Whether this node stopped heartbeating because it is cut off from a
    /// leader that a majority still hears (see `heartbeat_round`).
    stepped_out: std::sync::atomic::AtomicBool,
    /// The last leader this node knew (0: none yet): a candidate knows
    /// none, and must not step back in for that alone.
    last_leader: std::sync::atomic::AtomicU64,
    /// On the leader, with a fence command: one attempt per silent node.
    fence_ops: std::sync::Mutex<BTreeMap<NodeId, FenceOp>>,
    /// Live nodes to fence all the same (a stop failed there), until they
    /// go silent.
    escalated: std::sync::Mutex<BTreeSet<NodeId>>,
    /// The volume replicas on this node.
    pub(crate) volumes: Arc<crate::volume::manager::VolumeManager>,
}

/// One run of the fence command against a silent node.
struct FenceOp {
    started: Instant,
    /// None while it runs.
    result: Arc<std::sync::Mutex<Option<Result<(), String>>>>,
}

fn storage_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::Storage(e.to_string())
}

fn fatal_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("raft stopped: {e}"))
}

/// A cluster id nobody else will pick: 16 random hex digits.
fn new_cluster_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("tandem-{:016x}", h.finish())
}

impl Agent {
    pub fn new(cfg: Config, db: Db, liveness: Arc<Liveness>) -> Result<Agent, reqwest::Error> {
        let http = reqwest::Client::builder().no_proxy().connect_timeout(Duration::from_secs(2)).build()?;
        // A restarted agent holds the lease its predecessor held (and adopts
        // what it ran): never longer, never renewed but from a majority heard.
        let run = RunDir::new(&cfg.data_dir, cfg.fencing.watchdog_device.clone());
        let inherited = match run.read_lease() {
            Lease::Until(d) => d,
            Lease::Released | Lease::Missing => 0,
        };
        Ok(Agent {
            cfg,
            db,
            liveness,
            member: RwLock::new(None),
            http,
            membership_lock: tokio::sync::Mutex::new(()),
            executor: tokio::sync::Mutex::new(None),
            fence: Arc::new(Fence::new(inherited)),
            run,
            lapsed: false.into(),
            stepped_out: false.into(),
            last_leader: 0.into(),
            fence_ops: Default::default(),
            escalated: Default::default(),
            volumes: Default::default(),
        })
    }

    pub fn member(&self) -> Option<Arc<Member>> {
        self.member.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn require_member(&self) -> Result<Arc<Member>, ApiError> {
        self.member().ok_or(ApiError::NotMember)
    }

    fn my_urls(&self) -> Vec<String> {
        api_urls(&self.cfg.addresses, self.cfg.port)
    }

    /// Starts Raft for an identity found on disk or just assigned.
    pub async fn start_member(&self, identity: &Identity) -> anyhow::Result<Arc<Member>> {
        let r = &self.cfg.raft;
        let config = openraft::Config {
            cluster_name: identity.cluster_id.clone(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
            // Purge happens once per snapshot anyway; no reason to lag behind it.
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .context("raft configuration")?;
        let network =
            Network::new(identity.cluster_id.clone(), Duration::from_millis(500)).context("raft network client")?;
        let (log, sm, state) = self.db.raft_storage().context("opening raft storage")?;
        // A root span: Raft's tasks outlive the API request that may start them.
        let span = tracing::info_span!(parent: None, "raft", node_id = identity.node_id);
        let raft = Raft::new(identity.node_id, Arc::new(config), network, log, sm)
            .instrument(span)
            .await
            .context("starting raft")?;
        let m = Arc::new(Member { node_id: identity.node_id, cluster_id: identity.cluster_id.clone(), raft, state });
        *self.executor.lock().await = Some(Executor::new(
            identity.node_id,
            self.cfg.name.clone(),
            self.cfg.data_dir.clone(),
            self.fence.clone(),
            self.run.clone(),
        ));
        *self.member.write().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
        tracing::info!(node_id = identity.node_id, cluster_id = %identity.cluster_id, "raft started");
        Ok(m)
    }

    /// Stops Raft and forgets the membership (after leaving or on exit).
    async fn stop_member(&self, wipe: bool) -> Result<(), ApiError> {
        if let Some(mut ex) = self.executor.lock().await.take() {
            ex.stop_all().await;
        }
        let m = self.member.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(m) = m {
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
        if wipe {
            self.db.wipe().map_err(storage_err)?;
        }
        Ok(())
    }

    /// Stops every resource, then gives the lease up: the watchdog exits.
    pub async fn shutdown(&self) {
        let _ = self.stop_member(false).await;
        self.volumes.shutdown().await;
        if let Err(e) = self.run.write_lease(Lease::Released) {
            tracing::warn!("cannot release the lease: {e}");
        }
    }

    // ---- Raft wrappers: every openraft error becomes an ApiError here ----

    async fn propose(&self, m: &Member, cmd: Command) -> Result<Reply, ApiError> {
        match tokio::time::timeout(COMMIT_TIMEOUT, m.raft.client_write(VersionedCommand::new(cmd))).await {
            Err(_) => Err(ApiError::QuorumUnavailable(format!(
                "not committed within {}s; the write may still be applied",
                COMMIT_TIMEOUT.as_secs()
            ))),
            Ok(Ok(resp)) => resp.data.0.map_err(ApiError::from),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(ApiError::NoLeader),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(membership_err(e)),
            Ok(Err(RaftError::Fatal(e))) => Err(fatal_err(e)),
        }
    }

    async fn change_voters(
        &self,
        m: &Member,
        change: ChangeMembers<NodeId, Peer>,
        retain: bool,
    ) -> Result<(), ApiError> {
        match tokio::time::timeout(COMMIT_TIMEOUT * 2, m.raft.change_membership(change, retain)).await {
            Err(_) => Err(ApiError::QuorumUnavailable("membership change not committed in time".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(ApiError::NoLeader),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(membership_err(e)),
            Ok(Err(RaftError::Fatal(e))) => Err(fatal_err(e)),
        }
    }

    async fn add_learner(&self, m: &Member, id: NodeId, peer: Peer) -> Result<(), ApiError> {
        match tokio::time::timeout(COMMIT_TIMEOUT, m.raft.add_learner(id, peer, false)).await {
            Err(_) => Err(ApiError::QuorumUnavailable("learner not added in time".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(ApiError::NoLeader),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(membership_err(e)),
            Ok(Err(RaftError::Fatal(e))) => Err(fatal_err(e)),
        }
    }

    /// Read-index through the leader: after this, local state is at least as
    /// new as anything committed before the call.
    async fn linearize(&self, m: &Member) -> Result<(), ApiError> {
        match tokio::time::timeout(COMMIT_TIMEOUT, m.raft.ensure_linearizable()).await {
            Err(_) => Err(ApiError::QuorumUnavailable("read index not confirmed in time".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => Err(ApiError::NoLeader),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(ApiError::QuorumUnavailable(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(fatal_err(e)),
        }
    }

    async fn read_member(&self, stale: bool) -> Result<Arc<Member>, ApiError> {
        let m = self.require_member()?;
        if !stale {
            self.linearize(&m).await?;
        }
        Ok(m)
    }

    // ---- views ----

    fn view(&self, m: &Member, rec: &NodeRecord, metrics: &RaftMetrics, now: Instant) -> NodeView {
        let membership = metrics.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == rec.id);
        let role = match (voter, rec.witness) {
            (true, true) => Role::Witness,
            (true, false) => Role::Voter,
            (false, _) => Role::Learner,
        };
        let me = rec.id == m.node_id;
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let status = self.liveness.quorum_status(rec.id, &rec.addresses, &voters, m.node_id, now);
        let alive = me || status.alive;
        let state = match (alive, rec.admin_state) {
            (false, _) => NodeState::Offline,
            (true, AdminState::Online) => NodeState::Online,
            (true, AdminState::Standby) => NodeState::Standby,
            (true, AdminState::Maintenance) => NodeState::Maintenance,
        };
        let timeout = self.liveness.timeout();
        let paths = status
            .paths
            .iter()
            .map(|(address, since)| PathView {
                address: address.clone(),
                up: me || since.is_some_and(|s| s < timeout),
                last_seen_ms: if me { Some(0) } else { since.map(|s| s.as_millis() as u64) },
            })
            .collect();
        NodeView {
            id: rec.id,
            name: rec.name.clone(),
            role,
            state,
            admin_state: rec.admin_state,
            site: rec.site.clone(),
            addresses: rec.addresses.clone(),
            port: rec.port,
            pid: if me { Some(std::process::id()) } else { status.pid },
            version: if me { Some(VERSION.to_string()) } else { status.version },
            leader: metrics.current_leader == Some(rec.id),
            paths,
            attributes: rec.attributes.clone(),
        }
    }

    fn views(&self, m: &Member) -> (ClusterState, RaftMetrics, Vec<NodeView>) {
        let state = m.state.state();
        let metrics = m.metrics();
        let now = Instant::now();
        let views = state.nodes.values().map(|r| self.view(m, r, &metrics, now)).collect();
        (state, metrics, views)
    }

    fn node_view(&self, m: &Member, name: &str) -> Result<NodeView, ApiError> {
        let (_, _, views) = self.views(m);
        views.into_iter().find(|v| v.name == name).ok_or_else(|| ApiError::NodeNotFound(name.to_string()))
    }

    fn leader_name(&self, m: &Member, metrics: &RaftMetrics) -> Option<String> {
        let id = metrics.current_leader?;
        m.state.read(|d| d.state.nodes.get(&id).map(|n| n.name.clone()))
    }

    // ---- peer agent calls ----

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        self.get_json_within(url, PEER_TIMEOUT).await
    }

    async fn get_json_within<T: serde::de::DeserializeOwned>(&self, url: &str, timeout: Duration) -> Result<T, String> {
        let resp = self.http.get(url).timeout(timeout).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// POSTs to the first of `urls` that answers; a JSON error answer is
    /// returned as `Refused`, no answer at all as `Err(String)`.
    async fn post_first<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        urls: &[String],
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Result<T, ApiError>, String> {
        let mut last = "no address".to_string();
        for base in urls {
            let url = format!("{base}{path}");
            match self.http.post(&url).json(body).timeout(timeout).send().await {
                Err(e) => last = format!("{url}: {e}"),
                Ok(resp) => return Ok(decode(&url, resp).await),
            }
        }
        Err(last)
    }

    // ---- workflows ----

    async fn do_init(&self, req: InitRequest) -> Result<LocalView, ApiError> {
        let _g = self.membership_lock.lock().await;
        if let Some(m) = self.member() {
            return Err(ApiError::AlreadyMember(m.cluster_id.clone()));
        }
        let cluster_id = match req.cluster_id {
            Some(c) => {
                validate_name("cluster_id", &c)?;
                c
            }
            None => new_cluster_id(),
        };
        // Leftovers of an earlier attempt that never got an identity.
        self.db.wipe().map_err(storage_err)?;
        let identity = Identity { node_id: 1, cluster_id: cluster_id.clone() };
        let m = self.start_member(&identity).await.map_err(|e| ApiError::Internal(format!("{e:#}")))?;
        let members = BTreeMap::from([(1, Peer { urls: self.my_urls() })]);
        match m.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => return Err(ApiError::Internal(e.to_string())),
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                return Err(ApiError::Internal(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => return Err(fatal_err(e)),
        }
        m.raft
            .wait(Some(LEADER_WAIT))
            .current_leader(1, "bootstrap leader")
            .await
            .map_err(|e| ApiError::QuorumUnavailable(e.to_string()))?;
        self.propose(&m, Command::Bootstrap { cluster_id, node_id: 1, node: self.cfg.spec() }).await?;
        self.db.set_identity(&identity).map_err(storage_err)?;
        tracing::info!(cluster_id = %identity.cluster_id, "cluster bootstrapped");
        Ok(self.local_view())
    }

    async fn do_join_via(&self, req: JoinViaRequest) -> Result<LocalView, ApiError> {
        if let Some(m) = self.member() {
            return Err(ApiError::AlreadyMember(m.cluster_id.clone()));
        }
        let via = req.via.trim_end_matches('/').to_string();
        if !via.starts_with("http://") {
            return Err(ApiError::Invalid { field: "via".into(), reason: format!("{via:?} is not an http:// URL") });
        }
        let spec = self.cfg.spec();
        let body = JoinRequest {
            name: spec.name,
            addresses: spec.addresses,
            port: spec.port,
            site: spec.site,
            witness: spec.witness,
        };
        // The leader calls back our /internal/adopt before answering.
        let answer: Result<NodeView, ApiError> = self
            .post_first(std::slice::from_ref(&via), "/v1/nodes", &body, PEER_TIMEOUT * 4)
            .await
            .map_err(|reason| ApiError::JoinTargetUnreachable { url: via.clone(), reason })?;
        answer?;
        if self.member().is_none() {
            return Err(ApiError::Internal("the cluster accepted the join but never adopted this node".into()));
        }
        Ok(self.local_view())
    }

    async fn do_adopt(&self, req: AdoptRequest) -> Result<LocalView, ApiError> {
        let _g = self.membership_lock.lock().await;
        if let Some(m) = self.member() {
            if m.cluster_id == req.cluster_id && m.node_id == req.node_id {
                return Ok(self.local_view());
            }
            return Err(ApiError::AlreadyMember(m.cluster_id.clone()));
        }
        if req.name != self.cfg.name {
            return Err(ApiError::NameMismatch {
                url: self.my_urls().join(","),
                expected: req.name,
                actual: self.cfg.name.clone(),
            });
        }
        self.db.wipe().map_err(storage_err)?;
        let identity = Identity { node_id: req.node_id, cluster_id: req.cluster_id };
        self.db.set_identity(&identity).map_err(storage_err)?;
        self.start_member(&identity).await.map_err(|e| ApiError::Internal(format!("{e:#}")))?;
        tracing::info!(node_id = identity.node_id, cluster_id = %identity.cluster_id, "adopted into cluster");
        Ok(self.local_view())
    }

    async fn do_release(&self, req: ReleaseRequest) -> Result<(), ApiError> {
        // No membership lock: a leader that removes itself holds it while the
        // new leader finishes the removal and releases it.
        match self.member() {
            Some(m) if m.cluster_id == req.cluster_id && m.node_id == req.node_id => {
                self.stop_member(true).await?;
                tracing::info!(cluster_id = %req.cluster_id, "removed from the cluster; waiting to be initialised or joined");
                Ok(())
            }
            Some(m) => Err(ApiError::WrongNode {
                expected: req.node_id.to_string(),
                cluster: req.cluster_id,
                actual: format!("{} of {}", m.node_id, m.cluster_id),
            }),
            None => Ok(()),
        }
    }

    async fn do_add_node(&self, req: JoinRequest) -> Result<NodeView, ApiError> {
        let _g = self.membership_lock.lock().await;
        let m = self.require_member()?;
        let spec =
            NodeSpec { name: req.name, addresses: req.addresses, port: req.port, site: req.site, witness: req.witness };
        m.state.read(|d| d.state.check_new_node(&spec))?;
        let urls = api_urls(&spec.addresses, spec.port);
        let unreachable = |reason: String| ApiError::NodeUnreachable { name: spec.name.clone(), reason };
        // The agent must run, be the one named, and belong to no cluster.
        let mut local: Option<LocalView> = None;
        let mut last = String::new();
        for u in &urls {
            match self.get_json::<LocalView>(&format!("{u}/v1/local")).await {
                Ok(v) => {
                    local = Some(v);
                    break;
                }
                Err(e) => last = format!("{u}: {e}"),
            }
        }
        let local = local.ok_or_else(|| unreachable(last))?;
        if local.name != spec.name {
            return Err(ApiError::NameMismatch {
                url: urls.join(","),
                expected: spec.name.clone(),
                actual: local.name,
            });
        }
        if let Some(c) = local.cluster_id {
            return Err(ApiError::NodeInOtherCluster { name: spec.name.clone(), url: urls.join(","), cluster_id: c });
        }
        let id = match self.propose(&m, Command::AddNode { node: spec.clone() }).await? {
            Reply::NodeAdded { id } => id,
            other => return Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        };
        let adopt = AdoptRequest { cluster_id: m.cluster_id.clone(), node_id: id, name: spec.name.clone() };
        let adopted: Result<(), ApiError> =
            match self.post_first::<_, LocalView>(&urls, "/internal/adopt", &adopt, PEER_TIMEOUT * 2).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(reason) => Err(unreachable(reason)),
            };
        let added = match adopted {
            Ok(()) => {
                let added = self.add_learner(&m, id, Peer { urls: urls.clone() }).await;
                if added.is_err() {
                    // The agent believes it joined: tell it otherwise.
                    let release = ReleaseRequest { cluster_id: m.cluster_id.clone(), node_id: id };
                    let _ = self
                        .post_first::<_, serde_json::Value>(&urls, "/internal/release", &release, PEER_TIMEOUT)
                        .await;
                }
                added
            }
            Err(e) => Err(e),
        };
        if let Err(e) = added {
            // Undo the record so that a refused join changes nothing.
            if let Err(undo) = self.propose(&m, Command::RemoveNode { name: spec.name.clone() }).await {
                tracing::error!(node = %spec.name, "join failed ({e}) and its record could not be removed: {undo}");
            }
            return Err(e);
        }
        tracing::info!(node = %spec.name, id, "node joined as learner");
        self.node_view(&m, &spec.name)
    }

    async fn do_remove(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let guard = self.membership_lock.lock().await;
        let m = self.require_member()?;
        let state = m.state.state();
        let rec = state.node_by_name(name).cloned().ok_or_else(|| ApiError::NodeNotFound(name.to_string()))?;
        let metrics = m.metrics();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let in_membership = membership.nodes().any(|(id, _)| *id == rec.id);
        let now = Instant::now();
        let status = self.liveness.status(rec.id, &rec.addresses, now);
        if rec.id != m.node_id && !status.alive && !force {
            return Err(ApiError::NodeUnreachable {
                name: name.to_string(),
                reason: format!("no heartbeat for {:.1}s", status.down_for.as_secs_f64()),
            });
        }
        if voters.contains(&rec.id) {
            let remaining = self.voters_without(&m, &state, &metrics, &voters, rec.id, now);
            let alive = remaining.iter().filter(|id| **id == m.node_id || self.is_alive(&state, **id, now)).count();
            if remaining.is_empty() || alive * 2 <= remaining.len() {
                return Err(ApiError::WouldLoseQuorum(name.to_string()));
            }
            if rec.id == m.node_id {
                // The leader leaves: hand the vote to the others, then let the
                // new leader finish the removal.
                self.change_voters(&m, ChangeMembers::ReplaceAllVoters(remaining), true).await?;
                // Keep the lock until the new leader has it: this node's
                // autopilot must not vote it back in meanwhile.
                let result = self.forward_remove_to_new_leader(&m, name, force).await;
                drop(guard);
                return result;
            }
            self.change_voters(&m, ChangeMembers::ReplaceAllVoters(remaining), false).await?;
        } else if in_membership {
            self.change_voters(&m, ChangeMembers::RemoveNodes(BTreeSet::from([rec.id])), false).await?;
        }
        self.propose(&m, Command::RemoveNode { name: name.to_string() }).await?;
        self.liveness.forget(rec.id);
        let release = ReleaseRequest { cluster_id: m.cluster_id.clone(), node_id: rec.id };
        match self.post_first::<_, serde_json::Value>(&rec.urls(), "/internal/release", &release, PEER_TIMEOUT).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(node = name, "removed, but the agent answered: {e}"),
            Err(e) => tracing::warn!(node = name, "removed, but the agent could not be told: {e}"),
        }
        tracing::info!(node = name, force, "node removed");
        Ok(())
    }

    fn is_alive(&self, state: &ClusterState, id: NodeId, now: Instant) -> bool {
        state.nodes.get(&id).is_some_and(|r| self.liveness.status(id, &r.addresses, now).alive)
    }

    /// The voter set once `gone` leaves, topped up from healthy learners.
    fn voters_without(
        &self,
        m: &Member,
        state: &ClusterState,
        metrics: &RaftMetrics,
        voters: &BTreeSet<NodeId>,
        gone: NodeId,
        now: Instant,
    ) -> BTreeSet<NodeId> {
        let mut candidates = self.candidates(m, state, metrics, now);
        candidates.retain(|c| c.id != gone);
        let rest: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != gone).collect();
        let leader = if gone == m.node_id {
            match rest.iter().copied().find(|v| self.is_alive(state, *v, now)) {
                Some(l) => l,
                None => return BTreeSet::new(),
            }
        } else {
            m.node_id
        };
        let input = autopilot::Input {
            candidates,
            voters: rest.clone(),
            leader,
            target: self.cfg.autopilot.voters,
            dead_after: Duration::from_millis(self.cfg.autopilot.dead_voter_after_ms),
        };
        autopilot::plan_voters(&input).unwrap_or(rest)
    }

    async fn forward_remove_to_new_leader(&self, m: &Member, name: &str, force: bool) -> Result<(), ApiError> {
        let deadline = Instant::now() + LEADER_WAIT;
        while Instant::now() < deadline {
            let metrics = m.metrics();
            if let Some(leader) = metrics.current_leader.filter(|l| *l != m.node_id) {
                if let Some(peer) = metrics.membership_config.membership().get_node(&leader) {
                    let url =
                        format!("{}/v1/nodes/{name}?force={force}", peer.urls.first().cloned().unwrap_or_default());
                    let resp = self.http.delete(&url).timeout(PEER_TIMEOUT * 4).send().await;
                    return match resp {
                        Ok(r) if r.status().is_success() => Ok(()),
                        Ok(r) => decode::<serde_json::Value>(&url, r).await.map(|_| ()),
                        Err(e) => Err(ApiError::ForwardFailed { url, reason: e.to_string() }),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ApiError::NoLeader)
    }

    fn candidates(&self, m: &Member, state: &ClusterState, metrics: &RaftMetrics, now: Instant) -> Vec<Candidate> {
        let membership = metrics.membership_config.membership();
        let last = metrics.last_log_index.unwrap_or(0);
        let lag = self.cfg.autopilot.max_lag_entries;
        state
            .nodes
            .values()
            .filter(|r| membership.get_node(&r.id).is_some())
            .map(|r| {
                let me = r.id == m.node_id;
                let st = self.liveness.status(r.id, &r.addresses, now);
                let matched =
                    metrics.replication.as_ref().and_then(|rep| rep.get(&r.id).cloned().flatten()).map(|l| l.index);
                Candidate {
                    id: r.id,
                    site: r.site.clone(),
                    witness: r.witness,
                    alive: me || st.alive,
                    down_for: if me { Duration::ZERO } else { st.down_for },
                    caught_up: me || matched.is_some_and(|i| i + lag >= last),
                }
            })
            .collect()
    }

    /// One autopilot round on the leader: re-add members missing from Raft,
    /// then move votes as [`autopilot::plan_voters`] says.
    async fn autopilot_round(&self) -> Result<(), ApiError> {
        let Some(m) = self.member() else {
            return Ok(());
        };
        let metrics = m.metrics();
        if metrics.current_leader != Some(m.node_id) {
            return Ok(());
        }
        let Ok(_g) = self.membership_lock.try_lock() else {
            return Ok(());
        };
        let state = m.state.state();
        if state.cluster_id.is_none() {
            return Ok(());
        }
        let membership = metrics.membership_config.membership().clone();
        if !membership.voter_ids().any(|v| v == m.node_id) {
            return Ok(()); // this leader is leaving the voter set: hands off
        }
        if let Some(missing) = state.nodes.values().find(|r| membership.get_node(&r.id).is_none()) {
            tracing::info!(node = %missing.name, "re-adding a recorded node missing from raft membership");
            return self.add_learner(&m, missing.id, Peer { urls: missing.urls() }).await;
        }
        let input = autopilot::Input {
            candidates: self.candidates(&m, &state, &metrics, Instant::now()),
            voters: membership.voter_ids().collect(),
            leader: m.node_id,
            target: self.cfg.autopilot.voters,
            dead_after: Duration::from_millis(self.cfg.autopilot.dead_voter_after_ms),
        };
        if let Some(voters) = autopilot::plan_voters(&input) {
            let names = |ids: &BTreeSet<NodeId>| {
                ids.iter().filter_map(|i| state.nodes.get(i).map(|n| n.name.clone())).collect::<Vec<_>>().join(",")
            };
            tracing::info!(from = %names(&input.voters), to = %names(&voters), "autopilot: changing voters");
            self.change_voters(&m, ChangeMembers::ReplaceAllVoters(voters), true).await?;
        }
        Ok(())
    }

    // ---- groups ----

    fn group_view(state: &ClusterState, g: &GroupRecord) -> GroupView {
        let name_of = |id: NodeId| state.nodes.get(&id).map(|n| n.name.clone()).unwrap_or_else(|| format!("#{id}"));
        let p = &g.placement;
        let st = match p.phase {
            Phase::Started => "running",
            Phase::Stopping if g.enabled => "moving",
            Phase::Stopping => "stopping",
            Phase::Stopped if g.enabled && !g.failed_on.is_empty() => "failed",
            Phase::Stopped => "stopped",
        };
        GroupView {
            name: g.name.clone(),
            spec: g.spec.clone(),
            node: p.node.map(name_of),
            state: st.to_string(),
            enabled: g.enabled,
            epoch: p.epoch,
            reason: p.reason.clone(),
            failed_on: g.failed_on.iter().map(|id| name_of(*id)).collect(),
            move_to: g.move_to.map(name_of),
            restarts: None,
            resources: None,
        }
    }

    /// Adds what the node running the group says about its resources.
    async fn with_resources(&self, mut v: GroupView) -> GroupView {
        let Some(node) = v.node.clone() else { return v };
        let status = if node == self.cfg.name {
            self.local_group(&v.name).await.ok()
        } else {
            let url = self.member().and_then(|m| {
                m.state.read(|d| {
                    d.state
                        .nodes
                        .values()
                        .find(|n| n.name == node)
                        .and_then(|n| api_urls(&n.addresses, n.port).into_iter().next())
                })
            });
            match url {
                Some(u) => self
                    .get_json_within::<LocalGroupStatus>(
                        &format!("{u}/internal/groups/{}/local", v.name),
                        STATUS_TIMEOUT,
                    )
                    .await
                    .ok(),
                None => None,
            }
        };
        // A group being stopped there runs at its older epoch: still its own.
        if let Some(s) = status.filter(|s| s.epoch <= v.epoch) {
            v.restarts = Some(s.restarts);
            v.resources = Some(s.resources);
        }
        v
    }

    fn read_group(m: &Member, name: &str) -> Result<GroupView, ApiError> {
        let state = m.state.state();
        let g = state.groups.get(name).ok_or_else(|| ApiError::GroupNotFound(name.to_string()))?;
        Ok(Self::group_view(&state, g))
    }

    /// When (CLOCK_BOOTTIME, ms) this node sent the heartbeat that a
    /// majority of voters (itself included, as now) has since echoed back:
    /// the lease counts from there. So it ends no later than the leader's
    /// count from the last heartbeat it heard from us — also when only our
    /// outgoing traffic is lost (we would still hear them, they not us).
    fn quorum_acked_ms(&self, m: &Member, now_ms: u64) -> Option<u64> {
        // Runs every lease tick: read in place, copy nothing but the voter ids.
        let voters: Vec<NodeId> = m.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let mut acked: Vec<u64> = voters
            .iter()
            .filter_map(|v| if *v == m.node_id { Some(now_ms) } else { self.liveness.acked_ms(*v) })
            .collect();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        acked.get(voters.len() / 2).copied()
    }

    /// One round of heartbeats — unless this node cannot hear the leader
    /// while a majority of voters can: then it is the one cut off (two sites
    /// and a witness, the link between them cut, the leader in the other
    /// site) and it steps out: it goes silent, so its lease lapses (its
    /// resources are fenced) and the leader, hearing of it from no one,
    /// moves its groups to a side that can work. Otherwise its groups would
    /// stay where no write can be recorded. Heard again, it steps back in.
    async fn heartbeat_round(&self, sockets: &HeartbeatSockets) {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(m) = self.member() else { return };
        let nodes = m.state.read(|d| d.state.nodes.clone());
        let metrics = m.metrics();
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if let Some(l) = metrics.current_leader {
            self.last_leader.store(l, SeqCst);
        }
        let leader = Some(self.last_leader.load(SeqCst)).filter(|l| *l != 0);
        let cut_off = leader.is_some_and(|l| {
            let addrs = nodes.get(&l).map(|r| r.addresses.clone()).unwrap_or_default();
            self.liveness.cut_off_from(l, &addrs, &voters, m.node_id, Instant::now())
        });
        if cut_off != self.stepped_out.swap(cut_off, SeqCst) {
            match cut_off {
                true => tracing::warn!(
                    leader = ?leader,
                    "cannot hear the leader, which a majority of voters hears: stepping out (heartbeats stop, the lease lapses, groups move)"
                ),
                false => tracing::info!("stepping back in: heartbeats resume"),
            }
        }
        if !cut_off {
            sockets.send_round(&nodes, &m.cluster_id, m.node_id, &self.liveness).await;
        }
    }

    /// Whether this node holds its lease now.
    fn in_lease(&self) -> bool {
        self.fence.lease_valid()
    }

    /// The lease timer, on its own task so that nothing the executor waits
    /// for can delay it. While a majority of voters is heard it extends the
    /// lease (and writes it down for the watchdog). A lease that ran out
    /// with something running is lost: every resource process is killed at
    /// once and the executor fences before it may start anything again.
    async fn lease_round(&self) {
        let Some(m) = self.member() else { return };
        let now_ms = now_boot_ms();
        let current = self.fence.deadline_ms();
        if current <= now_ms {
            let running = self.fence.has_processes() || self.run.has_records();
            if running && !self.lapsed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let killed = self.fence.kill_all();
                tracing::warn!(killed, "lease ran out (no majority heard, or this agent stalled): fencing");
            }
        }
        if self.lapsed.load(std::sync::atomic::Ordering::SeqCst) {
            return; // not before the executor has fenced what it ran
        }
        let Some(heard_ms) = self.quorum_acked_ms(&m, now_ms) else { return };
        // A lapsed lease is taken again only from heartbeats sent (and
        // echoed) since.
        if current <= now_ms && heard_ms < current {
            return;
        }
        let deadline = heard_ms + self.cfg.fencing.lease_ms;
        if deadline > current {
            // Written before it is used: the watchdog never sees a lease
            // shorter than the one the agent acts on.
            match self.run.write_lease(Lease::Until(deadline)) {
                Ok(()) => self.fence.set_deadline_ms(deadline),
                Err(e) => tracing::error!("cannot write the lease: {e}"),
            }
        }
    }

    /// One executor round: run what is placed here, report what only this
    /// node knows, and fence when out of quorum past the lease.
    async fn executor_round(&self) {
        let Some(m) = self.member() else { return };
        if self.lapsed.load(std::sync::atomic::Ordering::SeqCst) {
            let mut ex = self.executor.lock().await;
            if let Some(ex) = ex.as_mut() {
                ex.fence();
            }
            // Only now may the lease be taken again (see lease_round).
            self.lapsed.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        let no_groups = m.state.read(|d| d.state.groups.is_empty());
        if no_groups && self.executor.lock().await.as_ref().is_none_or(|ex| ex.is_idle()) {
            return;
        }
        let state = m.state.state();
        let in_lease = self.in_lease();
        let wanted = match self.executor.lock().await.as_ref() {
            Some(ex) if in_lease => ex.wanted_starts(&state),
            Some(_) => Vec::new(),
            None => return,
        };
        let mut confirmed = BTreeSet::new();
        for (name, epoch) in &wanted {
            if let Some(claimed) = self.claim_start(&m, name, *epoch).await {
                confirmed.insert((name.clone(), claimed));
            }
        }
        // The claims moved the epochs: act on the state that holds them.
        let state = if wanted.is_empty() { state } else { m.state.state() };
        let reports = match self.executor.lock().await.as_mut() {
            Some(ex) => ex.tick(&state, in_lease, &confirmed).await,
            None => return,
        };
        for r in reports {
            let (group, report) = match r {
                Report::Stopped { group, epoch } => {
                    (group, GroupReport { node: m.node_id, epoch, event: GroupEvent::Stopped })
                }
                Report::Failed { group, epoch } => {
                    (group, GroupReport { node: m.node_id, epoch, event: GroupEvent::Failed })
                }
                Report::StopFailed { group, epoch } => {
                    (group, GroupReport { node: m.node_id, epoch, event: GroupEvent::StopFailed })
                }
            };
            let sent = match self.route() {
                Route::Here => self.apply_report(&group, report).await,
                Route::Leader(urls) => {
                    match self
                        .post_first::<_, serde_json::Value>(
                            &urls,
                            &format!("/internal/groups/{group}/report"),
                            &report,
                            PEER_TIMEOUT,
                        )
                        .await
                    {
                        Ok(r) => r.map(|_| ()),
                        Err(e) => Err(ApiError::ForwardFailed { url: urls.join(","), reason: e }),
                    }
                }
                Route::NoLeader | Route::NotMember => Err(ApiError::NoLeader),
            };
            if let Err(e) = sent {
                tracing::debug!(group = %group, "report not delivered yet: {e}");
            }
        }
    }

    /// Claims `name`, placed here at `epoch`, through the leader (a
    /// committed `ClaimGroup`, see `apply_report`), and waits until this
    /// node has applied it: a start acts on nothing older, and no placement
    /// decided before the claim can apply after it. Returns the new epoch.
    async fn claim_start(&self, m: &Member, name: &str, epoch: u64) -> Option<u64> {
        let report = GroupReport { node: m.node_id, epoch, event: GroupEvent::Starting };
        let claimed = match self.route() {
            Route::Here => self.apply_report(name, report).await.is_ok(),
            Route::Leader(urls) => matches!(
                self.post_first::<_, serde_json::Value>(
                    &urls,
                    &format!("/internal/groups/{name}/report"),
                    &report,
                    PEER_TIMEOUT
                )
                .await,
                Ok(Ok(_))
            ),
            Route::NoLeader | Route::NotMember => false,
        };
        if !claimed {
            tracing::debug!(group = name, epoch, "start not confirmed by the leader");
            return None;
        }
        let want = epoch + 1;
        let deadline = Instant::now() + CLAIM_APPLY_WAIT;
        loop {
            let applied = m.state.read(|d| d.state.groups.get(name).map(|g| (g.placement.node, g.placement.epoch)));
            match applied {
                Some((Some(n), e)) if n == m.node_id && e == want => return Some(want),
                Some((_, e)) if e > want => return None, // moved on already
                _ if Instant::now() >= deadline => return None,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// On the leader: records what a node reported about a group placed on it.
    async fn apply_report(&self, name: &str, r: GroupReport) -> Result<(), ApiError> {
        let m = self.require_member()?;
        let state = m.state.state();
        let g = state.groups.get(name).ok_or_else(|| ApiError::GroupNotFound(name.to_string()))?;
        if r.event == GroupEvent::Starting {
            // Committed in log order: a placement change proposed before it
            // wins and this claim is refused, or this claim wins and that
            // change no longer matches the epoch.
            let cmd = Command::ClaimGroup { name: name.into(), node: r.node, expected_epoch: r.epoch };
            return self.propose(&m, cmd).await.map(|_| ());
        }
        let p = &g.placement;
        if p.node != Some(r.node) || p.epoch != r.epoch {
            return Ok(()); // about an older placement: nothing to do
        }
        let node = state.nodes.get(&r.node).map(|n| n.name.clone()).unwrap_or_default();
        match r.event {
            GroupEvent::Stopped if p.phase == Phase::Stopping => {
                let reason = format!("stopped on {node} ({})", p.reason);
                let cmd = Command::SetPlacement {
                    name: name.into(),
                    expected_epoch: r.epoch,
                    node: None,
                    phase: Phase::Stopped,
                    reason,
                };
                self.propose(&m, cmd).await.map(|_| ())
            }
            GroupEvent::StopFailed if !self.cfg.fencing.fence_command.is_empty() => {
                // It may still run there and cannot be stopped: power the
                // node off. Once it is silent, fenced and confirmed, its
                // groups move as from any dead node.
                let first = self.escalated.lock().unwrap_or_else(|e| e.into_inner()).insert(r.node);
                if first {
                    tracing::error!(group = name, node = %node, "stop failed: escalating to fencing the node");
                    if r.node == m.node_id {
                        // The leader cannot wait for itself to go silent: it
                        // fences itself; the next leader fences it again
                        // (powering off is idempotent) before moving anything.
                        if let Some(rec) = state.nodes.get(&r.node) {
                            let _ = self.start_fence(rec);
                        }
                    }
                }
                Ok(())
            }
            GroupEvent::StopFailed => {
                tracing::error!(group = name, node = %node, "stop failed and no fence command is set: the group stays blocked there");
                Ok(())
            }
            GroupEvent::Failed if p.phase == Phase::Started && !g.failed_on.contains(&r.node) => {
                tracing::warn!(group = name, node = %node, "group failed past its restart threshold");
                self.propose(&m, Command::MarkGroupFailed { name: name.into(), node: r.node, epoch: r.epoch })
                    .await
                    .map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// One scheduler round on the leader: commit every placement change.
    async fn scheduler_round(&self) {
        let Some(m) = self.member() else { return };
        if m.metrics().current_leader != Some(m.node_id) || m.state.read(|d| d.state.groups.is_empty()) {
            return;
        }
        let state = m.state.state();
        let now = Instant::now();
        let fenced_after = self.cfg.fenced_after();
        // A node is offline only when no majority of voters can have heard
        // it: while one can, it may hold its lease and run its groups.
        let voters: Vec<NodeId> = m.metrics().membership_config.membership().voter_ids().collect();
        let nodes: Vec<NodeInfo> = state
            .nodes
            .values()
            .map(|r| {
                let me = r.id == m.node_id;
                let st = self.liveness.quorum_status(r.id, &r.addresses, &voters, m.node_id, now);
                // The fence command starts as soon as the node is offline,
                // so that it runs while the lease runs out.
                let escalated = {
                    let mut e = self.escalated.lock().unwrap_or_else(|e| e.into_inner());
                    if !me && !st.alive {
                        e.remove(&r.id); // it went silent: the escalation took effect
                    }
                    e.contains(&r.id)
                };
                let confirmed = !me && self.fence_confirmed(r, st.alive && !escalated, now);
                NodeInfo {
                    id: r.id,
                    name: r.name.clone(),
                    admin: r.admin_state,
                    witness: r.witness,
                    alive: me || st.alive,
                    fenced: confirmed && !st.alive && st.down_for >= fenced_after,
                    capacity: r.attributes.get("capacity").and_then(|c| c.parse().ok()),
                }
            })
            .collect();
        for d in Scheduler::new(&nodes, &state.groups, local_minute_of_day()).decide() {
            tracing::info!(group = %d.group, epoch = d.expected_epoch + 1, phase = ?d.phase, "placement: {}", d.reason);
            let cmd = Command::SetPlacement {
                name: d.group.clone(),
                expected_epoch: d.expected_epoch,
                node: d.node,
                phase: d.phase,
                reason: d.reason,
            };
            if let Err(e) = self.propose(&m, cmd).await {
                tracing::debug!(group = %d.group, "placement not committed: {e}");
            }
        }
    }

    /// Whether the fence command (if any) has confirmed `node` off since it
    /// went silent; starts it, or retries a failed one, as needed.
    fn fence_confirmed(&self, node: &NodeRecord, alive: bool, now: Instant) -> bool {
        let cmd = &self.cfg.fencing.fence_command;
        if cmd.is_empty() {
            return true;
        }
        let mut ops = self.fence_ops.lock().unwrap_or_else(|e| e.into_inner());
        if alive {
            ops.remove(&node.id); // back: a new silence needs a new fence
            return false;
        }
        if let Some(op) = ops.get(&node.id) {
            match &*op.result.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(Ok(())) => return true,
                None => return false,
                Some(Err(_)) if now.duration_since(op.started) < FENCE_RETRY => return false,
                Some(Err(_)) => {} // retry below
            }
        }
        ops.insert(node.id, FenceOp { started: now, result: self.start_fence(node) });
        false
    }

    /// Runs the fence command against `node` in the background; the slot
    /// receives its outcome.
    fn start_fence(&self, node: &NodeRecord) -> Arc<std::sync::Mutex<Option<Result<(), String>>>> {
        let result = Arc::new(std::sync::Mutex::new(None));
        let out = result.clone();
        let Some((program, args)) = self.cfg.fencing.fence_command.split_first() else {
            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err("no fence command".into()));
            return out;
        };
        let (program, args) = (program.clone(), args.to_vec());
        let (name, addresses) = (node.name.clone(), node.addresses.join(","));
        let timeout = Duration::from_millis(self.cfg.fencing.fence_timeout_ms);
        tokio::spawn(async move {
            tracing::warn!(node = %name, "fencing: running {program} {args:?}");
            let run = tokio::process::Command::new(&program)
                .args(&args)
                .arg(&name)
                .env("TANDEM_FENCE_NODE", &name)
                .env("TANDEM_FENCE_ADDRESSES", &addresses)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let r = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {timeout:?}")),
            };
            match &r {
                Ok(()) => tracing::warn!(node = %name, "fencing confirmed: the node is off"),
                Err(e) => tracing::error!(node = %name, "fencing failed, its groups stay where they are: {e}"),
            }
            *result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        out
    }

    async fn wait_group_stopped(&self, m: &Member, name: &str) -> Result<(), ApiError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let phase = m.state.read(|d| d.state.groups.get(name).map(|g| g.placement.phase));
            match phase {
                None | Some(Phase::Stopped) => return Ok(()),
                Some(_) if Instant::now() > deadline => {
                    return Err(ApiError::QuorumUnavailable(format!("group {name} did not stop within 60 s")))
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn local_view(&self) -> LocalView {
        let spec = self.cfg.spec();
        let m = self.member();
        let metrics = m.as_ref().map(|m| m.metrics());
        let leader_id = metrics.as_ref().and_then(|x| x.current_leader);
        let leader_url = match (&m, leader_id, &metrics) {
            (Some(_), Some(l), Some(x)) => {
                x.membership_config.membership().get_node(&l).and_then(|p| p.urls.first().cloned())
            }
            _ => None,
        };
        LocalView {
            name: spec.name,
            node_id: m.as_ref().map(|m| m.node_id),
            cluster_id: m.as_ref().map(|m| m.cluster_id.clone()),
            addresses: spec.addresses,
            port: spec.port,
            site: spec.site,
            witness: spec.witness,
            pid: std::process::id(),
            version: VERSION.to_string(),
            leader: match (&m, &metrics) {
                (Some(m), Some(x)) => self.leader_name(m, x),
                _ => None,
            },
            leader_url,
            term: metrics.as_ref().map(|x| x.current_term),
            applied_index: metrics.as_ref().and_then(|x| x.last_applied.map(|l| l.index)),
            snapshot_index: metrics.as_ref().and_then(|x| x.snapshot.map(|l| l.index)),
            purged_index: metrics.as_ref().and_then(|x| x.purged.map(|l| l.index)),
        }
    }
}

fn membership_err(e: ChangeMembershipError<NodeId>) -> ApiError {
    match e {
        ChangeMembershipError::InProgress(_) => ApiError::MembershipChangeInProgress,
        other => ApiError::Internal(other.to_string()),
    }
}

/// Turns a peer agent's answer into `T` or the error it reported.
async fn decode<T: serde::de::DeserializeOwned>(url: &str, resp: reqwest::Response) -> Result<T, ApiError> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| ApiError::ForwardFailed { url: url.into(), reason: e.to_string() })?;
    if status.is_success() {
        let bytes = if bytes.is_empty() { &b"null"[..] } else { &bytes[..] };
        return serde_json::from_slice(bytes).map_err(|e| ApiError::Internal(format!("{url}: bad answer: {e}")));
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => Err(ApiError::Refused {
            url: url.into(),
            status: status.as_u16(),
            code: b.code,
            message: b.message,
            hint: b.hint,
        }),
        Err(_) => Err(ApiError::ForwardFailed { url: url.into(), reason: format!("HTTP {status}") }),
    }
}

#[async_trait::async_trait]
impl Backend for Agent {
    fn name(&self) -> String {
        self.cfg.name.clone()
    }

    fn route(&self) -> Route {
        let Some(m) = self.member() else {
            return Route::NotMember;
        };
        let metrics = m.metrics();
        match metrics.current_leader {
            None => Route::NoLeader,
            Some(l) if l == m.node_id => Route::Here,
            Some(l) => {
                // A leader this node no longer hears from is as good as none:
                // forwarding to it would wait on a dead connection.
                let heard = m
                    .state
                    .read(|d| d.state.nodes.get(&l).map(|r| r.addresses.clone()))
                    .is_none_or(|addrs| self.liveness.status(l, &addrs, Instant::now()).alive);
                match metrics.membership_config.membership().get_node(&l) {
                    Some(peer) if heard && !peer.urls.is_empty() => Route::Leader(peer.urls.clone()),
                    _ => Route::NoLeader,
                }
            }
        }
    }

    fn local(&self) -> LocalView {
        self.local_view()
    }

    fn ready(&self) -> Result<(), ApiError> {
        match self.route() {
            Route::NotMember => Err(ApiError::NotMember),
            Route::NoLeader => Err(ApiError::NoLeader),
            Route::Here | Route::Leader(_) => Ok(()),
        }
    }

    async fn cluster(&self, stale: bool) -> Result<ClusterView, ApiError> {
        let m = self.read_member(stale).await?;
        let (state, metrics, members) = self.views(&m);
        Ok(ClusterView {
            cluster_id: state.cluster_id.unwrap_or_else(|| m.cluster_id.clone()),
            leader: self.leader_name(&m, &metrics),
            term: metrics.current_term,
            applied_index: metrics.last_applied.map(|l| l.index),
            members,
        })
    }

    async fn nodes(&self, stale: bool) -> Result<Vec<NodeView>, ApiError> {
        let m = self.read_member(stale).await?;
        Ok(self.views(&m).2)
    }

    async fn node(&self, name: &str, stale: bool) -> Result<NodeView, ApiError> {
        let m = self.read_member(stale).await?;
        self.node_view(&m, name)
    }

    async fn add_node(&self, req: JoinRequest) -> Result<NodeView, ApiError> {
        self.do_add_node(req).await
    }

    async fn remove_node(&self, name: &str, force: bool) -> Result<(), ApiError> {
        self.do_remove(name, force).await
    }

    async fn set_admin_state(&self, name: &str, state: AdminState) -> Result<NodeView, ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::SetAdminState { name: name.into(), state }).await?;
        self.node_view(&m, name)
    }

    async fn set_attribute(&self, name: &str, key: &str, value: String) -> Result<NodeView, ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::SetAttribute { name: name.into(), key: key.into(), value }).await?;
        self.node_view(&m, name)
    }

    async fn delete_attribute(&self, name: &str, key: &str) -> Result<NodeView, ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::DeleteAttribute { name: name.into(), key: key.into() }).await?;
        self.node_view(&m, name)
    }

    async fn groups(&self, stale: bool) -> Result<Vec<GroupView>, ApiError> {
        let m = self.read_member(stale).await?;
        let state = m.state.state();
        Ok(state.groups.values().map(|g| Self::group_view(&state, g)).collect())
    }

    async fn group(&self, name: &str, stale: bool) -> Result<GroupView, ApiError> {
        let m = self.read_member(stale).await?;
        let v = Self::read_group(&m, name)?;
        Ok(self.with_resources(v).await)
    }

    async fn local_group(&self, name: &str) -> Result<LocalGroupStatus, ApiError> {
        let ex = self.executor.lock().await;
        let (epoch, restarts, resources) =
            ex.as_ref().and_then(|e| e.status(name)).ok_or_else(|| ApiError::GroupNotFound(name.to_string()))?;
        let resources = resources
            .into_iter()
            .map(|r| ResourceView { name: r.name, kind: r.kind, state: r.state, pid: r.pid, last_error: r.last_error })
            .collect();
        Ok(LocalGroupStatus { epoch, restarts, resources })
    }

    async fn put_group(&self, name: &str, spec: GroupSpec) -> Result<(GroupView, bool), ApiError> {
        let m = self.require_member()?;
        for (i, r) in spec.resources.iter().enumerate() {
            let volume = matches!(r.kind, tandem_raft::group::ResourceKind::Volume(_));
            if !crate::executor::supported(&r.kind) && !volume {
                return Err(ApiError::Invalid {
                    field: format!("resources[{i}].type"),
                    reason: format!(
                        "{} resources are not supported by this version yet (process is)",
                        r.kind.type_name()
                    ),
                });
            }
        }
        // What the log would refuse is refused first, each with its code;
        // then a new volume must fit in this node's free space.
        m.state.read(|d| d.state.check_put_group(name, &spec))?;
        let new_volume = spec.volume().filter(|(r, _)| m.state.read(|d| d.state.volume_owner(&r.name).is_none()));
        if let Some((r, v)) = new_volume {
            check_free_space(&self.cfg.data_dir, &spec, r, v)?;
        }
        let created = m.state.read(|d| !d.state.groups.contains_key(name));
        self.propose(&m, Command::PutGroup { name: name.into(), spec }).await?;
        Ok((Self::read_group(&m, name)?, created))
    }

    async fn delete_group(&self, name: &str) -> Result<(), ApiError> {
        let m = self.require_member()?;
        Self::read_group(&m, name)?;
        // Refuse before stopping anything: a refused delete changes nothing.
        let referrer = m.state.read(|d| {
            d.state
                .groups
                .values()
                .find(|o| {
                    o.name != name
                        && (o.spec.colocate_with.as_deref() == Some(name)
                            || o.spec.anti_affinity.iter().any(|a| a == name))
                })
                .map(|o| o.name.clone())
        });
        if let Some(by) = referrer {
            return Err(ApiError::GroupInUse { name: name.into(), by });
        }
        self.propose(&m, Command::SetGroupEnabled { name: name.into(), enabled: false }).await?;
        self.wait_group_stopped(&m, name).await?;
        self.propose(&m, Command::DeleteGroup { name: name.into() }).await.map(|_| ())
    }

    async fn group_action(&self, name: &str, action: GroupAction) -> Result<GroupView, ApiError> {
        let m = self.require_member()?;
        let cmd = match action {
            GroupAction::Start => Command::SetGroupEnabled { name: name.into(), enabled: true },
            GroupAction::Stop => Command::SetGroupEnabled { name: name.into(), enabled: false },
            GroupAction::Clear => Command::ClearGroupFailures { name: name.into() },
        };
        self.propose(&m, cmd).await?;
        Self::read_group(&m, name)
    }

    async fn move_group(&self, name: &str, to: &str) -> Result<GroupView, ApiError> {
        let m = self.require_member()?;
        let id = m
            .state
            .read(|d| d.state.node_by_name(to).map(|n| n.id))
            .ok_or_else(|| ApiError::NodeNotFound(to.into()))?;
        self.propose(&m, Command::MoveGroup { name: name.into(), to: id }).await?;
        Self::read_group(&m, name)
    }

    async fn group_report(&self, name: &str, report: GroupReport) -> Result<(), ApiError> {
        self.apply_report(name, report).await
    }

    async fn volumes(&self, stale: bool) -> Result<Vec<tandem_http_api::VolumeView>, ApiError> {
        let m = self.read_member(stale).await?;
        let state = m.state.state();
        let owners: Vec<_> = state.groups.values().filter_map(|g| g.spec.volume().map(|(r, v)| (g, r, v))).collect();
        // Ask every primary at once: the list takes one status timeout at most.
        let mut asks = tokio::task::JoinSet::new();
        let mut live: Vec<Option<Result<tandem_http_api::LocalVolumeStatus, String>>> = vec![None; owners.len()];
        for (i, (g, r, _)) in owners.iter().enumerate() {
            match volume_source(&state, m.node_id, g, r) {
                VolumeSource::Here(node, volume) => {
                    live[i] =
                        Some(self.volumes.status(&volume).map(Into::into).map_err(|e| format!("primary {node}: {e}")))
                }
                VolumeSource::Remote(node, url) => {
                    let http = self.http.clone();
                    asks.spawn(async move { (i, fetch_volume_status(&http, &node, &url).await) });
                }
                VolumeSource::None(why) => live[i] = Some(Err(why)),
            }
        }
        while let Some(done) = asks.join_next().await {
            if let Ok((i, r)) = done {
                live[i] = Some(r);
            }
        }
        Ok(owners
            .iter()
            .zip(live)
            .map(|((g, r, v), l)| {
                volume_view(&state, g, r, v, l.unwrap_or_else(|| Err("status request failed".into())))
            })
            .collect())
    }

    async fn volume(&self, name: &str, stale: bool) -> Result<tandem_http_api::VolumeView, ApiError> {
        let m = self.read_member(stale).await?;
        let state = m.state.state();
        let (g, r, v) = state
            .volume_owner(name)
            .and_then(|(g, _)| g.spec.volume().map(|(r, v)| (g, r, v)))
            .ok_or_else(|| ApiError::VolumeNotFound(name.to_string()))?;
        let live = match volume_source(&state, m.node_id, g, r) {
            VolumeSource::Here(node, volume) => {
                self.volumes.status(&volume).map(Into::into).map_err(|e| format!("primary {node}: {e}"))
            }
            VolumeSource::Remote(node, url) => fetch_volume_status(&self.http, &node, &url).await,
            VolumeSource::None(why) => Err(why),
        };
        Ok(volume_view(&state, g, r, v, live))
    }

    async fn verify_volume(&self, name: &str) -> Result<tandem_http_api::VerifyReport, ApiError> {
        let m = self.require_member()?;
        match self.primary_of(&m, name)? {
            None => self.local_volume_verify(name).await,
            Some(urls) => {
                let path = format!("/internal/volumes/{name}/verify");
                self.ask_primary(&urls, &path, &serde_json::json!({})).await
            }
        }
    }

    async fn resolve_volume(&self, name: &str, discard: &str) -> Result<tandem_http_api::VolumeView, ApiError> {
        let m = self.require_member()?;
        let replicas =
            m.state.read(|d| d.state.volume_owner(name).map(|(g, _)| tandem_raft::group::replica_nodes(&g.spec)));
        let replicas = replicas.ok_or_else(|| ApiError::VolumeNotFound(name.to_string()))?;
        if !replicas.iter().any(|n| n == discard) {
            return Err(ApiError::NoSuchReplica(format!(
                "volume {name} has no replica on node {discard} (its replicas: {})",
                replicas.join(", ")
            )));
        }
        match self.primary_of(&m, name)? {
            None => self.local_volume_resolve(name, discard).await?,
            Some(urls) => {
                let path = format!("/internal/volumes/{name}/resolve");
                let body = tandem_http_api::ResolveRequest { discard: discard.to_string() };
                self.ask_primary::<_, serde_json::Value>(&urls, &path, &body).await?;
            }
        }
        self.volume(name, true).await
    }

    async fn local_volume(&self, name: &str) -> Result<tandem_http_api::LocalVolumeStatus, ApiError> {
        self.volumes.status(name).map(Into::into).map_err(volume_err)
    }

    async fn local_volume_verify(&self, name: &str) -> Result<tandem_http_api::VerifyReport, ApiError> {
        self.volumes.verify(name).await.map(Into::into).map_err(volume_err)
    }

    async fn local_volume_resolve(&self, name: &str, discard: &str) -> Result<(), ApiError> {
        self.volumes.resolve(name, discard).await.map_err(volume_err)
    }

    async fn record_replica_disk(&self, name: &str, r: tandem_http_api::ReplicaDiskReport) -> Result<(), ApiError> {
        let m = self.require_member()?;
        let cmd = Command::SetReplicaDisk { volume: name.into(), node: r.node, disk: r.disk, epoch: r.epoch };
        self.propose(&m, cmd).await.map(|_| ())
    }

    async fn init(&self, req: InitRequest) -> Result<LocalView, ApiError> {
        self.do_init(req).await
    }

    async fn join_via(&self, req: JoinViaRequest) -> Result<LocalView, ApiError> {
        self.do_join_via(req).await
    }

    async fn adopt(&self, req: AdoptRequest) -> Result<LocalView, ApiError> {
        self.do_adopt(req).await
    }

    async fn release(&self, req: ReleaseRequest) -> Result<(), ApiError> {
        self.do_release(req).await
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.member().is_some_and(|m| m.metrics().membership_config.membership().get_node(&id).is_some())
    }

    fn raft_for(&self, target: NodeId, cluster: &str) -> Result<Raft, ApiError> {
        let m = self.require_member()?;
        if m.node_id != target || m.cluster_id != cluster {
            return Err(ApiError::WrongNode {
                expected: target.to_string(),
                cluster: cluster.to_string(),
                actual: format!("{} of {}", m.node_id, m.cluster_id),
            });
        }
        Ok(m.raft.clone())
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let db = Db::open(&cfg.data_dir.join("raft"))?;
    let mut listeners = Vec::new();
    for a in &cfg.addresses {
        let addr = tandem_raft::state::socket_addr(a, cfg.port);
        let l = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding the API on {addr}"))?;
        listeners.push(l);
    }
    let sockets = Arc::new(HeartbeatSockets::bind(&cfg.addresses, cfg.port).await?);
    let liveness = Liveness::new(cfg.node_timeout());
    let agent = Arc::new(Agent::new(cfg.clone(), db.clone(), liveness.clone())?);
    // The data plane listens before anything can be promoted here.
    agent.fence.set_volumes(agent.volumes.clone());
    let fence = agent.fence.clone();
    agent.volumes.set_lease(Arc::new(move || fence.lease_valid()));
    let replication: Vec<std::net::SocketAddr> = cfg
        .addresses
        .iter()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, crate::volume::desired::replication_port(cfg.port)))
        .collect();
    agent
        .volumes
        .start(&cfg.data_dir.join("volumes"), &replication, Arc::new(VolumeControl(Arc::downgrade(&agent))))
        .await
        .context("starting the volume replication listener (port + 1)")?;
    if let Some(identity) = db.identity()? {
        agent.start_member(&identity).await?;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = tandem_http_api::router(agent.clone());
    let mut servers = Vec::new();
    for l in listeners {
        let mut rx = stop_rx.clone();
        let app = router.clone();
        servers.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            axum::serve(l, app).with_graceful_shutdown(stop).await
        }));
    }
    let ident_agent = agent.clone();
    sockets.spawn_receivers(liveness, move || ident_agent.member().map(|m| (m.cluster_id.clone(), m.node_id)));
    let (a, socks) = (agent.clone(), sockets.clone());
    every(cfg.heartbeat_interval(), move || {
        let (agent, sockets) = (a.clone(), socks.clone());
        async move { agent.heartbeat_round(&sockets).await }
    });
    let a = agent.clone();
    every(Duration::from_millis(cfg.autopilot.interval_ms), move || {
        let agent = a.clone();
        async move {
            if let Err(e) = agent.autopilot_round().await {
                tracing::warn!(code = e.code(), "autopilot: {e}");
            }
        }
    });
    let a = agent.clone();
    every_or_on_change(agent.clone(), GROUP_TICK, move || {
        let agent = a.clone();
        async move { agent.executor_round().await }
    });
    let a = agent.clone();
    // Under systemd with WatchdogSec=, the lease timer's own loop proves the
    // agent alive: a stalled lease timer gets the agent restarted.
    let sd_watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let last_ping = Arc::new(std::sync::Mutex::new(Instant::now()));
    every(LEASE_TICK, move || {
        let (agent, last_ping) = (a.clone(), last_ping.clone());
        async move {
            agent.lease_round().await;
            if let Some(period) = sd_watchdog {
                let mut last = last_ping.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= period {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    *last = Instant::now();
                }
            }
        }
    });
    let a = agent.clone();
    every_or_on_change(agent.clone(), VOLUME_TICK, move || {
        let agent = a.clone();
        async move { agent.volume_round().await }
    });
    let a = agent.clone();
    every_or_on_change(agent.clone(), SCHEDULER_TICK, move || {
        let agent = a.clone();
        async move { agent.scheduler_round().await }
    });
    if !cfg.join.is_empty() && agent.member().is_none() {
        let agent = agent.clone();
        let urls = cfg.join.clone();
        tokio::spawn(async move { auto_join(agent, urls).await });
    }
    tracing::info!(name = %cfg.name, urls = %agent.my_urls().join(","), pid = std::process::id(), version = VERSION, "agent up");

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    wait_for_signal().await;
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    agent.shutdown().await;
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    Ok(())
}

/// Runs `round` every `period`, forever, on its own task; a round that runs
/// long delays the next one rather than overlapping it.
fn every<F, Fut>(period: Duration, mut round: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            round().await;
        }
    });
}

/// Like `every`, but also runs `round` as soon as the replicated state
/// changes (a placement committed, a group defined): reactions to the log
/// do not wait for the next tick.
fn every_or_on_change<F, Fut>(agent: Arc<Agent>, period: Duration, mut round: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        // The receiver of the current membership's state (it changes when
        // the agent joins, leaves or rejoins).
        let mut rx: Option<(usize, tokio::sync::watch::Receiver<u64>)> = None;
        loop {
            let m = agent.member();
            let key = m.as_ref().map(|m| Arc::as_ptr(m) as usize);
            if rx.as_ref().map(|r| r.0) != key {
                rx = m.map(|m| (Arc::as_ptr(&m) as usize, m.state.subscribe()));
            }
            match rx.as_mut() {
                Some((_, r)) => {
                    if let Ok(Err(_)) = tokio::time::timeout(period, r.changed()).await {
                        // The state is gone (membership ended): just tick.
                        tokio::time::sleep(period).await;
                    }
                }
                None => tokio::time::sleep(period).await,
            }
            round().await;
            // A busy log (thousands of writes a second) must not turn the
            // loop into a spin: at most one round per CHANGE_GAP.
            tokio::time::sleep(CHANGE_GAP).await;
        }
    });
}

/// Joins through the configured members until one accepts; gives up only
/// when the agent becomes a member some other way.
async fn auto_join(agent: Arc<Agent>, urls: Vec<String>) {
    let mut backoff = JOIN_BACKOFF_MIN;
    loop {
        for via in &urls {
            if agent.member().is_some() {
                return;
            }
            match agent.do_join_via(JoinViaRequest { via: via.clone() }).await {
                Ok(_) => {
                    tracing::info!(via = %via, "joined the cluster");
                    return;
                }
                Err(ApiError::AlreadyMember(_)) => return,
                Err(e) => tracing::info!(via = %via, code = e.code(), "join attempt failed: {e}"),
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(JOIN_BACKOFF_MAX);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

// ---- volumes: helpers of the API's volume routes ----

/// How long a verify or resolve may take on the primary before the request
/// answers 503 (both return once started).
const VOLUME_ACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the live status of a volume comes from.
enum VolumeSource {
    /// This node (named) is its primary: the volume's name.
    Here(String, String),
    /// The primary's name and its `/internal/volumes/{name}/local`.
    Remote(String, String),
    /// No primary to ask, and why.
    None(String),
}

impl Agent {
    /// For a volume's primary (the data plane): records in the replicated
    /// state that `node`'s replica of `volume` holds `disk`, proposing
    /// `SetReplicaDisk` on the leader (here, or through
    /// `POST /internal/volumes/{volume}/disk`). `epoch` is the group's
    /// placement epoch the primary runs at; a stale one is refused with
    /// TND-1411. Returns once committed: only then may the primary
    /// acknowledge a write that replica missed.
    pub async fn record_disk(
        &self,
        volume: &str,
        node: &str,
        disk: tandem_raft::volume::DiskState,
        epoch: u64,
    ) -> Result<(), ApiError> {
        let report = tandem_http_api::ReplicaDiskReport { node: node.to_string(), disk, epoch };
        match self.route() {
            Route::Here => self.record_replica_disk(volume, report).await,
            Route::Leader(urls) => {
                let path = format!("/internal/volumes/{volume}/disk");
                match self.post_first::<_, serde_json::Value>(&urls, &path, &report, PEER_TIMEOUT).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(relay(e)),
                    Err(reason) => Err(ApiError::ForwardFailed { url: urls.join(","), reason }),
                }
            }
            Route::NoLeader => Err(ApiError::NoLeader),
            Route::NotMember => Err(ApiError::NotMember),
        }
    }
}

/// Where the live status of `r`, the volume of `g`, comes from: the node
/// its group runs on (`me` is this node).
fn volume_source(
    state: &ClusterState,
    me: NodeId,
    g: &GroupRecord,
    r: &tandem_raft::group::ResourceSpec,
) -> VolumeSource {
    let node = match (g.placement.phase, g.placement.node.and_then(|id| state.nodes.get(&id))) {
        (Phase::Started, Some(n)) => n,
        _ => return VolumeSource::None(format!("group {} is not running: the volume has no primary", g.name)),
    };
    if node.id == me {
        return VolumeSource::Here(node.name.clone(), r.name.clone());
    }
    match node.urls().into_iter().next() {
        Some(u) => VolumeSource::Remote(node.name.clone(), format!("{u}/internal/volumes/{}/local", r.name)),
        None => VolumeSource::None(format!("primary {} has no address", node.name)),
    }
}

impl Agent {
    /// The volume's primary: `None` for this node, else its API URLs.
    fn primary_of(&self, m: &Member, name: &str) -> Result<Option<Vec<String>>, ApiError> {
        let state = m.state.state();
        let (g, _) = state.volume_owner(name).ok_or_else(|| ApiError::VolumeNotFound(name.to_string()))?;
        match (g.placement.phase, g.placement.node.and_then(|id| state.nodes.get(&id))) {
            (Phase::Started, Some(n)) if n.id == m.node_id => Ok(None),
            (Phase::Started, Some(n)) => Ok(Some(n.urls())),
            _ => {
                Err(ApiError::NotPrimary(format!("volume {name} has no primary: its group {} is not running", g.name)))
            }
        }
    }

    /// POSTs a volume action to its primary; the primary's data-plane
    /// errors come back under their own codes.
    async fn ask_primary<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        urls: &[String],
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        match self.post_first::<B, T>(urls, path, body, VOLUME_ACTION_TIMEOUT).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(relay(e)),
            Err(reason) => Err(ApiError::ForwardFailed { url: urls.join(","), reason }),
        }
    }
}

/// Another node's volume error under its own code (not TND-1208).
fn relay(e: ApiError) -> ApiError {
    match e {
        ApiError::Refused { code, message, url, status, hint } => {
            ApiError::relayed(&code, message.clone()).unwrap_or(ApiError::Refused { url, status, code, message, hint })
        }
        other => other,
    }
}

/// The primary's live status of a volume, or why there is none.
async fn fetch_volume_status(
    http: &reqwest::Client,
    node: &str,
    url: &str,
) -> Result<tandem_http_api::LocalVolumeStatus, String> {
    let resp = http
        .get(url)
        .timeout(STATUS_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("primary {node} did not answer: {e}"))?;
    decode(url, resp).await.map_err(|e| match e {
        ApiError::Refused { code, message, .. } => format!("primary {node}: {code}: {message}"),
        other => format!("primary {node}: {other}"),
    })
}

fn replication_mode_name(m: tandem_raft::volume::ReplicationMode) -> String {
    match m {
        tandem_raft::volume::ReplicationMode::Sync => "sync".into(),
        tandem_raft::volume::ReplicationMode::Async => "async".into(),
    }
}

/// A volume as the API shows it: its replicas from the replicated state,
/// their live status from the primary (`live`), or, when that failed, the
/// recorded disk states, `Disconnected` and why.
fn volume_view(
    state: &ClusterState,
    g: &GroupRecord,
    r: &tandem_raft::group::ResourceSpec,
    spec: &tandem_raft::volume::VolumeSpec,
    live: Result<tandem_http_api::LocalVolumeStatus, String>,
) -> tandem_http_api::VolumeView {
    use tandem_http_api::{ConnectionState, ReplicaView, VolumeView};
    let name = r.name.clone();
    let primary = match g.placement.phase {
        Phase::Started => g.placement.node.and_then(|id| state.nodes.get(&id)).map(|n| n.name.clone()),
        _ => None,
    };
    let recorded = g.replica_disks.get(&name).cloned().unwrap_or_default();
    let recorded_disk =
        |node: &str| recorded.get(node).copied().unwrap_or(tandem_raft::volume::DiskState::Diskless).to_string();
    let replicas = tandem_raft::group::replica_nodes(&g.spec)
        .into_iter()
        .map(|node| {
            let reported = live.as_ref().ok().and_then(|l| l.replicas.iter().find(|x| x.node == node));
            if let Some(x) = reported {
                return x.clone();
            }
            let is_primary = primary.as_deref() == Some(node.as_str());
            let why = match &live {
                Err(e) => e.clone(),
                Ok(_) => format!("the primary does not report the replica on {node}"),
            };
            ReplicaView {
                role: if is_primary { "primary" } else { "secondary" }.into(),
                disk: recorded_disk(&node),
                connection: ConnectionState::Disconnected,
                mode: (!is_primary).then(|| replication_mode_name(spec.mode_for(&node))),
                out_of_sync_bytes: 0,
                resync: None,
                lag_bytes: None,
                last_error: Some(why),
                node,
            }
        })
        .collect();
    let live = live.ok();
    VolumeView {
        group: g.name.clone(),
        size_bytes: spec.size_bytes(),
        mode: replication_mode_name(spec.mode),
        primary,
        nbd: live.as_ref().and_then(|l| l.nbd.clone()),
        replicas,
        generation: live.as_ref().map(|l| l.generation.clone()),
        verify: live.and_then(|l| l.verify),
        recorded_disks: recorded.iter().map(|(n, d)| (n.clone(), d.to_string())).collect(),
        name,
    }
}

/// Maps the data plane's errors to the API's, keeping their codes.
fn volume_err(e: crate::volume::VolumeError) -> ApiError {
    use crate::volume::VolumeError as V;
    let message = e.to_string();
    match e {
        V::NotFound { .. } => ApiError::VolumeNotOnNode(message),
        V::NotPrimary { .. } => ApiError::NotPrimary(message),
        V::NoSuchReplica { .. } => ApiError::NoSuchReplica(message),
        V::NotSplitBrain { .. } => ApiError::NotSplitBrain(message),
        V::Refused { .. } => ApiError::VolumeRefused(message),
        V::VerifyRunning { .. } => ApiError::VerifyRunning(message),
        V::Io { .. } => ApiError::VolumeIo(message),
    }
}

/// A byte count with one decimal in the largest binary unit: `67.9GiB`.
fn human_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1u64 << shift {
            return format!("{:.1}{unit}", n as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{n}B")
}

/// Refuses a new volume larger than the free space of the file system that
/// holds `data_dir` (where this agent keeps its replicas).
fn check_free_space(
    data_dir: &std::path::Path,
    spec: &GroupSpec,
    r: &tandem_raft::group::ResourceSpec,
    v: &tandem_raft::volume::VolumeSpec,
) -> Result<(), ApiError> {
    let st = nix::sys::statvfs::statvfs(data_dir)
        .map_err(|e| ApiError::Storage(format!("statvfs {}: {e}", data_dir.display())))?;
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    if v.size_bytes() <= free {
        return Ok(());
    }
    let i = spec.resources.iter().position(|x| x.name == r.name).unwrap_or(0);
    Err(ApiError::VolumeTooLarge {
        field: format!("resources[{i}].size"),
        name: r.name.clone(),
        size: v.size.clone(),
        path: data_dir.display().to_string(),
        free: human_bytes(free),
    })
}

/// How long a claimed start waits for this node to apply its own claim.
const CLAIM_APPLY_WAIT: Duration = Duration::from_secs(1);

/// How often the volume replicas here are reconciled with the state even
/// when nothing changed.
const VOLUME_TICK: Duration = Duration::from_secs(1);

/// The data plane's way to the replicated state: replica disk states are
/// recorded through Raft under the group's epoch.
struct VolumeControl(std::sync::Weak<Agent>);

#[async_trait::async_trait]
impl crate::volume::engine::ControlPlane for VolumeControl {
    async fn record_disk(
        &self,
        volume: &str,
        node: &str,
        disk: tandem_raft::volume::DiskState,
        epoch: u64,
    ) -> Result<(), String> {
        let agent = self.0.upgrade().ok_or("the agent is stopping")?;
        agent.record_disk(volume, node, disk, epoch).await.map_err(|e| format!("{}: {e}", e.code()))
    }
}

impl Agent {
    /// Opens the replicas this node should hold, closes the others.
    async fn volume_round(&self) {
        let desired = match self.member() {
            Some(m) => crate::volume::desired::desired_volumes(&m.state.state(), &self.cfg.name),
            None => Vec::new(),
        };
        self.volumes.reconcile(desired).await;
    }
}

#[cfg(test)]
mod volume_api_tests {
    use super::*;
    use crate::volume::VolumeError;
    use tandem_http_api::{ConnectionState, LocalVolumeStatus, ReplicaView};

    #[test]
    fn data_plane_errors_keep_their_code_and_are_never_500() {
        let name = || "data".to_string();
        for e in [
            VolumeError::NotFound { name: name() },
            VolumeError::NotPrimary { name: name() },
            VolumeError::NoSuchReplica { name: name(), node: "n9".into() },
            VolumeError::NotSplitBrain { name: name(), node: "n2".into() },
            VolumeError::Refused { name: name(), reason: "r".into() },
            VolumeError::VerifyRunning { name: name() },
            VolumeError::Io { name: name(), source: std::io::Error::other("EIO") },
        ] {
            let code = e.code();
            let msg = e.to_string();
            let a = volume_err(e);
            assert_eq!((a.code(), a.to_string()), (code, msg));
            assert_ne!(a.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR, "{code}");
        }
    }

    /// Three nodes, group `db` with volume `data` on n1 and n2, running on n1.
    fn state() -> ClusterState {
        let node = |name: &str, port| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port,
            site: None,
            witness: false,
        };
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap { cluster_id: "c".into(), node_id: 1, node: node("n1", 1) }).unwrap();
        s.apply(&Command::AddNode { node: node("n2", 2) }).unwrap();
        s.apply(&Command::AddNode { node: node("n3", 3) }).unwrap();
        let spec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "data", "type": "volume", "size": "1GiB", "modes": {"n2": "async"}}],
            "nodes": ["n1", "n2", "n3"]
        }))
        .unwrap();
        s.apply(&Command::PutGroup { name: "db".into(), spec }).unwrap();
        s.apply(&Command::SetPlacement {
            name: "db".into(),
            expected_epoch: 0,
            node: Some(1),
            phase: Phase::Started,
            reason: "t".into(),
        })
        .unwrap();
        s.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "n2".into(),
            disk: tandem_raft::volume::DiskState::Outdated,
            epoch: 1,
        })
        .unwrap();
        s
    }

    fn view(s: &ClusterState, live: Result<LocalVolumeStatus, String>) -> tandem_http_api::VolumeView {
        let g = &s.groups["db"];
        let (r, v) = g.spec.volume().unwrap();
        volume_view(s, g, r, v, live)
    }

    #[test]
    fn without_the_primary_the_view_shows_the_recorded_states() {
        let s = state();
        let v = view(&s, Err("primary n1 did not answer".into()));
        assert_eq!((v.name.as_str(), v.group.as_str(), v.size_bytes), ("data", "db", 1 << 30));
        assert_eq!((v.primary.as_deref(), v.mode.as_str(), v.generation.as_deref()), (Some("n1"), "sync", None));
        let r: Vec<_> = v.replicas.iter().map(|r| (r.node.as_str(), r.role.as_str(), r.disk.as_str())).collect();
        assert_eq!(r, [("n1", "primary", "UpToDate"), ("n2", "secondary", "Outdated")]);
        assert!(v.replicas.iter().all(|r| r.connection == ConnectionState::Disconnected
            && r.last_error.as_deref() == Some("primary n1 did not answer")));
        assert_eq!((v.replicas[0].mode.as_deref(), v.replicas[1].mode.as_deref()), (None, Some("async")));
        assert_eq!(v.recorded_disks["n2"], "Outdated");
        // A stopped group has no primary.
        let mut stopped = s.clone();
        stopped.groups.get_mut("db").unwrap().placement = Default::default();
        assert_eq!(view(&stopped, Err("x".into())).primary, None);
    }

    #[test]
    fn the_primary_live_status_wins_where_it_reports() {
        let s = state();
        let live = LocalVolumeStatus {
            name: "data".into(),
            role: "primary".into(),
            size_bytes: 1 << 30,
            nbd: Some("nbd+unix:///data?socket=/run/x.sock".into()),
            replicas: vec![ReplicaView {
                node: "n1".into(),
                role: "primary".into(),
                disk: "UpToDate".into(),
                connection: ConnectionState::Connected,
                mode: None,
                out_of_sync_bytes: 0,
                resync: None,
                lag_bytes: None,
                last_error: None,
            }],
            generation: "00ff".into(),
            verify: None,
        };
        let v = view(&s, Ok(live));
        assert_eq!(v.replicas[0].connection, ConnectionState::Connected);
        assert_eq!(v.generation.as_deref(), Some("00ff"));
        assert!(v.nbd.is_some());
        // A replica the primary leaves out still shows, with why.
        assert_eq!(v.replicas[1].node, "n2");
        assert_eq!(v.replicas[1].connection, ConnectionState::Disconnected);
        assert!(v.replicas[1].last_error.as_deref().is_some_and(|e| e.contains("does not report")));
    }

    #[test]
    fn free_space_is_checked_against_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let spec: GroupSpec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "app", "type": "process", "command": ["x"]},
                          {"name": "big", "type": "volume", "size": "16TiB"}],
            "nodes": ["n1", "n2"]
        }))
        .unwrap();
        let (r, v) = spec.volume().unwrap();
        match check_free_space(dir.path(), &spec, r, v) {
            Err(e @ ApiError::VolumeTooLarge { .. }) => {
                assert_eq!((e.code(), e.status().as_u16()), ("TND-1410", 422));
                assert!(e.to_string().contains("resources[1].size"), "{e}");
            }
            other => panic!("a 16TiB volume fits in a temp dir? {other:?}"),
        }
        assert_eq!(human_bytes(3 << 29), "1.5GiB");
    }
}
