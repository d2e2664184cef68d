//! # The node's one `LISTEN` connection
//!
//! One PostgreSQL connection per node listens on every channel the node cares about and fans
//! each notification out to its subscribers:
//!
//! - `gantry_log` and `gantry_task` (a task's log grew, its state changed): every SSE log
//!   follower gets a broadcast of the task id ([`Notifier::subscribe_logs`]); after a lost
//!   listener connection (notifications sent meanwhile are gone) everyone is told to re-read
//!   ([`EVERYONE`]);
//! - `gantry_wake` ([`crate::nodes::WAKE_CHANNEL`], a task's wake-up written by any node):
//!   every handler given to [`Notifier::subscribe_wake`] is called with the task id;
//! - `gantry_credentials` ([`crate::credentials::CHANNEL`], an API key or a worker token
//!   changed): the node's remembered credentials are forgotten. They are trusted only while
//!   this connection is up: it is marked down before any reconnect.
//!
//! Notifications are only a latency optimisation: followers also re-read every second, and
//! the orchestrator's sweep reads `task_wakeups` anyway.

use crate::logs::{LOG_CHANNEL, TASK_CHANNEL};
use crate::nodes::WAKE_CHANNEL;
use gantry_shared::ids::TaskId;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Sent to log followers when notifications may have been missed: every follower re-reads.
pub const EVERYONE: Uuid = Uuid::nil();

/// Every channel the node listens on.
pub const CHANNELS: [&str; 4] = [
    LOG_CHANNEL,
    TASK_CHANNEL,
    WAKE_CHANNEL,
    crate::credentials::CHANNEL,
];

type WakeHandler = Arc<dyn Fn(TaskId) + Send + Sync>;

#[derive(Clone)]
pub struct Notifier {
    logs: broadcast::Sender<Uuid>,
    wake: Arc<RwLock<Vec<WakeHandler>>>,
    credentials: Arc<crate::credentials::Credentials>,
}

impl Notifier {
    /// Start the listener (supervised, reconnecting); subscribers may come at any time.
    pub fn start(
        db: PgPool,
        credentials: Arc<crate::credentials::Credentials>,
        cancel: CancellationToken,
    ) -> Self {
        let (logs, _) = broadcast::channel(4096);
        let me = Self {
            logs,
            wake: Default::default(),
            credentials,
        };
        let fan = me.clone();
        crate::supervise::spawn("listen", cancel.clone(), move || {
            let (db, fan, cancel) = (db.clone(), fan.clone(), cancel.clone());
            async move {
                fan.listen(&db, &cancel).await;
                Ok(())
            }
        });
        me
    }

    /// Task ids whose log grew or whose state changed ([`EVERYONE`]: re-read).
    pub fn subscribe_logs(&self) -> broadcast::Receiver<Uuid> {
        self.logs.subscribe()
    }

    /// Call `handler` with the task of every wake-up any node writes (`task_wakeups` with
    /// `NOTIFY gantry_wake`). It runs on the listener's task: it must not block (send the id
    /// on a channel).
    pub fn subscribe_wake(&self, handler: impl Fn(TaskId) + Send + Sync + 'static) {
        self.wake
            .write()
            .expect("wake subscribers")
            .push(Arc::new(handler));
    }

    async fn listen(&self, db: &PgPool, cancel: &CancellationToken) {
        loop {
            let connected = async {
                let mut l = PgListener::connect_with(db).await?;
                l.listen_all(CHANNELS).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                l = connected => match l {
                    Ok(l) => l,
                    Err(e) => {
                        crate::supervise::pass_failed("listen", &format!("LISTEN failed: {e}"));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = cancel.cancelled() => return,
                        }
                    }
                },
                _ = cancel.cancelled() => return,
            };
            self.credentials.set_live(true);
            let _ = self.logs.send(EVERYONE);
            loop {
                let n = tokio::select! {
                    n = listener.try_recv() => n,
                    _ = cancel.cancelled() => {
                        self.credentials.set_live(false);
                        return;
                    }
                };
                match n {
                    Ok(Some(n)) => self.fan_out(&n),
                    Ok(None) => {
                        // The connection dropped: anything sent meanwhile is lost, so every
                        // follower re-reads and no credential is trusted until a new
                        // connection listens.
                        self.credentials.set_live(false);
                        let _ = self.logs.send(EVERYONE);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection error; reconnecting");
                        self.credentials.set_live(false);
                        let _ = self.logs.send(EVERYONE);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                }
            }
        }
    }

    fn fan_out(&self, n: &PgNotification) {
        if n.channel() == crate::credentials::CHANNEL {
            self.credentials.invalidate();
            return;
        }
        let Ok(id) = Uuid::parse_str(n.payload()) else {
            return;
        };
        if n.channel() == WAKE_CHANNEL {
            let handlers = self.wake.read().expect("wake subscribers").clone();
            for h in handlers {
                h(TaskId(id));
            }
        } else {
            let _ = self.logs.send(id);
        }
    }
}
