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

/// Shared-data key of the default upstream credential. Per-tenant credentials will sit beside
/// it as `ma_gateway.credential.<name>`.
pub const DEFAULT_CREDENTIAL_SLOT: &str = "ma_gateway.credential.default";

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
