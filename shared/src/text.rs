//! # Text that PostgreSQL can store
//!
//! A script may print any bytes. Invalid UTF-8 is decoded lossily where output is read; what
//! remains that a PostgreSQL `text` value cannot hold is U+0000 (NUL), the only such
//! character in a UTF-8 database. The agent replaces it with U+FFFD (the replacement
//! character) in every log line, output value, output name, progress message and error
//! before they leave it, so one odd byte never makes a step's events unstorable.

use std::borrow::Cow;

/// What a character PostgreSQL cannot store becomes.
pub const REPLACEMENT: char = '\u{FFFD}';

/// `text` with every NUL replaced by U+FFFD (borrowed when there is none).
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// [`storable`] for an owned string.
pub fn into_storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character() {
        assert_eq!(storable("bin\0ary"), "bin\u{FFFD}ary");
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
        assert_eq!(into_storable("\0\0".into()), "\u{FFFD}\u{FFFD}");
    }
}
