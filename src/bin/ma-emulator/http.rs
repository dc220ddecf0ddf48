//! A deliberately small HTTP/1.1 server on `std::net`.
//!
//! One thread per connection, persistent connections (HTTP/1.1 keep-alive by default,
//! `Connection: close` honoured), request bodies framed by `Content-Length` or
//! `Transfer-Encoding: chunked`, `Expect: 100-continue`, full responses with
//! `Content-Length`, and streamed responses with `Transfer-Encoding: chunked` where every
//! chunk is flushed as soon as it is written (server-sent events).
//!
//! For fault injection a handler may answer [`Reply::Fault`] instead of a response: the
//! connection then misbehaves on purpose ([`Misbehave`]: closed unanswered, held silent,
//! a head and then silence, or a body cut short of its `Content-Length`) and is closed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Upper bound on the request line plus headers.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Upper bound on a request body; larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Idle keep-alive connections are closed after this long without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that stops reading a stream is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed request. Header names are lowercased; values are trimmed.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target as received (path plus query string).
    pub target: String,
    /// The path part of the target, without the query string.
    pub path: String,
    pub query: Query,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    http10: bool,
}

impl Request {
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

    /// Whether the connection may be reused after this request.
    pub fn keep_alive(&self) -> bool {
        let tokens: Vec<String> = self
            .header_values("connection")
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        if tokens.iter().any(|t| t == "close") {
            false
        } else if tokens.iter().any(|t| t == "keep-alive") {
            true
        } else {
            !self.http10
        }
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

/// Why a request could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection cleanly between requests.
    Closed,
    /// Socket error or timeout.
    Io(io::Error),
    /// Not valid HTTP/1.x: answer 400 and close.
    Malformed(String),
    /// Headers or body over the limits: answer 413 (or 431) and close.
    TooLarge(String),
}

/// Reads one line terminated by `\n`, charging its length to `budget`; strips `\r\n`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<Option<String>, ReadError> {
    let mut buf = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX).saturating_add(1);
    let n = r
        .by_ref()
        .take(limit)
        .read_until(b'\n', &mut buf)
        .map_err(ReadError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(ReadError::TooLarge("request headers too large".into()));
    }
    *budget -= n;
    if buf.last() != Some(&b'\n') {
        return Err(ReadError::Malformed("unexpected end of request".into()));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Reads one request. `w` receives the interim `100 Continue` when the client asks for it.
pub fn read_request<R: BufRead, W: Write>(r: &mut R, w: &mut W) -> Result<Request, ReadError> {
    let mut budget = MAX_HEADER_BYTES;
    // RFC 9112 §2.2: ignore empty lines before the request line.
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Err(ReadError::Closed),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None)
            if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) && !t.is_empty() =>
        {
            (m.to_string(), t.to_string(), v)
        }
        _ => return Err(ReadError::Malformed("invalid request line".into())),
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Malformed("unsupported HTTP version".into())),
    };

    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?
            .ok_or_else(|| ReadError::Malformed("unexpected end of headers".into()))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ReadError::Malformed("invalid header line".into()))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(ReadError::Malformed("invalid header name".into()));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }

    let mut req = Request {
        method,
        path: String::new(),
        query: Query::default(),
        target,
        headers,
        body: Vec::new(),
        http10,
    };
    // Absolute-form targets (`http://host/path`) are reduced to origin-form.
    let origin = match req.target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_string(),
        None => req.target.clone(),
    };
    let (path, query) = origin.split_once('?').unwrap_or((&origin, ""));
    req.path = path.to_string();
    req.query = Query::parse(query);

    let chunked = req
        .header_values("transfer-encoding")
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    let content_length = parse_content_length(&req)?;
    let expects_body = chunked || content_length.unwrap_or(0) > 0;
    if let Some(len) = content_length {
        if !chunked && len > MAX_BODY_BYTES {
            return Err(ReadError::TooLarge(format!(
                "request body of {len} bytes exceeds the {MAX_BODY_BYTES} byte limit"
            )));
        }
    }
    if expects_body
        && req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .and_then(|()| w.flush())
            .map_err(ReadError::Io)?;
    }
    if chunked {
        req.body = read_chunked(r)?;
    } else if let Some(len) = content_length {
        let mut body = vec![0; len];
        r.read_exact(&mut body).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ReadError::Malformed("truncated request body".into()),
            _ => ReadError::Io(e),
        })?;
        req.body = body;
    }
    Ok(req)
}

fn parse_content_length(req: &Request) -> Result<Option<usize>, ReadError> {
    let mut found: Option<usize> = None;
    for value in req.header_values("content-length") {
        for item in value.split(',') {
            let n = item
                .trim()
                .parse::<usize>()
                .map_err(|_| ReadError::Malformed("invalid content-length".into()))?;
            if found.is_some_and(|prev| prev != n) {
                return Err(ReadError::Malformed("conflicting content-length".into()));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn read_chunked<R: BufRead>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let mut budget = 4096;
        let line = read_line(r, &mut budget)?
            .ok_or_else(|| ReadError::Malformed("unexpected end of chunked body".into()))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ReadError::Malformed("invalid chunk size".into()))?;
        if size == 0 {
            // Trailer section: skip fields up to the blank line.
            let mut trailer_budget = MAX_HEADER_BYTES;
            while let Some(l) = read_line(r, &mut trailer_budget)? {
                if l.is_empty() {
                    break;
                }
            }
            return Ok(body);
        }
        if body.len().saturating_add(size) > MAX_BODY_BYTES {
            return Err(ReadError::TooLarge(format!(
                "request body exceeds the {MAX_BODY_BYTES} byte limit"
            )));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ReadError::Malformed("truncated chunk".into()),
                _ => ReadError::Io(e),
            })?;
        let mut budget = 2;
        match read_line(r, &mut budget) {
            Ok(Some(l)) if l.is_empty() => {}
            Err(ReadError::Io(e)) => return Err(ReadError::Io(e)),
            _ => return Err(ReadError::Malformed("missing CRLF after chunk".into())),
        }
    }
}

/// A complete response; `Content-Length` and `Connection` are added when written.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The body of a streamed response: called with a writer that frames and flushes chunks.
pub type StreamBody = Box<dyn FnOnce(&mut ChunkedWriter<'_>) -> io::Result<()> + Send>;

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

/// Chunks up to this size are copied into one buffer and written with a single call.
const COALESCE_MAX: usize = 64 * 1024;

/// Writes chunked-transfer frames, flushing after each one.
pub struct ChunkedWriter<'a> {
    inner: &'a mut dyn Write,
}

impl<'a> ChunkedWriter<'a> {
    pub fn new(inner: &'a mut dyn Write) -> Self {
        Self { inner }
    }

    /// Sends `data` as one chunk and flushes it to the peer. Small chunks go out in a single
    /// write; big ones (e.g. `emulator:large` frames) are written in place, not copied.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let head = format!("{:x}\r\n", data.len());
        if data.len() <= COALESCE_MAX {
            let mut frame = Vec::with_capacity(head.len() + data.len() + 2);
            frame.extend_from_slice(head.as_bytes());
            frame.extend_from_slice(data);
            frame.extend_from_slice(b"\r\n");
            self.inner.write_all(&frame)?;
        } else {
            self.inner.write_all(head.as_bytes())?;
            self.inner.write_all(data)?;
            self.inner.write_all(b"\r\n")?;
        }
        self.inner.flush()
    }

    /// Writes the terminating zero-length chunk.
    pub fn finish(&mut self) -> io::Result<()> {
        self.inner.write_all(b"0\r\n\r\n")?;
        self.inner.flush()
    }
}

/// The request handler the server dispatches to.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Reply;
    /// The response for a request that could not be parsed (status 400, 413 or 431).
    fn reject(&self, status: u16, message: &str) -> Response;
}

/// Accepts connections forever, one thread per connection.
pub fn serve<H: Handler>(listener: &TcpListener, handler: &Arc<H>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let handler = Arc::clone(handler);
                let spawned = thread::Builder::new()
                    .name("ma-emulator-conn".into())
                    .spawn(move || handle_connection(stream, handler.as_ref()));
                if let Err(e) = spawned {
                    eprintln!("ma-emulator: cannot spawn connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("ma-emulator: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle_connection<H: Handler>(stream: TcpStream, handler: &H) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let req = match read_request(&mut reader, &mut writer) {
            Ok(req) => req,
            Err(ReadError::Closed | ReadError::Io(_)) => return,
            Err(ReadError::Malformed(msg)) => {
                let _ = write_response(&mut writer, &handler.reject(400, &msg), false);
                return;
            }
            Err(ReadError::TooLarge(msg)) => {
                let _ = write_response(&mut writer, &handler.reject(413, &msg), false);
                return;
            }
        };
        let keep_alive = req.keep_alive();
        match handler.handle(req) {
            Reply::Full(resp) => {
                if write_response(&mut writer, &resp, keep_alive).is_err() || !keep_alive {
                    return;
                }
            }
            Reply::Fault(fault) => {
                misbehave(&mut writer, reader.get_mut(), &fault);
                return;
            }
            Reply::Stream(stream) => {
                if write_stream_head(&mut writer, stream.status, &stream.headers, keep_alive)
                    .is_err()
                {
                    return;
                }
                let mut chunks = ChunkedWriter::new(&mut writer);
                let ok = (stream.body)(&mut chunks).is_ok() && chunks.finish().is_ok();
                if !ok || !keep_alive {
                    return;
                }
            }
        }
    }
}

/// Carries out a [`Misbehave`] on a connection; the caller closes it afterwards.
fn misbehave<W: Write>(w: &mut W, peer: &mut TcpStream, fault: &Misbehave) {
    match fault {
        Misbehave::Close => {}
        Misbehave::Hang(hold) => hold_silent(peer, *hold),
        Misbehave::HeadThenHang {
            status,
            headers,
            hold,
        } => {
            if write_stream_head(w, *status, headers, false).is_ok() {
                hold_silent(peer, *hold);
            }
        }
        Misbehave::Truncate { resp, keep } => {
            let _ = write_truncated(w, resp, *keep);
        }
    }
}

/// Sends nothing for `hold`, returning early when the peer closes the connection (anything
/// it sends meanwhile is discarded), so a held connection never outlives its client.
fn hold_silent(peer: &mut TcpStream, hold: Duration) {
    let deadline = std::time::Instant::now() + hold;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        // A zero read timeout means "block forever" to std: never pass one.
        let _ = peer.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match peer.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Writes `resp` announcing its full `Content-Length` but only the first `keep` bytes of
/// its body (`Connection: close`).
pub fn write_truncated<W: Write>(w: &mut W, resp: &Response, keep: usize) -> io::Result<()> {
    let mut out = status_line(resp.status);
    for (name, value) in &resp.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n", resp.body.len()));
    out.push_str("connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&resp.body[..keep.min(resp.body.len())]);
    w.write_all(&bytes)?;
    w.flush()
}

/// Serializes a full response with `Content-Length` in a single write.
pub fn write_response<W: Write>(w: &mut W, resp: &Response, keep_alive: bool) -> io::Result<()> {
    let mut out = status_line(resp.status);
    for (name, value) in &resp.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n", resp.body.len()));
    out.push_str(if keep_alive {
        "connection: keep-alive\r\n\r\n"
    } else {
        "connection: close\r\n\r\n"
    });
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&resp.body);
    w.write_all(&bytes)?;
    w.flush()
}

fn write_stream_head<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    keep_alive: bool,
) -> io::Result<()> {
    let mut out = status_line(status);
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("transfer-encoding: chunked\r\n");
    out.push_str(if keep_alive {
        "connection: keep-alive\r\n\r\n"
    } else {
        "connection: close\r\n\r\n"
    });
    w.write_all(out.as_bytes())?;
    w.flush()
}

fn status_line(status: u16) -> String {
    format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status))
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Unknown",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &[u8]) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut reader = Cursor::new(raw.to_vec());
        let mut interim = Vec::new();
        (read_request(&mut reader, &mut interim), interim)
    }

    #[test]
    fn parses_content_length_body_and_headers() {
        let (req, interim) = parse(
            b"POST /v1/agents?beta=true HTTP/1.1\r\nHost: x\r\nX-Api-Key:  k1 \r\nContent-Length: 5\r\n\r\nhello",
        );
        let req = req.unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/agents");
        assert_eq!(req.target, "/v1/agents?beta=true");
        assert_eq!(req.query.get("beta"), Some("true"));
        assert_eq!(req.header("x-api-key"), Some("k1"));
        assert_eq!(req.body, b"hello");
        assert!(req.keep_alive());
        assert!(interim.is_empty());
    }

    #[test]
    fn parses_chunked_body_with_extensions_and_trailers() {
        let (req, _) = parse(
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        );
        assert_eq!(req.unwrap().body, b"hello world");
    }

    #[test]
    fn two_pipelined_requests_on_one_connection() {
        let raw = b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        let mut reader = Cursor::new(raw.to_vec());
        let mut sink = Vec::new();
        let first = read_request(&mut reader, &mut sink).unwrap();
        let second = read_request(&mut reader, &mut sink).unwrap();
        assert_eq!(first.path, "/a");
        assert!(first.keep_alive());
        assert_eq!(second.body, b"ok");
        assert!(!second.keep_alive());
        assert!(matches!(
            read_request(&mut reader, &mut sink),
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn http10_closes_by_default() {
        let (req, _) = parse(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!req.unwrap().keep_alive());
        let (req, _) = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(req.unwrap().keep_alive());
    }

    #[test]
    fn expect_continue_gets_interim_response() {
        let (req, interim) =
            parse(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nz");
        assert_eq!(req.unwrap().body, b"z");
        assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn rejects_malformed_and_oversized() {
        assert!(matches!(
            parse(b"GET /\r\n\r\n").0,
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nno colon\r\n\r\n").0,
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort").0,
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").0,
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").0,
            Err(ReadError::TooLarge(_))
        ));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES));
        huge.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse(&huge).0, Err(ReadError::TooLarge(_))));
    }

    #[test]
    fn truncated_responses_announce_the_full_length() {
        let resp = Response {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"id":"agent_1"}"#.to_vec(),
        };
        let mut out = Vec::new();
        write_truncated(&mut out, &resp, 6).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\nconnection: close\r\n\r\n{\"id\":"
        );
        let mut out = Vec::new();
        write_truncated(&mut out, &resp, 99).unwrap();
        assert!(out.ends_with(br#"{"id":"agent_1"}"#));
    }

    #[test]
    fn held_connections_end_when_the_peer_leaves_or_the_hold_expires() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let conn = TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(conn);
        });
        let (mut peer, _) = listener.accept().unwrap();
        let began = std::time::Instant::now();
        hold_silent(&mut peer, Duration::from_secs(30));
        assert!(began.elapsed() < Duration::from_secs(10));
        client.join().unwrap();

        let _conn = TcpStream::connect(addr).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let began = std::time::Instant::now();
        hold_silent(&mut peer, Duration::from_millis(100));
        assert!(began.elapsed() >= Duration::from_millis(100));
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

    #[test]
    fn writes_full_and_chunked_responses() {
        let mut out = Vec::new();
        let resp = Response {
            status: 404,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{}".to_vec(),
        };
        write_response(&mut out, &resp, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n{}"
        );
        let mut out = Vec::new();
        let mut chunks = ChunkedWriter::new(&mut out);
        chunks.send(b"event: x\n\n").unwrap();
        chunks.send(b"").unwrap();
        chunks.finish().unwrap();
        assert_eq!(out, b"a\r\nevent: x\n\n\r\n0\r\n\r\n");

        let big = vec![b'z'; COALESCE_MAX + 1];
        let mut out = Vec::new();
        ChunkedWriter::new(&mut out).send(&big).unwrap();
        let mut expected = format!("{:x}\r\n", big.len()).into_bytes();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(out, expected);
    }
}
