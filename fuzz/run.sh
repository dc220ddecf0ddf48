#!/usr/bin/env bash
# Runs every fuzz target of ma-gateway's pure core for SECONDS_PER_TARGET seconds each.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]        (default 10 s, every target)
#
# With a nightly toolchain (`cargo +nightly`): cargo-fuzz (installed if missing) runs libFuzzer
# with -max_total_time in one process (no -jobs: it forks a child that logs to ./fuzz-0.log,
# which parallel runs would share), nice'd; the committed corpus fuzz/corpus/<t> is read-only
# seed input, new inputs go to fuzz/work/<t> (not committed), crashes to fuzz/artifacts/<t>.
# Without nightly: says so, and runs the deterministic stable mutation loop
# (src/bin/stable_mutate.rs) over the same corpus through the same target functions
# (FUZZ_ENGINE=stable forces it).
#
# Prints one machine-readable line per target and a total:
#   fuzz-summary target=<t> engine=<libfuzzer|stable> execs=<n> findings=<n> corpus=<n>
#   fuzz-total engine=<e> targets=<n> execs=<n> findings=<n> seconds=<n>
# Exit status: 0 when no target found anything, 1 on any crash or failed property.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
secs="${1:-10}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -vx -e ma-gateway-fuzz -e stable_mutate)
fi
start=$(date +%s)

if [ "${FUZZ_ENGINE:-}" = stable ] || ! cargo +nightly --version >/dev/null 2>&1; then
  if [ "${FUZZ_ENGINE:-}" = stable ]; then
    echo "fuzz: FUZZ_ENGINE=stable: running the stable mutation loop" >&2
  else
    echo "fuzz: no nightly toolchain (cargo +nightly); running the stable mutation loop instead" >&2
  fi
  cargo build --release --quiet --no-default-features --features stable --bin stable_mutate
  set +e
  out="$(./target/release/stable_mutate "$secs" "${targets[@]}")"
  rc=$?
  set -e
  echo "$out"
  echo "$out" | awk -v s=$(( $(date +%s) - start )) '
    /^fuzz-summary/ { n++; for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "execs") e += kv[2]; if (kv[1] == "findings") f += kv[2] } }
    END { printf "fuzz-total engine=stable targets=%d execs=%d findings=%d seconds=%d\n", n, e, f, s }'
  exit $(( rc != 0 ))
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

# One build of every target (sanitizer coverage, debug assertions on).
nice cargo +nightly fuzz build --debug-assertions >/dev/null

findings_total=0
execs_total=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  log="work/$t.log"
  before=$(find "artifacts/$t" -type f | wc -l)
  set +e
  nice cargo +nightly fuzz run --debug-assertions "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -dict=dict/ma.dict -max_len=65536 \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  after=$(find "artifacts/$t" -type f | wc -l)
  findings=$(( after - before ))
  if [ "$rc" -ne 0 ] && [ "$findings" -eq 0 ]; then findings=1; fi
  if [ "$findings" -gt 0 ]; then
    echo "fuzz: $t failed (exit $rc); see fuzz/$log and fuzz/artifacts/$t" >&2
    grep -m1 -A6 -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log" >&2 || true
  fi
  corpus=$(( $(find "corpus/$t" -type f | wc -l) + $(find "work/$t" -type f | wc -l) ))
  echo "fuzz-summary target=$t engine=libfuzzer execs=${execs:-0} findings=$findings corpus=$corpus"
  execs_total=$(( execs_total + ${execs:-0} ))
  findings_total=$(( findings_total + findings ))
done
echo "fuzz-total engine=libfuzzer targets=${#targets[@]} execs=$execs_total findings=$findings_total seconds=$(( $(date +%s) - start ))"
[ "$findings_total" -eq 0 ]
