//! Artifacts are read beneath the step's working directory only: a step's `setsid` helper
//! that swaps an artifact for a symbolic link to a file outside (a stand-in for
//! `/etc/shadow`, readable by the agent) while the agent uploads another one gets nothing
//! outside uploaded; links and paths out of the directory are refused with a warning.

use gantry_shared::api::Artifact;
use gantry_tests::{API_KEY, AgentOpts, Stack};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// The helper: waits (inotify) until the agent opens `big.bin`, then swaps `small.txt` for
/// the prepared link, and exits.
const SWAPPER: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
assert libc.inotify_add_watch(fd, b"big.bin", 0x20) >= 0  # IN_OPEN
open("watching", "w").close()
os.read(fd, 4096)
os.rename("link.tmp", "small.txt")
"#;

async fn download(stack: &Stack, a: &Artifact) -> Vec<u8> {
    let resp = stack
        .http
        .get(format!("{}/api/artifacts/{}", stack.url, a.id))
        .header("X-Gantry-ApiKey", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", a.name);
    resp.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn a_file_swapped_for_a_link_during_another_upload_uploads_nothing_outside() {
    // Arrange: a file outside every working directory that the agent (root) could read.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("conf", AgentOpts::default()).await.unwrap();
    let marker = format!("MARKER-{}", uuid::Uuid::new_v4().simple());
    let outside = stack.dir.path().join("shadow");
    std::fs::write(&outside, &marker).unwrap();
    let big = 48 * 1024 * 1024;
    let process = format!(
        r##"
name = "race"
[variables]
Outside = "{outside}"
[[steps]]
name = "swap"
artifacts = ["globbed/*"]
script = '''
head -c {big} /dev/zero > big.bin
echo harmless > small.txt
ln -s "#{{Outside}}" link.tmp
mkdir globbed && ln -s "#{{Outside}}" globbed/shadow && echo fine > globbed/ok.txt
cat > swapper.py <<'PYEND'
{SWAPPER}
PYEND
setsid python3 swapper.py </dev/null >/dev/null 2>&1 &
while [ ! -e watching ]; do sleep 0.05; done
new_gantryartifact big.bin
new_gantryartifact small.txt
new_gantryartifact "#{{Outside}}" direct
new_gantryartifact ../../../../../../../../..{outside} dotted
'''
"##,
        outside = outside.display()
    );

    // Act
    let task = stack.submit(&process).await.unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(120))
        .await
        .unwrap();
    let list: Vec<Artifact> = stack
        .get(&format!("/api/tasks/{task}/artifacts"))
        .await
        .unwrap();
    let log: Vec<String> = stack.log_texts(task).await.unwrap();
    let log = log.join("\n");

    // Assert: the swap happened during the upload (small.txt was refused as a link), the
    // other ways out were refused, and no stored artifact holds a byte of the file outside.
    assert_eq!(done.summary.state, "Success", "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("small.txt not") && l.contains("symbolic link")),
        "{log}"
    );
    assert!(log.contains("symbolic link(s) not collected"), "{log}");
    assert_eq!(
        log.matches("not collected: it is outside the step's working directory")
            .count(),
        2,
        "{log}"
    );
    let names: Vec<&str> = list.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["big.bin", "globbed/ok.txt"], "{log}");
    let zeros = hex::encode(Sha256::digest(vec![0u8; big]));
    for a in &list {
        assert_eq!(a.state, "Stored", "{a:?}");
        if a.name == "big.bin" {
            assert_eq!(a.sha256.as_deref(), Some(zeros.as_str()));
            continue;
        }
        assert_eq!(download(&stack, a).await, b"fine\n", "{}", a.name);
    }
    assert!(!log.contains(&marker), "{log}");
}
