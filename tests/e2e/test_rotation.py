"""Credential rotation without restart: the key comes from a Vault KV v2 secret polled by the
background service; when it changes, the gateway follows, open streams continue, and no
request in the window fails."""

from __future__ import annotations

import threading
import time

import pytest

from tests.e2e.conftest import KEYS, Gateway
from tests.e2e.test_streaming import SseReader, send_text
from tests.harness import stack
from tests.harness.fake_vault import FakeVault

SECRET_PATH = "/v1/secret/data/anthropic/default"
VAULT_TOKEN = "vault-token-for-tests"


@pytest.fixture()
def rotating(emulator):
    vault = FakeVault(VAULT_TOKEN)
    vault.put(SECRET_PATH, emulator.api_key)
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys=KEYS,
        plugin_overrides={"credentials": [{"name": "default", "vault": {
            "cluster": "vault", "authority": "vault.local", "path": SECRET_PATH,
            "token_env": "VAULT_TOKEN", "refresh_secs": 1}}]})
    config["static_resources"]["clusters"].append({
        "name": "vault", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "vault", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": vault.port}}}}]}]}})
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "ma_gateway")["typed_config"]["config"]
    wasm["vm_config"]["environment_variables"]["host_env_keys"].append("VAULT_TOKEN")
    env = stack.envoy_env(None)
    env["VAULT_TOKEN"] = VAULT_TOKEN
    envoy = stack.Envoy(config=config, env=env).start()
    try:
        yield Gateway(envoy, emulator), vault
    finally:
        envoy.stop()
        vault.stop()
        emulator.set_api_keys([emulator.api_key])


def wait_until(predicate, timeout=15, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_rotation_under_an_open_stream_loses_nothing(rotating):
    gw, vault = rotating
    emulator = gw.emulator
    # The key arrives from Vault on the background service's first tick.
    wait_until(lambda: gw.call("GET", "/v1/agents").status == 200, what="the first Vault read")

    agent = gw.ok("POST", "/v1/agents", body={"name": "rot", "model": "claude-sonnet-4-6"})
    env = gw.ok("POST", "/v1/environments", body={
        "name": "rot", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    sid = gw.ok("POST", "/v1/sessions", body={"agent": agent["id"], "environment_id": env["id"]})["id"]
    reader = SseReader(gw, f"/v1/sessions/{sid}/events/stream")

    failures, served, stop = [], [0], threading.Event()

    def traffic():
        while not stop.is_set():
            reply = gw.call("GET", "/v1/agents?limit=1")
            if reply.status != 200:
                failures.append((reply.status, reply.body[:200]))
            served[0] += 1

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        new_key = stack.new_emulator_key()
        # Upstream accepts both during the switch (as Anthropic does while a key is revoked).
        emulator.set_api_keys([emulator.api_key, new_key])
        vault.put(SECRET_PATH, new_key)
        emulator.clear_requests()
        wait_until(lambda: any(v == new_key for r in emulator.requests() for n, v in r["headers"] if n == "x-api-key"),
                   what="the gateway to use the new key")
        # The old key is revoked; the gateway must not need it any more.
        emulator.set_api_keys([new_key])
        before = served[0]
        wait_until(lambda: served[0] >= before + 20, what="traffic after revocation")
    finally:
        stop.set()
        worker.join(10)
    assert failures == [], failures[:5]
    assert served[0] > 40

    # The stream opened under the old key still delivers the next turn.
    send_text(gw, sid, "after rotation")
    for _, name, data in reader.frames():
        if name == "agent.message":
            assert data["content"][0]["text"] == "Echo: after rotation"
            break
    reader.close()
