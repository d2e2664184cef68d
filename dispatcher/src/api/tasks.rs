//! `/api/tasks`: start a task from a process (`TaskCreate`), list and read them (`TaskView`).

use super::error::{ApiError, ApiResult};
use super::extract::{AppJson, Caller, OptionalJson, parse_id};
use super::{AppState, query_map};
use crate::store::{approvals, pools, tasks};
use crate::transitions::{TaskState, Variants as _};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use gantry_shared::api::{Permission, Task, TaskCreated, TaskSummary};
use gantry_shared::ids::{PoolId, TaskId};
use gantry_shared::process::{Location, Process};

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
    if owned {
        s.orchestrator.reserved(created.is_ok()).await;
    }
    let id = created?;
    tracing::info!(task = %id, name = %process.name, steps = process.steps.len(), "task created");
    Ok((
        StatusCode::CREATED,
        Json(TaskCreated {
            id,
            name: process.name,
            state: TaskState::Queued,
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
    // Many steps name the same pool, or none: each pool is looked up once per submission.
    let mut found: std::collections::HashMap<&str, PoolId> = Default::default();
    let mut default_has_workers: Option<bool> = None;
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
            (Some(reference), Location::Pool) => match found.get(reference.as_str()) {
                Some(id) => Some(*id),
                None => {
                    let id = pools::find(&mut *tx, reference)
                        .await?
                        .ok_or_else(|| {
                            ApiError::bad(
                                format!("steps[{i}].pool"),
                                format!("no worker pool named {reference:?}"),
                            )
                        })?
                        .id;
                    found.insert(reference, id);
                    Some(id)
                }
            },
            (None, Location::Pool) => Some(default_pool.id),
        };
        if pool == Some(default_pool.id)
            && !(s.builtin_runs_code && builtin(&mut *tx).await?)
            && !match default_has_workers {
                Some(has) => has,
                None => *default_has_workers
                    .insert(pools::has_registered_workers(&mut *tx, default_pool.id).await?),
            }
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
    let state = match q.get("state").map(String::as_str).filter(|s| !s.is_empty()) {
        None => None,
        Some(st) => Some(st.parse::<TaskState>().map_err(|_| {
            ApiError::bad(
                "state",
                format!(
                    "unknown state {st:?}; one of {}",
                    TaskState::strs(TaskState::ALL).join(", ")
                ),
            )
        })?),
    };
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

/// `POST /api/tasks/{id}/cancel`: see [`crate::cancels::request`]. 202 with the task's state
/// (`Cancelling`), also when it was already cancelling.
pub async fn cancel(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<TaskCreated>)> {
    caller.require(Permission::TaskCreate)?;
    let task: TaskId = parse_id(&id, "task")?;
    let canceller = crate::cancels::Canceller {
        db: &s.db,
        orchestrator: &s.orchestrator,
        locks: &s.locks,
        retry_base: s.retry_base,
    };
    let (name, state) = crate::cancels::request(&canceller, task).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TaskCreated {
            id: task,
            name,
            state,
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
    let decision = approvals::Decision {
        task,
        step: &step,
        approve,
        note,
        by_key: caller.key_id,
        allow_self: s.approvals_allow_self,
    };
    // The decision woke the task (its wake-up row and NOTIFY): one path.
    let approval = approvals::decide(&s.db, &decision).await?;
    Ok(Json(approval))
}
