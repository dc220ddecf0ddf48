"""JWT identity, Envoy side: jwt_authn in front of the gateway, checked in a real Envoy.

Envoy's own `envoy.filters.http.jwt_authn` verifies a JWT-shaped `Authorization: Bearer` token
against a local JWKS, refuses bad ones itself (before the gateway, before upstream), removes a
good one from the request and leaves its payload in dynamic metadata, where the gateway reads it
(`src/host/claims.rs`). Requests without a JWT — gateway keys, anonymous — pass through untouched.

What the gateway would read is made visible to the test: Envoy sets the response header
`x-test-jwt-payload` from `%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload)%` — the
very entry `verified_claims` decodes — on every reply, and leaves it out when there is none.

The gateway's plugin config names the claims (`jwt.tenant_claim: org`) and declares the tenants
(required with a JWT): a verified token alone is a principal of that tenant, with the token's
`family:action` scopes.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest
import yaml

from tests.e2e.conftest import KEYS, MANAGED_AGENTS_BETA, Gateway, Reply
from tests.harness import jwt, stack


PAYLOAD_HEADER = "x-test-jwt-payload"


@pytest.fixture(scope="module")
def keys():
    """The IdP's signing key, and an attacker's key that even reuses the IdP's `kid`."""
    return jwt.RsaKey.generate("idp-key-1"), jwt.RsaKey.generate("idp-key-1")


@pytest.fixture(scope="module")
def jwt_gateway(emulator, keys, tmp_path_factory):
    idp, _ = keys
    jwks_path = jwt.write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json", idp)
    config = stack.render_envoy_config(
        upstream=emulator.upstream,
        listen_port=0, admin_port=0, gateway_keys=KEYS,
        # A JWT may name any tenant, so the tenants are declared (the filter refuses a JWT config
        # without them): the keys' `default` and the tokens' `acme`.
        plugin_overrides={"jwt": {"tenant_claim": "org", "scopes_claim": "scope"},
                          "tenants": [{"name": "default"}, {"name": "acme"}]},
    )
    jwt.add_jwt_authn(config, jwks_path=jwks_path, expose_payload_header=PAYLOAD_HEADER)
    envoy = stack.Envoy(config=config, env=stack.envoy_env(emulator.api_key)).start()
    yield Gateway(envoy, emulator)
    envoy.stop()


def payload(reply) -> dict | None:
    """The verified payload the request carried in dynamic metadata (None: there was none)."""
    value = reply.headers.get(PAYLOAD_HEADER)
    return None if value is None else json.loads(value)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_gateway_envelope(reply, status: int, kind: str) -> str:
    """A refusal by the gateway itself (Anthropic error envelope), not by jwt_authn."""
    assert reply.status == status, reply.body
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    return body["error"]["message"]


def assert_refused_by_jwt_authn(reply, status: int, message: str):
    """jwt_authn's own local reply: plain text, `WWW-Authenticate: Bearer … invalid_token`."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.body.decode() == message
    challenge = reply.headers.get("www-authenticate", "")
    assert challenge.startswith('Bearer realm="') and 'error="invalid_token"' in challenge, challenge


def test_a_valid_token_passes_jwt_authn_and_reaches_the_gateway(jwt_gateway, keys):
    idp, _ = keys
    gw = jwt_gateway
    gw.emulator.clear_requests()
    claims = jwt.claims(sub="user-7", tenant="acme", scope="sessions:read agents:*")
    reply = gw.call("GET", "/v1/agents", key=None, headers=bearer(jwt.sign(idp, claims)))

    # jwt_authn accepted it and removed it (`forward: false`); the gateway took the verified
    # claims from dynamic metadata and forwarded with the upstream key.
    assert reply.status == 200, reply.body
    (received,) = gw.emulator.requests()
    assert "authorization" not in [n for n, _ in received["headers"]]
    assert [v for n, v in received["headers"] if n == "x-api-key"] == [gw.emulator.api_key]

    # The token's scopes bind: `sessions:read agents:*` does not include creating a vault.
    gw.emulator.clear_requests()
    refused = gw.call("POST", "/v1/vaults", key=None, body={"name": "x"}, headers=bearer(jwt.sign(idp, claims)))
    message = assert_gateway_envelope(refused, 403, "permission_error")
    assert message == "missing scope vaults:create: your credential is not allowed this operation"
    assert gw.emulator.requests() == []

    # The verified payload is in dynamic metadata, exactly as signed.
    assert payload(reply) == claims


def test_a_token_with_a_gateway_key_is_forwarded_without_the_token(jwt_gateway, keys):
    idp, _ = keys
    gw = jwt_gateway
    gw.emulator.clear_requests()
    token = jwt.sign(idp, jwt.claims(tenant="acme"))
    reply = gw.call("GET", "/v1/agents", key=KEYS["alice"], headers=bearer(token))
    # A verified token wins over a gateway key sent beside it (the key is stripped either way).
    assert reply.status == 200, reply.body
    assert payload(reply)["org"] == "acme"
    (received,) = gw.emulator.requests()
    assert "authorization" not in [n for n, _ in received["headers"]]
    assert all(token.split(".")[1] not in v for _, v in received["headers"])
    assert [v for n, v in received["headers"] if n == "x-api-key"] == [gw.emulator.api_key]


@pytest.mark.parametrize("auth", ["x-api-key", "bearer"])
def test_gateway_keys_pass_jwt_authn_untouched(jwt_gateway, auth):
    gw = jwt_gateway
    reply = gw.call("GET", "/v1/agents", key=KEYS["bob"], auth=auth)
    assert reply.status == 200, reply.body
    assert payload(reply) is None
    reply = gw.call("GET", "/v1/agents", key=KEYS["bob"] + "x", auth=auth)
    assert_gateway_envelope(reply, 401, "authentication_error")
    reply = gw.call("GET", "/v1/agents", key=None)
    assert_gateway_envelope(reply, 401, "authentication_error")
    assert payload(reply) is None


def _invalid_tokens(idp: jwt.RsaKey, attacker: jwt.RsaKey) -> dict[str, tuple[str, int, str]]:
    """name → (token, status, jwt_authn's message)."""
    header, _, signature = jwt.sign(idp, jwt.claims()).split(".")
    swapped = jwt.b64url(json.dumps(jwt.claims(tenant="victim")).encode())
    unknown_kid = jwt.RsaKey(kid="idp-key-2", n=attacker.n, e=attacker.e, d=attacker.d)
    no_key = "Jwks doesn't have key to match kid or alg from Jwt"
    return {
        "expired": (jwt.sign(idp, jwt.claims(ttl=-3600)), 401, "Jwt is expired"),
        "not yet valid": (jwt.sign(idp, jwt.claims(nbf=int(time.time()) + 3600)), 401, "Jwt not yet valid"),
        "wrong key, same kid": (jwt.sign(attacker, jwt.claims()), 401, "Jwt verification fails"),
        "unknown kid": (jwt.sign(unknown_kid, jwt.claims()), 401, no_key),
        "payload swapped": (f"{header}.{swapped}.{signature}", 401, "Jwt verification fails"),
        "alg none": (jwt.unsigned(jwt.claims()), 401,
                     "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"),
        "HS256 keyed with the public key": (jwt.hs256_confused(idp, jwt.claims()), 401, no_key),
        "wrong issuer": (jwt.sign(idp, jwt.claims(iss="https://evil.example")), 401, "Jwt issuer is not configured"),
        "wrong audience": (jwt.sign(idp, jwt.claims(aud="someone-else")), 403, "Audiences in Jwt are not allowed"),
    }


INVALID = ["expired", "not yet valid", "wrong key, same kid", "unknown kid", "payload swapped", "alg none",
           "HS256 keyed with the public key", "wrong issuer", "wrong audience"]


@pytest.mark.parametrize("case", INVALID)
def test_bad_tokens_are_refused_by_jwt_authn_before_the_gateway(jwt_gateway, keys, case):
    gw = jwt_gateway
    token, status, message = _invalid_tokens(*keys)[case]
    gw.emulator.clear_requests()
    # A valid gateway key alongside does not rescue a bad token: jwt_authn refuses first.
    reply = gw.call("GET", "/v1/agents", key=KEYS["alice"], headers=bearer(token))
    assert_refused_by_jwt_authn(reply, status, message)
    assert payload(reply) is None
    assert gw.emulator.requests() == []


def test_a_lowercase_bearer_jwt_is_still_checked(jwt_gateway, keys):
    """The rule matches the scheme in any case, but jwt_authn extracts only `Bearer `: a JWT
    sent as `bearer …` is refused as missing, never skipped."""
    idp, attacker = keys
    gw = jwt_gateway
    for token in (jwt.sign(idp, jwt.claims()), jwt.sign(attacker, jwt.claims())):
        reply = gw.call("GET", "/v1/agents", key=KEYS["alice"], headers={"authorization": f"bearer {token}"})
        assert (reply.status, reply.body) == (401, b"Jwt is missing")
        assert payload(reply) is None


def _raw_call(gw: Gateway, path: str, headers: list[tuple[str, str]]):
    """A request with repeated header names (http.client's dict API cannot send those)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in [("anthropic-version", "2023-06-01"), ("anthropic-beta", MANAGED_AGENTS_BETA)] + headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def test_a_client_cannot_forge_the_verified_payload(jwt_gateway, keys):
    """Nothing a client sends becomes a verified payload: only jwt_authn writes the metadata,
    and only for a token it verified in `Authorization`."""
    idp, attacker = keys
    gw = jwt_gateway
    victim = jwt.claims(sub="admin", tenant="victim", scope="*:*")
    forged_b64 = jwt.b64url(json.dumps(victim).encode())
    idp_signed = jwt.sign(idp, victim)

    # 1. Headers shaped like a forwarded payload, metadata, or the test header itself.
    reply = gw.call("GET", "/v1/agents", key=KEYS["alice"], headers={
        "x-jwt-payload": forged_b64,
        "x-jwt-claims": json.dumps(victim),
        "x-envoy-dynamic-metadata": json.dumps({jwt.JWT_AUTHN: {jwt.METADATA_KEY: victim}}),
        PAYLOAD_HEADER: json.dumps(victim),
    })
    assert reply.status == 200, reply.body  # as alice, through her gateway key
    assert payload(reply) is None

    # 2. A token, even one the IdP signed, anywhere but `Authorization` is never verified and
    #    never becomes a payload: in x-api-key it is just a wrong gateway key; in the query
    #    (`access_token`, jwt_authn's default location, disabled by `from_headers`) it is ignored.
    reply = gw.call("GET", "/v1/agents", key=idp_signed)
    assert_gateway_envelope(reply, 401, "authentication_error")
    assert payload(reply) is None
    reply = gw.call("GET", f"/v1/agents?access_token={idp_signed}", key=KEYS["alice"])
    assert reply.status == 200 and payload(reply) is None

    # 3. Two Authorization headers, a gateway key and an attacker-signed JWT. Envoy joins them
    #    into one value (`Bearer <key>,Bearer <jwt>`): the rule's regex does not match, nothing
    #    is verified, nothing is written, and the joined value is no gateway key either.
    reply = _raw_call(gw, "/v1/agents", [("authorization", f"Bearer {KEYS['alice']}"),
                                         ("authorization", f"Bearer {jwt.sign(attacker, victim)}")])
    assert payload(reply) is None
    assert assert_gateway_envelope(reply, 401, "authentication_error") == "invalid gateway key"


def test_the_example_config_verifies_tokens_like_the_tested_one():
    """examples/jwt.envoy.yaml (validated by test_configs) uses the rule, token location and
    metadata key proven here, with jwt_authn right before ma_gateway."""
    config = yaml.safe_load((stack.ROOT / "examples" / "jwt.envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[names.index(jwt.JWT_AUTHN) + 1] == "ma_gateway"
    shipped = next(f for f in hcm["http_filters"] if f["name"] == jwt.JWT_AUTHN)["typed_config"]
    tested = jwt.jwt_authn_filter(jwks_inline=jwt.jwks())["typed_config"]
    assert shipped["rules"] == tested["rules"]
    (provider,) = shipped["providers"].values()
    (tested_provider,) = tested["providers"].values()
    for field in ("from_headers", "forward", "payload_in_metadata"):
        assert provider[field] == tested_provider[field], field
