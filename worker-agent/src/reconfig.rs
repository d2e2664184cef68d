//! # The agent's configuration, from the dispatcher
//!
//! An agent is told nothing through the broker but "cancel" and "read your configuration
//! again": its pools (so the queues it consumes), `max_concurrent_steps`, whether it is
//! enabled and the machine policy (with its health-check script) come from
//! `GET /api/agent/config`, read at start, on every new broker connection, on a
//! `Reconfigure` control message and every [`CONFIG_REFRESH`].

use crate::api::{Api, ApiError};
use crate::slots::Slots;
use anyhow::bail;
use gantry_shared::api::{AgentConfig, MachinePolicy};
use gantry_shared::topology::Topology;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the agent reads its configuration again, whatever else happens.
pub const CONFIG_REFRESH: Duration = Duration::from_secs(60);

/// The queues an agent consumes, in priority order: its own, its pools', then `extra`.
pub fn queues_of(topology: &Topology, config: &AgentConfig, extra: &[String]) -> Vec<String> {
    let mut queues = vec![topology.worker_queue(config.worker_id)];
    queues.extend(config.pools.iter().map(|p| topology.pool_queue(&p.slug)));
    queues.extend(extra.iter().cloned());
    queues
}

/// What applies a configuration read from the dispatcher.
#[derive(Clone)]
pub struct Reconfig {
    pub api: Api,
    pub topology: Topology,
    pub extra: Vec<String>,
    pub slots: Arc<Slots>,
    pub policy: Arc<tokio::sync::watch::Sender<MachinePolicy>>,
    pub queues: Arc<tokio::sync::watch::Sender<Vec<String>>>,
    pub fatal: CancellationToken,
}

impl Reconfig {
    /// Read the configuration once and apply what changed. A refused credential stops the
    /// agent; an unreachable dispatcher keeps the configuration in force.
    pub async fn refresh(&self) {
        match tokio::time::timeout(Duration::from_secs(10), self.api.agent_config()).await {
            Ok(Ok(c)) => self.apply(&c),
            Ok(Err(ApiError::Unauthorized(m))) => {
                tracing::error!(message = %m, "the dispatcher refused this agent's credential");
                self.fatal.cancel();
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the configuration; keeping it"),
            Err(_) => tracing::debug!("reading the configuration timed out; keeping it"),
        }
    }

    fn apply(&self, c: &AgentConfig) {
        if self.slots.max() != c.max_concurrent_steps {
            self.slots.set_max(c.max_concurrent_steps);
        }
        if self.slots.enabled() != c.enabled {
            self.slots.set_enabled(c.enabled);
        }
        self.policy.send_if_modified(|p| {
            let changed = *p != c.policy;
            if changed {
                tracing::info!(policy = ?c.policy, "machine policy changed");
                *p = c.policy.clone();
            }
            changed
        });
        let queues = queues_of(&self.topology, c, &self.extra);
        self.queues.send_if_modified(|q| {
            let changed = *q != queues;
            if changed {
                tracing::info!(pools = ?c.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), "this worker's pools changed");
                *q = queues.clone();
            }
            changed
        });
    }
}

/// Read the configuration again on `Reconfigure` and every [`CONFIG_REFRESH`].
pub async fn refresh_config(
    reconfig: Reconfig,
    nudge: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(CONFIG_REFRESH) => {}
            _ = cancel.cancelled() => return,
        }
        reconfig.refresh().await;
    }
}

pub async fn fetch_config(api: &Api, server: &str) -> anyhow::Result<AgentConfig> {
    let mut delay = Duration::from_millis(200);
    loop {
        match api.agent_config().await {
            Ok(c) => return Ok(c),
            Err(ApiError::Unauthorized(m)) => {
                bail!(
                    "the dispatcher at {server} refused this agent's credential ({m}); register it again"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the dispatcher at {server}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
