//! The harness's smoke mode: every scenario at small counts, against the local services,
//! completes with nothing lost, and reports what its work cost. No timing is asserted.

use gantry_bench::costs::CPU_GROUPS;
use gantry_bench::{Opts, SCENARIOS, run};

/// The scenarios that measure what a unit of work costs.
const COSTED: &[&str] = &["throughput", "dispatch", "sequential", "lines", "api"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_quick_mode_completes_every_scenario_with_nothing_lost() {
    // Arrange: outputs go to a scratch root, never over the committed docs.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("docs")).unwrap();
    let opts = Opts::new(true, 1.0, root.path().to_path_buf());

    // Act
    let outcomes = run(SCENARIOS, &opts).await;
    gantry_bench::report::write(&outcomes, &opts).unwrap();

    // Assert: every scenario ran, none failed (a scenario fails when anything was lost).
    let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, SCENARIOS);
    let mut busy = [("dispatcher", 0.0), ("agents", 0.0), ("machine busy", 0.0)];
    for o in &outcomes {
        let r = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("scenario {} failed: {e}", o.name));
        assert!(!r.figures.is_empty(), "{} measured nothing", o.name);
        assert!(
            r.figures.iter().all(|f| f.value.is_finite()),
            "{}: a figure is not a number: {:?}",
            o.name,
            r.figures
        );
        // The counters are there and sane: every costed scenario committed something in its
        // own database, and its CPU figures are numbers, none negative where they only grow.
        assert_eq!(
            !r.costs.is_empty(),
            COSTED.contains(&o.name.as_str()),
            "{}: costs {:?}",
            o.name,
            r.costs
        );
        for c in &r.costs {
            let commits = c.commits_per_unit();
            assert!(commits.is_finite() && commits > 0.0, "{}: {c:?}", o.name);
            match c.statements_per_unit() {
                Some(s) => assert!(s.is_finite() && s > 0.0, "{}: {c:?}", o.name),
                None => assert!(c.statements_missing.is_some(), "{}: {c:?}", o.name),
            }
            for g in CPU_GROUPS {
                let ms = c.cpu_ms_per_unit(g).unwrap();
                assert!(ms.is_finite(), "{}: CPU of {g}: {c:?}", o.name);
            }
            for (g, total) in busy.iter_mut() {
                *total += c.cpu_ms_per_unit(g).unwrap() * c.units as f64;
            }
        }
    }
    // CPU is read in clock ticks (10 ms): one quick window may see none of a process's,
    // all of them together must.
    for (g, total) in busy {
        assert!(total > 0.0, "no CPU counted for {g} in any scenario");
    }
    let throughput = outcomes[SCENARIOS.iter().position(|n| *n == "throughput").unwrap()]
        .result
        .as_ref()
        .unwrap();
    assert!(
        throughput
            .figures
            .iter()
            .any(|f| f.name.starts_with("commits per one-step task") && f.met.is_some()),
        "{:?}",
        throughput.figures
    );
    // The floor ran its three parts: a rate, a gap and the submissions, each measured.
    let floor = outcomes[SCENARIOS.iter().position(|n| *n == "floor").unwrap()]
        .result
        .as_ref()
        .unwrap();
    for part in ["one-step rate", "gap from a step's exit", "submission of a"] {
        assert!(
            floor
                .figures
                .iter()
                .any(|f| f.name.contains(part) && f.value > 0.0),
            "floor: no {part:?} in {:?}",
            floor.figures
        );
    }
    let doc = std::fs::read_to_string(root.path().join("docs/BENCHMARKS.md")).unwrap();
    for name in SCENARIOS {
        assert!(
            doc.contains(&format!("-p gantry-bench -- {name}`")),
            "{name} missing from the doc"
        );
    }
    assert!(!doc.contains("FAILED"));
    assert!(doc.contains("## What each unit of work cost"));
    assert!(root.path().join("docs/bench/latency-rss.svg").exists());
    let costs = std::fs::read_to_string(root.path().join("docs/bench/costs.csv")).unwrap();
    assert_eq!(costs.lines().count(), 1 + COSTED.len(), "{costs}");
    let figures = std::fs::read_to_string(root.path().join("docs/bench/figures.csv")).unwrap();
    assert!(figures.lines().count() > SCENARIOS.len(), "{figures}");
}
