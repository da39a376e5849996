//! The node's lease file and the record of what runs here, shared by the
//! agent and its watchdog process through files in `<data_dir>/run/`.
//!
//! The agent writes the deadline of its lease (CLOCK_BOOTTIME, so that it
//! means the same in every process and across suspend) while it hears a
//! majority, and one record per group it runs (resources, process ids).
//! A restarted agent adopts what the records say still runs, under the lease
//! it inherits; the watchdog (`crate::watchdog`) reads the same files.
//!
//! Neither side may ever extend a lease: only the agent writes a deadline,
//! and only from a majority heard. This module only reads and writes files
//! and starts the watchdog process; it decides nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_raft::group::GroupSpec;

/// A process's start time (clock ticks since boot, /proc/<pid>/stat field
/// 22): with the pid, it names one process even after pids wrap. None if
/// the process is gone or a zombie.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The descendants of `root` (children, their children...), from the
/// parent ids in /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    descendants_of(&[root])
}

/// The descendants of every one of `roots`, from one read of /proc.
fn descendants_of(roots: &[i32]) -> Vec<i32> {
    let mut children: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { continue };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|x| x.parse::<i32>().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = roots.to_vec();
    // Bounded: a pid cannot be its own ancestor, but /proc is read racily.
    while let Some(p) = todo.pop() {
        if out.len() > 100_000 {
            break;
        }
        for c in children.remove(&p).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// SIGKILLs process group `pgid` and every descendant of its leader, also
/// those that left the group (PostgreSQL's backends call setsid). They are
/// collected first: once their parent dies they are re-parented and can no
/// longer be told from anyone else's.
pub fn kill_tree(pgid: i32) {
    kill_trees(&[pgid]);
}

/// `kill_tree` for several process groups at once (a lapse), with one
/// read of /proc: the lease's kill must not wait on a scan per group.
pub fn kill_trees(pgids: &[i32]) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let tree = descendants_of(pgids);
    for pg in pgids {
        let _ = killpg(Pid::from_raw(*pg), Signal::SIGKILL);
    }
    for p in tree {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Whether the process `pid` that started at `start_time` still runs.
pub fn is_running(pid: i32, start_time: u64) -> bool {
    proc_start_time(pid) == Some(start_time)
}

/// What the record says about one resource of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunSlot {
    /// Not started.
    Idle,
    /// A supervised process, leader of its own process group.
    Process { pid: i32, start_time: u64 },
    /// A script agent or vip, started (or starting): its stop action undoes it.
    Script,
}

/// One group running on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub group: String,
    pub epoch: u64,
    pub node: String,
    pub spec: GroupSpec,
    /// One per resource of `spec`, in start order.
    pub resources: Vec<RunSlot>,
}

/// The lease as the agent last wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Held until this CLOCK_BOOTTIME millisecond.
    Until(u64),
    /// Given up by an agent that stopped everything and exited cleanly.
    Released,
    /// Never written.
    Missing,
}

impl Lease {
    pub fn valid_at(&self, now_ms: u64) -> bool {
        matches!(self, Lease::Until(d) if now_ms < *d)
    }
}

/// `<data_dir>/run`: the lease file, the group records, the watchdog's lock.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
    data_dir: PathBuf,
    /// The Linux watchdog device the watchdog process feeds, if any.
    device: Option<PathBuf>,
    /// The watchdog this agent started last: while it runs (it may not hold
    /// the lock yet), no other is started.
    spawned: std::sync::Arc<std::sync::Mutex<Option<(i32, u64)>>>,
    /// Whether this process has written which boot its leases belong to.
    boot_written: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RunDir {
    pub fn new(data_dir: &Path, device: Option<PathBuf>) -> RunDir {
        RunDir {
            path: data_dir.join("run"),
            data_dir: data_dir.to_path_buf(),
            device,
            spawned: Default::default(),
            boot_written: Default::default(),
        }
    }

    /// The agent's data directory (script resources' stop actions run from it).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn groups_dir(&self) -> PathBuf {
        self.path.join("groups")
    }

    fn lease_path(&self) -> PathBuf {
        self.path.join("lease")
    }

    /// Which boot the lease's CLOCK_BOOTTIME deadline belongs to (a
    /// separate file, so that the lease file's format stays what a watchdog
    /// of an older version reads).
    fn boot_path(&self) -> PathBuf {
        self.path.join("lease.boot")
    }

    fn lock_path(&self) -> PathBuf {
        self.path.join("watchdog.lock")
    }

    /// Writes the lease deadline in place (one small write: a reader sees
    /// the old or the new line, never a torn one).
    pub fn write_lease(&self, lease: Lease) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.path)?;
        if !self.boot_written.load(std::sync::atomic::Ordering::SeqCst) {
            // Before the first deadline of this boot is written: a reader
            // never takes this boot's deadline for another boot's.
            std::fs::write(self.boot_path(), format!("{}\n", crate::clock::boot_id()))?;
            self.boot_written.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let line = match lease {
            Lease::Until(d) => format!("{d:>20}\n"),
            Lease::Released | Lease::Missing => format!("{:>20}\n", "released"),
        };
        let mut f = OpenOptions::new().create(true).write(true).truncate(false).open(self.lease_path())?;
        f.write_all(line.as_bytes())
    }

    /// The lease as last written. A deadline written in an earlier boot is
    /// expired: CLOCK_BOOTTIME started over at the reboot, so an old
    /// deadline would read as a lease held for as long as the old boot ran.
    pub fn read_lease(&self) -> Lease {
        let mut s = String::new();
        let lease = match File::open(self.lease_path()).and_then(|mut f| f.read_to_string(&mut s)) {
            Ok(_) => match s.trim() {
                "released" => Lease::Released,
                // An unreadable lease is an expired one.
                t => Lease::Until(t.parse().unwrap_or(0)),
            },
            Err(_) => Lease::Missing,
        };
        match (lease, std::fs::read_to_string(self.boot_path())) {
            (Lease::Until(_), Ok(boot)) if boot.trim() != crate::clock::boot_id() => Lease::Until(0),
            // No boot file: written by a version before it; taken as is.
            (lease, _) => lease,
        }
    }

    /// Writes until when this node saw its site hold the ticket
    /// (`crate::ticket::Gate`), with the boot it belongs to, atomically: a
    /// restarted agent keeps its ticket groups only that long unless the
    /// leader tells it more.
    pub fn write_ticket_gate(&self, open_until_ms: u64) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.path)?;
        let tmp = self.path.join("ticket-gate.tmp");
        std::fs::write(&tmp, format!("{} {open_until_ms}\n", crate::clock::boot_id()))?;
        std::fs::rename(tmp, self.path.join("ticket-gate"))
    }

    /// The ticket gate as last written in this boot (0: closed, also when
    /// missing, unreadable or from another boot).
    pub fn read_ticket_gate(&self) -> u64 {
        let s = std::fs::read_to_string(self.path.join("ticket-gate")).unwrap_or_default();
        match s.split_whitespace().collect::<Vec<_>>()[..] {
            [boot, until] if boot == crate::clock::boot_id() => until.parse().unwrap_or(0),
            _ => 0,
        }
    }

    /// Writes a group's record atomically (write aside, rename).
    pub fn write_record(&self, rec: &RunRecord) -> std::io::Result<()> {
        let dir = self.groups_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.tmp", rec.group));
        std::fs::write(&tmp, serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, dir.join(format!("{}.json", rec.group)))
    }

    pub fn remove_record(&self, group: &str) {
        let _ = std::fs::remove_file(self.groups_dir().join(format!("{group}.json")));
    }

    /// Every record; one that cannot be read is logged and skipped.
    pub fn records(&self) -> Vec<RunRecord> {
        let Ok(entries) = std::fs::read_dir(self.groups_dir()) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<RunRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(path = %p.display(), "unreadable run record: {e}"),
            }
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        out
    }

    pub fn has_records(&self) -> bool {
        std::fs::read_dir(self.groups_dir())
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))))
    }

    /// Takes the watchdog's lock if nobody holds it.
    pub(crate) fn try_lock(&self) -> std::io::Result<Option<File>> {
        std::fs::create_dir_all(&self.path)?;
        let f = OpenOptions::new().create(true).write(true).truncate(false).open(self.lock_path())?;
        match f.try_lock() {
            Ok(()) => Ok(Some(f)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Starts a watchdog process unless one runs for this data directory.
    pub fn ensure_watchdog(&self) -> std::io::Result<()> {
        match self.try_lock()? {
            None => return Ok(()), // one runs
            Some(lock) => drop(lock),
        }
        let mut spawned = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        if spawned.is_some_and(|(pid, start)| is_running(pid, start)) {
            return Ok(()); // started, not locked yet
        }
        let log = OpenOptions::new().create(true).append(true).open(self.data_dir.join("watchdog.log"))?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("watchdog").arg("--data-dir").arg(&self.data_dir);
        if let Some(d) = &self.device {
            cmd.arg("--device").arg(d);
        }
        // Its own process group, so that a terminal's Ctrl-C meant for the
        // agent does not reach it; no parent-death signal: it must outlive
        // the agent.
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        tracing::info!(pid = child.id(), "watchdog started");
        *spawned = child.id().and_then(|p| Some((p as i32, proc_start_time(p as i32)?)));
        // Reap it when it exits (while this agent lives).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn kill_tree_reaches_children_that_left_the_process_group() {
        use std::os::unix::process::CommandExt;
        // A leader whose child leaves with setsid, as a PostgreSQL backend
        // does: killing the process group alone would miss it.
        let mut leader =
            std::process::Command::new("sh").args(["-c", "setsid sleep 1000 & wait"]).process_group(0).spawn().unwrap();
        let pgid = leader.id() as i32;
        let mut escaped = Vec::new();
        for _ in 0..200 {
            escaped = descendants(pgid);
            if !escaped.is_empty() && escaped.iter().all(|p| proc_start_time(*p).is_some()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(escaped.len(), 1, "{escaped:?}");
        let sid = |p: i32| {
            let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
            s[s.rfind(')').unwrap() + 2..].split_whitespace().nth(3).unwrap().parse::<i32>().unwrap()
        };
        // Wait until it ran setsid (its own session).
        for _ in 0..200 {
            if sid(escaped[0]) == escaped[0] {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(sid(escaped[0]), escaped[0], "the child left the session");
        kill_tree(pgid);
        let _ = leader.wait();
        for _ in 0..200 {
            if proc_start_time(escaped[0]).is_none() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the child that left the process group survived");
    }

    use super::*;
    use crate::clock::now_boot_ms;

    #[test]
    fn lease_round_trips_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path(), None);
        assert_eq!(run.read_lease(), Lease::Missing);
        let now = now_boot_ms();
        run.write_lease(Lease::Until(now + 500)).unwrap();
        assert_eq!(run.read_lease(), Lease::Until(now + 500));
        assert!(run.read_lease().valid_at(now));
        assert!(!run.read_lease().valid_at(now + 500));
        run.write_lease(Lease::Released).unwrap();
        assert_eq!(run.read_lease(), Lease::Released);
        assert!(!Lease::Released.valid_at(0));
        // A shorter deadline overwrites a longer line completely.
        run.write_lease(Lease::Until(7)).unwrap();
        assert_eq!(run.read_lease(), Lease::Until(7));
    }

    #[test]
    fn a_lease_written_in_an_earlier_boot_is_expired() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path(), None);
        let far = now_boot_ms() + 3_600_000;
        run.write_lease(Lease::Until(far)).unwrap();
        assert!(run.read_lease().valid_at(now_boot_ms()), "this boot's lease holds");
        // The node rebooted: CLOCK_BOOTTIME started over, the files stayed.
        std::fs::write(dir.path().join("run/lease.boot"), "00000000-0000-0000-0000-000000000000\n").unwrap();
        assert_eq!(run.read_lease(), Lease::Until(0));
        assert!(!run.read_lease().valid_at(now_boot_ms()));
        // A released lease is released whatever the boot.
        run.write_lease(Lease::Released).unwrap();
        assert_eq!(run.read_lease(), Lease::Released);
        // A new agent of this boot writes the boot again before its first
        // deadline.
        let again = RunDir::new(dir.path(), None);
        again.write_lease(Lease::Until(far)).unwrap();
        assert!(again.read_lease().valid_at(now_boot_ms()));
    }

    #[test]
    fn start_time_names_a_live_process_only() {
        let me = std::process::id() as i32;
        let t = proc_start_time(me).expect("own start time");
        assert!(is_running(me, t));
        assert!(!is_running(me, t + 1));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert_eq!(proc_start_time(pid), None, "a reaped child is gone");
    }

    #[test]
    fn records_round_trip_and_bad_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path(), None);
        let spec: GroupSpec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "a", "type": "process", "command": ["sleep", "9"]}], "nodes": ["n1"]
        }))
        .unwrap();
        let rec = RunRecord {
            group: "g".into(),
            epoch: 3,
            node: "n1".into(),
            spec,
            resources: vec![RunSlot::Process { pid: 5, start_time: 6 }],
        };
        run.write_record(&rec).unwrap();
        std::fs::write(run.groups_dir().join("junk.json"), b"{").unwrap();
        assert_eq!(run.records(), vec![rec]);
        assert!(run.has_records());
        run.remove_record("g");
        std::fs::remove_file(run.groups_dir().join("junk.json")).unwrap();
        assert!(!run.has_records());
    }

    #[test]
    fn one_lock_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path(), None);
        let held = run.try_lock().unwrap();
        assert!(held.is_some());
        assert!(run.try_lock().unwrap().is_none());
        drop(held);
        assert!(run.try_lock().unwrap().is_some());
    }
}
