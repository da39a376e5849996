//! tandem's REST layer: routes, request and response types, error mapping,
//! leader forwarding, the OpenAPI document, and the web dashboard's static
//! files (`ui`).
//!
//! Handlers parse, call the [`Backend`] (implemented by the daemon), and
//! render. This crate must never hold cluster logic: it does not decide,
//! it translates. Every error leaves through [`ApiError`], which alone maps
//! errors to HTTP statuses.

pub mod auth;
pub mod contract;
pub mod error;
pub mod listen;
pub mod types;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tandem_raft::network::{HEADER_CLUSTER, HEADER_TARGET, PATH_APPEND, PATH_SNAPSHOT, PATH_VOTE};
use tandem_raft::state::AdminState;
use tandem_raft::{NodeId, Raft, TypeConfig};
use utoipa::OpenApi;

pub use error::{ApiError, ErrorBody};
pub use types::*;

/// Largest request body accepted (Raft snapshot chunks excepted). Room for
/// the longest valid definition even when a client escapes every character
/// as JSON `\uXXXX` (12 bytes for one outside the BMP), so a field one past
/// its maximum is refused for what it says (400), not for its size (413).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Largest Raft RPC body: log batches and snapshot chunks.
pub const MAX_RAFT_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Header set on a request forwarded to the leader, naming the forwarder.
pub const HEADER_FORWARDED: &str = "x-tandem-forwarded-by";
/// How often a forwarded request checks that its leader is still heard.
const LEADER_CHECK: Duration = Duration::from_millis(100);
/// How long a forwarded request may wait for a leader this node no longer
/// routes to.
const LEADER_GRACE: Duration = Duration::from_secs(2);
/// How long a forwarded request may take at the leader.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long forwarding waits to connect to the leader before answering 503.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a cluster-wide request is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node is the leader.
    Here,
    /// Another node leads; the base URLs of its API, one per network path.
    Leader(Vec<String>),
    /// A member, but no leader is known.
    NoLeader,
    /// Not a member of any cluster.
    NotMember,
}

/// What the API needs from the node daemon.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// This agent's name (for logs and forwarding headers).
    fn name(&self) -> String;
    /// Where cluster-wide requests must go right now.
    fn route(&self) -> Route;
    /// Why this node is not a member: `NotMember`, or `Superseded` when a
    /// recovery of its cluster went on without it.
    fn not_member(&self) -> ApiError {
        ApiError::NotMember
    }
    /// On a follower: waits until this node has applied everything the
    /// leader committed (a read index); false when it could not or need not.
    /// Bounded in rate: unknown credentials must not turn into a flood of
    /// leader round trips.
    async fn catch_up(&self) -> bool {
        false
    }
    fn local(&self) -> LocalView;
    /// Member of a cluster that has a leader.
    fn ready(&self) -> Result<(), ApiError>;

    async fn cluster(&self, stale: bool) -> Result<ClusterView, ApiError>;
    async fn nodes(&self, stale: bool) -> Result<Vec<NodeView>, ApiError>;
    async fn node(&self, name: &str, stale: bool) -> Result<NodeView, ApiError>;
    async fn add_node(&self, req: JoinRequest) -> Result<NodeView, ApiError>;
    async fn remove_node(&self, name: &str, force: bool) -> Result<(), ApiError>;
    async fn set_admin_state(&self, name: &str, state: AdminState) -> Result<NodeView, ApiError>;
    async fn set_attribute(&self, name: &str, key: &str, value: String) -> Result<NodeView, ApiError>;
    /// Quorum-loss recovery on this node (never forwarded: there is no
    /// leader to forward to).
    async fn recover(&self, dry_run: bool, req: RecoverRequest) -> Result<RecoverReport, ApiError>;
    /// The refusal of a Raft call from `node` when a recovery superseded it.
    fn superseded(&self, node: NodeId) -> Option<ApiError>;
    async fn sites(&self, stale: bool) -> Result<Vec<SiteView>, ApiError>;
    /// Sets every node of the site at once (one command).
    async fn set_site_admin_state(&self, site: &str, state: AdminState) -> Result<SiteView, ApiError>;
    /// Puts the site in standby and waits (bounded) for its groups to run
    /// elsewhere, reporting each one's outage and RPO.
    async fn switchover_site(&self, site: &str, req: SwitchoverRequest) -> Result<SwitchoverReport, ApiError>;
    async fn delete_attribute(&self, name: &str, key: &str) -> Result<NodeView, ApiError>;

    async fn groups(&self, stale: bool) -> Result<Vec<GroupView>, ApiError>;
    async fn group(&self, name: &str, stale: bool) -> Result<GroupView, ApiError>;
    /// Creates or replaces; the bool says whether it was created.
    async fn put_group(&self, name: &str, spec: tandem_raft::group::GroupSpec) -> Result<(GroupView, bool), ApiError>;
    async fn delete_group(&self, name: &str) -> Result<(), ApiError>;
    async fn group_action(&self, name: &str, action: GroupAction) -> Result<GroupView, ApiError>;
    async fn move_group(&self, name: &str, to: &str) -> Result<GroupView, ApiError>;
    /// On the leader: what a node reports about a group placed on it.
    async fn group_report(&self, name: &str, report: GroupReport) -> Result<(), ApiError>;
    /// On the leader: a node's claim to start a group placed on it.
    async fn claim_group(&self, name: &str, claim: ClaimRequest) -> Result<(), ApiError>;
    /// What this node runs of a group (404 when nothing).
    async fn local_group(&self, name: &str) -> Result<LocalGroupStatus, ApiError>;
    /// For load balancers: whether this node serves the group now (runs it,
    /// every resource up, and holds its lease). Never forwarded.
    async fn group_health(&self, name: &str) -> ServingView;
    /// For load balancers: whether this node is the volume's primary
    /// (`None`) or a connected, up-to-date replica at most `lag` bytes
    /// behind (`Some(lag)`). Never forwarded.
    async fn volume_health(&self, name: &str, replica_lag: Option<u64>) -> ServingView;

    async fn volumes(&self, stale: bool) -> Result<Vec<VolumeView>, ApiError>;
    async fn volume(&self, name: &str, stale: bool) -> Result<VolumeView, ApiError>;
    /// Starts an online verify on the volume's primary (asked over
    /// `/internal/volumes/{name}/verify`).
    async fn verify_volume(&self, name: &str) -> Result<VerifyReport, ApiError>;
    /// Discards `discard`'s changes after a split brain (on the primary,
    /// over `/internal/volumes/{name}/resolve`).
    async fn resolve_volume(&self, name: &str, discard: &str) -> Result<VolumeView, ApiError>;
    /// Replaces `node`'s replica of a volume (`ReplaceReplica` on the
    /// leader): recorded `Inconsistent` at once; its node then recreates the
    /// files and the primary resyncs it in full.
    async fn replace_replica(&self, name: &str, node: &str) -> Result<VolumeView, ApiError>;
    /// Forced promotion of an `Outdated` replica when no `UpToDate` one is
    /// online (`PromoteReplica` on the leader), or with `dry_run` only what
    /// each candidate would give up.
    async fn promote_volume(&self, name: &str, dry_run: bool, req: PromoteRequest) -> Result<PromoteReport, ApiError>;
    /// What this node's data plane knows of a volume.
    async fn local_volume(&self, name: &str) -> Result<LocalVolumeStatus, ApiError>;
    async fn local_volume_verify(&self, name: &str) -> Result<VerifyReport, ApiError>;
    async fn local_volume_resolve(&self, name: &str, discard: &str) -> Result<(), ApiError>;
    /// On the leader: records a replica's disk state for the volume's
    /// primary (`SetReplicaDisk`, refused unless `report.epoch` is current).
    async fn record_replica_disk(&self, name: &str, report: ReplicaDiskReport) -> Result<(), ApiError>;
    /// On the leader: records the out-of-sync bytes a volume's primary
    /// tracks (`RecordOutOfSync`, refused unless `report.epoch` is current).
    async fn record_out_of_sync(&self, name: &str, report: OutOfSyncReport) -> Result<(), ApiError>;
    /// A recovered cluster's leader says this node was superseded (taken
    /// only while this node hears no leader).
    async fn superseded_notice(&self, notice: SupersededNotice) -> Result<(), ApiError>;
    /// On the leader: the ticket between sites as this cluster sees it.
    async fn ticket(&self) -> Result<TicketView, ApiError>;
    /// On the leader: ask for the ticket (`true`) or give it back and stop
    /// asking (`false`).
    async fn ticket_want(&self, wanted: bool) -> Result<TicketView, ApiError>;
    /// On the leader: a sealed ticket request from another participant,
    /// answered sealed (body, seal).
    fn ticket_request(&self, body: &[u8], seal: &str) -> Result<(Vec<u8>, String), ApiError>;

    async fn init(&self, req: InitRequest) -> Result<InitView, ApiError>;
    async fn join_via(&self, req: JoinViaRequest) -> Result<LocalView, ApiError>;
    async fn adopt(&self, req: AdoptRequest) -> Result<LocalView, ApiError>;
    async fn release(&self, req: ReleaseRequest) -> Result<(), ApiError>;

    // ---- security ----

    /// The token whose secret this is: its name and role. Unknown, expired
    /// or revoked → `TokenRejected`.
    fn authenticate(&self, secret: &str) -> Result<(String, tandem_raft::access::Role), ApiError>;
    /// Whether node `id` named `name` is a current member (a removed node's
    /// certificate stays valid cryptographically; this refuses it).
    fn is_member_node(&self, id: NodeId, name: &str) -> bool;
    /// Operator's CA: the member whose certificate key pin is `spki`
    /// (`cn`: the certificate's common name, for an agent without the log yet).
    fn member_by_key(&self, spki: &str, cn: &str) -> Option<listen::PeerNode>;
    /// Queues an audit entry for replication (bounded; never blocks).
    fn record_audit(&self, entry: tandem_raft::access::AuditEntry);
    /// The node-to-node HTTP client (mutual TLS), for forwarding.
    fn peer_http(&self) -> reqwest::Client;
    async fn create_token(&self, req: TokenRequest, by: String) -> Result<TokenCreated, ApiError>;
    async fn tokens(&self) -> Result<Vec<TokenView>, ApiError>;
    async fn revoke_token(&self, name: &str) -> Result<(), ApiError>;
    async fn join_token(&self, req: JoinTokenRequest, by: String) -> Result<JoinTokenView, ApiError>;
    async fn audit(&self, since: u64, limit: usize) -> Result<Vec<tandem_raft::access::AuditEntry>, ApiError>;
    /// On the leader: audit entries that another node recorded.
    async fn record_audit_batch(&self, entries: Vec<tandem_raft::access::AuditEntry>) -> Result<(), ApiError>;

    // ---- events ----

    /// Events after `since` from this node's applied state.
    fn events(
        &self,
        since: u64,
        filter: &tandem_raft::events::EventFilter,
        limit: usize,
    ) -> Result<tandem_raft::events::EventPage, ApiError>;
    /// Changes whenever this node applies a log entry (the stream waits on it).
    fn event_changes(&self) -> Result<tokio::sync::watch::Receiver<u64>, ApiError>;
    /// On the leader: events that another node observed.
    async fn record_event_batch(&self, events: Vec<tandem_raft::events::Event>) -> Result<(), ApiError>;
    fn cluster_ca(&self) -> Result<CaView, ApiError>;
    /// Creates or replaces an alert; the bool says whether it was created.
    async fn put_alert(
        &self,
        name: &str,
        spec: tandem_raft::alerts::AlertSpec,
        by: String,
    ) -> Result<(AlertView, bool), ApiError>;
    async fn alerts(&self, stale: bool) -> Result<Vec<AlertView>, ApiError>;
    async fn alert(&self, name: &str, stale: bool) -> Result<AlertView, ApiError>;
    async fn delete_alert(&self, name: &str) -> Result<(), ApiError>;
    /// Sends a test alert to the target now (on the leader), once.
    async fn test_alert(&self, name: &str) -> Result<AlertTested, ApiError>;
    /// The recorded client certificate with this key pin: its name and
    /// role. Unknown, revoked or expired → `CertificateRejected`.
    fn authenticate_cert(&self, spki: &str) -> Result<(String, tandem_raft::access::Role), ApiError>;
    async fn create_certificate(&self, req: CertificateRequest, by: String) -> Result<ClientCertCreated, ApiError>;
    async fn certificates(&self) -> Result<Vec<ClientCertView>, ApiError>;
    async fn revoke_certificate(&self, name: &str) -> Result<(), ApiError>;
    /// On the leader: member `node` (named by its current certificate) pins its new one.
    async fn pin_node_certificate(&self, node: &str, req: NodeCertRequest) -> Result<(), ApiError>;
    /// On the leader: a new certificate for member `node` (named by its own certificate).
    async fn renew_certificate(&self, node: &str, req: RenewRequest) -> Result<CertificateView, ApiError>;
    /// The CA key, for a voter that lacks it.
    async fn ca_key(&self, node: &str) -> Result<CaKeyView, ApiError>;

    // ---- metrics ----

    /// `GET /metrics`: this node's series in Prometheus's text format.
    async fn metrics(&self) -> String;
    /// Counts an answered request by method, route template and status.
    fn count_request(&self, method: &str, route: &str, status: u16);

    /// Whether `id` is in this node's latest Raft membership.
    fn is_member(&self, id: NodeId) -> bool;
    /// The local Raft instance, if it is the node `target` of `cluster`.
    fn raft_for(&self, target: NodeId, cluster: &str) -> Result<Raft, ApiError>;
}

pub type SharedBackend = Arc<dyn Backend>;

/// How much of an oversize body is read and thrown away before the 413 is
/// sent. Closing a connection with unread bytes makes the kernel send a
/// reset, and over TLS the client then loses the 413 it has not read yet;
/// draining lets it finish writing and read the answer. Past this cap (or
/// the time limit) the connection is simply closed.
const DRAIN_CAP_BYTES: usize = 8 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads a request body of at most `limit` bytes; a longer one is drained
/// (bounded, see [`DRAIN_CAP_BYTES`]) and refused with 413 TND-1003.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut kept: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|e| ApiError::InvalidBody(format!("reading the body: {e}")))?.into_data()
            else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen > DRAIN_CAP_BYTES {
                break;
            }
            if seen <= limit {
                kept.extend_from_slice(&data);
            }
        }
        Ok::<(), ApiError>(())
    };
    match tokio::time::timeout(DRAIN_TIME, read).await {
        Ok(Err(e)) if seen <= limit => return Err(e),
        Err(_) if seen <= limit => return Err(ApiError::InvalidBody("the body was not sent in time".into())),
        _ => {}
    }
    if seen > limit {
        return Err(ApiError::BodyTooLarge { limit });
    }
    Ok(Bytes::from(kept))
}

/// JSON body extractor whose every rejection is an [`ApiError`]. It ignores
/// the Content-Type (so `curl -d` works) and treats an empty body as `{}`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body(), MAX_BODY_BYTES).await?;
        // serde reads a JSON array as a struct of the same fields in order:
        // every body here is an object, so an array is refused as such.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(ApiError::InvalidBody("the body must be a JSON object, not an array".into()));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// A Raft RPC's body: up to [`MAX_RAFT_BODY_BYTES`] (a snapshot, a batch of
/// entries), never the API's small-request limit.
pub struct RaftJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for RaftJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body(), MAX_RAFT_BODY_BYTES).await?;
        serde_json::from_slice(&bytes).map(RaftJson).map_err(|e| ApiError::InvalidBody(e.to_string()))
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.iter().all(|b| b.is_ascii_whitespace()) { &b"{}"[..] } else { bytes };
    serde_json::from_slice(bytes).or_else(|e| match e.classify() {
        // JSON has one number type: `5.0` is the integer 5 to JSON Schema,
        // so it is one here too (tried only when the plain parse fails).
        serde_json::error::Category::Data => serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|mut v| integral(&mut v).then(|| serde_json::from_value(v).ok()).flatten())
            .ok_or_else(|| ApiError::InvalidBody(e.to_string())),
        _ => Err(ApiError::MalformedJson(e.to_string())),
    })
}

/// Rewrites every whole-number float (`5.0`) in `v` as an integer; says
/// whether it changed anything.
fn integral(v: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            let whole = if f.fract() != 0.0 {
                None
            } else if (0.0..18_446_744_073_709_551_615.0).contains(&f) {
                Some(Value::from(f as u64))
            } else if (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                Some(Value::from(f as i64))
            } else {
                None
            };
            whole.map(|w| *v = w).is_some()
        }
        Value::Array(a) => a.iter_mut().fold(false, |c, x| integral(x) | c),
        Value::Object(o) => o.values_mut().fold(false, |c, x| integral(x) | c),
        _ => false,
    }
}

/// Query extractor whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded_like(q).map(ApiQuery)
    }
}

/// Parses `a=b&c=d` into `T` through a JSON object of strings (a key
/// without `=` has the value ""); flags read them with [`flag`].
fn serde_urlencoded_like<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
    let mut map = serde_json::Map::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| ApiError::InvalidQuery(e.to_string()))
}

/// A query flag: `true`, `1` or nothing (`?stale`) set it; `false` or `0`
/// clear it; anything else is refused.
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match String::deserialize(d)?.as_str() {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(serde::de::Error::custom(format!("{other:?} is not true or false"))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// Serve this node's copy without asking the leader.
    #[serde(default, deserialize_with = "flag")]
    pub stale: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    /// Remove the node even though it cannot be told to leave.
    #[serde(default, deserialize_with = "flag")]
    pub force: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// Builds the full router: public API, internal Raft RPCs, OpenAPI.
pub fn router(backend: SharedBackend) -> Router {
    // A leader that went away must fail fast (503, retry), not hang the client.
    let forwarder = Forwarder { backend: backend.clone() };
    let cluster_routes = Router::new()
        .route("/v1/cluster", get(get_cluster))
        .route("/v1/nodes", get(list_nodes).post(add_node))
        .route("/v1/nodes/{name}", get(get_node).delete(remove_node))
        .route("/v1/nodes/{name}/standby", post(set_standby))
        .route("/v1/nodes/{name}/online", post(set_online))
        .route("/v1/nodes/{name}/maintenance", post(set_maintenance))
        .route("/v1/nodes/{name}/attributes/{key}", put(set_attribute).delete(delete_attribute))
        .route("/v1/sites", get(list_sites))
        .route("/v1/sites/{site}/standby", post(set_site_standby))
        .route("/v1/sites/{site}/online", post(set_site_online))
        .route("/v1/sites/{site}/switchover", post(switchover_site))
        .route("/v1/groups", get(list_groups))
        .route("/v1/groups/{name}", get(get_group).put(put_group).delete(delete_group))
        .route("/v1/groups/{name}/start", post(start_group))
        .route("/v1/groups/{name}/stop", post(stop_group))
        .route("/v1/groups/{name}/clear", post(clear_group))
        .route("/v1/groups/{name}/move", post(move_group))
        .route("/internal/groups/{name}/report", post(group_report))
        .route("/internal/groups/{name}/claim", post(claim_group))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{name}", get(get_volume))
        .route("/v1/volumes/{name}/verify", post(verify_volume))
        .route("/v1/volumes/{name}/resolve", post(resolve_volume))
        .route("/v1/volumes/{name}/replicas/{node}/replace", post(replace_replica))
        .route("/v1/volumes/{name}/promote", post(promote_volume))
        .route("/internal/volumes/{name}/disk", post(record_replica_disk))
        .route("/internal/volumes/{name}/out-of-sync", post(record_out_of_sync))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/v1/cluster/join-token", post(join_token))
        .route("/v1/certificates", get(list_certificates).post(create_certificate))
        .route("/v1/certificates/{name}", axum::routing::delete(revoke_certificate))
        .route("/internal/node-certificate", post(pin_node_certificate))
        .route("/v1/audit", get(get_audit))
        .route("/v1/alerts", get(list_alerts))
        .route("/v1/alerts/{name}", get(get_alert).put(put_alert).delete(delete_alert))
        .route("/v1/alerts/{name}/test", post(test_alert))
        .route("/internal/audit", post(record_audit_batch))
        .route("/internal/events", post(record_event_batch))
        .route("/internal/certificate", post(renew_certificate))
        .route("/v1/ticket", get(get_ticket))
        .route("/v1/ticket/acquire", post(acquire_ticket))
        .route("/v1/ticket/release", post(release_ticket))
        .layer(middleware::from_fn_with_state(forwarder, route_to_leader))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
    let local_routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(get_metrics))
        .route("/v1/local", get(get_local))
        .route("/v1/cluster/init", post(init_cluster))
        .route("/v1/cluster/join", post(join_cluster))
        .route("/v1/cluster/ca", get(get_cluster_ca))
        .route("/v1/cluster/recover", post(recover_cluster))
        .route("/internal/ca-key", post(get_ca_key))
        .route("/internal/adopt", post(adopt))
        .route("/internal/release", post(release))
        // To a member that hears no leader: never forwarded.
        .route("/internal/superseded", post(superseded_notice))
        // From another site's leader or the arbitrator, tried at each of
        // this cluster's nodes in turn: only the leader answers (sealed
        // bodies are not forwarded).
        .route("/internal/ticket", post(ticket_request))
        .route("/internal/groups/{name}/local", get(local_group))
        // Served by any node from its applied state (never forwarded): a
        // stream follows one node, whichever the client reached.
        .route("/v1/events", get(get_events))
        .route("/v1/events/stream", get(event_stream))
        // Who the caller is, as this node's middleware found it.
        .route("/v1/session", get(get_session))
        // The dashboard's static files (no data: every view calls the API).
        .route("/ui", get(ui::ui_root))
        .route("/ui/", get(ui::ui_index))
        .route("/ui/{asset}", get(ui::ui_asset))
        // Asked of every node by a load balancer: answered by this node
        // alone (HEAD comes with GET; HAProxy's httpchk sends OPTIONS).
        .route("/v1/groups/{name}/health", get(group_health).options(group_health))
        .route("/v1/volumes/{name}/primary", get(volume_primary).options(volume_primary))
        .route("/v1/volumes/{name}/replica", get(volume_replica).options(volume_replica))
        .route("/internal/volumes/{name}/local", get(local_volume))
        .route("/internal/volumes/{name}/verify", post(local_volume_verify))
        .route("/internal/volumes/{name}/resolve", post(local_volume_resolve))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
    let raft_routes = Router::new()
        .route(PATH_APPEND, post(raft_append))
        .route(PATH_VOTE, post(raft_vote))
        .route(PATH_SNAPSHOT, post(raft_snapshot))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RAFT_BODY_BYTES));
    Router::new()
        .merge(cluster_routes)
        .merge(local_routes)
        .merge(raft_routes)
        .route_layer(middleware::from_fn_with_state(backend.clone(), auth::authorize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(request_span))
        .with_state(backend)
}

/// One tracing span per API request; Raft RPCs are logged at trace level
/// only, since they run many times a second.
async fn request_span(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if path.starts_with("/internal/raft/") {
        return next.run(req).await;
    }
    let span = tracing::info_span!("api", %method, %path);
    async move {
        let start = std::time::Instant::now();
        let resp = next.run(req).await;
        tracing::debug!(status = resp.status().as_u16(), elapsed_us = start.elapsed().as_micros() as u64, "request");
        resp
    }
    .instrument(span)
    .await
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::RouteNotFound { method: method.to_string(), path: uri.path().to_string() }
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

#[derive(Clone)]
struct Forwarder {
    backend: SharedBackend,
}

/// A GET whose query asks for the local copy. A query that does not parse is
/// served locally too, so that the handler refuses it with TND-1004.
fn wants_stale(req: &Request) -> bool {
    req.method() == Method::GET
        && serde_urlencoded_like::<ReadParams>(req.uri().query().unwrap_or("")).is_ok_and(|p| p.stale)
}

/// Sends cluster-wide requests to the leader: writes always, reads unless
/// `?stale=true`. A request already forwarded once is never forwarded again,
/// so two nodes with different ideas of the leader cannot bounce it.
async fn route_to_leader(State(fw): State<Forwarder>, req: Request, next: Next) -> Response {
    if wants_stale(&req) {
        return next.run(req).await;
    }
    match fw.backend.route() {
        Route::Here => next.run(req).await,
        Route::NotMember => fw.backend.not_member().into_response(),
        Route::NoLeader => ApiError::NoLeader.into_response(),
        Route::Leader(_) if req.headers().contains_key(HEADER_FORWARDED) => ApiError::NoLeader.into_response(),
        Route::Leader(urls) => {
            // A leader that stalls (a paused VM, SIGSTOP) accepts connections
            // but never answers: give up as soon as this node stops hearing it.
            let mut resp = tokio::select! {
                r = forward(&fw, &urls, req) => r.unwrap_or_else(|e| e.into_response()),
                () = leader_changes(&fw, &urls) => ApiError::ForwardFailed {
                    url: urls.join(","),
                    reason: "the leader went silent or changed; the request may or may not have been applied".into(),
                }
                .into_response(),
            };
            // The leader audited it (or it never arrived: audited here).
            if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
                resp.extensions_mut().insert(auth::Forwarded);
            }
            resp
        }
    }
}

/// Returns once this node has not routed to `leader` for `LEADER_GRACE`
/// (a leader handing over still answers within it; a stalled one never does).
async fn leader_changes(fw: &Forwarder, leader: &[String]) {
    let mut since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(LEADER_CHECK).await;
        if matches!(fw.backend.route(), Route::Leader(u) if u == leader) {
            since = None;
        } else if since.get_or_insert_with(std::time::Instant::now).elapsed() >= LEADER_GRACE {
            return;
        }
    }
}

/// Relays the request to the leader, trying its network paths in order
/// until one connects (a connected path is never retried: the request may
/// have been applied there).
async fn forward(fw: &Forwarder, leader: &[String], req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let asker = parts.extensions.get::<auth::Asker>().cloned();
    let authorization = parts.headers.get(header::AUTHORIZATION).cloned();
    let http = fw.backend.peer_http();
    let bytes = read_body(body, MAX_BODY_BYTES).await?;
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
        .map_err(|e| ApiError::Internal(format!("method: {e}")))?;
    let mut last = ApiError::ForwardFailed { url: leader.join(","), reason: "the leader has no address".into() };
    for base in leader {
        let fail = |reason: String| ApiError::ForwardFailed { url: base.clone(), reason };
        let mut rb = http.request(method.clone(), format!("{base}{path}"));
        if let Some(a) = &authorization {
            rb = rb.header(reqwest::header::AUTHORIZATION, a.as_bytes());
        }
        if let Some(a) = &asker {
            for (k, v) in a.headers() {
                rb = rb.header(k, v.as_bytes());
            }
        }
        let sent = rb
            .header(HEADER_FORWARDED, fw.backend.name())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(FORWARD_TIMEOUT)
            .body(bytes.clone())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) if e.is_connect() => {
                last = fail(e.to_string());
                continue;
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let status = StatusCode::from_u16(resp.status().as_u16()).map_err(|e| fail(e.to_string()))?;
        let mut headers = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
            if let Some(v) = resp.headers().get(name.as_str()).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
            {
                headers.insert(name, v);
            }
        }
        let body = resp.bytes().await.map_err(|e| fail(e.to_string()))?;
        return Ok((status, headers, Body::from(body)).into_response());
    }
    Err(last)
}

// ---- local routes ----

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The agent process is up", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Member of a cluster that has a leader", body = Health),
              (status = 503, description = "Not a member, or no leader", body = ErrorBody)))]
async fn readyz(State(b): State<SharedBackend>) -> Result<Json<Health>, ApiError> {
    b.ready()?;
    Ok(Json(Health { status: "ready".into() }))
}

/// The answer to a load balancer: 200 when serving, 503 otherwise, with why.
fn serving(v: ServingView) -> (StatusCode, Json<ServingView>) {
    let status = if v.serving { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(v))
}

#[utoipa::path(get, path = "/v1/groups/{name}/health", tag = "health", params(("name" = String, Path)),
    responses((status = 200, description = "This node runs the group, every resource is up, and it holds its lease", body = ServingView),
              (status = 503, description = "It does not (any other node, or this one cut off)", body = ServingView),
              (status = 400, description = "A query parameter (TND-1004)", body = ErrorBody)))]
async fn group_health(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> (StatusCode, Json<ServingView>) {
    serving(b.group_health(&name).await)
}

#[utoipa::path(get, path = "/v1/volumes/{name}/primary", tag = "health", params(("name" = String, Path)),
    responses((status = 200, description = "This node is the volume's primary and holds its lease", body = ServingView),
              (status = 503, description = "It is not", body = ServingView),
              (status = 400, description = "A query parameter (TND-1004)", body = ErrorBody)))]
async fn volume_primary(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> (StatusCode, Json<ServingView>) {
    serving(b.volume_health(&name, None).await)
}

/// `?lag=16MiB`: how far behind a replica may be (default 0).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LagParams {
    #[serde(default)]
    lag: Option<String>,
}

#[utoipa::path(get, path = "/v1/volumes/{name}/replica", tag = "health", params(("name" = String, Path), ("lag" = Option<String>, Query, description = "How far behind it may be: a size like 16MiB (default 0)")),
    responses((status = 200, description = "This node holds a connected, up-to-date secondary replica within `lag`", body = ServingView),
              (status = 503, description = "It does not", body = ServingView),
              (status = 400, description = "A bad `lag` or another query parameter (TND-1004)", body = ErrorBody)))]
async fn volume_replica(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<LagParams>,
) -> Result<(StatusCode, Json<ServingView>), ApiError> {
    let lag = match q.lag.as_deref() {
        None => 0,
        Some(s) => tandem_raft::volume::parse_bytes(s).map_err(|e| ApiError::InvalidQuery(format!("lag: {e}")))?,
    };
    Ok(serving(b.volume_health(&name, Some(lag)).await))
}

#[utoipa::path(get, path = "/v1/local", tag = "cluster",
    responses((status = 200, description = "This agent, member or not", body = LocalView)))]
async fn get_local(State(b): State<SharedBackend>, ApiQuery(_): ApiQuery<NoParams>) -> Json<LocalView> {
    Json(b.local())
}

#[utoipa::path(post, path = "/v1/cluster/init", tag = "cluster", request_body = InitRequest,
    responses((status = 200, description = "This agent bootstrapped a new one-node cluster: its CA, its certificate and the first admin token (shown once)", body = InitView),
              (status = 409, description = "Already a member (TND-1201)", body = ErrorBody)))]
async fn init_cluster(
    State(b): State<SharedBackend>,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<Json<InitView>, ApiError> {
    b.init(req).await.map(Json)
}

#[utoipa::path(post, path = "/v1/cluster/join", tag = "cluster", request_body = JoinViaRequest,
    responses((status = 200, description = "This agent joined the cluster at `via`", body = LocalView),
              (status = 409, description = "Already a member, or refused by the cluster", body = ErrorBody)))]
async fn join_cluster(
    State(b): State<SharedBackend>,
    ApiJson(req): ApiJson<JoinViaRequest>,
) -> Result<Json<LocalView>, ApiError> {
    b.join_via(req).await.map(Json)
}

async fn adopt(
    State(b): State<SharedBackend>,
    ApiJson(req): ApiJson<AdoptRequest>,
) -> Result<Json<LocalView>, ApiError> {
    b.adopt(req).await.map(Json)
}

async fn release(
    State(b): State<SharedBackend>,
    ApiJson(req): ApiJson<ReleaseRequest>,
) -> Result<StatusCode, ApiError> {
    b.release(req).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "This document")))]
async fn openapi_json() -> Json<serde_json::Value> {
    Json(contract::document())
}

/// The media type of Prometheus's text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "This node's metrics in Prometheus's text exposition format (docs/api.md lists the series); every series has the label `node`", content_type = "text/plain", body = String)))]
async fn get_metrics(State(b): State<SharedBackend>, ApiQuery(_): ApiQuery<NoParams>) -> Response {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], b.metrics().await).into_response()
}

// ---- security routes ----

#[utoipa::path(get, path = "/v1/session", tag = "security",
    responses((status = 200, description = "Who the credentials sent are, and their role (the dashboard hides what the role may not do)", body = SessionView)))]
async fn get_session(who: Option<axum::Extension<auth::Asker>>, ApiQuery(_): ApiQuery<NoParams>) -> Json<SessionView> {
    let (who, role) = who.map(|a| (a.0.who, a.0.role)).unwrap_or_else(|| ("local".into(), "local".into()));
    Json(SessionView { who, role })
}

/// Who asked (set by the auth middleware); `local` when it did not run (tests).
fn asker(req_ext: Option<axum::Extension<auth::Asker>>) -> String {
    req_ext.map(|a| a.0.who).unwrap_or_else(|| "local".into())
}

#[utoipa::path(post, path = "/v1/tokens", tag = "security", request_body = TokenRequest,
    responses((status = 201, description = "The token; its secret is shown this once", body = TokenCreated),
              (status = 409, description = "A token of that name exists (TND-1503)", body = ErrorBody),
              (status = 422, description = "Invalid name or expiry (TND-1010)", body = ErrorBody)))]
async fn create_token(
    State(b): State<SharedBackend>,
    who: Option<axum::Extension<auth::Asker>>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    b.create_token(req, asker(who)).await.map(|t| (StatusCode::CREATED, Json(t)))
}

#[utoipa::path(get, path = "/v1/tokens", tag = "security",
    responses((status = 200, description = "Every token, never its secret", body = [TokenView])))]
async fn list_tokens(
    State(b): State<SharedBackend>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    b.tokens().await.map(Json)
}

#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "security",
    params(("name" = String, Path, description = "Token name")),
    responses((status = 204, description = "Revoked: refused from now on, on every node"),
              (status = 404, description = "No such token (TND-1504)", body = ErrorBody)))]
async fn revoke_token(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    b.revoke_token(&name).await.map(|()| StatusCode::NO_CONTENT)
}

// ---- alerts ----

#[utoipa::path(get, path = "/v1/alerts", tag = "alerts", params(("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "Every alert, secrets never shown", body = [AlertView])))]
async fn list_alerts(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<Vec<AlertView>>, ApiError> {
    b.alerts(p.stale).await.map(Json)
}

#[utoipa::path(get, path = "/v1/alerts/{name}", tag = "alerts", params(("name" = String, Path), ("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "The alert, secrets never shown", body = AlertView),
              (status = 404, description = "No such alert (TND-1600)", body = ErrorBody)))]
async fn get_alert(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<AlertView>, ApiError> {
    b.alert(&name, p.stale).await.map(Json)
}

#[utoipa::path(put, path = "/v1/alerts/{name}", tag = "alerts", params(("name" = String, Path)),
    request_body = tandem_raft::alerts::AlertSpec,
    responses((status = 201, description = "Created: it sends the events recorded from now on", body = AlertView),
              (status = 200, description = "Replaced: it goes on from where it was", body = AlertView),
              (status = 409, description = "The cluster has the maximum of alerts (TND-1601)", body = ErrorBody),
              (status = 422, description = "Invalid definition; the code names the field (TND-1010)", body = ErrorBody)))]
async fn put_alert(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    who: Option<axum::Extension<auth::Asker>>,
    ApiJson(mut body): ApiJson<serde_json::Value>,
) -> Result<(StatusCode, Json<AlertView>), ApiError> {
    integral(&mut body);
    let spec: tandem_raft::alerts::AlertSpec = serde_path_to_error::deserialize(body).map_err(|e| {
        let field = e.path().to_string();
        ApiError::Invalid {
            field: if field == "." { "body".into() } else { field },
            reason: e.into_inner().to_string(),
        }
    })?;
    let (view, created) = b.put_alert(&name, spec, asker(who)).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view)))
}

#[utoipa::path(delete, path = "/v1/alerts/{name}", tag = "alerts", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted: nothing more is sent"),
              (status = 404, description = "No such alert (TND-1600)", body = ErrorBody)))]
async fn delete_alert(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    b.delete_alert(&name).await.map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/alerts/{name}/test", tag = "alerts", params(("name" = String, Path)),
    responses((status = 200, description = "The target took a test alert (event kind `alert.test`, id 0)", body = AlertTested),
              (status = 404, description = "No such alert (TND-1600)", body = ErrorBody),
              (status = 502, description = "The target refused it or could not be reached (TND-1602); the message says how", body = ErrorBody)))]
async fn test_alert(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> Result<Json<AlertTested>, ApiError> {
    b.test_alert(&name).await.map(Json)
}

#[utoipa::path(post, path = "/v1/certificates", tag = "security", request_body = CertificateRequest,
    responses((status = 201, description = "Recorded; with `csr`, the certificate the cluster CA signed", body = ClientCertCreated),
              (status = 409, description = "A client certificate of that name exists (TND-1509), or the request does not fit the cluster's CA (TND-1512)", body = ErrorBody),
              (status = 422, description = "Invalid name, role, days, signing request or certificate (TND-1010, TND-1508)", body = ErrorBody)))]
async fn create_certificate(
    State(b): State<SharedBackend>,
    who: Option<axum::Extension<auth::Asker>>,
    ApiJson(req): ApiJson<CertificateRequest>,
) -> Result<(StatusCode, Json<ClientCertCreated>), ApiError> {
    b.create_certificate(req, asker(who)).await.map(|c| (StatusCode::CREATED, Json(c)))
}

#[utoipa::path(get, path = "/v1/certificates", tag = "security",
    responses((status = 200, description = "Every recorded client certificate", body = [ClientCertView])))]
async fn list_certificates(
    State(b): State<SharedBackend>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> Result<Json<Vec<ClientCertView>>, ApiError> {
    b.certificates().await.map(Json)
}

#[utoipa::path(delete, path = "/v1/certificates/{name}", tag = "security",
    params(("name" = String, Path, description = "Client certificate name")),
    responses((status = 204, description = "Revoked: refused from now on, on every node"),
              (status = 404, description = "No such client certificate (TND-1510)", body = ErrorBody)))]
async fn revoke_certificate(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(_): ApiQuery<NoParams>,
) -> Result<StatusCode, ApiError> {
    b.revoke_certificate(&name).await.map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/cluster/join-token", tag = "security", request_body = JoinTokenRequest,
    responses((status = 201, description = "A short-lived join token and the CA pin", body = JoinTokenView),
              (status = 422, description = "Invalid ttl_s (TND-1010)", body = ErrorBody)))]
async fn join_token(
    State(b): State<SharedBackend>,
    who: Option<axum::Extension<auth::Asker>>,
    ApiJson(req): ApiJson<JoinTokenRequest>,
) -> Result<(StatusCode, Json<JoinTokenView>), ApiError> {
    b.join_token(req, asker(who)).await.map(|t| (StatusCode::CREATED, Json(t)))
}

/// `GET /v1/audit` query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Only entries with a larger id.
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub since: Option<serde_json::Value>,
    /// At most this many (default 1000, at most 10000).
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub limit: Option<serde_json::Value>,
}

/// A number from the query string (which reads `0`/`1` as booleans).
fn number_param(field: &str, v: Option<&serde_json::Value>, default: u64, max: u64) -> Result<u64, ApiError> {
    let text = match v {
        None => return Ok(default),
        Some(serde_json::Value::Bool(b)) => u64::from(*b).to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    text.parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| ApiError::InvalidQuery(format!("{field}={text:?} must be a number from 0 to {max}")))
}

#[utoipa::path(get, path = "/v1/audit", tag = "security", params(AuditParams),
    responses((status = 200, description = "Audit entries, oldest first", body = [tandem_raft::access::AuditEntry])))]
async fn get_audit(
    State(b): State<SharedBackend>,
    ApiQuery(q): ApiQuery<AuditParams>,
) -> Result<Json<Vec<tandem_raft::access::AuditEntry>>, ApiError> {
    let since = number_param("since", q.since.as_ref(), 0, u64::MAX)?;
    let limit = number_param("limit", q.limit.as_ref(), 1000, 10_000)?;
    b.audit(since, limit as usize).await.map(Json)
}

async fn record_audit_batch(
    State(b): State<SharedBackend>,
    ApiJson(batch): ApiJson<AuditBatch>,
) -> Result<StatusCode, ApiError> {
    b.record_audit_batch(batch.entries).await.map(|()| StatusCode::NO_CONTENT)
}

/// `GET /v1/events` and `GET /v1/events/stream` query.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Only events with a larger id (the stream: `Last-Event-ID` wins).
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub since: Option<serde_json::Value>,
    /// Kinds, comma-separated; one ending in `.` is a prefix (`group.`).
    #[serde(default)]
    pub kind: Option<String>,
    /// At least this severity: `info`, `warning` or `critical`.
    #[serde(default)]
    pub severity: Option<String>,
    /// Only events about this group.
    #[serde(default)]
    pub group: Option<String>,
    /// Only events about this node.
    #[serde(default)]
    pub node: Option<String>,
    /// `GET /v1/events`: at most this many (default 1000, at most 10000).
    /// The stream: ends after this many events (default: never; at most 10000).
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub limit: Option<serde_json::Value>,
}

impl EventParams {
    fn filter(&self) -> Result<tandem_raft::events::EventFilter, ApiError> {
        use tandem_raft::events::{EventFilter, Severity};
        let min_severity =
            match self.severity.as_deref() {
                None => None,
                Some(s) => Some(Severity::parse(s).ok_or_else(|| {
                    ApiError::InvalidQuery(format!("severity={s:?} must be info, warning or critical"))
                })?),
            };
        let kinds = self
            .kind
            .as_deref()
            .map(|k| k.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        Ok(EventFilter { kinds, min_severity, group: self.group.clone(), node: self.node.clone() })
    }
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventParams),
    responses((status = 200, description = "Events after `since`, oldest first; `reset` says when some were lost to retention", body = EventList)))]
async fn get_events(
    State(b): State<SharedBackend>,
    ApiQuery(q): ApiQuery<EventParams>,
) -> Result<Json<EventList>, ApiError> {
    let since = number_param("since", q.since.as_ref(), 0, u64::MAX)?;
    let limit = number_param("limit", q.limit.as_ref(), 1000, 10_000)?;
    let page = b.events(since, &q.filter()?, limit as usize)?;
    Ok(Json(EventList { events: page.events, next: page.next, reset: page.reset }))
}

/// How often the stream sends a comment when nothing happens (proxies and
/// clients see a live connection; a dead one is noticed).
const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Most events read from the state in one go by a stream.
const STREAM_PAGE: usize = 500;
/// Largest `limit` a stream takes (as `GET /v1/events`).
const STREAM_LIMIT_MAX: u64 = 10_000;

#[utoipa::path(get, path = "/v1/events/stream", tag = "events", params(EventParams,
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, description = "Resume after this event id (sent by SSE clients on reconnect)")),
    responses((status = 200, description = "Server-Sent Events: each event's `id:` is its id and `data:` its JSON; `event: reset` (data `{\"first_id\": …}`) comes first when events after the asked id were lost to retention; comment lines keep the connection alive", content_type = "text/event-stream", body = StreamMessage)))]
async fn event_stream(
    State(b): State<SharedBackend>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventParams>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    // `since` is checked even when the header wins: a bad request is
    // refused whatever else it carries.
    let asked = number_param("since", q.since.as_ref(), 0, u64::MAX)?;
    let last = headers.get("last-event-id").map(|v| v.to_str().map(str::trim));
    let since = match last {
        // An event id, at most what the document's int64 allows.
        Some(Ok(id)) => id
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(|| ApiError::InvalidQuery(format!("Last-Event-ID {id:?} must be an event id")))?,
        Some(Err(_)) => return Err(ApiError::InvalidQuery("Last-Event-ID must be an event id".into())),
        None => asked,
    };
    // The stream ends after `limit` events (a script's `curl -N`); without
    // it, never.
    let left = match q.limit {
        None => None,
        Some(_) => Some(number_param("limit", q.limit.as_ref(), 0, STREAM_LIMIT_MAX)?),
    };
    let filter = q.filter()?;
    let changes = b.event_changes()?;
    struct Follow {
        b: SharedBackend,
        filter: tandem_raft::events::EventFilter,
        at: u64,
        changes: tokio::sync::watch::Receiver<u64>,
        /// Events to send, and whether each counts towards `left`.
        ready: std::collections::VecDeque<(SseEvent, bool)>,
        left: Option<u64>,
    }
    let start = Follow { b, filter, at: since, changes, ready: Default::default(), left };
    let stream = futures_util::stream::unfold(start, |mut f| async move {
        loop {
            if f.left == Some(0) {
                return None;
            }
            if let Some((e, counts)) = f.ready.pop_front() {
                if counts {
                    f.left = f.left.map(|n| n - 1);
                }
                return Some((Ok::<_, std::convert::Infallible>(e), f));
            }
            // Mark the state seen before reading it: a change applied after
            // the read wakes the wait below.
            f.changes.borrow_and_update();
            let page = match f.b.events(f.at, &f.filter, STREAM_PAGE) {
                Ok(p) => p,
                Err(_) => return None, // no longer a member: the client resumes elsewhere
            };
            if let Some(first) = page.reset {
                let data = serde_json::json!({"first_id": first, "asked": f.at}).to_string();
                f.ready.push_back((SseEvent::default().event("reset").data(data), false));
            }
            for e in &page.events {
                let data = serde_json::to_string(e).unwrap_or_default();
                f.ready.push_back((SseEvent::default().id(e.id.to_string()).data(data), true));
            }
            let moved = page.next != f.at;
            f.at = page.next;
            if f.ready.is_empty() && !moved && f.changes.changed().await.is_err() {
                return None;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(STREAM_KEEP_ALIVE).text("keep-alive")).into_response())
}

async fn record_event_batch(
    State(b): State<SharedBackend>,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<StatusCode, ApiError> {
    b.record_event_batch(batch.events).await.map(|()| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/cluster/ca", tag = "security",
    responses((status = 200, description = "The cluster CA's certificate and pin (public)", body = CaView),
              (status = 503, description = "Not a member of a cluster (TND-1200)", body = ErrorBody)))]
async fn get_cluster_ca(State(b): State<SharedBackend>) -> Result<Json<CaView>, ApiError> {
    b.cluster_ca().map(Json)
}

fn node_asker(who: Option<axum::Extension<auth::Asker>>) -> Result<String, ApiError> {
    let who = asker(who);
    who.strip_prefix("node:").map(str::to_string).ok_or_else(|| ApiError::Forbidden {
        who,
        role: "-".into(),
        action: "act as a node".into(),
    })
}

async fn renew_certificate(
    State(b): State<SharedBackend>,
    who: Option<axum::Extension<auth::Asker>>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> Result<Json<CertificateView>, ApiError> {
    let node = node_asker(who)?;
    b.renew_certificate(&node, req).await.map(Json)
}

async fn pin_node_certificate(
    State(b): State<SharedBackend>,
    who: Option<axum::Extension<auth::Asker>>,
    ApiJson(req): ApiJson<NodeCertRequest>,
) -> Result<StatusCode, ApiError> {
    let node = node_asker(who)?;
    b.pin_node_certificate(&node, req).await.map(|()| StatusCode::NO_CONTENT)
}

async fn get_ca_key(
    State(b): State<SharedBackend>,
    who: Option<axum::Extension<auth::Asker>>,
) -> Result<Json<CaKeyView>, ApiError> {
    let node = node_asker(who)?;
    b.ca_key(&node).await.map(Json)
}

// ---- cluster routes ----

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    params(("stale" = Option<bool>, Query, description = "Serve the local copy instead of a linearizable read")),
    responses((status = 200, description = "The cluster and its members", body = ClusterView),
              (status = 503, description = "No leader or not a member", body = ErrorBody)))]
async fn get_cluster(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<ClusterView>, ApiError> {
    b.cluster(p.stale).await.map(Json)
}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    params(("stale" = Option<bool>, Query, description = "Serve the local copy instead of a linearizable read")),
    responses((status = 200, description = "All members", body = [NodeView])))]
async fn list_nodes(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    b.nodes(p.stale).await.map(Json)
}

#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path), ("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "One member", body = NodeView),
              (status = 404, description = "No such node (TND-1100)", body = ErrorBody)))]
async fn get_node(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<NodeView>, ApiError> {
    b.node(&name, p.stale).await.map(Json)
}

#[utoipa::path(post, path = "/v1/nodes", tag = "nodes", request_body = JoinRequest,
    responses((status = 201, description = "The node joined as a learner; autopilot may promote it", body = NodeView),
              (status = 409, description = "Name or address taken, or the agent is unreachable", body = ErrorBody),
              (status = 422, description = "Invalid field (TND-1010)", body = ErrorBody)))]
async fn add_node(
    State(b): State<SharedBackend>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    b.add_node(req).await.map(|n| (StatusCode::CREATED, Json(n)))
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path), ("force" = Option<bool>, Query, description = "Remove even if the node cannot be told")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such node", body = ErrorBody),
              (status = 409, description = "Unreachable without force, or quorum at risk", body = ErrorBody)))]
async fn remove_node(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<RemoveParams>,
) -> Result<StatusCode, ApiError> {
    b.remove_node(&name, p.force).await.map(|_| StatusCode::NO_CONTENT)
}

async fn admin(b: SharedBackend, name: String, state: AdminState) -> Result<Json<NodeView>, ApiError> {
    b.set_admin_state(&name, state).await.map(Json)
}

#[utoipa::path(post, path = "/v1/nodes/{name}/standby", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, description = "The node runs nothing from now on", body = NodeView),
              (status = 404, description = "No such node", body = ErrorBody)))]
async fn set_standby(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<Json<NodeView>, ApiError> {
    admin(b, name, AdminState::Standby).await
}

#[utoipa::path(post, path = "/v1/nodes/{name}/online", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, description = "The node may run resources", body = NodeView),
              (status = 404, description = "No such node", body = ErrorBody)))]
async fn set_online(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<Json<NodeView>, ApiError> {
    admin(b, name, AdminState::Online).await
}

#[utoipa::path(post, path = "/v1/nodes/{name}/maintenance", tag = "nodes", params(("name" = String, Path)),
    responses((status = 200, description = "The node's resources are left alone and not monitored", body = NodeView),
              (status = 404, description = "No such node", body = ErrorBody)))]
async fn set_maintenance(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<Json<NodeView>, ApiError> {
    admin(b, name, AdminState::Maintenance).await
}

/// `?dry_run=` of the routes that can say first what they would do
/// (`POST /v1/cluster/recover`, `POST /v1/volumes/{name}/promote`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRunParams {
    /// Report what the request would do, change nothing.
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
}

#[utoipa::path(post, path = "/v1/cluster/recover", tag = "cluster",
    params(("dry_run" = Option<bool>, Query, description = "Report what a recovery would do; change nothing")),
    request_body = RecoverRequest,
    responses((status = 200, description = "This node is the single voter of a new incarnation (or, with dry_run, what would happen)", body = RecoverReport),
              (status = 409, description = "A majority of the voters answers, or a leader is heard (TND-1211)", body = ErrorBody)))]
async fn recover_cluster(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<DryRunParams>,
    ApiJson(req): ApiJson<RecoverRequest>,
) -> Result<Json<RecoverReport>, ApiError> {
    b.recover(p.dry_run, req).await.map(Json)
}

#[utoipa::path(get, path = "/v1/sites", tag = "sites",
    params(("stale" = Option<bool>, Query, description = "Serve the local copy instead of a linearizable read")),
    responses((status = 200, description = "Every site named by a node, with its nodes and the groups running there", body = [SiteView])))]
async fn list_sites(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<Vec<SiteView>>, ApiError> {
    b.sites(p.stale).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sites/{site}/standby", tag = "sites", params(("site" = String, Path)),
    responses((status = 200, description = "Every node of the site is in standby: its groups move to other sites as their policies allow", body = SiteView),
              (status = 404, description = "No node is in this site (TND-1109)", body = ErrorBody)))]
async fn set_site_standby(
    State(b): State<SharedBackend>,
    Path(site): Path<String>,
) -> Result<Json<SiteView>, ApiError> {
    b.set_site_admin_state(&site, AdminState::Standby).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sites/{site}/online", tag = "sites", params(("site" = String, Path)),
    responses((status = 200, description = "Every node of the site may run groups again (failback follows each group's policy)", body = SiteView),
              (status = 404, description = "No node is in this site (TND-1109)", body = ErrorBody)))]
async fn set_site_online(State(b): State<SharedBackend>, Path(site): Path<String>) -> Result<Json<SiteView>, ApiError> {
    b.set_site_admin_state(&site, AdminState::Online).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sites/{site}/switchover", tag = "sites", params(("site" = String, Path)),
    request_body = SwitchoverRequest,
    responses((status = 200, description = "The site is in standby; each group that ran there, where it runs now, its outage and RPO", body = SwitchoverReport),
              (status = 404, description = "No node is in this site (TND-1109)", body = ErrorBody)))]
async fn switchover_site(
    State(b): State<SharedBackend>,
    Path(site): Path<String>,
    ApiJson(req): ApiJson<SwitchoverRequest>,
) -> Result<Json<SwitchoverReport>, ApiError> {
    b.switchover_site(&site, req).await.map(Json)
}

#[utoipa::path(put, path = "/v1/nodes/{name}/attributes/{key}", tag = "nodes", request_body = AttributeValue,
    params(("name" = String, Path), ("key" = String, Path)),
    responses((status = 200, description = "Attribute set", body = NodeView),
              (status = 404, description = "No such node", body = ErrorBody),
              (status = 422, description = "Invalid key or value", body = ErrorBody)))]
async fn set_attribute(
    State(b): State<SharedBackend>,
    Path((name, key)): Path<(String, String)>,
    ApiJson(req): ApiJson<AttributeValue>,
) -> Result<Json<NodeView>, ApiError> {
    b.set_attribute(&name, &key, req.value).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/nodes/{name}/attributes/{key}", tag = "nodes",
    params(("name" = String, Path), ("key" = String, Path)),
    responses((status = 200, description = "Attribute deleted", body = NodeView),
              (status = 404, description = "No such node or attribute", body = ErrorBody)))]
async fn delete_attribute(
    State(b): State<SharedBackend>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Json<NodeView>, ApiError> {
    b.delete_attribute(&name, &key).await.map(Json)
}

// ---- groups ----

#[utoipa::path(get, path = "/v1/groups", tag = "groups",
    params(("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "All groups", body = [GroupView])))]
async fn list_groups(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<Vec<GroupView>>, ApiError> {
    b.groups(p.stale).await.map(Json)
}

#[utoipa::path(get, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path), ("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "One group", body = GroupView),
              (status = 404, description = "No such group (TND-1300)", body = ErrorBody)))]
async fn get_group(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<GroupView>, ApiError> {
    b.group(&name, p.stale).await.map(Json)
}

#[utoipa::path(put, path = "/v1/groups/{name}", tag = "groups", params(("name" = String, Path)),
    request_body(content = Object, description = "The group definition (docs/api.md)"),
    responses((status = 201, description = "Created", body = GroupView),
              (status = 200, description = "Replaced", body = GroupView),
              (status = 422, description = "Invalid definition; the code names the field (TND-1010)", body = ErrorBody)))]
async fn put_group(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(mut body): ApiJson<serde_json::Value>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    integral(&mut body);
    // A definition that is valid JSON but not a valid group is refused with
    // 422, naming the field (`resources[0].type`, `nodes`, ...).
    let spec: tandem_raft::group::GroupSpec = serde_path_to_error::deserialize(body).map_err(|e| {
        let field = e.path().to_string();
        ApiError::Invalid {
            field: if field == "." { "body".into() } else { field },
            reason: e.into_inner().to_string(),
        }
    })?;
    let (view, created) = b.put_group(&name, spec).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view)))
}

#[utoipa::path(delete, path = "/v1/groups/{name}", tag = "groups", params(("name" = String, Path)),
    responses((status = 204, description = "Stopped and deleted"),
              (status = 404, description = "No such group", body = ErrorBody),
              (status = 409, description = "Another group refers to it", body = ErrorBody)))]
async fn delete_group(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    b.delete_group(&name).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/groups/{name}/start", tag = "groups", params(("name" = String, Path)),
    responses((status = 200, description = "Enabled: the scheduler places it", body = GroupView)))]
async fn start_group(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<Json<GroupView>, ApiError> {
    b.group_action(&name, GroupAction::Start).await.map(Json)
}

#[utoipa::path(post, path = "/v1/groups/{name}/stop", tag = "groups", params(("name" = String, Path)),
    responses((status = 200, description = "Disabled: it stops and stays stopped", body = GroupView)))]
async fn stop_group(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<Json<GroupView>, ApiError> {
    b.group_action(&name, GroupAction::Stop).await.map(Json)
}

#[utoipa::path(post, path = "/v1/groups/{name}/clear", tag = "groups", params(("name" = String, Path)),
    responses((status = 200, description = "Failures forgotten: failed nodes are eligible again", body = GroupView)))]
async fn clear_group(State(b): State<SharedBackend>, Path(name): Path<String>) -> Result<Json<GroupView>, ApiError> {
    b.group_action(&name, GroupAction::Clear).await.map(Json)
}

#[utoipa::path(post, path = "/v1/groups/{name}/move", tag = "groups", params(("name" = String, Path)),
    request_body = MoveRequest,
    responses((status = 200, description = "Switchover requested: stops in order, then starts on `to`", body = GroupView),
              (status = 422, description = "`to` is not in the group's nodes", body = ErrorBody)))]
async fn move_group(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<GroupView>, ApiError> {
    b.move_group(&name, &req.to).await.map(Json)
}

async fn group_report(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<GroupReport>,
) -> Result<StatusCode, ApiError> {
    b.group_report(&name, req).await.map(|_| StatusCode::NO_CONTENT)
}

async fn claim_group(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<StatusCode, ApiError> {
    b.claim_group(&name, req).await.map(|_| StatusCode::NO_CONTENT)
}

async fn local_group(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
) -> Result<Json<LocalGroupStatus>, ApiError> {
    b.local_group(&name).await.map(Json)
}

// ---- volumes ----

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    params(("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "Every volume, with its replicas", body = [VolumeView])))]
async fn list_volumes(
    State(b): State<SharedBackend>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<Vec<VolumeView>>, ApiError> {
    b.volumes(p.stale).await.map(Json)
}

#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path), ("stale" = Option<bool>, Query, description = "Serve the local copy")),
    responses((status = 200, description = "One volume, with its replicas", body = VolumeView),
              (status = 404, description = "No such volume (TND-1407)", body = ErrorBody)))]
async fn get_volume(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<ReadParams>,
) -> Result<Json<VolumeView>, ApiError> {
    b.volume(&name, p.stale).await.map(Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/verify", tag = "volumes", params(("name" = String, Path)),
    responses((status = 202, description = "Online verify started on the primary; the report so far", body = VerifyReport),
              (status = 404, description = "No such volume (TND-1407)", body = ErrorBody),
              (status = 409, description = "No primary (TND-1401), or a verify already runs (TND-1405)", body = ErrorBody)))]
async fn verify_volume(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(_): ApiJson<NoBody>,
) -> Result<(StatusCode, Json<VerifyReport>), ApiError> {
    b.verify_volume(&name).await.map(|r| (StatusCode::ACCEPTED, Json(r)))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/resolve", tag = "volumes", params(("name" = String, Path)),
    request_body = ResolveRequest,
    responses((status = 200, description = "`discard`'s changes are thrown away; it resyncs from the other side", body = VolumeView),
              (status = 404, description = "No such volume (TND-1407)", body = ErrorBody),
              (status = 409, description = "Not in split brain (TND-1403), no primary (TND-1401) or refused (TND-1404)", body = ErrorBody),
              (status = 422, description = "`discard` holds no replica (TND-1402)", body = ErrorBody)))]
async fn resolve_volume(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ResolveRequest>,
) -> Result<Json<VolumeView>, ApiError> {
    b.resolve_volume(&name, &req.discard).await.map(Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/replicas/{node}/replace", tag = "volumes",
    params(("name" = String, Path), ("node" = String, Path, description = "The node whose replica's disk is replaced")),
    responses((status = 200, description = "The replica is recorded Inconsistent; its node recreates its files and the primary resyncs it in full (it is UpToDate again when `volume.replica_replaced` is recorded)", body = VolumeView),
              (status = 404, description = "No such volume (TND-1407) or node (TND-1100)", body = ErrorBody),
              (status = 409, description = "The node holds no replica (TND-1402), serves the volume as primary (TND-1412), or no other replica is UpToDate (TND-1413)", body = ErrorBody)))]
async fn replace_replica(
    State(b): State<SharedBackend>,
    Path((name, node)): Path<(String, String)>,
    ApiJson(_): ApiJson<NoBody>,
) -> Result<Json<VolumeView>, ApiError> {
    b.replace_replica(&name, &node).await.map(Json)
}

/// An empty body (`{}`, or nothing at all).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoBody {}

#[utoipa::path(post, path = "/v1/volumes/{name}/promote", tag = "volumes",
    params(("name" = String, Path), ("dry_run" = Option<bool>, Query, description = "Report each candidate replica and what promoting it would give up; change nothing")),
    request_body = Option<PromoteRequest>,
    responses((status = 200, description = "The replica is recorded UpToDate (the group starts on it), or with dry_run what each candidate would give up", body = PromoteReport),
              (status = 422, description = "`confirm` is not the volume's name, or `node` is missing (TND-1010)", body = ErrorBody),
              (status = 404, description = "No such volume (TND-1407)", body = ErrorBody),
              (status = 409, description = "The node holds no replica (TND-1402), or the promotion is refused: the group runs, the replica is not Outdated, or an UpToDate replica is online (TND-1414)", body = ErrorBody)))]
async fn promote_volume(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiQuery(p): ApiQuery<DryRunParams>,
    ApiJson(req): ApiJson<PromoteRequest>,
) -> Result<Json<PromoteReport>, ApiError> {
    b.promote_volume(&name, p.dry_run, req).await.map(Json)
}

async fn superseded_notice(
    State(b): State<SharedBackend>,
    ApiJson(req): ApiJson<SupersededNotice>,
) -> Result<StatusCode, ApiError> {
    b.superseded_notice(req).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/ticket", tag = "sites",
    responses((status = 200, description = "The ticket between sites as this cluster's leader sees it", body = TicketView),
              (status = 404, description = "This cluster has no [ticket] (TND-1706)", body = ErrorBody)))]
async fn get_ticket(State(b): State<SharedBackend>) -> Result<Json<TicketView>, ApiError> {
    b.ticket().await.map(Json)
}

#[utoipa::path(post, path = "/v1/ticket/acquire", tag = "sites",
    responses((status = 200, description = "This site asks for the ticket (held once a majority of the grantors lends it)", body = TicketView),
              (status = 404, description = "This cluster has no [ticket] (TND-1706)", body = ErrorBody)))]
async fn acquire_ticket(State(b): State<SharedBackend>) -> Result<Json<TicketView>, ApiError> {
    b.ticket_want(true).await.map(Json)
}

#[utoipa::path(post, path = "/v1/ticket/release", tag = "sites",
    responses((status = 200, description = "This site gave the ticket back and stops asking for it", body = TicketView),
              (status = 404, description = "This cluster has no [ticket] (TND-1706)", body = ErrorBody)))]
async fn release_ticket(State(b): State<SharedBackend>) -> Result<Json<TicketView>, ApiError> {
    b.ticket_want(false).await.map(Json)
}

/// `POST /internal/ticket`: raw bytes in and out, because the seal covers
/// the exact body.
async fn ticket_request(
    State(b): State<SharedBackend>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let seal = headers.get(TICKET_SEAL_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    match b.ticket_request(&body, seal) {
        Ok((answer, seal)) => ([(TICKET_SEAL_HEADER, seal)], answer).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The header of a ticket message's seal (HMAC-SHA256, hex).
pub const TICKET_SEAL_HEADER: &str = "x-tandem-ticket-seal";

async fn record_out_of_sync(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<OutOfSyncReport>,
) -> Result<StatusCode, ApiError> {
    b.record_out_of_sync(&name, req).await.map(|_| StatusCode::NO_CONTENT)
}

async fn record_replica_disk(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ReplicaDiskReport>,
) -> Result<StatusCode, ApiError> {
    b.record_replica_disk(&name, req).await.map(|_| StatusCode::NO_CONTENT)
}

async fn local_volume(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
) -> Result<Json<LocalVolumeStatus>, ApiError> {
    b.local_volume(&name).await.map(Json)
}

async fn local_volume_verify(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(_): ApiJson<NoBody>,
) -> Result<Json<VerifyReport>, ApiError> {
    b.local_volume_verify(&name).await.map(Json)
}

async fn local_volume_resolve(
    State(b): State<SharedBackend>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ResolveRequest>,
) -> Result<StatusCode, ApiError> {
    b.local_volume_resolve(&name, &req.discard).await.map(|_| StatusCode::NO_CONTENT)
}

// ---- internal Raft RPCs ----

fn raft_target(b: &SharedBackend, headers: &HeaderMap) -> Result<Raft, ApiError> {
    let target = headers
        .get(HEADER_TARGET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<NodeId>().ok())
        .ok_or_else(|| ApiError::InvalidBody(format!("missing or bad {HEADER_TARGET} header")))?;
    let cluster = headers
        .get(HEADER_CLUSTER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::InvalidBody(format!("missing {HEADER_CLUSTER} header")))?;
    b.raft_for(target, cluster)
}

async fn raft_append(
    State(b): State<SharedBackend>,
    headers: HeaderMap,
    RaftJson(rpc): RaftJson<AppendEntriesRequest<TypeConfig>>,
) -> Result<Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    let raft = raft_target(&b, &headers)?;
    if let Some(e) = rpc.vote.leader_id().voted_for().and_then(|n| b.superseded(n)) {
        return Err(e);
    }
    Ok(Json(raft.append_entries(rpc).await))
}

async fn raft_vote(
    State(b): State<SharedBackend>,
    headers: HeaderMap,
    RaftJson(rpc): RaftJson<VoteRequest<NodeId>>,
) -> Result<Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    let raft = raft_target(&b, &headers)?;
    if let Some(e) = rpc.vote.leader_id().voted_for().and_then(|n| b.superseded(n)) {
        return Err(e);
    }
    // A removed node that comes back with its old identity must not disturb
    // the cluster with elections: only members may ask for votes.
    if let Some(candidate) = rpc.vote.leader_id().voted_for() {
        if !b.is_member(candidate) {
            return Err(ApiError::UnknownPeer(candidate));
        }
    }
    Ok(Json(raft.vote(rpc).await))
}

async fn raft_snapshot(
    State(b): State<SharedBackend>,
    headers: HeaderMap,
    RaftJson(rpc): RaftJson<InstallSnapshotRequest<TypeConfig>>,
) -> Result<Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>>, ApiError> {
    let raft = raft_target(&b, &headers)?;
    if let Some(e) = rpc.vote.leader_id().voted_for().and_then(|n| b.superseded(n)) {
        return Err(e);
    }
    Ok(Json(raft.install_snapshot(rpc).await))
}

/// The OpenAPI document, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tandem",
        description = "High-availability cluster manager REST API. Errors are `{code, message, hint}`; codes in docs/errors.md."
    ),
    paths(
        healthz,
        readyz,
        openapi_json,
        get_metrics,
        get_local,
        init_cluster,
        join_cluster,
        create_token,
        list_tokens,
        revoke_token,
        create_certificate,
        list_certificates,
        revoke_certificate,
        join_token,
        get_audit,
        get_session,
        list_alerts,
        get_alert,
        put_alert,
        delete_alert,
        test_alert,
        get_events,
        event_stream,
        get_cluster_ca,
        get_cluster,
        list_nodes,
        get_node,
        add_node,
        remove_node,
        set_standby,
        set_online,
        set_maintenance,
        set_attribute,
        delete_attribute,
        recover_cluster,
        list_sites,
        set_site_standby,
        set_site_online,
        switchover_site,
        list_groups,
        get_group,
        put_group,
        delete_group,
        start_group,
        stop_group,
        clear_group,
        move_group,
        list_volumes,
        get_volume,
        verify_volume,
        resolve_volume,
        replace_replica,
        promote_volume,
        get_ticket,
        acquire_ticket,
        release_ticket,
        group_health,
        volume_primary,
        volume_replica
    ),
    components(schemas(
        ErrorBody,
        InitView,
        TokenRequest,
        TokenView,
        TokenCreated,
        JoinTokenRequest,
        JoinTokenView,
        CertificateRequest,
        ClientCertView,
        ClientCertCreated,
        CaView,
        SessionView,
        tandem_raft::alerts::AlertSpec,
        AlertView,
        AlertDelivery,
        AlertTested,
        tandem_raft::access::AuditEntry,
        tandem_raft::events::Event,
        tandem_raft::events::Severity,
        EventList,
        StreamMessage,
        tandem_raft::access::Role,
        Health,
        LocalView,
        HeartbeatsDropped,
        InitRequest,
        JoinViaRequest,
        ClusterView,
        NodeView,
        PathView,
        Role,
        NodeState,
        AdminState,
        JoinRequest,
        AttributeValue,
        GroupView,
        MoveRequest,
        RecoverRequest,
        RecoverReport,
        PromoteRequest,
        PromoteReport,
        PromoteCandidate,
        RecoverGroup,
        SiteView,
        TicketView,
        TicketGrantorView,
        SwitchoverRequest,
        SwitchoverReport,
        SiteGroupReport,
        VolumeView,
        ReplicaView,
        ConnectionState,
        ResyncProgress,
        VerifyReport,
        ResolveRequest,
        ServingView
    ))
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON as a client that escapes every non-ASCII character writes it
    /// (Python's `json.dumps`: a character outside the BMP is 12 bytes).
    fn ascii_json(v: &serde_json::Value) -> String {
        let mut out = String::new();
        for c in v.to_string().chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        out
    }

    #[test]
    fn worst_alert_body_fits() {
        use tandem_raft::alerts::{MAX_ALERT_KINDS, MAX_ALERT_PEM, MAX_ALERT_TEXT};
        let long = |n: usize| "\u{1F600}".repeat(n);
        // Every field at its maximum and one past it, in the costliest escaping.
        let body = serde_json::json!({
            "kind": "webhook",
            "url": long(MAX_ALERT_TEXT + 1),
            "secret": long(MAX_ALERT_TEXT + 1),
            "cacert": long(MAX_ALERT_PEM + 1),
            "min_severity": "critical",
            "kinds": vec!["a".repeat(129); MAX_ALERT_KINDS + 1],
            "report_interval_s": u64::MAX,
        });
        let wire = ascii_json(&body);
        assert!(wire.len() > 150 * 1024, "the escaping is the costly one: {}", wire.len());
        assert!(wire.len() < MAX_BODY_BYTES, "{} bytes", wire.len());
    }

    #[test]
    fn the_streams_last_event_id_is_an_optional_number_never_null() {
        let doc = contract::document();
        let params = doc["paths"]["/v1/events/stream"]["get"]["parameters"].as_array().cloned().unwrap_or_default();
        let h = params.iter().find(|p| p["name"] == "Last-Event-ID").expect("documented");
        assert_eq!(h["required"], false, "{h}");
        assert!(!h["schema"].to_string().contains("null"), "{h}");
    }

    #[tokio::test]
    async fn read_body_keeps_a_body_within_the_limit_and_refuses_a_longer_one() {
        assert_eq!(read_body(Body::from(vec![7u8; 100]), 100).await.unwrap(), Bytes::from(vec![7u8; 100]));
        assert_eq!(read_body(Body::empty(), 100).await.unwrap(), Bytes::new());
        assert_eq!(read_body(Body::from(vec![7u8; 101]), 100).await, Err(ApiError::BodyTooLarge { limit: 100 }));
        // Past the drain cap it stops reading and still refuses.
        let huge = Body::from(vec![0u8; DRAIN_CAP_BYTES + 1]);
        assert_eq!(read_body(huge, 100).await, Err(ApiError::BodyTooLarge { limit: 100 }));
    }

    #[tokio::test]
    async fn an_oversize_body_is_read_to_its_end_before_the_refusal() {
        // The whole stream is consumed: the sender is never cut off mid-write.
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..64).map(|_| Ok(Bytes::from(vec![1u8; 4096]))).collect();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let tail = signalling_stream(chunks, tx);
        assert!(read_body(Body::from_stream(tail), 1024).await.is_err());
        assert!(rx.await.is_ok(), "the body was not read to its end");
    }

    /// A stream of `chunks` that signals when its end has been reached.
    fn signalling_stream(
        chunks: Vec<Result<Bytes, std::io::Error>>,
        done: tokio::sync::oneshot::Sender<()>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        let mut it = chunks.into_iter();
        let mut done = Some(done);
        futures_util::stream::poll_fn(move |_| {
            let next = it.next();
            if next.is_none() {
                if let Some(d) = done.take() {
                    let _ = d.send(());
                }
            }
            std::task::Poll::Ready(next)
        })
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct T {
        a: u32,
    }

    #[test]
    fn json_errors_are_classified() {
        assert!(matches!(parse_json::<T>(b"{\"a\": 1"), Err(ApiError::MalformedJson(_))));
        assert!(matches!(parse_json::<T>(b"not json"), Err(ApiError::MalformedJson(_))));
        match parse_json::<T>(b"{\"a\": 1, \"b\": 2}") {
            Err(ApiError::InvalidBody(m)) => assert!(m.contains("unknown field `b`"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_json::<T>(b"{\"a\": \"x\"}"), Err(ApiError::InvalidBody(_))));
        assert_eq!(parse_json::<T>(b"{\"a\": 7}"), Ok(T { a: 7 }));
        // A whole number written as a float is that integer; a fraction is not.
        assert_eq!(parse_json::<T>(b"{\"a\": 7.0}"), Ok(T { a: 7 }));
        assert!(matches!(parse_json::<T>(b"{\"a\": 7.5}"), Err(ApiError::InvalidBody(_))));
        assert!(matches!(parse_json::<T>(b"{\"a\": -1.0}"), Err(ApiError::InvalidBody(_))));
        // Exactly, where a float has no room for fractions left (serde_json's
        // float_roundtrip).
        #[derive(Debug, Deserialize, PartialEq)]
        struct U {
            a: u64,
        }
        assert_eq!(parse_json::<U>(b"{\"a\": 4138418994366886.0}"), Ok(U { a: 4138418994366886 }));
    }

    #[test]
    fn query_parsing_refuses_unknown_parameters() {
        let p: ReadParams = serde_urlencoded_like("stale=true").unwrap();
        assert!(p.stale);
        let p: ReadParams = serde_urlencoded_like("").unwrap();
        assert!(!p.stale);
        assert!(matches!(serde_urlencoded_like::<ReadParams>("bogus=1"), Err(ApiError::InvalidQuery(_))));
        assert!(matches!(serde_urlencoded_like::<ReadParams>("stale=maybe"), Err(ApiError::InvalidQuery(_))));
        assert!(serde_urlencoded_like::<ReadParams>("stale").unwrap().stale);
        assert!(!serde_urlencoded_like::<ReadParams>("stale=0").unwrap().stale);
        // A size that looks like a flag stays a size.
        let q: LagParams = serde_urlencoded_like("lag=0").unwrap();
        assert_eq!(q.lag.as_deref(), Some("0"));
    }

    #[test]
    fn openapi_lists_every_public_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/cluster",
            "/v1/nodes",
            "/v1/nodes/{name}",
            "/v1/nodes/{name}/standby",
            "/readyz",
            "/v1/cluster/join",
            "/v1/groups",
            "/v1/groups/{name}",
            "/v1/groups/{name}/move",
            "/v1/groups/{name}/stop",
            "/v1/volumes",
            "/v1/volumes/{name}",
            "/v1/volumes/{name}/verify",
            "/v1/volumes/{name}/resolve",
            "/v1/volumes/{name}/replicas/{node}/replace",
            "/v1/volumes/{name}/promote",
            "/v1/groups/{name}/health",
            "/v1/volumes/{name}/primary",
            "/v1/volumes/{name}/replica",
        ] {
            assert!(paths.contains_key(p), "{p} missing from openapi.json");
        }
    }
}
