//! Volumes in the control plane: where a volume's live status comes from,
//! routing verify/resolve to its primary, recording replica disk states
//! through Raft, and the volume views. The data plane is `crate::volume`.

use super::*;

// ---- volumes: helpers of the API's volume routes ----

/// How long a verify or resolve may take on the primary before the request
/// answers 503 (both return once started).
pub(super) const VOLUME_ACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the live status of a volume comes from.
pub(super) enum VolumeSource {
    /// This node (named) is its primary: the volume's name.
    Here(String, String),
    /// The primary's name and its `/internal/volumes/{name}/local`.
    Remote(String, String),
    /// No primary to ask, and why.
    None(String),
}

impl Agent {
    /// For a volume's primary (the data plane): records in the replicated
    /// state that `node`'s replica of `volume` holds `disk`, proposing
    /// `SetReplicaDisk` on the leader (here, or through
    /// `POST /internal/volumes/{volume}/disk`). `epoch` is the group's
    /// placement epoch the primary runs at; a stale one is refused with
    /// TND-1411. Returns once committed: only then may the primary
    /// acknowledge a write that replica missed.
    pub async fn record_disk(
        &self,
        volume: &str,
        node: &str,
        disk: tandem_raft::volume::DiskState,
        epoch: u64,
        replaced: u64,
    ) -> Result<(), ApiError> {
        let report = tandem_http_api::ReplicaDiskReport { node: node.to_string(), disk, epoch, replaced };
        let path = format!("/internal/volumes/{volume}/disk");
        self.on_leader(&path, &report, self.record_replica_disk(volume, report.clone())).await
    }
}

/// Where the live status of `r`, the volume of `g`, comes from: the node
/// its group runs on (`me` is this node).
pub(super) fn volume_source(
    state: &ClusterState,
    me: NodeId,
    g: &GroupRecord,
    r: &tandem_raft::group::ResourceSpec,
) -> VolumeSource {
    let node = match (g.placement.phase, g.placement.node.and_then(|id| state.nodes.get(&id))) {
        (Phase::Started, Some(n)) => n,
        _ => return VolumeSource::None(format!("group {} is not running: the volume has no primary", g.name)),
    };
    if node.id == me {
        return VolumeSource::Here(node.name.clone(), r.name.clone());
    }
    match node.urls().into_iter().next() {
        Some(u) => VolumeSource::Remote(node.name.clone(), format!("{u}/internal/volumes/{}/local", r.name)),
        None => VolumeSource::None(format!("primary {} has no address", node.name)),
    }
}

impl Agent {
    /// The volume's primary: `None` for this node, else its API URLs.
    pub(super) fn primary_of(&self, m: &Member, name: &str) -> Result<Option<Vec<String>>, ApiError> {
        let state = m.state.state();
        let (g, _) = state.volume_owner(name).ok_or_else(|| ApiError::VolumeNotFound(name.to_string()))?;
        match (g.placement.phase, g.placement.node.and_then(|id| state.nodes.get(&id))) {
            (Phase::Started, Some(n)) if n.id == m.node_id => Ok(None),
            (Phase::Started, Some(n)) => Ok(Some(n.urls())),
            _ => {
                Err(ApiError::NotPrimary(format!("volume {name} has no primary: its group {} is not running", g.name)))
            }
        }
    }

    /// POSTs a volume action to its primary; the primary's data-plane
    /// errors come back under their own codes.
    pub(super) async fn ask_primary<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        urls: &[String],
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        match self.post_first::<B, T>(urls, path, body, VOLUME_ACTION_TIMEOUT).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(relay(e)),
            Err(reason) => Err(ApiError::ForwardFailed { url: urls.join(","), reason }),
        }
    }
}

/// The primary's live status of a volume, or why there is none.
pub(super) async fn fetch_volume_status(
    http: &reqwest::Client,
    node: &str,
    url: &str,
) -> Result<tandem_http_api::LocalVolumeStatus, String> {
    fetch_local_volume(http, &format!("primary {node}"), url).await
}

/// What `who`'s data plane knows of a volume (`url`: its
/// `/internal/volumes/{name}/local`), or why it did not say.
pub(super) async fn fetch_local_volume(
    http: &reqwest::Client,
    who: &str,
    url: &str,
) -> Result<tandem_http_api::LocalVolumeStatus, String> {
    let resp = http.get(url).timeout(STATUS_TIMEOUT).send().await.map_err(|e| format!("{who} did not answer: {e}"))?;
    decode(url, resp).await.map_err(|e| match e {
        ApiError::Refused { code, message, .. } => format!("{who}: {code}: {message}"),
        other => format!("{who}: {other}"),
    })
}

pub(super) fn replication_mode_name(m: tandem_raft::volume::ReplicationMode) -> String {
    match m {
        tandem_raft::volume::ReplicationMode::Sync => "sync".into(),
        tandem_raft::volume::ReplicationMode::Async => "async".into(),
    }
}

/// A volume as the API shows it: its replicas from the replicated state,
/// their live status from the primary (`live`), or, when that failed, the
/// recorded disk states, `Disconnected` and why.
pub(super) fn volume_view(
    state: &ClusterState,
    g: &GroupRecord,
    r: &tandem_raft::group::ResourceSpec,
    spec: &tandem_raft::volume::VolumeSpec,
    live: Result<tandem_http_api::LocalVolumeStatus, String>,
) -> tandem_http_api::VolumeView {
    use tandem_http_api::{ConnectionState, ReplicaView, VolumeView};
    let name = r.name.clone();
    let primary = match g.placement.phase {
        Phase::Started => g.placement.node.and_then(|id| state.nodes.get(&id)).map(|n| n.name.clone()),
        _ => None,
    };
    let recorded = g.replica_disks.get(&name).cloned().unwrap_or_default();
    let recorded_disk =
        |node: &str| recorded.get(node).copied().unwrap_or(tandem_raft::volume::DiskState::Diskless).to_string();
    let replicas = tandem_raft::group::replica_nodes(&g.spec)
        .into_iter()
        .map(|node| {
            let reported = live.as_ref().ok().and_then(|l| l.replicas.iter().find(|x| x.node == node));
            if let Some(x) = reported {
                return x.clone();
            }
            let is_primary = primary.as_deref() == Some(node.as_str());
            let why = match &live {
                Err(e) => e.clone(),
                Ok(_) => format!("the primary does not report the replica on {node}"),
            };
            ReplicaView {
                role: if is_primary { "primary" } else { "secondary" }.into(),
                disk: recorded_disk(&node),
                connection: ConnectionState::Disconnected,
                mode: (!is_primary).then(|| replication_mode_name(spec.mode_for(&node))),
                out_of_sync_bytes: 0,
                resync: None,
                lag_bytes: None,
                last_error: Some(why),
                reads: 0,
                node,
            }
        })
        .collect();
    let live = live.ok();
    // The primary's export lags the definition while a grow is under way.
    let size_bytes = live.as_ref().map_or(spec.size_bytes(), |l| l.size_bytes);
    VolumeView {
        group: g.name.clone(),
        size_bytes,
        growing_to_bytes: (size_bytes < spec.size_bytes()).then_some(spec.size_bytes()),
        mode: replication_mode_name(spec.mode),
        primary,
        nbd: live.as_ref().and_then(|l| l.nbd.clone()),
        replicas,
        generation: live.as_ref().map(|l| l.generation.clone()),
        read_errors: live.as_ref().map(|l| l.read_errors),
        repaired_blocks: live.as_ref().map(|l| l.repaired_blocks),
        verify: live.and_then(|l| l.verify),
        recorded_disks: recorded.iter().map(|(n, d)| (n.clone(), d.to_string())).collect(),
        read_balancing: serde_json::to_value(spec.read_balancing)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        name,
    }
}

/// Maps the data plane's errors to the API's, keeping their codes.
pub(super) fn volume_err(e: crate::volume::VolumeError) -> ApiError {
    use crate::volume::VolumeError as V;
    let message = e.to_string();
    match e {
        V::NotFound { .. } => ApiError::VolumeNotOnNode(message),
        V::NotPrimary { .. } => ApiError::NotPrimary(message),
        V::NoSuchReplica { .. } => ApiError::NoSuchReplica(message),
        V::NotSplitBrain { .. } => ApiError::NotSplitBrain(message),
        V::Refused { .. } => ApiError::VolumeRefused(message),
        V::VerifyRunning { .. } => ApiError::VerifyRunning(message),
        V::Io { .. } => ApiError::VolumeIo(message),
    }
}

/// A byte count with one decimal in the largest binary unit: `67.9GiB`.
pub(super) fn human_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1u64 << shift {
            return format!("{:.1}{unit}", n as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{n}B")
}

/// Refuses a new volume larger than the free space of the file system that
/// holds `data_dir` (where this agent keeps its replicas), or a volume
/// growing from `now` bytes by more than that (replicas are allocated in
/// full).
pub(super) fn check_free_space(
    data_dir: &std::path::Path,
    spec: &GroupSpec,
    r: &tandem_raft::group::ResourceSpec,
    v: &tandem_raft::volume::VolumeSpec,
    now: Option<u64>,
) -> Result<(), ApiError> {
    let st = nix::sys::statvfs::statvfs(data_dir)
        .map_err(|e| ApiError::Storage(format!("statvfs {}: {e}", data_dir.display())))?;
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    let needed = v.size_bytes().saturating_sub(now.unwrap_or(0));
    if needed <= free {
        return Ok(());
    }
    let i = spec.resources.iter().position(|x| x.name == r.name).unwrap_or(0);
    Err(ApiError::VolumeTooLarge {
        field: format!("resources[{i}].size"),
        name: r.name.clone(),
        size: match now {
            None => v.size.clone(),
            Some(_) => format!("{} more", human_bytes(needed)),
        },
        path: data_dir.display().to_string(),
        free: human_bytes(free),
    })
}

/// How often the volume replicas here are reconciled with the state even
/// when nothing changed.
pub(super) const VOLUME_TICK: Duration = Duration::from_secs(1);

/// The data plane's way to the replicated state: replica disk states are
/// recorded through Raft under the group's epoch.
pub(super) struct VolumeControl(pub(super) std::sync::Weak<Agent>);

#[async_trait::async_trait]
impl crate::volume::engine::ControlPlane for VolumeControl {
    async fn record_disk(
        &self,
        volume: &str,
        node: &str,
        disk: tandem_raft::volume::DiskState,
        epoch: u64,
        replaced: u64,
    ) -> Result<(), String> {
        let agent = self.0.upgrade().ok_or("the agent is stopping")?;
        agent.record_disk(volume, node, disk, epoch, replaced).await.map_err(|e| format!("{}: {e}", e.code()))
    }
}

impl Agent {
    /// Opens the replicas this node should hold, closes the others.
    pub(super) async fn volume_round(self: &Arc<Self>) {
        let m = self.member();
        let state = m.as_ref().map(|m| m.state.state());
        let desired = match &state {
            Some(s) => crate::volume::desired::desired_volumes(s, &self.cfg.name),
            None => Vec::new(),
        };
        let names: Vec<String> = desired.iter().map(|d| d.config.name.clone()).collect();
        self.volumes.reconcile(desired).await;
        // Each replica's status once per round, for both uses below.
        let statuses: Vec<crate::volume::status::VolumeStatus> =
            names.iter().filter_map(|n| self.volumes.status(n).ok()).collect();
        self.observe_volumes(state.as_ref(), &names, &statuses);
        if let Some(state) = &state {
            self.record_out_of_sync_round(state, &names, &statuses);
        }
    }

    /// Events of the volumes this node is the primary of: links, resyncs,
    /// split brains, verify results (see `crate::volume_events`).
    fn observe_volumes(
        &self,
        state: Option<&ClusterState>,
        names: &[String],
        statuses: &[crate::volume::status::VolumeStatus],
    ) {
        let mut seen = self.volume_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|n, _| names.contains(n));
        let now = crate::security::now_ms();
        for status in statuses {
            let name = &status.name;
            let group = state.and_then(|s| s.volume_owner(name)).map(|(g, _)| g.name.clone());
            let before = seen.get(name).cloned().unwrap_or_default();
            let (next, events) = crate::volume_events::volume_events(&before, status, group.as_deref(), now);
            seen.insert(name.clone(), next);
            for e in events {
                self.emit(e);
            }
        }
    }
}

#[cfg(test)]
mod volume_api_tests {
    use super::*;
    use crate::volume::VolumeError;
    use tandem_http_api::{ConnectionState, LocalVolumeStatus, ReplicaView};

    #[test]
    fn data_plane_errors_keep_their_code_and_are_never_500() {
        let name = || "data".to_string();
        for e in [
            VolumeError::NotFound { name: name() },
            VolumeError::NotPrimary { name: name() },
            VolumeError::NoSuchReplica { name: name(), node: "n9".into() },
            VolumeError::NotSplitBrain { name: name(), node: "n2".into() },
            VolumeError::Refused { name: name(), reason: "r".into() },
            VolumeError::VerifyRunning { name: name() },
            VolumeError::Io { name: name(), source: std::io::Error::other("EIO") },
        ] {
            let code = e.code();
            let msg = e.to_string();
            let a = volume_err(e);
            assert_eq!((a.code(), a.to_string()), (code, msg));
            assert_ne!(a.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR, "{code}");
        }
    }

    /// Three nodes, group `db` with volume `data` on n1 and n2, running on n1.
    fn state() -> ClusterState {
        let node = |name: &str, port| NodeSpec {
            name: name.into(),
            addresses: vec!["127.0.0.1".into()],
            port,
            site: None,
            witness: false,
        };
        let mut s = ClusterState::default();
        s.apply(&Command::Bootstrap { cluster_id: "c".into(), node_id: 1, node: node("n1", 1), heartbeat_key: None })
            .unwrap();
        s.apply(&Command::AddNode { node: node("n2", 2) }).unwrap();
        s.apply(&Command::AddNode { node: node("n3", 3) }).unwrap();
        let spec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "data", "type": "volume", "size": "1GiB", "modes": {"n2": "async"}}],
            "nodes": ["n1", "n2", "n3"]
        }))
        .unwrap();
        s.apply(&Command::PutGroup { name: "db".into(), spec }).unwrap();
        s.apply(&Command::SetPlacement {
            name: "db".into(),
            expected_epoch: 0,
            node: Some(1),
            phase: Phase::Started,
            reason: "t".into(),
        })
        .unwrap();
        s.apply(&Command::SetReplicaDisk {
            volume: "data".into(),
            node: "n2".into(),
            disk: tandem_raft::volume::DiskState::Outdated,
            epoch: 1,
            replaced: 0,
        })
        .unwrap();
        s
    }

    fn view(s: &ClusterState, live: Result<LocalVolumeStatus, String>) -> tandem_http_api::VolumeView {
        let g = &s.groups["db"];
        let (r, v) = g.spec.volume().unwrap();
        volume_view(s, g, r, v, live)
    }

    #[test]
    fn without_the_primary_the_view_shows_the_recorded_states() {
        let s = state();
        let v = view(&s, Err("primary n1 did not answer".into()));
        assert_eq!((v.name.as_str(), v.group.as_str(), v.size_bytes), ("data", "db", 1 << 30));
        assert_eq!((v.primary.as_deref(), v.mode.as_str(), v.generation.as_deref()), (Some("n1"), "sync", None));
        let r: Vec<_> = v.replicas.iter().map(|r| (r.node.as_str(), r.role.as_str(), r.disk.as_str())).collect();
        assert_eq!(r, [("n1", "primary", "UpToDate"), ("n2", "secondary", "Outdated")]);
        assert!(v.replicas.iter().all(|r| r.connection == ConnectionState::Disconnected
            && r.last_error.as_deref() == Some("primary n1 did not answer")));
        assert_eq!((v.replicas[0].mode.as_deref(), v.replicas[1].mode.as_deref()), (None, Some("async")));
        assert_eq!(v.recorded_disks["n2"], "Outdated");
        // A stopped group has no primary.
        let mut stopped = s.clone();
        stopped.groups.get_mut("db").unwrap().placement = Default::default();
        assert_eq!(view(&stopped, Err("x".into())).primary, None);
    }

    #[test]
    fn the_primary_live_status_wins_where_it_reports() {
        let s = state();
        let live = LocalVolumeStatus {
            name: "data".into(),
            role: "primary".into(),
            size_bytes: 1 << 30,
            nbd: Some("nbd+unix:///data?socket=/run/x.sock".into()),
            replicas: vec![ReplicaView {
                node: "n1".into(),
                role: "primary".into(),
                disk: "UpToDate".into(),
                connection: ConnectionState::Connected,
                mode: None,
                out_of_sync_bytes: 0,
                resync: None,
                lag_bytes: None,
                last_error: None,
                reads: 0,
            }],
            generation: "00ff".into(),
            verify: None,
            newest_write_ms: None,
            read_balancing: None,
            read_errors: 1,
            repaired_blocks: 1,
        };
        let v = view(&s, Ok(live.clone()));
        assert_eq!((v.size_bytes, v.growing_to_bytes), (1 << 30, None));
        assert_eq!(v.replicas[0].connection, ConnectionState::Connected);
        assert_eq!(v.generation.as_deref(), Some("00ff"));
        assert_eq!((v.read_errors, v.repaired_blocks), (Some(1), Some(1)));
        assert_eq!(v.read_balancing, "prefer-local");
        assert!(v.nbd.is_some());
        // A replica the primary leaves out still shows, with why.
        assert_eq!(v.replicas[1].node, "n2");
        assert_eq!(v.replicas[1].connection, ConnectionState::Disconnected);
        assert!(v.replicas[1].last_error.as_deref().is_some_and(|e| e.contains("does not report")));
        // Grown in the definition, not yet exported: the view says both.
        let v = view(&s, Ok(LocalVolumeStatus { size_bytes: 512 << 20, ..live }));
        assert_eq!((v.size_bytes, v.growing_to_bytes), (512 << 20, Some(1 << 30)));
        // Without a primary, the definition is all there is.
        let v = view(&s, Err("down".into()));
        assert_eq!((v.size_bytes, v.growing_to_bytes), (1 << 30, None));
    }

    #[test]
    fn free_space_is_checked_against_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let spec: GroupSpec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "app", "type": "process", "command": ["x"]},
                          {"name": "big", "type": "volume", "size": "16TiB"}],
            "nodes": ["n1", "n2"]
        }))
        .unwrap();
        let (r, v) = spec.volume().unwrap();
        match check_free_space(dir.path(), &spec, r, v, None) {
            Err(e @ ApiError::VolumeTooLarge { .. }) => {
                assert_eq!((e.code(), e.status().as_u16()), ("TND-1410", 409));
                assert!(e.to_string().contains("resources[1].size"), "{e}");
            }
            other => panic!("a 16TiB volume fits in a temp dir? {other:?}"),
        }
        // A grow needs only what it adds.
        match check_free_space(dir.path(), &spec, r, v, Some(8 << 40)) {
            Err(e) => assert!(e.to_string().contains("needs 8.0TiB more"), "{e}"),
            Ok(()) => panic!("8TiB more fits in a temp dir?"),
        }
        assert!(check_free_space(dir.path(), &spec, r, v, Some((16 << 40) - 4096)).is_ok());
        assert_eq!(human_bytes(3 << 29), "1.5GiB");
    }
}
