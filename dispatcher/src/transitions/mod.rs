//! # Transitions: the only writer of state columns
//!
//! Every change of a task's, step run's, attempt's or artifact's state is one of the
//! functions below: a compare-and-set whose allowed sources come from the table in
//! [`gantry_shared::states`] (`state = ANY(sources)`), so a transition the table does not
//! list changes nothing here, and the database's trigger (see [`ddl`]) refuses it anyway.
//! An attempt's step run moves in the same statement as the attempt, so the two never
//! drift; each function returns whether the row moved.
//!
//! Callers hold the rows' locks in the documented order (`attempts` module): tasks →
//! step_runs → attempts → task_log_positions → task_wakeups.

pub mod ddl;
pub mod diagram;
mod health;
mod tasks;

pub use gantry_shared::states::{
    ArtifactState, AttemptState, State, StepState, TaskState, Variants, WorkerHealth,
};
pub use health::{HealthChange, HeartbeatRow, set_health, store_heartbeats};
pub use tasks::{settle_artifact, task_to};

use chrono::{DateTime, Utc};
use gantry_shared::ids::{JobId, StepRunId, WorkerId};
use sqlx::PgConnection;
use std::time::Duration;

/// The strings of the states `to` may be entered from, for `state = ANY($n)`.
pub fn sources<S: State>(to: S) -> Vec<&'static str> {
    S::sources(to).iter().map(|s| s.as_str()).collect()
}

/// How a new attempt starts.
pub enum Start<'a> {
    /// `Pending` with no route yet (its step stays `Pending`): one that waits for a worker
    /// or fails at once; a routable one is created [`Start::Routed`].
    Publish,
    /// Routed already, its job built: `Pending`, with where the job goes and the sha256 of
    /// its body recorded in the same statement.
    Routed {
        worker: Option<uuid::Uuid>,
        routing_key: &'a str,
        job_sha256: &'a str,
    },
    /// Waiting for its mutex before anything is published (`Waiting`, and its step says
    /// what for).
    Mutex(&'a str),
    /// Run by the dispatcher itself at once (an e-mail step): `Running` under this name.
    Dispatcher(&'a str),
}

/// Create attempt `attempt` of a step run and make it the step's current one.
pub async fn create_attempt(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    job: JobId,
    start: Start<'_>,
) -> sqlx::Result<()> {
    let mut routed = (None, None, None);
    let (state, waiting_for, worker_name) = match start {
        Start::Publish => (AttemptState::Pending, None, None),
        Start::Routed {
            worker,
            routing_key,
            job_sha256,
        } => {
            routed = (worker, Some(routing_key), Some(job_sha256));
            (AttemptState::Pending, None, None)
        }
        Start::Mutex(name) => (AttemptState::Waiting, Some(format!("mutex {name}")), None),
        Start::Dispatcher(name) => (AttemptState::Running, None, Some(name)),
    };
    debug_assert!(AttemptState::initial().contains(&state));
    sqlx::query(
        "WITH a AS (INSERT INTO attempts (step_run_id, attempt, job_id, state, worker_name,
                                          waiting_since, started_at,
                                          routed_worker, routing_key, job_sha256)
                    VALUES ($1, $2, $3, $4, $5,
                            CASE WHEN $4 = 'Waiting' THEN now() END,
                            CASE WHEN $4 = 'Running' THEN now() END,
                            $8, $9, $10)
                    RETURNING 1)
         UPDATE step_runs SET attempt = $2, state = $6, waiting_for = $7, not_before = NULL
         WHERE id = $1 AND EXISTS (SELECT 1 FROM a)",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(job.0)
    .bind(state)
    .bind(worker_name)
    .bind(state.step_state())
    .bind(waiting_for)
    .bind(routed.0)
    .bind(routed.1)
    .bind(routed.2)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Confirmed jobs, many at once (one statement): each attempt still on that job records when
/// its job was confirmed (`queued_at`, even if its claim came first), and a `Pending` one
/// becomes `Queued`. Returns how many became `Queued`.
pub async fn queue_many(
    conn: &mut PgConnection,
    jobs: &[(StepRunId, u32, JobId, DateTime<Utc>)],
) -> sqlx::Result<u64> {
    if jobs.is_empty() {
        return Ok(0);
    }
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|j| j.0.0).collect();
    let nums: Vec<i32> = jobs.iter().map(|j| j.1 as i32).collect();
    let job_ids: Vec<uuid::Uuid> = jobs.iter().map(|j| j.2.0).collect();
    let at: Vec<DateTime<Utc>> = jobs.iter().map(|j| j.3).collect();
    // Step runs first, all of them and in id order, then their attempts: the lock order.
    let moved: i64 = sqlx::query_scalar(
        "WITH j AS (SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::timestamptz[])
                    AS j(s, n, job, at)),
              locked AS (SELECT s.id FROM step_runs s WHERE s.id IN (SELECT j.s FROM j)
                         ORDER BY s.id FOR UPDATE OF s),
              a AS (UPDATE attempts a
                    SET state = CASE WHEN a.state = ANY($5) THEN 'Queued' ELSE a.state END,
                        queued_at = COALESCE(a.queued_at, j.at)
                    FROM j WHERE a.step_run_id = j.s AND a.attempt = j.n AND a.job_id = j.job
                      AND (a.state = ANY($5) OR a.queued_at IS NULL)
                      AND (SELECT count(*) FROM locked) >= 0
                    RETURNING a.step_run_id, a.attempt, a.state),
              s AS (UPDATE step_runs s SET state = 'Queued'
                    FROM a WHERE s.id = a.step_run_id AND s.attempt = a.attempt
                      AND a.state = 'Queued' AND s.state = ANY($6))
         SELECT count(*) FROM a WHERE a.state = 'Queued'",
    )
    .bind(&ids)
    .bind(&nums)
    .bind(&job_ids)
    .bind(&at)
    .bind(sources(AttemptState::Queued))
    .bind(sources(StepState::Queued))
    .fetch_one(&mut *conn)
    .await?;
    Ok(moved as u64)
}

/// Give an unclaimed attempt a new job id, voiding the one in circulation: `Pending` or
/// `Queued` → `Pending`.
pub async fn void(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    new_job: JobId,
) -> sqlx::Result<bool> {
    let moved: i64 = sqlx::query_scalar(
        "WITH a AS (UPDATE attempts SET job_id = $3, state = 'Pending', pending_since = now()
                    WHERE step_run_id = $1 AND attempt = $2 AND state = ANY($4)
                    RETURNING 1),
              s AS (UPDATE step_runs SET state = 'Pending'
                    WHERE id = $1 AND attempt = $2 AND state = 'Queued'
                      AND EXISTS (SELECT 1 FROM a))
         SELECT count(*) FROM a",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(new_job.0)
    // Staying `Pending` (a new job id only) or `Queued` → `Pending`.
    .bind(AttemptState::strs(&[
        AttemptState::Pending,
        AttemptState::Queued,
    ]))
    .fetch_one(&mut *conn)
    .await?;
    Ok(moved > 0)
}

/// A granted claim: `Pending` or `Queued` → `Running` under this worker and claim id.
pub async fn claim(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    worker: WorkerId,
    worker_name: &str,
    claim_id: uuid::Uuid,
) -> sqlx::Result<bool> {
    let moved: i64 = sqlx::query_scalar(
        "WITH a AS (UPDATE attempts SET state = 'Running', worker_id = $3, worker_name = $4,
                        claim_id = $5, started_at = now()
                    WHERE step_run_id = $1 AND attempt = $2 AND state = ANY($6)
                    RETURNING 1),
              s AS (UPDATE step_runs SET state = 'Running', waiting_for = NULL
                    WHERE id = $1 AND attempt = $2 AND state = ANY($7)
                      AND EXISTS (SELECT 1 FROM a))
         SELECT count(*) FROM a",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(worker.0)
    .bind(worker_name)
    .bind(claim_id)
    .bind(sources(AttemptState::Running))
    .bind(sources(StepState::Running))
    .fetch_one(&mut *conn)
    .await?;
    Ok(moved > 0)
}

/// Its mutex was lost before the claim: `Pending`/`Queued` → `Waiting` for it again.
pub async fn wait_for_mutex(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    waiting_for: &str,
) -> sqlx::Result<bool> {
    attempt_to(
        conn,
        step_run,
        attempt,
        AttemptState::Waiting,
        None,
        "mutex_token = NULL, waiting_since = now()",
        Some(waiting_for),
    )
    .await
}

/// Its mutex was granted under `token`: `Waiting` → `Pending`, to be published.
pub async fn grant(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    token: i64,
) -> sqlx::Result<bool> {
    let moved: i64 = sqlx::query_scalar(
        "WITH a AS (UPDATE attempts SET state = 'Pending', mutex_token = $3, pending_since = now()
                    WHERE step_run_id = $1 AND attempt = $2 AND state = ANY($4)
                    RETURNING 1),
              s AS (UPDATE step_runs SET state = 'Pending', waiting_for = NULL
                    WHERE id = $1 AND attempt = $2 AND state = ANY($5)
                      AND EXISTS (SELECT 1 FROM a))
         SELECT count(*) FROM a",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(token)
    .bind(sources(AttemptState::Pending))
    .bind(sources(StepState::Pending))
    .fetch_one(&mut *conn)
    .await?;
    Ok(moved > 0)
}

/// What the agent reported of an attempt that ends as its `StepFinished` is stored: written
/// with the attempt's end, in the same statement, and the attempt's unannounced artifacts
/// dropped with it (it announced none). `finished_at` is the agent's clock.
pub struct Report<'a> {
    pub outcome: &'a str,
    pub exit_code: Option<i32>,
    pub error: Option<&'a str>,
    pub line_count: i64,
    pub lines_stored: i64,
    pub finished_at: DateTime<Utc>,
}

/// The attempt's end (`$1`–`$11`), shared by [`end_attempt`] and
/// [`end_attempt_settling_step`]: its state, its error, when it finished, and the agent's
/// [`Report`] when one comes with it (`$6`–`$10` and `$12` NULL, `$11` false, when none does).
const END_ATTEMPT: &str = "a AS (UPDATE attempts SET state = $3, error = COALESCE($4, $7, error),
               finished_at = COALESCE($10, finished_at, now()),
               outcome = COALESCE($6, outcome), exit_code = COALESCE($8, exit_code),
               line_count = COALESCE($9, line_count), lines_stored = COALESCE($12, lines_stored)
           WHERE step_run_id = $1 AND attempt = $2 AND state = ANY($5)
           RETURNING 1),
     d AS (DELETE FROM artifacts WHERE $11 AND step_run_id = $1 AND attempt = $2)";

/// Bind [`END_ATTEMPT`]'s parameters, in order.
fn bind_end<'q>(
    q: sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments>,
    (step_run, attempt, to, error): (StepRunId, u32, AttemptState, Option<&'q str>),
    report: Option<&'q Report<'q>>,
) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments> {
    q.bind(step_run.0)
        .bind(attempt as i32)
        .bind(to)
        .bind(error)
        .bind(sources(to))
        .bind(report.map(|r| r.outcome))
        .bind(report.and_then(|r| r.error))
        .bind(report.and_then(|r| r.exit_code))
        .bind(report.map(|r| r.line_count))
        .bind(report.map(|r| r.finished_at))
        .bind(report.is_some())
        .bind(report.map(|r| r.lines_stored))
}

/// End an attempt in a final state (its step run is settled by [`settle_step`] or
/// [`retry_step`], which may differ: a failure with retries left), with the agent's
/// [`Report`] if its `StepFinished` ends it. Returns whether it moved.
pub async fn end_attempt(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    to: AttemptState,
    error: Option<&str>,
    report: Option<&Report<'_>>,
) -> sqlx::Result<bool> {
    debug_assert!(to.is_final());
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("WITH {END_ATTEMPT} SELECT count(*) FROM a"));
    let q = sqlx::query_scalar(SQL.as_str());
    let moved = bind_end(q, (step_run, attempt, to, error), report)
        .fetch_one(&mut *conn)
        .await?;
    Ok(moved == 1)
}

/// [`end_attempt`] and [`settle_step`] in one statement: the current attempt ended and its
/// step run settles with it (no retry follows). Each compare-and-set applies on its own, as
/// the two calls would.
pub async fn end_attempt_settling_step(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    to: AttemptState,
    error: Option<&str>,
    reason: Option<&str>,
    report: Option<&Report<'_>>,
) -> sqlx::Result<()> {
    debug_assert!(to.is_final());
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH {END_ATTEMPT},
                  s AS (UPDATE step_runs SET state = $13, reason = $14, waiting_for = NULL,
                            not_before = NULL
                        WHERE id = $1 AND state = ANY($15))
             SELECT count(*) FROM a"
        )
    });
    let step_to = to.step_state();
    let q = sqlx::query_scalar(SQL.as_str());
    bind_end(q, (step_run, attempt, to, error), report)
        .bind(step_to)
        .bind(reason)
        .bind(sources(step_to))
        .fetch_one(&mut *conn)
        .await?;
    Ok(())
}

/// A step run's outcome (its current attempt ended, a skip, an approval, a cancel).
pub async fn settle_step(
    conn: &mut PgConnection,
    step_run: StepRunId,
    to: StepState,
    reason: Option<&str>,
) -> sqlx::Result<bool> {
    debug_assert!(to.is_final());
    let r = sqlx::query(
        "UPDATE step_runs SET state = $2, reason = $3, waiting_for = NULL, not_before = NULL
         WHERE id = $1 AND state = ANY($4)",
    )
    .bind(step_run.0)
    .bind(to)
    .bind(reason)
    .bind(sources(to))
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A failed attempt with retries left: the step is `Pending` again, due after `delay`.
pub async fn retry_step(
    conn: &mut PgConnection,
    step_run: StepRunId,
    delay: Duration,
    reason: &str,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE step_runs SET state = 'Pending', not_before = now() + $2, reason = $3,
             waiting_for = NULL
         WHERE id = $1 AND state = ANY($4)",
    )
    .bind(step_run.0)
    .bind(delay)
    .bind(reason)
    .bind(sources(StepState::Pending))
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A step run waits (for a healthy worker, an approval, the agent's exclusive gate) while
/// its attempt keeps its state; `from` narrows the sources (`None`: the table's). A step
/// already waiting gets the new reason. Returns whether it started waiting now.
pub async fn step_waits(
    conn: &mut PgConnection,
    step_run: StepRunId,
    waiting_for: &str,
    from: Option<&[StepState]>,
) -> sqlx::Result<bool> {
    let from: Vec<&str> = match from {
        Some(f) => StepState::strs(f),
        None => sources(StepState::Waiting),
    };
    let started: Option<bool> = sqlx::query_scalar(
        "WITH before AS (SELECT state FROM step_runs WHERE id = $1)
         UPDATE step_runs SET state = 'Waiting', waiting_for = $2, not_before = NULL
         WHERE id = $1 AND (state = ANY($3) OR state = 'Waiting')
         RETURNING (SELECT state FROM before) <> 'Waiting'",
    )
    .bind(step_run.0)
    .bind(waiting_for)
    .bind(from)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(started == Some(true))
}

/// A waiting step run goes on as its attempt is: `Pending` (a worker is available) or
/// `Running` (the agent's gate let it in).
pub async fn step_resumes(
    conn: &mut PgConnection,
    step_run: StepRunId,
    to: StepState,
) -> sqlx::Result<bool> {
    debug_assert!(matches!(to, StepState::Pending | StepState::Running));
    let r = sqlx::query(
        "UPDATE step_runs SET state = $2, waiting_for = NULL WHERE id = $1 AND state = 'Waiting'",
    )
    .bind(step_run.0)
    .bind(to)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Move one attempt (and its step, to the attempt's step state) from the table's sources to
/// `to`, setting `extra` columns; with `job`, only while that is its current job.
async fn attempt_to(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    to: AttemptState,
    job: Option<JobId>,
    extra: &'static str,
    waiting_for: Option<&str>,
) -> sqlx::Result<bool> {
    let moved: i64 = sqlx::query_scalar(&format!(
        "WITH a AS (UPDATE attempts SET state = $3, {extra}
                    WHERE step_run_id = $1 AND attempt = $2 AND state = ANY($4)
                      AND ($5::uuid IS NULL OR job_id = $5)
                    RETURNING 1),
              s AS (UPDATE step_runs SET state = $6, waiting_for = $7
                    WHERE id = $1 AND attempt = $2 AND state = ANY($8)
                      AND EXISTS (SELECT 1 FROM a))
         SELECT count(*) FROM a"
    ))
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(to)
    .bind(sources(to))
    .bind(job.map(|j| j.0))
    .bind(to.step_state())
    .bind(waiting_for)
    .bind(sources(to.step_state()))
    .fetch_one(&mut *conn)
    .await?;
    Ok(moved > 0)
}
