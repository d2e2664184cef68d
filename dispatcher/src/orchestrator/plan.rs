//! # Plan: what a task does next
//!
//! A pure function of the task's loaded rows: which steps to skip or start, and where the
//! task goes. [`super::apply`] carries a plan out in the transaction that loaded the rows.
//!
//! 1. Steps are grouped: a step and the `parallel` steps after it form a group.
//! 2. The first group that has not ended is the current one; each of its `Pending` steps
//!    whose attempt is not live is skipped (its condition says so, given whether an earlier
//!    group failed), left alone (waiting out a retry backoff), or started.
//! 3. When every group has ended the task ends: `Failed` if any step failed, else `Success`.
//! 4. A `Cancelling` task starts nothing: its steps that never started are cancelled, and
//!    once no attempt is live the task is `Cancelled`.

use chrono::{DateTime, Utc};
use gantry_shared::process::{Condition, StepKind, group_ranges};
use gantry_shared::states::{AttemptState, StepState, TaskState};

/// What `plan` needs of one step run (in the task's order).
#[derive(Clone, Debug)]
pub struct StepRow {
    pub name: String,
    pub kind: StepKind,
    pub parallel: bool,
    pub condition: Condition,
    pub has_mutex: bool,
    pub state: StepState,
    /// The current attempt's number (0: none yet).
    pub attempt: u32,
    pub attempt_state: Option<AttemptState>,
    /// A retry's backoff: not started before this.
    pub not_before: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

impl StepRow {
    fn attempt_live(&self) -> bool {
        self.attempt > 0 && self.attempt_state.is_some_and(|s| !s.is_final())
    }
}

/// How a step starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A job to route and publish.
    Job,
    /// A job that first waits for its mutex.
    Mutex,
    /// A manual step: it waits for a decision through the API.
    Manual,
    /// An e-mail step, sent by the dispatcher.
    Email,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The step's condition rules it out.
    Skip { step: usize, reason: String },
    /// Start the step: attempt `attempt` (a manual step keeps attempt 0).
    Start {
        step: usize,
        attempt: u32,
        how: Start,
    },
    /// The task is being cancelled and this step never started.
    Cancel { step: usize },
}

/// Where the task goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskMove {
    /// Still in progress, now in this state (`Executing` or `Waiting`).
    To(TaskState),
    /// Ended (`Success`, `Failed` or `Cancelled`).
    End {
        state: TaskState,
        error: Option<String>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub task: Option<TaskMove>,
}

/// Decide what a task in state `task` with these steps does next.
pub fn plan(task: TaskState, steps: &[StepRow], now: DateTime<Utc>) -> Plan {
    if task.is_terminal() {
        return Plan::default();
    }
    if task == TaskState::Cancelling {
        return plan_cancel(steps);
    }
    let mut view: Vec<StepRow> = steps.to_vec();
    let mut actions = Vec::new();
    let mut first_failure: Option<usize> = None;
    let mut in_progress = false;
    let mut started_any = false;
    for group in group_ranges(view.iter().map(|s| s.parallel)) {
        for i in group.clone() {
            let step = &mut view[i];
            if step.state != StepState::Pending || step.attempt_live() {
                continue;
            }
            let skip = match (step.condition, first_failure) {
                (Condition::Success, Some(f)) => Some(format!(
                    "skipped: an earlier step ({}) failed and this step runs only on success",
                    steps[f].name
                )),
                (Condition::Failure, None) => {
                    Some("skipped: condition = \"failure\" and no earlier step failed".to_owned())
                }
                _ => None,
            };
            if let Some(reason) = skip {
                actions.push(Action::Skip { step: i, reason });
                step.state = StepState::Skipped;
                continue;
            }
            if step.not_before.is_some_and(|t| t > now) {
                // Waiting out a retry backoff; the sweep brings it back when due.
                continue;
            }
            started_any = true;
            let (how, attempt, state, attempt_state) = match step.kind {
                StepKind::Manual => (Start::Manual, step.attempt, StepState::Waiting, None),
                StepKind::Email => (
                    Start::Email,
                    step.attempt + 1,
                    StepState::Running,
                    Some(AttemptState::Running),
                ),
                StepKind::Script if step.has_mutex => (
                    Start::Mutex,
                    step.attempt + 1,
                    StepState::Waiting,
                    Some(AttemptState::Waiting),
                ),
                StepKind::Script => (
                    Start::Job,
                    step.attempt + 1,
                    StepState::Pending,
                    Some(AttemptState::Pending),
                ),
            };
            actions.push(Action::Start {
                step: i,
                attempt,
                how,
            });
            step.attempt = attempt;
            step.state = state;
            step.attempt_state = attempt_state.or(step.attempt_state);
        }
        let ended = view[group.clone()].iter().all(|s| s.state.is_final());
        if !ended {
            in_progress = true;
            break;
        }
        if first_failure.is_none() {
            first_failure = group.clone().find(|&i| view[i].state.is_failure());
        }
    }
    let task_move = if in_progress {
        // `Waiting` while a manual step waits for its decision, `Executing` otherwise.
        let awaiting = view
            .iter()
            .any(|s| s.state == StepState::Waiting && s.kind == StepKind::Manual);
        match (awaiting, task) {
            (true, TaskState::Waiting) => None,
            (true, _) => Some(TaskMove::To(TaskState::Waiting)),
            (false, TaskState::Waiting) => Some(TaskMove::To(TaskState::Executing)),
            (false, TaskState::Queued) if started_any => Some(TaskMove::To(TaskState::Executing)),
            _ => None,
        }
    } else {
        Some(match first_failure {
            Some(f) => TaskMove::End {
                state: TaskState::Failed,
                error: Some(format!(
                    "step {} {}",
                    steps[f].name,
                    steps[f].reason.as_deref().unwrap_or("failed")
                )),
            },
            None => TaskMove::End {
                state: TaskState::Success,
                error: None,
            },
        })
    };
    Plan {
        actions,
        task: task_move,
    }
}

fn plan_cancel(steps: &[StepRow]) -> Plan {
    let actions = steps
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            matches!(s.state, StepState::Pending | StepState::Waiting) && !s.attempt_live()
        })
        .map(|(step, _)| Action::Cancel { step })
        .collect();
    let live = steps.iter().any(StepRow::attempt_live);
    Plan {
        actions,
        task: (!live).then(|| TaskMove::End {
            state: TaskState::Cancelled,
            error: Some("cancelled".into()),
        }),
    }
}

#[cfg(test)]
mod tests;
