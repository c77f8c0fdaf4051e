"""The OpenAPI document: every answer the server really gives, as it gives it.

Routes declare what is theirs (their body, their success, a 404 or a 409 with
`problem_responses`); this module adds what the layers around them answer, from
the same facts those layers act on, so the document cannot forget one:

- every operation: `431` (too many header bytes, `app.http.headers`), `500`;
  every answer carries `X-Request-ID` (`app.http.context`);
- API operations (not `is_operational_path`): the bearer JWT (`401` with
  `WWW-Authenticate`), `429` and the `X-RateLimit-*` headers (rate limiting),
  `503` with `Retry-After` (maintenance, storage, identity provider, no rung left);
- with a body: `400` (not JSON) and `413` (`MAX_BODY_BYTES`); with any input: `422`.

Every error is the one `Problem` schema as `application/problem+json` (FastAPI's
`HTTPValidationError` is replaced); health answers are `application/health+json`.
Operation ids are the endpoints' names in camelCase (`create_story` ->
`createStory`). Nothing here depends on settings: the document is the same in
every environment, and `python -m app.openapi` writes it (`docs/openapi.json`).
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from app.core.ratelimit import is_operational_path
from app.problems import PROBLEM_BASE, PROBLEM_JSON, FieldError, Problem, omit_null_defaults

HEALTH_JSON = "application/health+json"
BEARER = "bearerAuth"
_SCHEMAS = "#/components/schemas/"
_RESPONSES = "#/components/responses/"
_HEADERS = "#/components/headers/"

TAGS = [
    {"name": "stories", "description": "Write, read and list the caller's stories."},
    {
        "name": "health",
        "description": "Probes for orchestrators and operators (`application/health+json`, "
        "draft-inadarei-api-health-check); never authenticated, never rate limited.",
    },
]


def operation_id(route: APIRoute) -> str:
    """`create_story` -> `createStory`: the method name in every generated client."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


# --- the health+json document -------------------------------------------------------


class HealthCheckResult(BaseModel):
    """One measurement of one component (`checks` maps "component:measurement" to these)."""

    model_config = ConfigDict(json_schema_extra=omit_null_defaults)

    componentType: str = Field(description="`datastore`, `component`, `system`, ...")
    componentId: str | SkipJsonSchema[None] = Field(
        default=None, description="Which one (`sqlite`, `postgresql`, a breaker's name, ...)."
    )
    observedValue: int | float | str | bool | SkipJsonSchema[None] = None
    observedUnit: str | SkipJsonSchema[None] = Field(default=None, description="`ms`, `%`, ...")
    status: Literal["pass", "warn", "fail"]
    time: datetime = Field(description="When it was measured (UTC).")
    output: str | SkipJsonSchema[None] = Field(
        default=None, description="Why it warns or fails, for an operator."
    )


class HealthDocument(BaseModel):
    """draft-inadarei-api-health-check. `/health/live` sends `status` only; `/health/ready`
    adds `checks`, `failing` and `warnings`; `/health` adds the service's identity."""

    model_config = ConfigDict(json_schema_extra=omit_null_defaults)

    status: Literal["pass", "warn", "fail"] = Field(
        description="`fail` comes with status 503: do not send this instance traffic."
    )
    version: str | SkipJsonSchema[None] = None
    releaseId: str | SkipJsonSchema[None] = None
    serviceId: str | SkipJsonSchema[None] = None
    description: str | SkipJsonSchema[None] = None
    checks: dict[str, list[HealthCheckResult]] | SkipJsonSchema[None] = None
    failing: list[str] | SkipJsonSchema[None] = Field(
        default=None, description="Readiness: the components that fail it."
    )
    warnings: list[str] | SkipJsonSchema[None] = Field(
        default=None, description="Readiness: what is degraded but does not fail it."
    )


# --- shared headers and error answers -----------------------------------------------


def _header(description: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


_INT = {"type": "integer", "minimum": 0}
HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": _header(
        "This request's id (yours, when you sent a sane `X-Request-ID`); also in problem bodies.",
        {"type": "string"},
        required=True,
    ),
    "X-RateLimit-Limit": _header("Requests allowed in the current window.", _INT),
    "X-RateLimit-Remaining": _header("Requests left in the current window.", _INT),
    "X-RateLimit-Reset": _header("When the window resets (Unix time, seconds).", _INT),
    "Retry-After": _header("Seconds to wait before trying again.", _INT, required=True),
    "WWW-Authenticate": _header(
        'RFC 6750 challenge: `Bearer realm="stories"`, with `error="invalid_token"` and an '
        "`error_description` when a token was refused.",
        {"type": "string"},
        required=True,
    ),
}
_RATE = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def _example(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    body = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "/v1/stories",
        "request_id": "5f0c6a1b9d2e4c7f8a3b1e0d2c4f6a8b",
        **extra,
    }
    return {"summary": title, "value": body}


# status -> (component name, description, its headers, example)
_PROBLEMS: dict[int, tuple[str, str, tuple[str, ...], dict[str, Any]]] = {
    400: (
        "MalformedRequest",
        "The body is not JSON (`malformed-request`).",
        _RATE,
        _example(
            400,
            "malformed-request",
            "Malformed request",
            "The request body is not JSON this service can read.",
            errors=[{"field": "body", "reason": "not valid JSON: Expecting value at character 6"}],
        ),
    ),
    401: (
        "Unauthorized",
        "No bearer token, or one that was refused (`unauthorized`).",
        ("WWW-Authenticate", *_RATE),
        _example(401, "unauthorized", "Unauthorized", "The bearer token was refused: expired."),
    ),
    404: (
        "NotFound",
        "No such story for this caller (another caller's story too: `not-found`).",
        _RATE,
        _example(404, "not-found", "Not found", "No story with id 3f1c...."),
    ),
    409: (
        "Conflict",
        "A request with this `Idempotency-Key` is still running (`conflict`): repeat it.",
        ("Retry-After", *_RATE),
        _example(409, "conflict", "Conflict", "A request with this Idempotency-Key is running."),
    ),
    413: (
        "PayloadTooLarge",
        "The body is larger than the service reads (`payload-too-large`).",
        (),
        _example(
            413,
            "payload-too-large",
            "Payload too large",
            "The request body is larger than 16384 bytes.",
        ),
    ),
    422: (
        "InvalidRequest",
        "The request breaks a rule; `errors` names each field (`invalid-request`; "
        "`unsuitable-prompt` for a prompt that is not for children).",
        _RATE,
        _example(
            422,
            "invalid-request",
            "Invalid request",
            "The request is not valid: age.",
            errors=[{"field": "age", "reason": "Input should be less than or equal to 12"}],
        ),
    ),
    429: (
        "RateLimited",
        "Over a rate limit (`rate-limited`): wait `Retry-After` seconds.",
        ("Retry-After", *_RATE),
        _example(
            429,
            "rate-limited",
            "Too many requests",
            "This client may make 60 requests per minute across the API. Retry in 12 s.",
        ),
    ),
    431: (
        "HeaderFieldsTooLarge",
        "Too many request headers, or too many bytes of them (`header-fields-too-large`).",
        (),
        _example(
            431,
            "header-fields-too-large",
            "Request header fields too large",
            "The request has 120 headers; at most 100 are read.",
        ),
    ),
    500: (
        "InternalError",
        "A fault of this service (`internal`): quote the request id.",
        (),
        _example(
            500,
            "internal",
            "Internal server error",
            "Something went wrong on our side. Quote the request id when reporting it.",
        ),
    ),
    503: (
        "Unavailable",
        "Cannot serve now, nothing was changed: maintenance (`maintenance`), storage "
        "(`storage-unavailable`), the identity provider's keys or no writer left "
        "(`unavailable`). Retry after `Retry-After` seconds.",
        ("Retry-After", *_RATE),
        _example(
            503,
            "maintenance",
            "Down for maintenance",
            "The service is in maintenance. Please retry later.",
        ),
    ),
}


# Headers a problem always carries, though other answers may lack them.
_ALWAYS: dict[int, tuple[str, ...]] = {429: _RATE}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """For a route's `responses=`: these statuses, as the shared problem answers."""
    return {status: {"$ref": _RESPONSES + _PROBLEMS[status][0]} for status in statuses}


def _header_of(name: str, always: tuple[str, ...]) -> dict[str, Any]:
    if name in always and not HEADERS[name]["required"]:
        return {**HEADERS[name], "required": True}
    return {"$ref": _HEADERS + name}


def _problem_component(
    description: str, headers: tuple[str, ...], example: dict[str, Any], always: tuple[str, ...]
) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {name: _header_of(name, always) for name in ("X-Request-ID", *headers)},
        "content": {
            PROBLEM_JSON: {
                "schema": {"$ref": _SCHEMAS + "Problem"},
                "examples": {example["value"]["type"].rsplit("/", 1)[1]: example},
            }
        },
    }


def _schemas_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_SCHEMAS + "{model}")
    found = schema.pop("$defs", {})
    found[model.__name__] = schema
    return dict(found)


# --- the document -------------------------------------------------------------------


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The document `/openapi.json` serves (and `docs/openapi.json` holds)."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=copy.deepcopy(TAGS),
    )
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_schemas_of(Problem))
    schemas.update(_schemas_of(FieldError))
    components["schemas"] = {name: _whole_bounds(schemas[name]) for name in sorted(schemas)}
    components["responses"] = {
        name: _problem_component(description, headers, example, _ALWAYS.get(status, ()))
        for status, (name, description, headers, example) in _PROBLEMS.items()
    }
    components["headers"] = copy.deepcopy(HEADERS)
    components["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A JWT from the app's identity provider; its `sub` owns the "
            "stories. Not checked when the service runs with `AUTH_MODE=none` (development).",
        }
    }
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            _complete(operation, api=not is_operational_path(path))
    return doc


def _whole_bounds(schema: Any) -> Any:
    """FastAPI writes an integer's bounds as floats (`12.0`); JSON readers want `12`."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("minimum", "maximum") and isinstance(value, float) and value.is_integer():
                schema[key] = int(value)
            else:
                _whole_bounds(value)
    elif isinstance(schema, list):
        for item in schema:
            _whole_bounds(item)
    return schema


def _tidy_parameter(parameter: dict[str, Any]) -> None:
    """`str | None` query parameters: a string that may be left out, never a JSON null."""
    schema = parameter.get("schema", {})
    branches = schema.get("anyOf", [])
    kept = [branch for branch in branches if branch != {"type": "null"}]
    if len(kept) == 1 and len(branches) == 2:
        del schema["anyOf"]
        parameter["schema"] = {**kept[0], **schema}
    parameter["schema"].pop("title", None)


def _complete(operation: dict[str, Any], *, api: bool) -> None:
    for parameter in operation.get("parameters", []):
        _tidy_parameter(parameter)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    added = [431, 500]
    if api:
        operation["security"] = [{BEARER: []}]
        added += [401, 429, 503]
    if "requestBody" in operation:
        added += [400, 413]
    if "requestBody" in operation or operation.get("parameters"):
        added.append(422)
    for code in added:
        responses[str(code)] = {"$ref": _RESPONSES + _PROBLEMS[code][0]}
    for status, response in responses.items():
        if "$ref" in response:
            response.pop("description", None)  # FastAPI's, beside the reference
            continue
        media_types = set(response.get("content", {}))
        if status[0] in "45" and int(status) in _PROBLEMS and media_types <= {PROBLEM_JSON}:
            # A route's own `{"content": {"application/problem+json": {}}}`, made whole.
            responses[status] = {"$ref": _RESPONSES + _PROBLEMS[int(status)][0]}
            continue
        headers = response.setdefault("headers", {})
        names = ["X-Request-ID", *(_RATE if api else ())]
        for name in names:
            headers.setdefault(name, {"$ref": _HEADERS + name})
        order = [*names, *sorted(set(headers) - set(names))]
        response["headers"] = {name: headers[name] for name in order}
    operation["responses"] = dict(sorted(responses.items()))


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` at the app's `openapi_url` (built once, then kept)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
