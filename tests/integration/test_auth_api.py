"""Identity and ownership over HTTP: real signed tokens, two principals, both databases.

Another owner's story is a 404 (never a 403: its existence is not disclosed); lists
and recommendations hold the caller's stories only; an Idempotency-Key never replays
across principals. Every refused token is a 401 problem with an RFC 6750 challenge;
keys that cannot be fetched are a 503; rate limits are per principal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.platform.config import AuthSettings, RateLimitSettings, Settings
from tests.fakes.jwks import (
    AUDIENCE,
    HS256_SECRET,
    ISSUER,
    JwksServer,
    SigningKey,
    claims,
    hmac_token,
    hs256_token,
    unsigned_token,
)
from tests.support import STORY_BODY, make_settings, serve

SettingsFactory = Callable[..., Settings]
PROBLEM_JSON = "application/problem+json"


def hs256_auth(**changes: Any) -> AuthSettings:
    values = {"mode": "jwt", "jwt_secret": HS256_SECRET, "issuer": ISSUER, "audience": AUDIENCE}
    return AuthSettings(_env_file=None, **{**values, **changes})


def as_(sub: str) -> dict[str, str]:
    # An hour: ALICE and BOB below are minted at collection, and the whole suite
    # runs before some of their tests do.
    return {"Authorization": f"Bearer {hs256_token(claims(sub, ttl=3600))}"}


ALICE, BOB = as_("alice"), as_("bob")


def assert_unauthorized(response: httpx.Response, description: str | None) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    expected = 'Bearer realm="stories"'
    if description is not None:
        expected += f', error="invalid_token", error_description="{description}"'
    assert response.headers["www-authenticate"] == expected
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/unauthorized")
    assert (body["status"], body["title"]) == (401, "Unauthorized")
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# --- ownership ------------------------------------------------------------------


async def test_another_owners_story_is_a_404_never_a_403(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        created = await client.post("/v1/stories", json=STORY_BODY, headers=ALICE)
        location = created.headers["location"]
        by_bob = await client.get(location, headers=BOB)
        by_alice = await client.get(location, headers=ALICE)
        unknown = await client.get("/v1/stories/6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e7f", headers=BOB)

    assert created.status_code == 201
    assert by_alice.status_code == 200
    assert by_alice.json() == created.json()
    assert by_bob.status_code == 404
    assert by_bob.headers["content-type"] == PROBLEM_JSON
    # Indistinguishable from a story that does not exist, but for the id.
    assert by_bob.json()["title"] == unknown.json()["title"]
    assert set(by_bob.json()) == set(unknown.json())


async def test_lists_hold_the_callers_stories_only(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        alices = [
            (await client.post("/v1/stories", json=STORY_BODY, headers=ALICE)).json()["id"]
            for _ in range(3)
        ]
        bobs = [(await client.post("/v1/stories", json=STORY_BODY, headers=BOB)).json()["id"]]
        first = (await client.get("/v1/stories", params={"limit": 2}, headers=ALICE)).json()
        rest = (
            await client.get(
                "/v1/stories", params={"limit": 2, "cursor": first["next_cursor"]}, headers=ALICE
            )
        ).json()
        # Alice's cursor in Bob's hands pages through Bob's stories, not hers.
        bob_with_her_cursor = (
            await client.get(
                "/v1/stories", params={"limit": 2, "cursor": first["next_cursor"]}, headers=BOB
            )
        ).json()
        for_bob = (await client.get("/v1/stories", headers=BOB)).json()

    alice_pages = [item["id"] for item in first["items"] + rest["items"]]
    assert sorted(alice_pages) == sorted(alices)
    assert rest["next_cursor"] is None
    assert [item["id"] for item in for_bob["items"]] == bobs
    assert not {item["id"] for item in bob_with_her_cursor["items"]} & set(alices)


async def test_recommendations_hold_the_callers_stories_only(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for()) as client:
        mine = (await client.post("/v1/stories", json=STORY_BODY, headers=ALICE)).json()
        theirs = await client.post("/v1/stories", json={**STORY_BODY, "age": 7}, headers=BOB)
        for_alice = await client.get("/v1/recommendations", params={"age": 6}, headers=ALICE)
        for_bob = await client.get("/v1/recommendations", params={"age": 6}, headers=BOB)

    assert [item["id"] for item in for_alice.json()["items"]] == [mine["id"]]
    assert [item["id"] for item in for_bob.json()["items"]] == [theirs.json()["id"]]


async def test_the_same_idempotency_key_from_two_principals_makes_two_stories(
    settings_for: SettingsFactory,
) -> None:
    key = {"Idempotency-Key": "same-key-on-two-phones"}
    async with serve(settings_for()) as client:
        alices = await client.post("/v1/stories", json=STORY_BODY, headers={**ALICE, **key})
        bobs = await client.post("/v1/stories", json=STORY_BODY, headers={**BOB, **key})
        again = await client.post("/v1/stories", json=STORY_BODY, headers={**ALICE, **key})
        bob_reads_alices = await client.get(alices.headers["location"], headers=BOB)

    assert (alices.status_code, bobs.status_code) == (201, 201)
    assert alices.json()["id"] != bobs.json()["id"]
    assert "idempotent-replayed" not in bobs.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == alices.json()["id"]
    assert bob_reads_alices.status_code == 404


# --- refused tokens (HS256) -----------------------------------------------------

BAD_HS256 = {
    "wrong signature": (
        lambda: hs256_token(claims(), secret="x" * 40),
        "invalid signature",
    ),
    "wrong issuer": (lambda: hs256_token(claims(iss="https://evil.example/")), "wrong issuer"),
    "wrong audience": (lambda: hs256_token(claims(aud="someone-else")), "wrong audience"),
    "expired": (lambda: hs256_token(claims(ttl=-120)), "token expired"),
    "not yet valid": (
        lambda: hs256_token(claims(nbf=claims()["iat"] + 300)),
        "token not yet valid",
    ),
    "alg none": (lambda: unsigned_token(claims()), "algorithm not allowed"),
    "malformed token": (lambda: "a.b.c", "malformed token"),
}


@pytest.mark.parametrize("case", list(BAD_HS256.values()), ids=list(BAD_HS256))
async def test_a_bad_token_is_a_401_problem_with_a_challenge(
    tmp_path: Path, case: tuple[Callable[[], str], str]
) -> None:
    make, description = case
    settings = make_settings(sqlite_path=tmp_path / "s.sqlite3", auth=hs256_auth())
    async with serve(settings) as client:
        headers = {"Authorization": f"Bearer {make()}"}
        created = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        listed = await client.get("/v1/stories", headers=headers)
        stored = (await client.get("/v1/stories", headers=ALICE)).json()

    body = assert_unauthorized(created, description)
    assert description in body["detail"]
    assert_unauthorized(listed, description)
    assert stored["items"] == []


@pytest.mark.parametrize(
    ("authorization", "description"),
    [
        (None, None),
        ("Basic YWxpY2U6c2VjcmV0", None),
        ("Bearer", "malformed authorization header"),
        ("Bearer two tokens", "malformed authorization header"),
    ],
)
async def test_a_missing_or_malformed_header_is_a_401(
    tmp_path: Path, authorization: str | None, description: str | None
) -> None:
    settings = make_settings(sqlite_path=tmp_path / "s.sqlite3", auth=hs256_auth())
    headers = {"Authorization": authorization} if authorization else {}
    async with serve(settings) as client:
        response = await client.get("/v1/stories", headers=headers)
        live = await client.get("/health/live")

    assert_unauthorized(response, description)
    assert live.status_code == 200  # health and metrics need no token


async def test_rate_limits_are_per_principal_once_authenticated_per_address_before(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        sqlite_path=tmp_path / "s.sqlite3",
        auth=hs256_auth(),
        rate_limit=RateLimitSettings(_env_file=None, default="2/minute"),
    )
    bad = {"Authorization": f"Bearer {hs256_token(claims(), secret='y' * 40)}"}
    async with serve(settings) as client:
        alice = [(await client.get("/v1/stories", headers=ALICE)).status_code for _ in range(3)]
        bob = (await client.get("/v1/stories", headers=BOB)).status_code
        refused = [(await client.get("/v1/stories", headers=bad)).status_code for _ in range(3)]
        anonymous = (await client.get("/v1/stories")).status_code

    assert alice == [200, 200, 429]
    assert bob == 200  # same address, another principal: its own quota
    assert refused == [401, 401, 429]  # keyed by address, checked before the token
    assert anonymous == 429  # the same address


# --- JWKS (RS256/ES256) ---------------------------------------------------------


@pytest.fixture(scope="module")
def idp_key() -> SigningKey:
    return SigningKey("idp-1")


@pytest.fixture(scope="module")
def rogue_key() -> SigningKey:
    return SigningKey("rogue")


@pytest.fixture
def jwks(idp_key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(idp_key, SigningKey("idp-ec", "ES256"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def jwks_settings(tmp_path: Path, url: str) -> Settings:
    auth = AuthSettings(
        _env_file=None,
        mode="jwt",
        jwks_url=url,
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_min_refresh_seconds=0.05,
        jwks_timeout_seconds=1.0,
    )
    return make_settings(sqlite_path=tmp_path / "s.sqlite3", auth=auth)


async def test_an_identity_provider_token_is_its_subject(
    tmp_path: Path, jwks: JwksServer, idp_key: SigningKey
) -> None:
    headers = {"Authorization": f"Bearer {idp_key.sign(claims('grace'))}"}
    async with serve(jwks_settings(tmp_path, jwks.url)) as client:
        created = await client.post("/v1/stories", json=STORY_BODY, headers=headers)
        fetched = await client.get(created.headers["location"], headers=headers)

    assert (created.status_code, fetched.status_code) == (201, 200)
    assert jwks.fetches() == 1  # at start; every token after verified from the cache


def _key_confusion(key: SigningKey) -> str:
    """HS256 over the provider's public key, as if it were a shared secret."""
    return hmac_token(claims(), key.public_pem(), {"alg": "HS256", "typ": "JWT", "kid": key.kid})


BAD_RS256: dict[str, tuple[Callable[[SigningKey, SigningKey], str], str]] = {
    "signed by another key under a published kid": (
        lambda idp, rogue: rogue.sign(claims(), kid=idp.kid),
        "invalid signature",
    ),
    "HS256 signed with the RSA public key": (
        lambda idp, _: _key_confusion(idp),
        "algorithm not allowed",
    ),
    "unknown kid after a refresh": (lambda _, rogue: rogue.sign(claims()), "unknown key id"),
    "alg none with a published kid": (
        lambda idp, _: unsigned_token(claims(), kid=idp.kid),
        "algorithm not allowed",
    ),
    "expired": (lambda idp, _: idp.sign(claims(ttl=-120)), "token expired"),
    "wrong audience": (lambda idp, _: idp.sign(claims(aud="other")), "wrong audience"),
}


@pytest.mark.parametrize("case", list(BAD_RS256.values()), ids=list(BAD_RS256))
async def test_a_bad_identity_provider_token_is_a_401(
    tmp_path: Path,
    jwks: JwksServer,
    idp_key: SigningKey,
    rogue_key: SigningKey,
    case: tuple[Callable[[SigningKey, SigningKey], str], str],
) -> None:
    make, description = case
    async with serve(jwks_settings(tmp_path, jwks.url)) as client:
        await asyncio.sleep(0.06)  # past AUTH_JWKS_MIN_REFRESH_SECONDS: a refetch is allowed
        response = await client.get(
            "/v1/stories", headers={"Authorization": f"Bearer {make(idp_key, rogue_key)}"}
        )

    assert_unauthorized(response, description)


async def test_jwks_down_is_a_503_and_opens_the_breaker(
    tmp_path: Path, jwks: JwksServer, idp_key: SigningKey
) -> None:
    jwks.stop()
    headers = {"Authorization": f"Bearer {idp_key.sign(claims())}"}
    async with serve(jwks_settings(tmp_path, jwks.url)) as client:
        responses = []
        for _ in range(4):
            await asyncio.sleep(0.06)
            responses.append(await client.get("/v1/stories", headers=headers))
        health = (await client.get("/health")).json()

    for response in responses:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == PROBLEM_JSON
        assert int(response.headers["retry-after"]) >= 1
        assert "www-authenticate" not in response.headers
    # The start and two requests failed: open; the last request never reached the provider.
    assert int(responses[-1].headers["retry-after"]) > 1
    breaker = next(
        c for c in health["checks"]["circuitBreaker:state"] if c["componentId"] == "auth:jwks"
    )
    assert breaker["observedValue"] == "open"
