//! # Log storage
//!
//! Lines from agents arrive in batches numbered by `seq` per attempt. A batch is applied only
//! where it continues the attempt's gapless prefix (`attempts.lines_stored`): the part already
//! stored is skipped (a redelivery changes nothing), and a batch that arrives ahead of a gap
//! waits in `log_lines_pending` until the gap closes. Each line made visible gets the next
//! task-wide position `pos` under the row lock of `task_log_positions`, in the same
//! transaction that inserts it, so positions become visible in order: a reader that sees
//! position n has seen every position below it. The API's cursor is that position.
//!
//! Lines Gantry writes itself (a skipped step, a retry, the task's end) take positions the
//! same way, with no `seq`.

use chrono::{DateTime, Utc};
use gantry_shared::api::LogEntry;
use gantry_shared::ids::{StepRunId, TaskId};
use gantry_shared::wire::{LogLine, Stream};
use sqlx::{PgConnection, PgPool};
use std::collections::HashMap;
use uuid::Uuid;

/// Postgres NOTIFY channel: a task's log grew (payload: the task id).
pub const LOG_CHANNEL: &str = "gantry_log";
/// Postgres NOTIFY channel: a task changed state (payload: the task id).
pub const TASK_CHANNEL: &str = "gantry_task";

/// `text` as PostgreSQL can store it: every U+0000 (which a `text` column refuses) becomes
/// U+FFFD. Applied to all text the dispatcher stores from agents' events and heartbeats.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

/// The length in bytes of [`storable`]`(text)`, without building it (a U+0000 becomes the
/// three bytes of U+FFFD): what a line costs the task's log quota.
pub fn storable_len(text: &str) -> u64 {
    let nuls = text.bytes().filter(|b| *b == 0).count() as u64;
    (text.len() as u64).saturating_add(nuls.saturating_mul(2))
}

/// [`storable`] for an optional text.
pub fn storable_opt(text: Option<&str>) -> Option<std::borrow::Cow<'_, str>> {
    text.map(storable)
}

/// Tell the followers of `channel` that `task` changed.
pub async fn notify(conn: &mut PgConnection, channel: &str, task: TaskId) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(task.0.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Append a line written by Gantry itself: its position reserved, the line stored and its
/// followers told, in one statement.
pub async fn append_system(
    conn: &mut PgConnection,
    task: TaskId,
    step: Option<(StepRunId, u32)>,
    text: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "WITH r AS (UPDATE task_log_positions SET last_pos = last_pos + 1 WHERE task_id = $1
                    RETURNING last_pos),
              i AS (INSERT INTO log_lines (task_id, pos, step_run_id, attempt, seq, ts, stream, text)
                    SELECT $1, r.last_pos, $2, $3, NULL, now(), 0, $4 FROM r)
         SELECT r.last_pos, pg_notify($5, $1::text) FROM r",
    )
    .bind(task.0)
    .bind(step.map(|s| s.0.0))
    .bind(step.map(|s| s.1 as i32))
    .bind(text)
    .bind(LOG_CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(())
}

/// One line to store: its seq and content.
pub struct SeqLine<'a> {
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub stream: i16,
    pub text: std::borrow::Cow<'a, str>,
}

/// A batch of one attempt's lines, as [`apply_batch`] stores it.
pub struct Batch<'a> {
    pub task: TaskId,
    pub step_run: StepRunId,
    pub attempt: u32,
    /// The attempt's `lines_stored`, its row locked by the caller.
    pub lines_stored: i64,
    /// The batch ends at the attempt's announced line count (it came with `StepFinished`):
    /// no parked line can follow it, so `log_lines_pending` is not looked at, and the
    /// attempt's end writes its `lines_stored`.
    pub last: bool,
    pub first_seq: i64,
    pub lines: &'a [LogLine],
    /// The bytes it adds to the task's log ([`crate::quotas::new_log_bytes`]) and the task's
    /// `limits.task_log_bytes`.
    pub charge: (u64, u64),
}

/// What [`apply_batch`] came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Stored, already there, or parked beyond a gap: the attempt's `lines_stored` now.
    Stored(i64),
    /// The batch would pass the task's log quota: nothing was stored or counted.
    OverQuota,
}

/// Apply a batch to an attempt whose row the caller has locked: charged against the task's
/// log quota, then stored where it continues the prefix (with the parked lines it joins) or
/// parked beyond a gap. Where it continues the prefix, one statement charges the quota,
/// reserves the positions, inserts the lines, writes the attempt's `lines_stored` (unless
/// `last`) and tells the log's followers.
pub async fn apply_batch(conn: &mut PgConnection, b: Batch<'_>) -> sqlx::Result<Applied> {
    let Batch {
        task,
        step_run,
        attempt,
        lines_stored,
        last,
        first_seq,
        lines,
        charge: (bytes, limit),
    } = b;
    let end = first_seq.saturating_add(i64::try_from(lines.len()).unwrap_or(i64::MAX));
    if end <= lines_stored || lines.is_empty() || first_seq < 0 {
        return Ok(Applied::Stored(lines_stored));
    }
    if bytes > limit {
        return Ok(Applied::OverQuota);
    }
    if first_seq > lines_stored {
        // Ahead of a gap: parked until the gap closes, and only the lines not parked yet
        // charged (a redelivered batch costs nothing).
        let parked = park_charged(
            conn,
            (task, step_run, attempt),
            &numbered(lines, first_seq, 0),
            limit,
        )
        .await?;
        return Ok(if parked {
            Applied::Stored(lines_stored)
        } else {
            Applied::OverQuota
        });
    }
    let skip = usize::try_from(lines_stored.saturating_sub(first_seq)).unwrap_or(usize::MAX);
    let mut fresh = numbered(lines, first_seq, skip);
    let mut bytes = bytes;
    // Lines parked earlier: those this batch holds too (charged when they were parked, so
    // not again) are dropped, those that now continue the prefix join it.
    let parked: Vec<(i64, DateTime<Utc>, i16, String)> = if last {
        Vec::new()
    } else {
        sqlx::query_as(
            "DELETE FROM log_lines_pending WHERE step_run_id = $1 AND attempt = $2 AND seq >= $3
         RETURNING seq, ts, stream, text",
        )
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(lines_stored)
        .fetch_all(&mut *conn)
        .await?
    };
    if !parked.is_empty() {
        let mut parked = parked;
        parked.sort_by_key(|p| p.0);
        let mut next = end;
        let mut keep = Vec::new();
        for (seq, ts, stream, text) in parked {
            if seq < end {
                bytes = bytes.saturating_sub(text.len() as u64);
                continue;
            }
            let line = SeqLine {
                seq,
                ts,
                stream,
                text: std::borrow::Cow::Owned(text),
            };
            if seq == next {
                fresh.push(line);
                next = next.saturating_add(1);
            } else {
                keep.push(line);
            }
        }
        // Put back what still lies beyond a gap.
        park(conn, step_run, attempt, &keep).await?;
    }
    let n = fresh.len() as i64;
    let stored = lines_stored.saturating_add(n);
    let (seqs, ts, streams, texts) = columns(&fresh);
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    // One statement: the quota charged and the positions reserved on the task's row (no
    // row when the quota would be passed: nothing else happens then), the lines stored at
    // them in seq order, the attempt's `lines_stored` (its row locked already, so the lock
    // order holds) and the log's followers told.
    static SQL: &str =
        "WITH r AS (UPDATE task_log_positions SET last_pos = last_pos + $8, log_bytes = log_bytes + $10
                    WHERE task_id = $1 AND log_bytes <= $11 - $10
                    RETURNING last_pos - $8 AS base),
              i AS (INSERT INTO log_lines (task_id, pos, step_run_id, attempt, seq, ts, stream, text)
                    SELECT $1, r.base + u.ord, $2, $3, u.seq, u.ts, u.stream, u.text
                    FROM r, unnest($4::bigint[], $5::timestamptz[], $6::smallint[], $7::text[])
                         WITH ORDINALITY AS u(seq, ts, stream, text, ord)),
              l AS (UPDATE attempts SET lines_stored = $12
                    WHERE step_run_id = $2 AND attempt = $3 AND NOT $13 AND EXISTS (SELECT 1 FROM r))
         SELECT r.base, pg_notify($9, $1::text) FROM r";
    let row = sqlx::query(SQL)
        .bind(task.0)
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(&seqs)
        .bind(&ts)
        .bind(&streams)
        .bind(&texts)
        .bind(n)
        .bind(LOG_CHANNEL)
        .bind(bytes)
        .bind(limit)
        .bind(stored)
        .bind(last)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(_) => Applied::Stored(stored),
        None => Applied::OverQuota,
    })
}

/// A batch's lines from index `skip` on, numbered from the batch's `first_seq`, their text
/// [`storable`].
fn numbered<'a>(lines: &'a [LogLine], first_seq: i64, skip: usize) -> Vec<SeqLine<'a>> {
    lines
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, l)| SeqLine {
            seq: first_seq.saturating_add(i as i64),
            ts: l.ts,
            stream: l.stream.as_i16(),
            text: storable(&l.text),
        })
        .collect()
}

/// Lines as the four arrays a statement unnests: seq, ts, stream, text.
type Columns<'a> = (Vec<i64>, Vec<DateTime<Utc>>, Vec<i16>, Vec<&'a str>);

/// `lines` as [`Columns`].
fn columns<'a>(lines: &'a [SeqLine<'_>]) -> Columns<'a> {
    (
        lines.iter().map(|l| l.seq).collect(),
        lines.iter().map(|l| l.ts).collect(),
        lines.iter().map(|l| l.stream).collect(),
        lines.iter().map(|l| l.text.as_ref()).collect(),
    )
}

/// Park lines that lie beyond a gap in `log_lines_pending` until it closes, charging the
/// task's log quota with the bytes of those not parked already (one statement; a line parked
/// already is left as it is). False, and nothing changed, when the charge would pass `limit`.
async fn park_charged(
    conn: &mut PgConnection,
    (task, step_run, attempt): (TaskId, StepRunId, u32),
    lines: &[SeqLine<'_>],
    limit: u64,
) -> sqlx::Result<bool> {
    let (seqs, ts, streams, texts) = columns(lines);
    static SQL: &str = "WITH u AS (SELECT u.* FROM unnest($3::bigint[], $4::timestamptz[], $5::smallint[], $6::text[])
                        AS u(seq, ts, stream, text)
                    WHERE NOT EXISTS (SELECT 1 FROM log_lines_pending p
                                      WHERE p.step_run_id = $1 AND p.attempt = $2 AND p.seq = u.seq)),
              c AS (SELECT coalesce(sum(octet_length(u.text)), 0)::bigint AS n FROM u),
              r AS (UPDATE task_log_positions SET log_bytes = log_bytes + c.n FROM c
                    WHERE task_id = $7 AND log_bytes <= $8 - c.n RETURNING 1),
              i AS (INSERT INTO log_lines_pending (step_run_id, attempt, seq, ts, stream, text)
                    SELECT $1, $2, u.seq, u.ts, u.stream, u.text FROM u, r ON CONFLICT DO NOTHING)
         SELECT count(*) FROM r";
    let charged: i64 = sqlx::query_scalar(SQL)
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(&seqs)
        .bind(&ts)
        .bind(&streams)
        .bind(&texts)
        .bind(task.0)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_one(&mut *conn)
        .await?;
    Ok(charged > 0)
}

/// Put lines that still lie beyond a gap back in `log_lines_pending`, uncharged (they were
/// charged when first parked; one statement; a line parked already is left as it is).
async fn park(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
    lines: &[SeqLine<'_>],
) -> sqlx::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let (seqs, ts, streams, texts) = columns(lines);
    sqlx::query(
        "INSERT INTO log_lines_pending (step_run_id, attempt, seq, ts, stream, text)
         SELECT $1, $2, u.seq, u.ts, u.stream, u.text
         FROM unnest($3::bigint[], $4::timestamptz[], $5::smallint[], $6::text[]) AS u(seq, ts, stream, text)
         ON CONFLICT DO NOTHING",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(&seqs)
    .bind(&ts)
    .bind(&streams)
    .bind(&texts)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Parse an API cursor (`""` or absent means the start).
pub fn parse_cursor(raw: Option<&str>) -> Result<i64, String> {
    match raw.map(str::trim) {
        None | Some("") => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 0)
            .ok_or_else(|| format!("{s:?} is not a log cursor returned by this API")),
    }
}

pub fn cursor(pos: i64) -> String {
    pos.to_string()
}

/// Read lines after a cursor, in order: at most `max_lines`, and no more once `max_bytes` of
/// text have been read (but always at least one line). Rows are streamed from PostgreSQL, so
/// memory is bounded by `max_bytes` plus one line, whatever the log holds. The flag is true
/// when the read stopped at either bound (more lines may follow).
pub async fn read(
    db: &PgPool,
    task: TaskId,
    after: i64,
    max_lines: i64,
    max_bytes: usize,
    step_names: &HashMap<Uuid, String>,
) -> sqlx::Result<(Vec<LogEntry>, bool)> {
    use futures::TryStreamExt;
    type Row = (
        i64,
        Option<Uuid>,
        Option<i32>,
        Option<i64>,
        DateTime<Utc>,
        i16,
        String,
    );
    let max_lines = max_lines.max(1);
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT pos, step_run_id, attempt, seq, ts, stream, text FROM log_lines
         WHERE task_id = $1 AND pos > $2 ORDER BY pos LIMIT $3",
    )
    .bind(task.0)
    .bind(after)
    .bind(max_lines)
    .fetch(db);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some((pos, step, attempt, seq, ts, stream, text)) = rows.try_next().await? {
        bytes = bytes.saturating_add(text.len());
        out.push(LogEntry {
            cursor: cursor(pos),
            step: step.and_then(|s| step_names.get(&s).cloned()),
            attempt: attempt.and_then(|a| u32::try_from(a).ok()),
            seq: seq.and_then(|s| u64::try_from(s).ok()),
            ts,
            stream: Stream::from_i16(stream).as_str().to_owned(),
            text,
        });
        if bytes >= max_bytes {
            return Ok((out, true));
        }
    }
    let more = out.len() as i64 >= max_lines;
    Ok((out, more))
}

/// Step run id → step name, for a task.
pub async fn step_names(db: &PgPool, task: TaskId) -> sqlx::Result<HashMap<Uuid, String>> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, name FROM step_runs WHERE task_id = $1")
            .bind(task.0)
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().collect())
}
