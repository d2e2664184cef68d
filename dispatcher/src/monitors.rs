//! Small background loops: dead letters, the worker availability check, and worker loss.
//! (Heartbeats are in `heartbeats`.)

use crate::attempts;
use crate::orchestrator::Orchestrator;
use crate::store::settings;
use futures::StreamExt;
use gantry_shared::amqp::Broker;
use gantry_shared::topology::Topology;
use gantry_shared::wire::Job;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The machine policy's `unavailable_after`: a worker with no heartbeat for this long is
/// `Unavailable` (and lost, if it runs steps).
async fn unavailable_after(db: &PgPool) -> sqlx::Result<Duration> {
    Ok(Duration::from_secs(u64::from(
        settings::get(db)
            .await?
            .machine_policy
            .unavailable_after_secs,
    )))
}

/// How often worker availability and worker loss are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Allowance for a heartbeat's way from the agent through the broker into PostgreSQL.
pub const HEARTBEAT_TRANSIT: Duration = Duration::from_secs(1);

/// A worker counts as silent once its last stored heartbeat is older than this:
/// `unavailable_after` less the check cadence and [`HEARTBEAT_TRANSIT`] (at most a quarter of
/// it), so that a frozen agent is `Unavailable`, and its steps `WorkerLost`, at most
/// `unavailable_after` after its last heartbeat left it (28 s of silence, found within 29 s,
/// with the default 30 s).
pub fn silent_after(unavailable_after: Duration) -> Duration {
    let lead = CHECK_EVERY
        .saturating_add(HEARTBEAT_TRANSIT)
        .min(unavailable_after / 4);
    unavailable_after.saturating_sub(lead)
}

/// What a consumer does with a delivery once its handler is done with it.
pub(crate) enum Settle {
    /// Handled (or found useless): ack it.
    Ack,
    /// A transient failure (PostgreSQL away): handle it again after a pause, holding it.
    Retry,
}

/// A consumer of `queue` on a new channel, with `prefetch` unacked deliveries at most.
async fn open_consumer(
    conn: &lapin::Connection,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<lapin::Consumer, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Wait for the broker and open a consumer of `queue`, trying again every second; `None` once
/// cancelled.
pub(crate) async fn reconsume(
    broker: &Broker,
    queue: &str,
    tag: &str,
    prefetch: u16,
    cancel: &CancellationToken,
) -> Option<lapin::Consumer> {
    loop {
        let conn = tokio::select! {
            c = broker.connected() => c,
            _ = cancel.cancelled() => return None,
        };
        match open_consumer(&conn, queue, tag, prefetch).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::debug!(error = %e, queue, "cannot consume; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Consume a queue forever, re-consuming after connection loss. Every delivery taken is
/// acked once `handle` says [`Settle::Ack`]; on [`Settle::Retry`] it is held and handled again
/// after a pause (100 ms doubling to 5 s), never left unacked while the next ones pile up
/// behind the prefetch.
async fn consume_forever<F, Fut>(
    broker: &Broker,
    queue: &str,
    tag: &'static str,
    cancel: &CancellationToken,
    handle: &F,
) -> anyhow::Result<()>
where
    F: Fn(Vec<u8>, FieldTable) -> Fut,
    Fut: std::future::Future<Output = Settle>,
{
    loop {
        let Some(mut consumer) = reconsume(broker, queue, tag, 64, cancel).await else {
            return Ok(());
        };
        loop {
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = cancel.cancelled() => return Ok(()),
            };
            let Some(Ok(d)) = next else { break };
            let headers = d.properties.headers().clone().unwrap_or_default();
            let mut pause = Duration::from_millis(100);
            while let Settle::Retry = handle(d.data.clone(), headers.clone()).await {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                pause = pause.saturating_mul(2).min(Duration::from_secs(5));
            }
            if let Err(e) = d.ack(BasicAckOptions::default()).await {
                tracing::warn!(error = %e, queue, "could not ack a delivery; re-consuming");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Mark workers whose heartbeats stopped as `Unavailable`.
pub fn spawn_availability(db: PgPool, cancel: CancellationToken) {
    crate::supervise::spawn("availability", cancel.clone(), move || {
        let (db, cancel) = (db.clone(), cancel.clone());
        async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                let r = async {
                    let after = unavailable_after(&db).await?;
                    let silent_for = silent_after(after);
                    let silent: Vec<uuid::Uuid> = sqlx::query_scalar(
                        "SELECT id FROM workers WHERE health <> 'Unavailable'
                       AND (last_heartbeat_at IS NULL
                            OR last_heartbeat_at < now() - make_interval(secs => $1))",
                    )
                    .bind(silent_for.as_secs_f64())
                    .fetch_all(&db)
                    .await?;
                    for id in silent {
                        let mut tx = db.begin().await?;
                        let reason = format!("no heartbeat for {} s", after.as_secs());
                        settings::set_health(&mut tx, id, "Unavailable", Some(&reason)).await?;
                        tx.commit().await?;
                    }
                    Ok::<_, sqlx::Error>(())
                }
                .await;
                if let Err(e) = r {
                    crate::supervise::pass_failed("availability", &e);
                }
            }
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
    let handle = move |body: Vec<u8>, headers: FieldTable| {
        let db = db.clone();
        let orchestrator = orchestrator.clone();
        async move {
            // Whatever the sender wrote is stored as text PostgreSQL takes (no NUL), and
            // bounded.
            let reason = header_text(&headers, "x-first-death-reason")
                .map(|r| clip_text(&r, 200))
                .unwrap_or_else(|| "unknown".into());
            let from = header_text(&headers, "x-first-death-queue").map(|q| clip_text(&q, 300));
            let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]);
            let text = crate::logs::storable(&text).into_owned();
            tracing::warn!(queue = from.as_deref().unwrap_or("?"), %reason, "a message was dead-lettered");
            let stored =
                sqlx::query("INSERT INTO dead_letters (queue, reason, body) VALUES ($1, $2, $3)")
                    .bind(&from)
                    .bind(&reason)
                    .bind(&text)
                    .execute(&db)
                    .await;
            match stored {
                Ok(_) => {}
                // Held until PostgreSQL can take it.
                Err(e) if crate::db::is_transient(&e) => return Settle::Retry,
                Err(e) => {
                    // It never will: the record is lost, the delivery is acked all the
                    // same (a dead job's attempt is still failed below).
                    tracing::warn!(error = %e, "a dead-lettered message cannot be recorded in dead_letters; dropping the record");
                }
            }
            if let Ok(job) = Job::decode(&body) {
                let sha = gantry_shared::wire::body_sha256(&body);
                let r = async {
                    let mut tx = db.begin().await?;
                    // Only the very body published for the attempt counts: anyone may
                    // get a message dead-lettered (an agent rejects what it publishes
                    // itself), and its headers say whatever its sender wrote.
                    if let Some(locked) =
                        attempts::lock(&mut tx, job.step_run_id, job.attempt).await?
                        && locked.job_id == job.job_id.0
                        && locked.job_sha256.as_ref().is_none_or(|s| *s == sha)
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
                            crate::transitions::AttemptState::Failed,
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
                    Err(e) if crate::db::is_transient(&e) => return Settle::Retry,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not fail a dead-lettered job's attempt")
                    }
                }
            }
            Settle::Ack
        }
    };
    crate::supervise::spawn("dead-letters", cancel.clone(), move || {
        let (broker, queue, cancel, handle) = (
            broker.clone(),
            queue.clone(),
            cancel.clone(),
            handle.clone(),
        );
        async move { consume_forever(&broker, &queue, "gantry-dispatcher-dead", &cancel, &handle).await }
    });
}

/// `text` without NUL, at most `max` bytes (on a character boundary).
fn clip_text(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    crate::logs::storable(&text[..end]).into_owned()
}

/// A worker's agent is lost when its control queue (which dies with its broker connection)
/// has been gone for this long while the dispatcher itself was connected.
pub const LOST_AFTER_CONNECTION: Duration = Duration::from_secs(3);

/// After the dispatcher (re)connects to the broker, agents get this long to reconnect too
/// (their backoff tops out at 5 s) before a missing control queue counts against them.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// Detect lost workers among those running steps: an agent killed outright (its connection,
/// and so its control queue, is gone for [`LOST_AFTER_CONNECTION`]) or silent (no heartbeat
/// for the policy's `unavailable_after`). Their running attempts become `WorkerLost`, which retries them
/// elsewhere if the step allows it. A lost attempt's mutex is *not* released: it expires with
/// its lease, so a script the agent left behind cannot overlap the next holder.
pub fn spawn_worker_loss(
    db: PgPool,
    broker: Broker,
    topology: &Topology,
    orchestrator: Orchestrator,
    locks: crate::locks::Locks,
    retry_base: Duration,
    cancel: CancellationToken,
) {
    let topology = topology.clone();
    crate::supervise::spawn("worker-loss", cancel.clone(), move || {
        let (db, broker, topology, orchestrator, locks, cancel) = (
            db.clone(),
            broker.clone(),
            topology.clone(),
            orchestrator.clone(),
            locks.clone(),
            cancel.clone(),
        );
        async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut missing_since: std::collections::HashMap<uuid::Uuid, std::time::Instant> =
                Default::default();
            let mut connected_since: Option<std::time::Instant> = None;
            let mut had_connection = false;
            let mut probe: Option<lapin::Channel> = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                // Time without a broker connection does not count against agents.
                let Some(conn) = broker.current().filter(|c| c.status().connected()) else {
                    connected_since = None;
                    missing_since.clear();
                    probe = None;
                    continue;
                };
                // The grace applies after a broker outage, not at the first connection: agents
                // that were connected before this dispatcher started are still connected.
                let since = *connected_since.get_or_insert_with(|| {
                    let now = std::time::Instant::now();
                    if had_connection {
                        now
                    } else {
                        now.checked_sub(RECONNECT_GRACE).unwrap_or(now)
                    }
                });
                had_connection = true;
                // Workers running steps, and workers with jobs waiting in their own queue (a
                // task's sticky worker): an agent killed between two steps strands the next.
                type Watched = (Duration, Vec<(uuid::Uuid, String, bool)>);
                let running: sqlx::Result<Watched> = async {
                let after = unavailable_after(&db).await?;
                let rows = sqlx::query_as(
                    "SELECT w.id, w.name,
                            (w.last_heartbeat_at IS NOT NULL
                             AND w.last_heartbeat_at < now() - make_interval(secs => $1)) AS silent
                     FROM workers w
                     WHERE (
                        EXISTS (SELECT 1 FROM attempts a WHERE a.worker_id = w.id AND a.state = 'Running')
                        OR EXISTS (SELECT 1 FROM attempts a WHERE a.routed_worker = w.id
                                   AND a.state IN ('Pending', 'Queued') AND w.health <> 'Unavailable'))",
                )
                .bind(silent_after(after).as_secs_f64())
                .fetch_all(&db)
                .await?;
                Ok((after, rows))
            }
            .await;
                let (unavailable_after, running) = match running {
                    Ok(r) => r,
                    Err(_) => {
                        // Nor does time without PostgreSQL.
                        missing_since.clear();
                        continue;
                    }
                };
                missing_since.retain(|w, _| running.iter().any(|(id, _, _)| id == w));
                for (id, name, silent) in running {
                    // Heartbeats were not being read while the dispatcher had no broker: judge
                    // silence only after a full period connected.
                    if silent && since.elapsed() >= silent_after(unavailable_after) {
                        lose(
                            &db,
                            &orchestrator,
                            &locks,
                            id,
                            &name,
                            &format!("no heartbeat for {} s", unavailable_after.as_secs()),
                            retry_base,
                        )
                        .await;
                        continue;
                    }
                    let ch = match probe.as_ref().filter(|c| c.status().connected()) {
                        Some(c) => c.clone(),
                        None => match conn.create_channel().await {
                            Ok(c) => {
                                probe = Some(c.clone());
                                c
                            }
                            Err(_) => break,
                        },
                    };
                    let exists = match ch
                        .queue_declare(
                            topology.control_queue(id).into(),
                            lapin::options::QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                    {
                        // Alive: its agent consumes it (the consumer goes with its connection).
                        Ok(q) => q.consumer_count() > 0,
                        Err(e) if e.to_string().contains("NOT_FOUND") => {
                            // Agents cannot declare it: declare it, so a live agent can consume
                            // it again (the failed passive declare closed the probe channel).
                            probe = None;
                            let _ = crate::app::declare_workers(&conn, &topology, &[id]).await;
                            false
                        }
                        Err(_) => true,
                    };
                    if exists {
                        missing_since.remove(&id);
                        continue;
                    }
                    let first = *missing_since
                        .entry(id)
                        .or_insert_with(std::time::Instant::now);
                    if first.elapsed() >= LOST_AFTER_CONNECTION
                        && since.elapsed() >= RECONNECT_GRACE
                    {
                        missing_since.remove(&id);
                        lose(
                            &db,
                            &orchestrator,
                            &locks,
                            id,
                            &name,
                            "its agent's connection to RabbitMQ closed (agent killed or cut off)",
                            retry_base,
                        )
                        .await;
                    }
                }
            }
        }
    });
}

/// Mark a worker lost: its running attempts end `WorkerLost` (retried elsewhere if allowed).
async fn lose(
    db: &PgPool,
    orchestrator: &Orchestrator,
    locks: &crate::locks::Locks,
    worker: uuid::Uuid,
    name: &str,
    reason: &str,
    retry_base: Duration,
) {
    let r = async {
        let mut tx = db.begin().await?;
        let attempts_of: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
            "SELECT step_run_id, attempt FROM attempts WHERE worker_id = $1 AND state = 'Running'",
        )
        .bind(worker)
        .fetch_all(&mut *tx)
        .await?;
        let why = format!("worker {name} was lost: {reason}");
        let mut tasks = Vec::new();
        for (step_run, attempt) in attempts_of {
            let step_run = gantry_shared::ids::StepRunId(step_run);
            if let Some(locked) = attempts::lock(&mut tx, step_run, attempt as u32).await?
                && locked.state == "Running"
            {
                attempts::conclude(
                    &mut tx,
                    &locked,
                    step_run,
                    attempt as u32,
                    crate::transitions::AttemptState::WorkerLost,
                    Some(&why),
                    retry_base,
                )
                .await?;
                tasks.push(locked.task());
            }
        }
        settings::set_health(&mut tx, worker, "Unavailable", Some(reason)).await?;
        sqlx::query("UPDATE workers SET lost_at = now() WHERE id = $1")
            .bind(worker)
            .execute(&mut *tx)
            .await?;
        // Jobs parked in its own queue go back to the pool (re-published under new job
        // ids, which voids the parked ones).
        let parked: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
            "SELECT step_run_id, attempt FROM attempts
             WHERE routed_worker = $1 AND state IN ('Pending', 'Queued')",
        )
        .bind(worker)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>((tasks, parked))
    }
    .await;
    match r {
        Ok((tasks, parked)) => {
            tracing::warn!(
                worker = name,
                reason,
                attempts = tasks.len(),
                parked = parked.len(),
                "worker lost"
            );
            for (step_run, attempt) in parked {
                orchestrator
                    .republish(gantry_shared::ids::StepRunId(step_run), attempt as u32)
                    .await;
            }
            // A waiter for a lost step's mutex may go once the lease has expired too.
            locks.wake();
            for t in tasks {
                orchestrator.kick(t);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, worker = name, "could not mark a worker lost; will retry")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_and_cadence_add_up_to_unavailable_after() {
        let ua = Duration::from_secs(30);
        assert_eq!(silent_after(ua), Duration::from_secs(28));
        assert!(silent_after(ua) + CHECK_EVERY + HEARTBEAT_TRANSIT <= ua);
        // Short policies keep three quarters of their threshold.
        assert_eq!(
            silent_after(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(silent_after(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            silent_after(Duration::from_secs(86_400)),
            Duration::from_secs(86_398)
        );
    }
}
