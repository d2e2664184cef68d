//! # Masking sensitive values
//!
//! Every sensitive value (sensitive variables, `mask` messages, sensitive outputs) is replaced
//! by `********` in every line before the line leaves the worker. Matches of all values are
//! collected, overlapping ones included, merged on the original text, and each merged range
//! is replaced once, so a value inside another, two values side by side, or one value twice
//! on a line are all hidden. A multi-line value is registered whole and line by line, since
//! logs are masked a line at a time.

use std::borrow::Cow;

/// What a masked range becomes.
pub const MASK: &str = "********";

/// The set of values to hide.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    /// Longest first, so that scanning order never matters for the merged result.
    needles: Vec<String>,
}

impl Masker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a value (and each of its lines, when it has several).
    pub fn add(&mut self, value: &str) {
        let mut candidates = vec![value.trim_end_matches(['\r', '\n']).to_owned()];
        if value.contains('\n') {
            candidates.extend(
                value
                    .lines()
                    .map(|l| l.trim().to_owned())
                    .filter(|l| l.chars().count() >= crate::process::MIN_SENSITIVE_LEN),
            );
        }
        for c in candidates {
            if !c.is_empty() && !self.needles.contains(&c) {
                self.needles.push(c);
            }
        }
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The line with every occurrence of every value replaced.
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        if self.needles.is_empty() {
            return Cow::Borrowed(line);
        }
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for needle in &self.needles {
            let mut from = 0;
            while let Some(pos) = line[from..].find(needle.as_str()) {
                let start = from + pos;
                ranges.push((start, start + needle.len()));
                // Step one character on, to find overlapping occurrences too.
                from = start + line[start..].chars().next().map_or(1, char::len_utf8);
                if from >= line.len() {
                    break;
                }
            }
        }
        if ranges.is_empty() {
            return Cow::Borrowed(line);
        }
        ranges.sort_unstable();
        let mut out = String::with_capacity(line.len());
        let mut cursor = 0;
        let mut iter = ranges.into_iter().peekable();
        while let Some((start, mut end)) = iter.next() {
            while let Some(&(s, e)) = iter.peek() {
                if s <= end {
                    end = end.max(e);
                    iter.next();
                } else {
                    break;
                }
            }
            out.push_str(&line[cursor..start]);
            out.push_str(MASK);
            cursor = end;
        }
        out.push_str(&line[cursor..]);
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_and_overlaps() {
        let mut m = Masker::new();
        m.add("s3cr3t");
        assert_eq!(m.mask("a s3cr3t b s3cr3ts3cr3t"), "a ******** b ********");
        assert_eq!(m.mask("nothing"), "nothing");
        let mut m = Masker::new();
        m.add("abcdeX");
        m.add("Xvery-sensitive");
        assert_eq!(m.mask("abcdeXvery-sensitive!"), "********!");
        let mut m = Masker::new();
        m.add("aab");
        assert_eq!(m.mask("xxaaab"), "xxa********");
    }

    #[test]
    fn multi_line_values_mask_each_line() {
        let mut m = Masker::new();
        m.add("-----BEGIN KEY-----\nMIIEvQIBADANBg\n-----END KEY-----\n");
        assert_eq!(m.mask("  MIIEvQIBADANBg"), "  ********");
        assert_eq!(m.mask("-----END KEY-----"), "********");
    }
}
