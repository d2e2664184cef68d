//! Configuration, layered with the `config` crate exactly as DESIGN.md fixes it:
//!
//! 1. built-in defaults, which reach the local services with no file at all;
//! 2. `gantry.toml` in the working directory if it exists, or the file named by `--config`
//!    (which must exist);
//! 3. environment variables `GANTRY__SECTION__KEY` (for example `GANTRY__AMQP__URL`,
//!    `GANTRY__NAMESPACE`).
//!
//! A bad value stops the program at start: [`ConfigError`] names the key, and binaries exit
//! with [`EXIT_CONFIG`] (64, `EX_USAGE`).
//!
//! The code is split by concern: this file holds [`Settings`], [`ConfigError`], the
//! defaults and loading; `sections` the settings sections, `limits` the per-task storage
//! quotas, and `validate` the checks run at load.

mod limits;
mod sections;
mod validate;

pub use limits::{DEFAULT_TASK_QUOTA, LimitsSettings, MAX_TASK_QUOTA};
pub use sections::{
    AgentSettings, AmqpSettings, ApiSettings, ApprovalsSettings, BuiltinWorkerSettings,
    DispatcherSettings, HttpSettings, LocksSettings, LogSettings, PostgresSettings, RedisSettings,
    SecretsSettings, SmtpSettings, TlsSettings,
};

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Exit code for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// The default configuration file, read from the working directory when present.
pub const DEFAULT_FILE: &str = "gantry.toml";

/// Prefix of the environment variables; `__` separates the prefix, sections and keys.
pub const ENV_PREFIX: &str = "GANTRY";

/// Everything Gantry's programs read from configuration. The dispatcher and the agent share
/// one layout so one file can serve a whole machine.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Prefix of every exchange, queue and Redis key; lets two stacks share one broker.
    pub namespace: String,
    /// A production installation: the dispatcher refuses to start without `secrets.key` or an
    /// existing `secrets.key_file` (instead of generating a key file) or without
    /// `amqp.management_url` (per-worker broker users), and no program sends a credential in
    /// plain text to another machine (see [`crate::tls`]).
    pub production: bool,
    pub amqp: AmqpSettings,
    pub postgres: PostgresSettings,
    pub redis: RedisSettings,
    pub http: HttpSettings,
    #[serde(default)]
    pub api: ApiSettings,
    pub dispatcher: DispatcherSettings,
    pub agent: AgentSettings,
    pub locks: LocksSettings,
    pub log: LogSettings,
    #[serde(default)]
    pub secrets: SecretsSettings,
    #[serde(default)]
    pub limits: LimitsSettings,
    #[serde(default)]
    pub builtin_worker: BuiltinWorkerSettings,
    #[serde(default)]
    pub smtp: SmtpSettings,
    #[serde(default)]
    pub tls: TlsSettings,
    // ---- approvals (manual steps) ----
    #[serde(default)]
    pub approvals: ApprovalsSettings,
}
/// A configuration problem, naming the key when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", key.as_ref().map(|k| format!("configuration key `{k}`: ")).unwrap_or_else(|| "configuration: ".into()))]
pub struct ConfigError {
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn key(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        let key = match &e {
            config::ConfigError::Type { key, .. } | config::ConfigError::At { key, .. } => {
                key.clone()
            }
            config::ConfigError::NotFound(k) => Some(k.clone()),
            _ => None,
        };
        // Unknown fields come back as serde's message, keyed by their section at best; name
        // the field itself (`amqp.urll`, not `amqp`).
        let text = e.to_string();
        let unknown = text
            .split("unknown field `")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        let key = match (key, unknown) {
            (Some(section), Some(field)) => Some(format!("{section}.{field}")),
            (None, Some(field)) => Some(field),
            (key, None) => key,
        };
        Self {
            key,
            message: e.to_string(),
        }
    }
}

fn defaults() -> Vec<(&'static str, config::Value)> {
    vec![
        ("namespace", "gantry".into()),
        ("production", false.into()),
        ("amqp.url", "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        (
            "postgres.url",
            "postgres://root@127.0.0.1:5432/gantry".into(),
        ),
        ("postgres.max_connections", 16_i64.into()),
        ("redis.url", "redis://127.0.0.1:6379".into()),
        ("http.bind", "127.0.0.1:8080".into()),
        ("dispatcher.task_cap", 1000_i64.into()),
        ("dispatcher.sweep_interval_secs", 2_i64.into()),
        ("dispatcher.retry_backoff_ms", 1000_i64.into()),
        ("agent.keep_work_dirs", false.into()),
        ("agent.shutdown_grace_secs", 600_i64.into()),
        ("locks.lease_ms", 30_000_i64.into()),
        ("log.format", "text".into()),
        ("log.level", "info".into()),
    ]
}
impl Settings {
    /// Load defaults, then the file (`explicit` or `./gantry.toml` if present), then the
    /// environment, and validate the result.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(explicit, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given (tests use this).
    pub fn load_with_env(
        explicit: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in defaults() {
            builder = builder.set_default(key, value)?;
        }
        match explicit {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError {
                        key: None,
                        message: format!("file {} does not exist", path.display()),
                    });
                }
                builder = builder.add_source(
                    config::File::from(path)
                        .format(config::FileFormat::Toml)
                        .required(true),
                );
            }
            None => {
                builder = builder.add_source(
                    config::File::with_name(DEFAULT_FILE)
                        .format(config::FileFormat::Toml)
                        .required(false),
                );
            }
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .separator("__")
                .ignore_empty(true)
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The HTTP bind address (validated at load).
    pub fn http_bind(&self) -> SocketAddr {
        self.http
            .bind
            .parse()
            .expect("http.bind is validated when settings are loaded")
    }

    /// The parsed `agent.step_uid_range` (validated at load).
    pub fn step_uid_range(&self) -> Option<crate::uid_range::UidRange> {
        self.agent
            .step_uid_range
            .as_deref()
            .and_then(|r| crate::uid_range::UidRange::parse(r).ok())
    }

    /// The agent's home directory.
    pub fn agent_home(&self) -> PathBuf {
        if let Some(home) = &self.agent.home {
            return home.clone();
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(data).join("gantry-agent");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(home).join(".local/share/gantry-agent");
        }
        PathBuf::from(".gantry-agent")
    }
}

/// Namespaces become parts of queue names and Redis keys, where `.` is the separator.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 64
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && ns.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{ns:?} must be 1 to 64 characters of a-z, 0-9, - and _, starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests;
