//! # `gantry-agent run`
//!
//! Wires the agent together: its identity and configuration from the dispatcher, a
//! self-healing broker connection, the outbox, the slot manager and its consumers, the
//! control queue and heartbeats; then runs until a signal.
//!
//! Shutdown: the first SIGTERM or SIGINT stops taking work and lets running steps finish
//! (for up to `agent.shutdown_grace_secs`, then they are cancelled); a second one cancels
//! them at once. Results are flushed to the broker before the agent exits 0.

use crate::api::{Api, ApiError};
use crate::health;
use crate::identity;
use crate::outbox::Outbox;
use crate::slots::{self, AgentContext, Slots};
use anyhow::{Context, bail};
use futures::StreamExt;
use gantry_shared::amqp::{Broker, DeclareFn, Publisher, json_properties};
use gantry_shared::api::{AgentConfig, MachinePolicy};
use gantry_shared::config::Settings;
use gantry_shared::topology::Topology;
use gantry_shared::wire::{Control, Heartbeat};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The AMQP frame size the agent asks for (unless `amqp.url` sets `frame_max`). It bounds
/// lapin's two connection buffers at 32 frames each, 512 KiB, instead of the 4 MiB each that
/// RabbitMQ's 128 KiB maximum gives, which lapin also fills with zeros at once (see
/// [`with_frame_max`](gantry_shared::amqp::with_frame_max)). A log batch (at most
/// [`BATCH_BYTES`](crate::runner::BATCH_BYTES) of text) goes out as a few dozen frames.
pub const AMQP_FRAME_MAX: u32 = 16 * 1024;

pub async fn run(settings: Settings, home: &Path) -> anyhow::Result<()> {
    let identity = identity::load(home)?;
    let work_root = settings
        .agent
        .work_dir
        .clone()
        .unwrap_or_else(|| home.join("work"));
    run_with(
        settings,
        Setup {
            server: identity.server,
            token: identity.token,
            work_root,
            extra_queues: Vec::new(),
            run_as: None,
            stop: Stop::Signals,
        },
    )
    .await
}

/// How an agent is told to stop.
pub enum Stop {
    /// SIGTERM or SIGINT: drain (a second signal cancels running steps at once).
    Signals,
    /// The token: drain for up to the duration, then cancel running steps (the built-in
    /// worker of a dispatcher node).
    Token(CancellationToken, Duration),
}

/// What distinguishes one agent from another beyond its configuration.
pub struct Setup {
    pub server: String,
    pub token: String,
    pub work_root: std::path::PathBuf,
    /// Queues consumed besides the worker's own and its pools' (the built-in worker's
    /// `<ns>.server`).
    pub extra_queues: Vec<String>,
    pub run_as: Option<crate::runner::RunAs>,
    pub stop: Stop,
}

/// Run an agent until it is stopped (see [`Stop`]).
pub async fn run_with(settings: Settings, setup: Setup) -> anyhow::Result<()> {
    let Setup {
        server,
        token,
        work_root,
        extra_queues,
        run_as,
        stop: stop_how,
    } = setup;
    let api = Api::new(&server, Some(token));
    let config = fetch_config(&api, &server).await?;
    if !config.enabled {
        tracing::warn!(
            "this worker is disabled: it stays connected but the dispatcher gives it no steps"
        );
    }
    let topology = Topology::new(&config.namespace);
    let mut queues = vec![topology.worker_queue(config.worker_id)];
    queues.extend(config.pools.iter().map(|p| topology.pool_queue(&p.slug)));
    queues.extend(extra_queues);
    let declare: DeclareFn = {
        let topology = topology.clone();
        let slugs: Vec<String> = config.pools.iter().map(|p| p.slug.clone()).collect();
        let worker = config.worker_id;
        Arc::new(move |ch| {
            let topology = topology.clone();
            let slugs = slugs.clone();
            Box::pin(async move {
                topology.declare_base(&ch).await?;
                for s in &slugs {
                    topology.declare_pool(&ch, s).await?;
                }
                topology.declare_worker(&ch, worker).await
            })
        })
    };
    let broker_cancel = CancellationToken::new();
    let broker = Broker::start(
        gantry_shared::amqp::with_frame_max(&settings.amqp.url, AMQP_FRAME_MAX),
        format!("gantry-agent {}", config.name),
        declare,
        broker_cancel.clone(),
    );
    let (outbox, outbox_done) = Outbox::start(broker.clone(), topology.results_queue());
    let slots = Slots::new(config.max_concurrent_steps);
    slots.set_enabled(config.enabled);
    std::fs::create_dir_all(&work_root)
        .with_context(|| format!("creating the work directory {}", work_root.display()))?;
    let fatal = CancellationToken::new();
    let redis = Arc::new(
        gantry_shared::redis_link::RedisLink::new(&settings.redis.url).context("redis.url")?,
    );
    let agent = Arc::new(AgentContext {
        api,
        redis,
        namespace: config.namespace.clone(),
        outbox,
        worker_id: config.worker_id,
        worker_name: config.name.clone(),
        work_root: work_root.clone(),
        keep_work_dirs: settings.agent.keep_work_dirs,
        run_as,
        fault_drop_before_ack: std::sync::atomic::AtomicBool::new(
            std::env::var("GANTRY_AGENT_FAULT").as_deref() == Ok("drop-connection-before-ack"),
        ),
        fatal: fatal.clone(),
    });
    tracing::info!(
        worker = config.name,
        id = %config.worker_id,
        pools = ?config.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        max_concurrent_steps = config.max_concurrent_steps,
        "agent running"
    );
    // Printed for scripts and tests that wait for the agent to be up: connected, with its
    // queues declared.
    if broker
        .connected_within(Duration::from_secs(10))
        .await
        .is_none()
    {
        tracing::warn!("RabbitMQ is not reachable yet; the agent will take steps once it is");
    }
    if matches!(stop_how, Stop::Signals) {
        println!("gantry-agent {} running", config.name);
    }

    let stop = CancellationToken::new();
    let bg = CancellationToken::new();
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(config.policy.clone());
    // Judged once before any step is taken, so an unhealthy machine never starts one.
    let first = health::check(&config.policy, &work_root).await;
    slots.set_unhealthy(first.level == health::Level::Unhealthy);
    if first.level != health::Level::Healthy {
        tracing::warn!(
            health = first.level.as_str(),
            reason = first.reason().unwrap_or_default(),
            "health check"
        );
    }
    let verdict: health::Shared = Arc::new(std::sync::Mutex::new(first));
    tokio::spawn(health::run(
        policy_rx.clone(),
        settings.agent.heartbeat_secs,
        work_root.clone(),
        slots.clone(),
        verdict.clone(),
        bg.clone(),
    ));
    tokio::spawn(broker_watchdog(
        broker.clone(),
        policy_rx.clone(),
        slots.clone(),
        bg.clone(),
    ));
    tokio::spawn(heartbeats(
        broker.clone(),
        topology.clone(),
        config.clone(),
        slots.clone(),
        work_root.clone(),
        (policy_rx, settings.agent.heartbeat_secs),
        verdict,
        bg.clone(),
    ));
    tokio::spawn(control(
        broker.clone(),
        topology.clone(),
        config.clone(),
        slots.clone(),
        policy_tx,
        bg.clone(),
    ));
    let manager = {
        let (broker, slots, agent, stop) =
            (broker.clone(), slots.clone(), agent.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = broker.connected() => c,
                    _ = stop.cancelled() => return,
                };
                slots::manage(
                    conn,
                    queues.clone(),
                    slots.clone(),
                    agent.clone(),
                    stop.clone(),
                )
                .await;
                if stop.is_cancelled() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let mut signals = match &stop_how {
        Stop::Signals => {
            use tokio::signal::unix::{SignalKind, signal};
            Some((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        }
        Stop::Token(..) => None,
    };
    // Resolves on the next SIGTERM/SIGINT (never for a token-stopped agent).
    async fn next_signal(
        signals: &mut Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    ) {
        match signals {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
    let (token, grace) = match &stop_how {
        Stop::Signals => (
            CancellationToken::new(),
            Duration::from_secs(settings.agent.shutdown_grace_secs),
        ),
        Stop::Token(t, g) => (t.clone(), *g),
    };
    let failed = tokio::select! {
        _ = next_signal(&mut signals) => false,
        _ = token.cancelled() => false,
        _ = fatal.cancelled() => true,
    };
    let running = slots.running().len();
    tracing::info!(
        running,
        "stopping: no new steps; waiting for running ones to finish"
    );
    stop.cancel();
    slots.drain();
    tokio::select! {
        _ = slots.wait_idle() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; cancelling running steps");
            slots.cancel_all();
            slots.wait_idle().await;
        }
        _ = next_signal(&mut signals) => {
            tracing::warn!("second signal: cancelling running steps");
            slots.cancel_all();
            slots.wait_idle().await;
        }
    }
    let _ = manager.await;
    // Every step has ended; dropping the last outbox handle lets the outbox drain and stop.
    drop(agent);
    if tokio::time::timeout(Duration::from_secs(30), outbox_done)
        .await
        .is_err()
    {
        tracing::warn!("could not deliver every result within 30 s (is RabbitMQ down?)");
    }
    bg.cancel();
    broker_cancel.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    if failed {
        bail!("stopped: the dispatcher refused this agent's credential");
    }
    tracing::info!("agent stopped");
    Ok(())
}

async fn fetch_config(api: &Api, server: &str) -> anyhow::Result<AgentConfig> {
    let mut delay = Duration::from_millis(200);
    loop {
        match api.agent_config().await {
            Ok(c) => return Ok(c),
            Err(ApiError::Unauthorized(m)) => {
                bail!(
                    "the dispatcher at {server} refused this agent's credential ({m}); register it again"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the dispatcher at {server}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// An agent that has been without the broker for the policy's `unavailable_after` has been
/// declared lost by the dispatcher, which retries its steps elsewhere: it stops its own
/// steps, so that they never run twice at once.
async fn broker_watchdog(
    broker: Broker,
    policy: tokio::sync::watch::Receiver<MachinePolicy>,
    slots: Arc<Slots>,
    cancel: CancellationToken,
) {
    let mut lost_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return,
        }
        if broker.is_connected() {
            lost_since = None;
            continue;
        }
        let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
        let limit = Duration::from_secs(u64::from(policy.borrow().unavailable_after_secs));
        let running = slots.running().len();
        if since.elapsed() >= limit && running > 0 {
            tracing::warn!(
                running,
                secs = limit.as_secs(),
                "no RabbitMQ for the policy's unavailable_after: the dispatcher retries this worker's steps elsewhere, so they are stopped here"
            );
            slots.cancel_all();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeats(
    broker: Broker,
    topology: Topology,
    config: AgentConfig,
    slots: Arc<Slots>,
    work_root: std::path::PathBuf,
    (policy, override_secs): (tokio::sync::watch::Receiver<MachinePolicy>, Option<u64>),
    verdict: health::Shared,
    cancel: CancellationToken,
) {
    let publisher = Publisher::new(broker);
    let queue = topology.heartbeats_queue();
    let mut first = true;
    loop {
        let every = health::interval(&policy.borrow(), override_secs);
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = cancel.cancelled() => return,
            }
        }
        first = false;
        let (level, reason) = {
            let v = verdict.lock().expect("health lock");
            (v.level.as_str().to_owned(), v.reason())
        };
        let hb = Heartbeat {
            worker_id: config.worker_id,
            sent_at: chrono::Utc::now(),
            running: slots.running(),
            max_concurrent_steps: slots.max(),
            free_slots: slots.free(),
            disk_free_bytes: health::disk_free_bytes(&work_root),
            version: gantry_shared::VERSION.into(),
            health: Some(level),
            health_reason: reason,
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            publisher.publish("", &queue, &hb.encode(), json_properties()),
        )
        .await;
    }
}

/// Consume the control queue on every connection: it is exclusive and dies with the
/// connection, which is how the dispatcher can tell a dead agent from a live one.
async fn control(
    broker: Broker,
    topology: Topology,
    config: AgentConfig,
    slots: Arc<Slots>,
    policy: tokio::sync::watch::Sender<MachinePolicy>,
    cancel: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = broker.connected() => c,
            _ = cancel.cancelled() => return,
        };
        let consumer = async {
            let ch = conn.create_channel().await?;
            topology.declare_control(&ch, config.worker_id).await?;
            ch.basic_consume(
                topology.control_queue(config.worker_id).into(),
                "control".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        }
        .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot consume the control queue; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = cancel.cancelled() => return,
            };
            let Some(Ok(d)) = next else { break };
            match Control::decode(&d.data) {
                Ok(Control::SetMaxConcurrentSteps {
                    max_concurrent_steps,
                }) => slots.set_max(max_concurrent_steps),
                Ok(Control::SetEnabled { enabled }) => slots.set_enabled(enabled),
                Ok(Control::SetPolicy { policy: p }) => {
                    tracing::info!(?p, "machine policy changed");
                    policy.send_replace(p);
                }
                Ok(Control::CancelAttempt {
                    step_run_id,
                    attempt,
                    reason,
                }) => {
                    if slots.cancel_attempt(step_run_id, attempt) {
                        tracing::info!(%step_run_id, attempt, %reason, "cancelling a step");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
