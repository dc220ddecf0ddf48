//! The stable-toolchain stand-in for cargo-fuzz: a deterministic mutation loop over the
//! committed corpus, through the same target functions. No coverage feedback, so it finds
//! less than libFuzzer, but it runs anywhere `cargo` does and keeps the targets exercised.
//!
//! `stable_mutate SECONDS_PER_TARGET [TARGET...]` prints one summary line per target:
//! `fuzz-summary target=<t> engine=stable execs=<n> findings=<n> corpus=<n>` and exits 1 if
//! any input failed (the input is written to `fuzz/artifacts/<t>/stable-crash-<n>`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ma_gateway_fuzz::TARGETS;

/// The message of the last panic, for the report.
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// xorshift64*: deterministic, seeded per target.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens worth splicing in (the same as `fuzz/dict/ma.dict`, roughly).
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"0",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"\\u0000\"",
    b"\\ud800",
    b"\r\n",
    b"\n\n",
    b"\r",
    b"data:",
    b"event:",
    b"id:",
    b"retry:",
    b": ping\n",
    b"\xef\xbb\xbf",
    b"metadata",
    b"ma_gateway_tenant",
    b"usage",
    b"input_tokens",
    b"output_tokens",
    b"agent",
    b"model",
    b"tools",
    b"budget",
    b"sesn_1",
    b"agent_01",
    b"env_1",
    b"vlt_1",
    b"/v1/",
    b"/",
    b"?",
    b"%2F",
    b"..",
    b"\x01",
    b"\xff\xff\xff\xff\x0f",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        match rng.below(8) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            2 if !input.is_empty() => {
                let start = rng.below(input.len());
                let len = rng.below((input.len() - start).min(32) + 1);
                input.drain(start..start + len);
            }
            3 => {
                let at = rng.below(input.len() + 1);
                let token = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            4 if !input.is_empty() => {
                // Duplicate a slice (repetition finds length and nesting bugs).
                let start = rng.below(input.len());
                let len = rng.below((input.len() - start).min(64) + 1);
                let piece: Vec<u8> = input[start..start + len].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, piece);
            }
            5 if !corpus.is_empty() => {
                // Splice with another corpus entry.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 if !input.is_empty() => {
                let i = rng.below(input.len());
                input.truncate(i);
            }
            _ => {
                let at = rng.below(input.len() + 1);
                input.insert(at, rng.next() as u8);
            }
        }
    }
    input.truncate(64 * 1024);
}

fn load(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let only: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if args.first().map(String::as_str) == Some("--replay") {
        // `--replay TARGET FILE...`: run inputs with the default panic message.
        let target = TARGETS
            .iter()
            .find(|(n, _)| Some(*n) == args.get(1).map(String::as_str));
        let Some((_, target)) = target else {
            eprintln!("usage: stable_mutate --replay TARGET FILE...");
            std::process::exit(2);
        };
        for file in &args[2..] {
            target(&std::fs::read(file).expect("unreadable input"));
        }
        return;
    }
    // Failures are reported once per target below, not printed for every input.
    std::panic::set_hook(Box::new(|info| {
        let mut last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        *last = info.to_string();
    }));
    let mut failed = false;
    for (name, target) in TARGETS {
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        let corpus = load(&root.join("corpus").join(name));
        let mut rng =
            Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64 ^ (name.as_bytes()[0] as u64) << 32);
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut execs: u64 = 0;
        let mut findings: u64 = 0;
        let run = |input: &[u8], execs: &mut u64, findings: &mut u64| {
            *execs += 1;
            if std::panic::catch_unwind(|| target(input)).is_err() {
                *findings += 1;
                let dir = root.join("artifacts").join(name);
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(format!("stable-crash-{findings}"));
                let _ = std::fs::write(&file, input);
                if *findings == 1 {
                    let last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
                    eprintln!("{name}: {last}");
                }
                eprintln!("{name}: failing input written to {}", file.display());
            }
        };
        // Every corpus entry as is, then mutations until the deadline.
        for entry in &corpus {
            run(entry, &mut execs, &mut findings);
        }
        let mut input = Vec::new();
        while Instant::now() < deadline && findings < 10 {
            for _ in 0..64 {
                if corpus.is_empty() {
                    input.clear();
                } else {
                    input.clone_from(&corpus[rng.below(corpus.len())]);
                }
                mutate(&mut rng, &mut input, &corpus);
                run(&input, &mut execs, &mut findings);
            }
        }
        println!(
            "fuzz-summary target={name} engine=stable execs={execs} findings={findings} corpus={}",
            corpus.len()
        );
        failed |= findings > 0;
    }
    std::process::exit(i32::from(failed));
}
