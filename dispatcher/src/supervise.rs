//! # Supervised background loops
//!
//! Every long-lived loop of a dispatcher node (mutex grants, sweeps, monitors, consumers,
//! LISTEN, reconciling broker users) runs under [`spawn`]: a loop that fails (returns an
//! error), ends while the node is not shutting down, or panics is logged at `warn` with its
//! name and started again after a backoff ([`FIRST_BACKOFF`], doubling up to [`MAX_BACKOFF`],
//! back to the first after it ran [`HEALTHY_AFTER`] without failing). Each restart counts in
//! `gantry_loop_restarts_total{loop="..."}` on `/metrics` (see [`render`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Wait before the first restart.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Restarts per loop name, for this process.
static RESTARTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

fn count_restart(name: &'static str) {
    let mut r = RESTARTS.lock().unwrap_or_else(|p| p.into_inner());
    let n = r.entry(name).or_insert(0);
    *n = n.saturating_add(1);
}

/// How many times the loop `name` was restarted in this process.
pub fn restarts(name: &str) -> u64 {
    RESTARTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .copied()
        .unwrap_or(0)
}

/// `gantry_loop_restarts_total` in the Prometheus text format.
pub fn render(out: &mut String) {
    out.push_str("# HELP gantry_loop_restarts_total Background loops of this node restarted after a failure or a panic.\n# TYPE gantry_loop_restarts_total counter\n");
    let r = RESTARTS.lock().unwrap_or_else(|p| p.into_inner());
    for (name, n) in r.iter() {
        let _ = writeln!(
            out,
            "gantry_loop_restarts_total{{loop=\"{}\"}} {n}",
            crate::metrics::label(name)
        );
    }
}

/// The next wait after `current`: doubled, at most [`MAX_BACKOFF`].
pub fn next_backoff(current: Duration) -> Duration {
    current.saturating_mul(2).min(MAX_BACKOFF)
}

/// Run the loop that `make` builds under supervision until `cancel` fires (see the module
/// docs). `make` is called again for each restart.
pub fn spawn<F, Fut>(name: &'static str, cancel: CancellationToken, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let started = Instant::now();
            let outcome = tokio::spawn(make()).await;
            if cancel.is_cancelled() {
                return;
            }
            let why = match outcome {
                Ok(Ok(())) => "it ended while the node was running".to_owned(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) if e.is_panic() => format!("it panicked: {}", panic_text(e.into_panic())),
                Err(e) => format!("its task was stopped: {e}"),
            };
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = FIRST_BACKOFF;
            }
            count_restart(name);
            tracing::warn!(
                target: "gantry_dispatcher::supervise",
                r#loop = name,
                error = %why,
                retry_in_ms = backoff.as_millis() as u64,
                "a background loop failed; restarting it"
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = next_backoff(backoff);
        }
    });
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// [`spawn`] a loop that runs `pass` every `period`, the first at once, until `cancel` fires.
/// A pass that fails is logged ([`pass_failed`]) and tried again at the next tick; a tick
/// missed while a pass ran is not made up for.
pub fn every<F, Fut>(name: &'static str, period: Duration, cancel: CancellationToken, pass: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let pass = std::sync::Arc::new(pass);
    spawn(name, cancel.clone(), move || {
        let (pass, cancel) = (pass.clone(), cancel.clone());
        async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                if let Err(e) = pass().await {
                    pass_failed(name, &format!("{e:#}"));
                }
            }
        }
    });
}

/// Log a failed pass of a loop that retries on its next tick (it is not restarted: only
/// this pass failed).
pub fn pass_failed(name: &'static str, e: &dyn std::fmt::Display) {
    tracing::warn!(r#loop = name, error = %e, "a background loop's pass failed; will retry");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = FIRST_BACKOFF;
        let mut seen = vec![b];
        for _ in 0..20 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(seen[1], Duration::from_millis(200));
        assert_eq!(*seen.last().unwrap(), MAX_BACKOFF);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_and_counted() {
        let cancel = CancellationToken::new();
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let r = runs.clone();
        spawn("test-panics", cancel.clone(), move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(restarts("test-panics"), 2);
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("gantry_loop_restarts_total{loop=\"test-panics\"} 2"));
        cancel.cancel();
    }
}
