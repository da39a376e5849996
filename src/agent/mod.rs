//! The node agent: owns this node's Raft instance, its liveness view, its
//! lease, the groups it runs and the volumes it holds, and serves the REST
//! API through [`tandem_http_api::Backend`].
//!
//! This is the imperative shell: it talks to disks, sockets, processes and
//! clocks, and hands every decision to a pure module (`state` for commands,
//! `scheduler` for placements, `autopilot` for voters, and the lease,
//! reconciler and failover cores). It must never decide inline what a pure
//! module can decide. One file per responsibility:
//!
//! - `raft_ops`: openraft calls and their errors; `peers`: calls to other
//!   agents and to the leader;
//! - `membership`: bootstrap, join, adopt, remove, autopilot;
//! - `lease`: heartbeats, stepping out, the lease and its lapse;
//! - `groups`: claims, the executor round, reports, group views;
//! - `failover`: the leader's scheduler round and fencing (STONITH);
//! - `views`, `volumes`, `backend` (the REST API), `loops` (the process).
//!
//! Membership changes are serialised by one lock, because openraft refuses
//! overlapping ones and a half-done join must not race a removal.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use tandem_http_api::{
    AdoptRequest, ApiError, Backend, ClaimRequest, ClusterView, ErrorBody, GroupAction, GroupEvent, GroupReport,
    GroupView, InitRequest, JoinRequest, JoinViaRequest, LocalGroupStatus, LocalView, NodeState, NodeView, PathView,
    ReleaseRequest, ResourceView, Role, Route,
};
use tandem_raft::group::{GroupRecord, GroupSpec, Phase};
use tandem_raft::network::Network;
use tandem_raft::state::{api_urls, validate_name, AdminState, ClusterState, Command, NodeRecord, NodeSpec, Reply};
use tandem_raft::store::{Db, Identity, StateHandle};
use tandem_raft::{NodeId, Peer, Raft, RaftMetrics, VersionedCommand};
use tracing::Instrument;

use crate::autopilot::{self, Candidate};
use crate::clock::{local_minute_of_day, now_boot_ms};
use crate::config::Config;
use crate::executor::{Executor, LeaseGuard};
use crate::failover::{Escalation, Failover, Policy};
use crate::lease::LeaseCore;
use crate::liveness::{HeartbeatSockets, Liveness};
use crate::reconcile::{LeaseView, Report};
use crate::rundir::{Lease, RunDir};
use crate::scheduler::{NodeInfo, Scheduler};

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
/// How often the executor runs (changes to the state wake it at once).
const GROUP_TICK: Duration = Duration::from_millis(100);
/// The least time between two rounds of a loop woken by state changes.
const CHANGE_GAP: Duration = Duration::from_millis(10);
/// How often the leader's scheduler looks at liveness: a dead node's
/// groups move at most this long after its fencing wait ends (changes to
/// the state wake it at once).
const SCHEDULER_TICK: Duration = Duration::from_millis(50);
/// How long a group's GET waits for the node running it to describe its
/// resources (the answer goes without them past that).
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);
/// How often the lease is checked: a lapse kills everything local within
/// this of the lease's end.
const LEASE_TICK: Duration = Duration::from_millis(100);

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
    /// Node-to-node calls: mutual TLS with the cluster CA.
    http: reqwest::Client,
    /// The leader's calls to an agent that is not a member yet.
    unverified_http: reqwest::Client,
    /// The CA, this node's certificate, the TLS policy.
    pub(crate) tls: Arc<crate::security::tls::Tls>,
    /// What a non-member serves (self-signed, trusted by nobody).
    bootstrap: crate::security::pki::NodeMaterial,
    tls_files: crate::security::files::TlsFiles,
    /// A join this agent started: the CA it pinned and the key it made.
    pending_join: std::sync::Mutex<Option<PendingJoin>>,
    /// The operator's files (`[tls] ca_file` …) as last taken into use.
    external_tls: std::sync::Mutex<Option<crate::config::ExternalTls>>,
    /// Audit entries waiting to be replicated (bounded).
    audit_queue: std::sync::Mutex<AuditQueue>,
    /// Events this node observed, waiting to be replicated (bounded).
    event_sink: events::EventSink,
    /// What this node last saw of leadership and liveness (events on change).
    observed: std::sync::Mutex<events::Observed>,
    /// On the leader: one sender per alert.
    alert_senders: std::sync::Mutex<alerts::AlertSenders>,
    /// What this node last saw of the volumes it is the primary of.
    volume_seen: std::sync::Mutex<BTreeMap<String, crate::volume_events::Seen>>,
    /// Per volume this node is primary of: when its out-of-sync bytes were
    /// last sent to be recorded (at most one record a second).
    out_of_sync_sent: std::sync::Mutex<BTreeMap<String, Instant>>,
    membership_lock: tokio::sync::Mutex<()>,
    /// On the leader: the heartbeat key generation whose previous key is
    /// still accepted, and since when this node has seen it so.
    previous_heartbeat_key: std::sync::Mutex<Option<(u32, Instant)>>,
    /// Runs the groups placed on this node; present while a member.
    executor: tokio::sync::Mutex<Option<Executor>>,
    /// The lease, its lapse and stepping out: the decisions (pure).
    lease: std::sync::Mutex<LeaseCore>,
    /// The persisted lease deadline and the resource processes the lease
    /// timer kills when the lease lapses.
    guard: Arc<LeaseGuard>,
    /// The lease files and the records of what runs here.
    run: RunDir,
    /// On the leader: which silent nodes' groups may move, the fence
    /// command's attempts and the escalated nodes (pure).
    failover: Arc<std::sync::Mutex<Failover>>,
    /// On the leader: since when each group failure was seen, to expire it.
    failure_clock: std::sync::Mutex<crate::scheduler::FailureClock>,
    /// On the leader: the inputs of the last scheduler round that decided
    /// nothing (see `scheduler_round`).
    scheduler_idle: std::sync::Mutex<Option<failover::SchedulerInputs>>,
    /// The volume replicas on this node.
    pub(crate) volumes: Arc<crate::volume::manager::VolumeManager>,
    /// What `GET /metrics` counts as it happens (the rest is sampled).
    pub(crate) counters: crate::metrics::Counters,
    /// Set by the Raft network when a peer answers that a recovery of the
    /// cluster superseded this node; the agent then stops taking part.
    superseded_notice: Arc<std::sync::Mutex<Option<String>>>,
    /// On the leader: superseded members that acknowledged being told.
    superseded_told: std::sync::Mutex<BTreeSet<NodeId>>,
    /// Catch-ups with the leader for unknown credentials in the current
    /// second: (its start, how many).
    catch_ups: std::sync::Mutex<(Instant, u32)>,
    /// This cluster's part in the ticket between sites (`[ticket]`).
    ticket: Option<Arc<ticket::TicketSite>>,
}

/// At most this many read indexes a second for credentials a follower does
/// not know (yet).
const CATCH_UPS_PER_SECOND: u32 = 20;
/// How long a catch-up may take (asking the leader, then applying).
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

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

/// What a joining agent sends: the client pinned to the cluster's CA, and
/// a signing request (the cluster's own CA) or its certificate (an
/// operator's CA).
pub(crate) type JoinBody = (reqwest::Client, Option<String>, Option<String>);

/// A join in progress, from this agent's side.
#[derive(Clone)]
pub(crate) struct PendingJoin {
    pub ca_pem: String,
    pub key_pem: String,
}

/// Most audit entries a node holds while it cannot replicate them.
const AUDIT_QUEUE_MAX: usize = 10_000;

#[derive(Default)]
pub(crate) struct AuditQueue {
    pub entries: std::collections::VecDeque<tandem_raft::access::AuditEntry>,
    /// Entries dropped because the queue was full (reported in the log).
    pub dropped: u64,
}

impl Agent {
    pub fn new(cfg: Config, db: Db, liveness: Arc<Liveness>) -> anyhow::Result<Agent> {
        use crate::security::{files::TlsFiles, pki, tls};
        tandem_raft::state::set_plaintext(!cfg.tls.enabled);
        let bootstrap = pki::bootstrap_cert(&cfg.name, &cfg.addresses)?;
        let tls = tls::Tls::new(cfg.tls.enabled, cfg.tls.external(), &bootstrap)?;
        let tls_files = TlsFiles::new(&cfg.data_dir);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let external = cfg.tls.read_external(&cfg.name, now).map_err(|(key, m)| anyhow::anyhow!("{key}: {m}"))?;
        match (&external, db.identity()?) {
            (Some(_), Some(_)) if tls_files.node()?.is_some() => anyhow::bail!(
                "this node joined its cluster with the cluster's own CA ({}), but [tls] ca_file is set: mixing \
                 the cluster's CA and an operator's is refused. Remove ca_file, cert_file and key_file, or remove \
                 the node from the cluster, wipe data_dir and join again",
                cfg.data_dir.join("tls").display()
            ),
            (Some(files), Some(identity)) => {
                let node = pki::NodeMaterial { cert_pem: files.cert_pem.clone(), key_pem: files.key_pem.clone() };
                tls.install(&identity.cluster_id, &files.ca_pem, &node)?;
            }
            (None, Some(identity)) => {
                if let (Some(ca_pem), Some(node)) = (tls_files.ca_pem()?, tls_files.node()?) {
                    tls.install(&identity.cluster_id, &ca_pem, &node)?;
                }
            }
            (_, None) => {}
        }
        let http = tls::http_client(&tls, tls.peer_client_config(), Duration::from_secs(2));
        let unverified_http = tls::http_client(&tls, tls.unverified_client_config(), Duration::from_secs(2));
        let ticket = match &cfg.ticket {
            Some(t) => {
                let http = tls::http_client(&tls, tls.sealed_client_config(), Duration::from_secs(2));
                Some(Arc::new(ticket::TicketSite::new(t.clone(), http).map_err(|e| anyhow::anyhow!("[ticket]: {e}"))?))
            }
            None => None,
        };
        // A restarted agent holds the lease its predecessor held (and adopts
        // what it ran): never longer, never renewed but from a majority heard.
        let run = RunDir::new(&cfg.data_dir, cfg.fencing.watchdog_device.clone());
        let inherited = match run.read_lease() {
            Lease::Until(d) => d,
            Lease::Released | Lease::Missing => 0,
        };
        let lease = LeaseCore::new(cfg.fencing.lease_ms, inherited);
        if ticket.is_some() {
            // Its ticket groups run on (adopted) as long as this node had
            // seen its site hold the ticket, unless the leader says more.
            liveness.restore_ticket_gate(run.read_ticket_gate());
        }
        let failover = Failover::new(Policy {
            fence_command: !cfg.fencing.fence_command.is_empty(),
            fenced_after: cfg.fenced_after(),
        });
        let counters =
            crate::metrics::Counters { log_append_seconds: db.stats().append_seconds.clone(), ..Default::default() };
        let event_sink = events::EventSink::new(cfg.name.clone());
        Ok(Agent {
            superseded_notice: Default::default(),
            superseded_told: Default::default(),
            ticket,
            catch_ups: std::sync::Mutex::new((Instant::now(), 0)),
            counters,
            event_sink,
            lease: std::sync::Mutex::new(lease),
            failover: Arc::new(std::sync::Mutex::new(failover)),
            failure_clock: Default::default(),
            scheduler_idle: Default::default(),
            cfg,
            db,
            liveness,
            member: RwLock::new(None),
            http,
            unverified_http,
            tls,
            bootstrap,
            tls_files,
            pending_join: Default::default(),
            external_tls: std::sync::Mutex::new(external),
            audit_queue: Default::default(),
            observed: Default::default(),
            alert_senders: Default::default(),
            volume_seen: Default::default(),
            out_of_sync_sent: Default::default(),
            membership_lock: tokio::sync::Mutex::new(()),
            previous_heartbeat_key: Default::default(),
            executor: tokio::sync::Mutex::new(None),
            guard: Arc::new(LeaseGuard::new(inherited)),
            run,
            volumes: Default::default(),
        })
    }

    /// The lease core (held only for a call, never across an await).
    fn lease_core(&self) -> std::sync::MutexGuard<'_, LeaseCore> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds left on this node's own lease (0: not held).
    fn own_lease_left_ms(&self) -> u64 {
        let now_ms = now_boot_ms();
        let lease = self.lease_core();
        if lease.holds(now_ms) {
            lease.deadline_ms().saturating_sub(now_ms)
        } else {
            0
        }
    }

    /// The failover core (held only for a call, never across an await).
    fn failover_core(&self) -> std::sync::MutexGuard<'_, Failover> {
        self.failover.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn member(&self) -> Option<Arc<Member>> {
        self.member.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn require_member(&self) -> Result<Arc<Member>, ApiError> {
        self.member().ok_or_else(|| self.not_member())
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
        let builder = crate::security::tls::client_builder(&self.tls, self.tls.peer_client_config());
        let (notice, guard) = (self.superseded_notice.clone(), self.guard.clone());
        let network = Network::new(identity.cluster_id.clone(), builder, Duration::from_millis(500))
            .context("raft network client")?
            .on_superseded(Arc::new(move |why: &str| recovery::stand_down(&guard, &notice, why.to_string())));
        let (log, sm, state) = self.db.raft_storage().context("opening raft storage")?;
        // A root span: Raft's tasks outlive the API request that may start them.
        let span = tracing::info_span!(parent: None, "raft", node_id = identity.node_id);
        let raft = Raft::new(identity.node_id, Arc::new(config), network, log, sm)
            .instrument(span)
            .await
            .context("starting raft")?;
        let m = Arc::new(Member { node_id: identity.node_id, cluster_id: identity.cluster_id.clone(), raft, state });
        let mut executor = Executor::new(
            identity.node_id,
            self.cfg.name.clone(),
            self.cfg.data_dir.clone(),
            self.guard.clone(),
            self.run.clone(),
        );
        executor.set_events(self.executor_events(m.state.clone()));
        *self.executor.lock().await = Some(executor);
        *self.member.write().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
        self.watch_for_metrics(&m);
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
}

mod alerts;
mod backend;
mod events;
mod failover;
mod groups;
mod health;
mod lease;
mod loops;
mod membership;
mod metrics;
mod peers;
mod promote;
mod raft_ops;
mod recovery;
mod security;
mod sites;
mod ticket;
mod views;
mod volumes;

pub use loops::{run, StorageFailed};

// The modules' helpers, for one another (each keeps them `pub(super)`).
use membership::*;
use peers::*;
use volumes::*;
