"""Configuration refuses what it cannot honour, naming the variable, at start."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from app.platform.config import (
    DatabaseSettings,
    OpenAISettings,
    ReplicateSettings,
    ResilienceSettings,
    Settings,
)


def test_a_misspelt_breaker_override_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValidationError, match=r"failure_treshold.*known: failure_threshold"):
        ResilienceSettings(
            _env_file=None, breaker_overrides={"openai:chat": {"failure_treshold": 5}}
        )


def test_an_override_for_an_unknown_breaker_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown breaker 'openai:chats'"):
        ResilienceSettings(_env_file=None, breaker_overrides={"openai:chats": {}})


def test_a_recovery_time_above_the_cap_is_refused_naming_the_cap() -> None:
    with pytest.raises(ValidationError, match="RESILIENCE_BREAKER_MAX_RECOVERY_SECONDS"):
        ResilienceSettings(_env_file=None, breaker_recovery_seconds=900)


def test_overrides_change_only_their_breaker() -> None:
    settings = ResilienceSettings(
        _env_file=None, breaker_overrides={"replicate:image": {"failure_threshold": 5}}
    )

    assert settings.breaker("replicate:image")["failure_threshold"] == 5
    assert settings.breaker("openai:chat")["failure_threshold"] == 3


def test_overrides_are_read_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILIENCE_BREAKER_OVERRIDES", '{"openai:chat": {"recovery_timeout": 30}}')

    assert ResilienceSettings(_env_file=None).breaker("openai:chat")["recovery_timeout"] == 30


def test_a_pool_whose_minimum_exceeds_its_maximum_is_refused() -> None:
    with pytest.raises(ValidationError, match="DATABASE_POOL_MIN_SIZE"):
        DatabaseSettings(_env_file=None, pool_min_size=5, pool_max_size=2)


def _upstreams(deadline: float, *, replicate: bool) -> Settings:
    return Settings(
        _env_file=None,
        request_deadline_seconds=deadline,
        openai=OpenAISettings(_env_file=None, api_key=SecretStr("sk"), floor_seconds=2.0),
        replicate=ReplicateSettings(
            _env_file=None, api_token=SecretStr("r8") if replicate else None, floor_seconds=4.0
        ),
    )


def test_a_deadline_that_cannot_fit_the_rungs_floors_is_refused_naming_each_part() -> None:
    with pytest.raises(ValidationError) as refused:
        _upstreams(5.0, replicate=True)

    message = str(refused.value)
    for name in ("REQUEST_DEADLINE_SECONDS", "OPENAI_FLOOR_SECONDS", "REPLICATE_FLOOR_SECONDS"):
        assert name in message
    assert "RESILIENCE_LADDER_RESERVE_SECONDS" in message


def test_only_the_configured_upstreams_count_against_the_deadline() -> None:
    assert _upstreams(5.0, replicate=False).request_deadline_seconds == 5.0
