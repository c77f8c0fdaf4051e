"""The authenticator the settings ask for (`AUTH_*`), built by the composition root."""

from __future__ import annotations

import logging

from app.core.resilience import DEFAULT_OBSERVER, CircuitBreaker, ResilienceObserver
from app.core.resilience.stores import InMemoryBreakerStore
from app.core.security.api_keys import ApiKeyAuthenticator, ApiKeyStore
from app.core.security.jwks import JwksKeys
from app.core.security.jwt_auth import JwtAuthenticator, KeySource, SharedSecretKeys
from app.core.security.principal import AnonymousAuthenticator, Authenticator
from app.platform.config import AuthMode, Settings

logger = logging.getLogger(__name__)

#: The JWKS breaker: open after 3 failed fetches, 30 s doubling up to 5 min. The
#: fetches are already rate-limited (AUTH_JWKS_MIN_REFRESH_SECONDS): the breaker
#: lengthens the pause while the provider stays down and shows it in /health.
JWKS_BREAKER = "auth:jwks"
JWKS_BREAKER_FAILURES = 3
JWKS_BREAKER_RECOVERY_SECONDS = 30.0
JWKS_BREAKER_MAX_RECOVERY_SECONDS = 300.0


def build_authenticator(
    settings: Settings,
    *,
    observer: ResilienceObserver = DEFAULT_OBSERVER,
    api_keys: ApiKeyStore | None = None,
) -> Authenticator:
    """The configured authenticator; with `api_keys`, API keys are accepted first."""
    inner = _bearer_or_anonymous(settings, observer)
    if api_keys is None:
        return inner
    return ApiKeyAuthenticator(inner, api_keys)


def _bearer_or_anonymous(settings: Settings, observer: ResilienceObserver) -> Authenticator:
    auth = settings.auth
    if auth.mode is not AuthMode.JWT:
        logger.warning(
            "AUTH_MODE=none: no authentication; every caller is the one anonymous "
            "principal and shares its stories (development only)",
            extra={"principal": settings.anonymous_principal},
        )
        return AnonymousAuthenticator(settings.anonymous_principal)
    # Settings refuse AUTH_MODE=jwt without these.
    assert auth.issuer is not None
    assert auth.audience is not None
    keys: KeySource
    if auth.jwks_url is not None:
        breaker = CircuitBreaker(
            JWKS_BREAKER,
            InMemoryBreakerStore(),  # per process: each process fetches its own keys
            failure_threshold=JWKS_BREAKER_FAILURES,
            recovery_timeout=JWKS_BREAKER_RECOVERY_SECONDS,
            max_recovery_timeout=JWKS_BREAKER_MAX_RECOVERY_SECONDS,
            observer=observer,
        )
        keys = JwksKeys(
            str(auth.jwks_url),
            breaker=breaker,
            timeout_seconds=auth.jwks_timeout_seconds,
            cache_seconds=auth.jwks_cache_seconds,
            min_refresh_seconds=auth.jwks_min_refresh_seconds,
        )
    else:
        assert auth.jwt_secret is not None
        keys = SharedSecretKeys(auth.jwt_secret)
    logger.info(
        "bearer JWT authentication on",
        extra={"algorithms": list(keys.algorithms), "issuer": auth.issuer},
    )
    return JwtAuthenticator(
        keys,
        issuer=auth.issuer,
        audience=auth.audience,
        leeway_seconds=auth.leeway_seconds,
        reserved_subjects={settings.anonymous_principal},
    )
