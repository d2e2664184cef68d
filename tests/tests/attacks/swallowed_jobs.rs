//! A worker may consume its own pools' queues, and so take a job and ack it without claiming
//! it, or purge the queue. Nothing runs then; the dispatcher notices the jobs are gone and
//! publishes them again.

use gantry_tests::gantry_shared::api::BrokerCredentials;
use gantry_tests::{AgentOpts, Stack, eventually};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use std::path::PathBuf;
use std::time::Duration;

/// The honest agent has one slot, busy with a blocker until `release` is written, so the next
/// jobs wait in pool prod's queue; mallory is a member of the same pool (its broker user).
async fn busy_pool_with_mallory() -> (Stack, BrokerCredentials, PathBuf) {
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("prod").await.unwrap();
    stack
        .add_agent(
            "honest",
            AgentOpts {
                pools: vec!["prod".into()],
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mallory = stack.register_worker("mallory", &["prod"]).await.unwrap();
    let creds = mallory.broker.clone().unwrap();
    let release = stack.dir.path().join("release");
    stack.start_blocker(Some("prod"), &release).await.unwrap();
    (stack, creds, release)
}

#[tokio::test]
async fn jobs_swallowed_or_purged_by_a_pool_member_are_published_again_and_run_once() {
    // Arrange: the honest agent has one slot, busy with a blocker, so the next jobs wait in
    // the pool's queue; mallory is a member of the same pool.
    let (stack, creds, release) = busy_pool_with_mallory().await;
    let runs = stack.dir.path().join("runs");
    let process = |name: &str| {
        format!(
            "name = \"{name}\"\n[[steps]]\nname = \"s\"\npool = \"prod\"\nscript = \"echo {name} >> '{}'\"\n",
            runs.display()
        )
    };
    let queue = stack.topology().pool_queue("prod");
    let conn = stack.amqp_as(&creds.user, &creds.password).await.unwrap();
    let ch = conn.create_channel().await.unwrap();

    // Act: one job taken and acked, the next one purged.
    let swallowed = stack.submit(&process("swallowed")).await.unwrap();
    let d = eventually(Duration::from_secs(20), "a job to swallow", || async {
        ch.basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    d.ack(BasicAckOptions::default()).await.unwrap();
    let purged = stack.submit(&process("purged")).await.unwrap();
    let emptied = eventually(Duration::from_secs(20), "a job to purge", || async {
        let n = ch
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .ok()?;
        (n > 0).then_some(n)
    })
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    std::fs::write(&release, b"").unwrap();
    let a = stack
        .wait_task(swallowed, Duration::from_secs(90))
        .await
        .unwrap();
    let b = stack
        .wait_task(purged, Duration::from_secs(90))
        .await
        .unwrap();

    // Assert
    assert_eq!(emptied, 1);
    assert_eq!(a.summary.state, "Success", "{a:#?}");
    assert_eq!(b.summary.state, "Success", "{b:#?}");
    let ran = std::fs::read_to_string(&runs).unwrap();
    let mut lines: Vec<&str> = ran.lines().collect();
    lines.sort();
    assert_eq!(lines, ["purged", "swallowed"], "each ran once");
    assert_eq!(
        a.steps[0].attempts.len(),
        1,
        "the same attempt, under a new job id"
    );
    assert!(
        stack
            .all_logs()
            .contains("jobs left their queue without a claim")
    );
}

#[tokio::test]
async fn idle_consumers_do_not_hide_a_swallowed_job() {
    // Arrange: as above, the honest agent is busy; mallory swallows the job, then keeps three
    // consumers open on the now empty queue (what used to count as three jobs in hand).
    let (stack, creds, release) = busy_pool_with_mallory().await;
    let queue = stack.topology().pool_queue("prod");
    let conn = stack.amqp_as(&creds.user, &creds.password).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let task = stack
        .submit(
            "name = \"target\"\n[[steps]]\nname = \"s\"\npool = \"prod\"\nscript = \"echo ran\"\n",
        )
        .await
        .unwrap();
    let d = eventually(Duration::from_secs(20), "a job to swallow", || async {
        ch.basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    let first_job = gantry_tests::gantry_shared::wire::Job::decode(&d.data)
        .unwrap()
        .job_id;
    d.ack(BasicAckOptions::default()).await.unwrap();
    let idle = conn.create_channel().await.unwrap();
    idle.basic_qos(1, Default::default()).await.unwrap();
    let mut consumers = Vec::new();
    for i in 0..3 {
        consumers.push(
            idle.basic_consume(
                queue.as_str().into(),
                format!("idle-{i}").as_str().into(),
                lapin::options::BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap(),
        );
    }

    // Act: wait, with the idle consumers open, for the job to be published again.
    let republished = eventually(Duration::from_secs(40), "a new job id", || async {
        let t = stack.task(task).await.ok()?;
        let now = t.steps[0].attempts[0].job_id;
        (now != first_job).then_some(now)
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
    std::fs::write(&release, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    republished.expect("published again although three consumers stood idle on the queue");
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(done.steps[0].attempts.len(), 1);
}
