//! Groups on this node and on the leader: the executor round (claims,
//! starts, stops, reports), the leader's handling of reports and claims,
//! and the group views. The resource-level work is `crate::executor`.

use super::*;

/// How long a claimed start waits for this node to apply its own claim.
pub(super) const CLAIM_APPLY_WAIT: Duration = Duration::from_secs(1);

impl Agent {
    // ---- groups ----

    pub(super) fn group_view(state: &ClusterState, g: &GroupRecord) -> GroupView {
        let name_of = |id: NodeId| state.nodes.get(&id).map(|n| n.name.clone()).unwrap_or_else(|| format!("#{id}"));
        let p = &g.placement;
        let st = g.state_name();
        GroupView {
            name: g.name.clone(),
            spec: g.spec.clone(),
            node: p.node.map(name_of),
            state: st.to_string(),
            enabled: g.enabled,
            epoch: p.epoch,
            reason: p.reason.clone(),
            failed_on: g.failed_on.iter().map(|id| name_of(*id)).collect(),
            move_to: g.move_to.map(name_of),
            restarts: None,
            resources: None,
        }
    }

    /// Adds what the node running the group says about its resources.
    pub(super) async fn with_resources(&self, mut v: GroupView) -> GroupView {
        let Some(node) = v.node.clone() else { return v };
        let status = if node == self.cfg.name {
            self.local_group(&v.name).await.ok()
        } else {
            let url = self.member().and_then(|m| {
                m.state.read(|d| {
                    d.state
                        .nodes
                        .values()
                        .find(|n| n.name == node)
                        .and_then(|n| api_urls(&n.addresses, n.port).into_iter().next())
                })
            });
            match url {
                Some(u) => self
                    .get_json_within::<LocalGroupStatus>(
                        &format!("{u}/internal/groups/{}/local", v.name),
                        STATUS_TIMEOUT,
                    )
                    .await
                    .ok(),
                None => None,
            }
        };
        // A group being stopped there runs at its older epoch: still its own.
        if let Some(s) = status.filter(|s| s.epoch <= v.epoch) {
            v.restarts = Some(s.restarts);
            v.resources = Some(s.resources);
        }
        v
    }

    pub(super) fn read_group(m: &Member, name: &str) -> Result<GroupView, ApiError> {
        let state = m.state.state();
        let g = state.groups.get(name).ok_or_else(|| ApiError::GroupNotFound(name.to_string()))?;
        Ok(Self::group_view(&state, g))
    }

    /// One executor round: run what is placed here, report what only this
    /// node knows, and kill everything when the lease lapsed. What to do
    /// with each group is the reconciler's decision (in the executor).
    pub(super) async fn executor_round(&self) {
        let Some(m) = self.member() else { return };
        if self.superseded_pending() {
            return;
        }
        if self.lease_core().lapsed() {
            let mut ex = self.executor.lock().await;
            if let Some(ex) = ex.as_mut() {
                ex.lapse();
            }
            // Only now may the lease be taken again (see lease_round).
            self.lease_core().everything_stopped();
        }
        let no_groups = m.state.read(|d| d.state.groups.is_empty());
        if no_groups && self.executor.lock().await.as_ref().is_none_or(|ex| ex.is_idle()) {
            return;
        }
        let state = m.state.state();
        let lease = self.lease_view();
        let ticket_open = self.liveness.ticket_gate().open(now_boot_ms());
        let wanted = match self.executor.lock().await.as_ref() {
            Some(ex) => ex.wanted_starts(&state, lease, ticket_open),
            None => return,
        };
        let mut confirmed = BTreeSet::new();
        for (name, epoch) in &wanted {
            if let Some(claimed) = self.claim_start(&m, name, *epoch).await {
                confirmed.insert((name.clone(), claimed));
            }
        }
        // The claims moved the epochs: act on the state that holds them.
        let state = if wanted.is_empty() { state } else { m.state.state() };
        let reports = match self.executor.lock().await.as_mut() {
            Some(ex) => ex.tick(&state, lease, self.liveness.ticket_gate().open(now_boot_ms()), &confirmed).await,
            None => return,
        };
        for r in reports {
            let (group, report) = match r {
                Report::Stopped { group, epoch } => {
                    (group, GroupReport { node: m.node_id, epoch, event: GroupEvent::Stopped })
                }
                Report::Failed { group, epoch } => {
                    (group, GroupReport { node: m.node_id, epoch, event: GroupEvent::Failed })
                }
                Report::StopFailed { group, epoch } => {
                    self.emit(
                        tandem_raft::events::Event::new(
                            0,
                            "group.stop_failed",
                            tandem_raft::events::Severity::Critical,
                            format!("group {group} could not be stopped on {}: it may still run there", self.cfg.name),
                        )
                        .group(&group),
                    );
                    (group, GroupReport { node: m.node_id, epoch, event: GroupEvent::StopFailed })
                }
            };
            let path = format!("/internal/groups/{group}/report");
            let sent = self.on_leader(&path, &report, self.apply_report(&group, report.clone())).await;
            if let Err(e) = sent {
                tracing::debug!(group = %group, "report not delivered yet: {e}");
            }
        }
    }

    /// Claims `name`, placed here at `epoch`, through the leader (a
    /// committed `ClaimGroup`, see `apply_claim`), and waits until this
    /// node has applied it: a start acts on nothing older, and no placement
    /// decided before the claim can apply after it. Returns the new epoch.
    pub(super) async fn claim_start(&self, m: &Member, name: &str, epoch: u64) -> Option<u64> {
        let claim = ClaimRequest { node: m.node_id, epoch };
        let path = format!("/internal/groups/{name}/claim");
        let claimed = self.on_leader(&path, &claim, self.apply_claim(name, claim.clone())).await;
        if let Err(e) = claimed {
            tracing::debug!(group = name, epoch, "start not confirmed by the leader: {e}");
            return None;
        }
        let want = epoch + 1;
        let deadline = Instant::now() + CLAIM_APPLY_WAIT;
        loop {
            let applied = m.state.read(|d| d.state.groups.get(name).map(|g| (g.placement.node, g.placement.epoch)));
            match applied {
                Some((Some(n), e)) if n == m.node_id && e == want => return Some(want),
                Some((_, e)) if e > want => return None, // moved on already
                _ if Instant::now() >= deadline => return None,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// On the leader: commits a node's claim to start a group placed on it
    /// (the epoch grows). Committed in log order: a placement change
    /// proposed before it wins and the claim is refused, or the claim wins
    /// and that change no longer matches the epoch.
    pub(super) async fn apply_claim(&self, name: &str, c: ClaimRequest) -> Result<(), ApiError> {
        let m = self.require_member()?;
        // Before it is proposed: a scheduler round that sees the claim's
        // epoch also sees that the node is alive (see `Failover::claimed`).
        self.failover_core().claimed(c.node, now_boot_ms());
        let cmd = Command::ClaimGroup { name: name.into(), node: c.node, expected_epoch: c.epoch };
        self.propose(&m, cmd).await.map(|_| ())
    }

    /// On the leader: records what a node reported about a group placed on it.
    pub(super) async fn apply_report(&self, name: &str, r: GroupReport) -> Result<(), ApiError> {
        let m = self.require_member()?;
        let state = m.state.state();
        let g = state.groups.get(name).ok_or_else(|| ApiError::GroupNotFound(name.to_string()))?;
        let p = &g.placement;
        if p.node != Some(r.node) || p.epoch != r.epoch {
            return Ok(()); // about an older placement: nothing to do
        }
        let node = state.nodes.get(&r.node).map(|n| n.name.clone()).unwrap_or_default();
        match r.event {
            GroupEvent::Stopped if p.phase == Phase::Stopping => {
                let reason = format!("stopped on {node} ({})", p.reason);
                let cmd = Command::SetPlacement {
                    name: name.into(),
                    expected_epoch: r.epoch,
                    node: None,
                    phase: Phase::Stopped,
                    reason,
                };
                self.propose(&m, cmd).await.map(|_| ())
            }
            GroupEvent::StopFailed => {
                // It may still run there and cannot be stopped: power the
                // node off (with a fence command). Once it is silent, fenced
                // and confirmed, its groups move as from any dead node. The
                // leader cannot wait for itself to go silent: it fences
                // itself at once; the next leader fences it again (powering
                // off is idempotent) before moving anything.
                let escalation = self.failover_core().escalate(r.node, m.node_id);
                match escalation {
                    Escalation::NoFenceCommand => {
                        tracing::error!(group = name, node = %node, "stop failed and no fence command is set: the group stays blocked there");
                    }
                    Escalation::Repeated => {}
                    Escalation::First(effects) => {
                        tracing::error!(group = name, node = %node, "stop failed: escalating to fencing the node");
                        self.run_fence_effects(&state, effects);
                    }
                }
                Ok(())
            }
            GroupEvent::Failed if p.phase == Phase::Started && !g.failed_on.contains(&r.node) => {
                tracing::warn!(group = name, node = %node, "group failed past its restart threshold");
                self.propose(&m, Command::MarkGroupFailed { name: name.into(), node: r.node, epoch: r.epoch })
                    .await
                    .map(|_| ())
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn wait_group_stopped(&self, m: &Member, name: &str) -> Result<(), ApiError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let phase = m.state.read(|d| d.state.groups.get(name).map(|g| g.placement.phase));
            match phase {
                None | Some(Phase::Stopped) => return Ok(()),
                Some(_) if Instant::now() > deadline => {
                    return Err(ApiError::QuorumUnavailable(format!("group {name} did not stop within 60 s")))
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}
