//! # Who sent a message: attribution by the broker, not by the body
//!
//! Every message an agent publishes carries `user_id`, which RabbitMQ checks against the
//! connection's login and refuses (406) when it differs. So `user_id` says which broker user
//! sent a message, and with per-worker users ([`crate::broker_users`]) which worker. The
//! `worker_id` in an event's or a heartbeat's body is believed only where it agrees:
//!
//! | sender (`user_id`) | management API set | development mode |
//! | --- | --- | --- |
//! | `<ns>.worker.<id>` | worker `<id>`; a body naming another worker is stale | the same |
//! | the dispatcher's own user | only for a built-in worker (they run inside dispatcher nodes) | the body's worker |
//! | anything else, or none | stale: nobody we know | the body's worker |
//!
//! In development mode every agent logs in as `amqp.url`'s user, so the body is all there is:
//! that mode trusts every agent, which `GET /api/health` and the start-up log say.

use gantry_shared::ids::WorkerId;

/// The broker user behind a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sender {
    /// A worker's own broker user.
    Worker(WorkerId),
    /// The dispatcher nodes' own user (also that of every agent in development mode).
    Dispatcher,
    /// Another user, or none (a message published without `user_id`).
    Other(Option<String>),
}

impl Sender {
    /// For logs and `stale_events.sender`.
    pub fn describe(&self) -> String {
        match self {
            Sender::Worker(w) => format!("worker {w}'s broker user"),
            Sender::Dispatcher => "the dispatcher's broker user".into(),
            Sender::Other(Some(u)) => format!("broker user {u:?}"),
            Sender::Other(None) => "a message without user_id".into(),
        }
    }
}

/// How this installation tells senders apart.
#[derive(Clone, Debug)]
pub struct Attribution {
    ns: String,
    /// The user of `amqp.url`: the dispatcher nodes' own.
    own_user: String,
    /// Per-worker broker users are in force (`amqp.management_url` is set).
    managed: bool,
}

impl Attribution {
    pub fn new(ns: &str, own_user: &str, managed: bool) -> Self {
        Self {
            ns: ns.to_owned(),
            own_user: own_user.to_owned(),
            managed,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn managed(&self) -> bool {
        self.managed
    }

    /// The `user_id` a sender had, as stored in `stale_events.sender`.
    pub fn user_of(&self, sender: &Sender) -> Option<String> {
        match sender {
            Sender::Worker(w) => Some(crate::broker_users::user_name(&self.ns, *w)),
            Sender::Dispatcher => Some(self.own_user.clone()),
            Sender::Other(u) => u.clone(),
        }
    }

    /// The sender of a message with this `user_id`.
    pub fn sender(&self, user_id: Option<&str>) -> Sender {
        match user_id {
            Some(u) => match crate::broker_users::worker_of(&self.ns, u) {
                Some(w) => Sender::Worker(w),
                None if u == self.own_user => Sender::Dispatcher,
                None => Sender::Other(Some(u.to_owned())),
            },
            None => Sender::Other(None),
        }
    }

    /// The worker a message from `sender` whose body names `body_worker` is attributed to,
    /// or why it is believed from nobody. `builtin` says whether `body_worker` is a built-in
    /// worker (only asked of messages from the dispatcher's own user).
    pub fn worker(
        &self,
        sender: &Sender,
        body_worker: WorkerId,
        builtin: impl FnOnce() -> bool,
    ) -> Result<WorkerId, String> {
        match sender {
            Sender::Worker(w) if *w == body_worker => Ok(*w),
            Sender::Worker(w) => Err(format!(
                "its body names worker {body_worker}, but RabbitMQ says worker {w}'s user sent it"
            )),
            Sender::Dispatcher if !self.managed || builtin() => Ok(body_worker),
            Sender::Dispatcher => Err(format!(
                "sent with the dispatcher's broker user for worker {body_worker}, which is not a built-in worker"
            )),
            Sender::Other(_) if !self.managed => Ok(body_worker),
            Sender::Other(Some(u)) => {
                Err(format!("sent by broker user {u:?}, which is no worker's"))
            }
            Sender::Other(None) => Err("sent without user_id, so by nobody known".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> WorkerId {
        WorkerId::new()
    }

    #[test]
    fn managed_installations_believe_the_broker_not_the_body() {
        let a = Attribution::new("gantry", "admin", true);
        let (me, other) = (w(), w());
        let mine = crate::broker_users::user_name("gantry", me);
        let s = a.sender(Some(&mine));
        assert_eq!(s, Sender::Worker(me));
        assert_eq!(a.worker(&s, me, || false), Ok(me));
        assert!(a.worker(&s, other, || false).is_err(), "a forged worker_id");
        let d = a.sender(Some("admin"));
        assert_eq!(d, Sender::Dispatcher);
        assert_eq!(a.worker(&d, other, || true), Ok(other), "a built-in worker");
        assert!(a.worker(&d, other, || false).is_err());
        assert!(a.worker(&a.sender(Some("guest")), me, || true).is_err());
        assert!(a.worker(&a.sender(None), me, || true).is_err());
        let foreign = crate::broker_users::user_name("other-ns", me);
        assert_eq!(
            a.sender(Some(&foreign)),
            Sender::Other(Some(foreign.clone()))
        );
    }

    #[test]
    fn development_mode_believes_bodies_but_not_contradictions() {
        let a = Attribution::new("gantry", "guest", false);
        let (me, other) = (w(), w());
        assert_eq!(a.worker(&a.sender(Some("guest")), me, || false), Ok(me));
        assert_eq!(a.worker(&a.sender(None), me, || false), Ok(me));
        let mine = a.sender(Some(&crate::broker_users::user_name("gantry", me)));
        assert!(a.worker(&mine, other, || false).is_err());
    }
}
