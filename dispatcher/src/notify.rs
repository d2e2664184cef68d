//! Fan-out of PostgreSQL notifications to the log followers of this node.
//!
//! One `LISTEN` connection per node; every SSE follower subscribes to a broadcast of task ids
//! whose log grew or whose state changed. Notifications are only a latency optimisation:
//! followers also re-read every second, and after a lost listener connection (notifications
//! sent meanwhile are gone) everyone is told to re-read ([`EVERYONE`]).

use crate::logs::{LOG_CHANNEL, TASK_CHANNEL};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Sent when notifications may have been missed: every follower re-reads.
pub const EVERYONE: Uuid = Uuid::nil();

#[derive(Clone)]
pub struct Notifier {
    tx: broadcast::Sender<Uuid>,
}

impl Notifier {
    pub fn start(db: PgPool, cancel: CancellationToken) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let me = Self { tx };
        let tx = me.tx.clone();
        crate::supervise::spawn("listen-logs", cancel.clone(), move || {
            let db = db.clone();
            let tx = tx.clone();
            let cancel = cancel.clone();
            async move {
                loop {
                    let mut listener = match PgListener::connect_with(&db).await {
                        Ok(l) => l,
                        Err(e) => {
                            crate::supervise::pass_failed(
                                "listen-logs",
                                &format!("LISTEN connection failed: {e}"),
                            );
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                                _ = cancel.cancelled() => return Ok(()),
                            }
                        }
                    };
                    if let Err(e) = listener.listen_all([LOG_CHANNEL, TASK_CHANNEL]).await {
                        crate::supervise::pass_failed(
                            "listen-logs",
                            &format!("LISTEN failed: {e}"),
                        );
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    let _ = tx.send(EVERYONE);
                    loop {
                        let n = tokio::select! {
                            n = listener.try_recv() => n,
                            _ = cancel.cancelled() => return Ok(()),
                        };
                        match n {
                            Ok(Some(n)) => {
                                if let Ok(id) = Uuid::parse_str(n.payload()) {
                                    let _ = tx.send(id);
                                }
                            }
                            Ok(None) => {
                                // The connection dropped and was re-established: anything sent in
                                // between is lost, so everyone re-reads.
                                let _ = tx.send(EVERYONE);
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "LISTEN connection error; reconnecting");
                                let _ = tx.send(EVERYONE);
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                break;
                            }
                        }
                    }
                }
            }
        });
        me
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }
}
