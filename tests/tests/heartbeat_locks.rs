//! A worker's heartbeat never waits for its claims. A claim holds `FOR KEY SHARE` on its
//! worker's row until it commits (the foreign keys of `attempts.worker_id` and
//! `task_pool_workers`); a heartbeat that locked the row `FOR UPDATE` waited for every claim in
//! flight, and every claim after it waited for the heartbeat: stalls of 100–500 ms in claims
//! and submissions under load. Here a transaction holds exactly that lock for 4 s while the
//! real agent heartbeats every second, and its heartbeats must keep landing.

use gantry_tests::{AgentOpts, Stack, eventually};
use std::time::Duration;
use uuid::Uuid;

async fn last_heartbeat(db: &sqlx::PgPool, worker: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT last_heartbeat_at FROM workers WHERE id = $1")
        .bind(worker)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn heartbeats_land_while_a_claim_holds_its_workers_key_share_lock() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("beating", AgentOpts::default())
        .await
        .unwrap();
    let db = stack.db().await;
    let worker: Uuid = sqlx::query_scalar("SELECT id FROM workers WHERE name = 'beating'")
        .fetch_one(&db)
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "a first heartbeat", || async {
        last_heartbeat(&db, worker).await.map(|_| ())
    })
    .await
    .unwrap();

    // Act: the lock a claim's foreign-key check takes, held open.
    let mut claim = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM workers WHERE id = $1 FOR KEY SHARE")
        .bind(worker)
        .execute(&mut *claim)
        .await
        .unwrap();
    let before = last_heartbeat(&db, worker).await;
    let mut landed = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = last_heartbeat(&db, worker).await;
        if now != before && !landed.contains(&now) {
            landed.push(now);
        }
    }
    claim.rollback().await.unwrap();

    // Assert: the agent beats every second; at least two of its four beats were stored while
    // the lock was held.
    assert!(
        landed.len() >= 2,
        "heartbeats stored while a claim's lock was held: {landed:?} (before: {before:?})"
    );
}
