"""What every settings group shares: the environment names and how a group reads its prefix."""

from __future__ import annotations

from enum import StrEnum

from pydantic_settings import SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


def settings_group(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix, env_file=".env", extra="ignore", populate_by_name=True
    )
