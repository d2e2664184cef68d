//! An event PostgreSQL refuses with an error that is not transient: its attempt fails with the
//! reason (and its script is stopped), and the event is dead-lettered.

use super::{Handled, Release, ResultConsumer};
use crate::attempts;
use crate::senders::Sender;
use gantry_shared::wire::Event;

impl ResultConsumer {
    /// Fail the attempt of an event that can never be stored, if the event comes from the
    /// attempt's current claimant and the attempt still runs (anything else changes nothing).
    pub(super) async fn fail_unstorable(
        &self,
        event: &Event,
        sender: &Sender,
        reason: &str,
    ) -> Result<Handled, sqlx::Error> {
        let origin = event.origin();
        let mut tx = self.db.begin().await?;
        let Some(locked) = attempts::lock(&mut tx, origin.step_run_id, origin.attempt).await?
        else {
            return Ok(Handled::Done(None, None));
        };
        let claimant = self
            .attribution
            .worker(sender, origin.worker_id, || locked.claimant_builtin)
            .ok()
            .filter(|w| locked.is_claimant(origin.job_id, *w));
        let Some(claimant) =
            claimant.filter(|_| locked.state == crate::transitions::AttemptState::Running)
        else {
            return Ok(Handled::Done(None, None));
        };
        self.finish(
            &mut tx,
            &locked,
            origin.step_run_id,
            origin.attempt,
            "Failed",
            Some(reason),
            None,
        )
        .await?;
        attempts::wake(&mut tx, locked.task()).await?;
        tx.commit().await?;
        // Its script has no reason to go on: stop it (what it sends later is stale).
        self.orchestrator
            .cancel_running(claimant, origin.step_run_id, origin.attempt)
            .await;
        let release = match (&locked.mutex, locked.mutex_token) {
            (Some(mutex), Some(token)) => Some(Release {
                mutex: mutex.clone(),
                step_run: origin.step_run_id,
                attempt: origin.attempt,
                token: token as u64,
            }),
            _ => None,
        };
        Ok(Handled::Done(Some(locked.task()), release))
    }
}

/// The attempt's error when one of its events can never be stored.
pub(super) fn unstorable_reason(kind: &str, e: &sqlx::Error) -> String {
    let what = match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    };
    let what = crate::logs::storable(&what).into_owned();
    format!("a {kind} event from its agent could not be stored: {what}")
}
