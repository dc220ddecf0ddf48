"""What the gateway refuses, strips and injects — checked against what the emulator received."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA, start_gateway


def assert_envelope(reply, status: int, kind: str):
    assert reply.status == status, reply.body
    body = reply.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert body["request_id"].startswith("req_")
    assert reply.headers["content-type"] == "application/json"
    return body["error"]["message"]


def test_missing_and_wrong_keys_get_401_and_never_reach_upstream(gateway):
    gateway.emulator.clear_requests()
    message = assert_envelope(gateway.call("GET", "/v1/agents", key=None), 401, "authentication_error")
    assert "x-api-key" in message
    assert_envelope(gateway.call("GET", "/v1/agents", key="wrong"), 401, "authentication_error")
    assert_envelope(gateway.call("GET", "/v1/agents", key=KEYS["alice"] + "x", auth="bearer"), 401,
                    "authentication_error")
    # An upstream key is not a gateway key.
    assert_envelope(gateway.call("GET", "/v1/agents", key=gateway.emulator.api_key), 401, "authentication_error")
    assert gateway.emulator.requests() == []


def test_both_key_headers_are_accepted(gateway):
    assert gateway.call("GET", "/v1/agents", key=KEYS["alice"]).status == 200
    assert gateway.call("GET", "/v1/agents", key=KEYS["bob"], auth="bearer").status == 200


def test_client_credentials_never_reach_upstream_and_the_key_is_injected(gateway):
    gateway.emulator.clear_requests()
    gateway.call("GET", "/v1/agents", headers={"cookie": "sid=abc", "proxy-authorization": "Basic eA=="})
    gateway.call("GET", "/v1/vaults", key=KEYS["bob"], auth="bearer")
    gateway.call("POST", "/v1/agents", body={"name": "x", "model": "claude-haiku-4-5"},
                 headers={"x-api-key": KEYS["alice"], "authorization": f"Bearer {KEYS['bob']}"})
    received = gateway.emulator.requests()
    assert len(received) == 3
    for request in received:
        headers = request["headers"]
        names = [n for n, _ in headers]
        values = " ".join(v for _, v in headers)
        for key in KEYS.values():
            assert key not in values, request
        assert "authorization" not in names and "cookie" not in names and "proxy-authorization" not in names
        assert [v for n, v in headers if n == "x-api-key"] == [gateway.emulator.api_key]
        # `host` on HTTP/1.1, `:authority` on HTTP/2 (what the emulator saw on the wire).
        assert [v for n, v in headers if n in ("host", ":authority")] == [gateway.emulator.address]


def test_upstream_key_never_reaches_the_client(gateway):
    key = gateway.emulator.api_key
    agent = gateway.ok("POST", "/v1/agents", body={"name": "leak-check", "model": "claude-sonnet-4-6"})
    replies = [
        gateway.call("GET", "/v1/agents"),
        gateway.call("GET", f"/v1/agents/{agent['id']}"),
        gateway.call("GET", "/v1/agents/agent_doesnotexist"),
        gateway.call("POST", "/v1/sessions", body={"agent": "agent_nope", "environment_id": "env_nope"}),
        gateway.call("GET", "/v1/messages"),
        gateway.call("GET", "/v1/agents", key="wrong"),
    ]
    for reply in replies:
        assert key not in reply.body.decode(errors="replace")
        assert all(key not in v for v in reply.headers.values())


def test_betas_are_merged_and_unknown_ones_refused(gateway):
    gateway.emulator.clear_requests()
    gateway.ok("GET", "/v1/agents", headers={"anthropic-beta": "files-api-2025-04-14"})
    gateway.ok("GET", "/v1/agents", headers={"anthropic-beta": None})
    received = gateway.emulator.requests()
    betas = [[v for n, v in r["headers"] if n == "anthropic-beta"] for r in received]
    assert betas == [[f"files-api-2025-04-14,{MANAGED_AGENTS_BETA}"], [MANAGED_AGENTS_BETA]]

    gateway.emulator.clear_requests()
    message = assert_envelope(
        gateway.call("GET", "/v1/agents", headers={"anthropic-beta": f"{MANAGED_AGENTS_BETA},evil-2099-01-01"}),
        400, "invalid_request_error")
    assert '"evil-2099-01-01" is not allowed' in message
    assert gateway.emulator.requests() == []


def test_anthropic_version_is_set_only_when_absent(gateway):
    gateway.emulator.clear_requests()
    gateway.ok("GET", "/v1/agents", headers={"anthropic-version": None})
    gateway.ok("GET", "/v1/agents", headers={"anthropic-version": "2026-10-21"})
    versions = [[v for n, v in r["headers"] if n == "anthropic-version"] for r in gateway.emulator.requests()]
    assert versions == [["2023-06-01"], ["2026-10-21"]]


def test_query_strings_pass_through_untouched(gateway):
    gateway.emulator.clear_requests()
    query = "?statuses[]=idle&statuses%5B%5D=running&limit=5&beta=true&created_at[gte]=2026-01-01T00:00:00Z"
    gateway.ok("GET", "/v1/sessions" + query)
    assert [r["path"] for r in gateway.emulator.requests()] == ["/v1/sessions" + query]


REFUSED = [
    "/v1/messages",
    "/v1/complete",
    "/_emulator/requests",
    "/_emulator/usage/sesn_x",
    "/v1",
    "/v1/",
    "/V1/agents",
    "/v1/Agents",
    "/v1/agents/",
    "/v1/sessions/sesn_1%2Fevents",
    "/v1/sessions/sesn_1%2fstream",
    "/v1/sessions/agent_notasession",
    "/v1/sessions/" + "sesn_" + "a" * 200,
    "/v1/agents/agent_1/delete",
    "/v1/files",
    "/v1/skills",
    "/v1/memory_stores",
    "/v1/sessions/sesn_1/events/stream/extra",
]


@pytest.mark.parametrize("path", REFUSED)
def test_refused_paths_get_404_envelope_and_never_reach_upstream(gateway, path):
    gateway.emulator.clear_requests()
    reply = gateway.call("GET", path)
    assert reply.status in (400, 404), (path, reply.status, reply.body)
    if reply.status == 404:
        assert_envelope(reply, 404, "not_found_error")
    assert gateway.emulator.requests() == [], path


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD", "OPTIONS"])
def test_unknown_methods_are_refused(gateway, method):
    gateway.emulator.clear_requests()
    reply = gateway.call(method, "/v1/agents")
    assert reply.status == 404
    assert gateway.emulator.requests() == []


@pytest.mark.parametrize("raw,forwarded", [
    ("/v1/sessions/../agents", "/v1/agents"),
    ("/v1/vaults/./../agents", "/v1/agents"),
    ("//v1//agents", "/v1/agents"),
    # Envoy decodes percent-encoded unreserved characters; '%2F' is not one and stays refused.
    ("/v1/%61gents", "/v1/agents"),
])
def test_normalised_paths_reach_upstream_only_as_what_was_classified(gateway, raw, forwarded):
    """Envoy normalises dot segments and slashes before the filter; the filter classifies the
    normalised path, which is exactly what is forwarded."""
    gateway.emulator.clear_requests()
    reply = gateway.call("GET", raw)
    assert reply.status == 200, reply.body
    assert [r["path"] for r in gateway.emulator.requests()] == [forwarded]


def test_without_upstream_credential_calls_get_503_and_nothing_is_forwarded(emulator):
    envoy = start_gateway(emulator, api_key=None)
    try:
        from tests.e2e.conftest import Gateway

        gw = Gateway(envoy, emulator)
        emulator.clear_requests()
        message = assert_envelope(gw.call("GET", "/v1/agents"), 503, "overloaded_error")
        assert "ANTHROPIC_API_KEY" in message
        assert emulator.requests() == []
        # Authentication still comes first.
        assert gw.call("GET", "/v1/agents", key="wrong").status == 401
    finally:
        envoy.stop()


def test_gateway_errors_are_not_retried_by_sdks(gateway):
    reply = gateway.call("GET", "/v1/messages")
    assert reply.headers["x-should-retry"] == "false"
    assert json.loads(reply.body)["request_id"].startswith("req_gw_")


def test_rate_limit_descriptor_headers_never_reach_upstream(gateway):
    """The filter sets x-ma-gateway-tenant/class for Envoy's global rate-limit filter; a client's
    own copies are overwritten, and the route removes both before the call goes upstream."""
    gateway.emulator.clear_requests()
    gateway.ok("GET", "/v1/agents", headers={"x-ma-gateway-tenant": "someone-else", "x-ma-gateway-class": "read"})
    (received,) = gateway.emulator.requests()
    names = [n for n, _ in received["headers"]]
    assert "x-ma-gateway-tenant" not in names and "x-ma-gateway-class" not in names
