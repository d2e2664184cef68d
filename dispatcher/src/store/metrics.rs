//! What `GET /metrics` and `GET /api/health` read from PostgreSQL.

use super::Result;
use crate::transitions::{AttemptState, StepState, TaskState};
use sqlx::PgPool;

/// Whether PostgreSQL answers.
pub async fn ping(db: &PgPool) -> Result<()> {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(db)
        .await?;
    Ok(())
}

/// Step runs by state.
pub async fn steps_by_state(db: &PgPool) -> Result<Vec<(StepState, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM step_runs GROUP BY state ORDER BY state")
            .fetch_all(db)
            .await?,
    )
}

/// Tasks by state.
pub async fn tasks_by_state(db: &PgPool) -> Result<Vec<(TaskState, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")
            .fetch_all(db)
            .await?,
    )
}

/// Running attempts per worker name (every worker, zero included).
pub async fn running_by_worker(db: &PgPool) -> Result<Vec<(String, i64)>> {
    // The state in the text, not bound: the partial index on running attempts matches it
    // (see `crate::db::connect`).
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT w.name, count(a.*) FROM workers w
             LEFT JOIN attempts a ON a.worker_id = w.id AND a.state = '{running}'
             GROUP BY w.name ORDER BY w.name",
            running = AttemptState::Running.as_str()
        )
    });
    Ok(sqlx::query_as(SQL.as_str()).fetch_all(db).await?)
}

/// Every pool's name and slug, by name.
pub async fn pools(db: &PgPool) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as("SELECT name, slug FROM pools ORDER BY name")
        .fetch_all(db)
        .await?)
}
