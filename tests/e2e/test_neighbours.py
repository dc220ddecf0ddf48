"""Neighbouring APIs (files, skills, memory stores, deployments and their runs) are routed only
when the operator opts in, and none of them carries an owner: with tenant isolation on, routing
one would let every tenant read, list, delete and attach every other tenant's objects. So that
configuration is refused, naming the field, unless the operator declares the family shared on
purpose (`routes.shared_neighbours`). Measured before: with two tenants and
`routes.neighbours: ["memory_stores"]`, bob read, listed and deleted alice's memory store."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_isolation import ALICE, BOB, TENANTS
from tests.harness import stack

FAMILIES = {
    "files": "/v1/files/file_01shared",
    "skills": "/v1/skills/skill_01shared",
    "memory_stores": "/v1/memory_stores/memstore_01shared",
    "deployments": "/v1/deployments/depl_01shared",
}


def rendered(tmp_path, emulator, overrides: dict):
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=dict(TENANTS, **overrides))
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    return config, path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_unowned_neighbour_under_isolation_is_refused_naming_the_field(tmp_path, emulator, family):
    _, path = rendered(tmp_path, emulator, {"routes": {"neighbours": [family]}})
    result = stack.validate_config(path)
    assert result.returncode != 0, f"{family}: two tenants would share it silently"
    assert (f'config error at routes.neighbours[0]: "{family}" is not isolated between tenants'
            in result.stdout + result.stderr), result.stdout + result.stderr
    # Another family declared shared does not cover this one.
    other = "files" if family != "files" else "skills"
    _, path = rendered(tmp_path, emulator, {"routes": {"neighbours": [other, family], "shared_neighbours": [other]}})
    result = stack.validate_config(path)
    assert (f'config error at routes.neighbours[1]: "{family}" is not isolated between tenants'
            in result.stdout + result.stderr), result.stdout + result.stderr


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_neighbour_declared_shared_is_routed_for_every_tenant(tmp_path, emulator, family):
    config, _ = rendered(tmp_path, emulator, {"routes": {"neighbours": [family], "shared_neighbours": [family]}})
    gw = Gateway(stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start(), emulator)
    try:
        emulator.clear_requests()
        for key in (ALICE, BOB):
            reply = gw.call("GET", FAMILIES[family], key=key)
            # The emulator has no such object; what matters is that the call went upstream.
            assert reply.status != 403, reply.body
        seen = [(r["method"], r["path"]) for r in emulator.requests()]
        assert seen == [("GET", FAMILIES[family])] * 2, seen
        # The core families stay isolated beside a shared neighbour.
        agent = gw.ok("POST", "/v1/agents", key=ALICE, body={"name": "a", "model": "claude-sonnet-4-6"})["id"]
        assert gw.call("GET", f"/v1/agents/{agent}", key=BOB).status == 404
    finally:
        gw.envoy.stop()


def test_without_isolation_neighbours_need_no_declaration(tmp_path, emulator):
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={"dev": "gw-key-single-tenant"},
        plugin_overrides={"routes": {"neighbours": ["memory_stores"]}})
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert stack.validate_config(path).returncode == 0
