//! # gantry-dispatcher
//!
//! The dispatcher node: REST API, orchestrator, result consumer, monitors; and the `gantry`
//! command-line client.
//!
//! # Layout
//! - [`app`]: builds a node from its settings and runs it.
//! - [`db`]: database creation, migrations, bootstrap rows.
//! - [`api`]: routes, extractors, JSON errors.
//! - [`store`]: SQL for the API's records (pools, workers, keys, tasks, approvals, ...), with
//!   its own error type.
//! - [`builtin`]: the node's built-in worker (an in-process agent).
//! - [`cancels`]: cancelling a task; cancelled attempts whose agent never answers, concluded
//!   after a bound.
//! - [`email`]: e-mail steps, sent by the dispatcher over SMTP.
//! - [`orchestrator`]: decides each task's next steps and publishes their jobs.
//! - [`attempts`]: the attempt state machine shared by the orchestrator, claims and results.
//! - [`results`]: consumes agent events into PostgreSQL.
//! - [`artifacts`]: storing artifact chunks, checking their sha256, reading them back.
//! - [`logs`]: gapless, ordered log storage and reading.
//! - [`locks`]: waiting for named mutexes, granting and renewing them before a claim.
//! - [`heartbeats`]: agents' heartbeats, believed only of the worker that sent them.
//! - [`monitors`]: dead letters, worker availability, worker loss (a file each).
//! - [`nodes`]: which dispatcher node orchestrates which task (leases in PostgreSQL).
//! - [`notify`]: the node's one PostgreSQL LISTEN connection: log followers and wake-ups.
//! - [`metrics`]: Prometheus text.
//! - [`secrets`]: sensitive values sealed at rest, bound to their task and name.
//! - [`quotas`]: per-task storage quotas (`limits.*`).
//! - [`outputs`]: non-sensitive outputs that carry a secret, stored sealed.
//! - [`auth`]: API keys and worker credentials.
//! - [`credentials`]: looked-up credentials remembered until PostgreSQL says they changed.
//! - [`broker_users`]: one RabbitMQ user per worker, through the management API.
//! - [`senders`]: attributing events and heartbeats to workers by their broker user.
//! - [`strays`]: jobs that left their queue without a claim, published again.
//! - [`supervise`]: background loops restarted with backoff when they fail or panic.
//! - [`cli`]: the `gantry` client.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod artifacts;
pub mod attempts;
pub mod auth;
pub mod broker_users;
pub mod builtin;
pub mod cancels;
pub mod cli;
pub mod credentials;
pub mod db;
pub mod email;
pub mod heartbeats;
pub mod locks;
pub mod logs;
pub mod metrics;
pub mod monitors;
pub mod nodes;
pub mod notify;
pub mod orchestrator;
pub mod outputs;
pub mod quotas;
pub mod results;
pub mod secrets;
pub mod senders;
pub mod store;
pub mod strays;
pub mod supervise;
pub mod transitions;
