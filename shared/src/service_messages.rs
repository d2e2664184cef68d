//! # Service messages
//!
//! A script talks back by printing a line `##gantry[<name> <key>='<base64 of UTF-8>' ...]` on
//! stdout. Such a line is a message, not log text. Names are case-insensitive. A malformed
//! message is reported as an error whose text never repeats the raw line (it may hold a
//! secret); the agent logs it as a warning and goes on.
//!
//! | name | keys |
//! | --- | --- |
//! | `setVariable` | `name`, `value`, `sensitive` (`True`) |
//! | `createArtifact` | `path`, `name` |
//! | `progress` | `percentage`, `message` |
//! | `fail` | `message` |
//! | `mask` | `value` |

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::collections::HashMap;

/// The marker that starts a service message line.
pub const PREFIX: &str = "##gantry[";

/// The longest service-message line the agent assembles, in bytes (1 MiB): room for a value
/// of about 768 KiB once base64-encoded. The agent reads such a line whole, however it
/// arrives, and never logs any part of it; a longer one is refused whole, with a warning that
/// repeats none of it.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceMessage {
    SetVariable {
        name: String,
        value: String,
        sensitive: bool,
    },
    CreateArtifact {
        path: String,
        name: Option<String>,
    },
    Progress {
        percentage: u8,
        message: String,
    },
    Fail {
        message: String,
    },
    Mask {
        value: String,
    },
}

/// `None` when the line is ordinary output; `Some(Err(reason))` when it looks like a service
/// message but is not a valid one.
pub fn parse_line(line: &str) -> Option<Result<ServiceMessage, String>> {
    let line = line.trim_end_matches(['\r', '\n']);
    let body = line.strip_prefix(PREFIX)?;
    if line.len() > MAX_MESSAGE_BYTES {
        return Some(Err(format!(
            "a service message may be at most {MAX_MESSAGE_BYTES} bytes long"
        )));
    }
    Some(parse_body(body))
}

fn parse_body(body: &str) -> Result<ServiceMessage, String> {
    let body = body
        .strip_suffix(']')
        .ok_or("a service message must end with ']'")?;
    let (name, mut rest) = match body.find(' ') {
        Some(i) => (&body[..i], &body[i..]),
        None => (body, ""),
    };
    let mut attrs: HashMap<String, String> = HashMap::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let eq = rest
            .find("='")
            .ok_or("attributes must look like key='base64'")?;
        let key = &rest[..eq];
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err("attribute names must be letters, digits or '_'".into());
        }
        let after = &rest[eq + 2..];
        let close = after
            .find('\'')
            .ok_or("an attribute value is not closed with '")?;
        let raw = &after[..close];
        let decoded = STANDARD
            .decode(raw)
            .map_err(|_| format!("attribute {key:?} is not valid base64"))?;
        let value = String::from_utf8(decoded)
            .map_err(|_| format!("attribute {key:?} is not UTF-8 once decoded"))?;
        attrs.insert(key.to_ascii_lowercase(), value);
        rest = &after[close + 1..];
    }
    let mut take = |k: &str| attrs.remove(k);
    match name.to_ascii_lowercase().as_str() {
        "setvariable" => {
            let name = take("name").ok_or("setVariable needs name")?;
            if name.is_empty() {
                return Err("setVariable needs a non-empty name".into());
            }
            let value = take("value").ok_or("setVariable needs value")?;
            let sensitive = take("sensitive")
                .map(|s| s.eq_ignore_ascii_case("true"))
                .unwrap_or(false);
            Ok(ServiceMessage::SetVariable {
                name,
                value,
                sensitive,
            })
        }
        "createartifact" => Ok(ServiceMessage::CreateArtifact {
            path: take("path").ok_or("createArtifact needs path")?,
            name: take("name"),
        }),
        "progress" => {
            let pct = take("percentage").ok_or("progress needs percentage")?;
            let percentage: u8 = pct
                .trim()
                .parse()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or("progress percentage must be 0 to 100")?;
            Ok(ServiceMessage::Progress {
                percentage,
                message: take("message").unwrap_or_default(),
            })
        }
        "fail" => Ok(ServiceMessage::Fail {
            message: take("message").unwrap_or_default(),
        }),
        "mask" => {
            let value = take("value").ok_or("mask needs value")?;
            Ok(ServiceMessage::Mask { value })
        }
        "" => Err("a service message needs a name".into()),
        _ => Err("unknown service message name".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn parses_set_variable() {
        let line = format!(
            "##gantry[setVariable name='{}' value='{}' sensitive='{}']",
            b64("version"),
            b64("1.4.2 é"),
            b64("True")
        );
        assert_eq!(
            parse_line(&line),
            Some(Ok(ServiceMessage::SetVariable {
                name: "version".into(),
                value: "1.4.2 é".into(),
                sensitive: true
            }))
        );
    }

    #[test]
    fn names_are_case_insensitive_and_plain_lines_are_not_messages() {
        let line = format!(
            "##gantry[PROGRESS percentage='{}' message='{}']",
            b64("50"),
            b64("half")
        );
        assert!(matches!(
            parse_line(&line),
            Some(Ok(ServiceMessage::Progress { percentage: 50, .. }))
        ));
        assert_eq!(parse_line("hello ##gantry[fail]"), None);
    }

    #[test]
    fn malformed_messages_are_errors_that_do_not_echo_values() {
        for line in [
            "##gantry[setVariable name='bm9wZQ==' value='!!!secret!!!']",
            "##gantry[setVariable name='bm9wZQ==' value='c2VjcmV0",
            "##gantry[nosuch value='c2VjcmV0']",
            "##gantry[progress percentage='MTUw']",
        ] {
            let err = parse_line(line).unwrap().unwrap_err();
            assert!(
                !err.contains("secret") && !err.contains("c2VjcmV0"),
                "{err}"
            );
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Any line at all, message or not, is parsed or refused: never a panic.
        #[test]
        fn no_input_panics_the_parser(line in "\\PC{0,200}") {
            let _ = parse_line(&line);
            let _ = parse_line(&format!("{PREFIX}{line}"));
        }

        /// Lines shaped like messages, with odd keys, values, quotes and brackets: never a
        /// panic, and a refusal never repeats a value.
        #[test]
        fn no_message_shaped_input_panics_the_parser(
            name in "(setVariable|progress|fail|mask|createArtifact|[a-zA-Z]{0,8})",
            attrs in proptest::collection::vec(
                ("[a-zA-Z_=' ]{0,8}", "[A-Za-z0-9+/=' \\]\u{0}é]{0,24}"),
                0..5,
            ),
            tail in "[\\]' =]{0,3}",
        ) {
            let mut line = format!("{PREFIX}{name}");
            for (k, v) in &attrs {
                line.push_str(&format!(" {k}='{v}'"));
            }
            line.push_str(&tail);
            if let Some(Err(reason)) = parse_line(&line) {
                for (_, v) in &attrs {
                    if v.len() >= 12 {
                        prop_assert!(!reason.contains(v.as_str()), "{reason}");
                    }
                }
            }
        }
    }

    #[test]
    fn over_long_messages_are_refused_without_their_content() {
        let value = "QUJD".repeat(MAX_MESSAGE_BYTES / 4);
        let line = format!("##gantry[mask value='{value}']");
        let err = parse_line(&line).unwrap().unwrap_err();
        assert!(!err.contains("QUJD"), "{err}");
    }
}
