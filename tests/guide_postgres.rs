//! docs/guides/postgresql.md, run: every ```sh block of the guide, in
//! order, on two servers, a witness and a client that are network
//! namespaces of this machine (two networks between the servers), with the
//! guide's `<!-- test: power off|on <machine> -->` marks played where they
//! stand. It checks what the client's psql answers through the virtual IP:
//! srv1 first, srv2 after the switchover, then srv1 again after srv2's
//! power loss, with the rows written before both.
//!
//! What the test changes in the guide's text (the guide says the same in
//! "How this guide is tested"): the addresses become the test's networks,
//! the join token and CA pin the guide abbreviates (`tnd_…`, `sha256:…`)
//! are those srv1's `tandem cluster join-token` printed,
//! system paths become directories under the test's temporary directory,
//! the volume is smaller, `systemctl` is played (no systemd here), and so
//! is `apt-get install` (it checks the packages are installed: a test must
//! not install or upgrade packages on the machine).
//!
//! Needs root (namespaces, mounts, loop devices), /dev/fuse, PostgreSQL 15,
//! nbdfuse and mkfs.ext4; says which is missing and skips otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_testkit::{is_root, kill_session, Net};

const GUIDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/guides/postgresql.md");

/// Why this machine cannot run the guide, if it cannot.
fn missing() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, mounts, loop devices)".into());
    }
    let needs = [
        ("/dev/fuse", "the FUSE device"),
        ("/usr/lib/postgresql/15/bin/postgres", "PostgreSQL 15 (Debian postgresql)"),
        ("/usr/bin/psql", "psql (Debian postgresql-client)"),
        ("/usr/bin/pg_isready", "pg_isready (Debian postgresql-client)"),
        ("/usr/bin/nbdfuse", "nbdfuse (Debian libnbd-bin)"),
        ("/usr/sbin/mkfs.ext4", "mkfs.ext4 (Debian e2fsprogs)"),
    ];
    let lacking: Vec<&str> = needs.iter().filter(|(p, _)| !Path::new(p).exists()).map(|(_, what)| *what).collect();
    (!lacking.is_empty()).then(|| format!("missing {}", lacking.join(", ")))
}

/// What the guide asks for, in order.
#[derive(Debug)]
enum Step {
    /// A ```sh block: where it runs (its first line) and its commands.
    Block { on: String, commands: String },
    /// `<!-- test: power off srv2 -->`: (`off` or `on`, the machine).
    Power { on: bool, machine: String },
}

fn steps(doc: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut block: Option<Vec<&str>> = None;
    for line in doc.lines() {
        match &mut block {
            None if line == "```sh" => block = Some(Vec::new()),
            None => {
                if let Some(mark) = line.strip_prefix("<!-- test: ").and_then(|l| l.strip_suffix(" -->")) {
                    let f: Vec<&str> = mark.split_whitespace().collect();
                    match f.as_slice() {
                        ["power", state @ ("off" | "on"), machine] => {
                            out.push(Step::Power { on: *state == "on", machine: machine.to_string() })
                        }
                        _ => panic!("the guide has a test mark this test does not know: {line:?}"),
                    }
                }
            }
            Some(lines) if line == "```" => {
                let on = lines.first().copied().unwrap_or_default().to_string();
                out.push(Step::Block { on, commands: lines[1..].join("\n") });
                block = None;
            }
            Some(lines) => lines.push(line),
        }
    }
    assert!(block.is_none(), "the guide ends inside a ```sh block");
    out
}

/// A machine of the guide: its namespace, its host number on the
/// networks, and its own directory (its /etc/tandem, /var/lib/tandem,
/// home, agent log and pid).
struct Machine {
    name: &'static str,
    ns: String,
    host: u8,
    dir: PathBuf,
}

/// Runs before each block (after the same substitutions as the block):
/// stops at the first failing command, finds the test's `tandem` first,
/// plays the two `systemctl` commands the guide uses, and plays `apt-get
/// install` as a check that the packages are there (a real one would
/// upgrade them on this machine).
const PRELUDE: &str = r#"set -euo pipefail
export PATH="$TEST_BIN:$PATH" HOME="$M/home"
apt-get() {
    # Never into this machine: the packages the guide installs must be
    # installed already (the test skips otherwise); check each one.
    if [ "${1:-}" != install ] || [ "${2:-}" != -y ]; then
        echo "the test plays only 'apt-get install -y PACKAGES', not 'apt-get $*'" >&2
        return 1
    fi
    shift 2
    local p
    for p in "$@"; do
        dpkg-query -W -f '${db:Status-Abbrev}' "$p" | grep -q '^ii' || { echo "$p is not installed" >&2; return 1; }
    done
}
systemctl() {
    case "$*" in
    "enable --now tandem")
        # As the unit starts it: from /, its own session, stdin from
        # /dev/null; then wait until it answers, as Type=notify would.
        rm -f "$M/pid"
        (cd / && exec setsid sh -c 'echo $$ > "$0"; exec tandem agent --config "$1"' "$M/pid" /etc/tandem/node.toml \
            </dev/null >>"$M/agent.log" 2>&1) &
        # Its admin socket answers before it has a certificate anyone trusts.
        for _ in $(seq 300); do
            curl -sf -o /dev/null --unix-socket /var/lib/tandem/admin.sock http://localhost/healthz && return 0
            sleep 0.1
        done
        echo "the agent did not answer within 30 s:" >&2
        tail -20 "$M/agent.log" >&2
        return 1
        ;;
    "disable --now postgresql")
        # No systemd, and Debian's own cluster cannot run in this fresh
        # namespace: check that nothing listens on PostgreSQL's port here.
        if ss -Hltn 'sport = :5432' | grep -q .; then
            echo "something listens on port 5432 in this namespace" >&2
            return 1
        fi
        ;;
    *)
        echo "no systemd here: the test plays only 'systemctl enable --now tandem' and 'systemctl disable --now postgresql', not 'systemctl $*'" >&2
        return 1
        ;;
    esac
}
"#;

/// The guide's text as this test runs it on `m`.
struct Rewrite {
    prefix: String,
    prefix2: String,
    shared: PathBuf,
}

impl Rewrite {
    fn apply(&self, text: &str, m: &Machine) -> String {
        let (d, s) = (m.dir.display(), self.shared.display());
        text.replace("10.0.0.", &format!("{}.", self.prefix))
            .replace("10.0.1.", &format!("{}.", self.prefix2))
            .replace("/etc/tandem", &format!("{d}/etc"))
            .replace("/var/lib/tandem", &format!("{d}/data"))
            .replace("/srv/pg", &format!("{s}/srv/pg"))
            .replace("/usr/local/bin/tandem-postgres", &format!("{s}/bin/tandem-postgres"))
            .replace("/etc/postgresql/tandem.password", &format!("{s}/tandem.password"))
            .replace("\"size\": \"20GiB\"", "\"size\": \"256MiB\"")
    }
}

/// Runs `commands` (already rewritten) on `m`; its stdout, or a panic with
/// everything it printed and the agent's log.
fn run_on(m: &Machine, prelude: &str, commands: &str, test_bin: &Path) -> String {
    let script = format!("{prelude}cd {}\n{commands}\n", m.dir.display());
    let out = Command::new("timeout")
        .args(["120", "ip", "netns", "exec", &m.ns, "bash", "-c", &script])
        .env("M", &m.dir)
        .env("TEST_BIN", test_bin)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}{stderr}");
    if !out.status.success() {
        let log = std::fs::read_to_string(m.dir.join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        panic!("failed on {} ({}):\n{commands}\nagent log:\n{}", m.name, out.status, tail.join("\n"));
    }
    stdout.into_owned()
}

fn agent_pid(m: &Machine) -> Option<i32> {
    std::fs::read_to_string(m.dir.join("pid")).ok()?.trim().parse().ok()
}

/// The agents when the test ends, however it ends: SIGTERM (each stops
/// PostgreSQL, unmounts and detaches), then whatever is left of their
/// sessions.
struct Agents<'a>(&'a [Machine]);

impl Drop for Agents<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in self.0.iter().filter(|m| m.name.starts_with("srv")) {
                let tail = |p: &str| {
                    let text = std::fs::read_to_string(m.dir.join(p)).unwrap_or_default();
                    // Raft's retries towards a powered-off peer drown the rest.
                    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("openraft")).collect();
                    lines[lines.len().saturating_sub(200)..].join("\n")
                };
                eprintln!("--- {}: PostgreSQL's log:\n{}", m.name, tail("data/groups/postgres/db.log"));
                eprintln!("--- {}: the agent's log:\n{}", m.name, tail("agent.log"));
            }
        }
        let pids: Vec<i32> = self.0.iter().filter_map(agent_pid).collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while pids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in pids {
            kill_session(pid);
        }
    }
}

/// SIGKILLs every process in network namespace `ns` until none is left,
/// then waits until each is reaped.
fn power_off(ns: &str) {
    let pids = || -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", ns]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    };
    let mut seen: std::collections::BTreeSet<i32> = pids().into_iter().collect();
    // The FUSE server first, the rest once it is gone (see
    // `tandem_testkit::kill_netns`): killed together, the last process of
    // the host's mount namespace may unmount the ext4 on nbdfuse's file
    // while nbdfuse can no longer serve it, and wait forever — PostgreSQL's
    // lock file then names a process that never goes, and no other host
    // can start it.
    tandem_testkit::kill_netns(ns);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<i32> = pids().into_iter().filter(|p| !is_zombie(*p)).collect();
        if now.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes of {ns} survive SIGKILL: {now:?}");
        for pid in now {
            seen.insert(pid);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(true)
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let d = dir.to_string_lossy().to_string();
    entries
        .flatten()
        .filter_map(|e| {
            let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            b.starts_with(&d).then(|| format!("{}: {}", e.file_name().to_string_lossy(), b.trim()))
        })
        .collect()
}

/// The values psql printed for a one-column query (`SHOW cluster_name`):
/// the lines between the dashes and `(n rows)`, trimmed.
fn psql_values(out: &str) -> Vec<String> {
    let mut vals = Vec::new();
    let mut inside = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("---") {
            inside = true;
        } else if t.starts_with('(') && t.ends_with(')') {
            inside = false;
        } else if inside {
            vals.push(t.to_string());
        }
    }
    vals
}

#[test]
fn the_postgresql_guide_survives_a_switchover_and_a_power_loss() {
    if let Some(why) = missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // PostgreSQL runs as `postgres`: it must reach /srv/pg and its script
    // under the temporary directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = tmp.path().join("shared");
    for sub in ["srv", "bin"] {
        std::fs::create_dir_all(shared.join(sub)).unwrap();
    }
    let test_bin = tmp.path().join("path");
    std::fs::create_dir(&test_bin).unwrap();
    std::os::unix::fs::symlink(common::BIN, test_bin.join("tandem")).unwrap();

    let mut net = Net::new();
    let mut machines = Vec::new();
    for (host, name) in [(11u8, "srv1"), (12, "srv2"), (13, "witness"), (20, "client")] {
        let (ns, _) = net.host(host);
        if name != "client" {
            net.second_path(host);
        }
        let dir = tmp.path().join(name);
        for sub in ["etc", "data", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        machines.push(Machine { name, ns, host, dir });
    }
    let rw = Rewrite { prefix: net.prefix.clone(), prefix2: net.prefix2.clone(), shared };
    let vip = format!("{}.100", net.prefix);
    let agents = Agents(&machines);
    let by_name = |n: &str| machines.iter().find(|m| m.name == n).unwrap_or_else(|| panic!("no machine {n}"));

    let doc = std::fs::read_to_string(GUIDE).unwrap();
    let steps = steps(&doc);
    let blocks = steps.iter().filter(|s| matches!(s, Step::Block { .. })).count();
    assert!(blocks >= 12, "docs/guides/postgresql.md: only {blocks} sh blocks");
    let mut client_out = Vec::new();
    // The join token and CA pin srv1 printed, pasted where the guide
    // abbreviates them.
    let mut printed: Option<(String, String)> = None;
    for step in &steps {
        match step {
            Step::Block { on, commands } => {
                let on_machines: Vec<&Machine> = match on.as_str() {
                    "# on srv1" => vec![by_name("srv1")],
                    "# on srv2" => vec![by_name("srv2")],
                    "# on the witness" => vec![by_name("witness")],
                    "# on srv1 and srv2" => vec![by_name("srv1"), by_name("srv2")],
                    "# on a client" => vec![by_name("client")],
                    other => panic!(
                        "a sh block of the guide must start with where it runs (`# on srv1`, ...), not {other:?}"
                    ),
                };
                // A client stays connected through the switchover: the stop
                // must not wait for it (PostgreSQL's own SIGTERM would).
                let switchover = commands.contains("group move");
                let idle = switchover.then(|| {
                    let client = by_name("client");
                    let child = Command::new("ip")
                        .args(["netns", "exec", &client.ns, "psql"])
                        .arg(format!(
                            "host={vip} user=postgres keepalives_idle=1 keepalives_interval=1 keepalives_count=3"
                        ))
                        .args(["-c", "SELECT pg_sleep(600)"])
                        .env("HOME", client.dir.join("home"))
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap();
                    // Connected before the move starts.
                    std::thread::sleep(Duration::from_secs(1));
                    child
                });
                let started = Instant::now();
                for m in on_machines {
                    let commands = tandem_testkit::api::paste_join(&rw.apply(commands, m), printed.as_ref())
                        .unwrap_or_else(|e| panic!("docs/guides/postgresql.md: {e}"));
                    eprintln!("--- {} ({}), {:?}:\n{commands}", m.name, m.ns, t0.elapsed());
                    let out = run_on(m, &rw.apply(PRELUDE, m), &commands, &test_bin);
                    if let Some(p) = tandem_testkit::api::printed_join(&out) {
                        printed = Some(p);
                    }
                    if m.name == "client" {
                        client_out.push(out);
                    }
                }
                if let Some(mut idle) = idle {
                    let took = started.elapsed();
                    assert!(took < Duration::from_secs(20), "the switchover took {took:?}: it waited for a client");
                    // The address left before PostgreSQL stopped: the client
                    // learns its session is gone through its keepalives (the
                    // new server answers them with a reset).
                    let deadline = Instant::now() + Duration::from_secs(15);
                    while idle.try_wait().unwrap().is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let ended = idle.try_wait().unwrap().is_some();
                    let _ = idle.kill();
                    let _ = idle.wait();
                    assert!(ended, "the idle client's session outlived the switchover by 15 s despite keepalives");
                    eprintln!("switchover with a client connected: {took:?}");
                }
            }
            Step::Power { on: false, machine } => {
                let m = by_name(machine);
                eprintln!("--- power off {machine}, {:?}", t0.elapsed());
                // Every process of the machine at once (PostgreSQL's children
                // leave the agent's session: all that runs in its network
                // namespace), gone for good as on another machine (no
                // zombie with a pid PostgreSQL's lock file might name), its
                // links, and what lived only in its memory: the addresses
                // the agent had added.
                assert!(agent_pid(m).is_some(), "no agent ran on {machine}");
                power_off(&m.ns);
                net.set_link(m.host, false);
                net.set_second_link(m.host, false);
                let _ =
                    Command::new("ip").args(["-n", &m.ns, "addr", "del", &format!("{vip}/24"), "dev", "eth0"]).output();
            }
            Step::Power { on: true, machine } => {
                let m = by_name(machine);
                eprintln!("--- power on {machine}, {:?}", t0.elapsed());
                net.set_link(m.host, true);
                net.set_second_link(m.host, true);
                run_on(m, &rw.apply(PRELUDE, m), "systemctl enable --now tandem", &test_bin);
            }
        }
    }

    // What the client saw: srv1, then srv2 after the switchover, then srv1
    // after srv2's power loss, with both rows.
    let answered: Vec<Vec<String>> = client_out.iter().map(|o| psql_values(o)).collect();
    eprintln!("the client's psql answers, block by block: {answered:?}");
    assert_eq!(answered.len(), 3, "three client blocks: {client_out:?}");
    assert_eq!(answered[0].first().map(String::as_str), Some("srv1"), "first start: {}", client_out[0]);
    assert_eq!(answered[1].first().map(String::as_str), Some("srv2"), "after the switchover: {}", client_out[1]);
    assert_eq!(
        answered[2],
        ["srv1", "written on srv1 before the switchover", "written on srv2 before its power loss"],
        "after srv2's power loss: {}",
        client_out[2]
    );

    // Stopped, the agents leave nothing behind: no loop device on a volume
    // of theirs (the mounts were in their own mount namespaces).
    drop(agents);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !loops_under(tmp.path()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(loops_under(tmp.path()).is_empty(), "loop devices left: {:?}", loops_under(tmp.path()));
    drop(net);
    eprintln!("the PostgreSQL guide, from configs to a failover and back: {:?}", t0.elapsed());
}
