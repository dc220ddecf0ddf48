//! Content codings, as api.anthropic.com uses them: responses compressed per the client's
//! `accept-encoding` (q-values honoured), event streams compressed with a sync flush after
//! every event (each one decodable on arrival), and request bodies decoded from their
//! `content-encoding` (a gateway that forwards a compressed body without reading it is
//! caught when it acts on it).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// A content coding the emulator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Br,
    Zstd,
}

/// Preference for complete (JSON) responses.
pub const FULL_PREFERENCE: &[Coding] = &[Coding::Br, Coding::Gzip, Coding::Zstd, Coding::Deflate];
/// Preference for event streams (codings with a cheap per-event flush).
pub const STREAM_PREFERENCE: &[Coding] = &[Coding::Gzip, Coding::Br, Coding::Deflate];

impl Coding {
    pub fn token(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Br => "br",
            Self::Zstd => "zstd",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        Some(match token {
            "identity" => Self::Identity,
            "gzip" | "x-gzip" => Self::Gzip,
            "deflate" => Self::Deflate,
            "br" => Self::Br,
            "zstd" => Self::Zstd,
            _ => return None,
        })
    }
}

/// Parses `accept-encoding` values into `(token, q)` pairs (tokens lowercase; a missing or
/// malformed q counts as 1, q is clamped to 0..=1).
pub fn parse_accept<'a>(values: impl Iterator<Item = &'a str>) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    for item in values.flat_map(|v| v.split(',')) {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if token.is_empty() {
            continue;
        }
        let mut q = 1.0f32;
        for param in parts {
            if let Some((k, v)) = param.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.trim().parse::<f32>().unwrap_or(1.0).clamp(0.0, 1.0);
                }
            }
        }
        out.push((token, q));
    }
    out
}

/// The coding to answer with: among `preference`, the acceptable one with the highest q
/// (ties: the earlier in `preference`); [`Coding::Identity`] when none is acceptable.
/// A coding is acceptable when listed with q > 0, or covered by `*` with q > 0 and not listed.
pub fn choose(accept: &[(String, f32)], preference: &[Coding]) -> Coding {
    let star = accept.iter().find(|(t, _)| t == "*").map(|(_, q)| *q);
    let mut best: Option<(Coding, f32)> = None;
    for &coding in preference {
        let listed = accept
            .iter()
            .filter(|(t, _)| Coding::parse(t) == Some(coding))
            .map(|(_, q)| *q)
            .fold(None, |acc: Option<f32>, q| {
                Some(acc.map_or(q, |a| a.max(q)))
            });
        let q = listed.or(star).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, bq)| q > bq) {
            best = Some((coding, q));
        }
    }
    best.map_or(Coding::Identity, |(c, _)| c)
}

/// Compresses a complete body.
pub fn compress(coding: Coding, data: &[u8]) -> io::Result<Vec<u8>> {
    match coding {
        Coding::Identity => Ok(data.to_vec()),
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data)?;
            e.finish()
        }
        Coding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data)?;
            e.finish()
        }
        Coding::Br => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 4, 22);
                w.write_all(data)?;
                w.flush()?;
            }
            Ok(out)
        }
        Coding::Zstd => zstd::bulk::compress(data, 3),
    }
}

/// A `Write` whose bytes are taken out from elsewhere (the encoders own their writer).
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Enc {
    Gzip(flate2::write::GzEncoder<Shared>),
    Deflate(flate2::write::ZlibEncoder<Shared>),
    Br(Box<brotli::CompressorWriter<Shared>>),
}

/// Compresses a stream frame by frame: the output of [`StreamEncoder::frame`] completes a
/// sync flush, so everything sent so far decodes on arrival.
pub struct StreamEncoder {
    enc: Option<Enc>,
    out: Shared,
}

impl StreamEncoder {
    /// `None` for codings without a streaming encoder here (identity, zstd).
    pub fn new(coding: Coding) -> Option<Self> {
        let out = Shared::default();
        let enc = match coding {
            Coding::Gzip => Enc::Gzip(flate2::write::GzEncoder::new(
                out.clone(),
                flate2::Compression::fast(),
            )),
            Coding::Deflate => Enc::Deflate(flate2::write::ZlibEncoder::new(
                out.clone(),
                flate2::Compression::fast(),
            )),
            Coding::Br => Enc::Br(Box::new(brotli::CompressorWriter::new(
                out.clone(),
                4096,
                4,
                22,
            ))),
            Coding::Identity | Coding::Zstd => return None,
        };
        Some(Self {
            enc: Some(enc),
            out,
        })
    }

    /// Compresses `data` and flushes: the bytes to send now.
    pub fn frame(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        match &mut self.enc {
            Some(Enc::Gzip(e)) => e.write_all(data).and_then(|()| e.flush())?,
            Some(Enc::Deflate(e)) => e.write_all(data).and_then(|()| e.flush())?,
            Some(Enc::Br(e)) => e.write_all(data).and_then(|()| e.flush())?,
            None => {}
        }
        Ok(self.out.take())
    }

    /// Ends the compressed stream: the trailing bytes.
    pub fn finish(&mut self) -> io::Result<Vec<u8>> {
        match self.enc.take() {
            Some(Enc::Gzip(e)) => drop(e.finish()?),
            Some(Enc::Deflate(e)) => drop(e.finish()?),
            Some(Enc::Br(e)) => drop(e.into_inner()),
            None => {}
        }
        Ok(self.out.take())
    }
}

/// Why a request body could not be decoded.
#[derive(Debug)]
pub enum DecodeError {
    /// A coding the emulator does not know (415).
    Unsupported(String),
    /// Corrupt data (400).
    Corrupt(String),
    /// More than `limit` bytes once decoded (413).
    TooLarge,
}

/// Decodes `body` from the codings listed in `content-encoding` (applied in order, so
/// undone in reverse), refusing more than `limit` decoded bytes.
pub fn decode_request<'a>(
    content_encoding: impl Iterator<Item = &'a str>,
    body: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut codings = Vec::new();
    for token in content_encoding.flat_map(|v| v.split(',')) {
        let token = token.trim().to_ascii_lowercase();
        if token.is_empty() {
            continue;
        }
        match Coding::parse(&token) {
            Some(Coding::Identity) => {}
            Some(c) => codings.push(c),
            None => return Err(DecodeError::Unsupported(token)),
        }
    }
    let mut body = body;
    for coding in codings.into_iter().rev() {
        body = decode_one(coding, &body, limit)?;
    }
    Ok(body)
}

fn decode_one(coding: Coding, data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let read = |r: &mut dyn Read| -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        r.take(bound)
            .read_to_end(&mut out)
            .map_err(|e| DecodeError::Corrupt(format!("{} body: {e}", coding.token())))?;
        if out.len() > limit {
            return Err(DecodeError::TooLarge);
        }
        Ok(out)
    };
    match coding {
        Coding::Identity => Ok(data.to_vec()),
        Coding::Gzip => read(&mut flate2::read::MultiGzDecoder::new(data)),
        // "deflate" is zlib-wrapped (RFC 9110); some clients send raw deflate.
        Coding::Deflate => read(&mut flate2::read::ZlibDecoder::new(data))
            .or_else(|_| read(&mut flate2::read::DeflateDecoder::new(data))),
        Coding::Br => read(&mut brotli::Decompressor::new(data, 4096)),
        Coding::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(data)
                .map_err(|e| DecodeError::Corrupt(format!("zstd body: {e}")))?;
            read(&mut d)
        }
    }
}

/// Decodes a complete response body (tests).
#[cfg(test)]
pub fn decompress(coding: Coding, data: &[u8]) -> Vec<u8> {
    decode_one(coding, data, usize::MAX - 1).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn pick(header: &str, pref: &[Coding]) -> Coding {
        choose(&parse_accept(std::iter::once(header)), pref)
    }

    #[test]
    fn accept_encoding_with_q_values() {
        let f = FULL_PREFERENCE;
        assert_eq!(pick("gzip, deflate, br, zstd", f), Coding::Br);
        assert_eq!(pick("gzip, deflate", f), Coding::Gzip);
        assert_eq!(pick("zstd, deflate", f), Coding::Zstd);
        assert_eq!(pick("deflate", f), Coding::Deflate);
        assert_eq!(pick("identity", f), Coding::Identity);
        assert_eq!(pick("", f), Coding::Identity);
        assert_eq!(pick("*;q=0", f), Coding::Identity);
        assert_eq!(pick("*", f), Coding::Br);
        assert_eq!(pick("br;q=0, *", f), Coding::Gzip);
        assert_eq!(pick("br;q=0.5, gzip;q=0.9", f), Coding::Gzip);
        assert_eq!(pick("GZIP;Q=0.001", f), Coding::Gzip);
        assert_eq!(pick("gzip;q=0", f), Coding::Identity);
        let s = STREAM_PREFERENCE;
        assert_eq!(pick("gzip, br, zstd", s), Coding::Gzip);
        assert_eq!(pick("br, zstd", s), Coding::Br);
        assert_eq!(pick("zstd", s), Coding::Identity);
    }

    #[test]
    fn full_bodies_round_trip() {
        let data = "{\"k\":\"é\"}".repeat(100);
        for c in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            let z = compress(c, data.as_bytes()).unwrap();
            assert!(z.len() < data.len(), "{c:?}");
            assert_eq!(decompress(c, &z), data.as_bytes(), "{c:?}");
        }
    }

    #[test]
    fn stream_frames_decode_on_arrival() {
        for c in [Coding::Gzip, Coding::Deflate, Coding::Br] {
            let mut enc = StreamEncoder::new(c).unwrap();
            let mut wire = Vec::new();
            for i in 0..5 {
                let frame = format!("event: e\ndata: {{\"i\":{i}}}\n\n");
                wire.extend(enc.frame(frame.as_bytes()).unwrap());
                // Everything so far decodes to exactly the frames so far (a streaming
                // decoder stops short of the end without error).
                let mut got = Vec::new();
                let mut buf = [0u8; 256];
                let mut d: Box<dyn Read> = match c {
                    Coding::Gzip => Box::new(flate2::read::GzDecoder::new(&wire[..])),
                    Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(&wire[..])),
                    _ => Box::new(brotli::Decompressor::new(&wire[..], 4096)),
                };
                loop {
                    match d.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8(got).unwrap();
                assert!(text.ends_with(&frame), "{c:?} {i}: {text:?}");
                assert_eq!(text.matches("event: e").count(), i + 1);
            }
            wire.extend(enc.finish().unwrap());
            let all: String = (0..5)
                .map(|i| format!("event: e\ndata: {{\"i\":{i}}}\n\n"))
                .collect();
            assert_eq!(decompress(c, &wire), all.as_bytes());
        }
    }

    #[test]
    fn request_bodies_are_decoded_and_bounded() {
        let body = b"{\"name\":\"x\"}".to_vec();
        for c in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            let z = compress(c, &body).unwrap();
            let got = decode_request(std::iter::once(c.token()), z, 1000).unwrap();
            assert_eq!(got, body);
        }
        let twice = compress(Coding::Br, &compress(Coding::Gzip, &body).unwrap()).unwrap();
        assert_eq!(
            decode_request(std::iter::once("gzip, br"), twice, 1000).unwrap(),
            body
        );
        assert!(matches!(
            decode_request(std::iter::once("compress"), body.clone(), 1000),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode_request(std::iter::once("gzip"), body.clone(), 1000),
            Err(DecodeError::Corrupt(_))
        ));
        let bomb = compress(Coding::Gzip, &vec![b'a'; 100_000]).unwrap();
        assert!(matches!(
            decode_request(std::iter::once("gzip"), bomb, 1000),
            Err(DecodeError::TooLarge)
        ));
        assert_eq!(
            decode_request(std::iter::once("identity"), body.clone(), 1000).unwrap(),
            body
        );
    }
}
