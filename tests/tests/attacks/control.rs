//! Control messages: before, any agent could publish a `SetPolicy` to another agent's (or the
//! built-in worker's) control queue and have its health-check script run there as root.

use crate::common::Scene;
use gantry_tests::gantry_shared::api::Worker;
use gantry_tests::gantry_shared::wire::Control;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use std::time::Duration;

#[tokio::test]
async fn only_the_dispatcher_publishes_control_messages_and_no_one_reads_anothers() {
    // Arrange
    let scene = Scene::new().await;
    let stack = &scene.stack;
    let t = stack.topology();
    let workers: Vec<Worker> = stack.get("/api/workers?builtin=true").await.unwrap();
    let victim = workers.iter().find(|w| w.name == "victim").unwrap();
    let builtin = workers.iter().find(|w| w.builtin).unwrap();
    let cancel = Control::CancelAttempt {
        step_run_id: gantry_tests::gantry_shared::ids::StepRunId::new(),
        attempt: 1,
        reason: "forged".into(),
    }
    .encode();

    // Act
    let mut refusals = Vec::new();
    for target in [victim.id, builtin.id] {
        refusals.push((
            format!("to {target} through the control exchange"),
            scene
                .publish(
                    &t.control_exchange(),
                    &target.to_string(),
                    &Control::Reconfigure.encode(),
                )
                .await,
        ));
        refusals.push((
            format!("to {target}'s control queue by name"),
            scene.publish("", &t.control_queue(target), &cancel).await,
        ));
    }
    let conn = stack
        .amqp_as(scene.creds().0, scene.creds().1)
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let eavesdrop = ch
        .basic_consume(
            t.control_queue(victim.id).as_str().into(),
            "eavesdrop".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    // The victim still works (its control queue is its own, and cancels still reach it).
    let task = stack
        .submit(
            "name = \"after\"\n[[steps]]\nname = \"s\"\npool = \"prod\"\nscript = \"sleep 30\"\n",
        )
        .await
        .unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    stack
        .request(
            reqwest::Method::POST,
            &format!("/api/tasks/{task}/cancel"),
            Some(gantry_tests::API_KEY),
            None,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(20))
        .await
        .unwrap();

    // Assert
    for (what, r) in &refusals {
        assert!(
            matches!(r, Err(e) if e.contains("ACCESS_REFUSED")),
            "publishing a control message {what}: {r:?}"
        );
    }
    assert!(
        matches!(&eavesdrop, Err(e) if e.contains("ACCESS_REFUSED")),
        "consuming another agent's control queue: {eavesdrop:?}"
    );
    assert_eq!(
        done.summary.state, "Cancelled",
        "the dispatcher's own cancel still arrives"
    );
}
