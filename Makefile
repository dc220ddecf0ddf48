# ma-gateway: the two commands that matter are `make run` and `make test`.
# Every target installs what it needs (rustup target, project venv, Debian packages as root).

SHELL        := /bin/bash
.SHELLFLAGS  := -eu -o pipefail -c
PYTHON       ?= python3
VENV         := .venv
VENV_PY      := $(VENV)/bin/python
VENV_STAMP   := $(VENV)/.installed
WASM         := target/wasm32-wasip1/release/ma_gateway.wasm
EMULATOR     := target/release/ma-emulator
ENVOY_CONFIGS := envoy.yaml $(wildcard examples/*.envoy.yaml)
DEBIAN_PACKAGES := ca-certificates umoci skopeo docker-registry wrk nghttp2-client

.PHONY: all run test bench bench-smoke reliability reliability-short soak-short fuzz fuzz-smoke wasm-test lint unit validate e2e build wasm wasm-fault emulator toolchain venv sdk-ts debs clean

all: build

## run: build everything and start Envoy + filter on 127.0.0.1:10000 (emulator when no ANTHROPIC_API_KEY)
run: build venv
	@$(VENV_PY) -m tests.harness.run

## test: lint, unit and property tests (native and as Wasm), a bounded fuzz, config validation,
## the real-Envoy end-to-end suite, a 60 s soak and a smoke run of the benchmarks (no timing judged)
test: lint unit wasm-test fuzz-smoke validate e2e soak-short bench-smoke

## bench: every arm side by side, interleaved, in one run (~7 min): A0 emulator, A1 Envoy router,
## A2 native sse_to_metadata, A3 this filter (V8), A4 Wasmtime/WAMR, A5 LiteLLM pass-through;
## writes target/bench/report.md and tests/bench/REPORT.md (ratios against same-run baselines)
bench: build venv
	cargo build --release --quiet --bin ma-bench
	$(VENV_PY) -m tests.bench.run

## bench-smoke: ~80 s check that every arm runs and produces numbers; never judges a number (CI)
bench-smoke: build venv
	cargo build --release --quiet --bin ma-bench
	$(VENV_PY) -m tests.bench.run --smoke --no-commit-copy

## reliability: fault and security e2e tests plus a 10-minute mixed-traffic soak (writes
## target/reliability/report.md, the README table's figures), then every fuzz target for FUZZ_SECONDS
reliability: build venv
	$(VENV_PY) -m tests.reliability.run
	fuzz/run.sh $(FUZZ_SECONDS)

FUZZ_SECONDS ?= 600

## fuzz: every fuzz target for FUZZ_SECONDS each (cargo-fuzz on nightly, else a stable mutation loop)
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

## fuzz-smoke: the bounded fuzz of CI, 5 s per target; fails on any finding
fuzz-smoke:
	fuzz/run.sh 5

## wasm-test: the pure core's unit tests compiled to wasm32-unknown-unknown, run under Node
## (wasm-bindgen-test-runner, installed at the wasm-bindgen version in Cargo.lock)
wasm-test:
	tests/wasm/run.sh

## reliability-short: the same with a 60-second soak (part of `make test`)
reliability-short: build venv
	$(VENV_PY) -m tests.reliability.run --short

## soak-short: 60 s of mixed traffic with faults (the soak of `make reliability`, shortened; part of `make test`)
soak-short: build venv
	$(VENV_PY) -m tests.reliability.soak --minutes 1

debs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

toolchain:
	@if command -v rustup >/dev/null; then \
	  rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1; \
	fi

$(VENV_STAMP): tests/requirements.txt | debs
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@touch $@

venv: $(VENV_STAMP)

# The official TypeScript SDK (tests/sdk-ts, pinned and locked) for the e2e flow it drives.
SDK_TS_STAMP := tests/sdk-ts/node_modules/.installed
$(SDK_TS_STAMP): tests/sdk-ts/package.json tests/sdk-ts/package-lock.json
	npm --prefix tests/sdk-ts ci --no-audit --no-fund
	@touch $@

sdk-ts: $(SDK_TS_STAMP)

# The VM logs the source revision it was built from.
REVISION := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

wasm: toolchain
	MA_GATEWAY_REVISION=$(REVISION) cargo build --target wasm32-wasip1 --release --lib
	@ls -l $(WASM) | awk '{print "wasm size: " $$5 " bytes"}'

emulator:
	cargo build --release -p ma-emulator

FAULT_TARGET := target/fault-injection
## wasm-fault: TEST-ONLY module that panics on demand (x-ma-gateway-fault header, cargo feature
## fault-injection) in its own target dir; never shipped (a test checks the shipped one has no trigger)
wasm-fault: toolchain
	cargo build --target wasm32-wasip1 --release --lib --features fault-injection --target-dir $(FAULT_TARGET)

build: wasm emulator

## oci: the filter as a reproducible OCI image (Wasm "compat" variant: one tar+gzip layer with
## plugin.wasm, for Istio WasmPlugin and Envoy Gateway) in target/oci, plus an oci-archive; no
## Docker engine. Prints the manifest digest to pin (SOURCE_DATE_EPOCH overrides the HEAD time).
.PHONY: oci
oci: wasm venv
	$(VENV_PY) -m tests.harness.oci --wasm $(WASM) --out target/oci --archive target/ma-gateway.oci.tar

lint: toolchain
	cargo fmt --check
	cargo clippy --target wasm32-wasip1 --lib -- -D warnings
	cargo clippy --target wasm32-wasip1 --lib --features fault-injection --target-dir $(FAULT_TARGET) -- -D warnings
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace --all-targets

## validate: every shipped Envoy config passes `envoy --mode validate` (with the real filter loaded)
validate: wasm venv
	@for c in $(ENVOY_CONFIGS); do \
	  echo "envoy --mode validate -c $$c"; \
	  ANTHROPIC_API_KEY=validate-only $(VENV)/bin/envoy --mode validate -c $$c --disable-hot-restart -l error >/dev/null || exit 1; \
	done

e2e: build wasm-fault venv sdk-ts
	$(VENV_PY) -m pytest -q tests/e2e

clean:
	cargo clean
	rm -rf $(VENV)
