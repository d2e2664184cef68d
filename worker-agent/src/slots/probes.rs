//! Looking at queues for the slot manager: how many jobs wait in each (only while queues
//! outnumber free slots, to put consumers where the jobs are), and whether a queue found
//! missing is back. Every look is a passive declare on a channel of its own: a passive
//! declare of a missing queue closes its channel, and the consumers' channel must not be it.

use super::Slots;
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::time::Duration;

/// How often a missing queue is looked for again.
pub(super) const MISSING_RETRY: Duration = Duration::from_secs(2);

/// Look for the missing queues again, each on a channel of its own (a passive declare of a
/// missing queue closes its channel); the ones found are consumed again.
pub(super) async fn probe_missing(conn: &Connection, slots: &Slots) {
    let missing: Vec<String> = slots.lock().missing.keys().cloned().collect();
    for q in missing {
        let Ok(ch) = conn.create_channel().await else {
            return;
        };
        let found = ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = ch.close(200, "probed".into()).await;
        if found {
            tracing::info!(queue = q, "a missing queue is back; consuming it again");
            slots.lock().missing.remove(&q);
            slots.changed.notify_waiters();
        }
    }
}

pub(super) fn needs_probe(slots: &Slots, queues: &[String]) -> bool {
    let s = slots.lock();
    !s.draining
        && !s.paused
        && !slots.gate.busy()
        && queues.iter().any(|q| {
            !s.consumers
                .values()
                .any(|c| &c.queue == q && c.reserves && !c.stop.is_cancelled())
        })
}

pub(super) async fn probe_depths(conn: &Connection, queues: &[String], slots: &Slots) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let mut depths = HashMap::new();
    let missing: Vec<String> = slots.lock().missing.keys().cloned().collect();
    for q in queues.iter().filter(|q| !missing.contains(q)) {
        if let Ok(info) = ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            depths.insert(q.clone(), info.message_count());
        } else {
            break;
        }
    }
    let _ = ch.close(200, "probed".into()).await;
    slots.lock().depths = depths;
}

/// A consumer idling on an empty queue while another queue with jobs has none: stop it, so
/// that the next rebalance starts one on the queue with jobs.
pub(super) fn move_idle_consumers(slots: &Slots, queues: &[String]) {
    let mut s = slots.lock();
    let hungry = queues.iter().any(|q| {
        s.depths.get(q).is_some_and(|d| *d > 0)
            && !s
                .consumers
                .values()
                .any(|c| &c.queue == q && c.reserves && !c.stop.is_cancelled())
    });
    if !hungry {
        return;
    }
    let depths = s.depths.clone();
    if let Some(c) = s.consumers.values_mut().find(|c| {
        c.reserves && !c.busy && !c.stop.is_cancelled() && depths.get(&c.queue) == Some(&0)
    }) {
        tracing::debug!(
            queue = c.queue,
            "moving an idle consumer to a queue with jobs"
        );
        c.stop.cancel();
    }
}
