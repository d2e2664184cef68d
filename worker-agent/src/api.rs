//! The agent's calls to the dispatcher's API.
//!
//! The server setting may list several dispatcher nodes, comma-separated
//! (`--server http://a:8080,http://b:8080`). Calls go to one node; when it cannot be reached
//! the call is tried on the next one at once, and after any other failure (a timeout, a 5xx)
//! the next call starts with the next node. Claims are safe to repeat on another node: a
//! claim carries its own id and the same claim is granted again.

use gantry_shared::api::{
    API_KEY_HEADER, AgentConfig, ClaimGrant, ClaimRequest, ErrorBody, JobLog, LeaseRenewed,
    SensitiveOutput, WORKER_TOKEN_HEADER, WorkerRegister, WorkerRegistered,
};
use gantry_shared::ids::{ClaimId, JobId, WorkerId};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The dispatcher answered with a refusal (4xx other than 401).
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    /// The credential was refused: the worker was deregistered or replaced.
    #[error("the dispatcher refused this agent's credential ({0}); was the worker deregistered?")]
    Unauthorized(String),
    /// The dispatcher could not be reached or failed; try again.
    #[error("dispatcher unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// The dispatcher nodes' base URLs, in the configured order.
    bases: Arc<Vec<String>>,
    /// Index into `bases` of the node calls go to first.
    current: Arc<AtomicUsize>,
    token: Option<String>,
}

/// Trust every certificate in `pem` (`tls.ca_file`, which may hold several) besides the web
/// roots. The CLI and the dispatcher's management API client use it too.
pub fn trust_ca(
    mut builder: reqwest::ClientBuilder,
    pem: &str,
) -> Result<reqwest::ClientBuilder, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| format!("tls.ca_file: {e}"))?;
    if certs.is_empty() {
        return Err("tls.ca_file holds no certificate".into());
    }
    for c in certs {
        builder = builder.add_root_certificate(c);
    }
    Ok(builder)
}

/// An error with every cause below it (`error sending request: ... invalid peer certificate:
/// UnknownIssuer`): reqwest's own message alone never says why.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        next = cause.source();
    }
    text
}

/// The base URLs in a server setting: comma-separated, blanks and trailing slashes dropped.
pub fn server_urls(server: &str) -> Vec<String> {
    server
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Api {
    /// `server`: one base URL, or several separated by commas (dispatcher nodes of one
    /// installation). `ca_pem` (`tls.ca_file`) is trusted for `https://` besides the web
    /// roots.
    pub fn new(server: &str, token: Option<String>, ca_pem: Option<&str>) -> anyhow::Result<Self> {
        let mut bases = server_urls(server);
        if bases.is_empty() {
            bases.push(server.to_owned());
        }
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if let Some(pem) = ca_pem {
            http = trust_ca(http, pem).map_err(anyhow::Error::msg)?;
        }
        Ok(Self {
            http: http.build()?,
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token,
        })
    }

    fn req(&self, base: &str, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{base}{path}"));
        if let Some(t) = &self.token {
            r = r.header(WORKER_TOKEN_HEADER, t);
        }
        r
    }

    /// Send a request built by `build` to the current node; on a connection failure try the
    /// others in turn, and after any other failure move on for the next call.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last_error = String::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let base = &self.bases[idx];
            match build(self.req(base, method.clone(), path)).send().await {
                Ok(resp) => {
                    let r = self.answer(resp).await;
                    if matches!(r, Err(ApiError::Unavailable(_))) && n > 1 {
                        let _ = self.current.compare_exchange(
                            idx,
                            (idx + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    return r;
                }
                Err(e) => {
                    last_error = format!("{base}: {}", with_causes(&e));
                    if n > 1 {
                        tracing::warn!(server = %base, error = %e, "cannot reach this dispatcher node; trying the next one");
                        let _ = self.current.compare_exchange(
                            idx,
                            (idx + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    if !e.is_connect() {
                        // The request may have been sent: let the caller decide to repeat it.
                        break;
                    }
                }
            }
        }
        Err(ApiError::Unavailable(last_error))
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
    ) -> Result<T, ApiError> {
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if status.is_success() {
            if bytes.is_empty() {
                return serde_json::from_slice(b"null")
                    .map_err(|e| ApiError::Unavailable(e.to_string()));
            }
            return serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::Unavailable(format!("unexpected answer: {e}")));
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| match b.field {
                Some(f) => format!("{} (field {f})", b.error),
                None => b.error,
            })
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        match status.as_u16() {
            401 => Err(ApiError::Unauthorized(message)),
            s if (400..500).contains(&s) => Err(ApiError::Refused { status: s, message }),
            s => Err(ApiError::Unavailable(format!("{s}: {message}"))),
        }
    }

    pub async fn register(
        &self,
        api_key: &str,
        req: &WorkerRegister,
    ) -> Result<WorkerRegistered, ApiError> {
        self.call(reqwest::Method::POST, "/api/workers", |r| {
            r.header(API_KEY_HEADER, api_key).json(req)
        })
        .await
    }

    pub async fn deregister(&self, api_key: &str, id: WorkerId) -> Result<(), ApiError> {
        self.call::<serde_json::Value>(
            reqwest::Method::DELETE,
            &format!("/api/workers/{id}"),
            |r| r.header(API_KEY_HEADER, api_key),
        )
        .await
        .map(|_| ())
    }

    pub async fn agent_config(&self) -> Result<AgentConfig, ApiError> {
        self.call(reqwest::Method::GET, "/api/agent/config", |r| r)
            .await
    }

    /// Store a sensitive output variable of a running job (never sent through the broker).
    pub async fn sensitive_output(
        &self,
        job: JobId,
        name: &str,
        value: &str,
    ) -> Result<(), ApiError> {
        let body = SensitiveOutput {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        self.call::<serde_json::Value>(
            reqwest::Method::POST,
            &format!("/api/jobs/{job}/outputs"),
            |r| r.json(&body),
        )
        .await
        .map(|_| ())
    }

    /// Renew the mutex lease of a running job (the dispatcher renews it in Redis).
    pub async fn renew_lease(&self, job: JobId) -> Result<LeaseRenewed, ApiError> {
        self.call(
            reqwest::Method::POST,
            &format!("/api/jobs/{job}/lease"),
            |r| r,
        )
        .await
    }

    /// How many of a running job's log lines the dispatcher has stored.
    pub async fn job_log(&self, job: JobId) -> Result<JobLog, ApiError> {
        self.call(reqwest::Method::GET, &format!("/api/jobs/{job}/log"), |r| {
            r.timeout(Duration::from_secs(5))
        })
        .await
    }

    /// Claim a job; `job_sha256` is the sha256 of its body as received.
    pub async fn claim(
        &self,
        job: JobId,
        claim_id: ClaimId,
        job_sha256: &str,
    ) -> Result<ClaimGrant, ApiError> {
        let body = ClaimRequest {
            claim_id,
            job_sha256: Some(job_sha256.to_owned()),
        };
        self.call(
            reqwest::Method::POST,
            &format!("/api/jobs/{job}/claim"),
            |r| r.json(&body),
        )
        .await
    }
}
