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

/// Who may decide a manual step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsSettings {
    /// Whether the API key that created a task may approve or reject its manual steps
    /// itself. `false`: only another key (with `TaskCreate`) may; the creator gets a 403.
    #[serde(default = "default_allow_self")]
    pub allow_self: bool,
}

impl Default for ApprovalsSettings {
    fn default() -> Self {
        Self {
            allow_self: default_allow_self(),
        }
    }
}

fn default_allow_self() -> bool {
    true
}

/// Transport security for every client (see [`crate::tls`]).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// A private CA (PEM) trusted besides the built-in web roots, by HTTP, AMQP, Redis and
    /// PostgreSQL clients alike.
    pub ca_file: Option<PathBuf>,
}

/// Where e-mail steps are sent from (the dispatcher sends them; workers never do).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// The sender address.
    pub from: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `none` (plain SMTP, for a local relay), `starttls` or `tls`.
    pub tls: String,
    /// Give up on one message after this long.
    pub timeout_secs: u64,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 25,
            from: "gantry@localhost".into(),
            username: None,
            password: None,
            tls: "none".into(),
            timeout_secs: 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: String,
    /// RabbitMQ's management HTTP API with an administrator's credentials
    /// (`http://admin:pw@rabbit:15672`). Set, the dispatcher gives every worker a broker user
    /// of its own; unset, every program shares `url`'s user (development mode).
    #[serde(default)]
    pub management_url: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// The database is created when missing.
    pub url: String,
    pub max_connections: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address the dispatcher's REST API listens on; port 0 picks a free port, which the
    /// dispatcher then logs.
    pub bind: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Created as the first API key (with every permission) when no key exists.
    pub bootstrap_key: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatcherSettings {
    /// How many tasks this node orchestrates at once.
    pub task_cap: u32,
    /// Seconds between sweeps that re-drive tasks whose progress a crash may have interrupted.
    pub sweep_interval_secs: u64,
    /// Delay before a failed step's second attempt; it doubles for each later one (max 60 s).
    pub retry_backoff_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Where the agent keeps its identity (written by `register`) and working directories.
    /// Default: `$XDG_DATA_HOME/gantry-agent` or `~/.local/share/gantry-agent`.
    pub home: Option<PathBuf>,
    /// Root of per-step working directories. Default: `<home>/work`.
    pub work_dir: Option<PathBuf>,
    /// Keep a step's working directory after it ends (for debugging scripts).
    pub keep_work_dirs: bool,
    /// On SIGTERM, how long running steps may go on before they are cancelled.
    pub shutdown_grace_secs: u64,
    /// Seconds between heartbeats and health checks. Unset, the machine policy in
    /// `/api/settings` decides (10 s by default); set, it overrides the policy on this agent.
    pub heartbeat_secs: Option<u64>,

    // ---- Who a step runs as (agent.step_user, agent.step_uid_range) ----
    /// Run every step of this agent as this OS user (by name). Needs the agent to run as root.
    #[serde(default)]
    pub step_user: Option<String>,
    /// `"START-END"`: give every running step a uid (and gid) of its own from this range
    /// (see [`crate::uid_range`]). Needs the agent to run as root; excludes `step_user`.
    #[serde(default)]
    pub step_uid_range: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocksSettings {
    /// Lease of a named mutex: a holder that cannot renew within it loses the mutex (and its
    /// step is stopped); a crashed holder's mutex is free again after it.
    pub lease_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing_subscriber::EnvFilter` directive; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSettings {
    /// Base64 of 32 bytes: the key that encrypts sensitive values at rest.
    pub key: Option<String>,
    /// Where the key is kept when `key` is not set (generated there, mode 0600, on first start
    /// unless `production = true`). Default: [`SecretsSettings::key_file_path`].
    pub key_file: Option<PathBuf>,
}

impl SecretsSettings {
    /// `key_file`, or `$XDG_STATE_HOME/gantry-dispatcher/secrets.key`, or
    /// `~/.local/state/gantry-dispatcher/secrets.key`, or `./gantry-secrets.key` with no home.
    pub fn key_file_path(&self) -> PathBuf {
        if let Some(f) = &self.key_file {
            return f.clone();
        }
        if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(state).join("gantry-dispatcher/secrets.key");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(home).join(".local/state/gantry-dispatcher/secrets.key");
        }
        PathBuf::from("gantry-secrets.key")
    }
}

// ---- limits: per-task storage quotas -------------------------------------------------------

/// What one task may store (see docs/configuration.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// Bytes of log text one task may store (all its steps and attempts together); the step
    /// whose output goes past it fails. 1 to 2^62.
    pub task_log_bytes: u64,
    /// Bytes of artifact data one task may store; the step whose upload goes past it fails.
    /// 1 to 2^62.
    pub artifact_bytes: u64,
}

/// Default of both quotas: 1 GiB.
pub const DEFAULT_TASK_QUOTA: u64 = 1 << 30;
/// Largest quota accepted (so that sums fit PostgreSQL's bigint).
pub const MAX_TASK_QUOTA: u64 = 1 << 62;

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            task_log_bytes: DEFAULT_TASK_QUOTA,
            artifact_bytes: DEFAULT_TASK_QUOTA,
        }
    }
}

impl LimitsSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("limits.task_log_bytes", self.task_log_bytes),
            ("limits.artifact_bytes", self.artifact_bytes),
        ] {
            if !(1..=MAX_TASK_QUOTA).contains(&v) {
                return Err(ConfigError::key(
                    key,
                    format!("must be 1 to {MAX_TASK_QUOTA}"),
                ));
            }
        }
        Ok(())
    }
}

// ---- end of limits ---------------------------------------------------------------------------

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltinWorkerSettings {
    /// Run built-in worker steps as this OS user (the dispatcher must be able to switch to
    /// it, which usually means running as root). Default: the dispatcher's own user.
    pub user: Option<String>,
    /// Steps the built-in worker of one node runs at once.
    #[serde(default = "default_builtin_slots")]
    pub max_concurrent_steps: u32,
}

impl Default for BuiltinWorkerSettings {
    fn default() -> Self {
        Self {
            user: None,
            max_concurrent_steps: default_builtin_slots(),
        }
    }
}

fn default_builtin_slots() -> u32 {
    4
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

    /// The HTTP bind address (validated at load).
    pub fn http_bind(&self) -> SocketAddr {
        self.http
            .bind
            .parse()
            .expect("http.bind is validated when settings are loaded")
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
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_reach_local_services() {
        let dir = tempdir();
        let s = Settings::load_with_env(Some(&write(&dir, "")), env(&[])).unwrap();
        assert_eq!(s.namespace, "gantry");
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.postgres.url, "postgres://root@127.0.0.1:5432/gantry");
        assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(s.http_bind().to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempdir();
        let file = write(
            &dir,
            "namespace = \"fromfile\"\n[http]\nbind = \"0.0.0.0:9000\"\n",
        );
        let s = Settings::load_with_env(
            Some(&file),
            env(&[("GANTRY__NAMESPACE", "fromenv"), ("OTHER__X", "1")]),
        )
        .unwrap();
        assert_eq!(s.namespace, "fromenv");
        assert_eq!(s.http_bind().to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn numbers_out_of_range_name_their_key_and_approvals_default_to_allow_self() {
        let dir = tempdir();
        let file = write(&dir, "");
        let ok = Settings::load_with_env(Some(&file), env(&[])).unwrap();
        assert!(ok.approvals.allow_self);
        let off = Settings::load_with_env(
            Some(&file),
            env(&[("GANTRY__APPROVALS__ALLOW_SELF", "false")]),
        )
        .unwrap();
        assert!(!off.approvals.allow_self);
        for (var, value, key) in [
            ("GANTRY__LOCKS__LEASE_MS", "99999999", "locks.lease_ms"),
            (
                "GANTRY__DISPATCHER__SWEEP_INTERVAL_SECS",
                "18446744073709551615",
                "dispatcher.sweep_interval_secs",
            ),
            (
                "GANTRY__DISPATCHER__RETRY_BACKOFF_MS",
                "60001",
                "dispatcher.retry_backoff_ms",
            ),
            (
                "GANTRY__AGENT__SHUTDOWN_GRACE_SECS",
                "604801",
                "agent.shutdown_grace_secs",
            ),
            (
                "GANTRY__AGENT__HEARTBEAT_SECS",
                "3601",
                "agent.heartbeat_secs",
            ),
            ("GANTRY__SMTP__TIMEOUT_SECS", "100000", "smtp.timeout_secs"),
            (
                "GANTRY__DISPATCHER__TASK_CAP",
                "4000000000",
                "dispatcher.task_cap",
            ),
            (
                "GANTRY__POSTGRES__MAX_CONNECTIONS",
                "1001",
                "postgres.max_connections",
            ),
        ] {
            let e = Settings::load_with_env(Some(&file), env(&[(var, value)])).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{var}={value}: {e}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempdir();
        let file = write(&dir, "");
        let cases = [
            ("GANTRY__HTTP__BIND", "not-an-address", "http.bind"),
            (
                "GANTRY__POSTGRES__MAX_CONNECTIONS",
                "many",
                "postgres.max_connections",
            ),
            ("GANTRY__AMQP__URL", "http://x", "amqp.url"),
            ("GANTRY__NAMESPACE", "Has.Dots", "namespace"),
        ];
        for (var, value, key) in cases {
            let err = Settings::load_with_env(Some(&file), env(&[(var, value)])).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{var}={value}: {err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let dir = tempdir();
        let file = write(&dir, "[amqp]\nurll = \"amqp://x\"\n");
        let err = Settings::load_with_env(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("amqp.urll"), "{err}");
        let err =
            Settings::load_with_env(Some(&file), env(&[("GANTRY__SECRETS__KEY", "c2hvcnQ=")]))
                .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("amqp.urll"),
            "the first problem wins: {err}"
        );
        let file = write(&dir, "");
        let err =
            Settings::load_with_env(Some(&file), env(&[("GANTRY__SECRETS__KEY", "c2hvcnQ=")]))
                .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("secrets.key"), "{err}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Settings::load_with_env(Some(Path::new("/nonexistent/gantry.toml")), env(&[]))
            .unwrap_err();
        assert!(err.message.contains("does not exist"));
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("gantry.toml");
        std::fs::write(&path, body).unwrap();
        path
    }
}
