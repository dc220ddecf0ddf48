//! `ma-gateway`: an Envoy proxy-wasm HTTP filter that makes Anthropic's Claude Managed Agents
//! API safe to route through a gateway.
//!
//! The crate is a pure core plus thin glue. Every decision — config, routing, authentication,
//! header rewriting, error envelopes — is plain Rust below, unit-tested natively. Only
//! [`host`] (compiled for `wasm32` only) talks to Envoy through proxy-wasm hostcalls.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | plugin JSON → validated, immutable [`config::Plan`] |
//! | [`routes`] | `(method, path)` → [`routes::Operation`]; default deny |
//! | [`identity`] | presented gateway key → [`identity::Principal`] |
//! | [`headers`] | request header edits: strip credentials, betas, version, authority, key |
//! | [`credentials`] | the upstream key's record in shared data |
//! | [`gateway`] | the request-phase decision, in order |
//! | [`errors`] | the Anthropic error envelope |
//! | [`content_coding`] | bodies the gateway reads are never encoded: `identity` upstream, encoded ones refused |
//! | [`sha256`] | the digest used for key hashes |

pub mod accounting;
pub mod audit;
pub mod bounded;
pub mod config;
pub mod config_schema;
pub mod content_coding;
pub mod credentials;
pub mod errors;
pub mod gateway;
pub mod headers;
pub mod identity;
pub mod jwt;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod pricing;
pub mod reconcile;
pub mod routes;
pub mod scopes;
pub mod sha256;
pub mod sse;
pub mod store;
pub mod tag_strip;
pub mod tenancy;
#[cfg(test)]
mod test_rng;
pub mod time;
pub mod usage;

#[cfg(target_arch = "wasm32")]
pub mod host;
