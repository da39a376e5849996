//! The data plane's status, as the REST API shows it: `From` conversions
//! from [`crate::volume::status`] to the views of `tandem_http_api`.
//!
//! The one place where the two meet: the data plane never imports the REST
//! types, and these conversions decide nothing (names and formats only:
//! roles and modes in lower case, disk states by name, the generation in
//! hex).

use tandem_http_api::types::{ConnectionState, LocalVolumeStatus, ReplicaView, ResyncProgress, VerifyReport};
use tandem_raft::volume::ReplicationMode;

use crate::volume::status::{
    Connection, ReplicaRole, ReplicaStatus, ResyncStatus, VerifyOutcome, VerifyState, VolumeStatus,
};

fn role(r: ReplicaRole) -> String {
    match r {
        ReplicaRole::Primary => "primary",
        ReplicaRole::Secondary => "secondary",
    }
    .into()
}

fn mode(m: ReplicationMode) -> String {
    match m {
        ReplicationMode::Sync => "sync",
        ReplicationMode::Async => "async",
    }
    .into()
}

impl From<Connection> for ConnectionState {
    fn from(c: Connection) -> ConnectionState {
        match c {
            Connection::Connected => ConnectionState::Connected,
            Connection::SyncSource => ConnectionState::SyncSource,
            Connection::SyncTarget => ConnectionState::SyncTarget,
            Connection::Ahead => ConnectionState::Ahead,
            Connection::Disconnected => ConnectionState::Disconnected,
            Connection::SplitBrain => ConnectionState::SplitBrain,
        }
    }
}

impl From<ResyncStatus> for ResyncProgress {
    fn from(r: ResyncStatus) -> ResyncProgress {
        ResyncProgress {
            remaining_bytes: r.remaining_bytes,
            sent_bytes: r.sent_bytes,
            total_bytes: r.total_bytes,
            rate_bytes_per_s: r.rate_bytes_per_s,
            eta_s: r.eta_s,
            target_rate_bytes_per_s: r.target_rate_bytes_per_s,
        }
    }
}

impl From<ReplicaStatus> for ReplicaView {
    fn from(r: ReplicaStatus) -> ReplicaView {
        ReplicaView {
            node: r.node,
            role: role(r.role),
            disk: r.disk.to_string(),
            connection: r.connection.into(),
            mode: r.mode.map(mode),
            out_of_sync_bytes: r.out_of_sync_bytes,
            resync: r.resync.map(Into::into),
            lag_bytes: r.lag_bytes,
            last_error: r.last_error,
            reads: r.reads,
        }
    }
}

impl From<VerifyOutcome> for VerifyReport {
    fn from(v: VerifyOutcome) -> VerifyReport {
        let (state, error) = match v.state {
            VerifyState::Running => ("running", None),
            VerifyState::Done => ("done", None),
            VerifyState::Failed(e) => ("failed", Some(e)),
        };
        VerifyReport {
            state: state.into(),
            checked_bytes: v.checked_bytes,
            found_blocks: v.found_blocks,
            repaired_blocks: v.repaired_blocks,
            error,
        }
    }
}

impl From<VolumeStatus> for LocalVolumeStatus {
    fn from(s: VolumeStatus) -> LocalVolumeStatus {
        LocalVolumeStatus {
            name: s.name,
            role: role(s.role),
            size_bytes: s.size_bytes,
            nbd: s.nbd,
            replicas: s.replicas.into_iter().map(Into::into).collect(),
            generation: format!("{:016x}", s.generation),
            verify: s.verify.map(Into::into),
            newest_write_ms: s.newest_write_ms,
            read_balancing: serde_json::to_value(s.read_balancing).ok().and_then(|v| v.as_str().map(str::to_string)),
            read_errors: s.read_errors,
            repaired_blocks: s.repaired_blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tandem_raft::volume::DiskState;

    use super::*;

    fn replica(node: &str, role: ReplicaRole, disk: DiskState, connection: Connection) -> ReplicaStatus {
        ReplicaStatus {
            node: node.into(),
            role,
            disk,
            connection,
            mode: None,
            out_of_sync_bytes: 0,
            resync: None,
            lag_bytes: None,
            last_error: None,
            reads: 0,
        }
    }

    #[test]
    fn a_primarys_status_maps_to_the_rest_view_field_by_field() {
        let status = VolumeStatus {
            name: "data".into(),
            role: ReplicaRole::Primary,
            size_bytes: 1 << 20,
            nbd: Some("nbd+unix:///data?socket=/run/data.sock".into()),
            replicas: vec![
                replica("n1", ReplicaRole::Primary, DiskState::UpToDate, Connection::Connected),
                ReplicaStatus {
                    mode: Some(ReplicationMode::Sync),
                    out_of_sync_bytes: 8192,
                    reads: 17,
                    resync: Some(ResyncStatus {
                        remaining_bytes: 8192,
                        sent_bytes: 4096,
                        total_bytes: 12288,
                        rate_bytes_per_s: 4096,
                        eta_s: Some(2.0),
                        target_rate_bytes_per_s: Some(8192),
                    }),
                    ..replica("n2", ReplicaRole::Secondary, DiskState::Inconsistent, Connection::SyncSource)
                },
                ReplicaStatus {
                    mode: Some(ReplicationMode::Async),
                    lag_bytes: Some(65536),
                    last_error: Some("stale epoch 5 < 6 already seen".into()),
                    ..replica("n3", ReplicaRole::Secondary, DiskState::Outdated, Connection::SplitBrain)
                },
            ],
            generation: 0xab,
            newest_write_ms: Some(42),
            read_balancing: tandem_raft::volume::ReadBalancing::LeastPending,
            read_errors: 4,
            repaired_blocks: 3,
            verify: Some(VerifyOutcome {
                state: VerifyState::Failed("demoted during verify".into()),
                checked_bytes: 4096,
                found_blocks: BTreeMap::from([("n2".to_string(), 3)]),
                repaired_blocks: BTreeMap::from([("n2".to_string(), 1)]),
            }),
        };
        let view = LocalVolumeStatus::from(status);
        let want = LocalVolumeStatus {
            name: "data".into(),
            role: "primary".into(),
            size_bytes: 1 << 20,
            nbd: Some("nbd+unix:///data?socket=/run/data.sock".into()),
            replicas: vec![
                ReplicaView {
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
                },
                ReplicaView {
                    node: "n2".into(),
                    role: "secondary".into(),
                    disk: "Inconsistent".into(),
                    connection: ConnectionState::SyncSource,
                    mode: Some("sync".into()),
                    out_of_sync_bytes: 8192,
                    resync: Some(ResyncProgress {
                        remaining_bytes: 8192,
                        sent_bytes: 4096,
                        total_bytes: 12288,
                        rate_bytes_per_s: 4096,
                        eta_s: Some(2.0),
                        target_rate_bytes_per_s: Some(8192),
                    }),
                    lag_bytes: None,
                    last_error: None,
                    reads: 17,
                },
                ReplicaView {
                    node: "n3".into(),
                    role: "secondary".into(),
                    disk: "Outdated".into(),
                    connection: ConnectionState::SplitBrain,
                    mode: Some("async".into()),
                    out_of_sync_bytes: 0,
                    resync: None,
                    lag_bytes: Some(65536),
                    last_error: Some("stale epoch 5 < 6 already seen".into()),
                    reads: 0,
                },
            ],
            generation: "00000000000000ab".into(),
            verify: Some(VerifyReport {
                state: "failed".into(),
                checked_bytes: 4096,
                found_blocks: BTreeMap::from([("n2".to_string(), 3)]),
                repaired_blocks: BTreeMap::from([("n2".to_string(), 1)]),
                error: Some("demoted during verify".into()),
            }),
            newest_write_ms: Some(42),
            read_balancing: Some("least-pending".into()),
            read_errors: 4,
            repaired_blocks: 3,
        };
        assert_eq!(view, want);
    }

    #[test]
    fn a_secondarys_status_and_every_connection_and_verify_state_map() {
        let status = VolumeStatus {
            name: "data".into(),
            role: ReplicaRole::Secondary,
            size_bytes: 4096,
            nbd: None,
            replicas: vec![replica("n2", ReplicaRole::Secondary, DiskState::Diskless, Connection::SyncTarget)],
            generation: u64::MAX,
            verify: None,
            newest_write_ms: Some(1_700_000_000_000),
            read_balancing: Default::default(),
            read_errors: 0,
            repaired_blocks: 0,
        };
        let view = LocalVolumeStatus::from(status);
        assert_eq!((view.role.as_str(), view.generation.as_str()), ("secondary", "ffffffffffffffff"));
        assert_eq!(view.newest_write_ms, Some(1_700_000_000_000));
        assert_eq!(
            (view.replicas[0].disk.as_str(), view.replicas[0].connection),
            ("Diskless", ConnectionState::SyncTarget)
        );
        // The REST names are the data plane's, one for one.
        for c in [
            Connection::Connected,
            Connection::SyncSource,
            Connection::SyncTarget,
            Connection::Ahead,
            Connection::Disconnected,
            Connection::SplitBrain,
        ] {
            assert_eq!(format!("{:?}", ConnectionState::from(c)), format!("{c:?}"));
        }
        let state = |s: VerifyState| VerifyReport::from(VerifyOutcome { state: s, ..VerifyOutcome::running() });
        let running = state(VerifyState::Running);
        assert_eq!((running.state.as_str(), running.error), ("running", None));
        let done = state(VerifyState::Done);
        assert_eq!((done.state.as_str(), done.error), ("done", None));
    }
}
