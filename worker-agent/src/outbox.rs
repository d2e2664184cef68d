//! # The outbox: every event the agent reports, delivered at least once, in order
//!
//! Steps hand encoded events to a bounded channel; one task publishes them to
//! `<ns>.x.results` (which feeds `<ns>.results`) with publisher confirms, a batch at a time (all sent, then all confirmed,
//! so batches pipeline). If anything in a batch is not confirmed (the broker went away, a
//! nack), the whole batch is sent again, in order, once the connection is back. The
//! dispatcher ignores what it already stored, so repeats are harmless, and nothing is
//! dropped: while the broker is away the channel fills and the steps' output waits (the
//! scripts block on a full pipe) instead of growing memory.

use gantry_shared::amqp::{Broker, Publisher, json_properties};
use std::time::Duration;
use tokio::sync::mpsc;

/// Events waiting to be sent, at most.
const CAPACITY: usize = 64;
/// Events sent before their confirmations are awaited.
const BATCH: usize = 32;

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Vec<u8>>,
}

impl Outbox {
    /// Start the publishing task; it ends once every `Outbox` clone is dropped and all
    /// queued events are confirmed.
    pub fn start(broker: Broker, results_exchange: String) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let handle = tokio::spawn(run(Publisher::new(broker), results_exchange, rx));
        (Self { tx }, handle)
    }

    /// Queue an encoded event; waits while the outbox is full.
    pub async fn send(&self, event: Vec<u8>) {
        // The receiver lives until every sender is gone, so this cannot fail.
        let _ = self.tx.send(event).await;
    }
}

async fn run(publisher: Publisher, exchange: String, mut rx: mpsc::Receiver<Vec<u8>>) {
    let props = json_properties();
    let mut failures = 0u32;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        loop {
            let mut ok = true;
            let mut pending = Vec::with_capacity(batch.len());
            for ev in &batch {
                match publisher.send(&exchange, "", ev, props.clone()).await {
                    Ok(p) => pending.push(p),
                    Err(e) => {
                        ok = false;
                        if failures == 0 {
                            tracing::warn!(error = %e, "cannot publish results; holding them until RabbitMQ is back");
                        }
                        break;
                    }
                }
            }
            for p in pending {
                if let Err(e) = p.wait().await {
                    if ok && failures == 0 {
                        tracing::warn!(error = %e, "results not confirmed; sending them again");
                    }
                    ok = false;
                }
            }
            if ok {
                if failures > 0 {
                    tracing::info!("results flowing again");
                }
                failures = 0;
                break;
            }
            failures += 1;
            tokio::time::sleep(
                Duration::from_millis(250).min(Duration::from_millis(50) * failures),
            )
            .await;
        }
    }
}
