//! PostgreSQL: connecting (creating the database when missing), migrating, and the rows every
//! installation starts with (the default pool, the bootstrap API key).

use crate::auth;
use anyhow::Context;
use gantry_shared::config::Settings;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use std::str::FromStr;
use std::time::Duration;

/// The migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Name of the pool every installation starts with.
pub const DEFAULT_POOL_NAME: &str = "Default Worker Pool";

/// Create the database if it does not exist. Two dispatchers racing here is fine: the loser
/// sees 42P04 (duplicate database), which counts as success.
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    if Postgres::database_exists(url)
        .await
        .context("checking whether the database exists")?
    {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => {
            tracing::info!("created database");
            Ok(())
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(e).context("creating the database"),
    }
}

/// A connection idle longer than this is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A pool of connections. A connection that sat idle is checked before use, so the pool heals
/// by itself after a Postgres restart; one in steady use is not (a ping would be one more
/// round trip for every transaction), and a broken one fails its statement as a transient
/// error, which every caller retries.
///
/// Its statements use generic plans (`plan_cache_mode = force_generic_plan`). Every statement
/// is prepared once per connection, and PostgreSQL would otherwise plan the first five
/// executions of each on each connection afresh, and go on planning the ones whose generic
/// plan it thinks dearer: that planning was about half of PostgreSQL's time on the hot path
/// (docs/BENCHMARKS.md). The rule that comes with it: a query that must use a partial index
/// writes the index's condition (a state, say) into its text, never as a parameter, since a
/// generic plan cannot match `state = $1` against `WHERE state = 'Running'`.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(&settings.postgres_url())
        .context("postgres.url")?
        .application_name("gantry-dispatcher")
        .options([("plan_cache_mode", "force_generic_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.postgres.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(opts)
        .await
        .context("connecting to PostgreSQL")?;
    Ok(pool)
}

/// Create the database if needed, connect, and apply migrations.
pub async fn prepare(settings: &Settings) -> anyhow::Result<PgPool> {
    ensure_database(&settings.postgres_url()).await?;
    let pool = connect(settings).await?;
    MIGRATOR
        .run(&pool)
        .await
        .context("applying database migrations")?;
    Ok(pool)
}

/// Rows a fresh installation needs: the default pool, and the bootstrap key when no key
/// exists. Safe to run on every start and from several nodes at once.
pub async fn bootstrap(db: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    let has_default: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pools WHERE is_default)")
            .fetch_one(db)
            .await?;
    if !has_default {
        let r = sqlx::query(
            "INSERT INTO pools (id, name, slug, is_default) VALUES ($1, $2, $3, true)
             ON CONFLICT DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(DEFAULT_POOL_NAME)
        .bind(crate::store::pools::slugify(DEFAULT_POOL_NAME))
        .execute(db)
        .await?;
        if r.rows_affected() == 1 {
            tracing::info!(pool = DEFAULT_POOL_NAME, "created the default worker pool");
        }
    }
    let has_key: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
        .fetch_one(db)
        .await?;
    if !has_key {
        let (key, generated) = match &settings.api.bootstrap_key {
            Some(k) => (k.trim().to_owned(), false),
            None => (auth::new_api_key(), true),
        };
        let perms: Vec<String> = gantry_shared::api::Permission::ALL
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect();
        let r = sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, key_prefix, permissions)
             SELECT $1, 'bootstrap', $2, $3, $4
             WHERE NOT EXISTS (SELECT 1 FROM api_keys)
             ON CONFLICT DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(auth::hash_secret(&key))
        .bind(auth::prefix(&key))
        .bind(&perms)
        .execute(db)
        .await?;
        if r.rows_affected() == 1 {
            if generated {
                // Printed once, to the terminal only, so a first-time user can log in: never
                // through tracing, whose output is kept and shipped. Only its hash is stored.
                tracing::warn!(
                    "no API key existed and api.bootstrap_key is not set: generated one with every permission and printed it to the terminal (stderr); it will not be shown again"
                );
                eprintln!("gantry-dispatcher: generated bootstrap API key: {key}");
            } else {
                tracing::info!("created the bootstrap API key from api.bootstrap_key");
            }
        }
    }
    Ok(())
}

/// True for errors that go away when PostgreSQL is back or the transaction is retried:
/// lost connections, a restarting server, serialization failures and deadlocks.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || c == "40001"
                || c == "40P01"
        }),
        _ => false,
    }
}
