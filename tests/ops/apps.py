"""An app built from explicit settings, its lifespan running, with a client to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.core.config import RateLimitSettings, Settings
from app.lifespan import AppState
from app.main import create_app
from tests.support import make_settings


def ops_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings on the embedded database; the rate limits are generous unless given."""
    overrides.setdefault(
        "rate_limit",
        RateLimitSettings(_env_file=None, default="1000/minute", create_story="1000/minute"),
    )
    return make_settings(sqlite_path=tmp_path / "stories.sqlite3", **overrides)


@asynccontextmanager
async def running(
    settings: Settings, *, app: FastAPI | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app (built from `settings` unless given) started, and an ASGI client for it."""
    app = app or create_app(settings)
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        ) as client,
    ):
        yield app, client


def app_state(app: FastAPI) -> AppState:
    state: AppState = app.state.app_state
    return state
