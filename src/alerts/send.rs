//! Sending one alert message to its target: an HTTP POST, a mail through
//! SMTP, or a run of an alert agent. One attempt, bounded in time; the
//! caller retries.
//!
//! Never logs a secret: errors name the target (URL, server, program) and
//! what went wrong, nothing else.

use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tandem_raft::alerts::AlertSpec;
use tokio::io::AsyncReadExt;

use super::render::{self, Message};

/// Longest a webhook or SMTP attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an alert agent may run (Pacemaker's default timeout).
pub const EXEC_TIMEOUT_MS: u64 = 30_000;
/// Most output of a failed agent quoted in its error.
const OUTPUT_QUOTED: usize = 2048;

/// Why an attempt failed, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SendError(pub String);

/// What the target needs besides the message: the cluster's id (in bodies
/// and subjects) and the Pacemaker node id of the event's node.
pub struct Context<'a> {
    pub cluster: &'a str,
    pub alert: &'a str,
    pub node_id: Option<u64>,
}

/// A target ready to take messages (its HTTP client, its mail transport).
pub enum Target {
    Webhook { url: String, secret: Option<String>, client: reqwest::Client },
    Smtp { mailer: AsyncSmtpTransport<Tokio1Executor>, from: Mailbox, to: Vec<Mailbox> },
    Exec { command: Vec<String>, recipient: Option<String>, timestamp_format: Option<String>, timeout: Duration },
}

impl Target {
    /// Builds the target of a definition (validated already).
    pub fn new(spec: &AlertSpec) -> Result<Target, SendError> {
        match spec {
            AlertSpec::Webhook { url, secret, cacert, .. } => Ok(Target::Webhook {
                url: url.clone(),
                secret: secret.clone(),
                client: webhook_client(cacert.as_deref())?,
            }),
            AlertSpec::Smtp { server, port, starttls, username, password, from, to, cacert, .. } => {
                let host = server.clone();
                let port = port.unwrap_or(if *starttls { 587 } else { 25 });
                let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host).port(port);
                if *starttls {
                    let mut p = TlsParameters::builder(host.clone());
                    if let Some(pem) = cacert {
                        let c = Certificate::from_pem(pem.as_bytes()).map_err(|e| SendError(format!("cacert: {e}")))?;
                        p = p.certificate_store(CertificateStore::None).add_root_certificate(c);
                    }
                    let params = p.build_rustls().map_err(|e| SendError(format!("TLS for {server}: {e}")))?;
                    b = b.tls(Tls::Required(params));
                }
                if let (Some(u), Some(p)) = (username, password) {
                    b = b.credentials(Credentials::new(u.clone(), p.clone()));
                }
                let mailbox = |a: &str| a.parse::<Mailbox>().map_err(|e| SendError(format!("{a}: {e}")));
                Ok(Target::Smtp {
                    mailer: b.timeout(Some(ATTEMPT_TIMEOUT)).build(),
                    from: mailbox(from)?,
                    to: to.iter().map(|a| mailbox(a)).collect::<Result<_, _>>()?,
                })
            }
            AlertSpec::Exec { command, recipient, timestamp_format, timeout_ms, .. } => Ok(Target::Exec {
                command: command.clone(),
                recipient: recipient.clone(),
                timestamp_format: timestamp_format.clone(),
                timeout: Duration::from_millis(timeout_ms.unwrap_or(EXEC_TIMEOUT_MS)),
            }),
        }
    }

    /// One attempt.
    pub async fn send(&self, cx: &Context<'_>, m: &Message) -> Result<(), SendError> {
        match self {
            Target::Webhook { url, secret, client } => {
                let body = render::webhook_body(cx.cluster, cx.alert, m);
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut req = client
                    .post(url)
                    .timeout(ATTEMPT_TIMEOUT)
                    .header("content-type", "application/json")
                    .header("user-agent", concat!("tandem/", env!("CARGO_PKG_VERSION")))
                    .header("x-tandem-alert", cx.alert)
                    .header("x-tandem-event-id", m.dedup_id())
                    .header("x-tandem-timestamp", ts.to_string());
                if let Some(s) = secret {
                    req = req.header("x-tandem-signature", render::signature(s, ts, &body));
                }
                let resp = req.body(body).send().await.map_err(|e| SendError(format!("POST {url}: {}", chain(&e))))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let text = resp.text().await.unwrap_or_default();
                Err(SendError(format!("POST {url}: {status} {}", clip(&text))))
            }
            Target::Smtp { mailer, from, to } => {
                let (subject, text) = render::mail(cx.cluster, cx.alert, m);
                let mut b = lettre::Message::builder()
                    .from(from.clone())
                    .subject(subject)
                    .header(ContentType::TEXT_PLAIN)
                    .message_id(Some(format!("<tandem.{}.{}.{}@tandem>", cx.cluster, cx.alert, m.dedup_id())));
                for t in to {
                    b = b.to(t.clone());
                }
                let msg = b.body(text).map_err(|e| SendError(format!("building the mail: {e}")))?;
                mailer.send(msg).await.map(|_| ()).map_err(|e| SendError(format!("SMTP: {}", chain(&e))))
            }
            Target::Exec { command, recipient, timestamp_format, timeout } => {
                let Message::Event(e) = m else {
                    return Err(SendError("exec alerts take events only".into()));
                };
                let env =
                    render::pacemaker_env(cx.alert, recipient.as_deref(), timestamp_format.as_deref(), cx.node_id, e);
                run_agent(command, &env, *timeout).await
            }
        }
    }
}

/// Runs an alert agent with `env` (and a plain PATH), stdin closed; kills
/// it past `timeout`. Exit status 0 is delivered.
async fn run_agent(command: &[String], env: &[(String, String)], timeout: Duration) -> Result<(), SendError> {
    let program = &command[0];
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&command[1..])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| SendError(format!("{program}: cannot run: {e}")))?;
    // Both pipes at once: an agent that fills one while we wait on the
    // other would otherwise block until its timeout.
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (o, e) = tokio::join!(read_capped(out), read_capped(err));
        (child.wait().await, o, e)
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(SendError(format!("{program}: still running after {} ms: killed", timeout.as_millis()))),
        Ok((Err(e), _, _)) => Err(SendError(format!("{program}: {e}"))),
        Ok((Ok(status), _, _)) if status.success() => Ok(()),
        Ok((Ok(status), o, e)) => {
            let said = String::from_utf8_lossy(if e.is_empty() { &o } else { &e }).trim().to_string();
            Err(SendError(format!("{program}: {status}: {}", clip(&said))))
        }
    }
}

/// What a pipe says, at most 64 KiB (nothing when there is no pipe).
async fn read_capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.take(64 * 1024).read_to_end(&mut buf).await;
    }
    buf
}

/// The HTTP client of a webhook: rustls with the given CA, or the
/// system's trust store.
fn webhook_client(cacert: Option<&str>) -> Result<reqwest::Client, SendError> {
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(pem) => {
            let certs = crate::security::pki::pem_certs(pem).map_err(|e| SendError(format!("cacert: {e}")))?;
            for c in certs {
                roots.add(c.into()).map_err(|e| SendError(format!("cacert: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crate::security::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SendError(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(cfg)
        .connect_timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| SendError(format!("HTTP client: {e}")))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn clip(s: &str) -> String {
    tandem_raft::error::clip(s, OUTPUT_QUOTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Message {
        let mut e = tandem_raft::events::Event::new(
            1_000,
            "node.offline",
            tandem_raft::events::Severity::Critical,
            "n2 offline",
        )
        .node("n2");
        e.id = 7;
        Message::Event(e)
    }

    fn exec(cmd: &[&str], timeout_ms: u64) -> Target {
        Target::Exec {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            recipient: Some("r".into()),
            timestamp_format: None,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    const CX: Context<'static> = Context { cluster: "c1", alert: "ops", node_id: Some(2) };

    #[tokio::test]
    async fn an_agent_gets_the_pacemaker_environment_and_its_failures_are_told() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let script = format!("env > {}", out.display());
        exec(&["/bin/sh", "-c", &script], 5_000).send(&CX, &ev()).await.unwrap();
        let env = std::fs::read_to_string(&out).unwrap();
        for want in [
            "CRM_alert_kind=node",
            "CRM_alert_desc=lost",
            "CRM_alert_node=n2",
            "CRM_alert_recipient=r",
            "TANDEM_EVENT_ID=7",
        ] {
            assert!(env.lines().any(|l| l == want), "{want} missing:\n{env}");
        }
        let e = exec(&["/bin/sh", "-c", "echo nope >&2; exit 3"], 5_000).send(&CX, &ev()).await.unwrap_err();
        assert!(e.0.contains("exit status: 3") && e.0.contains("nope"), "{e}");
        let e = exec(&["/bin/sleep", "5"], 200).send(&CX, &ev()).await.unwrap_err();
        assert!(e.0.contains("killed"), "{e}");
        let e = exec(&["/nonexistent/agent"], 1_000).send(&CX, &ev()).await.unwrap_err();
        assert!(e.0.contains("cannot run"), "{e}");
    }

    #[tokio::test]
    async fn a_webhook_nobody_listens_on_is_an_error_naming_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let spec: AlertSpec = serde_json::from_value(
            serde_json::json!({"kind": "webhook", "url": format!("http://127.0.0.1:{port}/h"), "secret": "s3cret"}),
        )
        .unwrap();
        let e = Target::new(&spec).unwrap().send(&CX, &ev()).await.unwrap_err();
        assert!(e.0.contains(&format!("127.0.0.1:{port}/h")), "{e}");
        assert!(!e.0.contains("s3cret"));
    }
}
