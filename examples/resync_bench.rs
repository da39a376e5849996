//! The resync's cost to the application, and its time, per resync policy:
//! a volume with one sync secondary on loopback; the secondary's agent
//! stops, DIRTY MiB are written sequentially (on a 2 GiB volume), it comes back, and while it
//! resyncs fio's nbd engine keeps a steady random-write load on the
//! primary (4 KiB, QD4, at IOPS a second). Per policy, the application's
//! write p50/p99 with no resync (in sync, the same load), during the
//! resync (the first SECONDS of it), and the resync's time from the
//! secondary's restart to in sync, under that load all along; then the
//! same resync with no application writes.
//!
//!     cargo run --release --example resync_bench [-- DIRTY_MIB [SECONDS [IOPS]]]
//!
//! tandem's replicas run in this process (real files, real TCP on
//! loopback, the real NBD server), as in `volume_bench`. Needs fio
//! (apt-get install fio).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::volume::engine::{PeerConfig, ResyncPolicy, VolumeConfig};
use tandem::volume::generation::initial_generation;
use tandem::volume::manager::{DesiredVolume, VolumeManager};
use tandem_raft::volume::{ReadBalancing, ReplicationMode, SplitBrainPolicy, DEFAULT_RESYNC_MIN_RATE};
use tandem_testkit::bench::{fio_nbd_with, FioResult};
use tandem_testkit::free_port;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2 << 30;
/// Where the application's load writes: far from the resynced range's
/// start, so both touch the disk as they would on a real volume.
const LOAD_SPAN: u64 = 1 << 30;

#[path = "common/replicas.rs"]
mod replicas;
use replicas::{NoControl, Node};

struct Run {
    label: String,
    rate: Option<u64>,
    policy: ResyncPolicy,
}

fn desired(nodes: &[Node], me: usize, tag: &str, run: &Run) -> DesiredVolume {
    let other = &nodes[1 - me];
    DesiredVolume {
        config: VolumeConfig {
            name: "bench".into(),
            volume_id: format!("bench/{tag}"),
            node: nodes[me].name.clone(),
            size: SIZE,
            granule: 4096,
            peers: vec![PeerConfig { node: other.name.clone(), mode: ReplicationMode::Sync, addrs: vec![other.addr] }],
            split_brain: SplitBrainPolicy::Disconnect,
            rate: run.rate,
            async_buffer: 64 * MIB,
            async_failover: false,
            initial: initial_generation(&format!("bench/{tag}")),
            replaced: 0,
            forced_epoch: 0,
            read_balancing: ReadBalancing::PreferLocal,
            resync: run.policy,
        },
        nbd_tcp: false,
    }
}

/// The steady load: 4 KiB random writes at QD4, `iops` a second, over
/// [`LOAD_SPAN`] from the volume's middle.
fn load(uri: &str, seconds: u64, iops: u64) -> FioResult {
    let (rate, offset) = (format!("--rate_iops={iops}"), format!("--offset={}", SIZE / 2));
    fio_nbd_with("load", uri, "randwrite", "4k", 4, LOAD_SPAN, seconds, &[&rate, &offset])
}

/// The secondary away: `dirty` bytes written sequentially from offset 0.
fn dirty(uri: &str, dirty: u64) {
    let out = Command::new("fio")
        .args([
            "--name=dirty",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={dirty}"),
        ])
        .output()
        .expect("fio (apt-get install fio)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

struct Measured {
    idle: FioResult,
    during: FioResult,
    resync: Duration,
    /// Whether the resync outlasted the measured window (else `during`
    /// includes time without one).
    covered: bool,
    /// The same resync with no application writes.
    alone: Duration,
}

async fn run_one(dir: &Path, run: &Run, dirty_bytes: u64, seconds: u64, iops: u64) -> Measured {
    let tag = run.label.replace([' ', '/', ','], "-");
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        let d = dir.join(format!("{tag}-{name}"));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mgr = VolumeManager::default();
        mgr.start(&d, &[addr], Arc::new(NoControl)).await.unwrap();
        nodes.push(Node { name: name.into(), dir: d, addr, mgr });
    }
    for i in 0..2 {
        nodes[i].mgr.reconcile(vec![desired(&nodes, i, &tag, run)]).await;
    }
    let uri = match nodes[0].mgr.promote("bench", 1, false, &nodes[0].dir.join("nbd.sock")).await {
        Ok(uri) => uri,
        Err(e) => panic!("promote: {e:?} (is there room for two {} GiB replicas in /var/tmp?)", SIZE >> 30),
    };
    let uri = uri.split_whitespace().next().unwrap().to_string();
    let v = nodes[0].mgr.volume("bench").await.unwrap();
    let in_sync = || v.peer_in_sync("n2") && v.out_of_sync("n2") == 0;
    while !in_sync() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // No resync: the same load with the secondary in sync.
    let u = uri.clone();
    let idle = tokio::task::spawn_blocking(move || load(&u, seconds, iops)).await.unwrap();

    // Away: the secondary's manager stops, the primary writes.
    nodes[1].mgr.shutdown().await;
    let u = uri.clone();
    tokio::task::spawn_blocking(move || dirty(&u, dirty_bytes)).await.unwrap();
    assert!(v.out_of_sync("n2") >= dirty_bytes, "the bitmap holds what was written while away");
    let _ = Command::new("sync").status();

    // Back, under load: the first fio job is the measurement; more keep the
    // load on until the resync ends.
    let started = Instant::now();
    let (d, addr) = (nodes[1].dir.clone(), nodes[1].addr);
    nodes[1].mgr.start(&d, &[addr], Arc::new(NoControl)).await.unwrap();
    nodes[1].mgr.reconcile(vec![desired(&nodes, 1, &tag, run)]).await;
    let done = Arc::new(AtomicBool::new(false));
    let loader = {
        let (u, done) = (uri.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let first = load(&u, seconds, iops);
            while !done.load(Ordering::SeqCst) {
                load(&u, 1, iops);
            }
            first
        })
    };
    let mut samples = 0u64;
    while !in_sync() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        samples += 1;
        if samples.is_multiple_of(100) {
            if let Some(p) = v.status(None).replicas.iter().find_map(|r| r.resync.clone()) {
                eprintln!(
                    "  {:<22} {:>5.1} s: {:>6.0} MiB left, {:>4.0} MiB/s, target {}",
                    run.label,
                    started.elapsed().as_secs_f64(),
                    p.remaining_bytes as f64 / MIB as f64,
                    p.rate_bytes_per_s as f64 / MIB as f64,
                    p.target_rate_bytes_per_s.map_or("-".into(), |t| format!("{:.0} MiB/s", t as f64 / MIB as f64))
                );
            }
        }
    }
    let resync = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let during = loader.await.unwrap();
    // The first job ran its 1 s ramp and `seconds` from the restart on.
    let covered = resync.as_secs_f64() >= (seconds + 1) as f64;

    // Again with no application writes: the resync alone.
    nodes[1].mgr.shutdown().await;
    let u = uri.clone();
    tokio::task::spawn_blocking(move || dirty(&u, dirty_bytes)).await.unwrap();
    let _ = Command::new("sync").status();
    let started = Instant::now();
    nodes[1].mgr.start(&d, &[addr], Arc::new(NoControl)).await.unwrap();
    nodes[1].mgr.reconcile(vec![desired(&nodes, 1, &tag, run)]).await;
    while !in_sync() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let alone = started.elapsed();
    for n in &nodes {
        n.mgr.shutdown().await;
        // The next run needs the space (the disk is shared).
        let _ = std::fs::remove_dir_all(&n.dir);
    }
    Measured { idle, during, resync, covered, alone }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, default: u64| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (dirty_mib, seconds, iops) = (arg(1, 1024), arg(2, 5), arg(3, 1000));
    let tmp = tempfile::Builder::new().prefix("tandem-resyncbench").tempdir_in("/var/tmp").unwrap();
    let runs = [
        Run { label: "fixed, no rate".into(), rate: None, policy: ResyncPolicy::Fixed },
        Run { label: "fixed, 100 MiB/s".into(), rate: Some(100 * MIB), policy: ResyncPolicy::Fixed },
        Run {
            label: "adaptive".into(),
            rate: None,
            policy: ResyncPolicy::Adaptive { min_rate: DEFAULT_RESYNC_MIN_RATE },
        },
    ];
    let only = std::env::var("RESYNC_BENCH_ONLY").ok();
    let mut rows = Vec::new();
    for run in runs.iter().filter(|r| only.as_deref().is_none_or(|o| r.label.contains(o))) {
        let m = run_one(tmp.path(), run, dirty_mib * MIB, seconds, iops).await;
        eprintln!(
            "{:<18} idle p50 {:>6.0} p99 {:>6.0} µs | resync p50 {:>6.0} p99 {:>6.0} µs ({:.0} IOPS) | resync {:.2} s{}, alone {:.2} s",
            run.label,
            m.idle.p50_us,
            m.idle.p99_us,
            m.during.p50_us,
            m.during.p99_us,
            m.during.iops,
            m.resync.as_secs_f64(),
            if m.covered { "" } else { " (shorter than the window)" },
            m.alone.as_secs_f64()
        );
        rows.push((run, m));
    }
    println!(
        "\n## Resync under load ({dirty_mib} MiB resynced, fio randwrite 4 KiB QD4 at {iops} IOPS, {seconds} s after 1 s ramp)\n"
    );
    println!("| policy | no resync p50 / p99 µs | during resync p50 / p99 µs | p99 ratio | IOPS during | resync time | resync rate | resync time, no application |");
    println!("|---|---|---|---|---|---|---|---|");
    for (run, m) in &rows {
        println!(
            "| {} | {:.0} / {:.0} | {:.0} / {:.0}{} | {:.1}× | {:.0} | {:.2} s | {:.0} MiB/s | {:.2} s |",
            run.label,
            m.idle.p50_us,
            m.idle.p99_us,
            m.during.p50_us,
            m.during.p99_us,
            if m.covered { "" } else { " (†)" },
            m.during.p99_us / m.idle.p99_us.max(1.0),
            m.during.iops,
            m.resync.as_secs_f64(),
            dirty_mib as f64 / m.resync.as_secs_f64(),
            m.alone.as_secs_f64()
        );
    }
}
