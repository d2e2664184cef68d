//! The binaries the harness runs: cargo's, next to the test executable (or next to
//! `gantry-bench`), built once when missing or older than the test.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Where the binaries live: next to the test executable's `deps` folder, or next to the
/// running binary itself (`gantry-bench` uses this harness too).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    ensure_binaries();
    bin_dir().join(name)
}

fn ensure_binaries() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = bin_dir();
        let stamp = dir.join(".gantry-tests-bins");
        let exe_time = std::fs::metadata(std::env::current_exe().expect("exe"))
            .and_then(|m| m.modified())
            .ok();
        let fresh = [
            "gantry-dispatcher",
            "gantry-agent",
            "gantry",
            "gantry-guard",
        ]
        .iter()
        .all(|b| dir.join(b).exists())
            && std::fs::metadata(&stamp)
                .and_then(|m| m.modified())
                .ok()
                .zip(exe_time)
                .is_some_and(|(s, e)| s >= e);
        if fresh {
            return;
        }
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        // The whole workspace, as `cargo nextest run --workspace` and the quick start build
        // it: the same feature set, so nothing is rebuilt back and forth.
        cmd.args(["build", "--workspace", "--bins"]);
        // Into the target directory the binaries are looked for in, whatever CARGO_TARGET_DIR
        // says (a binary such as gantry-bench may run outside cargo).
        if let Some(target) = dir.parent() {
            cmd.arg("--target-dir").arg(target);
        }
        if profile == "release" {
            cmd.arg("--release");
        }
        // `cargo run` and `cargo nextest` describe the package they started in these; a build
        // script that tracks them (ring's does) would see them differ from a build in a plain
        // shell and rebuild, back and forth, on every run.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || k == "CARGO_TARGET_TMPDIR"
            {
                cmd.env_remove(k.as_ref());
            }
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        std::fs::write(&stamp, b"").expect("stamp");
    });
}
