//! Sending a step's artifacts as chunks through the outbox (see [`crate::artifacts`]).

use super::StepContext;
use crate::emitter::Emitter;
use gantry_shared::wire::{ARTIFACT_CHUNK_BYTES, ArtifactChunk, ArtifactSum, Event};
use std::path::Path;

/// Collect the step's artifacts and send each in chunks; returns those sent in full.
pub(super) async fn artifacts(
    ctx: &StepContext,
    em: &mut Emitter,
    work_dir: &Path,
) -> Vec<ArtifactSum> {
    let collected = {
        let (dir, requested, globs) = (
            work_dir.to_path_buf(),
            em.requested_artifacts.clone(),
            ctx.job.artifacts.clone(),
        );
        tokio::task::spawn_blocking(move || crate::artifacts::collect(&dir, &requested, &globs))
            .await
            .unwrap_or_default()
    };
    for w in &collected.warnings {
        em.gantry(&format!("warning: {w}")).await;
    }
    let mut sums = Vec::new();
    // Every file tried gets its own index, so chunks of one that failed half-way never mix
    // with the next one's.
    for (index, wanted) in collected.files.into_iter().enumerate() {
        let index = index as u32;
        if ctx.cancel.is_cancelled() {
            em.gantry("warning: artifact upload stopped: the step was cancelled")
                .await;
            break;
        }
        match upload_one(ctx, em, index, &wanted).await {
            Ok(Some(sum)) => {
                em.gantry(&format!(
                    "Artifact {} uploaded: {} bytes, sha256 {}",
                    sum.name, sum.size, sum.sha256
                ))
                .await;
                sums.push(sum);
            }
            Ok(None) => {
                em.gantry("warning: artifact upload stopped: the step was cancelled")
                    .await;
                break;
            }
            Err(e) => {
                // Chunks already sent for it are dropped by the dispatcher, since
                // `StepFinished` does not list it.
                em.gantry(&format!(
                    "warning: artifact {} not uploaded: cannot read {}: {e}",
                    wanted.name,
                    wanted.path.display()
                ))
                .await;
            }
        }
    }
    sums
}

/// Send one file as chunks. `Ok(None)` if cancelled meanwhile.
async fn upload_one(
    ctx: &StepContext,
    em: &mut Emitter,
    index: u32,
    wanted: &crate::artifacts::Wanted,
) -> std::io::Result<Option<ArtifactSum>> {
    let mut reader = crate::artifacts::Reader::open(wanted).await?;
    loop {
        if ctx.cancel.is_cancelled() {
            return Ok(None);
        }
        let offset = reader.size;
        let seq = reader.chunks;
        let Some(data) = reader.next(ARTIFACT_CHUNK_BYTES).await? else {
            break;
        };
        // Waits while the outbox is full: the file is read as fast as the broker confirms.
        em.event(Event::ArtifactChunk(ArtifactChunk {
            origin: em.origin.clone(),
            artifact: index,
            name: wanted.name.clone(),
            seq,
            offset,
            data,
        }))
        .await;
    }
    let (size, chunks) = (reader.size, reader.chunks);
    Ok(Some(ArtifactSum {
        artifact: index,
        name: wanted.name.clone(),
        size,
        chunks,
        sha256: reader.sha256(),
    }))
}
