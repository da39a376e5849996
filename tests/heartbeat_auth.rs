//! Authenticated heartbeats against a real 3-node cluster: datagrams forged
//! or replayed over real UDP in the name of a killed node change nothing —
//! it stays offline, its group fails over as usual and stays put, and the
//! receivers count (and log, sparingly) what they dropped. The heartbeat
//! key, read from the killed node's disk, shows in no view and no log.
//! Capturing the node's real datagrams needs a raw socket (root; CI runs as
//! root): without it the replay half is skipped, the forged half runs.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tandem_testkit::is_root;

/// Copies of the UDP payloads sent from `src_port` to `dst_port` on this
/// host during `dur`, read from a raw socket (every UDP datagram the host
/// receives, loopback included).
fn sniff_udp(src_port: u16, dst_port: u16, dur: Duration) -> Vec<Vec<u8>> {
    // SAFETY: plain socket calls on an fd owned here, closed at the end;
    // buffers outlive the calls that write into them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n <= 0 {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p.len() < ihl + 8 {
                continue;
            }
            let udp = &p[ihl..];
            let (sport, dport) = (u16::from_be_bytes([udp[0], udp[1]]), u16::from_be_bytes([udp[2], udp[3]]));
            if sport == src_port && dport == dst_port {
                out.push(udp[8..].to_vec());
            }
        }
        libc::close(fd);
        out
    }
}

/// A heartbeat frame in node 3's name that no key holder sealed.
fn forged(to: u64, n: u64) -> Vec<u8> {
    let body = json!({
        "cluster_id": "test", "from": 3, "to": to, "pid": 1, "version": "0.1.0",
        "sent_ms": 10_000_000 + n, "echo_ms": 0, "heard": [], "incarnation": 1,
    });
    let mut f = b"TNHB\x01\x00\x00\x00\x01".to_vec();
    f.extend_from_slice(&serde_json::to_vec(&body).unwrap());
    f.extend((0..32u64).map(|i| (n.wrapping_mul(31) ^ i) as u8));
    f
}

/// The same heartbeat, unsealed (as a cluster without a key sends them).
fn plain(to: u64, n: u64) -> Vec<u8> {
    let body = json!({
        "cluster_id": "test", "from": 3, "to": to, "pid": 1, "version": "0.1.0",
        "sent_ms": 10_000_000 + n, "echo_ms": 0, "heard": [], "incarnation": 1,
    });
    serde_json::to_vec(&body).unwrap()
}

async fn dropped(url: &str) -> Value {
    let (st, v) = get(&format!("{url}/v1/local")).await;
    assert_eq!(st, 200, "{v}");
    v["heartbeats_dropped"].clone()
}

async fn node_state(url: &str, name: &str) -> String {
    get(&format!("{url}/v1/nodes/{name}")).await.1["state"].as_str().unwrap_or("").to_string()
}

/// Sends the forged, unsealed and replayed datagrams every 20 ms until told
/// to stop; returns how many of each it sent.
fn inject(
    ports: Vec<(u64, u16)>,
    replays: Vec<Vec<u8>>,
    replay_port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (mut fakes, mut replayed) = (0u64, 0u64);
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            n += 1;
            for (id, port) in &ports {
                let _ = s.send_to(&forged(*id, n), ("127.0.0.1", *port));
                let _ = s.send_to(&plain(*id, n), ("127.0.0.1", *port));
                fakes += 2;
            }
            for r in &replays {
                let _ = s.send_to(r, ("127.0.0.1", replay_port));
                replayed += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (fakes, replayed)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_and_replayed_heartbeats_of_a_dead_node_change_nothing() {
    let root = is_root();
    if !root {
        eprintln!("note: not root: no raw socket to capture real datagrams; the replay half is skipped");
    }
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let (u1, u2) = (c.nodes[0].url(), c.nodes[1].url());
    let (p1, p2, p3) = (c.nodes[0].port, c.nodes[1].port, c.nodes[2].port);
    let body = json!({"resources": [{"name": "s", "type": "process", "command": ["sleep", "1000"]}], "nodes": ["n3", "n1", "n2"]});
    let (st, v) = put(&format!("{u1}/v1/groups/g"), body).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(20), "g runs on n3", || async {
        let g = group_at(std::slice::from_ref(&u1), "g").await;
        g["node"] == "n3" && g["state"] == "running"
    })
    .await;

    // n3's real heartbeats to n1, captured off the wire.
    let captured = match root {
        true => tokio::task::spawn_blocking(move || sniff_udp(p3, p1, Duration::from_secs(1))).await.unwrap(),
        false => Vec::new(),
    };
    if root {
        assert!(captured.len() >= 5, "captured only {} datagrams of n3", captured.len());
        assert!(captured.iter().all(|d| d.starts_with(b"TNHB")), "heartbeats travel sealed");
    }
    let before = dropped(&u1).await;

    // n3 dies (agent, watchdog, resources); its name is forged and its
    // datagrams replayed to the survivors all along.
    let killed = Instant::now();
    c.node_mut("n3").kill();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let injector = inject(vec![(1, p1), (2, p2)], captured.clone(), p1, stop.clone());

    let moved = loop {
        let g = group_at(&[u1.clone(), u2.clone()], "g").await;
        // Claimed and started (the claim moves the epoch once more).
        if g["node"] != "n3" && g["state"] == "running" && g["resources"][0]["state"] == "running" {
            break g;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "g never failed over: {g}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failover = killed.elapsed();
    assert_eq!(node_state(&u1, "n3").await, "offline");
    assert_eq!(node_state(&u2, "n3").await, "offline");
    // Two more seconds of it: nothing moves, n3 stays offline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for u in [&u1, &u2] {
        assert_eq!(node_state(u, "n3").await, "offline", "seen from {u}");
        let (_, c) = get(&format!("{u}/v1/cluster")).await;
        let n3 = member(&c, "n3");
        assert!(n3["paths"].as_array().unwrap().iter().all(|p| p["up"] == false), "{n3}");
    }
    let g = group_at(std::slice::from_ref(&u1), "g").await;
    assert_eq!((&g["node"], &g["epoch"]), (&moved["node"], &moved["epoch"]), "the group stays put: {g}");

    // Every kind was counted where it arrived.
    let after = dropped(&u1).await;
    let grew = |k: &str| after[k].as_u64().unwrap() > before[k].as_u64().unwrap();
    assert!(grew("forged"), "{before} -> {after}");
    if root {
        assert!(grew("replayed"), "{before} -> {after}");
    }
    assert!(dropped(&u2).await["forged"].as_u64().unwrap() > 0);

    // n1 restarts (a new incarnation): n3's datagrams captured for the old
    // one are worth nothing to it either.
    c.node_mut("n1").stop();
    c.node_mut("n1").start().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node_state(&u1, "n3").await, "offline", "a restarted receiver takes no replay for n3");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (fakes, replays) = injector.join().unwrap();
    assert!(fakes > 100 && (!root || replays > 100), "{fakes} {replays}");
    eprintln!("failover under forged/replayed heartbeats: {failover:?}; sent {fakes} forged, {replays} replayed");

    // Hundreds dropped, a few log lines: one per reason and address per 30 s.
    let log = std::fs::read_to_string(c.node("n1").log_path()).unwrap();
    let lines = log.lines().filter(|l| l.contains("heartbeat dropped")).count();
    assert!((1..=12).contains(&lines), "{lines} log lines for the drops");

    // The key, as the state on n3's disk holds it, shows nowhere.
    let db = tandem_raft::store::Db::open(&c.nodes[2].dir.join("n3").join("raft")).unwrap();
    let (_, _, handle) = db.raft_storage().unwrap();
    let key = handle.state().heartbeat_keys.current.expect("the bootstrap gave the cluster a key");
    let key = key.bytes().map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>()).unwrap();
    for u in [&u1, &u2] {
        for path in ["/v1/cluster", "/v1/local", "/v1/nodes", "/v1/nodes/n3", "/v1/groups", "/v1/groups/g"] {
            let (st, v) = get(&format!("{u}{path}")).await;
            assert_eq!(st, 200, "{path}: {v}");
            let text = v.to_string();
            assert!(!text.contains(&key) && !text.contains("heartbeat_keys"), "{path}: {text}");
        }
    }
    for n in &c.nodes {
        let log = std::fs::read_to_string(n.log_path()).unwrap_or_default();
        assert!(!log.contains(&key), "the key is in {}'s log", n.name);
    }
}

/// A removed node knew the heartbeat key: removing it rotates the key on
/// every remaining node, and the old key stops counting some seconds later.
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_node_rotates_the_heartbeat_key_and_retires_the_old_one() {
    let c = Cluster::start(&["n1", "n2", "n3", "n4"], Opts::default()).await;
    let leader = c.leader().await;
    let gone = c.nodes.iter().map(|n| n.name.clone()).find(|n| *n != leader).unwrap();
    let stay: Vec<String> = c.nodes.iter().map(|n| n.url()).filter(|u| *u != c.node(&gone).url()).collect();
    let (_, before) = get(&format!("{}/v1/local", c.node(&leader).url())).await;
    let generation = before["heartbeat_key_generation"].as_u64().expect("the cluster seals its heartbeats");
    let (st, v) = delete(&format!("{}/v1/nodes/{gone}", c.node(&leader).url())).await;
    assert_eq!(st, 204, "{v}");
    for url in &stay {
        wait_until(Duration::from_secs(10), "a new heartbeat key on every remaining node", || async {
            let (_, l) = get(&format!("{url}/v1/local")).await;
            l["heartbeat_key_generation"].as_u64() == Some(generation + 1)
        })
        .await;
    }
    for url in &stay {
        wait_until(Duration::from_secs(40), "the previous key retired", || async {
            let (_, l) = get(&format!("{url}/v1/local")).await;
            l["heartbeat_key_generation"].as_u64() == Some(generation + 1)
                && l["heartbeat_previous_key_accepted"] == false
        })
        .await;
    }
    // The cluster still hears itself under the new key: a write commits and
    // every remaining node is online.
    let (st, v) =
        put(&format!("{}/v1/nodes/{leader}/attributes/after", c.node(&leader).url()), json!({"value": "rotation"}))
            .await;
    assert_eq!(st, 200, "{v}");
    let (_, nodes) = get(&format!("{}/v1/nodes", c.node(&leader).url())).await;
    let states: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["state"].as_str()).collect();
    assert_eq!(states.len(), 3, "{nodes}");
    assert!(states.iter().all(|s| *s == "online"), "{nodes}");
}
