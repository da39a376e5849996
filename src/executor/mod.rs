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
            | ResourceKind::Filesystem(_)
    )
}

/// What the lease timer needs to act on a lapse without waiting for the
/// executor (which may be busy stopping or starting something): the lease
/// deadline as the lease core last persisted it (so that nothing starts
/// once it has passed) and the process groups of every running resource
/// process on this node.
#[derive(Debug, Default)]
pub struct LeaseGuard {
    /// Each resource process group, with the group it belongs to.
    pgids: std::sync::Mutex<BTreeMap<i32, String>>,
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

    /// Halts the volume `name` if this node is its primary: its export
    /// fails every request until the executor demotes it.
    pub fn halt_volume(&self, name: &str) {
        if let Some(v) = self.volumes.get() {
            v.halt(name);
        }
    }

    /// Whether any resource process is registered.
    pub fn has_processes(&self) -> bool {
        !self.pgids.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    fn register(&self, pgid: i32, group: &str) {
        self.pgids.lock().unwrap_or_else(|e| e.into_inner()).insert(pgid, group.to_string());
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
        crate::rundir::kill_trees(&all.keys().copied().collect::<Vec<_>>());
        all.len()
    }

    /// SIGKILLs the process groups of `groups` and halts their volumes
    /// (`volumes`) at once, without waiting for the executor (which may be
    /// busy stopping something else); the executor tidies up after.
    /// Returns how many process groups.
    pub fn kill_groups(&self, groups: &BTreeSet<String>, volumes: &[String]) -> usize {
        for v in volumes {
            self.halt_volume(v);
        }
        let mut pgids = self.pgids.lock().unwrap_or_else(|e| e.into_inner());
        let doomed: Vec<i32> = pgids.iter().filter(|(_, g)| groups.contains(*g)).map(|(p, _)| *p).collect();
        for p in &doomed {
            pgids.remove(p);
        }
        drop(pgids);
        crate::rundir::kill_trees(&doomed);
        doomed.len()
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

/// One resource as this node sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceStatus {
    pub name: String,
    pub kind: String,
    /// `starting`, `running`, `recovering` (stopping to restart), `stopped`.
    pub state: String,
    pub pid: Option<u32>,
    pub last_error: Option<String>,
    /// A condition worth the operator's attention that is not a failure (a
    /// full file system).
    pub warning: Option<String>,
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
    /// Stops the last lapse left running in the background (script agents,
    /// file systems): nothing starts here before they ended, or a new start
    /// could find a mount still being torn down and run on the bare mount
    /// point.
    lapse_stops: Vec<tokio::task::JoinHandle<ActionResult>>,
    guard: std::sync::Arc<LeaseGuard>,
    /// When stale virtual IPs were last looked for.
    vips_checked: Option<Instant>,
    run: RunDir,
    /// The records as last written, to write only changes.
    written: BTreeMap<String, RunRecord>,
    /// Where what happens to the resources here is told (the event log).
    events: Option<EventHook>,
}

/// Receives the events the executor observes (`resource.failed`,
/// `group.running`, ...); the agent queues them for the event log.
pub type EventHook = std::sync::Arc<dyn Fn(tandem_raft::events::Event) + Send + Sync>;

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
            lapse_stops: Vec::new(),
            guard,
            vips_checked: None,
            run,
            written,
            events: None,
        }
    }

    /// Sends what happens to the resources here to `hook`.
    pub fn set_events(&mut self, hook: EventHook) {
        self.events = Some(hook);
    }

    fn emit(&self, e: tandem_raft::events::Event) {
        if let Some(h) = &self.events {
            h(e);
        }
    }

    /// Writes the records that changed, removes those of groups no longer
    /// here, and makes sure a watchdog guards them.
    fn sync_records(&mut self) {
        for (name, g) in &self.groups {
            if self.written.get(name).is_some_and(|w| g.is_recorded_as(w, name, &self.node_name)) {
                continue;
            }
            let rec = g.record(name, &self.node_name);
            if let Err(e) = self.run.write_record(&rec) {
                tracing::error!(group = %name, "cannot record what runs here: {e}");
                continue;
            }
            self.written.insert(name.clone(), rec);
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

    /// Every group running here: name, epoch, restarts, resource status.
    pub fn statuses(&self) -> Vec<(String, u64, u32, Vec<ResourceStatus>)> {
        self.groups.iter().map(|(n, g)| (n.clone(), g.epoch, g.restarted, g.status())).collect()
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
        for (name, g) in std::mem::take(&mut self.groups) {
            self.kill_group(&name, g);
        }
        self.guard.kill_everything();
        self.lapsed = true;
        self.sync_records();
    }

    /// Kills `g`'s processes at once and runs its script agents' stop
    /// actions in the background (nothing starts here before they end).
    fn kill_group(&mut self, name: &str, g: LocalGroup) {
        let (dir, node) = (self.dir.clone(), self.node_name.clone());
        for (r, slot) in g.spec.resources.iter().zip(g.slots).rev() {
            match slot {
                Slot::Process(p) => {
                    crate::rundir::kill_tree(p.pid);
                    self.guard.unregister(p.pid);
                }
                Slot::Idle => {}
                // A script agent's resource lives outside our processes:
                // its stop action is all we can do (a fence command is
                // what makes this safe; see docs/config.md).
                _ => {
                    if matches!(r.kind, ResourceKind::Volume(_)) {
                        self.guard.halt_volume(&r.name);
                    }
                    let cx = Ctx { dir: &dir, node: &node, group: name, epoch: g.epoch, guard: &self.guard };
                    self.lapse_stops.push(tokio::spawn(cx.action(r, "stop", false).run()));
                }
            }
        }
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
    pub fn wanted_starts(&self, state: &ClusterState, lease: LeaseView, ticket_open: bool) -> Vec<(String, u64)> {
        let local = self.local();
        let none = BTreeSet::new();
        self.reconciler.claims(&self.input(state, &local, &none, lease, ticket_open, now_boot_ms()))
    }

    fn input<'a>(
        &self,
        state: &'a ClusterState,
        local: &'a BTreeMap<String, Local>,
        confirmed: &'a BTreeSet<(String, u64)>,
        lease: LeaseView,
        ticket_open: bool,
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
            ticket_open,
            now_ms,
        }
    }

    /// One reconciliation round: carries out the reconciler's plan. New
    /// starts happen only for the (group, epoch) pairs in `confirmed`.
    pub async fn tick(
        &mut self,
        state: &ClusterState,
        lease: LeaseView,
        ticket_open: bool,
        confirmed: &BTreeSet<(String, u64)>,
    ) -> Vec<Report> {
        let local = self.local();
        let plan = self.reconciler.plan(&self.input(state, &local, confirmed, lease, ticket_open, now_boot_ms()));
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
                reconcile::Command::KillGroup { group } => {
                    let Some(g) = self.groups.remove(&group) else { continue };
                    tracing::warn!(group = %group, epoch = g.epoch, "the site's ticket is not seen held here any more: killing the group");
                    self.kill_group(&group, g);
                    self.emit(
                        tandem_raft::events::Event::new(
                            0,
                            "group.ticket_lost",
                            tandem_raft::events::Severity::Warning,
                            format!(
                                "group {group} was killed on {}: this node no longer sees its site hold the ticket",
                                self.node_name
                            ),
                        )
                        .group(&group),
                    );
                    self.sync_records();
                }
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
                    self.lapse_stops.retain(|h| !h.is_finished());
                    if !self.lapse_stops.is_empty() && !self.groups.contains_key(&group) {
                        tracing::info!(group = %group, "waiting for the stops of the last lapse before starting");
                        continue;
                    }
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
            let keep = local.spec.resources.iter().zip(&g.spec.resources).take_while(|(a, b)| carries_on(a, b)).count();
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
        let mut all_up = true;
        let mut failures = Vec::new();
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
            // Up, and ready: the group runs (`group.running`) once every
            // resource passed its first monitor; the next one starts on
            // this one's start alone, as under Pacemaker.
            all_up &= matches!(outcome, Step::Up) && local.slots[i].ready();
            match outcome {
                Step::Up => continue,
                // Resources start in order: the next one waits for this one.
                Step::Pending | Step::Spawned => break,
                Step::Failed(why) => {
                    tracing::warn!(group = %g.name, resource = %r.name, "resource failed: {why}");
                    failures.push((r.name.clone(), why.clone()));
                    local.errors[i] = Some(why);
                    // What runs above it depends on it (a database on a
                    // file system): it stops too, in reverse order, and
                    // starts again after it.
                    if i + 1 < local.slots.len() {
                        let above: Vec<Slot> = local.slots.drain(i + 1..).collect();
                        let (left, _) = stop_slots(&g.spec.resources[i + 1..], above, cx).await;
                        local.slots.extend(left);
                    }
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
        use tandem_raft::events::{Event, Severity};
        let (restarted, max) = (local.restarted, g.spec.max_restarts);
        let mut events = Vec::new();
        for (resource, why) in failures {
            let what = if failed { "past its restart threshold" } else { "restarting it" };
            events.push(
                Event::new(
                    0,
                    "resource.failed",
                    Severity::Warning,
                    format!("resource {resource} of group {} failed on {node_name}: {why} ({what})", g.name),
                )
                .group(&g.name)
                .resource(&resource)
                .details(serde_json::json!({"error": why, "restarts": restarted, "max_restarts": max})),
            );
            local.recovering = true;
        }
        if all_up && !local.announced {
            local.announced = true;
            local.recovering = false;
            let ms = local.since.elapsed().as_millis() as u64;
            events.push(
                Event::new(0, "group.running", Severity::Info, format!("group {} runs on {node_name}", g.name))
                    .group(&g.name)
                    .details(serde_json::json!({"epoch": epoch, "start_ms": ms})),
            );
        } else if all_up && local.recovering {
            local.recovering = false;
            events.push(
                Event::new(
                    0,
                    "resource.restarted",
                    Severity::Info,
                    format!("group {} runs again on {node_name} after a local restart", g.name),
                )
                .group(&g.name)
                .details(serde_json::json!({"restarts": restarted, "max_restarts": max})),
            );
        }
        if failed {
            events.push(
                Event::new(
                    0,
                    "group.restart_threshold",
                    Severity::Critical,
                    format!(
                        "group {} failed {} times within {}s on {node_name}: given up here",
                        g.name,
                        max + 1,
                        g.spec.restart_window_ms / 1000
                    ),
                )
                .group(&g.name)
                .details(serde_json::json!({"max_restarts": max, "window_ms": g.spec.restart_window_ms})),
            );
        }
        for e in events {
            self.emit(e);
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

mod action;
pub mod filesystem;
mod slot;
pub mod vip;

pub use action::run_as;
pub(crate) use action::stop_action;
use action::*;
use slot::*;

/// Whether a running resource carries on under its new definition `b`: the
/// same, or a volume whose only changes are a larger size (the data plane
/// grows it online, under its application: see `crate::volume::engine`)
/// and its read balancing (applied live by the volume manager).
fn carries_on(a: &ResourceSpec, b: &ResourceSpec) -> bool {
    if a == b {
        return true;
    }
    let (ResourceKind::Volume(x), ResourceKind::Volume(y)) = (&a.kind, &b.kind) else { return false };
    if y.size_bytes() < x.size_bytes() {
        return false;
    }
    let mut grown = a.clone();
    if let ResourceKind::Volume(v) = &mut grown.kind {
        v.size = y.size.clone();
        v.read_balancing = y.read_balancing;
    }
    grown == *b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killing_groups_kills_their_processes_only() {
        use std::os::unix::process::CommandExt;
        let guard = LeaseGuard::new(0);
        let spawn = || std::process::Command::new("sleep").arg("600").process_group(0).spawn().unwrap();
        let (mut bound, mut other) = (spawn(), spawn());
        guard.register(bound.id() as i32, "bound");
        guard.register(other.id() as i32, "other");
        assert_eq!(guard.kill_groups(&BTreeSet::from(["bound".to_string()]), &[]), 1);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(bound.wait().unwrap().signal(), Some(9), "killed");
        std::thread::sleep(Duration::from_millis(50));
        assert!(other.try_wait().unwrap().is_none(), "the other group's process runs on");
        assert!(guard.has_processes());
        assert_eq!(guard.kill_everything(), 1);
        assert_eq!(other.wait().unwrap().signal(), Some(9));
        assert!(!guard.has_processes());
    }

    fn volume(extra: &str) -> ResourceSpec {
        serde_json::from_str(&format!(r#"{{"name": "data", "type": "volume", "size": "1GiB"{extra}}}"#)).unwrap()
    }

    #[test]
    fn a_grown_volume_carries_on_and_any_other_change_restarts() {
        let v = volume("");
        assert!(carries_on(&v, &v));
        // Only the size, larger (however written): kept running.
        let mut grown = volume("");
        if let ResourceKind::Volume(s) = &mut grown.kind {
            s.size = "2048MiB".into();
        }
        assert!(carries_on(&v, &grown));
        // The read balancing too (with the size or not).
        let mut reads = grown.clone();
        if let ResourceKind::Volume(s) = &mut reads.kind {
            s.read_balancing = tandem_raft::volume::ReadBalancing::Striping;
        }
        assert!(carries_on(&v, &reads) && carries_on(&grown, &reads));
        // Smaller, or anything else changed too: restarted.
        assert!(!carries_on(&grown, &v));
        let mut other = grown.clone();
        if let ResourceKind::Volume(s) = &mut other.kind {
            s.rate = Some("10MiB".into());
        }
        assert!(!carries_on(&v, &other));
        let process: ResourceSpec =
            serde_json::from_str(r#"{"name": "data", "type": "process", "command": ["x"]}"#).unwrap();
        assert!(!carries_on(&v, &process));
    }
}
