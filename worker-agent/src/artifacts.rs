//! # Which files of a step become artifacts
//!
//! After the script has ended (whatever its outcome, except a cancel), the agent collects:
//!
//! 1. the files the script named with `new_gantryartifact PATH [NAME]` (the `createArtifact`
//!    service message), in the order it named them; a relative path is relative to the
//!    step's working directory (the helper executable sends an absolute path, resolved
//!    against the directory of the program that ran it);
//! 2. the files matched by the step's `artifacts = [globs]`, evaluated in the working
//!    directory: `*` stays within one path segment, `**` crosses them, names starting with
//!    `.` need a literal `.`; a matched directory brings every regular file below it. They
//!    are named by their path relative to the working directory (`dist/app.tar.gz`).
//!
//! A file named twice is collected once (the first name wins). A glob that matches nothing,
//! a path that does not exist or is not a regular file are warnings in the step's log,
//! never failures. The agent's own files (`.gantry/`) are never collected.
//!
//! **Nothing outside the working directory is ever read.** Every file is opened beneath
//! the working directory's own descriptor with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`: a path that leads out of it (`../x`, an absolute path elsewhere)
//! and a symbolic link anywhere in a path, even one pointing inside, are refused with a
//! warning (copy the file instead of linking it). The file is opened again this way when
//! its upload starts, so swapping it for a link after it was collected uploads nothing.
//! Directories are listed the same way (through a descriptor opened beneath, never by
//! following a link), at most [`MAX_ENTRIES`] entries per step. This needs Linux 5.6 or
//! later; without `openat2` no artifact is collected, with a warning saying why.
//!
//! Uploading is the runner's: each file is read in chunks of
//! [`gantry_shared::wire::ARTIFACT_CHUNK_BYTES`], hashed as it is read (see [`Reader`]).

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Most artifacts one attempt uploads; the rest are named in a warning.
pub const MAX_ARTIFACTS: usize = 1000;
/// Most directory entries the globs look at in one working directory.
pub const MAX_ENTRIES: usize = 200_000;

/// A file to upload and the name it is listed under.
#[derive(Clone, Debug)]
pub struct Wanted {
    /// For messages: the working directory joined with `rel`.
    pub path: PathBuf,
    /// Its path inside the working directory, without `.` or `..`.
    pub rel: PathBuf,
    pub name: String,
    root: Arc<OwnedFd>,
}

/// The files to upload, and what could not be collected (for the step's log).
#[derive(Debug, Default)]
pub struct Collected {
    pub files: Vec<Wanted>,
    pub warnings: Vec<String>,
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// Open `rel` beneath `root`, never leaving it and following no link.
fn open_beneath(root: &OwnedFd, rel: &Path, directory: bool) -> Result<OwnedFd, Errno> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    openat2(root, rel, OpenHow::new().flags(flags).resolve(beneath()))
}

/// Why an open beneath the working directory failed, in words.
fn refusal(e: Errno) -> String {
    match e {
        Errno::ELOOP => "a symbolic link is in its path (links are not followed)".into(),
        Errno::EXDEV => "it leads outside the step's working directory".into(),
        Errno::ENOSYS => {
            "this kernel has no openat2 (Linux 5.6 or later is needed to collect artifacts safely)"
                .into()
        }
        other => std::io::Error::from(other).to_string(),
    }
}

/// Open a regular file beneath the root (blocking).
fn open_file(root: &OwnedFd, rel: &Path) -> Result<std::fs::File, String> {
    let fd = open_beneath(root, rel, false).map_err(refusal)?;
    let file = std::fs::File::from(fd);
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(file),
        Ok(_) => Err("not a regular file".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `raw` as a path inside the working directory (`bases`: its path as given and its
/// canonical path), without `.` and `..`; `None` if it is elsewhere.
fn relative_inside(raw: &str, bases: &[PathBuf]) -> Option<PathBuf> {
    let p = Path::new(raw);
    let rel = if p.is_absolute() {
        bases.iter().find_map(|b| p.strip_prefix(b).ok())?
    } else {
        p
    };
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn is_own(rel: &Path) -> bool {
    rel.components().next() == Some(Component::Normal(".gantry".as_ref()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Link,
    Other,
}

/// Every entry below the root (relative paths, sorted, `.gantry/` left out), listed through
/// descriptors opened beneath it. Blocking.
fn entries(root: &OwnedFd, warnings: &mut Vec<String>) -> Vec<(PathBuf, Kind)> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    let mut truncated = false;
    while let Some(dir) = todo.pop() {
        let fd = match open_beneath(root, &dir, true) {
            Ok(fd) => fd,
            Err(e) => {
                warnings.push(format!(
                    "cannot read directory {}: {}",
                    dir.display(),
                    refusal(e)
                ));
                continue;
            }
        };
        // The descriptor's own directory, whatever its path has become meanwhile.
        let listing = match std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
            Ok(rd) => rd,
            Err(e) => {
                warnings.push(format!("cannot read directory {}: {e}", dir.display()));
                continue;
            }
        };
        let mut here: Vec<(PathBuf, Kind)> = Vec::new();
        for entry in listing.flatten() {
            if out.len() + here.len() >= MAX_ENTRIES {
                truncated = true;
                break;
            }
            let name = entry.file_name();
            if dir.as_os_str().is_empty() && name == ".gantry" {
                continue;
            }
            let kind = match entry.file_type() {
                Ok(t) if t.is_symlink() => Kind::Link,
                Ok(t) if t.is_dir() => Kind::Dir,
                Ok(t) if t.is_file() => Kind::File,
                _ => Kind::Other,
            };
            here.push((dir.join(name), kind));
        }
        for (p, k) in &here {
            if *k == Kind::Dir {
                todo.push(p.clone());
            }
        }
        out.extend(here);
        if truncated {
            break;
        }
    }
    if truncated {
        warnings.push(format!(
            "the artifacts globs looked at the first {MAX_ENTRIES} entries of the working directory only"
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Find the step's artifacts (blocking: call it off the async threads).
pub fn collect(
    work_dir: &Path,
    requested: &[(String, Option<String>)],
    globs: &[String],
) -> Collected {
    let mut out = Collected::default();
    if requested.is_empty() && globs.is_empty() {
        return out;
    }
    let root = match nix::fcntl::open(
        work_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            out.warnings.push(format!(
                "no artifacts collected: cannot open the working directory {}: {}",
                work_dir.display(),
                std::io::Error::from(e)
            ));
            return out;
        }
    };
    let mut bases = vec![work_dir.to_path_buf()];
    if let Ok(real) = std::fs::canonicalize(work_dir)
        && real != work_dir
    {
        bases.push(real);
    }
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut dropped = 0usize;
    let mut add = |out: &mut Collected, rel: PathBuf, name: String| {
        if !seen.insert(rel.clone()) {
            return;
        }
        if out.files.len() >= MAX_ARTIFACTS {
            dropped += 1;
            return;
        }
        out.files.push(Wanted {
            path: work_dir.join(&rel),
            rel,
            name,
            root: root.clone(),
        });
    };

    for (raw, name) in requested {
        let Some(rel) = relative_inside(raw, &bases) else {
            out.warnings.push(format!(
                "artifact {raw} not collected: it is outside the step's working directory"
            ));
            continue;
        };
        if is_own(&rel) {
            out.warnings.push(format!(
                "artifact {raw} not collected: .gantry/ holds the agent's own files"
            ));
            continue;
        }
        if let Err(why) = open_file(&root, &rel) {
            out.warnings
                .push(format!("artifact {raw} not collected: {why}"));
            continue;
        }
        let name = name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| rel.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| raw.clone());
        add(&mut out, rel, name);
    }

    if globs.is_empty() {
        return finish(out, dropped);
    }
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let all = entries(&root, &mut out.warnings);
    for g in globs {
        let pattern = match glob::Pattern::new(g) {
            Ok(p) => p,
            Err(e) => {
                out.warnings
                    .push(format!("artifacts glob {g:?} is not valid: {e}"));
                continue;
            }
        };
        let mut matched = 0usize;
        let mut links = 0usize;
        let mut i = 0;
        while i < all.len() {
            let (rel, kind) = &all[i];
            if !pattern.matches_path_with(rel, options) {
                i += 1;
                continue;
            }
            // A matched directory brings every regular file below it (they follow it in
            // sorted order, and are not looked at again); links below are not followed.
            let below: &[(PathBuf, Kind)] = if *kind == Kind::Dir {
                let n = all[i + 1..]
                    .iter()
                    .take_while(|(p, _)| p.starts_with(rel))
                    .count();
                let span = &all[i + 1..i + 1 + n];
                i += 1 + n;
                span
            } else {
                i += 1;
                &all[i - 1..i]
            };
            for (file, k) in below {
                match k {
                    Kind::File => {}
                    Kind::Link => {
                        links += 1;
                        continue;
                    }
                    _ => continue,
                }
                if open_file(&root, file).is_err() {
                    continue;
                }
                matched += 1;
                add(&mut out, file.clone(), file.to_string_lossy().into_owned());
            }
        }
        if links > 0 {
            out.warnings.push(format!(
                "artifacts glob {g:?}: {links} symbolic link(s) not collected (links are not followed)"
            ));
        }
        if matched == 0 {
            out.warnings
                .push(format!("artifacts glob {g:?} matched no file"));
        }
    }
    finish(out, dropped)
}

fn finish(mut out: Collected, dropped: usize) -> Collected {
    if dropped > 0 {
        out.warnings.push(format!(
            "{dropped} more artifacts not collected: at most {MAX_ARTIFACTS} per step"
        ));
    }
    out
}

/// Reads one file in chunks, hashing as it goes, so that memory does not grow with the
/// file's size.
pub struct Reader {
    file: tokio::fs::File,
    hasher: Sha256,
    pub size: u64,
    pub chunks: u64,
}

impl Reader {
    /// Open a collected file again, beneath its working directory and following no link:
    /// what is there now, if it is still a regular file inside.
    pub async fn open(wanted: &Wanted) -> std::io::Result<Self> {
        let (root, rel) = (wanted.root.clone(), wanted.rel.clone());
        let file = tokio::task::spawn_blocking(move || open_file(&root, &rel))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        Ok(Self {
            file: tokio::fs::File::from_std(file),
            hasher: Sha256::new(),
            size: 0,
            chunks: 0,
        })
    }

    /// The next chunk of at most `max` bytes (full unless at the end), or `None` at the end.
    pub async fn next(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; max];
        let mut filled = 0;
        while filled < max {
            let n = self.file.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.truncate(filled);
        self.hasher.update(&buf);
        self.size += filled as u64;
        self.chunks += 1;
        Ok(Some(buf))
    }

    /// Lowercase hex of the sha256 of everything read.
    pub fn sha256(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: &Collected) -> Vec<&str> {
        c.files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn globs_and_requests_are_collected_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("dist/sub")).unwrap();
        std::fs::create_dir_all(w.join(".gantry")).unwrap();
        std::fs::write(w.join("dist/a.tar.gz"), b"a").unwrap();
        std::fs::write(w.join("dist/b.txt"), b"b").unwrap();
        std::fs::write(w.join("dist/sub/c.txt"), b"c").unwrap();
        std::fs::write(w.join("report.xml"), b"r").unwrap();
        std::fs::write(w.join(".gantry/script.sh"), b"s").unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();

        let c = collect(
            w,
            &[
                ("report.xml".into(), Some("the-report".into())),
                (w.join("dist/b.txt").display().to_string(), None),
                ("missing.bin".into(), None),
                ("dist".into(), None),
                (outside.path().display().to_string(), None),
                ("dist/../../x".into(), None),
                (".gantry/script.sh".into(), None),
            ],
            &[
                "dist/*.tar.gz".into(),
                "dist/**/*.txt".into(),
                "nothing/*".into(),
                "**/*".into(),
            ],
        );

        assert_eq!(
            names(&c),
            ["the-report", "b.txt", "dist/a.tar.gz", "dist/sub/c.txt"]
        );
        let w = c.warnings.join("\n");
        assert!(w.contains("artifact missing.bin not collected"), "{w}");
        assert!(
            w.contains("artifact dist not collected: not a regular file"),
            "{w}"
        );
        assert!(w.contains("\"nothing/*\" matched no file"), "{w}");
        assert!(
            w.contains(&format!(
                "artifact {} not collected: it is outside",
                outside.path().display()
            )),
            "{w}"
        );
        assert!(
            w.contains("artifact dist/../../x not collected: it is outside"),
            "{w}"
        );
        assert!(w.contains(".gantry/ holds the agent's own files"), "{w}");
    }

    #[test]
    fn no_link_is_followed_and_nothing_outside_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("out/deep")).unwrap();
        std::fs::write(w.join("out/deep/x"), b"x").unwrap();
        std::fs::write(w.join("inner"), b"i").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), w.join("out/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), w.join("outdir")).unwrap();
        std::os::unix::fs::symlink("../inner", w.join("out/inner-link")).unwrap();

        let c = collect(
            w,
            &[
                ("out/link".into(), None),
                ("outdir/secret".into(), None),
                ("out/inner-link".into(), None),
            ],
            &["out".into(), "**/*".into()],
        );

        assert_eq!(names(&c), ["out/deep/x", "inner"]);
        let text = c.warnings.join("\n");
        assert!(
            text.contains("artifact out/link not collected: a symbolic link"),
            "{text}"
        );
        assert!(
            text.contains("artifact outdir/secret not collected: a symbolic link"),
            "{text}"
        );
        assert!(
            text.contains("artifact out/inner-link not collected"),
            "{text}"
        );
        assert!(text.contains("symbolic link(s) not collected"), "{text}");
    }

    #[tokio::test]
    async fn a_file_swapped_for_a_link_after_collection_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::write(w.join("a"), b"harmless").unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"outside").unwrap();
        let c = collect(w, &[("a".into(), None)], &[]);
        assert_eq!(names(&c), ["a"]);

        std::fs::remove_file(w.join("a")).unwrap();
        std::os::unix::fs::symlink(outside.path(), w.join("a")).unwrap();

        let e = Reader::open(&c.files[0]).await.err().expect("refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[tokio::test]
    async fn the_reader_hashes_what_it_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let c = collect(dir.path(), &[("f".into(), None)], &[]);

        let mut r = Reader::open(&c.files[0]).await.unwrap();
        let mut back = Vec::new();
        while let Some(chunk) = r.next(4096).await.unwrap() {
            assert!(chunk.len() <= 4096);
            back.extend(chunk);
        }

        assert_eq!(back, data);
        assert_eq!((r.size, r.chunks), (10_000, 3));
        assert_eq!(r.sha256(), hex::encode(Sha256::digest(&data)));
    }
}
