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
//! lease during which only those holders re-claim.

use crate::attempts;
use crate::logs;
use crate::orchestrator::Orchestrator;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::locks::{self, Acquire, MutexKeys, Reclaim, Renew};
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

async fn serve_waiters(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let waiters: Vec<Waiter> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.waiting_since, s.task_id, s.name AS step_name,
                s.spec->>'mutex' AS mutex,
                CASE WHEN jsonb_typeof(s.spec->'mutex_timeout_secs') = 'number'
                     THEN GREATEST(LEAST((s.spec->>'mutex_timeout_secs')::numeric, $1), 0)::bigint
                END AS mutex_timeout_secs
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
         WHERE a.state = 'Waiting' ORDER BY a.waiting_since, a.created_at",
    )
    .bind(MAX_MUTEX_TIMEOUT_SECS)
    .fetch_all(&inner.db)
    .await?;
    {
        // Forget reports of attempts no longer waiting.
        let live: std::collections::HashSet<(Uuid, i32)> =
            waiters.iter().map(|w| (w.step_run_id, w.attempt)).collect();
        inner
            .reported
            .lock()
            .expect("lock")
            .retain(|k, _| live.contains(k));
        inner
            .refreshed
            .lock()
            .expect("lock")
            .retain(|k, _| live.contains(k));
    }
    // Per mutex, in arrival order. Only the waiters that may be next need Redis on every
    // pass; the others only keep their place in the queue alive, every few seconds, so a
    // release costs one or two round trips however many steps wait.
    let mut groups: Vec<(String, Vec<Waiter>)> = Vec::new();
    for w in waiters {
        let Some(mutex) = w.mutex.clone() else {
            continue;
        };
        match groups.iter_mut().find(|(m, _)| *m == mutex) {
            Some((_, ws)) => ws.push(w),
            None => groups.push((mutex, vec![w])),
        }
    }
    for (mutex, ws) in groups {
        // The previous holder's attempt must have ended in PostgreSQL too, not only its lease
        // in Redis: a lost worker's lease can expire before the worker is declared lost, and
        // its step must be marked lost before the next holder starts.
        let previous: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT s.task_id, s.name FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
             WHERE a.mutex_token IS NOT NULL AND a.state IN ('Pending', 'Queued', 'Running')
               AND s.spec->>'mutex' = $1
             LIMIT 1",
        )
        .bind(&mutex)
        .fetch_optional(&inner.db)
        .await?;
        let mut held = previous.is_some();
        for w in ws {
            let key = (w.step_run_id, w.attempt);
            let due = inner
                .refreshed
                .lock()
                .expect("lock")
                .get(&key)
                .is_none_or(|t| t.elapsed() >= REFRESH_PLACE);
            if held && !due && !timed_out(&w) {
                continue;
            }
            // One waiter that cannot be served (its row, Redis's answer for it) must not
            // hold up every other mutex: it counts as holding its own, and is tried again
            // on the next pass.
            let answer = match serve_one(inner, &w, &mutex, previous.as_ref(), !held).await {
                Ok(a) => a,
                Err(e) => {
                    crate::supervise::pass_failed(
                        "mutex-grants",
                        &format!(
                            "serving step {} of task {} for mutex {mutex}: {e:#}",
                            w.step_name, w.task_id
                        ),
                    );
                    held = true;
                    continue;
                }
            };
            inner
                .refreshed
                .lock()
                .expect("lock")
                .insert(key, Instant::now());
            match answer {
                Some(Acquire::Waiting { holder, .. })
                    if holder.is_empty() && previous.is_none() =>
                {
                    // Free, but another waiter is ahead in Redis's queue: ask the next one.
                }
                None => {}
                Some(_) => held = true,
            }
        }
    }
    Ok(())
}

/// How often a waiter that is not next refreshes its place (well within `WAITER_ALIVE`).
const REFRESH_PLACE: Duration = Duration::from_secs(4);

/// The longest `mutex_timeout_secs` honoured (its documented range ends here); rows stored
/// before it was checked may hold anything up to `u64::MAX`, and are read as this.
pub const MAX_MUTEX_TIMEOUT_SECS: i64 = 604_800;

fn timed_out(w: &Waiter) -> bool {
    let (Some(limit), Some(since)) = (w.mutex_timeout_secs, w.waiting_since) else {
        return false;
    };
    waited_too_long(Utc::now(), since, limit)
}

/// True when a waiter that began at `since` has, at `now`, waited `limit` seconds or more;
/// any `limit` and any times, without overflow.
fn waited_too_long(now: DateTime<Utc>, since: DateTime<Utc>, limit: i64) -> bool {
    let limit = chrono::Duration::try_seconds(limit.clamp(0, MAX_MUTEX_TIMEOUT_SECS))
        .unwrap_or(chrono::Duration::MAX);
    now.signed_duration_since(since) >= limit
}

/// Ask Redis for one waiter's turn (or only refresh its place when `may_grant` is false) and
/// act on the answer. `None` when the waiter timed out and was failed.
async fn serve_one(
    inner: &Arc<Inner>,
    w: &Waiter,
    mutex: &str,
    previous: Option<&(Uuid, String)>,
    may_grant: bool,
) -> anyhow::Result<Option<Acquire>> {
    let keys = MutexKeys::new(&inner.ns, mutex);
    let step_run = StepRunId(w.step_run_id);
    let attempt = w.attempt as u32;
    let waiter = locks::waiter(step_run, attempt);
    if let (true, Some(limit)) = (timed_out(w), w.mutex_timeout_secs) {
        let last = inner
            .reported
            .lock()
            .expect("lock")
            .get(&(w.step_run_id, w.attempt))
            .cloned();
        let _ = locks::release(&inner.redis, &keys, &waiter, None).await;
        let why = format!(
            "mutex {mutex} was not granted within mutex_timeout_secs = {limit}{}",
            last.map(|l| format!(" (last: {l})")).unwrap_or_default()
        );
        let mut tx = inner.db.begin().await?;
        if let Some(locked) = attempts::lock(&mut tx, step_run, attempt).await?
            && locked.state == "Waiting"
        {
            attempts::conclude(
                &mut tx,
                &locked,
                step_run,
                attempt,
                "Failed",
                Some(&why),
                inner.retry_base,
            )
            .await?;
            tx.commit().await?;
            inner.orchestrator.kick(TaskId(w.task_id));
        }
        return Ok(None);
    }
    let answer =
        match locks::queue_or_acquire(&inner.redis, &keys, &waiter, inner.lease, may_grant).await {
            Ok(Acquire::NoEpoch) => {
                ensure_epoch(inner).await?;
                locks::queue_or_acquire(&inner.redis, &keys, &waiter, inner.lease, may_grant).await
            }
            other => other,
        };
    match &answer {
        Ok(Acquire::Granted(token)) => grant(inner, w, mutex, *token).await?,
        Ok(Acquire::Waiting { holder, position }) => {
            let mut msg = format!("mutex {mutex}");
            if let Some((task, step)) = previous {
                msg.push_str(&format!(" held by task {task} (step {step})"));
            } else if holder.is_empty() {
                msg.push_str(" (being handed over)");
            } else {
                msg.push_str(&format!(
                    " held by {}",
                    describe_holder(inner, holder).await
                ));
            }
            if *position > 0 {
                msg.push_str(&format!(", {position} ahead in the queue"));
            }
            report(inner, w, &msg).await?;
        }
        Ok(Acquire::Quiet) => {
            report(
                inner,
                w,
                &format!("mutex {mutex}: Redis restarted; earlier holders re-claim first"),
            )
            .await?
        }
        Ok(Acquire::NoEpoch) => {}
        Err(e) => {
            report(
                inner,
                w,
                &format!("mutex {mutex}: Redis is unavailable ({e})"),
            )
            .await?
        }
    }
    // An unreachable Redis answers nothing: count it as held, so the next waiters only
    // refresh their places.
    Ok(Some(answer.unwrap_or(Acquire::Quiet)))
}

/// "task T (step S)" for a holder's waiter id.
async fn describe_holder(inner: &Inner, holder: &str) -> String {
    let step_run = holder
        .split_once(':')
        .and_then(|(s, _)| Uuid::parse_str(s).ok());
    if let Some(id) = step_run
        && let Ok(Some((task, step))) =
            sqlx::query_as::<_, (Uuid, String)>("SELECT task_id, name FROM step_runs WHERE id = $1")
                .bind(id)
                .fetch_optional(&inner.db)
                .await
    {
        return format!("task {task} (step {step})");
    }
    format!("another installation's step ({holder})")
}

async fn report(inner: &Inner, w: &Waiter, msg: &str) -> sqlx::Result<()> {
    let key = (w.step_run_id, w.attempt);
    if inner
        .reported
        .lock()
        .expect("lock")
        .get(&key)
        .map(String::as_str)
        == Some(msg)
    {
        return Ok(());
    }
    let mut tx = inner.db.begin().await?;
    let r = sqlx::query(
        "UPDATE step_runs SET waiting_for = $3
         WHERE id = $1 AND attempt = $2 AND state = 'Waiting' AND waiting_for IS DISTINCT FROM $3",
    )
    .bind(w.step_run_id)
    .bind(w.attempt)
    .bind(msg)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 1 {
        logs::append_system(
            &mut tx,
            TaskId(w.task_id),
            Some((StepRunId(w.step_run_id), w.attempt as u32)),
            &format!("Step {} waiting for {msg}", w.step_name),
        )
        .await?;
    }
    tx.commit().await?;
    inner
        .reported
        .lock()
        .expect("lock")
        .insert(key, msg.to_owned());
    Ok(())
}

async fn grant(inner: &Arc<Inner>, w: &Waiter, mutex: &str, token: u64) -> anyhow::Result<()> {
    let step_run = StepRunId(w.step_run_id);
    let attempt = w.attempt as u32;
    let mut tx = inner.db.begin().await?;
    let locked = attempts::lock(&mut tx, step_run, attempt).await?;
    if locked
        .as_ref()
        .is_some_and(|l| l.state != "Waiting" && l.mutex_token == Some(token as i64))
    {
        // Another dispatcher node served the same waiter a moment earlier and recorded this
        // very grant (Redis answers a holder's acquire with its token): the lease is that
        // attempt's now, and releasing it would pull it from under its step.
        return Ok(());
    }
    let still_waiting = locked.is_some_and(|l| l.state == "Waiting");
    if !still_waiting {
        drop(tx);
        let keys = MutexKeys::new(&inner.ns, mutex);
        let _ = locks::release(
            &inner.redis,
            &keys,
            &locks::waiter(step_run, attempt),
            Some(token),
        )
        .await;
        return Ok(());
    }
    sqlx::query(
        "UPDATE attempts SET state = 'Pending', mutex_token = $3, pending_since = now()
         WHERE step_run_id = $1 AND attempt = $2",
    )
    .bind(w.step_run_id)
    .bind(w.attempt)
    .bind(token as i64)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE step_runs SET state = 'Pending', waiting_for = NULL WHERE id = $1")
        .bind(w.step_run_id)
        .execute(&mut *tx)
        .await?;
    logs::append_system(
        &mut tx,
        TaskId(w.task_id),
        Some((step_run, attempt)),
        &format!(
            "Step {} acquired mutex {mutex} (fencing token {token})",
            w.step_name
        ),
    )
    .await?;
    tx.commit().await?;
    inner
        .reported
        .lock()
        .expect("lock")
        .remove(&(w.step_run_id, w.attempt));
    inner.orchestrator.republish(step_run, attempt).await;
    Ok(())
}

/// Keep the leases of granted attempts no agent has claimed yet.
async fn renew_unclaimed(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let held: Vec<Held> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, s.task_id, s.name AS step_name,
                s.spec->>'mutex' AS mutex, a.mutex_token
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
         WHERE a.mutex_token IS NOT NULL AND a.state IN ('Pending', 'Queued')",
    )
    .fetch_all(&inner.db)
    .await?;
    for h in held {
        let Some(mutex) = h.mutex.as_deref() else {
            continue;
        };
        let keys = MutexKeys::new(&inner.ns, mutex);
        let step_run = StepRunId(h.step_run_id);
        let waiter = locks::waiter(step_run, h.attempt as u32);
        let token = h.mutex_token as u64;
        match locks::renew(&inner.redis, &keys, &waiter, token, inner.lease).await {
            Ok(Renew::Held) => {}
            Ok(answer @ (Renew::NoEpoch | Renew::Lost)) => {
                if answer == Renew::NoEpoch {
                    ensure_epoch(inner).await?;
                }
                // Taken back only during the quiet period after Redis lost its data.
                match locks::reclaim(&inner.redis, &keys, &waiter, inner.lease).await {
                    Ok(Reclaim::Held(new)) => {
                        sqlx::query(
                            "UPDATE attempts SET mutex_token = $3
                             WHERE step_run_id = $1 AND attempt = $2 AND mutex_token < $3",
                        )
                        .bind(h.step_run_id)
                        .bind(h.attempt)
                        .bind(new as i64)
                        .execute(&inner.db)
                        .await?;
                        tracing::info!(mutex, token = new, task = %h.task_id, step = h.step_name, "re-claimed a mutex after Redis lost its data");
                    }
                    Ok(Reclaim::Lost) => {
                        requeue(
                            inner,
                            step_run,
                            h.attempt as u32,
                            "its lease expired or was lost when Redis restarted",
                        )
                        .await?
                    }
                    Ok(Reclaim::NoEpoch) => {}
                    Err(e) => tracing::warn!(error = %e, mutex, "cannot re-claim a mutex yet"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, mutex, "cannot renew a mutex lease (Redis unavailable?)")
            }
        }
    }
    Ok(())
}

/// Void the job of an unclaimed attempt whose lease is gone and make it wait again.
async fn requeue(inner: &Inner, step_run: StepRunId, attempt: u32, why: &str) -> sqlx::Result<()> {
    let mut tx = inner.db.begin().await?;
    let Some(locked) = attempts::lock(&mut tx, step_run, attempt).await? else {
        return Ok(());
    };
    if !matches!(locked.state.as_str(), "Pending" | "Queued") {
        return Ok(());
    }
    crate::orchestrator::void_job(&mut tx, step_run, attempt).await?;
    sqlx::query(
        "UPDATE attempts SET state = 'Waiting', mutex_token = NULL, waiting_since = now()
         WHERE step_run_id = $1 AND attempt = $2",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE step_runs SET state = 'Waiting', waiting_for = $2 WHERE id = $1")
        .bind(step_run.0)
        .bind(format!(
            "mutex {}",
            locked.mutex.clone().unwrap_or_default()
        ))
        .execute(&mut *tx)
        .await?;
    logs::append_system(
        &mut tx,
        locked.task(),
        Some((step_run, attempt)),
        &format!(
            "Step {} lost its mutex before starting ({why}); waiting again",
            locked.step_name
        ),
    )
    .await?;
    tx.commit().await
}

/// Set a new epoch if Redis has none while any mutex is in use.
async fn check_epoch(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let in_use: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM attempts WHERE state = 'Waiting'
                        OR (mutex_token IS NOT NULL AND state IN ('Pending', 'Queued', 'Running')))",
    )
    .fetch_one(&inner.db)
    .await?;
    if in_use && !locks::has_epoch(&inner.redis, &inner.ns).await? {
        ensure_epoch(inner).await?;
    }
    Ok(())
}

/// A new epoch from PostgreSQL; a quiet period only if some attempt may still hold a mutex.
async fn ensure_epoch(inner: &Inner) -> anyhow::Result<()> {
    let holders: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM attempts
                        WHERE mutex_token IS NOT NULL AND state IN ('Pending', 'Queued', 'Running'))",
    )
    .fetch_one(&inner.db)
    .await?;
    let epoch: i64 = sqlx::query_scalar("SELECT nextval('mutex_epochs')")
        .fetch_one(&inner.db)
        .await?;
    let quiet = if holders { inner.lease } else { Duration::ZERO };
    if locks::set_epoch(&inner.redis, &inner.ns, epoch as u64, quiet).await? {
        if holders {
            tracing::warn!(
                epoch,
                quiet_ms = quiet.as_millis() as u64,
                "Redis lost the mutex data (it restarted empty): set a new epoch; only holders may re-claim during the quiet period"
            );
        } else {
            tracing::info!(
                epoch,
                "Redis had no mutex epoch (first use, or it restarted empty while no mutex was held): set one"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_mutex_timeout_is_compared_without_overflow() {
        let now = Utc::now();
        let since = now - chrono::Duration::seconds(10);
        assert!(waited_too_long(now, since, 5));
        assert!(!waited_too_long(now, since, 100_000_000_000_000_000));
        assert!(!waited_too_long(now, since, i64::MAX));
        assert!(waited_too_long(now, since, i64::MIN));
        assert!(waited_too_long(now, DateTime::<Utc>::MIN_UTC, i64::MAX));
        assert!(!waited_too_long(
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            0
        ));
    }
}
