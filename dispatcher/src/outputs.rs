//! # Non-sensitive outputs that carry a secret
//!
//! An agent sends a non-sensitive output's value on the broker. If that value contains one of
//! its task's sensitive values (a sensitive task variable, or a sensitive output of one of its
//! steps), the dispatcher stores it as if it were sensitive: sealed (bound to the task and
//! `Steps.<step>.Output.<name>`), `value` NULL, `sensitive` true, so that the API shows
//! `********` and later steps receive it only through their claim. This holds whatever the
//! agent did: a modified or old agent cannot make the dispatcher keep a secret in clear.
//!
//! Sensitive values of [`MIN_SECRET_LEN`] bytes or fewer are not looked for (they cannot be
//! submitted as sensitive variables; a short sensitive output would match nearly anything).

use crate::attempts::Locked;
use crate::secrets::SecretBox;
use gantry_shared::ids::StepRunId;
use sqlx::PgConnection;
use uuid::Uuid;

/// Values of this many bytes or fewer are not searched for.
pub const MIN_SECRET_LEN: usize = 3;

/// The task's sensitive values that can be opened (those that cannot are skipped: the claim
/// that needs them fails with the reason).
async fn sensitive_values(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    task: Uuid,
) -> sqlx::Result<Vec<String>> {
    let mut sealed: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, value FROM task_secrets WHERE task_id = $1")
            .bind(task)
            .fetch_all(&mut *conn)
            .await?;
    let outputs: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT 'Steps.' || s.name || '.Output.' || o.name, o.sealed FROM output_variables o
         JOIN step_runs s ON s.id = o.step_run_id
         WHERE s.task_id = $1 AND o.sensitive AND o.sealed IS NOT NULL",
    )
    .bind(task)
    .fetch_all(&mut *conn)
    .await?;
    sealed.extend(outputs);
    Ok(sealed
        .into_iter()
        .filter_map(|(name, v)| secrets.open(task, &name, &v).ok())
        .filter(|v| v.len() > MIN_SECRET_LEN)
        .collect())
}

/// Store a non-sensitive output of a live attempt: in clear, or sealed if its value contains
/// one of the task's sensitive values. Returns true if it was sealed.
pub async fn store_plain(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    locked: &Locked,
    step_run: StepRunId,
    attempt: u32,
    name: &str,
    value: &str,
) -> sqlx::Result<bool> {
    let carries_secret = value.len() > MIN_SECRET_LEN
        && sensitive_values(conn, secrets, locked.task_id)
            .await?
            .iter()
            .any(|s| value.contains(s.as_str()));
    if carries_secret {
        let sealed = secrets.seal(
            locked.task_id,
            &format!("Steps.{}.Output.{name}", locked.step_name),
            value,
        );
        tracing::info!(%step_run, attempt, output = name, "a non-sensitive output contains a sensitive value: stored sealed, shown as ********");
        sqlx::query(
            "INSERT INTO output_variables (step_run_id, attempt, name, value, sensitive, sealed)
             VALUES ($1, $2, $3, NULL, true, $4) ON CONFLICT (step_run_id, attempt, name)
             DO UPDATE SET value = NULL, sensitive = true, sealed = EXCLUDED.sealed",
        )
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(name)
        .bind(sealed)
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO output_variables (step_run_id, attempt, name, value, sensitive, sealed)
             VALUES ($1, $2, $3, $4, false, NULL) ON CONFLICT (step_run_id, attempt, name)
             DO UPDATE SET value = EXCLUDED.value, sensitive = false, sealed = NULL",
        )
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(name)
        .bind(value)
        .execute(&mut *conn)
        .await?;
    }
    Ok(carries_secret)
}
