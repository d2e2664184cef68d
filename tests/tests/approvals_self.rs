//! `approvals.allow_self`: with `false`, the API key that created a task cannot approve or
//! reject its manual steps (403, JSON), while another key with `TaskCreate` can; by default
//! the creator may decide its own steps.

use gantry_tests::gantry_shared::api::{Task, TaskCreated};
use gantry_tests::{API_KEY, Stack};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const GATED: &str = r#"
name = "gated"
[[steps]]
name = "gate"
kind = "manual"
instructions = "Look at the dashboards"
[[steps]]
name = "ship"
script = "echo shipped"
"#;

/// Submit `GATED` with `key` and wait until it waits for its approval.
async fn submit_as(stack: &Stack, key: &str) -> String {
    let body = gantry_tests::gantry_dispatcher::cli::process_json(GATED).unwrap();
    let (status, created) = stack
        .request(Method::POST, "/api/tasks", Some(key), Some(body))
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    let created: TaskCreated = serde_json::from_value(created).unwrap();
    stack
        .wait_task_until(created.id, Duration::from_secs(30), |t| {
            t.summary.state == "Waiting"
        })
        .await
        .unwrap();
    created.id.to_string()
}

async fn decide(stack: &Stack, key: &str, task: &str, verb: &str) -> (u16, Value) {
    stack
        .request(
            Method::POST,
            &format!("/api/tasks/{task}/steps/gate/{verb}"),
            Some(key),
            Some(json!({ "note": "checked" })),
        )
        .await
        .unwrap()
}

fn gate(task: &Task) -> &gantry_tests::gantry_shared::api::StepRun {
    task.steps.iter().find(|s| s.name == "gate").unwrap()
}

#[tokio::test]
async fn with_allow_self_false_the_creator_gets_403_and_another_key_decides() {
    // Arrange
    let stack = Stack::start_with(vec![(
        "GANTRY__APPROVALS__ALLOW_SELF".into(),
        "false".into(),
    )])
    .await
    .unwrap();
    let creator = stack
        .create_key("creator", &["TaskCreate", "TaskView"])
        .await
        .unwrap();
    let approver = stack
        .create_key("approver", &["TaskCreate", "TaskView"])
        .await
        .unwrap();
    let approved = submit_as(&stack, &creator).await;
    let rejected = submit_as(&stack, &creator).await;

    // Act
    let self_approve = decide(&stack, &creator, &approved, "approve").await;
    let self_reject = decide(&stack, &creator, &rejected, "reject").await;
    let after_refusals: Task = stack.get(&format!("/api/tasks/{approved}")).await.unwrap();
    let other_approve = decide(&stack, &approver, &approved, "approve").await;
    let other_reject = decide(&stack, &approver, &rejected, "reject").await;
    let approved = stack
        .wait_task(approved.parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();
    let rejected = stack
        .wait_task(rejected.parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    for (what, (status, body)) in [("approve", &self_approve), ("reject", &self_reject)] {
        assert_eq!(*status, 403, "self-{what}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("allow_self")),
            "self-{what}: {body}"
        );
        assert!(body.get("field").is_some(), "{body}");
    }
    assert_eq!(
        gate(&after_refusals).state,
        "Waiting",
        "a refusal decides nothing"
    );
    assert!(
        gate(&after_refusals)
            .approval
            .as_ref()
            .is_some_and(|a| a.decision.is_none())
    );
    assert_eq!(other_approve.0, 200, "{}", other_approve.1);
    assert_eq!(other_reject.0, 200, "{}", other_reject.1);
    assert_eq!(approved.summary.state, "Success", "{approved:?}");
    assert_eq!(
        gate(&approved)
            .approval
            .as_ref()
            .and_then(|a| a.decided_by.clone())
            .as_deref(),
        Some("approver")
    );
    assert_eq!(rejected.summary.state, "Failed", "{rejected:?}");
}

#[tokio::test]
async fn by_default_the_creator_may_decide_its_own_manual_steps() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let approved = submit_as(&stack, API_KEY).await;
    let rejected = submit_as(&stack, API_KEY).await;

    // Act
    let approve = decide(&stack, API_KEY, &approved, "approve").await;
    let reject = decide(&stack, API_KEY, &rejected, "reject").await;
    let approved = stack
        .wait_task(approved.parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();
    let rejected = stack
        .wait_task(rejected.parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(approve.0, 200, "{}", approve.1);
    assert_eq!(reject.0, 200, "{}", reject.1);
    assert_eq!(approved.summary.state, "Success", "{approved:?}");
    assert_eq!(rejected.summary.state, "Failed", "{rejected:?}");
}
