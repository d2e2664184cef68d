//! A Redis connection created lazily and re-created after failures, so that a Redis that is
//! down at start (or restarts) never stops a program: calls fail until it is back. The mutex
//! scripts ([`crate::locks`]) and the dispatcher's health check use it.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;
use tokio::sync::Mutex;

pub struct RedisLink {
    client: redis::Client,
    manager: Mutex<Option<ConnectionManager>>,
}

impl RedisLink {
    pub fn new(url: &str) -> redis::RedisResult<Self> {
        Self::with_ca(url, None)
    }

    /// As [`RedisLink::new`]; a `rediss://` URL then trusts only `ca_pem` (`tls.ca_file`)
    /// when given, else the system's roots.
    pub fn with_ca(url: &str, ca_pem: Option<&str>) -> redis::RedisResult<Self> {
        let client = match ca_pem {
            Some(pem) if url.starts_with("rediss:") => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.as_bytes().to_vec()),
                },
            )?,
            _ => redis::Client::open(url)?,
        };
        Ok(Self {
            client,
            manager: Mutex::new(None),
        })
    }

    /// A connection, or an error if Redis cannot be reached within a second.
    pub async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut guard = self.manager.lock().await;
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let m = self
            .client
            .get_connection_manager_with_config(config)
            .await?;
        *guard = Some(m.clone());
        Ok(m)
    }

    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.connection().await else {
            return false;
        };
        let r: redis::RedisResult<String> = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))));
        r.is_ok()
    }
}
