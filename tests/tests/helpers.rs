//! The helpers (`set_gantryvariable`, `new_gantryartifact`, `update_progress`, `gantry_mask`,
//! `fail_step`) work alike in bash, sh and python3 steps, and from a program the script
//! starts (they are executables on the step's `PATH`): plain, sensitive and 200 KiB outputs,
//! masks, progress, artifacts, and `fail_step` ending the script with exit code 1. The first
//! test runs on a registered agent, the second on the dispatcher's built-in worker.

use gantry_shared::api::{Artifact, Task};
use gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack};
use std::time::Duration;

const SYNTAXES: [&str; 3] = ["bash", "sh", "python3"];

/// A step that calls every helper but `fail_step`, in `syntax`; `tag` tells them apart.
fn every_helper(syntax: &str, tag: &str) -> String {
    let script = if syntax == "python3" {
        format!(
            r#"
import os, subprocess
set_gantryvariable("Plain", "plain {tag}")
set_gantryvariable("Secret", "secret-{tag}-7f3a", sensitive=True)
set_gantryvariable("Big", "x" * 200000)
gantry_mask("maskme-{tag}-91c2")
print("shown maskme-{tag}-91c2")
update_progress(40, "forty {tag}")
os.makedirs("sub")
with open("sub/a.txt", "w") as f:
    f.write("artifact {tag}")
new_gantryartifact("sub/a.txt", "art-{tag}.txt")
subprocess.run(["set_gantryvariable", "FromChild", "child {tag}"], check=True)
print("end {tag}")
"#
        )
    } else {
        format!(
            r#"
set_gantryvariable Plain "plain {tag}"
set_gantryvariable Secret "secret-{tag}-7f3a" sensitive
big=$(head -c 200000 /dev/zero | tr '\0' x)
set_gantryvariable Big "$big"
gantry_mask "maskme-{tag}-91c2"
echo "shown maskme-{tag}-91c2"
update_progress 40 "forty {tag}"
mkdir sub && cd sub && printf 'artifact {tag}' > a.txt
new_gantryartifact a.txt "art-{tag}.txt"
cd ..
python3 -c 'import subprocess; subprocess.run(["set_gantryvariable", "FromChild", "child {tag}"], check=True)'
echo "end {tag}"
"#
        )
    };
    format!(
        "name = \"helpers-{tag}\"\n[[steps]]\nname = \"s\"\nsyntax = \"{syntax}\"\nscript = '''{script}'''\n"
    )
}

fn failing(syntax: &str, tag: &str) -> String {
    let script = if syntax == "python3" {
        format!("print(\"before {tag}\")\nfail_step(\"broke {tag}\")\nprint(\"after {tag}\")\n")
    } else {
        format!("echo \"before {tag}\"\nfail_step \"broke {tag}\"\necho \"after {tag}\"\n")
    };
    format!(
        "name = \"fail-{tag}\"\n[[steps]]\nname = \"s\"\nsyntax = \"{syntax}\"\nscript = '''\n{script}'''\n"
    )
}

async fn texts(stack: &Stack, id: TaskId) -> Vec<String> {
    stack.log_texts(id).await.unwrap()
}

async fn wait(stack: &Stack, id: TaskId) -> Task {
    stack.wait_task(id, Duration::from_secs(90)).await.unwrap()
}

#[tokio::test]
async fn every_helper_works_in_bash_sh_and_python3_and_from_their_children() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("helpers", AgentOpts::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for syntax in SYNTAXES {
        let tag = syntax.replace('3', "");
        let id = stack.submit(&every_helper(syntax, &tag)).await.unwrap();
        tasks.push((tag, id));
    }

    for (tag, id) in tasks {
        // Act
        let done = wait(&stack, id).await;
        let log = texts(&stack, id).await;

        // Assert
        assert_eq!(done.summary.state, "Success", "{tag}: {done:#?}\n{log:#?}");
        let out = &done.steps[0].outputs;
        assert_eq!(out["Plain"], format!("plain {tag}"), "{tag}");
        assert_eq!(out["Secret"], "********", "{tag}");
        assert_eq!(out["Big"], "x".repeat(200_000), "{tag}");
        assert_eq!(out["FromChild"], format!("child {tag}"), "{tag}");
        let has = |line: &str| log.iter().any(|l| l == line);
        assert!(
            has("Output variable Secret set (sensitive)"),
            "{tag}: {log:#?}"
        );
        assert!(has("shown ********"), "{tag}: {log:#?}");
        assert!(
            has(&format!("Progress 40%: forty {tag}")),
            "{tag}: {log:#?}"
        );
        assert!(has(&format!("end {tag}")), "{tag}: {log:#?}");
        let all = log.join("\n");
        for secret in [format!("secret-{tag}-7f3a"), format!("maskme-{tag}-91c2")] {
            assert!(!all.contains(&secret), "{tag}: {secret} in the log");
        }
        let artifacts: Vec<Artifact> = stack
            .get(&format!("/api/tasks/{id}/artifacts"))
            .await
            .unwrap();
        assert_eq!(artifacts.len(), 1, "{tag}: {artifacts:#?}");
        assert_eq!(artifacts[0].name, format!("art-{tag}.txt"));
        assert_eq!(artifacts[0].state, "Stored");
        assert_eq!(artifacts[0].size, format!("artifact {tag}").len() as u64);
    }
}

#[tokio::test]
async fn fail_step_fails_the_step_with_its_message_and_ends_the_script() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let mut tasks = Vec::new();
    for syntax in SYNTAXES {
        let tag = syntax.replace('3', "");
        tasks.push((
            tag.clone(),
            stack.submit(&failing(syntax, &tag)).await.unwrap(),
        ));
    }

    for (tag, id) in tasks {
        // Act
        let done = wait(&stack, id).await;
        let log = texts(&stack, id).await;

        // Assert
        assert_eq!(done.summary.state, "Failed", "{tag}: {done:#?}");
        let attempt = &done.steps[0].attempts[0];
        assert_eq!(attempt.exit_code, Some(1), "{tag}: {done:#?}");
        assert_eq!(
            attempt.error.as_deref(),
            Some(&*format!("broke {tag}")),
            "{tag}"
        );
        assert!(log.contains(&format!("before {tag}")), "{tag}: {log:#?}");
        assert!(!log.contains(&format!("after {tag}")), "{tag}: {log:#?}");
    }
}
