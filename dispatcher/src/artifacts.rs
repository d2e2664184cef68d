//! # Artifacts: storing, checking and reading uploaded files
//!
//! An agent sends each artifact as [`ArtifactChunk`] events (numbered by `seq` from 0), then
//! lists every artifact it sent in full in `StepFinished`: name, size, chunk count and the
//! sha256 it computed while reading the file. The result consumer stores each chunk in its
//! own row, keyed by (artifact, seq), so a redelivered chunk changes nothing, and counts what
//! it stored. Once an artifact is announced and all its chunks are stored, its bytes are read
//! back a page at a time, hashed, and compared with the agent's sum: `Stored` or `Corrupt`.
//! The attempt becomes final only once none of its artifacts is still `Receiving`
//! ([`pending`]); a corrupt artifact fails an otherwise successful attempt.
//!
//! Everything here runs inside the result consumer's transaction, with the attempt's rows
//! locked by [`crate::attempts::lock`], so counters need no further locking. Memory never
//! depends on an artifact's size: one chunk at a time in, [`PAGE`] chunks at a time out.

use crate::logs;
use crate::transitions::{self, ArtifactState, AttemptState, Variants as _};
use futures::Stream;
use gantry_shared::ids::{ArtifactId, StepRunId, TaskId};
use gantry_shared::wire::{ArtifactChunk, ArtifactSum};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Chunks read per query when checking or serving an artifact (1 MiB at 64 KiB a chunk).
pub const PAGE: i64 = 16;

/// What [`store_chunk`] did with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Stored now.
    New,
    /// Stored before, or dropped (an artifact no longer receiving, or not announced).
    Old,
    /// Not stored: it would take the task past `limits.artifact_bytes` (`limit`).
    OverQuota,
}

/// Store one chunk of a live attempt. `announced` is true once the attempt's `StepFinished`
/// is stored: chunks of artifacts it did not list are dropped then. A new chunk is counted
/// against the task's artifact quota `limit` first (see [`crate::quotas`]).
pub async fn store_chunk(
    conn: &mut PgConnection,
    task: TaskId,
    chunk: &ArtifactChunk,
    announced: bool,
    limit: u64,
) -> sqlx::Result<Chunk> {
    let o = &chunk.origin;
    if !announced {
        sqlx::query(
            "INSERT INTO artifacts (id, task_id, step_run_id, attempt, idx, name)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (step_run_id, attempt, idx) DO NOTHING",
        )
        .bind(ArtifactId::new().0)
        .bind(task.0)
        .bind(o.step_run_id.0)
        .bind(o.attempt as i32)
        .bind(chunk.artifact as i32)
        .bind(&chunk.name)
        .execute(&mut *conn)
        .await?;
    }
    let row: Option<(Uuid, ArtifactState)> = sqlx::query_as(
        "SELECT id, state FROM artifacts WHERE step_run_id = $1 AND attempt = $2 AND idx = $3",
    )
    .bind(o.step_run_id.0)
    .bind(o.attempt as i32)
    .bind(chunk.artifact as i32)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, state)) = row else {
        return Ok(Chunk::Old);
    };
    if state != ArtifactState::Receiving {
        return Ok(Chunk::Old);
    }
    let known: Option<i64> = sqlx::query_scalar(
        "SELECT 1::bigint FROM artifact_chunks WHERE artifact_id = $1 AND seq = $2",
    )
    .bind(id)
    .bind(chunk.seq as i64)
    .fetch_optional(&mut *conn)
    .await?;
    if known.is_some() {
        return Ok(Chunk::Old);
    }
    let bytes = chunk.data.len() as u64;
    if !crate::quotas::charge(conn, task, crate::quotas::Quota::Artifacts, bytes, limit).await? {
        return Ok(Chunk::OverQuota);
    }
    let inserted = sqlx::query(
        "INSERT INTO artifact_chunks (artifact_id, seq, data) VALUES ($1, $2, $3)
         ON CONFLICT (artifact_id, seq) DO NOTHING",
    )
    .bind(id)
    .bind(chunk.seq as i64)
    .bind(&chunk.data)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        sqlx::query(
            "UPDATE artifacts SET chunks_stored = chunks_stored + 1,
                 bytes_stored = bytes_stored + $2
             WHERE id = $1",
        )
        .bind(id)
        .bind(chunk.data.len() as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(if inserted { Chunk::New } else { Chunk::Old })
}

/// Record what `StepFinished` says of the attempt's artifacts; forget those it does not
/// list (uploads the agent gave up on).
pub async fn announce(
    conn: &mut PgConnection,
    task: TaskId,
    step_run: StepRunId,
    attempt: u32,
    sums: &[ArtifactSum],
) -> sqlx::Result<()> {
    let listed: Vec<i32> = sums.iter().map(|s| s.artifact as i32).collect();
    sqlx::query(
        "DELETE FROM artifacts WHERE step_run_id = $1 AND attempt = $2 AND NOT (idx = ANY($3))",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(&listed)
    .execute(&mut *conn)
    .await?;
    for s in sums {
        sqlx::query(
            "INSERT INTO artifacts (id, task_id, step_run_id, attempt, idx, name, size, chunk_count, sha256)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (step_run_id, attempt, idx) DO UPDATE
             SET name = EXCLUDED.name, size = EXCLUDED.size,
                 chunk_count = EXCLUDED.chunk_count, sha256 = EXCLUDED.sha256",
        )
        .bind(ArtifactId::new().0)
        .bind(task.0)
        .bind(step_run.0)
        .bind(attempt as i32)
        .bind(s.artifact as i32)
        .bind(&s.name)
        .bind(s.size as i64)
        .bind(s.chunks as i64)
        .bind(s.sha256.to_ascii_lowercase())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Check every announced artifact of the attempt whose chunks have all arrived; each becomes
/// `Stored` or `Corrupt` (with a warning in the task's log).
pub async fn settle(
    conn: &mut PgConnection,
    task: TaskId,
    step_run: StepRunId,
    attempt: u32,
) -> sqlx::Result<()> {
    let complete: Vec<(Uuid, String, i64, i64, String)> = sqlx::query_as(
        "SELECT id, name, size, chunk_count, sha256 FROM artifacts
         WHERE step_run_id = $1 AND attempt = $2 AND state = $3
           AND chunk_count IS NOT NULL AND chunks_stored >= chunk_count
         ORDER BY idx",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(ArtifactState::Receiving)
    .fetch_all(&mut *conn)
    .await?;
    for (id, name, size, chunks, expected) in complete {
        let problem = match digest(conn, id, chunks).await? {
            Hashed::Gap(seq) => Some(format!("chunk {seq} is missing")),
            Hashed::Done { size: got, sha256 } if got != size => Some(format!(
                "{got} bytes stored, the agent sent {size} (sha256 {sha256})"
            )),
            Hashed::Done { sha256, .. } if sha256 != expected => Some(format!(
                "the stored bytes have sha256 {sha256}, the agent computed {expected}"
            )),
            Hashed::Done { .. } => None,
        };
        let state = if problem.is_some() {
            ArtifactState::Corrupt
        } else {
            ArtifactState::Stored
        };
        transitions::settle_artifact(conn, id, state).await?;
        if let Some(p) = problem {
            tracing::warn!(artifact = %id, name, problem = p, "a corrupt artifact");
            logs::append_system(
                conn,
                task,
                Some((step_run, attempt)),
                &format!("warning: artifact {name} is corrupt: {p}"),
            )
            .await?;
        }
    }
    Ok(())
}

/// What keeps an attempt from being final: artifacts still receiving, and the names of
/// corrupt ones.
pub async fn pending(
    conn: &mut PgConnection,
    step_run: StepRunId,
    attempt: u32,
) -> sqlx::Result<(i64, Vec<String>)> {
    let rows: Vec<(String, ArtifactState)> = sqlx::query_as(
        "SELECT name, state FROM artifacts
         WHERE step_run_id = $1 AND attempt = $2 AND state = ANY($3)
         ORDER BY idx",
    )
    .bind(step_run.0)
    .bind(attempt as i32)
    .bind(ArtifactState::strs(&[
        ArtifactState::Receiving,
        ArtifactState::Corrupt,
    ]))
    .fetch_all(&mut *conn)
    .await?;
    let receiving = rows
        .iter()
        .filter(|(_, s)| *s == ArtifactState::Receiving)
        .count() as i64;
    let corrupt = rows
        .into_iter()
        .filter(|(_, s)| *s == ArtifactState::Corrupt)
        .map(|(n, _)| n)
        .collect();
    Ok((receiving, corrupt))
}

enum Hashed {
    Done { size: i64, sha256: String },
    Gap(i64),
}

/// Hash an artifact's stored chunks in order, a page at a time.
async fn digest(conn: &mut PgConnection, id: Uuid, chunks: i64) -> sqlx::Result<Hashed> {
    let mut hasher = Sha256::new();
    let mut size = 0i64;
    let mut next = 0i64;
    while next < chunks {
        let page: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, data FROM artifact_chunks WHERE artifact_id = $1 AND seq >= $2
             ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(next)
        .bind(PAGE)
        .fetch_all(&mut *conn)
        .await?;
        if page.is_empty() {
            return Ok(Hashed::Gap(next));
        }
        for (seq, data) in page {
            if seq != next || seq >= chunks {
                return Ok(Hashed::Gap(next));
            }
            hasher.update(&data);
            size += data.len() as i64;
            next += 1;
        }
    }
    Ok(Hashed::Done {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// One artifact's row, for the API.
#[derive(sqlx::FromRow)]
pub struct Row {
    pub id: Uuid,
    pub task_id: Uuid,
    pub step_run_id: Uuid,
    pub step: String,
    pub attempt: i32,
    pub name: String,
    /// An [`ArtifactState`], or `Incomplete` (see [`list`]).
    pub state: String,
    pub size: i64,
    pub sha256: Option<String>,
    pub chunk_count: Option<i64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub stored_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<Row> for gantry_shared::api::Artifact {
    fn from(r: Row) -> Self {
        Self {
            id: ArtifactId(r.id),
            task_id: TaskId(r.task_id),
            step_run_id: StepRunId(r.step_run_id),
            step: r.step,
            attempt: r.attempt as u32,
            name: r.name,
            state: r.state,
            size: r.size.max(0) as u64,
            sha256: r.sha256,
            created_at: r.created_at,
            stored_at: r.stored_at,
        }
    }
}

/// How a `Receiving` artifact of an ended attempt shows (a lost worker, a cancel): no more
/// chunks will come.
pub const INCOMPLETE: &str = "Incomplete";

/// The columns of [`Row`]; `$2` is `Receiving`, `$3` the final attempt states, `$4`
/// [`INCOMPLETE`] (see [`bind_states`]).
const SELECT_ROWS: &str =
    "SELECT a.id, a.task_id, a.step_run_id, s.name AS step, a.attempt, a.name,
        CASE WHEN a.state = $2 AND t.state = ANY($3) THEN $4 ELSE a.state END AS state,
        COALESCE(a.size, a.bytes_stored) AS size, a.sha256, a.chunk_count,
        a.created_at, a.stored_at
     FROM artifacts a
     JOIN step_runs s ON s.id = a.step_run_id
     JOIN attempts t ON t.step_run_id = a.step_run_id AND t.attempt = a.attempt";

type RowQuery<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments>;

/// Bind [`SELECT_ROWS`]'s `$2`, `$3` and `$4`.
fn bind_states(q: RowQuery<'_>) -> RowQuery<'_> {
    let ended: Vec<&str> = AttemptState::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| s.as_str())
        .collect();
    q.bind(ArtifactState::Receiving)
        .bind(ended)
        .bind(INCOMPLETE)
}

/// A task's artifacts, in step order, then attempt, then upload order; one `Receiving`
/// whose attempt has ended shows as [`INCOMPLETE`].
pub async fn list(db: &PgPool, task: TaskId) -> sqlx::Result<Vec<Row>> {
    let sql = format!("{SELECT_ROWS} WHERE a.task_id = $1 ORDER BY s.idx, a.attempt, a.idx");
    bind_states(sqlx::query_as(&sql).bind(task.0))
        .fetch_all(db)
        .await
}

pub async fn get(db: &PgPool, id: ArtifactId) -> sqlx::Result<Option<Row>> {
    let sql = format!("{SELECT_ROWS} WHERE a.id = $1");
    bind_states(sqlx::query_as(&sql).bind(id.0))
        .fetch_optional(db)
        .await
}

/// A stored artifact's bytes, read [`PAGE`] chunks at a time as the reader asks for them.
pub fn content(
    db: PgPool,
    id: ArtifactId,
    chunks: i64,
) -> impl Stream<Item = Result<Vec<u8>, sqlx::Error>> + Send + 'static {
    let pages = futures::stream::try_unfold(0i64, move |next| {
        let db = db.clone();
        async move {
            if next >= chunks {
                return Ok(None);
            }
            let page: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT seq, data FROM artifact_chunks WHERE artifact_id = $1 AND seq >= $2
                 ORDER BY seq LIMIT $3",
            )
            .bind(id.0)
            .bind(next)
            .bind(PAGE)
            .fetch_all(&db)
            .await?;
            if page.is_empty() {
                return Err(sqlx::Error::RowNotFound);
            }
            let after = page.last().map(|(s, _)| s + 1).unwrap_or(next);
            let data: Vec<Result<Vec<u8>, sqlx::Error>> =
                page.into_iter().map(|(_, d)| Ok(d)).collect();
            Ok(Some((futures::stream::iter(data), after)))
        }
    });
    futures::TryStreamExt::try_flatten(pages)
}
