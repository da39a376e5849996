//! Every error the API can return, each with its stable code, HTTP status
//! and hint, mapped in this one place. `docs/errors.md` documents every code;
//! a test keeps the two in step. Codes are never reused or renumbered.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tandem_raft::state::CommandError;
use utoipa::ToSchema;

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable error code, `TND-` and four digits (see docs/errors.md).
    pub code: String,
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("invalid request body: {0}")]
    InvalidBody(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("invalid query string: {0}")]
    InvalidQuery(String),
    #[error("no such route: {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("no node named {0}")]
    NodeNotFound(String),
    #[error("no node is in site {0}")]
    SiteNotFound(String),
    #[error("node {node} was superseded: {detail}")]
    Superseded { node: String, detail: String },
    #[error("cannot recover: {0}")]
    QuorumReachable(String),
    #[error("a node named {0} already exists")]
    NodeExists(String),
    #[error("address {address} is already used by node {name}")]
    AddressInUse { address: String, name: String },
    #[error("node {name} cannot be reached: {reason}")]
    NodeUnreachable { name: String, reason: String },
    #[error("node {name} at {url} already belongs to cluster {cluster_id}")]
    NodeInOtherCluster { name: String, url: String, cluster_id: String },
    #[error("node {name} has no attribute {key}")]
    AttributeNotFound { name: String, key: String },
    #[error("the cluster already has the maximum of {0} nodes")]
    TooManyNodes(usize),
    #[error("the agent at {url} is named {actual}, not {expected}")]
    NameMismatch { url: String, expected: String, actual: String },
    #[error("no cluster member answers at {url}: {reason}")]
    JoinTargetUnreachable { url: String, reason: String },
    #[error("this node is not a member of any cluster")]
    NotMember,
    #[error("this node already belongs to cluster {0}")]
    AlreadyMember(String),
    #[error("the cluster has no leader right now")]
    NoLeader,
    #[error("the cluster did not confirm the request in time: {0}")]
    QuorumUnavailable(String),
    #[error("could not forward the request to the leader at {url}: {reason}")]
    ForwardFailed { url: String, reason: String },
    #[error("a membership change is already in progress")]
    MembershipChangeInProgress,
    #[error("this request is for node {expected} of cluster {cluster}, but this is node {actual}")]
    WrongNode { expected: String, cluster: String, actual: String },
    #[error("removing {0} would leave the cluster without enough voters to keep quorum")]
    WouldLoseQuorum(String),
    #[error("{url} refused the request with {code}: {message}")]
    Refused { url: String, status: u16, code: String, message: String, hint: String },
    #[error("no group named {0}")]
    GroupNotFound(String),
    #[error("group {name} is referred to by group {by}")]
    GroupInUse { name: String, by: String },
    #[error("group {0} changed while the request was being applied")]
    GroupChanged(String),
    #[error("the cluster already has the maximum of {0} groups")]
    TooManyGroups(usize),
    #[error("{0}")]
    VolumeNotOnNode(String),
    #[error("{0}")]
    NotPrimary(String),
    #[error("{0}")]
    NoSuchReplica(String),
    #[error("{0}")]
    NotSplitBrain(String),
    #[error("{0}")]
    VolumeRefused(String),
    #[error("{0}")]
    VerifyRunning(String),
    #[error("{0}")]
    VolumeIo(String),
    #[error("no volume named {0}")]
    VolumeNotFound(String),
    #[error("{message}")]
    VolumeResize { field: String, message: String },
    #[error("{message}")]
    VolumeChange { field: String, message: String },
    #[error("invalid {field}: volume {name} needs {size} but {path} has only {free} free")]
    VolumeTooLarge { field: String, name: String, size: String, path: String, free: String },
    #[error("{0}")]
    StalePrimary(String),
    #[error("{message}")]
    ReplicaIsPrimary { group: String, message: String },
    #[error("{0}")]
    NoUpToDateReplicaLeft(String),
    #[error("{0}")]
    PromotionRefused(String),
    #[error("vote request from node {0}, which is not a member of this cluster")]
    UnknownPeer(u64),
    #[error("authentication required: {0}")]
    Unauthenticated(String),
    #[error("the token is not valid: {0}")]
    TokenRejected(String),
    #[error("{who} (role {role}) may not {action}")]
    Forbidden { who: String, role: String, action: String },
    #[error("a token named {0} already exists")]
    TokenExists(String),
    #[error("no token named {0}")]
    TokenNotFound(String),
    #[error("the cluster at {url} presents CA {actual}, not the pinned {expected}")]
    CaMismatch { url: String, expected: String, actual: String },
    #[error("{0} is only accepted on the agent's local admin socket")]
    LocalOnly(String),
    #[error("{0}")]
    CaUnavailable(String),
    #[error("certificate: {0}")]
    BadCertificate(String),
    #[error("a client certificate named {0} already exists")]
    CertificateExists(String),
    #[error("the client certificate {0} already has this key")]
    CertificateKeyInUse(String),
    #[error("no client certificate named {0}")]
    CertificateNotFound(String),
    #[error("the client certificate is not valid: {0}")]
    CertificateRejected(String),
    #[error("{0}")]
    CaExternal(String),
    #[error("no alert named {0}")]
    AlertNotFound(String),
    #[error("the cluster already has the maximum of {0} alerts")]
    TooManyAlerts(usize),
    #[error("alert {name}: the target did not take it: {reason}")]
    AlertFailed { name: String, reason: String },
    #[error("the ticket message's seal does not match the shared key")]
    TicketSeal,
    #[error("the ticket message is malformed: {0}")]
    TicketMalformed(String),
    #[error("{0}")]
    TicketUnknownSite(String),
    #[error("{0}")]
    TicketReplayed(String),
    #[error("{0}")]
    TicketTiming(String),
    #[error("this cluster takes no part in a ticket (no [ticket] in its nodes' configs)")]
    TicketNotConfigured,
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Every variant with its code, so docs and tests can enumerate them.
    pub const CODES: &'static [&'static str] = &[
        "TND-1001", "TND-1002", "TND-1003", "TND-1004", "TND-1005", "TND-1006", "TND-1010", "TND-1100", "TND-1101",
        "TND-1102", "TND-1103", "TND-1104", "TND-1105", "TND-1106", "TND-1107", "TND-1108", "TND-1109", "TND-1200",
        "TND-1201", "TND-1202", "TND-1203", "TND-1204", "TND-1205", "TND-1206", "TND-1207", "TND-1208", "TND-1209",
        "TND-1210", "TND-1211", "TND-1300", "TND-1301", "TND-1302", "TND-1303", "TND-1400", "TND-1401", "TND-1402",
        "TND-1403", "TND-1404", "TND-1405", "TND-1406", "TND-1407", "TND-1408", "TND-1409", "TND-1410", "TND-1411",
        "TND-1412", "TND-1413", "TND-1414", "TND-1500", "TND-1501", "TND-1502", "TND-1503", "TND-1504", "TND-1505",
        "TND-1506", "TND-1507", "TND-1508", "TND-1509", "TND-1510", "TND-1511", "TND-1512", "TND-1600", "TND-1601",
        "TND-1602", "TND-1700", "TND-1701", "TND-1702", "TND-1703", "TND-1704", "TND-1706", "TND-1900", "TND-1901",
    ];

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MalformedJson(_) => "TND-1001",
            InvalidBody(_) => "TND-1002",
            BodyTooLarge { .. } => "TND-1003",
            InvalidQuery(_) => "TND-1004",
            RouteNotFound { .. } => "TND-1005",
            MethodNotAllowed { .. } => "TND-1006",
            Invalid { .. } => "TND-1010",
            NodeNotFound(_) => "TND-1100",
            NodeExists(_) => "TND-1101",
            AddressInUse { .. } => "TND-1102",
            NodeUnreachable { .. } => "TND-1103",
            NodeInOtherCluster { .. } => "TND-1104",
            AttributeNotFound { .. } => "TND-1105",
            TooManyNodes(_) => "TND-1106",
            NameMismatch { .. } => "TND-1107",
            JoinTargetUnreachable { .. } => "TND-1108",
            SiteNotFound(_) => "TND-1109",
            NotMember => "TND-1200",
            AlreadyMember(_) => "TND-1201",
            NoLeader => "TND-1202",
            QuorumUnavailable(_) => "TND-1203",
            ForwardFailed { .. } => "TND-1204",
            MembershipChangeInProgress => "TND-1205",
            WrongNode { .. } => "TND-1206",
            WouldLoseQuorum(_) => "TND-1207",
            Refused { .. } => "TND-1208",
            UnknownPeer(_) => "TND-1209",
            Superseded { .. } => "TND-1210",
            QuorumReachable(_) => "TND-1211",
            GroupNotFound(_) => "TND-1300",
            GroupInUse { .. } => "TND-1301",
            GroupChanged(_) => "TND-1302",
            TooManyGroups(_) => "TND-1303",
            VolumeNotOnNode(_) => "TND-1400",
            NotPrimary(_) => "TND-1401",
            NoSuchReplica(_) => "TND-1402",
            NotSplitBrain(_) => "TND-1403",
            VolumeRefused(_) => "TND-1404",
            VerifyRunning(_) => "TND-1405",
            VolumeIo(_) => "TND-1406",
            VolumeNotFound(_) => "TND-1407",
            VolumeResize { .. } => "TND-1408",
            VolumeChange { .. } => "TND-1409",
            VolumeTooLarge { .. } => "TND-1410",
            StalePrimary(_) => "TND-1411",
            ReplicaIsPrimary { .. } => "TND-1412",
            NoUpToDateReplicaLeft(_) => "TND-1413",
            PromotionRefused(_) => "TND-1414",
            Unauthenticated(_) => "TND-1500",
            TokenRejected(_) => "TND-1501",
            Forbidden { .. } => "TND-1502",
            TokenExists(_) => "TND-1503",
            TokenNotFound(_) => "TND-1504",
            CaMismatch { .. } => "TND-1505",
            LocalOnly(_) => "TND-1506",
            CaUnavailable(_) => "TND-1507",
            BadCertificate(_) => "TND-1508",
            CertificateExists(_) => "TND-1509",
            CertificateKeyInUse(_) => "TND-1513",
            CertificateNotFound(_) => "TND-1510",
            CertificateRejected(_) => "TND-1511",
            CaExternal(_) => "TND-1512",
            AlertNotFound(_) => "TND-1600",
            TooManyAlerts(_) => "TND-1601",
            AlertFailed { .. } => "TND-1602",
            TicketSeal => "TND-1700",
            TicketMalformed(_) => "TND-1701",
            TicketUnknownSite(_) => "TND-1702",
            TicketReplayed(_) => "TND-1703",
            TicketTiming(_) => "TND-1704",
            TicketNotConfigured => "TND-1706",
            Storage(_) => "TND-1900",
            Internal(_) => "TND-1901",
        }
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MalformedJson(_) | InvalidBody(_) | InvalidQuery(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouteNotFound { .. }
            | NodeNotFound(_)
            | SiteNotFound(_)
            | AttributeNotFound { .. }
            | GroupNotFound(_)
            | VolumeNotOnNode(_)
            | VolumeNotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Unauthenticated(_) | TokenRejected(_) | CertificateRejected(_) => StatusCode::UNAUTHORIZED,
            Forbidden { .. } | LocalOnly(_) => StatusCode::FORBIDDEN,
            TokenNotFound(_) | CertificateNotFound(_) | AlertNotFound(_) => StatusCode::NOT_FOUND,
            // The target (a webhook, a mail server, an alert agent) failed,
            // not this API: a gateway's error.
            AlertFailed { .. } => StatusCode::BAD_GATEWAY,
            TokenExists(_) | CaMismatch { .. } | CertificateExists(_) | CertificateKeyInUse(_) | CaExternal(_) => {
                StatusCode::CONFLICT
            }
            BadCertificate(_) => StatusCode::UNPROCESSABLE_ENTITY,
            CaUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            // A well-formed request that the cluster's state refuses (a node
            // holding no replica, too little free space) is a conflict, 409:
            // 422 is for what the OpenAPI schema or its stated rules refuse.
            Invalid { .. } | NameMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Superseded { .. } | QuorumReachable(_) => StatusCode::CONFLICT,
            NodeExists(_)
            | AddressInUse { .. }
            | NodeUnreachable { .. }
            | JoinTargetUnreachable { .. }
            | NodeInOtherCluster { .. }
            | TooManyNodes(_)
            | AlreadyMember(_)
            | WrongNode { .. }
            | UnknownPeer(_)
            | GroupInUse { .. }
            | GroupChanged(_)
            | TooManyGroups(_)
            | TooManyAlerts(_)
            | WouldLoseQuorum(_)
            | NotPrimary(_)
            | NotSplitBrain(_)
            | VolumeRefused(_)
            | VerifyRunning(_)
            | VolumeResize { .. }
            | VolumeChange { .. }
            | NoSuchReplica(_)
            | VolumeTooLarge { .. }
            | StalePrimary(_)
            | ReplicaIsPrimary { .. }
            | NoUpToDateReplicaLeft(_)
            | PromotionRefused(_) => StatusCode::CONFLICT,
            NotMember
            | NoLeader
            | QuorumUnavailable(_)
            | ForwardFailed { .. }
            | MembershipChangeInProgress
            | VolumeIo(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refused { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            TicketSeal => StatusCode::UNAUTHORIZED,
            TicketMalformed(_) => StatusCode::BAD_REQUEST,
            TicketUnknownSite(_) => StatusCode::FORBIDDEN,
            TicketReplayed(_) | TicketTiming(_) => StatusCode::CONFLICT,
            TicketNotConfigured => StatusCode::NOT_FOUND,
            Storage(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn hint(&self) -> String {
        use ApiError::*;
        match self {
            MalformedJson(_) => "Send a valid JSON document; check quotes, commas and braces.".into(),
            InvalidBody(_) => "Fix the named field; unknown fields are refused. See docs/api.md for the schema.".into(),
            BodyTooLarge { .. } => "Requests are small JSON documents; send less.".into(),
            InvalidQuery(_) => "The only query parameters are `stale=true|false` on reads and `force=true|false` on DELETE.".into(),
            RouteNotFound { .. } => "See GET /openapi.json or docs/api.md for the routes.".into(),
            MethodNotAllowed { .. } => "See GET /openapi.json or docs/api.md for the methods of this route.".into(),
            Invalid { field, .. } => format!("Correct `{field}` and send the request again."),
            NodeNotFound(_) => "List the nodes with `tandem node list` or GET /v1/nodes.".into(),
            Superseded { .. } => "The cluster was recovered without this node after it lost its quorum; its Raft state is never \
                merged. To rejoin: on the recovered cluster `tandem node remove <name> --force`, then here \
                `tandem cluster join <url> --token … --ca-hash …` (its volumes' data are kept).".into(),
            QuorumReachable(_) => "Recover only when a majority of the voters is gone for good: wait for the \
                cluster to elect a leader, or for the unreachable voters to come back.".into(),
            SiteNotFound(_) => "A site is the `site` of its nodes' configs: list them with `tandem site list` or GET /v1/sites.".into(),
            NodeExists(_) => "Pick another name, or remove the old node first (DELETE /v1/nodes/{name}).".into(),
            AddressInUse { .. } => "Each node needs its own address:port; fix the agent's config.".into(),
            NodeUnreachable { .. } => {
                "Check that the agent runs and that its address and port are reachable from the leader. \
                 To remove a dead node, use DELETE /v1/nodes/{name}?force=true (`tandem node remove --force`)."
                    .into()
            }
            NodeInOtherCluster { .. } => {
                "A node belongs to one cluster. Remove it from the other cluster first, or wipe its data_dir.".into()
            }
            AttributeNotFound { .. } => "GET /v1/nodes/{name} lists the node's attributes.".into(),
            TooManyNodes(_) => "tandem manages up to 32 nodes per cluster; split into several clusters.".into(),
            NameMismatch { .. } => "Use the name from the agent's config file (GET /v1/local on that agent).".into(),
            JoinTargetUnreachable { .. } => {
                "Give the API URL of a running member (e.g. http://10.0.0.1:7401), reachable from this node.".into()
            }
            NotMember => "Bootstrap a cluster with `tandem cluster init`, or join one with `tandem cluster join <url>`.".into(),
            AlreadyMember(_) => "Nothing to do. To move the node to another cluster, remove it from this one first.".into(),
            NoLeader | MembershipChangeInProgress => {
                "Retry after the Retry-After delay; if it persists, check that a majority of voters is up (GET /v1/cluster?stale=true).".into()
            }
            QuorumUnavailable(_) => {
                "A majority of voters must be reachable. Check GET /v1/cluster?stale=true on each node.".into()
            }
            ForwardFailed { .. } => "Retry; the leader may have just changed or be unreachable from this node.".into(),
            WrongNode { .. } => "An address now belongs to another agent; fix the cluster's addresses.".into(),
            WouldLoseQuorum(_) => "Add or repair nodes first, so that a majority of voters stays available.".into(),
            Refused { hint, .. } => hint.clone(),
            GroupNotFound(_) => "List the groups with `tandem group list` or GET /v1/groups.".into(),
            GroupInUse { .. } => "Remove the reference (colocate_with / anti_affinity) from the other group first.".into(),
            GroupChanged(_) => "Someone else changed the group at the same time; read it again and retry.".into(),
            TooManyGroups(_) => "Delete groups you no longer need.".into(),
            VolumeNotOnNode(_) => {
                "The volume's data plane is not set up on that node yet (the group is starting or moving); \
                 retry in a moment, and see GET /v1/volumes/{name}."
                    .into()
            }
            NotPrimary(_) => {
                "Verify and resolve run on the volume's primary: start its group (`tandem group start`) \
                 and retry; GET /v1/volumes/{name} shows the primary."
                    .into()
            }
            NoSuchReplica(_) => "Name a replica node: GET /v1/volumes/{name} lists them.".into(),
            NotSplitBrain(_) => {
                "Nothing to resolve: only a replica shown as SplitBrain in GET /v1/volumes/{name} can be discarded."
                    .into()
            }
            VolumeRefused(_) => "Act on the reason in the message, then retry (see docs/errors.md#tnd-1404).".into(),
            VerifyRunning(_) => "Wait for the running verify to finish: GET /v1/volumes/{name} shows its progress.".into(),
            VolumeIo(_) => {
                "Check the disk under the node's data_dir (dmesg, free space, permissions); \
                 the replica may be detached (Diskless) until it is repaired."
                    .into()
            }
            VolumeNotFound(_) => "List the volumes with `tandem volume list` or GET /v1/volumes.".into(),
            ReplicaIsPrimary { group, .. } => format!(
                "Move the group first (`tandem group move {group} <node>`), then replace this replica; \
                 a serving primary's disk is never wiped under its application."
            ),
            NoUpToDateReplicaLeft(_) => {
                "Bring another replica UpToDate first (start its node, let its resync finish: \
                 GET /v1/volumes/{name} shows the recorded disks); nothing was changed."
                    .into()
            }
            PromotionRefused(_) => {
                "A forced promotion is for a volume whose group cannot start because no UpToDate replica is online: \
                 run it with ?dry_run=true to see each candidate and why (docs/errors.md#tnd-1414); nothing was changed."
                    .into()
            }
            VolumeResize { field, .. } => format!(
                "A volume only grows: set `{field}` to at least its current size. To make it smaller, create a new \
                 volume in a new group and copy the data."
            ),
            VolumeChange { field, .. } => format!(
                "Keep `{field}` as it is, or define a new volume (another name) and copy the data."
            ),
            VolumeTooLarge { field, .. } => {
                format!("Lower `{field}`, or free space on (or grow) the file system of the agents' data_dir.")
            }
            StalePrimary(_) => {
                "Another node became the volume's primary; this one must stop using it (done automatically).".into()
            }
            UnknownPeer(_) => {
                "A removed node is still running with its old identity: stop it and wipe its data_dir, \
                 or let it rejoin with `tandem cluster join`."
                    .into()
            }
            Unauthenticated(_) => {
                "Send `Authorization: Bearer <token>` (the CLI reads TANDEM_TOKEN); `tandem cluster init` printed \
                 the first admin token and wrote it to <data_dir>/admin.token."
                    .into()
            }
            TokenRejected(_) => {
                "The token is unknown, expired or revoked: ask an admin for a new one (`tandem token create`).".into()
            }
            Forbidden { .. } => {
                "Use a token whose role allows this (viewer: reads; operator: day-to-day operations; admin: all).".into()
            }
            TokenExists(_) => "Pick another name, or revoke the old token first (`tandem token revoke`).".into(),
            TokenNotFound(_) => "List the tokens with `tandem token list` or GET /v1/tokens.".into(),
            CaMismatch { .. } => {
                "Do not join: check --ca-hash against `tandem cluster join-token` on a member. A mismatch means the \
                 URL reaches another cluster, or someone in between."
                    .into()
            }
            LocalOnly(_) => {
                "Run it on the node itself as root: `tandem cluster init` / `tandem cluster join` talk to the agent's \
                 admin socket (<data_dir>/admin.sock)."
                    .into()
            }
            CaUnavailable(_) => "Retry in a moment: the leader is fetching the cluster CA's key.".into(),
            BadCertificate(_) => {
                "Send a PEM certificate signing request made with the node's own key; with an operator's CA \
                 ([tls] ca_file), a certificate that CA signed, valid now, whose common name is the node's name."
                    .into()
            }
            CertificateExists(_) => {
                "Pick another name, or revoke the old certificate first (`tandem cert revoke`).".into()
            }
            CertificateNotFound(_) => "List the client certificates with `tandem cert list` or GET /v1/certificates.".into(),
            AlertNotFound(_) => "List the alerts with `tandem alert list` or GET /v1/alerts.".into(),
            TooManyAlerts(_) => "Delete an alert you no longer need (`tandem alert delete`), or widen an existing one's filter.".into(),
            AlertFailed { .. } => {
                "Check the target named in the message (URL, mail server, agent's path and exit status) from the \
                 leader; the agent's log on the leader has the whole answer."
                    .into()
            }
            TicketSeal | TicketMalformed(_) | TicketUnknownSite(_) | TicketReplayed(_) | TicketTiming(_) => {
                "The ticket's three participants must share one key file, name the same two sites, use the same \
                 lease_ms and margin_ms, and keep their clocks within 30 s (NTP); see docs/dr.md."
                    .into()
            }
            TicketNotConfigured => {
                "Give every node of this cluster a [ticket] section (docs/dr.md) to take part in a ticket.".into()
            }
            CertificateKeyInUse(_) => {
                "Each client certificate needs its own key: make a new one (`tandem cert create` does), or revoke the other certificate first.".into()
            }
            CertificateRejected(_) => {
                "The certificate is not recorded (never, or revoked) or expired: ask an admin for a new one \
                 (`tandem cert create`), or use a token."
                    .into()
            }
            CaExternal(_) => {
                "This cluster's certificates come from the operator's CA ([tls] ca_file): issue them with that \
                 CA, and give every node the same [tls] ca_file, cert_file and key_file keys (or none of them)."
                    .into()
            }
            Storage(_) => "Check the node's data_dir (disk space, permissions) and its log.".into(),
            Internal(_) => "Report this with the agent's log; the request may be retried.".into(),
        }
    }

    /// A volume error (data plane, or a stale primary) that another node
    /// answered with, rebuilt so that it reaches the client under its own
    /// code and status rather than as TND-1208. `None` for any other code.
    pub fn relayed(code: &str, message: String) -> Option<ApiError> {
        use ApiError::*;
        Some(match code {
            "TND-1400" => VolumeNotOnNode(message),
            "TND-1401" => NotPrimary(message),
            "TND-1402" => NoSuchReplica(message),
            "TND-1403" => NotSplitBrain(message),
            "TND-1404" => VolumeRefused(message),
            "TND-1405" => VerifyRunning(message),
            "TND-1406" => VolumeIo(message),
            "TND-1411" => StalePrimary(message),
            _ => return None,
        })
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code().to_string(), message: self.to_string(), hint: self.hint() }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let message = e.to_string();
        match e {
            CommandError::AlreadyBootstrapped { cluster_id } => ApiError::AlreadyMember(cluster_id),
            CommandError::NotBootstrapped => ApiError::NotMember,
            CommandError::NodeExists { name } => ApiError::NodeExists(name),
            CommandError::AddressInUse { address, name } => ApiError::AddressInUse { address, name },
            CommandError::NodeNotFound { name } => ApiError::NodeNotFound(name),
            CommandError::SiteNotFound { site } => ApiError::SiteNotFound(site),
            CommandError::AttributeNotFound { name, key } => ApiError::AttributeNotFound { name, key },
            CommandError::TooManyNodes { max } => ApiError::TooManyNodes(max),
            CommandError::Invalid { field, reason } => ApiError::Invalid { field, reason },
            CommandError::GroupNotFound { name } => ApiError::GroupNotFound(name),
            CommandError::GroupInUse { name, by } => ApiError::GroupInUse { name, by },
            CommandError::StaleEpoch { name, .. } | CommandError::GroupRunning { name } => ApiError::GroupChanged(name),
            CommandError::TooManyGroups { max } => ApiError::TooManyGroups(max),
            CommandError::VolumeNotFound { name } => ApiError::VolumeNotFound(name),
            CommandError::NoSuchReplica { .. } => ApiError::NoSuchReplica(message),
            CommandError::VolumeResize { field, .. } => ApiError::VolumeResize { field, message },
            CommandError::VolumeChange { field, .. } => ApiError::VolumeChange { field, message },
            CommandError::NotVolumePrimary { .. } => ApiError::StalePrimary(message),
            CommandError::ReplicaIsPrimary { group, .. } => ApiError::ReplicaIsPrimary { group, message },
            CommandError::NoUpToDateReplicaLeft { .. } => ApiError::NoUpToDateReplicaLeft(message),
            CommandError::PromotionRefused { .. } => ApiError::PromotionRefused(message),
            CommandError::TokenExists { name } => ApiError::TokenExists(name),
            CommandError::TokenNotFound { name } => ApiError::TokenNotFound(name),
            CommandError::CertificateExists { name } => ApiError::CertificateExists(name),
            CommandError::CertificateNotFound { name } => ApiError::CertificateNotFound(name),
            CommandError::CertificateKeyInUse { name } => ApiError::CertificateKeyInUse(name),
            CommandError::AlertNotFound { name } => ApiError::AlertNotFound(name),
            CommandError::TooManyAlerts { max } => ApiError::TooManyAlerts(max),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.code(), "{self}");
        } else {
            tracing::debug!(code = self.code(), "{self}");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        // For the audit log (the auth middleware reads it back).
        resp.headers_mut().insert("x-tandem-error-code", HeaderValue::from_static(self.code()));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tandem\""));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_documented() {
        let mut codes = ApiError::CODES.to_vec();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ApiError::CODES.len());
        let doc = include_str!("../../docs/errors.md");
        for code in ApiError::CODES {
            assert!(doc.contains(&format!("## {code}")), "{code} missing from docs/errors.md");
        }
    }

    #[test]
    fn relayed_volume_errors_keep_their_code() {
        for code in ["TND-1400", "TND-1401", "TND-1402", "TND-1403", "TND-1404", "TND-1405", "TND-1406", "TND-1411"] {
            let e = ApiError::relayed(code, "m".into()).unwrap();
            assert_eq!((e.code(), e.to_string()), (code, "m".to_string()));
            assert!(!e.status().is_server_error() || code == "TND-1406", "{code} is a client-side condition");
        }
        assert!(ApiError::relayed("TND-1100", "m".into()).is_none());
    }

    #[test]
    fn volume_refusals_from_the_log_keep_their_field() {
        let e = ApiError::from(CommandError::VolumeResize {
            name: "data".into(),
            field: "resources[0].size".into(),
            from: 2 << 30,
            to: 1 << 30,
        });
        assert_eq!((e.code(), e.status()), ("TND-1408", StatusCode::CONFLICT));
        assert!(e.to_string().contains("cannot shrink from 2GiB to 1GiB"), "{e}");
        assert!(e.hint().contains("resources[0].size"), "{}", e.hint());
        let e = ApiError::from(CommandError::NoSuchReplica { volume: "data".into(), node: "n3".into() });
        assert_eq!((e.code(), e.status()), ("TND-1402", StatusCode::CONFLICT));
    }

    #[test]
    fn service_unavailable_carries_retry_after() {
        let r = ApiError::NoLeader.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()), Some(&b"1"[..]));
    }
}
