"""Configuration refuses what it cannot honour, naming the variable, at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.platform.config import DatabaseSettings, ResilienceSettings


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
