//! Tasks as the API shows them: creation (one transaction for the task, its step runs and
//! its secrets) and the views of `GET /api/tasks` and `GET /api/tasks/{id}`.

use super::Error;
// `create` is the task-creation path (being rewritten in issue 15); it still answers in
// the API's error type.
use crate::api::error::ApiResult;
use crate::secrets::SecretBox;
use gantry_shared::api::{Approval, Attempt, StepRun, Task, TaskSummary};
use gantry_shared::ids::{ApiKeyId, JobId, PoolId, StepRunId, TaskId, WorkerId};
use gantry_shared::mask::MASK;
use gantry_shared::process::Process;
use gantry_shared::states::{AttemptState, StepState, TaskState};
use sqlx::{FromRow, PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// Store a validated process as a new task. `pools[i]` is the pool of step `i` (`None`: it
/// runs on the server).
/// Insert a task, its step runs, its sealed secrets and its log position row in the caller's
/// transaction. With `owner`, the task starts owned by that node (which advances it in the
/// same transaction); without, a wake-up row asks whichever node takes it to start it.
pub async fn create(
    tx: &mut PgConnection,
    secrets: &SecretBox,
    process: &Process,
    pools: &[Option<PoolId>],
    caller: ApiKeyId,
    owner: Option<Uuid>,
) -> ApiResult<(TaskId, serde_json::Value)> {
    let id = TaskId::new();
    let mut variables = BTreeMap::new();
    let mut sealed: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in &process.variables {
        if value.is_sensitive() {
            sealed.push((name.clone(), secrets.seal(id.0, name, &value.value())));
        } else {
            variables.insert(name.clone(), value.value());
        }
    }
    // The stored process keeps the shape of what was submitted, minus sensitive values.
    let mut stored = serde_json::to_value(process).map_err(anyhow::Error::from)?;
    if let Some(vars) = stored.get_mut("variables").and_then(|v| v.as_object_mut()) {
        for (name, _) in &sealed {
            vars.insert(name.clone(), serde_json::json!({ "sensitive": true }));
        }
    }
    let variables = serde_json::to_value(&variables).map_err(anyhow::Error::from)?;
    sqlx::query(
        "INSERT INTO tasks (id, name, state, process, variables, created_by, owner_node)
         VALUES ($1, $2, 'Queued', $3, $4, $5, $6)",
    )
    .bind(id.0)
    .bind(&process.name)
    .bind(&stored)
    .bind(&variables)
    .bind(caller.0)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    let n = process.steps.len();
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let idx: Vec<i32> = (0..n as i32).collect();
    let names: Vec<&str> = process.steps.iter().map(|s| s.name.as_str()).collect();
    let specs: Vec<serde_json::Value> = process
        .steps
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::from)?;
    let pool_ids: Vec<Option<Uuid>> = pools.iter().map(|p| p.map(|p| p.0)).collect();
    sqlx::query(
        "INSERT INTO step_runs (id, task_id, idx, name, spec, pool_id)
         SELECT u.id, $1, u.idx, u.name, u.spec, u.pool_id
         FROM unnest($2::uuid[], $3::int[], $4::text[], $5::jsonb[], $6::uuid[])
              AS u(id, idx, name, spec, pool_id)",
    )
    .bind(id.0)
    .bind(&ids)
    .bind(&idx)
    .bind(&names)
    .bind(&specs)
    .bind(&pool_ids)
    .execute(&mut *tx)
    .await?;
    if !sealed.is_empty() {
        let (names, values): (Vec<&str>, Vec<&[u8]>) = sealed
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .unzip();
        sqlx::query(
            "INSERT INTO task_secrets (task_id, name, value)
             SELECT $1, u.name, u.value FROM unnest($2::text[], $3::bytea[]) AS u(name, value)",
        )
        .bind(id.0)
        .bind(&names)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
    }
    // The log position row, and a wake-up unless the creating node advances it at once.
    sqlx::query(
        "WITH w AS (INSERT INTO task_wakeups (task_id) SELECT $1 WHERE $2 RETURNING 1)
         INSERT INTO task_log_positions (task_id) VALUES ($1)",
    )
    .bind(id.0)
    .bind(owner.is_none())
    .execute(&mut *tx)
    .await?;
    Ok((id, variables))
}

/// Woken for its first advance after all (the creating node's advance did not go through).
pub async fn wake_new(conn: &mut PgConnection, task: TaskId) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO task_wakeups (task_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(task.0)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(FromRow)]
struct TaskRow {
    id: Uuid,
    name: String,
    state: TaskState,
    error: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<TaskRow> for TaskSummary {
    fn from(r: TaskRow) -> Self {
        TaskSummary {
            id: TaskId(r.id),
            name: r.name,
            state: r.state,
            error: r.error,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

const TASK_COLUMNS: &str = "id, name, state, error, created_at, started_at, finished_at";

pub async fn list(
    db: &PgPool,
    state: Option<TaskState>,
    limit: i64,
) -> super::Result<Vec<TaskSummary>> {
    let rows: Vec<TaskRow> = sqlx::query_as(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE ($1::text IS NULL OR state = $1)
         ORDER BY created_at DESC LIMIT $2"
    ))
    .bind(state)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(TaskSummary::from).collect())
}

pub async fn summary(db: &PgPool, id: TaskId) -> super::Result<TaskSummary> {
    let row: Option<TaskRow> =
        sqlx::query_as(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(db)
            .await?;
    row.map(TaskSummary::from)
        .ok_or_else(|| Error::not_found(format!("no task with id {id}")))
}

#[derive(FromRow)]
struct StepRow {
    id: Uuid,
    idx: i32,
    name: String,
    state: StepState,
    pool: Option<String>,
    waiting_for: Option<String>,
    reason: Option<String>,
    attempt: i32,
}

#[derive(FromRow)]
struct AttemptRow {
    step_run_id: Uuid,
    attempt: i32,
    job_id: Uuid,
    state: AttemptState,
    worker_id: Option<Uuid>,
    worker_name: Option<String>,
    exit_code: Option<i32>,
    error: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    queued_at: Option<chrono::DateTime<chrono::Utc>>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    lines_stored: i64,
}

pub async fn get(db: &PgPool, id: TaskId) -> super::Result<Task> {
    let summary = summary(db, id).await?;
    let steps: Vec<StepRow> = sqlx::query_as(
        "SELECT s.id, s.idx, s.name, s.state, p.name AS pool, s.waiting_for, s.reason, s.attempt
         FROM step_runs s LEFT JOIN pools p ON p.id = s.pool_id
         WHERE s.task_id = $1 ORDER BY s.idx",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.job_id, a.state, a.worker_id, a.worker_name,
                a.exit_code, a.error, a.created_at, a.queued_at, a.started_at, a.finished_at,
                a.lines_stored
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
         WHERE s.task_id = $1 ORDER BY a.step_run_id, a.attempt",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let outputs: Vec<(Uuid, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT o.step_run_id, o.name, o.value, o.sensitive
         FROM output_variables o JOIN step_runs s ON s.id = o.step_run_id AND o.attempt = s.attempt
         WHERE s.task_id = $1",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    type ApprovalRow = (
        Uuid,
        String,
        chrono::DateTime<chrono::Utc>,
        Option<String>,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<String>,
    );
    let approvals: Vec<ApprovalRow> = sqlx::query_as(
        "SELECT step_run_id, instructions, requested_at, decision, decided_by, decided_at, note
         FROM approvals WHERE task_id = $1",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let mut approvals: HashMap<Uuid, Approval> = approvals
        .into_iter()
        .map(
            |(step, instructions, requested_at, decision, decided_by, decided_at, note)| {
                (
                    step,
                    Approval {
                        instructions,
                        requested_at: Some(requested_at),
                        decision,
                        decided_by,
                        decided_at,
                        note,
                    },
                )
            },
        )
        .collect();
    let mut by_step: HashMap<Uuid, Vec<Attempt>> = HashMap::new();
    for a in attempts {
        by_step.entry(a.step_run_id).or_default().push(Attempt {
            attempt: a.attempt as u32,
            job_id: JobId(a.job_id),
            state: a.state,
            worker_id: a.worker_id.map(WorkerId),
            worker: a.worker_name,
            exit_code: a.exit_code,
            error: a.error,
            created_at: a.created_at,
            queued_at: a.queued_at,
            started_at: a.started_at,
            finished_at: a.finished_at,
            line_count: a.lines_stored,
        });
    }
    let mut outs: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for (step, name, value, sensitive) in outputs {
        let shown = if sensitive {
            MASK.to_owned()
        } else {
            value.unwrap_or_default()
        };
        outs.entry(step).or_default().insert(name, shown);
    }
    let steps = steps
        .into_iter()
        .map(|s| {
            let attempts = by_step.remove(&s.id).unwrap_or_default();
            let current = attempts.iter().find(|a| a.attempt == s.attempt as u32);
            let approval = approvals.remove(&s.id);
            StepRun {
                id: StepRunId(s.id),
                index: s.idx as u32,
                name: s.name,
                state: s.state,
                pool: s.pool,
                waiting_for: s.waiting_for,
                reason: s.reason,
                attempt: s.attempt as u32,
                worker: current.and_then(|a| a.worker.clone()),
                exit_code: current.and_then(|a| a.exit_code),
                queued_at: current.and_then(|a| a.queued_at),
                started_at: current
                    .and_then(|a| a.started_at)
                    .or(approval.as_ref().and_then(|a| a.requested_at)),
                finished_at: current
                    .and_then(|a| a.finished_at)
                    .or(approval.as_ref().and_then(|a| a.decided_at)),
                outputs: outs.remove(&s.id).unwrap_or_default(),
                attempts,
                approval,
            }
        })
        .collect();
    Ok(Task { summary, steps })
}
