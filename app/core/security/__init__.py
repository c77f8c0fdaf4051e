"""Identity: who is asking, as the `Principal` every story is owned by.

`AUTH_MODE=jwt`: `JwtAuthenticator` checks a bearer JWT (`bearer`, `jwt_auth`)
with an HS256 shared secret or the identity provider's JWKS (`jwks`: fetched,
cached, behind its own circuit breaker); `sub` is the principal. `AUTH_MODE=none`
(development): every caller is the one anonymous principal
(`AnonymousAuthenticator`), and the rate limiter keys it by address.
`build_authenticator` (`factory`) picks one from the settings.
"""

from app.core.security.bearer import REALM, InvalidTokenError, challenge
from app.core.security.factory import JWKS_BREAKER, build_authenticator
from app.core.security.jwks import JwksKeys, parse_jwks
from app.core.security.jwt_auth import (
    JwtAuthenticator,
    KeySource,
    KeysUnavailableError,
    SharedSecretKeys,
)
from app.core.security.principal import (
    AnonymousAuthenticator,
    Authenticator,
    Principal,
    remember_principal,
    remembered_principal,
)

__all__ = [
    "JWKS_BREAKER",
    "REALM",
    "AnonymousAuthenticator",
    "Authenticator",
    "InvalidTokenError",
    "JwksKeys",
    "JwtAuthenticator",
    "KeySource",
    "KeysUnavailableError",
    "Principal",
    "SharedSecretKeys",
    "build_authenticator",
    "challenge",
    "parse_jwks",
    "remember_principal",
    "remembered_principal",
]
