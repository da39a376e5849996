//! Who may call which route, in one table, and the middleware that enforces
//! it and feeds the audit log.
//!
//! A request's principal is, in order: the bearer token it carries; else the
//! node of its verified client certificate; else the admin socket's local
//! user; else nobody. The route table maps every (method, route) to the
//! access it needs; a test walks every route of the router. A refusal
//! (401/403) never reaches a handler, so it changes nothing.
//!
//! This module must never hold a token's secret beyond hashing it, nor log
//! one: the `Authorization` header is dropped from everything logged.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tandem_raft::access::{AuditEntry, Role};

use crate::listen::PeerInfo;
use crate::{read_body, ApiError, SharedBackend, MAX_BODY_BYTES};

/// Set by a node forwarding a request to the leader: who the request is
/// from and their address. Trusted only from a node certificate.
pub const HEADER_ON_BEHALF: &str = "x-tandem-on-behalf-of";
pub const HEADER_CLIENT_ADDR: &str = "x-tandem-client-addr";

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: liveness, readiness, the OpenAPI document, the CA certificate,
    /// load-balancer checks. They reveal nothing sensitive.
    Open,
    /// Only the local admin socket (root on the node).
    Local,
    /// Reads (viewer and up).
    Read,
    /// Day-to-day operations (operator and up).
    Operate,
    /// Everything else (admin).
    Admin,
    /// Adding a node: admin, or a join token.
    Join,
    /// Node to node: a member's certificate.
    Node,
    /// Open while this agent belongs to no cluster (it has nothing to
    /// protect, and the leader adopting it reads it); `Read` after.
    OpenUntilMember,
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Token {
        name: String,
        role: Role,
    },
    /// A recorded client certificate (a person's or a tool's).
    Certificate {
        name: String,
        role: Role,
    },
    Node {
        name: String,
    },
    Local {
        uid: u32,
    },
    Anonymous,
}

impl Principal {
    /// How the audit log names it.
    pub fn describe(&self) -> String {
        match self {
            Principal::Token { name, .. } => format!("token:{name}"),
            Principal::Certificate { name, .. } => format!("cert:{name}"),
            Principal::Node { name } => format!("node:{name}"),
            Principal::Local { uid } => format!("local:uid={uid}"),
            Principal::Anonymous => "anonymous".into(),
        }
    }

    pub fn role_name(&self) -> &'static str {
        match self {
            Principal::Token { role, .. } | Principal::Certificate { role, .. } => role.as_str(),
            Principal::Node { .. } => "node",
            Principal::Local { .. } => "local",
            Principal::Anonymous => "none",
        }
    }

    /// Whether this principal may use a route needing `need`. Root on the
    /// node (the admin socket) may do everything; a node certificate may do
    /// everything but the local-only routes (a node holds the Raft log: it
    /// is as trusted as an admin).
    pub fn allows(&self, need: Access) -> bool {
        match (self, need) {
            (_, Access::Open) => true,
            (Principal::Local { uid }, _) => *uid == 0 || Some(*uid) == own_uid(),
            (Principal::Node { .. }, Access::Local) => false,
            (_, Access::OpenUntilMember) => false,
            (Principal::Node { .. }, _) => true,
            (Principal::Token { role, .. } | Principal::Certificate { role, .. }, need) => match need {
                Access::Read => matches!(role, Role::Viewer | Role::Operator | Role::Admin),
                Access::Operate => matches!(role, Role::Operator | Role::Admin),
                Access::Admin => *role == Role::Admin,
                Access::Join => matches!(role, Role::Admin | Role::Join),
                Access::Open | Access::Local | Access::Node | Access::OpenUntilMember => false,
            },
            (Principal::Anonymous, _) => false,
        }
    }
}

/// The access each route needs. `route` is axum's matched path.
pub fn access(method: &Method, route: &str) -> Access {
    use Access::*;
    let m = method.as_str();
    match (m, route) {
        (_, "/healthz" | "/readyz" | "/openapi.json" | "/v1/cluster/ca") => Open,
        // The dashboard's static files hold no data: each of its calls
        // carries the user's token.
        ("GET" | "HEAD", "/ui" | "/ui/" | "/ui/{asset}") => Open,
        // Prometheus scrapes with a viewer token (`authorization` in its
        // scrape_config): the series name groups, nodes and addresses.
        ("GET" | "HEAD", "/metrics") => Read,
        // Load balancers ask every node; the answer says only whether it serves.
        (_, "/v1/groups/{name}/health" | "/v1/volumes/{name}/primary" | "/v1/volumes/{name}/replica") => Open,
        // The joining agent checks the adoption itself against the CA it pinned.
        ("POST", "/internal/adopt") => Open,
        // From another cluster's leader or the arbitrator: the shared key's
        // seal on the body is checked by the handler.
        ("POST", "/internal/ticket") => Open,
        ("GET" | "HEAD", "/v1/local") => OpenUntilMember,
        (_, "/v1/cluster/init" | "/v1/cluster/join") => Local,
        (_, r) if r.starts_with("/internal/") => Node,
        ("GET", "/v1/tokens" | "/v1/audit" | "/v1/certificates") => Admin,
        // Events say what changed, never a secret: every reader may follow them.
        ("GET" | "HEAD", "/v1/events" | "/v1/events/stream") => Read,
        ("GET" | "HEAD", _) => Read,
        ("POST", "/v1/nodes") => Join,
        (
            "POST",
            "/v1/nodes/{name}/standby"
            | "/v1/nodes/{name}/online"
            | "/v1/nodes/{name}/maintenance"
            | "/v1/sites/{site}/standby"
            | "/v1/sites/{site}/online"
            | "/v1/sites/{site}/switchover"
            | "/v1/groups/{name}/start"
            | "/v1/groups/{name}/stop"
            | "/v1/groups/{name}/clear"
            | "/v1/groups/{name}/move"
            | "/v1/volumes/{name}/verify",
        ) => Operate,
        _ => Admin,
    }
}

/// The user this agent runs as (the owner of `/proc/self`): the admin
/// socket is that user's (mode 0600), so that user is root for this agent.
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// What the request asked, in words (for 403 messages).
fn action(method: &Method, route: &str) -> String {
    format!("{method} {route}")
}

fn bearer(req: &Request) -> Result<Option<&str>, ApiError> {
    let Some(v) = req.headers().get(header::AUTHORIZATION) else { return Ok(None) };
    let v = v.to_str().map_err(|_| ApiError::Unauthenticated("the Authorization header is not text".into()))?;
    let (scheme, token) = v
        .split_once(' ')
        .ok_or_else(|| ApiError::Unauthenticated("the Authorization header is not `Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthenticated(format!("the {scheme:?} scheme is not supported; use Bearer")));
    }
    Ok(Some(token.trim()))
}

/// Finds the request's principal. Errors are 401s.
fn principal(b: &SharedBackend, peer: &PeerInfo, req: &Request, need: Access) -> Result<Principal, ApiError> {
    if let Some(token) = bearer(req)? {
        let (name, role) = b.authenticate(token)?;
        return Ok(Principal::Token { name, role });
    }
    if let Some(node) = &peer.node {
        // Operator's CA: a connection made before this agent had the log
        // was vouched for by the CA alone (id 0); the key pin decides now.
        let node = if node.id == crate::listen::PROVISIONAL_NODE {
            peer.cert_spki.as_deref().and_then(|s| b.member_by_key(s, &node.name)).ok_or_else(|| {
                ApiError::CertificateRejected(format!("the certificate of {} names no current member", node.name))
            })?
        } else {
            node.clone()
        };
        if !b.is_member_node(node.id, &node.name) {
            return Err(ApiError::CertificateRejected(format!(
                "the certificate of node {} (id {}) belongs to no current member",
                node.name, node.id
            )));
        }
        return Ok(Principal::Node { name: node.name });
    }
    if let Some(spki) = &peer.cert_spki {
        let (name, role) = b.authenticate_cert(spki)?;
        return Ok(Principal::Certificate { name, role });
    }
    if let Some(uid) = peer.local_uid {
        return Ok(Principal::Local { uid });
    }
    if peer.plaintext && need == Access::Node {
        // TLS switched off (benchmarks only): no certificate can say who
        // is a node; the public routes still need tokens.
        return Ok(Principal::Node { name: "plaintext-peer".into() });
    }
    Ok(Principal::Anonymous)
}

/// A refusal as the caller sees it. A node a recovery of its cluster
/// superseded has no tokens to check any more: whatever was refused, it
/// says why and what to do (looked at on refusals only, off the hot path).
fn refusal(b: &SharedBackend, e: ApiError) -> ApiError {
    if b.route() == crate::Route::NotMember {
        if let s @ ApiError::Superseded { .. } = b.not_member() {
            return s;
        }
    }
    e
}

fn is_mutating(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Marks a response that came back from the leader: the leader audited it.
#[derive(Clone, Copy)]
pub struct Forwarded;

/// Authenticates, authorizes and audits every routed request, and counts
/// it by route template and status for `GET /metrics`.
pub async fn authorize(State(b): State<SharedBackend>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let method = req.method().clone();
    let resp = authorize_and_run(b.clone(), req, next).await;
    b.count_request(method.as_str(), &route, resp.status().as_u16());
    resp
}

async fn authorize_and_run(b: SharedBackend, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<PeerInfo>>().map(|c| c.0.clone()).unwrap_or_default();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let need = match access(&method, &route) {
        Access::OpenUntilMember if b.route() == crate::Route::NotMember => Access::Open,
        Access::OpenUntilMember => Access::Read,
        other => other,
    };
    // A node relaying a client's request says who the client is.
    let (on_behalf, client_addr) = if peer.node.is_some() {
        let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        (h(HEADER_ON_BEHALF), h(HEADER_CLIENT_ADDR))
    } else {
        (None, None)
    };
    let from =
        client_addr.or_else(|| peer.addr.map(|a: SocketAddr| a.ip().to_string())).unwrap_or_else(|| "local".into());
    // A token or certificate made a moment ago through the leader may not
    // be applied here yet: once caught up with the leader, asked again.
    let mut found = principal(&b, &peer, &req, need);
    if matches!(found, Err(ApiError::TokenRejected(_) | ApiError::CertificateRejected(_))) && b.catch_up().await {
        found = principal(&b, &peer, &req, need);
    }
    let who = match found {
        Ok(p) => p,
        Err(e) => {
            let e = refusal(&b, e);
            let resp = e.clone().into_response();
            audit(&b, "anonymous".into(), &from, &method, &path, "", &resp, Some(e.code()));
            return resp;
        }
    };
    let described = on_behalf.clone().unwrap_or_else(|| who.describe());
    if !who.allows(need) {
        let e = refusal(
            &b,
            match (&who, need) {
                (Principal::Anonymous, _) => {
                    ApiError::Unauthenticated(format!("{} needs a token", action(&method, &route)))
                }
                (_, Access::Local) => ApiError::LocalOnly(action(&method, &route)),
                _ => ApiError::Forbidden {
                    who: described.clone(),
                    role: who.role_name().into(),
                    action: action(&method, &route),
                },
            },
        );
        let resp = e.clone().into_response();
        audit(&b, described, &from, &method, &path, "", &resp, Some(e.code()));
        return resp;
    }
    // Node-to-node traffic (reports, claims, Raft) is not audited: it runs
    // many times a second and no person asked for it.
    let audited = is_mutating(&method)
        && (!matches!(who, Principal::Node { .. }) || on_behalf.is_some())
        && !route.starts_with("/internal/");
    if !audited {
        return next.run(with_principal(req, &described, who.role_name(), &from)).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let resp = e.clone().into_response();
            audit(&b, described, &from, &method, &path, "", &resp, Some(e.code()));
            return resp;
        }
    };
    let digest = if bytes.is_empty() { String::new() } else { hex(&Sha256::digest(&bytes)) };
    let req = with_principal(Request::from_parts(parts, Body::from(bytes)), &described, who.role_name(), &from);
    // The state machine's events of this change name who asked (see `asked_by`).
    let resp = ASKED_BY.scope(described.clone(), next.run(req)).await;
    if resp.extensions().get::<Forwarded>().is_none() {
        let code = resp.headers().get("x-tandem-error-code").and_then(|v| v.to_str().ok()).map(str::to_string);
        audit_owned(&b, described, &from, &method, &path, &digest, resp.status().as_u16(), code);
    }
    resp
}

tokio::task_local! {
    /// Who asked for the change being handled (an audited request).
    static ASKED_BY: String;
}

/// Who asked for the change this task handles, when a client did: the
/// proposer stamps it on the command, so the event of the change names it.
pub fn asked_by() -> Option<String> {
    ASKED_BY.try_with(|w| w.clone()).ok()
}

/// Tells the handler (and a forwarder) who asked.
fn with_principal(mut req: Request, who: &str, role: &str, from: &str) -> Request {
    req.extensions_mut().insert(Asker { who: who.to_string(), role: role.to_string(), from: from.to_string() });
    req
}

/// Who asked, for handlers that record it (token creation) and for forwarding.
#[derive(Debug, Clone)]
pub struct Asker {
    pub who: String,
    /// The principal's role (`viewer`, `operator`, `admin`, `node`, `local`).
    pub role: String,
    pub from: String,
}

impl Asker {
    pub fn headers(&self) -> [(&'static str, HeaderValue); 2] {
        let v = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("?"));
        [(HEADER_ON_BEHALF, v(&self.who)), (HEADER_CLIENT_ADDR, v(&self.from))]
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[allow(clippy::too_many_arguments)]
fn audit(
    b: &SharedBackend,
    who: String,
    from: &str,
    method: &Method,
    path: &str,
    digest: &str,
    resp: &Response,
    code: Option<&str>,
) {
    audit_owned(b, who, from, method, path, digest, resp.status().as_u16(), code.map(str::to_string));
}

#[allow(clippy::too_many_arguments)]
fn audit_owned(
    b: &SharedBackend,
    who: String,
    from: &str,
    method: &Method,
    path: &str,
    digest: &str,
    status: u16,
    code: Option<String>,
) {
    b.record_audit(AuditEntry {
        id: 0,
        time_ms: 0,
        node: b.name(),
        who,
        from: from.to_string(),
        method: method.to_string(),
        path: path.to_string(),
        body_sha256: digest.to_string(),
        status,
        code,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(role: Role) -> Principal {
        Principal::Token { name: "t".into(), role }
    }

    #[test]
    fn each_role_gets_exactly_its_access() {
        use Access::*;
        let all = [Open, Local, Read, Operate, Admin, Join, Node];
        let table: [(Principal, &[Access]); 10] = [
            (Principal::Anonymous, &[Open]),
            (tok(Role::Viewer), &[Open, Read]),
            (tok(Role::Operator), &[Open, Read, Operate]),
            (tok(Role::Admin), &[Open, Read, Operate, Admin, Join]),
            (tok(Role::Join), &[Open, Join]),
            (Principal::Certificate { name: "c".into(), role: Role::Viewer }, &[Open, Read]),
            (Principal::Certificate { name: "c".into(), role: Role::Operator }, &[Open, Read, Operate]),
            (Principal::Certificate { name: "c".into(), role: Role::Admin }, &[Open, Read, Operate, Admin, Join]),
            (Principal::Node { name: "n".into() }, &[Open, Read, Operate, Admin, Join, Node]),
            (Principal::Local { uid: 0 }, &all),
        ];
        for (p, allowed) in table {
            for a in all {
                assert_eq!(p.allows(a), allowed.contains(&a), "{p:?} {a:?}");
            }
        }
        let other = if own_uid() == Some(4242) { 4243 } else { 4242 };
        assert!(!Principal::Local { uid: other }.allows(Admin), "only root or the agent's user on the admin socket");
    }

    #[test]
    fn the_route_table_puts_each_route_where_an_operator_expects() {
        let g = Method::GET;
        let p = Method::POST;
        assert_eq!(access(&g, "/healthz"), Access::Open);
        assert_eq!(access(&g, "/ui/"), Access::Open);
        assert_eq!(access(&g, "/ui/{asset}"), Access::Open);
        assert_eq!(access(&p, "/ui/{asset}"), Access::Admin);
        assert_eq!(access(&g, "/v1/session"), Access::Read);
        assert_eq!(access(&g, "/v1/groups/{name}/health"), Access::Open);
        assert_eq!(access(&g, "/v1/groups"), Access::Read);
        assert_eq!(access(&g, "/metrics"), Access::Read);
        assert_eq!(access(&Method::HEAD, "/metrics"), Access::Read);
        assert_eq!(access(&g, "/v1/tokens"), Access::Admin);
        assert_eq!(access(&g, "/v1/audit"), Access::Admin);
        assert_eq!(access(&g, "/v1/certificates"), Access::Admin);
        assert_eq!(access(&p, "/v1/certificates"), Access::Admin);
        assert_eq!(access(&Method::DELETE, "/v1/certificates/{name}"), Access::Admin);
        assert_eq!(access(&p, "/internal/node-certificate"), Access::Node);
        assert_eq!(access(&g, "/v1/events"), Access::Read);
        assert_eq!(access(&g, "/v1/events/stream"), Access::Read);
        assert_eq!(access(&p, "/internal/events"), Access::Node);
        assert_eq!(access(&p, "/v1/groups/{name}/move"), Access::Operate);
        assert_eq!(access(&Method::PUT, "/v1/groups/{name}"), Access::Admin);
        assert_eq!(access(&Method::DELETE, "/v1/nodes/{name}"), Access::Admin);
        assert_eq!(access(&p, "/v1/nodes"), Access::Join);
        assert_eq!(access(&p, "/v1/cluster/init"), Access::Local);
        assert_eq!(access(&p, "/internal/raft/append"), Access::Node);
        assert_eq!(access(&p, "/v1/volumes/{name}/resolve"), Access::Admin);
    }
}
