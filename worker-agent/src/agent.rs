//! # `gantry-agent run`
//!
//! Wires the agent together: its identity and configuration from the dispatcher, a
//! self-healing broker connection (as the worker's own broker user), the outbox, the slot
//! manager and its consumers, the control queue and heartbeats; then runs until a signal.
//!
//! The agent declares nothing on the broker (its user may not): the dispatcher declared its
//! queues. Everything it is told to do comes from the dispatcher's API, never from a message
//! body: its configuration (pools, `max_concurrent_steps`, enabled, the machine policy) is
//! read from `GET /api/agent/config` at start, on every new broker connection, when a
//! `Reconfigure` control message says it changed, and once a minute.
//!
//! Shutdown: the first SIGTERM or SIGINT stops taking work and lets running steps finish
//! (for up to `agent.shutdown_grace_secs`, then they are cancelled); a second one cancels
//! them at once. Results are flushed to the broker before the agent exits 0.

use crate::api::Api;
use crate::health;
use crate::identity;
use crate::outbox::Outbox;
use crate::reconfig::{Reconfig, fetch_config, queues_of, refresh_config};
use crate::slots::{self, AgentContext, Slots};
use anyhow::{Context, bail};
use gantry_shared::amqp::consume::{QueueConsumer, Settle};
use gantry_shared::amqp::{Broker, DeclareFn, Publisher, json_properties};
use gantry_shared::api::{AgentConfig, BrokerCredentials, MachinePolicy};
use gantry_shared::config::Settings;
use gantry_shared::topology::Topology;
use gantry_shared::wire::{Control, Heartbeat};
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
    // First: a setting the agent cannot honour is refused whatever else is wrong.
    let step_users = crate::step_users::from_settings(&settings)?;
    let identity = identity::load(home)?;
    settings
        .check_client_production("the server in the agent's identity", &identity.server)
        .map_err(|m| anyhow::anyhow!("{m}"))?;
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
            step_users: Some((step_users, home.to_path_buf())),
            stop: Stop::Signals,
            broker: BrokerLogin::Worker(identity.broker),
        },
    )
    .await
}

/// Which broker user the agent logs in as.
pub enum BrokerLogin {
    /// A dispatcher node's built-in worker: `amqp.url` as it is (the node's own user), which
    /// also declares the worker's own queues.
    Dispatcher,
    /// A registered worker: its own broker user from its identity, or `amqp.url`'s shared one
    /// in development mode (none given).
    Worker(Option<BrokerCredentials>),
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
    /// A registered agent's step users (`agent.step_user`, `agent.step_uid_range`) and its
    /// home; `None`: every step as `run_as`.
    pub step_users: Option<(crate::step_users::StepUsers, std::path::PathBuf)>,
    pub stop: Stop,
    pub broker: BrokerLogin,
}

/// Run an agent until it is stopped (see [`Stop`]).
pub async fn run_with(settings: Settings, setup: Setup) -> anyhow::Result<()> {
    let Setup {
        server,
        token,
        work_root,
        extra_queues,
        run_as,
        step_users,
        stop: stop_how,
        broker: login,
    } = setup;
    let ca = settings.ca_pem();
    let api = Api::new(&server, Some(token), ca.as_deref())?;
    let config = fetch_config(&api, &server).await?;
    if !config.enabled {
        tracing::warn!(
            "this worker is disabled: it stays connected but the dispatcher gives it no steps"
        );
    }
    let amqp_url = match &login {
        BrokerLogin::Worker(Some(c)) => {
            gantry_shared::amqp::with_credentials(&settings.amqp.url, &c.user, &c.password)
                .map_err(|e| anyhow::anyhow!("amqp.url: {e}"))?
        }
        _ => settings.amqp.url.clone(),
    };
    let user = gantry_shared::amqp::login_user(&amqp_url);
    if let Some(expected) = &config.broker_user
        && *expected != user
    {
        bail!(
            "this worker has a broker user of its own ({expected}), but its identity holds none (it would log in as {user}); register it again with `gantry-agent register --force`"
        );
    }
    let topology = Topology::new(&config.namespace);
    let (queues_tx, queues_rx) =
        tokio::sync::watch::channel(queues_of(&topology, &config, &extra_queues));
    let declare: DeclareFn = match login {
        // The built-in worker logs in as its dispatcher node and declares its own queues
        // (its record may be newer than the node's connection).
        BrokerLogin::Dispatcher => {
            let topology = topology.clone();
            let worker = config.worker_id;
            Arc::new(move |conn| {
                let topology = topology.clone();
                Box::pin(async move {
                    let ch = conn.create_channel().await?;
                    let r = async {
                        // The node may be connecting at the same moment: do not wait for it.
                        topology.declare_base(&ch).await?;
                        topology.declare_worker(&ch, worker).await?;
                        topology.declare_control(&ch, worker).await
                    }
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "could not declare the built-in worker's queues");
                    }
                    let _ = ch.close(200, "declared".into()).await;
                    Ok(())
                })
            })
        }
        BrokerLogin::Worker(_) => gantry_shared::amqp::declare_nothing(),
    };
    let broker_cancel = CancellationToken::new();
    let broker = Broker::start_tls(
        gantry_shared::amqp::with_frame_max(&amqp_url, AMQP_FRAME_MAX),
        format!("gantry-agent {}", config.name),
        declare,
        ca,
        broker_cancel.clone(),
    );
    let (outbox, outbox_done) = Outbox::start(broker.clone(), topology.results_exchange());
    let slots = Slots::new(config.max_concurrent_steps);
    slots.set_enabled(config.enabled);
    let (step_users, home) = match step_users {
        Some((users, home)) => (users, Some(home)),
        None => (crate::step_users::StepUsers::Fixed(run_as.clone()), None),
    };
    step_users.check_capacity(config.max_concurrent_steps)?;
    let step_users = Arc::new(step_users);
    crate::workdir::prepare_root(&work_root, home.as_deref(), step_users.other_users()).map_err(
        |message| gantry_shared::config::ConfigError {
            key: Some("agent.work_dir".into()),
            message,
        },
    )?;
    // Whatever an earlier run left (a SIGKILL, a crash): its steps' scripts and secrets.
    let (swept, problems) = {
        let root = work_root.clone();
        tokio::task::spawn_blocking(move || crate::workdir::sweep(&root))
            .await
            .context("sweeping the work directory")?
    };
    if swept > 0 {
        tracing::info!(swept, root = %work_root.display(), "removed step directories left by an earlier run");
    }
    for p in problems {
        tracing::warn!("{p}");
    }
    // The helpers scripts call, written once for every step (the earlier run's replaced).
    let helpers = {
        let root = work_root.clone();
        tokio::task::spawn_blocking(move || crate::helpers::install(&root))
            .await
            .context("writing the step helpers")?
            .with_context(|| format!("writing the step helpers under {}", work_root.display()))?
    };
    // One process for the agent's life, which kills its steps' process groups if it dies.
    let supervisor = tokio::task::spawn_blocking(crate::supervisor::Supervisor::start)
        .await
        .context("starting the step supervisor")?
        .context("starting the step supervisor")?;
    let fatal = CancellationToken::new();
    let nudge = Arc::new(tokio::sync::Notify::new());
    let agent = Arc::new(AgentContext {
        api: api.clone(),
        outbox,
        reconfigure: nudge.clone(),
        worker_id: config.worker_id,
        worker_name: config.name.clone(),
        work_root: work_root.clone(),
        keep_work_dirs: settings.agent.keep_work_dirs,
        step_users: step_users.clone(),
        supervisor: Arc::new(supervisor),
        helpers: Arc::new(helpers),
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
        broker_user = %user,
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
    let reconfig = Reconfig {
        api: api.clone(),
        topology: topology.clone(),
        extra: extra_queues.clone(),
        slots: slots.clone(),
        policy: Arc::new(policy_tx),
        queues: Arc::new(queues_tx),
        fatal: fatal.clone(),
    };
    tokio::spawn(refresh_config(reconfig.clone(), nudge.clone(), bg.clone()));
    // Judged once before any step is taken, so an unhealthy machine never starts one.
    let first = health::check(&config.policy, &work_root, &step_users).await;
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
        step_users.clone(),
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
        nudge,
        bg.clone(),
    ));
    let manager = {
        let (broker, slots, agent, stop) =
            (broker.clone(), slots.clone(), agent.clone(), stop.clone());
        let mut first_connection = true;
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = broker.connected() => c,
                    _ = stop.cancelled() => return,
                };
                // A new connection may follow a change of this worker's rights (its broker
                // connections are closed when its pools change): consume what the
                // configuration says now, not what it said before.
                if !first_connection {
                    reconfig.refresh().await;
                }
                first_connection = false;
                slots::manage(
                    conn,
                    queues_rx.clone(),
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
    let exchange = topology.heartbeats_exchange();
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
            publisher.publish(&exchange, "", &hb.encode(), json_properties()),
        )
        .await;
    }
}

/// Consume the worker's control queue on every connection, with an exclusive consumer: the
/// dispatcher tells a live agent by the queue's consumer count, which drops to zero with the
/// connection, and nobody else can consume it meanwhile.
async fn control(
    broker: Broker,
    topology: Topology,
    config: AgentConfig,
    slots: Arc<Slots>,
    reconfigure: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    let queue = topology.control_queue(config.worker_id);
    QueueConsumer::new(broker, queue, "control", 16, cancel)
        .exclusive()
        .run(|m| {
            match Control::decode(&m.data) {
                Ok(Control::Reconfigure) => reconfigure.notify_one(),
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
            // Instructions are acted on at once (or dropped if malformed): nothing to keep.
            std::future::ready(Settle::Ack)
        })
        .await;
}
