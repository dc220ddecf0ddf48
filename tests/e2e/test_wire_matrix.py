"""How a body arrives never changes a decision, and a refusal sends nothing upstream.

The matrix: every security-relevant body the gateway inspects (policy on create and on update,
a vault credential under policy,
tenant references in a session create with a cold and a warm owner cache, the budget clamp,
the owner tag, the inspection cap, an encoded request body) × every way a body arrives
(HTTP/1.1 with content-length, chunked in pieces with pauses, chunked with trailers; HTTP/2 in
one DATA frame, in many with pauses, followed by a trailers frame) × every `accept-encoding` a
client may offer. Each cell asserts the exact status and error type, that a refusal reached
the upstream with nothing at all (the emulator records a request the moment its head arrives),
and, for calls let through, what the upstream stored and what the client read back (plain
JSON, owner tag stripped), whatever compression the client offered.
"""

from __future__ import annotations

import gzip
import itertools
import json
import time
import urllib.request

import pytest

from tests.e2e import wire
from tests.e2e.conftest import MANAGED_AGENTS_BETA, Gateway, configured_gateway
from tests.e2e.test_metering import expected_cost
from tests.e2e.test_sdk import metering_snapshot
from tests.harness import stack

ALICE, BOB, POLICED, MONEY = "gw-wire-alice", "gw-wire-bob", "gw-wire-policed", "gw-wire-money"
TAG = "ma_gateway_tenant"
CAP = 4096
CONFIG = {
    "tenants": [{"name": n} for n in ("alice", "bob", "policed", "money")],
    "gateway_keys": [{"name": n, "sha256": stack.sha256_hex(k), "tenant": n}
                     for n, k in [("alice", ALICE), ("bob", BOB), ("policed", POLICED), ("money", MONEY)]],
    "isolation": {"max_body_bytes": CAP},
    "limits": {"budgets": {"tenants": {"money": {"microdollars_per_day": 50_000_000}}}},
    "policy": {"tenants": {"policed": {"models": {"allow": ["claude-sonnet-4-*"]}, "vaults": False}}},
    # Lookups in this module are the gateway's own; keep the reconciler out of the request log.
    "metering": {"reconcile_interval_secs": 0},
}
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}
LOOKUP_AGENT = "ma-gateway-reconciler"

ARRIVALS = {
    "h1-content-length": lambda port, path, headers, data: wire.http1(
        port, "POST", path, headers, wire.Body([data]), chunked=False),
    "h1-chunked-pauses": lambda port, path, headers, data: wire.http1(
        port, "POST", path, headers, wire.Body(wire.split(data, 4), pause_s=0.04), chunked=True),
    "h1-chunked-trailers": lambda port, path, headers, data: wire.http1(
        port, "POST", path, headers, wire.Body(wire.split(data, 3), pause_s=0.02, trailers=[("x-checksum", "1")]),
        chunked=True),
    "h2-one-frame": lambda port, path, headers, data: wire.http2(
        port, "POST", path, headers, wire.Body([data])),
    "h2-frames-pauses": lambda port, path, headers, data: wire.http2(
        port, "POST", path, headers, wire.Body(wire.split(data, 4), pause_s=0.04)),
    "h2-trailers": lambda port, path, headers, data: wire.http2(
        port, "POST", path, headers, wire.Body(wire.split(data, 3), pause_s=0.02, trailers=[("x-checksum", "1")])),
}
OFFERS = [None, "identity", "gzip", "gzip, deflate", "br", "zstd"]


def direct(emulator, method: str, path: str, body=None) -> dict:
    """A call straight to the emulator (never through the gateway): a resource created by
    another replica or before this gateway started, i.e. one this gateway's cache never saw."""
    req = urllib.request.Request(
        emulator.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"x-api-key": emulator.api_key, "anthropic-version": "2023-06-01",
                 "anthropic-beta": MANAGED_AGENTS_BETA, "content-type": "application/json"})
    with emulator.urlopen(req) as resp:
        data = resp.read()
        # Only an emulator told to compress whatever is offered (`compression="always"`) does.
        return json.loads(gzip.decompress(data) if resp.headers.get("content-encoding") == "gzip" else data)


def cold_agent(emulator, tenant: str, model: str = "claude-sonnet-4-6") -> str:
    return direct(emulator, "POST", "/v1/agents",
                  {"name": "cold", "model": model, "metadata": {TAG: tenant}})["id"]


def cold_vault(emulator, tenant: str) -> str:
    return direct(emulator, "POST", "/v1/vaults", {"name": "cold", "metadata": {TAG: tenant}})["id"]


def client_requests(emulator) -> list[dict]:
    """What reached the upstream on behalf of clients (the gateway's own owner lookups aside)."""
    def is_lookup(r):
        return r["method"] == "GET" and any(
            n.lower() == "user-agent" and v == LOOKUP_AGENT for n, v in r["headers"])
    return [r for r in emulator.requests() if not is_lookup(r)]


@pytest.fixture(scope="module")
def wired(emulator):
    config = stack.render_envoy_config(upstream=emulator.upstream, listen_port=0, admin_port=0,
                                       gateway_keys={}, plugin_overrides=CONFIG)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    gw = Gateway(envoy, emulator)
    ctx = {}
    for tenant, key in (("alice", ALICE), ("bob", BOB), ("money", MONEY)):
        ctx[f"{tenant}_agent"] = gw.ok("POST", "/v1/agents", key=key,
                                       body={"name": tenant, "model": "claude-sonnet-4-6"})["id"]
        ctx[f"{tenant}_env"] = gw.ok("POST", "/v1/environments", key=key,
                                     body={"name": tenant, "config": CLOUD})["id"]
    gw.ctx = ctx
    yield gw
    envoy.stop()


def own_gateway(emulator, **render) -> Gateway:
    """A gateway of this test's own on `emulator`, with the module's plugin config."""
    return configured_gateway(emulator, CONFIG, **render)


def alice_session(gw: Gateway) -> tuple[str, str, str]:
    """A fresh agent, environment and session of alice's, created through `gw`."""
    agent = gw.ok("POST", "/v1/agents", key=ALICE, body={"name": "a", "model": "claude-sonnet-4-6"})["id"]
    env = gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "e", "config": CLOUD})["id"]
    return agent, env, gw.ok("POST", "/v1/sessions", key=ALICE, body={"agent": agent, "environment_id": env})["id"]


def gzipped(body: dict) -> bytes:
    return gzip.compress(json.dumps(body).encode())


# name -> (key, path(gw), body(gw) as bytes, extra request headers, expected status, error type)
OPERATIONS = {
    "policy-agent-create": (
        POLICED, lambda gw: "/v1/agents",
        lambda gw: json.dumps({"name": "a", "model": "claude-opus-4-6"}).encode(), {}, 403, "permission_error"),
    "policy-agent-update-cold-owner": (
        POLICED, lambda gw: f"/v1/agents/{cold_agent(gw.emulator, 'policed')}",
        lambda gw: json.dumps({"model": "claude-opus-4-6"}).encode(), {}, 403, "permission_error"),
    "policy-credential-create-cold-vault": (
        POLICED, lambda gw: f"/v1/vaults/{cold_vault(gw.emulator, 'policed')}/credentials",
        lambda gw: json.dumps({"display_name": "c", "auth": {"type": "static_bearer", "token": "t0k",
                                                              "mcp_server_url": "https://mcp.example/x"}}).encode(),
        {}, 403, "permission_error"),
    "policy-vault-create": (
        POLICED, lambda gw: "/v1/vaults", lambda gw: json.dumps({"name": "v"}).encode(), {}, 403,
        "permission_error"),
    "isolation-session-foreign-agent-cold": (
        ALICE, lambda gw: "/v1/sessions",
        lambda gw: json.dumps({"agent": cold_agent(gw.emulator, "bob"),
                               "environment_id": gw.ctx["alice_env"]}).encode(), {}, 404, "not_found_error"),
    "isolation-session-foreign-env-warm": (
        ALICE, lambda gw: "/v1/sessions",
        lambda gw: json.dumps({"agent": gw.ctx["alice_agent"], "environment_id": gw.ctx["bob_env"]}).encode(),
        {}, 404, "not_found_error"),
    "inspection-cap": (
        ALICE, lambda gw: "/v1/agents",
        lambda gw: json.dumps({"name": "big", "model": "claude-sonnet-4-6", "system": "x" * CAP}).encode(),
        {}, 413, "request_too_large"),
    "encoded-request-body": (
        ALICE, lambda gw: "/v1/agents",
        lambda gw: gzipped({"name": "gz", "model": "claude-sonnet-4-6"}), {"content-encoding": "gzip"}, 415,
        "invalid_request_error"),
    "budget-clamp-session-create": (
        MONEY, lambda gw: "/v1/sessions",
        lambda gw: json.dumps({"agent": gw.ctx["money_agent"], "environment_id": gw.ctx["money_env"],
                               "budget": {"type": "limit", "max_list_cost": {"amount": "90000", "currency": "USD"}}}
                              ).encode(), {}, 200, None),
    "owner-tag-agent-create": (
        ALICE, lambda gw: "/v1/agents",
        lambda gw: json.dumps({"name": "tagged", "model": "claude-sonnet-4-6", "metadata": {TAG: "bob"}}).encode(),
        {}, 200, None),
}


def headers_for(key: str, offer: str | None, extra: dict[str, str]) -> dict[str, str]:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": MANAGED_AGENTS_BETA,
               "content-type": "application/json", **extra}
    if offer is not None:
        headers["accept-encoding"] = offer
    return headers


@pytest.mark.parametrize("operation,arrival,offer", list(itertools.product(OPERATIONS, ARRIVALS, OFFERS)))
def test_decision_is_the_same_however_the_body_arrives(wired, operation, arrival, offer):
    gw = wired
    key, path_of, body_of, extra, status, error_type = OPERATIONS[operation]
    path, data = path_of(gw), body_of(gw)
    gw.emulator.clear_requests()
    reply = ARRIVALS[arrival](gw.port, path, headers_for(key, offer, extra), data)
    assert reply.status == status, (reply.status, reply.headers, reply.body[:300])
    # Whatever the client offered, it reads plain JSON (the gateway asked upstream for identity).
    assert reply.headers.get("content-encoding", "identity") == "identity", reply.headers
    body = reply.json()
    if error_type is not None:
        assert body["type"] == "error" and body["error"]["type"] == error_type, body
        assert client_requests(gw.emulator) == [], "a refused call reached the upstream"
        return
    arrived = client_requests(gw.emulator)
    assert [(r["method"], r["path"]) for r in arrived] == [("POST", path)], arrived
    headers = {n.lower(): v for n, v in arrived[0]["headers"]}
    assert headers.get("accept-encoding") == "identity", headers
    stored = direct(gw.emulator, "GET", f"{path}/{body['id']}")
    if operation == "budget-clamp-session-create":
        assert stored["budget"] == {"type": "limit", "max_list_cost": {"amount": "5000", "currency": "USD"}}
        # The session reserved all the tenant has left: archived, it gives it back for the next.
        archived = ARRIVALS["h1-content-length"](gw.port, f"{path}/{body['id']}/archive", headers_for(key, None, {}), b"{}")
        assert archived.status == 200, (archived.status, archived.body[:300])
    if operation == "owner-tag-agent-create":
        # The client's forged tag is replaced by its own tenant, and never shown back to it.
        assert stored["metadata"][TAG] == "alice", stored["metadata"]
        assert TAG not in body.get("metadata", {}), body
        assert gw.call("GET", f"/v1/agents/{body['id']}", key=BOB).status == 404


def test_another_replica_with_a_cold_cache_decides_the_same(wired, emulator):
    """A resource created through one gateway is judged the same by a second one (another
    replica, or this one after a restart) that never saw it: its owner is re-learnt upstream."""
    gw = wired
    config = stack.render_envoy_config(upstream=emulator.upstream, listen_port=0, admin_port=0,
                                       gateway_keys={}, plugin_overrides=CONFIG)
    replica = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    try:
        for arrival in ARRIVALS:
            agent = gw.ok("POST", "/v1/agents", key=BOB, body={"name": "b", "model": "claude-sonnet-4-6"})["id"]
            emulator.clear_requests()
            data = json.dumps({"agent": agent, "environment_id": gw.ctx["alice_env"]}).encode()
            reply = ARRIVALS[arrival](replica.listen_port, "/v1/sessions", headers_for(ALICE, "gzip", {}), data)
            assert reply.status == 404, (arrival, reply.status, reply.body[:200])
            assert client_requests(emulator) == [], arrival
            # Its owner is now known there: the rightful tenant goes through.
            data = json.dumps({"agent": agent, "environment_id": gw.ctx["bob_env"]}).encode()
            reply = ARRIVALS[arrival](replica.listen_port, "/v1/sessions", headers_for(BOB, "gzip", {}), data)
            assert reply.status == 200, (arrival, reply.status, reply.body[:200])
    finally:
        replica.stop()


@pytest.mark.parametrize("protocol,offer", list(itertools.product(["h1", "h2"], OFFERS)))
def test_streams_are_metered_exactly_whatever_the_client_offers(wired, protocol, offer):
    """A turn streamed over HTTP/1.1 or HTTP/2 with each offer: the client reads plain SSE and
    the gateway's counters grow by exactly what the emulator emitted for the session."""
    gw = wired
    agent = gw.ok("POST", "/v1/agents", key=BOB, body={"name": "m", "model": "claude-haiku-4-5"})["id"]
    sid = gw.ok("POST", "/v1/sessions", key=BOB,
                body={"agent": agent, "environment_id": gw.ctx["bob_env"]})["id"]
    before = metering_snapshot(gw, "claude-haiku-4-5", tenant="bob")
    headers = headers_for(BOB, offer, {"accept": "text/event-stream"})
    reply = wire.stream_around(
        gw.port, f"/v1/sessions/{sid}/events/stream", headers, b"session.status_idle", protocol=protocol,
        action=lambda: gw.ok("POST", f"/v1/sessions/{sid}/events", key=BOB, body={"events": [
            {"type": "user.message", "content": [{"type": "text", "text": "metered on the wire"}]}]}))
    assert reply.status == 200 and reply.headers.get("content-encoding", "identity") == "identity", reply.headers
    assert b"event: session.status_idle" in reply.body or b'"session.status_idle"' in reply.body
    # The stream is closed by the client; the gateway has metered every span it carried.
    gw.ok("GET", f"/v1/sessions/{sid}", key=BOB)
    assert_metered_exactly_for(gw, sid, before, "claude-haiku-4-5", "bob")


def assert_metered_exactly_for(gw, sid, before, model, tenant):
    truth = gw.emulator.usage(sid)
    after = metering_snapshot(gw, model, tenant=tenant)
    grown = {k: after[k] - before[k] for k in after}
    assert grown["input"] == truth["input_tokens"] > 0, (grown, truth)
    assert grown["output"] == truth["output_tokens"] > 0, (grown, truth)
    assert grown["cache_read"] == truth["cache_read_input_tokens"], (grown, truth)
    assert grown["cache_write"] == truth["cache_creation_input_tokens"], (grown, truth)
    assert grown["runtime"] == truth["active_seconds"], (grown, truth)
    assert grown["cost"] == expected_cost(truth, model) > 0, (grown, truth)


def _gateway_without_the_envoy_setting(emulator, overrides: dict) -> stack.Envoy:
    config = stack.render_envoy_config(upstream=emulator.upstream, listen_port=0, admin_port=0,
                                       gateway_keys={}, plugin_overrides={**CONFIG, **overrides})
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
    del wasm["allow_on_headers_stop_iteration"]
    return stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()


def test_a_config_without_allow_on_headers_stop_iteration_answers_500_naming_it(emulator):
    """The careless operator: the plugin holds heads (the default) but Envoy was not told to
    let it. Such a call is answered 500 with the setting's name (and logged), not left hanging,
    and nothing reaches the upstream; `hold_request_head: false` then works without it."""
    envoy = _gateway_without_the_envoy_setting(emulator, {})
    try:
        emulator.clear_requests()
        data = json.dumps({"name": "a", "model": "claude-sonnet-4-6"}).encode()
        reply = wire.http1(envoy.listen_port, "POST", "/v1/agents", headers_for(ALICE, None, {}),
                           wire.Body([data]), chunked=False, timeout=30)
        assert reply.status == 500, reply.body
        assert "allow_on_headers_stop_iteration" in reply.json()["error"]["message"]
        assert client_requests(emulator) == []
        assert "set `allow_on_headers_stop_iteration: true`" in envoy.log()
    finally:
        envoy.stop()
    envoy = _gateway_without_the_envoy_setting(emulator, {"isolation": {"max_body_bytes": CAP,
                                                                        "hold_request_head": False}})
    try:
        for arrival in ("h1-content-length", "h2-trailers"):
            data = json.dumps({"name": "a", "model": "claude-sonnet-4-6"}).encode()
            assert ARRIVALS[arrival](envoy.listen_port, "/v1/agents", headers_for(ALICE, "gzip", {}),
                                     data).status == 200
            data = json.dumps({"name": "a", "model": "claude-opus-4-6"}).encode()
            reply = ARRIVALS[arrival](envoy.listen_port, "/v1/agents", headers_for(POLICED, "gzip", {}), data)
            assert reply.status == 403, reply.body
    finally:
        envoy.stop()


def test_a_response_it_must_read_that_arrives_encoded_anyway_is_a_502_never_unread_bytes(emulator):
    """An upstream (or a middlebox) that starts compressing although the gateway asks for
    identity: owned JSON (owner tag to strip, list to filter) and event streams (usage to meter)
    are answered 502 api_error instead of being passed on unread; an owner lookup that cannot be
    read fails closed (503). The client never sees the compressed bytes."""
    gw = own_gateway(emulator)
    envoy = gw.envoy
    try:
        agent, _, sid = alice_session(gw)
        cold = cold_agent(emulator, "alice")
        set_mode = lambda mode: emulator.urlopen(urllib.request.Request(  # noqa: E731
            emulator.url + "/_emulator/compression", method="POST", data=json.dumps({"mode": mode}).encode(),
            headers={"content-type": "application/json"})).read()
        set_mode("always")
        try:
            cases = [(f"/v1/agents/{agent}", None, 502), (f"/v1/agents/{agent}", "gzip", 502),
                     ("/v1/agents", "br", 502), (f"/v1/sessions/{sid}/events/stream", "gzip, deflate", 502),
                     (f"/v1/sessions/{sid}/events", None, 502), (f"/v1/agents/{cold}", "gzip", 503)]
            for path, offer, status in cases:
                for protocol in ("h1", "h2"):
                    headers = headers_for(ALICE, offer, {})
                    if protocol == "h1":
                        reply = wire.http1(envoy.listen_port, "GET", path, headers, None, chunked=False)
                    else:
                        reply = wire.http2(envoy.listen_port, "GET", path, headers, None)
                    assert reply.status == status, (path, protocol, reply.status, reply.body[:200])
                    assert "content-encoding" not in reply.headers, reply.headers
                    error = reply.json()["error"]
                    if status == 502:
                        assert error["type"] == "api_error" and "content-encoding gzip" in error["message"], error
                    else:
                        assert error["type"] == "overloaded_error", error
        finally:
            set_mode("configured")
        assert gw.call("GET", f"/v1/agents/{agent}", key=ALICE).status == 200
    finally:
        envoy.stop()


@pytest.mark.parametrize("arrival", list(ARRIVALS))
def test_without_the_envoy_setting_the_buffer_filter_keeps_refusals_off_the_upstream(emulator, arrival):
    """Hosts that cannot set allow_on_headers_stop_iteration (Istio's WasmPlugin, Envoy
    Gateway): `hold_request_head: false` alone lets a body refusal's head reach the upstream
    before the reset; Envoy's buffer filter between the Wasm filter and the router (what
    examples/istio/envoyfilter-buffer.yaml adds) holds head and body until the filter has
    decided, so the upstream again sees nothing."""
    config = stack.render_envoy_config(upstream=emulator.upstream, listen_port=0, admin_port=0, gateway_keys={},
                                       plugin_overrides={**CONFIG, "isolation": {"max_body_bytes": CAP,
                                                                                 "hold_request_head": False}})
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
    del wasm["allow_on_headers_stop_iteration"]
    hcm["http_filters"].insert(len(hcm["http_filters"]) - 1, {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                         "max_request_bytes": 1048576}})
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    try:
        for key, body, status in [(POLICED, {"name": "a", "model": "claude-opus-4-6"}, 403),
                                  (ALICE, {"name": "a", "model": "claude-sonnet-4-6", "system": "x" * CAP}, 413),
                                  (ALICE, {"name": "a", "model": "claude-sonnet-4-6"}, 200)]:
            emulator.clear_requests()
            reply = ARRIVALS[arrival](envoy.listen_port, "/v1/agents", headers_for(key, "gzip", {}),
                                      json.dumps(body).encode())
            assert reply.status == status, (reply.status, reply.body[:200])
            assert len(client_requests(emulator)) == (1 if status == 200 else 0), client_requests(emulator)
    finally:
        envoy.stop()


@pytest.mark.parametrize("arrival", list(ARRIVALS))
def test_sent_event_types_are_audited_however_the_body_arrives(emulator, tmp_path, arrival):
    """`POST …/events` bodies are read for the audit record (the event types, never their
    content) on every arrival, trailers included, and the events reach the session."""
    audit = tmp_path / "audit.log"
    gw = own_gateway(emulator, audit_path=audit)
    envoy = gw.envoy
    try:
        _, _, sid = alice_session(gw)
        data = json.dumps({"events": [
            {"type": "user.message", "content": [{"type": "text", "text": "secret words"}]},
            {"type": "user.interrupt"}]}).encode()
        reply = ARRIVALS[arrival](envoy.listen_port, f"/v1/sessions/{sid}/events", headers_for(ALICE, "gzip", {}), data)
        assert reply.status == 200, reply.body[:200]

        def sent():
            for line in audit.read_text().splitlines() if audit.exists() else []:
                record = json.loads(line)
                if record.get("operation") == "session_events.send_events":
                    return record
            return None
        deadline = time.monotonic() + 10
        while sent() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        record = sent()
        assert record is not None and record["events"] == "user.message,user.interrupt", record
        assert "secret words" not in audit.read_text()
        history = gw.ok("GET", f"/v1/sessions/{sid}/events?limit=100", key=ALICE)["data"]
        assert any(e["type"] == "user.interrupt" for e in history)
    finally:
        envoy.stop()
