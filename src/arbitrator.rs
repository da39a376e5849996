//! `tandem arbitrator`: the third grantor of the ticket between two sites,
//! on a small machine at a third place (booth's arbitrator). It answers
//! sealed requests (`ticket_link`) over HTTP and shows whom it lends to at
//! `GET /v1/ticket`. It keeps nothing on disk — after a restart it lends
//! nothing for a lease — and never runs resources nor joins a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::clock::now_boot_ms;
use crate::config::TicketTiming;
use crate::ticket_link::{Desk, SealKey, PATH, SEAL_HEADER};

/// A ticket message is small: anything larger is refused unread.
pub const MAX_BODY_BYTES: usize = 4096;

/// The arbitrator's TOML file (docs/dr.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArbitratorConfig {
    /// Its name among the ticket's participants (the sites' `[ticket]
    /// arbitrator.name`).
    #[serde(default = "default_name")]
    pub name: String,
    /// `ip:port` to listen on.
    pub listen: String,
    /// The key the three participants share.
    pub key_file: PathBuf,
    /// The two sites, as their `[ticket] site` names them.
    pub sites: Vec<String>,
    #[serde(default)]
    pub ticket: TicketTiming,
}

fn default_name() -> String {
    "arbitrator".into()
}

/// The arbitrator's configuration, checked, with its key.
pub struct Arbitrator {
    pub cfg: ArbitratorConfig,
    pub listen: SocketAddr,
    key: SealKey,
}

impl Arbitrator {
    /// Reads and checks `path`; an error names the offending key.
    pub fn load(path: &Path) -> Result<Arbitrator, String> {
        let p = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {p}: {e}"))?;
        let cfg: ArbitratorConfig = toml::from_str(&text).map_err(|e| format!("{p}: {e}"))?;
        let bad = |key: &str, why: String| format!("{p}: invalid `{key}`: {why}");
        tandem_raft::state::validate_name("name", &cfg.name).map_err(|e| bad("name", e.to_string()))?;
        let listen: SocketAddr =
            cfg.listen.parse().map_err(|_| bad("listen", format!("{:?} is not ip:port", cfg.listen)))?;
        if cfg.sites.len() != 2 || cfg.sites[0] == cfg.sites[1] {
            return Err(bad("sites", "must name the two sites, each once".into()));
        }
        for s in &cfg.sites {
            tandem_raft::state::validate_name("sites", s).map_err(|e| bad("sites", e.to_string()))?;
        }
        if cfg.sites.contains(&cfg.name) {
            return Err(bad("name", "must differ from both sites".into()));
        }
        cfg.ticket.timing().validate().map_err(|e| bad("ticket", e))?;
        let key = SealKey::load(&cfg.key_file).map_err(|e| bad("key_file", e.to_string()))?;
        Ok(Arbitrator { cfg, listen, key })
    }

    /// Serves until the process is stopped.
    pub async fn run(self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.listen).await?;
        let desk = Desk::new(&self.cfg.name, &self.cfg.sites, self.cfg.ticket.timing(), now_boot_ms());
        tracing::info!(name = %self.cfg.name, listen = %self.listen, sites = ?self.cfg.sites, "arbitrator up: lending nothing for a lease");
        let shared = Arc::new(Shared { key: self.key, desk: Mutex::new(desk) });
        let app = axum::Router::new()
            .route(PATH, post(request))
            .route("/v1/ticket", get(status))
            .route("/healthz", get(|| async { "ok\n" }))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(shared);
        axum::serve(listener, app).await?;
        Ok(())
    }
}

struct Shared {
    key: SealKey,
    desk: Mutex<Desk>,
}

/// The Unix time in ms (the freshness check's clock).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn request(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let seal = headers.get(SEAL_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let answered = {
        let mut desk = s.desk.lock().unwrap_or_else(|e| e.into_inner());
        desk.handle(&s.key, &body, seal, now_boot_ms(), now_unix_ms())
    };
    match answered {
        Ok((answer, seal)) => ([(SEAL_HEADER, seal)], answer).into_response(),
        Err(e) => {
            tracing::warn!(code = e.code(), "ticket request refused: {e}");
            tandem_http_api::ApiError::from(e).into_response()
        }
    }
}

/// `GET /v1/ticket` on the arbitrator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArbitratorView {
    pub name: String,
    /// The site it lends the ticket to now.
    pub lent_to: Option<String>,
}

async fn status(State(s): State<Arc<Shared>>) -> axum::Json<ArbitratorView> {
    let desk = s.desk.lock().unwrap_or_else(|e| e.into_inner());
    axum::Json(ArbitratorView { name: desk.name().to_string(), lent_to: desk.lent_to(now_boot_ms()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::write(dir.join("key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let path = dir.join("arb.toml");
        std::fs::write(&path, text.replace("KEY", &dir.join("key").display().to_string())).unwrap();
        path
    }

    #[test]
    fn a_bad_config_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = "listen = \"127.0.0.1:7409\"\nkey_file = \"KEY\"\nsites = [\"a\", \"b\"]\n";
        assert!(Arbitrator::load(&write(dir.path(), good)).is_ok());
        let cases = [
            ("listen = \"here\"\nkey_file = \"KEY\"\nsites = [\"a\", \"b\"]\n", "`listen`"),
            ("listen = \"127.0.0.1:1\"\nkey_file = \"KEY\"\nsites = [\"a\"]\n", "`sites`"),
            ("listen = \"127.0.0.1:1\"\nkey_file = \"KEY\"\nsites = [\"a\", \"a\"]\n", "`sites`"),
            ("name = \"a\"\nlisten = \"127.0.0.1:1\"\nkey_file = \"KEY\"\nsites = [\"a\", \"b\"]\n", "`name`"),
            ("listen = \"127.0.0.1:1\"\nkey_file = \"/nonexistent\"\nsites = [\"a\", \"b\"]\n", "`key_file`"),
            (
                "listen = \"127.0.0.1:1\"\nkey_file = \"KEY\"\nsites = [\"a\", \"b\"]\n[ticket]\nlease_ms = 1000\nmargin_ms = 1000\n",
                "`ticket`",
            ),
            ("listen = \"127.0.0.1:1\"\nkey_file = \"KEY\"\nsites = [\"a\", \"b\"]\nextra = 1\n", "unknown field"),
        ];
        for (text, key) in cases {
            let e = Arbitrator::load(&write(dir.path(), text)).err().unwrap_or_default();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
