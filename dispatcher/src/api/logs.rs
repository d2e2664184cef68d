//! `GET /api/tasks/{id}/log`: the task's log in order, as a JSON page or, with
//! `follow=true`, as Server-Sent Events until the task ends.
//!
//! A page holds at most `limit` lines and at most [`PAGE_BYTES`] of JSON (always at least one
//! line); it is read from PostgreSQL a chunk at a time and streamed to the client as it is
//! read, so a reader costs the dispatcher a few chunks of memory, not a page.
//!
//! Each SSE `line` event carries one [`LogEntry`] as data and its cursor as the event id, so
//! a client that reconnects with `Last-Event-ID` resumes exactly after the last line it got.
//! When the task has ended and every line has been sent, an `end` event carries the task's
//! final state and the stream closes.

use super::error::{ApiError, ApiResult};
use super::extract::{Caller, parse_id};
use super::{AppState, query_map};
use crate::logs;
use crate::notify::EVERYONE;
use crate::store::tasks;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use gantry_shared::api::LogEntry;
use gantry_shared::api::{LogEnd, Permission};
use gantry_shared::ids::TaskId;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

const DEFAULT_PAGE: i64 = 10_000;
const MAX_PAGE: i64 = 100_000;
/// Lines read per query while following.
const FOLLOW_CHUNK: i64 = 2_000;
/// A JSON page ends before the line that would take it past this many bytes (but holds at
/// least one line), whatever `limit` says.
pub const PAGE_BYTES: usize = 4 << 20;
/// Lines and bytes of text read from PostgreSQL per query, for a page or a follower.
const CHUNK_LINES: i64 = 500;
/// Lines asked for by a reader's first query, before it knows how long lines are.
const FIRST_CHUNK: i64 = 64;
const CHUNK_BYTES: usize = 256 << 10;

/// Lines to ask for next, from the lines and bytes the previous chunk brought: about
/// [`CHUNK_BYTES`] worth, so that a query seldom sends rows the byte bound leaves unread
/// (PostgreSQL sends every row of a `LIMIT`; the rest is read and dropped).
fn next_chunk(lines: &[LogEntry], cap: i64) -> i64 {
    let bytes: usize = lines.iter().map(|l| l.text.len().saturating_add(64)).sum();
    let per_line = (bytes / lines.len().max(1)).max(1);
    let fit = i64::try_from(CHUNK_BYTES / per_line).unwrap_or(CHUNK_LINES);
    fit.saturating_add(1).clamp(1, CHUNK_LINES).min(cap.max(1))
}

pub async fn log(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require(Permission::TaskView)?;
    let task: TaskId = parse_id(&id, "task")?;
    let q = query_map(q.as_deref())?;
    let after_raw = q.get("after").cloned().or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let after = logs::parse_cursor(after_raw.as_deref()).map_err(|m| ApiError::bad("after", m))?;
    let follow = match q.get("follow").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::bad(
                "follow",
                format!("{other:?} is not true or false"),
            ));
        }
    };
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| ApiError::bad("limit", format!("must be 1 to {MAX_PAGE}")))?,
    };
    // 404 for an unknown task, before any streaming starts.
    let summary = tasks::summary(&s.db, task).await?;
    let names = logs::step_names(&s.db, task).await?;
    if !follow {
        let complete_if_read = summary.state.is_terminal();
        return page(s, task, after, limit, names, complete_if_read).await;
    }
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(256);
    tokio::spawn(follow_task(s, task, after, names, tx));
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// A JSON page (the shape of [`gantry_shared::api::LogPage`]), streamed. The first chunk is
/// read before the answer starts, so that an unavailable database is a 503, not a cut body;
/// a later failure cuts the body (the client sees invalid JSON and reads again from its last
/// cursor).
async fn page(
    s: AppState,
    task: TaskId,
    after: i64,
    limit: i64,
    names: HashMap<Uuid, String>,
    terminal: bool,
) -> ApiResult<Response> {
    let first_chunk = FIRST_CHUNK.min(limit);
    let first = logs::read(&s.db, task, after, first_chunk, CHUNK_BYTES, &names).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        if let Err(e) = write_page(&s, task, after, limit, &names, terminal, first, &tx).await {
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Produce a page's body chunk by chunk. Stops quietly when the client went away.
#[allow(clippy::too_many_arguments)]
async fn write_page(
    s: &AppState,
    task: TaskId,
    mut after: i64,
    limit: i64,
    names: &HashMap<Uuid, String>,
    terminal: bool,
    first: (Vec<LogEntry>, bool),
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = b"{\"lines\":[".to_vec();
    let (mut lines, mut more) = first;
    let mut sent_lines: i64 = 0;
    // The envelope (`{"lines":[`, `],"next":...,"complete":...}`) counts too.
    let mut sent_bytes: usize = 128;
    // Whether the page ended because the log did (rather than at `limit` or the byte cap).
    let mut exhausted = false;
    'page: loop {
        for line in &lines {
            let json = serde_json::to_vec(line)?;
            let room = json.len().saturating_add(1);
            if sent_lines > 0 && sent_bytes.saturating_add(room) > PAGE_BYTES {
                break 'page;
            }
            if sent_lines > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(&json);
            sent_bytes = sent_bytes.saturating_add(room);
            sent_lines += 1;
            after = line.cursor.parse().unwrap_or(after);
            if sent_lines >= limit {
                break 'page;
            }
        }
        if tx
            .send(Ok(Bytes::from(std::mem::take(&mut buf))))
            .await
            .is_err()
        {
            return Ok(());
        }
        if !more {
            exhausted = true;
            break;
        }
        let want = next_chunk(&lines, limit.saturating_sub(sent_lines));
        (lines, more) = logs::read(&s.db, task, after, want, CHUNK_BYTES, names).await?;
    }
    let tail = serde_json::json!({
        "next": logs::cursor(after),
        "complete": terminal && exhausted,
    });
    // `{"next":..,"complete":..}` without its opening brace closes the object.
    let tail = serde_json::to_vec(&tail)?;
    buf.extend_from_slice(b"],");
    buf.extend_from_slice(tail.get(1..).unwrap_or(&b"}"[..]));
    let _ = tx.send(Ok(Bytes::from(buf))).await;
    Ok(())
}

/// Feed one follower until the task ends, the client goes away or the server shuts down.
async fn follow_task(
    s: AppState,
    task: TaskId,
    mut after: i64,
    mut names: std::collections::HashMap<uuid::Uuid, String>,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut wake = s.notifier.subscribe_logs();
    let mut want = FIRST_CHUNK;
    loop {
        // Read the state before the lines: if the task had ended by then, every line it will
        // ever have is already stored, so an empty read afterwards means the end.
        let state = match tasks::summary(&s.db, task).await {
            Ok(t) => t.state,
            Err(_) => {
                if wait(&s, &mut wake, task, &tx).await {
                    continue;
                }
                return;
            }
        };
        let (lines, more) = match logs::read(&s.db, task, after, want, CHUNK_BYTES, &names).await {
            Ok(l) => l,
            Err(_) => {
                if wait(&s, &mut wake, task, &tx).await {
                    continue;
                }
                return;
            }
        };
        if !lines.is_empty() {
            want = next_chunk(&lines, FOLLOW_CHUNK);
        }
        if lines.iter().any(|l| l.step.is_none()) {
            // A Gantry line names no step only for task-wide lines; refresh names anyway in
            // case steps were added (they are not today, but the lookup is cheap).
            if let Ok(fresh) = logs::step_names(&s.db, task).await {
                names = fresh;
            }
        }
        for line in lines {
            after = line.cursor.parse().unwrap_or(after);
            let ev = Event::default()
                .id(line.cursor.clone())
                .event("line")
                .json_data(&line)
                .expect("log entries serialize");
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        if more {
            continue;
        }
        if state.is_terminal() {
            let end = LogEnd {
                task_id: task,
                state,
            };
            let ev = Event::default()
                .event("end")
                .json_data(&end)
                .expect("end event serializes");
            let _ = tx.send(Ok(ev)).await;
            return;
        }
        if !wait(&s, &mut wake, task, &tx).await {
            return;
        }
    }
}

/// Wait for news about the task (or a second). False when the follower should stop.
async fn wait(
    s: &AppState,
    wake: &mut tokio::sync::broadcast::Receiver<uuid::Uuid>,
    task: TaskId,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) -> bool {
    let deadline = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return true,
            _ = s.cancel.cancelled() => return false,
            _ = tx.closed() => return false,
            msg = wake.recv() => match msg {
                Ok(id) if id == task.0 || id == EVERYONE => return true,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
                Err(_) => return true,
            },
        }
    }
}
