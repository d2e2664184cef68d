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
//! A step's two readers share one [`Budget`]: at most [`LINES_PER_SEC`] lines and
//! [`BYTES_PER_SEC`] bytes a second (with a one-second burst). Past it the readers stop
//! reading, the pipes fill, and the script blocks in its writes: a script printing as fast as
//! it can (`yes`) never builds a backlog of megabytes in the agent, the broker or the
//! dispatcher, so its end (a timeout, a cancel) is stored moments after it happens. Once the
//! script has exited the budget is lifted ([`Budget::free`]: what is left is bounded by the
//! pipes' buffers); once the step is stopped, unread output is dropped ([`Budget::discard`]).

use gantry_shared::service_messages::{MAX_MESSAGE_BYTES, PREFIX};
use gantry_shared::text::into_storable;
use gantry_shared::wire::Stream;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest log line; longer output is split into several lines.
pub const MAX_LINE: usize = 64 * 1024;
/// Chunks read ahead of the output loop, at most.
pub const QUEUE: usize = 16;
/// Lines a step may print per second (on average, with a burst of as many) before its
/// output is read more slowly.
pub const LINES_PER_SEC: u64 = 2_000;
/// Bytes a step may print per second (on average, with a burst of as many).
pub const BYTES_PER_SEC: u64 = 1024 * 1024;

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

/// How much a step may still print now: a token bucket shared by its readers.
pub struct Budget {
    state: Mutex<Bucket>,
    /// [`LIMITED`], [`FREE`] or [`DISCARD`].
    mode: AtomicU8,
    /// Bytes dropped since [`Budget::discard`].
    dropped: AtomicU64,
    lines_per_sec: f64,
    bytes_per_sec: f64,
}

/// Output is read at the budget's rate.
const LIMITED: u8 = 0;
/// The script has exited: what is left in its pipes is read at once.
const FREE: u8 = 1;
/// The step was stopped: what is left in its pipes is dropped unread.
const DISCARD: u8 = 2;

struct Bucket {
    lines: f64,
    bytes: f64,
    at: Instant,
}

impl Budget {
    pub fn new(lines_per_sec: u64, bytes_per_sec: u64) -> Arc<Self> {
        let (l, b) = (lines_per_sec.max(1) as f64, bytes_per_sec.max(1) as f64);
        Arc::new(Self {
            state: Mutex::new(Bucket {
                lines: l,
                bytes: b,
                at: Instant::now(),
            }),
            mode: AtomicU8::new(LIMITED),
            dropped: AtomicU64::new(0),
            lines_per_sec: l,
            bytes_per_sec: b,
        })
    }

    /// The script has exited: read the rest of its output without waiting (it is bounded by
    /// the pipes' buffers).
    pub fn free(&self) {
        let _ = self
            .mode
            .compare_exchange(LIMITED, FREE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The step was stopped: drop whatever it printed that is still unread, so its end is
    /// not queued behind it.
    pub fn discard(&self) {
        self.mode.store(DISCARD, Ordering::SeqCst);
    }

    /// Bytes dropped since [`Budget::discard`].
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Wait until one line of `bytes` bytes may go, and count it; false: drop it.
    pub async fn take(&self, bytes: usize) -> bool {
        // A line larger than a whole second's bytes needs only a full bucket.
        let need = (bytes as f64).min(self.bytes_per_sec);
        loop {
            match self.mode.load(Ordering::SeqCst) {
                LIMITED => {}
                FREE => return true,
                _ => {
                    self.dropped.fetch_add(bytes as u64, Ordering::SeqCst);
                    return false;
                }
            }
            let wait = {
                let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let secs = now.saturating_duration_since(b.at).as_secs_f64();
                b.at = now;
                b.lines = (b.lines + secs * self.lines_per_sec).min(self.lines_per_sec);
                b.bytes = (b.bytes + secs * self.bytes_per_sec).min(self.bytes_per_sec);
                if b.lines >= 1.0 && b.bytes >= need {
                    b.lines -= 1.0;
                    b.bytes -= bytes as f64;
                    return true;
                }
                let for_lines = (1.0 - b.lines).max(0.0) / self.lines_per_sec;
                let for_bytes = (need - b.bytes).max(0.0) / self.bytes_per_sec;
                Duration::from_secs_f64(for_lines.max(for_bytes).clamp(0.000_1, 1.0))
            };
            // Short naps, so that a change of mode is seen at once.
            tokio::time::sleep(wait.min(Duration::from_millis(20))).await;
        }
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

/// Send one chunk once the budget allows it; false once nobody listens.
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
    if !budget.take(bytes).await {
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
        let budget = Budget::new(u64::MAX, u64::MAX);
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

    #[tokio::test]
    async fn the_budget_slows_a_flood_down() {
        let budget = Budget::new(1000, u64::MAX);
        let started = Instant::now();
        for _ in 0..1500 {
            assert!(budget.take(2).await);
        }
        // 1000 at once, then 500 more at 1000 a second.
        assert!(started.elapsed() >= Duration::from_millis(400));
        budget.discard();
        assert!(!budget.take(2).await);
        assert_eq!(budget.dropped(), 2);
    }
}
