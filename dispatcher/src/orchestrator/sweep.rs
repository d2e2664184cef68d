//! The sweep: every `dispatcher.sweep_interval_secs`, renew this node's leases, take free
//! tasks, and look at everything a lost kick or a crash may have left behind (wake-ups,
//! retries due, unconfirmed or stranded jobs, cancels not yet delivered, unsent e-mails).

use super::{Inner, REPUBLISH_AFTER, publish, schedule, server_steps};
use crate::nodes;
use gantry_shared::ids::{StepRunId, TaskId, WorkerId};
use std::sync::Arc;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub(super) async fn sweep_once(inner: &Arc<Inner>, permits: &Arc<Semaphore>) -> anyhow::Result<()> {
    // Renew this node's leases and take free tasks first; then only tasks this node owns, or
    // that nobody holds, are worth advancing here.
    let taken = nodes::renew_and_take(&inner.db, &inner.node).await?;
    // Wake-ups of this node's tasks, and of tasks that have ended. A free task's wake-up waits
    // until some node takes it (above, oldest first, within the cap): advancing it now would
    // only find the node full, and with a deep backlog that is thousands of wasted advances.
    let woken: Vec<Uuid> = sqlx::query_scalar(
        "SELECT w.task_id FROM task_wakeups w JOIN tasks t ON t.id = w.task_id
         WHERE t.owner_node = $1
            OR (t.owner_node IS NULL AND t.state IN ('Success', 'Failed', 'Cancelled'))
         LIMIT 10000",
    )
    .bind(inner.node.id)
    .fetch_all(&inner.db)
    .await?;
    let due: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT s.task_id FROM step_runs s JOIN tasks t ON t.id = s.task_id
         WHERE s.not_before IS NOT NULL AND s.not_before <= now() AND s.state = 'Pending'
           AND t.owner_node = $1",
    )
    .bind(inner.node.id)
    .fetch_all(&inner.db)
    .await?;
    for t in taken.into_iter().map(|t| t.0).chain(due) {
        schedule::schedule(inner, permits, TaskId(t), false);
    }
    // A woken task is usually already being advanced, or waiting for a permit, because of
    // the kick that came with its wake-up: advance it again only if its wake-up row is still
    // there by then (with a deep backlog, most are gone and each check is one statement
    // instead of a whole advance).
    for t in woken {
        schedule::schedule(inner, permits, TaskId(t), true);
    }
    let unconfirmed: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT step_run_id, attempt FROM attempts
         WHERE state = 'Pending' AND pending_since < now() - $1::interval LIMIT 1000",
    )
    .bind(REPUBLISH_AFTER)
    .fetch_all(&inner.db)
    .await?;
    // Running steps of cancelled tasks: tell their agents (again; a control message sent
    // while an agent was reconnecting is lost, and cancelling twice is harmless).
    let cancelling: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
        "SELECT a.worker_id, a.step_run_id, a.attempt FROM attempts a
         JOIN step_runs s ON s.id = a.step_run_id JOIN tasks t ON t.id = s.task_id
         WHERE t.state = 'Cancelling' AND a.state = 'Running' AND a.worker_id IS NOT NULL",
    )
    .fetch_all(&inner.db)
    .await?;
    for (worker, step_run, attempt) in cancelling {
        publish::send_cancel(inner, WorkerId(worker), StepRunId(step_run), attempt as u32).await;
    }
    // Jobs waiting where nobody will take them: in the queue of a task's worker that is no
    // longer enabled and healthy, or in the default pool's queue after its last worker left
    // (the built-in worker takes over). Re-publishing re-routes them and voids the old job.
    let stranded: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt FROM attempts a
         LEFT JOIN workers w ON w.id = a.routed_worker
         JOIN step_runs s ON s.id = a.step_run_id
         LEFT JOIN pools p ON p.id = s.pool_id
         WHERE a.state = 'Queued' AND (
             (a.routed_worker IS NOT NULL
              AND (w.id IS NULL OR NOT w.enabled OR w.health NOT IN ('Healthy', 'HasWarnings')))
          OR (p.is_default AND a.routing_key = 'pool.' || p.slug
              AND (SELECT builtin_worker_enabled FROM settings)
              AND NOT EXISTS (SELECT 1 FROM worker_pools wp JOIN workers w2 ON w2.id = wp.worker_id
                              WHERE wp.pool_id = p.id AND NOT w2.builtin)))
         LIMIT 1000",
    )
    .fetch_all(&inner.db)
    .await?;
    let unconfirmed: Vec<(Uuid, i32)> = unconfirmed.into_iter().chain(stranded).collect();
    // E-mails whose sending was interrupted (this node or the task's previous owner died).
    let unsent: Vec<(Uuid, i32, Uuid, Vec<String>, String, String)> = sqlx::query_as(
        "SELECT e.step_run_id, e.attempt, s.task_id, e.to_addrs, e.subject, e.body FROM emails e
         JOIN attempts a ON a.step_run_id = e.step_run_id AND a.attempt = e.attempt
         JOIN step_runs s ON s.id = e.step_run_id JOIN tasks t ON t.id = s.task_id
         WHERE a.state = 'Running' AND e.sent_at IS NULL AND e.error IS NULL
           AND t.owner_node = $1 AND a.started_at < now() - interval '5 seconds'
         LIMIT 100",
    )
    .bind(inner.node.id)
    .fetch_all(&inner.db)
    .await?;
    for (step_run, attempt, task, to, subject, body) in unsent {
        server_steps::spawn_email(
            inner,
            crate::email::Outgoing {
                task: TaskId(task),
                step_run: StepRunId(step_run),
                attempt: attempt as u32,
                to,
                subject,
                body,
            },
        );
    }
    for (step_run, attempt) in unconfirmed {
        let key = (StepRunId(step_run), attempt as u32);
        if inner.publishing.lock().expect("lock").contains(&key) {
            continue;
        }
        publish::republish(inner, key.0, key.1, None).await;
    }
    Ok(())
}
