//! The wire: hyper 1.x on tokio, HTTP/1.1 and HTTP/2 on one port (h2c prior knowledge in
//! plaintext; ALPN `h2`/`http/1.1` under TLS), adversarial by default like the real API:
//!
//! - responses compressed per `accept-encoding` ([`crate::encoding`]), event streams with a
//!   sync flush after every event;
//! - awkward chunking: frames split at seeded pseudo-random byte positions across writes
//!   (HTTP/1.1 chunks, HTTP/2 DATA frames), sometimes two events coalesced in one write;
//!   complete bodies sent in a few pieces;
//! - every request head reported to the [`Handler`] before its body is read, the body
//!   reported when it stops being read (its end, a limit, or the peer leaving).
//!
//! Handlers are synchronous: each runs on a blocking thread; a streamed body is fed through
//! a bounded channel into the hyper body, and every frame is delivered as it is produced.
//! [`Misbehave`] faults: `Close` drops the connection (HTTP/2: resets the stream), `Hang`
//! answers nothing, `HeadThenHang` sends a head and no body, `Truncate` stops short of the
//! announced `content-length` and aborts; held requests end when the peer goes away.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::mpsc;

use crate::encoding::{self, Coding, StreamEncoder};
use crate::http::{
    BodyReport, FrameSink, Handler, Misbehave, Reply, Request, Response, StreamReply,
    MAX_BODY_BYTES,
};

/// A peer that stops reading a stream is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request body that makes no progress for this long is abandoned.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames of a stream queued between its handler thread and the connection.
const STREAM_QUEUE: usize = 8;

/// Set by `POST /_emulator/compression {"mode": "always"}`: from now on every response is gzip
/// whatever the client offers, as with `--compression always` (an upstream that changed its
/// behaviour under a running gateway); `{"mode": "configured"}` goes back to the flag.
pub static FORCE_GZIP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Response compression (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Per `accept-encoding`, like the real API.
    Auto,
    /// Never compress.
    Off,
    /// gzip whatever the client offers, even `identity`: an upstream (or a middlebox) that
    /// ignores `accept-encoding`, for tests of what a gateway does with bytes it cannot read.
    Always,
}

/// How bodies are cut into writes (`--chunking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Seeded random split points, coalesced events, complete bodies in pieces.
    Awkward,
    /// One write per event, one per complete body.
    Plain,
}

/// Wire behaviour of the server.
#[derive(Clone)]
pub struct Options {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub compression: Compression,
    pub chunking: Chunking,
    pub seed: u64,
}

/// A small deterministic generator (splitmix64) for split points.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
        usize::try_from(self.next_u64() % n64).unwrap_or(0)
    }
}

/// Cuts `data` into 1..=`max_pieces` pieces at random positions (never empty pieces).
pub fn split(rng: &mut Rng, data: Bytes, max_pieces: usize) -> Vec<Bytes> {
    if data.len() < 2 || max_pieces < 2 {
        return vec![data];
    }
    let pieces = 1 + rng.below(max_pieces.min(data.len()));
    let mut cuts: Vec<usize> = (1..pieces).map(|_| 1 + rng.below(data.len() - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut rest = data;
    let mut taken = 0;
    for cut in cuts {
        out.push(rest.split_to(cut - taken));
        taken = cut;
    }
    out.push(rest);
    out
}

/// Accepts connections forever on `listener`.
pub fn serve<H: Handler>(
    listener: std::net::TcpListener,
    handler: Arc<H>,
    opts: Options,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Every open event stream holds a blocking thread (its handler pumps frames).
        .max_blocking_threads(16_384)
        .thread_name("ma-emulator")
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let counter = Arc::new(AtomicU64::new(0));
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("ma-emulator: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let ctx = Arc::new(Ctx {
                handler: Arc::clone(&handler),
                opts: opts.clone(),
                counter: Arc::clone(&counter),
            });
            tokio::spawn(connection(tcp, ctx));
        }
    })
}

struct Ctx<H> {
    handler: Arc<H>,
    opts: Options,
    /// Numbers responses, so each gets its own split points (`seed` ^ number).
    counter: Arc<AtomicU64>,
}

impl<H> Ctx<H> {
    fn rng(&self) -> Option<Rng> {
        (self.opts.chunking == Chunking::Awkward).then(|| {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let mut r = Rng::new(self.opts.seed ^ n.wrapping_mul(0xA076_1D64_78BD_642F));
            r.next_u64();
            r
        })
    }
}

async fn connection<H: Handler>(tcp: tokio::net::TcpStream, ctx: Arc<Ctx<H>>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024);
    let service = {
        let ctx = Arc::clone(&ctx);
        service_fn(move |req| {
            let ctx = Arc::clone(&ctx);
            async move { respond(req, ctx).await }
        })
    };
    let result = match &ctx.opts.tls {
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                _ => return,
            }
        }
        None => builder.serve_connection(TokioIo::new(tcp), service).await,
    };
    // Connection errors (peers leaving, injected faults) are routine here.
    drop(result);
}

fn protocol(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// The error a service returns to drop the connection (HTTP/1.1) or reset the stream (h2).
fn drop_it(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string())
}

async fn respond<H: Handler>(
    req: hyper::Request<Incoming>,
    ctx: Arc<Ctx<H>>,
) -> Result<hyper::Response<WireBody>, io::Error> {
    let (parts, body) = req.into_parts();
    let proto = protocol(parts.version);
    let mut headers = Vec::with_capacity(parts.headers.len() + 1);
    if proto == "HTTP/2" {
        if let Some(authority) = parts.uri.authority() {
            headers.push((":authority".to_string(), authority.to_string()));
        }
    }
    for (name, value) in &parts.headers {
        headers.push((
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).trim().to_string(),
        ));
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string());
    let target = if parts.version != hyper::Version::HTTP_2 && parts.uri.scheme().is_some() {
        // An absolute-form request target, as received.
        parts.uri.to_string()
    } else {
        target
    };
    let mut request = Request::new(parts.method.as_str(), &target, headers, proto);
    let token = ctx.handler.arrived(&request);
    let accept = encoding::parse_accept(request.header_values("accept-encoding"));
    let path = request.path.clone();

    // The body, up to its end or the limit.
    let mut report = BodyReport::default();
    let announced = request
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    let mut refused = None;
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        refused = Some((
            413,
            format!("request body exceeds the {MAX_BODY_BYTES} byte limit"),
        ));
    } else {
        let mut body = body;
        let mut raw = Vec::new();
        loop {
            let frame = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(None) => {
                    report.complete = true;
                    break;
                }
                Ok(Some(Err(_))) | Err(_) => {
                    report.bytes = raw.len();
                    if let Some(t) = token {
                        ctx.handler.body_read(t, &report);
                    }
                    return Err(drop_it("request body not received"));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    raw.extend_from_slice(&data);
                    if raw.len() > MAX_BODY_BYTES {
                        refused = Some((
                            413,
                            format!("request body exceeds the {MAX_BODY_BYTES} byte limit"),
                        ));
                        break;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        report
                            .trailers
                            .extend(trailers.keys().map(|k| k.as_str().to_string()));
                    }
                }
            }
        }
        report.bytes = raw.len();
        if refused.is_none() {
            match encoding::decode_request(
                request.header_values("content-encoding"),
                raw,
                MAX_BODY_BYTES,
            ) {
                Ok(decoded) => request.body = decoded,
                Err(encoding::DecodeError::TooLarge) => {
                    refused = Some((
                        413,
                        format!("decoded request body exceeds the {MAX_BODY_BYTES} byte limit"),
                    ));
                }
                Err(encoding::DecodeError::Unsupported(c)) => {
                    refused = Some((415, format!("unsupported content-encoding: {c}")));
                }
                Err(encoding::DecodeError::Corrupt(e)) => {
                    refused = Some((400, format!("could not decode the request body: {e}")));
                }
            }
        }
    }
    if let Some(t) = token {
        ctx.handler.body_read(t, &report);
    }

    let reply = match refused {
        Some((status, message)) => Reply::Full(ctx.handler.reject(status, &message)),
        None => {
            let handler = Arc::clone(&ctx.handler);
            match tokio::task::spawn_blocking(move || handler.handle(request)).await {
                Ok(reply) => reply,
                Err(_) => return Err(drop_it("handler failed")),
            }
        }
    };
    let compress = ctx.opts.compression == Compression::Auto;
    // The private test endpoints stay readable for the tests that flip this.
    let private = path.starts_with("/_emulator");
    let forced = ctx.opts.compression == Compression::Always
        || (FORCE_GZIP.load(std::sync::atomic::Ordering::Relaxed) && !private);
    match reply {
        Reply::Full(resp) => {
            let coding = if forced && !resp.body.is_empty() {
                Coding::Gzip
            } else if compress && !resp.body.is_empty() {
                encoding::choose(&accept, encoding::FULL_PREFERENCE)
            } else {
                Coding::Identity
            };
            full(resp, coding, ctx.rng(), None)
        }
        Reply::Stream(stream) => {
            let coding = if forced {
                Coding::Gzip
            } else if compress {
                encoding::choose(&accept, encoding::STREAM_PREFERENCE)
            } else {
                Coding::Identity
            };
            Ok(streamed(stream, coding, ctx.rng()))
        }
        Reply::Fault(Misbehave::Close) => Err(drop_it("injected fault: reset")),
        Reply::Fault(Misbehave::Hang(hold)) => {
            // Dropped by hyper when the peer goes away (HTTP/1.1 EOF, h2 RST_STREAM).
            tokio::time::sleep(hold).await;
            Err(drop_it("injected fault: hang"))
        }
        Reply::Fault(Misbehave::HeadThenHang {
            status,
            headers,
            hold,
        }) => {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(hold) => {
                        let _ = tx.send(Err(drop_it("injected fault: hang_headers"))).await;
                    }
                    () = tx.closed() => {}
                }
            });
            head(status, &headers, WireBody::new(rx, None, None))
        }
        Reply::Fault(Misbehave::Truncate { resp, keep }) => {
            let coding = if compress {
                encoding::choose(&accept, encoding::FULL_PREFERENCE)
            } else {
                Coding::Identity
            };
            full(resp, coding, None, Some(keep))
        }
    }
}

fn head(
    status: u16,
    headers: &[(String, String)],
    body: WireBody,
) -> Result<hyper::Response<WireBody>, io::Error> {
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).map_err(|_| drop_it("invalid status"))?;
    let map = resp.headers_mut();
    for (name, value) in headers {
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            continue;
        };
        map.append(n, v);
    }
    Ok(resp)
}

fn encoded_head(
    status: u16,
    headers: &[(String, String)],
    coding: Coding,
    body: WireBody,
) -> Result<hyper::Response<WireBody>, io::Error> {
    let mut resp = head(status, headers, body)?;
    if coding != Coding::Identity {
        let map = resp.headers_mut();
        map.insert(
            hyper::header::CONTENT_ENCODING,
            HeaderValue::from_static(coding.token()),
        );
        map.append(
            hyper::header::VARY,
            HeaderValue::from_static("accept-encoding"),
        );
    }
    Ok(resp)
}

/// A complete response (compressed with `coding`, in pieces when `rng`); with `truncate`,
/// only the first half of the (encoded) body is sent under the full length, then an abort.
fn full(
    resp: Response,
    coding: Coding,
    rng: Option<Rng>,
    truncate: Option<usize>,
) -> Result<hyper::Response<WireBody>, io::Error> {
    let (coding, body) = match encoding::compress(coding, &resp.body) {
        Ok(z) => (coding, z),
        Err(_) => (Coding::Identity, resp.body),
    };
    let len = body.len();
    let mut body = Bytes::from(body);
    let mut pieces = Vec::new();
    let mut tail_error = false;
    if let Some(keep) = truncate {
        // `keep` counts plain bytes: cut the encoded body in the same proportion.
        let plain = resp_len_or(len, keep, coding);
        body.truncate(plain);
        tail_error = true;
    }
    let mut rng = rng;
    match rng.as_mut() {
        Some(r) if !body.is_empty() => pieces.extend(split(r, body, 4)),
        _ if !body.is_empty() => pieces.push(body),
        _ => {}
    }
    let (tx, rx) = mpsc::channel(pieces.len() + 1);
    for p in pieces {
        let _ = tx.try_send(Ok(p));
    }
    if tail_error {
        let _ = tx.try_send(Err(drop_it("injected fault: truncated")));
    }
    drop(tx);
    let size = u64::try_from(len).ok();
    encoded_head(
        resp.status,
        &resp.headers,
        coding,
        WireBody::new(rx, size, None),
    )
}

/// Identity bodies are cut at `keep`; encoded ones at half their length (the fault's `keep`
/// is half the plain body).
fn resp_len_or(len: usize, keep: usize, coding: Coding) -> usize {
    if coding == Coding::Identity {
        keep.min(len)
    } else {
        len / 2
    }
}

/// A streamed response: the handler's body runs on a blocking thread and feeds the channel.
fn streamed(stream: StreamReply, coding: Coding, rng: Option<Rng>) -> hyper::Response<WireBody> {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let rt = tokio::runtime::Handle::current();
    let StreamReply {
        status,
        headers,
        body,
    } = stream;
    let coalesce = rng.as_ref().map(|r| Rng::new(r.0 ^ 0x5EED));
    let producer_rng = rng;
    tokio::task::spawn_blocking(move || {
        let mut sink = ChannelSink {
            tx,
            rt,
            enc: StreamEncoder::new(coding),
            rng: producer_rng,
        };
        match body(&mut sink) {
            Ok(()) => {
                if let Some(mut enc) = sink.enc.take() {
                    if let Ok(tail) = enc.finish() {
                        let _ = sink.push(Bytes::from(tail));
                    }
                }
            }
            Err(e) => {
                let _ = sink.rt.block_on(sink.tx.send(Err(e)));
            }
        }
    });
    let coding = if StreamEncoder::new(coding).is_some() {
        coding
    } else {
        Coding::Identity
    };
    encoded_head(status, &headers, coding, WireBody::new(rx, None, coalesce))
        .unwrap_or_else(|_| hyper::Response::new(WireBody::new(mpsc::channel(1).1, None, None)))
}

/// The blocking side of a streamed body.
struct ChannelSink {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    rt: tokio::runtime::Handle,
    enc: Option<StreamEncoder>,
    rng: Option<Rng>,
}

impl ChannelSink {
    fn push(&self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self
            .rt
            .block_on(tokio::time::timeout(WRITE_TIMEOUT, self.tx.send(Ok(data))))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone")),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            )),
        }
    }
}

impl FrameSink for ChannelSink {
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let bytes = match self.enc.as_mut() {
            Some(enc) => Bytes::from(enc.frame(data)?),
            None => Bytes::copy_from_slice(data),
        };
        // Half the frames go out whole, the others in up to 4 pieces.
        let pieces = match self.rng.as_mut() {
            Some(r) => {
                if r.below(2) == 1 {
                    split(r, bytes, 4)
                } else {
                    vec![bytes]
                }
            }
            None => vec![bytes],
        };
        for piece in pieces {
            self.push(piece)?;
        }
        Ok(())
    }
}

/// A response body fed by a channel. After each data frame it yields once, so the
/// connection writes (flushes) every piece on its own; with `coalesce`, it sometimes joins
/// the next piece when that one is already queued (two events in one write).
pub struct WireBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    size: Option<u64>,
    coalesce: Option<Rng>,
    yield_next: bool,
    /// An item taken off the channel early (by coalescing) but not joined.
    held: Option<Result<Bytes, io::Error>>,
}

impl WireBody {
    fn new(
        rx: mpsc::Receiver<Result<Bytes, io::Error>>,
        size: Option<u64>,
        coalesce: Option<Rng>,
    ) -> Self {
        Self {
            rx,
            size,
            coalesce,
            yield_next: false,
            held: None,
        }
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.yield_next {
            this.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let next = match this.held.take() {
            Some(item) => Poll::Ready(Some(item)),
            None => this.rx.poll_recv(cx),
        };
        match next {
            Poll::Ready(Some(Ok(mut data))) => {
                if let Some(r) = this.coalesce.as_mut() {
                    if r.below(4) == 0 {
                        match this.rx.try_recv() {
                            Ok(Ok(more)) => {
                                let mut joined = Vec::with_capacity(data.len() + more.len());
                                joined.extend_from_slice(&data);
                                joined.extend_from_slice(&more);
                                data = Bytes::from(joined);
                            }
                            Ok(Err(e)) => this.held = Some(Err(e)),
                            Err(_) => {}
                        }
                    }
                }
                this.yield_next = true;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
