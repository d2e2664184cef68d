//! The sections of [`Settings`](super::Settings), one type each (the per-task storage quotas
//! are in `limits`).

use serde::Deserialize;
use std::path::PathBuf;

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
