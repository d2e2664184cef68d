//! Noticing lost agents among the workers that run steps (or have jobs parked in their own
//! queue): an agent killed outright (its connection, and so its control queue's consumer, is
//! gone for [`LOST_AFTER_CONNECTION`]) or silent (no heartbeat for the policy's
//! `unavailable_after`). What a loss does is in [`super::lost`].

use super::lost::{Lose, lose};
use super::{CHECK_EVERY, silent_after, unavailable_after};
use crate::orchestrator::Orchestrator;
use crate::transitions::{AttemptState, WorkerHealth};
use gantry_shared::amqp::Broker;
use gantry_shared::topology::Topology;
use lapin::types::FieldTable;
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A worker's agent is lost when its control queue (which dies with its broker connection)
/// has been gone for this long while the dispatcher itself was connected.
pub const LOST_AFTER_CONNECTION: Duration = Duration::from_secs(3);

/// After the dispatcher (re)connects to the broker, agents get this long to reconnect too
/// (their backoff tops out at 5 s) before a missing control queue counts against them.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// Detect lost workers every [`CHECK_EVERY`]. Their running attempts become `WorkerLost`,
/// which retries them elsewhere if the step allows it. A lost attempt's mutex is *not*
/// released: it expires with its lease, so a script the agent left behind cannot overlap the
/// next holder.
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
        let watch = Watch {
            lose: Lose {
                db: db.clone(),
                orchestrator: orchestrator.clone(),
                locks: locks.clone(),
                retry_base,
            },
            broker: broker.clone(),
            topology: topology.clone(),
            missing_since: HashMap::new(),
            connected_since: None,
            had_connection: false,
            probe: None,
        };
        let cancel = cancel.clone();
        async move {
            watch.run(cancel).await;
            Ok(())
        }
    });
}

/// A worker watched for loss: id, name, and whether its heartbeats are overdue.
type Watched = (Uuid, String, bool);

struct Watch {
    lose: Lose,
    broker: Broker,
    topology: Topology,
    /// Since when each worker's control queue has had no consumer.
    missing_since: HashMap<Uuid, Instant>,
    /// Since when the dispatcher has been connected to the broker (grace included).
    connected_since: Option<Instant>,
    had_connection: bool,
    /// The channel of passive declares (a failed one closes it).
    probe: Option<lapin::Channel>,
}

impl Watch {
    async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            self.pass().await;
        }
    }

    async fn pass(&mut self) {
        // Time without a broker connection does not count against agents.
        let Some(conn) = self.broker.current().filter(|c| c.status().connected()) else {
            self.connected_since = None;
            self.missing_since.clear();
            self.probe = None;
            return;
        };
        // The grace applies after a broker outage, not at the first connection: agents that
        // were connected before this dispatcher started are still connected.
        let had_connection = self.had_connection;
        let since = *self.connected_since.get_or_insert_with(|| {
            let now = Instant::now();
            if had_connection {
                now
            } else {
                now.checked_sub(RECONNECT_GRACE).unwrap_or(now)
            }
        });
        self.had_connection = true;
        let (unavailable_after, watched) = match self.watched().await {
            Ok(r) => r,
            Err(_) => {
                // Nor does time without PostgreSQL.
                self.missing_since.clear();
                return;
            }
        };
        self.missing_since
            .retain(|w, _| watched.iter().any(|(id, _, _)| id == w));
        for (id, name, silent) in watched {
            // Heartbeats were not being read while the dispatcher had no broker: judge
            // silence only after a full period connected.
            if silent && since.elapsed() >= silent_after(unavailable_after) {
                let why = format!("no heartbeat for {} s", unavailable_after.as_secs());
                lose(&self.lose, id, &name, &why).await;
                continue;
            }
            let Some(consumed) = self.control_consumed(&conn, id).await else {
                break;
            };
            if consumed {
                self.missing_since.remove(&id);
                continue;
            }
            let first = *self.missing_since.entry(id).or_insert_with(Instant::now);
            if first.elapsed() >= LOST_AFTER_CONNECTION && since.elapsed() >= RECONNECT_GRACE {
                self.missing_since.remove(&id);
                lose(
                    &self.lose,
                    id,
                    &name,
                    "its agent's connection to RabbitMQ closed (agent killed or cut off)",
                )
                .await;
            }
        }
    }

    /// Workers running steps, and workers with jobs waiting in their own queue (a task's
    /// sticky worker): an agent killed between two steps strands the next.
    async fn watched(&self) -> crate::store::Result<(Duration, Vec<Watched>)> {
        let after = unavailable_after(&self.lose.db).await?;
        // The states are written into the statement, not bound: a generic plan cannot tell
        // that `state = $2` matches the partial indexes that make this cheap
        // (`20261201000005_watch_indexes.sql`).
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT w.id, w.name,
                        (w.last_heartbeat_at IS NOT NULL
                         AND w.last_heartbeat_at < now() - make_interval(secs => $1)) AS silent
                 FROM workers w
                 WHERE EXISTS (SELECT 1 FROM attempts a WHERE a.worker_id = w.id
                               AND a.state = '{running}')
                    OR EXISTS (SELECT 1 FROM attempts a WHERE a.routed_worker = w.id
                               AND a.state IN ('{pending}', '{queued}') AND w.health <> $2)",
                running = AttemptState::Running.as_str(),
                pending = AttemptState::Pending.as_str(),
                queued = AttemptState::Queued.as_str(),
            )
        });
        let rows = sqlx::query_as(SQL.as_str())
            .bind(silent_after(after).as_secs_f64())
            .bind(WorkerHealth::Unavailable)
            .fetch_all(&self.lose.db)
            .await?;
        Ok((after, rows))
    }

    /// Whether the worker's control queue has a consumer (its agent is connected); `None`
    /// when no probe channel can be opened.
    async fn control_consumed(&mut self, conn: &lapin::Connection, id: Uuid) -> Option<bool> {
        let ch = match self.probe.as_ref().filter(|c| c.status().connected()) {
            Some(c) => c.clone(),
            None => {
                let c = conn.create_channel().await.ok()?;
                self.probe = Some(c.clone());
                c
            }
        };
        let declared = ch
            .queue_declare(
                self.topology.control_queue(id).into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        Some(match declared {
            // Alive: its agent consumes it (the consumer goes with its connection).
            Ok(q) => q.consumer_count() > 0,
            Err(e) if e.to_string().contains("NOT_FOUND") => {
                // Agents cannot declare it: declare it, so a live agent can consume it again
                // (the failed passive declare closed the probe channel).
                self.probe = None;
                let _ = crate::app::declare_workers(conn, &self.topology, &[id]).await;
                false
            }
            Err(_) => true,
        })
    }
}
