//! # E-mail steps
//!
//! A `kind = "email"` step is run by the dispatcher node that owns its task, never by a
//! worker. When the orchestrator reaches it, it creates an attempt (`Running`, worker
//! `dispatcher`), renders `to`, `subject` and `body` (`#{...}` substituted, sensitive values
//! as `********`), stores the message in `emails` and, after the commit, sends it over SMTP
//! (`[smtp]` in the configuration). Success or failure ends the attempt like any other.
//!
//! Delivery is at least once: a node that dies between sending and recording it sends the
//! message again when it (or the task's next owner) finds it unrecorded.

use crate::attempts;
use crate::transitions::AttemptState;
use gantry_shared::config::SmtpSettings;
use gantry_shared::ids::{StepRunId, TaskId};
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sqlx::PgPool;
use std::time::Duration;

/// One message to send for one attempt.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub task: TaskId,
    pub step_run: StepRunId,
    pub attempt: u32,
    pub to: Vec<String>,
    pub subject: String,
    pub body: String,
}

/// The SMTP transport, built once from the settings.
#[derive(Clone)]
pub struct Mailer {
    transport: Result<AsyncSmtpTransport<Tokio1Executor>, String>,
    from: Result<Mailbox, String>,
}

impl Mailer {
    pub fn new(s: &SmtpSettings) -> Self {
        let transport = (|| {
            let builder = match s.tls.as_str() {
                "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&s.host),
                "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&s.host),
                _ => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
                    &s.host,
                )),
            }
            .map_err(|e| format!("smtp: {e}"))?;
            let mut builder = builder
                .port(s.port)
                .timeout(Some(Duration::from_secs(s.timeout_secs)));
            if let (Some(u), Some(p)) = (&s.username, &s.password) {
                builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
            }
            Ok(builder.build())
        })();
        let from = s
            .from
            .parse::<Mailbox>()
            .map_err(|e| format!("smtp.from {:?}: {e}", s.from));
        Self { transport, from }
    }

    /// Send one message; the error says why in words an operator can act on.
    pub async fn send(&self, m: &Outgoing) -> Result<(), String> {
        let transport = self.transport.as_ref().map_err(Clone::clone)?;
        let from = self.from.as_ref().map_err(Clone::clone)?;
        let mut builder = Message::builder()
            .from(from.clone())
            .subject(m.subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for to in &m.to {
            let mailbox = to
                .parse::<Mailbox>()
                .map_err(|e| format!("{to:?} is not an e-mail address: {e}"))?;
            builder = builder.to(mailbox);
        }
        let message = builder
            .body(m.body.clone())
            .map_err(|e| format!("cannot build the message: {e}"))?;
        transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| format!("the SMTP server did not take the message: {e}"))
    }
}

/// Send a message and end its attempt with the outcome; returns the task to wake.
pub async fn send_and_record(
    db: &PgPool,
    mailer: &Mailer,
    m: &Outgoing,
    retry_base: Duration,
) -> anyhow::Result<TaskId> {
    let outcome = mailer.send(m).await;
    let mut delay = Duration::from_millis(200);
    loop {
        match record(db, m, &outcome, retry_base).await {
            Ok(()) => return Ok(m.task),
            Err(e) if crate::db::is_transient(&e) && delay < Duration::from_secs(30) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn record(
    db: &PgPool,
    m: &Outgoing,
    outcome: &Result<(), String>,
    retry_base: Duration,
) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    let Some(locked) = attempts::lock(&mut tx, m.step_run, m.attempt).await? else {
        return Ok(());
    };
    if locked.state != AttemptState::Running {
        // Cancelled meanwhile: the message may have gone out, the attempt stays as it is.
        return Ok(());
    }
    sqlx::query(
        "UPDATE emails SET sent_at = CASE WHEN $3 IS NULL THEN now() END, error = $3
         WHERE step_run_id = $1 AND attempt = $2",
    )
    .bind(m.step_run.0)
    .bind(m.attempt as i32)
    .bind(outcome.as_ref().err())
    .execute(&mut *tx)
    .await?;
    match outcome {
        Ok(()) => {
            crate::logs::append_system(
                &mut tx,
                m.task,
                Some((m.step_run, m.attempt)),
                &format!("E-mail sent to {}", m.to.join(", ")),
            )
            .await?;
            attempts::conclude(
                &mut tx,
                &locked,
                m.step_run,
                m.attempt,
                AttemptState::Success,
                None,
                retry_base,
            )
            .await?;
        }
        Err(e) => {
            attempts::conclude(
                &mut tx,
                &locked,
                m.step_run,
                m.attempt,
                AttemptState::Failed,
                Some(&format!("could not send the e-mail: {e}")),
                retry_base,
            )
            .await?;
        }
    }
    tx.commit().await
}
