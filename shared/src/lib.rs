//! # gantry-shared
//!
//! What Gantry's dispatcher and agent must agree on, and nothing that knows HTTP servers or
//! SQL.
//!
//! # Layout
//! - [`ids`]: typed identifiers (`TaskId`, `StepRunId`, ...).
//! - [`config`]: layered configuration (defaults, `gantry.toml`, `GANTRY__...`), exit code 64.
//! - [`production`]: what `production = true` asks of each program; the effective TLS settings.
//! - [`telemetry`]: logging set-up for every binary.
//! - [`topology`]: exchange and queue names under the namespace, and their declaration.
//! - [`amqp`]: self-healing broker connection and the confirming publisher.
//! - [`wire`]: messages on the broker (jobs, events, heartbeats, control).
//! - [`api`]: REST request and response bodies.
//! - [`process`]: the process file and its submission checks.
//! - [`template`]: `#{Name}` substitution.
//! - [`service_messages`]: `##gantry[...]` lines scripts print to talk back.
//! - [`states`]: every record's states and the one table of allowed transitions.
//! - [`mask`]: hiding sensitive values in log lines.
//! - [`text`]: making script output storable as PostgreSQL text.
//! - [`locks`]: the fair, leased, fenced mutex on Redis.
//! - [`redis_link`]: a Redis connection that survives Redis being away.
//! - [`tls`]: the crypto provider, `tls.ca_file`, and the production refusal of plain text.
//! - [`stepenv`]: the environment user code gets, built from scratch.
//! - [`uid_range`]: `agent.step_uid_range`, the uids an agent gives its running steps.

#![forbid(unsafe_code)]

pub mod amqp;
pub mod api;
pub mod config;
pub mod ids;
pub mod locks;
pub mod mask;
pub mod nul;
pub mod process;
pub mod production;
pub mod redis_link;
pub mod service_messages;
pub mod states;
pub mod stepenv;
pub mod telemetry;
pub mod template;
pub mod text;
pub mod tls;
pub mod topology;
pub mod uid_range;
pub mod wire;

/// This build's version, reported by agents and `/api/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
