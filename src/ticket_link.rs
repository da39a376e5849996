//! The ticket's messages between its three participants (the two sites'
//! leaders and `tandem arbitrator`), and the grantor's desk that answers
//! them. Bodies are JSON sealed with HMAC-SHA256 under a key the three
//! share (booth's authfile): the seal, not TLS, makes a grant authentic,
//! because the two sites' clusters have different CAs and the arbitrator
//! has none. A request carries its sender's wall-clock time, so a replay
//! (an old request sent again) is refused.
//!
//! Pure but for reading the key file: bytes and clocks in, bytes out. It
//! never decides who holds the ticket (`ticket` does) and never sends.

use std::collections::BTreeMap;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ticket::{Answer, Grantor, Timing};

/// The HTTP header that carries a body's seal (hex).
pub const SEAL_HEADER: &str = tandem_http_api::TICKET_SEAL_HEADER;
/// The route every participant answers requests on.
pub const PATH: &str = "/internal/ticket";
/// A request sent longer ago than this (or this far in the future, by the
/// receiver's wall clock) is refused: the participants' clocks must agree
/// within it (NTP).
pub const FRESH_MS: u64 = 30_000;
/// A key shorter than this is refused.
pub const MIN_KEY_BYTES: usize = 32;

/// What went wrong with a ticket message or the key (each with its code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket message's seal does not match the shared key")]
    BadSeal,
    #[error("the ticket message is malformed: {0}")]
    Malformed(String),
    #[error("{0} is not a site of this ticket")]
    UnknownSite(String),
    #[error("the ticket request was sent {0} ms away from this clock: a replay, or clocks too far apart")]
    Stale(i64),
    #[error("the ticket request is not newer than the last one from site {0}: a replay")]
    Replayed(String),
    #[error("the sender's ticket timing (lease {theirs_lease} ms, margin {theirs_margin} ms) differs from this one's (lease {lease} ms, margin {margin} ms)")]
    TimingMismatch { theirs_lease: u64, theirs_margin: u64, lease: u64, margin: u64 },
    #[error("the ticket key file {path}: {why}")]
    KeyFile { path: String, why: String },
}

impl TicketError {
    /// The stable error code (docs/errors.md).
    pub fn code(&self) -> &'static str {
        match self {
            TicketError::BadSeal => "TND-1700",
            TicketError::Malformed(_) => "TND-1701",
            TicketError::UnknownSite(_) => "TND-1702",
            TicketError::Stale(_) | TicketError::Replayed(_) => "TND-1703",
            TicketError::TimingMismatch { .. } => "TND-1704",
            TicketError::KeyFile { .. } => "TND-1705",
        }
    }
}

/// A refused ticket message as the API shows it (the agent's and the
/// arbitrator's answers alike).
impl From<TicketError> for tandem_http_api::ApiError {
    fn from(e: TicketError) -> Self {
        use tandem_http_api::ApiError;
        let message = e.to_string();
        match e {
            TicketError::BadSeal => ApiError::TicketSeal,
            TicketError::Malformed(m) => ApiError::TicketMalformed(m),
            TicketError::UnknownSite(_) => ApiError::TicketUnknownSite(message),
            TicketError::Stale(_) | TicketError::Replayed(_) => ApiError::TicketReplayed(message),
            TicketError::TimingMismatch { .. } => ApiError::TicketTiming(message),
            TicketError::KeyFile { .. } => ApiError::Internal(message),
        }
    }
}

/// A site's request to a grantor: lend it the ticket (or, with `release`,
/// take it back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    pub site: String,
    pub round: u64,
    /// The sender's wall clock when it sent this (Unix ms).
    pub sent_unix_ms: u64,
    pub lease_ms: u64,
    pub margin_ms: u64,
    #[serde(default)]
    pub release: bool,
}

/// A grantor's answer, sealed too: a forged grant must not make a site
/// believe it holds the ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketAnswer {
    /// The grantor that answers.
    pub from: String,
    /// The site that asked, and its round.
    pub site: String,
    pub round: u64,
    pub granted: bool,
    /// Who it lends to instead, if it refused (none: quiet after a start).
    pub holder: Option<String>,
    pub left_ms: u64,
}

impl TicketAnswer {
    /// The core's view of the answer.
    pub fn answer(&self) -> Answer {
        match self.granted {
            true => Answer::Granted,
            false => Answer::Refused { holder: self.holder.clone(), left_ms: self.left_ms },
        }
    }
}

/// The key the three participants share.
#[derive(Clone)]
pub struct SealKey(Vec<u8>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// The key as given (at least `MIN_KEY_BYTES`).
    pub fn new(bytes: Vec<u8>) -> Result<SealKey, String> {
        match bytes.len() < MIN_KEY_BYTES {
            true => Err(format!("holds {} bytes, at least {MIN_KEY_BYTES} are needed", bytes.len())),
            false => Ok(SealKey(bytes)),
        }
    }

    /// Reads a key file (its content, surrounding white space ignored).
    pub fn load(path: &Path) -> Result<SealKey, TicketError> {
        let bad = |why: String| TicketError::KeyFile { path: path.display().to_string(), why };
        let raw = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let text = raw.trim_ascii().to_vec();
        SealKey::new(text).map_err(bad)
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// The seal of `body` (hex).
    pub fn seal(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `seal` is `body`'s (in constant time).
    pub fn check(&self, body: &[u8], seal: &str) -> Result<(), TicketError> {
        let bytes = from_hex(seal.trim()).ok_or(TicketError::BadSeal)?;
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&bytes).map_err(|_| TicketError::BadSeal)
    }

    /// `value` as JSON with its seal.
    pub fn sealed<T: Serialize>(&self, value: &T) -> (Vec<u8>, String) {
        let body = serde_json::to_vec(value).expect("ticket messages serialize");
        let seal = self.seal(&body);
        (body, seal)
    }

    /// The value of a sealed body, once its seal is checked.
    pub fn open<T: for<'a> Deserialize<'a>>(&self, body: &[u8], seal: &str) -> Result<T, TicketError> {
        self.check(body, seal)?;
        serde_json::from_slice(body).map_err(|e| TicketError::Malformed(e.to_string()))
    }
}

/// Bytes from hex digits (none if any pair is not hex).
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// A grantor with what it needs to answer sealed requests: the sites it
/// lends to and the newest request seen from each (replays refused).
#[derive(Debug)]
pub struct Desk {
    name: String,
    sites: Vec<String>,
    timing: Timing,
    grantor: Grantor,
    newest: BTreeMap<String, u64>,
}

impl Desk {
    /// Grantor `name` lending to `sites`, starting at `now_ms` (quiet for a
    /// lease: see `Grantor::new`).
    pub fn new(name: &str, sites: &[String], timing: Timing, now_ms: u64) -> Desk {
        Desk {
            name: name.to_string(),
            sites: sites.to_vec(),
            timing,
            grantor: Grantor::new(timing, now_ms),
            newest: BTreeMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Answers one request (already opened): refusals of the message leave
    /// the grantor as it was.
    pub fn answer(&mut self, req: &TicketRequest, now_ms: u64, now_unix_ms: u64) -> Result<TicketAnswer, TicketError> {
        if !self.sites.contains(&req.site) {
            return Err(TicketError::UnknownSite(req.site.clone()));
        }
        if req.lease_ms != self.timing.lease_ms || req.margin_ms != self.timing.margin_ms {
            return Err(TicketError::TimingMismatch {
                theirs_lease: req.lease_ms,
                theirs_margin: req.margin_ms,
                lease: self.timing.lease_ms,
                margin: self.timing.margin_ms,
            });
        }
        let skew = req.sent_unix_ms as i64 - now_unix_ms as i64;
        if skew.unsigned_abs() > FRESH_MS {
            return Err(TicketError::Stale(skew));
        }
        if self.newest.get(&req.site).is_some_and(|t| req.sent_unix_ms <= *t) {
            return Err(TicketError::Replayed(req.site.clone()));
        }
        self.newest.insert(req.site.clone(), req.sent_unix_ms);
        let answer = match req.release {
            true => {
                self.grantor.release(&req.site);
                Answer::Refused { holder: None, left_ms: 0 }
            }
            false => self.grantor.request(&req.site, now_ms),
        };
        let (granted, holder, left_ms) = match answer {
            Answer::Granted => (true, None, self.timing.lease_ms),
            Answer::Refused { holder, left_ms } => (false, holder, left_ms),
        };
        Ok(TicketAnswer { from: self.name.clone(), site: req.site.clone(), round: req.round, granted, holder, left_ms })
    }

    /// This grantor's own site asks (no message: the same process).
    pub fn request_local(&mut self, site: &str, now_ms: u64) -> Answer {
        self.grantor.request(site, now_ms)
    }

    /// This grantor's own site gives its loan back.
    pub fn release_local(&mut self, site: &str) {
        self.grantor.release(site);
    }

    /// A sealed request in, a sealed answer out.
    pub fn handle(
        &mut self,
        key: &SealKey,
        body: &[u8],
        seal: &str,
        now_ms: u64,
        now_unix_ms: u64,
    ) -> Result<(Vec<u8>, String), TicketError> {
        let req: TicketRequest = key.open(body, seal)?;
        let answer = self.answer(&req, now_ms, now_unix_ms)?;
        Ok(key.sealed(&answer))
    }

    /// The site it lends to now.
    pub fn lent_to(&self, now_ms: u64) -> Option<String> {
        self.grantor.lent_to(now_ms).map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing { lease_ms: 2_000, margin_ms: 400, renew_ms: 400 };

    fn key() -> SealKey {
        SealKey::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
    }

    fn sites() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn req(site: &str, round: u64, sent: u64) -> TicketRequest {
        TicketRequest { site: site.into(), round, sent_unix_ms: sent, lease_ms: 2_000, margin_ms: 400, release: false }
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(SealKey::new(vec![7; MIN_KEY_BYTES - 1]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "short\n").unwrap();
        assert_eq!(SealKey::load(&path).unwrap_err().code(), "TND-1705");
        assert_eq!(SealKey::load(&dir.path().join("missing")).unwrap_err().code(), "TND-1705");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        let k = SealKey::load(&path).unwrap();
        assert_eq!(k.seal(b"x"), key().seal(b"x"), "the trailing newline is not part of the key");
    }

    #[test]
    fn a_seal_binds_body_and_key() {
        let (body, seal) = key().sealed(&req("a", 1, 5));
        assert_eq!(key().open::<TicketRequest>(&body, &seal).unwrap(), req("a", 1, 5));
        let mut changed = body.clone();
        changed[10] ^= 1;
        assert_eq!(key().check(&changed, &seal), Err(TicketError::BadSeal));
        let other = SealKey::new(vec![b'z'; 32]).unwrap();
        assert_eq!(other.check(&body, &seal), Err(TicketError::BadSeal));
        assert_eq!(key().check(&body, "not hex"), Err(TicketError::BadSeal));
        assert_eq!(key().check(&body, ""), Err(TicketError::BadSeal));
    }

    #[test]
    fn a_desk_lends_after_its_quiet_lease_to_one_site_at_a_time() {
        let mut d = Desk::new("arbitrator", &sites(), T, 0);
        let now = 1_000_000;
        // Quiet for a lease after its start.
        let a = d.answer(&req("a", 1, now), 10, now).unwrap();
        assert!(!a.granted && a.holder.is_none() && a.left_ms == 1_990);
        let a = d.answer(&req("a", 2, now + 1), 2_000, now + 1).unwrap();
        assert!(a.granted);
        assert_eq!((a.from.as_str(), a.site.as_str(), a.round), ("arbitrator", "a", 2));
        let b = d.answer(&req("b", 1, now + 2), 2_500, now + 2).unwrap();
        assert_eq!((b.granted, b.holder.as_deref(), b.left_ms), (false, Some("a"), 1_500));
        assert_eq!(d.lent_to(2_500).as_deref(), Some("a"));
        // Lapsed: the other site may have it.
        assert!(d.answer(&req("b", 2, now + 3), 4_000, now + 3).unwrap().granted);
        // Given back: lent to nobody.
        let mut rel = req("b", 3, now + 4);
        rel.release = true;
        assert!(!d.answer(&rel, 4_100, now + 4).unwrap().granted);
        assert_eq!(d.lent_to(4_100), None);
        assert!(d.answer(&req("a", 3, now + 5), 4_200, now + 5).unwrap().granted);
    }

    #[test]
    fn refused_messages_change_nothing() {
        let mut d = Desk::new("b", &sites(), T, 0);
        let now = 1_000_000;
        assert!(d.answer(&req("a", 1, now), 2_000, now).unwrap().granted);
        let before = format!("{d:?}");
        let cases = [
            (req("c", 2, now + 1), "TND-1702"),
            (req("b", 2, now - FRESH_MS - 1), "TND-1703"),
            (req("b", 2, now + FRESH_MS + 1), "TND-1703"),
            // The same request again: a replay.
            (req("a", 1, now), "TND-1703"),
            (TicketRequest { lease_ms: 3_000, ..req("b", 2, now + 1) }, "TND-1704"),
        ];
        for (r, code) in cases {
            assert_eq!(d.answer(&r, 2_100, now).unwrap_err().code(), code, "{r:?}");
            assert_eq!(format!("{d:?}"), before, "{r:?} changed the desk");
        }
        // A forged or unreadable message, through `handle`.
        let (body, _) = key().sealed(&req("b", 2, now + 1));
        assert_eq!(d.handle(&key(), &body, &"0".repeat(64), 2_100, now).unwrap_err().code(), "TND-1700");
        let seal = key().seal(b"{\"site\": 1}");
        assert_eq!(d.handle(&key(), b"{\"site\": 1}", &seal, 2_100, now).unwrap_err().code(), "TND-1701");
        assert_eq!(format!("{d:?}"), before);
    }

    #[test]
    fn a_sealed_round_trip() {
        let mut d = Desk::new("arbitrator", &sites(), T, 0);
        let (body, seal) = key().sealed(&req("a", 7, 1_000_000));
        let (answer, aseal) = d.handle(&key(), &body, &seal, 5_000, 1_000_000).unwrap();
        let a: TicketAnswer = key().open(&answer, &aseal).unwrap();
        assert_eq!(a.answer(), Answer::Granted);
        assert_eq!(a.round, 7);
    }
}
