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
//! announced is stored and checked against its sha256 (see [`crate::artifacts`]).

use crate::artifacts;
use crate::attempts::{self, Locked};
use crate::logs;
use crate::metrics::Metrics;
use crate::orchestrator::Orchestrator;
use crate::outputs;
use crate::quotas::{self, Quota};
use crate::senders::{Attribution, Sender};
use futures::{FutureExt, StreamExt};
use gantry_shared::amqp::Broker;
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::topology::Topology;
use gantry_shared::wire::{Event, Origin};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sqlx::{PgConnection, PgPool};
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

    /// Fail the attempt of an event that can never be stored, if the event comes from the
    /// attempt's current claimant and the attempt still runs (anything else changes nothing).
    async fn fail_unstorable(
        &self,
        event: &Event,
        sender: &Sender,
        reason: &str,
    ) -> Result<Handled, sqlx::Error> {
        let origin = event.origin();
        let mut tx = self.db.begin().await?;
        let Some(locked) = attempts::lock(&mut tx, origin.step_run_id, origin.attempt).await?
        else {
            return Ok(Handled::Done(None, None));
        };
        let claimant = self
            .attribution
            .worker(sender, origin.worker_id, || locked.claimant_builtin)
            .ok()
            .filter(|w| locked.is_claimant(origin.job_id, *w));
        let Some(claimant) = claimant.filter(|_| locked.state == "Running") else {
            return Ok(Handled::Done(None, None));
        };
        self.finish(
            &mut tx,
            &locked,
            origin.step_run_id,
            origin.attempt,
            "Failed",
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        // Its script has no reason to go on: stop it (what it sends later is stale).
        self.orchestrator
            .cancel_running(claimant, origin.step_run_id, origin.attempt)
            .await;
        let release = match (&locked.mutex, locked.mutex_token) {
            (Some(mutex), Some(token)) => Some(Release {
                mutex: mutex.clone(),
                step_run: origin.step_run_id,
                attempt: origin.attempt,
                token: token as u64,
            }),
            _ => None,
        };
        Ok(Handled::Done(Some(locked.task()), release))
    }

    async fn handle(&self, event: &Event, sender: &Sender) -> Result<Handled, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let handled = self.handle_in(&mut tx, event, sender).await?;
        tx.commit().await?;
        Ok(handled)
    }

    /// Store one event in the caller's transaction; what to do after the commit comes back.
    async fn handle_in(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        sender: &Sender,
    ) -> Result<Handled, sqlx::Error> {
        let origin = event.origin();
        let stale_as = |reason: String| Stale {
            origin,
            kind: event.kind(),
            reason,
            sender: self.attribution.user_of(sender),
        };
        let Some(locked) = attempts::lock(&mut *tx, origin.step_run_id, origin.attempt).await?
        else {
            stale_as("no such attempt".into()).record(&mut *tx).await?;
            return Ok(Handled::Done(None, None));
        };
        let worker = match self
            .attribution
            .worker(sender, origin.worker_id, || locked.claimant_builtin)
        {
            Ok(w) => w,
            Err(why) => {
                stale_as(why).record(&mut *tx).await?;
                return Ok(Handled::Done(None, None));
            }
        };
        if !locked.is_claimant(origin.job_id, worker) {
            stale_as("not from the attempt's current claimant".into())
                .record(&mut *tx)
                .await?;
            return Ok(Handled::Done(None, None));
        }
        let live = locked.state == "Running";
        let mut kick = None;
        match event {
            Event::StepWaiting(w) => {
                if live {
                    let r = sqlx::query(
                        "UPDATE step_runs SET state = 'Waiting', waiting_for = $3
                         WHERE id = $1 AND attempt = $2 AND state = 'Running'",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(logs::storable(&w.waiting_for).as_ref())
                    .execute(&mut *tx)
                    .await?;
                    if r.rows_affected() == 1 {
                        logs::append_system(
                            &mut *tx,
                            locked.task(),
                            Some((origin.step_run_id, origin.attempt)),
                            &format!(
                                "Step {} waiting for {}",
                                locked.step_name,
                                logs::storable(&w.waiting_for)
                            ),
                        )
                        .await?;
                    }
                }
            }
            Event::StepStarted(e) => {
                if live {
                    // Both rows are locked already: one statement for the two updates (the
                    // step was `Waiting` only if its script said so before it started). The
                    // agent's clock is believed only between the claim and now: what decides
                    // how long a step has run (its lease stops past its timeout) must not be
                    // an agent's say.
                    sqlx::query(
                        "WITH a AS (UPDATE attempts
                                    SET started_at = LEAST(GREATEST($3, started_at), now())
                                    WHERE step_run_id = $1 AND attempt = $2)
                         UPDATE step_runs SET state = 'Running', waiting_for = NULL
                         WHERE id = $1 AND attempt = $2 AND state = 'Waiting'",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(e.started_at)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Event::LogBatch(b) => {
                let first_seq = i64::try_from(b.first_seq).unwrap_or(i64::MAX);
                let end =
                    first_seq.saturating_add(i64::try_from(b.lines.len()).unwrap_or(i64::MAX));
                if !live {
                    if end > locked.lines_stored {
                        stale_as("lines for an attempt that has ended".into())
                            .record(&mut *tx)
                            .await?;
                    }
                } else if !self.charge_log(&mut *tx, &locked, b).await? {
                    self.over_quota(&mut *tx, &locked, origin, worker, Quota::Log)
                        .await?;
                    kick = Some(locked.task());
                } else {
                    let stored = logs::apply_batch(
                        &mut *tx,
                        locked.task(),
                        origin.step_run_id,
                        origin.attempt,
                        locked.lines_stored,
                        first_seq,
                        &b.lines,
                    )
                    .await?;
                    if stored != locked.lines_stored {
                        self.metrics.observe_log_batch(
                            stored.saturating_sub(locked.lines_stored).max(0) as u64,
                        );
                        sqlx::query(
                            "UPDATE attempts SET lines_stored = $3 WHERE step_run_id = $1 AND attempt = $2",
                        )
                        .bind(origin.step_run_id.0)
                        .bind(origin.attempt as i32)
                        .bind(stored)
                        .execute(&mut *tx)
                        .await?;
                    }
                    if let Some(count) = locked.line_count
                        && locked.outcome.is_some()
                        && stored >= count
                        && self
                            .try_finish(&mut *tx, &locked, origin, Now::locked(&locked, stored))
                            .await?
                    {
                        kick = Some(locked.task());
                    }
                }
            }
            Event::OutputVariable(o) => {
                if let (true, false, Some(value)) = (live, o.sensitive, o.value.as_deref()) {
                    outputs::store_plain(
                        &mut *tx,
                        &self.secrets,
                        &locked,
                        origin.step_run_id,
                        origin.attempt,
                        &o.name,
                        value,
                    )
                    .await?;
                } else if live {
                    sqlx::query(
                        "INSERT INTO output_variables (step_run_id, attempt, name, value, sensitive)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (step_run_id, attempt, name)
                         DO UPDATE SET value = EXCLUDED.value, sensitive = EXCLUDED.sensitive",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(logs::storable(&o.name).as_ref())
                    .bind(if o.sensitive {
                        None
                    } else {
                        logs::storable_opt(o.value.as_deref())
                    })
                    .bind(o.sensitive)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Event::Progress(p) => {
                if live {
                    sqlx::query(
                        "UPDATE attempts SET progress_percent = $3, progress_message = $4
                         WHERE step_run_id = $1 AND attempt = $2",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(i16::from(p.percentage))
                    .bind(logs::storable(&p.message).as_ref())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Event::ArtifactChunk(c) => {
                if live {
                    let announced = locked.outcome.is_some();
                    let limit = self.limits.artifact_bytes;
                    let stored =
                        artifacts::store_chunk(&mut *tx, locked.task(), c, announced, limit)
                            .await?;
                    if stored == artifacts::Chunk::OverQuota {
                        self.over_quota(&mut *tx, &locked, origin, worker, Quota::Artifacts)
                            .await?;
                        kick = Some(locked.task());
                    } else if stored == artifacts::Chunk::New && announced {
                        // A chunk that arrived after StepFinished (a redelivery): it may be
                        // the last one the attempt waited for.
                        artifacts::settle(
                            &mut *tx,
                            locked.task(),
                            origin.step_run_id,
                            origin.attempt,
                        )
                        .await?;
                        let now = Now::locked(&locked, locked.lines_stored);
                        if self.try_finish(&mut *tx, &locked, origin, now).await? {
                            kick = Some(locked.task());
                        }
                    }
                } else {
                    let stored: Option<(i64,)> = sqlx::query_as(
                        "SELECT 1::bigint FROM artifact_chunks k JOIN artifacts a ON a.id = k.artifact_id
                         WHERE a.step_run_id = $1 AND a.attempt = $2 AND a.idx = $3 AND k.seq = $4",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(c.artifact as i32)
                    .bind(i64::try_from(c.seq).unwrap_or(i64::MAX))
                    .fetch_optional(&mut *tx)
                    .await?;
                    if stored.is_none() {
                        stale_as("a chunk for an attempt that has ended".into())
                            .record(&mut *tx)
                            .await?;
                    }
                }
            }
            Event::StepFinished(f) => {
                if live && locked.outcome.is_none() {
                    sqlx::query(
                        "UPDATE attempts SET outcome = $3, exit_code = $4, error = $5,
                             line_count = $6, finished_at = $7
                         WHERE step_run_id = $1 AND attempt = $2",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(f.outcome.as_str())
                    .bind(f.exit_code)
                    .bind(logs::storable_opt(f.error.as_deref()))
                    .bind(i64::try_from(f.line_count).unwrap_or(i64::MAX))
                    .bind(f.finished_at)
                    .execute(&mut *tx)
                    .await?;
                    artifacts::announce(
                        &mut *tx,
                        locked.task(),
                        origin.step_run_id,
                        origin.attempt,
                        &f.artifacts,
                    )
                    .await?;
                    // With none announced, `announce` has just removed every artifact row of
                    // the attempt: nothing to settle, nothing pending.
                    if !f.artifacts.is_empty() {
                        artifacts::settle(
                            &mut *tx,
                            locked.task(),
                            origin.step_run_id,
                            origin.attempt,
                        )
                        .await?;
                    }
                    let now = Now {
                        outcome: Some(f.outcome.as_str().to_owned()),
                        line_count: Some(i64::try_from(f.line_count).unwrap_or(i64::MAX)),
                        lines_stored: locked.lines_stored,
                        exit_code: f.exit_code,
                        error: logs::storable_opt(f.error.as_deref()).map(|e| e.into_owned()),
                        no_artifacts: f.artifacts.is_empty(),
                    };
                    if self.try_finish(&mut *tx, &locked, origin, now).await? {
                        kick = Some(locked.task());
                    }
                }
            }
        }
        // An attempt that ended here gives its mutex back (once the caller has committed),
        // under the token the dispatcher recorded for it.
        let release = match (&kick, &locked.mutex, locked.mutex_token) {
            (Some(_), Some(mutex), Some(token)) => Some(Release {
                mutex: mutex.clone(),
                step_run: origin.step_run_id,
                attempt: origin.attempt,
                token: token as u64,
            }),
            _ => None,
        };
        Ok(Handled::Done(kick, release))
    }

    /// Conclude the attempt if its `StepFinished` is stored, all its lines are, and none of
    /// its artifacts is still receiving. A corrupt artifact fails an attempt that would
    /// otherwise succeed. `now` is the attempt's row as this transaction has left it. Returns
    /// true if the attempt ended.
    async fn try_finish(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        origin: &Origin,
        now: Now,
    ) -> sqlx::Result<bool> {
        let Now {
            outcome,
            line_count,
            lines_stored,
            exit_code,
            error,
            no_artifacts,
        } = now;
        let (Some(outcome), Some(line_count)) = (outcome, line_count) else {
            return Ok(false);
        };
        if lines_stored < line_count {
            return Ok(false);
        }
        let (receiving, corrupt) = if no_artifacts {
            (0, Vec::new())
        } else {
            artifacts::pending(conn, origin.step_run_id, origin.attempt).await?
        };
        if receiving > 0 {
            return Ok(false);
        }
        let (outcome, override_error) = if !corrupt.is_empty() && outcome == "Success" {
            (
                "Failed".to_owned(),
                Some(format!(
                    "artifact {} did not arrive intact (sha256 mismatch)",
                    corrupt.join(", ")
                )),
            )
        } else {
            (outcome, None)
        };
        let finished = Locked {
            lines_stored,
            line_count: Some(line_count),
            outcome: Some(outcome.clone()),
            exit_code,
            error: override_error.clone().or(error),
            ..locked.clone()
        };
        self.finish(
            conn,
            &finished,
            origin.step_run_id,
            origin.attempt,
            &outcome,
            override_error.as_deref(),
        )
        .await?;
        Ok(true)
    }

    async fn finish(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        step_run: StepRunId,
        attempt: u32,
        outcome: &str,
        error: Option<&str>,
    ) -> sqlx::Result<()> {
        if let Some(started) = locked.started_at {
            let secs = (chrono::Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics.observe_step_duration(secs);
        }
        attempts::conclude(
            conn,
            locked,
            step_run,
            attempt,
            outcome,
            error,
            self.retry_base,
        )
        .await
    }
}

/// The attempt's error when one of its events can never be stored.
fn unstorable_reason(kind: &str, e: &sqlx::Error) -> String {
    let what = match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    };
    let what = crate::logs::storable(&what).into_owned();
    format!("a {kind} event from its agent could not be stored: {what}")
}

impl ResultConsumer {
    /// Count a live attempt's new log bytes against `limits.task_log_bytes`; false (nothing
    /// counted) when the batch would pass it.
    async fn charge_log(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        b: &gantry_shared::wire::LogBatch,
    ) -> sqlx::Result<bool> {
        let bytes = quotas::new_log_bytes(b.first_seq as i64, locked.lines_stored, &b.lines);
        let limit = self.limits.task_log_bytes;
        quotas::charge(conn, locked.task(), Quota::Log, bytes, limit).await
    }

    /// Fail a live attempt that went past a quota, and ask its agent to stop the script.
    async fn over_quota(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        origin: &Origin,
        worker: gantry_shared::ids::WorkerId,
        quota: Quota,
    ) -> sqlx::Result<()> {
        let limit = match quota {
            Quota::Log => self.limits.task_log_bytes,
            Quota::Artifacts => self.limits.artifact_bytes,
        };
        let (step_run, attempt) = (origin.step_run_id, origin.attempt);
        quotas::fail_attempt(
            conn,
            locked,
            step_run,
            attempt,
            quota,
            limit,
            self.retry_base,
        )
        .await?;
        // Its further events are stale once this commits; the cancel only saves the work.
        let orchestrator = self.orchestrator.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            orchestrator.cancel_running(worker, step_run, attempt).await;
        });
        Ok(())
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

/// The attempt's row as the current transaction has left it (what [`ResultConsumer::try_finish`]
/// needs), known without reading it again.
struct Now {
    outcome: Option<String>,
    line_count: Option<i64>,
    lines_stored: i64,
    exit_code: Option<i32>,
    error: Option<String>,
    /// True when the attempt is known to have no artifact rows.
    no_artifacts: bool,
}

impl Now {
    /// As locked, with `lines_stored` as this transaction stored it.
    fn locked(locked: &Locked, lines_stored: i64) -> Self {
        Self {
            outcome: locked.outcome.clone(),
            line_count: locked.line_count,
            lines_stored,
            exit_code: locked.exit_code,
            error: locked.error.clone(),
            no_artifacts: false,
        }
    }
}

/// An event kept apart: it changes nothing but this row.
struct Stale<'a> {
    origin: &'a Origin,
    kind: &'static str,
    reason: String,
    /// The broker user that sent it, if it had one.
    sender: Option<String>,
}

impl Stale<'_> {
    async fn record(self, conn: &mut PgConnection) -> sqlx::Result<()> {
        let o = self.origin;
        tracing::info!(step_run = %o.step_run_id, attempt = o.attempt, job_id = %o.job_id, worker = %o.worker_id, sender = self.sender.as_deref().unwrap_or("-"), kind = self.kind, reason = %self.reason, "keeping a stale event apart");
        sqlx::query(
            "INSERT INTO stale_events (step_run_id, attempt, job_id, worker_id, kind, reason, sender)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(o.step_run_id.0)
        .bind(o.attempt as i32)
        .bind(o.job_id.0)
        .bind(o.worker_id.0)
        .bind(self.kind)
        .bind(&self.reason)
        .bind(&self.sender)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
