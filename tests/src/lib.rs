//! # gantry-tests: the end-to-end harness
//!
//! Every test gets its own [`Stack`]: a fresh PostgreSQL database, a fresh namespace for its
//! queues and Redis keys, and its own dispatcher process listening on port 0, so the whole
//! suite runs in parallel against one set of services. Agents are real `gantry-agent`
//! processes, registered through their own CLI. When a `Stack` is dropped its processes are
//! killed and its database, queues and keys are removed; if the test failed, the tail of
//! every process log is printed.
//!
//! The binaries are the ones cargo built next to the test executable; when they are missing
//! or older than the test, the harness builds them (`cargo build --bins`) once.

use anyhow::{Result, bail};
use std::time::{Duration, Instant};

pub use gantry_dispatcher;
pub use gantry_shared;

mod agents;
mod bins;
pub mod broker;
mod cleanup;
mod http;
pub mod impersonate;
mod process;
pub mod procs;
mod proxies;
mod stack;
pub mod tls;

pub use agents::{Agent, AgentOpts};
pub use bins::{bin, bin_dir};
pub use process::Proc;
pub(crate) use process::{spawn, wait_for_line};
pub use proxies::{CutProxy, SmtpSink};
pub use stack::{Node, Stack};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// RabbitMQ's management API, as `.ci/run` enables it: every stack gives its workers broker
/// users of their own unless a test asks for development mode ([`DEV_MODE`]).
pub const MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";
/// Extra dispatcher setting for a stack in development mode (shared broker credentials).
pub const DEV_MODE: (&str, &str) = ("GANTRY__AMQP__MANAGEMENT_URL", "");
pub const PG_ADMIN_URL: &str = "postgres://root@127.0.0.1:5432/postgres";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const API_KEY: &str = "API-TEST-0123456789abcdef";

/// Poll `check` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The largest number of intervals open at the same moment.
pub fn max_overlap(
    intervals: &[(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)],
) -> usize {
    let mut points: Vec<(chrono::DateTime<chrono::Utc>, i32)> = Vec::new();
    for (a, b) in intervals {
        points.push((*a, 1));
        points.push((*b, -1));
    }
    // Ends sort before starts at the same instant: touching intervals do not overlap.
    points.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.cmp(&y.1)));
    let mut cur = 0;
    let mut best = 0;
    for (_, d) in points {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}

/// Whether a process still runs: a zombie has exited, so it does not count.
pub fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

/// The number of lines in a file, 0 if there is none.
pub fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A step of a process as the API takes it: named `s`, running `script`, with the fields of
/// `extra` (a JSON object) added or replaced.
pub fn script_step(script: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut s = serde_json::json!({ "name": "s", "script": script });
    for (k, v) in extra.as_object().expect("extra is a JSON object") {
        s[k] = v.clone();
    }
    s
}
