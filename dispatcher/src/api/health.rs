//! `GET /api/health` and `GET /metrics`.

use super::AppState;
use crate::metrics::label;
use crate::store::metrics;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use gantry_shared::api::Health;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::fmt::Write;
use std::time::Duration;

async fn postgres_ok(state: &AppState) -> bool {
    tokio::time::timeout(Duration::from_secs(2), metrics::ping(&state.db))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// 200 when PostgreSQL, RabbitMQ and Redis all answer; 503 (same body) otherwise.
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let (postgres, redis) = tokio::join!(postgres_ok(&state), state.redis.ping());
    let rabbitmq = state.broker.is_connected();
    let ok = postgres && rabbitmq && redis;
    let mut warnings = Vec::new();
    if state.broker_users.is_none() {
        warnings.push(format!(
            "development mode: amqp.management_url is not set, so every agent shares the broker user {:?} and can forge any worker's results, read every pool's jobs and run code on other workers; see docs/security.md",
            state.broker.user()
        ));
    }
    if !state.builtin_runs_code {
        warnings.push(
            "the built-in worker runs no user code: production = true needs builtin_worker.user set to an unprivileged user for location = \"server\" steps"
                .into(),
        );
    }
    let body = Health {
        status: if ok { "ok" } else { "degraded" }.into(),
        postgres,
        rabbitmq,
        redis,
        version: gantry_shared::VERSION.into(),
        broker_users: state.broker_users.is_some(),
        warnings,
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

/// Prometheus text format. Needs an API key, as every route but `/api/health` does;
/// Prometheus can send it as `Authorization: Bearer KEY` (`authorization.credentials`).
pub async fn metrics(
    State(state): State<AppState>,
    caller: super::extract::Caller,
) -> Result<impl IntoResponse, super::error::ApiError> {
    caller.require(gantry_shared::api::Permission::TaskView)?;
    let mut out = String::new();
    // A metric PostgreSQL cannot give now is left out of this scrape.
    let steps = metrics::steps_by_state(&state.db).await.unwrap_or_default();
    out.push_str("# HELP gantry_steps Step runs by state.\n# TYPE gantry_steps gauge\n");
    for (s, n) in steps {
        let _ = writeln!(out, "gantry_steps{{state=\"{}\"}} {n}", label(s.as_str()));
    }
    let tasks = metrics::tasks_by_state(&state.db).await.unwrap_or_default();
    out.push_str("# HELP gantry_tasks Tasks by state.\n# TYPE gantry_tasks gauge\n");
    for (s, n) in tasks {
        let _ = writeln!(out, "gantry_tasks{{state=\"{}\"}} {n}", label(s.as_str()));
    }
    let running = metrics::running_by_worker(&state.db)
        .await
        .unwrap_or_default();
    out.push_str("# HELP gantry_worker_running_steps Steps running on each worker.\n# TYPE gantry_worker_running_steps gauge\n");
    for (w, n) in running {
        let _ = writeln!(
            out,
            "gantry_worker_running_steps{{worker=\"{}\"}} {n}",
            label(&w)
        );
    }
    let pools = metrics::pools(&state.db).await.unwrap_or_default();
    out.push_str("# HELP gantry_queue_depth Jobs waiting in each pool's queue.\n# TYPE gantry_queue_depth gauge\n");
    if let Some(conn) = state.broker.current()
        && let Ok(ch) = conn.create_channel().await
    {
        for (name, slug) in pools {
            // Passive: reads the count without creating anything. A missing queue closes the
            // channel, so each probe after a failure gets a new one.
            let ch = if ch.status().connected() {
                ch.clone()
            } else {
                match conn.create_channel().await {
                    Ok(c) => c,
                    Err(_) => break,
                }
            };
            if let Ok(q) = ch
                .queue_declare(
                    state.topology.pool_queue(&slug).into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            {
                let _ = writeln!(
                    out,
                    "gantry_queue_depth{{pool=\"{}\",slug=\"{}\"}} {}",
                    label(&name),
                    label(&slug),
                    q.message_count()
                );
            }
        }
        let _ = ch.close(200, "metrics".into()).await;
    }
    state.metrics.render_histogram(&mut out);
    state.metrics.render_counters(&mut out);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}
