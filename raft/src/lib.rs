//! tandem's consensus layer.
//!
//! Owns the openraft type configuration, the pure replicated state machine
//! ([`state`]), its RocksDB storage ([`store`]) and the node-to-node Raft
//! transport ([`network`]). It must never decide policy (who votes, where a
//! group runs): the daemon does that and proposes commands through Raft.

pub mod access;
pub mod alerts;
pub mod error;
pub mod events;
pub mod group;
pub mod network;
pub mod state;
pub mod store;
pub mod volume;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use error::CommandError;
pub use state::{Command, CommandResult, Reply, Stamp, VersionedCommand};

/// A node's id in the cluster: assigned once, never reused.
pub type NodeId = u64;

/// How the Raft network reaches a node: the base URL of its API on every
/// network path it has, in the operator's order of preference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub urls: Vec<String>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.urls.join(","))
    }
}

openraft::declare_raft_types!(
    /// tandem's Raft type configuration.
    pub TypeConfig:
        D = VersionedCommand,
        R = CommandResult,
        NodeId = NodeId,
        Node = Peer,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Peer>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
