//! The agent's security workflows: the CA and certificates at init, join
//! (pin the CA, send a signing request, check the adoption), certificate
//! renewal and the CA key on voters; API tokens; the audit log's queue.
//!
//! Decisions about tokens and the audit log are the state machine's
//! (`tandem_raft::access`); this module reads clocks and files and proposes.
//! It must never log a token's secret or a key.

use super::*;
use crate::security::files::save_admin_token;
use crate::security::pki::{self, CaMaterial, NodeCertSpec};
use crate::security::{new_secret, now_ms};
use tandem_http_api::{
    CaKeyView, CaView, CertificateView, InitView, JoinTokenRequest, JoinTokenView, RenewRequest, TokenCreated,
    TokenRequest, TokenView,
};
use tandem_raft::access::{token_hash, AuditEntry, Role, TokenRecord, MAX_AUDIT_BATCH};

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

impl Agent {
    /// At init: a new CA, this node's certificate, both taken into use.
    pub(super) fn init_tls(&self, cluster_id: &str) -> Result<CaMaterial, ApiError> {
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
        Ok(ca)
    }

    /// At init, after the bootstrap entry: the first admin token.
    pub(super) async fn first_admin_token(&self, m: &Member, ca: &CaMaterial) -> Result<InitView, ApiError> {
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
            ca_hash: pki::ca_hash(&ca.cert_pem).map_err(pki_err)?,
            ca_pem: ca.cert_pem.clone(),
        })
    }

    /// Joining: fetches the CA at `via`, checks it against the pin, and
    /// only then sends the token and a signing request for a fresh key.
    pub(super) async fn secure_join_body(
        &self,
        via: &str,
        token: Option<&str>,
        ca_hash: Option<&str>,
    ) -> Result<(reqwest::Client, Option<String>), ApiError> {
        if !self.tls.enabled {
            return Ok((self.http.clone(), token.map(str::to_string)));
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
        let cfg = crate::security::tls::Tls::pinned_client_config(&ca.ca_pem)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let client = crate::security::tls::client_builder(&self.tls, cfg)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let (key_pem, csr) = pki::new_request(&self.cfg.name).map_err(pki_err)?;
        *self.pending_join.lock().unwrap_or_else(|p| p.into_inner()) = Some(PendingJoin { ca_pem: ca.ca_pem, key_pem });
        Ok((client, Some(csr)))
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
            let n = q.entries.len().min(MAX_AUDIT_BATCH);
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
        if metrics.current_leader == Some(m.node_id) {
            let now = now_ms();
            if m.state.read(|d| d.state.tokens.by_name.values().any(|t| t.expired(now))) {
                let _ = self.propose(&m, Command::ExpireTokens { now_ms: now }).await;
            }
        }
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
