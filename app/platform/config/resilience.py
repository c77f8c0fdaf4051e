"""Circuit breakers, retries, bulkheads and the ladder's time budget."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from app.platform.config.base import settings_group

#: One breaker per upstream operation; the names `RESILIENCE_BREAKER_OVERRIDES` may use.
BREAKER_NAMES = ("openai:chat", "openai:moderation", "replicate:text", "replicate:image")


class ResilienceSettings(BaseSettings):
    """Circuit breakers, retries, admission and quotas around every upstream call."""

    model_config = settings_group("RESILIENCE_")

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
    # Admission per upstream operation and process (docs/resilience.md, "Admission"):
    # a limit that follows the upstream's latency, between this minimum and the
    # provider's ceiling (OPENAI_MAX_CONCURRENCY, REPLICATE_MAX_CONCURRENCY) ...
    concurrency_min: int = Field(default=4, ge=1, le=10_000)
    # ... starting here (high: an LLM's latency is its answer's length, not its load;
    # the limit grows about x3 per round trip while in use, and shrinks on trouble) ...
    concurrency_initial: int = Field(default=128, ge=1, le=10_000)
    # ... and shrinking when the latency now exceeds this multiple of the baseline.
    concurrency_latency_tolerance: float = Field(default=1.5, ge=1.0, le=10.0)
    # Callers waiting for a slot (each as long as its deadline allows); more are shed.
    queue_max: int = Field(default=1000, ge=0, le=100_000)
    # With Redis failing, the share of each provider quota (OPENAI_REQUESTS_PER_MINUTE,
    # ...) one process spends on its own: about 1 / (workers x replicas).
    quota_local_share: float = Field(default=0.25, gt=0, le=1)
    # The last rung of the ladder; off, a request nothing can serve gets 503.
    offline_fallback: bool = True
    # Time kept back from the upstream rungs for the cache, the offline storyteller
    # and storing the story.
    ladder_reserve_seconds: float = Field(default=0.5, ge=0)
    # The most an upstream rung may use of the time left when another upstream
    # rung follows it (never leaving the later one less than its floor).
    rung_share: float = Field(default=0.6, gt=0, le=1)

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
    def _initial_above_minimum(self) -> ResilienceSettings:
        if self.concurrency_initial < self.concurrency_min:
            raise ValueError(
                f"RESILIENCE_CONCURRENCY_INITIAL ({self.concurrency_initial}) is below "
                f"RESILIENCE_CONCURRENCY_MIN ({self.concurrency_min})"
            )
        return self

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
