//! # A step's log lines and events on their way out
//!
//! The [`Emitter`] numbers, timestamps, masks and batches a step's log lines (`seq` from 0,
//! no gaps) and hands its events to the outbox. Every line is masked before it leaves, with
//! U+0000 replaced (see [`gantry_shared::text`]) and cut at [`MAX_LINE`] bytes after masking.
//! Pieces of one long line are masked together: the masker keeps back, per stream, the tail
//! that a sensitive value could still continue into, so no value is cut in two unmasked.

use crate::outbox::Outbox;
use crate::output::MAX_LINE;
use chrono::Utc;
use gantry_shared::mask::Masker;
use gantry_shared::text::into_storable;
use gantry_shared::wire::{
    ArtifactSum, Event, LogBatch, LogLine, Origin, Outcome, StepFinished, Stream,
};

/// Lines per batch, at most.
pub const BATCH_LINES: usize = 1000;
/// Bytes of text per batch, at most (roughly).
pub const BATCH_BYTES: usize = 256 * 1024;

/// Numbers, masks and batches lines; sends events.
pub(crate) struct Emitter {
    pub(crate) origin: Origin,
    outbox: Outbox,
    pub(crate) masker: Masker,
    pub(crate) next_seq: u64,
    pub(crate) batch: Vec<LogLine>,
    batch_bytes: usize,
    /// Bytes of text in the batches sent so far.
    sent_bytes: u64,
    /// Unmasked text kept back from a long line's pieces, for stdout and stderr.
    carry: [String; 2],
    /// Part of the current line of stdout, stderr already went out.
    open: [bool; 2],
    /// Files named by `createArtifact` (path, name), collected after the script.
    pub(crate) requested_artifacts: Vec<(String, Option<String>)>,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stderr => 1,
        _ => 0,
    }
}

impl Emitter {
    pub(crate) fn new(origin: Origin, outbox: Outbox, masker: Masker) -> Self {
        Self {
            origin,
            outbox,
            masker,
            next_seq: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            sent_bytes: 0,
            carry: [String::new(), String::new()],
            open: [false, false],
            requested_artifacts: Vec::new(),
        }
    }

    /// Lines and bytes of text emitted so far, sent or still in the batch.
    pub(crate) fn emitted(&self) -> (u64, u64) {
        (
            self.next_seq.saturating_add(self.batch.len() as u64),
            self.sent_bytes.saturating_add(self.batch_bytes as u64),
        )
    }

    pub(crate) fn origin(&self) -> Origin {
        self.origin.clone()
    }

    pub(crate) async fn event(&self, ev: Event) {
        self.outbox.send(ev.encode()).await;
    }

    /// A whole line.
    pub(crate) async fn line(&mut self, stream: Stream, text: &str) {
        let masked = self.masker.mask(text).into_owned();
        self.push(stream, masked, true).await;
    }

    /// One piece of a line of stdout or stderr; `last` ends the line.
    pub(crate) async fn piece(&mut self, stream: Stream, text: &str, last: bool) {
        let i = index(stream);
        let masked = self.masker.mask_piece(&mut self.carry[i], text, last);
        // An empty line is a line; an empty rest of a long one is not.
        let nothing_yet = !self.open[i];
        self.open[i] = !last;
        if masked.is_empty() && !(last && nothing_yet) {
            return;
        }
        self.push(stream, masked, last && nothing_yet).await;
    }

    /// Part of the current line of `stream` already went out.
    pub(crate) fn line_open(&self, stream: Stream) -> bool {
        self.open[index(stream)]
    }

    /// End the lines that are still open (their last piece never came).
    pub(crate) async fn close_pieces(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            if self.open[index(stream)] {
                self.piece(stream, "", true).await;
            }
        }
    }

    pub(crate) async fn gantry(&mut self, text: &str) {
        self.line(Stream::Gantry, text).await;
    }

    /// Queue masked text as one line, or several when it is longer than [`MAX_LINE`];
    /// `keep_empty`: an empty text is still a line.
    async fn push(&mut self, stream: Stream, text: String, keep_empty: bool) {
        let text = into_storable(text);
        if text.is_empty() && !keep_empty {
            return;
        }
        let mut rest = text.as_str();
        loop {
            let mut cut = rest.len().min(MAX_LINE);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let (head, tail) = rest.split_at(cut);
            self.batch_bytes = self.batch_bytes.saturating_add(head.len());
            self.batch.push(LogLine {
                ts: Utc::now(),
                stream,
                text: head.to_owned(),
            });
            if self.batch.len() >= BATCH_LINES || self.batch_bytes >= BATCH_BYTES {
                self.flush().await;
            }
            if tail.is_empty() {
                break;
            }
            rest = tail;
        }
    }

    pub(crate) async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.batch);
        let first_seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(lines.len() as u64);
        self.sent_bytes = self.sent_bytes.saturating_add(self.batch_bytes as u64);
        self.batch_bytes = 0;
        self.event(Event::LogBatch(LogBatch {
            origin: self.origin.clone(),
            first_seq,
            lines,
        }))
        .await;
    }

    /// End the attempt: `StepFinished`, carrying the lines still in the batch (one message,
    /// not a last `LogBatch` and then `StepFinished`), its error masked.
    pub(crate) async fn finish(
        mut self,
        outcome: Outcome,
        exit_code: Option<i32>,
        error: Option<String>,
        artifacts: Vec<ArtifactSum>,
    ) {
        let lines = std::mem::take(&mut self.batch);
        self.next_seq = self.next_seq.saturating_add(lines.len() as u64);
        let error = error.map(|e| self.masker.mask(&e).into_owned());
        self.event(Event::StepFinished(StepFinished {
            origin: self.origin(),
            outcome,
            exit_code,
            line_count: self.next_seq,
            error,
            finished_at: Utc::now(),
            artifacts,
            lines,
        }))
        .await;
    }
}
