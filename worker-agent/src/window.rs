//! # Pacing a step's output by what the dispatcher has stored
//!
//! Like a TCP window: a running step may have at most [`WINDOW_LINES`] lines and
//! [`WINDOW_BYTES`] bytes of log text emitted but not yet stored by the dispatcher. While the
//! window is full the step's output loop takes no more output: its readers stop reading, the
//! pipes fill, and the script blocks in its writes. So a script printing as fast as it can
//! (`yes`) runs at the speed the dispatcher stores its lines, and never builds a backlog of
//! more than a window in the agent, the broker or the dispatcher: once it is stopped (timeout,
//! cancel, lost lease: see [`crate::stopper`], which does not depend on this) its end is
//! stored moments later.
//!
//! The stored position comes from `GET /api/jobs/{job_id}/log` (`{"lines_stored": N}`), asked
//! by a task of its own only while more than half the window is in flight, so a step that
//! prints little makes no request at all. While the window stays over half full it asks again
//! after [`MIN_DELAY`], doubling up to [`MAX_DELAY`] while nothing moves (or the dispatcher
//! cannot be reached: the step just waits, its stopper still ends it). N is only a pacing
//! hint. A refusal (the attempt is no longer running here, or a dispatcher without the route)
//! turns pacing off for the step.

use crate::api::{Api, ApiError};
use gantry_shared::ids::JobId;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::watch;

/// Lines emitted but not yet stored, at most.
pub const WINDOW_LINES: u64 = 20_000;
/// Bytes of log text emitted but not yet stored, at most.
pub const WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// Delay before asking again while the window stays over half full, at least.
pub const MIN_DELAY: Duration = Duration::from_millis(20);
/// Delay before asking again, at most.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// A mark of the bytes emitted is kept at least every this many lines or bytes.
const MARK_LINES: u64 = 256;
const MARK_BYTES: u64 = 64 * 1024;

/// The output window of one running step.
pub struct Window {
    /// Lines stored as last heard; `u64::MAX`: pacing is off.
    stored: watch::Receiver<u64>,
    /// Whether more than half the window is in flight (the poller asks only then).
    wanted: watch::Sender<bool>,
    /// (lines, bytes) emitted at points along the way, oldest first, not yet known stored.
    marks: VecDeque<(u64, u64)>,
    /// Bytes emitted up to the newest mark known stored.
    bytes_stored: u64,
    limits: (u64, u64),
    poller: tokio::task::JoinHandle<()>,
}

impl Window {
    /// Pace the output of `job`, with the position asked from `api`.
    pub fn start(api: Api, job: JobId) -> Self {
        Self::with_limits(api, job, WINDOW_LINES, WINDOW_BYTES)
    }

    pub fn with_limits(api: Api, job: JobId, lines: u64, bytes: u64) -> Self {
        let (stored_tx, stored) = watch::channel(0u64);
        let (wanted, wanted_rx) = watch::channel(false);
        let poller = tokio::spawn(poll(api, job, stored_tx, wanted_rx));
        Self {
            stored,
            wanted,
            marks: VecDeque::new(),
            bytes_stored: 0,
            limits: (lines.max(1), bytes.max(1)),
            poller,
        }
    }

    /// Whether the window is full with `lines` lines and `bytes` bytes emitted so far; tells
    /// the poller whether to ask.
    pub fn full(&mut self, lines: u64, bytes: u64) -> bool {
        let stored = *self.stored.borrow();
        if stored == u64::MAX {
            self.marks.clear();
            return false;
        }
        let last = self.marks.back().copied().unwrap_or((0, 0));
        if lines.saturating_sub(last.0) >= MARK_LINES || bytes.saturating_sub(last.1) >= MARK_BYTES
        {
            self.marks.push_back((lines, bytes));
        }
        while let Some(&(l, b)) = self.marks.front() {
            if l > stored {
                break;
            }
            self.bytes_stored = b;
            self.marks.pop_front();
        }
        let in_lines = lines.saturating_sub(stored);
        let in_bytes = bytes.saturating_sub(self.bytes_stored);
        let (max_lines, max_bytes) = self.limits;
        let over_half = in_lines > max_lines / 2 || in_bytes > max_bytes / 2;
        self.wanted
            .send_if_modified(|w| std::mem::replace(w, over_half) != over_half);
        in_lines >= max_lines || in_bytes >= max_bytes
    }

    /// Resolves when the stored position may have moved.
    pub async fn moved(&mut self) {
        if self.stored.changed().await.is_err() {
            // The poller is gone: never wait for it again.
            std::future::pending::<()>().await;
        }
    }

    /// Whether pacing was turned off (the dispatcher refused to say).
    pub fn off(&self) -> bool {
        *self.stored.borrow() == u64::MAX
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

async fn poll(api: Api, job: JobId, stored: watch::Sender<u64>, mut wanted: watch::Receiver<bool>) {
    let mut delay = MIN_DELAY;
    loop {
        if wanted.wait_for(|w| *w).await.is_err() {
            return;
        }
        match api.job_log(job).await {
            Ok(log) => {
                let moved = stored.send_if_modified(|s| {
                    let n = log.lines_stored.min(u64::MAX - 1);
                    if n > *s {
                        *s = n;
                        true
                    } else {
                        false
                    }
                });
                delay = if moved {
                    MIN_DELAY
                } else {
                    delay.saturating_mul(2).min(MAX_DELAY)
                };
            }
            Err(ApiError::Unavailable(e)) => {
                tracing::debug!(%job, error = %e, "cannot learn how much of the log is stored; waiting");
                delay = delay.saturating_mul(2).min(MAX_DELAY);
            }
            Err(e) => {
                tracing::warn!(%job, error = %e, "the dispatcher does not say how much of the log is stored; output is no longer paced");
                stored.send_replace(u64::MAX);
                return;
            }
        }
        // Asked again only if it is still over half full after the nap.
        tokio::time::sleep(delay).await;
        if !*wanted.borrow() {
            delay = MIN_DELAY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_by_lines_or_bytes_and_stays_shut_while_nobody_answers() {
        // Nothing listens on port 1: every question fails to connect.
        let api = Api::new("http://127.0.0.1:1", None, None).unwrap();
        let mut w = Window::with_limits(api, JobId::new(), 100, 1000);
        assert!(!w.full(0, 0));
        assert!(!w.full(99, 10));
        assert!(w.full(100, 10), "a window of lines");
        assert!(w.full(10, 1000), "a window of bytes");
        assert!(w.full(u64::MAX, u64::MAX), "huge counts: full, no overflow");
        // The dispatcher cannot be reached: the window stays shut, pacing stays on.
        let waited = tokio::time::timeout(Duration::from_millis(300), w.moved()).await;
        assert!(waited.is_err());
        assert!(w.full(100, 10) && !w.off());
    }
}
