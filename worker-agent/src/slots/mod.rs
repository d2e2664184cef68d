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
//!
//! Here: the limit and the agent's state (enabled, healthy, draining); `consumers.rs`: the
//! consumers of one connection; `claim.rs`: one delivery's claim and its step's start;
//! `probes.rs`: queue depths. The exclusive gate is [`crate::gate`]; the runner
//! ([`crate::runner`]) knows the gate, never the slots.

use crate::api::Api;
use crate::gate::Gate;
use crate::outbox::Outbox;
use gantry_shared::ids::{JobId, StepRunId, WorkerId};
use gantry_shared::wire::RunningAttempt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod claim;
mod consumers;
mod probes;
pub use consumers::manage;

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
    /// Starts steps where the agent's supervisor knows them (see [`crate::supervisor`]).
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    /// The helpers scripts call (see [`crate::helpers`]).
    pub helpers: Arc<crate::helpers::Helpers>,
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
}

impl State {
    fn units(&self) -> u32 {
        self.running.len() as u32 + self.consumers.values().filter(|c| c.reserves).count() as u32
    }
}

/// Shared between the consumers, the steps and the control channel.
pub struct Slots {
    state: Mutex<State>,
    /// Woken on every change of the slots or of the gate.
    changed: Arc<Notify>,
    /// The reader/writer gate of exclusive steps (see [`crate::gate`]).
    pub gate: Arc<Gate>,
}

impl Slots {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Slots>| {
            let changed = Arc::new(Notify::new());
            let me = me.clone();
            // An exclusive step waiting at the gate stops the intake at once.
            let pause = Box::new(move || {
                if let Some(slots) = me.upgrade() {
                    slots.pause_intake();
                }
            });
            Self {
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
                }),
                gate: Arc::new(Gate::new(changed.clone(), pause)),
                changed,
            }
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
