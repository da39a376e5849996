//! Quorum-loss recovery: three voters, two lose power for good. The
//! survivor refuses to recover while a majority answers; its dry run says
//! what it would drop and where the group would run and changes nothing;
//! confirmed, it becomes the single voter of a new incarnation and runs the
//! group. A dropped member that comes back is refused with a clear error
//! (it runs nothing, never merges), and rejoins after its removal. The
//! group never runs on two nodes.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn recover_call(url: &str, dry_run: bool, confirm: Option<&str>) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({ "confirm": confirm })).unwrap();
    call(Method::POST, &format!("{url}/v1/cluster/recover?dry_run={dry_run}"), Some(body)).await
}

fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN).args(args).env("TANDEM_ENDPOINT", url).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_survivor_recovers_the_cluster_and_a_dropped_member_is_refused_until_it_rejoins() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("web.log");
    let n2 = c.node("n2").url();
    let (st, v) =
        put(&format!("{n2}/v1/groups/web"), json!({"resources": [logged(&log)], "nodes": ["n1", "n2"]})).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(15), "web running on n1", || async {
        let g = get(&format!("{n2}/v1/groups/web")).await.1;
        g["node"] == "n1" && g["state"] == "running" && running(&log).len() == 1
    })
    .await;
    let watcher = OverlapWatcher::start(&log);

    // With its quorum, the cluster refuses: it has a leader.
    let (st, v) = recover_call(&n2, true, None).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("TND-1211")), "{v}");

    // Voters fetch the CA's key (every 10 s): without it the recovered
    // cluster could not take a node back.
    let key = c.tmp.path().join("n2/tls/ca.key");
    wait_until(Duration::from_secs(25), "n2 holds the CA key", || async { key.exists() }).await;

    // n1 and n3 lose power for good: n2 alone, no quorum.
    c.node_mut("n1").kill();
    c.node_mut("n3").kill();
    wait_until(Duration::from_secs(20), "n2 hears no leader and may recover", || async {
        recover_call(&n2, true, None).await.0 == 200
    })
    .await;

    // The dry run (the CLI's default) reports and changes nothing.
    let before = get(&format!("{n2}/v1/cluster?stale=true")).await.1;
    let (code, out, err) = cli(&n2, &["cluster", "recover"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("DRY RUN") && out.contains("--confirm test"), "{out}");
    let (_, dry) = recover_call(&n2, true, None).await;
    assert_eq!(dry["dropped"], json!(["n1", "n3"]), "{dry}");
    assert_eq!(dry["incarnation"], 1);
    assert_eq!(dry["warnings"], json!([]), "{dry}");
    assert!(dry["log_index"].as_u64().unwrap() >= dry["committed_index"].as_u64().unwrap());
    let web = dry["groups"].as_array().unwrap().iter().find(|g| g["group"] == "web").cloned().unwrap();
    assert_eq!((web["node"].as_str(), web["would_run_on"].as_str()), (Some("n1"), Some("n2")), "{dry}");
    // A wrong confirmation is refused; nothing changed.
    let (st, v) = recover_call(&n2, false, Some("other")).await;
    assert_eq!((st, v["code"].as_str()), (422, Some("TND-1010")), "{v}");
    let after = get(&format!("{n2}/v1/cluster?stale=true")).await.1;
    assert_eq!(voters(&before), voters(&after));
    assert_eq!(after["applied_index"], before["applied_index"]);

    // Confirmed: n2 leads alone and runs web.
    let (code, out, err) = cli(&n2, &["cluster", "recover", "--confirm", "test"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recovered: n2 is its single voter (incarnation 1)"), "{out}");
    wait_until(Duration::from_secs(20), "web running on n2", || async {
        let g = get(&format!("{n2}/v1/groups/web")).await.1;
        g["node"] == "n2" && g["state"] == "running" && running(&log).iter().any(|e| e.node == "n2")
    })
    .await;
    let cluster = c.cluster().await;
    assert_eq!(cluster["leader"], "n2", "{cluster}");
    assert_eq!(voters(&cluster), vec!["n2".to_string()], "{cluster}");
    let recovered = get(&format!("{n2}/v1/events?kind=cluster.recovered")).await.1;
    let e = &recovered["events"][0];
    assert_eq!(
        (e["severity"].as_str(), e["details"]["dropped"].clone()),
        (Some("critical"), json!(["n1", "n3"])),
        "{recovered}"
    );

    // n1 and n3 come back together with their old state: a majority of
    // the old voters between them, yet refused by n2 as soon as they call
    // it; they run nothing.
    let (n1, n3) = (c.node("n1").url(), c.node("n3").url());
    let seen = events(&log).len();
    c.node_mut("n1").start().await;
    c.node_mut("n3").start().await;
    wait_until(Duration::from_secs(20), "n1 and n3 told they were superseded", || async {
        get(&format!("{n1}/v1/cluster")).await.1["code"] == "TND-1210"
            && get(&format!("{n3}/v1/cluster")).await.1["code"] == "TND-1210"
    })
    .await;
    let (st, v) = get(&format!("{n1}/v1/cluster")).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["hint"].as_str().unwrap_or("").contains("tandem node remove"), "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = running(&log);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].node, "n2");
    let since: Vec<_> = events(&log).into_iter().skip(seen).collect();
    assert!(since.iter().all(|e| e.node == "n2"), "the returning nodes started web: {since:?}");
    // Restarted, it stays out.
    c.node_mut("n1").stop();
    c.node_mut("n1").start().await;
    let (st, v) = get(&format!("{n1}/v1/cluster")).await;
    assert_eq!((st, v["code"].as_str()), (409, Some("TND-1210")), "{v}");

    // Removed from the recovered cluster, it joins again as a new member.
    let (st, v) = delete(&format!("{n2}/v1/nodes/n1?force=true")).await;
    assert!(st == 204 || st == 200, "{st} {v}");
    let i = c.idx("n1");
    c.join(i).await;
    wait_until(Duration::from_secs(20), "n1 a member again", || async {
        let v = get(&format!("{n1}/v1/cluster")).await.1;
        v["leader"] == "n2" && member(&v, "n1")["state"] == "online"
    })
    .await;
    let overlaps = watcher.finish();
    assert!(overlaps.is_empty(), "two live copies seen: {overlaps:?}");
}
