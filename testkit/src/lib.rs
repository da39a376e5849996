//! Helpers shared by the integration tests and the benchmarks, which start
//! real agents on loopback or in network namespaces. Nothing in the agent
//! uses this crate: it is a dev-dependency of `tandem` and a dependency of
//! `tandem-chaos` only.

pub mod api;
pub mod bank;
pub mod bench;
pub mod postgres;
pub mod sites;

/// A port free for both TCP (API) and UDP (heartbeats) on 127.0.0.1, with
/// the next port free too (an agent's volume replication listens there),
/// taken below the kernel's ephemeral range (32768+) so that no outgoing
/// connection of another agent can grab it before the agent binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20000 + 2 * (h.finish() % 6000) as u16;
        // Never hand out the same port twice in one process.
        static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        if !GIVEN.lock().unwrap().insert(port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port");
}

// ---- a node's processes, as one power switch ----
//
// A test agent starts as the leader of a new session; its watchdog and its
// resources stay in that session (they only take their own process groups),
// so killing the session is the node losing power.

/// Makes a child the leader of a new session (call before spawning it).
pub fn new_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The processes of session `sid` (/proc/<pid>/stat field 6).
pub fn session_members(sid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|s| {
                let rest = s.rfind(')').map(|i| &s[i + 2..]).unwrap_or("");
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.first() != Some(&"Z") && f.get(3).and_then(|x| x.parse::<i32>().ok()) == Some(sid)
            })
        })
        .collect()
}

/// Every process whose parent chain leads to one of `roots` (processes that
/// left the session with setsid, as PostgreSQL's backends do, are still
/// children of the session's processes).
fn descendants_of(roots: &[i32]) -> Vec<i32> {
    let mut children: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
    for pid in std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
    {
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
            let rest = s.rfind(')').map(|i| s[i + 2..].to_string())?;
            rest.split_whitespace().nth(1)?.parse::<i32>().ok()
        });
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = roots.to_vec();
    while let Some(p) = todo.pop() {
        for c in children.remove(&p).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// SIGKILLs every process of session `sid`, and every descendant of them
/// (found before anything dies), at once, until none is left: the host
/// losing power.
pub fn kill_session(sid: i32) {
    for _ in 0..100 {
        let mut members = session_members(sid);
        if members.is_empty() {
            return;
        }
        members.extend(descendants_of(&members));
        sigkill_all(&members);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// SIGKILLs `pids`, the FUSE servers among them (nbdfuse) first, once they
/// are gone the rest. The last process of a mount namespace unmounts what
/// is mounted in it as it exits: if that is nbdfuse, with an ext4 on its
/// FUSE file holding unwritten data, it waits for itself forever (a zombie
/// in `sync_filesystem`), and every later `mount -o loop` on the machine
/// hangs on its loop device. A real power loss has no such ending.
fn sigkill_all(pids: &[i32]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let is_fuse_server =
        |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "nbdfuse");
    let (fuse, rest): (Vec<i32>, Vec<i32>) = pids.iter().partition(|p| is_fuse_server(**p));
    for pid in &fuse {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    // Gone, or a zombie: its /dev/fuse is closed and its connection aborted.
    let exited = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rfind(')')
                .and_then(|i| s[i + 2..].split_whitespace().next().map(|st| st == "Z" || st == "X"))
                .unwrap_or(true)
        })
    };
    for _ in 0..100 {
        if fuse.iter().all(|p| exited(*p)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for pid in rest {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The processes in network namespace `ns` (a name under /var/run/netns):
/// everything a host in that namespace runs, also what left the session
/// of the agent that started it (PostgreSQL's backends call setsid).
pub fn netns_members(ns: &str) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(format!("/var/run/netns/{ns}")) else { return Vec::new() };
    let want = format!("net:[{}]", meta.ino());
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.to_string_lossy() == want.as_str())
        })
        .collect()
}

/// SIGKILLs every process in network namespace `ns` at once, until none
/// is left: with `kill_session`, a host's power loss.
pub fn kill_netns(ns: &str) {
    for _ in 0..100 {
        let members = netns_members(ns);
        if members.is_empty() {
            return;
        }
        sigkill_all(&members);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

// ---- several hosts on one machine ----
//
// One network namespace per host, joined by a bridge in the root namespace
// (which gets an address too, so the test itself reaches every host). Needs
// root; removed on drop.

use std::process::Command;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs a command in a namespace; its stdout, or None when it failed.
pub fn in_ns_output(ns: &str, args: &[&str]) -> Option<String> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    let out = Command::new("ip").args(&full).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn in_ns(ns: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    let out = Command::new("ip").args(&full).output().expect("run ip netns exec");
    assert!(out.status.success(), "{}: {}", full.join(" "), String::from_utf8_lossy(&out.stderr));
}

pub struct Net {
    /// Short unique tag for this test process: names stay under 15 chars.
    tag: String,
    /// First three octets of this net's /24.
    pub prefix: String,
    /// First three octets of the second network's /24 (see `second_path`).
    pub prefix2: String,
    hosts: Vec<String>,
    /// Whether the second network's bridge exists.
    second: bool,
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

impl Net {
    pub fn new() -> Net {
        // Unique per process and per net in it (namespaces die a little
        // after their owner drops them).
        static NETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let pid = std::process::id();
        let tag = format!("t{}{n}", pid % 100_000);
        let prefix = format!("10.{}.{}", 100 + (pid / 256 + n * 11) % 100, pid % 256);
        let prefix2 = format!("172.{}.{}", 16 + (pid / 256 + n * 11) % 16, pid % 256);
        let _ = Command::new("ip").args(["link", "del", &format!("{tag}br")]).output();
        ip(&["link", "add", &format!("{tag}br"), "type", "bridge"]);
        ip(&["addr", "add", &format!("{prefix}.254/24"), "dev", &format!("{tag}br")]);
        ip(&["link", "set", &format!("{tag}br"), "up"]);
        Net { tag, prefix, prefix2, hosts: Vec::new(), second: false }
    }

    /// A host `i` (1..250): its namespace name and address.
    pub fn host(&mut self, i: u8) -> (String, String) {
        let ns = format!("{}h{i}", self.tag);
        let (outer, inner) = (format!("{}v{i}", self.tag), format!("{}e{i}", self.tag));
        let addr = format!("{}.{i}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["link", "set", &outer, "master", &format!("{}br", self.tag)]);
        ip(&["link", "set", &outer, "up"]);
        // Every host calls its NIC eth0, as real servers of one model do.
        in_ns(&ns, &["ip", "link", "set", &inner, "name", "eth0"]);
        in_ns(&ns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"]);
        in_ns(&ns, &["ip", "link", "set", "lo", "up"]);
        self.hosts.push(ns.clone());
        (ns, addr)
    }

    /// Gives host `i` a second NIC, eth1, on a second network (its own
    /// bridge): a second heartbeat path. Returns its address there.
    pub fn second_path(&mut self, i: u8) -> String {
        let br = format!("{}b2", self.tag);
        if !self.second {
            let _ = Command::new("ip").args(["link", "del", &br]).output();
            ip(&["link", "add", &br, "type", "bridge"]);
            ip(&["addr", "add", &format!("{}.254/24", self.prefix2), "dev", &br]);
            ip(&["link", "set", &br, "up"]);
            self.second = true;
        }
        let ns = format!("{}h{i}", self.tag);
        let (outer, inner) = (format!("{}w{i}", self.tag), format!("{}f{i}", self.tag));
        let addr = format!("{}.{i}", self.prefix2);
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["link", "set", &outer, "master", &br]);
        ip(&["link", "set", &outer, "up"]);
        in_ns(&ns, &["ip", "link", "set", &inner, "name", "eth1"]);
        in_ns(&ns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth1"]);
        in_ns(&ns, &["ip", "link", "set", "eth1", "up"]);
        addr
    }

    /// Cuts host `i`'s second NIC off its network, or reconnects it.
    pub fn set_second_link(&self, i: u8, up: bool) {
        ip(&["link", "set", &format!("{}w{i}", self.tag), if up { "up" } else { "down" }]);
    }

    /// Cuts host `i` off the network, or reconnects it.
    pub fn set_link(&self, i: u8, up: bool) {
        ip(&["link", "set", &format!("{}v{i}", self.tag), if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}br", self.tag)]).output();
        if self.second {
            let _ = Command::new("ip").args(["link", "del", &format!("{}b2", self.tag)]).output();
        }
    }
}
