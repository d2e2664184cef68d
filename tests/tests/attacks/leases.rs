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

#[tokio::test]
async fn a_holder_that_never_stops_its_step_loses_the_mutex_after_its_timeout() {
    // Arrange: mallory, a worker of pool `rogue` with no honest agent, beats its heartbeat,
    // takes a mutex step's job from its own queue, claims it and says it started in the far
    // future, as a compromised agent that means to hold the mutex for good would.
    let stack = Stack::start_with(vec![("GANTRY__LOCKS__LEASE_MS".into(), "3000".into())])
        .await
        .unwrap();
    stack.add_pool("rogue").await.unwrap();
    let mallory = stack.register_worker("mallory", &["rogue"]).await.unwrap();
    let creds = mallory.broker.clone().unwrap();
    let t = stack.topology();
    let beat = |at| {
        gantry_tests::gantry_shared::wire::Heartbeat {
            worker_id: mallory.worker.id,
            sent_at: at,
            running: vec![],
            max_concurrent_steps: 1,
            free_slots: 1,
            disk_free_bytes: None,
            version: "rogue".into(),
            health: Some("Healthy".into()),
            health_reason: None,
        }
        .encode()
    };
    stack
        .publish_as(
            (&creds.user, &creds.password),
            &t.heartbeats_exchange(),
            "",
            &beat(chrono::Utc::now()),
            Some(&creds.user),
        )
        .await
        .unwrap();
    let task = stack
        .submit("name = \"hog\"\n[[steps]]\nname = \"s\"\npool = \"rogue\"\nmutex = \"db\"\ntimeout_secs = 1\nscript = \"true\"\n")
        .await
        .unwrap();
    let conn = stack.amqp_as(&creds.user, &creds.password).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let d = gantry_tests::eventually(Duration::from_secs(20), "the job", || async {
        ch.basic_get(
            t.pool_queue("rogue").as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .ok()
        .flatten()
    })
    .await
    .unwrap();
    let job = gantry_tests::gantry_shared::wire::Job::decode(&d.data).unwrap();
    let sha = gantry_tests::gantry_shared::wire::body_sha256(&d.data);
    let claim = stack
        .http
        .post(format!("{}/api/jobs/{}/claim", stack.url, job.job_id))
        .header(WORKER_TOKEN_HEADER, &mallory.token)
        .json(&serde_json::json!({ "claim_id": uuid::Uuid::new_v4(), "job_sha256": sha }))
        .send()
        .await
        .unwrap();
    // Claim the step started in the year 9999, so that it never looks overdue.
    let started = serde_json::json!({
        "v": 1, "type": "StepStarted", "step_run_id": job.step_run_id, "attempt": job.attempt,
        "job_id": job.job_id, "worker_id": mallory.worker.id,
        "started_at": "9999-01-01T00:00:00Z"
    });
    stack
        .publish_as(
            (&creds.user, &creds.password),
            &t.results_exchange(),
            "",
            started.to_string().as_bytes(),
            Some(&creds.user),
        )
        .await
        .unwrap();
    // Look alive as an agent does: its control queue consumed, heartbeats going.
    let control = conn.create_channel().await.unwrap();
    let _consumer = control
        .basic_consume(
            t.control_queue(mallory.worker.id).as_str().into(),
            "mallory".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let renew = || async {
        let _ = stack
            .publish_as(
                (&creds.user, &creds.password),
                &t.heartbeats_exchange(),
                "",
                &beat(chrono::Utc::now()),
                Some(&creds.user),
            )
            .await;
        let r = stack
            .http
            .post(format!("{}/api/jobs/{}/lease", stack.url, job.job_id))
            .header(WORKER_TOKEN_HEADER, &mallory.token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };

    // Act: renew while the step is young, then keep renewing past its timeout.
    let started = std::time::Instant::now();
    let young = renew().await;
    let refused =
        gantry_tests::eventually(Duration::from_secs(60), "a renewal refused", || async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (status, body) = renew().await;
            (status != 200).then_some((status, body, started.elapsed()))
        })
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    // Assert
    assert_eq!(claim.status(), 200, "mallory holds the claim");
    assert_eq!(
        young.0, 200,
        "a holder renews within its timeout: {young:?}"
    );
    let (status, body, after) = refused;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("past its timeout_secs"), "{body}");
    assert!(
        after >= Duration::from_secs(30),
        "not before timeout_secs and the slack: {after:?}"
    );
    let now = stack.task(task).await.unwrap();
    assert_eq!(
        now.steps[0].attempts[0].state, "Running",
        "refused for its timeout, not lost"
    );
}
