"""Bearer JWTs, checked with real signatures: what is accepted, what is refused and why.

The HS256 authenticator is built as the app builds it (`build_authenticator`);
each refusal is the `UnauthorizedError` the API renders as a 401 with an RFC 6750
challenge (the rendering itself is tested over HTTP in test_auth_api.py).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.requests import Request

from app.core.security import (
    AnonymousAuthenticator,
    Authenticator,
    JwtAuthenticator,
    Principal,
    SharedSecretKeys,
    build_authenticator,
    challenge,
    remember_principal,
    remembered_principal,
)
from app.errors import UnauthorizedError
from app.platform.config import AuthMode, AuthSettings, Settings
from tests.fakes.jwks import (
    AUDIENCE,
    HS256_SECRET,
    ISSUER,
    SigningKey,
    claims,
    hmac_token,
    hs256_token,
    unsigned_token,
)


def request_with(*authorization: str) -> Request:
    headers = [(b"authorization", value.encode()) for value in authorization]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def bearer(token: str) -> Request:
    return request_with(f"Bearer {token}")


def hs256_settings(**auth: Any) -> Settings:
    values: dict[str, Any] = {
        "mode": "jwt",
        "jwt_secret": HS256_SECRET,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        **auth,
    }
    return Settings(_env_file=None, app_env="test", auth=AuthSettings(_env_file=None, **values))


@pytest.fixture
def authenticator() -> Authenticator:
    return build_authenticator(hs256_settings())


async def refusal(authenticator: Authenticator, request: Request) -> str:
    """The WWW-Authenticate challenge of a refused request (it must be refused)."""
    with pytest.raises(UnauthorizedError) as caught:
        await authenticator.authenticate(request)
    assert caught.value.status_code == 401
    assert caught.value.slug == "unauthorized"
    assert authenticator.authenticate_cached(request) is None
    return caught.value.headers["WWW-Authenticate"]


def invalid_token(description: str) -> str:
    return f'Bearer realm="stories", error="invalid_token", error_description="{description}"'


async def test_a_good_token_is_its_subject(authenticator: Authenticator) -> None:
    request = bearer(hs256_token(claims("alice")))

    assert await authenticator.authenticate(request) == Principal("alice", authenticated=True)
    assert authenticator.authenticate_cached(request) == Principal("alice", authenticated=True)


async def test_the_app_builds_a_jwt_authenticator_in_jwt_mode_only() -> None:
    assert isinstance(build_authenticator(hs256_settings()), JwtAuthenticator)
    none = build_authenticator(Settings(_env_file=None, app_env="test"))
    assert isinstance(none, AnonymousAuthenticator)
    assert await none.authenticate(request_with()) == Principal("anonymous", authenticated=False)


def test_none_mode_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_authenticator(Settings(_env_file=None, app_env="development"))

    assert any("AUTH_MODE=none" in r.getMessage() for r in caplog.records)
    assert Settings(_env_file=None, app_env="development").auth.mode is AuthMode.NONE


async def test_no_token_gets_the_bare_challenge(authenticator: Authenticator) -> None:
    assert await refusal(authenticator, request_with()) == 'Bearer realm="stories"'


async def test_another_scheme_is_no_bearer_token(authenticator: Authenticator) -> None:
    challenge_ = await refusal(authenticator, request_with("Basic YWxpY2U6c2VjcmV0"))

    assert challenge_ == 'Bearer realm="stories"'


BAD_HEADERS = {
    "no token after Bearer": ["Bearer"],
    "two tokens": ["Bearer abc def"],
    "characters outside b64token": ["Bearer abc$def"],
    "two Authorization headers": ["Bearer a.b.c", "Bearer d.e.f"],
    "a huge token": ["Bearer " + "a" * 9000],
}


@pytest.mark.parametrize("headers", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
async def test_a_malformed_authorization_header_is_refused(
    authenticator: Authenticator, headers: list[str]
) -> None:
    challenge_ = await refusal(authenticator, request_with(*headers))

    assert challenge_ == invalid_token("malformed authorization header")


def _other_secret() -> str:
    return hs256_token(claims(), secret="another-secret-of-at-least-32-characters!")


BAD_TOKENS = {
    "not a JWT": (lambda: "not-a-jwt", "malformed token"),
    "garbage segments": (lambda: "abc.def.ghi", "malformed token"),
    "wrong signature": (_other_secret, "invalid signature"),
    "wrong issuer": (lambda: hs256_token(claims(iss="https://evil.example/")), "wrong issuer"),
    "wrong audience": (lambda: hs256_token(claims(aud="another-service")), "wrong audience"),
    "expired": (lambda: hs256_token(claims(ttl=-60)), "token expired"),
    "not yet valid": (
        lambda: hs256_token(claims(nbf=claims()["iat"] + 120)),
        "token not yet valid",
    ),
    "alg none": (lambda: unsigned_token(claims()), "algorithm not allowed"),
    "RS256 under a shared secret": (
        lambda: SigningKey("rsa-1").sign(claims()),
        "algorithm not allowed",
    ),
    "HS512": (
        lambda: hmac_token(claims(), HS256_SECRET.encode(), {"alg": "HS512"}),
        "algorithm not allowed",
    ),
    "no expiry": (lambda: hs256_token(claims(exp=None)), "missing required claim"),
    "no subject": (lambda: hs256_token(claims(sub=None)), "missing required claim"),
    "no issuer": (lambda: hs256_token(claims(iss=None)), "missing required claim"),
    "an empty subject": (lambda: hs256_token(claims(sub="  ")), "invalid subject"),
    "a subject that is not a string": (lambda: hs256_token(claims(sub=42)), "invalid subject"),
    "the anonymous principal": (lambda: hs256_token(claims("anonymous")), "invalid subject"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS.values()), ids=list(BAD_TOKENS))
async def test_a_bad_token_is_refused_with_its_reason(
    authenticator: Authenticator, case: tuple[Any, str]
) -> None:
    make, reason = case

    assert await refusal(authenticator, bearer(make())) == invalid_token(reason)


async def test_clock_skew_within_the_leeway_is_accepted(authenticator: Authenticator) -> None:
    now = claims()["iat"]
    late = hs256_token(claims(exp=now - 10))  # expired 10 s ago, leeway 30 s
    early = hs256_token(claims(nbf=now + 10, iat=now + 10))

    assert (await authenticator.authenticate(bearer(late))).id == "alice"
    assert (await authenticator.authenticate(bearer(early))).id == "alice"


async def test_a_zero_leeway_refuses_what_the_default_accepts() -> None:
    strict = build_authenticator(hs256_settings(leeway_seconds=0))
    token = hs256_token(claims(exp=claims()["iat"] - 10))

    assert await refusal(strict, bearer(token)) == invalid_token("token expired")


async def test_refusals_log_the_kid_and_reason_and_nothing_else_of_the_token(
    authenticator: Authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    token = hmac_token(claims("secret-child-name"), b"wrong-key", {"alg": "HS256", "kid": "key-7"})
    with caplog.at_level(logging.DEBUG):
        await refusal(authenticator, bearer(token))

    refused = [r for r in caplog.records if r.getMessage() == "bearer token refused"]
    assert len(refused) == 1
    assert (refused[0].__dict__["kid"], refused[0].__dict__["reason"]) == (
        "key-7",
        "invalid signature",
    )
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert token.split(".")[1] not in logged
    assert "secret-child-name" not in logged


def test_the_challenge_follows_rfc_6750() -> None:
    assert challenge() == 'Bearer realm="stories"'
    assert challenge("token expired") == invalid_token("token expired")


async def test_the_accepted_algorithm_comes_from_the_key_source_not_the_token() -> None:
    authenticator = JwtAuthenticator(
        SharedSecretKeys(SecretStr(HS256_SECRET)),
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    # Signed correctly with the secret, but naming an algorithm the source does not offer.
    token = hmac_token(claims(), HS256_SECRET.encode(), {"alg": "HS384", "typ": "JWT"})

    assert await refusal(authenticator, bearer(token)) == invalid_token("algorithm not allowed")


def test_a_verified_principal_is_remembered_for_its_request_and_credentials_only() -> None:
    alice = Principal("alice", authenticated=True)
    request = bearer("token-a")
    remember_principal(request, alice)

    assert remembered_principal(Request(request.scope)) == alice  # the same request
    # The same scope with other credentials (never trusted across a change of token).
    other = Request({**request.scope, "headers": [(b"authorization", b"Bearer token-b")]})
    assert remembered_principal(other) is None
    assert remembered_principal(bearer("token-a")) is None  # another request
