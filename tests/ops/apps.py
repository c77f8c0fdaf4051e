"""An app built from explicit settings, its lifespan running, with a client to call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.dependencies import app_state_of
from app.platform.config import Settings
from tests.support import make_settings, serve_app


def ops_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings on the embedded database (`make_settings`: generous rate limits
    unless given)."""
    return make_settings(sqlite_path=tmp_path / "stories.sqlite3", **overrides)


# The app started, with an ASGI client: `(app, client)`.
running = serve_app

# The running app's `AppState`, to look at or poke.
app_state = app_state_of
