//! The upstream credential as it is kept in proxy-wasm shared data.
//!
//! The Anthropic key enters the VM through Envoy's `vm_config.environment_variables` (never the
//! plugin JSON), is written into shared data by the root context, and is read from shared data
//! on every request. Shared data lives in the Envoy process, outside any VM, so a rotation
//! written there (by the rotation service or admin path planned with identity/tenancy) takes
//! effect on the next request on every worker, without a VM reload.
//!
//! The record remembers where the key came from, so re-seeding from the environment at a VM
//! (re)start never overwrites a key that was rotated in since.

/// The credential every tenant uses unless its config names another.
pub const DEFAULT_CREDENTIAL: &str = "default";

/// Shared-data key of the named upstream credential.
pub fn slot(name: &str) -> String {
    format!("ma_gateway.credential.{name}")
}

/// Shared-data key recording which credential a session was created with.
pub fn affinity_key(session_id: &str) -> String {
    format!("ma_gateway.affinity.{session_id}")
}

/// Where the gateway reads keys and session affinities from (shared data in Envoy).
pub trait KeyRing {
    /// The current key of a named credential.
    fn key(&self, credential: &str) -> Option<String>;
    /// The credential a session was created with, if recorded.
    fn affinity(&self, session_id: &str) -> Option<String>;
}

/// Which credential a call uses: the one its session was created with (so a session keeps its
/// workspace even if the tenant's mapping changes), else the tenant's.
pub fn choose<'a>(tenant_credential: &'a str, session_affinity: Option<&'a str>) -> &'a str {
    session_affinity.unwrap_or(tenant_credential)
}

/// The key a HashiCorp Vault KV v2 read returns for `field`: the body is
/// `{"data":{"data":{"<field>":"<key>",…},"metadata":{…}}}`.
pub fn parse_vault_kv2(body: &[u8], field: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let key = value
        .pointer("/data/data")
        .and_then(|d| d.get(field))
        .ok_or_else(|| format!("no data.data.{field} in the secret"))?
        .as_str()
        .ok_or_else(|| format!("data.data.{field} is not a string"))?;
    if is_usable_key(key) {
        Ok(key.to_string())
    } else {
        Err(format!("data.data.{field} is not a usable key"))
    }
}

/// Seconds until the next refresh of a polled secret: `every` after a success; after `failures`
/// consecutive failures, exponential from 1 s capped at `every`; both with ±20 % jitter drawn
/// from `seed` so replicas do not poll in lockstep.
pub fn next_refresh_secs(every: u64, failures: u32, seed: u64) -> u64 {
    let base = if failures == 0 {
        every
    } else {
        1u64.checked_shl(failures.min(16))
            .unwrap_or(u64::MAX)
            .min(every)
    }
    .max(1);
    // xorshift of the seed → a spread of ±20 % around base.
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let spread = base / 5;
    if spread == 0 {
        return base;
    }
    base - spread + x % (2 * spread + 1)
}

/// Where a stored credential came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Seeded from the named environment variable at VM start.
    Env(String),
    /// Written by a rotation (service, admin path); wins over the environment.
    Rotated,
}

/// An upstream key plus its provenance, encoded as `v1\n<source>\n<key>`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCredential {
    pub source: Source,
    pub key: String,
}

// Never print the key itself, whatever logs a Debug of this.
impl std::fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCredential")
            .field("source", &self.source)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

impl StoredCredential {
    pub fn encode(&self) -> Vec<u8> {
        let source = match &self.source {
            Source::Env(name) => format!("env:{name}"),
            Source::Rotated => "rotated".to_string(),
        };
        format!("v1\n{source}\n{}", self.key).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<StoredCredential> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(3, '\n');
        if parts.next()? != "v1" {
            return None;
        }
        let source = match parts.next()? {
            "rotated" => Source::Rotated,
            other => Source::Env(other.strip_prefix("env:")?.to_string()),
        };
        let key = parts.next()?;
        is_usable_key(key).then(|| StoredCredential {
            source,
            key: key.to_string(),
        })
    }
}

/// A key we are willing to put in a header: non-empty visible ASCII, bounded.
pub fn is_usable_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 1024 && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether the root context should (re)write the env-seeded credential over what is stored.
/// A rotated key is never overwritten by a seed; a stale seed of the same variable is.
pub fn should_seed(stored: Option<&StoredCredential>, seed: &StoredCredential) -> bool {
    match stored {
        None => true,
        Some(current) => current.source != Source::Rotated && current != seed,
    }
}

#[cfg(test)]
mod tests {
    // On wasm32-unknown-unknown these tests run under wasm-bindgen-test (tests/wasm/run.sh).
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn env(key: &str) -> StoredCredential {
        StoredCredential {
            source: Source::Env("ANTHROPIC_API_KEY".into()),
            key: key.into(),
        }
    }

    #[test]
    fn round_trip() {
        for cred in [
            env("sk-ant-1"),
            StoredCredential {
                source: Source::Rotated,
                key: "sk-ant-2".into(),
            },
        ] {
            assert_eq!(StoredCredential::decode(&cred.encode()), Some(cred));
        }
        assert_eq!(
            env("sk-ant-1").encode(),
            b"v1\nenv:ANTHROPIC_API_KEY\nsk-ant-1"
        );
    }

    #[test]
    fn decode_rejects_garbage() {
        for bad in [
            &b""[..],
            b"v2\nrotated\nk",
            b"v1\nrotated\n",
            b"v1\nfile\nk",
            b"v1\nrotated\nk k",
            b"\xff",
        ] {
            assert_eq!(StoredCredential::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn seeding_never_overwrites_a_rotation() {
        let rotated = StoredCredential {
            source: Source::Rotated,
            key: "new".into(),
        };
        assert!(should_seed(None, &env("a")));
        assert!(should_seed(Some(&env("old")), &env("a")));
        assert!(!should_seed(Some(&env("a")), &env("a")));
        assert!(!should_seed(Some(&rotated), &env("a")));
    }

    #[test]
    fn affinity_wins_over_the_tenant_mapping() {
        assert_eq!(choose("team", Some("default")), "default");
        assert_eq!(choose("team", None), "team");
        assert_eq!(slot("team"), "ma_gateway.credential.team");
    }

    #[test]
    fn vault_kv2_bodies() {
        let body = br#"{"request_id":"x","data":{"data":{"api_key":"sk-ant-1"},"metadata":{"version":3}}}"#;
        assert_eq!(parse_vault_kv2(body, "api_key"), Ok("sk-ant-1".to_string()));
        assert_eq!(
            parse_vault_kv2(body, "other"),
            Err("no data.data.other in the secret".to_string())
        );
        assert_eq!(
            parse_vault_kv2(br#"{"data":{"data":{"api_key":7}}}"#, "api_key"),
            Err("data.data.api_key is not a string".to_string())
        );
        assert_eq!(
            parse_vault_kv2(br#"{"data":{"data":{"api_key":"a b"}}}"#, "api_key"),
            Err("data.data.api_key is not a usable key".to_string())
        );
        assert!(parse_vault_kv2(b"<html>", "api_key")
            .unwrap_err()
            .starts_with("not JSON"));
    }

    #[test]
    fn refresh_backs_off_with_bounded_jitter() {
        for seed in 0..200 {
            let ok = next_refresh_secs(300, 0, seed);
            assert!((240..=360).contains(&ok), "{ok}");
            let third_failure = next_refresh_secs(300, 3, seed);
            assert!((7..=9).contains(&third_failure), "{third_failure}");
            assert!(next_refresh_secs(300, 30, seed) <= 360);
        }
        assert_eq!(next_refresh_secs(1, 0, 5), 1);
        let spread: std::collections::HashSet<u64> =
            (0..50).map(|s| next_refresh_secs(300, 0, s)).collect();
        assert!(spread.len() > 10, "jitter must spread replicas");
    }

    #[test]
    fn debug_never_shows_the_key() {
        assert!(!format!("{:?}", env("sk-secret")).contains("sk-secret"));
    }

    #[test]
    fn usable_keys() {
        assert!(is_usable_key("sk-ant-api03-abc_DEF"));
        assert!(!is_usable_key(""));
        assert!(!is_usable_key("a b"));
        assert!(!is_usable_key("a\r\nx-evil: 1"));
    }
}
