"""Bearer JWTs from the app's identity provider, checked with PyJWT.

`JwtAuthenticator` reads the bearer token, refuses an algorithm its key source
does not accept (from the key source, never from the token: `alg: none` and
HS/RS key confusion are refused before any key is looked up), finds the key by
`kid`, and checks signature, issuer, audience, expiry and not-before (with a
small leeway). `sub` is the principal. A refusal is a 401 with an RFC 6750
challenge; keys that cannot be fetched are a 503 (the token may well be valid:
a 401 would send every user back to the login screen, and to the identity
provider that is already failing).

Two key sources: `SharedSecretKeys` (HS256, `AUTH_JWT_SECRET`) and
`app.core.security.jwks.JwksKeys` (RS256/ES256 from `AUTH_JWKS_URL`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import jwt
from pydantic import SecretStr
from starlette.requests import Request

from app.core.resilience import CircuitBreaker
from app.core.security.bearer import InvalidTokenError, bearer_token, missing_token, refused
from app.core.security.principal import Principal
from app.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

#: A verification key: an HMAC secret, or a public key bound to its algorithm.
Key = bytes | jwt.PyJWK

#: Claims every token must carry (each is then checked).
REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]
MAX_SUBJECT_CHARS = 255
_KID_LOG_CHARS = 64

# PyJWT's errors, most specific first, as the fixed reasons clients and logs see.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.MissingRequiredClaimError, "missing required claim"),
    (jwt.InvalidSignatureError, "invalid signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.exceptions.InvalidSubjectError, "invalid subject"),
    (jwt.DecodeError, "malformed token"),
)


class KeysUnavailableError(Exception):
    """The signing keys cannot be fetched now (and the token's `kid` is not held)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("signing keys unavailable")
        self.retry_after = retry_after


class KeySource(Protocol):
    """Where verification keys come from, and so which algorithms are accepted."""

    @property
    def algorithms(self) -> tuple[str, ...]: ...

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]: ...

    def cached(self, kid: str | None) -> Key | None:
        """The key, if held and current, without I/O."""
        ...

    async def key_for(self, kid: str | None) -> Key:
        """The key; `InvalidTokenError` when there is none, `KeysUnavailableError`
        when it cannot be known now."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class SharedSecretKeys:
    """HS256 with one shared secret (`AUTH_JWT_SECRET`); `kid` is ignored."""

    algorithms: tuple[str, ...] = ("HS256",)

    def __init__(self, secret: SecretStr) -> None:
        self._secret = secret.get_secret_value().encode()
        self.breakers: Mapping[str, CircuitBreaker] = {}

    def cached(self, kid: str | None) -> Key | None:
        return self._secret

    async def key_for(self, kid: str | None) -> Key:
        return self._secret

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Header:
    alg: str
    kid: str | None


def _loggable(kid: object) -> str | None:
    return kid[:_KID_LOG_CHARS] if isinstance(kid, str) else None


class JwtAuthenticator:
    """Bearer JWT -> `Principal(sub, authenticated=True)`; see the module docstring."""

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 30.0,
        reserved_subjects: Collection[str] = (),
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        # The anonymous principal of AUTH_MODE=none: no token may claim its stories.
        self.reserved = frozenset(reserved_subjects)

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        return self.keys.breakers

    async def start(self) -> None:
        await self.keys.start()

    async def aclose(self) -> None:
        await self.keys.aclose()

    async def authenticate(self, request: Request) -> Principal:
        kid: str | None = None
        try:
            token = bearer_token(request)
            if token is None:
                raise missing_token()
            header = self._header(token)
            kid = header.kid
            key = await self.keys.key_for(header.kid)
            return self._verify(token, key, header)
        except InvalidTokenError as error:
            logger.info(
                "bearer token refused",
                extra={"kid": _loggable(error.kid or kid), "reason": error.reason},
            )
            raise refused(error.reason) from None
        except KeysUnavailableError as error:
            logger.warning(
                "bearer token not checked: signing keys unavailable",
                extra={"kid": _loggable(kid), "reason": "signing keys unavailable"},
            )
            raise ServiceUnavailableError(
                "The identity provider's signing keys cannot be fetched right now; "
                "nothing was changed. Try again shortly.",
                retry_after=error.retry_after,
            ) from None

    def authenticate_cached(self, request: Request) -> Principal | None:
        try:
            token = bearer_token(request)
            if token is None:
                return None
            header = self._header(token)
            key = self.keys.cached(header.kid)
            return None if key is None else self._verify(token, key, header)
        except InvalidTokenError:
            return None

    def _header(self, token: str) -> _Header:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidTokenError("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidTokenError("malformed token")
        # The accepted algorithms come from the key source, never from the token.
        if not isinstance(alg, str) or alg not in self.keys.algorithms:
            raise InvalidTokenError("algorithm not allowed", kid)
        return _Header(alg, kid)

    def _verify(self, token: str, key: Key, header: _Header) -> Principal:
        # A JWK is bound to one algorithm; a token naming another is refused.
        algorithms = [key.algorithm_name] if isinstance(key, jwt.PyJWK) else [header.alg]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as error:
            reason = next((r for kind, r in _REASONS if isinstance(error, kind)), "invalid token")
            raise InvalidTokenError(reason, header.kid) from None
        subject = claims.get("sub")
        if (
            not isinstance(subject, str)
            or not subject.strip()
            or len(subject) > MAX_SUBJECT_CHARS
            or subject in self.reserved
        ):
            raise InvalidTokenError("invalid subject", header.kid)
        return Principal(subject, authenticated=True)
