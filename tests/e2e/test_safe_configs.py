"""Configs that would silently share everything are refused, and Envoy's own answers on paths
the filter does not answer itself are Anthropic error envelopes too, in real Envoy.

- Without a `tenants` list, isolation is off and every tenant may do everything (`*:*`). A plugin
  config under which several tenants can exist anyway — a JWT (its claim may name any tenant) or
  gateway keys of two tenants — is refused by `on_configure`, the field named in Envoy's log
  (`config error at jwt.tenant_claim: …`, `config error at gateway_keys[1].tenant: …`); through
  ECDS the update is rejected and the previous config keeps serving.
- JWT tenants the config does not declare never become metric label values: every `tenant` label
  is a declared tenant, a key's tenant, or `unknown` (src/metrics.rs, TenantLabels).
- A chunked (no content-length) session-events body over Envoy's 1 MiB request buffer gets
  Envoy's 413 as an Anthropic `request_too_large` envelope (envoy.yaml local_reply_config),
  nothing forwarded.
"""

from __future__ import annotations

import http.client
import json
import re
import time

import pytest

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA, Gateway
from tests.e2e.test_streaming import new_session, send_text
from tests.harness import dynamic, jwt, stack

WASM = stack.WASM

JWT_WITHOUT_TENANTS_ERROR = (
    "config error at jwt.tenant_claim: a verified token may name any tenant, so `tenants` must be "
    "declared: without it tenant isolation is off and every tenant may do everything (*:*) with the "
    "others' resources")
TWO_TENANTS_ERROR = (
    "config error at gateway_keys[1].tenant: tenant \"globex\" differs from gateway_keys[0]'s \"acme\" "
    "while no tenants are declared: declare them in `tenants`, or tenant isolation is off and every "
    "tenant may do everything (*:*) with the others' resources")


def keyed(tenants: dict[str, str]) -> list[dict]:
    """gateway_keys entries: KEYS' names and hashes, each key in the given tenant."""
    return [{"name": name, "sha256": stack.sha256_hex(KEYS[name]), "tenant": tenant}
            for name, tenant in tenants.items()]


@pytest.fixture(scope="module")
def plain_emulator():
    # tests/harness/dynamic.py renders the examples' `anthropic` cluster as plain HTTP/1.1.
    emu = stack.Emulator(api_key=stack.new_emulator_key(), heartbeat_ms=2000, tls=False)
    yield emu
    emu.stop()


def test_configs_that_share_everything_are_refused_and_the_previous_one_keeps_serving(plain_emulator):
    """Through the ECDS example: each refused update is rejected, the field named in the log,
    and the good config (alice in acme, bob in globex, tenants declared) keeps serving."""
    emulator = plain_emulator
    upstream = emulator.upstream
    good = {"tenants": [{"name": "acme"}, {"name": "globex"}],
            "gateway_keys": keyed({"alice": "acme", "bob": "globex"})}
    ecds = dynamic.EcdsEnvoy.start(
        dynamic.render_extension_config(upstream=upstream, gateway_keys=KEYS, plugin_overrides=good,
                                        wasm_path=WASM),
        upstream, env=stack.envoy_env(emulator.api_key), extra_args=["--reject-unknown-dynamic-fields"],
        wasm_path=WASM)
    gw = Gateway(ecds.envoy, emulator)
    try:
        assert ecds.counters()["update_success"] == 1
        agent = gw.ok("POST", "/v1/agents", key=KEYS["alice"], body={"name": "a", "model": "claude-sonnet-4-6"})
        # Isolation is on: bob (globex) does not see alice's (acme) agent.
        assert gw.call("GET", f"/v1/agents/{agent['id']}", key=KEYS["bob"]).status == 404

        refused = {
            "a JWT without tenants": ({"jwt": {"tenant_claim": "org"}, "tenants": None,
                                       "gateway_keys": keyed({"alice": "acme"})}, JWT_WITHOUT_TENANTS_ERROR),
            "keys of two tenants without tenants": ({"tenants": None,
                                                     "gateway_keys": keyed({"alice": "acme", "bob": "globex"})},
                                                    TWO_TENANTS_ERROR),
        }
        for case, (overrides, error) in refused.items():
            plugin = dynamic.render_extension_config(upstream=upstream, gateway_keys=KEYS,
                                                     plugin_overrides=good, wasm_path=WASM)
            config = json.loads(plugin["config"]["configuration"]["value"])
            for field, value in overrides.items():
                if value is None:
                    config.pop(field, None)
                else:
                    config[field] = value
            plugin["config"]["configuration"]["value"] = json.dumps(config)
            before = ecds.counters()
            verdict, took, after = ecds.update(plugin)
            print(f"\n{case}: {verdict} {took * 1000:.1f} ms after the rename")
            assert verdict == "rejected", case
            assert after["update_success"] == before["update_success"], case
            assert error in ecds.envoy.log(), case
            # The previous config serves: isolation still on.
            assert gw.call("GET", f"/v1/agents/{agent['id']}", key=KEYS["alice"]).status == 200
            assert gw.call("GET", f"/v1/agents/{agent['id']}", key=KEYS["bob"]).status == 404
    finally:
        ecds.stop()


PAYLOAD_HEADER = "x-test-jwt-payload"
SERIES = re.compile(r'^(ma_gateway_\w+)\{([^}]*)\} ')


def tenant_label_values(gw: Gateway) -> set[str]:
    values = set()
    for line in gw.envoy.admin("/stats/prometheus").splitlines():
        match = SERIES.match(line)
        if match:
            values.update(re.findall(r'tenant="([^"]*)"', match.group(2)))
    return values


def test_jwt_tenants_outside_the_config_add_no_metric_series(emulator, tmp_path):
    idp = jwt.RsaKey.generate("idp-key-1")
    jwks_path = jwt.write_jwks(tmp_path / "jwks.json", idp)
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0, gateway_keys=KEYS, wasm_path=WASM,
        plugin_overrides={"jwt": {"tenant_claim": "org"},
                          "tenants": [{"name": "default"}, {"name": "acme"}],
                          "metering": {"reconcile_interval_secs": 1}},
    )
    jwt.add_jwt_authn(config, jwks_path=jwks_path, expose_payload_header=PAYLOAD_HEADER)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    gw = Gateway(envoy, emulator)
    try:
        def bearer(tenant: str) -> dict[str, str]:
            token = jwt.sign(idp, jwt.claims(sub=f"user-{tenant}", tenant=tenant, scope="*:*"))
            return {"authorization": f"Bearer {token}"}

        # A declared tenant's usage is metered under its name (streamed and reconciled).
        acme = bearer("acme")
        sid = new_session_as(gw, acme)
        gw.ok("POST", f"/v1/sessions/{sid}/events", key=None, headers=acme, body={
            "events": [{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]})
        deadline = time.monotonic() + 30
        while "acme" not in tenant_label_values(gw):
            assert time.monotonic() < deadline, "acme's usage was never metered"
            time.sleep(0.1)

        # 30 tenants nobody declared, each with a valid token claiming every scope.
        ghosts = [f"ghost-{i}" for i in range(30)]
        for ghost in ghosts:
            for method, path in (("GET", "/v1/agents"), ("GET", f"/v1/sessions/{sid}"),
                                 ("GET", f"/v1/sessions/{sid}/events"), ("GET", "/v1/sessions")):
                reply = gw.call(method, path, key=None, headers=bearer(ghost))
                assert reply.status == 403, (ghost, path, reply.status, reply.body[:200])
                assert reply.json()["error"]["type"] == "permission_error"
        # Reconciler rounds pass (1 s interval) and the session is read again.
        gw.ok("GET", f"/v1/sessions/{sid}", key=None, headers=acme)
        polls = f"/v1/sessions/{sid}"
        seen = sum(r["path"] == polls for r in emulator.requests())
        deadline = time.monotonic() + 20
        while sum(r["path"] == polls for r in emulator.requests()) < seen + 2:
            assert time.monotonic() < deadline, "the reconciler never polled the session"
            time.sleep(0.1)
        labels = tenant_label_values(gw)
        print(f"\ntenant label values after {len(ghosts)} undeclared JWT tenants: {sorted(labels)}")
        assert "acme" in labels
        assert labels <= {"default", "acme", "unknown"}, labels
    finally:
        envoy.stop()


def new_session_as(gw: Gateway, headers: dict[str, str]) -> str:
    agent = gw.ok("POST", "/v1/agents", key=None, headers=headers, body={"name": "s", "model": "claude-sonnet-4-6"})
    env = gw.ok("POST", "/v1/environments", key=None, headers=headers, body={
        "name": "s", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}})
    return gw.ok("POST", "/v1/sessions", key=None, headers=headers,
                 body={"agent": agent["id"], "environment_id": env["id"]})["id"]


def test_a_chunked_events_body_over_the_buffer_limit_gets_an_envelope(gateway):
    """No content-length: the filter holds the head and reads the body for the audit record,
    Envoy's 1 MiB request buffer overflows first: a 413 in the Anthropic envelope, nothing
    forwarded."""
    sid = new_session(gateway)
    gateway.emulator.clear_requests()
    event = json.dumps({"events": [{"type": "user.message", "content": [
        {"type": "text", "text": "big " + "y" * (2 << 20)}]}]}).encode()
    chunks = [event[i:i + 65536] for i in range(0, len(event), 65536)]
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.putrequest("POST", f"/v1/sessions/{sid}/events", skip_accept_encoding=True)
        for name, value in (("x-api-key", KEYS["alice"]), ("anthropic-version", "2023-06-01"),
                            ("anthropic-beta", MANAGED_AGENTS_BETA), ("content-type", "application/json"),
                            ("transfer-encoding", "chunked")):
            conn.putheader(name, value)
        conn.endheaders()
        try:
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # Envoy may answer and close before the whole body is sent
        resp = conn.getresponse()
        status, content_type, body = resp.status, resp.getheader("content-type"), resp.read()
    finally:
        conn.close()
    print(f"\nchunked 2 MiB events body: {status} {content_type} {body[:200]!r}")
    assert status == 413, body
    assert content_type == "application/json"
    envelope = json.loads(body)
    assert envelope["type"] == "error" and envelope["error"]["type"] == "request_too_large", envelope
    assert envelope["error"]["message"] == (
        "request body too large for the gateway to buffer (over Envoy's per-connection buffer limit, "
        "1 MiB by default)")
    assert envelope["request_id"]
    assert [r["path"] for r in gateway.emulator.requests() if r["path"].endswith("/events")] == []
    # A normal events call still works afterwards.
    send_text(gateway, sid, "after")
