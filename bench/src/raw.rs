//! The raw clients the references and the floor are made of, with no Gantry code between:
//! a scratch database, quorum queues published to with confirms, and `bash -c true`.

use anyhow::{Result, ensure};
use gantry_tests::PG_ADMIN_URL;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection};
use sqlx::PgPool;

/// Run `body` against a fresh database named `gantry_bench_<prefix>_<random>`, reached through
/// a pool of `connections`; the database is dropped afterwards, whatever `body` returned.
pub(crate) async fn scratch_db<T>(
    prefix: &str,
    connections: u32,
    body: impl AsyncFnOnce(&PgPool) -> Result<T>,
) -> Result<T> {
    let db_name = format!(
        "gantry_bench_{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(PG_ADMIN_URL)
        .await?;
    sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
        .execute(&admin)
        .await?;
    let result = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections)
            .connect(&format!("postgres://root@127.0.0.1:5432/{db_name}"))
            .await?;
        let r = body(&pool).await;
        pool.close().await;
        r
    }
    .await;
    let _ = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    ))
    .execute(&admin)
    .await;
    admin.close().await;
    result
}

/// Declare a durable quorum queue.
pub(crate) async fn declare_quorum(ch: &Channel, queue: &str) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    Ok(())
}

/// A channel in confirm mode.
pub(crate) async fn confirming(conn: &Connection) -> Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publish a persistent, mandatory message to `queue` and wait for the broker's confirm.
pub(crate) async fn publish(ch: &Channel, queue: &str, body: &[u8]) -> Result<()> {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    ensure!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "a publish to {queue} was not confirmed as queued"
    );
    Ok(())
}

/// Consume `queue` with manual acks and at most `prefetch` unacked deliveries.
pub(crate) async fn consumer(ch: &Channel, queue: &str, prefetch: u16) -> Result<lapin::Consumer> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// Start `bash -c true` and wait for it; an error unless it exited 0.
pub(crate) async fn bash_true() -> Result<()> {
    let status = tokio::process::Command::new("bash")
        .args(["-c", "true"])
        .stdin(std::process::Stdio::null())
        .status()
        .await?;
    ensure!(status.success(), "bash -c true failed: {status}");
    Ok(())
}
