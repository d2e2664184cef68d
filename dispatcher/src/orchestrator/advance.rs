//! One advance of a task: load its rows under the task's lock, plan, apply, commit.

use super::plan::{self, StepRow};
use super::{Inner, Outgoing, apply};
use crate::nodes;
use chrono::{DateTime, Utc};
use gantry_shared::ids::TaskId;
use gantry_shared::process::{Condition, StepKind};
use gantry_shared::states::{AttemptState, StepState, TaskState, Variants};
use sqlx::PgConnection;
use std::sync::Arc;
use uuid::Uuid;

/// A step run as the plan sees it: what the plan needs of it, and its pool. The full spec is
/// read only for a step being started ([`super::facts`]).
#[derive(sqlx::FromRow, Clone)]
pub(super) struct StepRecord {
    pub id: Uuid,
    pub name: String,
    pub kind: StepKind,
    pub parallel: bool,
    #[sqlx(rename = "run_condition")]
    pub condition: Condition,
    pub mutex: Option<String>,
    pub state: StepState,
    pub attempt: i32,
    pub not_before: Option<DateTime<Utc>>,
    pub pool_id: Option<Uuid>,
    pub pool_slug: Option<String>,
    pub pool_name: Option<String>,
    pub pool_is_default: Option<bool>,
    /// The current attempt's state, read only while the step has not ended (a step that has
    /// ended has ended its attempt: the plan never asks).
    pub attempt_state: Option<AttemptState>,
    pub reason: Option<String>,
}

impl StepRecord {
    fn row(&self) -> StepRow {
        StepRow {
            name: self.name.clone(),
            kind: self.kind,
            parallel: self.parallel,
            condition: self.condition,
            has_mutex: self.mutex.is_some(),
            state: self.state,
            attempt: self.attempt.max(0) as u32,
            attempt_state: self.attempt_state,
            not_before: self.not_before,
            reason: self.reason.clone(),
        }
    }
}

/// The columns of [`StepRecord`], for `FROM step_runs s LEFT JOIN pools p`.
///
/// The plan's fields are columns generated from the spec (migration
/// `20261202000003_step_plan_columns.sql`). The attempt is a correlated lookup, not a join: a
/// prepared statement's generic plan, made while the tables were small, would otherwise
/// hash-join a sequential scan of every attempt into each advance, and with a deep backlog
/// that was the dispatcher's main cost. It is made only for a step that has one and has not
/// ended.
pub(super) static STEP_COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let ended: Vec<StepState> = StepState::ALL
        .iter()
        .copied()
        .filter(|s| s.is_final())
        .collect();
    format!(
        "s.id, s.name, s.kind, s.parallel, s.run_condition, s.mutex, s.state, s.attempt,
         s.not_before, s.reason,
         s.pool_id, p.slug AS pool_slug, p.name AS pool_name, p.is_default AS pool_is_default,
         CASE WHEN s.attempt > 0 AND s.state NOT IN ({})
              THEN (SELECT a.state FROM attempts a
                    WHERE a.step_run_id = s.id AND a.attempt = s.attempt) END AS attempt_state",
        StepState::sql_list(&ended)
    )
});

/// The task being advanced, its row locked.
pub struct TaskRecord {
    pub id: TaskId,
    pub name: String,
    pub state: TaskState,
    pub variables: serde_json::Value,
}

/// name, state, variables, owner node, its lease expired, wake-up bump.
type TaskRow = (
    String,
    TaskState,
    serde_json::Value,
    Option<Uuid>,
    bool,
    Option<i64>,
);

/// One decision step for a task (see the module docs). Returns the jobs to publish.
pub(super) async fn advance(
    inner: &Arc<Inner>,
    task: TaskId,
    if_woken: bool,
) -> anyhow::Result<Vec<Outgoing>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT t.name, t.state, t.variables, {},
                    (SELECT bump FROM task_wakeups w WHERE w.task_id = t.id)
             FROM tasks t LEFT JOIN dispatcher_nodes n ON n.id = t.owner_node
             WHERE t.id = $1 FOR UPDATE OF t",
            nodes::ownership_columns()
        )
    });
    let mut tx = inner.db.begin().await?;
    let row: Option<TaskRow> = sqlx::query_as(SQL.as_str())
        .bind(task.0)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((name, state, variables, owner, expired, bump)) = row else {
        return Ok(Vec::new());
    };
    if if_woken && bump.is_none() {
        // Whoever deleted the wake-up decided on everything its wakers had committed.
        return Ok(Vec::new());
    }
    let ownership = nodes::Ownership { owner, expired };
    let decide_for = nodes::decide_or_take(&mut tx, &inner.node, task, state, ownership).await?;
    if decide_for == nodes::Decide::NotOurs {
        return Ok(Vec::new());
    }
    let record = TaskRecord {
        id: task,
        name,
        state,
        variables,
    };
    let done = decide_and_commit(inner, tx, &record, bump).await;
    if decide_for == nodes::Decide::Taken {
        nodes::reserved(&inner.node, done.is_ok()).await;
    }
    Ok(done?.after_commit(inner))
}

/// The rest of [`advance`] under the task's row lock: plan and apply (unless the task has
/// ended), the wake-up it answered deleted, the commit. If what follows the apply fails, the
/// attempts this advance was to publish are given back.
async fn decide_and_commit(
    inner: &Arc<Inner>,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    record: &TaskRecord,
    bump: Option<i64>,
) -> anyhow::Result<apply::Applied> {
    let mut done = apply::Applied::default();
    if !record.state.is_terminal() {
        done = decide(inner, &mut tx, record).await?;
    }
    let finished = async {
        if let Some(bump) = bump {
            sqlx::query("DELETE FROM task_wakeups WHERE task_id = $1 AND bump = $2")
                .bind(record.id.0)
                .bind(bump)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    };
    if let Err(e) = finished.await {
        done.give_back(inner);
        return Err(e.into());
    }
    Ok(done)
}

/// Load the task's step runs, plan and apply, in the caller's transaction (which holds the
/// task's row lock).
pub(super) async fn decide(
    inner: &Arc<Inner>,
    tx: &mut PgConnection,
    task: &TaskRecord,
) -> anyhow::Result<apply::Applied> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT {} FROM step_runs s LEFT JOIN pools p ON p.id = s.pool_id
             WHERE s.task_id = $1 ORDER BY s.idx",
            *STEP_COLUMNS
        )
    });
    let steps: Vec<StepRecord> = sqlx::query_as(SQL.as_str())
        .bind(task.id.0)
        .fetch_all(&mut *tx)
        .await?;
    let rows: Vec<StepRow> = steps.iter().map(StepRecord::row).collect();
    let decided = plan::plan(task.state, &rows, Utc::now());
    apply::apply(inner, tx, task, &steps, decided).await
}
