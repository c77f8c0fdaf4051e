"""The identity provider's public keys (JWKS), fetched over HTTP and cached.

`JwksKeys` fetches `AUTH_JWKS_URL` with its own `httpx.AsyncClient` (on the
event loop; PyJWKClient would block it with urllib), within its own timeout and
through its own circuit breaker, and keeps the RS256/ES256 keys by `kid`:

- a key is served from memory while the set is younger than `cache_seconds`;
- an unknown `kid`, or an older set, triggers a refetch, but at most one per
  `min_refresh_seconds` (however many bogus `kid`s arrive) and one at a time
  (concurrent requests wait for the same fetch, which a cancelled request does
  not cancel);
- a fetch that fails keeps the keys held (a known `kid` still verifies while the
  provider is down); a `kid` that is not held is then `KeysUnavailableError`
  (503), and after a successful fetch `InvalidTokenError("unknown key id")` (401).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx
import jwt

from app.core.resilience import CircuitBreaker, CircuitOpenError
from app.core.security.bearer import InvalidTokenError
from app.core.security.jwt_auth import Key, KeysUnavailableError
from app.platform.clock import SYSTEM_CLOCK, Clock

logger = logging.getLogger(__name__)

#: What a JWKS may hold that we accept: RSA keys for RS256, P-256 keys for ES256.
JWKS_ALGORITHMS = ("RS256", "ES256")
#: A key set is a few KiB; anything far larger is not one.
MAX_JWKS_BYTES = 256 * 1024


class JwksFetchError(Exception):
    """The JWKS endpoint answered, but not with a usable key set."""


def parse_jwks(body: bytes, algorithms: tuple[str, ...] = JWKS_ALGORITHMS) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by `kid`; others are skipped."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise JwksFetchError("JWKS is not JSON") from error
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksFetchError("JWKS has no keys list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("kty") not in {"RSA", "EC"} or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in algorithms:
            keys[entry["kid"]] = key
    if not keys:
        raise JwksFetchError("JWKS holds no usable RS256/ES256 signing key")
    return keys


class JwksKeys:
    """RS256/ES256 keys from a JWKS URL; see the module docstring."""

    algorithms: tuple[str, ...] = JWKS_ALGORITHMS

    def __init__(
        self,
        url: str,
        *,
        breaker: CircuitBreaker,
        timeout_seconds: float = 2.0,
        cache_seconds: float = 600.0,
        min_refresh_seconds: float = 30.0,
        client: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.url = url
        self.breaker = breaker
        self.breakers: Mapping[str, CircuitBreaker] = {breaker.name: breaker}
        self.timeout = timeout_seconds
        self.cache_seconds = cache_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=4),
            headers={"Accept": "application/json"},
        )
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch started
        self._last_failed = False
        self._retry_after = min_refresh_seconds
        self._inflight: asyncio.Task[None] | None = None

    # --- KeySource ---------------------------------------------------------------

    def cached(self, kid: str | None) -> Key | None:
        if kid is None or not self._fresh():
            return None
        return self._keys.get(kid)

    async def key_for(self, kid: str | None) -> Key:
        if kid is None:
            raise InvalidTokenError("token has no key id")
        key = self._keys.get(kid)
        if key is not None and self._fresh():
            return key
        await self.refresh()
        key = self._keys.get(kid)
        if key is not None:
            return key  # current, or held while the provider cannot be reached
        if self._last_failed or self._fetched_at is None:
            raise KeysUnavailableError(self._retry_after)
        raise InvalidTokenError("unknown key id", kid)

    async def start(self) -> None:
        """Fetches the keys before the first request; a provider that does not
        answer is not fatal (the first token fetches again)."""
        await self.refresh()
        if self._fetched_at is None:
            logger.warning("JWKS not fetched at start", extra={"url": self.url})

    async def aclose(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    # --- fetching ----------------------------------------------------------------

    def _fresh(self) -> bool:
        return (
            self._fetched_at is not None
            and self._clock.monotonic() - self._fetched_at < self.cache_seconds
        )

    def _may_fetch(self) -> bool:
        return (
            self._attempted_at is None
            or self._clock.monotonic() - self._attempted_at >= self.min_refresh_seconds
        )

    async def refresh(self) -> None:
        """One fetch, unless one ran less than `min_refresh_seconds` ago; concurrent
        callers share the fetch in flight. Never raises (the outcome is kept)."""
        if self._inflight is None:
            if not self._may_fetch():
                return
            self._attempted_at = self._clock.monotonic()
            self._inflight = asyncio.create_task(self._fetch_and_keep(), name="jwks-fetch")
        # Shielded: a caller that goes away does not cancel the fetch others wait for.
        await asyncio.shield(self._inflight)

    async def _fetch_and_keep(self) -> None:
        try:
            keys = await self.breaker.call(self._fetch)
        except CircuitOpenError as error:
            self._last_failed = True
            self._retry_after = max(error.retry_after, self.min_refresh_seconds)
        except Exception as error:
            self._last_failed = True
            self._retry_after = self.min_refresh_seconds
            logger.warning("JWKS fetch failed", extra={"url": self.url, "error": repr(error)})
        else:
            added = sorted(set(keys) - set(self._keys))
            self._keys = keys
            self._fetched_at = self._clock.monotonic()
            self._last_failed = False
            if added:
                logger.info("JWKS keys loaded", extra={"kids": [k[:64] for k in added]})
        finally:
            self._inflight = None

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        async with (
            asyncio.timeout(self.timeout),
            self._client.stream("GET", self.url) as response,
        ):
            if response.status_code != 200:
                raise JwksFetchError(f"JWKS endpoint answered HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksFetchError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
        return parse_jwks(bytes(body), self.algorithms)

    def snapshot(self) -> dict[str, Any]:
        """What is held, for tests and debugging (never key material)."""
        return {"kids": sorted(self._keys), "fresh": self._fresh(), "failed": self._last_failed}
