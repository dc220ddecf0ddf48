"""Soak: mixed traffic through real Envoy + the filter for N minutes, with faults and bad input.

    python -m tests.reliability.soak --minutes 10 [--workers 4] [--json out.json]

Traffic (each worker loops over a weighted mix, on its own sessions): creates (agents,
environments, vaults, sessions), reads (lists, session objects, history pages), sends
(`POST …/events` nobody streams), streams (open, send a turn, read to `session.status_idle`),
refusals (wrong key, cross-tenant ids, unknown routes, oversized bodies, bad header bytes,
unknown betas), stream faults (`emulator:fault reset|hang 2|malformed|badutf8|truncated|
hugeline 2`) and call faults (500, 529, reset, hang, truncated bodies). Every answer is
scanned for the upstream key.

Sampled every --sample-every seconds: Envoy's RSS (/proc), tcmalloc's allocated bytes
(admin /memory), the Wasm VM's linear memory and the active-stream gauge (Prometheus).

Pass criteria, all exact except memory:
- flat memory: after the warm-up (the first 20 % of the run), split the samples into four
  quarters; the median Envoy RSS of the last quarter is within FLAT_TOLERANCE (10 %) of the
  second quarter's, and the largest Wasm linear memory of the last quarter is no larger than
  the largest before it after the warm-up (linear memory never shrinks, so any growth would
  show; the gauge is the last-reporting worker's VM, so earlier quarters cover every VM);
- zero tokens lost: once every session has gone idle and been read once through the gateway,
  Prometheus `ma_gateway_tokens_total` equals the emulator's ground truth for every model and
  token type (lost = sum of |difference|);
- zero secrets leaked: the upstream key in no answer, in neither log; no client credential in
  any request the emulator received or in either log;
- every fault survived: the next ordinary call after it answered 200, Envoy never exited, and
  the active-stream gauge is 0 at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import stack

FLAT_TOLERANCE = 0.10
WARMUP_FRACTION = 0.20
HANG_BOUND_S = 3
BETA = "managed-agents-2026-04-01"
ALICE, BOB = "gw-key-soak-alice", "gw-key-soak-bob"
JUNK = "gw-key-soak-junk"
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}
MODELS = ["claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6"]
TOKEN_FIELDS = {"input": "input_tokens", "output": "output_tokens",
                "cache_read": "cache_read_input_tokens", "cache_write": "cache_creation_input_tokens"}
STREAM_FAULTS = ["reset", "hang 2", "malformed", "badutf8", "truncated", "hugeline 2"]
CALL_FAULTS = [{"status": 500}, {"status": 529}, {"kind": "reset"}, {"kind": "hang", "hold_ms": 200},
               {"kind": "truncated"}, {"kind": "truncated_json"}]
MIX = [("create", 6), ("read", 30), ("send", 8), ("stream", 20), ("refusal", 20),
       ("stream_fault", 6), ("call_fault", 6), ("leave", 4)]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    ops: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    survived: Counter = field(default_factory=Counter)
    bad_inputs: int = 0
    leaks: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class Soak:
    def __init__(self, minutes: float, workers: int, sample_every: float, seed: int):
        self.duration = minutes * 60
        self.workers = workers
        self.sample_every = sample_every
        self.rng_seed = seed
        self.tally = Tally()
        self.samples: list[dict] = []
        self.sessions: dict[str, str] = {}  # session id → tenant key
        self.sessions_lock = threading.Lock()
        self.stop = threading.Event()
        self.workdir = Path(tempfile.mkdtemp(prefix="ma-gateway-soak-"))
        self.audit_path = self.workdir / "audit.log"

    # -- the stack --------------------------------------------------------------------
    def start(self):
        self.emulator = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=1000)
        overrides = {
            "tenants": [{"name": "acme"}, {"name": "globex"}],
            "gateway_keys": [{"name": "alice", "sha256": stack.sha256_hex(ALICE), "tenant": "acme"},
                             {"name": "bob", "sha256": stack.sha256_hex(BOB), "tenant": "globex"}],
        }
        config = stack.render_envoy_config(
            upstream=self.emulator.upstream, listen_port=0,
            admin_port=0, gateway_keys={}, plugin_overrides=overrides, audit_path=self.audit_path)
        from tests.e2e.test_faults import shorten_hang_bounds

        self.envoy = stack.Envoy(config=shorten_hang_bounds(config, HANG_BOUND_S),
                                 env=stack.envoy_env(self.emulator.api_key)).start()
        self.port = self.envoy.listen_port

    def close(self):
        self.envoy.stop()
        self.emulator.stop()

    # -- client -----------------------------------------------------------------------
    def call(self, method, path, *, key=ALICE, body=None, headers=None, timeout=30, raw_body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {"anthropic-version": "2023-06-01", "anthropic-beta": BETA}
        if key:
            h["x-api-key"] = key
        payload = raw_body
        if body is not None:
            payload = json.dumps(body).encode()
            h["content-type"] = "application/json"
        h.update(headers or {})
        try:
            conn.request(method, path, body=payload, headers=h)
            resp = conn.getresponse()
            data = resp.read()
            self.scan(json.dumps(resp.getheaders()).encode() + data)
            self.tally.add(requests=1)
            return resp.status, data
        finally:
            conn.close()

    def ok(self, method, path, **kw):
        status, data = self.call(method, path, **kw)
        if status != 200:
            raise AssertionError(f"{method} {path} -> {status} {data[:300]!r}")
        return json.loads(data)

    def scan(self, answer: bytes):
        if self.emulator.api_key.encode() in answer:
            with self.tally.lock:
                self.tally.leaks.append(("answer", answer[:200]))

    def fault(self, **fault):
        req = urllib.request.Request(self.emulator.url + "/_emulator/faults", method="POST",
                                     data=json.dumps(fault).encode(), headers={"content-type": "application/json"})
        with self.emulator.urlopen(req) as resp:
            resp.read()

    def new_session(self, key: str, rng: random.Random) -> str:
        model = rng.choice(MODELS)
        agent = self.ok("POST", "/v1/agents", key=key, body={"name": "soak", "model": model})["id"]
        env = self.ok("POST", "/v1/environments", key=key, body={"name": "soak", "config": CLOUD})["id"]
        sid = self.ok("POST", "/v1/sessions", key=key, body={"agent": agent, "environment_id": env})["id"]
        with self.sessions_lock:
            self.sessions[sid] = key
        return sid

    def stream_turn(self, sid: str, key: str, text: str, *, leave_after: str | None = None):
        # One turn at a time on a streamed session: a turn still running (a client left it)
        # would end this stream's wait early and put its own fault on the next stream.
        end = time.monotonic() + 60
        while self.ok("GET", f"/v1/sessions/{sid}", key=key)["status"] != "idle":
            if time.monotonic() > end:
                raise AssertionError(f"{sid} never went idle")
            time.sleep(0.05)
        body = _open_stream(self.port, sid, key)
        self.tally.add(requests=1)
        seen = b""
        try:
            if body.status != 200:
                return "refused"
            self.ok("POST", f"/v1/sessions/{sid}/events", key=key, body={"events": [
                {"type": "user.message", "content": [{"type": "text", "text": text}]}]})
            while True:
                try:
                    chunk = body.read(256 * 1024)
                except (ConnectionResetError, OSError):
                    return "reset"
                if not chunk:
                    return body.state
                self.scan(chunk)
                seen = (seen + chunk)[-4096:]
                if leave_after and leave_after.encode() in seen:
                    return "left"
                if b"event: session.status_idle" in seen:
                    return "idle"
        finally:
            body.close()

    # -- the mix ----------------------------------------------------------------------
    def worker(self, index: int):
        rng = random.Random(self.rng_seed * 1000 + index)
        key = ALICE if index % 2 == 0 else BOB
        other = BOB if key == ALICE else ALICE
        streamed = self.new_session(key, rng)
        quiet = self.new_session(key, rng)
        ops, weights = zip(*MIX)
        while not self.stop.is_set():
            op = rng.choices(ops, weights)[0]
            try:
                getattr(self, "op_" + op)(rng, key, other, streamed, quiet)
                self.tally.add(ops=Counter({op: 1}))
            except Exception as exc:  # noqa: BLE001 - every failure is reported at the end
                with self.tally.lock:
                    self.tally.errors.append(f"{op}: {type(exc).__name__}: {exc}"[:300])
                    if len(self.tally.errors) > 200:
                        self.stop.set()

    def op_create(self, rng, key, other, streamed, quiet):
        kind = rng.choice(["agent", "environment", "vault"])
        if kind == "agent":
            self.ok("POST", "/v1/agents", key=key, body={"name": "soak-c", "model": rng.choice(MODELS)})
        elif kind == "environment":
            self.ok("POST", "/v1/environments", key=key, body={"name": "soak-c", "config": CLOUD})
        else:
            self.ok("POST", "/v1/vaults", key=key, body={"name": "soak-c"})

    def op_read(self, rng, key, other, streamed, quiet):
        path = rng.choice(["/v1/agents?limit=5", "/v1/sessions?limit=5", f"/v1/sessions/{streamed}",
                           f"/v1/sessions/{quiet}/events?limit=50", "/v1/environments?limit=5"])
        self.ok("GET", path, key=key)

    def op_send(self, rng, key, other, streamed, quiet):
        text = rng.choice(["quiet turn", "quiet turn with a tool"])
        self.ok("POST", f"/v1/sessions/{quiet}/events", key=key, body={"events": [
            {"type": "user.message", "content": [{"type": "text", "text": text}]}]})

    def op_stream(self, rng, key, other, streamed, quiet):
        ended = self.stream_turn(streamed, key, rng.choice(["hello", "please use a tool"]))
        if ended != "idle":
            raise AssertionError(f"stream ended {ended}")

    def op_leave(self, rng, key, other, streamed, quiet):
        self.stream_turn(streamed, key, "emulator:ticker 2", leave_after="event: agent.message")
        self.tally.add(faults=Counter({"client leaves mid-stream": 1}))
        self.survive("client leaves mid-stream", key)

    def op_refusal(self, rng, key, other, streamed, quiet):
        case = rng.randrange(7)
        if case == 0:
            status, _ = self.call("GET", "/v1/agents", key=JUNK)
            expected = 401
        elif case == 1:
            status, _ = self.call("GET", f"/v1/sessions/{streamed}", key=other)
            expected = 404
        elif case == 2:
            status, _ = self.call("GET", rng.choice(["/v1/messages", "/_emulator/requests", "/v1/agents/..%2F..%2F_emulator"]), key=key)
            expected = 404
        elif case == 3:
            status, _ = self.call("POST", "/v1/agents", key=key,
                                  body={"name": "x" * (2 << 20), "model": "claude-sonnet-4-6"})
            expected = 413
        elif case == 4:
            status, _ = self.call("GET", "/v1/agents", key=key, headers={"anthropic-beta": "evil-2099-01-01"})
            expected = 400
        elif case == 5:
            status, _ = self.call("GET", "/v1/agents", key=None, headers={"authorization": f"Bearer {JUNK}"})
            expected = 401
        else:
            status, _ = self.call("POST", f"/v1/sessions/{streamed}/events", key=other, body={"events": [
                {"type": "user.message", "content": [{"type": "text", "text": "not yours"}]}]})
            expected = 404
        self.tally.add(bad_inputs=1)
        if status != expected:
            raise AssertionError(f"refusal case {case}: {status} != {expected}")

    def op_stream_fault(self, rng, key, other, streamed, quiet):
        kind = rng.choice(STREAM_FAULTS)
        ended = self.stream_turn(streamed, key, f"emulator:fault {kind}")
        expected = {"reset": "reset", "hang 2": "reset"}.get(kind, "idle")
        if ended != expected:
            raise AssertionError(f"stream fault {kind} ended {ended}")
        name = f"stream {kind.split()[0]}"
        self.tally.add(faults=Counter({name: 1}))
        self.survive(name, key)

    def op_call_fault(self, rng, key, other, streamed, quiet):
        fault = rng.choice(CALL_FAULTS)
        self.fault(path_prefix=f"/v1/sessions/{quiet}", method="GET", **fault)
        try:
            self.call("GET", f"/v1/sessions/{quiet}", key=key, timeout=HANG_BOUND_S * 5)
        except (http.client.IncompleteRead, ConnectionError, http.client.RemoteDisconnected):
            pass
        name = "call " + (str(fault["status"]) if "status" in fault else fault["kind"])
        self.tally.add(faults=Counter({name: 1}))
        self.survive(name, key)

    def survive(self, name: str, key: str):
        status, _ = self.call("GET", "/v1/agents?limit=1", key=key)
        if status == 200 and self.envoy.proc.poll() is None:
            self.tally.add(survived=Counter({name: 1}))

    # -- sampling ---------------------------------------------------------------------
    def prometheus(self) -> dict:
        out = {}
        for line in self.envoy.admin("/stats/prometheus").splitlines():
            m = re.fullmatch(r"(ma_gateway_\w+)(?:\{(.*)\})? (\S+)", line)
            if m:
                out[(m.group(1), frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))] = float(m.group(3))
        return out

    def sample(self, t0: float):
        rss = 0
        for line in open(f"/proc/{self.envoy.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        memory = json.loads(self.envoy.admin("/memory"))
        prom = self.prometheus()
        self.samples.append({
            "t": round(time.monotonic() - t0, 1), "rss": rss, "allocated": int(memory["allocated"]),
            "wasm": int(prom.get(("ma_gateway_wasm_memory_bytes", frozenset()), 0)),
            "streams": int(prom.get(("ma_gateway_active_streams", frozenset()), 0)),
        })

    def sampler(self, t0: float):
        while not self.stop.wait(self.sample_every):
            try:
                self.sample(t0)
            except Exception as exc:  # noqa: BLE001
                self.tally.errors.append(f"sample: {exc}")

    # -- the run ----------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        self.sample(t0)
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.workers)]
        sampler = threading.Thread(target=self.sampler, args=(t0,), daemon=True)
        for t in threads:
            t.start()
        sampler.start()
        last_drain = time.monotonic()
        upstream_checked = 0
        while time.monotonic() - t0 < self.duration and not self.stop.is_set():
            self.stop.wait(min(5, max(0.1, self.duration - (time.monotonic() - t0))))
            if time.monotonic() - last_drain > 20:
                upstream_checked += self.check_upstream()
                last_drain = time.monotonic()
            if self.envoy.proc.poll() is not None:
                self.tally.errors.append(f"envoy exited with {self.envoy.proc.returncode}")
                break
        self.stop.set()
        for t in threads:
            t.join(60)
        sampler.join(10)
        self.sample(t0)
        upstream_checked += self.check_upstream()
        return self.verdict(t0, upstream_checked)

    def check_upstream(self) -> int:
        """No client credential in what the emulator received (its log is then cleared)."""
        requests = self.emulator.requests()
        self.emulator.clear_requests()
        for r in requests:
            names = [n for n, _ in r["headers"]]
            text = r["path"] + " ".join(v for _, v in r["headers"])
            for secret in (ALICE, BOB, JUNK):
                if secret in text:
                    self.tally.leaks.append(("upstream", r["path"]))
            for name in ("authorization", "proxy-authorization", "cookie"):
                if name in names:
                    self.tally.leaks.append(("upstream header", name))
            if [v for n, v in r["headers"] if n == "x-api-key"] != [self.emulator.api_key]:
                self.tally.leaks.append(("upstream key", r["path"]))
            if not r["path"].startswith("/v1/"):
                self.tally.leaks.append(("outside /v1", r["path"]))
        return len(requests)

    def settle_and_count_tokens(self) -> tuple[int, dict]:
        """Waits for every session to go idle, reads each once, compares tokens to the truth."""
        truth = defaultdict(int)
        end = time.monotonic() + 180
        for sid, key in sorted(self.sessions.items()):
            while True:
                session = self.ok("GET", f"/v1/sessions/{sid}", key=key)
                if session["status"] == "idle" or time.monotonic() > end:
                    break
                time.sleep(0.1)
            # A last read after idle: the snapshot is final.
            self.ok("GET", f"/v1/sessions/{sid}", key=key)
            t = self.emulator.usage(sid) if self._has_truth(sid) else None
            if t:
                for kind, f in TOKEN_FIELDS.items():
                    truth[(t["model"], kind)] += t[f]
        prom = self.prometheus()
        counted = defaultdict(int)
        for (name, labels), value in prom.items():
            if name == "ma_gateway_tokens_total":
                d = dict(labels)
                counted[(d["model"], d["type"])] += int(value)
        lost = sum(abs(counted[k] - truth[k]) for k in set(truth) | set(counted))
        detail = {f"{m}/{k}": {"truth": truth[(m, k)], "counted": counted[(m, k)]}
                  for (m, k) in sorted(set(truth) | set(counted))}
        return lost, detail

    def _has_truth(self, sid: str) -> bool:
        try:
            self.emulator.usage(sid)
            return True
        except urllib.error.HTTPError:
            return False

    def verdict(self, t0: float, upstream_checked: int) -> dict:
        lost, tokens = self.settle_and_count_tokens()
        self.tally.add(requests=0)
        prom = self.prometheus()
        streams_open = int(prom.get(("ma_gateway_active_streams", frozenset()), 0))
        logs = self.envoy.log() + (self.audit_path.read_text() if self.audit_path.exists() else "")
        for secret in (self.emulator.api_key, ALICE, BOB, JUNK):
            if secret in logs:
                self.tally.leaks.append(("log", secret[:12] + "…"))
        upstream_checked += self.check_upstream()
        post = [s for s in self.samples if s["t"] >= self.duration * WARMUP_FRACTION]
        q = max(1, len(post) // 4)
        second, last = post[q:2 * q], post[-q:]
        rss2 = statistics.median(s["rss"] for s in second) if second else 0
        rss4 = statistics.median(s["rss"] for s in last) if last else 0
        # `ma_gateway_wasm_memory_bytes` is the linear memory of whichever worker's VM logged
        # last, and the VMs differ by a page or so: compare the last quarter with everything
        # after the warm-up before it (Q1–Q3), so a VM that merely reported late is not growth.
        # Linear memory never shrinks, so a leak still shows as a larger value at the end.
        wasm2 = max((s["wasm"] for s in post[:-q]), default=0) if len(post) > q else 0
        wasm4 = max((s["wasm"] for s in last), default=0)
        flat = bool(second) and rss4 <= rss2 * (1 + FLAT_TOLERANCE) and wasm4 <= wasm2
        faults = sum(self.tally.faults.values())
        survived = sum(self.tally.survived.values())
        served = int(json.loads(self.envoy.admin("/stats?format=json&filter=^http.managed_agents.downstream_rq_completed$"))
                     ["stats"][0]["value"])
        report = {
            "minutes": round((time.monotonic() - t0) / 60, 2),
            "workers": self.workers,
            "requests_sent": self.tally.requests,
            "requests_served": served,
            "operations": dict(self.tally.ops),
            "faults_injected": faults,
            "faults_survived": survived,
            "faults": {k: [v, self.tally.survived[k]] for k, v in sorted(self.tally.faults.items())},
            "bad_inputs": self.tally.bad_inputs,
            "sessions": len(self.sessions),
            "tokens_lost": lost,
            "tokens": tokens,
            "tokens_counted": sum(v["counted"] for v in tokens.values()),
            "secrets_leaked": len(self.tally.leaks),
            "leaks": [str(x) for x in self.tally.leaks[:20]],
            "upstream_requests_checked": upstream_checked,
            "active_streams_at_end": streams_open,
            "errors": self.tally.errors[:50],
            "error_count": len(self.tally.errors),
            "memory": {
                "rss_start": self.samples[0]["rss"], "rss_end": self.samples[-1]["rss"],
                "rss_median_q2": int(rss2), "rss_median_q4": int(rss4),
                "rss_growth_pct": round(100 * (rss4 - rss2) / rss2, 2) if rss2 else None,
                "wasm_max_q2": wasm2, "wasm_max_q4": wasm4,
                "allocated_start": self.samples[0]["allocated"], "allocated_end": self.samples[-1]["allocated"],
                "samples": len(self.samples), "flat": flat,
            },
            "samples": self.samples,
        }
        report["passed"] = (flat and lost == 0 and not self.tally.leaks and survived == faults
                            and streams_open == 0 and not self.tally.errors)
        return report


def _open_stream(port: int, sid: str, key: str):
    from tests.e2e import test_faults

    body = test_faults.ChunkedBody.__new__(test_faults.ChunkedBody)
    import socket

    body.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"GET /v1/sessions/{sid}/events/stream HTTP/1.1\r\nhost: gateway\r\nx-api-key: {key}\r\n"
            f"anthropic-beta: {BETA}\r\nanthropic-version: 2023-06-01\r\n\r\n")
    body.sock.sendall(head.encode())
    body.file = body.sock.makefile("rb")
    body.status = int(body.file.readline().split()[1])
    body.headers = {}
    while True:
        line = body.file.readline().rstrip(b"\r\n")
        if not line:
            break
        name, _, value = line.partition(b":")
        body.headers[name.strip().lower().decode()] = value.strip().decode()
    body.left = 0
    body.state = "open" if body.headers.get("transfer-encoding") == "chunked" else "eof"
    return body


def table(report: dict) -> str:
    m = report["memory"]
    rows = [
        ("duration", f"{report['minutes']} min, {report['workers']} workers"),
        ("requests served", f"{report['requests_served']:,} (client requests sent: {report['requests_sent']:,})"),
        ("faults injected / survived", f"{report['faults_injected']} / {report['faults_survived']}"),
        ("bad inputs tried", f"{report['bad_inputs']:,}"),
        ("tokens counted / lost", f"{report['tokens_counted']:,} / {report['tokens_lost']}"),
        ("secrets leaked", f"{report['secrets_leaked']} ({report['upstream_requests_checked']:,} upstream requests checked)"),
        ("Envoy RSS (median Q2 → Q4)", f"{m['rss_median_q2'] / 2**20:.1f} MiB → {m['rss_median_q4'] / 2**20:.1f} MiB ({m['rss_growth_pct']} %)"),
        ("Wasm linear memory (max Q1–Q3 → Q4)", f"{m['wasm_max_q2']:,} B → {m['wasm_max_q4']:,} B"),
        ("memory flat", "yes" if m["flat"] else "NO"),
        ("active streams at end", str(report["active_streams_at_end"])),
        ("errors", str(report["error_count"])),
        ("result", "PASS" if report["passed"] else "FAIL"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    faults = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in report["faults"].items())
    return "\n".join(lines) + f"\n\nfaults (injected/survived): {faults}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sample-every", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sample_every = args.sample_every or (5.0 if args.minutes >= 5 else 2.0)
    soak = Soak(args.minutes, args.workers, sample_every, args.seed)
    soak.start()
    try:
        report = soak.run()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        soak.close()
    print(table(report))
    if report["errors"]:
        print("errors:\n  " + "\n  ".join(report["errors"][:20]))
    if report["leaks"]:
        print("leaks:\n  " + "\n  ".join(report["leaks"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
