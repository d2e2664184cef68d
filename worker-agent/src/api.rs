//! The agent's calls to the dispatcher's API.

use gantry_shared::api::{
    API_KEY_HEADER, AgentConfig, ClaimGrant, ClaimRequest, ErrorBody, SensitiveOutput,
    WORKER_TOKEN_HEADER, WorkerRegister, WorkerRegistered,
};
use gantry_shared::ids::{ClaimId, JobId, WorkerId};
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
    base: String,
    token: Option<String>,
}

impl Api {
    pub fn new(server: &str, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            base: server.trim_end_matches('/').to_owned(),
            token,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.header(WORKER_TOKEN_HEADER, t);
        }
        r
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let resp = req
            .send()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
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
        self.call(
            self.req(reqwest::Method::POST, "/api/workers")
                .header(API_KEY_HEADER, api_key)
                .json(req),
        )
        .await
    }

    pub async fn deregister(&self, api_key: &str, id: WorkerId) -> Result<(), ApiError> {
        self.call::<serde_json::Value>(
            self.req(reqwest::Method::DELETE, &format!("/api/workers/{id}"))
                .header(API_KEY_HEADER, api_key),
        )
        .await
        .map(|_| ())
    }

    pub async fn agent_config(&self) -> Result<AgentConfig, ApiError> {
        self.call(self.req(reqwest::Method::GET, "/api/agent/config"))
            .await
    }

    /// Store a sensitive output variable of a running job (never sent through the broker).
    pub async fn sensitive_output(
        &self,
        job: JobId,
        name: &str,
        value: &str,
    ) -> Result<(), ApiError> {
        self.call::<serde_json::Value>(
            self.req(reqwest::Method::POST, &format!("/api/jobs/{job}/outputs"))
                .json(&SensitiveOutput {
                    name: name.to_owned(),
                    value: value.to_owned(),
                }),
        )
        .await
        .map(|_| ())
    }

    pub async fn claim(&self, job: JobId, claim_id: ClaimId) -> Result<ClaimGrant, ApiError> {
        self.call(
            self.req(reqwest::Method::POST, &format!("/api/jobs/{job}/claim"))
                .json(&ClaimRequest { claim_id }),
        )
        .await
    }
}
