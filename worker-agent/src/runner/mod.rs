//! # Running one step
//!
//! After a granted claim: resolve `#{...}` (the job's variables plus the sensitive values
//! from the claim), write the script into a fresh working directory, start it in its own
//! process group, and stream what it prints.
//!
//! Output becomes numbered, timestamped, masked lines (`seq` from 0, no gaps), sent in
//! batches of up to [`BATCH_LINES`] lines or [`BATCH_BYTES`] bytes, or whatever accumulated
//! after [`BATCH_DELAY`]: never one message per line, never held back until the end.
//! `##gantry[...]` lines on stdout are service messages, handled and not logged.
//!
//! Its pipes are read by [`crate::output`] (long lines in pieces, service messages whole,
//! paced by [`crate::window`]: at most a window of lines not yet stored by the dispatcher) and its lines masked and batched by [`crate::emitter`].
//!
//! The step ends when its script exits (or is killed on timeout, cancel or lease loss, by its
//! [`crate::stopper`], which no amount of output can delay); anything it left running in its
//! process group is killed then, so a step's processes do not outlive it.
//! Then its artifacts are collected (see [`crate::artifacts`]) and sent in chunks through the
//! outbox, whatever the outcome but a cancel: the outbox is bounded, so a large file is read
//! only as fast as the broker confirms it and memory does not grow with its size.
//! `StepFinished` goes out after the last chunk, carrying the lines not yet sent (so a short
//! step's end is one message), the number of lines in all and each artifact's size and
//! sha256.
//!
//! # Layout
//! - `mod.rs` (here): one step from the gate to `StepFinished`.
//! - `command.rs`: the script's files, its command line and its environment.
//! - `execute.rs`: starting the script, reading its output until it ends, its outcome.
//! - `service.rs`: service messages (`##gantry[...]`): outputs, masks, progress, fail.
//! - `mutex.rs`: renewing a mutex step's lease while it runs.
//! - `upload.rs`: sending the step's artifacts in chunks.
//! - `files.rs`: creating and removing the step's working directory.

use crate::emitter::Emitter;
use crate::outbox::Outbox;
use chrono::Utc;
use gantry_shared::api::ClaimGrant;
use gantry_shared::ids::WorkerId;
use gantry_shared::mask::Masker;
use gantry_shared::wire::{Event, Job, Origin, Outcome, StepStarted, StepWaiting};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod command;
mod execute;
mod files;
mod mutex;
mod service;
mod upload;

pub use crate::emitter::{BATCH_BYTES, BATCH_LINES};
pub use crate::output::MAX_LINE;
pub use crate::step_users::{RunAs, effective_uid};
/// How long a line may wait for companions before its batch goes out.
pub const BATCH_DELAY: Duration = Duration::from_millis(50);
/// How long output may still arrive after the script's process group is gone.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Everything a step needs from its agent.
pub struct StepContext {
    /// Run nothing and fail the attempt with this reason (the job is not the one published).
    pub refuse: Option<String>,
    pub api: crate::api::Api,
    /// The agent's reader/writer gate (see [`crate::gate`]).
    pub gate: Arc<crate::gate::Gate>,
    pub job: Job,
    pub grant: ClaimGrant,
    pub worker_id: WorkerId,
    pub worker_name: String,
    pub work_root: PathBuf,
    pub keep_work_dir: bool,
    /// Who the script runs as (see [`crate::step_users`]).
    pub step_users: Arc<crate::step_users::StepUsers>,
    /// Starts the script where the agent's supervisor knows it (see [`crate::supervisor`]).
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    /// The agent's helper executables (see [`crate::helpers`]).
    pub helpers: Arc<crate::helpers::Helpers>,
    pub outbox: Outbox,
    /// Cancelled to stop the step (a cancel request or the agent's forced shutdown).
    pub cancel: CancellationToken,
}

/// How the script's run ended.
pub(crate) enum End {
    Exited(std::process::ExitStatus),
    TimedOut,
    Cancelled,
    /// The step's mutex lease was lost: it was killed at once.
    LockLost(String),
}

/// How a script's run is reported: its outcome, exit code and error.
type StepResult = (Outcome, Option<i32>, Option<String>);

/// Run a step to its end and report it. Never panics on script problems: they become a
/// failed step with the reason in its log.
pub async fn run(ctx: StepContext) {
    let job = &ctx.job;
    let origin = Origin {
        step_run_id: job.step_run_id,
        attempt: job.attempt,
        job_id: job.job_id,
        worker_id: ctx.worker_id,
    };
    let mut masker = Masker::new();
    for v in ctx.grant.sensitive_variables.values() {
        masker.add(v);
    }
    if let Some(why) = &ctx.refuse {
        // Ours to end, not to run.
        let em = Emitter::new(origin, ctx.outbox.clone(), masker);
        em.finish(Outcome::Failed, None, Some(why.clone()), Vec::new())
            .await;
        return;
    }
    let hold = ctx.grant.mutex.as_ref().map(|m| mutex::hold(&ctx, m));
    let mut em = Emitter::new(origin.clone(), ctx.outbox.clone(), masker);
    // Exclusive steps run alone on the agent: wait for the gate (and say so).
    let waited = ctx.gate.wait_reason(job.exclusive, &ctx.worker_name);
    if let Some(waiting_for) = waited.clone() {
        em.event(Event::StepWaiting(StepWaiting {
            origin: em.origin(),
            waiting_for,
        }))
        .await;
    }
    let entered = tokio::select! {
        _ = ctx.gate.enter(job.exclusive) => true,
        _ = ctx.cancel.cancelled() => false,
        _ = mutex::lost(hold.as_ref()) => false,
    };
    if !entered {
        // Cancelled (or its mutex lost) before it could start: it never ran.
        ctx.gate.abandon(job.exclusive);
        let why = hold
            .as_ref()
            .and_then(|h| h.why.lock().expect("lock").clone())
            .unwrap_or_else(|| "cancelled before it started".into());
        em.gantry(&format!("Step did not start: {why}")).await;
        mutex::end(hold).await;
        let outcome = if ctx.cancel.is_cancelled() {
            Outcome::Cancelled
        } else {
            Outcome::Failed
        };
        em.finish(outcome, None, Some(why), Vec::new()).await;
        return;
    }
    let started_at = Utc::now();
    if waited.is_some() {
        // The claim was the start (the dispatcher's clock); this only ends the wait the
        // dispatcher was told of, so a step that never waited costs no event for it.
        em.event(Event::StepStarted(StepStarted {
            origin: em.origin(),
            started_at,
        }))
        .await;
    }
    em.gantry(&format!(
        "Step {} attempt {} running on worker {} ({})",
        job.step_name,
        job.attempt,
        ctx.worker_name,
        job.syntax.as_str()
    ))
    .await;
    let work_dir = ctx
        .work_root
        .join(crate::workdir::step_dir_name(job.step_run_id, job.attempt));
    if let Some(m) = &ctx.grant.mutex {
        em.gantry(&format!(
            "Holding mutex {} (fencing token {})",
            m.name, m.token
        ))
        .await;
    }
    // The step's own user (a uid of its own with `agent.step_uid_range`), held until its
    // directory is gone.
    let step_user = ctx.step_users.for_step(&work_dir);
    let result = match &step_user {
        Ok(u) => execute::execute(&ctx, &mut em, &work_dir, u.run_as.as_ref(), hold.as_ref()).await,
        Err(e) => Err(e.clone()),
    };
    ctx.gate.exit(job.exclusive);
    mutex::end(hold).await;
    let ran = result.is_ok();
    let (outcome, exit_code, error) = match result {
        Ok(r) => r,
        Err(message) => {
            em.gantry(&format!("error: {message}")).await;
            (Outcome::Failed, None, Some(message))
        }
    };
    // Artifacts, also of a failed or timed-out step; a cancel means stop, so not then.
    let wants_artifacts = !job.artifacts.is_empty() || !em.requested_artifacts.is_empty();
    let artifacts = if !ran || !wants_artifacts {
        Vec::new()
    } else if outcome == Outcome::Cancelled || ctx.cancel.is_cancelled() {
        em.gantry("Artifacts not collected: the step was cancelled")
            .await;
        Vec::new()
    } else {
        upload::artifacts(&ctx, &mut em, &work_dir).await
    };
    if let Err(e) = files::end_work_dir(&ctx, &work_dir, step_user).await {
        em.gantry(&format!("warning: {e}")).await;
    }
    em.finish(outcome, exit_code, error, artifacts).await;
}
