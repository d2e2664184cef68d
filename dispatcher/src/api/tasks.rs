//! `/api/tasks`: start a task from a process (`TaskCreate`), list and read them (`TaskView`).

use super::error::{ApiError, ApiResult};
use super::extract::{AppJson, Caller, parse_id};
use super::{AppState, query_map};
use crate::store::{pools, tasks};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use gantry_shared::api::{Permission, Task, TaskCreated, TaskSummary};
use gantry_shared::ids::PoolId;
use gantry_shared::process::{Location, Process};

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
    let default_pool = pools::default_pool(&s.db).await?;
    let mut step_pools: Vec<PoolId> = Vec::with_capacity(process.steps.len());
    for (i, step) in process.steps.iter().enumerate() {
        let pool = match (&step.pool, step.location) {
            (Some(_), Location::Server) => {
                return Err(ApiError::bad(
                    format!("steps[{i}].pool"),
                    "a step runs either on a pool or on the server, not both",
                ));
            }
            (Some(reference), Location::Pool) => {
                pools::find(&s.db, reference)
                    .await?
                    .ok_or_else(|| {
                        ApiError::bad(
                            format!("steps[{i}].pool"),
                            format!("no worker pool named {reference:?}"),
                        )
                    })?
                    .id
            }
            (None, _) => default_pool.id,
        };
        step_pools.push(pool);
    }
    let id = tasks::create(&s.db, &s.secrets, &process, &step_pools, caller.key_id).await?;
    s.orchestrator.kick(id);
    tracing::info!(task = %id, name = %process.name, steps = process.steps.len(), "task created");
    Ok((
        StatusCode::CREATED,
        Json(TaskCreated {
            id,
            name: process.name,
            state: "Queued".into(),
        }),
    ))
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
