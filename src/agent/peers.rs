//! Calls to other agents: GET/POST with timeouts, routing a call to the
//! leader, and decoding a peer's answer or error. No decisions.

use super::*;

impl Agent {
    pub(super) async fn get_json_within<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, String> {
        let resp = self.http.get(url).timeout(timeout).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// GET from an agent that is not a member yet (see `Tls::unverified_client_config`).
    pub(super) async fn get_unverified<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let resp = self.unverified_http.get(url).timeout(PEER_TIMEOUT).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// [`Self::post_first`] to an agent that is not a member yet: nothing
    /// secret may be sent this way.
    pub(super) async fn post_unverified<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        urls: &[String],
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Result<T, ApiError>, String> {
        let mut last = "no address".to_string();
        for base in urls {
            let url = format!("{base}{path}");
            match self.unverified_http.post(&url).json(body).timeout(timeout).send().await {
                Err(e) => last = format!("{url}: {e}"),
                Ok(resp) => return Ok(decode(&url, resp).await),
            }
        }
        Err(last)
    }

    /// POSTs to the first of `urls` that answers; a JSON error answer is
    /// returned as `Refused`, no answer at all as `Err(String)`.
    pub(super) async fn post_first<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        urls: &[String],
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<Result<T, ApiError>, String> {
        let mut last = "no address".to_string();
        for base in urls {
            let url = format!("{base}{path}");
            match self.http.post(&url).json(body).timeout(timeout).send().await {
                Err(e) => last = format!("{url}: {e}"),
                Ok(resp) => return Ok(decode(&url, resp).await),
            }
        }
        Err(last)
    }

    /// Runs a call on the leader: `here` when this node leads, else a POST
    /// of `body` to the leader's `path`. A peer's refusal comes back under
    /// its own code (see [`relay`]).
    pub(super) async fn on_leader<B, F>(&self, path: &str, body: &B, here: F) -> Result<(), ApiError>
    where
        B: serde::Serialize,
        F: std::future::Future<Output = Result<(), ApiError>>,
    {
        match self.route() {
            Route::Here => here.await,
            Route::Leader(urls) => match self.post_first::<_, serde_json::Value>(&urls, path, body, PEER_TIMEOUT).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(relay(e)),
                Err(reason) => Err(ApiError::ForwardFailed { url: urls.join(","), reason }),
            },
            Route::NoLeader => Err(ApiError::NoLeader),
            Route::NotMember => Err(ApiError::NotMember),
        }
    }
}

/// Turns a peer agent's answer into `T` or the error it reported.
pub(super) async fn decode<T: serde::de::DeserializeOwned>(url: &str, resp: reqwest::Response) -> Result<T, ApiError> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| ApiError::ForwardFailed { url: url.into(), reason: e.to_string() })?;
    if status.is_success() {
        let bytes = if bytes.is_empty() { &b"null"[..] } else { &bytes[..] };
        return serde_json::from_slice(bytes).map_err(|e| ApiError::Internal(format!("{url}: bad answer: {e}")));
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => Err(ApiError::Refused {
            url: url.into(),
            status: status.as_u16(),
            code: b.code,
            message: b.message,
            hint: b.hint,
        }),
        Err(_) => Err(ApiError::ForwardFailed { url: url.into(), reason: format!("HTTP {status}") }),
    }
}

/// Another node's volume error under its own code (not TND-1208).
pub(super) fn relay(e: ApiError) -> ApiError {
    match e {
        ApiError::Refused { code, message, url, status, hint } => {
            ApiError::relayed(&code, message.clone()).unwrap_or(ApiError::Refused { url, status, code, message, hint })
        }
        other => other,
    }
}
