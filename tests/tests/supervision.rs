//! The dispatcher's background loops never stall on what rows or messages hold: a stored
//! `mutex_timeout_secs` of 10^17 or 2^64-1 (rows written before it was checked at
//! submission), and a flood of dead-lettered messages PostgreSQL cannot take as they are.
//! Before, the first panicked the mutex loop for good (no mutex was granted again), the
//! second failed every pass, and the third left 64 deliveries unacked so that no dead job was
//! failed any more.

use gantry_tests::gantry_shared::api::Task;
use gantry_tests::gantry_shared::wire::Heartbeat;
use gantry_tests::{API_KEY, AgentOpts, Stack, eventually};
use std::time::Duration;

async fn metrics(stack: &Stack) -> String {
    let (status, body) = stack
        .request(reqwest::Method::GET, "/metrics", Some(API_KEY), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body.as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn huge_stored_mutex_timeouts_do_not_stop_mutex_grants() {
    // Arrange: a holder of mutex `p` (gated), and two steps waiting for it whose stored
    // mutex_timeout_secs are then set to 10^17 and 2^64-1 behind the API's back.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a1", AgentOpts::default()).await.unwrap();
    let gate = stack.dir.path().join("gate");
    let holder = stack
        .submit(&format!(
            "name = \"holder\"\n[[steps]]\nname = \"hold\"\nmutex = \"p\"\nscript = '''\nwhile [ ! -e '{}' ]; do sleep 0.05; done\n'''\n",
            gate.display()
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(holder, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for name in ["w17", "wmax"] {
        let id = stack
            .submit(&format!(
                "name = \"{name}\"\n[[steps]]\nname = \"wait\"\nmutex = \"p\"\nmutex_timeout_secs = 3600\nscript = \"echo {name} ran\"\n"
            ))
            .await
            .unwrap();
        stack
            .wait_task_until(id, Duration::from_secs(30), |t| {
                t.steps[0].state == "Waiting"
            })
            .await
            .unwrap();
        waiters.push(id);
    }
    let db = stack.db().await;
    for (id, value) in [
        (waiters[0], "100000000000000000"),
        (waiters[1], "18446744073709551615"),
    ] {
        let r = sqlx::query(
            "UPDATE step_runs SET spec = jsonb_set(spec, '{mutex_timeout_secs}', $2::jsonb)
             WHERE task_id = $1",
        )
        .bind(id.0)
        .bind(value)
        .execute(&db)
        .await
        .unwrap();
        assert_eq!(r.rows_affected(), 1);
    }
    // A few passes of the mutex loop over the poisoned rows.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Act: another task's mutex step, on another mutex.
    let other = stack
        .submit("name = \"other\"\n[[steps]]\nname = \"go\"\nmutex = \"q\"\nscript = \"echo other ran\"\n")
        .await
        .unwrap();
    let other_done = stack.wait_task(other, Duration::from_secs(30)).await;
    // Then the holder ends: the poisoned waiters get the mutex in turn.
    std::fs::write(&gate, b"").unwrap();
    let mut ends: Vec<Task> = Vec::new();
    for id in [holder, waiters[0], waiters[1]] {
        ends.push(stack.wait_task(id, Duration::from_secs(60)).await.unwrap());
    }
    let text = metrics(&stack).await;

    // Assert
    let other_done = other_done.unwrap();
    assert_eq!(other_done.summary.state, "Success", "{other_done:#?}");
    for t in &ends {
        assert_eq!(t.summary.state, "Success", "{t:#?}");
    }
    assert!(
        text.contains("# TYPE gantry_loop_restarts_total counter"),
        "{text}"
    );
    let logs = stack.all_logs();
    assert!(!logs.contains("panicked"), "a program panicked:\n{logs}");
}

#[tokio::test]
async fn the_dead_letter_consumer_survives_a_flood_of_unstorable_bodies() {
    // Arrange: a pool served by a worker this test acts for (its heartbeats keep it healthy;
    // no agent takes its jobs), and a task whose job waits in the pool's queue.
    let stack = Stack::start().await.unwrap();
    stack.add_pool("dl").await.unwrap();
    let w = stack.register_worker("ghost", &["dl"]).await.unwrap();
    let creds = w.broker.clone().expect("a broker user");
    let hb_exchange = stack.topology().heartbeats_exchange();
    let beats = {
        let creds = creds.clone();
        let worker = w.worker.id;
        let exchange = hb_exchange.clone();
        let conn = stack.amqp_as(&creds.user, &creds.password).await.unwrap();
        tokio::spawn(async move {
            let ch = conn.create_channel().await.unwrap();
            loop {
                let hb = Heartbeat {
                    worker_id: worker,
                    sent_at: chrono::Utc::now(),
                    running: vec![],
                    max_concurrent_steps: 4,
                    free_slots: 4,
                    disk_free_bytes: None,
                    version: "test".into(),
                    health: Some("Healthy".into()),
                    health_reason: None,
                };
                let _ = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        Default::default(),
                        &hb.encode(),
                        lapin::BasicProperties::default().with_user_id(creds.user.as_str().into()),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    eventually(Duration::from_secs(20), "ghost healthy", || async {
        let ws: Vec<gantry_tests::gantry_shared::api::Worker> =
            stack.get("/api/workers").await.ok()?;
        ws.iter()
            .any(|x| x.name == "ghost" && x.health == "Healthy")
            .then_some(())
    })
    .await
    .unwrap();

    // Act: 80 dead letters PostgreSQL cannot take as sent (NUL bytes in the body and in the
    // headers), published by the operator (guest) straight to the dead-letter exchange; then
    // the task's job is rejected from its queue, which dead-letters it.
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let dead = stack.topology().dead_exchange();
    for i in 0..80 {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "x-first-death-reason".into(),
            lapin::types::AMQPValue::LongString("rejected\0".into()),
        );
        let body = format!("poison {i}\0\0 body");
        ch.basic_publish(
            dead.as_str().into(),
            "".into(),
            Default::default(),
            body.as_bytes(),
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let task = stack
        .submit(
            "name = \"doomed\"\n[[steps]]\nname = \"s\"\npool = \"dl\"\nscript = \"echo never\"\n",
        )
        .await
        .unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0]
                .attempts
                .first()
                .is_some_and(|a| a.state == "Queued")
        })
        .await
        .unwrap();
    let queue = format!("{}.pool.dl", stack.ns);
    let got = eventually(Duration::from_secs(10), "the job in its queue", || async {
        ch.basic_get(queue.as_str().into(), Default::default())
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    got.delivery
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let failed = stack
        .wait_task(task, Duration::from_secs(20))
        .await
        .unwrap();
    beats.abort();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&stack.db().await)
        .await
        .unwrap();

    // Assert
    assert_eq!(failed.summary.state, "Failed", "{failed:#?}");
    let err = failed.steps[0].attempts[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(err.contains("dead-lettered"), "{err}");
    assert!(
        stored >= 81,
        "every dead letter recorded (NUL replaced): {stored}"
    );
    let logs = stack.all_logs();
    assert!(!logs.contains("panicked"), "a program panicked:\n{logs}");
}
