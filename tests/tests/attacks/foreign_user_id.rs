//! A message claiming another broker user: RabbitMQ itself refuses it. One claiming no user at
//! all gets through the broker, and the dispatcher believes it of nobody.

use crate::common::{Scene, gate, gated_process, running, stale_events};
use gantry_tests::gantry_shared::wire::{Event, Origin, Outcome, StepFinished};
use std::time::Duration;

#[tokio::test]
async fn a_foreign_user_id_is_refused_by_the_broker_and_none_is_believed_of_nobody() {
    // Arrange
    let scene = Scene::new().await;
    let stack = &scene.stack;
    let g = gate(stack.dir.path(), "gate");
    let task = stack
        .submit(&gated_process("victim-task", &g, "echo done"))
        .await
        .unwrap();
    let t = running(stack, task).await;
    let a = &t.steps[0].attempts[0];
    let victim_user = stack.broker_credentials(scene.victim).unwrap().user;
    let finished = Event::StepFinished(StepFinished {
        origin: Origin {
            step_run_id: t.steps[0].id,
            attempt: a.attempt,
            job_id: a.job_id,
            worker_id: a.worker_id.unwrap(),
        },
        outcome: Outcome::Failed,
        exit_code: Some(1),
        line_count: 0,
        error: Some("forged".into()),
        finished_at: chrono::Utc::now(),
        artifacts: vec![],
        lines: vec![],
    })
    .encode();
    let x = stack.topology().results_exchange();

    // Act
    let as_victim = stack
        .publish_as(scene.creds(), &x, "", &finished, Some(&victim_user))
        .await;
    let as_dispatcher = stack
        .publish_as(scene.creds(), &x, "", &finished, Some("guest"))
        .await;
    let as_nobody = stack
        .publish_as(scene.creds(), &x, "", &finished, None)
        .await;
    let stale = gantry_tests::eventually(Duration::from_secs(20), "a stale event", || async {
        let s = stale_events(stack).await;
        (!s.is_empty()).then_some(s)
    })
    .await
    .unwrap();
    std::fs::write(&g, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    for (what, r) in [
        ("the victim's", &as_victim),
        ("the dispatcher's", &as_dispatcher),
    ] {
        let e = r.as_ref().expect_err(what);
        assert!(
            e.contains("PRECONDITION") && e.contains("user_id"),
            "{what}: {e}"
        );
    }
    assert_eq!(
        as_nobody,
        Ok(()),
        "RabbitMQ routes a message without user_id"
    );
    assert_eq!(
        stale.len(),
        1,
        "only the one without user_id arrived: {stale:?}"
    );
    assert!(stale[0].1.contains("without user_id"), "{stale:?}");
    assert_eq!(stale[0].2, None);
    assert_eq!(done.summary.state, "Success", "{done:#?}");
}
