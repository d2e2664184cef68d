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
//! `StepFinished` goes out after the last batch and the last chunk, with the number of lines
//! sent and each artifact's size and sha256.

use crate::emitter::Emitter;
use crate::outbox::Outbox;
use crate::output::Chunk;
use crate::stopper::{Reason, Signals, Stopper};
use chrono::Utc;
use gantry_shared::api::{ClaimGrant, MutexGrant};
use gantry_shared::ids::WorkerId;
use gantry_shared::mask::Masker;
use gantry_shared::service_messages::{self, SHELL_HELPERS, ServiceMessage};
use gantry_shared::template;
use gantry_shared::wire::{
    ARTIFACT_CHUNK_BYTES, ArtifactChunk, ArtifactSum, Event, Job, Origin, Outcome, OutputVariable,
    Progress, StepFinished, StepStarted, StepWaiting, Stream, Syntax,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::emitter::{BATCH_BYTES, BATCH_LINES};
pub use crate::output::MAX_LINE;
/// How long a line may wait for companions before its batch goes out.
pub const BATCH_DELAY: Duration = Duration::from_millis(50);
/// How long output may still arrive after the script's process group is gone.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Everything a step needs from its agent.
pub struct StepContext {
    /// Run nothing and fail the attempt with this reason (the job is not the one published).
    pub refuse: Option<String>,
    pub api: crate::api::Api,
    pub slots: std::sync::Arc<crate::slots::Slots>,
    pub job: Job,
    pub grant: ClaimGrant,
    pub worker_id: WorkerId,
    pub worker_name: String,
    pub work_root: PathBuf,
    pub keep_work_dir: bool,
    /// Who the script runs as (see [`crate::step_users`]).
    pub step_users: Arc<crate::step_users::StepUsers>,
    pub outbox: Outbox,
    /// Cancelled to stop the step (a cancel request or the agent's forced shutdown).
    pub cancel: CancellationToken,
}

/// An OS user that scripts run as.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

impl RunAs {
    /// Look a user up by name.
    pub fn lookup(name: &str) -> Result<Self, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(Self {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                home: u.dir,
            }),
            Ok(None) => Err(format!("there is no OS user {name:?}")),
            Err(e) => Err(format!("cannot look up OS user {name:?}: {e}")),
        }
    }
}

/// How the script's run ended.
enum End {
    Exited(std::process::ExitStatus),
    TimedOut,
    Cancelled,
    /// The step's mutex lease was lost: it was killed at once.
    LockLost(String),
}

/// The step's hold on its mutex, renewed through the dispatcher while it runs.
struct MutexHold {
    /// Fires when the lease is lost; the reason is in `why`.
    lost: CancellationToken,
    why: Arc<std::sync::Mutex<Option<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

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
        let em = Emitter::new(origin.clone(), ctx.outbox.clone(), masker);
        em.event(Event::StepFinished(StepFinished {
            origin,
            outcome: Outcome::Failed,
            exit_code: None,
            line_count: 0,
            error: Some(why.clone()),
            finished_at: Utc::now(),
            artifacts: Vec::new(),
        }))
        .await;
        return;
    }
    let hold = ctx.grant.mutex.as_ref().map(|m| hold_mutex(&ctx, m));
    let mut em = Emitter::new(origin.clone(), ctx.outbox.clone(), masker);
    // Exclusive steps run alone on the agent: wait for the gate (and say so).
    if let Some(waiting_for) = ctx.slots.gate_wait_reason(job.exclusive, &ctx.worker_name) {
        em.event(Event::StepWaiting(StepWaiting {
            origin: em.origin(),
            waiting_for,
        }))
        .await;
    }
    let entered = tokio::select! {
        _ = ctx.slots.gate_enter(job.exclusive) => true,
        _ = ctx.cancel.cancelled() => false,
        _ = lost(&hold) => false,
    };
    if !entered {
        // Cancelled (or its mutex lost) before it could start: it never ran.
        ctx.slots.gate_abandon(job.exclusive);
        let why = hold
            .as_ref()
            .and_then(|h| h.why.lock().expect("lock").clone())
            .unwrap_or_else(|| "cancelled before it started".into());
        em.gantry(&format!("Step did not start: {why}")).await;
        end_hold(&ctx, hold).await;
        em.flush().await;
        em.event(Event::StepFinished(StepFinished {
            origin: em.origin(),
            outcome: if ctx.cancel.is_cancelled() {
                Outcome::Cancelled
            } else {
                Outcome::Failed
            },
            exit_code: None,
            line_count: em.next_seq,
            error: Some(why),
            finished_at: Utc::now(),
            artifacts: Vec::new(),
        }))
        .await;
        return;
    }
    let started_at = Utc::now();
    em.event(Event::StepStarted(StepStarted {
        origin: em.origin(),
        started_at,
    }))
    .await;
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
        Ok(u) => execute(&ctx, &mut em, &work_dir, u.run_as.as_ref(), hold.as_ref()).await,
        Err(e) => Err(e.clone()),
    };
    ctx.slots.gate_exit(job.exclusive);
    end_hold(&ctx, hold).await;
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
        upload_artifacts(&ctx, &mut em, &work_dir).await
    };
    if let Err(e) = end_work_dir(&ctx, &work_dir, step_user).await {
        em.gantry(&format!("warning: {e}")).await;
    }
    em.flush().await;
    let error = error.map(|e| em.masker.mask(&e).into_owned());
    em.event(Event::StepFinished(StepFinished {
        origin: em.origin(),
        outcome,
        exit_code,
        line_count: em.next_seq,
        error,
        finished_at: Utc::now(),
        artifacts,
    }))
    .await;
}

/// Collect the step's artifacts and send each in chunks; returns those sent in full.
async fn upload_artifacts(
    ctx: &StepContext,
    em: &mut Emitter,
    work_dir: &Path,
) -> Vec<ArtifactSum> {
    let collected = {
        let (dir, requested, globs) = (
            work_dir.to_path_buf(),
            em.requested_artifacts.clone(),
            ctx.job.artifacts.clone(),
        );
        tokio::task::spawn_blocking(move || crate::artifacts::collect(&dir, &requested, &globs))
            .await
            .unwrap_or_default()
    };
    for w in &collected.warnings {
        em.gantry(&format!("warning: {w}")).await;
    }
    let mut sums = Vec::new();
    // Every file tried gets its own index, so chunks of one that failed half-way never mix
    // with the next one's.
    for (index, wanted) in collected.files.into_iter().enumerate() {
        let index = index as u32;
        if ctx.cancel.is_cancelled() {
            em.gantry("warning: artifact upload stopped: the step was cancelled")
                .await;
            break;
        }
        match upload_one(ctx, em, index, &wanted).await {
            Ok(Some(sum)) => {
                em.gantry(&format!(
                    "Artifact {} uploaded: {} bytes, sha256 {}",
                    sum.name, sum.size, sum.sha256
                ))
                .await;
                sums.push(sum);
            }
            Ok(None) => {
                em.gantry("warning: artifact upload stopped: the step was cancelled")
                    .await;
                break;
            }
            Err(e) => {
                // Chunks already sent for it are dropped by the dispatcher, since
                // `StepFinished` does not list it.
                em.gantry(&format!(
                    "warning: artifact {} not uploaded: cannot read {}: {e}",
                    wanted.name,
                    wanted.path.display()
                ))
                .await;
            }
        }
    }
    sums
}

/// Send one file as chunks. `Ok(None)` if cancelled meanwhile.
async fn upload_one(
    ctx: &StepContext,
    em: &mut Emitter,
    index: u32,
    wanted: &crate::artifacts::Wanted,
) -> std::io::Result<Option<ArtifactSum>> {
    let mut reader = crate::artifacts::Reader::open(wanted).await?;
    loop {
        if ctx.cancel.is_cancelled() {
            return Ok(None);
        }
        let offset = reader.size;
        let seq = reader.chunks;
        let Some(data) = reader.next(ARTIFACT_CHUNK_BYTES).await? else {
            break;
        };
        // Waits while the outbox is full: the file is read as fast as the broker confirms.
        em.event(Event::ArtifactChunk(ArtifactChunk {
            origin: em.origin.clone(),
            artifact: index,
            name: wanted.name.clone(),
            seq,
            offset,
            data,
        }))
        .await;
    }
    let (size, chunks) = (reader.size, reader.chunks);
    Ok(Some(ArtifactSum {
        artifact: index,
        name: wanted.name.clone(),
        size,
        chunks,
        sha256: reader.sha256(),
    }))
}

type StepResult = (Outcome, Option<i32>, Option<String>);

async fn execute(
    ctx: &StepContext,
    em: &mut Emitter,
    work_dir: &Path,
    user: Option<&RunAs>,
    hold: Option<&MutexHold>,
) -> Result<StepResult, String> {
    let job = &ctx.job;
    let mut vars: BTreeMap<String, String> = job.variables.clone();
    vars.extend(ctx.grant.sensitive_variables.clone());
    vars.insert("Gantry.Worker.Name".into(), ctx.worker_name.clone());
    let script = template::render(&job.script, |name| vars.get(name).cloned()).map_err(|name| {
        match template::output_reference(name) {
            Some((step, out)) => format!(
                "the script reads #{{{name}}}, but step {step} set no output variable {out:?}"
            ),
            None => format!("the script reads #{{{name}}}, which has no value"),
        }
    })?;
    // Created private and handed to the step's user (see `workdir`); the script, which
    // holds its secrets, is never readable by anyone else.
    let files = {
        let (dir, owner, syntax) = (
            work_dir.to_path_buf(),
            user.map(|u| (u.uid, u.gid)),
            job.syntax,
        );
        let script = script.into_bytes();
        tokio::task::spawn_blocking(move || write_step_files(&dir, owner, syntax, &script))
            .await
            .map_err(|e| format!("cannot create working directory: {e}"))?
            .map_err(|e| {
                format!(
                    "cannot create working directory {}: {e}",
                    work_dir.display()
                )
            })?
    };
    let StepFiles {
        helpers,
        python_helpers,
        script: script_path,
    } = files;
    let script_arg = script_path.display().to_string();
    let argv: Vec<&str> = match job.syntax {
        Syntax::Bash => vec!["bash", "--noprofile", "--norc", &script_arg],
        Syntax::Sh => vec![
            "sh",
            "-c",
            ". \"$GANTRY_HELPERS\"; . \"$1\"",
            "gantry-step",
            &script_arg,
        ],
        Syntax::Python3 => vec!["python3", "-u", &script_arg],
    };
    // Through the guard, so that the script dies with this agent (see `guard`).
    let mut cmd = match std::env::current_exe() {
        Ok(me) => {
            // The small `gantry-guard` beside this binary; this binary's own `guard`
            // subcommand (the same code, slower to start) when it is not installed.
            let small = me.with_file_name(crate::guard::BINARY);
            let mut c = if small.is_file() {
                tokio::process::Command::new(small)
            } else {
                let mut c = tokio::process::Command::new(me);
                c.arg("guard");
                c
            };
            if let Some(user) = user {
                // The guard stays this agent's user: it can always be started (the agent's
                // binary need not be reachable by the step's user) and can always kill.
                c.arg("--uid")
                    .arg(user.uid.to_string())
                    .arg("--gid")
                    .arg(user.gid.to_string());
            }
            c.arg("--").args(&argv);
            c
        }
        Err(e) => {
            em.gantry(&format!(
                "warning: cannot find the agent's own binary ({e}); running the script unguarded"
            ))
            .await;
            let mut c = tokio::process::Command::new(argv[0]);
            c.args(&argv[1..]);
            if let Some(user) = user {
                c.uid(user.uid).gid(user.gid);
            }
            c
        }
    };
    // Built from scratch: the agent's own environment (its configuration, which may hold
    // credentials, and whatever else its operator exported) stays with the agent.
    cmd.env_clear();
    cmd.envs(gantry_shared::stepenv::base(
        std::env::vars_os(),
        user.map(|u| gantry_shared::stepenv::User {
            name: &u.name,
            home: &u.home,
        }),
    ));
    let mut not_exported = Vec::new();
    for (name, value) in &vars {
        match template::env_name(name) {
            Some(env) if !is_reserved_env(&env) => {
                cmd.env(env, value);
            }
            Some(_) => not_exported.push(name.as_str()),
            None => {}
        }
    }
    if !not_exported.is_empty() {
        em.gantry(&format!(
            "warning: not exported to the environment (reserved names): {}; #{{...}} substitution still works",
            not_exported.join(", ")
        ))
        .await;
    }
    if job.syntax == Syntax::Bash {
        // Non-interactive bash sources $BASH_ENV first: that is how the helpers arrive
        // without touching the user's script (and its line numbers).
        cmd.env("BASH_ENV", &helpers);
    }
    if let Some(m) = &ctx.grant.mutex {
        cmd.env("GANTRY_MUTEX", &m.name)
            .env("GANTRY_MUTEX_TOKEN", m.token.to_string());
    }
    if job.syntax == Syntax::Python3 {
        // The helpers arrive as builtins through `sitecustomize`.
        cmd.env("PYTHONPATH", python_helpers.as_os_str());
    }
    cmd.env("GANTRY_HELPERS", &helpers)
        .env("GANTRY_TASK_ID", job.task_id.to_string())
        .env("GANTRY_STEP_NAME", &job.step_name)
        .env("GANTRY_STEP_ATTEMPT", job.attempt.to_string())
        .env("GANTRY_WORK_DIR", work_dir)
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(work_dir)
        // Held open by this agent for the step's life: the guard's signal that we live.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", job.syntax.as_str()))?;
    let pgid = child.id().map(|p| p as i32);
    let _lifeline = child.stdin.take();
    let (line_tx, mut line_rx) = mpsc::channel::<(Stream, Chunk)>(crate::output::QUEUE);
    // Shared by both pipes: drops unread output once the step is stopped.
    let budget = crate::output::Budget::new();
    // A flood is taken only as fast as the dispatcher stores it.
    let mut window = crate::window::Window::start(ctx.api.clone(), ctx.job.job_id);
    let readers = [
        tokio::spawn(crate::output::read(
            child.stdout.take().expect("piped"),
            Stream::Stdout,
            line_tx.clone(),
            budget.clone(),
        )),
        tokio::spawn(crate::output::read(
            child.stderr.take().expect("piped"),
            Stream::Stderr,
            line_tx,
            budget.clone(),
        )),
    ];
    // Timeout, cancel and lease loss are watched by a task of their own, which signals the
    // process group itself: whatever the script prints, or however slowly the broker takes
    // it, a stop is never late.
    let grace = Duration::from_secs(
        job.cancel_grace_secs
            .unwrap_or(gantry_shared::process::DEFAULT_CANCEL_GRACE_SECS)
            .min(gantry_shared::process::MAX_CANCEL_GRACE_SECS),
    );
    let stopper = Stopper::start(
        pgid,
        Signals {
            deadline: crate::stopper::deadline(tokio::time::Instant::now(), job.timeout_secs),
            cancel: ctx.cancel.clone(),
            lease_lost: hold.map(|h| (h.lost.clone(), h.why.clone())),
            grace,
        },
    );
    let mut fail_message: Option<String> = None;
    let mut ticker = tokio::time::interval(BATCH_DELAY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut end: Option<End> = None;
    let mut lines_open = true;
    let mut stop_told = false;
    // Set once the script ended: output still open after it comes from a process that left
    // the step's process group (setsid) and is not waited for.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    // Until the script has exited and both pipes are drained.
    while end.is_none() || lines_open {
        if end.is_some() && drain_deadline.is_none() {
            drain_deadline = tokio::time::Instant::now().checked_add(DRAIN_AFTER_EXIT);
        }
        // Once the script exited (what is left is bounded by the pipes) or was stopped (it is
        // dropped), the rest is taken at once.
        let (lines, bytes) = em.emitted();
        let paused = end.is_none() && !stop_told && window.full(lines, bytes);
        tokio::select! {
            biased;
            status = child.wait(), if end.is_none() => {
                let status = match status {
                    Ok(s) => s,
                    Err(e) => {
                        stopper.ended();
                        return Err(format!("lost track of the script's process: {e}"));
                    }
                };
                // Whatever the script left behind in its group goes with it; this also
                // closes pipes that background children held open.
                if let Some(pg) = pgid {
                    let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
                }
                stopper.ended();
                end = Some(match stopper.reason() {
                    Some(Reason::TimedOut) => End::TimedOut,
                    Some(Reason::Cancelled) => End::Cancelled,
                    Some(Reason::LockLost(why)) => End::LockLost(why),
                    None => End::Exited(status),
                });
            }
            _ = stopper.fired(), if !stop_told => {
                stop_told = true;
                // Output not read yet would only hold the step's end up: dropped.
                budget.discard();
                match stopper.reason() {
                    Some(Reason::TimedOut) => em.gantry(&format!(
                        "Step exceeded timeout_secs = {}; stopping its processes",
                        job.timeout_secs.unwrap_or_default()
                    )).await,
                    Some(Reason::Cancelled) => em.gantry("Step cancelled; stopping its processes").await,
                    Some(Reason::LockLost(why)) => em.gantry(&format!("Step stopped: {why}")).await,
                    None => {}
                }
            }
            _ = sleep_until(drain_deadline), if drain_deadline.is_some() => {
                em.gantry("warning: a process outside the step's process group still holds its output open; no longer reading it").await;
                break;
            }
            _ = ticker.tick() => {
                if em.batch.first().is_some_and(|l| Utc::now() - l.ts >= chrono::Duration::milliseconds(BATCH_DELAY.as_millis() as i64)) {
                    em.flush().await;
                }
            }
            _ = window.moved(), if paused => {}
            msg = line_rx.recv(), if lines_open && !paused => match msg {
                Some((stream, chunk)) => {
                    handle_chunk(ctx, em, stream, chunk, &mut fail_message).await;
                }
                None => lines_open = false,
            },
        }
    }
    // Lines read before we stopped listening still belong to the log.
    while let Ok((stream, chunk)) = line_rx.try_recv() {
        handle_chunk(ctx, em, stream, chunk, &mut fail_message).await;
    }
    em.close_pieces().await;
    if budget.dropped() > 0 {
        em.gantry(&format!(
            "{} bytes of output still unread when the step was stopped were dropped",
            budget.dropped()
        ))
        .await;
    }
    for r in readers {
        r.abort();
    }
    stopper.finish().await;
    Ok(match end.expect("loop ends only once the script ended") {
        End::Exited(status) => {
            let code = status.code();
            match (code, fail_message) {
                (Some(0), None) => (Outcome::Success, Some(0), None),
                (Some(c), Some(m)) => (Outcome::Failed, Some(c), Some(m)),
                (Some(c), None) => (Outcome::Failed, Some(c), None),
                (None, m) => {
                    use std::os::unix::process::ExitStatusExt;
                    let sig = status.signal().unwrap_or_default();
                    (
                        Outcome::Failed,
                        None,
                        Some(m.unwrap_or_else(|| format!("killed by signal {sig}"))),
                    )
                }
            }
        }
        End::TimedOut => (
            Outcome::TimedOut,
            None,
            Some(format!(
                "exceeded timeout_secs = {}",
                job.timeout_secs.unwrap_or_default()
            )),
        ),
        End::Cancelled => (Outcome::Cancelled, None, Some("cancelled".into())),
        End::LockLost(why) => (Outcome::Failed, None, Some(why)),
    })
}

/// Renew the step's mutex lease through the dispatcher (`POST /api/jobs/{id}/lease`) every
/// third of the lease; on losing it, say why and fire `lost`. A dispatcher (or Redis behind
/// it) that cannot renew it counts as lost once half the lease has passed since the last
/// renewal, so the step is dead well before anyone else can be granted the mutex.
fn hold_mutex(ctx: &StepContext, grant: &MutexGrant) -> MutexHold {
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
async fn end_hold(_ctx: &StepContext, hold: Option<MutexHold>) {
    let Some(h) = hold else { return };
    h.stop.cancel();
    let _ = h.task.await;
}

async fn lost(hold: &Option<MutexHold>) {
    lost_ref(hold.as_ref()).await
}

async fn lost_ref(hold: Option<&MutexHold>) {
    match hold {
        Some(h) => h.lost.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Environment names a process variable may not override: the shell's and the runtime's own,
/// and Gantry's.
fn is_reserved_env(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "OLDPWD",
        "TMPDIR",
        "LANG",
        "TERM",
        "IFS",
        "ENV",
        "CDPATH",
        "PS4",
        "SHELLOPTS",
        "BASHOPTS",
        "HOSTNAME",
    ];
    const PREFIXES: &[&str] = &["GANTRY_", "BASH_", "LD_", "LC_", "PYTHON"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One chunk of output: a service message (stdout lines that start with `##gantry[`, whole),
/// or a line or piece of one for the log.
async fn handle_chunk(
    ctx: &StepContext,
    em: &mut Emitter,
    stream: Stream,
    chunk: Chunk,
    fail_message: &mut Option<String>,
) {
    let (text, last) = match chunk {
        Chunk::TooLong => {
            em.gantry(&format!(
                "warning: ignored a service message longer than {} bytes",
                service_messages::MAX_MESSAGE_BYTES
            ))
            .await;
            return;
        }
        Chunk::Part(text) => (text, false),
        Chunk::End(text) => (text, true),
    };
    if stream == Stream::Stdout
        && last
        && !em.line_open(stream)
        && let Some(parsed) = service_messages::parse_line(&text)
    {
        match parsed {
            Err(reason) => {
                em.gantry(&format!(
                    "warning: ignored a malformed service message: {reason}"
                ))
                .await;
            }
            Ok(msg) => service_message(ctx, em, msg, fail_message).await,
        }
        return;
    }
    em.piece(stream, &text, last).await;
}

async fn service_message(
    ctx: &StepContext,
    em: &mut Emitter,
    msg: ServiceMessage,
    fail_message: &mut Option<String>,
) {
    use gantry_shared::text::into_storable;
    match msg {
        ServiceMessage::SetVariable {
            name,
            value,
            sensitive,
        } => {
            let (name, value) = (into_storable(name), into_storable(value));
            if em.masker.mask(&name) != name.as_str() {
                // Names are shown and stored in clear: one holding a secret is refused.
                em.gantry("warning: ignored an output variable whose name holds a sensitive value")
                    .await;
                return;
            }
            // A value that holds a known secret is as sensitive as that secret.
            let holds_secret = !sensitive && em.masker.mask(&value) != value.as_str();
            if sensitive || holds_secret {
                em.masker.add(&value);
                // Sensitive values never travel through the broker: straight to the
                // dispatcher, which seals them.
                match send_sensitive_output(ctx, &name, &value).await {
                    Ok(()) if holds_secret => {
                        em.gantry(&format!(
                            "Output variable {name} set (sensitive: its value holds a sensitive value)"
                        ))
                        .await
                    }
                    Ok(()) => {
                        em.gantry(&format!("Output variable {name} set (sensitive)"))
                            .await
                    }
                    Err(e) => {
                        em.gantry(&format!(
                            "warning: sensitive output variable {name} was not stored: {e}"
                        ))
                        .await
                    }
                }
                return;
            }
            em.gantry(&format!("Output variable {name} set")).await;
            let origin = em.origin.clone();
            em.event(Event::OutputVariable(OutputVariable {
                origin,
                name,
                value: Some(value),
                sensitive: false,
            }))
            .await;
        }
        ServiceMessage::Mask { value } => {
            em.masker.add(&into_storable(value));
        }
        ServiceMessage::Progress {
            percentage,
            message,
        } => {
            let message = into_storable(message);
            em.gantry(&format!("Progress {percentage}%: {message}"))
                .await;
            let origin = em.origin.clone();
            em.event(Event::Progress(Progress {
                origin,
                percentage,
                message: em.masker.mask(&message).into_owned(),
            }))
            .await;
        }
        ServiceMessage::Fail { message } => {
            let message = into_storable(message);
            em.gantry(&format!("Step failed: {message}")).await;
            *fail_message = Some(if message.is_empty() {
                "the script called fail_step".into()
            } else {
                message
            });
        }
        ServiceMessage::CreateArtifact { path, name } => {
            let name = name.map(into_storable);
            let shown = match &name {
                Some(n) if !n.is_empty() => format!("{n} ({path})"),
                _ => path.clone(),
            };
            em.gantry(&format!(
                "Artifact {shown} will be collected when the script ends"
            ))
            .await;
            em.requested_artifacts.push((path, name));
        }
    }
}

/// Store a sensitive output over the API, retrying while the dispatcher is unreachable.
async fn send_sensitive_output(ctx: &StepContext, name: &str, value: &str) -> Result<(), String> {
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match ctx.api.sensitive_output(ctx.job.job_id, name, value).await {
            Ok(()) => return Ok(()),
            Err(crate::api::ApiError::Unavailable(m)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %m, "cannot store a sensitive output yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The agent's files in a step's working directory.
struct StepFiles {
    helpers: PathBuf,
    python_helpers: PathBuf,
    script: PathBuf,
}

/// Create the step's directory and the agent's files in it, all private to the step's
/// user from the start (blocking).
fn write_step_files(
    work_dir: &Path,
    owner: Option<(u32, u32)>,
    syntax: Syntax,
    script: &[u8],
) -> std::io::Result<StepFiles> {
    let mut dir = crate::workdir::StepDir::create(work_dir, owner)?;
    dir.mkdir(".gantry")?;
    let helpers = dir.write(".gantry/helpers.sh", SHELL_HELPERS.as_bytes())?;
    let python_helpers = work_dir.join(".gantry/python");
    if syntax == Syntax::Python3 {
        dir.mkdir(".gantry/python")?;
        dir.write(
            ".gantry/python/sitecustomize.py",
            gantry_shared::service_messages::PYTHON_HELPERS.as_bytes(),
        )?;
    }
    let script = dir.write(
        match syntax {
            Syntax::Python3 => ".gantry/script.py",
            _ => ".gantry/script.sh",
        },
        script,
    )?;
    dir.hand_over()?;
    Ok(StepFiles {
        helpers,
        python_helpers,
        script,
    })
}

/// After the step: kill what its own uid still runs, remove its directory (or, when kept,
/// take it back from a uid that will serve another step), then free the uid.
async fn end_work_dir(
    ctx: &StepContext,
    work_dir: &Path,
    step_user: Result<crate::step_users::StepUser, String>,
) -> Result<(), String> {
    let (dir, keep) = (work_dir.to_path_buf(), ctx.keep_work_dir);
    tokio::task::spawn_blocking(move || {
        let leased = step_user.as_ref().is_ok_and(|u| u.is_leased());
        if let Ok(u) = &step_user {
            u.stop_leftovers();
        }
        let r = if !keep {
            crate::workdir::remove(&dir)
                .map_err(|e| format!("cannot remove the working directory {}: {e}", dir.display()))
        } else if leased && dir.exists() {
            crate::workdir::reclaim(&dir)
                .map_err(|e| format!("cannot take back the kept directory {}: {e}", dir.display()))
        } else {
            Ok(())
        };
        drop(step_user);
        r
    })
    .await
    .map_err(|e| e.to_string())?
}
