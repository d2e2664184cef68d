//! Mutex leases: before, any agent could rewrite or delete any lease in Redis, and results
//! could carry any fencing token, which the dispatcher stored. Agents now hold no Redis
//! credentials at all, renew through the dispatcher, and the token is the dispatcher's record.

use gantry_tests::gantry_shared::api::WORKER_TOKEN_HEADER;
use gantry_tests::{AgentOpts, Stack};
use std::time::Duration;

#[tokio::test]
async fn agents_renew_leases_through_the_dispatcher_and_cannot_set_tokens() {
    // Arrange: the agent is given a Redis that does not exist; a 3 s lease, so a step of 4 s
    // must be renewed (through the dispatcher) to finish.
    let mut stack = Stack::start_with(vec![("GANTRY__LOCKS__LEASE_MS".into(), "3000".into())])
        .await
        .unwrap();
    let holder = stack
        .add_agent(
            "holder",
            AgentOpts {
                env: vec![("GANTRY__REDIS__URL".into(), "redis://127.0.0.1:1".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mallory = stack.register_worker("mallory", &[]).await.unwrap();
    let task = stack
        .submit("name = \"m\"\n[[steps]]\nname = \"s\"\nmutex = \"db\"\nscript = \"echo token $GANTRY_MUTEX_TOKEN; sleep 4\"\n")
        .await
        .unwrap();
    let t = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let a = &t.steps[0].attempts[0];
    let db = stack.db().await;
    let recorded: i64 = sqlx::query_scalar("SELECT mutex_token FROM attempts WHERE job_id = $1")
        .bind(a.job_id.0)
        .fetch_one(&db)
        .await
        .unwrap();

    // Act: mallory renews the holder's lease with its own credential; the holder itself
    // sends an event carrying a made-up token.
    let renew = stack
        .http
        .post(format!("{}/api/jobs/{}/lease", stack.url, a.job_id))
        .header(WORKER_TOKEN_HEADER, &mallory.token)
        .send()
        .await
        .unwrap();
    let own = stack.broker_credentials(holder).unwrap();
    let forged = serde_json::json!({
        "v": 1, "type": "Progress", "step_run_id": t.steps[0].id, "attempt": a.attempt,
        "job_id": a.job_id, "worker_id": a.worker_id, "mutex_token": 9_000_000_000_000_000u64,
        "percentage": 50, "message": "half way"
    });
    stack
        .publish_as(
            (&own.user, &own.password),
            &stack.topology().results_exchange(),
            "",
            forged.to_string().as_bytes(),
            Some(&own.user),
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let after: i64 = sqlx::query_scalar("SELECT mutex_token FROM attempts WHERE job_id = $1")
        .bind(a.job_id.0)
        .fetch_one(&db)
        .await
        .unwrap();
    let log = stack.log(task).await.unwrap();

    // Assert
    assert_eq!(renew.status(), 409, "only the claimant renews its lease");
    assert_eq!(
        done.summary.state, "Success",
        "renewed through the dispatcher: {done:#?}"
    );
    assert_eq!(after, recorded, "the token is the dispatcher's record");
    assert!(
        log.iter().any(|l| l.text == format!("token {recorded}")),
        "the script got the recorded token"
    );
    assert!(
        stack
            .agent(holder)
            .log_text()
            .contains("mutex lease renewed"),
        "the 4 s step outlived its 3 s lease by renewing it"
    );
}
