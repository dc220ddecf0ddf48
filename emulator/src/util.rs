//! Small helpers without external crates: identifiers that look like the real API's
//! (`prefix` + 24 base62 characters, from a seeded SplitMix64 sequence) and RFC 3339
//! timestamps computed by hand from [`SystemTime`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Number of random-looking characters after an id prefix.
pub const ID_BODY_LEN: usize = 24;

/// Deterministic id generator: the n-th id depends only on the seed and n.
#[derive(Debug)]
pub struct IdGen {
    seed: u64,
    counter: AtomicU64,
}

impl IdGen {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// Returns `prefix` followed by [`ID_BODY_LEN`] base62 characters.
    pub fn next(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut state = self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut id = String::with_capacity(prefix.len() + ID_BODY_LEN);
        id.push_str(prefix);
        // 62^6 < 2^36, so six characters per 64-bit draw stay close to uniform.
        while id.len() < prefix.len() + ID_BODY_LEN {
            let mut draw = splitmix64(&mut state);
            for _ in 0..6 {
                if id.len() == prefix.len() + ID_BODY_LEN {
                    break;
                }
                id.push(char::from(BASE62[(draw % 62) as usize]));
                draw /= 62;
            }
        }
        id
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Time since the Unix epoch (zero if the clock is before 1970).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// The current time as RFC 3339 with microseconds, e.g. `2026-05-01T12:00:00.123456Z`.
pub fn now_rfc3339() -> String {
    rfc3339(since_epoch())
}

/// Formats a duration since the Unix epoch as an RFC 3339 UTC timestamp.
pub fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since_epoch.subsec_micros()
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_have_prefix_length_and_alphabet() {
        let ids = IdGen::new(7);
        let id = ids.next("sesn_");
        assert!(id.starts_with("sesn_"));
        assert_eq!(id.len(), 5 + ID_BODY_LEN);
        assert!(id[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = IdGen::new(42);
        let b = IdGen::new(42);
        let first: Vec<String> = (0..1000).map(|_| a.next("agent_")).collect();
        let second: Vec<String> = (0..1000).map(|_| b.next("agent_")).collect();
        assert_eq!(first, second);
        assert_eq!(first.iter().collect::<HashSet<_>>().len(), 1000);
        assert_ne!(IdGen::new(1).next("x_"), IdGen::new(2).next("x_"));
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339(Duration::from_millis(1_777_636_800_123)),
            "2026-05-01T12:00:00.123000Z"
        );
    }
}
