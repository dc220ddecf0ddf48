//! `ma-emulator`: a local, in-memory emulator of Anthropic's Claude Managed Agents API,
//! used by the gateway's tests, `make run` and benchmarks.
//!
//! ```text
//! ma-emulator --listen 127.0.0.1:0 --api-key KEY [--heartbeat-ms 15000]
//!             [--heartbeat comment|event] [--event-delay-ms 20] [--seed N]
//!             [--tls-cert-out PATH] [--compression auto|off|always] [--chunking awkward|plain]
//!             [--exit-on-stdin-eof] [--verbose]
//! ```
//!
//! It behaves like the real API on the wire, adversarially by default: HTTP/1.1 and HTTP/2
//! on one port (with `--tls-cert-out`: TLS with ALPN `h2`/`http/1.1` and a fresh certificate
//! for `ma-emulator.test` and 127.0.0.1, whose CA's PEM is written to PATH; without it,
//! plaintext HTTP/1.1 and h2c prior knowledge), responses compressed per `accept-encoding`
//! (`--compression off`: never) and bodies cut at seeded random places (`--chunking plain`:
//! one write per event or body).
//!
//! After binding (and writing the certificate) it prints exactly one line,
//! `LISTENING <addr>:<port>`, to stdout; logs go to stderr. Modules: [`server`] (hyper,
//! TLS, compression, chunking), [`http`] (requests and replies), [`encoding`] (content
//! codings), [`tls`] (certificates), [`api`] (routing and handlers),
//! [`store`] (state), [`script`] (scripted turns), [`sse`] (streams), [`page`] (cursor
//! pagination), [`util`] (ids and timestamps).

mod api;
mod encoding;
mod http;
mod page;
mod script;
mod server;
mod sse;
mod store;
mod tls;
mod util;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::server::{Chunking, Compression};
use crate::sse::HeartbeatKind;

const USAGE: &str = "usage: ma-emulator --listen ADDR:PORT --api-key KEY [--heartbeat-ms MS] \
[--heartbeat comment|event] [--event-delay-ms MS] [--seed N] [--tls-cert-out PATH] \
[--compression auto|off|always] [--chunking awkward|plain] [--exit-on-stdin-eof] [--verbose]";

/// Runtime configuration, from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub api_key: String,
    /// Heartbeat period on open streams; `None` (from `--heartbeat-ms 0`) disables them.
    pub heartbeat: Option<Duration>,
    pub heartbeat_kind: HeartbeatKind,
    /// Pause between consecutive events of a scripted turn.
    pub event_delay: Duration,
    /// Seed of the id generator (defaults to the start time, so restarts get fresh ids).
    pub seed: u64,
    pub exit_on_stdin_eof: bool,
    /// Log every request to stderr.
    pub verbose: bool,
    /// Serve TLS, writing the CA certificate's PEM here.
    pub tls_cert_out: Option<PathBuf>,
    pub compression: Compression,
    pub chunking: Chunking,
}

impl Config {
    /// Parses the arguments after the program name. `Ok(None)` means `--help`.
    pub fn parse(args: &[String]) -> Result<Option<Self>, String> {
        let mut listen = None;
        let mut api_key = None;
        let mut heartbeat_ms: u64 = 15_000;
        let mut heartbeat_kind = HeartbeatKind::Comment;
        let mut event_delay_ms: u64 = 20;
        let mut seed = None;
        let mut exit_on_stdin_eof = false;
        let mut verbose = false;
        let mut tls_cert_out = None;
        let mut compression = Compression::Auto;
        let mut chunking = Chunking::Awkward;

        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let number = |v: String| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag}: '{v}' is not a non-negative integer"))
            };
            match flag {
                "--listen" => listen = Some(value()?),
                "--api-key" => api_key = Some(value()?),
                "--heartbeat-ms" => heartbeat_ms = number(value()?)?,
                "--heartbeat" => {
                    heartbeat_kind = match value()?.as_str() {
                        "comment" => HeartbeatKind::Comment,
                        "event" => HeartbeatKind::Event,
                        other => return Err(format!("--heartbeat: unknown kind '{other}'")),
                    }
                }
                "--event-delay-ms" => event_delay_ms = number(value()?)?,
                "--seed" => seed = Some(number(value()?)?),
                "--tls-cert-out" => tls_cert_out = Some(PathBuf::from(value()?)),
                "--compression" => {
                    compression = match value()?.as_str() {
                        "auto" => Compression::Auto,
                        "off" => Compression::Off,
                        "always" => Compression::Always,
                        other => return Err(format!("--compression: unknown mode '{other}'")),
                    }
                }
                "--chunking" => {
                    chunking = match value()?.as_str() {
                        "awkward" => Chunking::Awkward,
                        "plain" => Chunking::Plain,
                        other => return Err(format!("--chunking: unknown mode '{other}'")),
                    }
                }
                "--exit-on-stdin-eof" => exit_on_stdin_eof = true,
                "--verbose" | "-v" => verbose = true,
                "--help" | "-h" => return Ok(None),
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        let listen = listen.ok_or("--listen is required")?;
        let api_key = api_key
            .filter(|k| !k.is_empty())
            .ok_or("--api-key is required")?;
        Ok(Some(Self {
            listen,
            api_key,
            heartbeat: (heartbeat_ms > 0).then(|| Duration::from_millis(heartbeat_ms)),
            heartbeat_kind,
            event_delay: Duration::from_millis(event_delay_ms),
            seed: seed.unwrap_or_else(|| {
                let t = util::since_epoch();
                t.as_secs()
                    ^ u64::from(t.subsec_nanos()).rotate_left(32)
                    ^ u64::from(std::process::id())
            }),
            exit_on_stdin_eof,
            verbose,
            tls_cert_out,
            compression,
            chunking,
        }))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match Config::parse(&args) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("ma-emulator: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(&cfg.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ma-emulator: cannot listen on {}: {e}", cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ma-emulator: cannot read the bound address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match &cfg.tls_cert_out {
        None => None,
        Some(path) => {
            let made = match tls::generate() {
                Ok(made) => made,
                Err(e) => {
                    eprintln!("ma-emulator: cannot make a TLS certificate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = std::fs::write(path, &made.ca_pem) {
                eprintln!("ma-emulator: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            Some(made.config)
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "LISTENING {addr}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        eprintln!("ma-emulator: cannot write to stdout");
    }
    drop(stdout);
    eprintln!(
        "ma-emulator: listening on {addr} ({}, compression {:?}, chunking {:?}, heartbeat {:?} {:?}, event delay {:?})",
        if tls.is_some() { "TLS, ALPN h2 http/1.1" } else { "plaintext HTTP/1.1 and h2c" },
        cfg.compression, cfg.chunking, cfg.heartbeat, cfg.heartbeat_kind, cfg.event_delay
    );

    if cfg.exit_on_stdin_eof {
        let watcher = thread::Builder::new().name("stdin-watch".into()).spawn(|| {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            eprintln!("ma-emulator: stdin closed, exiting");
            std::process::exit(0);
        });
        if let Err(e) = watcher {
            eprintln!("ma-emulator: cannot watch stdin: {e}");
        }
    }

    let opts = server::Options {
        tls,
        compression: cfg.compression,
        chunking: cfg.chunking,
        seed: cfg.seed,
    };
    let app = Arc::new(api::App::new(cfg));
    match server::serve(listener, Arc::new(api::Server::new(app)), opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ma-emulator: server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_flags() {
        let cfg = Config::parse(&args(
            "--listen 127.0.0.1:0 --api-key k --heartbeat-ms 0 --heartbeat=event --event-delay-ms 5 --seed 9 --exit-on-stdin-eof",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:0");
        assert_eq!(cfg.api_key, "k");
        assert_eq!(cfg.heartbeat, None);
        assert_eq!(cfg.heartbeat_kind, HeartbeatKind::Event);
        assert_eq!(cfg.event_delay, Duration::from_millis(5));
        assert_eq!(cfg.seed, 9);
        assert!(cfg.exit_on_stdin_eof);
        assert_eq!(cfg.compression, Compression::Auto);
        assert_eq!(cfg.chunking, Chunking::Awkward);
        assert!(cfg.tls_cert_out.is_none());
        let wire = Config::parse(&args(
            "--listen a:1 --api-key k --tls-cert-out /tmp/x.pem --compression off --chunking=plain",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(wire.tls_cert_out, Some(PathBuf::from("/tmp/x.pem")));
        assert_eq!(wire.compression, Compression::Off);
        assert_eq!(wire.chunking, Chunking::Plain);
        let defaults = Config::parse(&args("--listen a:1 --api-key k"))
            .unwrap()
            .unwrap();
        assert_eq!(defaults.heartbeat, Some(Duration::from_millis(15_000)));
        assert_eq!(defaults.heartbeat_kind, HeartbeatKind::Comment);
        assert_eq!(defaults.event_delay, Duration::from_millis(20));
    }

    #[test]
    fn rejects_bad_flags() {
        assert!(Config::parse(&args("--listen a:1")).is_err());
        assert!(Config::parse(&args("--listen a:1 --api-key k --bogus")).is_err());
        assert!(Config::parse(&args("--listen a:1 --api-key k --heartbeat x")).is_err());
        assert!(Config::parse(&args("--listen a:1 --api-key k --event-delay-ms -1")).is_err());
        assert!(Config::parse(&args("--listen a:1 --api-key k --compression gz")).is_err());
        assert!(Config::parse(&args("--listen a:1 --api-key k --chunking odd")).is_err());
        assert!(Config::parse(&args("--help")).unwrap().is_none());
    }
}
