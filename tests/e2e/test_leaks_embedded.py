"""The owner tag never shows inside objects that embed owned resources: session threads (their
`agent` snapshot carries the agent's `metadata`: list, read, archive), session resources and
environment work items, beside the owned objects themselves. (Event pages and streams are
stripped as they flow: tests/e2e/test_tag_in_events.py.)"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_isolation import ALICE, CLOUD, TENANTS
from tests.harness import stack

TAG = b"ma_gateway_tenant"


@pytest.fixture(scope="module")
def gw(emulator):
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=TENANTS)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    yield Gateway(envoy, emulator)
    envoy.stop()


def test_no_embedded_object_shows_the_owner_tag(gw):
    agent = gw.ok("POST", "/v1/agents", key=ALICE, body={
        "name": "embedded", "model": "claude-sonnet-4-6", "metadata": {"team": "red"}})["id"]
    env = gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "e", "config": CLOUD})["id"]
    session = gw.ok("POST", "/v1/sessions", key=ALICE, body={"agent": agent, "environment_id": env})["id"]
    gw.ok("POST", f"/v1/sessions/{session}/events", key=ALICE, body={
        "events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]})
    threads = gw.ok("GET", f"/v1/sessions/{session}/threads", key=ALICE)["data"]
    thread = threads[0]["id"]
    # The snapshot is still there, with the client's own metadata: only the tag went.
    assert threads[0]["agent"]["metadata"] == {"team": "red"}
    leaked = []
    for method, path in [
        ("GET", f"/v1/sessions/{session}/threads"),
        ("GET", f"/v1/sessions/{session}/threads/{thread}"),
        ("GET", f"/v1/sessions/{session}/resources"),
        ("GET", f"/v1/environments/{env}/work"),
        ("GET", f"/v1/sessions/{session}"),
        ("GET", f"/v1/agents/{agent}"),
        ("POST", f"/v1/sessions/{session}/threads/{thread}/archive"),
    ]:
        reply = gw.call(method, path, key=ALICE)
        assert reply.status == 200, (method, path, reply.status, reply.body[:300])
        if TAG in reply.body:
            leaked.append((method, path))
    assert leaked == []
