"""Service configuration, read from environment variables (and an optional `.env`).

Settings are grouped by the part of the system they configure; each group reads
its own prefix (`OPENAI_*`, `REPLICATE_*`, `DATABASE_*`, ...), so the variable
names an operator types are the ones the providers document. Nothing here
connects to anything: `create_app(settings)` decides what to open. The groups
live in the modules of this package, one per part of the system; `Settings`
holds them all and checks what only makes sense across groups.
Every variable is listed, with its default, in the README's configuration table.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.platform.config.auth import AuthMode, AuthSettings
from app.platform.config.base import Environment, settings_group
from app.platform.config.objects import IllustrationSettings, ObjectStoreSettings
from app.platform.config.operations import (
    HealthSettings,
    MaintenanceSettings,
    ProxySettings,
    RateLimitSettings,
    SentrySettings,
    ShutdownSettings,
)
from app.platform.config.resilience import BREAKER_NAMES, ResilienceSettings
from app.platform.config.storage import DatabaseSettings, RedisSettings
from app.platform.config.upstreams import ModerationSettings, OpenAISettings, ReplicateSettings

__all__ = [
    "BREAKER_NAMES",
    "AuthMode",
    "AuthSettings",
    "DatabaseSettings",
    "Environment",
    "HealthSettings",
    "IllustrationSettings",
    "MaintenanceSettings",
    "ModerationSettings",
    "ObjectStoreSettings",
    "OpenAISettings",
    "ProxySettings",
    "RateLimitSettings",
    "RedisSettings",
    "ReplicateSettings",
    "ResilienceSettings",
    "SentrySettings",
    "Settings",
    "ShutdownSettings",
    "settings_group",
]


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    app_env: Environment = Environment.DEVELOPMENT
    service_name: str = "story-service"
    log_level: str = "INFO"
    # Largest accepted request body; a story request is a few hundred bytes.
    max_body_bytes: int = Field(default=16 * 1024, ge=1024)
    # One deadline per request, propagated through every layer.
    request_deadline_seconds: float = Field(default=30.0, gt=0)
    # With AUTH_MODE=none, the one principal every caller is (and owner of its stories).
    anonymous_principal: str = "anonymous"
    # Idempotency-Key: how long keys are kept, how long a repeat waits for the first.
    idempotency_ttl_seconds: float = Field(default=24 * 3600.0, ge=24 * 3600.0)
    idempotency_wait_seconds: float = Field(default=10.0, ge=0)
    # A request holds its key on a lease this long, renewed every third of it while
    # it runs; a key whose holder died (lease not renewed) is free after this long.
    idempotency_lease_seconds: float = Field(default=5.0, gt=0)
    # New stories one authenticated principal may have per UTC day (0: no quota).
    story_daily_quota: int = Field(default=100, ge=0)
    # How long an upstream story is kept as a fallback for the same request.
    story_cache_ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    # CORS is off unless origins are listed (comma-separated).
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # /docs, /redoc and /openapi.json; unset: on, except with APP_ENV=production.
    docs_enabled: bool = True
    # Set: /metrics needs it as a bearer token; unset: keep /metrics to the scraper's network.
    metrics_token: SecretStr | None = None
    # A scrape is served from memory: breaker states are read from their (shared)
    # store in the background this often, and the rendered page is reused this long.
    metrics_breaker_refresh_seconds: float = Field(default=5.0, gt=0)
    metrics_cache_seconds: float = Field(default=1.0, ge=0)
    # More request headers than this, or more bytes of them (names and values), get 431.
    max_header_count: int = Field(default=100, ge=1)
    max_header_bytes: int = Field(default=8 * 1024, ge=1024)

    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    replicate: ReplicateSettings = Field(default_factory=ReplicateSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    rate_limit: RateLimitSettings = Field(default_factory=lambda: RateLimitSettings())
    proxies: ProxySettings = Field(default_factory=lambda: ProxySettings())
    health: HealthSettings = Field(default_factory=lambda: HealthSettings())
    sentry: SentrySettings = Field(default_factory=lambda: SentrySettings())
    maintenance: MaintenanceSettings = Field(default_factory=lambda: MaintenanceSettings())
    shutdown: ShutdownSettings = Field(default_factory=lambda: ShutdownSettings())
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    object_store: ObjectStoreSettings = Field(default_factory=lambda: ObjectStoreSettings())
    illustrations: IllustrationSettings = Field(default_factory=lambda: IllustrationSettings())

    @model_validator(mode="after")
    def _auth_fits_the_environment(self) -> Settings:
        prod = self.app_env is Environment.PRODUCTION
        mode = self.auth.mode or (AuthMode.JWT if prod else AuthMode.NONE)
        auth = self.auth = self.auth.model_copy(update={"mode": mode})
        if mode is AuthMode.NONE and prod:
            raise ValueError(
                "AUTH_MODE=none (every caller one anonymous principal) is refused with "
                "APP_ENV=production: set AUTH_MODE=jwt, AUTH_JWKS_URL (or AUTH_JWT_SECRET), "
                "AUTH_ISSUER and AUTH_AUDIENCE"
            )
        keys = ("AUTH_JWKS_URL or AUTH_JWT_SECRET", auth.jwks_url or auth.jwt_secret)
        needed = (keys, ("AUTH_ISSUER", auth.issuer), ("AUTH_AUDIENCE", auth.audience))
        if mode is AuthMode.JWT and (missing := [name for name, v in needed if not v]):
            raise ValueError(f"AUTH_MODE=jwt needs {', '.join(missing)}")
        if prod and auth.jwks_url is not None and auth.jwks_url.scheme != "https":
            raise ValueError("AUTH_JWKS_URL must be https in production")
        return self

    @model_validator(mode="after")
    def _pictures_checked_in_production(self) -> Settings:
        prod = self.app_env is Environment.PRODUCTION
        if prod and self.illustrations.moderation == "off":
            raise ValueError(
                "ILLUSTRATION_MODERATION=off (pictures shown to children unchecked) is "
                "refused with APP_ENV=production"
            )
        return self

    @model_validator(mode="after")
    def _ladder_fits_the_deadline(self) -> Settings:
        parts = [("RESILIENCE_LADDER_RESERVE_SECONDS", self.resilience.ladder_reserve_seconds)]
        if self.openai.configured:
            parts.append(("OPENAI_FLOOR_SECONDS", self.openai.floor_seconds))
        if self.replicate.configured:
            parts.append(("REPLICATE_FLOOR_SECONDS", self.replicate.floor_seconds))
        if self.openai.configured and self.moderation.mode == "openai":
            # The prompt's and each upstream story's (MODERATION_TIMEOUT_SECONDS each).
            checks = 1 + int(self.openai.configured) + int(self.replicate.configured)
            total = checks * self.moderation.check_seconds(self.request_deadline_seconds)
            parts.append((f"{checks} moderation checks (MODERATION_TIMEOUT_SECONDS)", total))
        needed = sum(seconds for _, seconds in parts)
        if needed > self.request_deadline_seconds:
            terms = " + ".join(f"{name} ({seconds:g} s)" for name, seconds in parts)
            raise ValueError(
                f"REQUEST_DEADLINE_SECONDS ({self.request_deadline_seconds:g} s) cannot fit "
                f"{terms} = {needed:g} s: raise the deadline or lower those"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _exposure_defaults(cls, data: Any) -> Any:
        """DOCS_ENABLED unset: off in production. METRICS_TOKEN empty (a blank Secret): unset."""
        if isinstance(data, dict):
            data = dict(data)
            if data.get("docs_enabled") in (None, ""):
                production = str(data.get("app_env", "")).lower() == Environment.PRODUCTION
                data["docs_enabled"] = not production
            if data.get("metrics_token") == "":
                data["metrics_token"] = None
        return data

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level
