"""The owner tag never shows in event pages or event streams read through the gateway.

Events embed owned objects: `session.updated` carries the session's changed `metadata` and,
when tools changed, the full agent snapshot with the agent's `metadata`. Event pages and
streams are never buffered, so the gateway strips the tag incrementally (src/tag_strip.rs
`EventStrip`); this checks it over HTTP/1.1 and HTTP/2 with a compressing emulator (the client
offers gzip/br/zstd), and that metering stays exact on the rewritten stream."""

from __future__ import annotations

import json

import pytest

from tests.e2e import wire
from tests.e2e.conftest import Gateway
from tests.e2e.test_isolation import ALICE, CLOUD, TENANTS
from tests.e2e.test_sdk import metering_snapshot
from tests.e2e.test_wire_matrix import assert_metered_exactly_for, headers_for
from tests.harness import stack

TAG = b"ma_gateway_tenant"
MODEL = "claude-haiku-4-5"
OFFER = "gzip, br, zstd"


@pytest.fixture(scope="module")
def gw(emulator):
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides={**TENANTS, "metering": {"reconcile_interval_secs": 0}})
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    yield Gateway(envoy, emulator)
    envoy.stop()


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """(event name, parsed data) of every named frame with data, as the SDKs read them."""
    out = []
    for frame in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        if name and data and name != "ping":
            out.append((name, json.loads(b"\n".join(data))))
    return out


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_tag_never_shows_in_event_pages_or_streams(gw, protocol):
    agent = gw.ok("POST", "/v1/agents", key=ALICE, body={
        "name": "events", "model": MODEL, "metadata": {"team": "red"}})["id"]
    env = gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "e", "config": CLOUD})["id"]
    sid = gw.ok("POST", "/v1/sessions", key=ALICE, body={
        "agent": agent, "environment_id": env, "metadata": {"case": protocol}})["id"]
    before = metering_snapshot(gw, MODEL, tenant="acme")
    headers = headers_for(ALICE, OFFER, {"accept": "text/event-stream"})

    def update_then_turn():
        # Changes metadata and tools: the `session.updated` event carries both the session's
        # metadata and the agent snapshot (with the agent's metadata), each tagged upstream.
        gw.ok("POST", f"/v1/sessions/{sid}", key=ALICE, body={
            "metadata": {"note": "updated"}, "agent": {"tools": []}})
        gw.ok("POST", f"/v1/sessions/{sid}/events", key=ALICE, body={"events": [
            {"type": "user.message", "content": [{"type": "text", "text": "tag in events"}]}]})

    reply = wire.stream_around(gw.port, f"/v1/sessions/{sid}/events/stream", headers,
                               b"session.status_idle", protocol=protocol, action=update_then_turn)
    assert reply.status == 200, reply
    assert reply.headers.get("content-encoding", "identity") == "identity", reply.headers
    assert b"session.status_idle" in reply.body
    truth = gw.emulator.usage(sid)
    updated = [data for name, data in sse_events(reply.body) if name == "session.updated"]
    assert updated == [{
        "type": "session.updated", "id": updated[0]["id"],
        "created_at": updated[0]["created_at"], "processed_at": updated[0]["processed_at"],
        "metadata": {"case": protocol, "note": "updated"},
        "agent": {**updated[0]["agent"], "metadata": {"team": "red"}},
    }], updated
    assert TAG not in reply.body, reply.body[reply.body.find(TAG) - 200:][:400]

    leaked = []
    for path in [f"/v1/sessions/{sid}/events", f"/v1/sessions/{sid}/events?types[]=session.updated"]:
        page = (wire.http1(gw.port, "GET", path, headers_for(ALICE, OFFER, {}), None, chunked=False)
                if protocol == "h1" else
                wire.http2(gw.port, "GET", path, headers_for(ALICE, OFFER, {}), None))
        assert page.status == 200, (path, page.status, page.body[:300])
        assert page.headers.get("content-encoding", "identity") == "identity", page.headers
        events = json.loads(page.body)["data"]
        kept = [e for e in events if e["type"] == "session.updated"]
        assert [e["metadata"] for e in kept] == [{"case": protocol, "note": "updated"}], kept
        assert [e["agent"]["metadata"] for e in kept] == [{"team": "red"}], kept
        if TAG in page.body:
            leaked.append(path)
    threads = gw.ok("GET", f"/v1/sessions/{sid}/threads", key=ALICE)["data"]
    for thread in threads:
        path = f"/v1/sessions/{sid}/threads/{thread['id']}/events"
        page = gw.call("GET", path, key=ALICE)
        assert page.status == 200, (path, page.status, page.body[:300])
        json.loads(page.body)
        if TAG in page.body:
            leaked.append(path)
    assert leaked == []
    assert truth["model_requests"] >= 1, truth
    assert_metered_exactly_for(gw, sid, before, MODEL, "acme")
