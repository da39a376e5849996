//! PostgreSQL on a replicated volume, as the tests, the chaos runs and the
//! benchmarks define it: a group of `volume` -> `filesystem` -> PostgreSQL
//! (a `process` resource running as `postgres`) -> `vip`. One definition,
//! so that every test and benchmark measures the same thing.

use serde_json::{json, Value};

/// Debian's PostgreSQL binaries (package `postgresql`, version 15).
pub const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The port PostgreSQL listens on, on the group's virtual IP.
pub const PORT: u16 = 5432;

/// The shell the PostgreSQL resource runs: the first start creates the
/// data directory (initdb into a temporary directory, renamed once complete,
/// so that a crash in the middle never leaves a half-made cluster that
/// looks ready; the line added to pg_hba.conf and the rename are synced,
/// as initdb syncs its own files: a power loss right after the first start
/// otherwise lost that line), then `exec`s the postmaster, whose process group the agent
/// supervises. The lock files (`postmaster.pid`, and the socket's, both on
/// the volume) left by a postmaster that died with its node are removed
/// first when their PID is no live postgres here: PostgreSQL refuses to
/// start while that PID is alive, and after a failover it names
/// a process of another machine (here the dead node's zombie, or any
/// process that has that PID now), which gave up the group after its
/// restarts. A live postmaster on this data directory keeps its file (and
/// the shared memory interlock stays in any case). `trusted` is the network whose clients may connect without a
/// password (tests only).
pub fn start_script(mountpoint: &str, trusted: &str) -> String {
    format!(
        "set -e; D={mountpoint}/data; \
         if [ ! -s $D/PG_VERSION ]; then \
           rm -rf $D.init; \
           {BIN}/initdb -D $D.init --auth=trust --username=postgres --no-instructions >/dev/null; \
           echo 'host all all {trusted} trust' >> $D.init/pg_hba.conf; \
           sync $D.init/pg_hba.conf; \
           mv $D.init $D; \
           sync {mountpoint}; \
         fi; \
         for P in $D/postmaster.pid {mountpoint}/.s.PGSQL.{PORT}.lock; do \
           if [ -f $P ] && ! grep -qa postgres /proc/$(head -n 1 $P)/cmdline 2>/dev/null; then rm -f $P; fi; \
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
             "stop_timeout_ms": 30000},
            {"name": "ip", "type": "vip", "address": vip_cidr, "interface": interface}
        ],
        "nodes": nodes,
    })
}
