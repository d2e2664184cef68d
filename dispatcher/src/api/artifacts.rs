//! `GET /api/tasks/{id}/artifacts` lists a task's artifacts; `GET /api/artifacts/{id}`
//! streams one's bytes, read from PostgreSQL a page of chunks at a time as the client takes
//! them (never the whole file in memory), with its sha256 in `X-Gantry-Sha256`. Both need
//! `TaskView`. Only a `Stored` artifact (complete, its sha256 checked) can be downloaded;
//! any other state is a 409.

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{Caller, parse_id};
use crate::artifacts;
use crate::store::tasks;
use crate::transitions::ArtifactState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use gantry_shared::api::{ARTIFACT_SHA256_HEADER, Artifact, Permission};
use gantry_shared::ids::{ArtifactId, TaskId};

pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Artifact>>> {
    caller.require(Permission::TaskView)?;
    let task: TaskId = parse_id(&id, "task")?;
    // 404 for an unknown task rather than an empty list.
    tasks::summary(&s.db, task).await?;
    let rows = artifacts::list(&s.db, task).await?;
    Ok(Json(rows.into_iter().map(Artifact::from).collect()))
}

pub async fn download(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    caller.require(Permission::TaskView)?;
    let id: ArtifactId = parse_id(&id, "artifact")?;
    let row = artifacts::get(&s.db, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no artifact with id {id}")))?;
    if row.state != ArtifactState::Stored.as_str() {
        return Err(ApiError::Conflict(format!(
            "artifact {} ({}) is {}, not Stored: only a complete artifact whose sha256 was checked can be downloaded",
            row.id, row.name, row.state
        )));
    }
    let sha256 = row.sha256.clone().unwrap_or_default();
    let chunks = row.chunk_count.unwrap_or(0);
    let body = artifacts::content(s.db.clone(), id, chunks).map_err(move |e| {
        tracing::warn!(error = %e, artifact = %id, "an artifact download broke off");
        std::io::Error::other(e)
    });
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(row.size.max(0)));
    if let Ok(v) = HeaderValue::from_str(&sha256) {
        h.insert(ARTIFACT_SHA256_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&row.name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// `attachment; filename="app.tar.gz"`: the name's last path segment, with anything that is
/// not safe in a quoted header value replaced by `_`.
fn content_disposition(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let safe: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = if safe.trim().is_empty() {
        "artifact".to_owned()
    } else {
        safe
    };
    format!("attachment; filename=\"{safe}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_disposition_is_a_safe_base_name() {
        assert_eq!(
            content_disposition("dist/app.tar.gz"),
            "attachment; filename=\"app.tar.gz\""
        );
        assert_eq!(
            content_disposition("a\"b\\c\u{e9}\n"),
            "attachment; filename=\"a_b_c__\""
        );
        assert_eq!(
            content_disposition("dir/"),
            "attachment; filename=\"artifact\""
        );
    }
}
