//! Registered workers and their pools.

use super::pools;
use crate::api::error::{ApiError, ApiResult};
use gantry_shared::api::{PoolRef, Worker, WorkerPatch, WorkerRegister};
use gantry_shared::ids::{PoolId, WorkerId};
use sqlx::{FromRow, PgPool};
use std::collections::HashMap;
use uuid::Uuid;

/// Default `max_concurrent_steps`.
pub const DEFAULT_MAX_CONCURRENT_STEPS: u32 = 4;
/// Highest `max_concurrent_steps`.
pub const MAX_CONCURRENT_STEPS_LIMIT: u32 = 1000;

#[derive(FromRow)]
struct WorkerRow {
    id: Uuid,
    name: String,
    max_concurrent_steps: i32,
    enabled: bool,
    health: String,
    health_reason: Option<String>,
    last_heartbeat_at: Option<chrono::DateTime<chrono::Utc>>,
    agent_version: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    running_steps: i64,
    builtin: bool,
}

const SELECT: &str = "SELECT w.id, w.name, w.max_concurrent_steps, w.enabled, w.health,
    w.health_reason, w.last_heartbeat_at, w.agent_version, w.created_at, w.builtin,
    (SELECT count(*) FROM attempts a WHERE a.worker_id = w.id AND a.state = 'Running') AS running_steps
    FROM workers w";

async fn pools_of(db: &PgPool, ids: &[Uuid]) -> sqlx::Result<HashMap<Uuid, Vec<PoolRef>>> {
    let rows: Vec<(Uuid, Uuid, String, String)> = sqlx::query_as(
        "SELECT wp.worker_id, p.id, p.name, p.slug FROM worker_pools wp
         JOIN pools p ON p.id = wp.pool_id WHERE wp.worker_id = ANY($1) ORDER BY p.name",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    let mut map: HashMap<Uuid, Vec<PoolRef>> = HashMap::new();
    for (w, id, name, slug) in rows {
        map.entry(w).or_default().push(PoolRef {
            id: PoolId(id),
            name,
            slug,
        });
    }
    Ok(map)
}

async fn assemble(db: &PgPool, rows: Vec<WorkerRow>) -> sqlx::Result<Vec<Worker>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let mut pools = pools_of(db, &ids).await?;
    Ok(rows
        .into_iter()
        .map(|r| Worker {
            id: WorkerId(r.id),
            pools: pools.remove(&r.id).unwrap_or_default(),
            name: r.name,
            max_concurrent_steps: r.max_concurrent_steps as u32,
            enabled: r.enabled,
            health: r.health,
            health_reason: r.health_reason,
            last_heartbeat_at: r.last_heartbeat_at,
            version: r.agent_version,
            running_steps: r.running_steps,
            created_at: r.created_at,
            builtin: r.builtin,
        })
        .collect())
}

/// Registered workers; with `builtin`, the dispatcher nodes' built-in workers too.
pub async fn list(db: &PgPool, builtin: bool) -> ApiResult<Vec<Worker>> {
    let rows: Vec<WorkerRow> = sqlx::query_as(&format!(
        "{SELECT} WHERE $1 OR NOT w.builtin ORDER BY w.builtin, w.name"
    ))
    .bind(builtin)
    .fetch_all(db)
    .await?;
    Ok(assemble(db, rows).await?)
}

pub async fn get(db: &PgPool, id: WorkerId) -> ApiResult<Worker> {
    let rows: Vec<WorkerRow> = sqlx::query_as(&format!("{SELECT} WHERE w.id = $1"))
        .bind(id.0)
        .fetch_all(db)
        .await?;
    assemble(db, rows)
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found(format!("no worker with id {id}")))
}

fn check_max(n: u32, field: &str) -> ApiResult<()> {
    if n == 0 || n > MAX_CONCURRENT_STEPS_LIMIT {
        return Err(ApiError::bad(
            field,
            format!("must be between 1 and {MAX_CONCURRENT_STEPS_LIMIT}"),
        ));
    }
    Ok(())
}

/// What registration did: the new worker, and the worker it replaced (with `force`).
pub struct Registered {
    pub worker: Worker,
    pub replaced: Option<WorkerId>,
}

pub async fn register(
    db: &PgPool,
    req: &WorkerRegister,
    token_hash: &str,
) -> ApiResult<Registered> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "name",
            "a worker name must be 1 to 100 printable characters",
        ));
    }
    let max = req
        .max_concurrent_steps
        .unwrap_or(DEFAULT_MAX_CONCURRENT_STEPS);
    check_max(max, "max_concurrent_steps")?;
    let mut tx = db.begin().await?;
    let mut pool_ids: Vec<Uuid> = Vec::new();
    if req.pools.is_empty() {
        pool_ids.push(pools::default_pool(&mut *tx).await?.id.0);
    }
    for (i, reference) in req.pools.iter().enumerate() {
        match pools::find(&mut *tx, reference).await? {
            Some(p) if !pool_ids.contains(&p.id.0) => pool_ids.push(p.id.0),
            Some(_) => {}
            None => {
                return Err(ApiError::bad(
                    format!("pools[{i}]"),
                    format!("no pool named {reference:?}; create it first (POST /api/pools)"),
                ));
            }
        }
    }
    let existing: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM workers WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let mut replaced = None;
    if let Some(old) = existing {
        if !req.force {
            return Err(ApiError::Conflict(format!(
                "a worker named {name:?} is registered already; use --force (\"force\": true) to replace it"
            )));
        }
        sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(old)
            .execute(&mut *tx)
            .await?;
        replaced = Some(WorkerId(old));
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO workers (id, name, token_hash, max_concurrent_steps) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(name)
    .bind(token_hash)
    .bind(max as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO worker_pools (worker_id, pool_id) SELECT $1, unnest($2::uuid[])")
        .bind(id)
        .bind(&pool_ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Registered {
        worker: get(db, WorkerId(id)).await?,
        replaced,
    })
}

pub async fn patch(db: &PgPool, id: WorkerId, req: &WorkerPatch) -> ApiResult<Worker> {
    if let Some(n) = req.max_concurrent_steps {
        check_max(n, "max_concurrent_steps")?;
    }
    let r = sqlx::query(
        "UPDATE workers SET enabled = COALESCE($2, enabled),
             max_concurrent_steps = COALESCE($3, max_concurrent_steps)
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(req.enabled)
    .bind(req.max_concurrent_steps.map(|n| n as i32))
    .execute(db)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("no worker with id {id}")));
    }
    get(db, id).await
}

pub async fn delete(db: &PgPool, id: WorkerId) -> ApiResult<()> {
    let r = sqlx::query("DELETE FROM workers WHERE id = $1")
        .bind(id.0)
        .execute(db)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("no worker with id {id}")));
    }
    Ok(())
}
