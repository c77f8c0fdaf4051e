"""The one error root of the service: what went wrong, for the caller.

Services and the layers below raise `AppError` subclasses (never `HTTPException`);
`app.problems` renders them as RFC 9457 problem details. Each class carries its
status, title and problem-type slug; an instance carries the detail, extra
headers (`Retry-After`) and per-field errors. This module imports nothing from
the app, so every layer may raise these.

    AppError                      500 internal
     +-- UnauthorizedError        401 unauthorized (WWW-Authenticate)
     +-- NotFoundError            404 not-found
     +-- ConflictError            409 conflict
     +-- PayloadTooLargeError     413 payload-too-large
     +-- InvalidRequestError      422 invalid-request
     +-- ServiceUnavailableError  503 unavailable (Retry-After)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class AppError(Exception):
    """Root of every error the service reports to its callers."""

    status_code: int = 500
    title: str = "Internal server error"
    slug: str = "internal"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        self.errors = list(errors or [])


class UnauthorizedError(AppError):
    """No acceptable credentials; `challenge` is the `WWW-Authenticate` value (RFC 6750)."""

    status_code = 401
    title = "Unauthorized"
    slug = "unauthorized"

    def __init__(self, detail: str | None = None, *, challenge: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class NotFoundError(AppError):
    status_code = 404
    title = "Not found"
    slug = "not-found"


class InvalidRequestError(AppError):
    status_code = 422
    title = "Invalid request"
    slug = "invalid-request"


class ConflictError(AppError):
    status_code = 409
    title = "Conflict"
    slug = "conflict"


class ServiceUnavailableError(AppError):
    status_code = 503
    title = "Service unavailable"
    slug = "unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class QuotaExceededError(AppError):
    """The principal's daily story quota is spent; `Retry-After` says when it renews."""

    status_code = 429
    title = "Daily quota reached"
    slug = "quota-exceeded"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class PayloadTooLargeError(AppError):
    status_code = 413
    title = "Payload too large"
    slug = "payload-too-large"
