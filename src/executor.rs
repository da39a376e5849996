//! The node-local executor: makes this node run exactly the groups the
//! replicated state places on it, at their epoch.
//!
//! Each tick it compares the applied state with what runs here: it starts
//! groups placed here (resources in order), stops those asked to stop or
//! placed elsewhere (in reverse order), restarts a crashed resource up to the
//! group's threshold, and reports to the leader what only this node can know
//! ("stopped", "failed"). When this node cannot see a majority of voters for
//! longer than its lease it kills everything it runs, at once: the leader
//! places the groups elsewhere only after that lease (plus a margin) has
//! passed, so a group never runs on two nodes.
//!
//! Resource processes get SIGKILL when the agent dies (PR_SET_PDEATHSIG):
//! a dead agent cannot watch them, so they must not outlive it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tandem_raft::group::{GroupRecord, GroupSpec, Phase, ResourceKind, ResourceSpec};
use tandem_raft::state::{AdminState, ClusterState};
use tandem_raft::NodeId;
use tokio::process::{Child, Command};

/// What this node tells the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The group no longer runs here (it was asked to stop at `epoch`).
    Stopped { group: String, epoch: u64 },
    /// The group failed here past its restart threshold at `epoch`.
    Failed { group: String, epoch: u64 },
}

/// Whether a resource type can run on this version of the agent.
pub fn supported(kind: &ResourceKind) -> bool {
    matches!(kind, ResourceKind::Process { .. })
}

struct Running {
    child: Child,
    pgid: i32,
}

struct LocalGroup {
    epoch: u64,
    spec: GroupSpec,
    /// One slot per resource, in start order.
    procs: Vec<Option<Running>>,
    restarts: VecDeque<Instant>,
}

/// A snapshot of one local group for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStatus {
    pub epoch: u64,
    pub resources: Vec<(String, Option<u32>)>,
    pub restarts: usize,
}

pub struct Executor {
    node_id: NodeId,
    node_name: String,
    dir: PathBuf,
    groups: BTreeMap<String, LocalGroup>,
    /// (group, epoch) that failed here: not restarted, reported until the
    /// leader records it.
    failed: BTreeSet<(String, u64)>,
    fenced: bool,
}

impl Executor {
    pub fn new(node_id: NodeId, node_name: String, dir: PathBuf) -> Executor {
        Executor { node_id, node_name, dir, groups: BTreeMap::new(), failed: BTreeSet::new(), fenced: false }
    }

    pub fn status(&self) -> BTreeMap<String, LocalStatus> {
        self.groups
            .iter()
            .map(|(name, g)| {
                let resources = g
                    .spec
                    .resources
                    .iter()
                    .zip(&g.procs)
                    .map(|(r, p)| (r.name.clone(), p.as_ref().map(|p| p.pgid as u32)))
                    .collect();
                (name.clone(), LocalStatus { epoch: g.epoch, resources, restarts: g.restarts.len() })
            })
            .collect()
    }

    /// Kills every local resource at once (self-fencing).
    pub fn fence(&mut self) {
        if !self.groups.is_empty() {
            tracing::warn!(
                groups = self.groups.len(),
                "no quorum for longer than the lease: killing every local resource"
            );
        }
        for (_, g) in std::mem::take(&mut self.groups) {
            for p in g.procs.into_iter().flatten() {
                let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
            }
        }
        self.fenced = true;
    }

    /// One reconciliation round. `in_quorum` is false once this node has
    /// been out of quorum for longer than its lease.
    pub async fn tick(&mut self, state: &ClusterState, in_quorum: bool) -> Vec<Report> {
        if !in_quorum {
            self.fence();
            return Vec::new();
        }
        if self.fenced {
            tracing::info!("quorum is back: resources may run here again");
            self.fenced = false;
        }
        let me = self.node_id;
        let maintenance = state.nodes.get(&me).is_some_and(|n| n.admin_state == AdminState::Maintenance);
        let mut reports = Vec::new();

        // Stop what must not run here any more.
        let local: Vec<String> = self.groups.keys().cloned().collect();
        for name in local {
            let keep = state
                .groups
                .get(&name)
                .is_some_and(|g| g.placement.node == Some(me) && g.placement.phase == Phase::Started);
            if !keep {
                if let Some(g) = self.groups.remove(&name) {
                    tracing::info!(group = %name, epoch = g.epoch, "stopping");
                    stop_group(g).await;
                }
            }
        }
        self.failed.retain(|(name, epoch)| {
            state.groups.get(name).is_some_and(|g| g.placement.epoch == *epoch && !g.failed_on.contains(&me))
        });

        for g in state.groups.values().filter(|g| g.placement.node == Some(me)) {
            let epoch = g.placement.epoch;
            match g.placement.phase {
                Phase::Stopping | Phase::Stopped => {
                    reports.push(Report::Stopped { group: g.name.clone(), epoch });
                }
                Phase::Started if self.failed.contains(&(g.name.clone(), epoch)) => {
                    reports.push(Report::Failed { group: g.name.clone(), epoch });
                }
                Phase::Started => {
                    if maintenance {
                        continue; // left alone: no start, no monitoring
                    }
                    if let Some(report) = self.run(g).await {
                        reports.push(report);
                    }
                }
            }
        }
        reports
    }

    /// Starts `g` if needed, and restarts crashed resources within the
    /// group's threshold. Returns a failure report past it.
    async fn run(&mut self, g: &GroupRecord) -> Option<Report> {
        let epoch = g.placement.epoch;
        if !self.groups.contains_key(&g.name) {
            tracing::info!(group = %g.name, epoch, "starting");
            let procs = g.spec.resources.iter().map(|_| None).collect();
            self.groups
                .insert(g.name.clone(), LocalGroup { epoch, spec: g.spec.clone(), procs, restarts: VecDeque::new() });
        }
        let (dir, node_name) = (self.dir.clone(), self.node_name.clone());
        let local = self.groups.get_mut(&g.name)?;
        local.epoch = epoch;
        let now = Instant::now();
        let window = Duration::from_millis(g.spec.restart_window_ms);
        while local.restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
            local.restarts.pop_front();
        }
        let mut failed = false;
        for (i, r) in g.spec.resources.iter().enumerate() {
            // Resources start in order: one waits for those before it.
            let exited = match local.procs[i].as_mut() {
                None => None,
                Some(p) => match p.child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) => Some(status.to_string()),
                    Err(e) => Some(e.to_string()),
                },
            };
            if let Some(why) = exited {
                local.procs[i] = None;
                tracing::warn!(group = %g.name, resource = %r.name, "resource exited: {why}");
                if local.restarts.len() as u32 >= g.spec.max_restarts {
                    failed = true;
                    break;
                }
                local.restarts.push_back(now);
            }
            match spawn(&dir, &node_name, &g.name, epoch, r) {
                Ok(p) => local.procs[i] = Some(p),
                Err(e) => {
                    tracing::warn!(group = %g.name, resource = %r.name, "start failed: {e}");
                    if local.restarts.len() as u32 >= g.spec.max_restarts {
                        failed = true;
                        break;
                    }
                    local.restarts.push_back(now);
                    break;
                }
            }
        }
        if !failed {
            return None;
        }
        tracing::warn!(group = %g.name, epoch, "failed past its restart threshold: giving it up on this node");
        if let Some(local) = self.groups.remove(&g.name) {
            stop_group(local).await;
        }
        self.failed.insert((g.name.clone(), epoch));
        Some(Report::Failed { group: g.name.clone(), epoch })
    }

    /// Stops everything (agent shutdown).
    pub async fn stop_all(&mut self) {
        for (_, g) in std::mem::take(&mut self.groups) {
            stop_group(g).await;
        }
    }
}

fn spawn(dir: &std::path::Path, node: &str, group: &str, epoch: u64, r: &ResourceSpec) -> std::io::Result<Running> {
    let ResourceKind::Process { command, env, cwd } = &r.kind else {
        return Err(std::io::Error::other(format!("resource type {} is not supported yet", r.kind.type_name())));
    };
    let logs = dir.join("groups").join(group);
    std::fs::create_dir_all(&logs)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{}.log", r.name)))?;
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .envs(env)
        .env("TANDEM_GROUP", group)
        .env("TANDEM_RESOURCE", &r.name)
        .env("TANDEM_EPOCH", epoch.to_string())
        .env("TANDEM_NODE", node)
        .current_dir(cwd.as_deref().map(PathBuf::from).unwrap_or_else(|| logs.clone()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pgid = child.id().map(|p| p as i32).ok_or_else(|| std::io::Error::other("child exited at once"))?;
    tracing::info!(group, resource = %r.name, pid = pgid, epoch, "resource started");
    Ok(Running { child, pgid })
}

/// Stops resources in reverse order: SIGTERM to the process group, SIGKILL
/// after the stop timeout.
async fn stop_group(g: LocalGroup) {
    for (r, p) in g.spec.resources.iter().zip(g.procs).rev() {
        let Some(mut p) = p else { continue };
        let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGTERM);
        let timeout = Duration::from_millis(r.stop_timeout_ms);
        if tokio::time::timeout(timeout, p.child.wait()).await.is_err() {
            tracing::warn!(resource = %r.name, "did not stop within {timeout:?}: killing it");
        }
        // Whatever is left of its process group goes too.
        let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
        let _ = p.child.wait().await;
    }
}
