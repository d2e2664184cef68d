//! # Heartbeats
//!
//! Every agent sends one on each heartbeat interval, on `<ns>.x.heartbeats`, never behind its
//! log traffic. A heartbeat is believed only of the worker whose broker user sent it (see
//! `senders`); what it says of that worker (version, health and its reason) is clipped and
//! stored, with a `worker_health_events` row for each change of health.

use crate::monitors::reconsume;
use crate::senders::{Attribution, Sender};
use futures::{FutureExt, StreamExt};
use gantry_shared::amqp::Broker;
use gantry_shared::topology::Topology;
use gantry_shared::wire::Heartbeat;
use lapin::options::BasicAckOptions;
use sqlx::PgPool;
use std::time::Duration;
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
        let (db, broker, queue, attribution, cancel) = (
            db.clone(),
            broker.clone(),
            queue.clone(),
            attribution.clone(),
            cancel.clone(),
        );
        async move {
            loop {
                let tag = "gantry-dispatcher-heartbeats";
                let prefetch = HEARTBEAT_BATCH as u16;
                let Some(mut consumer) = reconsume(&broker, &queue, tag, prefetch, &cancel).await
                else {
                    return Ok(());
                };
                loop {
                    let first = tokio::select! {
                        n = consumer.next() => n,
                        _ = cancel.cancelled() => return Ok(()),
                    };
                    let Some(Ok(first)) = first else { break };
                    let mut batch = vec![first];
                    let mut broken = false;
                    while batch.len() < HEARTBEAT_BATCH {
                        match consumer.next().now_or_never() {
                            Some(Some(Ok(d))) => batch.push(d),
                            Some(_) => {
                                broken = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    let beats: Vec<Beat> = batch
                        .iter()
                        .filter_map(|d| match Heartbeat::decode(&d.data) {
                            Ok(hb) => attribute(&attribution, d, hb),
                            Err(_) => {
                                tracing::debug!("ignoring a malformed heartbeat");
                                None
                            }
                        })
                        .collect();
                    // A batch that cannot be stored is simply superseded by the next heartbeats.
                    if let Err(e) = store_heartbeats(&db, beats).await {
                        crate::supervise::pass_failed(
                            "heartbeats",
                            &format!("heartbeats not stored: {e}"),
                        );
                    }
                    // Deliveries on one channel are acked in order: acking the last with
                    // `multiple` acks the whole batch.
                    if let Some(last) = batch.last() {
                        let _ = last.ack(BasicAckOptions { multiple: true }).await;
                    }
                    if broken {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
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
fn attribute(a: &Attribution, d: &lapin::message::Delivery, mut hb: Heartbeat) -> Option<Beat> {
    let sender = a.sender(d.properties.user_id().as_ref().map(|u| u.as_str()));
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
    let ids: Vec<uuid::Uuid> = latest.keys().copied().collect();
    let versions: Vec<&str> = latest.values().map(|b| b.hb.version.as_str()).collect();
    let healths: Vec<&str> = latest
        .values()
        .map(|b| {
            b.hb.health
                .as_deref()
                .filter(|h| matches!(*h, "Healthy" | "HasWarnings" | "Unhealthy"))
                .unwrap_or("Healthy")
        })
        .collect();
    let reasons: Vec<Option<&str>> = latest
        .values()
        .map(|b| b.hb.health_reason.as_deref())
        .collect();
    let builtin_only: Vec<bool> = latest.values().map(|b| b.builtin_only).collect();
    let mut tx = db.begin().await?;
    // One statement: the heartbeat itself, and the health where it changed (the old value
    // comes from the row as it was before this update).
    let changed: Vec<(uuid::Uuid, String, Option<String>)> = sqlx::query_as(
        "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
                                         $5::bool[])
                      AS u(id, version, health, reason, builtin_only)),
              old AS (SELECT w.id, w.health, w.health_reason FROM workers w JOIN u ON u.id = w.id
                      WHERE w.builtin OR NOT u.builtin_only
                      ORDER BY w.id FOR UPDATE OF w)
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
    .fetch_all(&mut *tx)
    .await
    .map(|rows: Vec<(uuid::Uuid, String, Option<String>, bool)>| {
        rows.into_iter()
            .filter(|r| r.3)
            .map(|(id, h, r, _)| (id, h, r))
            .collect()
    })?;
    if !changed.is_empty() {
        let ids: Vec<uuid::Uuid> = changed.iter().map(|c| c.0).collect();
        let healths: Vec<&str> = changed.iter().map(|c| c.1.as_str()).collect();
        let reasons: Vec<Option<&str>> = changed.iter().map(|c| c.2.as_deref()).collect();
        sqlx::query(
            "INSERT INTO worker_health_events (worker_id, health, reason)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])",
        )
        .bind(&ids)
        .bind(&healths)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    for (worker, health, reason) in &changed {
        tracing::info!(%worker, health, reason, "worker health changed");
    }
    Ok(())
}
