//! `agent.step_user` and `agent.step_uid_range`: steps run as users of their own, so a step
//! cannot read another running step's script, directory or `/proc/<pid>/environ`, nor the
//! agent's identity file or its process's environment. The agent (root in these tests)
//! refuses both settings when it is not root, a bad range, and a range narrower than its
//! concurrency.

use gantry_tests::{AgentOpts, Stack, bin};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn opts(env: &[(&str, &str)]) -> AgentOpts {
    AgentOpts {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..AgentOpts::default()
    }
}

/// The probe a second step runs: try to read each path, print `<label>: denied` or
/// `<label>: READ <bytes>`; and count the `/proc/*/environ` files holding `Gantry_Task_Id`
/// of the other task that it could read.
const PROBE: &str = r###"
try() {
  if out=$(cat "$2" 2>/dev/null | base64 -w0) && [ -n "$out" ]; then echo "$1: READ $out"; else echo "$1: denied"; fi
}
try script "#{Dir}/.gantry/script.sh"
try file "#{Dir}/note.txt"
if ls "#{Dir}" >/dev/null 2>&1; then echo "listing: READ"; else echo "listing: denied"; fi
try environ "/proc/#{Pid}/environ"
n=0
for f in /proc/[0-9]*/environ; do
  if tr '\0' '\n' < "$f" 2>/dev/null | grep -q "^GANTRY_TASK_ID=#{OtherTask}$"; then n=$((n+1)); fi
done
echo "environs: $n"
"###;

#[tokio::test]
async fn concurrent_steps_with_uids_of_their_own_cannot_read_each_other() {
    // Arrange: one agent, a uid of its own for each running step.
    let mut stack = Stack::start().await.unwrap();
    stack.open_dir_for_step_users();
    stack
        .add_agent(
            "uids",
            opts(&[("GANTRY__AGENT__STEP_UID_RANGE", "61000-61009")]),
        )
        .await
        .unwrap();
    let secret = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let first = stack
        .submit(&format!(
            r##"
name = "holder"
[variables]
Secret = {{ value = "{secret}", sensitive = true }}
[[steps]]
name = "hold"
script = """
echo "$Secret" > note.txt
echo "HOLDER dir=$PWD pid=$$ uid=$(id -u)"
sleep 30
"""
"##
        ))
        .await
        .unwrap();
    let holder = stack.wait_task_line(first, "HOLDER ").await.unwrap();
    let field = |k: &str| {
        holder
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    let (dir, pid, holder_uid) = (field("dir="), field("pid="), field("uid="));

    // Act: a second task's step on the same agent, at the same time, tries to read it all.
    let second = stack
        .submit(&format!(
            r##"
name = "prober"
[variables]
Dir = "{dir}"
Pid = "{pid}"
OtherTask = "{first}"
[[steps]]
name = "probe"
script = '''
echo "PROBER uid=$(id -u)"
{PROBE}
'''
"##
        ))
        .await
        .unwrap();
    let done = stack
        .wait_task(second, Duration::from_secs(60))
        .await
        .unwrap();
    let still_running = stack.task(first).await.unwrap();
    let log = stack.task_log_text(second).await.unwrap();

    // Assert: it ran while the holder ran, as another uid from the range, and read nothing.
    assert_eq!(done.summary.state, "Success", "{log}");
    assert_eq!(still_running.steps[0].state, "Running", "{still_running:?}");
    let prober_uid: u32 = stack
        .wait_task_line(second, "PROBER uid=")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let holder_uid: u32 = holder_uid.parse().unwrap();
    assert!((61000..=61009).contains(&holder_uid), "{holder_uid}");
    assert!((61000..=61009).contains(&prober_uid), "{prober_uid}");
    assert_ne!(holder_uid, prober_uid);
    for label in ["script", "file", "listing", "environ"] {
        assert!(log.contains(&format!("{label}: denied")), "{label}:\n{log}");
    }
    assert!(log.contains("environs: 0"), "{log}");
    assert!(!log.contains("READ"), "{log}");
    assert!(!log.contains(&secret), "{log}");
}

/// A step on an agent with `agent.step_user` or `agent.step_uid_range` tries the agent's
/// identity file and the agent process's environment; neither is readable.
async fn identity_is_out_of_reach(env: (&str, &str)) {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.open_dir_for_step_users();
    let idx = stack.add_agent("ident", opts(&[env])).await.unwrap();
    let home = stack.agents[idx].home.clone();
    // Only the file's own mode may protect it: the home is open to all here.
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let identity = home.join("identity.json");
    let token = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&identity).unwrap())
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mode = std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777;
    let agent_pid = stack.agent(idx).pid().unwrap();

    // Act
    let task = stack
        .submit(&format!(
            r##"
name = "ident"
[[steps]]
name = "steal"
script = '''
echo "uid=$(id -u)"
for f in "{identity}" "/proc/{agent_pid}/environ" "/proc/{agent_pid}/cmdline"; do
  if out=$(cat "$f" 2>/dev/null | base64 -w0) && [ -n "$out" ]; then echo "$f: READ $out"; else echo "$f: denied"; fi
done
'''
"##,
            identity = identity.display()
        ))
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let log = stack.task_log_text(task).await.unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{log}");
    assert_eq!(mode, 0o600);
    assert!(!log.contains("uid=0"), "{log}");
    assert!(
        log.contains(&format!("{}: denied", identity.display())),
        "{log}"
    );
    assert!(
        log.contains(&format!("/proc/{agent_pid}/environ: denied")),
        "{log}"
    );
    // The agent's command line is public and holds no credential.
    assert!(
        log.contains(&format!("/proc/{agent_pid}/cmdline: READ")),
        "{log}"
    );
    assert!(!log.contains(&token), "{log}");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &token);
    assert!(!log.contains(&b64[..b64.len() - 4]), "{log}");
}

#[tokio::test]
async fn a_step_user_cannot_read_the_agents_identity() {
    identity_is_out_of_reach(("GANTRY__AGENT__STEP_USER", "nobody")).await;
}

#[tokio::test]
async fn a_step_with_a_uid_from_the_range_cannot_read_the_agents_identity() {
    identity_is_out_of_reach(("GANTRY__AGENT__STEP_UID_RANGE", "61100-61109")).await;
}

#[tokio::test]
async fn bad_step_user_settings_stop_the_agent_with_exit_64() {
    // Arrange: a registered agent, started by hand with each bad setting.
    let mut stack = Stack::start().await.unwrap();
    stack.open_dir_for_step_users();
    let idx = stack.add_agent("bad", AgentOpts::default()).await.unwrap();
    stack.kill_agent(idx).await;
    let home = stack.agents[idx].home.clone();
    let base = stack.agents[idx].env.clone();
    let run = |extra: Vec<(&str, &str)>, as_user: Option<u32>| {
        let mut cmd = std::process::Command::new(bin("gantry-agent"));
        cmd.args(["--home", home.to_str().unwrap(), "run"])
            .current_dir(stack.dir.path())
            .envs(base.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra);
        if let Some(uid) = as_user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(uid);
        }
        cmd.output().unwrap()
    };

    // Act + Assert
    for (extra, expected) in [
        (
            vec![("GANTRY__AGENT__STEP_UID_RANGE", "5-4")],
            "agent.step_uid_range",
        ),
        (vec![("GANTRY__AGENT__STEP_UID_RANGE", "0-10")], "uid 0"),
        (
            // A range no other test uses: the agent kills what runs under it at start.
            vec![("GANTRY__AGENT__STEP_UID_RANGE", "61400-61401")],
            "fewer than this worker's max_concurrent_steps (4)",
        ),
        (
            vec![
                ("GANTRY__AGENT__STEP_UID_RANGE", "61400-61409"),
                ("GANTRY__AGENT__STEP_USER", "nobody"),
            ],
            "not both",
        ),
        (
            vec![("GANTRY__AGENT__STEP_USER", "no-such-user-here")],
            "agent.step_user",
        ),
        (vec![("GANTRY__AGENT__STEP_USER", "root")], "is root"),
    ] {
        let out = run(extra.clone(), None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {err}");
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    // Not root: refused before anything else (the identity is unreadable to nobody anyway,
    // so the check must come first).
    let out = run(vec![("GANTRY__AGENT__STEP_USER", "nobody")], Some(65534));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("needs the agent to run as root"), "{err}");
}

#[tokio::test]
async fn with_a_uid_range_the_health_check_runs_as_a_uid_of_its_own() {
    // Arrange: an agent with a uid range, and a health check that says who it runs as and
    // tries the agent's identity file.
    let mut stack = Stack::start().await.unwrap();
    stack.open_dir_for_step_users();
    let idx = stack
        .add_agent(
            "health-uid",
            opts(&[("GANTRY__AGENT__STEP_UID_RANGE", "61500-61509")]),
        )
        .await
        .unwrap();
    let home = stack.agents[idx].home.clone();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let identity = home.join("identity.json");
    let check = format!(
        "if cat '{}' >/dev/null 2>&1; then r=READ; else r=denied; fi; echo_warning \"uid=$(id -u) gid=$(id -g) pwd=$PWD identity=$r\"",
        identity.display()
    );

    // Act
    let (status, body) = stack
        .request(
            reqwest::Method::PUT,
            "/api/settings",
            Some(gantry_tests::API_KEY),
            Some(serde_json::json!({ "machine_policy": { "health_check_script": check } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let reason =
        gantry_tests::eventually(Duration::from_secs(30), "the health check ran", || async {
            let all: Vec<gantry_tests::gantry_shared::api::Worker> =
                stack.get("/api/workers").await.ok()?;
            all.into_iter()
                .filter_map(|w| w.health_reason)
                .find(|r| r.contains("uid="))
        })
        .await
        .unwrap();

    // Assert: a uid of the range (not root, not the agent's), its own gid, in `/`.
    let field = |k: &str| {
        reason
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {reason}"))
            .to_owned()
    };
    let uid: u32 = field("uid=").parse().unwrap();
    assert!((61500..=61509).contains(&uid), "{reason}");
    assert_eq!(field("gid="), uid.to_string(), "{reason}");
    assert_eq!(field("pwd="), "/", "{reason}");
    assert_eq!(field("identity="), "denied", "{reason}");
}
