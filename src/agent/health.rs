//! What a load balancer asks every node (`/v1/groups/{name}/health`,
//! `/v1/volumes/{name}/primary`, `/v1/volumes/{name}/replica`): whether
//! *this* node serves, from what it knows locally. Never forwarded, never
//! a write. A node says it serves a group only while it holds its lease:
//! the lease lapses before the leader may start the group elsewhere, so at
//! no moment do two nodes answer 200 for one group.

use super::*;
use tandem_http_api::ServingView;
use tandem_raft::group::Phase;

/// How long a health check waits for the executor (busy stopping or
/// starting something) before it answers "busy".
const EXECUTOR_WAIT: Duration = Duration::from_secs(2);

impl Agent {
    fn serving_view(&self, serving: bool, reason: impl Into<String>) -> ServingView {
        ServingView { serving, node: self.cfg.name.clone(), reason: reason.into() }
    }

    pub(super) async fn do_group_health(&self, name: &str) -> ServingView {
        if !self.guard.lease_valid() {
            return self.serving_view(false, "lease not held: this node may be cut off");
        }
        let Some(m) = self.member() else { return self.serving_view(false, "not a member of a cluster") };
        let placed = m
            .state
            .read(|d| d.state.groups.get(name).map(|g| (g.placement.node, g.placement.phase, g.placement.epoch)));
        let epoch = match placed {
            None => return self.serving_view(false, format!("no group named {name}")),
            Some((Some(n), Phase::Started, epoch)) if n == m.node_id => epoch,
            Some(_) => return self.serving_view(false, "not placed here"),
        };
        let Ok(ex) = tokio::time::timeout(EXECUTOR_WAIT, self.executor.lock()).await else {
            return self.serving_view(false, "busy: the executor did not answer within 2 s");
        };
        let Some((local_epoch, _, resources)) = ex.as_ref().and_then(|e| e.status(name)) else {
            return self.serving_view(false, "placed here, not started yet");
        };
        if local_epoch != epoch {
            return self.serving_view(false, format!("running epoch {local_epoch}, placed at {epoch}"));
        }
        if let Some(r) = resources.iter().find(|r| r.state != "running") {
            return self.serving_view(false, format!("resource {} is {}", r.name, r.state));
        }
        self.serving_view(true, format!("running here at epoch {epoch}"))
    }

    pub(super) async fn do_volume_health(&self, name: &str, replica_lag: Option<u64>) -> ServingView {
        let status: tandem_http_api::LocalVolumeStatus = match self.volumes.status(name) {
            Ok(s) => s.into(),
            Err(_) => return self.serving_view(false, format!("no replica of volume {name} here")),
        };
        match replica_lag {
            None if status.role != "primary" => self.serving_view(false, format!("{} here", status.role)),
            None if !self.guard.lease_valid() => self.serving_view(false, "lease not held: this node may be cut off"),
            None => self.serving_view(true, "primary here"),
            Some(_) if status.role != "secondary" => self.serving_view(false, format!("{} here", status.role)),
            Some(lag) => {
                let me = status.replicas.iter().find(|r| r.node == self.cfg.name);
                let Some(me) = me else { return self.serving_view(false, "this replica's state is unknown") };
                let behind = me.out_of_sync_bytes.saturating_add(me.lag_bytes.unwrap_or(0));
                if me.disk != "UpToDate" {
                    self.serving_view(false, format!("disk {}", me.disk))
                } else if me.connection != tandem_http_api::ConnectionState::Connected {
                    self.serving_view(false, format!("connection {:?}", me.connection))
                } else if behind > lag {
                    self.serving_view(false, format!("{behind} bytes behind, more than {lag}"))
                } else {
                    self.serving_view(true, format!("up-to-date replica, {behind} bytes behind"))
                }
            }
        }
    }
}
