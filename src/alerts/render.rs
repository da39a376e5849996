//! What an alert says: the webhook's body and signature, the mail's subject
//! and text, a Pacemaker alert agent's environment, the status report.
//!
//! Pure: events and times in, bytes and strings out. No clock, no I/O.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tandem_raft::events::{rfc3339, Event, Severity};

/// The Pacemaker alert interface tandem follows (`CRM_alert_version`):
/// agents written for it check the variable is set.
pub const PACEMAKER_ALERT_VERSION: &str = "2.1.5";
/// Pacemaker's default `timestamp-format`.
pub const DEFAULT_TIMESTAMP_FORMAT: &str = "%H:%M:%S.%06N";

/// What an alert carries: one event, or a status report of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Event(Event),
    Report { time_ms: u64, report: Value },
}

impl Message {
    /// The id receivers de-duplicate on: the event's id (`0` for a test),
    /// `report-<ms>` for a report.
    pub fn dedup_id(&self) -> String {
        match self {
            Message::Event(e) => e.id.to_string(),
            Message::Report { time_ms, .. } => format!("report-{time_ms}"),
        }
    }
}

/// The webhook's JSON body.
pub fn webhook_body(cluster: &str, alert: &str, m: &Message) -> Vec<u8> {
    let v = match m {
        Message::Event(e) => json!({"alert": alert, "cluster": cluster, "event": e}),
        Message::Report { time_ms, report } => {
            json!({"alert": alert, "cluster": cluster, "report": {"time": rfc3339(*time_ms), "time_ms": time_ms, "cluster": report}})
        }
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// `X-Tandem-Signature`: `sha256=` and the hex HMAC-SHA256, keyed by the
/// alert's secret, of `<X-Tandem-Timestamp>.<body>` (the timestamp is signed
/// so that a recorded delivery cannot be replayed later as new).
pub fn signature(secret: &str, timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A mail's subject and plain text.
pub fn mail(cluster: &str, alert: &str, m: &Message) -> (String, String) {
    match m {
        Message::Event(e) => {
            let sev = match e.severity {
                Severity::Info => "info",
                Severity::Warning => "WARNING",
                Severity::Critical => "CRITICAL",
            };
            let mut subject = format!("[tandem {cluster}] {sev}: {}", e.message);
            if subject.chars().count() > 200 {
                subject = subject.chars().take(199).collect::<String>() + "…";
            }
            let mut body = format!(
                "{}\n\nevent    {}\nkind     {}\nseverity {}\ntime     {}\n",
                e.message,
                e.id,
                e.kind,
                e.severity.as_str(),
                e.time
            );
            for (k, v) in [("node", &e.node), ("group", &e.group), ("resource", &e.resource), ("volume", &e.volume)] {
                if let Some(v) = v {
                    body.push_str(&format!("{k:<8} {v}\n"));
                }
            }
            if e.details.as_object().is_some_and(|d| !d.is_empty()) {
                body.push_str(&format!("details  {}\n", e.details));
            }
            body.push_str(&format!("\ncluster {cluster}, alert {alert}\n"));
            (subject, body)
        }
        Message::Report { time_ms, report } => {
            (format!("[tandem {cluster}] status report {}", rfc3339(*time_ms)), report_text(cluster, alert, report))
        }
    }
}

/// A status report as text: the cluster's leader, every node, group and
/// volume in a line (from the JSON of `GET /v1/cluster`, `/v1/groups`,
/// `/v1/volumes`).
pub fn report_text(cluster: &str, alert: &str, r: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut t = format!("tandem cluster {cluster}: leader {}, term {}\n\nNodes\n", s(&r["leader"]), r["term"]);
    for n in r["nodes"].as_array().into_iter().flatten() {
        let paths = n["paths"].as_array().map_or(0, Vec::len);
        let up = n["paths"].as_array().map_or(0, |p| p.iter().filter(|p| p["up"] == json!(true)).count());
        t.push_str(&format!(
            "  {:<16} {:<8} {:<12} {:<8} paths {up}/{paths}\n",
            s(&n["name"]),
            s(&n["state"]),
            s(&n["admin_state"]),
            s(&n["role"])
        ));
    }
    t.push_str("\nGroups\n");
    for g in r["groups"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "  {:<16} {:<8} on {:<16} epoch {}\n",
            s(&g["name"]),
            s(&g["state"]),
            s(&g["node"]),
            g["epoch"]
        ));
    }
    t.push_str("\nVolumes\n");
    for v in r["volumes"].as_array().into_iter().flatten() {
        let reps: Vec<String> = v["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{} {}/{}", s(&x["node"]), s(&x["disk"]), s(&x["connection"])))
            .collect();
        t.push_str(&format!("  {:<16} primary {:<16} {}\n", s(&v["name"]), s(&v["primary"]), reps.join(", ")));
    }
    t.push_str(&format!("\nalert {alert}\n"));
    t
}

/// The environment of a Pacemaker alert agent for one event. The four
/// kinds Pacemaker has are filled as Pacemaker fills them; every other
/// event comes as its own kind (`volume`, `quorum`, …: Pacemaker's sample
/// agents write those as "Unhandled"). `TANDEM_*` carry the whole event.
pub fn pacemaker_env(
    alert: &str,
    recipient: Option<&str>,
    timestamp_format: Option<&str>,
    node_id: Option<u64>,
    e: &Event,
) -> Vec<(String, String)> {
    let (category, action) = e.kind.split_once('.').unwrap_or((e.kind.as_str(), ""));
    let node = e.node.clone().unwrap_or_default();
    let d = &e.details;
    let ds = |k: &str| d[k].as_str().map(str::to_string);
    let mut v: Vec<(&str, String)> = vec![
        ("CRM_alert_version", PACEMAKER_ALERT_VERSION.into()),
        ("CRM_alert_recipient", recipient.unwrap_or_default().into()),
        ("CRM_alert_node_sequence", e.id.to_string()),
        ("CRM_alert_timestamp", strftime(timestamp_format.unwrap_or(DEFAULT_TIMESTAMP_FORMAT), e.time_ms)),
        ("CRM_alert_timestamp_epoch", (e.time_ms / 1000).to_string()),
        ("CRM_alert_timestamp_usec", ((e.time_ms % 1000) * 1000).to_string()),
        ("CRM_alert_node", node.clone()),
    ];
    if let Some(id) = node_id {
        v.push(("CRM_alert_nodeid", id.to_string()));
    }
    match category {
        "node" => {
            let desc = match action {
                "online" => "member",
                "offline" => "lost",
                other => other,
            };
            v.push(("CRM_alert_kind", "node".into()));
            v.push(("CRM_alert_desc", desc.into()));
        }
        "fence" => {
            let target = ds("target").unwrap_or_else(|| node.clone());
            let (rc, result) = match action {
                "confirmed" => ("0", "OK"),
                "failed" => ("1", "Error"),
                _ => ("", "pending"),
            };
            v.retain(|(k, _)| *k != "CRM_alert_node");
            v.push(("CRM_alert_node", target.clone()));
            v.push(("CRM_alert_kind", "fencing".into()));
            v.push(("CRM_alert_task", "off".into()));
            v.push(("CRM_alert_rc", rc.into()));
            v.push((
                "CRM_alert_desc",
                format!("Operation off of {target} by {node} for tandem: {result} ({})", e.message),
            ));
        }
        "group" | "resource" => {
            let rsc = e.resource.clone().or_else(|| e.group.clone()).unwrap_or_default();
            let (task, desc, rc) = match (category, action) {
                ("group", "starting") => ("start", "pending", "0"),
                ("group", "running") => ("start", "OK", "0"),
                ("group", "stopping") => ("stop", "pending", "0"),
                ("group", "stopped") => ("stop", "OK", "0"),
                ("group", "failed") => ("start", "error", "1"),
                ("group", "stop_failed") => ("stop", "error", "1"),
                ("group", "moved") => ("migrate_to", "OK", "0"),
                ("resource", "failed") => ("monitor", "error", "1"),
                ("resource", "restarted") => ("start", "OK", "0"),
                (_, other) => (other, "OK", "0"),
            };
            let rc = d["rc"].as_i64().map_or_else(|| rc.to_string(), |r| r.to_string());
            v.push(("CRM_alert_kind", "resource".into()));
            v.push(("CRM_alert_rsc", rsc));
            v.push(("CRM_alert_task", task.into()));
            v.push(("CRM_alert_desc", desc.into()));
            v.push(("CRM_alert_rc", rc));
            v.push(("CRM_alert_target_rc", "0".into()));
            v.push(("CRM_alert_status", "0".into()));
            v.push(("CRM_alert_interval", d["interval_ms"].as_u64().unwrap_or(0).to_string()));
        }
        "attribute" => {
            v.push(("CRM_alert_kind", "attribute".into()));
            v.push(("CRM_alert_attribute_name", ds("key").unwrap_or_default()));
            v.push(("CRM_alert_attribute_value", ds("value").unwrap_or_default()));
        }
        other => {
            v.push(("CRM_alert_kind", other.into()));
            v.push(("CRM_alert_task", action.into()));
            v.push(("CRM_alert_desc", e.message.clone()));
        }
    }
    let mut out: Vec<(String, String)> = v.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    out.push(("TANDEM_ALERT".into(), alert.into()));
    out.push(("TANDEM_EVENT_ID".into(), e.id.to_string()));
    out.push(("TANDEM_EVENT_KIND".into(), e.kind.clone()));
    out.push(("TANDEM_EVENT_SEVERITY".into(), e.severity.as_str().into()));
    out.push(("TANDEM_EVENT_MESSAGE".into(), e.message.clone()));
    for (k, val) in [("GROUP", &e.group), ("RESOURCE", &e.resource), ("VOLUME", &e.volume)] {
        if let Some(val) = val {
            out.push((format!("TANDEM_EVENT_{k}"), val.clone()));
        }
    }
    out.push(("TANDEM_EVENT_JSON".into(), serde_json::to_string(e).unwrap_or_default()));
    out
}

/// Formats `time_ms` (UTC) with the strftime conversions Pacemaker's
/// timestamp formats use: `%Y %m %d %H %M %S %y %j %s %z %Z %%` and `%N`
/// (nanoseconds, `%3N`/`%06N` for fewer digits). Anything else is kept
/// as written.
pub fn strftime(fmt: &str, time_ms: u64) -> String {
    let iso = rfc3339(time_ms); // YYYY-MM-DDTHH:MM:SS.mmmZ
    let part = |a: usize, b: usize| iso.get(a..b).unwrap_or("00").to_string();
    let nanos = format!("{:09}", (time_ms % 1000) * 1_000_000);
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut width = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            width.push(*d);
            chars.next();
        }
        match chars.next() {
            Some('Y') => out.push_str(&part(0, 4)),
            Some('y') => out.push_str(&part(2, 4)),
            Some('m') => out.push_str(&part(5, 7)),
            Some('d') => out.push_str(&part(8, 10)),
            Some('H') => out.push_str(&part(11, 13)),
            Some('M') => out.push_str(&part(14, 16)),
            Some('S') => out.push_str(&part(17, 19)),
            Some('s') => out.push_str(&(time_ms / 1000).to_string()),
            Some('z') => out.push_str("+0000"),
            Some('Z') => out.push_str("UTC"),
            Some('N') => {
                let n = width.parse::<usize>().unwrap_or(9).clamp(1, 9);
                out.push_str(&nanos[..n]);
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push_str(&width);
                out.push(other);
            }
            None => {
                out.push('%');
                out.push_str(&width);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str) -> Event {
        let mut e = Event::new(1_767_225_600_123, kind, Severity::Warning, format!("{kind} happened"))
            .node("node2")
            .group("web");
        e.id = 42;
        e.time = rfc3339(e.time_ms);
        e
    }

    fn env(e: &Event) -> std::collections::BTreeMap<String, String> {
        pacemaker_env("ops", Some("/tmp/a.log"), None, Some(2), e).into_iter().collect()
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Known answer: `printf '1700000000.{}' | openssl dgst -sha256 -hmac key`.
        assert_eq!(
            signature("key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
        assert_ne!(signature("key", 1, b"{}"), signature("key", 2, b"{}"));
        assert_ne!(signature("key", 1, b"{}"), signature("other", 1, b"{}"));
        assert_eq!(signature("key", 1, b"x").len(), 7 + 64);
    }

    #[test]
    fn pacemaker_node_events_say_member_and_lost() {
        let on = env(&event("node.online"));
        assert_eq!(on["CRM_alert_kind"], "node");
        assert_eq!(on["CRM_alert_desc"], "member");
        assert_eq!(on["CRM_alert_node"], "node2");
        assert_eq!(on["CRM_alert_nodeid"], "2");
        assert_eq!(on["CRM_alert_node_sequence"], "42");
        assert_eq!(on["CRM_alert_recipient"], "/tmp/a.log");
        assert_eq!(on["CRM_alert_version"], PACEMAKER_ALERT_VERSION);
        assert_eq!(env(&event("node.offline"))["CRM_alert_desc"], "lost");
        assert_eq!(env(&event("node.standby"))["CRM_alert_desc"], "standby");
    }

    #[test]
    fn pacemaker_resource_and_fencing_events_carry_task_rc_and_desc() {
        let failed = env(&event("group.failed"));
        assert_eq!(
            (failed["CRM_alert_kind"].as_str(), failed["CRM_alert_rsc"].as_str(), failed["CRM_alert_task"].as_str()),
            ("resource", "web", "start")
        );
        assert_eq!((failed["CRM_alert_desc"].as_str(), failed["CRM_alert_rc"].as_str()), ("error", "1"));
        assert_eq!(failed["CRM_alert_interval"], "0");
        assert_eq!(failed["CRM_alert_target_rc"], "0");
        let mut f = event("fence.confirmed");
        f.details = json!({"target": "node3"});
        let fenced = env(&f);
        assert_eq!(fenced["CRM_alert_kind"], "fencing");
        assert_eq!(fenced["CRM_alert_node"], "node3");
        assert_eq!(fenced["CRM_alert_rc"], "0");
        assert!(
            fenced["CRM_alert_desc"].starts_with("Operation off of node3 by node2"),
            "{}",
            fenced["CRM_alert_desc"]
        );
    }

    #[test]
    fn other_events_come_as_their_own_kind_with_the_whole_event() {
        let sb = env(&event("volume.split_brain"));
        assert_eq!(sb["CRM_alert_kind"], "volume");
        assert_eq!(sb["CRM_alert_task"], "split_brain");
        assert_eq!(sb["TANDEM_EVENT_KIND"], "volume.split_brain");
        let whole: Event = serde_json::from_str(&sb["TANDEM_EVENT_JSON"]).unwrap();
        assert_eq!(whole.id, 42);
    }

    #[test]
    fn timestamps_follow_pacemakers_format() {
        // 2026-01-01T00:00:00.123Z
        assert_eq!(strftime(DEFAULT_TIMESTAMP_FORMAT, 1_767_225_600_123), "00:00:00.123000");
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S.%3N %z", 1_767_225_600_123), "2026-01-01 00:00:00.123 +0000");
        assert_eq!(strftime("%s|%%|%q|%", 1_767_225_600_123), "1767225600|%|%q|%");
        assert_eq!(strftime("%N", 5), "005000000");
    }

    #[test]
    fn a_mail_names_the_event_and_a_report_every_node_and_group() {
        let (subject, body) = mail("c1", "ops", &Message::Event(event("node.offline")));
        assert!(subject.contains("WARNING") && subject.contains("node.offline happened"), "{subject}");
        assert!(body.contains("event    42") && body.contains("node     node2"), "{body}");
        let report = json!({"leader": "node1", "term": 3,
            "nodes": [{"name": "node1", "state": "online", "admin_state": "online", "role": "voter", "paths": [{"up": true}]}],
            "groups": [{"name": "web", "state": "running", "node": "node1", "epoch": 4}],
            "volumes": [{"name": "data", "primary": "node1", "replicas": [{"node": "node2", "disk": "UpToDate", "connection": "Connected"}]}]});
        let (subject, text) = mail("c1", "ops", &Message::Report { time_ms: 1_767_225_600_000, report });
        assert!(subject.contains("status report 2026-01-01"), "{subject}");
        for want in ["leader node1", "node1", "paths 1/1", "web", "epoch 4", "node2 UpToDate/Connected"] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }

    #[test]
    fn webhook_bodies_carry_the_event_or_the_report() {
        let b: Value =
            serde_json::from_slice(&webhook_body("c1", "ops", &Message::Event(event("group.moved")))).unwrap();
        assert_eq!(b["event"]["id"], 42);
        assert_eq!(b["alert"], "ops");
        assert_eq!(Message::Event(event("x.y")).dedup_id(), "42");
        let r = Message::Report { time_ms: 5, report: json!({"leader": "n1"}) };
        let b: Value = serde_json::from_slice(&webhook_body("c1", "ops", &r)).unwrap();
        assert_eq!(b["report"]["cluster"]["leader"], "n1");
        assert_eq!(r.dedup_id(), "report-5");
    }
}
