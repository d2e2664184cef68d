//! A mutex step's lease, renewed through the dispatcher while the step runs.

use super::StepContext;
use gantry_shared::api::MutexGrant;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The step's hold on its mutex, renewed through the dispatcher while it runs.
pub(super) struct MutexHold {
    /// Fires when the lease is lost; the reason is in `why`.
    pub(super) lost: CancellationToken,
    pub(super) why: Arc<std::sync::Mutex<Option<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Renew the step's mutex lease through the dispatcher (`POST /api/jobs/{id}/lease`) every
/// third of the lease; on losing it, say why and fire `lost`. A dispatcher (or Redis behind
/// it) that cannot renew it counts as lost once half the lease has passed since the last
/// renewal, so the step is dead well before anyone else can be granted the mutex.
pub(super) fn hold(ctx: &StepContext, grant: &MutexGrant) -> MutexHold {
    let lost = CancellationToken::new();
    let stop = CancellationToken::new();
    let why = Arc::new(std::sync::Mutex::new(None));
    let lease = Duration::from_millis(grant.lease_ms.max(1));
    let task = tokio::spawn({
        let (api, lost, stop, why) = (ctx.api.clone(), lost.clone(), stop.clone(), why.clone());
        let job = ctx.job.job_id;
        let name = grant.name.clone();
        async move {
            let mut last_ok = tokio::time::Instant::now();
            let mut wait = lease / 3;
            let fail = |reason: String| {
                *why.lock().expect("lock") = Some(reason);
                lost.cancel();
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
                // Never wait for an answer past the moment the step must die.
                let left = (lease / 2).saturating_sub(last_ok.elapsed());
                match tokio::time::timeout(left, api.renew_lease(job)).await {
                    Ok(Ok(renewed)) => {
                        last_ok = tokio::time::Instant::now();
                        wait = lease / 3;
                        tracing::debug!(mutex = name, token = renewed.token, "mutex lease renewed");
                    }
                    Ok(Err(crate::api::ApiError::Refused { message, .. })) => {
                        return fail(format!("its lease on mutex {name} is gone: {message}"));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, mutex = name, "cannot renew the mutex lease");
                        wait = Duration::from_millis(250);
                    }
                    Err(_) => {}
                }
                if last_ok.elapsed() >= lease / 2 {
                    return fail(format!(
                        "could not renew its lease on mutex {name} within half the lease ({} ms): the dispatcher or Redis is unreachable",
                        lease.as_millis()
                    ));
                }
            }
        }
    });
    MutexHold {
        lost,
        why,
        stop,
        task,
    }
}

/// Stop renewing. The dispatcher releases the mutex once the attempt's end is stored (or its
/// lease expires), so the next holder never starts before this attempt is over on record.
pub(super) async fn end(hold: Option<MutexHold>) {
    let Some(h) = hold else { return };
    h.stop.cancel();
    let _ = h.task.await;
}

/// Resolves when the lease is lost (never without a mutex).
pub(super) async fn lost(hold: Option<&MutexHold>) {
    match hold {
        Some(h) => h.lost.cancelled().await,
        None => std::future::pending().await,
    }
}
