//! `--workload postgres`: PostgreSQL on a synchronously replicated volume
//! behind a virtual IP (`tandem_testkit::postgres::group_definition`), and
//! bank clients (`tandem_testkit::bank`) in this process's namespace (the
//! client's leg on the first path's network) moving money through that
//! address while the nemesis injects faults.
//!
//! Each round: clients start, a fault is injected and healed, the cluster
//! is healthy again, the clients stop, the database is read through the
//! virtual IP and the checker judges the whole history so far. It records
//! per round the outage the clients saw (fault → first acknowledged
//! COMMIT). Only the checker's findings are violations, never timings.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tandem_testkit::bank::{self, check, Clients, Config, Shared, State};
use tandem_testkit::postgres;
use tandem_testkit::sites::Site;

use crate::checker::{percentile, Violation};
use crate::{chosen_kinds, fault_kinds, fault_round, ms, pick_fault, Args, Fault, Rng, Run};

/// The PostgreSQL group, and its volume (as `group_definition` names it).
pub const GROUP: &str = "pg";
pub const VOLUME: &str = "data";
/// The volume's size: room for the data directory and its WAL.
const SIZE: &str = "384MiB";
/// Each host's data directory (a tmpfs; the volume's backing file lives
/// there): the volume plus the agent's own state.
pub const DATA_DIR_MIB: u32 = 512;
/// The virtual IP's host number on the first path's network.
const VIP_HOST: u8 = 100;
/// How long the clients run before each fault (traffic to interrupt).
const WARM_UP: Duration = Duration::from_secs(1);
/// How soon after the cluster is healthy again a transfer must commit.
const SERVED_WITHIN: Duration = Duration::from_secs(60);

/// The fault kinds that mean something to a database on a volume: every
/// kind but `Corrupt` (it flips blocks of the standard workload's volume)
/// and `DiskFull` (it fills the agents' data directory, where this
/// volume's backing files live, not the database's file system).
fn kinds(sites: bool) -> Vec<Fault> {
    fault_kinds(sites).into_iter().filter(|k| !matches!(k, Fault::Corrupt | Fault::DiskFull)).collect()
}

/// What one round's check saw of the clients.
struct Seen {
    fault: String,
    moved: bool,
    /// Fault → first acknowledged COMMIT.
    first_commit_ms: Option<u64>,
    /// The longest time without an acknowledged COMMIT after the fault.
    longest_gap_ms: Option<u64>,
}

pub async fn run(
    args: &Args,
    mut run: Run,
    tmp: tempfile::TempDir,
    seed: u64,
    interrupted: Arc<AtomicBool>,
) -> anyhow::Result<usize> {
    let postmaster = std::path::Path::new(postgres::BIN).join("postgres");
    if !postmaster.exists() {
        bail!("--workload postgres needs PostgreSQL 15 at {} (apt-get install postgresql)", postgres::BIN);
    }
    // PostgreSQL runs as `postgres`: it must reach its mount point.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let mountpoint = tmp.path().join("pg");
    std::fs::create_dir_all(&mountpoint)?;
    let vip = run.topo.addr(VIP_HOST, 0);
    let nodes: Vec<&str> = run.hosts.iter().filter(|h| h.site != Site::Witness).map(|h| h.name.as_str()).collect();
    let mountpoint_s = mountpoint.to_str().context("the temporary directory's path is not UTF-8")?;
    let group = postgres::group_definition(&nodes, &format!("{vip}/24"), "eth0", mountpoint_s, SIZE, "sync");
    let url = format!("{}/v1/groups/{GROUP}", run.hosts[0].url());
    let resp = run.client.put(&url).json(&group).timeout(Duration::from_secs(10)).send().await?;
    if !resp.status().is_success() {
        bail!("the PostgreSQL group was not accepted: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    // The first start makes the file system and the database cluster.
    if !run.wait_healthy(Duration::from_secs(180)).await {
        let g = run.any(&format!("/v1/groups/{GROUP}")).await.unwrap_or_default();
        let kept = tmp.keep();
        bail!("the PostgreSQL group did not become healthy: {g} (agent logs: {}/n*/agent.log)", kept.display());
    }
    let cfg = Config::new(bank::target(&vip, postgres::PORT)?);
    let initial = bank::setup(&cfg, Instant::now() + Duration::from_secs(120)).await?;
    println!("bank: {} accounts of {} at {}, {} clients", cfg.accounts, cfg.initial_balance, cfg.target, cfg.clients);

    let t0 = Instant::now();
    run.t0 = t0;
    let shared = Shared::new(t0);
    let kinds = chosen_kinds(args, kinds(args.sites))?;
    let mut rng = Rng(seed.max(1));
    let (mut timeline, mut violations, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    let mut reported = std::collections::BTreeSet::new();
    let mut last_state: Option<State> = None;
    let mut round = 0u32;
    let mut down_before = false;
    let deadline = args.duration.map(|d| t0 + Duration::from_secs(d));
    while !interrupted.load(Ordering::SeqCst) {
        match deadline {
            Some(d) if Instant::now() >= d => break,
            None if round >= args.rounds => break,
            _ => {}
        }
        let clients = Clients::start(cfg.clone(), None, shared.clone(), seed.wrapping_add(round as u64));
        tokio::time::sleep(WARM_UP).await;
        let fault = pick_fault(&kinds, round, &mut rng);
        let before = run.any(&format!("/v1/groups/{GROUP}")).await;
        let (mut entry, found) = fault_round(&mut run, round, fault, &mut rng, t0).await?;
        violations.extend(found);
        // The clients run on until one of them commits after the cluster
        // is whole again: the round's outage as they see it is over.
        let whole_ms = t0.elapsed().as_millis() as u64;
        let served = Instant::now() + SERVED_WITHIN;
        while check::first_commit_after(&shared.history(), whole_ms).is_none() && Instant::now() < served {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let unavailable = check::first_commit_after(&shared.history(), whole_ms).is_none();
        if unavailable {
            diagnose(&run, round);
            violations.push(Violation {
                kind: "bank unavailable".into(),
                t_ms: t0.elapsed().as_millis() as u64,
                detail: format!(
                    "no transfer committed within {} s of the cluster being healthy after {fault:?}",
                    SERVED_WITHIN.as_secs()
                ),
            });
        }
        let after = run.any(&format!("/v1/groups/{GROUP}")).await;
        let node_of = |g: &Option<Value>| g.as_ref().and_then(|g| g["node"].as_str().map(str::to_string));
        let moved = node_of(&before) != node_of(&after);
        tokio::task::spawn_blocking(move || clients.stop()).await.context("stopping the bank clients")??;
        let end_ms = t0.elapsed().as_millis() as u64;
        let fault_ms = entry["t_ms"].as_u64().unwrap_or(0);
        let history = shared.history();
        let first_commit_ms = check::first_commit_after(&history, fault_ms);
        let longest_gap_ms = check::longest_gap(&history, fault_ms, end_ms);
        let commits = history
            .iter()
            .filter(|o| matches!(o, bank::Op::Transfer { outcome: bank::Outcome::Ok, answer_ms, .. } if *answer_ms >= fault_ms))
            .count();
        println!(
            "           bank: {commits} commits after the fault; the first begun after it {} ms after it, longest gap {} ms; group {} → {}",
            ms(first_commit_ms),
            ms(longest_gap_ms),
            node_of(&before).as_deref().unwrap_or("-"),
            node_of(&after).as_deref().unwrap_or("-"),
        );
        entry["bank"] = json!({
            "commits_after_fault": commits,
            "first_commit_ms": first_commit_ms,
            "longest_gap_ms": longest_gap_ms,
            "group_moved": moved,
            "from": node_of(&before),
            "to": node_of(&after),
        });
        seen.push(Seen { fault: format!("{fault:?}"), moved, first_commit_ms, longest_gap_ms });
        timeline.push(entry);

        // The whole history so far, against the database now.
        match bank::read_state(&cfg, Instant::now() + Duration::from_secs(90)).await {
            Ok(state) => {
                let mut found = check::check(&initial, &history, &state);
                if let Some(prev) = &last_state {
                    found.extend(check::vanished(prev, &state));
                }
                for v in found {
                    // A loss stays a loss in every later round: report it once.
                    if reported.insert((v.kind, v.detail.clone())) {
                        println!("           VIOLATION: {v}");
                        violations.push(Violation { kind: v.kind.name().into(), t_ms: v.t_ms, detail: v.detail });
                    }
                }
                last_state = Some(state);
            }
            Err(e) => violations.push(Violation {
                kind: "bank unreadable".into(),
                t_ms: t0.elapsed().as_millis() as u64,
                detail: format!("after round {round} ({fault:?}), healthy: {e:#}"),
            }),
        }
        round += 1;
        // Two rounds in a row without the bank coming back: the cluster
        // gave the group up; more faults would only repeat that finding.
        if unavailable && down_before {
            println!("           the bank did not come back for two rounds: ending the run");
            break;
        }
        down_before = unavailable;
    }

    violations.extend(run.exit_violations());
    let history = shared.history();
    let counts = last_state.as_ref().map(|s| check::counts(&history, s)).unwrap_or_default();
    let figures = |pick: &dyn Fn(&Seen) -> Option<u64>, only_moved: bool| {
        let v: Vec<u64> = seen.iter().filter(|s| !only_moved || s.moved).filter_map(pick).collect();
        json!({"count": v.len(), "p50": percentile(&v, 50), "p99": percentile(&v, 99), "max": v.iter().max()})
    };
    let first = |s: &Seen| s.first_commit_ms;
    let gap = |s: &Seen| s.longest_gap_ms;
    let mut by_fault = serde_json::Map::new();
    for kind in seen.iter().map(|s| s.fault.clone()).collect::<std::collections::BTreeSet<_>>() {
        let v: Vec<u64> = seen.iter().filter(|s| s.fault == kind).filter_map(first).collect();
        let moved = seen.iter().filter(|s| s.fault == kind && s.moved).count();
        by_fault.insert(
            kind,
            json!({"rounds": v.len(), "group_moved": moved, "p50": percentile(&v, 50), "p99": percentile(&v, 99), "max": v.iter().max()}),
        );
    }
    let failovers = seen.iter().filter(|s| s.moved).count();
    let report = json!({
        "seed": seed,
        "nodes": run.hosts.len(),
        "workload": "postgres",
        "rounds": round,
        "faults": timeline,
        "workloads": {"bank": {
            "accounts": cfg.accounts,
            "total": initial.iter().sum::<i64>(),
            "clients": cfg.clients,
            "transfers_ok": counts.ok,
            "transfers_declined": counts.declined,
            "transfers_failed": counts.failed,
            "transfers_unknown": counts.unknown,
            "unknown_made": counts.unknown_present,
            "reads": counts.reads,
            "rows_at_end": last_state.as_ref().map(|s| s.transfers.len()),
        }},
        "failovers": failovers,
        "client_failover_ms": figures(&first, true),
        "client_first_commit_ms": figures(&first, false),
        "client_longest_gap_ms": figures(&gap, false),
        "client_first_commit_ms_by_fault": by_fault,
        "violations": violations,
    });
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;

    let p = |v: &Value, k: &str| ms(v[k].as_u64());
    let (fo, gaps) = (&report["client_failover_ms"], &report["client_longest_gap_ms"]);
    println!("\nseed {seed}: {round} fault rounds, {failovers} with the group moved");
    println!(
        "bank: {} transfers committed, {} declined, {} failed, {} unknown ({} of them made), {} reads",
        counts.ok, counts.declined, counts.failed, counts.unknown, counts.unknown_present, counts.reads
    );
    println!(
        "client-seen failover (fault → first COMMIT, group moved): p50 {} ms, p99 {} ms, max {} ms",
        p(fo, "p50"),
        p(fo, "p99"),
        p(fo, "max")
    );
    println!(
        "longest time without a COMMIT after a fault (all rounds): p50 {} ms, p99 {} ms, max {} ms",
        p(gaps, "p50"),
        p(gaps, "p99"),
        p(gaps, "max")
    );
    for (kind, v) in &by_fault {
        println!(
            "  after {kind}: {} rounds ({} moved), first COMMIT p50 {} ms, max {} ms",
            v["rounds"],
            v["group_moved"],
            p(v, "p50"),
            p(v, "max")
        );
    }
    for v in &violations {
        println!("VIOLATION at {} ms: {}: {}", v.t_ms, v.kind, v.detail);
    }
    println!("report: {}", args.report.display());
    if args.keep || !violations.is_empty() {
        // The resources' own logs (PostgreSQL's among them) live in the
        // data directories, tmpfs mounts that go with the run.
        for h in &run.hosts {
            let _ =
                Command::new("cp").arg("-r").arg(h.dir.join("data").join("groups")).arg(h.dir.join("groups")).status();
        }
        let kept = tmp.keep();
        println!("agent logs: {}/n*/agent.log", kept.display());
    }
    println!("violations: {}", violations.len());
    drop(run);
    Ok(violations.len())
}

/// For the post-mortem of a bank that stopped serving: each host's tandem
/// mounts (in its agent's mount namespace), loop devices, and every
/// process in its network namespace with its state and where it waits,
/// written next to its agent's log.
fn diagnose(run: &Run, round: u32) {
    let losetup = Command::new("losetup").arg("-a").output().map(|o| o.stdout).unwrap_or_default();
    for h in &run.hosts {
        let mut text = format!("after round {round}\n-- losetup -a\n{}", String::from_utf8_lossy(&losetup));
        if let Some(c) = &h.child {
            let pid = c.id().to_string();
            let out =
                Command::new("nsenter").args(["--target", &pid, "--mount", "cat", "/proc/self/mountinfo"]).output();
            let mounts = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            text += "-- tandem mounts in the agent's mount namespace\n";
            let top = h.dir.parent().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
            for l in mounts.lines().filter(|l| l.contains(&top) && !l.contains("tandem-chaos")) {
                text += &format!("{l}\n");
            }
        }
        text += "-- processes: pid state wchan cmdline\n";
        for pid in tandem_testkit::netns_members(&h.ns) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().next()).unwrap_or("?");
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            text += &format!("{pid} {state} {wchan} {}\n", cmd.chars().take(160).collect::<String>());
        }
        let _ = std::fs::write(h.dir.join(format!("diagnosis-round{round}.txt")), text);
    }
}
