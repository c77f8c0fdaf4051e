"""Errors as HTTP responses: RFC 9457 problem details, and the exception handlers.

This module is the only place that turns an error into an HTTP response. Every
error response is `application/problem+json` with the same members, always
carrying the request id:

    {"type": ..., "title": ..., "status": ..., "detail": ..., "instance": ...,
     "request_id": ..., "errors": [{"field": "prompt", "reason": "..."}]}

`Problem` is that shape as the OpenAPI document shows it (`app.http.openapi`).
A body that is not JSON at all is a 400 (`malformed-request`); a JSON body that
breaks the rules is a 422 (`invalid-request`). A method a path does not have is a
405 whose `Allow` lists the methods of every route on that path (Starlette's names
only the first route's), and `OPTIONS` on a known path answers 204 with that `Allow`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

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
MALFORMED_TITLE = "Malformed request"
MALFORMED_SLUG = "malformed-request"


def omit_null_defaults(schema: dict[str, Any]) -> None:
    """`json_schema_extra` for members left out when absent (never sent as null)."""
    for member in schema.get("properties", {}).values():
        if member.get("default", "") is None:
            del member["default"]


class FieldError(BaseModel):
    """One reason the request was refused, and where."""

    field: str = Field(
        description="What was wrong: a body member (`prompt`, `a.b` when nested), a query "
        "parameter (`limit`), a path parameter (`story_id`) or a header (`Idempotency-Key`); "
        "`body` for the body as a whole."
    )
    reason: str = Field(description="Why, for a person to read (not for a program to parse).")


class Problem(BaseModel):
    """Every error answer: RFC 9457 problem details, always with the request id."""

    # Examples: one for each status, in the OpenAPI document (`app.http.openapi`).
    model_config = ConfigDict(json_schema_extra=omit_null_defaults)

    type: str = Field(
        description="What kind of problem: a URI whose last segment is a stable slug "
        "(`invalid-request`, `not-found`, `rate-limited`, ...). Branch on this, not on `title`.",
        json_schema_extra={"format": "uri"},
    )
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(ge=100, le=599, description="The HTTP status code of this answer.")
    detail: str = Field(description="What happened this time, for a person to read.")
    instance: str | SkipJsonSchema[None] = Field(
        default=None, description="The request path the problem occurred on."
    )
    request_id: str = Field(
        description="The request's id, also in the `X-Request-ID` header: quote it in reports."
    )
    errors: list[FieldError] | SkipJsonSchema[None] = Field(
        default=None, description="Per-field reasons (invalid and malformed requests only)."
    )


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


def _malformed(request: Request, reason: str) -> Response:
    return problem_response(
        400,
        MALFORMED_TITLE,
        "The request body is not JSON this service can read.",
        slug=MALFORMED_SLUG,
        instance=request.url.path,
        errors=[{"field": "body", "reason": reason}],
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            where = err.get("loc", ())[-1:]
            at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
            return _malformed(request, f"not valid JSON: {ctx.get('error', 'decode error')}{at}")
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
    400: (MALFORMED_TITLE, MALFORMED_SLUG),
    404: (NotFoundError.title, NotFoundError.slug),
    405: ("Method not allowed", "method-not-allowed"),
    413: (PayloadTooLargeError.title, PayloadTooLargeError.slug),
}


# The order methods are listed in `Allow`.
_METHOD_RANK = {m: i for i, m in enumerate(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))}


def allowed_methods(request: Request) -> str:
    """`Allow` for the request's path: the methods of every route on it, and OPTIONS."""
    methods = {"OPTIONS"}
    # Every route, those of included routers too (FastAPI nests them).
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE and route.methods:
            methods |= set(route.methods)
    return ", ".join(sorted(methods, key=lambda m: (_METHOD_RANK.get(m, len(_METHOD_RANK)), m)))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=headers)
    if exc.status_code == 400:  # FastAPI's "error parsing the body" (not UTF-8, ...)
        return _malformed(request, "the body could not be read as JSON text")
    title, slug = _HTTP_PROBLEMS.get(exc.status_code, ("HTTP error", "http-error"))
    return problem_response(
        exc.status_code,
        title,
        str(exc.detail),
        slug=slug,
        instance=request.url.path,
        headers=headers,
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
