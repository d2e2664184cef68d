//! `amqp::consume` against the local RabbitMQ (`amqp://guest:guest@127.0.0.1:5672`): every
//! settlement does what it says, a dropped ticket requeues, batches take what has arrived,
//! and a consumer the broker cancels consumes again.

use gantry_shared::amqp::consume::{QueueConsumer, Settle, settle_all};
use gantry_shared::amqp::{Broker, declare_nothing};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Fixture {
    broker: Broker,
    ch: Channel,
    queue: String,
    dead: String,
    cancel: CancellationToken,
    /// Stops the consumers only (the broker connection stays).
    consumers: CancellationToken,
}

impl Fixture {
    async fn new() -> Self {
        let cancel = CancellationToken::new();
        let broker = Broker::start(
            AMQP_URL.into(),
            "gantry-consume-test".into(),
            declare_nothing(),
            cancel.clone(),
        );
        let conn = broker
            .connected_within(Duration::from_secs(10))
            .await
            .expect("RabbitMQ at 127.0.0.1:5672");
        let ch = conn.create_channel().await.unwrap();
        let queue = format!("gantry-test.consume.{}", uuid::Uuid::new_v4());
        let dead = format!("{queue}.dead");
        let me = Self {
            broker,
            ch,
            queue,
            dead,
            consumers: cancel.child_token(),
            cancel,
        };
        me.declare().await;
        me
    }

    async fn declare(&self) {
        self.ch
            .queue_declare(
                self.dead.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.dead.as_str().into()),
        );
        self.ch
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions::default(),
                args,
            )
            .await
            .unwrap();
    }

    async fn publish(&self, body: &str) {
        self.ch
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    fn consumer(&self, prefetch: u16) -> QueueConsumer {
        QueueConsumer::new(
            self.broker.clone(),
            self.queue.clone(),
            "gantry-consume-test",
            prefetch,
            self.consumers.clone(),
        )
    }

    /// Ready messages in a queue (deliveries out on a channel are not counted).
    async fn ready(&self, queue: &str) -> u32 {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Wait until `queue` holds `n` ready messages.
    async fn wait_ready(&self, queue: &str, n: u32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.ready(queue).await;
            if got == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue} holds {got} ready messages, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn cleanup(self) {
        for q in [&self.queue, &self.dead] {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        self.cancel.cancel();
    }
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("in time")
}

#[tokio::test]
async fn ack_requeue_reject_and_a_dropped_ticket() {
    let fx = Fixture::new().await;
    let mut c = fx.consumer(10);
    fx.publish("acked").await;
    let d = within(c.next()).await.unwrap();
    assert_eq!(text(&d.message.data), "acked");
    assert!(!d.message.redelivered);
    assert!(d.settle(Settle::Ack).await);

    fx.publish("requeued").await;
    let d = within(c.next()).await.unwrap();
    assert!(d.settle(Settle::Requeue).await);
    let again = within(c.next()).await.unwrap();
    assert_eq!(text(&again.message.data), "requeued");
    assert!(again.message.redelivered, "a requeued delivery comes again");
    assert!(again.settle(Settle::Ack).await);

    fx.publish("rejected").await;
    let d = within(c.next()).await.unwrap();
    assert!(d.settle(Settle::Reject).await);
    fx.wait_ready(&fx.dead, 1).await;

    fx.publish("dropped").await;
    let d = within(c.next()).await.unwrap();
    drop(d);
    let again = within(c.next()).await.unwrap();
    assert_eq!(text(&again.message.data), "dropped");
    assert!(again.message.redelivered, "a dropped ticket requeues");
    assert!(again.settle(Settle::Ack).await);

    drop(c);
    fx.wait_ready(&fx.queue, 0).await;
    fx.cleanup().await;
}

#[tokio::test]
async fn a_batch_is_what_has_arrived_and_is_acked_at_once() {
    let fx = Fixture::new().await;
    for i in 0..20 {
        fx.publish(&format!("m{i}")).await;
    }
    let mut c = fx.consumer(50);
    // Everything is in the queue before the consumer starts: batches fill up to `max` as the
    // deliveries arrive.
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let batch = within(c.next_batch(8)).await.unwrap();
        assert!(!batch.is_empty() && batch.len() <= 8, "{}", batch.len());
        let (messages, tickets): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|i| (i.message, i.ticket)).unzip();
        seen.extend(messages.iter().map(|m| text(&m.data)));
        assert!(settle_all(tickets, Settle::Ack).await);
    }
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected, "in order, each once");
    // Nothing is left unacked: closing the channel gives nothing back.
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fx.wait_ready(&fx.queue, 0).await;
    fx.cleanup().await;
}

#[tokio::test]
async fn run_settles_each_delivery_as_the_handler_answers() {
    let fx = Fixture::new().await;
    for body in ["ack", "reject", "ack"] {
        fx.publish(body).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = fx.consumer(4);
    let run = tokio::spawn(c.run(move |m| {
        let tx = tx.clone();
        async move {
            let body = text(&m.data);
            let _ = tx.send(body.clone());
            if body == "reject" {
                Settle::Reject
            } else {
                Settle::Ack
            }
        }
    }));
    for _ in 0..3 {
        within(rx.recv()).await.unwrap();
    }
    fx.wait_ready(&fx.dead, 1).await;
    fx.consumers.cancel();
    within(run).await.unwrap();
    fx.wait_ready(&fx.queue, 0).await;
    fx.cleanup().await;
}

#[tokio::test]
async fn a_consumer_the_broker_cancels_consumes_again() {
    let fx = Fixture::new().await;
    let mut c = fx.consumer(4);
    fx.publish("before").await;
    let d = within(c.next()).await.unwrap();
    assert!(d.settle(Settle::Ack).await);
    // Deleting the queue cancels the consumer; once it exists again, the consumer is back.
    fx.ch
        .queue_delete(fx.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let next = tokio::spawn(async move {
        let d = c.next().await;
        (c, d)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    fx.declare().await;
    fx.publish("after").await;
    let (_c, d) = within(next).await.unwrap();
    let d = d.unwrap();
    assert_eq!(text(&d.message.data), "after");
    assert!(d.settle(Settle::Ack).await);
    fx.cleanup().await;
}
