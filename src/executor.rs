//! The node-local executor: makes this node run exactly the groups the
//! replicated state places on it, at their epoch.
//!
//! Each tick it asks the reconciler (`crate::reconcile`, pure) what to do
//! with each group and carries it out at the resource level: it starts
//! groups placed here (resources in order), stops those asked to stop or
//! placed elsewhere (in reverse order), restarts a crashed resource up to the
//! group's threshold, and reports to the leader what only this node can know
//! ("stopped", "failed"). When the lease lapses (no majority of voters heard
//! for longer than the lease) it kills everything it runs, at once: the
//! leader places the groups elsewhere only after that lease (plus a margin)
//! has passed, so a group never runs on two nodes. It decides nothing at the
//! group level itself.
//!
//! Resource processes outlive the agent: what runs here is recorded in
//! `<data_dir>/run` (see `rundir`), a restarted agent adopts it, and the
//! watchdog process kills it if no agent renews the lease in time. Script
//! agents (`exec`, `ocf`, `systemd`, the built-in `vip`) run their start /
//! monitor / stop actions as tasks polled by the tick, so a slow action
//! never delays the kill when the lease lapses.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tandem_raft::group::{GroupRecord, GroupSpec, ResourceKind, ResourceSpec};
use tandem_raft::state::{AdminState, ClusterState};
use tandem_raft::NodeId;
use tokio::process::{Child, Command};

use crate::clock::now_boot_ms;
use crate::reconcile::{self, LeaseView, Local, Reconciler, Report, STOP_RETRY};
use crate::rundir::{self, RunDir, RunRecord, RunSlot};

/// Whether a resource type can run on this version of the agent.
pub fn supported(kind: &ResourceKind) -> bool {
    matches!(
        kind,
        ResourceKind::Process { .. }
            | ResourceKind::Exec { .. }
            | ResourceKind::Ocf { .. }
            | ResourceKind::Systemd { .. }
            | ResourceKind::Vip { .. }
            | ResourceKind::Volume(_)
    )
}

/// What the lease timer needs to act on a lapse without waiting for the
/// executor (which may be busy stopping or starting something): the lease
/// deadline as the lease core last persisted it (so that nothing starts
/// once it has passed) and the process groups of every running resource
/// process on this node.
#[derive(Debug, Default)]
pub struct LeaseGuard {
    pgids: std::sync::Mutex<BTreeSet<i32>>,
    /// The lease's end, CLOCK_BOOTTIME milliseconds (0: not held): a copy
    /// of `crate::lease::LeaseCore::deadline_ms`.
    deadline_ms: std::sync::atomic::AtomicU64,
    /// The data plane: volume resources are promoted and demoted there, and
    /// a lapse halts every export at once.
    volumes: std::sync::OnceLock<std::sync::Arc<crate::volume::manager::VolumeManager>>,
}

impl LeaseGuard {
    /// A guard of a lease held until `deadline_ms` (inherited from an agent
    /// that ran before this one).
    pub fn new(deadline_ms: u64) -> LeaseGuard {
        LeaseGuard { pgids: Default::default(), deadline_ms: deadline_ms.into(), volumes: Default::default() }
    }

    /// Connects the data plane (once, at agent start).
    pub fn set_volumes(&self, volumes: std::sync::Arc<crate::volume::manager::VolumeManager>) {
        let _ = self.volumes.set(volumes);
    }

    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_deadline_ms(&self, d: u64) {
        self.deadline_ms.store(d, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this node holds its lease now.
    pub fn lease_valid(&self) -> bool {
        now_boot_ms() < self.deadline_ms()
    }

    /// Whether any resource process is registered.
    pub fn has_processes(&self) -> bool {
        !self.pgids.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    fn register(&self, pgid: i32) {
        self.pgids.lock().unwrap_or_else(|e| e.into_inner()).insert(pgid);
    }

    fn unregister(&self, pgid: i32) {
        self.pgids.lock().unwrap_or_else(|e| e.into_inner()).remove(&pgid);
    }

    /// SIGKILLs every registered process group and halts every volume this
    /// node is primary for; returns how many process groups.
    pub fn kill_everything(&self) -> usize {
        if let Some(v) = self.volumes.get() {
            v.halt_all();
        }
        let all = std::mem::take(&mut *self.pgids.lock().unwrap_or_else(|e| e.into_inner()));
        for pg in &all {
            let _ = killpg(Pid::from_raw(*pg), Signal::SIGKILL);
        }
        all.len()
    }
}

/// How often virtual IPs left behind by a crashed agent are looked for.
const VIP_CHECK_EVERY: Duration = Duration::from_secs(3);

/// How long a round waits for a start action in flight before it moves on:
/// a quick one (a VIP) then lets the next resource start in the same round.
const ACTION_WAIT: Duration = Duration::from_millis(150);

/// Where OCF resource agents live (Debian's `resource-agents`).
pub const OCF_ROOT: &str = "/usr/lib/ocf";
/// OCF exit code: the resource is cleanly not running.
const OCF_NOT_RUNNING: i32 = 7;

/// A supervised process: our child, or adopted from an agent that ran
/// before this one (then only its pid and start time are known).
struct Running {
    child: Option<Child>,
    /// Also its process group's id.
    pid: i32,
    start_time: u64,
}

impl Running {
    /// None while it runs, else why it ended.
    fn ended(&mut self) -> Option<String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(format!("exited: {status}")),
            Some(Err(e)) => Some(e.to_string()),
            None if rundir::is_running(self.pid, self.start_time) => None,
            None => Some("exited (adopted process; no exit status)".into()),
        }
    }

    async fn wait(&mut self) {
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
type ActionResult = Result<i32, String>;

/// One resource's life on this node.
enum Slot {
    /// Not started (or stopped after a failure, to be started again).
    Idle,
    /// A supervised process.
    Process(Running),
    /// A script agent's action in flight.
    Starting(tokio::task::JoinHandle<ActionResult>),
    Up {
        next_monitor: Instant,
        next_deep: Option<Instant>,
    },
    Monitoring {
        task: tokio::task::JoinHandle<ActionResult>,
        deep: bool,
        next_deep: Option<Instant>,
    },
    /// Stopping after a failed monitor, before it is started again.
    Recovering(tokio::task::JoinHandle<ActionResult>),
}

struct LocalGroup {
    epoch: u64,
    spec: GroupSpec,
    /// One slot per resource, in start order.
    slots: Vec<Slot>,
    restarts: VecDeque<Instant>,
    /// Per resource: why it last failed here.
    errors: Vec<Option<String>>,
    /// Local restarts since the group started here.
    restarted: u32,
    /// Set after a failed stop: when to try the stop again (CLOCK_BOOTTIME
    /// ms).
    stop_retry_at: Option<u64>,
}

impl LocalGroup {
    fn new(epoch: u64, spec: GroupSpec) -> LocalGroup {
        let n = spec.resources.len();
        LocalGroup {
            epoch,
            spec,
            slots: (0..n).map(|_| Slot::Idle).collect(),
            restarts: VecDeque::new(),
            errors: vec![None; n],
            restarted: 0,
            stop_retry_at: None,
        }
    }

    /// What the watchdog and a restarted agent need to know.
    fn record(&self, group: &str, node: &str) -> RunRecord {
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

    /// Rebuilds a group from its record (the agent restarted): processes
    /// still running are watched again, script resources monitored at once.
    fn adopt(rec: RunRecord, guard: &LeaseGuard) -> LocalGroup {
        let mut g = LocalGroup::new(rec.epoch, rec.spec);
        let now = Instant::now();
        for (slot, was) in g.slots.iter_mut().zip(rec.resources) {
            *slot = match was {
                RunSlot::Idle => Slot::Idle,
                RunSlot::Process { pid, start_time } => {
                    // Gone while no agent watched: the next tick sees it
                    // ended and counts a failure.
                    guard.register(pid);
                    Slot::Process(Running { child: None, pid, start_time })
                }
                RunSlot::Script => Slot::Up { next_monitor: now, next_deep: None },
            };
        }
        g
    }

    fn status(&self) -> Vec<ResourceStatus> {
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
                    Slot::Up { .. } | Slot::Monitoring { .. } => ("running", None),
                    Slot::Recovering(_) => ("recovering", None),
                };
                ResourceStatus {
                    name: r.name.clone(),
                    kind: r.kind.type_name().to_string(),
                    state: state.to_string(),
                    pid,
                    last_error: err.clone(),
                }
            })
            .collect()
    }
}

/// One resource as this node sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    pub name: String,
    pub kind: String,
    /// `starting`, `running`, `recovering` (stopping to restart), `stopped`.
    pub state: String,
    pub pid: Option<u32>,
    pub last_error: Option<String>,
}

pub struct Executor {
    node_id: NodeId,
    node_name: String,
    dir: PathBuf,
    groups: BTreeMap<String, LocalGroup>,
    /// The group-level decisions (and the groups that failed here).
    reconciler: Reconciler,
    /// Everything was killed because the lease lapsed (for the log).
    lapsed: bool,
    guard: std::sync::Arc<LeaseGuard>,
    /// When stale virtual IPs were last looked for.
    vips_checked: Option<Instant>,
    run: RunDir,
    /// The records as last written, to write only changes.
    written: BTreeMap<String, RunRecord>,
}

impl Executor {
    /// Adopts what the records say still runs here (an agent restart).
    pub fn new(
        node_id: NodeId,
        node_name: String,
        dir: PathBuf,
        guard: std::sync::Arc<LeaseGuard>,
        run: RunDir,
    ) -> Executor {
        let mut groups = BTreeMap::new();
        let mut written = BTreeMap::new();
        for rec in run.records() {
            tracing::info!(group = %rec.group, epoch = rec.epoch, "adopting the group's resources from before the restart");
            written.insert(rec.group.clone(), rec.clone());
            groups.insert(rec.group.clone(), LocalGroup::adopt(rec, &guard));
        }
        if groups.is_empty() {
            // Nothing runs here: OCF agents must not find stale state.
            let _ = std::fs::remove_dir_all(dir.join("ocf-run"));
        }
        Executor {
            node_id,
            node_name,
            dir,
            groups,
            reconciler: Reconciler::new(),
            lapsed: false,
            guard,
            vips_checked: None,
            run,
            written,
        }
    }

    /// Writes the records that changed, removes those of groups no longer
    /// here, and makes sure a watchdog guards them.
    fn sync_records(&mut self) {
        for (name, g) in &self.groups {
            let rec = g.record(name, &self.node_name);
            if self.written.get(name) != Some(&rec) {
                if let Err(e) = self.run.write_record(&rec) {
                    tracing::error!(group = %name, "cannot record what runs here: {e}");
                    continue;
                }
                self.written.insert(name.clone(), rec);
            }
        }
        let gone: Vec<String> = self.written.keys().filter(|n| !self.groups.contains_key(*n)).cloned().collect();
        for name in gone {
            self.run.remove_record(&name);
            self.written.remove(&name);
        }
        if !self.written.is_empty() {
            if let Err(e) = self.run.ensure_watchdog() {
                tracing::error!("cannot start the watchdog: {e}");
            }
        }
    }

    /// Resource status of a group running here.
    pub fn status(&self, group: &str) -> Option<(u64, u32, Vec<ResourceStatus>)> {
        self.groups.get(group).map(|g| (g.epoch, g.restarted, g.status()))
    }

    /// Runs nothing here (nothing to watch).
    pub fn is_idle(&self) -> bool {
        self.groups.is_empty()
    }

    /// Kills every local resource at once: the lease lapsed (or is not
    /// held).
    pub fn lapse(&mut self) {
        if !self.groups.is_empty() {
            tracing::warn!(groups = self.groups.len(), "the lease lapsed: killing and stopping every local resource");
        }
        let (dir, node) = (self.dir.clone(), self.node_name.clone());
        for (name, g) in std::mem::take(&mut self.groups) {
            for (r, slot) in g.spec.resources.iter().zip(g.slots).rev() {
                match slot {
                    Slot::Process(p) => {
                        let _ = killpg(Pid::from_raw(p.pid), Signal::SIGKILL);
                    }
                    Slot::Idle => {}
                    // A script agent's resource lives outside our processes:
                    // its stop action is all we can do (a fence command is
                    // what makes this safe; see docs/config.md).
                    _ => {
                        let cx = Ctx { dir: &dir, node: &node, group: &name, epoch: g.epoch, guard: &self.guard };
                        tokio::spawn(cx.action(r, "stop", false).run());
                    }
                }
            }
        }
        self.guard.kill_everything();
        self.lapsed = true;
        self.sync_records();
    }

    /// What runs here, as the reconciler sees it.
    fn local(&self) -> BTreeMap<String, Local> {
        self.groups
            .iter()
            .map(|(name, g)| (name.clone(), Local { epoch: g.epoch, stop_blocked_until_ms: g.stop_retry_at }))
            .collect()
    }

    /// Groups placed here (started, at their epoch) that do not run here
    /// yet, to be claimed. A start must be confirmed against the leader
    /// first: this node's copy of the state may be stale (it was cut off,
    /// it just came back).
    pub fn wanted_starts(&self, state: &ClusterState, lease: LeaseView) -> Vec<(String, u64)> {
        let local = self.local();
        let none = BTreeSet::new();
        self.reconciler.claims(&self.input(state, &local, &none, lease, now_boot_ms()))
    }

    fn input<'a>(
        &self,
        state: &'a ClusterState,
        local: &'a BTreeMap<String, Local>,
        confirmed: &'a BTreeSet<(String, u64)>,
        lease: LeaseView,
        now_ms: u64,
    ) -> reconcile::Input<'a> {
        let me = self.node_id;
        reconcile::Input {
            me,
            groups: &state.groups,
            local,
            confirmed,
            lease,
            maintenance: state.nodes.get(&me).is_some_and(|n| n.admin_state == AdminState::Maintenance),
            now_ms,
        }
    }

    /// One reconciliation round: carries out the reconciler's plan. New
    /// starts happen only for the (group, epoch) pairs in `confirmed`.
    pub async fn tick(
        &mut self,
        state: &ClusterState,
        lease: LeaseView,
        confirmed: &BTreeSet<(String, u64)>,
    ) -> Vec<Report> {
        let local = self.local();
        let plan = self.reconciler.plan(&self.input(state, &local, confirmed, lease, now_boot_ms()));
        if plan.contains(&reconcile::Command::KillEverything) {
            self.lapse();
            return Vec::new();
        }
        if self.lapsed {
            tracing::info!("the lease is held again: resources may run here again");
            self.lapsed = false;
        }
        let me = self.node_id;
        if self.vips_checked.is_none_or(|t| t.elapsed() >= VIP_CHECK_EVERY) {
            self.vips_checked = Some(Instant::now());
            // An agent that died (SIGKILL, crash) leaves its addresses behind,
            // and its state may be stale when it restarts: look again every
            // few seconds, and remove those of groups placed elsewhere.
            let elsewhere = |g: &&GroupRecord| g.placement.node.is_some_and(|n| n != me);
            for g in state.groups.values().filter(elsewhere) {
                for r in &g.spec.resources {
                    if let ResourceKind::Vip { address, interface, backup_interfaces } = &r.kind {
                        if let Ok(0) = vip::action("stop", address, interface, backup_interfaces).await {
                            tracing::debug!(group = %g.name, address, "no stale address left");
                        }
                    }
                }
            }
        }
        let mut reports = Vec::new();
        for command in plan {
            match command {
                reconcile::Command::KillEverything => {} // handled above
                reconcile::Command::Stop { group } => {
                    let Some(g) = self.groups.remove(&group) else { continue };
                    tracing::info!(group = %group, epoch = g.epoch, "stopping");
                    match stop_group(g, &self.dir, &self.node_name, &group, &self.guard).await {
                        None => reports.extend(self.reconciler.stopped(&group)),
                        Some(left) => {
                            reports.extend(self.reconciler.stop_failed(&group));
                            self.groups.insert(group, left);
                        }
                    }
                }
                // Made by the agent before the round (`Agent::executor_round`).
                reconcile::Command::Claim { .. } => {}
                reconcile::Command::Run { group, .. } => {
                    let Some(g) = state.groups.get(&group) else { continue };
                    if let Some(report) = self.run(g).await {
                        reports.push(report);
                    }
                    // At once: a process just started must be on record
                    // before anything else can happen to this agent.
                    self.sync_records();
                }
                reconcile::Command::Report(r) => reports.push(r),
            }
        }
        self.sync_records();
        reports
    }

    /// Starts `g` if needed (resources in order), monitors it, and restarts
    /// failed resources within the group's threshold. Returns a failure
    /// report past it.
    async fn run(&mut self, g: &GroupRecord) -> Option<Report> {
        let epoch = g.placement.epoch;
        if !self.groups.contains_key(&g.name) {
            tracing::info!(group = %g.name, epoch, "starting");
            self.groups.insert(g.name.clone(), LocalGroup::new(epoch, g.spec.clone()));
        }
        let (dir, node_name) = (self.dir.clone(), self.node_name.clone());
        let local = self.groups.get_mut(&g.name)?;
        local.epoch = epoch;
        if local.spec != g.spec {
            // A new definition: resources up to the first changed one keep
            // running; from there on they stop (in reverse) and start anew,
            // since later resources may depend on earlier ones.
            let keep = local.spec.resources.iter().zip(&g.spec.resources).take_while(|(a, b)| a == b).count();
            let old: Vec<ResourceSpec> = local.spec.resources[keep..].to_vec();
            let slots: Vec<Slot> = local.slots.drain(keep..).collect();
            tracing::info!(group = %g.name, kept = keep, restarted = old.len(), "definition changed");
            let cx = Ctx { dir: &dir, node: &node_name, group: &g.name, epoch, guard: &self.guard };
            // A failed stop here is logged; the new definition starts anyway.
            let _ = stop_slots(&old, slots, cx).await;
            local.slots.extend(g.spec.resources[keep..].iter().map(|_| Slot::Idle));
            local.errors.truncate(keep);
            local.errors.extend(g.spec.resources[keep..].iter().map(|_| None));
            local.spec = g.spec.clone();
        }
        let now = Instant::now();
        let window = Duration::from_millis(g.spec.restart_window_ms);
        while local.restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
            local.restarts.pop_front();
        }
        let mut failed = false;
        for (i, r) in g.spec.resources.iter().enumerate() {
            let cx = Ctx { dir: &dir, node: &node_name, group: &g.name, epoch, guard: &self.guard };
            let mut outcome = step(&mut local.slots[i], r, cx, now).await;
            if matches!(outcome, Step::Spawned) {
                // On record before anything runs that the watchdog would
                // have to undo.
                let rec = local.record(&g.name, &node_name);
                match self.run.write_record(&rec) {
                    Ok(()) => {
                        self.written.insert(g.name.clone(), rec);
                    }
                    Err(e) => tracing::error!(group = %g.name, "cannot record what runs here: {e}"),
                }
                if let Err(e) = self.run.ensure_watchdog() {
                    tracing::error!("cannot start the watchdog: {e}");
                }
                outcome = step(&mut local.slots[i], r, cx, now).await;
            }
            match outcome {
                Step::Up => continue,
                // Resources start in order: the next one waits for this one.
                Step::Pending | Step::Spawned => break,
                Step::Failed(why) => {
                    tracing::warn!(group = %g.name, resource = %r.name, "resource failed: {why}");
                    local.errors[i] = Some(why);
                    if local.restarts.len() as u32 >= g.spec.max_restarts {
                        failed = true;
                    } else {
                        local.restarts.push_back(now);
                        local.restarted += 1;
                    }
                    break;
                }
            }
        }
        if !failed {
            return None;
        }
        tracing::warn!(group = %g.name, epoch, "failed past its restart threshold: giving it up on this node");
        if let Some(local) = self.groups.remove(&g.name) {
            if let Some(left) = stop_group(local, &dir, &node_name, &g.name, &self.guard).await {
                self.groups.insert(g.name.clone(), left);
            }
        }
        Some(self.reconciler.failed(&g.name, epoch))
    }

    /// Stops everything (agent shutdown).
    pub async fn stop_all(&mut self) {
        for (name, g) in std::mem::take(&mut self.groups) {
            // What could not be stopped stays on record: the watchdog tries
            // again once the lease is released.
            if let Some(left) = stop_group(g, &self.dir, &self.node_name, &name, &self.guard).await {
                self.groups.insert(name, left);
            }
        }
        self.sync_records();
    }
}

enum Step {
    Up,
    /// A script's start action was just spawned: record it, then step again
    /// (a quick action finishes within the same round).
    Spawned,
    Pending,
    Failed(String),
}

/// Where and as what a group's resources run.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    dir: &'a std::path::Path,
    node: &'a str,
    group: &'a str,
    epoch: u64,
    guard: &'a LeaseGuard,
}

impl Ctx<'_> {
    fn action(&self, r: &ResourceSpec, verb: &'static str, deep: bool) -> Action {
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
async fn step(slot: &mut Slot, r: &ResourceSpec, cx: Ctx<'_>, now: Instant) -> Step {
    let Ctx { dir, node, group, epoch, guard } = cx;
    let monitor_every = Duration::from_millis(r.monitor.interval_ms);
    let up = |now: Instant| Slot::Up {
        next_monitor: now + monitor_every,
        next_deep: r.deep_monitor.as_ref().map(|d| now + Duration::from_millis(d.interval_ms)),
    };
    let spawn_action = |verb: &'static str, deep: bool| tokio::spawn(cx.action(r, verb, deep).run());
    match std::mem::replace(slot, Slot::Idle) {
        // The lease may have run out while this round ran (a stall): start
        // nothing then.
        Slot::Idle if !guard.lease_valid() => Step::Pending,
        Slot::Idle => match &r.kind {
            ResourceKind::Process { .. } => match spawn_process(dir, node, group, epoch, r) {
                Ok(p) => {
                    guard.register(p.pid);
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
                let _ = killpg(Pid::from_raw(p.pid), Signal::SIGKILL);
                guard.unregister(p.pid);
                Step::Failed(why)
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
        Slot::Up { next_monitor, next_deep } => {
            if next_deep.is_some_and(|t| now >= t) {
                *slot = Slot::Monitoring { task: spawn_action("monitor", true), deep: true, next_deep };
            } else if now >= next_monitor {
                *slot = Slot::Monitoring { task: spawn_action("monitor", false), deep: false, next_deep };
            } else {
                *slot = Slot::Up { next_monitor, next_deep };
            }
            Step::Up
        }
        Slot::Monitoring { task, deep, next_deep } if !task.is_finished() => {
            *slot = Slot::Monitoring { task, deep, next_deep };
            Step::Up
        }
        Slot::Monitoring { task, deep, next_deep } => match task.await.unwrap_or_else(|e| Err(e.to_string())) {
            Ok(0) => {
                let next_deep = match (deep, &r.deep_monitor) {
                    (true, Some(d)) => Some(now + Duration::from_millis(d.interval_ms)),
                    _ => next_deep,
                };
                *slot = Slot::Up { next_monitor: now + monitor_every, next_deep };
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

fn describe(r: ActionResult) -> String {
    match r {
        Ok(OCF_NOT_RUNNING) => "not running (7)".into(),
        Ok(code) => format!("exit code {code}"),
        Err(e) => e,
    }
}

/// One action of a script agent or of the built-in vip, owned so that it
/// can run as a task of its own.
struct Action {
    dir: PathBuf,
    node: String,
    group: String,
    epoch: u64,
    r: ResourceSpec,
    verb: &'static str,
    deep: bool,
    /// The data plane, for volume resources (none in the watchdog: a dead
    /// agent's exports died with it).
    volumes: Option<std::sync::Arc<crate::volume::manager::VolumeManager>>,
}

impl Action {
    fn timeout(&self) -> Duration {
        let r = &self.r;
        Duration::from_millis(match self.verb {
            "start" => r.start_timeout_ms,
            "stop" => r.stop_timeout_ms,
            _ => r.deep_monitor.as_ref().filter(|_| self.deep).unwrap_or(&r.monitor).timeout_ms,
        })
    }

    /// The command, with the OCF environment.
    fn command(&self) -> std::io::Result<Command> {
        let (r, verb) = (&self.r, self.verb);
        let mut cmd = match &r.kind {
            ResourceKind::Exec { path } => {
                let mut c = Command::new(path);
                c.arg(verb);
                c
            }
            ResourceKind::Ocf { agent, params } => {
                let (provider, kind) = agent.split_once(':').unwrap_or(("heartbeat", agent));
                let mut c = Command::new(format!("{OCF_ROOT}/resource.d/{provider}/{kind}"));
                // Each agent keeps its agents' runtime state apart (several
                // agents may share a host in tests; it is cleared at agent
                // start, as /run is at boot).
                let rsctmp = self.dir.join("ocf-run");
                std::fs::create_dir_all(&rsctmp)?;
                c.arg(verb)
                    .env("HA_RSCTMP", &rsctmp)
                    .env("OCF_ROOT", OCF_ROOT)
                    .env("OCF_FUNCTIONS_DIR", format!("{OCF_ROOT}/lib/heartbeat"))
                    .env("OCF_RESOURCE_INSTANCE", format!("{}-{}", self.group, r.name))
                    .env("OCF_RESOURCE_TYPE", kind)
                    .env("OCF_RESOURCE_PROVIDER", provider);
                for (k, v) in params {
                    c.env(format!("OCF_RESKEY_{k}"), v);
                }
                c
            }
            ResourceKind::Systemd { unit } => {
                let mut c = Command::new("systemctl");
                match verb {
                    "monitor" => c.args(["is-active", "--quiet", unit]),
                    _ => c.args([verb, unit]),
                };
                c
            }
            other => return Err(std::io::Error::other(format!("{} is not a script agent", other.type_name()))),
        };
        if self.deep {
            cmd.env("OCF_CHECK_LEVEL", "20");
        }
        cmd.env("OCF_RESKEY_CRM_meta_timeout", self.timeout().as_millis().to_string());
        prepare(&mut cmd, &self.dir, &self.node, &self.group, self.epoch, r, None, true)?;
        Ok(cmd)
    }

    /// A volume: start promotes this node's replica under the group's epoch
    /// and exports it, stop demotes it, monitor checks it still serves.
    async fn volume(&self, nbd_tcp: bool) -> ActionResult {
        let name = &self.r.name;
        let Some(volumes) = &self.volumes else {
            // The watchdog, after the agent died: its exports died with it.
            return Ok(0);
        };
        match self.verb {
            "start" => {
                let socket = self.dir.join("run").join("nbd").join(format!("{name}.sock"));
                match volumes.promote(name, self.epoch, nbd_tcp, &socket).await {
                    Ok(uri) => {
                        tracing::info!(group = %self.group, volume = %name, epoch = self.epoch, %uri, "volume promoted and exported");
                        Ok(0)
                    }
                    Err(e) => Err(format!("promote: {e}")),
                }
            }
            "stop" => volumes.demote(name).await.map(|_| 0).map_err(|e| format!("demote: {e}")),
            _ => Ok(if volumes.is_primary(name).await { 0 } else { OCF_NOT_RUNNING }),
        }
    }

    /// Runs the action to its end, within its timeout.
    async fn run(self) -> ActionResult {
        let (timeout, verb) = (self.timeout(), self.verb);
        if let ResourceKind::Volume(v) = &self.r.kind {
            let run = self.volume(v.nbd_tcp);
            return match tokio::time::timeout(timeout, run).await {
                Ok(r) => r,
                Err(_) => Err(format!("{verb} timed out after {timeout:?}")),
            };
        }
        if let ResourceKind::Vip { address, interface, backup_interfaces } = &self.r.kind {
            return match tokio::time::timeout(timeout, vip::action(verb, address, interface, backup_interfaces)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{verb} timed out after {timeout:?}")),
            };
        }
        let mut child = self.command().and_then(|mut c| c.spawn()).map_err(|e| format!("{verb}: {e}"))?;
        let pgid = child.id().map(|p| p as i32);
        let systemd_monitor = matches!(self.r.kind, ResourceKind::Systemd { .. }) && verb == "monitor";
        match tokio::time::timeout(timeout, child.wait()).await {
            // `systemctl is-active` answers 0 or "not active" (3, or 4 for
            // an unknown unit): OCF's "not running".
            Ok(Ok(status)) if systemd_monitor && status.code() != Some(0) => Ok(OCF_NOT_RUNNING),
            Ok(Ok(status)) => Ok(status.code().unwrap_or(-1)),
            Ok(Err(e)) => Err(format!("{verb}: {e}")),
            Err(_) => {
                if let Some(pg) = pgid {
                    let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
                }
                let _ = child.wait().await;
                Err(format!("{verb} timed out after {timeout:?}"))
            }
        }
    }
}

/// What every resource command gets: tandem's environment, its own process
/// group, output to the resource's log; and, for a script's action (not for
/// a resource process, which must outlive an agent restart), death with the
/// agent.
#[allow(clippy::too_many_arguments)]
fn prepare(
    cmd: &mut Command,
    dir: &std::path::Path,
    node: &str,
    group: &str,
    epoch: u64,
    r: &ResourceSpec,
    cwd: Option<&str>,
    die_with_agent: bool,
) -> std::io::Result<()> {
    let logs = dir.join("groups").join(group);
    std::fs::create_dir_all(&logs)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{}.log", r.name)))?;
    // systemd's notification socket is the agent's, not its resources'.
    cmd.env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("TANDEM_GROUP", group)
        .env("TANDEM_RESOURCE", &r.name)
        .env("TANDEM_EPOCH", epoch.to_string())
        .env("TANDEM_NODE", node)
        .current_dir(cwd.map(PathBuf::from).unwrap_or(logs))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    if !die_with_agent {
        return Ok(());
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn spawn_process(
    dir: &std::path::Path,
    node: &str,
    group: &str,
    epoch: u64,
    r: &ResourceSpec,
) -> std::io::Result<Running> {
    let ResourceKind::Process { command, env, cwd } = &r.kind else {
        return Err(std::io::Error::other(format!("{} is not a process", r.kind.type_name())));
    };
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).envs(env);
    prepare(&mut cmd, dir, node, group, epoch, r, cwd.as_deref(), false)?;
    let child = cmd.spawn()?;
    let pid = child.id().map(|p| p as i32).ok_or_else(|| std::io::Error::other("child exited at once"))?;
    // Our unreaped child: its /proc entry stays until we wait for it.
    let start_time = rundir::proc_start_time(pid).unwrap_or(0);
    tracing::info!(group, resource = %r.name, pid, epoch, "resource started");
    Ok(Running { child: Some(child), pid, start_time })
}

/// Stops resources in reverse order: a process gets SIGTERM to its process
/// group and SIGKILL after the stop timeout; a script agent runs `stop`.
/// A group whose stop failed comes back: it may still run, so it stays here
/// (blocked: not reported stopped) and its stop is tried again later.
async fn stop_group(
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
async fn stop_slots(resources: &[ResourceSpec], slots: Vec<Slot>, cx: Ctx<'_>) -> (Vec<Slot>, Vec<(usize, String)>) {
    let n = slots.len();
    let mut left: Vec<Slot> = (0..n).map(|_| Slot::Idle).collect();
    let mut errors = Vec::new();
    for (i, (r, slot)) in resources.iter().zip(slots).enumerate().rev() {
        let failed = match slot {
            Slot::Idle => None,
            Slot::Process(mut p) => {
                let _ = killpg(Pid::from_raw(p.pid), Signal::SIGTERM);
                let timeout = Duration::from_millis(r.stop_timeout_ms);
                if tokio::time::timeout(timeout, p.wait()).await.is_err() {
                    tracing::warn!(resource = %r.name, "did not stop within {timeout:?}: killing it");
                }
                // Whatever is left of its process group goes too.
                let _ = killpg(Pid::from_raw(p.pid), Signal::SIGKILL);
                p.wait().await;
                cx.guard.unregister(p.pid);
                None
            }
            Slot::Starting(t) | Slot::Monitoring { task: t, .. } | Slot::Recovering(t) => {
                let _ = t.await;
                script_stop(cx, r).await
            }
            Slot::Up { .. } => script_stop(cx, r).await,
        };
        if let Some(e) = failed {
            left[i] = Slot::Up { next_monitor: Instant::now() + Duration::from_secs(3600), next_deep: None };
            errors.push((i, e));
        }
    }
    (left, errors)
}

/// A script resource's stop action, for the watchdog process.
pub(crate) async fn stop_action(
    dir: &std::path::Path,
    node: &str,
    group: &str,
    epoch: u64,
    r: &ResourceSpec,
) -> ActionResult {
    let guard = LeaseGuard::default();
    Ctx { dir, node, group, epoch, guard: &guard }.action(r, "stop", false).run().await
}

/// Runs a script resource's stop; the failure, if any.
async fn script_stop(cx: Ctx<'_>, r: &ResourceSpec) -> Option<String> {
    match cx.action(r, "stop", false).run().await {
        Ok(0) => None,
        other => {
            let why = describe(other);
            tracing::error!(group = cx.group, resource = %r.name, "stop failed: {why}");
            Some(why)
        }
    }
}

/// The built-in virtual IP: `ip addr add` on the first interface whose link
/// is up (the primary, else a backup: local recovery before failover),
/// gratuitous ARP so that clients and switches re-learn the MAC at once,
/// `ip addr del` on stop. Monitor: the address is on an interface that is up.
pub mod vip {
    use super::ActionResult;
    use tokio::process::Command;

    async fn run(program: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(program).args(args).output().await.map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Carrier, not just the administrative flag: a pulled cable leaves
    /// the interface UP but without LOWER_UP.
    async fn link_up(iface: &str) -> bool {
        run("ip", &["-o", "link", "show", "dev", iface]).await.is_ok_and(|o| o.contains("LOWER_UP"))
    }

    /// Interfaces (of `candidates`) that carry `address` now.
    pub async fn holders(address: &str, candidates: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for i in candidates {
            if run("ip", &["-o", "addr", "show", "dev", i])
                .await
                .is_ok_and(|o| o.split_whitespace().any(|w| w == address))
            {
                out.push(i.to_string());
            }
        }
        out
    }

    pub async fn action(verb: &str, address: &str, interface: &str, backups: &[String]) -> ActionResult {
        let all: Vec<&str> = std::iter::once(interface).chain(backups.iter().map(String::as_str)).collect();
        let ip = address.split('/').next().unwrap_or(address);
        match verb {
            "start" => {
                let mut target = None;
                for i in &all {
                    if link_up(i).await {
                        target = Some(*i);
                        break;
                    }
                }
                let Some(target) = target else { return Err(format!("no interface of {all:?} is up")) };
                // Each `ip` costs a few milliseconds on a failover's path:
                // look at the backups only when there are some.
                if all.len() > 1 {
                    for held in holders(address, &all).await.into_iter().filter(|h| h != target) {
                        let _ = run("ip", &["addr", "del", address, "dev", &held]).await;
                    }
                }
                // `replace` adds the address, or keeps it if already there.
                run("ip", &["addr", "replace", address, "dev", target]).await?;
                // Gratuitous ARP, in the background: the address serves at once,
                // the announcements (two, a second apart) follow. A missing
                // arping is reported, not fatal: clients then re-learn the MAC
                // when their ARP cache expires.
                let (iface, ip) = (target.to_string(), ip.to_string());
                let address = address.to_string();
                tokio::spawn(async move {
                    if let Err(e) = run("arping", &["-U", "-c", "2", "-w", "2", "-I", &iface, &ip]).await {
                        tracing::warn!(address, interface = iface, "gratuitous ARP not sent: {e}");
                    }
                });
                Ok(0)
            }
            "stop" => {
                for held in holders(address, &all).await {
                    run("ip", &["addr", "del", address, "dev", &held]).await?;
                }
                Ok(0)
            }
            _ => {
                let held = holders(address, &all).await;
                match held.first() {
                    None => Ok(super::OCF_NOT_RUNNING),
                    Some(i) if link_up(i).await => Ok(0),
                    // Its link is down: fail, so that the restart moves it to
                    // a backup interface (or the group to another node).
                    Some(_) => Ok(1),
                }
            }
        }
    }
}
