//! # Broker connections that heal themselves
//!
//! [`Broker`] owns one AMQP connection and replaces it when it dies: it reconnects with
//! exponential backoff (100 ms to 5 s), re-declares the caller's topology, and publishes the
//! new connection on a `watch` channel. Consumers watch it and re-consume on each new
//! connection; anything they had not acked is redelivered by the broker, which is why every
//! consumer in Gantry is idempotent.
//!
//! We do not use lapin's automatic recovery: a channel closed by the broker (consumer
//! timeout, a 406) is not recovered by it, and acks from a pre-recovery channel are silently
//! refused. One explicit reconnect path is easier to reason about and to test.
//!
//! [`Publisher`] publishes with publisher confirms and `mandatory`, on a channel it re-opens
//! when the connection changes: a publish is `Ok` only once the broker confirmed it and did
//! not return it. Every message it sends carries `user_id`, the connection's own login, which
//! RabbitMQ checks (a message claiming any other user is refused with 406): that is how the
//! dispatcher knows which worker sent an event, whatever its body says.
//!
//! [`consume::QueueConsumer`] is the one way to consume a queue: re-consumed after any
//! break, each delivery settled exactly once (ack, requeue or reject).
//!
//! `amqps://` URLs connect with TLS (rustls), trusting the built-in web roots and the PEM CA
//! given to [`Broker::start_tls`] (`tls.ca_file`).

pub mod consume;

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Event};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

/// Declares what a process needs on a fresh connection (channels are the function's own).
pub type DeclareFn = Arc<
    dyn Fn(SharedConnection) -> Pin<Box<dyn Future<Output = lapin::Result<()>> + Send>>
        + Send
        + Sync,
>;

/// A [`DeclareFn`] that declares nothing (agents: their broker users may not).
pub fn declare_nothing() -> DeclareFn {
    Arc::new(|_| Box::pin(async { Ok(()) }))
}

/// A connection, shared by the components that use it.
pub type SharedConnection = Arc<Connection>;

/// A self-healing connection to RabbitMQ.
#[derive(Clone)]
pub struct Broker {
    rx: watch::Receiver<Option<SharedConnection>>,
    /// The user the connection logs in as (the `user_id` of everything published on it).
    user: Arc<str>,
}

impl Broker {
    /// Start the supervisor. It runs until `cancel` fires, then closes the connection.
    ///
    /// Unless the URL sets `heartbeat`, the connection asks for [`DEFAULT_HEARTBEAT_SECS`]:
    /// the broker then closes the connection of a process that froze (SIGSTOP, a hung host)
    /// within about two intervals and requeues what it held, instead of after minutes.
    pub fn start(url: String, name: String, declare: DeclareFn, cancel: CancellationToken) -> Self {
        Self::start_tls(url, name, declare, None, cancel)
    }

    /// As [`Broker::start`], trusting `ca_pem` (a PEM CA) for `amqps://` besides the web roots.
    pub fn start_tls(
        url: String,
        name: String,
        declare: DeclareFn,
        ca_pem: Option<String>,
        cancel: CancellationToken,
    ) -> Self {
        let url = with_heartbeat(&url);
        let user: Arc<str> = login_user(&url).into();
        let (tx, rx) = watch::channel(None);
        tokio::spawn(supervise(url, name, declare, ca_pem, tx, cancel));
        Self { rx, user }
    }

    /// The user this connection logs in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The current connection, if there is one.
    pub fn current(&self) -> Option<SharedConnection> {
        self.rx.borrow().clone()
    }

    /// Wait until connected.
    pub async fn connected(&self) -> SharedConnection {
        let mut rx = self.rx.clone();
        loop {
            if let Some(c) = rx.borrow_and_update().clone()
                && c.status().connected()
            {
                return c;
            }
            if rx.changed().await.is_err() {
                // The supervisor is gone (shutdown); wait forever rather than spin.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Wait until connected, for at most `limit`.
    pub async fn connected_within(&self, limit: Duration) -> Option<SharedConnection> {
        tokio::time::timeout(limit, self.connected()).await.ok()
    }

    /// Follow connection changes (`None` while disconnected).
    pub fn watch(&self) -> watch::Receiver<Option<SharedConnection>> {
        self.rx.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.rx
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }
}

/// The user an AMQP URL logs in as (`guest` when it names none, as RabbitMQ's clients do).
pub fn login_user(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|u| u.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".into())
}

/// `url` with its user and password replaced (both percent-encoded).
pub fn with_credentials(url: &str, user: &str, password: &str) -> Result<String, String> {
    let mut parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    parsed
        .set_username(user)
        .and_then(|_| parsed.set_password(Some(password)))
        .map_err(|_| "this URL cannot carry credentials".to_owned())?;
    Ok(parsed.to_string())
}

/// Connect once, with TLS for `amqps://` (web roots plus `ca_pem`).
pub async fn connect(
    url: &str,
    props: ConnectionProperties,
    ca_pem: Option<&str>,
) -> lapin::Result<Connection> {
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: ca_pem.map(str::to_owned),
    };
    Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?).await
}

/// The AMQP heartbeat Gantry asks for, in seconds, when the URL does not set one.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// `url` with `heartbeat=DEFAULT_HEARTBEAT_SECS` added unless it already sets a heartbeat.
pub fn with_heartbeat(url: &str) -> String {
    with_query_default(url, "heartbeat", DEFAULT_HEARTBEAT_SECS.into())
}

/// `url` with `frame_max=bytes` added unless it already sets a frame size.
///
/// Without one, lapin starts with buffers for 32 frames of the minimum size and, once the
/// broker offers its own maximum (RabbitMQ: 128 KiB), grows its receive and send buffers to
/// 32 such frames each by filling them with zeros: 8 MiB written, and so resident, on every
/// connection, busy or idle. Asked for up front, the buffers are allocated at their final
/// size and untouched until data goes through them. Messages larger than a frame are split
/// into several frames by the protocol; nothing else changes.
pub fn with_frame_max(url: &str, bytes: u32) -> String {
    with_query_default(url, "frame_max", bytes)
}

fn with_query_default(url: &str, key: &str, value: u32) -> String {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|kv| kv.split('=').next() == Some(key)) {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

async fn supervise(
    url: String,
    name: String,
    declare: DeclareFn,
    ca_pem: Option<String>,
    tx: watch::Sender<Option<SharedConnection>>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut failures: u32 = 0;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let props = ConnectionProperties::default().with_connection_name(name.clone().into());
        let attempt = tokio::select! {
            r = connect(&url, props, ca_pem.as_deref()) => r,
            _ = cancel.cancelled() => return,
        };
        let conn = match attempt {
            Ok(conn) => conn,
            Err(e) => {
                failures += 1;
                // Say it loudly once, then quietly: a broker down for a minute should not
                // flood the log.
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, failures, "cannot reach RabbitMQ; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let conn = Arc::new(conn);
        if let Err(e) = declare(conn.clone()).await {
            tracing::warn!(error = %e, "declaring the broker topology failed; reconnecting");
            let _ = conn.close(200, "declare failed".into()).await;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        if failures > 0 {
            tracing::info!(after_failures = failures, "connected to RabbitMQ again");
        } else {
            tracing::debug!("connected to RabbitMQ");
        }
        failures = 0;
        backoff = Duration::from_millis(100);
        let mut events = conn.events_listener();
        let _ = tx.send(Some(conn.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Event::Error(e)) => {
                        // Channel errors (a passive declare of a missing queue closes its
                        // channel) come here too; only a dead connection means reconnecting.
                        if conn.status().connected() {
                            tracing::debug!(error = %e, "RabbitMQ channel error");
                            continue;
                        }
                        tracing::warn!(error = %e, "RabbitMQ connection lost");
                        break;
                    }
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "RabbitMQ blocked this connection (resource alarm)");
                    }
                    Some(Event::ConnectionUnblocked) => tracing::info!("RabbitMQ unblocked this connection"),
                    Some(_) => {}
                    None => break,
                },
                _ = tick.tick() => {
                    if !conn.status().connected() {
                        tracing::warn!("RabbitMQ connection closed");
                        break;
                    }
                }
                _ = cancel.cancelled() => {
                    let _ = tx.send(None);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, "shutting down".into()),
                    )
                    .await;
                    return;
                }
            }
        }
        let _ = tx.send(None);
    }
}

/// Why a publish did not succeed. Every variant means "not known to be stored": the caller
/// may publish again (consumers are idempotent).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ is not reachable: {0}")]
    Unavailable(String),
    #[error("RabbitMQ returned the message as unroutable ({0}): its queue does not exist")]
    Returned(String),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("no confirmation from RabbitMQ within {0:?}")]
    Timeout(Duration),
}

/// How long a publish waits for a missing connection before it fails.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Publishes with confirms on a channel of its own, re-opened on each new connection.
pub struct Publisher {
    broker: Broker,
    channel: Mutex<Option<Channel>>,
    confirm_timeout: Duration,
}

/// A publish sent, its confirmation not yet awaited.
pub struct PendingConfirm {
    confirm: lapin::PublisherConfirm,
    timeout: Duration,
}

impl PendingConfirm {
    pub async fn wait(self) -> Result<(), PublishError> {
        match tokio::time::timeout(self.timeout, self.confirm).await {
            Err(_) => Err(PublishError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(PublishError::Unavailable(e.to_string())),
            Ok(Ok(lapin::Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(lapin::Confirmation::Ack(Some(ret)))) => {
                Err(PublishError::Returned(ret.reply_text.to_string()))
            }
            Ok(Ok(lapin::Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(lapin::Confirmation::NotRequested)) => Err(PublishError::Unavailable(
                "channel is not in confirm mode".into(),
            )),
        }
    }
}

impl Publisher {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            channel: Mutex::new(None),
            confirm_timeout: Duration::from_secs(30),
        }
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *guard = None;
        // Right after start, or during a reconnect, the connection is moments away: wait a
        // little rather than fail the publish at once.
        let conn = self
            .broker
            .connected_within(CONNECT_WAIT)
            .await
            .ok_or_else(|| PublishError::Unavailable("not connected".into()))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// Send a persistent, mandatory message stamped with the connection's `user_id`; await
    /// [`PendingConfirm::wait`] to know it is stored. Messages sent through one publisher
    /// reach the broker in call order.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let ch = self.channel().await?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties
                    .with_delivery_mode(2)
                    .with_user_id(self.broker.user().into()),
            )
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        Ok(PendingConfirm {
            confirm,
            timeout: self.confirm_timeout,
        })
    }

    /// Send and wait for the confirmation.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .wait()
            .await
    }
}

/// JSON message properties.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_added_unless_the_url_sets_one() {
        assert_eq!(
            with_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?frame_max=8192"),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?heartbeat=30"),
            "amqp://h/%2f?heartbeat=30"
        );
        let parsed: lapin::uri::AMQPUri = with_heartbeat("amqp://h/%2f").parse().unwrap();
        assert_eq!(parsed.query.heartbeat, Some(10));
    }

    #[test]
    fn the_login_user_comes_from_the_url() {
        assert_eq!(login_user("amqp://guest:guest@127.0.0.1:5672/%2f"), "guest");
        assert_eq!(
            login_user("amqps://gantry.worker.1:pw@h/%2f"),
            "gantry.worker.1"
        );
        assert_eq!(login_user("amqp://127.0.0.1/%2f"), "guest");
        let url = with_credentials("amqp://guest:guest@h:5672/%2f", "w", "p/w@x").unwrap();
        assert_eq!(login_user(&url), "w");
        let parsed: lapin::uri::AMQPUri = url.parse().unwrap();
        assert_eq!(parsed.authority.userinfo.password, "p/w@x");
        assert_eq!(parsed.vhost, "/");
    }

    #[test]
    fn a_frame_size_is_added_unless_the_url_sets_one() {
        assert_eq!(
            with_frame_max("amqp://h/%2f", 16_384),
            "amqp://h/%2f?frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?heartbeat=30", 16_384),
            "amqp://h/%2f?heartbeat=30&frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?frame_max=131072", 16_384),
            "amqp://h/%2f?frame_max=131072"
        );
        let parsed: lapin::uri::AMQPUri = with_heartbeat(&with_frame_max("amqp://h/%2f", 16_384))
            .parse()
            .unwrap();
        assert_eq!(parsed.query.frame_max, Some(16_384));
        assert_eq!(parsed.query.heartbeat, Some(10));
    }
}
