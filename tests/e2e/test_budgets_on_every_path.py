"""Every guarantee a create checks holds on the update path too, in real Envoy (2 workers).

A session created under a tenant's cost budget carries a budget clamped to what the tenant has
left; `POST /v1/sessions/{id}` must not be a way around that (remove it, raise it), nor around
isolation (another tenant's vault or session in the body) or policy (a denied model, tools,
networking, vault credentials)."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import Gateway, configured_gateway
from tests.e2e.test_limits import send, wait_turns
from tests.harness import stack

POLICED, OTHER = "gw-key-upd-policed", "gw-key-upd-other"
DAILY_MICRO = 50_000_000  # $50.00 = 5000 cents
# One tenant per budget test: a session's budget is reserved from its tenant's money.
MONEY_TENANTS = ("m-remove", "m-raise", "m-lower", "m-many", "m-spend", "m-iso", "m-share")
CLOUD = {"type": "cloud", "networking": {"type": "unrestricted"}}
LIMITED_NET = {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["pypi.org"]}}


def key_of(tenant: str) -> str:
    return f"gw-key-{tenant}"


CONFIG = {
    "tenants": [{"name": n} for n in ("policed", "other") + MONEY_TENANTS],
    "gateway_keys": [
        {"name": n, "sha256": stack.sha256_hex(k), "tenant": n}
        for n, k in [("policed", POLICED), ("other", OTHER)] + [(t, key_of(t)) for t in MONEY_TENANTS]
    ],
    "limits": {"budgets": {"tenants": {
        t: {"microdollars_per_day": DAILY_MICRO, **({"session_microdollars": 20_000_000} if t == "m-share" else {})}
        for t in MONEY_TENANTS}}},
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
    gateway = configured_gateway(emulator, CONFIG)
    yield gateway
    gateway.envoy.stop()


def upstream_session(gw, sid):
    """The session as the upstream stores it (read past the gateway)."""
    req = urllib.request.Request(f"{gw.emulator.url}/v1/sessions/{sid}", headers={
        "x-api-key": gw.emulator.api_key, "anthropic-version": "2023-06-01",
        "anthropic-beta": "managed-agents-2026-04-01"})
    with gw.emulator.urlopen(req) as resp:
        return json.loads(resp.read())


def new_session(gw, key, model="claude-sonnet-4-6", env_config=LIMITED_NET, **extra):
    agent, env = agent_and_env(gw, key, model, env_config)
    sid = gw.ok("POST", "/v1/sessions", key=key,
                body={"agent": agent, "environment_id": env, **extra})["id"]
    return agent, env, sid


def agent_and_env(gw, key, model="claude-sonnet-4-6", env_config=LIMITED_NET):
    agent = gw.ok("POST", "/v1/agents", key=key, body={"name": "u", "model": model})
    env = gw.ok("POST", "/v1/environments", key=key, body={"name": "u", "config": env_config})
    return agent["id"], env["id"]


def forwarded(gw, method, path):
    return [r for r in gw.emulator.requests() if r["method"] == method and r["path"] == path]


# ---- the session budget on update ----

def test_an_update_cannot_remove_the_clamped_budget(gw):
    key = key_of("m-remove")
    _, _, sid = new_session(gw, key)
    assert upstream_session(gw, sid)["budget"] == budget("5000")
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=key, body={"budget": None})
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error == {"type": "permission_error", "message":
                     "policy: a session budget cannot be removed while the tenant has a cost budget"}
    assert forwarded(gw, "POST", f"/v1/sessions/{sid}") == []
    assert upstream_session(gw, sid)["budget"] == budget("5000")


def test_an_update_cannot_raise_the_budget_above_what_is_left(gw):
    key = key_of("m-raise")
    _, _, sid = new_session(gw, key, budget=budget("1000"))
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=key, body={"budget": budget("999999")})
    assert reply.status == 200, reply.body
    # Its own $10 plus the $40 nobody holds.
    assert upstream_session(gw, sid)["budget"] == budget("5000")
    # Unreadable amounts are replaced by the ceiling too, never passed on.
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=key,
                    body={"budget": {"type": "limit", "max_list_cost": {"amount": "1e9", "currency": "USD"}}})
    assert reply.status == 200, reply.body
    assert upstream_session(gw, sid)["budget"] == budget("5000")


def test_an_update_may_lower_the_budget_and_the_rest_is_free_again(gw):
    key = key_of("m-lower")
    agent, env, sid = new_session(gw, key)
    assert upstream_session(gw, sid)["budget"] == budget("5000")
    assert gw.call("POST", f"/v1/sessions/{sid}", key=key, body={"budget": budget("120")}).status == 200
    assert upstream_session(gw, sid)["budget"] == budget("120")
    assert gw.call("POST", f"/v1/sessions/{sid}", key=key, body={"title": "renamed"}).status == 200
    stored = upstream_session(gw, sid)
    assert stored["budget"] == budget("120") and stored["title"] == "renamed"
    # What the update gave back is what the next session gets.
    second = gw.ok("POST", "/v1/sessions", key=key, body={"agent": agent, "environment_id": env})["id"]
    assert upstream_session(gw, second)["budget"] == budget("4880")


# ---- concurrent creates share the budget ----

def test_concurrent_creates_never_hold_more_than_the_tenant_has(gw):
    """40 sessions asking for $7 each, opened together on two workers: the budgets granted
    add up to exactly the $50 the tenant has, never 40 x $7 (each clamp reserves what it
    grants); the rest are refused 429. Archiving a session gives its budget back."""
    key = key_of("m-many")
    agent, env = agent_and_env(gw, key)

    def create(_):
        return gw.call("POST", "/v1/sessions", key=key,
                       body={"agent": agent, "environment_id": env, "budget": budget("700")})

    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(create, range(40)))
    created = [r.json()["id"] for r in replies if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    grants = sorted(int(upstream_session(gw, sid)["budget"]["max_list_cost"]["amount"]) for sid in created)
    print(f"\n40 concurrent creates: {len(created)} created, grants (cents) {grants}, "
          f"sum {sum(grants)}, {len(refused)} refused")
    assert sum(grants) == 5000, grants
    assert grants == [100] + [700] * 7, grants
    assert {r.status for r in refused} == {429}, [(r.status, r.body[:200]) for r in refused]
    message = refused[0].json()["error"]["message"]
    assert message.startswith("tenant m-many has no cost budget left for a new session"), message
    # A session archived gives its reservation back.
    victim = next(sid for sid in created
                  if upstream_session(gw, sid)["budget"] == budget("700"))
    assert gw.call("POST", f"/v1/sessions/{victim}/archive", key=key).status == 200
    again = gw.ok("POST", "/v1/sessions", key=key, body={"agent": agent, "environment_id": env})["id"]
    assert upstream_session(gw, again)["budget"] == budget("700")


def test_metered_spend_moves_from_the_reservation_to_the_used_money(gw):
    """Money a session spent is counted once: in the tenant's used money, and no longer in the
    session's reservation. $50 - $10 reserved = $40 for the next session, whatever was spent
    of the $10 (counted twice, it would be less)."""
    key = key_of("m-spend")
    agent, env, sid = new_session(gw, key, budget=budget("1000"))
    assert send(gw, key, sid, "hi").status == 200
    wait_turns(gw, key, sid, 1)  # the history read meters the turn
    spent = gw.ok("GET", f"/v1/sessions/{sid}", key=key)  # and the snapshot, exactly
    metered = sum(float(line.rsplit(" ", 1)[1]) for line in gw.envoy.admin("/stats/prometheus").splitlines()
                  if line.startswith("ma_gateway_cost_microdollars_total") and 'tenant="m-spend"' in line)
    print(f"\nmetered spend of the $10 session: {metered:.0f} µ$")
    assert metered > 0, "nothing was metered: the test would not tell"
    second = gw.ok("POST", "/v1/sessions", key=key, body={"agent": agent, "environment_id": env})["id"]
    assert upstream_session(gw, second)["budget"] == budget("4000"), spent.get("usage")


def test_sessions_without_a_budget_share_the_money_by_the_session_default(gw):
    """`session_microdollars` $20 of $50: sessions created without a budget get $20, $20, the
    last $10, then none is left."""
    key = key_of("m-share")
    agent, env = agent_and_env(gw, key)
    grants = []
    for _ in range(3):
        sid = gw.ok("POST", "/v1/sessions", key=key, body={"agent": agent, "environment_id": env})["id"]
        grants.append(upstream_session(gw, sid)["budget"]["max_list_cost"]["amount"])
    assert grants == ["2000", "2000", "1000"]
    refused = gw.call("POST", "/v1/sessions", key=key, body={"agent": agent, "environment_id": env})
    assert refused.status == 429, refused.body
    assert refused.json()["error"]["type"] == "rate_limit_error"


# ---- isolation on session updates ----

def test_an_update_naming_another_tenants_vault_is_not_found(gw):
    foreign_vault = gw.ok("POST", "/v1/vaults", key=OTHER, body={"name": "theirs"})["id"]
    _, _, sid = new_session(gw, key_of("m-iso"), budget=budget("10"))
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=key_of("m-iso"), body={"vault_ids": [foreign_vault]})
    assert reply.status == 404, reply.body
    assert reply.json()["error"]["type"] == "not_found_error"
    assert foreign_vault in reply.json()["error"]["message"]
    assert forwarded(gw, "POST", f"/v1/sessions/{sid}") == []


def test_an_update_naming_another_tenants_session_in_resources_is_not_found(gw):
    _, _, foreign = new_session(gw, OTHER)
    _, _, sid = new_session(gw, key_of("m-iso"), budget=budget("10"))
    gw.emulator.clear_requests()
    reply = gw.call("POST", f"/v1/sessions/{sid}", key=key_of("m-iso"),
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
