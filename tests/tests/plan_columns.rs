//! The columns the plan reads (`step_runs.kind`, `parallel`, `run_condition`, `mutex`) are
//! generated from the step's spec by the database: for every spec, whether the dispatcher
//! wrote it (every field present) or it leaves fields out (serde's defaults), they say what
//! the spec says once parsed.

use gantry_tests::Stack;
use gantry_tests::gantry_shared::process::{Process, StepSpec};
use uuid::Uuid;

const PROCESS: &str = r#"
name = "every plan field"

[[steps]]
name = "plain"
script = "true"

[[steps]]
name = "side"
script = "true"
parallel = true
condition = "always"
mutex = "db"

[[steps]]
name = "cleanup"
script = "true"
condition = "failure"

[[steps]]
name = "gate"
kind = "manual"
instructions = "look"

[[steps]]
name = "mail"
kind = "email"
to = ["ops@example.com"]
subject = "s"
body = "b"
parallel = true
"#;

#[tokio::test]
async fn the_plan_columns_say_what_the_spec_says() {
    let stack = Stack::start().await.unwrap();
    let db = stack.db().await;
    let task = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO tasks (id, name, state, process, variables) VALUES ($1, 't', 'Queued', '{}', '{}')",
    )
    .bind(task)
    .execute(&db)
    .await
    .unwrap();
    let process = Process::from_toml(PROCESS).unwrap();
    let mut specs: Vec<serde_json::Value> = process
        .steps
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    // A spec that leaves out everything it may: the columns take serde's defaults.
    specs.push(serde_json::json!({"name": "bare", "script": "true"}));
    // An explicit null mutex is no mutex.
    specs.push(serde_json::json!({"name": "nulls", "mutex": null, "parallel": true}));
    for (i, spec) in specs.iter().enumerate() {
        sqlx::query(
            "INSERT INTO step_runs (id, task_id, idx, name, spec) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::new_v4())
        .bind(task)
        .bind(i as i32)
        .bind(format!("s{i}"))
        .bind(spec)
        .execute(&db)
        .await
        .unwrap();
    }
    let rows: Vec<(serde_json::Value, String, bool, String, Option<String>)> = sqlx::query_as(
        "SELECT spec, kind, parallel, run_condition, mutex FROM step_runs
         WHERE task_id = $1 ORDER BY idx",
    )
    .bind(task)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rows.len(), specs.len());
    let mut kinds = std::collections::BTreeSet::new();
    for (spec, kind, parallel, condition, mutex) in rows {
        let parsed: StepSpec = serde_json::from_value(spec.clone()).unwrap();
        let kind_name = serde_json::to_value(parsed.kind).unwrap();
        assert_eq!(kind, kind_name.as_str().unwrap(), "{spec}");
        assert_eq!(parallel, parsed.parallel, "{spec}");
        assert_eq!(condition, parsed.condition.as_str(), "{spec}");
        assert_eq!(mutex, parsed.mutex, "{spec}");
        kinds.insert(kind);
    }
    // The cases above cover every kind, both parallel values and a mutex.
    assert_eq!(kinds.len(), 3);
}
