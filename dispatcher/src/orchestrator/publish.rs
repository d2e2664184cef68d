//! Jobs out: building them, publishing with confirms, re-publishing unclaimed ones under a
//! new job id, and cancel messages to agents.

use super::advance::{STEP_COLUMNS, StepRecord, TaskRecord};
use super::facts::StepFacts;
use super::{Inner, Outgoing, dispatch, schedule};
use crate::transitions;
use anyhow::Context;
use gantry_shared::amqp::{PublishError, json_properties};
use gantry_shared::ids::{JobId, StepRunId, TaskId, WorkerId};
use gantry_shared::states::TaskState;
use gantry_shared::topology::Topology;
use gantry_shared::wire::{Control, Job};
use sqlx::PgConnection;
use std::sync::Arc;
use uuid::Uuid;

/// The job for an attempt: the step's script and every non-sensitive value it may reference.
pub(super) fn build_job(
    task: &TaskRecord,
    step: &StepRecord,
    facts: &StepFacts,
    attempt: u32,
    job_id: JobId,
) -> Outgoing {
    let spec = &facts.spec;
    let (mut variables, sensitive_names) = facts.values.visible(task, &step.name, attempt);
    if let Some(pool) = &step.pool_name {
        variables.insert("Gantry.WorkerPool.Name".into(), pool.clone());
    }
    let job = Job {
        job_id,
        task_id: task.id,
        task_name: task.name.clone(),
        step_run_id: StepRunId(step.id),
        step_name: step.name.clone(),
        attempt,
        syntax: spec.syntax,
        script: spec.script.clone().unwrap_or_default(),
        variables,
        sensitive_names,
        timeout_secs: spec.timeout_secs,
        cancel_grace_secs: spec.cancel_grace_secs,
        pool_name: step.pool_name.clone(),
        exclusive: spec.exclusive,
        mutex: spec.mutex.clone(),
        artifacts: spec.artifacts.clone(),
    };
    let slug = step.pool_slug.clone();
    Outgoing {
        body: Vec::new(),
        routing_key: slug
            .as_deref()
            .map(Topology::pool_routing_key)
            .unwrap_or_else(|| Topology::SERVER_ROUTING_KEY.to_owned()),
        pool_slug: slug,
        job,
    }
}

/// Publish jobs together (their confirms awaited together); the confirmed ones are marked
/// `Queued` by [`flush_confirmed`], many tasks' at once.
pub(super) async fn publish_all(inner: &Arc<Inner>, outgoing: Vec<Outgoing>) {
    if outgoing.is_empty() {
        return;
    }
    let sent = futures::future::join_all(outgoing.into_iter().map(|o| send(inner, o))).await;
    let at = chrono::Utc::now();
    for (step_run, attempt, job) in sent.into_iter().flatten() {
        // Still this node's to publish until the mark is stored (the sweep leaves it alone).
        let _ = inner.confirmed_tx.send((step_run, attempt, job, at));
    }
}

/// How long confirmed jobs gather before their `Queued` marks are stored together. Nothing
/// waits for the mark (a claim accepts `Pending`, and `queued_at` is the confirm's time,
/// not the flush's), so this only delays what the API shows as `Queued` by up to 100 ms, for
/// one commit per window instead of one per job: at 50 jobs a second, 0.2 commits per job
/// rather than 0.8 with a 25 ms window.
const QUEUED_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Store the `Queued` marks of confirmed jobs: one transaction per [`QUEUED_WINDOW`] (more
/// often only when over 1,000 jobs gather).
pub(super) async fn flush_confirmed(
    inner: Arc<Inner>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(
        StepRunId,
        u32,
        JobId,
        chrono::DateTime<chrono::Utc>,
    )>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + QUEUED_WINDOW;
        while batch.len() < 1000 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(c)) => batch.push(c),
                Ok(None) | Err(_) => break,
            }
        }
        let r = async {
            let mut tx = inner.db.begin().await?;
            transitions::queue_many(&mut tx, &batch).await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = r {
            // The jobs are on their way; the claim accepts Pending too, so this only loses
            // the Queued marks, which the claims supersede.
            tracing::warn!(error = %e, jobs = batch.len(), "could not mark attempts Queued");
        }
        let mut publishing = inner.publishing.lock().expect("lock");
        for (step_run, attempt, _, _) in batch {
            publishing.remove(&(step_run, attempt));
        }
    }
}

/// Publish one job and wait for its confirm: `Some` once confirmed. A failure leaves the
/// attempt `Pending` for the sweep to re-publish (and no longer this node's to publish).
async fn send(inner: &Arc<Inner>, out: Outgoing) -> Option<(StepRunId, u32, JobId)> {
    let key = (out.job.step_run_id, out.job.attempt);
    let exchange = inner.topology.jobs_exchange();
    let props = json_properties().with_message_id(out.job.job_id.to_string().into());
    let mut result = inner
        .publisher
        .publish(&exchange, &out.routing_key, &out.body, props.clone())
        .await;
    if let (Err(PublishError::Returned(_)), Some(slug)) = (&result, &out.pool_slug) {
        // The pool's queue is missing (deleted by hand, or the pool was created while the
        // broker was away): declare it and try once more.
        if let Some(conn) = inner.broker.current()
            && let Ok(ch) = conn.create_channel().await
        {
            let _ = inner.topology.declare_pool(&ch, slug).await;
            let _ = ch.close(200, "declared".into()).await;
        }
        result = inner
            .publisher
            .publish(&exchange, &out.routing_key, &out.body, props)
            .await;
    }
    match result {
        Ok(()) => Some((key.0, key.1, out.job.job_id)),
        Err(e) => {
            tracing::warn!(error = %e, step_run = %key.0, attempt = key.1, "publishing a job failed; the sweep will publish it again");
            inner.publishing.lock().expect("lock").remove(&key);
            None
        }
    }
}

/// Give an unclaimed attempt a new job id (voiding the old one) and publish it; with
/// `voided`, the caller already gave it that job id (and committed), so it is published
/// under it while it is still the attempt's.
pub(super) async fn republish(
    inner: &Arc<Inner>,
    step_run: StepRunId,
    attempt: u32,
    voided: Option<JobId>,
) {
    let key = (step_run, attempt);
    if !inner.publishing.lock().expect("lock").insert(key) {
        return;
    }
    let built = async {
        let mut tx = inner.db.begin().await?;
        let task: Option<(Uuid, String, TaskState, serde_json::Value)> = sqlx::query_as(
            "SELECT t.id, t.name, t.state, t.variables FROM tasks t
             JOIN step_runs s ON s.task_id = t.id WHERE s.id = $1",
        )
        .bind(step_run.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((task_id, name, state, variables)) = task else {
            return Ok::<_, anyhow::Error>(None);
        };
        let task = TaskRecord {
            id: TaskId(task_id),
            name,
            state,
            variables,
        };
        let step: StepRecord = sqlx::query_as(&format!(
            "SELECT {} FROM step_runs s LEFT JOIN pools p ON p.id = s.pool_id
             WHERE s.id = $1 FOR UPDATE OF s",
            *STEP_COLUMNS
        ))
        .bind(step_run.0)
        .fetch_one(&mut *tx)
        .await
        .context("loading step for re-publication")?;
        let job_id = voided.unwrap_or_default();
        let current =
            match voided {
                // Still `Pending` under the job id the caller gave it (nobody voided it since).
                Some(job) => sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM attempts WHERE step_run_id = $1 AND attempt = $2
                                AND job_id = $3 AND state = 'Pending')",
                )
                .bind(step_run.0)
                .bind(attempt as i32)
                .bind(job.0)
                .fetch_one(&mut *tx)
                .await?,
                None => transitions::void(&mut tx, step_run, attempt, job_id).await?,
            };
        if step.attempt != attempt as i32 || !current {
            return Ok(None);
        }
        let out = dispatch::dispatch_or_wait(
            inner,
            &mut tx,
            &task,
            &step,
            attempt,
            job_id,
            dispatch::Attempt::Existing,
        )
        .await?;
        tx.commit().await?;
        if out.is_none() {
            // Waiting for a worker (the sweep looks again), or failed (the task moves on).
            schedule::kick(inner, task.id);
        }
        Ok(out)
    }
    .await;
    match built {
        Ok(Some(out)) => {
            tracing::info!(step_run = %step_run, attempt, job_id = %out.job.job_id, "publishing the attempt's job under a new job id (first publication after a mutex grant, or replacing an unclaimed one)");
            publish_all(inner, vec![out]).await;
        }
        Ok(None) => {
            inner.publishing.lock().expect("lock").remove(&key);
        }
        Err(e) => {
            inner.publishing.lock().expect("lock").remove(&key);
            tracing::warn!(error = %e, step_run = %step_run, "re-publishing failed; the sweep will retry");
        }
    }
}

/// Ask an agent to stop a running attempt (SIGTERM to its process group, SIGKILL after a
/// grace).
pub(super) async fn send_cancel(
    inner: &Inner,
    worker: WorkerId,
    step_run: StepRunId,
    attempt: u32,
) {
    let msg = Control::CancelAttempt {
        step_run_id: step_run,
        attempt,
        reason: "the task was cancelled".into(),
    };
    if let Err(e) = inner
        .publisher
        .publish(
            &inner.topology.control_exchange(),
            &worker.to_string(),
            &msg.encode(),
            json_properties(),
        )
        .await
    {
        tracing::debug!(error = %e, %worker, "cancel not delivered (agent not connected?); will retry");
    }
}

/// Give an unclaimed attempt a new job id, voiding the one in circulation (whose message an
/// agent acked without running it), so the sweep or [`super::Orchestrator::republish`] sends
/// it out again. The caller holds the step run's row lock.
pub async fn void_job(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
) -> sqlx::Result<JobId> {
    let job = JobId::new();
    transitions::void(conn, step_run, attempt, job).await?;
    Ok(job)
}
