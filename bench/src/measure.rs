//! Small measurements: memory from `/proc`, CPU seconds, percentiles, CSV samples.

use crate::Opts;
use crate::stack::dispatcher_pid;
use anyhow::{Context, Result};
use gantry_tests::Stack;
use sqlx::PgPool;

/// A field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn proc_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// A field of `/proc/<pid>/smaps_rollup` (`Pss`, `Private_Clean`), in KiB.
pub fn rollup_kib(pid: i32, field: &str) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/smaps_rollup"))
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The `p`-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub(crate) fn write_csv(opts: &Opts, file: &str, header: &str, rows: &[String]) -> Result<String> {
    let path = opts.samples_dir().join(file);
    let mut text = String::with_capacity(rows.len() * 24);
    text.push_str(header);
    text.push('\n');
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(file.to_owned())
}

/// CPU time of a process and of its reaped children, in seconds (`/proc/<pid>/stat`).
pub(crate) fn cpu_secs(pid: i32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17, i.e. 11..=14 after the name; /proc
    // counts in USER_HZ, 100 on Linux.
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    (get(11) + get(12), get(13) + get(14))
}

/// Machine-wide (busy, total) CPU seconds from `/proc/stat`.
pub(crate) fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// Where the CPU went during a scenario: a poor man's profile, measured on every run.
pub(crate) struct Usage {
    dispatcher: (f64, f64),
    agents: Vec<(f64, f64)>,
    machine: (f64, f64),
    wal: f64,
}

impl Usage {
    pub(crate) async fn sample(stack: &Stack, db: &PgPool) -> Result<Self> {
        let dispatcher = cpu_secs(dispatcher_pid(stack)?);
        let agents = stack
            .agents
            .iter()
            .filter_map(|a| a.proc.as_ref().and_then(|p| p.pid()))
            .map(cpu_secs)
            .collect();
        let wal: f64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
                .fetch_one(db)
                .await?;
        Ok(Self {
            dispatcher,
            agents,
            machine: machine_cpu(),
            wal,
        })
    }

    /// What was spent between `self` and `after`, per `unit` (`step`, `line`, `POST`), in ms,
    /// or in µs where a figure would print as 0.00 ms.
    pub(crate) fn note(&self, after: &Usage, count: usize, unit: &str) -> String {
        let per = |x: f64| x / count as f64 * 1000.0;
        let d = after.dispatcher.0 - self.dispatcher.0;
        let (mut a, mut c) = (0.0, 0.0);
        for (x, y) in self.agents.iter().zip(&after.agents) {
            a += y.0 - x.0;
            c += y.1 - x.1;
        }
        let small = [per(d), per(a), per(c)].iter().all(|v| *v < 0.1);
        let time = |ms: f64| {
            if small {
                format!("{:.2} µs", ms * 1000.0)
            } else {
                format!("{ms:.2} ms")
            }
        };
        let busy = after.machine.0 - self.machine.0;
        let total = after.machine.1 - self.machine.1;
        format!(
            "CPU per {unit}: dispatcher {}, agents {}, their children (guard + script) {}; machine {:.0} % busy over the scenario ({:.1} of {:.1} CPU-seconds, the rest of the busy time is PostgreSQL, RabbitMQ, Redis, this harness and anything else on the machine); {:.0} bytes of PostgreSQL WAL per {unit} (cluster-wide: other databases' writes count too).",
            time(per(d)),
            time(per(a)),
            time(per(c)),
            busy / total.max(1e-9) * 100.0,
            busy,
            total,
            (after.wal - self.wal) / count as f64
        )
    }
}
