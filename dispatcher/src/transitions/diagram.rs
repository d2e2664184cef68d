//! The state diagrams of ARCHITECTURE.md, written from the transition tables: each machine's
//! states with where each may go. A unit test fails if ARCHITECTURE.md's copy differs.

use gantry_shared::states::{
    ArtifactState, AttemptState, State, StepState, TaskState, WorkerHealth,
};
use std::fmt::Write;

fn machine<S: State>(out: &mut String, title: &str) {
    let _ = writeln!(out, "{title} (created as {}):", names(S::initial()));
    for &from in S::ALL {
        let to: Vec<S> = S::ALL
            .iter()
            .copied()
            .filter(|&to| to != from && S::sources(to).contains(&from))
            .collect();
        let to = if to.is_empty() {
            "(final)".to_owned()
        } else {
            names(&to)
        };
        let _ = writeln!(out, "  {:<12} → {to}", from.as_str());
    }
}

fn names<S: State>(states: &[S]) -> String {
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every machine, as ARCHITECTURE.md shows it (between its `states:begin` and `states:end`
/// markers).
pub fn diagram() -> String {
    let mut out = String::new();
    machine::<TaskState>(&mut out, "Task");
    machine::<StepState>(&mut out, "Step run");
    machine::<AttemptState>(&mut out, "Attempt");
    machine::<ArtifactState>(&mut out, "Artifact");
    machine::<WorkerHealth>(&mut out, "Worker health");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn architecture_md_shows_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md");
        let text = std::fs::read_to_string(path).unwrap();
        let begin = "<!-- states:begin -->\n```text\n";
        let end = "```\n<!-- states:end -->";
        let (Some(a), Some(b)) = (text.find(begin), text.find(end)) else {
            panic!("ARCHITECTURE.md has no states:begin/states:end block");
        };
        let shown = &text[a + begin.len()..b];
        let generated = super::diagram();
        assert!(
            shown == generated,
            "ARCHITECTURE.md's state diagram differs from the transition tables; it should read:\n{generated}"
        );
    }
}
