//! # Per-task quotas
//!
//! `limits.task_log_bytes` and `limits.artifact_bytes` bound what one task may store. Each is a
//! counter on the task's `task_log_positions` row, raised in the transaction that stores the
//! data (the result consumer's), by a compare-and-add that refuses to pass the limit: no sum
//! over stored rows, ever. Data that would pass the limit is not stored; the attempt that sent
//! it fails, saying which limit, and what it sends afterwards is stale (not stored either).

use crate::attempts::{self, Locked};
use crate::logs;
use crate::transitions::AttemptState;
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::wire::LogLine;
use sqlx::PgConnection;
use std::time::Duration;

/// Which quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    Log,
    Artifacts,
}

impl Quota {
    pub fn key(self) -> &'static str {
        match self {
            Quota::Log => "limits.task_log_bytes",
            Quota::Artifacts => "limits.artifact_bytes",
        }
    }

    fn column(self) -> &'static str {
        match self {
            Quota::Log => "log_bytes",
            Quota::Artifacts => "artifact_bytes",
        }
    }
}

/// Bytes of text, as stored ([`crate::logs::storable_len`]), of the lines of a batch that the
/// attempt has not stored yet (those from `lines_stored` on); a redelivered prefix costs
/// nothing.
pub fn new_log_bytes(first_seq: i64, lines_stored: i64, lines: &[LogLine]) -> u64 {
    let skip = lines_stored.saturating_sub(first_seq).max(0);
    let skip = usize::try_from(skip).unwrap_or(usize::MAX);
    lines.iter().skip(skip).fold(0u64, |n, l| {
        n.saturating_add(crate::logs::storable_len(&l.text))
    })
}

/// Add `bytes` to the task's counter if that stays within `limit`. False (and nothing
/// changed) when it would pass it.
pub async fn charge(
    conn: &mut PgConnection,
    task: TaskId,
    quota: Quota,
    bytes: u64,
    limit: u64,
) -> sqlx::Result<bool> {
    if bytes == 0 {
        return Ok(true);
    }
    if bytes > limit {
        return Ok(false);
    }
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let col = quota.column();
    let sql = format!(
        "UPDATE task_log_positions SET {col} = {col} + $2
         WHERE task_id = $1 AND {col} <= $3 - $2 RETURNING {col}"
    );
    let row: Option<i64> = sqlx::query_scalar(&sql)
        .bind(task.0)
        .bind(bytes)
        .bind(limit)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

/// End a live attempt that went past `quota`: a line in the task's log and the attempt
/// `Failed` with the reason (retried if it has retries left, like any failure).
pub async fn fail_attempt(
    conn: &mut PgConnection,
    locked: &Locked,
    step_run: StepRunId,
    attempt: u32,
    quota: Quota,
    limit: u64,
    retry_base: Duration,
) -> sqlx::Result<()> {
    let what = match quota {
        Quota::Log => "log",
        Quota::Artifacts => "artifacts",
    };
    let why = format!(
        "the task's {what} went past {} ({limit} bytes); what the step sent beyond it is not stored",
        quota.key()
    );
    tracing::info!(%step_run, attempt, limit = quota.key(), "an attempt went past a task quota");
    logs::append_system(
        conn,
        locked.task(),
        Some((step_run, attempt)),
        &format!("Step {} stopped: {why}", locked.step_name),
    )
    .await?;
    attempts::conclude(
        conn,
        locked,
        step_run,
        attempt,
        AttemptState::Failed,
        Some(why.as_str()),
        retry_base,
    )
    .await
}
