//! # States and their transitions
//!
//! Every state a record can be in, as an enum, and for each state machine the one table of
//! allowed transitions: `sources(to)` lists the states a record may leave to enter `to`.
//! The dispatcher's `transitions` module writes state columns only through these tables
//! (as compare-and-set statements whose `WHERE state = ANY(...)` comes from `sources`), and
//! the database refuses any other change with a trigger generated from the same pairs
//! (migration `20261201000003_states.sql`; `tests/tests/states.rs` checks that the two agree
//! pair by pair).
//!
//! Staying in a state is not a transition: an update that keeps the state (a new job id for
//! a `Pending` attempt, say) is always allowed.
//!
//! In the database every state is `text` with a `CHECK` naming the variants; here each enum
//! converts to and from exactly those strings (`as_str`, `FromStr`, serde), and with the
//! `sqlx` feature (the dispatcher's) it binds and decodes as text.

use std::fmt;
use std::str::FromStr;

/// A string that names no variant of the state enum being parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} state {value:?} is not one of {expected}")]
pub struct UnknownState {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// What the `state_enum!` macro derives from an enum's variants.
pub trait Variants: Copy + Eq + fmt::Debug + 'static {
    /// Every variant, in the order of the state diagram.
    const ALL: &'static [Self];
    /// The machine's name, as the database trigger reports it.
    const MACHINE: &'static str;
    fn as_str(self) -> &'static str;
}

/// One state machine: its variants, and the one table of its transitions.
pub trait State: Variants {
    /// States a record may leave to enter `to` (empty: only at creation).
    fn sources(to: Self) -> &'static [Self];
    /// States a record may be created in.
    fn initial() -> &'static [Self];
    /// Whether `from → to` is allowed (staying put always is).
    fn allows(from: Self, to: Self) -> bool {
        from == to || Self::sources(to).contains(&from)
    }
    /// No transition leaves this state.
    fn is_final(self) -> bool {
        Self::ALL
            .iter()
            .all(|&to| to == self || !Self::sources(to).contains(&self))
    }
    /// Every allowed `(from, to)` pair with `from != to`.
    fn transitions() -> Vec<(Self, Self)> {
        Self::ALL
            .iter()
            .flat_map(|&to| Self::sources(to).iter().map(move |&from| (from, to)))
            .collect()
    }
}

macro_rules! state_enum {
    ($(#[$doc:meta])* $name:ident, $machine:literal, [$($variant:ident),+ $(,)?]) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }
            /// The strings of several states, for binding as a `text[]`.
            pub fn strs(states: &[Self]) -> Vec<&'static str> {
                states.iter().map(|s| s.as_str()).collect()
            }
            /// Several states as SQL literals, `'A', 'B'`, for `state IN (...)` written into
            /// a statement's text: a generic plan matches a partial index's condition only
            /// against literals, never against a bound parameter.
            pub fn sql_list(states: &[Self]) -> String {
                states
                    .iter()
                    .map(|s| format!("'{}'", s.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }

        impl Variants for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            const MACHINE: &'static str = $machine;
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $(stringify!($variant) => Ok($name::$variant),)+
                    _ => Err(UnknownState {
                        what: $machine,
                        value: s.chars().take(64).collect(),
                        expected: [$(stringify!($variant)),+].join(", "),
                    }),
                }
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        #[cfg(feature = "sqlx")]
        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(s.parse::<$name>()?)
            }
        }
    };
}

state_enum!(
    /// A task: `Queued` until its first step starts, `Executing`, `Waiting` while a manual
    /// step waits for its decision, `Cancelling` until its live attempts have ended.
    TaskState,
    "task",
    [Queued, Executing, Waiting, Cancelling, Success, Failed, Cancelled]
);

state_enum!(
    /// A step run: mirrors its current attempt while one is live (`Queued`, `Running`),
    /// `Waiting` for a mutex, a healthy worker or an approval, and ends in its outcome or
    /// `Skipped`. A failed attempt with retries left puts it back to `Pending`.
    StepState,
    "step run",
    [Pending, Waiting, Queued, Running, Success, Failed, TimedOut, Cancelled, WorkerLost, Skipped]
);

state_enum!(
    /// One try at a step (see the dispatcher's `attempts` module).
    AttemptState,
    "attempt",
    [Waiting, Pending, Queued, Running, Success, Failed, TimedOut, Cancelled, WorkerLost]
);

state_enum!(
    /// A worker's health: the agent's own verdict (`Healthy`, `HasWarnings`, `Unhealthy`),
    /// or the dispatcher's (`Unavailable`: no heartbeat for `unavailable_after`).
    WorkerHealth,
    "worker health",
    [Healthy, HasWarnings, Unhealthy, Unavailable]
);

state_enum!(
    /// An artifact: its chunks arriving, then checked against the agent's sha256.
    ArtifactState,
    "artifact",
    [Receiving, Stored, Corrupt]
);

impl State for TaskState {
    fn initial() -> &'static [Self] {
        &[Self::Queued]
    }
    fn sources(to: Self) -> &'static [Self] {
        use TaskState::*;
        match to {
            Queued => &[],
            Executing => &[Queued, Waiting],
            Waiting => &[Queued, Executing],
            Cancelling => &[Queued, Executing, Waiting],
            Success | Failed => &[Queued, Executing, Waiting],
            Cancelled => &[Cancelling],
        }
    }
}

impl State for StepState {
    fn initial() -> &'static [Self] {
        &[Self::Pending]
    }
    fn sources(to: Self) -> &'static [Self] {
        use StepState::*;
        match to {
            // A retry after a failed attempt, a voided job, a worker found again.
            Pending => &[Waiting, Queued, Running],
            // No worker yet, a mutex lost before the claim, or (while its attempt runs) the
            // agent's own wait for exclusive access.
            Waiting => &[Pending, Queued, Running],
            Queued => &[Pending],
            Running => &[Pending, Waiting, Queued],
            // An approval settles a waiting manual step; everything else ends running, or
            // before it ran (no worker, a route that can never work, a refused claim).
            Success | Failed => &[Pending, Waiting, Queued, Running],
            TimedOut | WorkerLost => &[Pending, Waiting, Queued, Running],
            Cancelled => &[Pending, Waiting, Queued, Running],
            Skipped => &[Pending],
        }
    }
}

impl State for AttemptState {
    fn initial() -> &'static [Self] {
        // `Waiting` for a mutex, `Pending` to be published, `Running` on the dispatcher (an
        // e-mail step).
        &[Self::Waiting, Self::Pending, Self::Running]
    }
    fn sources(to: Self) -> &'static [Self] {
        use AttemptState::*;
        match to {
            // The mutex was lost before the claim: wait for it again.
            Waiting => &[Pending, Queued],
            // Granted its mutex; a voided job about to be published again.
            Pending => &[Waiting, Queued],
            Queued => &[Pending],
            // The claim accepts an attempt whose confirm has not been recorded yet.
            Running => &[Pending, Queued],
            Success => &[Running],
            // Before it ran: no worker in time, a route that never works, an altered job, a
            // mutex wait that timed out.
            Failed => &[Waiting, Pending, Queued, Running],
            TimedOut => &[Waiting, Running],
            Cancelled => &[Waiting, Pending, Queued, Running],
            WorkerLost => &[Running],
        }
    }
}

impl State for WorkerHealth {
    fn initial() -> &'static [Self] {
        Self::ALL
    }
    fn sources(_to: Self) -> &'static [Self] {
        // Health follows the checks and the heartbeats wherever they lead.
        Self::ALL
    }
}

impl State for ArtifactState {
    fn initial() -> &'static [Self] {
        &[Self::Receiving]
    }
    fn sources(to: Self) -> &'static [Self] {
        match to {
            Self::Receiving => &[],
            Self::Stored | Self::Corrupt => &[Self::Receiving],
        }
    }
}

impl TaskState {
    /// Ended: nothing changes any more (a final state of the table).
    pub fn is_terminal(self) -> bool {
        <Self as State>::is_final(self)
    }
}

impl AttemptState {
    /// Ended: a final state of the table, `Success` or one of [`AttemptState::FAILURES`].
    pub fn is_final(self) -> bool {
        <Self as State>::is_final(self)
    }
    /// Final states that count as a failure of the step.
    pub const FAILURES: [Self; 4] = [
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::WorkerLost,
    ];
    pub fn is_failure(self) -> bool {
        Self::FAILURES.contains(&self)
    }
    /// Not yet ended: holds (or waits for) a worker slot or a mutex.
    pub const LIVE: [Self; 4] = [Self::Waiting, Self::Pending, Self::Queued, Self::Running];
    /// The step run's state while this attempt is its current one.
    pub fn step_state(self) -> StepState {
        match self {
            Self::Waiting => StepState::Waiting,
            Self::Pending => StepState::Pending,
            Self::Queued => StepState::Queued,
            Self::Running => StepState::Running,
            Self::Success => StepState::Success,
            Self::Failed => StepState::Failed,
            Self::TimedOut => StepState::TimedOut,
            Self::Cancelled => StepState::Cancelled,
            Self::WorkerLost => StepState::WorkerLost,
        }
    }
    /// "failed with exit code 3", "timed out", ...
    pub fn describe(self, exit_code: Option<i32>, error: Option<&str>) -> String {
        let base = match self {
            Self::Success => "succeeded".to_owned(),
            Self::Failed => match exit_code {
                Some(code) => format!("failed with exit code {code}"),
                None => "failed".to_owned(),
            },
            Self::TimedOut => "timed out".to_owned(),
            Self::Cancelled => "was cancelled".to_owned(),
            Self::WorkerLost => "lost its worker".to_owned(),
            other => other.as_str().to_lowercase(),
        };
        match error {
            Some(e) if !e.is_empty() => format!("{base}: {e}"),
            _ => base,
        }
    }
}

impl StepState {
    /// Ended: nothing changes any more.
    pub fn is_final(self) -> bool {
        <Self as State>::is_final(self)
    }
    /// Ended in a way that counts as the step failing (`Skipped` does not).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::TimedOut | Self::Cancelled | Self::WorkerLost
        )
    }
}

impl WorkerHealth {
    /// May be given steps (when enabled too).
    pub fn is_usable(self) -> bool {
        matches!(self, Self::Healthy | Self::HasWarnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<S: State + FromStr<Err = UnknownState> + fmt::Display>() {
        for &s in S::ALL {
            assert_eq!(s.as_str().parse::<S>().unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
        }
        let err = "Bogus".parse::<S>().unwrap_err();
        assert_eq!(err.value, "Bogus");
    }

    #[test]
    fn every_state_roundtrips_through_its_string() {
        roundtrip::<TaskState>();
        roundtrip::<StepState>();
        roundtrip::<AttemptState>();
        roundtrip::<WorkerHealth>();
        roundtrip::<ArtifactState>();
    }

    /// Every pair not in the table is refused, every pair in it allowed.
    fn table_is_closed<S: State>() {
        for &from in S::ALL {
            for &to in S::ALL {
                let listed = S::sources(to).contains(&from);
                assert_eq!(
                    S::allows(from, to),
                    listed || from == to,
                    "{from:?} → {to:?}"
                );
            }
        }
    }

    #[test]
    fn only_listed_transitions_are_allowed() {
        table_is_closed::<TaskState>();
        table_is_closed::<StepState>();
        table_is_closed::<AttemptState>();
        table_is_closed::<WorkerHealth>();
        table_is_closed::<ArtifactState>();
        use AttemptState as A;
        assert!(!A::allows(A::Success, A::Running));
        assert!(!A::allows(A::Running, A::Queued));
        assert!(!A::allows(A::Queued, A::Success));
        assert!(!A::allows(A::Cancelled, A::Pending));
        assert!(A::allows(A::Pending, A::Running));
        use TaskState as T;
        assert!(!T::allows(T::Success, T::Executing));
        assert!(!T::allows(T::Executing, T::Cancelled));
        assert!(T::allows(T::Cancelling, T::Cancelled));
    }

    #[test]
    fn final_states_leave_nowhere() {
        // The final states the table gives are the ones the code means: a task's three ends,
        // and an attempt's success and failures.
        for &s in AttemptState::ALL {
            let expected = s == AttemptState::Success || AttemptState::FAILURES.contains(&s);
            assert_eq!(s.is_final(), expected, "{s:?}");
        }
        for &s in TaskState::ALL {
            let expected = matches!(
                s,
                TaskState::Success | TaskState::Failed | TaskState::Cancelled
            );
            assert_eq!(s.is_terminal(), expected, "{s:?}");
        }
        assert!(StepState::Skipped.is_final());
        assert!(StepState::Success.is_final());
        assert!(!StepState::Running.is_final());
        assert!(!<WorkerHealth as State>::is_final(
            WorkerHealth::Unavailable
        ));
        assert!(ArtifactState::Corrupt.is_final());
    }

    #[test]
    fn no_state_is_unreachable() {
        fn check<S: State>() {
            for &s in S::ALL {
                let reachable = S::initial().contains(&s) || !S::sources(s).is_empty();
                assert!(reachable, "{s:?} can be neither created nor entered");
            }
        }
        check::<TaskState>();
        check::<StepState>();
        check::<AttemptState>();
        check::<WorkerHealth>();
        check::<ArtifactState>();
    }

    #[test]
    fn an_attempt_moves_its_step_only_where_the_step_may_go() {
        for (from, to) in AttemptState::transitions() {
            let (sf, st) = (from.step_state(), to.step_state());
            assert!(
                StepState::allows(sf, st),
                "attempt {from:?} → {to:?} would move its step {sf:?} → {st:?}"
            );
        }
    }

    #[test]
    fn serde_uses_the_same_strings() {
        let json = serde_json::to_string(&AttemptState::WorkerLost).unwrap();
        assert_eq!(json, "\"WorkerLost\"");
        let back: AttemptState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, AttemptState::WorkerLost);
        assert!(serde_json::from_str::<TaskState>("\"Nope\"").is_err());
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            AttemptState::Failed.describe(Some(3), None),
            "failed with exit code 3"
        );
        assert_eq!(
            AttemptState::TimedOut.describe(None, Some("after 5s")),
            "timed out: after 5s"
        );
    }

    #[test]
    fn state_lists_are_written_as_sql_literals() {
        assert_eq!(
            AttemptState::sql_list(&[AttemptState::Pending, AttemptState::Queued]),
            "'Pending', 'Queued'"
        );
        assert_eq!(TaskState::sql_list(&[]), "");
    }
}
