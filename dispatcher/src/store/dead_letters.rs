//! The `dead_letters` table: what `<ns>.dead` received (see `monitors::dead_letters`).

use sqlx::PgExecutor;

/// Record one dead-lettered message (its text already storable and bounded).
pub async fn record(
    db: impl PgExecutor<'_>,
    queue: Option<&str>,
    reason: &str,
    body: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO dead_letters (queue, reason, body) VALUES ($1, $2, $3)")
        .bind(queue)
        .bind(reason)
        .bind(body)
        .execute(db)
        .await?;
    Ok(())
}
