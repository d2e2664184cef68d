//! Registered workers and their pools.

use super::pools;
use super::{Error, Result};
use crate::broker_users::{self, BrokerUsers};
use gantry_shared::api::{PoolRef, Worker, WorkerPatch, WorkerRegister};
use gantry_shared::ids::{PoolId, WorkerId};
use gantry_shared::states::{AttemptState, WorkerHealth};
use sqlx::{FromRow, PgConnection, PgPool};
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
    health: WorkerHealth,
    health_reason: Option<String>,
    last_heartbeat_at: Option<chrono::DateTime<chrono::Utc>>,
    agent_version: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    running_steps: i64,
    builtin: bool,
    broker_user: Option<String>,
}

/// The columns of a [`WorkerRow`], `FROM workers w`.
fn select() -> String {
    format!(
        "SELECT w.id, w.name, w.max_concurrent_steps, w.enabled, w.health,
            w.health_reason, w.last_heartbeat_at, w.agent_version, w.created_at, w.builtin,
            w.broker_user,
            (SELECT count(*) FROM attempts a
             WHERE a.worker_id = w.id AND a.state = '{}') AS running_steps
         FROM workers w",
        AttemptState::Running
    )
}

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
            broker_user: r.broker_user,
        })
        .collect())
}

/// A worker as its credential authenticates it (see `api::extract::WorkerCaller`).
#[derive(FromRow)]
pub struct Authenticated {
    pub id: Uuid,
    pub name: String,
    pub enabled: bool,
    pub health: WorkerHealth,
    pub health_reason: Option<String>,
    pub builtin: bool,
}

/// The worker whose credential hashes to `token_hash`.
pub async fn authenticate(db: &PgPool, token_hash: &str) -> Result<Option<Authenticated>> {
    Ok(sqlx::query_as(
        "SELECT id, name, enabled, health, health_reason, builtin FROM workers
         WHERE token_hash = $1",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?)
}

/// Every worker's id (registered and built-in).
pub async fn ids(db: &PgPool) -> Result<Vec<WorkerId>> {
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_all(db)
        .await?;
    Ok(ids.into_iter().map(WorkerId).collect())
}

/// Registered workers; with `builtin`, the dispatcher nodes' built-in workers too.
pub async fn list(db: &PgPool, builtin: bool) -> Result<Vec<Worker>> {
    let rows: Vec<WorkerRow> = sqlx::query_as(&format!(
        "{} WHERE $1 OR NOT w.builtin ORDER BY w.builtin, w.name",
        select()
    ))
    .bind(builtin)
    .fetch_all(db)
    .await?;
    Ok(assemble(db, rows).await?)
}

pub async fn get(db: &PgPool, id: WorkerId) -> Result<Worker> {
    let rows: Vec<WorkerRow> = sqlx::query_as(&format!("{} WHERE w.id = $1", select()))
        .bind(id.0)
        .fetch_all(db)
        .await?;
    assemble(db, rows)
        .await?
        .pop()
        .ok_or_else(|| Error::not_found(format!("no worker with id {id}")))
}

fn check_max(n: u32, field: &str) -> Result<()> {
    if n == 0 || n > MAX_CONCURRENT_STEPS_LIMIT {
        return Err(Error::invalid(
            field,
            format!("must be between 1 and {MAX_CONCURRENT_STEPS_LIMIT}"),
        ));
    }
    Ok(())
}

/// What registration did: the new worker, the worker it replaced (with `force`), and the
/// slugs of its pools (its broker user's rights).
pub struct Registered {
    pub worker: Worker,
    pub replaced: Option<WorkerId>,
    pub slugs: Vec<String>,
}

/// Resolve pool references (names, slugs or ids; none means the default pool) to ids and
/// slugs, naming the bad one.
async fn resolve_pools(
    conn: &mut PgConnection,
    refs: &[String],
    field: &str,
) -> Result<(Vec<Uuid>, Vec<String>)> {
    let mut ids: Vec<Uuid> = Vec::new();
    let mut slugs: Vec<String> = Vec::new();
    if refs.is_empty() {
        let p = pools::default_pool(&mut *conn).await?;
        ids.push(p.id.0);
        slugs.push(p.slug);
    }
    for (i, reference) in refs.iter().enumerate() {
        match pools::find(&mut *conn, reference).await? {
            Some(p) if !ids.contains(&p.id.0) => {
                ids.push(p.id.0);
                slugs.push(p.slug);
            }
            Some(_) => {}
            None => {
                return Err(Error::invalid(
                    format!("{field}[{i}]"),
                    format!("no pool named {reference:?}; create it first (POST /api/pools)"),
                ));
            }
        }
    }
    Ok((ids, slugs))
}

/// Register a worker with id `id` in the caller's transaction (which holds
/// [`broker_users::lock`] when broker users are in force). `broker` is its broker user's name
/// and password hash, when it has one.
pub async fn register(
    tx: &mut PgConnection,
    id: WorkerId,
    req: &WorkerRegister,
    token_hash: &str,
    broker: Option<(&str, &str)>,
) -> Result<Registered> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "a worker name must be 1 to 100 printable characters",
        ));
    }
    let max = req
        .max_concurrent_steps
        .unwrap_or(DEFAULT_MAX_CONCURRENT_STEPS);
    check_max(max, "max_concurrent_steps")?;
    let (pool_ids, slugs) = resolve_pools(&mut *tx, &req.pools, "pools").await?;
    let existing: Option<(Uuid, bool)> =
        sqlx::query_as("SELECT id, builtin FROM workers WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let mut replaced = None;
    if let Some((old, builtin)) = existing {
        if !req.force || builtin {
            return Err(Error::Conflict(format!(
                "a worker named {name:?} is registered already; use --force (\"force\": true) to replace it"
            )));
        }
        sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(old)
            .execute(&mut *tx)
            .await?;
        replaced = Some(WorkerId(old));
    }
    sqlx::query(
        "INSERT INTO workers (id, name, token_hash, max_concurrent_steps, broker_user,
                              broker_password_hash)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.0)
    .bind(name)
    .bind(token_hash)
    .bind(max as i32)
    .bind(broker.map(|b| b.0))
    .bind(broker.map(|b| b.1))
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO worker_pools (worker_id, pool_id) SELECT $1, unnest($2::uuid[])")
        .bind(id.0)
        .bind(&pool_ids)
        .execute(&mut *tx)
        .await?;
    Ok(Registered {
        worker: get_in(&mut *tx, id).await?,
        replaced,
        slugs,
    })
}

/// One worker, read in the caller's transaction.
async fn get_in(conn: &mut PgConnection, id: WorkerId) -> Result<Worker> {
    let rows: Vec<WorkerRow> = sqlx::query_as(&format!("{} WHERE w.id = $1", select()))
        .bind(id.0)
        .fetch_all(&mut *conn)
        .await?;
    let pool_rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT p.id, p.name, p.slug FROM worker_pools wp
         JOIN pools p ON p.id = wp.pool_id WHERE wp.worker_id = $1 ORDER BY p.name",
    )
    .bind(id.0)
    .fetch_all(&mut *conn)
    .await?;
    let r = rows
        .into_iter()
        .next()
        .ok_or_else(|| Error::not_found(format!("no worker with id {id}")))?;
    Ok(Worker {
        id: WorkerId(r.id),
        pools: pool_rows
            .into_iter()
            .map(|(id, name, slug)| PoolRef {
                id: PoolId(id),
                name,
                slug,
            })
            .collect(),
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
        broker_user: r.broker_user,
    })
}

/// What a change of a worker did: the worker as it is now, and whether its broker user's
/// rights must follow (its pools or its enabled state changed).
pub struct Patched {
    pub worker: Worker,
    pub rights_changed: bool,
}

/// Change a worker in the caller's transaction (which holds [`broker_users::lock`] when the
/// pools change and broker users are in force).
pub async fn patch(tx: &mut PgConnection, id: WorkerId, req: &WorkerPatch) -> Result<Patched> {
    if let Some(n) = req.max_concurrent_steps {
        check_max(n, "max_concurrent_steps")?;
    }
    let row: Option<(bool, bool)> =
        sqlx::query_as("SELECT builtin, enabled FROM workers WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((builtin, was_enabled)) = row else {
        return Err(Error::not_found(format!("no worker with id {id}")));
    };
    sqlx::query(
        "UPDATE workers SET enabled = COALESCE($2, enabled),
             max_concurrent_steps = COALESCE($3, max_concurrent_steps)
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(req.enabled)
    .bind(req.max_concurrent_steps.map(|n| n as i32))
    .execute(&mut *tx)
    .await?;
    let mut rights_changed = req.enabled.is_some_and(|e| e != was_enabled);
    if let Some(refs) = &req.pools {
        if builtin {
            return Err(Error::invalid(
                "pools",
                "a built-in worker serves no pool; it runs server steps",
            ));
        }
        if refs.is_empty() {
            return Err(Error::invalid(
                "pools",
                "a worker serves one pool at least; deregister it to take it out of every pool",
            ));
        }
        let (ids, _) = resolve_pools(&mut *tx, refs, "pools").await?;
        sqlx::query("DELETE FROM worker_pools WHERE worker_id = $1 AND pool_id <> ALL($2)")
            .bind(id.0)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO worker_pools (worker_id, pool_id) SELECT $1, unnest($2::uuid[])
             ON CONFLICT DO NOTHING",
        )
        .bind(id.0)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        rights_changed = true;
    }
    Ok(Patched {
        worker: get_in(&mut *tx, id).await?,
        rights_changed,
    })
}

/// Delete a registered worker in the caller's transaction.
pub async fn delete(tx: &mut PgConnection, id: WorkerId) -> Result<()> {
    let r = sqlx::query("DELETE FROM workers WHERE id = $1 AND NOT builtin")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    if r.rows_affected() == 0 {
        return Err(Error::not_found(format!("no worker with id {id}")));
    }
    Ok(())
}

/// Bring the broker's worker users in line with the workers in PostgreSQL, under the broker
/// users' lock (see [`BrokerUsers::reconcile`]).
pub async fn reconcile_broker_users(
    db: &PgPool,
    users: &BrokerUsers,
) -> anyhow::Result<broker_users::Reconciled> {
    let mut tx = db.begin().await?;
    broker_users::lock(&mut tx).await?;
    let rows: Vec<(Uuid, String, String, bool, Vec<String>)> = sqlx::query_as(
        "SELECT w.id, w.broker_user, w.broker_password_hash, w.enabled,
                COALESCE(array_agg(p.slug) FILTER (WHERE p.slug IS NOT NULL), '{}')
         FROM workers w
         LEFT JOIN worker_pools wp ON wp.worker_id = w.id
         LEFT JOIN pools p ON p.id = wp.pool_id
         WHERE w.broker_user IS NOT NULL AND w.broker_password_hash IS NOT NULL
         GROUP BY w.id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let wanted: Vec<broker_users::Wanted> = rows
        .into_iter()
        .map(|(id, user, hash, enabled, slugs)| broker_users::Wanted {
            worker: WorkerId(id),
            user,
            password_hash: hash,
            slugs,
            enabled,
        })
        .collect();
    let done = users.reconcile(&wanted).await?;
    tx.commit().await?;
    Ok(done)
}
