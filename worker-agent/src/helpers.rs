//! # The helpers scripts call: small executables, written once per agent
//!
//! `set_gantryvariable`, `new_gantryartifact`, `update_progress`, `fail_step` and
//! `gantry_mask` print the service messages of [`gantry_shared::service_messages`]. They are
//! `#!/bin/sh` scripts the agent writes when it starts, in `<work root>/.gantry-helpers/bin`
//! (the directory 0755, the scripts 0555, the agent's own: step users may run them, not
//! change them), put first on every step's `PATH`. A step that calls none of them pays
//! nothing: no file is written per step, nothing is read or sourced at its start. Any
//! program of a step can run them (`make`, a Python `subprocess`, ...), as long as their
//! stdout is the step's.
//!
//! Three things an executable cannot do are left to tiny shell functions that run it:
//! `fail_step` ends the *script* (the function exits 1 after the executable), and
//! `set_gantryvariable` and `gantry_mask` hand their value over on stdin (`--stdin`), so a
//! sensitive value never appears in a command line (`/proc/<pid>/cmdline` is readable by
//! every user) and a value may be larger than one argument may be (128 KiB). Bash steps get
//! these functions through the environment (`BASH_FUNC_<name>%%`, which bash reads at start
//! without reading any file), sh steps in the `sh -c` line that sources the script, and
//! anyone may source them from `$GANTRY_HELPERS` (`helpers.sh` in the same directory).
//!
//! Python steps get the five as builtins, from `python/sitecustomize.py` in the same
//! directory (first on `PYTHONPATH`): it defines them and imports nothing; each call runs the
//! executable through `subprocess` (imported then) and writes what it printed through
//! `sys.stdout`, in order with the script's own output.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The directory under the work root (not a step directory's name, so never swept).
pub const DIR: &str = ".gantry-helpers";

/// `b64 VALUE`: base64 without line breaks (coreutils' `base64` and `tr`, as always).
const B64: &str = "b64() { printf '%s' \"$1\" | base64 | tr -d '\\n'; }\n";

/// The executables: name and body (after the `#!/bin/sh` line and `b64`).
const EXECUTABLES: &[(&str, &str)] = &[
    (
        "set_gantryvariable",
        r###"# set_gantryvariable NAME VALUE [sensitive]: set an output variable of the step.
# set_gantryvariable --stdin NAME [sensitive]: the same, the value read from stdin (so it
# is in no command line, and may be larger than an argument may be).
# A third argument "sensitive", "True" or "true" makes it a sensitive output.
if [ "${1-}" = --stdin ]; then
  shift
  value=$(base64 | tr -d '\n')
  flag=${2-}
else
  value=$(b64 "${2-}")
  flag=${3-}
fi
case $flag in
  sensitive | True | true) extra=" sensitive='$(b64 True)'" ;;
  *) extra= ;;
esac
printf "##gantry[setVariable name='%s' value='%s'%s]\n" "$(b64 "${1-}")" "$value" "$extra"
"###,
    ),
    (
        "new_gantryartifact",
        r###"# new_gantryartifact PATH [NAME]: collect PATH as an artifact named NAME (its base name
# by default) when the script ends. A relative PATH is relative to the current directory.
case ${1-} in
  /*) path=$1 ;;
  *) path=$PWD/${1-} ;;
esac
printf "##gantry[createArtifact path='%s' name='%s']\n" "$(b64 "$path")" "$(b64 "${2:-$(basename -- "${1-}")}")"
"###,
    ),
    (
        "update_progress",
        r###"# update_progress PERCENT [MESSAGE]: report the step's progress.
printf "##gantry[progress percentage='%s' message='%s']\n" "$(b64 "${1-}")" "$(b64 "${2-}")"
"###,
    ),
    (
        "fail_step",
        r###"# fail_step [MESSAGE]: fail the step with MESSAGE and exit 1. (In bash and sh steps,
# fail_step is a shell function that runs this, then ends the script with exit 1.)
printf "##gantry[fail message='%s']\n" "$(b64 "${1-}")"
exit 1
"###,
    ),
    (
        "gantry_mask",
        r###"# gantry_mask VALUE, or gantry_mask --stdin (the value read from stdin): hide VALUE in
# the step's log from now on.
if [ "${1-}" = --stdin ]; then
  value=$(base64 | tr -d '\n')
else
  value=$(b64 "${1-}")
fi
printf "##gantry[mask value='%s']\n" "$value"
"###,
    ),
];

const PYTHON: &str = r###"# Gantry's helpers for python3 steps, written by the agent: builtins that run the helper
# executables in ../bin. Nothing is imported here: subprocess only once a helper is called.
import builtins as _builtins

_BIN = __file__.rsplit("/", 2)[0] + "/bin/"


def _gantry_run(name, args, value=None):
    import subprocess
    import sys

    out = subprocess.run(
        [_BIN + name] + [str(a) for a in args],
        input=None if value is None else str(value).encode("utf-8"),
        stdout=subprocess.PIPE,
    ).stdout
    # Through sys.stdout, in order with what the script printed.
    sys.stdout.write(out.decode("ascii"))
    sys.stdout.flush()


def set_gantryvariable(name, value, sensitive=False):
    _gantry_run("set_gantryvariable", ["--stdin", name] + (["sensitive"] if sensitive else []), value)


def new_gantryartifact(path, name=None):
    _gantry_run("new_gantryartifact", [path] + ([name] if name else []))


def update_progress(percent, message=""):
    _gantry_run("update_progress", [percent, message])


def fail_step(message=""):
    import sys

    _gantry_run("fail_step", [message])
    sys.exit(1)


def gantry_mask(value):
    _gantry_run("gantry_mask", ["--stdin"], value)


for _gantry_f in (set_gantryvariable, new_gantryartifact, update_progress, fail_step, gantry_mask):
    setattr(_builtins, _gantry_f.__name__, _gantry_f)
del _gantry_f
"###;

/// The helpers of one agent, once installed.
#[derive(Debug)]
pub struct Helpers {
    /// The executables' directory, first on every step's `PATH`.
    pub bin: PathBuf,
    /// `sitecustomize.py`'s directory, first on python3 steps' `PYTHONPATH`.
    pub python: PathBuf,
    /// `helpers.sh` (the shell functions), `$GANTRY_HELPERS`.
    pub shell: PathBuf,
    /// The shell functions, as `(name, body)`.
    functions: Vec<(&'static str, String)>,
}

/// `s` as one shell word, in single quotes.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Helpers {
    fn new(dir: &Path) -> Self {
        let bin = dir.join("bin");
        let exe = |name: &str| quote(&bin.join(name).display().to_string());
        let functions = vec![
            (
                "set_gantryvariable",
                format!(
                    "printf '%s' \"${{2-}}\" | {} --stdin \"${{1-}}\" \"${{3-}}\"",
                    exe("set_gantryvariable")
                ),
            ),
            (
                "gantry_mask",
                format!("printf '%s' \"${{1-}}\" | {} --stdin", exe("gantry_mask")),
            ),
            ("fail_step", format!("{} \"$@\"; exit 1", exe("fail_step"))),
        ];
        Self {
            python: dir.join("python"),
            shell: dir.join("helpers.sh"),
            bin,
            functions,
        }
    }

    /// The shell functions as sh source, one line each.
    pub fn shell_functions(&self) -> String {
        self.functions
            .iter()
            .map(|(name, body)| format!("{name}() {{ {body}; }}\n"))
            .collect()
    }

    /// The shell functions as bash reads them from its environment at start.
    pub fn bash_environment(&self) -> Vec<(String, String)> {
        self.functions
            .iter()
            .map(|(name, body)| (format!("BASH_FUNC_{name}%%"), format!("() {{ {body}\n}}")))
            .collect()
    }

    /// The `sh -c` command that defines the shell functions, then sources the script `$1`.
    pub fn sh_command(&self) -> String {
        format!("{}. \"$1\"", self.shell_functions())
    }
}

/// Write the helpers afresh under `work_root` (blocking): whatever was at
/// `<work root>/.gantry-helpers` is removed first, without following links.
pub fn install(work_root: &Path) -> std::io::Result<Helpers> {
    let dir = work_root.join(DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dir)?,
        Ok(_) => std::fs::remove_file(&dir)?,
        Err(_) => {}
    }
    let helpers = Helpers::new(&dir);
    for d in [&dir, &helpers.bin, &helpers.python] {
        std::fs::create_dir(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    for (name, body) in EXECUTABLES {
        let text = format!("#!/bin/sh\n# Gantry's {name} (written by the agent).\n{B64}{body}");
        write_new(&helpers.bin.join(name), text.as_bytes(), 0o555)?;
    }
    let shell = format!(
        "# Gantry's shell helpers (written by the agent): the executables beside this file, in\n# bin/, are on PATH; these functions end the script (fail_step) or pass values on stdin.\n{}",
        helpers.shell_functions()
    );
    write_new(&helpers.shell, shell.as_bytes(), 0o444)?;
    write_new(
        &helpers.python.join("sitecustomize.py"),
        PYTHON.as_bytes(),
        0o444,
    )?;
    Ok(helpers)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(data)?;
    // Exactly `mode`, whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    fn run(helpers: &Helpers, argv: &[&str], stdin: &str) -> (String, Option<i32>) {
        use std::io::Write as _;
        let path = format!("{}:/usr/bin:/bin", helpers.bin.display());
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", path)
            .envs(helpers.bash_environment())
            .env("GANTRY_HELPERS", &helpers.shell)
            .current_dir("/tmp")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (String::from_utf8(out.stdout).unwrap(), out.status.code())
    }

    fn messages(out: &str) -> Vec<gantry_shared::service_messages::ServiceMessage> {
        out.lines()
            .filter_map(gantry_shared::service_messages::parse_line)
            .map(|m| m.unwrap())
            .collect()
    }

    #[test]
    fn installed_afresh_and_nobody_else_may_change_them() {
        let root = tempfile::tempdir().unwrap();
        // Left by an earlier run, and something in the way.
        std::fs::create_dir_all(root.path().join(DIR).join("bin")).unwrap();
        std::fs::write(root.path().join(DIR).join("bin/old"), b"x").unwrap();
        let h = install(root.path()).unwrap();
        assert!(!h.bin.join("old").exists());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&root.path().join(DIR)), 0o755);
        assert_eq!(mode(&h.bin), 0o755);
        for (name, _) in EXECUTABLES {
            assert_eq!(mode(&h.bin.join(name)), 0o555, "{name}");
        }
        assert_eq!(mode(&h.shell), 0o444);
        assert_eq!(mode(&h.python.join("sitecustomize.py")), 0o444);
        // Installing again (a restart) works over the read-only files.
        install(root.path()).unwrap();
    }

    #[test]
    fn the_shell_functions_end_the_script_and_pass_values_on_stdin() {
        use gantry_shared::service_messages::ServiceMessage as M;
        let root = tempfile::tempdir().unwrap();
        let h = install(root.path()).unwrap();
        // A value larger than an argument may be, with a quote and a newline at its end.
        let big = format!("{}'\n", "x".repeat(200_000));
        std::fs::write(root.path().join("big"), &big).unwrap();
        let script = format!(
            "big=$(cat '{}'; printf .); big=${{big%.}}\nset_gantryvariable Big \"$big\" sensitive\ngantry_mask \"$big\"\nfail_step 'it broke'\necho after",
            root.path().join("big").display()
        );
        let sh = format!("{}{script}", h.shell_functions());
        for argv in [
            vec!["bash", "--noprofile", "--norc", "-c", script.as_str()],
            vec!["sh", "-c", sh.as_str()],
        ] {
            let (out, code) = run(&h, &argv, "");
            assert_eq!(code, Some(1), "{argv:?}: {out}");
            assert!(
                !out.contains("after"),
                "{argv:?}: fail_step did not end the script"
            );
            assert_eq!(
                messages(&out),
                vec![
                    M::SetVariable {
                        name: "Big".into(),
                        value: big.clone(),
                        sensitive: true
                    },
                    M::Mask { value: big.clone() },
                    M::Fail {
                        message: "it broke".into()
                    },
                ],
                "{argv:?}"
            );
        }
    }

    #[test]
    fn the_executables_print_the_same_messages_as_the_old_shell_functions() {
        use gantry_shared::service_messages::ServiceMessage as M;
        let root = tempfile::tempdir().unwrap();
        let h = install(root.path()).unwrap();
        let (out, code) = run(
            &h,
            &[
                "sh",
                "-c",
                "set_gantryvariable v 'a b' && set_gantryvariable s 1 true && set_gantryvariable e '' && \
                 printf 'from stdin' | set_gantryvariable --stdin i sensitive && \
                 new_gantryartifact d/f.txt && new_gantryartifact /abs/g.bin name && \
                 update_progress 50 half && gantry_mask m && printf hidden | gantry_mask --stdin; \
                 fail_step; echo \"exit $?\"",
            ],
            "",
        );
        assert_eq!(code, Some(0), "{out}");
        let set = |name: &str, value: &str, sensitive| M::SetVariable {
            name: name.into(),
            value: value.into(),
            sensitive,
        };
        assert_eq!(
            messages(&out),
            vec![
                set("v", "a b", false),
                set("s", "1", true),
                set("e", "", false),
                set("i", "from stdin", true),
                M::CreateArtifact {
                    path: "/tmp/d/f.txt".into(),
                    name: Some("f.txt".into())
                },
                M::CreateArtifact {
                    path: "/abs/g.bin".into(),
                    name: Some("name".into())
                },
                M::Progress {
                    percentage: 50,
                    message: "half".into()
                },
                M::Mask { value: "m".into() },
                M::Mask {
                    value: "hidden".into()
                },
                M::Fail {
                    message: String::new()
                },
            ]
        );
        // The executable fail_step exits 1; only the function ends the calling script.
        assert!(out.ends_with("exit 1\n"), "{out}");
    }
}
