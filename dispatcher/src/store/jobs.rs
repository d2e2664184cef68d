//! What an agent asks of its own jobs beyond the claim: how far its log is stored, and its
//! sensitive outputs (sealed before they are stored; they never travel through the broker).

use super::{Error, Result};
use crate::attempts;
use crate::secrets::SecretBox;
use crate::transitions::AttemptState;
use gantry_shared::ids::{JobId, WorkerId};
use uuid::Uuid;

/// The attempt whose current job is `job`: its claimant, state and stored line count.
pub async fn stored_lines(
    db: &sqlx::PgPool,
    job: JobId,
) -> Result<Option<(Option<Uuid>, AttemptState, i64)>> {
    Ok(
        sqlx::query_as("SELECT worker_id, state, lines_stored FROM attempts WHERE job_id = $1")
            .bind(job.0)
            .fetch_optional(db)
            .await?,
    )
}

/// A sensitive output of a running job, from its claimant `worker` (named `worker_name` in
/// errors), sealed to its task and name and stored in place of any earlier value.
pub async fn sensitive_output(
    db: &sqlx::PgPool,
    secrets: &SecretBox,
    job: JobId,
    worker: WorkerId,
    worker_name: &str,
    name: &str,
    value: &str,
) -> Result<()> {
    let mut tx = db.begin().await?;
    crate::outputs::lock_for_sensitive(&mut tx, job.0).await?;
    let Some((step_run, attempt, locked)) = attempts::lock_job(&mut tx, job).await? else {
        return Err(Error::not_found(format!("no job {job}")));
    };
    if !locked.is_claimant(job, worker) || locked.state != AttemptState::Running {
        return Err(Error::conflict(format!(
            "job {job} is not running on worker {worker_name}"
        )));
    }
    sqlx::query(
        "INSERT INTO output_variables (step_run_id, attempt, name, value, sensitive, sealed)
         VALUES ($1, $2, $3, NULL, true, $4)
         ON CONFLICT (step_run_id, attempt, name)
         DO UPDATE SET value = NULL, sensitive = true, sealed = EXCLUDED.sealed",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(name)
    .bind(secrets.seal(
        locked.task_id,
        &format!("Steps.{}.Output.{name}", locked.step_name),
        value,
    ))
    .execute(&mut *tx)
    .await?;
    crate::outputs::reseal_plain(&mut tx, secrets, locked.task_id, value).await?;
    tx.commit().await?;
    Ok(())
}
