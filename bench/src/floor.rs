//! The floor: what a one-step task costs on this machine with Gantry's guarantees and none of
//! its code. A scratch database with one table and two quorum queues carry the least that any
//! dispatcher keeping those guarantees must do per step:
//!
//! - **submit**: the task's row, committed (one WAL flush), then the job published to a quorum
//!   queue and its confirm awaited (a quorum write);
//! - **claim**: a worker takes the delivery and commits the step's `Running` (one WAL flush);
//! - **run**: `bash -c true`;
//! - **result**: the worker publishes the result to a second quorum queue (confirm awaited)
//!   and acks the job; a results consumer stores whatever has arrived, up to 64, in one
//!   commit, then acks them with one multiple ack (commit before ack).
//!
//! Three commits, two quorum round trips and one spawn per step, against Gantry's 4 commits,
//! ~48 statements and its logs, outputs, claims and leases. Measured three ways: closed loop
//! at the agents' parallelism (the rate), one step after another (the gap between a step's
//! exit and the next step's claim), and submissions of the api scenario's tasks from its 20
//! clients (a task row and its step rows in one commit, then its first job confirmed). A figure of Gantry's that cannot reach its target even here is
//! bounded by PostgreSQL's commits, RabbitMQ's quorum writes and the kernel's spawn, not by
//! Gantry's code.

use crate::measure::percentile;
use crate::raw::{bash_true, confirming, consumer, declare_quorum, publish, scratch_db};
use crate::{AGENTS, Figure, Opts, SLOTS, ScenarioResult};
use anyhow::{Context, Result, ensure};
use futures::{FutureExt, StreamExt};
use gantry_tests::AMQP_URL;
use lapin::options::{BasicAckOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The closed loop's submitters, as many as the API clients of the throughput scenario.
const SUBMITTERS: usize = crate::CLIENTS;

pub(crate) async fn floor(opts: &Opts) -> Result<ScenarioResult> {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (jobs, results, posts) = (
        format!("bench-{tag}.jobs"),
        format!("bench-{tag}.results"),
        format!("bench-{tag}.posts"),
    );
    let conn = Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await?;
    let connections = (SUBMITTERS + AGENTS * SLOTS as usize + 2) as u32;
    let result = scratch_db("floor", connections, async |db: &PgPool| {
        sqlx::query(
            "CREATE TABLE steps (id bigint PRIMARY KEY, state text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now(), started_at timestamptz,
                 ended_at timestamptz)",
        )
        .execute(db)
        .await?;
        sqlx::query("CREATE TABLE tasks (id bigint PRIMARY KEY, spec jsonb NOT NULL)")
            .execute(db)
            .await?;
        sqlx::query(
            "CREATE TABLE task_steps (task_id bigint NOT NULL REFERENCES tasks (id), idx int NOT NULL,
                 name text NOT NULL, PRIMARY KEY (task_id, idx))",
        )
        .execute(db)
        .await?;
        let setup = conn.create_channel().await?;
        for q in [&jobs, &results, &posts] {
            declare_quorum(&setup, q).await?;
        }
        let commit_ms = commit_latency(db, opts.counts.floor_commits).await?;
        let (rate, n) = closed_loop(&conn, db, &jobs, &results, opts.counts.floor_steps).await?;
        let gaps = sequential(&conn, db, &jobs, &results, opts.counts.sequential_steps).await?;
        let post_ms = submissions(
            &conn,
            db,
            &posts,
            opts.counts.floor_posts,
            opts.counts.api_steps,
        )
        .await?;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM steps WHERE state = 'Success'")
            .fetch_one(db)
            .await?;
        let expected = n + opts.counts.sequential_steps;
        ensure!(
            stored as usize == expected,
            "{stored}/{expected} floor steps stored as Success"
        );
        Ok((commit_ms, rate, n, gaps, post_ms))
    })
    .await;
    if let Ok(ch) = conn.create_channel().await {
        for q in [&jobs, &results, &posts] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "bench done".into()).await;
    let (commit_ms, rate, n, gaps, post_ms) = result?;
    let (posts_n, steps) = (opts.counts.floor_posts, opts.counts.api_steps);
    let parallelism = AGENTS * SLOTS as usize;
    Ok(ScenarioResult {
        name: "floor".into(),
        figures: vec![
            Figure::plain(
                &format!(
                    "durable skeleton: one-step rate at parallelism {parallelism} (3 commits, 2 quorum round trips, 1 spawn per step)"
                ),
                rate,
                "steps/s",
            ),
            Figure::plain(
                "durable skeleton: gap from a step's exit to the next step's claim p50",
                percentile(&gaps, 50.0),
                "ms",
            ),
            Figure::plain(
                "durable skeleton: that gap p99",
                percentile(&gaps, 99.0),
                "ms",
            ),
            Figure::plain(
                &format!(
                    "durable skeleton: submission of a {steps}-step task p50, {SUBMITTERS} clients, closed loop"
                ),
                percentile(&post_ms, 50.0),
                "ms",
            ),
            Figure::plain(
                &format!(
                    "durable skeleton: submission of a {steps}-step task p99, {SUBMITTERS} clients, closed loop"
                ),
                percentile(&post_ms, 99.0),
                "ms",
            ),
            Figure::plain(
                "one-row INSERT committed alone p50 (the WAL flush)",
                percentile(&commit_ms, 50.0),
                "ms",
            ),
        ],
        checked: format!(
            "{n}/{n} closed-loop steps and {}/{} sequential steps stored as Success, every job and result confirmed and acked; {posts_n}/{posts_n} submissions of {steps} steps stored and their first jobs confirmed",
            opts.counts.sequential_steps, opts.counts.sequential_steps
        ),
        notes: vec![
            "The floor is no dispatcher: one table, two quorum queues, and per step the three commits, two confirmed publishes and one spawn that Gantry's guarantees need at least (the task's record before its job, the claim, the result stored before its ack). What Gantry adds on top (logs, outputs, variables, leases, attempts, routing) is not in it.".into(),
        ],
        ..Default::default()
    })
}

fn id_of(data: &[u8]) -> Result<i64> {
    std::str::from_utf8(data)?
        .parse()
        .context("a floor message that is not a step id")
}

async fn commit_latency(db: &PgPool, n: usize) -> Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        sqlx::query("INSERT INTO steps (id, state, ended_at) VALUES ($1, 'Probe', now())")
            .bind(-(i as i64) - 1)
            .execute(db)
            .await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    sqlx::query("DELETE FROM steps WHERE state = 'Probe'")
        .execute(db)
        .await?;
    Ok(ms)
}

/// Claim, spawn, publish the result, ack the job: a worker's part of one step. Returns when
/// the result is confirmed.
async fn work(db: &PgPool, results_ch: &Channel, results: &str, id: i64) -> Result<()> {
    let claimed = sqlx::query(
        "UPDATE steps SET state = 'Running', started_at = now() WHERE id = $1 AND state = 'Queued'",
    )
    .bind(id)
    .execute(db)
    .await?;
    ensure!(claimed.rows_affected() == 1, "step {id} claimed twice");
    bash_true().await?;
    publish(results_ch, results, id.to_string().as_bytes()).await
}

/// Store every result that has arrived (up to 64) in one commit, then ack them at once.
async fn store_results(db: &PgPool, consumer: &mut lapin::Consumer) -> Result<usize> {
    let first = consumer.next().await.context("results consumer ended")??;
    let mut batch = vec![first];
    while batch.len() < 64 {
        match consumer.next().now_or_never() {
            Some(Some(d)) => batch.push(d?),
            _ => break,
        }
    }
    let ids: Vec<i64> = batch
        .iter()
        .map(|d| id_of(&d.data))
        .collect::<Result<_>>()?;
    let done = sqlx::query(
        "UPDATE steps SET state = 'Success', ended_at = now() WHERE id = ANY($1) AND state = 'Running'",
    )
    .bind(&ids)
    .execute(db)
    .await?;
    ensure!(
        done.rows_affected() as usize == ids.len(),
        "a result for a step that was not running"
    );
    let last = batch.last().expect("one at least");
    last.acker.ack(BasicAckOptions { multiple: true }).await?;
    Ok(batch.len())
}

/// `n` steps from [`SUBMITTERS`] submitters, as fast as the workers (the agents' total
/// slots, prefetch 1 each) and the results consumer take them. Returns (steps/s, n).
async fn closed_loop(
    conn: &Connection,
    db: &PgPool,
    jobs: &str,
    results: &str,
    n: usize,
) -> Result<(f64, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SUBMITTERS {
        let (ch, db, next, jobs) = (
            confirming(conn).await?,
            db.clone(),
            next.clone(),
            jobs.to_string(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                sqlx::query("INSERT INTO steps (id, state) VALUES ($1, 'Queued')")
                    .bind(i as i64)
                    .execute(&db)
                    .await?;
                publish(&ch, &jobs, i.to_string().as_bytes()).await?;
            }
        });
    }
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..AGENTS * SLOTS as usize {
        let (ch, results_ch, db) = (
            conn.create_channel().await?,
            confirming(conn).await?,
            db.clone(),
        );
        let mut deliveries = consumer(&ch, jobs, 1).await?;
        let results = results.to_string();
        workers.spawn(async move {
            while let Some(d) = deliveries.next().await {
                let d = d?;
                work(&db, &results_ch, &results, id_of(&d.data)?).await?;
                d.ack(BasicAckOptions::default()).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    let results_ch = conn.create_channel().await?;
    let mut stored_consumer = consumer(&results_ch, results, 256).await?;
    let mut stored = 0;
    while stored < n {
        tokio::select! {
            r = store_results(db, &mut stored_consumer) => stored += r?,
            Some(Ok(Err(e))) = tasks.join_next() => return Err(e),
            Some(r) = workers.join_next() => r??,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    workers.abort_all();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let _ = results_ch.close(200, "done".into()).await;
    Ok((n as f64 / elapsed, n))
}

/// `m` steps one after another, each submitted in the transaction that stores its
/// predecessor's result (as Gantry's conclusion does), ids after the closed loop's. Returns
/// the gaps (ms) from each step's exit to the next step's claim.
async fn sequential(
    conn: &Connection,
    db: &PgPool,
    jobs: &str,
    results: &str,
    m: usize,
) -> Result<Vec<f64>> {
    let base = 1_000_000_000i64;
    let (pub_ch, work_ch, res_ch) = (
        confirming(conn).await?,
        conn.create_channel().await?,
        conn.create_channel().await?,
    );
    let results_pub = confirming(conn).await?;
    let mut deliveries = consumer(&work_ch, jobs, 1).await?;
    let mut stored = consumer(&res_ch, results, 1).await?;
    let mut gaps = Vec::with_capacity(m);
    let mut exited: Option<Instant> = None;
    for i in 0..m as i64 {
        let id = base + i;
        if exited.is_some() {
            // The predecessor's result arrives, is stored with this step's record in one
            // commit, and is acked after it.
            publish(&results_pub, results, (id - 1).to_string().as_bytes()).await?;
            let d = stored.next().await.context("results consumer ended")??;
            let mut tx = db.begin().await?;
            sqlx::query("UPDATE steps SET state = 'Success', ended_at = now() WHERE id = $1")
                .bind(id_of(&d.data)?)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO steps (id, state) VALUES ($1, 'Queued')")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            d.ack(BasicAckOptions::default()).await?;
        } else {
            sqlx::query("INSERT INTO steps (id, state) VALUES ($1, 'Queued')")
                .bind(id)
                .execute(db)
                .await?;
        }
        publish(&pub_ch, jobs, id.to_string().as_bytes()).await?;
        let mut d = deliveries.next().await.context("job consumer ended")??;
        while id_of(&d.data)? < base {
            // A closed-loop job whose ack the end of that phase cut off (its worker task
            // aborted between the result's confirm and the ack): requeued when its channel
            // closed, and already stored. Not this phase's.
            d.ack(BasicAckOptions::default()).await?;
            d = deliveries.next().await.context("job consumer ended")??;
        }
        let got = id_of(&d.data)?;
        ensure!(got == id, "job {got} delivered for step {id}");
        sqlx::query("UPDATE steps SET state = 'Running', started_at = now() WHERE id = $1")
            .bind(id)
            .execute(db)
            .await?;
        if let Some(t) = exited {
            gaps.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        bash_true().await?;
        exited = Some(Instant::now());
        d.ack(BasicAckOptions::default()).await?;
    }
    // The last step's result.
    sqlx::query("UPDATE steps SET state = 'Success', ended_at = now() WHERE id = $1")
        .bind(base + m as i64 - 1)
        .execute(db)
        .await?;
    for ch in [pub_ch, work_ch, res_ch, results_pub] {
        let _ = ch.close(200, "done".into()).await;
    }
    Ok(gaps)
}

/// `n` submissions of a `steps`-step task from [`SUBMITTERS`] clients, closed loop: the task's
/// row and its step rows in one commit, then its first job published and confirmed (to a
/// queue nobody consumes). Returns each submission's time (ms).
async fn submissions(
    conn: &Connection,
    db: &PgPool,
    posts: &str,
    n: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..SUBMITTERS {
        let (ch, db, next, posts) = (
            confirming(conn).await?,
            db.clone(),
            next.clone(),
            posts.to_string(),
        );
        clients.spawn(async move {
            let mut ms = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ms);
                }
                let t = Instant::now();
                let spec = serde_json::json!({ "name": format!("task {i}"), "steps": steps });
                let mut tx = db.begin().await?;
                sqlx::query("INSERT INTO tasks (id, spec) VALUES ($1, $2)")
                    .bind(i as i64)
                    .bind(&spec)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO task_steps (task_id, idx, name)
                     SELECT $1, g, 'step ' || g FROM generate_series(0, $2 - 1) g",
                )
                .bind(i as i64)
                .bind(steps as i32)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                publish(&ch, &posts, i.to_string().as_bytes()).await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = clients.join_next().await {
        all.extend(r??);
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM task_steps")
        .fetch_one(db)
        .await?;
    ensure!(
        all.len() == n && stored as usize == n * steps,
        "{} submissions answered and {stored} step rows stored, of {n} × {steps}",
        all.len()
    );
    Ok(all)
}
