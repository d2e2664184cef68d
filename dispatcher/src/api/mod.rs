//! # The REST API
//!
//! JSON under `/api`, authenticated by `X-Gantry-ApiKey` (permissions `ConfigureServer`,
//! `TaskCreate`, `TaskView`), except `GET /api/health`, and the agent-only routes
//! (`/api/agent/config`, `/api/jobs/{id}/claim`, `.../outputs`, `.../lease`, `.../log`), which take a
//! worker credential (`X-Gantry-Worker-Token`). Every error is `{"error", "field"}` with a 4xx for bad input.

mod artifacts;
pub mod error;
pub mod extract;
mod health;
mod job_log;
mod jobs;
mod keys;
mod logs;
mod pools;
mod rejections;
mod settings;
mod tasks;
mod workers;

use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::orchestrator::Orchestrator;
use crate::secrets::SecretBox;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use error::ApiError;
use gantry_shared::amqp::Broker;
use gantry_shared::topology::Topology;
use sqlx::PgPool;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub topology: Topology,
    pub broker: Broker,
    pub orchestrator: Orchestrator,
    pub notifier: Notifier,
    /// API keys and worker tokens this node has looked up (see `credentials`).
    pub credentials: Arc<crate::credentials::Credentials>,
    pub secrets: SecretBox,
    pub metrics: Arc<Metrics>,
    pub redis: Arc<gantry_shared::redis_link::RedisLink>,
    pub locks: crate::locks::Locks,
    /// Delay before a failed step's next attempt (doubled per attempt).
    pub retry_base: std::time::Duration,
    /// Publishes control messages to agents.
    pub control: Arc<gantry_shared::amqp::Publisher>,
    /// Per-worker broker users (none in development mode).
    pub broker_users: Option<crate::broker_users::BrokerUsers>,
    /// `production = true`.
    pub production: bool,
    /// Whether the built-in worker may run user code (not in production without an
    /// unprivileged `builtin_worker.user`).
    pub builtin_runs_code: bool,
    /// `approvals.allow_self`: a task's creating key may decide its manual steps.
    pub approvals_allow_self: bool,
    pub cancel: CancellationToken,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/health", get(health::health))
        .route("/api/pools", get(pools::list).post(pools::create))
        .route(
            "/api/pools/{id}",
            get(pools::get).patch(pools::patch).delete(pools::delete),
        )
        .route("/api/workers", get(workers::list).post(workers::register))
        .route(
            "/api/workers/{id}",
            get(workers::get)
                .patch(workers::patch)
                .delete(workers::delete),
        )
        .route("/api/workers/{id}/health", get(workers::health_history))
        .route("/api/settings", get(settings::get).put(settings::put))
        .route("/api/agent/config", get(jobs::agent_config))
        .route("/api/jobs/{job_id}/claim", post(jobs::claim))
        .route("/api/jobs/{job_id}/outputs", post(jobs::sensitive_output))
        .route("/api/jobs/{job_id}/lease", post(jobs::renew_lease))
        .route("/api/jobs/{job_id}/log", get(job_log::stored))
        .route(
            "/api/keys",
            get(keys::list)
                .post(keys::create)
                .delete(keys::delete_by_body),
        )
        .route("/api/keys/{id}", axum::routing::delete(keys::delete))
        .route("/api/tasks", get(tasks::list).post(tasks::create))
        .route("/api/tasks/{id}", get(tasks::get))
        .route("/api/tasks/{id}/cancel", post(tasks::cancel))
        .route("/api/tasks/{id}/steps/{name}/approve", post(tasks::approve))
        .route("/api/tasks/{id}/steps/{name}/reject", post(tasks::reject))
        .route("/api/tasks/{id}/log", get(logs::log))
        .route("/api/tasks/{id}/artifacts", get(artifacts::list))
        .route("/api/artifacts/{id}", get(artifacts::download))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(extract::MAX_BODY))
        .layer(axum::middleware::from_fn(rejections::json_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see docs/api.md for the routes")
}

async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(gantry_shared::api::ErrorBody {
            error: "this route does not take that method".into(),
            field: None,
        }),
    )
}

/// Parse a query string into a map, with a JSON error for a malformed one.
pub fn query_map(raw: Option<&str>) -> Result<std::collections::HashMap<String, String>, ApiError> {
    match raw {
        None => Ok(Default::default()),
        Some(q) => serde_urlencoded_lite(q),
    }
}

fn serde_urlencoded_lite(q: &str) -> Result<std::collections::HashMap<String, String>, ApiError> {
    Ok(url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}
