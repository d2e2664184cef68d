//! Storing one event in the caller's transaction, by kind: waiting and started, log batches,
//! outputs, progress, artifact chunks, `StepFinished`; and keeping a stale event apart.

use super::finish::Now;
use super::{Handled, Release, ResultConsumer};
use crate::artifacts;
use crate::attempts;
use crate::logs;
use crate::outputs;
use crate::quotas::{self, Quota};
use crate::senders::Sender;
use crate::transitions::{self, AttemptState, StepState};
use gantry_shared::wire::{Event, Origin};
use sqlx::PgConnection;

impl ResultConsumer {
    /// Store one event in the caller's transaction; what to do after the commit comes back.
    pub(super) async fn handle_in(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        sender: &Sender,
    ) -> Result<Handled, sqlx::Error> {
        let origin = event.origin();
        let stale_as = |reason: String| Stale {
            origin,
            kind: event.kind(),
            reason,
            sender: self.attribution.user_of(sender),
        };
        let Some(locked) = attempts::lock(&mut *tx, origin.step_run_id, origin.attempt).await?
        else {
            stale_as("no such attempt".into()).record(&mut *tx).await?;
            return Ok(Handled::Done(None, None));
        };
        let worker = match self
            .attribution
            .worker(sender, origin.worker_id, || locked.claimant_builtin)
        {
            Ok(w) => w,
            Err(why) => {
                stale_as(why).record(&mut *tx).await?;
                return Ok(Handled::Done(None, None));
            }
        };
        if !locked.is_claimant(origin.job_id, worker) {
            stale_as("not from the attempt's current claimant".into())
                .record(&mut *tx)
                .await?;
            return Ok(Handled::Done(None, None));
        }
        let live = locked.state == AttemptState::Running;
        let mut kick = None;
        match event {
            Event::StepWaiting(w) => {
                let why = logs::storable(&w.waiting_for);
                if live
                    && transitions::step_waits(
                        &mut *tx,
                        origin.step_run_id,
                        &why,
                        Some(&[StepState::Running]),
                    )
                    .await?
                {
                    logs::append_system(
                        &mut *tx,
                        locked.task(),
                        Some((origin.step_run_id, origin.attempt)),
                        &format!("Step {} waiting for {why}", locked.step_name),
                    )
                    .await?;
                }
            }
            Event::StepStarted(_) => {
                if live {
                    // The claim started the attempt (its `started_at` is the dispatcher's
                    // clock); this only ends a wait the agent announced (exclusive access),
                    // and agents send it only then.
                    transitions::step_resumes(&mut *tx, origin.step_run_id, StepState::Running)
                        .await?;
                }
            }
            Event::LogBatch(b) => {
                let first_seq = i64::try_from(b.first_seq).unwrap_or(i64::MAX);
                let end =
                    first_seq.saturating_add(i64::try_from(b.lines.len()).unwrap_or(i64::MAX));
                if !live {
                    if end > locked.lines_stored {
                        stale_as("lines for an attempt that has ended".into())
                            .record(&mut *tx)
                            .await?;
                    }
                } else {
                    match self
                        .store_lines(
                            &mut *tx,
                            &locked,
                            origin,
                            worker,
                            (first_seq, &b.lines),
                            false,
                        )
                        .await?
                    {
                        logs::Applied::OverQuota => kick = Some(locked.task()),
                        logs::Applied::Stored(stored) => {
                            if let Some(count) = locked.line_count
                                && locked.outcome.is_some()
                                && stored >= count
                                && self
                                    .try_finish(
                                        &mut *tx,
                                        &locked,
                                        origin,
                                        Now::locked(&locked, stored),
                                        None,
                                    )
                                    .await?
                            {
                                kick = Some(locked.task());
                            }
                        }
                    }
                }
            }
            Event::OutputVariable(o) => {
                if let (true, false, Some(value)) = (live, o.sensitive, o.value.as_deref()) {
                    outputs::store_plain(
                        &mut *tx,
                        &self.secrets,
                        &locked,
                        origin.step_run_id,
                        origin.attempt,
                        &o.name,
                        value,
                    )
                    .await?;
                } else if live {
                    sqlx::query(
                        "INSERT INTO output_variables (step_run_id, attempt, name, value, sensitive)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (step_run_id, attempt, name)
                         DO UPDATE SET value = EXCLUDED.value, sensitive = EXCLUDED.sensitive",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(logs::storable(&o.name).as_ref())
                    .bind(if o.sensitive {
                        None
                    } else {
                        logs::storable_opt(o.value.as_deref())
                    })
                    .bind(o.sensitive)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Event::Progress(p) => {
                if live {
                    sqlx::query(
                        "UPDATE attempts SET progress_percent = $3, progress_message = $4
                         WHERE step_run_id = $1 AND attempt = $2",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(i16::from(p.percentage))
                    .bind(logs::storable(&p.message).as_ref())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Event::ArtifactChunk(c) => {
                if live {
                    let announced = locked.outcome.is_some();
                    let limit = self.limits.artifact_bytes;
                    let stored =
                        artifacts::store_chunk(&mut *tx, locked.task(), c, announced, limit)
                            .await?;
                    if stored == artifacts::Chunk::OverQuota {
                        self.over_quota(&mut *tx, &locked, origin, worker, Quota::Artifacts)
                            .await?;
                        kick = Some(locked.task());
                    } else if stored == artifacts::Chunk::New && announced {
                        // A chunk that arrived after StepFinished (a redelivery): it may be
                        // the last one the attempt waited for.
                        artifacts::settle(
                            &mut *tx,
                            locked.task(),
                            origin.step_run_id,
                            origin.attempt,
                        )
                        .await?;
                        let now = Now::locked(&locked, locked.lines_stored);
                        if self
                            .try_finish(&mut *tx, &locked, origin, now, None)
                            .await?
                        {
                            kick = Some(locked.task());
                        }
                    }
                } else {
                    let stored: Option<(i64,)> = sqlx::query_as(
                        "SELECT 1::bigint FROM artifact_chunks k JOIN artifacts a ON a.id = k.artifact_id
                         WHERE a.step_run_id = $1 AND a.attempt = $2 AND a.idx = $3 AND k.seq = $4",
                    )
                    .bind(origin.step_run_id.0)
                    .bind(origin.attempt as i32)
                    .bind(c.artifact as i32)
                    .bind(i64::try_from(c.seq).unwrap_or(i64::MAX))
                    .fetch_optional(&mut *tx)
                    .await?;
                    if stored.is_none() {
                        stale_as("a chunk for an attempt that has ended".into())
                            .record(&mut *tx)
                            .await?;
                    }
                }
            }
            Event::StepFinished(f) => {
                if live && locked.outcome.is_none() {
                    if self.finished(&mut *tx, &locked, origin, worker, f).await? {
                        kick = Some(locked.task());
                    }
                } else if !live
                    && (locked.outcome.is_none()
                        || i64::try_from(f.line_count).unwrap_or(i64::MAX) > locked.lines_stored)
                {
                    // Not a repeat of an end already stored: the late end (and last lines) of
                    // an attempt that ended otherwise (lost, cancelled, failed by a quota).
                    stale_as("an end for an attempt that has ended".into())
                        .record(&mut *tx)
                        .await?;
                }
            }
        }
        // An attempt that ended here gives its mutex back (once the caller has committed),
        // under the token the dispatcher recorded for it.
        let release = match (&kick, &locked.mutex, locked.mutex_token) {
            (Some(_), Some(mutex), Some(token)) => Some(Release {
                mutex: mutex.clone(),
                step_run: origin.step_run_id,
                attempt: origin.attempt,
                token: token as u64,
            }),
            _ => None,
        };
        Ok(Handled::Done(kick, release))
    }
}

impl ResultConsumer {
    /// Store lines of a live attempt from `first_seq` on, charged against the task's log
    /// quota (an attempt that would pass it fails here); `last`: they are the attempt's last
    /// (`StepFinished`'s), and its end writes the new `lines_stored`, which otherwise the
    /// store itself does.
    async fn store_lines(
        &self,
        tx: &mut PgConnection,
        locked: &attempts::Locked,
        origin: &Origin,
        worker: gantry_shared::ids::WorkerId,
        (first_seq, lines): (i64, &[gantry_shared::wire::LogLine]),
        last: bool,
    ) -> sqlx::Result<logs::Applied> {
        let batch = logs::Batch {
            task: locked.task(),
            step_run: origin.step_run_id,
            attempt: origin.attempt,
            lines_stored: locked.lines_stored,
            last,
            first_seq,
            lines,
            charge: (
                quotas::new_log_bytes(first_seq, locked.lines_stored, lines),
                self.limits.task_log_bytes,
            ),
        };
        let applied = logs::apply_batch(&mut *tx, batch).await?;
        match applied {
            logs::Applied::OverQuota => {
                self.over_quota(&mut *tx, locked, origin, worker, Quota::Log)
                    .await?
            }
            logs::Applied::Stored(stored) if stored != locked.lines_stored => self
                .metrics
                .observe_log_batch(stored.saturating_sub(locked.lines_stored).max(0) as u64),
            logs::Applied::Stored(_) => {}
        }
        Ok(applied)
    }

    /// A live attempt's `StepFinished`, the first one: the lines it carries stored (as a
    /// `LogBatch` of their own would be), its outcome recorded, its artifacts announced, and
    /// the attempt concluded if nothing it announced is still missing. True if the attempt
    /// ended (concluded, or failed for its log quota).
    async fn finished(
        &self,
        tx: &mut PgConnection,
        locked: &attempts::Locked,
        origin: &Origin,
        worker: gantry_shared::ids::WorkerId,
        f: &gantry_shared::wire::StepFinished,
    ) -> sqlx::Result<bool> {
        let lines_stored = if f.lines.is_empty() {
            locked.lines_stored
        } else {
            let first_seq = i64::try_from(f.first_seq()).unwrap_or(i64::MAX);
            match self
                .store_lines(
                    &mut *tx,
                    locked,
                    origin,
                    worker,
                    (first_seq, &f.lines),
                    true,
                )
                .await?
            {
                logs::Applied::OverQuota => return Ok(true),
                logs::Applied::Stored(n) => n,
            }
        };
        let line_count = i64::try_from(f.line_count).unwrap_or(i64::MAX);
        let error = logs::storable_opt(f.error.as_deref());
        let now = Now {
            outcome: Some(f.outcome.as_str().to_owned()),
            line_count: Some(line_count),
            lines_stored,
            exit_code: f.exit_code,
            error: error.as_deref().map(str::to_owned),
            no_artifacts: f.artifacts.is_empty(),
        };
        if f.artifacts.is_empty() && lines_stored >= line_count {
            // Nothing it announced is missing: the outcome is written with the attempt's end,
            // in one statement, which drops any artifact it did not announce.
            let report = transitions::Report {
                outcome: f.outcome.as_str(),
                exit_code: f.exit_code,
                error: error.as_deref(),
                line_count,
                lines_stored,
                finished_at: f.finished_at,
            };
            return self
                .try_finish(&mut *tx, locked, origin, now, Some(&report))
                .await;
        }
        sqlx::query(
            "UPDATE attempts SET outcome = $3, exit_code = $4, error = $5,
                 line_count = $6, finished_at = $7, lines_stored = $8
             WHERE step_run_id = $1 AND attempt = $2",
        )
        .bind(origin.step_run_id.0)
        .bind(origin.attempt as i32)
        .bind(f.outcome.as_str())
        .bind(f.exit_code)
        .bind(error.as_deref())
        .bind(line_count)
        .bind(f.finished_at)
        .bind(lines_stored)
        .execute(&mut *tx)
        .await?;
        artifacts::announce(
            &mut *tx,
            locked.task(),
            origin.step_run_id,
            origin.attempt,
            &f.artifacts,
        )
        .await?;
        // With none announced, `announce` has just removed every artifact row of the
        // attempt: nothing to settle, nothing pending.
        if !f.artifacts.is_empty() {
            artifacts::settle(&mut *tx, locked.task(), origin.step_run_id, origin.attempt).await?;
        }
        self.try_finish(&mut *tx, locked, origin, now, None).await
    }
}

/// An event kept apart: it changes nothing but this row.
struct Stale<'a> {
    origin: &'a Origin,
    kind: &'static str,
    reason: String,
    /// The broker user that sent it, if it had one.
    sender: Option<String>,
}

impl Stale<'_> {
    async fn record(self, conn: &mut PgConnection) -> sqlx::Result<()> {
        let o = self.origin;
        tracing::info!(step_run = %o.step_run_id, attempt = o.attempt, job_id = %o.job_id, worker = %o.worker_id, sender = self.sender.as_deref().unwrap_or("-"), kind = self.kind, reason = %self.reason, "keeping a stale event apart");
        sqlx::query(
            "INSERT INTO stale_events (step_run_id, attempt, job_id, worker_id, kind, reason, sender)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(o.step_run_id.0)
        .bind(o.attempt as i32)
        .bind(o.job_id.0)
        .bind(o.worker_id.0)
        .bind(self.kind)
        .bind(&self.reason)
        .bind(&self.sender)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
