//! A step's output, chunk by chunk: service messages (`##gantry[...]` on stdout) are acted
//! on and never logged; everything else goes to the log.

use super::StepContext;
use crate::emitter::Emitter;
use crate::output::Chunk;
use gantry_shared::service_messages::{self, ServiceMessage};
use gantry_shared::wire::{Event, OutputVariable, Progress, Stream};
use std::time::Duration;

/// One chunk of output: a service message (stdout lines that start with `##gantry[`, whole),
/// or a line or piece of one for the log.
pub(super) async fn handle_chunk(
    ctx: &StepContext,
    em: &mut Emitter,
    stream: Stream,
    chunk: Chunk,
    fail_message: &mut Option<String>,
) {
    let (text, last) = match chunk {
        Chunk::TooLong => {
            em.gantry(&format!(
                "warning: ignored a service message longer than {} bytes",
                service_messages::MAX_MESSAGE_BYTES
            ))
            .await;
            return;
        }
        Chunk::Part(text) => (text, false),
        Chunk::End(text) => (text, true),
    };
    if stream == Stream::Stdout
        && last
        && !em.line_open(stream)
        && let Some(parsed) = service_messages::parse_line(&text)
    {
        match parsed {
            Err(reason) => {
                em.gantry(&format!(
                    "warning: ignored a malformed service message: {reason}"
                ))
                .await;
            }
            Ok(msg) => service_message(ctx, em, msg, fail_message).await,
        }
        return;
    }
    em.piece(stream, &text, last).await;
}

async fn service_message(
    ctx: &StepContext,
    em: &mut Emitter,
    msg: ServiceMessage,
    fail_message: &mut Option<String>,
) {
    use gantry_shared::text::into_storable;
    match msg {
        ServiceMessage::SetVariable {
            name,
            value,
            sensitive,
        } => {
            let (name, value) = (into_storable(name), into_storable(value));
            if em.masker.mask(&name) != name.as_str() {
                // Names are shown and stored in clear: one holding a secret is refused.
                em.gantry("warning: ignored an output variable whose name holds a sensitive value")
                    .await;
                return;
            }
            // A value that holds a known secret is as sensitive as that secret.
            let holds_secret = !sensitive && em.masker.mask(&value) != value.as_str();
            if sensitive || holds_secret {
                em.masker.add(&value);
                // Sensitive values never travel through the broker: straight to the
                // dispatcher, which seals them.
                match send_sensitive_output(ctx, &name, &value).await {
                    Ok(()) if holds_secret => {
                        em.gantry(&format!(
                            "Output variable {name} set (sensitive: its value holds a sensitive value)"
                        ))
                        .await
                    }
                    Ok(()) => {
                        em.gantry(&format!("Output variable {name} set (sensitive)"))
                            .await
                    }
                    Err(e) => {
                        em.gantry(&format!(
                            "warning: sensitive output variable {name} was not stored: {e}"
                        ))
                        .await
                    }
                }
                return;
            }
            em.gantry(&format!("Output variable {name} set")).await;
            let origin = em.origin.clone();
            em.event(Event::OutputVariable(OutputVariable {
                origin,
                name,
                value: Some(value),
                sensitive: false,
            }))
            .await;
        }
        ServiceMessage::Mask { value } => {
            em.masker.add(&into_storable(value));
        }
        ServiceMessage::Progress {
            percentage,
            message,
        } => {
            let message = into_storable(message);
            em.gantry(&format!("Progress {percentage}%: {message}"))
                .await;
            let origin = em.origin.clone();
            em.event(Event::Progress(Progress {
                origin,
                percentage,
                message: em.masker.mask(&message).into_owned(),
            }))
            .await;
        }
        ServiceMessage::Fail { message } => {
            let message = into_storable(message);
            em.gantry(&format!("Step failed: {message}")).await;
            *fail_message = Some(if message.is_empty() {
                "the script called fail_step".into()
            } else {
                message
            });
        }
        ServiceMessage::CreateArtifact { path, name } => {
            let name = name.map(into_storable);
            let shown = match &name {
                Some(n) if !n.is_empty() => format!("{n} ({path})"),
                _ => path.clone(),
            };
            em.gantry(&format!(
                "Artifact {shown} will be collected when the script ends"
            ))
            .await;
            em.requested_artifacts.push((path, name));
        }
    }
}

/// Store a sensitive output over the API, retrying while the dispatcher is unreachable.
async fn send_sensitive_output(ctx: &StepContext, name: &str, value: &str) -> Result<(), String> {
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match ctx.api.sensitive_output(ctx.job.job_id, name, value).await {
            Ok(()) => return Ok(()),
            Err(crate::api::ApiError::Unavailable(m)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %m, "cannot store a sensitive output yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
