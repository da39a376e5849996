//! How connections reach the router, and what the router learns about who
//! is on the other end: the client's address, the node its TLS certificate
//! names (when it presented one the cluster CA signed), or the local user of
//! the admin socket.
//!
//! The TLS handshake itself is the daemon's (it owns the keys); this module
//! only carries finished connections to axum with their [`PeerInfo`]. It
//! must never decide what a peer may do — that is [`crate::auth`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tandem_raft::NodeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::mpsc;

/// A node named by a verified certificate of the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub id: NodeId,
    pub name: String,
}

/// The id of a node vouched for by an operator's CA alone, before this
/// agent holds the log that pins members' keys (ids start at 1).
pub const PROVISIONAL_NODE: NodeId = 0;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The TCP peer; `None` on the admin socket.
    pub addr: Option<SocketAddr>,
    /// The node of the client certificate, verified at the handshake.
    pub node: Option<PeerNode>,
    /// `sha256:<hex>` of the key of the verified client certificate: a
    /// person's or a tool's when it names no member (the auth layer looks
    /// it up), or a node's (with an operator's CA, the pin names the member).
    pub cert_spki: Option<String>,
    /// The local user on the admin socket (`SO_PEERCRED`).
    pub local_uid: Option<u32>,
    /// Plain TCP (`[tls] enabled = false`, benchmarks only): nobody can
    /// prove to be a node, so node-to-node routes take anyone.
    pub plaintext: bool,
}

/// An accepted API connection: TLS, or plain TCP where TLS is switched off
/// (benchmarks only).
pub enum ApiStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ApiStream::Plain($s) => $e,
            ApiStream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for ApiStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ApiStream::Plain(s) => s.is_write_vectored(),
            ApiStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Connections whose handshake finished, handed over by the daemon's
/// acceptor through a bounded channel (a slow handshake never blocks others).
pub struct ApiListener {
    rx: mpsc::Receiver<(ApiStream, PeerInfo)>,
    local: SocketAddr,
}

impl ApiListener {
    pub fn new(rx: mpsc::Receiver<(ApiStream, PeerInfo)>, local: SocketAddr) -> ApiListener {
        ApiListener { rx, local }
    }
}

impl Listener for ApiListener {
    type Io = ApiStream;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor is gone (the agent is stopping): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerInfo { addr: Some(self.local), ..PeerInfo::default() })
    }
}

impl Connected<IncomingStream<'_, ApiListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, ApiListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, UnixListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        let uid = stream.io().peer_cred().ok().map(|c| c.uid());
        // A peer whose credentials cannot be read is nobody in particular.
        PeerInfo { addr: None, local_uid: Some(uid.unwrap_or(u32::MAX)), ..PeerInfo::default() }
    }
}
