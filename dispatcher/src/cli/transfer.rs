//! What the CLI streams: an artifact downloaded and checked against its sha256, a task's
//! log followed to its end, and the exit code its final state gives.

use super::client::{CliError, Client};
use super::*;
use gantry_shared::states::TaskState;

/// Stream an artifact into `FILE.part` while hashing it, then rename it to `FILE` only if
/// its sha256 is the one the dispatcher announced.
pub(super) async fn download(
    client: &Client,
    id: &str,
    out: &std::path::Path,
    json: bool,
) -> Result<ExitCode, CliError> {
    use futures::StreamExt;
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncWriteExt;

    let resp = client
        .get_stream(&format!("/api/artifacts/{}", urlencode(id)))
        .await?;
    let expected = resp
        .headers()
        .get(ARTIFACT_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| {
            CliError::Local(format!(
                "the dispatcher sent no {ARTIFACT_SHA256_HEADER} header"
            ))
        })?;
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let local =
        |e: std::io::Error| CliError::Local(format!("cannot write {}: {e}", part.display()));
    let mut file = tokio::fs::File::create(&part).await.map_err(local)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(CliError::Unreachable(format!(
                    "the download broke off after {size} bytes: {e}"
                )));
            }
        };
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(local)?;
    }
    file.flush().await.map_err(local)?;
    file.sync_all().await.map_err(local)?;
    drop(file);
    let got = hex::encode(hasher.finalize());
    if got != expected {
        let _ = tokio::fs::remove_file(&part).await;
        eprintln!(
            "gantry: artifact {id}: sha256 mismatch: the dispatcher announced {expected}, the {size} bytes received have {got}; {} not written",
            out.display()
        );
        return Ok(ExitCode::from(3));
    }
    tokio::fs::rename(&part, out).await.map_err(|e| {
        CliError::Local(format!(
            "cannot move {} to {}: {e}",
            part.display(),
            out.display()
        ))
    })?;
    if json {
        print_json(&serde_json::json!({
            "id": id, "file": out, "size": size, "sha256": got
        }));
    } else {
        println!("{}: {size} bytes, sha256 {got} (verified)", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn exit_for(state: TaskState) -> ExitCode {
    if state == TaskState::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Stream a task's log until it ends, reconnecting (from the last line seen) if the
/// connection drops, e.g. while the dispatcher restarts.
pub(super) async fn follow_log(client: &Client, id: &str, json: bool) -> Result<LogEnd, CliError> {
    let mut after: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let mut out = std::io::stdout();
        let from = after.clone();
        let result = client
            .follow(id, from.as_deref(), |line: LogEntry| {
                let mut lock = out.lock();
                write_line(&mut lock, &line, json);
                after = Some(line.cursor.clone());
                failures = 0;
            })
            .await;
        match result {
            Ok(Some(end)) => {
                if !json {
                    eprintln!("task {} ended: {}", end.task_id, end.state);
                }
                let _ = out.flush();
                return Ok(end);
            }
            Ok(None) | Err(CliError::Unreachable(_)) => {
                failures += 1;
                if failures > 60 {
                    return Err(CliError::Unreachable(
                        "lost the log stream and could not reconnect for a minute".into(),
                    ));
                }
                if failures == 1 {
                    eprintln!("gantry: log stream interrupted; reconnecting...");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn write_line(out: &mut impl Write, line: &LogEntry, json: bool) {
    let _ = if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string(line).expect("log entries serialize")
        )
    } else {
        writeln!(out, "{}", render::log_line(line))
    };
}
