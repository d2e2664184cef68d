//! Every API failure becomes a JSON body `{"error": "...", "field": "..."}`. Bad input is a
//! 4xx naming the field; an unreachable dependency is a 503; anything else is a 500 whose
//! body says nothing of the internals (the log has them).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gantry_shared::api::{ErrorBody, Permission};
use gantry_shared::process::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    #[error("a valid API key is required in the X-Gantry-ApiKey header")]
    Unauthorized,
    #[error("a valid worker credential is required in the X-Gantry-Worker-Token header")]
    WorkerUnauthorized,
    #[error("this API key lacks the {0:?} permission")]
    Forbidden(Permission),
    /// Authenticated, but this caller may not do this (a self-approval, a claim from a worker
    /// outside the job's pool).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: Some(field.into()),
        }
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound(what.into())
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::BadRequest {
            message: e.message,
            field: Some(e.field),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable("PostgreSQL is not reachable; try again shortly".into())
            }
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57P01") => {
                Self::Unavailable("PostgreSQL is restarting; try again shortly".into())
            }
            _ => Self::Internal(e.into()),
        }
    }
}

/// The only place a store error becomes an HTTP answer.
impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> Self {
        use crate::store::Error as E;
        match e {
            E::NotFound(m) => Self::NotFound(m),
            E::Conflict(m) => Self::Conflict(m),
            E::Denied(m) => Self::Denied(m),
            E::Invalid { field, message } => Self::BadRequest {
                message,
                field: Some(field),
            },
            E::Db(e) => e.into(),
        }
    }
}

impl From<crate::broker_users::Error> for ApiError {
    fn from(e: crate::broker_users::Error) -> Self {
        // Either way the broker did not take the change, and nothing was committed: the
        // caller may try again once RabbitMQ's management API answers as it should.
        tracing::warn!(error = %e, "a change of broker users failed");
        Self::Unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, field) = match &self {
            ApiError::BadRequest { field, .. } => (StatusCode::BAD_REQUEST, field.clone()),
            ApiError::Unauthorized | ApiError::WorkerUnauthorized => {
                (StatusCode::UNAUTHORIZED, None)
            }
            ApiError::Forbidden(_) | ApiError::Denied(_) => (StatusCode::FORBIDDEN, None),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, None),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, None),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        let error = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error serving a request");
                "internal error; the dispatcher's log has the details".to_owned()
            }
            other => other.to_string(),
        };
        (status, axum::Json(ErrorBody { error, field })).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
