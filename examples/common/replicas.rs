//! What the in-process volume benchmarks share: a control plane that
//! records nothing, and one replica's node.

use std::net::SocketAddr;
use std::path::PathBuf;

use tandem::volume::engine::ControlPlane;
use tandem::volume::manager::VolumeManager;
use tandem_raft::volume::DiskState;

/// Accepts every disk-state record (no Raft behind these benchmarks).
pub struct NoControl;

#[async_trait::async_trait]
impl ControlPlane for NoControl {
    async fn record_disk(&self, _: &str, _: &str, _: DiskState, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

/// One replica's node: its manager, data directory and replication address.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub mgr: VolumeManager,
}
