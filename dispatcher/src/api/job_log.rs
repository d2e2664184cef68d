//! `GET /api/jobs/{job_id}/log`: how far the dispatcher has stored a job's log.
//!
//! The agent paces a step's output by it: it keeps at most a window of lines sent but not yet
//! stored (see the agent's `window` module). Only the job's own worker may ask (any other
//! worker gets 409, as for the lease route); an unknown job is a 404. The answer is a count
//! the dispatcher keeps anyway (`attempts.lines_stored`), one indexed row read: an agent that
//! asks too often, or lies about what it sent, can only slow its own step.

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{WorkerCaller, parse_id};
use crate::transitions::AttemptState;
use axum::Json;
use axum::extract::{Path, State};
use gantry_shared::api::JobLog;
use gantry_shared::ids::JobId;

pub async fn stored(
    State(s): State<AppState>,
    worker: WorkerCaller,
    Path(job_id): Path<String>,
) -> ApiResult<Json<JobLog>> {
    let job_id: JobId = parse_id(&job_id, "job")?;
    let Some((owner, state, lines_stored)) =
        crate::store::jobs::stored_lines(&s.db, job_id).await?
    else {
        return Err(ApiError::not_found(format!("no job {job_id}")));
    };
    if owner != Some(worker.worker_id.0) || state != AttemptState::Running {
        return Err(ApiError::Conflict(format!(
            "job {job_id} is not running on worker {}",
            worker.name
        )));
    }
    Ok(Json(JobLog {
        lines_stored: u64::try_from(lines_stored).unwrap_or(0),
    }))
}
