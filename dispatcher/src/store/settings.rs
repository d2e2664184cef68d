//! The server's settings (one row) and workers' health history.

use super::{Error, Result};
use gantry_shared::api::{HealthEvent, MachinePolicy, Settings, SettingsUpdate};
use gantry_shared::ids::WorkerId;
use gantry_shared::states::WorkerHealth;
use sqlx::PgPool;

/// Longest accepted health-check script.
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;

type Row = (
    bool,
    i32,
    i32,
    Option<String>,
    i64,
    i32,
    Option<chrono::DateTime<chrono::Utc>>,
);

const SELECT: &str = "SELECT builtin_worker_enabled, heartbeat_interval_secs, unavailable_after_secs,
    health_check_script, min_free_disk_mb, no_healthy_worker_timeout_secs, updated_at FROM settings";

fn from_row(r: Row) -> Settings {
    Settings {
        builtin_worker_enabled: r.0,
        machine_policy: MachinePolicy {
            heartbeat_interval_secs: r.1 as u32,
            unavailable_after_secs: r.2 as u32,
            health_check_script: r.3,
            min_free_disk_mb: r.4 as u64,
        },
        no_healthy_worker_timeout_secs: r.5 as u32,
        updated_at: r.6,
    }
}

pub async fn get(db: impl sqlx::PgExecutor<'_>) -> Result<Settings> {
    Ok(from_row(
        sqlx::query_as::<_, Row>(SELECT).fetch_one(db).await?,
    ))
}

/// Apply a partial update after checking every field; returns the settings before and
/// after.
pub async fn update(db: &PgPool, req: &SettingsUpdate) -> Result<(Settings, Settings)> {
    let mut tx = db.begin().await?;
    let before = from_row(
        sqlx::query_as::<_, Row>(&format!("{SELECT} FOR UPDATE"))
            .fetch_one(&mut *tx)
            .await?,
    );
    let mut s = before.clone();
    if let Some(b) = req.builtin_worker_enabled {
        s.builtin_worker_enabled = b;
    }
    if let Some(t) = req.no_healthy_worker_timeout_secs {
        if !(1..=7 * 86400).contains(&t) {
            return Err(Error::invalid(
                "no_healthy_worker_timeout_secs",
                "must be between 1 and 604800 (a week)",
            ));
        }
        s.no_healthy_worker_timeout_secs = t;
    }
    if let Some(p) = &req.machine_policy {
        let mp = &mut s.machine_policy;
        if let Some(h) = p.heartbeat_interval_secs {
            if !(1..=3600).contains(&h) {
                return Err(Error::invalid(
                    "machine_policy.heartbeat_interval_secs",
                    "must be between 1 and 3600",
                ));
            }
            mp.heartbeat_interval_secs = h;
        }
        if let Some(u) = p.unavailable_after_secs {
            mp.unavailable_after_secs = u;
        }
        if let Some(script) = &p.health_check_script {
            if script.len() > MAX_SCRIPT_BYTES {
                return Err(Error::invalid(
                    "machine_policy.health_check_script",
                    format!("is longer than {MAX_SCRIPT_BYTES} bytes"),
                ));
            }
            mp.health_check_script = (!script.trim().is_empty()).then(|| script.clone());
        }
        if let Some(d) = p.min_free_disk_mb {
            if d > 1 << 40 {
                return Err(Error::invalid(
                    "machine_policy.min_free_disk_mb",
                    "is larger than any disk",
                ));
            }
            mp.min_free_disk_mb = d;
        }
        // Two missed heartbeats before a worker is called unavailable.
        if mp.unavailable_after_secs < mp.heartbeat_interval_secs.saturating_mul(2)
            || mp.unavailable_after_secs > 86400
        {
            return Err(Error::invalid(
                "machine_policy.unavailable_after_secs",
                format!(
                    "must be at least twice the heartbeat interval ({} s) and at most 86400",
                    mp.heartbeat_interval_secs
                ),
            ));
        }
    }
    sqlx::query(
        "UPDATE settings SET builtin_worker_enabled = $1, heartbeat_interval_secs = $2,
             unavailable_after_secs = $3, health_check_script = $4, min_free_disk_mb = $5,
             no_healthy_worker_timeout_secs = $6, updated_at = now()",
    )
    .bind(s.builtin_worker_enabled)
    .bind(s.machine_policy.heartbeat_interval_secs as i32)
    .bind(s.machine_policy.unavailable_after_secs as i32)
    .bind(&s.machine_policy.health_check_script)
    .bind(s.machine_policy.min_free_disk_mb as i64)
    .bind(s.no_healthy_worker_timeout_secs as i32)
    .execute(&mut *tx)
    .await?;
    let after = get(&mut *tx).await?;
    tx.commit().await?;
    Ok((before, after))
}

/// A worker's health changes, newest first.
pub async fn health_history(db: &PgPool, worker: WorkerId, limit: i64) -> Result<Vec<HealthEvent>> {
    let rows: Vec<(chrono::DateTime<chrono::Utc>, WorkerHealth, Option<String>)> = sqlx::query_as(
        "SELECT at, health, reason FROM worker_health_events WHERE worker_id = $1
         ORDER BY id DESC LIMIT $2",
    )
    .bind(worker.0)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(at, health, reason)| HealthEvent { at, health, reason })
        .collect())
}
