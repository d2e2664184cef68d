//! # Named mutexes: the dispatcher's part
//!
//! A step with `mutex = NAME` gets its attempt in state `Waiting`; nothing is published and no
//! worker slot is used while it waits. This loop asks Redis for each waiting attempt's turn
//! (`shared::locks`, arrival order), at once when a release is announced on pub/sub and
//! otherwise once a second. On a grant it records the fencing token on the attempt, makes it
//! `Pending` and publishes its job; it then renews the lease until an agent claims the job,
//! and the claim hands the lease over: the agent asks the dispatcher to renew it
//! (`POST /api/jobs/{id}/lease`, [`Locks::renew_for`]) while the step runs, and the dispatcher
//! releases it once the attempt's end is stored. Agents never talk to Redis.
//!
//! Waiting is visible: the step is `Waiting` with `waiting_for` saying who holds the mutex
//! ("mutex prod-db held by task T (step migrate)"), and the task log says so once per
//! change. `mutex_timeout_secs` fails a step that waited too long. If Redis is unavailable
//! the steps wait and say so; steps without a mutex never touch Redis.
//!
//! When Redis comes back empty the scripts answer `NOEPOCH`; this loop then takes a new epoch
//! from PostgreSQL and, if any attempt still holds a mutex, starts a quiet period of one
//! lease during which only those holders re-claim.//!
//! This file holds the handle ([`Locks`]: releases, the claim's confirmation, renewals for a
//! running holder) and the two supervised loops; `grants` gives waiting attempts their turn
//! and grants them, `leases` keeps unclaimed grants' leases and the epoch after Redis lost its
//! data.

mod grants;
mod leases;

pub use grants::MAX_MUTEX_TIMEOUT_SECS;

use grants::serve_waiters;
use leases::{check_epoch, renew_unclaimed, requeue};

use crate::orchestrator::Orchestrator;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use gantry_shared::ids::StepRunId;
use gantry_shared::locks::{self, MutexKeys, Reclaim, Renew};
use gantry_shared::redis_link::RedisLink;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone)]
pub struct Locks {
    inner: Arc<Inner>,
}

struct Inner {
    db: PgPool,
    redis: Arc<RedisLink>,
    redis_url: String,
    ns: String,
    lease: Duration,
    retry_base: Duration,
    orchestrator: Orchestrator,
    wake: Arc<Notify>,
    /// What each waiting attempt was last reported as waiting for.
    reported: Mutex<HashMap<(Uuid, i32), String>>,
    /// When each waiting attempt last asked Redis (to keep its place in the queue alive).
    refreshed: Mutex<HashMap<(Uuid, i32), Instant>>,
}

#[derive(sqlx::FromRow)]
struct Waiter {
    step_run_id: Uuid,
    attempt: i32,
    waiting_since: Option<DateTime<Utc>>,
    task_id: Uuid,
    step_name: String,
    mutex: Option<String>,
    mutex_timeout_secs: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Held {
    step_run_id: Uuid,
    attempt: i32,
    task_id: Uuid,
    step_name: String,
    mutex: Option<String>,
    mutex_token: i64,
}

/// What renewing a holder's lease found.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewed {
    /// Held, under this fencing token.
    Held(u64),
    /// Gone: expired, taken over, or not re-claimable.
    Lost,
    /// Redis lost its data and the new epoch is not set yet: ask again shortly.
    NotYet,
}

/// What the mutex loop is given.
pub struct LocksConfig {
    pub namespace: String,
    pub redis_url: String,
    pub lease: Duration,
    pub retry_base: Duration,
}

impl Locks {
    pub fn start(
        db: PgPool,
        redis: Arc<RedisLink>,
        config: LocksConfig,
        orchestrator: Orchestrator,
        wake: Arc<Notify>,
        cancel: CancellationToken,
    ) -> Self {
        let me = Self {
            inner: Arc::new(Inner {
                db,
                redis,
                redis_url: config.redis_url,
                ns: config.namespace,
                lease: config.lease,
                retry_base: config.retry_base,
                orchestrator,
                wake,
                reported: Mutex::new(HashMap::new()),
                refreshed: Mutex::new(HashMap::new()),
            }),
        };
        let inner = me.inner.clone();
        let stop = cancel.clone();
        crate::supervise::spawn("mutex-grants", cancel.clone(), move || {
            run(inner.clone(), stop.clone())
        });
        let inner = me.inner.clone();
        let stop = cancel.clone();
        crate::supervise::spawn("mutex-releases", cancel, move || {
            listen_releases(inner.clone(), stop.clone())
        });
        me
    }

    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// Look at the waiters now (an attempt holding a mutex ended).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Give a mutex up for an attempt that ended (best effort: the lease expires anyway).
    pub async fn release(&self, mutex: &str, step_run: StepRunId, attempt: u32, token: u64) {
        let keys = MutexKeys::new(&self.inner.ns, mutex);
        let waiter = locks::waiter(step_run, attempt);
        if let Err(e) = locks::release(&self.inner.redis, &keys, &waiter, Some(token)).await {
            tracing::debug!(error = %e, mutex, "could not release a mutex; its lease will expire");
        }
    }

    /// Give up a mutex for an attempt that ended before it ran: release its lease if it had
    /// one, else leave the queue; then let the next waiter go.
    pub async fn release_or_withdraw(
        &self,
        mutex: &str,
        step_run: StepRunId,
        attempt: u32,
        token: Option<u64>,
    ) {
        let keys = MutexKeys::new(&self.inner.ns, mutex);
        let waiter = locks::waiter(step_run, attempt);
        if let Err(e) = locks::release(&self.inner.redis, &keys, &waiter, token).await {
            tracing::debug!(error = %e, mutex, "could not release a mutex; its lease will expire");
        }
        self.wake();
    }

    /// At a claim: confirm the attempt still holds its lease (and extend it).
    pub async fn confirm(
        &self,
        mutex: &str,
        step_run: StepRunId,
        attempt: u32,
        token: u64,
    ) -> redis::RedisResult<bool> {
        let keys = MutexKeys::new(&self.inner.ns, mutex);
        let waiter = locks::waiter(step_run, attempt);
        Ok(
            locks::renew(&self.inner.redis, &keys, &waiter, token, self.inner.lease).await?
                == Renew::Held,
        )
    }

    /// For a running attempt's claimant (`POST /api/jobs/{id}/lease`): renew its lease, or
    /// re-claim it under a new token during the quiet period after Redis lost its data.
    pub async fn renew_for(
        &self,
        mutex: &str,
        step_run: StepRunId,
        attempt: u32,
        token: u64,
    ) -> redis::RedisResult<Renewed> {
        let keys = MutexKeys::new(&self.inner.ns, mutex);
        let waiter = locks::waiter(step_run, attempt);
        let lease = self.inner.lease;
        match locks::renew(&self.inner.redis, &keys, &waiter, token, lease).await? {
            Renew::Held => Ok(Renewed::Held(token)),
            Renew::Lost | Renew::NoEpoch => {
                match locks::reclaim(&self.inner.redis, &keys, &waiter, lease).await? {
                    Reclaim::Held(new) => {
                        tracing::info!(mutex, token = new, %step_run, "re-claimed a mutex for its holder after Redis lost its data");
                        Ok(Renewed::Held(new))
                    }
                    Reclaim::Lost => Ok(Renewed::Lost),
                    Reclaim::NoEpoch => Ok(Renewed::NotYet),
                }
            }
        }
    }

    /// Put an attempt whose lease is gone before it started back in the mutex's queue.
    pub async fn requeue(&self, step_run: StepRunId, attempt: u32, why: &str) {
        if let Err(e) = requeue(&self.inner, step_run, attempt, why).await {
            tracing::warn!(error = %e, %step_run, "could not put an attempt back to wait for its mutex");
        }
        self.inner.wake.notify_one();
    }
}

async fn run(inner: Arc<Inner>, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renew: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return Ok(()),
        }
        if let Err(e) = serve_waiters(&inner).await {
            crate::supervise::pass_failed("mutex-grants", &format!("serving mutex waiters: {e:#}"));
        }
        // Holders re-claim after a Redis restart only once a new epoch exists: set it soon.
        if let Err(e) = check_epoch(&inner).await {
            crate::supervise::pass_failed(
                "mutex-grants",
                &format!("checking the mutex epoch: {e:#}"),
            );
        }
        if last_renew.is_none_or(|t| t.elapsed() >= inner.lease / 3) {
            last_renew = Some(Instant::now());
            if let Err(e) = renew_unclaimed(&inner).await {
                crate::supervise::pass_failed(
                    "mutex-grants",
                    &format!("renewing unclaimed mutex leases: {e:#}"),
                );
            }
        }
    }
}

/// Wake the loop whenever a mutex is released anywhere (messages lost while reconnecting are
/// covered by the loop's own timer).
async fn listen_releases(inner: Arc<Inner>, cancel: CancellationToken) -> anyhow::Result<()> {
    let channel = locks::released_channel(&inner.ns);
    loop {
        let sub = async {
            let client = redis::Client::open(inner.redis_url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            p = sub => p,
            _ = cancel.cancelled() => return Ok(()),
        };
        match pubsub {
            Ok(mut pubsub) => {
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(_) => inner.wake.notify_one(),
                            None => break,
                        },
                        _ = cancel.cancelled() => return Ok(()),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot subscribe to mutex releases; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}
