//! Bodies of the REST API (`/api/...`), shared by the dispatcher that serves them and the
//! clients that call them (the `gantry` CLI, the agent, the tests). Only types live here; the
//! dispatcher owns the routes and the clients own their HTTP plumbing.

use crate::ids::{ApiKeyId, ArtifactId, ClaimId, JobId, PoolId, StepRunId, TaskId, WorkerId};
use crate::states::{AttemptState, StepState, TaskState, WorkerHealth};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Header carrying an API key.
pub const API_KEY_HEADER: &str = "X-Gantry-ApiKey";
/// Header carrying a worker's credential (given at registration).
pub const WORKER_TOKEN_HEADER: &str = "X-Gantry-Worker-Token";

/// Every 4xx (and the rare 5xx) body: `field` is always there, `null` when no single field
/// is at fault.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub field: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Permission {
    /// Pools, workers, settings, keys.
    ConfigureServer,
    /// Start, cancel, approve tasks.
    TaskCreate,
    /// Read tasks, logs, artifacts.
    TaskView,
}

impl Permission {
    pub const ALL: [Permission; 3] = [
        Permission::ConfigureServer,
        Permission::TaskCreate,
        Permission::TaskView,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ConfigureServer => "ConfigureServer",
            Permission::TaskCreate => "TaskCreate",
            Permission::TaskView => "TaskView",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok` when all three services answer, `degraded` otherwise.
    pub status: String,
    pub postgres: bool,
    pub rabbitmq: bool,
    pub redis: bool,
    pub version: String,
    /// True when every worker has a broker user of its own (`amqp.management_url` is set);
    /// false in development mode, where all agents share one.
    #[serde(default)]
    pub broker_users: bool,
    /// What makes this installation unsafe to expose (development mode, ...).
    #[serde(default)]
    pub warnings: Vec<String>,
}

// ---- pools ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCreate {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Make this the default pool (the previous default stops being it).
    #[serde(default)]
    pub is_default: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Only `true` is accepted: make this pool the default.
    pub is_default: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pool {
    pub id: PoolId,
    pub name: String,
    /// Fixed at creation; names the pool's queue `<ns>.pool.<slug>`.
    pub slug: String,
    pub description: String,
    pub is_default: bool,
    pub worker_count: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRef {
    pub id: PoolId,
    pub name: String,
    pub slug: String,
}

// ---- workers ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRegister {
    pub name: String,
    /// Pool names (or slugs, or ids). Empty: the default pool.
    #[serde(default)]
    pub pools: Vec<String>,
    #[serde(default)]
    pub max_concurrent_steps: Option<u32>,
    /// Replace a worker that has this name already.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerPatch {
    pub enabled: Option<bool>,
    pub max_concurrent_steps: Option<u32>,
    /// The worker's pools from now on (names, slugs or ids; at least one). Its broker user's
    /// permissions change at once, and its agent reconnects to consume the new set.
    pub pools: Option<Vec<String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub name: String,
    pub pools: Vec<PoolRef>,
    pub max_concurrent_steps: u32,
    pub enabled: bool,
    /// `Healthy`, `HasWarnings`, `Unhealthy` or `Unavailable`.
    pub health: WorkerHealth,
    pub health_reason: Option<String>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub version: Option<String>,
    pub running_steps: i64,
    pub created_at: DateTime<Utc>,
    /// A dispatcher node's built-in worker (in no pool; runs server steps).
    #[serde(default)]
    pub builtin: bool,
    /// The RabbitMQ user of this worker (none in development mode, where agents share one).
    #[serde(default)]
    pub broker_user: Option<String>,
}

/// The answer to a registration: the worker, and the credentials it authenticates with.
/// They are shown once; only their hashes are stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerRegistered {
    pub worker: Worker,
    pub token: String,
    pub namespace: String,
    /// The worker's own RabbitMQ user (absent in development mode).
    #[serde(default)]
    pub broker: Option<BrokerCredentials>,
}

/// A worker's RabbitMQ user: it may consume only its pools' queues, its own queue and its own
/// control messages, and publish only events and heartbeats.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BrokerCredentials {
    pub user: String,
    pub password: String,
}

/// What a running agent asks the dispatcher at start (with its worker credential).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentConfig {
    pub worker_id: WorkerId,
    pub name: String,
    pub namespace: String,
    pub pools: Vec<PoolRef>,
    pub max_concurrent_steps: u32,
    pub enabled: bool,
    /// The machine policy in force (older dispatchers send none: the defaults apply).
    #[serde(default)]
    pub policy: MachinePolicy,
    /// The broker user this agent must log in as (none in development mode).
    #[serde(default)]
    pub broker_user: Option<String>,
}

// ---- settings ----

/// How agents report and are judged: the machine policy, part of `/api/settings`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachinePolicy {
    /// Seconds between an agent's heartbeats (and health checks).
    pub heartbeat_interval_secs: u32,
    /// A worker with no heartbeat for this long is `Unavailable`; one running steps is lost.
    pub unavailable_after_secs: u32,
    /// A bash script each agent runs on every heartbeat interval. It reports with
    /// `echo_warning MSG` (`HasWarnings`), `echo_error MSG` or `fail_healthcheck MSG`
    /// (`Unhealthy`), or a non-zero exit code (`Unhealthy`).
    pub health_check_script: Option<String>,
    /// The built-in check: less free disk than this (MiB) in the agent's work directory is a
    /// warning. 0 turns it off.
    pub min_free_disk_mb: u64,
}

impl Default for MachinePolicy {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: 10,
            unavailable_after_secs: 30,
            health_check_script: None,
            min_free_disk_mb: 5 * 1024,
        }
    }
}

/// `GET /api/settings`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Whether each dispatcher node runs a built-in worker (steps with `location =
    /// "server"`, and the default pool's steps while it has no registered worker).
    pub builtin_worker_enabled: bool,
    pub machine_policy: MachinePolicy,
    /// How long a step waits for its pool to have a healthy worker before it fails.
    pub no_healthy_worker_timeout_secs: u32,
    pub updated_at: Option<DateTime<Utc>>,
}

/// `PUT /api/settings`: every field is optional; what is left out keeps its value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdate {
    pub builtin_worker_enabled: Option<bool>,
    pub machine_policy: Option<MachinePolicyUpdate>,
    pub no_healthy_worker_timeout_secs: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachinePolicyUpdate {
    pub heartbeat_interval_secs: Option<u32>,
    pub unavailable_after_secs: Option<u32>,
    /// An empty string removes the script.
    pub health_check_script: Option<String>,
    pub min_free_disk_mb: Option<u64>,
}

/// One change of a worker's health, with its reason (`GET /api/workers/{id}/health`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthEvent {
    pub at: DateTime<Utc>,
    pub health: WorkerHealth,
    pub reason: Option<String>,
}

// ---- keys ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCreate {
    pub name: String,
    pub permissions: Vec<Permission>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub name: String,
    /// The first characters, to recognise a key without revealing it.
    pub prefix: String,
    pub permissions: Vec<Permission>,
    pub created_at: DateTime<Utc>,
}

/// Returned once, at creation: the only time the key itself is shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    #[serde(flatten)]
    pub key_info: ApiKey,
    pub key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyDelete {
    pub id: ApiKeyId,
}

// ---- tasks ----

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskCreated {
    pub id: TaskId,
    pub name: String,
    pub state: TaskState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskSummary {
    pub id: TaskId,
    pub name: String,
    pub state: TaskState,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    #[serde(flatten)]
    pub summary: TaskSummary,
    pub steps: Vec<StepRun>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRun {
    pub id: StepRunId,
    pub index: u32,
    pub name: String,
    pub state: StepState,
    pub pool: Option<String>,
    pub waiting_for: Option<String>,
    /// Why the step was skipped, or failed without an attempt.
    pub reason: Option<String>,
    /// The current attempt, 0 before the first.
    pub attempt: u32,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Output variables of the latest attempt; sensitive ones show as `********`.
    pub outputs: BTreeMap<String, String>,
    pub attempts: Vec<Attempt>,
    /// A manual step's request and decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

/// A manual step's request for approval and who decided it, when, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Approval {
    pub instructions: String,
    pub requested_at: Option<DateTime<Utc>>,
    /// `Approved` or `Rejected`; none while waiting.
    pub decision: Option<String>,
    /// The name of the API key that decided.
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub note: Option<String>,
}

/// The body of `POST /api/tasks/{id}/steps/{name}/approve` (or `reject`); it may be empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub job_id: JobId,
    pub state: AttemptState,
    pub worker_id: Option<WorkerId>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub line_count: i64,
}

/// One page of a task's log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogPage {
    pub lines: Vec<LogEntry>,
    /// Pass as `after` to read on from here.
    pub next: String,
    /// True once the task has ended and every line has been read.
    pub complete: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    /// Opaque position of this line; `after=<cursor>` resumes after it.
    pub cursor: String,
    pub step: Option<String>,
    pub attempt: Option<u32>,
    pub seq: Option<u64>,
    pub ts: DateTime<Utc>,
    pub stream: String,
    pub text: String,
}

// ---- artifacts ----

/// Header of `GET /api/artifacts/{id}` carrying the artifact's sha256 (lowercase hex).
pub const ARTIFACT_SHA256_HEADER: &str = "X-Gantry-Sha256";

/// One artifact of a task (`GET /api/tasks/{id}/artifacts`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Artifact {
    pub id: ArtifactId,
    pub task_id: TaskId,
    pub step_run_id: StepRunId,
    pub step: String,
    pub attempt: u32,
    pub name: String,
    /// `Receiving` (chunks still arriving), `Stored` (complete, its sha256 checked; the only
    /// state that can be downloaded), `Corrupt` (the stored bytes do not match the sha256
    /// the agent computed), `Incomplete` (its attempt ended before every chunk arrived).
    pub state: String,
    /// Bytes: as announced by the agent, or received so far while that is not known.
    pub size: u64,
    /// As computed by the agent while reading the file; absent until announced.
    pub sha256: Option<String>,
    pub created_at: DateTime<Utc>,
    pub stored_at: Option<DateTime<Utc>>,
}

/// The SSE event sent when a followed task ends (event name `end`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEnd {
    pub task_id: TaskId,
    pub state: TaskState,
}

// ---- claims ----

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub claim_id: ClaimId,
    /// The sha256 (hex) of the job body as the agent received it: a body changed on its way
    /// is refused and nothing runs.
    #[serde(default)]
    pub job_sha256: Option<String>,
}

/// A granted claim: the attempt is the agent's to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClaimGrant {
    pub step_run_id: StepRunId,
    pub attempt: u32,
    pub worker_name: String,
    /// Values of the job's `sensitive_names`; they never travel through the broker.
    pub sensitive_variables: BTreeMap<String, String>,
    /// For a step with a mutex: the lease the agent now holds and must renew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutex: Option<MutexGrant>,
    /// The sha256 of the job body the dispatcher published for this attempt; the agent runs
    /// nothing unless it is the body it received.
    #[serde(default)]
    pub job_sha256: Option<String>,
}

/// `GET /api/jobs/{job_id}/log`: how many of the attempt's log lines the dispatcher has
/// stored. The agent paces a step's output by it (see the agent's `window` module).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobLog {
    pub lines_stored: u64,
}

/// `POST /api/jobs/{job_id}/lease`: the dispatcher renewed the attempt's mutex lease in Redis.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRenewed {
    /// The fencing token now in force (it grows if the lease was re-claimed after Redis lost
    /// its data).
    pub token: u64,
    pub lease_ms: u64,
}

/// A mutex lease handed to the agent with its claim.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MutexGrant {
    pub name: String,
    pub token: u64,
    pub lease_ms: u64,
}

/// A sensitive output variable, sent by the agent over the API (`POST /api/jobs/{id}/outputs`)
/// rather than through the broker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitiveOutput {
    pub name: String,
    pub value: String,
}
