//! What a window of work cost: the stack's own database's commits, rows and (where
//! `pg_stat_statements` is loaded) statements, and CPU by process, in total and per unit of
//! work. The meter that measures them is in `meter`.

use crate::Figure;
use crate::report::num;
use std::time::Duration;

/// `pg_stat_database`'s counters for one database.
#[derive(Clone, Copy, Debug, Default)]
pub struct DbCounters {
    pub commits: f64,
    pub rollbacks: f64,
    pub rows_inserted: f64,
    pub rows_updated: f64,
    pub rows_deleted: f64,
    pub rows_fetched: f64,
}

impl DbCounters {
    fn zip(self, o: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        Self {
            commits: f(self.commits, o.commits),
            rollbacks: f(self.rollbacks, o.rollbacks),
            rows_inserted: f(self.rows_inserted, o.rows_inserted),
            rows_updated: f(self.rows_updated, o.rows_updated),
            rows_deleted: f(self.rows_deleted, o.rows_deleted),
            rows_fetched: f(self.rows_fetched, o.rows_fetched),
        }
    }

    pub(crate) fn minus(self, o: Self) -> Self {
        self.zip(o, |a, b| a - b)
    }

    pub(crate) fn scaled(self, k: f64) -> Self {
        self.zip(self, |a, _| a * k)
    }

    pub fn rows_written(&self) -> f64 {
        self.rows_inserted + self.rows_updated + self.rows_deleted
    }
}

/// The CPU groups, in the order the report shows them.
pub const CPU_GROUPS: &[&str] = &[
    "dispatcher",
    "agents",
    "steps",
    "postgres (stack)",
    "postgres (all)",
    "rabbitmq",
    "redis",
    "harness",
    "machine busy",
];

/// What a window cost, in total; the `per_*` methods divide by its units.
#[derive(Clone, Debug)]
pub struct Costs {
    /// What was measured ("one-step tasks at full load").
    pub label: String,
    /// The unit of work ("task", "step", "line").
    pub unit: String,
    pub units: usize,
    pub secs: f64,
    pub db: DbCounters,
    /// `pg_stat_statements` calls (BEGIN and COMMIT included), where it is loaded.
    pub statements: Option<f64>,
    /// The idle stack's commits per second, measured before the window.
    pub background_commits_per_sec: Option<f64>,
    /// PostgreSQL WAL written, cluster-wide.
    pub wal_bytes: f64,
    /// CPU seconds by group, as [`CPU_GROUPS`].
    pub cpu: Vec<(String, f64)>,
    pub machine_total: f64,
    /// The harness's own transactions in the stack's database, already subtracted.
    pub polls: u64,
    pub settle: Duration,
    /// Why statements are not counted, if they are not.
    pub statements_missing: Option<String>,
}

impl Costs {
    fn per(&self, x: f64) -> f64 {
        x / self.units.max(1) as f64
    }

    pub fn commits_per_unit(&self) -> f64 {
        self.per(self.db.commits)
    }

    pub fn statements_per_unit(&self) -> Option<f64> {
        self.statements.map(|s| self.per(s))
    }

    /// Milliseconds of CPU per unit for one of [`CPU_GROUPS`].
    pub fn cpu_ms_per_unit(&self, group: &str) -> Option<f64> {
        self.cpu
            .iter()
            .find(|(g, _)| g == group)
            .map(|(_, s)| self.per(*s) * 1000.0)
    }

    pub fn per_unit(&self, x: f64) -> f64 {
        self.per(x)
    }

    /// The commits of the run that the idle stack would have made anyway, per unit.
    pub fn background_per_unit(&self) -> Option<f64> {
        self.background_commits_per_sec
            .map(|b| self.per(b * self.secs))
    }

    /// Figures for the report's table: commits per `what` (with its target, if any), and
    /// statements per `what` where they are counted.
    pub fn figures(&self, what: &str, max_commits: Option<f64>) -> Vec<Figure> {
        let name = format!("commits per {what} (pg_stat_database.xact_commit)");
        let commits = self.commits_per_unit();
        let mut v = vec![match max_commits {
            Some(max) => Figure::at_most(&name, commits, "commits", max),
            None => Figure::plain(&name, commits, "commits"),
        }];
        if let Some(s) = self.statements_per_unit() {
            v.push(Figure::plain(
                &format!("statements per {what} (pg_stat_statements)"),
                s,
                "statements",
            ));
        }
        v
    }

    /// One sentence for the report: where the counts come from, and the background in them.
    pub fn note(&self) -> String {
        let u = &self.unit;
        let background = match (self.background_per_unit(), self.background_commits_per_sec) {
            (Some(per), Some(rate)) => format!(
                "{} would have happened on the idle stack anyway ({rate:.1} commits/s of sweeps, heartbeats and leases)",
                num(per)
            ),
            _ => "the idle stack's background is not measured (quick mode: rough counts)".into(),
        };
        format!(
            "Costs of the {} ({} {u}s over {:.1} s; per {u} in the cost table): of the {} commits per {u}, {background}; {:.0} rollbacks; {} bytes of WAL per {u} (cluster-wide); the harness's own {} queries of the stack's database are taken out.",
            self.label,
            self.units,
            self.secs,
            num(self.commits_per_unit()),
            self.db.rollbacks,
            num(self.per(self.wal_bytes)),
            self.polls,
        )
    }
}
