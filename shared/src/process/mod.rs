//! # Deployment processes
//!
//! The process file (TOML; the API takes the same shape as JSON) and the checks made at
//! submission, before anything is stored. Every problem is a [`ValidationError`] naming the
//! field (`steps[1].script`, `variables.DbPassword`), which the API returns as a 400.
//! Checks that need the database (does the pool exist?) are the dispatcher's.
//!
//! This file holds the types and limits; `validate` holds the checks
//! ([`Process::validate`], [`check_artifact_globs`], [`is_valid_step_name`]).

mod validate;

pub use validate::{check_artifact_globs, is_valid_step_name};

use crate::wire::Syntax;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest script accepted (bytes).
pub const MAX_SCRIPT_BYTES: usize = 1024 * 1024;
/// Most steps in one process.
pub const MAX_STEPS: usize = 500;
/// Most attempts after the first.
pub const MAX_RETRIES: u32 = 5;
/// Sensitive values this short would mask common words; refused at submission.
pub const MIN_SENSITIVE_LEN: usize = 4;
/// Most `artifacts` globs in one step.
pub const MAX_ARTIFACT_GLOBS: usize = 100;
/// Longest `timeout_secs` and `mutex_timeout_secs`: a week.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// A deployment process: named, ordered steps and their variables.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub name: String,
    #[serde(default)]
    pub variables: BTreeMap<String, VariableValue>,
    pub steps: Vec<StepSpec>,
}

/// A variable: a plain value (`Name = "x"`, numbers and booleans as their text) or a table
/// `{ value = "x", sensitive = true }`.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum VariableValue {
    Plain(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    Detailed(DetailedValue),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedValue {
    pub value: String,
    #[serde(default)]
    pub sensitive: bool,
}

impl<'de> Deserialize<'de> for VariableValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const SHAPE: &str =
            "a variable is a string, a number, a boolean, or { value = \"...\", sensitive = true }";
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Self::Plain(s)),
            serde_json::Value::Bool(b) => Ok(Self::Bool(b)),
            serde_json::Value::Number(n) => Ok(match n.as_i64() {
                Some(i) => Self::Integer(i),
                None => Self::Float(n.as_f64().unwrap_or_default()),
            }),
            serde_json::Value::Object(mut m) => {
                if let Some(k) = m.keys().find(|k| *k != "value" && *k != "sensitive") {
                    return Err(D::Error::custom(format!("unknown field `{k}`: {SHAPE}")));
                }
                let value = match m.remove("value") {
                    Some(serde_json::Value::String(v)) => v,
                    Some(_) => return Err(D::Error::custom("`value` must be a string")),
                    None => return Err(D::Error::custom(format!("missing `value`: {SHAPE}"))),
                };
                let sensitive = match m.remove("sensitive") {
                    None => false,
                    Some(serde_json::Value::Bool(b)) => b,
                    Some(_) => return Err(D::Error::custom("`sensitive` must be true or false")),
                };
                Ok(Self::Detailed(DetailedValue { value, sensitive }))
            }
            _ => Err(D::Error::custom(SHAPE)),
        }
    }
}

impl VariableValue {
    pub fn value(&self) -> String {
        match self {
            VariableValue::Plain(s) => s.clone(),
            VariableValue::Integer(i) => i.to_string(),
            VariableValue::Float(f) => f.to_string(),
            VariableValue::Bool(b) => b.to_string(),
            VariableValue::Detailed(d) => d.value.clone(),
        }
    }
    pub fn is_sensitive(&self) -> bool {
        matches!(self, VariableValue::Detailed(d) if d.sensitive)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    #[default]
    Script,
    Manual,
    Email,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// A worker of the step's pool (the default pool when none is named).
    #[default]
    Pool,
    /// The built-in worker of a dispatcher node.
    Server,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// Run only while no earlier step has failed.
    #[default]
    Success,
    /// Run only when an earlier step failed.
    Failure,
    /// Run whatever happened before.
    Always,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Success => "success",
            Condition::Failure => "failure",
            Condition::Always => "always",
        }
    }
}

/// A spec field stored in a column of its own as its serde name (`step_runs.kind`,
/// `step_runs.run_condition`), decoded through serde so the names live in one place.
#[cfg(feature = "sqlx")]
macro_rules! sqlx_text_enum {
    ($name:ident) => {
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s);
                Ok(<$name as Deserialize>::deserialize(de)?)
            }
        }
    };
}
#[cfg(feature = "sqlx")]
sqlx_text_enum!(StepKind);
#[cfg(feature = "sqlx")]
sqlx_text_enum!(Condition);

/// `cancel_grace_secs` when a step does not set it.
pub const DEFAULT_CANCEL_GRACE_SECS: u64 = 5;
/// The largest `cancel_grace_secs`.
pub const MAX_CANCEL_GRACE_SECS: u64 = 3600;

/// One step of a process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    #[serde(default)]
    pub kind: StepKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub syntax: Syntax,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL when the step is stopped (timeout or cancel);
    /// [`DEFAULT_CANCEL_GRACE_SECS`] when absent, at most [`MAX_CANCEL_GRACE_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_grace_secs: Option<u64>,
    #[serde(default)]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutex_timeout_secs: Option<u64>,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub parallel: bool,
    #[serde(default)]
    pub condition: Condition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// A submission problem, with the field it is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

impl Process {
    /// Parse a process file.
    pub fn from_toml(text: &str) -> Result<Self, ValidationError> {
        toml::from_str(text).map_err(|e| invalid("process", e.message().to_owned()))
    }

    /// The steps grouped for execution: a group is a step and the `parallel` steps after it.
    pub fn groups(&self) -> Vec<std::ops::Range<usize>> {
        group_ranges(self.steps.iter().map(|s| s.parallel))
    }
}

/// Group consecutive indices: a new group starts at every step that is not `parallel`.
pub fn group_ranges(parallel: impl IntoIterator<Item = bool>) -> Vec<std::ops::Range<usize>> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, p) in parallel.into_iter().enumerate() {
        match groups.last_mut() {
            Some(g) if p => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    groups
}
#[cfg(test)]
mod tests;
