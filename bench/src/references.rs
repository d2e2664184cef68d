//! The references, measured in the same run as the scenarios that divide by them: raw AMQP
//! round trips through a quorum queue, the bare spawn rate of `bash -c true`, and sqlx
//! `COPY` into the `log_lines` layout, each made of the raw clients in `raw`.

use crate::measure::{percentile, write_csv};
use crate::raw;
use crate::{AGENTS, Figure, Opts, SLOTS, ScenarioResult};
use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use std::fmt::Write as _;
use std::time::Instant;

/// Raw AMQP: one persistent message per round trip through a quorum queue, published with
/// confirms and consumed with a manual ack.
pub(crate) async fn amqp(opts: &Opts) -> Result<ScenarioResult> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;
    let n = opts.counts.amqp_round_trips;
    let conn = lapin::Connection::connect(
        gantry_tests::AMQP_URL,
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let queue = format!(
        "bench-{}.amqp",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let result = async {
        let publisher = raw::confirming(&conn).await?;
        raw::declare_quorum(&publisher, &queue).await?;
        let consumer_ch = conn.create_channel().await?;
        let mut consumer = consumer_ch
            .basic_consume(
                queue.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let body = vec![b'x'; 256];
        let mut samples = Vec::with_capacity(n);
        let started = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            raw::publish(&publisher, &queue, &body)
                .await
                .with_context(|| format!("message {i}"))?;
            let delivery = consumer
                .next()
                .await
                .context("consumer ended")?
                .context("consumer error")?;
            ensure!(delivery.data == body, "message {i} came back changed");
            ensure!(
                delivery.ack(BasicAckOptions::default()).await?,
                "ack {i} not sent"
            );
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let _ = publisher
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        Ok::<_, anyhow::Error>((samples, elapsed))
    }
    .await;
    if result.is_err()
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = ch
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
    let (samples, elapsed) = result?;
    let rows: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(i, ms)| format!("{i},{ms:.3}"))
        .collect();
    Ok(ScenarioResult {
        name: "amqp".into(),
        figures: vec![
            Figure::plain(
                "raw AMQP round trips per second",
                n as f64 / elapsed,
                "msg/s",
            ),
            Figure::plain("raw AMQP round trip p50", percentile(&samples, 50.0), "ms"),
            Figure::plain("raw AMQP round trip p99", percentile(&samples, 99.0), "ms"),
        ],
        checked: format!("{n}/{n} messages confirmed, received intact and acked"),
        samples: Some(write_csv(opts, "amqp.csv", "round_trip,ms", &rows)?),
        ..Default::default()
    })
}

/// Bare spawn: `bash -c true` started and reaped at the agents' total parallelism.
pub(crate) async fn spawn(opts: &Opts) -> Result<ScenarioResult> {
    let n = opts.counts.spawns;
    let parallelism = AGENTS * SLOTS as usize;
    let started = Instant::now();
    let mut stream = futures::stream::iter(0..n)
        .map(|_| raw::bash_true())
        .buffer_unordered(parallelism);
    let mut done = 0;
    while let Some(r) = stream.next().await {
        r?;
        done += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(ScenarioResult {
        name: "spawn".into(),
        figures: vec![Figure::plain(
            &format!("bare spawn of bash -c true at parallelism {parallelism}"),
            done as f64 / elapsed,
            "spawns/s",
        )],
        checked: format!("{done}/{n} processes exited 0"),
        ..Default::default()
    })
}

/// The log line that the lines scenario prints: 80 bytes, numbered.
pub(crate) fn line_text(i: usize) -> String {
    format!("{i:08} {}", "x".repeat(71))
}

/// Direct COPY: the same rows as the lines scenario into a table of `log_lines`' layout
/// (primary key and unique index included), in a scratch database, one COPY.
pub(crate) async fn copy(opts: &Opts) -> Result<ScenarioResult> {
    use sqlx::postgres::PgPoolCopyExt;
    let n = opts.counts.lines;
    let result = raw::scratch_db("copy", 1, async |pool: &sqlx::PgPool| {
        sqlx::query(
            "CREATE TABLE log_lines (
                task_id uuid NOT NULL, pos bigint NOT NULL, step_run_id uuid, attempt integer,
                seq bigint, ts timestamptz NOT NULL, stream smallint NOT NULL, text text NOT NULL,
                PRIMARY KEY (task_id, pos))",
        )
        .execute(pool)
        .await?;
        sqlx::query(
            "CREATE UNIQUE INDEX log_lines_attempt_seq ON log_lines (step_run_id, attempt, seq)",
        )
        .execute(pool)
        .await?;
        let task = uuid::Uuid::new_v4();
        let run = uuid::Uuid::new_v4();
        let ts = chrono::Utc::now().to_rfc3339();
        let started = Instant::now();
        let mut copy = pool
            .copy_in_raw(
                "COPY log_lines (task_id, pos, step_run_id, attempt, seq, ts, stream, text) \
                 FROM STDIN WITH (FORMAT csv)",
            )
            .await?;
        let mut buf = String::with_capacity(1 << 20);
        for i in 0..n {
            let _ = writeln!(buf, "{task},{i},{run},1,{i},{ts},1,{}", line_text(i));
            if buf.len() >= 1 << 20 {
                copy.send(buf.as_bytes()).await?;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            copy.send(buf.as_bytes()).await?;
        }
        let rows = copy.finish().await?;
        let elapsed = started.elapsed().as_secs_f64();
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM log_lines")
            .fetch_one(pool)
            .await?;
        ensure!(
            rows as usize == n && count as usize == n,
            "COPY stored {count}/{n} rows"
        );
        Ok(elapsed)
    })
    .await;
    let elapsed = result?;
    Ok(ScenarioResult {
        name: "copy".into(),
        figures: vec![Figure::plain(
            "direct sqlx COPY into the log_lines layout",
            n as f64 / elapsed,
            "lines/s",
        )],
        checked: format!("{n}/{n} rows stored"),
        ..Default::default()
    })
}
