//! `#{Name}` substitution, as Octopus does it: `#{Environment}`, `#{Steps.build.Output.version}`,
//! `#{Gantry.Task.Id}`. `##{` writes a literal `#{`. A `#{` with no closing `}` on the same line
//! is left as text. Names are trimmed.

/// A piece of a template.
#[derive(Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    Text(&'a str),
    /// `##{`: a literal `#{`.
    LiteralOpen,
    Ref(&'a str),
}

/// Split a template into text and references.
pub fn parse(s: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut text_start = 0;
    while i < bytes.len() {
        if bytes[i] == b'#' && bytes.get(i + 1) == Some(&b'#') && bytes.get(i + 2) == Some(&b'{') {
            if text_start < i {
                out.push(Segment::Text(&s[text_start..i]));
            }
            out.push(Segment::LiteralOpen);
            i += 3;
            text_start = i;
            continue;
        }
        if bytes[i] == b'#' && bytes.get(i + 1) == Some(&b'{') {
            let rest = &s[i + 2..];
            let end = rest.find(['}', '\n']);
            if let Some(end) = end.filter(|&e| rest.as_bytes()[e] == b'}') {
                let name = rest[..end].trim();
                if !name.is_empty() {
                    if text_start < i {
                        out.push(Segment::Text(&s[text_start..i]));
                    }
                    out.push(Segment::Ref(name));
                    i += 2 + end + 1;
                    text_start = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    if text_start < s.len() {
        out.push(Segment::Text(&s[text_start..]));
    }
    out
}

/// Every name a template references, in order of appearance.
pub fn references(s: &str) -> impl Iterator<Item = &str> {
    parse(s).into_iter().filter_map(|seg| match seg {
        Segment::Ref(name) => Some(name),
        _ => None,
    })
}

/// Render a template; the error is the first name `lookup` does not know.
pub fn render<F>(s: &str, mut lookup: F) -> Result<String, &str>
where
    F: FnMut(&str) -> Option<String>,
{
    let mut out = String::with_capacity(s.len());
    for seg in parse(s) {
        match seg {
            Segment::Text(t) => out.push_str(t),
            Segment::LiteralOpen => out.push_str("#{"),
            Segment::Ref(name) => match lookup(name) {
                Some(v) => out.push_str(&v),
                None => return Err(name),
            },
        }
    }
    Ok(out)
}

/// The `Gantry.*` names a step may reference.
pub const BUILTIN_NAMES: &[&str] = &[
    "Gantry.Task.Id",
    "Gantry.Task.Name",
    "Gantry.Step.Name",
    "Gantry.Step.Attempt",
    "Gantry.Worker.Name",
    "Gantry.WorkerPool.Name",
];

/// A reference to an earlier step's output: `Steps.<step>.Output.<name>`.
pub fn output_reference(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("Steps.")?;
    let (step, output) = rest.split_once(".Output.")?;
    if step.is_empty() || output.is_empty() {
        return None;
    }
    Some((step, output))
}

/// The environment variable name a Gantry variable is exported under: the name itself when
/// it is a valid shell identifier, otherwise with every other character replaced by `_`
/// (`Steps.build.Output.version` becomes `Steps_build_Output_version`).
pub fn env_name(name: &str) -> Option<String> {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if mapped.is_empty() || mapped.as_bytes()[0].is_ascii_digit() {
        None
    } else {
        Some(mapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn substitutes_references() {
        let vars: HashMap<&str, &str> = [("Env", "staging"), ("Steps.b.Output.v", "1.2")].into();
        let out = render("deploy #{Env} v#{ Steps.b.Output.v }!", |n| {
            vars.get(n).map(|v| v.to_string())
        })
        .unwrap();
        assert_eq!(out, "deploy staging v1.2!");
    }

    #[test]
    fn escapes_and_unterminated_stay_text() {
        let out = render("a ##{Env} b #{ c\n#{} d", |_| Some("X".into())).unwrap();
        assert_eq!(out, "a #{Env} b #{ c\n#{} d");
    }

    #[test]
    fn unknown_names_are_reported() {
        assert_eq!(render("x #{Nope} y", |_| None), Err("Nope"));
        assert_eq!(
            references("#{A} #{B.C} ##{D}").collect::<Vec<_>>(),
            vec!["A", "B.C"]
        );
    }

    #[test]
    fn output_references_and_env_names() {
        assert_eq!(
            output_reference("Steps.build.Output.version"),
            Some(("build", "version"))
        );
        assert_eq!(output_reference("Steps.build"), None);
        assert_eq!(
            env_name("Steps.build.Output.v-1").unwrap(),
            "Steps_build_Output_v_1"
        );
        assert_eq!(env_name("9lives"), None);
    }
}
