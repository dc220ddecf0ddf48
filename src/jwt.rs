//! JWT identity: the claims of a token Envoy's own `envoy.filters.http.jwt_authn` filter has
//! already verified, turned into a subject, a tenant and optional scopes.
//!
//! The gateway never parses or verifies a JWT itself, and never reads one from a header: a
//! client controls every header, but not dynamic metadata. jwt_authn (placed before this
//! filter, with `payload_in_metadata: <metadata_key>`) writes the verified payload as a
//! `google.protobuf.Struct` under `filter_metadata["envoy.filters.http.jwt_authn"][<key>]`,
//! and only after the signature, `exp`/`nbf`, issuer and audiences checked out.
//!
//! What the glue reads is `get_property(["metadata"])`: in Envoy 1.40 that is the stream's
//! whole dynamic metadata as a serialized `envoy.config.core.v3.Metadata` message. (Asking for
//! the payload's own path instead returns Envoy's lossy "pairs" encoding — types erased,
//! and a `SerializationFailure` as soon as a claim is `null` — so the exact protobuf of the
//! parent message is read and decoded here.) The wire format, all proto3:
//!
//! ```text
//! Metadata  { map<string, Struct> filter_metadata = 1; map<string, Any> typed_filter_metadata = 2; }
//! map entry { string key = 1; V value = 2; }
//! Struct    { map<string, Value> fields = 1; }
//! Value     { oneof kind { NullValue null_value = 1; double number_value = 2; string string_value = 3;
//!                          bool bool_value = 4; Struct struct_value = 5; ListValue list_value = 6; } }
//! ListValue { repeated Value values = 1; }
//! ```
//!
//! Claim names ([`JwtRules::tenant_claim`] …) are looked up in the payload object: the whole
//! name first (so `https://example.com/tenant` is one claim), then through dots into nested
//! objects (`org.id`). At each level the remaining name is tried whole, then the shortest
//! dotted prefix that names an object.

use crate::errors::json_type_name as type_name;
use serde_json::{Map, Number, Value};

use crate::errors::excerpt;

/// The dynamic-metadata namespace jwt_authn writes to.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";
/// Default `payload_in_metadata` key.
pub const DEFAULT_METADATA_KEY: &str = "jwt_payload";
pub const DEFAULT_SUBJECT_CLAIM: &str = "sub";
pub const DEFAULT_SCOPES_CLAIM: &str = "scope";

/// Deepest nesting of objects and arrays decoded from a payload (bounds recursion).
const MAX_DEPTH: usize = 32;
/// Longest configured claim name or metadata key.
const MAX_NAME_BYTES: usize = 256;
/// Longest subject kept.
const MAX_SUBJECT_BYTES: usize = 256;
/// Longest tenant name (the plugin config's rule for tenant names).
const MAX_TENANT_BYTES: usize = crate::config::MAX_NAME_BYTES;
/// Most scopes one token may carry, and the longest one.
const MAX_SCOPES: usize = 256;
const MAX_SCOPE_BYTES: usize = 128;

/// Where the verified payload is and which claims mean what (plugin config `jwt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtRules {
    /// jwt_authn's `payload_in_metadata` value. Default `jwt_payload`.
    pub metadata_key: String,
    /// Claim naming the caller's tenant, e.g. `org` or `https://example.com/tenant`. Required.
    pub tenant_claim: String,
    /// Claim with the token's scopes: a space-separated string or an array of strings
    /// (jwt_authn's `normalize_payload_in_metadata` turns the former into the latter).
    /// Default `scope`.
    pub scopes_claim: String,
    /// Claim naming the caller. Default `sub`.
    pub subject_claim: String,
}

/// What a verified token says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    /// A valid tenant name (`[A-Za-z0-9_.-]`, 1–64 bytes); whether it is declared is the
    /// caller's decision.
    pub tenant: String,
    /// `None`: the token has no scopes claim (it does not narrow its tenant's rights).
    /// `Some(empty)`: it has one, and grants nothing.
    pub scopes: Option<Vec<String>>,
}

/// Parses the `jwt` object of the plugin config; `path` is where it sits (`jwt`), and errors
/// name the field: `jwt.tenant_claim: expected a string, found a number`.
pub fn rules_from_json(value: &Value, path: &str) -> Result<JwtRules, String> {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let Value::Object(fields) = value else {
        let shown = if path.is_empty() { "(root)" } else { path };
        return Err(format!(
            "{shown}: expected an object, found {}",
            type_name(value)
        ));
    };
    const KNOWN: [&str; 4] = [
        "metadata_key",
        "tenant_claim",
        "scopes_claim",
        "subject_claim",
    ];
    let name = |key: &str, default: Option<&str>| -> Result<String, String> {
        let text = match fields.get(key) {
            None => default
                .map(str::to_string)
                .ok_or_else(|| format!("{}: missing (a string is required)", at(key)))?,
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(format!(
                    "{}: expected a string, found {}",
                    at(key),
                    type_name(other)
                ))
            }
        };
        if text.is_empty() || text.len() > MAX_NAME_BYTES || text.chars().any(char::is_control) {
            return Err(format!(
                "{}: expected a non-empty name of at most {MAX_NAME_BYTES} bytes without control characters",
                at(key)
            ));
        }
        Ok(text)
    };
    let rules = JwtRules {
        metadata_key: name("metadata_key", Some(DEFAULT_METADATA_KEY))?,
        tenant_claim: name("tenant_claim", None)?,
        scopes_claim: name("scopes_claim", Some(DEFAULT_SCOPES_CLAIM))?,
        subject_claim: name("subject_claim", Some(DEFAULT_SUBJECT_CLAIM))?,
    };
    if let Some(unknown) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("{}: unknown field", at(unknown)));
    }
    Ok(rules)
}

/// The claims of the verified token in a serialized `envoy.config.core.v3.Metadata` (what
/// `get_property(["metadata"])` returns). `None`: jwt_authn left no payload under
/// `rules.metadata_key` — no verified JWT on this request. `Some(Err)`: there is one, but the
/// metadata is malformed or the claims do not satisfy `rules` (refuse the call).
pub fn claims_from_metadata(metadata: &[u8], rules: &JwtRules) -> Option<Result<Claims, String>> {
    match payload_from_metadata(metadata, &rules.metadata_key) {
        Ok(None) => None,
        Ok(Some(payload)) => Some(claims_from_payload(&payload, rules)),
        Err(e) => Some(Err(e)),
    }
}

/// The verified payload (a JSON object) under `filter_metadata[jwt_authn][metadata_key]`.
/// Other namespaces are skipped without being decoded.
pub fn payload_from_metadata(metadata: &[u8], metadata_key: &str) -> Result<Option<Value>, String> {
    let err = |e: String| format!("dynamic metadata: {e}");
    let Some(namespace) = map_entry(metadata, 1, JWT_AUTHN_NAMESPACE).map_err(err)? else {
        return Ok(None);
    };
    let Some(value) = map_entry(namespace, 1, metadata_key).map_err(err)? else {
        return Ok(None);
    };
    match decode_value(value, 0).map_err(err)? {
        payload @ Value::Object(_) => Ok(Some(payload)),
        other => Err(format!(
            "dynamic metadata: {JWT_AUTHN_NAMESPACE}.{metadata_key} is {}, not an object",
            type_name(&other)
        )),
    }
}

/// Applies `rules` to a verified payload (from metadata, or any other trusted channel).
pub fn claims_from_payload(payload: &Value, rules: &JwtRules) -> Result<Claims, String> {
    let claim_error = |claim: &str, message: String| format!("jwt claim {claim:?}: {message}");
    let string_claim = |claim: &str| -> Result<&str, String> {
        match lookup(payload, claim) {
            None => Err(claim_error(claim, "missing".into())),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err(claim_error(
                claim,
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    };

    let subject = string_claim(&rules.subject_claim)?;
    if subject.is_empty()
        || subject.len() > MAX_SUBJECT_BYTES
        || subject.chars().any(char::is_control)
    {
        return Err(claim_error(
            &rules.subject_claim,
            format!("expected a non-empty string of at most {MAX_SUBJECT_BYTES} bytes without control characters"),
        ));
    }
    let tenant = string_claim(&rules.tenant_claim)?;
    if !crate::config::is_name(tenant) {
        return Err(claim_error(
            &rules.tenant_claim,
            format!(
                "{:?} is not a tenant name ([A-Za-z0-9_.-], 1 to {MAX_TENANT_BYTES} bytes)",
                excerpt(tenant, 80)
            ),
        ));
    }
    let scopes = match lookup(payload, &rules.scopes_claim) {
        None => None,
        Some(value) => {
            Some(scopes(value).map_err(|message| claim_error(&rules.scopes_claim, message))?)
        }
    };
    Ok(Claims {
        subject: subject.to_string(),
        tenant: tenant.to_string(),
        scopes,
    })
}

/// A scopes claim: `"a b c"` (RFC 8693 `scope`) or `["a", "b"]` (`scp`, or normalized).
fn scopes(value: &Value) -> Result<Vec<String>, String> {
    let out: Vec<String> = match value {
        Value::String(s) => s
            .split_whitespace()
            .take(MAX_SCOPES + 1)
            .map(str::to_string)
            .collect(),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len().min(MAX_SCOPES + 1));
            for (i, item) in items.iter().take(MAX_SCOPES + 1).enumerate() {
                match item {
                    Value::String(s) if !s.is_empty() && !s.chars().any(char::is_whitespace) => {
                        out.push(s.clone())
                    }
                    Value::String(s) => {
                        return Err(format!(
                            "item {i}: {:?} is not a single scope",
                            excerpt(s, 80)
                        ))
                    }
                    other => {
                        return Err(format!(
                            "item {i}: expected a string, found {}",
                            type_name(other)
                        ))
                    }
                }
            }
            out
        }
        other => {
            return Err(format!(
                "expected a space-separated string or an array of strings, found {}",
                type_name(other)
            ))
        }
    };
    if out.len() > MAX_SCOPES {
        return Err(format!("more than {MAX_SCOPES} scopes"));
    }
    let bad = |s: &&String| s.len() > MAX_SCOPE_BYTES || s.chars().any(char::is_control);
    if let Some(bad) = out.iter().find(bad) {
        return Err(format!(
            "scope {:?} is longer than {MAX_SCOPE_BYTES} bytes or holds control characters",
            excerpt(bad, 40)
        ));
    }
    Ok(out)
}

/// Finds claim `name` in a payload: the whole name first, then through dots into objects.
fn lookup<'v>(mut value: &'v Value, name: &str) -> Option<&'v Value> {
    let mut rest = name;
    loop {
        let object = value.as_object()?;
        if let Some(found) = object.get(rest) {
            return Some(found);
        }
        // The shortest dotted prefix that names an object; no backtracking.
        let (next, remainder) = rest
            .match_indices('.')
            .map(|(i, _)| (&rest[..i], &rest[i + 1..]))
            .find(|(prefix, _)| object.get(*prefix).is_some_and(Value::is_object))?;
        value = object.get(next)?;
        rest = remainder;
    }
}

// ---- protobuf wire format: just what Metadata / Struct / Value / ListValue need ----

/// One field's payload.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

/// Iterates `(field number, payload)` over a message's bytes.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { bytes }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let (&byte, rest) = self
                .bytes
                .split_first()
                .ok_or_else(|| "truncated varint".to_string())?;
            self.bytes = rest;
            if i == 9 && byte > 1 {
                return Err("varint overflows 64 bits".into());
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.bytes.len() {
            return Err(format!(
                "field of {n} bytes overruns its message ({} left)",
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let number = tag >> 3;
        if number == 0 {
            return Err("field number 0".into());
        }
        let wire = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                let raw = self.take(8)?;
                let mut le = [0u8; 8];
                le.copy_from_slice(raw);
                Wire::Fixed64(u64::from_le_bytes(le))
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| "length does not fit in memory".to_string())?;
                Wire::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        Ok(Some((number, wire)))
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".to_string())
}

/// Splits a map entry `{ string key = 1; value = 2; }` into its key and raw value bytes.
fn entry(bytes: &[u8]) -> Result<(&str, &[u8]), String> {
    let mut key = "";
    let mut value: &[u8] = &[];
    let mut fields = Fields::new(bytes);
    while let Some((number, wire)) = fields.next_field()? {
        match (number, wire) {
            (1, Wire::Bytes(b)) => key = utf8(b)?,
            (2, Wire::Bytes(b)) => value = b,
            (1 | 2, _) => return Err(format!("map entry field {number} has the wrong wire type")),
            _ => {}
        }
    }
    Ok((key, value))
}

/// The raw value of `key` in the map field `field` of a message (the last one wins, as in
/// protobuf); other entries are skipped without being decoded.
fn map_entry<'a>(message: &'a [u8], field: u64, key: &str) -> Result<Option<&'a [u8]>, String> {
    let mut found = None;
    let mut fields = Fields::new(message);
    while let Some((number, wire)) = fields.next_field()? {
        if number != field {
            continue;
        }
        let Wire::Bytes(bytes) = wire else {
            return Err(format!("field {field} has the wrong wire type"));
        };
        let (k, v) = entry(bytes)?;
        if k == key {
            found = Some(v);
        }
    }
    Ok(found)
}

/// `google.protobuf.Struct` → JSON object.
fn decode_struct(bytes: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let mut object = Map::new();
    let mut fields = Fields::new(bytes);
    while let Some((number, wire)) = fields.next_field()? {
        match (number, wire) {
            (1, Wire::Bytes(b)) => {
                let (key, value) = entry(b)?;
                object.insert(key.to_string(), decode_value(value, depth)?);
            }
            (1, _) => return Err("Struct.fields has the wrong wire type".into()),
            _ => {}
        }
    }
    Ok(Value::Object(object))
}

/// `google.protobuf.Value` → JSON (no kind set: null); `depth` counts enclosing containers.
fn decode_value(bytes: &[u8], depth: usize) -> Result<Value, String> {
    let mut value = Value::Null;
    let mut fields = Fields::new(bytes);
    while let Some((number, wire)) = fields.next_field()? {
        value = match (number, wire) {
            (1, Wire::Varint(_)) => Value::Null,
            (2, Wire::Fixed64(bits)) => {
                let n = f64::from_bits(bits);
                Value::Number(
                    // Not `format!("{n}")`: `Display for f64` alone links ~15 KB of float printing.
                    Number::from_f64(n).ok_or("number is not finite (NaN or infinity)")?,
                )
            }
            (3, Wire::Bytes(b)) => Value::String(utf8(b)?.to_string()),
            (4, Wire::Varint(v)) => Value::Bool(v != 0),
            (5, Wire::Bytes(b)) => decode_struct(b, depth + 1)?,
            (6, Wire::Bytes(b)) => decode_list(b, depth + 1)?,
            (1..=6, _) => return Err(format!("Value field {number} has the wrong wire type")),
            _ => continue,
        };
    }
    Ok(value)
}

/// `google.protobuf.ListValue` → JSON array.
fn decode_list(bytes: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let mut items = Vec::new();
    let mut fields = Fields::new(bytes);
    while let Some((number, wire)) = fields.next_field()? {
        match (number, wire) {
            (1, Wire::Bytes(b)) => items.push(decode_value(b, depth)?),
            (1, _) => return Err("ListValue.values has the wrong wire type".into()),
            _ => {}
        }
    }
    Ok(Value::Array(items))
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use serde_json::json;

    /// Serialized `Metadata` captured from Envoy 1.40 (`get_property(["metadata"])` in a probe
    /// filter after jwt_authn with `payload_in_metadata: jwt_payload`) for an RS256 token with
    /// the payload `{"iss":"https://idp.test.example","aud":["ma-gateway","other"],
    /// "sub":"user-1","org":"acme","iat":1700000000,"exp":4102444800,
    /// "scope":"sessions:read agents:*","https://example.com/tenant":"t-url",
    /// "nested":{"a":{"b":"deep"},"n":1.5,"t":true,"z":null,"l":[1,"x"]}}`.
    const ENVOY_PLAIN: &str = concat!(
        "0ae9020a1c656e766f792e66696c746572732e687474702e6a77745f617574686e12c8020ac5020a0b6a7774",
        "5f7061796c6f616412b5022ab2020a100a03657870120911000000e0ca90ee410a0d0a036f726712061a0461",
        "636d650a210a03697373121a1a1868747470733a2f2f6964702e746573742e6578616d706c650a250a1a6874",
        "7470733a2f2f6578616d706c652e636f6d2f74656e616e7412071a05742d75726c0a0f0a0373756212081a06",
        "757365722d310a5d0a066e657374656412532a510a070a017a120208000a070a0174120220010a0e0a016e12",
        "0911000000000000f83f0a140a0161120f2a0d0a0b0a016212061a04646565700a170a016c121232100a0911",
        "000000000000f03f0a031a01780a200a03617564121932170a0c1a0a6d612d676174657761790a071a056f74",
        "6865720a100a0369617412091100000040fc54d9410a210a0573636f706512181a1673657373696f6e733a72",
        "656164206167656e74733a2a",
    );
    /// The same token with `normalize_payload_in_metadata: {space_delimited_claims: [scope]}`
    /// and `header_in_metadata: jwt_header` (a second key in the namespace).
    const ENVOY_NORMALIZED: &str = concat!(
        "0aad030a1c656e766f792e66696c746572732e687474702e6a77745f617574686e128c030a3b0a0a6a77745f",
        "686561646572122d2a2b0a0e0a03616c6712071a0552533235360a0c0a0374797012051a034a57540a0b0a03",
        "6b696412041a026b310acc020a0b6a77745f7061796c6f616412bc022ab9020a200a03617564121932170a0c",
        "1a0a6d612d676174657761790a071a056f746865720a250a1a68747470733a2f2f6578616d706c652e636f6d",
        "2f74656e616e7412071a05742d75726c0a100a03657870120911000000e0ca90ee410a280a0573636f706512",
        "1f321d0a0f1a0d73657373696f6e733a726561640a0a1a086167656e74733a2a0a100a036961741209110000",
        "0040fc54d9410a0f0a0373756212081a06757365722d310a210a03697373121a1a1868747470733a2f2f6964",
        "702e746573742e6578616d706c650a0d0a036f726712061a0461636d650a5d0a066e657374656412532a510a",
        "070a0174120220010a170a016c121232100a0911000000000000f03f0a031a01780a0e0a016e120911000000",
        "000000f83f0a070a017a120208000a140a0161120f2a0d0a0b0a016212061a0464656570",
    );

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    // A test-only encoder, to build metadata Envoy would not produce.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn field_bytes(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    fn entry_bytes(key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        field_bytes(1, key.as_bytes(), &mut out);
        field_bytes(2, value, &mut out);
        out
    }
    fn encode_value(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        match value {
            Value::Null => {
                varint(1 << 3, &mut out);
                varint(0, &mut out);
            }
            Value::Number(n) => {
                varint(2 << 3 | 1, &mut out);
                out.extend_from_slice(&n.as_f64().unwrap().to_le_bytes());
            }
            Value::String(s) => field_bytes(3, s.as_bytes(), &mut out),
            Value::Bool(b) => {
                varint(4 << 3, &mut out);
                varint(u64::from(*b), &mut out);
            }
            Value::Object(_) => field_bytes(5, &encode_struct(value), &mut out),
            Value::Array(items) => {
                let mut list = Vec::new();
                for item in items {
                    field_bytes(1, &encode_value(item), &mut list);
                }
                field_bytes(6, &list, &mut out);
            }
        }
        out
    }
    fn encode_struct(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in value.as_object().unwrap() {
            field_bytes(1, &entry_bytes(k, &encode_value(v)), &mut out);
        }
        out
    }
    /// `Metadata` with the given namespaces, each a Struct of the given fields.
    fn metadata(namespaces: &[(&str, Value)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, fields) in namespaces {
            field_bytes(1, &entry_bytes(name, &encode_struct(fields)), &mut out);
        }
        out
    }
    /// `Metadata` whose jwt_authn `jwt_payload` is the given raw `Value` bytes.
    fn wrap_value(value: &[u8]) -> Vec<u8> {
        let mut ns = Vec::new();
        field_bytes(1, &entry_bytes("jwt_payload", value), &mut ns);
        let mut bytes = Vec::new();
        field_bytes(1, &entry_bytes(JWT_AUTHN_NAMESPACE, &ns), &mut bytes);
        bytes
    }
    /// `Metadata` whose jwt_authn `jwt_payload` is a Struct with the given raw field bytes.
    fn wrap_fields(fields: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        field_bytes(5, fields, &mut payload);
        wrap_value(&payload)
    }
    fn jwt_metadata(payload: Value) -> Vec<u8> {
        metadata(&[(JWT_AUTHN_NAMESPACE, json!({ "jwt_payload": payload }))])
    }

    fn rules() -> JwtRules {
        rules_from_json(&json!({"tenant_claim": "org"}), "jwt").unwrap()
    }

    fn expected_payload() -> Value {
        json!({"iss":"https://idp.test.example","aud":["ma-gateway","other"],
               "sub":"user-1","org":"acme","iat":1700000000.0,"exp":4102444800.0,
               "scope":"sessions:read agents:*","https://example.com/tenant":"t-url",
               "nested":{"a":{"b":"deep"},"n":1.5,"t":true,"z":null,"l":[1.0,"x"]}})
    }

    #[test]
    fn decodes_what_envoy_1_40_sends() {
        let payload = payload_from_metadata(&unhex(ENVOY_PLAIN), "jwt_payload")
            .unwrap()
            .unwrap();
        assert_eq!(payload, expected_payload());
        let claims = claims_from_metadata(&unhex(ENVOY_PLAIN), &rules())
            .unwrap()
            .unwrap();
        assert_eq!(
            claims,
            Claims {
                subject: "user-1".into(),
                tenant: "acme".into(),
                scopes: Some(vec!["sessions:read".into(), "agents:*".into()]),
            }
        );
    }

    #[test]
    fn decodes_normalized_scopes_and_ignores_the_header_key() {
        let bytes = unhex(ENVOY_NORMALIZED);
        let payload = payload_from_metadata(&bytes, "jwt_payload")
            .unwrap()
            .unwrap();
        assert_eq!(payload["scope"], json!(["sessions:read", "agents:*"]));
        let header = payload_from_metadata(&bytes, "jwt_header")
            .unwrap()
            .unwrap();
        assert_eq!(header["alg"], "RS256");
        let claims = claims_from_metadata(&bytes, &rules()).unwrap().unwrap();
        assert_eq!(
            claims.scopes,
            Some(vec!["sessions:read".into(), "agents:*".into()])
        );
    }

    #[test]
    fn no_payload_means_no_verified_jwt() {
        // No metadata at all, another namespace only, jwt_authn without our key.
        assert_eq!(claims_from_metadata(b"", &rules()), None);
        let other = metadata(&[("envoy.lb", json!({"canary": true}))]);
        assert_eq!(claims_from_metadata(&other, &rules()), None);
        let other_key = metadata(&[(JWT_AUTHN_NAMESPACE, json!({"jwt_header": {"alg": "RS256"}}))]);
        assert_eq!(claims_from_metadata(&other_key, &rules()), None);
        // The captured metadata read with another key.
        let mut elsewhere = rules();
        elsewhere.metadata_key = "payload".into();
        assert_eq!(claims_from_metadata(&unhex(ENVOY_PLAIN), &elsewhere), None);
    }

    #[test]
    fn other_namespaces_are_skipped_even_when_odd() {
        // A namespace whose Struct is not valid protobuf is never decoded.
        let mut bytes = Vec::new();
        field_bytes(1, &entry_bytes("envoy.lb", &[0xff, 0xff]), &mut bytes);
        bytes.extend(jwt_metadata(json!({"sub": "u", "org": "acme"})));
        // typed_filter_metadata (field 2) is skipped too.
        field_bytes(2, &entry_bytes("x", b"\x0a\x00"), &mut bytes);
        let claims = claims_from_metadata(&bytes, &rules()).unwrap().unwrap();
        assert_eq!(
            (claims.subject.as_str(), claims.tenant.as_str()),
            ("u", "acme")
        );
        assert_eq!(claims.scopes, None);
    }

    #[test]
    fn last_map_entry_wins_as_in_protobuf() {
        let mut bytes = jwt_metadata(json!({"sub": "first", "org": "acme"}));
        bytes.extend(jwt_metadata(json!({"sub": "second", "org": "acme"})));
        let claims = claims_from_metadata(&bytes, &rules()).unwrap().unwrap();
        assert_eq!(claims.subject, "second");
    }

    #[test]
    fn every_value_kind_round_trips() {
        let payload = json!({"s": "x", "n": -2.5, "b": false, "z": null, "l": [], "o": {},
                             "deep": {"l": [{"k": [true, null, "v", 3.0]}]}});
        let bytes = jwt_metadata(payload.clone());
        assert_eq!(
            payload_from_metadata(&bytes, "jwt_payload").unwrap(),
            Some(payload)
        );
    }

    #[test]
    fn malformed_metadata_is_an_error_not_a_pass() {
        let good = jwt_metadata(json!({"sub": "u", "org": "acme"}));
        for cut in 1..good.len() {
            // Every truncation either still has no complete payload entry (None) or is an
            // error; none yields claims.
            if let Some(Ok(claims)) = claims_from_metadata(&good[..cut], &rules()) {
                panic!("truncated at {cut} gave {claims:?}");
            }
        }
        let bad = [
            &[0x0a, 0x05, 0x0a][..], // length past the end
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..], // varint too long
            &[0x0b][..],             // wire type 3 (group)
            &[0x00][..],             // field number 0
        ];
        for bytes in bad {
            assert!(
                payload_from_metadata(bytes, "jwt_payload").is_err(),
                "{bytes:?}"
            );
        }
        // Invalid UTF-8 in a claim string.
        let mut value = Vec::new();
        field_bytes(3, &[0xc3, 0x28], &mut value);
        let mut fields = Vec::new();
        field_bytes(1, &entry_bytes("sub", &value), &mut fields);
        let bytes = wrap_fields(&fields);
        let err = claims_from_metadata(&bytes, &rules()).unwrap().unwrap_err();
        assert!(err.contains("UTF-8"), "{err}");
        // A non-finite number.
        let mut value = Vec::new();
        varint(2 << 3 | 1, &mut value);
        value.extend_from_slice(&f64::NAN.to_le_bytes());
        let bytes = wrap_value(&value);
        assert!(payload_from_metadata(&bytes, "jwt_payload").is_err());
        // The payload is a string, not an object.
        let bytes = metadata(&[(JWT_AUTHN_NAMESPACE, json!({"jwt_payload": "eyJ..."}))]);
        let err = claims_from_metadata(&bytes, &rules()).unwrap().unwrap_err();
        assert!(err.ends_with("is a string, not an object"), "{err}");
    }

    #[test]
    fn deep_nesting_is_bounded() {
        // The payload object is level 1; `l` holds `n` nested arrays (levels 2..=n+1). Built
        // iteratively: serde_json's own recursion would overflow first on the deep case.
        let nested = |n: usize| {
            let mut value = encode_value(&json!("leaf"));
            for _ in 0..n {
                let mut list = Vec::new();
                field_bytes(1, &value, &mut list);
                value.clear();
                field_bytes(6, &list, &mut value);
            }
            let mut fields = Vec::new();
            field_bytes(1, &entry_bytes("l", &value), &mut fields);
            wrap_fields(&fields)
        };
        assert!(payload_from_metadata(&nested(MAX_DEPTH - 1), "jwt_payload").is_ok());
        let err = payload_from_metadata(&nested(MAX_DEPTH), "jwt_payload").unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        // Very deep input fails cleanly instead of overflowing the stack.
        assert!(payload_from_metadata(&nested(3000), "jwt_payload").is_err());
    }

    #[test]
    fn unknown_fields_in_value_and_struct_are_skipped() {
        let mut value = Vec::new();
        field_bytes(3, b"u", &mut value);
        varint(9 << 3 | 5, &mut value); // fixed32 field 9
        value.extend_from_slice(&[1, 2, 3, 4]);
        varint(10 << 3, &mut value); // varint field 10
        varint(300, &mut value);
        let mut fields = Vec::new();
        field_bytes(1, &entry_bytes("sub", &value), &mut fields);
        field_bytes(
            1,
            &entry_bytes("org", &encode_value(&json!("acme"))),
            &mut fields,
        );
        field_bytes(7, b"ignored", &mut fields);
        let bytes = wrap_fields(&fields);
        let claims = claims_from_metadata(&bytes, &rules()).unwrap().unwrap();
        assert_eq!(
            (claims.subject.as_str(), claims.tenant.as_str()),
            ("u", "acme")
        );
    }

    fn claims_of(payload: Value, rules: &JwtRules) -> Result<Claims, String> {
        claims_from_payload(&payload, rules)
    }

    #[test]
    fn claim_names_exact_then_nested() {
        let payload = json!({"sub": "u", "org": {"id": "nested-org"}, "org.id": "flat-org",
                             "https://example.com/tenant": "url-tenant",
                             "https://example.com/claims": {"tenant": "in-url-object"},
                             "a": {"b.c": {"d": "mixed"}}});
        let with = |tenant: &str| {
            let mut r = rules();
            r.tenant_claim = tenant.into();
            claims_of(payload.clone(), &r).map(|c| c.tenant)
        };
        assert_eq!(with("org.id").unwrap(), "flat-org"); // the whole name wins
        assert_eq!(with("https://example.com/tenant").unwrap(), "url-tenant");
        assert_eq!(
            with("https://example.com/claims.tenant").unwrap(),
            "in-url-object"
        );
        assert_eq!(with("a.b.c.d").unwrap(), "mixed");
        let mut no_flat = payload.clone();
        no_flat.as_object_mut().unwrap().remove("org.id");
        let mut r = rules();
        r.tenant_claim = "org.id".into();
        assert_eq!(claims_of(no_flat, &r).unwrap().tenant, "nested-org");
        assert_eq!(
            with("org.missing").unwrap_err(),
            "jwt claim \"org.missing\": missing"
        );
        assert_eq!(
            with("org").unwrap_err(),
            "jwt claim \"org\": expected a string, found an object"
        );
    }

    #[test]
    fn tenant_is_required_and_must_be_a_name() {
        let r = rules();
        assert_eq!(
            claims_of(json!({"sub": "u"}), &r).unwrap_err(),
            "jwt claim \"org\": missing"
        );
        assert_eq!(
            claims_of(json!({"sub": "u", "org": 7}), &r).unwrap_err(),
            "jwt claim \"org\": expected a string, found a number"
        );
        for bad in ["", "a b", "acme/x", "t\u{0}", "ünï", &"t".repeat(65)] {
            let err = claims_of(json!({"sub": "u", "org": bad}), &r).unwrap_err();
            assert!(err.contains("is not a tenant name"), "{bad:?}: {err}");
        }
        for good in ["acme", "team-a.prod_1", &"t".repeat(64)] {
            assert_eq!(
                claims_of(json!({"sub": "u", "org": good}), &r)
                    .unwrap()
                    .tenant,
                good
            );
        }
    }

    #[test]
    fn subject_is_required() {
        let r = rules();
        assert_eq!(
            claims_of(json!({"org": "acme"}), &r).unwrap_err(),
            "jwt claim \"sub\": missing"
        );
        assert!(claims_of(json!({"org": "acme", "sub": 1}), &r)
            .unwrap_err()
            .contains("expected a string"));
        assert!(claims_of(json!({"org": "acme", "sub": ""}), &r).is_err());
        assert!(claims_of(json!({"org": "acme", "sub": "a\nb"}), &r).is_err());
        let mut custom = rules();
        custom.subject_claim = "email".into();
        assert_eq!(
            claims_of(json!({"org": "acme", "email": "a@b.c"}), &custom)
                .unwrap()
                .subject,
            "a@b.c"
        );
    }

    #[test]
    fn scopes_from_string_or_array() {
        let r = rules();
        let scopes = |v: Value| claims_of(json!({"sub": "u", "org": "acme", "scope": v}), &r);
        assert_eq!(
            scopes(json!("  a:b \t c:d ")).unwrap().scopes,
            Some(vec!["a:b".into(), "c:d".into()])
        );
        assert_eq!(scopes(json!("")).unwrap().scopes, Some(vec![]));
        assert_eq!(
            scopes(json!(["a:b", "c:d"])).unwrap().scopes,
            Some(vec!["a:b".into(), "c:d".into()])
        );
        assert_eq!(scopes(json!([])).unwrap().scopes, Some(vec![]));
        assert_eq!(
            claims_of(json!({"sub": "u", "org": "acme"}), &r)
                .unwrap()
                .scopes,
            None
        );
        assert_eq!(
            scopes(json!(null)).unwrap_err(),
            "jwt claim \"scope\": expected a space-separated string or an array of strings, found null"
        );
        assert_eq!(
            scopes(json!(["a", 1])).unwrap_err(),
            "jwt claim \"scope\": item 1: expected a string, found a number"
        );
        assert!(scopes(json!(["a b"]))
            .unwrap_err()
            .contains("not a single scope"));
        assert!(scopes(json!([""])).is_err());
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        assert!(scopes(json!(many.join(" ")))
            .unwrap_err()
            .contains("more than"));
        assert!(scopes(json!(many)).unwrap_err().contains("more than"));
        assert!(scopes(json!("x".repeat(MAX_SCOPE_BYTES + 1)))
            .unwrap_err()
            .contains("longer than"));
        assert!(scopes(json!("a:b c\u{0}d")).is_err());
        assert!(scopes(json!(["c\u{7}d"])).is_err());
        let mut scp = rules();
        scp.scopes_claim = "scp".into();
        assert_eq!(
            claims_of(
                json!({"sub": "u", "org": "acme", "scp": ["x:y"], "scope": 5}),
                &scp
            )
            .unwrap()
            .scopes,
            Some(vec!["x:y".into()])
        );
    }

    #[test]
    fn rules_defaults_and_full() {
        assert_eq!(
            rules(),
            JwtRules {
                metadata_key: "jwt_payload".into(),
                tenant_claim: "org".into(),
                scopes_claim: "scope".into(),
                subject_claim: "sub".into(),
            }
        );
        let full = rules_from_json(
            &json!({"metadata_key": "p", "tenant_claim": "https://example.com/tenant",
                    "scopes_claim": "scp", "subject_claim": "email"}),
            "jwt",
        )
        .unwrap();
        assert_eq!(full.metadata_key, "p");
        assert_eq!(full.tenant_claim, "https://example.com/tenant");
        assert_eq!(full.scopes_claim, "scp");
        assert_eq!(full.subject_claim, "email");
    }

    #[test]
    fn rules_errors_name_the_field() {
        let err = |v: Value| rules_from_json(&v, "jwt").unwrap_err();
        assert_eq!(
            err(json!({"tenant_claim": 1})),
            "jwt.tenant_claim: expected a string, found a number"
        );
        assert_eq!(
            err(json!({})),
            "jwt.tenant_claim: missing (a string is required)"
        );
        assert_eq!(
            err(json!({"tenant_claim": "org", "tenant": "x"})),
            "jwt.tenant: unknown field"
        );
        assert_eq!(
            err(json!({"tenant_claim": "org", "metadata_key": ""})),
            format!("jwt.metadata_key: expected a non-empty name of at most {MAX_NAME_BYTES} bytes without control characters")
        );
        assert!(err(json!({"tenant_claim": "org", "scopes_claim": "a\nb"}))
            .starts_with("jwt.scopes_claim: "));
        assert_eq!(
            err(json!(["org"])),
            "jwt: expected an object, found an array"
        );
        assert_eq!(
            rules_from_json(&json!({"tenant_claim": null}), "").unwrap_err(),
            "tenant_claim: expected a string, found null"
        );
        assert_eq!(
            rules_from_json(&json!(1), "").unwrap_err(),
            "(root): expected an object, found a number"
        );
    }
}
