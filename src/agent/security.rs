//! The agent's security workflows: the CA and certificates at init, join
//! (pin the CA, send a signing request, check the adoption), certificate
//! renewal and the CA key on voters; API tokens; the audit log's queue.
//!
//! With an operator's CA (`[tls] ca_file`) the agent makes, holds and signs
//! no certificate: it re-reads the operator's files each security round and
//! pins each member's certificate by its key in the replicated state.
//!
//! Decisions about tokens and the audit log are the state machine's
//! (`tandem_raft::access`); this module reads clocks and files and proposes.
//! It must never log a token's secret or a key.

use super::*;
use crate::security::files::save_admin_token;
use crate::security::pki::{self, CaMaterial, NodeCertSpec};
use crate::security::{new_secret, now_ms};
use tandem_http_api::listen::PeerNode;
use tandem_http_api::{
    CaKeyView, CaView, CertificateRequest, CertificateView, ClientCertCreated, ClientCertView, InitView,
    JoinTokenRequest, JoinTokenView, NodeCertRequest, RenewRequest, TokenCreated, TokenRequest, TokenView,
};
use tandem_raft::access::{token_hash, AuditEntry, ClientCertRecord, Role, TokenRecord, MAX_AUDIT_BATCH};

/// JSON an audit batch sent to the leader carries at most (the API
/// refuses bodies over 256 KiB; an older agent, over 64 KiB).
const AUDIT_BATCH_BYTES: usize = 48 * 1024;

/// Default and longest lifetime of a join token.
const JOIN_TOKEN_TTL_S: u64 = 3600;
const JOIN_TOKEN_MAX_TTL_S: u64 = 86_400;
/// How often queued audit entries are sent for replication.
pub(super) const AUDIT_FLUSH: Duration = Duration::from_millis(250);
/// How often a node checks its certificate's age and its CA key.
pub(super) const CERT_CHECK: Duration = Duration::from_secs(10);

fn pki_err(e: pki::PkiError) -> ApiError {
    ApiError::BadCertificate(e.to_string())
}

fn now_utc() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn view(t: &TokenRecord) -> TokenView {
    TokenView {
        name: t.name.clone(),
        role: t.role,
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        created_by: t.created_by.clone(),
    }
}

fn cert_view(c: &ClientCertRecord) -> ClientCertView {
    ClientCertView {
        name: c.name.clone(),
        role: c.role,
        spki: c.spki.clone(),
        serial: c.serial.clone(),
        not_after_ms: c.not_after_ms,
        created_ms: c.created_ms,
        created_by: c.created_by.clone(),
    }
}

/// Default and longest lifetime of a client certificate the cluster signs.
const CLIENT_CERT_DAYS: u32 = 365;
const CLIENT_CERT_MAX_DAYS: u32 = 3650;

fn external_only(what: &str) -> ApiError {
    ApiError::CaExternal(format!(
        "this cluster's certificates come from the operator's CA ([tls] ca_file): it signs no {what}"
    ))
}

fn own_ca_only(what: &str) -> ApiError {
    ApiError::CaExternal(format!(
        "this cluster makes its own certificates (no [tls] ca_file): {what} is for clusters with an operator's CA"
    ))
}

impl Agent {
    /// The operator's files as last taken into use.
    fn external_files(&self) -> Option<crate::config::ExternalTls> {
        self.external_tls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// An operator-issued certificate presented for `name` (a node joining,
    /// or renewed): signed by our CA, valid now, naming `name`.
    pub(super) fn check_member_cert(&self, cert_pem: &str, name: &str) -> Result<pki::CertInfo, ApiError> {
        let ca = self.external_files().ok_or_else(|| own_ca_only("a node's own certificate"))?;
        pki::check_signed_by(&ca.ca_pem, cert_pem).map_err(pki_err)?;
        let info = pki::cert_info(cert_pem).map_err(pki_err)?;
        pki::check_valid(&info, now_utc().unix_timestamp()).map_err(ApiError::BadCertificate)?;
        if info.common_name.as_deref() != Some(name) {
            return Err(ApiError::BadCertificate(format!(
                "its common name is {:?}, not the node's name {name:?}",
                info.common_name.unwrap_or_default()
            )));
        }
        Ok(info)
    }

    /// The member a key pin names (operator's CA). An agent just adopted
    /// has no state yet: the CA vouches for the leader until the log arrives.
    pub(super) fn do_member_by_key(&self, spki: &str, cn: &str) -> Option<PeerNode> {
        let m = self.member()?;
        m.state.read(|d| {
            if d.state.nodes.is_empty() {
                return Some(PeerNode { id: tandem_http_api::listen::PROVISIONAL_NODE, name: cn.to_string() });
            }
            let id = d.state.node_certs.iter().find(|(_, s)| *s == spki).map(|(id, _)| *id)?;
            d.state.nodes.get(&id).map(|n| PeerNode { id, name: n.name.clone() })
        })
    }

    /// At init: a new CA, this node's certificate, both taken into use
    /// (with an operator's CA: its files). Returns the CA certificate.
    pub(super) fn init_tls(&self, cluster_id: &str) -> Result<String, ApiError> {
        if let Some(files) = self.external_files() {
            let node = pki::NodeMaterial { cert_pem: files.cert_pem.clone(), key_pem: files.key_pem.clone() };
            self.tls.install(cluster_id, &files.ca_pem, &node).map_err(|e| ApiError::Internal(e.to_string()))?;
            return Ok(files.ca_pem);
        }
        let ca = pki::new_ca(cluster_id, now_utc()).map_err(pki_err)?;
        let spec = NodeCertSpec {
            cluster_id,
            node_id: 1,
            name: &self.cfg.name,
            addresses: &self.cfg.addresses,
            days: self.cfg.tls.node_cert_days.into(),
        };
        let node = pki::issue_node(&ca, &spec, now_utc()).map_err(pki_err)?;
        self.tls_files.save_ca_key(&ca).map_err(storage_err)?;
        self.tls_files.save_node(&node).map_err(storage_err)?;
        self.tls.install(cluster_id, &ca.cert_pem, &node).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(ca.cert_pem)
    }

    /// At init, after the bootstrap entry, with an operator's CA: pins this
    /// node's certificate.
    pub(super) async fn pin_first_node(&self, m: &Member) -> Result<(), ApiError> {
        let Some(files) = self.external_files() else { return Ok(()) };
        let spki = pki::cert_info(&files.cert_pem).map_err(pki_err)?.spki;
        self.propose(m, Command::SetNodeCertificate { node_id: m.node_id, spki }).await.map(|_| ())
    }

    /// At init, after the bootstrap entry: the first admin token.
    pub(super) async fn first_admin_token(&self, m: &Member, ca_pem: &str) -> Result<InitView, ApiError> {
        let secret = new_secret();
        let token = TokenRecord {
            name: "admin".into(),
            role: Role::Admin,
            hash: token_hash(&secret),
            created_ms: now_ms(),
            expires_ms: None,
            created_by: "cluster init".into(),
        };
        self.propose(m, Command::CreateToken { token }).await?;
        let path = save_admin_token(&self.cfg.data_dir, &secret).map_err(storage_err)?;
        tracing::info!(path = %path.display(), "first admin token written (mode 0600)");
        Ok(InitView {
            node: self.local_view(),
            admin_token: secret,
            ca_hash: pki::ca_hash(ca_pem).map_err(pki_err)?,
            ca_pem: ca_pem.to_string(),
        })
    }

    /// Joining: fetches the CA at `via`, checks it against the pin, and
    /// only then sends the token and a signing request for a fresh key
    /// (with an operator's CA: this node's certificate, its key staying
    /// here). Returns the client, the signing request and the certificate.
    pub(super) async fn secure_join_body(
        &self,
        via: &str,
        token: Option<&str>,
        ca_hash: Option<&str>,
    ) -> Result<JoinBody, ApiError> {
        if !self.tls.enabled {
            return Ok((self.http.clone(), None, None));
        }
        token.ok_or_else(|| ApiError::Invalid {
            field: "token".into(),
            reason: "a join token is required (`tandem cluster join-token` on a member)".into(),
        })?;
        let pin = ca_hash.ok_or_else(|| ApiError::Invalid {
            field: "ca_hash".into(),
            reason: "the CA pin is required (printed by `tandem cluster join-token`)".into(),
        })?;
        if !crate::config::valid_ca_hash(pin) {
            return Err(ApiError::Invalid { field: "ca_hash".into(), reason: "must be sha256:<64 hex digits>".into() });
        }
        let unreachable = |reason: String| ApiError::JoinTargetUnreachable { url: via.to_string(), reason };
        // Nothing secret goes out on this connection: it only fetches the
        // public CA certificate, which the pin then authenticates.
        let resp = self
            .unverified_http
            .get(format!("{via}/v1/cluster/ca"))
            .timeout(PEER_TIMEOUT)
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let ca: CaView = decode(via, resp).await.map_err(|e| unreachable(e.to_string()))?;
        let actual = pki::ca_hash(&ca.ca_pem).map_err(pki_err)?;
        if actual != pin {
            return Err(ApiError::CaMismatch { url: via.to_string(), expected: pin.to_string(), actual });
        }
        // The operator may have renewed the files since the agent started.
        let external = if self.tls.external {
            let now = now_utc().unix_timestamp();
            let files = self
                .cfg
                .tls
                .read_external(&self.cfg.name, now)
                .map_err(|(key, e)| ApiError::BadCertificate(format!("{key}: {e}")))?;
            *self.external_tls.lock().unwrap_or_else(|p| p.into_inner()) = files.clone();
            files
        } else {
            None
        };
        if let Some(files) = &external {
            let ours = pki::ca_hash(&files.ca_pem).map_err(pki_err)?;
            if ours != actual {
                return Err(ApiError::CaExternal(format!(
                    "the cluster at {via} uses CA {actual}, not this node's [tls] ca_file ({ours}): a node joins \
                     only a cluster of its own operator's CA"
                )));
            }
        }
        let cfg = crate::security::tls::Tls::pinned_client_config(&ca.ca_pem)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let client = crate::security::tls::client_builder(&self.tls, cfg)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(files) = external {
            *self.pending_join.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(PendingJoin { ca_pem: ca.ca_pem, key_pem: files.key_pem });
            return Ok((client, None, Some(files.cert_pem)));
        }
        let (key_pem, csr) = pki::new_request(&self.cfg.name).map_err(pki_err)?;
        *self.pending_join.lock().unwrap_or_else(|p| p.into_inner()) = Some(PendingJoin { ca_pem: ca.ca_pem, key_pem });
        Ok((client, Some(csr), None))
    }

    /// Adopted: the certificate must chain to the pinned CA and carry the
    /// key this agent made for the join, and name what the request says.
    pub(super) fn adopt_tls(&self, req: &AdoptRequest) -> Result<(), ApiError> {
        if !self.tls.enabled {
            return Ok(());
        }
        let pending =
            self.pending_join.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| ApiError::Forbidden {
                who: "the caller".into(),
                role: "-".into(),
                action: "adopt an agent that has not asked to join (`tandem cluster join`)".into(),
            })?;
        if req.ca.trim() != pending.ca_pem.trim() {
            return Err(ApiError::BadCertificate("the adoption names another CA than the one pinned".into()));
        }
        if let Some(files) = self.external_files() {
            // The operator's files stay where they are; nothing is written.
            if req.certificate.trim() != files.cert_pem.trim() {
                return Err(ApiError::BadCertificate("the adoption pins another certificate than this node's".into()));
            }
            let node = pki::NodeMaterial { cert_pem: files.cert_pem, key_pem: files.key_pem };
            self.tls.install(&req.cluster_id, &files.ca_pem, &node).map_err(|e| ApiError::Internal(e.to_string()))?;
            *self.pending_join.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(());
        }
        let id = pki::check_issued_for(&pending.ca_pem, &req.certificate, &pending.key_pem).map_err(pki_err)?;
        if id.cluster_id != req.cluster_id || id.node_id != req.node_id || id.name != self.cfg.name {
            return Err(ApiError::BadCertificate(format!(
                "the certificate names node {} ({}) of {}, not this adoption",
                id.name, id.node_id, id.cluster_id
            )));
        }
        let node = pki::NodeMaterial { cert_pem: req.certificate.clone(), key_pem: pending.key_pem };
        self.tls_files.save_ca_cert(&pending.ca_pem).map_err(storage_err)?;
        self.tls_files.save_node(&node).map_err(storage_err)?;
        self.tls.install(&req.cluster_id, &pending.ca_pem, &node).map_err(|e| ApiError::Internal(e.to_string()))?;
        *self.pending_join.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Removed: forget the certificate and the CA.
    pub(super) fn release_tls(&self) {
        if let Err(e) = self.tls_files.wipe() {
            tracing::warn!("cannot remove the TLS files: {e}");
        }
        if let Err(e) = self.tls.reset(&self.bootstrap) {
            tracing::warn!("cannot go back to the bootstrap certificate: {e}");
        }
    }

    fn ca(&self) -> Result<CaMaterial, ApiError> {
        if self.tls.external {
            return Err(external_only("certificate"));
        }
        self.tls_files
            .ca_key()
            .map_err(storage_err)?
            .ok_or_else(|| ApiError::CaUnavailable("the cluster CA's key is not on this leader yet".into()))
    }

    /// On the leader: a certificate for member `id` from its signing request.
    pub(super) fn sign_for(&self, m: &Member, id: NodeId, spec: &NodeSpec, csr: &str) -> Result<String, ApiError> {
        let ca = self.ca()?;
        let spec = NodeCertSpec {
            cluster_id: &m.cluster_id,
            node_id: id,
            name: &spec.name,
            addresses: &spec.addresses,
            days: self.cfg.tls.node_cert_days.into(),
        };
        pki::sign_request(&ca, csr, &spec, now_utc()).map_err(pki_err)
    }

    pub(super) fn ca_pem_or_empty(&self) -> String {
        self.tls.ca_pem().unwrap_or_default()
    }

    // ---- tokens ----

    pub(super) fn do_authenticate(&self, secret: &str) -> Result<(String, Role), ApiError> {
        let m = self.member().ok_or_else(|| ApiError::TokenRejected("this node belongs to no cluster".into()))?;
        if !secret.starts_with(tandem_raft::access::TOKEN_PREFIX) {
            return Err(ApiError::Unauthenticated("not a tandem token (they start with tnd_)".into()));
        }
        let hash = token_hash(secret);
        let found = m.state.read(|d| d.state.tokens.by_hash(&hash).cloned());
        match found {
            None => Err(ApiError::TokenRejected("unknown or revoked".into())),
            Some(t) if t.expired(now_ms()) => Err(ApiError::TokenRejected(format!("token {} expired", t.name))),
            Some(t) => Ok((t.name, t.role)),
        }
    }

    pub(super) fn do_is_member_node(&self, id: NodeId, name: &str) -> bool {
        let Some(m) = self.member() else { return false };
        m.state.read(|d| {
            // An agent just adopted has no state yet: the CA vouches for
            // the leader until the log arrives.
            d.state.nodes.is_empty() || d.state.nodes.get(&id).is_some_and(|n| n.name == name)
        })
    }

    pub(super) async fn do_create_token(&self, req: TokenRequest, by: String) -> Result<TokenCreated, ApiError> {
        let m = self.require_member()?;
        if req.role == Role::Join {
            return Err(ApiError::Invalid {
                field: "role".into(),
                reason: "join tokens come from POST /v1/cluster/join-token".into(),
            });
        }
        let created_ms = now_ms();
        let expires_ms = match req.expires_in_s {
            None => None,
            Some(0) => {
                return Err(ApiError::Invalid { field: "expires_in_s".into(), reason: "must be at least 1".into() })
            }
            Some(s) if s > 10 * 365 * 86_400 => {
                return Err(ApiError::Invalid { field: "expires_in_s".into(), reason: "at most ten years".into() })
            }
            Some(s) => Some(created_ms + s * 1000),
        };
        let secret = new_secret();
        let token = TokenRecord {
            name: req.name,
            role: req.role,
            hash: token_hash(&secret),
            created_ms,
            expires_ms,
            created_by: by,
        };
        self.propose(&m, Command::CreateToken { token: token.clone() }).await?;
        tracing::info!(token = %token.name, role = token.role.as_str(), by = %token.created_by, "token created");
        Ok(TokenCreated { view: view(&token), token: secret })
    }

    pub(super) async fn do_tokens(&self) -> Result<Vec<TokenView>, ApiError> {
        let m = self.read_member(false).await?;
        Ok(m.state.read(|d| d.state.tokens.by_name.values().map(view).collect()))
    }

    pub(super) async fn do_revoke_token(&self, name: &str) -> Result<(), ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::RevokeToken { name: name.to_string() }).await?;
        tracing::info!(token = name, "token revoked");
        Ok(())
    }

    pub(super) async fn do_join_token(&self, req: JoinTokenRequest, by: String) -> Result<JoinTokenView, ApiError> {
        let m = self.require_member()?;
        let ttl = req.ttl_s.unwrap_or(JOIN_TOKEN_TTL_S);
        if !(1..=JOIN_TOKEN_MAX_TTL_S).contains(&ttl) {
            return Err(ApiError::Invalid {
                field: "ttl_s".into(),
                reason: format!("must be 1 to {JOIN_TOKEN_MAX_TTL_S} seconds"),
            });
        }
        let ca_pem = self.tls.ca_pem().unwrap_or_default();
        let ca_hash = if self.tls.enabled { pki::ca_hash(&ca_pem).map_err(pki_err)? } else { String::new() };
        let secret = new_secret();
        let created_ms = now_ms();
        let name = format!("join-{}", &token_hash(&secret)[..8]);
        let token = TokenRecord {
            name: name.clone(),
            role: Role::Join,
            hash: token_hash(&secret),
            created_ms,
            expires_ms: Some(created_ms + ttl * 1000),
            created_by: by,
        };
        self.propose(&m, Command::CreateToken { token }).await?;
        Ok(JoinTokenView { name, token: secret, ca_hash, expires_ms: created_ms + ttl * 1000 })
    }

    pub(super) fn do_cluster_ca(&self) -> Result<CaView, ApiError> {
        let ca_pem = self.tls.ca_pem().ok_or(ApiError::NotMember)?;
        Ok(CaView { ca_hash: pki::ca_hash(&ca_pem).map_err(pki_err)?, ca_pem })
    }

    pub(super) async fn do_renew(&self, node: &str, req: RenewRequest) -> Result<CertificateView, ApiError> {
        let m = self.require_member()?;
        let (id, spec) = m
            .state
            .read(|d| {
                d.state.node_by_name(node).map(|r| {
                    (
                        r.id,
                        NodeSpec {
                            name: r.name.clone(),
                            addresses: r.addresses.clone(),
                            port: r.port,
                            site: r.site.clone(),
                            witness: r.witness,
                        },
                    )
                })
            })
            .ok_or_else(|| ApiError::NodeNotFound(node.to_string()))?;
        let certificate = self.sign_for(&m, id, &spec, &req.csr)?;
        tracing::info!(node, "certificate renewed");
        Ok(CertificateView { certificate })
    }

    pub(super) async fn do_ca_key(&self, node: &str) -> Result<CaKeyView, ApiError> {
        let m = self.require_member()?;
        let id = m
            .state
            .read(|d| d.state.node_by_name(node).map(|r| r.id))
            .ok_or_else(|| ApiError::NodeNotFound(node.into()))?;
        let voter = m.metrics().membership_config.membership().voter_ids().any(|v| v == id);
        if !voter {
            return Err(ApiError::Forbidden {
                who: format!("node:{node}"),
                role: "learner".into(),
                action: "hold the CA key (voters only)".into(),
            });
        }
        let ca = self.ca()?;
        tracing::info!(node, "CA key handed to a voter");
        Ok(CaKeyView { cert_pem: ca.cert_pem, key_pem: ca.key_pem })
    }

    // ---- audit ----

    pub(super) fn queue_audit(&self, mut entry: AuditEntry) {
        entry.time_ms = now_ms();
        let mut q = self.audit_queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.entries.len() >= AUDIT_QUEUE_MAX {
            q.dropped += 1;
            if q.dropped.is_power_of_two() {
                tracing::warn!(dropped = q.dropped, "audit queue full: entries dropped (no leader to take them?)");
            }
            return;
        }
        q.entries.push_back(entry);
    }

    pub(super) async fn do_record_audit_batch(&self, entries: Vec<AuditEntry>) -> Result<(), ApiError> {
        let m = self.require_member()?;
        if entries.len() > MAX_AUDIT_BATCH {
            return Err(ApiError::Invalid { field: "entries".into(), reason: format!("at most {MAX_AUDIT_BATCH}") });
        }
        self.propose(&m, Command::RecordAudit { entries, retain: self.cfg.audit.retention }).await.map(|_| ())
    }

    /// Sends queued audit entries to the leader; on failure they go back
    /// to the front of the queue, in order.
    pub(super) async fn flush_audit(&self) {
        let batch: Vec<AuditEntry> = {
            let mut q = self.audit_queue.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded in count and in bytes: an older agent's API takes at most 64 KiB
            // (an entry is about 300 B, a path can make it longer).
            let (mut n, mut bytes) = (0, 0);
            for e in q.entries.iter().take(MAX_AUDIT_BATCH) {
                bytes += serde_json::to_vec(e).map_or(0, |v| v.len() + 1);
                if n > 0 && bytes > AUDIT_BATCH_BYTES {
                    break;
                }
                n += 1;
            }
            q.entries.drain(..n).collect()
        };
        if batch.is_empty() || self.member().is_none() {
            if !batch.is_empty() {
                self.requeue(batch);
            }
            return;
        }
        let body = tandem_http_api::AuditBatch { entries: batch.clone() };
        let sent = self.on_leader("/internal/audit", &body, self.do_record_audit_batch(batch.clone())).await;
        if let Err(e) = sent {
            tracing::debug!("audit entries not replicated yet: {e}");
            self.requeue(batch);
        }
    }

    fn requeue(&self, batch: Vec<AuditEntry>) {
        let mut q = self.audit_queue.lock().unwrap_or_else(|p| p.into_inner());
        for e in batch.into_iter().rev() {
            if q.entries.len() >= AUDIT_QUEUE_MAX {
                q.dropped += 1;
                continue;
            }
            q.entries.push_front(e);
        }
    }

    pub(super) async fn do_audit(&self, since: u64, limit: usize) -> Result<Vec<AuditEntry>, ApiError> {
        let m = self.read_member(false).await?;
        Ok(m.state.read(|d| d.state.audit.since(since, limit)))
    }

    // ---- periodic: certificate age, the CA key on voters, expired tokens ----

    /// Renews this node's certificate when a third of its life is left;
    /// fetches the CA key when this node votes and lacks it; drops it when
    /// it no longer votes; on the leader, drops expired tokens.
    pub(super) async fn security_round(&self) {
        let Some(m) = self.member() else { return };
        if !self.tls.enabled {
            return;
        }
        if self.tls.external {
            self.reload_external(&m).await;
            self.expire_tokens(&m).await;
            return;
        }
        let metrics = m.metrics();
        let voter = metrics.membership_config.membership().voter_ids().any(|v| v == m.node_id);
        let has_key = matches!(self.tls_files.ca_key(), Ok(Some(_)));
        if voter && !has_key {
            match self.on_leader_json::<CaKeyView>("/internal/ca-key").await {
                Ok(k) => {
                    let ca = CaMaterial { cert_pem: k.cert_pem, key_pem: k.key_pem };
                    match self.tls_files.save_ca_key(&ca) {
                        Ok(()) => tracing::info!("this voter now holds the CA key"),
                        Err(e) => tracing::warn!("cannot save the CA key: {e}"),
                    }
                }
                Err(e) => tracing::debug!("CA key not fetched yet: {e}"),
            }
        } else if !voter && has_key && metrics.current_leader.is_some() {
            if let Err(e) = self.tls_files.drop_ca_key() {
                tracing::warn!("cannot drop the CA key: {e}");
            } else {
                tracing::info!("no longer a voter: CA key removed");
            }
        }
        if let Ok(Some(node)) = self.tls_files.node() {
            let left = pki::pem_certs(&node.cert_pem)
                .ok()
                .and_then(|d| pki::node_identity(&d[0]))
                .map(|id| id.not_after - now_utc().unix_timestamp());
            let life = i64::from(self.cfg.tls.node_cert_days) * 86_400;
            if left.is_some_and(|l| l < life / 3) {
                self.renew_own().await;
            }
        }
        self.expire_tokens(&m).await;
    }

    /// On the leader: drops expired tokens.
    async fn expire_tokens(&self, m: &Member) {
        if m.metrics().current_leader == Some(m.node_id) {
            let now = now_ms();
            if m.state.read(|d| d.state.tokens.by_name.values().any(|t| t.expired(now))) {
                let _ = self.propose(m, Command::ExpireTokens { now_ms: now }).await;
            }
        }
    }

    /// Operator's CA: takes changed files into use (the operator renewed
    /// them). A new key is pinned in the replicated state first, while the
    /// old certificate still speaks for this node; files that do not pass
    /// the start-up checks are refused and the old ones kept.
    async fn reload_external(&self, m: &Member) {
        let now = now_utc().unix_timestamp();
        let files = match self.cfg.tls.read_external(&self.cfg.name, now) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err((key, e)) => {
                tracing::warn!("{key}: {e} (the certificate in use is kept)");
                return;
            }
        };
        if self.external_files().as_ref() == Some(&files) {
            return;
        }
        let Ok(info) = pki::cert_info(&files.cert_pem) else { return };
        let pinned = m.state.read(|d| d.state.node_certs.get(&m.node_id).cloned());
        if pinned.as_deref() != Some(info.spki.as_str()) {
            let req = NodeCertRequest { certificate: files.cert_pem.clone() };
            let done = if self.route() == Route::Here {
                self.do_pin_node_certificate(&self.cfg.name, req).await
            } else {
                self.on_leader_post::<_, serde_json::Value>("/internal/node-certificate", &req).await.map(|_| ())
            };
            if let Err(e) = done {
                tracing::warn!("the renewed certificate's key is not pinned yet (retried): {e}");
                return;
            }
        }
        let node = pki::NodeMaterial { cert_pem: files.cert_pem.clone(), key_pem: files.key_pem.clone() };
        match self.tls.install(&m.cluster_id, &files.ca_pem, &node) {
            Ok(()) => {
                tracing::info!(serial = %info.serial, "the operator's certificate files changed: now in use");
                *self.external_tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(files);
            }
            Err(e) => tracing::warn!("cannot use the renewed certificate files: {e}"),
        }
    }

    /// On the leader, operator's CA: member `node` pins its new certificate.
    pub(super) async fn do_pin_node_certificate(&self, node: &str, req: NodeCertRequest) -> Result<(), ApiError> {
        let m = self.require_member()?;
        let id = m
            .state
            .read(|d| d.state.node_by_name(node).map(|r| r.id))
            .ok_or_else(|| ApiError::NodeNotFound(node.to_string()))?;
        let info = self.check_member_cert(&req.certificate, node)?;
        self.propose(&m, Command::SetNodeCertificate { node_id: id, spki: info.spki }).await?;
        tracing::info!(node, "new certificate key pinned");
        Ok(())
    }

    // ---- client certificates ----

    pub(super) fn do_authenticate_cert(&self, spki: &str) -> Result<(String, Role), ApiError> {
        let m = self.member().ok_or_else(|| ApiError::CertificateRejected("this node belongs to no cluster".into()))?;
        match m.state.read(|d| d.state.client_certs.by_spki(spki).cloned()) {
            None => Err(ApiError::CertificateRejected("not recorded, or revoked".into())),
            Some(c) if c.expired(now_ms()) => {
                Err(ApiError::CertificateRejected(format!("client certificate {} expired", c.name)))
            }
            Some(c) => Ok((c.name, c.role)),
        }
    }

    pub(super) async fn do_create_certificate(
        &self,
        req: CertificateRequest,
        by: String,
    ) -> Result<ClientCertCreated, ApiError> {
        let m = self.require_member()?;
        validate_name("name", &req.name)?;
        if req.role == Role::Join {
            return Err(ApiError::Invalid {
                field: "role".into(),
                reason: "a client certificate is viewer, operator or admin".into(),
            });
        }
        if m.state.read(|d| d.state.client_certs.by_name.contains_key(&req.name)) {
            return Err(ApiError::CertificateExists(req.name));
        }
        let certificate = match (self.tls.external, req.csr, req.certificate) {
            (_, Some(_), Some(_)) => {
                return Err(ApiError::Invalid {
                    field: "csr".into(),
                    reason: "send csr or certificate, not both".into(),
                })
            }
            (false, Some(csr), None) => {
                let days = req.days.unwrap_or(CLIENT_CERT_DAYS);
                if !(1..=CLIENT_CERT_MAX_DAYS).contains(&days) {
                    return Err(ApiError::Invalid {
                        field: "days".into(),
                        reason: format!("must be 1 to {CLIENT_CERT_MAX_DAYS}"),
                    });
                }
                let ca = self.ca()?;
                pki::sign_client_request(&ca, &csr, &m.cluster_id, &req.name, days.into(), now_utc())
                    .map_err(pki_err)?
            }
            (false, None, Some(_)) => return Err(own_ca_only("recording a certificate issued elsewhere")),
            (true, Some(_), None) => return Err(external_only("client certificate; send its `certificate`")),
            (true, None, Some(cert)) => {
                if req.days.is_some() {
                    return Err(ApiError::Invalid {
                        field: "days".into(),
                        reason: "the operator's CA decided the certificate's lifetime".into(),
                    });
                }
                let ca = self.external_files().ok_or_else(|| ApiError::Internal("no operator CA loaded".into()))?;
                pki::check_signed_by(&ca.ca_pem, &cert).map_err(pki_err)?;
                cert
            }
            (_, None, None) => {
                return Err(ApiError::Invalid {
                    field: if self.tls.external { "certificate" } else { "csr" }.into(),
                    reason: if self.tls.external {
                        "the PEM certificate the operator's CA issued is required".into()
                    } else {
                        "a PEM certificate signing request is required (`tandem cert create` makes one)".into()
                    },
                })
            }
        };
        let info = pki::cert_info(&certificate).map_err(pki_err)?;
        pki::check_valid(&info, now_utc().unix_timestamp()).map_err(ApiError::BadCertificate)?;
        if m.state.read(|d| d.state.node_certs.values().any(|s| *s == info.spki)) {
            return Err(ApiError::BadCertificate("that key is a node's".into()));
        }
        let record = ClientCertRecord {
            name: req.name,
            role: req.role,
            spki: info.spki,
            serial: info.serial,
            not_after_ms: u64::try_from(info.not_after).unwrap_or(0).saturating_mul(1000),
            created_ms: now_ms(),
            created_by: by,
        };
        self.propose(&m, Command::RegisterClientCert { cert: record.clone() }).await?;
        tracing::info!(cert = %record.name, role = record.role.as_str(), by = %record.created_by, "client certificate recorded");
        Ok(ClientCertCreated { view: cert_view(&record), certificate })
    }

    pub(super) async fn do_certificates(&self) -> Result<Vec<ClientCertView>, ApiError> {
        let m = self.read_member(false).await?;
        Ok(m.state.read(|d| d.state.client_certs.by_name.values().map(cert_view).collect()))
    }

    pub(super) async fn do_revoke_certificate(&self, name: &str) -> Result<(), ApiError> {
        let m = self.require_member()?;
        self.propose(&m, Command::RevokeClientCert { name: name.to_string() }).await?;
        tracing::info!(cert = name, "client certificate revoked");
        Ok(())
    }

    async fn renew_own(&self) {
        let Some(m) = self.member() else { return };
        let Ok((key_pem, csr)) = pki::new_request(&self.cfg.name) else { return };
        let cert = if self.route() == Route::Here {
            let spec = self.cfg.spec();
            self.sign_for(&m, m.node_id, &spec, &csr)
        } else {
            self.on_leader_post::<_, CertificateView>("/internal/certificate", &RenewRequest { csr })
                .await
                .map(|c| c.certificate)
        };
        let node = match cert {
            Ok(cert_pem) => pki::NodeMaterial { cert_pem, key_pem },
            Err(e) => {
                tracing::warn!("certificate renewal failed (retried): {e}");
                return;
            }
        };
        let ca_pem = self.ca_pem_or_empty();
        if let Err(e) = pki::check_issued_for(&ca_pem, &node.cert_pem, &node.key_pem) {
            tracing::warn!("renewed certificate refused: {e}");
            return;
        }
        if let Err(e) = self.tls_files.save_node(&node) {
            tracing::warn!("cannot save the renewed certificate: {e}");
            return;
        }
        match self.tls.install(&m.cluster_id, &ca_pem, &node) {
            Ok(()) => tracing::info!("certificate renewed"),
            Err(e) => tracing::warn!("cannot use the renewed certificate: {e}"),
        }
    }

    async fn on_leader_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.on_leader_post::<_, T>(path, &serde_json::json!({})).await
    }

    async fn on_leader_post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        match self.route() {
            Route::Leader(urls) => match self.post_first::<_, T>(&urls, path, body, PEER_TIMEOUT).await {
                Ok(r) => r,
                Err(reason) => Err(ApiError::ForwardFailed { url: urls.join(","), reason }),
            },
            Route::Here => Err(ApiError::Internal("this node leads".into())),
            Route::NoLeader => Err(ApiError::NoLeader),
            Route::NotMember => Err(ApiError::NotMember),
        }
    }
}
