//! What the harness does with the answer to a request it makes as a client
//! of the cluster (start a verify, move a group): pure, no I/O.
//!
//! It behaves as any careful client must: a request the cluster could not
//! take right now (503 with `Retry-After`, a primary that just moved, a
//! node that did not answer) is tried again, after the delay the server
//! asked for (bounded), until it is accepted or the caller's deadline
//! passes; a refusal that no retry can change is reported with its code
//! and message. It must never treat an unanswered request as accepted.

use std::time::Duration;

/// The longest a `Retry-After` is honoured: the caller's deadline is in
/// seconds, a server asking for minutes is asking the caller to give up.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The wait when a 503 names no delay.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The wait after no answer at all (connection refused, timeout): the node
/// may be restarting or the client may have picked a node that just died.
pub const NO_ANSWER_RETRY: Duration = Duration::from_millis(200);

/// What a request came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer: its status, its `Retry-After` header and, for an
    /// error, the body's `code` and `message`.
    Answered { status: u16, retry_after: Option<String>, code: Option<String>, message: Option<String> },
    /// No answer (connection refused or reset, timeout): the request may or
    /// may not have reached the server.
    NoAnswer { reason: String },
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Done: the request was taken (or its effect is already there).
    Accepted,
    /// Read the current target again (the primary may have moved) and send
    /// the request again after `after`; `why` for the log.
    Retry { after: Duration, why: String },
    /// A refusal no retry changes: report it.
    Refused { status: u16, code: String, message: String },
}

/// Codes that say "try again in a moment" although their status is not a
/// 503: the volume's group is moving or starting (no primary yet, the
/// data plane not set up yet, a primary that was just replaced).
const TRANSIENT_CODES: &[&str] = &[
    "TND-1400", // the volume is not set up on that node yet
    "TND-1401", // no primary: its group is not running (moving)
    "TND-1411", // another node became the primary
];

/// Classifies one outcome. `already_done` lists the error codes meaning
/// the request's effect is already there — the answer to a retry of a
/// request whose first try landed but whose answer was lost (a verify
/// that already runs).
pub fn classify(outcome: &Outcome, already_done: &[&str]) -> Next {
    let (status, retry_after, code, message) = match outcome {
        Outcome::NoAnswer { reason } => return Next::Retry { after: NO_ANSWER_RETRY, why: reason.clone() },
        Outcome::Answered { status, retry_after, code, message } => (*status, retry_after, code, message),
    };
    let code_str = code.as_deref().unwrap_or("");
    let why = || match (code, message) {
        (Some(c), Some(m)) => format!("{status} {c}: {m}"),
        (Some(c), None) => format!("{status} {c}"),
        (None, Some(m)) => format!("{status}: {m}"),
        (None, None) => format!("{status}"),
    };
    if (200..300).contains(&status) || already_done.contains(&code_str) {
        return Next::Accepted;
    }
    match status {
        // Unavailable for now, or too many requests: the server says when.
        503 | 429 => Next::Retry { after: retry_delay(retry_after.as_deref()), why: why() },
        // A redirect the HTTP client did not follow (a loop, too many):
        // the target moved; read it again.
        300..=399 => Next::Retry { after: DEFAULT_RETRY_AFTER, why: why() },
        _ if TRANSIENT_CODES.contains(&code_str) => Next::Retry { after: DEFAULT_RETRY_AFTER, why: why() },
        _ => Next::Refused {
            status,
            code: code.clone().unwrap_or_else(|| "-".into()),
            message: message.clone().unwrap_or_default(),
        },
    }
}

/// The delay a `Retry-After` header asks for, in whole seconds (the form
/// tandem sends), capped at [`MAX_RETRY_AFTER`]; the default when absent
/// or given as a date.
pub fn retry_delay(header: Option<&str>) -> Duration {
    header
        .and_then(|h| h.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
        .unwrap_or(DEFAULT_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, retry_after: Option<&str>, code: Option<&str>) -> Outcome {
        Outcome::Answered {
            status,
            retry_after: retry_after.map(str::to_string),
            code: code.map(str::to_string),
            message: code.map(|c| format!("message of {c}")),
        }
    }

    #[test]
    fn accepted_answers_end_the_retries() {
        assert_eq!(classify(&answer(202, None, None), &[]), Next::Accepted);
        assert_eq!(classify(&answer(200, None, None), &[]), Next::Accepted);
        // A verify already running is the one a lost answer started.
        assert_eq!(classify(&answer(409, None, Some("TND-1405")), &["TND-1405"]), Next::Accepted);
        assert!(matches!(classify(&answer(409, None, Some("TND-1405")), &[]), Next::Refused { .. }));
    }

    #[test]
    fn no_leader_is_retried_after_the_delay_the_server_asks_for() {
        // Seed 9001: the verify met an election (503 TND-1202, Retry-After 1).
        let next = classify(&answer(503, Some("1"), Some("TND-1202")), &[]);
        assert_eq!(
            next,
            Next::Retry { after: Duration::from_secs(1), why: "503 TND-1202: message of TND-1202".into() }
        );
        // Honoured but bounded; a date or garbage falls back to the default.
        assert_eq!(retry_delay(Some("3")), Duration::from_secs(3));
        assert_eq!(retry_delay(Some("3600")), MAX_RETRY_AFTER);
        assert_eq!(retry_delay(Some("Wed, 21 Oct 2026 07:28:00 GMT")), DEFAULT_RETRY_AFTER);
        assert_eq!(retry_delay(None), DEFAULT_RETRY_AFTER);
        assert!(
            matches!(classify(&answer(429, Some("2"), None), &[]), Next::Retry { after, .. } if after == Duration::from_secs(2))
        );
    }

    #[test]
    fn a_moving_primary_and_silence_are_retried() {
        for code in ["TND-1400", "TND-1401", "TND-1411"] {
            let status = if code == "TND-1400" { 404 } else { 409 };
            assert!(matches!(classify(&answer(status, None, Some(code)), &[]), Next::Retry { .. }), "{code}");
        }
        assert!(matches!(classify(&answer(307, None, None), &[]), Next::Retry { .. }));
        let silent = Outcome::NoAnswer { reason: "connection refused".into() };
        assert_eq!(classify(&silent, &[]), Next::Retry { after: NO_ANSWER_RETRY, why: "connection refused".into() });
    }

    #[test]
    fn other_refusals_are_reported_with_their_code_and_message() {
        assert_eq!(
            classify(&answer(404, None, Some("TND-1407")), &[]),
            Next::Refused { status: 404, code: "TND-1407".into(), message: "message of TND-1407".into() }
        );
        assert_eq!(
            classify(&answer(500, None, None), &[]),
            Next::Refused { status: 500, code: "-".into(), message: String::new() }
        );
    }
}
