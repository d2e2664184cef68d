//! Another pool's jobs: before, any agent could take them off the queue (`basic_get`), bind a
//! queue of its own to `<ns>.jobs` and read every pool's jobs, or purge and delete queues.

use crate::common::Scene;
use gantry_tests::Stack;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;

/// Run one broker operation as mallory on a fresh channel (a refusal closes it); the error
/// text if it was refused.
async fn as_mallory<F, Fut>(stack: &Stack, creds: (&str, &str), op: F) -> Result<(), String>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<()>>,
{
    let conn = stack.amqp_as(creds.0, creds.1).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let r = op(ch).await.map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

fn refused(r: &Result<(), String>) -> bool {
    matches!(r, Err(e) if e.contains("ACCESS_REFUSED") || e.contains("ACCESS-REFUSED"))
}

#[tokio::test]
async fn another_pools_queue_cannot_be_read_bound_purged_or_deleted() {
    // Arrange
    let scene = Scene::new().await;
    let stack = &scene.stack;
    let t = stack.topology();
    let prod = t.pool_queue("prod");
    let victim_id = stack
        .get::<Vec<gantry_tests::gantry_shared::api::Worker>>("/api/workers")
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.name == "victim")
        .unwrap()
        .id;
    let creds = scene.creds();

    // Act
    let get = as_mallory(stack, creds, |ch| {
        let q = prod.clone();
        async move {
            ch.basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .map(drop)
        }
    })
    .await;
    let consume_other_worker = as_mallory(stack, creds, |ch| {
        let q = t.worker_queue(victim_id);
        async move {
            ch.basic_consume(
                q.as_str().into(),
                "x".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop)
        }
    })
    .await;
    let declare_own = as_mallory(stack, creds, |ch| {
        let q = format!("{}.pool.eavesdrop", stack.ns);
        async move {
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop)
        }
    })
    .await;
    let server_named = as_mallory(stack, creds, |ch| async move {
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(drop)
    })
    .await;
    let own_dev = t.pool_queue("dev");
    let bind = as_mallory(stack, creds, |ch| {
        let (q, x) = (own_dev.clone(), t.jobs_exchange());
        async move {
            ch.queue_bind(
                q.as_str().into(),
                x.as_str().into(),
                "pool.prod".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    })
    .await;
    let purge = as_mallory(stack, creds, |ch| {
        let q = prod.clone();
        async move {
            ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default())
                .await
                .map(drop)
        }
    })
    .await;
    let delete = as_mallory(stack, creds, |ch| {
        let q = prod.clone();
        async move {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(drop)
        }
    })
    .await;
    let publish_job = scene.publish(&t.jobs_exchange(), "pool.prod", b"{}").await;
    let publish_default = scene.publish("", &prod, b"{}").await;
    let own_queue = as_mallory(stack, creds, |ch| {
        let q = own_dev.clone();
        async move {
            ch.basic_consume(
                q.as_str().into(),
                "mine".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop)
        }
    })
    .await;

    // Assert
    for (what, r) in [
        ("basic_get on another pool's queue", &get),
        ("consuming another worker's queue", &consume_other_worker),
        ("declaring a queue", &declare_own),
        ("a server-named queue", &server_named),
        ("binding its own pool's queue to another pool's jobs", &bind),
        ("purging another pool's queue", &purge),
        ("deleting another pool's queue", &delete),
    ] {
        assert!(refused(r), "{what}: {r:?}");
    }
    for (what, r) in [
        ("publishing a job", &publish_job),
        ("publishing on the default exchange", &publish_default),
    ] {
        assert!(refused(r), "{what}: {r:?}");
    }
    assert_eq!(own_queue, Ok(()), "its own pool's queue is its to consume");
    let q = stack.amqp().await;
    let ch = q.create_channel().await.unwrap();
    let still = ch
        .queue_declare(
            prod.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(still.is_ok(), "the pool's queue is still there");
}
