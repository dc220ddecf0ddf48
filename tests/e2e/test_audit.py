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


@pytest.fixture(scope="module")
def redacted(emulator, tmp_path_factory):
    audit_path = tmp_path_factory.mktemp("audit-redacted") / "audit.log"
    overrides = dict(TENANTS, audit={"redact_ids": True})
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=overrides, audit_path=audit_path)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    yield Gateway(envoy, emulator), audit_path
    envoy.stop()


def access_log_lines(envoy) -> list[dict]:
    """The stdout access log's JSON lines out of Envoy's output."""
    out = []
    for line in envoy.log().splitlines():
        line = line.strip()
        if line.startswith("{") and '"path"' in line:
            out.append(json.loads(line))
    return out


def test_redact_ids_leaves_no_raw_id_in_reasons_or_the_access_log(redacted):
    gw, path = redacted
    agent = gw.ok("POST", "/v1/agents", key=ALICE, body={"name": "r", "model": "claude-sonnet-4-6"})["id"]
    env = gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "r", "config": CLOUD})["id"]
    session = gw.ok("POST", "/v1/sessions", key=ALICE, body={"agent": agent, "environment_id": env})["id"]
    bob_env = gw.ok("POST", "/v1/environments", key=BOB, body={"name": "b", "config": CLOUD})["id"]
    calls = 4
    for method, p, body in [
        ("GET", f"/v1/sessions/{session}", None),                                    # path id
        ("POST", "/v1/sessions", {"agent": agent, "environment_id": bob_env}),        # body reference
        ("GET", f"/v1/sessions?agent_id={agent}", None),                             # list filter
        ("GET", f"/v1/sessions/{session}/threads?limit=1", None),                    # query + nested path
    ]:
        assert gw.call(method, p, key=BOB, body=body).status in (200, 404), (method, p)
        calls += 1
    assert gw.call("GET", f"/v1/sessions/{session}/events?limit=5", key=ALICE).status == 200
    calls += 1
    got = records(path, calls)
    assert len(got) == calls
    refused = [r for r in got if r.get("decision") == "refused"]
    for r in refused:
        assert r["reason"].startswith("ownership: "), r
        assert "sha256:" in r["reason"], r
    raw = [agent, env, session, bob_env]
    assert not [r for r in got if any(i in json.dumps(r) for i in raw)], got
    assert len(refused) == 4, refused
    # Envoy's own stdout access log prints the path, redacted too (and still joinable).
    lines = []
    end = time.monotonic() + 10
    while len(lines) < calls and time.monotonic() < end:
        lines = access_log_lines(gw.envoy)
        time.sleep(0.05)
    assert len(lines) >= calls, lines
    assert not [line for line in lines if any(i in line["path"] for i in raw)], [l["path"] for l in lines]
    reads = [line["path"] for line in lines if line["path"].startswith("/v1/sessions/sha256:")]
    assert reads and all(p.split("/")[3].startswith("sha256:") for p in reads), reads
    ids_of_read = [r["ids"] for r in got if r.get("operation") == "sessions.read"][0]
    assert ids_of_read == "session=" + reads[0].split("/")[3]
