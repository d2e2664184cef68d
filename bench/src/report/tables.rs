//! The cost table and the two CSV files of a run: `docs/bench/figures.csv` (every figure)
//! and `docs/bench/costs.csv` (each measured window's costs per unit of work).

use super::num;
use crate::Outcome;
use crate::costs::{CPU_GROUPS, Costs};
use std::fmt::Write as _;

/// CPU per unit in ms, or in µs for the small ones.
fn cpu_cell(ms: Option<f64>, micro: bool) -> String {
    match ms {
        None => "–".into(),
        Some(ms) if micro => format!("{} µs", num(ms * 1000.0)),
        Some(ms) => format!("{} ms", num(ms)),
    }
}

/// Whether a window's CPU per unit is best shown in µs (every group under 1 ms).
fn micro(c: &Costs) -> bool {
    CPU_GROUPS
        .iter()
        .all(|g| c.cpu_ms_per_unit(g).is_none_or(|v| v < 1.0))
}

/// A window's costs as `gantry-bench` prints them.
pub fn costs_line(c: &Costs) -> String {
    let m = micro(c);
    let cpu: Vec<String> = CPU_GROUPS
        .iter()
        .map(|g| format!("{g} {}", cpu_cell(c.cpu_ms_per_unit(g), m)))
        .collect();
    format!(
        "per {} ({}): {} commits, {} statements; CPU {}",
        c.unit,
        c.label,
        num(c.commits_per_unit()),
        c.statements_per_unit().map_or("n/a".into(), num),
        cpu.join(", ")
    )
}

/// The cost table: one row per measured window.
pub(super) fn costs_section(s: &mut String, outcomes: &[Outcome]) {
    let rows: Vec<(&str, &Costs)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|r| (o.name.as_str(), r)))
        .flat_map(|(n, r)| r.costs.iter().map(move |c| (n, c)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## What each unit of work cost\n");
    let _ = writeln!(
        s,
        "Per unit of work, over each scenario's measured window. **Commits** and **rows** are \
         `pg_stat_database`'s for the stack's own database (the harness's own queries taken \
         out; read once PostgreSQL has published every backend's counts, which can take 10 s, \
         less the idle stack's background over that wait, except in quick mode). **Statements** are \
         `pg_stat_statements` calls in that database, BEGIN and COMMIT included. **CPU** is \
         utime + stime from `/proc/<pid>/stat`: the dispatcher process, the agent processes, \
         the **steps** (every process below an agent or a dispatcher: guards and scripts, \
         reaped or alive), the PostgreSQL backends serving the stack's dispatcher, every \
         PostgreSQL process (all databases: other work on the machine counts too), RabbitMQ \
         (`beam.smp`, every vhost), Redis, this harness, and the machine's busy time.\n"
    );
    let missing = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .flat_map(|r| r.costs.iter())
        .find_map(|c| c.statements_missing.as_deref());
    if let Some(why) = missing {
        let _ = writeln!(
            s,
            "Statements are not counted in this run: {why}. Rows written and fetched stand in for them.\n"
        );
    }
    let _ = write!(
        s,
        "| scenario | per | commits | statements | rows written | rows fetched |"
    );
    for g in CPU_GROUPS {
        let _ = write!(s, " CPU: {g} |");
    }
    let _ = write!(s, "\n| --- | --- | --- | --- | --- | --- |");
    for _ in CPU_GROUPS {
        let _ = write!(s, " --- |");
    }
    let _ = writeln!(s);
    for (name, c) in rows {
        let m = micro(c);
        let _ = write!(
            s,
            "| {name} | {} ({}) | {} | {} | {} | {} |",
            c.unit,
            c.label,
            num(c.commits_per_unit()),
            c.statements_per_unit().map_or("n/a".into(), num),
            num(c.per_unit(c.db.rows_written())),
            num(c.per_unit(c.db.rows_fetched)),
        );
        for g in CPU_GROUPS {
            let _ = write!(s, " {} |", cpu_cell(c.cpu_ms_per_unit(g), m));
        }
        let _ = writeln!(s);
    }
}

/// `docs/bench/figures.csv`: every figure of the run.
pub(super) fn figures_csv(outcomes: &[Outcome]) -> String {
    let mut s =
        String::from("scenario,figure,value,unit,reference,reference_value,ratio,target,met\n");
    for o in outcomes {
        let Ok(r) = &o.result else { continue };
        for f in &r.figures {
            let (rw, rv) = f
                .reference
                .as_ref()
                .map_or((String::new(), String::new()), |(w, v)| {
                    (w.clone(), v.to_string())
                });
            let _ = writeln!(
                s,
                "{},{},{},{},{},{rv},{},{},{}",
                o.name,
                csv(&f.name),
                f.value,
                csv(&f.unit),
                csv(&rw),
                f.ratio().map_or(String::new(), |x| x.to_string()),
                csv(&f.target),
                f.met.map_or(String::new(), |m| m.to_string()),
            );
        }
    }
    s
}

/// `docs/bench/costs.csv`: each measured window's costs per unit, CPU in ms.
pub(super) fn costs_csv(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "scenario,window,unit,units,secs,commits,rollbacks,statements,rows_inserted,rows_updated,rows_deleted,rows_fetched,wal_bytes,background_commits_per_sec",
    );
    for g in CPU_GROUPS {
        let _ = write!(s, ",cpu_ms_{}", g.replace(['(', ')'], "").replace(' ', "_"));
    }
    s.push('\n');
    for o in outcomes {
        let Ok(r) = &o.result else { continue };
        for c in &r.costs {
            let p = |x: f64| format!("{:.6}", c.per_unit(x));
            let _ = write!(
                s,
                "{},{},{},{},{:.3},{},{},{},{},{},{},{},{},{}",
                o.name,
                csv(&c.label),
                c.unit,
                c.units,
                c.secs,
                p(c.db.commits),
                p(c.db.rollbacks),
                c.statements_per_unit()
                    .map_or(String::new(), |v| format!("{v:.6}")),
                p(c.db.rows_inserted),
                p(c.db.rows_updated),
                p(c.db.rows_deleted),
                p(c.db.rows_fetched),
                p(c.wal_bytes),
                c.background_commits_per_sec
                    .map_or(String::new(), |b| format!("{b:.3}")),
            );
            for g in CPU_GROUPS {
                let _ = write!(
                    s,
                    ",{}",
                    c.cpu_ms_per_unit(g)
                        .map_or(String::new(), |v| format!("{v:.6}"))
                );
            }
            s.push('\n');
        }
    }
    s
}

/// A CSV field, quoted if it needs to be.
fn csv(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}
