//! # Jobs that left their queue without a claim
//!
//! A worker's broker user may consume its pools' queues, and in RabbitMQ that also lets it
//! take a job and ack it without ever claiming it, or purge the queue. Nothing then runs, and
//! the attempt would stay `Queued` for good. PostgreSQL and the claim are the authority, so
//! the dispatcher notices: every [`CHECK_EVERY`] it compares, per queue, the attempts it has
//! had `Queued` there for more than [`GRACE`] with what the queue still holds: its ready
//! messages plus those delivered and not yet acked, as the management API counts them (in
//! development mode, without that API, one unacked delivery per consumer, whose prefetch is
//! 1). When fewer are there than it queued, the oldest of those attempts are the ones gone
//! (queues are first in, first out): they are published again under new job ids, which voids
//! the old ones, so a job that was only slow to show up can still never run twice. (A count
//! taken while a claim commits may see one job too few; re-publishing an attempt that is
//! `Running` by then changes nothing, since only `Pending` and `Queued` attempts get a new
//! job id.) A queue that does not exist any more is declared again on the way.

use crate::broker_users::BrokerUsers;
use crate::orchestrator::Orchestrator;
use crate::transitions::AttemptState;
use gantry_shared::amqp::Broker;
use gantry_shared::ids::StepRunId;
use gantry_shared::topology::Topology;
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

/// How many of `queued` attempts are missing from a queue holding `ready` messages and
/// `unacked` deliveries.
pub fn missing(queued: u64, ready: u64, unacked: u64) -> u64 {
    queued.saturating_sub(ready.saturating_add(unacked))
}

/// What the check needs.
pub struct Strays {
    pub db: PgPool,
    pub broker: Broker,
    pub topology: Topology,
    pub users: Option<BrokerUsers>,
    pub orchestrator: Orchestrator,
}

impl Strays {
    pub fn spawn(self, cancel: CancellationToken) {
        let me = std::sync::Arc::new(self);
        crate::supervise::every("strays", CHECK_EVERY, cancel, move || {
            let me = me.clone();
            async move {
                use anyhow::Context as _;
                me.check().await.context("checking queues for lost jobs")
            }
        });
    }

    async fn check(&self) -> anyhow::Result<()> {
        // Per routing key, the attempts Queued there for longer than the grace, oldest first.
        // The state in the text, not bound: the partial index on queued attempts matches it
        // (see `crate::db::connect`).
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT routing_key, array_agg(step_run_id ORDER BY queued_at),
                        array_agg(attempt ORDER BY queued_at)
                 FROM attempts
                 WHERE state = '{queued}' AND routing_key IS NOT NULL
                   AND queued_at < now() - $1::interval
                 GROUP BY routing_key",
                queued = AttemptState::Queued.as_str()
            )
        });
        let rows: Vec<(String, Vec<Uuid>, Vec<i32>)> = sqlx::query_as(SQL.as_str())
            .bind(GRACE)
            .fetch_all(&self.db)
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.broker.current().filter(|c| c.status().connected()) else {
            return Ok(());
        };
        for (key, runs, attempts) in rows {
            let queue = format!("{}.{key}", self.topology.namespace());
            let held = match &self.users {
                Some(users) => users.queue_counts(&queue).await?,
                None => passive_counts(&conn, &queue).await?,
            };
            let (ready, unacked) = match held {
                Some(c) => c,
                None => {
                    // Deleted: nothing in it survives; declare it again for what comes next.
                    self.redeclare(&conn, &key).await;
                    (0, 0)
                }
            };
            let gone = missing(runs.len() as u64, ready, unacked) as usize;
            if gone == 0 {
                continue;
            }
            tracing::warn!(
                queue,
                queued = runs.len(),
                ready,
                unacked,
                gone,
                "jobs left their queue without a claim (taken and acked, or purged, by a consumer of it); publishing them again"
            );
            for (step_run, attempt) in runs.into_iter().zip(attempts).take(gone) {
                self.orchestrator
                    .republish(StepRunId(step_run), attempt as u32)
                    .await;
            }
        }
        Ok(())
    }

    async fn redeclare(&self, conn: &lapin::Connection, key: &str) {
        let Ok(ch) = conn.create_channel().await else {
            return;
        };
        let r = if let Some(slug) = key.strip_prefix("pool.") {
            self.topology.declare_pool(&ch, slug).await
        } else if let Some(id) = key.strip_prefix("worker.") {
            self.topology.declare_worker(&ch, id).await
        } else {
            self.topology.declare_base(&ch).await
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, key, "could not declare a missing queue again");
        }
        let _ = ch.close(200, "declared".into()).await;
    }
}

/// Ready messages and consumers (one unacked delivery each at most) of a queue, by a
/// passive declare; `None` if it does not exist.
async fn passive_counts(
    conn: &lapin::Connection,
    queue: &str,
) -> anyhow::Result<Option<(u64, u64)>> {
    // A passive declare of a missing queue closes its channel: one channel each.
    let ch = conn.create_channel().await?;
    let info = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = ch.close(200, "checked".into()).await;
    match info {
        Ok(q) => Ok(Some((
            u64::from(q.message_count()),
            u64::from(q.consumer_count()),
        ))),
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_what_the_queue_cannot_hold_is_missing() {
        use super::missing;
        assert_eq!(missing(3, 3, 0), 0);
        assert_eq!(missing(3, 1, 2), 0, "two being claimed");
        assert_eq!(missing(5, 1, 1), 3);
        assert_eq!(missing(1, 4, 0), 0, "newer ones are in the queue too");
        assert_eq!(missing(u64::MAX, u64::MAX, u64::MAX), 0);
    }
}
