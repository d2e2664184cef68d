//! # Attacks by a worker that holds only what every worker holds
//!
//! Each file here is one attack from the issue that introduced per-worker broker users, run
//! against a real stack with a second worker's real broker credentials (from its own
//! registration) through a plain AMQP client, as a compromised worker would. Every test also
//! shows the honest path still works, so that no refusal passes by refusing everything.

mod altered_job;
mod claims;
mod common;
mod connection_flood;
mod control;
mod deregistered;
mod development_mode;
mod foreign_user_id;
mod forged_heartbeat;
mod forged_results;
mod leases;
mod pool_change;
mod production;
mod queues;
mod reconcile;
mod swallowed_jobs;
mod user_code_env;
