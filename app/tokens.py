"""`python -m app.tokens --sub alice [--ttl 3600]`: a development bearer token.

Mints an HS256 JWT with AUTH_JWT_SECRET, AUTH_ISSUER and AUTH_AUDIENCE (read
from the environment or `.env`, as the service reads them) for the README's curl
examples and local testing, and prints it. Refused with APP_ENV=production:
real tokens come from the identity provider.
"""

from __future__ import annotations

import argparse
import sys
import time

import jwt
from pydantic import ValidationError

from app.platform.config import AuthMode, Environment, Settings

MAX_TTL_SECONDS = 7 * 24 * 3600


def mint(
    secret: str, *, sub: str, issuer: str, audience: str, ttl: int, now: float | None = None
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"sub": sub, "iss": issuer, "aud": audience, "iat": issued, "nbf": issued}
    return jwt.encode({**claims, "exp": issued + ttl}, secret, algorithm="HS256")


def _ttl(text: str) -> int:
    seconds = int(text)
    if not 1 <= seconds <= MAX_TTL_SECONDS:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_TTL_SECONDS} seconds")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.tokens",
        description="Print an HS256 development token signed with AUTH_JWT_SECRET.",
    )
    parser.add_argument("--sub", required=True, help="the principal (owner of the stories)")
    parser.add_argument("--ttl", type=_ttl, default=3600, help="seconds until it expires")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"the settings are refused:\n{error}", file=sys.stderr)
        return 2
    if settings.app_env is Environment.PRODUCTION:
        print(
            "refused: APP_ENV=production takes tokens from the identity provider", file=sys.stderr
        )
        return 2
    auth = settings.auth
    if auth.jwt_secret is None or not auth.issuer or not auth.audience:
        print("set AUTH_JWT_SECRET, AUTH_ISSUER and AUTH_AUDIENCE", file=sys.stderr)
        return 2
    sub = args.sub.strip()
    if not sub or len(sub) > 255 or sub == settings.anonymous_principal:
        print(
            f"--sub must be 1-255 characters and not {settings.anonymous_principal!r}",
            file=sys.stderr,
        )
        return 2
    if auth.mode is not AuthMode.JWT:
        print("note: the service ignores tokens unless AUTH_MODE=jwt", file=sys.stderr)
    secret = auth.jwt_secret.get_secret_value()
    print(mint(secret, sub=sub, issuer=auth.issuer, audience=auth.audience, ttl=args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
