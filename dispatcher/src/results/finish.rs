//! Concluding an attempt: once its `StepFinished` is stored, all its lines are and none of its
//! artifacts is still receiving.

use super::ResultConsumer;
use crate::artifacts;
use crate::attempts::{self, Locked};
use gantry_shared::ids::StepRunId;
use gantry_shared::wire::Origin;
use sqlx::PgConnection;

impl ResultConsumer {
    /// Conclude the attempt if its `StepFinished` is stored, all its lines are, and none of
    /// its artifacts is still receiving. A corrupt artifact fails an attempt that would
    /// otherwise succeed. `now` is the attempt's row as this transaction has left it, or, with
    /// `report`, as it will be once the end writes the agent's report. Returns true if the
    /// attempt ended.
    pub(super) async fn try_finish(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        origin: &Origin,
        now: Now,
        report: Option<&crate::transitions::Report<'_>>,
    ) -> sqlx::Result<bool> {
        let Now {
            outcome,
            line_count,
            lines_stored,
            exit_code,
            error,
            no_artifacts,
        } = now;
        let (Some(outcome), Some(line_count)) = (outcome, line_count) else {
            return Ok(false);
        };
        if lines_stored < line_count {
            return Ok(false);
        }
        let (receiving, corrupt) = if no_artifacts {
            (0, Vec::new())
        } else {
            artifacts::pending(conn, origin.step_run_id, origin.attempt).await?
        };
        if receiving > 0 {
            return Ok(false);
        }
        let (outcome, override_error) = if !corrupt.is_empty() && outcome == "Success" {
            (
                "Failed".to_owned(),
                Some(format!(
                    "artifact {} did not arrive intact (sha256 mismatch)",
                    corrupt.join(", ")
                )),
            )
        } else {
            (outcome, None)
        };
        let finished = Locked {
            lines_stored,
            line_count: Some(line_count),
            outcome: Some(outcome.clone()),
            exit_code,
            error: override_error.clone().or(error),
            ..locked.clone()
        };
        self.finish(
            conn,
            &finished,
            origin.step_run_id,
            origin.attempt,
            &outcome,
            override_error.as_deref(),
            report,
        )
        .await?;
        Ok(true)
    }

    /// End the attempt as `outcome` says, with `error` over the attempt's own; `report`: the
    /// agent's `StepFinished`, when it ends the attempt here and its row does not hold it yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn finish(
        &self,
        conn: &mut PgConnection,
        locked: &Locked,
        step_run: StepRunId,
        attempt: u32,
        outcome: &str,
        error: Option<&str>,
        report: Option<&crate::transitions::Report<'_>>,
    ) -> sqlx::Result<()> {
        if let Some(started) = locked.started_at {
            let secs = (chrono::Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics.observe_step_duration(secs);
        }
        // The agent's outcome as stored (`Success`, `Failed`, `TimedOut`, `Cancelled`); anything
        // else would be no final state, and counts as a failure.
        let state = outcome
            .parse::<attempts::AttemptState>()
            .ok()
            .filter(|s| s.is_final())
            .unwrap_or(attempts::AttemptState::Failed);
        // Quietly: the batch this is part of advances the task, or wakes it (`store`).
        attempts::conclude_quietly(
            conn,
            locked,
            step_run,
            attempt,
            state,
            error,
            self.retry_base,
            report,
        )
        .await
    }
}

/// The attempt's row as the current transaction has left it (what [`ResultConsumer::try_finish`]
/// needs), known without reading it again.
pub(super) struct Now {
    pub(super) outcome: Option<String>,
    pub(super) line_count: Option<i64>,
    pub(super) lines_stored: i64,
    pub(super) exit_code: Option<i32>,
    pub(super) error: Option<String>,
    /// True when the attempt is known to have no artifact rows.
    pub(super) no_artifacts: bool,
}

impl Now {
    /// As locked, with `lines_stored` as this transaction stored it.
    pub(super) fn locked(locked: &Locked, lines_stored: i64) -> Self {
        Self {
            outcome: locked.outcome.clone(),
            line_count: locked.line_count,
            lines_stored,
            exit_code: locked.exit_code,
            error: locked.error.clone(),
            no_artifacts: false,
        }
    }
}
