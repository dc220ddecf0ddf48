"""What the on-the-wire design costs, measured in the same run (part of `make bench` and of the
smoke run): the gateway asks the upstream for `identity` so it can read every body, and holds a
request's head until an inspected body is decided.

- Upstream-leg bytes: the same responses fetched from the (compressing, plaintext) emulator
  with `identity` (what the gateway asks for) and with what the SDKs offer (`gzip, deflate`)
  or `br`: a list page of 100 agents, a 1000-event history page, an SSE turn.
- SSE delay: time from sending a message to its first streamed event through the gateway,
  client offering `gzip, deflate` vs `identity` (the gateway makes both identity upstream).
- CPU: Envoy CPU per inspected create (`POST /v1/agents`, policy + tagging) with the head held
  (shipped: `allow_on_headers_stop_iteration` + `hold_request_head`) vs not held, interleaved
  rounds, same emulator, wrk HTTP/1.1 keep-alive.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.bench import arms as A
from tests.bench.loads import WRK
from tests.e2e import wire
from tests.harness import stack

CREATE_BODY = json.dumps({"name": "bench", "model": "claude-sonnet-4-6"})
WRK_POST = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["content-type"] = "application/json"
{headers}
local statuses = 0
response = function(status, headers, body) if status ~= 200 then statuses = statuses + 1 end end
done = function(summary, latency, requests)
  io.write(string.format("BENCHJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d}}\\n",
    summary.requests, summary.duration, summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
end
"""
POLICY = {"policy": {"tenants": {"*": {"models": {"allow": ["claude-sonnet-4-*"]}}}},
          "metering": {"reconcile_interval_secs": 0}}


def _direct(emulator: stack.Emulator, path: str, offer: str, body=None, method="GET") -> bytes:
    headers = {**A.direct_headers(emulator), "accept-encoding": offer, "content-type": "application/json"}
    req = urllib.request.Request(emulator.url + path, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    with emulator.urlopen(req, timeout=30) as resp:
        return resp.read()


def _gateway(emulator: stack.Emulator, *, hold: bool) -> A.Arm:
    overrides = dict(POLICY)
    overrides["isolation"] = {"hold_request_head": hold}
    config = stack.render_envoy_config(upstream=emulator.upstream, listen_port=0, admin_port=0,
                                       gateway_keys={"bench": A.GATEWAY_KEY}, plugin_overrides=overrides)
    if not hold:
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
        wasm.pop("allow_on_headers_stop_iteration", None)
    return A.envoy_arm("hold" if hold else "no-hold", "", config, emulator, gateway=True)


def _wrk_post(arm: A.Arm, seconds: float) -> dict:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in arm.headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_POST.format(body=CREATE_BODY, headers=headers))
    cpu0 = arm.cpu_seconds()
    try:
        out = subprocess.run([WRK, "-t1", "-c4", f"-d{max(1, round(seconds))}s",
                              "--timeout", "5s", "-s", script.name, f"http://127.0.0.1:{arm.port}/v1/agents"],
                             capture_output=True, text=True, timeout=seconds + 30)
    finally:
        Path(script.name).unlink(missing_ok=True)
    match = re.search(r"BENCHJSON (\{.*\})", out.stdout)
    if not match:
        return {"error": (out.stdout + out.stderr).strip()[-300:]}
    res = json.loads(match.group(1))
    cpu1 = arm.cpu_seconds()
    res["rps"] = res["requests"] / max(res["duration_us"] / 1e6, 1e-9)
    if cpu0 is not None and cpu1 is not None and res["requests"]:
        res["cpu_us"] = (cpu1 - cpu0) * 1e6 / res["requests"]
    return res


def _first_event_ms(arm: A.Arm, offer: str) -> float:
    agent = json.loads(wire.http1(arm.port, "POST", "/v1/agents", {**arm.headers, "content-type": "application/json"},
                                  wire.Body([CREATE_BODY.encode()]), chunked=False).body)["id"]
    env = json.loads(wire.http1(arm.port, "POST", "/v1/environments", {**arm.headers, "content-type": "application/json"},
                                wire.Body([json.dumps({"name": "e", "config": {"type": "cloud", "networking": {
                                    "type": "unrestricted"}}}).encode()]), chunked=False).body)["id"]
    sid = json.loads(wire.http1(arm.port, "POST", "/v1/sessions", {**arm.headers, "content-type": "application/json"},
                                wire.Body([json.dumps({"agent": agent, "environment_id": env}).encode()]),
                                chunked=False).body)["id"]
    opened, box = threading.Event(), {}

    def read():
        box["reply"] = wire.stream_until(arm.port, f"/v1/sessions/{sid}/events/stream",
                                         {**arm.headers, "accept-encoding": offer}, b"session.status_running",
                                         protocol="h1", opened=opened)
        box["at"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    opened.wait(15)
    sent = time.monotonic()
    wire.http1(arm.port, "POST", f"/v1/sessions/{sid}/events", {**arm.headers, "content-type": "application/json"},
               wire.Body([json.dumps({"events": [{"type": "user.message", "content": [
                   {"type": "text", "text": "hi"}]}]}).encode()]), chunked=False)
    reader.join(20)
    return (box.get("at", sent) - sent) * 1000


def run(*, smoke: bool) -> dict:
    """Every figure of the section; `errors` lists what could not be measured."""
    out: dict = {"errors": []}
    emulator = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=0, tls=False,
                              compression="auto", chunking="plain", extra_args=["--event-delay-ms", "0"])
    arms: list[A.Arm] = []
    try:
        # Upstream-leg bytes: identical content, three offers.
        for i in range(100):
            _direct(emulator, "/v1/agents", "identity", {"name": f"agent-{i}", "model": "claude-sonnet-4-6",
                                                         "description": "a bench agent " * 4}, method="POST")
        agent = _direct(emulator, "/v1/agents?limit=1", "identity")
        agent_id = json.loads(agent)["data"][0]["id"]
        env = json.loads(_direct(emulator, "/v1/environments", "identity",
                                 {"name": "e", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}},
                                 method="POST"))["id"]
        sid = json.loads(_direct(emulator, "/v1/sessions", "identity",
                                 {"agent": agent_id, "environment_id": env}, method="POST"))["id"]
        for turn in range(3 if smoke else 20):
            _direct(emulator, f"/v1/sessions/{sid}/events", "identity", {"events": [
                {"type": "user.message", "content": [{"type": "text", "text": f"turn {turn} please use a tool"}]}]},
                method="POST")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = json.loads(_direct(emulator, f"/v1/sessions/{sid}/events?limit=1000", "identity"))
            if sum(e["type"] == "session.status_idle" for e in page["data"]) >= (3 if smoke else 20):
                break
            time.sleep(0.1)
        sizes = {}
        for kind, path in (("list page (100 agents)", "/v1/agents?limit=100"),
                           ("history page", f"/v1/sessions/{sid}/events?limit=1000")):
            sizes[kind] = {offer: len(_wire_bytes(emulator, path, offer)) for offer in ("identity", "gzip, deflate", "br")}
        out["bytes"] = sizes

        # SSE delay and CPU: the gateway with and without the head hold.
        arms = [_gateway(emulator, hold=True), _gateway(emulator, hold=False)]
        for arm in arms:
            if not arm.ok:
                out["errors"].append(f"{arm.name}: {arm.error}")
        if all(a.ok for a in arms):
            first = {offer: [] for offer in ("gzip, deflate", "identity")}
            for _ in range(1 if smoke else 5):
                for offer in first:
                    first[offer].append(_first_event_ms(arms[0], offer))
            out["first_event_ms"] = {k: statistics.median(v) for k, v in first.items()}
            rounds: dict[str, list] = {a.name: [] for a in arms}
            for r in range(1 if smoke else 3):
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    res = _wrk_post(arm, 1 if smoke else 3)
                    if "error" in res:
                        out["errors"].append(f"{arm.name}: {res['error']}")
                    else:
                        rounds[arm.name].append(res)
            if all(rounds.values()):
                out["create"] = {name: {"rps": statistics.median(r["rps"] for r in rs),
                                        "cpu_us": statistics.median(r.get("cpu_us", 0) for r in rs)}
                                 for name, rs in rounds.items()}
    except Exception as exc:  # noqa: BLE001 - reported in the section; the bench goes on
        out["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        for arm in arms:
            arm.stop()
        emulator.stop()
    return out


def _wire_bytes(emulator: stack.Emulator, path: str, offer: str) -> bytes:
    """The body as it crossed the wire (urllib does not decode content codings)."""
    return _direct(emulator, path, offer)


def report_lines(res: dict) -> list[str]:
    lines = ["## On-the-wire design: what it costs", "",
             "The gateway asks upstream for `identity` on every call (it must read bodies) and holds an",
             "inspected request's head until its body is decided. Same run, same emulator.", ""]
    if "bytes" in res:
        lines += ["| response | identity (what the gateway asks) | `gzip, deflate` (SDK offer) | `br` | identity ÷ gzip |",
                  "|---|---:|---:|---:|---:|"]
        for kind, by in res["bytes"].items():
            ratio = by["identity"] / max(by["gzip, deflate"], 1)
            lines.append(f"| {kind} | {by['identity']:,} B | {by['gzip, deflate']:,} B | {by['br']:,} B | {ratio:.1f} |")
        lines.append("")
    if "first_event_ms" in res:
        fe = res["first_event_ms"]
        lines.append(f"First streamed event after a send, through the gateway (median): client offering "
                     f"`gzip, deflate` {fe['gzip, deflate']:.2f} ms, `identity` {fe['identity']:.2f} ms "
                     "(no decoding step exists: both are identity upstream).")
        lines.append("")
    if "create" in res:
        held, free = res["create"]["hold"], res["create"]["no-hold"]
        lines.append(f"Inspected create `POST /v1/agents` (policy + owner tag), wrk 4 connections: head held "
                     f"{held['rps']:,.0f} req/s, {held['cpu_us']:.0f} µs Envoy CPU/request; not held "
                     f"{free['rps']:,.0f} req/s, {free['cpu_us']:.0f} µs; held ÷ not held throughput "
                     f"{held['rps'] / max(free['rps'], 1e-9):.2f}.")
        lines.append("")
    for err in res.get("errors", []):
        lines.append(f"- not measured: {err}")
    return lines
