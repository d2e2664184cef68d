//! Log reads are bounded in memory: a page holds at most 4 MiB whatever `limit` says, and is
//! streamed. Four readers of a 100 MB log at once (three reading its first pages, whose
//! `limit` would cover the whole log, one paging through all of it) keep the dispatcher under
//! 200 MiB resident; paging (and the CLI) gets every line, in order.
//!
//! The 100 MB are inserted straight into the test's database (10 000 lines of 10 000 bytes,
//! after the lines of a real step): loading them through an agent would take minutes on a
//! small machine and is not what this test is about.

use gantry_tests::gantry_shared::api::{API_KEY_HEADER, LogPage};
use gantry_tests::{API_KEY, AgentOpts, Stack, bin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const LINES: i64 = 10_000;
const LINE_BYTES: usize = 10_000;
const PAGE_CAP: usize = 4 << 20;

fn rss_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn digest(text: &str) -> String {
    let head: String = text.chars().take(20).collect();
    format!("{head}…{}", text.len())
}

/// Page through the log with `limit`, for at most `pages` pages; returns every line's digest
/// and the largest page's size.
async fn read_pages(
    http: reqwest::Client,
    url: String,
    limit: &str,
    pages: usize,
) -> (Vec<String>, usize) {
    let mut after = String::new();
    let mut texts = Vec::new();
    let mut biggest = 0;
    for _ in 0..pages {
        let body = http
            .get(format!("{url}?after={after}&limit={limit}"))
            .header(API_KEY_HEADER, API_KEY)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        biggest = biggest.max(body.len());
        let page: LogPage = serde_json::from_slice(&body).unwrap();
        assert!(page.lines.len() <= limit.parse().unwrap());
        if page.lines.is_empty() {
            assert!(page.complete, "an empty page of an ended task is complete");
            break;
        }
        // A line's head and length stand for it (five readers of 100 MB would be a lot).
        texts.extend(page.lines.into_iter().map(|l| digest(&l.text)));
        after = page.next;
    }
    (texts, biggest)
}

#[tokio::test]
async fn four_readers_of_a_100_mb_log_stay_small_and_paging_gets_every_line() {
    // Arrange: a real step's lines, then 100 MB more inserted as that step's.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("logs", AgentOpts::default()).await.unwrap();
    let task = stack
        .submit("name = \"big\"\n[[steps]]\nname = \"s\"\nscript = \"echo first real line\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.summary.state, "Success");
    let db = stack.db().await;
    let mut tx = db.begin().await.unwrap();
    let start: i64 = sqlx::query_scalar(
        "UPDATE task_log_positions SET last_pos = last_pos + $2 WHERE task_id = $1
         RETURNING last_pos - $2",
    )
    .bind(task.0)
    .bind(LINES)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO log_lines (task_id, pos, step_run_id, attempt, seq, ts, stream, text)
         SELECT $1, $2 + i, $3, 1, 1000000 + i, now(), 1,
                'bulk ' || lpad(i::text, 8, '0') || ' ' || repeat(md5(i::text), $4)
         FROM generate_series(1, $5::bigint) AS i",
    )
    .bind(task.0)
    .bind(start)
    .bind(done.steps[0].id.0)
    .bind((LINE_BYTES / 32) as i32)
    .bind(LINES)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // What the API must return: every line in position order, straight from the database.
    let before: Vec<String> = sqlx::query_as::<_, (String, i32)>(
        "SELECT left(text, 20), octet_length(text) FROM log_lines WHERE task_id = $1 ORDER BY pos",
    )
    .bind(task.0)
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .map(|(head, len)| format!("{head}…{len}"))
    .collect();
    let url = format!("{}/api/tasks/{task}/log", stack.url);
    let pid = stack.dispatcher.as_ref().unwrap().pid().unwrap();
    let baseline = rss_kib(pid, "VmRSS:");

    // Act: four readers at once (default limit, and the largest limit), sampling the RSS.
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Three readers of the first pages (the default limit, and the largest: each page would
    // be the whole log without the byte cap), and one that pages through everything with a
    // small odd limit, all at once.
    let readers: Vec<_> = [
        ("10000", 3),
        ("100000", 3),
        ("10000", 3),
        ("997", usize::MAX),
    ]
    .into_iter()
    .map(|(limit, pages)| tokio::spawn(read_pages(stack.http.clone(), url.clone(), limit, pages)))
    .collect();
    let mut results = Vec::new();
    for r in readers {
        results.push(r.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let hwm = rss_kib(pid, "VmHWM:");
    let cli = std::process::Command::new(bin("gantry"))
        .args(["log", &task.to_string()])
        .env("GANTRY_SERVER", &stack.url)
        .env("GANTRY_API_KEY", API_KEY)
        .output()
        .unwrap();
    let cli_lines = String::from_utf8_lossy(&cli.stdout)
        .lines()
        .filter(|l| l.contains("bulk "))
        .count();

    // Assert
    let peak_mib = peak.load(Ordering::Relaxed) / 1024;
    assert!(
        hwm / 1024 < 200 && peak_mib < 200,
        "dispatcher RSS: baseline {} MiB, peak sampled {peak_mib} MiB, VmHWM {} MiB",
        baseline / 1024,
        hwm / 1024
    );
    let total = before.len();
    assert!(total as i64 > LINES, "{total} lines");
    for (texts, biggest) in &results {
        assert!(*biggest <= PAGE_CAP, "a page of {biggest} bytes");
        assert!(texts.len() > 3, "pages of many lines");
        assert!(
            texts[..] == before[..texts.len()],
            "lines in order, from the start"
        );
    }
    assert!(results[3].0 == before, "paging gets every line, in order");
    let bulk: Vec<&String> = before.iter().filter(|t| t.starts_with("bulk ")).collect();
    assert_eq!(bulk.len() as i64, LINES);
    for (i, t) in bulk.iter().enumerate() {
        assert!(
            t.starts_with(&format!("bulk {:08} ", i + 1)),
            "line {i} out of order"
        );
    }
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(cli_lines as i64, LINES, "the CLI reads every line");
}
