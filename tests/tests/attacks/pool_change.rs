//! A worker removed from a pool: it can no longer consume that pool's queue, at once, and its
//! agent goes on with the pools it still serves.

use gantry_tests::gantry_shared::api::Worker;
use gantry_tests::{API_KEY, AgentOpts, Stack, eventually};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use std::time::Duration;

async fn consume(stack: &Stack, (user, pw): (&str, &str), queue: &str) -> Result<(), String> {
    let conn = stack.amqp_as(user, pw).await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let r = ch
        .basic_consume(
            queue.into(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

#[tokio::test]
async fn a_worker_removed_from_a_pool_cannot_consume_its_queue_at_once() {
    // Arrange: an agent in pools a and b; a second connection with its user holds a consumer
    // on b's queue (what an open channel keeps even after its rights change).
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("a").await.unwrap();
    stack.add_pool("b").await.unwrap();
    let idx = stack
        .add_agent(
            "mover",
            AgentOpts {
                pools: vec!["a".into(), "b".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let creds = stack.broker_credentials(idx).unwrap();
    let t = stack.topology();
    let held = stack.amqp_as(&creds.user, &creds.password).await.unwrap();
    let held_ch = held.create_channel().await.unwrap();
    held_ch
        .basic_consume(
            t.pool_queue("b").as_str().into(),
            "held".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let id = stack
        .get::<Vec<Worker>>("/api/workers")
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.name == "mover")
        .unwrap()
        .id;

    // Act
    let (status, body) = stack
        .request(
            reqwest::Method::PATCH,
            &format!("/api/workers/{id}"),
            Some(API_KEY),
            Some(serde_json::json!({ "pools": ["a"] })),
        )
        .await
        .unwrap();
    let cut = eventually(
        Duration::from_secs(5),
        "the held consumer's connection closed",
        || async { (!held.status().connected()).then_some(()) },
    )
    .await;
    let b_now = consume(&stack, (&creds.user, &creds.password), &t.pool_queue("b")).await;
    let a_now = consume(&stack, (&creds.user, &creds.password), &t.pool_queue("a")).await;
    let task = stack
        .submit("name = \"on-a\"\n[[steps]]\nname = \"s\"\npool = \"a\"\nscript = \"echo still serving a\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let (bad, _) = stack
        .request(
            reqwest::Method::PATCH,
            &format!("/api/workers/{id}"),
            Some(API_KEY),
            Some(serde_json::json!({ "pools": [] })),
        )
        .await
        .unwrap();

    // Assert
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pools"].as_array().map(Vec::len), Some(1), "{body}");
    cut.unwrap();
    assert!(
        matches!(&b_now, Err(e) if e.contains("ACCESS_REFUSED")),
        "{b_now:?}"
    );
    assert_eq!(a_now, Ok(()));
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(bad, 400, "a worker serves one pool at least");
    assert!(
        stack
            .agent(idx)
            .log_text()
            .contains("this worker's pools changed")
    );
}
