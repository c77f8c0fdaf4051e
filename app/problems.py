"""Errors as HTTP responses: RFC 9457 problem details, and the exception handlers.

This module is the only place that turns an error into an HTTP response. Every
error response is `application/problem+json` with the same members, always
carrying the request id:

    {"type": ..., "title": ..., "status": ..., "detail": ..., "instance": ...,
     "request_id": ..., "errors": [{"field": "prompt", "reason": "..."}]}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from app.db.repository import StorageUnavailableError
from app.errors import (
    AppError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from app.platform.logs import current_request_id

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://story-service.dev/problems/"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    instance: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": current_request_id(),
    }
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = list(errors)
    return JSONResponse(
        body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON
    )


def _field_of(location: Sequence[Any]) -> str:
    # ("body", "prompt") -> "prompt"; ("query", "limit") -> "limit"; nested -> "a.b"
    parts = [str(p) for p in location]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


async def _app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return problem_response(
        exc.status_code,
        exc.title,
        exc.detail,
        slug=exc.slug,
        instance=request.url.path,
        errors=exc.errors,
        headers=exc.headers,
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": _field_of(err.get("loc", ())),
            "reason": str(err.get("msg", "invalid")).removeprefix("Value error, "),
        }
        for err in exc.errors()
    ]
    fields = ", ".join(sorted({e["field"] for e in errors}))
    return problem_response(
        422,
        InvalidRequestError.title,
        f"The request is not valid: {fields}.",
        slug=InvalidRequestError.slug,
        instance=request.url.path,
        errors=errors,
    )


# Framework-raised HTTP errors, rendered as the matching AppError would be.
_HTTP_PROBLEMS: dict[int, tuple[str, str]] = {
    404: (NotFoundError.title, NotFoundError.slug),
    405: ("Method not allowed", "method-not-allowed"),
    413: (PayloadTooLargeError.title, PayloadTooLargeError.slug),
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    title, slug = _HTTP_PROBLEMS.get(exc.status_code, ("HTTP error", "http-error"))
    return problem_response(
        exc.status_code,
        title,
        str(exc.detail),
        slug=slug,
        instance=request.url.path,
        headers=exc.headers,
    )


async def _storage_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("storage unavailable", extra={"error": str(exc)})
    return problem_response(
        503,
        ServiceUnavailableError.title,
        "Stories cannot be read or saved right now; nothing was changed. Try again shortly.",
        slug="storage-unavailable",
        instance=request.url.path,
        headers={"Retry-After": "5"},
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        AppError.title,
        "Something went wrong on our side. Quote the request id when reporting it.",
        slug=AppError.slug,
        instance=request.url.path,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StorageUnavailableError, _storage_unavailable)
    app.add_exception_handler(Exception, _unexpected_error)
