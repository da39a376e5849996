//! Raft operations: every call into openraft (writes, membership changes,
//! linearizable reads) with its timeout, and the one place where openraft's
//! errors become API errors. Never decides anything.

use super::*;

/// An openraft error (or a timeout) as the API error a client sees.
trait IntoApiError {
    fn into_api_error(self) -> ApiError;
}

impl IntoApiError for RaftError<NodeId, ClientWriteError<NodeId, Peer>> {
    fn into_api_error(self) -> ApiError {
        match self {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ApiError::NoLeader,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => membership_err(e),
            RaftError::Fatal(e) => fatal_err(e),
        }
    }
}

impl IntoApiError for RaftError<NodeId, CheckIsLeaderError<NodeId, Peer>> {
    fn into_api_error(self) -> ApiError {
        match self {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => ApiError::NoLeader,
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)) => ApiError::QuorumUnavailable(e.to_string()),
            RaftError::Fatal(e) => fatal_err(e),
        }
    }
}

/// Runs one openraft call within `limit`; past it, the cluster is taken to
/// have no quorum for it (`late` says what did not happen in time).
async fn within<T, E: IntoApiError>(
    limit: Duration,
    late: impl FnOnce() -> String,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, call).await {
        Err(_) => Err(ApiError::QuorumUnavailable(late())),
        Ok(r) => r.map_err(IntoApiError::into_api_error),
    }
}

impl Agent {
    pub(super) async fn propose(&self, m: &Member, cmd: Command) -> Result<Reply, ApiError> {
        let late = || format!("not committed within {}s; the write may still be applied", COMMIT_TIMEOUT.as_secs());
        let started = Instant::now();
        let resp =
            within(COMMIT_TIMEOUT, late, m.raft.client_write(VersionedCommand::stamped(cmd, self.stamp()))).await;
        self.counters.proposal_seconds.observe(started.elapsed().as_secs_f64());
        resp?.data.0.map_err(ApiError::from)
    }

    pub(super) async fn change_voters(
        &self,
        m: &Member,
        change: ChangeMembers<NodeId, Peer>,
        retain: bool,
    ) -> Result<(), ApiError> {
        let late = || "membership change not committed in time".to_string();
        within(COMMIT_TIMEOUT * 2, late, m.raft.change_membership(change, retain)).await.map(|_| ())
    }

    pub(super) async fn add_learner(&self, m: &Member, id: NodeId, peer: Peer) -> Result<(), ApiError> {
        let late = || "learner not added in time".to_string();
        within(COMMIT_TIMEOUT, late, m.raft.add_learner(id, peer, false)).await.map(|_| ())
    }

    /// Before refusing an unknown token or certificate on a follower:
    /// applies at least what the leader has applied (a credential made
    /// through the leader was applied there before it answered), at most
    /// `CATCH_UPS_PER_SECOND` times a second.
    pub(super) async fn do_catch_up(&self) -> bool {
        let Some(m) = self.member() else { return false };
        // On the leader it is applied already; with no leader, nothing to ask.
        let Route::Leader(urls) = self.route() else { return false };
        {
            let mut window = self.catch_ups.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if now.duration_since(window.0) >= Duration::from_secs(1) {
                *window = (now, 0);
            }
            if window.1 >= CATCH_UPS_PER_SECOND {
                return false;
            }
            window.1 += 1;
        }
        for url in urls {
            let asked = self.http.get(format!("{url}/v1/cluster?stale=true")).timeout(CATCH_UP_WAIT).send().await;
            let Ok(resp) = asked else { continue };
            let Ok(view) = resp.json::<ClusterView>().await else { return false };
            let Some(index) = view.applied_index else { return false };
            return m.raft.wait(Some(CATCH_UP_WAIT)).applied_index_at_least(Some(index), "caught up").await.is_ok();
        }
        false
    }

    /// Read-index through the leader: after this, local state is at least as
    /// new as anything committed before the call.
    pub(super) async fn linearize(&self, m: &Member) -> Result<(), ApiError> {
        let late = || "read index not confirmed in time".to_string();
        within(COMMIT_TIMEOUT, late, m.raft.ensure_linearizable()).await.map(|_| ())
    }

    pub(super) async fn read_member(&self, stale: bool) -> Result<Arc<Member>, ApiError> {
        let m = self.require_member()?;
        if !stale {
            self.linearize(&m).await?;
        }
        Ok(m)
    }
}

pub(super) fn membership_err(e: ChangeMembershipError<NodeId>) -> ApiError {
    match e {
        ChangeMembershipError::InProgress(_) => ApiError::MembershipChangeInProgress,
        other => ApiError::Internal(other.to_string()),
    }
}
