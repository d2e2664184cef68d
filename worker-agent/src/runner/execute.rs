//! Starting a step's script and reading its output until it has ended and its pipes are
//! drained, however it ends (see [`crate::stopper`]).

use super::mutex::MutexHold;
use super::{BATCH_DELAY, DRAIN_AFTER_EXIT, End, RunAs, StepContext, StepResult};
use crate::emitter::Emitter;
use crate::output::Chunk;
use crate::stopper::{Reason, Signals, Stopper};
use chrono::Utc;
use gantry_shared::wire::{Outcome, Stream};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

/// Run the step's script to its end: start it, read its output, stop it when told to.
pub(super) async fn execute(
    ctx: &StepContext,
    em: &mut Emitter,
    work_dir: &Path,
    user: Option<&RunAs>,
    hold: Option<&MutexHold>,
) -> Result<StepResult, String> {
    let job = &ctx.job;
    let cmd = super::command::prepare(ctx, em, work_dir, user).await?;
    let mut child = match ctx.supervisor.spawn(cmd).await {
        Ok(c) => c,
        // The interpreter could not be run (not on PATH, say): exit code 127, as a shell
        // reports a command it cannot run.
        Err(e) if e.raw_os_error().is_some() => {
            em.gantry(&format!("cannot start {}: {e}", job.syntax.as_str()))
                .await;
            return Ok((Outcome::Failed, Some(127), None));
        }
        Err(e) => return Err(format!("cannot start {}: {e}", job.syntax.as_str())),
    };
    let pgid = child.id().map(|p| p as i32);
    // Kills the group and tells the supervisor it ended, however this function ends.
    let mut group = Group {
        pgid,
        killed: false,
        supervisor: &ctx.supervisor,
    };
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
                group.kill();
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
                    super::service::handle_chunk(ctx, em, stream, chunk, &mut fail_message).await;
                }
                None => lines_open = false,
            },
        }
    }
    // Lines read before we stopped listening still belong to the log.
    while let Ok((stream, chunk)) = line_rx.try_recv() {
        super::service::handle_chunk(ctx, em, stream, chunk, &mut fail_message).await;
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
            // As a shell reports it: a script killed by signal N ended with 128 + N.
            let code = {
                use std::os::unix::process::ExitStatusExt;
                status.code().or_else(|| status.signal().map(|s| 128 + s))
            };
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

/// A running step's process group: killed (once) when the script has ended, or when
/// [`execute`] returns in any other way, then announced ended to the supervisor.
struct Group<'a> {
    pgid: Option<i32>,
    killed: bool,
    supervisor: &'a crate::supervisor::Supervisor,
}

impl Group<'_> {
    /// SIGKILL to what is left of the group. Only right after its leader was reaped or
    /// while it runs, never later: an empty group's number can be taken again.
    fn kill(&mut self) {
        if let (Some(pg), false) = (self.pgid, self.killed) {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
            self.killed = true;
        }
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        self.kill();
        if let Some(pg) = self.pgid {
            self.supervisor.ended(pg);
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
