//! # The result consumer
//!
//! Consumes `<ns>.results` and persists each event idempotently, then acks it. Nothing is
//! acked before it is committed: while PostgreSQL is away the consumer holds its deliveries
//! and retries, so the broker keeps everything. A body that fails validation is rejected
//! without requeue, which dead-letters it into `<ns>.dead`. An event that can never be stored
//! (PostgreSQL refuses it with an error that is not transient) fails its attempt with the
//! reason and is dead-lettered too; text from events is stored with U+0000 as U+FFFD.
//!
//! Whatever has arrived (up to 64 events, of any attempts) is stored in one transaction, in
//! the lock order: first the tasks this node owns among them (id order), then each event's
//! step run and attempt, in (step run, attempt) order, each attempt's events as they came.
//! A task whose attempt ended is advanced in the same transaction when this node owns it
//! (its next attempt, or its end), and woken for its owner otherwise: one commit for the
//! batch, then one ack. Deliveries come through `gantry_shared::amqp::consume`, which
//! settles each exactly once.
//!
//! Every event names its attempt (`job_id` too) and is attributed to a worker by the broker
//! user that published it (its validated `user_id`, see [`crate::senders`]), never by the
//! `worker_id` in its body alone. An event that does not come from the attempt's current
//! claimant (a voided job, a lost worker's late results, another worker's forgery) is recorded
//! in `stale_events` and changes nothing else. A mutex step's fencing token is the attempt's
//! row, which only the dispatcher writes; events carry none. Redelivered events change nothing
//! either: log lines are keyed by `seq`, outputs by name, artifact chunks by (artifact, seq),
//! and `StepFinished` is a compare-and-set. An attempt becomes final only once its
//! `StepFinished` arrived, all the lines it announced are stored, and every artifact it
//! announced is stored and checked against its sha256 (see [`crate::artifacts`]).//!
//! This file holds the consumer loop (grouping, holding, acking); `events` stores each kind
//! of event, `finish` concludes an attempt once everything it announced is stored, `quota`
//! charges and enforces the per-task storage limits, and `unstorable` fails the attempt of an
//! event that can never be stored.

mod events;
mod finish;
mod quota;
mod unstorable;

use unstorable::unstorable_reason;

use crate::attempts;
use crate::metrics::Metrics;
use crate::orchestrator::{Orchestrator, TaskRecord};
use crate::outputs;
use crate::senders::{Attribution, Sender};
use gantry_shared::amqp::Broker;
use gantry_shared::amqp::consume::{Incoming, QueueConsumer, Settle, Ticket, settle_all};
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::states::TaskState;
use gantry_shared::topology::Topology;
use gantry_shared::wire::Event;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Unacked result deliveries held at once.
const PREFETCH: u16 = 256;
/// Events stored in one transaction at most.
const BATCH: usize = 64;

/// A delivery, its body decoded once, and who sent it.
struct Received {
    ticket: Ticket,
    event: Result<Event, String>,
    sender: Sender,
}

impl Received {
    fn new(incoming: Incoming, attribution: &Attribution) -> Self {
        let event = Event::decode(&incoming.message.data).map_err(|e| e.to_string());
        let sender = attribution.sender(incoming.message.user_id());
        Self {
            ticket: incoming.ticket,
            event,
            sender,
        }
    }

    /// The attempt the event belongs to, if the body is an event.
    fn attempt(&self) -> Option<(StepRunId, u32)> {
        self.event
            .as_ref()
            .ok()
            .map(|e| (e.origin().step_run_id, e.origin().attempt))
    }
}

#[derive(Clone)]
pub struct ResultConsumer {
    pub db: PgPool,
    pub locks: crate::locks::Locks,
    pub topology: Topology,
    pub broker: Broker,
    pub orchestrator: Orchestrator,
    pub metrics: Arc<Metrics>,
    pub retry_base: Duration,
    pub attribution: Attribution,
    pub secrets: crate::secrets::SecretBox,
    pub limits: gantry_shared::config::LimitsSettings,
}

enum Handled {
    /// Stored (or a harmless duplicate); the task may need a look; a mutex may be free.
    Done(Option<TaskId>, Option<Release>),
}

/// A mutex to release once the attempt's end is committed.
struct Release {
    mutex: String,
    step_run: StepRunId,
    attempt: u32,
    token: u64,
}

impl ResultConsumer {
    pub fn spawn(self, cancel: CancellationToken) {
        let me = Arc::new(self);
        crate::supervise::spawn("results", cancel.clone(), move || {
            let (me, cancel) = (me.clone(), cancel.clone());
            async move {
                me.run(cancel).await;
                Ok(())
            }
        });
    }

    async fn run(&self, cancel: CancellationToken) {
        let mut consumer = QueueConsumer::new(
            self.broker.clone(),
            self.topology.results_queue(),
            "gantry-dispatcher-results",
            PREFETCH,
            cancel.clone(),
        );
        // Whatever has already arrived, of any attempt, is stored in one transaction: one
        // commit for many events.
        while let Some(batch) = consumer.next_batch(BATCH).await {
            let batch = batch
                .into_iter()
                .map(|i| Received::new(i, &self.attribution))
                .collect();
            if !self.process_batch(batch, &cancel).await {
                return;
            }
        }
    }

    /// Store a batch of deliveries in one transaction, then ack them. A malformed body is
    /// dead-lettered at once; if one event cannot be stored (an error that is not
    /// transient), each is stored on its own instead, so that only that one is
    /// dead-lettered. Returns false on shutdown.
    async fn process_batch(&self, batch: Vec<Received>, cancel: &CancellationToken) -> bool {
        let (mut good, bad): (Vec<Received>, Vec<Received>) =
            batch.into_iter().partition(|r| r.event.is_ok());
        for r in bad {
            if let Err(e) = &r.event {
                tracing::warn!(error = %e, "dead-lettering a malformed result message");
            }
            r.ticket.settle(Settle::Reject).await;
        }
        if good.is_empty() {
            return true;
        }
        // The lock order: attempts in (step run, attempt) order; a stable sort keeps each
        // attempt's events in the order they arrived.
        good.sort_by_key(|r| r.attempt());
        let mut delay = Duration::from_millis(100);
        let mut advance = true;
        loop {
            match self.store(&good, advance).await {
                Ok(stored) => {
                    self.settle(good, stored).await;
                    return true;
                }
                Err(Failed::Advance(task, e)) => {
                    // Nothing of the batch committed: store it again, waking its tasks for
                    // the orchestrator instead of advancing them here.
                    tracing::warn!(%task, error = %e, "could not advance a task after its attempt ended; storing its events again and waking it instead");
                    advance = false;
                }
                Err(Failed::Db(e)) if crate::db::is_transient(&e) => {
                    if !hold(&mut delay, &e, cancel).await {
                        return false;
                    }
                }
                Err(Failed::Db(_)) if good.len() > 1 => {
                    for r in good {
                        if !Box::pin(self.process_batch(vec![r], cancel)).await {
                            return false;
                        }
                    }
                    return true;
                }
                Err(Failed::Db(e)) => {
                    let r = good.pop().expect("one");
                    return self.unstorable(r, &e, cancel).await;
                }
            }
        }
    }

    /// Store events in one transaction: the tasks this node owns first (their rows locked,
    /// in id order), then each event; a task whose attempt ended is advanced in the same
    /// transaction when this node owns it (and `advance`), and woken for its owner otherwise.
    /// An advance that fails fails the whole transaction (no savepoint: it would cost two
    /// round trips on every conclusion); the caller then stores the batch again without
    /// advancing.
    async fn store(&self, batch: &[Received], advance: bool) -> Result<Stored, Failed> {
        let mut tx = self.db.begin().await?;
        let step_runs: Vec<uuid::Uuid> = batch
            .iter()
            .filter_map(|r| r.attempt().map(|(s, _)| s.0))
            .collect();
        let mut owned = if advance {
            lock_owned_tasks(&mut tx, &step_runs, self.orchestrator.node().id).await?
        } else {
            HashMap::new()
        };
        let plain_outputs: Vec<uuid::Uuid> = batch
            .iter()
            .filter_map(|r| match &r.event {
                Ok(Event::OutputVariable(o))
                    if !o.sensitive
                        && o.value.as_deref().is_some_and(outputs::may_carry_secret) =>
                {
                    Some(o.origin.step_run_id.0)
                }
                _ => None,
            })
            .collect();
        if !plain_outputs.is_empty() {
            outputs::lock_for_plain(&mut tx, &plain_outputs).await?;
        }
        let mut handled = Vec::with_capacity(batch.len());
        let mut ended: Vec<TaskId> = Vec::new();
        for r in batch {
            let (Ok(event), sender) = (&r.event, &r.sender) else {
                continue;
            };
            let h = self.handle_in(&mut tx, event, sender).await?;
            let Handled::Done(kick, _) = &h;
            if let Some(t) = kick
                && !ended.contains(t)
            {
                ended.push(*t);
            }
            handled.push(h);
        }
        let mut advanced = Vec::new();
        for task in ended {
            let Some(record) = owned.remove(&task) else {
                attempts::wake(&mut tx, task).await?;
                continue;
            };
            match self.orchestrator.advance_in(&mut tx, record).await {
                Ok(done) => advanced.push(done),
                Err(e) => {
                    drop(tx);
                    for done in advanced {
                        self.orchestrator.rolled_back(done);
                    }
                    return Err(Failed::Advance(task, e));
                }
            }
        }
        if let Err(e) = tx.commit().await {
            for done in advanced {
                self.orchestrator.rolled_back(done);
            }
            return Err(e.into());
        }
        Ok(Stored { handled, advanced })
    }

    /// After the commit: ack the deliveries (one multiple ack when they are everything the
    /// channel has out), publish what the advances started, give back mutexes.
    async fn settle(&self, batch: Vec<Received>, stored: Stored) {
        // The next jobs first: they are what the next steps wait for.
        for done in stored.advanced {
            self.orchestrator.committed(done);
        }
        // Not acked (the channel broke): redelivered later, and handling them again changes
        // nothing.
        settle_all(batch.into_iter().map(|r| r.ticket).collect(), Settle::Ack).await;
        for h in stored.handled {
            self.follow_up(h);
        }
    }

    /// What a committed change asks for beyond its task: its mutex given back.
    fn follow_up(&self, handled: Handled) {
        let Handled::Done(_, release) = handled;
        if let Some(r) = release {
            // The agent released it already when its step ended; this covers an agent that
            // could not (the lease would expire anyway). Either way the next waiter may go
            // now that the attempt's end is stored.
            let locks = self.locks.clone();
            tokio::spawn(async move {
                locks
                    .release(&r.mutex, r.step_run, r.attempt, r.token)
                    .await;
                locks.wake();
            });
        }
    }

    /// An event that can never be stored (an error that is not transient: a value PostgreSQL
    /// refuses, such as a data exception of class 22): waiting for it would leave its attempt
    /// running for ever and the events after it stuck, so the attempt fails with the reason,
    /// and the delivery is dead-lettered. Returns false on shutdown.
    async fn unstorable(
        &self,
        received: Received,
        e: &sqlx::Error,
        cancel: &CancellationToken,
    ) -> bool {
        let Ok(event) = &received.event else {
            return true;
        };
        let reason = unstorable_reason(event.kind(), e);
        tracing::error!(error = %e, kind = event.kind(), step_run = %event.origin().step_run_id, attempt = event.origin().attempt, "cannot store a result event; failing its attempt and dead-lettering it");
        let mut delay = Duration::from_millis(100);
        loop {
            match self.fail_unstorable(event, &received.sender, &reason).await {
                Ok(handled) => {
                    self.follow_up(handled);
                    break;
                }
                Err(e) if crate::db::is_transient(&e) => {
                    if !hold(&mut delay, &e, cancel).await {
                        return false;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not fail the attempt of an event that cannot be stored");
                    break;
                }
            }
        }
        received.ticket.settle(Settle::Reject).await;
        true
    }
}

/// Why a batch's transaction did not commit.
enum Failed {
    Db(sqlx::Error),
    /// The advance of this task failed (the transaction is rolled back).
    Advance(TaskId, anyhow::Error),
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

/// What a batch's transaction did.
struct Stored {
    handled: Vec<Handled>,
    advanced: Vec<crate::orchestrator::Advanced>,
}

/// Lock the tasks of these step runs that this node owns, in id order (the first locks of
/// the lock order), and return them for an advance.
async fn lock_owned_tasks(
    tx: &mut sqlx::PgConnection,
    step_runs: &[uuid::Uuid],
    node: uuid::Uuid,
) -> sqlx::Result<HashMap<TaskId, TaskRecord>> {
    let rows: Vec<(uuid::Uuid, String, TaskState, serde_json::Value)> = sqlx::query_as(
        "SELECT t.id, t.name, t.state, t.variables FROM tasks t
         WHERE t.id IN (SELECT s.task_id FROM step_runs s WHERE s.id = ANY($1))
           AND t.owner_node = $2
         ORDER BY t.id FOR UPDATE OF t",
    )
    .bind(step_runs)
    .bind(node)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, state, variables)| {
            let id = TaskId(id);
            (
                id,
                TaskRecord {
                    id,
                    name,
                    state,
                    variables,
                },
            )
        })
        .collect())
}

/// After a transient error: wait `delay` (doubled each time, at most 5 s) before the next
/// try, holding the deliveries meanwhile. False if the consumer is shutting down.
async fn hold(delay: &mut Duration, e: &sqlx::Error, cancel: &CancellationToken) -> bool {
    if *delay >= Duration::from_secs(2) {
        tracing::warn!(error = %e, "PostgreSQL unavailable; holding results until it is back");
    }
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {}
        _ = cancel.cancelled() => return false,
    }
    *delay = (*delay * 2).min(Duration::from_secs(5));
    true
}
