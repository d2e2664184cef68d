//! # Which files of a step become artifacts
//!
//! After the script has ended (whatever its outcome, except a cancel), the agent collects:
//!
//! 1. the files the script named with `new_gantryartifact PATH [NAME]` (the `createArtifact`
//!    service message), in the order it named them; a relative path is relative to the
//!    step's working directory (the bash and sh helper sends an absolute path, resolved
//!    against the directory the script was in);
//! 2. the files matched by the step's `artifacts = [globs]`, evaluated in the working
//!    directory: `*` stays within one path segment, `**` crosses them, names starting with
//!    `.` need a literal `.`; a matched directory brings every regular file below it. They
//!    are named by their path relative to the working directory (`dist/app.tar.gz`).
//!
//! A file named twice is collected once (the first name wins). A glob that matches nothing,
//! a path that does not exist or is not a regular file are warnings in the step's log,
//! never failures. The agent's own files (`.gantry/`) are never collected. Where the script
//! runs as another OS user (the built-in worker's `builtin_worker.user`), only files inside
//! the working directory are collected: the agent must not read, on the script's behalf,
//! what that user could not.
//!
//! Uploading is the runner's: each file is read in chunks of
//! [`gantry_shared::wire::ARTIFACT_CHUNK_BYTES`], hashed as it is read (see [`Reader`]).

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// Most artifacts one attempt uploads; the rest are named in a warning.
pub const MAX_ARTIFACTS: usize = 1000;

/// A file to upload and the name it is listed under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub path: PathBuf,
    pub name: String,
}

/// The files to upload, and what could not be collected (for the step's log).
#[derive(Debug, Default)]
pub struct Collected {
    pub files: Vec<Wanted>,
    pub warnings: Vec<String>,
}

/// Find the step's artifacts (blocking: call it off the async threads).
pub fn collect(
    work_dir: &Path,
    requested: &[(String, Option<String>)],
    globs: &[String],
    confined: bool,
) -> Collected {
    let mut out = Collected::default();
    let work = match std::fs::canonicalize(work_dir) {
        Ok(w) => w,
        Err(e) => {
            if !requested.is_empty() || !globs.is_empty() {
                out.warnings.push(format!(
                    "no artifacts collected: cannot read the working directory {}: {e}",
                    work_dir.display()
                ));
            }
            return out;
        }
    };
    let own = work.join(".gantry");
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut dropped = 0usize;
    let mut add = |out: &mut Collected, real: PathBuf, name: String| {
        if real.starts_with(&own) || !seen.insert(real.clone()) {
            return;
        }
        if out.files.len() >= MAX_ARTIFACTS {
            dropped += 1;
            return;
        }
        out.files.push(Wanted { path: real, name });
    };

    for (raw, name) in requested {
        let given = Path::new(raw);
        let path = if given.is_absolute() {
            given.to_path_buf()
        } else {
            work.join(given)
        };
        let real = match std::fs::canonicalize(&path) {
            Ok(r) => r,
            Err(e) => {
                out.warnings
                    .push(format!("artifact {raw} not collected: {e}"));
                continue;
            }
        };
        if confined && !real.starts_with(&work) {
            out.warnings.push(format!(
                "artifact {raw} not collected: it is outside the step's working directory, and this worker runs scripts as another user"
            ));
            continue;
        }
        match std::fs::metadata(&real) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                out.warnings
                    .push(format!("artifact {raw} not collected: not a regular file"));
                continue;
            }
            Err(e) => {
                out.warnings
                    .push(format!("artifact {raw} not collected: {e}"));
                continue;
            }
        }
        let name = name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .or_else(|| real.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| raw.clone());
        add(&mut out, real, name);
    }

    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let prefix = glob::Pattern::escape(&work.to_string_lossy());
    for g in globs {
        let pattern = format!("{prefix}/{g}");
        let paths = match glob::glob_with(&pattern, options) {
            Ok(p) => p,
            Err(e) => {
                out.warnings
                    .push(format!("artifacts glob {g:?} is not valid: {e}"));
                continue;
            }
        };
        let mut matched = 0usize;
        for entry in paths {
            let path = match entry {
                Ok(p) => p,
                Err(e) => {
                    out.warnings
                        .push(format!("artifacts glob {g:?}: cannot read {e}"));
                    continue;
                }
            };
            let mut files = Vec::new();
            files_below(&path, &mut files, &mut out.warnings);
            for file in files {
                let real = match std::fs::canonicalize(&file) {
                    Ok(r) => r,
                    Err(_) => continue,
                };
                if confined && !real.starts_with(&work) {
                    out.warnings.push(format!(
                        "artifact {} not collected: it leads outside the step's working directory, and this worker runs scripts as another user",
                        file.display()
                    ));
                    continue;
                }
                if real.starts_with(&own) {
                    continue;
                }
                matched += 1;
                let name = file
                    .strip_prefix(&work)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| file.to_string_lossy().into_owned());
                add(&mut out, real, name);
            }
        }
        if matched == 0 {
            out.warnings
                .push(format!("artifacts glob {g:?} matched no file"));
        }
    }
    if dropped > 0 {
        out.warnings.push(format!(
            "{dropped} more artifacts not collected: at most {MAX_ARTIFACTS} per step"
        ));
    }
    out
}

/// `path` if it is a regular file (following symlinks), or every regular file below it if
/// it is a directory, in name order. Symlinked directories below a matched one are not
/// followed (no loops).
fn files_below(path: &Path, out: &mut Vec<PathBuf>, warnings: &mut Vec<String>) {
    walk(path, true, out, warnings)
}

fn walk(path: &Path, top: bool, out: &mut Vec<PathBuf>, warnings: &mut Vec<String>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    if !meta.is_dir() {
        return;
    }
    let is_link = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(true);
    if is_link && !top {
        return;
    }
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            warnings.push(format!("cannot read directory {}: {e}", path.display()));
            return;
        }
    };
    entries.sort();
    for entry in entries {
        walk(&entry, false, out, warnings);
    }
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
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: tokio::fs::File::open(path).await?,
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
            ],
            &[
                "dist/*.tar.gz".into(),
                "dist/**/*.txt".into(),
                "nothing/*".into(),
                "**/*".into(),
            ],
            false,
        );

        assert_eq!(
            names(&c),
            [
                "the-report",
                "b.txt",
                outside.path().file_name().unwrap().to_str().unwrap(),
                "dist/a.tar.gz",
                "dist/sub/c.txt",
            ]
        );
        let w = c.warnings.join("\n");
        assert!(w.contains("artifact missing.bin not collected"), "{w}");
        assert!(
            w.contains("artifact dist not collected: not a regular file"),
            "{w}"
        );
        assert!(w.contains("\"nothing/*\" matched no file"), "{w}");
        assert!(!w.contains("script.sh"), "{w}");
    }

    #[test]
    fn a_matched_directory_brings_its_files_and_confinement_holds() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("out/deep")).unwrap();
        std::fs::write(w.join("out/deep/x"), b"x").unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), w.join("out/link")).unwrap();

        let open = collect(w, &[], &["out".into()], false);
        let confined = collect(
            w,
            &[(outside.path().display().to_string(), None)],
            &["out".into()],
            true,
        );

        assert_eq!(names(&open), ["out/deep/x", "out/link"]);
        assert_eq!(names(&confined), ["out/deep/x"]);
        assert_eq!(confined.warnings.len(), 2, "{:?}", confined.warnings);
    }

    #[tokio::test]
    async fn the_reader_hashes_what_it_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();

        let mut r = Reader::open(&path).await.unwrap();
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
