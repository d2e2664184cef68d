//! `/api/keys`: API keys, for `ConfigureServer` keys only.

use super::AppState;
use super::error::ApiResult;
use super::extract::{AppJson, Caller, parse_id};
use crate::store::keys;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use gantry_shared::api::{ApiKey, ApiKeyCreate, ApiKeyCreated, ApiKeyDelete, Permission};

pub async fn list(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<ApiKey>>> {
    caller.require(Permission::ConfigureServer)?;
    Ok(Json(keys::list(&s.db).await?))
}

pub async fn create(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<ApiKeyCreate>,
) -> ApiResult<(StatusCode, Json<ApiKeyCreated>)> {
    caller.require(Permission::ConfigureServer)?;
    Ok((StatusCode::CREATED, Json(keys::create(&s.db, &req).await?)))
}

pub async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Permission::ConfigureServer)?;
    keys::delete(&s.db, parse_id(&id, "API key")?).await?;
    // This node forgets at once; the others when the notification arrives.
    s.credentials.invalidate();
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/keys` with `{"id": ...}`, as DESIGN.md lists it.
pub async fn delete_by_body(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<ApiKeyDelete>,
) -> ApiResult<StatusCode> {
    caller.require(Permission::ConfigureServer)?;
    keys::delete(&s.db, req.id).await?;
    s.credentials.invalidate();
    Ok(StatusCode::NO_CONTENT)
}
