//! Forged `StepFinished` (with lines of its own), `LogBatch` and `OutputVariable` for another worker's running step:
//! before, the task went `Success` early and a forged output ran as a command in the next step.

use crate::common::{Scene, gate, gated_process, running, stale_events};
use gantry_tests::gantry_shared::wire::{
    Event, LogBatch, LogLine, Origin, Outcome, OutputVariable, StepFinished, Stream,
};
use std::time::Duration;

#[tokio::test]
async fn forged_results_for_another_workers_attempt_change_nothing() {
    // Arrange: the victim runs a step that waits for a gate, then sets an output that the
    // next step echoes.
    let scene = Scene::new().await;
    let stack = &scene.stack;
    let g = gate(stack.dir.path(), "gate");
    let process = format!(
        "{}\n[[steps]]\nname = \"next\"\npool = \"prod\"\nscript = \"echo next got #{{Steps.work.Output.version}}\"\n",
        gated_process(
            "victim-task",
            &g,
            "set_gantryvariable version 1.4.2\necho real end"
        )
    );
    let task = stack.submit(&process).await.unwrap();
    let t = running(stack, task).await;
    let a = &t.steps[0].attempts[0];
    let victim_worker = a.worker_id.unwrap();
    let mallory_worker = scene.mallory.worker.id;
    let x = stack.topology().results_exchange();

    // Act: mallory knows the attempt (step run, attempt, job id) and forges its results, once
    // naming the victim in the body and once naming itself.
    for body_worker in [victim_worker, mallory_worker] {
        let origin = Origin {
            step_run_id: t.steps[0].id,
            attempt: a.attempt,
            job_id: a.job_id,
            worker_id: body_worker,
        };
        let forged = [
            Event::LogBatch(LogBatch {
                origin: origin.clone(),
                first_seq: 0,
                lines: vec![LogLine {
                    ts: chrono::Utc::now(),
                    stream: Stream::Stdout,
                    text: "FORGED LINE".into(),
                }],
            }),
            Event::OutputVariable(OutputVariable {
                origin: origin.clone(),
                name: "version".into(),
                value: Some("1.0; echo INJECTED-$(whoami)".into()),
                sensitive: false,
            }),
            Event::StepFinished(StepFinished {
                origin: origin.clone(),
                outcome: Outcome::Success,
                exit_code: Some(0),
                line_count: 1,
                error: None,
                finished_at: chrono::Utc::now(),
                artifacts: vec![],
                lines: vec![LogLine {
                    ts: chrono::Utc::now(),
                    stream: Stream::Stdout,
                    text: "FORGED TAIL".into(),
                }],
            }),
        ];
        for ev in &forged {
            scene.publish(&x, "", &ev.encode()).await.unwrap();
        }
    }
    let stale = gantry_tests::eventually(Duration::from_secs(20), "six stale events", || async {
        let s = stale_events(stack).await;
        (s.len() >= 6).then_some(s)
    })
    .await
    .unwrap();
    let meanwhile = stack.task(task).await.unwrap();
    std::fs::write(&g, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let log = stack.log(task).await.unwrap();

    // Assert
    assert_eq!(
        meanwhile.summary.state, "Executing",
        "the forgeries ended nothing"
    );
    assert_eq!(meanwhile.steps[0].state, "Running");
    assert!(
        stale
            .iter()
            .all(|(_, _, sender)| sender.as_deref() == Some(scene.mallory_user())),
        "each kept apart, with the broker user that really sent it: {stale:?}"
    );
    assert!(
        stale
            .iter()
            .any(|(_, r, _)| r.contains("RabbitMQ says worker")),
        "a body naming the victim is not believed: {stale:?}"
    );
    assert!(
        stale
            .iter()
            .any(|(_, r, _)| r.contains("not from the attempt's current claimant")),
        "mallory is not the claimant: {stale:?}"
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(
        done.steps[0].outputs.get("version").map(String::as_str),
        Some("1.4.2")
    );
    let text: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert!(!text.contains(&"FORGED LINE"), "{text:?}");
    assert!(!text.contains(&"FORGED TAIL"), "{text:?}");
    assert!(text.contains(&"real end"), "{text:?}");
    assert!(text.contains(&"next got 1.4.2"), "{text:?}");
    assert!(!text.iter().any(|l| l.contains("INJECTED")), "{text:?}");
}
