//! The checks made at submission, before anything is stored: [`Process::validate`] and the
//! field checks it is built from.

use super::{
    Location, MAX_ARTIFACT_GLOBS, MAX_CANCEL_GRACE_SECS, MAX_RETRIES, MAX_SCRIPT_BYTES, MAX_STEPS,
    MAX_TIMEOUT_SECS, MIN_SENSITIVE_LEN, Process, StepKind, StepSpec, ValidationError, invalid,
};
use crate::template;
use crate::wire::Syntax;
use std::collections::{HashMap, HashSet};

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
}
