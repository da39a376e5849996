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

/// Hosts `n<i>` at their sites, as namespaces with two paths each, formed
/// into a cluster (the first bootstraps it).
async fn stretched(hosts: &[(u8, Site)]) -> (Topology, Cluster) {
    let mut topo = Topology::new(true).unwrap();
    let mut c = Cluster::configure(&[], Opts::default());
    for &(i, site) in hosts {
        let ns = topo.host(i, site).unwrap();
        let addrs = topo.addrs(i);
        let extra = format!("site = \"{}\"\nwitness = {}", site.name(), site == Site::Witness);
        c.add_host_paths(&format!("n{i}"), &extra, &[&addrs[0], &addrs[1]], Some(ns));
    }
    topo.route_sites().unwrap();
    (topo, c.form().await)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_between_sites_moves_the_group_to_the_leaders_side_and_never_runs_it_twice() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    // n1 bootstraps the cluster: it leads.
    let (topo, c) = stretched(&[(1, Site::A), (2, Site::B), (3, Site::Witness)]).await;
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

/// A DR drill of site a in a stretched cluster (two nodes per site and a
/// witness, as namespaces): every group that may leave runs in site b with
/// its outage measured (a sync volume's RPO 0), one that may not is
/// reported stopped, and every group comes home; a switchover of an unknown
/// site changes nothing; never two live copies of a group.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_drill_switches_every_group_off_and_back_and_reports_each() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let (_topo, c) = stretched(&[(1, Site::A), (2, Site::A), (3, Site::B), (4, Site::B), (5, Site::Witness)]).await;
    let n3 = c.node("n3").url();
    let logs: Vec<_> = ["web", "db", "pinned"].iter().map(|g| c.tmp.path().join(format!("{g}.log"))).collect();
    let defs = [
        ("web", json!({"resources": [logged(&logs[0])], "nodes": ["n1", "n3"]})),
        (
            "db",
            json!({"resources": [{"name": "dbdata", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 2},
                                 logged(&logs[1])],
                   "nodes": ["n2", "n4"]}),
        ),
        ("pinned", json!({"resources": [logged(&logs[2])], "nodes": ["n1"]})),
    ];
    for (name, def) in &defs {
        let (st, v) = put(&format!("{n3}/v1/groups/{name}"), def.clone()).await;
        assert_eq!(st, 201, "{v}");
    }
    let home = [("web", "n1"), ("db", "n2"), ("pinned", "n1")];
    let all_home = || async {
        let mut ok = true;
        for (g, n) in home {
            let v = get(&format!("{n3}/v1/groups/{g}")).await.1;
            ok &= v["node"] == n && v["state"] == "running";
        }
        ok
    };
    wait_until(Duration::from_secs(30), "every group running at home", all_home).await;
    wait_until(Duration::from_secs(30), "db's replica on n4 up to date", || async {
        get(&format!("{n3}/v1/volumes/dbdata")).await.1["replicas"].as_array().is_some_and(|r| {
            r.iter().any(|r| r["node"] == "n4" && r["disk"] == "UpToDate" && r["connection"] == "Connected")
        })
    })
    .await;

    // An unknown site: refused, nothing changes.
    let before = get(&format!("{n3}/v1/nodes")).await.1;
    let (st, v) = post(&format!("{n3}/v1/sites/nowhere/switchover"), json!({})).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("TND-1109")), "{v}");
    let (st, v) = post(&format!("{n3}/v1/sites/a/switchover"), json!({"timeout_s": 99})).await;
    assert_eq!((st, v["code"].as_str()), (422, Some("TND-1010")), "{v}");
    let after = get(&format!("{n3}/v1/nodes")).await.1;
    let admin =
        |v: &serde_json::Value| v.as_array().unwrap().iter().map(|n| n["admin_state"].clone()).collect::<Vec<_>>();
    assert_eq!(admin(&before), admin(&after));
    let sites = get(&format!("{n3}/v1/sites")).await.1;
    let names: Vec<_> = sites.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap_or("")).collect();
    assert!(names.contains(&"a") && names.contains(&"b"), "{sites}");

    let watchers: Vec<_> = logs.iter().map(|l| OverlapWatcher::start(l)).collect();
    let out = tokio::process::Command::new(BIN)
        .args(["site", "drill", "a", "--json", "--timeout", "25"])
        .env("TANDEM_ENDPOINT", &n3)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    // Passed: every group that may leave did and came back (pinned cannot
    // leave: listed as stopped, not a failure of the drill).
    assert_eq!(out.status.code(), Some(0), "{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let g = |name: &str| {
        r["out"]["groups"].as_array().unwrap().iter().find(|g| g["group"] == name).cloned().unwrap_or_default()
    };
    assert_eq!((g("web")["result"].as_str(), g("web")["to"].as_str()), (Some("moved"), Some("n3")), "{r}");
    assert_eq!((g("db")["result"].as_str(), g("db")["to"].as_str()), (Some("moved"), Some("n4")), "{r}");
    assert_eq!(g("db")["rpo_bytes"], 0, "a sync replica up to date: nothing lost");
    assert_eq!(g("pinned")["result"], "stopped", "{r}");
    for name in ["web", "db"] {
        let ms = g(name)["outage_ms"].as_u64().unwrap_or_else(|| panic!("{name}'s outage measured: {r}"));
        assert!(ms < 20_000, "{name}: {ms} ms");
    }
    let back = r["back"].as_array().unwrap();
    assert_eq!(back.len(), 2, "{r}");
    for b in back {
        assert_eq!(b["result"], "back", "{b}");
        assert!(b["outage_ms"].as_u64().is_some(), "{b}");
    }
    assert_eq!(back.iter().find(|b| b["group"] == "db").map(|b| b["rpo_bytes"].clone()), Some(json!(0)));

    // The summary reads the same; everything is home again, site a online.
    wait_until(Duration::from_secs(30), "every group back home", all_home).await;
    let nodes = get(&format!("{n3}/v1/nodes")).await.1;
    assert!(nodes.as_array().unwrap().iter().all(|n| n["admin_state"] == "online"), "{nodes}");
    let events = get(&format!("{n3}/v1/events?kind=site.switchover")).await.1;
    let ev = &events["events"][0];
    assert_eq!((ev["details"]["site"].as_str(), ev["details"]["moved"].as_u64()), (Some("a"), Some(2)), "{events}");
    // Again, as the summary an auditor keeps.
    let out = tokio::process::Command::new(BIN)
        .args(["site", "drill", "a"])
        .env("TANDEM_ENDPOINT", &n3)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("DR drill of site a: PASSED"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("pinned") && l.contains("stopped") && l.contains("no node outside the site")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("db") && l.contains("n4") && l.contains("0B")), "{text}");
    wait_until(Duration::from_secs(30), "every group back home", all_home).await;
    for w in watchers {
        let overlaps = w.finish();
        assert!(overlaps.is_empty(), "two live copies seen: {overlaps:?}");
    }
}
