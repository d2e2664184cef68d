//! API keys, stored as hashes.

use super::{Error, Result};
use crate::auth;
use gantry_shared::api::{ApiKey, ApiKeyCreate, ApiKeyCreated, Permission};
use gantry_shared::ids::ApiKeyId;
use sqlx::PgPool;
use uuid::Uuid;

type Row = (
    Uuid,
    String,
    String,
    Vec<String>,
    chrono::DateTime<chrono::Utc>,
);

fn to_key((id, name, prefix, perms, created_at): Row) -> ApiKey {
    ApiKey {
        id: ApiKeyId(id),
        name,
        prefix,
        permissions: perms.iter().filter_map(|p| Permission::parse(p)).collect(),
        created_at,
    }
}

/// The key whose secret hashes to `key_hash`: its id and permissions (as stored).
pub async fn lookup(db: &PgPool, key_hash: &str) -> Result<Option<(Uuid, Vec<String>)>> {
    Ok(
        sqlx::query_as("SELECT id, permissions FROM api_keys WHERE key_hash = $1")
            .bind(key_hash)
            .fetch_optional(db)
            .await?,
    )
}

/// Record a key's use, at most once a minute (so reads do not each write a row), best
/// effort.
pub async fn touch(db: &PgPool, id: Uuid) {
    let _ = sqlx::query(
        "UPDATE api_keys SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(db)
    .await;
}

/// A key's name, for the record of what it did.
pub async fn name(conn: &mut sqlx::PgConnection, id: ApiKeyId) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT name FROM api_keys WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

pub async fn list(db: &PgPool) -> Result<Vec<ApiKey>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, name, key_prefix, permissions, created_at FROM api_keys ORDER BY created_at",
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(to_key).collect())
}

pub async fn create(db: &PgPool, req: &ApiKeyCreate) -> Result<ApiKeyCreated> {
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::invalid(
            "name",
            "a key name must be 1 to 100 characters",
        ));
    }
    if req.permissions.is_empty() {
        return Err(Error::invalid(
            "permissions",
            "give the key at least one permission",
        ));
    }
    let key = auth::new_api_key();
    let mut perms: Vec<String> = req
        .permissions
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    perms.sort();
    perms.dedup();
    let row: Row = sqlx::query_as(
        "INSERT INTO api_keys (id, name, key_hash, key_prefix, permissions)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, name, key_prefix, permissions, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(auth::hash_secret(&key))
    .bind(auth::prefix(&key))
    .bind(&perms)
    .fetch_one(db)
    .await?;
    Ok(ApiKeyCreated {
        key_info: to_key(row),
        key,
    })
}

/// Delete a key, unless it is the last one that can configure the server.
pub async fn delete(db: &PgPool, id: ApiKeyId) -> Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let perms: Option<Vec<String>> =
        sqlx::query_scalar("SELECT permissions FROM api_keys WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(perms) = perms else {
        return Err(Error::not_found(format!("no API key with id {id}")));
    };
    if perms.iter().any(|p| p == "ConfigureServer") {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM api_keys WHERE id <> $1 AND 'ConfigureServer' = ANY(permissions)",
        )
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
        if others == 0 {
            return Err(Error::Conflict(
                "this is the last key with ConfigureServer; create another before deleting it"
                    .into(),
            ));
        }
    }
    sqlx::query("DELETE FROM api_keys WHERE id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
