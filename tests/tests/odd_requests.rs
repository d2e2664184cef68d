//! Odd bytes and odd requests: a NUL in any string field is a 400 naming the field (never a
//! 500), and every error, a 413, a bad path, a 404, a 405 or bad JSON, is a JSON
//! `{"error", "field"}` body.

use gantry_tests::{API_KEY, Stack, script_step};
use reqwest::Method;
use serde_json::{Value, json};

/// Send `body` as it is, with an API key, and read the answer as JSON if it is JSON.
async fn send(
    stack: &Stack,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Option<String>, Value) {
    stack.send_bytes(method, path, headers, body).await.unwrap()
}

#[tokio::test]
async fn a_nul_in_any_string_field_is_a_400_naming_the_field() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let (status, registered) = stack
        .request(
            Method::POST,
            "/api/workers",
            Some(API_KEY),
            Some(json!({ "name": "w-nul" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{registered}");
    let worker_token = registered["token"].as_str().unwrap().to_owned();
    let nul = "a\u{0}b";
    let task = |steps: Vec<Value>, variables: Value| json!({ "name": "p", "variables": variables, "steps": steps });
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::POST,
            "/api/tasks".into(),
            json!({ "name": nul, "steps": [script_step("echo hi", json!({}))] }),
            "name",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step("echo hi", json!({ "script": nul }))],
                json!({}),
            ),
            "steps[0].script",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step("echo hi", json!({ "name": nul }))],
                json!({}),
            ),
            "steps[0].name",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step("echo hi", json!({}))],
                json!({ "Plain": nul }),
            ),
            "variables.Plain",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step("echo hi", json!({}))],
                json!({ "Pw": { "value": format!("long-{nul}"), "sensitive": true } }),
            ),
            "variables.Pw.value",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(vec![script_step("echo hi", json!({}))], json!({ nul: "v" })),
            "variables.a\\u0000b",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step(
                    "echo hi",
                    json!({ "artifacts": ["ok/*", nul] }),
                )],
                json!({}),
            ),
            "steps[0].artifacts[1]",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step("echo hi", json!({ "pool": nul }))],
                json!({}),
            ),
            "steps[0].pool",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![script_step("echo hi", json!({ "mutex": nul }))],
                json!({}),
            ),
            "steps[0].mutex",
        ),
        (
            Method::POST,
            "/api/tasks".into(),
            task(
                vec![json!({ "name": "gate", "kind": "manual", "instructions": nul })],
                json!({}),
            ),
            "steps[0].instructions",
        ),
        (
            Method::POST,
            "/api/pools".into(),
            json!({ "name": nul }),
            "name",
        ),
        (
            Method::POST,
            "/api/pools".into(),
            json!({ "name": "fine", "description": nul }),
            "description",
        ),
        (
            Method::POST,
            "/api/keys".into(),
            json!({ "name": nul, "permissions": ["TaskView"] }),
            "name",
        ),
        (
            Method::POST,
            "/api/workers".into(),
            json!({ "name": nul }),
            "name",
        ),
        (
            Method::POST,
            "/api/workers".into(),
            json!({ "name": "w2", "pools": [nul] }),
            "pools[0]",
        ),
        (
            Method::PUT,
            "/api/settings".into(),
            json!({ "machine_policy": { "health_check_script": format!("echo {nul}") } }),
            "machine_policy.health_check_script",
        ),
        (
            Method::POST,
            format!("/api/tasks/{}/steps/gate/approve", uuid::Uuid::now_v7()),
            json!({ "note": nul }),
            "note",
        ),
    ];

    // Act
    let mut answers = stack.send_cases(&cases).await.unwrap();
    // A worker's own request: a sensitive output whose name holds a NUL.
    let (status, content_type, answer) = send(
        &stack,
        Method::POST,
        &format!("/api/jobs/{}/outputs", uuid::Uuid::now_v7()),
        &[
            ("X-Gantry-Worker-Token", &worker_token),
            ("content-type", "application/json"),
        ],
        serde_json::to_vec(&json!({ "name": nul, "value": "v" })).unwrap(),
    )
    .await;
    assert_eq!(content_type.as_deref(), Some("application/json"));
    answers.push(("sensitive output".into(), "name", status, answer));
    // Query strings and path segments.
    for (path, want) in [
        ("/api/tasks?state=Queued%00", "state"),
        ("/api/tasks/abc%00def", "path"),
        ("/api/pools/x%00", "path"),
    ] {
        let (status, answer) = stack
            .request(Method::GET, path, Some(API_KEY), None)
            .await
            .unwrap();
        answers.push((path.into(), want, status, answer));
    }
    let (health, _) = stack
        .request(Method::GET, "/api/health", None, None)
        .await
        .unwrap();

    // Assert
    for (what, want, status, body) in &answers {
        assert_eq!(*status, 400, "{what}: {body}");
        assert_eq!(body["field"].as_str(), Some(*want), "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("NUL")),
            "{what}: {body}"
        );
    }
    assert_eq!(health, 200, "the dispatcher still serves");
}

#[tokio::test]
async fn every_error_is_a_json_body_413_bad_paths_404_405_and_bad_json_included() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let approve = format!("/api/tasks/{}/steps/gate/approve", uuid::Uuid::now_v7());
    let json_ct = [("content-type", "application/json")];
    // Just over the 8 MiB limit: a JSON string of spaces.
    let mut huge = b"{\"note\": \"".to_vec();
    huge.resize(8 * 1024 * 1024 + 1024, b' ');
    huge.extend_from_slice(b"\"}");

    // Act
    let answers = vec![
        (
            "413 on approve",
            413,
            send(&stack, Method::POST, &approve, &json_ct, huge).await,
        ),
        (
            "bad JSON on approve",
            400,
            send(&stack, Method::POST, &approve, &json_ct, b"{".to_vec()).await,
        ),
        (
            "bad JSON on tasks",
            400,
            send(
                &stack,
                Method::POST,
                "/api/tasks",
                &json_ct,
                b"{\"name\": ".to_vec(),
            )
            .await,
        ),
        (
            "non-UTF-8 path",
            400,
            send(&stack, Method::GET, "/api/tasks/%FF%FE", &[], Vec::new()).await,
        ),
        (
            "non-UTF-8 step name",
            400,
            send(
                &stack,
                Method::POST,
                &format!("/api/tasks/{}/steps/%C3%28/approve", uuid::Uuid::now_v7()),
                &[],
                Vec::new(),
            )
            .await,
        ),
        (
            "non-UTF-8 query",
            400,
            send(&stack, Method::GET, "/api/tasks?state=%FF", &[], Vec::new()).await,
        ),
        (
            "404",
            404,
            send(&stack, Method::GET, "/api/no-such-route", &[], Vec::new()).await,
        ),
        (
            "405",
            405,
            send(&stack, Method::DELETE, "/api/tasks", &[], Vec::new()).await,
        ),
        (
            "405 on health",
            405,
            send(&stack, Method::POST, "/api/health", &[], Vec::new()).await,
        ),
    ];
    let (health, _) = stack
        .request(Method::GET, "/api/health", None, None)
        .await
        .unwrap();

    // Assert
    for (what, want, (status, content_type, body)) in &answers {
        assert_eq!(status, want, "{what}: {body}");
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{what}: {body}"
        );
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
        assert!(
            body.get("field").is_some(),
            "{what}: the body has a field key: {body}"
        );
    }
    let field = |what: &str| {
        answers
            .iter()
            .find(|(w, _, _)| *w == what)
            .map(|(_, _, (_, _, b))| b["field"].clone())
            .unwrap()
    };
    assert_eq!(field("non-UTF-8 path"), json!("path"));
    assert_eq!(field("non-UTF-8 step name"), json!("path"));
    assert_eq!(field("non-UTF-8 query"), json!("query"));
    assert_eq!(
        field("bad JSON on approve"),
        Value::Null,
        "no field is at fault"
    );
    assert_eq!(health, 200);
}
