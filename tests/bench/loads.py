"""Load generators: wrk (HTTP/1.1), h2load (HTTP/2), and raw-socket SSE clients.

Every measurement is bounded in time; failures come back as `{"error": ...}` so that one arm
that cannot do one thing never stops the run.
"""

from __future__ import annotations

import http.client
import json
import re
import selectors
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.arms import Arm

WRK = "/usr/bin/wrk"
H2LOAD = "/usr/bin/h2load"

# ------------------------------------------------------------------------------------------
# JSON calls


def call(arm: Arm, method: str, path: str, body=None, timeout: float = 30) -> tuple[int, dict | None]:
    conn = http.client.HTTPConnection("127.0.0.1", arm.port, timeout=timeout)
    headers = dict(arm.headers)
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    try:
        conn.request(method, arm.prefix + path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, {"raw": raw[:300].decode(errors="replace")}
    finally:
        conn.close()


def ok(arm: Arm, method: str, path: str, body=None) -> dict:
    status, reply = call(arm, method, path, body)
    if status != 200:
        raise RuntimeError(f"{arm.name} {method} {path} -> {status} {str(reply)[:300]}")
    return reply or {}


def send_text(arm: Arm, sid: str, text: str):
    ok(arm, "POST", f"/v1/sessions/{sid}/events",
       {"events": [{"type": "user.message", "content": [{"type": "text", "text": text}]}]})


# ------------------------------------------------------------------------------------------
# Workload 1: non-streaming calls

WRK_SCRIPT = """
wrk.method = "GET"
{headers}
{delay}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"errors\\":%d,\\"status_errors\\":%d," ..
    "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"mean_us\\":%.1f}}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def wrk(arm: Arm, path: str, *, seconds: float, connections: int, delay_ms: float | None) -> dict:
    """HTTP/1.1 keep-alive load; `delay_ms` paces each connection (fixed rate below saturation)."""
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in arm.headers.items())
    delay = f"function delay() return {delay_ms} end" if delay_ms else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(headers=headers, delay=delay))
    cpu0 = arm.cpu_seconds()
    try:
        out = subprocess.run(
            [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
             "-s", script.name, f"http://127.0.0.1:{arm.port}{arm.prefix}{path}"],
            capture_output=True, text=True, timeout=seconds + 30,
        )
    except subprocess.TimeoutExpired:
        return {"error": "wrk did not finish"}
    finally:
        Path(script.name).unlink(missing_ok=True)
    match = re.search(r"BENCHJSON (\{.*\})", out.stdout)
    if not match:
        return {"error": f"wrk: {(out.stdout + out.stderr).strip()[-300:]}"}
    res = json.loads(match.group(1))
    res["rps"] = res["requests"] / max(res["duration_us"] / 1e6, 1e-9)
    cpu_per_request(res, arm, cpu0)
    if res["requests"] == 0 or res["status_errors"] > res["requests"] // 100:
        res["error"] = f"{res['status_errors']} non-2xx of {res['requests']} requests"
    return res


def h2load(arm: Arm, path: str, *, seconds: float, clients: int, streams: int, rps: float | None) -> dict:
    """HTTP/2 (prior knowledge) load; with `rps` each client is paced, and percentiles come
    from h2load's per-request log."""
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        pass
    args = [H2LOAD, "-t1", f"-c{clients}", f"-m{streams}", f"-D{max(1, round(seconds))}",
            "--log-file", log.name]
    if rps:
        args.append(f"--rps={rps}")
    for k, v in arm.headers.items():
        args += ["-H", f"{k}: {v}"]
    args.append(f"http://127.0.0.1:{arm.port}{arm.prefix}{path}")
    cpu0 = arm.cpu_seconds()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30)
        lat, ok2xx, total = [], 0, 0
        for line in Path(log.name).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                total += 1
                if parts[1].startswith("2"):
                    ok2xx += 1
                    lat.append(int(parts[2]))
    except subprocess.TimeoutExpired:
        return {"error": "h2load did not finish"}
    finally:
        Path(log.name).unlink(missing_ok=True)
    match = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out.stdout)
    if not match or not lat:
        return {"error": f"h2load: {(out.stdout + out.stderr).strip()[-300:]}"}
    lat.sort()
    res = {
        "rps": float(match.group(2)),
        "requests": total,
        "p50_us": percentile(lat, 50),
        "p90_us": percentile(lat, 90),
        "p99_us": percentile(lat, 99),
        "mean_us": statistics.fmean(lat),
    }
    cpu_per_request(res, arm, cpu0)
    if ok2xx < total * 0.99:
        res["error"] = f"{total - ok2xx} non-2xx of {total} requests"
    return res


def cpu_per_request(res: dict, arm: Arm, cpu0: float | None):
    """CPU µs the arm's process spent per request: robust where latency is not (a shared box)."""
    cpu1 = arm.cpu_seconds()
    if cpu0 is not None and cpu1 is not None and res.get("requests"):
        res["cpu_us"] = (cpu1 - cpu0) * 1e6 / res["requests"]


def percentile(sorted_values: list, pct: float):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# ------------------------------------------------------------------------------------------
# SSE


class Stream:
    """An open event stream on a raw socket (HTTP/1.1, chunked): headers read, body pending."""

    def __init__(self, arm: Arm, sid: str, timeout: float = 30, suffix: str = "events/stream"):
        self.sock = socket.create_connection(("127.0.0.1", arm.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lines = [f"GET {arm.prefix}/v1/sessions/{sid}/{suffix} HTTP/1.1", "host: 127.0.0.1",
                 "accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in arm.headers.items()]
        self.sent_at = time.perf_counter()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.pending = b""
        self.status = None

    def read_headers(self):
        """Reads the status line and headers; keeps whatever body bytes came with them."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"stream closed before headers: {buf[:200]!r}")
            buf += chunk
        head, self.pending = buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])
        self.headers_at = time.perf_counter()
        if self.status != 200:
            raise RuntimeError(f"stream answered {self.status}: {(head + self.pending)[:300]!r}")
        return self

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


IDLE = b"event: session.status_idle"


def sse_throughput(arm: Arm, control: Arm, sid: str, *, turns: int, events: int, kib: int,
                   timeout: float) -> dict:
    """Opens a stream on `arm`, queues `turns` bulk turns (via `control`, the emulator), reads
    until every turn has gone idle; MB/s from the first body byte to the last idle event."""
    stream = Stream(arm, sid, timeout=timeout)
    try:
        stream.read_headers()
        for _ in range(turns):
            send_text(control, sid, f"emulator:large {events} {kib}")
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total, seen, tail, first = len(stream.pending), 0, stream.pending[-64:], None
        seen += stream.pending.count(IDLE)
        if stream.pending:
            first = time.perf_counter()
        deadline = time.monotonic() + timeout
        while seen < turns:
            if time.monotonic() > deadline:
                return {"error": f"timed out after {timeout} s ({total} bytes, {seen}/{turns} turns idle)"}
            n = stream.sock.recv_into(buf)
            if n == 0:
                return {"error": f"stream ended early ({total} bytes)"}
            if first is None:
                first = time.perf_counter()
            total += n
            joined = tail + bytes(view[:n])
            seen += joined.count(IDLE)
            tail = joined[-(len(IDLE) - 1):]
        elapsed = time.perf_counter() - first
        return {"bytes": total, "seconds": elapsed, "mb_s": total / 1e6 / max(elapsed, 1e-9)}
    except (OSError, RuntimeError) as exc:
        return {"error": str(exc)[:300]}
    finally:
        stream.close()


def first_event(arm: Arm, control: Arm, sid: str, timeout: float = 15) -> dict:
    """Time from sending the stream request to the first event frame, where the event is
    produced (POST via the emulator) as soon as the stream's headers arrive."""
    stream = Stream(arm, sid, timeout=timeout)
    try:
        stream.read_headers()
        send_text(control, sid, "hello")
        data = stream.pending
        while b"event: " not in data:
            chunk = stream.sock.recv(65536)
            if not chunk:
                return {"error": "stream ended before the first event"}
            data += chunk
        now = time.perf_counter()
        return {"open_ms": (stream.headers_at - stream.sent_at) * 1e3,
                "first_event_ms": (now - stream.sent_at) * 1e3}
    except (OSError, RuntimeError) as exc:
        return {"error": str(exc)[:300]}
    finally:
        stream.close()


TICK = re.compile(rb"tick (\d+) sent_at_ms (\d+)")


def ticker_all(arms: list[Arm], control: Arm, sid: str, ticks: int) -> dict[str, dict]:
    """Low-rate delivery: one session emits `ticks` events one second apart; every arm holds a
    stream on that same session, so each tick reaches all arms at once. Per arm: delay after
    the emulator's wall-clock stamp (ms resolution) and delay after the same tick reached the
    direct (A0) stream (µs resolution, the figure that isolates what the arm adds)."""
    streams: dict[str, Stream] = {}
    result: dict[str, dict] = {}
    sel = selectors.DefaultSelector()
    try:
        for arm in arms:
            try:
                streams[arm.name] = Stream(arm, sid).read_headers()
            except (OSError, RuntimeError) as exc:
                result[arm.name] = {"error": str(exc)[:300]}
        arrivals: dict[str, dict[int, float]] = {name: {} for name in streams}
        stamp_delay: dict[str, list[float]] = {name: [] for name in streams}
        bufs = {name: s.pending for name, s in streams.items()}
        for name, s in streams.items():
            s.sock.setblocking(False)
            sel.register(s.sock, selectors.EVENT_READ, name)
        send_text(control, sid, f"emulator:ticker {ticks}")
        deadline = time.monotonic() + ticks + 15
        while time.monotonic() < deadline and any(len(v) < ticks for v in arrivals.values()):
            ready = sel.select(timeout=1)
            now_perf, now_wall = time.perf_counter(), time.time()
            for key, _ in ready:
                name = key.data
                try:
                    chunk = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[name] += chunk
                for m in TICK.finditer(bufs[name]):
                    i = int(m.group(1))
                    if i not in arrivals[name]:
                        arrivals[name][i] = now_perf
                        stamp_delay[name].append(now_wall * 1e3 - int(m.group(2)))
                bufs[name] = bufs[name][-256:]
        base = arrivals.get("A0", {})
        for name in streams:
            got = arrivals[name]
            rel = [(got[i] - base[i]) * 1e6 for i in got if i in base and i > 1]
            if len(got) < ticks:
                result[name] = {"error": f"{len(got)}/{ticks} ticks arrived"}
                continue
            stamp = sorted(stamp_delay[name][1:])
            result[name] = {
                "ticks": len(got),
                "stamp_p50_ms": percentile(stamp, 50),
                "stamp_max_ms": stamp[-1] if stamp else None,
                "vs_a0_p50_us": percentile(sorted(rel), 50) if rel else None,
                "vs_a0_max_us": max(rel) if rel else None,
            }
    finally:
        sel.close()
        for s in streams.values():
            s.close()
    return result


def open_many(arm: Arm, sids: list[str], count: int, timeout: float = 120) -> tuple[list[Stream], str | None]:
    """Opens `count` streams spread over `sids`, and waits until each has its 200 headers."""
    streams: list[Stream] = []
    deadline = time.monotonic() + timeout
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                return streams, f"only {len(streams)} of {count} streams opened within {timeout} s"
            streams.append(Stream(arm, sids[i % len(sids)], timeout=max(1.0, deadline - time.monotonic())))
        for s in streams:
            s.sock.settimeout(max(1.0, deadline - time.monotonic()))
            s.read_headers()
    except (OSError, RuntimeError) as exc:
        return streams, f"after {len(streams)} streams: {str(exc)[:300]}"
    return streams, None


def drain(streams: list[Stream]):
    """Reads whatever heartbeats are waiting, so no stream looks stalled to the emulator."""
    for s in streams:
        s.sock.setblocking(False)
        try:
            while s.sock.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass
