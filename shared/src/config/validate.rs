//! The checks [`Settings::load`] runs on what serde accepted: URLs and their schemes,
//! keys, the ranges of numbers, the step users.

use super::{ConfigError, Settings, validate_namespace};
use std::net::SocketAddr;

impl Settings {
    /// Checks that serde's types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_namespace(&self.namespace).map_err(|m| ConfigError::key("namespace", m))?;
        let amqp = url::Url::parse(&self.amqp.url)
            .map_err(|e| ConfigError::key("amqp.url", format!("not a URL: {e}")))?;
        if !matches!(amqp.scheme(), "amqp" | "amqps") {
            return Err(ConfigError::key(
                "amqp.url",
                format!("scheme must be amqp or amqps, not {:?}", amqp.scheme()),
            ));
        }
        if let Some(m) = &self.amqp.management_url {
            let parsed = url::Url::parse(m)
                .map_err(|e| ConfigError::key("amqp.management_url", format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::key(
                    "amqp.management_url",
                    format!("scheme must be http or https, not {:?}", parsed.scheme()),
                ));
            }
            if parsed.username().is_empty() {
                return Err(ConfigError::key(
                    "amqp.management_url",
                    "must carry an administrator's user and password (http://user:password@host:15672)",
                ));
            }
        }
        if let Some(ca) = &self.tls.ca_file {
            crate::tls::read_ca(ca).map_err(|m| ConfigError::key("tls.ca_file", m))?;
        }
        let pg = url::Url::parse(&self.postgres.url)
            .map_err(|e| ConfigError::key("postgres.url", format!("not a URL: {e}")))?;
        if !matches!(pg.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::key(
                "postgres.url",
                format!("scheme must be postgres, not {:?}", pg.scheme()),
            ));
        }
        if pg.path().trim_start_matches('/').is_empty() {
            return Err(ConfigError::key(
                "postgres.url",
                "must name a database, e.g. postgres://root@127.0.0.1:5432/gantry",
            ));
        }
        if self.postgres.max_connections < 2 {
            return Err(ConfigError::key(
                "postgres.max_connections",
                "must be at least 2",
            ));
        }
        let redis = url::Url::parse(&self.redis.url)
            .map_err(|e| ConfigError::key("redis.url", format!("not a URL: {e}")))?;
        if !matches!(redis.scheme(), "redis" | "rediss" | "redis+unix") {
            return Err(ConfigError::key(
                "redis.url",
                format!("scheme must be redis, not {:?}", redis.scheme()),
            ));
        }
        self.http
            .bind
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::key("http.bind", format!("not an address:port: {e}")))?;
        if let Some(key) = &self.api.bootstrap_key
            && key.trim().len() < 16
        {
            return Err(ConfigError::key(
                "api.bootstrap_key",
                "must be at least 16 characters",
            ));
        }
        if let Some(key) = &self.secrets.key {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key.trim())
                .map_err(|_| ConfigError::key("secrets.key", "is not valid base64"))?;
            if raw.len() != 32 {
                return Err(ConfigError::key(
                    "secrets.key",
                    format!(
                        "must be the base64 of exactly 32 bytes (openssl rand -base64 32), not {}",
                        raw.len()
                    ),
                ));
            }
        }
        self.limits.validate()?;
        if self.dispatcher.task_cap == 0 {
            return Err(ConfigError::key(
                "dispatcher.task_cap",
                "must be at least 1",
            ));
        }
        if self.dispatcher.sweep_interval_secs == 0 {
            return Err(ConfigError::key(
                "dispatcher.sweep_interval_secs",
                "must be at least 1",
            ));
        }
        if self.locks.lease_ms < 500 {
            return Err(ConfigError::key("locks.lease_ms", "must be at least 500"));
        }
        if !matches!(self.smtp.tls.as_str(), "none" | "starttls" | "tls") {
            return Err(ConfigError::key(
                "smtp.tls",
                "must be none, starttls or tls",
            ));
        }
        if !self.smtp.from.contains('@') {
            return Err(ConfigError::key("smtp.from", "must be an e-mail address"));
        }
        if self.smtp.timeout_secs == 0 {
            return Err(ConfigError::key("smtp.timeout_secs", "must be at least 1"));
        }
        if !(1..=1000).contains(&self.builtin_worker.max_concurrent_steps) {
            return Err(ConfigError::key(
                "builtin_worker.max_concurrent_steps",
                "must be between 1 and 1000",
            ));
        }
        self.check_step_users()?;
        if self.agent.heartbeat_secs == Some(0) {
            return Err(ConfigError::key(
                "agent.heartbeat_secs",
                "must be at least 1",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::key("log.format", "must be text or json"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::key("log.level", e.to_string()));
        }
        self.check_ranges()?;
        Ok(())
    }

    /// Upper bounds (and lower ones serde cannot say) of the numbers, so that no duration
    /// or count overflows where it is used. Each is listed in docs/configuration.md.
    fn check_ranges(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 9] = [
            (
                "postgres.max_connections",
                self.postgres.max_connections.into(),
                2,
                1000,
            ),
            (
                "dispatcher.task_cap",
                self.dispatcher.task_cap.into(),
                1,
                1_000_000,
            ),
            (
                "dispatcher.sweep_interval_secs",
                self.dispatcher.sweep_interval_secs,
                1,
                3600,
            ),
            (
                "dispatcher.retry_backoff_ms",
                self.dispatcher.retry_backoff_ms,
                0,
                60_000,
            ),
            (
                "agent.shutdown_grace_secs",
                self.agent.shutdown_grace_secs,
                0,
                604_800,
            ),
            (
                "agent.heartbeat_secs",
                self.agent.heartbeat_secs.unwrap_or(1),
                1,
                3600,
            ),
            ("locks.lease_ms", self.locks.lease_ms, 500, 3_600_000),
            ("smtp.timeout_secs", self.smtp.timeout_secs, 1, 3600),
            (
                "builtin_worker.max_concurrent_steps",
                self.builtin_worker.max_concurrent_steps.into(),
                1,
                1000,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::key(
                    key,
                    format!("must be between {min} and {max}, not {value}"),
                ));
            }
        }
        Ok(())
    }

    /// `agent.step_user` and `agent.step_uid_range`, as far as they can be checked without
    /// the OS (whether the agent is root, whether the user exists: see the agent's start).
    fn check_step_users(&self) -> Result<(), ConfigError> {
        let a = &self.agent;
        if a.step_user.is_some() && a.step_uid_range.is_some() {
            return Err(ConfigError::key(
                "agent.step_uid_range",
                "set agent.step_user or agent.step_uid_range, not both",
            ));
        }
        if let Some(u) = &a.step_user
            && (u.trim().is_empty() || u.contains('\0'))
        {
            return Err(ConfigError::key("agent.step_user", "must name an OS user"));
        }
        if let Some(r) = &a.step_uid_range {
            crate::uid_range::UidRange::parse(r)
                .map_err(|e| ConfigError::key("agent.step_uid_range", e))?;
        }
        Ok(())
    }
}
