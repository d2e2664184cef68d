//! A lost worker: its running attempts end `WorkerLost` (retried elsewhere if the step
//! allows), it is `Unavailable`, and jobs parked in its own queue are published again to the
//! pool under new job ids (which voids the parked ones).

use crate::attempts;
use crate::orchestrator::Orchestrator;
use crate::transitions::{self, AttemptState, WorkerHealth};
use gantry_shared::ids::{StepRunId, TaskId, WorkerId};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// What a loss needs.
pub(super) struct Lose {
    pub db: PgPool,
    pub orchestrator: Orchestrator,
    pub locks: crate::locks::Locks,
    pub retry_base: Duration,
}

/// Mark a worker lost (logged; tried again on the next pass if PostgreSQL fails).
pub(super) async fn lose(l: &Lose, worker: Uuid, name: &str, reason: &str) {
    match record(l, worker, name, reason).await {
        Ok((tasks, parked)) => {
            tracing::warn!(
                worker = name,
                reason,
                attempts = tasks.len(),
                parked = parked.len(),
                "worker lost"
            );
            for (step_run, attempt) in parked {
                l.orchestrator.republish(step_run, attempt).await;
            }
            // A waiter for a lost step's mutex may go once the lease has expired too. The
            // tasks themselves were woken by their attempts' conclusions (one path: the
            // wake-up row and its NOTIFY).
            l.locks.wake();
        }
        Err(e) => {
            tracing::warn!(error = %e, worker = name, "could not mark a worker lost; will retry")
        }
    }
}

type Parked = Vec<(StepRunId, u32)>;

/// In one transaction: end the running attempts, mark the worker, list its parked jobs.
async fn record(
    l: &Lose,
    worker: Uuid,
    name: &str,
    reason: &str,
) -> sqlx::Result<(Vec<TaskId>, Parked)> {
    let mut tx = l.db.begin().await?;
    let running = attempts_of(&mut tx, "worker_id", worker, &[AttemptState::Running]).await?;
    let why = format!("worker {name} was lost: {reason}");
    let mut tasks = Vec::new();
    for (step_run, attempt) in running {
        if let Some(locked) = attempts::lock(&mut tx, step_run, attempt).await?
            && locked.state == AttemptState::Running
        {
            attempts::conclude(
                &mut tx,
                &locked,
                step_run,
                attempt,
                AttemptState::WorkerLost,
                Some(&why),
                l.retry_base,
            )
            .await?;
            tasks.push(locked.task());
        }
    }
    transitions::set_health(
        &mut tx,
        WorkerId(worker),
        WorkerHealth::Unavailable,
        Some(reason),
    )
    .await?;
    sqlx::query("UPDATE workers SET lost_at = now() WHERE id = $1")
        .bind(worker)
        .execute(&mut *tx)
        .await?;
    let parked = attempts_of(
        &mut tx,
        "routed_worker",
        worker,
        &[AttemptState::Pending, AttemptState::Queued],
    )
    .await?;
    tx.commit().await?;
    Ok((tasks, parked))
}

/// Attempts in one of `states` whose `column` (`worker_id`: its claimant, `routed_worker`:
/// its job's queue) is the worker.
async fn attempts_of(
    conn: &mut sqlx::PgConnection,
    column: &'static str,
    worker: Uuid,
    states: &[AttemptState],
) -> sqlx::Result<Parked> {
    // The states in the text, not bound: the partial indexes by worker match them (see
    // `crate::db::connect`).
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(&format!(
        "SELECT step_run_id, attempt FROM attempts WHERE {column} = $1 AND state IN ({})",
        AttemptState::sql_list(states)
    ))
    .bind(worker)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(s, a)| (StepRunId(s), a as u32))
        .collect())
}
