//! The watchdog process (`tandem watchdog`): a small separate process
//! started by the agent that outlives a dead or stalled agent. Once the
//! lease deadline in `<data_dir>/run/` passes it kills the recorded
//! processes and runs the recorded script resources' stop actions, because
//! the leader places the groups elsewhere right after that lease (plus a
//! margin). Where a Linux watchdog device is configured it is fed only while
//! the lease holds or nothing runs, so a node whose resources cannot be
//! stopped resets.
//!
//! It never extends a lease and never starts anything.

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock::now_boot_ms;
use crate::rundir::{is_running, Lease, RunDir, RunSlot};

/// The watchdog wakes at the lease's deadline, and at least this often to
/// see the lease extended (and to feed the device).
const POLL_MAX: Duration = Duration::from_millis(200);
/// How soon it looks again while the lease is not held.
const POLL_MIN: Duration = Duration::from_millis(20);
/// How many times the watchdog runs a failing stop action before it gives up
/// (and lets the watchdog device, if any, reset the node).
const STOP_ATTEMPTS: u32 = 3;

/// Kills and stops everything the records name (the lease is gone).
/// Returns the groups whose stop failed.
async fn stop_everything(run: &RunDir, attempts: &mut std::collections::BTreeMap<String, u32>) -> Vec<String> {
    let records = run.records();
    // Processes first, all at once: that is fast and needs nothing.
    for rec in &records {
        for slot in rec.resources.iter().rev() {
            if let RunSlot::Process { pid, start_time } = slot {
                if is_running(*pid, *start_time) {
                    crate::rundir::kill_tree(*pid);
                    eprintln!("watchdog: lease expired: killed process group {pid} of group {}", rec.group);
                }
            }
        }
    }
    let mut failed = Vec::new();
    for rec in records {
        let mut ok = true;
        for (r, slot) in rec.spec.resources.iter().zip(&rec.resources).rev() {
            if *slot != RunSlot::Script {
                continue;
            }
            match crate::executor::stop_action(run.data_dir(), &rec.node, &rec.group, rec.epoch, r).await {
                Ok(0) => eprintln!("watchdog: lease expired: stopped {}/{}", rec.group, r.name),
                other => {
                    ok = false;
                    eprintln!("watchdog: stop of {}/{} failed: {other:?}", rec.group, r.name);
                }
            }
        }
        let n = attempts.entry(rec.group.clone()).or_default();
        *n += 1;
        if ok || *n >= STOP_ATTEMPTS {
            if !ok {
                eprintln!("watchdog: giving up stopping group {} after {n} attempts", rec.group);
                failed.push(rec.group.clone());
            }
            run.remove_record(&rec.group);
            attempts.remove(&rec.group);
        }
    }
    failed
}

/// The Linux watchdog device, fed while the node is safe.
struct Device {
    file: File,
}

impl Device {
    fn open(path: &Path) -> std::io::Result<Device> {
        Ok(Device { file: OpenOptions::new().write(true).open(path)? })
    }

    fn feed(&mut self) {
        let _ = self.file.write_all(b"\0");
    }

    /// "Magic close": a clean exit disarms the device.
    fn disarm(mut self) {
        let _ = self.file.rewind();
        let _ = self.file.write_all(b"V");
    }
}

/// The watchdog process's main loop (`tandem watchdog`). Exits when nothing
/// runs here and no agent holds the lease.
pub async fn run(data_dir: &Path, device: Option<PathBuf>) -> std::io::Result<()> {
    let run = RunDir::new(data_dir, device.clone());
    let Some(mut lock) = run.try_lock()? else {
        return Ok(()); // another watchdog holds this node
    };
    let mut dev = match &device {
        Some(p) => Some(Device::open(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?),
        None => None,
    };
    eprintln!("watchdog: up, pid {}", std::process::id());
    let mut attempts = std::collections::BTreeMap::new();
    // A group that could not be stopped: the device (if any) is no longer fed.
    let mut unsafe_groups: Vec<String> = Vec::new();
    loop {
        let lease = run.read_lease();
        let now = now_boot_ms();
        let held = lease.valid_at(now);
        if !held && run.has_records() {
            unsafe_groups.extend(stop_everything(&run, &mut attempts).await);
        }
        if unsafe_groups.is_empty() {
            if let Some(d) = dev.as_mut() {
                d.feed();
            }
        }
        if !held && !run.has_records() && unsafe_groups.is_empty() {
            // Let go, then look again: an agent that wrote a record and saw
            // our lock just before we let go relies on us.
            drop(lock);
            if run.read_lease().valid_at(now_boot_ms()) && run.has_records() {
                match run.try_lock()? {
                    Some(l) => lock = l,
                    None => break, // a new watchdog took over
                }
            } else {
                break;
            }
        }
        // Sleep to the deadline (the agent extends it meanwhile, or not).
        let wait = match lease {
            Lease::Until(d) if held => Duration::from_millis(d - now).clamp(Duration::from_millis(1), POLL_MAX),
            _ => POLL_MIN,
        };
        tokio::time::sleep(wait).await;
    }
    if let Some(d) = dev {
        d.disarm();
    }
    eprintln!("watchdog: nothing to guard, exiting");
    Ok(())
}
