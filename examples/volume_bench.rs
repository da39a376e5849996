//! Data-plane benchmark, side by side in one run: fio's nbd engine against
//! (a) the peers serving the same kind of raw file — `qemu-nbd` and
//! `nbdkit file` —, (b) tandem's export with no replica, (c) with a
//! synchronous secondary on loopback, (d) with an asynchronous one; then a
//! resync of 64 MiB changed on a 4 GiB volume while its secondary was away.
//!
//!     cargo run --release --example volume_bench [-- SECONDS_PER_JOB]
//!
//! tandem's replicas run in this process (real files, real TCP on
//! loopback, the real NBD server), each node on a runtime of its own whose
//! threads carry its name: for the write jobs, the CPU seconds per GiB
//! written are read per node from /proc/self/task (user + system), the
//! primary's and the secondary's apart (a peer's: its whole process). The
//! peers are their Debian programs.
//! Needs qemu-utils, nbdkit, fio (apt-get install qemu-utils nbdkit fio).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::volume::engine::{ControlPlane, PeerConfig, VolumeConfig};
use tandem::volume::generation::initial_generation;
use tandem::volume::manager::{DesiredVolume, VolumeManager};
use tandem_raft::volume::{DiskState, ReplicationMode, SplitBrainPolicy};
use tandem_testkit::free_port;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1 << 30;

struct NoControl;

#[async_trait::async_trait]
impl ControlPlane for NoControl {
    async fn record_disk(&self, _: &str, _: &str, _: DiskState, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
}

const JOBS: [Job; 4] = [
    Job { name: "seq write 1 MiB QD8", rw: "write", bs: "1M", depth: 8 },
    Job { name: "rand write 4 KiB QD1", rw: "randwrite", bs: "4k", depth: 1 },
    Job { name: "rand write 4 KiB QD32", rw: "randwrite", bs: "4k", depth: 32 },
    Job { name: "rand read 4 KiB QD32", rw: "randread", bs: "4k", depth: 32 },
];

#[derive(Debug, Clone, Default)]
struct Result_ {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds per GiB written: primary, then each secondary (tandem only).
    cpu_s_per_gib: Vec<f64>,
}

fn fio(uri: &str, job: Job, seconds: u64) -> Result_ {
    // Every job starts with no dirty pages left by the one before.
    let _ = Command::new("sync").status();
    let r = tandem_testkit::bench::fio_nbd("bench", uri, job.rw, job.bs, job.depth, SIZE, seconds);
    Result_ {
        iops: r.iops,
        mib_s: r.bytes_per_s / MIB as f64,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        cpu_s_per_gib: Vec::new(),
    }
}

fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn raw_file(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
}

struct Peer {
    child: Child,
    uri: String,
}

/// CPU seconds (user + system) process `pid` has spent so far.
fn process_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = if f.len() > 12 { f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0) } else { 0 };
    // SAFETY: sysconf has no memory effects.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// `cache`: `writeback` (the page cache, as tandem and nbdkit use it) or
/// `none` (O_DIRECT with aligned buffers and native AIO: what tandem would
/// gain or lose from skipping the page cache, measured on this disk).
fn qemu_nbd(dir: &Path, cache: &str) -> Peer {
    let (img, sock) = (dir.join(format!("qemu-{cache}.img")), dir.join(format!("qemu-{cache}.sock")));
    raw_file(&img);
    let aio = if cache == "none" { "--aio=native" } else { "--aio=threads" };
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", &format!("--cache={cache}"), aio, "--shared=8", "--persistent", "-k"])
        .arg(&sock)
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (apt-get install qemu-utils)");
    wait_socket(&sock);
    Peer { child, uri: format!("nbd+unix:///?socket={}", sock.display()) }
}

fn nbdkit(dir: &Path) -> Peer {
    let (img, sock) = (dir.join("nbdkit.img"), dir.join("nbdkit.sock"));
    raw_file(&img);
    let child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .arg("file")
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit (apt-get install nbdkit)");
    wait_socket(&sock);
    Peer { child, uri: format!("nbd+unix:///?socket={}", sock.display()) }
}

/// Replica managers on loopback: node 0 primary, the others secondaries.
/// Each node runs on a runtime of its own, as each agent is a process of its
/// own: its threads carry the node's name, so the CPU each node spends is
/// read per thread from /proc (see [`node_cpu_s`]).
struct Tandem {
    nodes: Vec<(String, PathBuf, SocketAddr, Arc<VolumeManager>)>,
    runtimes: Vec<tokio::runtime::Runtime>,
}

/// A runtime for one node: 2 workers (an agent's default on this machine),
/// its blocking threads kept alive so their CPU time stays readable.
fn node_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("node-{name}"))
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .unwrap()
}

/// CPU seconds (user + system) spent so far by the threads named
/// `node-{name}` of this process.
fn node_cpu_s(name: &str) -> f64 {
    let want = format!("node-{name}");
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != want {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" closing comm: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            ticks += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

impl Tandem {
    async fn new(dir: &Path, tag: &str, size: u64, peers: &[ReplicationMode], rate: Option<u64>) -> Tandem {
        let mut nodes = Vec::new();
        let mut runtimes = Vec::new();
        for i in 0..=peers.len() {
            let name = format!("n{}", i + 1);
            let d = dir.join(format!("{tag}-{name}"));
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mgr = Arc::new(VolumeManager::default());
            let rt = node_runtime(&name);
            let (m, dd) = (mgr.clone(), d.clone());
            rt.spawn(async move { m.start(&dd, &[addr], Arc::new(NoControl)).await }).await.unwrap().unwrap();
            nodes.push((name, d, addr, mgr));
            runtimes.push(rt);
        }
        let t = Tandem { nodes, runtimes };
        for i in 0..t.nodes.len() {
            let cfg = t.config(i, tag, size, peers, rate);
            let m = t.nodes[i].3.clone();
            t.runtimes[i]
                .spawn(async move { m.reconcile(vec![DesiredVolume { config: cfg, nbd_tcp: false }]).await })
                .await
                .unwrap();
        }
        t
    }

    /// CPU seconds each node has spent so far.
    fn cpu(&self) -> Vec<f64> {
        self.nodes.iter().map(|n| node_cpu_s(&n.0)).collect()
    }

    fn config(&self, me: usize, tag: &str, size: u64, modes: &[ReplicationMode], rate: Option<u64>) -> VolumeConfig {
        let peers = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(i, n)| PeerConfig { node: n.0.clone(), mode: modes[i.max(1) - 1], addrs: vec![n.2] })
            .collect();
        VolumeConfig {
            name: "bench".into(),
            volume_id: format!("bench/{tag}"),
            node: self.nodes[me].0.clone(),
            size,
            granule: 4096,
            peers,
            split_brain: SplitBrainPolicy::Disconnect,
            rate,
            async_buffer: 64 * MIB,
            async_failover: false,
            initial: initial_generation(&format!("bench/{tag}")),
            replaced: 0,
            forced_epoch: 0,
            read_balancing: tandem_raft::volume::ReadBalancing::PreferLocal,
            // The figures recorded in docs/benchmarks.md were taken before
            // the adaptive resync: the fixed window keeps them comparable.
            resync: tandem::volume::engine::ResyncPolicy::Fixed,
        }
    }

    async fn primary(&self) -> String {
        let sock = self.nodes[0].1.join("nbd.sock");
        let m = self.nodes[0].3.clone();
        let uri =
            self.runtimes[0].spawn(async move { m.promote("bench", 1, false, &sock).await }).await.unwrap().unwrap();
        let v = self.nodes[0].3.volume("bench").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &self.nodes[1..] {
            while !v.peer_in_sync(&n.0) {
                assert!(Instant::now() < deadline, "{} never in sync", n.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        uri.split_whitespace().next().unwrap().to_string()
    }

    async fn stop(self) {
        for (n, rt) in self.nodes.iter().zip(&self.runtimes) {
            let m = n.3.clone();
            rt.spawn(async move { m.shutdown().await }).await.unwrap();
        }
        for rt in self.runtimes {
            rt.shutdown_background();
        }
    }
}

fn row(name: &str, r: &Result_, base: Option<&Result_>) -> String {
    let ratio = base.map(|b| format!("{:.2}", r.iops / b.iops.max(1e-9))).unwrap_or_else(|| "—".into());
    let cpu = |i: usize| r.cpu_s_per_gib.get(i).map(|c| format!("{c:.2}")).unwrap_or_else(|| "—".into());
    format!(
        "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {ratio} | {} | {} |",
        r.iops,
        r.mib_s,
        r.p50_us,
        r.p99_us,
        cpu(0),
        cpu(1)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let tmp = tempfile::Builder::new().prefix("tandem-volbench").tempdir_in("/var/tmp").unwrap();
    let dir = tmp.path().to_path_buf();
    let mut results: BTreeMap<&'static str, Vec<(String, Result_)>> = BTreeMap::new();

    let targets = [
        "qemu-nbd",
        "nbdkit file",
        "tandem, no replica",
        "tandem, sync secondary",
        "tandem, async secondary",
        "qemu-nbd O_DIRECT",
    ];
    // VOLUME_BENCH_ONLY=sync,nbdkit runs only the targets naming one of
    // these; "qemu-nbd O_DIRECT" (--cache=none) runs only when named so.
    let only: Vec<String> =
        std::env::var("VOLUME_BENCH_ONLY").map(|s| s.split(',').map(str::to_string).collect()).unwrap_or_default();
    for target in targets {
        if !only.is_empty() && !only.iter().any(|o| target.contains(o.as_str())) {
            continue;
        }
        if target.contains("O_DIRECT") && !only.iter().any(|o| o.contains("O_DIRECT")) {
            continue;
        }
        let (uri, peer, tandem) = match target {
            "qemu-nbd" => {
                let p = qemu_nbd(&dir, "writeback");
                (p.uri.clone(), Some(p), None)
            }
            "qemu-nbd O_DIRECT" => {
                let p = qemu_nbd(&dir, "none");
                (p.uri.clone(), Some(p), None)
            }
            "nbdkit file" => {
                let p = nbdkit(&dir);
                (p.uri.clone(), Some(p), None)
            }
            _ => {
                let modes: &[ReplicationMode] = match target {
                    "tandem, no replica" => &[],
                    "tandem, sync secondary" => &[ReplicationMode::Sync],
                    _ => &[ReplicationMode::Async],
                };
                let tag = target.replace([',', ' '], "-");
                let t = Tandem::new(&dir, &tag, SIZE, modes, None).await;
                let uri = t.primary().await;
                (uri, None, Some(t))
            }
        };
        for job in JOBS {
            if std::env::var("VOLUME_BENCH_JOB").is_ok_and(|j| !job.name.contains(j.as_str())) {
                continue;
            }
            let u = uri.clone();
            // Per node for tandem; the whole server process for a peer.
            let cpu_now = || match (&tandem, &peer) {
                (Some(t), _) => t.cpu(),
                (None, Some(p)) => vec![process_cpu_s(p.child.id())],
                _ => Vec::new(),
            };
            let before = cpu_now();
            let mut r = tokio::task::spawn_blocking(move || fio(&u, job, seconds)).await.unwrap();
            if job.rw.contains("write") {
                // The CPU of the whole fio run (its 1 s ramp included) per
                // byte written in it (the ramp at the measured rate).
                let gib = r.mib_s * (seconds + 1) as f64 / 1024.0;
                let after = cpu_now();
                r.cpu_s_per_gib = after.iter().zip(&before).map(|(a, b)| (a - b) / gib.max(1e-9)).collect();
            }
            let cpu: Vec<String> = r.cpu_s_per_gib.iter().map(|c| format!("{c:.2}")).collect();
            eprintln!(
                "{target:<24} {:<22} {:>9.0} IOPS {:>7.0} MiB/s p50 {:>6.0} µs p99 {:>6.0} µs CPU s/GiB {} (load {})",
                job.name,
                r.iops,
                r.mib_s,
                r.p50_us,
                r.p99_us,
                cpu.join(" / "),
                std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim_end()
            );
            results.entry(job.name).or_default().push((target.to_string(), r));
        }
        if let Some(mut p) = peer {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if let Some(t) = tandem {
            t.stop().await;
        }
    }

    let resync_only = only.iter().any(|o| o == "resync");
    if (!only.is_empty() && !resync_only) || std::env::var("VOLUME_BENCH_JOB").is_ok() {
        return; // a partial run: no table, no resync
    }
    println!("\n## Data plane (fio nbd engine, {seconds} s per job after 1 s ramp, 1 GiB file/volume, unix socket)\n");
    for job in JOBS.iter().filter(|_| !resync_only) {
        let rows = &results[job.name];
        let peer_best =
            rows[..2].iter().max_by(|a, b| a.1.iops.total_cmp(&b.1.iops)).map(|r| r.1.clone()).unwrap_or_default();
        let ours = rows[2].1.clone();
        println!("### {}\n", job.name);
        println!(
            "| target | IOPS | MiB/s | p50 µs | p99 µs | ratio | CPU s/GiB server or primary | CPU s/GiB secondary |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (i, (name, r)) in rows.iter().enumerate() {
            // Peers and (b) against the faster peer; (c), (d) against (b).
            let base = if i <= 2 { Some(&peer_best) } else { Some(&ours) };
            println!("{}", row(name, r, base));
        }
        println!();
    }

    println!(
        "## Resync after a disconnection (4 GiB volume, 64 MiB of random 4 KiB writes while the secondary was away)\n"
    );
    println!("| configured rate | changed while away | bitmap (out of sync) | resync sent | sent / changed | resync time | achieved rate | restart to in sync |");
    println!("|---|---|---|---|---|---|---|---|");
    for rate in [Some(50 * MIB), None] {
        resync(&dir, rate).await;
    }
}

/// 64 MiB changed (distinct random 4 KiB blocks) while the secondary was
/// away, on a 4 GiB volume; then it comes back and is resynced.
async fn resync(dir: &Path, rate: Option<u64>) {
    let tag = format!("resync-{}", rate.unwrap_or(0) / MIB);
    let t = Tandem::new(dir, &tag, 4 << 30, &[ReplicationMode::Sync], rate).await;
    let uri = t.primary().await;
    let m = t.nodes[1].3.clone();
    t.runtimes[1].spawn(async move { m.shutdown().await }).await.unwrap();
    let u = uri.clone();
    let changed = tokio::task::spawn_blocking(move || {
        let out = Command::new("fio")
            .args([
                "--name=dirty",
                "--ioengine=nbd",
                &format!("--uri={u}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=4G",
                "--io_size=64M",
                "--randrepeat=1",
                "--norandommap=0",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        64 * MIB
    })
    .await
    .unwrap();
    let v = t.nodes[0].3.volume("bench").await.unwrap();
    let dirty = v.out_of_sync("n2");
    let (d, addr) = (t.nodes[1].1.clone(), t.nodes[1].2);
    let started = Instant::now();
    let cfg = t.config(1, &tag, 4 << 30, &[ReplicationMode::Sync], rate);
    let m = t.nodes[1].3.clone();
    t.runtimes[1]
        .spawn(async move {
            m.start(&d, &[addr], Arc::new(NoControl)).await.unwrap();
            m.reconcile(vec![DesiredVolume { config: cfg, nbd_tcp: false }]).await;
        })
        .await
        .unwrap();
    while !(v.peer_in_sync("n2") && v.out_of_sync("n2") == 0) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = started.elapsed();
    let (sent, took) = v.last_resync("n2").unwrap_or((v.resync_bytes_sent("n2"), total));
    println!(
        "| {} | {} MiB | {:.1} MiB | {:.1} MiB | {:.2} | {:.2} s | {:.0} MiB/s | {:.2} s |",
        rate.map(|r| format!("{} MiB/s", r / MIB)).unwrap_or_else(|| "unlimited".into()),
        changed / MIB,
        dirty as f64 / MIB as f64,
        sent as f64 / MIB as f64,
        sent as f64 / changed as f64,
        took.as_secs_f64(),
        sent as f64 / MIB as f64 / took.as_secs_f64(),
        total.as_secs_f64()
    );
    t.stop().await;
}
