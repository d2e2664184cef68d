//! A routed attempt: its job built and recorded, a wait for a worker, or a failure.

use super::advance::{StepRecord, TaskRecord};
use super::route::{self, Route};
use super::{Inner, Outgoing, facts, publish};
use crate::transitions::{self, AttemptState, StepState};
use crate::{attempts, logs};
use gantry_shared::ids::{JobId, StepRunId};
use sqlx::PgConnection;
use std::time::Duration;

/// Whether the attempt being dispatched exists yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Attempt {
    /// To be created here (`Pending`), with its routing when it can go.
    New,
    /// `Pending` already (it waited for a worker, or its job was voided).
    Existing,
}

/// Route a `Pending` attempt and act on it: the job to publish (its routing and sha256
/// recorded on the attempt), or nothing: a waiting attempt stays `Pending` and unpublished
/// (the sweep looks again every few seconds) until the policy's
/// `no_healthy_worker_timeout_secs`, then fails; an attempt that can never run fails now.
/// A [`Attempt::New`] one is created here: with its routing in the same statement when it
/// can go, before the wait or the failure otherwise.
pub(super) async fn dispatch_or_wait(
    inner: &Inner,
    tx: &mut PgConnection,
    task: &TaskRecord,
    step: &StepRecord,
    attempt: u32,
    job_id: JobId,
    attempt_is: Attempt,
) -> anyhow::Result<Option<Outgoing>> {
    let facts = facts::load(tx, step, inner.builtin_runs_code).await?;
    let routed = route::route(&facts.route);
    if routed.forget_sticky
        && let Some(pool) = step.pool_id
    {
        route::forget_sticky(tx, task.id, pool).await?;
    }
    let step_run = StepRunId(step.id);
    if attempt_is == Attempt::New && !matches!(routed.route, Route::Go { .. }) {
        let start = transitions::Start::Publish;
        transitions::create_attempt(tx, step_run, attempt, job_id, start).await?;
    }
    match routed.route {
        Route::Go {
            routing_key,
            pool_slug,
            worker,
        } => {
            let mut out = publish::build_job(task, step, &facts, attempt, job_id);
            // The sha256 of exactly the bytes that will be published: the claim compares it
            // with what the agent received.
            let body = out.job.encode();
            let job_sha256 = gantry_shared::wire::body_sha256(&body);
            if attempt_is == Attempt::New {
                let start = transitions::Start::Routed {
                    worker,
                    routing_key: &routing_key,
                    job_sha256: &job_sha256,
                };
                transitions::create_attempt(tx, step_run, attempt, job_id, start).await?;
            } else {
                sqlx::query(
                    "UPDATE attempts SET routed_worker = $3, routing_key = $4,
                         no_worker_since = NULL, job_sha256 = $5
                     WHERE step_run_id = $1 AND attempt = $2",
                )
                .bind(step.id)
                .bind(attempt as i32)
                .bind(worker)
                .bind(&routing_key)
                .bind(&job_sha256)
                .execute(&mut *tx)
                .await?;
            }
            out.body = body;
            // Only a step that was waiting for a worker is `Waiting` here: mutex waits end
            // before their attempt is routed.
            if step.state == StepState::Waiting
                && transitions::step_resumes(tx, step_run, StepState::Pending).await?
            {
                logs::append_system(
                    tx,
                    task.id,
                    Some((step_run, attempt)),
                    &format!("Step {}: a worker is available; sending it out", step.name),
                )
                .await?;
            }
            out.routing_key = routing_key;
            out.pool_slug = pool_slug;
            Ok(Some(out))
        }
        Route::Wait(why) => {
            let timeout = Duration::from_secs(u64::from(
                crate::store::settings::get(&mut *tx)
                    .await?
                    .no_healthy_worker_timeout_secs,
            ));
            let (first, waited): (bool, f64) = sqlx::query_as(
                "UPDATE attempts SET no_worker_since = COALESCE(no_worker_since, now()),
                     pending_since = now(), routed_worker = NULL, routing_key = NULL
                 WHERE step_run_id = $1 AND attempt = $2
                 RETURNING no_worker_since = now(),
                           EXTRACT(EPOCH FROM now() - no_worker_since)::float8",
            )
            .bind(step.id)
            .bind(attempt as i32)
            .fetch_one(&mut *tx)
            .await?;
            if waited >= timeout.as_secs_f64() {
                let msg = format!("{why} (waited {} s)", timeout.as_secs());
                fail_attempt(inner, tx, task, step, attempt, &msg).await?;
                return Ok(None);
            }
            transitions::step_waits(
                tx,
                step_run,
                &why,
                Some(&[StepState::Pending, StepState::Queued]),
            )
            .await?;
            if first {
                logs::append_system(
                    tx,
                    task.id,
                    Some((step_run, attempt)),
                    &format!(
                        "Step {} waits: {why} (it fails if none is healthy within {} s)",
                        step.name,
                        timeout.as_secs()
                    ),
                )
                .await?;
                logs::notify(tx, logs::TASK_CHANNEL, task.id).await?;
            }
            Ok(None)
        }
        Route::Fail(why) => {
            fail_attempt(inner, tx, task, step, attempt, &why).await?;
            Ok(None)
        }
    }
}

/// An attempt that cannot go anywhere fails (its retries, if any, are scheduled) and the
/// task is woken to move on.
async fn fail_attempt(
    inner: &Inner,
    tx: &mut PgConnection,
    task: &TaskRecord,
    step: &StepRecord,
    attempt: u32,
    why: &str,
) -> sqlx::Result<()> {
    let step_run = StepRunId(step.id);
    if let Some(locked) = attempts::lock(tx, step_run, attempt).await? {
        // Quietly: the one wake-up is below.
        attempts::conclude_quietly(
            tx,
            &locked,
            step_run,
            attempt,
            AttemptState::Failed,
            Some(why),
            inner.retry_base,
            None,
        )
        .await?;
        attempts::wake(tx, task.id).await?;
    }
    Ok(())
}
