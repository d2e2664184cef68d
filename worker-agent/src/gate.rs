//! # The exclusive gate: a reader/writer gate over an agent's running steps
//!
//! Ordinary steps are readers, exclusive ones (`exclusive = true`) writers. Writers are
//! preferred: once an exclusive step waits, no ordinary step starts, and the agent takes no
//! new work (the gate asks the slot manager to stop its consumers, see
//! [`crate::slots`]) until the exclusive step has run.
//!
//! The gate knows nothing of consumers or queues: it is given the [`Notify`] the slot manager
//! waits on (woken whenever the gate changes) and a function that stops the agent's intake.

use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
struct GateState {
    ordinary: u32,
    exclusive_running: bool,
    exclusive_waiting: u32,
}

impl GateState {
    fn exclusive_ahead(&self) -> bool {
        self.exclusive_running || self.exclusive_waiting > 0
    }
}

/// The reader/writer gate of one agent.
pub struct Gate {
    state: Mutex<GateState>,
    /// Woken on every change of the gate (shared with the slot manager).
    changed: Arc<Notify>,
    /// Stops the agent's intake: called when an exclusive step starts waiting.
    pause_intake: Box<dyn Fn() + Send + Sync>,
}

impl Gate {
    pub fn new(changed: Arc<Notify>, pause_intake: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            state: Mutex::new(GateState::default()),
            changed,
            pause_intake,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().expect("gate lock poisoned")
    }

    /// An exclusive step runs or waits: no new work may come in.
    pub fn busy(&self) -> bool {
        self.lock().exclusive_ahead()
    }

    /// Why a step would have to wait at the gate now, if it would.
    pub fn wait_reason(&self, exclusive: bool, worker: &str) -> Option<String> {
        let g = self.lock();
        if exclusive {
            if g.exclusive_ahead() {
                Some(format!(
                    "exclusive access to worker {worker}: another exclusive step is ahead"
                ))
            } else if g.ordinary > 0 {
                Some(format!(
                    "exclusive access to worker {worker}: {} other step(s) running there",
                    g.ordinary
                ))
            } else {
                None
            }
        } else if g.exclusive_ahead() {
            Some(format!("an exclusive step on worker {worker} to finish"))
        } else {
            None
        }
    }

    /// Pass the gate: an exclusive step when nothing else runs, an ordinary one when no
    /// exclusive step runs or waits. An exclusive step stops the agent's intake meanwhile.
    pub async fn enter(&self, exclusive: bool) {
        if exclusive {
            self.lock().exclusive_waiting += 1;
            // Nothing new comes in while we wait or run.
            (self.pause_intake)();
        }
        loop {
            let notified = self.changed.notified();
            {
                let mut g = self.lock();
                if exclusive && !g.exclusive_running && g.ordinary == 0 {
                    g.exclusive_waiting -= 1;
                    g.exclusive_running = true;
                    return;
                }
                if !exclusive && !g.exclusive_ahead() {
                    g.ordinary += 1;
                    return;
                }
            }
            notified.await;
        }
    }

    /// Leave the gate after the step ran.
    pub fn exit(&self, exclusive: bool) {
        {
            let mut g = self.lock();
            if exclusive {
                g.exclusive_running = false;
            } else {
                g.ordinary = g.ordinary.saturating_sub(1);
            }
        }
        self.changed.notify_waiters();
    }

    /// Give up waiting at the gate (cancelled before starting).
    pub fn abandon(&self, exclusive: bool) {
        if exclusive {
            let mut g = self.lock();
            g.exclusive_waiting = g.exclusive_waiting.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    fn gate() -> (Arc<Gate>, Arc<AtomicU32>) {
        let paused = Arc::new(AtomicU32::new(0));
        let p = paused.clone();
        let g = Gate::new(
            Arc::new(Notify::new()),
            Box::new(move || {
                p.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (Arc::new(g), paused)
    }

    async fn enters_soon(g: &Arc<Gate>, exclusive: bool) -> bool {
        let g = g.clone();
        tokio::time::timeout(Duration::from_millis(100), async move {
            g.enter(exclusive).await
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn an_exclusive_step_waits_for_the_running_ones_and_goes_before_new_ones() {
        // Arrange: one ordinary step inside.
        let (g, paused) = gate();
        g.enter(false).await;
        assert_eq!(g.wait_reason(false, "w"), None);

        // Act: an exclusive step arrives.
        let waiting = tokio::spawn({
            let g = g.clone();
            async move { g.enter(true).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;

        // Assert: it waits, stopped the intake, and keeps new ordinary steps out.
        assert!(!waiting.is_finished());
        assert_eq!(paused.load(Ordering::SeqCst), 1);
        assert!(g.busy());
        assert!(
            g.wait_reason(false, "w")
                .unwrap()
                .contains("exclusive step on worker w")
        );
        assert!(!enters_soon(&g, false).await);
        g.exit(false);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(
            g.wait_reason(true, "w")
                .unwrap()
                .contains("another exclusive step")
        );
        g.exit(true);
        assert!(!g.busy());
        assert!(enters_soon(&g, false).await);
    }

    #[tokio::test]
    async fn an_abandoned_exclusive_wait_lets_ordinary_steps_in_again() {
        let (g, _) = gate();
        g.enter(false).await;
        let waiting = tokio::spawn({
            let g = g.clone();
            async move { g.enter(true).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        let _ = waiting.await;
        g.abandon(true);
        assert!(!g.busy());
        assert!(enters_soon(&g, false).await);
    }
}
