//! Two sites and a witness, as namespaces: each network has one bridge per
//! site, joined by an inter-site link, and the witness stands on both. When
//! the link between the sites is cut while the group runs in the site the
//! leader is not in, the witness still hears both sides: the group must
//! never run twice, and it must end up running on the side that leads —
//! the old leader's (the cut-off node steps out and its group moves), or
//! the group's own, if the witness elected its node. Needs root; CI runs
//! as root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tandem_testkit::is_root;
use tandem_testkit::sites::{Site, Topology};

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_between_sites_moves_the_group_to_the_leaders_side_and_never_runs_it_twice() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let mut topo = Topology::new(true).unwrap();
    let mut c = Cluster::configure(&[], Opts::default());
    for (i, site) in [(1u8, Site::A), (2, Site::B), (3, Site::Witness)] {
        let ns = topo.host(i, site).unwrap();
        let addrs = topo.addrs(i);
        let extra = format!("site = \"{}\"\nwitness = {}", site.name(), site == Site::Witness);
        c.add_host_paths(&format!("n{i}"), &extra, &[&addrs[0], &addrs[1]], Some(ns));
    }
    topo.route_sites().unwrap();
    // n1 bootstraps the cluster: it leads.
    let c = c.form().await;
    assert_eq!(c.leader().await, "n1");

    // The group prefers n2, in site b: the leader's site is the other one.
    let log = c.tmp.path().join("events");
    let n1 = c.node("n1").url();
    let url = format!("{n1}/v1/groups/web");
    let (st, v) = put(&url, json!({"resources": [logged(&log)], "nodes": ["n2", "n1"]})).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(15), "running on n2", || async {
        get(&url).await.1["node"] == "n2" && running(&log).len() == 1
    })
    .await;
    let first = running(&log)[0].clone();

    // Sample every 20 ms, all along: never two live copies.
    let watcher = OverlapWatcher::start(&log);

    topo.set_site_link(false).unwrap();
    let cut = Instant::now();
    // Settled: a leader in a site, the group running there (one live copy
    // on the leader's node), the other site's node offline for it.
    let urls = c.live_urls();
    let mut last = (serde_json::Value::Null, serde_json::Value::Null);
    let deadline = Instant::now() + Duration::from_secs(20);
    let settled = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cluster = c.cluster().await;
        let g = group_at(&urls, "web").await;
        let leader = cluster["leader"].as_str().unwrap_or_default().to_string();
        let live = running(&log);
        let other = if leader == "n1" { "n2" } else { "n1" };
        if (leader == "n1" || leader == "n2")
            && g["node"] == leader.as_str()
            && g["state"] == "running"
            && live.len() == 1
            && live[0].node == leader
            && member(&cluster, other)["state"] == "offline"
            && member(&cluster, "n3")["state"] == "online"
        {
            break Some(leader);
        }
        last = (cluster, g);
        if Instant::now() > deadline {
            break None;
        }
    };
    let Some(side) = settled else {
        panic!("not settled 20 s after the cut: {}\n{}\n{:?}", last.0, last.1, events(&log));
    };
    eprintln!("group on {side}, the leading side, {:?} after the cut", cut.elapsed());
    if side == "n1" {
        assert!(!alive(first.pid), "n2's copy must be dead once n1 runs the group");
    }

    // Healed: the cut-off node steps back in; the group stays where it runs.
    topo.set_site_link(true).unwrap();
    wait_until(Duration::from_secs(30), "both back online", || async {
        let cluster = c.cluster().await;
        ["n1", "n2", "n3"].iter().all(|n| member(&cluster, n)["state"] == "online")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let overlaps = watcher.finish();
    let live = running(&log);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].node, side);
    assert!(overlaps.is_empty(), "two live copies seen: {overlaps:?}");
}
