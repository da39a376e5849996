//! The data plane: replicated block volumes exported over NBD.
//!
//! A volume is a fixed-size array of bytes kept on a backing file on each
//! replica node. The primary exports it to applications over NBD ([`nbd`]) and
//! ships every write, in order, to its secondaries over its own framed TCP
//! protocol ([`wire`]). What a peer lacks is tracked in a persisted bitmap per
//! peer; an activity log bounds what must be resynced after a primary crash;
//! generation UUIDs ([`generation`]) decide on every connect which way data
//! flows, or that the two sides split; both ends of a connection run the
//! same [`handshake`] check. What it reports is in its own [`status`] types.
//!
//! This module must never decide placement: the scheduler picks the primary
//! and the executor promotes and demotes through [`manager::VolumeManager`],
//! which carries the group's epoch so a stale primary is refused by its peers.
//! It never depends on the REST layer (`tandem_http_api`): the agent maps
//! its status to the API's views (`crate::volume_views`).

pub mod desired;
pub mod engine;
pub mod generation;
pub mod handshake;
pub mod manager;
pub mod nbd;
pub mod status;
pub mod store;
pub mod wire;

/// The replication stream's TLS, set once at the agent's start. Unset
/// (volume tests without an agent) means plain TCP.
static REPLICATION_TLS: std::sync::OnceLock<crate::security::tls::ReplicationTls> = std::sync::OnceLock::new();

pub fn set_replication_tls(t: crate::security::tls::ReplicationTls) {
    let _ = REPLICATION_TLS.set(t);
}

pub(crate) fn replication_tls() -> Option<&'static crate::security::tls::ReplicationTls> {
    REPLICATION_TLS.get()
}

use thiserror::Error;

/// Errors of the data plane, each with a stable code for the API.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("no volume named {name} on this node")]
    NotFound { name: String },
    #[error("volume {name} is not primary on this node")]
    NotPrimary { name: String },
    #[error("volume {name} has no replica on node {node}")]
    NoSuchReplica { name: String, node: String },
    #[error("volume {name}: {node} is not in split brain")]
    NotSplitBrain { name: String, node: String },
    #[error("volume {name}: {reason}")]
    Refused { name: String, reason: String },
    #[error("volume {name}: an online verify is already running")]
    VerifyRunning { name: String },
    #[error("volume {name}: I/O error: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl VolumeError {
    /// The stable error code (documented in docs/errors.md).
    pub fn code(&self) -> &'static str {
        match self {
            VolumeError::NotFound { .. } => "TND-1400",
            VolumeError::NotPrimary { .. } => "TND-1401",
            VolumeError::NoSuchReplica { .. } => "TND-1402",
            VolumeError::NotSplitBrain { .. } => "TND-1403",
            VolumeError::Refused { .. } => "TND-1404",
            VolumeError::VerifyRunning { .. } => "TND-1405",
            VolumeError::Io { .. } => "TND-1406",
        }
    }
}
