"""A fake identity provider: signing keys, tokens signed with them, and a JWKS server.

`SigningKey` holds a freshly generated RSA (RS256) or P-256 (ES256) key pair and
signs real tokens; `JwksServer` is a `FakeServer` (real aiohttp on 127.0.0.1)
serving the public halves at `/.well-known/jwks.json`, with the shared fault
injection (`status`, `hang`, `malformed`, ...) and request recording.
`hs256_token` signs with a shared secret, `unsigned_token` writes `alg: none`,
and `hmac_token` signs whatever header it is given with any bytes as the HMAC
key (the key-confusion attack PyJWT itself refuses to produce).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.fakes.server import FakeServer

ISSUER = "https://id.example.test/"
AUDIENCE = "story-service"
JWKS_PATH = "/.well-known/jwks.json"
HS256_SECRET = "test-secret-of-at-least-thirty-two-characters"


def claims(sub: Any = "alice", *, ttl: float = 300, **changes: Any) -> dict[str, Any]:
    """Valid claims for `sub` (issued now, expiring in `ttl`); `changes` override or add,
    and a value of None removes the claim."""
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl),
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def hmac_token(payload: dict[str, Any], key: bytes, header: dict[str, Any]) -> str:
    """An HS256 signature over any header, with any bytes as the secret."""
    signing_input = _segments(header, payload)
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def unsigned_token(payload: dict[str, Any], kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return _segments(header, payload) + "."


def hs256_token(payload: dict[str, Any], secret: str = HS256_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


@dataclass
class SigningKey:
    """A key pair of the fake identity provider."""

    kid: str
    algorithm: str = "RS256"
    private: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.algorithm == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif self.algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported algorithm {self.algorithm}")

    def jwk(self) -> dict[str, Any]:
        """The public JWK, as an identity provider publishes it."""
        algorithm = RSAAlgorithm if self.algorithm == "RS256" else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, payload: dict[str, Any], **header: Any) -> str:
        """A token signed with this key; header values override (`kid=None`: no kid)."""
        headers = {"kid": self.kid, **header}
        headers = {name: value for name, value in headers.items() if value is not None}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers=headers)


class JwksServer(FakeServer):
    """Serves the published keys at `/.well-known/jwks.json` (no authentication)."""

    supported_faults: ClassVar[frozenset[str]] = frozenset(
        {"delay", "status", "hang", "reset", "malformed", "wrong_shape"}
    )
    auth_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *keys: SigningKey) -> None:
        super().__init__()
        self._keys_lock = threading.Lock()
        self._document: dict[str, Any] = {"keys": [key.jwk() for key in keys]}

    @property
    def url(self) -> str:
        return self.base_url + JWKS_PATH

    def publish(self, *keys: SigningKey) -> None:
        """Serve exactly these keys from now on (a key rotation)."""
        with self._keys_lock:
            self._document = {"keys": [key.jwk() for key in keys]}

    def fetches(self) -> int:
        return self.count(method="GET", path=JWKS_PATH)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(JWKS_PATH, self._jwks)]

    async def _jwks(self, request: web.Request) -> web.Response:
        with self._keys_lock:
            document = self._document
        return web.json_response(document)
