//! The per-task storage quotas as the consumer applies them (`limits.*`, see
//! [`crate::quotas`]): a log batch or artifact chunk that would pass one is not stored and its
//! attempt fails.

use super::ResultConsumer;
use crate::attempts::Locked;
use crate::quotas::{self, Quota};
use gantry_shared::wire::Origin;
use sqlx::PgConnection;
use std::time::Duration;

impl ResultConsumer {
    /// Fail a live attempt that went past a quota, and ask its agent to stop the script.
    pub(super) async fn over_quota(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        origin: &Origin,
        worker: gantry_shared::ids::WorkerId,
        quota: Quota,
    ) -> sqlx::Result<()> {
        let limit = match quota {
            Quota::Log => self.limits.task_log_bytes,
            Quota::Artifacts => self.limits.artifact_bytes,
        };
        let (step_run, attempt) = (origin.step_run_id, origin.attempt);
        quotas::fail_attempt(
            conn,
            locked,
            step_run,
            attempt,
            quota,
            limit,
            self.retry_base,
        )
        .await?;
        // Its further events are stale once this commits; the cancel only saves the work.
        let orchestrator = self.orchestrator.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            orchestrator.cancel_running(worker, step_run, attempt).await;
        });
        Ok(())
    }
}
