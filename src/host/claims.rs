//! The verified JWT claims of the current request, read from dynamic metadata.
//!
//! Envoy's `envoy.filters.http.jwt_authn` (before this filter, `payload_in_metadata` set to
//! [`JwtRules::metadata_key`]) writes a token's payload there only once it has verified it.
//! Clients cannot write dynamic metadata, so unlike a header this cannot be forged. The whole
//! `metadata` property is read (a serialized `envoy.config.core.v3.Metadata`): asking Envoy
//! 1.40 for the payload's own path returns a lossy encoding that fails on `null` claims (see
//! [`crate::jwt`]).

use proxy_wasm::hostcalls;

use crate::jwt::{claims_from_metadata, Claims, JwtRules};

/// `None`: no verified JWT on this request (no jwt_authn payload under the configured key).
/// `Some(Err)`: a verified token whose claims do not satisfy `rules` (no tenant, …), or
/// metadata the host could not hand over — refuse the call. Never panics.
pub fn verified_claims(rules: &JwtRules) -> Option<Result<Claims, String>> {
    match hostcalls::get_property(vec!["metadata"]) {
        Ok(None) => None,
        Ok(Some(bytes)) => claims_from_metadata(&bytes, rules),
        Err(status) => Some(Err(format!("cannot read dynamic metadata: {status:?}"))),
    }
}
