//! The `filesystem` resource in real clusters (agents on loopback, sharing
//! this machine's mount table): a file system made on the group's volume
//! and mounted where the group runs (here through nbdfuse and a loop
//! device), a process running as another user writing through it with
//! fsync, a power loss of the primary keeping every fsync'd write, the new
//! primary cleaning the dead node's stale mount, a clean switchover, and
//! the refusals: a volume holding data or another file system is never
//! formatted. Needs root (mount, loop devices); skipped otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn can_run() -> bool {
    if !tandem_testkit::is_root() {
        eprintln!("skipped: needs root (mount, loop devices, FUSE)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse on this machine");
        return false;
    }
    true
}

/// Lazily unmounts everything under `root` (the test's temp dir) when the
/// test ends, whatever happened: a killed node leaves its mounts behind.
struct Unmounter(PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.0.to_string_lossy().to_string();
        let mut points: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The mounts at `path` in this (the shared) mount namespace.
fn mounts_at(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy().to_string();
    text.lines().filter(|l| l.split(' ').nth(4) == Some(p.as_str())).map(str::to_string).collect()
}

/// A writer that appends `<node>-<n>` lines with an fsync after each, and
/// prints `acked <node>-<n>` once the fsync returned.
const WRITER: &str = r#"
import os, sys, time
node = os.environ["TANDEM_NODE"]
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    i += 1
    os.write(fd, b"%s-%d\n" % (node.encode(), i))
    os.fsync(fd)
    print("acked %s-%d" % (node, i), flush=True)
    time.sleep(0.005)
"#;

fn fs_group(mnt: &Path) -> Value {
    json!({
        "resources": [
            {"name": "data", "type": "volume", "size": "64MiB", "mode": "sync", "replicas": 2},
            {"name": "fs", "type": "filesystem", "volume": "data", "mountpoint": mnt, "fstype": "ext4",
             "options": "noatime", "mkfs": true, "owner": "nobody:nogroup"},
            {"name": "writer", "type": "process", "user": "nobody",
             "command": ["python3", "-c", WRITER, mnt.join("log").to_string_lossy()]}
        ],
        "nodes": ["n1", "n2", "n3"],
    })
}

/// Waits until the group runs on `node` with every resource running.
async fn wait_running_on(c: &Cluster, group: &str, node: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..600 {
        last = group_at(&c.live_urls(), group).await;
        let all_up =
            last["resources"].as_array().is_some_and(|rs| !rs.is_empty() && rs.iter().all(|r| r["state"] == "running"));
        if last["node"] == node && all_up {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{group} never ran on {node} with all resources running: {last}");
}

fn acked(c: &Cluster, node: &str) -> Vec<String> {
    let log = c.tmp.path().join(node).join("groups").join("fsg").join("writer.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("acked "))
        .map(str::to_string)
        .collect()
}

/// Three nodes running the writer's group on n1 (`None` when this machine
/// cannot run it): the cluster, the mountpoint, the cleanup, the group.
async fn fs_cluster() -> Option<(Cluster, PathBuf, Unmounter, Value)> {
    if !can_run() {
        return None;
    }
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let mnt = c.tmp.path().join("mnt");
    let cleanup = Unmounter(c.tmp.path().to_path_buf());
    let (st, v) = put(&format!("{}/v1/groups/fsg", c.nodes[0].url()), fs_group(&mnt)).await;
    assert_eq!(st, 201, "{v}");
    let g = wait_running_on(&c, "fsg", "n1").await;
    Some((c, mnt, cleanup, g))
}

/// A one-node cluster for a file system test (`None` when this machine
/// cannot run it): the cluster, its URL, the mountpoint, the cleanup.
async fn one_node() -> Option<(Cluster, String, PathBuf, Unmounter)> {
    if !can_run() {
        return None;
    }
    let c = Cluster::start(&["n1"], Opts { voters: 1, ..Opts::default() }).await;
    let url = c.nodes[0].url();
    let mnt = c.tmp.path().join("mnt");
    let cleanup = Unmounter(c.tmp.path().to_path_buf());
    Some((c, url, mnt, cleanup))
}

fn uid_of(pid: u64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_system_on_a_volume_keeps_every_fsynced_write_across_a_power_loss() {
    let Some((mut c, mnt, _cleanup, g)) = fs_cluster().await else { return };

    // Mounted once, ext4 on a loop device, and the writer runs as nobody.
    let m = mounts_at(&mnt);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].contains(" - ext4 /dev/loop"), "{m:?}");
    let writer_pid = g["resources"][2]["pid"].as_u64().expect("writer pid");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid.as_raw();
    assert_eq!(uid_of(writer_pid), nobody, "the writer must run as nobody");
    wait_until(Duration::from_secs(10), "the writer acknowledges writes", || async { acked(&c, "n1").len() > 50 })
        .await;

    // Power loss of n1 while it writes: everything fsync'd is on n2.
    c.node_mut("n1").kill();
    let before = acked(&c, "n1");
    wait_running_on(&c, "fsg", "n2").await;
    // n2 did not mount over n1's stale mount: it replaced it.
    let m = mounts_at(&mnt);
    assert_eq!(m.len(), 1, "exactly one mount at the mountpoint: {m:?}");
    let text = std::fs::read_to_string(mnt.join("log")).unwrap();
    let present: std::collections::BTreeSet<&str> = text.lines().collect();
    eprintln!("fsync acknowledged on n1 before its power loss: {}; lines now: {}", before.len(), present.len());
    let lost: Vec<&String> = before.iter().filter(|a| !present.contains(a.as_str())).collect();
    assert!(
        lost.is_empty(),
        "{} fsync'd writes lost after the power loss: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    wait_until(Duration::from_secs(10), "the writer writes on n2", || async { acked(&c, "n2").len() > 20 }).await;

    // n1 back; a switchover to it stops cleanly on n2 (nothing left
    // mounted) and the file system moves with every write.
    c.node_mut("n1").start().await;
    wait_until(Duration::from_secs(30), "n1's replica is up to date again", || async {
        let (_, v) = get(&format!("{}/v1/volumes/data", c.nodes[1].url())).await;
        v["recorded_disks"]["n1"] == "UpToDate"
    })
    .await;
    let (st, v) = post(&format!("{}/v1/groups/fsg/move", c.nodes[1].url()), json!({"to": "n1"})).await;
    assert_eq!(st, 200, "{v}");
    wait_running_on(&c, "fsg", "n1").await;
    let m = mounts_at(&mnt);
    assert_eq!(m.len(), 1, "{m:?}");
    let on_n2 = acked(&c, "n2");
    let text = std::fs::read_to_string(mnt.join("log")).unwrap();
    let present: std::collections::BTreeSet<&str> = text.lines().collect();
    assert!(on_n2.iter().all(|a| present.contains(a.as_str())), "writes made on n2 lost in the switchover");
    let fuse_n2 = c.tmp.path().join("n2").join("run").join("fuse").join("fsg.fs");
    assert!(mounts_at(&fuse_n2).is_empty(), "n2 left its FUSE file mounted");

    // Stopping the group unmounts everything.
    let (st, v) = post(&format!("{}/v1/groups/fsg/stop", c.nodes[0].url()), json!({})).await;
    assert_eq!(st, 200, "{v}");
    wait_until(Duration::from_secs(20), "the file system is unmounted", || async { mounts_at(&mnt).is_empty() }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_holding_data_or_another_file_system_is_never_formatted() {
    let Some((c, url, mnt, _cleanup)) = one_node().await else { return };
    let volume_only = json!({
        "resources": [{"name": "raw", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 1}],
        "nodes": ["n1"],
    });
    let (st, v) = put(&format!("{url}/v1/groups/g"), volume_only).await;
    assert_eq!(st, 201, "{v}");
    // Raw data (no signature) at the start of the volume.
    let uri = loop {
        let (_, v) = get(&format!("{url}/v1/volumes/raw")).await;
        if let Some(u) = v["nbd"].as_str() {
            break u.split_whitespace().next().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 4096 4096"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let with_fs = |fstype: &str| {
        json!({
            "resources": [
                {"name": "raw", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 1},
                {"name": "fs", "type": "filesystem", "volume": "raw", "mountpoint": mnt, "fstype": fstype, "mkfs": true}
            ],
            "nodes": ["n1"],
        })
    };
    let (st, v) = put(&format!("{url}/v1/groups/g"), with_fs("ext4")).await;
    assert_eq!(st, 200, "{v}");
    let err = wait_error(&url, "g", "fs").await;
    assert!(err.contains("holds data but no file system"), "{err}");
    assert!(mounts_at(&mnt).is_empty(), "nothing may be left mounted");
    // The data is still there.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-U", &uri, "-c", "read -P 0x5a 4096 4096"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("read 4096/4096"), "the data was overwritten");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"), "the data was overwritten");

    // A file system of another type: named in the error, never formatted.
    let img = tandem_backing(&c, "raw");
    let (st, _) = post(&format!("{url}/v1/groups/g/stop"), json!({})).await;
    assert_eq!(st, 200);
    wait_until(Duration::from_secs(20), "the group stops", || async {
        group_at(&c.live_urls(), "g").await["node"].is_null()
    })
    .await;
    let out = std::process::Command::new("mkfs.ext2").args(["-q", "-F", &img]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (st, v) = put(&format!("{url}/v1/groups/g"), with_fs("xfs")).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = post(&format!("{url}/v1/groups/g/clear"), json!({})).await;
    assert!(st == 200 || st == 204, "{st}");
    let (st, _) = post(&format!("{url}/v1/groups/g/start"), json!({})).await;
    assert_eq!(st, 200);
    let err = wait_error(&url, "g", "fs").await;
    assert!(err.contains("holds ext2, not xfs"), "{err}");
    assert!(mounts_at(&mnt).is_empty(), "nothing may be left mounted");
}

fn tandem_backing(c: &Cluster, volume: &str) -> String {
    c.tmp.path().join("n1").join("volumes").join(format!("{volume}.img")).to_string_lossy().into_owned()
}

/// The last error of a group's resource, once it has one.
async fn wait_error(url: &str, group: &str, resource: &str) -> String {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (_, g) = get(&format!("{url}/v1/groups/{group}")).await;
        let err = g["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == resource))
            .and_then(|r| r["last_error"].as_str())
            .map(str::to_string);
        if let Some(e) = err {
            return e;
        }
        last = g;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{resource} never failed: {last}");
}

/// Waits until the group runs somewhere with every resource running.
async fn wait_all_running(url: &str, group: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (_, g) = get(&format!("{url}/v1/groups/{group}")).await;
        if g["resources"].as_array().is_some_and(|rs| !rs.is_empty() && rs.iter().all(|r| r["state"] == "running")) {
            return g;
        }
        last = g;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{group} never ran with every resource running: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_remount_fails_the_file_system_and_what_runs_on_it_restarts() {
    let Some((_c, url, mnt, _cleanup)) = one_node().await else { return };
    let def = json!({
        "resources": [
            {"name": "data", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 1},
            {"name": "fs", "type": "filesystem", "volume": "data", "mountpoint": mnt, "fstype": "ext4", "mkfs": true},
            {"name": "app", "type": "process", "command": ["sleep", "1000"], "cwd": mnt}
        ],
        "nodes": ["n1"],
    });
    let (st, v) = put(&format!("{url}/v1/groups/g"), def).await;
    assert_eq!(st, 201, "{v}");
    let g = wait_all_running(&url, "g").await;
    let app_pid = g["resources"][2]["pid"].as_u64().unwrap();

    // Full: shown on the resource, which keeps running (no reason to move).
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64", "status=none"])
        .arg(format!("of={}", mnt.join("fill").display()))
        .output()
        .unwrap();
    let (_, g) = get(&format!("{url}/v1/groups/g")).await;
    let fs = &g["resources"][1];
    assert_eq!(fs["state"], "running", "{g}");
    assert!(fs["warning"].as_str().is_some_and(|w| w.starts_with("file system full")), "{g}");
    std::fs::remove_file(mnt.join("fill")).unwrap();
    let (_, g) = get(&format!("{url}/v1/groups/g")).await;
    assert!(g["resources"][1]["warning"].is_null(), "{g}");

    // As ext4 does with errors=remount-ro after an I/O error.
    let out = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(&mnt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = wait_error(&url, "g", "fs").await;
    assert!(err.contains("read-only"), "{err}");
    // Restarted locally: mounted read-write again, the app above it anew.
    let g = wait_all_running(&url, "g").await;
    assert_ne!(g["resources"][2]["pid"].as_u64().unwrap(), app_pid, "the app on the file system restarted with it");
    let m = mounts_at(&mnt);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].split(' ').nth(5).is_some_and(|o| o.starts_with("rw")), "{m:?}");
    std::fs::write(mnt.join("probe"), b"ok").expect("writable again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_lease_lapses_unmounts_and_its_export_answers_nothing() {
    let Some((mut c, mnt, _cleanup, _)) = fs_cluster().await else { return };
    let socket = c.tmp.path().join("n1").join("run").join("nbd").join("data.sock");
    assert!(socket.exists());

    // n1 stays alive but hears no majority: its lease lapses.
    c.node_mut("n2").kill();
    c.node_mut("n3").kill();
    wait_until(Duration::from_secs(10), "n1 unmounts the file system", || async { mounts_at(&mnt).is_empty() }).await;
    let fuse = c.tmp.path().join("n1").join("run").join("fuse").join("fsg.fs");
    wait_until(Duration::from_secs(5), "the FUSE file is unmounted", || async { mounts_at(&fuse).is_empty() }).await;
    // Nothing can be written through the export any more.
    let uri = format!("nbd+unix:///data?socket={}", socket.display());
    let out = std::process::Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write 0 4k"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote 4096/4096"), "a write went through without the lease: {text}");
}
