//! The Anthropic error envelope the gateway answers with when it refuses a call itself.
//!
//! SDKs turn `{"type":"error","error":{"type":…,"message":…},"request_id":…}` into their
//! normal exception types, so every refusal the gateway makes uses exactly this shape and the
//! status-to-kind mapping of the upstream API.

use serde::Serialize;

/// The kinds of error the upstream API uses, by HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400
    InvalidRequest,
    /// 401
    Authentication,
    /// 403
    Permission,
    /// 404
    NotFound,
    /// 413
    RequestTooLarge,
    /// 415: a body the gateway must read arrived with a content coding.
    UnsupportedEncoding,
    /// 429
    RateLimit,
    /// 500
    Api,
    /// 502: the upstream answered in a form the gateway must not pass unread.
    BadGateway,
    /// 503: the gateway cannot forward (no upstream credential, for example).
    Unavailable,
}

impl ErrorKind {
    pub fn status(self) -> u32 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Authentication => 401,
            ErrorKind::Permission => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::UnsupportedEncoding => 415,
            ErrorKind::RateLimit => 429,
            ErrorKind::Api => 500,
            ErrorKind::BadGateway => 502,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The rule family that usually produces this error, for the audit record; a call site
    /// names a more precise one with [`ApiError::because`].
    pub fn default_reason(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "request",
            ErrorKind::Authentication => "authentication",
            ErrorKind::Permission => "scope",
            ErrorKind::NotFound => "route",
            ErrorKind::RequestTooLarge => "body_size",
            ErrorKind::UnsupportedEncoding => "content_encoding",
            ErrorKind::RateLimit => "rate_limit",
            ErrorKind::Api => "internal",
            ErrorKind::BadGateway => "upstream",
            ErrorKind::Unavailable => "unavailable",
        }
    }

    /// The `error.type` string clients dispatch on.
    pub fn wire_name(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::UnsupportedEncoding => "invalid_request_error",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::BadGateway => "api_error",
            // SDKs treat 503 like 529: retryable. The upstream's own word for it is this one.
            ErrorKind::Unavailable => "overloaded_error",
        }
    }
}

/// A refusal the gateway answers itself; the upstream is never contacted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// Which gateway rule refused (`authentication`, `route`, `scope`, `ownership`, …), for
    /// the audit record; defaults to the error type.
    pub reason: &'static str,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            reason: kind.default_reason(),
        }
    }

    /// Names the rule that refused, for the audit record.
    pub fn because(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    pub fn status(&self) -> u32 {
        self.kind.status()
    }

    /// The JSON body, e.g.
    /// `{"type":"error","error":{"type":"not_found_error","message":"…"},"request_id":"req_gw_1"}`.
    pub fn envelope(&self, request_id: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            error: Inner<'a>,
            request_id: &'a str,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            message: &'a str,
        }
        let envelope = Envelope {
            kind: "error",
            error: Inner {
                kind: self.kind.wire_name(),
                message: &self.message,
            },
            request_id,
        };
        // Serialising plain strings cannot fail; the fallback keeps the filter panic-free anyway.
        serde_json::to_vec(&envelope).unwrap_or_else(|_| {
            br#"{"type":"error","error":{"type":"api_error","message":"gateway error"}}"#.to_vec()
        })
    }
}

/// The `request_id` for a gateway-made answer: `req_gw_` plus Envoy's `x-request-id` with
/// anything but ASCII alphanumerics dropped, so log lines on both sides can be joined.
pub fn gateway_request_id(envoy_request_id: Option<&str>) -> String {
    let mut id = String::from("req_gw_");
    if let Some(source) = envoy_request_id {
        id.extend(source.chars().filter(char::is_ascii_alphanumeric).take(40));
    }
    id
}

/// How a JSON value is named in config error messages: `expected a string, found a number`.
pub fn json_type_name(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shortens caller-supplied text before it is echoed in a message, so an error can never
/// reflect a huge or control-character-laden input back.
pub fn excerpt(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max_chars)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > max_chars {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn envelope_has_the_upstream_shape() {
        let body = ApiError::new(ErrorKind::NotFound, "no such \"thing\"").envelope("req_gw_1");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "type": "error",
                "error": {"type": "not_found_error", "message": "no such \"thing\""},
                "request_id": "req_gw_1"
            })
        );
    }

    #[test]
    fn statuses_and_names() {
        let table = [
            (ErrorKind::InvalidRequest, 400, "invalid_request_error"),
            (ErrorKind::Authentication, 401, "authentication_error"),
            (ErrorKind::Permission, 403, "permission_error"),
            (ErrorKind::NotFound, 404, "not_found_error"),
            (ErrorKind::RequestTooLarge, 413, "request_too_large"),
            (ErrorKind::RateLimit, 429, "rate_limit_error"),
            (ErrorKind::Api, 500, "api_error"),
            (ErrorKind::Unavailable, 503, "overloaded_error"),
        ];
        for (kind, status, name) in table {
            assert_eq!((kind.status(), kind.wire_name()), (status, name));
        }
    }

    #[test]
    fn request_id_keeps_only_alphanumerics() {
        assert_eq!(
            gateway_request_id(Some("1b4e28ba-2fa1-11d2\n")),
            "req_gw_1b4e28ba2fa111d2"
        );
        assert_eq!(gateway_request_id(None), "req_gw_");
    }

    #[test]
    fn excerpt_truncates_and_masks_controls() {
        assert_eq!(excerpt("ab\ncd", 10), "ab?cd");
        assert_eq!(excerpt("abcdef", 3), "abc…");
    }
}
