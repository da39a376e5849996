//! Hosts as network namespaces: a node cut off from the others must fence
//! itself (kill its resources) before its group starts anywhere else, and
//! the group must never run on two nodes. Needs root; CI runs as root.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::{is_root, Net};
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_node_fences_itself_before_its_group_runs_elsewhere() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let mut net = Net::new();
    let mut c = Cluster::configure(&[], Opts::default());
    for i in 1..=3u8 {
        let (ns, addr) = net.host(i);
        c.add_host(&format!("n{i}"), "", &addr, Some(ns));
    }
    let c = c.form().await;
    let log = c.tmp.path().join("events");
    let n2 = c.node("n2").url();
    let (st, v) =
        put(&format!("{n2}/v1/groups/web"), json!({"resources": [logged(&log)], "nodes": ["n1", "n2", "n3"]})).await;
    assert_eq!(st, 201, "{v}");
    let url = format!("{n2}/v1/groups/web");
    wait_until(Duration::from_secs(15), "running on n1", || async {
        get(&url).await.1["node"] == "n1" && running(&log).len() == 1
    })
    .await;
    let first = running(&log)[0].clone();

    // Sample every 20 ms, all along: never two live copies.
    let stop = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (stop, overlaps, log) = (stop.clone(), overlaps.clone(), log.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let live = running(&log);
                if live.len() > 1 {
                    overlaps.lock().unwrap().push(live);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    net.set_link(1, false);
    wait_until(Duration::from_secs(10), "n1 kills its copy once it cannot see a majority", || async {
        !alive(first.pid)
    })
    .await;
    wait_until(Duration::from_secs(20), "the group runs on n2", || async {
        let g = get(&url).await.1;
        g["node"] == "n2" && g["state"] == "running" && running(&log).iter().any(|e| e.node == "n2")
    })
    .await;

    // Healed, n1 rejoins and runs nothing: the group stays where it is.
    net.set_link(1, true);
    let n1 = format!("{n2}/v1/nodes/n1");
    wait_until(Duration::from_secs(20), "n1 back online", || async { get(&n1).await.1["state"] == "online" }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let live = running(&log);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].node, "n2");
    assert!(overlaps.lock().unwrap().is_empty(), "two live copies seen: {:?}", overlaps.lock().unwrap());
    let starts: Vec<String> = events(&log).into_iter().filter(|e| e.kind == "start").map(|e| e.node).collect();
    assert_eq!(starts, ["n1", "n2"]);
}
