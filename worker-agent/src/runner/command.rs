//! What a step runs: its script rendered and written into its working directory, the
//! interpreter's command line, and an environment built from scratch.

use super::files::write_step_files;
use super::{RunAs, StepContext};
use crate::emitter::Emitter;
use gantry_shared::template;
use gantry_shared::wire::Syntax;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

/// Render the script, write the step's files and build the command that runs it, with an
/// environment built from scratch.
pub(super) async fn prepare(
    ctx: &StepContext,
    em: &mut Emitter,
    work_dir: &Path,
    user: Option<&RunAs>,
) -> Result<tokio::process::Command, String> {
    let job = &ctx.job;
    let mut vars: BTreeMap<String, String> = job.variables.clone();
    vars.extend(ctx.grant.sensitive_variables.clone());
    vars.insert("Gantry.Worker.Name".into(), ctx.worker_name.clone());
    let script = template::render(&job.script, |name| vars.get(name).cloned()).map_err(|name| {
        match template::output_reference(name) {
            Some((step, out)) => format!(
                "the script reads #{{{name}}}, but step {step} set no output variable {out:?}"
            ),
            None => format!("the script reads #{{{name}}}, which has no value"),
        }
    })?;
    // Created private and handed to the step's user (see `workdir`); the script, which
    // holds its secrets, is never readable by anyone else.
    let script_path = {
        let (dir, owner, syntax) = (
            work_dir.to_path_buf(),
            user.map(|u| (u.uid, u.gid)),
            job.syntax,
        );
        let script = script.into_bytes();
        tokio::task::spawn_blocking(move || write_step_files(&dir, owner, syntax, &script))
            .await
            .map_err(|e| format!("cannot create working directory: {e}"))?
            .map_err(|e| {
                format!(
                    "cannot create working directory {}: {e}",
                    work_dir.display()
                )
            })?
    };
    let helpers = &ctx.helpers;
    let script_arg = script_path.display().to_string();
    let sh_command = helpers.sh_command();
    let argv: Vec<&str> = match job.syntax {
        Syntax::Bash => vec!["bash", "--noprofile", "--norc", &script_arg],
        // The helper functions, then the script sourced into the same shell.
        Syntax::Sh => vec!["sh", "-c", &sh_command, "gantry-step", &script_arg],
        Syntax::Python3 => vec!["python3", "-u", &script_arg],
    };
    // Started by the agent itself, as the leader of a process group of its own that the
    // agent's supervisor knows before the script runs (see `supervisor`).
    let mut cmd = tokio::process::Command::new(argv[0]);
    cmd.args(&argv[1..]);
    if let Some(user) = user {
        // Dropping root also drops its supplementary groups (std does setgroups(0)).
        cmd.uid(user.uid).gid(user.gid);
    }
    // Built from scratch: the agent's own environment (its configuration, which may hold
    // credentials, and whatever else its operator exported) stays with the agent.
    cmd.env_clear();
    let base = gantry_shared::stepenv::base(
        std::env::vars_os(),
        user.map(|u| gantry_shared::stepenv::User {
            name: &u.name,
            home: &u.home,
        }),
    );
    // The helper executables first on PATH (the base always has one).
    let mut path = helpers.bin.as_os_str().to_owned();
    for (k, v) in &base {
        if k == "PATH" {
            path.push(":");
            path.push(v);
        }
    }
    cmd.envs(base);
    cmd.env("PATH", path);
    let mut not_exported = Vec::new();
    for (name, value) in &vars {
        match template::env_name(name) {
            Some(env) if !is_reserved_env(&env) => {
                cmd.env(env, value);
            }
            Some(_) => not_exported.push(name.as_str()),
            None => {}
        }
    }
    if !not_exported.is_empty() {
        em.gantry(&format!(
            "warning: not exported to the environment (reserved names): {}; #{{...}} substitution still works",
            not_exported.join(", ")
        ))
        .await;
    }
    if job.syntax == Syntax::Bash {
        // Bash defines the helper functions it finds in its environment, reading no file
        // and leaving the script (and its line numbers) untouched.
        cmd.envs(helpers.bash_environment());
    }
    if let Some(m) = &ctx.grant.mutex {
        cmd.env("GANTRY_MUTEX", &m.name)
            .env("GANTRY_MUTEX_TOKEN", m.token.to_string());
    }
    if job.syntax == Syntax::Python3 {
        // The helpers arrive as builtins through `sitecustomize`.
        cmd.env("PYTHONPATH", &helpers.python);
    }
    cmd.env("GANTRY_HELPERS", &helpers.shell)
        .env("GANTRY_TASK_ID", job.task_id.to_string())
        .env("GANTRY_STEP_NAME", &job.step_name)
        .env("GANTRY_STEP_ATTEMPT", job.attempt.to_string())
        .env("GANTRY_WORK_DIR", work_dir)
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd)
}

/// Environment names a process variable may not override: the shell's and the runtime's own,
/// and Gantry's.
fn is_reserved_env(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "OLDPWD",
        "TMPDIR",
        "LANG",
        "TERM",
        "IFS",
        "ENV",
        "CDPATH",
        "PS4",
        "SHELLOPTS",
        "BASHOPTS",
        "HOSTNAME",
    ];
    const PREFIXES: &[&str] = &["GANTRY_", "BASH_", "LD_", "LC_", "PYTHON"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}
