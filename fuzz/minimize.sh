#!/usr/bin/env bash
# Folds what fuzzing found (fuzz/work/<t>) into the committed corpus (fuzz/corpus/<t>),
# minimized: libFuzzer's set-cover merge keeps a small set of inputs with the same coverage.
# The hand-made seeds (seed-*, from seeds/make_seeds.py) and regression inputs (regress-*)
# are always kept. To keep the repository small, merged inputs are cut to MAX_LEN bytes
# (default 1024) and, past BUDGET bytes per target (default 140000), the largest are dropped.
#
#   fuzz/minimize.sh [TARGET...]      (nightly + cargo-fuzz; default every target)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -vx -e ma-gateway-fuzz -e stable_mutate)
fi
max_len="${MAX_LEN:-1024}"
budget="${BUDGET:-140000}"
nice cargo +nightly fuzz build --debug-assertions >/dev/null
for t in "${targets[@]}"; do
  new="work/$t.min"
  rm -rf "$new" && mkdir -p "$new" "work/$t"
  nice "target/x86_64-unknown-linux-gnu/release/$t" -set_cover_merge=1 -max_len="$max_len" -timeout=10 \
    -rss_limit_mb=2048 "$new" "corpus/$t" "work/$t" >"work/$t.merge.log" 2>&1
  find "corpus/$t" -type f ! -name 'seed-*' ! -name 'regress-*' -delete
  # libFuzzer names inputs by their SHA-1; the seeds keep their names and are not copied twice.
  seeds="$(find "corpus/$t" -type f -name 'seed-*' -exec sha1sum {} + | awk '{ print $1 }')"
  for f in "$new"/*; do
    [ -e "$f" ] || continue
    name="$(basename "$f")"
    grep -qx "$name" <<<"$seeds" || cp "$f" "corpus/$t/$name"
  done
  rm -rf "$new"
  total=$(cat "corpus/$t"/* | wc -c)
  while [ "$total" -gt "$budget" ]; do
    largest="$(find "corpus/$t" -type f ! -name 'seed-*' ! -name 'regress-*' -printf '%s %p\n' | sort -n | tail -1)"
    [ -n "$largest" ] || break
    rm -f "${largest#* }"
    total=$(( total - ${largest%% *} ))
  done
  echo "corpus $t: $(find "corpus/$t" -type f | wc -l) files, $(cat "corpus/$t"/* | wc -c) bytes"
done
echo "corpus total: $(find corpus -type f | wc -l) files, $(find corpus -type f -exec cat {} + | wc -c) bytes"
