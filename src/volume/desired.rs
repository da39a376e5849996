//! Which volume replicas this node should hold, read from the replicated
//! state: every volume of a group whose replica nodes (the head of its
//! `nodes` list) include this node, with its peers' replication addresses.
//! Pure: no I/O.

use std::net::{IpAddr, SocketAddr};

use tandem_raft::group::replica_nodes;
use tandem_raft::state::ClusterState;
use tandem_raft::volume::ResyncMode;

use super::engine::{PeerConfig, ResyncPolicy, VolumeConfig};
use super::generation::initial_generation;
use super::manager::DesiredVolume;

/// Bytes an async peer may lag (unacknowledged) before it goes `Ahead`.
pub const ASYNC_BUFFER: u64 = 64 << 20;

/// The replication port of a node whose API listens on `port`.
pub fn replication_port(port: u16) -> u16 {
    port.wrapping_add(1)
}

/// The volume replicas `me` should hold.
pub fn desired_volumes(state: &ClusterState, me: &str) -> Vec<DesiredVolume> {
    let cluster = state.cluster_id.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (group, g) in &state.groups {
        let Some((r, v)) = g.spec.volume() else { continue };
        let replicas = replica_nodes(&g.spec);
        if !replicas.iter().any(|n| n == me) {
            continue;
        }
        let peers = replicas
            .iter()
            .filter(|n| n.as_str() != me)
            .map(|n| {
                let addrs = state
                    .nodes
                    .values()
                    .find(|rec| &rec.name == n)
                    .map(|rec| {
                        rec.addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok())
                            .map(|ip| SocketAddr::new(ip, replication_port(rec.port)))
                            .collect()
                    })
                    .unwrap_or_default();
                PeerConfig { node: n.clone(), mode: v.mode_for(n), addrs }
            })
            .collect();
        let volume_id = format!("{cluster}/{group}/{}", r.name);
        out.push(DesiredVolume {
            config: VolumeConfig {
                name: r.name.clone(),
                // Once a primary recorded a replica, the volume holds data: a
                // replica found without files (a lost or swapped disk) is
                // created empty and fully synced, never as the shared first
                // generation (which would make it UpToDate with nothing).
                initial: if g.volumes_in_service.contains(&r.name) { 0 } else { initial_generation(&volume_id) },
                volume_id,
                node: me.to_string(),
                size: v.size_bytes(),
                granule: v.granularity_bytes() as u32,
                peers,
                split_brain: v.split_brain,
                rate: v.rate_bytes(),
                async_buffer: ASYNC_BUFFER,
                async_failover: v.async_failover,
                replaced: g.replaced(&r.name, me),
                forced_epoch: g.forced_promotions.get(&r.name).copied().unwrap_or(0),
                read_balancing: v.read_balancing,
                resync: match v.resync.mode {
                    ResyncMode::Fixed => ResyncPolicy::Fixed,
                    ResyncMode::Adaptive => ResyncPolicy::Adaptive { min_rate: v.resync_min_rate() },
                },
            },
            nbd_tcp: v.nbd_tcp,
        });
    }
    out
}
