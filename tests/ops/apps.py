"""An app built from explicit settings, its lifespan running, with a client to call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.core.config import Settings
from app.lifespan import AppState
from tests.support import make_settings, serve_app


def ops_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings on the embedded database (`make_settings`: generous rate limits
    unless given)."""
    return make_settings(sqlite_path=tmp_path / "stories.sqlite3", **overrides)


# The app started, with an ASGI client: `(app, client)`.
running = serve_app


def app_state(app: FastAPI) -> AppState:
    state: AppState = app.state.app_state
    return state
