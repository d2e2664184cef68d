//! Steps the dispatcher runs itself: a manual step waits for a decision through the API; an
//! e-mail step is rendered, stored, then sent over SMTP after the commit.

use super::advance::{StepRecord, TaskRecord};
use super::{Inner, facts, schedule};
use crate::logs;
use crate::transitions::{self, StepState};
use gantry_shared::ids::{JobId, StepRunId};
use gantry_shared::template;
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `#{...}` in a field the dispatcher itself uses (instructions, an e-mail): values
/// substituted, sensitive ones as `********`, unknown ones left as written.
pub(super) fn render_field(
    text: &str,
    values: &BTreeMap<String, String>,
    sensitive: &[String],
) -> String {
    template::render(text, |name| {
        Some(if sensitive.iter().any(|s| s == name) {
            gantry_shared::mask::MASK.to_owned()
        } else {
            values
                .get(name)
                .cloned()
                .unwrap_or_else(|| format!("#{{{name}}}"))
        })
    })
    .unwrap_or_else(|_| text.to_owned())
}

/// A manual step reached: its approval row (instructions rendered) and the step `Waiting`
/// for the decision; it runs nothing anywhere.
pub(super) async fn await_approval(
    tx: &mut PgConnection,
    task: &TaskRecord,
    step: &StepRecord,
) -> anyhow::Result<()> {
    let facts = facts::load(tx, step, false).await?;
    let (values, sensitive) = facts.values.visible(task, &step.name, 0);
    let instructions = render_field(
        facts.spec.instructions.as_deref().unwrap_or(""),
        &values,
        &sensitive,
    );
    sqlx::query(
        "INSERT INTO approvals (step_run_id, task_id, instructions)
         VALUES ($1, $2, $3) ON CONFLICT (step_run_id) DO NOTHING",
    )
    .bind(step.id)
    .bind(task.id.0)
    .bind(&instructions)
    .execute(&mut *tx)
    .await?;
    transitions::step_waits(
        tx,
        StepRunId(step.id),
        "approval",
        Some(&[StepState::Pending]),
    )
    .await?;
    logs::append_system(
        tx,
        task.id,
        Some((StepRunId(step.id), 0)),
        &format!(
            "Step {name} waits for approval: {instructions}\n  approve: gantry approve {task} {name} [--note TEXT]\n  reject:  gantry reject {task} {name} [--note TEXT]",
            name = step.name,
            task = task.id
        ),
    )
    .await?;
    Ok(())
}

/// An e-mail step reached: its attempt (`Running` on the dispatcher) and its rendered
/// message, stored before anything is sent.
pub(super) async fn prepare_email(
    tx: &mut PgConnection,
    task: &TaskRecord,
    step: &StepRecord,
    attempt: u32,
) -> anyhow::Result<crate::email::Outgoing> {
    let facts = facts::load(tx, step, false).await?;
    let spec = &facts.spec;
    let (values, sensitive) = facts.values.visible(task, &step.name, attempt);
    let render = |t: &str| render_field(t, &values, &sensitive);
    let to: Vec<String> = spec
        .to
        .iter()
        .map(|a| render(a).trim().to_owned())
        .collect();
    let subject = render(spec.subject.as_deref().unwrap_or(""));
    let body = render(spec.body.as_deref().unwrap_or(""));
    let step_run = StepRunId(step.id);
    transitions::create_attempt(
        tx,
        step_run,
        attempt,
        JobId::new(),
        transitions::Start::Dispatcher("dispatcher (e-mail)"),
    )
    .await?;
    sqlx::query(
        "INSERT INTO emails (step_run_id, attempt, to_addrs, subject, body) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(step.id)
    .bind(attempt as i32)
    .bind(&to)
    .bind(&subject)
    .bind(&body)
    .execute(&mut *tx)
    .await?;
    logs::append_system(
        tx,
        task.id,
        Some((step_run, attempt)),
        &format!(
            "Step {} sends an e-mail to {}: {subject}",
            step.name,
            to.join(", ")
        ),
    )
    .await?;
    Ok(crate::email::Outgoing {
        task: task.id,
        step_run,
        attempt,
        to,
        subject,
        body,
    })
}

/// Send an e-mail step's message in the background (at most once at a time per attempt on
/// this node) and end its attempt with the outcome.
pub(super) fn spawn_email(inner: &Arc<Inner>, m: crate::email::Outgoing) {
    let key = (m.step_run, m.attempt);
    if !inner.publishing.lock().expect("lock").insert(key) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        match crate::email::send_and_record(&inner.db, &inner.mailer, &m, inner.retry_base).await {
            Ok(task) => schedule::kick(&inner, task),
            Err(e) => {
                tracing::warn!(error = %e, step_run = %m.step_run, "could not record an e-mail's outcome; the sweep will send it again")
            }
        }
        inner.publishing.lock().expect("lock").remove(&key);
    });
}
