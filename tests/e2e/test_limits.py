"""Rate limits, concurrent streams, budgets and policy in real Envoy (2 workers).

Limits live in shared data with compare-and-swap: whatever worker serves a request, the number
admitted never exceeds the configured burst."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import anthropic
import pytest

from tests.e2e.conftest import Gateway, configured_gateway
from tests.harness import stack

LIMITED, STREAMER, BUDGETED, MONEY, POLICED = (
    "gw-key-limited", "gw-key-streamer", "gw-key-budgeted", "gw-key-money", "gw-key-policed")
BURST = 30
TOKEN_BUDGET = 500
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}
LIMITED_NET = {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["pypi.org"]}}

CONFIG = {
    "tenants": [{"name": n} for n in ("limited", "streamer", "budgeted", "money", "policed")],
    "gateway_keys": [
        {"name": n, "sha256": stack.sha256_hex(k), "tenant": n}
        for n, k in [("limited", LIMITED), ("streamer", STREAMER), ("budgeted", BUDGETED),
                     ("money", MONEY), ("policed", POLICED)]
    ],
    "limits": {
        "tenants": {
            "limited": {"create": {"per_minute": 1, "burst": BURST}},
            "streamer": {"concurrent_streams": 1},
        },
        "budgets": {"tenants": {
            "budgeted": {"tokens_per_day": TOKEN_BUDGET},
            "money": {"microdollars_per_day": 50_000_000},
        }},
    },
    "policy": {"tenants": {"policed": {
        "models": {"allow": ["claude-sonnet-4-*"]},
        "tools": {"deny": ["bash"]},
        "mcp_servers": {"allow_urls": ["https://mcp.internal/*"]},
        "environments": {"forbid_unrestricted": True},
        "vaults": False,
    }}},
}


@pytest.fixture(scope="module")
def limited(emulator):
    gateway = configured_gateway(emulator, CONFIG)
    yield gateway
    gateway.envoy.stop()


def test_concurrent_load_never_exceeds_the_limit(limited):
    gw = limited

    def create(i):
        return gw.call("POST", "/v1/vaults", key=LIMITED, body={"name": f"v{i}"})

    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(create, range(120)))
    statuses = [r.status for r in replies]
    assert statuses.count(200) == BURST, statuses
    assert statuses.count(429) == 120 - BURST
    refused = next(r for r in replies if r.status == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["retry-after-ms"]) > 0
    admitted = next(r for r in replies if r.status == 200)
    assert "x-ratelimit-remaining" in admitted.headers
    # Reads are a different class: still served.
    assert gw.call("GET", "/v1/vaults", key=LIMITED).status == 200


def test_the_official_sdk_understands_the_429(limited):
    client = anthropic.Anthropic(base_url=limited.url, api_key=LIMITED, max_retries=0, timeout=10)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.beta.vaults.create(display_name="one too many")
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"]


def new_session(gw, key, model="claude-sonnet-4-6"):
    agent = gw.ok("POST", "/v1/agents", key=key, body={"name": "l", "model": model})
    env = gw.ok("POST", "/v1/environments", key=key, body={"name": "l", "config": CLOUD})
    return gw.ok("POST", "/v1/sessions", key=key, body={"agent": agent["id"], "environment_id": env["id"]})["id"]


def open_stream(gw, key, sid):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", f"/v1/sessions/{sid}/events/stream", headers={
        "x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"})
    return conn, conn.getresponse()


def test_concurrent_streams_are_capped_and_released(limited):
    gw = limited
    sid = new_session(gw, STREAMER)
    first, resp = open_stream(gw, STREAMER, sid)
    assert resp.status == 200
    second, refused = open_stream(gw, STREAMER, sid)
    assert refused.status == 429
    assert "too many concurrent event streams (limit 1)" in json.loads(refused.read())["error"]["message"]
    second.close()
    first.close()
    end = time.monotonic() + 10
    while True:  # the slot is released when Envoy logs the closed stream
        conn, again = open_stream(gw, STREAMER, sid)
        conn.close()
        if again.status == 200 or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert again.status == 200


def send(gw, key, sid, text):
    return gw.call("POST", f"/v1/sessions/{sid}/events", key=key, body={
        "events": [{"type": "user.message", "content": [{"type": "text", "text": text}]}]})


def wait_turns(gw, key, sid, turns):
    end = time.monotonic() + 20
    while time.monotonic() < end:
        events = gw.ok("GET", f"/v1/sessions/{sid}/events?limit=1000", key=key)["data"]  # meters the spans
        if sum(e["type"] == "session.status_idle" for e in events) >= turns:
            return
        time.sleep(0.1)
    raise AssertionError("turn did not finish")


def test_token_budget_runs_out_at_the_right_count(limited):
    gw = limited
    sid = new_session(gw, BUDGETED)
    turns = 0
    while True:
        truth = gw.emulator.usage(sid) if turns else None
        used = 0 if truth is None else (truth["input_tokens"] + truth["output_tokens"]
                                        + truth["cache_read_input_tokens"] + truth["cache_creation_input_tokens"])
        reply = send(gw, BUDGETED, sid, "hi")
        if used < TOKEN_BUDGET:
            assert reply.status == 200, (turns, used, reply.body)
            turns += 1
            wait_turns(gw, BUDGETED, sid, turns)
            continue
        assert reply.status == 429, (turns, used)
        message = reply.json()["error"]["message"]
        assert message.startswith("tenant budgeted has used its daily token budget"), message
        assert reply.headers["x-should-retry"] == "false"
        break
    assert turns >= 2
    # Reads of existing sessions stay possible.
    assert gw.call("GET", f"/v1/sessions/{sid}", key=BUDGETED).status == 200
    assert gw.call("GET", f"/v1/sessions/{sid}/events", key=BUDGETED).status == 200


def test_the_session_budget_is_clamped_to_what_the_tenant_has_left(limited):
    gw = limited
    sid = new_session(gw, MONEY)
    req = urllib.request.Request(f"{gw.emulator.url}/v1/sessions/{sid}", headers={
        "x-api-key": gw.emulator.api_key, "anthropic-version": "2023-06-01",
        "anthropic-beta": "managed-agents-2026-04-01"})
    with gw.emulator.urlopen(req) as resp:
        stored = json.loads(resp.read())
    assert stored["budget"] == {"type": "limit", "max_list_cost": {"amount": "5000", "currency": "USD"}}


@pytest.mark.parametrize("path,body,rule", [
    ("/v1/agents", {"name": "a", "model": "claude-opus-4-6"}, "model claude-opus-4-6 is not allowed"),
    ("/v1/agents", {"name": "a", "model": "claude-sonnet-4-6", "tools": [{"type": "agent_toolset_20260401"}]},
     "tool bash is denied"),
    ("/v1/agents", {"name": "a", "model": "claude-sonnet-4-6",
                    "mcp_servers": [{"type": "url", "name": "x", "url": "https://evil.example/mcp"}]},
     "mcp"),
    ("/v1/environments", {"name": "e", "config": CLOUD}, "unrestricted"),
    ("/v1/vaults", {"name": "v"}, "vault"),
])
def test_each_policy_rule_refuses_a_violating_body(limited, path, body, rule):
    gw = limited
    gw.emulator.clear_requests()
    reply = gw.call("POST", path, key=POLICED, body=body)
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error["type"] == "permission_error" and error["message"].startswith("policy: ")
    assert rule in error["message"], error["message"]
    assert gw.emulator.requests() == []


@pytest.mark.parametrize("path,body", [
    ("/v1/agents", {"name": "a", "model": "claude-sonnet-4-6"}),
    ("/v1/agents", {"name": "a", "model": "claude-sonnet-4-6", "tools": [
        {"type": "agent_toolset_20260401", "configs": [{"name": "bash", "enabled": False}]}]}),
    ("/v1/agents", {"name": "a", "model": "claude-sonnet-4-6",
                    "mcp_servers": [{"type": "url", "name": "x", "url": "https://mcp.internal/tools"}]}),
    ("/v1/environments", {"name": "e", "config": LIMITED_NET}),
])
def test_compliant_bodies_pass(limited, path, body):
    assert limited.call("POST", path, key=POLICED, body=body).status == 200
