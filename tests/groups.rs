//! Resource groups on real clusters: placement, local restart, failover when
//! a node dies, switchover, standby, stop/start, and refused definitions.
//! Every resource start and stop appends a line (node, epoch, pid) to one
//! log, from which the tests check that a group never ran on two nodes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn group(c: &Cluster, name: &str) -> Value {
    group_at(&c.live_urls(), name).await
}

async fn wait_running_on(c: &Cluster, name: &str, node: &str, log: &Path) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = group(c, name).await;
        let runs = running(log);
        assert!(runs.len() <= 1, "group runs on two nodes at once: {runs:?}");
        if last["node"] == node && last["state"] == "running" && runs.iter().any(|e| e.node == node) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never ran on {node}: {last}\n{:?}", events(log));
}

/// The leader of a three-node cluster and the two others.
async fn leader_and_two_others(c: &Cluster) -> (String, String, String) {
    let leader = c.leader().await;
    let others: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).filter(|n| *n != leader).collect();
    (leader, others[0].clone(), others[1].clone())
}

async fn put_group(c: &Cluster, name: &str, body: Value) -> (u16, Value) {
    put(&format!("{}/v1/groups/{name}", c.nodes[1].url()), body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn group_fails_over_when_its_node_dies() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    let (st, v) = put_group(&c, "web", json!({"resources": [logged(&log)], "nodes": ["n1", "n2", "n3"]})).await;
    assert_eq!(st, 201, "{v}");
    let g = wait_running_on(&c, "web", "n1", &log).await;
    let first = running(&log)[0].clone();
    assert_eq!(first.epoch, g["epoch"].as_u64().unwrap());

    // Power loss of n1: the agent and, with it, its resources.
    c.node_mut("n1").kill();
    let g = wait_running_on(&c, "web", "n2", &log).await;
    assert!(!alive(first.pid), "the old copy must be gone");
    assert!(g["epoch"].as_u64() > Some(first.epoch), "a new placement has a new epoch: {g}");
    assert!(g["reason"].as_str().unwrap().contains("n1 failed"), "{g}");
    let starts: Vec<Event> = events(&log).into_iter().filter(|e| e.kind == "start").collect();
    assert_eq!(starts.iter().map(|e| e.node.as_str()).collect::<Vec<_>>(), ["n1", "n2"], "{starts:?}");
    // The event log tells the story, with the outage measured from n1's
    // last heartbeat to the group running on n2.
    let url = format!("{}/v1/events?group=web", c.nodes[1].url());
    let mut story = Vec::new();
    for _ in 0..100 {
        story = get(&url).await.1["events"].as_array().cloned().unwrap_or_default();
        if story.iter().filter(|e| e["kind"] == "group.running").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let told: Vec<(String, String)> = story
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_string(), e["node"].as_str().unwrap_or("").to_string()))
        .collect();
    let want = [
        ("group.defined", ""),
        ("group.starting", "n1"),
        ("group.running", "n1"),
        ("group.moved", "n2"),
        ("group.running", "n2"),
    ];
    let want: Vec<(String, String)> = want.iter().map(|(k, n)| (k.to_string(), n.to_string())).collect();
    assert_eq!(told, want, "{story:#?}");
    let outage = story[4]["details"]["outage_ms"].as_u64().expect("the failover's outage is measured");
    assert!((500..30_000).contains(&outage), "{:#}", story[4]);
    assert_eq!(story[4]["details"]["outage_from"], "n1 went silent");

    // n1 comes back: manual failback leaves the group where it is.
    c.node_mut("n1").start().await;
    let url = format!("{}/v1/nodes/n1", c.nodes[1].url());
    wait_until(Duration::from_secs(20), "n1 online", || async { get(&url).await.1["state"] == "online" }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = group(&c, "web").await;
    assert_eq!(g["node"], "n2", "manual failback: stays on n2");
    assert_eq!(running(&log).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn crashed_resource_restarts_locally_then_fails_over_and_clear_forgets() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    let body =
        json!({"resources": [logged(&log)], "nodes": ["n1", "n2"], "max_restarts": 1, "restart_window_ms": 600000});
    assert_eq!(put_group(&c, "db", body).await.0, 201);
    wait_running_on(&c, "db", "n1", &log).await;
    let first = running(&log)[0].clone();

    // First crash: restarted in place, same epoch.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(10), "local restart", || async {
        running(&log).iter().any(|e| e.node == "n1" && e.pid != first.pid)
    })
    .await;
    let second = running(&log)[0].clone();
    assert_eq!((second.node.as_str(), second.epoch), ("n1", first.epoch), "restarted locally, same placement");

    // Second crash: past the threshold, the group fails over.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second.pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let g = wait_running_on(&c, "db", "n2", &log).await;
    assert_eq!(g["failed_on"], json!(["n1"]), "{g}");

    // Crash it on n2 twice too: no node left, the group is failed.
    for _ in 0..2 {
        let pid = running(&log).iter().find(|e| e.node == "n2").map(|e| e.pid).unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        wait_until(Duration::from_secs(10), "restart or give up", || async {
            !alive(pid) && running(&log).iter().all(|e| e.pid != pid)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let url = format!("{}/v1/groups/db", c.nodes[0].url());
    wait_until(Duration::from_secs(15), "group failed", || async { get(&url).await.1["state"] == "failed" }).await;
    assert!(running(&log).is_empty());
    // Each crash, the local restart and the threshold are events.
    let url = format!("{}/v1/events?group=db&kind=resource.,group.restart_threshold,group.failed", c.nodes[2].url());
    let mut told: Vec<String> = Vec::new();
    for _ in 0..100 {
        let page = get(&url).await.1;
        told = page["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| format!("{} {}", e["kind"].as_str().unwrap_or(""), e["node"].as_str().unwrap_or("")))
            .collect();
        if told.iter().filter(|k| k.starts_with("group.failed")).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for want in [
        "resource.failed n1",
        "resource.restarted n1",
        "group.restart_threshold n1",
        "group.failed n1",
        "resource.restarted n2",
        "group.restart_threshold n2",
        "group.failed n2",
    ] {
        assert!(told.iter().any(|k| k == want), "{want} not in {told:#?}");
    }

    // Clear: failures forgotten, it runs again on its first node.
    let (st, v) = post(&format!("{}/v1/groups/db/clear", c.nodes[2].url()), json!({})).await;
    assert_eq!(st, 200, "{v}");
    wait_running_on(&c, "db", "n1", &log).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_standby_and_stop_always_stop_before_starting() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    assert_eq!(put_group(&c, "app", json!({"resources": [logged(&log)], "nodes": ["n1", "n2", "n3"]})).await.0, 201);
    wait_running_on(&c, "app", "n1", &log).await;

    let (st, v) = post(&format!("{}/v1/groups/app/move", c.nodes[2].url()), json!({"to": "n3"})).await;
    assert_eq!(st, 200, "{v}");
    let g = wait_running_on(&c, "app", "n3", &log).await;
    assert_eq!(g["move_to"], Value::Null, "the switchover is done: {g}");

    let (st, _) = post(&format!("{}/v1/nodes/n3/standby", c.nodes[0].url()), json!({})).await;
    assert_eq!(st, 200);
    wait_running_on(&c, "app", "n1", &log).await;

    let (st, v) = post(&format!("{}/v1/groups/app/stop", c.nodes[0].url()), json!({})).await;
    assert_eq!((st, v["enabled"].clone()), (200, json!(false)), "{v}");
    let url = format!("{}/v1/groups/app", c.nodes[1].url());
    wait_until(Duration::from_secs(20), "stopped", || async { get(&url).await.1["state"] == "stopped" }).await;
    assert!(running(&log).is_empty());
    let (st, _) = post(&format!("{}/v1/groups/app/start", c.nodes[0].url()), json!({})).await;
    assert_eq!(st, 200);
    wait_running_on(&c, "app", "n1", &log).await;

    // Every start came after the previous copy's stop, on a newer epoch.
    let ev = events(&log);
    let mut last_epoch = 0;
    let mut live: Option<Event> = None;
    for e in &ev {
        match e.kind.as_str() {
            "start" => {
                assert!(live.is_none(), "start while {live:?} still ran: {ev:?}");
                assert!(e.epoch > last_epoch, "epochs grow: {ev:?}");
                last_epoch = e.epoch;
                live = Some(e.clone());
            }
            _ => {
                assert_eq!(live.as_ref().map(|l| l.pid), Some(e.pid), "{ev:?}");
                live = None;
            }
        }
    }
    let nodes: Vec<&str> = ev.iter().filter(|e| e.kind == "start").map(|e| e.node.as_str()).collect();
    assert_eq!(nodes, ["n1", "n3", "n1", "n1"]);

    // Delete stops it and removes it.
    let (st, v) = delete(&format!("{}/v1/groups/app", c.nodes[2].url())).await;
    assert_eq!(st, 204, "{v}");
    assert!(running(&log).is_empty());
    assert_eq!(get(&url).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_group_definitions_are_refused_whole() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let ok = json!({"resources": [{"name": "s", "type": "process", "command": ["sleep", "100"]}], "nodes": ["n1"]});
    let cases = [
        (json!({"resources": [{"name": "s", "type": "teleport"}], "nodes": ["n1"]}), "resources[0]"),
        (json!({"resources": [{"name": "s", "type": "process"}], "nodes": ["n1"]}), "resources[0]"),
        (
            json!({"resources": [{"name": "s", "type": "process", "command": []}], "nodes": ["n1"]}),
            "resources[0].command",
        ),
        (json!({"resources": [{"name": "s", "type": "process", "command": ["x"]}], "nodes": ["ghost"]}), "nodes[0]"),
        (
            json!({"resources": [{"name": "s", "type": "process", "command": ["x"]}], "nodes": ["n1"], "failback": {"window": "2-4"}}),
            "failback.window",
        ),
        (
            json!({"resources": [{"name": "s", "type": "process", "command": ["x"]}], "nodes": ["n1"], "colocate_with": "nope"}),
            "colocate_with",
        ),
        (
            json!({"resources": [{"name": "s", "type": "process", "command": ["x"]}], "nodes": ["n1"], "colour": "red"}),
            "colour",
        ),
        (
            json!({"resources": [{"name": "u", "type": "systemd", "unit": "a/b.service"}], "nodes": ["n1"]}),
            "resources[0].unit",
        ),
    ];
    let before = get(&format!("{}/v1/groups", c.nodes[0].url())).await.1;
    for (body, field) in cases {
        let (st, v) = put_group(&c, "bad", body.clone()).await;
        assert_eq!((st, v["code"].clone()), (422, json!("TND-1010")), "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{body}: message should name {field}: {v}");
    }
    assert_eq!(get(&format!("{}/v1/groups", c.nodes[0].url())).await.1, before, "refusals changed nothing");
    let (st, v) = put(&format!("{}/v1/groups/bad", c.nodes[0].url()), ok).await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = post(&format!("{}/v1/groups/bad/move", c.nodes[0].url()), json!({"to": "n2"})).await;
    assert_eq!((st, v["code"].clone()), (422, json!("TND-1010")), "n2 is not in its nodes: {v}");
    assert_eq!(get(&format!("{}/v1/groups/none", c.nodes[0].url())).await.1["code"], "TND-1300");
}

fn cli(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN).args(args).env("TANDEM_ENDPOINT", endpoint).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_manages_groups() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    let file = c.tmp.path().join("g.json");
    std::fs::write(&file, json!({"resources": [logged(&log)], "nodes": ["n2", "n1"]}).to_string()).unwrap();
    let u = c.nodes[0].url();
    let (code, out, err) = cli(&u, &["group", "create", "cache", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cache"), "{out}");
    wait_running_on(&c, "cache", "n2", &log).await;
    let (code, out, _) = cli(&u, &["group", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("GROUP") && out.contains("cache") && out.contains("running") && out.contains("n2"), "{out}");
    let (code, _, err) = cli(&u, &["group", "move", "cache", "n1"]);
    assert_eq!(code, 0, "{err}");
    wait_running_on(&c, "cache", "n1", &log).await;
    let (code, out, _) = cli(&c.nodes[2].url(), &["group", "show", "cache", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["node"], "n1");
    let (code, _, err) = cli(&u, &["group", "show", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("TND-1300"), "{err}");
    let (code, _, err) = cli(&u, &["group", "create", "x", "-f", "/nonexistent.json"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&u, &["group", "delete", "cache"]);
    assert_eq!(code, 0, "{err}");
    assert!(running(&log).is_empty());
}

/// An `exec` script agent: start / stop / monitor with OCF exit codes,
/// keeping its state in a file per node.
fn exec_agent(dir: &Path, log: &Path) -> std::path::PathBuf {
    let path = dir.join("agent.sh");
    let d = dir.display();
    let l = log.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nS={d}/$TANDEM_NODE.state\ncase \"$1\" in\n\
             start) touch $S; echo \"start $TANDEM_NODE $TANDEM_EPOCH $$\" >> {l}; exit 0;;\n\
             stop) rm -f $S; echo \"stop $TANDEM_NODE $TANDEM_EPOCH $$\" >> {l}; exit 0;;\n\
             monitor) [ -f $S ] && exit 0 || exit 7;;\n\
             *) exit 3;;\nesac\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn starts(log: &Path) -> Vec<String> {
    events(log).into_iter().filter(|e| e.kind == "start").map(|e| e.node).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_agent_is_monitored_restarted_and_moved() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    let agent = exec_agent(c.tmp.path(), &log);
    let body = json!({"resources": [{"name": "svc", "type": "exec", "path": agent,
                                     "monitor": {"interval_ms": 200, "timeout_ms": 2000}}],
                      "nodes": ["n1", "n2"]});
    assert_eq!(put_group(&c, "script", body).await.0, 201);
    let state = |n: &str| c.tmp.path().join(format!("{n}.state"));
    let url = format!("{}/v1/groups/script", c.nodes[2].url());
    wait_until(Duration::from_secs(15), "running on n1", || async {
        let g = get(&url).await.1;
        g["node"] == "n1" && g["state"] == "running" && state("n1").exists()
    })
    .await;
    // The resource vanishes behind the agent's back: monitor says 7, the
    // agent stops and starts it again in place.
    std::fs::remove_file(state("n1")).unwrap();
    wait_until(Duration::from_secs(10), "restarted by its monitor", || async {
        starts(&log).len() == 2 && state("n1").exists()
    })
    .await;
    assert_eq!(starts(&log), ["n1", "n1"]);
    let (st, _) = post(&format!("{}/v1/groups/script/move", c.nodes[0].url()), json!({"to": "n2"})).await;
    assert_eq!(st, 200);
    wait_until(Duration::from_secs(15), "moved to n2", || async {
        get(&url).await.1["node"] == "n2" && state("n2").exists()
    })
    .await;
    assert!(!state("n1").exists(), "stopped on n1 before n2 started");
    let kinds: Vec<String> = events(&log).into_iter().map(|e| format!("{} {}", e.kind, e.node)).collect();
    assert_eq!(kinds.last().map(String::as_str), Some("start n2"), "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 2], "stop n1", "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unmodified_ocf_agent_runs_and_moves() {
    let dummy = Path::new("/usr/lib/ocf/resource.d/heartbeat/Dummy");
    assert!(dummy.exists(), "OCF agents missing: apt-get install resource-agents (.ci/run does)");
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let body = json!({"resources": [{"name": "d", "type": "ocf", "agent": "heartbeat:Dummy",
                                     "params": {"fake": "42"},
                                     "monitor": {"interval_ms": 300, "timeout_ms": 5000},
                                     "deep_monitor": {"interval_ms": 1000, "timeout_ms": 5000}}],
                      "nodes": ["n2", "n3"]});
    let (st, v) = put_group(&c, "ocf", body).await;
    assert_eq!(st, 201, "{v}");
    // Dummy keeps a state file per instance under HA_RSCTMP, which each
    // agent keeps in its own data_dir.
    let state = |n: &str| c.tmp.path().join(n).join("ocf-run").join("Dummy-ocf-d.state");
    let url = format!("{}/v1/groups/ocf", c.nodes[0].url());
    wait_until(Duration::from_secs(15), "Dummy started on n2", || async {
        let g = get(&url).await.1;
        g["node"] == "n2" && g["state"] == "running" && state("n2").exists()
    })
    .await;
    let (st, _) = post(&format!("{}/v1/nodes/n2/standby", c.nodes[0].url()), json!({})).await;
    assert_eq!(st, 200);
    wait_until(Duration::from_secs(15), "Dummy moved to n3", || async {
        get(&url).await.1["node"] == "n3" && state("n3").exists()
    })
    .await;
    assert!(!state("n2").exists(), "Dummy stop ran on n2");
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_definition_restarts_only_what_changed() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let (la, lb) = (c.tmp.path().join("a"), c.tmp.path().join("b"));
    let url = format!("{}/v1/groups/svc", c.nodes[0].url());
    assert_eq!(put(&url, json!({"resources": [logged_as("a", &la)], "nodes": ["n1"]})).await.0, 201);
    wait_until(Duration::from_secs(15), "a runs", || async { running(&la).len() == 1 }).await;
    let a = running(&la)[0].pid;

    // Adding b after a: a keeps running, b starts.
    let (st, v) = put(&url, json!({"resources": [logged_as("a", &la), logged_as("b", &lb)], "nodes": ["n1"]})).await;
    assert_eq!(st, 200, "{v}");
    wait_until(Duration::from_secs(15), "b runs", || async { running(&lb).len() == 1 }).await;
    assert_eq!(running(&la).iter().map(|e| e.pid).collect::<Vec<_>>(), [a], "unchanged a kept running");
    let b = running(&lb)[0].pid;

    // Changing a restarts a and, after it, b (which may depend on it).
    let mut changed = logged_as("a", &la);
    changed["stop_timeout_ms"] = json!(5000);
    let (st, _) = put(&url, json!({"resources": [changed, logged_as("b", &lb)], "nodes": ["n1"]})).await;
    assert_eq!(st, 200);
    wait_until(Duration::from_secs(15), "both restarted", || async {
        let (ra, rb) = (running(&la), running(&lb));
        ra.len() == 1 && rb.len() == 1 && ra[0].pid != a && rb[0].pid != b
    })
    .await;
    let order: Vec<String> = events(&lb).into_iter().map(|e| e.kind).collect();
    assert_eq!(order, ["start", "stop", "start"]);
}

/// A `sleep` group on the given nodes, with extra fields.
fn sleeper(nodes: &[&str], extra: Value) -> Value {
    let mut g =
        json!({"resources": [{"name": "p", "type": "process", "command": ["sleep", "100000"]}], "nodes": nodes});
    if let (Some(g), Some(e)) = (g.as_object_mut(), extra.as_object()) {
        g.extend(e.clone());
    }
    g
}

#[tokio::test(flavor = "multi_thread")]
async fn n_plus_one_capacity_anti_affinity_and_auto_failback() {
    let mut c = Cluster::start(&["n1", "n2", "n3", "n4"], Opts::default()).await;
    let u = c.nodes[2].url();
    for n in ["n1", "n2", "n3", "n4"] {
        let (st, _) = put(&format!("{u}/v1/nodes/{n}/attributes/capacity"), json!({"value": "1"})).await;
        assert_eq!(st, 200);
    }
    // N+1: three actives, one spare. `a` fails back automatically.
    for (g, home, extra) in [("a", "n1", json!({"failback": "auto"})), ("b", "n2", json!({})), ("c", "n3", json!({}))] {
        let (st, v) = put(&format!("{u}/v1/groups/{g}"), sleeper(&[home, "n4"], extra)).await;
        assert_eq!(st, 201, "{v}");
    }
    let node_of = |g: &'static str| {
        let url = format!("{u}/v1/groups/{g}");
        async move { get(&url).await.1 }
    };
    for (g, home) in [("a", "n1"), ("b", "n2"), ("c", "n3")] {
        wait_until(Duration::from_secs(15), "actives placed", || async { node_of(g).await["node"] == home }).await;
    }
    // n1 dies: the spare takes a. n2 dies too: b cannot stack on the full spare.
    c.node_mut("n1").kill();
    wait_until(Duration::from_secs(15), "a on the spare", || async { node_of("a").await["node"] == "n4" }).await;
    // Let autopilot give n1's vote to n4 first, or losing n2 too loses
    // quorum: n4 a voter and n1 no longer one, in n3's own copy (during the
    // joint change both are voters, and the old set's majority would need
    // n2; n3 must hold the new set to win an election without it).
    let local_cluster = format!("{u}/v1/cluster?stale=true");
    wait_until(Duration::from_secs(20), "n4 votes instead of n1", || async {
        let c = get(&local_cluster).await.1;
        member(&c, "n4")["role"] == "voter" && member(&c, "n1")["role"] != "voter"
    })
    .await;
    c.node_mut("n2").kill();
    wait_until(Duration::from_secs(30), "b stopped for capacity", || async {
        let b = node_of("b").await;
        b["node"].is_null() && b["reason"].as_str().is_some_and(|r| r.contains("capacity"))
    })
    .await;
    assert_eq!(node_of("a").await["node"], "n4", "a is not pushed off the spare");
    // n1 comes back: a fails back (auto), which frees the spare for b.
    c.node_mut("n1").start().await;
    wait_until(Duration::from_secs(20), "a back home", || async { node_of("a").await["node"] == "n1" }).await;
    wait_until(Duration::from_secs(15), "b on the spare", || async { node_of("b").await["node"] == "n4" }).await;
    assert_eq!(node_of("c").await["node"], "n3");

    // Anti-affinity: d avoids c even though both prefer n3.
    let (st, _) = put(&format!("{u}/v1/nodes/n1/attributes/capacity"), json!({"value": "5"})).await;
    assert_eq!(st, 200);
    let (st, v) = put(&format!("{u}/v1/groups/d"), sleeper(&["n3", "n1"], json!({"anti_affinity": ["c"]}))).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(15), "d placed away from c", || async { node_of("d").await["state"] == "running" })
        .await;
    let d = node_of("d").await;
    assert_eq!(d["node"], "n1", "d avoids c's node n3 although it prefers it: {d}");
}

/// The agents' local time of day, in minutes (they read it the same way).
fn local_minute() -> u32 {
    let out = std::process::Command::new("date").arg("+%H %M").output().unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    let mut it = s.split_whitespace().map(|x| x.parse::<u32>().unwrap());
    it.next().unwrap() * 60 + it.next().unwrap()
}

fn hhmm(minute: u32) -> String {
    let m = minute % (24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[tokio::test(flavor = "multi_thread")]
async fn windowed_failback_waits_for_its_window() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let u = c.nodes[1].url();
    let now = local_minute();
    // One window open now (for the next hour), one that opens in two hours.
    let open = format!("{}-{}", hhmm(now + 24 * 60 - 1), hhmm(now + 60));
    let closed = format!("{}-{}", hhmm(now + 120), hhmm(now + 180));
    for (g, window) in [("open", &open), ("closed", &closed)] {
        let (st, v) =
            put(&format!("{u}/v1/groups/{g}"), sleeper(&["n1", "n2"], json!({"failback": {"window": window}}))).await;
        assert_eq!(st, 201, "{v}");
    }
    let node_of = |g: &'static str| {
        let url = format!("{u}/v1/groups/{g}");
        async move { get(&url).await.1["node"].clone() }
    };
    for g in ["open", "closed"] {
        wait_until(Duration::from_secs(15), "placed on n1", || async { node_of(g).await == "n1" }).await;
    }
    c.node_mut("n1").kill();
    for g in ["open", "closed"] {
        wait_until(Duration::from_secs(15), "failed over to n2", || async { node_of(g).await == "n2" }).await;
    }
    c.node_mut("n1").start().await;
    wait_until(Duration::from_secs(20), "failback inside its window", || async { node_of("open").await == "n1" }).await;
    // Give the other every chance to move too: it must wait for 2 hours from now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node_of("closed").await, "n2", "no failback outside the window {closed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn m_plus_n_two_spares_absorb_two_failures() {
    // M+N: three actives (n1..n3) backed by two spares (n4, n5), one group
    // per node at most. Five voters, so that two deaths keep the quorum.
    let mut c = Cluster::start(&["n1", "n2", "n3", "n4", "n5"], Opts { voters: 5, ..Opts::default() }).await;
    let u = c.nodes[2].url();
    for n in ["n1", "n2", "n3", "n4", "n5"] {
        let (st, _) = put(&format!("{u}/v1/nodes/{n}/attributes/capacity"), json!({"value": "1"})).await;
        assert_eq!(st, 200);
    }
    for (g, home) in [("a", "n1"), ("b", "n2"), ("c", "n3")] {
        let (st, v) = put(&format!("{u}/v1/groups/{g}"), sleeper(&[home, "n4", "n5"], json!({}))).await;
        assert_eq!(st, 201, "{v}");
    }
    let node_of = |g: &'static str| {
        let url = format!("{u}/v1/groups/{g}");
        async move { get(&url).await.1["node"].clone() }
    };
    for (g, home) in [("a", "n1"), ("b", "n2"), ("c", "n3")] {
        wait_until(Duration::from_secs(15), "actives placed", || async { node_of(g).await == home }).await;
    }
    c.node_mut("n1").kill();
    wait_until(Duration::from_secs(15), "a on the first spare", || async { node_of("a").await == "n4" }).await;
    c.node_mut("n2").kill();
    wait_until(Duration::from_secs(15), "b on the second spare", || async { node_of("b").await == "n5" }).await;
    assert_eq!(node_of("a").await, "n4", "a stays");
    assert_eq!(node_of("c").await, "n3", "c never moved");
    // Each node runs exactly one group: capacity held through both failures.
    let all = get(&format!("{u}/v1/groups")).await.1;
    let mut placed: Vec<&str> = all.as_array().unwrap().iter().filter_map(|g| g["node"].as_str()).collect();
    placed.sort();
    assert_eq!(placed, ["n3", "n4", "n5"], "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_unit_resource() {
    if !Path::new("/run/systemd/system").exists() {
        eprintln!("skipped: systemd is not running on this machine (no /run/systemd/system)");
        return;
    }
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let unit = format!("tandem-test-{}.service", std::process::id());
    let path = Path::new("/run/systemd/system").join(&unit);
    std::fs::write(&path, "[Service]\nExecStart=/bin/sleep 3600\n").unwrap();
    assert!(std::process::Command::new("systemctl").arg("daemon-reload").status().unwrap().success());
    let body = json!({"resources": [{"name": "u", "type": "systemd", "unit": unit}], "nodes": ["n1", "n2"]});
    assert_eq!(put_group(&c, "sd", body).await.0, 201);
    let active =
        || std::process::Command::new("systemctl").args(["is-active", "--quiet", &unit]).status().unwrap().success();
    wait_until(Duration::from_secs(15), "unit started", || async { active() }).await;
    // Stopped by hand: the monitor notices, the unit is started again.
    assert!(std::process::Command::new("systemctl").args(["stop", &unit]).status().unwrap().success());
    wait_until(Duration::from_secs(15), "unit restarted", || async { active() }).await;
    let (st, _) = post(&format!("{}/v1/groups/sd/stop", c.nodes[0].url()), json!({})).await;
    assert_eq!(st, 200);
    wait_until(Duration::from_secs(15), "unit stopped", || async { !active() }).await;
    let _ = std::fs::remove_file(&path);
    let _ = std::process::Command::new("systemctl").arg("daemon-reload").status();
}

#[tokio::test(flavor = "multi_thread")]
async fn fence_command_must_confirm_before_a_dead_nodes_group_moves() {
    // A fence script that refuses until the test allows it (as a BMC that
    // does not answer, then does).
    let tmp = tempfile::tempdir().unwrap();
    let (calls, allow) = (tmp.path().join("calls"), tmp.path().join("allow"));
    let script = tmp.path().join("fence.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $TANDEM_FENCE_NODE\" >> {}\n[ -e {} ] || {{ echo 'BMC unreachable' >&2; exit 1; }}\n",
            calls.display(),
            allow.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let extra = format!("[fencing]\nfence_command = [\"{}\"]\n", script.display());
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts { extra, ..Opts::default() }).await;
    let log = c.tmp.path().join("events");
    assert_eq!(put_group(&c, "web", json!({"resources": [logged(&log)], "nodes": ["n1", "n2", "n3"]})).await.0, 201);
    wait_running_on(&c, "web", "n1", &log).await;

    c.node_mut("n1").kill();
    wait_until(Duration::from_secs(10), "a fence attempt", || async {
        std::fs::read_to_string(&calls).is_ok_and(|s| s.contains("n1 n1"))
    })
    .await;
    // Fencing fails: however long the lease has been over, the group stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let g = group(&c, "web").await;
    assert_eq!(g["node"], "n1", "not moved without a confirmed fence: {g}");
    assert!(running(&log).is_empty(), "n1's copy died with it, nothing else started");
    let attempts = std::fs::read_to_string(&calls).unwrap().lines().count();
    assert!(attempts >= 2, "failed attempts are retried: {attempts}");

    std::fs::write(&allow, "").unwrap();
    let g = wait_running_on(&c, "web", "n2", &log).await;
    assert!(g["reason"].as_str().unwrap().contains("n1"), "{g}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_fence_moves_a_hung_nodes_group_without_waiting_out_the_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    // "Power off": kill every process of the node's session, as its BMC
    // would, and confirm; until `allow` exists the BMC does not answer.
    let fence = tmp.path().join("fence.sh");
    write_script(
        &fence,
        &format!(
            "#!/bin/sh\necho \"$1\" >> {d}/calls\n[ -e {d}/allow ] || {{ echo 'BMC unreachable' >&2; exit 1; }}\n\
             pkill -9 -s \"$(cat {d}/sid.$1)\"\nexit 0\n"
        ),
    );
    // A lease wait of 15.5 s: a group that moves sooner moved on the
    // confirmation alone.
    let extra = format!("[fencing]\nmargin_ms = 15000\nfence_command = [\"{}\"]\n", fence.display());
    let c = Cluster::start(&["n1", "n2", "n3"], Opts { extra, ..Opts::default() }).await;
    let (leader, victim, target) = leader_and_two_others(&c).await;
    let sid = c.node(&victim).sessions[0];
    std::fs::write(tmp.path().join(format!("sid.{victim}")), sid.to_string()).unwrap();
    let log = c.tmp.path().join("events");
    let body = json!({"resources": [logged(&log)], "nodes": [victim, target]});
    assert_eq!(put_group(&c, "web", body).await.0, 201);
    wait_running_on(&c, "web", &victim, &log).await;
    // Its claim showed the leader it held its lease: for the lease wait
    // after it, the node is taken as alive whatever the reports say (and
    // not fenced). Past that, only its heartbeats count.
    tokio::time::sleep(Duration::from_millis(15_500)).await;
    let watcher = OverlapWatcher::start(&log);

    // The node hangs (agent, watchdog and the group's process frozen): it
    // is silent, and its copy of the group would run on if it woke up.
    assert!(std::process::Command::new("pkill").args(["-STOP", "-s", &sid.to_string()]).status().unwrap().success());
    let calls = tmp.path().join("calls");
    wait_until(Duration::from_secs(15), "a failed fence attempt and its retry", || async {
        std::fs::read_to_string(&calls).is_ok_and(|s| s.lines().count() >= 2)
    })
    .await;
    // Unconfirmed: nothing moves, not even early.
    let g = group(&c, "web").await;
    assert_eq!(g["node"], victim.as_str(), "not moved without a confirmed fence: {g}");
    assert!(running(&log).iter().all(|e| e.node == victim), "{:?}", running(&log));

    // The BMC answers: the next attempt powers the node off and confirms,
    // and the group starts on the target long before the lease wait is over.
    std::fs::write(tmp.path().join("allow"), "").unwrap();
    let g = wait_running_on(&c, "web", &target, &log).await;
    assert!(g["reason"].as_str().unwrap().contains(victim.as_str()), "{g}");
    let overlaps = watcher.finish();
    assert!(overlaps.is_empty(), "the group ran on two nodes at once: {overlaps:?}");

    // The log's order: failed attempts, the confirmation, then the move and
    // the start elsewhere; the outage (from the node's silence) is shorter
    // than the lease wait.
    let u = c.node(&leader).url();
    let id_of = |evs: &[Value], kind: &str, node: &str| {
        evs.iter().find(|e| e["kind"] == kind && e["node"] == node).and_then(|e| e["id"].as_u64())
    };
    let mut evs: Vec<Value> = Vec::new();
    for _ in 0..100 {
        evs = get(&format!("{u}/v1/events?since=0&limit=10000")).await.1["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if id_of(&evs, "group.running", &target).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = id_of(&evs, "fence.failed", &victim).expect("a failed attempt");
    let confirmed = id_of(&evs, "fence.confirmed", &victim).expect("a confirmation");
    let moved = evs.iter().find(|e| e["kind"] == "group.moved").and_then(|e| e["id"].as_u64()).expect("the move");
    let started = id_of(&evs, "group.running", &target).expect("the start on the target");
    assert!(failed < confirmed && confirmed < moved && moved < started, "{failed} {confirmed} {moved} {started}");
    let running_ev = evs.iter().find(|e| e["id"] == started).unwrap();
    let outage = running_ev["details"]["outage_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(outage < 15_000, "moved before the lease wait was over: {running_ev}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_stop_blocks_the_move_until_the_stop_succeeds() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let dir = c.tmp.path().to_path_buf();
    // An exec agent whose stop fails while `stuck` exists; its state file
    // (per node) says whether it runs.
    let script = dir.join("sticky.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nstate={d}/sticky.$TANDEM_NODE\ncase \"$1\" in\n\
             start) touch $state ;;\n\
             stop) [ -e {d}/stuck ] && {{ echo 'device busy' >&2; exit 1; }}; rm -f $state ;;\n\
             monitor) [ -e $state ] || exit 7 ;;\nesac\nexit 0\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let body = json!({"resources": [{"name": "s", "type": "exec", "path": script.display().to_string(),
                                     "monitor": {"interval_ms": 200, "timeout_ms": 5000}}],
                      "nodes": ["n1", "n2"]});
    assert_eq!(put_group(&c, "sticky", body).await.0, 201);
    let u = c.nodes[0].url();
    wait_until(Duration::from_secs(15), "running on n1", || async {
        get(&format!("{u}/v1/groups/sticky")).await.1["state"] == "running" && dir.join("sticky.n1").exists()
    })
    .await;

    std::fs::write(dir.join("stuck"), "").unwrap();
    let (st, v) = post(&format!("{u}/v1/groups/sticky/move"), json!({"to": "n2"})).await;
    assert_eq!(st, 200, "{v}");
    wait_until(Duration::from_secs(10), "the failed stop shows", || async {
        let g = get(&format!("{u}/v1/groups/sticky")).await.1;
        g["resources"][0]["state"] == "stop_failed"
            && g["resources"][0]["last_error"].as_str().is_some_and(|e| e.contains("stop failed"))
    })
    .await;
    // Blocked: the old copy may still run, so nothing starts on n2.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let g = get(&format!("{u}/v1/groups/sticky")).await.1;
    assert_eq!((g["node"].as_str(), g["state"].as_str()), (Some("n1"), Some("moving")), "{g}");
    assert!(!dir.join("sticky.n2").exists(), "never started on n2 while n1 may run it");

    // The operator frees the resource: the next retry stops it, then it moves.
    std::fs::remove_file(dir.join("stuck")).unwrap();
    wait_until(Duration::from_secs(15), "moved to n2", || async {
        let g = get(&format!("{u}/v1/groups/sticky")).await.1;
        g["node"] == "n2" && g["state"] == "running" && dir.join("sticky.n2").exists()
    })
    .await;
    assert!(!dir.join("sticky.n1").exists(), "stopped on n1 first");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_stop_escalates_to_fencing_when_a_fence_command_is_set() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    // "Power off": kill every process of the node's session, as its BMC would.
    let fence = tmp.path().join("fence.sh");
    std::fs::write(&fence, format!("#!/bin/sh\necho \"$1\" >> {d}/calls\npkill -9 -s \"$(cat {d}/sid.$1)\"\nexit 0\n"))
        .unwrap();
    std::fs::set_permissions(&fence, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = tmp.path().join("sticky.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nstate={d}/sticky.$TANDEM_NODE\ncase \"$1\" in\n\
             start) touch $state ;;\n\
             stop) [ -e {d}/stuck.$TANDEM_NODE ] && {{ echo 'device busy' >&2; exit 1; }}; rm -f $state ;;\n\
             monitor) [ -e $state ] || exit 7 ;;\nesac\nexit 0\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let extra = format!("[fencing]\nfence_command = [\"{}\"]\n", fence.display());
    let c = Cluster::start(&["n1", "n2", "n3"], Opts { extra, ..Opts::default() }).await;
    // The group's home is a node that does not lead: the leader fences it.
    let (leader, victim, target) = leader_and_two_others(&c).await;
    std::fs::write(tmp.path().join(format!("sid.{victim}")), c.node(&victim).sessions[0].to_string()).unwrap();
    std::fs::write(tmp.path().join(format!("stuck.{victim}")), "").unwrap();
    let body = json!({"resources": [{"name": "s", "type": "exec", "path": script.display().to_string()}],
                      "nodes": [victim, target]});
    assert_eq!(put_group(&c, "sticky", body).await.0, 201);
    let u = c.node(&leader).url();
    wait_until(Duration::from_secs(15), "running on its home", || async {
        get(&format!("{u}/v1/groups/sticky")).await.1["node"] == victim.as_str()
            && tmp.path().join(format!("sticky.{victim}")).exists()
    })
    .await;
    // Its home cannot stop it: the leader powers that node off, then the group moves.
    let (st, v) = post(&format!("{u}/v1/groups/sticky/move"), json!({"to": target})).await;
    assert_eq!(st, 200, "{v}");
    wait_until(Duration::from_secs(20), "home fenced, the group on the target", || async {
        let g = get(&format!("{u}/v1/groups/sticky")).await.1;
        g["node"] == target.as_str() && g["state"] == "running" && tmp.path().join(format!("sticky.{target}")).exists()
    })
    .await;
    let calls = std::fs::read_to_string(tmp.path().join("calls")).unwrap();
    assert!(!calls.is_empty() && calls.lines().all(|l| l == victim), "only {victim} was fenced: {calls}");
    assert!(c.node(&victim).watchdog_pid().is_none(), "{victim} is off");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_runs_as_its_user_and_stops_with_its_stop_signal() {
    let c = Cluster::start(&["n1"], Opts { voters: 1, ..Opts::default() }).await;
    let root = tandem_testkit::is_root();
    // Only root can run a process as another user; the signal works for all.
    let mut res = json!({"name": "srv", "type": "process", "stop_signal": "SIGINT",
        "command": ["python3", "-c",
            "import os, signal, sys, time\n\
             print('uid', os.getuid(), os.environ.get('HOME'), flush=True)\n\
             def bye(sig, _):\n    print('got', signal.Signals(sig).name, flush=True); sys.exit(0)\n\
             signal.signal(signal.SIGINT, bye)\n\
             signal.signal(signal.SIGTERM, bye)\n\
             time.sleep(1000)"]});
    if root {
        res["user"] = json!("nobody");
    }
    let (st, v) = put(&format!("{}/v1/groups/s", c.nodes[0].url()), json!({"resources": [res], "nodes": ["n1"]})).await;
    assert_eq!(st, 201, "{v}");
    let log = c.tmp.path().join("n1").join("groups").join("s").join("srv.log");
    wait_until(Duration::from_secs(10), "the process says who it is", || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("uid "))
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    if root {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let want = format!("uid {} {}", nobody.uid, nobody.dir.display());
        assert!(text.contains(&want), "{text}");
    }
    let (st, _) = post(&format!("{}/v1/groups/s/stop", c.nodes[0].url()), json!({})).await;
    assert_eq!(st, 200);
    wait_until(Duration::from_secs(10), "the process got its stop signal", || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("got "))
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("got SIGINT"), "{text}");

    // An unknown user is refused at definition, and nothing changes.
    let bad = json!({"resources": [{"name": "p", "type": "process", "command": ["true"], "user": "no-such-user-x"}],
        "nodes": ["n1"]});
    let (st, v) = put(&format!("{}/v1/groups/u", c.nodes[0].url()), bad).await;
    assert_eq!(st, 422, "{v}");
    assert!(v.to_string().contains("resources[0].user"), "{v}");
    let (st, _) = get(&format!("{}/v1/groups/u", c.nodes[0].url())).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_expires_after_the_groups_failure_timeout() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    // Fails at once on n1, runs elsewhere.
    let def = json!({
        "resources": [{"name": "p", "type": "process",
                       "command": ["sh", "-c", "[ \"$TANDEM_NODE\" != n1 ] && exec sleep 1000"]}],
        "nodes": ["n1", "n2", "n3"], "max_restarts": 0, "failure_timeout_ms": 2000,
    });
    let (st, v) = put_group(&c, "f", def).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(15), "it fails on n1 and runs on n2", || async {
        let g = group(&c, "f").await;
        g["node"] == "n2" && g["failed_on"] == json!(["n1"])
    })
    .await;
    // The failure on n1 expires; the group stays where it runs (manual failback).
    wait_until(Duration::from_secs(10), "the failure on n1 expires", || async {
        group(&c, "f").await["failed_on"] == json!([])
    })
    .await;
    assert_eq!(group(&c, "f").await["node"], "n2");
    // Refused: a timeout under a second.
    let bad = json!({"resources": [{"name": "p", "type": "process", "command": ["true"]}],
                     "nodes": ["n1"], "failure_timeout_ms": 10});
    let (st, v) = put_group(&c, "g", bad).await;
    assert_eq!(st, 422, "{v}");
    assert!(v.to_string().contains("failure_timeout_ms"), "{v}");
}
