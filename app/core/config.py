"""Service configuration, read from environment variables (and an optional `.env`).

Settings are grouped by the part of the system they configure; each group reads
its own prefix (`OPENAI_*`, `REPLICATE_*`, `DATABASE_*`, ...), so the variable
names an operator types are the ones the providers document. Nothing here
connects to anything: `create_app(settings)` decides what to open.
Every variable is listed, with its default, in the README's configuration table.
"""

from __future__ import annotations

from enum import StrEnum
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
