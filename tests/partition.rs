//! Hosts as network namespaces: a node cut off from the others must fence
//! itself (kill its resources) before its group starts anywhere else, and
//! the group must never run on two nodes. Needs root; CI runs as root.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tandem_testkit::{in_ns_output, is_root, Net};

/// Three hosts n1..n3, each a namespace with its agent, formed into a
/// cluster; `None` (and a note why) when not root.
async fn three_hosts() -> Option<(Net, Cluster, Vec<String>)> {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return None;
    }
    let mut net = Net::new();
    let mut c = Cluster::configure(&[], Opts::default());
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        let (ns, addr) = net.host(i);
        hosts.push(ns.clone());
        c.add_host(&format!("n{i}"), "", &addr, Some(ns));
    }
    Some((net, c.form().await, hosts))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_node_fences_itself_before_its_group_runs_elsewhere() {
    let Some((net, c, _)) = three_hosts().await else { return };
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
    let watcher = OverlapWatcher::start(&log);

    net.set_link(1, false);
    let cut = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "n1 kills its copy once it cannot see a majority", || async {
        !alive(first.pid)
    })
    .await;
    let mut last = serde_json::Value::Null;
    for _ in 0..300 {
        last = get(&url).await.1;
        if last["node"] == "n2" && last["state"] == "running" && running(&log).iter().any(|e| e.node == "n2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("n1 fenced, group on n2 after {:?}", cut.elapsed());
    assert_eq!(last["node"], "n2", "the group should run on n2: {last}\n{:?}", events(&log));
    assert!(running(&log).iter().any(|e| e.node == "n2"), "{last}\n{:?}", events(&log));

    // Healed, n1 rejoins and runs nothing: the group stays where it is.
    net.set_link(1, true);
    let healed = std::time::Instant::now();
    let n1 = format!("{n2}/v1/nodes/n1");
    wait_until(Duration::from_secs(30), "n1 back online", || async { get(&n1).await.1["state"] == "online" }).await;
    eprintln!("n1 online again after {:?}", healed.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let overlaps = watcher.finish();
    let live = running(&log);
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].node, "n2");
    assert!(overlaps.is_empty(), "two live copies seen: {overlaps:?}");
    let starts: Vec<String> = events(&log).into_iter().filter(|e| e.kind == "start").map(|e| e.node).collect();
    assert_eq!(starts, ["n1", "n2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vip_service_moves_and_the_client_follows() {
    let Some((mut net, mut c, hosts)) = three_hosts().await else { return };
    let (client, _) = net.host(9);
    let vip = format!("{}.100", net.prefix);
    let server = "echo \"hello from $TANDEM_NODE\" > index.html; exec python3 -m http.server 8080 --bind 0.0.0.0";
    let body = json!({
        "resources": [
            {"name": "ip", "type": "vip", "address": format!("{vip}/24"), "interface": "eth0",
             "monitor": {"interval_ms": 500, "timeout_ms": 5000}},
            {"name": "http", "type": "process", "command": ["sh", "-c", server]},
        ],
        "nodes": ["n1", "n2", "n3"],
    });
    let n2 = c.node("n2").url();
    let (st, v) = put(&format!("{n2}/v1/groups/web"), body).await;
    assert_eq!(st, 201, "{v}");
    let ask = |client: String, vip: String| async move {
        tokio::task::spawn_blocking(move || {
            in_ns_output(&client, &["curl", "-s", "--max-time", "1", &format!("http://{vip}:8080/")])
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
    };
    wait_until(Duration::from_secs(20), "the client reaches n1 at the VIP", || async {
        ask(client.clone(), vip.clone()).await.contains("hello from n1")
    })
    .await;

    // Power loss of n1: its agent and services die, its link goes dark.
    c.node_mut("n1").kill();
    net.set_link(1, false);
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(30), "the client reaches n2 at the VIP", || async {
        ask(client.clone(), vip.clone()).await.contains("hello from n2")
    })
    .await;
    eprintln!("client outage after power loss: {:?} (a figure, not an assertion)", started.elapsed());

    // n1 comes back: its agent removes the address it left behind.
    net.set_link(1, true);
    assert!(in_ns_output(&hosts[0], &["ip", "-o", "addr", "show", "dev", "eth0"]).unwrap().contains(&vip));
    c.node_mut("n1").start().await;
    wait_until(Duration::from_secs(20), "stale VIP removed from n1", || async {
        !in_ns_output(&hosts[0], &["ip", "-o", "addr", "show", "dev", "eth0"]).unwrap_or_default().contains(&vip)
    })
    .await;
    assert!(ask(client.clone(), vip.clone()).await.contains("hello from n2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_path_is_reported_and_the_vip_moves_to_its_backup_interface() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    // Every host has two NICs on two networks: eth0 and eth1, two
    // heartbeat paths.
    let mut net = Net::new();
    let mut c = Cluster::configure(&[], Opts::default());
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        let (ns, addr) = net.host(i);
        let second = net.second_path(i);
        hosts.push(ns.clone());
        c.add_host_paths(&format!("n{i}"), "", &[&addr, &second], Some(ns));
    }
    let c = c.form().await;
    let vip = format!("{}.100", net.prefix);
    let body = json!({
        "resources": [{"name": "ip", "type": "vip", "address": format!("{vip}/24"), "interface": "eth0",
                       "backup_interfaces": ["eth1"], "monitor": {"interval_ms": 200, "timeout_ms": 5000}}],
        "nodes": ["n1", "n2", "n3"],
    });
    let n2 = c.node("n2").url();
    let (st, v) = put(&format!("{n2}/v1/groups/web"), body).await;
    assert_eq!(st, 201, "{v}");
    let holds = |iface: &'static str| {
        let ns = hosts[0].clone();
        let vip = vip.clone();
        move || in_ns_output(&ns, &["ip", "-o", "addr", "show", "dev", iface]).unwrap_or_default().contains(&vip)
    };
    let on_eth0 = holds("eth0");
    let on_eth1 = holds("eth1");
    wait_until(Duration::from_secs(20), "the VIP on n1's eth0", || async { on_eth0() }).await;
    let epoch = get(&format!("{n2}/v1/groups/web")).await.1["epoch"].clone();

    // n1's eth0 loses its carrier (cable pulled): eth1 still carries the
    // heartbeats, so n1 stays a member; the VIP moves to eth1 on n1.
    net.set_link(1, false);
    wait_until(Duration::from_secs(10), "the VIP on n1's backup eth1", || async { on_eth1() && !on_eth0() }).await;
    let n1 = format!("{n2}/v1/nodes/n1");
    wait_until(Duration::from_secs(10), "n1's first path reported down", || async {
        let v = get(&n1).await.1;
        v["paths"][0]["up"] == false && v["paths"][1]["up"] == true
    })
    .await;
    let v = get(&n1).await.1;
    assert_eq!(v["state"], "online", "one path left is enough: {v}");
    let g = get(&format!("{n2}/v1/groups/web")).await.1;
    assert_eq!((g["node"].clone(), g["epoch"].clone()), (json!("n1"), epoch), "local recovery, no failover: {g}");

    // Both paths gone: now n1 is dead to the others, and the group moves.
    net.set_second_link(1, false);
    wait_until(Duration::from_secs(15), "the group fails over", || async {
        let g = get(&format!("{n2}/v1/groups/web")).await.1;
        g["node"] != "n1" && g["state"] == "running"
    })
    .await;
    wait_until(Duration::from_secs(5), "n1 fenced: the VIP left it", || async { !on_eth0() && !on_eth1() }).await;
}
