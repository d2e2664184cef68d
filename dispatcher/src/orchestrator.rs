//! # The orchestrator
//!
//! Decides what happens next in each task and publishes the jobs. It is driven by wake-ups:
//! a kick in memory (a new task, a concluded attempt on this node) for speed, and the
//! `task_wakeups` table, swept every `dispatcher.sweep_interval_secs`, for durability: a
//! crash between "an attempt ended" and "the next step was published" delays the task by one
//! sweep and loses nothing.
//!
//! With several dispatcher nodes, a node advances only the tasks it owns (`nodes`): the
//! owner is checked under the task's row lock, and the sweep first renews this node's leases
//! and takes free tasks up to `dispatcher.task_cap`.
//!
//! One `advance` of a task runs in one transaction holding the task's row lock:
//!
//! 1. steps are grouped (a step and the `parallel` steps after it form a group);
//! 2. the first group that has not ended is the current one; each of its `Pending` steps is
//!    skipped (its condition says so, given whether an earlier group failed) or started: a
//!    new attempt, `Pending`, with a fresh `job_id`;
//! 3. when every group has ended, the task ends: `Failed` if any step failed, else `Success`.
//!
//! After the commit the jobs are published (persistent, mandatory, confirmed); a confirmed
//! job's attempt becomes `Queued`. A job whose confirmation never came stays `Pending`, and
//! the sweep re-publishes it under a new `job_id`, which voids the old one: whichever copy
//! an agent claims first is the only one that runs.

pub mod plan;

use crate::attempts;
use crate::logs;
use crate::nodes::{self, Node};
use crate::store::tasks::is_terminal;
use anyhow::Context;
use chrono::{DateTime, Utc};
use gantry_shared::amqp::{Broker, PublishError, Publisher, json_properties};
use gantry_shared::ids::{JobId, StepRunId, TaskId, WorkerId};
use gantry_shared::process::{Condition, StepKind, StepSpec, group_ranges};
use gantry_shared::template;
use gantry_shared::topology::Topology;
use gantry_shared::wire::{Control, Job};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Tasks advanced at once by one node.
const CONCURRENT_ADVANCES: usize = 16;
/// An unconfirmed attempt older than this, not being published by this node, is re-published.
const REPUBLISH_AFTER: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    db: PgPool,
    topology: Topology,
    broker: Broker,
    publisher: Publisher,
    /// Tasks to advance; `true` marks a kick from another node's `NOTIFY`, worth a decision
    /// only while the task still has a wake-up row.
    kick_tx: mpsc::UnboundedSender<(TaskId, bool)>,
    /// Attempts this node is publishing right now; the sweep leaves them alone.
    publishing: Mutex<HashSet<(StepRunId, u32)>>,
    /// Tasks being advanced, and whether another kick arrived meanwhile (`Some(if_woken)`).
    advancing: Mutex<HashMap<TaskId, Option<bool>>>,
    /// Wakes the mutex loop when an attempt starts waiting for a mutex.
    locks_wake: Arc<tokio::sync::Notify>,
    /// Delay before a failed step's next attempt (doubled per attempt).
    retry_base: Duration,
    /// Sends e-mail steps.
    mailer: crate::email::Mailer,
    /// This dispatcher node: it advances only the tasks it owns (see `nodes`).
    node: Node,
    /// Whether the built-in worker may run user code (see `builtin::runs_user_code`).
    builtin_runs_code: bool,
}

/// A job ready to go out.
struct Outgoing {
    job: Job,
    /// `job` encoded: the bytes whose sha256 the attempt records.
    body: Vec<u8>,
    routing_key: String,
    pool_slug: Option<String>,
}

/// Where an attempt's job goes, or why it cannot go yet.
enum Route {
    /// Publish with this routing key; `worker` when it goes to one worker's own queue.
    Go {
        routing_key: String,
        pool_slug: Option<String>,
        worker: Option<Uuid>,
    },
    /// The pool has no worker that may take it: the step waits, saying why.
    Wait(String),
    /// It can never run as things are configured.
    Fail(String),
}

/// Read only where the built-in worker could take the step: most steps never ask.
async fn builtin_enabled(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT builtin_worker_enabled FROM settings")
        .fetch_one(conn)
        .await
}

/// Choose where an attempt goes (see ARCHITECTURE.md, "Choosing a worker"):
///
/// - `location = "server"`: the built-in workers' queue, unless they are disabled;
/// - the default pool with no registered worker at all: the built-in workers' queue;
/// - the task's worker for the pool (chosen by its first claim there) while it is enabled
///   and healthy: that worker's own queue;
/// - otherwise the pool's queue, if any of its workers is enabled and `Healthy` or
///   `HasWarnings`; if none is, the step waits.
async fn route(
    conn: &mut PgConnection,
    task: TaskId,
    step: &StepState,
    builtin_runs_code: bool,
) -> sqlx::Result<Route> {
    let server = Route::Go {
        routing_key: Topology::SERVER_ROUTING_KEY.to_owned(),
        pool_slug: None,
        worker: None,
    };
    let (Some(pool_id), Some(slug)) = (step.pool_id, step.pool_slug.clone()) else {
        return Ok(if !builtin_runs_code {
            Route::Fail(
                "it runs on the server (location = \"server\"), and with production = true the built-in worker runs user code only as an unprivileged builtin_worker.user, which is not set"
                    .into(),
            )
        } else if builtin_enabled(conn).await? {
            server
        } else {
            Route::Fail(
                "it runs on the server (location = \"server\") and the built-in worker is disabled (builtin_worker_enabled = false)"
                    .into(),
            )
        });
    };
    let pool_name = step.pool_name.clone().unwrap_or_default();
    let workers: Vec<(Uuid, bool, String)> = sqlx::query_as(
        "SELECT w.id, w.enabled, w.health FROM worker_pools wp JOIN workers w ON w.id = wp.worker_id
         WHERE wp.pool_id = $1 AND NOT w.builtin",
    )
    .bind(pool_id)
    .fetch_all(&mut *conn)
    .await?;
    let usable =
        |enabled: bool, health: &str| enabled && matches!(health, "Healthy" | "HasWarnings");
    if workers.is_empty() && step.pool_is_default == Some(true) && builtin_runs_code {
        return Ok(if builtin_enabled(conn).await? {
            server
        } else {
            Route::Fail(format!(
                "the default pool {pool_name} has no registered worker and the built-in worker is disabled (builtin_worker_enabled = false)"
            ))
        });
    }
    let sticky: Option<Uuid> = sqlx::query_scalar(
        "SELECT worker_id FROM task_pool_workers WHERE task_id = $1 AND pool_id = $2",
    )
    .bind(task.0)
    .bind(pool_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(w) = sticky {
        if workers.iter().any(|(id, e, h)| *id == w && usable(*e, h)) {
            return Ok(Route::Go {
                routing_key: Topology::worker_routing_key(w),
                pool_slug: None,
                worker: Some(w),
            });
        }
        // It left the pool, was disabled or is not healthy: choose again.
        sqlx::query("DELETE FROM task_pool_workers WHERE task_id = $1 AND pool_id = $2")
            .bind(task.0)
            .bind(pool_id)
            .execute(&mut *conn)
            .await?;
    }
    if workers.iter().any(|(_, e, h)| usable(*e, h)) {
        return Ok(Route::Go {
            routing_key: Topology::pool_routing_key(&slug),
            pool_slug: Some(slug),
            worker: None,
        });
    }
    if workers.is_empty() {
        return Ok(Route::Wait(format!("pool {pool_name} has no worker")));
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (_, enabled, health) in &workers {
        let key = if *enabled {
            health.clone()
        } else {
            "disabled".into()
        };
        *counts.entry(key).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    Ok(Route::Wait(format!(
        "pool {pool_name} has no healthy worker: {}",
        summary.join(", ")
    )))
}

/// What `advance` or `republish` does with a routed attempt: the job to publish, if any.
/// A waiting attempt stays `Pending` and unpublished (the sweep looks again every few
/// seconds) until the policy's `no_healthy_worker_timeout_secs`, then fails.
#[allow(clippy::too_many_arguments)]
async fn dispatch_or_wait(
    inner: &Inner,
    tx: &mut PgConnection,
    task: TaskId,
    task_name: &str,
    variables: &serde_json::Value,
    step: &StepState,
    attempt: u32,
    job_id: JobId,
) -> anyhow::Result<Option<Outgoing>> {
    match route(tx, task, step, inner.builtin_runs_code).await? {
        Route::Go {
            routing_key,
            pool_slug,
            worker,
        } => {
            let mut out = build_job(tx, task, task_name, variables, step, attempt, job_id).await?;
            // The sha256 of exactly the bytes that will be published: the claim compares it
            // with what the agent received.
            let body = out.job.encode();
            sqlx::query(
                "UPDATE attempts SET routed_worker = $3, routing_key = $4, no_worker_since = NULL,
                     job_sha256 = $5
                 WHERE step_run_id = $1 AND attempt = $2",
            )
            .bind(step.id)
            .bind(attempt as i32)
            .bind(worker)
            .bind(&routing_key)
            .bind(gantry_shared::wire::body_sha256(&body))
            .execute(&mut *tx)
            .await?;
            out.body = body;
            // Only a step that was waiting for a worker is `Waiting` here: mutex waits end
            // before their attempt is routed.
            if step.state == "Waiting" {
                sqlx::query(
                    "UPDATE step_runs SET state = 'Pending', waiting_for = NULL
                     WHERE id = $1 AND state = 'Waiting'",
                )
                .bind(step.id)
                .execute(&mut *tx)
                .await?;
                logs::append_system(
                    tx,
                    task,
                    Some((StepRunId(step.id), attempt)),
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
            sqlx::query("UPDATE step_runs SET state = 'Waiting', waiting_for = $2 WHERE id = $1")
                .bind(step.id)
                .bind(&why)
                .execute(&mut *tx)
                .await?;
            if first {
                logs::append_system(
                    tx,
                    task,
                    Some((StepRunId(step.id), attempt)),
                    &format!(
                        "Step {} waits: {why} (it fails if none is healthy within {} s)",
                        step.name,
                        timeout.as_secs()
                    ),
                )
                .await?;
                logs::notify(tx, logs::TASK_CHANNEL, task).await?;
            }
            Ok(None)
        }
        Route::Fail(why) => {
            fail_attempt(inner, tx, task, step, attempt, &why).await?;
            Ok(None)
        }
    }
}

async fn fail_attempt(
    inner: &Inner,
    tx: &mut PgConnection,
    task: TaskId,
    step: &StepState,
    attempt: u32,
    why: &str,
) -> sqlx::Result<()> {
    let step_run = StepRunId(step.id);
    if let Some(locked) = attempts::lock(tx, step_run, attempt).await? {
        sqlx::query("UPDATE step_runs SET waiting_for = NULL WHERE id = $1")
            .bind(step.id)
            .execute(&mut *tx)
            .await?;
        attempts::conclude(
            tx,
            &locked,
            step_run,
            attempt,
            "Failed",
            Some(why),
            inner.retry_base,
        )
        .await?;
        attempts::wake(tx, task).await?;
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct StepState {
    id: Uuid,
    name: String,
    spec: Json<StepSpec>,
    state: String,
    attempt: i32,
    not_before: Option<DateTime<Utc>>,
    pool_id: Option<Uuid>,
    pool_slug: Option<String>,
    pool_name: Option<String>,
    pool_is_default: Option<bool>,
    attempt_state: Option<String>,
    reason: Option<String>,
}

impl Orchestrator {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        db: PgPool,
        topology: Topology,
        broker: Broker,
        sweep_every: Duration,
        locks_wake: Arc<tokio::sync::Notify>,
        retry_base: Duration,
        node: Node,
        mailer: crate::email::Mailer,
        builtin_runs_code: bool,
        cancel: CancellationToken,
    ) -> Self {
        let (kick_tx, kick_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            publisher: Publisher::new(broker.clone()),
            db,
            topology,
            broker,
            kick_tx,
            publishing: Mutex::new(HashSet::new()),
            advancing: Mutex::new(HashMap::new()),
            locks_wake,
            retry_base,
            node,
            mailer,
            builtin_runs_code,
        });
        let kicks = inner.kick_tx.clone();
        nodes::spawn_wake_listener(
            inner.db.clone(),
            move |task| {
                let _ = kicks.send((task, true));
            },
            cancel.clone(),
        );
        let kick_rx = Arc::new(tokio::sync::Mutex::new(kick_rx));
        let looping = inner.clone();
        crate::supervise::spawn("orchestrator", cancel.clone(), move || {
            let (inner, kick_rx, cancel) = (looping.clone(), kick_rx.clone(), cancel.clone());
            async move {
                run(inner, &mut *kick_rx.lock().await, sweep_every, cancel).await;
                Ok(())
            }
        });
        Self { inner }
    }

    /// This node's identity and task cap.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Look at a task again soon.
    pub fn kick(&self, task: TaskId) {
        schedule_kick(&self.inner, task);
    }

    /// Tell an agent to stop a running attempt.
    pub async fn cancel_running(&self, worker: WorkerId, step_run: StepRunId, attempt: u32) {
        send_cancel(&self.inner, worker, step_run, attempt).await
    }

    /// Void an unclaimed attempt's job and publish it again (a refused claim that should run
    /// elsewhere, a returned message).
    pub async fn republish(&self, step_run: StepRunId, attempt: u32) {
        republish(&self.inner, step_run, attempt).await
    }
}

async fn run(
    inner: Arc<Inner>,
    kicks: &mut mpsc::UnboundedReceiver<(TaskId, bool)>,
    sweep_every: Duration,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_ADVANCES));
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some((task, if_woken)) = kicks.recv() => schedule(&inner, &permits, task, if_woken),
            _ = sweep.tick() => {
                if let Err(e) = sweep_once(&inner, &permits).await {
                    tracing::warn!(error = %e, "orchestrator sweep failed; will retry");
                }
            }
            _ = cancel.cancelled() => {
                nodes::release_all(&inner.db, &inner.node).await;
                return;
            }
        }
    }
}

/// Run `advance` for a task, at most once at a time per task on this node; a kick that
/// arrives meanwhile makes it run once more afterwards. With `if_woken` (a `NOTIFY`, which
/// every node hears, the waker's own included, usually after its in-process kick has already
/// done the work) the decision is skipped unless the task still has a wake-up row.
fn schedule(inner: &Arc<Inner>, permits: &Arc<Semaphore>, task: TaskId, if_woken: bool) {
    {
        let mut advancing = inner.advancing.lock().expect("lock poisoned");
        if let Some(again) = advancing.get_mut(&task) {
            *again = Some(again.unwrap_or(true) && if_woken);
            return;
        }
        advancing.insert(task, None);
    }
    let inner = inner.clone();
    let permits = permits.clone();
    tokio::spawn(async move {
        let mut if_woken = if_woken;
        loop {
            let permit = permits.acquire().await.expect("semaphore never closed");
            advance_and_publish(&inner, task, if_woken).await;
            drop(permit);
            let mut advancing = inner.advancing.lock().expect("lock poisoned");
            match advancing.get_mut(&task) {
                Some(again @ Some(_)) => if_woken = again.take().unwrap_or(false),
                _ => {
                    advancing.remove(&task);
                    return;
                }
            }
        }
    });
}

async fn sweep_once(inner: &Arc<Inner>, permits: &Arc<Semaphore>) -> anyhow::Result<()> {
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
        schedule(inner, permits, TaskId(t), false);
    }
    // A woken task is usually already being advanced, or waiting for a permit, because of
    // the kick that came with its wake-up: advance it again only if its wake-up row is still
    // there by then (with a deep backlog, most are gone and each check is one statement
    // instead of a whole advance).
    for t in woken {
        schedule(inner, permits, TaskId(t), true);
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
        send_cancel(inner, WorkerId(worker), StepRunId(step_run), attempt as u32).await;
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
        spawn_email(
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
        republish(inner, key.0, key.1).await;
    }
    Ok(())
}

fn schedule_kick(inner: &Inner, task: TaskId) {
    let _ = inner.kick_tx.send((task, false));
}

async fn advance_and_publish(inner: &Arc<Inner>, task: TaskId, if_woken: bool) {
    let mut delay = Duration::from_millis(50);
    let outgoing = loop {
        match advance(inner, task, if_woken).await {
            Ok(out) => break out,
            Err(e)
                if e.downcast_ref::<sqlx::Error>()
                    .is_some_and(crate::db::is_transient) =>
            {
                if delay > Duration::from_secs(2) {
                    // The sweep will come back to it.
                    tracing::warn!(%task, error = %e, "cannot advance task now; leaving it to the sweep");
                    return;
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(%task, error = ?e, "advancing task failed");
                return;
            }
        }
    };
    futures::future::join_all(outgoing.into_iter().map(|o| publish(inner, o))).await;
}

/// One decision step for a task (see the module docs). Returns the jobs to publish.
async fn advance(
    inner: &Arc<Inner>,
    task: TaskId,
    if_woken: bool,
) -> anyhow::Result<Vec<Outgoing>> {
    if !nodes::take_for_advance(&inner.db, &inner.node, task, if_woken).await? {
        return Ok(Vec::new());
    }
    let mut tx = inner.db.begin().await?;
    let row: Option<(String, String, serde_json::Value, Option<Uuid>)> = sqlx::query_as(
        "SELECT name, state, variables, owner_node FROM tasks WHERE id = $1 FOR UPDATE",
    )
    .bind(task.0)
    .fetch_optional(&mut *tx)
    .await?;
    let bump: Option<i64> = sqlx::query_scalar("SELECT bump FROM task_wakeups WHERE task_id = $1")
        .bind(task.0)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((task_name, task_state, variables, owner)) = row else {
        return Ok(Vec::new());
    };
    if !nodes::owns(&inner.node, owner, &task_state) {
        // Another node's task, or a free one this node had no room to take: its wake-up
        // stays for the owner.
        return Ok(Vec::new());
    }
    let mut outgoing = Vec::new();
    let mut emails: Vec<crate::email::Outgoing> = Vec::new();
    let mut wake_locks = false;
    if task_state == "Cancelling" {
        settle_cancel(&mut tx, task, &task_name).await?;
    } else if !is_terminal(&task_state) {
        let mut steps: Vec<StepState> = sqlx::query_as(
            // The attempt is a correlated lookup, not a join: a prepared statement's generic
            // plan, made while the tables were small, would otherwise hash-join a sequential
            // scan of every attempt into each advance, and with a deep backlog that was the
            // dispatcher's main cost.
            "SELECT s.id, s.name, s.spec, s.state, s.attempt, s.not_before, s.reason,
                    s.pool_id, p.slug AS pool_slug, p.name AS pool_name,
                    p.is_default AS pool_is_default,
                    (SELECT a.state FROM attempts a
                     WHERE a.step_run_id = s.id AND a.attempt = s.attempt) AS attempt_state
             FROM step_runs s
             LEFT JOIN pools p ON p.id = s.pool_id
             WHERE s.task_id = $1 ORDER BY s.idx",
        )
        .bind(task.0)
        .fetch_all(&mut *tx)
        .await?;
        let groups = group_ranges(steps.iter().map(|s| s.spec.0.parallel));
        let mut first_failure: Option<String> = None;
        let mut in_progress = false;
        let mut started_any = false;
        for group in groups {
            for i in group.clone() {
                let step = &mut steps[i];
                if step.state != "Pending" {
                    continue;
                }
                let attempt_live = step.attempt > 0
                    && step
                        .attempt_state
                        .as_deref()
                        .is_some_and(|s| !attempts::is_final(s));
                if attempt_live {
                    continue;
                }
                let skip = match (step.spec.0.condition, &first_failure) {
                    (Condition::Success, Some(failed)) => Some(format!(
                        "skipped: an earlier step ({failed}) failed and this step runs only on success"
                    )),
                    (Condition::Failure, None) => Some(
                        "skipped: condition = \"failure\" and no earlier step failed".to_owned(),
                    ),
                    _ => None,
                };
                if let Some(reason) = skip {
                    sqlx::query(
                        "UPDATE step_runs SET state = 'Skipped', reason = $2, not_before = NULL WHERE id = $1",
                    )
                    .bind(step.id)
                    .bind(&reason)
                    .execute(&mut *tx)
                    .await?;
                    logs::append_system(
                        &mut tx,
                        task,
                        Some((StepRunId(step.id), step.attempt as u32)),
                        &format!("Step {} {reason}", step.name),
                    )
                    .await?;
                    step.state = "Skipped".into();
                    continue;
                }
                if step.not_before.is_some_and(|t| t > Utc::now()) {
                    // Waiting out a retry backoff; the sweep brings it back when due.
                    continue;
                }
                if step.spec.0.kind == StepKind::Manual {
                    // The dispatcher's own step: it waits for a decision through the API and
                    // runs nothing anywhere.
                    let (values, sensitive) =
                        visible_values(&mut tx, task, &task_name, &variables, &step.name, 0)
                            .await?;
                    let instructions = render_field(
                        step.spec.0.instructions.as_deref().unwrap_or(""),
                        &values,
                        &sensitive,
                    );
                    sqlx::query(
                        "INSERT INTO approvals (step_run_id, task_id, instructions)
                         VALUES ($1, $2, $3) ON CONFLICT (step_run_id) DO NOTHING",
                    )
                    .bind(step.id)
                    .bind(task.0)
                    .bind(&instructions)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE step_runs SET state = 'Waiting', waiting_for = 'approval',
                             not_before = NULL WHERE id = $1",
                    )
                    .bind(step.id)
                    .execute(&mut *tx)
                    .await?;
                    logs::append_system(
                        &mut tx,
                        task,
                        Some((StepRunId(step.id), 0)),
                        &format!(
                            "Step {name} waits for approval: {instructions}\n  approve: gantry approve {task} {name} [--note TEXT]\n  reject:  gantry reject {task} {name} [--note TEXT]",
                            name = step.name
                        ),
                    )
                    .await?;
                    step.state = "Waiting".into();
                    started_any = true;
                    continue;
                }
                if step.spec.0.kind == StepKind::Email {
                    let attempt = (step.attempt + 1) as u32;
                    if let Some(mail) =
                        prepare_email(&mut tx, task, &task_name, &variables, step, attempt).await?
                    {
                        emails.push(mail);
                    }
                    step.attempt = attempt as i32;
                    step.attempt_state = Some("Running".into());
                    step.state = "Running".into();
                    started_any = true;
                    continue;
                }
                let attempt = (step.attempt + 1) as u32;
                let job_id = JobId::new();
                if let Some(mutex) = step.spec.0.mutex.clone() {
                    // Waits for its mutex before anything is published (see `locks`).
                    sqlx::query(
                        "INSERT INTO attempts (step_run_id, attempt, job_id, state, waiting_since)
                         VALUES ($1, $2, $3, 'Waiting', now())",
                    )
                    .bind(step.id)
                    .bind(attempt as i32)
                    .bind(job_id.0)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "UPDATE step_runs SET attempt = $2, not_before = NULL, state = 'Waiting',
                             waiting_for = $3
                         WHERE id = $1",
                    )
                    .bind(step.id)
                    .bind(attempt as i32)
                    .bind(format!("mutex {mutex}"))
                    .execute(&mut *tx)
                    .await?;
                    step.attempt = attempt as i32;
                    step.attempt_state = Some("Waiting".into());
                    step.state = "Waiting".into();
                    started_any = true;
                    wake_locks = true;
                    continue;
                }
                sqlx::query(
                    "INSERT INTO attempts (step_run_id, attempt, job_id, state) VALUES ($1, $2, $3, 'Pending')",
                )
                .bind(step.id)
                .bind(attempt as i32)
                .bind(job_id.0)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE step_runs SET attempt = $2, not_before = NULL, waiting_for = NULL WHERE id = $1",
                )
                .bind(step.id)
                .bind(attempt as i32)
                .execute(&mut *tx)
                .await?;
                step.attempt = attempt as i32;
                step.attempt_state = Some("Pending".into());
                started_any = true;
                let Some(out) = dispatch_or_wait(
                    inner, &mut tx, task, &task_name, &variables, step, attempt, job_id,
                )
                .await?
                else {
                    // Waiting for a worker, or failed: the state is in the database now.
                    let (state, attempt_state): (String, Option<String>) = sqlx::query_as(
                        "SELECT s.state, (SELECT a.state FROM attempts a
                                          WHERE a.step_run_id = s.id AND a.attempt = s.attempt)
                         FROM step_runs s WHERE s.id = $1",
                    )
                    .bind(step.id)
                    .fetch_one(&mut *tx)
                    .await?;
                    step.state = state;
                    step.attempt_state = attempt_state;
                    continue;
                };
                inner
                    .publishing
                    .lock()
                    .expect("lock")
                    .insert((StepRunId(step.id), attempt));
                outgoing.push(out);
            }
            let group_done = steps[group.clone()].iter().all(|s| {
                s.state != "Pending"
                    && !matches!(s.state.as_str(), "Queued" | "Running" | "Waiting")
            });
            if !group_done {
                in_progress = true;
                break;
            }
            for s in &steps[group] {
                if attempts::FAILURE_STATES.contains(&s.state.as_str()) && first_failure.is_none() {
                    first_failure = Some(s.name.clone());
                }
            }
        }
        // `Waiting` while a manual step waits for its decision, `Executing` otherwise.
        let awaiting = in_progress
            && steps
                .iter()
                .any(|s| s.state == "Waiting" && s.spec.0.kind == StepKind::Manual);
        let next_state = match (awaiting, task_state.as_str()) {
            (true, "Waiting") => None,
            (true, _) => Some("Waiting"),
            (false, "Waiting") => Some("Executing"),
            (false, "Queued") if started_any => Some("Executing"),
            _ => None,
        };
        if let Some(next) = next_state.filter(|_| in_progress) {
            sqlx::query(
                "UPDATE tasks SET state = $2, started_at = COALESCE(started_at, now()) WHERE id = $1",
            )
            .bind(task.0)
            .bind(next)
            .execute(&mut *tx)
            .await?;
            logs::notify(&mut tx, logs::TASK_CHANNEL, task).await?;
        }
        if !in_progress {
            let (state, error) = match &first_failure {
                Some(name) => {
                    let reason = steps
                        .iter()
                        .find(|s| &s.name == name)
                        .and_then(|s| s.reason.clone())
                        .unwrap_or_else(|| "failed".into());
                    ("Failed", Some(format!("step {name} {reason}")))
                }
                None => ("Success", None),
            };
            sqlx::query(
                "UPDATE tasks SET state = $2, error = $3, finished_at = now(),
                     started_at = COALESCE(started_at, now())
                 WHERE id = $1",
            )
            .bind(task.0)
            .bind(state)
            .bind(&error)
            .execute(&mut *tx)
            .await?;
            let line = match &error {
                Some(e) => format!("Task {task_name} failed: {e}"),
                None => format!("Task {task_name} succeeded"),
            };
            logs::append_system(&mut tx, task, None, &line).await?;
            logs::notify(&mut tx, logs::TASK_CHANNEL, task).await?;
        }
    }
    if let Some(bump) = bump {
        sqlx::query("DELETE FROM task_wakeups WHERE task_id = $1 AND bump = $2")
            .bind(task.0)
            .bind(bump)
            .execute(&mut *tx)
            .await?;
    }
    if let Err(e) = tx.commit().await {
        for o in &outgoing {
            inner
                .publishing
                .lock()
                .expect("lock")
                .remove(&(o.job.step_run_id, o.job.attempt));
        }
        return Err(e.into());
    }
    if wake_locks {
        inner.locks_wake.notify_one();
    }
    for m in emails {
        spawn_email(inner, m);
    }
    Ok(outgoing)
}

/// A task being cancelled: steps that never started are `Cancelled`; once no attempt is
/// live any more, the task is `Cancelled`.
async fn settle_cancel(conn: &mut PgConnection, task: TaskId, task_name: &str) -> sqlx::Result<()> {
    let never_started: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE step_runs s SET state = 'Cancelled', reason = 'cancelled before it started',
             waiting_for = NULL, not_before = NULL
         WHERE s.task_id = $1 AND s.state IN ('Pending', 'Waiting')
           AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.step_run_id = s.id
                           AND a.attempt = s.attempt
                           AND a.state IN ('Waiting', 'Pending', 'Queued', 'Running'))
         RETURNING s.id, s.name",
    )
    .bind(task.0)
    .fetch_all(&mut *conn)
    .await?;
    for (id, name) in never_started {
        logs::append_system(
            conn,
            task,
            Some((StepRunId(id), 0)),
            &format!("Step {name} cancelled before it started"),
        )
        .await?;
    }
    let live: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
                        WHERE s.task_id = $1 AND a.state IN ('Waiting', 'Pending', 'Queued', 'Running'))",
    )
    .bind(task.0)
    .fetch_one(&mut *conn)
    .await?;
    if !live {
        sqlx::query(
            "UPDATE tasks SET state = 'Cancelled', error = 'cancelled', finished_at = now(),
                 started_at = COALESCE(started_at, now())
             WHERE id = $1",
        )
        .bind(task.0)
        .execute(&mut *conn)
        .await?;
        logs::append_system(conn, task, None, &format!("Task {task_name} cancelled")).await?;
        logs::notify(conn, logs::TASK_CHANNEL, task).await?;
    }
    Ok(())
}

/// Every value a step may reference that may travel in clear (task variables, earlier steps'
/// outputs, `Gantry.*`), and the names of the sensitive ones, which never do.
async fn visible_values(
    conn: &mut PgConnection,
    task: TaskId,
    task_name: &str,
    task_variables: &serde_json::Value,
    step_name: &str,
    attempt: u32,
) -> sqlx::Result<(BTreeMap<String, String>, Vec<String>)> {
    let mut variables: BTreeMap<String, String> = task_variables
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let outputs: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT s.name, o.name, o.value, o.sensitive FROM output_variables o
         JOIN step_runs s ON s.id = o.step_run_id AND o.attempt = s.attempt
         WHERE s.task_id = $1",
    )
    .bind(task.0)
    .fetch_all(&mut *conn)
    .await?;
    let mut sensitive_names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM task_secrets WHERE task_id = $1 ORDER BY name")
            .bind(task.0)
            .fetch_all(&mut *conn)
            .await?;
    for (step_name, name, value, sensitive) in outputs {
        let key = format!("Steps.{step_name}.Output.{name}");
        if sensitive {
            sensitive_names.push(key);
        } else {
            variables.insert(key, value.unwrap_or_default());
        }
    }
    variables.insert("Gantry.Task.Id".into(), task.to_string());
    variables.insert("Gantry.Task.Name".into(), task_name.to_owned());
    variables.insert("Gantry.Step.Name".into(), step_name.to_owned());
    variables.insert("Gantry.Step.Attempt".into(), attempt.to_string());
    Ok((variables, sensitive_names))
}

/// `#{...}` in a field the dispatcher itself uses (instructions, an e-mail): values
/// substituted, sensitive ones as `********`, unknown ones left as written.
pub(crate) fn render_field(
    text: &str,
    values: &BTreeMap<String, String>,
    sensitive: &[String],
) -> String {
    template::render(text, |name| {
        Some(if sensitive.iter().any(|s| s == name) {
            gantry_shared::mask::MASK.to_owned()
        } else {
            values
                .get(name)
                .cloned()
                .unwrap_or_else(|| format!("#{{{name}}}"))
        })
    })
    .unwrap_or_else(|_| text.to_owned())
}

/// An e-mail step reached: its attempt (`Running` on the dispatcher) and its rendered message,
/// stored before anything is sent.
async fn prepare_email(
    tx: &mut PgConnection,
    task: TaskId,
    task_name: &str,
    task_variables: &serde_json::Value,
    step: &StepState,
    attempt: u32,
) -> sqlx::Result<Option<crate::email::Outgoing>> {
    let spec = &step.spec.0;
    let (values, sensitive) =
        visible_values(tx, task, task_name, task_variables, &step.name, attempt).await?;
    let render = |t: &str| render_field(t, &values, &sensitive);
    let to: Vec<String> = spec
        .to
        .iter()
        .map(|a| render(a).trim().to_owned())
        .collect();
    let subject = render(spec.subject.as_deref().unwrap_or(""));
    let body = render(spec.body.as_deref().unwrap_or(""));
    sqlx::query(
        "INSERT INTO attempts (step_run_id, attempt, job_id, state, worker_name, started_at)
         VALUES ($1, $2, $3, 'Running', 'dispatcher (e-mail)', now())",
    )
    .bind(step.id)
    .bind(attempt as i32)
    .bind(JobId::new().0)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE step_runs SET attempt = $2, state = 'Running', not_before = NULL, waiting_for = NULL
         WHERE id = $1",
    )
    .bind(step.id)
    .bind(attempt as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO emails (step_run_id, attempt, to_addrs, subject, body) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(step.id)
    .bind(attempt as i32)
    .bind(&to)
    .bind(&subject)
    .bind(&body)
    .execute(&mut *tx)
    .await?;
    logs::append_system(
        tx,
        task,
        Some((StepRunId(step.id), attempt)),
        &format!(
            "Step {} sends an e-mail to {}: {subject}",
            step.name,
            to.join(", ")
        ),
    )
    .await?;
    Ok(Some(crate::email::Outgoing {
        task,
        step_run: StepRunId(step.id),
        attempt,
        to,
        subject,
        body,
    }))
}

/// Send an e-mail step's message in the background (at most once at a time per attempt on
/// this node) and end its attempt with the outcome.
fn spawn_email(inner: &Arc<Inner>, m: crate::email::Outgoing) {
    let key = (m.step_run, m.attempt);
    if !inner.publishing.lock().expect("lock").insert(key) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        match crate::email::send_and_record(&inner.db, &inner.mailer, &m, inner.retry_base).await {
            Ok(task) => schedule_kick(&inner, task),
            Err(e) => {
                tracing::warn!(error = %e, step_run = %m.step_run, "could not record an e-mail's outcome; the sweep will send it again")
            }
        }
        inner.publishing.lock().expect("lock").remove(&key);
    });
}

/// The job for an attempt: the step's script and every non-sensitive value it may reference.
async fn build_job(
    conn: &mut PgConnection,
    task: TaskId,
    task_name: &str,
    task_variables: &serde_json::Value,
    step: &StepState,
    attempt: u32,
    job_id: JobId,
) -> sqlx::Result<Outgoing> {
    let spec = &step.spec.0;
    let (mut variables, sensitive_names) =
        visible_values(conn, task, task_name, task_variables, &step.name, attempt).await?;
    if let Some(pool) = &step.pool_name {
        variables.insert("Gantry.WorkerPool.Name".into(), pool.clone());
    }
    let job = Job {
        job_id,
        task_id: task,
        task_name: task_name.to_owned(),
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
    Ok(Outgoing {
        body: Vec::new(),
        routing_key: slug
            .as_deref()
            .map(Topology::pool_routing_key)
            .unwrap_or_else(|| Topology::SERVER_ROUTING_KEY.to_owned()),
        pool_slug: slug,
        job,
    })
}

/// Publish a job; on confirmation mark its attempt `Queued`. Failures leave the attempt
/// `Pending` for the sweep to re-publish.
async fn publish(inner: &Arc<Inner>, out: Outgoing) {
    let key = (out.job.step_run_id, out.job.attempt);
    let body = out.body;
    let exchange = inner.topology.jobs_exchange();
    let props = json_properties().with_message_id(out.job.job_id.to_string().into());
    let mut result = inner
        .publisher
        .publish(&exchange, &out.routing_key, &body, props.clone())
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
            .publish(&exchange, &out.routing_key, &body, props)
            .await;
    }
    match result {
        Ok(()) => {
            let r = async {
                let mut tx = inner.db.begin().await?;
                attempts::mark_queued(&mut tx, key.0, key.1, out.job.job_id).await?;
                tx.commit().await
            }
            .await;
            if let Err(e) = r {
                // The job is on its way; the claim accepts Pending too, so this only delays
                // the Queued mark, which the next claim or sweep supersedes.
                tracing::warn!(error = %e, step_run = %key.0, "could not mark attempt Queued");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, step_run = %key.0, attempt = key.1, "publishing a job failed; the sweep will publish it again");
        }
    }
    inner.publishing.lock().expect("lock").remove(&key);
}

/// Give an unclaimed attempt a new job id (voiding the old one) and publish it.
async fn republish(inner: &Arc<Inner>, step_run: StepRunId, attempt: u32) {
    let key = (step_run, attempt);
    if !inner.publishing.lock().expect("lock").insert(key) {
        return;
    }
    let built = async {
        let mut tx = inner.db.begin().await?;
        let task: Option<(Uuid, String, serde_json::Value)> = sqlx::query_as(
            "SELECT t.id, t.name, t.variables FROM tasks t JOIN step_runs s ON s.task_id = t.id
             WHERE s.id = $1",
        )
        .bind(step_run.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((task_id, task_name, variables)) = task else {
            return Ok::<_, anyhow::Error>(None);
        };
        let step: StepState = sqlx::query_as(
            "SELECT s.id, s.name, s.spec, s.state, s.attempt, s.not_before, s.reason,
                    s.pool_id, p.slug AS pool_slug, p.name AS pool_name,
                    p.is_default AS pool_is_default,
                    (SELECT a.state FROM attempts a
                     WHERE a.step_run_id = s.id AND a.attempt = s.attempt) AS attempt_state
             FROM step_runs s
             LEFT JOIN pools p ON p.id = s.pool_id
             WHERE s.id = $1 FOR UPDATE OF s",
        )
        .bind(step_run.0)
        .fetch_one(&mut *tx)
        .await
        .context("loading step for re-publication")?;
        let job_id = JobId::new();
        let r = sqlx::query(
            "UPDATE attempts SET job_id = $3, state = 'Pending', pending_since = now()
             WHERE step_run_id = $1 AND attempt = $2 AND state IN ('Pending', 'Queued')",
        )
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(job_id.0)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 || step.attempt != attempt as i32 {
            return Ok(None);
        }
        sqlx::query("UPDATE step_runs SET state = 'Pending' WHERE id = $1 AND state = 'Queued'")
            .bind(step_run.0)
            .execute(&mut *tx)
            .await?;
        let out = dispatch_or_wait(
            inner,
            &mut tx,
            TaskId(task_id),
            &task_name,
            &variables,
            &step,
            attempt,
            job_id,
        )
        .await?;
        tx.commit().await?;
        if out.is_none() {
            // Waiting for a worker (the sweep looks again), or failed (the task moves on).
            schedule_kick(inner, TaskId(task_id));
        }
        Ok(out)
    }
    .await;
    match built {
        Ok(Some(out)) => {
            tracing::info!(step_run = %step_run, attempt, job_id = %out.job.job_id, "publishing the attempt's job under a new job id (first publication after a mutex grant, or replacing an unclaimed one)");
            // `publish` removes the key when done.
            publish(inner, out).await;
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
async fn send_cancel(inner: &Inner, worker: WorkerId, step_run: StepRunId, attempt: u32) {
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
/// agent acked without running it), so the sweep or [`Orchestrator::republish`] sends it out
/// again. The caller holds the step run's row lock.
pub async fn void_job(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE attempts SET job_id = $3, state = 'Pending', pending_since = now()
         WHERE step_run_id = $1 AND attempt = $2 AND state IN ('Pending', 'Queued')",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(JobId::new().0)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE step_runs SET state = 'Pending' WHERE id = $1 AND state = 'Queued'")
        .bind(step_run.0)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
