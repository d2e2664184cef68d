use super::*;
use chrono::Duration;

fn step(name: &str) -> StepRow {
    StepRow {
        name: name.into(),
        kind: StepKind::Script,
        parallel: false,
        condition: Condition::Success,
        has_mutex: false,
        state: StepState::Pending,
        attempt: 0,
        attempt_state: None,
        not_before: None,
        reason: None,
    }
}

fn ended(name: &str, state: StepState) -> StepRow {
    StepRow {
        state,
        attempt: 1,
        attempt_state: Some(match state {
            StepState::Success => AttemptState::Success,
            StepState::TimedOut => AttemptState::TimedOut,
            StepState::WorkerLost => AttemptState::WorkerLost,
            StepState::Cancelled => AttemptState::Cancelled,
            _ => AttemptState::Failed,
        }),
        reason: (state != StepState::Success).then(|| "failed with exit code 1".into()),
        ..step(name)
    }
}

fn running(name: &str) -> StepRow {
    StepRow {
        state: StepState::Running,
        attempt: 1,
        attempt_state: Some(AttemptState::Running),
        ..step(name)
    }
}

fn parallel(mut s: StepRow) -> StepRow {
    s.parallel = true;
    s
}

fn when(mut s: StepRow, c: Condition) -> StepRow {
    s.condition = c;
    s
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn start(step: usize, attempt: u32, how: Start) -> Action {
    Action::Start { step, attempt, how }
}

#[test]
fn a_new_task_starts_its_first_step_and_executes() {
    let p = plan(TaskState::Queued, &[step("a"), step("b")], now());
    assert_eq!(p.actions, vec![start(0, 1, Start::Job)]);
    assert_eq!(p.task, Some(TaskMove::To(TaskState::Executing)));
}

#[test]
fn the_next_step_starts_once_the_previous_succeeded() {
    let p = plan(
        TaskState::Executing,
        &[ended("a", StepState::Success), step("b")],
        now(),
    );
    assert_eq!(p.actions, vec![start(1, 1, Start::Job)]);
    assert_eq!(p.task, None, "already executing");
}

#[test]
fn nothing_starts_while_a_step_runs() {
    let p = plan(TaskState::Executing, &[running("a"), step("b")], now());
    assert_eq!(p, Plan::default());
}

#[test]
fn a_parallel_group_starts_together_and_waits_for_all() {
    let steps = [
        step("a"),
        parallel(step("b")),
        parallel(step("c")),
        step("d"),
    ];
    let p = plan(TaskState::Queued, &steps, now());
    assert_eq!(
        p.actions,
        vec![
            start(0, 1, Start::Job),
            start(1, 1, Start::Job),
            start(2, 1, Start::Job)
        ]
    );
    let steps = [
        ended("a", StepState::Success),
        parallel(running("b")),
        parallel(ended("c", StepState::Success)),
        step("d"),
    ];
    assert_eq!(plan(TaskState::Executing, &steps, now()), Plan::default());
}

#[test]
fn a_failure_skips_success_steps_and_runs_failure_and_always_steps() {
    let steps = [
        ended("a", StepState::Failed),
        step("b"),
        when(step("c"), Condition::Failure),
        when(step("d"), Condition::Always),
    ];
    let p = plan(TaskState::Executing, &steps, now());
    assert_eq!(
        p.actions,
        vec![
            Action::Skip {
                step: 1,
                reason: "skipped: an earlier step (a) failed and this step runs only on success"
                    .into()
            },
            start(2, 1, Start::Job),
        ]
    );
    assert_eq!(p.task, None);
}

#[test]
fn a_failure_step_is_skipped_when_nothing_failed() {
    let steps = [
        ended("a", StepState::Success),
        when(step("b"), Condition::Failure),
    ];
    let p = plan(TaskState::Executing, &steps, now());
    assert_eq!(
        p.actions,
        vec![Action::Skip {
            step: 1,
            reason: "skipped: condition = \"failure\" and no earlier step failed".into()
        }]
    );
    assert_eq!(
        p.task,
        Some(TaskMove::End {
            state: TaskState::Success,
            error: None
        }),
        "skipped steps end the task in the same plan"
    );
}

#[test]
fn the_task_fails_naming_its_first_failed_step() {
    let steps = [
        ended("a", StepState::TimedOut),
        when(ended("b", StepState::Failed), Condition::Always),
    ];
    let p = plan(TaskState::Executing, &steps, now());
    assert_eq!(
        p.task,
        Some(TaskMove::End {
            state: TaskState::Failed,
            error: Some("step a failed with exit code 1".into())
        })
    );
}

#[test]
fn a_failure_inside_a_parallel_group_counts_after_the_group() {
    // b fails while c (same group) still runs: d must wait for c, then be skipped.
    let steps = [
        step("a"),
        parallel(ended("b", StepState::Failed)),
        parallel(running("c")),
        step("d"),
    ];
    let p = plan(TaskState::Executing, &steps, now());
    assert_eq!(p.actions, vec![start(0, 1, Start::Job)]);
    let steps = [
        ended("a", StepState::Success),
        parallel(ended("b", StepState::Failed)),
        parallel(ended("c", StepState::Success)),
        step("d"),
    ];
    let p = plan(TaskState::Executing, &steps, now());
    assert!(matches!(p.actions[..], [Action::Skip { step: 3, .. }]));
    assert!(matches!(
        p.task,
        Some(TaskMove::End {
            state: TaskState::Failed,
            ..
        })
    ));
}

#[test]
fn a_retry_waits_out_its_backoff_then_starts_the_next_attempt() {
    let mut retry = ended("a", StepState::Failed);
    retry.state = StepState::Pending;
    retry.not_before = Some(now() + Duration::seconds(5));
    let p = plan(TaskState::Executing, std::slice::from_ref(&retry), now());
    assert_eq!(p, Plan::default(), "not due yet");
    retry.not_before = Some(now() - Duration::seconds(1));
    let p = plan(TaskState::Executing, &[retry], now());
    assert_eq!(p.actions, vec![start(0, 2, Start::Job)]);
}

#[test]
fn a_live_attempt_is_never_started_twice() {
    let mut s = step("a");
    s.attempt = 1;
    s.attempt_state = Some(AttemptState::Pending);
    assert_eq!(
        plan(TaskState::Executing, &[s.clone()], now()),
        Plan::default()
    );
    s.attempt_state = Some(AttemptState::Queued);
    assert_eq!(plan(TaskState::Executing, &[s], now()), Plan::default());
}

#[test]
fn mutex_email_and_manual_steps_start_their_own_way() {
    let mut m = step("m");
    m.has_mutex = true;
    let mut e = step("e");
    e.kind = StepKind::Email;
    let mut a = step("a");
    a.kind = StepKind::Manual;
    let steps = [m, parallel(e), parallel(a)];
    let p = plan(TaskState::Queued, &steps, now());
    assert_eq!(
        p.actions,
        vec![
            start(0, 1, Start::Mutex),
            start(1, 1, Start::Email),
            start(2, 0, Start::Manual)
        ]
    );
    assert_eq!(
        p.task,
        Some(TaskMove::To(TaskState::Waiting)),
        "a manual step waiting for its decision makes the task wait"
    );
}

#[test]
fn a_decided_manual_step_lets_the_task_execute_again() {
    let mut a = ended("a", StepState::Success);
    a.kind = StepKind::Manual;
    a.attempt = 0;
    a.attempt_state = None;
    let p = plan(TaskState::Waiting, &[a, step("b")], now());
    assert_eq!(p.actions, vec![start(1, 1, Start::Job)]);
    assert_eq!(p.task, Some(TaskMove::To(TaskState::Executing)));
}

#[test]
fn a_waiting_manual_step_keeps_the_task_waiting() {
    let mut a = step("a");
    a.kind = StepKind::Manual;
    a.state = StepState::Waiting;
    assert_eq!(plan(TaskState::Waiting, &[a], now()), Plan::default());
}

#[test]
fn cancelling_cancels_unstarted_steps_and_ends_when_nothing_is_live() {
    let mut waiting_worker = step("w");
    waiting_worker.state = StepState::Waiting;
    let steps = [running("a"), step("b"), waiting_worker];
    let p = plan(TaskState::Cancelling, &steps, now());
    assert_eq!(
        p.actions,
        vec![Action::Cancel { step: 1 }, Action::Cancel { step: 2 }]
    );
    assert_eq!(p.task, None, "a is still running");
    let steps = [ended("a", StepState::Cancelled), step("b")];
    let p = plan(TaskState::Cancelling, &steps, now());
    assert_eq!(p.actions, vec![Action::Cancel { step: 1 }]);
    assert_eq!(
        p.task,
        Some(TaskMove::End {
            state: TaskState::Cancelled,
            error: Some("cancelled".into())
        })
    );
}

#[test]
fn a_cancelling_task_keeps_a_pending_step_whose_job_is_out() {
    let mut s = step("a");
    s.attempt = 1;
    s.attempt_state = Some(AttemptState::Queued);
    s.state = StepState::Queued;
    let p = plan(TaskState::Cancelling, &[s], now());
    assert_eq!(
        p,
        Plan::default(),
        "its attempt is live: cancelled through it"
    );
}

#[test]
fn an_ended_task_plans_nothing() {
    for t in [TaskState::Success, TaskState::Failed, TaskState::Cancelled] {
        assert_eq!(plan(t, &[step("a")], now()), Plan::default());
    }
}

#[test]
fn an_empty_task_succeeds() {
    assert_eq!(
        plan(TaskState::Queued, &[], now()).task,
        Some(TaskMove::End {
            state: TaskState::Success,
            error: None
        })
    );
}
