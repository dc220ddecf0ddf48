//! Content codings (RFC 9110 §8.4) of the bodies the gateway reads.
//!
//! The gateway reads request bodies (policy, references, owner tag, budget clamp, event types)
//! and response bodies (metering, owner-tag stripping, list filtering) as the JSON and SSE
//! bytes they are. The real API compresses whenever the client offers it (gzip SSE flushed per
//! event, brotli JSON) and the official SDKs always offer it, so the gateway owns the
//! `accept-encoding` of every call it forwards or makes: [`UPSTREAM_ACCEPT_ENCODING`]. A body
//! that arrives encoded anyway is never passed unread: a request body is refused before
//! anything of it goes upstream ([`request_body_refusal`]); a response the gateway must read is
//! answered with a 502 envelope instead ([`response_body_refusal`]).

use crate::errors::{excerpt, ApiError, ErrorKind};

/// What the gateway asks the upstream for on every call: bytes it can read, never a coding.
pub const UPSTREAM_ACCEPT_ENCODING: &str = "identity";

/// Whether a `content-encoding` value leaves the bytes as they are: absent, empty, or only
/// `identity` (any case, in a list).
pub fn is_identity(content_encoding: Option<&str>) -> bool {
    content_encoding.is_none_or(|value| {
        value
            .split(',')
            .map(str::trim)
            .all(|coding| coding.is_empty() || coding.eq_ignore_ascii_case("identity"))
    })
}

/// The refusal of a request body the gateway must read but that arrives encoded: 415, so
/// the client knows to send it as plain JSON (`None` when it is plain).
pub fn request_body_refusal(content_encoding: Option<&str>) -> Option<ApiError> {
    if is_identity(content_encoding) {
        return None;
    }
    Some(
        ApiError::new(
            ErrorKind::UnsupportedEncoding,
            format!(
                "request bodies of this call are inspected by the gateway and must not be encoded (content-encoding: {}); send plain JSON",
                excerpt(content_encoding.unwrap_or_default(), 64)
            ),
        )
        .because("content_encoding"),
    )
}

/// The answer to a response the gateway must read (meter, strip, filter) that the upstream
/// sent encoded although it was asked for `identity`: 502, never the unread bytes.
pub fn response_body_refusal(content_encoding: Option<&str>) -> Option<ApiError> {
    if is_identity(content_encoding) {
        return None;
    }
    Some(
        ApiError::new(
            ErrorKind::BadGateway,
            format!(
                "the upstream answered with content-encoding {} although the gateway asked for identity; the response was not forwarded unread",
                excerpt(content_encoding.unwrap_or_default(), 64)
            ),
        )
        .because("upstream_encoding"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn identity_spellings() {
        for plain in [
            None,
            Some(""),
            Some("identity"),
            Some(" IDENTITY "),
            Some("identity, identity"),
            Some(","),
        ] {
            assert!(is_identity(plain), "{plain:?}");
            assert_eq!(request_body_refusal(plain), None);
            assert_eq!(response_body_refusal(plain), None);
        }
    }

    #[test]
    fn every_real_coding_is_refused() {
        for coded in [
            "gzip",
            "x-gzip",
            "deflate",
            "br",
            "zstd",
            "compress",
            "GZIP",
            "identity, gzip",
            "gzip, identity",
            "unknown-coding",
        ] {
            assert!(!is_identity(Some(coded)), "{coded}");
            let request = request_body_refusal(Some(coded)).unwrap();
            assert_eq!(request.status(), 415);
            assert_eq!(request.kind.wire_name(), "invalid_request_error");
            assert_eq!(request.reason, "content_encoding");
            assert!(request.message.contains(coded), "{}", request.message);
            let response = response_body_refusal(Some(coded)).unwrap();
            assert_eq!(response.status(), 502);
            assert_eq!(response.kind.wire_name(), "api_error");
            assert_eq!(response.reason, "upstream_encoding");
        }
    }

    #[test]
    fn a_hostile_coding_value_is_excerpted_in_the_message() {
        let long = "g".repeat(500);
        let refusal = request_body_refusal(Some(&long)).unwrap();
        assert!(refusal.message.len() < 400, "{}", refusal.message.len());
    }
}
