//! TLS for every TCP connection the agent makes or takes: the API (HTTPS,
//! client certificates optional), node-to-node calls and Raft (mutual TLS),
//! and the volume replication stream (mutual TLS, required at the
//! handshake).
//!
//! One [`Tls`] per agent holds the current CA and certificate; the rustls
//! verifiers and resolvers below read it on every handshake, so becoming a
//! member, renewing a certificate or leaving a cluster takes effect without
//! rebuilding listeners or clients. A client certificate is accepted only
//! when the CA signed it AND it names a current member (the membership
//! check), so a removed node is refused at the handshake from then on.
//!
//! This module must never decide who may call which route (that is
//! `tandem_http_api::auth`), and never log key material.
//!
//! With an operator's CA (`[tls] ca_file`) a certificate carries no node id:
//! the member is found by the certificate's key pin, recorded in the
//! replicated state at join ([`Tls::set_key_lookup`]), so a removed node's
//! certificate names nobody even when a new node takes its name. A verified
//! client certificate that names no member reaches the API with its key pin
//! (a person's or a tool's; the auth layer maps it to a role or refuses it).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use tandem_http_api::listen::{ApiStream, PeerInfo, PeerNode};
use tandem_raft::NodeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::pki::{self, NodeMaterial};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once on one listener.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("private key: {0}")]
    Key(String),
}

/// ring, not aws-lc-rs: no C toolchain beyond what RocksDB needs, and a
/// cold build stays short. (ring has no post-quantum key exchange, hence
/// rustls' deprecation note.)
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

type MembershipCheck = Arc<dyn Fn(NodeId, &str) -> bool + Send + Sync>;
/// Operator's CA: (key pin, common name) → the member, if any.
type KeyLookup = Arc<dyn Fn(&str, &str) -> Option<PeerNode> + Send + Sync>;

struct Current {
    cluster_id: Option<String>,
    ca_pem: Option<String>,
    roots: Option<Arc<RootCertStore>>,
    key: Arc<CertifiedKey>,
    member: bool,
}

/// The agent's TLS material and policy.
pub struct Tls {
    /// False only when `[tls] enabled = false` (benchmarks): plain TCP.
    pub enabled: bool,
    /// The CA is the operator's (`[tls] ca_file`): members are known by key pin.
    pub external: bool,
    provider: Arc<CryptoProvider>,
    cur: RwLock<Current>,
    members: RwLock<Option<MembershipCheck>>,
    by_key: RwLock<Option<KeyLookup>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("enabled", &self.enabled).finish_non_exhaustive()
    }
}

fn certified(provider: &CryptoProvider, m: &NodeMaterial) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        pki::pem_certs(&m.cert_pem)?.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).map_err(|e| TlsError::Key(e.to_string()))?;
    let signer = provider.key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for der in pki::pem_certs(ca_pem)? {
        store.add(CertificateDer::from(der))?;
    }
    Ok(store)
}

fn lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

impl Tls {
    /// An agent that belongs to no cluster yet: it serves `bootstrap`.
    pub fn new(enabled: bool, external: bool, bootstrap: &NodeMaterial) -> Result<Arc<Tls>, TlsError> {
        let provider = provider();
        let key = certified(&provider, bootstrap)?;
        Ok(Arc::new(Tls {
            enabled,
            external,
            provider,
            cur: RwLock::new(Current { cluster_id: None, ca_pem: None, roots: None, key, member: false }),
            members: RwLock::new(None),
            by_key: RwLock::new(None),
        }))
    }

    /// Takes the cluster's CA and this node's certificate into use.
    pub fn install(&self, cluster_id: &str, ca_pem: &str, node: &NodeMaterial) -> Result<(), TlsError> {
        let key = certified(&self.provider, node)?;
        let roots = Arc::new(roots(ca_pem)?);
        let mut cur = self.cur.write().unwrap_or_else(|p| p.into_inner());
        *cur = Current {
            cluster_id: Some(cluster_id.to_string()),
            ca_pem: Some(ca_pem.to_string()),
            roots: Some(roots),
            key,
            member: true,
        };
        Ok(())
    }

    /// Back to no cluster (the node was removed).
    pub fn reset(&self, bootstrap: &NodeMaterial) -> Result<(), TlsError> {
        let key = certified(&self.provider, bootstrap)?;
        *self.cur.write().unwrap_or_else(|p| p.into_inner()) =
            Current { cluster_id: None, ca_pem: None, roots: None, key, member: false };
        Ok(())
    }

    /// Who counts as a member for client certificates.
    pub fn set_membership_check(&self, f: MembershipCheck) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Who a key pin names (operator's CA).
    pub fn set_key_lookup(&self, f: KeyLookup) {
        *self.by_key.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    pub fn ca_pem(&self) -> Option<String> {
        lock(&self.cur).ca_pem.clone()
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.enabled {
            "https"
        } else {
            "http"
        }
    }

    fn server_config(self: &Arc<Self>, mandatory: bool) -> Arc<ServerConfig> {
        let verifier = Arc::new(MemberVerifier { tls: self.clone(), mandatory });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCert(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// The API's: a client certificate is optional (tokens are the norm);
    /// one that is presented must be a member's.
    pub fn api_server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        self.server_config(false)
    }

    /// The replication listener's: only members, checked at the handshake.
    pub fn replication_server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        self.server_config(true)
    }

    /// Node to node: the server must hold a certificate of the cluster CA
    /// for the address dialled; this node presents its own.
    pub fn peer_client_config(self: &Arc<Self>) -> ClientConfig {
        self.client_config(Arc::new(ClusterServerVerifier(self.clone())))
    }

    /// For the two calls a leader makes to an agent that is not a member
    /// yet (its certificate is self-signed): nothing secret is sent, and the
    /// agent checks what it receives against the CA it pinned.
    pub fn unverified_client_config(self: &Arc<Self>) -> ClientConfig {
        self.client_config(Arc::new(AnyServer(self.provider.clone())))
    }

    /// For the ticket's participants outside this cluster (the other
    /// site's, with its own CA, and the arbitrator): any server, none of
    /// this node's certificates — the shared key's seal on every message is
    /// what is trusted.
    pub fn sealed_client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(self.provider.clone())))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg
    }

    fn client_config(self: &Arc<Self>, verifier: Arc<dyn ServerCertVerifier>) -> ClientConfig {
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentCert(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg
    }

    /// A client that trusts exactly `ca_pem` and presents no certificate
    /// (a joining agent, talking to the cluster it pinned).
    pub fn pinned_client_config(ca_pem: &str) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca_pem)?)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// The member named by a verified peer certificate chain.
    pub fn peer_node(&self, certs: Option<&[CertificateDer<'_>]>) -> Option<PeerNode> {
        let leaf = certs?.first()?;
        if self.external {
            let spki = pki::spki_hash(leaf).ok()?;
            let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
            let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
            let lookup = lock(&self.by_key).clone()?;
            return lookup(&spki, &cn);
        }
        let id = pki::node_identity(leaf)?;
        let ours = lock(&self.cur).cluster_id.clone();
        (ours.as_deref() == Some(id.cluster_id.as_str())).then_some(PeerNode { id: id.node_id, name: id.name })
    }

    /// The key pin of a verified client certificate.
    pub fn client_spki(&self, certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
        pki::spki_hash(certs?.first()?).ok()
    }

    fn is_member(&self, end_entity: &CertificateDer<'_>) -> bool {
        if self.external {
            return self.peer_node(Some(std::slice::from_ref(end_entity))).is_some();
        }
        let Some(id) = pki::node_identity(end_entity) else { return false };
        if lock(&self.cur).cluster_id.as_deref() != Some(id.cluster_id.as_str()) {
            return false;
        }
        match lock(&self.members).as_ref() {
            Some(check) => check(id.node_id, &id.name),
            None => false,
        }
    }
}

/// Serves this node's current certificate, as a server and as a client.
#[derive(Debug)]
struct CurrentCert(Arc<Tls>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(lock(&self.0.cur).key.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let cur = lock(&self.0.cur);
        cur.member.then(|| cur.key.clone())
    }
    fn has_certs(&self) -> bool {
        lock(&self.0.cur).member
    }
}

/// Client certificates: signed by the cluster CA and naming a member.
#[derive(Debug)]
struct MemberVerifier {
    tls: Arc<Tls>,
    mandatory: bool,
}

impl ClientCertVerifier for MemberVerifier {
    fn offer_client_auth(&self) -> bool {
        self.mandatory || lock(&self.tls.cur).roots.is_some()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = lock(&self.tls.cur).roots.clone().ok_or(rustls::Error::General("not a cluster member".into()))?;
        let webpki = WebPkiClientVerifier::builder_with_provider(roots, self.tls.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_client_cert(end_entity, intermediates, now)?;
        // On the API, a certificate of the CA that is no node's (a person's,
        // a tool's) passes: the auth layer maps its key pin to a role or
        // refuses the request. A node certificate must name a member.
        let client = !self.mandatory && (self.tls.external || pki::node_identity(end_entity).is_none());
        if !client && !self.tls.is_member(end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure));
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.tls.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.tls.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.tls.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Servers: a certificate of the cluster CA for the address dialled.
#[derive(Debug)]
struct ClusterServerVerifier(Arc<Tls>);

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = lock(&self.0.cur).roots.clone().ok_or(rustls::Error::General("not a cluster member".into()))?;
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, self.0.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts any server certificate (see [`Tls::unverified_client_config`]).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A reqwest client builder over `cfg` (plain, when TLS is off).
pub fn client_builder(tls: &Tls, cfg: ClientConfig) -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder().no_proxy();
    if tls.enabled {
        b.tls_backend_preconfigured(cfg)
    } else {
        b
    }
}

/// A reqwest client over `cfg` (or plain, when TLS is off).
pub fn http_client(tls: &Tls, cfg: ClientConfig, connect_timeout: Duration) -> reqwest::Client {
    // Building fails only on a TLS backend mismatch, fixed at compile time.
    client_builder(tls, cfg)
        .connect_timeout(connect_timeout)
        .build()
        .expect("the reqwest client builds with a preconfigured rustls")
}

/// Accepts API connections, runs their handshakes concurrently (bounded,
/// timed out) and hands finished ones to axum.
pub async fn accept_api(listener: TcpListener, tls: Arc<Tls>, tx: mpsc::Sender<(ApiStream, PeerInfo)>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.api_server_config());
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("API accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        if !tls.enabled {
            let peer = PeerInfo { addr: Some(addr), plaintext: true, ..PeerInfo::default() };
            if tx.send((ApiStream::Plain(tcp), peer)).await.is_err() {
                return;
            }
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%addr, "too many TLS handshakes in progress; dropping the connection");
            continue;
        };
        let (acceptor, tls, tx) = (acceptor.clone(), tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let certs = stream.get_ref().1.peer_certificates();
                    let node = tls.peer_node(certs);
                    let cert_spki = tls.client_spki(certs);
                    let peer = PeerInfo { addr: Some(addr), node, cert_spki, ..PeerInfo::default() };
                    let _ = tx.send((ApiStream::Tls(Box::new(stream)), peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, "API TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%addr, "API TLS handshake timed out"),
            }
        });
    }
}

/// A replication connection, either side, TLS or (benchmarks) plain.
pub enum ReplicationStream {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ReplicationStream::Plain($s) => $e,
            ReplicationStream::Server($s) => $e,
            ReplicationStream::Client($s) => $e,
        }
    };
}

impl AsyncRead for ReplicationStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ReplicationStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The TLS side of the replication listener and dialer.
#[derive(Clone)]
pub struct ReplicationTls {
    tls: Arc<Tls>,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl ReplicationTls {
    pub fn new(tls: Arc<Tls>) -> ReplicationTls {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.replication_server_config());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls.peer_client_config()));
        ReplicationTls { tls, acceptor, connector }
    }

    /// Server side; the peer must present a member's certificate. Returns
    /// the stream and the member's name.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<(ReplicationStream, Option<String>)> {
        if !self.tls.enabled {
            return Ok((ReplicationStream::Plain(tcp), None));
        }
        let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let node = self.tls.peer_node(s.get_ref().1.peer_certificates()).map(|n| n.name);
        Ok((ReplicationStream::Server(Box::new(s)), node))
    }

    /// Client side, to `addr`: the peer must hold the CA's certificate for it.
    pub async fn connect(&self, tcp: TcpStream, addr: SocketAddr) -> io::Result<ReplicationStream> {
        if !self.tls.enabled {
            return Ok(ReplicationStream::Plain(tcp));
        }
        let name = ServerName::IpAddress(addr.ip().into());
        let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(ReplicationStream::Client(Box::new(s)))
    }
}
