"""Fixtures for the end-to-end suite: the emulator and real Envoy running the filter.

Everything binds 127.0.0.1 on kernel-chosen ports, waits on readiness (the emulator's
LISTENING line, Envoy's /ready), and is stopped when the session ends.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

import pytest

from tests.harness import stack

KEYS = {"alice": "gw-key-alice-0001", "bob": "gw-key-bob-0002"}
MANAGED_AGENTS_BETA = "managed-agents-2026-04-01"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Gateway:
    """A client for the gateway that sends exactly what it is told (raw paths included)."""

    def __init__(self, envoy: stack.Envoy, emulator: stack.Emulator | None):
        self.envoy = envoy
        self.emulator = emulator
        self.port = envoy.listen_port
        self.url = envoy.url

    def call(self, method: str, path: str, *, key: str | None = KEYS["alice"], body=None,
             headers: dict[str, str] | None = None, auth: str = "x-api-key", timeout: float = 30) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        all_headers = {"anthropic-version": "2023-06-01", "anthropic-beta": MANAGED_AGENTS_BETA}
        if key is not None:
            if auth == "bearer":
                all_headers["authorization"] = f"Bearer {key}"
            else:
                all_headers["x-api-key"] = key
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            all_headers["content-type"] = "application/json"
        all_headers.update(headers or {})
        all_headers = {k: v for k, v in all_headers.items() if v is not None}
        try:
            conn.request(method, path, body=payload, headers=all_headers)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def ok(self, method: str, path: str, **kwargs):
        reply = self.call(method, path, **kwargs)
        assert reply.status == 200, f"{method} {path} -> {reply.status} {reply.body[:500]!r}"
        return reply.json()


@pytest.fixture(scope="session")
def emulator():
    for artifact in (stack.WASM, stack.EMULATOR):
        if not artifact.exists():
            pytest.fail(f"{artifact} is missing: run the suite through `make test` (it builds first)")
    # Like api.anthropic.com on the wire: TLS (ALPN h2/http1.1), responses compressed per
    # accept-encoding, bodies and events cut at awkward places.
    emu = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=2000,
                         tls=True, compression="auto", chunking="awkward")
    yield emu
    emu.stop()


def configured_gateway(emulator: stack.Emulator, plugin_overrides: dict, **render) -> Gateway:
    """A gateway of a test module's own: its plugin config names its own keys and tenants
    (no default keys), in front of `emulator`, with the emulator's key."""
    config = stack.render_envoy_config(upstream=emulator.upstream, listen_port=0, admin_port=0,
                                       gateway_keys={}, plugin_overrides=plugin_overrides, **render)
    return Gateway(stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start(), emulator)


def start_gateway(emulator: stack.Emulator, *, api_key: str | None, plugin_overrides=None) -> stack.Envoy:
    config = stack.render_envoy_config(
        upstream=emulator.upstream,
        listen_port=0,
        admin_port=0,
        gateway_keys=KEYS,
        plugin_overrides=plugin_overrides,
    )
    return stack.Envoy(config=config, env=stack.envoy_env(api_key)).start()


@pytest.fixture(scope="session")
def gateway(emulator):
    envoy = start_gateway(emulator, api_key=emulator.api_key)
    yield Gateway(envoy, emulator)
    envoy.stop()
