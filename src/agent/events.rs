//! The node's side of the event log: what this node observes (liveness,
//! leadership, quorum, its lease, fencing, its resources) is queued here,
//! bounded, and sent to the leader, which records it through Raft. Readers
//! are served from the local applied state, so any node answers.
//!
//! Never decides anything from an event, and never writes to Raft when
//! nothing was queued: an idle node costs nothing here.

use super::*;
use tandem_raft::events::{Event, EventFilter, EventPage, Severity, MAX_EVENT_BATCH};

/// Most events a node holds while it cannot send them (no leader).
const EVENT_QUEUE_MAX: usize = 10_000;
/// JSON a batch sent to the leader carries at most (the API refuses
/// bodies over 256 KiB; an older agent, over 64 KiB; one event is at most about 10 KiB).
const BATCH_BYTES: usize = 48 * 1024;
/// Longest a queued event waits when the wake-up was missed.
pub(super) const EVENT_FLUSH: Duration = Duration::from_millis(250);

#[derive(Default)]
pub(crate) struct EventQueue {
    pub events: std::collections::VecDeque<Event>,
    pub dropped: u64,
}

/// Where this node's observations go: the bounded queue and the flush
/// loop's wake-up. Cloned into background tasks (the fence command).
#[derive(Clone)]
pub(crate) struct EventSink {
    node: String,
    queue: Arc<std::sync::Mutex<EventQueue>>,
    wake: Arc<tokio::sync::Notify>,
    /// One flush at a time, so batches are recorded in the order queued.
    flushing: Arc<tokio::sync::Mutex<()>>,
}

impl EventSink {
    pub(crate) fn new(node: String) -> EventSink {
        EventSink { node, queue: Default::default(), wake: Default::default(), flushing: Default::default() }
    }

    /// Queues an event, stamped now unless it has a time (bounded; never blocks).
    pub(crate) fn emit(&self, e: Event) {
        let e = if e.time_ms == 0 { Event { time_ms: crate::security::now_ms(), ..e } } else { e };
        let e = if e.node.is_none() { e.node(self.node.clone()) } else { e };
        tracing::info!(kind = %e.kind, severity = e.severity.as_str(), "event: {}", e.message);
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.events.len() >= EVENT_QUEUE_MAX {
                q.dropped += 1;
                if q.dropped.is_power_of_two() {
                    tracing::warn!(dropped = q.dropped, "event queue full: events dropped (no leader to take them?)");
                }
                return;
            }
            q.events.push_back(e);
        }
        self.wake.notify_one();
    }

    /// The oldest queued events, at most `n` and about BATCH_BYTES of JSON
    /// (the API takes small bodies; at least one event goes).
    fn take(&self, n: usize) -> Vec<Event> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = 0;
        let mut count = 0;
        for e in q.events.iter().take(n) {
            bytes += serde_json::to_vec(e).map_or(0, |v| v.len());
            if count > 0 && bytes > BATCH_BYTES {
                break;
            }
            count += 1;
        }
        q.events.drain(..count).collect()
    }

    fn is_empty(&self) -> bool {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).events.is_empty()
    }

    fn requeue(&self, batch: Vec<Event>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for e in batch.into_iter().rev() {
            if q.events.len() >= EVENT_QUEUE_MAX {
                q.dropped += 1;
                continue;
            }
            q.events.push_front(e);
        }
    }
}

/// What this node last saw, to report changes only.
#[derive(Default)]
pub(crate) struct Observed {
    /// The leader this node sees now (None: none) and the last one it saw.
    pub leader: Option<NodeId>,
    pub last_leader: Option<NodeId>,
    /// Whether it held its lease at the last look (None: not yet since
    /// start), and since when it has not.
    pub quorum: Option<bool>,
    pub quorum_lost_ms: Option<u64>,
    /// Nodes seen up, by name, and their paths (liveness, on the leader).
    pub up: BTreeMap<String, bool>,
    pub paths: BTreeMap<(String, String), bool>,
    /// When liveness was last looked at for events.
    pub last_look: Option<Instant>,
    /// `up` was read from the log since this node became leader.
    pub leading: bool,
}

/// How often the leader looks at liveness for node and path events.
const LIVENESS_EVERY: Duration = Duration::from_millis(200);

impl Agent {
    /// Queues an event this node observed.
    pub(crate) fn emit(&self, e: Event) {
        self.event_sink.emit(e);
    }

    /// The hook the executor tells what happens to the resources here; a
    /// group that runs gets the outage it ended, read from the event log.
    pub(super) fn executor_events(&self, state: StateHandle) -> crate::executor::EventHook {
        let sink = self.event_sink.clone();
        Arc::new(move |e: Event| {
            let e = match (e.kind.as_str(), e.group.clone()) {
                ("group.running", Some(g)) => {
                    let now = crate::security::now_ms();
                    match state.read(|d| d.state.events.outage_start(&g)) {
                        Some((from, why)) => {
                            let ms = now.saturating_sub(from);
                            let mut d = e.details.clone();
                            d["outage_ms"] = serde_json::json!(ms);
                            d["outage_from"] = serde_json::json!(why);
                            let message =
                                format!("{} after an outage of {:.1}s ({why})", e.message, ms as f64 / 1000.0);
                            Event { time_ms: now, details: d, message, ..e }
                        }
                        None => e,
                    }
                }
                _ => e,
            };
            sink.emit(e);
        })
    }

    /// The proposer's stamp for a command: its clock, its event retention,
    /// and who asked when a client did.
    pub(super) fn stamp(&self) -> tandem_raft::Stamp {
        tandem_raft::Stamp {
            time_ms: crate::security::now_ms(),
            events_retain: self.cfg.events.retention,
            by: tandem_http_api::auth::asked_by(),
        }
    }

    pub(super) async fn do_record_events_batch(&self, events: Vec<Event>) -> Result<(), ApiError> {
        let m = self.require_member()?;
        if events.len() > MAX_EVENT_BATCH {
            return Err(ApiError::Invalid { field: "events".into(), reason: format!("at most {MAX_EVENT_BATCH}") });
        }
        self.propose(&m, Command::RecordEvents { events }).await.map(|_| ())
    }

    /// Sends queued events to the leader; on failure they go back to the
    /// front of the queue, in order (at-least-once: a batch whose answer
    /// was lost may be recorded twice, never reordered).
    pub(super) async fn flush_events(&self) {
        if self.event_sink.is_empty() {
            return;
        }
        let _one = self.event_sink.flushing.lock().await;
        let batch = self.event_sink.take(MAX_EVENT_BATCH);
        if batch.is_empty() {
            return;
        }
        if self.member().is_none() {
            self.event_sink.requeue(batch);
            return;
        }
        let body = tandem_http_api::EventBatch { events: batch.clone() };
        let sent = self.on_leader("/internal/events", &body, self.do_record_events_batch(batch.clone())).await;
        if let Err(e) = sent {
            tracing::debug!("events not replicated yet: {e}");
            self.event_sink.requeue(batch);
        }
    }

    /// The flush loop: wakes when an event is queued (or every EVENT_FLUSH
    /// while some wait), so an event reaches the log in one round trip.
    pub(super) async fn event_loop(self: Arc<Self>) {
        loop {
            if self.event_sink.is_empty() {
                self.event_sink.wake.notified().await;
            } else {
                let _ = tokio::time::timeout(EVENT_FLUSH, self.event_sink.wake.notified()).await;
            }
            self.flush_events().await;
        }
    }

    /// Events after `since` from the local applied state (any node answers).
    pub(super) fn do_events(&self, since: u64, filter: &EventFilter, limit: usize) -> Result<EventPage, ApiError> {
        let m = self.require_member()?;
        Ok(m.state.read(|d| d.state.events.since(since, filter, limit)))
    }

    /// A receiver that changes whenever the applied state does.
    pub(super) fn do_event_changes(&self) -> Result<tokio::sync::watch::Receiver<u64>, ApiError> {
        Ok(self.require_member()?.state.subscribe())
    }

    /// Leadership and quorum as this node sees them, each change once.
    /// "Leader elected" is said by the new leader itself. Quorum is this
    /// node's lease: held while a majority of voters echoes its heartbeats.
    /// A loss can only be recorded once a majority is back, so it is said
    /// then, dated when the lease ran out, by each node that lost it (a
    /// node that never held it since its start lost nothing).
    pub(super) fn observe_leadership(&self, m: &Member) {
        let (leader, term) = {
            let metrics = m.raft.metrics();
            let g = metrics.borrow();
            (g.current_leader, g.current_term)
        };
        let holds = self.lease_core().holds(now_boot_ms());
        let now = crate::security::now_ms();
        let (elected, regained, previous) = {
            let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            let regained = match (o.quorum, holds) {
                (Some(false), true) => o.quorum_lost_ms.take(),
                (Some(true), false) => {
                    o.quorum_lost_ms = Some(now);
                    None
                }
                _ => None,
            };
            if holds || o.quorum.is_some() {
                o.quorum = Some(holds);
            }
            let changed = leader != o.leader;
            o.leader = leader;
            let previous =
                if changed && leader.is_some() { std::mem::replace(&mut o.last_leader, leader) } else { None };
            (changed && leader == Some(m.node_id), regained, previous)
        };
        if let Some(since) = regained {
            let secs = now.saturating_sub(since) as f64 / 1000.0;
            self.emit(
                Event::new(
                    since,
                    "quorum.lost",
                    Severity::Critical,
                    format!("{} heard no majority of voters for {secs:.1}s", self.cfg.name),
                )
                .details(serde_json::json!({"seconds": secs, "regained_ms": now})),
            );
            self.emit(
                Event::new(now, "quorum.regained", Severity::Info, format!("{} hears a majority again", self.cfg.name))
                    .details(serde_json::json!({"seconds": secs})),
            );
        }
        if elected {
            self.emit(
                Event::new(
                    now,
                    "leader.elected",
                    Severity::Info,
                    format!("{} is the leader (term {term})", self.cfg.name),
                )
                .details(serde_json::json!({"term": term, "previous": previous})),
            );
        }
    }

    /// On the leader, at most every LIVENESS_EVERY: reports each node that
    /// went offline or came back, and each network path (address) of a
    /// reachable node that went silent or came back.
    pub(super) fn observe_liveness(&self, m: &Member, now: Instant) {
        {
            let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            if o.last_look.is_some_and(|t| now.saturating_duration_since(t) < LIVENESS_EVERY) {
                return;
            }
            o.last_look = Some(now);
        }
        let nodes: Vec<(NodeId, String, Vec<String>)> = m.state.read(|d| {
            d.state
                .nodes
                .values()
                .filter(|r| r.id != m.node_id)
                .map(|r| (r.id, r.name.clone(), r.addresses.clone()))
                .collect()
        });
        // A new leader starts from what the log last said of each node, so
        // that a node's going offline is one event, whoever leads.
        let fresh = !std::mem::replace(&mut self.observed.lock().unwrap_or_else(|p| p.into_inner()).leading, true);
        if fresh {
            let recorded: BTreeMap<String, bool> = m.state.read(|d| {
                let mut last = BTreeMap::new();
                for e in d.state.events.events.iter().rev() {
                    let up = match e.kind.as_str() {
                        "node.online" => true,
                        "node.offline" => false,
                        _ => continue,
                    };
                    if let Some(n) = &e.node {
                        last.entry(n.clone()).or_insert(up);
                    }
                }
                last
            });
            let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            for (_, name, _) in &nodes {
                o.up.insert(name.clone(), recorded.get(name).copied().unwrap_or(true));
            }
        }
        let timeout = self.cfg.node_timeout();
        for (id, name, addresses) in nodes {
            let st = self.liveness.status(id, &addresses, now);
            let paths: Vec<(String, bool)> =
                st.paths.iter().map(|(a, since)| (a.clone(), since.is_some_and(|s| s < timeout))).collect();
            self.observe_node(&name, st.alive, st.down_for.as_millis() as u64, &paths);
        }
    }

    fn observe_node(&self, name: &str, up: bool, down_for_ms: u64, paths: &[(String, bool)]) {
        let mut events = Vec::new();
        {
            let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            // A node not heard yet since it joined is waited for, not news.
            let was = o.up.get(name).copied();
            if was.is_some() || up {
                o.up.insert(name.to_string(), up);
            }
            // Unknown so far (it joined since): its first word is no news.
            if was.is_some_and(|w| w != up) {
                events.push(if up {
                    Event::new(0, "node.online", Severity::Info, format!("node {name} is reachable again"))
                } else {
                    Event::new(
                        0,
                        "node.offline",
                        Severity::Critical,
                        format!("node {name} is offline: no heartbeat for {:.1}s", down_for_ms as f64 / 1000.0),
                    )
                    .details(serde_json::json!({"silent_ms": down_for_ms}))
                });
            }
            // Paths matter while the node is up: a dead node's are all down.
            for (addr, path_up) in paths {
                let key = (name.to_string(), addr.clone());
                let was = o.paths.insert(key, *path_up);
                if up && was.is_some_and(|w| w != *path_up) {
                    events.push(
                        if *path_up {
                            Event::new(0, "path.up", Severity::Info, format!("path to {name} via {addr} is up again"))
                        } else {
                            Event::new(0, "path.down", Severity::Warning, format!("path to {name} via {addr} is down"))
                        }
                        .details(serde_json::json!({"address": addr})),
                    );
                }
            }
        }
        for e in events {
            self.emit(e.node(name));
        }
    }

    /// Forgets what this node saw as leader (it stepped down): the next
    /// leader reports node liveness from its own view.
    pub(super) fn forget_liveness(&self) {
        let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        o.up.clear();
        o.paths.clear();
        o.leading = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_stays_under_the_api_body_limit_and_keeps_the_order() {
        let sink = EventSink::new("n1".into());
        for i in 0..200 {
            sink.emit(Event::new(i + 1, "group.moved", Severity::Warning, "m".repeat(1000)));
        }
        let mut times = Vec::new();
        loop {
            let batch = sink.take(MAX_EVENT_BATCH);
            if batch.is_empty() {
                break;
            }
            let body = serde_json::to_vec(&tandem_http_api::EventBatch { events: batch.clone() }).unwrap();
            assert!(body.len() < tandem_http_api::MAX_BODY_BYTES, "{} bytes", body.len());
            times.extend(batch.iter().map(|e| e.time_ms));
        }
        assert_eq!(times, (1..=200).collect::<Vec<u64>>());
        assert!(sink.is_empty());
    }
}
