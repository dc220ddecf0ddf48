//! Incremental scanner for the Managed Agents server-sent-events stream.
//!
//! The filter sees an SSE response (`…/events/stream`, `…/stream`, `…/threads/{tid}/stream`)
//! as a sequence of body chunks, cut wherever the network cut it, on a stream that may stay
//! open for hours and carry multi-megabyte `agent.message` / `agent.tool_result` frames. To
//! meter usage the gateway only needs the data of a handful of small events
//! (`span.model_request_end`, `span.outcome_evaluation_end`, `session.usage`). This module
//! owns turning the chunks into those events, and nothing else: it never modifies, delays or
//! buffers the stream itself — the caller forwards every chunk untouched.
//!
//! # Parsing rules
//! The WHATWG "event stream interpretation" rules
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream>):
//! lines end with LF, CR or CRLF (a CR ending one chunk and an LF starting the next are one
//! line end); one UTF-8 BOM at the very start of the stream is skipped; `:` lines are
//! comments; a line without a colon is a field name with an empty value; one space after the
//! colon is stripped; `event`, `data` (lines joined with `\n`), `id` (ignored if it contains
//! NUL) and `retry` (ASCII digits only) are recognised, other fields ignored; a blank line
//! dispatches the frame; a frame without `data` is not dispatched; the default name is
//! `message`. The `id` reported with an event is the *last event id*, which, as in browsers,
//! persists across frames until another `id:` line changes it.
//!
//! Deliberate deviations, all at the edges, because we meter rather than render:
//! - [`Scanner::finish`] treats an unterminated last line as terminated and dispatches a last
//!   frame that has data but no trailing blank line (a browser discards it). A stream cut in
//!   the middle of a JSON line then yields data that fails to parse, which the caller must
//!   handle anyway; a stream cut just before the blank line still gets its usage counted.
//! - An `id` longer than [`MAX_ID_BYTES`] clears the last event id (reported as `None`)
//!   rather than being kept whole or truncated: we never report an id we could not hold.
//! - Event names longer than [`MAX_EVENT_NAME_BYTES`] are never interesting.
//! - Only the data of interesting frames is kept; a frame that was first named uninteresting
//!   after some of its data had arrived (its data was dropped), then renamed interesting, is
//!   not dispatched: the data is gone. No server does this.
//!
//! # Bounded memory
//! Whatever arrives, the scanner holds at most: fixed-size buffers for the field name
//! ([`MAX_FIELD_NAME_BYTES`]), the event name ([`MAX_EVENT_NAME_BYTES`]) and the id being read
//! ([`MAX_ID_BYTES`]); the last event id (at most `3 * MAX_ID_BYTES` after lossy UTF-8
//! decoding); and the data of the one frame in progress, capped at
//! [`ScannerConfig::max_event_bytes`]. Data is only accumulated while the frame's name is
//! interesting or not yet known (`data:` may precede `event:`); the moment an uninteresting
//! name is seen it is dropped, and the rest of that frame is skipped by jumping from line end
//! to line end. An interesting frame that outgrows the cap is dispatched with
//! `oversize = true` and empty data. A giant line without a line end costs nothing either:
//! only its first few bytes are looked at. [`Scanner::buffered_bytes`] reports the heap held.
//!
//! # Speed
//! The hot path is skipping the data of uninteresting frames, so the scanner spends its time
//! in [`find_line_end`], a block search (SIMD compares natively, SWAR words in the module); it
//! allocates nothing per line and calls no function pointer per byte. `ma-bench` measures it
//! against a bare walk over the same line ends.

/// Default cap on the data of one interesting event: metering events are a few KiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;
/// Event names longer than this are treated as uninteresting (none of ours come close).
pub const MAX_EVENT_NAME_BYTES: usize = 128;
/// Longest `id` kept; a longer one clears the last event id.
pub const MAX_ID_BYTES: usize = 256;
/// Longest field name looked at; longer names are unknown fields (the longest known is 5).
pub const MAX_FIELD_NAME_BYTES: usize = 16;
/// Data capacity kept between frames; a rarer, larger buffer is released after use so that an
/// idle stream does not pin the memory of its largest event.
const RETAIN_DATA_CAPACITY: usize = 16 * 1024;
/// The UTF-8 byte order mark.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// The name of frames without an `event:` line.
const DEFAULT_EVENT_NAME: &str = "message";

/// Scanner settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScannerConfig {
    /// Largest data (after joining lines with `\n`) kept for one interesting event; larger
    /// events are dispatched with `oversize = true` and empty data.
    pub max_event_bytes: usize,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

/// One dispatched interesting event, borrowed from the scanner for the callback's duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The event name (one of the interesting names; `message` when the frame had none).
    pub name: &'a str,
    /// The last event id (`id:` field) at dispatch, `None` when empty or never set.
    pub id: Option<&'a str>,
    /// The data lines joined with `\n`; empty when `oversize`.
    pub data: &'a [u8],
    /// The data outgrew [`ScannerConfig::max_event_bytes`] and was dropped.
    pub oversize: bool,
}

/// Counters over the whole stream.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes fed, BOM included.
    pub bytes: u64,
    /// Frames with at least one `data` line (what a browser would dispatch), interesting or not.
    pub events: u64,
    /// Frames with field lines but no `data` line (e.g. `event: ping`): never dispatched.
    pub dataless: u64,
    /// Events handed to the callback (oversize ones included).
    pub interesting: u64,
    /// Interesting events handed over with `oversize = true`.
    pub oversize: u64,
    /// Comment lines (`: ping` heartbeats and the like).
    pub comments: u64,
}

/// A recognised field, while its value is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Event,
    Data,
    Id,
    Retry,
}

/// Where in the current line the scanner is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// No byte of the line seen yet.
    Start,
    /// Reading the field name (before any colon).
    Name,
    /// Just after the colon: one space may be skipped.
    ValueStart(Field),
    /// Reading the value of a field we keep.
    Value(Field),
    /// Comment, unknown field, or data nobody wants: jump to the line end.
    Skip,
}

/// The current frame's name, as far as interest goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Name {
    /// No (or an empty) `event:` line so far: `message`, unless a later line renames it.
    Unset,
    /// Index into the scanner's interesting names.
    Interesting(usize),
    Uninteresting,
}

/// Incremental SSE scanner; see the module documentation.
#[derive(Debug, Clone)]
pub struct Scanner {
    interest: Vec<String>,
    /// Index of `message` in `interest`, for frames without a name.
    message_idx: Option<usize>,
    max_event_bytes: usize,

    // Stream state.
    /// BOM bytes matched so far at the start of the stream.
    bom_matched: usize,
    bom_done: bool,
    /// The last line ended with CR: an LF starting the next input belongs to it.
    after_cr: bool,
    line: Line,
    field_name: [u8; MAX_FIELD_NAME_BYTES],
    field_len: usize,

    // Frame state.
    name: Name,
    name_buf: [u8; MAX_EVENT_NAME_BYTES],
    name_len: usize,
    name_overflow: bool,
    /// The frame had a non-comment line.
    has_fields: bool,
    /// The frame had a `data` line (WHATWG: its data buffer is not empty).
    has_data: bool,
    /// The data outgrew the cap and was dropped.
    oversize: bool,
    /// Data was dropped because the frame was named uninteresting.
    lost: bool,
    data: Vec<u8>,

    // `id` and `retry`.
    id_buf: [u8; MAX_ID_BYTES],
    id_len: usize,
    id_overflow: bool,
    id_nul: bool,
    last_id: String,
    retry_acc: u64,
    retry_digits: bool,
    retry_valid: bool,
    retry: Option<u64>,

    stats: ScanStats,
}

impl Scanner {
    /// A scanner that hands over the events named in `interesting` (add `message` to get
    /// frames without an `event:` line). Names longer than [`MAX_EVENT_NAME_BYTES`] never match.
    pub fn new(interesting: &[&str], config: ScannerConfig) -> Self {
        let interest: Vec<String> = interesting
            .iter()
            .filter(|n| n.len() <= MAX_EVENT_NAME_BYTES)
            .map(|n| (*n).to_owned())
            .collect();
        let message_idx = interest.iter().position(|n| n == DEFAULT_EVENT_NAME);
        Self {
            interest,
            message_idx,
            max_event_bytes: config.max_event_bytes,
            bom_matched: 0,
            bom_done: false,
            after_cr: false,
            line: Line::Start,
            field_name: [0; MAX_FIELD_NAME_BYTES],
            field_len: 0,
            name: Name::Unset,
            name_buf: [0; MAX_EVENT_NAME_BYTES],
            name_len: 0,
            name_overflow: false,
            has_fields: false,
            has_data: false,
            oversize: false,
            lost: false,
            data: Vec::new(),
            id_buf: [0; MAX_ID_BYTES],
            id_len: 0,
            id_overflow: false,
            id_nul: false,
            last_id: String::new(),
            retry_acc: 0,
            retry_digits: false,
            retry_valid: false,
            retry: None,
            stats: ScanStats::default(),
        }
    }

    /// Scans one body chunk, calling `on_event` for every interesting event it completes.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(SseEvent<'_>)) {
        self.stats.bytes += chunk.len() as u64;
        let mut input = chunk;
        if !self.bom_done {
            // The BOM may itself be split across chunks: match it byte by byte.
            while self.bom_matched < BOM.len() {
                let Some((&b, rest)) = input.split_first() else {
                    return;
                };
                if b != BOM[self.bom_matched] {
                    break;
                }
                self.bom_matched += 1;
                input = rest;
            }
            self.bom_done = true;
            if self.bom_matched < BOM.len() {
                // Not a BOM after all: the bytes matched so far are content.
                let matched = self.bom_matched;
                self.scan(&BOM[..matched], on_event);
            }
        }
        self.scan(input, on_event);
    }

    /// Ends the stream: an unterminated last line counts as terminated and a last frame with
    /// data is dispatched even without its blank line (see the module docs). Idempotent;
    /// feeding afterwards starts on a fresh line and frame.
    pub fn finish(&mut self, on_event: &mut dyn FnMut(SseEvent<'_>)) {
        if !self.bom_done {
            self.bom_done = true;
            let matched = self.bom_matched;
            self.scan(&BOM[..matched], on_event);
        }
        match self.line {
            Line::Start | Line::Skip => {}
            Line::Name => self.field_without_value(),
            Line::ValueStart(field) | Line::Value(field) => self.end_value(field),
        }
        self.line = Line::Start;
        self.after_cr = false;
        self.dispatch(on_event);
    }

    /// Counters so far.
    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The last valid `retry:` value seen, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Heap bytes currently held (data buffer and last event id); the fixed-size name and id
    /// buffers live inline in the struct and never grow.
    pub fn buffered_bytes(&self) -> usize {
        self.data.capacity() + self.last_id.capacity()
    }

    /// The state machine. Each arm consumes at least one byte or changes state, so it ends.
    fn scan(&mut self, input: &[u8], on_event: &mut dyn FnMut(SseEvent<'_>)) {
        let mut pos = 0;
        while let Some(&b) = input.get(pos) {
            match self.line {
                Line::Start => {
                    if self.after_cr {
                        // The LF of a CRLF (possibly split across chunks), not a blank line.
                        self.after_cr = false;
                        if b == b'\n' {
                            pos += 1;
                            continue;
                        }
                    }
                    match b {
                        b'\n' | b'\r' => {
                            self.after_cr = b == b'\r';
                            pos += 1;
                            self.dispatch(on_event);
                        }
                        b':' => {
                            self.stats.comments += 1;
                            self.line = Line::Skip;
                            pos += 1;
                        }
                        _ => {
                            self.has_fields = true;
                            self.field_len = 0;
                            self.line = Line::Name;
                        }
                    }
                }
                Line::Name => {
                    // Field names are short; past MAX_FIELD_NAME_BYTES the field is unknown
                    // whatever follows, so this loop looks at most at 17 bytes per line.
                    let rest = &input[pos..];
                    let mut consumed = rest.len();
                    for (i, &c) in rest.iter().enumerate() {
                        match c {
                            b':' => {
                                consumed = i + 1;
                                self.line = match self.field() {
                                    Some(field) => self.begin_value(field),
                                    None => Line::Skip,
                                };
                                break;
                            }
                            b'\n' | b'\r' => {
                                consumed = i + 1;
                                self.field_without_value();
                                self.after_cr = c == b'\r';
                                self.line = Line::Start;
                                break;
                            }
                            _ if self.field_len == MAX_FIELD_NAME_BYTES => {
                                consumed = i;
                                self.line = Line::Skip;
                                break;
                            }
                            _ => {
                                self.field_name[self.field_len] = c;
                                self.field_len += 1;
                            }
                        }
                    }
                    pos += consumed;
                }
                Line::ValueStart(field) => {
                    if b == b' ' {
                        pos += 1;
                    }
                    self.line = Line::Value(field);
                }
                Line::Value(field) => {
                    let rest = &input[pos..];
                    match find_line_end(rest) {
                        Some(i) => {
                            self.value_bytes(field, &rest[..i]);
                            self.end_value(field);
                            self.after_cr = rest[i] == b'\r';
                            self.line = Line::Start;
                            pos += i + 1;
                        }
                        None => {
                            self.value_bytes(field, rest);
                            if field == Field::Data && self.oversize {
                                self.line = Line::Skip;
                            }
                            pos = input.len();
                        }
                    }
                }
                Line::Skip => match find_line_end(&input[pos..]) {
                    Some(i) => {
                        self.after_cr = input[pos + i] == b'\r';
                        self.line = Line::Start;
                        pos += i + 1;
                    }
                    None => pos = input.len(),
                },
            }
        }
    }

    /// The recognised field named by the line read so far, if any.
    fn field(&self) -> Option<Field> {
        match &self.field_name[..self.field_len] {
            b"event" => Some(Field::Event),
            b"data" => Some(Field::Data),
            b"id" => Some(Field::Id),
            b"retry" => Some(Field::Retry),
            _ => None,
        }
    }

    /// A line holding only a field name: the field with an empty value.
    fn field_without_value(&mut self) {
        if let Some(field) = self.field() {
            if let Line::ValueStart(field) = self.begin_value(field) {
                self.end_value(field);
            }
        }
    }

    /// Prepares for a field's value; returns the next line state.
    fn begin_value(&mut self, field: Field) -> Line {
        match field {
            Field::Event => {
                self.name_len = 0;
                self.name_overflow = false;
            }
            Field::Data => {
                let keep = match self.name {
                    Name::Uninteresting => {
                        self.lost = true;
                        false
                    }
                    Name::Unset | Name::Interesting(_) => !self.oversize,
                };
                if keep && self.has_data {
                    // WHATWG appends LF after every data line and drops the last one; joining
                    // with LF before every line but the first is the same thing.
                    self.append_data(b"\n");
                }
                self.has_data = true;
                if !keep || self.oversize {
                    return Line::Skip;
                }
            }
            Field::Id => {
                self.id_len = 0;
                self.id_overflow = false;
                self.id_nul = false;
            }
            Field::Retry => {
                self.retry_acc = 0;
                self.retry_digits = false;
                self.retry_valid = true;
            }
        }
        Line::ValueStart(field)
    }

    /// A piece of a field's value (a value may span chunks).
    fn value_bytes(&mut self, field: Field, bytes: &[u8]) {
        match field {
            Field::Data => self.append_data(bytes),
            Field::Event => {
                let end = self.name_len + bytes.len();
                if self.name_overflow || end > MAX_EVENT_NAME_BYTES {
                    self.name_overflow = true;
                } else {
                    self.name_buf[self.name_len..end].copy_from_slice(bytes);
                    self.name_len = end;
                }
            }
            Field::Id => {
                let end = self.id_len + bytes.len();
                if self.id_overflow || end > MAX_ID_BYTES {
                    self.id_overflow = true;
                } else {
                    self.id_nul |= bytes.contains(&0);
                    self.id_buf[self.id_len..end].copy_from_slice(bytes);
                    self.id_len = end;
                }
            }
            Field::Retry => {
                for &c in bytes {
                    if c.is_ascii_digit() {
                        self.retry_digits = true;
                        self.retry_acc = self
                            .retry_acc
                            .saturating_mul(10)
                            .saturating_add(u64::from(c - b'0'));
                    } else {
                        self.retry_valid = false;
                    }
                }
            }
        }
    }

    /// The end of a field's line.
    fn end_value(&mut self, field: Field) {
        match field {
            Field::Data => {}
            Field::Event => {
                let name = &self.name_buf[..self.name_len];
                self.name = if self.name_overflow {
                    Name::Uninteresting
                } else if name.is_empty() {
                    // WHATWG: an empty event type buffer dispatches as `message`.
                    Name::Unset
                } else {
                    match self.interest.iter().position(|n| n.as_bytes() == name) {
                        Some(i) => Name::Interesting(i),
                        None => Name::Uninteresting,
                    }
                };
                if self.name == Name::Uninteresting && self.has_data {
                    // `data:` came before `event:`: what was kept is nobody's business.
                    self.lost = true;
                    self.release_data();
                }
            }
            Field::Id => {
                if self.id_overflow {
                    self.last_id.clear();
                } else if !self.id_nul {
                    self.last_id.clear();
                    self.last_id
                        .push_str(&String::from_utf8_lossy(&self.id_buf[..self.id_len]));
                }
            }
            Field::Retry => {
                if self.retry_valid && self.retry_digits {
                    self.retry = Some(self.retry_acc);
                }
            }
        }
    }

    /// Appends to the kept data, or marks the frame oversize and drops it.
    fn append_data(&mut self, bytes: &[u8]) {
        if self.oversize {
            return;
        }
        let len = self.data.len().saturating_add(bytes.len());
        if len > self.max_event_bytes {
            self.oversize = true;
            self.release_data();
            return;
        }
        if len > self.data.capacity() {
            // Grow geometrically, but never past the cap.
            let target = len
                .max(self.data.capacity().saturating_mul(2))
                .max(256)
                .min(self.max_event_bytes);
            self.data.reserve_exact(target - self.data.len());
        }
        self.data.extend_from_slice(bytes);
    }

    /// Drops the kept data, and its memory when it is larger than what we keep around.
    fn release_data(&mut self) {
        if self.data.capacity() > RETAIN_DATA_CAPACITY {
            self.data = Vec::new();
        } else {
            self.data.clear();
        }
    }

    /// A blank line (or the end of the stream): hand over the frame if wanted, then reset it.
    fn dispatch(&mut self, on_event: &mut dyn FnMut(SseEvent<'_>)) {
        if self.has_data {
            self.stats.events += 1;
            let wanted = match self.name {
                Name::Unset => self.message_idx,
                Name::Interesting(i) => Some(i),
                Name::Uninteresting => None,
            };
            if let (Some(i), false) = (wanted, self.lost) {
                self.stats.interesting += 1;
                if self.oversize {
                    self.stats.oversize += 1;
                }
                on_event(SseEvent {
                    name: self
                        .interest
                        .get(i)
                        .map_or(DEFAULT_EVENT_NAME, String::as_str),
                    id: (!self.last_id.is_empty()).then_some(self.last_id.as_str()),
                    data: if self.oversize { &[] } else { &self.data },
                    oversize: self.oversize,
                });
            }
        } else if self.has_fields {
            self.stats.dataless += 1;
        }
        self.name = Name::Unset;
        self.has_fields = false;
        self.has_data = false;
        self.oversize = false;
        self.lost = false;
        self.release_data();
    }
}

/// Position of the first line-end byte (LF or CR) in `hay`.
///
/// Searches 32-byte blocks; only a block that holds a hit is searched byte by byte. How a
/// block is tested depends on the target, because the fast form differs:
/// - native targets with SIMD (x86_64 SSE2, aarch64 NEON), or wasm32 built with `simd128`:
///   a branch-free OR of byte compares, which LLVM vectorises ([`block_has_line_end_simd`]);
/// - wasm32 without `simd128` (the shipped module): four 64-bit words with the SWAR
///   "has a zero byte" trick ([`block_has_line_end_swar`]), which stays fast whatever the
///   opt-level, so the module can be built for size. Measured under V8 (`node`): 3.6 GB/s at
///   `opt-level = "s"`, where the byte-compare loop managed 1.0 GB/s.
///
/// Both forms are unit-tested on every target. No `unsafe`, no external crates. Public so that
/// `ma-bench` can use the very same loop as its physical-limit baseline.
#[inline]
pub fn find_line_end(hay: &[u8]) -> Option<usize> {
    #[cfg(all(target_arch = "wasm32", not(target_feature = "simd128")))]
    let block_has_line_end = block_has_line_end_swar;
    #[cfg(not(all(target_arch = "wasm32", not(target_feature = "simd128"))))]
    let block_has_line_end = block_has_line_end_simd;
    find_line_end_with(hay, block_has_line_end)
}

const LINE_END_BLOCK: usize = 32;

#[inline(always)]
fn find_line_end_with(hay: &[u8], block_has_line_end: fn(&[u8]) -> bool) -> Option<usize> {
    let mut blocks = hay.chunks_exact(LINE_END_BLOCK);
    let mut base = 0;
    for block in &mut blocks {
        if block_has_line_end(block) {
            if let Some(i) = block.iter().position(|&b| b == b'\n' || b == b'\r') {
                return Some(base + i);
            }
        }
        base += LINE_END_BLOCK;
    }
    blocks
        .remainder()
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|i| base + i)
}

/// Branch-free OR of byte compares: vectorised by LLVM where the target has SIMD.
#[inline(always)]
#[cfg_attr(
    all(target_arch = "wasm32", not(target_feature = "simd128")),
    allow(dead_code)
)]
fn block_has_line_end_simd(block: &[u8]) -> bool {
    let mut hit = false;
    for &b in block {
        hit |= (b == b'\n') | (b == b'\r');
    }
    hit
}

/// Word-at-a-time: `x ^ 0x0a0a…` has a zero byte exactly where `x` holds LF.
#[inline(always)]
#[cfg_attr(
    not(all(target_arch = "wasm32", not(target_feature = "simd128"))),
    allow(dead_code)
)]
fn block_has_line_end_swar(block: &[u8]) -> bool {
    let mut hit = 0u64;
    for word in block.chunks_exact(8) {
        if let Ok(bytes) = <[u8; 8]>::try_from(word) {
            let x = u64::from_le_bytes(bytes);
            hit |= has_zero_byte(x ^ LF_WORD) | has_zero_byte(x ^ CR_WORD);
        }
    }
    hit != 0
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
const LF_WORD: u64 = u64::from_ne_bytes([b'\n'; 8]);
const CR_WORD: u64 = u64::from_ne_bytes([b'\r'; 8]);

/// Non-zero exactly when some byte of `x` is zero (the set bits may over-report *which*
/// byte, which is why a hit block is re-searched byte by byte).
#[inline(always)]
fn has_zero_byte(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGHS
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::test_rng::Rng;

    const METERED: [&str; 4] = [
        "span.model_request_end",
        "span.outcome_evaluation_end",
        "session.usage",
        "message",
    ];

    /// An owned copy of a dispatched event, for comparisons.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Ev {
        name: String,
        id: Option<String>,
        data: Vec<u8>,
        oversize: bool,
    }

    fn ev(name: &str, id: Option<&str>, data: &str) -> Ev {
        Ev {
            name: name.to_owned(),
            id: id.map(str::to_owned),
            data: data.as_bytes().to_vec(),
            oversize: false,
        }
    }

    fn oversize(name: &str) -> Ev {
        Ev {
            name: name.to_owned(),
            id: None,
            data: Vec::new(),
            oversize: true,
        }
    }

    /// Everything observable about a scan.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        events: Vec<Ev>,
        stats: ScanStats,
        retry: Option<u64>,
    }

    fn scan_chunks(chunks: &[&[u8]], interesting: &[&str], max: usize) -> Outcome {
        let mut scanner = Scanner::new(
            interesting,
            ScannerConfig {
                max_event_bytes: max,
            },
        );
        let mut events = Vec::new();
        let mut on_event = |e: SseEvent<'_>| {
            events.push(Ev {
                name: e.name.to_owned(),
                id: e.id.map(str::to_owned),
                data: e.data.to_vec(),
                oversize: e.oversize,
            });
        };
        for chunk in chunks {
            scanner.feed(chunk, &mut on_event);
        }
        scanner.finish(&mut on_event);
        Outcome {
            events,
            stats: scanner.stats(),
            retry: scanner.retry(),
        }
    }

    fn scan(input: &str) -> Outcome {
        scan_chunks(&[input.as_bytes()], &METERED, DEFAULT_MAX_EVENT_BYTES)
    }

    fn stats(
        events: u64,
        dataless: u64,
        interesting: u64,
        comments: u64,
        bytes: usize,
    ) -> ScanStats {
        ScanStats {
            bytes: bytes as u64,
            events,
            dataless,
            interesting,
            oversize: 0,
            comments,
        }
    }

    // ---- framing ----------------------------------------------------------------------------

    #[test]
    fn dispatches_an_interesting_frame() {
        let input = "event: span.model_request_end\ndata: {\"a\":1}\n\n";
        let out = scan(input);
        assert_eq!(
            out.events,
            vec![ev("span.model_request_end", None, "{\"a\":1}")]
        );
        assert_eq!(out.stats, stats(1, 0, 1, 0, input.len()));
    }

    #[test]
    fn skips_uninteresting_frames_but_counts_them() {
        let input = "event: agent.message\ndata: {\"big\":true}\n\n\
                     event: session.usage\ndata: {\"u\":2}\n\n";
        let out = scan(input);
        assert_eq!(out.events, vec![ev("session.usage", None, "{\"u\":2}")]);
        assert_eq!(out.stats, stats(2, 0, 1, 0, input.len()));
    }

    #[test]
    fn frames_without_a_name_are_message() {
        let out = scan("data: hello\n\n");
        assert_eq!(out.events, vec![ev("message", None, "hello")]);
        // `event:` with an empty value is also `message` (WHATWG: empty type buffer).
        let out = scan("event:\ndata: x\n\n");
        assert_eq!(out.events, vec![ev("message", None, "x")]);
        let out = scan("event: message\ndata: y\n\n");
        assert_eq!(out.events, vec![ev("message", None, "y")]);
        // Without `message` in the interest set they are counted, not dispatched.
        let out = scan_chunks(&[b"data: hello\n\n"], &["session.usage"], 1024);
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats, stats(1, 0, 0, 0, 13));
    }

    #[test]
    fn last_event_line_wins() {
        let out = scan("event: agent.message\nevent: session.usage\ndata: u\n\n");
        assert_eq!(out.events, vec![ev("session.usage", None, "u")]);
        let out = scan("event: session.usage\nevent: agent.message\ndata: u\n\n");
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats.events, 1);
    }

    #[test]
    fn line_endings_lf_cr_crlf() {
        let input = "event: session.usage\r\ndata: a\r\n\r\n\
                     event: session.usage\rdata: b\r\r\
                     event: session.usage\ndata: c\n\n\
                     data: d\r\n\n\
                     data: e\n\r";
        let out = scan(input);
        assert_eq!(
            out.events,
            vec![
                ev("session.usage", None, "a"),
                ev("session.usage", None, "b"),
                ev("session.usage", None, "c"),
                ev("message", None, "d"),
                ev("message", None, "e"),
            ]
        );
        assert_eq!(out.stats, stats(5, 0, 5, 0, input.len()));
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        // Were the split CRLF two line ends, `a` would be dispatched alone.
        let out = scan_chunks(
            &[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"],
            &METERED,
            1024,
        );
        assert_eq!(out.events, vec![ev("message", None, "a\nb")]);
        assert_eq!(out.stats, stats(1, 0, 1, 0, 20));
    }

    #[test]
    fn lone_cr_at_chunk_end_followed_by_text() {
        let out = scan_chunks(&[b"data: a\r", b"data: b\r", b"\r"], &METERED, 1024);
        assert_eq!(out.events, vec![ev("message", None, "a\nb")]);
        // A CR then a CR is a line end and a blank line.
        let out = scan_chunks(&[b"data: a\r", b"\r", b"data: b\n\n"], &METERED, 1024);
        assert_eq!(
            out.events,
            vec![ev("message", None, "a"), ev("message", None, "b")]
        );
    }

    #[test]
    fn consecutive_blank_lines_dispatch_nothing() {
        let input = "\n\n\r\n\r\rdata: x\n\n\n\n";
        let out = scan(input);
        assert_eq!(out.events, vec![ev("message", None, "x")]);
        assert_eq!(out.stats, stats(1, 0, 1, 0, input.len()));
    }

    // ---- BOM --------------------------------------------------------------------------------

    #[test]
    fn leading_bom_is_skipped_even_when_split() {
        let whole = scan("\u{feff}data: x\n\n");
        assert_eq!(whole.events, vec![ev("message", None, "x")]);
        assert_eq!(whole.stats.bytes, 12);
        let split = scan_chunks(
            &[b"\xEF", b"", b"\xBB", b"\xBF", b"data: x\n\n"],
            &METERED,
            1024,
        );
        assert_eq!(split, whole);
    }

    #[test]
    fn only_one_bom_and_only_at_the_start() {
        // A second BOM is part of the first field name: `\u{feff}data` is an unknown field.
        let out = scan("\u{feff}\u{feff}data: x\n\ndata: y\n\n");
        assert_eq!(out.events, vec![ev("message", None, "y")]);
        assert_eq!(out.stats.dataless, 1);
        let out = scan("data: y\n\n\u{feff}data: z\n\n");
        assert_eq!(out.events, vec![ev("message", None, "y")]);
    }

    #[test]
    fn partial_bom_is_content() {
        // EF BB then `d`: not a BOM; the bytes belong to the field name (unknown field).
        let out = scan_chunks(&[b"\xEF\xBB", b"data: x\n\ndata: y\n\n"], &METERED, 1024);
        assert_eq!(out.events, vec![ev("message", None, "y")]);
        assert_eq!(out.stats.dataless, 1);
        // EF then a blank line: the line `\xEF` is an unknown field, then the frame ends.
        let out = scan_chunks(&[b"\xEF", b"\n\ndata: y\n\n"], &METERED, 1024);
        assert_eq!(out.events, vec![ev("message", None, "y")]);
        assert_eq!(out.stats, stats(1, 1, 1, 0, 12));
        // A stream that is only a BOM prefix.
        let out = scan_chunks(&[b"\xEF\xBB"], &METERED, 1024);
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats, stats(0, 1, 0, 0, 2));
    }

    // ---- fields -----------------------------------------------------------------------------

    #[test]
    fn comments_are_counted_and_do_not_end_frames() {
        let input = ": ping\n\n:\nevent: session.usage\n: in the middle\ndata: u\n\n";
        let out = scan(input);
        assert_eq!(out.events, vec![ev("session.usage", None, "u")]);
        assert_eq!(out.stats, stats(1, 0, 1, 3, input.len()));
    }

    #[test]
    fn field_without_colon_has_an_empty_value() {
        let out = scan("data\n\n");
        assert_eq!(out.events, vec![ev("message", None, "")]);
        let out = scan("data\ndata\n\n");
        assert_eq!(out.events, vec![ev("message", None, "\n")]);
        let out = scan("event: session.usage\nevent\ndata: m\n\n");
        assert_eq!(out.events, vec![ev("message", None, "m")]);
    }

    #[test]
    fn one_space_after_the_colon_is_stripped() {
        let out = scan("data:x\n\ndata: x\n\ndata:  x\n\ndata: \n\ndata:\n\ndata:\tx\n\n");
        let data: Vec<Vec<u8>> = out.events.into_iter().map(|e| e.data).collect();
        let want: Vec<&[u8]> = vec![b"x", b"x", b" x", b"", b"", b"\tx"];
        assert_eq!(data, want);
        let out = scan("event:session.usage\ndata:u\n\n");
        assert_eq!(out.events, vec![ev("session.usage", None, "u")]);
    }

    #[test]
    fn data_lines_are_joined_with_lf() {
        let out = scan("data: a\ndata: b\ndata:\ndata: c\n\n");
        assert_eq!(out.events, vec![ev("message", None, "a\nb\n\nc")]);
        let out = scan("data: a\ndata:\n\n");
        assert_eq!(out.events, vec![ev("message", None, "a\n")]);
        // Colons after the first belong to the value.
        let out = scan("data: {\"k\":\"v:w\"}\n\n");
        assert_eq!(out.events, vec![ev("message", None, "{\"k\":\"v:w\"}")]);
    }

    #[test]
    fn id_is_the_last_event_id() {
        let input = "id: 1\ndata: a\n\n\
                     data: b\n\n\
                     id: 2\0x\ndata: c\n\n\
                     id:\ndata: d\n\n\
                     id: 3\ndata: e\n\n\
                     id\ndata: f\n\n";
        let out = scan(input);
        assert_eq!(
            out.events,
            vec![
                ev("message", Some("1"), "a"),
                ev("message", Some("1"), "b"), // persists across frames
                ev("message", Some("1"), "c"), // NUL: ignored
                ev("message", None, "d"),      // empty: reset
                ev("message", Some("3"), "e"),
                ev("message", None, "f"),
            ]
        );
        // An id line in a frame without data still sets it.
        let out = scan("id: 7\n\ndata: g\n\n");
        assert_eq!(out.events, vec![ev("message", Some("7"), "g")]);
        assert_eq!(out.stats.dataless, 1);
    }

    #[test]
    fn overlong_id_clears_the_last_event_id() {
        let max = "i".repeat(MAX_ID_BYTES);
        let long = "i".repeat(MAX_ID_BYTES + 1);
        let out = scan(&format!("id: {max}\ndata: a\n\nid: {long}\ndata: b\n\n"));
        assert_eq!(
            out.events,
            vec![ev("message", Some(&max), "a"), ev("message", None, "b")]
        );
    }

    #[test]
    fn non_utf8_id_is_decoded_lossily() {
        let out = scan_chunks(&[b"id: a\xFFb\ndata: x\n\n"], &METERED, 1024);
        assert_eq!(out.events, vec![ev("message", Some("a\u{fffd}b"), "x")]);
    }

    #[test]
    fn retry_takes_digits_only() {
        assert_eq!(scan("retry: 3000\n\n").retry, Some(3000));
        assert_eq!(scan("retry: 3000\nretry: 12a\n\n").retry, Some(3000));
        assert_eq!(scan("retry: 3000\nretry:\n\n").retry, Some(3000));
        assert_eq!(scan("retry: 3000\nretry\n\n").retry, Some(3000));
        assert_eq!(scan("retry: -1\n\n").retry, None);
        assert_eq!(scan("retry:10\n\n").retry, Some(10));
        assert_eq!(
            scan("retry: 99999999999999999999999\n\n").retry,
            Some(u64::MAX)
        );
        // `retry` alone is not data: nothing dispatched.
        let out = scan("retry: 5\n\n");
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats.dataless, 1);
    }

    #[test]
    fn unknown_and_long_field_names_are_ignored() {
        let long = "d".repeat(10_000);
        let input =
            format!("foo: bar\neventx: session.usage\nDATA: y\n{long}: x\n{long}\ndata: ok\n\n");
        let out = scan(&input);
        assert_eq!(out.events, vec![ev("message", None, "ok")]);
        assert_eq!(out.stats, stats(1, 0, 1, 0, input.len()));
    }

    #[test]
    fn frames_without_data_are_counted_not_dispatched() {
        let input = "event: ping\n\nevent: session.usage\n\nid: 3\n\n";
        let out = scan(input);
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats, stats(0, 3, 0, 0, input.len()));
    }

    #[test]
    fn overlong_event_names_are_uninteresting() {
        let long = "e".repeat(MAX_EVENT_NAME_BYTES + 1);
        let out = scan_chunks(
            &[format!("event: {long}\ndata: x\n\n").as_bytes()],
            &[&long],
            1024,
        );
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats.events, 1);
        let max = "e".repeat(MAX_EVENT_NAME_BYTES);
        let out = scan_chunks(
            &[format!("event: {max}\ndata: x\n\n").as_bytes()],
            &[&max],
            1024,
        );
        assert_eq!(out.events, vec![ev(&max, None, "x")]);
    }

    // ---- data before the name -------------------------------------------------------------

    #[test]
    fn data_before_event_is_kept_for_interesting_names() {
        let out = scan("data: a\ndata: b\nevent: span.model_request_end\ndata: c\n\n");
        assert_eq!(
            out.events,
            vec![ev("span.model_request_end", None, "a\nb\nc")]
        );
    }

    #[test]
    fn data_before_event_is_dropped_for_uninteresting_names() {
        let input = "data: a\nevent: agent.message\ndata: b\n\ndata: m\n\n";
        let out = scan(input);
        assert_eq!(out.events, vec![ev("message", None, "m")]);
        assert_eq!(out.stats, stats(2, 0, 1, 0, input.len()));
        // Renamed interesting after its data was dropped: not dispatched (documented).
        let out = scan("data: a\nevent: agent.message\nevent: session.usage\n\n");
        assert_eq!(out.events, vec![]);
        assert_eq!(out.stats.events, 1);
        // Renamed interesting before any data arrived: fine.
        let out = scan("event: agent.message\nevent: session.usage\ndata: u\n\n");
        assert_eq!(out.events, vec![ev("session.usage", None, "u")]);
    }

    // ---- end of stream ----------------------------------------------------------------------

    #[test]
    fn finish_dispatches_a_frame_without_its_blank_line() {
        let out = scan("event: session.usage\ndata: {\"u\":1}\n");
        assert_eq!(out.events, vec![ev("session.usage", None, "{\"u\":1}")]);
        // An unterminated last line counts as terminated.
        let out = scan("event: session.usage\ndata: {\"u\":1}");
        assert_eq!(out.events, vec![ev("session.usage", None, "{\"u\":1}")]);
        let out = scan("id: 9\ndata: a\ndata");
        assert_eq!(out.events, vec![ev("message", Some("9"), "a\n")]);
        let out = scan("data: a\nevent: session.usage");
        assert_eq!(out.events, vec![ev("session.usage", None, "a")]);
        let out = scan("data:");
        assert_eq!(out.events, vec![ev("message", None, "")]);
        // Nothing pending: nothing dispatched.
        let out = scan("data: a\n\n: bye");
        assert_eq!(out.events, vec![ev("message", None, "a")]);
        let out = scan("");
        assert_eq!(
            out,
            Outcome {
                events: vec![],
                stats: ScanStats::default(),
                retry: None
            }
        );
    }

    #[test]
    fn finish_is_idempotent() {
        let mut scanner = Scanner::new(&METERED, ScannerConfig::default());
        let mut n = 0;
        scanner.feed(b"data: a", &mut |_| n += 1);
        scanner.finish(&mut |_| n += 1);
        scanner.finish(&mut |_| n += 1);
        assert_eq!(n, 1);
        assert_eq!(scanner.stats().events, 1);
    }

    // ---- caps -------------------------------------------------------------------------------

    #[test]
    fn oversize_interesting_event_is_dispatched_empty() {
        let input = "event: session.usage\ndata: 0123456789\n\n\
                     event: session.usage\ndata: 01234567890\n\n\
                     event: session.usage\ndata: 01234\ndata: 5678\n\n\
                     event: session.usage\ndata: 01234\ndata: 56789\n\n\
                     event: session.usage\ndata: ok\n\n";
        let out = scan_chunks(&[input.as_bytes()], &METERED, 10);
        assert_eq!(
            out.events,
            vec![
                ev("session.usage", None, "0123456789"), // exactly the cap
                oversize("session.usage"),
                ev("session.usage", None, "01234\n5678"), // the joining LF counts
                oversize("session.usage"),
                ev("session.usage", None, "ok"),
            ]
        );
        assert_eq!(
            out.stats,
            ScanStats {
                bytes: input.len() as u64,
                events: 5,
                dataless: 0,
                interesting: 5,
                oversize: 2,
                comments: 0,
            }
        );
    }

    #[test]
    fn oversize_before_an_uninteresting_name_is_not_counted() {
        let input = "data: 0123456789abc\nevent: agent.message\n\n\
                     data: 0123456789abc\nevent: session.usage\n\n";
        let out = scan_chunks(&[input.as_bytes()], &METERED, 10);
        assert_eq!(out.events, vec![oversize("session.usage")]);
        assert_eq!(out.stats.oversize, 1);
        assert_eq!(out.stats.events, 2);
    }

    #[test]
    fn zero_cap_allows_only_empty_data() {
        let out = scan_chunks(&[b"data:\n\ndata: x\n\n"], &METERED, 0);
        assert_eq!(
            out.events,
            vec![ev("message", None, ""), oversize("message")]
        );
    }

    /// The dispatching function and both block tests, whichever the target picks.
    type LineEndFinder = fn(&[u8]) -> Option<usize>;

    fn line_end_finders() -> [LineEndFinder; 3] {
        [
            find_line_end,
            |hay| find_line_end_with(hay, block_has_line_end_simd),
            |hay| find_line_end_with(hay, block_has_line_end_swar),
        ]
    }

    #[test]
    fn find_line_end_finds_the_first_lf_or_cr() {
        for find_line_end in line_end_finders() {
            assert_eq!(find_line_end(b""), None);
            assert_eq!(find_line_end(b"abc"), None);
            for len in 0..100 {
                for pos in 0..len {
                    for end in [b'\n', b'\r'] {
                        let mut hay = vec![b'x'; len];
                        hay[pos] = end;
                        if pos + 1 < len {
                            hay[len - 1] = b'\n';
                        }
                        assert_eq!(find_line_end(&hay), Some(pos), "len {len} pos {pos}");
                    }
                }
                assert_eq!(find_line_end(&vec![b'y'; len]), None);
            }
        }
    }

    #[test]
    fn find_line_end_has_no_false_hits_on_neighbouring_bytes() {
        // Bytes one bit or one step away from LF/CR, and the borrow-prone 0x00/0x01/0x80/0xff,
        // in every position of a 64-byte haystack, with the real line end at every position.
        let decoys = [
            0x00u8, 0x01, 0x09, 0x0b, 0x0c, 0x0e, 0x1a, 0x2a, 0x80, 0x8a, 0x8d, 0xff,
        ];
        let mut rng = Rng(0x5eed);
        for find_line_end in line_end_finders() {
            for end_at in 0..=64 {
                for _ in 0..50 {
                    let mut hay: Vec<u8> = (0..64)
                        .map(|_| decoys[(rng.next() % decoys.len() as u64) as usize])
                        .collect();
                    let expected = if end_at < 64 {
                        hay[end_at] = if rng.next() % 2 == 0 { b'\n' } else { b'\r' };
                        Some(end_at)
                    } else {
                        None
                    };
                    assert_eq!(find_line_end(&hay), expected, "{hay:02x?}");
                }
            }
        }
    }

    // ---- chunking invariance ----------------------------------------------------------------

    /// Inputs covering every rule, realistic and adversarial, with the cap they run under.
    fn corpus() -> Vec<(&'static str, Vec<u8>, usize)> {
        let mut c: Vec<(&'static str, Vec<u8>, usize)> = vec![
            (
                "realistic",
                b"event: session.status_running\ndata: {\"type\":\"session.status_running\"}\n\n\
                  event: span.model_request_start\ndata: {\"type\":\"span.model_request_start\"}\n\n\
                  : ping\n\n\
                  event: agent.message\ndata: {\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}\n\n\
                  event: span.model_request_end\ndata: {\"type\":\"span.model_request_end\",\"model_usage\":{\"input_tokens\":3571,\"output_tokens\":727}}\n\n\
                  event: session.usage\ndata: {\"type\":\"session.usage\"}\n\n"
                    .to_vec(),
                1024,
            ),
            (
                "crlf",
                b"event: session.usage\r\ndata: a\r\ndata: b\r\n\r\nid: 5\r\ndata: c\r\n\r\n".to_vec(),
                1024,
            ),
            (
                "lone cr",
                b"event: session.usage\rdata: a\r\rdata: b\rdata: c\r\r\r\r: x\rdata: d\r\r".to_vec(),
                1024,
            ),
            (
                "mixed endings",
                b"data: a\r\n\rdata: b\n\r\ndata: c\r\r\ndata: d\n\n".to_vec(),
                1024,
            ),
            ("bom", b"\xEF\xBB\xBFdata: a\r\n\r\ndata: b\n\n".to_vec(), 1024),
            ("partial bom", b"\xEF\xBBdata: a\n\ndata: b\n\n".to_vec(), 1024),
            (
                "comments",
                b": ping\n\n:\r\n: x\revent: session.usage\n:mid\ndata: u\n\n: tail".to_vec(),
                1024,
            ),
            (
                "multi-line data",
                b"data: a\ndata\ndata:\ndata:  b\ndata:c\n\n".to_vec(),
                1024,
            ),
            (
                "data before event",
                b"data: a\nevent: span.model_request_end\ndata: b\n\n\
                  data: x\nevent: agent.message\ndata: y\n\ndata: z\n\n"
                    .to_vec(),
                1024,
            ),
            (
                "no trailing blank line",
                b"event: session.usage\ndata: {\"a\":1}\nid: 4".to_vec(),
                1024,
            ),
            (
                "ids and retry",
                b"id: 1\nretry: 250\ndata: a\n\nid: x\0y\ndata: b\n\nid\nretry: 9x\ndata: c\n\n"
                    .to_vec(),
                1024,
            ),
            (
                "unknown fields",
                b"foo: bar\nevent\nx\ndata: d\n\nevent: ping\n\n".to_vec(),
                1024,
            ),
            (
                "oversize interesting",
                b"event: span.model_request_end\ndata: 0123456789abcdef\ndata: more\n\n\
                  event: span.model_request_end\ndata: small\n\n\
                  data: 0123\ndata: 4567\n\n"
                    .to_vec(),
                9,
            ),
        ];
        // An uninteresting 1 MB event between interesting ones.
        let mut big = b"event: span.model_request_end\ndata: {\"n\":1}\n\n\
                        event: agent.message\ndata: {\"text\":\""
            .to_vec();
        big.extend(std::iter::repeat_n(b'x', 1 << 20));
        big.extend_from_slice(b"\"}\n\nevent: session.usage\ndata: {\"n\":2}\n\n");
        c.push(("1 MB uninteresting", big, 1024));
        // A long data line and long unknown lines near the cap, with CRs.
        let mut long = b"data: ".to_vec();
        long.extend(std::iter::repeat_n(b'y', 300));
        long.extend_from_slice(b"\r\n");
        long.extend(std::iter::repeat_n(b'z', 100));
        long.extend_from_slice(b"\r\rid: ");
        long.extend(std::iter::repeat_n(b'i', MAX_ID_BYTES + 3));
        long.extend_from_slice(b"\rdata: q\r\r");
        c.push(("long lines", long, 280));
        c
    }

    fn whole(input: &[u8], max: usize) -> Outcome {
        scan_chunks(&[input], &METERED, max)
    }

    fn check_chunking(name: &str, input: &[u8], max: usize, cuts: &[usize], want: &Outcome) {
        let mut chunks = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for &cut in cuts {
            chunks.push(&input[start..cut]);
            start = cut;
        }
        chunks.push(&input[start..]);
        let got = scan_chunks(&chunks, &METERED, max);
        assert_eq!(&got, want, "{name}: cuts at {cuts:?}");
    }

    #[test]
    fn corpus_whole_outcomes_are_as_expected() {
        // Pin the reference outcomes, so that chunking tests compare against known-good values.
        let outcomes: Vec<(&str, Outcome)> = corpus()
            .into_iter()
            .map(|(name, input, max)| (name, whole(&input, max)))
            .collect();
        let get = |name: &str| {
            &outcomes
                .iter()
                .find(|(n, _)| *n == name)
                .expect("corpus entry")
                .1
        };
        assert_eq!(get("realistic").events.len(), 2);
        assert_eq!(get("realistic").stats.events, 5);
        assert_eq!(get("realistic").stats.comments, 1);
        assert_eq!(
            get("crlf").events,
            vec![
                ev("session.usage", None, "a\nb"),
                ev("message", Some("5"), "c")
            ]
        );
        assert_eq!(
            get("lone cr").events,
            vec![
                ev("session.usage", None, "a"),
                ev("message", None, "b\nc"),
                ev("message", None, "d")
            ]
        );
        assert_eq!(
            get("mixed endings").events,
            vec![
                ev("message", None, "a"),
                ev("message", None, "b"),
                ev("message", None, "c"),
                ev("message", None, "d")
            ]
        );
        assert_eq!(
            get("bom").events,
            vec![ev("message", None, "a"), ev("message", None, "b")]
        );
        assert_eq!(get("partial bom").events, vec![ev("message", None, "b")]);
        assert_eq!(get("comments").events, vec![ev("session.usage", None, "u")]);
        assert_eq!(get("comments").stats.comments, 5);
        assert_eq!(
            get("multi-line data").events,
            vec![ev("message", None, "a\n\n\n b\nc")]
        );
        assert_eq!(
            get("data before event").events,
            vec![
                ev("span.model_request_end", None, "a\nb"),
                ev("message", None, "z")
            ]
        );
        assert_eq!(
            get("no trailing blank line").events,
            vec![ev("session.usage", Some("4"), "{\"a\":1}")]
        );
        assert_eq!(
            get("ids and retry").events,
            vec![
                ev("message", Some("1"), "a"),
                ev("message", Some("1"), "b"),
                ev("message", None, "c")
            ]
        );
        assert_eq!(get("ids and retry").retry, Some(250));
        assert_eq!(get("unknown fields").events, vec![ev("message", None, "d")]);
        assert_eq!(get("unknown fields").stats.dataless, 1);
        assert_eq!(
            get("oversize interesting").events,
            vec![
                oversize("span.model_request_end"),
                ev("span.model_request_end", None, "small"),
                ev("message", None, "0123\n4567")
            ]
        );
        assert_eq!(
            get("1 MB uninteresting").events,
            vec![
                ev("span.model_request_end", None, "{\"n\":1}"),
                ev("session.usage", None, "{\"n\":2}")
            ]
        );
        assert_eq!(get("1 MB uninteresting").stats.events, 3);
        assert_eq!(
            get("long lines").events,
            vec![oversize("message"), ev("message", None, "q")]
        );
    }

    #[test]
    fn every_two_chunk_split_gives_the_same_outcome() {
        for (name, input, max) in corpus() {
            let want = whole(&input, max);
            if input.len() <= 64 * 1024 {
                for cut in 0..=input.len() {
                    check_chunking(name, &input, max, &[cut], &want);
                }
            } else {
                // Feeding 1 MB a million times is too slow for a unit test: cut at every byte
                // near each line end (where the state machine changes) and at 500 random
                // places in the long runs between them.
                let mut cuts: Vec<usize> = Vec::new();
                for (i, &b) in input.iter().enumerate() {
                    if b == b'\n' || b == b'\r' || b == b':' {
                        cuts.extend(i.saturating_sub(40)..=(i + 40).min(input.len()));
                    }
                }
                cuts.extend(0..=64);
                cuts.extend(input.len() - 64..=input.len());
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
                cuts.extend((0..500).map(|_| rng.below(input.len() + 1)));
                cuts.sort_unstable();
                cuts.dedup();
                for cut in cuts {
                    check_chunking(name, &input, max, &[cut], &want);
                }
            }
        }
    }

    #[test]
    fn every_three_chunk_split_of_short_inputs_gives_the_same_outcome() {
        for (name, input, max) in corpus() {
            if input.len() > 1024 {
                continue;
            }
            let want = whole(&input, max);
            for a in 0..=input.len() {
                for b in a..=input.len() {
                    check_chunking(name, &input, max, &[a, b], &want);
                }
            }
        }
    }

    #[test]
    fn random_chunkings_give_the_same_outcome() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for (name, input, max) in corpus() {
            let want = whole(&input, max);
            // One byte at a time.
            let ones: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(
                scan_chunks(&ones, &METERED, max),
                want,
                "{name}: 1-byte chunks"
            );
            let rounds = if input.len() > 64 * 1024 { 30 } else { 300 };
            for round in 0..rounds {
                // Mostly small chunks (the edge cases), some large, some empty.
                let limit = [1, 2, 3, 8, 64, 4096, 70_000][round % 7];
                let mut cuts = Vec::new();
                let mut at = 0;
                loop {
                    at += rng.below(limit + 1);
                    if at >= input.len() {
                        break;
                    }
                    cuts.push(at);
                }
                check_chunking(name, &input, max, &cuts, &want);
            }
        }
    }

    // ---- memory -----------------------------------------------------------------------------

    /// Feeds `head`, then `total` filler bytes in 64 KiB chunks, then `tail`, checking
    /// `buffered_bytes()` after every chunk; returns the events and the largest value seen.
    fn feed_big(
        head: &[u8],
        filler: u8,
        total: usize,
        tail: &[u8],
        max: usize,
        bound: usize,
    ) -> Vec<Ev> {
        let mut scanner = Scanner::new(
            &METERED,
            ScannerConfig {
                max_event_bytes: max,
            },
        );
        let mut events = Vec::new();
        let mut on_event = |e: SseEvent<'_>| {
            events.push(Ev {
                name: e.name.to_owned(),
                id: e.id.map(str::to_owned),
                data: e.data.to_vec(),
                oversize: e.oversize,
            });
        };
        let chunk = vec![filler; 64 * 1024];
        scanner.feed(head, &mut on_event);
        let mut fed = 0;
        while fed < total {
            let n = chunk.len().min(total - fed);
            scanner.feed(&chunk[..n], &mut on_event);
            fed += n;
            assert!(
                scanner.buffered_bytes() <= bound,
                "held {} after {fed} bytes",
                scanner.buffered_bytes()
            );
        }
        scanner.feed(tail, &mut on_event);
        scanner.finish(&mut on_event);
        assert!(scanner.buffered_bytes() <= RETAIN_DATA_CAPACITY);
        assert_eq!(
            scanner.stats().bytes,
            (head.len() + total + tail.len()) as u64
        );
        events
    }

    const FIFTY_MB: usize = 50 * 1024 * 1024;

    #[test]
    fn a_50_mb_uninteresting_event_costs_no_memory() {
        let events = feed_big(
            b"event: agent.message\ndata: {\"text\":\"",
            b'x',
            FIFTY_MB,
            b"\"}\n\nevent: session.usage\ndata: u\n\n",
            DEFAULT_MAX_EVENT_BYTES,
            4096,
        );
        assert_eq!(events, vec![ev("session.usage", None, "u")]);
    }

    #[test]
    fn a_50_mb_oversize_event_is_bounded_by_the_cap() {
        let max = 64 * 1024;
        let events = feed_big(
            b"event: span.model_request_end\ndata: {\"text\":\"",
            b'x',
            FIFTY_MB,
            b"\"}\n\nevent: session.usage\ndata: u\n\n",
            max,
            max,
        );
        assert_eq!(
            events,
            vec![
                oversize("span.model_request_end"),
                ev("session.usage", None, "u")
            ]
        );
        // Data before the name: accumulated up to the cap, then dropped.
        let events = feed_big(
            b"data: ",
            b'x',
            FIFTY_MB,
            b"\nevent: agent.message\n\n",
            max,
            max,
        );
        assert_eq!(events, vec![]);
    }

    #[test]
    fn giant_lines_without_line_ends_cost_no_memory() {
        for head in [&b""[..], b":", b"event: ", b"id: ", b"retry: ", b"foo: "] {
            let events = feed_big(
                head,
                b'a',
                8 * 1024 * 1024,
                b"\n\ndata: m\n\n",
                DEFAULT_MAX_EVENT_BYTES,
                4096,
            );
            assert_eq!(events, vec![ev("message", None, "m")], "{head:?}");
        }
    }
}
