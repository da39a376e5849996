//! The README's main command: `tandem demo` forms a 3-node cluster of real
//! agent processes and stops them all on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Six consecutive ports: each node's API (TCP and UDP) and, next to it,
/// its volume replication port (TCP).
fn free_base() -> u16 {
    for _ in 0..200 {
        let base = free_port();
        let ok = std::net::TcpListener::bind(("127.0.0.1", base + 80)).is_ok()
            && (1..6u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
            && [2u16, 4].iter().all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no six consecutive free ports");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_forms_a_cluster_and_stops_cleanly_on_ctrl_c() {
    let base = free_base();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let mark = format!("{}-banner", std::process::id());
    let mut child = Command::new(BIN)
        .args(["demo", "--base-port", &base.to_string(), "--dir"])
        .arg(&data)
        .env("TANDEM_TEST_DEMO_MARK", &mark)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.contains("Ctrl-C stops the cluster");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines.is_finished() {
        assert!(Instant::now() < deadline, "demo did not print its banner");
        assert!(child.try_wait().unwrap().is_none(), "demo exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let banner = lines.join().unwrap().join("\n");
    for i in 0..3 {
        assert!(banner.contains(&format!("https://127.0.0.1:{}", base + 2 * i)), "{banner}");
    }
    // The dashboard's address, to open in a browser with the token.
    assert!(banner.contains(&format!("https://127.0.0.1:{base}/ui/")), "{banner}");
    // The printed credentials and curl line work as printed, in a shell.
    let export = banner.lines().map(str::trim).find(|l| l.starts_with("export TANDEM_TOKEN=")).expect("an export line");
    let curl = banner.lines().map(str::trim).find(|l| l.starts_with("curl -s --cacert")).expect("a curl line");
    let out = Command::new("sh").args(["-c", &format!("{export}; {curl}")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("\"cluster_id\":\"demo\""), "{export}; {curl}: {text}");
    let creds = tandem_testkit::api::Creds {
        token: std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string(),
        ca_pem: std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        ca_hash: String::new(),
    };
    for i in 0..3 {
        tandem_testkit::api::register(&format!("https://127.0.0.1:{}", base + 2 * i), &creds);
    }

    // The cluster is real: three voters, each its own process.
    let (st, cluster) = get(&format!("https://127.0.0.1:{}/v1/cluster", base + 2)).await;
    assert_eq!(st, 200);
    assert_eq!(voters(&cluster).len(), 3);
    let pids: Vec<u32> =
        cluster["members"].as_array().unwrap().iter().map(|m| m["pid"].as_u64().unwrap() as u32).collect();
    assert!(pids.iter().all(|p| alive(*p)) && pids.iter().all(|p| *p != child.id()));

    // The example group serves HTTP from node1.
    let (st, g) = get(&format!("https://127.0.0.1:{}/v1/groups/web", base)).await;
    assert_eq!(
        (st, g["state"].clone(), g["node"].clone()),
        (200, serde_json::json!("running"), serde_json::json!("node1")),
        "{g}"
    );
    let url = format!("http://127.0.0.1:{}/", base + 80);
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(&url).await {
            body = r.text().await.unwrap_or_default();
            if body.contains("hello from node1") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.contains("hello from node1"), "example service: {body:?}");

    // Its volume is exported by node1, and the printed qemu-io command works.
    let line = banner.lines().find(|l| l.trim_start().starts_with("qemu-io")).expect("a qemu-io line");
    let uri = line.split('\'').nth(1).expect("a quoted NBD URI");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"])
        .output()
        .expect("qemu-io (apt-get install qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("read 1048576/1048576") && !text.contains("fail"), "{text}");
    let (st, v) = get(&format!("https://127.0.0.1:{}/v1/volumes/data", base + 4)).await;
    assert_eq!((st, v["primary"].clone()), (200, serde_json::json!("node1")), "{v}");

    // Ctrl-C reaches the demo only (the agents are in their own process
    // group); it must stop them and remove its data directory.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit status {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "agents still running after the demo stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nor their watchdogs and the example service.
    let left = left_after(&mark, Duration::from_secs(5));
    assert!(left.is_empty(), "left running after the demo exited: {left:?}");
    assert!(!data.exists(), "the demo removes its data unless --keep");
}

/// Processes carrying `mark` in their environment: everything the demo
/// started (agents, their watchdogs and resources inherit it).
fn marked(mark: &str) -> Vec<(u32, String)> {
    let needle = format!("TANDEM_TEST_DEMO_MARK={mark}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .filter(|pid| alive(*pid))
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (pid, String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

/// What is still running with `mark` once everything had `grace` to exit:
/// a watchdog leaves on its own within its poll after its agent released
/// the lease.
fn left_after(mark: &str, grace: Duration) -> Vec<(u32, String)> {
    let deadline = Instant::now() + grace;
    loop {
        let left = marked(mark);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// When, during start-up, the signal is sent.
enum When {
    After(Duration),
    /// Right after the first stdout line containing this text.
    Line(&'static str),
}

#[test]
fn ctrl_c_or_sigterm_while_the_demo_starts_stops_everything_started() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // (when, which signal, SIGINT inherited ignored: a job started in the
    // background by a non-interactive shell, as the tries were).
    let points = [
        (When::After(Duration::from_millis(300)), Signal::SIGINT, false),
        (When::After(Duration::from_millis(500)), Signal::SIGINT, true),
        (When::After(Duration::from_secs(1)), Signal::SIGINT, false),
        (When::Line("node2 answers"), Signal::SIGTERM, false),
        (When::Line("formed"), Signal::SIGINT, false),
    ];
    for (k, (when, sig, ignored)) in points.into_iter().enumerate() {
        let what = match &when {
            When::After(d) => format!("{sig} {} ms after launch", d.as_millis()),
            When::Line(l) => format!("{sig} right after the line {l:?}"),
        } + if ignored { " (SIGINT inherited ignored)" } else { "" };
        let mark = format!("{}-{k}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("demo");
        let mut cmd = Command::new(BIN);
        if ignored {
            use std::os::unix::process::CommandExt;
            // SAFETY: signal() is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::signal::signal(Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn)
                        .map(|_| ())
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd
            .args(["demo", "--base-port", &free_base().to_string(), "--dir"])
            .arg(&data)
            .env("TANDEM_TEST_DEMO_MARK", &mark)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let launched = Instant::now();
        let mut out = Vec::new();
        match when {
            When::After(d) => std::thread::sleep(d.saturating_sub(launched.elapsed())),
            When::Line(text) => loop {
                let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| {
                    let _ = child.kill();
                    panic!("{what}: no line {text:?} within 60 s ({e}): {out:?}")
                });
                let hit = line.contains(text);
                out.push(line);
                if hit {
                    break;
                }
            },
        }
        out.extend(rx.try_iter());
        assert!(
            !out.iter().any(|l| l.contains("Ctrl-C stops the cluster")),
            "{what}: the demo had already started, this tests nothing: {out:?}"
        );
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let sent = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if sent.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{what}: the demo still runs 20 s later: {out:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = sent.elapsed();
        reader.join().unwrap();
        out.extend(rx.try_iter());
        assert!(status.success(), "{what}: exit status {status}: {out:?}");
        assert!(!out.iter().any(|l| l.contains("Ctrl-C stops the cluster")), "{what}: it went on starting: {out:?}");
        assert!(out.iter().any(|l| l.contains("interrupted while starting")), "{what}: {out:?}");
        // Everything it started is gone (the agents stopped their resources
        // before they exited; their watchdogs follow within a poll).
        let left = left_after(&mark, Duration::from_secs(5));
        assert!(left.is_empty(), "{what}: left running after the demo exited: {left:?}");
        assert!(!data.exists(), "{what}: the demo removes its data unless --keep");
        println!("{what}: stopped in {} ms: {out:?}", took.as_millis());
    }
}

/// Why `tandem demo --app postgres` cannot run here, if it cannot.
fn postgres_demo_missing() -> Option<&'static str> {
    if !tandem_testkit::is_root() {
        return Some("needs root (mounts, loop devices)");
    }
    let needs = [
        ("/dev/fuse", "no /dev/fuse"),
        ("/usr/lib/postgresql/15/bin/postgres", "no PostgreSQL 15 (Debian postgresql)"),
        ("/usr/bin/psql", "no psql (Debian postgresql-client-15)"),
        ("/usr/bin/nbdfuse", "no nbdfuse (Debian libnbd-bin)"),
        ("/usr/sbin/mkfs.ext4", "no mkfs.ext4 (Debian e2fsprogs)"),
    ];
    needs.iter().find(|(p, _)| !std::path::Path::new(p).exists()).map(|(_, why)| *why)
}

/// Processes whose command line names `path` (PostgreSQL's -D, nbdfuse's
/// file, an agent's config), and loop devices backed by a file under it.
fn left_under(path: &std::path::Path) -> Vec<String> {
    let p = path.to_string_lossy().to_string();
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let cmd =
            String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        if cmd.contains(&p) && alive(pid) {
            left.push(format!("process {pid}: {cmd}"));
        }
    }
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let b = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if b.starts_with(&p) {
            left.push(format!("{}: {}", e.file_name().to_string_lossy(), b.trim()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(mounts.lines().filter(|l| l.contains(&p)).map(|l| format!("mounted: {l}")));
    left
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_demo_prints_a_psql_command_that_works_and_stops_cleanly() {
    if let Some(why) = postgres_demo_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let base = loop {
        let b = free_base();
        if std::net::TcpListener::bind(("127.0.0.1", b + 81)).is_ok() {
            break b;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    // PostgreSQL runs as postgres: it must reach the demo's directory.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let data = dir.path().join("demo");
    let mark = format!("{}-pg", std::process::id());
    let mut child = Command::new(BIN)
        .args(["demo", "--app", "postgres", "--base-port", &base.to_string(), "--dir"])
        .arg(&data)
        .env("TANDEM_TEST_DEMO_MARK", &mark)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.contains("Ctrl-C stops the cluster");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while !lines.is_finished() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
            let out = child.wait_with_output().unwrap();
            panic!("the demo printed no banner: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let banner = lines.join().unwrap();
    eprintln!("{}", banner.join("\n"));

    // The printed psql command, as printed, through a shell.
    let psql = banner.iter().find(|l| l.contains("psql -h")).expect("a psql line in the banner");
    let out = Command::new("sh").args(["-c", psql.trim()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{psql}: {}{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.trim() == "node1"), "{psql}: {text}");
    // It mounted in its agent's own mount namespace, not in this one.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(data.to_string_lossy().as_ref()), "a demo mount leaked into the host's namespace");

    // Ctrl-C: PostgreSQL stops, the file system is unmounted, nothing is
    // left running or mounted.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit status {status}");
    let left = left_after(&mark, Duration::from_secs(5));
    assert!(left.is_empty(), "left running after the demo exited: {left:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !left_under(&data).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(left_under(&data).is_empty(), "left behind: {:?}", left_under(&data));
    assert!(!data.exists(), "the demo removes its data unless --keep");
}

#[test]
fn the_postgres_demo_names_what_is_missing_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    // No PATH: none of the programs it needs can be found.
    let out = Command::new(BIN)
        .args(["demo", "--app", "postgres", "--base-port", &free_base().to_string(), "--dir"])
        .arg(&data)
        .env("PATH", dir.path().join("empty"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    for want in ["--app postgres", "nbdfuse", "libnbd-bin", "mkfs.ext4", "e2fsprogs", "psql"] {
        assert!(stderr.contains(want), "{want} not named: {stderr}");
    }
    if !tandem_testkit::is_root() {
        assert!(stderr.contains("root"), "{stderr}");
    }
    assert!(!stdout.contains("answers at"), "it started agents: {stdout}");
    assert!(!data.exists(), "it made its directory: nothing may start");
}
