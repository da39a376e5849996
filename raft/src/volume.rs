//! The data plane's vocabulary as the replicated state records it: how a
//! replica is written to (`ReplicationMode`), what its disk holds
//! (`DiskState`), and what to do when two replicas diverged
//! (`SplitBrainPolicy`). Pure: no I/O.
//!
//! The control plane keeps, per volume and replica node, whether that
//! replica's disk is `UpToDate`: a primary records a sync replica as
//! `Outdated` *before* it acknowledges a write the replica did not get, so
//! the scheduler never fails a group over to a node missing acknowledged data.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a secondary receives writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// A write is acknowledged once this replica applied it (DRBD protocol C);
    /// a FLUSH or FUA once it is durable there.
    #[default]
    Sync,
    /// Acknowledged after the local write and shipped in order from a bounded
    /// buffer; when the buffer fills, the peer is tracked in the bitmap
    /// (`Ahead`) and caught up later.
    Async,
}

/// What a replica's disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiskState {
    /// Holds every acknowledged write of the current generation.
    UpToDate,
    /// Being written by a resync: not usable as a source.
    Inconsistent,
    /// Consistent but missing writes made since it was disconnected.
    Outdated,
    /// No local disk (detached after I/O errors, or not yet created).
    Diskless,
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Diskless => "Diskless",
        };
        f.write_str(s)
    }
}

/// What happens when both sides changed the data since their common
/// ancestor generation. `discard-*` names the side whose changes are thrown
/// away; that side then resyncs from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Stay disconnected, raise an alert, wait for the operator.
    #[default]
    Disconnect,
    /// The side that became primary last loses.
    DiscardYoungerPrimary,
    /// The side that became primary first loses.
    DiscardOlderPrimary,
    /// If one side wrote nothing since the split, it loses; otherwise
    /// disconnect.
    DiscardZeroChanges,
    /// The side with fewer changed blocks loses (a tie: the younger primary).
    DiscardLeastChanges,
    /// The current primary's changes are discarded (it must be demoted
    /// first: a serving primary is never overwritten).
    DiscardLocal,
    /// The reconnecting secondary's changes are discarded.
    DiscardRemote,
}

impl SplitBrainPolicy {
    pub const ALL: [SplitBrainPolicy; 7] = [
        SplitBrainPolicy::Disconnect,
        SplitBrainPolicy::DiscardYoungerPrimary,
        SplitBrainPolicy::DiscardOlderPrimary,
        SplitBrainPolicy::DiscardZeroChanges,
        SplitBrainPolicy::DiscardLeastChanges,
        SplitBrainPolicy::DiscardLocal,
        SplitBrainPolicy::DiscardRemote,
    ];
}
