//! # Messages on the broker
//!
//! Every body is JSON with `"v": 1` and a `"type"` tag. Unknown fields are ignored; an unknown
//! `v` or `type`, or a body that does not parse, is a [`WireError`], and the consumer
//! dead-letters the message (reject without requeue) rather than crash or loop.
//!
//! | message | queue | from → to |
//! | --- | --- | --- |
//! | [`Job`] | `<ns>.pool.<slug>`, `<ns>.worker.<id>`, `<ns>.server` | dispatcher → agent |
//! | [`Event`] | `<ns>.results` | agent → dispatcher |
//! | [`Heartbeat`] | `<ns>.heartbeats` | agent → dispatcher |
//! | [`Control`] | `<ns>.control.<id>` | dispatcher → one agent |
//!
//! A job is a ticket, not a lease: the agent claims it over the API before running it, so a
//! delivered job never carries anything that must not be seen twice, nor any sensitive value.

use crate::ids::{JobId, StepRunId, TaskId, WorkerId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The only wire version this build speaks.
pub const WIRE_VERSION: u32 = 1;

/// Why a message body was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not valid JSON or missing fields: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported wire version {0:?} (this build speaks {WIRE_VERSION})")]
    Version(Option<u32>),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("inconsistent message: {0}")]
    Invalid(&'static str),
}

#[derive(Deserialize)]
struct Head {
    v: Option<u32>,
    #[serde(rename = "type")]
    kind: String,
}

fn head(bytes: &[u8]) -> Result<Head, WireError> {
    let head: Head = serde_json::from_slice(bytes)?;
    if head.v != Some(WIRE_VERSION) {
        return Err(WireError::Version(head.v));
    }
    Ok(head)
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        v: WIRE_VERSION,
        body,
    })
    .expect("wire messages always serialize")
}

/// The interpreter a script step runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Syntax {
    #[default]
    Bash,
    Sh,
    Python3,
}

impl Syntax {
    pub fn as_str(self) -> &'static str {
        match self {
            Syntax::Bash => "bash",
            Syntax::Sh => "sh",
            Syntax::Python3 => "python3",
        }
    }
}

/// One step attempt to run, published once the dispatcher decided it may start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub job_id: JobId,
    pub task_id: TaskId,
    pub task_name: String,
    pub step_run_id: StepRunId,
    pub step_name: String,
    pub attempt: u32,
    pub syntax: Syntax,
    /// The script as written; `#{...}` references are resolved by the agent after its claim,
    /// when it also has the sensitive values.
    pub script: String,
    /// Every non-sensitive variable the script may reference, including earlier steps'
    /// outputs (`Steps.<step>.Output.<name>`) and `Gantry.*` values known at publication.
    pub variables: BTreeMap<String, String>,
    /// Names of sensitive variables, whose values come with the claim.
    #[serde(default)]
    pub sensitive_names: Vec<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL when the step is stopped; the agent uses
    /// `process::DEFAULT_CANCEL_GRACE_SECS` when absent and caps it at
    /// `process::MAX_CANCEL_GRACE_SECS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_grace_secs: Option<u64>,
    /// The pool's display name, for `#{Gantry.WorkerPool.Name}` and logs.
    #[serde(default)]
    pub pool_name: Option<String>,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub mutex: Option<String>,
    /// The step's `artifacts` globs, evaluated in its working directory after the script.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum JobRef<'a> {
    Job(&'a Job),
}

impl Job {
    pub fn encode(&self) -> Vec<u8> {
        encode(&JobRef::Job(self))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let head = head(bytes)?;
        match head.kind.as_str() {
            "Job" => Ok(serde_json::from_slice(bytes)?),
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}

/// Which attempt an event is about, and the worker that says it sent it. With per-worker
/// broker users the dispatcher does not believe `worker_id`: it attributes the event to the
/// broker user that published it (the message's validated `user_id`) and keeps an event whose
/// body names another worker apart as stale. Only in development mode (one shared broker user)
/// is `worker_id` all it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub step_run_id: StepRunId,
    pub attempt: u32,
    pub job_id: JobId,
    pub worker_id: WorkerId,
}

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// Written by Gantry itself (agent or dispatcher), not by the script.
    Gantry,
}

impl Stream {
    pub fn as_i16(self) -> i16 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
            Stream::Gantry => 0,
        }
    }
    pub fn from_i16(v: i16) -> Self {
        match v {
            1 => Stream::Stdout,
            2 => Stream::Stderr,
            _ => Stream::Gantry,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Gantry => "gantry",
        }
    }
}

/// One line of output, already masked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub ts: DateTime<Utc>,
    pub stream: Stream,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepStarted {
    #[serde(flatten)]
    pub origin: Origin,
    /// The agent's clock when the script's process was spawned.
    pub started_at: DateTime<Utc>,
}

/// The claimed step waits on its agent before it can start (an exclusive step waiting for
/// the steps running there, or a step waiting for an exclusive one to finish).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepWaiting {
    #[serde(flatten)]
    pub origin: Origin,
    pub waiting_for: String,
}

/// Consecutive lines of one attempt: `lines[i]` has sequence number `first_seq + i`.
/// Sequence numbers start at 0 per attempt and have no gaps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogBatch {
    #[serde(flatten)]
    pub origin: Origin,
    pub first_seq: u64,
    pub lines: Vec<LogLine>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputVariable {
    #[serde(flatten)]
    pub origin: Origin,
    pub name: String,
    /// Absent for sensitive outputs, whose values travel over the API instead.
    pub value: Option<String>,
    #[serde(default)]
    pub sensitive: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    #[serde(flatten)]
    pub origin: Origin,
    pub percentage: u8,
    pub message: String,
}

/// Raw bytes per [`ArtifactChunk`], at most: 87 KiB of base64 in a message, far below any
/// frame or message limit, and small enough that the dispatcher's prefetched deliveries
/// stay a few tens of MiB whatever the artifact's size.
pub const ARTIFACT_CHUNK_BYTES: usize = 64 * 1024;

/// One piece of an artifact's content. Chunks of one artifact are numbered by `seq` from 0
/// without gaps; `artifact` numbers the attempt's artifacts from 0 in upload order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArtifactChunk {
    #[serde(flatten)]
    pub origin: Origin,
    pub artifact: u32,
    /// The artifact's name (the same in every chunk).
    pub name: String,
    pub seq: u64,
    /// Where `data` starts in the file.
    pub offset: u64,
    /// The bytes, base64 in the JSON body.
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

/// What `StepFinished` says of each artifact it uploaded in full: the dispatcher checks the
/// stored bytes against it before the attempt becomes final.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSum {
    pub artifact: u32,
    pub name: String,
    pub size: u64,
    pub chunks: u64,
    /// Lowercase hex.
    pub sha256: String,
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::borrow::Cow;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: Cow<'de, str> = Deserialize::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// How an attempt ended, as its agent saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Success,
    Failed,
    TimedOut,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "Success",
            Outcome::Failed => "Failed",
            Outcome::TimedOut => "TimedOut",
            Outcome::Cancelled => "Cancelled",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepFinished {
    #[serde(flatten)]
    pub origin: Origin,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// Lines sent for this attempt; the attempt is final only once all are stored.
    pub line_count: u64,
    /// Why it failed, when Gantry knows better than the exit code (spawn error, timeout...).
    #[serde(default)]
    pub error: Option<String>,
    pub finished_at: DateTime<Utc>,
    /// Every artifact whose chunks were all sent; the attempt is final only once each is
    /// stored (and checked against its sha256).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactSum>,
    /// The attempt's last log lines, carried here rather than in a `LogBatch` of their own
    /// (one message, and one transaction, for a step's end): seq `line_count - lines.len()`
    /// onwards. More lines than `line_count` makes the event malformed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LogLine>,
}

impl StepFinished {
    /// The seq of the first of [`StepFinished::lines`].
    pub fn first_seq(&self) -> u64 {
        self.line_count.saturating_sub(self.lines.len() as u64)
    }
}

/// Everything an agent reports about an attempt, on `<ns>.results`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type")]
pub enum Event {
    StepWaiting(StepWaiting),
    StepStarted(StepStarted),
    LogBatch(LogBatch),
    OutputVariable(OutputVariable),
    Progress(Progress),
    ArtifactChunk(ArtifactChunk),
    StepFinished(StepFinished),
}

impl Event {
    pub fn origin(&self) -> &Origin {
        match self {
            Event::StepWaiting(e) => &e.origin,
            Event::StepStarted(e) => &e.origin,
            Event::LogBatch(e) => &e.origin,
            Event::OutputVariable(e) => &e.origin,
            Event::Progress(e) => &e.origin,
            Event::ArtifactChunk(e) => &e.origin,
            Event::StepFinished(e) => &e.origin,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::StepWaiting(_) => "StepWaiting",
            Event::StepStarted(_) => "StepStarted",
            Event::LogBatch(_) => "LogBatch",
            Event::OutputVariable(_) => "OutputVariable",
            Event::Progress(_) => "Progress",
            Event::ArtifactChunk(_) => "ArtifactChunk",
            Event::StepFinished(_) => "StepFinished",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Parse the head first, then the one variant, so a large log batch is read once without
    /// serde's buffering of internally tagged enums.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let head = head(bytes)?;
        Ok(match head.kind.as_str() {
            "StepWaiting" => Event::StepWaiting(serde_json::from_slice(bytes)?),
            "StepStarted" => Event::StepStarted(serde_json::from_slice(bytes)?),
            "LogBatch" => Event::LogBatch(serde_json::from_slice(bytes)?),
            "OutputVariable" => Event::OutputVariable(serde_json::from_slice(bytes)?),
            "Progress" => Event::Progress(serde_json::from_slice(bytes)?),
            "ArtifactChunk" => Event::ArtifactChunk(serde_json::from_slice(bytes)?),
            "StepFinished" => {
                let f: StepFinished = serde_json::from_slice(bytes)?;
                if f.lines.len() as u64 > f.line_count {
                    return Err(WireError::Invalid(
                        "StepFinished carries more lines than its line_count",
                    ));
                }
                Event::StepFinished(f)
            }
            other => return Err(WireError::UnknownType(other.to_owned())),
        })
    }
}

/// An attempt an agent is working on, as reported in its heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningAttempt {
    pub step_run_id: StepRunId,
    pub attempt: u32,
}

/// Sent by each agent on `<ns>.heartbeats`, on a channel of its own, never behind logs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: WorkerId,
    pub sent_at: DateTime<Utc>,
    pub running: Vec<RunningAttempt>,
    pub max_concurrent_steps: u32,
    pub free_slots: u32,
    pub disk_free_bytes: Option<u64>,
    pub version: String,
    /// The agent's own verdict from its health checks: `Healthy`, `HasWarnings` or
    /// `Unhealthy` (absent from older agents: `Healthy`).
    #[serde(default)]
    pub health: Option<String>,
    #[serde(default)]
    pub health_reason: Option<String>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum HeartbeatRef<'a> {
    Heartbeat(&'a Heartbeat),
}

impl Heartbeat {
    pub fn encode(&self) -> Vec<u8> {
        encode(&HeartbeatRef::Heartbeat(self))
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let head = head(bytes)?;
        match head.kind.as_str() {
            "Heartbeat" => Ok(serde_json::from_slice(bytes)?),
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}

/// Instructions for one agent, on its control queue. Only the dispatcher can publish them;
/// none carries configuration, which agents read over the API (`GET /api/agent/config`), so
/// that no message body can tell an agent what to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Control {
    /// Stop running this attempt (cancel): SIGTERM its process group, SIGKILL after a grace.
    CancelAttempt {
        step_run_id: StepRunId,
        attempt: u32,
        reason: String,
    },
    /// Something in the worker's configuration changed (its pools, `max_concurrent_steps`,
    /// enabled, the machine policy): read it again from `GET /api/agent/config`.
    Reconfigure,
}

/// The sha256 of a message body, lowercase hex: what the dispatcher records for each job it
/// publishes, and what the claim compares with the body the agent received.
pub fn body_sha256(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(body))
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        head(bytes)?;
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests;
