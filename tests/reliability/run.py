"""The reliability run: the fault and security e2e tests, then the soak; writes
target/reliability/report.md with the figures the README quotes.

    python -m tests.reliability.run           # soak of 10 minutes (`make reliability`)
    python -m tests.reliability.run --short   # soak of 60 seconds (`make reliability-short`)

Needs the built artifacts (`make build`) and the venv (`make venv`). Exit status 0 only when
every test passed and the soak passed (flat memory, 0 tokens lost, 0 secrets leaked, every
fault survived).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tests.harness import stack
from tests.reliability.soak import table

ROOT = stack.ROOT
OUT = ROOT / "target" / "reliability"
E2E = ["tests/e2e/test_faults.py", "tests/e2e/test_leaks.py", "tests/e2e/test_security.py",
       "tests/e2e/test_isolation.py"]


def run_e2e(counts_path: Path, junit: Path) -> dict:
    counts_path.write_text("")
    env = dict(os.environ, MA_RELIABILITY_COUNTS=str(counts_path))
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *E2E], cwd=ROOT, env=env)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failures, errors = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors"))
    skipped = int(suite.get("skipped", 0))
    rows = [json.loads(line) for line in counts_path.read_text().splitlines() if line.strip()]
    faults = Counter()
    for r in rows:
        if r["suite"] == "faults":
            faults[r["fault"]] += r["injected"]
    leaks = [r for r in rows if r["suite"] == "leaks"]
    return {
        "returncode": proc.returncode, "tests": tests, "failed": failures + errors, "skipped": skipped,
        "seconds": round(time.monotonic() - began, 1),
        "faults_injected": sum(faults.values()), "faults": dict(faults),
        "bad_inputs": sum(r["bad_inputs"] for r in leaks),
        "secrets_leaked": sum(r["secrets_leaked"] for r in leaks),
    }


def run_soak(minutes: float, json_path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.soak", "--minutes", str(minutes),
                           "--json", str(json_path)], cwd=ROOT)
    if not json_path.exists():
        return {"passed": False, "returncode": proc.returncode}
    report = json.loads(json_path.read_text())
    report["returncode"] = proc.returncode
    return report


def render(e2e: dict, soak: dict, short: bool) -> str:
    ok = e2e["returncode"] == 0 and soak.get("passed", False)
    m = soak.get("memory", {})
    lines = [
        "# Reliability report",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{'short' if short else 'full'} run: {'PASS' if ok else 'FAIL'}",
        "",
        "| measure | fault/security e2e | soak | total |",
        "|---|---:|---:|---:|",
        f"| requests served | — | {soak.get('requests_served', 0):,} | {soak.get('requests_served', 0):,} |",
        f"| faults injected / survived | {e2e['faults_injected']} / {e2e['faults_injected'] if e2e['failed'] == 0 else '—'} "
        f"| {soak.get('faults_injected', 0)} / {soak.get('faults_survived', 0)} "
        f"| {e2e['faults_injected'] + soak.get('faults_injected', 0)} |",
        f"| bad inputs tried | {e2e['bad_inputs']} | {soak.get('bad_inputs', 0):,} "
        f"| {e2e['bad_inputs'] + soak.get('bad_inputs', 0):,} |",
        f"| tokens lost | 0 of every case asserted exactly | {soak.get('tokens_lost', '—')} of "
        f"{soak.get('tokens_counted', 0):,} | {soak.get('tokens_lost', '—')} |",
        f"| secrets leaked | {e2e['secrets_leaked']} | {soak.get('secrets_leaked', '—')} "
        f"| {e2e['secrets_leaked'] + soak.get('secrets_leaked', 0)} |",
        "",
        f"e2e ({', '.join(E2E)}): {e2e['tests']} tests, {e2e['failed']} failed, {e2e['skipped']} skipped, "
        f"{e2e['seconds']} s. Faults: " + ", ".join(f"{k} {v}" for k, v in sorted(e2e["faults"].items())) + ".",
        "",
        f"Soak: {soak.get('minutes', 0)} min, {soak.get('workers', 0)} workers; Envoy RSS median "
        f"{m.get('rss_median_q2', 0) / 2**20:.1f} MiB (2nd quarter after warm-up) → "
        f"{m.get('rss_median_q4', 0) / 2**20:.1f} MiB (last quarter), {m.get('rss_growth_pct')} %; Wasm linear "
        f"memory {m.get('wasm_max_q2', 0):,} B → {m.get('wasm_max_q4', 0):,} B; flat: {m.get('flat')}.",
        "",
        "## Soak detail",
        "",
        table(soak) if "memory" in soak else "(the soak did not produce a report)",
    ]
    if soak.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e}" for e in soak["errors"][:20]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="60-second soak")
    parser.add_argument("--minutes", type=float, default=None, help="soak length (default 10, short 1)")
    args = parser.parse_args(argv)
    for artifact in (stack.WASM, stack.EMULATOR):
        if not artifact.exists():
            print(f"{artifact} is missing: run `make build` first", file=sys.stderr)
            return 2
    OUT.mkdir(parents=True, exist_ok=True)
    minutes = args.minutes or (1 if args.short else 10)
    e2e = run_e2e(OUT / "counts.jsonl", OUT / "e2e.xml")
    soak = run_soak(minutes, OUT / "soak.json")
    report = render(e2e, soak, args.short)
    (OUT / "report.md").write_text(report)
    print(report)
    print(f"written: {OUT / 'report.md'}")
    return 0 if e2e["returncode"] == 0 and soak.get("passed", False) else 1


if __name__ == "__main__":
    sys.exit(main())
