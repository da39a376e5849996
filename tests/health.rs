//! Load-balancer health endpoints on a real cluster (agents on loopback):
//! `/v1/groups/{name}/health` answers 200 on the one node that serves the
//! group and 503 everywhere else — sampled all through a failover, never
//! two at once — and stops answering 200 when that node's lease lapses;
//! `/v1/volumes/{name}/primary` and `/replica?lag=` follow the volume.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

async fn status(method: Method, url: &str) -> u16 {
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(3)).build().unwrap();
    match client.request(method, url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Which live nodes answer 200 for the group now.
async fn serving(c: &Cluster, group: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in c.nodes.iter().filter(|n| n.child.is_some()) {
        if status(Method::GET, &format!("{}/v1/groups/{group}/health", n.url())).await == 200 {
            out.push(n.name.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_at_a_time_answers_for_a_group_and_its_volume() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let def = json!({
        "resources": [
            {"name": "data", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 2},
            {"name": "app", "type": "process", "command": ["sleep", "1000"]}
        ],
        "nodes": ["n1", "n2", "n3"],
    });
    let (st, v) = put(&format!("{}/v1/groups/g", c.nodes[0].url()), def).await;
    assert_eq!(st, 201, "{v}");
    wait_until(Duration::from_secs(20), "n1 serves g", || async { serving(&c, "g").await == ["n1"] }).await;

    // Every method a load balancer uses; no body needed.
    let (n1, n2) = (c.nodes[0].url(), c.nodes[1].url());
    for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
        assert_eq!(status(m.clone(), &format!("{n1}/v1/groups/g/health")).await, 200, "{m}");
        assert_eq!(status(m.clone(), &format!("{n2}/v1/groups/g/health")).await, 503, "{m}");
    }
    let (st, body) = get(&format!("{n2}/v1/groups/g/health")).await;
    assert_eq!((st, body["serving"].clone(), body["reason"].clone()), (503, json!(false), json!("not placed here")));
    assert_eq!(status(Method::GET, &format!("{n1}/v1/groups/nope/health")).await, 503);
    assert_eq!(status(Method::GET, &format!("{n1}/v1/groups/g/health?x=1")).await, 400);

    // The volume: primary on n1, an up-to-date replica on n2.
    wait_until(Duration::from_secs(20), "n2's replica is connected and up to date", || async {
        status(Method::GET, &format!("{n2}/v1/volumes/data/replica")).await == 200
    })
    .await;
    assert_eq!(status(Method::GET, &format!("{n1}/v1/volumes/data/primary")).await, 200);
    assert_eq!(status(Method::GET, &format!("{n2}/v1/volumes/data/primary")).await, 503);
    assert_eq!(status(Method::GET, &format!("{n1}/v1/volumes/data/replica?lag=16MiB")).await, 503);
    assert_eq!(status(Method::GET, &format!("{}/v1/volumes/data/replica", c.nodes[2].url())).await, 503);
    assert_eq!(status(Method::GET, &format!("{n2}/v1/volumes/data/replica?lag=lots")).await, 400);

    // Power loss of n1: sampled all through the failover, never two.
    c.node_mut("n1").kill();
    let mut seen = Vec::new();
    for _ in 0..200 {
        let now = serving(&c, "g").await;
        assert!(now.len() <= 1, "two nodes answer 200 for one group: {now:?}");
        if now == ["n2"] {
            seen = now;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, ["n2"], "n2 never served g");
    assert_eq!(status(Method::GET, &format!("{n2}/v1/volumes/data/primary")).await, 200);

    // n2 loses its majority (n3 gone too): its lease lapses, it stops
    // answering 200 although nothing else serves.
    c.node_mut("n3").kill();
    wait_until(Duration::from_secs(10), "n2 stops answering 200", || async {
        status(Method::GET, &format!("{n2}/v1/groups/g/health")).await == 503
    })
    .await;
    let (_, body) = get(&format!("{n2}/v1/groups/g/health")).await;
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("lease")), "{body}");
}
