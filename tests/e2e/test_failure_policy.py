"""What a panic in the filter does, in real Envoy, under each Wasm `failure_policy`.

The panics are real (`panic = "abort"`: the VM traps, as a bug would), triggered on demand by a
test-only build: cargo feature `fault-injection`, built into `target/fault-injection/` so the
shipped module is never touched, and proven absent from the shipped `.wasm`. A request carrying
`x-ma-gateway-fault: <point>` panics at that point (see src/host/fault_injection.rs).

One worker (`--concurrency 1`) so every request meets the VM that panicked.

- shipped policy (FAIL_RELOAD, read from envoy.yaml): the panicking request gets a 503 within
  milliseconds and never reaches upstream; requests in the reload backoff (1 s by default) get
  the same 503; then a fresh VM serves (200). A stream open on the same VM is cut at its next
  chunk (no more events, no `session.status_idle`); its usage is metered later from the
  session's cumulative snapshot, exactly. A panic in the background service (on_tick) is never
  reloaded by Envoy (it reloads only filter VMs, on a request): a filter root takes its duties
  over once its lease runs out (next reconcile within seconds). The active-streams gauge forgets
  streams cut by a panic (recomputed from the live roots' counts).
- FAIL_CLOSED: the worker answers 503 to everything from then on.
- FAIL_OPEN: the filter is skipped from then on: unauthenticated calls, the client's own
  gateway key and paths outside Managed Agents all reach upstream. Not acceptable for auth.
- the envoy.yaml additions (shipped; PROPOSED_* below keeps a copy for configs built without them): the 503 becomes an Anthropic error
  envelope (`api_error`, `x-should-retry: true`) and recovery takes ~0.1 s.
"""

from __future__ import annotations

import copy
import http.client
import json
import subprocess
import threading
import time
import uuid
import warnings

import pytest
import yaml

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA, Gateway
from tests.e2e.test_streaming import new_session, send_text
from tests.harness import stack

FAULT_TARGET_DIR = stack.ROOT / "target" / "fault-injection"
FAULT_WASM = FAULT_TARGET_DIR / "wasm32-wasip1" / "release" / "ma_gateway.wasm"
FAULT_HEADER = "x-ma-gateway-fault"
# Strings only the fault-injection code puts into the module (the header name itself is
# compiled into byte comparisons, so it is not a reliable marker).
FAULT_MARKERS = [b"fault-injection test build", b"ma_gateway.fault.tick"]

# Proposed for envoy.yaml (HCM): Envoy's bare 503 of a failed VM as an Anthropic error envelope.
# Matched on the response code details Envoy gives a failed Wasm stream, so the gateway's own
# refusals (already envelopes, also local replies) and upstream answers are untouched.
PROPOSED_LOCAL_REPLY_CONFIG = {
    "mappers": [{
        "filter": {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": "response.code_details == 'wasm_fail_stream'",
            },
        }},
        "headers_to_add": [{"header": {"key": "x-should-retry", "value": "true"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "body_format_override": {
            "content_type": "application/json",
            "json_format": {
                "type": "error",
                "error": {"type": "api_error",
                          "message": "the gateway filter failed on this request; retry"},
                "request_id": "%REQ(X-REQUEST-ID)%",
            },
        },
    }]
}
# Proposed for envoy.yaml (Wasm filter config): reload a failed VM after 0.1 s instead of 1 s.
PROPOSED_RELOAD_CONFIG = {"backoff": {"base_interval": "0.1s", "max_interval": "1s"}}

# Bounds for a loaded 2-core box; the measured values are printed.
PANIC_REPLY_BOUND_S = 2.0
RECOVERY_BOUND_S = 10.0


@pytest.fixture(scope="session")
def fault_wasm() -> str:
    """The fault-injection build (`make wasm-fault`; cargo decides whether anything needs
    rebuilding). If the tree does not compile right now but a build exists, that one is used:
    what is tested here is Envoy's handling of a panic, not the latest filter code."""
    result = subprocess.run(
        ["cargo", "build", "--target", "wasm32-wasip1", "--release", "--lib",
         "--features", "fault-injection", "--target-dir", str(FAULT_TARGET_DIR)],
        cwd=str(stack.ROOT), capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0:
        assert FAULT_WASM.exists(), result.stderr[-4000:]
        warnings.warn(f"fault-injection build failed, using the previous {FAULT_WASM}:\n{result.stderr[-1000:]}")
    return str(FAULT_WASM)


def test_shipped_module_contains_no_fault_trigger(fault_wasm):
    shipped = stack.WASM.read_bytes()
    fault = FAULT_WASM.read_bytes()
    for marker in FAULT_MARKERS:
        assert marker in fault, f"positive control: {marker!r} should be in the fault build"
        assert marker not in shipped, f"{marker!r} is in the shipped {stack.WASM}"
    assert FAULT_WASM.resolve() != stack.WASM.resolve()


def shipped_failure_policy() -> str:
    config = yaml.safe_load(stack.ENVOY_YAML.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]["failure_policy"]


def _filter_config(config: dict) -> tuple[dict, dict]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
    return hcm, wasm


def start(emulator, fault_wasm, *, policy: str | None = None, proposed: bool = False,
          plugin_overrides=None, audit_path=None) -> Gateway:
    """Envoy from the shipped envoy.yaml with the fault build, one worker; `policy` overrides
    the shipped failure_policy; `proposed` adds the proposed local reply and reload configs."""
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys=KEYS, wasm_path=fault_wasm, plugin_overrides=plugin_overrides, audit_path=audit_path)
    hcm, wasm = _filter_config(config)
    if policy is not None:
        wasm["failure_policy"] = policy
    if proposed:
        hcm["local_reply_config"] = copy.deepcopy(PROPOSED_LOCAL_REPLY_CONFIG)
        wasm["reload_config"] = copy.deepcopy(PROPOSED_RELOAD_CONFIG)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key), concurrency=1).start()
    return Gateway(envoy, emulator)


def stats(gateway: Gateway, prefix: str) -> dict[str, int]:
    out = {}
    for line in gateway.envoy.admin(f"/stats?filter=^{prefix}").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def upstream_saw(emulator, marker: str) -> list[dict]:
    return [r for r in emulator.requests() if marker in r["path"]]


def panic_now(gateway: Gateway, point: str = "request-headers", **kwargs):
    """Sends a panicking request; returns (reply, seconds, marker in its query)."""
    marker = uuid.uuid4().hex
    started = time.monotonic()
    reply = gateway.call("GET", f"/v1/agents?marker={marker}", headers={FAULT_HEADER: point}, **kwargs)
    return reply, time.monotonic() - started, marker


def envelope_expected() -> bool:
    """Whether envoy.yaml maps the failed-VM 503 to an Anthropic envelope (the proposal)."""
    hcm, _ = _filter_config(yaml.safe_load(stack.ENVOY_YAML.read_text()))
    return "local_reply_config" in hcm


def assert_failed_vm_reply(reply, *, envelope: bool):
    assert reply.status == 503
    if envelope:
        body = reply.json()
        assert body["type"] == "error" and body["error"]["type"] == "api_error", body
        assert reply.headers["x-should-retry"] == "true"
        assert reply.headers["content-type"] == "application/json"
    else:
        # Envoy's own local reply for a failed VM: bare, no body, no envelope.
        assert reply.body == b"", reply.body
        assert reply.headers["content-length"] == "0"


class Stream:
    """An SSE stream read on a thread: (monotonic arrival, event name) per named event."""

    def __init__(self, gateway: Gateway, path: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        self.conn.request("GET", path, headers={
            "x-api-key": KEYS["alice"], "anthropic-beta": MANAGED_AGENTS_BETA,
            "anthropic-version": "2023-06-01"})
        self.resp = self.conn.getresponse()
        self.events: list[tuple[float, str]] = []
        self.ended_at: float | None = None
        self.error: str | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    break
                text = line.decode(errors="replace").rstrip("\r\n")
                if text.startswith("event:"):
                    with self.cond:
                        self.events.append((time.monotonic(), text[6:].strip()))
                        self.cond.notify_all()
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
            # (ValueError/AttributeError: closed by `close` while reading.)
            self.error = f"{type(exc).__name__}: {exc}"
        with self.cond:
            self.ended_at = time.monotonic()
            self.cond.notify_all()

    def wait(self, predicate, timeout: float, what: str):
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout=timeout):
                raise AssertionError(f"timed out waiting for {what}: {self.names()}")

    def names(self) -> list[str]:
        return [name for _, name in self.events]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def close(self):
        self.conn.close()


def tokens(gateway: Gateway) -> dict[str, int]:
    """ma_gateway_tokens_total by type (one tenant, one model in these tests)."""
    out = {}
    for line in gateway.envoy.admin("/stats/prometheus").splitlines():
        if line.startswith("ma_gateway_tokens_total{"):
            kind = line.split('type="', 1)[1].split('"', 1)[0]
            out[kind] = out.get(kind, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def wait_recovered(gateway: Gateway) -> tuple[float, list]:
    """Polls an ordinary call until it is served; returns (seconds, replies while failed)."""
    started = time.monotonic()
    failed = []
    while time.monotonic() - started < RECOVERY_BOUND_S:
        reply = gateway.call("GET", "/v1/agents")
        if reply.status == 200:
            return time.monotonic() - started, failed
        failed.append(reply)
        time.sleep(0.02)
    raise AssertionError(f"no recovery within {RECOVERY_BOUND_S}s: {[r.status for r in failed][-5:]}")


def test_shipped_policy_fails_closed_then_reloads(emulator, fault_wasm, tmp_path):
    policy = shipped_failure_policy()
    assert policy == "FAIL_RELOAD", "this test describes FAIL_RELOAD; envoy.yaml changed policy"
    envelope = envelope_expected()
    audit = tmp_path / "audit.log"
    gw = start(emulator, fault_wasm, audit_path=audit)
    stream = None
    try:
        assert gw.call("GET", "/v1/agents").status == 200

        # A stream open on the same VM when another request panics.
        sid = new_session(gw)
        stream = Stream(gw, f"/v1/sessions/{sid}/events/stream")
        assert stream.resp.status == 200
        send_text(gw, sid, "emulator:ticker 6")
        stream.wait(lambda s: s.count("agent.message") >= 2, 20, "two ticks")

        reply, took, marker = panic_now(gw)
        panicked_at = time.monotonic()
        print(f"\npanicking request: {reply.status} in {took * 1000:.1f} ms, body {reply.body!r}")
        assert_failed_vm_reply(reply, envelope=envelope)
        assert took < PANIC_REPLY_BOUND_S
        assert upstream_saw(emulator, marker) == []

        # Requests in the reload backoff are refused the same way; then a fresh VM serves.
        recovered_in, during = wait_recovered(gw)
        print(f"recovered after {recovered_in:.2f} s; {len(during)} calls refused meanwhile")
        for failed in during:
            assert_failed_vm_reply(failed, envelope=envelope)
        reload = stats(gw, "wasm.ma_gateway.vm_reload")
        print(f"reload stats: {reload}")
        assert reload["wasm.ma_gateway.vm_reload_success"] == 1
        assert reload["wasm.ma_gateway.vm_reload_failure"] == 0
        assert reload["wasm.ma_gateway.vm_reload_backoff"] == len(during)

        # The open stream is cut at its next chunk: nothing after the panic, no idle.
        stream.wait(lambda s: s.ended_at is not None, 20, "the stream to end")
        after = [name for at, name in stream.events if at > panicked_at]
        print(f"open stream: {stream.count('agent.message')} ticks before the panic, events after: {after}, "
              f"ended {stream.ended_at - panicked_at:.2f} s after it ({stream.error or 'EOF'})")
        assert after == []
        assert stream.count("agent.message") == 2
        assert "session.status_idle" not in stream.names()

        # The audit trail: one line each. The panicking call has only Envoy's fields (the filter
        # wrote nothing before it died); the cut stream looks allowed and complete (status 200,
        # response_flags "-", no usage): only RESPONSE_CODE_DETAILS (wasm_fail_stream) tells.
        deadline = time.monotonic() + 10
        while True:
            records = [json.loads(line) for line in audit.read_text().splitlines()]
            failed = [r for r in records if r["status"] == 503]
            streams = [r for r in records if r.get("operation") == "session_events.stream"]
            if failed and streams:
                break
            assert time.monotonic() < deadline, records
            time.sleep(0.1)
        print(f"audit of the panicking call: {failed[0]}\naudit of the cut stream: {streams}")
        assert len(failed) == 1 + len(during)  # the panicking call and those in the backoff
        for record in failed:
            assert {k: record[k] for k in ("method", "status", "response_flags")} == {
                "method": "GET", "status": 503, "response_flags": "-"}
            assert "decision" not in record and "tenant" not in record
            assert record["details"] == "wasm_fail_stream"
        assert len(streams) == 1
        assert (streams[0]["status"], streams[0]["decision"], streams[0]["response_flags"]) == (200, "allowed", "-")
        assert streams[0]["details"] == "wasm_fail_stream"
        assert "usage" not in streams[0]

        # The fresh VM authenticates as before, and shared data (credential, accounting)
        # survived: the cut stream's turn is metered exactly from the session snapshot.
        assert gw.call("GET", "/v1/agents", key="not-a-gateway-key").status == 401
        deadline = time.monotonic() + 30
        while emulator.usage(sid)["model_requests"] < 1:
            assert time.monotonic() < deadline, "the ticker turn never finished upstream"
            time.sleep(0.1)
        truth = emulator.usage(sid)
        gw.ok("GET", f"/v1/sessions/{sid}")
        metered = tokens(gw)
        print(f"metered after the panic from the snapshot: {metered}")
        expected = {
            "input": truth["input_tokens"], "output": truth["output_tokens"],
            "cache_read": truth["cache_read_input_tokens"],
            "cache_write": truth["cache_creation_input_tokens"],
        }
        assert expected["output"] > 0
        assert metered == {kind: n for kind, n in expected.items() if n}
        gauge = [line for line in gw.envoy.admin("/stats/prometheus").splitlines()
                 if line.startswith("ma_gateway_active_streams")]
        print(f"active-streams gauge after the cut stream: {gauge}")

        # A stream that panics itself, mid-stream (third body chunk).
        sid2 = new_session(gw)
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("GET", f"/v1/sessions/{sid2}/events/stream", headers={
            "x-api-key": KEYS["alice"], "anthropic-beta": MANAGED_AGENTS_BETA,
            "anthropic-version": "2023-06-01", FAULT_HEADER: "response-body:3"})
        resp = conn.getresponse()
        assert resp.status == 200
        # The emulator cuts frames at random places, so the third chunk can arrive while the
        # send is still passing the same worker's VM: the panic then cuts the send's answer
        # (IncompleteRead) or fails the send itself (503). Either way the stream below panics
        # on its third chunk (heartbeats keep coming) and is cut before the turn ends.
        try:
            sent = gw.call("POST", f"/v1/sessions/{sid2}/events", body={"events": [
                {"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]})
            assert sent.status in (200, 503), sent.body
        except http.client.IncompleteRead:
            pass
        names, started = [], time.monotonic()
        try:
            for line in iter(resp.readline, b""):
                if line.startswith(b"event:"):
                    names.append(line[6:].strip().decode())
        except (OSError, http.client.HTTPException):
            pass
        conn.close()
        print(f"self-panicking stream: events {names}, ended after {time.monotonic() - started:.2f} s")
        assert "session.status_idle" not in names
        recovered_in, _ = wait_recovered(gw)
        assert stats(gw, "wasm.ma_gateway.vm_reload")["wasm.ma_gateway.vm_reload_success"] == 2
    finally:
        if stream:
            stream.close()
        gw.envoy.stop()


# Renewals come at most a third of the lease apart plus the gap between two chunks (the
# emulator's 2 s heartbeat here), so a 5 s lease is renewed in time and still taken right
# after the panic.
STREAM_LEASE_S = 5


def test_a_stream_slot_held_by_a_panicked_vm_frees_itself_when_its_lease_ends(emulator, fault_wasm):
    """A stream cut by a VM panic never runs on_log, so it never gives its concurrent-stream
    slot back; the slot is a lease renewed only as the stream's body flows
    (`limits.stream_slot_lease_secs`), so it frees itself within the lease. (Before leases it
    stayed taken until Envoy restarted: 429 forever.)"""
    gw = start(emulator, fault_wasm, plugin_overrides={"limits": {
        "per_principal": {"concurrent_streams": 1}, "stream_slot_lease_secs": STREAM_LEASE_S}})
    stream = None
    try:
        sid = new_session(gw)
        stream = Stream(gw, f"/v1/sessions/{sid}/events/stream")
        assert stream.resp.status == 200
        second = gw.call("GET", f"/v1/sessions/{sid}/events/stream", timeout=10)
        assert second.status == 429  # the limit works: alice has one stream open
        send_text(gw, sid, "emulator:ticker 3")
        stream.wait(lambda s: s.count("agent.message") >= 1, 20, "a tick")
        panicked, _, _ = panic_now(gw)
        panicked_at = time.monotonic()
        assert panicked.status == 503
        wait_recovered(gw)
        # Renewed shortly before the panic: still taken right after it.
        early = gw.call("GET", f"/v1/sessions/{sid}/events/stream", timeout=10)
        early_at = time.monotonic() - panicked_at
        assert early.status == 429, early.body
        assert early.json()["error"]["type"] == "rate_limit_error"
        stream.wait(lambda s: s.ended_at is not None, 20, "the stream to be cut")
        deadline = panicked_at + STREAM_LEASE_S + 2
        while True:
            conn, after = open_raw_stream(gw, sid)
            conn.close()
            if after.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        freed_after = time.monotonic() - panicked_at
        print(f"\nalice's next stream: 429 at {early_at:.2f} s after the panic, "
              f"{after.status} at {freed_after:.2f} s (lease {STREAM_LEASE_S} s)")
        assert after.status == 200, f"the slot was still taken {freed_after:.2f} s after the panic"
        assert freed_after <= STREAM_LEASE_S + 2
    finally:
        if stream:
            stream.close()
        gw.envoy.stop()


def open_raw_stream(gw, sid):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", f"/v1/sessions/{sid}/events/stream", headers={
        "x-api-key": KEYS["alice"], "anthropic-version": "2023-06-01",
        "anthropic-beta": MANAGED_AGENTS_BETA})
    return conn, conn.getresponse()


# The service renews its lease every second for 3 s (src/reconcile.rs, LEASE_MS); a filter
# root checks it on its own one-second tick: the duties resume within ~4 s of the last renewal.
TAKEOVER_BOUND_S = 10.0
# Filter roots publish their open streams every second; a silent one stops counting after 5 s
# (src/metrics.rs, STREAM_LEASE_STALE_MS) at the leader's next one-second recount.
GAUGE_BOUND_S = 15.0


def active_streams(gateway: Gateway) -> int | None:
    for line in gateway.envoy.admin("/stats/prometheus").splitlines():
        if line.startswith("ma_gateway_active_streams"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def wait_gauge(gateway: Gateway, value: int, bound: float, what: str) -> float:
    started = time.monotonic()
    while active_streams(gateway) != value:
        assert time.monotonic() - started < bound, f"{what}: gauge {active_streams(gateway)}, want {value}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_background_service_panic_is_taken_over_by_a_filter_root(emulator, fault_wasm):
    """Envoy never reloads the singleton (reconciler, Vault refresh) after a panic; a filter
    root sees its lease run out and takes the duties over: the next reconcile comes within a
    bounded time, and usage nobody reads is metered again."""
    gw = start(emulator, fault_wasm, plugin_overrides={"metering": {"reconcile_interval_secs": 1}})
    try:
        # Alive: a session nobody reads is metered by the reconciler.
        sid = new_session(gw)
        send_text(gw, sid, "before")
        deadline = time.monotonic() + 20
        while tokens(gw).get("output", 0) == 0:
            assert time.monotonic() < deadline, "the reconciler never metered the session"
            time.sleep(0.1)
        panicked = gw.call("GET", "/v1/agents", headers={FAULT_HEADER: "tick"})
        assert panicked.status == 200  # the request itself is fine; the next tick panics
        deadline = time.monotonic() + 20
        while "fault injected in on_tick" not in gw.envoy.log():
            assert time.monotonic() < deadline, "the background service did not panic"
            time.sleep(0.05)
        panicked_at = time.monotonic()
        polls = f"/v1/sessions/{sid}"
        seen = sum(r["path"] == polls for r in emulator.requests())
        send_text(gw, sid, "after")

        # The next poll of the session, by whoever holds the duties now.
        while sum(r["path"] == polls for r in emulator.requests()) == seen:
            assert time.monotonic() - panicked_at < TAKEOVER_BOUND_S, "nobody reconciled after the panic"
            time.sleep(0.05)
        resumed_in = time.monotonic() - panicked_at
        print(f"\nfirst reconcile poll {resumed_in:.2f} s after the background service panicked")
        assert "background duties taken over by filter root" in gw.envoy.log()
        # Envoy did not reload the service: the filter root does its work.
        assert stats(gw, "wasm.ma_gateway_reconciler.vm_reload")["wasm.ma_gateway_reconciler.vm_reload_success"] == 0

        # The turn sent after the panic is metered without any client reading the session.
        deadline = time.monotonic() + 30
        while emulator.usage(sid)["model_requests"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        truth = emulator.usage(sid)
        while tokens(gw).get("output", 0) != truth["output_tokens"]:
            assert time.monotonic() < deadline, (tokens(gw), truth)
            time.sleep(0.1)
        print(f"metered by the takeover: {tokens(gw)} (truth output {truth['output_tokens']})")
        # It keeps polling, once a second.
        polled = sum(r["path"] == polls for r in emulator.requests())
        deadline = time.monotonic() + 5
        while sum(r["path"] == polls for r in emulator.requests()) < polled + 2:
            assert time.monotonic() < deadline, "the takeover stopped reconciling"
            time.sleep(0.1)
    finally:
        gw.envoy.stop()


def test_the_active_streams_gauge_forgets_streams_cut_by_a_vm_failure(emulator, fault_wasm):
    """A stream cut by a VM panic never runs its end callback, so it would stay counted; the
    gauge is recomputed from the live roots' published counts and returns to the true value."""
    gw = start(emulator, fault_wasm)
    stream = None
    try:
        sid = new_session(gw)
        stream = Stream(gw, f"/v1/sessions/{sid}/events/stream")
        assert stream.resp.status == 200
        wait_gauge(gw, 1, GAUGE_BOUND_S, "one stream open")
        # Stable across recounts (one a second): the live root's stream is counted.
        window_end = time.monotonic() + 2.5
        while time.monotonic() < window_end:
            assert active_streams(gw) == 1
            time.sleep(0.1)
        send_text(gw, sid, "emulator:ticker 3")
        stream.wait(lambda s: s.count("agent.message") >= 1, 20, "a tick")
        panicked, _, _ = panic_now(gw)
        panicked_at = time.monotonic()
        assert panicked.status == 503
        stream.wait(lambda s: s.ended_at is not None, 20, "the stream to be cut")
        wait_recovered(gw)
        wait_gauge(gw, 0, GAUGE_BOUND_S, "the cut stream still counted")
        print(f"\nactive-streams gauge back to 0 {time.monotonic() - panicked_at:.2f} s after the panic "
              f"(stream cut {stream.ended_at - panicked_at:.2f} s after it)")
        # The fresh VM counts its own streams as before.
        again = Stream(gw, f"/v1/sessions/{sid}/events/stream")
        try:
            assert again.resp.status == 200
            wait_gauge(gw, 1, GAUGE_BOUND_S, "a new stream")
        finally:
            again.close()
        wait_gauge(gw, 0, GAUGE_BOUND_S, "the new stream closed")
    finally:
        if stream:
            stream.close()
        gw.envoy.stop()


def test_fail_closed_keeps_the_worker_failed(emulator, fault_wasm):
    gw = start(emulator, fault_wasm, policy="FAIL_CLOSED")
    try:
        assert gw.call("GET", "/v1/agents").status == 200
        reply, took, marker = panic_now(gw)
        assert_failed_vm_reply(reply, envelope=envelope_expected())
        assert took < PANIC_REPLY_BOUND_S
        # Past FAIL_RELOAD's reload backoff (jittered, at most 1 s): still failed, and nothing
        # reaches upstream.
        emulator_before = len(emulator.requests())
        started, statuses = time.monotonic(), []
        while time.monotonic() - started < 1.5:
            statuses.append(gw.call("GET", "/v1/agents").status)
            time.sleep(0.05)
        print(f"\nFAIL_CLOSED: {len(statuses)} calls over 1.5 s after the panic, statuses {set(statuses)}")
        assert set(statuses) == {503}
        assert len(emulator.requests()) == emulator_before
        assert upstream_saw(emulator, marker) == []
        assert stats(gw, "wasm.ma_gateway.vm_reload")["wasm.ma_gateway.vm_reload_success"] == 0
    finally:
        gw.envoy.stop()


def test_fail_open_lets_unauthenticated_calls_reach_upstream(emulator, fault_wasm):
    """Why FAIL_OPEN is never shipped: after one panic the gateway is simply gone."""
    gw = start(emulator, fault_wasm, policy="FAIL_OPEN")
    try:
        refused = gw.call("GET", "/v1/agents", key=None)
        assert refused.status == 401 and refused.json()["error"]["type"] == "authentication_error"
        reply, _, marker = panic_now(gw)
        assert reply.status == 503  # the panicking call itself
        assert upstream_saw(emulator, marker) == []

        unauthenticated = uuid.uuid4().hex
        reply = gw.call("GET", f"/v1/agents?marker={unauthenticated}", key=None)
        seen = upstream_saw(emulator, unauthenticated)
        assert len(seen) == 1, "an unauthenticated call reached upstream"
        # Upstream's own refusal (no key was injected), not the gateway's envelope.
        assert reply.status == 401 and not reply.json()["request_id"].startswith("req_gw_")

        leaked = uuid.uuid4().hex
        gw.call("GET", f"/v1/agents?marker={leaked}")
        headers = dict(upstream_saw(emulator, leaked)[0]["headers"])
        assert headers["x-api-key"] == KEYS["alice"], "the client's gateway key went upstream"

        outside = uuid.uuid4().hex
        gw.call("POST", f"/v1/messages?marker={outside}", body={"model": "x"})
        assert len(upstream_saw(emulator, outside)) == 1, "default deny is gone"
    finally:
        gw.envoy.stop()


def test_proposed_local_reply_maps_the_failed_vm_503_to_an_envelope(emulator, fault_wasm):
    gw = start(emulator, fault_wasm, proposed=True)
    try:
        # The gateway's own refusals (local replies too) are left as they are.
        refused = gw.call("GET", "/v1/agents", key="not-a-gateway-key")
        assert refused.status == 401
        assert refused.json()["error"] == {"type": "authentication_error", "message": "invalid gateway key"}
        assert refused.headers["x-should-retry"] == "false"

        reply, took, marker = panic_now(gw)
        assert reply.json() == {
            "type": "error",
            "error": {"type": "api_error", "message": "the gateway filter failed on this request; retry"},
            "request_id": reply.json()["request_id"],
        }
        assert_failed_vm_reply(reply, envelope=True)
        assert upstream_saw(emulator, marker) == []
        recovered_in, during = wait_recovered(gw)
        print(f"\nproposed config: 503 envelope in {took * 1000:.1f} ms, recovered after "
              f"{recovered_in:.2f} s ({len(during)} calls refused meanwhile)")
        for failed in during:
            assert_failed_vm_reply(failed, envelope=True)
        assert recovered_in < 1.0
    finally:
        gw.envoy.stop()
