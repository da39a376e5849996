//! Security at the edges of the agent: the cluster CA and node certificates
//! ([`pki`]), TLS on every TCP connection ([`tls`]), and the files that keep
//! them ([`files`]). Who may call what is the API layer's (`auth`); tokens
//! and the audit log live in the replicated state (`tandem_raft::access`).

pub mod files;
pub mod pki;
pub mod tls;

/// Makes ring rustls' process-wide default (reqwest clients built without a
/// preconfigured TLS need one). Idempotent.
#[allow(deprecated)]
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Unix time in milliseconds (tokens and audit entries carry wall-clock
/// times; nothing else uses them).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new secret token: `tnd_` and 43 URL-safe characters (256 random bits).
pub fn new_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: [u8; 43] = rand::random();
    let body: String = bytes.iter().map(|b| ALPHABET[(*b & 63) as usize] as char).collect();
    format!("{}{body}", tandem_raft::access::TOKEN_PREFIX)
}
