//! The waiters' turns: each waiting attempt asks Redis for its turn in arrival order; a
//! granted one gets its fencing token, becomes `Pending` and its job is published. Waiting is
//! reported on the step and in the task log, and `mutex_timeout_secs` fails a step that
//! waited too long.

use super::leases::ensure_epoch;
use super::{Inner, Waiter};
use crate::attempts;
use crate::logs;
use crate::transitions::{self, AttemptState, StepState};
use chrono::{DateTime, Utc};
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::locks::{self, Acquire, MutexKeys};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub(super) async fn serve_waiters(inner: &Arc<Inner>) -> anyhow::Result<()> {
    // The state in the text, not bound, for the partial index (see `crate::db::connect`).
    static WAITERS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT a.step_run_id, a.attempt, a.waiting_since, s.task_id, s.name AS step_name,
                    s.spec->>'mutex' AS mutex,
                    CASE WHEN jsonb_typeof(s.spec->'mutex_timeout_secs') = 'number'
                         THEN GREATEST(LEAST((s.spec->>'mutex_timeout_secs')::numeric, $1), 0)::bigint
                    END AS mutex_timeout_secs
             FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
             WHERE a.state = '{waiting}' ORDER BY a.waiting_since, a.created_at",
            waiting = AttemptState::Waiting.as_str()
        )
    });
    let waiters: Vec<Waiter> = sqlx::query_as(WAITERS.as_str())
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
        static PREVIOUS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT s.task_id, s.name FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
                 WHERE a.mutex_token IS NOT NULL AND a.state IN ({holding})
                   AND s.spec->>'mutex' = $1
                 LIMIT 1",
                holding = AttemptState::sql_list(&HOLDING)
            )
        });
        let previous: Option<(Uuid, String)> = sqlx::query_as(PREVIOUS.as_str())
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

/// States of an attempt that holds its mutex's lease (granted, not ended).
pub(super) const HOLDING: [AttemptState; 3] = [
    AttemptState::Pending,
    AttemptState::Queued,
    AttemptState::Running,
];

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
            && locked.state == AttemptState::Waiting
        {
            attempts::conclude(
                &mut tx,
                &locked,
                step_run,
                attempt,
                AttemptState::Failed,
                Some(&why),
                inner.retry_base,
            )
            .await?;
            tx.commit().await?;
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
         WHERE id = $1 AND attempt = $2 AND state = $4 AND waiting_for IS DISTINCT FROM $3",
    )
    .bind(w.step_run_id)
    .bind(w.attempt)
    .bind(msg)
    .bind(StepState::Waiting)
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
        .is_some_and(|l| l.state != AttemptState::Waiting && l.mutex_token == Some(token as i64))
    {
        // Another dispatcher node served the same waiter a moment earlier and recorded this
        // very grant (Redis answers a holder's acquire with its token): the lease is that
        // attempt's now, and releasing it would pull it from under its step.
        return Ok(());
    }
    let still_waiting = locked.is_some_and(|l| l.state == AttemptState::Waiting);
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
    transitions::grant(&mut tx, step_run, attempt, token as i64).await?;
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
