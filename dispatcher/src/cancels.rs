//! # Cancels
//!
//! [`request`] is `POST /api/tasks/{id}/cancel`: the task becomes `Cancelling`, attempts that
//! have not started end `Cancelled` at once (giving up their mutexes), and the agents of the
//! running ones are told to stop them.
//!
//! ## Cancels nobody answers
//!
//! A cancel tells the agent of each running attempt to stop it, and the attempt ends when the
//! agent reports its `StepFinished`. An agent that never answers (frozen, cut off, gone
//! without its broker connection closing yet) must not leave the task `Cancelling`: this loop
//! looks every [`CHECK_EVERY`] at the running attempts of cancelling tasks, and one still
//! running [`ANSWER_WITHIN`] after the cancel (`tasks.cancel_requested_at`, the database's
//! clock, so every node counts alike and a node that restarts or takes over does not start
//! the count again) is concluded `Cancelled` by the dispatcher, so the task is `Cancelled`
//! within 10 s of the cancel (a step whose
//! `cancel_grace_secs` is over 5 gets that grace plus [`REPORT_AFTER_KILL`] instead). Whatever its agent sends
//! for it afterwards is stale (kept apart in `stale_events`). Its mutex, if it holds one, is
//! not released: it expires with its lease (its agent can no longer renew it), so a script
//! the agent left behind cannot overlap the next holder.

use crate::attempts;
use crate::orchestrator::Orchestrator;
use crate::store;
use crate::transitions::{self, AttemptState, TaskState};
use gantry_shared::ids::{StepRunId, TaskId, WorkerId};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often running attempts of cancelling tasks are looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long an agent has to report a cancelled attempt's end before the dispatcher concludes
/// it (counted from the cancel; the loop's next pass, at most [`CHECK_EVERY`] later, does),
/// for a step with the default `cancel_grace_secs`; see [`answer_within`].
pub const ANSWER_WITHIN: Duration = Duration::from_secs(7);
/// Time for the agent to report after SIGKILL, on top of the step's `cancel_grace_secs`.
pub const REPORT_AFTER_KILL: Duration = Duration::from_secs(2);

/// How long the agent of a step with this `cancel_grace_secs` has: [`ANSWER_WITHIN`], or the
/// grace plus [`REPORT_AFTER_KILL`] when that is longer (a live agent is still inside the
/// step's grace between SIGTERM and SIGKILL, and must not be cut short).
pub fn answer_within(grace_secs: i64) -> Duration {
    let grace = Duration::from_secs(grace_secs.clamp(0, 3600) as u64);
    ANSWER_WITHIN.max(grace.saturating_add(REPORT_AFTER_KILL))
}

/// What a cancel needs.
pub struct Canceller<'a> {
    pub db: &'a PgPool,
    pub orchestrator: &'a Orchestrator,
    pub locks: &'a crate::locks::Locks,
    pub retry_base: Duration,
}

/// Cancel a task: steps not started never start (jobs already queued are refused at their
/// claim), waiting and queued attempts end at once (giving up their mutexes), and running
/// scripts are stopped by their agents (SIGTERM to the process group, SIGKILL after a grace).
/// The task ends `Cancelled` once nothing runs any more. Returns its name and its state
/// (`Cancelling`, also when it already was).
pub async fn request(c: &Canceller<'_>, task: TaskId) -> store::Result<(String, TaskState)> {
    let mut tx = c.db.begin().await?;
    let row: Option<(String, TaskState)> =
        sqlx::query_as("SELECT name, state FROM tasks WHERE id = $1 FOR UPDATE")
            .bind(task.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((name, state)) = row else {
        return Err(store::Error::not_found(format!("no task with id {task}")));
    };
    if state.is_terminal() {
        return Err(store::Error::conflict(format!(
            "task {task} has already ended ({state}); there is nothing to cancel"
        )));
    }
    if state == TaskState::Cancelling {
        return Ok((name, state));
    }
    transitions::task_to(&mut tx, task, TaskState::Cancelling, None).await?;
    crate::logs::append_system(&mut tx, task, None, "Cancellation requested").await?;
    let live: Vec<(Uuid, i32, AttemptState, Option<Uuid>)> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.state, a.worker_id FROM attempts a
         JOIN step_runs s ON s.id = a.step_run_id
         WHERE s.task_id = $1 AND a.state = ANY($2)",
    )
    .bind(task.0)
    .bind(AttemptState::strs(&AttemptState::LIVE))
    .fetch_all(&mut *tx)
    .await?;
    let mut releases = Vec::new();
    let mut running = Vec::new();
    for (step_run, attempt, state, worker) in live {
        let step_run = StepRunId(step_run);
        let attempt = attempt as u32;
        if state == AttemptState::Running {
            if let Some(w) = worker {
                running.push((WorkerId(w), step_run, attempt));
            }
            continue;
        }
        if let Some(locked) = attempts::lock(&mut tx, step_run, attempt).await? {
            // Quietly: the task is woken once, after the loop.
            attempts::conclude_quietly(
                &mut tx,
                &locked,
                step_run,
                attempt,
                AttemptState::Cancelled,
                Some("cancelled before it started"),
                c.retry_base,
                None,
            )
            .await?;
            if let Some(mutex) = locked.mutex.clone() {
                releases.push((mutex, step_run, attempt, locked.mutex_token));
            }
        }
    }
    attempts::wake(&mut tx, task).await?;
    tx.commit().await?;
    for (mutex, step_run, attempt, token) in releases {
        // Give up the lease, or leave the queue for a step that was still waiting.
        c.locks
            .release_or_withdraw(&mutex, step_run, attempt, token.map(|t| t as u64))
            .await;
    }
    for (worker, step_run, attempt) in running {
        c.orchestrator
            .cancel_running(worker, step_run, attempt)
            .await;
    }
    // The task was woken above (its wake-up row and NOTIFY): one path.
    tracing::info!(%task, "cancellation requested");
    Ok((name, TaskState::Cancelling))
}

/// Start the loop (supervised).
pub fn spawn(
    db: PgPool,
    locks: crate::locks::Locks,
    retry_base: Duration,
    cancel: CancellationToken,
) {
    crate::supervise::spawn("cancels", cancel.clone(), move || {
        let (db, locks, cancel) = (db.clone(), locks.clone(), cancel.clone());
        async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                if let Err(e) = pass(&db, &locks, retry_base).await {
                    crate::supervise::pass_failed("cancels", &e);
                }
            }
        }
    });
}

async fn pass(db: &PgPool, locks: &crate::locks::Locks, retry_base: Duration) -> sqlx::Result<()> {
    // The states in the text, not bound: the partial indexes on active tasks and running
    // attempts match them (see `crate::db::connect`).
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT a.step_run_id, a.attempt, w.name,
                    CASE WHEN jsonb_typeof(s.spec->'cancel_grace_secs') = 'number'
                         THEN GREATEST(LEAST((s.spec->>'cancel_grace_secs')::numeric, 3600), 0)::bigint
                         ELSE 5 END,
                    EXTRACT(EPOCH FROM now() - COALESCE(t.cancel_requested_at, now()))::float8
             FROM attempts a
             JOIN step_runs s ON s.id = a.step_run_id JOIN tasks t ON t.id = s.task_id
             LEFT JOIN workers w ON w.id = a.worker_id
             WHERE t.state = '{cancelling}' AND a.state = '{running}'
             LIMIT 10000",
            cancelling = TaskState::Cancelling.as_str(),
            running = AttemptState::Running.as_str(),
        )
    });
    let running: Vec<(Uuid, i32, Option<String>, i64, f64)> =
        sqlx::query_as(SQL.as_str()).fetch_all(db).await?;
    let mut ended = false;
    for (step_run, attempt, worker, grace, waited_secs) in running {
        let within = answer_within(grace);
        if waited_secs.is_nan() || waited_secs < within.as_secs_f64() {
            continue;
        }
        let why = format!(
            "cancelled: {} did not report the step's end within {} s of the cancel; anything it sends for this attempt now is stale",
            worker
                .map(|w| format!("worker {w}"))
                .unwrap_or_else(|| "its worker".into()),
            within.as_secs()
        );
        let step_run = StepRunId(step_run);
        let Ok(attempt_no) = u32::try_from(attempt) else {
            continue;
        };
        let mut tx = db.begin().await?;
        if let Some(locked) = attempts::lock(&mut tx, step_run, attempt_no).await?
            && locked.state == AttemptState::Running
        {
            attempts::conclude(
                &mut tx,
                &locked,
                step_run,
                attempt_no,
                AttemptState::Cancelled,
                Some(&why),
                retry_base,
            )
            .await?;
            tx.commit().await?;
            tracing::warn!(%step_run, attempt, task = %locked.task(), "concluded a cancelled attempt its agent did not answer for");
            ended = true;
        }
    }
    if ended {
        locks.wake();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_grace_is_waited_for() {
        assert_eq!(answer_within(5), ANSWER_WITHIN);
        assert_eq!(answer_within(0), ANSWER_WITHIN);
        assert_eq!(answer_within(60), Duration::from_secs(62));
        assert_eq!(answer_within(i64::MAX), Duration::from_secs(3602));
        assert_eq!(answer_within(-1), ANSWER_WITHIN);
    }
}
