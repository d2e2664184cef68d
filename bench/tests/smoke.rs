//! The harness's smoke mode: every scenario at small counts, against the local services,
//! completes with nothing lost. No timing is asserted.

use gantry_bench::{Opts, SCENARIOS, run};

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
    }
    let doc = std::fs::read_to_string(root.path().join("docs/BENCHMARKS.md")).unwrap();
    for name in SCENARIOS {
        assert!(
            doc.contains(&format!("-p gantry-bench -- {name}`")),
            "{name} missing from the doc"
        );
    }
    assert!(!doc.contains("FAILED"));
    assert!(root.path().join("docs/bench/latency-rss.svg").exists());
}
