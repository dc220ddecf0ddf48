"""Secrets never leak, whatever a client sends: a sweep of bad inputs through real Envoy.

test_security.py checks the ordinary paths (keys stripped and injected, refusals, betas, path
normalisation) and test_isolation.py the cross-tenant matrix's 404s; here every kind of bad
input is thrown at one gateway — every refusal (401, 403, 404 route and ownership, 413, 429,
400), upstream faults (500, 529, 503, reset, hang, truncated bodies), CR/LF/NUL in header
values, hop-by-hop headers and Transfer-Encoding tricks, path normalisation attacks, oversized
headers and bodies, and the cross-tenant matrix — and then, over everything at once:

- no client credential (gateway keys, `authorization`, `proxy-authorization`, `cookie`)
  reached upstream (the emulator's request log), and every upstream request carried exactly
  the injected key;
- the upstream key is in no byte the clients received (status line, headers, body), nor in
  Envoy's log, nor in the audit file; no gateway key is in either log;
- nothing reached the emulator outside `/v1/`;
- the secrets of the December 2026 shapes — tunnel tokens (reveal/rotate answers), work-item
  secrets (poll answers), `environment_variable` `secret_value`, OAuth `access_token`,
  `refresh_token` and `client_secret`, GitHub `authorization_token` on session and deployment
  resources, user-profile action and enrollment URLs — reach the caller that asked for them and
  appear in no log (Envoy's log with the stdout access log, and the audit file); webhook
  signing secrets (Admin API) are never routed at all.

The count of bad inputs is printed (and written to $MA_RELIABILITY_COUNTS for the
reliability report).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.e2e.conftest import MANAGED_AGENTS_BETA, Gateway
from tests.e2e.test_isolation import ALICE, BOB, CAROL, CLOUD, TENANTS, cross_tenant_calls
from tests.harness import stack

COOKIE = "session=cookie-secret-0042"
PROXY_AUTH = "Basic cHJveHktc2VjcmV0LTAwNDI="
JUNK_KEY = "gw-key-junk-0099"
CLIENT_SECRETS = [ALICE, BOB, CAROL, JUNK_KEY, "gw-key-expired", COOKIE, PROXY_AUTH, "cHJveHktc2VjcmV0LTAwNDI"]
NEIGHBOURS = ["files", "skills", "memory_stores", "deployments", "dreams", "tunnels", "user_profiles"]
# Secrets clients send in the December 2026 request bodies.
BODY_SECRETS = {
    "secret_value": "envsecret-leak-0001",
    "access_token": "oauth-access-leak-0002",
    "refresh_token": "oauth-refresh-leak-0003",
    "client_secret": "oauth-client-secret-leak-0004",
    "session_github": "ghp_session_resource_leak_0005",
    "resource_update": "ghp_resource_update_leak_0006",
    "deployment_github": "ghp_deployment_leak_0007",
}


@pytest.fixture(scope="module")
def sweep(emulator, tmp_path_factory):
    audit_path = tmp_path_factory.mktemp("leaks") / "audit.log"
    overrides = dict(TENANTS, limits={"tenants": {"auditors": {"read": {"per_minute": 2, "burst": 2}}}},
                     routes={"neighbours": NEIGHBOURS, "shared_neighbours": NEIGHBOURS})
    config = stack.render_envoy_config(
        upstream=emulator.upstream, listen_port=0, admin_port=0,
        gateway_keys={}, plugin_overrides=overrides, audit_path=audit_path)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    s = Sweep(Gateway(envoy, emulator), audit_path)
    try:
        yield s
    finally:
        envoy.stop()


class Sweep:
    def __init__(self, gw: Gateway, audit_path):
        self.gw = gw
        self.audit_path = audit_path
        self.bad_inputs = 0
        self.received: list[bytes] = []  # everything any client got back
        self.upstream_seen: list[dict] = []
        self.new_secrets: list[str] = []  # secret values of the new shapes, sent or received

    def call(self, method, path, *, bad=True, **kwargs):
        self.bad_inputs += bad
        kwargs.setdefault("key", ALICE)
        reply = self.gw.call(method, path, **kwargs)
        self.received.append(json.dumps(reply.headers).encode() + reply.body)
        return reply

    def raw(self, request: bytes, *, bad=True, timeout=10) -> bytes:
        """Sends bytes as they are; returns everything the gateway answered until it closed
        the connection or went quiet."""
        self.bad_inputs += bad
        sock = socket.create_connection(("127.0.0.1", self.gw.port), timeout=timeout)
        out = b""
        try:
            sock.sendall(request)
            while True:
                try:
                    chunk = sock.recv(65536)
                except (socket.timeout, TimeoutError):
                    break
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        finally:
            sock.close()
        self.received.append(out)
        return out

    def drain_upstream(self):
        self.upstream_seen.extend(self.gw.emulator.requests())
        self.gw.emulator.clear_requests()

    def fault(self, **fault):
        import urllib.request

        req = urllib.request.Request(self.gw.emulator.url + "/_emulator/faults", method="POST",
                                     data=json.dumps(fault).encode(), headers={"content-type": "application/json"})
        with self.gw.emulator.urlopen(req) as resp:
            resp.read()


def _complete(out: bytes) -> bool:
    head, _, body = out.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip() or 0)
    return False


def status_of(raw: bytes) -> int:
    """The status code of a raw answer; 0 when the connection closed without one."""
    if not raw.startswith(b"HTTP/1.1 "):
        return 0
    return int(raw.split(b" ", 2)[1])


def head(method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
         key: str | None = ALICE) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: gateway", "connection: close",
             f"anthropic-beta: {MANAGED_AGENTS_BETA}", "anthropic-version: 2023-06-01"]
    if key:
        lines.append(f"x-api-key: {key}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers or []):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def world(sweep):
    gw = sweep.gw
    a = {
        "agent": gw.ok("POST", "/v1/agents", key=ALICE, body={"name": "leak-a", "model": "claude-sonnet-4-6"})["id"],
        "environment": gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "a", "config": CLOUD})["id"],
        "vault": gw.ok("POST", "/v1/vaults", key=ALICE, body={"name": "a"})["id"],
    }
    a["credential"] = gw.ok("POST", f"/v1/vaults/{a['vault']}/credentials", key=ALICE, body={
        "name": "gh", "auth": {"type": "static_bearer", "token": "ghp_leak_secret"}})["id"]
    a["session"] = gw.ok("POST", "/v1/sessions", key=ALICE, body={
        "agent": a["agent"], "environment_id": a["environment"]})["id"]
    b = {
        "agent": gw.ok("POST", "/v1/agents", key=BOB, body={"name": "leak-b", "model": "claude-haiku-4-5"})["id"],
        "environment": gw.ok("POST", "/v1/environments", key=BOB, body={"name": "b", "config": CLOUD})["id"],
    }
    sweep.drain_upstream()
    return a, b


def test_credentials_in_every_spelling_are_stripped(sweep, world):
    a, _ = world
    sid = a["session"]
    cases = [
        {"x-api-key": ALICE},
        {"authorization": f"Bearer {ALICE}", "x-api-key": None},
        {"Authorization": f"bearer {ALICE}", "x-api-key": None},
        {"X-API-KEY": ALICE, "x-api-key": None},
        {"x-api-key": ALICE, "authorization": f"Bearer {BOB}"},
        {"x-api-key": ALICE, "cookie": COOKIE, "proxy-authorization": PROXY_AUTH},
        {"x-api-key": ALICE, "authorization": PROXY_AUTH},
    ]
    statuses = [sweep.call("GET", f"/v1/sessions/{sid}", key=None, headers=h).status for h in cases]
    # Two x-api-key lines, or two authorization lines, one valid: never forwarded either way.
    statuses.append(status_of(sweep.raw(head("GET", "/v1/agents?limit=1", [("x-api-key", JUNK_KEY)]))))
    statuses.append(status_of(sweep.raw(head("GET", "/v1/agents?limit=1", [
        ("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {JUNK_KEY}")], key=None))))
    # Every spelling of a valid key authenticates and is stripped; of two authorization lines
    # the gateway reads one, the junk one here (401); nothing client-side is forwarded.
    assert statuses == [200, 200, 200, 200, 200, 200, 200, 200, 401]


def test_every_refusal(sweep, world):
    a, b = world
    sid = a["session"]
    expect = [
        (401, sweep.call("GET", "/v1/agents", key=None)),
        (401, sweep.call("GET", "/v1/agents", key=JUNK_KEY)),
        (401, sweep.call("GET", "/v1/agents", key="gw-key-expired")),
        (401, sweep.call("GET", "/v1/agents", key=sweep.gw.emulator.api_key)),
        (403, sweep.call("POST", "/v1/agents", key=CAROL, body={"name": "x", "model": "m"})),
        (404, sweep.call("GET", "/v1/messages")),
        (404, sweep.call("GET", f"/v1/sessions/{sid}", key=BOB)),
        (400, sweep.call("GET", "/v1/agents", headers={"anthropic-beta": "evil-2099-01-01"})),
        (413, sweep.call("POST", "/v1/agents", body={"name": "x" * (2 << 20), "model": "claude-sonnet-4-6"})),
    ]
    limited = [sweep.call("GET", "/v1/agents", key=CAROL).status for _ in range(3)]
    assert [status for status, _ in expect] == [reply.status for _, reply in expect]
    assert limited == [200, 200, 429]


UPSTREAM_FAULTS = [
    ({"status": 500}, 500), ({"status": 529}, 529), ({"status": 503}, 503), ({"status": 401}, 401),
    ({"kind": "reset"}, 503), ({"kind": "hang", "hold_ms": 300}, 503),
    ({"kind": "truncated"}, 200), ({"kind": "truncated_json"}, 200),
]


def test_upstream_faults(sweep, world):
    a, _ = world
    for fault, status in UPSTREAM_FAULTS:
        sweep.fault(path_prefix=f"/v1/agents/{a['agent']}", **fault)
        try:
            got = sweep.call("GET", f"/v1/agents/{a['agent']}").status
        except Exception as exc:  # noqa: BLE001 - a cut body is a valid outcome of some faults
            got = type(exc).__name__
        # A body cut short: over HTTP/1.1 the client sees the head and a short body; over HTTP/2
        # (the shipped cluster's ALPN choice) the upstream resets the stream, which Envoy may
        # answer with its own 503 before the head left (the gateway buffers owned JSON).
        allowed = (status, "IncompleteRead") + ((503,) if fault.get("kind", "").startswith("truncated") else ())
        assert got in allowed, (fault, got)
    # The stream faults too (the body is read raw).
    for kind in ("reset", "malformed", "badutf8", "truncated"):
        sweep.bad_inputs += 1
        conn = socket.create_connection(("127.0.0.1", sweep.gw.port), timeout=10)
        try:
            conn.sendall(head("GET", f"/v1/sessions/{a['session']}/events/stream"))
            sweep.gw.ok("POST", f"/v1/sessions/{a['session']}/events", key=ALICE, body={
                "events": [{"type": "user.message", "content": [{"type": "text", "text": f"emulator:fault {kind}"}]}]})
            out = b""
            while b"session.status_idle" not in out:
                try:
                    chunk = conn.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not chunk:
                    break
                out += chunk
            sweep.received.append(out)
        finally:
            conn.close()


# (name, value, status, what upstream receives as x-note): Envoy's HTTP/1 codec refuses NUL
# and other control characters (400, nothing forwarded), drops a bare CR and unfolds an
# obsolete line fold (forwarded normalised: a CR never reaches upstream, so it cannot split
# a header there).
BAD_HEADER_LINES = [
    ("x-note", "a\rb", 200, "ab"),
    ("x-note", "a\x00b", 400, None),
    ("x-api-key", ALICE + "\x00", 400, None),
    ("x-note", "a\r\n b", 200, "a b"),
    ("x-note", "a\x7fb\x01", 400, None),
    ("x-no\rte", "a", 400, None),
    ("x note", "a", 400, None),
    ("x-note", "a\nx-api-key: " + JUNK_KEY, 200, "a"),
]


def test_cr_lf_nul_in_headers_are_refused_or_normalised(sweep):
    for name, value, status, forwarded in BAD_HEADER_LINES:
        sweep.drain_upstream()
        raw = sweep.raw(head("GET", "/v1/agents?limit=1", [(name, value)]))
        got = [[v for n, v in r["headers"] if n == "x-note"] for r in sweep.gw.emulator.requests()]
        assert (status_of(raw), got) == (status, [[forwarded]] if forwarded else []), (name, value)
    sweep.drain_upstream()


HOP_BY_HOP = [
    [("connection", "x-api-key")],              # asks the proxy to drop the injected key
    [("connection", "close, anthropic-beta")],
    [("connection", "keep-alive"), ("keep-alive", "timeout=5, max=1000")],
    [("te", "trailers")],
    [("te", "gzip, chunked")],
    [("connection", "upgrade"), ("upgrade", "websocket")],
    [("connection", "upgrade"), ("upgrade", "h2c"), ("http2-settings", "AAMAAABkAAQAAP__")],
    [("proxy-authorization", PROXY_AUTH)],
    [("proxy-connection", "keep-alive")],
]


def test_hop_by_hop_headers(sweep):
    sweep.drain_upstream()
    statuses = []
    for headers in HOP_BY_HOP:
        statuses.append(status_of(sweep.raw(head("GET", "/v1/agents?limit=1", headers))))
    # `Connection: x-api-key` makes Envoy drop the client's key before the filter runs (401,
    # never the injected key); a websocket upgrade is refused by Envoy (403, not configured);
    # an h2c upgrade is ignored. The rest are served with only the injected key.
    assert statuses == [401, 200, 200, 200, 200, 403, 200, 200, 200]
    forwarded = sweep.gw.emulator.requests()
    for request in forwarded:
        names = [n for n, _ in request["headers"]]
        assert "upgrade" not in names and "proxy-authorization" not in names and "te" not in names or \
            [v for n, v in request["headers"] if n == "te"] == ["trailers"], request
        assert [v for n, v in request["headers"] if n == "x-api-key"] == [sweep.gw.emulator.api_key], request
        assert [v for n, v in request["headers"] if n == "anthropic-beta"] == [MANAGED_AGENTS_BETA], request
    # Every one was either served with the injected key or refused; none reached upstream
    # without the key or the beta.
    assert len(forwarded) == sum(1 for s in statuses if s == 200), (statuses, len(forwarded))
    sweep.drain_upstream()


SMUGGLING = [
    # Both framings: refused by Envoy's codec (never two interpretations).
    [("content-length", "4"), ("transfer-encoding", "chunked")],
    [("transfer-encoding", "chunked, identity")],
    [("transfer-encoding", "xchunked")],
    [("transfer-encoding", " chunked")],
    [("content-length", "4, 5")],
    [("content-length", "-1")],
    [("content-length", "4"), ("content-length", "5")],
]


def test_transfer_encoding_tricks(sweep):
    sweep.drain_upstream()
    smuggled = b"0\r\n\r\nGET /_emulator/requests HTTP/1.1\r\nhost: x\r\n\r\n"
    statuses = [status_of(sweep.raw(head("POST", "/v1/agents", h, body=smuggled))) for h in SMUGGLING]
    # Envoy's codec refuses every ambiguous framing (400) or unknown coding (501).
    assert statuses == [400, 501, 501, 400, 400, 400, 400]
    assert [r for r in sweep.gw.emulator.requests() if not r["path"].startswith("/v1/")] == []
    sweep.drain_upstream()


# (path, status): encoded dot segments and slashes are refused by the filter (404), as are
# `;` parameters and backslashes; NUL and non-ASCII bytes and `*` by Envoy's codec (400); a
# 70 KB path exceeds Envoy's header limit (431). Merged slashes and a percent-encoded CR LF
# in the query (forwarded untouched, still encoded) are ordinary calls (200).
PATHS = [
    ("/v1/agents/..%2F..%2F_emulator/requests", 404),
    ("/v1/agents/%2e%2e/%2e%2e/_emulator/requests", 404),
    ("/%2e%2e/_emulator/requests", 404),
    ("/v1/./agents/../../_emulator/usage/x", 404),
    ("/v1/agents%00", 400),
    ("/v1/agents;x=y", 404),
    ("/v1/agents\\..\\..\\_emulator", 404),
    ("/v1/sessions/%2e%2e/agents/../../_emulator/faults", 404),
    ("http://evil.example/_emulator/requests", 404),
    ("*", 400),
    ("/v1/agents/" + "a" * 70_000, 431),
    ("/v1/" + "/" * 3000 + "agents", 200),
    ("/v1/agents?x=" + "%0d%0ax-api-key:%20injected", 200),
    ("/v1/sessions/sesn_x/events/stream/../../../../_emulator/requests", 404),
    ("/v1/%5fEMULATOR", 404),
    ("/v1/agents/\xff", 400),
]


def test_path_attacks_never_leave_v1(sweep):
    sweep.drain_upstream()
    for path, status in PATHS:
        raw = sweep.raw(f"GET {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\nx-api-key: {ALICE}\r\n"
                        f"anthropic-beta: {MANAGED_AGENTS_BETA}\r\nanthropic-version: 2023-06-01\r\n\r\n"
                        .encode("latin-1"))
        assert status_of(raw) == status, (path[:60], raw[:200])
    forwarded = sweep.gw.emulator.requests()
    assert [r["path"] for r in forwarded if not r["path"].startswith("/v1/")] == []
    assert all("_emulator" not in r["path"].lower() for r in forwarded), forwarded
    sweep.drain_upstream()


def test_oversized_headers_and_bodies(sweep, world):
    a, _ = world
    sweep.drain_upstream()
    cases = [
        head("GET", "/v1/agents", [("x-big", "v" * 100_000)]),
        head("GET", "/v1/agents", [(f"x-h{i}", "v") for i in range(200)]),
        head("GET", "/v1/agents", [("x-api-key", "k" * 70_000)], key=None),
        head("GET", "/v1/agents", [("authorization", "Bearer " + "k" * 70_000)], key=None),
        head("POST", "/v1/agents", [("content-type", "application/json")],
             body=json.dumps({"name": "x" * (3 << 20), "model": "claude-sonnet-4-6"}).encode()),
        head("POST", "/v1/vaults", [("content-type", "application/json")], body=b"{" * (2 << 20)),
    ]
    statuses = [status_of(sweep.raw(request, timeout=15)) for request in cases]
    # Announcing 10 GiB and sending nothing: the gateway waits for the body (no answer, the
    # client gives up), and nothing reaches upstream.
    statuses.append(status_of(sweep.raw(head("POST", "/v1/agents", [
        ("content-type", "application/json"), ("content-length", str(10 << 30))]), timeout=2)))
    assert statuses == [431, 431, 431, 431, 413, 413, 0], statuses
    # A 2 MiB events body (over the 1 MiB inspection cap) is forwarded unread, not held back
    # (holding it would hit Envoy's own 1 MiB request buffer: a plain-text 413), and the
    # audit record says it was not read.
    reply = sweep.call("POST", f"/v1/sessions/{a['session']}/events", body={"events": [{
        "type": "user.message", "content": [{"type": "text", "text": "big " + "y" * (2 << 20)}]}]}, bad=False)
    assert reply.status == 200, reply.body[:200]
    big = [r for r in sweep.gw.emulator.requests() if r["body_bytes"] > (1 << 20)]
    assert [r["path"] for r in big] == [f"/v1/sessions/{a['session']}/events"]
    end = time.monotonic() + 15
    while '"events":"unread (body over the inspection cap)"' not in sweep.audit_path.read_text():
        assert time.monotonic() < end, "no audit record of the unread body"
        time.sleep(0.05)
    sweep.drain_upstream()


def test_cross_tenant_matrix(sweep, world):
    a, b = world
    sweep.drain_upstream()
    for method, path, body in cross_tenant_calls(a, b):
        assert sweep.call(method, path, key=BOB, body=body).status == 404, (method, path)
        assert sweep.call(method, path, key=BOB, body=body, auth="bearer").status == 404, (method, path)
    assert sweep.gw.emulator.requests() == []


def test_new_secret_shapes_reach_their_caller_only(sweep, world):
    a, _ = world
    gw = sweep.gw
    sweep.drain_upstream()
    sweep.new_secrets += BODY_SECRETS.values()
    vid = a["vault"]
    env_cred = gw.ok("POST", f"/v1/vaults/{vid}/credentials", key=ALICE, body={
        "display_name": "env", "auth": {"type": "environment_variable", "secret_name": "API_TOKEN",
                                        "secret_value": BODY_SECRETS["secret_value"],
                                        "networking": {"type": "unrestricted"}}})
    oauth = gw.ok("POST", f"/v1/vaults/{vid}/credentials", key=ALICE, body={
        "display_name": "oauth", "auth": {
            "type": "mcp_oauth", "access_token": BODY_SECRETS["access_token"],
            "mcp_server_url": "https://mcp.example", "refresh": {
                "client_id": "cid", "refresh_token": BODY_SECRETS["refresh_token"],
                "token_endpoint": "https://mcp.example/token",
                "token_endpoint_auth": {"type": "client_secret_post",
                                        "client_secret": BODY_SECRETS["client_secret"]}}}})
    gw.ok("POST", f"/v1/vaults/{vid}/credentials/{oauth['id']}", key=ALICE, body={
        "auth": {"type": "mcp_oauth", "access_token": BODY_SECRETS["access_token"],
                 "refresh": {"refresh_token": BODY_SECRETS["refresh_token"]}}})
    gw.ok("POST", f"/v1/vaults/{vid}/credentials/{oauth['id']}/mcp_oauth_validate", key=ALICE)
    session = gw.ok("POST", "/v1/sessions", key=ALICE, body={
        "agent": a["agent"], "environment_id": a["environment"],
        "resources": [{"type": "github_repository", "url": "https://github.com/o/r",
                       "authorization_token": BODY_SECRETS["session_github"]}]})
    rid = gw.ok("GET", f"/v1/sessions/{session['id']}/resources", key=ALICE)["data"][0]["id"]
    gw.ok("POST", f"/v1/sessions/{session['id']}/resources/{rid}", key=ALICE,
          body={"authorization_token": BODY_SECRETS["resource_update"]})
    gw.ok("POST", "/v1/deployments", key=ALICE, body={
        "name": "d", "agent": a["agent"], "environment_id": a["environment"],
        "resources": [{"type": "github_repository", "url": "https://github.com/o/r",
                       "authorization_token": BODY_SECRETS["deployment_github"]}]})
    # Answers that carry a secret: the caller gets it, every time a fresh one.
    received = []
    for verb in ("reveal_token", "rotate_token"):
        received.append(gw.ok("POST", f"/v1/tunnels/tnl_leak1/{verb}", key=ALICE)["tunnel_token"])
    hosted = gw.ok("POST", "/v1/environments", key=ALICE, body={"name": "w", "config": {"type": "self_hosted"}})
    item = gw.ok("GET", f"/v1/environments/{hosted['id']}/work/poll?block_ms=999", key=ALICE)
    received.append(item["secret"]["sessions_token"])
    received.append(gw.ok("POST", "/v1/user_profiles/uprof_leak1/action_urls", key=ALICE,
                          body={"action": {"type": "enroll_end_user"}})["url"])
    received.append(gw.ok("POST", "/v1/user_profiles/uprof_leak1/enrollment_url", key=ALICE)["url"])
    assert len(set(received)) == 5 and all(len(r) > 12 for r in received), received
    sweep.new_secrets += received
    # Webhook signing secrets live in the Admin API: never routed, never upstream.
    assert sweep.call("POST", "/v1/organizations/webhooks/wh_1/regenerate_signing_secret").status == 404
    assert sweep.call("POST", "/v1/organizations/webhooks", body={"url": "https://x"}).status == 404
    upstream = gw.emulator.requests()
    assert [r["path"] for r in upstream if "organizations" in r["path"]] == []
    # The secrets went upstream in bodies only, never in a path or header.
    for request in upstream:
        text = request["path"] + " ".join(v for _, v in request["headers"])
        assert [x for x in sweep.new_secrets if x in text] == []
    assert env_cred["id"].startswith("vcrd_")
    sweep.drain_upstream()


def test_zz_nothing_leaked_anywhere(sweep):
    """Runs last in this module: every byte seen in every path above."""
    sweep.drain_upstream()
    upstream_key = sweep.gw.emulator.api_key
    leaks = []
    for request in sweep.upstream_seen:
        names = [n for n, _ in request["headers"]]
        text = request["path"] + " ".join(v for _, v in request["headers"])
        leaks += [("upstream", s) for s in CLIENT_SECRETS if s in text]
        leaks += [("upstream header", n) for n in ("authorization", "proxy-authorization", "cookie") if n in names]
        if [v for n, v in request["headers"] if n == "x-api-key"] != [upstream_key]:
            leaks.append(("upstream key missing or doubled", request["path"]))
        if not request["path"].startswith("/v1/"):
            leaks.append(("outside /v1", request["path"]))
    for answer in sweep.received:
        if upstream_key.encode() in answer:
            leaks.append(("client", answer[:200]))
    # The access log is flushed every 100 ms: wait for a marker call's record to be written.
    marker = "agent_leaksweepmarker0001"
    sweep.call("GET", f"/v1/agents/{marker}", bad=False)
    end = time.monotonic() + 15
    while marker not in sweep.audit_path.read_text():
        assert time.monotonic() < end, "the audit log was never flushed"
        time.sleep(0.05)
    logs = sweep.gw.envoy.log() + sweep.audit_path.read_text()
    leaks += [("log", s) for s in [upstream_key, *CLIENT_SECRETS, "ghp_leak_secret"] if s in logs]
    assert len(sweep.new_secrets) == len(BODY_SECRETS) + 5, "the new-shapes sweep did not run"
    leaks += [("log (new shapes)", s) for s in sweep.new_secrets if s in logs]
    print(f"\nleak sweep: {sweep.bad_inputs} bad inputs tried, {len(sweep.upstream_seen)} upstream requests "
          f"checked, {len(sweep.received)} answers scanned, {len(leaks)} secrets leaked")
    counts = os.environ.get("MA_RELIABILITY_COUNTS")
    if counts:
        with open(counts, "a") as f:
            f.write(json.dumps({"suite": "leaks", "bad_inputs": sweep.bad_inputs,
                                "secrets_leaked": len(leaks)}) + "\n")
    assert leaks == []
    assert sweep.bad_inputs >= 100
