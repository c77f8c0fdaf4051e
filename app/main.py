"""The ASGI application: `create_app(settings)` builds it; `app` is the default instance.

`uvicorn app.main:app` serves the default (configured from the environment).
Tests build their own app with their own settings. Nothing here opens a socket:
connections are opened by the lifespan, when the server starts the app.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.core.config import Settings
from app.errors import install_error_handlers
from app.lifespan import lifespan
from app.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from app.routers import health_detailed, stories

VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="Story service",
        version=VERSION,
        description="Writes, illustrates and keeps children's stories; degrades, never fails.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health_detailed.router)
    app.include_router(stories.router)
    # Added last = outermost: the request id exists before anything else runs.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app


app = create_app()
