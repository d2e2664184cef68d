//! # Broker topology
//!
//! Names of every exchange and queue, all under the configured namespace `<ns>`, and the one
//! function that declares them. Declarations are idempotent, so whichever side starts first
//! (dispatcher or agent) creates them and the other finds them in place.
//!
//! | name | kind | carries |
//! | --- | --- | --- |
//! | `<ns>.jobs` | direct exchange | jobs, routing key `pool.<slug>`, `worker.<id>` or `server` |
//! | `<ns>.pool.<slug>` | quorum queue | jobs for any worker of a pool |
//! | `<ns>.worker.<id>` | quorum queue | jobs for one worker (a task's later steps in a pool) |
//! | `<ns>.server` | quorum queue | jobs for the dispatchers' built-in workers |
//! | `<ns>.results` | quorum queue | events from agents: started, log batches, outputs, finished |
//! | `<ns>.heartbeats` | classic queue, message TTL | agent heartbeats, kept off the result path |
//! | `<ns>.control` | direct exchange | control messages, routing key = worker id |
//! | `<ns>.control.<id>` | classic auto-delete queue | one agent's control messages; dies with its connection |
//! | `<ns>.dead` | fanout exchange + quorum queue | messages that failed validation |
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
    pub fn heartbeats_queue(&self) -> String {
        format!("{}.heartbeats", self.ns)
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
        Ok(())
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

    /// A worker's control queue: classic and auto-delete, consumed only by its agent, so it
    /// disappears (and its consumer count drops to zero) as soon as the agent's connection is
    /// gone; that is how the dispatcher notices a killed agent. It is not `exclusive` (as
    /// DESIGN.md has it) because the dispatcher must be able to look at it: a passive declare
    /// of another connection's exclusive queue fails with RESOURCE_LOCKED and closes the
    /// channel, once a second per worker.
    pub async fn declare_control(
        &self,
        ch: &Channel,
        worker: impl std::fmt::Display,
    ) -> lapin::Result<()> {
        let q = self.control_queue(&worker);
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
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
