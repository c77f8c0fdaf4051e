"""API keys for server-to-server callers: `Authorization: Bearer sk_story_<id>_<secret>`.

A key is made of a public id (to find its record) and a 256-bit random secret.
Only the SHA-256 of the secret is stored: a key has the entropy of a random
256-bit number, so a slow password hash would add cost and no protection (no
dictionary to try against it), and the stored hash lets nobody who reads the
table call the API. The secret is compared in constant time.

Every request with a key reads its record, so a key revoked with
`python -m app.api_keys revoke <id>` is refused by every worker and replica
from the next request on (no cache to expire). The lookup goes through its own
small connection pool (`app.db.api_keys`), so a busy story path does not delay
authentication. An API key's principal is `key:<name>`, a namespace no identity
provider's `sub` can claim by accident.

`ApiKeyAuthenticator` wraps the configured authenticator (JWT, or anonymous in
development): a bearer token with the key prefix is checked here, anything else
is passed on unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from starlette.requests import Request

from app.core.resilience import CircuitBreaker
from app.core.security.bearer import InvalidTokenError, bearer_token, refused
from app.core.security.principal import Authenticator, Principal
from app.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

PREFIX = "sk_story_"
#: The principal of a key named `n` is `key:n`.
PRINCIPAL_PREFIX = "key:"
_KEY = re.compile(r"^sk_story_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ApiKeyStoreUnavailableError(Exception):
    """The key store did not answer: the key may be valid, so this is no 401."""


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    name: str
    secret_sha256: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def principal(self) -> str:
        return PRINCIPAL_PREFIX + self.name


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A key as created: `token` is shown once and never stored."""

    record: ApiKeyRecord
    token: str


class ApiKeyStore(Protocol):
    async def find(self, key_id: str) -> ApiKeyRecord | None:
        """The key's record (revoked or not); `ApiKeyStoreUnavailableError` when down."""

    async def add(self, record: ApiKeyRecord) -> None: ...

    async def revoke(self, key_id: str, at: datetime) -> bool:
        """True when the key was active and is now revoked."""

    async def list_keys(self) -> list[ApiKeyRecord]: ...

    async def close(self) -> None: ...


def valid_name(name: str) -> bool:
    """Key names: lower-case letters, digits, `.`, `_`, `-`; up to 63 characters."""
    return bool(_NAME.match(name))


def new_api_key(name: str, now: datetime) -> NewApiKey:
    if not valid_name(name):
        raise ValueError("a key name is 1-63 of a-z, 0-9, '.', '_', '-', starting alphanumeric")
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    secret = secrets.token_urlsafe(32)  # 43 characters
    record = ApiKeyRecord(key_id, name, _digest(secret), now)
    return NewApiKey(record, f"{PREFIX}{key_id}_{secret}")


def looks_like_api_key(token: str) -> bool:
    return token.startswith(PREFIX)


def parse_api_key(token: str) -> tuple[str, str]:
    """(id, secret) of a well-formed key; `InvalidTokenError` otherwise."""
    match = _KEY.match(token)
    if match is None:
        raise InvalidTokenError("malformed API key")
    return match.group(1), match.group(2)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def matches(record: ApiKeyRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_sha256, _digest(secret))


class ApiKeyAuthenticator:
    """API keys first (by their prefix), then `inner` for every other request."""

    def __init__(self, inner: Authenticator, store: ApiKeyStore, *, retry_after: float = 5.0):
        self.inner = inner
        self.store = store
        self.retry_after = retry_after

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        return self.inner.breakers

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            await self.store.close()

    async def authenticate(self, request: Request) -> Principal:
        try:
            token = bearer_token(request)
        except InvalidTokenError:
            token = None  # the inner authenticator refuses it with its own reason
        if token is None or not looks_like_api_key(token):
            return await self.inner.authenticate(request)
        try:
            key_id, secret = parse_api_key(token)
        except InvalidTokenError as error:
            raise refused(error.reason) from None
        try:
            record = await self.store.find(key_id)
        except ApiKeyStoreUnavailableError:
            logger.warning("API key store unavailable", extra={"key_id": key_id})
            raise ServiceUnavailableError(
                "API keys cannot be checked right now; retry shortly.",
                retry_after=self.retry_after,
            ) from None
        if record is None or not matches(record, secret):
            logger.info("API key refused: unknown key", extra={"key_id": key_id})
            raise refused("unknown API key")
        if record.revoked_at is not None:
            logger.info("API key refused: revoked", extra={"key_id": key_id})
            raise refused("API key revoked")
        return Principal(record.principal, authenticated=True)

    def authenticate_cached(self, request: Request) -> Principal | None:
        # An API key is only ever verified against the store (I/O): the rate
        # limiter keys such a request by its address.
        try:
            token = bearer_token(request)
        except InvalidTokenError:
            token = None
        if token is not None and looks_like_api_key(token):
            return None
        return self.inner.authenticate_cached(request)
