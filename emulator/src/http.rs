//! The emulator's HTTP vocabulary: parsed [`Request`]s, [`Reply`]s (full, streamed, or a
//! deliberate [`Misbehave`]iour of the connection), and the [`Handler`] the server calls.
//! The wire itself (HTTP/1.1, HTTP/2, TLS, compression, chunking) is [`crate::server`].

use std::io;
use std::time::Duration;

/// Upper bound on a request body (as received and once decoded); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A request. Header names are lowercase; values are trimmed. On HTTP/2 the `:authority`
/// pseudo-header is kept as a header of that name (there is no `host`).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// The request target as received (path plus query string).
    pub target: String,
    /// The path part of the target, without the query string.
    pub path: String,
    pub query: Query,
    pub headers: Vec<(String, String)>,
    /// The body, decoded from its `content-encoding`.
    pub body: Vec<u8>,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
}

impl Request {
    /// A request without a body. Absolute-form targets (`http://host/path`) are reduced to
    /// origin-form for `path` and `query`.
    pub fn new(
        method: &str,
        target: &str,
        headers: Vec<(String, String)>,
        protocol: &'static str,
    ) -> Self {
        let origin = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
        Self {
            method: method.to_string(),
            target: target.to_string(),
            path: path.to_string(),
            query: Query::parse(query),
            headers,
            body: Vec::new(),
            protocol,
        }
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lowercase), in order of appearance.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decoded query parameters, in order. Bracket arrays (`types[]=a&types[]=b`) are kept as
/// separate pairs and read with [`Query::get_all`].
#[derive(Debug, Default, Clone)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses a raw query string (without the `?`), percent-decoding keys and values.
    pub fn parse(raw: &str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Self { pairs }
    }

    /// The first value of a scalar parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of an array parameter, accepting `name[]=`, `name[0]=` and plain `name=`.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| {
                k == name
                    || k.strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix('['))
                        .and_then(|rest| rest.strip_suffix(']'))
                        .is_some_and(|inner| inner.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Decodes `%XX` escapes and `+` (as space). Invalid escapes are kept literally.
pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A complete response; framing (`content-length`), `content-encoding` and the protocol's
/// connection management are added by the [`crate::server`].
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The body of a streamed response: called (on a blocking thread) with a sink that delivers
/// every frame to the peer as soon as it is sent. An `Err` ends the body abruptly (HTTP/1.1:
/// the connection is dropped without the last chunk; HTTP/2: the stream is reset).
pub type StreamBody = Box<dyn FnOnce(&mut dyn FrameSink) -> io::Result<()> + Send>;

/// A response whose body is produced incrementally.
pub struct StreamReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: StreamBody,
}

/// A deliberate misbehaviour of the connection (fault injection); it is always closed after.
#[derive(Debug, Clone)]
pub enum Misbehave {
    /// Close the connection without answering.
    Close,
    /// Send nothing for this long (or until the peer closes), then close.
    Hang(Duration),
    /// Send this status and these headers (a body is announced, chunked), then nothing for
    /// `hold` (or until the peer closes), then close: the body never comes.
    HeadThenHang {
        status: u16,
        headers: Vec<(String, String)>,
        hold: Duration,
    },
    /// Send `resp` with the `Content-Length` of its full body but only its first `keep`
    /// bytes, then close.
    Truncate { resp: Response, keep: usize },
}

/// What a handler answers.
pub enum Reply {
    Full(Response),
    Stream(StreamReply),
    Fault(Misbehave),
}

impl Reply {
    pub fn status(&self) -> u16 {
        match self {
            Self::Full(r) => r.status,
            Self::Stream(s) => s.status,
            Self::Fault(Misbehave::HeadThenHang { status, .. }) => *status,
            Self::Fault(Misbehave::Truncate { resp, .. }) => resp.status,
            Self::Fault(_) => 0,
        }
    }

    /// The headers to be sent; `None` when the reply sends no head at all.
    pub fn headers_mut(&mut self) -> Option<&mut Vec<(String, String)>> {
        match self {
            Self::Full(r) => Some(&mut r.headers),
            Self::Stream(s) => Some(&mut s.headers),
            Self::Fault(Misbehave::HeadThenHang { headers, .. }) => Some(headers),
            Self::Fault(Misbehave::Truncate { resp, .. }) => Some(&mut resp.headers),
            Self::Fault(Misbehave::Close | Misbehave::Hang(_)) => None,
        }
    }
}

/// Where a streamed body goes, one frame at a time.
pub trait FrameSink {
    /// Delivers `data` to the peer now (no buffering past this call).
    fn send(&mut self, data: &[u8]) -> io::Result<()>;
}

/// What the server learnt about a request body once it stopped reading it.
#[derive(Debug, Clone, Default)]
pub struct BodyReport {
    /// Bytes received (before any `content-encoding` is decoded).
    pub bytes: usize,
    /// Whether the body was read to its end.
    pub complete: bool,
    /// Names of the trailer fields (chunked trailers, HTTP/2 trailing HEADERS).
    pub trailers: Vec<String>,
}

/// The request handler the server dispatches to. `handle` runs on a blocking thread.
pub trait Handler: Send + Sync + 'static {
    /// A request head has arrived; its body is not read yet. Returns a token for
    /// [`Handler::body_read`] (`None`: the request is not tracked).
    fn arrived(&self, head: &Request) -> Option<u64>;
    /// The body of the request `token` stopped being read (to its end, or not).
    fn body_read(&self, token: u64, report: &BodyReport);
    fn handle(&self, req: Request) -> Reply;
    /// The response for a request refused before it reached `handle` (400, 413, 415).
    fn reject(&self, status: u16, message: &str) -> Response;
}

/// HTTP/1.1 chunked framing of a streamed body into a byte buffer (tests inspect the exact
/// bytes a stream produced).
#[cfg(test)]
pub struct ChunkedWriter<'a> {
    inner: &'a mut Vec<u8>,
}

#[cfg(test)]
impl<'a> ChunkedWriter<'a> {
    pub fn new(inner: &'a mut Vec<u8>) -> Self {
        Self { inner }
    }
}

#[cfg(test)]
impl FrameSink for ChunkedWriter<'_> {
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            self.inner
                .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            self.inner.extend_from_slice(data);
            self.inner.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn absolute_targets_are_reduced_to_origin_form() {
        let r = Request::new("GET", "http://h:1/v1/agents?limit=2", vec![], "HTTP/1.1");
        assert_eq!(r.path, "/v1/agents");
        assert_eq!(r.query.get("limit"), Some("2"));
        assert_eq!(r.target, "http://h:1/v1/agents?limit=2");
        let r = Request::new("GET", "/x?a=1", vec![("k".into(), "v".into())], "HTTP/2");
        assert_eq!((r.path.as_str(), r.header("k")), ("/x", Some("v")));
    }

    #[test]
    fn query_bracket_arrays_and_percent_decoding() {
        let q = Query::parse(
            "statuses%5B%5D=idle&statuses[]=running&types[0]=agent.message&order=asc&x=a%20b+c&bad=%zz&t=%",
        );
        assert_eq!(q.get_all("statuses"), vec!["idle", "running"]);
        assert_eq!(q.get_all("types"), vec!["agent.message"]);
        assert_eq!(q.get("order"), Some("asc"));
        assert_eq!(q.get("x"), Some("a b c"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.get("t"), Some("%"));
        assert!(q.get_all("statusesx").is_empty());
    }
}
