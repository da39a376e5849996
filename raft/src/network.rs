//! Node-to-node Raft transport: JSON over HTTP/1.1 to the peer's API port.
//!
//! Each RPC is a `POST` to `/internal/raft/{append,vote,snapshot}` on the
//! peer's first reachable URL (one per network path). The request names the
//! node id it is meant for and the cluster it belongs to, so a process that
//! took over an old address can never accept another node's traffic. The
//! server side lives in the http-api crate; this module owns the wire format.
//! It must never retry on its own: openraft decides when to resend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{NodeId, Peer, TypeConfig};

pub const PATH_APPEND: &str = "/internal/raft/append";
pub const PATH_VOTE: &str = "/internal/raft/vote";
pub const PATH_SNAPSHOT: &str = "/internal/raft/snapshot";
/// Header naming the node id a Raft RPC is addressed to.
pub const HEADER_TARGET: &str = "x-tandem-target";
/// Header naming the cluster a Raft RPC belongs to.
pub const HEADER_CLUSTER: &str = "x-tandem-cluster";

/// Creates one client per peer; all share one connection pool.
/// Told when a peer answers that this node was superseded by a recovery of
/// its cluster (409 `TND-1210`): the agent then stops taking part.
pub type SupersededHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The error code of a superseded member's refused call.
pub const SUPERSEDED_CODE: &str = "TND-1210";

#[derive(Clone)]
pub struct Network {
    http: reqwest::Client,
    cluster_id: String,
    superseded: Option<SupersededHook>,
}

impl Network {
    /// `builder` carries the TLS setup (mutual TLS with the cluster CA).
    pub fn new(
        cluster_id: String,
        builder: reqwest::ClientBuilder,
        connect_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = builder
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        Ok(Network { http, cluster_id, superseded: None })
    }

    pub fn on_superseded(mut self, hook: SupersededHook) -> Self {
        self.superseded = Some(hook);
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Peer) -> PeerClient {
        PeerClient {
            http: self.http.clone(),
            cluster_id: self.cluster_id.clone(),
            target,
            urls: node.urls.clone(),
            preferred: Arc::new(AtomicUsize::new(0)),
            superseded: self.superseded.clone(),
        }
    }
}

/// Talks to one peer, failing over between its network paths.
pub struct PeerClient {
    http: reqwest::Client,
    cluster_id: String,
    target: NodeId,
    urls: Vec<String>,
    /// Index of the path that last worked: tried first next time.
    preferred: Arc<AtomicUsize>,
    superseded: Option<SupersededHook>,
}

/// Why one RPC attempt failed.
enum Failure {
    /// No path could connect: openraft backs off.
    Unreachable(String),
    /// Connected but the exchange failed (timeout, bad status, bad body).
    Network(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, Peer, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(format!("encode: {e}")))))?;
        let n = self.urls.len().max(1);
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = Failure::Unreachable(format!("node {} has no address", self.target));
        for k in 0..self.urls.len() {
            let i = (first + k) % n;
            match self.attempt::<Resp, E>(&self.urls[i], path, body.clone(), ttl).await {
                Ok(r) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)));
                }
                Err(f @ Failure::Unreachable(_)) => last = f,
                // The peer was reached on this path: trying another one
                // would only send the same request twice.
                Err(f @ Failure::Network(_)) => {
                    last = f;
                    break;
                }
            }
        }
        Err(match last {
            Failure::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&TransportError(m))),
            Failure::Network(m) => RPCError::Network(NetworkError::new(&TransportError(m))),
        })
    }

    async fn attempt<Resp, E>(
        &self,
        base: &str,
        path: &str,
        body: Vec<u8>,
        ttl: Duration,
    ) -> Result<Result<Resp, RaftError<NodeId, E>>, Failure>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let resp = self
            .http
            .post(format!("{base}{path}"))
            .header(HEADER_TARGET, self.target.to_string())
            .header(HEADER_CLUSTER, &self.cluster_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(ttl)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    Failure::Unreachable(format!("{base}: {e}"))
                } else {
                    Failure::Network(format!("{base}: {e}"))
                }
            })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| Failure::Network(format!("{base}: {e}")))?;
        if !status.is_success() {
            // Not a Raft answer: the process there is not (yet) the node we
            // want, e.g. not initialized or another node's id. Back off.
            let text = String::from_utf8_lossy(&bytes);
            if status == reqwest::StatusCode::CONFLICT && text.contains(SUPERSEDED_CODE) {
                if let Some(hook) = &self.superseded {
                    hook(&text);
                }
            }
            return Err(Failure::Unreachable(format!("{base}: HTTP {status}: {text}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| Failure::Network(format!("{base}: bad reply: {e}")))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Peer, RaftError<NodeId>>> {
        self.call(PATH_APPEND, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Peer, RaftError<NodeId, InstallSnapshotError>>> {
        self.call(PATH_SNAPSHOT, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Peer, RaftError<NodeId>>> {
        self.call(PATH_VOTE, &rpc, option.hard_ttl()).await
    }
}
