//! Manual steps' decisions: `POST /api/tasks/{id}/steps/{name}/approve|reject`, recorded under
//! the task's row lock, the step settled (`Success` or `Failed`) and the task woken.

use super::{Error, Result};
use crate::transitions::{self, StepState, TaskState};
use gantry_shared::api::Approval;
use gantry_shared::ids::{ApiKeyId, StepRunId, TaskId};
use gantry_shared::process::{StepKind, StepSpec};
use uuid::Uuid;

/// A decision on a manual step.
pub struct Decision<'a> {
    pub task: TaskId,
    pub step: &'a str,
    pub approve: bool,
    pub note: Option<String>,
    /// The deciding API key.
    pub by_key: ApiKeyId,
    /// `approvals.allow_self`: the key that created the task may decide.
    pub allow_self: bool,
}

impl Decision<'_> {
    /// `Approved` or `Rejected`, as the `approvals` row and the API say it.
    pub fn word(&self) -> &'static str {
        if self.approve { "Approved" } else { "Rejected" }
    }
}

type Decided = (
    Option<String>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// Record the decision and settle the step, in one transaction (the caller kicks the task's
/// orchestrator afterwards). Returns the approval as it now is.
pub async fn decide(db: &sqlx::PgPool, d: &Decision<'_>) -> Result<Approval> {
    let (task, step) = (d.task, d.step);
    let mut tx = db.begin().await?;
    let row: Option<(TaskState, Option<Uuid>)> =
        sqlx::query_as("SELECT state, created_by FROM tasks WHERE id = $1 FOR UPDATE")
            .bind(task.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((state, created_by)) = row else {
        return Err(Error::not_found(format!("no task with id {task}")));
    };
    if !d.allow_self && created_by == Some(d.by_key.0) {
        return Err(Error::Denied(format!(
            "this API key created task {task}, and approvals.allow_self = false: another key must {} its manual steps",
            if d.approve { "approve" } else { "reject" }
        )));
    }
    let found: Option<(Uuid, StepState, sqlx::types::Json<StepSpec>)> = sqlx::query_as(
        "SELECT id, state, spec FROM step_runs WHERE task_id = $1 AND name = $2 FOR UPDATE",
    )
    .bind(task.0)
    .bind(step)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((step_run, step_state, spec)) = found else {
        return Err(Error::not_found(format!(
            "task {task} has no step named {step:?}"
        )));
    };
    if spec.0.kind != StepKind::Manual {
        return Err(Error::conflict(format!(
            "step {step} is not a manual step; only manual steps are approved or rejected"
        )));
    }
    let approval: Option<Decided> = sqlx::query_as(
        "SELECT decision, decided_by, decided_at FROM approvals WHERE step_run_id = $1 FOR UPDATE",
    )
    .bind(step_run)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((Some(decision), by, at)) = &approval {
        return Err(Error::conflict(format!(
            "step {step} was already {} by {} at {}",
            decision.to_lowercase(),
            by.as_deref().unwrap_or("someone"),
            at.map(|t| t.to_rfc3339()).unwrap_or_default()
        )));
    }
    if approval.is_none()
        || step_state != StepState::Waiting
        || state.is_terminal()
        || state == TaskState::Cancelling
    {
        return Err(Error::conflict(format!(
            "step {step} is not waiting for approval (the step is {step_state}, the task {state})"
        )));
    }
    let by = super::keys::name(&mut tx, d.by_key)
        .await?
        .unwrap_or_else(|| d.by_key.to_string());
    let decision = d.word();
    let (decided_at, instructions, requested_at): (
        chrono::DateTime<chrono::Utc>,
        String,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "UPDATE approvals SET decision = $2, decided_by = $3, decided_by_key = $4, decided_at = now(),
             note = $5
         WHERE step_run_id = $1 RETURNING decided_at, instructions, requested_at",
    )
    .bind(step_run)
    .bind(decision)
    .bind(&by)
    .bind(d.by_key.0)
    .bind(&d.note)
    .fetch_one(&mut *tx)
    .await?;
    let mut reason = format!("{} by {by}", decision.to_lowercase());
    if let Some(n) = &d.note {
        reason.push_str(&format!(": {n}"));
    }
    let outcome = if d.approve {
        StepState::Success
    } else {
        StepState::Failed
    };
    let step_run = StepRunId(step_run);
    transitions::settle_step(&mut tx, step_run, outcome, Some(&reason)).await?;
    crate::logs::append_system(
        &mut tx,
        task,
        Some((step_run, 0)),
        &format!("Step {step} {reason}"),
    )
    .await?;
    crate::attempts::wake(&mut tx, task).await?;
    tx.commit().await?;
    tracing::info!(%task, step, decision, by, "manual step decided");
    Ok(Approval {
        instructions,
        requested_at: Some(requested_at),
        decision: Some(decision.to_owned()),
        decided_by: Some(by),
        decided_at: Some(decided_at),
        note: d.note.clone(),
    })
}
