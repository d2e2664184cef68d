//! Small background consumers: agent heartbeats, dead letters, and the worker availability
//! check.

use crate::attempts;
use crate::orchestrator::Orchestrator;
use futures::StreamExt;
use gantry_shared::amqp::Broker;
use gantry_shared::topology::Topology;
use gantry_shared::wire::{Heartbeat, Job};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A worker with no heartbeat for this long is shown `Unavailable`.
pub const UNAVAILABLE_AFTER: Duration = Duration::from_secs(30);

/// Consume a queue forever, re-consuming after connection loss; `handle` returns whether to
/// ack (heartbeats and dead letters are acked once handled or found useless).
async fn consume_forever<F, Fut>(
    broker: Broker,
    queue: String,
    tag: &'static str,
    cancel: CancellationToken,
    handle: F,
) where
    F: Fn(Vec<u8>, FieldTable) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        let conn = tokio::select! {
            c = broker.connected() => c,
            _ = cancel.cancelled() => return,
        };
        let consumer = async {
            let ch = conn.create_channel().await?;
            ch.basic_qos(64, BasicQosOptions::default()).await?;
            ch.basic_consume(
                queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        }
        .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, queue, "cannot consume; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = cancel.cancelled() => return,
            };
            match next {
                Some(Ok(d)) => {
                    let headers = d.properties.headers().clone().unwrap_or_default();
                    if handle(d.data.clone(), headers).await {
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                }
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn spawn_heartbeats(
    db: PgPool,
    broker: Broker,
    topology: &Topology,
    cancel: CancellationToken,
) {
    let queue = topology.heartbeats_queue();
    tokio::spawn(consume_forever(
        broker,
        queue,
        "gantry-dispatcher-heartbeats",
        cancel,
        move |body, _| {
            let db = db.clone();
            async move {
                let Ok(hb) = Heartbeat::decode(&body) else {
                    tracing::debug!("ignoring a malformed heartbeat");
                    return true;
                };
                let r = sqlx::query(
                "UPDATE workers SET last_heartbeat_at = now(), agent_version = $2,
                     health = CASE WHEN health = 'Unavailable' THEN 'Healthy' ELSE health END,
                     health_reason = CASE WHEN health = 'Unavailable' THEN NULL ELSE health_reason END
                 WHERE id = $1",
            )
            .bind(hb.worker_id.0)
            .bind(&hb.version)
            .execute(&db)
            .await;
                // A heartbeat that cannot be stored is simply superseded by the next one.
                if let Err(e) = r {
                    tracing::debug!(error = %e, "heartbeat not stored");
                }
                true
            }
        },
    ));
}

/// Mark workers whose heartbeats stopped as `Unavailable`.
pub fn spawn_availability(db: PgPool, cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            let _ = sqlx::query(
                "UPDATE workers SET health = 'Unavailable',
                     health_reason = 'no heartbeat for ' || $1::text || ' s'
                 WHERE health <> 'Unavailable'
                   AND (last_heartbeat_at IS NULL OR last_heartbeat_at < now() - make_interval(secs => $1))",
            )
            .bind(UNAVAILABLE_AFTER.as_secs() as f64)
            .execute(&db)
            .await;
        }
    });
}

fn header_text(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).and_then(|v| match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    })
}

/// Record dead-lettered messages and fail the attempts of dead-lettered jobs.
pub fn spawn_dead_letters(
    db: PgPool,
    broker: Broker,
    topology: &Topology,
    orchestrator: Orchestrator,
    retry_base: Duration,
    cancel: CancellationToken,
) {
    let queue = topology.dead_queue();
    tokio::spawn(consume_forever(
        broker,
        queue,
        "gantry-dispatcher-dead",
        cancel,
        move |body, headers| {
            let db = db.clone();
            let orchestrator = orchestrator.clone();
            async move {
                let reason = header_text(&headers, "x-first-death-reason")
                    .unwrap_or_else(|| "unknown".into());
                let from = header_text(&headers, "x-first-death-queue");
                let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]).into_owned();
                tracing::warn!(queue = from.as_deref().unwrap_or("?"), %reason, "a message was dead-lettered");
                let stored = sqlx::query(
                    "INSERT INTO dead_letters (queue, reason, body) VALUES ($1, $2, $3)",
                )
                .bind(&from)
                .bind(&reason)
                .bind(&text)
                .execute(&db)
                .await;
                if stored.is_err() {
                    // Keep it in the queue until PostgreSQL can take it.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return false;
                }
                if let Ok(job) = Job::decode(&body) {
                    let r = async {
                        let mut tx = db.begin().await?;
                        if let Some(locked) =
                            attempts::lock(&mut tx, job.step_run_id, job.attempt).await?
                            && locked.job_id == job.job_id.0
                            && matches!(locked.state.as_str(), "Pending" | "Queued")
                        {
                            let why = format!(
                                "its job was dead-lettered ({reason}) from {}",
                                from.as_deref().unwrap_or("a queue")
                            );
                            attempts::conclude(
                                &mut tx,
                                &locked,
                                job.step_run_id,
                                job.attempt,
                                "Failed",
                                Some(&why),
                                retry_base,
                            )
                            .await?;
                            tx.commit().await?;
                            return Ok::<_, sqlx::Error>(Some(locked.task()));
                        }
                        Ok(None)
                    }
                    .await;
                    match r {
                        Ok(Some(task)) => orchestrator.kick(task),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "could not fail a dead-lettered job's attempt")
                        }
                    }
                }
                true
            }
        },
    ));
}
