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
use gantry_shared::ids::{JobId, StepRunId, TaskId, WorkerId};
use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

/// Attempt states after which nothing changes. (`Waiting` — for a mutex — comes before
/// `Pending`.)
pub const FINAL_STATES: [&str; 5] = ["Success", "Failed", "TimedOut", "Cancelled", "WorkerLost"];
/// Final states that count as a failure of the step.
pub const FAILURE_STATES: [&str; 4] = ["Failed", "TimedOut", "Cancelled", "WorkerLost"];

pub fn is_final(state: &str) -> bool {
    FINAL_STATES.contains(&state)
}

/// Ask the orchestrator to look at a task again, durably and without locking the task row.
pub async fn wake(conn: &mut PgConnection, task: TaskId) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO task_wakeups (task_id) VALUES ($1)
         ON CONFLICT (task_id) DO UPDATE SET bump = task_wakeups.bump + 1",
    )
    .bind(task.0)
    .execute(&mut *conn)
    .await?;
    // The task's owner may be another dispatcher node: tell it (latency only; its sweep
    // reads the row above anyway).
    crate::nodes::notify_wake(conn, task).await
}

/// An attempt and its step, both rows locked (step run first).
#[derive(Debug)]
pub struct Locked {
    pub task_id: Uuid,
    pub step_name: String,
    pub current_attempt: i32,
    pub retries: i32,
    pub state: String,
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
    /// The fencing token of the attempt's mutex grant.
    pub mutex_token: Option<i64>,
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

/// Lock a step run and one of its attempts, in that order.
pub async fn lock(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
) -> sqlx::Result<Option<Locked>> {
    let step: Option<(Uuid, String, i32, i32, Option<String>)> = sqlx::query_as(
        "SELECT task_id, name, attempt, COALESCE((spec->>'retries')::int, 0), spec->>'mutex'
         FROM step_runs WHERE id = $1 FOR UPDATE",
    )
    .bind(step_run.0)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((task_id, step_name, current_attempt, retries, mutex)) = step else {
        return Ok(None);
    };
    let row: Option<AttemptRow> = sqlx::query_as(
        "SELECT state, job_id, worker_id, lines_stored, line_count, outcome, exit_code, error,
                started_at, claim_id, mutex_token
         FROM attempts WHERE step_run_id = $1 AND attempt = $2 FOR UPDATE",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|a| Locked {
        task_id,
        step_name,
        current_attempt,
        retries,
        state: a.state,
        job_id: a.job_id,
        worker_id: a.worker_id,
        lines_stored: a.lines_stored,
        line_count: a.line_count,
        outcome: a.outcome,
        exit_code: a.exit_code,
        error: a.error,
        started_at: a.started_at,
        claim_id: a.claim_id,
        mutex,
        mutex_token: a.mutex_token,
    }))
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    state: String,
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
}

/// Retry backoff: `base` doubled for each attempt already made, at most a minute.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    (base * factor).min(Duration::from_secs(60))
}

/// End an attempt (its rows locked by [`lock`]) in a final state, then either schedule the
/// next attempt (retries left, the step failed) or settle the step, and wake the task.
pub async fn conclude(
    conn: &mut PgConnection,
    locked: &Locked,
    step_run: StepRunId,
    attempt: u32,
    state: &str,
    error: Option<&str>,
    retry_base: Duration,
) -> sqlx::Result<()> {
    debug_assert!(is_final(state));
    sqlx::query(
        "UPDATE attempts SET state = $3, error = COALESCE($4, error),
             finished_at = COALESCE(finished_at, now())
         WHERE step_run_id = $1 AND attempt = $2",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(state)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    let task = locked.task();
    let what = describe(state, locked.exit_code, error.or(locked.error.as_deref()));
    let is_current = locked.current_attempt == attempt as i32;
    // A cancelled attempt is never retried: a cancel means stop.
    if state != "Success"
        && state != "Cancelled"
        && is_current
        && (attempt as i32) <= locked.retries
    {
        let delay = backoff(retry_base, attempt);
        let reason = format!(
            "attempt {attempt} {what}; attempt {} of {} starts after {:.1}s",
            attempt + 1,
            locked.retries + 1,
            delay.as_secs_f64()
        );
        sqlx::query(
            "UPDATE step_runs SET state = 'Pending', not_before = now() + $2, reason = $3
             WHERE id = $1",
        )
        .bind(step_run.0)
        .bind(delay)
        .bind(&reason)
        .execute(&mut *conn)
        .await?;
        logs::append_system(
            conn,
            task,
            Some((step_run, attempt)),
            &format!("Step {} {reason}", locked.step_name),
        )
        .await?;
    } else if is_current {
        let reason = (state != "Success").then(|| what.clone());
        sqlx::query(
            "UPDATE step_runs SET state = $2, reason = $3, waiting_for = NULL, not_before = NULL
             WHERE id = $1",
        )
        .bind(step_run.0)
        .bind(state)
        .bind(&reason)
        .execute(&mut *conn)
        .await?;
        if state != "Success" {
            logs::append_system(
                conn,
                task,
                Some((step_run, attempt)),
                &format!("Step {} {what}", locked.step_name),
            )
            .await?;
        }
    }
    wake(conn, task).await
}

/// "failed with exit code 3", "timed out", ...
pub fn describe(state: &str, exit_code: Option<i32>, error: Option<&str>) -> String {
    let base = match state {
        "Success" => "succeeded".to_owned(),
        "Failed" => match exit_code {
            Some(code) => format!("failed with exit code {code}"),
            None => "failed".to_owned(),
        },
        "TimedOut" => "timed out".to_owned(),
        "Cancelled" => "was cancelled".to_owned(),
        "WorkerLost" => "lost its worker".to_owned(),
        other => other.to_lowercase(),
    };
    match error {
        Some(e) if !e.is_empty() => format!("{base}: {e}"),
        _ => base,
    }
}

/// After the broker confirmed a job: `Pending` → `Queued`, unless it was claimed (or its job
/// voided) meanwhile.
pub async fn mark_queued(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    job: JobId,
) -> sqlx::Result<bool> {
    sqlx::query("SELECT 1 FROM step_runs WHERE id = $1 FOR UPDATE")
        .bind(step_run.0)
        .execute(&mut *conn)
        .await?;
    let r = sqlx::query(
        "UPDATE attempts SET state = 'Queued', queued_at = now()
         WHERE step_run_id = $1 AND attempt = $2 AND job_id = $3 AND state = 'Pending'",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(job.0)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE step_runs SET state = 'Queued' WHERE id = $1 AND attempt = $2 AND state = 'Pending'",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .execute(&mut *conn)
    .await?;
    Ok(true)
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

    #[test]
    fn descriptions() {
        assert_eq!(describe("Failed", Some(3), None), "failed with exit code 3");
        assert_eq!(
            describe("TimedOut", None, Some("after 5s")),
            "timed out: after 5s"
        );
    }
}
