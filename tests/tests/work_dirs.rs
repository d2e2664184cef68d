//! Steps' working directories: 0700 and the step user's, the script 0600 from the start,
//! gone after the step; the agent's helpers beside them, which step users may run but not
//! change; and after a SIGKILL of the agent mid-step no secret is left on its disk once it
//! has started again.

use gantry_tests::{AgentOpts, Stack};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every file below `dir` (not following links) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            found.extend(files_containing(&p, needle));
        } else if t.is_file()
            && let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(p);
        }
    }
    found
}

/// The modes the step saw, the step's uid and directory, for one agent.
async fn modes_seen(env: Vec<(String, String)>) -> (String, u32, PathBuf, Stack) {
    let mut stack = Stack::start().await.unwrap();
    stack.open_dir_for_step_users();
    stack
        .add_agent(
            "dirs",
            AgentOpts {
                env,
                ..AgentOpts::default()
            },
        )
        .await
        .unwrap();
    let task = stack
        .submit(
            r##"
name = "modes"
[variables]
Secret = { value = "hush-hush-value", sensitive = true }
[[steps]]
name = "look"
script = '''
echo "UID $(id -u)"
echo "DIR $PWD"
echo "MODES $(stat -c '%a:%u' . .gantry .gantry/script.sh | tr '\n' ' ')"
echo "HELPERS $(stat -c '%a:%u' "$GANTRY_HELPERS" "$(type -P set_gantryvariable)" | tr '\n' ' ')"
if [ -w "$(type -P set_gantryvariable)" ]; then echo "WRITABLE yes"; else echo "WRITABLE no"; fi
'''
[[steps]]
name = "py"
syntax = "python3"
script = '''
import os
print("PYMODES", os.getuid(), " ".join("%o:%d" % (os.stat(p).st_mode & 0o777, os.stat(p).st_uid) for p in [".gantry", ".gantry/script.py"]))
'''
"##,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let log = stack.task_log_text(task).await.unwrap();
    assert_eq!(done.summary.state, "Success", "{log}");
    let uid: u32 = stack
        .wait_task_line(task, "UID ")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let dir = PathBuf::from(stack.wait_task_line(task, "DIR ").await.unwrap());
    let modes = format!(
        "{} {} | {} {}",
        stack.wait_task_line(task, "MODES ").await.unwrap().trim(),
        stack.wait_task_line(task, "PYMODES ").await.unwrap().trim(),
        stack.wait_task_line(task, "HELPERS ").await.unwrap().trim(),
        stack
            .wait_task_line(task, "WRITABLE ")
            .await
            .unwrap()
            .trim(),
    );
    (modes, uid, dir, stack)
}

#[tokio::test]
async fn working_directories_are_private_to_the_step_user_and_gone_after_the_step() {
    for env in [
        vec![],
        vec![(
            "GANTRY__AGENT__STEP_UID_RANGE".to_owned(),
            "61200-61209".to_owned(),
        )],
    ] {
        // Arrange + Act
        let ranged = !env.is_empty();
        let (modes, uid, dir, _stack) = modes_seen(env).await;

        // Assert: the directory and the agent's files are the step's own and nobody else's.
        if ranged {
            assert!((61200..=61209).contains(&uid), "{uid}");
        } else {
            assert_eq!(uid, 0);
        }
        // The python step ran as a uid of its own too (the next one of the range).
        let (u, p) = (
            uid,
            modes
                .split_whitespace()
                .nth(3)
                .unwrap_or_default()
                .to_owned(),
        );
        // The helpers are the agent's (root here), readable and runnable, and a step user
        // cannot change them (root can write whatever the mode).
        let writable = if ranged { "no" } else { "yes" };
        assert_eq!(
            modes,
            format!("700:{u} 700:{u} 600:{u} {p} 700:{p} 600:{p} | 444:0 555:0 {writable}"),
            "ranged: {ranged}"
        );
        if !ranged {
            assert_eq!(p, "0");
        }
        assert!(!dir.exists(), "{} is still there", dir.display());
        let root = dir.parent().unwrap();
        let left: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with(gantry_agent::helpers::DIR))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let root_mode = std::fs::metadata(root).unwrap().permissions().mode() & 0o777;
        assert_eq!(root_mode, if ranged { 0o711 } else { 0o700 });
    }
}

#[tokio::test]
async fn after_a_sigkill_mid_step_no_secret_is_left_on_the_agents_disk() {
    // Arrange: a step holding a secret in its script, its environment and a file it wrote.
    let mut stack = Stack::start().await.unwrap();
    let idx = stack
        .add_agent("killed", AgentOpts::default())
        .await
        .unwrap();
    let home = stack.agents[idx].home.clone();
    let secret = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let task = stack
        .submit(&format!(
            r##"
name = "victim"
[variables]
Secret = {{ value = "{secret}", sensitive = true }}
[[steps]]
name = "hold"
script = """
echo "#{{Secret}}" > copy.txt
mkdir -p deep/er && cp copy.txt deep/er/again.txt
echo "HOLDING $PWD"
sleep 60
"""
"##
        ))
        .await
        .unwrap();
    let dir = PathBuf::from(stack.wait_task_line(task, "HOLDING ").await.unwrap());
    assert!(
        !files_containing(&home, secret.as_bytes()).is_empty(),
        "the secret should be on disk while the step runs"
    );

    // Act: SIGKILL the agent, then start it again on the same home.
    stack.kill_agent(idx).await;
    let after_kill = files_containing(&home, secret.as_bytes());
    stack.start_agent(idx).await.unwrap();

    // Assert: before the restart the step's files were still there (nothing else removed
    // them); after it, nothing under the agent's home holds the secret.
    assert!(!after_kill.is_empty(), "the kill alone removed the files");
    let left = files_containing(&home, secret.as_bytes());
    assert!(left.is_empty(), "secret left in {left:?}");
    assert!(!dir.exists(), "{} survived the restart", dir.display());
    let log = stack.all_logs();
    assert!(
        log.contains("removed step directories left by an earlier run"),
        "{log}"
    );
}
