//! What a claim reads and writes besides the attempt's own state (which `transitions`
//! writes): the claimant as it is now, whether it may run the step, the values it gets, and
//! the task's worker for the step's pool. Each in the caller's transaction.

use super::Result;
use super::workers::Authenticated;
use gantry_shared::ids::{StepRunId, WorkerId};
use sqlx::PgConnection;
use uuid::Uuid;

/// The claimant as the claim sees it.
#[derive(sqlx::FromRow)]
pub struct Claimant {
    #[sqlx(flatten)]
    pub worker: Authenticated,
    /// It may run the step: a registered worker serves its pools' steps; a built-in worker
    /// serves steps at location `server` (no pool) and the default pool's steps.
    pub serves: bool,
}

/// Worker `worker` as it is now (enabled, health), and whether it serves `step_run`'s pool:
/// one statement. `None` if the worker is gone.
pub async fn claimant(
    conn: &mut PgConnection,
    worker: WorkerId,
    step_run: StepRunId,
) -> Result<Option<Claimant>> {
    Ok(sqlx::query_as(
        "SELECT w.id, w.name, w.enabled, w.health, w.health_reason, w.builtin,
                CASE WHEN w.builtin
                     THEN EXISTS (SELECT 1 FROM step_runs s LEFT JOIN pools p ON p.id = s.pool_id
                                  WHERE s.id = $2 AND (s.pool_id IS NULL OR p.is_default))
                     ELSE EXISTS (SELECT 1 FROM step_runs s
                                  JOIN worker_pools wp ON wp.pool_id = s.pool_id
                                  WHERE s.id = $2 AND wp.worker_id = w.id)
                END AS serves
         FROM workers w WHERE w.id = $1",
    )
    .bind(worker.0)
    .bind(step_run.0)
    .fetch_optional(conn)
    .await?)
}

/// Whether the attempt's current job went to this worker's own queue.
pub async fn routed_to(
    conn: &mut PgConnection,
    worker: WorkerId,
    step_run: StepRunId,
    attempt: u32,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM attempts
                        WHERE step_run_id = $1 AND attempt = $2 AND routed_worker = $3)",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(worker.0)
    .fetch_one(conn)
    .await?)
}

/// The worker is no longer the task's worker for the step's pool (it refused the step).
pub async fn forget_task_worker(
    conn: &mut PgConnection,
    worker: WorkerId,
    step_run: StepRunId,
) -> Result<()> {
    sqlx::query(
        "DELETE FROM task_pool_workers tp USING step_runs s
         WHERE s.id = $1 AND tp.task_id = s.task_id AND tp.pool_id = s.pool_id
           AND tp.worker_id = $2",
    )
    .bind(step_run.0)
    .bind(worker.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// The first step of a task in a pool chooses the task's worker there; its later steps in
/// that pool go to the same worker while it stays healthy.
pub async fn choose_task_worker(
    conn: &mut PgConnection,
    worker: WorkerId,
    step_run: StepRunId,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO task_pool_workers (task_id, pool_id, worker_id)
         SELECT s.task_id, s.pool_id, $2 FROM step_runs s
         WHERE s.id = $1 AND s.pool_id IS NOT NULL
         ON CONFLICT (task_id, pool_id) DO NOTHING",
    )
    .bind(step_run.0)
    .bind(worker.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// The task's sealed secrets and its earlier steps' sensitive outputs (named as a script
/// references them), sealed as stored: one statement.
pub async fn sealed_values(conn: &mut PgConnection, task: Uuid) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(sqlx::query_as(
        "SELECT name, value FROM task_secrets WHERE task_id = $1
         UNION ALL
         SELECT 'Steps.' || s.name || '.Output.' || o.name, o.sealed FROM output_variables o
         JOIN step_runs s ON s.id = o.step_run_id AND o.attempt = s.attempt
         WHERE s.task_id = $1 AND o.sensitive AND o.sealed IS NOT NULL",
    )
    .bind(task)
    .fetch_all(conn)
    .await?)
}
