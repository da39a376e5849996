//! PostgreSQL on a replicated volume, as the tests, the chaos runs and the
//! benchmarks define it: a group of `volume` -> `filesystem` -> PostgreSQL
//! (a `process` resource running as `postgres`) -> `vip`. One definition,
//! so that every test and benchmark measures the same thing.

use serde_json::{json, Value};

/// Debian's PostgreSQL binaries (package `postgresql`, version 15).
pub const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The port PostgreSQL listens on, on the group's virtual IP.
pub const PORT: u16 = 5432;

/// The shell the PostgreSQL resource runs.
///
/// Nothing starts unless the volume's file system is mounted: the bare
/// mount point directory would get a new, empty database (seen once, when
/// a start found the mount of a stop still under way, which then unmounted
/// it under the database).
///
/// The first start creates the data directory: initdb into a temporary
/// directory, renamed once complete, so that a crash in the middle never
/// leaves a half-made cluster that looks ready. The line added to
/// pg_hba.conf and the rename are synced, as initdb syncs its own files (a
/// power loss right after the first start lost that line).
///
/// Lock files (`postmaster.pid`, and the socket's, both on the volume)
/// whose PID is no live postgres of this host (its network namespace, for
/// nodes that share a machine) are removed: after a failover they name the
/// old node's postmaster (elsewhere whatever process has that PID now;
/// here its zombie, or the old node's postmaster still being killed, on a
/// file system that can no longer reach any replica), and PostgreSQL
/// refused to start until the group was given up. A live postmaster of
/// this host keeps its files, and PostgreSQL's shared memory interlock
/// stays in any case.
///
/// Then it `exec`s the postmaster, whose process group the agent
/// supervises.
///
/// `trusted` is the network whose clients may connect without a password
/// (tests only).
pub fn start_script(mountpoint: &str, trusted: &str) -> String {
    format!(
        "set -e; D={mountpoint}/data; \
         if ! mountpoint -q {mountpoint}; then echo '{mountpoint} is not mounted: not starting' >&2; exit 1; fi; \
         if [ ! -s $D/PG_VERSION ]; then \
           rm -rf $D.init; \
           {BIN}/initdb -D $D.init --auth=trust --username=postgres --no-instructions >/dev/null; \
           echo 'host all all {trusted} trust' >> $D.init/pg_hba.conf; \
           sync $D.init/pg_hba.conf; \
           mv $D.init $D; \
           sync {mountpoint}; \
         fi; \
         for P in $D/postmaster.pid {mountpoint}/.s.PGSQL.{PORT}.lock; do \
           [ -f $P ] || continue; Q=/proc/$(head -n 1 $P); \
           if grep -qa postgres $Q/cmdline 2>/dev/null \
              && [ \"$(readlink $Q/ns/net)\" = \"$(readlink /proc/self/ns/net)\" ]; then continue; fi; \
           rm -f $P; \
         done; \
         exec {BIN}/postgres -D $D -p {PORT} -c listen_addresses='*' -c unix_socket_directories={mountpoint}"
    )
}

/// The group: `nodes` in preference order (the volume's replicas are the
/// first two), the volume `size` (e.g. "512MiB") in `mode` ("sync" or
/// "async"), PostgreSQL on `mountpoint`, clients at `vip_cidr` on
/// `interface`.
pub fn group_definition(
    nodes: &[&str],
    vip_cidr: &str,
    interface: &str,
    mountpoint: &str,
    size: &str,
    mode: &str,
) -> Value {
    json!({
        "resources": [
            {"name": "data", "type": "volume", "size": size, "mode": mode, "replicas": nodes.len().min(2)},
            {"name": "fs", "type": "filesystem", "volume": "data", "mountpoint": mountpoint,
             "fstype": "ext4", "options": "noatime", "mkfs": true, "owner": "postgres",
             "start_timeout_ms": 60000},
            {"name": "db", "type": "process", "user": "postgres",
             "command": ["/bin/sh", "-c", start_script(mountpoint, "0.0.0.0/0")],
             // SIGTERM is PostgreSQL's smart shutdown: it waits for every
             // client to disconnect (with the bank's clients connected,
             // every stop ran into the stop timeout). SIGINT is the fast one.
             "stop_signal": "SIGINT", "stop_timeout_ms": 30000},
            {"name": "ip", "type": "vip", "address": vip_cidr, "interface": interface}
        ],
        "nodes": nodes,
        // A fault that fails the group on a node (its VIP's interface
        // down) must not keep it off that node for good.
        "failure_timeout_ms": 10000,
    })
}
