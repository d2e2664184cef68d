//! SQL for the records the API manages. Orchestration SQL lives with the orchestrator and the
//! result consumer, next to the state machine it implements; every write of a state column
//! goes through `transitions`.
//!
//! Every function here returns a [`Result`] with the store's own [`Error`]: what the API
//! shows as 404, 409, 403 or a 400 naming a field, or a database failure. Only `api/` turns
//! it into an HTTP answer (`impl From<store::Error> for ApiError`).

pub mod approvals;
pub mod claims;
pub mod dead_letters;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod pools;
pub mod settings;
pub mod tasks;
pub mod workers;

/// What a store function may fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such record (404); the message names it.
    #[error("{0}")]
    NotFound(String),
    /// The record is not in a state that allows this (409).
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this to this record (403).
    #[error("{0}")]
    Denied(String),
    /// A value the caller sent is out of range (400 naming the field).
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// PostgreSQL failed (503 while it is away, 500 otherwise).
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl Error {
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict(message.into())
    }
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// True for "a unique constraint was violated".
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}
