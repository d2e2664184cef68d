//! `docs/BENCHMARKS.md`: the machine, every figure with its reference, ratio and target, and
//! the command that runs each scenario alone.

use crate::{Figure, Opts, Outcome};
use anyhow::Result;
use std::fmt::Write as _;

mod tables;

pub use tables::costs_line;
use tables::{costs_csv, costs_section, figures_csv};

/// The first line of a command's output, or why there is none.
fn version(cmd: &str, args: &[&str]) -> String {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned(),
        Ok(o) => format!(
            "unknown (`{cmd}` exited {}: {})",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("unknown (`{cmd}`: {e})"),
    }
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A value with sensible precision.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.1e}")
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A figure as `gantry-bench` prints it: the value, then its target and whether it is met.
pub fn figure_line(f: &Figure) -> String {
    let mut line = format!("{} = {} {}", f.name, num(f.value), f.unit);
    if let Some(ratio) = f.ratio() {
        let _ = write!(
            line,
            " ({:.0} % of {})",
            ratio * 100.0,
            f.reference.as_ref().map_or("", |r| r.0.as_str())
        );
    }
    if let Some(met) = f.met {
        let verdict = if met { "met" } else { "NOT MET" };
        let _ = write!(line, "  [target {}: {verdict}]", f.target);
    }
    line
}

/// The Markdown document. `analysis` is appended as written (what bounds each missed target).
pub fn markdown(outcomes: &[Outcome], opts: &Opts, plot: Option<&str>, analysis: &str) -> String {
    let profile = if cfg!(debug_assertions) {
        "debug (workspace crates unoptimised, dependencies at opt-level 2)"
    } else {
        "release"
    };
    let mode = if opts.quick {
        "quick (smoke counts: the figures mean nothing)".to_owned()
    } else {
        format!(
            "full, counts × {} (`--scale {}`): {:?}",
            opts.scale, opts.scale, opts.counts
        )
    };
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `cargo run --release -p gantry-bench -- all` (issue 7). Every figure below comes \
         from one run on the machine described, beside references measured in the same run. \
         Each scenario starts its own dispatcher and agents (2 agents × 4 slots unless said \
         otherwise, logging at `warn`) in a fresh database and namespace, checks that nothing \
         was lost, and cleans up.\n"
    );
    let _ = writeln!(s, "## This run\n");
    let _ = writeln!(
        s,
        "- date: {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(s, "- build: {profile}");
    let _ = writeln!(s, "- mode: {mode}");
    let _ = writeln!(
        s,
        "- machine: {} cores ({}), {} memory",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model(),
        mem_total()
    );
    let _ = writeln!(s, "- PostgreSQL: {}", version("psql", &["-V"]));
    let _ = writeln!(s, "- RabbitMQ: {}", version("rabbitmqctl", &["version"]));
    let _ = writeln!(s, "- Redis: {}\n", version("redis-server", &["-v"]));

    let _ = writeln!(s, "## Figures\n");
    let _ = writeln!(
        s,
        "| scenario | figure | value | reference | ratio | target | met |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for o in outcomes {
        match &o.result {
            Ok(r) => {
                for f in &r.figures {
                    let reference = f
                        .reference
                        .as_ref()
                        .map(|(w, v)| format!("{w}: {}", num(*v)))
                        .unwrap_or_else(|| "–".into());
                    let ratio = f
                        .ratio()
                        .map(|x| format!("{:.0} %", x * 100.0))
                        .unwrap_or_else(|| "–".into());
                    let met = match f.met {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        None => "–",
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} {} | {reference} | {ratio} | {} | {met} |",
                        o.name,
                        f.name,
                        num(f.value),
                        f.unit,
                        f.target
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "| {} | **FAILED** | {} | | | | **no** |",
                    o.name,
                    e.replace('|', "\\|").replace('\n', " ")
                );
            }
        }
    }
    costs_section(&mut s, outcomes);
    let _ = writeln!(s, "\n## What each scenario checked\n");
    for o in outcomes {
        match &o.result {
            Ok(r) => {
                let _ = writeln!(
                    s,
                    "- **{}** ({:.1} s): {}.{}{}",
                    o.name,
                    r.elapsed.as_secs_f64(),
                    r.checked,
                    r.samples
                        .as_ref()
                        .map(|f| format!(" Raw samples: [`docs/bench/{f}`](bench/{f})."))
                        .unwrap_or_default(),
                    r.notes.iter().map(|n| format!(" {n}")).collect::<String>()
                );
            }
            Err(e) => {
                let _ = writeln!(s, "- **{}**: FAILED: {e}", o.name);
            }
        }
    }
    if let Some(p) = plot {
        let _ = writeln!(
            s,
            "\n## Latency and RSS against load\n\n![latency and RSS against load](bench/{p})\n"
        );
    }
    let _ = writeln!(s, "\n## Running one scenario\n");
    let _ = writeln!(
        s,
        "`cargo run --release -p gantry-bench -- <scenario> [--quick]` runs one scenario (and the \
         reference it is a ratio of) and prints its figures; `all` runs them all and rewrites this \
         file. `--scale F` multiplies the full counts.\n"
    );
    let _ = writeln!(s, "| scenario | command |\n| --- | --- |");
    for name in crate::SCENARIOS {
        let _ = writeln!(
            s,
            "| {name} | `cargo run --release -p gantry-bench -- {name}` |"
        );
    }
    if !analysis.trim().is_empty() {
        let _ = writeln!(s, "\n{}", analysis.trim_end());
    }
    s
}

/// Write `docs/BENCHMARKS.md` and the plot under `opts.root`.
pub fn write(outcomes: &[Outcome], opts: &Opts) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .flat_map(|r| r.series.clone())
        .collect();
    let plot_name = "latency-rss.svg";
    let plot = if series.is_empty() {
        None
    } else {
        crate::plot::draw(&opts.samples_dir().join(plot_name), &series)?;
        Some(plot_name)
    };
    // The analysis of missed targets is kept by hand in docs/bench/analysis.md and appended.
    let analysis =
        std::fs::read_to_string(opts.samples_dir().join("analysis.md")).unwrap_or_default();
    let doc = markdown(outcomes, opts, plot, &analysis);
    std::fs::write(opts.root.join("docs").join("BENCHMARKS.md"), doc)?;
    std::fs::write(
        opts.samples_dir().join("figures.csv"),
        figures_csv(outcomes),
    )?;
    std::fs::write(opts.samples_dir().join("costs.csv"), costs_csv(outcomes))?;
    Ok(())
}
