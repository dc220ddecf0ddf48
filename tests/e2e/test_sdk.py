"""The official `anthropic` Python SDK drives a whole Managed Agents flow through the gateway,
with its default headers (it offers `accept-encoding: gzip, deflate`), and the gateway meters
that session exactly: Prometheus tokens by type, runtime and cost grow by the emulator's
ground truth for it."""

from __future__ import annotations

import threading

import anthropic
import pytest

from tests.e2e.conftest import KEYS, Gateway, start_gateway
from tests.e2e.test_metering import expected_cost, metric, prometheus

TOKEN_KINDS = {"input": "input_tokens", "output": "output_tokens",
               "cache_read": "cache_read_input_tokens", "cache_write": "cache_creation_input_tokens"}


@pytest.fixture(scope="module")
def sdk_gateway(emulator):
    """A gateway of its own: its counters move only with this module's sessions (the shared
    gateway's reconciler may meter other tests' sessions of the same model at any moment)."""
    envoy = start_gateway(emulator, api_key=emulator.api_key)
    yield Gateway(envoy, emulator)
    envoy.stop()


def metering_snapshot(gateway, model: str, tenant: str = "default") -> dict[str, int]:
    """This model's tokens by type, runtime seconds and cost (µ$) as Prometheus shows them now."""
    samples = prometheus(gateway)
    snapshot = {kind: metric(samples, "ma_gateway_tokens_total", tenant=tenant, model=model, type=kind)
                for kind in TOKEN_KINDS}
    snapshot["runtime"] = metric(samples, "ma_gateway_session_runtime_seconds_total", tenant=tenant, model=model)
    snapshot["cost"] = metric(samples, "ma_gateway_cost_microdollars_total", tenant=tenant, model=model)
    return snapshot


def assert_metered_exactly(gateway, session_id: str, before: dict[str, int], model: str):
    """The counters grew since `before` by exactly the emulator's ground truth for the session."""
    truth = gateway.emulator.usage(session_id)
    assert truth["model"] == model and truth["model_requests"] >= 1, truth
    after = metering_snapshot(gateway, model)
    grown = {key: after[key] - before[key] for key in after}
    expected = {kind: truth[field] for kind, field in TOKEN_KINDS.items()}
    expected["runtime"] = truth["active_seconds"]
    expected["cost"] = expected_cost(truth, model)
    assert expected["input"] > 0 and expected["output"] > 0 and expected["cost"] > 0, truth
    assert grown == expected, f"Prometheus grew by {grown}, the emulator's ground truth is {expected}"
    return truth


def test_official_sdk_full_flow(sdk_gateway):
    gateway = sdk_gateway
    before = metering_snapshot(gateway, "claude-sonnet-4-6")
    # Default headers left as they are: the SDK offers gzip/deflate, the metering must hold anyway.
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

    truth = assert_metered_exactly(gateway, session.id, before, "claude-sonnet-4-6")
    assert (fetched.usage.input_tokens, fetched.usage.output_tokens, fetched.usage.cache_read_input_tokens) == (
        truth["input_tokens"], truth["output_tokens"], truth["cache_read_input_tokens"])


def test_sdk_sees_gateway_refusals_as_normal_errors(gateway):
    client = anthropic.Anthropic(base_url=gateway.url, api_key="not-a-gateway-key", max_retries=0, timeout=10)
    try:
        client.beta.agents.list()
    except anthropic.AuthenticationError as err:
        assert err.status_code == 401
        assert err.body["error"]["type"] == "authentication_error"
    else:
        raise AssertionError("expected AuthenticationError")
