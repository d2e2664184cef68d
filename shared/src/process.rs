//! # Deployment processes
//!
//! The process file (TOML; the API takes the same shape as JSON) and the checks made at
//! submission, before anything is stored. Every problem is a [`ValidationError`] naming the
//! field (`steps[1].script`, `variables.DbPassword`), which the API returns as a 400.
//! Checks that need the database (does the pool exist?) are the dispatcher's.

use crate::template;
use crate::wire::Syntax;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

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

/// `artifacts = [globs]`: each a valid glob, relative to the step's working directory, never
/// reaching above it.
pub fn check_artifact_globs(globs: &[String]) -> Result<(), String> {
    if globs.len() > MAX_ARTIFACT_GLOBS {
        return Err(format!("at most {MAX_ARTIFACT_GLOBS} globs"));
    }
    for g in globs {
        if g.trim().is_empty() {
            return Err("a glob must not be empty".into());
        }
        if g.starts_with('/') {
            return Err(format!(
                "{g:?} is absolute; globs are relative to the step's working directory"
            ));
        }
        if g.split('/').any(|part| part == "..") {
            return Err(format!(
                "{g:?} reaches above the step's working directory (..)"
            ));
        }
        if let Err(e) = glob::Pattern::new(g) {
            return Err(format!("{g:?} is not a valid glob: {e}"));
        }
    }
    Ok(())
}

/// `timeout_secs` and `mutex_timeout_secs`: 1 to [`MAX_TIMEOUT_SECS`].
fn check_secs(t: u64) -> Result<(), String> {
    if (1..=MAX_TIMEOUT_SECS).contains(&t) {
        Ok(())
    } else {
        Err(format!(
            "must be between 1 and {MAX_TIMEOUT_SECS} seconds (a week), not {t}"
        ))
    }
}

/// `[A-Za-z0-9_-]+`, at most 100 characters.
pub fn is_valid_step_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_valid_variable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.starts_with("Gantry.")
        && !name.starts_with("Steps.")
}

impl Process {
    /// Parse a process file.
    pub fn from_toml(text: &str) -> Result<Self, ValidationError> {
        toml::from_str(text).map_err(|e| invalid("process", e.message().to_owned()))
    }

    /// Every check that needs no database. Steps are checked in order, so the first problem
    /// reported is the first in the file.
    pub fn validate(&self) -> Result<(), ValidationError> {
        // A process file given as TOML never passed the API's JSON check for NUL characters.
        if let Ok(doc) = serde_json::to_value(self)
            && let Some(field) = crate::nul::find_in_json(&doc)
        {
            return Err(invalid(field, crate::nul::MESSAGE));
        }
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(invalid("name", "must be 1 to 200 characters"));
        }
        for (name, value) in &self.variables {
            let field = format!("variables.{name}");
            if !is_valid_variable_name(name) {
                return Err(invalid(
                    field,
                    "variable names use A-Z, a-z, 0-9, '.', '-' and '_', and may not start with Gantry. or Steps.",
                ));
            }
            if value.is_sensitive() && value.value().chars().count() < MIN_SENSITIVE_LEN {
                return Err(invalid(
                    field,
                    format!(
                        "a sensitive value must be at least {MIN_SENSITIVE_LEN} characters: shorter ones would mask ordinary words"
                    ),
                ));
            }
        }
        if self.steps.is_empty() {
            return Err(invalid("steps", "a process needs at least one step"));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(invalid("steps", format!("at most {MAX_STEPS} steps")));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        // Steps whose outputs a step may read: those of earlier groups (a parallel sibling's
        // outputs do not exist yet when the step starts).
        let mut readable: HashSet<&str> = HashSet::new();
        let mut group: Vec<&str> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let at = |f: &str| format!("steps[{i}].{f}");
            if !is_valid_step_name(&step.name) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "{:?} is not a valid step name: use 1 to 100 of A-Z, a-z, 0-9, '-' and '_'",
                        step.name
                    ),
                ));
            }
            if let Some(first) = seen.insert(&step.name, i) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "step name {:?} is already used by steps[{first}]",
                        step.name
                    ),
                ));
            }
            if step.parallel && i == 0 {
                return Err(invalid(
                    at("parallel"),
                    "the first step has no step before it to run in parallel with",
                ));
            }
            if !step.parallel {
                readable.extend(group.drain(..));
            }
            group.push(&step.name);
            match step.kind {
                StepKind::Script => {}
                StepKind::Manual | StepKind::Email => {
                    self.check_dispatcher_step(step, &at, &readable, &seen)?;
                    continue;
                }
            }
            let script = step.script.as_deref().unwrap_or("");
            if script.trim().is_empty() {
                return Err(invalid(at("script"), "a script step needs a script"));
            }
            if script.len() > MAX_SCRIPT_BYTES {
                return Err(invalid(
                    at("script"),
                    format!("longer than {MAX_SCRIPT_BYTES} bytes"),
                ));
            }
            if let Some(pool) = &step.pool
                && pool.trim().is_empty()
            {
                return Err(invalid(at("pool"), "must not be empty"));
            }
            if let Some(t) = step.timeout_secs {
                check_secs(t).map_err(|m| invalid(at("timeout_secs"), m))?;
            }
            if step
                .cancel_grace_secs
                .is_some_and(|g| g > MAX_CANCEL_GRACE_SECS)
            {
                return Err(invalid(
                    at("cancel_grace_secs"),
                    format!("must be between 0 and {MAX_CANCEL_GRACE_SECS}"),
                ));
            }
            if step.retries > MAX_RETRIES {
                return Err(invalid(
                    at("retries"),
                    format!("must be between 0 and {MAX_RETRIES}"),
                ));
            }
            check_artifact_globs(&step.artifacts).map_err(|m| invalid(at("artifacts"), m))?;
            if let Some(m) = &step.mutex
                && !crate::locks::is_valid_name(m)
            {
                return Err(invalid(
                    at("mutex"),
                    format!(
                        "{m:?} is not a valid mutex name: use 1 to 100 of A-Z, a-z, 0-9, '.', '-' and '_'"
                    ),
                ));
            }
            if let Some(t) = step.mutex_timeout_secs {
                if step.mutex.is_none() {
                    return Err(invalid(
                        at("mutex_timeout_secs"),
                        "only a step with a mutex waits for one",
                    ));
                }
                check_secs(t).map_err(|m| invalid(at("mutex_timeout_secs"), m))?;
            }
            for field in ["instructions", "to", "subject", "body"] {
                let set = match field {
                    "instructions" => step.instructions.is_some(),
                    "to" => !step.to.is_empty(),
                    "subject" => step.subject.is_some(),
                    _ => step.body.is_some(),
                };
                if set {
                    return Err(invalid(
                        at(field),
                        format!("only manual and email steps take `{field}`"),
                    ));
                }
            }
            for name in template::references(script) {
                self.check_reference(name, &readable, &seen)
                    .map_err(|m| invalid(at("script"), format!("step {}: {m}", step.name)))?;
            }
        }
        Ok(())
    }

    /// Manual and e-mail steps: run by the dispatcher, never by a worker, so they take none
    /// of a script step's fields, and need their own.
    fn check_dispatcher_step(
        &self,
        step: &StepSpec,
        at: &dyn Fn(&str) -> String,
        readable: &HashSet<&str>,
        declared: &HashMap<&str, usize>,
    ) -> Result<(), ValidationError> {
        let kind = if step.kind == StepKind::Manual {
            "manual"
        } else {
            "email"
        };
        let script_only = [
            ("script", step.script.is_some()),
            ("pool", step.pool.is_some()),
            ("location", step.location != Location::Pool),
            ("syntax", step.syntax != Syntax::default()),
            ("timeout_secs", step.timeout_secs.is_some()),
            ("cancel_grace_secs", step.cancel_grace_secs.is_some()),
            ("retries", step.retries > 0),
            ("artifacts", !step.artifacts.is_empty()),
            ("mutex", step.mutex.is_some()),
            ("mutex_timeout_secs", step.mutex_timeout_secs.is_some()),
            ("exclusive", step.exclusive),
        ];
        for (field, set) in script_only {
            if set {
                return Err(invalid(
                    at(field),
                    format!("a {kind} step is run by the dispatcher and takes no `{field}`"),
                ));
            }
        }
        let mut texts: Vec<(&str, &str)> = Vec::new();
        if step.kind == StepKind::Manual {
            for (field, set) in [
                ("to", !step.to.is_empty()),
                ("subject", step.subject.is_some()),
                ("body", step.body.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        at(field),
                        format!("only email steps take `{field}`"),
                    ));
                }
            }
            let instructions = step.instructions.as_deref().unwrap_or("");
            if instructions.trim().is_empty() {
                return Err(invalid(
                    at("instructions"),
                    "a manual step needs instructions: what the approver should check",
                ));
            }
            texts.push(("instructions", instructions));
        } else {
            if step.instructions.is_some() {
                return Err(invalid(
                    at("instructions"),
                    "only manual steps take `instructions`",
                ));
            }
            if step.to.is_empty() {
                return Err(invalid(
                    at("to"),
                    "an email step needs at least one address",
                ));
            }
            for (j, addr) in step.to.iter().enumerate() {
                let plain = !addr.contains("#{");
                if addr.trim().is_empty() || (plain && !addr.contains('@')) {
                    return Err(invalid(
                        format!("{}[{j}]", at("to")),
                        format!("{addr:?} is not an e-mail address"),
                    ));
                }
                texts.push(("to", addr));
            }
            let subject = step.subject.as_deref().unwrap_or("");
            if subject.trim().is_empty() {
                return Err(invalid(at("subject"), "an email step needs a subject"));
            }
            texts.push(("subject", subject));
            texts.push(("body", step.body.as_deref().unwrap_or("")));
        }
        for (field, text) in texts {
            if text.len() > MAX_SCRIPT_BYTES {
                return Err(invalid(
                    at(field),
                    format!("longer than {MAX_SCRIPT_BYTES} bytes"),
                ));
            }
            for name in template::references(text) {
                self.check_reference(name, readable, declared)
                    .map_err(|m| invalid(at(field), format!("step {}: {m}", step.name)))?;
            }
        }
        Ok(())
    }

    fn check_reference(
        &self,
        name: &str,
        readable: &HashSet<&str>,
        declared: &HashMap<&str, usize>,
    ) -> Result<(), String> {
        if self.variables.contains_key(name) || template::BUILTIN_NAMES.contains(&name) {
            return Ok(());
        }
        if let Some((step, _)) = template::output_reference(name) {
            if readable.contains(step) {
                return Ok(());
            }
            if declared.contains_key(step) {
                return Err(format!(
                    "#{{{name}}} reads an output of step {step:?}, which has not finished when this step starts"
                ));
            }
            return Err(format!(
                "#{{{name}}} names step {step:?}, which is not an earlier step"
            ));
        }
        Err(format!("unknown variable #{{{name}}}"))
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
mod tests {
    use super::*;

    fn parse(text: &str) -> Process {
        Process::from_toml(text).unwrap()
    }

    #[test]
    fn a_good_process_passes() {
        let p = parse(
            r#"
name = "web"
[variables]
Env = "staging"
Port = 8080
Pw = { value = "s3cr3t-pw", sensitive = true }
[[steps]]
name = "build"
script = "echo #{Env} #{Port} #{Gantry.Task.Id}"
[[steps]]
name = "deploy"
syntax = "python3"
script = "print('#{Steps.build.Output.version}')"
"#,
        );
        p.validate().unwrap();
        assert_eq!(p.variables["Port"].value(), "8080");
        assert!(p.variables["Pw"].is_sensitive());
    }

    #[test]
    fn artifact_globs_are_relative_and_valid() {
        let ok = parse(
            "name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"true\"\nartifacts = [\"dist/*.tar.gz\", \"reports/**/*.xml\", \"out.bin\"]\n",
        );
        ok.validate().unwrap();
        for bad in ["/etc/passwd", "../x", "dist/../../x", "", "a[", "  "] {
            let e = check_artifact_globs(&[bad.to_owned()]).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        let p = parse(
            "name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"true\"\nartifacts = [\"/abs\"]\n",
        );
        assert_eq!(p.validate().unwrap_err().field, "steps[0].artifacts");
    }

    #[test]
    fn timeouts_are_bounded_and_nul_is_refused_in_toml() {
        let step = |extra: &str| {
            parse(&format!(
                "name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"true\"\nmutex = \"m\"\n{extra}\n"
            ))
        };
        step("timeout_secs = 604800\nmutex_timeout_secs = 1")
            .validate()
            .unwrap();
        for (extra, field) in [
            ("timeout_secs = 604801", "steps[0].timeout_secs"),
            ("timeout_secs = 0", "steps[0].timeout_secs"),
            (
                "mutex_timeout_secs = 100000000000000000",
                "steps[0].mutex_timeout_secs",
            ),
            ("mutex_timeout_secs = 0", "steps[0].mutex_timeout_secs"),
        ] {
            assert_eq!(step(extra).validate().unwrap_err().field, field, "{extra}");
        }
        let p = parse("name = \"x\"\n[[steps]]\nname = \"a\"\nscript = \"echo \\u0000\"\n");
        assert_eq!(p.validate().unwrap_err().field, "steps[0].script");
    }

    #[test]
    fn problems_name_their_field() {
        let cases = [
            (
                r#"name = "x"
steps = []"#,
                "steps",
            ),
            (
                r#"name = "x"
[[steps]]
name = "a"
"#,
                "steps[0].script",
            ),
            (
                r#"name = "x"
[[steps]]
name = "a b"
script = "true""#,
                "steps[0].name",
            ),
            (
                r#"name = "x"
[[steps]]
name = "a"
script = "echo #{Nope}""#,
                "steps[0].script",
            ),
            (
                r#"name = "x"
[[steps]]
name = "a"
script = "true"
[[steps]]
name = "a"
script = "true""#,
                "steps[1].name",
            ),
            (
                r#"name = "x"
[variables]
P = { value = "abc", sensitive = true }
[[steps]]
name = "a"
script = "true""#,
                "variables.P",
            ),
            (
                r#"name = "x"
[[steps]]
name = "a"
script = "true"
[[steps]]
name = "b"
parallel = true
script = "true"
[[steps]]
name = "c"
parallel = true
script = "echo #{Steps.b.Output.v}""#,
                "steps[2].script",
            ),
            (
                r#"name = "x"
[[steps]]
name = "a"
retries = 9
script = "true""#,
                "steps[0].retries",
            ),
        ];
        for (text, field) in cases {
            let err = parse(text).validate().unwrap_err();
            assert_eq!(err.field, field, "{text}\n=> {err}");
        }
    }

    #[test]
    fn variable_shapes_are_explained() {
        let bad = Process::from_toml(
            "name = \"x\"\n[variables]\nA = [1, 2]\n[[steps]]\nname = \"a\"\nscript = \"true\"\n",
        )
        .unwrap_err();
        assert!(bad.message.contains("a variable is a string"), "{bad}");
        let bad = Process::from_toml(
            "name = \"x\"\n[variables]\nA = { value = 3 }\n[[steps]]\nname = \"a\"\nscript = \"true\"\n",
        )
        .unwrap_err();
        assert!(bad.message.contains("`value` must be a string"), "{bad}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Process::from_toml(
            r#"name = "x"
[[steps]]
name = "a"
scrpit = "true""#,
        )
        .unwrap_err();
        assert!(err.message.contains("scrpit"), "{err}");
    }

    #[test]
    fn groups_follow_parallel_flags() {
        assert_eq!(
            group_ranges([false, true, true, false, false, true]),
            vec![0..3, 3..4, 4..6]
        );
    }
}
