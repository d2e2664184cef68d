//! # `agent.step_uid_range`: the uids an agent gives its running steps
//!
//! Written `"START-END"` (both included, decimal), e.g. `"61000-61999"`. Each running step
//! gets one uid of its own from the range, with the group id of the same number. The range
//! must lie within 1..=[`MAX_UID`] (never 0, never `u32::MAX`, which is `(uid_t)-1`), have
//! `START <= END`, and hold at most [`MAX_WIDTH`] uids.

use std::fmt;

/// Highest uid a range may contain (`u32::MAX` is `-1`, "no change", to `setuid`).
pub const MAX_UID: u32 = u32::MAX - 1;
/// Most uids one range may hold.
pub const MAX_WIDTH: u32 = 65_536;

/// A validated, inclusive range of uids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub start: u32,
    pub end: u32,
}

impl UidRange {
    /// Parse and check `"START-END"`. `Err` says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = "must be START-END, two uids such as 61000-61999";
        let (a, b) = text.trim().split_once('-').ok_or(usage)?;
        let num = |s: &str| -> Result<u32, String> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(format!("{usage} (got {text:?})"));
            }
            s.parse::<u32>()
                .map_err(|_| format!("{s} is not a uid: uids go from 1 to {MAX_UID}"))
        };
        let (start, end) = (num(a)?, num(b)?);
        if start == 0 {
            return Err("must not contain uid 0 (root)".into());
        }
        if end > MAX_UID {
            return Err(format!("{end} is not a usable uid: at most {MAX_UID}"));
        }
        if start > end {
            return Err(format!("the start {start} is above the end {end}"));
        }
        let range = Self { start, end };
        if range.len() > u64::from(MAX_WIDTH) {
            return Err(format!("holds {} uids; at most {MAX_WIDTH}", range.len()));
        }
        Ok(range)
    }

    /// How many uids it holds (at least 1).
    pub fn len(&self) -> u64 {
        u64::from(self.end) - u64::from(self.start) + 1
    }

    /// Never: a range holds at least one uid.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.start..=self.end).contains(&uid)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_ranges() {
        assert_eq!(
            UidRange::parse("61000-61999").unwrap(),
            UidRange {
                start: 61000,
                end: 61999
            }
        );
        assert_eq!(UidRange::parse(" 7 - 7 ").unwrap().len(), 1);
        let top = UidRange::parse(&format!("{}-{MAX_UID}", MAX_UID - 9)).unwrap();
        assert_eq!(top.len(), 10);
        assert!(top.contains(MAX_UID) && !top.contains(u32::MAX));
    }

    #[test]
    fn refuses_bad_ranges() {
        for bad in [
            "",
            "61000",
            "-5",
            "5-",
            "a-b",
            "+1-5",
            "1-2-3",
            "0-10",
            "10-5",
            "1-4294967295",
            "4294967295-4294967295",
            "1-99999999999999999999",
            "1-65537",
            "1000-1000000",
        ] {
            assert!(UidRange::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(UidRange::parse("1-65536").is_ok());
    }
}
