//! Every number in a request has a range: a huge, zero or negative one is a 400 naming the
//! field, and the dispatcher goes on serving (no program panics on it).

use gantry_tests::{API_KEY, Stack, script_step};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// A one-step process whose step carries `extra` besides a name and a script.
fn process(extra: Value) -> Value {
    json!({ "name": "p", "steps": [script_step("echo ranged", extra)] })
}

/// The raw JSON text of a one-step process, for numbers serde_json cannot hold.
fn raw_process(extra: &str) -> String {
    format!(r#"{{"name":"p","steps":[{{"name":"s","script":"echo ranged",{extra}}}]}}"#)
}

async fn send_raw(stack: &Stack, method: Method, path: &str, body: &str) -> (u16, Value) {
    let json = [("content-type", "application/json")];
    let (status, _, answer) = stack
        .send_bytes(method, path, &json, body.into())
        .await
        .unwrap();
    (status, answer)
}

fn field(body: &Value) -> Option<&str> {
    body["field"].as_str()
}

#[tokio::test]
async fn huge_zero_and_negative_step_numbers_are_a_400_naming_the_field() {
    // Arrange: no agent; the default pool's steps run on the built-in worker.
    let stack = Stack::start().await.unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "timeout_secs": u64::MAX }), "steps[0].timeout_secs"),
        (json!({ "timeout_secs": 604_801 }), "steps[0].timeout_secs"),
        (json!({ "timeout_secs": 0 }), "steps[0].timeout_secs"),
        (json!({ "timeout_secs": -1 }), "steps[0].timeout_secs"),
        (
            json!({ "mutex": "m", "mutex_timeout_secs": 100_000_000_000_000_000_u64 }),
            "steps[0].mutex_timeout_secs",
        ),
        (
            json!({ "mutex": "m", "mutex_timeout_secs": u64::MAX }),
            "steps[0].mutex_timeout_secs",
        ),
        (
            json!({ "mutex": "m", "mutex_timeout_secs": -5 }),
            "steps[0].mutex_timeout_secs",
        ),
        (json!({ "retries": 1000 }), "steps[0].retries"),
        (json!({ "retries": 6 }), "steps[0].retries"),
        (json!({ "retries": -1 }), "steps[0].retries"),
    ];

    // Act
    let mut answers = Vec::new();
    for (extra, want) in &cases {
        let (status, body) = stack
            .request(
                Method::POST,
                "/api/tasks",
                Some(API_KEY),
                Some(process(extra.clone())),
            )
            .await
            .unwrap();
        answers.push((extra.clone(), *want, status, body));
    }
    // Beyond u64 and fractional: numbers JSON allows that no field takes.
    let mut raw_answers = Vec::new();
    for (extra, want) in [
        (
            r#""timeout_secs":18446744073709551616"#,
            "steps[0].timeout_secs",
        ),
        (r#""timeout_secs":1e300"#, "steps[0].timeout_secs"),
        (r#""retries":2.5"#, "steps[0].retries"),
    ] {
        let (status, body) =
            send_raw(&stack, Method::POST, "/api/tasks", &raw_process(extra)).await;
        raw_answers.push((extra, want, status, body));
    }
    // Then an ordinary task at the edges of the ranges still runs.
    let ok = stack
        .submit(
            "name = \"edges\"\n[[steps]]\nname = \"s\"\nscript = \"echo edge\"\ntimeout_secs = 604800\nretries = 5\n",
        )
        .await
        .unwrap();
    let ok = stack.wait_task(ok, Duration::from_secs(60)).await.unwrap();

    // Assert
    for (extra, want, status, body) in &answers {
        assert_eq!(*status, 400, "{extra}: {body}");
        assert_eq!(field(body), Some(*want), "{extra}: {body}");
    }
    for (extra, want, status, body) in &raw_answers {
        assert_eq!(*status, 400, "{extra}: {body}");
        assert_eq!(field(body), Some(*want), "{extra}: {body}");
    }
    assert_eq!(ok.summary.state, "Success", "{ok:?}");
}

#[tokio::test]
async fn worker_settings_and_paging_numbers_are_a_400_naming_the_field() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let (status, registered) = stack
        .request(
            Method::POST,
            "/api/workers",
            Some(API_KEY),
            Some(json!({ "name": "w-ok", "max_concurrent_steps": 1000 })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{registered}");
    let worker = registered["worker"]["id"].as_str().unwrap().to_owned();
    let json_cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/api/workers".into(),
            json!({ "name": "w0", "max_concurrent_steps": 0 }),
            "max_concurrent_steps",
        ),
        (
            Method::POST,
            "/api/workers".into(),
            json!({ "name": "w1", "max_concurrent_steps": 1_000_000_000 }),
            "max_concurrent_steps",
        ),
        (
            Method::POST,
            "/api/workers".into(),
            json!({ "name": "w2", "max_concurrent_steps": -3 }),
            "max_concurrent_steps",
        ),
        (
            Method::PATCH,
            format!("/api/workers/{worker}"),
            json!({ "max_concurrent_steps": 0 }),
            "max_concurrent_steps",
        ),
        (
            Method::PATCH,
            format!("/api/workers/{worker}"),
            json!({ "max_concurrent_steps": 1_000_000_000 }),
            "max_concurrent_steps",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "no_healthy_worker_timeout_secs": 0 }),
            "no_healthy_worker_timeout_secs",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "no_healthy_worker_timeout_secs": u32::MAX }),
            "no_healthy_worker_timeout_secs",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "machine_policy": { "heartbeat_interval_secs": 0 } }),
            "machine_policy.heartbeat_interval_secs",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "machine_policy": { "heartbeat_interval_secs": u32::MAX } }),
            "machine_policy.heartbeat_interval_secs",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "machine_policy": { "unavailable_after_secs": u32::MAX } }),
            "machine_policy.unavailable_after_secs",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "machine_policy": { "min_free_disk_mb": u64::MAX } }),
            "machine_policy.min_free_disk_mb",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "machine_policy": { "min_free_disk_mb": -1 } }),
            "machine_policy.min_free_disk_mb",
        ),
    ];

    // Act
    let mut answers = stack.send_cases(&json_cases).await.unwrap();
    for limit in ["0", "1001", "-1", "99999999999999999999999", "ten"] {
        let (status, answer) = stack
            .request(
                Method::GET,
                &format!("/api/tasks?limit={limit}"),
                Some(API_KEY),
                None,
            )
            .await
            .unwrap();
        answers.push((format!("limit={limit}"), "limit", status, answer));
    }
    let settings: gantry_tests::gantry_shared::api::Settings =
        stack.get("/api/settings").await.unwrap();
    let (health, _) = stack
        .request(Method::GET, "/api/health", None, None)
        .await
        .unwrap();

    // Assert
    for (what, want, status, body) in &answers {
        assert_eq!(*status, 400, "{what}: {body}");
        assert_eq!(field(body), Some(*want), "{what}: {body}");
    }
    assert_eq!(
        settings.machine_policy,
        gantry_tests::gantry_shared::api::MachinePolicy::default(),
        "a refused change changes nothing"
    );
    assert_eq!(health, 200);
}
