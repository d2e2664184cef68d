//! Extractors that turn every malformed request into an [`ApiError`] (JSON, naming the
//! field), and that authenticate API keys and worker credentials.

use super::AppState;
use super::error::ApiError;
use crate::auth;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use gantry_shared::api::{API_KEY_HEADER, Permission, WORKER_TOKEN_HEADER};
use gantry_shared::ids::{ApiKeyId, WorkerId};
use gantry_shared::states::WorkerHealth;
use serde::de::DeserializeOwned;

/// Largest JSON body accepted (a process with big scripts fits easily).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// A JSON body; a parse error names the field path (`steps[2].retries`).
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        parse_json(&bytes).map(AppJson)
    }
}

/// An optional JSON body: an empty one is `None` (`POST .../approve` with or without a note).
pub struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        parse_json(&bytes).map(|v| Self(Some(v)))
    }
}

fn body_rejection(e: axum::extract::rejection::BytesRejection) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!("the request body is larger than {MAX_BODY} bytes"))
    } else {
        ApiError::BadRequest {
            message: format!("cannot read the request body: {}", e.body_text()),
            field: None,
        }
    }
}

/// Parse JSON, naming the path of the first problem. A string (key or value) holding a NUL
/// character is refused wherever it is, naming its path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest {
            message: "a JSON body is required".into(),
            field: None,
        });
    }
    // JSON can only carry a NUL escaped; most bodies have no `\u0000` at all and skip the walk.
    if bytes.windows(6).any(|w| w == b"\\u0000")
        && let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Some(field) = gantry_shared::nul::find_in_json(&doc)
    {
        return Err(ApiError::bad(field, gantry_shared::nul::MESSAGE));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = (!matches!(path.as_str(), "." | "?" | "")).then_some(path);
        ApiError::BadRequest {
            message: format!("invalid JSON body: {inner}"),
            field,
        }
    })
}

/// The caller's API key, authenticated.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_id: ApiKeyId,
    pub permissions: Vec<Permission>,
}

impl Caller {
    pub fn require(&self, p: Permission) -> Result<(), ApiError> {
        if self.permissions.contains(&p) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(p))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // `X-Gantry-ApiKey: KEY`, or `Authorization: Bearer KEY` (what Prometheus can send).
        let key = parts
            .headers
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                parts
                    .headers
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let hash = auth::hash_secret(key);
        let creds = &state.credentials;
        let entry = match creds.key(&hash) {
            Some(e) => e,
            None => {
                let seen = creds.generation();
                let (id, permissions) = crate::store::keys::lookup(&state.db, &hash)
                    .await?
                    .ok_or(ApiError::Unauthorized)?;
                let entry = crate::credentials::KeyEntry {
                    id,
                    permissions,
                    touched: None,
                };
                creds.remember_key(&hash, entry.clone(), seen);
                entry
            }
        };
        if creds.touch_due(&hash) {
            // Record use at most once a minute per node, so requests do not each write a row;
            // in the background, so no request waits for it.
            let db = state.db.clone();
            let id = entry.id;
            tokio::spawn(async move { crate::store::keys::touch(&db, id).await });
        }
        let (key_id, permissions) = (
            ApiKeyId(entry.id),
            entry
                .permissions
                .iter()
                .filter_map(|p| Permission::parse(p))
                .collect(),
        );
        Ok(Caller {
            key_id,
            permissions,
        })
    }
}

/// A worker agent, authenticated by the credential it got at registration.
#[derive(Clone, Debug)]
pub struct WorkerCaller {
    pub worker_id: WorkerId,
    pub name: String,
    pub enabled: bool,
    /// As last stored.
    pub health: WorkerHealth,
    pub health_reason: Option<String>,
    /// A dispatcher node's built-in worker.
    pub builtin: bool,
}

impl FromRequestParts<AppState> for WorkerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = worker_token(parts)?;
        let w = crate::store::workers::authenticate(&state.db, &auth::hash_secret(token))
            .await?
            .ok_or(ApiError::WorkerUnauthorized)?;
        Ok(w.into())
    }
}

impl From<crate::store::workers::Authenticated> for WorkerCaller {
    fn from(w: crate::store::workers::Authenticated) -> Self {
        WorkerCaller {
            worker_id: WorkerId(w.id),
            name: w.name,
            enabled: w.enabled,
            health: w.health,
            health_reason: w.health_reason,
            builtin: w.builtin,
        }
    }
}

/// The worker credential a request carries (`X-Gantry-Worker-Token`), or a 401.
fn worker_token(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(WORKER_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::WorkerUnauthorized)
}

/// A worker agent, authenticated like [`WorkerCaller`] but only by who it is: the token's
/// worker is remembered (`credentials`), and what may change (enabled, health) is read in
/// the handler's own transaction (`store::claims::claimant`). For the claim, which runs
/// once per step.
#[derive(Clone, Debug)]
pub struct WorkerIdentity {
    pub worker_id: WorkerId,
}

impl FromRequestParts<AppState> for WorkerIdentity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = worker_token(parts)?;
        let hash = auth::hash_secret(token);
        let creds = &state.credentials;
        if let Some(w) = creds.worker(&hash) {
            return Ok(WorkerIdentity {
                worker_id: WorkerId(w.id),
            });
        }
        let seen = creds.generation();
        let id = crate::store::workers::authenticate(&state.db, &hash)
            .await?
            .ok_or(ApiError::WorkerUnauthorized)?
            .id;
        creds.remember_worker(&hash, crate::credentials::WorkerEntry { id }, seen);
        Ok(WorkerIdentity {
            worker_id: WorkerId(id),
        })
    }
}

/// Parse a path segment as an id, or 404 (a malformed id names nothing that exists).
pub fn parse_id<T: std::str::FromStr>(raw: &str, what: &str) -> Result<T, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no {what} with id {raw:?}")))
}
