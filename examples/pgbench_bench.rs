//! PostgreSQL benchmark (issue 12), side by side in one run: `pgbench`
//! (scale 20, 8 clients) against PostgreSQL on (a) the host's local disk,
//! (b) a tandem volume with no replica, (c) one with a sync secondary,
//! (d) one with an async secondary — a real 3-node cluster running the
//! group of `tandem_testkit::postgres` (volume → filesystem → postgres →
//! vip) — and (e) PostgreSQL's own synchronous streaming replication. Then
//! fio through the mounted file system against fio through the NBD export
//! of the same volume, and the client-seen failover of PostgreSQL after a
//! power loss of the primary's node (kill → first committed transaction on
//! the new primary, crash recovery included).
//!
//! Hosts are network namespaces on one bridge; clients run in their own
//! namespace and reach the database through the VIP (tandem) or the
//! server's address (a, e). Every data directory and volume lives under
//! one temporary directory in /var/tmp (one disk). Needs root, Debian's
//! postgresql 15 (pgbench, pg_basebackup), fio, libnbd-bin (nbdfuse),
//! iproute2, util-linux (setpriv, nsenter, losetup) and curl.
//!
//!     cargo build --release --example pgbench_bench --bin tandem
//!     target/release/examples/pgbench_bench [SECONDS] [FAILOVER_ROUNDS] [FIO_SECONDS]
//!
//! Defaults 60, 10, 10. `PGBENCH_BENCH_ONLY=local,noreplica,sync,async,
//! streaming,fio,failover` runs a subset; `PGBENCH_BENCH_KEEP=1` keeps the
//! directory (logs, data). Everything started is stopped on exit, on a
//! panic and on Ctrl-C / SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tandem_testkit::{is_root, kill_session, new_session, session_members, Net};

const PG_BIN: &str = tandem_testkit::postgres::BIN;
const SCALE: u32 = 20;
const CLIENTS: u32 = 8;
const VOLUME_SIZE: &str = "3GiB";

// ---- everything started, stopped on exit, panic or signal ----

/// Sessions this run started (agents, PostgreSQL servers, clients): a
/// session is one "machine" or one client, killed as a whole.
static SESSIONS: Mutex<Vec<Session>> = Mutex::new(Vec::new());
/// Every pid seen in a session we killed (their leaked SysV segments are ours).
static KILLED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static NET: Mutex<Option<Net>> = Mutex::new(None);
static ROOT: Mutex<Option<(PathBuf, bool)>> = Mutex::new(None);
static STOPPING: AtomicBool = AtomicBool::new(false);

#[derive(Clone)]
struct Session {
    sid: i32,
    /// PostgreSQL's postmaster: asked to stop (fast shutdown) before the
    /// session is killed, so that it removes its shared memory.
    postmaster: bool,
    /// An agent's own mount namespace (`ip netns exec` makes one): every
    /// process in it belongs to that node.
    mount_ns: Option<String>,
}

fn kill_tracked(sid: i32) {
    KILLED.lock().unwrap().extend(session_members(sid));
    kill_session(sid);
}

fn mount_ns_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().map(|l| l.to_string_lossy().into_owned())
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s.get(i + 2..i + 3)).map(|st| st == "Z"))
        .unwrap_or(true)
}

/// A node's processes: its agent's session, and whatever else lives in
/// its mount namespace — PostgreSQL's children each start a session of
/// their own (`setsid` in every backend), so the session alone is not the
/// machine.
fn node_members(sid: i32, mount_ns: Option<&str>) -> Vec<i32> {
    let mut pids: BTreeSet<i32> = session_members(sid).into_iter().collect();
    if let (Some(ns), Ok(dir)) = (mount_ns, std::fs::read_dir("/proc")) {
        let me = std::process::id() as i32;
        for pid in dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())) {
            if pid != me && mount_ns_of(pid).as_deref() == Some(ns) && !is_zombie(pid) {
                pids.insert(pid);
            }
        }
    }
    pids.into_iter().collect()
}

/// The FUSE connections (fusectl ids) of the FUSE mounts a process sees
/// under our directory: the node's nbdfuse files.
fn fuse_connections(pid: i32, root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let fstype = f.get(sep + 1)?;
            let (major, minor) = f.get(2)?.split_once(':')?;
            (fstype.starts_with("fuse") && major == "0" && Path::new(f.get(4)?).starts_with(root))
                .then(|| minor.to_string())
        })
        .collect()
}

/// Cuts a node's FUSE connections (what fusectl's `abort` does): every
/// request fails at once, as if the device were gone. Done before the
/// kill: a killed nbdfuse that is the last process of its mount namespace
/// tears down the ext4 mount on its way out, whose writeback then waits
/// for nbdfuse itself — a kernel deadlock that hangs every later
/// `mount -o loop` on the machine (it checks every loop device's file).
fn abort_fuse(conns: &BTreeSet<String>) {
    let ctl = Path::new("/sys/fs/fuse/connections");
    for c in conns {
        let _ = std::fs::write(ctl.join(c).join("abort"), "1");
    }
}

/// A node's FUSE connections (fusectl mounted if it is not).
fn node_fuse(pids: &[i32]) -> BTreeSet<String> {
    let Some(root) = ROOT.lock().unwrap().as_ref().map(|r| r.0.clone()) else { return BTreeSet::new() };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(ctl).map(|mut d| d.next().is_none()).unwrap_or(true) {
        let _ = Command::new("mount").args(["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"]).output();
    }
    pids.iter().flat_map(|p| fuse_connections(*p, &root)).collect()
}

/// Power loss of a node: its FUSE connections cut, then SIGKILL to all its
/// processes at once, until none is left. Everything is looked up first,
/// so that the loss itself takes a millisecond; returns when it happened.
fn power_off(sid: i32, mount_ns: Option<&str>) -> Instant {
    let pids = node_members(sid, mount_ns);
    let conns = node_fuse(&pids);
    let at = Instant::now();
    abort_fuse(&conns);
    KILLED.lock().unwrap().extend(pids.iter().copied());
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    for _ in 0..200 {
        let pids = node_members(sid, mount_ns);
        if pids.is_empty() {
            break;
        }
        KILLED.lock().unwrap().extend(pids.iter().copied());
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    at
}

/// Orphans of a killed node are re-parented to us (a subreaper) and reaped
/// at once. This machine's init reaps orphans about 2 s late, and a dead
/// postmaster left as a zombie that long makes the next node's PostgreSQL
/// see its `postmaster.pid` as a running server, which a real power loss
/// would not do. Our own children (same session as us, or a registered
/// session leader) are left to whoever waits for them.
fn start_reaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let our_sid = nix::unistd::getsid(None).map(|p| p.as_raw()).unwrap_or(0);
    std::thread::spawn(move || loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with WNOWAIT only reports a child's state.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc != 0 {
            std::thread::sleep(Duration::from_millis(50)); // no children now
            continue;
        }
        // SAFETY: waitid filled a CLD_* siginfo, which carries si_pid.
        let first = unsafe { info.si_pid() };
        let ours = |pid: i32| {
            let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                s.rfind(')').and_then(|i| s[i + 2..].split_whitespace().nth(3).and_then(|x| x.parse::<i32>().ok()))
            });
            sid == Some(our_sid) || SESSIONS.lock().unwrap().iter().any(|x| x.sid == pid)
        };
        if !ours(first) {
            // SAFETY: reaping a zombie child that nobody else waits for.
            unsafe { libc::waitpid(first, std::ptr::null_mut(), libc::WNOHANG) };
            continue;
        }
        // The first zombie is someone's to wait for: look for orphans
        // behind it, then give the owner a moment.
        let me = std::process::id() as i32;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for pid in dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())) {
                let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
                let Some(i) = st.rfind(')') else { continue };
                let f: Vec<&str> = st[i + 2..].split_whitespace().collect();
                if f.first() == Some(&"Z") && f.get(1) == Some(&me.to_string().as_str()) && !ours(pid) {
                    // SAFETY: as above.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    });
}

fn stop_postmaster(sid: i32) {
    let pid = nix::unistd::Pid::from_raw(sid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !session_members(sid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_tracked(sid);
}

/// Stops everything this run started; safe to call more than once.
fn cleanup() {
    STOPPING.store(true, Ordering::SeqCst);
    let sessions = std::mem::take(&mut *SESSIONS.lock().unwrap());
    for s in sessions.iter().filter(|s| s.postmaster) {
        stop_postmaster(s.sid);
    }
    for s in &sessions {
        power_off(s.sid, s.mount_ns.as_deref());
    }
    let root = ROOT.lock().unwrap().take();
    if let Some((root, _)) = &root {
        // A FUSE daemon that left its session would keep a dead node's
        // mount alive: find ours by their command line (our unique dir).
        for pid in pids_mentioning(root) {
            KILLED.lock().unwrap().insert(pid);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
        detach_loops(root);
    }
    remove_leaked_shm();
    drop(NET.lock().unwrap().take());
    if let Some((root, keep)) = root {
        if keep {
            eprintln!("kept {}", root.display());
        } else if let Err(e) = std::fs::remove_dir_all(&root) {
            eprintln!("could not remove {}: {e}", root.display());
        }
    }
}

fn pids_mentioning(root: &Path) -> Vec<i32> {
    let needle = root.as_os_str().as_encoded_bytes().to_vec();
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
        })
        .collect()
}

/// Loop devices whose backing file lies under our directory (a power-lost
/// node's, if its mount namespace did not take them along).
fn detach_loops(root: &Path) {
    let Ok(out) = Command::new("losetup").args(["--list", "--json", "--output", "NAME,BACK-FILE"]).output() else {
        return;
    };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    for dev in v["loopdevices"].as_array().into_iter().flatten() {
        let back = dev["back-file"].as_str().unwrap_or("");
        if back.starts_with(root.to_str().unwrap_or("\0")) {
            if let Some(name) = dev["name"].as_str() {
                let _ = Command::new("losetup").args(["-d", name]).status();
            }
        }
    }
}

/// SysV segments that PostgreSQL servers we killed left behind (nobody
/// attached, created by one of our pids).
fn remove_leaked_shm() {
    let killed = KILLED.lock().unwrap().clone();
    let text = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(cpid), Some(nattch)) = (
            f.get(1).and_then(|x| x.parse::<i32>().ok()),
            f.get(4).and_then(|x| x.parse::<i32>().ok()),
            f.get(6).and_then(|x| x.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if nattch == 0 && killed.contains(&cpid) {
            // SAFETY: IPC_RMID on a segment id with a null buffer is valid.
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
}

/// Ctrl-C, SIGTERM and SIGHUP: blocked in every thread (the children get
/// a clean mask from std), taken by one thread that cleans up and exits.
fn install_stop_handler() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().expect("block signals");
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\npgbench_bench: {sig:?}: stopping everything it started");
            cleanup();
            std::process::exit(130);
        }
    });
}

struct CleanupOnDrop;

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        cleanup();
    }
}

/// A process started as the leader of its own session: dropping it is a
/// power loss of everything it started.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(args: &[&str], log: &Path, postmaster: bool) -> Proc {
        // Appended: a restarted node keeps the log of its earlier lives.
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let mut cmd = Command::new(args[0]);
        new_session(&mut cmd);
        cmd.args(&args[1..]).stdin(Stdio::null()).stdout(out.try_clone().expect("log")).stderr(out);
        // Spawned under the registry's lock: a signal's cleanup either sees
        // the session or runs before it exists.
        let mut sessions = SESSIONS.lock().unwrap();
        assert!(!STOPPING.load(Ordering::SeqCst), "stopping");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
        sessions.push(Session { sid: child.id() as i32, postmaster, mount_ns: None });
        Proc { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Marks this process a node: its mount namespace, once it has its
    /// own, names the rest of the node's processes.
    fn node_mount_ns(&self) {
        let ours = mount_ns_of(std::process::id() as i32);
        let theirs = mount_ns_of(self.pid());
        if theirs.is_some() && theirs != ours {
            if let Some(s) = SESSIONS.lock().unwrap().iter_mut().find(|s| s.sid == self.pid()) {
                s.mount_ns = theirs;
            }
        }
    }

    /// Waits for the leader to exit; the rest of its session dies with it.
    fn wait(mut self) -> bool {
        self.child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let sid = self.pid();
        let entry = {
            let mut s = SESSIONS.lock().unwrap();
            let i = s.iter().position(|x| x.sid == sid);
            i.map(|i| s.remove(i))
        };
        match entry {
            Some(Session { postmaster: true, .. }) => stop_postmaster(sid),
            Some(Session { mount_ns: Some(ns), .. }) => {
                power_off(sid, Some(&ns));
            }
            _ => kill_tracked(sid),
        }
        let _ = self.child.wait();
    }
}

fn tandem_bin() -> std::path::PathBuf {
    tandem_testkit::bench::sibling_tandem_bin()
}

fn with_net<T>(f: impl FnOnce(&mut Net) -> T) -> T {
    f(NET.lock().unwrap().as_mut().expect("net"))
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_postgres<'a>(cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--reset-env"];
    v.extend_from_slice(cmd);
    v
}

fn in_ns<'a>(ns: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(cmd);
    v
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One SQL statement through psql from the client namespace; its output.
fn psql(client: &str, host: &str, sql: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", client, "psql", "-h", host, "-U", "postgres", "-d", "postgres", "-Atqc", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---- machine usage during a measurement ----

#[derive(Default)]
struct Snap {
    at: Option<Instant>,
    busy: u64,
    iowait: u64,
    /// pid → (class, ticks)
    procs: BTreeMap<i32, (&'static str, u64)>,
    disk: [u64; 3],
}

#[derive(Default, Clone)]
struct Usage {
    /// % of one core (the machine has two: 200 is all of it)
    busy: f64,
    iowait: f64,
    by_class: BTreeMap<&'static str, f64>,
    writes_s: f64,
    mib_s: f64,
    flushes_s: f64,
}

fn class_of(comm: &str) -> &'static str {
    match comm {
        "tandem" => "tandem",
        "nbdfuse" => "nbdfuse",
        "postgres" => "postgres",
        "pgbench" => "pgbench",
        "fio" => "fio",
        _ => "ours, other",
    }
}

/// The device /var/tmp is on, as (major, minor).
fn data_disk() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/var/tmp").map(|m| m.dev()).unwrap_or(0);
    (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff))
}

fn snap() -> Snap {
    let mut s = Snap { at: Some(Instant::now()), ..Snap::default() };
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    if let Some(cpu) = stat.lines().next() {
        let f: Vec<u64> = cpu.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
        if f.len() == 8 {
            s.busy = f.iter().sum::<u64>() - f[3] - f[4];
            s.iowait = f[4];
        }
    }
    let ours: BTreeSet<i32> = SESSIONS.lock().unwrap().iter().map(|x| x.sid).collect();
    // pid → (parent, session, comm, ticks). PostgreSQL's children start
    // their own sessions: a process is ours when it or an ancestor is in
    // one of our sessions.
    let mut all: BTreeMap<i32, (i32, i32, String, u64)> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for pid in dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())) {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else { continue };
            let f: Vec<&str> = text[close + 2..].split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            all.insert(pid, (num(1) as i32, num(3) as i32, text[open + 1..close].to_string(), num(11) + num(12)));
        }
    }
    for (pid, (ppid, _, comm, ticks)) in &all {
        if *pid == 2 || *ppid == 2 {
            // Kernel threads: the loop device's and the file systems'
            // workers, writeback, whoever they work for.
            s.procs.insert(*pid, ("kernel", *ticks));
            continue;
        }
        let mut p = *pid;
        let mut mine = false;
        for _ in 0..64 {
            let Some((parent, sid, _, _)) = all.get(&p) else { break };
            if ours.contains(sid) {
                mine = true;
                break;
            }
            p = *parent;
        }
        s.procs.insert(*pid, (if mine { class_of(comm) } else { "rest" }, *ticks));
    }
    let (major, minor) = data_disk();
    let disks = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
    for line in disks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        if num(0) == major && num(1) == minor {
            s.disk = [num(7), num(9), num(18)];
        }
    }
    s
}

/// Snapshots 1 s into a run of `secs` and 1 s before its end: the
/// processes measured (pgbench's server backends, fio) are alive for both.
fn sample_during(secs: u64) -> (Snap, Snap) {
    let margin = Duration::from_secs(if secs >= 4 { 1 } else { 0 });
    std::thread::sleep(margin);
    let a = snap();
    std::thread::sleep(Duration::from_secs(secs).saturating_sub(2 * margin));
    (a, snap())
}

fn usage(a: &Snap, b: &Snap) -> Usage {
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => (y - x).as_secs_f64().max(1e-3),
        _ => return Usage::default(),
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let pct = |ticks: u64| ticks as f64 / hz / secs * 100.0;
    let mut by_class: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut ours = 0;
    for (pid, (class, t1)) in &b.procs {
        let t0 = a.procs.get(pid).map(|x| x.1).unwrap_or(0);
        let d = t1.saturating_sub(t0);
        if *class != "rest" && *class != "kernel" {
            *by_class.entry(class).or_default() += pct(d);
            ours += d;
        }
    }
    let busy = b.busy.saturating_sub(a.busy);
    let kernel: u64 = b
        .procs
        .iter()
        .filter(|(_, (class, _))| *class == "kernel")
        .map(|(pid, (_, t1))| t1.saturating_sub(a.procs.get(pid).map(|x| x.1).unwrap_or(0)))
        .sum();
    by_class.insert("kernel threads", pct(kernel));
    // Everything else: other users of the machine, and interrupts.
    by_class.insert("rest", pct(busy.saturating_sub(ours + kernel)));
    Usage {
        busy: pct(busy),
        iowait: pct(b.iowait.saturating_sub(a.iowait)),
        by_class,
        writes_s: b.disk[0].saturating_sub(a.disk[0]) as f64 / secs,
        mib_s: b.disk[1].saturating_sub(a.disk[1]) as f64 * 512.0 / (1 << 20) as f64 / secs,
        flushes_s: b.disk[2].saturating_sub(a.disk[2]) as f64 / secs,
    }
}

fn usage_text(u: &Usage) -> String {
    let classes: Vec<String> =
        u.by_class.iter().filter(|(_, v)| **v >= 0.5).map(|(k, v)| format!("{k} {v:.0}")).collect();
    format!(
        "CPU {:.0} % of one core ({}); iowait {:.0} %; disk {:.0} writes/s, {:.1} MiB/s, {:.0} flushes/s",
        u.busy,
        classes.join(", "),
        u.iowait,
        u.writes_s,
        u.mib_s,
        u.flushes_s
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- pgbench ----

#[derive(Default, Clone)]
struct PgRun {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    txns: usize,
    usage: Usage,
    load_before: String,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `pgbench -i -s 20`, then a checkpoint, so that every run starts alike.
fn pgbench_init(dir: &Path, client: &str, host: &str) {
    let scale = SCALE.to_string();
    let log = dir.join(format!("pgbench-init-{host}.log"));
    let p = Proc::spawn(
        &in_ns(client, &["pgbench", "-i", "-q", "-s", &scale, "-h", host, "-U", "postgres", "postgres"]),
        &log,
        false,
    );
    assert!(p.wait(), "pgbench -i failed: {}", std::fs::read_to_string(&log).unwrap_or_default());
    psql(client, host, "CHECKPOINT").expect("checkpoint");
    let _ = Command::new("sync").status();
}

fn pgbench(dir: &Path, client: &str, host: &str, secs: u64, tag: &str) -> PgRun {
    let logs = dir.join(format!("pgbench-{tag}"));
    std::fs::create_dir_all(&logs).expect("log dir");
    let prefix = logs.join("tx");
    let out = logs.join("out.txt");
    let (c, t) = (CLIENTS.to_string(), secs.to_string());
    let load_before = loadavg();
    let p = Proc::spawn(
        &in_ns(
            client,
            &[
                "pgbench",
                "-h",
                host,
                "-U",
                "postgres",
                "-c",
                &c,
                "-j",
                "2",
                "-T",
                &t,
                "-l",
                "--log-prefix",
                prefix.to_str().expect("utf-8 path"),
                "postgres",
            ],
        ),
        &out,
        false,
    );
    let (a, b) = sample_during(secs);
    let ok = p.wait();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(ok, "pgbench failed on {tag}: {text}");
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|x| x.parse().ok())
        .unwrap_or(f64::NAN);
    // Per-transaction log: client, transaction, latency µs, script, epoch s, µs.
    let mut lat: Vec<f64> = Vec::new();
    for f in std::fs::read_dir(&logs).expect("logs").flatten() {
        if !f.file_name().to_string_lossy().starts_with("tx.") {
            continue;
        }
        let body = std::fs::read_to_string(f.path()).unwrap_or_default();
        lat.extend(body.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()).map(|us| us / 1000.0));
    }
    lat.sort_by(f64::total_cmp);
    PgRun {
        tps,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        txns: lat.len(),
        usage: usage(&a, &b),
        load_before,
    }
}

fn report_run(name: &str, r: &PgRun) {
    eprintln!(
        "{name}: {:.0} TPS, p50 {:.2} ms, p99 {:.2} ms ({} transactions; load before {})\n    {}",
        r.tps,
        r.p50_ms,
        r.p99_ms,
        r.txns,
        r.load_before,
        usage_text(&r.usage)
    );
}

// ---- PostgreSQL by itself: (a) local disk, (e) streaming replication ----

fn initdb(dir: &Path, data: &Path) {
    std::fs::create_dir_all(data.parent().expect("parent")).expect("mkdir");
    run(&["chown", "postgres:postgres", data.parent().expect("parent").to_str().expect("utf-8")]);
    let d = data.to_str().expect("utf-8");
    let log = dir.join("initdb.log");
    let p = Proc::spawn(
        &as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            d,
            "--auth=trust",
            "--username=postgres",
            "--no-instructions",
        ]),
        &log,
        false,
    );
    assert!(p.wait(), "initdb: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let mut hba = std::fs::OpenOptions::new().append(true).open(data.join("pg_hba.conf")).expect("pg_hba");
    writeln!(hba, "host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust").expect("pg_hba");
}

/// The postmaster in host namespace `ns`, with the same settings as the
/// tandem group's (the defaults, listening everywhere).
fn start_postgres(ns: &str, data: &Path, log: &Path) -> Proc {
    let d = data.to_str().expect("utf-8");
    let port = tandem_testkit::postgres::PORT.to_string();
    // Not in the data directory: pg_basebackup would copy its lock file.
    let sockets = format!("unix_socket_directories={}", data.parent().expect("parent").display());
    Proc::spawn(
        &in_ns(
            ns,
            &as_postgres(&[
                &format!("{PG_BIN}/postgres"),
                "-D",
                d,
                "-p",
                &port,
                "-c",
                "listen_addresses=*",
                "-c",
                &sockets,
            ]),
        ),
        log,
        true,
    )
}

fn wait_sql(client: &str, host: &str, limit: Duration) {
    wait_for(&format!("PostgreSQL at {host}"), limit, || psql(client, host, "SELECT 1").as_deref() == Some("1"));
}

fn local_disk(dir: &Path, client: &str, ns: &str, addr: &str, secs: u64) -> PgRun {
    let data = dir.join("local").join("data");
    initdb(dir, &data);
    let pg = start_postgres(ns, &data, &dir.join("local.log"));
    wait_sql(client, addr, Duration::from_secs(30));
    pgbench_init(dir, client, addr);
    let r = pgbench(dir, client, addr, secs, "local");
    drop(pg);
    let _ = std::fs::remove_dir_all(dir.join("local"));
    r
}

fn streaming(dir: &Path, client: &str, primary: (&str, &str), standby_ns: &str, secs: u64) -> PgRun {
    let (pns, paddr) = primary;
    let pdata = dir.join("stream-primary").join("data");
    let sdata = dir.join("stream-standby").join("data");
    initdb(dir, &pdata);
    let p = start_postgres(pns, &pdata, &dir.join("stream-primary.log"));
    wait_sql(client, paddr, Duration::from_secs(30));
    std::fs::create_dir_all(sdata.parent().expect("parent")).expect("mkdir");
    run(&["chown", "postgres:postgres", sdata.parent().expect("parent").to_str().expect("utf-8")]);
    let log = dir.join("basebackup.log");
    let b = Proc::spawn(
        &in_ns(
            standby_ns,
            &as_postgres(&[
                &format!("{PG_BIN}/pg_basebackup"),
                "-h",
                paddr,
                "-U",
                "postgres",
                "-D",
                sdata.to_str().expect("utf-8"),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
            ]),
        ),
        &log,
        false,
    );
    assert!(b.wait(), "pg_basebackup: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let s = start_postgres(standby_ns, &sdata, &dir.join("stream-standby.log"));
    psql(client, paddr, "ALTER SYSTEM SET synchronous_standby_names = '*'").expect("alter system");
    psql(client, paddr, "SELECT pg_reload_conf()").expect("reload");
    wait_for("a synchronous standby", Duration::from_secs(60), || {
        psql(client, paddr, "SELECT sync_state FROM pg_stat_replication").as_deref() == Some("sync")
    });
    assert_eq!(psql(client, paddr, "SHOW synchronous_commit").as_deref(), Some("on"));
    pgbench_init(dir, client, paddr);
    let r = pgbench(dir, client, paddr, secs, "streaming");
    let state = psql(client, paddr, "SELECT sync_state FROM pg_stat_replication").unwrap_or_default();
    assert_eq!(state, "sync", "the standby stayed synchronous through the run");
    drop(p);
    drop(s);
    let _ = std::fs::remove_dir_all(dir.join("stream-primary"));
    let _ = std::fs::remove_dir_all(dir.join("stream-standby"));
    r
}

// ---- a tandem cluster in network namespaces ----

/// The formed cluster's CA and admin token, for curl.
static CREDS: std::sync::Mutex<Option<tandem_testkit::api::CurlCreds>> = std::sync::Mutex::new(None);

fn http(method: &str, url: &str, body: Option<&Value>) -> Option<Value> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "70", "-X", method, url]);
    cmd.args(CREDS.lock().unwrap().as_ref().map(|c| c.args()).unwrap_or_default());
    if let Some(b) = body {
        cmd.args(["-d", &b.to_string()]);
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None; // nothing answered
    }
    if out.stdout.is_empty() {
        return Some(Value::Null);
    }
    serde_json::from_slice(&out.stdout).ok()
}

struct Cluster {
    dir: PathBuf,
    hosts: Vec<(String, String)>,
    agents: Vec<Option<Proc>>,
}

impl Cluster {
    fn start(dir: &Path, hosts: Vec<(String, String)>) -> Cluster {
        let mut c = Cluster { dir: dir.to_path_buf(), agents: Vec::new(), hosts };
        for i in 0..c.hosts.len() {
            let a = c.start_agent(i);
            c.agents.push(Some(a));
        }
        let sockets: Vec<PathBuf> = (0..c.hosts.len()).map(|i| c.data_dir(i).join("admin.sock")).collect();
        for s in &sockets {
            wait_for("agent up", Duration::from_secs(30), || {
                Command::new("curl")
                    .args(["-sf", "--max-time", "1", "--unix-socket"])
                    .arg(s)
                    .arg("http://localhost/healthz")
                    .status()
                    .is_ok_and(|st| st.success())
            });
        }
        let urls: Vec<String> = (0..c.hosts.len()).map(|i| c.url(i)).collect();
        let creds = tandem_testkit::api::cli_form(&tandem_bin(), &sockets, &urls, &c.dir.join("ca.pem")).expect("form");
        *CREDS.lock().unwrap() = Some(creds);
        wait_for("cluster formed", Duration::from_secs(60), || {
            http("GET", &format!("{}/v1/cluster", c.url(0)), None).is_some_and(|v| {
                v["members"].as_array().is_some_and(|m| {
                    m.iter().filter(|x| x["state"] == "online" && x["role"] == "voter").count() == c.hosts.len()
                })
            })
        });
        c
    }

    fn name(i: usize) -> String {
        format!("n{}", i + 1)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(Self::name(i))
    }

    /// Power loss of node `i` (see `power_off`); when it happened.
    fn power_off(&mut self, i: usize) -> Instant {
        let agent = self.agents[i].take().expect("a running agent");
        let ns = SESSIONS.lock().unwrap().iter().find(|s| s.sid == agent.pid()).and_then(|s| s.mount_ns.clone());
        let at = power_off(agent.pid(), ns.as_deref());
        drop(agent);
        at
    }

    /// Starts node `i`'s agent and waits until it answers.
    fn start_agent(&self, i: usize) -> Proc {
        let a = self.spawn_agent(i);
        wait_for("agent up", Duration::from_secs(30), || {
            http("GET", &format!("{}/v1/local", self.url(i)), None).is_some()
        });
        a.node_mount_ns();
        a
    }

    fn spawn_agent(&self, i: usize) -> Proc {
        let (ns, addr) = &self.hosts[i];
        let path = self.dir.join(format!("{}.toml", Self::name(i)));
        std::fs::write(
            &path,
            format!(
                "name = \"{}\"\ndata_dir = \"{}\"\naddresses = [\"{addr}\"]\n",
                Self::name(i),
                self.data_dir(i).display()
            ),
        )
        .expect("config");
        let bin = tandem_bin();
        Proc::spawn(
            &in_ns(ns, &[bin.to_str().expect("utf-8"), "agent", "--config", path.to_str().expect("utf-8")]),
            &self.dir.join(format!("{}.log", Self::name(i))),
            false,
        )
    }

    fn url(&self, i: usize) -> String {
        format!("https://{}:7401", self.hosts[i].1)
    }

    /// A node that is up, to ask.
    fn any_url(&self) -> String {
        let i = self.agents.iter().position(Option::is_some).expect("a live agent");
        self.url(i)
    }

    fn index_of(node: &str) -> usize {
        node.trim_start_matches('n').parse::<usize>().expect("node name") - 1
    }

    fn group(&self, name: &str) -> Value {
        http("GET", &format!("{}/v1/groups/{name}", self.any_url()), None).unwrap_or(Value::Null)
    }

    fn volume(&self, name: &str) -> Value {
        http("GET", &format!("{}/v1/volumes/{name}", self.any_url()), None).unwrap_or(Value::Null)
    }

    fn put_group(&self, name: &str, def: &Value) {
        let v = http("PUT", &format!("{}/v1/groups/{name}", self.any_url()), Some(def)).expect("PUT group");
        assert_eq!(v["name"], name, "group {name} refused: {v}");
    }

    fn delete_group(&self, name: &str, volume: &str, replicas: usize) {
        // Retried: a leader change during the stop fails the call.
        wait_for("group deleted", Duration::from_secs(300), || {
            let _ = http("DELETE", &format!("{}/v1/groups/{name}", self.any_url()), None);
            self.group(name)["name"] != name
        });
        // A removed volume's files stay on its replicas: ours go.
        for i in 0..replicas {
            let d = self.data_dir(i).join("volumes");
            for f in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().starts_with(&format!("{volume}.")) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    fn wait_running(&self, name: &str, limit: Duration) {
        let mut last = Value::Null;
        let start = Instant::now();
        while start.elapsed() < limit {
            last = self.group(name);
            if last["state"] == "running" {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("group {name} not running after {limit:?}: {last}");
    }

    /// The volume has a primary and every other replica is connected with
    /// nothing out of sync.
    fn wait_in_sync(&self, volume: &str, limit: Duration) {
        let mut last = Value::Null;
        let start = Instant::now();
        while start.elapsed() < limit {
            last = self.volume(volume);
            let ok = !last["primary"].is_null()
                && last["replicas"].as_array().is_some_and(|rs| {
                    rs.iter().all(|r| {
                        r["role"] == "primary"
                            || (r["connection"] == "Connected"
                                && r["disk"] == "UpToDate"
                                && r["out_of_sync_bytes"].as_u64() == Some(0))
                    })
                });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("volume {volume} not in sync after {limit:?}: {last}");
    }

    fn primary(&self, volume: &str) -> Option<String> {
        self.volume(volume)["primary"].as_str().map(str::to_string)
    }
}

/// The PostgreSQL group of issue 12 for one configuration: the volume and
/// mountpoint named after `tag` (volumes are named cluster-wide).
fn pg_group(nodes: &[&str], vip: &str, mnt: &Path, mode: &str, replicas: usize, tag: &str) -> Value {
    let mut g = tandem_testkit::postgres::group_definition(
        nodes,
        &format!("{vip}/24"),
        "eth0",
        mnt.to_str().expect("utf-8"),
        VOLUME_SIZE,
        mode,
    );
    g["resources"][0]["name"] = json!(format!("data_{tag}"));
    g["resources"][0]["replicas"] = json!(replicas);
    g["resources"][1]["volume"] = json!(format!("data_{tag}"));
    g
}

fn tandem_pg(c: &Cluster, client: &str, vip: &str, mode: &str, replicas: usize, tag: &str, secs: u64) -> PgRun {
    let mnt = c.dir.join("mnt").join(tag);
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let group = format!("pg_{tag}");
    c.put_group(&group, &pg_group(&["n1", "n2", "n3"], vip, &mnt, mode, replicas, tag));
    c.wait_running(&group, Duration::from_secs(180));
    c.wait_in_sync(&format!("data_{tag}"), Duration::from_secs(120));
    wait_sql(client, vip, Duration::from_secs(60));
    pgbench_init(&c.dir, client, vip);
    c.wait_in_sync(&format!("data_{tag}"), Duration::from_secs(120));
    let r = pgbench(&c.dir, client, vip, secs, tag);
    c.delete_group(&group, &format!("data_{tag}"), replicas);
    r
}

// ---- fio: through the mounted file system vs the NBD export ----

#[derive(Clone, Copy)]
struct FioJob {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// Flush after every write (fdatasync through the file system, NBD
    /// FLUSH through the export): a database's commit.
    sync_each: bool,
}

const FIO_JOBS: [FioJob; 3] = [
    FioJob { name: "rand write 4 KiB QD1 + flush each", rw: "randwrite", bs: "4k", depth: 1, sync_each: true },
    FioJob { name: "seq write 1 MiB QD8", rw: "write", bs: "1M", depth: 8, sync_each: false },
    FioJob { name: "rand write 4 KiB QD32", rw: "randwrite", bs: "4k", depth: 32, sync_each: false },
];

#[derive(Default, Clone)]
struct FioResult {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    sync_p50_us: f64,
    sync_p99_us: f64,
    usage: Usage,
}

enum FioTarget<'a> {
    /// A file through a mounted file system, optionally inside a process's
    /// mount namespace (a node's).
    File { path: &'a Path, mount_ns_of: Option<i32> },
    /// The NBD export, on the range [offset, offset + 1 GiB).
    Nbd { uri: &'a str, offset: &'a str },
}

fn fio(target: &FioTarget, job: FioJob, secs: u64) -> FioResult {
    let _ = Command::new("sync").status();
    let mut args: Vec<String> = Vec::new();
    match target {
        FioTarget::File { path, mount_ns_of } => {
            if let Some(pid) = mount_ns_of {
                args.extend(["nsenter".into(), "--target".into(), pid.to_string(), "--mount".into()]);
            }
            args.push("fio".into());
            args.push(format!("--filename={}", path.display()));
            if job.sync_each {
                args.extend(["--ioengine=psync".into(), "--fdatasync=1".into()]);
            } else {
                args.extend(["--ioengine=libaio".into(), "--direct=1".into()]);
            }
        }
        FioTarget::Nbd { uri, offset } => {
            args.extend(["fio".into(), "--ioengine=nbd".into(), format!("--uri={uri}"), format!("--offset={offset}")]);
            if job.sync_each {
                args.push("--fsync=1".into());
            }
        }
    }
    args.extend([
        "--name=bench".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.depth),
        "--size=1G".into(),
        format!("--runtime={secs}"),
        "--time_based".into(),
        "--ramp_time=1".into(),
        "--end_fsync=1".into(),
        "--output-format=json".into(),
    ]);
    let log = std::env::temp_dir().join(format!("pgbench-bench-fio-{}.json", std::process::id()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::spawn(&argv, &log, false);
    let (a, b) = sample_during(secs + 1);
    let ok = p.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let start = text.find('{').unwrap_or(0);
    let v: Value = serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio output ({ok}): {e}: {text}"));
    let j = &v["jobs"][0]["write"];
    let pct = |x: &Value, p: &str| x["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let sync = &v["jobs"][0]["sync"]["lat_ns"];
    FioResult {
        iops: j["iops"].as_f64().unwrap_or(0.0),
        mib_s: j["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        p50_us: pct(&j["clat_ns"], "50.000000"),
        p99_us: pct(&j["clat_ns"], "99.000000"),
        sync_p50_us: if job.sync_each { pct(sync, "50.000000") } else { f64::NAN },
        sync_p99_us: if job.sync_each { pct(sync, "99.000000") } else { f64::NAN },
        usage: usage(&a, &b),
    }
}

type FioRows = Vec<(&'static str, Vec<(String, FioResult)>)>;

/// One sync volume: first its NBD export alone (fio on [1 GiB, 2 GiB), so
/// that the start stays zero), then the same group with a `filesystem` on
/// it (mkfs), fio on a 1 GiB file in the mount, inside the node's mount
/// namespace; and a file on the host's disk as the floor.
fn fio_bench(c: &Cluster, secs: u64) -> FioRows {
    let mut rows: FioRows = FIO_JOBS.iter().map(|j| (j.name, Vec::new())).collect();
    let local = c.dir.join("fio-local.dat");
    for (k, job) in FIO_JOBS.iter().enumerate() {
        let r = fio(&FioTarget::File { path: &local, mount_ns_of: None }, *job, secs);
        eprintln!("fio {:<36} host disk (ext4 file)          {:>7.0} IOPS  {}", job.name, r.iops, usage_text(&r.usage));
        rows[k].1.push(("host disk, ext4 file".into(), r));
    }
    let _ = std::fs::remove_file(&local);

    let nodes = ["n1", "n2", "n3"];
    let vol = json!({"name": "data_fio", "type": "volume", "size": VOLUME_SIZE, "mode": "sync", "replicas": 2});
    c.put_group("fio", &json!({"resources": [vol.clone()], "nodes": nodes}));
    c.wait_running("fio", Duration::from_secs(120));
    c.wait_in_sync("data_fio", Duration::from_secs(120));
    let uri = c.volume("data_fio")["nbd"].as_str().expect("nbd uri").to_string();
    for (k, job) in FIO_JOBS.iter().enumerate() {
        let r = fio(&FioTarget::Nbd { uri: &uri, offset: "1G" }, *job, secs);
        eprintln!("fio {:<36} tandem NBD export (sync)      {:>7.0} IOPS  {}", job.name, r.iops, usage_text(&r.usage));
        rows[k].1.push(("tandem, NBD export (sync secondary)".into(), r));
    }

    let mnt = c.dir.join("mnt").join("fio");
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let fs = json!({"name": "fs", "type": "filesystem", "volume": "data_fio", "mountpoint": mnt, "fstype": "ext4",
                    "options": "noatime", "mkfs": true, "start_timeout_ms": 60000});
    c.put_group("fio", &json!({"resources": [vol, fs], "nodes": nodes}));
    wait_for("file system mounted", Duration::from_secs(120), || {
        let g = c.group("fio");
        g["state"] == "running"
            && g["resources"].as_array().is_some_and(|r| r.iter().any(|x| x["name"] == "fs" && x["state"] == "running"))
    });
    let node = c.primary("data_fio").expect("primary");
    let pid = c.agents[Cluster::index_of(&node)].as_ref().expect("agent").pid();
    let file = mnt.join("fio.dat");
    for (k, job) in FIO_JOBS.iter().enumerate() {
        let r = fio(&FioTarget::File { path: &file, mount_ns_of: Some(pid) }, *job, secs);
        eprintln!("fio {:<36} tandem ext4 mount (sync)      {:>7.0} IOPS  {}", job.name, r.iops, usage_text(&r.usage));
        rows[k].1.push(("tandem, ext4 on the volume (nbdfuse + loop)".into(), r));
    }
    c.delete_group("fio", "data_fio", 2);
    rows
}

// ---- failover as a client sees it ----

/// The least of the PostgreSQL frontend protocol (v3, trust auth, simple
/// query) a probe needs: connect, run a statement, know it committed.
struct PgConn {
    s: TcpStream,
}

impl PgConn {
    fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<PgConn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.set_write_timeout(Some(Duration::from_millis(500)))?;
        let mut body = 196608u32.to_be_bytes().to_vec(); // protocol 3.0
        for x in ["user", "postgres", "database", "postgres", ""] {
            body.extend_from_slice(x.as_bytes());
            body.push(0);
        }
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend(body);
        let mut c = PgConn { s };
        c.s.write_all(&msg)?;
        c.until_ready()?;
        Ok(c)
    }

    fn read_msg(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.s.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Reads up to ReadyForQuery; an ErrorResponse on the way is the
    /// result (during startup the server closes right after it).
    fn until_ready(&mut self) -> std::io::Result<()> {
        let mut err = None;
        loop {
            let (t, body) = match self.read_msg() {
                Ok(m) => m,
                Err(e) => return Err(err.unwrap_or(e)),
            };
            match t {
                b'Z' => return err.map_or(Ok(()), Err),
                b'E' => err = Some(std::io::Error::other(String::from_utf8_lossy(&body).replace('\0', " "))),
                b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                    return Err(std::io::Error::other("authentication other than trust"))
                }
                _ => {}
            }
        }
    }

    fn execute(&mut self, sql: &str) -> std::io::Result<()> {
        let mut msg = vec![b'Q'];
        msg.extend(((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.s.write_all(&msg)?;
        self.until_ready()
    }
}

/// A client in the client namespace that commits one row after another
/// (`INSERT` of a counter, autocommit) and records when each was
/// acknowledged, and what it sent.
struct Probe {
    stop: Arc<AtomicBool>,
    /// (id, sent, acknowledged)
    acks: Arc<Mutex<Vec<(u64, Instant, Instant)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn enter_netns(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns");
    // SAFETY: setns on a namespace file descriptor changes this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

impl Probe {
    fn start(client: &str, vip: &str, first_id: u64) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (s, a, ns) = (stop.clone(), acks.clone(), client.to_string());
        let addr: SocketAddr = format!("{vip}:{}", tandem_testkit::postgres::PORT).parse().expect("addr");
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let mut conn: Option<PgConn> = None;
            let mut id = first_id;
            while !s.load(Ordering::Relaxed) {
                if conn.is_none() {
                    // A VIP nobody holds does not answer: the connect
                    // timeout is the probe's resolution.
                    match PgConn::connect(addr, Duration::from_millis(100)) {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let sent = Instant::now();
                match c.execute(&format!("INSERT INTO probe VALUES ({id})")) {
                    Ok(()) => {
                        a.lock().unwrap().push((id, sent, Instant::now()));
                        id += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => {
                        conn = None;
                        id += 1; // its fate is unknown: never reuse the id
                    }
                }
            }
        });
        Probe { stop, acks, thread: Some(thread) }
    }

    fn first_ack_sent_after(&self, t: Instant) -> Option<Instant> {
        self.acks.lock().unwrap().iter().find(|x| x.1 >= t).map(|x| x.2)
    }

    fn finish(mut self) -> Vec<(u64, Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.acks.lock().unwrap())
    }
}

struct Round {
    took: Duration,
    /// From the postgres log of the new primary: kill → "starting
    /// PostgreSQL", → "ready to accept connections"; WAL replayed.
    to_start: Option<Duration>,
    recovery: Option<Duration>,
    redo_bytes: Option<u64>,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// "2026-12-06 01:02:03.456 UTC ..." → time since the epoch.
fn pg_log_time(line: &str) -> Option<Duration> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(2) != Some(&"UTC") {
        return None;
    }
    let d: Vec<i64> = f[0].split('-').filter_map(|x| x.parse().ok()).collect();
    let t: Vec<&str> = f[1].split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    let secs: f64 = t[2].parse().ok()?;
    let whole =
        days_from_civil(d[0], d[1], d[2]) * 86400 + t[0].parse::<i64>().ok()? * 3600 + t[1].parse::<i64>().ok()? * 60;
    Some(Duration::from_secs(whole as u64) + Duration::from_secs_f64(secs))
}

fn lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim_end_matches([',', ' ']).split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// What the new primary's PostgreSQL log says about its start after `killed`.
fn recovery_from_log(log: &Path, killed: SystemTime) -> (Option<Duration>, Option<Duration>, Option<u64>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let killed = killed.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| pg_log_time(l).is_some_and(|t| t >= killed)).collect();
    let at = |what: &str| lines.iter().find(|l| l.contains(what)).and_then(|l| pg_log_time(l));
    let started = at("starting PostgreSQL");
    let ready = at("database system is ready to accept connections");
    let word_after = |what: &str| {
        lines.iter().find_map(|l| l.split(what).nth(1).and_then(|rest| rest.split_whitespace().next()).and_then(lsn))
    };
    let redo = match (word_after("redo starts at "), word_after("redo done at ")) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    (started.map(|s| s.saturating_sub(killed)), ready.zip(started).map(|(r, s)| r.saturating_sub(s)), redo)
}

/// What runs against the database when its node loses power.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// The probe alone: one client committing a row every 10 ms.
    Light,
    /// The probe and pgbench (8 clients, as fast as they can) for 10 s.
    Busy,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Light => "one client committing a row every 10 ms",
            Load::Busy => "that client + pgbench, 8 clients, full speed for 10 s before the kill",
        }
    }
}

type Series = Vec<(Load, Vec<Round>)>;

/// Power loss of the primary's node while the probe commits (and, busy,
/// pgbench runs), `rounds` times per load; the node comes back and resyncs
/// in between. Also counts acknowledged commits missing afterwards.
fn failover(c: &mut Cluster, client: &str, vip: &str, rounds: usize) -> (Series, usize) {
    let tag = "f";
    let mnt = c.dir.join("mnt").join(tag);
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let group = "pg_f";
    let volume = "data_f";
    c.put_group(group, &pg_group(&["n1", "n2", "n3"], vip, &mnt, "sync", 2, tag));
    c.wait_running(group, Duration::from_secs(180));
    wait_sql(client, vip, Duration::from_secs(60));
    pgbench_init(&c.dir, client, vip);
    psql(client, vip, "CREATE TABLE probe (id bigint PRIMARY KEY)").expect("probe table");
    let mut series: Series = Vec::new();
    let mut acked: Vec<u64> = Vec::new();
    let mut lost = 0;
    for (round, load_kind) in (0..rounds).map(|_| Load::Light).chain((0..rounds).map(|_| Load::Busy)).enumerate() {
        c.wait_running(group, Duration::from_secs(180));
        c.wait_in_sync(volume, Duration::from_secs(300));
        wait_sql(client, vip, Duration::from_secs(60));
        let node = c.primary(volume).expect("primary");
        let i = Cluster::index_of(&node);
        let load = (load_kind == Load::Busy).then(|| {
            Proc::spawn(
                &in_ns(
                    client,
                    &["pgbench", "-h", vip, "-U", "postgres", "-c", "8", "-j", "2", "-T", "600", "postgres"],
                ),
                &c.dir.join(format!("failover-pgbench-{round}.log")),
                false,
            )
        });
        let probe = Probe::start(client, vip, (round as u64 + 1) * 1_000_000);
        std::thread::sleep(Duration::from_secs(if load_kind == Load::Busy { 10 } else { 5 }));
        let killed_at = SystemTime::now();
        // Power loss: the agent, its watchdog, PostgreSQL, nbdfuse, the mount.
        let start = c.power_off(i);
        with_net(|n| n.set_link(i as u8 + 1, false));
        let took = loop {
            if let Some(t) = probe.first_ack_sent_after(start) {
                break t - start;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no commit within 120 s of the power loss");
            std::thread::sleep(Duration::from_millis(10));
        };
        let acks = probe.finish();
        drop(load);
        let new = c.primary(volume).unwrap_or_default();
        let log = c.data_dir(Cluster::index_of(&new)).join("groups").join(group).join("db.log");
        let (to_start, recovery, redo_bytes) = recovery_from_log(&log, killed_at);
        eprintln!(
            "failover round {round}: {node} lost, first commit on {new} after {took:?} \
             (PostgreSQL started {to_start:?} after the kill, recovery {recovery:?}, redo {redo_bytes:?} bytes)"
        );
        acked.extend(acks.iter().map(|x| x.0));
        let r = Round { took, to_start, recovery, redo_bytes };
        if new == node {
            // Not a failover: never counted (the harness must make sure of it).
            eprintln!("round {round}: the first commit after the loss of {node} came from {node} itself: not counted");
        } else {
            match series.last_mut() {
                Some((k, v)) if *k == load_kind => v.push(r),
                _ => series.push((load_kind, vec![r])),
            }
        }
        with_net(|n| n.set_link(i as u8 + 1, true));
        c.agents[i] = Some(c.start_agent(i));
        // Every acknowledged commit must be there, on the new primary.
        let present: BTreeSet<u64> = psql(client, vip, "SELECT id FROM probe")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        let missing = acked.iter().filter(|id| !present.contains(id)).count();
        if missing > 0 {
            eprintln!("round {round}: {missing} acknowledged commits missing");
        }
        lost += missing;
        let other = c.url((i + 1) % c.hosts.len());
        wait_for("node back online", Duration::from_secs(60), || {
            http("GET", &format!("{other}/v1/nodes/{node}"), None).is_some_and(|n| n["state"] == "online")
        });
    }
    c.wait_in_sync(volume, Duration::from_secs(300));
    c.delete_group(group, volume, 2);
    (series, lost)
}

// ---- the run ----

fn main() {
    if !is_root() {
        eprintln!("pgbench_bench needs root (network namespaces, mounts, PostgreSQL as the postgres user)");
        std::process::exit(2);
    }
    for tool in ["pgbench", "fio", "nbdfuse", "setpriv", "nsenter", "curl"] {
        if !Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success()) {
            eprintln!("pgbench_bench needs {tool} (apt-get install postgresql fio libnbd-bin util-linux curl)");
            std::process::exit(2);
        }
    }
    install_stop_handler();
    start_reaper();
    let _cleanup = CleanupOnDrop;
    let arg = |i: usize, d: u64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (secs, rounds, fio_secs) = (arg(1, 60), arg(2, 10) as usize, arg(3, 10));
    let only: Vec<String> =
        std::env::var("PGBENCH_BENCH_ONLY").map(|s| s.split(',').map(str::to_string).collect()).unwrap_or_default();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);

    let tmp = tempfile::Builder::new().prefix("tandem-pgbench").tempdir_in("/var/tmp").expect("temp dir");
    let dir = tmp.keep();
    // PostgreSQL (the postgres user) must reach its directories below.
    run(&["chmod", "755", dir.to_str().expect("utf-8")]);
    *ROOT.lock().unwrap() = Some((dir.clone(), std::env::var_os("PGBENCH_BENCH_KEEP").is_some()));
    eprintln!(
        "pgbench_bench: {secs} s per pgbench run, {rounds} failover rounds, {fio_secs} s per fio job; in {}",
        dir.display()
    );

    *NET.lock().unwrap() = Some(Net::new());
    let hosts: Vec<(String, String)> = (1..=3u8).map(|i| with_net(|n| n.host(i))).collect();
    let (pg1, pg1_addr) = with_net(|n| n.host(4));
    let (pg2, _) = with_net(|n| n.host(5));
    let (client, _) = with_net(|n| n.host(9));
    let prefix = with_net(|n| n.prefix.clone());

    let mut results: Vec<(&str, PgRun)> = Vec::new();
    if wants("local") {
        let r = local_disk(&dir, &client, &pg1, &pg1_addr, secs);
        report_run("(a) local disk", &r);
        results.push(("(a) PostgreSQL on the host's disk", r));
    }
    let needs_cluster = ["noreplica", "sync", "async", "fio", "failover"].iter().any(|p| wants(p));
    let mut cluster = needs_cluster.then(|| Cluster::start(&dir, hosts.clone()));
    if let Some(c) = &cluster {
        for (part, label, mode, replicas, tag, last) in [
            ("noreplica", "(b) tandem volume, no replica", "sync", 1, "b", 101),
            ("sync", "(c) tandem volume, sync secondary", "sync", 2, "c", 102),
            ("async", "(d) tandem volume, async secondary", "async", 2, "d", 103),
        ] {
            if wants(part) {
                let r = tandem_pg(c, &client, &format!("{prefix}.{last}"), mode, replicas, tag, secs);
                report_run(label, &r);
                results.push((label, r));
            }
        }
    }
    if wants("streaming") {
        let r = streaming(&dir, &client, (&pg1, &pg1_addr), &pg2, secs);
        report_run("(e) streaming replication", &r);
        results.push(("(e) PostgreSQL synchronous streaming replication", r));
    }
    let fio_rows = match (&cluster, wants("fio")) {
        (Some(c), true) => fio_bench(c, fio_secs),
        _ => Vec::new(),
    };
    let fo = match (&mut cluster, wants("failover") && rounds > 0) {
        (Some(c), true) => Some(failover(c, &client, &format!("{prefix}.104"), rounds)),
        _ => None,
    };
    drop(cluster);

    // ---- the tables ----
    if !results.is_empty() {
        println!(
            "\n### pgbench, scale {SCALE}, {CLIENTS} clients, {secs} s (TPS; latency per transaction from pgbench -l)\n"
        );
        println!("| target | TPS | p50 ms | p99 ms | transactions | CPU % of one core (of 200) | postgres | tandem | nbdfuse | pgbench | kernel threads | rest | disk flushes/s | disk MiB/s | load before |");
        println!(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
    }
    for (name, r) in &results {
        let u = &r.usage;
        let c = |k: &str| u.by_class.get(k).copied().unwrap_or(0.0);
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} |",
            r.tps,
            r.p50_ms,
            r.p99_ms,
            r.txns,
            u.busy,
            c("postgres"),
            c("tandem"),
            c("nbdfuse"),
            c("pgbench"),
            c("kernel threads"),
            c("rest"),
            u.flushes_s,
            u.mib_s,
            r.load_before
        );
    }
    let tps = |p: &str| results.iter().find(|r| r.0.starts_with(p)).map(|r| r.1.tps);
    if let (Some(c), Some(e)) = (tps("(c)"), tps("(e)")) {
        println!("\n(c)/(e) = {:.2} (aim ≥ 0.8)", c / e);
    }
    if let (Some(c), Some(a)) = (tps("(c)"), tps("(a)")) {
        println!("(c)/(a) = {:.2} (aim ≥ 0.5)", c / a);
    }
    if let (Some(b), Some(a)) = (tps("(b)"), tps("(a)")) {
        println!("(b)/(a) = {:.2}", b / a);
    }
    if let (Some(d), Some(a)) = (tps("(d)"), tps("(a)")) {
        println!("(d)/(a) = {:.2}", d / a);
    }
    for (job, rows) in &fio_rows {
        println!("\n### fio: {job}, {fio_secs} s\n");
        println!("| path | IOPS | MiB/s | write p50 µs | write p99 µs | flush p50 µs | flush p99 µs | CPU % (of 200) | tandem | nbdfuse | fio | kernel threads | rest |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (name, r) in rows {
            let c = |k: &str| r.usage.by_class.get(k).copied().unwrap_or(0.0);
            let f = |x: f64| if x.is_nan() { "—".to_string() } else { format!("{x:.0}") };
            println!(
                "| {name} | {:.0} | {:.1} | {:.0} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r.iops,
                r.mib_s,
                r.p50_us,
                r.p99_us,
                f(r.sync_p50_us),
                f(r.sync_p99_us),
                r.usage.busy,
                c("tandem"),
                c("nbdfuse"),
                c("fio") + c("ours, other"),
                c("kernel threads"),
                c("rest")
            );
        }
    }
    if let Some((series, lost)) = fo {
        for (load, rounds) in series {
            let mut took: Vec<f64> = rounds.iter().map(|r| r.took.as_secs_f64() * 1000.0).collect();
            took.sort_by(f64::total_cmp);
            println!(
                "\n### Failover: power loss of the primary's node, {} ({} rounds, ms)\n",
                load.label(),
                took.len()
            );
            println!(
                "| round | kill → first commit | kill → PostgreSQL starts | PostgreSQL start → ready | WAL replayed |"
            );
            println!("| ---: | ---: | ---: | ---: | ---: |");
            let ms = |d: Option<Duration>| d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).unwrap_or("?".into());
            for (i, r) in rounds.iter().enumerate() {
                println!(
                    "| {i} | {:.0} | {} | {} | {} |",
                    r.took.as_secs_f64() * 1000.0,
                    ms(r.to_start),
                    ms(r.recovery),
                    r.redo_bytes.map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64)).unwrap_or("?".into())
                );
            }
            println!(
                "\nkill → first commit: min {:.0}, p50 {:.0}, p99 {:.0}, max {:.0} ms (aim p50 ≤ 2000)",
                took[0],
                percentile(&took, 0.5),
                percentile(&took, 0.99),
                took[took.len() - 1]
            );
        }
        println!("\nacknowledged probe commits missing after the failovers: {lost}");
    }
}
