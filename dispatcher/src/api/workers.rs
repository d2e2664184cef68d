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
    BrokerCredentials, HealthEvent, Permission, Worker, WorkerPatch, WorkerRegister,
    WorkerRegistered,
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

/// Tell a worker's agent to read its configuration again (best effort: an agent that is not
/// connected reads it when it connects).
async fn reconfigure(s: &AppState, id: WorkerId) {
    if let Err(e) = s
        .control
        .publish(
            &s.topology.control_exchange(),
            &id.to_string(),
            &Control::Reconfigure.encode(),
            json_properties(),
        )
        .await
    {
        tracing::debug!(error = %e, worker = %id, "reconfiguration not delivered (agent not connected?)");
    }
}

/// `POST /api/workers`: register a worker. With broker users in force its RabbitMQ user is
/// created in the same transaction (the registration fails with 503, and nothing is kept, if
/// the management API cannot take it).
pub async fn register(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<WorkerRegister>,
) -> ApiResult<(StatusCode, Json<WorkerRegistered>)> {
    caller.require(Permission::ConfigureServer)?;
    let token = auth::new_worker_token();
    let id = WorkerId(uuid::Uuid::now_v7());
    let ns = s.topology.namespace().to_owned();
    let (password, hash) = crate::broker_users::new_password();
    let broker_user = crate::broker_users::user_name(&ns, id);
    let mut tx = s.db.begin().await?;
    if s.broker_users.is_some() {
        crate::broker_users::lock(&mut tx).await?;
    }
    let reg = workers::register(
        &mut tx,
        id,
        &req,
        &auth::hash_secret(&token),
        s.broker_users
            .as_ref()
            .map(|_| (broker_user.as_str(), hash.as_str())),
    )
    .await?;
    let broker = match &s.broker_users {
        Some(users) => {
            users.create(id, &hash, &reg.slugs).await?;
            if let Some(old) = reg.replaced {
                users.remove(old).await?;
            }
            Some(BrokerCredentials {
                user: broker_user,
                password,
            })
        }
        None => None,
    };
    tx.commit().await?;
    let topology = s.topology.clone();
    with_channel(&s, |ch| async move {
        if let Some(old) = reg.replaced {
            let _ = ch
                .queue_delete(
                    topology.worker_queue(old).into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
            let _ = ch
                .queue_delete(
                    topology.control_queue(old).into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        // Agents declare nothing: the worker's own queue and control queue exist from now on,
        // so jobs routed to the worker before its agent starts are kept. (Every dispatcher
        // node declares them again on each new broker connection.)
        if let Err(e) = async {
            topology.declare_worker(&ch, id).await?;
            topology.declare_control(&ch, id).await
        }
        .await
        {
            tracing::warn!(error = %e, "could not declare the worker's queues yet");
        }
    })
    .await;
    tracing::info!(worker = %reg.worker.name, id = %id, broker_user = reg.worker.broker_user.as_deref().unwrap_or("shared"), "registered a worker");
    Ok((
        StatusCode::CREATED,
        Json(WorkerRegistered {
            worker: reg.worker,
            token,
            namespace: ns,
            broker,
        }),
    ))
}

/// `PATCH /api/workers/{id}`: enable, disable, change `max_concurrent_steps` or the pools.
/// A change of pools changes the worker's broker permissions before it is committed and
/// closes its broker connections, so it cannot consume a pool it left a moment longer.
pub async fn patch(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(req): AppJson<WorkerPatch>,
) -> ApiResult<Json<Worker>> {
    caller.require(Permission::ConfigureServer)?;
    let id: WorkerId = parse_id(&id, "worker")?;
    let mut tx = s.db.begin().await?;
    if (req.pools.is_some() || req.enabled.is_some()) && s.broker_users.is_some() {
        crate::broker_users::lock(&mut tx).await?;
    }
    let patched = workers::patch(&mut tx, id, &req).await?;
    let w = &patched.worker;
    let narrowed = match (&s.broker_users, patched.rights_changed, &w.broker_user) {
        (Some(users), true, Some(_)) => {
            // A worker that left a pool, or was disabled, must not read those queues a
            // moment longer: its new rights are in force before the change is committed...
            let slugs: Vec<String> = w.pools.iter().map(|p| p.slug.clone()).collect();
            users.repermission(id, &slugs, w.enabled).await?;
            Some(users)
        }
        _ => None,
    };
    tx.commit().await?;
    if let Some(users) = narrowed
        && let Err(e) = users
            .disconnect(id, "the worker's pools or enabled state changed")
            .await
    {
        // ...and its open channels lose what they had checked before once it is closed,
        // which is also when its agent reads the committed change.
        tracing::warn!(error = %e, worker = %id, "could not close the worker's broker connections after a change of its rights; its open channels keep the old ones until it reconnects");
    }
    if patched.rights_changed {
        // Jobs of a pool the worker left, parked in its own queue, go back to that pool's
        // queue with the sweep's "stranded" check; new ones go elsewhere.
        tracing::info!(worker = %id, pools = ?w.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), enabled = w.enabled, "worker pools or enabled state changed");
    }
    reconfigure(&s, id).await;
    Ok(Json(patched.worker))
}

/// `DELETE /api/workers/{id}`: deregister. Its broker user is deleted in the same transaction
/// (which closes the agent's connections at once).
pub async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Permission::ConfigureServer)?;
    let id: WorkerId = parse_id(&id, "worker")?;
    let mut tx = s.db.begin().await?;
    if s.broker_users.is_some() {
        crate::broker_users::lock(&mut tx).await?;
    }
    workers::delete(&mut tx, id).await?;
    if let Some(users) = &s.broker_users {
        users.remove(id).await?;
    }
    tx.commit().await?;
    // This node forgets the worker's token at once; the others when the notification arrives.
    s.credentials.invalidate();
    let topology = s.topology.clone();
    with_channel(&s, |ch| async move {
        for q in [topology.worker_queue(id), topology.control_queue(id)] {
            let _ = ch
                .queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                .await;
        }
    })
    .await;
    Ok(StatusCode::NO_CONTENT)
}
