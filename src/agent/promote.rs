//! Forced promotion in the agent: the primary's out-of-sync records (so
//! what a promotion gives up is known once the primary is gone), and the
//! `POST /v1/volumes/{name}/promote` route: gather liveness and each
//! replica's own report, let `crate::promotion` judge, propose
//! `PromoteReplica`. It never changes a replica's data: the scheduler then
//! starts the group on the promoted replica like on any `UpToDate` one.

use super::*;
use crate::promotion::{self, ReplicaFacts};
use tandem_http_api::{NodeState, OutOfSyncReport, PromoteReport, PromoteRequest};

/// At most one out-of-sync record per volume this often: every applied
/// write costs the whole state's persistence (a record a second filled a
/// small data disk under tandem-chaos).
const OUT_OF_SYNC_EVERY: Duration = Duration::from_secs(5);

impl Agent {
    /// For the volumes this node is primary of: records, through Raft, the
    /// out-of-sync bytes of each replica recorded `Outdated` when they grew
    /// past the record, or fell to zero (at most once every 5 s per volume,
    /// in the background: a slow leader never holds up the volume round).
    /// A resync only lowers them: the record stays the higher figure until
    /// the replica is `UpToDate` (which clears it) — what a forced
    /// promotion would give up is never under-counted.
    pub(super) fn record_out_of_sync_round(
        self: &Arc<Self>,
        state: &ClusterState,
        names: &[String],
        statuses: &[crate::volume::status::VolumeStatus],
    ) {
        let mut sent = self.out_of_sync_sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.retain(|n, _| names.contains(n));
        for status in statuses {
            let name = &status.name;
            let Some((g, _)) = state.volume_owner(name) else { continue };
            let here = g.placement.node.and_then(|id| state.nodes.get(&id)).is_some_and(|n| n.name == self.cfg.name);
            if g.placement.phase != Phase::Started || !here {
                continue;
            }
            if sent.get(name).is_some_and(|t| t.elapsed() < OUT_OF_SYNC_EVERY) {
                continue;
            }
            let recorded = g.replica_out_of_sync.get(name);
            let bytes: BTreeMap<String, u64> = status
                .replicas
                .iter()
                .filter(|r| r.node != self.cfg.name)
                .filter(|r| {
                    g.disk(name, &r.node) == Some(tandem_raft::volume::DiskState::Outdated)
                        || recorded.is_some_and(|m| m.contains_key(&r.node))
                })
                .filter(|r| {
                    let had = recorded.and_then(|m| m.get(&r.node)).map(|o| o.bytes).unwrap_or(0);
                    r.out_of_sync_bytes > had || (r.out_of_sync_bytes == 0 && had > 0)
                })
                .map(|r| (r.node.clone(), r.out_of_sync_bytes))
                .collect();
            if bytes.is_empty() {
                continue;
            }
            sent.insert(name.clone(), Instant::now());
            let report = OutOfSyncReport { epoch: g.placement.epoch, bytes, at_ms: crate::security::now_ms() };
            let (agent, volume) = (self.clone(), name.clone());
            tokio::spawn(async move {
                let path = format!("/internal/volumes/{volume}/out-of-sync");
                let here = agent.propose_out_of_sync(&volume, report.clone());
                if let Err(e) = agent.on_leader(&path, &report, here).await {
                    tracing::debug!(volume = %volume, error = %e, "out-of-sync bytes not recorded (retried next round)");
                    // Not recorded: let the next round try again at once.
                    agent.out_of_sync_sent.lock().unwrap_or_else(|p| p.into_inner()).remove(&volume);
                }
            });
        }
    }

    /// On the leader: `RecordOutOfSync`.
    pub(super) async fn propose_out_of_sync(&self, volume: &str, r: OutOfSyncReport) -> Result<(), ApiError> {
        let m = self.require_member()?;
        let cmd = Command::RecordOutOfSync { volume: volume.into(), epoch: r.epoch, bytes: r.bytes, at_ms: r.at_ms };
        self.propose(&m, cmd).await.map(|_| ())
    }

    /// `POST /v1/volumes/{name}/promote`: the report of every candidate;
    /// confirmed, the promotion of `req.node`'s replica.
    pub(super) async fn do_promote_volume(
        &self,
        name: &str,
        dry_run: bool,
        req: PromoteRequest,
    ) -> Result<PromoteReport, ApiError> {
        if !dry_run {
            if req.confirm.as_deref() != Some(name) {
                return Err(ApiError::Invalid {
                    field: "confirm".into(),
                    reason: format!(
                        "must be the volume's name ({name:?}) to promote by force; see what it gives up first with ?dry_run=true"
                    ),
                });
            }
            if req.node.is_none() {
                return Err(ApiError::Invalid {
                    field: "node".into(),
                    reason: "the node whose replica to promote".into(),
                });
            }
        }
        let m = self.read_member(false).await?;
        let (state, _, views) = self.views(&m);
        let (g, _) = state.volume_owner(name).ok_or_else(|| ApiError::VolumeNotFound(name.to_string()))?;
        let replicas = tandem_raft::group::replica_nodes(&g.spec);
        if let Some(node) = &req.node {
            if !replicas.contains(node) {
                return Err(ApiError::NoSuchReplica(format!(
                    "volume {name} has no replica on node {node} (its replicas: {})",
                    replicas.join(", ")
                )));
            }
        }
        let online: BTreeSet<String> =
            views.iter().filter(|v| v.state != NodeState::Offline).map(|v| v.name.clone()).collect();
        let facts = self.replica_facts(&state, name, &replicas, &online).await;
        let mut report = promotion::report(&state, name, &online, &facts, crate::security::now_ms())
            .ok_or_else(|| ApiError::VolumeNotFound(name.to_string()))?;
        report.node = req.node.clone();
        let Some(node) = req.node.filter(|_| !dry_run) else { return Ok(report) };
        let candidate = report
            .candidates
            .iter()
            .find(|c| c.node == node)
            .ok_or_else(|| ApiError::NoSuchReplica(format!("volume {name} has no replica on node {node}")))?;
        if let Some(why) = &candidate.refused {
            return Err(ApiError::PromotionRefused(format!("volume {name}: {node}: {why}")));
        }
        let cmd = Command::PromoteReplica { volume: name.into(), node: node.clone(), rpo: promotion::rpo(candidate) };
        self.propose(&m, cmd).await?;
        tracing::warn!(volume = %name, node = %node, out_of_sync_bytes = candidate.out_of_sync_bytes, "volume promoted by force");
        report.dry_run = false;
        Ok(report)
    }

    /// What each online replica's node says of its copy, asked at once.
    async fn replica_facts(
        &self,
        state: &ClusterState,
        volume: &str,
        replicas: &[String],
        online: &BTreeSet<String>,
    ) -> BTreeMap<String, Result<ReplicaFacts, String>> {
        let facts = |s: tandem_http_api::LocalVolumeStatus| ReplicaFacts {
            generation: s.generation,
            newest_write_ms: s.newest_write_ms,
        };
        let mut out = BTreeMap::new();
        let mut asks = tokio::task::JoinSet::new();
        for node in replicas.iter().filter(|n| online.contains(*n)) {
            if *node == self.cfg.name {
                let local = self.volumes.status(volume).map(Into::into).map_err(|e| e.to_string());
                out.insert(node.clone(), local.map(facts));
                continue;
            }
            let url = state.node_by_name(node).and_then(|n| n.urls().into_iter().next());
            let Some(url) = url else {
                out.insert(node.clone(), Err(format!("{node} has no address")));
                continue;
            };
            let (http, node, url) = (self.http.clone(), node.clone(), format!("{url}/internal/volumes/{volume}/local"));
            asks.spawn(async move {
                let r = super::volumes::fetch_local_volume(&http, &node, &url).await;
                (node, r)
            });
        }
        while let Some(done) = asks.join_next().await {
            if let Ok((node, r)) = done {
                out.insert(node, r.map(facts));
            }
        }
        out
    }
}
