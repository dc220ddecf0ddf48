"""Policy on the December 2026 surface in real Envoy: fast mode, `inference_geo`,
`multiagent_20261001` (subagents, workflows, inline agents and their models),
`execution_identity`, deployment schedules and budgets, and the session overrides that switch
any of them on.

Every refusal is a 403 `permission_error` naming the rule, on create and on update, with
nothing reaching the upstream (the emulator records a request the moment its head arrives);
compliant bodies pass. Measured before (main b3be5b4): this config was refused at load (unknown
fields); with only its `models` rule, 9 of the 10 violating agent bodies below reached the upstream
and were stored (200) — among them a roster advisor on a model outside the allow list — and a
deployment's $9,999.99 budget went upstream as sent (147 bytes) under a $50/day tenant budget."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Gateway, configured_gateway
from tests.harness import stack

POLICED, DEPLOYER = "gw-key-policed-2026-12", "gw-key-deployer-2026-12"
ROLE = "arn:aws:iam::111122223333:role/agents-prod"
# The model config every compliant body uses.
GOOD_MODEL = {"id": "claude-opus-5-5", "speed": "standard", "inference_geo": "us"}
GOOD_MULTI = {"type": "multiagent_20261001", "workflows": {"type": "disabled"},
              "subagents": {"type": "enabled", "inline_agents": {"type": "disabled"}}}
DAILY_MICRODOLLARS = 50_000_000  # $50: 5000 cents

CONFIG = {
    "tenants": [{"name": "policed"}, {"name": "deployer"}],
    "gateway_keys": [
        {"name": "policed", "sha256": stack.sha256_hex(POLICED), "tenant": "policed"},
        {"name": "deployer", "sha256": stack.sha256_hex(DEPLOYER), "tenant": "deployer"},
    ],
    "routes": {"neighbours": ["deployments"], "shared_neighbours": ["deployments"]},
    "limits": {"budgets": {"tenants": {"deployer": {"microdollars_per_day": DAILY_MICRODOLLARS}}}},
    "policy": {"tenants": {
        "policed": {
            "models": {"allow": ["claude-opus-5-5", "claude-sonnet-5-5"]},
            "fast_mode": False,
            "inference_geo": {"allow": ["us"]},
            "multiagent": {"workflows": False},
            "execution_identity": {"allow": ["service_account", "aws_role"],
                                   "role_arns": ["arn:aws:iam::111122223333:role/agents-*"]},
        },
        "deployer": {"fast_mode": False, "deployments": {"schedules": False}},
    }},
}


@pytest.fixture(scope="module")
def gw(emulator):
    gateway = configured_gateway(emulator, CONFIG)
    yield gateway
    gateway.envoy.stop()


@pytest.fixture(scope="module")
def agent(gw):
    return gw.ok("POST", "/v1/agents", key=POLICED,
                 body={"name": "primary", "model": GOOD_MODEL})["id"]


@pytest.fixture(scope="module")
def session(gw, agent):
    env = gw.ok("POST", "/v1/environments", key=POLICED,
                body={"name": "e", "config": {"type": "cloud"}})["id"]
    return gw.ok("POST", "/v1/sessions", key=POLICED,
                 body={"agent": agent, "environment_id": env})["id"], env


# (agent fields that break a rule, the words the refusal must contain)
VIOLATIONS = [
    ({"model": {"id": "claude-opus-5-5", "speed": "fast", "inference_geo": "us"}},
     "policy: fast mode (model.speed \"fast\") is not allowed for tenant policed"),
    ({"model": {"id": "claude-opus-5-5", "inference_geo": "eu"}},
     "policy: inference_geo eu is not allowed for tenant policed (allowed: us)"),
    ({"model": "claude-opus-5-5"},
     "policy: inference_geo default is not allowed for tenant policed (allowed: us)"),
    ({"model": {"id": "claude-haiku-5-5", "inference_geo": "us"}},
     "policy: model claude-haiku-5-5 is not allowed for tenant policed"),
    ({"multiagent": {"type": "multiagent_20261001", "subagents": {"type": "disabled"}}},
     "policy: workflows are forbidden for tenant policed"),
    ({"multiagent": {"type": "multiagent_20261001", "workflows": {"type": "disabled"}}},
     "policy: inline agents (multiagent.subagents) choose their own models"),
    ({"multiagent": {**GOOD_MULTI, "advisor": {"type": "enabled", "model": {
        "id": "claude-opus-5-5", "speed": "fast", "inference_geo": "us"}}}},
     "policy: fast mode (multiagent.advisor.model.speed \"fast\") is not allowed"),
    ({"multiagent": {**GOOD_MULTI, "subagents": {
        "type": "enabled", "inline_agents": {"type": "disabled"},
        "predefined_agents": [{"type": "advisor", "model": "claude-haiku-5-5"}]}}},
     "policy: model claude-haiku-5-5 is not allowed for tenant policed"),
    ({"execution_identity": {"type": "aws_role", "role_arn": "arn:aws:iam::999999999999:role/x"}},
     "policy: execution_identity.role_arn arn:aws:iam::999999999999:role/x is not allowed"),
    ({"execution_identity": {"type": "gcp_service_account"}},
     "policy: execution identity gcp_service_account is not allowed for tenant policed"),
]


def refused(gw: Gateway, path: str, body: dict, rule: str, key: str = POLICED):
    gw.emulator.clear_requests()
    reply = gw.call("POST", path, key=key, body=body)
    assert reply.status == 403, reply.body
    error = reply.json()["error"]
    assert error["type"] == "permission_error", error
    assert rule in error["message"], error["message"]
    assert gw.emulator.requests() == []


@pytest.mark.parametrize("fields,rule", VIOLATIONS)
def test_agent_create_and_update_refuse_each_violation(gw, agent, fields, rule):
    refused(gw, "/v1/agents", {"name": "a", "model": GOOD_MODEL, **fields}, rule)
    refused(gw, f"/v1/agents/{agent}", fields, rule)


@pytest.mark.parametrize("fields,rule", VIOLATIONS)
def test_session_overrides_refuse_each_violation_on_create_and_update(gw, agent, session, fields, rule):
    sid, env = session
    rule = rule.replace("(model.", "(agent.model.").replace("(multiagent.", "(agent.multiagent.")
    rule = rule.replace("policy: execution_identity.", "policy: agent.execution_identity.")
    override = {"type": "agent_with_overrides", "id": agent, **fields}
    refused(gw, "/v1/sessions", {"agent": override, "environment_id": env}, rule)
    refused(gw, f"/v1/sessions/{sid}", {"agent": fields}, rule)


def test_compliant_bodies_pass_and_reach_the_upstream(gw, agent, session):
    sid, env = session
    good = {"model": GOOD_MODEL, "multiagent": GOOD_MULTI,
            "execution_identity": {"type": "aws_role", "role_arn": ROLE}}
    created = gw.ok("POST", "/v1/agents", key=POLICED, body={"name": "b", **good})
    assert created["model"] == GOOD_MODEL
    assert created["multiagent"] == GOOD_MULTI
    assert created["execution_identity"] == {"type": "aws_role", "role_arn": ROLE}
    updated = gw.ok("POST", f"/v1/agents/{created['id']}", key=POLICED,
                    body={"model": {"id": "claude-sonnet-5-5", "inference_geo": "us"}})
    assert updated["model"] == {"id": "claude-sonnet-5-5", "inference_geo": "us", "speed": "standard"}
    override = {"type": "agent_with_overrides", "id": agent, **good}
    s = gw.ok("POST", "/v1/sessions", key=POLICED, body={"agent": override, "environment_id": env})
    assert s["agent"]["model"] == GOOD_MODEL
    gw.ok("POST", f"/v1/sessions/{sid}", key=POLICED, body={"agent": {"tools": []}})


def test_deployments_refuse_schedules_and_fast_overrides(gw, agent):
    base = {"agent": agent, "environment_id": "env_x", "name": "nightly",
            "initial_events": [{"type": "user.message", "content": [{"type": "text", "text": "go"}]}]}
    schedule = {"type": "cron", "expression": "0 3 * * *", "timezone": "UTC"}
    rule = "policy: deployment schedules are forbidden for tenant deployer"
    refused(gw, "/v1/deployments", {**base, "schedule": schedule}, rule, key=DEPLOYER)
    refused(gw, "/v1/deployments/depl_01abc", {"schedule": schedule}, rule, key=DEPLOYER)
    fast = {"type": "agent_with_overrides", "id": agent,
            "model": {"id": "claude-opus-5-5", "speed": "fast"}}
    rule = "policy: fast mode (agent.model.speed \"fast\") is not allowed for tenant deployer"
    refused(gw, "/v1/deployments", {**base, "agent": fast}, rule, key=DEPLOYER)
    refused(gw, "/v1/deployments/depl_01abc", {"agent": fast}, rule, key=DEPLOYER)
    # A deployment's budget is copied to every session it fires: it may not be removed.
    refused(gw, "/v1/deployments/depl_01abc", {"budget": None},
            "policy: a deployment budget cannot be removed while tenant deployer has a cost budget",
            key=DEPLOYER)


def sent_bytes(body: dict) -> int:
    """Length of the body as the filter re-serializes it (serde_json: sorted keys, compact)."""
    return len(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


@pytest.mark.parametrize("path", ["/v1/deployments", "/v1/deployments/depl_01abc"])
def test_a_deployment_budget_is_clamped_to_what_the_tenant_has_left(gw, agent, path):
    body = {"agent": agent, "environment_id": "env_x", "name": "nightly",
            "budget": {"type": "limit", "max_list_cost": {"amount": "999999", "currency": "USD"}}}
    gw.emulator.clear_requests()
    gw.call("POST", path, key=DEPLOYER, body=body)  # the emulator has no deployments: 404
    seen = gw.emulator.requests()
    assert [(r["method"], r["path"]) for r in seen] == [("POST", path)]
    clamped = {**body, "budget": {"type": "limit", "max_list_cost": {"amount": "5000", "currency": "USD"}}}
    assert seen[0]["body_bytes"] == sent_bytes(clamped)
    # A budget already below what is left goes up as sent.
    kept = {**body, "budget": {"type": "limit", "max_list_cost": {"amount": "120", "currency": "USD"}}}
    gw.emulator.clear_requests()
    gw.call("POST", path, key=DEPLOYER, body=kept)
    assert gw.emulator.requests()[0]["body_bytes"] == len(json.dumps(kept).encode())
    # Without a budget a create gets what is left; an update keeps the deployment's own.
    bare = {"name": "renamed"}
    gw.emulator.clear_requests()
    gw.call("POST", path, key=DEPLOYER, body=bare)
    expected = (sent_bytes({**bare, "budget": clamped["budget"]}) if path == "/v1/deployments"
                else len(json.dumps(bare).encode()))
    assert gw.emulator.requests()[0]["body_bytes"] == expected
