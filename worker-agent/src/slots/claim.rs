//! Claiming one delivery before anything runs (see `api::claim`), acking it only once the
//! claim was answered, and starting the granted step's runner.

use super::{AgentContext, RunningStep, Slots};
use crate::api::ApiError;
use crate::runner::{self, StepContext};
use gantry_shared::amqp::consume::{Incoming, Settle};
use gantry_shared::ids::ClaimId;
use gantry_shared::wire::Job;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Handle one delivery. Returns false when this consumer was cancelled to respect the limit.
pub(super) async fn handle_delivery(
    conn: &Connection,
    ch: &Channel,
    tag: &str,
    delivery: Incoming,
    id: u64,
    slots: &Arc<Slots>,
    agent: &Arc<AgentContext>,
) -> bool {
    let Incoming {
        message,
        ticket: delivery,
    } = delivery;
    let job = match Job::decode(&message.data) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(error = %e, "dead-lettering a malformed job");
            delivery.settle(Settle::Reject).await;
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
        delivery.settle(Settle::Ack).await;
        return true;
    }
    if full {
        // Only after the limit was lowered: give the job back for another agent.
        delivery.settle(Settle::Requeue).await;
        return false;
    }
    // What the claim checks: the body exactly as it arrived.
    let sha = gantry_shared::wire::body_sha256(&message.data);
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
                delivery.settle(Settle::Requeue).await;
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
                delivery.settle(Settle::Requeue).await;
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
        delivery.settle(Settle::Ack).await;
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
        let over = s.units() > s.max || s.draining || s.paused || slots.gate.busy();
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
        // Its channel is gone with the connection: the broker redelivers it.
        drop(delivery);
    } else if !delivery.settle(Settle::Ack).await {
        // Redelivered elsewhere; that claim will be refused.
        tracing::debug!("ack failed after a granted claim");
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
        gate: slots.gate.clone(),
        job,
        grant,
        worker_id: agent.worker_id,
        worker_name: agent.worker_name.clone(),
        work_root: agent.work_root.clone(),
        keep_work_dir: agent.keep_work_dirs,
        step_users: agent.step_users.clone(),
        supervisor: agent.supervisor.clone(),
        helpers: agent.helpers.clone(),
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
