"""The upstream providers: OpenAI, Replicate, and the moderation of what they read and write."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from app.platform.config.base import settings_group


def _connections_follow_concurrency(data: Any, prefix: str) -> Any:
    """`max_connections` unset: the concurrency ceiling; set below it: refused (a
    call admitted by the bulkhead would wait for a connection, and its wait would
    read as upstream latency)."""
    if not isinstance(data, dict):
        return data
    ceiling = data.get("max_concurrency")
    connections = data.get("max_connections")
    if connections in (None, ""):
        data = {**data, "max_connections": ceiling if ceiling not in (None, "") else None}
        if data["max_connections"] is None:
            data.pop("max_connections")
    elif ceiling not in (None, "") and int(connections) < int(ceiling):
        raise ValueError(
            f"{prefix}MAX_CONNECTIONS ({connections}) is below {prefix}MAX_CONCURRENCY "
            f"({ceiling}): leave it unset to follow the ceiling, or raise it"
        )
    return data


class OpenAISettings(BaseSettings):
    model_config = settings_group("OPENAI_")

    api_key: SecretStr | None = None
    base_url: AnyHttpUrl = AnyHttpUrl("https://api.openai.com/v1")
    model: str = "gpt-4o-mini"
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    read_timeout_seconds: float = Field(default=20.0, gt=0)
    # The hard ceiling of the adaptive concurrency limit of each OpenAI operation,
    # per process; the connection pool follows it unless OPENAI_MAX_CONNECTIONS is set.
    max_concurrency: int = Field(default=512, ge=1, le=10_000)
    max_connections: int = Field(default=512, ge=1)
    # The account's quota, spent by the whole fleet through Redis (unset: no governor).
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    # The least time worth giving OpenAI, near its p99 latency: the rung is skipped
    # with less left, and an attempt cut after at least this long counts against its
    # circuit breaker (set it below the real latency and a healthy upstream opens).
    floor_seconds: float = Field(default=8.0, ge=0)

    @property
    def configured(self) -> bool:
        return self.api_key is not None and bool(self.api_key.get_secret_value())

    @model_validator(mode="before")
    @classmethod
    def _connections(cls, data: Any) -> Any:
        return _connections_follow_concurrency(data, "OPENAI_")

    @model_validator(mode="after")
    def _pool_holds_the_ceiling(self) -> OpenAISettings:
        if self.max_connections < self.max_concurrency:
            raise ValueError(
                f"OPENAI_MAX_CONNECTIONS ({self.max_connections}) is below "
                f"OPENAI_MAX_CONCURRENCY ({self.max_concurrency})"
            )
        return self


class ReplicateSettings(BaseSettings):
    model_config = settings_group("REPLICATE_")

    api_token: SecretStr | None = None
    base_url: AnyHttpUrl = AnyHttpUrl("https://api.replicate.com")
    text_model: str = "meta/meta-llama-3-8b-instruct"
    image_model: str = "black-forest-labs/flux-schnell"
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    # A prediction not finished by then is cancelled and counts as a failure.
    prediction_timeout_seconds: float = Field(default=25.0, gt=0)
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    read_timeout_seconds: float = Field(default=20.0, gt=0)
    # As OPENAI_MAX_CONCURRENCY (a prediction holds no connection while it waits,
    # but creates and polls share the pool).
    max_concurrency: int = Field(default=50, ge=1, le=10_000)
    max_connections: int = Field(default=50, ge=1)
    # Predictions created per minute, across the fleet (unset: no governor).
    requests_per_minute: int | None = Field(default=None, ge=1)
    # As OPENAI_FLOOR_SECONDS, for the Replicate text model (create + polls).
    floor_seconds: float = Field(default=8.0, ge=0)

    @property
    def configured(self) -> bool:
        return self.api_token is not None and bool(self.api_token.get_secret_value())

    @model_validator(mode="before")
    @classmethod
    def _connections(cls, data: Any) -> Any:
        return _connections_follow_concurrency(data, "REPLICATE_")

    @model_validator(mode="after")
    def _pool_holds_the_ceiling(self) -> ReplicateSettings:
        if self.max_connections < self.max_concurrency:
            raise ValueError(
                f"REPLICATE_MAX_CONNECTIONS ({self.max_connections}) is below "
                f"REPLICATE_MAX_CONCURRENCY ({self.max_concurrency})"
            )
        return self


class ModerationSettings(BaseSettings):
    """How prompts and stories are checked (docs/security.md, "Child-safe content")."""

    model_config = settings_group("MODERATION_")

    # openai: OpenAI's moderation endpoint; local: the local word list only.
    mode: Literal["openai", "local"] = "openai"
    # OpenAI cannot answer (no key, breaker open, timeout, 5xx): local (the word list
    # decides) or refuse (503 for a prompt, the next rung for a story).
    on_unavailable: Literal["local", "refuse"] = "local"
    model: str = "omni-moderation-latest"
    # One check's budget: this long, at most this share of REQUEST_DEADLINE_SECONDS.
    timeout_seconds: float = Field(default=2.0, gt=0)
    deadline_share: float = Field(default=0.1, gt=0, le=0.25)
    # A check cut after at least this long counts against the openai:moderation breaker.
    floor_seconds: float = Field(default=1.0, ge=0)

    def check_seconds(self, request_deadline_seconds: float) -> float:
        """The time one remote check may take."""
        return min(self.timeout_seconds, self.deadline_share * request_deadline_seconds)
