//! Listening sockets and connection lifetimes of one running export.
//!
//! Owns: the unix socket file (created, and removed only if it is still the
//! one we bound), the accept loops, the set of live connections, and the
//! shutdown sequence (stop accepting, let every connection answer what it has
//! in flight within a bounded grace, then close).
//!
//! Must never: remove a path that is not a socket, or a socket another server
//! bound after us; let a misbehaving connection affect another one or stop
//! the accept loop; or return from [`Server::shutdown`] while a request can
//! still reach the export.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::handshake::{self, Negotiated};
use super::proto::ExportInfo;
use super::transmission::{self, shutdown_deadline, ShutdownRx};
use super::Export;

/// How long connections get to answer their in-flight requests at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client must be in transmission this long after connecting. Slow-loris
/// handshakes would otherwise hold a task and a socket forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Backoff after a failed accept (EMFILE and the like), so the loop does not
/// spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A running export. Dropping it without [`Server::shutdown`] still stops
/// the listeners and connections, but in the background.
pub struct Server {
    uri: String,
    tcp_addr: Option<SocketAddr>,
    shutdown: watch::Sender<Option<Instant>>,
    accept_loops: Vec<JoinHandle<()>>,
}

/// What every connection of one export shares.
struct Shared {
    name: String,
    export: Arc<dyn Export>,
    info: ExportInfo,
}

/// A stream that splits into owned halves without a lock (unlike
/// `tokio::io::split`), so the reader and the writer never contend.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl Connection for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Connection for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Server {
    /// Serves `export` under export name `name` (the empty name is accepted
    /// too) on a unix socket at `socket` (removing a stale socket file first)
    /// and, if given, on TCP `tcp` (e.g. 127.0.0.1:0).
    pub async fn start(
        name: &str,
        export: Arc<dyn Export>,
        socket: &Path,
        tcp: Option<SocketAddr>,
    ) -> std::io::Result<Server> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        if name.len() > super::proto::MAX_STRING_LEN || name.contains('\0') {
            return Err(invalid(format!("export name {name:?} is not a valid NBD string")));
        }
        let info = ExportInfo::new(export.size(), export.block_sizes(), export.read_only(), export.multi_conn())
            .map_err(|e| invalid(format!("export {name:?}: {e}")))?;
        if info.size % u64::from(info.min_block) != 0 {
            tracing::warn!(
                size = info.size,
                min_block = info.min_block,
                "nbd: export size is not a multiple of the minimum block size; its tail is unreachable"
            );
        }

        // TCP first: if it fails, no socket file is left behind.
        let tcp = match tcp {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        remove_stale_socket(socket)?;
        let unix = UnixListener::bind(socket)?;
        let bound = std::fs::symlink_metadata(socket)?;
        let identity = (bound.dev(), bound.ino());

        let shared = Arc::new(Shared { name: name.to_string(), export, info });
        let (shutdown, rx) = watch::channel(None);
        let mut accept_loops = Vec::new();
        let socket_path = socket.to_path_buf();
        accept_loops.push(tokio::spawn({
            let (shared, rx) = (shared.clone(), rx.clone());
            async move {
                let mut conns = JoinSet::new();
                let deadline = accept_until_shutdown(&shared, rx, &mut conns, || unix.accept()).await;
                // Close the listener at once: new clients are refused rather
                // than left waiting in the backlog during the drain.
                drop(unix);
                remove_if_ours(&socket_path, identity);
                drain(conns, deadline).await;
            }
        }));
        if let Some(tcp) = tcp {
            accept_loops.push(tokio::spawn(async move {
                let mut conns = JoinSet::new();
                let deadline = accept_until_shutdown(&shared, rx, &mut conns, || async {
                    let (s, a) = tcp.accept().await?;
                    // Replies are batched by the writer; Nagle would only add latency.
                    s.set_nodelay(true)?;
                    Ok((s, a))
                })
                .await;
                drop(tcp);
                drain(conns, deadline).await;
            }));
        }
        tracing::info!(name, socket = %socket.display(), tcp = ?tcp_addr, "nbd: serving");
        Ok(Server { uri: unix_uri(name, socket), tcp_addr, shutdown, accept_loops })
    }

    /// The bound TCP address, if TCP was asked for.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The standard NBD URI of the unix socket export:
    /// `nbd+unix:///<name>?socket=<path>`.
    pub fn uri(&self) -> String {
        self.uri.clone()
    }

    /// Stops accepting, closes every connection once its in-flight requests
    /// are answered (at most [`SHUTDOWN_GRACE`]; requests arriving meanwhile
    /// get ESHUTDOWN), and removes the socket file. After it returns no
    /// request reaches the export.
    pub async fn shutdown(mut self) {
        self.signal();
        for handle in std::mem::take(&mut self.accept_loops) {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "nbd: accept loop failed");
            }
        }
    }

    fn signal(&self) {
        self.shutdown.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(Instant::now() + SHUTDOWN_GRACE);
                true
            } else {
                false
            }
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal();
    }
}

/// Accepts connections into `conns` until shutdown; returns the shutdown
/// deadline.
async fn accept_until_shutdown<C, F, Fut, A>(
    shared: &Arc<Shared>,
    mut shutdown: ShutdownRx,
    conns: &mut JoinSet<()>,
    accept: F,
) -> Instant
where
    C: Connection,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(C, A)>>,
{
    loop {
        tokio::select! {
            d = shutdown_deadline(&mut shutdown) => return d,
            res = accept() => match res {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, shared.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nbd: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Waits for the connections of one listener to finish. Each bounds itself
/// by the shutdown deadline; the extra second is a safety net for one stuck
/// outside those bounds.
async fn drain(mut conns: JoinSet<()>, deadline: Instant) {
    let hard = tokio::time::sleep_until(deadline + Duration::from_secs(1));
    tokio::pin!(hard);
    while !conns.is_empty() {
        tokio::select! {
            _ = conns.join_next() => {}
            () = &mut hard => {
                tracing::warn!(left = conns.len(), "nbd: aborting connections after the shutdown grace");
                conns.shutdown().await;
            }
        }
    }
}

async fn serve_connection<C: Connection>(mut stream: C, shared: Arc<Shared>, mut shutdown: ShutdownRx) {
    // The size is the export's now: a volume grown online is seen whole by
    // every connection made since; an older one keeps the size it
    // negotiated (NBD has no way to tell a connected client) until it
    // reconnects.
    let info = ExportInfo { size: shared.export.size(), ..shared.info };
    let negotiated = tokio::select! {
        res = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&mut stream, &shared.name, &info)) => res,
        _ = shutdown_deadline(&mut shutdown) => return,
    };
    match negotiated {
        Ok(Ok(Negotiated::Transmission)) => {}
        Ok(Ok(Negotiated::Aborted)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "nbd: handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("nbd: handshake timed out");
            return;
        }
    }
    let (r, w) = stream.into_halves();
    transmission::serve(r, w, shared.export.clone(), info, shutdown).await;
}

/// Removes a leftover socket file at `path`; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the socket file if it is still the one we bound: a new server may
/// have replaced it since.
fn remove_if_ours(path: &PathBuf, (dev, ino): (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.dev() == dev && meta.ino() == ino {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(error = %e, path = %path.display(), "nbd: could not remove the socket file");
            }
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn encode_uri_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The NBD URI of export `name` on a unix socket.
pub fn unix_uri(name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{}?socket={}", encode_uri_part(name), encode_uri_part(&socket.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_is_the_standard_unix_form() {
        assert_eq!(unix_uri("vol0", Path::new("/run/t/vol0.sock")), "nbd+unix:///vol0?socket=/run/t/vol0.sock");
        assert_eq!(unix_uri("", Path::new("/tmp/a b")), "nbd+unix:///?socket=/tmp/a%20b");
    }

    #[test]
    fn only_sockets_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"x").expect("write");
        assert!(remove_stale_socket(&file).is_err());
        assert!(file.exists());
        assert!(remove_stale_socket(&dir.path().join("missing")).is_ok());
    }
}
