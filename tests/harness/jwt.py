"""JWTs for the end-to-end suite, and the Envoy `jwt_authn` filter that verifies them.

Standard library only: RSA keys are generated here (Miller-Rabin primes, e = 65537) and tokens
are signed RS256 (RSASSA-PKCS1-v1_5 with SHA-256, RFC 7518 §3.3). This is test-only key
material — never use it for anything real. It needs no third-party package, and it checks
itself: a token this module signs wrongly is refused by Envoy, so the suite would fail.

`add_jwt_authn` patches a config rendered by `stack.render_envoy_config`: it inserts Envoy's own
`envoy.filters.http.jwt_authn` before the `ma_gateway` filter with a local JWKS. A Bearer token
shaped like a JWT must verify (refused with 401 by jwt_authn otherwise); any other request —
gateway keys in `x-api-key` or `Authorization: Bearer`, or no credential — is not matched by the
rule and continues unchanged to the gateway. The verified payload is written to the dynamic
metadata `envoy.filters.http.jwt_authn` → `<metadata_key>`, where the gateway reads it; a client
has no way to write dynamic metadata.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

JWT_AUTHN = "envoy.filters.http.jwt_authn"
PROVIDER = "gateway_idp"
ISSUER = "https://idp.test.example"
AUDIENCE = "ma-gateway"
METADATA_KEY = "jwt_payload"
# A Bearer credential shaped like a compact JWS (three base64url parts, the first one a JSON
# object: `eyJ` is base64url of `{"`). Gateway keys never look like this.
JWT_BEARER_REGEX = r"^[Bb][Ee][Aa][Rr][Ee][Rr] +eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$"

# DER prefix of DigestInfo{sha256, 32-byte digest} (RFC 8017 §9.2 note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % q for q in range(2, int(p**0.5) + 1))]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _probably_prime(n: int, rounds: int = 40) -> bool:
    if n < 2:
        return False
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _random_prime(bits: int, e: int) -> int:
    while True:
        # Top two bits set (so p*q has exactly 2*bits bits), odd.
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if candidate % e != 1 and _probably_prime(candidate):
            return candidate


@dataclass(frozen=True)
class RsaKey:
    """An RSA key pair for RS256; `kid` names it in the JWKS and token headers."""

    kid: str
    n: int
    e: int
    d: int

    @classmethod
    def generate(cls, kid: str, bits: int = 2048) -> "RsaKey":
        e = 65537
        while True:
            p, q = _random_prime(bits // 2, e), _random_prime(bits // 2, e)
            n = p * q
            if p != q and n.bit_length() == bits:
                d = pow(e, -1, (p - 1) * (q - 1))
                return cls(kid=kid, n=n, e=e, d=d)

    def jwk(self) -> dict:
        """The public half as a JWK (RFC 7517)."""
        return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                "n": b64url(_int_bytes(self.n)), "e": b64url(_int_bytes(self.e))}

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 signature of SHA-256(message)."""
        k = (self.n.bit_length() + 7) // 8
        t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        return pow(int.from_bytes(em, "big"), self.d, self.n).to_bytes(k, "big")


def jwks(*keys: RsaKey) -> dict:
    return {"keys": [key.jwk() for key in keys]}


def write_jwks(path: Path, *keys: RsaKey) -> Path:
    """Writes a JWKS file (public keys only) and returns its path."""
    path = Path(path)
    path.write_text(json.dumps(jwks(*keys)))
    return path


def encode(header: dict, claims: dict) -> str:
    """`header.payload` (the signing input), both compact JSON, base64url."""
    def part(obj: dict) -> str:
        return b64url(json.dumps(obj, separators=(",", ":")).encode())

    return f"{part(header)}.{part(claims)}"


def sign(key: RsaKey, claims: dict, *, header: dict | None = None) -> str:
    """A compact RS256 JWS of `claims` signed by `key` (its `kid` in the header)."""
    signing_input = encode({"alg": "RS256", "typ": "JWT", "kid": key.kid, **(header or {})}, claims)
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def claims(*, sub: str = "user-1", tenant: str | None = "acme", scope: str | list | None = None,
           ttl: int = 600, issued_ago: int = 0, iss: str = ISSUER, aud: str | list | None = AUDIENCE,
           tenant_claim: str = "org", **extra) -> dict:
    """A claim set: `exp` is `ttl` seconds from now (negative: already expired)."""
    now = int(time.time())
    out: dict = {"iss": iss, "sub": sub, "iat": now - issued_ago, "exp": now + ttl}
    if aud is not None:
        out["aud"] = aud
    if tenant is not None:
        out[tenant_claim] = tenant
    if scope is not None:
        out["scope"] = scope
    out.update(extra)
    return out


def unsigned(claims_: dict) -> str:
    """An `alg: none` token (RFC 7519 §6): must be refused."""
    return encode({"alg": "none", "typ": "JWT"}, claims_) + "."


def hs256_confused(key: RsaKey, claims_: dict) -> str:
    """The classic algorithm-confusion forgery: HS256 keyed with the RSA public key's JWK JSON."""
    signing_input = encode({"alg": "HS256", "typ": "JWT", "kid": key.kid}, claims_)
    secret = json.dumps(key.jwk()).encode()
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def jwt_authn_filter(*, jwks_path: Path | None = None, jwks_inline: dict | None = None,
                     issuer: str = ISSUER, audiences: list[str] | None = None,
                     metadata_key: str = METADATA_KEY) -> dict:
    """The `envoy.filters.http.jwt_authn` HTTP filter entry (a dict ready for the filter chain).

    - The token is taken from `Authorization: Bearer` only (no `access_token` query parameter).
    - A request whose Authorization is a JWT-shaped Bearer must verify: a bad signature, unknown
      key, expired token, wrong issuer or audience is refused by jwt_authn with 401.
    - Any other request (gateway key, no credential) matches no rule and continues untouched.
    - After verification the token is removed (`forward: false`) and the payload is written to
      dynamic metadata `envoy.filters.http.jwt_authn` → `metadata_key` (a Struct).
    """
    if (jwks_path is None) == (jwks_inline is None):
        raise ValueError("give exactly one of jwks_path, jwks_inline")
    source = {"filename": str(jwks_path)} if jwks_path is not None else {"inline_string": json.dumps(jwks_inline)}
    return {
        "name": JWT_AUTHN,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                PROVIDER: {
                    "issuer": issuer,
                    "audiences": audiences if audiences is not None else [AUDIENCE],
                    "local_jwks": source,
                    "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                    "forward": False,
                    "payload_in_metadata": metadata_key,
                    "clock_skew_seconds": 30,
                }
            },
            "rules": [
                {
                    "match": {
                        "prefix": "/",
                        "headers": [{"name": "authorization",
                                     "string_match": {"safe_regex": {"regex": JWT_BEARER_REGEX}}}],
                    },
                    "requires": {"provider_name": PROVIDER},
                }
            ],
        },
    }


def _http_filters(config: dict) -> list:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]


def add_jwt_authn(config: dict, *, log_metadata: bool = True, expose_payload_header: str | None = None,
                  **filter_args) -> dict:
    """Inserts jwt_authn right before `ma_gateway` in a rendered config (in place; returned).

    `filter_args` go to `jwt_authn_filter`. With `log_metadata`, the access log also prints
    the verified payload as `jwt` (`%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:<key>)%`).
    `expose_payload_header` (tests only: it hands the claims back to the client) adds that
    response header, set by Envoy from the same metadata on every reply, local replies
    included, and absent when there is no payload — so a test sees at once exactly what the
    gateway reads (the access log is flushed only every 10 s).
    """
    filters = _http_filters(config)
    if any(f["name"] == JWT_AUTHN for f in filters):
        raise ValueError("config already has a jwt_authn filter")
    index = next(i for i, f in enumerate(filters) if f["name"] == "ma_gateway")
    entry = jwt_authn_filter(**filter_args)
    filters.insert(index, entry)
    key = entry["typed_config"]["providers"][PROVIDER]["payload_in_metadata"]
    formatter = f"%DYNAMIC_METADATA({JWT_AUTHN}:{key})%"
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    if log_metadata:
        for log in hcm.get("access_log", []):
            fmt = log["typed_config"].get("log_format", {}).get("json_format")
            if fmt is not None:
                fmt["jwt"] = formatter
    if expose_payload_header:
        hcm["route_config"].setdefault("response_headers_to_add", []).append({
            "header": {"key": expose_payload_header, "value": formatter},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        })
    return config
