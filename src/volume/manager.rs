//! The node's data plane: one engine per volume replica placed on this node,
//! kept in line with the replicated state (created, promoted, demoted,
//! connected to its peers). The executor promotes and demotes; the API reads
//! status and starts verify and resolve here.

use tandem_http_api::types::{LocalVolumeStatus, VerifyReport};

use super::VolumeError;

/// Every volume replica on this node.
#[derive(Default)]
pub struct VolumeManager {}

impl VolumeManager {
    /// What this node knows about `name` (the whole picture on the primary).
    pub fn status(&self, name: &str) -> Result<LocalVolumeStatus, VolumeError> {
        Err(VolumeError::NotFound { name: name.to_string() })
    }

    /// Starts an online verify on the primary; returns the report so far.
    pub async fn verify(&self, name: &str) -> Result<VerifyReport, VolumeError> {
        Err(VolumeError::NotFound { name: name.to_string() })
    }

    /// After a split brain: throws away the changes of `discard` (a node
    /// name), which then resyncs from the other side.
    pub async fn resolve(&self, name: &str, discard: &str) -> Result<(), VolumeError> {
        let _ = discard;
        Err(VolumeError::NotFound { name: name.to_string() })
    }
}
