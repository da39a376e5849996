//! The cluster's event log: every notable change, numbered cluster-wide.
//!
//! Part of the replicated state, so an event a client saw keeps its id and
//! its place across leader changes, and every node can serve the log from its
//! applied state. Events come from two places: the state machine's own apply
//! (a transition it decides, stamped with the proposer's time) and batches that
//! nodes record (what only a node can observe: liveness, leases, fencing).
//!
//! Pure: times arrive inside commands; it reads no clock and does no I/O. It
//! never decides anything from an event: it only keeps them.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{invalid, CommandError};

/// Most events one command records.
pub const MAX_EVENT_BATCH: usize = 512;
/// Bounds of the event log's retention (events).
pub const MIN_EVENT_RETAIN: usize = 10;
pub const MAX_EVENT_RETAIN: usize = 1_000_000;
/// What a cluster keeps when nothing said otherwise (a log from before
/// retention was carried in commands).
pub const DEFAULT_EVENT_RETAIN: usize = 1_000;
/// Longest text kept in an event's message or names.
const MAX_EVENT_TEXT: usize = 1024;
/// Largest `details` (encoded JSON) kept; bigger ones are dropped.
const MAX_DETAILS_BYTES: usize = 4096;

/// How much an event matters to an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Cluster-wide, increasing, never reused; assigned when replicated.
    #[serde(default)]
    pub id: u64,
    /// When it happened, RFC 3339 UTC (from `time_ms`).
    #[serde(default)]
    pub time: String,
    /// When it happened, Unix ms, by the clock of the node that saw it (or
    /// that proposed the change).
    pub time_ms: u64,
    /// What happened, dotted: `node.offline`, `group.moved`, … (docs/api.md).
    pub kind: String,
    pub severity: Severity,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub volume: Option<String>,
    pub message: String,
    /// Kind-specific facts (the reason, the measured outage, bytes, …).
    #[serde(default = "no_details")]
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl Event {
    /// A new event (id 0 until recorded).
    pub fn new(time_ms: u64, kind: &str, severity: Severity, message: impl Into<String>) -> Event {
        Event {
            id: 0,
            time: String::new(),
            time_ms,
            kind: kind.to_string(),
            severity,
            node: None,
            group: None,
            resource: None,
            volume: None,
            message: message.into(),
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn node(mut self, n: impl Into<String>) -> Event {
        self.node = Some(n.into());
        self
    }

    pub fn group(mut self, g: impl Into<String>) -> Event {
        self.group = Some(g.into());
        self
    }

    pub fn resource(mut self, r: impl Into<String>) -> Event {
        self.resource = Some(r.into());
        self
    }

    pub fn volume(mut self, v: impl Into<String>) -> Event {
        self.volume = Some(v.into());
        self
    }

    pub fn details(mut self, d: serde_json::Value) -> Event {
        self.details = d;
        self
    }
}

fn no_details() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Exact kinds, or a prefix ending in `.` (`group.`); empty: any.
    pub kinds: Vec<String>,
    /// At least this severity.
    pub min_severity: Option<Severity>,
    pub group: Option<String>,
    pub node: Option<String>,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        let kind_ok = self.kinds.is_empty()
            || self.kinds.iter().any(|k| if k.ends_with('.') { e.kind.starts_with(k.as_str()) } else { e.kind == *k });
        kind_ok
            && self.min_severity.is_none_or(|s| e.severity >= s)
            && self.group.as_ref().is_none_or(|g| e.group.as_ref() == Some(g))
            && self.node.as_ref().is_none_or(|n| e.node.as_ref() == Some(n))
    }
}

/// What a reader asking for the events after an id gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    /// The asked id has left retention: events between it and `events[0]`
    /// are gone. `Some(oldest kept id)`; a reader must be told, never skip.
    pub reset: Option<u64>,
    /// Matching events after the asked id, oldest first.
    pub events: Vec<Event>,
    /// The id to ask from next time (the last id looked at, matching or not).
    pub next: u64,
}

/// The event log: the newest events up to a retention bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    /// The id the last event got (0: none yet).
    #[serde(default)]
    pub last_id: u64,
    /// The newest time any stamped command carried: the time of events the
    /// apply emits for a command that carries none (older log entries).
    #[serde(default)]
    pub clock_ms: u64,
    /// How many events are kept (the proposer's configuration).
    #[serde(default = "default_retain")]
    pub retain: usize,
    /// Shared, copied on write: the agent's loops clone the whole state many
    /// times a second, and a full log copied each time made an idle agent
    /// two to three times costlier (the same encoding as a plain sequence).
    #[serde(default)]
    pub events: Arc<VecDeque<Event>>,
}

fn default_retain() -> usize {
    DEFAULT_EVENT_RETAIN
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog { last_id: 0, clock_ms: 0, retain: DEFAULT_EVENT_RETAIN, events: Arc::default() }
    }
}

fn clip(s: &str) -> String {
    crate::error::clip(s, MAX_EVENT_TEXT)
}

/// Checks a retention bound.
pub fn validate_retain(retain: usize) -> Result<(), CommandError> {
    if !(MIN_EVENT_RETAIN..=MAX_EVENT_RETAIN).contains(&retain) {
        return Err(invalid("retain", format!("must be {MIN_EVENT_RETAIN} to {MAX_EVENT_RETAIN}")));
    }
    Ok(())
}

/// `time_ms` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, time_ms % 1000)
}

impl EventLog {
    /// Sets the retention (already validated) and drops what falls out.
    pub fn set_retain(&mut self, retain: usize) {
        self.retain = retain;
        self.trim();
    }

    /// Moves the clock forward to `time_ms` (never back).
    pub fn tick(&mut self, time_ms: u64) {
        self.clock_ms = self.clock_ms.max(time_ms);
    }

    fn trim(&mut self) {
        if self.events.len() > self.retain {
            let events = Arc::make_mut(&mut self.events);
            while events.len() > self.retain {
                events.pop_front();
            }
        }
    }

    /// Appends one event with the next id.
    pub fn push(&mut self, e: Event) {
        self.last_id += 1;
        // Always an object (the documented shape), never null.
        let details = match e.details {
            serde_json::Value::Object(_) => e.details,
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            other => serde_json::json!({ "value": other }),
        };
        let details = match serde_json::to_vec(&details) {
            Ok(b) if b.len() <= MAX_DETAILS_BYTES => details,
            _ => serde_json::json!({"dropped": "details too large"}),
        };
        let c = |o: Option<String>| o.map(|s| clip(&s));
        Arc::make_mut(&mut self.events).push_back(Event {
            id: self.last_id,
            time: rfc3339(e.time_ms),
            time_ms: e.time_ms,
            kind: clip(&e.kind),
            severity: e.severity,
            node: c(e.node),
            group: c(e.group),
            resource: c(e.resource),
            volume: c(e.volume),
            message: clip(&e.message),
            details,
        });
        self.trim();
    }

    /// Appends a batch recorded by a node; refuses an oversize one whole.
    pub fn record(&mut self, events: &[Event]) -> Result<(), CommandError> {
        if events.len() > MAX_EVENT_BATCH {
            return Err(invalid("events", format!("at most {MAX_EVENT_BATCH} per command")));
        }
        if let Some((i, _)) = events.iter().enumerate().find(|(_, e)| e.kind.is_empty()) {
            return Err(invalid(&format!("events[{i}].kind"), "must not be empty"));
        }
        for e in events {
            self.push(e.clone());
        }
        Ok(())
    }

    /// The oldest id still kept (`last_id + 1` when empty: nothing is lost
    /// for a reader that has seen everything).
    pub fn first_id(&self) -> u64 {
        self.events.front().map_or(self.last_id + 1, |e| e.id)
    }

    /// When the service of `group` went away before the start that now
    /// runs, read from the group's newest placement event: moved off a node
    /// that went offline (from that node's last heartbeat, the offline
    /// event's `silent_ms` before it), moved otherwise (from the move), or
    /// started after a stop that was not the operator's (from the stop
    /// order). None for a first start or a start the operator asked for.
    pub fn outage_start(&self, group: &str) -> Option<(u64, String)> {
        let of = |e: &&Event, kinds: &[&str]| e.group.as_deref() == Some(group) && kinds.contains(&e.kind.as_str());
        let mut older = self.events.iter().rev();
        let placed = older.by_ref().find(|e| of(e, &["group.moved", "group.starting"]))?;
        if placed.kind == "group.moved" {
            let from = placed.details["from"].as_str().unwrap_or("?").to_string();
            let offline = self
                .events
                .iter()
                .rev()
                .filter(|e| e.id < placed.id)
                .find(|e| e.kind == "node.offline" && e.node.as_deref() == Some(from.as_str()));
            return Some(match offline {
                Some(o) => {
                    let silent = o.details["silent_ms"].as_u64().unwrap_or(0);
                    (o.time_ms.saturating_sub(silent), format!("{from} went silent"))
                }
                None => (placed.time_ms, format!("moved from {from}")),
            });
        }
        let stop = older
            .take_while(|e| !of(e, &["group.running", "group.starting", "group.moved"]))
            .find(|e| of(e, &["group.stopping"]))?;
        let reason = stop.details["reason"].as_str().unwrap_or("");
        if reason.starts_with("stopped by the operator") {
            return None;
        }
        Some((stop.time_ms, format!("stopped on {}: {reason}", stop.node.as_deref().unwrap_or("?"))))
    }

    /// Events after `since` that match `filter`, at most `limit`. When ids
    /// after `since` have already been dropped, the page says so (`reset`).
    pub fn since(&self, since: u64, filter: &EventFilter, limit: usize) -> EventPage {
        let first = self.first_id();
        // An id this log never gave (ahead of it: another cluster's, or a
        // log rebuilt under the reader) is reset too, never waited on.
        let ahead = since > self.last_id;
        let since = if ahead { 0 } else { since };
        let reset = (ahead || since + 1 < first).then_some(first);
        let mut events = Vec::new();
        let mut next = since.max(first.saturating_sub(1));
        // Ids are consecutive: the first wanted is at a known offset.
        let skip = (since + 1).saturating_sub(first) as usize;
        for e in self.events.iter().skip(skip) {
            if events.len() >= limit {
                break;
            }
            next = e.id;
            if filter.matches(e) {
                events.push(e.clone());
            }
        }
        EventPage { reset, events, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(i: u64, kind: &str, sev: Severity) -> Event {
        Event::new(1_000 + i, kind, sev, format!("e{i}")).group(if i.is_multiple_of(2) { "db" } else { "web" })
    }

    fn log_of(n: u64, retain: usize) -> EventLog {
        let mut log = EventLog::default();
        log.set_retain(retain);
        for i in 0..n {
            log.push(ev(i, if i.is_multiple_of(3) { "node.offline" } else { "group.moved" }, Severity::Warning));
        }
        log
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_542_813_004), "2026-12-06T07:40:13.004Z");
    }

    #[test]
    fn since_pages_in_order_and_says_when_events_were_lost() {
        let log = log_of(30, 10);
        assert_eq!((log.first_id(), log.last_id), (21, 30));
        let all = EventFilter::default();
        let p = log.since(25, &all, 100);
        assert_eq!(p.reset, None);
        assert_eq!(p.events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![26, 27, 28, 29, 30]);
        assert_eq!(p.next, 30);
        // Exactly at the edge: 20 was seen, 21 is kept, nothing lost.
        assert_eq!(log.since(20, &all, 100).reset, None);
        // 19 seen, 20 gone: a reset, then everything kept.
        let p = log.since(19, &all, 3);
        assert_eq!(p.reset, Some(21));
        assert_eq!(p.events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![21, 22, 23]);
        assert_eq!(p.next, 23);
        // Up to date: nothing, no reset, same position.
        let p = log.since(30, &all, 100);
        assert!(p.events.is_empty() && p.reset.is_none() && p.next == 30);
        // An empty log loses nothing for a reader at 0.
        assert_eq!(EventLog::default().since(0, &all, 10).reset, None);
        // An id the log never gave (ahead of it) is a reset, then everything.
        let p = log.since(99, &all, 2);
        assert_eq!((p.reset, p.events.iter().map(|e| e.id).collect::<Vec<_>>()), (Some(21), vec![21, 22]));
        assert_eq!(EventLog::default().since(5, &all, 10).reset, Some(1));
    }

    #[test]
    fn filters_select_by_kind_prefix_severity_and_group() {
        let mut log = EventLog::default();
        log.push(ev(0, "node.offline", Severity::Critical));
        log.push(ev(1, "group.moved", Severity::Warning));
        log.push(ev(2, "group.running", Severity::Info));
        let ids = |f: EventFilter| log.since(0, &f, 10).events.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(EventFilter { kinds: vec!["group.".into()], ..Default::default() }), vec![2, 3]);
        assert_eq!(ids(EventFilter { kinds: vec!["group.moved".into()], ..Default::default() }), vec![2]);
        assert_eq!(ids(EventFilter { min_severity: Some(Severity::Warning), ..Default::default() }), vec![1, 2]);
        assert_eq!(ids(EventFilter { group: Some("db".into()), ..Default::default() }), vec![1, 3]);
        // Filtered-out events still move the reader on.
        let p = log.since(0, &EventFilter { kinds: vec!["node.offline".into()], ..Default::default() }, 10);
        assert_eq!(p.next, 3);
    }

    #[test]
    fn a_refused_batch_changes_nothing_and_long_text_is_clipped() {
        let mut log = log_of(3, 10);
        let before = log.clone();
        let big: Vec<_> = (0..=MAX_EVENT_BATCH as u64).map(|i| ev(i, "x", Severity::Info)).collect();
        assert!(log.record(&big).is_err());
        assert!(log.record(&[ev(1, "", Severity::Info)]).is_err());
        assert_eq!(log, before);
        log.record(&[
            Event::new(5, "k", Severity::Info, "m".repeat(5000)).details(serde_json::json!({"x": "y".repeat(10_000)}))
        ])
        .unwrap();
        let last = log.events.back().unwrap();
        assert!(last.message.len() < 1100);
        assert_eq!(last.details, serde_json::json!({"dropped": "details too large"}));
        assert!(validate_retain(5).is_err() && validate_retain(10).is_ok());
    }

    #[test]
    fn the_outage_of_a_start_is_read_from_how_the_group_came_there() {
        let g =
            |kind: &str, t: u64, d: serde_json::Value| Event::new(t, kind, Severity::Info, "").group("db").details(d);
        let mut log = EventLog::default();
        log.push(g("group.starting", 100, serde_json::json!({"reason": "placed on n1"})));
        assert_eq!(log.outage_start("db"), None, "a first start");
        log.push(g("group.running", 200, serde_json::Value::Null));
        log.push(
            Event::new(1_000, "node.offline", Severity::Critical, "")
                .node("n1")
                .details(serde_json::json!({"silent_ms": 600})),
        );
        log.push(g("group.moved", 1_500, serde_json::json!({"from": "n1", "to": "n2"})));
        assert_eq!(log.outage_start("db"), Some((400, "n1 went silent".into())));
        assert_eq!(log.outage_start("web"), None);
        // A switchover: from the stop order; the operator's own stop is no outage.
        log.push(g("group.running", 2_000, serde_json::Value::Null));
        log.push(g("group.stopping", 3_000, serde_json::json!({"reason": "moving to n1 on request"})).node("n2"));
        log.push(g("group.stopped", 3_100, serde_json::Value::Null));
        log.push(g("group.starting", 3_200, serde_json::Value::Null));
        assert_eq!(log.outage_start("db").map(|o| o.0), Some(3_000));
        log.push(g("group.running", 3_400, serde_json::Value::Null));
        log.push(g("group.stopping", 4_000, serde_json::json!({"reason": "stopped by the operator"})));
        log.push(g("group.stopped", 4_100, serde_json::Value::Null));
        log.push(g("group.starting", 9_000, serde_json::Value::Null));
        assert_eq!(log.outage_start("db"), None);
    }

    proptest! {
        /// Any sequence of batches and retention changes: ids are
        /// consecutive and never reused, retention holds, and a reader that
        /// pages from any id sees every kept event after it exactly once, in
        /// order, with a reset exactly when something it had not seen is gone.
        #[test]
        fn ids_retention_and_paging(
            steps in proptest::collection::vec((0usize..30, prop_oneof![Just(None), (10usize..40).prop_map(Some)]), 1..20),
            from in 0u64..400,
            limit in 1usize..20,
        ) {
            let mut log = EventLog::default();
            let mut last = 0;
            for (n, retain) in steps {
                if let Some(r) = retain {
                    log.set_retain(r);
                }
                let b: Vec<_> = (0..n as u64).map(|i| ev(i, "group.moved", Severity::Info)).collect();
                log.record(&b).unwrap();
                prop_assert_eq!(log.last_id, last + n as u64);
                last = log.last_id;
                prop_assert!(log.events.len() <= log.retain);
                prop_assert!(log.events.iter().zip(log.events.iter().skip(1)).all(|(a, b)| a.id + 1 == b.id));
                prop_assert!(log.events.back().is_none_or(|e| e.id == log.last_id));
            }
            let mut at = from;
            let mut seen = Vec::new();
            let mut resets = 0;
            loop {
                let p = log.since(at, &EventFilter::default(), limit);
                if let Some(first) = p.reset {
                    resets += 1;
                    prop_assert_eq!(first, log.first_id());
                }
                if p.events.is_empty() {
                    let from = if at > log.last_id { 0 } else { at };
                    prop_assert_eq!(p.next, from.max(log.first_id() - 1));
                    break;
                }
                seen.extend(p.events.iter().map(|e| e.id));
                prop_assert!(p.next > at || at > log.last_id, "a reader moves on (or was ahead of the log)");
                at = p.next;
            }
            let ahead = from > log.last_id;
            let want: Vec<u64> = log.events.iter().map(|e| e.id).filter(|id| ahead || *id > from).collect();
            prop_assert_eq!(seen, want);
            prop_assert_eq!(resets > 0, ahead || from + 1 < log.first_id());
            prop_assert!(resets <= 1, "a reset is said once, then paging continues from the kept events");
        }
    }
}
