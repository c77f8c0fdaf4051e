"""The ASGI application: `create_app(settings)` builds it; `app` is the default instance.

`uvicorn app.main:app` serves the default (configured from the environment).
Tests build their own app with their own settings. Nothing here opens a socket:
connections are opened by the lifespan, when the server starts the app.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.core.ratelimit import RateLimitMiddleware, TrustedProxies, limiter
from app.dependencies import principal_of
from app.http.body_limit import BodySizeLimitMiddleware
from app.http.context import RequestContextMiddleware
from app.http.headers import HeaderLimitMiddleware
from app.http.maintenance import MaintenanceMiddleware
from app.http.metrics import MetricsMiddleware
from app.http.openapi import install_openapi, operation_id
from app.lifespan import lifespan_for
from app.platform.config import Settings
from app.problems import install_error_handlers
from app.routers import health_detailed, illustrations, metrics, stories

VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="Story service",
        version=VERSION,
        description="Writes, illustrates and keeps children's stories; degrades, never fails.",
        lifespan=lifespan_for(settings, VERSION),
        # Off in production unless DOCS_ENABLED=true: the schema maps every route.
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        # No `/v1/stories/` -> `/v1/stories` redirect: Starlette builds it from the
        # Host header, so a forged Host made it an open redirect. Such paths are 404.
        redirect_slashes=False,
        # `create_story` -> `createStory`: the method names of generated clients.
        generate_unique_id_function=operation_id,
    )
    install_openapi(app)  # the document every client is generated from (docs/openapi.json)
    app.state.limiter = limiter  # slowapi's convention: @limiter.limit on endpoints
    install_error_handlers(app)
    app.include_router(health_detailed.router)
    # API routes count against the client's rate limits (their routers' route class,
    # `RateLimitedRoute`, checks before the body is read); health and metrics never do.
    app.include_router(stories.router)
    app.include_router(illustrations.router)
    app.include_router(metrics.router)
    # Added last = outermost: the request id exists before anything else runs.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        RateLimitMiddleware,
        trusted_proxies=TrustedProxies(settings.proxies.trusted_proxies),
        principal_of=principal_of,
        anonymous_principal=settings.anonymous_principal,
    )
    app.add_middleware(MaintenanceMiddleware)
    app.add_middleware(
        HeaderLimitMiddleware,
        max_count=settings.max_header_count,
        max_bytes=settings.max_header_bytes,
    )
    app.add_middleware(MetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Idempotency-Key", "X-Request-ID", "If-None-Match"],
            expose_headers=[
                "Location",
                "X-Request-ID",
                "Retry-After",
                "Idempotent-Replayed",
                "ETag",
            ],
        )
    app.add_middleware(RequestContextMiddleware)
    return app


app = create_app()
