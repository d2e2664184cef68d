//! Wiring: build every part of a dispatcher node from its settings and run it until
//! cancelled.

use crate::api::{self, AppState};
use crate::db;
use crate::locks::{Locks, LocksConfig};
use crate::metrics::Metrics;
use crate::monitors;
use crate::nodes::{self, Node};
use crate::notify::Notifier;
use crate::orchestrator::Orchestrator;
use crate::results::ResultConsumer;
use crate::secrets::SecretBox;
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
        let secrets = SecretBox::from_config(settings.secrets.key.as_deref())?;
        let db = db::prepare(&settings).await?;
        db::bootstrap(&db, &settings).await?;
        let topology = Topology::new(&settings.namespace);
        let declare: DeclareFn = {
            let db = db.clone();
            let topology = topology.clone();
            Arc::new(move |ch| {
                let db = db.clone();
                let topology = topology.clone();
                Box::pin(async move {
                    topology.declare_base(&ch).await?;
                    // Every pool's queue, so jobs published while no agent runs are kept.
                    let slugs: Vec<String> = sqlx::query_scalar("SELECT slug FROM pools")
                        .fetch_all(&db)
                        .await
                        .unwrap_or_default();
                    for slug in slugs {
                        topology.declare_pool(&ch, &slug).await?;
                    }
                    Ok(())
                })
            })
        };
        let broker = Broker::start(
            settings.amqp.url.clone(),
            format!("gantry-dispatcher@{}", hostname()),
            declare,
            cancel.clone(),
        );
        let retry_base = Duration::from_millis(settings.dispatcher.retry_backoff_ms);
        let locks_wake = Arc::new(tokio::sync::Notify::new());
        let node = Node::new(settings.dispatcher.task_cap);
        let orchestrator = Orchestrator::start(
            db.clone(),
            topology.clone(),
            broker.clone(),
            Duration::from_secs(settings.dispatcher.sweep_interval_secs),
            locks_wake.clone(),
            Duration::from_millis(settings.dispatcher.retry_backoff_ms),
            node.clone(),
            crate::email::Mailer::new(&settings.smtp),
            cancel.clone(),
        );
        let redis = Arc::new(RedisLink::new(&settings.redis.url).context("redis.url")?);
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
        }
        .spawn(cancel.clone());
        monitors::spawn_heartbeats(db.clone(), broker.clone(), &topology, cancel.clone());
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
        monitors::spawn_dead_letters(
            db.clone(),
            broker.clone(),
            &topology,
            orchestrator.clone(),
            retry_base,
            cancel.clone(),
        );
        let db_handle = db.clone();
        let state = AppState {
            notifier: Notifier::start(db.clone(), cancel.clone()),
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

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
