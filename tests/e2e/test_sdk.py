"""The official `anthropic` Python SDK drives a whole Managed Agents flow through the gateway."""

from __future__ import annotations

import threading

import anthropic

from tests.e2e.conftest import KEYS


def test_official_sdk_full_flow(gateway):
    client = anthropic.Anthropic(base_url=gateway.url, api_key=KEYS["bob"], max_retries=0, timeout=30)
    agent = client.beta.agents.create(name="sdk-agent", model="claude-sonnet-4-6")
    environment = client.beta.environments.create(
        name="sdk-env", config={"type": "cloud", "networking": {"type": "unrestricted"}})
    session = client.beta.sessions.create(agent=agent.id, environment_id=environment.id)
    assert session.id.startswith("sesn_")

    texts: list[str] = []
    names: list[str] = []
    opened = threading.Event()

    def consume():
        with client.beta.sessions.events.stream(session.id) as stream:
            opened.set()
            for event in stream:
                names.append(event.type)
                if event.type == "agent.message":
                    texts.extend(block.text for block in event.content if block.type == "text")
                if event.type == "session.status_idle":
                    return

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert opened.wait(15), "the SDK stream did not open"
    # The stream has no replay: send only once it is open (the response headers arrived).
    client.beta.sessions.events.send(
        session.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "hello from the SDK"}]}])
    reader.join(timeout=30)
    assert not reader.is_alive(), f"stream never reached idle; saw {names}"
    assert texts == ["Echo: hello from the SDK"]

    history = client.beta.sessions.events.list(session.id)
    history_types = [e.type for e in history.data]
    assert "agent.message" in history_types and "session.status_idle" in history_types

    fetched = client.beta.sessions.retrieve(session.id)
    assert fetched.usage.input_tokens > 0


def test_sdk_sees_gateway_refusals_as_normal_errors(gateway):
    client = anthropic.Anthropic(base_url=gateway.url, api_key="not-a-gateway-key", max_retries=0, timeout=10)
    try:
        client.beta.agents.list()
    except anthropic.AuthenticationError as err:
        assert err.status_code == 401
        assert err.body["error"]["type"] == "authentication_error"
    else:
        raise AssertionError("expected AuthenticationError")
