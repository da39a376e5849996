//! The primary's read balancing, measured: fio's nbd engine, 4 KiB random
//! reads at QD32, against a volume with one sync secondary on loopback,
//! under each `read_balancing` policy — on the primary's normal disk, then
//! with that disk slowed (its backing file a FUSE file, nbdfuse, over
//! `nbdkit --filter=delay file … rdelay=…`).
//!
//!     cargo run --release --example read_bench [-- SECONDS_PER_JOB [RDELAY]]
//!
//! Needs root (the FUSE mount), fio, nbdkit and nbdfuse (apt-get install
//! fio nbdkit libnbd-bin).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::volume::engine::{PeerConfig, VolumeConfig};
use tandem::volume::generation::initial_generation;
use tandem::volume::manager::{DesiredVolume, VolumeManager};
use tandem_raft::volume::{ReadBalancing, ReplicationMode, SplitBrainPolicy};
use tandem_testkit::free_port;

const SIZE: u64 = 1 << 30;

#[path = "common/replicas.rs"]
mod replicas;
use replicas::{NoControl, Node};

fn config(nodes: &[Node], me: usize) -> DesiredVolume {
    let peers = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(_, n)| PeerConfig { node: n.name.clone(), mode: ReplicationMode::Sync, addrs: vec![n.addr] })
        .collect();
    DesiredVolume {
        config: VolumeConfig {
            name: "bench".into(),
            volume_id: "bench/reads".into(),
            node: nodes[me].name.clone(),
            size: SIZE,
            granule: 4096,
            peers,
            split_brain: SplitBrainPolicy::Disconnect,
            rate: None,
            async_buffer: 64 << 20,
            async_failover: false,
            initial: initial_generation("bench/reads"),
            replaced: 0,
            forced_epoch: 0,
            read_balancing: ReadBalancing::PreferLocal,
            resync: Default::default(),
        },
        nbd_tcp: false,
    }
}

async fn promote(nodes: &[Node], epoch: u64) -> String {
    let uri = nodes[0].mgr.promote("bench", epoch, false, &nodes[0].dir.join("nbd.sock")).await.unwrap();
    let v = nodes[0].mgr.volume("bench").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(v.peer_in_sync("n2") && v.out_of_sync("n2") == 0) {
        assert!(Instant::now() < deadline, "n2 never in sync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    uri.split_whitespace().next().unwrap().to_string()
}

struct Fio {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fio(uri: &str, seconds: u64) -> Fio {
    let r = tandem_testkit::bench::fio_nbd("reads", uri, "randread", "4k", 32, SIZE, seconds);
    Fio { iops: r.iops, p50_us: r.p50_us, p99_us: r.p99_us }
}

/// nbdkit + nbdfuse: the FUSE file `<dir>/disk/nbd`.
struct Fuse(PathBuf, Child, Child);

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = self.2.kill();
        let _ = self.2.wait();
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}

fn slow_disk(dir: &Path, img: &Path, rdelay: &str) -> Fuse {
    let (sock, mnt) = (dir.join("disk.sock"), dir.join("disk"));
    std::fs::create_dir_all(&mnt).unwrap();
    let kit = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=delay", "file"])
        .arg(img)
        .arg(format!("rdelay={rdelay}"))
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let fuse = Command::new("nbdfuse").arg(&mnt).arg("--unix").arg(&sock).spawn().expect("nbdfuse");
    while !mnt.join("nbd").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    Fuse(mnt, kit, fuse)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rdelay = std::env::args().nth(2).unwrap_or_else(|| "2ms".into());
    let tmp = tempfile::Builder::new().prefix("tandem-readbench").tempdir_in("/var/tmp").unwrap();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let name = format!("n{i}");
        let dir = tmp.path().join(&name);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mgr = VolumeManager::default();
        mgr.start(&dir, &[addr], Arc::new(NoControl)).await.unwrap();
        nodes.push(Node { name, dir, addr, mgr });
    }
    for i in 0..2 {
        nodes[i].mgr.reconcile(vec![config(&nodes, i)]).await;
    }
    let policies = [
        ReadBalancing::PreferLocal,
        ReadBalancing::RoundRobin,
        ReadBalancing::LeastPending,
        ReadBalancing::WhenCongestedRemote,
        ReadBalancing::Striping,
    ];
    println!("| local disk | read_balancing | IOPS | p50 µs | p99 µs | reads local / from n2 | IOPS vs prefer-local |");
    println!("|---|---|---|---|---|---|---|");
    let mut fuse = None;
    for (epoch, disk) in [(1, "normal".to_string()), (2, format!("+{rdelay} per read"))] {
        if epoch == 2 {
            // The primary's file moves under a slow FUSE disk.
            nodes[0].mgr.shutdown().await;
            let img = nodes[0].dir.join("real.img");
            std::fs::rename(nodes[0].dir.join("bench.img"), &img).unwrap();
            let f = slow_disk(&nodes[0].dir, &img, &rdelay);
            std::os::unix::fs::symlink(f.0.join("nbd"), nodes[0].dir.join("bench.img")).unwrap();
            fuse = Some(f);
            nodes[0].mgr.start(&nodes[0].dir, &[nodes[0].addr], Arc::new(NoControl)).await.unwrap();
            nodes[0].mgr.reconcile(vec![config(&nodes, 0)]).await;
        }
        let uri = promote(&nodes, epoch).await;
        let v = nodes[0].mgr.volume("bench").await.unwrap();
        let mut base = None;
        for p in policies {
            v.set_read_balancing(p);
            if let Some(f) = &fuse {
                // No page cache carried over from the job before.
                let _ = Command::new("dd")
                    .arg(format!("if={}", f.0.join("nbd").display()))
                    .args(["iflag=nocache", "count=0"])
                    .stderr(Stdio::null())
                    .status();
            }
            let (l0, p0) = (v.read_counters().0, v.peer_reads("n2"));
            let u = uri.clone();
            let r = tokio::task::spawn_blocking(move || fio(&u, seconds)).await.unwrap();
            let (l1, p1) = (v.read_counters().0, v.peer_reads("n2"));
            let name = serde_json::to_value(p).unwrap().as_str().unwrap_or_default().to_string();
            let base_iops = *base.get_or_insert(r.iops);
            println!(
                "| {disk} | {name} | {:.0} | {:.0} | {:.0} | {} / {} | {:.2} |",
                r.iops,
                r.p50_us,
                r.p99_us,
                l1 - l0,
                p1 - p0,
                r.iops / base_iops.max(1e-9)
            );
        }
    }
    for n in &nodes {
        n.mgr.shutdown().await;
    }
    drop(fuse);
}
