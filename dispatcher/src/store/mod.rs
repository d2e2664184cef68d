//! SQL for the records the API manages. Orchestration SQL lives with the orchestrator and the
//! result consumer, next to the state machine it implements.

pub mod keys;
pub mod pools;
pub mod settings;
pub mod tasks;
pub mod workers;

/// True for "a unique constraint was violated".
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}
