//! What the data plane reports about a volume replica: its role, each
//! replica's disk and connection, resync progress, the last online verify.
//!
//! Plain data in the data plane's own terms (disk states, replication modes,
//! generation ids). It must never depend on the REST layer: the mapping to
//! the API's views lives outside the data plane (`crate::volume_views`).

use std::collections::BTreeMap;

use tandem_raft::volume::{DiskState, ReadBalancing, ReplicationMode};

use super::generation::GenId;

/// What a replica does for its volume on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaRole {
    Primary,
    Secondary,
}

/// The state of the replication link to (or from) one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// In sync, writes flow.
    Connected,
    /// This side sends a resync.
    SyncSource,
    /// This side receives a resync.
    SyncTarget,
    /// An async peer that fell out of its buffer: tracked in the bitmap.
    Ahead,
    Disconnected,
    /// Both sides changed since their common generation; waits for a policy
    /// or the operator.
    SplitBrain,
}

/// Progress of a running resync.
#[derive(Debug, Clone, PartialEq)]
pub struct ResyncStatus {
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Bytes sent so far by this resync.
    pub sent_bytes: u64,
    /// Bytes the resync started with.
    pub total_bytes: u64,
    /// Rate over the last 2 s, bytes per second.
    pub rate_bytes_per_s: u64,
    /// Seconds to completion at the recent rate; none before a rate is known.
    pub eta_s: Option<f64>,
    /// The rate the resync aims at now: the adaptive controller's, or a
    /// fixed resync's `rate`; none: a fixed resync without one.
    pub target_rate_bytes_per_s: Option<u64>,
}

/// One replica of a volume, as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStatus {
    pub node: String,
    pub role: ReplicaRole,
    pub disk: DiskState,
    pub connection: Connection,
    /// How it receives writes (none for the primary itself).
    pub mode: Option<ReplicationMode>,
    /// Bytes this replica lacks (its bits in the primary's bitmap).
    pub out_of_sync_bytes: u64,
    pub resync: Option<ResyncStatus>,
    /// Async peers: bytes written locally and not yet acknowledged by it.
    pub lag_bytes: Option<u64>,
    /// Why it is disconnected or refused, when it is.
    pub last_error: Option<String>,
    /// Client reads it was given since this primary started: the primary's
    /// own row counts those its disk served, a peer's those sent to it.
    pub reads: u64,
}

/// What this node's data plane knows about a volume: from the primary every
/// replica, from a secondary only itself (first in `replicas`).
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeStatus {
    pub name: String,
    pub role: ReplicaRole,
    pub size_bytes: u64,
    /// The export as an NBD URI, on the primary.
    pub nbd: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
    /// The current data generation.
    pub generation: GenId,
    /// Last online verify on this primary, if any.
    pub verify: Option<VerifyOutcome>,
    /// When the local data last changed (ms since the Unix epoch).
    pub newest_write_ms: Option<u64>,
    /// The primary's read balancing policy.
    pub read_balancing: ReadBalancing,
    /// Local read errors on the primary since it started.
    pub read_errors: u64,
    /// Blocks the primary rewrote from a peer's copy after a read error.
    pub repaired_blocks: u64,
}

/// Where an online verify is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyState {
    Running,
    Done,
    /// It stopped early, for this reason.
    Failed(String),
}

/// Outcome (so far) of an online verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub state: VerifyState,
    pub checked_bytes: u64,
    /// Blocks whose digests differed, per replica node.
    pub found_blocks: BTreeMap<String, u64>,
    /// Of those, blocks resynced so far.
    pub repaired_blocks: BTreeMap<String, u64>,
}

impl VerifyOutcome {
    /// A verify that just started.
    pub fn running() -> VerifyOutcome {
        VerifyOutcome {
            state: VerifyState::Running,
            checked_bytes: 0,
            found_blocks: BTreeMap::new(),
            repaired_blocks: BTreeMap::new(),
        }
    }
}
