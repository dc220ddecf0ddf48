//! `ma-bench`: throughput benchmarks of the gateway's pure hot paths.
//!
//! ```text
//! cargo run --release --bin ma-bench [-- --mb 64 --runs 5 --seed 1 --json]
//! ```
//!
//! `--json` adds one `BENCHJSON {...}` line per case (for `tests/bench`, which quotes these
//! figures in its report).
//!
//! It builds a realistic Managed Agents SSE stream in memory (large `agent.message` and
//! `agent.tool_result` frames, small span / status / usage frames, `: ping` heartbeats), then
//! times every entry of [`cases`] over it, best of `--runs`, and prints a table. Runs are
//! interleaved (every case once per run, in turn), so a noisy neighbour hits all cases alike.
//! The first case is the baseline: reading every byte of the same input (word XOR), i.e. the
//! physical limit of anything that must look at every byte; the second is a bare walk over the
//! line ends with the scanner's own search loop ([`find_line_end`]). The ratio column says how
//! close each case gets to the baseline. To benchmark something new, add a [`Case`] to
//! [`cases`].

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use ma_gateway::sse::{find_line_end, ScanStats, Scanner, ScannerConfig, SseEvent};

const USAGE: &str = "usage: ma-bench [--mb MEGABYTES] [--runs N] [--seed N] [--json]";

/// The events the gateway meters; `message` catches frames without an `event:` line.
const INTERESTING: [&str; 4] = [
    "span.model_request_end",
    "span.outcome_evaluation_end",
    "session.usage",
    "message",
];

/// One benchmark: `run` processes the whole input in `chunk`-byte pieces and returns a
/// checksum (kept alive so the work cannot be optimised away; also a sanity value).
struct Case {
    name: &'static str,
    chunk: usize,
    run: fn(&[u8], usize) -> u64,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "baseline: read every byte",
            chunk: 16 * 1024,
            run: read_every_byte,
        },
        Case {
            name: "line-end walk (find_line_end)",
            chunk: 16 * 1024,
            run: line_end_walk,
        },
        Case {
            name: "sse::Scanner",
            chunk: 16 * 1024,
            run: scanner,
        },
        Case {
            name: "sse::Scanner",
            chunk: 64 * 1024,
            run: scanner,
        },
        Case {
            name: "sse::Scanner",
            chunk: 1024,
            run: scanner,
        },
    ]
}

/// Baseline, the physical limit of anything that must look at every byte: XOR-folds the input
/// as 8-byte words, chunk by chunk (memory bandwidth plus one ALU op per word).
fn read_every_byte(input: &[u8], chunk: usize) -> u64 {
    let mut acc = 0u64;
    for piece in input.chunks(chunk) {
        let mut words = piece.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            acc ^= u64::from_le_bytes(b);
        }
        for &b in words.remainder() {
            acc ^= u64::from(b);
        }
        acc = black_box(acc);
    }
    acc
}

/// Counts the LF/CR bytes, chunk by chunk, jumping from one to the next with the
/// scanner's search loop. Every line end of the benchmark stream is a single LF.
fn line_end_walk(input: &[u8], chunk: usize) -> u64 {
    let mut count = 0u64;
    for piece in input.chunks(chunk) {
        let mut rest = piece;
        while let Some(i) = find_line_end(rest) {
            count += 1;
            rest = &rest[i + 1..];
        }
    }
    count
}

/// The SSE scanner as the filter runs it, with a callback that touches each event's data.
fn scanner(input: &[u8], chunk: usize) -> u64 {
    let mut scanner = Scanner::new(&INTERESTING, ScannerConfig::default());
    let mut sum = 0u64;
    let mut on_event = |ev: SseEvent<'_>| {
        sum = sum.wrapping_add(ev.data.len() as u64 + ev.name.len() as u64);
    };
    for piece in input.chunks(chunk) {
        scanner.feed(black_box(piece), &mut on_event);
    }
    scanner.finish(&mut on_event);
    let stats = scanner.stats();
    sum.wrapping_add(stats.interesting)
}

/// xorshift64*: deterministic, dependency-free randomness for the generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// What the generator put in the stream, to check the scanner against.
#[derive(Default, Debug)]
struct Expected {
    frames: u64,
    interesting: u64,
    comments: u64,
}

/// Builds a stream of about `target` bytes shaped like a busy agent session.
struct Generator {
    rng: Rng,
    out: Vec<u8>,
    seq: u64,
    expected: Expected,
}

const WORDS: [&str; 24] = [
    "the",
    "agent",
    "reads",
    "file",
    "src/main.rs",
    "and",
    "runs",
    "cargo",
    "test",
    "--",
    "ok",
    "error[E0308]:",
    "mismatched",
    "types",
    "\\n",
    "\\\"quoted\\\"",
    "fn",
    "main()",
    "{",
    "}",
    "let",
    "x",
    "=",
    "42;",
];

impl Generator {
    fn new(seed: u64, target: usize) -> Self {
        Self {
            rng: Rng(seed.max(1)),
            out: Vec::with_capacity(target + 128 * 1024),
            seq: 0,
            expected: Expected::default(),
        }
    }

    fn id(&mut self) -> String {
        self.seq += 1;
        format!("sevt_{:024x}", self.seq)
    }

    /// JSON-string-safe prose of roughly `len` bytes.
    fn text(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len + 16);
        while s.len() < len {
            let w = WORDS[self.rng.range(0, WORDS.len() - 1)];
            s.push_str(w);
            s.push(' ');
        }
        s
    }

    fn frame(&mut self, name: &str, data: &str, interesting: bool) {
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        self.out.extend_from_slice(data.as_bytes());
        self.out.extend_from_slice(b"\n\n");
        self.expected.frames += 1;
        self.expected.interesting += u64::from(interesting);
    }

    fn simple(&mut self, name: &str) {
        let id = self.id();
        let data =
            format!(r#"{{"type":"{name}","id":"{id}","processed_at":"2026-05-01T12:00:00.000Z"}}"#);
        self.frame(name, &data, false);
    }

    fn ping(&mut self) {
        self.out.extend_from_slice(b": ping\n\n");
        self.expected.comments += 1;
    }

    fn agent_message(&mut self) {
        let id = self.id();
        let len = self.rng.range(2 * 1024, 64 * 1024);
        let text = self.text(len);
        let data = format!(
            r#"{{"type":"agent.message","id":"{id}","content":[{{"type":"text","text":"{text}"}}],"processed_at":"2026-05-01T12:00:01.000Z"}}"#
        );
        self.frame("agent.message", &data, false);
    }

    fn tool_round(&mut self) {
        let use_id = self.id();
        let data = format!(
            r#"{{"type":"agent.tool_use","id":"{use_id}","name":"bash","input":{{"command":"cargo test --lib"}},"processed_at":"2026-05-01T12:00:02.000Z"}}"#
        );
        self.frame("agent.tool_use", &data, false);
        let id = self.id();
        let len = self.rng.range(512, 32 * 1024);
        let text = self.text(len);
        let data = format!(
            r#"{{"type":"agent.tool_result","id":"{id}","tool_use_id":"{use_id}","content":[{{"type":"text","text":"{text}"}}],"is_error":false,"processed_at":"2026-05-01T12:00:03.000Z"}}"#
        );
        self.frame("agent.tool_result", &data, false);
    }

    fn model_request(&mut self) {
        let start = self.id();
        let data = format!(
            r#"{{"type":"span.model_request_start","id":"{start}","processed_at":"2026-05-01T12:00:00.500Z"}}"#
        );
        self.frame("span.model_request_start", &data, false);
        if self.rng.range(0, 1) == 0 {
            self.agent_message();
        } else {
            self.tool_round();
        }
        let id = self.id();
        let (input, output, read) = (
            self.rng.range(100, 20_000),
            self.rng.range(10, 4_000),
            self.rng.range(0, 50_000),
        );
        let data = format!(
            r#"{{"type":"span.model_request_end","id":"{id}","model_request_start_id":"{start}","is_error":false,"model_usage":{{"input_tokens":{input},"output_tokens":{output},"cache_creation_input_tokens":0,"cache_read_input_tokens":{read}}},"processed_at":"2026-05-01T12:00:04.000Z"}}"#
        );
        self.frame("span.model_request_end", &data, true);
    }

    fn usage(&mut self) {
        let id = self.id();
        let data = format!(
            r#"{{"type":"session.usage","id":"{id}","usage":{{"input_tokens":{},"output_tokens":{},"cache_read_input_tokens":{},"cache_creation":{{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0}},"active_seconds":{}}},"budget":null,"processed_at":"2026-05-01T12:00:05.000Z"}}"#,
            self.seq * 1000,
            self.seq * 100,
            self.seq * 5000,
            self.seq
        );
        self.frame("session.usage", &data, true);
    }

    /// One user turn: running, a few model requests with heartbeats between, idle, usage.
    fn turn(&mut self) {
        self.simple("session.status_running");
        for _ in 0..self.rng.range(1, 6) {
            self.model_request();
            if self.rng.range(0, 3) == 0 {
                self.ping();
            }
        }
        self.simple("session.status_idle");
        self.usage();
        self.ping();
    }

    fn build(mut self, target: usize) -> (Vec<u8>, Expected) {
        while self.out.len() < target {
            self.turn();
        }
        (self.out, self.expected)
    }
}

/// Parsed command line.
struct Args {
    mb: usize,
    runs: usize,
    seed: u64,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        mb: 64,
        runs: 5,
        seed: 1,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--mb" => args.mb = value()?.parse().map_err(|e| format!("--mb: {e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--json" => args.json = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if args.mb == 0 || args.runs == 0 {
        return Err(format!("--mb and --runs must be positive\n{USAGE}"));
    }
    Ok(args)
}

/// Checks the scanner's view of the stream against what the generator wrote.
fn check(input: &[u8], expected: &Expected) -> Result<ScanStats, String> {
    let mut scanner = Scanner::new(&INTERESTING, ScannerConfig::default());
    let mut parsed = 0u64;
    let mut on_event = |ev: SseEvent<'_>| {
        if serde_json::from_slice::<serde_json::Value>(ev.data).is_ok() {
            parsed += 1;
        }
    };
    for piece in input.chunks(16 * 1024) {
        scanner.feed(piece, &mut on_event);
    }
    scanner.finish(&mut on_event);
    let stats = scanner.stats();
    if stats.events != expected.frames
        || stats.interesting != expected.interesting
        || stats.comments != expected.comments
        || parsed != expected.interesting
        || stats.oversize != 0
    {
        return Err(format!(
            "scanner disagrees with the generator: {stats:?}, {parsed} parsed, expected {expected:?}"
        ));
    }
    Ok(stats)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let (input, expected) =
        Generator::new(args.seed, args.mb * 1_000_000).build(args.mb * 1_000_000);
    let stats = match check(&input, &expected) {
        Ok(stats) => stats,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "input: {:.1} MB, {} frames ({} interesting), {} heartbeat comments; best of {} runs",
        input.len() as f64 / 1e6,
        stats.events,
        stats.interesting,
        stats.comments,
        args.runs
    );
    println!();
    println!("| case | chunk | MB/s | vs baseline |");
    println!("|---|---:|---:|---:|");
    let cases = cases();
    let mut best = vec![f64::INFINITY; cases.len()];
    for _ in 0..args.runs {
        for (case, best) in cases.iter().zip(best.iter_mut()) {
            let start = Instant::now();
            black_box((case.run)(black_box(&input), case.chunk));
            *best = best.min(start.elapsed().as_secs_f64());
        }
    }
    let mut baseline = None;
    for (case, best) in cases.iter().zip(best) {
        let mbps = input.len() as f64 / 1e6 / best.max(1e-9);
        let base = *baseline.get_or_insert(mbps);
        println!(
            "| {} | {} KiB | {:.0} | {:.2} |",
            case.name,
            case.chunk / 1024,
            mbps,
            mbps / base
        );
        if args.json {
            println!(
                "BENCHJSON {}",
                serde_json::json!({
                    "case": case.name,
                    "chunk_kib": case.chunk / 1024,
                    "mb_s": mbps,
                    "vs_baseline": mbps / base,
                    "input_mb": input.len() as f64 / 1e6,
                    "runs": args.runs,
                })
            );
        }
    }
    ExitCode::SUCCESS
}
