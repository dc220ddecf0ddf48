"""Every guarantee a create checks holds on the update path too, in real Envoy (2 workers).

A session created under a tenant's cost budget carries a budget clamped to what the tenant has
left; `POST /v1/sessions/{id}` must not be a way around that (remove it, raise it), nor around
isolation (another tenant's vault or session in the body) or policy (a denied model, tools,
networking, vault credentials)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.e2e.conftest import Gateway
from tests.harness import stack

MONEY, POLICED, OTHER = "gw-key-upd-money", "gw-key-upd-policed", "gw-key-upd-other"
DAILY_MICRO = 50_000_000  # $50.00 = 5000 cents
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}
LIMITED_NET = {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["pypi.org"]}}

CONFIG = {
    "tenants": [{"name": n} for n in ("money", "policed", "other")],
    "gateway_keys": [
        {"name": n, "sha256": stack.sha256_hex(k), "tenant": n}
        for n, k in [("money", MONEY), ("policed", POLICED), ("other", OTHER)]
    ],
    "limits": {"budgets": {"tenants": {"money": {"microdollars_per_day": DAILY_MICRO}}}},
    "policy": {"tenants": {"policed": {
        "models": {"allow": ["claude-sonnet-4-*"]},
        "tools": {"deny": ["bash"]},
        "environments": {"forbid_unrestricted": True},
        "vaults": False,
    }}},
}


def budget(cents: str):
    return {"type": "limit", "max_list_cost": {"amount": cents, "currency": "USD"}}


@pytest.fixture(scope="module")
def gw(emulator):
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=CONFIG)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key), concurrency=2).start()
    yield Gateway(envoy, emulator)
    envoy.stop()


def upstream_session(gw, sid):
    """The session as the upstream stores it (read past the gateway)."""
    req = urllib.request.Request(f"{gw.emulator.url}/v1/sessions/{sid}", headers={
        "x-api-key": gw.emulator.api_key, "anthropic-version": "2023-06-01",
        "anthropic-beta": "managed-agents-2026-04-01"})
    with gw.emulator.urlopen(req) as resp:
        return json.loads(resp.read())


def new_session(gw, key, model="claude-sonnet-4-6", env_config=LIMITED_NET):
    agent = gw.ok("POST", "/v1/agents", key=key, body={"name": "u", "model": model})
    env = gw.ok("POST", "/v1/environments", key=key, body={"name": "u", "config": env_config})
    sid = gw.ok("POST", "/v1/sessions", key=key,
                body={"agent": agent["id"], "environment_id": env["id"]})["id"]
    return agent["id"], env["id"], sid


def forwarded(gw, method, path):
    return [r for r in gw.emulator.requests() if r["method"] == method and r["path"] == path]


# ---- the session budget ----

def test_an_update_cannot_remove_the_clamped_budget(gw):
    _, _, sid = new_session(gw, MONEY)
    assert upstream_session(gw, sid)["budget"] == budget("5000")
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=MONEY, body={"budget": None})
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error == {"type": "permission_error", "message":
                     "policy: a session budget cannot be removed while the tenant has a cost budget"}
    assert forwarded(gw, "POST", f"/v1/sessions/{sid}") == []
    assert upstream_session(gw, sid)["budget"] == budget("5000")


def test_an_update_cannot_raise_the_budget_above_what_is_left(gw):
    _, _, sid = new_session(gw, MONEY)
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=MONEY, body={"budget": budget("999999")})
    assert reply.status == 200, reply.body
    assert upstream_session(gw, sid)["budget"] == budget("5000")
    # Unreadable amounts are replaced by the ceiling too, never passed on.
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=MONEY,
                    body={"budget": {"type": "limit", "max_list_cost": {"amount": "1e9", "currency": "USD"}}})
    assert reply.status == 200, reply.body
    assert upstream_session(gw, sid)["budget"] == budget("5000")


def test_an_update_may_lower_the_budget_and_leave_it_alone(gw):
    _, _, sid = new_session(gw, MONEY)
    assert gw.call("POST", f"/v1/sessions/{sid}", key=MONEY, body={"budget": budget("120")}).status == 200
    assert upstream_session(gw, sid)["budget"] == budget("120")
    assert gw.call("POST", f"/v1/sessions/{sid}", key=MONEY, body={"title": "renamed"}).status == 200
    stored = upstream_session(gw, sid)
    assert stored["budget"] == budget("120") and stored["title"] == "renamed"


# ---- isolation on session updates ----

def test_an_update_naming_another_tenants_vault_is_not_found(gw):
    foreign_vault = gw.ok("POST", "/v1/vaults", key=OTHER, body={"name": "theirs"})["id"]
    _, _, sid = new_session(gw, MONEY)
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=MONEY, body={"vault_ids": [foreign_vault]})
    assert reply.status == 404, reply.body
    assert reply.json()["error"]["type"] == "not_found_error"
    assert foreign_vault in reply.json()["error"]["message"]
    assert forwarded(gw, "POST", f"/v1/sessions/{sid}") == []


def test_an_update_naming_another_tenants_session_in_resources_is_not_found(gw):
    _, _, foreign = new_session(gw, OTHER)
    _, _, sid = new_session(gw, MONEY)
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=MONEY,
                    body={"resources": [{"type": "session", "session_id": foreign}]})
    assert reply.status == 404, reply.body
    assert foreign in reply.json()["error"]["message"]
    assert forwarded(gw, "POST", f"/v1/sessions/{sid}") == []


# ---- policy on every update ----

def test_a_session_update_to_a_denied_model_is_refused(gw):
    _, _, sid = new_session(gw, POLICED)
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=POLICED,
                    body={"agent": {"model": "claude-opus-4-6"}})
    assert reply.status == 403, reply.body
    assert reply.json()["error"]["message"] == (
        "policy: model claude-opus-4-6 is not allowed for tenant policed (allowed: claude-sonnet-4-*)")
    assert forwarded(gw, "POST", f"/v1/sessions/{sid}") == []


@pytest.mark.parametrize("what,path_of,body,rule", [
    ("agent model", lambda a, e, v: f"/v1/agents/{a}", {"model": "claude-opus-4-6"},
     "model claude-opus-4-6 is not allowed"),
    ("agent tools", lambda a, e, v: f"/v1/agents/{a}", {"tools": [{"type": "agent_toolset_20260401"}]},
     "tool bash is denied"),
    ("session tools", lambda a, e, v: None, {"agent": {"tools": [{"type": "agent_toolset_20260401"}]}},
     "tool bash is denied"),
    ("environment networking", lambda a, e, v: f"/v1/environments/{e}", {"config": CLOUD},
     "unrestricted networking is forbidden"),
])
def test_each_update_is_checked_like_its_create(gw, what, path_of, body, rule):
    agent, env, sid = new_session(gw, POLICED)
    path = path_of(agent, env, None) or f"/v1/sessions/{sid}"
    gw.emulator.clear_requests()
    reply = gw.call("POST", path, key=POLICED, body=body)
    assert reply.status == 403, (what, reply.body)
    message = reply.json()["error"]["message"]
    assert message.startswith("policy: ") and rule in message, (what, message)
    assert forwarded(gw, "POST", path) == []


def test_a_vault_credential_update_is_refused_when_vaults_are_off(gw):
    # The vault exists upstream (made past the gateway, tagged as the tenant's).
    req = urllib.request.Request(f"{gw.emulator.url}/v1/vaults", method="POST", headers={
        "x-api-key": gw.emulator.api_key, "anthropic-version": "2023-06-01",
        "anthropic-beta": "managed-agents-2026-04-01", "content-type": "application/json"},
        data=json.dumps({"name": "v", "metadata": {"ma_gateway_tenant": "policed"}}).encode())
    with gw.emulator.urlopen(req) as resp:
        vault = json.loads(resp.read())["id"]
    path = f"/v1/vaults/{vault}/credentials/vcrd_0123456789abcdef"
    gw.emulator.clear_requests()
    reply = gw.call("POST", path, key=POLICED, body={"display_name": "x"})
    assert reply.status == 403, reply.body
    assert "may not create or change vault credentials" in reply.json()["error"]["message"]
    assert forwarded(gw, "POST", path) == []
