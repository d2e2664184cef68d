//! Typed identifiers. Every id is a UUID (v7 for new records, so they sort by creation time);
//! the newtypes keep a task id from being passed where a step run id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

id_type!(
    /// A task: one run of a deployment process.
    TaskId
);
id_type!(
    /// One step of one task (its attempts share this id).
    StepRunId
);
id_type!(
    /// A registered worker (agent).
    WorkerId
);
id_type!(
    /// A worker pool.
    PoolId
);
id_type!(
    /// One publication of an attempt. Re-publishing an unclaimed attempt gives it a new job id
    /// and voids the old one.
    JobId
);
id_type!(
    /// An API key's record id (not the key itself).
    ApiKeyId
);
id_type!(
    /// Chosen by an agent for one delivery; repeating a claim with the same claim id is
    /// idempotent, a different one is refused.
    ClaimId
);
id_type!(
    /// A stored artifact (one file uploaded by one attempt).
    ArtifactId
);
