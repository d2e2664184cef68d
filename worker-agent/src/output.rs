//! # Reading what a step prints
//!
//! One task per pipe (stdout, stderr) reads the script's output and hands it to the step's
//! output loop as [`Chunk`]s, through a small bounded queue ([`QUEUE`] chunks):
//!
//! - A line longer than [`MAX_LINE`] bytes goes as several pieces, cut at a character
//!   boundary, so that the masker can carry a value across them (see
//!   [`gantry_shared::mask::Masker::mask_piece`]).
//! - A `##gantry[` line on stdout (a service message) is assembled whole, up to
//!   [`MAX_MESSAGE_BYTES`]; past that it is dropped to its end and reported as
//!   [`Chunk::TooLong`], so no part of it is ever logged.
//! - Invalid UTF-8 is decoded lossily and NUL becomes U+FFFD ([`gantry_shared::text`]).
//!
//! A step's two readers share one [`Budget`], which only says whether output is still wanted:
//! once the step is stopped, unread output is dropped ([`Budget::discard`]), so its end is not
//! queued behind it. How fast output is read is not decided here: the output loop takes no
//! more chunks while the step's window of lines not yet stored by the dispatcher is full (see
//! [`crate::window`]), so the queue fills, the readers wait, the pipes fill and the script
//! blocks in its writes. There is no fixed rate cap.

use gantry_shared::service_messages::{MAX_MESSAGE_BYTES, PREFIX};
use gantry_shared::text::into_storable;
use gantry_shared::wire::Stream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Longest log line; longer output is split into several lines.
pub const MAX_LINE: usize = 64 * 1024;
/// Chunks read ahead of the output loop, at most.
pub const QUEUE: usize = 16;
/// What a reader hands to the output loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// A whole line, or the last piece of a long one (without its line end).
    End(String),
    /// A piece of a line longer than [`MAX_LINE`]: more of the line follows.
    Part(String),
    /// A service message longer than [`MAX_MESSAGE_BYTES`], dropped unread.
    TooLong,
}

/// Whether a step's output is still wanted: shared by its readers.
#[derive(Default)]
pub struct Budget {
    discard: AtomicBool,
    /// Bytes dropped since [`Budget::discard`].
    dropped: AtomicU64,
}

impl Budget {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The step was stopped: drop whatever it printed that is still unread, so its end is
    /// not queued behind it.
    pub fn discard(&self) {
        self.discard.store(true, Ordering::SeqCst);
    }

    /// Bytes dropped since [`Budget::discard`].
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Whether one line of `bytes` bytes may go; false: it is dropped (and counted).
    pub fn take(&self, bytes: usize) -> bool {
        if self.discard.load(Ordering::SeqCst) {
            self.dropped.fetch_add(bytes as u64, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// Read `pipe` to its end (see the module's documentation).
pub async fn read(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tx: mpsc::Sender<(Stream, Chunk)>,
    budget: Arc<Budget>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut line: Vec<u8> = Vec::new();
    // The current line already went out in part: whatever follows is no service message.
    let mut continued = false;
    // Inside an over-long service message: dropped up to its line end.
    let mut discarding = false;
    let is_message = |line: &[u8], continued: bool| {
        stream == Stream::Stdout && !continued && line.starts_with(PREFIX.as_bytes())
    };
    while let Ok(available) = reader.fill_buf().await {
        if available.is_empty() {
            break;
        }
        let newline = available.iter().position(|b| *b == b'\n');
        let take = newline.map_or(available.len(), |i| i + 1);
        if discarding {
            reader.consume(take);
            discarding = newline.is_none();
            continue;
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        let ended = newline.is_some();
        if is_message(&line, continued) {
            // Its line end (and a '\r') may still come.
            if !ended && line.len() > MAX_MESSAGE_BYTES.saturating_add(2) {
                line.clear();
                discarding = true;
                if tx.send((stream, Chunk::TooLong)).await.is_err() {
                    return;
                }
            }
        } else {
            // Pieces of at most MAX_LINE bytes while more than that is left of the line.
            loop {
                let content = line.len() - usize::from(ended);
                if content < MAX_LINE || (ended && content == MAX_LINE) {
                    break;
                }
                let cut = char_cut(&line, MAX_LINE.min(content));
                let piece: Vec<u8> = line.drain(..cut).collect();
                let text = into_storable(String::from_utf8_lossy(&piece).into_owned());
                continued = true;
                if !send(&tx, &budget, stream, Chunk::Part(text)).await {
                    return;
                }
            }
        }
        if ended {
            let chunk = Chunk::End(finish_line(&mut line));
            continued = false;
            if !send(&tx, &budget, stream, chunk).await {
                return;
            }
        }
    }
    if discarding {
        return;
    }
    if !line.is_empty() || continued {
        let _ = send(&tx, &budget, stream, Chunk::End(finish_line(&mut line))).await;
    }
}

/// Send one chunk unless the step was stopped; false once nobody listens.
async fn send(
    tx: &mpsc::Sender<(Stream, Chunk)>,
    budget: &Budget,
    stream: Stream,
    chunk: Chunk,
) -> bool {
    let bytes = match &chunk {
        Chunk::End(t) | Chunk::Part(t) => t.len(),
        Chunk::TooLong => 0,
    };
    if !budget.take(bytes) {
        // Dropped: the step was stopped. Keep reading, so the pipe drains to its end.
        return !tx.is_closed();
    }
    tx.send((stream, chunk)).await.is_ok()
}

/// Where to cut `buf` so that the first part is at most `max` bytes and no UTF-8 character is
/// cut in two (invalid bytes are cut anywhere).
fn char_cut(buf: &[u8], max: usize) -> usize {
    let cut = max.min(buf.len());
    // Back to the first byte of the character that ends at or crosses `cut`.
    let mut start = cut;
    while start > 0 && cut - start < 4 {
        start -= 1;
        let b = buf[start];
        if b & 0xC0 != 0x80 {
            let len = match b {
                0xF0.. => 4,
                0xE0.. => 3,
                0xC0.. => 2,
                _ => 1,
            };
            return if start > 0 && start + len > cut {
                start
            } else {
                cut
            };
        }
    }
    cut
}

/// The line without its line end, decoded lossily, NUL replaced; `line` is emptied.
fn finish_line(line: &mut Vec<u8>) -> String {
    let mut end = line.len();
    if end > 0 && line[end - 1] == b'\n' {
        end -= 1;
        if end > 0 && line[end - 1] == b'\r' {
            end -= 1;
        }
    }
    let s = into_storable(String::from_utf8_lossy(&line[..end]).into_owned());
    line.clear();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: Vec<u8>, stream: Stream) -> Vec<Chunk> {
        let (tx, mut rx) = mpsc::channel(1024);
        let budget = Budget::new();
        read(std::io::Cursor::new(input), stream, tx, budget).await;
        let mut got = Vec::new();
        while let Some((_, c)) = rx.recv().await {
            got.push(c);
        }
        got
    }

    #[tokio::test]
    async fn splits_lines_and_long_output() {
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("a\r\nb\n{long}\nlast-without-newline");
        let got = read_all(input.into_bytes(), Stream::Stdout).await;
        assert_eq!(got[0], Chunk::End("a".into()));
        assert_eq!(got[1], Chunk::End("b".into()));
        assert_eq!(got[2], Chunk::Part("x".repeat(MAX_LINE)));
        assert_eq!(got[3], Chunk::End("x".repeat(10)));
        assert_eq!(got[4], Chunk::End("last-without-newline".into()));
    }

    #[tokio::test]
    async fn never_cuts_a_character_and_replaces_nul() {
        let input = format!("{}é tail\nbin\0ary\n", "y".repeat(MAX_LINE - 1));
        let got = read_all(input.into_bytes(), Stream::Stderr).await;
        assert_eq!(got[0], Chunk::Part("y".repeat(MAX_LINE - 1)));
        assert_eq!(got[1], Chunk::End("é tail".into()));
        assert_eq!(got[2], Chunk::End("bin\u{FFFD}ary".into()));
    }

    #[tokio::test]
    async fn service_messages_are_whole_or_refused() {
        let big = format!("{PREFIX}mask value='{}']\n", "QUJD".repeat(MAX_LINE / 2));
        let huge = format!(
            "{PREFIX}mask value='{}']\n",
            "QUJD".repeat(MAX_MESSAGE_BYTES)
        );
        let input = format!("{big}{huge}after\n");
        let got = read_all(input.clone().into_bytes(), Stream::Stdout).await;
        assert_eq!(
            got.len(),
            3,
            "{:?}",
            got.iter()
                .map(|c| match c {
                    Chunk::End(t) | Chunk::Part(t) => t.len(),
                    Chunk::TooLong => 0,
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(got[0], Chunk::End(big.trim_end().into()));
        assert_eq!(got[1], Chunk::TooLong);
        assert_eq!(got[2], Chunk::End("after".into()));
        // On stderr the same bytes are only text, split as usual.
        let got = read_all(input.into_bytes(), Stream::Stderr).await;
        assert!(got.iter().all(|c| *c != Chunk::TooLong));
    }

    #[test]
    fn a_stopped_step_drops_its_output() {
        let budget = Budget::new();
        assert!(budget.take(2));
        budget.discard();
        assert!(!budget.take(2));
        assert_eq!(budget.dropped(), 2);
    }
}
