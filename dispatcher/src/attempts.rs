//! # Attempts: the state machine of one try at a step
//!
//! ```text
//!   Waiting (mutex) ──granted──▶
//!   Pending ──confirm──▶ Queued ──claim──▶ Running ──StepFinished + all lines──▶ Success
//!      │                   │                  │                                  Failed
//!      └──claim────────────┴──────────────────┘                                  TimedOut
//!                                                                                Cancelled
//!                                                                                WorkerLost
//! ```
//!
//! Only the dispatcher creates attempts (the orchestrator, numbered from 1). An attempt is
//! `Pending` from its creation until the broker confirmed its job; a claim may already arrive
//! then (the confirm and the delivery race), so a claim accepts `Pending` and `Queued`. Every
//! transition is a compare-and-set in PostgreSQL.
//!
//! Lock order, everywhere, to rule out deadlocks: `tasks` → `step_runs` → `attempts` →
//! `task_log_positions` → `task_wakeups`. The result consumer never locks `tasks`: it wakes
//! the orchestrator through `task_wakeups` instead.

use crate::logs;
use crate::transitions;
use gantry_shared::ids::{JobId, StepRunId, TaskId, WorkerId};
use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

pub use gantry_shared::states::AttemptState;

/// Ask the orchestrator to look at a task again, durably and without locking the task row.
pub async fn wake(conn: &mut PgConnection, task: TaskId) -> sqlx::Result<()> {
    // The task's owner may be another dispatcher node: the same statement tells it (latency
    // only; its sweep reads the row anyway). `RETURNING` runs the notify once, for the one row.
    sqlx::query(
        "INSERT INTO task_wakeups (task_id) VALUES ($1)
         ON CONFLICT (task_id) DO UPDATE SET bump = task_wakeups.bump + 1
         RETURNING pg_notify($2, $1::text)",
    )
    .bind(task.0)
    .bind(crate::nodes::WAKE_CHANNEL)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An attempt and its step, both rows locked (step run first).
#[derive(Clone, Debug)]
pub struct Locked {
    pub task_id: Uuid,
    pub step_name: String,
    pub current_attempt: i32,
    pub retries: i32,
    pub state: AttemptState,
    pub job_id: Uuid,
    pub worker_id: Option<Uuid>,
    pub lines_stored: i64,
    pub line_count: Option<i64>,
    pub outcome: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub claim_id: Option<Uuid>,
    /// The step's named mutex, if it has one.
    pub mutex: Option<String>,
    /// The fencing token of the attempt's mutex grant: the dispatcher's record, never a value
    /// an agent sent.
    pub mutex_token: Option<i64>,
    /// The claimant is a dispatcher node's built-in worker (its events come from the
    /// dispatcher's own broker user).
    pub claimant_builtin: bool,
    /// The sha256 of the job body published for the current job id.
    pub job_sha256: Option<String>,
}

impl Locked {
    pub fn task(&self) -> TaskId {
        TaskId(self.task_id)
    }
    /// True if the event's sender is this attempt's current claimant.
    pub fn is_claimant(&self, job: JobId, worker: WorkerId) -> bool {
        self.job_id == job.0 && self.worker_id == Some(worker.0)
    }
}

/// The columns of [`Locked`], for `FROM step_runs s JOIN attempts a`.
const LOCKED_COLUMNS: &str = "s.id AS step_run_id, a.attempt,
    s.task_id, s.name AS step_name, s.attempt AS current_attempt,
    COALESCE((s.spec->>'retries')::int, 0) AS retries, s.spec->>'mutex' AS mutex,
    a.state, a.job_id, a.worker_id, a.lines_stored, a.line_count, a.outcome,
    a.exit_code, a.error, a.started_at, a.claim_id, a.mutex_token, a.job_sha256,
    COALESCE(w.builtin, false) AS claimant_builtin";

/// Lock a step run and one of its attempts, in that order, in one statement (`FOR UPDATE OF
/// s, a` locks each joined row's step run before its attempt). `None` if either is missing.
pub async fn lock(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
) -> sqlx::Result<Option<Locked>> {
    let row: Option<AttemptRow> = sqlx::query_as(&format!(
        "SELECT {LOCKED_COLUMNS}
         FROM step_runs s JOIN attempts a ON a.step_run_id = s.id AND a.attempt = $2
         LEFT JOIN workers w ON w.id = a.worker_id
         WHERE s.id = $1
         FOR UPDATE OF s, a"
    ))
    .bind(step_run.0)
    .bind(attempt as i32)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(AttemptRow::into_locked))
}

/// [`lock`] the attempt whose current job is `job`: `None` if no attempt has that job id
/// (never published, or voided by a re-publication, even one that commits while this waits
/// for the lock). Returns the step run and the attempt's number too.
pub async fn lock_job(
    conn: &mut PgConnection,
    job: JobId,
) -> sqlx::Result<Option<(StepRunId, u32, Locked)>> {
    let row: Option<AttemptRow> = sqlx::query_as(&format!(
        "SELECT {LOCKED_COLUMNS}
         FROM step_runs s JOIN attempts a ON a.step_run_id = s.id
         LEFT JOIN workers w ON w.id = a.worker_id
         WHERE a.job_id = $1
         FOR UPDATE OF s, a"
    ))
    .bind(job.0)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| {
        let (step_run, attempt) = (StepRunId(r.step_run_id), r.attempt as u32);
        (step_run, attempt, r.into_locked())
    }))
}

/// What renewing a mutex lease needs to know of the attempt whose job it is.
#[derive(sqlx::FromRow)]
pub struct LeaseHolder {
    pub step_run_id: Uuid,
    pub attempt: i32,
    pub state: AttemptState,
    pub worker_id: Option<Uuid>,
    pub mutex: Option<String>,
    pub mutex_token: Option<i64>,
    /// It has run longer than its `timeout_secs` and [`TIMEOUT_SLACK_SECS`]: its agent should
    /// have stopped it, so its lease is not renewed any more.
    pub overdue: bool,
}

/// How long past its `timeout_secs` a running attempt may still renew its mutex lease (its
/// agent's SIGTERM grace and the time its end takes to arrive).
pub const TIMEOUT_SLACK_SECS: i64 = 30;

/// The attempt whose current job is `job`, for a lease renewal (no lock: the renewal is a
/// compare-and-set in Redis, and [`raise_token`] one in PostgreSQL).
pub async fn lease_holder(
    db: impl sqlx::PgExecutor<'_>,
    job: JobId,
) -> sqlx::Result<Option<LeaseHolder>> {
    sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.state, a.worker_id, s.spec->>'mutex' AS mutex,
                a.mutex_token,
                COALESCE(EXTRACT(EPOCH FROM now() - a.started_at)
                         > (s.spec->>'timeout_secs')::numeric + $2, false) AS overdue
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id WHERE a.job_id = $1",
    )
    .bind(job.0)
    .bind(TIMEOUT_SLACK_SECS)
    .fetch_optional(db)
    .await
}

/// Record a higher fencing token for a running attempt (its holder re-claimed the mutex after
/// Redis lost its data). Tokens only grow.
pub async fn raise_token(
    db: impl sqlx::PgExecutor<'_>,
    job: JobId,
    token: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE attempts SET mutex_token = $2
         WHERE job_id = $1 AND state = 'Running' AND mutex_token < $2",
    )
    .bind(job.0)
    .bind(token)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    step_run_id: Uuid,
    attempt: i32,
    task_id: Uuid,
    step_name: String,
    current_attempt: i32,
    retries: i32,
    mutex: Option<String>,
    state: AttemptState,
    job_id: Uuid,
    worker_id: Option<Uuid>,
    lines_stored: i64,
    line_count: Option<i64>,
    outcome: Option<String>,
    exit_code: Option<i32>,
    error: Option<String>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    claim_id: Option<Uuid>,
    mutex_token: Option<i64>,
    job_sha256: Option<String>,
    claimant_builtin: bool,
}

impl AttemptRow {
    fn into_locked(self) -> Locked {
        Locked {
            task_id: self.task_id,
            step_name: self.step_name,
            current_attempt: self.current_attempt,
            retries: self.retries,
            state: self.state,
            job_id: self.job_id,
            worker_id: self.worker_id,
            lines_stored: self.lines_stored,
            line_count: self.line_count,
            outcome: self.outcome,
            exit_code: self.exit_code,
            error: self.error,
            started_at: self.started_at,
            claim_id: self.claim_id,
            mutex: self.mutex,
            mutex_token: self.mutex_token,
            claimant_builtin: self.claimant_builtin,
            job_sha256: self.job_sha256,
        }
    }
}

/// Retry backoff: `base` doubled for each attempt already made, at most a minute.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(Duration::from_secs(60))
}

/// End an attempt (its rows locked by [`lock`]) in a final state, then either schedule the
/// next attempt (retries left, the step failed) or settle the step, and wake the task.
pub async fn conclude(
    conn: &mut PgConnection,
    locked: &Locked,
    step_run: StepRunId,
    attempt: u32,
    state: AttemptState,
    error: Option<&str>,
    retry_base: Duration,
) -> sqlx::Result<()> {
    conclude_quietly(
        conn, locked, step_run, attempt, state, error, retry_base, None,
    )
    .await?;
    wake(conn, locked.task()).await
}

/// [`conclude`] without the wake-up: for a caller that advances the task itself in the same
/// transaction (or wakes it), so a conclusion wakes its task one way only. `report`: the
/// agent's `StepFinished`, when it ends the attempt here (written with the end).
#[allow(clippy::too_many_arguments)]
pub async fn conclude_quietly(
    conn: &mut PgConnection,
    locked: &Locked,
    step_run: StepRunId,
    attempt: u32,
    state: AttemptState,
    error: Option<&str>,
    retry_base: Duration,
    report: Option<&transitions::Report<'_>>,
) -> sqlx::Result<()> {
    debug_assert!(state.is_final());
    let task = locked.task();
    let what = state.describe(locked.exit_code, error.or(locked.error.as_deref()));
    let is_current = locked.current_attempt == attempt as i32;
    // A cancelled attempt is never retried: a cancel means stop.
    if state != AttemptState::Success
        && state != AttemptState::Cancelled
        && is_current
        && (attempt as i32) <= locked.retries
    {
        transitions::end_attempt(conn, step_run, attempt, state, error, report).await?;
        let delay = backoff(retry_base, attempt);
        let reason = format!(
            "attempt {attempt} {what}; attempt {} of {} starts after {:.1}s",
            attempt + 1,
            locked.retries + 1,
            delay.as_secs_f64()
        );
        transitions::retry_step(conn, step_run, delay, &reason).await?;
        logs::append_system(
            conn,
            task,
            Some((step_run, attempt)),
            &format!("Step {} {reason}", locked.step_name),
        )
        .await?;
    } else if is_current {
        let reason = (state != AttemptState::Success).then(|| what.clone());
        transitions::end_attempt_settling_step(
            conn,
            step_run,
            attempt,
            state,
            error,
            reason.as_deref(),
            report,
        )
        .await?;
        if state != AttemptState::Success {
            logs::append_system(
                conn,
                task,
                Some((step_run, attempt)),
                &format!("Step {} {what}", locked.step_name),
            )
            .await?;
        }
    } else {
        // An earlier attempt than the step's current one: the step is not its to settle.
        transitions::end_attempt(conn, step_run, attempt, state, error, report).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(500);
        assert_eq!(backoff(b, 1), Duration::from_millis(500));
        assert_eq!(backoff(b, 3), Duration::from_secs(2));
        assert_eq!(backoff(b, 30), Duration::from_secs(60));
    }
}
