//! The agent's side of the API: its configuration, and claims.
//!
//! A job is a ticket, not a lease. An agent that receives a job claims it here before
//! running anything; the claim is granted only if the job id is the attempt's current one and
//! the attempt has not started, ended or been cancelled. Repeating a granted claim with the
//! same `claim_id` (a retry after a lost response) is granted again; any other claim is
//! refused with 409, and the agent then acks the job and runs nothing. So neither a
//! redelivery nor a re-publication can run one attempt twice.

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{AppJson, WorkerCaller, parse_id};
use crate::attempts;
use crate::store::workers;
use axum::Json;
use axum::extract::{Path, State};
use gantry_shared::api::{AgentConfig, ClaimGrant, ClaimRequest};
use gantry_shared::ids::{JobId, StepRunId};
use std::collections::BTreeMap;
use uuid::Uuid;

pub async fn agent_config(
    State(s): State<AppState>,
    worker: WorkerCaller,
) -> ApiResult<Json<AgentConfig>> {
    let w = workers::get(&s.db, worker.worker_id).await?;
    Ok(Json(AgentConfig {
        worker_id: w.id,
        name: w.name,
        namespace: s.topology.namespace().to_owned(),
        pools: w.pools,
        max_concurrent_steps: w.max_concurrent_steps,
        enabled: w.enabled,
    }))
}

pub async fn claim(
    State(s): State<AppState>,
    worker: WorkerCaller,
    Path(job_id): Path<String>,
    AppJson(req): AppJson<ClaimRequest>,
) -> ApiResult<Json<ClaimGrant>> {
    let job_id: JobId = parse_id(&job_id, "job")?;
    let found: Option<(Uuid, i32, Uuid)> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, s.task_id FROM attempts a
         JOIN step_runs s ON s.id = a.step_run_id WHERE a.job_id = $1",
    )
    .bind(job_id.0)
    .fetch_optional(&s.db)
    .await?;
    let Some((step_run, attempt, task)) = found else {
        return Err(ApiError::Conflict(format!(
            "job {job_id} is not current: it was superseded by a newer publication of its attempt"
        )));
    };
    let step_run = StepRunId(step_run);
    let mut tx = s.db.begin().await?;
    let Some(locked) = attempts::lock(&mut tx, step_run, attempt as u32).await? else {
        return Err(ApiError::Conflict(format!("job {job_id} has no attempt")));
    };
    if locked.job_id != job_id.0 {
        return Err(ApiError::Conflict(format!(
            "job {job_id} was superseded by a newer publication of its attempt"
        )));
    }
    match locked.state.as_str() {
        "Pending" | "Queued" => {
            if !worker.enabled {
                drop(tx);
                // Disabled workers get no new steps: send the job back out for another.
                s.orchestrator.republish(step_run, attempt as u32).await;
                return Err(ApiError::Conflict(format!(
                    "worker {} is disabled and takes no new steps",
                    worker.name
                )));
            }
        }
        "Running"
            if locked.worker_id == Some(worker.worker_id.0)
                && locked.claim_id == Some(req.claim_id.0) =>
        {
            // The same claim again: the agent did not get our first answer.
        }
        "Running" => {
            return Err(ApiError::Conflict(format!(
                "job {job_id} is already claimed and running"
            )));
        }
        other => {
            return Err(ApiError::Conflict(format!(
                "job {job_id}'s attempt has ended ({other})"
            )));
        }
    }
    let sealed: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, value FROM task_secrets WHERE task_id = $1")
            .bind(task)
            .fetch_all(&mut *tx)
            .await?;
    let mut sensitive_variables = BTreeMap::new();
    for (name, value) in sealed {
        match s.secrets.open(&value) {
            Ok(v) => {
                sensitive_variables.insert(name, v);
            }
            Err(e) => {
                // Nothing can run without its secrets; end the attempt with the reason
                // rather than leave it claimed and stuck.
                let why = format!("sensitive variable {name} cannot be read: {e}");
                attempts::conclude(
                    &mut tx,
                    &locked,
                    step_run,
                    attempt as u32,
                    "Failed",
                    Some(&why),
                    std::time::Duration::from_secs(1),
                )
                .await?;
                tx.commit().await?;
                s.orchestrator.kick(locked.task());
                return Err(ApiError::Conflict(why));
            }
        }
    }
    if locked.state != "Running" {
        sqlx::query(
            "UPDATE attempts SET state = 'Running', worker_id = $3, worker_name = $4,
                 claim_id = $5, started_at = now()
             WHERE step_run_id = $1 AND attempt = $2",
        )
        .bind(step_run.0)
        .bind(attempt)
        .bind(worker.worker_id.0)
        .bind(&worker.name)
        .bind(req.claim_id.0)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE step_runs SET state = 'Running', waiting_for = NULL WHERE id = $1")
            .bind(step_run.0)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::debug!(%job_id, worker = %worker.name, "claim granted");
    Ok(Json(ClaimGrant {
        step_run_id: step_run,
        attempt: attempt as u32,
        worker_name: worker.name,
        sensitive_variables,
    }))
}
