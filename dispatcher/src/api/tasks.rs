//! `/api/tasks`: start a task from a process (`TaskCreate`), list and read them (`TaskView`).

use super::error::{ApiError, ApiResult};
use super::extract::{AppJson, Caller, OptionalJson, parse_id};
use super::{AppState, query_map};
use crate::attempts;
use crate::store::{pools, tasks};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use gantry_shared::api::{Permission, Task, TaskCreated, TaskSummary};
use gantry_shared::ids::{PoolId, StepRunId, TaskId, WorkerId};
use gantry_shared::process::{Location, Process};
use gantry_shared::states::TaskState;

const STATES: [&str; 7] = [
    "Queued",
    "Executing",
    "Waiting",
    "Cancelling",
    "Success",
    "Failed",
    "Cancelled",
];

pub async fn create(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(process): AppJson<Process>,
) -> ApiResult<(StatusCode, Json<TaskCreated>)> {
    caller.require(Permission::TaskCreate)?;
    process.validate()?;
    // Room on this node first, holding no connection meanwhile (the node's count is shared
    // with takes that need one).
    let owned = s.orchestrator.reserve_new().await;
    let created = create_in_tx(&s, &caller, &process, owned).await;
    if owned && created.is_err() {
        s.orchestrator.unreserve().await;
    }
    let id = created?;
    tracing::info!(task = %id, name = %process.name, steps = process.steps.len(), "task created");
    Ok((
        StatusCode::CREATED,
        Json(TaskCreated {
            id,
            name: process.name,
            state: TaskState::Queued.as_str().into(),
        }),
    ))
}

/// One transaction for everything a submission reads and writes, its first advance included
/// when this node owns the task (`owned`): one commit per task.
async fn create_in_tx(
    s: &AppState,
    caller: &Caller,
    process: &Process,
    owned: bool,
) -> ApiResult<TaskId> {
    let mut tx = s.db.begin().await?;
    let step_pools = resolve_pools(s, &mut tx, process).await?;
    let owner = owned.then(|| s.orchestrator.node().id);
    let (id, variables) = tasks::create(
        &mut tx,
        &s.secrets,
        process,
        &step_pools,
        caller.key_id,
        owner,
    )
    .await?;
    let advanced = if owned {
        // In a savepoint: should the advance fail, the task is still created, and the sweep
        // starts it.
        let mut sp = sqlx::Connection::begin(&mut *tx).await?;
        let record = crate::orchestrator::TaskRecord {
            id,
            name: process.name.clone(),
            state: TaskState::Queued,
            variables,
        };
        match s.orchestrator.advance_in(&mut sp, record).await {
            Ok(done) => {
                sp.commit().await?;
                Some(done)
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "could not start the task at once; the sweep will");
                drop(sp);
                tasks::wake_new(&mut tx, id).await?;
                None
            }
        }
    } else {
        None
    };
    match tx.commit().await {
        Ok(()) => {
            if let Some(done) = advanced {
                s.orchestrator.committed(done);
            }
            Ok(id)
        }
        Err(e) => {
            if let Some(done) = advanced {
                s.orchestrator.rolled_back(done);
            }
            Err(e.into())
        }
    }
}

/// The pool of each step (`None`: it runs on the server), or a 400 naming the step whose
/// pool does not exist or cannot run it. Reads in the submission's transaction.
async fn resolve_pools(
    s: &AppState,
    tx: &mut sqlx::PgConnection,
    process: &Process,
) -> ApiResult<Vec<Option<PoolId>>> {
    let default_pool = pools::default_pool(&mut *tx).await?;
    // Read only if a step could need the built-in worker: most submissions never ask.
    let mut builtin_enabled: Option<bool> = None;
    let mut builtin = async |tx: &mut sqlx::PgConnection| -> ApiResult<bool> {
        if builtin_enabled.is_none() {
            builtin_enabled = Some(
                crate::store::settings::get(&mut *tx)
                    .await?
                    .builtin_worker_enabled,
            );
        }
        Ok(builtin_enabled == Some(true))
    };
    let mut step_pools: Vec<Option<PoolId>> = Vec::with_capacity(process.steps.len());
    for (i, step) in process.steps.iter().enumerate() {
        if step.kind != gantry_shared::process::StepKind::Script {
            // Manual and e-mail steps are the dispatcher's own: no pool, no worker.
            step_pools.push(None);
            continue;
        }
        let pool = match (&step.pool, step.location) {
            (Some(_), Location::Server) => {
                return Err(ApiError::bad(
                    format!("steps[{i}].pool"),
                    "a step runs either on a pool or on the server, not both",
                ));
            }
            (None, Location::Server) => {
                if !s.builtin_runs_code {
                    return Err(ApiError::bad(
                        format!("steps[{i}].location"),
                        format!(
                            "step {} runs on the server, but with production = true the built-in worker runs user code only as an unprivileged builtin_worker.user, which is not set",
                            step.name
                        ),
                    ));
                }
                if !builtin(&mut *tx).await? {
                    return Err(ApiError::bad(
                        format!("steps[{i}].location"),
                        format!(
                            "step {} runs on the server, but the built-in worker is disabled (builtin_worker_enabled = false in /api/settings)",
                            step.name
                        ),
                    ));
                }
                None
            }
            (Some(reference), Location::Pool) => Some(
                pools::find(&mut *tx, reference)
                    .await?
                    .ok_or_else(|| {
                        ApiError::bad(
                            format!("steps[{i}].pool"),
                            format!("no worker pool named {reference:?}"),
                        )
                    })?
                    .id,
            ),
            (None, Location::Pool) => Some(default_pool.id),
        };
        if pool == Some(default_pool.id)
            && !(s.builtin_runs_code && builtin(&mut *tx).await?)
            && !pools::has_registered_workers(&mut *tx, default_pool.id).await?
        {
            return Err(ApiError::bad(
                format!("steps[{i}].pool"),
                format!(
                    "step {} runs in the default pool {}, which has no registered worker, and the built-in worker is disabled (builtin_worker_enabled = false in /api/settings)",
                    step.name, default_pool.name
                ),
            ));
        }
        step_pools.push(pool);
    }
    Ok(step_pools)
}

pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<TaskSummary>>> {
    caller.require(Permission::TaskView)?;
    let q = query_map(q.as_deref())?;
    let state = q.get("state").map(String::as_str).filter(|s| !s.is_empty());
    if let Some(st) = state
        && !STATES.contains(&st)
    {
        return Err(ApiError::bad(
            "state",
            format!("unknown state {st:?}; one of {}", STATES.join(", ")),
        ));
    }
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad("limit", "must be a number from 1 to 1000"))?,
    };
    Ok(Json(tasks::list(&s.db, state, limit).await?))
}

pub async fn get(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Task>> {
    caller.require(Permission::TaskView)?;
    Ok(Json(tasks::get(&s.db, parse_id(&id, "task")?).await?))
}

/// `POST /api/tasks/{id}/cancel`: steps not started never start (jobs already queued are
/// refused at their claim), waiting and queued attempts end at once (giving up their mutexes),
/// and running scripts are stopped by their agents: SIGTERM to the process group, SIGKILL
/// after a grace. The task ends `Cancelled` once nothing runs any more.
pub async fn cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<TaskCreated>)> {
    caller.require(Permission::TaskCreate)?;
    let task: TaskId = parse_id(&id, "task")?;
    let mut tx = s.db.begin().await?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT name, state FROM tasks WHERE id = $1 FOR UPDATE")
            .bind(task.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((name, state)) = row else {
        return Err(ApiError::not_found(format!("no task with id {task}")));
    };
    if tasks::is_terminal(&state) {
        return Err(ApiError::Conflict(format!(
            "task {task} has already ended ({state}); there is nothing to cancel"
        )));
    }
    if state == "Cancelling" {
        return Ok((
            StatusCode::ACCEPTED,
            Json(TaskCreated {
                id: task,
                name,
                state,
            }),
        ));
    }
    sqlx::query("UPDATE tasks SET state = 'Cancelling' WHERE id = $1")
        .bind(task.0)
        .execute(&mut *tx)
        .await?;
    crate::logs::append_system(&mut tx, task, None, "Cancellation requested").await?;
    let live: Vec<(uuid::Uuid, i32, String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.state, a.worker_id FROM attempts a
         JOIN step_runs s ON s.id = a.step_run_id
         WHERE s.task_id = $1 AND a.state IN ('Waiting', 'Pending', 'Queued', 'Running')",
    )
    .bind(task.0)
    .fetch_all(&mut *tx)
    .await?;
    let mut releases = Vec::new();
    let mut running = Vec::new();
    for (step_run, attempt, state, worker) in live {
        let step_run = StepRunId(step_run);
        let attempt = attempt as u32;
        if state == "Running" {
            if let Some(w) = worker {
                running.push((WorkerId(w), step_run, attempt));
            }
            continue;
        }
        if let Some(locked) = attempts::lock(&mut tx, step_run, attempt).await? {
            attempts::conclude(
                &mut tx,
                &locked,
                step_run,
                attempt,
                crate::transitions::AttemptState::Cancelled,
                Some("cancelled before it started"),
                s.retry_base,
            )
            .await?;
            if let Some(mutex) = locked.mutex.clone() {
                releases.push((mutex, step_run, attempt, locked.mutex_token));
            }
        }
    }
    attempts::wake(&mut tx, task).await?;
    tx.commit().await?;
    for (mutex, step_run, attempt, token) in releases {
        // Give up the lease, or leave the queue for a step that was still waiting.
        s.locks
            .release_or_withdraw(&mutex, step_run, attempt, token.map(|t| t as u64))
            .await;
    }
    for (worker, step_run, attempt) in running {
        s.orchestrator
            .cancel_running(worker, step_run, attempt)
            .await;
    }
    s.orchestrator.kick(task);
    tracing::info!(%task, "cancellation requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(TaskCreated {
            id: task,
            name,
            state: "Cancelling".into(),
        }),
    ))
}

/// `POST /api/tasks/{id}/steps/{name}/approve` and `.../reject`: decide a manual step.
pub async fn approve(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, step)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<gantry_shared::api::Decision>,
) -> ApiResult<Json<gantry_shared::api::Approval>> {
    decide(s, caller, id, step, body, true).await
}

pub async fn reject(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, step)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<gantry_shared::api::Decision>,
) -> ApiResult<Json<gantry_shared::api::Approval>> {
    decide(s, caller, id, step, body, false).await
}

async fn decide(
    s: AppState,
    caller: Caller,
    id: String,
    step: String,
    body: Option<gantry_shared::api::Decision>,
    approve: bool,
) -> ApiResult<Json<gantry_shared::api::Approval>> {
    caller.require(Permission::TaskCreate)?;
    let task: TaskId = parse_id(&id, "task")?;
    let note = body.and_then(|d| d.note);
    let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if note.as_ref().is_some_and(|n| n.len() > 10_000) {
        return Err(ApiError::bad("note", "at most 10000 bytes"));
    }
    let mut tx = s.db.begin().await?;
    let row: Option<(String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT state, created_by FROM tasks WHERE id = $1 FOR UPDATE")
            .bind(task.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((state, created_by)) = row else {
        return Err(ApiError::not_found(format!("no task with id {task}")));
    };
    if !s.approvals_allow_self && created_by == Some(caller.key_id.0) {
        return Err(ApiError::Denied(format!(
            "this API key created task {task}, and approvals.allow_self = false: another key must {} its manual steps",
            if approve { "approve" } else { "reject" }
        )));
    }
    let found: Option<(
        uuid::Uuid,
        String,
        sqlx::types::Json<gantry_shared::process::StepSpec>,
    )> = sqlx::query_as(
        "SELECT id, state, spec FROM step_runs WHERE task_id = $1 AND name = $2 FOR UPDATE",
    )
    .bind(task.0)
    .bind(&step)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((step_run, step_state, spec)) = found else {
        return Err(ApiError::not_found(format!(
            "task {task} has no step named {step:?}"
        )));
    };
    if spec.0.kind != gantry_shared::process::StepKind::Manual {
        return Err(ApiError::Conflict(format!(
            "step {step} is not a manual step; only manual steps are approved or rejected"
        )));
    }
    type Decided = (
        Option<String>,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let approval: Option<Decided> = sqlx::query_as(
        "SELECT decision, decided_by, decided_at FROM approvals WHERE step_run_id = $1 FOR UPDATE",
    )
    .bind(step_run)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((Some(decision), by, at)) = &approval {
        return Err(ApiError::Conflict(format!(
            "step {step} was already {} by {} at {}",
            decision.to_lowercase(),
            by.as_deref().unwrap_or("someone"),
            at.map(|t| t.to_rfc3339()).unwrap_or_default()
        )));
    }
    if approval.is_none()
        || step_state != "Waiting"
        || crate::store::tasks::is_terminal(&state)
        || state == "Cancelling"
    {
        return Err(ApiError::Conflict(format!(
            "step {step} is not waiting for approval (the step is {step_state}, the task {state})"
        )));
    }
    let by: String = sqlx::query_scalar("SELECT name FROM api_keys WHERE id = $1")
        .bind(caller.key_id.0)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or_else(|| caller.key_id.to_string());
    let decision = if approve { "Approved" } else { "Rejected" };
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
    .bind(caller.key_id.0)
    .bind(&note)
    .fetch_one(&mut *tx)
    .await?;
    let mut reason = format!("{} by {by}", decision.to_lowercase());
    if let Some(n) = &note {
        reason.push_str(&format!(": {n}"));
    }
    sqlx::query("UPDATE step_runs SET state = $2, reason = $3, waiting_for = NULL WHERE id = $1")
        .bind(step_run)
        .bind(if approve { "Success" } else { "Failed" })
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
    crate::logs::append_system(
        &mut tx,
        task,
        Some((StepRunId(step_run), 0)),
        &format!("Step {step} {reason}"),
    )
    .await?;
    attempts::wake(&mut tx, task).await?;
    tx.commit().await?;
    s.orchestrator.kick(task);
    tracing::info!(%task, step, decision, by, "manual step decided");
    Ok(Json(gantry_shared::api::Approval {
        instructions,
        requested_at: Some(requested_at),
        decision: Some(decision.to_owned()),
        decided_by: Some(by),
        decided_at: Some(decided_at),
        note,
    }))
}
