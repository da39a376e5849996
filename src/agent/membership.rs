//! Membership workflows: bootstrap, join, adopt, release, add and remove
//! nodes, and the autopilot round that moves votes. Serialised by the
//! agent's membership lock; the voter plan itself is `crate::autopilot`.

use super::*;

impl Agent {
    // ---- workflows ----

    pub(super) async fn do_init(&self, req: InitRequest) -> Result<tandem_http_api::InitView, ApiError> {
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
        let ca = self.init_tls(&cluster_id)?;
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
        let heartbeat_key = Some(super::lease::new_heartbeat_key()?);
        self.propose(&m, Command::Bootstrap { cluster_id, node_id: 1, node: self.cfg.spec(), heartbeat_key }).await?;
        self.pin_first_node(&m).await?;
        let mut view = self.first_admin_token(&m, &ca).await?;
        self.db.set_identity(&identity).map_err(storage_err)?;
        tracing::info!(cluster_id = %identity.cluster_id, "cluster bootstrapped");
        view.node = self.local_view();
        Ok(view)
    }

    pub(super) async fn do_join_via(&self, req: JoinViaRequest) -> Result<LocalView, ApiError> {
        if let Some(m) = self.member() {
            return Err(ApiError::AlreadyMember(m.cluster_id.clone()));
        }
        // A member a recovery superseded joins afresh: its old Raft state is
        // dropped, never merged (its volumes' data stay), and its old
        // certificate, no member's any more, is no longer presented.
        if self.db.superseded().map_err(storage_err)?.is_some() {
            tracing::warn!("joining again after a recovery superseded this node: its old Raft state is dropped");
            self.db.wipe().map_err(storage_err)?;
            self.release_tls();
        }
        let via = req.via.trim_end_matches('/').to_string();
        let scheme = tandem_raft::state::url_scheme();
        if !via.starts_with(&format!("{scheme}://")) {
            return Err(ApiError::Invalid {
                field: "via".into(),
                reason: format!("{via:?} is not an {scheme}:// URL"),
            });
        }
        let (client, csr, certificate) =
            self.secure_join_body(&via, req.token.as_deref(), req.ca_hash.as_deref()).await?;
        let spec = self.cfg.spec();
        let body = JoinRequest {
            name: spec.name,
            addresses: spec.addresses,
            port: spec.port,
            site: spec.site,
            witness: spec.witness,
            csr,
            certificate,
        };
        // The leader calls back our /internal/adopt before answering.
        let mut rb = client.post(format!("{via}/v1/nodes")).json(&body).timeout(PEER_TIMEOUT * 4);
        if let Some(t) = &req.token {
            rb = rb.bearer_auth(t);
        }
        let resp =
            rb.send().await.map_err(|e| ApiError::JoinTargetUnreachable { url: via.clone(), reason: e.to_string() })?;
        let answer: Result<NodeView, ApiError> = decode(&via, resp).await;
        answer?;
        if self.member().is_none() {
            return Err(ApiError::Internal("the cluster accepted the join but never adopted this node".into()));
        }
        Ok(self.local_view())
    }

    pub(super) async fn do_adopt(&self, req: AdoptRequest) -> Result<LocalView, ApiError> {
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
        self.adopt_tls(&req)?;
        self.db.wipe().map_err(storage_err)?;
        let identity = Identity { node_id: req.node_id, cluster_id: req.cluster_id };
        self.db.set_identity(&identity).map_err(storage_err)?;
        self.start_member(&identity).await.map_err(|e| ApiError::Internal(format!("{e:#}")))?;
        tracing::info!(node_id = identity.node_id, cluster_id = %identity.cluster_id, "adopted into cluster");
        Ok(self.local_view())
    }

    pub(super) async fn do_release(&self, req: ReleaseRequest) -> Result<(), ApiError> {
        // No membership lock: a leader that removes itself holds it while the
        // new leader finishes the removal and releases it.
        match self.member() {
            Some(m) if m.cluster_id == req.cluster_id && m.node_id == req.node_id => {
                self.stop_member(true).await?;
                self.release_tls();
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

    pub(super) async fn do_add_node(&self, req: JoinRequest) -> Result<NodeView, ApiError> {
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
            match self.get_unverified::<LocalView>(&format!("{u}/v1/local")).await {
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
        // Both sides must agree on who signs: mixing the cluster's own CA
        // and an operator's is refused.
        let external_cert =
            match (self.tls.external, &req.certificate) {
                (true, None) => return Err(ApiError::CaExternal(
                    "this cluster's certificates come from the operator's CA: the joining node needs [tls] ca_file, \
                     cert_file and key_file"
                        .into(),
                )),
                (true, Some(cert)) => Some((cert.clone(), self.check_member_cert(cert, &spec.name)?)),
                (false, Some(_)) => {
                    return Err(ApiError::CaExternal(
                        "this cluster makes its own certificates: the joining node has [tls] ca_file set (mixing is \
                     refused)"
                            .into(),
                    ))
                }
                (false, None) => None,
            };
        if let Some((_, info)) = &external_cert {
            if m.state.read(|d| d.state.node_certs.values().any(|s| *s == info.spki)) {
                return Err(ApiError::BadCertificate("another member's certificate has the same key".into()));
            }
        }
        if self.tls.enabled && !self.tls.external && req.csr.is_none() {
            return Err(ApiError::Invalid {
                field: "csr".into(),
                reason: "a certificate signing request is required (`tandem cluster join` makes one)".into(),
            });
        }

        let id = match self.propose(&m, Command::AddNode { node: spec.clone() }).await? {
            Reply::NodeAdded { id } => id,
            other => return Err(ApiError::Internal(format!("unexpected reply {other:?}"))),
        };
        let signed = match &external_cert {
            Some((cert, info)) => Some(
                self.propose(&m, Command::SetNodeCertificate { node_id: id, spki: info.spki.clone() })
                    .await
                    .map(|_| cert.clone()),
            ),
            None => req.csr.as_deref().filter(|_| self.tls.enabled).map(|csr| self.sign_for(&m, id, &spec, csr)),
        };
        let certificate = match signed {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                if let Err(undo) = self.propose(&m, Command::RemoveNode { name: spec.name.clone() }).await {
                    tracing::error!(node = %spec.name, "join refused ({e}) and its record could not be removed: {undo}");
                }
                return Err(e);
            }
            None => String::new(),
        };
        let adopt = AdoptRequest {
            cluster_id: m.cluster_id.clone(),
            node_id: id,
            name: spec.name.clone(),
            certificate,
            ca: self.ca_pem_or_empty(),
        };
        let adopted: Result<(), ApiError> =
            match self.post_unverified::<_, LocalView>(&urls, "/internal/adopt", &adopt, PEER_TIMEOUT * 2).await {
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

    pub(super) async fn do_remove(&self, name: &str, force: bool) -> Result<(), ApiError> {
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
        // The removed node knows the heartbeat key: a new one (the old one
        // is retired a few seconds later by the leader's autopilot round).
        if !state.heartbeat_keys.is_empty() {
            if let Err(e) = self.rotate_heartbeat_key(&m).await {
                tracing::warn!("heartbeat key not rotated after removing {name}: {e}");
            }
        }
        let release = ReleaseRequest { cluster_id: m.cluster_id.clone(), node_id: rec.id };
        match self.post_first::<_, serde_json::Value>(&rec.urls(), "/internal/release", &release, PEER_TIMEOUT).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(node = name, "removed, but the agent answered: {e}"),
            Err(e) => tracing::warn!(node = name, "removed, but the agent could not be told: {e}"),
        }
        tracing::info!(node = name, force, "node removed");
        Ok(())
    }

    pub(super) fn is_alive(&self, state: &ClusterState, id: NodeId, now: Instant) -> bool {
        state.nodes.get(&id).is_some_and(|r| self.liveness.status(id, &r.addresses, now).alive)
    }

    /// The voter set once `gone` leaves, topped up from healthy learners.
    pub(super) fn voters_without(
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

    pub(super) async fn forward_remove_to_new_leader(
        &self,
        m: &Member,
        name: &str,
        force: bool,
    ) -> Result<(), ApiError> {
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

    pub(super) fn candidates(
        &self,
        m: &Member,
        state: &ClusterState,
        metrics: &RaftMetrics,
        now: Instant,
    ) -> Vec<Candidate> {
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
                Candidate::new(r, me, (st.alive, st.down_for), matched, (last, lag))
            })
            .collect()
    }

    /// One autopilot round on the leader: re-add members missing from Raft,
    /// then move votes as [`autopilot::plan_voters`] says.
    pub(super) async fn autopilot_round(&self) -> Result<(), ApiError> {
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
        // A member a recovery superseded stays out until removed and joined again.
        let missing = |r: &&NodeRecord| membership.get_node(&r.id).is_none() && !state.superseded.contains(&r.id);
        if let Some(missing) = state.nodes.values().find(missing) {
            tracing::info!(node = %missing.name, "re-adding a recorded node missing from raft membership");
            return self.add_learner(&m, missing.id, Peer { urls: missing.urls() }).await;
        }
        if self.give_heartbeat_key(&m, &state).await? || self.retire_heartbeat_key(&m, &state).await? {
            return Ok(());
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
}

/// Joins through the configured members until one accepts; gives up only
/// when the agent becomes a member some other way.
pub(super) async fn auto_join(agent: Arc<Agent>, urls: Vec<String>) {
    let mut backoff = JOIN_BACKOFF_MIN;
    loop {
        for via in &urls {
            if agent.member().is_some() {
                return;
            }
            let req = JoinViaRequest {
                via: via.clone(),
                token: agent.cfg.join_token.clone(),
                ca_hash: agent.cfg.join_ca_hash.clone(),
            };
            match agent.do_join_via(req).await {
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
