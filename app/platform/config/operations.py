"""Operations: rate limits, client addresses, health, Sentry, maintenance, shutdown."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode

from app.platform.config.base import settings_group


def _limit_string(value: str) -> str:
    """A `limits` rate string ("100/minute", "20/minute;200/hour"); refused at start if bad."""
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError as error:
        raise ValueError(f"not a rate limit ({error}); write e.g. 100/minute") from error
    return value


class RateLimitSettings(BaseSettings):
    """Per-client request limits: across the API, and per route beneath it (`RATE_LIMIT_*`)."""

    model_config = settings_group("RATE_LIMIT_")

    enabled: bool = True
    # Every API request of one client, whatever the route: its budget across the API.
    per_client: str = "100/minute"
    # Applies to every API route without a limit of its own (beneath `per_client`).
    default: str = "100/minute"
    # POST /v1/stories calls paid upstreams: tighter than reads.
    create_story: str = "20/minute"
    # More per-route limits, JSON: {"GET /v1/stories": "60/minute"} (method and path template).
    routes: dict[str, str] = Field(default_factory=dict)
    # Budget of one Redis round trip; past it this process counts in memory instead.
    redis_budget_ms: int = Field(default=50, ge=1)
    # After Redis failed, how long to count in memory before trying Redis again.
    redis_retry_seconds: float = Field(default=5.0, gt=0)

    @field_validator("per_client", "default", "create_story")
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

    model_config = settings_group("")

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

    model_config = settings_group("HEALTH_")

    # Each dependency check (Redis, database) gets this long; they run concurrently.
    check_timeout_seconds: float = Field(default=0.5, gt=0, le=10)
    cpu_warn_percent: float = Field(default=80.0, gt=0, le=100)
    memory_warn_percent: float = Field(default=90.0, gt=0, le=100)
    disk_warn_percent: float = Field(default=90.0, gt=0, le=100)
    disk_path: Path = Path("/")
    # psutil is sampled in the background this often; requests read the last sample.
    sample_interval_seconds: float = Field(default=5.0, gt=0)
    # A configured Redis that does not answer makes the instance unready. Off by
    # default: the service serves without Redis (state in-process), and a shared
    # dependency that fails every replica's readiness at once empties the Service.
    redis_required: bool = False
    # Concurrent health requests share one round of dependency checks, and its result
    # is reused this long (probe storms cost one round per interval, never a pool).
    cache_seconds: float = Field(default=1.0, ge=0, le=60)


class SentrySettings(BaseSettings):
    """Error reporting to Sentry, on when `SENTRY_DSN` is set (`SENTRY_*`)."""

    model_config = settings_group("SENTRY_")

    dsn: SecretStr | None = None
    # Default: APP_ENV.
    environment: str | None = None
    # Default: story-service@<version>.
    release: str | None = None
    traces_sample_rate: float = Field(default=0.0, ge=0, le=1)


class MaintenanceSettings(BaseSettings):
    """Maintenance mode: API routes answer 503, health and metrics stay up (`MAINTENANCE_*`)."""

    model_config = settings_group("MAINTENANCE_")

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

    model_config = settings_group("SHUTDOWN_")

    # Keep accepting (and failing /health/ready) this long after SIGTERM, so load
    # balancers without a preStop hook see the instance unready before it stops.
    drain_delay_seconds: float = Field(default=0.0, ge=0, le=120)
