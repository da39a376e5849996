//! The Debian package, installed for real into this machine:
//! - `dpkg -i`, its files and their modes, the unit enabled but no agent
//!   started, `tandem --version`, the shipped config through the agent's
//!   own check; `dpkg -r` keeps the config and the node's data; `dpkg -P`
//!   leaves nothing;
//! - docs/install.md, block by block, on two servers and a witness that are
//!   network namespaces, the agent run the way its unit runs it.
//!
//! They change the machine (a package, /etc/tandem, /var/lib/tandem), so
//! they run only as root with CI=true or TANDEM_DEB_TEST=1, and say why they
//! skip otherwise; one at a time (nextest's `dpkg` test group, a lock here).
//! The .deb is $TANDEM_DEB (`cargo xtask test` builds it), else built here
//! with `cargo xtask deb`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_testkit::{is_root, kill_session, Net};

/// One test at a time in this process (`cargo test`); nextest runs each in
/// its own process and serializes them with a test group.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const UNIT: &str = "/lib/systemd/system/tandem.service";
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/tandem.service";

/// The .deb to test, or None (and why) when this machine must not be touched.
fn package() -> Option<PathBuf> {
    if !is_root() {
        eprintln!("skipped: installs a package into this machine, which needs root (CI runs as root)");
        return None;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let asked = std::env::var("TANDEM_DEB_TEST").is_ok_and(|v| v == "1");
    if !(ci || asked) {
        eprintln!(
            "skipped: installs and purges the tandem package on this machine; \
             only with CI=true or TANDEM_DEB_TEST=1"
        );
        return None;
    }
    if let Some(deb) = std::env::var_os("TANDEM_DEB") {
        return Some(PathBuf::from(deb));
    }
    eprintln!("TANDEM_DEB is not set: building the package with `cargo xtask deb`");
    let out = Command::new(env!("CARGO"))
        .args(["xtask", "deb"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run cargo xtask deb");
    assert!(out.status.success(), "cargo xtask deb failed");
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    Some(PathBuf::from(path))
}

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = sh(program, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {}: {}\n{text}", args.join(" "), out.status);
    text
}

/// `ii` installed, `rc` removed with its config, "" unknown.
fn status() -> String {
    let out = sh("dpkg-query", &["-W", "-f", "${db:Status-Abbrev}", "tandem"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Purges the package when dropped, whatever the test did.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if !status().is_empty() {
            let _ = sh("dpkg", &["--purge", "tandem"]);
        }
    }
}

/// Refuses a machine whose /var/lib/tandem holds a node's data (purge would
/// delete it); purges a package left by an earlier, interrupted run.
fn clean_slate() -> Purge {
    assert!(
        !Path::new("/var/lib/tandem/raft").exists(),
        "/var/lib/tandem/raft exists: this machine holds a tandem node's data, which the test's purge would delete"
    );
    if !status().is_empty() {
        eprintln!("tandem is installed ({}): purging it first", status());
        ok("dpkg", &["--purge", "tandem"]);
    }
    Purge
}

fn mode(path: &str) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

fn exists(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Any live process running `exe`.
fn running(exe: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == Path::new(exe)))
        .collect()
}

#[test]
fn the_package_installs_validates_removes_and_purges_cleanly() {
    let Some(deb) = package() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _purge = clean_slate();
    let deb = deb.display().to_string();
    let t0 = Instant::now();

    let said = ok("dpkg", &["-i", &deb]);
    eprintln!("{said}");
    assert_eq!(status(), "ii");

    // Files, owners, modes.
    assert_eq!(mode("/usr/bin/tandem"), (0o755, 0, 0));
    assert_eq!(mode(UNIT), (0o644, 0, 0));
    assert_eq!(mode("/etc/tandem/node.toml"), (0o640, 0, 0));
    assert_eq!(mode("/var/lib/tandem"), (0o750, 0, 0));
    assert_eq!(mode("/var/lib/tandem/run"), (0o750, 0, 0));
    let conffiles = ok("dpkg-query", &["-W", "-f", "${Conffiles}", "tandem"]);
    assert!(conffiles.contains("/etc/tandem/node.toml"), "{conffiles}");
    let control = ok("dpkg-query", &["-W", "-f", "${Depends}|${Recommends}", "tandem"]);
    for dep in ["librocksdb7.8", "iproute2", "resource-agents", "qemu-utils"] {
        assert!(control.contains(dep), "{dep} not in {control}");
    }
    // Every library the binary loads is found (its packages are in Depends).
    let ldd = ok("ldd", &["/usr/bin/tandem"]);
    assert!(!ldd.contains("not found") && ldd.contains("librocksdb.so.7.8"), "{ldd}");
    // dpkg's own checksums of every shipped file.
    let verify = ok("dpkg", &["--verify", "tandem"]);
    assert!(verify.trim().is_empty(), "{verify}");

    // The unit runs the package's binary; enabled at boot, started by nobody.
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.lines().any(|l| l == "ExecStart=/usr/bin/tandem agent --config /etc/tandem/node.toml"), "{unit}");
    assert_eq!(std::fs::read_link(ENABLED).unwrap(), Path::new(UNIT));
    assert!(running("/usr/bin/tandem").is_empty(), "the package must not start an agent");

    // The binary, and the shipped config through the agent's own check.
    let version = ok("/usr/bin/tandem", &["--version"]);
    assert_eq!(version.trim(), format!("tandem {}", env!("CARGO_PKG_VERSION")));
    let checked = ok("/usr/bin/tandem", &["check-config", "--config", "/etc/tandem/node.toml"]);
    assert!(checked.contains("valid"), "{checked}");

    // A man page for every command the installed binary has, and completions.
    let tmp = tempfile::tempdir().unwrap();
    ok("/usr/bin/tandem", &["generate", "--out-dir", &tmp.path().display().to_string()]);
    let mut pages = 0;
    for e in std::fs::read_dir(tmp.path().join("man")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let shipped = format!("/usr/share/man/man1/{name}.gz");
        assert_eq!(mode(&shipped), (0o644, 0, 0), "{shipped}");
        ok("gzip", &["-t", &shipped]);
        pages += 1;
    }
    assert!(pages > 20 && exists("/usr/share/man/man1/tandem-group-move.1.gz"), "{pages} pages");
    for f in [
        "/usr/share/bash-completion/completions/tandem",
        "/usr/share/zsh/vendor-completions/_tandem",
        "/usr/share/fish/vendor_completions.d/tandem.fish",
    ] {
        assert!(std::fs::read_to_string(f).unwrap().contains("check-config"), "{f}");
    }

    // What a running node leaves, and an admin's edit of the config.
    std::fs::create_dir_all("/var/lib/tandem/groups/web").unwrap();
    std::fs::write("/var/lib/tandem/groups/web/http.log", "a node's data\n").unwrap();
    let mut conf = std::fs::read_to_string("/etc/tandem/node.toml").unwrap();
    conf = conf.replace("name = \"node1\"", "name = \"db1\"");
    std::fs::write("/etc/tandem/node.toml", &conf).unwrap();

    // remove: the program goes; the config and the data stay.
    ok("dpkg", &["-r", "tandem"]);
    assert_eq!(status(), "rc");
    for gone in
        ["/usr/bin/tandem", UNIT, "/usr/share/man/man1/tandem.1.gz", "/usr/share/zsh/vendor-completions/_tandem"]
    {
        assert!(!exists(gone), "{gone} left after dpkg -r");
    }
    assert_eq!(std::fs::read_to_string("/etc/tandem/node.toml").unwrap(), conf);
    assert!(exists("/var/lib/tandem/groups/web/http.log"), "dpkg -r deleted the node's data");

    // purge: nothing of tandem's is left.
    ok("dpkg", &["-P", "tandem"]);
    assert_eq!(status(), "");
    for gone in [
        "/etc/tandem",
        "/var/lib/tandem",
        ENABLED,
        "/etc/systemd/system/tandem.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/tandem.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/tandem.service",
        "/var/lib/systemd/deb-systemd-helper-masked/tandem.service",
    ] {
        assert!(!exists(gone), "{gone} left after dpkg -P");
    }
    eprintln!("install, checks, remove and purge: {:?}", t0.elapsed());
}

// ---- docs/install.md, run in three network namespaces ----

/// The guide's ```sh blocks, in order: (where, commands). `where` is the
/// block's first line, `# on srv1`, `# on all three`, ...
fn guide_blocks() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/install.md")).unwrap();
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in doc.lines() {
        match &mut cur {
            None if line == "```sh" => cur = Some(Vec::new()),
            Some(lines) if line == "```" => {
                let where_ = lines.first().copied().unwrap_or_default().to_string();
                blocks.push((where_, lines[1..].join("\n")));
                cur = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    blocks
}

/// A machine of the guide: its namespace and its own /etc/tandem,
/// /var/lib/tandem, notify socket, pid and log under `dir`.
struct Machine {
    name: &'static str,
    ns: String,
    dir: PathBuf,
    /// What the agent told its "systemd" (READY=1, WATCHDOG=1, ...).
    notified: Arc<Mutex<Vec<String>>>,
}

/// Receives the agent's sd_notify messages, as systemd does for
/// `Type=notify`, and marks `ready` on READY=1 for the `systemctl` stand-in.
fn listen_notify(m: &Machine, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let sock = UnixDatagram::bind(m.dir.join("notify")).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (ready, notified) = (m.dir.join("ready"), m.notified.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == "READY=1") {
                    let _ = std::fs::write(&ready, "");
                }
                notified.lock().unwrap().push(msg);
            }
        }
    })
}

/// Runs before each block: the machine's own /etc/tandem and /var/lib/tandem
/// (bind mounts, private to this namespace's processes; seeded from what the
/// package installed), and `systemctl enable --now tandem` played the way
/// the unit runs the agent.
const PRELUDE: &str = r#"set -euo pipefail
if [ -d /etc/tandem ] && [ -d /var/lib/tandem ]; then
    if [ ! -e "$M/seeded" ]; then
        cp -a /etc/tandem/. "$M/etc/" && chmod --reference=/etc/tandem "$M/etc"
        cp -a /var/lib/tandem/. "$M/data/" && chmod --reference=/var/lib/tandem "$M/data"
        touch "$M/seeded"
    fi
    mount --bind "$M/etc" /etc/tandem
    mount --bind "$M/data" /var/lib/tandem
fi
systemctl() {
    if [ "$*" != "enable --now tandem" ]; then
        echo "no systemd here: the test plays 'systemctl enable --now tandem' only, not 'systemctl $*'" >&2
        return 1
    fi
    local unit=/lib/systemd/system/tandem.service exec_start wd nofile
    exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
    wd=$(sed -n 's/^WatchdogSec=\([0-9]*\)s$/\1/p' "$unit")
    nofile=$(sed -n 's/^LimitNOFILE=//p' "$unit")
    if [ -z "$exec_start" ] || [ -z "$wd" ] || [ -z "$nofile" ]; then
        echo "$unit: no ExecStart=, WatchdogSec=<n>s or LimitNOFILE=" >&2
        return 1
    fi
    rm -f "$M/ready" "$M/pid"
    # As systemd starts it: from /, a clean environment, its own session,
    # the notify socket and the watchdog period, stdin from /dev/null.
    (cd / && exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        NOTIFY_SOCKET="$M/notify" WATCHDOG_USEC=$((wd * 1000000)) \
        setsid sh -c 'echo $$ > "$0"; export WATCHDOG_PID=$$; ulimit -n "$1"; exec $2' "$M/pid" "$nofile" "$exec_start" \
        </dev/null >>"$M/agent.log" 2>&1) &
    for _ in $(seq 300); do
        [ -e "$M/ready" ] && return 0
        if [ -s "$M/pid" ] && ! kill -0 "$(cat "$M/pid")" 2>/dev/null; then
            echo "the agent exited before READY=1:" >&2
            tail -20 "$M/agent.log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "no READY=1 from the agent within 30 s" >&2
    return 1
}
"#;

/// Stops the agents when dropped (SIGTERM as `systemctl stop` sends it to
/// the main process; then whatever is left of their sessions).
struct Agents(Vec<PathBuf>);

impl Agents {
    fn pids(&self) -> Vec<i32> {
        self.0.iter().filter_map(|d| std::fs::read_to_string(d.join("pid")).ok()?.trim().parse().ok()).collect()
    }
}

impl Agents {
    /// Whether every agent exited within `within` of its SIGTERM.
    fn stop(&self, within: Duration) -> bool {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + within;
        while self.pids().iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
        for pid in self.pids() {
            kill_session(pid);
        }
    }
}

#[test]
fn the_install_guide_brings_up_two_servers_and_a_witness() {
    let Some(deb) = package() else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _purge = clean_slate();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // apt's unprivileged downloader reads the local .deb from here.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pkg_dir = tmp.path().join("pkg");
    std::fs::create_dir(&pkg_dir).unwrap();
    std::fs::copy(&deb, pkg_dir.join(deb.file_name().unwrap())).unwrap();

    // Two networks, three machines; the guide's addresses become ours.
    let mut net = Net::new();
    let mut machines = Vec::new();
    for (i, name) in [(11u8, "srv1"), (12, "srv2"), (13, "witness")] {
        let (ns, _) = net.host(i);
        net.second_path(i);
        let dir = tmp.path().join(name);
        for sub in ["etc", "data", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        machines.push(Machine { name, ns, dir, notified: Default::default() });
    }
    let ours = |text: &str| {
        text.replace("10.0.0.", &format!("{}.", net.prefix)).replace("10.0.1.", &format!("{}.", net.prefix2))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let listeners: Vec<_> = machines.iter().map(|m| listen_notify(m, stop.clone())).collect();
    let agents = Agents(machines.iter().map(|m| m.dir.clone()).collect());

    let blocks = guide_blocks();
    assert!(blocks.len() >= 8, "docs/install.md: {} sh blocks", blocks.len());
    // The join token and CA pin srv1 printed, pasted where the guide
    // abbreviates them.
    let mut printed: Option<(String, String)> = None;
    for (where_, commands) in &blocks {
        let on: Vec<&Machine> = match where_.as_str() {
            "# on srv1" => machines.iter().filter(|m| m.name == "srv1").collect(),
            "# on srv2" => machines.iter().filter(|m| m.name == "srv2").collect(),
            "# on the witness" => machines.iter().filter(|m| m.name == "witness").collect(),
            "# on all three" => machines.iter().collect(),
            "# on the build machine" => {
                eprintln!("not run: the build machine's block (cargo xtask test built the package)");
                continue;
            }
            "# to remove tandem" => {
                eprintln!("not run: removal (the package test checks dpkg -r and -P)");
                continue;
            }
            other => {
                panic!("docs/install.md: a sh block must start with where it runs (`# on srv1`, ...), not {other:?}")
            }
        };
        for m in on {
            let commands = tandem_testkit::api::paste_join(&ours(commands), printed.as_ref())
                .unwrap_or_else(|e| panic!("docs/install.md: {e}"));
            let script = format!("{PRELUDE}cd {}\n{commands}\n", pkg_dir.display());
            eprintln!("--- {} ({}):\n{commands}", m.name, m.ns);
            // `~` is the machine's own (the guide writes the CLI's file there).
            let out = Command::new("ip")
                .args(["netns", "exec", &m.ns, "bash", "-c", &script])
                .env("M", &m.dir)
                .env("HOME", m.dir.join("home"))
                .env_remove("TANDEM_TOKEN")
                .env_remove("TANDEM_CACERT")
                .env_remove("TANDEM_ENDPOINT")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            if let Some(p) = tandem_testkit::api::printed_join(&stdout) {
                printed = Some(p);
            }
            let log = std::fs::read_to_string(m.dir.join("agent.log")).unwrap_or_default();
            assert!(out.status.success(), "{where_} failed on {}: {}\nagent log:\n{log}", m.name, out.status);
        }
    }

    // The three agents run the unit's command with the unit's paths, each
    // on its own /var/lib/tandem, and ping the watchdog as the unit expects.
    assert_eq!(agents.pids().len(), 3, "every machine started its agent");
    for m in &machines {
        assert!(m.dir.join("data/raft").is_dir(), "{}: the agent did not use its /var/lib/tandem", m.name);
    }
    assert!(!Path::new("/var/lib/tandem/raft").exists(), "an agent wrote into the real /var/lib/tandem");
    let deadline = Instant::now() + Duration::from_secs(15);
    for m in &machines {
        while !m.notified.lock().unwrap().iter().any(|s| s.contains("WATCHDOG=1")) {
            assert!(Instant::now() < deadline, "{}: no WATCHDOG=1 ping: {:?}", m.name, m.notified.lock().unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Two servers that vote and a witness, all online.
    let srv1 = &machines[0];
    let endpoint = ours("https://10.0.0.11:7401");
    let token = std::fs::read_to_string(srv1.dir.join("data/admin.token")).expect("srv1's admin token");
    let cacert = srv1.dir.join("data/tls/ca.pem");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &srv1.ns, "/usr/bin/tandem", "--endpoint", &endpoint, "node", "list", "--json"])
            .arg("--token")
            .arg(token.trim())
            .arg("--cacert")
            .arg(&cacert)
            .output()
            .unwrap();
        if out.status.success() {
            last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let roles: Vec<(String, String, String)> = last
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| (n["name"].to_string(), n["role"].to_string(), n["state"].to_string()))
                .collect();
            let want = [("srv1", "voter"), ("srv2", "voter"), ("witness", "witness")];
            if roles.len() == 3
                && want.iter().all(|(name, role)| {
                    roles
                        .iter()
                        .any(|r| r.0 == format!("\"{name}\"") && r.1 == format!("\"{role}\"") && r.2 == "\"online\"")
                })
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no two voters and a witness, all online, within 60 s: {last:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // `systemctl stop tandem`: SIGTERM to the agent, which stops cleanly.
    assert!(agents.stop(Duration::from_secs(30)), "an agent outlived its SIGTERM by 30 s");
    drop(agents);
    stop.store(true, Ordering::Relaxed);
    for l in listeners {
        l.join().unwrap();
    }
    drop(net);
    eprintln!("the install guide, from the package to a cluster of three: {:?}", t0.elapsed());
}
