//! # Facts: what a step being started needs, in one statement
//!
//! Its full spec (the plan reads only the columns generated from it), what [`route`] needs
//! of its pool (the pool's workers, the task's worker there, whether the built-in worker is
//! enabled) and every value its job or its rendered fields may reference (the outputs of the
//! task's steps, the names of its secrets). A conclusion that starts the next step used to
//! read these in three statements.

use super::advance::{StepRecord, TaskRecord};
use super::route::{self, PoolFacts, WorkerFacts};
use gantry_shared::ids::StepRunId;
use gantry_shared::process::StepSpec;
use gantry_shared::states::WorkerHealth;
use sqlx::PgConnection;
use sqlx::types::Json;
use std::collections::BTreeMap;
use uuid::Uuid;

/// What [`load`] read for one step.
pub(super) struct StepFacts {
    pub spec: StepSpec,
    pub route: route::Facts,
    pub values: Values,
}

/// An output of one of the task's steps (its current attempt's).
struct Output {
    step: String,
    name: String,
    value: Option<String>,
    sensitive: bool,
}

/// The task's stored values a step may reference.
pub(super) struct Values {
    outputs: Vec<Output>,
    /// The names of the task's secrets (its sensitive variables).
    secrets: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    spec: Json<StepSpec>,
    worker_ids: Option<Vec<Uuid>>,
    worker_enabled: Option<Vec<bool>>,
    worker_health: Option<Vec<WorkerHealth>>,
    sticky: Option<Uuid>,
    builtin_enabled: Option<bool>,
    output_steps: Option<Vec<String>>,
    output_names: Option<Vec<String>>,
    output_values: Option<Vec<Option<String>>>,
    output_sensitive: Option<Vec<bool>>,
    secrets: Vec<String>,
}

/// Read the facts for `step` of `task`. A spec that does not parse is an error (the
/// advance fails and is retried; nothing of it is kept).
pub(super) async fn load(
    conn: &mut PgConnection,
    step: &StepRecord,
    builtin_runs_code: bool,
) -> anyhow::Result<StepFacts> {
    // Each aggregate orders by the same key, so the arrays of one source line up.
    let row: Row = sqlx::query_as(
        "SELECT s.spec,
                w.ids AS worker_ids, w.enabled AS worker_enabled, w.health AS worker_health,
                (SELECT tw.worker_id FROM task_pool_workers tw
                 WHERE tw.task_id = s.task_id AND tw.pool_id = s.pool_id) AS sticky,
                (SELECT builtin_worker_enabled FROM settings) AS builtin_enabled,
                o.steps AS output_steps, o.names AS output_names, o.vals AS output_values,
                o.sensitive AS output_sensitive,
                ARRAY(SELECT ts.name FROM task_secrets ts
                      WHERE ts.task_id = s.task_id) AS secrets
         FROM step_runs s
         CROSS JOIN LATERAL (
             SELECT array_agg(w.id ORDER BY w.id) AS ids,
                    array_agg(w.enabled ORDER BY w.id) AS enabled,
                    array_agg(w.health ORDER BY w.id) AS health
             FROM worker_pools wp JOIN workers w ON w.id = wp.worker_id AND NOT w.builtin
             WHERE wp.pool_id = s.pool_id) w
         CROSS JOIN LATERAL (
             SELECT array_agg(r.name ORDER BY r.idx, o.name) AS steps,
                    array_agg(o.name ORDER BY r.idx, o.name) AS names,
                    array_agg(o.value ORDER BY r.idx, o.name) AS vals,
                    array_agg(o.sensitive ORDER BY r.idx, o.name) AS sensitive
             FROM output_variables o
             JOIN step_runs r ON r.id = o.step_run_id AND o.attempt = r.attempt
             WHERE r.task_id = s.task_id) o
         WHERE s.id = $1",
    )
    .bind(step.id)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| {
        anyhow::Error::new(e).context(format!("reading step {} for its start", StepRunId(step.id)))
    })?;
    let pool = match (step.pool_id, step.pool_slug.as_deref()) {
        (Some(id), Some(slug)) => {
            let ids = row.worker_ids.unwrap_or_default();
            let enabled = row.worker_enabled.unwrap_or_default();
            let health = row.worker_health.unwrap_or_default();
            let workers = ids
                .into_iter()
                .zip(enabled)
                .zip(health)
                .map(|((id, enabled), health)| WorkerFacts {
                    id,
                    enabled,
                    health,
                })
                .collect();
            Some(PoolFacts {
                id,
                slug: slug.to_owned(),
                name: step.pool_name.clone().unwrap_or_default(),
                is_default: step.pool_is_default == Some(true),
                workers,
                sticky: row.sticky,
            })
        }
        _ => None,
    };
    let builtin_enabled = route::needs_builtin_setting(pool.as_ref(), builtin_runs_code)
        .then_some(row.builtin_enabled == Some(true));
    let outputs = row
        .output_steps
        .unwrap_or_default()
        .into_iter()
        .zip(row.output_names.unwrap_or_default())
        .zip(row.output_values.unwrap_or_default())
        .zip(row.output_sensitive.unwrap_or_default())
        .map(|(((step, name), value), sensitive)| Output {
            step,
            name,
            value,
            sensitive,
        })
        .collect();
    Ok(StepFacts {
        spec: row.spec.0,
        route: route::Facts {
            pool,
            builtin_runs_code,
            builtin_enabled,
        },
        values: Values {
            outputs,
            secrets: {
                let mut names = row.secrets;
                names.sort();
                names
            },
        },
    })
}

impl Values {
    /// Every value a step may reference that may travel in clear (task variables, earlier
    /// steps' outputs, `Gantry.*`), and the names of the sensitive ones, which never do: the
    /// secrets' in name order, then the sensitive outputs'.
    pub fn visible(
        &self,
        task: &TaskRecord,
        step_name: &str,
        attempt: u32,
    ) -> (BTreeMap<String, String>, Vec<String>) {
        let mut variables: BTreeMap<String, String> = task
            .variables
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let mut sensitive = self.secrets.clone();
        for o in &self.outputs {
            let key = format!("Steps.{}.Output.{}", o.step, o.name);
            if o.sensitive {
                sensitive.push(key);
            } else {
                variables.insert(key, o.value.clone().unwrap_or_default());
            }
        }
        variables.insert("Gantry.Task.Id".into(), task.id.to_string());
        variables.insert("Gantry.Task.Name".into(), task.name.clone());
        variables.insert("Gantry.Step.Name".into(), step_name.to_owned());
        variables.insert("Gantry.Step.Attempt".into(), attempt.to_string());
        (variables, sensitive)
    }
}
