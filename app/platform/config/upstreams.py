"""The upstream providers: OpenAI, Replicate, and the moderation of what they read and write."""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, Field, SecretStr
from pydantic_settings import BaseSettings

from app.platform.config.base import settings_group


class OpenAISettings(BaseSettings):
    model_config = settings_group("OPENAI_")

    api_key: SecretStr | None = None
    base_url: AnyHttpUrl = AnyHttpUrl("https://api.openai.com/v1")
    model: str = "gpt-4o-mini"
    connect_timeout_seconds: float = Field(default=3.0, gt=0)
    read_timeout_seconds: float = Field(default=20.0, gt=0)
    max_connections: int = Field(default=100, ge=1)
    # The least time worth giving OpenAI, near its p99 latency: the rung is skipped
    # with less left, and an attempt cut after at least this long counts against its
    # circuit breaker (set it below the real latency and a healthy upstream opens).
    floor_seconds: float = Field(default=8.0, ge=0)

    @property
    def configured(self) -> bool:
        return self.api_key is not None and bool(self.api_key.get_secret_value())


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
    max_connections: int = Field(default=50, ge=1)
    # As OPENAI_FLOOR_SECONDS, for the Replicate text model (create + polls).
    floor_seconds: float = Field(default=8.0, ge=0)

    @property
    def configured(self) -> bool:
        return self.api_token is not None and bool(self.api_token.get_secret_value())


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
