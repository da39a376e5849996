//! Real multi-node clusters on loopback: election, replication, forwarding,
//! crash recovery, membership changes and autopilot.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Writes attribute `key` on node `on` through any live node, retrying while
/// the cluster is unavailable. Returns true once acknowledged (HTTP 200).
async fn write_attr(urls: &[String], on: &str, key: &str, value: &str, tries: usize) -> bool {
    for t in 0..tries {
        let u = &urls[t % urls.len()];
        let (st, _) = put(&format!("{u}/v1/nodes/{on}/attributes/{key}"), json!({ "value": value })).await;
        match st {
            200 => return true,
            0 | 503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("write {key} got HTTP {other}"),
        }
    }
    false
}

fn attrs(cluster: &Value, name: &str) -> serde_json::Map<String, Value> {
    member(cluster, name)["attributes"].as_object().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_elect_replicate_and_forward() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let leader = c.leader().await;
    let cluster = c.cluster().await;
    assert_eq!(cluster["cluster_id"], "test");
    assert_eq!(voters(&cluster).len(), 3);
    for n in &c.nodes {
        let m = member(&cluster, &n.name);
        assert_eq!(m["pid"], json!(n.pid().unwrap()), "pid of {}", n.name);
        assert_eq!(m["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(m["state"], "online");
        assert_eq!(m["leader"], json!(n.name == leader));
    }

    // A write through a follower is forwarded; a linearizable read through
    // another follower sees it at once.
    let followers: Vec<&Node> = c.nodes.iter().filter(|n| n.name != leader).collect();
    let (st, v) = put(&format!("{}/v1/nodes/n1/attributes/rack", followers[0].url()), json!({"value": "r7"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["attributes"]["rack"], "r7");
    let (st, v) = get(&format!("{}/v1/nodes/n1", followers[1].url())).await;
    assert_eq!(st, 200);
    assert_eq!(v["attributes"]["rack"], "r7", "linearizable read through a follower must see an acknowledged write");

    // Admin state changes replicate to every node's local copy.
    let (st, v) = post(&format!("{}/v1/nodes/n2/standby", followers[1].url()), json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "standby");
    for n in &c.nodes {
        let url = format!("{}/v1/nodes/n2?stale=true", n.url());
        wait_until(Duration::from_secs(5), "standby replicated", || async {
            get(&url).await.1["admin_state"] == "standby"
        })
        .await;
    }
    let (st, v) = post(&format!("{}/v1/nodes/n2/online", c.nodes[2].url()), json!({})).await;
    assert_eq!((st, v["state"].clone()), (200, json!("online")));
    let (st, v) = post(&format!("{}/v1/nodes/n3/maintenance", c.nodes[0].url()), json!({})).await;
    assert_eq!((st, v["state"].clone()), (200, json!("maintenance")));

    // Every node is ready; health answers.
    for n in &c.nodes {
        assert_eq!(get(&format!("{}/readyz", n.url())).await.0, 200);
        let (st, local) = get(&format!("{}/v1/local", n.url())).await;
        assert_eq!(st, 200);
        assert_eq!(local["leader"], json!(leader));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_sigkill_keeps_every_acknowledged_write() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let leader = c.leader().await;
    let mut acked = Vec::new();
    for i in 0..60 {
        if i == 20 {
            c.node_mut(&leader).kill();
        }
        let urls = c.live_urls();
        let key = format!("k{i}");
        if write_attr(&urls, "n1", &key, &i.to_string(), 100).await {
            acked.push(key);
        }
    }
    assert!(acked.len() >= 50, "the survivors should accept writes after the election: {}", acked.len());
    c.new_leader(&leader).await;
    let cluster = c.cluster().await;
    let have = attrs(&cluster, "n1");
    for k in &acked {
        assert!(have.contains_key(k), "acknowledged write {k} lost after leader crash");
    }
    assert_eq!(member(&cluster, &leader)["state"], "offline");

    // The killed node restarts from its disk and catches up by itself.
    c.node_mut(&leader).start().await;
    let url = format!("{}/v1/nodes?stale=true", c.node(&leader).url());
    wait_until(Duration::from_secs(20), "restarted node catches up", || async {
        let (st, v) = get(&url).await;
        st == 200
            && v.as_array().is_some_and(|ms| {
                ms.iter().any(|m| m["name"] == "n1" && acked.iter().all(|k| m["attributes"].get(k).is_some()))
            })
    })
    .await;
    let url = format!("{}/v1/cluster", c.nodes[0].url());
    wait_until(Duration::from_secs(10), "restarted node online", || async {
        get(&url).await.1["members"].as_array().is_some_and(|ms| ms.iter().all(|m| m["state"] == "online"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_restart_from_disk_keeps_state() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    for i in 0..10 {
        assert!(write_attr(&c.live_urls(), "n2", &format!("a{i}"), "x", 50).await);
    }
    let before = c.cluster().await;
    for n in c.nodes.iter_mut() {
        n.kill();
    }
    for n in c.nodes.iter_mut() {
        n.start().await;
    }
    c.leader().await;
    let after = c.cluster().await;
    assert_eq!(replicated(&after), replicated(&before));
    // Still writable.
    assert!(write_attr(&c.live_urls(), "n2", "after", "y", 50).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn join_leave_force_remove_and_rejoin() {
    let mut c = Cluster::start(&["n1", "n2", "n3", "n4"], Opts::default()).await;
    let cluster = c.cluster().await;
    assert_eq!(voters(&cluster).len(), 3);
    let learners = members_with(&cluster, |m| m["role"] == "learner");
    assert_eq!(learners.len(), 1);

    // Graceful leave of a learner: it forgets the cluster and may rejoin.
    let l = learners[0].clone();
    // (A leave needs the node heard: a node that just joined is heard once
    // it has the membership and its first heartbeats arrive.)
    let url = format!("{}/v1/cluster", c.nodes[0].url());
    wait_until(Duration::from_secs(10), "the learner online", || async {
        member(&get(&url).await.1, &l)["state"] == "online"
    })
    .await;
    // On a loaded machine the leader may miss the learner's heartbeats for
    // a moment (409 TND-1103, nothing changed): asked again, it leaves.
    let mut tries = 0;
    let (st, body) = loop {
        let (st, body) = delete(&format!("{}/v1/nodes/{l}", c.nodes[0].url())).await;
        tries += 1;
        if st != 409 || body["code"] != "TND-1103" || tries == 20 {
            break (st, body);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(st, 204, "{body}");
    let cluster = c.cluster().await;
    assert!(member_names(&cluster).iter().all(|n| *n != l));
    let (_, local) = get(&format!("{}/v1/local", c.node(&l).url())).await;
    assert_eq!(local["cluster_id"], Value::Null, "a removed node forgets its cluster");
    let old_id = member(&cluster, "n1")["id"].clone();
    c.join(c.idx(&l)).await;
    let cluster = c.cluster().await;
    let rejoined = member(&cluster, &l);
    assert!(rejoined["id"].as_u64() > Some(4), "ids are never reused: {rejoined}");
    assert_eq!(member(&cluster, "n1")["id"], old_id);

    // A dead node is refused without force, and the refusal changes nothing.
    let victim = c.nodes.iter().map(|n| n.name.clone()).find(|n| *n != l && *n != "n1").unwrap();
    c.node_mut(&victim).kill();
    // The same, spelled out: a vote request from anything but a member's
    // certificate is refused before it reaches Raft — even with the admin
    // token (a person is not a node).
    let vote = json!({"vote": {"leader_id": {"term": 9999, "node_id": 77}, "committed": false}, "last_log_id": null});
    let url = format!("{}/internal/raft/vote", c.node("n1").url());
    let (st, v) = call(Method::POST, &url, Some(serde_json::to_vec(&vote).unwrap())).await;
    assert_eq!((st, v["code"].clone()), (403, json!("TND-1502")), "{v}");
    let (st, v) = call_as("", Method::POST, &url, Some(serde_json::to_vec(&vote).unwrap())).await;
    assert_eq!((st, v["code"].clone()), (401, json!("TND-1500")), "{v}");
    assert!(c.cluster().await["term"].as_u64() < Some(9999));
    let url = format!("{}/v1/cluster", c.nodes[0].url());
    wait_until(Duration::from_secs(10), "victim offline", || async {
        member(&get(&url).await.1, &victim)["state"] == "offline"
    })
    .await;
    let before = replicated(&c.cluster().await);
    let (st, body) = delete(&format!("{}/v1/nodes/{victim}", c.nodes[0].url())).await;
    assert_eq!((st, body["code"].clone()), (409, json!("TND-1103")), "{body}");
    assert_eq!(replicated(&c.cluster().await), before);
    let (st, body) = delete(&format!("{}/v1/nodes/{victim}?force=true", c.nodes[0].url())).await;
    assert_eq!(st, 204, "{body}");
    let cluster = c.cluster().await;
    assert!(!member_names(&cluster).contains(&victim));
    assert_eq!(voters(&cluster).len(), 3, "a learner took the removed voter's vote");

    // Back from the dead with its old identity, the removed node must not
    // disturb the cluster: its vote requests are refused, so the term holds.
    let term = cluster["term"].clone();
    c.node_mut(&victim).start().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let cluster = c.cluster().await;
    assert_eq!(cluster["term"], term, "a removed node forced an election");
    assert!(!member_names(&cluster).contains(&victim));
    c.node_mut(&victim).kill();

    // The leader itself can leave; another node takes over.
    let leader = c.leader().await;
    let other = c.nodes.iter().find(|n| n.name != leader && n.child.is_some()).unwrap().url();
    let (st, body) = delete(&format!("{other}/v1/nodes/{leader}")).await;
    assert_eq!(st, 204, "{body}");
    let (_, local) = get(&format!("{}/v1/local", c.node(&leader).url())).await;
    assert_eq!(local["cluster_id"], Value::Null, "the old leader forgot its cluster: {local}");
    c.node_mut(&leader).kill();
    c.new_leader(&leader).await;
    let cluster = c.cluster().await;
    assert!(!member_names(&cluster).contains(&leader));
}

fn member_names(cluster: &Value) -> Vec<String> {
    members_with(cluster, |_| true)
}

#[tokio::test(flavor = "multi_thread")]
async fn autopilot_replaces_a_dead_voter_with_a_learner() {
    let mut c = Cluster::start(&["n1", "n2", "n3", "n4"], Opts::default()).await;
    let leader = c.leader().await;
    let cluster = c.cluster().await;
    let learner = members_with(&cluster, |m| m["role"] == "learner")[0].clone();
    let victim = voters(&cluster).into_iter().find(|v| *v != leader).unwrap();
    c.node_mut(&victim).kill();
    let urls = c.live_urls();
    wait_until(Duration::from_secs(30), "learner promoted", || async {
        let (st, v) = get(&format!("{}/v1/cluster", urls[0])).await;
        st == 200 && member(&v, &learner)["role"] == "voter" && member(&v, &victim)["role"] == "learner"
    })
    .await;
    let cluster = c.cluster().await;
    assert_eq!(member(&cluster, &victim)["state"], "offline");
    assert_eq!(voters(&cluster).len(), 3);
    // The demoted node comes back as a learner and catches up.
    c.node_mut(&victim).start().await;
    let url = format!("{}/v1/cluster", urls[0]);
    wait_until(Duration::from_secs(20), "victim back online", || async {
        member(&get(&url).await.1, &victim)["state"] == "online"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_voters_and_ten_learners() {
    let names: Vec<String> = (1..=15).map(|i| format!("n{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut c = Cluster::start(&refs, Opts { voters: 5, ..Opts::default() }).await;
    let cluster = c.cluster().await;
    assert_eq!(voters(&cluster).len(), 5);
    assert_eq!(members_with(&cluster, |m| m["role"] == "learner").len(), 10);
    let url = format!("{}/v1/cluster", c.nodes[0].url());
    wait_until(Duration::from_secs(10), "every node heard from", || async {
        members_with(&get(&url).await.1, |m| m["state"] == "online").len() == 15
    })
    .await;
    // Losing the leader: a voter takes over and autopilot restores 5 voters.
    let leader = c.leader().await;
    c.node_mut(&leader).kill();
    let new_leader = c.new_leader(&leader).await;
    assert!(voters(&cluster).contains(&new_leader), "only a voter can lead");
    let urls = c.live_urls();
    wait_until(Duration::from_secs(40), "5 live voters again", || async {
        let (st, v) = get(&format!("{}/v1/cluster", urls[0])).await;
        st == 200 && voters(&v).iter().filter(|n| **n != leader).count() == 5
    })
    .await;
    assert!(write_attr(&urls, "n01", "still", "writable", 50).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_and_a_witness_survive_either_server() {
    let mut c = Cluster::configure(&["a", "b"], Opts::default());
    c.add_config("w", "witness = true");
    for n in c.nodes.iter_mut() {
        n.start().await;
    }
    c.init(0, "test").await;
    c.join(1).await;
    c.join(2).await;
    c.wait_voters(3).await;
    let cluster = c.cluster().await;
    assert_eq!(member(&cluster, "w")["role"], "witness");
    assert_eq!(member(&cluster, "a")["role"], "voter");
    assert_eq!(member(&cluster, "b")["role"], "voter");

    for server in ["a", "b"] {
        c.node_mut(server).kill();
        assert!(
            write_attr(&c.live_urls(), "w", &format!("without-{server}"), "ok", 100).await,
            "writes without {server}"
        );
        let urls = c.live_urls();
        wait_until(Duration::from_secs(10), "server offline", || async {
            let (st, v) = get(&format!("{}/v1/cluster", urls[0])).await;
            st == 200 && member(&v, server)["state"] == "offline"
        })
        .await;
        assert!(attrs(&c.cluster().await, "w").contains_key(&format!("without-{server}")));
        c.node_mut(server).start().await;
        let urls = c.live_urls();
        wait_until(Duration::from_secs(20), "server back", || async {
            let (st, v) = get(&format!("{}/v1/cluster", urls[0])).await;
            st == 200 && member(&v, server)["state"] == "online"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_is_built_purged_and_installed_on_a_new_node() {
    let opts = Opts {
        extra: "[raft]\nsnapshot_after_entries = 20\nkeep_entries_after_snapshot = 5\n".into(),
        ..Opts::default()
    };
    let mut c = Cluster::start(&["n1", "n2", "n3"], opts).await;
    for i in 0..80 {
        let on = format!("n{}", i % 3 + 1);
        assert!(write_attr(&c.live_urls(), &on, &format!("s{i}"), &i.to_string(), 50).await);
    }
    let leader = c.leader().await;
    let url = format!("{}/v1/local", c.node(&leader).url());
    wait_until(Duration::from_secs(10), "log purged behind a snapshot", || async {
        let (_, v) = get(&url).await;
        v["snapshot_index"].as_u64().unwrap_or(0) >= 20 && v["purged_index"].as_u64().unwrap_or(0) > 0
    })
    .await;
    // A new node can only get the early entries from the snapshot.
    let i = c.add_config("n4", "");
    c.nodes[i].start().await;
    c.join(i).await;
    let url = format!("{}/v1/nodes?stale=true", c.nodes[i].url());
    wait_until(Duration::from_secs(20), "new node has every entry", || async {
        let (st, v) = get(&url).await;
        let Some(nodes) = v.as_array() else {
            return false;
        };
        st == 200 && (0..80).all(|k| nodes.iter().any(|n| n["attributes"].get(format!("s{k}")).is_some()))
    })
    .await;
    let (_, local) = get(&format!("{}/v1/local", c.nodes[i].url())).await;
    assert!(local["snapshot_index"].as_u64().unwrap_or(0) > 0, "n4 installed a snapshot: {local}");
}

#[tokio::test(flavor = "multi_thread")]
async fn any_node_answers_stale_reads_without_a_leader() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let leader = c.leader().await;
    let others: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).filter(|n| *n != leader).collect();
    c.node_mut(&others[0]).kill();
    c.node_mut(&leader).kill();
    // One node of three: no quorum. Linearizable reads and writes refuse
    // with 503 and Retry-After; stale reads still answer.
    let u = c.node(&others[1]).url();
    wait_until(Duration::from_secs(20), "no-quorum refusal", || async {
        let (st, v) = get(&format!("{u}/v1/cluster")).await;
        st == 503 && ["TND-1202", "TND-1203", "TND-1204"].contains(&v["code"].as_str().unwrap_or(""))
    })
    .await;
    let stale_url = format!("{u}/v1/cluster?stale=true");
    wait_until(Duration::from_secs(10), "old leader offline in the stale view", || async {
        let (st, v) = get(&stale_url).await;
        st == 200 && member(&v, &leader)["state"] == "offline"
    })
    .await;
    let (st, v) = put(&format!("{u}/v1/nodes/n1/attributes/x"), json!({"value": "y"})).await;
    assert_eq!(st, 503, "{v}");
    let (st, _) = get(&format!("{u}/readyz")).await;
    assert!(st == 503 || st == 200);
    let stale = get(&format!("{u}/v1/cluster?stale=true")).await.1;
    let names: BTreeSet<String> = members_with(&stale, |_| true).into_iter().collect();
    assert_eq!(names.len(), 3);
}
