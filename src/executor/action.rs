//! How a resource action runs: the command of a script agent (`exec`,
//! `ocf`, `systemd`), the built-in `vip`, a volume's promote/demote, each
//! within its timeout, in its own process group, with tandem's environment
//! and its output in the resource's log; and a resource process's spawn.

use super::*;

/// One action of a script agent or of the built-in vip, owned so that it
/// can run as a task of its own.
pub(super) struct Action {
    pub(super) dir: PathBuf,
    pub(super) node: String,
    pub(super) group: String,
    pub(super) epoch: u64,
    pub(super) r: ResourceSpec,
    pub(super) verb: &'static str,
    pub(super) deep: bool,
    /// The data plane, for volume resources (none in the watchdog: a dead
    /// agent's exports died with it).
    pub(super) volumes: Option<std::sync::Arc<crate::volume::manager::VolumeManager>>,
}

impl Action {
    pub(super) fn timeout(&self) -> Duration {
        let r = &self.r;
        Duration::from_millis(match self.verb {
            "start" => r.start_timeout_ms,
            "stop" => r.stop_timeout_ms,
            _ => r.deep_monitor.as_ref().filter(|_| self.deep).unwrap_or(&r.monitor).timeout_ms,
        })
    }

    /// The command, with the OCF environment.
    pub(super) fn command(&self) -> std::io::Result<Command> {
        let (r, verb) = (&self.r, self.verb);
        let mut cmd = match &r.kind {
            ResourceKind::Exec { path, .. } => {
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
    pub(super) async fn volume(&self, nbd_tcp: bool) -> ActionResult {
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
    pub(super) async fn run(self) -> ActionResult {
        let (timeout, verb) = (self.timeout(), self.verb);
        if let ResourceKind::Volume(v) = &self.r.kind {
            let run = self.volume(v.nbd_tcp);
            return match tokio::time::timeout(timeout, run).await {
                Ok(r) => r,
                Err(_) => Err(format!("{verb} timed out after {timeout:?}")),
            };
        }
        if let ResourceKind::Filesystem(f) = &self.r.kind {
            let run = filesystem::action(verb, self.deep, f, &self.dir, &self.group, &self.r.name);
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
        // Dropped unfinished (a stop cancels a monitor in flight): its whole
        // process group goes too, never left running beside the stop.
        let mut cancel = KillGroupOnDrop(pgid);
        let systemd_monitor = matches!(self.r.kind, ResourceKind::Systemd { .. }) && verb == "monitor";
        let waited = tokio::time::timeout(timeout, child.wait()).await;
        cancel.0 = None;
        match waited {
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

/// SIGKILLs a script action's process group when its future is dropped
/// before the action ended.
struct KillGroupOnDrop(Option<i32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pg) = self.0 {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
        }
    }
}

/// What every resource command gets: tandem's environment, its own process
/// group, output to the resource's log; and, for a script's action (not for
/// a resource process, which must outlive an agent restart), death with the
/// agent.
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(
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
    if let Some((user, group)) = r.kind.run_as() {
        let (uid, gid, home) = run_as(user, group).map_err(std::io::Error::other)?;
        cmd.uid(uid).gid(gid).env("HOME", home).env("USER", user).env("LOGNAME", user);
    }
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

/// The uid, gid and home directory of `user` (with `group` as the primary
/// group when given), as this node's user database says.
pub fn run_as(user: &str, group: Option<&str>) -> Result<(u32, u32, PathBuf), String> {
    let u = nix::unistd::User::from_name(user)
        .map_err(|e| format!("looking up user {user}: {e}"))?
        .ok_or_else(|| format!("no user {user} on this node"))?;
    let gid = match group {
        Some(g) => {
            nix::unistd::Group::from_name(g)
                .map_err(|e| format!("looking up group {g}: {e}"))?
                .ok_or_else(|| format!("no group {g} on this node"))?
                .gid
        }
        None => u.gid,
    };
    Ok((u.uid.as_raw(), gid.as_raw(), u.dir))
}

pub(super) fn spawn_process(
    dir: &std::path::Path,
    node: &str,
    group: &str,
    epoch: u64,
    r: &ResourceSpec,
) -> std::io::Result<Running> {
    let ResourceKind::Process { command, env, cwd, .. } = &r.kind else {
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
