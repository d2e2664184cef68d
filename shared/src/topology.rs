//! # Broker topology
//!
//! Names of every exchange and queue, all under the configured namespace `<ns>`, and the
//! functions that declare them. Only the dispatcher declares (agents may have no `configure`
//! right at all, see "Broker users" in `docs/security.md`); declarations are idempotent, so
//! every dispatcher node declares everything it knows of on each new connection.
//!
//! | name | kind | carries |
//! | --- | --- | --- |
//! | `<ns>.jobs` | direct exchange | jobs, routing key `pool.<slug>`, `worker.<id>` or `server` |
//! | `<ns>.pool.<slug>` | quorum queue | jobs for any worker of a pool |
//! | `<ns>.worker.<id>` | quorum queue | jobs for one worker (a task's later steps in a pool) |
//! | `<ns>.server` | quorum queue | jobs for the dispatchers' built-in workers |
//! | `<ns>.x.results` | fanout exchange | where agents publish events, into `<ns>.results` |
//! | `<ns>.results` | quorum queue | events from agents: started, log batches, outputs, finished |
//! | `<ns>.x.heartbeats` | fanout exchange | where agents publish heartbeats, into `<ns>.heartbeats` |
//! | `<ns>.heartbeats` | classic queue, message TTL | agent heartbeats, kept off the result path |
//! | `<ns>.control` | direct exchange | control messages, routing key = worker id |
//! | `<ns>.control.<id>` | classic durable queue, message TTL | one agent's control messages; its agent consumes it exclusively |
//! | `<ns>.dead` | fanout exchange + quorum queue | messages that failed validation |
//!
//! The exchanges agents publish to live under `<ns>.x.`, apart from every queue name: RabbitMQ's
//! permissions match names without telling an exchange from a queue, so a grant meant for one
//! must never match the other.
//!
//! Job and result queues are durable quorum queues dead-lettering (at least once) into
//! `<ns>.dead`, with a delivery limit of 20 as a backstop against poison loops.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// How many deliveries of one message a quorum queue allows before dead-lettering it.
pub const DELIVERY_LIMIT: i32 = 20;

/// Heartbeats older than this are dropped by the broker: a stale heartbeat says nothing.
pub const HEARTBEAT_TTL_MS: i32 = 60_000;

/// Control messages older than this are dropped: a cancel or a reconfiguration that waited a
/// minute for a disconnected agent is moot (it reads its configuration when it reconnects).
pub const CONTROL_TTL_MS: i32 = 60_000;
/// Control messages kept for one agent at most (the oldest go first).
pub const CONTROL_MAX_LENGTH: i32 = 1000;

/// Every name under one namespace.
#[derive(Clone, Debug)]
pub struct Topology {
    ns: String,
}

impl Topology {
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_owned(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.ns)
    }
    pub fn pool_queue(&self, slug: &str) -> String {
        format!("{}.pool.{slug}", self.ns)
    }
    pub fn pool_routing_key(slug: &str) -> String {
        format!("pool.{slug}")
    }
    pub fn worker_queue(&self, worker: impl std::fmt::Display) -> String {
        format!("{}.worker.{worker}", self.ns)
    }
    pub fn worker_routing_key(worker: impl std::fmt::Display) -> String {
        format!("worker.{worker}")
    }
    pub fn server_queue(&self) -> String {
        format!("{}.server", self.ns)
    }
    pub const SERVER_ROUTING_KEY: &'static str = "server";
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.ns)
    }
    /// Where agents publish events (fanout into [`Topology::results_queue`]).
    pub fn results_exchange(&self) -> String {
        format!("{}.x.results", self.ns)
    }
    pub fn heartbeats_queue(&self) -> String {
        format!("{}.heartbeats", self.ns)
    }
    /// Where agents publish heartbeats (fanout into [`Topology::heartbeats_queue`]).
    pub fn heartbeats_exchange(&self) -> String {
        format!("{}.x.heartbeats", self.ns)
    }
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.ns)
    }
    pub fn control_queue(&self, worker: impl std::fmt::Display) -> String {
        format!("{}.control.{worker}", self.ns)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.ns)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }

    /// Arguments of every durable work queue: quorum, dead-lettered at least once.
    fn work_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(self.dead_exchange())),
        );
        args.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        args.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        );
        args
    }

    async fn declare_work_queue(&self, ch: &Channel, name: &str) -> lapin::Result<()> {
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            self.work_queue_args(),
        )
        .await?;
        Ok(())
    }

    /// The parts every process needs: exchanges, results, heartbeats, dead letters and the
    /// built-in workers' queue.
    pub async fn declare_base(&self, ch: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            self.dead_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        ch.queue_declare(
            self.dead_queue().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            dead_args,
        )
        .await?;
        ch.queue_bind(
            self.dead_queue().into(),
            self.dead_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.jobs_exchange().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.control_exchange().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        self.declare_work_queue(ch, &self.results_queue()).await?;
        self.declare_inlet(ch, &self.results_exchange(), &self.results_queue())
            .await?;
        let server = self.server_queue();
        self.declare_work_queue(ch, &server).await?;
        self.bind_jobs(ch, &server, Self::SERVER_ROUTING_KEY)
            .await?;
        let mut hb_args = FieldTable::default();
        hb_args.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongInt(HEARTBEAT_TTL_MS),
        );
        ch.queue_declare(
            self.heartbeats_queue().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            hb_args,
        )
        .await?;
        self.declare_inlet(ch, &self.heartbeats_exchange(), &self.heartbeats_queue())
            .await?;
        Ok(())
    }

    /// A fanout exchange agents publish to, bound to the one queue it feeds.
    async fn declare_inlet(&self, ch: &Channel, exchange: &str, queue: &str) -> lapin::Result<()> {
        ch.exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    async fn bind_jobs(&self, ch: &Channel, queue: &str, key: &str) -> lapin::Result<()> {
        ch.queue_bind(
            queue.into(),
            self.jobs_exchange().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// A pool's queue and its binding.
    pub async fn declare_pool(&self, ch: &Channel, slug: &str) -> lapin::Result<()> {
        let q = self.pool_queue(slug);
        self.declare_work_queue(ch, &q).await?;
        self.bind_jobs(ch, &q, &Self::pool_routing_key(slug)).await
    }

    /// A worker's own queue and its binding.
    pub async fn declare_worker(
        &self,
        ch: &Channel,
        worker: impl std::fmt::Display,
    ) -> lapin::Result<()> {
        let q = self.worker_queue(&worker);
        self.declare_work_queue(ch, &q).await?;
        self.bind_jobs(ch, &q, &Self::worker_routing_key(&worker))
            .await
    }

    /// A worker's control queue: classic and durable, declared by the dispatcher (at
    /// registration and on every connection) and consumed by its agent alone, with an
    /// exclusive consumer. The dispatcher tells a live agent from a killed one by the queue's
    /// consumer count, which drops to zero as soon as the agent's connection is gone; an agent
    /// needs no right to declare or bind anything for that, and no other worker's user can
    /// consume the queue (see `docs/security.md`).
    pub async fn declare_control(
        &self,
        ch: &Channel,
        worker: impl std::fmt::Display,
    ) -> lapin::Result<()> {
        let q = self.control_queue(&worker);
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongInt(CONTROL_TTL_MS),
        );
        args.insert(
            ShortString::from("x-max-length"),
            AMQPValue::LongInt(CONTROL_MAX_LENGTH),
        );
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        ch.queue_bind(
            q.into(),
            self.control_exchange().into(),
            worker.to_string().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }
}
