//! The README's main command: `tandem demo` forms a 3-node cluster of real
//! agent processes and stops them all on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Six consecutive ports: each node's API (TCP and UDP) and, next to it,
/// its volume replication port (TCP).
fn free_base() -> u16 {
    for _ in 0..200 {
        let base = free_port();
        let ok = std::net::TcpListener::bind(("127.0.0.1", base + 80)).is_ok()
            && (1..6u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
            && [2u16, 4].iter().all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no six consecutive free ports");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_forms_a_cluster_and_stops_cleanly_on_ctrl_c() {
    let base = free_base();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let mut child = Command::new(BIN)
        .args(["demo", "--base-port", &base.to_string(), "--dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.contains("Ctrl-C stops the cluster");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines.is_finished() {
        assert!(Instant::now() < deadline, "demo did not print its banner");
        assert!(child.try_wait().unwrap().is_none(), "demo exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let banner = lines.join().unwrap().join("\n");
    for i in 0..3 {
        assert!(banner.contains(&format!("http://127.0.0.1:{}", base + 2 * i)), "{banner}");
    }
    assert!(banner.contains("curl"), "{banner}");

    // The cluster is real: three voters, each its own process.
    let (st, cluster) = get(&format!("http://127.0.0.1:{}/v1/cluster", base + 2)).await;
    assert_eq!(st, 200);
    assert_eq!(voters(&cluster).len(), 3);
    let pids: Vec<u32> =
        cluster["members"].as_array().unwrap().iter().map(|m| m["pid"].as_u64().unwrap() as u32).collect();
    assert!(pids.iter().all(|p| alive(*p)) && pids.iter().all(|p| *p != child.id()));

    // The example group serves HTTP from node1.
    let (st, g) = get(&format!("http://127.0.0.1:{}/v1/groups/web", base)).await;
    assert_eq!(
        (st, g["state"].clone(), g["node"].clone()),
        (200, serde_json::json!("running"), serde_json::json!("node1")),
        "{g}"
    );
    let url = format!("http://127.0.0.1:{}/", base + 80);
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&url).await {
            body = r.text().await.unwrap_or_default();
            if body.contains("hello from node1") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.contains("hello from node1"), "example service: {body:?}");

    // Its volume is exported by node1, and the printed qemu-io command works.
    let line = banner.lines().find(|l| l.trim_start().starts_with("qemu-io")).expect("a qemu-io line");
    let uri = line.split('\'').nth(1).expect("a quoted NBD URI");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"])
        .output()
        .expect("qemu-io (apt-get install qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("read 1048576/1048576") && !text.contains("fail"), "{text}");
    let (st, v) = get(&format!("http://127.0.0.1:{}/v1/volumes/data", base + 4)).await;
    assert_eq!((st, v["primary"].clone()), (200, serde_json::json!("node1")), "{v}");

    // Ctrl-C reaches the demo only (the agents are in their own process
    // group); it must stop them and remove its data directory.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit status {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "agents still running after the demo stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!data.exists(), "the demo removes its data unless --keep");
}
