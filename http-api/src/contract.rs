//! The exact contract of the REST API: which statuses each operation can
//! answer (derived from [`ApiError::status`], so the document cannot drift
//! from the code), the request schemas with every constraint the validation
//! applies, the typed group definition, and the security scheme.
//!
//! [`document`] is what `GET /openapi.json` serves: utoipa's [`ApiDoc`]
//! completed from the tables here. This module must never decide anything
//! about a request: it only describes what the handlers and the validation
//! in `tandem_raft` do.

use serde_json::{json, Map, Value};
use tandem_raft::error::MAX_NAME_LEN;
use tandem_raft::group::{FSTYPES, MAX_RESOURCES, STOP_SIGNALS};
use tandem_raft::state::{MAX_ADDRESSES, MAX_ATTRIBUTE_VALUE_LEN};
use tandem_raft::volume::{ReadBalancing, ResyncMode, SplitBrainPolicy, MAX_REPLICAS, MAX_VOLUME_BYTES};
use utoipa::OpenApi;

use crate::{ApiDoc, ApiError};

/// What an operation is made of, besides its handler: each layer adds the
/// errors it can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    /// Sent to the leader by `route_to_leader` (503 when there is none, or
    /// when forwarding fails; 413 when the body cannot be relayed).
    pub forwarded: bool,
    /// Parses a query string (400 TND-1004 on anything unknown).
    pub query: bool,
    /// Parses a JSON body (400 TND-1001/1002, 413 TND-1003).
    pub body: bool,
}

/// One documented operation: its route, its layers and the errors its
/// handler and backend can return (besides those of its layers).
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub layers: Layers,
    pub errors: fn() -> Vec<ApiError>,
}

/// Whether a route needs a token is not listed here: [`crate::auth::access`]
/// decides it ([`Operation::secured`]).
const fn layers(forwarded: bool, query: bool, body: bool) -> Layers {
    Layers { forwarded, query, body }
}

fn s() -> String {
    String::new()
}

fn none() -> Vec<ApiError> {
    Vec::new()
}

fn not_ready() -> Vec<ApiError> {
    vec![ApiError::NotMember, ApiError::Superseded { node: s(), detail: s() }, ApiError::NoLeader]
}

/// Every linearizable read: it needs the leader's confirmation.
fn read() -> Vec<ApiError> {
    vec![ApiError::QuorumUnavailable(s())]
}

fn read_node() -> Vec<ApiError> {
    vec![ApiError::QuorumUnavailable(s()), ApiError::NodeNotFound(s())]
}

fn read_group() -> Vec<ApiError> {
    vec![ApiError::QuorumUnavailable(s()), ApiError::GroupNotFound(s())]
}

fn read_volume() -> Vec<ApiError> {
    vec![ApiError::QuorumUnavailable(s()), ApiError::VolumeNotFound(s())]
}

fn events() -> Vec<ApiError> {
    vec![ApiError::NotMember]
}

fn init() -> Vec<ApiError> {
    vec![
        ApiError::AlreadyMember(s()),
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::QuorumUnavailable(s()),
        // Over TCP, even with an admin token: the admin socket only.
        ApiError::LocalOnly(s()),
    ]
}

fn join() -> Vec<ApiError> {
    vec![
        ApiError::AlreadyMember(s()),
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::JoinTargetUnreachable { url: s(), reason: s() },
        // What the cluster answered to `POST /v1/nodes` comes back as is.
        ApiError::NodeExists(s()),
        ApiError::NameMismatch { url: s(), expected: s(), actual: s() },
        ApiError::NoLeader,
        ApiError::CaMismatch { url: s(), expected: s(), actual: s() },
        ApiError::BadCertificate(s()),
        ApiError::LocalOnly(s()),
    ]
}

fn create_token() -> Vec<ApiError> {
    vec![ApiError::Invalid { field: s(), reason: s() }, ApiError::TokenExists(s()), ApiError::QuorumUnavailable(s())]
}

fn revoke_token() -> Vec<ApiError> {
    vec![ApiError::TokenNotFound(s()), ApiError::QuorumUnavailable(s())]
}

fn create_certificate() -> Vec<ApiError> {
    vec![
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::BadCertificate(s()),
        ApiError::CertificateExists(s()),
        ApiError::CaExternal(s()),
        ApiError::CaUnavailable(s()),
        ApiError::QuorumUnavailable(s()),
    ]
}

fn revoke_certificate() -> Vec<ApiError> {
    vec![ApiError::CertificateNotFound(s()), ApiError::QuorumUnavailable(s())]
}

fn join_token() -> Vec<ApiError> {
    vec![ApiError::Invalid { field: s(), reason: s() }, ApiError::BadCertificate(s()), ApiError::QuorumUnavailable(s())]
}

fn read_alert() -> Vec<ApiError> {
    vec![ApiError::QuorumUnavailable(s()), ApiError::AlertNotFound(s())]
}

fn put_alert() -> Vec<ApiError> {
    vec![ApiError::Invalid { field: s(), reason: s() }, ApiError::TooManyAlerts(0), ApiError::QuorumUnavailable(s())]
}

fn delete_alert() -> Vec<ApiError> {
    vec![ApiError::AlertNotFound(s()), ApiError::QuorumUnavailable(s())]
}

fn test_alert() -> Vec<ApiError> {
    vec![
        ApiError::AlertNotFound(s()),
        ApiError::AlertFailed { name: s(), reason: s() },
        ApiError::QuorumUnavailable(s()),
    ]
}

fn cluster_ca() -> Vec<ApiError> {
    vec![ApiError::NotMember, ApiError::BadCertificate(s())]
}

fn add_node() -> Vec<ApiError> {
    vec![
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::NameMismatch { url: s(), expected: s(), actual: s() },
        ApiError::NodeExists(s()),
        ApiError::AddressInUse { address: s(), name: s() },
        ApiError::NodeUnreachable { name: s(), reason: s() },
        ApiError::NodeInOtherCluster { name: s(), url: s(), cluster_id: s() },
        ApiError::TooManyNodes(0),
        ApiError::QuorumUnavailable(s()),
        ApiError::MembershipChangeInProgress,
    ]
}

fn remove_node() -> Vec<ApiError> {
    vec![
        ApiError::NodeNotFound(s()),
        ApiError::NodeUnreachable { name: s(), reason: s() },
        ApiError::WouldLoseQuorum(s()),
        ApiError::QuorumUnavailable(s()),
        ApiError::MembershipChangeInProgress,
    ]
}

fn node_write() -> Vec<ApiError> {
    vec![ApiError::NodeNotFound(s()), ApiError::QuorumUnavailable(s())]
}

fn set_attribute() -> Vec<ApiError> {
    vec![ApiError::NodeNotFound(s()), ApiError::Invalid { field: s(), reason: s() }, ApiError::QuorumUnavailable(s())]
}

fn delete_attribute() -> Vec<ApiError> {
    vec![
        ApiError::NodeNotFound(s()),
        ApiError::AttributeNotFound { name: s(), key: s() },
        ApiError::QuorumUnavailable(s()),
    ]
}

fn put_group() -> Vec<ApiError> {
    vec![
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::VolumeTooLarge { field: s(), name: s(), size: s(), path: s(), free: s() },
        ApiError::GroupChanged(s()),
        ApiError::TooManyGroups(0),
        ApiError::VolumeResize { field: s(), message: s() },
        ApiError::VolumeChange { field: s(), message: s() },
        ApiError::QuorumUnavailable(s()),
    ]
}

fn delete_group() -> Vec<ApiError> {
    vec![
        ApiError::GroupNotFound(s()),
        ApiError::GroupInUse { name: s(), by: s() },
        ApiError::GroupChanged(s()),
        ApiError::QuorumUnavailable(s()),
    ]
}

fn group_action() -> Vec<ApiError> {
    vec![ApiError::GroupNotFound(s()), ApiError::QuorumUnavailable(s())]
}

fn move_group() -> Vec<ApiError> {
    vec![
        ApiError::GroupNotFound(s()),
        ApiError::NodeNotFound(s()),
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::QuorumUnavailable(s()),
    ]
}

fn recover() -> Vec<ApiError> {
    vec![
        ApiError::NotMember,
        ApiError::Superseded { node: s(), detail: s() },
        ApiError::QuorumReachable(s()),
        ApiError::Invalid { field: s(), reason: s() },
    ]
}

fn read_site() -> Vec<ApiError> {
    vec![ApiError::QuorumUnavailable(s())]
}

fn site_action() -> Vec<ApiError> {
    vec![ApiError::SiteNotFound(s()), ApiError::QuorumUnavailable(s())]
}

fn switchover() -> Vec<ApiError> {
    vec![ApiError::SiteNotFound(s()), ApiError::Invalid { field: s(), reason: s() }, ApiError::QuorumUnavailable(s())]
}

fn ticket() -> Vec<ApiError> {
    vec![ApiError::TicketNotConfigured]
}

fn verify() -> Vec<ApiError> {
    vec![
        ApiError::VolumeNotFound(s()),
        ApiError::VolumeNotOnNode(s()),
        ApiError::NotPrimary(s()),
        ApiError::VerifyRunning(s()),
        ApiError::VolumeRefused(s()),
        ApiError::VolumeIo(s()),
        ApiError::ForwardFailed { url: s(), reason: s() },
    ]
}

fn resolve() -> Vec<ApiError> {
    vec![
        ApiError::VolumeNotFound(s()),
        ApiError::VolumeNotOnNode(s()),
        ApiError::NoSuchReplica(s()),
        ApiError::NotPrimary(s()),
        ApiError::NotSplitBrain(s()),
        ApiError::VolumeRefused(s()),
        ApiError::VolumeIo(s()),
        ApiError::StalePrimary(s()),
        ApiError::ForwardFailed { url: s(), reason: s() },
    ]
}

fn replace_replica() -> Vec<ApiError> {
    vec![
        ApiError::VolumeNotFound(s()),
        ApiError::NodeNotFound(s()),
        ApiError::NoSuchReplica(s()),
        ApiError::ReplicaIsPrimary { group: s(), message: s() },
        ApiError::NoUpToDateReplicaLeft(s()),
        ApiError::QuorumUnavailable(s()),
    ]
}

fn promote() -> Vec<ApiError> {
    vec![
        ApiError::VolumeNotFound(s()),
        ApiError::NoSuchReplica(s()),
        ApiError::PromotionRefused(s()),
        ApiError::Invalid { field: s(), reason: s() },
        ApiError::QuorumUnavailable(s()),
    ]
}

/// Every operation of the document. A test checks this table against the
/// document both ways.
pub const OPERATIONS: &[Operation] = &[
    Operation { method: "get", path: "/healthz", layers: layers(false, false, false), errors: none },
    Operation { method: "get", path: "/readyz", layers: layers(false, false, false), errors: not_ready },
    Operation { method: "get", path: "/openapi.json", layers: layers(false, false, false), errors: none },
    Operation { method: "get", path: "/metrics", layers: layers(false, true, false), errors: none },
    Operation { method: "get", path: "/v1/local", layers: layers(false, true, false), errors: none },
    Operation { method: "post", path: "/v1/cluster/init", layers: layers(false, false, true), errors: init },
    Operation { method: "post", path: "/v1/cluster/join", layers: layers(false, false, true), errors: join },
    Operation { method: "get", path: "/v1/cluster/ca", layers: layers(false, false, false), errors: cluster_ca },
    Operation { method: "get", path: "/v1/tokens", layers: layers(true, true, false), errors: read },
    Operation { method: "post", path: "/v1/tokens", layers: layers(true, false, true), errors: create_token },
    Operation { method: "delete", path: "/v1/tokens/{name}", layers: layers(true, true, false), errors: revoke_token },
    Operation { method: "get", path: "/v1/certificates", layers: layers(true, true, false), errors: read },
    Operation { method: "get", path: "/v1/alerts", layers: layers(true, true, false), errors: read },
    Operation { method: "get", path: "/v1/alerts/{name}", layers: layers(true, true, false), errors: read_alert },
    Operation { method: "put", path: "/v1/alerts/{name}", layers: layers(true, false, true), errors: put_alert },
    Operation { method: "delete", path: "/v1/alerts/{name}", layers: layers(true, true, false), errors: delete_alert },
    Operation { method: "post", path: "/v1/alerts/{name}/test", layers: layers(true, true, false), errors: test_alert },
    Operation {
        method: "post",
        path: "/v1/certificates",
        layers: layers(true, false, true),
        errors: create_certificate,
    },
    Operation {
        method: "delete",
        path: "/v1/certificates/{name}",
        layers: layers(true, true, false),
        errors: revoke_certificate,
    },
    Operation { method: "post", path: "/v1/cluster/join-token", layers: layers(true, false, true), errors: join_token },
    Operation { method: "get", path: "/v1/audit", layers: layers(true, true, false), errors: read },
    // Answered by this node's middleware: who the caller is.
    Operation { method: "get", path: "/v1/session", layers: layers(false, true, false), errors: none },
    // Served from this node's applied state: never forwarded, no quorum needed.
    Operation { method: "get", path: "/v1/events", layers: layers(false, true, false), errors: events },
    Operation { method: "get", path: "/v1/events/stream", layers: layers(false, true, false), errors: events },
    Operation { method: "get", path: "/v1/cluster", layers: layers(true, true, false), errors: read },
    Operation { method: "get", path: "/v1/nodes", layers: layers(true, true, false), errors: read },
    Operation { method: "post", path: "/v1/nodes", layers: layers(true, false, true), errors: add_node },
    Operation { method: "get", path: "/v1/nodes/{name}", layers: layers(true, true, false), errors: read_node },
    Operation { method: "delete", path: "/v1/nodes/{name}", layers: layers(true, true, false), errors: remove_node },
    Operation {
        method: "post",
        path: "/v1/nodes/{name}/standby",
        layers: layers(true, false, false),
        errors: node_write,
    },
    Operation {
        method: "post",
        path: "/v1/nodes/{name}/online",
        layers: layers(true, false, false),
        errors: node_write,
    },
    Operation {
        method: "post",
        path: "/v1/nodes/{name}/maintenance",
        layers: layers(true, false, false),
        errors: node_write,
    },
    Operation {
        method: "put",
        path: "/v1/nodes/{name}/attributes/{key}",
        layers: layers(true, false, true),
        errors: set_attribute,
    },
    Operation {
        method: "delete",
        path: "/v1/nodes/{name}/attributes/{key}",
        layers: layers(true, false, false),
        errors: delete_attribute,
    },
    Operation { method: "post", path: "/v1/cluster/recover", layers: layers(false, true, true), errors: recover },
    Operation { method: "get", path: "/v1/sites", layers: layers(true, true, false), errors: read_site },
    Operation {
        method: "post",
        path: "/v1/sites/{site}/standby",
        layers: layers(true, false, false),
        errors: site_action,
    },
    Operation {
        method: "post",
        path: "/v1/sites/{site}/online",
        layers: layers(true, false, false),
        errors: site_action,
    },
    Operation {
        method: "post",
        path: "/v1/sites/{site}/switchover",
        layers: layers(true, false, true),
        errors: switchover,
    },
    Operation { method: "get", path: "/v1/ticket", layers: layers(true, false, false), errors: ticket },
    Operation { method: "post", path: "/v1/ticket/acquire", layers: layers(true, false, false), errors: ticket },
    Operation { method: "post", path: "/v1/ticket/release", layers: layers(true, false, false), errors: ticket },
    Operation { method: "get", path: "/v1/groups", layers: layers(true, true, false), errors: read },
    Operation { method: "get", path: "/v1/groups/{name}", layers: layers(true, true, false), errors: read_group },
    Operation { method: "put", path: "/v1/groups/{name}", layers: layers(true, false, true), errors: put_group },
    Operation { method: "delete", path: "/v1/groups/{name}", layers: layers(true, false, false), errors: delete_group },
    Operation {
        method: "post",
        path: "/v1/groups/{name}/start",
        layers: layers(true, false, false),
        errors: group_action,
    },
    Operation {
        method: "post",
        path: "/v1/groups/{name}/stop",
        layers: layers(true, false, false),
        errors: group_action,
    },
    Operation {
        method: "post",
        path: "/v1/groups/{name}/clear",
        layers: layers(true, false, false),
        errors: group_action,
    },
    Operation { method: "post", path: "/v1/groups/{name}/move", layers: layers(true, false, true), errors: move_group },
    Operation { method: "get", path: "/v1/volumes", layers: layers(true, true, false), errors: read },
    Operation { method: "get", path: "/v1/volumes/{name}", layers: layers(true, true, false), errors: read_volume },
    Operation { method: "post", path: "/v1/volumes/{name}/verify", layers: layers(true, false, true), errors: verify },
    Operation {
        method: "post",
        path: "/v1/volumes/{name}/resolve",
        layers: layers(true, false, true),
        errors: resolve,
    },
    Operation {
        method: "post",
        path: "/v1/volumes/{name}/replicas/{node}/replace",
        layers: layers(true, false, true),
        errors: replace_replica,
    },
    Operation {
        method: "post",
        path: "/v1/volumes/{name}/promote",
        layers: layers(true, false, true),
        errors: promote,
    },
    // Load-balancer checks: open, answered by this node alone; their 503 is
    // a `ServingView`, documented by the handler.
    Operation { method: "get", path: "/v1/groups/{name}/health", layers: layers(false, true, false), errors: none },
    Operation { method: "get", path: "/v1/volumes/{name}/primary", layers: layers(false, true, false), errors: none },
    Operation { method: "get", path: "/v1/volumes/{name}/replica", layers: layers(false, true, false), errors: none },
];

impl Operation {
    /// Whether it needs a token: every route but those
    /// [`crate::auth::access`] leaves open.
    pub fn secured(&self) -> bool {
        let method = axum::http::Method::from_bytes(self.method.to_uppercase().as_bytes()).unwrap_or_default();
        crate::auth::access(&method, self.path) != crate::auth::Access::Open
    }

    /// Every error this operation can answer with: its layers' and its own.
    pub fn all_errors(&self) -> Vec<ApiError> {
        let mut all = Vec::new();
        if self.layers.forwarded {
            all.extend([
                ApiError::NotMember,
                ApiError::Superseded { node: s(), detail: s() },
                ApiError::NoLeader,
                ApiError::ForwardFailed { url: s(), reason: s() },
                ApiError::BodyTooLarge { limit: 0 },
            ]);
        }
        if self.layers.query {
            all.push(ApiError::InvalidQuery(s()));
        }
        if self.layers.body {
            all.extend([ApiError::MalformedJson(s()), ApiError::InvalidBody(s()), ApiError::BodyTooLarge { limit: 0 }]);
        }
        // The auth middleware checks a token whenever one is sent, open
        // routes included: a malformed, unknown or revoked one is a 401.
        all.extend([ApiError::Unauthenticated(s()), ApiError::TokenRejected(s())]);
        if self.secured() {
            // ... and a route that needs one refuses a role that does not
            // allow it (403).
            all.push(ApiError::Forbidden { who: s(), role: s(), action: s() });
        }
        all.extend((self.errors)());
        all
    }

    /// The error statuses, each with the codes that answer it, sorted.
    pub fn error_statuses(&self) -> Vec<(u16, Vec<&'static str>)> {
        let mut by: std::collections::BTreeMap<u16, Vec<&'static str>> = Default::default();
        for e in self.all_errors() {
            let codes = by.entry(e.status().as_u16()).or_default();
            if !codes.contains(&e.code()) {
                codes.push(e.code());
            }
        }
        by.into_iter().map(|(st, mut c)| (st, std::mem::take(&mut c))).collect()
    }
}

/// Name rule of nodes, groups, resources, sites and attribute keys
/// (`tandem_raft::error::validate_name`).
pub const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9._-]*$";
/// A user or group a command runs as (`validate_group`).
pub const USER_PATTERN: &str = "^[A-Za-z0-9_.-]{1,32}$";
/// A size in bytes as the query `lag` and a volume's `size` accept it: a
/// whole number with an optional unit, small enough to fit in 64 bits.
pub const SIZE_PATTERN: &str = "^([0-9]{1,9}(B|KiB|MiB|GiB|KB|MB|GB)?|[0-9]{1,6}(TiB|TB))$";

fn name_schema() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_NAME_LEN, "pattern": NAME_PATTERN})
}

fn nullable(mut v: Value) -> Value {
    if let Some(t) = v.get("type").and_then(Value::as_str) {
        v["type"] = json!([t, "null"]);
    }
    v
}

/// Fields every resource has besides its kind's.
fn resource(kind: &str, description: &str, required: &[&str], own: Value) -> Value {
    let monitor = json!({
        "type": "object", "additionalProperties": false, "required": ["interval_ms", "timeout_ms"],
        "properties": {
            "interval_ms": {"type": "integer", "minimum": 100, "maximum": u64::MAX},
            "timeout_ms": {"type": "integer", "minimum": 1, "maximum": u64::MAX}
        }
    });
    let deep = json!({
        "type": ["object", "null"], "additionalProperties": false, "required": ["interval_ms", "timeout_ms"],
        "properties": {
            "interval_ms": {"type": "integer", "minimum": 0, "maximum": u64::MAX},
            "timeout_ms": {"type": "integer", "minimum": 0, "maximum": u64::MAX}
        }
    });
    let mut props = json!({
        "name": name_schema(),
        "type": {"type": "string", "enum": [kind]},
        "start_timeout_ms": {"type": "integer", "minimum": 1, "maximum": u64::MAX, "default": 20000},
        "stop_timeout_ms": {"type": "integer", "minimum": 1, "maximum": u64::MAX, "default": 20000},
        "monitor": monitor,
        "deep_monitor": deep,
    });
    for (k, v) in own.as_object().into_iter().flatten() {
        props[k] = v.clone();
    }
    let mut req = vec!["name", "type"];
    req.extend_from_slice(required);
    json!({
        "type": "object", "title": kind, "description": description, "additionalProperties": false,
        "required": req, "properties": props
    })
}

/// The schema of a group definition (`PUT /v1/groups/{name}`): one object
/// per resource type, tagged by `type`, each with the constraints the
/// validation (`tandem_raft::group::validate_group`) applies field by field.
/// Rules between fields or against the cluster's state are in the
/// descriptions (a refusal of those is a 422 or 409 naming the field).
pub fn group_schema() -> Value {
    let user = nullable(json!({"type": "string", "pattern": USER_PATTERN}));
    let process = resource(
        "process",
        "A command supervised by the agent in its own process group.",
        &["command"],
        json!({
            "command": {
                "type": "array", "minItems": 1, "items": {"type": "string"},
                "prefixItems": [{"type": "string", "minLength": 1}],
                "description": "The program and its arguments; the program is not empty."
            },
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "cwd": {"type": ["string", "null"]},
            "user": user.clone(),
            "group": user.clone(),
            "stop_signal": {"type": ["string", "null"], "enum": STOP_SIGNALS.iter().map(|s| json!(s)).chain([Value::Null]).collect::<Vec<_>>()},
        }),
    );
    let exec = resource(
        "exec",
        "A script with start, stop and monitor actions and OCF exit codes.",
        &["path"],
        json!({
            "path": {"type": "string", "pattern": "^/", "description": "Absolute path of the script."},
            "user": user.clone(),
            "group": user.clone(),
        }),
    );
    let ocf = resource(
        "ocf",
        "An unmodified OCF resource agent.",
        &["agent"],
        json!({
            "agent": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$", "description": "provider:type, e.g. heartbeat:Dummy"},
            "params": {"type": "object", "propertyNames": {"pattern": "^[A-Za-z0-9_]+$"}, "additionalProperties": {"type": "string"}},
        }),
    );
    let systemd = resource(
        "systemd",
        "A systemd unit.",
        &["unit"],
        json!({"unit": {"type": "string", "pattern": "^[^/]+$", "description": "A unit name, e.g. nginx.service"}}),
    );
    let ifname = json!({"type": "string", "pattern": "^[!-.0-~]{1,15}$", "description": "An interface name: 1 to 15 printable ASCII characters, no '/'."});
    let vip = resource(
        "vip",
        "A virtual IP on an interface, with backup interfaces on the same node for local recovery.",
        &["address", "interface"],
        json!({
            "address": {"type": "string", "pattern": VIP_PATTERN, "description": "address/prefix, e.g. 10.0.0.100/24 or fd00::10/64"},
            "interface": ifname,
            "backup_interfaces": {"type": "array", "items": ifname},
        }),
    );
    let volume = resource(
        "volume",
        "A replicated block volume exported over NBD where the group runs; at most one per group. Its replicas are the first `replicas` nodes of the group's `nodes`, and `modes` may only name those.",
        &["size"],
        json!({
            "size": {
                "oneOf": [
                    {"type": "integer", "minimum": 4096, "maximum": MAX_VOLUME_BYTES, "multipleOf": 4096},
                    {"type": "string", "pattern": VOLUME_SIZE_PATTERN}
                ],
                "description": "Bytes (a multiple of 4096, at most 16TiB), or a size such as \"1GiB\"; other spellings that come out a multiple of 4KiB (\"4096\", \"1.5GiB\", \"10GB\") are accepted too."
            },
            "mode": {"type": "string", "enum": ["sync", "async"], "default": "sync"},
            "modes": {"type": "object", "propertyNames": name_schema(), "additionalProperties": {"type": "string", "enum": ["sync", "async"]}},
            "replicas": {"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS, "default": 2},
            "split_brain": {"type": "string", "enum": split_brain_names(), "default": "disconnect"},
            "rate": {"oneOf": [
                    {"type": "null"},
                    {"type": "integer", "minimum": 65536, "maximum": u64::MAX},
                    {"type": "string", "pattern": RATE_PATTERN}
                ], "description": "Bandwidth limit, at least 64KiB/s: bytes per second, or e.g. \"100MiB/s\"; null: unlimited."},
            "granularity": {"oneOf": [
                    {"type": "null"},
                    {"type": "integer", "enum": [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]},
                    {"type": "string", "enum": ["4KiB", "8KiB", "16KiB", "32KiB", "64KiB", "128KiB", "256KiB", "512KiB", "1MiB"]}
                ], "description": "Bytes per bit of the out-of-sync bitmap: a power of two from 4KiB to 1MiB (null: 4KiB)."},
            "nbd_tcp": {"type": "boolean", "default": false},
            "async_failover": {"type": "boolean", "default": false},
            "read_balancing": {"type": "string", "enum": read_balancing_names(), "default": "prefer-local",
                "description": "Which replica serves reads on the primary: the local disk, or an in-sync sync peer (striping: 1MiB stripes). May change while the volume runs."},
            "resync": {"type": "object", "additionalProperties": false, "default": {"mode": "adaptive"},
                "description": "How a resync shares the link with the application. May change while the volume runs.",
                "properties": {
                    "mode": {"type": "string", "enum": resync_mode_names(), "default": "adaptive",
                        "description": "adaptive: the resync takes what the application leaves, between min_rate and rate; fixed: a fixed window at up to rate."},
                    "min_rate": {"oneOf": [
                            {"type": "null"},
                            {"type": "integer", "minimum": 65536, "maximum": u64::MAX},
                            {"type": "string", "pattern": RATE_PATTERN}
                        ], "description": "Adaptive only: the rate the resync keeps however busy the application is, at least 64KiB/s and at most rate; null: 4MiB/s (or rate if lower)."}
                }},
        }),
    );
    let filesystem = resource(
        "filesystem",
        "A file system on the group's volume (listed before it), mounted where the group runs. Mountpoints may not overlap another file system's, in this group or another.",
        &["volume", "mountpoint", "fstype"],
        json!({
            "volume": name_schema(),
            "mountpoint": {"type": "string", "pattern": MOUNTPOINT_PATTERN, "maxLength": 1024, "not": {"enum": SYSTEM_DIRS},
                "description": "A plain absolute path, not / nor a system directory (/proc, /sys, /dev, /run, /boot, /etc, /usr, /bin)."},
            "fstype": {"type": "string", "enum": FSTYPES},
            "options": {"type": "string", "pattern": "^([A-Za-z0-9_=.:/+-]+(,[A-Za-z0-9_=.:/+-]+)*)?$", "maxLength": 512, "default": "",
                "description": "Mount options (-o), e.g. noatime; never loop."},
            "mkfs": {"type": "boolean", "default": false},
            "owner": nullable(json!({"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,32}(:[A-Za-z0-9_.-]{1,32})?$"})),
        }),
    );
    let kinds = [process, exec, ocf, systemd, vip, volume, filesystem];
    let mapping: Map<String, Value> = kinds
        .iter()
        .map(|k| {
            let t = k["title"].as_str().unwrap_or_default().to_string();
            (t.clone(), json!(format!("#/components/schemas/Resource_{t}")))
        })
        .collect();
    let mut out = Map::new();
    for k in &kinds {
        out.insert(format!("Resource_{}", k["title"].as_str().unwrap_or_default()), k.clone());
    }
    out.insert(
        "Resource".into(),
        json!({
            "oneOf": kinds.iter().map(|k| json!({"$ref": format!("#/components/schemas/Resource_{}", k["title"].as_str().unwrap_or_default())})).collect::<Vec<_>>(),
            "discriminator": {"propertyName": "type", "mapping": mapping},
            "description": "One resource, typed by `type`; resource names are unique within the group."
        }),
    );
    out.insert(
        "GroupSpec".into(),
        json!({
            "type": "object", "additionalProperties": false, "required": ["resources", "nodes"],
            "description": "A resource group: started in `resources` order, stopped in reverse, on the first eligible node of `nodes`.",
            "properties": {
                "resources": {"type": "array", "minItems": 1, "maxItems": MAX_RESOURCES, "items": {"$ref": "#/components/schemas/Resource"}},
                "nodes": {"type": "array", "minItems": 1, "uniqueItems": true, "items": name_schema(),
                    "description": "Failover domain in priority order; each a member of the cluster (else 422)."},
                "failback": {"oneOf": [
                    {"type": "string", "enum": ["auto", "manual"]},
                    {"type": "object", "additionalProperties": false, "required": ["window"],
                     "properties": {"window": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$",
                        "not": {"pattern": "^(.....)-\\1$"},
                        "description": "HH:MM-HH:MM local time, may wrap past midnight; start and end differ."}}}
                ], "default": "manual"},
                "anti_affinity": {"type": "array", "items": name_schema(), "description": "Other existing groups this one never shares a node with."},
                "colocate_with": nullable(json!({"type": "string", "minLength": 1, "maxLength": MAX_NAME_LEN, "pattern": NAME_PATTERN,
                    "description": "An existing group this one runs with; no cycles, not also in anti_affinity."})),
                "weight": {"type": "integer", "minimum": 1, "maximum": u32::MAX, "default": 1},
                "max_restarts": {"type": "integer", "minimum": 0, "maximum": u32::MAX, "default": 3},
                "restart_window_ms": {"type": "integer", "minimum": 1, "maximum": u64::MAX, "default": 60000},
                "failure_timeout_ms": {"anyOf": [{"type": "integer", "enum": [0]}, {"type": "integer", "minimum": 1000, "maximum": u64::MAX}], "default": 0},
                "ticket": {"type": "boolean", "default": false,
                    "description": "Runs only while this cluster's site holds the ticket between two sites; refused (422) on a cluster without `[ticket]`."}
            }
        }),
    );
    Value::Object(out)
}

/// The definition as a group view shows it (`GroupView.spec`): the request
/// schema with defaults filled in, and sizes kept as written, as strings
/// (`"size": 8192` reads back as `"8192"`). Named `View_*`.
pub fn group_view_schema() -> Value {
    let text = group_schema().to_string().replace("#/components/schemas/", "#/components/schemas/View_");
    let mut v: Value = serde_json::from_str(&text).unwrap_or_default();
    let props = &mut v["Resource_volume"]["properties"];
    props["size"] = json!({"type": "string", "description": "As written: a size such as \"1GiB\", or bytes"});
    props["rate"] = json!({"type": ["string", "null"], "description": "As written; null: unlimited"});
    props["granularity"] = json!({"type": ["string", "null"], "description": "As written; null: 4KiB"});
    props["resync"]["properties"]["min_rate"] =
        json!({"type": ["string", "null"], "description": "As written; null: 4MiB/s (or rate if lower)"});
    let out: Map<String, Value> =
        v.as_object().into_iter().flatten().map(|(k, x)| (format!("View_{k}"), x.clone())).collect();
    Value::Object(out)
}

fn split_brain_names() -> Vec<Value> {
    SplitBrainPolicy::ALL.iter().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)).collect()
}

fn resync_mode_names() -> Vec<Value> {
    ResyncMode::ALL.iter().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)).collect()
}

fn read_balancing_names() -> Vec<Value> {
    ReadBalancing::ALL.iter().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)).collect()
}

/// `address/prefix`: a dotted IPv4 address with a prefix of 0-32, or an
/// IPv6 address (eight groups, or compressed with `::`) with 0-128.
pub const VIP_PATTERN: &str = concat!(
    "^(((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])",
    "|(([0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}|([0-9a-fA-F]{1,4}:){1,7}:|:(:[0-9a-fA-F]{1,4}){1,7}|::)/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))$"
);
/// A volume size as a string: whole MiB, GiB or TiB up to 16TiB.
pub const VOLUME_SIZE_PATTERN: &str =
    "^(([1-9][0-9]{0,6}|1[0-5][0-9]{6}|16[0-6][0-9]{5}|167[0-6][0-9]{4}|1677[0-6][0-9]{3}|16777[01][0-9]{2}|167772[01][0-6])MiB|([1-9][0-9]{0,3}|1[0-5][0-9]{3}|16[0-2][0-9]{2}|163[0-7][0-9]|1638[0-4])GiB|([1-9]|1[0-6])TiB)$";
/// A bandwidth of at least 64KiB/s: whole MiB or GiB, with or without `/s`.
pub const RATE_PATTERN: &str = "^[1-9][0-9]{0,6}(MiB|GiB)(/s)?$";
/// A mountpoint: segments that start with neither `.` nor nothing, no
/// spaces, commas or backslashes (not a system directory: `SYSTEM_DIRS`).
pub const MOUNTPOINT_PATTERN: &str = "^(/[A-Za-z0-9_+@%-][A-Za-z0-9_.+@%-]*)+$";
/// One-segment mountpoints refused as system directories.
pub const SYSTEM_DIRS: [&str; 8] = ["/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/usr", "/bin"];

/// Constraints of the other request bodies, query strings and path
/// parameters, by schema and property: JSON Schema keywords merged into
/// what utoipa generated.
fn request_constraints() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("JoinRequest", "name", name_schema()),
        (
            "JoinRequest",
            "addresses",
            json!({"minItems": 1, "maxItems": MAX_ADDRESSES, "uniqueItems": true,
                "items": {"type": "string", "anyOf": [
                        {"format": "ipv4", "not": {"pattern": "^(0\\.0\\.0\\.0|2(2[4-9]|3[0-9])\\..*)$"}},
                        {"format": "ipv6", "not": {"pattern": "^([fF][fF].*|[0:]*)$"}}],
                    "description": "An IP address, neither unspecified nor multicast."}}),
        ),
        ("JoinRequest", "port", json!({"minimum": 1, "maximum": 65535})),
        ("JoinRequest", "site", nullable(name_schema())),
        ("InitRequest", "cluster_id", nullable(name_schema())),
        (
            "JoinViaRequest",
            "via",
            json!({"pattern": "^http://", "description": "Base URL of any member's API, e.g. http://10.0.0.1:7401"}),
        ),
        ("AttributeValue", "value", json!({"maxLength": MAX_ATTRIBUTE_VALUE_LEN})),
        ("MoveRequest", "to", name_schema()),
        ("RecoverRequest", "confirm", nullable(name_schema())),
        ("SwitchoverRequest", "timeout_s", nullable(json!({"type": "integer", "minimum": 1, "maximum": 25}))),
        ("TokenRequest", "name", name_schema()),
        // Join tokens come from POST /v1/cluster/join-token.
        ("TokenRequest", "role", json!({"type": "string", "enum": ["viewer", "operator", "admin"]})),
        ("TokenRequest", "expires_in_s", json!({"minimum": 1, "maximum": 10 * 365 * 86_400u64})),
        ("CertificateRequest", "name", name_schema()),
        ("CertificateRequest", "role", json!({"type": "string", "enum": ["viewer", "operator", "admin"]})),
        ("CertificateRequest", "days", json!({"minimum": 1, "maximum": 3650})),
        ("JoinTokenRequest", "ttl_s", json!({"minimum": 1, "maximum": 86_400})),
        ("ResolveRequest", "discard", name_schema()),
    ]
}

/// An alert's definition, one object per kind, with the validation's
/// rules (`tandem_raft::alerts::AlertSpec::validate`).
fn alert_schema() -> Value {
    use tandem_raft::alerts::*;
    let text = |description: &str| {
        json!({"type": "string", "minLength": 1, "maxLength": MAX_ALERT_TEXT, "pattern": "^[^\\u0000]+$",
            "description": description})
    };
    let pem = json!({"type": "string", "maxLength": MAX_ALERT_PEM, "pattern": "-----BEGIN CERTIFICATE-----",
        "description": "PEM of the CA that signed the target's certificate (default: the system's trust store)."});
    let mailbox = json!({"type": "string", "maxLength": 254,
        "pattern": "^[^@\\s<>,;\"\\u0000-\\u001f\\u007f-\\u009f]+@[^@\\s<>,;\"\\u0000-\\u001f\\u007f-\\u009f]+$",
        "description": "local@domain"});
    let common = |props: &mut Map<String, Value>| {
        props.insert(
            "min_severity".into(),
            json!({"type": "string", "enum": ["info", "warning", "critical"], "default": "info",
                "description": "Only events at least this severe."}),
        );
        props.insert(
            "kinds".into(),
            json!({"type": "array", "maxItems": MAX_ALERT_KINDS,
                "items": {"type": "string", "maxLength": 128, "pattern": "^[a-z0-9_][a-z0-9_.]*$"},
                "description": "Only these event kinds (exact, or a prefix ending in `.`: `group.`); empty or absent: every kind."}),
        );
    };
    let report = json!({"type": "integer", "minimum": MIN_REPORT_INTERVAL_S, "maximum": MAX_REPORT_INTERVAL_S,
        "description": "Also send a status report of the whole cluster this often (seconds)."});
    let object = |kind: &str, required: &[&str], mut props: Map<String, Value>, description: &str| {
        props.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
        common(&mut props);
        let mut req: Vec<&str> = vec!["kind"];
        req.extend_from_slice(required);
        json!({"type": "object", "title": kind, "description": description, "required": req,
            "additionalProperties": false, "properties": props})
    };
    let mut webhook = Map::new();
    webhook.insert(
        "url".into(),
        json!({"type": "string", "minLength": 8, "maxLength": MAX_ALERT_TEXT,
            "pattern": "^https?://[^/\\s\\u0000-\\u001f\\u007f-\\u009f][^\\s\\u0000-\\u001f\\u007f-\\u009f]*$",
            "description": "Where the JSON POST goes."}),
    );
    webhook.insert(
        "secret".into(),
        text("HMAC-SHA256 key of the X-Tandem-Signature header (write-only: shown as `(set)`)."),
    );
    webhook.insert("cacert".into(), pem.clone());
    webhook.insert("report_interval_s".into(), report.clone());
    let mut smtp = Map::new();
    smtp.insert(
        "server".into(),
        json!({"type": "string", "minLength": 1, "maxLength": 253, "pattern": "^[A-Za-z0-9._:-]+$",
            "description": "Host name or IP address of the mail server."}),
    );
    smtp.insert(
        "port".into(),
        json!({"type": "integer", "minimum": 1, "maximum": 65535,
        "description": "Default 587 with STARTTLS, 25 without."}),
    );
    smtp.insert("starttls".into(), json!({"type": "boolean", "default": true, "description": "Require STARTTLS."}));
    smtp.insert("username".into(), text("SMTP AUTH user; `username` and `password` come together or not at all."));
    smtp.insert(
        "password".into(),
        text("SMTP AUTH password (write-only: shown as `(set)`); with `username` or not at all."),
    );
    smtp.insert("from".into(), mailbox.clone());
    smtp.insert(
        "to".into(),
        json!({"type": "array", "minItems": 1, "maxItems": MAX_ALERT_RECIPIENTS, "items": mailbox}),
    );
    smtp.insert("cacert".into(), pem);
    smtp.insert("report_interval_s".into(), report);
    let mut exec = Map::new();
    exec.insert(
        "command".into(),
        json!({"type": "array", "minItems": 1, "maxItems": MAX_ALERT_ARGS,
            "items": {"type": "string", "maxLength": MAX_ALERT_TEXT, "pattern": "^[^\\u0000]*$"},
            "description": "The alert agent and its arguments; the first is an absolute path (`/…`, checked on definition)."}),
    );
    exec.insert("recipient".into(), text("CRM_alert_recipient."));
    exec.insert("timestamp_format".into(), text("CRM_alert_timestamp's format (default `%H:%M:%S.%06N`, UTC)."));
    exec.insert(
        "timeout_ms".into(),
        json!({"type": "integer", "minimum": MIN_EXEC_TIMEOUT_MS, "maximum": MAX_EXEC_TIMEOUT_MS,
            "description": "Killed after this long (default 30000)."}),
    );
    // Optional fields are `Option`s: JSON null is accepted as absent.
    for props in [&mut webhook, &mut smtp, &mut exec] {
        for key in [
            "secret",
            "cacert",
            "port",
            "username",
            "password",
            "recipient",
            "timestamp_format",
            "timeout_ms",
            "report_interval_s",
        ] {
            if let Some(p) = props.get_mut(key) {
                let t = p["type"].clone();
                p["type"] = json!([t, "null"]);
            }
        }
    }
    json!({"oneOf": [
        object("webhook", &["url"], webhook, "A signed JSON POST per event."),
        object("smtp", &["server", "from", "to"], smtp, "A mail per event."),
        object("exec", &["command"], exec, "A Pacemaker-style alert agent run with the CRM_alert_* environment."),
    ], "description": "An alert: where events go (`kind`) and which (`min_severity`, `kinds`)."})
}

/// The OpenAPI document served at `GET /openapi.json`.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let schemas = &mut doc["components"]["schemas"];
    for part in [group_schema(), group_view_schema()] {
        for (k, v) in part.as_object().into_iter().flatten() {
            schemas[k] = v.clone();
        }
    }
    for (schema, prop, extra) in request_constraints() {
        let target = &mut schemas[schema]["properties"][prop];
        merge(target, extra);
    }
    schemas["GroupView"]["properties"]["spec"] = json!({"$ref": "#/components/schemas/View_GroupSpec"});
    schemas["AlertSpec"] = alert_schema();
    doc["components"]["securitySchemes"] = json!({
        "bearerAuth": {"type": "http", "scheme": "bearer",
            "description": "An API token (`tandem token create`): viewer for reads, operator for actions, admin for definitions and membership."}
    });
    for op in OPERATIONS {
        let Some(o) = doc["paths"][op.path][op.method].as_object_mut() else { continue };
        let responses = o.entry("responses").or_insert_with(|| json!({}));
        if let Some(r) = responses.as_object_mut() {
            // Error statuses come from the table alone (a load balancer's
            // 503 is a ServingView, documented with its handler).
            r.retain(|st, v| st.parse::<u16>().is_ok_and(|s| s < 400) || v.to_string().contains("ServingView"));
            for (status, codes) in op.error_statuses() {
                let description = codes.join(", ");
                r.entry(status.to_string()).or_insert_with(|| {
                    json!({"description": description,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
                });
            }
        }
        if op.secured() {
            o.insert("security".into(), json!([{"bearerAuth": []}]));
        }
        for p in o.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten() {
            // `AuditParams` derives IntoParams without a location: they are
            // query parameters, both optional.
            if op.path == "/v1/audit" || (op.path.starts_with("/v1/events") && p["in"] != json!("header")) {
                p["in"] = json!("query");
                p["required"] = json!(false);
            }
            let (name, place) = (p["name"].as_str().unwrap_or_default(), p["in"].as_str().unwrap_or_default());
            match (place, name) {
                // Names of nodes, groups and volumes, and attribute keys.
                ("path", "name") | ("path", "key") | ("path", "site") => p["schema"] = name_schema(),
                ("query", "lag") => p["schema"] = json!({"type": "string", "pattern": SIZE_PATTERN}),
                // `GET /v1/audit` (`number_param`).
                ("query", "since") => p["schema"] = json!({"type": "integer", "minimum": 0, "maximum": u64::MAX}),
                ("query", "limit") => p["schema"] = json!({"type": "integer", "minimum": 0, "maximum": 10_000}),
                ("query", "severity") => {
                    p["schema"] = json!({"type": "string", "enum": ["info", "warning", "critical"]})
                }
                // Flags: `?stale`, `?stale=true`, `?stale=1` ... (see `flag`).
                ("query", "stale") | ("query", "force") | ("query", "dry_run") => {
                    p["schema"] = json!({"type": "string", "enum": ["true", "false", "1", "0", ""]})
                }
                _ => {}
            }
        }
        // An empty body is `{}` (`ApiJson`): a body whose fields are all
        // optional may be left out.
        if matches!(op.path, "/v1/cluster/init" | "/v1/cluster/join-token") {
            if let Some(b) = o.get_mut("requestBody").and_then(Value::as_object_mut) {
                b.insert("required".into(), json!(false));
            }
        }
        if op.path == "/v1/groups/{name}" && op.method == "put" {
            o.insert(
                "requestBody".into(),
                json!({"required": true, "description": "The group definition (docs/api.md)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GroupSpec"}}}}),
            );
        }
    }
    doc
}

fn merge(target: &mut Value, extra: Value) {
    match (target, extra) {
        (Value::Object(t), Value::Object(e)) => {
            // A full type replaces a reference (an enum narrowed here).
            if e.contains_key("type") {
                t.remove("$ref");
            }
            for (k, v) in e {
                t.insert(k, v);
            }
        }
        (t, e) => *t = e,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_table_and_the_document_list_the_same_operations() {
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let table: BTreeSet<_> = OPERATIONS.iter().map(|o| (o.method.to_string(), o.path.to_string())).collect();
        assert_eq!(documented, table);
    }

    #[test]
    fn every_operation_documents_exactly_its_errors() {
        let doc = document();
        for op in OPERATIONS {
            let responses = doc["paths"][op.path][op.method]["responses"].as_object().unwrap();
            let documented: BTreeSet<u16> =
                responses.keys().filter_map(|s| s.parse().ok()).filter(|s| *s >= 400).collect();
            let mut want: BTreeSet<u16> = op.error_statuses().into_iter().map(|(s, _)| s).collect();
            if op.path.starts_with("/v1/") && op.path.contains("/{name}/") && !op.secured() {
                want.insert(503); // A load balancer's "not serving".
            }
            assert_eq!(documented, want, "{} {}", op.method, op.path);
            // Every error is the one error body.
            for (st, r) in responses {
                if st.parse::<u16>().is_ok_and(|s| s >= 400) && !r.to_string().contains("ServingView") {
                    assert_eq!(r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody");
                }
            }
            // No operation answers 5xx but 503, and 502 when an alert's
            // target (not this API) failed a test.
            let gateway = op.path == "/v1/alerts/{name}/test";
            assert!(
                want.iter().all(|s| *s < 500 || *s == 503 || (*s == 502 && gateway)),
                "{} {}: {want:?}",
                op.method,
                op.path
            );
        }
    }

    #[test]
    fn secured_operations_say_so_and_open_ones_do_not() {
        let doc = document();
        assert_eq!(doc["components"]["securitySchemes"]["bearerAuth"]["scheme"], "bearer");
        let open = [
            "/healthz",
            "/readyz",
            "/openapi.json",
            "/v1/cluster/ca",
            "/v1/groups/{name}/health",
            "/v1/volumes/{name}/primary",
            "/v1/volumes/{name}/replica",
        ];
        for op in OPERATIONS {
            let o = &doc["paths"][op.path][op.method];
            let secured = o["security"] == json!([{"bearerAuth": []}]);
            assert_eq!(secured, !open.contains(&op.path), "{} {}", op.method, op.path);
            assert!(o["responses"].get("401").is_some(), "{} {}", op.method, op.path);
            assert_eq!(o["responses"].get("403").is_some(), secured, "{} {}", op.method, op.path);
        }
    }

    #[test]
    fn constraints_land_on_existing_properties() {
        let doc = document();
        for (schema, prop, _) in request_constraints() {
            assert!(
                doc["components"]["schemas"][schema]["properties"][prop]["type"].is_string()
                    || doc["components"]["schemas"][schema]["properties"][prop]["type"].is_array(),
                "{schema}.{prop}"
            );
        }
        assert_eq!(doc["components"]["schemas"]["JoinRequest"]["properties"]["addresses"]["minItems"], 1);
        assert_eq!(doc["paths"]["/v1/groups/{name}"]["put"]["requestBody"]["required"], true);
        assert_eq!(doc["paths"]["/v1/cluster/join-token"]["post"]["requestBody"]["required"], false);
        let audit = doc["paths"]["/v1/audit"]["get"]["parameters"].as_array().unwrap();
        assert!(audit.iter().any(|p| p["name"] == "limit" && p["schema"]["maximum"] == 10_000), "{audit:?}");
    }

    #[test]
    fn the_group_schema_lists_every_resource_type_and_enum() {
        let g = group_schema();
        let mapping = g["Resource"]["discriminator"]["mapping"].as_object().unwrap();
        let types: BTreeSet<&str> = mapping.keys().map(String::as_str).collect();
        assert_eq!(types, BTreeSet::from(["process", "exec", "ocf", "systemd", "vip", "volume", "filesystem"]));
        let names = split_brain_names();
        assert_eq!(names.len(), SplitBrainPolicy::ALL.len());
        assert!(names.iter().all(Value::is_string));
        let reads = read_balancing_names();
        assert_eq!(reads.len(), ReadBalancing::ALL.len());
        assert!(reads.iter().all(Value::is_string));
        let resync = resync_mode_names();
        assert_eq!(resync.len(), ResyncMode::ALL.len());
        assert!(resync.iter().all(Value::is_string));
        assert_eq!(g["GroupSpec"]["required"], json!(["resources", "nodes"]));
    }

    /// The schema's examples of each resource type pass the real decoder
    /// and validation; and `{}` is schema-invalid (`resources` and `nodes`
    /// are required) as the decoder says.
    #[test]
    fn schema_examples_are_accepted_by_the_validation() {
        use std::collections::BTreeMap;
        let nodes: BTreeSet<String> = ["n1", "n2"].iter().map(|s| s.to_string()).collect();
        let ok = [
            json!({"name": "p", "type": "process", "command": ["sleep", ""], "stop_signal": "SIGINT", "user": "root", "cwd": null}),
            json!({"name": "e", "type": "exec", "path": "/bin/true", "group": "a.b-c_d"}),
            json!({"name": "o", "type": "ocf", "agent": "heartbeat:Dummy", "params": {"state_1": "x"}}),
            json!({"name": "s", "type": "systemd", "unit": "nginx.service"}),
            json!({"name": "v", "type": "vip", "address": "10.0.0.100/32", "interface": "eth0:1", "backup_interfaces": ["~!"]}),
            json!({"name": "v6", "type": "vip", "address": "fd00::10/128", "interface": "eth1"}),
            json!({"name": "d", "type": "volume", "size": "16TiB", "rate": "1MiB/s", "granularity": "1MiB", "split_brain": "discard-least-changes", "read_balancing": "when-congested-remote", "resync": {"mode": "adaptive", "min_rate": "1MiB/s"}}),
            json!({"name": "f", "type": "filesystem", "volume": "d", "mountpoint": "/srv/x.y", "fstype": "xfs", "options": "noatime,data=ordered", "owner": "a:b"}),
        ];
        let spec: tandem_raft::group::GroupSpec =
            serde_json::from_value(json!({"resources": ok, "nodes": ["n1", "n2"], "failure_timeout_ms": 1000}))
                .unwrap();
        tandem_raft::group::validate_group("g", &spec, &nodes, &BTreeMap::new()).unwrap();
        assert!(serde_json::from_value::<tandem_raft::group::GroupSpec>(json!({})).is_err());
        // Sizes as JSON numbers, as the schema allows them too.
        let numbers: tandem_raft::group::GroupSpec = serde_json::from_value(json!({"nodes": ["n1"], "resources": [
            {"name": "d", "type": "volume", "size": 8192, "replicas": 1, "rate": 65536, "granularity": 1048576, "resync": {"min_rate": 65536}}]}))
        .unwrap();
        tandem_raft::group::validate_group("g", &numbers, &nodes, &BTreeMap::new()).unwrap();
        // ... which read back as strings: the view's schema says so.
        let back = serde_json::to_value(&numbers).unwrap();
        assert_eq!(back["resources"][0]["size"], "8192");
        let view = group_view_schema();
        assert_eq!(view["View_Resource_volume"]["properties"]["size"]["type"], "string");
        assert!(!view.to_string().contains("\"#/components/schemas/Resource"));
    }
}
