//! Why a command is refused, and the name rule every identifier follows.
//!
//! The bottom of the crate: the state machine (`state`), the group and
//! volume definitions (`group`, `volume`) all refuse with these errors, so
//! this module depends on none of them but `volume`'s byte formatting.

use serde::{Deserialize, Serialize};

use crate::volume::format_bytes;

/// Longest node name, attribute key or site name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// Why a command was refused. Each variant maps to one API error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum CommandError {
    #[error("the cluster is already bootstrapped as {cluster_id}")]
    AlreadyBootstrapped { cluster_id: String },
    #[error("the cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("a node named {name} already exists")]
    NodeExists { name: String },
    #[error("address {address} is already used by node {name}")]
    AddressInUse { address: String, name: String },
    #[error("no node named {name}")]
    NodeNotFound { name: String },
    #[error("no node is in site {site}")]
    SiteNotFound { site: String },
    #[error("node {name} has no attribute {key}")]
    AttributeNotFound { name: String, key: String },
    #[error("the cluster already has {max} nodes")]
    TooManyNodes { max: usize },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("no group named {name}")]
    GroupNotFound { name: String },
    #[error("group {name} is still placed on a node; stop it first")]
    GroupRunning { name: String },
    #[error("group {name} is referred to by group {by}")]
    GroupInUse { name: String, by: String },
    #[error("group {name} is at epoch {current}, not {expected}")]
    StaleEpoch { name: String, expected: u64, current: u64 },
    #[error("the cluster already has {max} groups")]
    TooManyGroups { max: usize },
    #[error("no volume named {name}")]
    VolumeNotFound { name: String },
    #[error("volume {volume} has no replica on node {node}")]
    NoSuchReplica { volume: String, node: String },
    /// A volume's size lowered: only growing is allowed.
    #[error("volume {name}: {}", resize_reason(*.from, *.to))]
    VolumeResize { name: String, field: String, from: u64, to: u64 },
    #[error("volume {name}: {reason}")]
    VolumeChange { name: String, field: String, reason: String },
    #[error("volume {volume}: {reason}")]
    NotVolumePrimary { volume: String, reason: String },
    #[error("volume {volume}: {node} is the primary of group {group}: its replica is the one serving")]
    ReplicaIsPrimary { volume: String, node: String, group: String },
    #[error("volume {volume}: no replica but {node}'s is UpToDate: replacing it would leave no copy of the data")]
    NoUpToDateReplicaLeft { volume: String, node: String },
    #[error("volume {volume}: {reason}")]
    PromotionRefused { volume: String, reason: String },
    #[error("a token named {name} already exists")]
    TokenExists { name: String },
    #[error("no token named {name}")]
    TokenNotFound { name: String },
    #[error("a client certificate named {name} already exists")]
    CertificateExists { name: String },
    #[error("no client certificate named {name}")]
    CertificateNotFound { name: String },
    #[error("the client certificate {name} already has this key")]
    CertificateKeyInUse { name: String },
    #[error("no alert named {name}")]
    AlertNotFound { name: String },
    #[error("the cluster already has {max} alerts")]
    TooManyAlerts { max: usize },
}

/// Only a shrink is refused (a volume grows online).
fn resize_reason(from: u64, to: u64) -> String {
    let (a, b) = (format_bytes(from), format_bytes(to));
    format!("its size cannot shrink from {a} to {b}: the blocks past {b} hold data")
}

/// `s` cut to at most `max` bytes (on a character boundary), with `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub fn invalid(field: &str, reason: impl Into<String>) -> CommandError {
    CommandError::Invalid { field: field.to_string(), reason: reason.into() }
}

/// A node name, site or attribute key: 1-63 chars of `[a-z0-9._-]`, starting
/// with a letter or digit (safe in URLs, file names and DNS labels).
pub fn validate_name(field: &str, name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid(field, format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok || !name.chars().all(ok_char) {
        return Err(invalid(
            field,
            format!("{name:?} must use a-z, 0-9, '.', '_', '-' and start with a letter or digit"),
        ));
    }
    Ok(())
}
