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
//! One advance of a task runs in one transaction holding the task's row lock: it loads the
//! task's step runs, asks [`plan::plan`] (a pure function) what to skip, start or settle, and
//! [`apply`] carries that out, routing each new job with [`route::route`] (pure too). After
//! the commit the jobs are published (persistent, mandatory, confirmed); a confirmed job's
//! attempt becomes `Queued`. A job whose confirmation never came stays `Pending`, and the
//! sweep re-publishes it under a new `job_id`, which voids the old one: whichever copy an
//! agent claims first is the only one that runs.
//!
//! Files, by concern: `schedule` (one advance at a time per task, kicks), `advance` (load,
//! plan, apply, commit), `plan` (pure decisions), `apply` (carrying a plan out), `route`
//! (pure routing and the facts it needs), `dispatch` (a routed attempt: job, wait or
//! failure), `publish` (jobs out, confirms, re-publication, cancels), `sweep` (the periodic
//! look at everything a lost kick might leave behind), `server_steps` (manual and e-mail
//! steps, which the dispatcher runs itself).

mod advance;
mod apply;
mod dispatch;
mod facts;
pub mod plan;
mod publish;
pub mod route;
mod schedule;
mod server_steps;
mod sweep;

pub use publish::void_job;

use crate::nodes::{self, Node};
use gantry_shared::amqp::{Broker, Publisher};
use gantry_shared::ids::{StepRunId, TaskId, WorkerId};
use gantry_shared::topology::Topology;
use gantry_shared::wire::Job;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

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
    /// Confirmed jobs on their way to their `Queued` mark (`publish::flush_confirmed`).
    confirmed_tx: mpsc::UnboundedSender<Confirmed>,
}

/// A confirmed job: its attempt, its job id, when the broker confirmed it.
type Confirmed = (
    StepRunId,
    u32,
    gantry_shared::ids::JobId,
    chrono::DateTime<chrono::Utc>,
);

/// An advance made in another transaction, waiting for its commit.
#[must_use = "pass it to Orchestrator::committed or rolled_back"]
pub struct Advanced(apply::Applied);

pub use advance::TaskRecord;

/// A job ready to go out.
struct Outgoing {
    job: Job,
    /// `job` encoded: the bytes whose sha256 the attempt records.
    body: Vec<u8>,
    routing_key: String,
    pool_slug: Option<String>,
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
        notifier: &crate::notify::Notifier,
        cancel: CancellationToken,
    ) -> Self {
        let (kick_tx, kick_rx) = mpsc::unbounded_channel();
        let (confirmed_tx, confirmed_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            confirmed_tx,
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
        notifier.subscribe_wake(move |task| {
            let _ = kicks.send((task, true));
        });
        let confirmed_rx = Arc::new(tokio::sync::Mutex::new(confirmed_rx));
        let flushing = inner.clone();
        crate::supervise::spawn("queued-marks", cancel.clone(), move || {
            let (inner, rx) = (flushing.clone(), confirmed_rx.clone());
            async move {
                publish::flush_confirmed(inner, &mut *rx.lock().await).await;
                Ok(())
            }
        });
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

    /// Tell an agent to stop a running attempt.
    pub async fn cancel_running(&self, worker: WorkerId, step_run: StepRunId, attempt: u32) {
        publish::send_cancel(&self.inner, worker, step_run, attempt).await
    }

    /// Reserve room on this node for a task being created here: it is then created owned by
    /// this node and advanced in its creating transaction ([`Orchestrator::advance_in`]).
    pub async fn reserve_new(&self) -> bool {
        nodes::reserve(&self.inner.db, &self.inner.node).await
    }

    /// Once the creating transaction of a [`Orchestrator::reserve_new`] place ended: whether
    /// the task was created.
    pub async fn reserved(&self, created: bool) {
        nodes::reserved(&self.inner.node, created).await
    }

    /// Advance a task this node owns inside the caller's transaction, which holds the task's
    /// row lock (or created the task). Pass the result to [`Orchestrator::committed`] after
    /// the commit, or to [`Orchestrator::rolled_back`].
    pub async fn advance_in(
        &self,
        tx: &mut sqlx::PgConnection,
        task: advance::TaskRecord,
    ) -> anyhow::Result<Advanced> {
        Ok(Advanced(advance::decide(&self.inner, tx, &task).await?))
    }

    /// After the commit of an [`Orchestrator::advance_in`]: publish its jobs (in the
    /// background), send its e-mails, wake the mutex loop.
    pub fn committed(&self, done: Advanced) {
        let outgoing = done.0.after_commit(&self.inner);
        if !outgoing.is_empty() {
            let inner = self.inner.clone();
            tokio::spawn(async move { publish::publish_all(&inner, outgoing).await });
        }
    }

    /// The transaction of an [`Orchestrator::advance_in`] did not commit: nothing of it
    /// happened.
    pub fn rolled_back(&self, done: Advanced) {
        done.0.give_back(&self.inner);
    }

    /// Void an unclaimed attempt's job and publish it again (a refused claim that should run
    /// elsewhere, a returned message).
    pub async fn republish(&self, step_run: StepRunId, attempt: u32) {
        publish::republish(&self.inner, step_run, attempt, None).await
    }

    /// Publish an attempt whose job the caller voided and committed ([`void_job`]) under
    /// that new job id, without voiding it again.
    pub async fn publish_voided(
        &self,
        step_run: StepRunId,
        attempt: u32,
        job: gantry_shared::ids::JobId,
    ) {
        publish::republish(&self.inner, step_run, attempt, Some(job)).await
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
            Some((task, if_woken)) = kicks.recv() => schedule::schedule(&inner, &permits, task, if_woken),
            _ = sweep.tick() => {
                if let Err(e) = sweep::sweep_once(&inner, &permits).await {
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
