"""One audit record per call, with who, what, which resources, the decision and its reason,
status, latency, bytes and usage — and no secret anywhere in any log."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import KEYS, Gateway
from tests.e2e.test_isolation import ALICE, BOB, CAROL, CLOUD, TENANTS
from tests.e2e.test_streaming import SseReader, send_text
from tests.harness import stack

SECRET_TEXT = "the launch code is 0000-secret"
VAULT_TOKEN = "ghp_audit_vault_secret_token"


@pytest.fixture(scope="module")
def audited(emulator, tmp_path_factory):
    audit_path = tmp_path_factory.mktemp("audit") / "audit.log"
    # The stream helpers speak with the suite's default key: make it an acme key here too.
    overrides = dict(TENANTS, gateway_keys=TENANTS["gateway_keys"] + [
        {"name": "alice-streams", "sha256": stack.sha256_hex(KEYS["alice"]), "tenant": "acme"}],
        # Auditors may read once a minute: their second list is rate-limited.
        limits={"tenants": {"auditors": {"read": {"per_minute": 1, "burst": 1}}}})
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=overrides, audit_path=audit_path)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    yield Gateway(envoy, emulator), audit_path
    envoy.stop()


def records(path, count, timeout=10) -> list[dict]:
    end = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > end:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def test_every_call_has_one_audit_record_with_the_right_fields(audited):
    gw, path = audited
    calls = 0

    def call(*args, **kwargs):
        nonlocal calls
        calls += 1
        return gw.call(*args, **kwargs)

    agent = call("POST", "/v1/agents", key=ALICE, body={"name": "audited", "model": "claude-sonnet-4-6"}).json()["id"]
    env = call("POST", "/v1/environments", key=ALICE, body={"name": "a", "config": CLOUD}).json()["id"]
    vault = call("POST", "/v1/vaults", key=ALICE, body={"name": "v"}).json()["id"]
    call("POST", f"/v1/vaults/{vault}/credentials", key=ALICE,
         body={"name": "gh", "auth": {"type": "static_bearer", "token": VAULT_TOKEN}})
    session = call("POST", "/v1/sessions", key=ALICE, body={"agent": agent, "environment_id": env}).json()["id"]
    call("GET", "/v1/agents", key=None)                                       # unauthenticated
    call("POST", "/v1/agents", key=CAROL, body={"name": "x", "model": "m"})   # forbidden by scope
    call("GET", f"/v1/sessions/{session}", key=BOB)                           # cross-tenant
    call("GET", "/v1/messages", key=ALICE)                                    # not a route
    call("GET", "/v1/agents", key=CAROL)                                      # allowed read
    call("GET", "/v1/agents", key=CAROL)                                      # rate-limited

    # A stream that meters usage, then an aborted one.
    calls += 1
    reader = SseReader(gw, f"/v1/sessions/{session}/events/stream")
    send_text(gw, session, SECRET_TEXT)
    calls += 1
    for _, name, _ in reader.frames():
        if name == "session.status_idle":
            break
    reader.close()
    calls += 1
    aborted = SseReader(gw, f"/v1/sessions/{session}/stream")
    send_text(gw, session, "emulator:ticker 3")
    calls += 1
    for _, name, _ in aborted.frames():
        if name == "agent.message":
            break
    aborted.close()
    gw.ok("POST", f"/v1/sessions/{session}/events", key=ALICE, body={"events": [{"type": "user.interrupt"}]})
    calls += 1

    got = records(path, calls)
    assert len(got) == calls, [r.get("operation") for r in got]
    by_op = {}
    for r in got:
        by_op.setdefault(r.get("operation"), []).append(r)

    create = by_op["vault_credentials.create"][0]
    assert create["tenant"] == "acme" and create["principal"] == "alice" and create["auth"] == "gateway_key"
    assert create["decision"] == "allowed" and create["mutating"] == "true" and create["status"] == 200
    assert create["ids"] == f"vault={vault}"
    assert isinstance(create["duration_ms"], int) and create["bytes_received"] > 0

    unauth = [r for r in got if r.get("status") == 401][0]
    assert unauth["operation"] == "unrouted" and unauth["decision"] == "refused"
    assert unauth["reason"].startswith("authentication: missing gateway key")
    assert "tenant" not in unauth

    forbidden = [r for r in got if r.get("status") == 403][0]
    assert (forbidden["tenant"], forbidden["principal"], forbidden["operation"]) == ("auditors", "carol", "agents.create")
    assert forbidden["reason"] == "scope: missing scope agents:create: your tenant is not allowed this operation"

    foreign = [r for r in by_op["sessions.read"] if r["status"] == 404][0]
    assert foreign["tenant"] == "globex" and foreign["reason"] == f"ownership: session {session} not found"

    limited = [r for r in got if r.get("status") == 429][0]
    assert (limited["tenant"], limited["operation"], limited["decision"]) == ("auditors", "agents.list", "refused")
    assert limited["reason"].startswith("rate_limit: "), limited["reason"]

    unrouted = [r for r in got if r.get("reason", "").startswith("route:")][0]
    assert unrouted["tenant"] == "acme" and unrouted["operation"] == "unrouted"

    streams = by_op["session_events.stream"]
    assert len(streams) == 2
    full = [s for s in streams if "usage" in s][0]
    usage = json.loads(full["usage"])
    truth = gw.emulator.usage(session)
    assert usage["session_id"] == session and usage["input_tokens"] > 0 and usage["cost_microdollars"] > 0
    assert usage["input_tokens"] <= truth["input_tokens"]
    assert any(s["response_flags"] == "DC" for s in streams), streams

    sends = by_op["session_events.send_events"]
    assert sorted(s["events"] for s in sends) == ["user.interrupt", "user.message", "user.message"]


def test_no_secret_reaches_any_log(audited):
    gw, path = audited
    logs = path.read_text() + gw.envoy.log()
    for secret in [ALICE, BOB, CAROL, KEYS["alice"], gw.emulator.api_key, VAULT_TOKEN, SECRET_TEXT]:
        assert secret not in logs, secret
