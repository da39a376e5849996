//! The leader's failover input: which silent nodes may have their groups
//! moved (offline by quorum, fenced when a fence command is set, past the
//! lease and its margin), and the scheduler round that commits placements.
//! Fencing here means STONITH: running the fence command against a node.

use super::*;

/// One run of the fence command against a silent node.
pub(super) struct FenceOp {
    started: Instant,
    /// None while it runs.
    result: Arc<std::sync::Mutex<Option<Result<(), String>>>>,
}

impl Agent {
    /// One scheduler round on the leader: commit every placement change.
    pub(super) async fn scheduler_round(&self) {
        let Some(m) = self.member() else { return };
        if m.metrics().current_leader != Some(m.node_id) || m.state.read(|d| d.state.groups.is_empty()) {
            return;
        }
        let state = m.state.state();
        let now = Instant::now();
        let fenced_after = self.cfg.fenced_after();
        // A node is offline only when no majority of voters can have heard
        // it: while one can, it may hold its lease and run its groups.
        let voters: Vec<NodeId> = m.metrics().membership_config.membership().voter_ids().collect();
        let nodes: Vec<NodeInfo> = state
            .nodes
            .values()
            .map(|r| {
                let me = r.id == m.node_id;
                let st = self.liveness.quorum_status(r.id, &r.addresses, &voters, m.node_id, now);
                // The fence command starts as soon as the node is offline,
                // so that it runs while the lease runs out.
                let escalated = {
                    let mut e = self.escalated.lock().unwrap_or_else(|e| e.into_inner());
                    if !me && !st.alive {
                        e.remove(&r.id); // it went silent: the escalation took effect
                    }
                    e.contains(&r.id)
                };
                let confirmed = !me && self.fence_confirmed(r, st.alive && !escalated, now);
                NodeInfo {
                    id: r.id,
                    name: r.name.clone(),
                    admin: r.admin_state,
                    witness: r.witness,
                    alive: me || st.alive,
                    fenced: confirmed && !st.alive && st.down_for >= fenced_after,
                    capacity: r.attributes.get("capacity").and_then(|c| c.parse().ok()),
                }
            })
            .collect();
        for d in Scheduler::new(&nodes, &state.groups, local_minute_of_day()).decide() {
            tracing::info!(group = %d.group, epoch = d.expected_epoch + 1, phase = ?d.phase, "placement: {}", d.reason);
            let cmd = Command::SetPlacement {
                name: d.group.clone(),
                expected_epoch: d.expected_epoch,
                node: d.node,
                phase: d.phase,
                reason: d.reason,
            };
            if let Err(e) = self.propose(&m, cmd).await {
                tracing::debug!(group = %d.group, "placement not committed: {e}");
            }
        }
    }

    /// Whether the fence command (if any) has confirmed `node` off since it
    /// went silent; starts it, or retries a failed one, as needed.
    pub(super) fn fence_confirmed(&self, node: &NodeRecord, alive: bool, now: Instant) -> bool {
        let cmd = &self.cfg.fencing.fence_command;
        if cmd.is_empty() {
            return true;
        }
        let mut ops = self.fence_ops.lock().unwrap_or_else(|e| e.into_inner());
        if alive {
            ops.remove(&node.id); // back: a new silence needs a new fence
            return false;
        }
        if let Some(op) = ops.get(&node.id) {
            match &*op.result.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(Ok(())) => return true,
                None => return false,
                Some(Err(_)) if now.duration_since(op.started) < FENCE_RETRY => return false,
                Some(Err(_)) => {} // retry below
            }
        }
        ops.insert(node.id, FenceOp { started: now, result: self.start_fence(node) });
        false
    }

    /// Runs the fence command against `node` in the background; the slot
    /// receives its outcome.
    pub(super) fn start_fence(&self, node: &NodeRecord) -> Arc<std::sync::Mutex<Option<Result<(), String>>>> {
        let result = Arc::new(std::sync::Mutex::new(None));
        let out = result.clone();
        let Some((program, args)) = self.cfg.fencing.fence_command.split_first() else {
            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(Err("no fence command".into()));
            return out;
        };
        let (program, args) = (program.clone(), args.to_vec());
        let (name, addresses) = (node.name.clone(), node.addresses.join(","));
        let timeout = Duration::from_millis(self.cfg.fencing.fence_timeout_ms);
        tokio::spawn(async move {
            tracing::warn!(node = %name, "fencing: running {program} {args:?}");
            let run = tokio::process::Command::new(&program)
                .args(&args)
                .arg(&name)
                .env("TANDEM_FENCE_NODE", &name)
                .env("TANDEM_FENCE_ADDRESSES", &addresses)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            let r = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {timeout:?}")),
            };
            match &r {
                Ok(()) => tracing::warn!(node = %name, "fencing confirmed: the node is off"),
                Err(e) => tracing::error!(node = %name, "fencing failed, its groups stay where they are: {e}"),
            }
            *result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        out
    }
}
