//! Agent restarts are not failures, and a dead agent still fences: a
//! restarted agent adopts the resources still running; an agent that stays
//! dead (or stalls) has its resources stopped by its watchdog before the
//! leader places them elsewhere. Every resource start appends a line (node,
//! epoch, pid) to one log; a sampler checks every 10 ms that no two copies
//! ever run at once.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The group as n2 or n3 sees it (n1 may be stopped: its socket accepts
/// but never answers).
async fn group(c: &Cluster, name: &str) -> Value {
    group_at(&[c.node("n2").url(), c.node("n3").url()], name).await
}

async fn wait_running_on(c: &Cluster, name: &str, node: &str, log: &Path) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        last = group(c, name).await;
        if last["node"] == node && last["state"] == "running" && running(log).iter().any(|e| e.node == node) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never ran on {node}: {last}\n{:?}", events(log));
}

/// Samples the event log every 10 ms until dropped; panics the test (at
/// `check`) if two copies ever ran at once.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<Vec<String>>>,
}

impl Sampler {
    fn start(log: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut bad = Vec::new();
            while !s.load(Ordering::SeqCst) {
                let runs = running(&log);
                if runs.len() > 1 {
                    bad.push(format!("{runs:?}"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            bad
        });
        Sampler { stop, task: Some(task) }
    }

    async fn check(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let bad = self.task.take().unwrap().await.unwrap();
        assert!(bad.is_empty(), "two copies ran at once: {bad:?}");
    }
}

fn dummy(state_dir: &Path) -> Value {
    // Debian's resource-agents Dummy: its state file tells whether it runs.
    json!({"name": "marker", "type": "ocf", "agent": "heartbeat:Dummy",
           "params": {"state": state_dir.join("marker.state").display().to_string()}})
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_agent_adopts_its_running_resources() {
    // What is tested is the adoption, not how fast an agent restarts: a
    // lease of 2 s leaves a restart on a loaded test machine (RocksDB,
    // TLS, the heartbeat handshake) the time it needs before the group
    // would move.
    let opts = Opts { extra: "[fencing]\nlease_ms = 2000\n".into(), ..Opts::default() };
    let mut c = Cluster::start(&["n1", "n2", "n3"], opts).await;
    let log = c.tmp.path().join("events");
    let body = json!({"resources": [logged(&log), dummy(c.tmp.path())], "nodes": ["n1", "n2", "n3"]});
    let (st, v) = put(&format!("{}/v1/groups/web", c.nodes[1].url()), body).await;
    assert_eq!(st, 201, "{v}");
    let g = wait_running_on(&c, "web", "n1", &log).await;
    let epoch = g["epoch"].as_u64().unwrap();
    let first = running(&log)[0].clone();
    wait_until(Duration::from_secs(10), "the watchdog runs", || async { c.node("n1").watchdog_pid().is_some() }).await;
    let watchdog = c.node("n1").watchdog_pid().unwrap();
    let g = group(&c, "web").await;
    assert_eq!(g["resources"][0]["pid"], json!(first.pid), "{g}");
    assert_eq!(g["resources"][0]["state"], "running", "{g}");

    // The agent crashes and comes straight back (as systemd's Restart= does).
    let sampler = Sampler::start(log.clone());
    c.node_mut("n1").kill_agent();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(first.pid), "the resource outlives its agent");
    c.node_mut("n1").start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let g = group(&c, "web").await;
    assert_eq!((g["node"].as_str(), g["epoch"].as_u64()), (Some("n1"), Some(epoch)), "not moved: {g}");
    assert!(alive(first.pid), "not restarted");
    let evs = events(&log);
    assert_eq!(evs.len(), 1, "no stop, no second start: {evs:?}");
    assert_eq!(g["resources"][0]["pid"], json!(first.pid), "adopted: {g}");
    assert_eq!(g["resources"][1]["state"], "running", "the OCF resource is monitored again: {g}");
    assert_eq!(c.node("n1").watchdog_pid(), Some(watchdog), "the same watchdog guards it");

    // The adopted process is still watched: a crash restarts it in place.
    kill(Pid::from_raw(first.pid), Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(10), "local restart of the adopted process", || async {
        running(&log).iter().any(|e| e.node == "n1" && e.pid != first.pid)
    })
    .await;
    let g = group(&c, "web").await;
    assert_eq!(g["epoch"].as_u64(), Some(epoch), "restarted in place: {g}");
    assert_eq!(g["restarts"], 1, "{g}");
    assert!(g["resources"][0]["last_error"].as_str().is_some_and(|e| e.contains("exited")), "{g}");
    sampler.check().await;

    // A clean stop of the agent stops its resources and its watchdog.
    let second = running(&log)[0].pid;
    c.node_mut("n1").stop();
    assert!(!alive(second), "stopped with its agent");
    wait_until(Duration::from_secs(5), "the watchdog exits", || async { !alive(watchdog) }).await;
    wait_running_on(&c, "web", "n2", &log).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_agent_is_fenced_by_its_watchdog_before_failover() {
    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    let marker = c.tmp.path().join("marker.state");
    let body = json!({"resources": [logged(&log), dummy(c.tmp.path())], "nodes": ["n1", "n2", "n3"]});
    assert_eq!(put(&format!("{}/v1/groups/web", c.nodes[1].url()), body).await.0, 201);
    wait_running_on(&c, "web", "n1", &log).await;
    let first = running(&log)[0].clone();
    wait_until(Duration::from_secs(10), "the watchdog runs", || async { c.node("n1").watchdog_pid().is_some() }).await;
    let watchdog = c.node("n1").watchdog_pid().unwrap();

    // The agent dies and stays dead; its resources and watchdog live on.
    let sampler = Sampler::start(log.clone());
    c.node_mut("n1").kill_agent();
    wait_until(Duration::from_secs(5), "the watchdog kills the process", || async { !alive(first.pid) }).await;
    let g = wait_running_on(&c, "web", "n2", &log).await;
    assert!(g["epoch"].as_u64().unwrap() > first.epoch);
    // The OCF resource was stopped on n1 (its state file removed) and
    // started again on n2 (the same path here: both "hosts" share a disk).
    let wlog = std::fs::read_to_string(c.node("n1").dir.join("n1").join("watchdog.log")).unwrap_or_default();
    assert!(wlog.contains("stopped web/marker"), "watchdog log:\n{wlog}");
    assert!(marker.exists(), "started on n2");
    wait_until(Duration::from_secs(5), "the watchdog exits once nothing is left", || async { !alive(watchdog) }).await;
    sampler.check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_agent_is_fenced_and_stays_fenced_when_it_wakes() {
    let c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    let log = c.tmp.path().join("events");
    let body = json!({"resources": [logged(&log)], "nodes": ["n1", "n2", "n3"]});
    assert_eq!(put(&format!("{}/v1/groups/web", c.nodes[1].url()), body).await.0, 201);
    wait_running_on(&c, "web", "n1", &log).await;
    let first = running(&log)[0].clone();
    wait_until(Duration::from_secs(10), "the watchdog runs", || async { c.node("n1").watchdog_pid().is_some() }).await;

    // A long stall (SIGSTOP, as a VM pause or a swap storm): the watchdog
    // fences, the group moves; when the agent wakes it must not bring its
    // copy back, even with heartbeats waiting in its socket buffers.
    let sampler = Sampler::start(log.clone());
    let pid = Pid::from_raw(c.node("n1").pid().unwrap() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let g = wait_running_on(&c, "web", "n2", &log).await;
    assert!(!alive(first.pid), "fenced while its agent slept");
    kill(pid, Signal::SIGCONT).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = group(&c, "web").await;
    assert_eq!((now["node"].as_str(), now["epoch"].as_u64()), (Some("n2"), g["epoch"].as_u64()), "{now}");
    let on_n1: Vec<Event> = events(&log).into_iter().filter(|e| e.kind == "start" && e.node == "n1").collect();
    assert_eq!(on_n1.len(), 1, "no second start on n1 after waking: {on_n1:?}");
    sampler.check().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_tells_systemd_it_is_ready_and_pings_its_watchdog() {
    // systemd's side of Type=notify + WatchdogSec=: a datagram socket named
    // by NOTIFY_SOCKET, and WATCHDOG_USEC for the ping period.
    let mut c = Cluster::configure(&["n1"], Opts { voters: 1, ..Opts::default() });
    let path = c.tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.nodes[0].env =
        vec![("NOTIFY_SOCKET".into(), path.display().to_string()), ("WATCHDOG_USEC".into(), "400000".into())];
    c.nodes[0].start().await;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !(got.iter().any(|m: &String| m.contains("READY=1"))
        && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3)
    {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    c.nodes[0].stop();
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 on a clean stop");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_device_is_fed_only_while_the_node_is_safe() {
    // A FIFO stands in for /dev/watchdog: this test reads what the
    // watchdog process writes to it.
    let c = Cluster::configure(&["n1", "n2", "n3"], Opts::default());
    let dev = c.tmp.path().join("watchdog-device");
    assert!(std::process::Command::new("mkfifo").arg(&dev).status().unwrap().success());
    let fed: Arc<std::sync::Mutex<Vec<(std::time::Instant, u8)>>> = Default::default();
    {
        let (dev, fed) = (dev.clone(), fed.clone());
        std::thread::spawn(move || {
            use std::io::Read;
            let mut f = std::fs::File::open(&dev).unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let now = std::time::Instant::now();
                fed.lock().unwrap().extend(buf[..n].iter().map(|b| (now, *b)));
            }
        });
    }
    let n1_config = c.node("n1").config_path();
    let text = std::fs::read_to_string(&n1_config).unwrap();
    std::fs::write(&n1_config, format!("{text}\n[fencing]\nwatchdog_device = \"{}\"\n", dev.display())).unwrap();
    let c = c.form().await;
    let d = c.tmp.path().display().to_string();
    let script = c.tmp.path().join("sticky.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\nstart) touch {d}/sticky ;;\n\
             stop) [ -e {d}/stuck ] && exit 1; rm -f {d}/sticky ;;\n\
             monitor) [ -e {d}/sticky ] || exit 7 ;;\nesac\nexit 0\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let body =
        json!({"resources": [{"name": "s", "type": "exec", "path": script.display().to_string()}], "nodes": ["n1"]});
    assert_eq!(put(&format!("{}/v1/groups/g", c.nodes[1].url()), body).await.0, 201);
    wait_until(Duration::from_secs(15), "the device is fed", || async {
        fed.lock().unwrap().iter().filter(|(_, b)| *b == 0).count() >= 5
    })
    .await;

    // The agent dies and the resource cannot be stopped: once the watchdog
    // gives up, it stops feeding (the device would reset the node), and it
    // never disarms it.
    std::fs::write(c.tmp.path().join("stuck"), "").unwrap();
    let mut c = c;
    c.node_mut("n1").kill_agent();
    wait_until(Duration::from_secs(10), "the watchdog gives up", || async {
        std::fs::read_to_string(c.node("n1").dir.join("n1").join("watchdog.log"))
            .is_ok_and(|l| l.contains("giving up stopping group g"))
    })
    .await;
    let gave_up = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fed = fed.lock().unwrap();
    assert!(fed.iter().all(|(t, _)| *t <= gave_up + Duration::from_millis(50)), "still fed after giving up");
    assert!(!fed.iter().any(|(_, b)| *b == b'V'), "never disarmed while unsafe");
    assert!(c.node("n1").watchdog_pid().is_some(), "it stays, holding the device");
}
