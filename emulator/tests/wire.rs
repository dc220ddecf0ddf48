//! The emulator on the wire, driven as a process: HTTP/2 over TLS (ALPN) and h2c, response
//! compression per `accept-encoding`, gzip event streams decodable as they arrive, chunked
//! and HTTP/2 request trailers, compressed request bodies, and request heads recorded before
//! their bodies. Loopback only, kernel-chosen ports, every wait bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

const KEY: &str = "wire-test-key";
const LIMIT: Duration = Duration::from_secs(15);

struct Emu {
    child: Child,
    addr: String,
    pem: Option<PathBuf>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(tls: bool, extra: &[&str]) -> Emu {
    let dir = std::env::temp_dir().join(format!(
        "ma-emulator-wire-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = dir.join("ca.pem");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ma-emulator"));
    cmd.args(["--listen", "127.0.0.1:0", "--api-key", KEY, "--seed", "7"])
        .args(extra)
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if tls {
        cmd.arg("--tls-cert-out").arg(&pem);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.strip_prefix("LISTENING ").unwrap().trim().to_string();
    if tls {
        assert!(std::fs::read_to_string(&pem)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
    }
    Emu {
        child,
        addr,
        pem: tls.then_some(pem),
        _dir: TempDir(dir),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A TLS connection to `emu` offering `alpn`; returns the stream and the negotiated protocol.
async fn tls_connect(
    emu: &Emu,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<Vec<u8>>,
) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(emu.pem.as_ref().unwrap()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(&emu.addr).await.unwrap();
    let name = ServerName::try_from("ma-emulator.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (tls, alpn)
}

fn api_request(method: &str, uri: &str) -> hyper::http::request::Builder {
    hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "managed-agents-2026-04-01")
}

async fn collect<B: Body<Data = Bytes>>(body: B) -> Vec<u8>
where
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes().to_vec()
}

/// One HTTP/1.1 request over a fresh plaintext connection; returns (status, headers, body).
async fn h1(emu: &Emu, req: hyper::Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(&emu.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, collect(resp.into_body()).await)
}

fn requests_log(emu: &Emu) -> Vec<Value> {
    // Plain HTTP/1.1 by hand (the log is asked for without accept-encoding: identity).
    let mut s = TcpStream::connect(&emu.addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET /_emulator/requests HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let v: Value = serde_json::from_str(body).unwrap();
    v["requests"].as_array().unwrap().clone()
}

#[test]
fn h2_over_tls_with_alpn_and_http1_when_only_that_is_offered() {
    let emu = start(true, &[]);
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let (tls, alpn) = tls_connect(&emu, &[b"h2", b"http/1.1"]).await;
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = api_request("GET", "https://ma-emulator.test/v1/agents")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            assert_eq!(resp.status(), 200);
            let body: Value = serde_json::from_slice(&collect(resp.into_body()).await).unwrap();
            assert_eq!(body["data"], json!([]));

            let (tls, alpn) = tls_connect(&emu, &[b"http/1.1"]).await;
            assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = api_request("GET", "/v1/agents")
                .header("host", "ma-emulator.test")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_11);
            assert_eq!(resp.status(), 200);
        })
        .await
        .unwrap();
    });
    let log = rt().block_on(requests_log_tls(&emu));
    let protocols: Vec<&str> = log
        .iter()
        .map(|r| r["protocol"].as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["HTTP/2", "HTTP/1.1"]);
    assert!(log[0]["headers"]
        .as_array()
        .unwrap()
        .contains(&json!([":authority", "ma-emulator.test"])));
}

#[test]
fn h2c_prior_knowledge_in_plaintext() {
    let emu = start(false, &[]);
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let tcp = tokio::net::TcpStream::connect(&emu.addr).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get(format!("http://{}/_emulator/health", emu.addr))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            assert_eq!(collect(resp.into_body()).await, br#"{"ok":true}"#);
        })
        .await
        .unwrap();
    });
}

fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(data)
            .unwrap()
            .read_to_end(&mut out),
        other => panic!("coding {other}"),
    }
    .unwrap();
    out
}

#[test]
fn json_coding_follows_accept_encoding_and_identity_when_not_offered() {
    let emu = start(false, &[]);
    let cases = [
        (Some("gzip, deflate, br, zstd"), Some("br")),
        (Some("gzip, deflate"), Some("gzip")),
        (Some("zstd, deflate"), Some("zstd")),
        (Some("deflate"), Some("deflate")),
        (Some("br;q=0.2, gzip;q=0.8"), Some("gzip")),
        (Some("identity"), None),
        (Some("*;q=0"), None),
        (None, None),
    ];
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            for (accept, expected) in cases {
                let mut req = api_request("GET", "/v1/agents?limit=3").header("host", "x");
                if let Some(a) = accept {
                    req = req.header("accept-encoding", a);
                }
                let (status, headers, body) = h1(&emu, req.body(Full::default()).unwrap()).await;
                assert_eq!(status, 200);
                let coding = headers
                    .get("content-encoding")
                    .map(|v| v.to_str().unwrap().to_string());
                assert_eq!(coding.as_deref(), expected, "{accept:?}");
                let plain = match expected {
                    Some(c) => {
                        assert_eq!(headers["vary"], "accept-encoding");
                        decode(c, &body)
                    }
                    None => body,
                };
                let v: Value = serde_json::from_slice(&plain).unwrap();
                assert_eq!(v["data"], json!([]), "{accept:?}");
            }
        })
        .await
        .unwrap();
    });
}

#[test]
fn compression_off_never_compresses() {
    let emu = start(false, &["--compression", "off", "--chunking", "plain"]);
    rt().block_on(async {
        let req = api_request("GET", "/v1/agents")
            .header("host", "x")
            .header("accept-encoding", "br, gzip")
            .body(Full::default())
            .unwrap();
        let (status, headers, body) = h1(&emu, req).await;
        assert_eq!(status, 200);
        assert!(headers.get("content-encoding").is_none());
        assert_eq!(headers["content-length"], body.len().to_string().as_str());
    });
}

async fn create(emu: &Emu, path: &str, body: Value) -> Value {
    let req = api_request("POST", path)
        .header("host", "x")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (status, _, body) = h1(emu, req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn gzip_event_stream_decodes_event_by_event_as_it_arrives() {
    // Heartbeats every 30 ms: each is an SSE frame the client must be able to read at once.
    let emu = start(true, &["--heartbeat-ms", "30"]);
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let (tls, _) = tls_connect(&emu, &[b"h2"]).await;
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut post = |path: &str, body: Value| {
                let req = api_request("POST", &format!("https://ma-emulator.test{path}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                send.send_request(req)
            };
            let agent: Value = serde_json::from_slice(
                &collect(post("/v1/agents", json!({"name": "a", "model": "m"})).await.unwrap().into_body()).await,
            )
            .unwrap();
            let env: Value = serde_json::from_slice(
                &collect(
                    post(
                        "/v1/environments",
                        json!({"name": "e", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}}),
                    )
                    .await
                    .unwrap()
                    .into_body(),
                )
                .await,
            )
            .unwrap();
            let session: Value = serde_json::from_slice(
                &collect(
                    post(
                        "/v1/sessions",
                        json!({"agent": agent["id"], "environment_id": env["id"]}),
                    )
                    .await
                    .unwrap()
                    .into_body(),
                )
                .await,
            )
            .unwrap();
            let sid = session["id"].as_str().unwrap();
            let req = api_request(
                "GET",
                &format!("https://ma-emulator.test/v1/sessions/{sid}/events/stream"),
            )
            .header("accept-encoding", "gzip, br")
            .body(Full::default())
            .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-encoding"], "gzip");
            let mut body = resp.into_body();
            let mut decoder = flate2::write::GzDecoder::new(Vec::new());
            let mut whole_at_arrival = 0;
            let mut frames = 0;
            let mut seen = 0;
            let began = Instant::now();
            while whole_at_arrival < 5 {
                assert!(began.elapsed() < Duration::from_secs(10), "too slow");
                let frame = body.frame().await.unwrap().unwrap();
                let Ok(data) = frame.into_data() else { continue };
                frames += 1;
                decoder.write_all(&data).unwrap();
                decoder.flush().unwrap();
                let text = String::from_utf8_lossy(decoder.get_ref()).into_owned();
                // What arrived so far decodes to whole heartbeats, nothing held back.
                let count = text.matches(": ping\n\n").count();
                if text.ends_with(": ping\n\n") && count > seen {
                    whole_at_arrival += 1;
                }
                seen = count;
            }
            assert!(frames >= 5);
            let text = String::from_utf8(decoder.get_ref().clone()).unwrap();
            assert!(text.matches(": ping\n\n").count() >= 5, "{text:?}");
        })
        .await
        .unwrap();
    });
}

#[test]
fn chunked_request_with_extensions_and_trailers() {
    let emu = start(false, &["--compression", "off"]);
    let body = r#"{"name":"chunky","model":"claude-sonnet-4-6"}"#;
    let (a, b) = body.split_at(10);
    let mut s = TcpStream::connect(&emu.addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "POST /v1/agents HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\nanthropic-version: 2023-06-01\r\n\
         anthropic-beta: managed-agents-2026-04-01\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\ntrailer: x-checksum\r\nconnection: close\r\n\r\n\
         {:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nx-checksum: abc\r\n\r\n",
        a.len(),
        b.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"name\":\"chunky\""), "{out}");
    let log = requests_log(&emu);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["body_complete"], true);
    assert_eq!(log[0]["body_bytes"], body.len());
    assert_eq!(log[0]["trailers"], json!(["x-checksum"]));
    assert_eq!(log[0]["protocol"], "HTTP/1.1");
}

/// A request body of one DATA frame and then trailers.
struct WithTrailers(Option<Bytes>, Option<hyper::HeaderMap>);

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.1.take().map(|t| Ok(Frame::trailers(t))))
    }
}

#[test]
fn h2_request_with_trailers_and_a_gzip_body() {
    let emu = start(true, &[]);
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let (tls, _) = tls_connect(&emu, &[b"h2"]).await;
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("x-digest", "d".parse().unwrap());
            let json = br#"{"name":"squeezed","model":"claude-sonnet-4-6"}"#;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(json).unwrap();
            let gz = gz.finish().unwrap();
            let wire_len = gz.len();
            let req = api_request("POST", "https://ma-emulator.test/v1/agents")
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(WithTrailers(Some(Bytes::from(gz)), Some(trailers)))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let agent: Value = serde_json::from_slice(&collect(resp.into_body()).await).unwrap();
            assert_eq!(agent["name"], "squeezed", "the gzip body was decoded");
            let log = requests_log_tls(&emu).await;
            assert_eq!(log.len(), 1);
            assert_eq!(log[0]["protocol"], "HTTP/2");
            assert_eq!(log[0]["trailers"], json!(["x-digest"]));
            assert_eq!(log[0]["content_encoding"], "gzip");
            assert_eq!(log[0]["body_complete"], true);
            assert_eq!(log[0]["body_bytes"], wire_len);
        })
        .await
        .unwrap();
    });
}

async fn requests_log_tls(emu: &Emu) -> Vec<Value> {
    let (tls, _) = tls_connect(emu, &[b"http/1.1"]).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/_emulator/requests")
        .header("host", "ma-emulator.test")
        .header("accept-encoding", "identity")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let v: Value = serde_json::from_slice(&collect(resp.into_body()).await).unwrap();
    v["requests"].as_array().unwrap().clone()
}

#[test]
fn heads_are_recorded_before_their_bodies_complete() {
    let emu = start(false, &[]);
    let mut s = TcpStream::connect(&emu.addr).unwrap();
    write!(
        s,
        "POST /v1/agents HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\ncontent-length: 100\r\n\r\n{{\"name\":"
    )
    .unwrap();
    s.flush().unwrap();
    let deadline = Instant::now() + LIMIT;
    let entry = loop {
        let log = requests_log(&emu);
        if let Some(e) = log.into_iter().next() {
            break e;
        }
        assert!(Instant::now() < deadline, "the head was never recorded");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(entry["method"], "POST");
    assert_eq!(entry["path"], "/v1/agents");
    assert_eq!(entry["body_complete"], false);
    // The client gives up: the entry stays incomplete.
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    let log = requests_log(&emu);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["body_complete"], false);
    assert_eq!(log[0]["body_bytes"], 8);
}

#[test]
fn awkward_chunking_splits_json_bodies_but_keeps_them_whole() {
    let emu = start(false, &["--compression", "off"]);
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            for i in 0..5 {
                let agent = create(
                    &emu,
                    "/v1/agents",
                    json!({"name": format!("é-{i}-✓"), "model": "claude-sonnet-4-6"}),
                )
                .await;
                assert_eq!(agent["name"], format!("é-{i}-✓"));
            }
        })
        .await
        .unwrap();
    });
}
