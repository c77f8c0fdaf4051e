"""Service configuration, read from environment variables (and an optional `.env`).

Settings are grouped by the part of the system they configure; each group reads
its own prefix (`OPENAI_*`, `REPLICATE_*`, `DATABASE_*`, ...), so the variable
names an operator types are the ones the providers document. Nothing here
connects to anything: `create_app(settings)` decides what to open.
Every variable is listed, with its default, in the README's configuration table.
"""

from __future__ import annotations

from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


def _group(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix, env_file=".env", extra="ignore", populate_by_name=True
    )


class OpenAISettings(BaseSettings):
    model_config = _group("OPENAI_")

    api_key: SecretStr | None = None
    base_url: AnyHttpUrl = AnyHttpUrl("https://api.openai.com/v1")
    model: str = "gpt-4o-mini"
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    read_timeout_seconds: float = Field(default=20.0, gt=0)
    max_connections: int = Field(default=100, ge=1)

    @property
    def configured(self) -> bool:
        return self.api_key is not None and bool(self.api_key.get_secret_value())


class ReplicateSettings(BaseSettings):
    model_config = _group("REPLICATE_")

    api_token: SecretStr | None = None
    base_url: AnyHttpUrl = AnyHttpUrl("https://api.replicate.com")
    text_model: str = "meta/meta-llama-3-8b-instruct"
    image_model: str = "black-forest-labs/flux-schnell"
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    # A prediction not finished by then is cancelled and counts as a failure.
    prediction_timeout_seconds: float = Field(default=25.0, gt=0)
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    read_timeout_seconds: float = Field(default=20.0, gt=0)
    max_connections: int = Field(default=50, ge=1)

    @property
    def configured(self) -> bool:
        return self.api_token is not None and bool(self.api_token.get_secret_value())


class DatabaseSettings(BaseSettings):
    model_config = _group("DATABASE_")

    # Unset: stories go to an embedded SQLite file at DATABASE_SQLITE_PATH.
    url: SecretStr | None = None
    sqlite_path: Path = Path("data/stories.sqlite3")
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    command_timeout_seconds: float = Field(default=5.0, gt=0)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _pool_bounds(self) -> DatabaseSettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("DATABASE_POOL_MIN_SIZE must not exceed DATABASE_POOL_MAX_SIZE")
        return self


class RedisSettings(BaseSettings):
    model_config = _group("REDIS_")

    # Unset: breaker, limiter and cache state live in this process only.
    url: SecretStr | None = None
    # redis-py's defaults (seconds, with retries) would turn a silent Redis into
    # a long wait per request; these are the budget for one round trip.
    socket_timeout_ms: int = Field(default=50, ge=1)
    connect_timeout_ms: int = Field(default=100, ge=1)
    max_connections: int = Field(default=50, ge=1)


#: One breaker per upstream operation; the names `RESILIENCE_BREAKER_OVERRIDES` may use.
BREAKER_NAMES = ("openai:chat", "replicate:text", "replicate:image")


class ResilienceSettings(BaseSettings):
    """Circuit breakers, retries and bulkheads around every upstream call."""

    model_config = _group("RESILIENCE_")

    # Seed defaults for external services: open after 3 failures, stay open 120 s.
    breaker_failure_threshold: int = Field(default=3, ge=1)
    breaker_recovery_seconds: float = Field(default=120.0, gt=0)
    breaker_half_open_max_calls: int = Field(default=1, ge=1)
    # Repeated openings lengthen the open time (x2, jittered) up to this cap.
    breaker_max_recovery_seconds: float = Field(default=600.0, gt=0)
    # Per-breaker changes, JSON: {"openai:chat": {"failure_threshold": 5}}.
    breaker_overrides: dict[str, dict[str, float]] = Field(default_factory=dict)
    retry_max_retries: int = Field(default=3, ge=0)
    retry_base_delay_seconds: float = Field(default=1.0, ge=0)
    retry_max_delay_seconds: float = Field(default=8.0, ge=0)
    # An upstream asking us to wait longer than this gets no retry: we fall back.
    retry_after_ceiling_seconds: float = Field(default=10.0, ge=0)
    # Retries may be at most this share of recent first attempts, per upstream.
    retry_budget_ratio: float = Field(default=0.2, ge=0)
    bulkhead_max_concurrent: int = Field(default=64, ge=1)
    bulkhead_max_wait_seconds: float = Field(default=0.5, ge=0)
    # The last rung of the ladder; off, a request nothing can serve gets 503.
    offline_fallback: bool = True

    @field_validator("breaker_overrides")
    @classmethod
    def _known_breakers_and_fields(
        cls, value: dict[str, dict[str, float]]
    ) -> dict[str, dict[str, float]]:
        names = set(BREAKER_NAMES)
        fields = {"failure_threshold", "recovery_timeout", "half_open_max_calls"}
        fields |= {"max_recovery_timeout"}
        for name, changes in value.items():
            if name not in names:
                raise ValueError(f"unknown breaker {name!r}; known: {', '.join(sorted(names))}")
            unknown = set(changes) - fields
            if unknown:
                raise ValueError(
                    f"unknown setting(s) {', '.join(sorted(unknown))} for breaker {name!r}; "
                    f"known: {', '.join(sorted(fields))}"
                )
            if any(v <= 0 for v in changes.values()):
                raise ValueError(f"breaker {name!r}: every value must be positive")
        return value

    @model_validator(mode="after")
    def _recovery_within_cap(self) -> ResilienceSettings:
        for name in BREAKER_NAMES:
            cfg = self.breaker(name)
            if cfg["recovery_timeout"] > cfg["max_recovery_timeout"]:
                raise ValueError(
                    f"breaker {name!r}: recovery time {cfg['recovery_timeout']:g} s exceeds "
                    f"RESILIENCE_BREAKER_MAX_RECOVERY_SECONDS ({cfg['max_recovery_timeout']:g} s)"
                )
        return self

    def breaker(self, name: str) -> dict[str, float]:
        values: dict[str, float] = {
            "failure_threshold": self.breaker_failure_threshold,
            "recovery_timeout": self.breaker_recovery_seconds,
            "half_open_max_calls": self.breaker_half_open_max_calls,
            "max_recovery_timeout": self.breaker_max_recovery_seconds,
        }
        values.update(self.breaker_overrides.get(name, {}))
        return values


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
    # Owner recorded on stories until authentication lands.
    anonymous_principal: str = "anonymous"
    # Idempotency-Key: how long keys are kept, how long a repeat waits for the first.
    idempotency_ttl_seconds: float = Field(default=24 * 3600.0, ge=24 * 3600.0)
    idempotency_wait_seconds: float = Field(default=10.0, ge=0)
    # How long an upstream story is kept as a fallback for the same request.
    story_cache_ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    # CORS is off unless origins are listed (comma-separated).
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    replicate: ReplicateSettings = Field(default_factory=ReplicateSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    # Operations (defined at the end of this module, hence the lambdas).
    rate_limit: RateLimitSettings = Field(default_factory=lambda: RateLimitSettings())
    proxies: ProxySettings = Field(default_factory=lambda: ProxySettings())
    health: HealthSettings = Field(default_factory=lambda: HealthSettings())
    sentry: SentrySettings = Field(default_factory=lambda: SentrySettings())
    maintenance: MaintenanceSettings = Field(default_factory=lambda: MaintenanceSettings())
    shutdown: ShutdownSettings = Field(default_factory=lambda: ShutdownSettings())

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


# --- operations: rate limits, client addresses, health, Sentry, maintenance, shutdown ---


def _limit_string(value: str) -> str:
    """A `limits` rate string ("100/minute", "20/minute;200/hour"); refused at start if bad."""
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError as error:
        raise ValueError(f"not a rate limit ({error}); write e.g. 100/minute") from error
    return value


class RateLimitSettings(BaseSettings):
    """Per-client request limits, counted per route (`RATE_LIMIT_*`)."""

    model_config = _group("RATE_LIMIT_")

    enabled: bool = True
    # Applies to every API route without a limit of its own.
    default: str = "100/minute"
    # POST /v1/stories calls paid upstreams: tighter than reads.
    create_story: str = "20/minute"
    # More per-route limits, JSON: {"GET /v1/stories": "60/minute"} (method and path template).
    routes: dict[str, str] = Field(default_factory=dict)
    # Budget of one Redis round trip; past it this process counts in memory instead.
    redis_budget_ms: int = Field(default=50, ge=1)
    # After Redis failed, how long to count in memory before trying Redis again.
    redis_retry_seconds: float = Field(default=5.0, gt=0)

    @field_validator("default", "create_story")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        return _limit_string(value)

    @field_validator("routes")
    @classmethod
    def _valid_routes(cls, value: dict[str, str]) -> dict[str, str]:
        checked: dict[str, str] = {}
        for route, limit in value.items():
            method, _, path = route.strip().partition(" ")
            if not method or not path.startswith("/"):
                raise ValueError(f"route {route!r} must read 'METHOD /path/template'")
            checked[f"{method.upper()} {path.strip()}"] = _limit_string(limit)
        return checked

    def route_limits(self) -> dict[str, str]:
        """Limit string by "METHOD /path/template", settings-defined routes only."""
        return {"POST /v1/stories": self.create_story, **self.routes}


class ProxySettings(BaseSettings):
    """Which direct peers may tell us the client address (`TRUSTED_PROXIES`)."""

    model_config = _group("")

    # Comma-separated IPs or CIDRs. Only from these peers are X-Forwarded-For and
    # Forwarded believed; anyone else is keyed by its own address.
    trusted_proxies: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            value = [ip_network(v, strict=False) if isinstance(v, str) else v for v in value]
        return value


class HealthSettings(BaseSettings):
    """What `/health` and `/health/ready` check, and when system figures warn (`HEALTH_*`)."""

    model_config = _group("HEALTH_")

    # Each dependency check (Redis, database) gets this long; they run concurrently.
    check_timeout_seconds: float = Field(default=0.5, gt=0, le=10)
    cpu_warn_percent: float = Field(default=80.0, gt=0, le=100)
    memory_warn_percent: float = Field(default=90.0, gt=0, le=100)
    disk_warn_percent: float = Field(default=90.0, gt=0, le=100)
    disk_path: Path = Path("/")
    # psutil is sampled in the background this often; requests read the last sample.
    sample_interval_seconds: float = Field(default=5.0, gt=0)
    # A configured Redis that does not answer makes the instance unready.
    redis_required: bool = True
    # Concurrent health requests share one round of dependency checks, and its result
    # is reused this long (probe storms cost one round per interval, never a pool).
    cache_seconds: float = Field(default=1.0, ge=0, le=60)


class SentrySettings(BaseSettings):
    """Error reporting to Sentry, on when `SENTRY_DSN` is set (`SENTRY_*`)."""

    model_config = _group("SENTRY_")

    dsn: SecretStr | None = None
    # Default: APP_ENV.
    environment: str | None = None
    # Default: story-service@<version>.
    release: str | None = None
    traces_sample_rate: float = Field(default=0.0, ge=0, le=1)


class MaintenanceSettings(BaseSettings):
    """Maintenance mode: API routes answer 503, health and metrics stay up (`MAINTENANCE_*`)."""

    model_config = _group("MAINTENANCE_")

    # On for this process; the Redis flag below turns it on for every replica.
    mode: bool = False
    retry_after_seconds: int = Field(default=300, ge=1)
    redis_key: str = "story:maintenance"
    # How often each process re-reads the Redis flag.
    refresh_seconds: float = Field(default=2.0, gt=0)


class ShutdownSettings(BaseSettings):
    """What happens on SIGTERM before uvicorn's graceful shutdown (`SHUTDOWN_*`).

    SHUTDOWN_GRACE_SECONDS (in-flight requests' time to finish) is read by `python -m app`.
    """

    model_config = _group("SHUTDOWN_")

    # Keep accepting (and failing /health/ready) this long after SIGTERM, so load
    # balancers without a preStop hook see the instance unready before it stops.
    drain_delay_seconds: float = Field(default=0.0, ge=0, le=120)


# Settings names the operations groups above before they exist; resolve them now.
Settings.model_rebuild()
