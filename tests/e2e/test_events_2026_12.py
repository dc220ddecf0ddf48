"""Every stream event type new in the 2026-12 union (workflow runs, `system.message`,
`span.outcome_evaluation_ongoing`, rescheduling, `session.error`, an idle with
`stop_reason: refusal` and `stop_details`) reaches the official Python SDK through the gateway
unchanged, and the error events are counted with a bounded label."""

from __future__ import annotations

import threading

import anthropic

from tests.e2e.test_metering import metric, prometheus
from tests.e2e.test_sdk import sdk_gateway  # noqa: F401 (fixture)
from tests.e2e.conftest import KEYS

NEW_TYPES = [
    "workflow_run.created", "workflow_run.status_running", "workflow_run.phase_started",
    "span.outcome_evaluation_ongoing", "workflow_run.phase_ended", "workflow_run.status_idle",
    "workflow_run.error", "workflow_run.status_ended", "system.message",
    "session.thread_status_rescheduled", "session.status_rescheduled", "session.error",
]


def test_new_event_types_arrive_unchanged_through_the_sdk(sdk_gateway):  # noqa: F811
    gateway = sdk_gateway
    client = anthropic.Anthropic(base_url=gateway.url, api_key=KEYS["bob"], max_retries=0, timeout=30)
    agent = client.beta.agents.create(name="events", model="claude-sonnet-4-6")
    environment = client.beta.environments.create(
        name="events-env", config={"type": "cloud", "networking": {"type": "unrestricted"}})
    session = client.beta.sessions.create(agent=agent.id, environment_id=environment.id)
    samples = prometheus(gateway)
    before = {label: metric(samples, "ma_gateway_upstream_errors_total", type=label)
              for label in ("session_billing_error", "workflow_thread_limit_error")}
    streamed: list[dict] = []
    opened = threading.Event()

    def consume():
        with client.beta.sessions.events.stream(session.id) as stream:
            opened.set()
            for event in stream:
                streamed.append(event.to_dict())
                if event.type == "session.status_idle":
                    return

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert opened.wait(15), "the SDK stream did not open"
    client.beta.sessions.events.send(session.id, events=[
        {"type": "user.message", "content": [{"type": "text", "text": "emulator:events-2026-12"}]}])
    reader.join(timeout=30)
    assert not reader.is_alive(), f"stream never reached idle; saw {[e['type'] for e in streamed]}"
    types = [e["type"] for e in streamed]
    assert [t for t in types if t in NEW_TYPES] == NEW_TYPES, types
    # Unchanged: what the SDK parsed off the stream is the emulator's stored event, field for
    # field (user echoes are left out: their `processed_at` is filled in after the echo).
    history = {e["id"]: e for e in client.beta.sessions.events.list(session.id, limit=100).to_dict()["data"]}
    checked = [e for e in streamed if e["type"] in NEW_TYPES + ["session.status_idle"]]
    assert len(checked) == len(NEW_TYPES) + 1
    for event in checked:
        assert history[event["id"]] == event, (event, history[event["id"]])
    idle = streamed[-1]
    assert idle["stop_reason"] == {"type": "refusal"}, idle
    assert idle["stop_details"] == {"type": "refusal", "category": "cyber", "explanation": "declined"}, idle
    samples = prometheus(gateway)
    after = {label: metric(samples, "ma_gateway_upstream_errors_total", type=label) for label in before}
    assert {k: after[k] - before[k] for k in after} == {
        "session_billing_error": 1, "workflow_thread_limit_error": 1}
