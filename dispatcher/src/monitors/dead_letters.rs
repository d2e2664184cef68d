//! `<ns>.dead` into the `dead_letters` table: every dead-lettered message is recorded (queue,
//! reason, body as storable text, bounded) and acked, even one PostgreSQL refuses for good;
//! while PostgreSQL is away it is held and tried again. A dead-lettered job whose body is the
//! one published for its attempt fails that attempt (if it never started).

use crate::attempts;
use crate::transitions::AttemptState;
use gantry_shared::amqp::Broker;
use gantry_shared::amqp::consume::{Message, QueueConsumer, Settle};
use gantry_shared::topology::Topology;
use gantry_shared::wire::Job;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Dead letters taken at once (unacked) at most.
const PREFETCH: u16 = 64;

/// Record dead-lettered messages and fail the attempts of dead-lettered jobs.
pub fn spawn_dead_letters(
    db: PgPool,
    broker: Broker,
    topology: &Topology,
    retry_base: Duration,
    cancel: CancellationToken,
) {
    let queue = topology.dead_queue();
    crate::supervise::spawn("dead-letters", cancel.clone(), move || {
        let consumer = QueueConsumer::new(
            broker.clone(),
            queue.clone(),
            "gantry-dispatcher-dead",
            PREFETCH,
            cancel.clone(),
        );
        let (db, cancel) = (db.clone(), cancel.clone());
        async move {
            consumer.run(|m| handle(&db, retry_base, &cancel, m)).await;
            Ok(())
        }
    });
}

/// What a dead letter says of itself: whatever its sender wrote, stored as text PostgreSQL
/// takes (no NUL), and bounded.
struct DeadLetter {
    reason: String,
    from: Option<String>,
    text: String,
}

impl DeadLetter {
    fn read(m: &Message) -> Self {
        let reason = m
            .header_text("x-first-death-reason")
            .map(|r| clip_text(&r, 200))
            .unwrap_or_else(|| "unknown".into());
        let from = m
            .header_text("x-first-death-queue")
            .map(|q| clip_text(&q, 300));
        let text = String::from_utf8_lossy(&m.data[..m.data.len().min(64 * 1024)]);
        let text = crate::logs::storable(&text).into_owned();
        Self { reason, from, text }
    }
}

/// Handle one dead letter; a transient PostgreSQL failure is tried again (100 ms doubling
/// to 5 s) with the delivery held, so the next ones wait behind it rather than pile up.
async fn handle(
    db: &PgPool,
    retry_base: Duration,
    cancel: &CancellationToken,
    m: Message,
) -> Settle {
    let dead = DeadLetter::read(&m);
    tracing::warn!(queue = dead.from.as_deref().unwrap_or("?"), reason = %dead.reason, "a message was dead-lettered");
    let mut pause = Duration::from_millis(100);
    let mut recorded = false;
    loop {
        match once(db, retry_base, &m, &dead, &mut recorded).await {
            // The attempt's conclusion woke its task (the wake-up row and its NOTIFY).
            Ok(()) => return Settle::Ack,
            Err(e) if crate::db::is_transient(&e) => {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    // Shutting down: it comes back to the next consumer.
                    _ = cancel.cancelled() => return Settle::Requeue,
                }
                pause = pause.saturating_mul(2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fail a dead-lettered job's attempt");
                return Settle::Ack;
            }
        }
    }
}

/// Record the dead letter (once) and fail its job's attempt (which wakes its task).
async fn once(
    db: &PgPool,
    retry_base: Duration,
    m: &Message,
    dead: &DeadLetter,
    recorded: &mut bool,
) -> sqlx::Result<()> {
    if !*recorded {
        match crate::store::dead_letters::record(db, dead.from.as_deref(), &dead.reason, &dead.text)
            .await
        {
            Ok(()) => {}
            Err(e) if crate::db::is_transient(&e) => return Err(e),
            Err(e) => {
                // It never will: the record is lost, the delivery is acked all the same (a
                // dead job's attempt is still failed below).
                tracing::warn!(error = %e, "a dead-lettered message cannot be recorded in dead_letters; dropping the record");
            }
        }
        *recorded = true;
    }
    let Ok(job) = Job::decode(&m.data) else {
        return Ok(());
    };
    let sha = gantry_shared::wire::body_sha256(&m.data);
    let mut tx = db.begin().await?;
    // Only the very body published for the attempt counts: anyone may get a message
    // dead-lettered (an agent rejects what it publishes itself), and its headers say
    // whatever its sender wrote.
    let Some(locked) = attempts::lock(&mut tx, job.step_run_id, job.attempt).await? else {
        return Ok(());
    };
    if locked.job_id != job.job_id.0
        || locked.job_sha256.as_ref().is_some_and(|s| *s != sha)
        || !matches!(locked.state, AttemptState::Pending | AttemptState::Queued)
    {
        return Ok(());
    }
    let why = format!(
        "its job was dead-lettered ({}) from {}",
        dead.reason,
        dead.from.as_deref().unwrap_or("a queue")
    );
    attempts::conclude(
        &mut tx,
        &locked,
        job.step_run_id,
        job.attempt,
        AttemptState::Failed,
        Some(&why),
        retry_base,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `text` without NUL, at most `max` bytes (on a character boundary).
fn clip_text(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    crate::logs::storable(&text[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clipped_on_a_character_boundary_without_nul() {
        assert_eq!(super::clip_text("abcdef", 3), "abc");
        assert_eq!(super::clip_text("é", 1), "");
        assert_eq!(super::clip_text("a\0b", 10), "a\u{fffd}b");
    }
}
