//! The agent's side of the API: its configuration, claims, sensitive outputs and mutex leases.
//!
//! A job is a ticket, not a lease. An agent that receives a job claims it here before
//! running anything; the claim is granted only if the job id is the attempt's current one and
//! the attempt has not started, ended or been cancelled. Repeating a granted claim with the
//! same `claim_id` (a retry after a lost response) is granted again; any other claim is
//! refused with 409, and the agent then acks the job and runs nothing. So neither a
//! redelivery nor a re-publication can run one attempt twice. A claim from a worker that
//! does not serve the step's pool is a 403 that changes nothing (no void, no new job id):
//! the agent gives the delivery back to the queue and leaves that queue alone a while.
//!
//! The claim also decides *what* runs: the agent sends the sha256 of the job body it
//! received, and a body that is not the one the dispatcher published for the attempt (changed
//! on its way, by whoever could publish into a job queue) runs nothing: the attempt fails with
//! the reason, so it is on record and retried if the step allows.
//!
//! A mutex step's lease is renewed here (`POST /api/jobs/{job_id}/lease`) by the dispatcher on
//! the claimant's behalf: agents hold no Redis credentials, and the fencing token is the
//! attempt's row.

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{AppJson, WorkerCaller, WorkerIdentity, parse_id};
use crate::attempts;
use crate::store::{claims, workers};
use crate::transitions::{self, AttemptState, WorkerHealth};
use axum::Json;
use axum::extract::{Path, State};
use gantry_shared::api::{
    AgentConfig, ClaimGrant, ClaimRequest, LeaseRenewed, MutexGrant, SensitiveOutput,
};
use gantry_shared::ids::{JobId, StepRunId};
use std::collections::BTreeMap;

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
        policy: crate::store::settings::get(&s.db).await?.machine_policy,
        // With broker users in force every registered worker must log in as its own: one
        // registered before then has none, and its agent is told so (it refuses to start).
        broker_user: match (&s.broker_users, w.builtin) {
            (Some(users), false) => Some(
                w.broker_user
                    .unwrap_or_else(|| crate::broker_users::user_name(users.namespace(), w.id)),
            ),
            _ => None,
        },
    }))
}

pub async fn claim(
    State(s): State<AppState>,
    identity: WorkerIdentity,
    Path(job_id): Path<String>,
    AppJson(req): AppJson<ClaimRequest>,
) -> ApiResult<Json<ClaimGrant>> {
    let job_id: JobId = parse_id(&job_id, "job")?;
    if let Some(sha) = &req.job_sha256
        && !(sha.len() == 64
            && sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return Err(ApiError::bad(
            "job_sha256",
            "must be the sha256 of the job body: 64 lowercase hex characters",
        ));
    }
    let mut tx = s.db.begin().await?;
    let Some((step_run, attempt, locked)) = attempts::lock_job(&mut tx, job_id).await? else {
        return Err(ApiError::Conflict(format!(
            "job {job_id} is unknown: never published, or superseded by a newer publication of its attempt"
        )));
    };
    // Whether it is enabled and healthy, and serves the step's pool, is read here, in the
    // claim's transaction.
    let Some(claimant) = claims::claimant(&mut tx, identity.worker_id, step_run).await? else {
        return Err(ApiError::WorkerUnauthorized);
    };
    let worker = WorkerCaller::from(claimant.worker);
    let task = locked.task_id;
    let attempt = attempt as i32;
    match locked.state {
        AttemptState::Pending | AttemptState::Queued => {
            let outside_pool = !claimant.serves;
            if outside_pool
                && !claims::routed_to(&mut tx, worker.worker_id, step_run, attempt as u32).await?
            {
                // Refused without a trace: voiding the job here would let any worker outside
                // the pool (one sharing the broker user in development mode, or one whose
                // pools just changed) void a job again and again. The job stays as it is,
                // and the agent gives the delivery back to the queue (a 403, not a 409).
                drop(tx);
                tracing::info!(%job_id, worker = %worker.name, "claim refused: the worker does not serve the step's pool");
                return Err(ApiError::Denied(format!(
                    "worker {} does not serve this step's pool; the job stays queued for one that does",
                    worker.name
                )));
            }
            let refusal = if outside_pool {
                // Routed to this worker's own queue (it was the task's worker for the pool
                // until its pools changed): nobody else can receive it there, so it goes out
                // again to the pool, which this worker no longer serves.
                Some(format!(
                    "worker {} no longer serves this step's pool",
                    worker.name
                ))
            } else if !worker.enabled {
                Some(format!(
                    "worker {} is disabled and takes no new steps",
                    worker.name
                ))
            } else if worker.health == WorkerHealth::Unhealthy {
                Some(format!(
                    "worker {} is Unhealthy ({}) and takes no new steps",
                    worker.name,
                    worker
                        .health_reason
                        .as_deref()
                        .unwrap_or("its health check failed")
                ))
            } else if req.job_sha256.is_none()
                && locked.job_sha256.is_some()
                && s.broker_users.is_some()
            {
                // An agent older than this dispatcher: it cannot say what it would run.
                // (In development mode it is let through, for rolling upgrades.)
                Some(format!(
                    "worker {} sent no sha256 of the job body (an agent older than the dispatcher?); upgrade it",
                    worker.name
                ))
            } else {
                None
            };
            if let Some(why) = refusal {
                // The agent acks a refused job, so this job is gone: void it and send the
                // attempt out again for a worker that may run it (not this one again, even
                // if it was the task's worker for the pool).
                claims::forget_task_worker(&mut tx, worker.worker_id, step_run).await?;
                let job = crate::orchestrator::void_job(&mut tx, step_run, attempt as u32).await?;
                tx.commit().await?;
                s.orchestrator
                    .publish_voided(step_run, attempt as u32, job)
                    .await;
                return Err(ApiError::Conflict(why));
            }
            // Checked only for a worker that may run the step: the body it holds must be the
            // one published for this job id. Otherwise nothing runs, and the attempt says why
            // (its retries, if any, get a fresh job).
            if let (Some(published), Some(got)) = (&locked.job_sha256, &req.job_sha256)
                && got != published
            {
                let why = format!(
                    "its job was altered on its way to worker {}: the body it received has sha256 {got}, not the published {published}; nothing ran",
                    worker.name
                );
                tracing::warn!(%job_id, worker = %worker.name, "{why}");
                attempts::conclude(
                    &mut tx,
                    &locked,
                    step_run,
                    attempt as u32,
                    crate::transitions::AttemptState::Failed,
                    Some(&why),
                    s.retry_base,
                )
                .await?;
                tx.commit().await?;
                if let Some(mutex) = &locked.mutex {
                    // Its lease goes to the next waiter now rather than at its expiry.
                    s.locks
                        .release_or_withdraw(
                            mutex,
                            step_run,
                            attempt as u32,
                            locked.mutex_token.map(|t| t as u64),
                        )
                        .await;
                }
                return Err(ApiError::Conflict(why));
            }
        }
        AttemptState::Running
            if locked.worker_id == Some(worker.worker_id.0)
                && locked.claim_id == Some(req.claim_id.0) =>
        {
            // The same claim again: the agent did not get our first answer.
        }
        AttemptState::Running => {
            return Err(ApiError::Conflict(format!(
                "job {job_id} is already claimed and running"
            )));
        }
        other => {
            return Err(ApiError::Conflict(format!(
                "job {job_id}'s attempt has ended ({})",
                other.as_str()
            )));
        }
    }
    let sealed = claims::sealed_values(&mut tx, task).await?;
    let mut sensitive_variables = BTreeMap::new();
    for (name, value) in sealed {
        match s.secrets.open(task, &name, &value) {
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
                    crate::transitions::AttemptState::Failed,
                    Some(&why),
                    s.retry_base,
                )
                .await?;
                tx.commit().await?;
                return Err(ApiError::Conflict(why));
            }
        }
    }
    let mutex = match (&locked.mutex, locked.mutex_token) {
        (Some(name), Some(token)) => {
            match s
                .locks
                .confirm(name, step_run, attempt as u32, token as u64)
                .await
            {
                Ok(true) => Some(MutexGrant {
                    name: name.clone(),
                    token: token as u64,
                    lease_ms: s.locks.lease().as_millis() as u64,
                }),
                Ok(false) if locked.state != AttemptState::Running => {
                    drop(tx);
                    s.locks
                        .requeue(
                            step_run,
                            attempt as u32,
                            "its lease expired before the claim",
                        )
                        .await;
                    return Err(ApiError::Conflict(format!(
                        "job {job_id}'s mutex {name} lease was lost before it started; the step waits for the mutex again"
                    )));
                }
                Ok(false) => {
                    // A repeated claim (the first answer was lost) whose lease expired
                    // meanwhile: the agent will run nothing, so end the attempt here rather
                    // than leave it Running and holding the mutex's place forever.
                    let why =
                        format!("its mutex {name} lease expired before the agent could start it");
                    attempts::conclude(
                        &mut tx,
                        &locked,
                        step_run,
                        attempt as u32,
                        crate::transitions::AttemptState::Failed,
                        Some(&why),
                        s.retry_base,
                    )
                    .await?;
                    tx.commit().await?;
                    s.locks.wake();
                    return Err(ApiError::Conflict(format!(
                        "job {job_id} no longer holds mutex {name}"
                    )));
                }
                Err(e) => {
                    return Err(ApiError::Unavailable(format!(
                        "Redis is unavailable, so mutex {name} cannot be confirmed; try again ({e})"
                    )));
                }
            }
        }
        (Some(name), None) => {
            return Err(ApiError::Conflict(format!(
                "job {job_id} was published without its mutex {name}; refusing it"
            )));
        }
        _ => None,
    };
    if locked.state != AttemptState::Running {
        // The claim is the start: `started_at` is the dispatcher's clock, never the agent's.
        transitions::claim(
            &mut tx,
            step_run,
            attempt as u32,
            worker.worker_id,
            &worker.name,
            req.claim_id.0,
        )
        .await?;
        if !worker.builtin {
            claims::choose_task_worker(&mut tx, worker.worker_id, step_run).await?;
        }
    }
    tx.commit().await?;
    tracing::debug!(%job_id, worker = %worker.name, "claim granted");
    Ok(Json(ClaimGrant {
        step_run_id: step_run,
        attempt: attempt as u32,
        worker_name: worker.name,
        sensitive_variables,
        mutex,
        job_sha256: locked.job_sha256.clone(),
    }))
}

/// `POST /api/jobs/{job_id}/lease`: renew the mutex lease of the running attempt whose job
/// this is, for its claimant only. 200 with the token in force; 409 once the lease is gone
/// (the agent then kills its step at once); 503 while Redis cannot answer (the agent kills its
/// step once half a lease has passed without a renewal).
pub async fn renew_lease(
    State(s): State<AppState>,
    worker: WorkerCaller,
    Path(job_id): Path<String>,
) -> ApiResult<Json<LeaseRenewed>> {
    let job_id: JobId = parse_id(&job_id, "job")?;
    let Some(h) = attempts::lease_holder(&s.db, job_id).await? else {
        return Err(ApiError::not_found(format!("no job {job_id}")));
    };
    if h.worker_id != Some(worker.worker_id.0) || h.state != AttemptState::Running {
        return Err(ApiError::Conflict(format!(
            "job {job_id} is not running on worker {}",
            worker.name
        )));
    }
    if h.overdue {
        // A holder that ran past its own timeout (an agent that did not stop its step) keeps
        // the mutex no longer: its lease expires, and the next waiter goes.
        return Err(ApiError::Conflict(format!(
            "job {job_id} has run past its timeout_secs; its mutex lease is not renewed"
        )));
    }
    let (Some(name), Some(token)) = (h.mutex, h.mutex_token) else {
        return Err(ApiError::Conflict(format!(
            "job {job_id} holds no mutex lease"
        )));
    };
    let (step_run, attempt) = (StepRunId(h.step_run_id), h.attempt);
    match s
        .locks
        .renew_for(&name, step_run, attempt as u32, token as u64)
        .await
    {
        Ok(crate::locks::Renewed::Held(current)) => {
            if current != token as u64 {
                // Re-claimed under a new epoch after Redis lost its data: the new token is
                // the attempt's from now on.
                attempts::raise_token(&s.db, job_id, current as i64).await?;
            }
            Ok(Json(LeaseRenewed {
                token: current,
                lease_ms: s.locks.lease().as_millis() as u64,
            }))
        }
        Ok(crate::locks::Renewed::Lost) => Err(ApiError::Conflict(format!(
            "the lease on mutex {name} is gone (expired, taken over, or not re-claimable after Redis lost its data)"
        ))),
        Ok(crate::locks::Renewed::NotYet) => Err(ApiError::Unavailable(format!(
            "mutex {name} cannot be renewed until the dispatcher has a new epoch from PostgreSQL; try again"
        ))),
        Err(e) => Err(ApiError::Unavailable(format!(
            "Redis is unavailable, so mutex {name} cannot be renewed; try again ({e})"
        ))),
    }
}

/// `POST /api/jobs/{job_id}/outputs`: a sensitive output variable from the job's claimant,
/// sealed before it is stored. It never travels through the broker.
pub async fn sensitive_output(
    State(s): State<AppState>,
    worker: WorkerCaller,
    Path(job_id): Path<String>,
    AppJson(req): AppJson<SensitiveOutput>,
) -> ApiResult<axum::http::StatusCode> {
    let job_id: JobId = parse_id(&job_id, "job")?;
    if req.name.is_empty() || req.name.len() > 200 {
        return Err(ApiError::bad("name", "must be 1 to 200 characters"));
    }
    crate::store::jobs::sensitive_output(
        &s.db,
        &s.secrets,
        job_id,
        worker.worker_id,
        &worker.name,
        &req.name,
        &req.value,
    )
    .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
