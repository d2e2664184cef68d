//! # The result consumer
//!
//! Consumes `<ns>.results` and persists each event idempotently, then acks it. Nothing is
//! acked before it is committed: while PostgreSQL is away the consumer holds its deliveries
//! and retries, so the broker keeps everything. A body that fails validation is rejected
//! without requeue, which dead-letters it into `<ns>.dead`. An event that can never be stored
//! (PostgreSQL refuses it with an error that is not transient) fails its attempt with the
//! reason and is dead-lettered too; text from events is stored with U+0000 as U+FFFD.
//!
//! Consecutive events of one attempt that have already arrived (a stream of log batches, a
//! step's last batch and its `StepFinished`) are stored in one transaction: the rows locked are
//! those of a single event, and one commit replaces many. Each is still acked only after it.
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

use crate::metrics::Metrics;
use crate::orchestrator::Orchestrator;
use crate::senders::{Attribution, Sender};
use futures::{FutureExt, StreamExt};
use gantry_shared::amqp::Broker;
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::topology::Topology;
use gantry_shared::wire::Event;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Unacked result deliveries held at once.
const PREFETCH: u16 = 256;
/// Events of one attempt stored in one transaction at most.
const GROUP: usize = 64;

/// A delivery, its body decoded once, and who sent it.
struct Received {
    delivery: lapin::message::Delivery,
    event: Result<Event, String>,
    sender: Sender,
}

impl Received {
    fn new(delivery: lapin::message::Delivery, attribution: &Attribution) -> Self {
        let event = Event::decode(&delivery.data).map_err(|e| e.to_string());
        let sender = attribution.sender(delivery.properties.user_id().as_ref().map(|u| u.as_str()));
        Self {
            delivery,
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
        loop {
            let conn = tokio::select! {
                c = self.broker.connected() => c,
                _ = cancel.cancelled() => return,
            };
            let consumer = async {
                let ch = conn.create_channel().await?;
                ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
                let consumer = ch
                    .basic_consume(
                        self.topology.results_queue().into(),
                        "gantry-dispatcher-results".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>(consumer)
            }
            .await;
            let mut consumer = match consumer {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume results; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // A delivery read ahead that did not belong to the group before it.
            let mut ahead: Option<Received> = None;
            let mut broken = false;
            while !broken {
                let first = match ahead.take() {
                    Some(d) => d,
                    None => {
                        let next = tokio::select! {
                            n = consumer.next() => n,
                            _ = cancel.cancelled() => return,
                        };
                        match next {
                            Some(Ok(d)) => Received::new(d, &self.attribution),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "result consumer interrupted; re-consuming");
                                break;
                            }
                            None => break,
                        }
                    }
                };
                // Events of the same attempt that have already arrived behind it (a step's
                // last log batch and its StepFinished, a stream of log batches) are stored
                // in one transaction: the same rows locked as for one event, so no new lock
                // order, and one commit instead of several.
                let mut group = vec![first];
                let attempt = group[0].attempt();
                while attempt.is_some() && group.len() < GROUP {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => {
                            let d = Received::new(d, &self.attribution);
                            if d.attempt() == attempt {
                                group.push(d);
                            } else {
                                ahead = Some(d);
                                break;
                            }
                        }
                        Some(_) => {
                            broken = true;
                            break;
                        }
                        None => break,
                    }
                }
                if !self.process_group(&group, &cancel).await {
                    return;
                }
            }
            // Deliveries of a broken channel are redelivered; handling them again changes
            // nothing.
            drop(ahead);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Store a group of deliveries of one attempt in one transaction, then ack them. If one
    /// of them cannot be stored (a malformed body, an error that is not transient), each is
    /// handled on its own instead, so that only that one is dead-lettered. Returns false on
    /// shutdown.
    async fn process_group(&self, group: &[Received], cancel: &CancellationToken) -> bool {
        if group.len() == 1 {
            return self.process(&group[0], cancel).await;
        }
        // Only events reach a group of several (see `run`).
        let events: Vec<(&Event, &Sender)> = group
            .iter()
            .filter_map(|r| r.event.as_ref().ok().map(|e| (e, &r.sender)))
            .collect();
        let mut delay = Duration::from_millis(100);
        let done = loop {
            let r = async {
                let mut tx = self.db.begin().await?;
                let mut done = Vec::with_capacity(events.len());
                for (ev, sender) in &events {
                    done.push(self.handle_in(&mut tx, ev, sender).await?);
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(done)
            }
            .await;
            match r {
                Ok(done) => break done,
                Err(e) if crate::db::is_transient(&e) => {
                    if !hold(&mut delay, &e, cancel).await {
                        return false;
                    }
                }
                Err(_) => return self.process_each(group, cancel).await,
            }
        };
        for (r, handled) in group.iter().zip(done) {
            self.after_commit(&r.delivery, handled).await;
        }
        true
    }

    async fn process_each(&self, group: &[Received], cancel: &CancellationToken) -> bool {
        for d in group {
            if !self.process(d, cancel).await {
                return false;
            }
        }
        true
    }

    /// Once an event's transaction committed: give its mutex back, ack it, wake its task.
    async fn after_commit(&self, delivery: &lapin::message::Delivery, handled: Handled) {
        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
            // Redelivered later; handling it again changes nothing.
            tracing::debug!(error = %e, "ack failed");
        }
        self.follow_up(handled);
    }

    /// What a committed change asks for: its mutex given back, its task woken.
    fn follow_up(&self, handled: Handled) {
        let Handled::Done(kick, release) = handled;
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
        if let Some(task) = kick {
            self.orchestrator.kick(task);
        }
    }

    /// Handle one delivery until it is stored or dead-lettered. Returns false on shutdown.
    async fn process(&self, received: &Received, cancel: &CancellationToken) -> bool {
        let delivery = &received.delivery;
        let event = match &received.event {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "dead-lettering a malformed result message");
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                return true;
            }
        };
        let mut delay = Duration::from_millis(100);
        loop {
            match self.handle(event, &received.sender).await {
                Ok(handled) => {
                    self.after_commit(delivery, handled).await;
                    return true;
                }
                Err(e) if crate::db::is_transient(&e) => {
                    if !hold(&mut delay, &e, cancel).await {
                        return false;
                    }
                }
                Err(e) => {
                    // It can never be stored (an error that is not transient: a value
                    // PostgreSQL refuses, such as a data exception of class 22): waiting for
                    // it would leave its attempt running for ever and the events after it
                    // stuck, so the attempt fails with the reason, and the delivery is
                    // dead-lettered.
                    let reason = unstorable_reason(event.kind(), &e);
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
                    let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                    return true;
                }
            }
        }
    }
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
