//! The consumers of one broker connection: as many as there are free slots, one per queue
//! at most, started again when a step ends (see the module above). Each delivery goes to
//! [`super::claim`].

use super::claim::handle_delivery;
use super::probes::{MISSING_RETRY, move_idle_consumers, needs_probe, probe_depths, probe_missing};
use super::{AgentContext, Consumer, REFUSED_BACKOFF, Slots};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Keep the right consumers alive on one connection until it dies or `stop` fires.
/// `queues` is in priority order: the worker's own queue first, then its pools; when it
/// changes (the worker's pools changed), consumers of queues no longer in it stop.
pub async fn manage(
    conn: Arc<Connection>,
    mut queue_list: tokio::sync::watch::Receiver<Vec<String>>,
    slots: Arc<Slots>,
    agent: Arc<AgentContext>,
    stop: CancellationToken,
) {
    let mut queues = queue_list.borrow_and_update().clone();
    let ch = match open_channel(&conn).await {
        Ok(ch) => ch,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a channel for jobs");
            return;
        }
    };
    let conn_gone = CancellationToken::new();
    let mut probe = tokio::time::interval(Duration::from_secs(1));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missing_probe = tokio::time::interval(MISSING_RETRY);
    missing_probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !ch.status().connected() || !conn.status().connected() {
            break;
        }
        let notified = slots.changed.notified();
        rebalance(&conn, &ch, &queues, &slots, &agent, &conn_gone);
        tokio::select! {
            _ = notified => {}
            _ = probe.tick() => {
                if needs_probe(&slots, &queues) {
                    probe_depths(&conn, &queues, &slots).await;
                    move_idle_consumers(&slots, &queues);
                }
            }
            _ = missing_probe.tick() => {
                probe_missing(&conn, &slots).await;
            }
            changed = queue_list.changed() => {
                if changed.is_err() {
                    break;
                }
                queues = queue_list.borrow_and_update().clone();
                let mut s = slots.lock();
                for c in s.consumers.values_mut() {
                    if !queues.contains(&c.queue) {
                        c.stop.cancel();
                    }
                }
                s.depths.retain(|q, _| queues.contains(q));
                s.missing.retain(|q, _| queues.contains(q));
                s.refused.clear();
            }
            _ = stop.cancelled() => break,
        }
    }
    // The consumers end with the channel; deliveries they held are requeued by the broker.
    conn_gone.cancel();
    let mut s = slots.lock();
    for c in s.consumers.values_mut() {
        c.stop.cancel();
    }
}

async fn open_channel(conn: &Connection) -> lapin::Result<Channel> {
    let ch = conn.create_channel().await?;
    // Per consumer (global = false), for consumers created after this call.
    ch.basic_qos(1, BasicQosOptions { global: false }).await?;
    Ok(ch)
}

/// Start consumers while there are free slots and queues without one.
fn rebalance(
    conn: &Arc<Connection>,
    ch: &Channel,
    queues: &[String],
    slots: &Arc<Slots>,
    agent: &Arc<AgentContext>,
    conn_gone: &CancellationToken,
) {
    let mut s = slots.lock();
    if s.draining || s.paused || slots.gate.busy() {
        return;
    }
    while s.units() < s.max {
        let without: Vec<&String> = queues
            .iter()
            .filter(|q| !s.missing.contains_key(q.as_str()))
            .filter(|q| {
                s.refused
                    .get(q.as_str())
                    .is_none_or(|at| at.elapsed() >= REFUSED_BACKOFF)
            })
            .filter(|q| {
                !s.consumers
                    .values()
                    .any(|c| &c.queue == *q && c.reserves && !c.stop.is_cancelled())
            })
            .collect();
        // Prefer a queue known to hold jobs; otherwise the first in priority order.
        let pick = without
            .iter()
            .find(|q| s.depths.get(q.as_str()).is_some_and(|d| *d > 0))
            .or_else(|| without.first())
            .map(|q| (*q).clone());
        let Some(queue) = pick else { break };
        let id = s.next_id;
        s.next_id += 1;
        let stop = conn_gone.child_token();
        s.consumers.insert(
            id,
            Consumer {
                queue: queue.clone(),
                reserves: true,
                busy: false,
                stop: stop.clone(),
            },
        );
        tokio::spawn(consume(
            conn.clone(),
            ch.clone(),
            queue,
            id,
            slots.clone(),
            agent.clone(),
            stop,
        ));
    }
}

async fn consume(
    conn: Arc<Connection>,
    ch: Channel,
    queue: String,
    id: u64,
    slots: Arc<Slots>,
    agent: Arc<AgentContext>,
    stop: CancellationToken,
) {
    let tag = format!("{}-{id}", agent.worker_id);
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    let mut consumer = match consumer {
        Ok(c) => c,
        Err(e) => {
            if e.to_string().contains("ACCESS_REFUSED") {
                tracing::warn!(
                    queue,
                    "the broker refused this worker's user this queue; reading the configuration again"
                );
                slots
                    .lock()
                    .refused
                    .insert(queue.clone(), std::time::Instant::now());
                agent.reconfigure.notify_one();
            } else if e.to_string().contains("NOT_FOUND") {
                tracing::warn!(
                    queue,
                    "this queue does not exist (the dispatcher declares it); consuming the others meanwhile"
                );
                slots
                    .lock()
                    .missing
                    .insert(queue.clone(), std::time::Instant::now());
            } else {
                tracing::warn!(error = %e, queue, "cannot consume");
            }
            slots.lock().consumers.remove(&id);
            // Let the manager notice a dead channel rather than spin on it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            slots.changed.notify_waiters();
            return;
        }
    };
    let mut cancelled = false;
    loop {
        let next = tokio::select! {
            n = consumer.next() => n,
            _ = stop.cancelled(), if !cancelled => {
                cancelled = true;
                // Deliveries sent before the broker saw the cancel still arrive; the stream
                // ends after them.
                if ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::debug!(error = %e, queue, "consumer ended");
                break;
            }
            None => break,
        };
        if let Some(c) = slots.lock().consumers.get_mut(&id) {
            c.busy = true;
        }
        let delivery = gantry_shared::amqp::consume::Incoming::from_delivery(delivery);
        let keep = handle_delivery(&conn, &ch, &tag, delivery, id, &slots, &agent).await;
        if let Some(c) = slots.lock().consumers.get_mut(&id) {
            c.busy = false;
        }
        if !keep && !cancelled {
            cancelled = true;
        }
    }
    slots.lock().consumers.remove(&id);
    slots.changed.notify_waiters();
}
