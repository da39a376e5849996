//! The cluster's public-key infrastructure: the CA, node certificates,
//! signing requests, and reading a peer's identity out of its certificate.
//!
//! Pure functions over PEM/DER (the caller reads the clock and the files).
//! A node certificate names its node twice: the common name is the node's
//! name, and a URI SAN `tandem://<cluster_id>/node/<id>` carries the id that
//! is never reused — so a removed node's certificate can be refused for good
//! by checking the id against the membership.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use tandem_raft::NodeId;
use time::{Duration as TimeDuration, OffsetDateTime};

/// How long the cluster CA is valid.
pub const CA_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot make a key or certificate: {0}")]
    Generate(String),
    #[error("not a valid PEM certificate: {0}")]
    BadCertificate(String),
    #[error("not a valid certificate signing request: {0}")]
    BadRequest(String),
    #[error("not a valid private key: {0}")]
    BadKey(String),
    #[error("{0}")]
    Untrusted(String),
}

impl PkiError {
    pub fn code(&self) -> &'static str {
        "TND-1508"
    }
}

fn gen(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// The CA certificate and its key, both PEM.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A node's certificate and key, PEM.
#[derive(Clone)]
pub struct NodeMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Who a node certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    /// Unix seconds.
    pub not_after: i64,
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A new cluster CA.
pub fn new_ca(cluster_id: &str, now: OffsetDateTime) -> Result<CaMaterial, PkiError> {
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("tandem cluster {cluster_id} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now - TimeDuration::hours(1);
    params.not_after = now + TimeDuration::days(CA_DAYS);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(gen)?;
    Ok(CaMaterial { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A fresh node key and a signing request for it (the key never leaves the node).
pub fn new_request(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name.to_string());
    let csr = params.serialize_request(&key).map_err(gen)?;
    Ok((key.serialize_pem(), csr.pem().map_err(gen)?))
}

/// What the CA puts in a node certificate: decided by the signer from the
/// membership, never taken from the request.
pub struct NodeCertSpec<'a> {
    pub cluster_id: &'a str,
    pub node_id: NodeId,
    pub name: &'a str,
    pub addresses: &'a [String],
    pub days: i64,
}

fn node_params(spec: &NodeCertSpec<'_>, now: OffsetDateTime) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, spec.name.to_string());
    let mut sans =
        vec![SanType::URI(format!("tandem://{}/node/{}", spec.cluster_id, spec.node_id).try_into().map_err(gen)?)];
    for a in spec.addresses {
        let ip: IpAddr = a.parse().map_err(|_| PkiError::Generate(format!("{a:?} is not an IP address")))?;
        sans.push(SanType::IpAddress(ip));
    }
    sans.push(SanType::DnsName(spec.name.to_string().try_into().map_err(gen)?));
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now - TimeDuration::hours(1);
    params.not_after = now + TimeDuration::days(spec.days);
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Signs a node's request: the request's key, the signer's names.
pub fn sign_request(
    ca: &CaMaterial,
    csr_pem: &str,
    spec: &NodeCertSpec<'_>,
    now: OffsetDateTime,
) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadRequest(e.to_string()))?;
    let key = KeyPair::from_pem(&ca.key_pem).map_err(|e| PkiError::BadKey(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let cert = node_params(spec, now)?.signed_by(&csr.public_key, &issuer).map_err(gen)?;
    Ok(cert.pem())
}

/// A node's key and certificate made in one step (the first node, at init).
pub fn issue_node(ca: &CaMaterial, spec: &NodeCertSpec<'_>, now: OffsetDateTime) -> Result<NodeMaterial, PkiError> {
    let (key_pem, csr) = new_request(spec.name)?;
    let cert_pem = sign_request(ca, &csr, spec, now)?;
    Ok(NodeMaterial { cert_pem, key_pem })
}

/// A throwaway self-signed certificate: what an agent that belongs to no
/// cluster yet serves. Nobody trusts it; it only keeps the wire encrypted.
pub fn bootstrap_cert(name: &str, addresses: &[String]) -> Result<NodeMaterial, PkiError> {
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, format!("{name} (not yet a cluster member)"));
    params.subject_alt_names = addresses.iter().filter_map(|a| a.parse().ok()).map(SanType::IpAddress).collect();
    let cert = params.self_signed(&key).map_err(gen)?;
    Ok(NodeMaterial { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Every certificate of a PEM bundle, DER.
pub fn pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let mut out = Vec::new();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        out.push(c.map_err(|e| PkiError::BadCertificate(e.to_string()))?.to_vec());
    }
    if out.is_empty() {
        return Err(PkiError::BadCertificate("no CERTIFICATE block".into()));
    }
    Ok(out)
}

/// `sha256:<hex>` of a certificate's SubjectPublicKeyInfo (kubeadm's CA pin).
pub fn spki_hash(cert_der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let digest = Sha256::digest(cert.tbs_certificate.subject_pki.raw);
    Ok(format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The pin of the first certificate of a PEM bundle.
pub fn ca_hash(ca_pem: &str) -> Result<String, PkiError> {
    let ders = pem_certs(ca_pem)?;
    spki_hash(&ders[0])
}

/// The node a certificate names, when it is a tandem node certificate.
pub fn node_identity(cert_der: &[u8]) -> Option<NodeIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let san = cert.subject_alternative_name().ok()??;
    let uri = san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("tandem://"),
        _ => None,
    })?;
    let (cluster_id, id) = uri.split_once("/node/")?;
    Some(NodeIdentity {
        cluster_id: cluster_id.to_string(),
        node_id: id.parse().ok()?,
        name,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Whether `cert_pem` is signed by `ca_pem` and carries `key_pem`'s public key.
pub fn check_issued_for(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeIdentity, PkiError> {
    let ca = pem_certs(ca_pem)?;
    let cert = pem_certs(cert_pem)?;
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(&ca[0]).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&cert[0]).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    leaf.verify_signature(Some(ca_cert.public_key()))
        .map_err(|_| PkiError::BadCertificate("not signed by the cluster CA".into()))?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey(e.to_string()))?;
    if leaf.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
        return Err(PkiError::BadCertificate("made for another key".into()));
    }
    node_identity(&cert[0]).ok_or_else(|| PkiError::BadCertificate("not a tandem node certificate".into()))
}

/// What the agent and the API need to know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: Option<String>,
    /// `sha256:<hex>` of the SubjectPublicKeyInfo.
    pub spki: String,
    /// Serial number, hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the first certificate of a PEM bundle.
pub fn cert_info(cert_pem: &str) -> Result<CertInfo, PkiError> {
    let der = pem_certs(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der[0]).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let info = CertInfo {
        common_name: cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).map(str::to_string),
        spki: spki_hash(&der[0])?,
        serial: cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    Ok(info)
}

/// Whether the first certificate of `cert_pem` is signed by one of the
/// certificates of `ca_pem` (directly: intermediates are not followed).
pub fn check_signed_by(ca_pem: &str, cert_pem: &str) -> Result<(), PkiError> {
    let cas = pem_certs(ca_pem)?;
    let leaf = pem_certs(cert_pem)?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&leaf[0]).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    for ca in &cas {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca) else { continue };
        if leaf.verify_signature(Some(ca.public_key())).is_ok() {
            return Ok(());
        }
    }
    Err(PkiError::Untrusted("the certificate is not signed by the configured CA".into()))
}

/// Whether `key_pem` (PKCS#8, PKCS#1 or SEC1) is the key of `cert_pem`.
pub fn check_key_matches(cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| PkiError::BadKey(e.to_string()))?;
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider.key_provider.load_private_key(key).map_err(|e| PkiError::BadKey(e.to_string()))?;
    let public = signer.public_key().ok_or_else(|| PkiError::BadKey("cannot read its public key".into()))?;
    let der = pem_certs(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der[0]).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    if cert.tbs_certificate.subject_pki.raw != public.as_ref() {
        return Err(PkiError::BadKey("it is not the key of the certificate".into()));
    }
    Ok(())
}

/// Which file of an operator's certificate set is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalFault {
    Ca(String),
    Cert(String),
    Key(String),
}

/// Checks an operator's CA, node certificate and key (`[tls] ca_file`,
/// `cert_file`, `key_file`): each parses, the key is the certificate's,
/// the CA signed it, it is valid at `now` (Unix seconds) and names `name`.
pub fn check_external(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    name: &str,
    now: i64,
) -> Result<CertInfo, ExternalFault> {
    pem_certs(ca_pem).map_err(|e| ExternalFault::Ca(e.to_string()))?;
    let info = cert_info(cert_pem).map_err(|e| ExternalFault::Cert(e.to_string()))?;
    check_key_matches(cert_pem, key_pem).map_err(|e| match e {
        PkiError::BadKey(m) => ExternalFault::Key(m),
        other => ExternalFault::Cert(other.to_string()),
    })?;
    check_signed_by(ca_pem, cert_pem).map_err(|e| ExternalFault::Cert(e.to_string()))?;
    check_valid(&info, now).map_err(ExternalFault::Cert)?;
    if info.common_name.as_deref() != Some(name) {
        return Err(ExternalFault::Cert(format!(
            "its common name is {:?}, not the node's name {name:?}",
            info.common_name.unwrap_or_default()
        )));
    }
    Ok(info)
}

/// Whether a certificate is valid at `now` (Unix seconds).
pub fn check_valid(info: &CertInfo, now: i64) -> Result<(), String> {
    if now >= info.not_after {
        return Err("the certificate has expired".into());
    }
    if now < info.not_before {
        return Err("the certificate is not valid yet".into());
    }
    Ok(())
}

/// Signs a client certificate (a person's or a tool's) from its request:
/// the name is the signer's, in the common name and a URI SAN
/// `tandem://<cluster_id>/client/<name>` (never a node's URI).
pub fn sign_client_request(
    ca: &CaMaterial,
    csr_pem: &str,
    cluster_id: &str,
    name: &str,
    days: i64,
    now: OffsetDateTime,
) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadRequest(e.to_string()))?;
    let key = KeyPair::from_pem(&ca.key_pem).map_err(|e| PkiError::BadKey(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name.to_string());
    params.subject_alt_names =
        vec![SanType::URI(format!("tandem://{cluster_id}/client/{name}").try_into().map_err(gen)?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now - TimeDuration::hours(1);
    params.not_after = now + TimeDuration::days(days);
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params.signed_by(&csr.public_key, &issuer).map_err(gen)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(addresses: &'a [String]) -> NodeCertSpec<'a> {
        NodeCertSpec { cluster_id: "c1", node_id: 7, name: "node7", addresses, days: 30 }
    }

    #[test]
    fn a_client_certificate_carries_the_requests_key_and_names_no_node() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("c1", now).unwrap();
        let (key, csr) = new_request("ignored").unwrap();
        let cert = sign_client_request(&ca, &csr, "c1", "alice", 30, now).unwrap();
        check_signed_by(&ca.cert_pem, &cert).unwrap();
        check_key_matches(&cert, &key).unwrap();
        let info = cert_info(&cert).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("alice"));
        assert!(node_identity(&pem_certs(&cert).unwrap()[0]).is_none(), "a client is never a node");
        let other = new_ca("c2", now).unwrap();
        assert!(check_signed_by(&other.cert_pem, &cert).is_err());
    }

    #[test]
    fn an_operators_files_are_checked_each_for_its_own_fault() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("c1", now).unwrap();
        let addrs = vec!["10.0.0.7".to_string()];
        let node = issue_node(&ca, &spec(&addrs), now).unwrap();
        let t = now.unix_timestamp();
        assert!(check_external(&ca.cert_pem, &node.cert_pem, &node.key_pem, "node7", t).is_ok());
        assert!(matches!(check_external("junk", &node.cert_pem, &node.key_pem, "node7", t), Err(ExternalFault::Ca(_))));
        assert!(matches!(check_external(&ca.cert_pem, "junk", &node.key_pem, "node7", t), Err(ExternalFault::Cert(_))));
        let other = issue_node(&ca, &spec(&addrs), now).unwrap();
        assert!(matches!(
            check_external(&ca.cert_pem, &node.cert_pem, &other.key_pem, "node7", t),
            Err(ExternalFault::Key(_))
        ));
        let ca2 = new_ca("c2", now).unwrap();
        assert!(matches!(
            check_external(&ca2.cert_pem, &node.cert_pem, &node.key_pem, "node7", t),
            Err(ExternalFault::Cert(_))
        ));
        assert!(matches!(
            check_external(&ca.cert_pem, &node.cert_pem, &node.key_pem, "node7", t + 31 * 86_400),
            Err(ExternalFault::Cert(_))
        ));
        assert!(matches!(
            check_external(&ca.cert_pem, &node.cert_pem, &node.key_pem, "node8", t),
            Err(ExternalFault::Cert(_))
        ));
    }

    #[test]
    fn a_node_certificate_names_its_node_and_chains_to_the_ca() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("c1", now).unwrap();
        let addrs = vec!["10.0.0.7".to_string(), "fd00::7".to_string()];
        let (key, csr) = new_request("node7").unwrap();
        let cert = sign_request(&ca, &csr, &spec(&addrs), now).unwrap();
        let id = check_issued_for(&ca.cert_pem, &cert, &key).unwrap();
        assert_eq!((id.cluster_id.as_str(), id.node_id, id.name.as_str()), ("c1", 7, "node7"));
        assert!(id.not_after > now.unix_timestamp() + 29 * 86400);
        // Another key, another CA: refused.
        let (other_key, _) = new_request("x").unwrap();
        assert!(check_issued_for(&ca.cert_pem, &cert, &other_key).is_err());
        let other_ca = new_ca("c1", now).unwrap();
        assert!(check_issued_for(&other_ca.cert_pem, &cert, &key).is_err());
    }

    #[test]
    fn the_ca_pin_is_stable_and_differs_between_cas() {
        let now = OffsetDateTime::now_utc();
        let a = new_ca("c1", now).unwrap();
        let b = new_ca("c1", now).unwrap();
        let ha = ca_hash(&a.cert_pem).unwrap();
        assert!(ha.starts_with("sha256:") && ha.len() == 7 + 64);
        assert_eq!(ha, ca_hash(&a.cert_pem).unwrap());
        assert_ne!(ha, ca_hash(&b.cert_pem).unwrap());
    }

    #[test]
    fn garbage_is_refused_with_an_error() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("c1", now).unwrap();
        assert!(matches!(sign_request(&ca, "not a csr", &spec(&[]), now), Err(PkiError::BadRequest(_))));
        assert!(ca_hash("nope").is_err());
        assert!(node_identity(b"\x30\x03junk").is_none());
        let boot = bootstrap_cert("n", &["127.0.0.1".into()]).unwrap();
        assert!(node_identity(&pem_certs(&boot.cert_pem).unwrap()[0]).is_none());
    }
}
