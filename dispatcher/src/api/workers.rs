//! `/api/workers`: registration (`ConfigureServer`), listing, enabling and disabling,
//! deregistration.

use super::AppState;
use super::error::ApiResult;
use super::extract::{AppJson, Caller, parse_id};
use crate::auth;
use crate::store::workers;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use gantry_shared::amqp::json_properties;
use gantry_shared::api::{
    HealthEvent, Permission, Worker, WorkerPatch, WorkerRegister, WorkerRegistered,
};
use gantry_shared::ids::WorkerId;
use gantry_shared::wire::Control;

/// `GET /api/workers[?builtin=true]`: registered workers, and with `builtin=true` the
/// dispatcher nodes' built-in workers too.
pub async fn list(
    State(s): State<AppState>,
    _caller: Caller,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> ApiResult<Json<Vec<Worker>>> {
    let q = super::query_map(q.as_deref())?;
    let builtin = matches!(q.get("builtin").map(String::as_str), Some("true" | "1"));
    Ok(Json(workers::list(&s.db, builtin).await?))
}

pub async fn get(
    State(s): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Worker>> {
    Ok(Json(workers::get(&s.db, parse_id(&id, "worker")?).await?))
}

/// `GET /api/workers/{id}/health`: the worker's health changes with their reasons, newest
/// first (the last 200).
pub async fn health_history(
    State(s): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<HealthEvent>>> {
    let id: WorkerId = parse_id(&id, "worker")?;
    workers::get(&s.db, id).await?;
    Ok(Json(
        crate::store::settings::health_history(&s.db, id, 200).await?,
    ))
}

async fn with_channel<F, Fut>(s: &AppState, f: F)
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if let Some(conn) = s.broker.current()
        && let Ok(ch) = conn.create_channel().await
    {
        f(ch.clone()).await;
        let _ = ch.close(200, "done".into()).await;
    }
}

pub async fn register(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<WorkerRegister>,
) -> ApiResult<(StatusCode, Json<WorkerRegistered>)> {
    caller.require(Permission::ConfigureServer)?;
    let token = auth::new_worker_token();
    let reg = workers::register(&s.db, &req, &auth::hash_secret(&token)).await?;
    let id = reg.worker.id;
    let topology = s.topology.clone();
    with_channel(&s, |ch| async move {
        if let Some(old) = reg.replaced {
            let _ = ch
                .queue_delete(
                    topology.worker_queue(old).into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        // The agent declares it too when it starts; declaring here means jobs routed to the
        // worker before then are kept.
        if let Err(e) = topology.declare_worker(&ch, id).await {
            tracing::warn!(error = %e, "could not declare the worker's queue yet");
        }
    })
    .await;
    tracing::info!(worker = %reg.worker.name, id = %id, "registered a worker");
    Ok((
        StatusCode::CREATED,
        Json(WorkerRegistered {
            worker: reg.worker,
            token,
            namespace: s.topology.namespace().to_owned(),
        }),
    ))
}

pub async fn patch(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(req): AppJson<WorkerPatch>,
) -> ApiResult<Json<Worker>> {
    caller.require(Permission::ConfigureServer)?;
    let id: WorkerId = parse_id(&id, "worker")?;
    let worker = workers::patch(&s.db, id, &req).await?;
    // Best effort: an agent that is not connected reads both when it starts.
    let mut messages = Vec::new();
    if let Some(n) = req.max_concurrent_steps {
        messages.push(Control::SetMaxConcurrentSteps {
            max_concurrent_steps: n,
        });
    }
    if let Some(enabled) = req.enabled {
        messages.push(Control::SetEnabled { enabled });
    }
    for msg in messages {
        if let Err(e) = s
            .control
            .publish(
                &s.topology.control_exchange(),
                &id.to_string(),
                &msg.encode(),
                json_properties(),
            )
            .await
        {
            tracing::debug!(error = %e, worker = %id, "control message not delivered (agent not connected?)");
        }
    }
    Ok(Json(worker))
}

pub async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Permission::ConfigureServer)?;
    let id: WorkerId = parse_id(&id, "worker")?;
    workers::delete(&s.db, id).await?;
    let topology = s.topology.clone();
    with_channel(&s, |ch| async move {
        let _ = ch
            .queue_delete(
                topology.worker_queue(id).into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    })
    .await;
    Ok(StatusCode::NO_CONTENT)
}
