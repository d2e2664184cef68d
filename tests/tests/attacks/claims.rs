//! Claims from a worker that may not run the step: refused before anything else is looked at,
//! so a wrong sha256 from an outsider cannot fail another pool's attempt; refused without a
//! trace, so an outsider cannot void a job (and give it a new job id) again and again; and
//! the sha256 must be a sha256.

use gantry_tests::gantry_shared::api::{WORKER_TOKEN_HEADER, WorkerRegistered};
use gantry_tests::gantry_shared::ids::{JobId, TaskId};
use gantry_tests::{AgentOpts, Stack};
use std::path::PathBuf;
use std::time::Duration;

/// The only prod agent has one slot, busy with a blocker until `release` is written, so the
/// target's job (its step with `extra` lines) waits Queued; mallory serves dev and knows the
/// job's id.
struct Scene {
    stack: Stack,
    mallory: WorkerRegistered,
    release: PathBuf,
    task: TaskId,
    job: JobId,
}

async fn queued_behind_a_blocker(extra: &str) -> Scene {
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("prod").await.unwrap();
    stack.add_pool("dev").await.unwrap();
    stack
        .add_agent(
            "victim",
            AgentOpts {
                pools: vec!["prod".into()],
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mallory = stack.register_worker("mallory", &["dev"]).await.unwrap();
    let release = stack.dir.path().join("release");
    stack.start_blocker(Some("prod"), &release).await.unwrap();
    let task = stack
        .submit(&format!(
            "name = \"target\"\n[[steps]]\nname = \"s\"\npool = \"prod\"\n{extra}script = \"echo done\"\n"
        ))
        .await
        .unwrap();
    let queued = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0]
                .attempts
                .first()
                .is_some_and(|a| a.state == "Queued")
        })
        .await
        .unwrap();
    let job = queued.steps[0].attempts[0].job_id;
    Scene {
        stack,
        mallory,
        release,
        task,
        job,
    }
}

#[tokio::test]
async fn a_claim_from_outside_the_pool_is_refused_whatever_sha_it_sends() {
    // Arrange: the only prod agent has one slot, busy with a blocker, so the target's job
    // waits Queued; mallory serves dev and knows the job's id.
    let Scene {
        stack,
        mallory,
        release,
        task,
        job,
    } = queued_behind_a_blocker("retries = 1\n").await;
    let claim = |sha: String| {
        let (stack, token) = (&stack, mallory.token.clone());
        async move {
            let r = stack
                .http
                .post(format!("{}/api/jobs/{job}/claim", stack.url))
                .header(WORKER_TOKEN_HEADER, token)
                .json(&serde_json::json!({ "claim_id": uuid::Uuid::new_v4(), "job_sha256": sha }))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };

    // Act
    let huge = claim("f".repeat(4_000_000)).await;
    let wrong = claim("0".repeat(64)).await;
    std::fs::write(&release, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert_eq!(huge.0, 400, "{}", &huge.1[..huge.1.len().min(300)]);
    assert!(huge.1.len() < 1000, "the bad value is not echoed back");
    assert!(huge.1.contains("job_sha256"), "{}", huge.1);
    assert_eq!(wrong.0, 403, "{}", wrong.1);
    assert!(
        wrong.1.contains("does not serve"),
        "refused as an outsider: {}",
        wrong.1
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let a = &done.steps[0].attempts;
    assert_eq!(a.len(), 1, "no retry was used up: {a:#?}");
    assert!(a[0].error.is_none(), "{a:#?}");
}

#[tokio::test]
async fn refused_claims_from_outside_the_pool_leave_the_job_id_and_attempt_unchanged() {
    // Arrange: as above: the target's job waits Queued behind a blocker on the only prod
    // agent, and mallory (pool dev) knows its id.
    let Scene {
        stack,
        mallory,
        release,
        task,
        job,
    } = queued_behind_a_blocker("").await;
    // Act: ten refused claims, each with a fresh claim id, without and with a sha256.
    let mut answers = Vec::new();
    for i in 0..10 {
        let sha = (i % 2 == 1).then(|| "0".repeat(64));
        let r = stack
            .http
            .post(format!("{}/api/jobs/{job}/claim", stack.url))
            .header(WORKER_TOKEN_HEADER, mallory.token.clone())
            .json(&serde_json::json!({ "claim_id": uuid::Uuid::new_v4(), "job_sha256": sha }))
            .send()
            .await
            .unwrap();
        answers.push((r.status().as_u16(), r.text().await.unwrap()));
    }
    let after: gantry_tests::gantry_shared::api::Task =
        stack.get(&format!("/api/tasks/{task}")).await.unwrap();
    std::fs::write(&release, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    for (status, body) in &answers {
        assert_eq!(*status, 403, "{body}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("does not serve")),
            "{body}"
        );
    }
    let a = &after.steps[0].attempts;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(a[0].job_id, job, "no new job id: {a:#?}");
    assert_eq!(a[0].state, "Queued", "{a:#?}");
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let a = &done.steps[0].attempts;
    assert_eq!(a.len(), 1, "{a:#?}");
    assert_eq!(
        a[0].job_id, job,
        "the job that ran is the one published first"
    );
    assert_eq!(a[0].worker.as_deref(), Some("victim"), "{a:#?}");
}
