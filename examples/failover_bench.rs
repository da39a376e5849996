//! Failover benchmark: a virtual IP with an HTTP service behind it, hosts in
//! network namespaces, a client in its own namespace polling the VIP.
//! "Power loss" of the node serving it (SIGKILL of the agent and its
//! services, link down) to the first answer from another node, N runs, for
//! tandem (3 nodes, default settings) and, side by side, keepalived (two
//! instances doing VRRP, default advert_int 1 s). Needs root and Debian's
//! keepalived, iproute2, curl and python3.
//!
//! The same tandem cluster is also measured through HAProxy (Debian's
//! haproxy; skipped when it is not installed): HAProxy in the client's
//! namespace checks every node's `GET /v1/groups/web/health` over HTTPS and
//! sends the client to port 8080 of the node that answers 200. Rounds
//! alternate VIP / HAProxy (N each), so a change of load falls on both.
//! `FAILOVER_BENCH_HAPROXY_INTER` sets HAProxy's check interval (default
//! `200ms`); `FAILOVER_BENCH_HAPROXY=0` measures the VIP alone.
//!
//! `FAILOVER_BENCH_FAST=1` also measures, in the same run, tandem with the
//! fast profile of docs/config.md (without and with a fence command) and
//! keepalived at `advert_int 0.1`.
//!
//! `FAILOVER_BENCH_FENCE=1` also measures, in the same run, a second tandem
//! cluster (VIP only) with a fence command: it kills the lost node's
//! session (what is left of it: the power is already off) and confirms, so
//! that its group moves on the confirmation instead of after the lease
//! wait (`fencing.lease_ms + margin_ms`).
//!
//!     cargo build --release --bins --examples
//!     sudo target/release/examples/failover_bench [runs]
//!
//! Also reports the idle CPU of agents that run 10 groups.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_testkit::{in_ns, in_ns_output, is_root, Net};

fn tandem_bin() -> std::path::PathBuf {
    tandem_testkit::bench::sibling_tandem_bin()
}

struct Proc(Child);

impl Drop for Proc {
    /// Power loss: the process and everything it started (its session).
    fn drop(&mut self) {
        tandem_testkit::kill_session(self.0.id() as i32);
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &str, program: &str, args: &[&str], log: &Path) -> Proc {
    // Appended: a restarted node's log keeps the rounds before (when each
    // resource started, for FAILOVER_BENCH_KEEP).
    let out = std::fs::File::options().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new("ip");
    tandem_testkit::new_session(&mut cmd);
    let child = cmd
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn");
    Proc(child)
}

/// What the client gets from the VIP, or "" when nothing answers.
fn ask(client: &str, vip: &str) -> String {
    ask_url(client, &format!("http://{vip}:8080/"))
}

/// What the client gets from `url`, or "" when nothing answers in time.
fn ask_url(client: &str, url: &str) -> String {
    // A request to a VIP nobody holds hangs until the timeout: the timeout
    // is the measurement's resolution (an answer on this LAN takes < 5 ms).
    in_ns_output(client, &["curl", "-s", "--max-time", "0.1", url]).unwrap_or_default()
}

/// Polls `url` until it answers from someone other than `old`.
fn wait_new_server(client: &str, url: &str, old: &str, start: Instant) -> Duration {
    wait_new_server_traced(client, url, old, start).0
}

/// Like `wait_new_server`, also what each poll got, with the time it was
/// sent: `.` no answer within the 0.1 s timeout, `x` a failure sooner
/// (refused, reset), `5` a 503 from HAProxy (no server up), `o` the old
/// server, `?` anything else.
fn wait_new_server_traced(client: &str, url: &str, old: &str, start: Instant) -> (Duration, Vec<(Duration, char)>) {
    let mut trace = Vec::new();
    loop {
        let sent = start.elapsed();
        let a = ask_url(client, url);
        if a.contains("hello from") && !a.contains(old) {
            return (start.elapsed(), trace);
        }
        let class = match () {
            _ if a.is_empty() && start.elapsed() - sent >= Duration::from_millis(100) => '.',
            _ if a.is_empty() => 'x',
            _ if a.contains("503") => '5',
            _ if a.contains(old) => 'o',
            _ => '?',
        };
        trace.push((sent, class));
        assert!(start.elapsed() < Duration::from_secs(60), "no failover within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn server_of(answer: &str) -> String {
    answer.trim().rsplit(' ').next().unwrap_or("").to_string()
}

fn stats(name: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let pct = |p: f64| ms(d[((d.len() as f64 - 1.0) * p).round() as usize]);
    format!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        d.len(),
        ms(d[0]),
        pct(0.5),
        pct(0.99),
        ms(d[d.len() - 1])
    )
}

fn http_get(url: &str) -> Option<Value> {
    let out = Command::new("curl").args(["-s", "--max-time", "2", url]).args(auth()).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The formed cluster's CA and admin token, for curl.
static CREDS: std::sync::Mutex<Option<tandem_testkit::api::CurlCreds>> = std::sync::Mutex::new(None);

fn auth() -> Vec<String> {
    CREDS.lock().unwrap().as_ref().map(|c| c.args()).unwrap_or_default()
}

/// Forms the cluster with the CLI (init and joins on the admin sockets).
fn form(dir: &Path, data_dirs: &[PathBuf], urls: &[String]) {
    let sockets: Vec<PathBuf> = data_dirs.iter().map(|d| d.join("admin.sock")).collect();
    for s in &sockets {
        wait("agent up", Duration::from_secs(20), || {
            Command::new("curl")
                .args(["-sf", "--max-time", "1", "--unix-socket"])
                .arg(s)
                .arg("http://localhost/healthz")
                .status()
                .is_ok_and(|st| st.success())
        });
    }
    let creds = tandem_testkit::api::cli_form(&tandem_bin(), &sockets, urls, &dir.join("ca.pem")).expect("form");
    *CREDS.lock().unwrap() = Some(creds);
}

fn http_send(method: &str, url: &str, body: &Value) -> Option<Value> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-X", method, "-d", &body.to_string(), url])
        .args(auth())
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The HAProxy binary, when Debian's haproxy is installed.
fn haproxy_bin() -> Option<&'static str> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().find(|p| Path::new(p).exists())
}

/// HAProxy's configuration: the one `tests/health.rs` runs and docs/api.md
/// shows (check each node's health endpoint over HTTPS, verified against
/// the cluster CA; traffic to port 8080 of the node that answers 200), plus
/// a log target for the server state changes alone (`no log` in the
/// frontend: no line per request).
fn haproxy_cfg(bind: &str, log_to: &str, inter: &str, ca: &Path, hosts: &[(String, String)]) -> String {
    let servers: String = hosts
        .iter()
        .enumerate()
        .map(|(i, (_, addr))| {
            format!(
                "    server n{} {addr}:8080 check port 7401 check-ssl verify required ca-file {}\n",
                i + 1,
                ca.display()
            )
        })
        .collect();
    format!(
        "global\n    maxconn 100\n    log {log_to} local0\ndefaults\n    mode http\n    log global\n    \
         timeout connect 500ms\n    timeout client 5s\n    timeout server 5s\n    timeout check 500ms\n\
         frontend f\n    bind {bind}\n    no log\n    default_backend web\n\
         backend web\n    option httpchk GET /v1/groups/web/health\n    http-check expect status 200\n    \
         default-server inter {inter} fall 1 rise 1 on-marked-down shutdown-sessions\n{servers}"
    )
}

/// HAProxy's log lines, stamped on arrival (its own time stamps are whole
/// seconds): when it marked the lost server down and the new one up.
#[derive(Clone, Default)]
struct LbLog(std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>);

impl LbLog {
    /// Receives HAProxy's syslog datagrams on `sock` in a thread of its own
    /// (it lives as long as the process).
    fn listen(sock: std::net::UdpSocket) -> LbLog {
        let log = LbLog::default();
        let lines = log.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok(n) = sock.recv(&mut buf) {
                let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                lines.lock().unwrap().push((Instant::now(), line));
            }
        });
        log
    }

    /// When the first line after `start` that `what` accepts arrived, as time since `start`.
    fn first(&self, start: Instant, what: impl Fn(&str) -> bool) -> Option<Duration> {
        self.0.lock().unwrap().iter().find(|(t, l)| *t >= start && what(l)).map(|(t, _)| *t - start)
    }
}

/// One HAProxy round: the client's outage, and when HAProxy's log said the
/// lost server went down and another came up (time since the power loss).
struct LbRound {
    took: Duration,
    down: Option<Duration>,
    up: Option<Duration>,
    /// The client's failed polls after HAProxy marked the new server up.
    after_up: String,
}

struct TandemResult {
    vip: Vec<Duration>,
    lb: Vec<LbRound>,
}

/// The fence command of the fenced cluster: "powers off" the node named by
/// its argument by killing its agent's session (its services and watchdog
/// too), then confirms. Each agent's session id is in `sid.<node>`.
fn fence_script(dir: &Path) -> PathBuf {
    let path = dir.join("fence.sh");
    let d = dir.display();
    std::fs::write(&path, format!("#!/bin/sh\npkill -9 -s \"$(cat {d}/sid.$1)\"\nexit 0\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// The fast profile of docs/config.md (its `[fencing]` section last, for a
/// fence command to be added to it).
const FAST_PROFILE: &str = "[raft]\nheartbeat_interval_ms = 50\nelection_timeout_min_ms = 250\n\
election_timeout_max_ms = 350\n[liveness]\nheartbeat_interval_ms = 50\nnode_timeout_ms = 250\n\
[fencing]\nlease_ms = 300\nmargin_ms = 250\n";

fn tandem_runs(runs: usize, dir: &Path, with_lb: bool, fence: bool, fast: bool) -> TandemResult {
    let profile = if fast { FAST_PROFILE } else { "[fencing]\n" };
    let fencing = match fence {
        true => format!("{profile}fence_command = [\"{}\"]\n", fence_script(dir).display()),
        false => profile.to_string(),
    };
    let mut net = Net::new();
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        hosts.push(net.host(i));
    }
    let (client, client_addr) = net.host(9);
    let vip = format!("{}.100", net.prefix);
    let vip_url = format!("http://{vip}:8080/");
    let lb_url = format!("http://{client_addr}/");
    let cfg = |i: usize| {
        let (_, addr) = &hosts[i];
        let path = dir.join(format!("n{}.toml", i + 1));
        std::fs::write(
            &path,
            format!(
                "name = \"n{}\"\ndata_dir = \"{}\"\naddresses = [\"{addr}\"]\n{fencing}",
                i + 1,
                dir.join(format!("n{}", i + 1)).display()
            ),
        )
        .unwrap();
        path
    };
    let start_agent = |i: usize| {
        let path = cfg(i);
        let p = spawn_in(
            &hosts[i].0,
            tandem_bin().to_str().unwrap(),
            &["agent", "--config", path.to_str().unwrap()],
            &dir.join(format!("n{}.log", i + 1)),
        );
        // For the fence command: the session to kill.
        std::fs::write(dir.join(format!("sid.n{}", i + 1)), p.0.id().to_string()).unwrap();
        p
    };
    let url = |i: usize| format!("https://{}:7401", hosts[i].1);
    let mut agents: Vec<Option<Proc>> = (0..3).map(|i| Some(start_agent(i))).collect();
    let data_dirs: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("n{}", i + 1))).collect();
    form(dir, &data_dirs, &(0..3).map(url).collect::<Vec<_>>());
    let server = "echo \"hello from $TANDEM_NODE\" > index.html; exec python3 -m http.server 8080 --bind 0.0.0.0";
    let group = json!({
        "resources": [
            {"name": "ip", "type": "vip", "address": format!("{vip}/24"), "interface": "eth0"},
            {"name": "http", "type": "process", "command": ["sh", "-c", server]},
        ],
        "nodes": ["n1", "n2", "n3"],
    });
    wait("cluster formed", Duration::from_secs(30), || {
        http_get(&format!("{}/v1/cluster", url(0))).is_some_and(|c| {
            c["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|x| x["state"] == "online" && x["role"] == "voter").count() == 3)
        })
    });
    http_send("PUT", &format!("{}/v1/groups/web", url(0)), &group).expect("group");
    wait("service at the VIP", Duration::from_secs(30), || ask(&client, &vip).contains("hello from"));

    // HAProxy in the client's namespace (it reaches the three hosts over
    // the bridge); its log goes to the bench on the bridge's address.
    let mut lb_log = LbLog::default();
    let lb_proc = match (with_lb, haproxy_bin()) {
        (true, Some(bin)) => {
            let sock = std::net::UdpSocket::bind(format!("{}.254:0", net.prefix)).expect("bind the log socket");
            let log_to = sock.local_addr().expect("log socket address").to_string();
            lb_log = LbLog::listen(sock);
            let inter = std::env::var("FAILOVER_BENCH_HAPROXY_INTER").unwrap_or_else(|_| "200ms".into());
            let conf = haproxy_cfg(&format!("{client_addr}:80"), &log_to, &inter, &dir.join("ca.pem"), &hosts);
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, &conf).unwrap();
            eprintln!("HAProxy configuration:\n{conf}");
            let p = spawn_in(&client, bin, &["-db", "-f", path.to_str().unwrap()], &dir.join("haproxy.log"));
            wait("service through HAProxy", Duration::from_secs(30), || {
                ask_url(&client, &lb_url).contains("hello from")
            });
            Some(p)
        }
        (true, None) => {
            eprintln!("haproxy is not installed (apt-get install haproxy): measuring the VIP only");
            None
        }
        (false, _) => None,
    };
    let modes: &[&str] = if lb_proc.is_some() { &["vip", "haproxy"] } else { &["vip"] };

    let mut out = TandemResult { vip: Vec::new(), lb: Vec::new() };
    for round in 0..runs * modes.len() {
        // Alternate the modes, so that a change of load falls on both, in
        // the order A B B A: the group moves n1 -> n2 -> n1, so a plain
        // A B would always take n1 from one mode and n2 from the other.
        let k = round % (2 * modes.len());
        let mode = modes[if k < modes.len() { k } else { 2 * modes.len() - 1 - k }];
        let target = if mode == "vip" { &vip_url } else { &lb_url };
        // Both paths lead to the same node before the power loss (HAProxy
        // has seen the restarted node answer 503 by now).
        let mut holder = String::new();
        wait("VIP and HAProxy agree", Duration::from_secs(30), || {
            holder = server_of(&ask_url(&client, &vip_url));
            holder.starts_with('n') && (mode == "vip" || server_of(&ask_url(&client, &lb_url)) == holder)
        });
        let i: usize = holder.trim_start_matches('n').parse::<usize>().unwrap() - 1;
        let leader = http_get(&format!("{}/v1/cluster", url(i))).is_some_and(|c| c["leader"] == holder.as_str());
        let start = Instant::now();
        let killed_at = std::time::SystemTime::now();
        agents[i] = None; // SIGKILL: the agent, its watchdog and its services
        net.set_link(i as u8 + 1, false);
        let (took, trace) = wait_new_server_traced(&client, target, &holder, start);
        let run = round / modes.len();
        eprintln!(
            "tandem {mode} run {run}: {holder}{} lost at {:?} (unix), service back after {took:?}",
            if leader { " (the Raft leader)" } else { "" },
            killed_at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
        );
        if mode == "vip" {
            out.vip.push(took);
        } else {
            // Let a late log line arrive (the client may see the new server
            // a hair before the bench reads the datagram).
            std::thread::sleep(Duration::from_millis(50));
            let down = lb_log.first(start, |l| l.contains(&format!("web/{holder} is DOWN")));
            let up = lb_log.first(start, |l| l.contains(" is UP") && !l.contains(&format!("web/{holder} ")));
            let after_up: String = trace.iter().filter(|(t, _)| up.is_some_and(|u| *t >= u)).map(|(_, c)| *c).collect();
            let polls: String = trace.iter().map(|(_, c)| *c).collect();
            eprintln!("  HAProxy: {holder} marked down after {down:?}, the new server up after {up:?}; polls {polls}");
            out.lb.push(LbRound { took, down, up, after_up });
        }
        net.set_link(i as u8 + 1, true);
        agents[i] = Some(start_agent(i));
        let other = url((i + 1) % 3);
        wait("node back online", Duration::from_secs(30), || {
            http_get(&format!("{other}/v1/nodes/{holder}")).is_some_and(|n| n["state"] == "online")
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(agents);
    out
}

fn keepalived_runs(runs: usize, dir: &Path, advert_int: &str) -> Vec<Duration> {
    let mut net = Net::new();
    let hosts: Vec<(String, String)> = (1..=2u8).map(|i| net.host(i)).collect();
    let (client, _) = net.host(9);
    let vip = format!("{}.200", net.prefix);
    let conf = |i: usize| {
        let path = dir.join(format!("k{}.conf", i + 1));
        let prio = if i == 0 { 150 } else { 100 };
        std::fs::write(
            &path,
            format!(
                "global_defs {{\n  router_id k{n}\n  enable_script_security\n{version}}}\nvrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n  advert_int {advert_int}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n",
                n = i + 1,
                // VRRPv2 advertises in whole seconds (0.1 is read as 1 s):
                // sub-second intervals need VRRPv3.
                version = if advert_int.starts_with("0.") { "  vrrp_version 3\n" } else { "" },
            ),
        )
        .unwrap();
        path
    };
    let start_k = |i: usize| {
        let path = conf(i);
        let pid = dir.join(format!("k{}.pid", i + 1));
        let vpid = dir.join(format!("k{}-vrrp.pid", i + 1));
        // A killed instance's pid files name processes that may linger as
        // zombies here (nobody reaps them): keepalived would then refuse
        // to start ("daemon is already running").
        let _ = std::fs::remove_file(&pid);
        let _ = std::fs::remove_file(&vpid);
        spawn_in(
            &hosts[i].0,
            "keepalived",
            &[
                "-n",
                "-l",
                "-D",
                "-f",
                path.to_str().unwrap(),
                "-p",
                pid.to_str().unwrap(),
                "-r",
                vpid.to_str().unwrap(),
            ],
            &dir.join(format!("k{}.log", i + 1)),
        )
    };
    let mut servers = Vec::new();
    for (i, (ns, _)) in hosts.iter().enumerate() {
        let d = dir.join(format!("www{}", i + 1));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("index.html"), format!("hello from k{}\n", i + 1)).unwrap();
        servers.push(spawn_in(
            ns,
            "python3",
            &["-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", d.to_str().unwrap()],
            &dir.join(format!("www{}.log", i + 1)),
        ));
    }
    let mut ks: Vec<Option<Proc>> = (0..2).map(|i| Some(start_k(i))).collect();
    wait("keepalived master", Duration::from_secs(30), || ask(&client, &vip).contains("hello from k1"));
    let mut out = Vec::new();
    for run in 0..runs {
        let holder = server_of(&ask(&client, &vip));
        let i: usize = holder.trim_start_matches('k').parse::<usize>().unwrap() - 1;
        let start = Instant::now();
        // Power loss: keepalived and the web server die, the link goes dark.
        if let Some(k) = ks[i].take() {
            let _ = Command::new("pkill").args(["-9", "-P", &k.0.id().to_string()]).status();
            drop(k);
        }
        net.set_link(i as u8 + 1, false);
        let took = wait_new_server(&client, &format!("http://{vip}:8080/"), &holder, start);
        eprintln!("keepalived run {run}: {holder} lost, service back after {took:?}");
        out.push(took);
        // Back up: the dead host's address is gone after a real power loss.
        in_ns(&hosts[i].0, &["ip", "addr", "flush", "dev", "eth0", "to", &format!("{vip}/32")]);
        net.set_link(i as u8 + 1, true);
        ks[i] = Some(start_k(i));
        std::thread::sleep(Duration::from_secs(4));
    }
    drop(ks);
    drop(servers);
    out
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

/// Idle CPU of 3 agents on loopback that run 10 groups between them.
/// Per agent: (name, CPU % of the agent, CPU % of its watchdog), over 20 s.
fn idle_with_groups(dir: &Path) -> Vec<(String, f64, f64)> {
    let ports: Vec<u16> = (0..3).map(|_| tandem_testkit::free_port()).collect();
    let agents: Vec<Proc> = (0..3)
        .map(|i| {
            let path = dir.join(format!("idle{i}.toml"));
            std::fs::write(
                &path,
                format!(
                    "name = \"i{i}\"\ndata_dir = \"{}\"\nport = {}\n",
                    dir.join(format!("idle{i}")).display(),
                    ports[i]
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join(format!("idle{i}.log"))).unwrap();
            let mut cmd = Command::new(tandem_bin());
            tandem_testkit::new_session(&mut cmd);
            Proc(
                cmd.args(["agent", "--config", path.to_str().unwrap()])
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let url = |i: usize| format!("https://127.0.0.1:{}", ports[i]);
    let data_dirs: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("idle{i}"))).collect();
    form(dir, &data_dirs, &(0..3).map(url).collect::<Vec<_>>());
    for g in 0..10 {
        // One node each, so that every agent runs groups (and a watchdog).
        let nodes = [format!("i{}", g % 3)];
        let body =
            json!({"resources": [{"name": "p", "type": "process", "command": ["sleep", "100000"]}], "nodes": nodes});
        wait("group accepted", Duration::from_secs(20), || {
            http_send("PUT", &format!("{}/v1/groups/g{g}", url(0)), &body).is_some_and(|v| v["name"] == format!("g{g}"))
        });
    }
    wait("10 groups running", Duration::from_secs(30), || {
        http_get(&format!("{}/v1/groups", url(0)))
            .and_then(|v| v.as_array().map(|a| a.iter().filter(|g| g["state"] == "running").count()))
            == Some(10)
    });
    std::thread::sleep(Duration::from_secs(3));
    // The agent and its watchdog process (the resources, `sleep`, cost nothing).
    let watchdog = |a: &Proc| {
        tandem_testkit::session_members(a.0.id() as i32).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|x| x == b"watchdog"))
        })
    };
    let wd_ticks = |a: &Proc| watchdog(a).map(|w| cpu_ticks(w as u32)).unwrap_or(0);
    assert!(agents.iter().all(|a| watchdog(a).is_some()), "every agent that runs groups has a watchdog");
    let before: Vec<(u64, u64)> = agents.iter().map(|a| (cpu_ticks(a.0.id()), wd_ticks(a))).collect();
    std::thread::sleep(Duration::from_secs(20));
    let pct = |ticks: u64| ticks as f64 / 100.0 / 20.0 * 100.0;
    agents
        .iter()
        .zip(before)
        .enumerate()
        .map(|(i, (a, (ab, wb)))| (format!("i{i}"), pct(cpu_ticks(a.0.id()) - ab), pct(wd_ticks(a) - wb)))
        .collect()
}

fn main() {
    if !is_root() {
        eprintln!("failover_bench needs root (network namespaces)");
        std::process::exit(2);
    }
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().to_path_buf();
    // FAILOVER_BENCH_KEEP=1 keeps the agents' logs for a look afterwards.
    let _cleanup = if std::env::var_os("FAILOVER_BENCH_KEEP").is_some() {
        eprintln!("logs and data kept in {}", tmp.keep().display());
        None
    } else {
        Some(tmp)
    };
    let dir = path.as_path();
    // FAILOVER_BENCH_KEEPALIVED_ONLY=<advert_int>: keepalived alone.
    if let Ok(advert) = std::env::var("FAILOVER_BENCH_KEEPALIVED_ONLY") {
        let k = keepalived_runs(runs, dir, &advert);
        println!("{}", stats(&format!("keepalived (advert_int {advert})"), k));
        return;
    }
    if runs > 0 {
        // FAILOVER_BENCH_HAPROXY=0 measures the VIP alone, as before HAProxy.
        let with_lb = std::env::var("FAILOVER_BENCH_HAPROXY").map_or(true, |v| v != "0");
        let t = tandem_runs(runs, dir, with_lb, false, false);
        // FAILOVER_BENCH_FENCE=1: the same with a fence command that confirms.
        let fenced = match std::env::var("FAILOVER_BENCH_FENCE").is_ok_and(|v| v == "1") {
            true => {
                let d = dir.join("fenced");
                std::fs::create_dir_all(&d).unwrap();
                Some(tandem_runs(runs, &d, false, true, false).vip)
            }
            false => None,
        };
        // FAILOVER_BENCH_FAST=1: the fast profile, alone and with a fence
        // command, and keepalived at its fastest usual setting.
        let fast = match std::env::var("FAILOVER_BENCH_FAST").is_ok_and(|v| v == "1") {
            true => {
                let (d, e, k) = (dir.join("fast"), dir.join("fast-fenced"), dir.join("k-fast"));
                for d in [&d, &e, &k] {
                    std::fs::create_dir_all(d).unwrap();
                }
                let alone = tandem_runs(runs, &d, false, false, true).vip;
                let fenced = tandem_runs(runs, &e, false, true, true).vip;
                Some((alone, fenced, keepalived_runs(runs, &k, "0.1")))
            }
            false => None,
        };
        let k = keepalived_runs(runs, dir, "1");
        let inter = std::env::var("FAILOVER_BENCH_HAPROXY_INTER").unwrap_or_else(|_| "200ms".into());
        println!("Client outage after power loss of the serving node ({runs} runs each, ms):\n");
        println!("| peer | runs | min | p50 | p99 | max |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        println!("{}", stats("tandem (3 nodes, defaults), through the VIP", t.vip.clone()));
        if let Some(f) = &fenced {
            println!("{}", stats("tandem, a fence command that confirms, through the VIP", f.clone()));
        }
        let lb: Vec<Duration> = t.lb.iter().map(|r| r.took).collect();
        if !lb.is_empty() {
            println!(
                "{}",
                stats(&format!("tandem, through HAProxy (checks every {inter}, fall 1, rise 1)"), lb.clone())
            );
        }
        println!("{}", stats("keepalived 2.2.7 (advert_int 1)", k.clone()));
        if let Some((alone, fenced, k_fast)) = &fast {
            println!("{}", stats("tandem, fast profile, through the VIP", alone.clone()));
            println!(
                "{}",
                stats("tandem, fast profile + a fence command that confirms, through the VIP", fenced.clone())
            );
            println!("{}", stats("keepalived 2.2.7 (advert_int 0.1)", k_fast.clone()));
        }
        let med = |mut d: Vec<Duration>| {
            d.sort();
            d[d.len() / 2].as_secs_f64()
        };
        println!("\nratio of medians tandem (VIP) / keepalived: {:.2}", med(t.vip.clone()) / med(k));
        if let Some(f) = fenced {
            println!("ratio of medians tandem fenced / tandem default (VIP): {:.2}", med(f) / med(t.vip.clone()));
        }
        if let Some((alone, fenced, k_fast)) = fast {
            println!(
                "ratio of medians to keepalived advert_int 0.1: fast profile {:.2}, fast profile fenced {:.2}",
                med(alone) / med(k_fast.clone()),
                med(fenced) / med(k_fast)
            );
        }
        if !lb.is_empty() {
            let max = |d: &[Duration]| d.iter().max().copied().unwrap_or_default().as_secs_f64();
            println!(
                "ratio HAProxy / VIP: medians {:.2}, maxima {:.2}",
                med(lb.clone()) / med(t.vip.clone()),
                max(&lb) / max(&t.vip)
            );
            // What HAProxy's log says, per round (ms after the power loss).
            let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0));
            println!(
                "\nHAProxy rounds (ms after the power loss): old server marked down / new server marked up / \
                 client answered (failed polls sent after the new server was up: . no answer in 0.1 s, x refused or \
                 reset, 5 HAProxy's 503)"
            );
            for r in &t.lb {
                println!("- {} / {} / {} ({})", ms(r.down), ms(r.up), ms(Some(r.took)), r.after_up);
            }
            let downs: Vec<Duration> = t.lb.iter().filter_map(|r| r.down).collect();
            let ups: Vec<Duration> = t.lb.iter().filter_map(|r| r.up).collect();
            if !downs.is_empty() && !ups.is_empty() {
                println!(
                    "medians: marked down {:.0}, new server up {:.0}, client answered {:.0}",
                    med(downs) * 1000.0,
                    med(ups) * 1000.0,
                    med(lb) * 1000.0
                );
            }
        }
    }
    println!("\nIdle CPU of agents running 10 groups (20 s; agent and its watchdog process):\n");
    for (n, agent, watchdog) in idle_with_groups(dir) {
        println!("- {n}: agent {agent:.2} % + watchdog {watchdog:.2} % of one core");
    }
}
