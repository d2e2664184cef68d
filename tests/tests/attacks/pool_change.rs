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

#[tokio::test]
async fn a_disabled_worker_reads_nothing_but_its_control_queue_until_enabled() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("a").await.unwrap();
    let idx = stack
        .add_agent(
            "pausable",
            AgentOpts {
                pools: vec!["a".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let creds = stack.broker_credentials(idx).unwrap();
    let c = (creds.user.as_str(), creds.password.as_str());
    let t = stack.topology();
    let id = stack
        .get::<Vec<Worker>>("/api/workers")
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.name == "pausable")
        .unwrap()
        .id;
    let patch = |enabled: bool| {
        let stack = &stack;
        async move {
            stack
                .request(
                    reqwest::Method::PATCH,
                    &format!("/api/workers/{id}"),
                    Some(API_KEY),
                    Some(serde_json::json!({ "enabled": enabled })),
                )
                .await
                .unwrap()
                .0
        }
    };

    // Act
    let off = patch(false).await;
    let pool_while_off = consume(&stack, c, &t.pool_queue("a")).await;
    let own_while_off = consume(&stack, c, &t.worker_queue(id)).await;
    let on = patch(true).await;
    let pool_after = consume(&stack, c, &t.pool_queue("a")).await;
    let task = stack
        .submit("name = \"back\"\n[[steps]]\nname = \"s\"\npool = \"a\"\nscript = \"echo back\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert_eq!((off, on), (200, 200));
    assert!(
        matches!(&pool_while_off, Err(e) if e.contains("ACCESS_REFUSED")),
        "{pool_while_off:?}"
    );
    assert!(
        matches!(&own_while_off, Err(e) if e.contains("ACCESS_REFUSED")),
        "{own_while_off:?}"
    );
    assert_eq!(pool_after, Ok(()));
    assert_eq!(
        done.summary.state, "Success",
        "the agent took steps again: {done:#?}"
    );
}

#[tokio::test]
async fn an_agent_whose_pool_queue_went_missing_serves_its_other_pools_and_gets_it_back() {
    // Arrange: an agent in pools a and b; pool a's queue is deleted under it (agents may
    // not declare queues; the dispatcher declares them again).
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("a").await.unwrap();
    stack.add_pool("b").await.unwrap();
    let idx = stack
        .add_agent(
            "both",
            AgentOpts {
                pools: vec!["a".into(), "b".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let admin = stack.amqp().await;
    let ch = admin.create_channel().await.unwrap();
    ch.queue_delete(
        stack.topology().pool_queue("a").as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let _ = admin.close(200, "done".into()).await;

    // Act
    let mut on_b = Vec::new();
    for i in 0..3 {
        on_b.push(
            stack
                .submit(&format!("name = \"b{i}\"\n[[steps]]\nname = \"s\"\npool = \"b\"\nscript = \"echo on b\"\n"))
                .await
                .unwrap(),
        );
    }
    let mut b_states = Vec::new();
    for t in &on_b {
        b_states.push(
            stack
                .wait_task(*t, Duration::from_secs(30))
                .await
                .unwrap()
                .summary
                .state,
        );
    }
    let on_a = stack
        .submit("name = \"a\"\n[[steps]]\nname = \"s\"\npool = \"a\"\nscript = \"echo on a\"\n")
        .await
        .unwrap();
    let a = stack
        .wait_task(on_a, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(b_states, ["Success"; 3], "the other pool's steps ran");
    assert_eq!(
        a.summary.state, "Success",
        "the queue is back and served: {a:#?}"
    );
    let log = stack.agent(idx).log_text();
    assert!(log.contains("this queue does not exist"), "{log}");
    let refusals = log.matches("this queue does not exist").count();
    assert!(
        refusals <= 3,
        "it did not spin on the missing queue: {refusals} tries"
    );
}
