//! Wiring: build every part of a dispatcher node from its settings and run it until
//! cancelled.

use crate::api::{self, AppState};
use crate::broker_users::BrokerUsers;
use crate::db;
use crate::locks::{Locks, LocksConfig};
use crate::metrics::Metrics;
use crate::monitors;
use crate::nodes::{self, Node};
use crate::notify::Notifier;
use crate::orchestrator::Orchestrator;
use crate::results::ResultConsumer;
use crate::secrets::SecretBox;
use crate::senders::Attribution;
use anyhow::Context;
use gantry_shared::amqp::{Broker, DeclareFn, Publisher};
use gantry_shared::config::Settings;
use gantry_shared::redis_link::RedisLink;
use gantry_shared::topology::Topology;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A dispatcher node, built and listening, not yet serving.
pub struct Dispatcher {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    pub addr: SocketAddr,
    cancel: CancellationToken,
    db: sqlx::PgPool,
    settings: Settings,
}

impl Dispatcher {
    /// Prepare the database, connect to the broker (in the background: a broker that is down
    /// at start only delays jobs) and bind the HTTP port.
    pub async fn build(settings: Settings, cancel: CancellationToken) -> anyhow::Result<Self> {
        let secrets = SecretBox::load(&settings.secrets, !settings.production)?;
        let broker_users = BrokerUsers::from_settings(&settings)?;
        let db = db::prepare(&settings).await?;
        crate::secrets::verify_key(&db, &secrets).await?;
        db::bootstrap(&db, &settings).await?;
        let topology = Topology::new(&settings.namespace);
        let declare: DeclareFn = {
            let db = db.clone();
            let topology = topology.clone();
            Arc::new(move |conn| {
                let db = db.clone();
                let topology = topology.clone();
                Box::pin(async move { declare_all(&conn, &db, &topology).await })
            })
        };
        let broker = Broker::start_tls(
            settings.amqp.url.clone(),
            format!("gantry-dispatcher@{}", hostname()),
            declare,
            settings.ca_pem(),
            cancel.clone(),
        );
        let attribution =
            Attribution::new(&settings.namespace, broker.user(), broker_users.is_some());
        match &broker_users {
            Some(_) => tracing::info!(
                "every worker gets a broker user of its own (amqp.management_url is set)"
            ),
            None => tracing::warn!(
                user = broker.user(),
                "development mode: amqp.management_url is not set, so every agent shares the broker user of amqp.url and can forge any worker's results; see docs/security.md before exposing this installation"
            ),
        }
        if let Some(users) = broker_users.clone() {
            spawn_reconcile(db.clone(), users, cancel.clone());
        }
        let builtin_runs_code = crate::builtin::runs_user_code(&settings);
        let retry_base = Duration::from_millis(settings.dispatcher.retry_backoff_ms);
        let locks_wake = Arc::new(tokio::sync::Notify::new());
        let node = Node::new(settings.dispatcher.task_cap);
        // The node's one LISTEN connection: log followers and wake-ups (see `notify`).
        let credentials = Arc::new(crate::credentials::Credentials::default());
        let notifier = Notifier::start(db.clone(), credentials.clone(), cancel.clone());
        let orchestrator = Orchestrator::start(
            db.clone(),
            topology.clone(),
            broker.clone(),
            Duration::from_secs(settings.dispatcher.sweep_interval_secs),
            locks_wake.clone(),
            Duration::from_millis(settings.dispatcher.retry_backoff_ms),
            node.clone(),
            crate::email::Mailer::new(&settings.smtp),
            builtin_runs_code,
            &notifier,
            cancel.clone(),
        );
        let redis = Arc::new(
            RedisLink::with_ca(&settings.redis.url, settings.ca_pem().as_deref())
                .context("redis.url")?,
        );
        let locks = Locks::start(
            db.clone(),
            redis.clone(),
            LocksConfig {
                namespace: settings.namespace.clone(),
                redis_url: settings.redis.url.clone(),
                lease: Duration::from_millis(settings.locks.lease_ms),
                retry_base,
            },
            orchestrator.clone(),
            locks_wake,
            cancel.clone(),
        );
        let metrics = Arc::new(Metrics::default());
        ResultConsumer {
            db: db.clone(),
            locks: locks.clone(),
            topology: topology.clone(),
            broker: broker.clone(),
            orchestrator: orchestrator.clone(),
            metrics: metrics.clone(),
            retry_base,
            attribution: attribution.clone(),
            secrets: secrets.clone(),
            limits: settings.limits.clone(),
        }
        .spawn(cancel.clone());
        crate::heartbeats::spawn_heartbeats(
            db.clone(),
            broker.clone(),
            &topology,
            attribution,
            cancel.clone(),
        );
        monitors::spawn_availability(db.clone(), cancel.clone());
        monitors::spawn_worker_loss(
            db.clone(),
            broker.clone(),
            &topology,
            orchestrator.clone(),
            locks.clone(),
            retry_base,
            cancel.clone(),
        );
        crate::strays::Strays {
            db: db.clone(),
            broker: broker.clone(),
            topology: topology.clone(),
            users: broker_users.clone(),
            orchestrator: orchestrator.clone(),
        }
        .spawn(cancel.clone());
        monitors::spawn_dead_letters(
            db.clone(),
            broker.clone(),
            &topology,
            retry_base,
            cancel.clone(),
        );
        crate::cancels::spawn(db.clone(), locks.clone(), retry_base, cancel.clone());
        let db_handle = db.clone();
        let state = AppState {
            notifier,
            credentials,
            redis,
            locks: locks.clone(),
            control: Arc::new(Publisher::new(broker.clone())),
            retry_base,
            db,
            topology,
            broker,
            orchestrator,
            secrets,
            metrics,
            broker_users,
            production: settings.production,
            builtin_runs_code,
            approvals_allow_self: settings.approvals.allow_self,
            cancel: cancel.clone(),
        };
        // 5xx answers here are deliberate (503 while a service is away) and logged where they
        // arise; the trace layer reports them at debug level only.
        let router =
            api::router(state).layer(tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ));
        let listener = tokio::net::TcpListener::bind(settings.http_bind())
            .await
            .with_context(|| format!("binding http.bind = {}", settings.http.bind))?;
        let addr = listener.local_addr()?;
        // Registered once the address is ours: a previous process under the same name is gone.
        nodes::register(&db_handle, &node, &format!("{}@{addr}", hostname()))
            .await
            .context("registering this dispatcher node")?;
        Ok(Self {
            listener,
            router,
            addr,
            cancel,
            db: db_handle,
            settings,
        })
    }

    /// Start the built-in worker (steps run as `run_as` when given), then serve until
    /// cancelled; open log streams end at once, other requests get 10 s.
    pub async fn run(self, run_as: Option<gantry_agent::runner::RunAs>) -> anyhow::Result<()> {
        if let Err(e) = crate::builtin::start(
            &self.db,
            &self.settings,
            self.addr,
            run_as,
            self.cancel.child_token(),
        )
        .await
        {
            // The node still serves; the built-in worker's steps wait for it.
            tracing::error!(error = %e, "the built-in worker could not start");
        }
        let cancel = self.cancel.clone();
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { cancel.cancelled().await });
        let cancel = self.cancel.clone();
        tokio::select! {
            r = server => r.context("HTTP server failed"),
            _ = async {
                cancel.cancelled().await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            } => Ok(()),
        }
    }
}

/// Everything a dispatcher declares on a new broker connection: the base topology, every
/// pool's queue (so jobs published while no agent runs are kept) and every worker's own queue
/// and control queue (agents declare nothing: their broker users may not). A worker's queues
/// that cannot be declared (a control queue left by an older version with other arguments)
/// are skipped with a warning rather than stop the whole connection.
async fn declare_all(
    conn: &lapin::Connection,
    db: &sqlx::PgPool,
    topology: &Topology,
) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    topology.declare_base(&ch).await?;
    let slugs: Vec<String> = sqlx::query_scalar("SELECT slug FROM pools")
        .fetch_all(db)
        .await
        .unwrap_or_default();
    for slug in slugs {
        topology.declare_pool(&ch, &slug).await?;
    }
    let _ = ch.close(200, "declared".into()).await;
    let workers: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_all(db)
        .await
        .unwrap_or_default();
    declare_workers(conn, topology, &workers).await
}

/// Declare workers' own queues and control queues, each failure on its own (a failed declare
/// closes its channel).
pub async fn declare_workers(
    conn: &lapin::Connection,
    topology: &Topology,
    workers: &[uuid::Uuid],
) -> lapin::Result<()> {
    let mut ch = conn.create_channel().await?;
    for w in workers {
        let r = async {
            topology.declare_worker(&ch, w).await?;
            topology.declare_control(&ch, w).await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, worker = %w, "could not declare a worker's queues");
            ch = conn.create_channel().await?;
        }
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Reconcile the broker's worker users with PostgreSQL at start and every
/// [`RECONCILE_EVERY`] (see [`BrokerUsers::reconcile`]).
fn spawn_reconcile(db: sqlx::PgPool, users: BrokerUsers, cancel: CancellationToken) {
    crate::supervise::every("broker-users", RECONCILE_EVERY, cancel, move || {
        let (db, users) = (db.clone(), users.clone());
        async move {
            match crate::store::workers::reconcile_broker_users(&db, &users).await {
                Ok(r) if r != Default::default() => {
                    tracing::warn!(
                        created = r.created,
                        repermissioned = r.repermissioned,
                        deleted = r.deleted,
                        "corrected the broker's worker users"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not reconcile the broker's worker users; will retry")
                }
            }
            Ok(())
        }
    });
}

/// How often broker users are checked against PostgreSQL.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(60);

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
