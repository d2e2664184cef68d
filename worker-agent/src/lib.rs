//! # gantry-agent
//!
//! The worker agent: consumes step jobs from its pools' queues and its own queue, claims each
//! from the dispatcher, runs the script, and streams the results back.
//!
//! # Layout
//! - [`agent`]: `run`: wiring, signals, graceful drain, heartbeats and the control queue.
//! - [`reconfig`]: the agent's configuration, read from the dispatcher's API.
//! - [`slots`]: the concurrency limit (`slots/consumers.rs`: the consumers of a broker
//!   connection; `slots/claim.rs`: claiming a delivery and starting its step;
//!   `slots/probes.rs`: queue depths, and missing queues coming back).
//! - [`gate`]: the reader/writer gate of exclusive steps.
//! - [`runner`]: running one step and streaming its output (see its layout).
//! - [`output`]: reading a step's pipes into lines.
//! - [`window`]: pacing a step's output by what the dispatcher has stored.
//! - [`emitter`]: masking, numbering and batching a step's lines; its events.
//! - [`stopper`]: stopping a step on timeout, cancel or lease loss, whatever it prints.
//! - [`artifacts`]: which files a step's artifacts are, and reading them in hashed chunks.
//! - [`health`]: health checks against the machine policy.
//! - [`helpers`]: the executables scripts call (`set_gantryvariable`, ...), written once.
//! - [`supervisor`]: starting steps so that the agent's supervisor knows every one of them.
//! - [`guard`]: the supervisor process, which kills the steps' process groups when their
//!   agent dies.
//! - [`outbox`]: at-least-once, ordered delivery of events to `<ns>.x.results`.
//! - [`api`]: calls to the dispatcher's API.
//! - [`identity`]: the local identity written by `register`.
//! - [`workdir`]: steps' working directories: private from the start, removed, swept.
//! - [`step_users`]: who a step runs as (`agent.step_user`, `agent.step_uid_range`).
//! - [`hardening`]: no core dumps, a non-dumpable agent.

// One function has `unsafe`, with its reasons: the `pre_exec` hook in `supervisor.rs`.
#![deny(unsafe_code)]

pub mod agent;
pub mod api;
pub mod artifacts;
pub mod emitter;
pub mod gate;
pub mod guard;
pub mod hardening;
pub mod health;
pub mod helpers;
pub mod identity;
pub mod outbox;
pub mod output;
pub mod reconfig;
pub mod runner;
pub mod slots;
pub mod step_users;
pub mod stopper;
pub mod supervisor;
pub mod window;
pub mod workdir;
