//! PostgreSQL on a replicated volume, end to end, as a bank: three hosts in
//! network namespaces, the PostgreSQL group on n1 and n2
//! (`tandem_testkit::postgres`), bank clients in a namespace of their own
//! moving money through the group's virtual IP, power loss of the
//! primary's node. The group must come back on n2 and the bank checker
//! must pass over the whole history: no read with another total, no
//! negative balance, every acknowledged COMMIT present, nothing unknown.
//! The failover time the clients saw is printed, not asserted. Needs root
//! and PostgreSQL 15; skipped (saying why) otherwise.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tandem_testkit::bank::{self, check, Clients, Config, Shared};
use tandem_testkit::{is_root, postgres, Net};

fn can_run() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, mounts, loop devices)");
        return false;
    }
    let postmaster = std::path::Path::new(postgres::BIN).join("postgres");
    if !postmaster.exists() {
        eprintln!("skipped: no PostgreSQL at {} (apt-get install postgresql)", postmaster.display());
        return false;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse (the filesystem resource needs nbdfuse here)");
        return false;
    }
    true
}

/// Runs `f` in the client's namespace, from async code.
async fn in_client<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let ns = ns.to_string();
    tokio::task::spawn_blocking(move || bank::block_on_in(Some(ns), f)).await.unwrap().unwrap()
}

/// Dropped before the cluster: on a failure prints PostgreSQL's own log
/// on each node (the agents' logs say only that it exited), and in any
/// case kills what runs in the hosts' namespaces (PostgreSQL's backends
/// left the agents' sessions: killing an agent's session misses them).
struct Hosts {
    dir: std::path::PathBuf,
    namespaces: Vec<String>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in ["n1", "n2"] {
                let log = std::fs::read_to_string(self.dir.join(n).join("groups").join("pg").join("db.log"));
                let log = log.unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("---- PostgreSQL on {n} ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for ns in &self.namespaces {
            tandem_testkit::kill_netns(ns);
        }
    }
}

fn commits(history: &[bank::Op]) -> usize {
    history.iter().filter(|o| matches!(o, bank::Op::Transfer { outcome: bank::Outcome::Ok, .. })).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bank_keeps_every_committed_transfer_across_power_loss_of_the_primary() {
    if !can_run() {
        return;
    }
    let mut net = Net::new();
    let mut c = Cluster::configure(&[], Opts::default());
    for i in 1..=3u8 {
        let (ns, addr) = net.host(i);
        c.add_host(&format!("n{i}"), "", &addr, Some(ns));
    }
    let mut c = c.form().await;
    let _hosts =
        Hosts { dir: c.tmp.path().to_path_buf(), namespaces: c.nodes.iter().filter_map(|n| n.netns.clone()).collect() };
    let (client_ns, _) = net.host(9);
    // PostgreSQL runs as `postgres`: it must reach its mount point.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(c.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mnt = c.tmp.path().join("pg");
    std::fs::create_dir_all(&mnt).unwrap();
    let vip = format!("{}.100", net.prefix);
    let group = postgres::group_definition(
        &["n1", "n2"],
        &format!("{vip}/24"),
        "eth0",
        mnt.to_str().unwrap(),
        "128MiB",
        "sync",
    );
    let url = format!("{}/v1/groups/pg", c.node("n2").url());
    let (st, v) = put(&url, group).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(40), "PostgreSQL running on n1", || async {
        let g = get(&url).await.1;
        g["node"] == "n1" && g["state"] == "running"
    })
    .await;

    let cfg = Config::new(bank::target(&vip, postgres::PORT).unwrap());
    let setup_cfg = cfg.clone();
    let initial = in_client(&client_ns, move || async move {
        bank::setup(&setup_cfg, Instant::now() + Duration::from_secs(20)).await
    })
    .await;
    let shared = Shared::new(Instant::now());
    let clients = Clients::start(cfg.clone(), Some(client_ns.clone()), shared.clone(), 12);
    wait_until(Duration::from_secs(10), "transfers committed on n1", || async { commits(&shared.history()) >= 20 })
        .await;

    // Power loss of n1: its agent, PostgreSQL and the rest die at once, its
    // link goes dark (a dead host answers no ARP for the address it had).
    let kill_ms = shared.t0.elapsed().as_millis() as u64;
    c.node_mut("n1").kill();
    net.set_link(1, false);
    wait_until(Duration::from_secs(30), "a transfer committed after the power loss", || async {
        check::first_commit_after(&shared.history(), kill_ms).is_some()
    })
    .await;
    // The node asked may not know the new leader yet (it forwards to the
    // dead one: 503 TND-1204 until it does).
    wait_until(Duration::from_secs(10), "the group placed on n2, as the cluster says", || async {
        get(&url).await.1["node"] == "n2"
    })
    .await;
    let after = commits(&shared.history());
    wait_until(Duration::from_secs(10), "more transfers committed on n2", || async {
        commits(&shared.history()) >= after + 20
    })
    .await;
    tokio::task::spawn_blocking(move || clients.stop()).await.unwrap().unwrap();

    let read_cfg = cfg.clone();
    let last = in_client(&client_ns, move || async move {
        bank::read_state(&read_cfg, Instant::now() + Duration::from_secs(20)).await
    })
    .await;
    let history = shared.history();
    let violations = check::check(&initial, &history, &last);
    let n = check::counts(&history, &last);
    eprintln!(
        "bank: {} committed, {} declined, {} failed, {} unknown ({} made), {} reads; client-seen failover \
         (power loss -> first transfer begun after it committed): {} ms, longest time without a commit: {} ms \
         (figures, not assertions)",
        n.ok,
        n.declined,
        n.failed,
        n.unknown,
        n.unknown_present,
        n.reads,
        check::first_commit_after(&history, kill_ms).unwrap_or(0),
        check::longest_gap(&history, kill_ms, u64::MAX).unwrap_or(0),
    );
    assert!(violations.is_empty(), "the bank checker found:\n{}", {
        let lines: Vec<String> = violations.iter().take(20).map(|v| v.to_string()).collect();
        lines.join("\n")
    });
    assert_eq!(last.transfers.len(), n.ok + n.unknown_present);
}
