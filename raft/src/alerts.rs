//! Alerts: where the cluster sends its events, defined at run time.
//!
//! Part of the replicated state: each alert's target (a webhook, a mail
//! server, a Pacemaker-style alert agent), its filters, and its *cursor* —
//! the id of the last event its sender is done with. The leader sends; a new
//! leader starts from the replicated cursor, so a leader change re-sends at
//! most what was sent and not yet recorded (at-least-once, the event id to
//! de-duplicate), and never skips.
//!
//! Pure: it validates and keeps; it sends nothing, reads no clock. Secrets
//! (a webhook's key, a mail password) are kept here, because the sender
//! needs them, and must never leave through a view ([`AlertSpec::redacted`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{invalid, validate_name, CommandError};
use crate::events::{EventFilter, Severity};

/// Most alerts one cluster keeps.
pub const MAX_ALERTS: usize = 32;
/// Most kinds one filter lists, and mail recipients one alert has.
pub const MAX_ALERT_KINDS: usize = 64;
pub const MAX_ALERT_RECIPIENTS: usize = 32;
/// Longest URL, address, recipient, command argument or secret.
pub const MAX_ALERT_TEXT: usize = 2048;
/// Most arguments of an exec alert's command.
pub const MAX_ALERT_ARGS: usize = 32;
/// Bounds of a periodic status report's interval (seconds): 10 s (tests, drills) to 30 days.
pub const MIN_REPORT_INTERVAL_S: u64 = 10;
pub const MAX_REPORT_INTERVAL_S: u64 = 30 * 86_400;
/// Bounds of an exec alert's timeout (ms).
pub const MIN_EXEC_TIMEOUT_MS: u64 = 100;
pub const MAX_EXEC_TIMEOUT_MS: u64 = 600_000;
/// Longest `cacert` (characters): a few certificates. The API's body limit
/// leaves room for one past it in any escaping (http-api's
/// `worst_alert_body_fits` test).
pub const MAX_ALERT_PEM: usize = 12 * 1024;
/// What a redacted secret reads as.
pub const REDACTED: &str = "(set)";

/// An alert's definition: where it goes (`kind`) and which events it wants
/// (`min_severity`, `kinds`; the same fields in every kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AlertSpec {
    /// A JSON POST per event, signed with HMAC-SHA256 of `secret`.
    Webhook {
        /// `http://` or `https://`.
        url: String,
        /// The HMAC key of the `X-Tandem-Signature` header (write-only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
        /// PEM of the CA that signed the receiver's certificate (default:
        /// the system's trust store).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cacert: Option<String>,
        /// Only events at least this severe (default `info`: all).
        #[serde(default)]
        min_severity: Severity,
        /// Only these kinds (exact, or a prefix ending in `.`: `group.`);
        /// empty: every kind.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kinds: Vec<String>,
        /// Also send a status report of the whole cluster this often
        /// (seconds, 10 to 2592000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report_interval_s: Option<u64>,
    },
    /// A mail per event through an SMTP server.
    Smtp {
        /// Host name or IP address of the mail server.
        server: String,
        /// Its port (default 587 with STARTTLS, 25 without).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// Upgrade the connection with STARTTLS (required when true).
        #[serde(default = "yes")]
        starttls: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        /// Write-only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
        from: String,
        to: Vec<String>,
        /// PEM of the CA that signed the server's certificate (default: the
        /// system's trust store).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cacert: Option<String>,
        #[serde(default)]
        min_severity: Severity,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kinds: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report_interval_s: Option<u64>,
    },
    /// A Pacemaker-style alert agent, run on the leader with the
    /// `CRM_alert_*` environment Pacemaker gives its agents.
    Exec {
        /// The program and its arguments (an absolute path first).
        command: Vec<String>,
        /// `CRM_alert_recipient` (a file, an address: the agent decides).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recipient: Option<String>,
        /// `CRM_alert_timestamp`'s format (Pacemaker's `timestamp-format`,
        /// default `%H:%M:%S.%06N`, in UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timestamp_format: Option<String>,
        /// Killed after this long (default 30000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        #[serde(default)]
        min_severity: Severity,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kinds: Vec<String>,
    },
}

fn yes() -> bool {
    true
}

impl AlertSpec {
    /// `webhook`, `smtp` or `exec`.
    pub fn kind(&self) -> &'static str {
        match self {
            AlertSpec::Webhook { .. } => "webhook",
            AlertSpec::Smtp { .. } => "smtp",
            AlertSpec::Exec { .. } => "exec",
        }
    }

    pub fn min_severity(&self) -> Severity {
        match self {
            AlertSpec::Webhook { min_severity, .. }
            | AlertSpec::Smtp { min_severity, .. }
            | AlertSpec::Exec { min_severity, .. } => *min_severity,
        }
    }

    pub fn kinds(&self) -> &[String] {
        match self {
            AlertSpec::Webhook { kinds, .. } | AlertSpec::Smtp { kinds, .. } | AlertSpec::Exec { kinds, .. } => kinds,
        }
    }

    pub fn report_interval_s(&self) -> Option<u64> {
        match self {
            AlertSpec::Webhook { report_interval_s, .. } | AlertSpec::Smtp { report_interval_s, .. } => {
                *report_interval_s
            }
            AlertSpec::Exec { .. } => None,
        }
    }

    /// The filter of the events this alert sends.
    pub fn filter(&self) -> EventFilter {
        EventFilter { kinds: self.kinds().to_vec(), min_severity: Some(self.min_severity()), group: None, node: None }
    }

    /// The definition as any view shows it: secrets replaced by [`REDACTED`].
    pub fn redacted(&self) -> AlertSpec {
        let hide = |s: &Option<String>| s.as_ref().map(|_| REDACTED.to_string());
        let mut shown = self.clone();
        match &mut shown {
            AlertSpec::Webhook { secret, .. } => *secret = hide(secret),
            AlertSpec::Smtp { password, .. } => *password = hide(password),
            AlertSpec::Exec { .. } => {}
        }
        shown
    }

    /// Checks every field, naming the first that is wrong.
    pub fn validate(&self) -> Result<(), CommandError> {
        let text = |field: &str, s: &str| -> Result<(), CommandError> {
            if s.is_empty() || s.chars().count() > MAX_ALERT_TEXT {
                return Err(invalid(field, format!("must be 1 to {MAX_ALERT_TEXT} characters")));
            }
            if s.contains('\0') {
                return Err(invalid(field, "must not contain NUL"));
            }
            Ok(())
        };
        let opt = |field: &str, s: &Option<String>| s.as_deref().map_or(Ok(()), |s| text(field, s));
        let pem = |field: &str, s: &Option<String>| -> Result<(), CommandError> {
            match s {
                Some(p) if !p.contains("-----BEGIN CERTIFICATE-----") || p.chars().count() > MAX_ALERT_PEM => {
                    Err(invalid(field, format!("must be PEM certificates (at most {MAX_ALERT_PEM} characters)")))
                }
                _ => Ok(()),
            }
        };
        match self {
            AlertSpec::Webhook { url, secret, cacert, .. } => {
                text("url", url)?;
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))
                    .ok_or_else(|| invalid("url", "must start with http:// or https://"))?;
                let bad = |c: char| c.is_whitespace() || c.is_control();
                if rest.is_empty() || rest.starts_with('/') || rest.contains(bad) {
                    return Err(invalid("url", "must name a host (http://host[:port]/path), without spaces"));
                }
                opt("secret", secret)?;
                pem("cacert", cacert)?;
            }
            AlertSpec::Smtp { server, port, username, password, from, to, cacert, .. } => {
                text("server", server)?;
                let ok = |c: char| c.is_ascii_alphanumeric() || ".-_:".contains(c);
                if server.len() > 253 || !server.chars().all(ok) {
                    return Err(invalid("server", "must be a host name or an IP address"));
                }
                if *port == Some(0) {
                    return Err(invalid("port", "must be 1-65535"));
                }
                opt("username", username)?;
                opt("password", password)?;
                if password.is_some() != username.is_some() {
                    return Err(invalid("password", "username and password go together"));
                }
                mailbox("from", from)?;
                if to.is_empty() || to.len() > MAX_ALERT_RECIPIENTS {
                    return Err(invalid("to", format!("must list 1 to {MAX_ALERT_RECIPIENTS} addresses")));
                }
                for (i, a) in to.iter().enumerate() {
                    mailbox(&format!("to[{i}]"), a)?;
                }
                pem("cacert", cacert)?;
            }
            AlertSpec::Exec { command, recipient, timestamp_format, timeout_ms, .. } => {
                if command.is_empty() || command.len() > MAX_ALERT_ARGS {
                    return Err(invalid("command", format!("must have 1 to {MAX_ALERT_ARGS} arguments")));
                }
                if !command[0].starts_with('/') {
                    return Err(invalid("command[0]", "must be an absolute path"));
                }
                for (i, a) in command.iter().enumerate() {
                    if a.chars().count() > MAX_ALERT_TEXT || a.contains('\0') || (i == 0 && a.len() < 2) {
                        return Err(invalid(
                            &format!("command[{i}]"),
                            format!("must be at most {MAX_ALERT_TEXT} characters, no NUL"),
                        ));
                    }
                }
                opt("recipient", recipient)?;
                opt("timestamp_format", timestamp_format)?;
                if let Some(t) = timeout_ms {
                    if !(MIN_EXEC_TIMEOUT_MS..=MAX_EXEC_TIMEOUT_MS).contains(t) {
                        return Err(invalid(
                            "timeout_ms",
                            format!("must be {MIN_EXEC_TIMEOUT_MS} to {MAX_EXEC_TIMEOUT_MS}"),
                        ));
                    }
                }
            }
        }
        if self.kinds().len() > MAX_ALERT_KINDS {
            return Err(invalid("kinds", format!("at most {MAX_ALERT_KINDS}")));
        }
        for (i, k) in self.kinds().iter().enumerate() {
            let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.';
            if k.is_empty() || k.len() > 128 || !k.chars().all(ok) || k.starts_with('.') {
                return Err(invalid(
                    &format!("kinds[{i}]"),
                    "must be an event kind (`group.moved`) or a prefix ending in `.` (`group.`)",
                ));
            }
        }
        if let Some(r) = self.report_interval_s() {
            if !(MIN_REPORT_INTERVAL_S..=MAX_REPORT_INTERVAL_S).contains(&r) {
                return Err(invalid(
                    "report_interval_s",
                    format!("must be {MIN_REPORT_INTERVAL_S} to {MAX_REPORT_INTERVAL_S} seconds"),
                ));
            }
        }
        Ok(())
    }
}

/// `local@domain`, nothing around it (display names are not taken).
fn mailbox(field: &str, a: &str) -> Result<(), CommandError> {
    let ok = a.chars().count() <= 254
        && a.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !a.chars().any(|c| c.is_whitespace() || c.is_control() || "<>,;\"".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{a:?} is not a mail address (local@domain)")))
    }
}

/// An alert as the cluster keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub spec: AlertSpec,
    /// Unix ms of its first definition and its last change.
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Who defined it last (a token name, a certificate, `local`).
    #[serde(default)]
    pub by: String,
    /// The last event id its sender is done with (sent, or not wanted).
    pub cursor: u64,
    /// Events sent so far.
    #[serde(default)]
    pub sent: u64,
    /// Unix ms of the last status report (its definition's time before the
    /// first): the next one is due `report_interval_s` after it.
    #[serde(default)]
    pub report_ms: u64,
}

/// The cluster's alerts, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alerts {
    #[serde(default)]
    pub by_name: BTreeMap<String, AlertRecord>,
}

impl Alerts {
    /// Defines or replaces an alert. A new one starts after the newest
    /// event (`last_event`): it sends what happens from now on. A replaced
    /// one keeps its cursor and report time. Returns whether it is new.
    pub fn put(
        &mut self,
        name: &str,
        spec: &AlertSpec,
        time_ms: u64,
        by: &str,
        last_event: u64,
    ) -> Result<bool, CommandError> {
        validate_name("name", name)?;
        spec.validate()?;
        if let Some(r) = self.by_name.get_mut(name) {
            r.spec = spec.clone();
            r.updated_ms = time_ms;
            r.by = by.to_string();
            return Ok(false);
        }
        if self.by_name.len() >= MAX_ALERTS {
            return Err(CommandError::TooManyAlerts { max: MAX_ALERTS });
        }
        self.by_name.insert(
            name.to_string(),
            AlertRecord {
                spec: spec.clone(),
                created_ms: time_ms,
                updated_ms: time_ms,
                by: by.to_string(),
                cursor: last_event,
                sent: 0,
                report_ms: time_ms,
            },
        );
        Ok(true)
    }

    pub fn delete(&mut self, name: &str) -> Result<(), CommandError> {
        self.by_name.remove(name).map(|_| ()).ok_or_else(|| CommandError::AlertNotFound { name: name.to_string() })
    }

    /// Records what a sender is done with. Never moves back (a deposed
    /// leader's late record changes nothing a newer one recorded).
    pub fn advance(&mut self, name: &str, cursor: u64, sent: u64, report_ms: Option<u64>) -> Result<(), CommandError> {
        let r = self.by_name.get_mut(name).ok_or_else(|| CommandError::AlertNotFound { name: name.to_string() })?;
        if cursor > r.cursor {
            r.cursor = cursor;
            r.sent = r.sent.saturating_add(sent);
        }
        if let Some(t) = report_ms {
            r.report_ms = r.report_ms.max(t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(url: &str) -> AlertSpec {
        AlertSpec::Webhook {
            url: url.into(),
            secret: Some("k".into()),
            cacert: None,
            min_severity: Severity::Info,
            kinds: vec![],
            report_interval_s: None,
        }
    }

    fn field(e: CommandError) -> String {
        match e {
            CommandError::Invalid { field, .. } => field,
            other => panic!("not Invalid: {other:?}"),
        }
    }

    #[test]
    fn the_documented_shapes_parse_and_unknown_fields_are_refused() {
        let w: AlertSpec = serde_json::from_str(
            r#"{"kind":"webhook","url":"http://10.0.0.9:8080/hook","secret":"s","min_severity":"warning","kinds":["group."]}"#,
        )
        .unwrap();
        assert_eq!(w.kind(), "webhook");
        assert_eq!(w.min_severity(), Severity::Warning);
        let m: AlertSpec = serde_json::from_str(
            r#"{"kind":"smtp","server":"mail","port":25,"starttls":false,"from":"ha@x.org","to":["ops@x.org"],"report_interval_s":86400}"#,
        )
        .unwrap();
        assert!(m.validate().is_ok());
        let x: AlertSpec = serde_json::from_str(
            r#"{"kind":"exec","command":["/usr/share/pacemaker/alerts/alert_file.sh.sample"],"recipient":"/var/log/a.log"}"#,
        )
        .unwrap();
        assert!(x.validate().is_ok());
        for bad in [
            r#"{"kind":"webhook","url":"http://a","colour":1}"#,
            r#"{"kind":"pager","url":"http://a"}"#,
            r#"{"url":"http://a"}"#,
            r#"{"kind":"exec","command":["/bin/true"],"url":"http://a"}"#,
            r#"{"kind":"exec","command":["/bin/true"],"report_interval_s":3600}"#,
        ] {
            assert!(serde_json::from_str::<AlertSpec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field(webhook("ftp://a").validate().unwrap_err()), "url");
        assert_eq!(field(webhook("http:///x").validate().unwrap_err()), "url");
        let hook = |kinds: Vec<&str>, report: Option<u64>| AlertSpec::Webhook {
            url: "http://a".into(),
            secret: None,
            cacert: None,
            min_severity: Severity::Info,
            kinds: kinds.into_iter().map(Into::into).collect(),
            report_interval_s: report,
        };
        assert_eq!(field(hook(vec!["Group"], None).validate().unwrap_err()), "kinds[0]");
        assert_eq!(field(hook(vec![], Some(5)).validate().unwrap_err()), "report_interval_s");
        assert!(hook(vec!["group.", "node.offline"], Some(86_400)).validate().is_ok());
        let mail = |to: Vec<&str>, user: Option<&str>, pass: Option<&str>| AlertSpec::Smtp {
            server: "mail".into(),
            port: None,
            starttls: true,
            username: user.map(Into::into),
            password: pass.map(Into::into),
            from: "a@b".into(),
            to: to.into_iter().map(Into::into).collect(),
            cacert: None,
            min_severity: Severity::Info,
            kinds: vec![],
            report_interval_s: None,
        };
        assert_eq!(field(mail(vec![], None, None).validate().unwrap_err()), "to");
        assert_eq!(field(mail(vec!["ops"], None, None).validate().unwrap_err()), "to[0]");
        assert_eq!(field(mail(vec!["o@x"], Some("u"), None).validate().unwrap_err()), "password");
        assert!(mail(vec!["o@x"], Some("u"), Some("p")).validate().is_ok());
        let exec = |cmd: Vec<&str>, timeout: Option<u64>| AlertSpec::Exec {
            command: cmd.into_iter().map(Into::into).collect(),
            recipient: None,
            timestamp_format: None,
            timeout_ms: timeout,
            min_severity: Severity::Info,
            kinds: vec![],
        };
        assert_eq!(field(exec(vec![], None).validate().unwrap_err()), "command");
        assert_eq!(field(exec(vec!["alert.sh"], None).validate().unwrap_err()), "command[0]");
        assert_eq!(field(exec(vec!["/bin/true"], Some(5)).validate().unwrap_err()), "timeout_ms");
        assert!(exec(vec!["/bin/true"], Some(5_000)).validate().is_ok());
    }

    #[test]
    fn secrets_never_show_in_a_redacted_definition() {
        let s = webhook("http://a");
        let shown = serde_json::to_string(&s.redacted()).unwrap();
        assert!(!shown.contains("\"k\""), "{shown}");
        assert!(shown.contains(REDACTED));
        let m = AlertSpec::Smtp {
            server: "mail".into(),
            port: None,
            starttls: true,
            username: Some("u".into()),
            password: Some("hunter2".into()),
            from: "a@b".into(),
            to: vec!["c@d".into()],
            cacert: None,
            min_severity: Severity::Info,
            kinds: vec![],
            report_interval_s: None,
        };
        assert!(!serde_json::to_string(&m.redacted()).unwrap().contains("hunter2"));
    }

    #[test]
    fn a_new_alert_starts_after_the_newest_event_and_a_replaced_one_keeps_its_cursor() {
        let mut a = Alerts::default();
        assert!(a.put("ops", &webhook("http://a"), 1_000, "admin", 41).unwrap());
        assert_eq!(a.by_name["ops"].cursor, 41);
        a.advance("ops", 45, 2, None).unwrap();
        assert!(!a.put("ops", &webhook("http://b"), 2_000, "admin", 99).unwrap());
        let r = &a.by_name["ops"];
        assert_eq!((r.cursor, r.sent, r.created_ms, r.updated_ms), (45, 2, 1_000, 2_000));
    }

    #[test]
    fn a_cursor_never_moves_back_and_unknown_alerts_are_refused_unchanged() {
        let mut a = Alerts::default();
        a.put("ops", &webhook("http://a"), 1_000, "admin", 0).unwrap();
        a.advance("ops", 10, 3, Some(5_000)).unwrap();
        a.advance("ops", 7, 1, Some(4_000)).unwrap();
        let r = &a.by_name["ops"];
        assert_eq!((r.cursor, r.sent, r.report_ms), (10, 3, 5_000));
        let before = a.clone();
        assert!(matches!(a.advance("nope", 11, 1, None), Err(CommandError::AlertNotFound { .. })));
        assert!(matches!(a.delete("nope"), Err(CommandError::AlertNotFound { .. })));
        assert!(a.put("Bad Name", &webhook("http://a"), 1, "x", 0).is_err());
        assert_eq!(a, before);
    }

    #[test]
    fn at_most_max_alerts() {
        let mut a = Alerts::default();
        for i in 0..MAX_ALERTS {
            a.put(&format!("a{i}"), &webhook("http://a"), 1, "x", 0).unwrap();
        }
        let before = a.clone();
        assert!(matches!(a.put("one-more", &webhook("http://a"), 1, "x", 0), Err(CommandError::TooManyAlerts { .. })));
        assert_eq!(a, before);
        // Replacing one is not a new one.
        assert!(a.put("a0", &webhook("http://b"), 2, "x", 0).is_ok());
    }
}
