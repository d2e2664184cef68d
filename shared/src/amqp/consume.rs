//! # Consuming a queue: one primitive
//!
//! [`QueueConsumer`] opens a channel with a prefetch on the [`Broker`]'s current connection,
//! consumes one queue, and opens a new channel and consumes again whenever the channel, the
//! consumer or the connection breaks (waiting for the broker to come back, trying every
//! second). Each delivery comes out as an [`Incoming`]: the [`Message`] and a [`Ticket`] that
//! settles it exactly once with a [`Settle`] — ack, requeue, or reject (dead-lettered, if the
//! queue has a dead-letter exchange).
//!
//! No delivery is left unsettled: a ticket dropped without being settled requeues its
//! delivery (and says so in the log: that is a bug in the caller), and the channel of a
//! consumer that is dropped or re-opened is closed, which gives everything it still held back
//! to the queue. A delivery whose settlement fails (its channel broke meanwhile) is
//! redelivered by the broker, which is why every consumer must be idempotent.
//!
//! Every consumer in Gantry settles through it: the dispatcher's (results, heartbeats, dead
//! letters) and the agent's control queue consume with [`QueueConsumer`]; the agent's job
//! consumers, which it starts and cancels on one channel as its slots free up and fill, take
//! each delivery as an [`Incoming`] ([`Incoming::from_delivery`]) and settle its ticket the
//! same way.
//!
//! Three ways to use it:
//! - [`QueueConsumer::run`]: a handler per delivery, each settled by the handler's answer;
//! - [`QueueConsumer::run_batches`]: whatever has already arrived (up to a maximum) handed to
//!   the handler at once and settled together;
//! - [`QueueConsumer::next`] and [`QueueConsumer::next_batch`] (the first delivery plus every
//!   one already arrived behind it, up to a maximum): the caller settles each [`Incoming`]
//!   itself, in any order it likes.

use super::Broker;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What becomes of a delivery once it was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Handled (or found useless): the broker forgets it.
    Ack,
    /// Not handled now: back to the queue, to be delivered again.
    Requeue,
    /// Never handleable (malformed): dead-lettered if the queue has a dead-letter exchange,
    /// dropped otherwise.
    Reject,
}

/// A delivered message, without its means of settlement (see [`Ticket`]).
#[derive(Debug)]
pub struct Message {
    pub data: Vec<u8>,
    pub properties: BasicProperties,
    /// The broker delivered it before (to this consumer or another).
    pub redelivered: bool,
}

impl Message {
    /// The `user_id` property: the broker-validated login of its publisher.
    pub fn user_id(&self) -> Option<&str> {
        self.properties.user_id().as_ref().map(|u| u.as_str())
    }

    /// A header's value when it is a string.
    pub fn header_text(&self, key: &str) -> Option<String> {
        header_text(self.properties.headers().as_ref()?, key)
    }
}

/// A string header of `headers`, if there is one under `key`.
pub fn header_text(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).and_then(|v| match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    })
}

/// What the deliveries of one channel share: how many are out unsettled, and whether a
/// settlement found the channel broken.
#[derive(Default)]
struct ChannelState {
    outstanding: AtomicUsize,
    broken: AtomicBool,
}

/// The right, and the duty, to settle one delivery exactly once. Dropped unsettled, it
/// requeues the delivery.
pub struct Ticket {
    acker: lapin::Acker,
    state: Arc<ChannelState>,
    settled: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("settled", &self.settled)
            .finish()
    }
}

impl Ticket {
    fn new(acker: lapin::Acker, state: Arc<ChannelState>) -> Self {
        state.outstanding.fetch_add(1, Ordering::SeqCst);
        Self {
            acker,
            state,
            settled: false,
        }
    }

    fn done(&mut self) {
        if !self.settled {
            self.settled = true;
            self.state.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Settle the delivery. `false` if its channel broke first: the broker delivers it again
    /// (the consumer re-consumes on its next call).
    pub async fn settle(mut self, how: Settle) -> bool {
        self.done();
        let r = match how {
            Settle::Ack => self.acker.ack(BasicAckOptions::default()).await,
            Settle::Requeue => {
                self.acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
            }
            Settle::Reject => {
                self.acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
        };
        match r {
            Ok(true) => true,
            Ok(false) | Err(_) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "a delivery could not be settled; re-consuming");
                }
                self.state.broken.store(true, Ordering::SeqCst);
                false
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.done();
        if !self.acker.usable() {
            return;
        }
        tracing::warn!("a delivery was dropped without being settled; requeueing it");
        let acker = self.acker.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            });
        }
    }
}

/// One delivery: its message and its ticket.
#[derive(Debug)]
pub struct Incoming {
    pub message: Message,
    pub ticket: Ticket,
}

impl Incoming {
    /// A delivery from a consumer that manages its own channel and consumers (the agent's job
    /// consumers, started and cancelled as its slots free up and fill): settled the same way,
    /// exactly once, and requeued if dropped unsettled.
    pub fn from_delivery(d: lapin::message::Delivery) -> Self {
        Self::new(d, &Arc::new(ChannelState::default()))
    }

    fn new(d: lapin::message::Delivery, state: &Arc<ChannelState>) -> Self {
        let lapin::message::Delivery {
            data,
            properties,
            redelivered,
            acker,
            ..
        } = d;
        Self {
            message: Message {
                data,
                properties,
                redelivered,
            },
            ticket: Ticket::new(acker, state.clone()),
        }
    }

    /// Settle it (see [`Ticket::settle`]).
    pub async fn settle(self, how: Settle) -> bool {
        self.ticket.settle(how).await
    }
}

/// Settle several deliveries the same way: an ack of a whole batch that is everything its
/// channel has out is one `basic.ack` with `multiple`; anything else is settled one by one.
/// `false` if any settlement failed.
pub async fn settle_all(tickets: Vec<Ticket>, how: Settle) -> bool {
    let Some(last) = tickets.last() else {
        return true;
    };
    let one_channel = tickets.iter().all(|t| Arc::ptr_eq(&t.state, &last.state));
    let everything_out = last.state.outstanding.load(Ordering::SeqCst) == tickets.len();
    if how == Settle::Ack && tickets.len() > 1 && one_channel && everything_out {
        let mut tickets = tickets;
        let mut last = tickets.pop().expect("not empty");
        for t in &mut tickets {
            t.done();
        }
        last.done();
        // Deliveries of one channel are handed out in tag order, and every earlier one is
        // settled: acking up to the last acks exactly this batch.
        return match last.acker.ack(BasicAckOptions { multiple: true }).await {
            Ok(true) => true,
            _ => {
                last.state.broken.store(true, Ordering::SeqCst);
                false
            }
        };
    }
    let mut ok = true;
    for t in tickets {
        ok &= t.settle(how).await;
    }
    ok
}

/// A consuming channel of the current connection.
struct Live {
    channel: Channel,
    consumer: lapin::Consumer,
    state: Arc<ChannelState>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // What it still holds goes back to the queue once the channel is closed.
        let channel = self.channel.clone();
        if channel.status().connected()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = channel.close(200, "re-consuming".into()).await;
            });
        }
    }
}

/// A consumer of one queue that survives broken channels and connections.
pub struct QueueConsumer {
    broker: Broker,
    queue: String,
    tag: String,
    prefetch: u16,
    cancel: CancellationToken,
    live: Option<Live>,
    /// The last channel broke: pause before the next one.
    pause: bool,
    /// Consume as the queue's only consumer.
    exclusive: bool,
}

impl QueueConsumer {
    /// Consume `queue` under consumer tag `tag` (the broker adds a suffix of its own if
    /// needed), with at most `prefetch` deliveries out unsettled, until `cancel`.
    pub fn new(
        broker: Broker,
        queue: impl Into<String>,
        tag: impl Into<String>,
        prefetch: u16,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            broker,
            queue: queue.into(),
            tag: tag.into(),
            prefetch: prefetch.max(1),
            cancel,
            live: None,
            pause: false,
            exclusive: false,
        }
    }

    /// Consume as the queue's only consumer (`exclusive`): nobody else can consume it while
    /// this consumer lives, and the queue's consumer count says whether it does.
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// Open a consuming channel; `None` once cancelled.
    async fn open(&mut self) -> Option<()> {
        if self.pause {
            self.pause = false;
            self.sleep(Duration::from_millis(200)).await?;
        }
        loop {
            let conn = tokio::select! {
                c = self.broker.connected() => c,
                _ = self.cancel.cancelled() => return None,
            };
            let opened = async {
                let channel = conn.create_channel().await?;
                channel
                    .basic_qos(self.prefetch, BasicQosOptions::default())
                    .await?;
                let consumer = channel
                    .basic_consume(
                        self.queue.as_str().into(),
                        self.tag.as_str().into(),
                        BasicConsumeOptions {
                            exclusive: self.exclusive,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>((channel, consumer))
            }
            .await;
            match opened {
                Ok((channel, consumer)) => {
                    self.live = Some(Live {
                        channel,
                        consumer,
                        state: Default::default(),
                    });
                    return Some(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, queue = self.queue, "cannot consume; retrying");
                    self.sleep(Duration::from_secs(1)).await?;
                }
            }
        }
    }

    async fn sleep(&self, d: Duration) -> Option<()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Some(()),
            _ = self.cancel.cancelled() => None,
        }
    }

    /// Forget a broken channel (its unsettled deliveries come again).
    fn drop_live(&mut self) {
        self.live = None;
        self.pause = true;
    }

    /// The next delivery, re-consuming as often as needed; `None` once cancelled.
    pub async fn next(&mut self) -> Option<Incoming> {
        loop {
            if self.live.as_ref().is_some_and(|l| {
                l.state.broken.load(Ordering::SeqCst) || !l.channel.status().connected()
            }) {
                self.drop_live();
            }
            if self.live.is_none() {
                self.open().await?;
            }
            let live = self.live.as_mut().expect("opened");
            let next = tokio::select! {
                n = live.consumer.next() => n,
                _ = self.cancel.cancelled() => return None,
            };
            match next {
                Some(Ok(d)) => return Some(Incoming::new(d, &live.state)),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, queue = self.queue, "consumer interrupted; re-consuming");
                    self.drop_live();
                }
                None => {
                    tracing::debug!(queue = self.queue, "consumer cancelled; re-consuming");
                    self.drop_live();
                }
            }
        }
    }

    /// The next delivery and every one that has already arrived behind it, `max` at most (at
    /// least one); `None` once cancelled. Never waits for more than the first.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Incoming>> {
        let first = self.next().await?;
        let mut batch = vec![first];
        while batch.len() < max {
            let Some(live) = self.live.as_mut() else {
                break;
            };
            match live.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(Incoming::new(d, &live.state)),
                // Broken: what we have is still settled (or redelivered); the next call
                // re-consumes.
                Some(_) => {
                    live.state.broken.store(true, Ordering::SeqCst);
                    break;
                }
                None => break,
            }
        }
        Some(batch)
    }

    /// Hand every delivery to `handle` and settle it as it answers, until cancelled.
    pub async fn run<F, Fut>(mut self, mut handle: F)
    where
        F: FnMut(Message) -> Fut,
        Fut: Future<Output = Settle>,
    {
        while let Some(Incoming { message, ticket }) = self.next().await {
            let how = handle(message).await;
            ticket.settle(how).await;
        }
    }

    /// Hand whatever has arrived (`max` at most, see [`QueueConsumer::next_batch`]) to
    /// `handle` at once and settle the whole batch as it answers, until cancelled.
    pub async fn run_batches<F, Fut>(mut self, max: usize, mut handle: F)
    where
        F: FnMut(Vec<Message>) -> Fut,
        Fut: Future<Output = Settle>,
    {
        while let Some(batch) = self.next_batch(max).await {
            let (messages, tickets): (Vec<Message>, Vec<Ticket>) =
                batch.into_iter().map(|i| (i.message, i.ticket)).unzip();
            let how = handle(messages).await;
            settle_all(tickets, how).await;
        }
    }
}
