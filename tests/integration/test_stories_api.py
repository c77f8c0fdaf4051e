"""The story API over HTTP, on both databases (embedded SQLite and real PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.platform.config import Settings
from tests.support import STORY_BODY, make_settings, serve

SettingsFactory = Callable[..., Settings]


@pytest.fixture(params=["sqlite", "postgres"])
def settings_for(request: pytest.FixtureRequest, tmp_path: Path) -> SettingsFactory:
    """Builds settings on the parametrized database; extra keywords pass through."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("clean_postgres")

        def on_postgres(**kwargs: Any) -> Settings:
            return make_settings(database_url=url, **kwargs)

        return on_postgres

    def on_sqlite(**kwargs: Any) -> Settings:
        return make_settings(sqlite_path=tmp_path / "stories.sqlite3", **kwargs)

    return on_sqlite


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_create_returns_201_with_location_and_the_story(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for()) as client:
        response = await client.post("/v1/stories", json=STORY_BODY)

    assert response.status_code == 201
    story = response.json()
    assert response.headers["location"] == f"/v1/stories/{story['id']}"
    assert story["provider"] == "offline"
    assert story["degraded"] is True
    assert story["age"] == 6
    assert story["language"] == "en"
    assert story["illustration"] is None
    assert story["illustrate"] is False
    assert len(story["paragraphs"]) == 3
    assert "dragon" in story["title"]
    assert story["created_at"].endswith("Z")


async def test_created_story_can_be_fetched_by_its_location(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        created = await client.post("/v1/stories", json=STORY_BODY)
        fetched = await client.get(created.headers["location"])

    assert fetched.status_code == 200
    assert fetched.json() == created.json()


async def test_unknown_story_is_a_404_problem(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        response = await client.get("/v1/stories/6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e7f")

    body = assert_problem(response, 404)
    assert "6f1c2c1e-9d4e-4c4b-9a59-2f3c4b5d6e7f" in body["detail"]


async def test_malformed_story_id_is_a_422_naming_the_field(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        response = await client.get("/v1/stories/not-a-uuid")

    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == ["story_id"]


async def test_list_pages_newest_first_with_an_opaque_cursor(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        created = []
        for n in range(5):
            response = await client.post("/v1/stories", json={**STORY_BODY, "prompt": f"story {n}"})
            created.append(response.json()["id"])
        seen: list[str] = []
        pages = 0
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get("/v1/stories", params=params)).json()
            pages += 1
            seen.extend(item["id"] for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break

    assert seen == list(reversed(created))
    assert pages == 3


async def test_a_cursor_we_did_not_issue_is_a_422_on_cursor(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        response = await client.get("/v1/stories", params={"cursor": "bm90LWEtY3Vyc29y"})

    body = assert_problem(response, 422)
    assert body["errors"] == [{"field": "cursor", "reason": "not a valid cursor"}]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 501}, "prompt"),
        ({"age": 1}, "age"),
        ({"age": 13}, "age"),
        ({"age": "6"}, "age"),
        ({"length": "epic"}, "length"),
        ({"language": "klingon"}, "language"),
        ({"illustrate": "yes"}, "illustrate"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_invalid_input_is_a_422_naming_the_field_and_stores_nothing(
    settings_for: SettingsFactory, change: dict[str, Any], field: str
) -> None:
    async with serve(settings_for()) as client:
        response = await client.post("/v1/stories", json={**STORY_BODY, **change})
        listed = await client.get("/v1/stories")

    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == [field]
    assert body["errors"][0]["reason"]
    assert listed.json()["items"] == []


async def test_missing_required_fields_are_all_named(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        response = await client.post("/v1/stories", json={})

    body = assert_problem(response, 422)
    assert sorted(e["field"] for e in body["errors"]) == ["age", "prompt"]


async def test_a_body_that_is_not_json_is_a_400(settings_for: SettingsFactory) -> None:
    async with serve(settings_for()) as client:
        response = await client.post(
            "/v1/stories", content=b"{not json", headers={"content-type": "application/json"}
        )

    body = assert_problem(response, 400)
    assert body["type"].endswith("/malformed-request")
    assert body["errors"][0]["field"] == "body"


async def test_an_oversized_body_is_a_413_problem(settings_for: SettingsFactory) -> None:
    async with serve(settings_for(max_body_bytes=2048)) as client:
        response = await client.post("/v1/stories", json={**STORY_BODY, "prompt": "x" * 5000})

    assert_problem(response, 413)


async def test_an_oversized_streamed_body_is_the_same_413_problem(
    settings_for: SettingsFactory,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1024

    async with serve(settings_for(max_body_bytes=2048)) as client:
        declared = await client.post("/v1/stories", content=b"x" * 4096)
        streamed = await client.post(
            "/v1/stories", content=chunks(), headers={"content-type": "application/json"}
        )

    assert "content-length" not in streamed.request.headers
    first, second = assert_problem(declared, 413), assert_problem(streamed, 413)
    assert (second["type"], second["title"]) == (first["type"], first["title"])


async def test_language_tags_are_accepted_case_insensitively_and_canonicalised(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for()) as client:
        response = await client.post("/v1/stories", json={**STORY_BODY, "language": "PT-br"})

    assert response.status_code == 201
    assert response.json()["language"] == "pt-BR"


async def test_recommendations_return_stored_stories_near_the_age(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for()) as client:
        for age in (3, 6, 7, 11):
            await client.post("/v1/stories", json={**STORY_BODY, "age": age})
        response = await client.get("/v1/recommendations", params={"age": 6})

    assert response.status_code == 200
    body = response.json()
    assert body["age"] == 6
    assert sorted(item["age"] for item in body["items"]) == [6, 7]
    assert body["items"][0]["age"] == 6


async def test_stories_survive_an_app_restart(settings_for: SettingsFactory) -> None:
    settings = settings_for()
    async with serve(settings) as client:
        created = (await client.post("/v1/stories", json=STORY_BODY)).json()
    async with serve(settings) as client:
        fetched = await client.get(f"/v1/stories/{created['id']}")

    assert fetched.json() == created


async def test_request_id_is_taken_from_the_caller_or_generated(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for()) as client:
        given = await client.get("/health/live", headers={"X-Request-ID": "phone-123.abc"})
        invalid = await client.get("/health/live", headers={"X-Request-ID": "bad id\twith tab"})
        generated = await client.get("/health/live")

    assert given.headers["x-request-id"] == "phone-123.abc"
    assert invalid.headers["x-request-id"] != "bad id\twith tab"
    assert len(generated.headers["x-request-id"]) == 32


async def test_migrations_are_recorded_and_rerunning_them_changes_nothing(
    clean_postgres: str,
) -> None:
    settings = make_settings(database_url=clean_postgres)
    async with serve(settings):
        pass
    async with serve(settings):
        pass
    conn = await asyncpg.connect(clean_postgres)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
    finally:
        await conn.close()
    assert versions == sorted(set(versions))
    assert "0001_stories" in versions


async def test_cors_allows_only_the_configured_origins(tmp_path: Path) -> None:
    settings = make_settings(sqlite_path=tmp_path / "s.db", cors_origins=["https://app.example"])
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,idempotency-key",
    }
    async with serve(settings) as client:
        allowed = await client.options(
            "/v1/stories", headers={"Origin": "https://app.example", **preflight}
        )
        other = await client.options(
            "/v1/stories", headers={"Origin": "https://evil.example", **preflight}
        )
    async with serve(make_settings(sqlite_path=tmp_path / "s.db")) as client:
        unset = await client.get("/v1/stories", headers={"Origin": "https://app.example"})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "idempotency-key" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in unset.headers
