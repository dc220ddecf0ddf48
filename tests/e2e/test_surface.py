"""Every resource family of the Managed Agents API works through the gateway."""

from __future__ import annotations


def test_agents(gateway):
    agent = gateway.ok("POST", "/v1/agents", body={"name": "surface", "model": "claude-sonnet-4-6"})
    assert agent["id"].startswith("agent_")
    aid = agent["id"]
    assert gateway.ok("GET", f"/v1/agents/{aid}")["id"] == aid
    listed = gateway.ok("GET", "/v1/agents?limit=100")
    assert aid in [a["id"] for a in listed["data"]]
    updated = gateway.ok("POST", f"/v1/agents/{aid}", body={"version": agent["version"], "system": "be brief"})
    assert updated["version"] == agent["version"] + 1
    assert gateway.ok("GET", f"/v1/agents/{aid}?version=1")["version"] == 1
    versions = gateway.ok("GET", f"/v1/agents/{aid}/versions")
    assert len(versions["data"]) == 2
    stale = gateway.call("POST", f"/v1/agents/{aid}", body={"version": 1, "system": "x"})
    assert stale.status == 409
    assert stale.json()["error"]["type"] == "invalid_request_error"
    assert gateway.ok("POST", f"/v1/agents/{aid}/archive")["archived_at"] is not None


def test_environments_and_work_queue(gateway):
    env = gateway.ok("POST", "/v1/environments", body={
        "name": "surface-env", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    eid = env["id"]
    assert eid.startswith("env_")
    assert gateway.ok("GET", f"/v1/environments/{eid}")["id"] == eid
    assert eid in [e["id"] for e in gateway.ok("GET", "/v1/environments")["data"]]
    assert gateway.ok("POST", f"/v1/environments/{eid}", body={"name": "renamed"})["name"] == "renamed"
    hosted = gateway.ok("POST", "/v1/environments", body={"name": "self", "config": {"type": "self_hosted"}})
    assert gateway.ok("GET", f"/v1/environments/{hosted['id']}/work")["data"] == []
    assert gateway.ok("POST", f"/v1/environments/{eid}/archive")["archived_at"] is not None
    gone = gateway.ok("DELETE", f"/v1/environments/{hosted['id']}")
    assert gone["id"] == hosted["id"]


def test_vaults_and_credentials(gateway):
    vault = gateway.ok("POST", "/v1/vaults", body={"name": "surface-vault"})
    vid = vault["id"]
    assert vid.startswith("vlt_")
    assert gateway.ok("GET", f"/v1/vaults/{vid}")["id"] == vid
    assert vid in [v["id"] for v in gateway.ok("GET", "/v1/vaults")["data"]]
    gateway.ok("POST", f"/v1/vaults/{vid}", body={"name": "renamed"})
    secret = "ghp_secret_token_value_123"
    cred = gateway.ok("POST", f"/v1/vaults/{vid}/credentials", body={
        "name": "gh", "auth": {"type": "static_bearer", "token": secret}})
    cid = cred["id"]
    assert cid.startswith("vcrd_")
    assert secret not in json_text(cred)
    assert gateway.ok("GET", f"/v1/vaults/{vid}/credentials/{cid}")["id"] == cid
    assert cid in [c["id"] for c in gateway.ok("GET", f"/v1/vaults/{vid}/credentials")["data"]]
    gateway.ok("POST", f"/v1/vaults/{vid}/credentials/{cid}", body={"name": "gh2"})
    assert gateway.ok("POST", f"/v1/vaults/{vid}/credentials/{cid}/archive")["archived_at"] is not None
    gateway.ok("DELETE", f"/v1/vaults/{vid}/credentials/{cid}")
    assert gateway.ok("POST", f"/v1/vaults/{vid}/archive")["archived_at"] is not None
    gateway.ok("DELETE", f"/v1/vaults/{vid}")


def test_sessions_events_threads_resources(gateway):
    agent = gateway.ok("POST", "/v1/agents", body={"name": "s", "model": {"id": "claude-opus-4-6"}})
    env = gateway.ok("POST", "/v1/environments", body={
        "name": "s", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    session = gateway.ok("POST", "/v1/sessions", body={
        "agent": agent["id"], "environment_id": env["id"], "title": "surface"})
    sid = session["id"]
    assert sid.startswith("sesn_")
    assert session["agent"]["model"]["id"] == "claude-opus-4-6"
    assert gateway.ok("GET", f"/v1/sessions/{sid}")["id"] == sid
    assert sid in [s["id"] for s in gateway.ok("GET", "/v1/sessions?order=desc&limit=50")["data"]]
    assert gateway.ok("POST", f"/v1/sessions/{sid}", body={"title": "renamed"})["title"] == "renamed"

    sent = gateway.ok("POST", f"/v1/sessions/{sid}/events", body={
        "events": [{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]})
    assert sent["data"][0]["id"].startswith("sevt_")
    history = wait_for_idle(gateway, sid)
    types = [e["type"] for e in history]
    assert "agent.message" in types and "span.model_request_end" in types
    filtered = gateway.ok("GET", f"/v1/sessions/{sid}/events?types[]=agent.message")
    assert {e["type"] for e in filtered["data"]} == {"agent.message"}

    threads = gateway.ok("GET", f"/v1/sessions/{sid}/threads")["data"]
    tid = threads[0]["id"]
    assert tid.startswith("sthr_")
    assert gateway.ok("GET", f"/v1/sessions/{sid}/threads/{tid}")["id"] == tid
    assert gateway.ok("GET", f"/v1/sessions/{sid}/threads/{tid}/events")["data"]

    resource = gateway.ok("POST", f"/v1/sessions/{sid}/resources", body={"type": "file", "file_id": "file_abc"})
    rid = resource["id"]
    assert rid in [r["id"] for r in gateway.ok("GET", f"/v1/sessions/{sid}/resources")["data"]]
    assert gateway.ok("GET", f"/v1/sessions/{sid}/resources/{rid}")["id"] == rid
    gateway.ok("DELETE", f"/v1/sessions/{sid}/resources/{rid}")

    assert gateway.ok("POST", f"/v1/sessions/{sid}/archive")["archived_at"] is not None
    gateway.ok("DELETE", f"/v1/sessions/{sid}")
    assert gateway.call("GET", f"/v1/sessions/{sid}").status == 404


def test_pagination_cursors_pass_through(gateway):
    for i in range(5):
        gateway.ok("POST", "/v1/vaults", body={"name": f"page-{i}"})
    seen, page, pages = [], None, 0
    while True:
        path = "/v1/vaults?limit=2" + (f"&page={page}" if page else "")
        reply = gateway.ok("GET", path)
        seen += [v["id"] for v in reply["data"]]
        pages += 1
        page = reply["next_page"]
        if not page:
            break
    assert pages >= 3
    assert len(seen) == len(set(seen)) >= 5


def wait_for_idle(gateway, sid, timeout=20):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = gateway.ok("GET", f"/v1/sessions/{sid}/events?limit=100")["data"]
        if any(e["type"] == "session.status_idle" for e in events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"session {sid} never went idle")


def json_text(value) -> str:
    import json

    return json.dumps(value)
