//! Transitions of tasks and artifacts.

use super::sources;
use gantry_shared::ids::TaskId;
use gantry_shared::states::{ArtifactState, TaskState};
use sqlx::PgConnection;

/// Move a task to `to` from any state the table allows. Entering `Executing` or `Waiting`
/// stamps `started_at` once; an end stamps `finished_at` and records `error`.
pub async fn task_to(
    conn: &mut PgConnection,
    task: TaskId,
    to: TaskState,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE tasks SET state = $2,
             error = CASE WHEN $4 THEN $3 ELSE error END,
             started_at = CASE WHEN $2 = 'Cancelling' THEN started_at
                               ELSE COALESCE(started_at, now()) END,
             finished_at = CASE WHEN $4 THEN now() ELSE finished_at END,
             cancel_requested_at = CASE WHEN $2 = 'Cancelling' THEN now()
                                        ELSE cancel_requested_at END
         WHERE id = $1 AND state = ANY($5)",
    )
    .bind(task.0)
    .bind(to)
    .bind(error)
    .bind(to.is_terminal())
    .bind(sources(to))
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// An artifact whose chunks are all in: `Receiving` → `Stored` or `Corrupt`.
pub async fn settle_artifact(
    conn: &mut PgConnection,
    artifact: uuid::Uuid,
    to: ArtifactState,
) -> sqlx::Result<bool> {
    debug_assert!(to != ArtifactState::Receiving);
    let r = sqlx::query(
        "UPDATE artifacts SET state = $2, stored_at = now() WHERE id = $1 AND state = ANY($3)",
    )
    .bind(artifact)
    .bind(to)
    .bind(sources(to))
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}
