//! Who may drive the API, and what they did: API tokens with roles, and the
//! audit log. Part of the replicated state, so every node authenticates a
//! token against the same table and the audit log survives a leader change.
//!
//! Pure like the rest of the state machine: times arrive inside commands, and
//! a token's secret is never held here — only its SHA-256. What a role may
//! do is decided by the API layer's route table, not here.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::error::{invalid, validate_name, CommandError};

/// Most tokens a cluster keeps (join tokens included).
pub const MAX_TOKENS: usize = 256;
/// Most client certificates a cluster records.
pub const MAX_CLIENT_CERTS: usize = 256;
/// Most audit entries one command records.
pub const MAX_AUDIT_BATCH: usize = 512;
/// Bounds of the audit log's retention (entries).
pub const MIN_AUDIT_RETAIN: usize = 100;
pub const MAX_AUDIT_RETAIN: usize = 1_000_000;
/// Longest text kept in an audit field (paths, reasons, identities).
const MAX_AUDIT_TEXT: usize = 512;
/// Prefix of every token secret, so that secret scanners and people can tell one.
pub const TOKEN_PREFIX: &str = "tnd_";

/// What a token may do. `join` tokens may only add a node (`POST /v1/nodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = TokenRole)]
pub enum Role {
    /// Every read, nothing else.
    Viewer,
    /// Reads, and day-to-day operations: move/start/stop/clear groups,
    /// node standby/online/maintenance, volume verify.
    Operator,
    /// Everything.
    Admin,
    /// Only joining a node to the cluster; short-lived.
    Join,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Join => "join",
        }
    }
}

/// A token as the cluster keeps it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the whole secret (`tnd_…`).
    pub hash: String,
    /// Unix time, ms.
    pub created_ms: u64,
    /// Unix time, ms; `None` never expires.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// Who created it (a token name, a node, or `local`).
    #[serde(default)]
    pub created_by: String,
}

impl TokenRecord {
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| now_ms >= e)
    }
}

/// The hash a token is stored and looked up by.
pub fn token_hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` is a certificate's key pin as tandem writes it:
/// `sha256:` and 64 lowercase hex digits.
pub fn valid_spki(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// A client certificate for a person or a tool, recorded by its key pin
/// (SHA-256 of the certificate's SubjectPublicKeyInfo). A certificate the
/// CA signed is worth nothing to the API until recorded here, and nothing
/// again once revoked (the record goes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCertRecord {
    pub name: String,
    /// Never `join`.
    pub role: Role,
    /// `sha256:<hex>` of the certificate's SubjectPublicKeyInfo.
    pub spki: String,
    /// The certificate's serial number, hex.
    pub serial: String,
    /// Unix time, ms: the certificate's notAfter.
    pub not_after_ms: u64,
    /// Unix time, ms.
    pub created_ms: u64,
    /// Who recorded it (a token or certificate name, or `local`).
    #[serde(default)]
    pub created_by: String,
}

impl ClientCertRecord {
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.not_after_ms
    }
}

/// The client certificate table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCerts {
    #[serde(default)]
    pub by_name: BTreeMap<String, ClientCertRecord>,
}

impl ClientCerts {
    pub fn register(&mut self, cert: &ClientCertRecord) -> Result<(), CommandError> {
        validate_name("name", &cert.name)?;
        if self.by_name.contains_key(&cert.name) {
            return Err(CommandError::CertificateExists { name: cert.name.clone() });
        }
        if self.by_name.len() >= MAX_CLIENT_CERTS {
            return Err(invalid(
                "name",
                format!("the cluster already has {MAX_CLIENT_CERTS} client certificates; revoke some"),
            ));
        }
        if cert.role == Role::Join {
            return Err(invalid("role", "a client certificate is viewer, operator or admin"));
        }
        if !valid_spki(&cert.spki) {
            return Err(invalid("spki", "must be sha256:<64 lowercase hex digits>"));
        }
        if let Some(other) = self.by_name.values().find(|c| c.spki == cert.spki) {
            return Err(CommandError::CertificateKeyInUse { name: other.name.clone() });
        }
        if cert.not_after_ms <= cert.created_ms {
            return Err(invalid("certificate", "already expired"));
        }
        self.by_name.insert(cert.name.clone(), cert.clone());
        Ok(())
    }

    pub fn revoke(&mut self, name: &str) -> Result<(), CommandError> {
        self.by_name
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| CommandError::CertificateNotFound { name: name.to_string() })
    }

    /// The recorded certificate with this key pin, expired or not.
    pub fn by_spki(&self, spki: &str) -> Option<&ClientCertRecord> {
        self.by_name.values().find(|c| c.spki == spki)
    }
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Cluster-wide, increasing; assigned when the entry is replicated.
    #[serde(default)]
    pub id: u64,
    /// Unix time, ms, at the node that handled the request.
    pub time_ms: u64,
    /// The node that handled (or refused) it.
    pub node: String,
    /// Token name (`token:ops`), node certificate (`node:node2`), the local
    /// admin socket (`local:uid=0`), or `anonymous`.
    pub who: String,
    /// The client's address (as seen by the first node it reached).
    pub from: String,
    pub method: String,
    pub path: String,
    /// Hex SHA-256 of the request body; empty for no body.
    #[serde(default)]
    pub body_sha256: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// The error code when refused.
    #[serde(default)]
    pub code: Option<String>,
}

/// The audit log: the newest entries up to a retention bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    /// The id the next entry gets.
    #[serde(default)]
    pub next_id: u64,
    /// Shared, copied on write (see `EventLog::events`).
    #[serde(default)]
    pub entries: std::sync::Arc<VecDeque<AuditEntry>>,
}

fn clip(s: &str) -> String {
    crate::error::clip(s, MAX_AUDIT_TEXT)
}

impl AuditLog {
    /// Appends `entries` with fresh ids, then drops the oldest beyond `retain`.
    pub fn record(&mut self, entries: &[AuditEntry], retain: usize) -> Result<(), CommandError> {
        if entries.len() > MAX_AUDIT_BATCH {
            return Err(invalid("entries", format!("at most {MAX_AUDIT_BATCH} per command")));
        }
        if !(MIN_AUDIT_RETAIN..=MAX_AUDIT_RETAIN).contains(&retain) {
            return Err(invalid("retain", format!("must be {MIN_AUDIT_RETAIN} to {MAX_AUDIT_RETAIN}")));
        }
        for e in entries {
            self.next_id += 1;
            std::sync::Arc::make_mut(&mut self.entries).push_back(AuditEntry {
                id: self.next_id,
                who: clip(&e.who),
                from: clip(&e.from),
                path: clip(&e.path),
                node: clip(&e.node),
                method: clip(&e.method),
                ..e.clone()
            });
        }
        if self.entries.len() > retain {
            let entries = std::sync::Arc::make_mut(&mut self.entries);
            while entries.len() > retain {
                entries.pop_front();
            }
        }
        Ok(())
    }

    /// Entries with an id above `since`, oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> Vec<AuditEntry> {
        self.entries.iter().filter(|e| e.id > since).take(limit).cloned().collect()
    }
}

/// The token table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    #[serde(default)]
    pub by_name: BTreeMap<String, TokenRecord>,
}

impl Tokens {
    pub fn create(&mut self, token: &TokenRecord) -> Result<(), CommandError> {
        validate_name("name", &token.name)?;
        if self.by_name.contains_key(&token.name) {
            return Err(CommandError::TokenExists { name: token.name.clone() });
        }
        if self.by_name.len() >= MAX_TOKENS {
            return Err(invalid("name", format!("the cluster already has {MAX_TOKENS} tokens; revoke some")));
        }
        if token.hash.len() != 64 || !token.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("hash", "must be a hex SHA-256"));
        }
        if self.by_name.values().any(|t| t.hash == token.hash) {
            return Err(invalid("hash", "another token has the same secret"));
        }
        if token.expires_ms.is_some_and(|e| e <= token.created_ms) {
            return Err(invalid("expires", "must be after the token's creation"));
        }
        self.by_name.insert(token.name.clone(), token.clone());
        Ok(())
    }

    pub fn revoke(&mut self, name: &str) -> Result<(), CommandError> {
        self.by_name.remove(name).map(|_| ()).ok_or_else(|| CommandError::TokenNotFound { name: name.to_string() })
    }

    /// Drops tokens that expired before `now_ms` (join tokens pile up otherwise).
    pub fn expire(&mut self, now_ms: u64) {
        self.by_name.retain(|_, t| !t.expired(now_ms));
    }

    /// The token whose secret hashes to `hash`, expired or not.
    pub fn by_hash(&self, hash: &str) -> Option<&TokenRecord> {
        self.by_name.values().find(|t| t.hash == hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tok(name: &str, secret: &str) -> TokenRecord {
        TokenRecord {
            name: name.into(),
            role: Role::Operator,
            hash: token_hash(secret),
            created_ms: 1000,
            expires_ms: Some(5000),
            created_by: "local".into(),
        }
    }

    fn cert(name: &str, spki_digit: char) -> ClientCertRecord {
        ClientCertRecord {
            name: name.into(),
            role: Role::Viewer,
            spki: format!("sha256:{}", spki_digit.to_string().repeat(64)),
            serial: "01".into(),
            not_after_ms: 5000,
            created_ms: 1000,
            created_by: "token:admin".into(),
        }
    }

    #[test]
    fn a_client_certificate_is_found_by_its_key_until_revoked() {
        let mut c = ClientCerts::default();
        c.register(&cert("alice", 'a')).unwrap();
        let spki = format!("sha256:{}", "a".repeat(64));
        let r = c.by_spki(&spki).unwrap();
        assert_eq!((r.name.as_str(), r.role), ("alice", Role::Viewer));
        assert!(!r.expired(4999) && r.expired(5000));
        assert!(c.by_spki(&format!("sha256:{}", "b".repeat(64))).is_none());
        c.revoke("alice").unwrap();
        assert!(c.by_spki(&spki).is_none(), "revoked: the key maps to nobody");
    }

    #[test]
    fn refused_certificate_changes_leave_the_table_unchanged() {
        let mut c = ClientCerts::default();
        c.register(&cert("alice", 'a')).unwrap();
        let before = c.clone();
        assert!(matches!(c.register(&cert("alice", 'b')), Err(CommandError::CertificateExists { .. })));
        assert_eq!(
            c.register(&cert("bob", 'a')),
            Err(CommandError::CertificateKeyInUse { name: "alice".into() }),
            "same key twice"
        );
        let mut bad = cert("bob", 'b');
        bad.role = Role::Join;
        assert!(c.register(&bad).is_err(), "join is no client role");
        bad = cert("bob", 'b');
        bad.spki = "sha256:XYZ".into();
        assert!(c.register(&bad).is_err());
        bad = cert("bob", 'b');
        bad.not_after_ms = 1000;
        assert!(c.register(&bad).is_err(), "expired at registration");
        assert!(c.register(&cert("Bad Name", 'c')).is_err());
        assert!(matches!(c.revoke("nobody"), Err(CommandError::CertificateNotFound { .. })));
        assert_eq!(c, before);
    }

    #[test]
    fn key_pins_are_strict() {
        assert!(valid_spki(&format!("sha256:{}", "0f".repeat(32))));
        assert!(!valid_spki(&format!("sha256:{}", "0F".repeat(32))));
        assert!(!valid_spki(&format!("sha1:{}", "0f".repeat(32))));
        assert!(!valid_spki("sha256:00"));
    }

    fn entry(path: &str) -> AuditEntry {
        AuditEntry {
            id: 0,
            time_ms: 1,
            node: "node1".into(),
            who: "token:ops".into(),
            from: "127.0.0.1".into(),
            method: "POST".into(),
            path: path.into(),
            body_sha256: String::new(),
            status: 200,
            code: None,
        }
    }

    #[test]
    fn a_token_is_found_by_its_secret_only_and_expires() {
        let mut t = Tokens::default();
        t.create(&tok("ops", "tnd_a")).unwrap();
        assert_eq!(t.by_hash(&token_hash("tnd_a")).map(|r| r.name.as_str()), Some("ops"));
        assert!(t.by_hash(&token_hash("tnd_b")).is_none());
        let r = t.by_hash(&token_hash("tnd_a")).unwrap();
        assert!(!r.expired(4999) && r.expired(5000));
        t.expire(6000);
        assert!(t.by_name.is_empty());
    }

    #[test]
    fn refused_token_changes_leave_the_table_unchanged() {
        let mut t = Tokens::default();
        t.create(&tok("ops", "tnd_a")).unwrap();
        let before = t.clone();
        assert!(matches!(t.create(&tok("ops", "tnd_b")), Err(CommandError::TokenExists { .. })));
        assert!(t.create(&tok("other", "tnd_a")).is_err(), "same secret twice");
        assert!(t.create(&tok("Bad Name", "tnd_c")).is_err());
        let mut bad = tok("x", "tnd_d");
        bad.expires_ms = Some(10);
        assert!(t.create(&bad).is_err());
        bad.hash = "zz".into();
        assert!(t.create(&bad).is_err());
        assert!(matches!(t.revoke("nobody"), Err(CommandError::TokenNotFound { .. })));
        assert_eq!(t, before);
    }

    #[test]
    fn the_audit_log_numbers_entries_and_keeps_the_newest() {
        let mut log = AuditLog::default();
        let batch: Vec<_> = (0..150).map(|i| entry(&format!("/v1/x/{i}"))).collect();
        log.record(&batch, 100).unwrap();
        assert_eq!(log.entries.len(), 100);
        assert_eq!(log.entries.front().map(|e| e.id), Some(51));
        assert_eq!(log.since(140, 5).iter().map(|e| e.id).collect::<Vec<_>>(), vec![141, 142, 143, 144, 145]);
        let before = log.clone();
        assert!(log.record(&[entry("/")], 10).is_err());
        assert_eq!(log, before);
        log.record(&[entry(&"p".repeat(5000))], 100).unwrap();
        assert!(log.entries.back().unwrap().path.len() < 600);
    }

    proptest! {
        #[test]
        fn audit_ids_only_grow_and_retention_holds(batches in proptest::collection::vec(0usize..40, 1..30), retain in 100usize..200) {
            let mut log = AuditLog::default();
            let mut last = 0;
            for n in batches {
                let b: Vec<_> = (0..n).map(|_| entry("/v1/groups")).collect();
                log.record(&b, retain).unwrap();
                prop_assert!(log.entries.len() <= retain);
                for e in log.entries.iter() {
                    prop_assert!(e.id > 0);
                }
                if let Some(e) = log.entries.back() {
                    prop_assert!(e.id >= last);
                    last = e.id;
                }
                prop_assert!(log.entries.iter().zip(log.entries.iter().skip(1)).all(|(a, b)| a.id + 1 == b.id));
            }
        }
    }
}
