"""Tenants on one shared upstream key: each sees and touches only what it created.

Two tenants (acme: alice; globex: bob) share the emulator's single key. Every cross-tenant
reference — in the path of every endpoint family, or in a session-create body — is answered
404 as if the id did not exist, and the emulator records zero such calls. Lists show only
one's own resources, the owner tag is invisible, and ownership survives an Envoy restart
(re-learnt from the tag recorded upstream)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Gateway
from tests.harness import stack

ALICE, BOB, CAROL = "gw-key-alice-acme", "gw-key-bob-globex", "gw-key-carol-readonly"
TENANTS = {
    "tenants": [
        {"name": "acme"},
        {"name": "globex"},
        {"name": "auditors", "scopes": ["*:readonly"]},
    ],
    "gateway_keys": [
        {"name": "alice", "sha256": stack.sha256_hex(ALICE), "tenant": "acme"},
        {"name": "bob", "sha256": stack.sha256_hex(BOB), "tenant": "globex"},
        {"name": "carol", "sha256": stack.sha256_hex(CAROL), "tenant": "auditors"},
        {"name": "old", "sha256": stack.sha256_hex("gw-key-expired"), "tenant": "acme",
         "expires_at": "2020-01-01T00:00:00Z"},
    ],
}
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}


def start(emulator) -> Gateway:
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=TENANTS)
    return Gateway(stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start(), emulator)


@pytest.fixture(scope="module")
def world(emulator):
    gw = start(emulator)
    try:
        a = {}
        a["agent"] = gw.ok("POST", "/v1/agents", key=ALICE, body={
            "name": "acme-agent", "model": "claude-sonnet-4-6",
            # A client can neither claim another tenant nor see the tag.
            "metadata": {"team": "red", "ma_gateway_tenant": "globex"}})["id"]
        a["environment"] = gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "acme-env", "config": CLOUD})["id"]
        a["vault"] = gw.ok("POST", "/v1/vaults", key=ALICE, body={"name": "acme-vault"})["id"]
        a["credential"] = gw.ok("POST", f"/v1/vaults/{a['vault']}/credentials", key=ALICE, body={
            "name": "gh", "auth": {"type": "static_bearer", "token": "ghp_acme_secret"}})["id"]
        a["session"] = gw.ok("POST", "/v1/sessions", key=ALICE, body={
            "agent": a["agent"], "environment_id": a["environment"], "vault_ids": [a["vault"]]})["id"]
        b = {}
        b["agent"] = gw.ok("POST", "/v1/agents", key=BOB, body={"name": "globex-agent", "model": "claude-haiku-4-5"})["id"]
        b["environment"] = gw.ok("POST", "/v1/environments", key=BOB, body={"name": "globex-env", "config": CLOUD})["id"]
        yield gw, a, b
    finally:
        gw.envoy.stop()


def cross_tenant_calls(a: dict, b: dict):
    """(method, path, body) bob might try against acme's resources."""
    s, ag, e, v, c = a["session"], a["agent"], a["environment"], a["vault"], a["credential"]
    msg = {"events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]}
    calls = [
        ("GET", f"/v1/agents/{ag}", None),
        ("POST", f"/v1/agents/{ag}", {"system": "pwned"}),
        ("POST", f"/v1/agents/{ag}/archive", None),
        ("GET", f"/v1/agents/{ag}/versions", None),
        ("GET", f"/v1/sessions/{s}", None),
        ("POST", f"/v1/sessions/{s}", {"title": "pwned"}),
        ("DELETE", f"/v1/sessions/{s}", None),
        ("POST", f"/v1/sessions/{s}/archive", None),
        ("POST", f"/v1/sessions/{s}/events", msg),
        ("GET", f"/v1/sessions/{s}/events", None),
        ("GET", f"/v1/sessions/{s}/events/stream", None),
        ("GET", f"/v1/sessions/{s}/stream", None),
        ("GET", f"/v1/sessions/{s}/threads", None),
        ("GET", f"/v1/sessions/{s}/resources", None),
        ("POST", f"/v1/sessions/{s}/resources", {"type": "file", "file_id": "file_x"}),
        ("GET", f"/v1/environments/{e}", None),
        ("POST", f"/v1/environments/{e}", {"name": "pwned"}),
        ("DELETE", f"/v1/environments/{e}", None),
        ("POST", f"/v1/environments/{e}/archive", None),
        ("GET", f"/v1/environments/{e}/work", None),
        ("GET", f"/v1/vaults/{v}", None),
        ("POST", f"/v1/vaults/{v}", {"name": "pwned"}),
        ("DELETE", f"/v1/vaults/{v}", None),
        ("POST", f"/v1/vaults/{v}/archive", None),
        ("GET", f"/v1/vaults/{v}/credentials", None),
        ("POST", f"/v1/vaults/{v}/credentials", {"name": "x", "auth": {"type": "static_bearer", "token": "t"}}),
        ("GET", f"/v1/vaults/{v}/credentials/{c}", None),
        ("DELETE", f"/v1/vaults/{v}/credentials/{c}", None),
        # Body references in a session create, each alone beside bob's own resources.
        ("POST", "/v1/sessions", {"agent": ag, "environment_id": b["environment"]}),
        ("POST", "/v1/sessions", {"agent": {"type": "agent", "id": ag}, "environment_id": b["environment"]}),
        ("POST", "/v1/sessions", {"agent": {"type": "agent_with_overrides", "id": ag, "model": "claude-opus-4-6"},
                                  "environment_id": b["environment"]}),
        ("POST", "/v1/sessions", {"agent": b["agent"], "environment_id": e}),
        ("POST", "/v1/sessions", {"agent": b["agent"], "environment_id": b["environment"], "vault_ids": [v]}),
    ]
    return calls


def test_every_cross_tenant_reference_is_404_and_never_reaches_upstream(world):
    gw, a, b = world
    gw.emulator.clear_requests()
    for method, path, body in cross_tenant_calls(a, b):
        reply = gw.call(method, path, key=BOB, body=body)
        assert reply.status == 404, (method, path, reply.status, reply.body[:300])
        error = reply.json()["error"]
        assert error["type"] == "not_found_error", (method, path, error)
        assert "globex" not in error["message"] and "acme" not in error["message"]
    assert gw.emulator.requests() == []


def test_refusals_do_not_reveal_existence(world):
    gw, a, _ = world
    foreign = gw.call("GET", f"/v1/agents/{a['agent']}", key=BOB).json()["error"]["message"]
    missing = gw.call("GET", "/v1/agents/agent_doesnotexist0000000000", key=BOB).json()["error"]["message"]
    assert foreign == f"agent {a['agent']} not found"
    assert missing == "agent agent_doesnotexist0000000000 not found"


def test_lists_show_only_own_resources_and_the_tag_is_invisible(world):
    gw, a, b = world
    for family, mine, theirs in [("agents", a["agent"], b["agent"]),
                                 ("environments", a["environment"], b["environment"])]:
        alice_ids = [x["id"] for x in gw.ok("GET", f"/v1/{family}?limit=100", key=ALICE)["data"]]
        bob_ids = [x["id"] for x in gw.ok("GET", f"/v1/{family}?limit=100", key=BOB)["data"]]
        assert mine in alice_ids and theirs not in alice_ids, family
        assert theirs in bob_ids and mine not in bob_ids, family
    assert [s["id"] for s in gw.ok("GET", "/v1/sessions", key=BOB)["data"]] == []
    assert a["session"] in [s["id"] for s in gw.ok("GET", "/v1/sessions", key=ALICE)["data"]]
    assert a["vault"] not in [v["id"] for v in gw.ok("GET", "/v1/vaults", key=BOB)["data"]]

    agent = gw.ok("GET", f"/v1/agents/{a['agent']}", key=ALICE)
    assert agent["metadata"] == {"team": "red"}
    session = gw.call("GET", f"/v1/sessions/{a['session']}", key=ALICE)
    assert b"ma_gateway_tenant" not in session.body
    listing = gw.call("GET", "/v1/agents?limit=100", key=ALICE)
    assert b"ma_gateway_tenant" not in listing.body


def test_the_owner_is_recorded_upstream_and_cannot_be_overridden(world):
    gw, a, _ = world
    gw.emulator.clear_requests()
    gw.ok("POST", f"/v1/agents/{a['agent']}", key=ALICE, body={"metadata": {"team": "blue", "ma_gateway_tenant": "globex"}})
    (update,) = gw.emulator.requests()
    assert update["method"] == "POST"
    # The emulator stores what it received: read it back directly, bypassing the gateway.
    import json
    import urllib.request
    req = urllib.request.Request(f"{gw.emulator.url}/v1/agents/{a['agent']}",
                                 headers={"x-api-key": gw.emulator.api_key, "anthropic-version": "2023-06-01",
                                          "anthropic-beta": "managed-agents-2026-04-01"})
    with gw.emulator.urlopen(req) as resp:
        stored = json.loads(resp.read())
    assert stored["metadata"] == {"team": "blue", "ma_gateway_tenant": "acme"}


def test_own_resources_work_end_to_end(world):
    gw, a, _ = world
    gw.ok("POST", f"/v1/sessions/{a['session']}/events", key=ALICE, body={
        "events": [{"type": "user.message", "content": [{"type": "text", "text": "mine"}]}]})
    assert gw.ok("GET", f"/v1/vaults/{a['vault']}/credentials", key=ALICE)["data"]
    assert gw.ok("GET", f"/v1/sessions/{a['session']}/threads", key=ALICE)["data"]


def test_scopes_and_expiry(world):
    gw, _, _ = world
    gw.emulator.clear_requests()
    reply = gw.call("POST", "/v1/agents", key=CAROL, body={"name": "x", "model": "claude-haiku-4-5"})
    assert reply.status == 403
    assert reply.json()["error"] == {"type": "permission_error",
                                     "message": "missing scope agents:create: your tenant is not allowed this operation"}
    expired = gw.call("GET", "/v1/agents", key="gw-key-expired")
    assert (expired.status, expired.json()["error"]["message"]) == (401, "gateway key expired")
    assert gw.emulator.requests() == []
    assert gw.call("GET", "/v1/agents", key=CAROL).status == 200


def test_ownership_survives_a_restart(world, emulator):
    gw, a, b = world
    gw.envoy.stop()
    fresh = start(emulator)  # empty shared data: owners are re-learnt from the upstream tag
    try:
        emulator.clear_requests()
        for method, path, body in cross_tenant_calls(a, b):
            reply = fresh.call(method, path, key=BOB, body=body)
            assert reply.status == 404, (method, path, reply.status, reply.body[:300])
        # Only the gateway's own ownership lookups reached upstream; none of bob's calls did.
        seen = {(r["method"], r["path"]) for r in emulator.requests()}
        lookups = {("GET", f"/v1/{f}/{a[k]}") for f, k in
                   [("agents", "agent"), ("sessions", "session"), ("environments", "environment"), ("vaults", "vault")]}
        assert seen <= lookups | {("GET", f"/v1/agents/{b['agent']}"), ("GET", f"/v1/environments/{b['environment']}")}, seen
        assert fresh.ok("GET", f"/v1/agents/{a['agent']}", key=ALICE)["id"] == a["agent"]
    finally:
        fresh.envoy.stop()
        gw.envoy = start(emulator).envoy  # keep the module fixture usable after this test
        gw.port, gw.url = gw.envoy.listen_port, gw.envoy.url


def test_a_list_filter_naming_a_foreign_id_answers_as_for_an_unknown_id(world):
    """`GET /v1/sessions?agent_id=<bob's agent>` by alice must not tell her the agent exists
    (before: a page with a cursor when bob had more sessions than `limit`, an empty page
    without one for an unknown id)."""
    gw, _, b = world
    for _ in range(2):
        gw.ok("POST", "/v1/sessions", key=BOB, body={"agent": b["agent"], "environment_id": b["environment"]})
    missing = "agent_doesnotexist0000000001"

    def shape(agent_id: str, query: str):
        reply = gw.call("GET", query.format(agent_id), key=ALICE)
        body = reply.json()
        body.pop("request_id", None)
        return reply.status, json_shape(body, agent_id)

    for query in ["/v1/sessions?agent_id={}&limit=1",
                  "/v1/sessions?limit=1&agent_id={}",
                  # Percent-encoded spellings name the same id upstream.
                  "/v1/sessions?agent%5Fid={}&limit=1"]:
        foreign = shape(b["agent"], query)
        unknown = shape(missing, query)
        assert foreign == unknown, (query, foreign, unknown)
        assert foreign[0] == 404, foreign
    encoded = b["agent"].replace("agent_", "agent%5F")
    assert gw.call("GET", f"/v1/sessions?agent_id={encoded}&limit=1", key=ALICE).status == 404
    # Bob's own filter still works.
    assert len(gw.ok("GET", f"/v1/sessions?agent_id={b['agent']}&limit=5", key=BOB)["data"]) == 2


def json_shape(value, agent_id: str):
    """The value with the id replaced by a placeholder and cursors reduced to present/absent."""
    if isinstance(value, dict):
        return {k: ("cursor" if k in ("next_page", "prev_page") and v else json_shape(v, agent_id))
                for k, v in value.items()}
    if isinstance(value, list):
        return [json_shape(v, agent_id) for v in value]
    if isinstance(value, str):
        return value.replace(agent_id, "<id>")
    return value
