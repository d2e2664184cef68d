//! `limits`: per-task storage quotas.

use super::ConfigError;
use serde::Deserialize;

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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
