"""The calls the December 2026 SDKs make (reference managed-agents-api-2026-12.md §3) through
real Envoy: each is routed to the emulator (200) when its family is enabled and refused 404
by default deny (nothing reaches upstream) when not; the GA families (Files, Skills, User
Profiles) work without any `anthropic-beta` and get none added; the work queue's verbs are
owner-checked by their environment id under tenant isolation."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import KEYS, Gateway
from tests.e2e.test_isolation import ALICE, BOB, TENANTS
from tests.harness import stack

NEIGHBOURS = ["files", "skills", "memory_stores", "deployments", "dreams", "tunnels", "user_profiles"]

# (method, path, body) of every neighbour call; `{…}` ids are the emulator's shapes.
NEIGHBOUR_CALLS = [
    ("POST", "/v1/dreams", {"inputs": [{"type": "memory_store", "memory_store_id": "memstore_1"},
                                       {"type": "sessions", "session_ids": ["sesn_1"]}],
                            "model": "claude-sonnet-5-5"}),
    ("GET", "/v1/dreams?statuses[]=running&include_archived=true", None),
    ("GET", "/v1/dreams/drm_1", None),
    ("POST", "/v1/dreams/drm_1/cancel", None),
    ("POST", "/v1/dreams/drm_1/archive", None),
    ("POST", "/v1/tunnels", {"display_name": "t"}),
    ("GET", "/v1/tunnels", None),
    ("GET", "/v1/tunnels/tnl_1", None),
    ("POST", "/v1/tunnels/tnl_1/archive", None),
    ("POST", "/v1/tunnels/tnl_1/reveal_token", None),
    ("POST", "/v1/tunnels/tnl_1/rotate_token", {"reason": "rotation"}),
    ("POST", "/v1/tunnels/tnl_1/certificates", {"csr": "x"}),
    ("GET", "/v1/tunnels/tnl_1/certificates", None),
    ("GET", "/v1/tunnels/tnl_1/certificates/tcrt_1", None),
    ("POST", "/v1/tunnels/tnl_1/certificates/tcrt_1/archive", None),
    ("POST", "/v1/user_profiles", {"external_id": "u1"}),
    ("GET", "/v1/user_profiles", None),
    ("GET", "/v1/user_profiles/uprof_1", None),
    ("POST", "/v1/user_profiles/uprof_1", {"metadata": {"k": "v"}}),
    ("DELETE", "/v1/user_profiles/uprof_1", None),
    ("POST", "/v1/user_profiles/uprof_1/action_urls", {"action": {"type": "enroll_end_user"}}),
    ("POST", "/v1/user_profiles/uprof_1/enrollment_url", None),
    ("GET", "/v1/user_profiles/uprof_1/providers/google/data_controls", None),
    ("POST", "/v1/user_profiles/uprof_1/providers/google/data_controls", {"enabled": True}),
    ("POST", "/v1/memory_stores/memstore_1/archive", None),
    ("POST", "/v1/memory_stores/memstore_1/memories", {"path": "/notes/a.md", "content": "hi"}),
    ("GET", "/v1/memory_stores/memstore_1/memories?path_prefix=/notes&depth=2", None),
    ("GET", "/v1/memory_stores/memstore_1/memories/mem_1?view=full", None),
    ("POST", "/v1/memory_stores/memstore_1/memories/mem_1", {"content": "x", "precondition": {
        "type": "content_sha256", "content_sha256": "0" * 64}}),
    ("DELETE", "/v1/memory_stores/memstore_1/memories/mem_1?expected_content_sha256=" + "0" * 64, None),
    ("GET", "/v1/memory_stores/memstore_1/memory_versions", None),
    ("GET", "/v1/memory_stores/memstore_1/memory_versions/memver_1", None),
    ("POST", "/v1/memory_stores/memstore_1/memory_versions/memver_1/redact", None),
    ("POST", "/v1/deployments/depl_1/pause", None),
    ("POST", "/v1/deployments/depl_1/unpause", None),
    ("POST", "/v1/deployments/depl_1/run", None),
    ("GET", "/v1/deployment_runs?deployment_id=depl_1&has_error=false&trigger_type=manual", None),
    ("GET", "/v1/deployment_runs/drun_1", None),
]

GA_CALLS = [
    ("GET", "/v1/files"),
    ("GET", "/v1/files/file_1"),
    ("GET", "/v1/skills"),
    ("GET", "/v1/skills/skill_1"),
    ("GET", "/v1/user_profiles"),
    ("POST", "/v1/user_profiles/uprof_1/action_urls"),
]


def start(emulator, overrides) -> Gateway:
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys=KEYS, plugin_overrides=overrides)
    return Gateway(stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start(), emulator)


@pytest.fixture(scope="module")
def enabled(emulator):
    gw = start(emulator, {"routes": {"neighbours": NEIGHBOURS}})
    yield gw
    gw.envoy.stop()


@pytest.fixture(scope="module")
def isolated(emulator):
    overrides = dict(TENANTS, routes={"neighbours": NEIGHBOURS, "shared_neighbours": NEIGHBOURS})
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=overrides)
    gw = Gateway(stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start(), emulator)
    yield gw
    gw.envoy.stop()


def core_calls(gw: Gateway, key=KEYS["alice"]) -> list[tuple[str, str, dict | None]]:
    """The new calls of core families, on a fresh self-hosted environment and vault credential."""
    env = gw.ok("POST", "/v1/environments", key=key, body={"name": "worker", "config": {"type": "self_hosted"}})
    vault = gw.ok("POST", "/v1/vaults", key=key, body={"name": "v"})
    cred = gw.ok("POST", f"/v1/vaults/{vault['id']}/credentials", key=key, body={
        "name": "mcp", "auth": {"type": "static_bearer", "token": "tok-core-calls", "mcp_server_url": "https://m.example"}})
    e = env["id"]
    return [
        ("GET", f"/v1/environments/{e}/work/poll?block_ms=999&reclaim_older_than_ms=5000", None),
        ("GET", f"/v1/environments/{e}/work/stats", None),
        ("GET", f"/v1/environments/{e}/work/work_1", None),
        ("POST", f"/v1/environments/{e}/work/work_1", {"metadata": {"k": "v"}}),
        ("POST", f"/v1/environments/{e}/work/work_1/ack", None),
        ("POST", f"/v1/environments/{e}/work/work_1/heartbeat?desired_ttl_seconds=30"
                 "&expected_last_heartbeat=NO_HEARTBEAT", None),
        ("POST", f"/v1/environments/{e}/work/work_1/stop", {"force": True}),
        ("POST", f"/v1/vaults/{vault['id']}/credentials/{cred['id']}/mcp_oauth_validate", None),
    ]


def forwarded(emulator, path: str) -> list[dict]:
    return [r for r in emulator.requests() if r["path"] == path.split("?")[0] or r["path"] == path]


def test_every_new_call_is_routed_when_enabled(enabled, emulator):
    calls = NEIGHBOUR_CALLS + core_calls(enabled)
    emulator.clear_requests()
    statuses = [(m, p, enabled.call(m, p, body=b).status) for m, p, b in calls]
    assert [s for s in statuses if s[2] != 200] == []
    seen = {(r["method"], r["path"]) for r in emulator.requests()}
    missing = [(m, p) for m, p, _ in calls if (m, p) not in seen and (m, p.split("?")[0]) not in seen]
    assert missing == []
    assert len(calls) == 46


def test_neighbours_are_denied_by_default(gateway, emulator):
    emulator.clear_requests()
    statuses = [(m, p, gateway.call(m, p, body=b).status) for m, p, b in NEIGHBOUR_CALLS]
    assert [s for s in statuses if s[2] != 404] == []
    refused = gateway.call("GET", "/v1/dreams")
    assert refused.json()["error"]["type"] == "not_found_error"
    assert emulator.requests() == []


def test_calls_outside_the_api_stay_denied_even_when_enabled(enabled, emulator):
    emulator.clear_requests()
    refused = [
        ("POST", "/v1/deployment_runs"),
        ("POST", "/v1/environments/env_1/work"),
        ("POST", "/v1/environments/env_1/work/work_1/frobnicate"),
        ("GET", "/v1/tunnels/tnl_1/reveal_token"),
        ("GET", "/v1/organizations/webhooks"),
        ("POST", "/v1/organizations/webhooks/wh_1/regenerate_signing_secret"),
    ]
    assert [enabled.call(m, p).status for m, p in refused] == [404] * len(refused)
    assert emulator.requests() == []


def test_ga_calls_need_no_beta_and_get_none(enabled, emulator):
    emulator.clear_requests()
    statuses = [enabled.call(m, p, headers={"anthropic-beta": None}).status for m, p in GA_CALLS]
    assert statuses == [200] * len(GA_CALLS)
    requests = emulator.requests()
    assert len(requests) == len(GA_CALLS)
    betas = [[v for n, v in r["headers"] if n == "anthropic-beta"] for r in requests]
    assert betas == [[]] * len(GA_CALLS)
    # A caller's own allowed beta on a GA call is passed, alone; a beta family still gets its
    # required beta added.
    emulator.clear_requests()
    assert enabled.call("GET", "/v1/files", headers={"anthropic-beta": "files-api-2025-04-14"}).status == 200
    assert enabled.call("GET", "/v1/dreams", headers={"anthropic-beta": "dreaming-2026-04-21"}).status == 200
    betas = [[v for n, v in r["headers"] if n == "anthropic-beta"] for r in emulator.requests()]
    assert betas == [["files-api-2025-04-14"], ["dreaming-2026-04-21,managed-agents-2026-04-01"]]


def test_new_betas_are_in_the_default_allowlist(enabled):
    for beta, path in [("mcp-tunnels-2026-06-22", "/v1/tunnels"), ("agent-memory-2026-07-22", "/v1/memory_stores"),
                       ("user-profiles-2026-08-18", "/v1/user_profiles"),
                       ("user-profiles-2026-09-04,google-managed-data-controls-2026-09-01",
                        "/v1/user_profiles/uprof_1/providers/google/data_controls")]:
        assert enabled.call("GET", path, headers={"anthropic-beta": beta}).status == 200, beta


def test_work_queue_verbs_are_owner_checked_by_environment(isolated, emulator):
    calls = core_calls(isolated, key=ALICE)
    assert [isolated.call(m, p, key=ALICE, body=b).status for m, p, b in calls] == [200] * len(calls)
    emulator.clear_requests()
    assert [isolated.call(m, p, key=BOB, body=b).status for m, p, b in calls] == [404] * len(calls)
    assert emulator.requests() == []


def test_session_resources_current_shapes(gateway):
    agent = gateway.ok("POST", "/v1/agents", body={"name": "res", "model": "claude-sonnet-4-6"})
    env = gateway.ok("POST", "/v1/environments", body={
        "name": "res", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    sid = gateway.ok("POST", "/v1/sessions", body={"agent": agent["id"], "environment_id": env["id"], "resources": [
        {"type": "github_repository", "url": "https://github.com/o/r", "authorization_token": "ghp_shape_0001"}]})["id"]
    added = gateway.ok("POST", f"/v1/sessions/{sid}/resources", body={
        "type": "file", "file_id": "file_1", "mount_path": "/mnt/data/a.csv"})
    assert added["type"] == "file"
    listed = gateway.ok("GET", f"/v1/sessions/{sid}/resources")["data"]
    repo = next(r for r in listed if r["type"] == "github_repository")
    assert "ghp_shape_0001" not in str(listed)
    gateway.ok("POST", f"/v1/sessions/{sid}/resources/{repo['id']}", body={"authorization_token": "ghp_shape_0002"})
    assert gateway.ok("GET", f"/v1/sessions/{sid}/resources/{added['id']}")["id"] == added["id"]
    assert gateway.ok("DELETE", f"/v1/sessions/{sid}/resources/{added['id']}")["id"] == added["id"]
