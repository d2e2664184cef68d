//! # Jobs that left their queue without a claim
//!
//! A worker's broker user may consume its pools' queues, and in RabbitMQ that also lets it
//! take a job and ack it without ever claiming it, or purge the queue. Nothing then runs, and
//! the attempt would stay `Queued` for good. PostgreSQL and the claim are the authority, so
//! the dispatcher notices: every [`CHECK_EVERY`] it compares, per queue, the attempts it has
//! `Queued` there with what the queue can still hold (its ready messages plus one unacked
//! delivery per consumer, whose prefetch is 1). When fewer are there than it queued, the
//! oldest of its attempts queued more than [`GRACE`] ago are the ones gone (queues are first
//! in, first out): they are published again under new job ids, which voids the old ones, so
//! a job that was only slow to show up can still never run twice. (A count taken while a
//! claim commits may see one job too few; re-publishing an attempt that is `Running` by then
//! changes nothing, since only `Pending` and `Queued` attempts get a new job id.)

use crate::orchestrator::Orchestrator;
use gantry_shared::amqp::Broker;
use gantry_shared::ids::StepRunId;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often queues are compared with their attempts.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// An attempt queued less long than this is never taken for gone.
pub const GRACE: Duration = Duration::from_secs(10);

/// How many of `queued` attempts are missing from a queue holding `ready` messages with
/// `consumers` consumers of prefetch 1.
pub fn missing(queued: u64, ready: u64, consumers: u64) -> u64 {
    queued.saturating_sub(ready.saturating_add(consumers))
}

pub fn spawn(
    db: PgPool,
    broker: Broker,
    namespace: String,
    orchestrator: Orchestrator,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            if let Err(e) = check(&db, &broker, &namespace, &orchestrator).await {
                tracing::debug!(error = %e, "checking queues for lost jobs failed; will retry");
            }
        }
    });
}

type QueueRow = (String, i64, Vec<Uuid>, Vec<i32>);

async fn check(
    db: &PgPool,
    broker: &Broker,
    ns: &str,
    orchestrator: &Orchestrator,
) -> anyhow::Result<()> {
    // Per routing key: all Queued attempts, and the old ones, oldest first.
    let rows: Vec<QueueRow> = sqlx::query_as(
        "SELECT routing_key, count(*),
                COALESCE(array_agg(step_run_id ORDER BY queued_at) FILTER (WHERE queued_at < now() - $1::interval), '{}'),
                COALESCE(array_agg(attempt ORDER BY queued_at) FILTER (WHERE queued_at < now() - $1::interval), '{}')
         FROM attempts WHERE state = 'Queued' AND routing_key IS NOT NULL
         GROUP BY routing_key
         HAVING bool_or(queued_at < now() - $1::interval)",
    )
    .bind(GRACE)
    .fetch_all(db)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let Some(conn) = broker.current().filter(|c| c.status().connected()) else {
        return Ok(());
    };
    for (key, queued, old_runs, old_attempts) in rows {
        let queue = format!("{ns}.{key}");
        // A passive declare of a missing queue closes its channel: one channel each.
        let ch = conn.create_channel().await?;
        let info = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "checked".into()).await;
        let (ready, consumers) = match info {
            Ok(q) => (u64::from(q.message_count()), u64::from(q.consumer_count())),
            // Deleted: nothing in it survives.
            Err(e) if e.to_string().contains("NOT_FOUND") => (0, 0),
            Err(e) => return Err(e.into()),
        };
        let gone = missing(queued as u64, ready, consumers) as usize;
        if gone == 0 {
            continue;
        }
        tracing::warn!(
            queue,
            queued,
            ready,
            consumers,
            gone,
            "jobs left their queue without a claim (taken and acked, or purged, by a consumer of it); publishing them again"
        );
        for (step_run, attempt) in old_runs.into_iter().zip(old_attempts).take(gone) {
            orchestrator
                .republish(StepRunId(step_run), attempt as u32)
                .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_what_the_queue_cannot_hold_is_missing() {
        use super::missing;
        assert_eq!(missing(3, 3, 0), 0);
        assert_eq!(missing(3, 1, 2), 0, "two being claimed");
        assert_eq!(missing(5, 1, 1), 3);
        assert_eq!(missing(1, 4, 0), 0, "published but not yet marked Queued");
        assert_eq!(missing(u64::MAX, u64::MAX, u64::MAX), 0);
    }
}
