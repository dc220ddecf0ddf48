#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/.

Seeds are real shapes (the shipped plugin configs, Managed Agents bodies and SSE frames as the
unit tests use them) behind each target's option bytes (see fuzz/src/lib.rs). Running it again
only rewrites the `seed-*` files; entries libFuzzer added and merged are kept.
"""
import hashlib, json, os, struct, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "corpus")
REPO = os.path.dirname(ROOT)

def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

J = lambda v: json.dumps(v, separators=(",", ":"))

SPAN = '{"type":"span.model_request_end","id":"sevt_1","model_request_start_id":"sevt_0","is_error":false,"model_usage":{"input_tokens":3571,"output_tokens":727,"cache_creation_input_tokens":0,"cache_read_input_tokens":6656},"processed_at":"2026-05-01T12:00:04.000Z"}'
OUTCOME = '{"type":"span.outcome_evaluation_end","id":"sevt_9","is_error":true,"speed":"fast","usage":{"input_tokens":10,"output_tokens":2,"cache_creation_input_tokens":30,"cache_read_input_tokens":4}}'
USAGE = '{"input_tokens":100,"output_tokens":20,"cache_read_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":40,"ephemeral_1h_input_tokens":50},"active_seconds":12.9,"list_cost":{"amount":"1234","currency":"USD"},"server_tool_use":{"web_search_requests":3,"web_fetch_requests":1}}'
SESSION_USAGE = '{"type":"session.usage","usage":' + USAGE + '}'
SESSION = '{"id":"sesn_1","type":"session","status":"idle","agent":{"id":"agent_01","model":{"id":"claude-sonnet-4-6"},"metadata":{"ma_gateway_tenant":"acme"}},"metadata":{"ma_gateway_tenant":"acme"},"usage":' + USAGE + '}'

STREAM = (
    ": ping\n\n"
    "event: span.model_request_end\nid: sevt_1\ndata: " + SPAN + "\n\n"
    "event: agent.message\ndata: {\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}\n\n"
    "data: " + OUTCOME + "\n\n"
    "event: session.usage\r\ndata: " + SESSION_USAGE + "\r\n\r\n"
    "retry: 3000\nevent: session.error\ndata: {\"type\":\"session.error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n"
)

# ---- sse: [cap selector][n splits][n x u16 offsets][stream]
put("sse", "stream", bytes([0, 3]) + struct.pack("<HHH", 10, 200, 401) + STREAM.encode())
put("sse", "bom-crlf", bytes([2, 1]) + struct.pack("<H", 2) + b"\xef\xbb\xbfdata: a\r\ndata: b\r\rid: x\0y\n\nevent:message\ndata\n\n")
put("sse", "oversize", bytes([3, 0]) + b"event: session.usage\ndata: " + b"x" * 100 + b"\n\ndata: tail")
put("sse", "ids", bytes([1, 2]) + struct.pack("<HH", 5, 6) + b"id: 1\ndata: a\n\nid\ndata: b\n\nid: " + b"z" * 300 + b"\ndata: c\n\nretry: 12a\nretry: 7\n\n")

# ---- routes: [neighbours<<3 | method][path]
paths = [
    (0, "/v1/agents"), (1, "/v1/agents"), (0, "/v1/agents?limit=100&page=abc"),
    (1, "/v1/agents/agent_01/archive"), (0, "/v1/agents/agent_01/versions"),
    (0, "/v1/sessions/sesn_1/events/stream"), (1, "/v1/sessions/sesn_1/events"),
    (0, "/v1/sessions/sesn_1/threads/sthr_2/stream"), (2, "/v1/sessions/sesn_1/resources/sres_9"),
    (1, "/v1/environments/env_1/work/wrk_7/ack"), (1, "/v1/vaults/vlt_1/credentials/vcrd_2/archive"),
    (0xf8, "/v1/files/file_1/content"), (0xf8, "/v1/skills/skill_1/versions/1759178010641129"),
    (0xfa, "/v1/memory_stores/memstore_1/archive"), (0xf8, "/v1/deployment_runs/drun_1"),
    (0, "/v1/sessions/../agents"), (0, "/v1/sessions/sesn_1%2Fevents"), (0, "/v1//sessions"),
    (3, "/v1/agents"), (0, "/v1/SESSIONS/sesn_1"), (0, "/v1/sessions/sesn_a.b"),
]
for i, (b, p) in enumerate(paths):
    put("routes", f"{i:02}", bytes([b]) + p.encode())

# ---- config: plugin JSON
for name in ("plugin-config.json", "plugin-config.minimal.json"):
    with open(os.path.join(REPO, "examples", name), "rb") as f:
        put("config", name, json.dumps(json.load(f), separators=(",", ":")))
full = json.load(open(os.path.join(REPO, "examples", "plugin-config.json")))
full["policy"] = {"tenants": {
    "research": {"models": {"allow": ["claude-sonnet-4-*"], "deny": ["*-fast"]},
                 "tools": {"deny": ["bash", "web_fetch"], "allow": ["read", "grep", "custom:*"]},
                 "mcp_servers": {"allow_urls": ["https://mcp.internal/*"]},
                 "environments": {"forbid_unrestricted": True, "allowed_hosts": ["*.internal.example"], "allow_package_managers": False},
                 "vaults": False, "max_body_bytes": 65536},
    "*": {"environments": {"forbid_unrestricted": True}}}}
full["limits"] = {
    "per_tenant": {"create": {"per_minute": 300, "burst": 50}, "read": {"per_minute": 600},
                   "stream": {"per_minute": 60, "burst": 10}, "concurrent_streams": 20},
    "per_principal": {"create": {"per_minute": 60, "burst": 10}, "concurrent_streams": 5},
    "tenants": {"research": {"create": {"per_minute": 1000, "burst": 100}, "read": None,
                             "per_principal": {"concurrent_streams": 10}}},
    "budgets": {"tenants": {"research": {"tokens_per_minute": 100000, "microdollars_per_day": 50000000},
                            "*": {"microdollars_per_day": 5000000}}}}
put("config", "full.json", J(full))

# ---- operations (index into CALLS in fuzz/src/lib.rs)
AG_CREATE, AG_LIST, AG_READ, AG_UPDATE = 0, 1, 2, 3
SE_CREATE, SE_LIST, SE_READ, SE_UPDATE = 6, 7, 8, 9
SE_SEND, RES_CREATE = 12, 20
ENV_CREATE, ENV_LIST, ENV_UPDATE = 23, 24, 26
VLT_CREATE, VLT_LIST, CRED_CREATE = 29, 30, 34

agent = {"name": "a", "model": "claude-sonnet-4-6", "system": "be brief",
         "tools": [{"type": "agent_toolset_20260401", "default_config": {"enabled": False},
                    "configs": [{"name": "read", "enabled": True}, {"name": "bash", "enabled": True}]},
                   {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
                   {"type": "mcp_toolset", "mcp_server_name": "docs"}],
         "mcp_servers": [{"type": "url", "name": "docs", "url": "https://mcp.internal/docs"}],
         "multiagent": {"type": "coordinator", "agents": [{"type": "agent", "id": "agent_02"}]},
         "metadata": {"team": "x"}}
session = {"agent": {"type": "agent", "id": "agent_01", "version": 2}, "environment_id": "env_1",
           "vault_ids": ["vlt_1", "vlt_2"], "title": "t",
           "resources": [{"type": "file", "file_id": "file_1"}, {"type": "memory_store", "memory_store_id": "memstore_1"}],
           "budget": {"type": "limit", "max_list_cost": {"amount": "500", "currency": "USD"}},
           "metadata": {"ma_gateway_tenant": "acme"}}
env = {"name": "e", "config": {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": ["api.internal.example"],
                                                                  "allow_package_managers": True}}}
bodies = [
    (AG_CREATE, agent), (AG_UPDATE, {"version": 1, "metadata": None, "model": {"id": "claude-opus-4-6-fast"}}),
    (SE_CREATE, session), (SE_CREATE, {"agent": "agent_01", "environment_id": "env_9"}),
    (SE_UPDATE, {"agent": {"id": "agent_01", "tools": [{"type": "agent_toolset_20260401"}]}, "budget": None, "vault_ids": ["vlt_3"]}),
    (RES_CREATE, {"type": "file", "file_id": "file_1", "nested": {"vault_id": "vlt_9", "ids": ["agent_1"], "agent_ids": ["agent_2"]}}),
    (ENV_CREATE, env), (ENV_UPDATE, {"config": {"type": "cloud", "networking": {"type": "unrestricted"}}}),
    (VLT_CREATE, {"display_name": "v", "metadata": {k: "v" for k in "abcdefghijklmnop"}}),
    (CRED_CREATE, {"auth": {"type": "static_bearer", "token": "t"}}),
    (SE_SEND, {"events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]}),
]
for i, (op, body) in enumerate(bodies):
    put("tenancy_request", f"{i:02}", bytes([op, i % 8]) + J(body).encode())
    put("policy", f"{i:02}", bytes([op, 0]) + struct.pack(">Q", 1234567) + J(body).encode())
put("tenancy_request", "empty-create", bytes([SE_CREATE, 0]))
put("policy", "null", bytes([SE_CREATE, 0]) + struct.pack(">Q", 0) + b"null")

tagged = lambda t, extra=None: dict({"id": "agent_01", "type": "agent", "metadata": {"ma_gateway_tenant": t}}, **(extra or {}))
responses = [
    (AG_LIST, 0, {"data": [tagged("acme"), tagged("globex"), {"id": "agent_03", "metadata": {}}, 7], "next_page": "p2"}),
    (SE_READ, 0, SESSION), (AG_READ, 1, tagged("globex")), (SE_LIST, 0x20, {"data": [], "prev_page": None}),
    (ENV_LIST, 0, {"data": [{"id": "env_1", "metadata": {"ma_gateway_tenant": "acme", "x": "y"}}]}),
    (VLT_LIST, 4 << 2, {"type": "error", "error": {"type": "api_error"}}),
    (5, 0, {"data": [{"agent": tagged("acme"), "version": 1}]}),
]
for i, (op, opts, body) in enumerate(responses):
    put("tenancy_response", f"{i:02}", bytes([op, opts]) + J(body).encode())
put("tenancy_response", "not-json", bytes([AG_LIST, 0]) + b"<html>")

# ---- usage: [name index][data]
for i, (n, d) in enumerate([(0, SPAN), (1, OUTCOME), (2, SESSION_USAGE), (3, SPAN), (3, '{"type":"agent.message"}'),
                            (2, '{"type":"session.usage","input_tokens":5}'), (0, SESSION)]):
    put("usage", f"{i:02}", bytes([n]) + d.encode())

# ---- metering: [response kind][u16 split][body]
put("metering", "stream", bytes([0]) + struct.pack("<H", 77) + STREAM.encode())
put("metering", "thread", bytes([1]) + struct.pack("<H", 5) + STREAM.encode())
put("metering", "session", bytes([2]) + struct.pack("<H", 30) + SESSION.encode())
put("metering", "page", bytes([3]) + struct.pack("<H", 3) + J({"data": [json.loads(SPAN), json.loads(OUTCOME), json.loads(SESSION_USAGE)], "next_page": None}).encode())
put("metering", "error", bytes([4]) + struct.pack("<H", 1) + b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}')

# ---- jwt: mode 1 = JSON payload; mode 0 = raw serialized Metadata
def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7f) | 0x80]); v >>= 7
    return out + bytes([v])
def field(n, b):
    return varint(n << 3 | 2) + varint(len(b)) + b
def entry(k, v):
    return field(1, k.encode()) + field(2, v)
def pbv(v):
    if v is None: return varint(1 << 3) + varint(0)
    if isinstance(v, bool): return varint(4 << 3) + varint(int(v))
    if isinstance(v, (int, float)): return varint(2 << 3 | 1) + struct.pack("<d", float(v))
    if isinstance(v, str): return field(3, v.encode())
    if isinstance(v, list): return field(6, b"".join(field(1, pbv(x)) for x in v))
    return field(5, b"".join(field(1, entry(k, pbv(x))) for k, x in v.items()))
payloads = [
    {"sub": "alice", "org": "acme", "scope": "sessions:* agents:readonly", "exp": 1780000000, "aud": ["x"]},
    {"sub": "bob", "org": "acme", "scope": ["sessions:readonly"], "nested": {"a": [1, 2.5, None, True]}},
    {"sub": "", "org": "no spaces allowed"},
]
for i, p in enumerate(payloads):
    put("jwt", f"json-{i}", bytes([1]) + J(p).encode())
    meta = field(1, entry("envoy.filters.http.jwt_authn", field(1, entry("jwt_payload", pbv(p)))))
    other = field(1, entry("envoy.filters.http.other", field(1, entry("k", pbv("v")))))
    put("jwt", f"pb-{i}", bytes([0]) + other + meta)
put("jwt", "rules", bytes([1]) + J({"tenant_claim": "org", "scopes_claim": "scp", "metadata_key": "p"}).encode())

# ---- vault: [field index][body]
put("vault", "kv2", bytes([0]) + J({"request_id": "r", "data": {"data": {"api_key": "sk-ant-api03-abcdefgh"}, "metadata": {"version": 3}}}).encode())
put("vault", "kv2-bad", bytes([1]) + J({"data": {"data": {"key": "has space\n"}}}).encode())
put("vault", "stored", bytes([0]) + b"v1\nenv:ANTHROPIC_API_KEY\nsk-ant-api03-abcdefgh")
put("vault", "rotated", bytes([0]) + b"v1\nrotated\nsk-rotated")

# ---- audit
put("audit", "events", J({"events": [{"type": "user.message", "content": []}, {"type": "user.interrupt"}, {"type": "Bad Type!"}, 3]}))
put("audit", "many", J({"events": [{"type": "user.message"}] * 40}))

# ---- gateway: "METHOD PATH\nname: value\n..." (\x01..\x03 = the gateway keys)
reqs = [
    "POST /v1/sessions\nx-api-key: \x01\nanthropic-beta: files-api-2025-04-14, managed-agents-2026-04-01\ncookie: c\nconnection: keep-alive, x-foo\nx-foo: 1",
    "GET /v1/agents?limit=5\nauthorization: Bearer \x02\nanthropic-version: 2023-06-01\nte: trailers",
    "DELETE /v1/agents/agent_1\nx-api-key: \x02",
    "GET /v1/sessions/sesn_1/events/stream\nx-api-key: \x03",
    "GET /v1/messages\nx-api-key: \x01\nproxy-authorization: Basic x",
    "POST /v1/agents\nx-api-key: \x01\nanthropic-beta: evil-beta",
    "GET /v1/files/file_1/content\nauthorization: Bearer \x01\nauthorization: Bearer wrong",
]
for i, r in enumerate(reqs):
    put("gateway", f"{i:02}", r)

# ---- text: [parser][text]
for i, (p, t) in enumerate([(0, "2026-05-01T12:00:04Z"), (0, "2024-02-29T23:59:60.5+00:00"), (1, "3.75"), (1, "0.000001"),
                            (2, "7d06a59ea2f96d3f8c6771437b8bb426b2ddc3ff3aee7d49f357fcbe5530da2c"), (3, "sessions:readonly"),
                            (3, "*:*"), (4, "claude-sonnet-4-*"), (5, "a*b*c\x01axxbyyc"), (5, "https://*.example.com/x/*\x01https://a.example.com/x/y")]):
    put("text", f"{i:02}", bytes([p]) + t.encode())
print("seeds written under", CORPUS)
