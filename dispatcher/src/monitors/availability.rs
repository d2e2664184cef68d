//! Workers whose heartbeats stopped become `Unavailable` (the dispatcher's verdict; the
//! agents report every other health themselves).

use super::{CHECK_EVERY, silent_after, unavailable_after};
use crate::transitions::{self, WorkerHealth};
use gantry_shared::ids::WorkerId;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Mark workers whose heartbeats stopped as `Unavailable`, every [`CHECK_EVERY`].
pub fn spawn_availability(db: PgPool, cancel: CancellationToken) {
    crate::supervise::every("availability", CHECK_EVERY, cancel, move || {
        let db = db.clone();
        async move { Ok(pass(&db).await?) }
    });
}

async fn pass(db: &PgPool) -> crate::store::Result<()> {
    let after = unavailable_after(db).await?;
    let silent: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM workers WHERE health <> $2
           AND (last_heartbeat_at IS NULL
                OR last_heartbeat_at < now() - make_interval(secs => $1))",
    )
    .bind(silent_after(after).as_secs_f64())
    .bind(WorkerHealth::Unavailable)
    .fetch_all(db)
    .await?;
    let reason = format!("no heartbeat for {} s", after.as_secs());
    for id in silent {
        let mut tx = db.begin().await?;
        transitions::set_health(
            &mut tx,
            WorkerId(id),
            WorkerHealth::Unavailable,
            Some(&reason),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}
