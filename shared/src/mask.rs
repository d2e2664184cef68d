//! # Masking sensitive values
//!
//! Every sensitive value (sensitive variables, `mask` messages, sensitive outputs) is replaced
//! by `********` in every line before the line leaves the worker. Matches of all values are
//! collected, overlapping ones included, merged on the original text, and each merged range
//! is replaced once, so a value inside another, two values side by side, or one value twice
//! on a line are all hidden. A multi-line value is registered whole and line by line, since
//! logs are masked a line at a time.
//!
//! A line longer than the agent's 64 KiB reading unit arrives in pieces; [`Masker::mask_piece`]
//! keeps back the tail of each piece that a value could continue into, so a value that
//! straddles two pieces is still found whole.

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

    /// The length in bytes of the longest registered value (0 when there is none).
    pub fn longest(&self) -> usize {
        self.needles.first().map_or(0, String::len)
    }

    /// Every occurrence of every value in `line`, overlapping ones merged: sorted, disjoint
    /// byte ranges.
    fn ranges(&self, line: &str) -> Vec<(usize, usize)> {
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
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// The line with every occurrence of every value replaced.
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        if self.needles.is_empty() {
            return Cow::Borrowed(line);
        }
        let ranges = self.ranges(line);
        if ranges.is_empty() {
            return Cow::Borrowed(line);
        }
        let mut out = String::with_capacity(line.len());
        let mut cursor = 0;
        for (start, end) in ranges {
            out.push_str(&line[cursor..start]);
            out.push_str(MASK);
            cursor = end;
        }
        out.push_str(&line[cursor..]);
        Cow::Owned(out)
    }

    /// Mask one piece of a logical line that arrives in several (output is read 64 KiB at a
    /// time, and a line may be longer). `carry` is the unmasked text kept back from the line's
    /// earlier pieces; `piece` joins it. Returns the masked text that may go out now: all of
    /// it when `last`, otherwise all but the tail that a registered value could still run on
    /// into (shorter than the longest value), and never a cut through a value found in the
    /// text. So no value is ever split between two pieces that are masked apart.
    pub fn mask_piece(&self, carry: &mut String, piece: &str, last: bool) -> String {
        carry.push_str(piece);
        if last || self.needles.is_empty() {
            let out = self.mask(carry).into_owned();
            carry.clear();
            return out;
        }
        let mut cut = carry.len().saturating_sub(self.longest().saturating_sub(1));
        while cut > 0 && !carry.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(&(start, _)) = self
            .ranges(carry)
            .iter()
            .find(|&&(s, e)| s < cut && cut < e)
        {
            cut = start;
        }
        let out = self.mask(&carry[..cut]).into_owned();
        carry.drain(..cut);
        out
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

    use proptest::prelude::*;

    /// Cut `text` at the given fractions (char boundaries), as the reader would.
    fn cut_points(text: &str, fractions: &[f64]) -> Vec<usize> {
        let mut cuts: Vec<usize> = fractions
            .iter()
            .map(|f| {
                let mut c = ((text.len() as f64) * f) as usize;
                while c < text.len() && !text.is_char_boundary(c) {
                    c += 1;
                }
                c.min(text.len())
            })
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However a stream is split into lines and each line into pieces, no registered
        /// value survives in what is emitted (not even across two emitted pieces), and
        /// nothing but registered values is hidden.
        #[test]
        fn no_secret_survives_any_split(
            secrets in proptest::collection::vec("[a-zA-Z0-9é€]{1,40}", 1..4),
            filler in proptest::collection::vec("[a-zA-Z0-9 é€]{0,60}", 1..8),
            lines_split in proptest::collection::vec(proptest::bool::ANY, 8),
            fractions in proptest::collection::vec(0.0f64..1.0, 0..6),
        ) {
            let mut m = Masker::new();
            for s in &secrets {
                m.add(s);
            }
            // A stream: filler and secrets interleaved, some of it on several lines.
            let mut stream = String::new();
            for (i, f) in filler.iter().enumerate() {
                stream.push_str(f);
                stream.push_str(&secrets[i % secrets.len()]);
                if lines_split[i % lines_split.len()] {
                    stream.push('\n');
                }
            }
            for line in stream.split('\n') {
                let cuts = cut_points(line, &fractions);
                let mut carry = String::new();
                let mut emitted = Vec::new();
                let mut from = 0;
                for c in cuts.into_iter().filter(|c| *c > 0 && *c < line.len()) {
                    emitted.push(m.mask_piece(&mut carry, &line[from..c], false));
                    from = c;
                }
                emitted.push(m.mask_piece(&mut carry, &line[from..], true));
                prop_assert!(carry.is_empty());
                let joined = emitted.concat();
                for s in &secrets {
                    prop_assert!(!joined.contains(s.as_str()), "{s:?} in {emitted:?}");
                }
                // Only masked text is gone: what is left is the line less its secrets.
                prop_assert_eq!(joined.replace(MASK, ""), m.mask(line).replace(MASK, ""));
            }
        }
    }
}
