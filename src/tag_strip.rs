//! Removing the owner tag from a single JSON object without building a `serde_json::Value`.
//!
//! Every read of an owned resource through the gateway (an agent, a session with its agent
//! snapshot, …) must lose the tenant tag from every `metadata` object in it, and tells the
//! gateway the object's `id` and owner. Parsing the body into a `Value` and encoding it again
//! was the largest single cost of a read: ~30 µs of the filter's ~100 µs per
//! `GET /v1/agents/{id}` under V8 (`make bench`, "what costs what"). [`strip`] does one pass
//! over the bytes instead and copies them minus the tag members, keeping everything else
//! byte for byte (key order included).
//!
//! It is a fast path, never the only one: whatever it does not fully understand — invalid
//! JSON or UTF-8, a key with escapes, a top-level `id`/`metadata` or a tag given twice,
//! nesting deeper than [`MAX_DEPTH`] — answers `None`, and the caller takes the `Value` path,
//! which decides as before. A property test checks both paths agree on generated objects.

/// serde_json's own recursion limit: deeper input is not JSON it would accept either.
pub const MAX_DEPTH: usize = 128;

/// What [`strip`] found in a JSON object.
#[derive(Debug, PartialEq, Eq)]
pub struct Stripped {
    /// The top-level `id`, when it is a string.
    pub id: Option<String>,
    /// The tag in the top-level `metadata`, when it is a string (what `Owner::of` reads).
    pub owner: Option<String>,
    /// The body without any tag member in any `metadata` object; `None` when there was none.
    pub body: Option<Vec<u8>>,
}

/// Scans `body`, a JSON object, for `tag_key` members of `metadata` objects at any depth.
pub fn strip(body: &[u8], tag_key: &str) -> Option<Stripped> {
    std::str::from_utf8(body).ok()?;
    let mut scan = Scan {
        bytes: body,
        pos: 0,
        tag_key: tag_key.as_bytes(),
        id: None,
        owner: None,
        cuts: Vec::new(),
    };
    scan.skip_ws();
    if scan.peek()? != b'{' {
        return None;
    }
    scan.object(1, Parent::Root)?;
    scan.skip_ws();
    if scan.pos != body.len() {
        return None;
    }
    let body = if scan.cuts.is_empty() {
        None
    } else {
        let mut out = Vec::with_capacity(body.len());
        let mut from = 0;
        for (start, end) in &scan.cuts {
            out.extend_from_slice(body.get(from..*start)?);
            from = *end;
        }
        out.extend_from_slice(body.get(from..)?);
        Some(out)
    };
    Some(Stripped {
        id: scan.id.map(str::to_string),
        owner: scan.owner.map(str::to_string),
        body,
    })
}

/// What the object being scanned is the value of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parent {
    Root,
    /// The top-level `metadata`: its tag is the owner.
    RootMetadata,
    /// Any other `metadata` object: its tag is only removed.
    Metadata,
    Other,
}

struct Scan<'a> {
    bytes: &'a [u8],
    pos: usize,
    tag_key: &'a [u8],
    id: Option<&'a str>,
    owner: Option<&'a str>,
    /// Byte ranges to drop, in order, non-overlapping.
    cuts: Vec<(usize, usize)>,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_ws();
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// An object starting at `{`; `depth` counts this object.
    fn object(&mut self, depth: usize, parent: Parent) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1; // '{'
        let (mut seen_id, mut seen_metadata, mut tag_members) = (false, false, 0);
        // Where the separator before the current member starts (its comma), if any.
        let mut previous_comma: Option<usize> = None;
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.skip_ws();
            let key_start = self.pos;
            let key = self.plain_string()?;
            self.expect(b':')?;
            self.skip_ws();
            let is_tag = matches!(parent, Parent::Metadata | Parent::RootMetadata)
                && key.as_bytes() == self.tag_key;
            let value_start = self.pos;
            let child = match (parent, key) {
                (Parent::Root, "metadata") => {
                    if seen_metadata {
                        return None;
                    }
                    seen_metadata = true;
                    Parent::RootMetadata
                }
                (_, "metadata") => Parent::Metadata,
                _ => Parent::Other,
            };
            self.value(depth, child)?;
            let value_end = self.pos;
            if parent == Parent::Root && key == "id" {
                if seen_id {
                    return None;
                }
                seen_id = true;
                self.id = self.string_at(value_start, value_end)?;
            }
            self.skip_ws();
            let next = self.peek()?;
            if is_tag {
                tag_members += 1;
                if tag_members > 1 {
                    return None;
                }
                if parent == Parent::RootMetadata {
                    self.owner = self.string_at(value_start, value_end)?;
                }
                // Drop the member with one separator: the comma after it, or else the one
                // before it, or else (the only member) just the member.
                let cut = match (next, previous_comma) {
                    (b',', _) => (key_start, self.pos + 1),
                    (_, Some(comma)) => (comma, value_end),
                    _ => (key_start, value_end),
                };
                // Cuts come in byte order; a nested cut can never precede this one, because
                // values of tag members are removed whole and scanned before this point.
                self.cuts.retain(|&(start, _)| start < cut.0);
                self.cuts.push(cut);
            }
            match next {
                b',' => {
                    previous_comma = Some(self.pos);
                    self.pos += 1;
                }
                b'}' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1; // '['
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.skip_ws();
            self.value(depth, Parent::Other)?;
            self.skip_ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Any value; `parent` says what an object here would be (see [`Parent`]).
    fn value(&mut self, depth: usize, parent: Parent) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth + 1, parent),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    /// A string at `"`; returns whether it held escapes. Rejects control characters (as
    /// JSON does) and unknown escapes.
    fn string(&mut self) -> Option<bool> {
        self.pos += 1; // '"'
        let mut escaped = false;
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match self.bytes.get(self.pos + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 2,
                        b'u' => {
                            // As serde_json: a surrogate must be a high one followed by
                            // `\u` and a low one; a lone surrogate is not JSON it accepts.
                            let unit = |at: usize| -> Option<u32> {
                                let hex = std::str::from_utf8(self.bytes.get(at..at + 4)?).ok()?;
                                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                                    return None;
                                }
                                u32::from_str_radix(hex, 16).ok()
                            };
                            match unit(self.pos + 2)? {
                                0xD800..=0xDBFF => {
                                    if self.bytes.get(self.pos + 6..self.pos + 8)? != b"\\u"
                                        || !(0xDC00..=0xDFFF).contains(&unit(self.pos + 8)?)
                                    {
                                        return None;
                                    }
                                    self.pos += 12;
                                }
                                0xDC00..=0xDFFF => return None,
                                _ => self.pos += 6,
                            }
                        }
                        _ => return None,
                    }
                }
                0x00..=0x1f => return None,
                _ => self.pos += 1,
            }
        }
    }

    /// A string without escapes (keys): its text. A key with escapes could spell `metadata`
    /// or the tag in disguise, so it sends the whole body to the `Value` path.
    fn plain_string(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.pos + 1;
        if self.string()? {
            return None;
        }
        std::str::from_utf8(self.bytes.get(start..self.pos - 1)?).ok()
    }

    /// The value at `start..end`: `Some(Some(text))` for a string without escapes,
    /// `Some(None)` for any other value, and `None` for a string with escapes, which could
    /// spell an id or a tenant in disguise (the gateway never writes escapes in either) and
    /// so sends the whole body to the `Value` path.
    fn string_at(&self, start: usize, end: usize) -> Option<Option<&'a str>> {
        let raw = self.bytes.get(start..end)?;
        let Some(inner) = raw.strip_prefix(b"\"").and_then(|r| r.strip_suffix(b"\"")) else {
            return Some(None);
        };
        if inner.contains(&b'\\') {
            return None;
        }
        std::str::from_utf8(inner).ok().map(Some)
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::test_rng::Rng;
    use serde_json::{json, Value};

    const TAG: &str = "ma_gateway_tenant";

    fn stripped(body: &str) -> Stripped {
        strip(body.as_bytes(), TAG).unwrap()
    }

    fn text(s: &Stripped) -> &str {
        std::str::from_utf8(s.body.as_deref().unwrap()).unwrap()
    }

    /// Found by fuzzing (fuzz/ tenancy_response): a lone surrogate escape, which serde_json
    /// refuses, was accepted and the body "stripped" instead of going to the `Value` path.
    #[test]
    fn lone_surrogates_are_not_json() {
        for body in [
            r#"{"id":"ag\ud800","metadata":{"ma_gateway_tenant":"t"}}"#,
            r#"{"id":"a","x":"\udc00","metadata":{"ma_gateway_tenant":"t"}}"#,
            r#"{"x":"\ud800\u0041","metadata":{"ma_gateway_tenant":"t"}}"#,
            r#"{"x":"\ud800\ud800","metadata":{"ma_gateway_tenant":"t"}}"#,
            r#"{"x":"\ud800"#,
        ] {
            assert!(serde_json::from_str::<Value>(body).is_err(), "{body}");
            assert_eq!(strip(body.as_bytes(), TAG), None, "{body}");
        }
        let pair =
            stripped(r#"{"x":"\ud800\udc00\uDBFF\uDFFF","metadata":{"ma_gateway_tenant":"t"}}"#);
        assert_eq!(pair.owner.as_deref(), Some("t"));
        assert_eq!(
            text(&pair),
            r#"{"x":"\ud800\udc00\uDBFF\uDFFF","metadata":{}}"#
        );
    }

    #[test]
    fn removes_the_tag_with_one_separator() {
        let s =
            stripped(r#"{"id":"agent_1","metadata":{"a":"1","ma_gateway_tenant":"t1","b":"2"}}"#);
        assert_eq!(s.id.as_deref(), Some("agent_1"));
        assert_eq!(s.owner.as_deref(), Some("t1"));
        assert_eq!(text(&s), r#"{"id":"agent_1","metadata":{"a":"1","b":"2"}}"#);

        let last = stripped(r#"{"metadata":{"a":"1", "ma_gateway_tenant" : "t1" },"id":"x"}"#);
        assert_eq!(text(&last), r#"{"metadata":{"a":"1" },"id":"x"}"#);
        let only = stripped(r#"{"metadata":{ "ma_gateway_tenant":"t1" }}"#);
        assert_eq!(text(&only), r#"{"metadata":{  }}"#);
        let first = stripped(r#"{"metadata":{"ma_gateway_tenant":"t1",  "z":"9"}}"#);
        assert_eq!(text(&first), r#"{"metadata":{  "z":"9"}}"#);
    }

    #[test]
    fn nested_metadata_is_stripped_but_does_not_own() {
        let s = stripped(
            r#"{"id":"sesn_1","agent":{"id":"agent_1","metadata":{"ma_gateway_tenant":"t2"}},"metadata":{}}"#,
        );
        assert_eq!(s.owner, None);
        assert_eq!(s.id.as_deref(), Some("sesn_1"));
        assert_eq!(
            text(&s),
            r#"{"id":"sesn_1","agent":{"id":"agent_1","metadata":{}},"metadata":{}}"#
        );
    }

    #[test]
    fn untagged_bodies_are_left_alone() {
        let s = stripped(r#"{"id":"agent_1","name":"ma_gateway_tenant","metadata":{"k":"v"}}"#);
        assert_eq!((s.owner, s.body), (None, None));
        // The tag key outside a metadata object is not a tag.
        let s = stripped(r#"{"id":"a","config":{"ma_gateway_tenant":"t"}}"#);
        assert_eq!(s.body, None);
    }

    #[test]
    fn non_string_tags_are_removed_and_own_nothing() {
        let s = stripped(r#"{"metadata":{"ma_gateway_tenant":{"x":[1,2]},"k":"v"}}"#);
        assert_eq!(s.owner, None);
        assert_eq!(text(&s), r#"{"metadata":{"k":"v"}}"#);
    }

    #[test]
    fn what_it_does_not_fully_understand_takes_the_slow_path() {
        for body in [
            "",
            "[]",
            r#"{"a":1"#,
            r#"{"a":1}x"#,
            r#"{"a":tru}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"met\u0061data":{}}"#,
            r#"{"id":"a","id":"b"}"#,
            r#"{"metadata":{},"metadata":{}}"#,
            r#"{"metadata":{"ma_gateway_tenant":"a","ma_gateway_tenant":"b"}}"#,
            r#"{"a":[1,]}"#,
            r#"{,}"#,
        ] {
            assert_eq!(strip(body.as_bytes(), TAG), None, "{body}");
        }
        assert_eq!(strip(b"{\"a\":\"\xff\"}", TAG), None);
        let deep = format!(
            "{{\"a\":{}{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert_eq!(strip(deep.as_bytes(), TAG), None);
    }

    #[test]
    fn ids_and_owners_with_escapes_take_the_slow_path() {
        for body in [
            r#"{"id":"a\"b","metadata":{}}"#,
            r#"{"id":"a","metadata":{"ma_gateway_tenant":"t\u0031"}}"#,
        ] {
            assert_eq!(strip(body.as_bytes(), TAG), None, "{body}");
        }
        // Escapes elsewhere are fine, nested tags too.
        let s = stripped(
            r#"{"id":"a","name":"x\"y","agent":{"metadata":{"ma_gateway_tenant":"t\u0031"}}}"#,
        );
        assert_eq!(
            text(&s),
            r#"{"id":"a","name":"x\"y","agent":{"metadata":{}}}"#
        );
    }

    /// The `Value` path's answer: id, owner (top-level metadata tag as a string) and the body
    /// without tags, as a `Value` (so key order does not matter).
    fn slow(body: &str) -> (Option<String>, Option<String>, Value) {
        let mut value: Value = serde_json::from_str(body).unwrap();
        let id = value.get("id").and_then(Value::as_str).map(str::to_string);
        let owner = value
            .get("metadata")
            .and_then(|m| m.get(TAG))
            .and_then(Value::as_str)
            .map(str::to_string);
        fn strip_all(v: &mut Value) {
            match v {
                Value::Object(fields) => {
                    if let Some(Value::Object(m)) = fields.get_mut("metadata") {
                        m.remove(TAG);
                    }
                    fields.values_mut().for_each(strip_all);
                }
                Value::Array(items) => items.iter_mut().for_each(strip_all),
                _ => {}
            }
        }
        strip_all(&mut value);
        (id, owner, value)
    }

    fn gen_value(rng: &mut Rng, depth: usize) -> Value {
        match if depth > 3 {
            rng.next() % 4
        } else {
            rng.next() % 7
        } {
            0 => json!(rng.pick(&["x", "ma_gateway_tenant", "metadata", "é ü", "a\"b"])),
            1 => json!(rng.next() % 1000),
            2 => json!(null),
            3 => json!(-1.5e3),
            4 | 5 => {
                let mut map = serde_json::Map::new();
                for _ in 0..rng.next() % 4 {
                    let key = rng.pick(&["id", "metadata", "ma_gateway_tenant", "name", "agent"]);
                    map.insert(key.to_string(), gen_value(rng, depth + 1));
                }
                Value::Object(map)
            }
            _ => Value::Array(
                (0..rng.next() % 3)
                    .map(|_| gen_value(rng, depth + 1))
                    .collect(),
            ),
        }
    }

    #[test]
    fn agrees_with_the_value_path_on_generated_objects() {
        let mut rng = Rng(0x7a65);
        let mut compared = 0;
        for _ in 0..5000 {
            let mut top = serde_json::Map::new();
            for _ in 0..rng.next() % 5 {
                let key = rng.pick(&["id", "metadata", "agent", "name"]);
                top.insert(key.to_string(), gen_value(&mut rng, 1));
            }
            let pretty = rng.next() % 2 == 0;
            let value = Value::Object(top);
            let body = if pretty {
                serde_json::to_string_pretty(&value).unwrap()
            } else {
                serde_json::to_string(&value).unwrap()
            };
            let (id, owner, expected) = slow(&body);
            let Some(fast) = strip(body.as_bytes(), TAG) else {
                // Only escaped ids or owners send a valid body to the slow path here.
                let escaped = |s: &Option<String>| s.as_deref().is_some_and(|s| s.contains('"'));
                assert!(escaped(&id) || escaped(&owner), "{body}");
                continue;
            };
            let stripped: Value = match &fast.body {
                Some(bytes) => serde_json::from_slice(bytes).unwrap(),
                None => serde_json::from_str(&body).unwrap(),
            };
            assert_eq!(stripped, expected, "{body}");
            assert_eq!(fast.id, id, "{body}");
            assert_eq!(fast.owner, owner, "{body}");
            compared += 1;
        }
        assert!(compared > 4000, "{compared}");
    }
}

/// Longest field name an SSE line framer looks at (`data` is 4; longer names pass through).
const MAX_FIELD: usize = 16;

/// Where the JSON scanner of [`EventStrip`] is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Js {
    /// Expecting a value (top level or after `:` / `[` / `,` in an array).
    Value,
    /// After `{` or `,` in an object: a key (or `}` right after `{`).
    Key,
    /// Inside a key string.
    InKey { escape: bool },
    /// After a key, expecting `:`.
    Colon,
    /// Inside a string value.
    InStr { escape: bool },
    /// Inside a number or literal.
    Scalar,
    /// After a value: `,` or a closing bracket.
    After,
    /// Not JSON this scanner understands: the rest of the document passes through as is.
    Opaque,
}

/// One open container.
#[derive(Clone, Copy, Debug)]
struct Frame {
    object: bool,
    /// An object that is the value of a `metadata` key: its tag members go.
    metadata: bool,
    /// Members of this object written out so far (a dropped first member drops the comma after).
    written: usize,
}

/// Removes every `"<tag_key>": <value>` member of `metadata` objects from a JSON document or
/// from the `data:` lines of an SSE stream, incrementally: bytes go in as they arrive and come
/// out in order, minus the tag members (and the comma that separated each), with at most a
/// separator and a key's first `tag_key.len() + 1` bytes held back between calls. Everything
/// else is kept byte for byte. Nothing is buffered beyond that, so pages and streams of any
/// size flow through. Keys with escapes are compared as written (the gateway writes the tag,
/// and JSON encoders do not escape ASCII letters or `_`).
#[derive(Debug)]
pub struct EventStrip {
    sse: bool,
    tag: Vec<u8>,
    // SSE framing.
    line_start: bool,
    field: Vec<u8>,
    /// In a `data:` line, past the field name (JSON bytes).
    in_data: bool,
    /// In a non-data line (passes through).
    in_other: bool,
    after_cr: bool,
    // JSON scanning.
    state: Js,
    stack: Vec<Frame>,
    /// Bytes held back (separator and key prefix) until the key is known.
    held: Vec<u8>,
    /// The key being read (at most `max(tag, "metadata") + 1` bytes of it).
    key: Vec<u8>,
    /// Whether the current key's bytes are being held (inside a metadata object).
    holding: bool,
    /// The last complete key read, as far as `key` kept it.
    last_key_metadata: bool,
    /// The depth (stack length) at which a dropped member's value started, while dropping.
    dropping: Option<usize>,
    /// A dropped first member: the comma after it goes too.
    drop_comma: bool,
    /// Tag members removed so far.
    pub removed: u64,
}

impl EventStrip {
    /// The remover for the response body of `op` when it is an event page or stream
    /// (which are never buffered, so never rewritten whole); `None` for every other call.
    pub fn for_operation(op: &crate::routes::Operation, tag_key: &str) -> Option<Self> {
        use crate::routes::{Action, Family, IdKind};
        let thread_events = op.family == Family::SessionThreads && op.id(IdKind::Thread).is_some();
        match (op.family, op.action) {
            (Family::SessionEvents, Action::Stream) => Some(Self::sse(tag_key)),
            (Family::SessionThreads, Action::Stream) if thread_events => Some(Self::sse(tag_key)),
            (Family::SessionEvents, Action::List) => Some(Self::json(tag_key)),
            (Family::SessionThreads, Action::List) if thread_events => Some(Self::json(tag_key)),
            _ => None,
        }
    }

    /// A remover for a JSON document (an event page).
    pub fn json(tag_key: &str) -> Self {
        Self::new(tag_key, false)
    }

    /// A remover for an SSE stream (only `data:` lines are JSON).
    pub fn sse(tag_key: &str) -> Self {
        Self::new(tag_key, true)
    }

    fn new(tag_key: &str, sse: bool) -> Self {
        EventStrip {
            sse,
            tag: tag_key.as_bytes().to_vec(),
            line_start: true,
            field: Vec::new(),
            in_data: false,
            in_other: false,
            after_cr: false,
            state: Js::Value,
            stack: Vec::new(),
            held: Vec::new(),
            key: Vec::new(),
            holding: false,
            last_key_metadata: false,
            dropping: None,
            drop_comma: false,
            removed: 0,
        }
    }

    /// Feeds `input`; appends what can be passed on to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.sse {
                self.sse_byte(b, out);
            } else {
                self.json_byte(b, out);
            }
        }
    }

    /// The end of the body: whatever is still held back goes out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.field);
        self.release(out);
    }

    fn release(&mut self, out: &mut Vec<u8>) {
        if self.dropping.is_none() {
            out.append(&mut self.held);
        }
        self.held.clear();
        self.holding = false;
    }

    fn reset_json(&mut self) {
        self.state = Js::Value;
        self.stack.clear();
        self.key.clear();
        self.holding = false;
        self.dropping = None;
        self.drop_comma = false;
    }

    fn sse_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        if b == b'\n' && self.after_cr {
            self.after_cr = false;
            out.push(b);
            return;
        }
        self.after_cr = b == b'\r';
        if b == b'\n' || b == b'\r' {
            if self.line_start && self.field.is_empty() && !self.in_data && !self.in_other {
                // A blank line ends the event: its JSON is complete.
                self.release(out);
                self.reset_json();
            } else if self.in_data {
                // A key cut by a line end is not the tag; a value continues on the next line.
                self.release(out);
            } else {
                out.append(&mut self.field);
            }
            out.push(b);
            self.line_start = true;
            self.in_data = false;
            self.in_other = false;
            return;
        }
        if self.in_data {
            if self.line_start {
                self.line_start = false;
                if b == b' ' {
                    out.push(b);
                    return;
                }
            }
            self.json_byte(b, out);
            return;
        }
        if self.in_other {
            out.push(b);
            return;
        }
        if b == b':' {
            let data = self.field == b"data";
            out.append(&mut self.field);
            out.push(b);
            if data {
                self.in_data = true;
                self.line_start = true; // the optional space after the colon
            } else {
                self.in_other = true;
                self.line_start = false;
            }
            return;
        }
        self.line_start = false;
        self.field.push(b);
        if self.field.len() > MAX_FIELD {
            out.append(&mut self.field);
            self.in_other = true;
        }
    }

    fn emit(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.dropping.is_some() {
            return;
        }
        if self.holding {
            self.held.push(b);
        } else {
            out.push(b);
        }
    }

    fn in_metadata(&self) -> bool {
        self.stack.last().is_some_and(|f| f.object && f.metadata)
    }

    /// A value just ended (at the current depth).
    fn value_done(&mut self) {
        self.state = Js::After;
        if self.dropping == Some(self.stack.len()) {
            self.dropping = None;
            self.removed += 1;
            let first = self.stack.last().is_some_and(|f| f.written == 0);
            self.drop_comma = first;
        }
    }

    fn json_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.state {
            Js::Opaque => out.push(b),
            Js::InStr { escape } => {
                self.emit(b, out);
                self.state = match (escape, b) {
                    (true, _) => Js::InStr { escape: false },
                    (false, b'\\') => Js::InStr { escape: true },
                    (false, b'"') => {
                        self.value_done();
                        return;
                    }
                    _ => Js::InStr { escape: false },
                };
            }
            Js::InKey { escape } => {
                if !escape && b == b'"' {
                    let is_tag = self.in_metadata() && self.key == self.tag;
                    self.last_key_metadata = self.key == b"metadata";
                    if is_tag {
                        self.held.clear();
                        self.holding = false;
                        self.dropping = Some(self.stack.len());
                    } else {
                        self.emit(b, out);
                        self.release(out);
                        if let Some(f) = self.stack.last_mut() {
                            f.written += 1;
                        }
                    }
                    self.state = Js::Colon;
                    return;
                }
                self.emit(b, out);
                if self.key.len() <= self.tag.len().max(8) {
                    self.key.push(b);
                }
                if self.holding && self.key.len() > self.tag.len() {
                    self.release(out);
                }
                self.state = Js::InKey {
                    escape: !escape && b == b'\\',
                };
            }
            Js::Scalar => {
                if ws || matches!(b, b',' | b'}' | b']') {
                    self.value_done();
                    self.json_byte(b, out);
                } else {
                    self.emit(b, out);
                }
            }
            _ if ws => {
                if !self.holding {
                    self.emit(b, out);
                }
            }
            Js::Key => match b {
                b'"' => {
                    self.key.clear();
                    if self.in_metadata() {
                        self.holding = true;
                    }
                    self.emit(b, out);
                    self.state = Js::InKey { escape: false };
                }
                b'}' if self.stack.last().is_some_and(|f| f.written == 0) => {
                    self.release(out);
                    self.close(b, out);
                }
                _ => self.opaque(b, out),
            },
            Js::Colon => {
                if b == b':' {
                    self.emit(b, out);
                    self.state = Js::Value;
                } else {
                    self.opaque(b, out);
                }
            }
            Js::Value => {
                let metadata = std::mem::take(&mut self.last_key_metadata)
                    && self.stack.last().is_some_and(|f| f.object);
                match b {
                    b'{' | b'[' => {
                        self.emit(b, out);
                        self.stack.push(Frame {
                            object: b == b'{',
                            metadata: metadata && b == b'{',
                            written: 0,
                        });
                        if self.stack.len() > MAX_DEPTH {
                            self.opaque(b' ', out);
                            out.pop();
                            return;
                        }
                        self.state = if b == b'{' { Js::Key } else { Js::Value };
                    }
                    b']' if self.stack.last().is_some_and(|f| !f.object) => self.close(b, out),
                    b'"' => {
                        self.emit(b, out);
                        self.state = Js::InStr { escape: false };
                    }
                    _ => {
                        self.emit(b, out);
                        self.state = Js::Scalar;
                    }
                }
            }
            Js::After => match b {
                b',' => {
                    let object = self.stack.last().is_some_and(|f| f.object);
                    if std::mem::take(&mut self.drop_comma) {
                        // The member before was dropped and was the first: so goes its comma.
                    } else if object && self.in_metadata() {
                        self.holding = true;
                        self.held.push(b);
                    } else {
                        self.emit(b, out);
                    }
                    self.state = if object { Js::Key } else { Js::Value };
                }
                b'}' | b']' => {
                    self.drop_comma = false;
                    self.release(out);
                    self.close(b, out);
                }
                _ => self.opaque(b, out),
            },
        }
    }

    fn close(&mut self, b: u8, out: &mut Vec<u8>) {
        let matches = self.stack.last().is_some_and(|f| f.object == (b == b'}'));
        if !matches {
            self.opaque(b, out);
            return;
        }
        self.emit(b, out);
        self.stack.pop();
        self.value_done();
        if self.stack.is_empty() {
            self.state = Js::Value;
        }
    }

    /// Gives up on this document: what is held and what follows pass through unchanged.
    fn opaque(&mut self, b: u8, out: &mut Vec<u8>) {
        self.dropping = None;
        self.release(out);
        out.push(b);
        self.state = Js::Opaque;
    }
}

#[cfg(test)]
mod event_strip_tests {
    use super::EventStrip;

    const TAG: &str = "ma_gateway_tenant";

    /// Runs `input` through a fresh remover in pieces of every size from 1 to 7 bytes; every
    /// split must give the same output.
    fn run(sse: bool, input: &str) -> String {
        let mut outputs = Vec::new();
        for piece in 1..=7 {
            let mut strip = if sse {
                EventStrip::sse(TAG)
            } else {
                EventStrip::json(TAG)
            };
            let mut out = Vec::new();
            for chunk in input.as_bytes().chunks(piece) {
                strip.push(chunk, &mut out);
            }
            strip.finish(&mut out);
            outputs.push(String::from_utf8(out).unwrap());
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]), "{outputs:?}");
        outputs.remove(0)
    }

    #[test]
    fn removes_tag_members_in_any_position() {
        let page = r#"{"data":[{"type":"session.updated","metadata":{"a":"1","ma_gateway_tenant":"acme","b":"2"},"agent":{"metadata":{"ma_gateway_tenant":"acme"}}},{"metadata":{"ma_gateway_tenant":"acme", "z":"x"}}],"next_page":null}"#;
        let want = r#"{"data":[{"type":"session.updated","metadata":{"a":"1","b":"2"},"agent":{"metadata":{}}},{"metadata":{ "z":"x"}}],"next_page":null}"#;
        assert_eq!(run(false, page), want);
        serde_json::from_str::<serde_json::Value>(want).unwrap();
    }

    #[test]
    fn keeps_everything_else_byte_for_byte() {
        for doc in [
            r#"{"ma_gateway_tenant":"top level is not metadata","metadata":{"ma_gateway_tenants":"longer key","ma_gateway_tenan":"shorter"}}"#,
            r#"{"x":{"ma_gateway_tenant":"not metadata"},"s":"metadata\"{\"ma_gateway_tenant\":1}","n":[1,2.5e3,true,null,[],{}]}"#,
            "not json {\"metadata\":{\"ma_gateway_tenant\":\"x\"}",
        ] {
            assert_eq!(run(false, doc), doc);
        }
    }

    #[test]
    fn strips_sse_data_lines_only() {
        let stream = concat!(
            ": keep-alive\n",
            "event: session.updated\r\n",
            "data: {\"metadata\":{\"ma_gateway_tenant\":\"acme\",\"k\":\"v\"}}\r\n\r\n",
            "event: ping\ndata: {}\n\n",
            "id: 5\nretry: 10\n",
            "data:{\"metadata\":{\"k\":[1],\"ma_gateway_tenant\":{\"nested\":\"too\"}}}\n\n",
            "data: {\"metadata\":{\"ma_gateway_tenant\":\"acme\"}}\n\n",
        );
        let want = concat!(
            ": keep-alive\n",
            "event: session.updated\r\n",
            "data: {\"metadata\":{\"k\":\"v\"}}\r\n\r\n",
            "event: ping\ndata: {}\n\n",
            "id: 5\nretry: 10\n",
            "data:{\"metadata\":{\"k\":[1]}}\n\n",
            "data: {\"metadata\":{}}\n\n",
        );
        assert_eq!(run(true, stream), want);
    }
}
