//! # The built-in worker
//!
//! Every dispatcher node runs one: an agent inside the node's process (the same code as
//! `gantry-agent run`) with a worker record of its own (`builtin = true`, in no pool). It
//! consumes `<ns>.server`, where the orchestrator routes steps with `location = "server"`
//! and the default pool's steps while that pool has no registered worker (see
//! `orchestrator::route`). It claims over this node's own API like any agent, so claims,
//! logs, masking, cancel and worker loss work the same. Scripts run as the dispatcher's user,
//! or as `builtin_worker.user`, with an environment built from scratch (never the node's own,
//! which holds its configuration).
//!
//! It connects to the broker with the node's own user (`amqp.url`), which the result consumer
//! believes only for built-in workers (see `senders`), and declares its own queues itself.
//! With `production = true` it runs no user code unless `builtin_worker.user` names an
//! unprivileged user other than the dispatcher's own ([`runs_user_code`]): a server step would
//! otherwise run with the dispatcher's rights, next to its secrets key and its database.

use crate::auth;
use anyhow::Context;
use gantry_agent::agent::{BrokerLogin, Setup, Stop, run_with};
use gantry_agent::runner::RunAs;
use gantry_shared::config::{ConfigError, Settings};
use gantry_shared::topology::Topology;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long running built-in steps may go on after the node is asked to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The OS user built-in steps run as, checked at start (a bad name is a config error).
pub fn run_as(settings: &Settings) -> Result<Option<RunAs>, ConfigError> {
    settings
        .builtin_worker
        .user
        .as_deref()
        .map(|name| {
            RunAs::lookup(name).map_err(|e| ConfigError {
                key: Some("builtin_worker.user".into()),
                message: e,
            })
        })
        .transpose()
}

/// True when `user` may run built-in steps under `production = true`: not root, and not the
/// dispatcher's own user.
pub fn is_unprivileged(user: &RunAs) -> bool {
    user.uid != 0 && user.uid != gantry_agent::runner::effective_uid()
}

/// Whether this node's built-in worker may run user code: always in development; with
/// `production = true` only as an unprivileged `builtin_worker.user`.
pub fn runs_user_code(settings: &Settings) -> bool {
    if !settings.production {
        return true;
    }
    matches!(run_as(settings), Ok(Some(u)) if is_unprivileged(&u))
}

/// Checks of `builtin_worker.user` under `production = true`, at start: a user that exists
/// but is privileged is a configuration error (none at all only disables server steps).
pub fn check_production(settings: &Settings) -> Result<(), ConfigError> {
    if let (true, Some(user)) = (settings.production, run_as(settings)?)
        && !is_unprivileged(&user)
    {
        return Err(ConfigError {
            key: Some("builtin_worker.user".into()),
            message: format!(
                "{} (uid {}) is root or the dispatcher's own user; with production = true server steps must run as an unprivileged user of their own",
                user.name, user.uid
            ),
        });
    }
    Ok(())
}

/// The name of this node's built-in worker.
pub fn name(addr: SocketAddr) -> String {
    format!("built-in {}:{}", crate::app::hostname(), addr.port())
}

/// Create or refresh this node's worker record with a fresh credential, then run the agent
/// in the background until `cancel`.
pub async fn start(
    db: &PgPool,
    settings: &Settings,
    addr: SocketAddr,
    run_as: Option<RunAs>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let token = auth::new_worker_token();
    let name = name(addr);
    let id: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO workers (id, name, token_hash, max_concurrent_steps, builtin)
         VALUES ($1, $2, $3, $4, true)
         ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash,
             max_concurrent_steps = excluded.max_concurrent_steps
         WHERE workers.builtin
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(&name)
    .bind(auth::hash_secret(&token))
    .bind(settings.builtin_worker.max_concurrent_steps as i32)
    .fetch_optional(db)
    .await
    .context("registering the built-in worker")?;
    let Some(id) = id else {
        anyhow::bail!("a registered worker is named {name:?}; the built-in worker needs that name");
    };
    let work_root = settings
        .agent
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("gantry-builtin"))
        .join(format!("{}-{}", settings.namespace, addr.port()));
    std::fs::create_dir_all(&work_root)
        .with_context(|| format!("creating {}", work_root.display()))?;
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let server = format!("http://{host}:{}", addr.port());
    let extra_queues = vec![Topology::new(&settings.namespace).server_queue()];
    let settings = settings.clone();
    tracing::info!(worker = name, %id, "starting the built-in worker");
    // Supervised like every other loop of the node: if it ever fails, it starts again (as a
    // restarted agent would: leftovers of its steps are swept, its queues consumed anew).
    let stop = cancel.clone();
    crate::supervise::spawn("builtin-worker", cancel, move || {
        let setup = Setup {
            server: server.clone(),
            token: token.clone(),
            work_root: work_root.clone(),
            extra_queues: extra_queues.clone(),
            run_as: run_as.clone(),
            step_users: None,
            stop: Stop::Token(stop.clone(), SHUTDOWN_GRACE),
            broker: BrokerLogin::Dispatcher,
        };
        run_with(settings.clone(), setup)
    });
    Ok(())
}
