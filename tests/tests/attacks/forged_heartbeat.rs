//! Keeping a killed agent alive: before, forged heartbeats on a killed agent's re-declared
//! control queue kept it `Healthy`, and its step `Running`, for 45 s and more.

use crate::common::{Scene, gate, gated_process, running};
use gantry_tests::gantry_shared::api::Worker;
use gantry_tests::gantry_shared::wire::Heartbeat;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::time::{Duration, Instant};

#[tokio::test]
async fn forged_heartbeats_do_not_keep_a_killed_agent_alive() {
    // Arrange
    let mut scene = Scene::new().await;
    let g = gate(scene.stack.dir.path(), "never");
    let task = scene
        .stack
        .submit(&gated_process("victim-task", &g, "echo never"))
        .await
        .unwrap();
    let t = running(&scene.stack, task).await;
    let victim_id = t.steps[0].attempts[0].worker_id.unwrap();
    let topology = scene.stack.topology();

    // Act: kill the victim; mallory tries to take its control queue and beats for it.
    let victim = scene.victim;
    scene.stack.kill_agent(victim).await;
    let killed = Instant::now();
    let conn = scene
        .stack
        .amqp_as(scene.creds().0, scene.creds().1)
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let redeclare = ch
        .queue_declare(
            topology.control_queue(victim_id).as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let ch = conn.create_channel().await.unwrap();
    let take_over = ch
        .basic_consume(
            topology.control_queue(victim_id).as_str().into(),
            "impostor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    let mut beats_sent = 0;
    let lost = loop {
        let hb = Heartbeat {
            worker_id: victim_id,
            sent_at: chrono::Utc::now(),
            running: vec![],
            max_concurrent_steps: 4,
            free_slots: 4,
            disk_free_bytes: None,
            version: "forged".into(),
            health: Some("Healthy".into()),
            health_reason: None,
        };
        if scene
            .publish(&topology.heartbeats_exchange(), "", &hb.encode())
            .await
            .is_ok()
        {
            beats_sent += 1;
        }
        let now = scene.stack.task(task).await.unwrap();
        if now.steps[0].attempts[0].state == "WorkerLost" {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "never noticed: {now:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let workers: Vec<Worker> = scene.stack.get("/api/workers").await.unwrap();
    let victim_row = workers.iter().find(|w| w.id == victim_id).unwrap();

    // Assert
    assert!(
        matches!(&redeclare, Err(e) if e.contains("ACCESS_REFUSED")),
        "{redeclare:?}"
    );
    assert!(
        matches!(&take_over, Err(e) if e.contains("ACCESS_REFUSED")),
        "{take_over:?}"
    );
    assert!(
        beats_sent > 3,
        "the broker took mallory's heartbeats ({beats_sent})"
    );
    assert!(lost < Duration::from_secs(8), "noticed lost after {lost:?}");
    assert_eq!(victim_row.health, "Unavailable");
    assert_ne!(
        victim_row.version.as_deref(),
        Some("forged"),
        "no forged heartbeat was stored"
    );
}
