//! # NUL characters in requests
//!
//! PostgreSQL cannot store U+0000 in text, and no name, script or value needs one, so a NUL
//! anywhere in a request is refused up front with a 400 naming where it is, rather than
//! failing deep inside a transaction. [`find_in_json`] walks a parsed JSON document (keys and
//! values); the dispatcher's extractors, its query-string and path checks, and
//! [`crate::process::Process::validate`] (for process files given as TOML) all use it.

use serde_json::Value;

/// The path of the first string (an object key or a value) holding U+0000, written as
/// `steps[2].script` (a key holding one is named with the NUL shown as `\u0000`); `None`
/// if there is none. The walk is iterative, so a deeply nested document cannot overflow the
/// stack.
pub fn find_in_json(root: &Value) -> Option<String> {
    let mut stack: Vec<(&Value, String)> = vec![(root, String::new())];
    while let Some((v, path)) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return Some(or_root(path)),
            Value::Array(items) => {
                // Pushed in reverse so the first problem in document order is found first.
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push((item, format!("{path}[{i}]")));
                }
            }
            Value::Object(map) => {
                let mut children = Vec::with_capacity(map.len());
                for (k, item) in map {
                    let child = join(&path, k);
                    if k.contains('\0') {
                        return Some(child.replace('\0', "\\u0000"));
                    }
                    children.push((item, child));
                }
                stack.extend(children.into_iter().rev());
            }
            _ => {}
        }
    }
    None
}

/// The message every NUL refusal carries.
pub const MESSAGE: &str = "contains a NUL character (U+0000), which no field may hold";

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn or_root(path: String) -> String {
    if path.is_empty() { ".".into() } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_path_of_the_first_nul() {
        assert_eq!(find_in_json(&json!({"a": [1, "x"], "b": "ok"})), None);
        assert_eq!(
            find_in_json(&json!({"steps": [{"name": "a"}, {"script": "x\u{0}y"}]})).as_deref(),
            Some("steps[1].script")
        );
        assert_eq!(
            find_in_json(&json!({"variables": {"A\u{0}": "v"}})).as_deref(),
            Some("variables.A\\u0000")
        );
        assert_eq!(find_in_json(&json!("\u{0}")).as_deref(), Some("."));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let mut v = json!("\u{0}");
        for _ in 0..1_000 {
            v = Value::Array(vec![v]);
        }
        assert!(find_in_json(&v).is_some());
    }
}
