//! # Monitors: small background loops, one file per noun
//!
//! - [`dead_letters`]: consumes `<ns>.dead` into `dead_letters` (acking every message, even
//!   one PostgreSQL refuses) and fails the attempt of a dead-lettered job;
//! - [`availability`]: marks workers whose heartbeats stopped `Unavailable`;
//! - [`worker_loss`]: notices lost agents (no consumer on their control queue, or silent),
//!   and [`lost`] ends their attempts `WorkerLost` and sends their parked jobs back to the
//!   pool.
//!
//! (Heartbeats themselves are stored by `heartbeats`.)

mod availability;
mod dead_letters;
mod lost;
mod worker_loss;

pub use availability::spawn_availability;
pub use dead_letters::spawn_dead_letters;
pub use worker_loss::{LOST_AFTER_CONNECTION, RECONNECT_GRACE, spawn_worker_loss};

use crate::store::settings;
use sqlx::PgPool;
use std::time::Duration;

/// How often worker availability and worker loss are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Allowance for a heartbeat's way from the agent through the broker into PostgreSQL.
pub const HEARTBEAT_TRANSIT: Duration = Duration::from_secs(1);

/// The machine policy's `unavailable_after`: a worker with no heartbeat for this long is
/// `Unavailable` (and lost, if it runs steps).
async fn unavailable_after(db: &PgPool) -> crate::store::Result<Duration> {
    Ok(Duration::from_secs(u64::from(
        settings::get(db)
            .await?
            .machine_policy
            .unavailable_after_secs,
    )))
}

/// A worker counts as silent once its last stored heartbeat is older than this:
/// `unavailable_after` less the check cadence and [`HEARTBEAT_TRANSIT`] (at most a quarter of
/// it), so that a frozen agent is `Unavailable`, and its steps `WorkerLost`, at most
/// `unavailable_after` after its last heartbeat left it (28 s of silence, found within 29 s,
/// with the default 30 s).
pub fn silent_after(unavailable_after: Duration) -> Duration {
    let lead = CHECK_EVERY
        .saturating_add(HEARTBEAT_TRANSIT)
        .min(unavailable_after / 4);
    unavailable_after.saturating_sub(lead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_and_cadence_add_up_to_unavailable_after() {
        let ua = Duration::from_secs(30);
        assert_eq!(silent_after(ua), Duration::from_secs(28));
        assert!(silent_after(ua) + CHECK_EVERY + HEARTBEAT_TRANSIT <= ua);
        // Short policies keep three quarters of their threshold.
        assert_eq!(
            silent_after(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(silent_after(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            silent_after(Duration::from_secs(86_400)),
            Duration::from_secs(86_398)
        );
    }
}
