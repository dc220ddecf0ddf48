#!/usr/bin/env bash
# Runs the pure core's unit tests compiled to Wasm (wasm32-unknown-unknown: 32-bit usize, no
# threads) under Node with wasm-bindgen-test-runner, as `make wasm-test` does.
#
# Installs what is missing: the rustup target, and wasm-bindgen-cli at exactly the
# wasm-bindgen version in Cargo.lock (the runner must match the crate). Prints
#   wasm-test tests=<n> passed=<n> failed=<n> ignored=<n> install_s=<n> build_s=<n> run_s=<n>
# and exits non-zero if any test failed (or none ran).
#
# How the tests get there: every `#[cfg(test)] mod tests` in src/*.rs imports
# `wasm_bindgen_test::wasm_bindgen_test as test` on this target only, so each plain `#[test]`
# is registered with wasm-bindgen-test (which does not run libtest `#[test]`s). src/host/ is
# compiled in too (it is `cfg(target_arch = "wasm32")`) and imports Envoy's `proxy_*`
# hostcalls from `env`; tests/wasm/stubs/env.js provides them as stubs that throw if called.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
t0=$(date +%s)

command -v node >/dev/null || { echo "wasm-test: node (v18+) is required" >&2; exit 1; }
if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
fi
version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
[ -n "$version" ] || { echo "wasm-test: no wasm-bindgen in Cargo.lock" >&2; exit 1; }
installed="$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{ print $2 }' || true)"
if [ "$installed" != "$version" ]; then
  echo "wasm-test: installing wasm-bindgen-cli $version (found: ${installed:-none})" >&2
  # --locked first; a registry mirror that lacks one of its locked dependencies gets the
  # newest compatible ones instead. No default features: TLS (rustls) is only for fetching
  # browser drivers, and leaving it out halves the build (~2.5 min here instead of ~5+).
  cargo install wasm-bindgen-cli --version "$version" --no-default-features --locked --quiet ||
    cargo install wasm-bindgen-cli --version "$version" --no-default-features --quiet
fi
t1=$(date +%s)

export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
export NODE_PATH="$root/tests/wasm/stubs${NODE_PATH:+:$NODE_PATH}"
cargo test --target wasm32-unknown-unknown --lib --no-run --quiet
t2=$(date +%s)

set +e
out="$(cargo test --target wasm32-unknown-unknown --lib 2>&1)"
rc=$?
set -e
t3=$(date +%s)
echo "$out" | grep -vE '^test .* \.\.\. ok$' | grep -vE '^\.+$' || true
result="$(echo "$out" | grep -E '^test result:' | tail -1)"
num() { echo "$result" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
passed=$(num passed)
failed=$(num failed)
ignored=$(num ignored)
echo "wasm-test tests=$((passed + failed + ignored)) passed=$passed failed=$failed ignored=$ignored install_s=$((t1 - t0)) build_s=$((t2 - t1)) run_s=$((t3 - t2))"
[ "$rc" -eq 0 ] && [ "$passed" -gt 0 ]
