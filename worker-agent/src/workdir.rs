//! # Steps' working directories
//!
//! Each step attempt gets a fresh directory `<work root>/<step run id>-<attempt>`, created
//! mode 0700 by the agent and filled with the agent's own files (`.gantry/`: the rendered
//! script, which holds the step's secrets; the helpers are the agent's, in
//! `<work root>/.gantry-helpers`, see [`crate::helpers`]), each created mode 0600 (0700
//! for directories) from the first byte and, when the step runs as another user, given to
//! that user file by file as it is created. The directory itself is handed over last: until
//! then it belongs to the agent and nobody else can enter it, so there is no `chown -R` and
//! no moment at which a file can be swapped in. Nothing in it is ever readable by others.
//!
//! The directory goes when the step ends (unless `agent.keep_work_dirs`), and the agent
//! removes every leftover step directory under its work root when it starts (after a crash
//! or a SIGKILL): only entries named like a step's directory, never following a link.
//!
//! The work root is mode 0700, or 0711 when steps run as other users (they must pass
//! through it to their own directory but may not list it). Every directory above it must
//! then let others through (`o+x`); the agent makes its own home so when the work root is
//! inside it, and refuses to start if another one does not.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The name of a step attempt's directory under the work root.
pub fn step_dir_name(step_run_id: impl std::fmt::Display, attempt: u32) -> String {
    format!("{step_run_id}-{attempt}")
}

/// Whether `name` is one of ours: `<uuid>-<attempt>`.
pub fn is_step_dir_name(name: &str) -> bool {
    let Some((id, attempt)) = name.rsplit_once('-') else {
        return false;
    };
    !attempt.is_empty()
        && attempt.bytes().all(|b| b.is_ascii_digit())
        && attempt.parse::<u32>().is_ok()
        && id.len() == 36
        && uuid::Uuid::parse_str(id).is_ok()
}

/// Create the work root (0700, or 0711 when `shared` with step users) and check that step
/// users can reach it. `home` is the agent's own directory, which it may open to them.
pub fn prepare_root(root: &Path, home: Option<&Path>, shared: bool) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| format!("cannot create the work directory {}: {e}", root.display()))?;
    let mode = if shared { 0o711 } else { 0o700 };
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", root.display()))?;
    if !shared {
        return Ok(());
    }
    let real = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let home = home.and_then(|h| std::fs::canonicalize(h).ok());
    for dir in real.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let m = meta.permissions().mode();
        if m & 0o001 != 0 {
            continue;
        }
        if home.as_deref() == Some(dir) {
            // The agent's own home: others may pass through it, not list it; what is in it
            // (identity.json, 0600) stays the agent's.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode((m & 0o7777) | 0o011))
                .map_err(|e| format!("cannot open {} to the step users: {e}", dir.display()))?;
            continue;
        }
        return Err(format!(
            "the step users cannot reach the work directory {}: {} is mode {:o} and does not let others through; allow it (chmod o+x) or set agent.work_dir elsewhere",
            root.display(),
            dir.display(),
            m & 0o7777
        ));
    }
    Ok(())
}

/// Remove every step directory left under the work root (blocking). Returns how many went,
/// and the problems met.
pub fn sweep(root: &Path) -> (usize, Vec<String>) {
    let mut removed = 0usize;
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return (0, problems);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_step_dir_name(name) {
            continue;
        }
        let path = entry.path();
        // `symlink_metadata`: a link named like a step directory is removed itself, never
        // followed; `remove_dir_all` does not follow links below either.
        let r = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => removed = removed.saturating_add(1),
            Err(e) => problems.push(format!("cannot remove {}: {e}", path.display())),
        }
    }
    (removed, problems)
}

/// A step's fresh working directory, being filled by the agent.
pub struct StepDir {
    pub path: PathBuf,
    /// The step's user (uid, gid), when it is not the agent's.
    owner: Option<(u32, u32)>,
    /// Directories created, in order (the top one first): handed over last, deepest first.
    dirs: Vec<PathBuf>,
}

impl StepDir {
    /// Create `path` afresh (whatever was there is removed first), mode 0700, the agent's.
    pub fn create(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)?,
            Ok(_) => std::fs::remove_file(path)?,
            Err(_) => {}
        }
        std::fs::DirBuilder::new().mode(0o700).create(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            owner,
            dirs: vec![path.to_path_buf()],
        })
    }

    /// `rel` must stay inside: no `..`, not absolute.
    fn inside(&self, rel: &str) -> std::io::Result<PathBuf> {
        let p = Path::new(rel);
        if p.components().all(|c| matches!(c, Component::Normal(_))) {
            Ok(self.path.join(p))
        } else {
            Err(std::io::Error::other(format!(
                "{rel} is not a plain relative path"
            )))
        }
    }

    /// A new directory inside, mode 0700.
    pub fn mkdir(&mut self, rel: &str) -> std::io::Result<PathBuf> {
        let p = self.inside(rel)?;
        std::fs::DirBuilder::new().mode(0o700).create(&p)?;
        self.dirs.push(p.clone());
        Ok(p)
    }

    /// A new file inside, mode 0600, given to the step's user at once (through its open
    /// descriptor, not its path).
    pub fn write(&self, rel: &str, data: &[u8]) -> std::io::Result<PathBuf> {
        let p = self.inside(rel)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(data)?;
        f.flush()?;
        Ok(p)
    }

    /// Give the directories to the step's user, deepest first, the top one last. Nobody but
    /// the agent could enter the top one until now, so none of them can have been swapped.
    pub fn hand_over(self) -> std::io::Result<PathBuf> {
        if let Some((uid, gid)) = self.owner {
            for d in self.dirs.iter().rev() {
                std::os::unix::fs::lchown(d, Some(uid), Some(gid))?;
            }
        }
        Ok(self.path)
    }
}

/// Remove a step's directory (blocking). Never follows links.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Take a kept directory back from a uid that will go to another step: the top directory
/// becomes the agent's again (mode 0700), so that step cannot enter it.
pub fn reclaim(path: &Path) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    std::os::unix::fs::lchown(path, Some(me), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn step_dir_names() {
        let id = uuid::Uuid::new_v4();
        assert!(is_step_dir_name(&step_dir_name(id, 3)));
        for bad in [
            "work".to_string(),
            format!("{id}"),
            format!("{id}-"),
            format!("{id}-x"),
            format!("{id}-99999999999"),
            format!("x{id}-1"),
            "..-1".into(),
        ] {
            assert!(!is_step_dir_name(&bad), "{bad}");
        }
    }

    #[test]
    fn files_are_private_from_the_start_and_the_sweep_takes_only_ours() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().join("work");
        prepare_root(&r, None, false).unwrap();
        assert_eq!(std::fs::metadata(&r).unwrap().mode() & 0o777, 0o700);
        let name = step_dir_name(uuid::Uuid::new_v4(), 1);
        let mut d = StepDir::create(&r.join(&name), None).unwrap();
        d.mkdir(".gantry").unwrap();
        let f = d.write(".gantry/script.sh", b"echo secret").unwrap();
        assert!(d.write("../escape", b"x").is_err());
        assert!(d.write(".gantry/script.sh", b"again").is_err());
        let top = d.hand_over().unwrap();
        assert_eq!(std::fs::metadata(&top).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);

        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        let link_name = step_dir_name(uuid::Uuid::new_v4(), 2);
        std::os::unix::fs::symlink(&outside, r.join(&link_name)).unwrap();
        std::fs::create_dir(r.join("not-a-step")).unwrap();

        let (removed, problems) = sweep(&r);
        assert_eq!((removed, problems.len()), (2, 0), "{problems:?}");
        assert!(!top.exists() && !r.join(&link_name).exists());
        assert!(outside.join("keep").exists() && r.join("not-a-step").exists());
    }
}
