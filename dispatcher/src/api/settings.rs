//! `/api/settings`: whether the built-in worker runs, how long a step waits for a healthy
//! worker, and the machine policy (heartbeat interval, `unavailable_after`, health check).

use super::AppState;
use super::error::ApiResult;
use super::extract::{AppJson, Caller};
use crate::store::settings;
use axum::Json;
use axum::extract::State;
use gantry_shared::amqp::json_properties;
use gantry_shared::api::{Permission, Settings, SettingsUpdate};
use gantry_shared::wire::Control;

pub async fn get(State(s): State<AppState>, _caller: Caller) -> ApiResult<Json<Settings>> {
    Ok(Json(settings::get(&s.db).await?))
}

pub async fn put(
    State(s): State<AppState>,
    caller: Caller,
    AppJson(req): AppJson<SettingsUpdate>,
) -> ApiResult<Json<Settings>> {
    caller.require(Permission::ConfigureServer)?;
    let (before, after) = settings::update(&s.db, &req).await?;
    if before.machine_policy != after.machine_policy {
        // Connected agents read it again at once; others when they (re)connect. The message
        // only says "read your configuration": the policy (a script!) never travels through
        // the broker, where it could be forged.
        let workers = crate::store::workers::ids(&s.db).await?;
        let msg = Control::Reconfigure.encode();
        for w in workers {
            if let Err(e) = s
                .control
                .publish(
                    &s.topology.control_exchange(),
                    &w.to_string(),
                    &msg,
                    json_properties(),
                )
                .await
            {
                tracing::debug!(error = %e, worker = %w, "policy not delivered (agent not connected?)");
            }
        }
    }
    tracing::info!(?after, "settings changed");
    Ok(Json(after))
}
