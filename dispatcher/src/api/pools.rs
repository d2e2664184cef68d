//! `/api/pools`: everyone with a key may list pools; changing them needs `ConfigureServer`.

use super::AppState;
use super::error::ApiResult;
use super::extract::{AppJson, Caller, parse_id};
use crate::store::pools;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use gantry_shared::api::{Permission, Pool, PoolCreate, PoolPatch};

pub async fn list(State(s): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<Pool>>> {
    Ok(Json(pools::list(&s.db).await?))
}

pub async fn get(
    State(s): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Pool>> {
    Ok(Json(pools::get(&s.db, parse_id(&id, "pool")?).await?))
}

pub async fn create(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<PoolCreate>,
) -> ApiResult<(StatusCode, Json<Pool>)> {
    caller.require(Permission::ConfigureServer)?;
    let pool = pools::create(&s.db, &req).await?;
    // Declared now if the broker is there; otherwise on the next connection (the dispatcher
    // declares every pool's queue whenever it connects) or at the first publish.
    if let Some(conn) = s.broker.current()
        && let Ok(ch) = conn.create_channel().await
    {
        if let Err(e) = s.topology.declare_pool(&ch, &pool.slug).await {
            tracing::warn!(error = %e, pool = pool.name, "could not declare the pool's queue yet");
        }
        let _ = ch.close(200, "declared".into()).await;
    }
    Ok((StatusCode::CREATED, Json(pool)))
}

pub async fn patch(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    AppJson(req): AppJson<PoolPatch>,
) -> ApiResult<Json<Pool>> {
    caller.require(Permission::ConfigureServer)?;
    Ok(Json(
        pools::patch(&s.db, parse_id(&id, "pool")?, &req).await?,
    ))
}

pub async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Permission::ConfigureServer)?;
    let slug = pools::delete(&s.db, parse_id(&id, "pool")?).await?;
    if let Some(conn) = s.broker.current()
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = ch
            .queue_delete(
                s.topology.pool_queue(&slug).into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    Ok(StatusCode::NO_CONTENT)
}
