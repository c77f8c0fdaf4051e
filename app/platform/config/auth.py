"""Identity: bearer JWTs from the app's identity provider (`AUTH_*`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from app.platform.config.base import settings_group


class AuthMode(StrEnum):
    JWT = "jwt"
    NONE = "none"


class AuthSettings(BaseSettings):
    """Bearer JWTs from the app's identity provider (`AUTH_*`). One key source, which
    decides the accepted algorithms; `Settings` resolves an unset mode and checks it."""

    model_config = settings_group("AUTH_")

    # Unset: `none` in development and test, `jwt` in production.
    mode: AuthMode | None = None
    # HS256 shared secret (32+ characters), or the provider's RS256/ES256 keys (JWKS).
    jwt_secret: SecretStr | None = None
    jwks_url: AnyHttpUrl | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: float = Field(default=30.0, ge=0, le=300)  # clock skew: exp, nbf, iat
    jwks_timeout_seconds: float = Field(default=2.0, gt=0, le=30)  # one fetch, end to end
    # Keys are refetched this old, or on an unknown kid (at most once per min_refresh).
    jwks_cache_seconds: float = Field(default=600.0, gt=0)
    jwks_min_refresh_seconds: float = Field(default=30.0, gt=0)
    # API keys for server-to-server callers (`python -m app.api_keys`), in every mode.
    api_keys: bool = True

    @field_validator("jwt_secret", "jwks_url", "issuer", "audience", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _one_key_source(self) -> AuthSettings:
        if self.jwt_secret is not None and self.jwks_url is not None:
            raise ValueError("set AUTH_JWKS_URL or AUTH_JWT_SECRET, not both")
        if self.jwt_secret is not None and len(self.jwt_secret.get_secret_value()) < 32:
            raise ValueError("AUTH_JWT_SECRET must be at least 32 characters (HS256)")
        return self
