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
//!
//! The order does not matter: a sensitive output stored after a plain one that holds its
//! value re-seals that plain one ([`reseal_plain`]). The two checks cannot miss each other
//! when they run at once: storing a plain output takes its task's outputs lock shared
//! ([`lock_for_plain`]), storing a sensitive one takes it exclusive ([`lock_for_sensitive`]),
//! and both take it before any row lock of their attempts (ARCHITECTURE.md, the lock order).

use crate::attempts::Locked;
use crate::secrets::SecretBox;
use gantry_shared::ids::StepRunId;
use sqlx::PgConnection;
use uuid::Uuid;

/// Values of this many bytes or fewer are not searched for.
pub const MIN_SECRET_LEN: usize = 3;

/// The first key of a task's outputs lock (`pg_advisory_xact_lock(int4, int4)`, the second
/// key the hash of the task's id; any fixed number: this one spells "outp").
const OUTPUTS_LOCK_CLASS: i32 = 0x6f75_7470;

/// Take the outputs locks of the tasks of these step runs, shared, in key order: before
/// storing their non-sensitive outputs, and before locking any of their attempts.
pub async fn lock_for_plain(conn: &mut PgConnection, step_runs: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared($1, k) FROM (
             SELECT DISTINCT hashtext(task_id::text) AS k FROM step_runs WHERE id = ANY($2)
             ORDER BY k) keys",
    )
    .bind(OUTPUTS_LOCK_CLASS)
    .bind(step_runs)
    .execute(conn)
    .await?;
    Ok(())
}

/// Take the outputs lock of the task of this job, exclusive: before storing a sensitive
/// output, and before locking its attempt.
pub async fn lock_for_sensitive(conn: &mut PgConnection, job: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, hashtext(s.task_id::text))
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id WHERE a.job_id = $2",
    )
    .bind(OUTPUTS_LOCK_CLASS)
    .bind(job)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether a non-sensitive output of this value must be checked against its task's secrets
/// (and so be stored under [`lock_for_plain`]).
pub fn may_carry_secret(value: &str) -> bool {
    value.len() > MIN_SECRET_LEN
}

/// Seal the task's non-sensitive outputs, of any of its steps, whose value holds `secret`, a
/// sensitive value just stored. Returns how many were sealed.
pub async fn reseal_plain(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    task: Uuid,
    secret: &str,
) -> sqlx::Result<usize> {
    if secret.len() <= MIN_SECRET_LEN {
        return Ok(0);
    }
    let plain: Vec<(Uuid, i32, String, String, String)> = sqlx::query_as(
        "SELECT o.step_run_id, o.attempt, o.name, s.name, o.value FROM output_variables o
         JOIN step_runs s ON s.id = o.step_run_id
         WHERE s.task_id = $1 AND NOT o.sensitive AND o.value IS NOT NULL",
    )
    .bind(task)
    .fetch_all(&mut *conn)
    .await?;
    let mut sealed = 0;
    for (step_run, attempt, name, step, value) in plain {
        if !value.contains(secret) {
            continue;
        }
        tracing::info!(%step_run, attempt, step, output = name, "a non-sensitive output holds a sensitive value stored after it: sealed now, shown as ********");
        sqlx::query(
            "UPDATE output_variables SET value = NULL, sensitive = true, sealed = $4
             WHERE step_run_id = $1 AND attempt = $2 AND name = $3",
        )
        .bind(step_run)
        .bind(attempt)
        .bind(&name)
        .bind(secrets.seal(task, &format!("Steps.{step}.Output.{name}"), &value))
        .execute(&mut *conn)
        .await?;
        sealed += 1;
    }
    Ok(sealed)
}

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
/// one of the task's sensitive values. Returns true if it was sealed. The caller holds the
/// task's [`lock_for_plain`] when [`may_carry_secret`] says so.
pub async fn store_plain(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    locked: &Locked,
    step_run: StepRunId,
    attempt: u32,
    name: &str,
    value: &str,
) -> sqlx::Result<bool> {
    let carries_secret = may_carry_secret(value)
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
