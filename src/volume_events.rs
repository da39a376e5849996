//! What changed in a volume between two looks of its primary: the events
//! of its replication links (connected, disconnected, split brain
//! detected/resolved), its resyncs (started, finished with bytes and
//! seconds), its online verify (the result), its export growing (an
//! online grow reached every connected replica) and the primary's local
//! read errors (blocks repaired from a peer, or errors left unrepaired).
//!
//! Pure: the caller passes the status and the time; nothing here touches the
//! data plane, a clock or the event queue.

use std::collections::BTreeMap;

use tandem_raft::events::{Event, Severity};

use crate::volume::status::{Connection, ReplicaRole, VerifyState, VolumeStatus};

/// What the last look saw of one volume.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// Per peer: its link, and the resync in flight (start ms, total bytes).
    pub links: BTreeMap<String, (Connection, Option<(u64, u64)>)>,
    /// The verify's state last seen (`running`, `done`, `failed`).
    pub verify: Option<String>,
    /// The exported size last seen.
    pub size: Option<u64>,
    /// The primary's read errors and repaired blocks last seen.
    pub read_errors: u64,
    pub repaired_blocks: u64,
}

fn link_name(c: Connection) -> &'static str {
    match c {
        Connection::Connected => "connected",
        Connection::SyncSource => "sync_source",
        Connection::SyncTarget => "sync_target",
        Connection::Ahead => "ahead",
        Connection::Disconnected => "disconnected",
        Connection::SplitBrain => "split_brain",
    }
}

/// The events between `before` and `now` (a status of this node as the
/// volume's primary), and what to remember for the next look. A first look
/// (`before` empty) reports only trouble: a split brain or a running resync.
pub fn volume_events(before: &Seen, now: &VolumeStatus, group: Option<&str>, now_ms: u64) -> (Seen, Vec<Event>) {
    let mut seen = Seen::default();
    let mut out = Vec::new();
    if now.role != ReplicaRole::Primary {
        return (seen, out);
    }
    let v = now.name.as_str();
    let ev = |kind: &str, sev: Severity, node: &str, msg: String, d: serde_json::Value| {
        let e = Event::new(now_ms, kind, sev, msg).volume(v).node(node).details(d);
        match group {
            Some(g) => e.group(g),
            None => e,
        }
    };
    let first = before.links.is_empty() && before.verify.is_none();
    seen.size = Some(now.size_bytes);
    if let Some(from) = before.size.filter(|from| *from < now.size_bytes) {
        let to = now.size_bytes;
        let mut e = ev(
            "volume.grown",
            Severity::Info,
            "",
            format!("volume {v} grew from {from} to {to} bytes: new connections see the new size"),
            serde_json::json!({"from": from, "to": to}),
        );
        e.node = None;
        out.push(e);
    }
    seen.read_errors = now.read_errors;
    seen.repaired_blocks = now.repaired_blocks;
    // Counters restart with the primary: a drop is a new start, not news.
    let errors = now.read_errors.saturating_sub(before.read_errors);
    let repaired = now.repaired_blocks.saturating_sub(before.repaired_blocks);
    let me = now.replicas.first().map(|r| r.node.as_str()).unwrap_or_default();
    let d = serde_json::json!({"blocks": repaired, "errors": errors, "read_errors": now.read_errors, "repaired_blocks": now.repaired_blocks});
    if repaired > 0 {
        out.push(ev(
            "volume.block_repaired",
            Severity::Warning,
            me,
            format!("volume {v}: {repaired} blocks unreadable on {me} rewritten from a peer's copy"),
            d,
        ));
    } else if errors > 0 {
        out.push(ev(
            "volume.read_error",
            Severity::Warning,
            me,
            format!(
                "volume {v}: {errors} reads failed on {me}'s disk, nothing to repair (served from a peer, or failed)"
            ),
            d,
        ));
    }
    for r in now.replicas.iter().filter(|r| r.role != ReplicaRole::Primary) {
        let peer = r.node.as_str();
        let (was, resync) = before.links.get(peer).cloned().map_or((None, None), |(c, s)| (Some(c), s));
        let mut resync_now = resync;
        if was != Some(r.connection) {
            let from = was.map(link_name);
            let d = serde_json::json!({"from": from, "to": link_name(r.connection), "error": r.last_error});
            match (was, r.connection) {
                (_, Connection::SplitBrain) => out.push(ev(
                    "volume.split_brain",
                    Severity::Critical,
                    peer,
                    format!("split brain on volume {v} with {peer}: both changed since they parted"),
                    d,
                )),
                (Some(Connection::SplitBrain), _) => out.push(ev(
                    "volume.split_brain_resolved",
                    Severity::Info,
                    peer,
                    format!("split brain on volume {v} with {peer} resolved"),
                    d,
                )),
                (_, Connection::Disconnected) if !first => out.push(ev(
                    "volume.disconnected",
                    Severity::Warning,
                    peer,
                    format!("replica of volume {v} on {peer} disconnected"),
                    d,
                )),
                (Some(Connection::Disconnected), Connection::Connected | Connection::SyncSource) => out.push(ev(
                    "volume.connected",
                    Severity::Info,
                    peer,
                    format!("replica of volume {v} on {peer} connected"),
                    d,
                )),
                _ => {}
            }
        }
        match (&r.resync, resync) {
            (Some(s), None) => {
                resync_now = Some((now_ms, s.total_bytes));
                out.push(ev(
                    "volume.resync_started",
                    Severity::Info,
                    peer,
                    format!("resync of volume {v} to {peer} started: {} bytes", s.total_bytes),
                    serde_json::json!({"bytes": s.total_bytes}),
                ));
            }
            (None, Some((start, total))) => {
                resync_now = None;
                let secs = now_ms.saturating_sub(start) as f64 / 1000.0;
                if r.connection == Connection::Connected {
                    out.push(ev(
                        "volume.resync_finished",
                        Severity::Info,
                        peer,
                        format!("resync of volume {v} to {peer} finished: {total} bytes in {secs:.1}s"),
                        serde_json::json!({"bytes": total, "seconds": secs}),
                    ));
                } else {
                    out.push(ev(
                        "volume.resync_stopped",
                        Severity::Warning,
                        peer,
                        format!("resync of volume {v} to {peer} stopped unfinished ({})", link_name(r.connection)),
                        serde_json::json!({"bytes": total, "seconds": secs}),
                    ));
                }
            }
            _ => {}
        }
        seen.links.insert(peer.to_string(), (r.connection, resync_now));
    }
    let verify = now.verify.as_ref().map(|o| match &o.state {
        VerifyState::Running => "running".to_string(),
        VerifyState::Done => "done".to_string(),
        VerifyState::Failed(_) => "failed".to_string(),
    });
    if verify != before.verify && before.verify.as_deref() == Some("running") {
        if let Some(o) = &now.verify {
            let found: u64 = o.found_blocks.values().sum();
            let (kind, sev, msg) = match &o.state {
                VerifyState::Failed(why) => {
                    ("volume.verify_failed", Severity::Warning, format!("verify of {v} stopped: {why}"))
                }
                _ if found > 0 => (
                    "volume.verify_done",
                    Severity::Warning,
                    format!("verify of {v}: {found} blocks differed, resynced"),
                ),
                _ => ("volume.verify_done", Severity::Info, format!("verify of {v}: every replica matches")),
            };
            let d = serde_json::json!({"checked_bytes": o.checked_bytes, "found_blocks": o.found_blocks, "repaired_blocks": o.repaired_blocks});
            out.push(ev(kind, sev, "", msg, d));
            if let Some(e) = out.last_mut() {
                e.node = None;
            }
        }
    }
    seen.verify = verify;
    (seen, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::status::{ReplicaStatus, ResyncStatus, VerifyOutcome};
    use tandem_raft::volume::DiskState;

    fn status(conn: Connection, resync: Option<u64>, verify: Option<VerifyState>) -> VolumeStatus {
        let replica = |node: &str, role, connection| ReplicaStatus {
            node: node.into(),
            role,
            disk: DiskState::UpToDate,
            connection,
            mode: None,
            out_of_sync_bytes: 0,
            resync: None,
            lag_bytes: None,
            last_error: None,
            reads: 0,
        };
        let mut peer = replica("n2", ReplicaRole::Secondary, conn);
        peer.resync = resync.map(|total| ResyncStatus {
            remaining_bytes: total,
            sent_bytes: 0,
            total_bytes: total,
            rate_bytes_per_s: 0,
            eta_s: None,
            target_rate_bytes_per_s: None,
        });
        VolumeStatus {
            name: "data".into(),
            role: ReplicaRole::Primary,
            size_bytes: 1 << 20,
            nbd: None,
            replicas: vec![replica("n1", ReplicaRole::Primary, Connection::Connected), peer],
            generation: Default::default(),
            newest_write_ms: None,
            read_balancing: Default::default(),
            read_errors: 0,
            repaired_blocks: 0,
            verify: verify.map(|state| VerifyOutcome {
                state,
                checked_bytes: 1 << 20,
                found_blocks: BTreeMap::from([("n2".to_string(), 3)]),
                repaired_blocks: BTreeMap::new(),
            }),
        }
    }

    fn kinds(e: &[Event]) -> Vec<&str> {
        e.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn link_resync_split_brain_and_verify_changes_are_each_one_event() {
        let (s, e) = volume_events(&Seen::default(), &status(Connection::Connected, None, None), Some("db"), 0);
        assert!(e.is_empty(), "a first look at a healthy volume is no news: {e:?}");
        let (s, e) = volume_events(&s, &status(Connection::Disconnected, None, None), Some("db"), 10);
        assert_eq!(kinds(&e), ["volume.disconnected"]);
        assert_eq!(
            (e[0].volume.as_deref(), e[0].group.as_deref(), e[0].node.as_deref()),
            (Some("data"), Some("db"), Some("n2"))
        );
        let (s, e) = volume_events(&s, &status(Connection::Disconnected, None, None), Some("db"), 20);
        assert!(e.is_empty(), "nothing changed");
        let (s, e) = volume_events(&s, &status(Connection::SyncSource, Some(4096), None), Some("db"), 1_000);
        assert_eq!(kinds(&e), ["volume.connected", "volume.resync_started"]);
        let (s, e) = volume_events(&s, &status(Connection::Connected, None, None), Some("db"), 3_500);
        assert_eq!(kinds(&e), ["volume.resync_finished"]);
        assert_eq!((e[0].details["bytes"].as_u64(), e[0].details["seconds"].as_f64()), (Some(4096), Some(2.5)));
        let (s, e) = volume_events(&s, &status(Connection::SplitBrain, None, None), None, 4_000);
        assert_eq!(kinds(&e), ["volume.split_brain"]);
        assert_eq!(e[0].severity, Severity::Critical);
        let (s, e) = volume_events(&s, &status(Connection::Connected, None, Some(VerifyState::Running)), None, 5_000);
        assert_eq!(kinds(&e), ["volume.split_brain_resolved"]);
        let (_, e) = volume_events(&s, &status(Connection::Connected, None, Some(VerifyState::Done)), None, 6_000);
        assert_eq!(kinds(&e), ["volume.verify_done"]);
        assert_eq!((e[0].severity, e[0].details["found_blocks"]["n2"].as_u64()), (Severity::Warning, Some(3)));
        // A secondary reports nothing (its primary does).
        let mut sec = status(Connection::SplitBrain, None, None);
        sec.role = ReplicaRole::Secondary;
        assert_eq!(volume_events(&s, &sec, None, 7_000), (Seen::default(), Vec::new()));
        // A first look at a split brain reports it.
        let (_, e) = volume_events(&Seen::default(), &status(Connection::SplitBrain, None, None), None, 0);
        assert_eq!(kinds(&e), ["volume.split_brain"]);
    }

    #[test]
    fn an_export_that_grew_is_one_event_with_from_and_to() {
        let healthy = status(Connection::Connected, None, None);
        let (s, e) = volume_events(&Seen::default(), &healthy, Some("db"), 0);
        assert!(e.is_empty(), "a first look tells no grow: {e:?}");
        let grown = VolumeStatus { size_bytes: 4 << 20, ..healthy.clone() };
        let (s, e) = volume_events(&s, &grown, Some("db"), 10);
        assert_eq!(kinds(&e), ["volume.grown"]);
        assert_eq!((e[0].details["from"].as_u64(), e[0].details["to"].as_u64()), (Some(1 << 20), Some(4 << 20)));
        assert_eq!(
            (e[0].volume.as_deref(), e[0].group.as_deref(), e[0].node.as_deref()),
            (Some("data"), Some("db"), None)
        );
        let (_, e) = volume_events(&s, &grown, Some("db"), 20);
        assert!(e.is_empty(), "told once: {e:?}");
    }

    #[test]
    fn repaired_blocks_and_unrepaired_read_errors_are_warnings_told_once() {
        let healthy = status(Connection::Connected, None, None);
        let (s, e) = volume_events(&Seen::default(), &healthy, Some("db"), 0);
        assert!(e.is_empty(), "{e:?}");
        let repaired = VolumeStatus { read_errors: 2, repaired_blocks: 3, ..healthy.clone() };
        let (s, e) = volume_events(&s, &repaired, Some("db"), 10);
        assert_eq!(kinds(&e), ["volume.block_repaired"]);
        assert_eq!(e[0].severity, Severity::Warning);
        assert_eq!((e[0].details["blocks"].as_u64(), e[0].details["errors"].as_u64()), (Some(3), Some(2)));
        assert_eq!((e[0].node.as_deref(), e[0].volume.as_deref()), (Some("n1"), Some("data")));
        let (s, e) = volume_events(&s, &repaired, Some("db"), 20);
        assert!(e.is_empty(), "told once: {e:?}");
        let unrepaired = VolumeStatus { read_errors: 3, ..repaired };
        let (s, e) = volume_events(&s, &unrepaired, Some("db"), 30);
        assert_eq!(kinds(&e), ["volume.read_error"]);
        // A new primary starts counting again: no event.
        let (_, e) = volume_events(&s, &healthy, Some("db"), 40);
        assert!(e.is_empty(), "{e:?}");
    }
}
