//! Disaster recovery with hosts as network namespaces (two sites and a
//! witness, or one site):
//! - a site and the witness lose power for good: the other site's nodes
//!   hold no majority; one of them recovers the cluster (`POST
//!   /v1/cluster/recover`), the group and its sync volume's data come back
//!   there, the other survivor and the returning dead are refused as
//!   superseded (never run anything), and rejoin once removed;
//! - a replica cut off by the network while the primary writes on, then the
//!   primary lost: the forced-promotion dry run counts exactly the bytes the
//!   cut-off replica missed, the promotion brings the service back without
//!   them, and the old primary's newer data is kept (a split brain under
//!   the default policy), never overwritten.
//!
//! Needs root; CI runs as root.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use tandem_testkit::is_root;
use tandem_testkit::sites::{Site, Topology};

/// Hosts `n<i>` at their sites as namespaces with two paths each, formed
/// into a cluster (the first bootstraps it).
async fn hosts(sites: bool, hosts: &[(u8, Site)]) -> (Topology, Cluster) {
    let mut topo = Topology::new(sites).unwrap();
    let mut c = Cluster::configure(&[], Opts::default());
    for &(i, site) in hosts {
        let ns = topo.host(i, site).unwrap();
        let addrs = topo.addrs(i);
        let extra = if sites {
            format!("site = \"{}\"\nwitness = {}", site.name(), site == Site::Witness)
        } else {
            String::new()
        };
        c.add_host_paths(&format!("n{i}"), &extra, &[&addrs[0], &addrs[1]], Some(ns));
    }
    if sites {
        topo.route_sites().unwrap();
    }
    (topo, c.form().await)
}

async fn recover_call(url: &str, dry_run: bool, confirm: Option<&str>) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({ "confirm": confirm })).unwrap();
    call(Method::POST, &format!("{url}/v1/cluster/recover?dry_run={dry_run}"), Some(body)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_and_the_witness_lost_for_good_the_other_site_recovers_with_the_data() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let (_topo, mut c) =
        hosts(true, &[(1, Site::A), (2, Site::A), (3, Site::B), (4, Site::B), (5, Site::Witness)]).await;
    let log = c.tmp.path().join("db.log");
    let n3 = c.node("n3").url();
    let def = json!({
        "resources": [{"name": "data", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 2}, logged(&log)],
        "nodes": ["n1", "n3"],
    });
    let (st, v) = put(&format!("{n3}/v1/groups/db"), def).await;
    assert_eq!(st, 201, "{v}");
    let uri = wait_exported(&c, "n1", 2).await;
    let acked = write_blocks(&uri, 0, 16, |i| (i % 200) as u8 + 1).await;
    assert_eq!(acked.len(), 16);
    // Voters fetch the CA's key (every 10 s): the recovered cluster needs it
    // to take members back.
    let key = c.tmp.path().join("n3/tls/ca.key");
    wait_until(Duration::from_secs(25), "n3 holds the CA key", || async { key.exists() }).await;
    let watcher = OverlapWatcher::start(&log);

    // Site a and the witness lose power for good: 2 of 5 voters left.
    for n in ["n1", "n2", "n5"] {
        c.node_mut(n).kill();
    }
    wait_until(Duration::from_secs(30), "n3 hears no leader and may recover", || async {
        recover_call(&n3, true, None).await.0 == 200
    })
    .await;
    let (_, dry) = recover_call(&n3, true, None).await;
    // The voters: one per site and the witness. Every other member is
    // dropped, the learners n2 and n4 too (n4 alive: it rejoins afresh).
    assert_eq!(dry["voters"], json!(["n1", "n3", "n5"]), "{dry}");
    assert_eq!(
        (dry["dropped"].clone(), dry["reachable"].clone()),
        (json!(["n1", "n2", "n4", "n5"]), json!([])),
        "{dry}"
    );
    let db = dry["groups"].as_array().unwrap().iter().find(|g| g["group"] == "db").cloned().unwrap();
    assert_eq!((db["node"].as_str(), db["would_run_on"].as_str()), (Some("n1"), Some("n3")), "{dry}");
    assert_eq!(dry["volumes_without_up_to_date_replica"], json!([]), "{dry}");

    // Confirmed: n3 leads alone and serves the group with every write.
    let (st, v) = recover_call(&n3, false, Some("test")).await;
    assert_eq!(st, 200, "{v}");
    let uri3 = wait_exported_primary(&c, "n3").await;
    for off in &acked {
        let i = off / 65536;
        assert!(read_ok(&uri3, *off, (i % 200) as u8 + 1).await, "acknowledged write at {off} lost by the recovery");
    }
    wait_until(Duration::from_secs(20), "db's process running on n3", || async {
        running(&log).iter().any(|e| e.node == "n3")
    })
    .await;

    // n4, alive but dropped, is refused; so are the dead when they return.
    let n4 = c.node("n4").url();
    wait_until(Duration::from_secs(20), "n4 told it was superseded", || async {
        get(&format!("{n4}/v1/cluster")).await.1["code"] == "TND-1210"
    })
    .await;
    let seen = events(&log).len();
    for n in ["n1", "n2", "n5"] {
        c.node_mut(n).start().await;
    }
    let n1 = c.node("n1").url();
    wait_until(Duration::from_secs(20), "n1 told it was superseded", || async {
        get(&format!("{n1}/v1/cluster")).await.1["code"] == "TND-1210"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let since: Vec<_> = events(&log).into_iter().skip(seen).collect();
    assert!(since.iter().all(|e| e.node == "n3"), "a superseded node started db: {since:?}");

    // Removed, n4 joins again as a new member; the cluster grows back.
    let (st, v) = delete(&format!("{n3}/v1/nodes/n4?force=true")).await;
    assert!(st == 204 || st == 200, "{st} {v}");
    let i = c.idx("n4");
    tandem_testkit::api::register(&n4, c.creds());
    let (st, v) = tandem_testkit::api::join(&c.nodes[i].socket(), &n3, c.creds()).await;
    assert_eq!(st, 200, "{v}");
    wait_until(Duration::from_secs(20), "n4 a member again", || async {
        let v = get(&format!("{n4}/v1/cluster")).await.1;
        v["leader"] == "n3" && member(&v, "n4")["state"] == "online"
    })
    .await;
    let overlaps = watcher.finish();
    assert!(overlaps.is_empty(), "two live copies seen: {overlaps:?}");
    let live = running(&log);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].node, "n3");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_by_the_network_is_promoted_by_force_with_exactly_what_it_missed() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let (topo, mut c) = hosts(false, &[(1, Site::A), (2, Site::A), (3, Site::A)]).await;
    let n3 = c.node("n3").url();
    let def = json!({
        "resources": [{"name": "data", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 2}],
        "nodes": ["n1", "n2", "n3"],
    });
    let (st, v) = put(&format!("{n3}/v1/groups/db"), def).await;
    assert_eq!(st, 201, "{v}");
    let uri = wait_exported(&c, "n1", 2).await;
    assert_eq!(write_blocks(&uri, 0, 4, |_| 0x11).await.len(), 4);

    // n2 is cut off (both paths); n1 writes on: 12 blocks n2 never gets.
    topo.set_link(2, None, false).unwrap();
    let acked = write_blocks(&uri, 8, 12, |_| 0x5a).await;
    assert_eq!(acked.len(), 12);
    let last = promote_dry_run_until(&n3, |r| candidate(r, "n2")["out_of_sync_bytes"] == 12 * 65536).await;
    assert_eq!(candidate(&last, "n2")["out_of_sync_bytes"], 12 * 65536, "{last}");

    // n1 loses power; n2's link comes back: the group waits for an
    // up-to-date replica that will not come.
    c.node_mut("n1").kill();
    topo.set_link(2, None, true).unwrap();
    let report = promote_dry_run_until(&n3, |r| candidate(r, "n2")["refused"].is_null()).await;
    let n2 = candidate(&report, "n2").clone();
    assert!(n2["refused"].is_null(), "n2 never became promotable: {report}");
    assert_eq!(n2["out_of_sync_bytes"], 12 * 65536, "{report}");
    assert!(n2["newest_write_age_ms"].as_u64().is_some_and(|a| a > 0), "{report}");

    // The CLI's dry run shows the same, and changes nothing.
    let out = std::process::Command::new(BIN).args(["volume", "promote", "data", "--endpoint", &n3]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("DRY RUN") && text.contains("768.0KiB") && text.contains("may be promoted"), "{text}");

    let out = std::process::Command::new(BIN)
        .args(["volume", "promote", "data", "--node", "n2", "--confirm", "data", "--endpoint", &n3])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("promoted by force on n2"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uri2 = wait_exported_primary(&c, "n2").await;
    for i in 0..4 {
        assert!(read_ok(&uri2, i * 65536, 0x11).await, "block {i}, written before the cut, is missing");
    }
    for off in &acked {
        assert!(read_ok(&uri2, *off, 0).await, "block at {off} was given up, yet n2 holds it?");
    }
    // n1 returns: its 12 newer blocks are kept, the replicas disconnected.
    c.node_mut("n1").start().await;
    let mut v = Value::Null;
    for _ in 0..300 {
        v = volume(&c).await;
        if v["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["node"] == "n1" && r["connection"] == "SplitBrain"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(v.to_string().contains("SplitBrain"), "no split brain reported for n1: {v}");
    let data = std::fs::read(backing(&c, "n1")).unwrap();
    for off in &acked {
        assert!(
            data[*off as usize..*off as usize + 65536].iter().all(|b| *b == 0x5a),
            "n1's write at {off} overwritten"
        );
    }
}
