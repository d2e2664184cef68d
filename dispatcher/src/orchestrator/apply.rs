//! Carrying out a [`Plan`] in the advance's transaction: skips, starts, cancels and the
//! task's own move, each through `transitions`.

use super::advance::{StepRecord, TaskRecord};
use super::plan::{Action, Plan, Start, TaskMove};
use super::{Inner, Outgoing, dispatch, server_steps};
use crate::logs;
use crate::transitions::{self, StepState, TaskState};
use gantry_shared::ids::{JobId, StepRunId};
use sqlx::PgConnection;
use std::sync::Arc;

/// What an applied plan leaves to do after its commit.
#[derive(Default)]
pub(super) struct Applied {
    pub outgoing: Vec<Outgoing>,
    emails: Vec<crate::email::Outgoing>,
    wake_locks: bool,
}

impl Applied {
    /// Its transaction did not commit: its jobs are no longer this node's to publish.
    pub fn give_back(&self, inner: &Inner) {
        let mut publishing = inner.publishing.lock().expect("lock");
        for o in &self.outgoing {
            publishing.remove(&(o.job.step_run_id, o.job.attempt));
        }
    }

    /// Wake the mutex loop, send e-mails; return the jobs to publish.
    pub fn after_commit(self, inner: &Arc<Inner>) -> Vec<Outgoing> {
        if self.wake_locks {
            inner.locks_wake.notify_one();
        }
        for m in self.emails {
            server_steps::spawn_email(inner, m);
        }
        self.outgoing
    }
}

pub(super) async fn apply(
    inner: &Arc<Inner>,
    tx: &mut PgConnection,
    task: &TaskRecord,
    steps: &[StepRecord],
    plan: Plan,
) -> anyhow::Result<Applied> {
    let mut done = Applied::default();
    for action in plan.actions {
        match action {
            Action::Skip { step, reason } => {
                let s = &steps[step];
                if transitions::settle_step(tx, StepRunId(s.id), StepState::Skipped, Some(&reason))
                    .await?
                {
                    logs::append_system(
                        tx,
                        task.id,
                        Some((StepRunId(s.id), s.attempt.max(0) as u32)),
                        &format!("Step {} {reason}", s.name),
                    )
                    .await?;
                }
            }
            Action::Cancel { step } => {
                let s = &steps[step];
                if transitions::settle_step(
                    tx,
                    StepRunId(s.id),
                    StepState::Cancelled,
                    Some("cancelled before it started"),
                )
                .await?
                {
                    logs::append_system(
                        tx,
                        task.id,
                        Some((StepRunId(s.id), 0)),
                        &format!("Step {} cancelled before it started", s.name),
                    )
                    .await?;
                }
            }
            Action::Start { step, attempt, how } => {
                let s = &steps[step];
                match how {
                    Start::Manual => server_steps::await_approval(tx, task, s).await?,
                    Start::Email => {
                        let mail = server_steps::prepare_email(tx, task, s, attempt).await?;
                        done.emails.push(mail);
                    }
                    Start::Mutex => {
                        let mutex = s.mutex.as_deref().unwrap_or_default();
                        transitions::create_attempt(
                            tx,
                            StepRunId(s.id),
                            attempt,
                            JobId::new(),
                            transitions::Start::Mutex(mutex),
                        )
                        .await?;
                        done.wake_locks = true;
                    }
                    Start::Job => {
                        // The attempt is created by the dispatch, routed in the same
                        // statement when it can go.
                        let job_id = JobId::new();
                        let mut s = s.clone();
                        s.attempt = attempt as i32;
                        let attempt_is = dispatch::Attempt::New;
                        if let Some(out) = dispatch::dispatch_or_wait(
                            inner, tx, task, &s, attempt, job_id, attempt_is,
                        )
                        .await?
                        {
                            done.outgoing.push(out);
                        }
                    }
                }
            }
        }
    }
    match plan.task {
        None => {}
        Some(TaskMove::To(state)) if transitions::task_to(tx, task.id, state, None).await? => {
            logs::notify(tx, logs::TASK_CHANNEL, task.id).await?;
        }
        Some(TaskMove::To(_)) => {}
        Some(TaskMove::End { state, error }) => end_task(tx, task, state, error).await?,
    }
    // This node's to publish from here on (the sweep leaves them alone), and only once the
    // whole plan is applied: an apply that fails half-way marks nothing. Whoever fails the
    // transaction after this gives them back (`Orchestrator::rolled_back`).
    let mut publishing = inner.publishing.lock().expect("lock");
    for o in &done.outgoing {
        publishing.insert((o.job.step_run_id, o.job.attempt));
    }
    drop(publishing);
    Ok(done)
}

/// The task ended: its state, its last log line, and a word to its followers.
async fn end_task(
    tx: &mut PgConnection,
    task: &TaskRecord,
    state: TaskState,
    error: Option<String>,
) -> sqlx::Result<()> {
    if !transitions::task_to(tx, task.id, state, error.as_deref()).await? {
        return Ok(());
    }
    let line = match (state, &error) {
        (TaskState::Cancelled, _) => format!("Task {} cancelled", task.name),
        (_, Some(e)) => format!("Task {} failed: {e}", task.name),
        (_, None) => format!("Task {} succeeded", task.name),
    };
    logs::append_system(tx, task.id, None, &line).await?;
    logs::notify(tx, logs::TASK_CHANNEL, task.id).await
}
