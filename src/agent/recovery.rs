//! Quorum-loss recovery on a surviving voter (`POST /v1/cluster/recover`)
//! and the other side of it: a member the recovery superseded stops taking
//! part as soon as a peer tells it so. The plan (where groups would run) is
//! `crate::recovery`; the log rewrite is `Db::force_single_voter`.

use super::*;
use tandem_http_api::{RecoverReport, RecoverRequest};

/// How often the agent looks whether a peer said it was superseded (the
/// network's hook already killed everything; this stops Raft).
pub(super) const SUPERSEDED_CHECK: Duration = Duration::from_millis(50);
/// How long a voter's probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the recovered node may take to elect itself.
const RECOVERED_LEADER_WAIT: Duration = Duration::from_secs(10);
/// How often the leader tells superseded members that they are.
pub(super) const SUPERSEDED_TELL: Duration = Duration::from_secs(2);

/// Told it was superseded (a refused Raft call, or the recovered leader's
/// word): at once, before the agent's next round, nothing here may run
/// beside what the recovered cluster runs — with another superseded voter
/// this node may still hear a majority. `superseded_round` then stops Raft.
pub(super) fn stand_down(guard: &LeaseGuard, notice: &std::sync::Mutex<Option<String>>, why: String) {
    guard.set_deadline_ms(0);
    guard.kill_everything();
    *notice.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
}

impl Agent {
    /// Whether `id` answers at one of its addresses as itself, a member of
    /// this cluster.
    async fn answers(&self, cluster_id: &str, r: &NodeRecord) -> bool {
        for url in r.urls() {
            let got = self.http.get(format!("{url}/v1/local")).timeout(PROBE_TIMEOUT).send().await;
            if let Ok(resp) = got {
                if let Ok(v) = resp.json::<LocalView>().await {
                    return v.node_id == Some(r.id) && v.cluster_id.as_deref() == Some(cluster_id);
                }
            }
        }
        false
    }

    pub(super) async fn do_recover(&self, dry_run: bool, req: RecoverRequest) -> Result<RecoverReport, ApiError> {
        let _g = self.membership_lock.lock().await;
        let m = self.require_member()?;
        let metrics = m.metrics();
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if !voters.contains(&m.node_id) {
            return Err(ApiError::QuorumReachable(format!(
                "{} is not a voter: recover on a surviving voter (one that holds the newest log)",
                self.cfg.name
            )));
        }
        if matches!(self.route(), Route::Here | Route::Leader(_)) {
            return Err(ApiError::QuorumReachable("this node hears a leader: the cluster has its quorum".into()));
        }
        let state = m.state.state();
        let cluster_id = m.cluster_id.clone();
        let name = |id: &NodeId| state.nodes.get(id).map_or_else(|| id.to_string(), |n| n.name.clone());
        let mut reachable = Vec::new();
        for id in voters.iter().filter(|v| **v != m.node_id) {
            if let Some(r) = state.nodes.get(id) {
                if self.answers(&cluster_id, r).await {
                    reachable.push(*id);
                }
            }
        }
        let majority = voters.len() / 2 + 1;
        if 1 + reachable.len() >= majority {
            return Err(ApiError::QuorumReachable(format!(
                "{} of the {} voters answer ({} and {}): a majority, which elects a leader by itself; recovering \
                 now would make two clusters",
                1 + reachable.len(),
                voters.len(),
                self.cfg.name,
                reachable.iter().map(name).collect::<Vec<_>>().join(", ")
            )));
        }
        let held = self.db.log_held().map_err(storage_err)?;
        let (groups, stranded) = crate::recovery::plan(&state, m.node_id, local_minute_of_day());
        // Every other member, learners too: one may have applied an entry
        // committed without this node, which the new incarnation lacks and
        // Raft could never take back from it. Each rejoins afresh.
        let dropped: Vec<NodeId> =
            metrics.membership_config.membership().nodes().map(|(id, _)| *id).filter(|id| *id != m.node_id).collect();
        let mut warnings = Vec::new();
        if self.tls.enabled && !self.tls.external && !matches!(self.tls_files.ca_key(), Ok(Some(_))) {
            warnings.push(format!(
                "{} does not hold the cluster CA's key (voters fetch it within 10 s of getting their vote): \
                 after the recovery no node can join and no certificate can be renewed",
                self.cfg.name
            ));
        }
        let mut report = RecoverReport {
            cluster_id: cluster_id.clone(),
            node: self.cfg.name.clone(),
            dry_run,
            incarnation: state.incarnation + 1,
            log_index: held.last_index,
            log_term: held.last_term,
            committed_index: held.committed_index,
            entries_committed_by_recovery: held.last_index.saturating_sub(held.committed_index),
            voters: voters.iter().map(name).collect(),
            reachable: reachable.iter().map(name).collect(),
            dropped: dropped.iter().map(name).collect(),
            groups,
            volumes_without_up_to_date_replica: stranded,
            warnings,
        };
        if dry_run {
            return Ok(report);
        }
        if req.confirm.as_deref() != Some(cluster_id.as_str()) {
            return Err(ApiError::Invalid {
                field: "confirm".into(),
                reason: format!(
                    "must be this cluster's id, {cluster_id}: a recovery drops {}",
                    report.dropped.join(", ")
                ),
            });
        }
        let identity = self
            .db
            .identity()
            .map_err(storage_err)?
            .ok_or_else(|| ApiError::Internal("a member without an identity".into()))?;
        tracing::warn!(dropped = %report.dropped.join(","), log_index = held.last_index, "recovering the cluster on this node alone");
        self.stop_member(false).await?;
        self.db.force_single_voter(m.node_id, Peer { urls: self.my_urls() }).map_err(storage_err)?;
        let m = self.start_member(&identity).await.map_err(|e| ApiError::Internal(format!("{e:#}")))?;
        m.raft
            .wait(Some(RECOVERED_LEADER_WAIT))
            .current_leader(m.node_id, "recovered single voter leads")
            .await
            .map_err(|e| ApiError::Internal(format!("the recovered node did not elect itself: {e}")))?;
        self.propose(
            &m,
            Command::Recover {
                incarnation: report.incarnation,
                survivor: m.node_id,
                dropped,
                log_index: held.last_index,
                committed_index: held.committed_index,
            },
        )
        .await?;
        report.dry_run = false;
        Ok(report)
    }

    /// The refusal of a Raft call from `node` when a recovery superseded it.
    pub(super) fn superseded_refusal(&self, node: NodeId) -> Option<ApiError> {
        let m = self.member()?;
        m.state.read(|d| {
            d.state.superseded.contains(&node).then(|| ApiError::Superseded {
                node: d.state.nodes.get(&node).map_or_else(|| node.to_string(), |n| n.name.clone()),
                detail: format!(
                    "cluster {} was recovered without it on {} (incarnation {})",
                    m.cluster_id, self.cfg.name, d.state.incarnation
                ),
            })
        })
    }

    /// A peer said this node was superseded and it has not stopped yet: the
    /// executor and the lease timer stand still meanwhile.
    pub(super) fn superseded_pending(&self) -> bool {
        self.superseded_notice.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// On the leader: tells every superseded member that answers (a learner
    /// sends no Raft call that could be refused: it would wait for a leader
    /// forever). Each is told until it acknowledges.
    pub(super) async fn tell_superseded_round(&self) {
        let Some(m) = self.member() else { return };
        if !matches!(self.route(), Route::Here) {
            return;
        }
        let (targets, incarnation) = m.state.read(|d| {
            let s = &d.state;
            let t: Vec<(NodeId, Vec<String>)> =
                s.superseded.iter().filter_map(|id| s.nodes.get(id).map(|n| (*id, n.urls()))).collect();
            (t, s.incarnation)
        });
        let told: BTreeSet<NodeId> = self.superseded_told.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let notice = tandem_http_api::SupersededNotice { by: self.cfg.name.clone(), incarnation };
        for (id, urls) in targets.into_iter().filter(|(id, _)| !told.contains(id)) {
            let r =
                self.post_first::<_, serde_json::Value>(&urls, "/internal/superseded", &notice, PROBE_TIMEOUT).await;
            if matches!(r, Ok(Ok(_))) {
                self.superseded_told.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
            }
        }
    }

    /// A recovered cluster's leader says this node was superseded. Taken
    /// only while this node hears no leader of its own (a member of a
    /// working cluster is never stopped by such a word).
    pub(super) fn take_superseded_notice(&self, n: tandem_http_api::SupersededNotice) -> Result<(), ApiError> {
        self.require_member()?;
        if !matches!(self.route(), Route::NoLeader) {
            return Err(ApiError::QuorumReachable(format!(
                "{} hears a leader of its own: it is not superseded",
                self.cfg.name
            )));
        }
        let why = format!("{} leads incarnation {} of this cluster, recovered without this node", n.by, n.incarnation);
        stand_down(&self.guard, &self.superseded_notice, why);
        Ok(())
    }

    /// Once a peer said this node was superseded: it stops everything it
    /// runs and its Raft, and remembers why across restarts.
    pub(super) async fn superseded_round(&self) {
        let notice = self.superseded_notice.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(why) = notice else { return };
        if self.member().is_none() {
            *self.superseded_notice.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        }
        tracing::error!(
            "a recovered member of the cluster refuses this node: {why}. It stops taking part; to rejoin: on the \
             recovered cluster `tandem node remove {} --force`, then here `tandem cluster join <url> --token … \
             --ca-hash …`",
            self.cfg.name
        );
        if let Err(e) = self.db.set_superseded(&why) {
            tracing::error!("cannot record that this node was superseded: {e}");
        }
        let _g = self.membership_lock.lock().await;
        if let Err(e) = self.stop_member(false).await {
            tracing::warn!("stopping after being superseded: {e}");
        }
        *self.superseded_notice.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
