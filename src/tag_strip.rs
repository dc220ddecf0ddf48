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
