//! Leases and fencing outside the grants: the leases of granted attempts no agent has
//! claimed yet, putting an attempt whose lease is gone back in the queue, and a new epoch
//! (with its quiet period) when Redis comes back empty.

use super::grants::HOLDING;
use super::{Held, Inner};
use crate::attempts;
use crate::logs;
use crate::transitions::{self, AttemptState};
use gantry_shared::ids::{JobId, StepRunId};
use gantry_shared::locks::{self, MutexKeys, Reclaim, Renew};
use std::sync::Arc;
use std::time::Duration;

/// Granted attempts no agent has claimed yet.
const UNCLAIMED: [AttemptState; 2] = [AttemptState::Pending, AttemptState::Queued];

/// Keep the leases of granted attempts no agent has claimed yet.
pub(super) async fn renew_unclaimed(inner: &Arc<Inner>) -> anyhow::Result<()> {
    // The states in the text, not bound, for the partial index (see `crate::db::connect`).
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT a.step_run_id, a.attempt, s.task_id, s.name AS step_name,
                    s.spec->>'mutex' AS mutex, a.mutex_token
             FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
             WHERE a.mutex_token IS NOT NULL AND a.state IN ({unclaimed})",
            unclaimed = AttemptState::sql_list(&UNCLAIMED)
        )
    });
    let held: Vec<Held> = sqlx::query_as(SQL.as_str()).fetch_all(&inner.db).await?;
    for h in held {
        let Some(mutex) = h.mutex.as_deref() else {
            continue;
        };
        let keys = MutexKeys::new(&inner.ns, mutex);
        let step_run = StepRunId(h.step_run_id);
        let waiter = locks::waiter(step_run, h.attempt as u32);
        let token = h.mutex_token as u64;
        match locks::renew(&inner.redis, &keys, &waiter, token, inner.lease).await {
            Ok(Renew::Held) => {}
            Ok(answer @ (Renew::NoEpoch | Renew::Lost)) => {
                if answer == Renew::NoEpoch {
                    ensure_epoch(inner).await?;
                }
                // Taken back only during the quiet period after Redis lost its data.
                match locks::reclaim(&inner.redis, &keys, &waiter, inner.lease).await {
                    Ok(Reclaim::Held(new)) => {
                        sqlx::query(
                            "UPDATE attempts SET mutex_token = $3
                             WHERE step_run_id = $1 AND attempt = $2 AND mutex_token < $3",
                        )
                        .bind(h.step_run_id)
                        .bind(h.attempt)
                        .bind(new as i64)
                        .execute(&inner.db)
                        .await?;
                        tracing::info!(mutex, token = new, task = %h.task_id, step = h.step_name, "re-claimed a mutex after Redis lost its data");
                    }
                    Ok(Reclaim::Lost) => {
                        requeue(
                            inner,
                            step_run,
                            h.attempt as u32,
                            "its lease expired or was lost when Redis restarted",
                        )
                        .await?
                    }
                    Ok(Reclaim::NoEpoch) => {}
                    Err(e) => tracing::warn!(error = %e, mutex, "cannot re-claim a mutex yet"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, mutex, "cannot renew a mutex lease (Redis unavailable?)")
            }
        }
    }
    Ok(())
}

/// Void the job of an unclaimed attempt whose lease is gone and make it wait again.
pub(super) async fn requeue(
    inner: &Inner,
    step_run: StepRunId,
    attempt: u32,
    why: &str,
) -> sqlx::Result<()> {
    let mut tx = inner.db.begin().await?;
    let Some(locked) = attempts::lock(&mut tx, step_run, attempt).await? else {
        return Ok(());
    };
    if !UNCLAIMED.contains(&locked.state) {
        return Ok(());
    }
    // A new job id voids the one in circulation; then it waits for its mutex again.
    transitions::void(&mut tx, step_run, attempt, JobId::new()).await?;
    let waiting_for = format!("mutex {}", locked.mutex.as_deref().unwrap_or_default());
    transitions::wait_for_mutex(&mut tx, step_run, attempt, &waiting_for).await?;
    logs::append_system(
        &mut tx,
        locked.task(),
        Some((step_run, attempt)),
        &format!(
            "Step {} lost its mutex before starting ({why}); waiting again",
            locked.step_name
        ),
    )
    .await?;
    tx.commit().await
}

/// Set a new epoch if Redis has none while any mutex is in use.
pub(super) async fn check_epoch(inner: &Arc<Inner>) -> anyhow::Result<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT EXISTS (SELECT 1 FROM attempts WHERE state = '{waiting}')
                 OR EXISTS (SELECT 1 FROM attempts
                            WHERE mutex_token IS NOT NULL AND state IN ({holding}))",
            waiting = AttemptState::Waiting.as_str(),
            holding = AttemptState::sql_list(&HOLDING)
        )
    });
    let in_use: bool = sqlx::query_scalar(SQL.as_str())
        .fetch_one(&inner.db)
        .await?;
    if in_use && !locks::has_epoch(&inner.redis, &inner.ns).await? {
        ensure_epoch(inner).await?;
    }
    Ok(())
}

/// A new epoch from PostgreSQL; a quiet period only if some attempt may still hold a mutex.
pub(super) async fn ensure_epoch(inner: &Inner) -> anyhow::Result<()> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT EXISTS (SELECT 1 FROM attempts
                            WHERE mutex_token IS NOT NULL AND state IN ({holding}))",
            holding = AttemptState::sql_list(&HOLDING)
        )
    });
    let holders: bool = sqlx::query_scalar(SQL.as_str())
        .fetch_one(&inner.db)
        .await?;
    let epoch: i64 = sqlx::query_scalar("SELECT nextval('mutex_epochs')")
        .fetch_one(&inner.db)
        .await?;
    let quiet = if holders { inner.lease } else { Duration::ZERO };
    if locks::set_epoch(&inner.redis, &inner.ns, epoch as u64, quiet).await? {
        if holders {
            tracing::warn!(
                epoch,
                quiet_ms = quiet.as_millis() as u64,
                "Redis lost the mutex data (it restarted empty): set a new epoch; only holders may re-claim during the quiet period"
            );
        } else {
            tracing::info!(
                epoch,
                "Redis had no mutex epoch (first use, or it restarted empty while no mutex was held): set one"
            );
        }
    }
    Ok(())
}
