//! One advance at a time per task on this node, at most `CONCURRENT_ADVANCES` at once.

use super::{Inner, advance, publish};
use gantry_shared::ids::TaskId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Ask for a task to be advanced soon (in-process).
pub(super) fn kick(inner: &Inner, task: TaskId) {
    let _ = inner.kick_tx.send((task, false));
}

/// Run an advance for a task, at most once at a time per task on this node; a kick that
/// arrives meanwhile makes it run once more afterwards. With `if_woken` (a `NOTIFY`, which
/// every node hears, the waker's own included, usually after its in-process kick has already
/// done the work) the decision is skipped unless the task still has a wake-up row.
pub(super) fn schedule(inner: &Arc<Inner>, permits: &Arc<Semaphore>, task: TaskId, if_woken: bool) {
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

/// Advance a task (retrying a transient database error a few times), then publish its jobs.
async fn advance_and_publish(inner: &Arc<Inner>, task: TaskId, if_woken: bool) {
    let mut delay = Duration::from_millis(50);
    let outgoing = loop {
        match advance::advance(inner, task, if_woken).await {
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
    publish::publish_all(inner, outgoing).await;
}
