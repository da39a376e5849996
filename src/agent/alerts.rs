//! The leader's alert senders, and the alert routes of the REST API.
//!
//! On the leader, one sender task per alert walks the event log from the
//! alert's replicated cursor: each event its filter wants is sent (retried
//! with backoff until the target takes it: never skipped), then the cursor
//! is advanced through Raft. A new leader starts from the cursor, so a
//! leader change re-sends at most the events sent and not yet recorded —
//! at-least-once, with the event id to de-duplicate. A target's first
//! failure and its recovery are events themselves.
//!
//! Never sends from a node that is not the leader (a deposed leader's
//! senders are stopped at the next round), and never shows a secret.

use super::*;
use crate::alerts::render::Message;
use crate::alerts::send::{Context, Target};
use tandem_http_api::{AlertDelivery, AlertTested, AlertView};
use tandem_raft::alerts::{AlertRecord, AlertSpec};
use tandem_raft::events::{Event, Severity};

/// How often the senders are matched to the alerts and the leadership.
pub(super) const ALERT_TICK: Duration = Duration::from_millis(500);
/// Events read from the log at a time.
const PAGE: usize = 64;
/// Retry backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Sent events are recorded (one Raft write) at most this often: a burst
/// of events costs a write per RECORD_GAP, not one per event, and a leader
/// change re-sends at most what was sent in the last RECORD_GAP.
const RECORD_GAP: Duration = Duration::from_millis(200);
/// A cursor moved past events the filter did not want is recorded when
/// this many ids or this much time have gone by (a leader change re-reads
/// them, and sends none of them).
const SKIPPED_IDS: u64 = 256;
const SKIPPED_AGE: Duration = Duration::from_secs(30);
/// Longest wait for new events before looking again (reports are due by
/// the clock, not by events).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// The wait after the `failures`-th failure in a row: doubling from
/// BACKOFF_MIN up to BACKOFF_MAX.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (BACKOFF_MIN * 2u32.pow(doublings)).min(BACKOFF_MAX)
}

/// How one sender is doing (shown by the alert views on the leader).
#[derive(Debug, Default, Clone)]
pub(crate) struct Delivery {
    pub failures: u32,
    pub last_error: Option<String>,
    pub failing_since_ms: Option<u64>,
    pub last_sent_ms: Option<u64>,
}

struct Sender {
    spec: AlertSpec,
    member: usize,
    status: Arc<std::sync::Mutex<Delivery>>,
    task: tokio::task::JoinHandle<()>,
}

/// The senders this node runs while it leads, by alert name.
#[derive(Default)]
pub(crate) struct AlertSenders {
    senders: BTreeMap<String, Sender>,
}

impl Drop for AlertSenders {
    fn drop(&mut self) {
        for s in self.senders.values() {
            s.task.abort();
        }
    }
}

fn view(name: &str, r: &AlertRecord, delivery: Option<Delivery>) -> AlertView {
    AlertView {
        name: name.to_string(),
        spec: r.spec.redacted(),
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        by: r.by.clone(),
        cursor: r.cursor,
        sent: r.sent,
        report_ms: r.report_ms,
        delivery: delivery.map(|d| AlertDelivery {
            state: if d.failures > 0 { "retrying".into() } else { "ok".into() },
            failures: d.failures,
            last_error: d.last_error,
            failing_since_ms: d.failing_since_ms,
            last_sent_ms: d.last_sent_ms,
        }),
    }
}

impl Agent {
    /// Starts a sender for each alert while this node leads, restarts one
    /// whose definition changed, stops the others.
    pub(super) async fn alert_round(self: &Arc<Self>) {
        let m = self.member();
        let leading = m.as_ref().is_some_and(|m| m.metrics().current_leader == Some(m.node_id));
        let alerts: BTreeMap<String, AlertSpec> = match (&m, leading) {
            (Some(m), true) => {
                m.state.read(|d| d.state.alerts.by_name.iter().map(|(n, r)| (n.clone(), r.spec.clone())).collect())
            }
            _ => BTreeMap::new(),
        };
        let member = m.as_ref().map_or(0, |m| Arc::as_ptr(m) as usize);
        let mut all = self.alert_senders.lock().unwrap_or_else(|p| p.into_inner());
        all.senders.retain(|name, s| {
            let keep = alerts.get(name) == Some(&s.spec) && s.member == member && !s.task.is_finished();
            if !keep {
                s.task.abort();
            }
            keep
        });
        let Some(m) = m else { return };
        for (name, spec) in alerts {
            if all.senders.contains_key(&name) {
                continue;
            }
            let status = Arc::new(std::sync::Mutex::new(Delivery::default()));
            let task = tokio::spawn(self.clone().run_sender(m.clone(), name.clone(), spec.clone(), status.clone()));
            tracing::info!(alert = %name, target = spec.kind(), "alert sender started on the leader");
            all.senders.insert(name, Sender { spec, member, status, task });
        }
    }

    fn delivery_of(&self, name: &str) -> Option<Delivery> {
        let all = self.alert_senders.lock().unwrap_or_else(|p| p.into_inner());
        all.senders.get(name).map(|s| s.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn node_id_of(m: &Member, node: Option<&str>) -> Option<u64> {
        let node = node?;
        m.state.read(|d| d.state.nodes.iter().find(|(_, n)| n.name == node).map(|(id, _)| *id))
    }

    /// One sender: from the replicated cursor on, until aborted.
    async fn run_sender(
        self: Arc<Self>,
        m: Arc<Member>,
        name: String,
        spec: AlertSpec,
        status: Arc<std::sync::Mutex<Delivery>>,
    ) {
        let filter = spec.filter();
        let mut changes = m.state.subscribe();
        let Some(start) = m.state.read(|d| d.state.alerts.by_name.get(&name).map(|r| r.cursor)) else { return };
        let (mut pos, mut recorded, mut recorded_at) = (start, start, Instant::now());
        // Events sent since the cursor was last recorded.
        let mut unrecorded = 0u64;
        // Built once (its HTTP connection pool or mail transport kept),
        // again after a failure.
        let mut target = None;
        loop {
            let (page, rec) = m
                .state
                .read(|d| (d.state.events.since(pos, &filter, PAGE), d.state.alerts.by_name.get(&name).cloned()));
            let Some(rec) = rec else { return };
            if rec.cursor > pos {
                // Recorded further by an earlier term of this node's leadership.
                (pos, recorded, unrecorded) = (rec.cursor, rec.cursor, 0);
                continue;
            }
            if let Some(first) = page.reset {
                if first > pos + 1 {
                    let lost = first - pos - 1;
                    tracing::error!(alert = %name, lost, "events left the log before the alert sent them");
                    self.emit(
                        Event::new(
                            0,
                            "alert.events_lost",
                            Severity::Critical,
                            format!(
                                "alert {name}: {lost} events (ids {} to {}) left the event log before they were sent; \
                             raise events_retain, or fix the target sooner",
                                pos + 1,
                                first - 1
                            ),
                        )
                        .details(serde_json::json!({"alert": name, "from": pos + 1, "to": first - 1})),
                    );
                }
            }
            let full = page.events.len() >= PAGE;
            for e in page.events {
                let id = e.id;
                let node_id = Self::node_id_of(&m, e.node.as_deref());
                self.deliver(&m, &name, &spec, &mut target, node_id, Message::Event(e), &status).await;
                pos = id;
                unrecorded += 1;
            }
            pos = pos.max(page.next);
            let due = if unrecorded > 0 {
                recorded_at.elapsed() >= RECORD_GAP
            } else {
                pos - recorded >= SKIPPED_IDS || recorded_at.elapsed() >= SKIPPED_AGE
            };
            if pos > recorded && due && self.record_alert(&m, &name, pos, unrecorded, None).await {
                (recorded, recorded_at, unrecorded) = (pos, Instant::now(), 0);
            }
            if let Some(every_s) = spec.report_interval_s() {
                let now = crate::security::now_ms();
                if now >= rec.report_ms.saturating_add(every_s * 1000) {
                    let report = self.status_report().await;
                    let report = Message::Report { time_ms: now, report };
                    self.deliver(&m, &name, &spec, &mut target, None, report, &status).await;
                    if self.record_alert(&m, &name, pos.max(recorded), unrecorded, Some(now)).await {
                        (recorded, recorded_at, unrecorded) = (pos.max(recorded), Instant::now(), 0);
                    }
                }
            }
            if full {
                continue;
            }
            // Sent and not recorded yet: look again when it is due.
            let wait = if unrecorded > 0 { RECORD_GAP.saturating_sub(recorded_at.elapsed()) } else { IDLE_LOOK };
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends one message until the target takes it. The first failure of a
    /// run and the recovery are events.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        m: &Member,
        name: &str,
        spec: &AlertSpec,
        target: &mut Option<Target>,
        node_id: Option<u64>,
        msg: Message,
        status: &std::sync::Mutex<Delivery>,
    ) {
        let cx = Context { cluster: &m.cluster_id, alert: name, node_id };
        let mut failures = 0u32;
        let mut first_failure_ms = 0;
        loop {
            let sent = match target.as_ref() {
                Some(t) => t.send(&cx, &msg).await,
                None => match Target::new(spec) {
                    Ok(t) => {
                        let sent = t.send(&cx, &msg).await;
                        *target = Some(t);
                        sent
                    }
                    Err(e) => Err(e),
                },
            };
            if sent.is_err() {
                *target = None;
            }
            let now = crate::security::now_ms();
            match sent {
                Ok(()) => {
                    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                    *s = Delivery { last_sent_ms: Some(now), ..Delivery::default() };
                    drop(s);
                    self.counters.alert_sent(name);
                    if failures > 0 {
                        tracing::info!(alert = %name, failures, "alert target takes alerts again");
                        self.emit(
                            Event::new(0, "alert.recovered", Severity::Info, format!(
                                "alert {name}: the target took the alert after {failures} failed attempts"
                            ))
                            .details(serde_json::json!({
                                "alert": name, "failures": failures, "failed_for_ms": now.saturating_sub(first_failure_ms),
                                "message_id": msg.dedup_id(),
                            })),
                        );
                    }
                    return;
                }
                Err(e) => {
                    failures += 1;
                    self.counters.alert_failed(name);
                    {
                        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                        s.failures = failures;
                        s.last_error = Some(e.0.clone());
                        s.failing_since_ms.get_or_insert(now);
                    }
                    if failures == 1 {
                        first_failure_ms = now;
                        tracing::warn!(alert = %name, error = %e, "alert target failed; retrying with backoff");
                        self.emit(
                            Event::new(0, "alert.failed", Severity::Warning, format!("alert {name}: {e}")).details(
                                serde_json::json!({"alert": name, "error": e.0, "message_id": msg.dedup_id()}),
                            ),
                        );
                    } else {
                        tracing::debug!(alert = %name, failures, error = %e, "alert target failed again");
                    }
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
        }
    }

    /// Records a sender's progress; false when it could not be (not the
    /// leader any more, no quorum): it is tried again later.
    async fn record_alert(&self, m: &Member, name: &str, cursor: u64, sent: u64, report_ms: Option<u64>) -> bool {
        let cmd = Command::AdvanceAlert { name: name.to_string(), cursor, sent, report_ms };
        match self.propose(m, cmd).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(alert = %name, "alert cursor not recorded: {e}");
                false
            }
        }
    }

    /// The status report: what `GET /v1/cluster`, `/v1/groups` and
    /// `/v1/volumes` answer here.
    async fn status_report(&self) -> serde_json::Value {
        let cluster = Backend::cluster(self, true).await.ok();
        let groups = Backend::groups(self, true).await.unwrap_or_default();
        let volumes = Backend::volumes(self, true).await.unwrap_or_default();
        serde_json::json!({
            "leader": cluster.as_ref().and_then(|c| c.leader.clone()),
            "term": cluster.as_ref().map_or(0, |c| c.term),
            "nodes": cluster.map(|c| c.members).unwrap_or_default(),
            "groups": groups,
            "volumes": volumes,
        })
    }

    pub(super) async fn do_put_alert(
        &self,
        name: &str,
        spec: AlertSpec,
        by: String,
    ) -> Result<(AlertView, bool), ApiError> {
        let m = self.require_member()?;
        let existed = m.state.read(|d| d.state.alerts.by_name.contains_key(name));
        let cmd =
            Command::PutAlert { name: name.to_string(), spec: Box::new(spec), time_ms: crate::security::now_ms(), by };
        self.propose(&m, cmd).await?;
        let view = self.do_alert(name, true).await?;
        tracing::info!(
            alert = name,
            target = view.spec.kind(),
            "alert {}",
            if existed { "changed" } else { "defined" }
        );
        Ok((view, !existed))
    }

    pub(super) async fn do_alerts(&self, stale: bool) -> Result<Vec<AlertView>, ApiError> {
        let m = self.read_member(stale).await?;
        let records: Vec<(String, AlertRecord)> =
            m.state.read(|d| d.state.alerts.by_name.iter().map(|(n, r)| (n.clone(), r.clone())).collect());
        Ok(records.iter().map(|(n, r)| view(n, r, self.delivery_of(n))).collect())
    }

    pub(super) async fn do_alert(&self, name: &str, stale: bool) -> Result<AlertView, ApiError> {
        let m = self.read_member(stale).await?;
        let r = m
            .state
            .read(|d| d.state.alerts.by_name.get(name).cloned())
            .ok_or_else(|| ApiError::AlertNotFound(name.to_string()))?;
        Ok(view(name, &r, self.delivery_of(name)))
    }

    pub(super) async fn do_delete_alert(&self, name: &str) -> Result<(), ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::DeleteAlert { name: name.to_string() }).await?;
        tracing::info!(alert = name, "alert deleted");
        Ok(())
    }

    /// Sends one test event (`alert.test`, id 0) to the target now, once.
    pub(super) async fn do_test_alert(&self, name: &str) -> Result<AlertTested, ApiError> {
        let m = self.read_member(false).await?;
        let spec = m
            .state
            .read(|d| d.state.alerts.by_name.get(name).map(|r| r.spec.clone()))
            .ok_or_else(|| ApiError::AlertNotFound(name.to_string()))?;
        let now = crate::security::now_ms();
        let mut e = Event::new(
            now,
            "alert.test",
            Severity::Info,
            format!("test alert {name} from tandem on {}", self.cfg.name),
        )
        .node(self.cfg.name.clone())
        .details(serde_json::json!({"alert": name}));
        e.time = tandem_raft::events::rfc3339(now);
        let node_id = Some(m.node_id);
        let cx = Context { cluster: &m.cluster_id, alert: name, node_id };
        let started = Instant::now();
        let sent = match Target::new(&spec) {
            Ok(t) => t.send(&cx, &Message::Event(e)).await,
            Err(err) => Err(err),
        };
        sent.map_err(|err| ApiError::AlertFailed { name: name.to_string(), reason: err.0 })?;
        Ok(AlertTested { name: name.to_string(), ms: started.elapsed().as_millis() as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty() {
        let waits: Vec<u64> = (1..=10).map(|f| backoff(f).as_millis() as u64).collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
        assert_eq!(backoff(0), BACKOFF_MIN);
    }
}
