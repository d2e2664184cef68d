//! Plain-text tables for the CLI.

use chrono::{DateTime, Local, Utc};
use gantry_shared::api::{Artifact, LogEntry, Pool, Task, TaskSummary, Worker};
use gantry_shared::states::StepState;
use std::fmt::Write;

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, headers.to_vec());
    for row in rows {
        line(&mut out, row.iter().map(String::as_str).collect());
    }
    out
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| {
        t.with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    })
    .unwrap_or_else(|| "-".into())
}

/// `1.234s`, `2m03s`, `1h02m`.
pub fn duration(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> String {
    let (Some(a), Some(b)) = (from, to) else {
        return "-".into();
    };
    let ms = (b - a).num_milliseconds().max(0);
    if ms < 60_000 {
        format!("{:.3}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

pub fn tasks(tasks: &[TaskSummary]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.name.clone(),
                t.state.to_string(),
                time(Some(t.created_at)),
                duration(t.started_at, t.finished_at),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "CREATED", "DURATION"], &rows)
}

pub fn artifacts(artifacts: &[Artifact]) -> String {
    let rows: Vec<Vec<String>> = artifacts
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.step.clone(),
                a.attempt.to_string(),
                a.name.clone(),
                a.size.to_string(),
                a.state.clone(),
                a.sha256.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &["ID", "STEP", "ATTEMPT", "NAME", "SIZE", "STATE", "SHA256"],
        &rows,
    )
}

pub fn task(t: &Task) -> String {
    let s = &t.summary;
    let mut out = String::new();
    let _ = writeln!(out, "Task     {}", s.id);
    let _ = writeln!(out, "Name     {}", s.name);
    let _ = writeln!(out, "State    {}", s.state);
    if let Some(e) = &s.error {
        let _ = writeln!(out, "Error    {e}");
    }
    let _ = writeln!(out, "Created  {}", time(Some(s.created_at)));
    let _ = writeln!(out, "Duration {}", duration(s.started_at, s.finished_at));
    out.push('\n');
    let mut rows = Vec::new();
    for step in &t.steps {
        if step.attempts.is_empty() {
            // A manual step: the wait is its run, and the decision its note.
            let note = match &step.approval {
                Some(a) if a.decision.is_none() => {
                    format!("waiting for approval: {}", a.instructions)
                }
                _ => step
                    .reason
                    .clone()
                    .or_else(|| step.waiting_for.clone())
                    .unwrap_or_default(),
            };
            rows.push(vec![
                step.name.clone(),
                step.state.to_string(),
                "-".into(),
                step.pool.clone().unwrap_or_else(|| "-".into()),
                if step.approval.is_some() {
                    "(manual)".into()
                } else {
                    "-".into()
                },
                "-".into(),
                "-".into(),
                if step.started_at.is_some() {
                    duration(step.started_at, step.finished_at)
                } else {
                    "-".into()
                },
                note,
            ]);
        }
        for a in &step.attempts {
            // The current attempt of a waiting step shows what it waits for.
            let note = match (&step.waiting_for, a.attempt == step.attempt) {
                (Some(w), true) if a.error.is_none() => format!("waiting for {w}"),
                _ => a.error.clone().unwrap_or_default(),
            };
            let state = if a.attempt == step.attempt && step.state == StepState::Waiting {
                StepState::Waiting.to_string()
            } else {
                a.state.to_string()
            };
            rows.push(vec![
                step.name.clone(),
                state,
                a.attempt.to_string(),
                step.pool.clone().unwrap_or_else(|| "-".into()),
                a.worker.clone().unwrap_or_else(|| "-".into()),
                a.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                duration(Some(a.created_at), a.started_at),
                duration(a.started_at, a.finished_at),
                note,
            ]);
        }
    }
    out.push_str(&table(
        &[
            "STEP", "STATE", "ATTEMPT", "POOL", "WORKER", "EXIT", "WAITED", "RAN", "NOTE",
        ],
        &rows,
    ));
    let outputs: Vec<Vec<String>> = t
        .steps
        .iter()
        .flat_map(|s| {
            s.outputs
                .iter()
                .map(move |(k, v)| vec![format!("Steps.{}.Output.{k}", s.name), v.clone()])
        })
        .collect();
    if !outputs.is_empty() {
        out.push('\n');
        out.push_str(&table(&["OUTPUT", "VALUE"], &outputs));
    }
    out
}

pub fn workers(workers: &[Worker]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                w.id.to_string(),
                if w.enabled { "yes" } else { "no" }.into(),
                w.health.to_string(),
                format!("{}/{}", w.running_steps, w.max_concurrent_steps),
                w.pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                time(w.last_heartbeat_at),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ID",
            "ENABLED",
            "HEALTH",
            "RUNNING",
            "POOLS",
            "LAST HEARTBEAT",
        ],
        &rows,
    )
}

pub fn pools(pools: &[Pool]) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.slug.clone(),
                p.id.to_string(),
                if p.is_default { "yes" } else { "" }.into(),
                p.worker_count.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "SLUG", "ID", "DEFAULT", "WORKERS"], &rows)
}

/// `12:00:01 build   | text` (`!` for stderr, `*` for Gantry's own lines).
pub fn log_line(l: &LogEntry) -> String {
    let mark = match l.stream.as_str() {
        "stderr" => '!',
        "gantry" => '*',
        _ => '|',
    };
    format!(
        "{} {:<12} {mark} {}",
        l.ts.with_timezone(&Local).format("%H:%M:%S"),
        l.step.as_deref().unwrap_or(""),
        l.text
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn durations_read_well() {
        let a = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let d = |ms| duration(Some(a), Some(a + chrono::Duration::milliseconds(ms)));
        assert_eq!(d(1234), "1.234s");
        assert_eq!(d(123_000), "2m03s");
        assert_eq!(d(3_720_000), "1h02m");
        assert_eq!(duration(None, Some(a)), "-");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
