//! `GET /metrics` in the Prometheus text format. Counts come from PostgreSQL and the broker at
//! scrape time; the step duration histogram is kept in memory by the node that concluded the
//! steps (so a cluster's histogram is the sum over its nodes, as Prometheus expects).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the step duration buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

#[derive(Default)]
pub struct Metrics {
    durations: Mutex<Histogram>,
    log_batches: AtomicU64,
    log_lines: AtomicU64,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn observe_step_duration(&self, seconds: f64) {
        let mut h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] = h.counts[i].saturating_add(1);
            }
        }
        h.count = h.count.saturating_add(1);
        h.sum += seconds;
    }

    /// A log batch stored with `lines` new lines.
    pub fn observe_log_batch(&self, lines: u64) {
        self.log_batches.fetch_add(1, Ordering::Relaxed);
        self.log_lines.fetch_add(lines, Ordering::Relaxed);
    }

    pub fn render_counters(&self, out: &mut String) {
        out.push_str("# HELP gantry_log_batches_total Log batches stored by this node.\n# TYPE gantry_log_batches_total counter\n");
        let _ = writeln!(
            out,
            "gantry_log_batches_total {}",
            self.log_batches.load(Ordering::Relaxed)
        );
        out.push_str("# HELP gantry_log_lines_total Log lines stored by this node.\n# TYPE gantry_log_lines_total counter\n");
        let _ = writeln!(
            out,
            "gantry_log_lines_total {}",
            self.log_lines.load(Ordering::Relaxed)
        );
        crate::supervise::render(out);
    }

    pub fn render_histogram(&self, out: &mut String) {
        let h = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP gantry_step_duration_seconds Duration of finished step attempts, from start to finish.\n");
        out.push_str("# TYPE gantry_step_duration_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "gantry_step_duration_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "gantry_step_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "gantry_step_duration_seconds_sum {}", h.sum);
        let _ = writeln!(out, "gantry_step_duration_seconds_count {}", h.count);
    }
}

/// Escape a label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
