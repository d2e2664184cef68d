//! A job body changed on its way: before, a job taken off a pool queue, its script replaced
//! and published again passed the claim and ran with the real secrets. Here the change is
//! made with the broker administrator's rights (no worker has the right to publish a job at
//! all, see `queues`): whoever could do it, nothing runs.

use gantry_tests::gantry_shared::wire::Job;
use gantry_tests::{AgentOpts, Stack, eventually};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use std::time::Duration;

#[tokio::test]
async fn a_job_body_altered_in_the_queue_runs_nothing_and_says_why() {
    // Arrange: one agent with one slot, busy with a blocker; the next task's job waits in the
    // pool's queue.
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent(
            "solo",
            AgentOpts {
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let release = stack.dir.path().join("release");
    let pwned = stack.dir.path().join("pwned");
    stack.start_blocker(None, &release).await.unwrap();
    let target = stack
        .submit(
            "name = \"target\"\n[variables]\nToken = { value = \"s3cr3t-value\", sensitive = true }\n[[steps]]\nname = \"real\"\nretries = 1\nscript = \"echo the real step\"\n",
        )
        .await
        .unwrap();
    let queue = stack.topology().pool_queue("default-worker-pool");
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let delivery = eventually(
        Duration::from_secs(20),
        "the job in the pool's queue",
        || async {
            ch.basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
                .ok()
                .flatten()
        },
    )
    .await
    .unwrap();

    // Act: take it off, change its script, publish it again, let the agent have it.
    let mut job = Job::decode(&delivery.data).unwrap();
    job.script = format!(
        "echo \"#{{Token}}\" | base64 > '{}'; echo PWNED",
        pwned.display()
    );
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    ch.basic_publish(
        stack.topology().jobs_exchange().as_str().into(),
        "pool.default-worker-pool".into(),
        BasicPublishOptions::default(),
        &job.encode(),
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    std::fs::write(&release, b"").unwrap();
    let done = stack
        .wait_task(target, Duration::from_secs(60))
        .await
        .unwrap();
    let log = stack.log(target).await.unwrap();
    let _ = conn.close(200, "done".into()).await;

    // Assert
    assert!(!pwned.exists(), "the altered script never ran");
    let text: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert!(!text.iter().any(|l| l.contains("PWNED")), "{text:?}");
    let attempts = &done.steps[0].attempts;
    let first = attempts[0].error.as_deref().unwrap_or_default();
    assert_eq!(attempts[0].state, "Failed");
    assert!(
        first.contains("altered on its way") && first.contains("nothing ran"),
        "the refusal is on the attempt: {first}"
    );
    assert_eq!(
        done.summary.state, "Success",
        "its retry ran the real job: {done:#?}"
    );
    assert_eq!(attempts.len(), 2);
    assert!(text.contains(&"the real step"), "{text:?}");
}
