//! Volumes inside real clusters (agent processes on loopback): a group's
//! volume is promoted where the group runs and exported over NBD; a power
//! loss of the primary keeps every write qemu-io saw acknowledged; a group
//! never fails over to a replica that misses acknowledged writes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn volume_group(size: &str, replicas: usize) -> Value {
    json!({
        "resources": [{"name": "data", "type": "volume", "size": size, "mode": "sync", "replicas": replicas}],
        "nodes": ["n1", "n2", "n3"],
    })
}

/// Three nodes running group `db` with volume `spec`, exported by n1 with
/// every replica in sync; its NBD URI.
async fn running(spec: Value) -> (Cluster, String) {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let replicas = spec["resources"][0]["replicas"].as_u64().unwrap_or(2) as usize;
    let (st, v) = put(&format!("{}/v1/groups/db", c.nodes[1].url()), spec).await;
    assert_eq!(st, 201, "{v}");
    let uri = wait_exported(&c, "n1", replicas).await;
    (c, uri)
}

/// Both nodes' backing files hold the same bytes (`qemu-img compare`).
fn assert_same_data(c: &Cluster, a: &str, b: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(backing(c, a))
        .arg(backing(c, b))
        .output()
        .unwrap();
    assert!(out.status.success(), "replicas differ after resync: {}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_loss_of_the_primary_keeps_every_acknowledged_write() {
    let (mut c, uri) = running(volume_group("64MiB", 2)).await;

    // A writer keeps writing 64 KiB blocks; n1 loses power in the middle.
    let u = uri.clone();
    let writer = tokio::spawn(async move { write_blocks(&u, 0, 400, |i| (i % 250) as u8 + 1).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.node_mut("n1").kill();
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty(), "no write was acknowledged before the power loss");

    // The group (and its volume) moves to n2, the up-to-date replica.
    let uri2 = wait_exported_primary(&c, "n2").await;
    for off in &acked {
        let i = off / 65536;
        assert!(read_ok(&uri2, *off, (i % 250) as u8 + 1).await, "acknowledged write at {off} lost after failover");
    }
    // n2 writes on without n1: it records n1 outdated first.
    let more = write_blocks(&uri2, 500, 4, |_| 0x77).await;
    assert_eq!(more.len(), 4);
    let v = volume(&c).await;
    assert_eq!(v["recorded_disks"]["n1"], "Outdated", "{v}");

    // n1 comes back as a secondary and is resynced: the copies match again.
    c.node_mut("n1").start().await;
    let uri3 = wait_exported(&c, "n2", 2).await;
    assert_eq!(uri3, uri2);
    assert_same_data(&c, "n2", "n1");
    // n1 crashed as primary: only its activity-log extents (4 MiB each) and
    // what n2 wrote since came back, not the whole 64 MiB.
    let log = strip_ansi(&std::fs::read_to_string(c.node("n2").log_path()).unwrap_or_default());
    let sent: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("resync done") && l.contains("n1"))
        .filter_map(|l| l.split("sent=").nth(1)?.split_whitespace().next()?.trim_matches('"').parse().ok())
        .collect();
    let last = *sent.last().unwrap_or_else(|| panic!("no resync to n1 logged"));
    // Extents of every write n1 may have done (acknowledged, or in flight
    // just after), plus the 256 KiB n2 wrote.
    let extent = 4u64 << 20;
    let max_acked = acked.iter().max().copied().unwrap_or(0);
    let bound = (max_acked / extent + 2) * extent + (256 << 10);
    assert!(last <= bound, "resync sent {last} bytes: more than the activity log's extents ({bound})");
    assert!(last < 64 << 20, "a full resync ({last} bytes) instead of the activity log's extents");

    // The CLI shows the same picture.
    let out = std::process::Command::new(BIN)
        .args(["volume", "show", "data", "--endpoint", &c.nodes[2].url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("n1") && text.contains("n2") && text.contains("UpToDate"), "{text}");
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_never_fails_over_to_a_replica_missing_acknowledged_writes() {
    let (mut c, uri) = running(volume_group("16MiB", 2)).await;
    // n2 (the only other replica) goes down; n1 writes on alone.
    c.node_mut("n2").kill();
    let acked = write_blocks(&uri, 0, 8, |_| 0x5a).await;
    assert_eq!(acked.len(), 8);
    let v = volume(&c).await;
    assert_eq!(v["recorded_disks"]["n2"], "Outdated", "{v}");
    // n1 dies too; n2 comes back: it lacks acknowledged writes, so the group waits.
    c.node_mut("n1").kill();
    c.node_mut("n2").start().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let g = group_at(&c.live_urls(), "db").await;
    assert_ne!(g["state"], "running", "{g}");
    assert!(g["reason"].as_str().unwrap_or("").contains("up-to-date"), "{g}");
    // n1 returns: the group runs there again and n2 catches up.
    c.node_mut("n1").start().await;
    let uri = wait_exported(&c, "n1", 2).await;
    for off in acked {
        assert!(read_ok(&uri, off, 0x5a).await, "acknowledged write at {off} lost");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_primary_disk_moves_the_group_to_an_up_to_date_replica() {
    let (c, uri) = running(volume_group("16MiB", 2)).await;
    let acked = write_blocks(&uri, 0, 4, |_| 0x3d).await;
    assert_eq!(acked.len(), 4);
    // n1's disk fails under it; the next read finds out (and is still served).
    std::fs::OpenOptions::new().write(true).open(backing(&c, "n1")).unwrap().set_len(0).unwrap();
    assert!(read_ok(&uri, 0, 0x3d).await, "the read was not served through the peer");
    // The control plane learns n1 is Diskless and moves the group to n2.
    let uri2 = wait_exported_primary(&c, "n2").await;
    for off in acked {
        assert!(read_ok(&uri2, off, 0x3d).await, "acknowledged write at {off} lost");
    }
    let log = strip_ansi(&std::fs::read_to_string(c.node("n1").log_path()).unwrap_or_default());
    assert!(log.contains("ALERT disk failure"), "no alert in n1's log");
    // Its disk answers again here (a truncated file, not a dead device): as
    // a secondary it is resynced in full, and is up to date again.
    wait_exported(&c, "n2", 2).await;
    let log = strip_ansi(&std::fs::read_to_string(c.node("n2").log_path()).unwrap_or_default());
    assert!(
        log.lines().any(|l| l.contains("peer connected") && l.contains("n1") && l.contains("Full")),
        "no full resync of n1"
    );
}

async fn events_of(url: &str, kind: &str) -> Vec<Value> {
    let (st, page) = get(&format!("{url}/v1/events?since=0&limit=10000&kind={kind}")).await;
    assert_eq!(st, 200, "{page}");
    page["events"].as_array().cloned().unwrap_or_default()
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_replica_is_never_promoted_before_its_full_resync_ends() {
    // A slow resync (2 MiB at 256 KiB/s) leaves a window to fail over in.
    let mut spec = volume_group("16MiB", 2);
    spec["resources"][0]["rate"] = json!("256KiB");
    let (mut c, uri) = running(spec).await;
    let pattern = |i: u64| (i % 200) as u8 + 17;
    let acked = write_blocks(&uri, 0, 32, pattern).await;
    assert_eq!(acked.len(), 32);
    let u = c.nodes[2].url();

    // Refused, nothing changed: the serving primary (also through the
    // CLI), a node without a replica, an unknown node or volume.
    let before = volume(&c).await["recorded_disks"].clone();
    let out = cli(&["volume", "replace", "data", "n1", "--endpoint", &u]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TND-1412"), "{}", String::from_utf8_lossy(&out.stderr));
    for (path, status, code) in [
        ("data/replicas/n3/replace", 409, "TND-1402"),
        ("data/replicas/ghost/replace", 404, "TND-1100"),
        ("nope/replicas/n2/replace", 404, "TND-1407"),
    ] {
        let (st, v) = post(&format!("{u}/v1/volumes/{path}"), json!({})).await;
        assert_eq!((st, v["code"].as_str().unwrap_or("")), (status, code), "{path}: {v}");
        assert!(!v["hint"].as_str().unwrap_or("").is_empty(), "{v}");
    }
    let (st, v) = post(&format!("{u}/v1/volumes/data/replicas/n2/replace"), json!({"force": true})).await;
    assert_eq!(st, 400, "an unknown field is refused: {v}");
    assert_eq!(volume(&c).await["recorded_disks"], before, "a refusal changed the records");

    // Replaced through the CLI: recorded Inconsistent before the answer.
    let out = cli(&["volume", "replace", "data", "n2", "--endpoint", &u]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Inconsistent"), "{text}");
    assert_eq!(volume(&c).await["recorded_disks"]["n2"], "Inconsistent");
    // The audit log has the request (before the leader that took it dies).
    wait_until(Duration::from_secs(10), "the replace in the audit log", || async {
        let (_, log) = get(&format!("{u}/v1/audit?limit=10000")).await;
        log.as_array().cloned().unwrap_or_default().iter().any(|e| {
            e["path"] == "/v1/volumes/data/replicas/n2/replace" && e["status"] == 200 && e["who"] == "token:admin"
        })
    })
    .await;
    // n2 then drops its old files and starts its full resync; the primary
    // dies in the middle of it.
    let n2_log = c.node("n2").log_path();
    wait_until(Duration::from_secs(20), "n2 recreating its replica", || async {
        strip_ansi(&std::fs::read_to_string(&n2_log).unwrap_or_default()).contains("replica replaced")
    })
    .await;
    c.node_mut("n1").kill();
    // The group never starts on the emptied replica: it waits for n1.
    let urls = c.live_urls();
    for _ in 0..40 {
        let g = group_at(&urls, "db").await;
        assert!(!(g["node"] == "n2" && g["state"] == "running"), "the group runs on the wiped replica: {g}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let g = group_at(&urls, "db").await;
    assert_ne!(g["state"], "running", "{g}");
    assert!(g["reason"].as_str().unwrap_or("").contains("up-to-date"), "{g}");
    assert_eq!(volume(&c).await["recorded_disks"]["n2"], "Inconsistent");
    let log = strip_ansi(&std::fs::read_to_string(&n2_log).unwrap_or_default());
    assert!(!log.contains("promoted to primary"), "n2 was promoted while Inconsistent");
    // Nor can the last UpToDate copy be replaced meanwhile.
    let (st, v) = post(&format!("{u}/v1/volumes/data/replicas/n1/replace"), json!({})).await;
    assert_eq!(st, 409, "{v}");
    assert!(["TND-1412", "TND-1413"].contains(&v["code"].as_str().unwrap_or("")), "{v}");

    // n1 returns; n2 is resynced in full and only then recorded UpToDate.
    c.node_mut("n1").start().await;
    wait_exported(&c, "n1", 2).await;
    let v = volume(&c).await;
    assert_eq!(v["recorded_disks"]["n2"], "UpToDate", "{v}");
    let n1_log = strip_ansi(&std::fs::read_to_string(c.node("n1").log_path()).unwrap_or_default());
    assert!(
        n1_log.lines().any(|l| l.contains("peer connected") && l.contains("n2") && l.contains("Full")),
        "no full resync of n2"
    );
    // The events say so, with who asked.
    let replacing = events_of(&u, "volume.replica_replacing").await;
    assert!(replacing.iter().any(|e| e["node"] == "n2" && e["details"]["by"] == "token:admin"), "{replacing:?}");
    let replaced = events_of(&u, "volume.replica_replaced").await;
    assert!(replaced.iter().any(|e| e["node"] == "n2" && e["volume"] == "data"), "{replaced:?}");

    // What was written is read back from the replaced replica.
    let (st, v) = post(&format!("{u}/v1/groups/db/move"), json!({"to": "n2"})).await;
    assert_eq!(st, 200, "{v}");
    let uri2 = wait_exported_primary(&c, "n2").await;
    for off in acked {
        assert!(read_ok(&uri2, off, pattern(off / 65536)).await, "block at {off} differs on the replaced replica");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_lost_its_files_is_never_promoted_and_is_resynced_in_full() {
    let (mut c, uri) = running(volume_group("16MiB", 2)).await;
    let acked = write_blocks(&uri, 0, 8, |i| i as u8 + 0x41).await;
    assert_eq!(acked.len(), 8);
    // n2 stops and its disk is lost (no write meanwhile: still recorded
    // UpToDate); then n1 dies and n2 comes back alone with nothing.
    c.node_mut("n2").kill();
    let dir = backing(&c, "n2").parent().unwrap().to_path_buf();
    for e in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    c.node_mut("n1").kill();
    c.node_mut("n2").start().await;
    // It must not serve its empty disk as the volume (the scheduler may
    // place the group there, still recorded UpToDate: the promotion fails).
    let n2 = c.node("n2").url();
    for _ in 0..40 {
        let (st, v) = get(&format!("{n2}/v1/volumes/data/primary")).await;
        assert_ne!(st, 200, "n2 serves the volume from its empty disk: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = strip_ansi(&std::fs::read_to_string(c.node("n2").log_path()).unwrap_or_default());
    assert!(!log.contains("promoted to primary"), "n2 was promoted with an empty disk");
    // n1 returns: the group runs there, n2 is recorded Inconsistent during
    // its full resync and matches n1 afterwards.
    c.node_mut("n1").start().await;
    let uri = wait_exported(&c, "n1", 2).await;
    let disks = events_of(&c.nodes[2].url(), "volume.disk").await;
    assert!(disks.iter().any(|e| e["node"] == "n2" && e["details"]["to"] == "Inconsistent"), "{disks:?}");
    for off in acked {
        assert!(read_ok(&uri, off, (off / 65536) as u8 + 0x41).await, "acknowledged write at {off} lost");
    }
    assert_same_data(&c, "n1", "n2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_promotion_reports_what_it_gives_up_and_keeps_the_old_primarys_data() {
    let (mut c, uri) = running(volume_group("16MiB", 2)).await;
    // Written on both replicas.
    assert_eq!(write_blocks(&uri, 0, 4, |_| 0x11).await.len(), 4);
    // n2 is cut off; n1 goes on alone: 8 blocks of 64 KiB that n2 never got.
    c.node_mut("n2").kill();
    let acked = write_blocks(&uri, 8, 8, |_| 0x5a).await;
    assert_eq!(acked.len(), 8);
    let n3 = c.node("n3").url();
    // The primary records what n2 lacks, exactly: the report knows it
    // while n1 still serves (and refuses: a serving primary stays).
    let last = promote_dry_run_until(&n3, |r| candidate(r, "n2")["out_of_sync_bytes"] == 8 * 65536).await;
    let n2 = candidate(&last, "n2");
    assert_eq!(n2["out_of_sync_bytes"], 8 * 65536, "{last}");
    assert!(n2["out_of_sync_recorded_ms"].as_u64().is_some(), "{last}");
    assert!(n2["refused"].as_str().unwrap_or("").contains("running on n1"), "{last}");

    // n1 loses power; n2 returns: no up-to-date replica online, the group waits.
    c.node_mut("n1").kill();
    c.node_mut("n2").start().await;
    let report = promote_dry_run_until(&n3, |r| candidate(r, "n2")["refused"].is_null()).await;
    let n2 = candidate(&report, "n2").clone();
    assert!(n2["refused"].is_null(), "n2 never became promotable: {report}");
    assert_eq!((n2["disk"].as_str(), n2["online"].as_bool()), (Some("Outdated"), Some(true)), "{report}");
    assert_eq!(n2["out_of_sync_bytes"], 8 * 65536, "the record outlives the primary: {report}");
    assert!(n2["generation"].as_str().is_some_and(|g| g.len() == 16), "{report}");
    assert!(n2["newest_write_age_ms"].as_u64().is_some(), "{report}");
    assert_eq!(report["outdated"], json!(["n1"]), "{report}");
    assert_eq!(report["split_brain_policy"], "disconnect");
    assert!(report["newer_data"].as_str().unwrap_or("").contains("nothing is overwritten"), "{report}");
    let g = group_at(&c.live_urls(), "db").await;
    assert_ne!(g["state"], "running", "{g}");

    // Refused without the confirmation, or for a node without a replica: nothing changes.
    let url = format!("{n3}/v1/volumes/data/promote");
    let (st, e) = post(&url, json!({"node": "n2"})).await;
    assert_eq!((st, e["code"].as_str()), (422, Some("TND-1010")), "{e}");
    let (st, e) = post(&url, json!({"node": "n3", "confirm": "data"})).await;
    assert_eq!((st, e["code"].as_str()), (409, Some("TND-1402")), "{e}");
    let v = volume(&c).await;
    assert_eq!(
        (v["recorded_disks"]["n1"].as_str(), v["recorded_disks"]["n2"].as_str()),
        (Some("UpToDate"), Some("Outdated"))
    );

    // Confirmed: n2 is the data now, the group starts there.
    let (st, r) = post(&url, json!({"node": "n2", "confirm": "data"})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!((r["dry_run"].as_bool(), r["node"].as_str()), (Some(false), Some("n2")), "{r}");
    let uri2 = wait_exported_primary(&c, "n2").await;
    for i in 0..4 {
        assert!(read_ok(&uri2, i * 65536, 0x11).await, "block {i} written before the cut is missing");
    }
    for off in &acked {
        assert!(read_ok(&uri2, *off, 0).await, "block at {off} was given up, yet n2 holds it?");
    }
    let ev = events_of(&n3, "volume.promoted").await;
    let e = ev.last().unwrap_or_else(|| panic!("no volume.promoted event"));
    assert_eq!((e["severity"].as_str(), e["node"].as_str()), (Some("critical"), Some("n2")), "{e}");
    assert_eq!(e["details"]["out_of_sync_bytes"], 8 * 65536, "{e}");
    assert!(e["details"]["by"].as_str().is_some(), "who asked is recorded: {e}");
    let (st, audit) = get(&format!("{n3}/v1/audit?limit=1000")).await;
    assert_eq!(st, 200, "{audit}");
    assert!(audit.to_string().contains("/v1/volumes/data/promote"), "no audit entry: {audit}");

    // n2 writes on; n1 returns: both changed since they parted. Under the
    // default policy nothing is overwritten: n1 keeps its writes, disconnected.
    assert_eq!(write_blocks(&uri2, 40, 2, |_| 0x77).await.len(), 2);
    c.node_mut("n1").start().await;
    let mut v = Value::Null;
    for _ in 0..300 {
        v = volume(&c).await;
        let n1 = v["replicas"].as_array().and_then(|r| r.iter().find(|r| r["node"] == "n1")).cloned();
        if n1.is_some_and(|r| r["connection"] == "SplitBrain") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(v.to_string().contains("SplitBrain"), "no split brain reported for n1: {v}");
    let data = std::fs::read(backing(&c, "n1")).unwrap();
    for off in &acked {
        let block = &data[*off as usize..*off as usize + 65536];
        assert!(block.iter().all(|b| *b == 0x5a), "n1's newer write at {off} was overwritten");
    }
    assert_eq!(v["primary"], "n2", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_grows_online_on_every_replica_and_fails_over_grown() {
    let (mut c, uri) = running(volume_group("16MiB", 3)).await;
    let pattern = |i: u64| (i % 200) as u8 + 0x21;
    let old = write_blocks(&uri, 0, 8, pattern).await;
    assert_eq!(old.len(), 8);
    // The old last block.
    assert_eq!(write_blocks(&uri, 255, 1, |_| 0x99).await.len(), 1);
    let u = c.nodes[1].url();
    let url = format!("{u}/v1/groups/db");

    // Grown through the API while the group runs; a shrink stays refused.
    let (st, v) = put(&url, volume_group("48MiB", 3)).await;
    assert_eq!(st, 200, "{v}");
    let (st, e) = put(&url, volume_group("32MiB", 3)).await;
    assert_eq!((st, e["code"].as_str()), (409, Some("TND-1408")), "{e}");
    assert!(e["message"].as_str().unwrap_or("").contains("cannot shrink from 48MiB to 32MiB"), "{e}");
    wait_until(Duration::from_secs(30), "the export at 48MiB", || async {
        let v = volume(&c).await;
        v["size_bytes"] == 48u64 << 20 && v["growing_to_bytes"].is_null() && v["primary"] == "n1"
    })
    .await;
    for n in ["n1", "n2", "n3"] {
        assert_eq!(std::fs::metadata(backing(&c, n)).unwrap().len(), 48 << 20, "{n}'s backing file");
    }
    // A new connection sees the old data and the new space (zeroes)...
    for off in &old {
        assert!(read_ok(&uri, *off, pattern(off / 65536)).await, "block at {off} lost in the grow");
    }
    assert!(read_ok(&uri, 255 * 65536, 0x99).await);
    assert!(read_ok(&uri, 256 * 65536, 0).await, "the new space is not zeroes");
    // ...and writes past the old end, replicated to every replica.
    let new = write_blocks(&uri, 500, 4, |_| 0x7e).await;
    assert_eq!(new.len(), 4, "writes past the old end failed");
    assert_eq!(write_blocks(&uri, 767, 1, |_| 0x7f).await.len(), 1, "the new last block");
    assert_same_data(&c, "n1", "n2");
    assert_same_data(&c, "n1", "n3");
    // Nothing was resynced: every resync n1 logged sent nothing.
    let log = strip_ansi(&std::fs::read_to_string(c.node("n1").log_path()).unwrap_or_default());
    let sent: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("resync done"))
        .filter_map(|l| l.split("sent=").nth(1)?.split_whitespace().next()?.trim_matches('"').parse().ok())
        .collect();
    assert!(sent.iter().all(|s| *s == 0), "a resync during the grow: {sent:?}");
    assert!(log.contains("export grown"), "no grow in n1's log");
    // Online: the primary was never stopped under its application.
    assert!(!log.contains("demoted to secondary"), "the volume was restarted for its grow");
    // Told once, with the sizes.
    wait_until(Duration::from_secs(10), "a volume.grown event", || async {
        events_of(&u, "volume.grown")
            .await
            .iter()
            .any(|e| e["volume"] == "data" && e["details"]["from"] == 16u64 << 20 && e["details"]["to"] == 48u64 << 20)
    })
    .await;

    // n1 loses power: the group moves to n2, grown, with all the data.
    c.node_mut("n1").kill();
    let uri2 = wait_exported_primary(&c, "n2").await;
    for off in old.iter().chain(&new) {
        let want = if *off >= 500 * 65536 { 0x7e } else { pattern(off / 65536) };
        assert!(read_ok(&uri2, *off, want).await, "block at {off} lost after the failover");
    }
    assert!(read_ok(&uri2, 767 * 65536, 0x7f).await, "the new last block lost after the failover");
    assert_eq!(volume(&c).await["size_bytes"], 48u64 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn read_balancing_changes_live_and_the_volume_view_counts_reads_per_replica() {
    let spec = |policy: &str| {
        json!({
            "resources": [{"name": "data", "type": "volume", "size": "16MiB", "replicas": 2, "read_balancing": policy}],
            "nodes": ["n1", "n2", "n3"],
        })
    };
    let (c, uri) = running(spec("prefer-local")).await;
    let pattern = |i: u64| (i % 200) as u8 + 0x21;
    assert_eq!(write_blocks(&uri, 0, 8, pattern).await.len(), 8);
    for i in 0..8 {
        assert!(read_ok(&uri, i * 65536, pattern(i)).await);
    }
    let v = volume(&c).await;
    assert_eq!(v["read_balancing"], "prefer-local", "{v}");
    assert_eq!((v["read_errors"].as_u64(), v["repaired_blocks"].as_u64()), (Some(0), Some(0)), "{v}");
    assert!(v["replicas"][0]["reads"].as_u64() >= Some(8), "{v}");
    assert_eq!(v["replicas"][1]["reads"], 0, "{v}");
    // A policy that is not one is refused, naming the ones that are.
    let url = format!("{}/v1/groups/db", c.nodes[1].url());
    let (st, e) = put(&url, spec("fastest")).await;
    assert!((400..500).contains(&st) && e.to_string().contains("round-robin"), "{st} {e}");
    // Changed while the group runs: the primary is not restarted, and
    // round-robin sends every other read to n2, which has every write.
    let (st, v) = put(&url, spec("round-robin")).await;
    assert_eq!(st, 200, "{v}");
    wait_until(Duration::from_secs(10), "round-robin in the view", || async {
        volume(&c).await["read_balancing"] == "round-robin"
    })
    .await;
    assert_eq!(write_blocks(&uri, 8, 8, pattern).await.len(), 8);
    // Applied to the primary within its next volume round (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..16 {
        assert!(read_ok(&uri, i * 65536, pattern(i)).await, "block {i}");
    }
    let v = volume(&c).await;
    assert!(v["replicas"][1]["reads"].as_u64() >= Some(4), "{v}");
    // The primary's metrics count them too.
    let n1 = c.node("n1").url();
    let token = tandem_testkit::api::token_for(&n1).unwrap_or_default();
    let resp = tandem_testkit::api::client().get(format!("{n1}/metrics")).bearer_auth(token).send().await.unwrap();
    let text = resp.text().await.unwrap();
    let peer_reads = text
        .lines()
        .find(|l| l.starts_with("tandem_volume_reads_total{") && l.contains(r#"replica="n2""#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(peer_reads >= Some(4.0), "tandem_volume_reads_total for n2: {peer_reads:?}");
    assert!(text.lines().any(|l| l.starts_with("tandem_volume_read_errors_total{") && l.ends_with(" 0")), "{text}");
    let log = strip_ansi(&std::fs::read_to_string(c.node("n1").log_path()).unwrap_or_default());
    assert!(!log.contains("demoted to secondary"), "the volume was restarted for a read policy");
}
