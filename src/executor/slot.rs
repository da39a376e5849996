//! One resource's life on this node (idle, a supervised process, a script
//! action in flight, up and monitored, recovering) and the steps that move
//! it: start, monitor, restart within the threshold, stop in reverse order.
//! Group-level decisions are the reconciler's, never made here.

use super::*;

/// A supervised process: our child, or adopted from an agent that ran
/// before this one (then only its pid and start time are known).
pub(super) struct Running {
    pub(super) child: Option<Child>,
    /// Also its process group's id.
    pub(super) pid: i32,
    pub(super) start_time: u64,
}

impl Running {
    /// None while it runs, else why it ended.
    pub(super) fn ended(&mut self) -> Option<String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(format!("exited: {status}")),
            Some(Err(e)) => Some(e.to_string()),
            None if rundir::is_running(self.pid, self.start_time) => None,
            None => Some("exited (adopted process; no exit status)".into()),
        }
    }

    pub(super) async fn wait(&mut self) {
        match self.child.as_mut() {
            Some(c) => {
                let _ = c.wait().await;
            }
            None => {
                while rundir::is_running(self.pid, self.start_time) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// The exit code of a script action, or why there is none.
pub(super) type ActionResult = Result<i32, String>;

/// One resource's life on this node.
pub(super) enum Slot {
    /// Not started (or stopped after a failure, to be started again).
    Idle,
    /// A supervised process.
    Process(Running),
    /// A script agent's action in flight.
    Starting(tokio::task::JoinHandle<ActionResult>),
    /// Started (its start action succeeded); `ready` once a monitor has
    /// passed since: a start may return before the service answers.
    Up {
        next_monitor: Instant,
        next_deep: Option<Instant>,
        ready: bool,
    },
    Monitoring {
        task: tokio::task::JoinHandle<ActionResult>,
        deep: bool,
        next_deep: Option<Instant>,
        ready: bool,
    },
    /// Stopping after a failed monitor, before it is started again.
    Recovering(tokio::task::JoinHandle<ActionResult>),
}

pub(super) struct LocalGroup {
    pub(super) epoch: u64,
    pub(super) spec: GroupSpec,
    /// One slot per resource, in start order.
    pub(super) slots: Vec<Slot>,
    pub(super) restarts: VecDeque<Instant>,
    /// Per resource: why it last failed here.
    pub(super) errors: Vec<Option<String>>,
    /// Local restarts since the group started here.
    pub(super) restarted: u32,
    /// Set after a failed stop: when to try the stop again (CLOCK_BOOTTIME
    /// ms).
    pub(super) stop_retry_at: Option<u64>,
    /// Said it runs here (`group.running`); adopted groups already did.
    pub(super) announced: bool,
    /// A resource failed since: the next time all run is a restart.
    pub(super) recovering: bool,
    /// When this node began starting it (for `group.running`).
    pub(super) since: Instant,
}

impl LocalGroup {
    pub(super) fn new(epoch: u64, spec: GroupSpec) -> LocalGroup {
        let n = spec.resources.len();
        LocalGroup {
            epoch,
            spec,
            slots: (0..n).map(|_| Slot::Idle).collect(),
            restarts: VecDeque::new(),
            errors: vec![None; n],
            restarted: 0,
            stop_retry_at: None,
            announced: false,
            recovering: false,
            since: Instant::now(),
        }
    }

    /// What the watchdog and a restarted agent need to know.
    pub(super) fn record(&self, group: &str, node: &str) -> RunRecord {
        let resources = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Idle => RunSlot::Idle,
                Slot::Process(p) => RunSlot::Process { pid: p.pid, start_time: p.start_time },
                _ => RunSlot::Script,
            })
            .collect();
        RunRecord { group: group.into(), epoch: self.epoch, node: node.into(), spec: self.spec.clone(), resources }
    }

    /// Whether `rec` is what `record(group, node)` would build, without
    /// building it: the executor asks for every group on every round (10 a
    /// second), and the copy of the spec cost more than the comparison.
    pub(super) fn is_recorded_as(&self, rec: &RunRecord, group: &str, node: &str) -> bool {
        let slot_is = |s: &Slot, r: &RunSlot| match (s, r) {
            (Slot::Idle, RunSlot::Idle) => true,
            (Slot::Process(p), RunSlot::Process { pid, start_time }) => p.pid == *pid && p.start_time == *start_time,
            (Slot::Idle | Slot::Process(_), _) => false,
            (_, r) => *r == RunSlot::Script,
        };
        rec.group == group
            && rec.epoch == self.epoch
            && rec.node == node
            && rec.spec == self.spec
            && rec.resources.len() == self.slots.len()
            && self.slots.iter().zip(&rec.resources).all(|(s, r)| slot_is(s, r))
    }

    /// Rebuilds a group from its record (the agent restarted): processes
    /// still running are watched again, script resources monitored at once.
    pub(super) fn adopt(rec: RunRecord, guard: &LeaseGuard) -> LocalGroup {
        let mut g = LocalGroup::new(rec.epoch, rec.spec);
        g.announced = true;
        let now = Instant::now();
        for (slot, was) in g.slots.iter_mut().zip(rec.resources) {
            *slot = match was {
                RunSlot::Idle => Slot::Idle,
                RunSlot::Process { pid, start_time } => {
                    // Gone while no agent watched: the next tick sees it
                    // ended and counts a failure.
                    guard.register(pid, &rec.group);
                    Slot::Process(Running { child: None, pid, start_time })
                }
                // Unknown until its monitor (at once) says it answers.
                RunSlot::Script => Slot::Up { next_monitor: now, next_deep: None, ready: false },
            };
        }
        g
    }

    pub(super) fn status(&self) -> Vec<ResourceStatus> {
        self.spec
            .resources
            .iter()
            .zip(&self.slots)
            .zip(&self.errors)
            .map(|((r, slot), err)| {
                let (state, pid) = match slot {
                    Slot::Idle => ("stopped", None),
                    Slot::Process(p) => ("running", Some(p.pid as u32)),
                    Slot::Starting(_) => ("starting", None),
                    // Left up by a failed stop: it may still run.
                    Slot::Up { .. } if self.stop_retry_at.is_some() && err.is_some() => ("stop_failed", None),
                    Slot::Up { ready: true, .. } | Slot::Monitoring { ready: true, .. } => ("running", None),
                    // Started, its first monitor not passed yet.
                    Slot::Up { .. } | Slot::Monitoring { .. } => ("starting", None),
                    Slot::Recovering(_) => ("recovering", None),
                };
                // Worth knowing but no reason to move: the same data is
                // just as full on any other node.
                let warning = match (&r.kind, state) {
                    (ResourceKind::Filesystem(f), "running") => super::filesystem::usage_warning(&f.mountpoint),
                    _ => None,
                };
                ResourceStatus {
                    name: r.name.clone(),
                    kind: r.kind.type_name().to_string(),
                    state: state.to_string(),
                    pid,
                    last_error: err.clone(),
                    warning,
                }
            })
            .collect()
    }
}

impl Slot {
    /// Whether the resource answers as far as this node knows: a process
    /// while it runs (it has no check of its own), a script resource once
    /// a monitor passed after its start.
    pub(super) fn ready(&self) -> bool {
        match self {
            Slot::Process(_) => true,
            Slot::Up { ready, .. } | Slot::Monitoring { ready, .. } => *ready,
            Slot::Idle | Slot::Starting(_) | Slot::Recovering(_) => false,
        }
    }
}

pub(super) enum Step {
    Up,
    /// A script's start action was just spawned: record it, then step again
    /// (a quick action finishes within the same round).
    Spawned,
    Pending,
    Failed(String),
}

/// Where and as what a group's resources run.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) dir: &'a std::path::Path,
    pub(super) node: &'a str,
    pub(super) group: &'a str,
    pub(super) epoch: u64,
    pub(super) guard: &'a LeaseGuard,
}

impl Ctx<'_> {
    pub(super) fn action(&self, r: &ResourceSpec, verb: &'static str, deep: bool) -> Action {
        Action {
            dir: self.dir.to_path_buf(),
            node: self.node.to_string(),
            group: self.group.to_string(),
            epoch: self.epoch,
            r: r.clone(),
            verb,
            deep,
            volumes: self.guard.volumes.get().cloned(),
        }
    }
}

/// Advances one resource's slot by at most one transition.
pub(super) async fn step(slot: &mut Slot, r: &ResourceSpec, cx: Ctx<'_>, now: Instant) -> Step {
    let Ctx { dir, node, group, epoch, guard } = cx;
    let monitor_every = Duration::from_millis(r.monitor.interval_ms);
    // Just started: the first monitor runs at once (as Pacemaker's does),
    // and the resource is ready once it passed.
    let up = |now: Instant| Slot::Up {
        next_monitor: now,
        next_deep: r.deep_monitor.as_ref().map(|d| now + Duration::from_millis(d.interval_ms)),
        ready: false,
    };
    let spawn_action = |verb: &'static str, deep: bool| tokio::spawn(cx.action(r, verb, deep).run());
    match std::mem::replace(slot, Slot::Idle) {
        // The lease may have run out while this round ran (a stall): start
        // nothing then.
        Slot::Idle if !guard.lease_valid() => Step::Pending,
        Slot::Idle => match &r.kind {
            ResourceKind::Process { .. } => match spawn_process(dir, node, group, epoch, r) {
                Ok(p) => {
                    guard.register(p.pid, group);
                    *slot = Slot::Process(p);
                    Step::Up
                }
                Err(e) => Step::Failed(format!("start: {e}")),
            },
            _ => {
                *slot = Slot::Starting(spawn_action("start", false));
                Step::Spawned
            }
        },
        Slot::Process(mut p) => match p.ended() {
            None => {
                *slot = Slot::Process(p);
                Step::Up
            }
            Some(why) => {
                // Whatever it left in its process group goes too.
                crate::rundir::kill_tree(p.pid);
                guard.unregister(p.pid);
                let log = dir.join("groups").join(group).join(format!("{}.log", r.name));
                match last_output(&log) {
                    Some(line) => Step::Failed(format!("{why}; last output: {line}")),
                    None => Step::Failed(why),
                }
            }
        },
        Slot::Starting(mut task) => match tokio::time::timeout(ACTION_WAIT, &mut task).await {
            // Still running: look again next round.
            Err(_) => {
                *slot = Slot::Starting(task);
                Step::Pending
            }
            Ok(done) => match done.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(0) => {
                    tracing::info!(group, resource = %r.name, epoch, "resource started");
                    *slot = up(now);
                    Step::Up
                }
                other => {
                    // Clean up whatever half-started before trying again.
                    *slot = Slot::Recovering(spawn_action("stop", false));
                    Step::Failed(format!("start: {}", describe(other)))
                }
            },
        },
        Slot::Up { next_monitor, next_deep, ready } => {
            if next_deep.is_some_and(|t| now >= t) {
                *slot = Slot::Monitoring { task: spawn_action("monitor", true), deep: true, next_deep, ready };
            } else if now >= next_monitor {
                *slot = Slot::Monitoring { task: spawn_action("monitor", false), deep: false, next_deep, ready };
            } else {
                *slot = Slot::Up { next_monitor, next_deep, ready };
            }
            Step::Up
        }
        Slot::Monitoring { task, deep, next_deep, ready } if !task.is_finished() => {
            *slot = Slot::Monitoring { task, deep, next_deep, ready };
            Step::Up
        }
        Slot::Monitoring { task, deep, next_deep, .. } => match task.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(0) => {
                let next_deep = match (deep, &r.deep_monitor) {
                    (true, Some(d)) => Some(now + Duration::from_millis(d.interval_ms)),
                    _ => next_deep,
                };
                *slot = Slot::Up { next_monitor: now + monitor_every, next_deep, ready: true };
                Step::Up
            }
            other => {
                *slot = Slot::Recovering(spawn_action("stop", false));
                Step::Failed(format!("{} monitor: {}", if deep { "deep" } else { "quick" }, describe(other)))
            }
        },
        Slot::Recovering(task) if !task.is_finished() => {
            *slot = Slot::Recovering(task);
            Step::Pending
        }
        Slot::Recovering(_) => Step::Pending,
    }
}

/// The last line a resource wrote to its log (at most 300 bytes of it):
/// why a server that would not start said so.
fn last_output(log: &std::path::Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_string())
}

pub(super) fn describe(r: ActionResult) -> String {
    match r {
        Ok(OCF_NOT_RUNNING) => "not running (7)".into(),
        Ok(code) => format!("exit code {code}"),
        Err(e) => e,
    }
}

/// Stops resources in reverse order: a process gets SIGTERM to its process
/// group and SIGKILL after the stop timeout; a script agent runs `stop`.
/// A group whose stop failed comes back: it may still run, so it stays here
/// (blocked: not reported stopped) and its stop is tried again later.
pub(super) async fn stop_group(
    mut g: LocalGroup,
    dir: &std::path::Path,
    node: &str,
    group: &str,
    guard: &LeaseGuard,
) -> Option<LocalGroup> {
    let slots = std::mem::take(&mut g.slots);
    let (left, errors) = stop_slots(&g.spec.resources, slots, Ctx { dir, node, group, epoch: g.epoch, guard }).await;
    g.slots = left;
    if errors.is_empty() {
        return None;
    }
    for (i, e) in errors {
        g.errors[i] = Some(format!("stop failed: {e}"));
    }
    tracing::error!(group, "stop failed: the group stays here, blocked, and its stop is tried again in {STOP_RETRY:?}");
    g.stop_retry_at = Some(now_boot_ms() + STOP_RETRY.as_millis() as u64);
    Some(g)
}

/// Stops `slots` (in reverse order); returns them as they are after it (a
/// failed stop leaves its resource up) and the failures by index.
pub(super) async fn stop_slots(
    resources: &[ResourceSpec],
    slots: Vec<Slot>,
    cx: Ctx<'_>,
) -> (Vec<Slot>, Vec<(usize, String)>) {
    let n = slots.len();
    let mut left: Vec<Slot> = (0..n).map(|_| Slot::Idle).collect();
    let mut errors = Vec::new();
    for (i, (r, slot)) in resources.iter().zip(slots).enumerate().rev() {
        let failed = match slot {
            Slot::Idle => None,
            Slot::Process(mut p) => {
                let _ = killpg(Pid::from_raw(p.pid), stop_signal(r));
                let timeout = Duration::from_millis(r.stop_timeout_ms);
                if tokio::time::timeout(timeout, p.wait()).await.is_err() {
                    tracing::warn!(resource = %r.name, "did not stop within {timeout:?}: killing it");
                }
                // Whatever is left of its process group goes too.
                crate::rundir::kill_tree(p.pid);
                p.wait().await;
                cx.guard.unregister(p.pid);
                None
            }
            // A monitor in flight is cancelled (its process group killed):
            // a stop never waits out a monitor's timeout.
            Slot::Monitoring { task, .. } => {
                task.abort();
                let _ = task.await;
                script_stop(cx, r).await
            }
            // A start or a recovery's stop in flight ends first: the stop
            // must come after whatever they did.
            Slot::Starting(t) | Slot::Recovering(t) => {
                let _ = t.await;
                script_stop(cx, r).await
            }
            Slot::Up { .. } => script_stop(cx, r).await,
        };
        if let Some(e) = failed {
            left[i] =
                Slot::Up { next_monitor: Instant::now() + Duration::from_secs(3600), next_deep: None, ready: false };
            errors.push((i, e));
        }
    }
    (left, errors)
}

/// The signal a process resource's stop starts with.
fn stop_signal(r: &ResourceSpec) -> Signal {
    match &r.kind {
        ResourceKind::Process { stop_signal: Some(s), .. } => s.parse().unwrap_or(Signal::SIGTERM),
        _ => Signal::SIGTERM,
    }
}

/// Runs a script resource's stop; the failure, if any.
pub(super) async fn script_stop(cx: Ctx<'_>, r: &ResourceSpec) -> Option<String> {
    match cx.action(r, "stop", false).run().await {
        Ok(0) => None,
        other => {
            let why = describe(other);
            tracing::error!(group = cx.group, resource = %r.name, "stop failed: {why}");
            Some(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_recorded_as_says_what_comparing_a_fresh_record_says() {
        let spec: GroupSpec = serde_json::from_value(serde_json::json!({
            "resources": [{"name": "a", "type": "process", "command": ["x"]},
                          {"name": "b", "type": "process", "command": ["y"]}],
            "nodes": ["n1"]
        }))
        .unwrap();
        let mut g = LocalGroup::new(3, spec.clone());
        let mut other_spec = spec.clone();
        other_spec.resources.pop();
        let variants = |g: &LocalGroup| {
            vec![
                g.record("g", "n1"),
                g.record("h", "n1"),
                g.record("g", "n2"),
                LocalGroup::new(4, spec.clone()).record("g", "n1"),
                LocalGroup::new(3, other_spec.clone()).record("g", "n1"),
            ]
        };
        let mut seen = variants(&g);
        g.slots[0] = Slot::Process(Running { child: None, pid: 42, start_time: 7 });
        seen.extend(variants(&g));
        g.slots[1] = Slot::Process(Running { child: None, pid: 43, start_time: 8 });
        seen.extend(variants(&g));
        for rec in &seen {
            assert_eq!(g.is_recorded_as(rec, "g", "n1"), *rec == g.record("g", "n1"), "{rec:?}");
        }
        assert!(seen.iter().filter(|r| g.is_recorded_as(r, "g", "n1")).count() == 1);
    }

    /// An exec resource whose start succeeds at once and whose monitor
    /// passes only once `answers` exists (a server still loading).
    fn exec_resource(dir: &std::path::Path) -> ResourceSpec {
        let script = dir.join("svc.sh");
        let answers = dir.join("answers");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$1\" in\nstart|stop) exit 0 ;;\nmonitor) [ -e {} ] || exit 7 ;;\nesac\nexit 0\n",
                answers.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        serde_json::from_value(serde_json::json!({"name": "svc", "type": "exec", "path": script.display().to_string()}))
            .unwrap()
    }

    /// Steps the slot until `until` holds (each step at most 100 ms of
    /// waiting for a script), at most 50 times.
    async fn step_until(slot: &mut Slot, r: &ResourceSpec, cx: Ctx<'_>, until: impl Fn(&Slot, &Step) -> bool) -> Step {
        for _ in 0..50 {
            let s = step(slot, r, cx, Instant::now()).await;
            if until(slot, &s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the slot never got there");
    }

    #[tokio::test]
    async fn a_stop_cancels_a_monitor_in_flight_and_kills_its_process() {
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("slow.sh");
        let pidfile = tmp.path().join("monitor.pid");
        std::fs::write(
            &script,
            format!("#!/bin/sh\ncase \"$1\" in\nmonitor) echo $$ > {}; sleep 60 ;;\nesac\nexit 0\n", pidfile.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let r: ResourceSpec = serde_json::from_value(serde_json::json!({
            "name": "slow", "type": "exec", "path": script.display().to_string(),
            "monitor": {"interval_ms": 1000, "timeout_ms": 120000}
        }))
        .unwrap();
        let guard = LeaseGuard::new(now_boot_ms() + 600_000);
        let cx = Ctx { dir: tmp.path(), node: "n1", group: "g", epoch: 1, guard: &guard };
        let mut slot = Slot::Idle;
        step_until(&mut slot, &r, cx, |s, _| matches!(s, Slot::Monitoring { .. })).await;
        for _ in 0..100 {
            if pidfile.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let started = Instant::now();
        let (left, errors) = stop_slots(std::slice::from_ref(&r), vec![slot], cx).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stop waited for the monitor: {:?}",
            started.elapsed()
        );
        assert!(errors.is_empty() && matches!(left[0], Slot::Idle), "{errors:?}");
        // The monitor's process is gone (killed, then reaped).
        let gone = (0..100).any(|_| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"));
            if alive {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive
        });
        assert!(gone, "the monitor's process {pid} still runs");
    }

    #[tokio::test]
    async fn a_started_script_resource_is_ready_only_after_its_first_monitor_passed() {
        let tmp = tempfile::tempdir().unwrap();
        let r = exec_resource(tmp.path());
        let guard = LeaseGuard::new(now_boot_ms() + 600_000);
        let cx = Ctx { dir: tmp.path(), node: "n1", group: "g", epoch: 1, guard: &guard };
        let spec: GroupSpec =
            serde_json::from_value(serde_json::json!({"resources": [r.clone()], "nodes": ["n1"]})).unwrap();
        let mut g = LocalGroup::new(1, spec);

        // Started: up (the next resource may start) but not ready, and
        // shown as starting, not running.
        step_until(&mut g.slots[0], &r, cx, |s, _| matches!(s, Slot::Up { .. })).await;
        assert!(!g.slots[0].ready());
        assert_eq!(g.status()[0].state, "starting");
        // Its first monitor runs at once and fails: never ready, recovered.
        let s = step_until(&mut g.slots[0], &r, cx, |_, s| matches!(s, Step::Failed(_))).await;
        assert!(matches!(s, Step::Failed(ref why) if why.contains("monitor")));
        assert!(!g.slots[0].ready());

        // Started again, and now the service answers: ready once the
        // monitor passed, shown running.
        std::fs::write(tmp.path().join("answers"), "").unwrap();
        g.slots[0] = Slot::Idle;
        step_until(&mut g.slots[0], &r, cx, |s, _| s.ready()).await;
        assert_eq!(g.status()[0].state, "running");
        // A process has no check of its own: ready while it runs.
        let p = Running { child: None, pid: std::process::id() as i32, start_time: 0 };
        assert!(Slot::Process(p).ready());
        assert!(!Slot::Idle.ready());
    }
}
