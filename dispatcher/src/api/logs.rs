//! `GET /api/tasks/{id}/log`: the task's log in order, as a JSON page or, with
//! `follow=true`, as Server-Sent Events until the task ends.
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
use crate::store::tasks::{self, is_terminal};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use gantry_shared::api::{LogEnd, LogPage, Permission};
use gantry_shared::ids::TaskId;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;

const DEFAULT_PAGE: i64 = 10_000;
const MAX_PAGE: i64 = 100_000;
/// Lines read per query while following.
const FOLLOW_CHUNK: i64 = 2_000;

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
        let lines = logs::read(&s.db, task, after, limit, &names).await?;
        let next = lines
            .last()
            .map(|l| l.cursor.clone())
            .unwrap_or_else(|| logs::cursor(after));
        let complete = is_terminal(&summary.state) && (lines.len() as i64) < limit;
        return Ok(Json(LogPage {
            lines,
            next,
            complete,
        })
        .into_response());
    }
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(256);
    tokio::spawn(follow_task(s, task, after, names, tx));
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Feed one follower until the task ends, the client goes away or the server shuts down.
async fn follow_task(
    s: AppState,
    task: TaskId,
    mut after: i64,
    mut names: std::collections::HashMap<uuid::Uuid, String>,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut wake = s.notifier.subscribe();
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
        let lines = match logs::read(&s.db, task, after, FOLLOW_CHUNK, &names).await {
            Ok(l) => l,
            Err(_) => {
                if wait(&s, &mut wake, task, &tx).await {
                    continue;
                }
                return;
            }
        };
        let n = lines.len() as i64;
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
        if n == FOLLOW_CHUNK {
            continue;
        }
        if is_terminal(&state) {
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
