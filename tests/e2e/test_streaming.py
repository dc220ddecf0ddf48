"""Event streams pass through the gateway live: never buffered, never cut."""

from __future__ import annotations

import http.client
import json
import re
import time

import pytest

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA

TICKS = 22
MAX_DELAY_MS = 100


class SseReader:
    """A minimal event-stream client over http.client that timestamps each frame on arrival."""

    def __init__(self, gateway, path: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        self.conn.request("GET", path, headers={
            "x-api-key": KEYS["alice"], "anthropic-beta": MANAGED_AGENTS_BETA,
            "anthropic-version": "2023-06-01", "accept": "application/json"})
        self.resp = self.conn.getresponse()

    def frames(self):
        """Yields (arrival_ms, event_name, data) for every frame with an event name."""
        name, data = None, []
        while True:
            line = self.resp.readline()
            if not line:
                return
            arrived = time.time() * 1000
            line = line.decode().rstrip("\r\n")
            if line == "":
                if name is not None:
                    yield arrived, name, json.loads("\n".join(data)) if data else None
                name, data = None, []
            elif line.startswith(":"):
                continue
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())

    def close(self):
        self.conn.close()


def new_session(gateway):
    agent = gateway.ok("POST", "/v1/agents", body={"name": "stream", "model": "claude-sonnet-4-6"})
    env = gateway.ok("POST", "/v1/environments", body={
        "name": "stream", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    return gateway.ok("POST", "/v1/sessions", body={"agent": agent["id"], "environment_id": env["id"]})["id"]


def send_text(gateway, sid, text):
    gateway.ok("POST", f"/v1/sessions/{sid}/events", body={
        "events": [{"type": "user.message", "content": [{"type": "text", "text": text}]}]})


def test_events_arrive_while_the_stream_is_open_and_it_is_not_cut(gateway):
    sid = new_session(gateway)
    reader = SseReader(gateway, f"/v1/sessions/{sid}/events/stream")
    try:
        assert reader.resp.status == 200
        assert reader.resp.getheader("content-type").startswith("text/event-stream")
        send_text(gateway, sid, f"emulator:ticker {TICKS}")
        delays, first_tick_at, frames = [], None, reader.frames()
        for arrived, name, data in frames:
            if name == "agent.message":
                text = data["content"][0]["text"]
                match = re.fullmatch(r"tick (\d+) sent_at_ms (\d+)", text)
                assert match, text
                delays.append(arrived - int(match.group(2)))
                first_tick_at = first_tick_at or arrived
            if name == "session.status_idle":
                break
        assert len(delays) == TICKS
        print(f"\n{TICKS} ticks over {TICKS - 1} s: delay max {max(delays):.1f} ms, mean {sum(delays) / len(delays):.1f} ms")
        assert max(delays) <= MAX_DELAY_MS, f"delays ms: {[round(d, 1) for d in delays]}"
        assert time.time() * 1000 - first_tick_at >= (TICKS - 1) * 1000 - 50

        # Still open after idle: the next turn arrives on the same stream.
        send_text(gateway, sid, "still there?")
        for _, name, data in frames:
            if name == "agent.message":
                assert data["content"][0]["text"] == "Echo: still there?"
                break
    finally:
        reader.close()


@pytest.mark.parametrize("suffix", ["stream", "events/stream"])
def test_both_stream_paths_carry_named_frames(gateway, suffix):
    sid = new_session(gateway)
    reader = SseReader(gateway, f"/v1/sessions/{sid}/{suffix}")
    try:
        send_text(gateway, sid, "hi")
        names = []
        for _, name, data in reader.frames():
            assert data["type"] == name
            names.append(name)
            if name == "session.status_idle":
                break
        assert names[names.index("session.status_running"):] == [
            "session.status_running", "span.model_request_start", "agent.message",
            "span.model_request_end", "session.usage", "session.status_idle"]
    finally:
        reader.close()
