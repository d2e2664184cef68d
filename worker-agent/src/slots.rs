//! # Slots: how many jobs an agent holds, and from which queues
//!
//! An agent never holds more running steps plus unstarted deliveries than
//! `max_concurrent_steps`. Quorum queues refuse a channel-wide prefetch and a live consumer's
//! prefetch cannot change, so every queue is consumed with prefetch 1 and the agent keeps at
//! most as many consumers as it has free slots:
//!
//! ```text
//!   running + reserving consumers <= max_concurrent_steps
//! ```
//!
//! A consumer reserves one slot: it may receive one delivery at any moment. When its
//! delivery's claim is granted the step starts (running + 1); if that leaves no room, the
//! consumer is cancelled *before* the delivery is acked (prefetch 1: the broker cannot send
//! it another one meanwhile), and its reservation ends. When a step ends, a consumer is
//! started again on a queue that has none, the worker's own queue first, then the pools,
//! preferring queues that hold messages. With fewer free slots than queues, a consumer idling
//! on an empty queue is moved once a second to a queue with waiting jobs.
//!
//! Each delivery is claimed over the API before anything runs (see `api::claim`): refused
//! claims are acked and dropped (but a 403, a job of a pool this worker does not serve, is
//! given back to its queue, which is then left alone for [`REFUSED_BACKOFF`]), granted ones
//! run, and a claim whose answer was lost is repeated with the same claim id until the
//! dispatcher answers.

use crate::api::{Api, ApiError};
use crate::outbox::Outbox;
use crate::runner::{self, StepContext};
use futures::StreamExt;
use gantry_shared::ids::{ClaimId, JobId, StepRunId, WorkerId};
use gantry_shared::wire::{Job, RunningAttempt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod probes;
use probes::{MISSING_RETRY, move_idle_consumers, needs_probe, probe_depths, probe_missing};

/// How long a queue the broker refused is left alone (unless the queue list changes first).
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(30);

/// What every step needs from the agent, fixed for its lifetime.
pub struct AgentContext {
    pub api: Api,
    pub outbox: Outbox,
    /// Asks for the configuration to be read again.
    pub reconfigure: Arc<Notify>,
    pub worker_id: WorkerId,
    pub worker_name: String,
    pub work_root: PathBuf,
    pub keep_work_dirs: bool,
    /// Who scripts run as (see [`crate::step_users`]).
    pub step_users: Arc<crate::step_users::StepUsers>,
    /// Fault injection for tests: close the broker connection after the first granted claim,
    /// before its ack (`GANTRY_AGENT_FAULT=drop-connection-before-ack`).
    pub fault_drop_before_ack: std::sync::atomic::AtomicBool,
    /// Set when the dispatcher refuses this agent's credential.
    pub fatal: CancellationToken,
}

struct Consumer {
    queue: String,
    /// May still receive a delivery.
    reserves: bool,
    /// Holds a delivery it has not resolved yet.
    busy: bool,
    stop: CancellationToken,
}

struct RunningStep {
    step_run_id: StepRunId,
    attempt: u32,
    cancel: CancellationToken,
}

struct State {
    max: u32,
    running: HashMap<JobId, RunningStep>,
    consumers: HashMap<u64, Consumer>,
    next_id: u64,
    draining: bool,
    /// No new work until both clear: disabled by the dispatcher, or found `Unhealthy` by
    /// the agent's own health check.
    paused: bool,
    disabled: bool,
    unhealthy: bool,
    /// Messages last seen in each queue (only probed while queues outnumber free slots).
    depths: HashMap<String, u32>,
    /// Queues found missing (the dispatcher declares them; agents may not), and since when:
    /// not consumed until a probe finds them again, since a consume of a missing queue
    /// closes the channel every consumer shares.
    missing: HashMap<String, std::time::Instant>,
    /// Queues the broker refused this worker's user (its rights changed before its
    /// configuration said so), and when: left alone for [`REFUSED_BACKOFF`] or until the
    /// queue list changes, while the configuration is read again.
    refused: HashMap<String, std::time::Instant>,
    /// The reader/writer gate of exclusive steps.
    gate: Gate,
}

/// Ordinary steps are readers, exclusive ones writers. Writers are preferred: once an
/// exclusive step waits, no ordinary step starts, and the agent takes no new work.
#[derive(Default)]
struct Gate {
    ordinary: u32,
    exclusive_running: bool,
    exclusive_waiting: u32,
}

impl Gate {
    fn busy(&self) -> bool {
        self.exclusive_running || self.exclusive_waiting > 0
    }
}

impl State {
    fn units(&self) -> u32 {
        self.running.len() as u32 + self.consumers.values().filter(|c| c.reserves).count() as u32
    }
}

/// Shared between the consumers, the steps and the control channel.
pub struct Slots {
    state: Mutex<State>,
    changed: Notify,
}

impl Slots {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                max: max.max(1),
                running: HashMap::new(),
                consumers: HashMap::new(),
                next_id: 0,
                draining: false,
                paused: false,
                disabled: false,
                unhealthy: false,
                depths: HashMap::new(),
                missing: HashMap::new(),
                refused: HashMap::new(),
                gate: Gate::default(),
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("slots lock poisoned")
    }

    pub fn set_max(&self, max: u32) {
        let mut s = self.lock();
        s.max = max.max(1);
        // Idle consumers beyond the new limit stop; running steps finish.
        let mut excess = s.units().saturating_sub(s.max);
        for c in s.consumers.values_mut() {
            if excess == 0 {
                break;
            }
            if c.reserves && !c.busy && !c.stop.is_cancelled() {
                c.stop.cancel();
                excess -= 1;
            }
        }
        drop(s);
        tracing::info!(max, "max_concurrent_steps changed");
        self.changed.notify_waiters();
    }

    pub fn max(&self) -> u32 {
        self.lock().max
    }

    /// Whether the dispatcher has this worker enabled (as last told).
    pub fn enabled(&self) -> bool {
        !self.lock().disabled
    }

    /// Take no new work while disabled (running steps go on); resume when enabled.
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().disabled = !enabled;
        self.repause();
        tracing::info!(enabled, "worker enabled state changed");
    }

    /// Take no new work while the health check says `Unhealthy`; resume when it recovers.
    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.lock().unhealthy = unhealthy;
        self.repause();
    }

    fn repause(&self) {
        let mut s = self.lock();
        s.paused = s.disabled || s.unhealthy;
        if s.paused {
            for c in s.consumers.values() {
                c.stop.cancel();
            }
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Stop taking work; running steps go on.
    pub fn drain(&self) {
        let mut s = self.lock();
        s.draining = true;
        for c in s.consumers.values() {
            c.stop.cancel();
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Cancel every running step (forced shutdown).
    pub fn cancel_all(&self) {
        for r in self.lock().running.values() {
            r.cancel.cancel();
        }
    }

    /// Cancel one attempt if it runs here.
    pub fn cancel_attempt(&self, step_run: StepRunId, attempt: u32) -> bool {
        let s = self.lock();
        let mut found = false;
        for r in s.running.values() {
            if r.step_run_id == step_run && r.attempt == attempt {
                r.cancel.cancel();
                found = true;
            }
        }
        found
    }

    pub fn running(&self) -> Vec<RunningAttempt> {
        self.lock()
            .running
            .values()
            .map(|r| RunningAttempt {
                step_run_id: r.step_run_id,
                attempt: r.attempt,
            })
            .collect()
    }

    pub fn free(&self) -> u32 {
        let s = self.lock();
        s.max.saturating_sub(s.running.len() as u32)
    }

    /// Why a step would have to wait at the gate now, if it would.
    pub fn gate_wait_reason(&self, exclusive: bool, worker: &str) -> Option<String> {
        let s = self.lock();
        let g = &s.gate;
        if exclusive {
            if g.exclusive_running || g.exclusive_waiting > 0 {
                Some(format!(
                    "exclusive access to worker {worker}: another exclusive step is ahead"
                ))
            } else if g.ordinary > 0 {
                Some(format!(
                    "exclusive access to worker {worker}: {} other step(s) running there",
                    g.ordinary
                ))
            } else {
                None
            }
        } else if g.busy() {
            Some(format!("an exclusive step on worker {worker} to finish"))
        } else {
            None
        }
    }

    /// Pass the gate: an exclusive step when nothing else runs, an ordinary one when no
    /// exclusive step runs or waits. An exclusive step stops the agent's intake meanwhile.
    pub async fn gate_enter(&self, exclusive: bool) {
        if exclusive {
            self.lock().gate.exclusive_waiting += 1;
            // Stop the consumers: nothing new comes in while we wait or run.
            self.pause_intake();
        }
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.lock();
                let g = &mut s.gate;
                if exclusive && !g.exclusive_running && g.ordinary == 0 {
                    g.exclusive_waiting -= 1;
                    g.exclusive_running = true;
                    return;
                }
                if !exclusive && !g.busy() {
                    g.ordinary += 1;
                    return;
                }
            }
            notified.await;
        }
    }

    /// Leave the gate after the step ran.
    pub fn gate_exit(&self, exclusive: bool) {
        {
            let mut s = self.lock();
            if exclusive {
                s.gate.exclusive_running = false;
            } else {
                s.gate.ordinary = s.gate.ordinary.saturating_sub(1);
            }
        }
        self.changed.notify_waiters();
    }

    /// Give up waiting at the gate (cancelled before starting).
    pub fn gate_abandon(&self, exclusive: bool) {
        if exclusive {
            let mut s = self.lock();
            s.gate.exclusive_waiting = s.gate.exclusive_waiting.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }

    fn pause_intake(&self) {
        let s = self.lock();
        for c in s.consumers.values() {
            c.stop.cancel();
        }
        drop(s);
        self.changed.notify_waiters();
    }

    pub async fn wait_idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.lock().running.is_empty() {
                return;
            }
            notified.await;
        }
    }

    fn step_done(&self, job: JobId) {
        self.lock().running.remove(&job);
        self.changed.notify_waiters();
    }
}

/// Keep the right consumers alive on one connection until it dies or `stop` fires.
/// `queues` is in priority order: the worker's own queue first, then its pools; when it
/// changes (the worker's pools changed), consumers of queues no longer in it stop.
pub async fn manage(
    conn: Arc<Connection>,
    mut queue_list: tokio::sync::watch::Receiver<Vec<String>>,
    slots: Arc<Slots>,
    agent: Arc<AgentContext>,
    stop: CancellationToken,
) {
    let mut queues = queue_list.borrow_and_update().clone();
    let ch = match open_channel(&conn).await {
        Ok(ch) => ch,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a channel for jobs");
            return;
        }
    };
    let conn_gone = CancellationToken::new();
    let mut probe = tokio::time::interval(Duration::from_secs(1));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missing_probe = tokio::time::interval(MISSING_RETRY);
    missing_probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !ch.status().connected() || !conn.status().connected() {
            break;
        }
        let notified = slots.changed.notified();
        rebalance(&conn, &ch, &queues, &slots, &agent, &conn_gone);
        tokio::select! {
            _ = notified => {}
            _ = probe.tick() => {
                if needs_probe(&slots, &queues) {
                    probe_depths(&conn, &queues, &slots).await;
                    move_idle_consumers(&slots, &queues);
                }
            }
            _ = missing_probe.tick() => {
                probe_missing(&conn, &slots).await;
            }
            changed = queue_list.changed() => {
                if changed.is_err() {
                    break;
                }
                queues = queue_list.borrow_and_update().clone();
                let mut s = slots.lock();
                for c in s.consumers.values_mut() {
                    if !queues.contains(&c.queue) {
                        c.stop.cancel();
                    }
                }
                s.depths.retain(|q, _| queues.contains(q));
                s.missing.retain(|q, _| queues.contains(q));
                s.refused.clear();
            }
            _ = stop.cancelled() => break,
        }
    }
    // The consumers end with the channel; deliveries they held are requeued by the broker.
    conn_gone.cancel();
    let mut s = slots.lock();
    for c in s.consumers.values_mut() {
        c.stop.cancel();
    }
}

async fn open_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = conn.create_channel().await?;
    // Per consumer (global = false), for consumers created after this call.
    ch.basic_qos(1, BasicQosOptions { global: false }).await?;
    Ok(ch)
}

/// Start consumers while there are free slots and queues without one.
fn rebalance(
    conn: &Arc<Connection>,
    ch: &Channel,
    queues: &[String],
    slots: &Arc<Slots>,
    agent: &Arc<AgentContext>,
    conn_gone: &CancellationToken,
) {
    let mut s = slots.lock();
    if s.draining || s.paused || s.gate.busy() {
        return;
    }
    while s.units() < s.max {
        let without: Vec<&String> = queues
            .iter()
            .filter(|q| !s.missing.contains_key(q.as_str()))
            .filter(|q| {
                s.refused
                    .get(q.as_str())
                    .is_none_or(|at| at.elapsed() >= REFUSED_BACKOFF)
            })
            .filter(|q| {
                !s.consumers
                    .values()
                    .any(|c| &c.queue == *q && c.reserves && !c.stop.is_cancelled())
            })
            .collect();
        // Prefer a queue known to hold jobs; otherwise the first in priority order.
        let pick = without
            .iter()
            .find(|q| s.depths.get(q.as_str()).is_some_and(|d| *d > 0))
            .or_else(|| without.first())
            .map(|q| (*q).clone());
        let Some(queue) = pick else { break };
        let id = s.next_id;
        s.next_id += 1;
        let stop = conn_gone.child_token();
        s.consumers.insert(
            id,
            Consumer {
                queue: queue.clone(),
                reserves: true,
                busy: false,
                stop: stop.clone(),
            },
        );
        tokio::spawn(consume(
            conn.clone(),
            ch.clone(),
            queue,
            id,
            slots.clone(),
            agent.clone(),
            stop,
        ));
    }
}

async fn consume(
    conn: Arc<Connection>,
    ch: Channel,
    queue: String,
    id: u64,
    slots: Arc<Slots>,
    agent: Arc<AgentContext>,
    stop: CancellationToken,
) {
    let tag = format!("{}-{id}", agent.worker_id);
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let mut consumer = match consumer {
        Ok(c) => c,
        Err(e) => {
            if e.to_string().contains("ACCESS_REFUSED") {
                tracing::warn!(
                    queue,
                    "the broker refused this worker's user this queue; reading the configuration again"
                );
                slots
                    .lock()
                    .refused
                    .insert(queue.clone(), std::time::Instant::now());
                agent.reconfigure.notify_one();
            } else if e.to_string().contains("NOT_FOUND") {
                tracing::warn!(
                    queue,
                    "this queue does not exist (the dispatcher declares it); consuming the others meanwhile"
                );
                slots
                    .lock()
                    .missing
                    .insert(queue.clone(), std::time::Instant::now());
            } else {
                tracing::warn!(error = %e, queue, "cannot consume");
            }
            slots.lock().consumers.remove(&id);
            // Let the manager notice a dead channel rather than spin on it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            slots.changed.notify_waiters();
            return;
        }
    };
    let mut cancelled = false;
    loop {
        let next = tokio::select! {
            n = consumer.next() => n,
            _ = stop.cancelled(), if !cancelled => {
                cancelled = true;
                // Deliveries sent before the broker saw the cancel still arrive; the stream
                // ends after them.
                if ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::debug!(error = %e, queue, "consumer ended");
                break;
            }
            None => break,
        };
        if let Some(c) = slots.lock().consumers.get_mut(&id) {
            c.busy = true;
        }
        let keep = handle_delivery(&conn, &ch, &tag, delivery, id, &slots, &agent).await;
        if let Some(c) = slots.lock().consumers.get_mut(&id) {
            c.busy = false;
        }
        if !keep && !cancelled {
            cancelled = true;
        }
    }
    slots.lock().consumers.remove(&id);
    slots.changed.notify_waiters();
}

/// Handle one delivery. Returns false when this consumer was cancelled to respect the limit.
async fn handle_delivery(
    conn: &Connection,
    ch: &Channel,
    tag: &str,
    delivery: lapin::message::Delivery,
    id: u64,
    slots: &Arc<Slots>,
    agent: &Arc<AgentContext>,
) -> bool {
    let job = match Job::decode(&delivery.data) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(error = %e, "dead-lettering a malformed job");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return true;
        }
    };
    let (already_running, full) = {
        let s = slots.lock();
        (
            s.running.contains_key(&job.job_id),
            s.running.len() as u32 >= s.max,
        )
    };
    if already_running {
        // A redelivery of a job running here (after a reconnect): already ours.
        tracing::info!(job_id = %job.job_id, "redelivery of a job already running here; acking it");
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return true;
    }
    if full {
        // Only after the limit was lowered: give the job back for another agent.
        let _ = delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
        return false;
    }
    // What the claim checks: the body exactly as it arrived.
    let sha = gantry_shared::wire::body_sha256(&delivery.data);
    let claim_id = ClaimId::new();
    let mut delay = Duration::from_millis(100);
    let grant = loop {
        match agent.api.claim(job.job_id, claim_id, &sha).await {
            Ok(g) => break Some(g),
            Err(ApiError::Refused {
                status: 403,
                message,
            }) => {
                // Not this worker's job at all (it does not serve the job's pool): the
                // dispatcher changed nothing, so the job goes back to its queue for a worker
                // that does, and this queue is left alone while the configuration is read
                // again (no hot loop of deliveries and refusals).
                let queue = slots.lock().consumers.get(&id).map(|c| c.queue.clone());
                tracing::warn!(job_id = %job.job_id, ?queue, %message, "claim refused: not this worker's pool; giving the job back");
                let _ = ch
                    .basic_cancel(tag.into(), BasicCancelOptions::default())
                    .await;
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                if let Some(q) = queue {
                    slots.lock().refused.insert(q, std::time::Instant::now());
                }
                agent.reconfigure.notify_one();
                return false;
            }
            Err(ApiError::Refused { message, .. }) => {
                tracing::info!(job_id = %job.job_id, step = job.step_name, %message, "claim refused; dropping the job");
                break None;
            }
            Err(ApiError::Unauthorized(m)) => {
                tracing::error!(message = %m, "the dispatcher refused this agent's credential");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                agent.fatal.cancel();
                return false;
            }
            Err(ApiError::Unavailable(m)) => {
                // Keep asking with the same claim id: if the dispatcher granted it and the
                // answer was lost, the same claim is granted again; abandoning it would leave
                // the attempt claimed and never run.
                if delay >= Duration::from_secs(2) {
                    tracing::warn!(job_id = %job.job_id, error = %m, "cannot claim yet; retrying");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let Some(grant) = grant else {
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return true;
    };
    let cancel = CancellationToken::new();
    let keep = {
        let mut s = slots.lock();
        s.running.insert(
            job.job_id,
            RunningStep {
                step_run_id: job.step_run_id,
                attempt: job.attempt,
                cancel: cancel.clone(),
            },
        );
        let over = s.units() > s.max || s.draining || s.paused || s.gate.busy();
        if over && let Some(c) = s.consumers.get_mut(&id) {
            c.reserves = false;
        }
        !over
    };
    if !keep {
        // Cancel before the ack, so the broker cannot hand this consumer another job.
        let _ = ch
            .basic_cancel(tag.into(), BasicCancelOptions::default())
            .await;
    }
    if agent
        .fault_drop_before_ack
        .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        tracing::warn!("fault injection: closing the broker connection before the ack");
        let _ = conn.close(320, "fault injection".into()).await;
    } else if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // Redelivered elsewhere; that claim will be refused.
        tracing::debug!(error = %e, "ack failed after a granted claim");
    }
    // The dispatcher refuses a claim for another body; check anyway, and if it still differs
    // run nothing and report the attempt failed (it is ours now, so it must end).
    let refuse = grant
        .job_sha256
        .as_ref()
        .filter(|published| **published != sha)
        .map(|published| {
            format!(
                "the job this agent received (sha256 {sha}) is not the one the dispatcher published ({published}); nothing ran"
            )
        });
    let ctx = StepContext {
        refuse,
        api: agent.api.clone(),
        slots: slots.clone(),
        job,
        grant,
        worker_id: agent.worker_id,
        worker_name: agent.worker_name.clone(),
        work_root: agent.work_root.clone(),
        keep_work_dir: agent.keep_work_dirs,
        step_users: agent.step_users.clone(),
        outbox: agent.outbox.clone(),
        cancel,
    };
    let slots = slots.clone();
    tokio::spawn(async move {
        let job_id = ctx.job.job_id;
        runner::run(ctx).await;
        slots.step_done(job_id);
    });
    keep
}
