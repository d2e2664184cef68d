//! Transitions of workers' health: the dispatcher's verdict ([`set_health`]: `Unavailable`
//! for a silent or lost worker) and the agents' own, stored from their heartbeats a batch at a
//! time ([`store_heartbeats`]). Health may go from any state to any other (the table in
//! `gantry_shared::states`), so these write no `WHERE health = ANY(...)`; each change of
//! health or of its reason gets a `worker_health_events` row in the same transaction.

use gantry_shared::ids::WorkerId;
use gantry_shared::states::WorkerHealth;
use sqlx::PgConnection;
use uuid::Uuid;

/// Set a worker's health; when it (or its reason) changed, record the change. Returns whether
/// it changed.
pub async fn set_health(
    conn: &mut PgConnection,
    worker: WorkerId,
    health: WorkerHealth,
    reason: Option<&str>,
) -> sqlx::Result<bool> {
    let changed: Option<Uuid> = sqlx::query_scalar(
        "UPDATE workers SET health = $2, health_reason = $3
         WHERE id = $1 AND (health, COALESCE(health_reason, '')) <> ($2, COALESCE($3, ''))
         RETURNING id",
    )
    .bind(worker.0)
    .bind(health)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    if changed.is_some() {
        sqlx::query(
            "INSERT INTO worker_health_events (worker_id, health, reason) VALUES ($1, $2, $3)",
        )
        .bind(worker.0)
        .bind(health)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
        tracing::info!(%worker, %health, reason, "worker health changed");
    }
    Ok(changed.is_some())
}

/// One worker's latest heartbeat, as [`store_heartbeats`] writes it.
pub struct HeartbeatRow<'a> {
    pub worker: WorkerId,
    pub version: &'a str,
    /// The agent's verdict (never `Unavailable`: that one is the dispatcher's).
    pub health: WorkerHealth,
    pub reason: Option<&'a str>,
    /// Counts only if the worker is a built-in one (it came from the dispatcher's own broker
    /// user while per-worker users are in force).
    pub builtin_only: bool,
}

/// A change of health a heartbeat made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub worker: WorkerId,
    pub health: WorkerHealth,
    pub reason: Option<String>,
}

/// Store heartbeats, one per worker, in the caller's transaction: each worker's last
/// heartbeat time, version and health (row locks taken in worker id order), and a
/// `worker_health_events` row for each change. Returns the changes.
///
/// The locks are `FOR NO KEY UPDATE`, what the `UPDATE` itself takes: a claim's foreign keys
/// to the worker (`attempts.worker_id`, `task_pool_workers`) hold `FOR KEY SHARE` on its row
/// until the claim commits, and `FOR UPDATE` conflicts with that. With it, every heartbeat
/// waited for the claims in flight, and every claim behind it for the heartbeat: stalls of
/// 100–500 ms under load, in claims and (with the pool's connections held by them) in
/// submissions.
pub async fn store_heartbeats(
    conn: &mut PgConnection,
    rows: &[HeartbeatRow<'_>],
) -> sqlx::Result<Vec<HealthChange>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert!(rows.iter().all(|r| r.health != WorkerHealth::Unavailable));
    let ids: Vec<Uuid> = rows.iter().map(|r| r.worker.0).collect();
    let versions: Vec<&str> = rows.iter().map(|r| r.version).collect();
    let healths: Vec<WorkerHealth> = rows.iter().map(|r| r.health).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.reason).collect();
    let builtin_only: Vec<bool> = rows.iter().map(|r| r.builtin_only).collect();
    // One statement: the heartbeat itself, and the health where it changed (the old value
    // comes from the row as it was before this update).
    let updated: Vec<(Uuid, WorkerHealth, Option<String>, bool)> = sqlx::query_as(
        "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                                         $5::bool[])
                      AS u(id, version, health, reason, builtin_only)),
              old AS (SELECT w.id, w.health, w.health_reason FROM workers w JOIN u ON u.id = w.id
                      WHERE w.builtin OR NOT u.builtin_only
                      ORDER BY w.id FOR NO KEY UPDATE OF w)
         UPDATE workers w SET last_heartbeat_at = now(), agent_version = u.version,
                              health = u.health, health_reason = u.reason
         FROM u JOIN old ON old.id = u.id
         WHERE w.id = u.id
         RETURNING w.id, w.health, w.health_reason,
                   (old.health, COALESCE(old.health_reason, '')) <> (u.health, COALESCE(u.reason, ''))",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&healths)
    .bind(&reasons)
    .bind(&builtin_only)
    .fetch_all(&mut *conn)
    .await?;
    let changed: Vec<HealthChange> = updated
        .into_iter()
        .filter(|r| r.3)
        .map(|(id, health, reason, _)| HealthChange {
            worker: WorkerId(id),
            health,
            reason,
        })
        .collect();
    if !changed.is_empty() {
        let ids: Vec<Uuid> = changed.iter().map(|c| c.worker.0).collect();
        let healths: Vec<WorkerHealth> = changed.iter().map(|c| c.health).collect();
        let reasons: Vec<Option<&str>> = changed.iter().map(|c| c.reason.as_deref()).collect();
        sqlx::query(
            "INSERT INTO worker_health_events (worker_id, health, reason)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])",
        )
        .bind(&ids)
        .bind(&healths)
        .bind(&reasons)
        .execute(&mut *conn)
        .await?;
    }
    Ok(changed)
}
