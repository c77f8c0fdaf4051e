"""The checked-in contract (`docs/openapi.json`) is what the app serves, and it tells the truth.

Regenerate after a deliberate change: `python -m app.openapi > docs/openapi.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.openapi import document, render
from tests.contract.conftest import SCHEMA_FILE, checked_in_schema
from tests.support import make_settings, serve

REGENERATE = "python -m app.openapi > docs/openapi.json"
OPERATION_IDS = {
    ("post", "/v1/stories"): "createStory",
    ("get", "/v1/stories"): "listStories",
    ("get", "/v1/stories/{story_id}"): "getStory",
    ("get", "/v1/recommendations"): "getRecommendations",
    ("get", "/health"): "getHealth",
    ("get", "/health/ready"): "getReadiness",
    ("get", "/health/live"): "getLiveness",
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, methods in doc["paths"].items()
        for method, operation in methods.items()
    ]


def resolve(doc: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in response:
        name = response["$ref"].rsplit("/", 1)[1]
        resolved: dict[str, Any] = doc["components"]["responses"][name]
        return resolved
    return response


async def test_the_app_serves_the_checked_in_document(tmp_path: Path) -> None:
    settings = make_settings(sqlite_path=tmp_path / "s.sqlite3", docs_enabled=True)
    async with serve(settings) as client:
        served = (await client.get("/openapi.json")).json()
    assert served == checked_in_schema(), f"the contract changed: run `{REGENERATE}`"


def test_the_generator_writes_the_checked_in_bytes() -> None:
    assert render(document()) == SCHEMA_FILE.read_text(encoding="utf-8"), (
        f"docs/openapi.json is stale: run `{REGENERATE}`"
    )


def test_operation_ids_are_stable_names() -> None:
    doc = checked_in_schema()
    found = {(m, p): op["operationId"] for m, p, op in operations(doc)}
    assert found.items() >= OPERATION_IDS.items()
    assert all(op_id[0].islower() and "_" not in op_id for op_id in found.values())


def test_every_error_answer_is_the_one_problem_schema() -> None:
    doc = checked_in_schema()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for method, path, operation in operations(doc):
        for status, response in operation["responses"].items():
            body = resolve(doc, response)
            assert "X-Request-ID" in body["headers"], (method, path, status)
            if status.startswith(("4", "5")) and not path.startswith("/health"):
                assert body["content"] == {
                    "application/problem+json": {
                        "schema": PROBLEM_REF,
                        "examples": body["content"]["application/problem+json"]["examples"],
                    }
                }, (method, path, status)
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "request_id"}
    assert {"instance", "errors"} <= set(problem["properties"])
    field_error = doc["components"]["schemas"]["FieldError"]
    assert set(field_error["required"]) == {"field", "reason"}


def test_each_route_documents_the_statuses_it_can_answer() -> None:
    doc = checked_in_schema()
    expected = {
        ("post", "/v1/stories"): {"201", "400", "401", "409", "413", "422", "429", "503"},
        ("get", "/v1/stories"): {"200", "401", "422", "429", "503"},
        ("get", "/v1/stories/{story_id}"): {"200", "401", "404", "422", "429", "503"},
        ("get", "/v1/recommendations"): {"200", "401", "422", "429", "503"},
        ("get", "/health/ready"): {"200", "503"},
        ("get", "/health"): {"200", "503"},
        ("get", "/health/live"): {"200"},
    }
    found = {(m, p): set(op["responses"]) for m, p, op in operations(doc)}
    for key, statuses in expected.items():
        assert statuses | {"431", "500"} <= found[key], key


def test_the_headers_that_come_with_them() -> None:
    doc = checked_in_schema()
    responses = doc["components"]["responses"]
    for name in ("RateLimited", "Unavailable", "Conflict"):
        assert "Retry-After" in responses[name]["headers"], name
    assert set(responses["RateLimited"]["headers"]) >= {
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    }
    assert "WWW-Authenticate" in responses["Unauthorized"]["headers"]
    created = doc["paths"]["/v1/stories"]["post"]["responses"]["201"]["headers"]
    assert created["Location"]["required"] is True
    assert created["Idempotent-Replayed"]["schema"]["enum"] == ["true"]
    assert "X-RateLimit-Remaining" in created


def test_health_is_health_json_with_its_schema() -> None:
    doc = checked_in_schema()
    for path in ("/health", "/health/ready", "/health/live"):
        operation = doc["paths"][path]["get"]
        assert "security" not in operation
        for status in ("200", "503"):
            if status in operation["responses"]:
                content = operation["responses"][status]["content"]
                assert list(content) == ["application/health+json"], (path, status)
                assert content["application/health+json"]["schema"] == {
                    "$ref": "#/components/schemas/HealthDocument"
                }
    health = doc["components"]["schemas"]["HealthDocument"]
    assert health["properties"]["status"]["enum"] == ["pass", "warn", "fail"]


def test_enums_cursor_and_security() -> None:
    doc = checked_in_schema()
    create = doc["components"]["schemas"]["CreateStory"]["properties"]
    assert create["language"]["enum"][:3] == ["en", "en-US", "en-GB"]
    assert len(create["language"]["enum"]) == 14
    assert create["length"]["enum"] == ["short", "medium", "long"]
    assert create["prompt"]["format"] == "story-prompt"
    (cursor,) = [
        p for p in doc["paths"]["/v1/stories"]["get"]["parameters"] if p["name"] == "cursor"
    ]
    assert cursor["schema"]["format"] == "page-cursor"
    assert "Opaque" in cursor["description"]
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    for method, path, operation in operations(doc):
        if path.startswith("/v1/"):
            assert operation["security"] == [{"bearerAuth": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
