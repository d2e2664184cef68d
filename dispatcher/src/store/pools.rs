//! Worker pools. Exactly one is the default; the default cannot be deleted. A pool's slug
//! names its queue and never changes.

use super::{Error, Result};
use gantry_shared::api::{Pool, PoolCreate, PoolPatch, PoolRef};
use gantry_shared::ids::PoolId;
use sqlx::{FromRow, PgExecutor, PgPool};
use uuid::Uuid;

#[derive(FromRow)]
struct PoolRow {
    id: Uuid,
    name: String,
    slug: String,
    description: String,
    is_default: bool,
    worker_count: i64,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl From<PoolRow> for Pool {
    fn from(r: PoolRow) -> Self {
        Pool {
            id: PoolId(r.id),
            name: r.name,
            slug: r.slug,
            description: r.description,
            is_default: r.is_default,
            worker_count: r.worker_count,
            created_at: r.created_at,
        }
    }
}

const SELECT: &str = "SELECT p.id, p.name, p.slug, p.description, p.is_default, p.created_at,
    (SELECT count(*) FROM worker_pools wp WHERE wp.pool_id = p.id) AS worker_count
    FROM pools p";

/// `Default Worker Pool` → `default-worker-pool`.
pub fn slugify(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_owned();
    if out.is_empty() { "pool".into() } else { out }
}

pub async fn list(db: &PgPool) -> Result<Vec<Pool>> {
    let rows: Vec<PoolRow> = sqlx::query_as(&format!("{SELECT} ORDER BY p.created_at"))
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(Pool::from).collect())
}

pub async fn get(db: &PgPool, id: PoolId) -> Result<Pool> {
    let row: Option<PoolRow> = sqlx::query_as(&format!("{SELECT} WHERE p.id = $1"))
        .bind(id.0)
        .fetch_optional(db)
        .await?;
    row.map(Pool::from)
        .ok_or_else(|| Error::not_found(format!("no pool with id {id}")))
}

/// Find a pool by id, name or slug.
pub async fn find(db: impl PgExecutor<'_>, reference: &str) -> Result<Option<PoolRef>> {
    let id = Uuid::parse_str(reference).ok();
    let row: Option<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, name, slug FROM pools WHERE id = $1 OR name = $2 OR slug = $2
         ORDER BY (id = $1) DESC, (name = $2) DESC LIMIT 1",
    )
    .bind(id)
    .bind(reference.trim())
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(id, name, slug)| PoolRef {
        id: PoolId(id),
        name,
        slug,
    }))
}

pub async fn default_pool(db: impl PgExecutor<'_>) -> Result<PoolRef> {
    let (id, name, slug): (Uuid, String, String) =
        sqlx::query_as("SELECT id, name, slug FROM pools WHERE is_default")
            .fetch_one(db)
            .await?;
    Ok(PoolRef {
        id: PoolId(id),
        name,
        slug,
    })
}

/// Whether any registered worker (not a built-in one) serves the pool.
pub async fn has_registered_workers(db: impl PgExecutor<'_>, pool: PoolId) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM worker_pools wp JOIN workers w ON w.id = wp.worker_id
                        WHERE wp.pool_id = $1 AND NOT w.builtin)",
    )
    .bind(pool.0)
    .fetch_one(db)
    .await?)
}

fn check_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::invalid(
            "name",
            "a pool name must be 1 to 100 characters",
        ));
    }
    Ok(name.to_owned())
}

pub async fn create(db: &PgPool, req: &PoolCreate) -> Result<Pool> {
    let name = check_name(&req.name)?;
    let base = slugify(&name);
    let mut tx = db.begin().await?;
    // Serialise pool creation so slug choice and the default flag cannot race.
    sqlx::query("LOCK TABLE pools IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pools WHERE name = $1)")
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        return Err(Error::Conflict(format!(
            "a pool named {name:?} exists already"
        )));
    }
    let mut slug = base.clone();
    let mut n = 2;
    while sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pools WHERE slug = $1)")
        .bind(&slug)
        .fetch_one(&mut *tx)
        .await?
    {
        slug = format!("{base}-{n}");
        n += 1;
    }
    if req.is_default {
        sqlx::query("UPDATE pools SET is_default = false WHERE is_default")
            .execute(&mut *tx)
            .await?;
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO pools (id, name, slug, description, is_default) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(&name)
    .bind(&slug)
    .bind(req.description.clone().unwrap_or_default())
    .bind(req.is_default)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    get(db, PoolId(id)).await
}

pub async fn patch(db: &PgPool, id: PoolId, req: &PoolPatch) -> Result<Pool> {
    let mut tx = db.begin().await?;
    let current: Option<bool> =
        sqlx::query_scalar("SELECT is_default FROM pools WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(_) = current else {
        return Err(Error::not_found(format!("no pool with id {id}")));
    };
    if let Some(name) = &req.name {
        let name = check_name(name)?;
        let r = sqlx::query("UPDATE pools SET name = $2 WHERE id = $1")
            .bind(id.0)
            .bind(&name)
            .execute(&mut *tx)
            .await;
        match r {
            Err(e) if super::is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "a pool named {name:?} exists already"
                )));
            }
            r => {
                r?;
            }
        }
    }
    if let Some(desc) = &req.description {
        sqlx::query("UPDATE pools SET description = $2 WHERE id = $1")
            .bind(id.0)
            .bind(desc)
            .execute(&mut *tx)
            .await?;
    }
    match req.is_default {
        Some(true) => {
            sqlx::query("UPDATE pools SET is_default = false WHERE is_default AND id <> $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE pools SET is_default = true WHERE id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
        }
        Some(false) => {
            return Err(Error::invalid(
                "is_default",
                "there is always one default pool: make another pool the default instead",
            ));
        }
        None => {}
    }
    tx.commit().await?;
    get(db, id).await
}

/// Delete a pool that is not the default, has no workers and is used by no unfinished task.
/// Returns its slug so the caller can delete its queue.
pub async fn delete(db: &PgPool, id: PoolId) -> Result<String> {
    let mut tx = db.begin().await?;
    let row: Option<(bool, String)> =
        sqlx::query_as("SELECT is_default, slug FROM pools WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((is_default, slug)) = row else {
        return Err(Error::not_found(format!("no pool with id {id}")));
    };
    if is_default {
        return Err(Error::Conflict(
            "the default pool cannot be deleted; make another pool the default first".into(),
        ));
    }
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM worker_pools WHERE pool_id = $1")
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
    if workers > 0 {
        return Err(Error::Conflict(format!(
            "the pool still has {workers} worker(s); deregister or move them first"
        )));
    }
    let used: i64 = sqlx::query_scalar("SELECT count(*) FROM step_runs WHERE pool_id = $1")
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
    if used > 0 {
        return Err(Error::Conflict(format!(
            "the pool is referenced by {used} step run(s) in the task history and cannot be deleted"
        )));
    }
    sqlx::query("DELETE FROM pools WHERE id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(slug)
}

#[cfg(test)]
mod tests {
    #[test]
    fn slugs() {
        assert_eq!(super::slugify("Default Worker Pool"), "default-worker-pool");
        assert_eq!(super::slugify("  Linux/ARM 64 "), "linux-arm-64");
        assert_eq!(super::slugify("日本"), "pool");
    }
}
