//! A step's working directory: created with the script in it, private to the step's user
//! from the start (see [`crate::workdir`]), and removed after the step. The helpers are not
//! in it: they are the agent's, written once (see [`crate::helpers`]).

use super::StepContext;
use gantry_shared::wire::Syntax;
use std::path::{Path, PathBuf};

/// Create the step's directory and its script `.gantry/script.{sh,py}` in it, private to
/// the step's user from the start (blocking); the script's path.
pub(super) fn write_step_files(
    work_dir: &Path,
    owner: Option<(u32, u32)>,
    syntax: Syntax,
    script: &[u8],
) -> std::io::Result<PathBuf> {
    let mut dir = crate::workdir::StepDir::create(work_dir, owner)?;
    dir.mkdir(".gantry")?;
    let script = dir.write(
        match syntax {
            Syntax::Python3 => ".gantry/script.py",
            _ => ".gantry/script.sh",
        },
        script,
    )?;
    dir.hand_over()?;
    Ok(script)
}

/// After the step: kill what its own uid still runs, remove its directory (or, when kept,
/// take it back from a uid that will serve another step), then free the uid.
pub(super) async fn end_work_dir(
    ctx: &StepContext,
    work_dir: &Path,
    step_user: Result<crate::step_users::StepUser, String>,
) -> Result<(), String> {
    let (dir, keep) = (work_dir.to_path_buf(), ctx.keep_work_dir);
    tokio::task::spawn_blocking(move || {
        let leased = step_user.as_ref().is_ok_and(|u| u.is_leased());
        if let Ok(u) = &step_user {
            u.stop_leftovers();
        }
        let r = if !keep {
            crate::workdir::remove(&dir)
                .map_err(|e| format!("cannot remove the working directory {}: {e}", dir.display()))
        } else if leased && dir.exists() {
            crate::workdir::reclaim(&dir)
                .map_err(|e| format!("cannot take back the kept directory {}: {e}", dir.display()))
        } else {
            Ok(())
        };
        drop(step_user);
        r
    })
    .await
    .map_err(|e| e.to_string())?
}
