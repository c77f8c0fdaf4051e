"""Keys from the identity provider's JWKS: fetched over real HTTP, cached, refreshed on an
unknown `kid` (rate-limited, one fetch at a time), kept while the provider is down, and
behind their own circuit breaker. Time is a `FakeClock`; the JWKS is a real server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.requests import Request

from app.core.resilience import BreakerState, CircuitBreaker
from app.core.resilience.stores import InMemoryBreakerStore
from app.core.resilience.testing import FakeClock
from app.core.security import (
    JWKS_BREAKER,
    JwksKeys,
    JwtAuthenticator,
    Principal,
    parse_jwks,
)
from app.core.security.jwks import JwksFetchError
from app.errors import ServiceUnavailableError, UnauthorizedError
from tests.fakes.jwks import AUDIENCE, ISSUER, JwksServer, SigningKey, claims, hmac_token
from tests.fakes.server import Fault

MIN_REFRESH = 5.0
RECOVERY = 30.0


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("ec-1", "ES256")


@pytest.fixture(scope="module")
def rotated_key() -> SigningKey:
    return SigningKey("rsa-2")


@pytest.fixture(scope="module")
def rogue_key() -> SigningKey:
    """A key the provider never published."""
    return SigningKey("rogue")


@pytest.fixture
def jwks(rsa_key: SigningKey, ec_key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(rsa_key, ec_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@asynccontextmanager
async def started(
    url: str, clock: FakeClock, **options: Any
) -> AsyncIterator[tuple[JwtAuthenticator, JwksKeys]]:
    breaker = CircuitBreaker(
        JWKS_BREAKER,
        InMemoryBreakerStore(clock=clock),
        failure_threshold=3,
        recovery_timeout=RECOVERY,
    )
    options.setdefault("timeout_seconds", 2.0)
    options.setdefault("min_refresh_seconds", MIN_REFRESH)
    keys = JwksKeys(url, breaker=breaker, clock=clock, **options)
    authenticator = JwtAuthenticator(keys, issuer=ISSUER, audience=AUDIENCE)
    await authenticator.start()
    try:
        yield authenticator, keys
    finally:
        await authenticator.aclose()


def bearer(token: str) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


async def refused_for(authenticator: JwtAuthenticator, token: str) -> str:
    with pytest.raises(UnauthorizedError) as caught:
        await authenticator.authenticate(bearer(token))
    challenge = caught.value.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="stories", error="invalid_token"')
    return challenge.split('error_description="')[1].rstrip('"')


async def test_keys_are_fetched_at_start_and_signed_tokens_are_their_subjects(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        alice = bearer(rsa_key.sign(claims("alice")))
        bob = bearer(ec_key.sign(claims("bob")))

        assert await authenticator.authenticate(alice) == Principal("alice", authenticated=True)
        assert await authenticator.authenticate(bob) == Principal("bob", authenticated=True)
        # Held keys verify without I/O (the rate limiter's synchronous path).
        assert authenticator.authenticate_cached(alice) == Principal("alice", authenticated=True)

    assert jwks.fetches() == 1


async def test_an_unknown_kid_refetches_and_a_rotated_in_key_verifies(
    jwks: JwksServer,
    clock: FakeClock,
    rsa_key: SigningKey,
    rotated_key: SigningKey,
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        token = rotated_key.sign(claims("carol"))
        # Not held yet: the synchronous path cannot tell, and says so.
        assert authenticator.authenticate_cached(bearer(token)) is None
        jwks.publish(rsa_key, rotated_key)
        clock.advance(MIN_REFRESH)

        assert (await authenticator.authenticate(bearer(token))).id == "carol"

    assert jwks.fetches() == 2


async def test_an_unknown_kid_is_refused_after_the_refetch_and_refetches_are_rate_limited(
    jwks: JwksServer, clock: FakeClock, rogue_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        clock.advance(MIN_REFRESH)
        assert await refused_for(authenticator, rogue_key.sign(claims())) == "unknown key id"
        assert jwks.fetches() == 2
        # Within AUTH_JWKS_MIN_REFRESH_SECONDS another unknown kid fetches nothing.
        clock.advance(MIN_REFRESH / 2)
        assert await refused_for(authenticator, rogue_key.sign(claims())) == "unknown key id"

    assert jwks.fetches() == 2


async def test_a_flood_of_bogus_kids_costs_one_fetch(
    jwks: JwksServer, clock: FakeClock, rogue_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        clock.advance(MIN_REFRESH)
        tokens = [rogue_key.sign(claims(), kid=uuid.uuid4().hex) for _ in range(50)]

        outcomes = await asyncio.gather(
            *(authenticator.authenticate(bearer(t)) for t in tokens), return_exceptions=True
        )

    assert all(isinstance(o, UnauthorizedError) for o in outcomes)
    assert jwks.fetches() == 2


async def test_a_caller_that_goes_away_does_not_cancel_the_fetch_others_wait_for(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey, rotated_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        jwks.publish(rsa_key, rotated_key)
        jwks.fail_next(Fault.delay(0.2))
        clock.advance(MIN_REFRESH)
        token = bearer(rotated_key.sign(claims("dana")))
        first = asyncio.create_task(authenticator.authenticate(token))
        second = asyncio.create_task(authenticator.authenticate(token))
        await jwks.wait_for_count(2, path="/.well-known/jwks.json")
        first.cancel()

        assert (await second).id == "dana"

    assert jwks.fetches() == 2


async def test_key_confusion_an_hs256_token_signed_with_the_public_key_is_refused(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        clock.advance(MIN_REFRESH)
        header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
        with_pem = hmac_token(claims(), rsa_key.public_pem(), header)
        with_jwk = hmac_token(claims(), json.dumps(rsa_key.jwk()).encode(), header)

        assert await refused_for(authenticator, with_pem) == "algorithm not allowed"
        assert await refused_for(authenticator, with_jwk) == "algorithm not allowed"

    assert jwks.fetches() == 1  # refused before any key is looked up


async def test_a_token_naming_another_algorithm_than_its_key_is_refused(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        # RS256, signed with the RSA key, but naming the EC key (ES256) as its kid.
        token = rsa_key.sign(claims(), kid=ec_key.kid)

        assert await refused_for(authenticator, token) == "algorithm not allowed"


async def test_a_token_without_a_kid_is_refused(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, _):
        token = rsa_key.sign(claims(), kid=None)

        assert await refused_for(authenticator, token) == "token has no key id"


async def test_a_provider_down_at_start_is_a_503_not_a_401(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey
) -> None:
    jwks.stop()
    async with started(jwks.url, clock) as (authenticator, keys):
        assert keys.snapshot()["kids"] == []
        with pytest.raises(ServiceUnavailableError) as caught:
            await authenticator.authenticate(bearer(rsa_key.sign(claims())))

    assert caught.value.status_code == 503
    assert int(caught.value.headers["Retry-After"]) >= MIN_REFRESH


async def test_failed_fetches_open_the_breaker_and_a_probe_closes_it(
    jwks: JwksServer, clock: FakeClock, rotated_key: SigningKey, rsa_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, keys):
        jwks.set_fault(Fault.status(500))
        token = bearer(rotated_key.sign(claims("erin")))
        for _ in range(3):
            clock.advance(MIN_REFRESH)
            with pytest.raises(ServiceUnavailableError):
                await authenticator.authenticate(token)
        assert (await keys.breaker.snapshot()).state is BreakerState.OPEN
        assert jwks.fetches() == 4  # the start, then three failures

        clock.advance(MIN_REFRESH)
        with pytest.raises(ServiceUnavailableError) as caught:
            await authenticator.authenticate(token)
        assert jwks.fetches() == 4  # the open breaker spared the provider
        assert int(caught.value.headers["Retry-After"]) == RECOVERY - MIN_REFRESH

        jwks.set_fault(None)
        jwks.publish(rsa_key, rotated_key)
        clock.advance(RECOVERY)
        assert (await authenticator.authenticate(token)).id == "erin"
        assert (await keys.breaker.snapshot()).state is BreakerState.CLOSED


async def test_held_keys_keep_verifying_while_the_provider_is_down(
    jwks: JwksServer, clock: FakeClock, rsa_key: SigningKey, rogue_key: SigningKey
) -> None:
    async with started(jwks.url, clock, cache_seconds=60) as (authenticator, _):
        token = bearer(rsa_key.sign(claims("frank")))
        jwks.stop()
        clock.advance(61)  # the set is stale: the next request tries to refetch

        assert authenticator.authenticate_cached(token) is None  # stale: no I/O-free answer
        assert (await authenticator.authenticate(token)).id == "frank"
        # A kid that is not held cannot be told apart from a rotation: 503.
        with pytest.raises(ServiceUnavailableError):
            await authenticator.authenticate(bearer(rogue_key.sign(claims())))


async def test_a_hanging_provider_is_cut_at_the_fetch_timeout(
    jwks: JwksServer, clock: FakeClock, rotated_key: SigningKey
) -> None:
    async with started(jwks.url, clock, timeout_seconds=0.2) as (authenticator, keys):
        jwks.set_fault(Fault.hang())
        clock.advance(MIN_REFRESH)
        began = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            await authenticator.authenticate(bearer(rotated_key.sign(claims())))

        assert time.monotonic() - began < 1.5
        assert (await keys.breaker.snapshot()).consecutive_failures == 1


async def test_a_malformed_key_set_counts_as_a_failure(
    jwks: JwksServer, clock: FakeClock, rotated_key: SigningKey
) -> None:
    async with started(jwks.url, clock) as (authenticator, keys):
        jwks.set_fault(Fault.malformed())
        clock.advance(MIN_REFRESH)
        with pytest.raises(ServiceUnavailableError):
            await authenticator.authenticate(bearer(rotated_key.sign(claims())))

        assert (await keys.breaker.snapshot()).consecutive_failures == 1


def test_only_signing_keys_for_rs256_and_es256_are_kept(
    rsa_key: SigningKey, ec_key: SigningKey
) -> None:
    document = {
        "keys": [
            rsa_key.jwk(),
            ec_key.jwk(),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},  # never a symmetric key
            {**rsa_key.jwk(), "kid": "for-encryption", "use": "enc"},
            {**rsa_key.jwk(), "kid": "rs384", "alg": "RS384"},
            {key: value for key, value in rsa_key.jwk().items() if key != "kid"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
        ]
    }

    keys = parse_jwks(json.dumps(document).encode())

    assert sorted(keys) == ["ec-1", "rsa-1"]
    assert keys["rsa-1"].algorithm_name == "RS256"
    assert keys["ec-1"].algorithm_name == "ES256"


@pytest.mark.parametrize(
    "body",
    [b"<html>", b"[]", b'{"keys": "none"}', b'{"keys": [{"kty": "oct", "kid": "x", "k": "YQ"}]}'],
)
def test_a_document_without_usable_keys_is_refused(body: bytes) -> None:
    with pytest.raises(JwksFetchError):
        parse_jwks(body)
