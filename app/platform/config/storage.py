"""Where state lives: the database and Redis."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from app.platform.config.base import settings_group


class DatabaseSettings(BaseSettings):
    model_config = settings_group("DATABASE_")

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
    model_config = settings_group("REDIS_")

    # Unset: breaker, limiter and cache state live in this process only.
    url: SecretStr | None = None
    # redis-py's defaults (seconds, with retries) would turn a silent Redis into
    # a long wait per request; these are the budget for one round trip.
    socket_timeout_ms: int = Field(default=50, ge=1)
    connect_timeout_ms: int = Field(default=100, ge=1)
    max_connections: int = Field(default=50, ge=1)
    # Event-loop lag past the budget's deadline that is not held against Redis: a
    # CPU-bound worker reads a prompt reply late, and that is not Redis failing.
    # The client's own socket timeouts sit above budget + this (a backstop). 0: a
    # plain wall-clock budget.
    loop_lag_allowance_ms: int = Field(default=1000, ge=0)
