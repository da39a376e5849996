//! What a replica reports: its own role and disk, and on the primary every
//! peer's disk, connection, resync progress and lag, in the data plane's
//! own types ([`crate::volume::status`]); plus the counters tests and
//! benchmarks read.
//!
//! Read-only: it must never change a replica or a link, and it takes a
//! link's state and the replica one at a time (never nested the wrong way).

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_raft::volume::{DiskState, ReplicationMode};

use super::Volume;
use crate::volume::status::{Connection, ReplicaRole, ReplicaStatus, VolumeStatus};

impl Volume {
    /// What this node knows about the volume (`nbd`: its export's URI,
    /// shown on the primary).
    pub fn status(&self, nbd: Option<String>) -> VolumeStatus {
        // Lock order: a link's state, then the replica — never the other way
        // round (a deadlock found by tandem-chaos): copy what is needed here.
        let (disk, current, oos_by_peer, newest_write_ms) = {
            let r = self.replica();
            let oos: BTreeMap<String, u64> = r.bitmaps.iter().map(|(p, b)| (p.clone(), b.bytes())).collect();
            (r.meta.disk, r.meta.current, oos, r.data_modified_ms())
        };
        let primary = self.is_primary();
        let (local_reads, read_errors, repaired_blocks) = self.read_counters();
        let role = if primary { ReplicaRole::Primary } else { ReplicaRole::Secondary };
        let mut replicas = vec![ReplicaStatus {
            node: self.cfg.node.clone(),
            role,
            disk,
            connection: if primary {
                Connection::Connected
            } else if self.upstream.lock().map(|u| u.is_some()).unwrap_or(false) {
                if disk == DiskState::Inconsistent {
                    Connection::SyncTarget
                } else {
                    Connection::Connected
                }
            } else {
                Connection::Disconnected
            },
            mode: None,
            out_of_sync_bytes: 0,
            resync: None,
            lag_bytes: None,
            // This replica's own trouble: a grow it could not make.
            last_error: self.grow_error(),
            reads: local_reads,
        }];
        if primary {
            for (node, link) in &self.links {
                let st = link.st.lock().unwrap_or_else(|p| p.into_inner());
                let oos = oos_by_peer.get(node).copied().unwrap_or(0);
                let disk = if st.in_sync {
                    DiskState::UpToDate
                } else if st.tx.is_some() {
                    DiskState::Inconsistent
                } else {
                    st.recorded.unwrap_or(st.peer_disk)
                };
                replicas.push(ReplicaStatus {
                    node: node.clone(),
                    role: ReplicaRole::Secondary,
                    disk,
                    connection: st.conn,
                    mode: Some(link.cfg.mode),
                    out_of_sync_bytes: oos,
                    resync: st.resync.clone().map(|mut p| {
                        p.remaining_bytes = oos;
                        p
                    }),
                    lag_bytes: (link.cfg.mode == ReplicationMode::Async).then_some(st.inflight_bytes + oos),
                    last_error: st.last_error.clone(),
                    reads: st.reads_served,
                });
            }
        }
        VolumeStatus {
            name: self.cfg.name.clone(),
            role,
            size_bytes: if primary { self.exported_size() } else { self.size() },
            nbd: if primary { nbd } else { None },
            replicas,
            generation: current,
            verify: self.verify_report(),
            newest_write_ms,
            read_balancing: *self.reads.policy.lock().unwrap_or_else(|p| p.into_inner()),
            read_errors,
            repaired_blocks,
        }
    }

    /// Bytes the peer `node` lacks, per the primary's bitmap.
    pub fn out_of_sync(&self, node: &str) -> u64 {
        self.replica().bitmaps.get(node).map(|b| b.bytes()).unwrap_or(0)
    }

    /// Resync bytes acknowledged by `node` since this process started.
    pub fn resync_bytes_sent(&self, node: &str) -> u64 {
        self.links.get(node).map(|l| l.st.lock().map(|s| s.bytes_sent).unwrap_or(0)).unwrap_or(0)
    }

    /// The last completed resync to `node`: bytes sent, time taken.
    pub fn last_resync(&self, node: &str) -> Option<(u64, Duration)> {
        self.links.get(node).and_then(|l| l.st.lock().ok().and_then(|s| s.last_resync))
    }

    /// Whether `node` is streaming and in sync.
    pub fn peer_in_sync(&self, node: &str) -> bool {
        self.links.get(node).is_some_and(|l| l.st.lock().map(|s| s.in_sync).unwrap_or(false))
    }
}
