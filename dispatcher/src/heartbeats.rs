//! # Heartbeats
//!
//! Every agent sends one on each heartbeat interval, on `<ns>.x.heartbeats`, never behind its
//! log traffic. A heartbeat is believed only of the worker whose broker user sent it (see
//! `senders`); what it says of that worker (version, health and its reason) is clipped and
//! stored, with a `worker_health_events` row for each change of health.

use crate::senders::{Attribution, Sender};
use crate::transitions::{self, HeartbeatRow, WorkerHealth};
use gantry_shared::amqp::Broker;
use gantry_shared::amqp::consume::{Message, QueueConsumer, Settle};
use gantry_shared::topology::Topology;
use gantry_shared::wire::Heartbeat;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Heartbeats stored in one transaction at most.
const HEARTBEAT_BATCH: usize = 256;

/// Store agents' heartbeats. They are taken in batches: whatever has arrived (up to
/// [`HEARTBEAT_BATCH`]) is stored in one transaction, the latest heartbeat of each worker only,
/// and acked at once. One transaction per heartbeat could not keep up with a large fleet on a
/// busy database: the queue grew, and live workers looked silent and became `Unavailable`.
pub fn spawn_heartbeats(
    db: PgPool,
    broker: Broker,
    topology: &Topology,
    attribution: Attribution,
    cancel: CancellationToken,
) {
    let queue = topology.heartbeats_queue();
    crate::supervise::spawn("heartbeats", cancel.clone(), move || {
        let consumer = QueueConsumer::new(
            broker.clone(),
            queue.clone(),
            "gantry-dispatcher-heartbeats",
            HEARTBEAT_BATCH as u16,
            cancel.clone(),
        );
        let (db, attribution) = (db.clone(), attribution.clone());
        async move {
            consumer
                .run_batches(HEARTBEAT_BATCH, |batch| {
                    let (db, attribution) = (&db, &attribution);
                    async move {
                        let beats: Vec<Beat> = batch
                            .iter()
                            .filter_map(|m| match Heartbeat::decode(&m.data) {
                                Ok(hb) => attribute(attribution, m, hb),
                                Err(_) => {
                                    tracing::debug!("ignoring a malformed heartbeat");
                                    None
                                }
                            })
                            .collect();
                        // A batch that cannot be stored is simply superseded by the next
                        // heartbeats: acked either way.
                        if let Err(e) = store_heartbeats(db, beats).await {
                            crate::supervise::pass_failed(
                                "heartbeats",
                                &format!("heartbeats not stored: {e}"),
                            );
                        }
                        Settle::Ack
                    }
                })
                .await;
            Ok(())
        }
    });
}

/// Longest agent version stored, in bytes.
const MAX_VERSION: usize = 64;
/// Longest health reason stored, in bytes.
const MAX_HEALTH_REASON: usize = 1000;

/// `text` cut to at most `max` bytes on a character boundary.
fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// A heartbeat and whether it counts only for a built-in worker (it came from the
/// dispatcher's own broker user with per-worker users in force).
struct Beat {
    hb: Heartbeat,
    builtin_only: bool,
}

/// Believe a heartbeat's `worker_id` only as far as its sender allows (see `senders`): a
/// forged heartbeat for another worker (to keep a killed agent looking alive) is dropped.
fn attribute(a: &Attribution, m: &Message, mut hb: Heartbeat) -> Option<Beat> {
    let sender = a.sender(m.user_id());
    // What an agent says of itself is stored and shown: bounded, whatever it sends.
    hb.version = crate::logs::storable(&clip(&hb.version, MAX_VERSION)).into_owned();
    hb.health_reason = hb
        .health_reason
        .map(|r| crate::logs::storable(&clip(&r, MAX_HEALTH_REASON)).into_owned());
    match a.worker(&sender, hb.worker_id, || true) {
        Ok(w) => {
            hb.worker_id = w;
            Some(Beat {
                builtin_only: a.managed() && sender == Sender::Dispatcher,
                hb,
            })
        }
        Err(why) => {
            tracing::warn!(worker = %hb.worker_id, sender = %sender.describe(), %why, "ignoring a heartbeat");
            None
        }
    }
}

/// Store a batch of heartbeats in one transaction: each worker's last heartbeat time and
/// version, and its health where it changed (with a `worker_health_events` row).
async fn store_heartbeats(db: &PgPool, beats: Vec<Beat>) -> sqlx::Result<()> {
    // The latest heartbeat of each worker, in a fixed order (row locks in id order).
    let mut latest: std::collections::BTreeMap<uuid::Uuid, Beat> = Default::default();
    for b in beats {
        match latest.get(&b.hb.worker_id.0) {
            Some(seen) if seen.hb.sent_at > b.hb.sent_at => {}
            _ => {
                latest.insert(b.hb.worker_id.0, b);
            }
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let rows: Vec<HeartbeatRow<'_>> = latest
        .values()
        .map(|b| HeartbeatRow {
            worker: b.hb.worker_id,
            version: &b.hb.version,
            health: reported_health(b.hb.health.as_deref()),
            reason: b.hb.health_reason.as_deref(),
            builtin_only: b.builtin_only,
        })
        .collect();
    let mut tx = db.begin().await?;
    let changed = transitions::store_heartbeats(&mut tx, &rows).await?;
    tx.commit().await?;
    for c in &changed {
        tracing::info!(worker = %c.worker, health = %c.health, reason = c.reason, "worker health changed");
    }
    Ok(())
}

/// The health an agent reports of itself: its own verdicts only (`Unavailable` is the
/// dispatcher's, and anything else or nothing counts as `Healthy`).
fn reported_health(reported: Option<&str>) -> WorkerHealth {
    match reported.and_then(|h| h.parse().ok()) {
        Some(h @ (WorkerHealth::Healthy | WorkerHealth::HasWarnings | WorkerHealth::Unhealthy)) => {
            h
        }
        _ => WorkerHealth::Healthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_agents_own_verdicts_are_believed() {
        assert_eq!(reported_health(Some("Unhealthy")), WorkerHealth::Unhealthy);
        assert_eq!(
            reported_health(Some("HasWarnings")),
            WorkerHealth::HasWarnings
        );
        assert_eq!(reported_health(Some("Unavailable")), WorkerHealth::Healthy);
        assert_eq!(reported_health(Some("bogus")), WorkerHealth::Healthy);
        assert_eq!(reported_health(None), WorkerHealth::Healthy);
    }
}
