//! # Stopping a running step
//!
//! A step is stopped by its timeout, a cancel (or the agent's forced shutdown) or the loss of
//! its mutex lease. A [`Stopper`] is a task of its own that waits for the first of these and
//! signals the step's process group itself, so nothing the script prints (the output loop may
//! be busy, or waiting for the broker) can delay a stop:
//!
//! - timeout and cancel: SIGTERM to the group, then SIGKILL `cancel_grace_secs` later if the
//!   script has not ended by then (at once when it is 0);
//! - a lost mutex lease: SIGKILL at once, since the step must not go on without its mutex.
//!
//! A timeout too far away to be represented is no deadline at all, never an overflow.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a step was stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    TimedOut,
    Cancelled,
    /// Its mutex lease was lost (why).
    LockLost(String),
}

/// What stops the step, besides its own end.
pub struct Signals {
    /// When it times out; `None`: never.
    pub deadline: Option<Instant>,
    pub cancel: CancellationToken,
    /// Fires when its mutex lease is lost, with the reason in the second half.
    pub lease_lost: Option<(CancellationToken, Arc<Mutex<Option<String>>>)>,
    /// Between SIGTERM and SIGKILL on a timeout or cancel.
    pub grace: Duration,
}

/// The deadline `timeout_secs` after `from`; `None` when there is no timeout or it lies
/// beyond what a clock can represent.
pub fn deadline(from: Instant, timeout_secs: Option<u64>) -> Option<Instant> {
    timeout_secs.and_then(|s| from.checked_add(Duration::from_secs(s)))
}

/// The stopper of one running step.
pub struct Stopper {
    reason: Arc<Mutex<Option<Reason>>>,
    fired: CancellationToken,
    ended: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Stopper {
    /// Watch `signals` for the step whose process group is `pgid`.
    pub fn start(pgid: Option<i32>, signals: Signals) -> Self {
        let reason = Arc::new(Mutex::new(None));
        let fired = CancellationToken::new();
        let ended = CancellationToken::new();
        let task = tokio::spawn({
            let (reason, fired, ended) = (reason.clone(), fired.clone(), ended.clone());
            async move {
                let lost = async {
                    match &signals.lease_lost {
                        Some((token, why)) => {
                            token.cancelled().await;
                            why.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .clone()
                                .unwrap_or_else(|| "its mutex lease was lost".into())
                        }
                        None => std::future::pending().await,
                    }
                };
                let why = tokio::select! {
                    _ = ended.cancelled() => return,
                    _ = sleep_until(signals.deadline) => Reason::TimedOut,
                    _ = signals.cancel.cancelled() => Reason::Cancelled,
                    why = lost => Reason::LockLost(why),
                };
                let kill_now = matches!(why, Reason::LockLost(_)) || signals.grace.is_zero();
                *reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                fired.cancel();
                let Some(pg) = pgid else { return };
                let pg = Pid::from_raw(pg);
                if kill_now {
                    let _ = killpg(pg, Signal::SIGKILL);
                    return;
                }
                let _ = killpg(pg, Signal::SIGTERM);
                tokio::select! {
                    _ = ended.cancelled() => {}
                    _ = tokio::time::sleep(signals.grace) => {
                        let _ = killpg(pg, Signal::SIGKILL);
                    }
                }
            }
        });
        Self {
            reason,
            fired,
            ended,
            task,
        }
    }

    /// Why the step was stopped, if it was.
    pub fn reason(&self) -> Option<Reason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves once the step is being stopped.
    pub async fn fired(&self) {
        self.fired.cancelled().await
    }

    /// The script has ended (and its process group was killed): signal nothing more.
    pub async fn finish(self) {
        self.ended.cancel();
        let _ = self.task.await;
    }

    /// Tell the stopper the script ended, without waiting for it.
    pub fn ended(&self) {
        self.ended.cancel();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_are_no_deadline() {
        let now = Instant::now();
        assert_eq!(deadline(now, Some(u64::MAX)), None);
        assert_eq!(deadline(now, Some(i64::MAX as u64)), None);
        assert_eq!(deadline(now, None), None);
        assert_eq!(deadline(now, Some(3)), Some(now + Duration::from_secs(3)));
    }
}
