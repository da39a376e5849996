//! The REST API's backend: `tandem_http_api::Backend` for the agent, each
//! route handed to the module that owns it.

use super::*;

#[async_trait::async_trait]
impl Backend for Agent {
    fn name(&self) -> String {
        self.cfg.name.clone()
    }

    async fn catch_up(&self) -> bool {
        self.do_catch_up().await
    }

    fn not_member(&self) -> ApiError {
        match self.db.superseded().ok().flatten() {
            Some(why) => ApiError::Superseded { node: self.cfg.name.clone(), detail: why },
            None => ApiError::NotMember,
        }
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
            Route::NotMember => Err(self.not_member()),
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

    async fn recover(
        &self,
        dry_run: bool,
        req: tandem_http_api::RecoverRequest,
    ) -> Result<tandem_http_api::RecoverReport, ApiError> {
        self.do_recover(dry_run, req).await
    }

    fn superseded(&self, node: NodeId) -> Option<ApiError> {
        self.superseded_refusal(node)
    }

    async fn sites(&self, stale: bool) -> Result<Vec<tandem_http_api::SiteView>, ApiError> {
        let m = self.read_member(stale).await?;
        Ok(self.site_views(&m))
    }

    async fn set_site_admin_state(&self, site: &str, state: AdminState) -> Result<tandem_http_api::SiteView, ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::SetSiteAdminState { site: site.into(), state }).await?;
        self.site_view(&m, site)
    }

    async fn switchover_site(
        &self,
        site: &str,
        req: tandem_http_api::SwitchoverRequest,
    ) -> Result<tandem_http_api::SwitchoverReport, ApiError> {
        self.do_switchover_site(site, req).await
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
            .map(|r| ResourceView {
                name: r.name,
                kind: r.kind,
                state: r.state,
                pid: r.pid,
                last_error: r.last_error,
                warning: r.warning,
            })
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
        if spec.ticket && self.ticket.is_none() {
            return Err(ApiError::Invalid {
                field: "ticket".into(),
                reason: "this cluster has no [ticket] (docs/dr.md): a group bound to it would never start".into(),
            });
        }
        // Users are a node's: checked against this node's user database
        // (every node should have the same; one that lacks it fails the
        // start with the reason).
        for (i, r) in spec.resources.iter().enumerate() {
            let at = |f: &str| format!("resources[{i}].{f}");
            if let Some((user, group)) = r.kind.run_as() {
                crate::executor::run_as(user, group).map_err(|reason| ApiError::Invalid {
                    field: at(if reason.contains("group") { "group" } else { "user" }),
                    reason,
                })?;
            }
            if let tandem_raft::group::ResourceKind::Filesystem(f) = &r.kind {
                if let Some(owner) = &f.owner {
                    let (u, g) = crate::executor::filesystem::split_owner(owner);
                    crate::executor::run_as(u, g).map_err(|reason| ApiError::Invalid { field: at("owner"), reason })?;
                }
            }
        }
        // What the log would refuse is refused first, each with its code;
        // then a new volume, or what a volume grows by, must fit in this
        // node's free space.
        m.state.read(|d| d.state.check_put_group(name, &spec))?;
        if let Some((r, v)) = spec.volume() {
            let now = m.state.read(|d| {
                d.state.volume_owner(&r.name).and_then(|(g, _)| g.spec.volume()).map(|(_, old)| old.size_bytes())
            });
            if now.is_none_or(|n| v.size_bytes() > n) {
                check_free_space(&self.cfg.data_dir, &spec, r, v, now)?;
            }
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

    async fn claim_group(&self, name: &str, claim: ClaimRequest) -> Result<(), ApiError> {
        self.apply_claim(name, claim).await
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

    async fn replace_replica(&self, name: &str, node: &str) -> Result<tandem_http_api::VolumeView, ApiError> {
        let m = self.require_member()?;
        // The state machine refuses (unchanged) an unknown volume or node, a
        // node without a replica, the serving primary, the last UpToDate copy.
        self.propose(&m, Command::ReplaceReplica { volume: name.into(), node: node.into() }).await?;
        self.volume(name, true).await
    }

    async fn promote_volume(
        &self,
        name: &str,
        dry_run: bool,
        req: tandem_http_api::PromoteRequest,
    ) -> Result<tandem_http_api::PromoteReport, ApiError> {
        self.do_promote_volume(name, dry_run, req).await
    }

    async fn superseded_notice(&self, n: tandem_http_api::SupersededNotice) -> Result<(), ApiError> {
        self.take_superseded_notice(n)
    }

    async fn ticket(&self) -> Result<tandem_http_api::TicketView, ApiError> {
        self.do_ticket_view()
    }

    async fn ticket_want(&self, wanted: bool) -> Result<tandem_http_api::TicketView, ApiError> {
        self.do_ticket_want(wanted).await
    }

    fn ticket_request(&self, body: &[u8], seal: &str) -> Result<(Vec<u8>, String), ApiError> {
        self.do_ticket_request(body, seal)
    }

    async fn record_out_of_sync(&self, name: &str, r: tandem_http_api::OutOfSyncReport) -> Result<(), ApiError> {
        self.propose_out_of_sync(name, r).await
    }

    async fn group_health(&self, name: &str) -> tandem_http_api::ServingView {
        self.do_group_health(name).await
    }

    async fn volume_health(&self, name: &str, replica_lag: Option<u64>) -> tandem_http_api::ServingView {
        self.do_volume_health(name, replica_lag).await
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
        let cmd = Command::SetReplicaDisk {
            volume: name.into(),
            node: r.node,
            disk: r.disk,
            epoch: r.epoch,
            replaced: r.replaced,
        };
        self.propose(&m, cmd).await.map(|_| ())
    }

    async fn init(&self, req: InitRequest) -> Result<tandem_http_api::InitView, ApiError> {
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

    fn authenticate(&self, secret: &str) -> Result<(String, tandem_raft::access::Role), ApiError> {
        self.do_authenticate(secret)
    }

    fn is_member_node(&self, id: NodeId, name: &str) -> bool {
        self.do_is_member_node(id, name)
    }

    fn record_audit(&self, entry: tandem_raft::access::AuditEntry) {
        self.queue_audit(entry)
    }

    fn peer_http(&self) -> reqwest::Client {
        self.http.clone()
    }

    async fn create_token(
        &self,
        req: tandem_http_api::TokenRequest,
        by: String,
    ) -> Result<tandem_http_api::TokenCreated, ApiError> {
        self.do_create_token(req, by).await
    }

    async fn tokens(&self) -> Result<Vec<tandem_http_api::TokenView>, ApiError> {
        self.do_tokens().await
    }

    async fn revoke_token(&self, name: &str) -> Result<(), ApiError> {
        self.do_revoke_token(name).await
    }

    fn member_by_key(&self, spki: &str, cn: &str) -> Option<tandem_http_api::listen::PeerNode> {
        self.do_member_by_key(spki, cn)
    }

    fn authenticate_cert(&self, spki: &str) -> Result<(String, tandem_raft::access::Role), ApiError> {
        self.do_authenticate_cert(spki)
    }

    async fn create_certificate(
        &self,
        req: tandem_http_api::CertificateRequest,
        by: String,
    ) -> Result<tandem_http_api::ClientCertCreated, ApiError> {
        self.do_create_certificate(req, by).await
    }

    async fn certificates(&self) -> Result<Vec<tandem_http_api::ClientCertView>, ApiError> {
        self.do_certificates().await
    }

    async fn revoke_certificate(&self, name: &str) -> Result<(), ApiError> {
        self.do_revoke_certificate(name).await
    }

    async fn pin_node_certificate(&self, node: &str, req: tandem_http_api::NodeCertRequest) -> Result<(), ApiError> {
        self.do_pin_node_certificate(node, req).await
    }

    async fn join_token(
        &self,
        req: tandem_http_api::JoinTokenRequest,
        by: String,
    ) -> Result<tandem_http_api::JoinTokenView, ApiError> {
        self.do_join_token(req, by).await
    }

    async fn audit(&self, since: u64, limit: usize) -> Result<Vec<tandem_raft::access::AuditEntry>, ApiError> {
        self.do_audit(since, limit).await
    }

    async fn record_audit_batch(&self, entries: Vec<tandem_raft::access::AuditEntry>) -> Result<(), ApiError> {
        self.do_record_audit_batch(entries).await
    }

    fn events(
        &self,
        since: u64,
        filter: &tandem_raft::events::EventFilter,
        limit: usize,
    ) -> Result<tandem_raft::events::EventPage, ApiError> {
        self.do_events(since, filter, limit)
    }

    fn event_changes(&self) -> Result<tokio::sync::watch::Receiver<u64>, ApiError> {
        self.do_event_changes()
    }

    async fn record_event_batch(&self, events: Vec<tandem_raft::events::Event>) -> Result<(), ApiError> {
        self.do_record_events_batch(events).await
    }

    async fn put_alert(
        &self,
        name: &str,
        spec: tandem_raft::alerts::AlertSpec,
        by: String,
    ) -> Result<(tandem_http_api::AlertView, bool), ApiError> {
        self.do_put_alert(name, spec, by).await
    }

    async fn alerts(&self, stale: bool) -> Result<Vec<tandem_http_api::AlertView>, ApiError> {
        self.do_alerts(stale).await
    }

    async fn alert(&self, name: &str, stale: bool) -> Result<tandem_http_api::AlertView, ApiError> {
        self.do_alert(name, stale).await
    }

    async fn delete_alert(&self, name: &str) -> Result<(), ApiError> {
        self.do_delete_alert(name).await
    }

    async fn test_alert(&self, name: &str) -> Result<tandem_http_api::AlertTested, ApiError> {
        self.do_test_alert(name).await
    }

    fn cluster_ca(&self) -> Result<tandem_http_api::CaView, ApiError> {
        self.do_cluster_ca()
    }

    async fn renew_certificate(
        &self,
        node: &str,
        req: tandem_http_api::RenewRequest,
    ) -> Result<tandem_http_api::CertificateView, ApiError> {
        self.do_renew(node, req).await
    }

    async fn ca_key(&self, node: &str) -> Result<tandem_http_api::CaKeyView, ApiError> {
        self.do_ca_key(node).await
    }

    async fn metrics(&self) -> String {
        self.render_metrics().await
    }

    fn count_request(&self, method: &str, route: &str, status: u16) {
        self.counters.count_request(method, route, status);
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
